"""`sandboxd setup --user NAME`: what root prepares once so that NAME can run sandboxd rootless.

1. cgroups. Which cgroup gets delegated: the one the user's sandboxd process will compute,
   which is `<own cgroup>/<base>` for the cgroup that process sits in.
   - v1: the user's processes sit where /proc/self/cgroup shows for them; on a host where they
     are started from root's session (runuser, su, a service root starts) that is root's own
     cgroup in every hierarchy. So, per hierarchy of cpu, cpuacct, memory, pids, root creates
     `<root's own cgroup>/sandboxd/user-NAME` and chowns it and its `tasks` and `cgroup.procs`
     to the user: exactly the directory CgroupV1Driver computes for that user's process in
     that cgroup. The job directories the user creates inside (and their limit files) belong
     to the user. v1 knows no nesting rule for moving processes, so the user's own processes
     can be attached from wherever they sit. Root's own jobs stay in `sandboxd`, root-owned,
     and any number of users can be delegated beside each other.
   - v2: a process may only be moved between cgroups below a common ancestor whose
     cgroup.procs the writer may write, so the user's service must itself run inside the
     delegated cgroup. Root creates `<root's own cgroup X>/sandboxd/user-NAME` (controllers
     +cpu +memory +pids (+io) enabled in X and X/sandboxd, moving X's processes into
     X/sandboxd-service first if X holds any, as the driver does) and chowns it with its
     cgroup.procs, cgroup.threads and cgroup.subtree_control. Whoever starts the user's
     service puts it there first (enter_delegated_cgroup(), or `echo PID > .../cgroup.procs`
     as root); the user's driver then takes that directory as its own cgroup X' and lays out
     X'/sandboxd-service and X'/sandboxd/job-* below it. The better way on systemd hosts is
     systemd's own delegation; setup prints the drop-in.
2. state: /var/lib/sandboxd/users/NAME (0700, the user's), for users without a writable home
   such as `nobody` (sandboxd.state.default_state_dir() picks it up).
3. /etc/subuid and /etc/subgid: if the user has no range, one of 65536 ids at the first base
   >= 100000 that overlaps no range of either file (same base in both), written atomically
   (temporary file + rename, mode and owner kept).

Every step is idempotent: a second run changes nothing and says so.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from dataclasses import dataclass

from sandboxd.runtime.cgroup import SERVICE_LEAF, CgroupError, check_base, is_pure_v2
from sandboxd.state import user_state_dir_for

SUBID_FILES = ("/etc/subuid", "/etc/subgid")
SUBID_FIRST = 100_000
SUBID_COUNT = 65_536
SYSTEMD_DROPIN_PATH = "/etc/systemd/system/user@.service.d/delegate.conf"
SYSTEMD_DROPIN = "[Service]\nDelegate=cpu cpuset io memory pids\n"
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")


class SetupError(RuntimeError):
    """Setup cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gid: int


def setup_user(user: str, *, base: str = "sandboxd") -> list[str]:
    """Prepare `user` for rootless sandboxd (run as root); returns what was done, one line each.

    `base` is the cgroup directory name the user's driver will use (tests use their own).
    """
    if os.geteuid() != 0:
        raise SetupError("`sandboxd setup` must run as root (it chowns cgroups and /etc/subuid)")
    account = _lookup(user)
    try:
        check_base(base)
        lines = _delegate_v2(account, base) if is_pure_v2() else _delegate_v1(account, base)
    except CgroupError as error:
        raise SetupError(str(error)) from None
    lines += _prepare_state_dir(account)
    lines += _ensure_subids(account)
    if all(line.startswith(("unchanged", "note", " ")) for line in lines):
        lines.append(f"nothing to do: {user} was already set up")
    return lines


def enter_delegated_cgroup(user: str, pid: int = 0, *, base: str = "sandboxd") -> str | None:
    """As root, before starting `user`'s service: move process `pid` (0: this one) into the
    cgroup setup_user delegated to `user` on v2; returns that directory. On v1 nothing needs
    moving (None)."""
    if not is_pure_v2():
        return None
    from sandboxd.runtime.cgroup_v2 import own_unified_dir

    account = _lookup(user)
    path = os.path.join(own_unified_dir(), *check_base(base), f"user-{account.name}")
    if not os.path.isdir(path):
        raise SetupError(f"{path} does not exist: run `sandboxd setup --user {user}` first")
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as file:
            file.write(str(pid or os.getpid()))
    except OSError as error:
        raise SetupError(f"cannot move process {pid or os.getpid()} into {path}: {error.strerror}") from None
    return path


def _lookup(user: str) -> _User:
    if not _USER_NAME.fullmatch(user):
        raise SetupError(f"{user!r} is not a valid user name")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SetupError(
            f"no user named {user!r} (create it first, e.g. `useradd --system {user}`)"
        ) from None
    if entry.pw_uid == 0:
        raise SetupError(f"{user!r} is root, which needs no setup")
    return _User(user, entry.pw_uid, entry.pw_gid)


def _chown(paths: list[str], account: _User) -> bool:
    """chown each path (never following symlinks) to the user; True if any changed."""
    changed = False
    for path in paths:
        info = os.lstat(path)
        if (info.st_uid, info.st_gid) != (account.uid, account.gid):
            os.chown(path, account.uid, account.gid, follow_symlinks=False)
            changed = True
    return changed


def _make_dirs(own: str, parts: list[str]) -> tuple[str, bool]:
    """Create own/parts... (root-owned 0755 where missing); returns the last and if it was new."""
    path, created = own, False
    for part in parts:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
            created = True
        except FileExistsError:
            created = False
    return path, created


def _delegate_v1(account: _User, base: str) -> list[str]:
    from sandboxd.runtime.cgroup_v1 import controller_dirs

    lines = []
    hierarchies: dict[str, list[str]] = {}
    for controller, own in controller_dirs().items():
        hierarchies.setdefault(own, []).append(controller)
    for own, controllers in hierarchies.items():
        path, created = _make_dirs(own, check_base(base) + [f"user-{account.name}"])
        what = f"cgroup v1 {','.join(controllers)}"
        parent = os.path.dirname(path)
        if os.stat(parent).st_uid != 0:
            # Earlier versions delegated `<base>` itself; root's own jobs need it back.
            for entry in (parent, parent + "/tasks", parent + "/cgroup.procs"):
                os.chown(entry, 0, 0)
            lines.append(f"took {parent} back for root's own jobs ({what})")
        changed = _chown([path, path + "/tasks", path + "/cgroup.procs"], account)
        if created:
            lines.append(f"created {path} and delegated it to {account.name} ({what})")
        elif changed:
            lines.append(f"delegated {path} to {account.name} ({what})")
        else:
            lines.append(f"unchanged: {path} is already delegated to {account.name} ({what})")
    return lines


def _delegate_v2(account: _User, base: str) -> list[str]:
    from sandboxd.runtime.cgroup_v2 import (
        OPTIONAL,
        REQUIRED,
        _controllers,
        enable_controllers,
        own_unified_dir,
    )

    lines = []
    own = own_unified_dir()
    available = _controllers(own, "cgroup.controllers")
    missing = [c for c in REQUIRED if c not in available]
    if missing:
        raise SetupError(
            f"cgroup v2 controller(s) {', '.join(missing)} are not available in {own}; "
            "enable them in the parent cgroups (for systemd: a drop-in with Delegate=)"
        )
    wanted = [c for c in REQUIRED + OPTIONAL if c in available]
    leaf = os.path.join(own, SERVICE_LEAF)
    leaf_existed = os.path.isdir(leaf)
    before = _controllers(own, "cgroup.subtree_control")
    enable_controllers(own, wanted, leaf=SERVICE_LEAF)
    if not leaf_existed and os.path.isdir(leaf):
        lines.append(f"moved the processes of {own} into {leaf} (cgroup v2: processes only in leaves)")
    if set(wanted) - before:
        lines.append(f"enabled {' '.join('+' + c for c in wanted)} in {own}/cgroup.subtree_control")
    parent = own
    for part in check_base(base):
        parent = os.path.join(parent, part)
        try:
            os.mkdir(parent, 0o755)
            lines.append(f"created {parent}")
        except FileExistsError:
            pass
        enable_controllers(parent, wanted)
    path = os.path.join(parent, f"user-{account.name}")
    try:
        os.mkdir(path, 0o755)
        lines.append(f"created {path}")
    except FileExistsError:
        pass
    delegated = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")
    if _chown([path] + [os.path.join(path, name) for name in delegated], account):
        lines.append(f"delegated {path} to {account.name} (directory, {', '.join(delegated)})")
    else:
        lines.append(f"unchanged: {path} is already delegated to {account.name}")
    lines.append(
        f"note: cgroup v2 lets {account.name} place jobs only below the cgroup its service runs in: "
        f"start the service inside {path} (as root: `echo PID > {path}/cgroup.procs` before dropping "
        "privileges)"
    )
    lines.append(
        f"note: on systemd hosts prefer systemd's delegation instead: put this drop-in in "
        f"{SYSTEMD_DROPIN_PATH}, run `systemctl daemon-reload`, and start sandboxd as a user unit "
        "with Delegate=yes (e.g. `systemd-run --user --scope -p Delegate=yes sandboxd ...`):"
    )
    lines += ["    " + line for line in SYSTEMD_DROPIN.splitlines()]
    return lines


def _prepare_state_dir(account: _User) -> list[str]:
    path = str(user_state_dir_for(account.name))
    lines = []
    for parent in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
        try:
            os.mkdir(parent, 0o755)
            os.chmod(parent, 0o755)  # whatever the umask
            lines.append(f"created {parent}")
        except FileExistsError:
            info = os.lstat(parent)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
                raise SetupError(f"{parent} must be a directory owned by root and writable only by it")
            if info.st_mode & 0o011 != 0o011:  # the user must be able to pass through
                os.chmod(parent, stat.S_IMODE(info.st_mode) | 0o011)
                lines.append(f"fixed {parent}: others may now pass through it (o+x, g+x)")
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise SetupError(f"{path} exists and is not a directory")
    changed = _chown([path], account)
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)
        changed = True
    if created:
        lines.append(f"created the state directory {path} (mode 0700, owner {account.name})")
    elif changed:
        lines.append(f"fixed the state directory {path} (mode 0700, owner {account.name})")
    else:
        lines.append(f"unchanged: the state directory {path} is ready")
    return lines


def _read_subids(path: str) -> tuple[bytes, list[tuple[str, int, int]]]:
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        return b"", []
    entries = []
    for line in raw.decode().splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            entries.append((fields[0], int(fields[1]), int(fields[2])))
    return raw, entries


def first_free_base(ranges: list[tuple[int, int]], first: int = SUBID_FIRST, count: int = SUBID_COUNT) -> int:
    """The lowest base >= first with [base, base + count) overlapping none of (start, count)."""
    base = first
    for start, length in sorted(ranges):
        if start + length <= base:
            continue
        if start >= base + count:
            break
        base = start + length
    return base


def _write_atomically(path: str, data: bytes) -> None:
    try:
        info = os.stat(path)
        mode, uid, gid = stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid
    except FileNotFoundError:
        mode, uid, gid = 0o644, 0, 0
    temp = f"{path}.sandboxd-{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _ensure_subids(account: _User) -> list[str]:
    contents = {path: _read_subids(path) for path in SUBID_FILES}
    owners = (account.name, str(account.uid))
    lacking = [path for path, (_, entries) in contents.items() if not any(e[0] in owners for e in entries)]
    lines = []
    for path, (_, entries) in contents.items():
        if path not in lacking:
            ranges = ", ".join(f"{s}-{s + c - 1}" for name, s, c in entries if name in owners)
            lines.append(f"unchanged: {path} already gives {account.name} {ranges}")
    if not lacking:
        return lines
    used = [(start, count) for _, entries in contents.values() for _, start, count in entries]
    base = first_free_base(used)
    for path in lacking:
        raw = contents[path][0]
        if raw and not raw.endswith(b"\n"):
            raw += b"\n"
        _write_atomically(path, raw + f"{account.name}:{base}:{SUBID_COUNT}\n".encode())
        lines.append(f"added {account.name}:{base}:{SUBID_COUNT} to {path}")
    return lines


__all__ = ["SetupError", "enter_delegated_cgroup", "first_free_base", "setup_user"]
