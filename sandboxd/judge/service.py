"""The judge in the service: the language catalogue and what this machine makes of it, and the
submissions being judged.

Availability. Every language of the catalogue is probed once, at start-up, in a thread of
its own (`probe_language` is synchronous), with real jobs sent straight to the service's
runner: they are the service's own, accounted to no tenant. Until its probe answers a
language is "probing"; a submission naming it waits for that answer, and one naming a
language that is not available is refused, with the probe's reason.

Judging. A submission is a row in `submissions` (queued, running, finished) and, while it is
judged, an asyncio task running `judge()`. Every job it needs (the compile, each test, each
checker run) is submitted through the scheduler like any job, so it is queued fairly and
accounted to the tenant, labelled submission=<id> and role=<role> ("compile", "test 3",
"checker compile", "checker 3", "interactor compile", "interactor 3"). An interactive
test's two jobs are submitted as one batch, piped to each other (scheduler.py: the
interactor rides with the solution). A task cancelled (stop on first failure, the service
draining) cancels its scheduler jobs. Tests run in parallel up to the tenant's concurrency
limit, never more than MAX_PARALLEL_TESTS.

Restarts. A submission a previous process was judging cannot be resumed (its task died with
it): the next start finishes it as an internal error, and cancels whatever of its jobs the
scheduler's own recovery put back in the queue.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from sandboxd.job import InputFile, JobSpec, Result, StdioPipe, internal_error_result
from sandboxd.jobs import CANCELLED, JobRecord, JobRequest
from sandboxd.judge.checkers import OutputChecker, ProgramSource
from sandboxd.judge.judging import (Case, CaseVerdict, CompiledProgram, Judgement, RunJob, RunPair, Submission,
                                    build, excerpt, judge)
from sandboxd.judge.languages import Language, LanguageStatus, probe_language
from sandboxd.limits import Limits
from sandboxd.scheduler.scheduler import QuotaError, Scheduler
from sandboxd.store.db import Reader, Writer, utc_now
from sandboxd.store.jobs import JobFilter, get_job, list_jobs
from sandboxd.store.submissions import (FINISHED, QUEUED, RUNNING, SubmissionRecord, finish_submission,
                                        insert_submission, mark_submission_running, recover_submissions)
from sandboxd.store.tenants import Tenant

MAX_PARALLEL_TESTS = 4
COMPILE_OUTPUT_BYTES = 8192  # how much of the compiler's diagnostics a submission shows
CHECKER_OUTPUT_BYTES = 300
STOPPED_MESSAGE = "the service stopped before the submission was judged"
RESERVED_LABELS = ("submission", "role")
_JOB_WAIT_S = 3600.0  # one wait on the scheduler; waiting goes on until the job ends
_ORPHAN_JOBS_PAGE = 1000


@dataclass(frozen=True)
class SubmissionRequest:
    """A validated submission (api/submissions.py makes it): nothing unchecked."""

    language: Language
    source: bytes
    tests: tuple[Case, ...]
    checker: OutputChecker | ProgramSource
    stop_on_first_failure: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    files: tuple[InputFile, ...] = ()  # the submission's other files, beside the source
    # Keep each test's whole output (and the compiler's), base64, not only excerpts: for the
    # APIs that hand it back (Judge0's, Piston's), within the run's output limit.
    keep_output: bool = False
    # What the API that made it shows back with it (Judge0 echoes its request's fields).
    api_request: dict[str, Any] | None = None
    interactor: ProgramSource | None = None  # an interactive problem's: the checker is unused


OnFinished = Callable[[SubmissionRecord], Awaitable[None]]


@dataclass
class _Live:
    """A submission being judged, or finished with its row not yet written."""

    record: SubmissionRecord
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    on_finished: OnFinished | None = None


class _ThreadRunner:
    """What `probe_language` needs (a synchronous run) over the loop's async runner. `stop()`
    (from the loop) cancels the job running, which kills it, and refuses the next ones."""

    def __init__(self, run: Callable[[JobSpec], Awaitable[Result]], loop: asyncio.AbstractEventLoop) -> None:
        self._run = run
        self.loop = loop
        self._lock = threading.Lock()
        self._current: concurrent.futures.Future | None = None
        self.stopped = False

    def run(self, spec: JobSpec) -> Result:
        with self._lock:
            if self.stopped:
                raise _ProbesStopped()
            self._current = asyncio.run_coroutine_threadsafe(self._run(spec), self.loop)
        try:
            return self._current.result()
        except concurrent.futures.CancelledError:
            raise _ProbesStopped() from None

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            if self._current is not None:
                self._current.cancel()


class _ProbesStopped(Exception):
    """The service is stopping: no more probes."""


def compile_json(result: Result | None, keep_output: bool = False) -> dict[str, Any] | None:
    if result is None:
        return None
    data = {"status": result.status, "exit_code": result.exit_code,
            "output": excerpt(result.stderr, COMPILE_OUTPUT_BYTES), "cpu_time_ms": result.cpu_time_ms,
            "wall_time_ms": result.wall_time_ms, "memory_peak_bytes": result.memory_peak_bytes}
    if keep_output:
        data.update(output_base64=base64.b64encode(result.stderr).decode(), signal=result.signal,
                    limit_hit=result.limit_hit)
    return data


def case_json(verdict: CaseVerdict, keep_output: bool = False) -> dict[str, Any]:
    result = verdict.result
    data = {
        "name": verdict.name, "verdict": verdict.verdict, "message": verdict.message,
        "status": result.status if result else None, "exit_code": result.exit_code if result else None,
        "signal": result.signal if result else None, "cpu_time_ms": result.cpu_time_ms if result else None,
        "wall_time_ms": result.wall_time_ms if result else None,
        "memory_peak_bytes": result.memory_peak_bytes if result else None,
        "stdout_excerpt": excerpt(result.stdout) if result else None,
        "stderr_excerpt": excerpt(result.stderr) if result else None,
    }
    if keep_output:
        data["stdout_base64"] = base64.b64encode(result.stdout).decode() if result else None
        data["stderr_base64"] = base64.b64encode(result.stderr).decode() if result else None
        data["limit_hit"] = result.limit_hit if result else None
    return data


def capped(limits: Limits, tenant: Tenant) -> Limits:
    """Limits no larger than the tenant's per-job maxima (the catalogue's compile limits may be)."""
    changes: dict[str, Any] = {}
    if tenant.max_memory_bytes is not None and limits.memory_bytes > tenant.max_memory_bytes:
        changes["memory_bytes"] = tenant.max_memory_bytes
    if tenant.max_cpu_time_s is not None and limits.cpu_time_s > tenant.max_cpu_time_s:
        changes["cpu_time_s"] = tenant.max_cpu_time_s
    return dataclasses.replace(limits, **changes) if changes else limits


def parallel_tests(tenant: Tenant) -> int:
    """How many of a submission's tests run at once for this tenant."""
    bounds = [MAX_PARALLEL_TESTS] + [bound for bound in (tenant.max_concurrent, tenant.max_queued) if bound]
    return max(1, min(bounds))


class JudgeService:
    def __init__(self, *, languages: Mapping[str, Language], scheduler: Scheduler, writer: Writer, reader: Reader,
                 run: Callable[[JobSpec], Awaitable[Result]], log: Any) -> None:
        self.languages = dict(languages)
        self._scheduler = scheduler
        self._writer = writer
        self._reader = reader
        self._run = run  # the service's own runner: probes only
        self._log = log
        self._statuses: dict[str, LanguageStatus] = {}
        self._probed: dict[str, asyncio.Event] = {}
        self._live: dict[str, _Live] = {}
        self._cancels: set[asyncio.Task] = set()
        self._prober: _ThreadRunner | None = None

    # --- start-up: recovery and probes --------------------------------------------------------

    async def start(self) -> None:
        """After the scheduler's recovery: finish what a previous process was judging, then
        probe every language in the background."""
        interrupted = await self._writer.run(lambda c: recover_submissions(c, utc_now()))
        for submission_id in interrupted:
            self._log.warning("submission.interrupted_by_restart", submission_id=submission_id)
            await self._cancel_orphans(submission_id)
        self._probed = {language_id: asyncio.Event() for language_id in self.languages}
        self._prober = _ThreadRunner(self._run, asyncio.get_running_loop())
        threading.Thread(target=self._probe_all, args=(self._prober,), name="sandboxd-language-probe",
                         daemon=True).start()

    async def _cancel_orphans(self, submission_id: str) -> None:
        where = JobFilter(label=("submission", submission_id), limit=_ORPHAN_JOBS_PAGE)
        records, _ = await self._reader.aread(lambda c: list_jobs(c, where))
        for record in records:
            live = self._scheduler.live(record.id)
            if live is not None and not live.final:
                await self._scheduler.cancel(record.id)

    def _probe_all(self, runner: _ThreadRunner) -> None:
        for language in self.languages.values():
            try:
                status = probe_language(runner, language)
            except _ProbesStopped:
                return
            except Exception as error:  # noqa: BLE001 - the runner failed: a reason, not a crash
                status = LanguageStatus(available=False, version=None, reason=f"the probe could not run: {error}")
            try:
                runner.loop.call_soon_threadsafe(self._set_status, language.id, status)
            except RuntimeError:  # the loop is closed: the service stopped
                return

    def _set_status(self, language_id: str, status: LanguageStatus) -> None:
        self._statuses[language_id] = status
        self._log.info("language.probed", language=language_id, available=status.available,
                       version=status.version, reason=status.reason)
        self._probed[language_id].set()

    def status(self, language_id: str) -> LanguageStatus | None:
        """The language's probe's answer; None while it is probing."""
        return self._statuses.get(language_id)

    async def probed(self, language_ids: list[str], timeout_s: float) -> bool:
        """Wait until these languages are probed (at most timeout_s); whether they are."""
        events = [self._probed[language_id] for language_id in language_ids if language_id in self._probed]
        pending = [asyncio.ensure_future(event.wait()) for event in events if not event.is_set()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            for waiter in still:
                waiter.cancel()
        return all(language_id in self._statuses for language_id in language_ids)

    # --- submissions ---------------------------------------------------------------------------

    def live(self, submission_id: str) -> SubmissionRecord | None:
        live = self._live.get(submission_id)
        return None if live is None else live.record

    async def submit(self, tenant: Tenant, request: SubmissionRequest,
                     on_finished: OnFinished | None = None) -> SubmissionRecord:
        """Accept the submission (its row committed when this returns) and start judging it.
        `on_finished` is awaited with the final record once its row is committed (not after a
        restart: the submission's task died with the process). Raises QuotaError when the
        tenant or the service cannot take a job now."""
        self._scheduler.admit(tenant)
        record = SubmissionRecord(id=uuid.uuid4().hex, tenant=tenant.name, language=request.language.id,
                                  state=QUEUED, created_at=utc_now(), labels=request.labels,
                                  request=request.api_request)
        await self._writer.run(lambda c: insert_submission(c, record))
        live = _Live(record, on_finished=on_finished)
        self._live[record.id] = live
        live.task = asyncio.create_task(self._judge(live, tenant, request))
        self._log.info("submission.accepted", submission_id=record.id, tenant=tenant.name,
                       language=record.language, tests=len(request.tests))
        return record

    async def wait(self, submission_id: str, timeout_s: float) -> SubmissionRecord | None:
        """The submission once finished, or as it is at the timeout; None if not held here."""
        live = self._live.get(submission_id)
        if live is None:
            return None
        if not live.done.is_set():
            waiter = asyncio.ensure_future(live.done.wait())
            _, pending = await asyncio.wait([waiter], timeout=timeout_s)
            if pending:
                waiter.cancel()
        return live.record

    async def _judge(self, live: _Live, tenant: Tenant, request: SubmissionRequest) -> None:
        submission_id = live.record.id
        live.record = live.record.replace(state=RUNNING)
        try:
            await self._writer.run(lambda c: mark_submission_running(c, submission_id))
            verdict, message, compile_result, tests = await self._judgement(tenant, request, submission_id)
            final = live.record.replace(verdict=verdict, message=message, compile=compile_result, tests=tests)
        except asyncio.CancelledError:
            await self._finish(live, self._failed(live.record, STOPPED_MESSAGE))
            raise
        except QuotaError as error:
            final = self._failed(live.record, f"a job of the submission was refused: {error}")
        except Exception as error:  # noqa: BLE001 - the submission must end, not vanish
            self._log.exception("submission.failed", submission_id=submission_id)
            final = self._failed(live.record, f"judging failed: {type(error).__name__}: {error}")
        await self._finish(live, final)

    @staticmethod
    def _failed(record: SubmissionRecord, message: str) -> SubmissionRecord:
        return record.replace(verdict="internal_error", message=message)

    async def _finish(self, live: _Live, final: SubmissionRecord) -> None:
        # Waiters are answered once the row is committed: the writer commits in order, so the
        # rows of the submission's jobs are then stored too (a usage report counts them).
        final = final.replace(state=FINISHED, finished_at=utc_now())
        live.record = final
        self._log.info("submission.finished", submission_id=final.id, tenant=final.tenant, verdict=final.verdict)
        try:
            await self._writer.run(lambda c: finish_submission(c, final))
        except Exception as error:  # noqa: BLE001 - kept in memory: still served
            self._log.error("submission.result_not_stored", submission_id=final.id, error=str(error))
            return
        finally:
            live.done.set()
        self._live.pop(final.id, None)
        if live.on_finished is not None:
            try:
                await live.on_finished(final)
            except Exception:  # noqa: BLE001 - the submission is judged and stored all the same
                self._log.exception("submission.on_finished_failed", submission_id=final.id)

    async def _compiled(self, program: ProgramSource, what: str, tenant: Tenant,
                        run: RunJob) -> tuple[CompiledProgram | None, str | None]:
        """A checker or interactor compiled (within the tenant's maxima), or why it is not."""
        language = self.languages[program.language]
        language = dataclasses.replace(language, run_limits=capped(language.run_limits, tenant))
        files, result, failure = await build(language, program.source.encode(), run, f"{what} compile",
                                             capped(language.compile_limits, tenant))
        if files is None:
            said = failure or (excerpt(result.stderr, CHECKER_OUTPUT_BYTES).strip() if result else "")
            return None, f"the {what} does not compile" + (f": {said}" if said else "")
        return CompiledProgram(language, files), None

    async def _judgement(self, tenant: Tenant, request: SubmissionRequest, submission_id: str):
        """(verdict, message, compile, tests) as the submission's record holds them."""
        run = self._run_job(tenant, submission_id, request.labels)
        checker: OutputChecker | CompiledProgram | None = None
        interactor: CompiledProgram | None = None
        if request.interactor is not None:
            interactor, failure = await self._compiled(request.interactor, "interactor", tenant, run)
        elif isinstance(request.checker, ProgramSource):
            checker, failure = await self._compiled(request.checker, "checker", tenant, run)
        else:
            checker, failure = request.checker, None
        if failure is not None:
            return "internal_error", failure, None, ()
        submission = Submission(language=request.language, source=request.source, tests=request.tests,
                                checker=checker or OutputChecker("exact"),
                                stop_on_first_failure=request.stop_on_first_failure,
                                parallel_tests=parallel_tests(tenant),
                                compile_limits=capped(request.language.compile_limits, tenant), files=request.files,
                                interactor=interactor)
        judgement: Judgement = await judge(submission, run, self._run_pair(tenant, submission_id, request.labels))
        keep = request.keep_output
        return (judgement.verdict, judgement.message, compile_json(judgement.compile_result, keep),
                tuple(case_json(test, keep) for test in judgement.tests))

    # --- the jobs ------------------------------------------------------------------------------

    def _run_job(self, tenant: Tenant, submission_id: str, labels: tuple[tuple[str, str], ...]) -> RunJob:
        async def run(spec: JobSpec, role: str) -> Result:
            return (await self._run_together(tenant, submission_id, labels, ((spec, role),)))[0]
        return run

    def _run_pair(self, tenant: Tenant, submission_id: str, labels: tuple[tuple[str, str], ...]) -> RunPair:
        async def run_pair(solution: JobSpec, interactor: JobSpec, role: str) -> tuple[Result, Result]:
            group = uuid.uuid4().hex
            specs = ((dataclasses.replace(solution, stdio_pipe=StdioPipe(group, 0)), role),
                     (dataclasses.replace(interactor, stdio_pipe=StdioPipe(group, 1)),
                      role.replace("test", "interactor", 1)))
            first, second = await self._run_together(tenant, submission_id, labels, specs)
            return first, second
        return run_pair

    async def _run_together(self, tenant: Tenant, submission_id: str, labels: tuple[tuple[str, str], ...],
                            specs: tuple[tuple[JobSpec, str], ...]) -> list[Result]:
        """Submit the jobs in one batch (a piped pair starts together) and wait for all."""
        requests = [JobRequest(argv=spec.argv, image=spec.image, limits=spec.limits, stdin=spec.stdin,
                               files=spec.files, env=spec.env, stdio_pipe=spec.stdio_pipe,
                               labels=tuple(sorted({**dict(labels), "submission": submission_id,
                                                    "role": role}.items())))
                    for spec, role in specs]
        submitting = asyncio.ensure_future(self._scheduler.submit(tenant, requests))
        try:
            records = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(self._cancel_when_accepted)
            raise
        try:
            return list(await asyncio.gather(*(self._job_result(record.id) for record in records)))
        except asyncio.CancelledError:
            for record in records:
                self._cancel_job(record.id)
            raise

    def _cancel_when_accepted(self, submitting: asyncio.Future) -> None:
        if not submitting.cancelled() and submitting.exception() is None:
            for record in submitting.result():
                self._cancel_job(record.id)

    def _cancel_job(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._scheduler.cancel(job_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _job_result(self, job_id: str) -> Result:
        record: JobRecord | None = await self._scheduler.wait(job_id, _JOB_WAIT_S)
        while record is not None and not record.final and self._scheduler.live(job_id) is not None:
            record = await self._scheduler.wait(job_id, _JOB_WAIT_S)
        if record is None or not record.final:  # ended, and its row already written
            record = await self._reader.aread(lambda c: get_job(c, job_id))
        if record is None or not record.final:
            raise RuntimeError(f"job {job_id} is lost")
        if record.state == CANCELLED:
            return internal_error_result(f"job {job_id} was cancelled")
        return record.result or internal_error_result(f"job {job_id} ended without a result")

    # --- draining ------------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """Let submissions being judged finish within grace_s; stop the rest (internal errors,
        their jobs cancelled). New submissions are refused by the API meanwhile."""
        if self._prober is not None:
            self._prober.stop()
        tasks = [live.task for live in self._live.values() if live.task is not None and not live.task.done()]
        if tasks:
            self._log.info("judge.draining", submissions=len(tasks), grace_s=grace_s)
            await asyncio.wait(tasks, timeout=max(0.0, grace_s))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._cancels:
            await asyncio.gather(*list(self._cancels), return_exceptions=True)
