"""Seccomp policies: Docker-format JSON in policies/, compiled once with libseccomp, installed per job.

The service compiles a policy to classic BPF once per process (about 10 ms with parsing); a job's
container loads the ready bytes with a single seccomp() system call (about 0.2 ms) at the end of its
set-up, once it is the job's user without capabilities, before the job's order arrives.

Policy file format: Docker's seccomp profile (defaultAction, defaultErrnoRet, architectures,
syscalls[{names, action, args[{index, value, valueTwo, op}], errnoRet, comment}]), strictly
checked: unknown fields, actions, operators and system call names are errors, because a typo in
a security policy must not silently widen or narrow it. Differences from Docker's loader:
- ``architectures`` may only name this machine's ABI; system calls from any other ABI (i386 via
  int $0x80, x32) kill the process.
- Docker's ``includes``/``excludes`` (capabilities, kernel versions, arches) are not supported.
- Several ``args`` on the same index in one rule are refused (Docker turns them into OR-ed rules
  behind your back); write separate rules instead.
- A rule may say ``"skipUnknown": true``: its names that this libseccomp cannot resolve on this
  architecture are then left out instead of being an error (for system calls newer than the
  oldest libseccomp we support).
- With an ERRNO default, system call numbers below 512 that libseccomp cannot name get ENOSYS
  instead of the default errno: a newer libc inside an image then falls back as it would on an
  older kernel, where EPERM would be a hard failure. Both refuse the call.
- Rules whose action equals the default action are kept (runc drops them), so a refusal can be an
  exception inside a broader ALLOW rule of the same system call.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from sandboxd.policy_files import read_policy_file
from sandboxd.runtime.libc import seccomp_set_filter

try:  # the distribution's binding (python3-seccomp) where installed, else the PyPI ctypes binding
    import seccomp  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the host
    import pyseccomp as seccomp  # type: ignore[import-untyped,no-redef]


class PolicyError(ValueError):
    """A policy file is invalid; the message names the file and the entry."""


_ACTIONS = {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP", "SCMP_ACT_LOG"}
# TRACE and NOTIFY need a tracer or a listener that sandboxd does not run.
_UNSUPPORTED_ACTIONS = {"SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY"}
_OPS = {"SCMP_CMP_NE": seccomp.NE, "SCMP_CMP_LT": seccomp.LT, "SCMP_CMP_LE": seccomp.LE,
        "SCMP_CMP_EQ": seccomp.EQ, "SCMP_CMP_GE": seccomp.GE, "SCMP_CMP_GT": seccomp.GT,
        "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ}
# The install path hard-codes x86_64's seccomp() number; other hosts get a clear policy error.
_NATIVE_ARCH = ("SCMP_ARCH_X86_64" if seccomp.system_arch() == seccomp.Arch.X86_64
                else f"unsupported architecture {seccomp.system_arch():#x}")
_TOP_FIELDS = {"comment", "defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
_RULE_FIELDS = {"names", "action", "errnoRet", "args", "comment", "skipUnknown"}
_ARG_FIELDS = {"index", "value", "valueTwo", "op"}
_MAX_ERRNO = 4093  # 4094 is the compiler's placeholder for the default action, 4095 libseccomp refuses
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class ArgCmp:
    index: int
    op: str
    value: int  # the mask for SCMP_CMP_MASKED_EQ, as in Docker's format
    value_two: int  # the datum for SCMP_CMP_MASKED_EQ, else 0


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]  # resolvable on this architecture
    action: str
    errno_ret: int | None  # only for SCMP_ACT_ERRNO
    args: tuple[ArgCmp, ...]  # AND-ed
    comment: str = ""
    skipped: tuple[str, ...] = ()  # names left out under skipUnknown


@dataclass(frozen=True)
class SeccompPolicy:
    source: str  # for messages: "policies/default.json"
    default_action: str
    default_errno_ret: int | None
    rules: tuple[Rule, ...]


def _fail(where: str, message: str) -> PolicyError:
    return PolicyError(f"{where}: {message}")


def _fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return obj


def _int(value: Any, low: int, high: int, where: str) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is an int subclass: refuse it
        raise _fail(where, f"expected an integer in {low}..{high}, got {value!r}")
    return value


def _action(raw: dict[str, Any], key: str, errno_key: str, where: str) -> tuple[str, int | None]:
    """(action, errno) from raw[key] and raw[errno_key]; `where` ends with the owner's path + '.'."""
    action = raw.get(key)
    if action in _UNSUPPORTED_ACTIONS:
        raise _fail(where + key, f"{action} is not supported (sandboxd runs no tracer or listener)")
    if action not in _ACTIONS:
        raise _fail(where + key, f"unknown action {action!r} (known: {', '.join(sorted(_ACTIONS))})")
    if action != "SCMP_ACT_ERRNO":
        if errno_key in raw:
            raise _fail(where + errno_key, f"only valid with SCMP_ACT_ERRNO, not {action}")
        return action, None
    if errno_key not in raw:
        return action, errno.EPERM  # runc's default for an ERRNO without errnoRet
    return action, _int(raw[errno_key], 1, _MAX_ERRNO, where + errno_key)


def _syscall_nr(name: str) -> int:
    """This architecture's number for name, negative if libseccomp does not know it here."""
    return int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, name))


def _parse_rule(raw: Any, where: str) -> Rule:
    raw = _fields(raw, _RULE_FIELDS, where)
    action, errno_ret = _action(raw, "action", "errnoRet", where + ".")
    names = raw.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _fail(f"{where}.names", "expected a non-empty list of system call names")
    skip = raw.get("skipUnknown", False)
    if not isinstance(skip, bool):
        raise _fail(f"{where}.skipUnknown", f"expected true or false, got {skip!r}")
    unknown = [n for n in names if _syscall_nr(n) < 0]
    if unknown and not skip:
        raise _fail(f"{where}.names", f"unknown system call {unknown[0]!r} on {_NATIVE_ARCH}")
    args_raw = raw.get("args") or []
    if not isinstance(args_raw, list) or len(args_raw) > 6:
        raise _fail(f"{where}.args", "expected a list of at most 6 comparisons")
    args: list[ArgCmp] = []
    for j, arg in enumerate(args_raw):
        at = f"{where}.args[{j}]"
        arg = _fields(arg, _ARG_FIELDS, at)
        op = arg.get("op")
        if op not in _OPS:
            raise _fail(f"{at}.op", f"unknown operator {op!r} (known: {', '.join(sorted(_OPS))})")
        index = _int(arg.get("index"), 0, 5, f"{at}.index")
        value = _int(arg.get("value"), 0, _U64, f"{at}.value")
        value_two = _int(arg.get("valueTwo", 0), 0, _U64, f"{at}.valueTwo")
        if value_two and op != "SCMP_CMP_MASKED_EQ":
            raise _fail(f"{at}.valueTwo", f"only used by SCMP_CMP_MASKED_EQ, not {op}")
        if any(a.index == index for a in args):
            raise _fail(f"{at}.index", f"argument {index} is compared twice; use separate rules")
        args.append(ArgCmp(index, op, value, value_two))
    comment = raw.get("comment", "")
    if not isinstance(comment, str):
        raise _fail(f"{where}.comment", "expected a string")
    return Rule(tuple(n for n in names if n not in unknown), action, errno_ret, tuple(args),
                comment, tuple(unknown))


def parse_policy(text: str, where: str) -> SeccompPolicy:
    """Parse and check a policy; `where` (the file) starts every error message."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        raise _fail(where, f"invalid JSON: {error}") from None
    doc = _fields(doc, _TOP_FIELDS, where)
    default_action, default_errno = _action(doc, "defaultAction", "defaultErrnoRet", f"{where}: ")
    arches = doc.get("architectures", [_NATIVE_ARCH])
    if arches != [_NATIVE_ARCH]:
        raise _fail(f"{where}: architectures", f"must be [{_NATIVE_ARCH!r}] on this machine, got "
                    f"{arches!r} (other ABIs are always killed)")
    syscalls = doc.get("syscalls", [])
    if not isinstance(syscalls, list):
        raise _fail(f"{where}: syscalls", "expected a list of rules")
    rules = tuple(_parse_rule(rule, f"{where}: syscalls[{i}]") for i, rule in enumerate(syscalls))
    _check_overlaps(rules, where)
    return SeccompPolicy(where, default_action, default_errno, rules)


def _check_overlaps(rules: tuple[Rule, ...], where: str) -> None:
    """Refuse what libseccomp 2.5 would silently resolve: for one system call, a second
    unconditional rule is ignored (the first wins), and conditional rules next to an
    unconditional one are dropped whatever the order. Use an always-true comparison such as
    {"index": 1, "value": 0, "op": "SCMP_CMP_GE"} for a conditional catch-all instead."""
    unconditional: dict[str, int] = {}
    conditional: dict[str, int] = {}
    for i, rule in enumerate(rules):
        for name in rule.names:
            if rule.args:
                other = unconditional.get(name)
            else:
                other = unconditional.get(name, conditional.get(name))
            if other is not None:
                raise _fail(f"{where}: syscalls[{i}]", f"{name} already has a rule in syscalls[{other}] "
                            "and one of them is unconditional; libseccomp would silently drop one")
            (conditional if rule.args else unconditional).setdefault(name, i)


def load_policy(name: str = "default") -> SeccompPolicy:
    if not re.fullmatch(r"[a-z0-9_-]+", name):  # also keeps the name from leaving policies/
        raise PolicyError(f"seccomp policy name {name!r}: must match ^[a-z0-9_-]+$")
    where = f"policies/{name}.json"
    try:
        text = read_policy_file(f"{name}.json")
    except FileNotFoundError:
        raise PolicyError(f"{where}: no such seccomp policy") from None
    return parse_policy(text, where)


def _action_value(action: str, errno_ret: int | None) -> int:
    if action == "SCMP_ACT_ERRNO":
        assert errno_ret is not None
        return int(seccomp.ERRNO(errno_ret))
    if action in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return int(getattr(seccomp, "KILL_THREAD", seccomp.KILL))
    return int({"SCMP_ACT_ALLOW": seccomp.ALLOW, "SCMP_ACT_KILL_PROCESS": seccomp.KILL_PROCESS,
                "SCMP_ACT_TRAP": seccomp.TRAP, "SCMP_ACT_LOG": seccomp.LOG}[action])


# libseccomp refuses a rule whose action equals the filter's default (EACCES), which would make
# "ERRNO(EPERM) for TIOCSTI" impossible under an ERRNO(EPERM) default. So the filter is built
# with this otherwise unused default and its return instructions are rewritten afterwards.
_PLACEHOLDER = int(seccomp.ERRNO(4094))
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_INSN = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k;}
_BPF_MAXINSNS = 4096
_FIRST_X32_NR = 512  # numbers from here on are x32 or unused on x86_64


def _newer_than_libseccomp() -> range:
    """Numbers above the highest this libseccomp can name, up to where x32's numbers start."""
    for nr in range(_FIRST_X32_NR - 1, -1, -1):
        try:
            seccomp.resolve_syscall(seccomp.Arch.NATIVE, nr)
            return range(nr + 1, _FIRST_X32_NR)
        except ValueError:
            continue
    return range(0)


def compile_policy(policy: SeccompPolicy) -> bytes:
    """The policy as a classic BPF program: an array of struct sock_filter (8 bytes each)."""
    flt = seccomp.SyscallFilter(_PLACEHOLDER)
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)  # i386 and x32 calls
    try:
        flt.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)  # binary search over ~300 syscalls, not a list
    except (AttributeError, OSError):  # pragma: no cover - libseccomp < 2.5
        pass
    for i, rule in enumerate(policy.rules):
        action = _action_value(rule.action, rule.errno_ret)
        args = [seccomp.Arg(a.index, _OPS[a.op], a.value, a.value_two) for a in rule.args]
        for name in rule.names:
            try:
                flt.add_rule(action, name, *args)
            except OSError as error:  # e.g. two unconditional rules with different actions
                raise _fail(f"{policy.source}: syscalls[{i}]", f"{name}: libseccomp refused the rule: "
                            f"{os.strerror(error.errno or 0)}") from None
    if policy.default_action == "SCMP_ACT_ERRNO":
        for nr in _newer_than_libseccomp():
            flt.add_rule(int(seccomp.ERRNO(errno.ENOSYS)), nr)
    default = _action_value(policy.default_action, policy.default_errno_ret)
    with open(os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC), "w+b", buffering=0) as out:
        flt.export_bpf(out)
        out.seek(0)
        program = bytearray(out.read())
    for offset in range(0, len(program), _INSN.size):
        code, jt, jf, k = _INSN.unpack_from(program, offset)
        if code == _BPF_RET_K and k == _PLACEHOLDER:
            _INSN.pack_into(program, offset, code, jt, jf, default)
    if not program or len(program) % _INSN.size or len(program) // _INSN.size > _BPF_MAXINSNS:
        raise _fail(policy.source, f"compiled to an unusable BPF program of {len(program)} bytes")
    return bytes(program)


class PreparedFilter:
    """A compiled program, checked once; a job's container installs its bytes right before execve."""

    def __init__(self, bpf: bytes) -> None:
        count, rest = divmod(len(bpf), _INSN.size)
        if rest or not 0 < count <= _BPF_MAXINSNS:
            raise ValueError(f"not a classic BPF program: {len(bpf)} bytes")
        self.instructions = count
        self.bpf = bpf

    def install(self) -> None:
        """Filter the calling thread (and what it execs). Needs PR_SET_NO_NEW_PRIVS or CAP_SYS_ADMIN."""
        seccomp_set_filter(self.bpf)


def compiled_filter(name: str = "default") -> PreparedFilter:
    """Load and compile a policy once per process; call it before forking job children."""
    return _compiled(name)  # one cache key per name, however the caller spells the call


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> PreparedFilter:
    return PreparedFilter(compile_policy(load_policy(name)))
