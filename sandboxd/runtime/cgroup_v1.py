"""cgroup v1 driver: one directory per controller (cpu, cpuacct, memory, pids, blkio).

Layout: for each controller, `<own cgroup>/<base>/job-<id>`, where <own cgroup> is what
/proc/self/cgroup shows for that controller and the hierarchy's mount point comes from
/proc/self/mountinfo. Co-mounted hierarchies (`cpu,cpuacct` on most systemd hosts) share one
directory, which is created, filled and removed once.

Rootless: `sandboxd setup --user NAME` (run as root) creates `<own>/<base>` in each hierarchy
and chowns it (plus its `tasks` and `cgroup.procs`) to the user; job directories the user
creates inside are then the user's, and so are the limit files in them (cgroupfs gives the
files of a new cgroup to the creator). The driver accepts such a directory as it is.

Caps written per job: memory.limit_in_bytes and memory.memsw.limit_in_bytes (same value: no
swap beyond the limit; memsw only when the kernel accounts swap), pids.max,
cpu.cfs_period_us = 100000 and cpu.cfs_quota_us = cpus * period, and blkio.throttle.read_bps_device
and write_bps_device for the image's disks (v1 throttles reads and direct writes; buffered
writeback is not charged to the job).

Figures (CgroupStats.source names the file each came from):
- cpu_time_ns, cpu_user_ns, cpu_sys_ns: cpuacct.usage, cpuacct.usage_user, cpuacct.usage_sys.
  usage is exact (scheduler clock); the user/sys split is tick based, so user + sys need not
  add up to usage exactly.
- memory_peak_bytes: memory.memsw.max_usage_in_bytes (peak of resident + swap, the figure the
  memsw limit bounds) when swap is accounted, else memory.max_usage_in_bytes (resident only).
- oom_kills: `oom_kill` of memory.oom_control (kernel >= 4.13).
- pids_peak: pids.peak; kernels without that file report -1 ("unavailable" in source).
begin_accounting() (a warm cgroup handed to its job) takes the CPU and OOM counters as a
baseline that later figures are measured from, and writes 0 to the max_usage files, which
restarts the peak at the current usage. assign() rewrites the caps of a warm cgroup.

kill_all(): no freezer (v1's is not delegated to rootless users), so pids.max drops to 0
first (no new processes), then SIGKILL through pidfds until every cgroup.procs is empty.
"""

from __future__ import annotations

import errno
import os
import pwd

from sandboxd.limits import Limits
from sandboxd.runtime.cgroup import (
    CgroupDriver,
    CgroupError,
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
    rmdir_cgroup,
    write_file,
)

CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")
CFS_PERIOD_US = 100_000
_SETUP_HINT = "run `sandboxd setup --user NAME` as root once to delegate it"
_O_READ = os.O_RDONLY | os.O_CLOEXEC


def controller_dirs(controllers: tuple[str, ...] = CONTROLLERS) -> dict[str, str]:
    """controller -> the directory of this process's own cgroup in that controller's hierarchy."""
    own = own_cgroups()
    mounts = [m for m in cgroup_mounts() if m.fstype == "cgroup"]
    dirs = {}
    for controller in controllers:
        candidates = [m for m in mounts if controller in m.options]
        if not candidates:
            raise CgroupError(
                f"the cgroup v1 {controller} controller is not mounted "
                f"(needed: {', '.join(controllers)}; see /proc/self/mountinfo)"
            )
        if controller not in own:
            raise CgroupError(f"/proc/self/cgroup has no line for the {controller} controller")
        path = own[controller]
        # Prefer a mount that shows our own cgroup (bind mounts of sub-trees exist in containers).
        error: CgroupError | None = None
        for mount in candidates:
            try:
                dirs[controller] = cgroup_dir(mount, path)
                break
            except CgroupError as problem:
                error = problem
        else:
            assert error is not None
            raise error
    return dirs


def _ensure_dir(path: str) -> None:
    """Create a parent directory, or accept an existing one we may create cgroups in."""
    try:
        os.mkdir(path, 0o755)
        return
    except FileExistsError:
        pass
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CgroupError(
                f"cannot create {path} ({error.strerror}) as uid {os.geteuid()}; {_SETUP_HINT}"
            ) from None
        raise CgroupError(f"cannot create {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise CgroupError(
            f"{path} exists but uid {os.geteuid()} may not create cgroups in it "
            f"(owner uid {os.stat(path).st_uid}); {_SETUP_HINT}"
        )


def set_memory_limit(memory_dir: str, value: int, memsw: bool, lowering: bool | None = None) -> None:
    """Cap memory and memory+swap at `value` (no swap beyond the cap). The kernel refuses a
    memsw limit below the memory limit, so lowering writes memory.limit_in_bytes first and
    raising writes memory.memsw.limit_in_bytes first; `lowering` None reads the current cap."""
    files = ["memory.limit_in_bytes"] + (["memory.memsw.limit_in_bytes"] if memsw else [])
    if lowering is None:
        lowering = value <= int(read_file(memory_dir + "/memory.limit_in_bytes"))
    if not lowering:
        files.reverse()
    for name in files:
        write_file(memory_dir + "/" + name, b"%d" % value)


def _write_caps(dirs: dict[str, str], limits: Limits, memsw: bool, lowering: bool | None,
                io_devices: tuple[str, ...]) -> None:
    set_memory_limit(dirs["memory"], limits.memory_bytes, memsw, lowering)
    for device in io_devices:
        for direction in ("read", "write"):
            write_file(f"{dirs['blkio']}/blkio.throttle.{direction}_bps_device",
                       f"{device} {limits.io_bytes_per_s}".encode())
    write_file(dirs["pids"] + "/pids.max", b"%d" % limits.pids)
    write_file(dirs["cpu"] + "/cpu.cfs_period_us", b"%d" % CFS_PERIOD_US)
    quota = max(1000, round(limits.cpus * CFS_PERIOD_US))
    write_file(dirs["cpu"] + "/cpu.cfs_quota_us", b"%d" % quota)


def user_subdirectory() -> list[str]:
    """v1 cannot move an unprivileged user's processes into a delegated cgroup, so each user
    gets `sandboxd/user-<name>` (created by `sandboxd setup --user`) beside root's jobs in
    `sandboxd`: several users, and root, share a host without taking each other's directory."""
    if os.geteuid() == 0:
        return []
    return [f"user-{pwd.getpwuid(os.geteuid()).pw_name}"]


class CgroupV1Driver(CgroupDriver):
    version = 1

    def __init__(self, base: str = "sandboxd") -> None:
        parts = check_base(base)
        parts[1:1] = user_subdirectory()  # `sandboxd/user-NAME/...`: what setup delegates
        own = controller_dirs()
        paths = own_cgroups()
        self.base = base
        # The anchor: the hierarchy where this process's own cgroup is the most specific
        # (memory on this kind of host: `/process_api/<id>` while cpu and pids are `/`), so
        # the one least likely shared with another service. Its job directory is created
        # first and removed last, and remove_stale() only takes jobs found there: jobs of
        # another service that shares the cpu or pids parent are not ours to kill.
        order = sorted(own, key=lambda c: (-paths[c].rstrip("/").count("/"), c != "memory"))
        # controller -> `<own>/<base>`; co-mounted controllers map to the same directory.
        self.parents: dict[str, str] = {c: os.path.join(own[c], *parts) for c in order}
        self._unique = list(dict.fromkeys(self.parents.values()))
        self.anchor = self._unique[0]
        for controller_own in dict.fromkeys(own.values()):
            path = controller_own
            for index, part in enumerate(parts):
                path = os.path.join(path, part)
                if index < len(parts) - 1 and os.path.isdir(path):
                    continue  # a parent need not be ours, only the directory we create in
                _ensure_dir(path)
        memory = self.parents["memory"]
        self._memsw = os.path.exists(memory + "/memory.memsw.limit_in_bytes")
        self._pids_peak = os.path.exists(self.parents["pids"] + "/pids.peak")
        self._live: set[str] = set()  # job names this driver created and has not removed

    def create(self, job_id: str, limits: Limits) -> CgroupV1Job:
        name = check_job_id(job_id)
        dirs = {c: p + "/" + name for c, p in self.parents.items()}
        made: list[str] = []
        try:
            for parent in self._unique:
                path = parent + "/" + name
                try:
                    os.mkdir(path)
                except FileExistsError:
                    raise CgroupError(f"{path} already exists (job id reused?)") from None
                except OSError as error:
                    hint = f"; {_SETUP_HINT}" if error.errno in (errno.EACCES, errno.EPERM) else ""
                    raise CgroupError(f"cannot create {path}: {error.strerror}{hint}") from None
                made.append(path)
            # A new cgroup starts unlimited: setting the memory cap lowers it.
            _write_caps(dirs, limits, self._memsw, lowering=True, io_devices=self.io_devices)
            usage_fd = os.open(dirs["cpuacct"] + "/cpuacct.usage", _O_READ)
        except BaseException:
            for path in reversed(made):
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            raise
        self._live.add(name)
        return CgroupV1Job(name, job_id, dirs, usage_fd, self._memsw, self._pids_peak, self._live,
                           self.io_devices)

    def adopt(self, job_id: str) -> CgroupV1Job:
        name = check_job_id(job_id)
        dirs = {c: p + "/" + name for c, p in self.parents.items()}
        try:
            usage_fd = os.open(dirs["cpuacct"] + "/cpuacct.usage", _O_READ)
        except OSError as error:
            raise CgroupError(f"cannot open the cgroup of job {job_id}: {error.strerror}") from None
        self._live.add(name)
        return CgroupV1Job(name, job_id, dirs, usage_fd, self._memsw, self._pids_peak, self._live,
                           self.io_devices)

    def directories(self, job_id: str) -> tuple[str, ...]:
        name = check_job_id(job_id)
        return tuple(parent + "/" + name for parent in reversed(self._unique))  # the anchor last

    def parent_dirs(self) -> tuple[str, ...]:
        return tuple(self._unique)

    def remove_stale(self) -> list[str]:
        """Jobs in the anchor hierarchy that this driver did not create (see __init__)."""
        names = job_names(self.anchor) - self._live
        for name in sorted(names):
            dirs = {c: p + "/" + name for c, p in self.parents.items()}
            CgroupV1Job(name, name[4:], dirs, -1, self._memsw, self._pids_peak, set()).remove()
        return sorted(names)


class CgroupV1Job(JobCgroup):
    def __init__(
        self,
        name: str,
        job_id: str,
        dirs: dict[str, str],
        usage_fd: int,
        memsw: bool,
        pids_peak: bool,
        live: set[str],
        io_devices: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.job_id = job_id
        self.dirs = dirs  # controller -> directory
        self._unique = list(dict.fromkeys(dirs.values()))
        self._procs = [d + "/cgroup.procs" for d in self._unique]
        self._usage_fd = usage_fd
        self._memsw = memsw
        self._pids_peak = pids_peak
        self._live = live
        self._io_devices = io_devices
        self._removed = False
        # Counter values at begin_accounting(): cpu, user, sys (ns), oom kills.
        self._base = (0, 0, 0, 0)

    def attach(self, pid: int) -> None:
        data = b"%d" % pid
        for procs in self._procs:
            write_file(procs, data)


    def cpu_time_ns(self) -> int:
        return int(os.pread(self._usage_fd, 32, 0)) - self._base[0]

    def assign(self, job_id: str, limits: Limits) -> None:
        check_job_id(job_id)
        _write_caps(self.dirs, limits, self._memsw, lowering=None, io_devices=self._io_devices)
        self.job_id = job_id

    def begin_accounting(self) -> None:
        cpuacct, memory = self.dirs["cpuacct"], self.dirs["memory"]
        try:
            self._base = (
                int(os.pread(self._usage_fd, 32, 0)),
                int(read_file(cpuacct + "/cpuacct.usage_user")),
                int(read_file(cpuacct + "/cpuacct.usage_sys")),
                flat_keyed(read_file(memory + "/memory.oom_control")).get("oom_kill", 0),
            )
        except OSError as error:
            raise CgroupError(f"cannot read the figures of {self.name}: {error}") from error
        # Writing 0 restarts a max_usage figure at the current usage.
        write_file(memory + "/memory.max_usage_in_bytes", b"0")
        if self._memsw:
            write_file(memory + "/memory.memsw.max_usage_in_bytes", b"0")

    def stats(self) -> CgroupStats:
        cpuacct, memory, pids = self.dirs["cpuacct"], self.dirs["memory"], self.dirs["pids"]
        source = {
            "cpu_time_ns": "cpuacct.usage",
            "cpu_user_ns": "cpuacct.usage_user",
            "cpu_sys_ns": "cpuacct.usage_sys",
            "memory_peak_bytes": "memory.memsw.max_usage_in_bytes"
            if self._memsw
            else "memory.max_usage_in_bytes",
            "oom_kills": "memory.oom_control",
            "pids_peak": "pids.peak" if self._pids_peak else "unavailable (no pids.peak in this kernel)",
        }
        try:
            oom = flat_keyed(read_file(memory + "/memory.oom_control"))
            cpu, user, sys, ooms = self._base
            return CgroupStats(
                cpu_time_ns=int(read_file(cpuacct + "/cpuacct.usage")) - cpu,
                cpu_user_ns=int(read_file(cpuacct + "/cpuacct.usage_user")) - user,
                cpu_sys_ns=int(read_file(cpuacct + "/cpuacct.usage_sys")) - sys,
                memory_peak_bytes=int(read_file(memory + "/" + source["memory_peak_bytes"])),
                oom_kills=oom.get("oom_kill", 0) - ooms,
                pids_peak=int(read_file(pids + "/pids.peak")) if self._pids_peak else -1,
                source=source,
            )
        except OSError as error:
            raise CgroupError(f"cannot read the figures of {self.name}: {error}") from error

    def kill_all(self) -> None:
        """SIGKILL everything and return once the cgroup is empty; pids.max becomes 0 first,
        so the cgroup takes no new processes afterwards."""
        if self._removed:
            return
        # No new processes from here on: a job forking in a loop cannot outrun the kill loop.
        try:
            write_file(self.dirs["pids"] + "/pids.max", b"0")
        except CgroupError:
            if os.path.isdir(self.dirs["pids"]):
                raise
        kill_cgroup_processes(self._procs)

    def remove(self) -> None:
        if self._removed:
            return
        self.kill_all()  # returns once every cgroup.procs is empty
        for path in reversed(self._unique):  # the anchor last: see CgroupV1Driver
            rmdir_cgroup(path)
        self.close()

    def close(self) -> None:
        if self._usage_fd >= 0:
            os.close(self._usage_fd)
            self._usage_fd = -1
        self._live.discard(self.name)
        self._removed = True

    def __del__(self) -> None:
        if getattr(self, "_usage_fd", -1) >= 0:
            os.close(self._usage_fd)


__all__ = ["CONTROLLERS", "CgroupV1Driver", "CgroupV1Job", "controller_dirs", "set_memory_limit"]
