"""The Judge0-compatible API, under /judge0: Judge0 1.13.1's submissions, languages, statuses
and configuration, so that Judge0 clients (the official Python SDK among them) work against
sandboxd unchanged.

Submissions. A Judge0 submission is a judge submission (sandboxd/judge/service.py) with one
test per run (`number_of_runs`, stopping at the first run that fails, as Judge0 does), judged
with Judge0's own expected_output rule (`checkers.judge0_accepts`). Its compile and its runs
are jobs of the tenant, queued and accounted like any, labelled submission=<id>. Its token is
the submission's id written as a UUID. The request's fields are kept with the submission (its
`api_request`; the text fields base64, since neither a source nor an input need be UTF-8) and
echoed back as Judge0 echoes them: with the limits that applied.

Limits. Judge0's limits are the job's: cpu_time_limit + cpu_extra_time is the CPU-time limit,
and a run that used more than cpu_time_limit is a Time Limit Exceeded all the same (Judge0's
extra time: the real time is reported); wall_time_limit; memory_limit and stack_limit (KB);
max_processes_and_or_threads (pids); max_file_size (KB), the largest file and the largest
output. A limit the request does not set is the language's. Values past the limit policy's
maxima or the tenant's are refused (422), as Judge0 refuses values past its max_*;
/config_info shows the defaults and maxima that apply to the caller. Per-process limits,
network access and compiler options do not exist here: asking for them is a 422.

Statuses. Judge0's are isolate's verdicts: a signal is Runtime Error by signal (SIGSEGV 7,
SIGXFSZ 8, SIGFPE 9, SIGABRT 10, any other 12), a non-zero exit NZEC (11). The output limit is
SIGXFSZ's status, as in Judge0, whose output is a file under its file size limit; a memory
limit, for which Judge0 has no status, is Runtime Error (Other) with the message "Memory limit
exceeded". A Python or JavaScript syntax error is a Compilation Error here: the catalogue
checks their syntax before the runs.

Output. `base64_encoded=true` encodes every text field (`message` included, as Judge0 does);
without it, a requested text field that is not UTF-8 makes the answer a 400 telling the
client to ask for base64, as Judge0's does.

Callbacks. When a submission with a `callback_url` finishes, its default fields, base64
encoded, are PUT to the URL (what Judge0 sends), from the submission's own task, with a
timeout and a few tries; failures are logged. Only hosts the service's allowlist allows may
be named (callbacks.py); with no allowlist every callback_url is refused (422).

Errors, 401 and 404 included, are Judge0's: {"error": "..."}, and a 422 names each field
with its messages, {"field": ["message", ...]}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import math
import os
import platform
import re
import shlex
import stat
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web

from sandboxd import __version__
from sandboxd.api.callbacks import CALLBACK_TIMEOUT_S, CALLBACK_TRIES, CallbackAllowlist, CallbackSender
from sandboxd.api.errors import ApiError, invalid
from sandboxd.api.http import MAX_WAIT_S, TENANT_KEY, ServiceContext, _body, _flag, _json
from sandboxd.api.submissions import MAX_SOURCE_BYTES, PROBE_WAIT_S, _run_limits
from sandboxd.job import InputFile, SpecError, normalize_workdir_path
from sandboxd.judge.checkers import CheckOutcome, OutputChecker, judge0_accepts, lines
from sandboxd.judge.judging import Case
from sandboxd.judge.languages import Language
from sandboxd.judge.service import JudgeService, SubmissionRequest
from sandboxd.limits import LimitPolicy, Limits
from sandboxd.scheduler.scheduler import QuotaError
from sandboxd.store.submissions import QUEUED, SubmissionRecord, get_submission
from sandboxd.store.tenants import Tenant

PREFIX = "/judge0"
JUDGE0_VERSION = "1.13.1"
API_NAME = "judge0"  # the `api` of the requests this module keeps with its submissions

STATUSES: tuple[tuple[int, str], ...] = (
    (1, "In Queue"), (2, "Processing"), (3, "Accepted"), (4, "Wrong Answer"), (5, "Time Limit Exceeded"),
    (6, "Compilation Error"), (7, "Runtime Error (SIGSEGV)"), (8, "Runtime Error (SIGXFSZ)"),
    (9, "Runtime Error (SIGFPE)"), (10, "Runtime Error (SIGABRT)"), (11, "Runtime Error (NZEC)"),
    (12, "Runtime Error (Other)"), (13, "Internal Error"), (14, "Exec Format Error"),
)
STATUS_NAMES = dict(STATUSES)
IN_QUEUE, PROCESSING, ACCEPTED, WRONG_ANSWER, TIME_LIMIT_EXCEEDED, COMPILATION_ERROR = 1, 2, 3, 4, 5, 6
SIGXFSZ_STATUS, OTHER_RUNTIME_ERROR, NZEC, INTERNAL_ERROR, EXEC_FORMAT_ERROR = 8, 12, 11, 13, 14
# Judge0's Status.find_runtime_error_by_status_code: the signal a run died of -> its status.
SIGNAL_STATUSES = {11: 7, 25: 8, 8: 9, 6: 10}
MEMORY_MESSAGE = "Memory limit exceeded"
OUTPUT_MESSAGE = "Output limit exceeded"

# A submission's attributes, in Judge0 1.13.1's column order (what fields=* answers), and the
# ones an answer has when `fields` is not given.
ALL_FIELDS = (
    "source_code", "language_id", "stdin", "expected_output", "stdout", "status_id", "created_at",
    "finished_at", "time", "memory", "stderr", "token", "number_of_runs", "cpu_time_limit", "cpu_extra_time",
    "wall_time_limit", "memory_limit", "stack_limit", "max_processes_and_or_threads",
    "enable_per_process_and_thread_time_limit", "enable_per_process_and_thread_memory_limit", "max_file_size",
    "compile_output", "exit_code", "exit_signal", "message", "wall_time", "compiler_options",
    "command_line_arguments", "redirect_stderr_to_stdout", "callback_url", "additional_files", "enable_network",
    "status", "language",
)
DEFAULT_FIELDS = ("token", "time", "memory", "stdout", "stderr", "compile_output", "message", "status")
# Text: base64 with base64_encoded=true, else UTF-8 text. (additional_files is always base64.)
TEXT_FIELDS = frozenset({"source_code", "stdin", "expected_output", "stdout", "stderr", "compile_output", "message"})
NOT_UTF8 = "some attributes for this submission cannot be converted to UTF-8, use base64_encoded=true query parameter"
NOT_UTF8_BATCH = ("some attributes for one or more submissions cannot be converted to UTF-8, use base64_encoded=true "
                  "query parameter")

MAX_BATCH_SUBMISSIONS = 20
DEFAULT_RUNS, MAX_RUNS = 1, 20
MAX_CPU_EXTRA_TIME_S = 5.0
MAX_OPTION_CHARS = 512  # compiler_options, command_line_arguments
MAX_EXTRACT_KB = 10240  # the additional files, unpacked
MAX_ADDITIONAL_FILES = 1000
MAX_CALLBACK_URL_CHARS = 2048
TOKEN_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KB = 1024
MIN_MEMORY_KB, MIN_STACK_KB = 4096, 64  # the limit policy's smallest memory and stack
# Where our limit names land among Judge0's fields, for the rare refusal found only on resolving.
_LIMIT_FIELDS = {"limits.cpu_time": "cpu_time_limit", "limits.wall_time": "wall_time_limit",
                 "limits.memory": "memory_limit", "limits.stack": "stack_limit",
                 "limits.pids": "max_processes_and_or_threads", "limits.output": "max_file_size",
                 "limits.file_size": "max_file_size"}


# --- errors, in Judge0's style -----------------------------------------------------------------

def field_errors(error: ApiError) -> dict[str, list[str]]:
    """A 422's {field: [messages]}, as Judge0 (Rails) renders a model's errors."""
    if "fields" in error.details:
        return {name: list(messages) for name, messages in error.details["fields"].items()}
    field = error.details.get("field", "base")
    return {field: [error.message.removeprefix(f"{field}: ")]}


def error_response(error: ApiError) -> web.Response:
    """Every error under /judge0 (authentication and routing too): {"error": message}, or a
    422's field errors."""
    if error.http_status == 422 and ("field" in error.details or "fields" in error.details):
        body: Any = field_errors(error)
    else:
        body = {"error": error.message}
    return web.Response(status=error.http_status, text=json.dumps(body), content_type="application/json",
                        headers=error.headers)


class FieldErrors:
    """Every field's mistakes at once, as Judge0 reports them (not only the first)."""

    def __init__(self) -> None:
        self.by_field: dict[str, list[str]] = {}

    def add(self, field: str, message: str) -> None:
        self.by_field.setdefault(field, []).append(message)

    def check(self) -> None:
        if self.by_field:
            summary = "; ".join(f"{name}: {', '.join(messages)}" for name, messages in self.by_field.items())
            raise ApiError(422, "invalid_request", summary,
                           {"field": next(iter(self.by_field)), "fields": dict(self.by_field)})


# --- what a submission may ask for ---------------------------------------------------------------

@dataclass(frozen=True)
class Bounds:
    """The defaults and maxima of Judge0's limits for one tenant: the limit policy's, within
    the tenant's own maxima. Times in seconds, sizes in KB."""

    cpu_time_s: float
    max_cpu_time_s: float
    wall_time_s: float
    max_wall_time_s: float
    memory_kb: int
    max_memory_kb: int
    stack_kb: int
    max_stack_kb: int
    processes: int
    max_processes: int
    file_size_kb: int
    max_file_size_kb: int


def bounds_for(policy: LimitPolicy, tenant: Tenant) -> Bounds:
    defaults, maximum = policy.defaults, policy.maximum
    max_cpu_s = min(maximum.cpu_time_s, tenant.max_cpu_time_s or math.inf)
    max_memory_bytes = min(maximum.memory_bytes, tenant.max_memory_bytes or maximum.memory_bytes)
    return Bounds(
        cpu_time_s=min(defaults.cpu_time_s, max_cpu_s), max_cpu_time_s=max_cpu_s,
        wall_time_s=defaults.wall_time_s, max_wall_time_s=maximum.wall_time_s,
        memory_kb=min(defaults.memory_bytes, max_memory_bytes) // KB, max_memory_kb=max_memory_bytes // KB,
        stack_kb=defaults.stack_bytes // KB, max_stack_kb=maximum.stack_bytes // KB,
        processes=defaults.pids, max_processes=maximum.pids,
        file_size_kb=defaults.output_bytes // KB,
        max_file_size_kb=min(maximum.output_bytes, maximum.file_size_bytes) // KB,
    )


# --- reading a request -----------------------------------------------------------------------

@dataclass(frozen=True)
class Judge0Checker(OutputChecker):
    """Judge0's expected_output rule, as a checker the judge runs."""

    type: str = "judge0"

    def check(self, expected: bytes, got: bytes) -> CheckOutcome:
        if judge0_accepts(expected, got):
            return CheckOutcome(True, "the output matches expected_output")
        outcome = lines(expected, got)
        return CheckOutcome(False, outcome.message if not outcome.accepted else
                            "the output differs from expected_output (leading whitespace, or no output)")


@dataclass(frozen=True)
class ParsedSubmission:
    submission: SubmissionRequest
    callback_url: str | None


def _b64decode(text: str) -> bytes | None:
    # Strict, but line breaks are allowed: Ruby's encode64 and Python's encodebytes put them in.
    try:
        return base64.b64decode(text.replace("\n", "").replace("\r", ""), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _absent(value: Any) -> bool:
    # Rails casts "" to nil: an empty value is the default, as a missing one.
    return value is None or value == ""


def _text(body: dict, name: str, base64_encoded: bool, errors: FieldErrors) -> bytes | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        errors.add(name, "must be a string")
        return None
    if not base64_encoded:
        return value.encode()
    decoded = _b64decode(value)
    if decoded is None:
        errors.add(name, "is not valid base64 (base64_encoded=true)")
    return decoded


def _number(body: dict, name: str, errors: FieldErrors, *, integer: bool = False) -> float | None:
    value = body.get(name)
    if _absent(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        errors.add(name, "is not a number")
        return None
    try:
        number = float(value)
    except ValueError:
        errors.add(name, "is not a number")
        return None
    if not math.isfinite(number):
        errors.add(name, "is not a number")
        return None
    if integer and not number.is_integer():
        errors.add(name, "must be an integer")
        return None
    return number


def _within(name: str, value: float | None, low: float, high: float, errors: FieldErrors,
            low_exclusive: bool = False) -> float | None:
    if value is None:
        return None
    if low_exclusive and value <= low:
        errors.add(name, f"must be greater than {low:g}")
    elif value < low:
        errors.add(name, f"must be greater than or equal to {low:g}")
    elif value > high:
        errors.add(name, f"must be less than or equal to {high:g}")
    else:
        return value
    return None


def _boolean(body: dict, name: str, errors: FieldErrors) -> bool | None:
    value = body.get(name)
    if _absent(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    errors.add(name, "must be true or false")
    return None


def _option_text(body: dict, name: str, errors: FieldErrors) -> str | None:
    value = body.get(name)
    if _absent(value):
        return None
    if not isinstance(value, str) or "\x00" in value:
        errors.add(name, "must be a string without NUL")
        return None
    if len(value) > MAX_OPTION_CHARS:
        errors.add(name, f"is too long (maximum is {MAX_OPTION_CHARS} characters)")
        return None
    return value


def _arguments(text: str | None, errors: FieldErrors) -> tuple[str, ...]:
    """command_line_arguments as argv words, split as a shell would (quotes, escapes) but run
    by no shell: nothing in them is expanded or executed."""
    if text is None or not text.strip():
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as error:
        errors.add("command_line_arguments", f"cannot be split into arguments: {error}")
        return ()


def unzip_additional_files(archive_bytes: bytes, source_file: str) -> tuple[InputFile, ...]:
    """The files of additional_files (a zip), for the job's working directory beside the
    source; ValueError says what is wrong with the archive."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(archive_bytes))
    except zipfile.BadZipFile:
        raise ValueError("is not a zip archive") from None
    entries = [entry for entry in archive.infolist() if not entry.is_dir()]
    if len(entries) > MAX_ADDITIONAL_FILES:
        raise ValueError(f"holds more than {MAX_ADDITIONAL_FILES} files")
    if sum(entry.file_size for entry in entries) > MAX_EXTRACT_KB * KB:
        raise ValueError(f"unpacks to more than {MAX_EXTRACT_KB} KB")
    files, seen = [], set()
    for entry in entries:
        mode = entry.external_attr >> 16
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            raise ValueError(f"holds {entry.filename!r}, which is not a regular file")
        try:
            path = normalize_workdir_path(entry.filename.removeprefix("./"))
        except SpecError as error:
            raise ValueError(str(error)) from None
        if path == source_file:
            raise ValueError(f"holds {path!r}, the source file's own name")
        if path in seen:
            raise ValueError(f"holds {path!r} twice")
        seen.add(path)
        try:
            content = archive.read(entry)  # at most its declared size: checked above
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as error:
            raise ValueError(f"cannot be unpacked: {error}") from None
        files.append(InputFile(path=path, content=content, mode=0o755 if mode & 0o111 else 0o644))
    return tuple(files)


def _redirecting(language: Language) -> Language:
    """The language with each run's stderr joined to its stdout (redirect_stderr_to_stdout).
    The script is a constant; the run's own argv follows it as "$@", never as shell text."""
    return dataclasses.replace(language, run_argv=("sh", "-c", 'exec "$@" 2>&1', "run", *language.run_argv))


def _language(body: dict, languages: dict[int, Language], errors: FieldErrors) -> Language | None:
    value = body.get("language_id")
    if _absent(value):
        errors.add("language_id", "can't be blank")
        return None
    number = _number(body, "language_id", errors, integer=True)
    if number is None:
        return None
    language = languages.get(int(number))
    if language is None:
        errors.add("language_id", f"language with id {int(number)} doesn't exist")
    return language


@dataclass(frozen=True)
class LimitRequest:
    """Judge0's limit fields as asked for (None: not given), each already within its bounds."""

    cpu_time_s: float | None = None
    cpu_extra_time_s: float | None = None
    wall_time_s: float | None = None
    memory_kb: float | None = None
    stack_kb: float | None = None
    processes: float | None = None
    file_size_kb: float | None = None


def _limit_request(body: dict, bounds: Bounds, errors: FieldErrors) -> LimitRequest:
    def field(name: str, low: float, high: float, integer: bool = False, exclusive: bool = False) -> float | None:
        return _within(name, _number(body, name, errors, integer=integer), low, high, errors, exclusive)

    return LimitRequest(
        cpu_time_s=field("cpu_time_limit", 0, bounds.max_cpu_time_s, exclusive=True),
        cpu_extra_time_s=field("cpu_extra_time", 0, MAX_CPU_EXTRA_TIME_S),
        wall_time_s=field("wall_time_limit", 0, bounds.max_wall_time_s, exclusive=True),
        memory_kb=field("memory_limit", MIN_MEMORY_KB, bounds.max_memory_kb, integer=True),
        stack_kb=field("stack_limit", MIN_STACK_KB, bounds.max_stack_kb, integer=True),
        processes=field("max_processes_and_or_threads", 0, bounds.max_processes, integer=True, exclusive=True),
        file_size_kb=field("max_file_size", 0, bounds.max_file_size_kb, integer=True),
    )


def _resolve_limits(asked: LimitRequest, language: Language, policy: LimitPolicy, tenant: Tenant,
                    errors: FieldErrors) -> tuple[Limits, float, float] | None:
    """(the runs' limits, cpu_time_limit, cpu_extra_time): the language's limits with the
    request's on top, within the tenant's and the policy's maxima."""
    max_cpu_s = bounds_for(policy, tenant).max_cpu_time_s
    cpu_s = asked.cpu_time_s if asked.cpu_time_s is not None else min(language.run_limits.cpu_time_s, max_cpu_s)
    extra_s = asked.cpu_extra_time_s or 0.0
    overrides: dict[str, Any] = {}
    if asked.cpu_time_s is not None or extra_s:
        if cpu_s + extra_s > max_cpu_s:
            errors.add("cpu_extra_time", f"cpu_time_limit + cpu_extra_time must be less than or equal to {max_cpu_s:g}")
            return None
        overrides["cpu_time"] = cpu_s + extra_s
    for name, value in (("wall_time", asked.wall_time_s), ("pids", asked.processes)):
        if value is not None:
            overrides[name] = value
    for name, value_kb in (("memory", asked.memory_kb), ("stack", asked.stack_kb), ("output", asked.file_size_kb),
                           ("file_size", asked.file_size_kb)):
        if value_kb is not None:
            overrides[name] = int(value_kb) * KB
    try:
        limits = _run_limits(language, overrides, "limits", policy, tenant)
    except ApiError as error:
        errors.add(_LIMIT_FIELDS.get(error.details.get("field", ""), "base"), error.message.split(": ", 1)[-1])
        return None
    return limits, cpu_s, extra_s


def _source(body: dict, base64_encoded: bool, errors: FieldErrors) -> bytes | None:
    source = _text(body, "source_code", base64_encoded, errors)
    if "source_code" in errors.by_field:
        return None
    if source is None or not source.strip():
        errors.add("source_code", "can't be blank")
        return None
    if len(source) > MAX_SOURCE_BYTES:
        errors.add("source_code", f"is too long (maximum is {MAX_SOURCE_BYTES} bytes)")
        return None
    return source


def _refuse_unsupported(body: dict, errors: FieldErrors) -> None:
    """What Judge0 may allow and this service has not: per-process limits, network access,
    compiler options (the catalogue's compile commands take none)."""
    for name in ("enable_per_process_and_thread_time_limit", "enable_per_process_and_thread_memory_limit"):
        if _boolean(body, name, errors):
            errors.add(name, "this option cannot be enabled")
    if _boolean(body, "enable_network", errors):
        errors.add("enable_network", "enabling network is not allowed")
    compiler_options = _option_text(body, "compiler_options", errors)
    if compiler_options is not None and compiler_options.strip():
        errors.add("compiler_options", "setting compiler options is not allowed")


def _callback_url(body: dict, callbacks: CallbackAllowlist, errors: FieldErrors) -> str | None:
    url = body.get("callback_url")
    if _absent(url):
        return None
    if not isinstance(url, str) or len(url) > MAX_CALLBACK_URL_CHARS:
        errors.add("callback_url", f"must be a URL of at most {MAX_CALLBACK_URL_CHARS} characters")
        return None
    refusal = callbacks.refusal(url)
    if refusal is not None:
        errors.add("callback_url", refusal)
    return url


def _additional_files(body: dict, language: Language | None,
                      errors: FieldErrors) -> tuple[bytes | None, tuple[InputFile, ...]]:
    """(the archive, its files). Always base64, whatever base64_encoded says, as in Judge0."""
    archive = body.get("additional_files")
    if _absent(archive):
        return None, ()
    archive_bytes = _b64decode(archive) if isinstance(archive, str) else None
    if archive_bytes is None:
        errors.add("additional_files", "must be a base64 encoded zip archive")
        return None, ()
    if language is None:
        return archive_bytes, ()
    try:
        return archive_bytes, unzip_additional_files(archive_bytes, language.source_file)
    except ValueError as error:
        errors.add("additional_files", str(error))
        return None, ()


def _echoed_limits(limits: Limits, cpu_time_limit_s: float, cpu_extra_time_s: float, runs: int) -> dict[str, Any]:
    """The limits that applied, in Judge0's fields and units, as kept and echoed."""
    return {
        "number_of_runs": runs, "cpu_time_limit": cpu_time_limit_s, "cpu_extra_time": cpu_extra_time_s,
        "wall_time_limit": limits.wall_time_s, "memory_limit": limits.memory_bytes // KB,
        "stack_limit": limits.stack_bytes // KB, "max_processes_and_or_threads": limits.pids,
        "enable_per_process_and_thread_time_limit": False, "enable_per_process_and_thread_memory_limit": False,
        "max_file_size": limits.output_bytes // KB,
    }


def _b64_or_none(data: bytes | None) -> str | None:
    return None if data is None else _b64(data)


def parse_submission(body: Any, *, base64_encoded: bool, languages: dict[int, Language], policy: LimitPolicy,
                     tenant: Tenant, callbacks: CallbackAllowlist) -> ParsedSubmission:
    """A Judge0 submission request -> what the judge runs, or a 422 naming every field that
    is wrong. Fields Judge0 does not know are ignored, as Judge0 ignores them."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "a submission must be a JSON object")
    errors = FieldErrors()
    language = _language(body, languages, errors)
    source = _source(body, base64_encoded, errors)
    stdin = _text(body, "stdin", base64_encoded, errors)
    expected = _text(body, "expected_output", base64_encoded, errors)
    runs = _within("number_of_runs", _number(body, "number_of_runs", errors, integer=True), 0, MAX_RUNS, errors,
                   low_exclusive=True)
    _refuse_unsupported(body, errors)
    redirect = _boolean(body, "redirect_stderr_to_stdout", errors)
    arguments_text = _option_text(body, "command_line_arguments", errors)
    arguments = _arguments(arguments_text, errors)
    callback_url = _callback_url(body, callbacks, errors)
    archive, files = _additional_files(body, language, errors)
    asked = _limit_request(body, bounds_for(policy, tenant), errors)
    errors.check()
    assert language is not None and source is not None  # else errors.check() raised
    resolved = _resolve_limits(asked, language, policy, tenant, errors)
    errors.check()
    assert resolved is not None
    limits, cpu_time_limit_s, cpu_extra_time_s = resolved
    run_count = int(runs or DEFAULT_RUNS)
    tests = tuple(Case(name=str(run), stdin=stdin or b"", expected_output=expected, limits=limits, args=arguments)
                  for run in range(1, run_count + 1))
    # Kept with the submission and echoed as Judge0 echoes it; text base64 (it need not be UTF-8).
    echoed = {
        "api": API_NAME, "source_code": _b64(source), "language_id": language.judge0_id,
        "stdin": _b64_or_none(stdin), "expected_output": _b64_or_none(expected),
        **_echoed_limits(limits, cpu_time_limit_s, cpu_extra_time_s, run_count),
        "compiler_options": None, "command_line_arguments": arguments_text, "redirect_stderr_to_stdout": bool(redirect),
        "callback_url": callback_url, "additional_files": _b64_or_none(archive), "enable_network": False,
    }
    submission = SubmissionRequest(
        language=_redirecting(language) if redirect else language, source=source, tests=tests,
        checker=Judge0Checker(), stop_on_first_failure=True, labels=(("api", API_NAME),), files=files,
        keep_output=True, api_request=echoed)
    return ParsedSubmission(submission=submission, callback_url=callback_url)


def requested_fields(text: str | None) -> tuple[str, ...]:
    """`fields`: the default ones, "*" for all, or a comma-separated list; a name Judge0 does
    not know is a 400, as in Judge0."""
    if text is None or not text.strip():
        return DEFAULT_FIELDS
    if text.strip() == "*":
        return ALL_FIELDS
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ALL_FIELDS]
    if unknown:
        raise ApiError(400, "invalid_fields", f"invalid fields: [{', '.join(unknown)}]")
    return names


def token_of(submission_id: str) -> str:
    return str(uuid.UUID(hex=submission_id))


def submission_id_of(token: str) -> str | None:
    return token.replace("-", "") if TOKEN_RE.match(token) else None


# --- what a submission came to, in Judge0's terms --------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    status_id: int
    message: str | None = None
    stdout_b64: str | None = None
    stderr_b64: str | None = None
    compile_output_b64: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    cpu_time_s: float | None = None
    wall_time_s: float | None = None
    memory_kb: int | None = None


def _output(data_b64: str | None) -> str | None:
    return data_b64 or None  # Judge0 stores an empty output as null


def run_status(test: dict[str, Any], cpu_time_limit_s: float) -> tuple[int, str | None]:
    """(status id, message) of one run, from its test in the judgement."""
    verdict, status = test.get("verdict"), test.get("status")
    if verdict == "internal_error":
        message = test.get("message") or "the run could not be judged"
        return (EXEC_FORMAT_ERROR if "exec format error" in message.lower() else INTERNAL_ERROR), message
    cpu_ms = test.get("cpu_time_ms")
    if verdict == "time_limit_exceeded" or (cpu_ms is not None and cpu_ms / 1000 > cpu_time_limit_s):
        wall = test.get("limit_hit") == "wall_time"
        return TIME_LIMIT_EXCEEDED, "Time limit exceeded (wall clock)" if wall else "Time limit exceeded"
    if verdict == "memory_limit_exceeded":
        return OTHER_RUNTIME_ERROR, MEMORY_MESSAGE
    if verdict == "output_limit_exceeded":
        return SIGXFSZ_STATUS, OUTPUT_MESSAGE
    if status == "signaled":
        signal = test.get("signal")
        return SIGNAL_STATUSES.get(signal, OTHER_RUNTIME_ERROR), f"Caught fatal signal {signal}"
    if status == "runtime_error":
        return NZEC, f"Exited with error status {test.get('exit_code')}"
    return (WRONG_ANSWER if verdict == "wrong_answer" else ACCEPTED), None


def _compile_outcome(record: SubmissionRecord) -> Outcome:
    compile_result = record.compile or {}
    output_b64 = compile_result.get("output_base64")
    if output_b64 is None and compile_result.get("output"):
        output_b64 = _b64(compile_result["output"].encode())
    message = None
    if compile_result.get("status") == "time_limit_exceeded":
        output_b64 = _b64(b"Compilation time limit exceeded.")
    elif compile_result.get("status") not in (None, "ok", "runtime_error"):
        message = record.message  # the compiler hit a limit: say which
    return Outcome(COMPILATION_ERROR, message=message, compile_output_b64=_output(output_b64))


def outcome_of(record: SubmissionRecord) -> Outcome:
    if not record.final:
        return Outcome(IN_QUEUE if record.state == QUEUED else PROCESSING)
    if record.verdict == "compilation_error":
        return _compile_outcome(record)
    compile_output = _output((record.compile or {}).get("output_base64"))
    ran = [test for test in record.tests if test.get("verdict") != "skipped" and test.get("status") is not None]
    if not ran:
        return Outcome(INTERNAL_ERROR, message=record.message or "the submission was not judged",
                       compile_output_b64=compile_output)
    cpu_time_limit_s = float((record.request or {}).get("cpu_time_limit") or math.inf)
    # Judge0 runs until a run fails, and reports that run (or the last) and the runs' averages.
    deciding, status_id, message = len(ran) - 1, ACCEPTED, None
    for index, test in enumerate(ran):
        status_id, message = run_status(test, cpu_time_limit_s)
        if status_id != ACCEPTED:
            deciding = index
            break
    counted, test = ran[:deciding + 1], ran[deciding]
    internal = status_id in (INTERNAL_ERROR, EXEC_FORMAT_ERROR)
    return Outcome(
        status_id=status_id, message=message, stdout_b64=_output(test.get("stdout_base64")),
        stderr_b64=_output(test.get("stderr_base64")), compile_output_b64=compile_output,
        exit_code=None if internal else (test.get("exit_code") or 0), exit_signal=test.get("signal"),
        cpu_time_s=sum(run["cpu_time_ms"] or 0 for run in counted) / len(counted) / 1000,
        wall_time_s=sum(run["wall_time_ms"] or 0 for run in counted) / len(counted) / 1000,
        memory_kb=int(sum(run["memory_peak_bytes"] or 0 for run in counted) / len(counted) / KB),
    )


def judge0_time(stamp: str | None) -> str | None:
    """A stored UTC timestamp as Judge0 (Rails) writes one: milliseconds and a Z."""
    if stamp is None:
        return None
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _decimal(value: Any) -> str | None:
    # Judge0's decimal columns come out as strings ("5.0"); the SDK reads them with float().
    return None if value is None else str(float(value))


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


class NotUtf8(Exception):
    """A requested text field is not UTF-8: the client must ask for base64."""


def submission_values(record: SubmissionRecord, language: dict[str, Any]) -> dict[str, Any]:
    """Every attribute of the submission (ALL_FIELDS); text ones as base64."""
    request = record.request or {}
    outcome = outcome_of(record)
    return {
        "source_code": request.get("source_code"), "language_id": language["id"], "stdin": request.get("stdin"),
        "expected_output": request.get("expected_output"), "stdout": outcome.stdout_b64,
        "status_id": outcome.status_id, "created_at": judge0_time(record.created_at),
        "finished_at": judge0_time(record.finished_at), "time": _seconds(outcome.cpu_time_s),
        "memory": outcome.memory_kb, "stderr": outcome.stderr_b64, "token": token_of(record.id),
        "number_of_runs": request.get("number_of_runs"), "cpu_time_limit": _decimal(request.get("cpu_time_limit")),
        "cpu_extra_time": _decimal(request.get("cpu_extra_time")),
        "wall_time_limit": _decimal(request.get("wall_time_limit")), "memory_limit": request.get("memory_limit"),
        "stack_limit": request.get("stack_limit"),
        "max_processes_and_or_threads": request.get("max_processes_and_or_threads"),
        "enable_per_process_and_thread_time_limit": request.get("enable_per_process_and_thread_time_limit"),
        "enable_per_process_and_thread_memory_limit": request.get("enable_per_process_and_thread_memory_limit"),
        "max_file_size": request.get("max_file_size"), "compile_output": outcome.compile_output_b64,
        "exit_code": outcome.exit_code, "exit_signal": outcome.exit_signal,
        "message": None if outcome.message is None else _b64(outcome.message.encode()),
        "wall_time": _seconds(outcome.wall_time_s), "compiler_options": request.get("compiler_options"),
        "command_line_arguments": request.get("command_line_arguments"),
        "redirect_stderr_to_stdout": request.get("redirect_stderr_to_stdout"),
        "callback_url": request.get("callback_url"), "additional_files": request.get("additional_files"),
        "enable_network": request.get("enable_network"),
        "status": {"id": outcome.status_id, "description": STATUS_NAMES[outcome.status_id]},
        "language": language,
    }


def submission_object(values: dict[str, Any], fields: tuple[str, ...], base64_encoded: bool) -> dict[str, Any]:
    """The requested fields, text encoded as asked; raises NotUtf8 as Judge0 answers a 400."""
    answer = {}
    for name in fields:
        value = values[name]
        if name in TEXT_FIELDS and value is not None and not base64_encoded:
            try:
                value = base64.b64decode(value).decode("utf-8")
            except UnicodeDecodeError:
                raise NotUtf8(name) from None
        answer[name] = value
    return answer


# --- the routes ----------------------------------------------------------------------------

def _language_name(language: Language, judge: JudgeService) -> str:
    status = judge.status(language.id)
    return f"{language.name} ({status.version})" if status is not None and status.version else language.name


def _system_info() -> dict[str, str]:
    """What Judge0's /system_info shows (lscpu's and free's figures), from /proc."""
    info = {"Architecture": platform.machine(), "CPU(s)": str(os.cpu_count() or 0), "Kernel": platform.release()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    info["Model name"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            figures = dict(line.split(":", 1) for line in meminfo if ":" in line)
        for name, key in (("Mem", "MemTotal"), ("Swap", "SwapTotal")):
            if key in figures:
                info[name] = f"{int(figures[key].split()[0]) / (1 << 20):.1f}G"
    except OSError:
        pass  # the architecture and CPU count stand alone
    return info


class Judge0Routes:
    def __init__(self, context: ServiceContext) -> None:
        self.c = context
        self.callbacks = CallbackSender(CallbackAllowlist.parse(context.callback_hosts), context.log)
        self._system_info: dict[str, str] | None = None

    @property
    def judge(self) -> JudgeService:
        if self.c.judge is None:
            raise ApiError(503, "judge_unavailable", "this service does not judge submissions")
        return self.c.judge

    def _by_judge0_id(self) -> dict[int, Language]:
        return {language.judge0_id: language for language in self.judge.languages.values()}

    def _language_object(self, language_id: str) -> dict[str, Any]:
        language = self.judge.languages.get(language_id)
        if language is None:
            return {"id": None, "name": language_id}
        return {"id": language.judge0_id, "name": _language_name(language, self.judge)}

    async def _probed(self) -> None:
        """Wait for the start-up probes (bounded): what is available is known from then on."""
        judge = self.judge
        await judge.probed(list(judge.languages), PROBE_WAIT_S)

    def _refuse_unavailable(self, language: Language) -> None:
        status = self.judge.status(language.id)
        if status is None:
            raise ApiError(503, "language_probing", "the languages are still being probed; try again",
                           headers={"Retry-After": "5"})
        if not status.available:
            raise invalid("language_id", f"language with id {language.judge0_id} is not available on this "
                                         f"service: {status.reason}")

    def _refuse_while_draining(self) -> None:
        if self.c.draining():
            raise ApiError(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "5"})

    async def _parse(self, body: Any, base64_encoded: bool, tenant: Tenant) -> ParsedSubmission:
        # Decoding and unzipping are CPU work on up to megabytes: off the event loop.
        parsed = await asyncio.to_thread(
            parse_submission, body, base64_encoded=base64_encoded, languages=self._by_judge0_id(),
            policy=self.c.policy, tenant=tenant, callbacks=self.callbacks.allowlist)
        # Its language's probe only: a language still being probed holds up no other.
        await self.judge.probed([parsed.submission.language.id], PROBE_WAIT_S)
        self._refuse_unavailable(parsed.submission.language)
        return parsed

    def _on_finished(self, callback_url: str | None) -> Callable[[SubmissionRecord], Awaitable[None]] | None:
        if callback_url is None:
            return None

        async def send(record: SubmissionRecord) -> None:
            payload = submission_object(self._values(record), DEFAULT_FIELDS, base64_encoded=True)
            await self.callbacks.send(callback_url, payload, record.id)
        return send

    async def _submit(self, tenant: Tenant, parsed: ParsedSubmission) -> SubmissionRecord:
        try:
            return await self.judge.submit(tenant, parsed.submission, self._on_finished(parsed.callback_url))
        except QuotaError as error:
            headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else {}
            raise ApiError(error.http_status, error.code, str(error), error.details, headers) from None

    def _values(self, record: SubmissionRecord) -> dict[str, Any]:
        return submission_values(record, self._language_object(record.language))

    async def _records(self, tenant: Tenant, tokens: list[str]) -> list[SubmissionRecord | None]:
        """The submissions these tokens name, None for any this tenant may not see (another
        tenant's, or not made through this API)."""
        ids = [submission_id_of(token) for token in tokens]
        live = {submission_id: self.judge.live(submission_id) for submission_id in ids if submission_id}
        stored_ids = [submission_id for submission_id, record in live.items() if record is None]

        def read(connection) -> dict[str, SubmissionRecord | None]:
            return {submission_id: get_submission(connection, submission_id) for submission_id in stored_ids}
        stored = await self.c.reader.aread(read) if stored_ids else {}
        records = []
        for submission_id in ids:
            record = (live.get(submission_id) or stored.get(submission_id)) if submission_id else None
            visible = record is not None and (record.tenant == tenant.name or tenant.admin) and \
                (record.request or {}).get("api") == API_NAME
            records.append(record if visible else None)
        return records

    # --- submissions -----------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        base64_encoded = _flag(request.query.get("base64_encoded"), "base64_encoded")
        wait = _flag(request.query.get("wait"), "wait")
        fields = requested_fields(request.query.get("fields"))
        self._refuse_while_draining()
        tenant = request[TENANT_KEY]
        body = await _body(request)
        record = await self._submit(tenant, await self._parse(body, base64_encoded, tenant))
        if not wait:
            return _json({"token": token_of(record.id)}, 201)
        record = await self.judge.wait(record.id, MAX_WAIT_S) or record
        try:
            return _json(submission_object(self._values(record), fields, base64_encoded), 201)
        except NotUtf8:
            return _json({"error": NOT_UTF8, "token": token_of(record.id)}, 201)

    async def create_batch(self, request: web.Request) -> web.Response:
        base64_encoded = _flag(request.query.get("base64_encoded"), "base64_encoded")
        self._refuse_while_draining()
        tenant = request[TENANT_KEY]
        body = await _body(request)
        items = body.get("submissions") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, "empty_batch", "there should be at least one submission in a batch")
        if len(items) > MAX_BATCH_SUBMISSIONS:
            raise ApiError(400, "batch_too_large", f"number of submissions in a batch should be less than or equal "
                                                   f"to {MAX_BATCH_SUBMISSIONS}")
        answers: list[dict[str, Any]] = []
        refused: ApiError | None = None
        for item in items:
            try:
                record = await self._submit(tenant, await self._parse(item, base64_encoded, tenant))
                answers.append({"token": token_of(record.id)})
            except ApiError as error:
                if error.http_status == 422:
                    answers.append(field_errors(error))
                else:  # capacity, or the item is not an object: its own error, the others go on
                    refused = refused or error
                    answers.append({"error": error.message})
        if any("token" in answer for answer in answers):
            return _json(answers, 201)
        if refused is not None and refused.http_status in (429, 503):
            raise refused
        return _json(answers, 422)

    async def get(self, request: web.Request) -> web.Response:
        base64_encoded = _flag(request.query.get("base64_encoded"), "base64_encoded")
        fields = requested_fields(request.query.get("fields"))
        token = request.match_info["token"]
        record = (await self._records(request[TENANT_KEY], [token]))[0]
        if record is None:
            raise ApiError(404, "submission_not_found", f"submission with token {token} not found")
        try:
            return _json(submission_object(self._values(record), fields, base64_encoded))
        except NotUtf8:
            raise ApiError(400, "not_utf8", NOT_UTF8) from None

    async def get_batch(self, request: web.Request) -> web.Response:
        base64_encoded = _flag(request.query.get("base64_encoded"), "base64_encoded")
        fields = requested_fields(request.query.get("fields"))
        text = request.headers.get("tokens") or request.query.get("tokens") or ""
        tokens = [token for token in text.strip().split(",") if token]
        if not tokens:
            raise ApiError(400, "empty_batch", "there should be at least one submission in a batch")
        if len(tokens) > MAX_BATCH_SUBMISSIONS:
            raise ApiError(400, "batch_too_large", f"number of submissions in a batch should be less than or equal "
                                                   f"to {MAX_BATCH_SUBMISSIONS}")
        records = await self._records(request[TENANT_KEY], tokens)
        try:
            answers = [None if record is None else submission_object(self._values(record), fields, base64_encoded)
                       for record in records]
        except NotUtf8:
            raise ApiError(400, "not_utf8", NOT_UTF8_BATCH) from None
        return _json({"submissions": answers})

    async def list_all(self, request: web.Request) -> web.Response:
        raise ApiError(403, "not_supported", "listing submissions is not supported by this service: get each "
                                             "by its token (GET /submissions/{token} or /submissions/batch)")

    async def delete(self, request: web.Request) -> web.Response:
        raise ApiError(400, "delete_not_allowed", "delete not allowed")

    # --- languages, statuses, information --------------------------------------------------------

    async def languages(self, request: web.Request) -> web.Response:
        await self._probed()
        judge = self.judge
        listed = [{"id": language.judge0_id, "name": _language_name(language, judge)}
                  for language in judge.languages.values()
                  if (status := judge.status(language.id)) is not None and status.available]
        return _json(sorted(listed, key=lambda item: item["name"]))

    async def all_languages(self, request: web.Request) -> web.Response:
        await self._probed()
        judge = self.judge
        listed = [{"id": language.judge0_id, "name": _language_name(language, judge),
                   "is_archived": not ((status := judge.status(language.id)) is not None and status.available)}
                  for language in judge.languages.values()]
        return _json(sorted(listed, key=lambda item: item["name"]))

    async def language(self, request: web.Request) -> web.Response:
        text = request.match_info["language_id"]
        language = self._by_judge0_id().get(int(text)) if text.isdigit() else None
        if language is None:
            raise ApiError(404, "language_not_found", f"language with id {text} doesn't exist")
        await self._probed()
        status = self.judge.status(language.id)
        return _json({
            "id": language.judge0_id, "name": _language_name(language, self.judge),
            "is_archived": not (status is not None and status.available), "source_file": language.source_file,
            "compile_cmd": shlex.join(language.compile_argv) if language.compile_argv else None,
            "run_cmd": shlex.join(language.run_argv),
        })

    async def statuses(self, request: web.Request) -> web.Response:
        return _json([{"id": status_id, "description": name} for status_id, name in STATUSES])

    async def about(self, request: web.Request) -> web.Response:
        return _json({"version": JUDGE0_VERSION, "homepage": None, "source_code": None,
                      "maintainer": f"sandboxd {__version__} (Judge0-compatible API)"})

    async def version(self, request: web.Request) -> web.Response:
        return web.Response(text=JUDGE0_VERSION, content_type="text/plain")

    async def config_info(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT_KEY]
        bounds = bounds_for(self.c.policy, tenant)
        allowlist = self.callbacks.allowlist
        return _json({
            "maintenance_mode": self.c.draining(), "enable_wait_result": True, "enable_compiler_options": False,
            "allowed_languages_for_compile_options": [], "enable_command_line_arguments": True,
            "enable_submission_delete": False, "enable_callbacks": allowlist.enabled,
            "callbacks_max_tries": CALLBACK_TRIES, "callbacks_timeout": CALLBACK_TIMEOUT_S,
            "enable_additional_files": True,
            "max_queue_size": tenant.max_queued if tenant.max_queued is not None else self.c.scheduler.max_queue,
            "cpu_time_limit": bounds.cpu_time_s, "max_cpu_time_limit": bounds.max_cpu_time_s,
            "cpu_extra_time": 0.0, "max_cpu_extra_time": MAX_CPU_EXTRA_TIME_S,
            "wall_time_limit": bounds.wall_time_s, "max_wall_time_limit": bounds.max_wall_time_s,
            "memory_limit": bounds.memory_kb, "max_memory_limit": bounds.max_memory_kb,
            "stack_limit": bounds.stack_kb, "max_stack_limit": bounds.max_stack_kb,
            "max_processes_and_or_threads": bounds.processes, "max_max_processes_and_or_threads": bounds.max_processes,
            "enable_per_process_and_thread_time_limit": False, "allow_enable_per_process_and_thread_time_limit": False,
            "enable_per_process_and_thread_memory_limit": False,
            "allow_enable_per_process_and_thread_memory_limit": False,
            "max_file_size": bounds.file_size_kb, "max_max_file_size": bounds.max_file_size_kb,
            "number_of_runs": DEFAULT_RUNS, "max_number_of_runs": MAX_RUNS, "redirect_stderr_to_stdout": False,
            "max_extract_size": MAX_EXTRACT_KB, "enable_batched_submissions": True,
            "max_submission_batch_size": MAX_BATCH_SUBMISSIONS, "submission_cache_duration": 0.0,
            "use_docs_as_homepage": False, "allow_enable_network": False, "enable_network": False,
        })

    async def system_info(self, request: web.Request) -> web.Response:
        if self._system_info is None:
            self._system_info = await asyncio.to_thread(_system_info)
        return _json(self._system_info)

    async def authenticate(self, request: web.Request) -> web.Response:
        return web.Response(status=200)  # the key was checked on the way in

    async def authorize(self, request: web.Request) -> web.Response:
        if not request[TENANT_KEY].admin:
            raise ApiError(403, "forbidden", "this key is not an admin's")
        return web.Response(status=200)

    async def close(self, app: web.Application) -> None:
        await self.callbacks.close()


def add_routes(app: web.Application, context: ServiceContext) -> None:
    routes = Judge0Routes(context)
    context.error_styles[PREFIX + "/"] = error_response
    # Judge0's paths, each with and without a trailing slash. The fixed paths come before the
    # ones with a parameter they would match (batch before {token}, all before {language_id}).
    table: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/submissions/batch", routes.create_batch), ("GET", "/submissions/batch", routes.get_batch),
        ("POST", "/submissions", routes.create), ("GET", "/submissions", routes.list_all),
        ("GET", "/submissions/{token}", routes.get), ("DELETE", "/submissions/{token}", routes.delete),
        ("GET", "/languages/all", routes.all_languages), ("GET", "/languages", routes.languages),
        ("GET", "/languages/{language_id}", routes.language), ("GET", "/statuses", routes.statuses),
        ("GET", "/about", routes.about), ("GET", "/version", routes.version),
        ("GET", "/config_info", routes.config_info), ("GET", "/system_info", routes.system_info),
        ("POST", "/authenticate", routes.authenticate), ("POST", "/authorize", routes.authorize),
    ]
    for method, path, handler in table:
        for variant in (PREFIX + path, PREFIX + path + "/"):
            if method == "GET":
                app.router.add_get(variant, handler)
            else:
                app.router.add_route(method, variant, handler)
    app.on_cleanup.append(routes.close)
