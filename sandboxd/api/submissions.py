"""The judging API: submissions (a source, a language, tests, a checker) judged by the judge
service, and the languages it knows. Validation at the edge, as for jobs: untrusted JSON in,
a SubmissionRequest (or a 422 naming the field) out; unknown fields are refused."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from sandboxd.api.errors import ApiError, invalid
from sandboxd.api.http import (DEFAULT_WAIT_S, JOB_ID_RE, MAX_WAIT_S, TENANT_KEY, ServiceContext, _body, _flag,
                               _json, _number, _query)
from sandboxd.api.requests import (LABEL_NAME_RE, MAX_LABEL_VALUE_CHARS, MAX_LABELS, _content, _files, _object,
                                   _string_map)
from sandboxd.judge.checkers import CheckerError, ProgramSource, parse_checker
from sandboxd.job import InputFile
from sandboxd.judge.judging import Case
from sandboxd.judge.languages import Language
from sandboxd.judge.service import RESERVED_LABELS, JudgeService, SubmissionRequest
from sandboxd.limits import LimitError, LimitPolicy, Limits
from sandboxd.scheduler.scheduler import QuotaError
from sandboxd.store.submissions import SubmissionRecord, get_submission
from sandboxd.store.tenants import Tenant

SUBMISSION_FIELDS = {"language", "source", "files", "tests", "checker", "interactor", "limits",
                     "stop_on_first_failure", "labels"}
INTERACTOR_FIELDS = {"language", "source"}
TEST_FIELDS = {"name", "stdin", "expected_output", "limits"}
MAX_SOURCE_BYTES = 1 << 20
MAX_TESTS = 100
MAX_TESTS_BYTES = 16 << 20  # every test's stdin and expected output together
MAX_TEST_NAME_CHARS = 128
PROBE_WAIT_S = 120.0  # how long a submission waits for its language's probe at start-up
_LIMIT_NAME_RE = re.compile(r"(?:unknown limit '([a-z_]+)'|([a-z_]+)\b)")


# --- parsing ---------------------------------------------------------------------------------

def _language(value: Any, field: str, languages: dict[str, Language]) -> Language:
    if not isinstance(value, str) or value not in languages:
        raise invalid(field, f"unknown language {value!r} (known: {', '.join(languages)})")
    return languages[value]


def _limit_overrides(value: Any, field: str) -> dict[str, Any]:
    overrides = dict(_object(value, field))
    for name, item in overrides.items():
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise invalid(f"{field}.{name}", "must be a number or a string such as '256m'")
    return overrides


def _run_limits(language: Language, overrides: dict[str, Any], field: str, policy: LimitPolicy,
                tenant: Tenant) -> Limits:
    """A test's limits: the language's, the request's overrides, within the policy's and the
    tenant's maxima (which also cap the defaults, as for jobs)."""
    overrides = dict(overrides)
    if "memory" not in overrides and tenant.max_memory_bytes is not None:
        overrides["memory"] = min(language.run_limits.memory_bytes, tenant.max_memory_bytes)
    if "cpu_time" not in overrides and tenant.max_cpu_time_s is not None:
        overrides["cpu_time"] = min(language.run_limits.cpu_time_s, tenant.max_cpu_time_s)
    try:
        limits = language.run_limits_with(overrides, policy, "limits")
    except LimitError as error:
        message = str(error).removeprefix("limits: ")
        match = _LIMIT_NAME_RE.match(message)
        name = (match.group(1) or match.group(2)) if match else None
        raise invalid(f"{field}.{name}" if name else field, message) from None
    if tenant.max_memory_bytes is not None and limits.memory_bytes > tenant.max_memory_bytes:
        raise invalid(f"{field}.memory", f"{limits.memory_bytes} bytes is over this tenant's maximum "
                                         f"{tenant.max_memory_bytes}")
    if tenant.max_cpu_time_s is not None and limits.cpu_time_s > tenant.max_cpu_time_s:
        raise invalid(f"{field}.cpu_time", f"{limits.cpu_time_s:g} s is over this tenant's maximum "
                                           f"{tenant.max_cpu_time_s:g} s")
    return limits


def _tests(value: Any, language: Language, shared: dict[str, Any], policy: LimitPolicy,
           tenant: Tenant) -> tuple[Case, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("tests", "must be a non-empty list of tests")
    if len(value) > MAX_TESTS:
        raise invalid("tests", f"at most {MAX_TESTS} tests, got {len(value)}")
    tests, names, total = [], set(), 0
    for index, item in enumerate(value):
        where = f"tests[{index}]"
        test = _object(item, where)
        unknown = sorted(set(test) - TEST_FIELDS)
        if unknown:
            raise invalid(f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(TEST_FIELDS))})")
        name = test.get("name", str(index + 1))
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_TEST_NAME_CHARS or "\x00" in name:
            raise invalid(f"{where}.name", f"must be a non-empty string of at most {MAX_TEST_NAME_CHARS} characters")
        if name in names:
            raise invalid(f"{where}.name", f"another test is named {name!r}")
        names.add(name)
        stdin = _content(test["stdin"], f"{where}.stdin") if test.get("stdin") is not None else b""
        expected = (_content(test["expected_output"], f"{where}.expected_output")
                    if test.get("expected_output") is not None else None)
        total += len(stdin) + len(expected or b"")
        if total > MAX_TESTS_BYTES:
            raise invalid("tests", f"the tests' inputs and expected outputs are over {MAX_TESTS_BYTES} bytes")
        overrides = {**shared, **_limit_overrides(test.get("limits", {}), f"{where}.limits")}
        limits = _run_limits(language, overrides, f"{where}.limits", policy, tenant)
        tests.append(Case(name=name, stdin=stdin, expected_output=expected, limits=limits))
    return tuple(tests)


def _source_and_files(submission: dict[str, Any], language: Language) -> tuple[bytes, tuple[InputFile, ...]]:
    """The source, and the other files beside it. Without `source`, the file named as the
    language's source file (main.c, main.py, ...) is the source."""
    files = _files(submission.get("files", {}))
    named = [file for file in files if file.path == language.source_file]
    if "source" in submission:
        if named:
            raise invalid(f"files[{language.source_file!r}]", "is the source's own name: give it as `source` only")
        source = _content(submission["source"], "source")
    elif named:
        source, files = named[0].content, tuple(file for file in files if file is not named[0])
    else:
        raise invalid("source", f"is required (or a file named {language.source_file!r} in `files`)")
    if not source.strip():
        raise invalid("source", "must not be empty")
    if len(source) + sum(len(file.content) for file in files) > MAX_SOURCE_BYTES:
        raise invalid("source", f"the source and its files are over {MAX_SOURCE_BYTES} bytes")
    return source, files


def _program(program: ProgramSource, field: str, languages: dict[str, Language]) -> None:
    _language(program.language, f"{field}.language", languages)
    if len(program.source.encode()) > MAX_SOURCE_BYTES:
        raise invalid(f"{field}.source", f"is over {MAX_SOURCE_BYTES} bytes")


def _interactor(value: Any, languages: dict[str, Language]) -> ProgramSource:
    interactor = _object(value, "interactor")
    unknown = sorted(set(interactor) - INTERACTOR_FIELDS)
    if unknown:
        raise invalid(f"interactor.{unknown[0]}", f"unknown field (known: {', '.join(sorted(INTERACTOR_FIELDS))})")
    for name in sorted(INTERACTOR_FIELDS):
        if not isinstance(interactor.get(name), str) or not interactor[name].strip():
            raise invalid(f"interactor.{name}", "is required: a non-empty string")
    program = ProgramSource(language=interactor["language"], source=interactor["source"])
    _program(program, "interactor", languages)
    return program


def parse_submission(body: Any, *, languages: dict[str, Language], policy: LimitPolicy,
                     tenant: Tenant) -> SubmissionRequest:
    submission = _object(body, "submission")
    unknown = sorted(set(submission) - SUBMISSION_FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unknown field (known: {', '.join(sorted(SUBMISSION_FIELDS))})")
    for required in ("language", "tests"):
        if required not in submission:
            raise invalid(required, "is required")
    language = _language(submission["language"], "language", languages)
    source, files = _source_and_files(submission, language)
    try:
        checker = parse_checker(submission.get("checker", "lines"))
    except CheckerError as error:
        raise invalid("checker", str(error).removeprefix("checker: ")) from None
    if isinstance(checker, ProgramSource):
        _program(checker, "checker", languages)
    interactor = None
    if submission.get("interactor") is not None:
        if "checker" in submission:
            raise invalid("checker", "an interactive submission is judged by its interactor, not a checker")
        interactor = _interactor(submission["interactor"], languages)
    shared = _limit_overrides(submission.get("limits", {}), "limits")
    _run_limits(language, shared, "limits", policy, tenant)  # its mistakes are named as its own
    stop = submission.get("stop_on_first_failure", False)
    if not isinstance(stop, bool):
        raise invalid("stop_on_first_failure", "must be true or false")
    labels = tuple(sorted(_string_map(submission.get("labels", {}), "labels", LABEL_NAME_RE,
                                      MAX_LABELS - len(RESERVED_LABELS), "label name", MAX_LABEL_VALUE_CHARS)))
    for name, _ in labels:
        if name in RESERVED_LABELS:
            raise invalid(f"labels[{name!r}]", "is set by the service on the submission's jobs")
    return SubmissionRequest(language=language, source=source,
                             tests=_tests(submission["tests"], language, shared, policy, tenant),
                             checker=checker, stop_on_first_failure=stop, labels=labels, interactor=interactor,
                             files=files)


# --- objects ---------------------------------------------------------------------------------

def submission_object(record: SubmissionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "state": record.state,
        "language": record.language,
        "verdict": record.verdict,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "message": record.message,
        "labels": dict(record.labels),
        "compile": record.compile,
        "tests": list(record.tests),
    }


def language_object(language: Language, judge: JudgeService) -> dict[str, Any]:
    status = judge.status(language.id)
    return {
        "id": language.id,
        "name": language.name,
        "version": status.version if status else None,
        "status": "probing" if status is None else ("available" if status.available else "unavailable"),
        "available": bool(status and status.available),
        "reason": "the language is being probed" if status is None else status.reason,
        "judge0_id": language.judge0_id,
        "piston": list(language.piston_names),
    }


# --- routes ----------------------------------------------------------------------------------

class SubmissionRoutes:
    def __init__(self, context: ServiceContext) -> None:
        self.c = context

    @property
    def judge(self) -> JudgeService:
        if self.c.judge is None:
            raise ApiError(503, "judge_unavailable", "this service does not judge submissions")
        return self.c.judge

    async def _refuse_unavailable(self, request: SubmissionRequest) -> None:
        """422 for a language this machine cannot run (the submission's, or its checker's)."""
        judge = self.judge
        wanted = [("language", request.language.id)]
        if isinstance(request.checker, ProgramSource):
            wanted.append(("checker.language", request.checker.language))
        if request.interactor is not None:
            wanted.append(("interactor.language", request.interactor.language))
        if not await judge.probed([language_id for _, language_id in wanted], PROBE_WAIT_S):
            raise ApiError(503, "language_probing", "the languages are still being probed; try again",
                           headers={"Retry-After": "5"})
        for field, language_id in wanted:
            status = judge.status(language_id)
            if status is not None and not status.available:
                raise invalid(field, f"language {language_id!r} is not available on this service: {status.reason}")

    async def create(self, request: web.Request) -> web.Response:
        query = _query(request, {"wait", "timeout"})
        wait = _flag(query.get("wait"), "wait")
        timeout_s = _number(query.get("timeout"), "timeout", DEFAULT_WAIT_S, 0, MAX_WAIT_S)
        if self.c.draining():
            raise ApiError(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "5"})
        judge = self.judge
        tenant = request[TENANT_KEY]
        submission = parse_submission(await _body(request), languages=judge.languages, policy=self.c.policy,
                                      tenant=tenant)
        await self._refuse_unavailable(submission)
        try:
            record = await judge.submit(tenant, submission)
        except QuotaError as error:
            headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else {}
            raise ApiError(error.http_status, error.code, str(error), error.details, headers) from None
        if wait:
            record = await judge.wait(record.id, timeout_s) or record
        return _json(submission_object(record), 200 if wait and record.final else 201)

    async def get(self, request: web.Request) -> web.Response:
        _query(request, set())
        submission_id = request.match_info["submission_id"]
        tenant = request[TENANT_KEY]
        record = None
        if JOB_ID_RE.match(submission_id):
            record = self.judge.live(submission_id)
            if record is None:
                record = await self.c.reader.aread(lambda c: get_submission(c, submission_id))
        if record is None or (record.tenant != tenant.name and not tenant.admin):
            raise ApiError(404, "submission_not_found", f"no submission {submission_id!r}")
        return _json(submission_object(record))

    async def languages(self, request: web.Request) -> web.Response:
        query = _query(request, {"wait", "timeout"})
        judge = self.judge
        if _flag(query.get("wait"), "wait"):
            timeout_s = _number(query.get("timeout"), "timeout", DEFAULT_WAIT_S, 0, MAX_WAIT_S)
            await judge.probed(list(judge.languages), timeout_s)
        return _json({"languages": [language_object(language, judge) for language in judge.languages.values()]})


def add_routes(app: web.Application, context: ServiceContext) -> None:
    routes = SubmissionRoutes(context)
    app.router.add_post("/v1/submissions", routes.create)
    app.router.add_get("/v1/submissions/{submission_id}", routes.get)
    app.router.add_get("/v1/languages", routes.languages)
