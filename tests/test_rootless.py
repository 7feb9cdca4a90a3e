"""`sandboxd setup --user NAME` for real: a throwaway system user, delegated cgroups, a state
directory and /etc/subuid ranges, then that user creating and capping a job cgroup itself.

The fixture creates the user with useradd and, afterwards, deletes it, removes the cgroups
and directories setup made, and restores /etc/subuid, /etc/subgid (and the backup copies the
shadow tools write) byte for byte.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import os
import pwd
import shutil
import stat
import subprocess
import traceback
from typing import Any, Callable

import pytest

from conftest import limits, own_dirs
import sandboxd.runtime.cgroup_v1  # noqa: F401  (imported before switching to the test user)
import sandboxd.runtime.cgroup_v2  # noqa: F401
from sandboxd.rootless import SetupError, enter_delegated_cgroup, first_free_base, setup_user
from sandboxd.runtime.cgroup import CgroupError, detect_driver, is_pure_v2, rmdir_cgroup
from sandboxd.state import SYSTEM_STATE_DIR, user_state_dir_for

MiB = 1 << 20
BASE = f"sandboxd-rootless-test-{os.getpid()}"
root_only = pytest.mark.root_only
skip_unless_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates a user, chowns cgroups, edits /etc/subuid"
)
SNAPSHOT = (
    "/etc/subuid", "/etc/subgid", "/etc/subuid-", "/etc/subgid-",
    "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-",
)




@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def _snapshot(path: str) -> tuple[bytes, int, int, int] | None:
    try:
        info = os.stat(path)
        with open(path, "rb") as file:
            return file.read(), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid
    except FileNotFoundError:
        return None


def _restore(path: str, saved: tuple[bytes, int, int, int] | None) -> None:
    if saved is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    data, mode, uid, gid = saved
    if _snapshot(path) == saved:
        return
    with open(path, "wb") as file:
        file.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


@pytest.fixture
def user():
    name = f"sbxt{os.getpid() % 1_000_000}"
    saved = {path: _snapshot(path) for path in SNAPSHOT}
    state_dirs = [str(SYSTEM_STATE_DIR), str(SYSTEM_STATE_DIR / "users")]
    state_existed = {path: os.path.isdir(path) for path in state_dirs}
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        for own in own_dirs():
            rmdir_cgroup(os.path.join(own, BASE))
        shutil.rmtree(user_state_dir_for(name), ignore_errors=True)
        for path in reversed(state_dirs):
            if not state_existed[path]:
                try:
                    os.rmdir(path)
                except OSError as error:
                    if error.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                        raise
        subprocess.run(["userdel", name], check=True, capture_output=True)
        for path, content in saved.items():
            _restore(path, content)
    # nothing left behind
    assert not [own for own in own_dirs() if os.path.exists(os.path.join(own, BASE))]
    assert not os.path.exists(user_state_dir_for(name))
    assert {path: _snapshot(path) for path in SNAPSHOT} == saved
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


def run_as(account: User, body: Callable[[], Any], enter_cgroup: bool = False) -> Any:
    """Run body() in a forked child that has become `account` (no supplementary groups)."""
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(out_r)
            if enter_cgroup:
                enter_delegated_cgroup(account.name, base=BASE)  # v2 only; no-op on v1
            os.setgroups([])
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
            os.write(out_w, repr(body()).encode())
        except BaseException:
            os.write(out_w, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(out_w)
    chunks = []
    while chunk := os.read(out_r, 65536):
        chunks.append(chunk)
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"as {account.name}:\n{text}"
    return ast.literal_eval(text)


def subid_entries(path: str) -> list[tuple[str, int, int]]:
    with open(path) as file:
        fields = [line.strip().split(":") for line in file if line.strip()]
    return [(name, int(start), int(count)) for name, start, count in fields]


def delegated_dirs(account: User) -> list[str]:
    if is_pure_v2():
        return [os.path.join(own_dirs()[0], BASE, f"user-{account.name}")]
    return [os.path.join(own, BASE, f"user-{account.name}") for own in own_dirs()]


def try_to_create_a_job() -> str:
    try:
        detect_driver(BASE)
    except CgroupError as error:
        return str(error)
    return "no error"


def use_the_driver() -> dict[str, Any]:
    driver = detect_driver(BASE)
    job = driver.create("rootless", limits(memory_bytes=80 * MiB, pids=6, cpus=0.5))
    hold_r, hold_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(0)
    try:
        job.attach(worker)
        files = {}
        for directory in dict.fromkeys(job.dirs.values()):
            for name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us", "cpu.max"):
                path = os.path.join(directory, name)
                if os.path.exists(path):
                    files[name] = open(path).read().strip()
        owners = {os.stat(d).st_uid for d in job.dirs.values()}
        stats = job.stats()
        return {"version": driver.version, "files": files, "owners": sorted(owners),
                "pids_peak": stats.pids_peak, "cpu": job.cpu_time_ns() >= 0}
    finally:
        os.close(hold_r)
        os.close(hold_w)
        job.remove()
        os.waitpid(worker, 0)
        assert not [d for d in job.dirs.values() if os.path.exists(d)]


def write_to_state_dir() -> bool:
    path = user_state_dir_for(pwd.getpwuid(os.getuid()).pw_name) / "probe"
    path.write_text("ok")
    path.unlink()
    return True


@root_only
@skip_unless_root
def test_setup_user_delegates_prepares_and_is_idempotent(user):
    before = run_as(user, try_to_create_a_job)
    assert "sandboxd setup --user" in before or "Delegate=" in before, before

    lines = setup_user(user.name, base=BASE)
    text = "\n".join(lines)
    assert "nothing to do" not in text

    for directory in delegated_dirs(user):
        files = ["tasks", "cgroup.procs"] if not is_pure_v2() else [
            "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"]
        for path in [directory] + [os.path.join(directory, f) for f in files]:
            assert os.stat(path).st_uid == user.uid, path
        assert directory in text

    state = user_state_dir_for(user.name)
    info = os.lstat(state)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert (info.st_uid, info.st_gid) == (user.uid, user.gid)
    assert run_as(user, write_to_state_dir) is True

    ranges = {}
    for path in ("/etc/subuid", "/etc/subgid"):
        entries = subid_entries(path)
        mine = [e for e in entries if e[0] == user.name]
        assert len(mine) == 1 and mine[0][2] == 65536 and mine[0][1] >= 100000, mine
        start = mine[0][1]
        for name, other, count in entries:
            if name != user.name:
                assert other + count <= start or other >= start + 65536
        ranges[path] = start
    assert ranges["/etc/subuid"] == ranges["/etc/subgid"]

    files = {path: (os.stat(path).st_ino, _snapshot(path)) for path in ("/etc/subuid", "/etc/subgid")}
    again = setup_user(user.name, base=BASE)
    assert again[-1].startswith("nothing to do"), again
    assert all(line.startswith(("unchanged", "note", " ", "nothing")) for line in again), again
    assert {path: (os.stat(path).st_ino, _snapshot(path)) for path in files} == files

    used = run_as(user, use_the_driver, enter_cgroup=True)
    assert used["owners"] == [user.uid]
    if used["version"] == 1:
        assert used["files"]["memory.limit_in_bytes"] == str(80 * MiB)
        assert used["files"]["cpu.cfs_quota_us"] == "50000"
    else:
        assert used["files"]["memory.max"] == str(80 * MiB)
        assert used["files"]["cpu.max"] == "50000 100000"
    assert used["files"]["pids.max"] == "6"
    assert used["pids_peak"] in (1, -1)


@root_only
@skip_unless_root
def test_subid_range_goes_to_the_first_free_base(user):
    with open("/etc/subuid", "a") as file:
        file.write("sbxt-other-a:100000:65536\n")
    with open("/etc/subgid", "a") as file:
        file.write("sbxt-other-b:165536:100000\n")
    os.chmod("/etc/subgid", 0o640)
    lines = setup_user(user.name, base=BASE)
    assert f"added {user.name}:265536:65536 to /etc/subuid" in lines
    assert f"added {user.name}:265536:65536 to /etc/subgid" in lines
    assert stat.S_IMODE(os.stat("/etc/subgid").st_mode) == 0o640
    assert ("sbxt-other-a", 100000, 65536) in subid_entries("/etc/subuid")


@root_only
@skip_unless_root
def test_setup_refuses_unknown_users_and_non_root(user):
    with pytest.raises(SetupError, match="no user named 'sbxt-no-such-user'"):
        setup_user("sbxt-no-such-user")
    with pytest.raises(SetupError, match="not a valid user name"):
        setup_user("../etc")

    def as_user() -> str:
        try:
            setup_user(user.name, base=BASE)
        except SetupError as error:
            return str(error)
        return "no error"

    assert "must run as root" in run_as(user, as_user)


def test_first_free_base():
    assert first_free_base([]) == 100000
    assert first_free_base([(100000, 65536)]) == 165536
    assert first_free_base([(0, 1000), (300000, 10)]) == 100000
    assert first_free_base([(150000, 10)]) == 150010
    assert first_free_base([(165536, 65536), (100000, 65536)]) == 231072
    assert first_free_base([(100000, 10), (100005, 10), (400000, 1)]) == 100015
