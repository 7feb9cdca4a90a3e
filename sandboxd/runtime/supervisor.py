"""The parent side of running jobs: one single-threaded event loop watches every running
container (its output pipes, its exit through a pidfd, its CPU and wall clocks), enforces
limits the moment they are crossed, and turns what happened into a Result.

CPU time is polled from the cgroup, adaptively: the next look is due when the job could
first reach its limit running flat out on every core it may use, so enforcement is prompt
without busy polling.
"""

from __future__ import annotations

import math
import os
import selectors
import signal
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from sandboxd.job import JobSpec, Result, decide_status
from sandboxd.runtime.cgroup import CgroupError, CgroupStats, JobCgroup
from sandboxd.runtime.pid import REPORT_EXEC_FAILED, REPORT_SETUP_FAILED, REPORT_STATUS

_READ_CHUNK = 1 << 16
_MAX_CPU_POLL_S = 0.1
_MIN_CPU_POLL_S = 0.002
_EXIT_CODE_EXEC_FAILED = 127
# Result field -> the CgroupStats figure it is computed from.
_RESULT_FIGURES = {
    "cpu_time_ms": "cpu_time_ns",
    "cpu_user_ms": "cpu_user_ns",
    "cpu_sys_ms": "cpu_sys_ns",
    "memory_peak_bytes": "memory_peak_bytes",
    "pids_peak": "pids_peak",
    "oom_killed": "oom_kills",
}
_WALL_CLOCK_SOURCE = "CLOCK_MONOTONIC, from the job's order to the end of its main process"


@dataclass
class OutputStream:
    fd: int
    limit_bytes: int
    chunks: list[bytes] = field(default_factory=list)
    size_bytes: int = 0
    truncated: bool = False
    open: bool = True

    def take(self, data: bytes) -> bool:
        """Keep what fits; True if the stream went over its limit."""
        room = self.limit_bytes - self.size_bytes
        if len(data) > room:
            if room > 0:
                self.chunks.append(data[:room])
                self.size_bytes += room
            self.truncated = True
            return True
        self.chunks.append(data)
        self.size_bytes += len(data)
        return False


@dataclass
class RunningJob:
    spec: JobSpec
    pid: int
    pidfd: int
    cgroup: JobCgroup | None  # None when the container failed before it had one
    on_gone: Callable[[], None]  # clean-up once the container's init is reaped
    report_fd: int
    stdout: OutputStream
    stderr: OutputStream
    started_ns: int
    on_done: Callable[[Result], None]
    cpu_parallelism: int
    wall_deadline_ns: int
    next_cpu_check_ns: int
    report: bytearray = field(default_factory=bytearray)
    ended_ns: int | None = None
    killed_for: str | None = None
    result: Result | None = None


def _nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


class Supervisor:
    """Delivers each job's Result as soon as it is known (its main process has ended and its
    output is complete), then finishes the clean-up (namespace teardown, cgroup removal)
    off the result's path, when the container's init is gone."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._jobs: dict[int, RunningJob] = {}  # by pid, until cleaned up

    @property
    def pending(self) -> int:
        """Jobs not yet cleaned up, whether or not their result was delivered."""
        return len(self._jobs)

    @property
    def running(self) -> int:
        """Jobs whose result is not delivered yet."""
        return sum(1 for job in self._jobs.values() if job.result is None)

    def watch(self, job: RunningJob) -> None:
        """Follow a started job. A stream already closed (a piped job's stdout, which its peer
        reads) is not watched."""
        self._jobs[job.pid] = job
        for stream, what in ((job.stdout, "stdout"), (job.stderr, "stderr")):
            if stream.open:
                _nonblocking(stream.fd)
                self._selector.register(stream.fd, selectors.EVENT_READ, (job, what))
        _nonblocking(job.report_fd)
        self._selector.register(job.report_fd, selectors.EVENT_READ, (job, "report"))
        self._selector.register(job.pidfd, selectors.EVENT_READ, (job, "exit"))

    def register_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Let an owner (the launcher server) share this loop for its own sockets."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def unregister_fd(self, fd: int) -> None:
        self._selector.unregister(fd)

    def kill(self, pid: int, reason: str) -> None:
        job = self._jobs.get(pid)
        if job is not None and job.result is None:
            self._kill(job, reason)

    def step(self, max_wait_s: float | None) -> int:
        """Wait for events or the next deadline, then handle them; returns how many."""
        timeout = self._seconds_to_next_deadline(max_wait_s)
        events = self._selector.select(timeout)
        for key, _ in events:
            data = key.data
            if callable(data):
                data()
                continue
            job, what = data
            if job.pid not in self._jobs:
                continue
            if what == "exit":
                self._reap(job)
            elif what == "report":
                self._read_report(job)
            else:
                self._read_stream(job, job.stdout if what == "stdout" else job.stderr)
        self._check_clocks()
        return len(events)

    def settle(self) -> None:
        """Return once every job is delivered and cleaned up."""
        while self._jobs:
            self.step(1.0)

    def _seconds_to_next_deadline(self, max_wait_s: float | None) -> float | None:
        live = [job for job in self._jobs.values() if job.result is None]
        if not live:
            return max_wait_s
        next_ns = min(min(job.wall_deadline_ns, job.next_cpu_check_ns) for job in live)
        wait_s = max(0.0, (next_ns - time.monotonic_ns()) / 1e9)
        return wait_s if max_wait_s is None else min(wait_s, max_wait_s)

    def _check_clocks(self) -> None:
        now = time.monotonic_ns()
        for job in list(self._jobs.values()):
            if job.killed_for is not None or job.ended_ns is not None:
                continue
            if now >= job.wall_deadline_ns:
                self._kill(job, "wall_time")
                continue
            if now >= job.next_cpu_check_ns:
                limit_ns = int(job.spec.limits.cpu_time_s * 1e9)
                try:
                    used_ns = job.cgroup.cpu_time_ns() if job.cgroup is not None else 0
                except OSError:
                    used_ns = 0
                if used_ns >= limit_ns:
                    self._kill(job, "cpu_time")
                    continue
                soonest_s = (limit_ns - used_ns) / 1e9 / job.cpu_parallelism
                delay_s = min(_MAX_CPU_POLL_S, max(_MIN_CPU_POLL_S, soonest_s))
                job.next_cpu_check_ns = now + int(delay_s * 1e9)

    def _kill(self, job: RunningJob, reason: str) -> None:
        if job.killed_for is None and job.ended_ns is None:
            job.killed_for = reason
        # Killing the namespace's PID 1 makes the kernel kill every process in it.
        try:
            signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _read_stream(self, job: RunningJob, stream: OutputStream) -> bool:
        """Read once; False when nothing was there to read (yet)."""
        try:
            data = os.read(stream.fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        if not data:
            self._close_fd(stream.fd)
            stream.open = False
            self._maybe_deliver(job)
            return False
        if stream.take(data) and job.killed_for is None:
            self._kill(job, "output")
        return True

    def _read_report(self, job: RunningJob) -> bool:
        try:
            data = os.read(job.report_fd, 4096)
        except BlockingIOError:
            return False
        if data:
            job.report += data
            if job.ended_ns is None and job.report[:1] == REPORT_STATUS and len(job.report) >= 5:
                job.ended_ns = time.monotonic_ns()  # the main process has ended
            self._maybe_deliver(job)
            return True
        self._close_fd(job.report_fd)
        job.report_fd = -1
        if job.ended_ns is None:
            job.ended_ns = time.monotonic_ns()  # the init has gone: the container has ended
        self._maybe_deliver(job)
        return False

    def _reap(self, job: RunningJob) -> None:
        os.waitpid(job.pid, 0)
        self._close_fd(job.pidfd)
        job.pidfd = -1
        # Every process of the namespace is gone now, so the pipes are at EOF: drain them.
        for stream in (job.stdout, job.stderr):
            while stream.open and self._read_stream(job, stream):
                pass
        while job.report_fd != -1 and self._read_report(job):
            pass
        self._maybe_deliver(job)
        del self._jobs[job.pid]
        job.on_gone()

    def _close_fd(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)

    def _maybe_deliver(self, job: RunningJob) -> None:
        """The result is known once the main process has ended (or the init has) and both
        output streams are complete; the init's teardown need not be waited for."""
        if job.result is not None or job.ended_ns is None or job.stdout.open or job.stderr.open:
            return
        job.result = _finish(job)
        job.on_done(job.result)


def _finish(job: RunningJob) -> Result:
    stats: CgroupStats | None = None
    problems: list[str] = []
    try:
        stats = job.cgroup.stats() if job.cgroup is not None else None
    except (OSError, CgroupError) as error:
        problems.append(f"reading accounting failed: {error}")

    exit_code: int | None = None
    signal_number: int | None = None
    message: str | None = None
    internal = False
    report = bytes(job.report)
    kind, body = report[:1], report[1:]
    if kind == REPORT_STATUS and len(body) >= 4:
        status = struct.unpack("=i", body[:4])[0]
        if os.WIFSIGNALED(status):
            signal_number = os.WTERMSIG(status)
        else:
            exit_code = os.WEXITSTATUS(status)
    elif kind == REPORT_EXEC_FAILED:
        exit_code = _EXIT_CODE_EXEC_FAILED
        message = "cannot execute " + body.decode(errors="replace").split(":", 1)[-1]
    elif kind == REPORT_SETUP_FAILED:
        internal = True
        message = body.decode(errors="replace")
    elif job.killed_for is not None:
        signal_number = signal.SIGKILL
    elif stats is not None and stats.oom_kills:
        signal_number = signal.SIGKILL  # the OOM killer took the container's init
    else:
        internal = True
        message = "the container's init ended without a report"

    limits = job.spec.limits
    cpu_time_ms = stats.cpu_time_ns / 1e6 if stats else 0.0
    killed_for = job.killed_for
    # RLIMIT_CPU is the backstop: its SIGXCPU (or SIGKILL at the hard limit) is a time limit.
    if killed_for is None and signal_number in (signal.SIGXCPU, signal.SIGKILL) and (
        cpu_time_ms >= limits.cpu_time_s * 1000
    ):
        killed_for = "cpu_time"
    oom_killed = bool(stats and stats.oom_kills)
    if problems and not internal:
        message = "; ".join(problems)
    status_name, limit_hit = decide_status(
        exit_code=exit_code,
        signal=signal_number,
        killed_for=killed_for,
        oom_killed=oom_killed,
        internal_error=internal,
    )
    ended_ns = job.ended_ns or time.monotonic_ns()
    return Result(
        status=status_name,
        exit_code=exit_code,
        signal=signal_number,
        cpu_time_ms=round(cpu_time_ms, 3),
        cpu_user_ms=round(stats.cpu_user_ns / 1e6, 3) if stats else 0.0,
        cpu_sys_ms=round(stats.cpu_sys_ns / 1e6, 3) if stats else 0.0,
        wall_time_ms=round((ended_ns - job.started_ns) / 1e6, 3),
        memory_peak_bytes=stats.memory_peak_bytes if stats else 0,
        pids_peak=stats.pids_peak if stats else 0,
        oom_killed=oom_killed,
        limit_hit=limit_hit,
        stdout=b"".join(job.stdout.chunks),
        stderr=b"".join(job.stderr.chunks),
        stdout_truncated=job.stdout.truncated,
        stderr_truncated=job.stderr.truncated,
        accounting_source=_accounting_source(stats),
        message=message,
    )


def _accounting_source(stats: CgroupStats | None) -> dict[str, str]:
    source = {"wall_time_ms": _WALL_CLOCK_SOURCE}
    if stats is not None:
        for field_name, figure in _RESULT_FIGURES.items():
            if figure in stats.source:
                source[field_name] = stats.source[figure]
    return source


def cpu_parallelism(cpus: float) -> int:
    """How many cores a job can burn at once: its bandwidth cap, at most the machine's."""
    return max(1, min(math.ceil(cpus), os.cpu_count() or 1))

