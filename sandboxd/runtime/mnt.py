"""The container's filesystem: a size-capped tmpfs for the writable layers, the image's
read-only lower dirs under OverlayFS, fresh /proc and /dev, then pivot_root into it.

Runs in the container's init, inside its own user and mount namespaces, before any job
code: nothing here touches the host's mount table.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from sandboxd.images import ImageMount
from sandboxd.runtime.libc import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    pivot_root,
    umount2,
)

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"))
# /proc entries that leak host information or offer host-wide knobs (runc's list).
PROC_MASKED_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug")
PROC_MASKED_DIRS = ("acpi", "asound", "scsi")
PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")


class MountPlanError(ValueError):
    """An image or a path cannot be given to OverlayFS."""


# OverlayFS stacks at most this many lower layers in one mount (OVL_MAX_STACK).
OVERLAY_MAX_LOWER_LAYERS = 500
# mount(2) copies one page of options and cuts off the rest: a lowerdir list of the store's
# absolute paths (~80 bytes each) would overflow it at a few dozen layers. So each lower dir
# is opened and named by its descriptor, relative to our /proc/self/fd (a few bytes each).
_FD_DIR = "/proc/self/fd"
_FD_NAME_BYTES = 5  # what the plan allows per lower dir: a descriptor number below 10000, ':'
_LOWER_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _overlay_options(lower_names: list[str], upper: str, work: str) -> str:
    return f"lowerdir={':'.join(lower_names)},upperdir={upper},workdir={work},userxattr"


def _check_options_size(options: str, target: str, layer_count: int) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    if len(options.encode()) >= page:  # the last byte of the page is the terminating NUL
        raise MountPlanError(f"the overlay at {target} with {layer_count} layers needs {len(options.encode())} "
                             f"bytes of mount options, more than the limit of {page - 1}")


@dataclass(frozen=True)
class RootfsPlan:
    scratch_dir: str  # an existing empty host directory; our tmpfs is mounted over it, privately
    image_mounts: tuple[ImageMount, ...]
    writable_layer_bytes: int
    shm_bytes: int
    workdir: str  # the job's, made its own; an image build's step's is made if missing
    job_uid: int
    job_gid: int
    upper_dir: str | None = None  # an image build's step: writable layers here, kept after it

    def __post_init__(self) -> None:
        if not self.image_mounts or self.image_mounts[0].target != "/":
            raise MountPlanError("an image's first mount must be its root '/'")
        # upperdir and workdir are paths below one of these, in the options OverlayFS parses:
        # it splits them on ',' and unescapes '\\' (':' splits only lowerdir, whose entries
        # are descriptor numbers).
        layers = self.upper_dir or self.scratch_dir
        if not layers.startswith("/") or any(char in layers for char in ",\\"):
            raise MountPlanError(f"path {layers!r} cannot be used in an overlay mount")
        for index, image_mount in enumerate(self.image_mounts):
            if not image_mount.target.startswith("/"):
                raise MountPlanError(f"mount point {image_mount.target!r} is not an absolute path")
            if not image_mount.lowerdirs:
                raise MountPlanError(f"the overlay at {image_mount.target} has no layers")
            for path in image_mount.lowerdirs:
                if not path.startswith("/"):
                    raise MountPlanError(f"layer {path!r} is not an absolute path")
            count = len(image_mount.lowerdirs)
            if count > OVERLAY_MAX_LOWER_LAYERS:
                raise MountPlanError(f"the overlay at {image_mount.target} has {count} layers, more than "
                                     f"OverlayFS's limit of {OVERLAY_MAX_LOWER_LAYERS}")
            options = _overlay_options(["9" * (_FD_NAME_BYTES - 1)] * count, f"{layers}/upper{index}",
                                       f"{layers}/work{index}")
            _check_options_size(options, image_mount.target, count)


def _open_lower_dirs(paths: tuple[str, ...]) -> list[int]:
    """O_PATH descriptors of the lower dirs, top first; none of them a symlink."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(paths) + 64  # and what this process has open
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        # Ours alone: the job's own limits replace this process's before it starts.
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    fds: list[int] = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, _LOWER_FLAGS))
            except OSError as error:
                raise OSError(error.errno, f"layer {path}: {error.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _mount_overlays(plan: RootfsPlan, root: str) -> None:
    """The overlays, each over descriptors of its lower dirs that OverlayFS resolves, at
    mount time, through the magic links in our /proc/self/fd: our mount namespace is a copy
    of the host's, so /proc is still the host's proc (it sees us, as it sees its own pid
    namespace's descendants). The links are checked to lead to what was opened."""
    try:
        os.chdir(_FD_DIR)
    except OSError as error:
        raise OSError(error.errno, f"{_FD_DIR}, where an image's layers are named: {error.strerror}") from None
    try:
        for index, image_mount in enumerate(plan.image_mounts):
            layers = plan.upper_dir or plan.scratch_dir
            upper = f"{layers}/upper{index}"
            work = f"{layers}/work{index}"
            os.mkdir(upper, 0o755)
            os.mkdir(work, 0o700)
            target = root if image_mount.target == "/" else root + image_mount.target
            fds = _open_lower_dirs(image_mount.lowerdirs)
            try:
                for fd, path in zip(fds, image_mount.lowerdirs):
                    opened = os.fstat(fd)
                    try:
                        seen = os.stat(str(fd))
                    except OSError:
                        seen = None
                    if seen is None or (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
                        raise MountPlanError(f"{_FD_DIR}/{fd} does not lead to the layer {path} opened as it")
                options = _overlay_options([str(fd) for fd in fds], upper, work)
                _check_options_size(options, image_mount.target, len(fds))
                mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, options)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        os.chdir("/")


def _mount_proc(root: str) -> None:
    proc = f"{root}/proc"
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in PROC_MASKED_FILES:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)
    for name in PROC_MASKED_DIRS:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0")
    for name in PROC_READ_ONLY:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            mount(path, path, None, MS_BIND | MS_REC)
            mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _mount_dev(plan: RootfsPlan, root: str) -> None:
    dev = f"{root}/dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in DEVICES:
        node = f"{dev}/{name}"
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o666))
        # Bind mounts of the host's nodes: a user namespace may not mknod real devices.
        mount(f"/dev/{name}", node, None, MS_BIND)
    for name, target in DEV_SYMLINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={plan.shm_bytes},mode=1777")


def build_rootfs(plan: RootfsPlan) -> None:
    """Assemble the container's root and pivot into it; afterwards '/' is the container."""
    # Our mounts must never propagate back to the host, nor the host's into us.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", plan.scratch_dir, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={plan.writable_layer_bytes},mode=0755")
    root = f"{plan.scratch_dir}/root"
    os.mkdir(root, 0o755)
    _mount_overlays(plan, root)
    for mount_point in ("proc", "dev"):  # an image built FROM scratch may have neither
        if not os.path.isdir(f"{root}/{mount_point}"):
            os.mkdir(f"{root}/{mount_point}", 0o755)
    _mount_proc(root)
    _mount_dev(plan, root)
    workdir = f"{root}{plan.workdir}"
    if plan.upper_dir is None:
        os.makedirs(workdir, 0o755, exist_ok=True)
        os.chown(workdir, plan.job_uid, plan.job_gid)
    elif not os.path.isdir(workdir):
        os.makedirs(workdir, 0o755)  # as Docker's WORKDIR: the container's root owns it
    os.chdir(root)
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir(plan.workdir)


def write_input_file(workdir: str, relative_path: str, content: bytes, mode: int) -> None:
    """Write a copied-in file below the work directory, inside the container, as the job's
    user (so it owns what it was given). Walks with O_NOFOLLOW so nothing can redirect the
    write; the path was validated at the edge.
    """
    directory_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        *parents, name = relative_path.split("/")
        for part in parents:
            try:
                os.mkdir(part, 0o755, dir_fd=directory_fd)
            except FileExistsError:
                pass
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory_fd)
            os.close(directory_fd)
            directory_fd = next_fd
        file_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode & 0o777,
                          dir_fd=directory_fd)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(file_fd, view):]
            os.fchmod(file_fd, mode & 0o777)
        finally:
            os.close(file_fd)
    finally:
        os.close(directory_fd)
