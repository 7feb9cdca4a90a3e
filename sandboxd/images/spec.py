"""Image spec files: a Dockerfile subset, parsed into typed instructions.

Users already know how to write a Dockerfile, so an image spec is one, restricted to what a
rootless, single-stage builder can do faithfully:

    FROM scratch | host | NAME[:TAG] | [REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]
    RUN [--network=default|none] shell command      -> ["/bin/sh", "-c", "shell command"]
    RUN [--network=default|none] ["exec", "form"]   -> that argv (network is off unless asked)
    COPY [--chown=UID[:GID]] [--chmod=OCTAL] SRC... DEST     (or a JSON array of SRC... DEST)
    ENV KEY=VALUE...   or the legacy   ENV KEY rest of the line
    WORKDIR PATH
    LABEL KEY=VALUE...
    USER UID[:GID]

Keywords are case-insensitive; `#` starts a comment line; a line ending in a backslash continues
on the next one (comment and blank lines inside a continued instruction are skipped, as Docker
does). Quoting in COPY, ENV, LABEL and WORKDIR follows Docker's: single quotes are literal,
inside double quotes a backslash escapes only `"`, `$` and itself, elsewhere it escapes any
character. A RUN or COPY argument that parses as a JSON array is the exec (JSON) form; one that
does not (`RUN [ -f x ] && ...`) is the shell form, as in Docker.

Left out on purpose:
- Multi-stage builds (a second FROM, `FROM x AS y`): one spec is one image.
- ARG and `$VAR` substitution: `$VAR` is kept literally in COPY, ENV, LABEL and WORKDIR
  (RUN's shell expands it at build time, from the ENV set so far). Keeping text literal makes a
  spec mean the same thing wherever it is built.
- ADD: its URL downloads and archive unpacking are implicit network and file-format magic;
  COPY (and RUN for fetching) say what happens.
- User and group names in USER and COPY --chown: resolving them needs the image's /etc/passwd at
  build time; numeric ids need nothing.
- CMD, ENTRYPOINT, EXPOSE, VOLUME, HEALTHCHECK, STOPSIGNAL, SHELL, ONBUILD, MAINTAINER: a job
  brings its own argv and the sandbox has no ports, volumes or health checks.
- Parser directives (`# syntax=`, `# escape=`) are plain comments: the escape is always `\\`.

Parsing is pure: the caller reads the file and passes its text and a display name, which starts
every error message as "NAME:LINE: " (LINE 0 when the whole file is at fault). WORKDIR and
relative COPY destinations are resolved at parse time against the WORKDIR so far, starting at
"/" (the base image's WORKDIR is not consulted, so a spec reads the same on any base).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sandboxd.images.reference import REFERENCE_RE

MAX_SPEC_BYTES = 1 << 20  # the whole spec, UTF-8 encoded
MAX_INSTRUCTIONS = 1000
MAX_LINE_BYTES = 64 << 10  # one instruction, continuations joined

# Docker's whitespace between words (not str.split's, which also splits on NBSP and friends).
_BLANKS = " \t\r\f\v"
_CONTINUATION = re.compile(r"\\[ \t]*$")
_HEAD = re.compile(r"([^ \t\r\f\v]+)[ \t\r\f\v]*(.*)", re.DOTALL)
_FLAG = re.compile(r"--([^ \t\r\f\v=]*)(?:=([^ \t\r\f\v]*))?(?:[ \t\r\f\v]+|$)")

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9./-]+")
_IDS = re.compile(r"([0-9]+)(?::([0-9]+))?")
_OCTAL_MODE = re.compile(r"[0-7]{1,4}")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2), so it is no one's id


_UNSUPPORTED: dict[str, str] = {
    "ADD": "use COPY (ADD's URL downloads and archive unpacking are left out on purpose)",
    "ARG": "there is no variable substitution; write the value where it is used",
    "CMD": "a job brings its own argv",
    "ENTRYPOINT": "a job brings its own argv",
    "EXPOSE": "sandboxes have no ports to publish",
    "VOLUME": "sandboxes have no volumes",
    "HEALTHCHECK": "sandboxes have no health checks",
    "STOPSIGNAL": "the sandbox decides how a job is stopped",
    "SHELL": "RUN's shell form always uses /bin/sh -c",
    "ONBUILD": "an image does not add steps to the builds based on it",
    "MAINTAINER": "use LABEL",
}


class SpecError(ValueError):
    """The spec is malformed or uses something unsupported; the message starts "NAME:LINE: "."""


@dataclass(frozen=True, kw_only=True)
class Instruction:
    line: int  # 1-based line where the instruction starts
    keyword: str  # upper-case
    text: str  # as written, continuations joined: for build output and cache keys


@dataclass(frozen=True, kw_only=True)
class From(Instruction):
    image: str


@dataclass(frozen=True, kw_only=True)
class Run(Instruction):
    argv: tuple[str, ...]
    network: bool


@dataclass(frozen=True, kw_only=True)
class Copy(Instruction):
    sources: tuple[str, ...]  # relative to the build context, as written
    destination: str  # absolute, normalised; ends in "/" when it names a directory
    chown: tuple[int, int] | None  # (uid, gid)
    chmod: int | None


@dataclass(frozen=True, kw_only=True)
class Env(Instruction):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Workdir(Instruction):
    path: str  # absolute, normalised


@dataclass(frozen=True, kw_only=True)
class Label(Instruction):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class User(Instruction):
    uid: int
    gid: int


@dataclass(frozen=True)
class Spec:
    base: From
    steps: tuple[Instruction, ...]  # everything after FROM, in order


class _Reject(Exception):
    """A problem with one instruction; parse_spec adds the name and line."""


def parse_spec(text: str, name: str = "Imagefile") -> Spec:
    size_bytes = len(text.encode("utf-8", "surrogatepass"))
    if size_bytes > MAX_SPEC_BYTES:
        raise SpecError(f"{name}:0: the spec is {size_bytes} bytes, more than the limit of {MAX_SPEC_BYTES}")
    base: From | None = None
    steps: list[Instruction] = []
    workdir = "/"
    for count, (line, instruction_text) in enumerate(_logical_lines(text), start=1):
        try:
            if count > MAX_INSTRUCTIONS:
                raise _Reject(f"more than {MAX_INSTRUCTIONS} instructions")
            instruction = _parse_instruction(line, instruction_text, workdir)
            if isinstance(instruction, From):
                if base is not None:
                    raise _Reject("multi-stage builds are not supported: a spec has exactly one FROM "
                                  f"(the first is on line {base.line})")
                base = instruction
                continue
            if base is None:
                raise _Reject(f"the first instruction must be FROM, not {instruction.keyword}")
            if isinstance(instruction, Workdir):
                workdir = instruction.path
            steps.append(instruction)
        except _Reject as reason:
            raise SpecError(f"{name}:{line}: {reason}") from None
    if base is None:
        raise SpecError(f"{name}:0: no FROM instruction: the spec is empty")
    return Spec(base=base, steps=tuple(steps))


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (first line number, instruction text) with continuations joined, comments dropped."""
    lines = text.removeprefix("\ufeff").split("\n")  # editors on Windows write a BOM; Docker drops it
    index = 0
    while index < len(lines):
        physical = lines[index].removesuffix("\r")
        index += 1
        if _is_blank_or_comment(physical):
            continue
        start = index
        parts: list[str] = []
        continued = _CONTINUATION.search(physical)
        while continued is not None:
            parts.append(physical[:continued.start()])
            while index < len(lines) and _is_blank_or_comment(lines[index].removesuffix("\r")):
                index += 1
            if index == len(lines):  # a backslash on the last line continues into nothing
                physical = ""
                break
            physical = lines[index].removesuffix("\r")
            index += 1
            continued = _CONTINUATION.search(physical)
        parts.append(physical)
        joined = "".join(parts).strip(_BLANKS)
        yield start, joined


def _is_blank_or_comment(physical: str) -> bool:
    stripped = physical.lstrip(_BLANKS)
    return not stripped or stripped.startswith("#")


def _parse_instruction(line: int, text: str, workdir: str) -> Instruction:
    line_bytes = len(text.encode("utf-8", "surrogatepass"))
    if line_bytes > MAX_LINE_BYTES:
        raise _Reject(f"the instruction is {line_bytes} bytes, more than the limit of {MAX_LINE_BYTES}")
    if "\0" in text:
        raise _Reject("the instruction contains a NUL character")
    head = _HEAD.fullmatch(text)
    assert head is not None  # text is stripped and not empty
    keyword = head.group(1).upper()
    if keyword in _UNSUPPORTED:
        raise _Reject(f"{keyword} is not supported: {_UNSUPPORTED[keyword]}")
    parser = _PARSERS.get(keyword)
    if parser is None:
        raise _Reject(f"unknown instruction {head.group(1)!r}")
    return parser(line, text, head.group(2), workdir)


def _split_flags(keyword: str, rest: str, allowed: frozenset[str]) -> tuple[dict[str, str], str]:
    """Take Docker-style leading `--name=value` words off `rest`."""
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        match = _FLAG.match(rest)
        assert match is not None  # any word starting with "--" matches
        flag, value = match.group(1), match.group(2)
        if flag not in allowed:
            supported = ", ".join(f"--{name}" for name in sorted(allowed)) or "none"
            raise _Reject(f"{keyword} flag --{flag} is not supported (supported: {supported})")
        if value is None or value == "":
            raise _Reject(f"{keyword} flag --{flag} needs a value: --{flag}=VALUE")
        if flag in flags:
            raise _Reject(f"{keyword} flag --{flag} is given twice")
        flags[flag] = value
        rest = rest[match.end():]
    return flags, rest


def _json_array(keyword: str, rest: str) -> list[str] | None:
    """The exec form's strings if `rest` is a JSON array, None for the shell form."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:  # e.g. `RUN [ -f /etc/x ] && ...`: Docker runs that as a shell command
        return None
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise _Reject(f"{keyword}'s exec form must be a non-empty JSON array of strings")
    if any("\0" in item for item in value):
        raise _Reject(f"{keyword}'s exec form contains a NUL character")
    return value


def _split_words(rest: str) -> list[str]:
    """Split on unquoted blanks, keeping quotes and escapes in the words (see _unquote)."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    index = 0
    while index < len(rest):
        char = rest[index]
        index += 1
        if not quote and char in _BLANKS:
            if word:
                words.append("".join(word))
                word = []
            continue
        word.append(char)
        if char == "\\" and quote != "'" and index < len(rest):
            word.append(rest[index])
            index += 1
        elif not quote and char in "'\"":
            quote = char
        elif char == quote:
            quote = ""
    if word:
        words.append("".join(word))
    return words


def _unquote(word: str) -> str:
    """Remove quotes and escapes as Docker's shell-word lexer does, without `$` expansion."""
    out: list[str] = []
    quote = ""
    index = 0
    while index < len(word):
        char = word[index]
        index += 1
        if quote == "'":
            if char == "'":
                quote = ""
            else:
                out.append(char)
        elif quote == '"':
            if char == '"':
                quote = ""
            elif char == "\\" and index < len(word) and word[index] in '"$\\':
                out.append(word[index])
                index += 1
            else:
                out.append(char)  # other backslashes inside double quotes stay, as in Docker
        elif char in "'\"":
            quote = char
        elif char == "\\":
            if index < len(word):  # a lone trailing backslash is dropped, as in Docker
                out.append(word[index])
                index += 1
        else:
            out.append(char)
    if quote:
        raise _Reject(f"unterminated {quote} quote in {word!r}")
    return "".join(out)


def _absolute(path: str) -> str:
    # posixpath.normpath keeps a leading "//" (POSIX leaves its meaning open); we do not.
    return "/" + posixpath.normpath(path).lstrip("/")


def _numeric_ids(keyword: str, value: str) -> tuple[int, int]:
    match = _IDS.fullmatch(value)
    if match is None:
        raise _Reject(f"{keyword} needs a numeric UID[:GID], not {value!r}: user and group names are "
                      "not supported (there is no passwd lookup at build time)")
    uid = int(match.group(1))
    gid = uid if match.group(2) is None else int(match.group(2))
    if uid > _MAX_ID or gid > _MAX_ID:
        raise _Reject(f"{keyword}: id out of range in {value!r} (at most {_MAX_ID})")
    return uid, gid


def _parse_from(line: int, text: str, rest: str, workdir: str) -> From:
    _split_flags("FROM", rest, frozenset())
    words = rest.split()
    if len(words) >= 2 and words[1].upper() == "AS":
        raise _Reject("FROM ... AS names a build stage: multi-stage builds are not supported")
    if len(words) != 1:
        raise _Reject("FROM takes exactly one image")
    image = words[0]
    if image not in ("scratch", "host") and not REFERENCE_RE.fullmatch(image):
        raise _Reject(f"invalid image reference {image!r}: expected scratch, host, NAME[:TAG] or "
                      "[REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST], with lower-case names")
    return From(line=line, keyword="FROM", text=text, image=image)


def _parse_run(line: int, text: str, rest: str, workdir: str) -> Run:
    flags, command = _split_flags("RUN", rest, frozenset({"network"}))
    network = flags.get("network", "none")
    if network not in ("default", "none"):
        raise _Reject(f"RUN --network={network} is not supported: use --network=default or --network=none")
    if not command:
        raise _Reject("RUN needs a command")
    argv = _json_array("RUN", command)
    if argv is None:
        argv = ["/bin/sh", "-c", command]
    return Run(line=line, keyword="RUN", text=text, argv=tuple(argv), network=network == "default")


def _parse_copy(line: int, text: str, rest: str, workdir: str) -> Copy:
    flags, arguments = _split_flags("COPY", rest, frozenset({"chown", "chmod"}))
    paths = _json_array("COPY", arguments)
    if paths is None:
        paths = [_unquote(word) for word in _split_words(arguments)]
    if len(paths) < 2:
        raise _Reject("COPY needs at least one source and a destination")
    *sources, destination = paths
    for source in sources:
        _check_source(source)
    if not destination:
        raise _Reject("COPY: empty destination")
    if "\0" in destination:
        raise _Reject("COPY: the destination contains a NUL character")
    # The written form decides whether the destination names a directory, as in Docker.
    names_directory = destination.endswith("/") or posixpath.basename(destination) in (".", "..")
    if len(sources) > 1 and not names_directory:
        raise _Reject(f"COPY with several sources needs a directory destination ending in '/', not {destination!r}")
    resolved = _absolute(posixpath.join(workdir, destination))
    if names_directory and resolved != "/":
        resolved += "/"
    chown = _numeric_ids("COPY --chown", flags["chown"]) if "chown" in flags else None
    chmod = None
    if "chmod" in flags:
        if not _OCTAL_MODE.fullmatch(flags["chmod"]):
            raise _Reject(f"COPY --chmod needs an octal mode of up to 4 digits, not {flags['chmod']!r}")
        chmod = int(flags["chmod"], 8)
    return Copy(line=line, keyword="COPY", text=text, sources=tuple(sources), destination=resolved,
                chown=chown, chmod=chmod)


def _check_source(source: str) -> None:
    if not source:
        raise _Reject("COPY: empty source")
    if "\0" in source:
        raise _Reject("COPY: a source contains a NUL character")
    if source.startswith("/"):
        raise _Reject(f"COPY source {source!r} is absolute: sources are relative to the build context")
    if ".." in source.split("/"):
        raise _Reject(f"COPY source {source!r} has a '..' component: sources must stay inside the build context")


def _key_value_pairs(keyword: str, rest: str, key_pattern: re.Pattern[str],
                     allow_legacy: bool) -> tuple[tuple[str, str], ...]:
    words = _split_words(rest)
    if not words:
        raise _Reject(f"{keyword} needs at least one KEY=VALUE")
    if allow_legacy and "=" not in words[0]:
        # Legacy `ENV KEY the rest of the line`: one pair, the value is everything after the key.
        key = words[0]
        _check_key(keyword, key, key_pattern)
        value = rest[len(key):].strip(_BLANKS)
        if not value:
            raise _Reject(f"{keyword} {key} needs a value: write {keyword} {key}=VALUE")
        return ((key, _unquote(value)),)
    pairs: list[tuple[str, str]] = []
    for word in words:
        key, equals, value = word.partition("=")
        if not equals:
            raise _Reject(f"{keyword} expects KEY=VALUE, got {word!r}")
        _check_key(keyword, key, key_pattern)
        pairs.append((key, _unquote(value)))
    return tuple(pairs)


def _check_key(keyword: str, key: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(key):
        raise _Reject(f"invalid {keyword} key {key!r}: it must match {pattern.pattern}")


def _parse_env(line: int, text: str, rest: str, workdir: str) -> Env:
    _split_flags("ENV", rest, frozenset())
    pairs = _key_value_pairs("ENV", rest, _ENV_KEY, allow_legacy=True)
    return Env(line=line, keyword="ENV", text=text, pairs=pairs)


def _parse_label(line: int, text: str, rest: str, workdir: str) -> Label:
    _split_flags("LABEL", rest, frozenset())
    pairs = _key_value_pairs("LABEL", rest, _LABEL_KEY, allow_legacy=False)
    return Label(line=line, keyword="LABEL", text=text, pairs=pairs)


def _parse_workdir(line: int, text: str, rest: str, workdir: str) -> Workdir:
    _split_flags("WORKDIR", rest, frozenset())
    path = _unquote(rest)  # the whole rest is one path, spaces included, as in Docker
    if not path:
        raise _Reject("WORKDIR needs a path")
    return Workdir(line=line, keyword="WORKDIR", text=text, path=_absolute(posixpath.join(workdir, path)))


def _parse_user(line: int, text: str, rest: str, workdir: str) -> User:
    _split_flags("USER", rest, frozenset())
    if not rest:
        raise _Reject("USER needs a numeric UID[:GID]")
    uid, gid = _numeric_ids("USER", rest)
    return User(line=line, keyword="USER", text=text, uid=uid, gid=gid)


_PARSERS: dict[str, Callable[[int, str, str, str], Instruction]] = {
    "FROM": _parse_from,
    "RUN": _parse_run,
    "COPY": _parse_copy,
    "ENV": _parse_env,
    "WORKDIR": _parse_workdir,
    "LABEL": _parse_label,
    "USER": _parse_user,
}
