"""cgroup v2 driver (pure v2: /sys/fs/cgroup is cgroup2).

Layout, for a process whose cgroup (the `0::` line of /proc/self/cgroup) is X:

    X/                      controllers +cpu +memory +pids (+io) enabled in cgroup.subtree_control
    X/sandboxd-service/     where the processes of X go if X had to be emptied (see below)
    X/<base>/               same controllers enabled for the jobs
    X/<base>/job-<id>/      one job: memory.max, memory.swap.max=0, pids.max, cpu.max, io.max

"No internal processes": a cgroup other than the root cannot enable controllers for its
children while it holds processes (EBUSY). When writing X/cgroup.subtree_control fails with
EBUSY, every process of X (this service or CLI among them) is moved into the leaf
X/sandboxd-service first, as podman and crun do, and the write is retried. A driver started
later from inside X/sandboxd-service takes X as its own cgroup, so the layout does not nest
deeper on every start. In the root cgroup the rule does not apply and nothing is moved.

Delegation (rootless): the user must own X (the directory and its cgroup.procs,
cgroup.threads, cgroup.subtree_control), which systemd grants with Delegate= (user@.service
delegates only memory and pids by default; a drop-in with `Delegate=cpu cpuset io memory pids`
adds the rest), or `sandboxd setup --user NAME` grants by chown. A process can only be moved
between cgroups below a common ancestor whose cgroup.procs the writer may write, so the
service itself must run inside the delegated cgroup.

Figures (CgroupStats.source names the file each came from):
- cpu_time_ns, cpu_user_ns, cpu_sys_ns: usage_usec, user_usec, system_usec of cpu.stat (us * 1000).
- memory_peak_bytes: memory.peak (kernel >= 5.19; swap is off, so this is the whole peak);
  begin_accounting() restarts it at the current usage on kernels >= 6.12 (per-fd reset).
- oom_kills: `oom_kill` of memory.events.
- pids_peak: pids.peak (kernel >= 6.1).
A figure whose file this kernel lacks is -1, and source says "unavailable".
begin_accounting() (a warm cgroup handed to its job) takes the CPU and OOM counters as a
baseline that later figures are measured from; assign() rewrites the caps of a warm cgroup.

kill_all() writes cgroup.kill (kernel >= 5.14: the kernel kills every process of the job and
of its descendants, and forks racing with it fail); on older kernels it falls back to v1's
loop (pids.max = 0, then SIGKILL until cgroup.procs is empty).
"""

from __future__ import annotations

import errno
import os
import select

from sandboxd.limits import Limits
from sandboxd.runtime.cgroup import (
    SERVICE_LEAF,
    Backoff,
    CgroupDriver,
    CgroupError,
    CgroupMount,
    CgroupStats,
    JobCgroup,
    cgroup_dir,
    cgroup_mounts,
    check_base,
    check_job_id,
    flat_keyed,
    job_names,
    kill_cgroup_processes,
    own_cgroups,
    read_file,
    read_pids,
    rmdir_cgroup,
    write_file,
)

REQUIRED = ("cpu", "memory", "pids")
OPTIONAL = ("io",)
CPU_PERIOD_US = 100_000
DELEGATE_HINT = (
    "the cgroup is not fully delegated to this user: run the service as a systemd unit with "
    "Delegate=yes (for user@.service add a drop-in with `Delegate=cpu cpuset io memory pids`), "
    "or have root run `sandboxd setup --user NAME` and start the service inside the delegated cgroup"
)
_O_READ = os.O_RDONLY | os.O_CLOEXEC


def unified_mount(mount_point: str | None = None) -> CgroupMount:
    """The cgroup2 mount: `mount_point` if given, else /sys/fs/cgroup, else the first one."""
    mounts = [m for m in cgroup_mounts() if m.fstype == "cgroup2"]
    for mount in mounts:
        if mount.mount_point == (mount_point or "/sys/fs/cgroup"):
            return mount
    if mounts and mount_point is None:
        return mounts[0]
    raise CgroupError(f"no cgroup2 filesystem mounted at {mount_point or '/sys/fs/cgroup'}")


def own_unified_dir(mount_point: str | None = None) -> str:
    """This process's cgroup2 directory, with a service leaf (SERVICE_LEAF) taken as its parent."""
    own = own_cgroups()
    if "" not in own:
        raise CgroupError("/proc/self/cgroup has no cgroup2 (0::) line")
    path = cgroup_dir(unified_mount(mount_point), own[""])
    if os.path.basename(path) == SERVICE_LEAF:
        path = os.path.dirname(path)
    return path


def _controllers(path: str, file: str) -> set[str]:
    try:
        return set(read_file(os.path.join(path, file)).decode().split())
    except OSError as error:
        raise CgroupError(f"cannot read {path}/{file}: {error.strerror}") from None


def move_processes(source: str, leaf: str, timeout: float = 5.0) -> None:
    """Move every process of cgroup `source` into cgroup `leaf` (created if missing)."""
    try:
        os.mkdir(leaf, 0o755)
    except FileExistsError:
        pass
    except OSError as error:
        raise CgroupError(f"cannot create {leaf}: {error.strerror}; {DELEGATE_HINT}") from None
    try:
        target = os.open(leaf + "/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as error:
        raise CgroupError(f"cannot open {leaf}/cgroup.procs: {error.strerror}; {DELEGATE_HINT}") from None
    backoff = Backoff(timeout, f"moving the processes of {source} to {leaf}")
    try:
        while pids := read_pids(source + "/cgroup.procs"):
            for pid in pids:
                try:
                    os.write(target, b"%d" % pid)
                except ProcessLookupError:
                    pass  # exited meanwhile
                except OSError as error:
                    raise CgroupError(
                        f"cannot move process {pid} from {source} to {leaf}: {error.strerror}"
                        + (f"; {DELEGATE_HINT}" if error.errno in (errno.EACCES, errno.EPERM) else "")
                    ) from None
            if read_pids(source + "/cgroup.procs") & pids:
                backoff.wait()  # exiting processes are not migrated: wait for them to go
    finally:
        os.close(target)


def enable_controllers(path: str, controllers: list[str], leaf: str | None = None) -> None:
    """Enable `controllers` for the children of `path`. If `path` holds processes (EBUSY) and
    `leaf` is given, move them into `path/leaf` first."""
    missing = [c for c in controllers if c not in _controllers(path, "cgroup.subtree_control")]
    if not missing:
        return
    data = " ".join("+" + c for c in missing).encode()
    for attempt in (1, 2):
        try:
            fd = os.open(path + "/cgroup.subtree_control", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return
        except OSError as error:
            if error.errno == errno.EBUSY and leaf is not None and attempt == 1:
                move_processes(path, os.path.join(path, leaf))
                continue
            if error.errno in (errno.EACCES, errno.EPERM):
                raise CgroupError(
                    f"cannot enable {data.decode()} in {path}/cgroup.subtree_control "
                    f"({error.strerror}); {DELEGATE_HINT}"
                ) from None
            if error.errno == errno.EBUSY:
                raise CgroupError(
                    f"cannot enable {data.decode()} in {path}: it holds processes "
                    "(cgroup v2 allows processes only in leaves)"
                ) from None
            raise CgroupError(
                f"cannot enable {data.decode()} in {path}/cgroup.subtree_control: {error.strerror}"
            ) from None


def _ensure_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            raise CgroupError(
                f"{path} exists but uid {os.geteuid()} may not create cgroups in it; {DELEGATE_HINT}"
            ) from None
    except OSError as error:
        raise CgroupError(
            f"cannot create {path} ({error.strerror}) as uid {os.geteuid()}; {DELEGATE_HINT}"
        ) from None


class CgroupV2Driver(CgroupDriver):
    version = 2

    def __init__(
        self,
        base: str = "sandboxd",
        *,
        required: tuple[str, ...] = REQUIRED,
        mount_point: str | None = None,
    ) -> None:
        """`required` and `mount_point` exist for tests on hosts without a full v2 hierarchy;
        with fewer required controllers, the caps of absent controllers are not written."""
        parts = check_base(base)
        self.base = base
        self.own = own_unified_dir(mount_point)
        available = _controllers(self.own, "cgroup.controllers")
        missing = [c for c in required if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 controller(s) {', '.join(missing)} not available in {self.own} "
                f"(cgroup.controllers: {' '.join(sorted(available)) or 'none'}); {DELEGATE_HINT}"
            )
        wanted = [c for c in REQUIRED + OPTIONAL if c in available]
        enable_controllers(self.own, wanted, leaf=SERVICE_LEAF)
        path = self.own
        for part in parts:
            path = os.path.join(path, part)
            _ensure_dir(path)
            enable_controllers(path, wanted)
        self.parent = path
        self.controllers = frozenset(_controllers(path, "cgroup.subtree_control"))
        # What each job will have: files exist in the parent when the controller is enabled
        # for it, which it is for the jobs too (same set at every level).
        def has(name: str) -> bool:
            return os.path.exists(os.path.join(path, name))

        self._memory = "memory" in self.controllers
        self._swap = self._memory and has("memory.swap.max")
        self._memory_peak = self._memory and has("memory.peak")
        self._pids = "pids" in self.controllers
        self._pids_peak = self._pids and has("pids.peak")
        self._cpu = "cpu" in self.controllers
        self._io = "io" in self.controllers
        self._kill = has("cgroup.kill")
        self._live: set[str] = set()

    def create(self, job_id: str, limits: Limits) -> CgroupV2Job:
        name = check_job_id(job_id)
        path = self.parent + "/" + name
        try:
            os.mkdir(path)
        except FileExistsError:
            raise CgroupError(f"{path} already exists (job id reused?)") from None
        except OSError as error:
            raise CgroupError(f"cannot create {path}: {error.strerror}") from None
        try:
            self._write_caps(path, limits)
            if self._swap:
                write_file(path + "/memory.swap.max", b"0")
            stat_fd = os.open(path + "/cpu.stat", _O_READ)
        except BaseException:
            try:
                os.rmdir(path)
            except OSError:
                pass
            raise
        self._live.add(name)
        return CgroupV2Job(name, job_id, path, stat_fd, self, self._live)

    def _write_caps(self, path: str, limits: Limits) -> None:
        if self._memory:
            write_file(path + "/memory.max", b"%d" % limits.memory_bytes)
        if self._pids:
            write_file(path + "/pids.max", b"%d" % limits.pids)
        if self._cpu:
            quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
            write_file(path + "/cpu.max", b"%d %d" % (quota, CPU_PERIOD_US))
        if self._io:
            for device in self.io_devices:
                rate = limits.io_bytes_per_s
                write_file(path + "/io.max", f"{device} rbps={rate} wbps={rate}".encode())

    def adopt(self, job_id: str) -> CgroupV2Job:
        name = check_job_id(job_id)
        path = self.parent + "/" + name
        try:
            stat_fd = os.open(path + "/cpu.stat", _O_READ)
        except OSError as error:
            raise CgroupError(f"cannot open the cgroup of job {job_id}: {error.strerror}") from None
        self._live.add(name)
        return CgroupV2Job(name, job_id, path, stat_fd, self, self._live)

    def directories(self, job_id: str) -> tuple[str, ...]:
        return (self.parent + "/" + check_job_id(job_id),)

    def parent_dirs(self) -> tuple[str, ...]:
        return (self.parent,)

    def remove_stale(self) -> list[str]:
        names = job_names(self.parent) - self._live
        for name in sorted(names):
            CgroupV2Job(name, name[4:], self.parent + "/" + name, -1, self, set()).remove()
        return sorted(names)


class CgroupV2Job(JobCgroup):
    def __init__(
        self, name: str, job_id: str, path: str, stat_fd: int, driver: CgroupV2Driver, live: set[str]
    ) -> None:
        self.name = name
        self.job_id = job_id
        self.path = path
        self.dirs = {"unified": path}
        self._stat_fd = stat_fd
        self._driver = driver
        self._live = live
        self._removed = False
        # Counter values at begin_accounting(): usage, user, system (us), oom kills.
        self._base = (0, 0, 0, 0)
        self._peak_fd = -1  # memory.peak opened and reset by begin_accounting() (6.12+)
        self._peak_source = "memory.peak"

    def attach(self, pid: int) -> None:
        write_file(self.path + "/cgroup.procs", b"%d" % pid)


    def cpu_time_ns(self) -> int:
        head = os.pread(self._stat_fd, 64, 0)  # "usage_usec N\n..." comes first
        if head.startswith(b"usage_usec "):
            usage = int(head[11 : head.index(b"\n")])
        else:
            usage = flat_keyed(read_file(self.path + "/cpu.stat"))["usage_usec"]
        return (usage - self._base[0]) * 1000

    def assign(self, job_id: str, limits: Limits) -> None:
        check_job_id(job_id)
        self._driver._write_caps(self.path, limits)
        self.job_id = job_id

    def begin_accounting(self) -> None:
        d = self._driver
        try:
            cpu = flat_keyed(read_file(self.path + "/cpu.stat"))
            oom = flat_keyed(read_file(self.path + "/memory.events")) if d._memory else {}
        except OSError as error:
            raise CgroupError(f"cannot read the figures of {self.name}: {error}") from error
        self._base = (cpu["usage_usec"], cpu["user_usec"], cpu["system_usec"], oom.get("oom_kill", 0))
        if d._memory_peak:
            self._reset_peak()

    def _reset_peak(self) -> None:
        """Since 6.12 a write resets memory.peak to the current usage, for reads through the
        same file descriptor; older kernels refuse to open it for writing."""
        try:
            if self._peak_fd < 0:
                self._peak_fd = os.open(self.path + "/memory.peak", os.O_RDWR | os.O_CLOEXEC)
            os.write(self._peak_fd, b"reset")
            self._peak_source = "memory.peak"
        except OSError:
            if self._peak_fd >= 0:
                os.close(self._peak_fd)
                self._peak_fd = -1
            self._peak_source = "memory.peak (since the cgroup was created: no reset before 6.12)"

    def stats(self) -> CgroupStats:
        d = self._driver
        unavailable = "unavailable (not in this kernel or controller not enabled)"
        source = {
            "cpu_time_ns": "cpu.stat usage_usec",
            "cpu_user_ns": "cpu.stat user_usec",
            "cpu_sys_ns": "cpu.stat system_usec",
            "memory_peak_bytes": self._peak_source if d._memory_peak else unavailable,
            "oom_kills": "memory.events oom_kill" if d._memory else unavailable,
            "pids_peak": "pids.peak" if d._pids_peak else unavailable,
        }
        try:
            cpu = flat_keyed(read_file(self.path + "/cpu.stat"))
            oom = flat_keyed(read_file(self.path + "/memory.events")) if d._memory else {}
            if not d._memory_peak:
                peak = -1
            elif self._peak_fd >= 0:
                peak = int(os.pread(self._peak_fd, 32, 0))
            else:
                peak = int(read_file(self.path + "/memory.peak"))
            usage, user, system, ooms = self._base
            return CgroupStats(
                cpu_time_ns=(cpu["usage_usec"] - usage) * 1000,
                cpu_user_ns=(cpu["user_usec"] - user) * 1000,
                cpu_sys_ns=(cpu["system_usec"] - system) * 1000,
                memory_peak_bytes=peak,
                oom_kills=oom.get("oom_kill", 0) - ooms if d._memory else -1,
                pids_peak=int(read_file(self.path + "/pids.peak")) if d._pids_peak else -1,
                source=source,
            )
        except (OSError, KeyError, ValueError) as error:
            raise CgroupError(f"cannot read the figures of {self.name}: {error}") from error

    def kill_all(self) -> None:
        """SIGKILL everything (descendant cgroups included) and return once the job is empty."""
        if self._removed:
            return
        procs = self.path + "/cgroup.procs"
        if os.getpid() in read_pids(procs):
            raise CgroupError(f"refusing to kill {self.name}: this process ({os.getpid()}) is in it")
        if self._driver._kill:
            try:
                write_file(self.path + "/cgroup.kill", b"1")
            except CgroupError:
                if os.path.isdir(self.path):
                    raise
                return
            kill_cgroup_processes([procs], send=False)  # waits on pidfds for the exits
        else:
            if self._driver._pids:
                try:
                    write_file(self.path + "/pids.max", b"0")
                except CgroupError:
                    if os.path.isdir(self.path):
                        raise
            kill_cgroup_processes([procs])
        self._wait_unpopulated()

    def _wait_unpopulated(self, timeout: float = 10.0) -> None:
        """Until cgroup.events says `populated 0` (no process here or in descendants). The
        kernel notifies changes of that file (POLLPRI), at most every 10 ms; the poll timeout
        grows from 1 ms so a late notification costs little."""
        try:
            fd = os.open(self.path + "/cgroup.events", _O_READ)
        except FileNotFoundError:
            return
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            backoff = Backoff(timeout, f"waiting for {self.path} to empty")
            wait_ms = 0
            while b"populated 1" in os.pread(fd, 256, 0):
                if not backoff.remaining():
                    backoff.wait()  # raises
                poller.poll(wait_ms)
                wait_ms = min(max(1, wait_ms * 2), 10)
        finally:
            os.close(fd)

    def remove(self) -> None:
        if self._removed:
            return
        self.kill_all()
        rmdir_cgroup(self.path)
        self.close()

    def close(self) -> None:
        self._close_fds()
        self._live.discard(self.name)
        self._removed = True

    def _close_fds(self) -> None:
        for attribute in ("_stat_fd", "_peak_fd"):
            fd = getattr(self, attribute, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attribute, -1)

    def __del__(self) -> None:
        self._close_fds()


__all__ = [
    "CgroupV2Driver",
    "CgroupV2Job",
    "DELEGATE_HINT",
    "enable_controllers",
    "move_processes",
    "own_unified_dir",
    "unified_mount",
]
