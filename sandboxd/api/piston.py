"""Piston's API (engineer-man/piston, v2) under /piston, so that Piston's clients run code here
unmodified: pointed at `<service>/piston` (Piston's layout, `/api/v2/...`), or at
`<service>/piston/api/v2/piston/` (the public instance's layout, which clients built around
it use), with a tenant's API key as their Authorization header.

`GET .../runtimes` lists the catalogue's languages that this machine runs (their start-up
probes are waited for, within a bound), by their Piston names, with the probed versions.
`POST .../execute` is a submission of one test without an expected output: compiled if the
language has a compile step, then run once with the request's stdin and args. It goes through
the judge service like any submission, so its jobs are the tenant's, queued fairly, accounted
and labelled (api=piston, submission=<id>, role=...); the request waits for its end.

The request, as Piston reads it: the first utf8 file is the program (its compile and its run),
given the language's source file name here; the other files keep their names, checked as any
job's file paths. The version is a semver range matched against the probed version. Limits
are in ms and bytes; a run limit may be anything the limit policy and the tenant allow, a
compile limit may only lower the catalogue's (as Piston's may not exceed its configured ones);
absent, null, 0, and -1 for memory, mean the default. stdin gets a final newline, as Piston's.
Unknown fields are ignored, as Piston ignores them; the fields it knows are checked strictly.

The answer, as Piston gives it: isolate's status codes (RE, SG, TO, OL, EL, XX) and messages,
signals by name, times in ms, memory in bytes. `output` is stdout then stderr: the streams
are captured apart, so their interleaving is not known. A compile that fails stands for the
run too (Piston does so for the clients that read only `run`). Errors are `{"message": ...}`,
400 for a request that cannot run, whatever the path below /piston/ (an unknown key or path
too).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from signal import Signals
from typing import Any

from aiohttp import web

from sandboxd.api.errors import ApiError
from sandboxd.api.http import MAX_WAIT_S, TENANT_KEY, ServiceContext, _body, _json
from sandboxd.api.requests import MAX_ARGS
from sandboxd.api.submissions import MAX_SOURCE_BYTES, PROBE_WAIT_S, _run_limits
from sandboxd.job import InputFile, SpecError, normalize_workdir_path
from sandboxd.judge.checkers import OutputChecker
from sandboxd.judge.judging import Case
from sandboxd.judge.languages import Language
from sandboxd.judge.service import JudgeService, SubmissionRequest, capped
from sandboxd.limits import LIMIT_FIELDS, LimitError, LimitPolicy, Limits
from sandboxd.scheduler.scheduler import QuotaError
from sandboxd.store.submissions import SubmissionRecord
from sandboxd.store.tenants import Tenant

PREFIX = "/piston"
# Piston's own layout, and the public instance's, which clients made for it use.
API_ROOTS = (f"{PREFIX}/api/v2", f"{PREFIX}/api/v2/piston")
ENCODINGS = ("utf8", "base64", "hex")
MAX_FILES = 64
MAX_FILES_BYTES = 8 << 20  # every file's decoded content together
LABELS = (("api", "piston"),)
UNKNOWN_VERSION = "0.0.0"  # a language whose version command printed no number
# Our Result statuses -> isolate's codes, as Piston passes them on (None: it ended well).
# Isolate reports a kill for memory as a fatal signal: Piston has no code of its own for it.
_STATUS_CODES: dict[str, str | None] = {
    "ok": None, "runtime_error": "RE", "signaled": "SG", "time_limit_exceeded": "TO",
    "memory_limit_exceeded": "SG", "output_limit_exceeded": "OL", "internal_error": "XX",
}
_KILLED_BY_US = ("time_limit_exceeded", "memory_limit_exceeded", "output_limit_exceeded")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def piston_error(error: ApiError) -> web.Response:
    """Any error under /piston/, as Piston answers one: its message alone; 400, not 422."""
    status = 400 if error.http_status == 422 else error.http_status
    return web.Response(status=status, text=json.dumps({"message": error.message}),
                        content_type="application/json", headers=error.headers)


# --- versions: the subset of semver ranges clients send --------------------------------------

Version = tuple[int, int, int]
_COMPARATOR_RE = re.compile(r"^(<=|>=|<|>|=|\^|~)?v?(\d+|[xX*])(?:\.(\d+|[xX*]))?(?:\.(\d+|[xX*]))?$")
_OPERATOR_SPACE_RE = re.compile(r"(<=|>=|<|>|=|\^|~)\s+")
_PROBED_VERSION_RE = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_NOTHING: tuple[Version, Version] = ((0, 0, 0), (0, 0, 0))
SELECTOR_FORMS = "*, 3, 3.11, 3.11.2, 3.x, >=3.10 <4, ^3.11, ~3.11, or alternatives joined by ||"


class VersionSelectorError(ValueError):
    """A version selector outside the semver ranges understood here."""


def _pad(parts: tuple[int, ...]) -> Version:
    padded = parts + (0, 0, 0)
    return padded[0], padded[1], padded[2]


def _after(parts: tuple[int, ...]) -> Version | None:
    """The first version past the partial version `parts` (3.11 -> 3.12.0); None past `*`."""
    return _pad(parts[:-1] + (parts[-1] + 1,)) if parts else None


def _caret_end(parts: tuple[int, ...]) -> Version:
    """Where ^parts ends: at the next change of its first non-zero part."""
    if len(parts) == 1 or parts[0] > 0:
        return (parts[0] + 1, 0, 0)
    if len(parts) == 2 or parts[1] > 0:
        return (0, parts[1] + 1, 0)
    return (0, 0, parts[2] + 1)


def _comparator_range(text: str) -> tuple[Version | None, Version | None]:
    """The versions one comparator takes, as [low, high); None is unbounded."""
    match = _COMPARATOR_RE.match(text)
    if match is None:
        raise VersionSelectorError(text)
    numbers: list[int] = []
    for part in match.groups()[1:]:
        if part is None or not part.isdigit():
            break  # 3.x.5 is 3.x
        numbers.append(int(part))
    parts, operator = tuple(numbers), match.group(1) or "="
    low = _pad(parts) if parts else None
    if operator == "=":
        return low, _after(parts)
    if operator == ">=":
        return low, None
    if operator == ">":
        return (_after(parts), None) if parts else _NOTHING
    if operator == "<":
        return (None, low) if parts else _NOTHING
    if operator == "<=":
        return None, _after(parts)
    if operator == "~":
        return low, _after(parts[:2])
    return low, (_caret_end(parts) if parts else None)


def version_matches(selector: str, version: str) -> bool:
    """Whether a probed version satisfies a semver range as Piston takes one (SELECTOR_FORMS);
    raises VersionSelectorError for anything else (pre-release tags, hyphen ranges)."""
    alternatives = [[_comparator_range(token) for token in _OPERATOR_SPACE_RE.sub(r"\1", alternative).split()]
                    for alternative in selector.split("||")]
    probed = _PROBED_VERSION_RE.match(version)
    if probed is None:  # not a number: only a selector of any version, or that very text
        return selector.strip() in ("*", "x", "X", version)
    point = tuple(int(part or 0) for part in probed.groups())
    return any(all((low is None or point >= low) and (high is None or point < high) for low, high in ranges)
               for ranges in alternatives)


# --- the request -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PistonFile:
    name: str | None  # None: not given (Piston names it file<index>.code)
    content: bytes
    utf8: bool  # the first utf8 file is the program


@dataclass(frozen=True)
class _LimitField:
    name: str  # Piston's
    limit: str  # the limit policy's
    scale: float  # the policy's unit per Piston's: ms -> s; bytes are bytes


def _stage_limit_fields(stage: str) -> tuple[_LimitField, ...]:
    return (_LimitField(f"{stage}_timeout", "wall_time", 0.001), _LimitField(f"{stage}_cpu_time", "cpu_time", 0.001),
            _LimitField(f"{stage}_memory_limit", "memory", 1))


def _required_string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{name} is required as a string")
    return value.strip()


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None


def _decode(content: str, encoding: str, where: str) -> bytes:
    if encoding == "utf8":
        return _utf8(content, where)
    if encoding == "hex":
        try:
            return bytes.fromhex(content)
        except ValueError:
            raise bad_request(f"{where} is not valid hex") from None
    # Padding may be left out and the URL-safe alphabet used, as Node's decoder allows.
    text = "".join(content.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not valid base64") from None


def parse_files(value: Any) -> tuple[PistonFile, ...]:
    if not isinstance(value, list):
        raise bad_request("files is required as an array")
    if len(value) > MAX_FILES:
        raise bad_request(f"files: at most {MAX_FILES} files, got {len(value)}")
    files, total_bytes = [], 0
    for index, item in enumerate(value):
        where = f"files[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object")
        if not isinstance(item.get("content"), str):
            raise bad_request(f"{where}.content is required as a string")
        encoding = item.get("encoding") or "utf8"
        if encoding not in ENCODINGS:
            raise bad_request(f"{where}.encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request(f"{where}.name must be a string")
        content = _decode(item["content"], encoding, f"{where}.content")
        total_bytes += len(content)
        if total_bytes > MAX_FILES_BYTES:
            raise bad_request(f"files: their contents are over {MAX_FILES_BYTES} bytes together")
        files.append(PistonFile(name=name or None, content=content, utf8=encoding == "utf8"))
    if not any(file.utf8 for file in files):
        raise bad_request("files must include at least one utf8 encoded file (the program)")
    return tuple(files)


def _workdir_path(name: str, where: str) -> str:
    if name.startswith("/"):
        raise bad_request(f"{where}.name must be a path relative to the job's directory, got {name!r}")
    try:
        return normalize_workdir_path(name)
    except SpecError as error:
        raise bad_request(f"{where}.name: {error}") from None


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def program_and_files(files: tuple[PistonFile, ...], language: Language) -> tuple[bytes, tuple[InputFile, ...]]:
    """(the program's source, the other files in the job's directory). Every name given is
    checked, the program's too, though it runs under the language's source file name."""
    program = next(index for index, file in enumerate(files) if file.utf8)
    source = files[program].content
    if not source.strip():
        raise bad_request(f"files[{program}].content must not be empty: it is the program")
    if len(source) > MAX_SOURCE_BYTES:
        raise bad_request(f"files[{program}].content: the program is over {MAX_SOURCE_BYTES} bytes")
    taken, others = {language.source_file}, []
    for index, file in enumerate(files):
        where = f"files[{index}]"
        path = _workdir_path(file.name or f"file{index}.code", where)
        if index == program:
            continue
        if path == language.source_file:
            raise bad_request(f"{where}.name: {path!r} is the name the program (files[{program}]) is given here")
        if path in taken:
            raise bad_request(f"{where}.name: another file is named {path!r}")
        taken.add(path)
        others.append(InputFile(path=path, content=file.content))
    for path in taken:
        for parent in _parents(path):
            if parent in taken:
                raise bad_request(f"files: {parent!r} is a file, so {path!r} cannot be in it")
    return source, tuple(others)


def _stdin(value: Any) -> bytes:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise bad_request("stdin must be a string")
    data = _utf8(value, "stdin")
    return data if data.endswith(b"\n") else data + b"\n"  # as Piston: its programs expect a line


def _args(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request("args must be an array of strings")
    if len(value) > MAX_ARGS:
        raise bad_request(f"args: at most {MAX_ARGS} arguments, got {len(value)}")
    for index, arg in enumerate(value):
        if not isinstance(arg, str) or "\x00" in arg:
            raise bad_request(f"args[{index}] must be a string without NUL")
    return tuple(value)


def _in_piston_units(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _limit_overrides(body: dict[str, Any], stage: str, maxima: Limits, policy: LimitPolicy) -> dict[str, float]:
    """The stage's limits the request sets, in the policy's names and units."""
    overrides: dict[str, float] = {}
    for field in _stage_limit_fields(stage):
        value = body.get(field.name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad_request(f"If specified, {field.name} must be a number")
        if value == 0 or (field.limit == "memory" and value == -1):
            continue  # Piston's "not set" (0) and "no limit" (-1): the default here
        if value < 0:
            raise bad_request(f"{field.name} must be non-negative" + (" or -1" if field.limit == "memory" else ""))
        amount = value * field.scale
        maximum = getattr(maxima, LIMIT_FIELDS[field.limit])
        if amount > maximum:
            raise bad_request(f"{field.name} cannot exceed the configured limit of "
                              f"{_in_piston_units(round(maximum / field.scale, 3))}")
        try:
            policy.resolve({field.limit: amount}, where=field.name)
        except LimitError as error:
            raise bad_request(f"{field.name}: {value:g} is below what a job may have ({error})") from None
        overrides[field.limit] = amount
    return overrides


def _run_case(body: dict[str, Any], language: Language, policy: LimitPolicy, tenant: Tenant) -> Case:
    overrides = _limit_overrides(body, "run", capped(policy.maximum, tenant), policy)
    try:
        limits = _run_limits(language, overrides, "limits", policy, tenant)
    except ApiError as error:
        raise bad_request(f"run limits: {error.message}") from None
    return Case(name="run", stdin=_stdin(body.get("stdin")), expected_output=None, limits=limits,
                args=_args(body.get("args")))


def _compiling(body: dict[str, Any], language: Language, policy: LimitPolicy, tenant: Tenant) -> Language:
    """The language with the compile limits the request lowers (only lowers: the catalogue's,
    capped to the tenant, are the maxima)."""
    maxima = capped(language.compile_limits, tenant)
    overrides = _limit_overrides(body, "compile", maxima, policy)
    if not overrides:
        return language
    changes = {LIMIT_FIELDS[name]: (int(value) if name == "memory" else value) for name, value in overrides.items()}
    return dataclasses.replace(language, compile_limits=dataclasses.replace(maxima, **changes))


def parse_execution(body: dict[str, Any], files: tuple[PistonFile, ...], language: Language, policy: LimitPolicy,
                    tenant: Tenant) -> SubmissionRequest:
    source, others = program_and_files(files, language)
    return SubmissionRequest(language=_compiling(body, language, policy, tenant), source=source,
                             tests=(_run_case(body, language, policy, tenant),), checker=OutputChecker(type="exact"),
                             labels=LABELS, files=others, keep_output=True)


# --- the answer ------------------------------------------------------------------------------

def _signal_name(number: int) -> str:
    try:
        return Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _status_code(status: str, stdout: bytes, stderr: bytes, output_limit_bytes: int) -> str | None:
    code = _STATUS_CODES.get(status, "XX")
    # Piston tells which stream went over: stderr's (EL) or stdout's (OL).
    if code == "OL" and len(stderr) >= output_limit_bytes > len(stdout):
        return "EL"
    return code


def _message(code: str | None, status: str, exit_code: int | None, signal: int | None, limit_hit: str | None,
             said: str | None) -> str | None:
    """What isolate says of how the stage ended (Piston passes it on)."""
    if code is None:
        return None
    if status == "memory_limit_exceeded":
        return "Memory limit exceeded"
    return {
        "RE": f"Exited with error status {exit_code}",
        "SG": f"Caught fatal signal {signal}",
        "TO": "Time limit exceeded (wall clock)" if limit_hit == "wall_time" else "Time limit exceeded",
        "OL": "stdout length exceeded",
        "EL": "stderr length exceeded",
    }.get(code, said or "internal error")


def stage_object(*, status: str, exit_code: int | None, signal: int | None, limit_hit: str | None, stdout: bytes,
                 stderr: bytes, cpu_time_ms: float | None, wall_time_ms: float | None, memory_bytes: int | None,
                 output_limit_bytes: int, said: str | None) -> dict[str, Any]:
    code = _status_code(status, stdout, stderr, output_limit_bytes)
    stdout_text = stdout.decode("utf-8", errors="replace")
    stderr_text = stderr.decode("utf-8", errors="replace")
    if status in _KILLED_BY_US:
        signal_name: str | None = "SIGKILL"
    else:
        signal_name = _signal_name(signal) if signal is not None else None
    return {
        "stdout": stdout_text,
        "stderr": stderr_text,
        "output": stdout_text + stderr_text,
        "code": exit_code if status in ("ok", "runtime_error") else None,
        "signal": signal_name,
        "message": _message(code, status, exit_code, signal, limit_hit, said),
        "status": code,
        "cpu_time": round(cpu_time_ms or 0),
        "wall_time": round(wall_time_ms or 0),
        "memory": int(memory_bytes or 0),
    }


def _base64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _run_stage(test: dict[str, Any], output_limit_bytes: int) -> dict[str, Any]:
    return stage_object(status=test.get("status") or "internal_error", exit_code=test.get("exit_code"),
                        signal=test.get("signal"), limit_hit=test.get("limit_hit"),
                        stdout=_base64(test.get("stdout_base64")), stderr=_base64(test.get("stderr_base64")),
                        cpu_time_ms=test.get("cpu_time_ms"), wall_time_ms=test.get("wall_time_ms"),
                        memory_bytes=test.get("memory_peak_bytes"), output_limit_bytes=output_limit_bytes,
                        said=test.get("message"))


def _compile_stage(compiled: dict[str, Any], output_limit_bytes: int, said: str | None) -> dict[str, Any]:
    # The compile job's stdout is its files: the compiler's own stdout joined its stderr.
    return stage_object(status=compiled.get("status") or "internal_error", exit_code=compiled.get("exit_code"),
                        signal=compiled.get("signal"), limit_hit=compiled.get("limit_hit"), stdout=b"",
                        stderr=_base64(compiled.get("output_base64")),
                        cpu_time_ms=compiled.get("cpu_time_ms"), wall_time_ms=compiled.get("wall_time_ms"),
                        memory_bytes=compiled.get("memory_peak_bytes"), output_limit_bytes=output_limit_bytes,
                        said=said)


def _failed_stage(message: str) -> dict[str, Any]:
    return stage_object(status="internal_error", exit_code=None, signal=None, limit_hit=None, stdout=b"",
                        stderr=b"", cpu_time_ms=0, wall_time_ms=0, memory_bytes=0, output_limit_bytes=1, said=message)


def execution_object(record: SubmissionRecord, submission: SubmissionRequest, version: str) -> dict[str, Any]:
    language = submission.language
    answer: dict[str, Any] = {"language": language.piston_names[0], "version": version}
    if record.compile is not None:
        answer["compile"] = _compile_stage(record.compile, language.compile_limits.output_bytes, record.message)
    if record.tests:
        answer["run"] = _run_stage(record.tests[0], submission.tests[0].limits.output_bytes)
    elif "compile" in answer and answer["compile"]["code"] != 0:
        answer["run"] = answer["compile"]
    else:
        answer["run"] = _failed_stage(record.message or "the program was not run")
    return answer


def runtime_object(language: Language, version: str | None) -> dict[str, Any]:
    return {"language": language.piston_names[0], "version": version or UNKNOWN_VERSION,
            "aliases": list(language.piston_names[1:])}


def language_named(name: str, languages: dict[str, Language]) -> Language | None:
    wanted = name.lower()
    return next((language for language in languages.values() if wanted in language.piston_names), None)


# --- routes ----------------------------------------------------------------------------------

class PistonRoutes:
    def __init__(self, context: ServiceContext) -> None:
        self.c = context

    @property
    def judge(self) -> JudgeService:
        if self.c.judge is None:
            raise ApiError(503, "judge_unavailable", "this service does not run code for Piston's API")
        return self.c.judge

    async def runtimes(self, request: web.Request) -> web.Response:
        judge = self.judge
        await judge.probed(list(judge.languages), PROBE_WAIT_S)
        listed = []
        for language in judge.languages.values():
            status = judge.status(language.id)
            if status is not None and status.available:
                listed.append(runtime_object(language, status.version))
        return _json(listed)

    async def _runtime(self, name: str, selector: str) -> tuple[Language, str]:
        """The language and its version, as the request names them; else a 400 that says why."""
        judge = self.judge
        unknown = f"{name}-{selector} runtime is unknown"
        language = language_named(name, judge.languages)
        if language is None:
            raise bad_request(f"{unknown}: no language is named {name!r} here (see runtimes)")
        if not await judge.probed([language.id], PROBE_WAIT_S):
            raise ApiError(503, "language_probing", "the languages are still being probed; try again",
                           headers={"Retry-After": "5"})
        status = judge.status(language.id)
        if status is None or not status.available:
            reason = status.reason if status is not None else "not probed"
            raise bad_request(f"{unknown}: {language.piston_names[0]} is not available here: {reason}")
        version = status.version or UNKNOWN_VERSION
        try:
            matched = version_matches(selector, version)
        except VersionSelectorError as error:
            raise bad_request(f"version {selector!r} is not understood ({error} is not a version range "
                              f"here): use {SELECTOR_FORMS}") from None
        if not matched:
            raise bad_request(f"{unknown}: {language.piston_names[0]} is version {version} here")
        return language, version

    async def execute(self, request: web.Request) -> web.Response:
        if self.c.draining():
            raise ApiError(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "5"})
        judge = self.judge
        tenant = request[TENANT_KEY]
        body = await _body(request)
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        name, selector = _required_string(body, "language"), _required_string(body, "version")
        files = parse_files(body.get("files"))
        language, version = await self._runtime(name, selector)
        submission = parse_execution(body, files, language, self.c.policy, tenant)
        try:
            record = await judge.submit(tenant, submission)
        except QuotaError as error:
            headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else {}
            raise ApiError(error.http_status, error.code, str(error), error.details, headers) from None
        compile_s = submission.language.compile_limits.wall_time_s if language.compile_argv is not None else 0.0
        wait_s = MAX_WAIT_S + compile_s + submission.tests[0].limits.wall_time_s  # the queue, then the jobs
        record = await judge.wait(record.id, wait_s) or record
        if not record.final:
            raise ApiError(504, "still_running", f"the execution did not end within {wait_s:g} s; it goes on as "
                                                 f"submission {record.id} (see /v1/submissions/{record.id})")
        return _json(execution_object(record, submission, version))


def add_routes(app: web.Application, context: ServiceContext) -> None:
    context.error_styles[f"{PREFIX}/"] = piston_error
    routes = PistonRoutes(context)
    for root in API_ROOTS:
        for slash in ("", "/"):
            app.router.add_get(f"{root}/runtimes{slash}", routes.runtimes)
            app.router.add_post(f"{root}/execute{slash}", routes.execute)
