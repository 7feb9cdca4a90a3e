"""What a job is (its spec) and what it came to (its result): the runtime's contract."""

from __future__ import annotations

import base64
import dataclasses
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from sandboxd.limits import Limits

WORKDIR = "/work"
DEFAULT_HOSTNAME = "sandbox"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

STATUSES = (
    "ok",
    "runtime_error",
    "signaled",
    "time_limit_exceeded",
    "memory_limit_exceeded",
    "output_limit_exceeded",
    "internal_error",
)
LIMITS_HIT = ("cpu_time", "wall_time", "memory", "output")


class SpecError(ValueError):
    """A job spec is invalid; the message says which part and why."""


def new_job_id() -> str:
    import uuid  # imported on use: the zygote, which never calls this, stays small

    return uuid.uuid4().hex


def normalize_workdir_path(dest: str) -> str:
    """A copied-in file's destination, as a path relative to the work directory.

    Absolute paths are accepted only inside the work directory; `..`, NUL and empty
    components are refused rather than normalised away, so what a user asked for is
    exactly what lands.
    """
    if not dest or "\x00" in dest:
        raise SpecError(f"file destination {dest!r} is empty or contains NUL")
    relative = dest
    if dest.startswith("/"):
        if not (dest + "/").startswith(WORKDIR + "/") or dest == WORKDIR:
            raise SpecError(f"file destination {dest!r} is outside the work directory {WORKDIR}")
        relative = dest[len(WORKDIR) + 1 :]
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise SpecError(f"file destination {dest!r} has an empty, '.' or '..' component")
    if len(relative.encode()) > 1024 or any(len(part.encode()) > 255 for part in parts):
        raise SpecError(f"file destination {dest!r} is too long")
    return posixpath.join(*parts)


@dataclass(frozen=True)
class InputFile:
    path: str  # relative to WORKDIR, already normalised
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class StdioPipe:
    """Two jobs talking through pipes (an interactive problem's solution and interactor):
    each one's stdout is the other's stdin. The jobs of one `group` are sides 0 and 1; the
    runtime makes the pipes when the first side starts, and their output is not captured
    (it is the conversation), only their stderr."""

    group: str
    side: int

    def __post_init__(self) -> None:
        if not JOB_ID_RE.match(self.group) or self.side not in (0, 1):
            raise SpecError(f"a pipe group needs an id matching {JOB_ID_RE.pattern} and a side 0 or 1")


@dataclass(frozen=True)
class JobSpec:
    argv: tuple[str, ...]
    limits: Limits
    image: str = "host"
    env: tuple[tuple[str, str], ...] = ()
    stdin: bytes | None = None
    files: tuple[InputFile, ...] = ()
    job_id: str = field(default_factory=new_job_id)
    hostname: str = DEFAULT_HOSTNAME
    seccomp_policy: str = "default"
    # Image builds only (no API or CLI job sets these): the step's working directory, a host
    # directory that keeps the container's writable layer after it ends, and the host's
    # network (a container of its own user namespace, without capabilities over it).
    workdir: str = WORKDIR
    upper_dir: str | None = None
    network: bool = False
    # Judging only: connected to another job by pipes instead of stdin and captured stdout.
    stdio_pipe: StdioPipe | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(arg, str) for arg in self.argv):
            raise SpecError("a job needs a command: a non-empty list of strings")
        if any("\x00" in arg for arg in self.argv):
            raise SpecError("command arguments must not contain NUL")
        if not JOB_ID_RE.match(self.job_id):
            raise SpecError(f"job id {self.job_id!r} must match {JOB_ID_RE.pattern}")
        for key, value in self.env:
            if not ENV_KEY_RE.match(key) or "\x00" in value:
                raise SpecError(f"environment variable {key!r} has an invalid name or value")
        for path in (self.workdir, self.upper_dir):
            if path is not None and (not path.startswith("/") or "\x00" in path):
                raise SpecError(f"{path!r} must be an absolute path")


@dataclass(frozen=True)
class Result:
    status: str
    exit_code: int | None
    signal: int | None
    cpu_time_ms: float
    cpu_user_ms: float
    cpu_sys_ms: float
    wall_time_ms: float
    memory_peak_bytes: int
    pids_peak: int
    oom_killed: bool
    limit_hit: str | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    accounting_source: dict[str, str]
    message: str | None = None

    @property
    def shell_exit_status(self) -> int:
        """The exit status a shell would report: the code, or 128 + signal."""
        if self.signal is not None:
            return 128 + self.signal
        if self.exit_code is not None:
            return self.exit_code
        return 125

    def to_json_dict(self, include_base64: bool = False) -> dict[str, Any]:
        # Shallow: asdict() would deep-copy every value, on the path of every answer.
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["accounting_source"] = dict(self.accounting_source)
        data["stdout"] = self.stdout.decode("utf-8", errors="replace")
        data["stderr"] = self.stderr.decode("utf-8", errors="replace")
        if include_base64:
            data["stdout_base64"] = base64.b64encode(self.stdout).decode()
            data["stderr_base64"] = base64.b64encode(self.stderr).decode()
        return data


def internal_error_result(message: str) -> Result:
    """The Result of a job that could not run (or whose end was lost): nothing measured."""
    return Result(status="internal_error", exit_code=None, signal=None, cpu_time_ms=0.0, cpu_user_ms=0.0,
                  cpu_sys_ms=0.0, wall_time_ms=0.0, memory_peak_bytes=0, pids_peak=0, oom_killed=False,
                  limit_hit=None, stdout=b"", stderr=b"", stdout_truncated=False, stderr_truncated=False,
                  accounting_source={}, message=message)


def decide_status(
    *,
    exit_code: int | None,
    signal: int | None,
    killed_for: str | None,
    oom_killed: bool,
    internal_error: bool,
) -> tuple[str, str | None]:
    """(status, limit_hit) from how the job ended. A limit we enforced outranks the exit
    it caused, so a job killed for CPU time is a time limit, not a SIGKILL."""
    if internal_error:
        return "internal_error", None
    if killed_for in ("cpu_time", "wall_time"):
        return "time_limit_exceeded", killed_for
    if oom_killed:
        return "memory_limit_exceeded", "memory"
    if killed_for == "output":
        return "output_limit_exceeded", "output"
    if signal is not None:
        return "signaled", None
    if exit_code:
        return "runtime_error", None
    return "ok", None
