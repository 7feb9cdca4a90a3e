"""The real service for tests: `sandboxd serve` as a subprocess on a loopback port with its own
state directory, tenants made with the real CLI, and plain HTTP requests."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import leftover_job_cgroups
from sandboxd.serve import cgroup_base_for

START_TIMEOUT_S = 60.0
URL_RE = re.compile(r"sandboxd is serving on (http://\S+)")


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def sandboxd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True,
                          check=check, timeout=60)


def add_tenant(state_dir: Path, name: str, *options: str) -> str:
    done = sandboxd("tenant", "add", name, "--json", "--state-dir", str(state_dir), *options)
    return json.loads(done.stdout)["api_key"]


class Service:
    def __init__(self, state_dir: Path, *options: str) -> None:
        self.state_dir = state_dir
        self.options = options
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.stdout = ""
        self.stderr_path = state_dir.parent / f"{state_dir.name}-service.log"

    def start(self) -> Service:
        stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "serve", "--port", "0", "--state-dir", str(self.state_dir),
             *self.options],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True)
        stderr.close()
        self.url = self._await_url()
        return self

    def _await_url(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(deadline - time.monotonic()):
                    break
                line = self.process.stdout.readline()
                if not line:
                    break
                self.stdout += line
                match = URL_RE.search(line)
                if match:
                    return match.group(1)
        raise AssertionError(f"the service did not start:\n{self.stdout}\n{self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def request(self, method: str, path: str, key: str | None = None, body: Any = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None, timeout_s: float = 120) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return Reply(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Reply(error.code, error.read(), dict(error.headers))

    def run(self, key: str, job: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
        """Submit with wait=true; the finished job object."""
        reply = self.request("POST", f"/v1/jobs?wait=true&timeout={timeout_s}", key, job)
        assert reply.status == 201, reply.body
        return reply.json()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def processes_mentioning(path: Path) -> list[str]:
    """Processes (but this one) whose command line names `path`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"process {pid}: {cmdline}")
    return found


def service_leftovers(state_dir: Path) -> list[str]:
    """What a stopped service may have left: job cgroups, processes started from its state
    directory (the launcher and containers carry it in their command line)."""
    own_base = cgroup_base_for(state_dir).split("/")[-1]  # other services may be running
    return [path for path in leftover_job_cgroups() if f"/{own_base}/" in path] + processes_mentioning(state_dir)
