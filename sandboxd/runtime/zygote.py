"""The zygote: a small process that clones containers on behalf of the launcher.

A clone copies the caller's page tables and makes every page of its heap copy-on-write on
both sides. From the launcher (the whole runtime, the seccomp compiler, the image code) that
cost a millisecond of its loop per container, and a page fault for each page it touched
after. The zygote imports only the container side, so a clone costs less, and the launcher's
loop never waits for one. CLONE_PARENT makes each container the launcher's own child, as if
the launcher had cloned it: the launcher reaps it, and it dies with the launcher (PDEATHSIG).

Messages are one pickle per SOCK_SEQPACKET datagram, between the launcher and the zygote it
started itself:
  to the zygote:   (CgroupDriver,) once, then (job_id, pickled (ContainerPlan, Limits),
                   background) per container; the plan stays pickled so both sides reuse it
                   by its bytes; background: the container is born under SCHED_IDLE
  from the zygote: (job_id, pid, None) with [report_read, control] attached; or
                   (job_id, pid or 0, message) when cloning or mapping its ids failed
"""

from __future__ import annotations

import array
import gc
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

from sandboxd.limits import Limits
from sandboxd.runtime import libc
from sandboxd.runtime.cgroup import CgroupDriver
from sandboxd.runtime.container import CLONE_FLAGS, ChildFds, ContainerPlan, container_main
from sandboxd.runtime.priority import run_in_background, run_in_foreground
from sandboxd.runtime.user import write_id_maps

_MAX_MESSAGE_BYTES = 1 << 20
_REPLY_FDS = 2  # report_read, control
_PLAN_CACHE_SIZE = 64  # containers come in few shapes: the pool's, and a few jobs' own


@dataclass(frozen=True)
class Cloned:
    """A container the clone made: the caller's ends of its pipes. pid 0: none was made."""

    job_id: str
    pid: int
    report_fd: int
    control: socket.socket | None
    error: str | None


def clone_container(plan: ContainerPlan, job_id: str, limits: Limits, cgroups: CgroupDriver,
                    extra_flags: int = 0) -> Cloned:
    """Clone a container into its user and PID namespaces; it prepares itself meanwhile
    (cgroup, other namespaces, filesystem) and says READY on its control socket.
    extra_flags=CLONE_PARENT makes it our parent's child instead of ours."""

    def join_cgroup() -> None:
        cgroup = cgroups.create(job_id, limits)
        cgroup.attach(0)  # "0": the writing process
        cgroup.close()

    go_read, go_write = os.pipe2(os.O_CLOEXEC)
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    parent_control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child_fds = ChildFds(go=go_read, report=report_write, control=child_control.fileno())
    try:
        pid = libc.clone(CLONE_FLAGS | extra_flags)
    except OSError as error:
        for fd in (go_read, go_write, report_read, report_write):
            os.close(fd)
        parent_control.close()
        child_control.close()
        return Cloned(job_id, 0, -1, None, f"clone: {error.strerror}")
    if pid == 0:
        try:
            libc.close_fds_except({go_read, report_write, child_control.fileno()})
            container_main(plan, child_fds, join_cgroup)
        finally:
            os._exit(125)  # never back into the caller's loop
    os.close(go_read)
    os.close(report_write)
    child_control.close()
    try:
        write_id_maps(pid, plan.id_mapping)
        os.write(go_write, b"g")
    except OSError as error:
        os.close(report_read)
        parent_control.close()
        return Cloned(job_id, pid, -1, None, f"mapping the container's ids: {error}")
    finally:
        os.close(go_write)  # without "g", the child exits on EOF
    return Cloned(job_id, pid, report_read, parent_control, None)


def _serve(sock: socket.socket) -> None:
    first = sock.recv(_MAX_MESSAGE_BYTES)
    if not first:
        return
    (cgroups,) = pickle.loads(first)
    # What exists now lives as long as we do: out of the collector's reach, so a collection
    # in a container never writes to (and copies) the pages it shares with us.
    gc.freeze()
    plans: dict[bytes, tuple[ContainerPlan, Limits]] = {}
    in_background = False
    while True:
        request = sock.recv(_MAX_MESSAGE_BYTES)
        if not request:
            return
        job_id, pickled_plan, background = pickle.loads(request)
        if pickled_plan not in plans:
            if len(plans) >= _PLAN_CACHE_SIZE:
                plans.clear()
            plans[pickled_plan] = pickle.loads(pickled_plan)
        plan, limits = plans[pickled_plan]
        if background != in_background:
            # A pool container is born under SCHED_IDLE (see priority.py), so it never
            # preempts a job, and no one can raise it before it is lowered.
            (run_in_background if background else run_in_foreground)(0)
            in_background = background
        try:
            cloned = clone_container(plan, job_id, limits, cgroups, libc.CLONE_PARENT)
        except Exception as error:  # noqa: BLE001 - the launcher must hear of every failure
            cloned = Cloned(job_id, 0, -1, None, f"{type(error).__name__}: {error}")
        reply = pickle.dumps((cloned.job_id, cloned.pid, cloned.error), protocol=pickle.HIGHEST_PROTOCOL)
        if cloned.control is None:
            sock.sendall(reply)
            continue
        fds = array.array("i", (cloned.report_fd, cloned.control.fileno()))
        sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        os.close(cloned.report_fd)
        cloned.control.close()


class ZygoteClient:
    """The launcher's side: start the zygote, ask for containers, take its replies in order.

    `on_cloned` gets a Cloned per request, in the order of the requests, from `on_readable`
    (call it when `fileno()` is readable). The containers are the caller's children."""

    def __init__(self, cgroups: CgroupDriver, on_cloned: Callable[[Cloned], None]) -> None:
        import subprocess  # here: the zygote itself has no use for it

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._on_cloned = on_cloned
        self.requested = 0  # replies still to come
        self._pickled_plans: dict[tuple[ContainerPlan, Limits], bytes] = {}
        self._process: Any = subprocess.Popen(
            [sys.executable, "-m", "sandboxd.runtime.zygote", "--fd", str(theirs.fileno()),
             "--parent", str(os.getpid())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._send((cgroups,))

    def fileno(self) -> int:
        return self._sock.fileno()

    def _send(self, message: Any) -> None:
        self._sock.sendall(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def request(self, job_id: str, plan: ContainerPlan, limits: Limits, background: bool) -> None:
        key = (plan, limits)
        pickled_plan = self._pickled_plans.get(key)
        if pickled_plan is None:
            if len(self._pickled_plans) >= _PLAN_CACHE_SIZE:
                self._pickled_plans.clear()
            pickled_plan = self._pickled_plans[key] = pickle.dumps(key, protocol=pickle.HIGHEST_PROTOCOL)
        self._send((job_id, pickled_plan, background))
        self.requested += 1

    def on_readable(self) -> None:
        data, ancillary, _, _ = self._sock.recvmsg(_MAX_MESSAGE_BYTES, socket.CMSG_SPACE(_REPLY_FDS * 4))
        if not data:
            raise RuntimeError(f"the zygote exited (status {self._process.wait()})")
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        job_id, pid, error = pickle.loads(data)
        self.requested -= 1
        if len(fds) == _REPLY_FDS:
            self._on_cloned(Cloned(job_id, pid, fds[0], socket.socket(fileno=fds[1]), None))
        else:
            for fd in fds:
                os.close(fd)
            self._on_cloned(Cloned(job_id, pid, -1, None, error or "the zygote sent no descriptors"))

    def close(self) -> None:
        """Take every outstanding reply (so each container made can be reaped), then stop."""
        self._sock.setblocking(True)
        while self.requested:
            self.on_readable()
        self._sock.close()
        self._process.wait()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    options = dict(zip(args[::2], args[1::2]))
    sock = socket.socket(fileno=int(options["--fd"]))
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.set_process_name("sbx-zygote")
    if os.getppid() != int(options["--parent"]):
        return  # the launcher died before the line above took effect
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the launcher ends us by closing the socket
    _serve(sock)


if __name__ == "__main__":
    main()
