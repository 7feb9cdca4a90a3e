"""The launcher: a pre-forked, single-threaded process that owns the Runtime for a service.

A multi-threaded service (an asyncio loop with executor threads) must not fork; so it starts
this process once, and sends it jobs over a socket pair. Containers are cloned from here, with
warm containers ready, and results come back as they finish.

Frames are a 4-byte length and a pickle, between a parent and the child it started itself.
  to the launcher:   ("run", token, JobSpec) | ("kill", token) | ("close",)
  from the launcher: ("ready",) once, then ("done", token, Result) | ("error", token, kind, message)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from sandboxd.job import JobSpec, Result
from sandboxd.runtime.net import loopback_up_request

_FRAME = struct.Struct("=I")
_SOCKET_BUFFER_BYTES = 4 << 20


class LauncherError(RuntimeError):
    """The launcher refused a job (kind "usage": bad spec or image) or failed ("internal")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(payload)) + payload


class _Server:
    def __init__(self, sock: socket.socket, runtime: Any) -> None:
        self._sock = sock
        self._runtime = runtime
        self._buffer = bytearray()
        self._jobs: dict[int, str] = {}  # token -> job id, until its result is sent
        self.open = True

    def on_readable(self) -> None:
        data = self._sock.recv(1 << 20)
        if not data:
            self.open = False
            return
        self._buffer += data
        while len(self._buffer) >= _FRAME.size:
            size = _FRAME.unpack_from(self._buffer)[0]
            if len(self._buffer) < _FRAME.size + size:
                break
            message = pickle.loads(bytes(self._buffer[_FRAME.size:_FRAME.size + size]))
            del self._buffer[:_FRAME.size + size]
            self._handle(message)

    def _handle(self, message: tuple) -> None:
        from sandboxd.images import UnknownImageError

        if message[0] == "run":
            _, token, spec = message
            self._jobs[token] = spec.job_id
            try:
                self._runtime.start(spec, lambda result, token=token: self._done(token, result))
            except UnknownImageError as error:
                self._jobs.pop(token, None)
                self._send(("error", token, "usage", str(error.args[0])))
            except Exception as error:  # noqa: BLE001 - the service must hear of every failure
                self._jobs.pop(token, None)
                self._send(("error", token, "internal", f"{type(error).__name__}: {error}"))
        elif message[0] == "kill":
            job_id = self._jobs.get(message[1])
            if job_id is not None:
                self._runtime.kill(job_id, "cancelled")
        elif message[0] == "close":
            self.open = False

    def kill_all(self) -> None:
        for job_id in list(self._jobs.values()):
            self._runtime.kill(job_id, "cancelled")

    def _done(self, token: int, result: Result) -> None:
        self._jobs.pop(token, None)
        self._send(("done", token, result))

    def _send(self, message: tuple) -> None:
        self._sock.sendall(_frame(message))


def serve(sock: socket.socket, state_dir: Path | None, warm_containers: int, cgroup_base: str,
          loopback_request: bytes | None) -> None:
    from sandboxd.runtime import libc
    from sandboxd.runtime.cgroup import detect_driver
    from sandboxd.runtime.launch import Runtime

    # Dies with the service, even by SIGKILL; containers die with us (their own PDEATHSIG).
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.set_process_name("sbx-launcher")
    if os.getppid() == 1:
        return  # the service died before the line above took effect
    driver = detect_driver(cgroup_base)
    # Job cgroups a killed launcher of this service left behind: their processes are dying
    # or dead; nothing else creates cgroups under this service's own base.
    driver.remove_stale()
    runtime = Runtime(state_dir=state_dir, cgroup_driver=driver, warm_containers=warm_containers,
                      loopback_request=loopback_request, zygote=True)
    runtime.prewarm()
    # What exists now lives as long as we do: out of the collector's reach, its objects are
    # never written to by a collection in a cloned container (copy-on-write stays shared).
    gc.freeze()
    # The socket stays blocking: it is read only when the loop saw it readable.
    sock.sendall(_frame(("ready",)))
    server = _Server(sock, runtime)
    runtime.supervisor.register_fd(sock.fileno(), server.on_readable)
    try:
        while server.open or runtime.active:
            # start() refills the pool once a job's order is out; this catches up on what it
            # could not (a pause after a failure, the first fill) while nothing runs.
            idle_refill = server.open and runtime.warm_deficit > 0 and runtime.running == 0
            handled = runtime.supervisor.step(0 if idle_refill else (None if server.open else 1.0))
            if idle_refill and handled == 0:
                runtime.prewarm(count=1)
            if not server.open:
                server.kill_all()
    finally:
        runtime.close()
        driver.release()


class LauncherClient:
    """The service's side: start the launcher once, then `await run(spec)` per job."""

    def __init__(self, state_dir: Path | None = None, warm_containers: int = 2,
                 cgroup_base: str = "sandboxd") -> None:
        self._state_dir = state_dir
        self._warm = warm_containers
        self._cgroup_base = cgroup_base
        self._process: subprocess.Popen | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._futures: dict[int, asyncio.Future] = {}
        self._tokens: dict[str, int] = {}  # job id -> token, until the launcher has answered
        self._job_ids: dict[int, str] = {}  # token -> job id, likewise
        self._next_token = 0

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
        argv = [sys.executable, "-m", "sandboxd.runtime.launcher", "--fd", str(theirs.fileno()),
                "--warm", str(self._warm), "--cgroup-base", self._cgroup_base,
                "--loopback-request", loopback_up_request().hex()]
        if self._state_dir is not None:
            argv += ["--state-dir", str(self._state_dir)]
        # A session of its own: a terminal's Ctrl-C or a signal to the service's process group
        # must not kill it before it has removed its containers; it ends when we close.
        self._process = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            header = await reader.readexactly(_FRAME.size)
            greeting = pickle.loads(await reader.readexactly(_FRAME.unpack(header)[0]))
        except asyncio.IncompleteReadError:
            raise LauncherError("internal", "the launcher exited while starting (see its stderr)") from None
        if greeting != ("ready",):
            raise LauncherError("internal", f"the launcher said {greeting!r} instead of ready")
        self._reader_task = asyncio.create_task(self._read_loop(reader))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await reader.readexactly(_FRAME.size)
                message = pickle.loads(await reader.readexactly(_FRAME.unpack(header)[0]))
                self._tokens.pop(self._job_ids.pop(message[1], ""), None)
                future = self._futures.pop(message[1], None)
                if future is None or future.done():
                    continue
                if message[0] == "done":
                    future.set_result(message[2])
                else:
                    future.set_exception(LauncherError(message[2], message[3]))
        except (asyncio.IncompleteReadError, ConnectionError):
            for future in self._futures.values():
                if not future.done():
                    future.set_exception(LauncherError("internal", "the launcher process exited"))
            self._futures.clear()
            self._tokens.clear()
            self._job_ids.clear()

    def launch(self, spec: JobSpec) -> asyncio.Future:
        """Send the job to the launcher now; the future gets its Result (or LauncherError).
        Cancelling the future does not stop the job: kill() does."""
        assert self._writer is not None, "start() first"
        token = self._next_token
        self._next_token += 1
        future = asyncio.get_running_loop().create_future()
        if self._reader_task is not None and self._reader_task.done():
            future.set_exception(LauncherError("internal", "the launcher process exited"))
            return future
        self._futures[token] = future
        self._tokens[spec.job_id] = token
        self._job_ids[token] = spec.job_id
        self._writer.write(_frame(("run", token, spec)))
        return future

    async def run(self, spec: JobSpec) -> Result:
        """launch() and wait; cancelled, it kills the job."""
        future = self.launch(spec)
        try:
            return await future
        except asyncio.CancelledError:
            self.kill(spec.job_id)
            raise

    def kill(self, job_id: str) -> None:
        """Kill a running job; its run() still returns the result (the job killed)."""
        token = self._tokens.get(job_id)
        if token is not None and self._writer is not None:
            self._writer.write(_frame(("kill", token)))

    async def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.write(_frame(("close",)))
                await self._writer.drain()
            except ConnectionError:
                pass  # the launcher is gone already
            self._writer.close()
        if self._process is not None:
            await asyncio.to_thread(self._process.wait)
        if self._reader_task is not None:
            await self._reader_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sandboxd-launcher")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--cgroup-base", default="sandboxd")
    parser.add_argument("--loopback-request", type=bytes.fromhex, help="the encoded netlink request, hex")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the service ends us by closing the socket
    serve(socket.socket(fileno=args.fd), args.state_dir, args.warm, args.cgroup_base, args.loopback_request)


if __name__ == "__main__":
    main()
