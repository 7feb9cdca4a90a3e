"""The runtime's Python API: turn a JobSpec into a running container and, in the end, a Result.

`Runtime` must live in a single-threaded process (it clones with fork semantics): the CLI
uses it directly, the service through the launcher process.

Launch speed: a container can be prepared before its job exists (cloned, id-mapped, placed in
a cgroup, its filesystem built), so starting a job only sends the order. With
`warm_containers=N` the runtime keeps N prepared containers of the default image and refills
the pool while jobs run. Accounting starts when the order is sent: set-up CPU is not billed.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sandboxd.images import Image, resolve_image
from sandboxd.job import DEFAULT_HOSTNAME, WORKDIR, JobSpec, Result, new_job_id
from sandboxd.limits import Limits, default_limit_policy
from sandboxd.runtime import libc
from sandboxd.runtime.cgroup import CgroupDriver, CgroupError, JobCgroup, block_devices, detect_driver
from sandboxd.runtime.container import (
    CLONE_FLAGS,
    ChildFds,
    READY,
    ContainerPlan,
    JobOrder,
    container_main,
    send_order,
)
from sandboxd.runtime.mnt import RootfsPlan
from sandboxd.runtime.janitor import Janitor
from sandboxd.runtime.net import loopback_up_request
from sandboxd.runtime.seccomp import compiled_filter
from sandboxd.runtime.supervisor import RunningJob, Supervisor, OutputStream, cpu_parallelism
from sandboxd.runtime.user import choose_id_mapping, write_id_maps
from sandboxd.state import default_state_dir

SHM_MAX_BYTES = 64 << 20
IMAGE_RECHECK_S = 1.0
DEFAULT_IMAGE = "host"


@dataclass
class _Container:
    """A cloned container preparing itself, or prepared and waiting for its job's order."""

    pid: int
    pidfd: int
    control: socket.socket
    report_fd: int
    job_id: str  # names its cgroup, which the container creates itself
    limits: Limits  # the caps its cgroup was created with


def _stdin_fd(data: bytes | None) -> int:
    if data is None:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _cgroup_caps(limits: Limits) -> tuple:
    return (limits.memory_bytes, limits.pids, limits.cpus, limits.io_bytes_per_s)


def _rlimits(limits: Limits) -> tuple[tuple[int, int, int], ...]:
    cpu_soft_s = math.ceil(limits.cpu_time_s) + 1  # the backstop; the supervisor acts first
    return (
        (resource.RLIMIT_CPU, cpu_soft_s, cpu_soft_s + 1),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_STACK, limits.stack_bytes, limits.stack_bytes),
        (resource.RLIMIT_CORE, 0, 0),
    )


class Runtime:
    def __init__(
        self,
        state_dir: Path | None = None,
        cgroup_driver: CgroupDriver | None = None,
        warm_containers: int = 0,
        loopback_request: bytes | None = None,
    ) -> None:
        """loopback_request: the netlink message that brings `lo` up, when the caller has it
        encoded already (the launcher gets it from the service: encoding it needs pyroute2,
        whose memory every container would otherwise copy at clone)."""
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        # World-traversable: the container's set-up identity may be another uid than ours.
        self.state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self._scratch_dir = self.state_dir / "mnt"
        self._scratch_dir.mkdir(mode=0o755, exist_ok=True)
        self.cgroups = cgroup_driver or detect_driver()
        # The disks jobs read images from (and the state dir, where layers live): `io_rate`.
        self.cgroups.io_devices = block_devices(["/", "/usr", str(self.state_dir)])
        self._loopback_request = loopback_request or loopback_up_request()
        self._images: dict[str, tuple[float, Image]] = {}
        self._last_capability = libc.last_capability()
        self._supervisor = Supervisor()
        self._janitor = Janitor()
        self._warm_target = warm_containers
        self._warm: list[_Container] = []
        compiled_filter()  # compile once here, so every container inherits it

    @property
    def supervisor(self) -> Supervisor:
        return self._supervisor

    def _image(self, name: str) -> Image:
        """resolve_image, at most once a second per image: it checks the host for changes."""
        now = time.monotonic()
        cached = self._images.get(name)
        if cached is None or now - cached[0] > IMAGE_RECHECK_S:
            cached = self._images[name] = (now, resolve_image(name, self.state_dir))
        return cached[1]

    def _container_plan(self, image_name: str, writable_layer_bytes: int, hostname: str) -> ContainerPlan:
        image = self._image(image_name)
        return ContainerPlan(
            rootfs=RootfsPlan(
                scratch_dir=str(self._scratch_dir),
                image_mounts=image.mounts,
                writable_layer_bytes=writable_layer_bytes,
                shm_bytes=min(writable_layer_bytes, SHM_MAX_BYTES),
                workdir=WORKDIR,
                job_uid=image.uid,
                job_gid=image.gid,
            ),
            id_mapping=choose_id_mapping(image.uid, image.gid),
            hostname=hostname,
            loopback_request=self._loopback_request,
            last_capability=self._last_capability,
        )

    def _job_order(self, spec: JobSpec) -> JobOrder:
        image = self._image(spec.image)
        env = dict(image.env)
        env.update(spec.env)
        return JobOrder(
            argv=spec.argv,
            env=env,
            files=spec.files,
            rlimits=_rlimits(spec.limits),
            seccomp_policy=spec.seccomp_policy,
        )

    def _clone(self, plan: ContainerPlan, job_id: str, limits: Limits) -> _Container:
        """Clone a container into its user and PID namespaces; it prepares itself meanwhile
        (cgroup, other namespaces, filesystem) and says READY on its control socket."""
        cgroups = self.cgroups

        def join_cgroup() -> None:
            cgroup = cgroups.create(job_id, limits)
            cgroup.attach(0)  # "0": the writing process
            cgroup.close()

        go_read, go_write = os.pipe2(os.O_CLOEXEC)
        report_read, report_write = os.pipe2(os.O_CLOEXEC)
        parent_control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds = ChildFds(go=go_read, report=report_write, control=child_control.fileno())
        try:
            pid = libc.clone(CLONE_FLAGS)
        except BaseException:
            for fd in (go_read, go_write, report_read, report_write):
                os.close(fd)
            parent_control.close()
            child_control.close()
            raise
        if pid == 0:
            libc.close_fds_except({go_read, report_write, child_control.fileno()})
            container_main(plan, child_fds, join_cgroup)
        os.close(go_read)
        os.close(report_write)
        child_control.close()
        container = _Container(pid, os.pidfd_open(pid), parent_control, report_read, job_id, limits)
        try:
            write_id_maps(pid, plan.id_mapping)
            os.write(go_write, b"g")
        except BaseException:
            self._discard(container)
            raise
        finally:
            os.close(go_write)
        return container

    def _discard(self, container: _Container) -> None:
        try:
            signal.pidfd_send_signal(container.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(container.pid, 0)
        for fd in (container.pidfd, container.report_fd):
            os.close(fd)
        container.control.close()
        self._janitor.remove(self.cgroups.directories(container.job_id))

    def _ready_cgroup(self, container: _Container) -> JobCgroup | None:
        """Wait until the container is prepared; its cgroup, or None if it failed (its
        report then says why)."""
        if container.control.recv(1) != READY:
            return None
        return self.cgroups.adopt(container.job_id)

    def _take_warm(self, spec: JobSpec) -> tuple[_Container, JobCgroup] | None:
        """A prepared container fits a job of the default image, hostname and disk size."""
        while self._warm and (spec.image, spec.hostname, spec.limits.disk_bytes) == self._warm_shape():
            container = self._warm.pop(0)
            try:
                cgroup = self._ready_cgroup(container)
                if cgroup is not None:
                    if _cgroup_caps(spec.limits) != _cgroup_caps(container.limits):
                        cgroup.assign(spec.job_id, spec.limits)
                    else:  # the caps are the pool's already: no cgroup writes on the job's path
                        cgroup.job_id = spec.job_id
                    return container, cgroup
            except (OSError, CgroupError):
                pass
            self._discard(container)  # it died while waiting, or its limits could not be set
        return None

    @staticmethod
    def _warm_shape() -> tuple[str, str, int]:
        return DEFAULT_IMAGE, DEFAULT_HOSTNAME, default_limit_policy().defaults.disk_bytes

    @property
    def warm_deficit(self) -> int:
        return self._warm_target - len(self._warm)

    def prewarm(self, count: int | None = None) -> None:
        """Prepare containers for the pool: up to its target, or at most `count` more."""
        wanted = self.warm_deficit if count is None else min(count, self.warm_deficit)
        defaults = default_limit_policy().defaults
        for _ in range(wanted):
            plan = self._container_plan(DEFAULT_IMAGE, defaults.disk_bytes, DEFAULT_HOSTNAME)
            self._warm.append(self._clone(plan, new_job_id(), defaults))

    def start(self, spec: JobSpec, on_done: Callable[[Result], None], refill: bool = True) -> int:
        """Launch the job; on_done gets its Result from a later step(). Returns the
        container's host pid (for kill()). refill=False leaves refilling the pool to the
        caller (the launcher does it when idle, off the jobs' path)."""
        order = self._job_order(spec)
        warm = self._take_warm(spec)
        if warm is not None:
            container, cgroup = warm
        else:
            plan = self._container_plan(spec.image, spec.limits.disk_bytes, spec.hostname)
            container = self._clone(plan, spec.job_id, spec.limits)
            try:
                cgroup = self._ready_cgroup(container)
            except BaseException:
                self._discard(container)
                raise
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        stdin_fd = _stdin_fd(spec.stdin)
        try:
            if cgroup is not None:  # else the container failed: its report says why
                cgroup.begin_accounting()
                send_order(container.control, order, (stdin_fd, stdout_write, stderr_write))
            started_ns = time.monotonic_ns()
        except BaseException:
            for fd in (stdout_read, stderr_read):
                os.close(fd)
            if cgroup is not None:
                cgroup.close()
            self._discard(container)
            raise
        finally:
            for fd in (stdin_fd, stdout_write, stderr_write):
                os.close(fd)
            container.control.close()
        limits = spec.limits
        parallelism = cpu_parallelism(limits.cpus)
        directories = self.cgroups.directories(container.job_id)

        def on_gone() -> None:
            if cgroup is not None:
                cgroup.close()
            self._janitor.remove(directories)

        self._supervisor.watch(
            RunningJob(
                spec=spec,
                pid=container.pid,
                pidfd=container.pidfd,
                cgroup=cgroup,
                on_gone=on_gone,
                report_fd=container.report_fd,
                stdout=OutputStream(stdout_read, limits.output_bytes),
                stderr=OutputStream(stderr_read, limits.output_bytes),
                started_ns=started_ns,
                on_done=on_done,
                cpu_parallelism=parallelism,
                wall_deadline_ns=started_ns + int(limits.wall_time_s * 1e9),
                next_cpu_check_ns=started_ns + int(min(0.1, limits.cpu_time_s / parallelism) * 1e9),
            )
        )
        if refill:
            self.prewarm()
        return container.pid

    def run(self, spec: JobSpec) -> Result:
        """Run one job to its end and return its Result as soon as it is known; the
        container's teardown finishes during later calls, or in settle() or close().
        Interrupted (Ctrl-C), it kills the job and cleans up first."""
        results: list[Result] = []
        pid = self.start(spec, results.append)
        try:
            while not results:
                self._supervisor.step(None)
        except BaseException:
            self._supervisor.kill(pid, "interrupted")
            self._supervisor.settle()
            raise
        return results[0]

    def settle(self) -> None:
        """Wait until every finished job's container and cgroup are gone."""
        self._supervisor.settle()
        self._janitor.flush()

    def close(self) -> None:
        """Discard the prepared containers, settle, and stop the janitor."""
        while self._warm:
            self._discard(self._warm.pop())
        self._supervisor.settle()
        self._janitor.close()

