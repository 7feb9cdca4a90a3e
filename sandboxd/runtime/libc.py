"""Thin ctypes wrappers for the system calls Python 3.11's os module lacks.

Every wrapper raises OSError with the real errno, so callers see the kernel's reason.
"""

from __future__ import annotations

import ctypes
import os

# The C library the interpreter is linked with (ctypes.util.find_library would import
# subprocess and shutil into every process that clones containers).
_libc = ctypes.CDLL(None, use_errno=True)

CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_CLONE = 56
_SYS_PIVOT_ROOT = 155
_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_BPF_INSTRUCTION_BYTES = 8  # struct sock_filter

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.capset.argtypes = (ctypes.c_void_p, ctypes.c_void_p)


def _check(result: int, what: str) -> int:
    if result == -1:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def clone(flags: int) -> int:
    """fork() that also creates new namespaces: returns 0 in the child, its pid in the parent.

    The raw system call (no glibc wrapper, no stack): without CLONE_VM it copies the
    address space exactly as fork does. Only safe from a single-threaded process.
    """
    return _check(_libc.syscall(_SYS_CLONE, ctypes.c_ulong(flags | 17), None, None, None, None), "clone")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_filter(program: bytes) -> None:
    """Filter the calling thread (and what it execs) with a classic BPF program. Needs
    PR_SET_NO_NEW_PRIVS or CAP_SYS_ADMIN."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _BPF_INSTRUCTION_BYTES, ctypes.addressof(buffer))
    _check(_libc.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_long(_SECCOMP_SET_MODE_FILTER), ctypes.c_long(0),
                         ctypes.byref(fprog)), "seccomp(SECCOMP_SET_MODE_FILTER)")


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor above 2 but those kept (close_range(2) between them)."""
    previous = 2
    for fd in sorted(keep):
        if fd > previous + 1:
            os.closerange(previous + 1, fd)
        previous = max(previous, fd)
    os.closerange(previous + 1, 1 << 16)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        ),
        f"mount {fstype or source} on {target}",
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), f"pivot_root {new_root}"
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def set_process_name(name: str) -> None:
    """The name ps and top show (at most 15 bytes): which of our processes is which."""
    fd = os.open("/proc/thread-self/comm", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, name.encode()[:15])
    finally:
        os.close(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"


def last_capability() -> int:
    with open(_CAP_LAST_CAP_PATH) as file:
        return int(file.read())


def drop_bounding_set(last_cap: int) -> None:
    """Needs CAP_SETPCAP, so it comes before the switch away from root."""
    for cap in range(last_cap + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as error:
            if error.errno != 22:  # EINVAL: capability unknown to this kernel
                raise


def clear_capabilities() -> None:
    """Empty the ambient, inheritable, permitted and effective sets."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
