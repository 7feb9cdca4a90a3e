"""User namespace identities: who the container's root and the job's user are on the host.

Three schemes, chosen by who runs sandboxd:
- root: container root is host root (so the service's own image layers stay readable and
  ownable), every other id maps into a high private range, and the job runs as one of those.
- unprivileged with an /etc/subuid range and newuidmap: container root is the service's own
  uid, the job runs in the subordinate range, never as the service's uid.
- unprivileged without: one id only (as bubblewrap does); the job's uid is the service's.
In every scheme the job is a non-root uid inside the container with no capabilities.
"""

from __future__ import annotations

import functools
import os
import pwd
from dataclasses import dataclass

from sandboxd.runtime.libc import PR_SET_NO_NEW_PRIVS, clear_capabilities, drop_bounding_set, prctl

# Used by root when /etc/subuid names no range for root: far above ordinary and
# subordinate ids, so a job's uid is nobody's on the host.
ROOT_DEFAULT_ID_BASE = 1_000_000_000
ID_RANGE = 65536


@dataclass(frozen=True)
class IdRange:
    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMapping:
    scheme: str  # "root", "subuid" or "single"
    uid_ranges: tuple[IdRange, ...]
    gid_ranges: tuple[IdRange, ...]
    setup_uid: int  # the container init's uid inside the namespace during set-up
    setup_gid: int

    def job_host_uid(self, job_uid: int) -> int | None:
        for id_range in self.uid_ranges:
            if id_range.inside <= job_uid < id_range.inside + id_range.count:
                return id_range.outside + job_uid - id_range.inside
        return None


def _subordinate_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    try:
        with open(path) as file:
            for line in file:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in (user, str(uid)):
                    start, count = int(fields[1]), int(fields[2])
                    if count >= 1001:
                        return start, min(count, ID_RANGE - 1)
    except (OSError, ValueError):
        return None
    return None


def choose_id_mapping(job_uid: int, job_gid: int) -> IdMapping:
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        base = ROOT_DEFAULT_ID_BASE
        subuid = _subordinate_range("/etc/subuid", "root", 0)
        subgid = _subordinate_range("/etc/subgid", "root", 0)
        uid_base = subuid[0] if subuid else base
        gid_base = subgid[0] if subgid else base
        return IdMapping(
            scheme="root",
            uid_ranges=(IdRange(0, 0, 1), IdRange(1, uid_base + 1, ID_RANGE - 1)),
            gid_ranges=(IdRange(0, 0, 1), IdRange(1, gid_base + 1, ID_RANGE - 1)),
            setup_uid=0,
            setup_gid=0,
        )
    import shutil  # imported on use: the zygote, which never calls this, stays small

    user = pwd.getpwuid(uid).pw_name
    subuid = _subordinate_range("/etc/subuid", user, uid)
    subgid = _subordinate_range("/etc/subgid", user, uid)
    if subuid and subgid and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return IdMapping(
            scheme="subuid",
            uid_ranges=(IdRange(0, uid, 1), IdRange(1, subuid[0], subuid[1])),
            gid_ranges=(IdRange(0, gid, 1), IdRange(1, subgid[0], subgid[1])),
            setup_uid=0,
            setup_gid=0,
        )
    return IdMapping(
        scheme="single",
        uid_ranges=(IdRange(job_uid, uid, 1),),
        gid_ranges=(IdRange(job_gid, gid, 1),),
        setup_uid=job_uid,
        setup_gid=job_gid,
    )


@functools.lru_cache(maxsize=16)  # the same few maps, for every container
def _map_text(ranges: tuple[IdRange, ...]) -> bytes:
    return "".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges).encode()


def _write_proc_file(pid: int, name: str, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_id_maps(pid: int, mapping: IdMapping) -> None:
    """From the parent, after the child entered its new user namespace."""
    if mapping.scheme == "subuid":
        import subprocess  # imported on use: only this scheme needs a helper process

        helpers = []
        for tool, ranges in (("newuidmap", mapping.uid_ranges), ("newgidmap", mapping.gid_ranges)):
            argv = [tool, str(pid)]
            for r in ranges:
                argv += [str(r.inside), str(r.outside), str(r.count)]
            helpers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE))
        for helper in helpers:
            _, stderr = helper.communicate()
            if helper.returncode != 0:
                raise OSError(f"{helper.args[0]} failed: {stderr.decode(errors='replace').strip()}")
        return
    if mapping.scheme == "single":
        # An unprivileged writer may map only itself, and only once setgroups is denied.
        _write_proc_file(pid, "setgroups", b"deny")
    _write_proc_file(pid, "gid_map", _map_text(mapping.gid_ranges))
    _write_proc_file(pid, "uid_map", _map_text(mapping.uid_ranges))


def become_setup_identity(mapping: IdMapping) -> None:
    """In the child, once mapped: take the namespace identity that owns the set-up."""
    os.setresgid(mapping.setup_gid, mapping.setup_gid, mapping.setup_gid)
    os.setresuid(mapping.setup_uid, mapping.setup_uid, mapping.setup_uid)


def become_job_user(mapping: IdMapping, uid: int, gid: int, last_cap: int) -> None:
    """In the job process, before exec: the job's ids, no capabilities, no new privileges."""
    if mapping.scheme != "single":
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    drop_bounding_set(last_cap)
    os.setresuid(uid, uid, uid)
    clear_capabilities()
    prctl(PR_SET_NO_NEW_PRIVS, 1)
