"""The runtime's Python API: turn a JobSpec into a running container and, in the end, a Result.

`Runtime` must live in a single-threaded process (it clones with fork semantics): the CLI
uses it directly, the service through the launcher process (launcher.py).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import time
from pathlib import Path
from typing import Callable

from sandboxd.images import resolve_image
from sandboxd.job import WORKDIR, JobSpec, Result
from sandboxd.runtime import libc
from sandboxd.runtime.cgroup import CgroupDriver, detect_driver
from sandboxd.runtime.container import NAMESPACE_FLAGS, ChildFds, ContainerPlan, container_main
from sandboxd.runtime.mnt import RootfsPlan
from sandboxd.runtime.net import loopback_up_request
from sandboxd.runtime.seccomp import compiled_filter
from sandboxd.runtime.supervisor import RunningJob, Supervisor, _Stream, cpu_parallelism
from sandboxd.runtime.user import choose_id_mapping, write_id_maps
from sandboxd.state import default_state_dir

SHM_MAX_BYTES = 64 << 20


def _stdin_fd(data: bytes | None) -> int:
    if data is None:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _close_all_fds_except(keep: set[int]) -> None:
    previous = 2
    for fd in sorted(keep):
        if fd > previous + 1:
            os.closerange(previous + 1, fd)
        previous = max(previous, fd)
    os.closerange(previous + 1, 1 << 16)


class Runtime:
    def __init__(self, state_dir: Path | None = None, cgroup_driver: CgroupDriver | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        # World-traversable: the container's set-up identity may be another uid than ours.
        self.state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self._scratch_dir = self.state_dir / "mnt"
        self._scratch_dir.mkdir(mode=0o755, exist_ok=True)
        self.cgroups = cgroup_driver or detect_driver()
        self._loopback_request = loopback_up_request()
        self._last_capability = libc.last_capability()
        self._supervisor = Supervisor()

    @property
    def supervisor(self) -> Supervisor:
        return self._supervisor

    def _plan(self, spec: JobSpec) -> ContainerPlan:
        image = resolve_image(spec.image, self.state_dir)
        limits = spec.limits
        env = dict(image.env)
        env.update(spec.env)
        cpu_soft_s = math.ceil(limits.cpu_time_s) + 1  # the backstop; the supervisor acts first
        rlimits = (
            (resource.RLIMIT_CPU, cpu_soft_s, cpu_soft_s + 1),
            (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
            (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
            (resource.RLIMIT_STACK, limits.stack_bytes, limits.stack_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        )
        return ContainerPlan(
            rootfs=RootfsPlan(
                scratch_dir=str(self._scratch_dir),
                image_mounts=image.mounts,
                writable_layer_bytes=limits.disk_bytes,
                shm_bytes=min(limits.disk_bytes, SHM_MAX_BYTES),
                workdir=WORKDIR,
                job_uid=image.uid,
                job_gid=image.gid,
            ),
            id_mapping=choose_id_mapping(image.uid, image.gid),
            job_uid=image.uid,
            job_gid=image.gid,
            hostname=spec.hostname,
            argv=spec.argv,
            env=env,
            files=spec.files,
            rlimits=rlimits,
            seccomp=compiled_filter(spec.seccomp_policy),
            loopback_request=self._loopback_request,
            last_capability=self._last_capability,
        )

    def start(self, spec: JobSpec, on_done: Callable[[Result], None]) -> int:
        """Launch the job's container; on_done gets its Result from a later step(). Returns
        the container's host pid (for kill())."""
        plan = self._plan(spec)
        cgroup = self.cgroups.create(spec.job_id, spec.limits)
        parent_fds: list[int] = []
        child_fds: list[int] = []
        try:
            stdin_fd = _stdin_fd(spec.stdin)
            child_fds.append(stdin_fd)
            go_read, go_write = os.pipe2(os.O_CLOEXEC)
            report_read, report_write = os.pipe2(os.O_CLOEXEC)
            stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
            stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
            parent_fds += [go_write, report_read, stdout_read, stderr_read]
            child_fds += [go_read, report_write, stdout_write, stderr_write]
            fds = ChildFds(go=go_read, report=report_write, stdin=stdin_fd, stdout=stdout_write,
                           stderr=stderr_write)
            started_ns = time.monotonic_ns()
            pid = libc.clone(NAMESPACE_FLAGS)
            if pid == 0:
                _close_all_fds_except(set(child_fds))
                container_main(plan, fds)
        except BaseException:
            for fd in parent_fds + child_fds:
                os.close(fd)
            cgroup.remove()
            raise
        for fd in child_fds:
            os.close(fd)
        try:
            pidfd = os.pidfd_open(pid)
            try:
                write_id_maps(pid, plan.id_mapping)
                cgroup.attach(pid)
                os.write(go_write, b"g")
            except BaseException:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
                raise
        except BaseException:
            os.waitpid(pid, 0)
            for fd in parent_fds:
                os.close(fd)
            cgroup.remove()
            raise
        os.close(go_write)
        limits = spec.limits
        now_ns = time.monotonic_ns()
        self._supervisor.watch(
            RunningJob(
                spec=spec,
                pid=pid,
                pidfd=pidfd,
                cgroup=cgroup,
                report_fd=report_read,
                stdout=_Stream(stdout_read, limits.output_bytes),
                stderr=_Stream(stderr_read, limits.output_bytes),
                started_ns=started_ns,
                on_done=on_done,
                cpu_parallelism=cpu_parallelism(limits.cpus),
                wall_deadline_ns=started_ns + int(limits.wall_time_s * 1e9),
                next_cpu_check_ns=now_ns + int(min(0.1, limits.cpu_time_s / cpu_parallelism(limits.cpus)) * 1e9),
            )
        )
        return pid

    def run(self, spec: JobSpec) -> Result:
        """Run one job to its end. Interrupted (Ctrl-C), it kills the job and cleans up first."""
        results: list[Result] = []
        pid = self.start(spec, results.append)
        try:
            while not results:
                self._supervisor.step(None)
        except BaseException:
            self._supervisor.kill(pid, "interrupted")
            while not results:
                self._supervisor.step(1.0)
            raise
        return results[0]
