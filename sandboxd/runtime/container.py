"""The child side of a launch: everything between clone() and the job's execve().

Order follows runc, crun and bubblewrap: wait until the parent has written the id maps and
placed us in the job's cgroup; new cgroup namespace; filesystem and pivot_root; hostname and
loopback; then fork the job, which takes its stdio, rlimits, uid, drops every capability,
sets no_new_privs, loads seccomp last and execs. This process stays as the job's PID 1.
"""

from __future__ import annotations

import os
import resource
import signal
from dataclasses import dataclass
from typing import NoReturn

from sandboxd.job import InputFile
from sandboxd.runtime import libc
from sandboxd.runtime.mnt import RootfsPlan, build_rootfs, write_input_file
from sandboxd.runtime.net import bring_up_loopback
from sandboxd.runtime.pid import (
    REPORT_EXEC_FAILED,
    REPORT_SETUP_FAILED,
    ignore_job_signals,
    run_init,
)
from sandboxd.runtime.seccomp import PreparedFilter
from sandboxd.runtime.user import IdMapping, become_job_user, become_setup_identity

NAMESPACE_FLAGS = (
    libc.CLONE_NEWUSER
    | libc.CLONE_NEWNS
    | libc.CLONE_NEWPID
    | libc.CLONE_NEWIPC
    | libc.CLONE_NEWUTS
    | libc.CLONE_NEWNET
)


@dataclass(frozen=True)
class ContainerPlan:
    rootfs: RootfsPlan
    id_mapping: IdMapping
    job_uid: int
    job_gid: int
    hostname: str
    argv: tuple[str, ...]
    env: dict[str, str]
    files: tuple[InputFile, ...]
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)
    seccomp: PreparedFilter
    loopback_request: bytes
    last_capability: int


@dataclass(frozen=True)
class ChildFds:
    go: int  # read end: one byte once the parent mapped ids and placed us in the cgroup
    report: int  # write end, close-on-exec: set-up failures, exec failures, the final status
    stdin: int
    stdout: int
    stderr: int


def _report(fd: int, kind: bytes, message: str) -> None:
    try:
        os.write(fd, kind + message.encode(errors="replace")[:4000])
    except OSError:
        pass


def _exec_job(plan: ContainerPlan, fds: ChildFds) -> NoReturn:
    try:
        os.setsid()  # no controlling terminal: TIOCSTI has nothing to inject into
        os.dup2(fds.stdin, 0)
        os.dup2(fds.stdout, 1)
        os.dup2(fds.stderr, 2)
        # Python ignores these; an ignored disposition would survive execve.
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        for limit, soft, hard in plan.rlimits:
            resource.setrlimit(limit, (soft, hard))
        os.chdir(plan.rootfs.workdir)
        become_job_user(plan.id_mapping, plan.job_uid, plan.job_gid, plan.last_capability)
        os.closerange(3, fds.report)
        os.closerange(fds.report + 1, 1 << 16)
        plan.seccomp.install()
    except BaseException as error:  # noqa: BLE001 - everything must reach the parent
        _report(fds.report, REPORT_SETUP_FAILED, f"preparing the job process: {error!r}")
        os._exit(125)
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)
    except OSError as error:
        _report(fds.report, REPORT_EXEC_FAILED, f"{error.errno}:{plan.argv[0]}: {error.strerror}")
    os._exit(127)


def container_main(plan: ContainerPlan, fds: ChildFds) -> NoReturn:
    """Entry point of the cloned child, PID 1 of the new namespaces. Never returns."""
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        ignore_job_signals()
        if os.read(fds.go, 1) != b"g":
            os._exit(125)  # the parent gave up (or died) before we were set up
        os.close(fds.go)
        # Ours to own from here: no one outside may ptrace or read our memory.
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        become_setup_identity(plan.id_mapping)
        # After the parent placed us: the job's cgroup becomes the root of its view.
        libc.unshare(libc.CLONE_NEWCGROUP)
        build_rootfs(plan.rootfs)
        for input_file in plan.files:
            write_input_file(plan.rootfs.workdir, input_file.path, input_file.content, input_file.mode,
                             plan.job_uid, plan.job_gid)
        libc.sethostname(plan.hostname)
        bring_up_loopback(plan.loopback_request)
        job_pid = os.fork()
        if job_pid == 0:
            _exec_job(plan, fds)
        for fd in (fds.stdin, fds.stdout, fds.stderr):
            os.close(fd)
    except BaseException as error:  # noqa: BLE001
        _report(fds.report, REPORT_SETUP_FAILED, f"building the container: {error!r}")
        os._exit(125)
    run_init(job_pid, fds.report)
