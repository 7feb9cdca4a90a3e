"""The runtime's Python API: turn a JobSpec into a running container and, in the end, a Result.

`Runtime` must live in a single-threaded process (it clones with fork semantics): the CLI
uses it directly, the service through the launcher process.

Launch speed: a container can be prepared before its job exists (cloned, id-mapped, placed in
a cgroup, its filesystem built), so starting a job only sends the order. With
`warm_containers=N` the runtime keeps N prepared containers of the default image and refills
the pool while jobs run. Accounting starts when the order is sent: set-up CPU is not billed.
Nothing waits for a container to be prepared: a job that finds none ready waits for one in
the supervisor's loop, while other jobs run and finish.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from sandboxd.images import Image, resolve_image
from sandboxd.job import DEFAULT_HOSTNAME, WORKDIR, JobSpec, Result, StdioPipe, internal_error_result, new_job_id
from sandboxd.limits import Limits, default_limit_policy
from sandboxd.runtime import libc
from sandboxd.runtime.cgroup import CgroupDriver, CgroupError, JobCgroup, block_devices, detect_driver
from sandboxd.runtime.container import READY, ContainerPlan, JobOrder, send_order
from sandboxd.runtime.janitor import Janitor
from sandboxd.runtime.mnt import RootfsPlan
from sandboxd.runtime.net import loopback_up_request
from sandboxd.runtime.priority import can_raise_priority, run_in_foreground
from sandboxd.runtime.seccomp import compiled_filter
from sandboxd.runtime.supervisor import OutputStream, RunningJob, Supervisor, cpu_parallelism
from sandboxd.runtime.user import choose_id_mapping
from sandboxd.runtime.zygote import Cloned, ZygoteClient, clone_container
from sandboxd.state import default_state_dir

SHM_MAX_BYTES = 64 << 20
IMAGE_RECHECK_S = 1.0
POOL_FAILURE_PAUSE_S = 1.0
PLAN_CACHE_SIZE = 64
DEFAULT_IMAGE = "host"
DEFAULT_POLICY = "default"


class Shape(NamedTuple):
    """What a container is made for before its job is known; a job takes one of its shape."""

    image: str
    hostname: str
    disk_bytes: int
    seccomp_policy: str
    workdir: str = WORKDIR
    upper_dir: str | None = None  # an image build's step: its writable layer stays on the host
    network: bool = False


@dataclass(eq=False)
class _Waiting:
    """A job between start() and its order: its container is not ready yet."""

    spec: JobSpec
    order: JobOrder
    on_done: Callable[[Result], None]
    killed_for: str | None = None  # killed before it started: it never gets its order


@dataclass(eq=False)
class _Container:
    """A container from its clone to its job's order. States: cloning (the zygote is at
    it), preparing (cloned, building itself), ready (said READY; its cgroup adopted), failed."""

    job_id: str  # names its cgroup, which the container creates itself
    limits: Limits  # the caps its cgroup was created with
    shape: Shape
    pooled: bool  # made ahead for any job of its shape, not for one job
    waiting: _Waiting | None = None
    state: str = "cloning"
    failure: str | None = None
    pid: int = 0  # 0 until cloned
    pidfd: int = -1
    control: socket.socket | None = None
    report_fd: int = -1
    cgroup: JobCgroup | None = None
    background: bool = False  # prepares under SCHED_IDLE until a job is given to it


def _stdin_fd(data: bytes | None) -> int:
    if data is None:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _kill_quietly(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
        zygote: bool = False,
    ) -> None:
        """loopback_request: the netlink message that brings `lo` up, when the caller has it
        encoded already (the launcher gets it from the service: encoding it needs pyroute2,
        whose memory every container would otherwise copy at clone).
        zygote: clone containers from a zygote process, never blocking the caller's loop
        (the launcher); without it, start() clones in this process."""
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
        self._plans: dict[Shape, tuple[float, ContainerPlan]] = {}
        self._last_capability = libc.last_capability()
        self._supervisor = Supervisor()
        self._janitor = Janitor()
        self._warm_target = warm_containers
        self._pool: list[_Container] = []  # made ahead, no job yet
        self._background_pool = zygote and can_raise_priority()
        self._refill_after = 0.0  # monotonic time
        self._starting: dict[str, _Container] = {}  # job id -> the container it waits for
        self._pids: dict[str, int] = {}  # job id -> its container's host pid, while it runs
        self._cloning: deque[_Container] = deque()  # asked of the zygote, in order
        # (pipe group, side) -> that side's (stdin, stdout) ends, made when the other side
        # started and held until this side's order carries them.
        self._pipe_ends: dict[tuple[str, int], tuple[int, int]] = {}
        self._pipe_sides_gone: set[tuple[str, int]] = set()  # sides that ended without starting
        self._zygote: ZygoteClient | None = None
        compiled_filter()  # compile once here; every job's order carries the program
        if zygote:
            self._zygote = ZygoteClient(self.cgroups, self._on_cloned)
            self._supervisor.register_fd(self._zygote.fileno(), self._zygote.on_readable)

    @property
    def supervisor(self) -> Supervisor:
        return self._supervisor

    @property
    def active(self) -> int:
        """Jobs started and not yet cleaned up (waiting for a container, or running)."""
        return len(self._starting) + self._supervisor.pending

    @property
    def running(self) -> int:
        """Jobs started whose result is not delivered yet."""
        return len(self._starting) + self._supervisor.running

    def job_pid(self, job_id: str) -> int | None:
        """The host pid of a running job's container init (None before its order, and after)."""
        return self._pids.get(job_id)

    def _image(self, name: str) -> Image:
        """resolve_image, at most once a second per image: it checks the host for changes."""
        now = time.monotonic()
        cached = self._images.get(name)
        if cached is None or now - cached[0] > IMAGE_RECHECK_S:
            cached = self._images[name] = (now, resolve_image(name, self.state_dir))
        return cached[1]

    def _container_plan(self, shape: Shape) -> ContainerPlan:
        """The plan for a container of this shape, rebuilt as often as its image is checked
        (choosing the id mapping reads /etc/subuid)."""
        now = time.monotonic()
        cached = self._plans.get(shape)
        if cached is None or now - cached[0] > IMAGE_RECHECK_S:
            if len(self._plans) >= PLAN_CACHE_SIZE:  # jobs choose disk sizes and hostnames
                self._plans.clear()
            cached = self._plans[shape] = (now, self._new_plan(shape))
        return cached[1]

    def _new_plan(self, shape: Shape) -> ContainerPlan:
        image = self._image(shape.image)
        return ContainerPlan(
            rootfs=RootfsPlan(
                scratch_dir=str(self._scratch_dir),
                image_mounts=image.mounts,
                writable_layer_bytes=shape.disk_bytes,
                shm_bytes=min(shape.disk_bytes, SHM_MAX_BYTES),
                workdir=shape.workdir,
                upper_dir=shape.upper_dir,
                job_uid=image.uid,
                job_gid=image.gid,
            ),
            id_mapping=choose_id_mapping(image.uid, image.gid),
            hostname=shape.hostname,
            network=shape.network,
            loopback_request=self._loopback_request,
            last_capability=self._last_capability,
            seccomp_bpf=compiled_filter(shape.seccomp_policy).bpf,
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
        )

    # A container's life before its job: _new_container, _on_cloned, _on_control, _settled.

    def _new_container(self, shape: Shape, job_id: str, limits: Limits,
                       waiting: _Waiting | None) -> _Container:
        plan = self._container_plan(shape)
        container = _Container(job_id, limits, shape, pooled=waiting is None, waiting=waiting,
                               background=waiting is None and self._background_pool)
        if self._zygote is not None:
            # If it fails, nothing is registered yet.
            self._zygote.request(job_id, plan, limits, container.background)
            self._cloning.append(container)
        if waiting is None:
            self._pool.append(container)
        else:
            self._starting[waiting.spec.job_id] = container
        if self._zygote is None:
            self._took_clone(container, clone_container(plan, job_id, limits, self.cgroups))
        return container

    def _on_cloned(self, cloned: Cloned) -> None:
        container = self._cloning.popleft()  # the zygote answers in order
        assert container.job_id == cloned.job_id, (container.job_id, cloned.job_id)
        self._took_clone(container, cloned)

    def _took_clone(self, container: _Container, cloned: Cloned) -> None:
        container.pid = cloned.pid
        if cloned.pid:
            container.pidfd = os.pidfd_open(cloned.pid)
            if container.waiting is not None:
                self._to_foreground(container)
        if cloned.control is None:
            container.state, container.failure = "failed", cloned.error
            self._settled(container)
            return
        container.control, container.report_fd = cloned.control, cloned.report_fd
        container.state = "preparing"
        self._supervisor.register_fd(cloned.control.fileno(), lambda: self._on_control(container))

    def _on_control(self, container: _Container) -> None:
        """The container said READY, or failed (its report says why) and closed the socket."""
        if container.state != "preparing" or container.control is None:
            return
        self._supervisor.unregister_fd(container.control.fileno())
        try:
            said = container.control.recv(1)
        except OSError:
            said = b""
        if said == READY:
            try:
                container.cgroup = self.cgroups.adopt(container.job_id)
                container.state = "ready"
            except (OSError, CgroupError) as error:
                container.state, container.failure = "failed", f"adopting its cgroup: {error}"
        else:
            container.state = "failed"
        self._settled(container)

    def _settled(self, container: _Container) -> None:
        """Ready or failed: start its waiting job; a failed pool container gives its job to another."""
        waiting = container.waiting
        if container.state == "ready":
            if waiting is not None:
                self._dispatch(container)
            return
        if waiting is None or container.pooled:
            if container in self._pool:
                self._pool.remove(container)
            self._discard(container)
            # Whatever broke it (the image, the host) would break its replacement too.
            self._refill_after = time.monotonic() + POOL_FAILURE_PAUSE_S
            if waiting is not None:
                del self._starting[waiting.spec.job_id]
                self._place(waiting)
            return
        if container.control is not None:
            self._dispatch(container)  # the job gets the container's report as its result
            return
        self._discard(container)
        del self._starting[waiting.spec.job_id]
        self._drop_pipe_ends(waiting.spec.stdio_pipe)
        waiting.on_done(internal_error_result(f"building the container: {container.failure}"))

    def _discard(self, container: _Container) -> None:
        if container.pid:
            _kill_quietly(container.pidfd)
            os.waitpid(container.pid, 0)
            os.close(container.pidfd)
            self._janitor.remove(self.cgroups.directories(container.job_id))
        if container.report_fd != -1:
            os.close(container.report_fd)
        if container.control is not None:
            if container.state == "preparing":
                self._supervisor.unregister_fd(container.control.fileno())
            container.control.close()
        if container.cgroup is not None:
            container.cgroup.close()
        container.state = "failed"

    # A job's start: _place it on a container, _dispatch it once the container is ready.

    def _take_from_pool(self, shape: Shape) -> _Container | None:
        fitting = [c for c in self._pool if c.shape == shape and c.state != "failed"]
        if not fitting:
            return None
        container = next((c for c in fitting if c.state == "ready"), fitting[0])
        self._pool.remove(container)
        return container

    def _place(self, waiting: _Waiting) -> None:
        spec = waiting.spec
        shape = Shape(spec.image, spec.hostname, spec.limits.disk_bytes, spec.seccomp_policy, spec.workdir,
                      spec.upper_dir, spec.network)
        container = self._take_from_pool(shape)
        if container is None:
            self._new_container(shape, spec.job_id, spec.limits, waiting)
            return
        container.waiting = waiting
        self._starting[spec.job_id] = container
        self._to_foreground(container)
        if container.state == "ready":
            self._dispatch(container)

    @staticmethod
    def _to_foreground(container: _Container) -> None:
        """A job is given to it: the rest of its set-up and the job run at normal priority.
        (Still cloning, it is raised once cloned.)"""
        if container.background and container.pid:
            run_in_foreground(container.pid)
            container.background = False

    def _dispatch(self, container: _Container) -> None:
        waiting = container.waiting
        assert waiting is not None
        container.waiting = None
        del self._starting[waiting.spec.job_id]
        cgroup = container.cgroup
        if cgroup is not None and container.pooled:
            spec = waiting.spec
            try:
                if _cgroup_caps(spec.limits) != _cgroup_caps(container.limits):
                    cgroup.assign(spec.job_id, spec.limits)
                else:  # the caps are the pool's already: no cgroup writes on the job's path
                    cgroup.job_id = spec.job_id
            except (OSError, CgroupError):
                self._discard(container)  # its limits could not be set: another one
                self._place(waiting)
                return
        try:
            self._send_order(container, waiting)
        except Exception as error:  # noqa: BLE001 - a job's failure must not stop the loop
            self._discard(container)
            self._drop_pipe_ends(waiting.spec.stdio_pipe)
            waiting.on_done(internal_error_result(f"starting the job: {type(error).__name__}: {error}"))

    def _take_pipe_ends(self, pipe: StdioPipe) -> tuple[int, int]:
        """This side's (stdin, stdout): the first side of a group to start makes both pipes
        and leaves the other side its ends. Ours are closed once our order carries them, so
        when one side ends the other reads EOF (or gets SIGPIPE) instead of waiting."""
        ends = self._pipe_ends.pop((pipe.group, pipe.side), None)
        if ends is not None:
            return ends
        if (pipe.group, 1 - pipe.side) in self._pipe_sides_gone:
            self._pipe_sides_gone.discard((pipe.group, 1 - pipe.side))
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.close(read_end)  # no one will read: a write gets EPIPE
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), write_end
        to_peer_read, to_peer_write = os.pipe2(os.O_CLOEXEC)
        from_peer_read, from_peer_write = os.pipe2(os.O_CLOEXEC)
        self._pipe_ends[(pipe.group, 1 - pipe.side)] = (to_peer_read, from_peer_write)
        return from_peer_read, to_peer_write

    def _drop_pipe_ends(self, pipe: StdioPipe | None) -> None:
        """A side that will never start: its ends, if the other side left them, are closed;
        else the other side, when it starts, gets no peer (EOF, and EPIPE on writing)."""
        if pipe is None:
            return
        ends = self._pipe_ends.pop((pipe.group, pipe.side), None)
        if ends is None:
            self._pipe_sides_gone.add((pipe.group, pipe.side))
        for fd in ends or ():
            os.close(fd)

    def _send_order(self, container: _Container, waiting: _Waiting) -> None:
        spec, cgroup = waiting.spec, container.cgroup
        assert container.control is not None
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        if spec.stdio_pipe is None:
            stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
            stdin_fd = _stdin_fd(spec.stdin)
        else:
            stdout_read = -1  # the other side reads it
            stdin_fd, stdout_write = self._take_pipe_ends(spec.stdio_pipe)
        try:
            if waiting.killed_for is not None:
                # Killed before its order: it dies without it (and so reports nothing).
                _kill_quietly(container.pidfd)
            elif cgroup is not None:  # else the container failed: its report says why
                cgroup.begin_accounting()
                send_order(container.control, waiting.order, (stdin_fd, stdout_write, stderr_write))
            started_ns = time.monotonic_ns()
        except BaseException:
            for fd in (stdout_read, stderr_read):
                if fd != -1:
                    os.close(fd)
            raise
        finally:
            for fd in (stdin_fd, stdout_write, stderr_write):
                os.close(fd)
        container.control.close()
        container.control = None
        container.cgroup = None  # the supervisor's from here on
        limits = spec.limits
        parallelism = cpu_parallelism(limits.cpus)
        directories = self.cgroups.directories(container.job_id)
        job_id = spec.job_id

        def on_gone() -> None:
            if cgroup is not None:
                cgroup.close()
            self._janitor.remove(directories)

        def on_done(result: Result) -> None:
            self._pids.pop(job_id, None)
            waiting.on_done(result)

        self._supervisor.watch(
            RunningJob(
                spec=spec,
                pid=container.pid,
                pidfd=container.pidfd,
                cgroup=cgroup,
                on_gone=on_gone,
                report_fd=container.report_fd,
                stdout=OutputStream(stdout_read, limits.output_bytes, open=stdout_read != -1),
                stderr=OutputStream(stderr_read, limits.output_bytes),
                started_ns=started_ns,
                on_done=on_done,
                cpu_parallelism=parallelism,
                wall_deadline_ns=started_ns + int(limits.wall_time_s * 1e9),
                next_cpu_check_ns=started_ns + int(min(0.1, limits.cpu_time_s / parallelism) * 1e9),
            )
        )
        self._pids[job_id] = container.pid
        if waiting.killed_for is not None:
            self._supervisor.kill(container.pid, waiting.killed_for)

    @staticmethod
    def _warm_shape() -> Shape:
        return Shape(DEFAULT_IMAGE, DEFAULT_HOSTNAME, default_limit_policy().defaults.disk_bytes, DEFAULT_POLICY)

    @property
    def warm_deficit(self) -> int:
        """How many containers the pool lacks; 0 for a while after one failed to prepare."""
        if time.monotonic() < self._refill_after:
            return 0
        return self._warm_target - len(self._pool)

    def prewarm(self, count: int | None = None) -> None:
        """Prepare containers for the pool: up to its target, or at most `count` more."""
        wanted = self.warm_deficit if count is None else min(count, self.warm_deficit)
        defaults = default_limit_policy().defaults
        for _ in range(wanted):
            self._new_container(self._warm_shape(), new_job_id(), defaults, None)

    def start(self, spec: JobSpec, on_done: Callable[[Result], None]) -> None:
        """Launch the job: at once on a ready container, else as soon as one is; on_done gets
        its Result from a later step(). Raises UnknownImageError for an unknown image. Then
        refill the pool: its containers prepare while the job runs, not after it, when its
        result and the next request are on their way."""
        try:
            self._place(_Waiting(spec, self._job_order(spec), on_done))
        except BaseException:
            self._drop_pipe_ends(spec.stdio_pipe)
            raise
        self.prewarm()

    def kill(self, job_id: str, reason: str) -> None:
        """Kill a job, started or still waiting for its container; its Result still comes."""
        container = self._starting.get(job_id)
        if container is not None and container.waiting is not None:
            container.waiting.killed_for = container.waiting.killed_for or reason
            return
        pid = self._pids.get(job_id)
        if pid is not None:
            self._supervisor.kill(pid, reason)

    def run(self, spec: JobSpec) -> Result:
        """Run one job to its end and return its Result as soon as it is known; the
        container's teardown finishes during later calls, or in settle() or close().
        Interrupted (Ctrl-C), it kills the job and cleans up first."""
        results: list[Result] = []
        self.start(spec, results.append)
        try:
            while not results:
                self._supervisor.step(None)
        except BaseException:
            self.kill(spec.job_id, "interrupted")
            self.settle()
            raise
        return results[0]

    def settle(self) -> None:
        """Wait until every started job is delivered and its container and cgroup are gone."""
        while self._starting or self._supervisor.pending:
            self._supervisor.step(1.0)
        self._janitor.flush()

    def close(self) -> None:
        """Discard the prepared containers, settle, and stop the zygote and the janitor."""
        if self._zygote is not None:
            self._supervisor.unregister_fd(self._zygote.fileno())
            self._zygote.close()  # every container it made is known after this
            self._zygote = None
        while self._pool:
            self._discard(self._pool.pop())
        self.settle()
        self._janitor.close()
