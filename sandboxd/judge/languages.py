"""The judge's languages: the catalogue in policies/languages.toml, the jobs that compile a
submission once and run it on each test, and proof that a language works on this machine.

A language is data, not code: the file name of its source, the argv lists that compile and
run it in the job's working directory, the image they run on, their limits, and the ids the
Judge0 and Piston APIs know it by. The catalogue is read once, at start-up, and checked
strictly: an unknown key, a duplicate id or alias, an argv that is not a list of strings, a
limit past the policy's maximum all stop the service with
"languages.toml: language 'x': <what>" rather than failing a submission later. Limits are
resolved through the limit policy then (so they are valid `Limits` from there on), and the
catalogue's run overrides are kept too: a request's own limits are layered on them with
`Language.run_limits_with`.

Compile once, run many. Jobs share nothing, and a job hands back only its output, so the
compile job writes its working directory, as a tar, to its stdout (the compiler's own output
goes to its stderr, where diagnostics belong); `compiled_files` reads the tar back as the
files every test's job is given. An interpreted language without a compile step is given
just its source. `compile_job`, `compiled_files` and `run_job` are that pipeline.

Whether a language is available is a fact about this machine, not the catalogue: the image
may be missing, the toolchain not installed or broken. `probe_language` finds out as a
submission would, with real sandboxed jobs (the version command, one compile and one run of
the catalogue's probe program, whose echo of a line is checked) and answers with a
`LanguageStatus` instead of raising: a broken toolchain is a state to report, not an error.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from sandboxd.images import UnknownImageError
from sandboxd.job import InputFile, JobSpec, Result, SpecError, normalize_workdir_path
from sandboxd.judge.checkers import lines
from sandboxd.limits import LimitError, LimitPolicy, Limits, default_limit_policy
from sandboxd.policy_files import read_policy_file

CATALOGUE_FILE = "languages.toml"
ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PISTON_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+#._-]{0,63}$")
# A plain file name: no directory, not "." or "..", nothing an argv would read as an option.
SOURCE_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}$")
JUDGE0_ID_MAX = 2**31 - 1
# The line the probe program is given, and must print back.
PROBE_LINE = b"sandboxd probe: 6 * 7 = 42\n"
REASON_EXCERPT_CHARS = 300

# {name} in an argv -> its value for a job with these limits (${name}, a shell's, is left alone).
PLACEHOLDERS: dict[str, Callable[[Limits], str]] = {
    "memory_bytes": lambda limits: str(limits.memory_bytes),
}
_PLACEHOLDER_RE = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")

_REQUIRED_KEYS = ("id", "name", "image", "source_file", "run", "version", "judge0_id", "piston", "probe")
_OPTIONAL_KEYS = ("compile", "compile_limits", "run_limits", "memory_error")

# The compile job's wrapper: the compiler's stdout joins its stderr, then /work goes to stdout
# as a tar. `set -e`: a failed compile ends the job with the compiler's exit status.
_COMPILE_AND_PACK = 'set -e; "$@" >&2; exec tar -cf - .'


class LanguageError(ValueError):
    """The catalogue is malformed; the message names the language and what is wrong."""


class ArtifactError(ValueError):
    """A compile job's stdout is not the tar of plain files it should be."""


@dataclass(frozen=True)
class Language:
    id: str
    name: str
    image: str
    source_file: str  # a plain file name, in the work directory
    compile_argv: tuple[str, ...] | None  # None: the source runs as it is
    run_argv: tuple[str, ...]
    version_argv: tuple[str, ...]
    compile_limits: Limits  # the compile job's, and the version job's
    run_limits: Limits  # a test's, when its request sets none
    run_limit_overrides: tuple[tuple[str, Any], ...]  # the catalogue's, as written: requests layer on these
    judge0_id: int
    piston_names: tuple[str, ...]  # Piston's language name first, then its aliases
    probe_source: str
    # What the runtime prints on stderr when the program ran out of the memory it may use
    # before the kernel's limit was reached (a JVM's capped heap): a memory limit, not a crash.
    memory_error: str | None = None

    def run_limits_with(self, overrides: Mapping[str, Any], policy: LimitPolicy | None = None,
                        where: str = "limits") -> Limits:
        """A test's limits: the policy's defaults, the catalogue's run overrides, then the
        request's; raises LimitError as LimitPolicy.resolve does."""
        merged = {**dict(self.run_limit_overrides), **overrides}
        return (policy or default_limit_policy()).resolve(merged, where)


@dataclass(frozen=True)
class LanguageStatus:
    available: bool
    version: str | None  # e.g. "12.2.0"; None when the version command failed
    reason: str | None  # why it is unavailable; None when available


# --- loading the catalogue -------------------------------------------------------------------

def _fail(where: str, what: str) -> LanguageError:
    return LanguageError(f"{CATALOGUE_FILE}: {where}: {what}")


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise _fail(where, f"{key} must be a non-empty string, got {value!r}")
    return value


def _argv(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table[key]
    if not isinstance(value, list) or not value:
        raise _fail(where, f"{key} must be a non-empty list of strings (an argv), got {value!r}")
    for arg in value:
        if not isinstance(arg, str) or not arg or "\x00" in arg:
            raise _fail(where, f"{key}: every argument must be a non-empty string without NUL, got {arg!r}")
        for name in _PLACEHOLDER_RE.findall(arg):
            if name not in PLACEHOLDERS:
                raise _fail(where, f"{key}: unknown placeholder {{{name}}} in {arg!r} "
                                   f"(known: {', '.join('{' + known + '}' for known in PLACEHOLDERS)})")
    return tuple(value)


def _limits(table: Mapping[str, Any], key: str, where: str,
            policy: LimitPolicy) -> tuple[Limits, tuple[tuple[str, Any], ...]]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise _fail(where, f"{key} must be a table of limits, got {value!r}")
    try:
        limits = policy.resolve(value, f"{CATALOGUE_FILE}: {where}: {key}")
    except LimitError as error:
        raise LanguageError(str(error)) from None
    return limits, tuple(value.items())


def _judge0_id(table: Mapping[str, Any], where: str) -> int:
    value = table["judge0_id"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= JUDGE0_ID_MAX:
        raise _fail(where, f"judge0_id must be a positive integer, got {value!r}")
    return value


def _piston_names(table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    value = table["piston"]
    if not isinstance(value, list) or not value:
        raise _fail(where, f"piston must be a non-empty list of names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not PISTON_NAME_RE.match(name):
            raise _fail(where, f"piston: {name!r} is not a name (lower case, matching {PISTON_NAME_RE.pattern})")
    if len(set(value)) != len(value):
        raise _fail(where, f"piston lists a name twice: {value!r}")
    return tuple(value)


def _label(table: Mapping[str, Any], number: int) -> str:
    """How messages name a table: by its id when it has a usable one, else by position."""
    language_id = table.get("id")
    if isinstance(language_id, str) and ID_RE.match(language_id):
        return f"language {language_id!r}"
    return f"language #{number}"


def _parse_language(table: Any, number: int, policy: LimitPolicy) -> Language:
    if not isinstance(table, dict):
        raise _fail(f"language #{number}", "expected a [[language]] table")
    where = _label(table, number)
    for key in table:
        if key not in _REQUIRED_KEYS and key not in _OPTIONAL_KEYS:
            raise _fail(where, f"unknown key {key!r} (known: {', '.join(_REQUIRED_KEYS + _OPTIONAL_KEYS)})")
    missing = [key for key in _REQUIRED_KEYS if key not in table]
    if missing:
        raise _fail(where, f"missing {', '.join(missing)}")
    if not isinstance(table["id"], str) or not ID_RE.match(table["id"]):
        raise _fail(where, f"id {table['id']!r} must match {ID_RE.pattern}")
    source_file = table["source_file"]
    if not isinstance(source_file, str) or not SOURCE_FILE_RE.match(source_file):
        raise _fail(where, f"source_file {source_file!r} must be a plain file name (matching {SOURCE_FILE_RE.pattern})")
    compile_limits, _ = _limits(table, "compile_limits", where, policy)
    run_limits, run_overrides = _limits(table, "run_limits", where, policy)
    return Language(
        id=table["id"],
        name=_text(table, "name", where),
        image=_text(table, "image", where),
        source_file=source_file,
        compile_argv=_argv(table, "compile", where) if "compile" in table else None,
        run_argv=_argv(table, "run", where),
        version_argv=_argv(table, "version", where),
        compile_limits=compile_limits,
        run_limits=run_limits,
        run_limit_overrides=run_overrides,
        judge0_id=_judge0_id(table, where),
        piston_names=_piston_names(table, where),
        probe_source=_text(table, "probe", where),
        memory_error=_text(table, "memory_error", where) if "memory_error" in table else None,
    )


def _check_unique(languages: list[Language]) -> None:
    """Ids, Judge0 ids and Piston names each name one language."""
    ids: set[str] = set()
    judge0: dict[int, str] = {}
    piston: dict[str, str] = {}
    for language in languages:
        where = f"language {language.id!r}"
        if language.id in ids:
            raise _fail(where, "a language of this id is already listed")
        ids.add(language.id)
        if language.judge0_id in judge0:
            raise _fail(where, f"judge0_id {language.judge0_id} is language {judge0[language.judge0_id]!r}'s already")
        judge0[language.judge0_id] = language.id
        for name in language.piston_names:
            if name in piston:
                raise _fail(where, f"piston name {name!r} is language {piston[name]!r}'s already")
            piston[name] = language.id


def load_languages(text: str | None = None, policy: LimitPolicy | None = None) -> dict[str, Language]:
    """The catalogue (None: the shipped policies/languages.toml), by id, in its order."""
    import tomllib  # imported on use, as the limit policy does

    if text is None:
        text = read_policy_file(CATALOGUE_FILE)
    policy = policy or default_limit_policy()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LanguageError(f"{CATALOGUE_FILE}: {error}") from None
    for key in document:
        if key != "language":
            raise LanguageError(f"{CATALOGUE_FILE}: unknown key {key!r} (only [[language]] tables belong here)")
    tables = document.get("language")
    if not isinstance(tables, list) or not tables:
        raise LanguageError(f"{CATALOGUE_FILE}: no languages (expected [[language]] tables)")
    languages = [_parse_language(table, number, policy) for number, table in enumerate(tables, 1)]
    _check_unique(languages)
    return {language.id: language for language in languages}


# --- the jobs: compile once, run many --------------------------------------------------------

def expand_argv(argv: tuple[str, ...], limits: Limits) -> tuple[str, ...]:
    """The argv with its placeholders ({memory_bytes}) filled in for a job of these limits."""
    def value(match: re.Match[str]) -> str:
        return PLACEHOLDERS[match.group(1)](limits)

    return tuple(_PLACEHOLDER_RE.sub(value, arg) for arg in argv)


def version_job(language: Language) -> JobSpec:
    limits = language.compile_limits
    return JobSpec(argv=expand_argv(language.version_argv, limits), limits=limits, image=language.image)


def source_files(language: Language, source: bytes, others: tuple[InputFile, ...] = ()) -> tuple[InputFile, ...]:
    """The source under the language's file name, and the submission's other files beside it:
    what the compile job is given, and each test's job of a language without a compile step."""
    return (InputFile(path=language.source_file, content=source), *others)


def compile_job(language: Language, source: bytes, limits: Limits | None = None,
                others: tuple[InputFile, ...] = ()) -> JobSpec:
    """The job that compiles `source` (with `others` beside it) and writes /work, as a tar, to
    its stdout (read it with compiled_files); diagnostics are on its stderr. Only for a
    language with a compile step; its image needs `sh` and `tar` (the host's and busybox's
    both do)."""
    if language.compile_argv is None:
        raise ValueError(f"language {language.id!r} has no compile step")
    limits = limits or language.compile_limits
    argv = ("sh", "-c", _COMPILE_AND_PACK, "compile", *expand_argv(language.compile_argv, limits))
    return JobSpec(argv=argv, limits=limits, image=language.image, files=source_files(language, source, others))


def _artifact(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> InputFile:
    try:
        path = normalize_workdir_path(name)
    except SpecError as error:
        raise ArtifactError(f"compile output: {error}") from None
    reader = archive.extractfile(member)
    if reader is None:
        raise ArtifactError(f"compile output: {name!r} cannot be read")
    # Execute bits are what matters (a compiled program); nothing else is carried over.
    mode = 0o755 if member.mode & 0o111 else 0o644
    return InputFile(path=path, content=reader.read(), mode=mode)


def compiled_files(result: Result) -> tuple[InputFile, ...]:
    """The files a successful compile job left in /work (the source among them), from the tar
    on its stdout. Directories are implied by the paths; links and devices are refused."""
    files = []
    try:
        with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r:") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise ArtifactError(f"compile output: {name!r} is not a regular file")
                files.append(_artifact(archive, member, name))
    except tarfile.TarError as error:
        raise ArtifactError(f"compile output is not a tar archive: {error}") from None
    return tuple(files)


def run_job(language: Language, files: tuple[InputFile, ...], stdin: bytes | None,
            limits: Limits | None = None, args: tuple[str, ...] = ()) -> JobSpec:
    """One test's job: the compiled files (or the source) in /work, the test's input on stdin,
    its arguments after the language's run command."""
    limits = limits or language.run_limits
    return JobSpec(argv=expand_argv(language.run_argv, limits) + args, limits=limits, image=language.image,
                   files=files, stdin=stdin)


# --- availability ----------------------------------------------------------------------------

class JobRunner(Protocol):
    """What the probe needs of a Runtime: run one job to its end."""

    def run(self, spec: JobSpec) -> Result: ...


class _ProbeFailed(Exception):
    """One step of the probe failed; the message is the LanguageStatus's reason."""


_VERSION_RE = re.compile(r"\d+(?:\.\d+)*")


def parse_version(output: bytes) -> str | None:
    """The version a version command printed: the first number (12.2.0, 17.0.15, 20.20.2 of
    "v20.20.2") of its first non-empty line, or that whole line when it holds none."""
    for line in output.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line:
            match = _VERSION_RE.search(line)
            return match.group() if match else line[:REASON_EXCERPT_CHARS]
    return None


def _excerpt(output: bytes) -> str:
    """A job's output on one line; when long, its start (a compiler's first error) and its
    end (an interpreter's exception)."""
    text = " | ".join(line.strip() for line in output.decode("utf-8", "replace").splitlines() if line.strip())
    if len(text) <= REASON_EXCERPT_CHARS:
        return text
    half = REASON_EXCERPT_CHARS // 2
    return f"{text[:half]} … {text[-half:]}"


def _how_it_ended(result: Result) -> str:
    if result.status == "runtime_error":
        hint = " (command not found?)" if result.exit_code == 127 else ""
        return f"exit code {result.exit_code}{hint}"
    if result.status == "signaled":
        return f"signal {result.signal}"
    return result.status + (f" ({result.message})" if result.message else "")


def _run_step(runner: JobRunner, step: str, spec: JobSpec, show_stdout: bool = True) -> Result:
    result = runner.run(spec)
    if result.status != "ok":
        streams = result.stderr + (result.stdout if show_stdout else b"")
        output = _excerpt(streams)
        raise _ProbeFailed(f"{step} failed: {_how_it_ended(result)}" + (f": {output}" if output else ""))
    return result


def _probe_version(runner: JobRunner, language: Language) -> str:
    result = _run_step(runner, "version command", version_job(language))
    version = parse_version(result.stdout) or parse_version(result.stderr)
    if version is None:
        raise _ProbeFailed("version command printed nothing")
    return version


def _probe_files(runner: JobRunner, language: Language) -> tuple[InputFile, ...]:
    source = language.probe_source.encode("utf-8")
    if language.compile_argv is None:
        return source_files(language, source)
    # stdout is the tar of /work: only stderr says anything about a failure.
    result = _run_step(runner, "compile", compile_job(language, source), show_stdout=False)
    try:
        return compiled_files(result)
    except ArtifactError as error:
        raise _ProbeFailed(str(error)) from None


def _probe_run(runner: JobRunner, language: Language, files: tuple[InputFile, ...]) -> None:
    result = _run_step(runner, "run", run_job(language, files, PROBE_LINE))
    outcome = lines(PROBE_LINE, result.stdout)
    if not outcome.accepted:
        raise _ProbeFailed(f"run: the probe program did not print its input back: {outcome.message}")


def probe_language(runtime: JobRunner, language: Language) -> LanguageStatus:
    """Whether `language` works here: its version command, then its probe program compiled
    and run once, in real jobs. Never raises for a missing image or a broken toolchain."""
    version: str | None = None
    try:
        version = _probe_version(runtime, language)
        _probe_run(runtime, language, _probe_files(runtime, language))
    except UnknownImageError:
        return LanguageStatus(available=False, version=version, reason=f"image {language.image!r} does not exist")
    except _ProbeFailed as failure:
        return LanguageStatus(available=False, version=version, reason=str(failure))
    return LanguageStatus(available=True, version=version, reason=None)
