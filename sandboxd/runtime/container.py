"""The child side of a launch: everything between clone() and the job's execve().

Two phases, so a container can be prepared before its job exists (a warm container):
1. prepare, every privileged step: create and join the job's cgroup; once the parent has
   written the id maps, create the other namespaces (cgroup, mount, network, IPC, UTS), build the
   filesystem (OverlayFS, /proc, /dev) and pivot_root, bring up loopback, set the hostname;
   then become the job's user: no capabilities, no_new_privs; and load the seccomp filter,
   so nothing that follows may do what the job may not (and the order's path is shorter).
2. take the job's order from the parent (argv, env, files, rlimits, stdio fds), write the
   input files as the job's user, take its rlimits, and spawn the job.
This process stays behind as the job's PID 1, having taken on the job's whole context
before a vfork-style spawn; nothing of the order can reach a privileged step.
The order follows runc, crun and bubblewrap.
"""

from __future__ import annotations

import array
import gc
import os
import pickle
import resource
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Callable, NoReturn

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
from sandboxd.runtime.user import IdMapping, become_job_user, become_setup_identity

# Only what clone() alone can do: PID 1 of a new PID namespace, in a new user namespace.
CLONE_FLAGS = libc.CLONE_NEWUSER | libc.CLONE_NEWPID
# The rest the child makes itself, owned by its user namespace; creating a network
# namespace is the slowest step of a launch, and so it runs in the child, not the parent.
UNSHARE_FLAGS = libc.CLONE_NEWNS | libc.CLONE_NEWNET | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS
_ORDER_HEADER = struct.Struct("=Q")
_ORDER_FDS = 3  # stdin, stdout, stderr


@dataclass(frozen=True)
class ContainerPlan:
    """What a container is built from, known before its job: image, disk size, hostname, ids."""

    rootfs: RootfsPlan  # its writable_layer_bytes is the job's disk limit
    id_mapping: IdMapping
    hostname: str
    network: bool  # the host's network namespace (image builds that ask); else one of its own
    loopback_request: bytes
    last_capability: int
    seccomp_bpf: bytes  # the job's compiled policy, loaded at the end of the set-up


@dataclass(frozen=True)
class JobOrder:
    """What the job is: sent to the prepared container when the job starts."""

    argv: tuple[str, ...]
    env: dict[str, str]
    files: tuple[InputFile, ...]
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)


@dataclass(frozen=True)
class ChildFds:
    go: int  # read end: one byte once the parent mapped our ids
    report: int  # write end, close-on-exec: set-up failures, exec failures, the final status
    control: int  # our end of a socket pair: READY goes out, the JobOrder and stdio come in


READY = b"r"


def send_order(sock: socket.socket, order: JobOrder, stdio: tuple[int, int, int]) -> None:
    payload = pickle.dumps(order, protocol=pickle.HIGHEST_PROTOCOL)
    data = _ORDER_HEADER.pack(len(payload)) + payload
    sent = sock.sendmsg([data[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stdio))])
    if sent < len(data):
        sock.sendall(data[sent:])


def _receive_order(control_fd: int) -> tuple[JobOrder, tuple[int, int, int]]:
    sock = socket.socket(fileno=control_fd)
    try:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_ORDER_FDS * 4))
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if len(fds) != _ORDER_FDS or len(data) < _ORDER_HEADER.size:
            raise RuntimeError("the parent sent no job order")
        size = _ORDER_HEADER.unpack_from(data)[0]
        chunks = [data[_ORDER_HEADER.size:]]
        received = len(chunks[0])
        while received < size:
            chunk = sock.recv(min(1 << 20, size - received))
            if not chunk:
                raise RuntimeError("the job order was cut short")
            chunks.append(chunk)
            received += len(chunk)
    finally:
        sock.detach()
        os.close(control_fd)
    # The parent is this process's own creator: its bytes are as trusted as our code.
    return pickle.loads(b"".join(chunks)), (fds[0], fds[1], fds[2])


def _report(fd: int, kind: bytes, message: str) -> None:
    try:
        os.write(fd, kind + message.encode(errors="replace")[:4000])
    except OSError:
        pass


# Dispositions the job must start with: Python ignores SIGPIPE and SIGXFSZ, and an ignored
# disposition survives execve.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                    signal.SIGUSR1, signal.SIGUSR2)


def _take_job_limits(order: JobOrder) -> None:
    """What the job inherits from this process (already its uid, with no capabilities and
    under its seccomp filter): its rlimits. The job then needs only a vfork-style spawn,
    with no Python between fork and exec."""
    for limit, soft, hard in order.rlimits:
        resource.setrlimit(limit, (soft, hard))


def _spawn_job(order: JobOrder, stdio: tuple[int, int, int]) -> int:
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in set(stdio) if fd > 2]
    # setsid: no controlling terminal, so TIOCSTI has nothing to inject into.
    return os.posix_spawnp(order.argv[0], order.argv, order.env, file_actions=actions, setsid=True,
                           setsigdef=_DEFAULT_SIGNALS)


def _prepare(plan: ContainerPlan, fds: ChildFds, join_cgroup: Callable[[], None]) -> None:
    """Phase 1: every privileged step, ending as the job's user with no capabilities."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    ignore_job_signals()
    # Nothing of the launcher's stdio may reach into the container.
    null_fd = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null_fd, target)
    os.close(null_fd)
    # Creating and joining a cgroup takes milliseconds on v1 (an RCU grace period): done
    # here, while the parent writes our id maps, it stalls no one.
    join_cgroup()
    if os.read(fds.go, 1) != b"g":
        os._exit(125)  # the parent gave up (or died) before we were set up
    os.close(fds.go)
    # Ours to own from here: no one outside may ptrace us or read our memory.
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    become_setup_identity(plan.id_mapping)
    # The job's cgroup, joined above, becomes the root of its view.
    libc.unshare((UNSHARE_FLAGS & ~libc.CLONE_NEWNET if plan.network else UNSHARE_FLAGS) | libc.CLONE_NEWCGROUP)
    build_rootfs(plan.rootfs)
    if not plan.network:
        bring_up_loopback(plan.loopback_request)
    libc.sethostname(plan.hostname)
    become_job_user(plan.id_mapping, plan.rootfs.job_uid, plan.rootfs.job_gid, plan.last_capability)
    # A uid change resets dumpability; the job will share our uid and must not read our memory.
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    # What remains (the order, input files, rlimits, the spawn, reaping) is what any job may
    # do. Loaded here, the kernel's check and JIT of the filter happen before the order.
    libc.seccomp_set_filter(plan.seccomp_bpf)


def container_main(plan: ContainerPlan, fds: ChildFds, join_cgroup: Callable[[], None]) -> NoReturn:
    """Entry point of the cloned child, PID 1 of the new namespaces. Never returns.
    join_cgroup creates the job's cgroup and moves this process into it."""
    # A collection would write to every object the launcher had, copying its pages into
    # this short-lived process.
    gc.disable()
    try:
        libc.set_process_name("sbx-init")
        _prepare(plan, fds, join_cgroup)
        os.write(fds.control, READY)
        order, stdio = _receive_order(fds.control)
        for input_file in order.files:
            write_input_file(plan.rootfs.workdir, input_file.path, input_file.content, input_file.mode)
        _take_job_limits(order)
    except BaseException as error:  # noqa: BLE001
        _report(fds.report, REPORT_SETUP_FAILED, f"building the container: {error!r}")
        os._exit(125)
    try:
        job_pid = _spawn_job(order, stdio)
    except OSError as error:
        _report(fds.report, REPORT_EXEC_FAILED, f"{error.errno}:{order.argv[0]}: {error.strerror}")
        os._exit(127)
    for fd in stdio:
        os.close(fd)
    run_init(job_pid, fds.report)
