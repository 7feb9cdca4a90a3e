"""One interface over cgroup v1 and v2: a fresh cgroup per job, its caps, its accounting.

Every cgroup we create nests under the cgroup this process already sits in, in a directory
named `sandboxd`, one `job-<id>` per job; the driver for the host's cgroup version is chosen
by detect_driver().
"""

from __future__ import annotations

import abc
import errno
import os
import re
import select
import signal
import time
from dataclasses import dataclass

from sandboxd.limits import Limits


class CgroupError(RuntimeError):
    """cgroups are missing, not delegated to us, or refused an operation."""


@dataclass(frozen=True)
class CgroupStats:
    cpu_time_ns: int
    cpu_user_ns: int
    cpu_sys_ns: int
    memory_peak_bytes: int
    oom_kills: int
    pids_peak: int
    # figure name -> kernel file it came from, e.g. {"memory_peak_bytes": "memory.max_usage_in_bytes"}
    source: dict[str, str]


class JobCgroup(abc.ABC):
    """A job's cgroup (one directory per controller on v1, one directory on v2)."""

    name: str  # "job-<id>"
    job_id: str  # the job it serves: create()'s id, or assign()'s

    @abc.abstractmethod
    def attach(self, pid: int) -> None:
        """Move a process (by host pid; 0 is the caller) into the job's cgroup in every
        controller."""

    @abc.abstractmethod
    def cpu_time_ns(self) -> int:
        """Total CPU time so far; cheap enough to poll often."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """Every accounting figure, read once when the job has ended."""

    @abc.abstractmethod
    def assign(self, job_id: str, limits: Limits) -> None:
        """Hand a prepared (warm) job cgroup to job `job_id`: apply its caps, raising or
        lowering them; recorded in `job_id`. The directory keeps its name (cgroup v2 cannot
        rename a cgroup)."""

    @abc.abstractmethod
    def begin_accounting(self) -> None:
        """Count from now (set-up is not billed): CPU times and OOM kills start at 0, the
        memory peak restarts at the current usage where the kernel can reset it (v1 always,
        v2 from 6.12; the figure's source says which); pids_peak keeps what set-up reached."""

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (v2: cgroup.kill)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Kill what is left, wait until empty, remove the directories. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release open files without removing anything (removal is someone else's now)."""


def block_devices(paths: list[str]) -> tuple[str, ...]:
    """The whole disks ("MAJ:MIN") holding these paths, where I/O can be throttled: the
    kernel throttles per disk, not per partition; tmpfs, overlay and other devices without
    a block device are left out."""
    disks: dict[str, None] = {}
    for path in paths:
        try:
            device = os.stat(path).st_dev
        except OSError:
            continue
        sysfs = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
        if not os.path.isdir(sysfs):
            continue
        if os.path.exists(sysfs + "/partition"):
            sysfs = os.path.realpath(sysfs + "/..")
        try:
            with open(sysfs + "/dev") as file:
                disks[file.read().strip()] = None
        except OSError:
            continue
    return tuple(disks)


class CgroupDriver(abc.ABC):
    version: int
    # The disks whose I/O a job's `io_rate` limits (see block_devices); none: not limited.
    io_devices: tuple[str, ...] = ()

    @abc.abstractmethod
    def create(self, job_id: str, limits: Limits) -> JobCgroup:
        """Create `job-<job_id>` with CPU bandwidth, memory (swap included) and pids caps."""

    @abc.abstractmethod
    def adopt(self, job_id: str) -> JobCgroup:
        """The JobCgroup of `job-<job_id>`, created by another process (a container
        creates its own cgroup, off the launcher's path); it must exist."""

    @abc.abstractmethod
    def directories(self, job_id: str) -> tuple[str, ...]:
        """The directories of `job-<job_id>`, in the order they are to be removed."""

    @abc.abstractmethod
    def remove_stale(self) -> list[str]:
        """Remove job cgroups left by a process that died (e.g. after SIGKILL); returns names."""

    @abc.abstractmethod
    def parent_dirs(self) -> tuple[str, ...]:
        """The directories job cgroups are created in."""

    def release(self) -> None:
        """Remove the job parent directories when the base is this driver's own (more than
        one component, as a service's `sandboxd/service-ID`) and they are empty."""
        if len(check_base(self.base)) < 2:
            return  # `sandboxd` itself is shared (and may be delegated by root)
        for path in self.parent_dirs():
            try:
                os.rmdir(path)
            except OSError:
                pass  # not empty: a job is still being removed, or another user shares it


# --- locating cgroups: shared by both drivers, detect_driver() and `sandboxd setup` ---------

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# A process a v2 driver moved out of its cgroup X (so that X may enable controllers) sits in
# X/SERVICE_LEAF; a driver started there treats X as its own cgroup, not the leaf.
SERVICE_LEAF = "sandboxd-service"


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup (v1) or cgroup2 mount from /proc/self/mountinfo."""

    root: str  # the cgroup the mount shows at mount_point, relative to the hierarchy
    mount_point: str
    fstype: str  # "cgroup" or "cgroup2"
    options: frozenset[str]  # super options: the v1 controllers ("cpu", "cpuacct", ...) and flags


def _unescape(text: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[CgroupMount]:
    mounts = []
    with open(mountinfo) as file:
        for line in file:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            mounts.append(
                CgroupMount(
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    fstype=tail[0],
                    options=frozenset(tail[2].split(",")),
                )
            )
    return mounts


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> this process's cgroup path; the cgroup2 (unified) entry has the key ""."""
    paths: dict[str, str] = {}
    with open(proc_cgroup) as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def cgroup_dir(mount: CgroupMount, path: str) -> str:
    """The directory of cgroup `path` (as /proc/PID/cgroup shows it) under `mount`."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        raise CgroupError(
            f"cgroup {path} is not visible under {mount.mount_point} (which shows {mount.root}); "
            "mount the cgroup filesystem of this namespace, or use a cgroup namespace"
        )
    return mount.mount_point.rstrip("/") + path[len(root):].rstrip("/")


def is_pure_v2(mounts: list[CgroupMount] | None = None) -> bool:
    """/sys/fs/cgroup itself is a cgroup2 mount (no v1 hierarchies, no hybrid layout)."""
    return any(
        m.mount_point == "/sys/fs/cgroup" and m.fstype == "cgroup2"
        for m in (cgroup_mounts() if mounts is None else mounts)
    )


def check_base(base: str) -> list[str]:
    """`base` is a relative path under the own cgroup ("sandboxd", or "sandboxd/test-1")."""
    parts = base.split("/")
    if not base or any(p in ("", ".", "..") for p in parts) or base.startswith("/"):
        raise CgroupError(f"bad cgroup base {base!r}: a relative path such as 'sandboxd'")
    return parts


def detect_driver(base: str = "sandboxd") -> CgroupDriver:
    """The driver for this host: v2 when /sys/fs/cgroup is cgroup2 (pure v2), else v1.

    Job cgroups go to `<own cgroup>/<base>/job-<id>`. Raises CgroupError, naming the fix,
    when controllers are missing or not delegated to this user.
    """
    mounts = cgroup_mounts()
    if is_pure_v2(mounts):
        from sandboxd.runtime.cgroup_v2 import CgroupV2Driver

        return CgroupV2Driver(base)
    if not any(m.fstype == "cgroup" for m in mounts):
        raise CgroupError(
            "no cgroup filesystem is mounted at /sys/fs/cgroup (neither cgroup2 nor v1 hierarchies)"
        )
    from sandboxd.runtime.cgroup_v1 import CgroupV1Driver

    return CgroupV1Driver(base)


# --- file and process helpers for the drivers ------------------------------------------------

_O_WRITE = os.O_WRONLY | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_CLOEXEC


def write_file(path: str, data: bytes) -> None:
    """One open + one write(2), as the kernel wants for cgroup control files."""
    try:
        fd = os.open(path, _O_WRITE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as error:
        raise CgroupError(f"cannot write {data.decode()!r} to {path}: {error.strerror}") from error


def read_file(path: str) -> bytes:
    fd = os.open(path, _O_READ)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_pids(procs_file: str) -> set[int]:
    """The pids a cgroup.procs file lists (empty when the cgroup is gone)."""
    try:
        return {int(line) for line in read_file(procs_file).split()}
    except FileNotFoundError:
        return set()


def flat_keyed(data: bytes) -> dict[str, int]:
    """Parse `key value` lines (cpu.stat, memory.events, memory.oom_control)."""
    figures = {}
    for line in data.split(b"\n"):
        key, _, value = line.partition(b" ")
        if value:
            figures[key.decode()] = int(value)
    return figures


class Backoff:
    """Waiting for kernel state (exiting tasks, an offlining cgroup): yield first, then sleep
    50 us doubling up to 5 ms, and give up with CgroupError after `timeout` seconds."""

    def __init__(self, timeout: float, what: str) -> None:
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._what = what
        self._delay = 0.0

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def wait(self) -> None:
        if time.monotonic() >= self._deadline:
            raise CgroupError(f"{self._what}: not done after {self._timeout:g} s")
        if self._delay == 0.0:
            os.sched_yield()
            self._delay = 50e-6
        else:
            time.sleep(self._delay)
            self._delay = min(self._delay * 2, 0.005)


def kill_cgroup_processes(procs_files: list[str], timeout: float = 10.0, send: bool = True) -> None:
    """SIGKILL every process listed in `procs_files` until they are all empty (with
    send=False only wait for that: v2's cgroup.kill has sent the signals).

    No freezer (v1's is not delegated to rootless users), so this loops: processes may fork
    between the read and the kill (callers first set pids.max to 0 so that they cannot).
    Signals go through pidfds, re-checked against the cgroup after opening, so a recycled pid
    of an unrelated process is never hit; waiting for the exit is a poll(2) on those pidfds.
    """
    me = os.getpid()
    backoff = Backoff(timeout, f"killing the processes of {os.path.dirname(procs_files[0])}")
    while True:
        pids: set[int] = set()
        for procs_file in procs_files:
            pids |= read_pids(procs_file)
        if not pids:
            return
        if me in pids:
            raise CgroupError(f"refusing to kill this process ({me}): it sits in a job cgroup")
        pidfds = _open_pidfds(pids)
        if pidfds is None:  # no pidfd_open (kernel < 5.3): plain kill(2) and back off
            for pid in pids if send else ():
                _signal(lambda: os.kill(pid, signal.SIGKILL), pid)
            backoff.wait()
            continue
        try:
            listed: set[int] = set()
            for procs_file in procs_files:
                listed |= read_pids(procs_file)
            poller = select.poll()
            signalled = 0
            for pid, pidfd in pidfds.items():
                if pid in listed:
                    if send:
                        _signal(lambda: signal.pidfd_send_signal(pidfd, signal.SIGKILL), pid)
                    poller.register(pidfd, select.POLLIN)
                    signalled += 1
            if signalled:
                # Readable once a process has exited, which is after it left its cgroups.
                poller.poll(max(1, int(backoff.remaining() * 1000)))
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)
        if not signalled or not backoff.remaining():
            backoff.wait()  # raises when the time is up


def _open_pidfds(pids: set[int]) -> dict[int, int] | None:
    pidfds = {}
    for pid in pids:
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: seccomp'd pidfd_open
                for pidfd in pidfds.values():
                    os.close(pidfd)
                raise
            for pidfd in pidfds.values():
                os.close(pidfd)
            return None
    return pidfds


def _signal(send, pid: int) -> None:
    try:
        send()
    except ProcessLookupError:
        pass
    except PermissionError:
        raise CgroupError(
            f"not allowed to kill process {pid} of a job cgroup (it runs under another uid; "
            "on cgroup v1 without root the job must run under this user's uid)"
        ) from None


def rmdir_cgroup(path: str, timeout: float = 5.0) -> bool:
    """rmdir a cgroup whose processes are gone; removes child cgroups first (killing what is in
    them) and retries EBUSY briefly. False when it did not exist."""
    backoff = Backoff(timeout, f"removing {path}")
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove {path}: {error.strerror}") from error
        try:
            children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return False
        for child in children:
            kill_cgroup_processes([child + "/cgroup.procs"], timeout=backoff.remaining() or 0.1)
            rmdir_cgroup(child, timeout=backoff.remaining() or 0.1)
        if not children:
            backoff.wait()


def job_names(directory: str) -> set[str]:
    """The `job-*` cgroups directly below `directory` (none if it does not exist)."""
    try:
        with os.scandir(directory) as entries:
            return {e.name for e in entries if e.name.startswith("job-") and e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise CgroupError(f"bad job id {job_id!r}: 1-128 of [A-Za-z0-9_.-], not starting with '.'")
    return "job-" + job_id


_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
