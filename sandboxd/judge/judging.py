"""Judging one submission: compile once, run every test on the compiled files, check each
output, and give a verdict per test and overall.

The jobs go through a `RunJob` the caller gives (the service's scheduler, so each one is
queued fairly and accounted to the tenant; or a Runtime directly), named by their role
("compile", "test 3", "checker 3"). Tests run up to `parallel_tests` at once, in order;
`stop_on_first_failure` cancels the tests after the first that fails (those before it still
run: the overall verdict is the first failing test's, in order, as judges report it).

A compile that exceeds its limits is a compilation error (a compiler bomb is the
submitter's, not the service's, failure), with what the compiler printed. A checker program
gets the test's input, the expected output and the program's output as files `input`,
`expected_output` and `output` in its working directory and their names as arguments; exit
0 accepts, 1 rejects, anything else (another status, a signal, a limit) is the checker's
failure: an `internal_error` that says so, never an acceptance. (An uncaught Python
exception exits 1: a Python checker should catch its own errors and exit 2.)

An interactive problem's interactor replaces the checker: for each test, the solution and
the interactor run at once through a `RunPair`, each one's stdout piped to the other's
stdin, and `interactive_verdict` reads the interactor's exit (the same 0 / 1 / other).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sandboxd.job import InputFile, JobSpec, Result
from sandboxd.judge.checkers import OutputChecker
from sandboxd.judge.languages import ArtifactError, Language, compile_job, compiled_files, run_job, source_files
from sandboxd.limits import Limits

VERDICTS = ("accepted", "wrong_answer", "time_limit_exceeded", "memory_limit_exceeded", "output_limit_exceeded",
            "runtime_error", "compilation_error", "internal_error", "skipped")
EXCERPT_BYTES = 1024
CHECKER_INPUTS = ("input", "expected_output", "output")
_STATUS_VERDICTS = {
    "time_limit_exceeded": "time_limit_exceeded",
    "memory_limit_exceeded": "memory_limit_exceeded",
    "output_limit_exceeded": "output_limit_exceeded",
    "runtime_error": "runtime_error",
    "signaled": "runtime_error",
    "internal_error": "internal_error",
}

RunJob = Callable[[JobSpec, str], Awaitable[Result]]
# Two jobs connected by pipes (the solution's and the interactor's, in that order), run
# together to their end; the role names the test.
RunPair = Callable[[JobSpec, JobSpec, str], Awaitable[tuple[Result, Result]]]
INTERACTOR_INPUTS = ("input", "expected_output")


@dataclass(frozen=True)
class Case:
    name: str
    stdin: bytes
    expected_output: bytes | None  # None: any output is accepted (a run, not a check)
    limits: Limits
    args: tuple[str, ...] = ()  # after the language's run command


@dataclass(frozen=True)
class CompiledProgram:
    """A checker program or an interactor, ready to run: its language and the files its
    compile left."""

    language: Language
    files: tuple[InputFile, ...]


@dataclass(frozen=True)
class Submission:
    language: Language
    source: bytes
    tests: tuple[Case, ...]
    checker: OutputChecker | CompiledProgram
    stop_on_first_failure: bool = False
    parallel_tests: int = 1
    compile_limits: Limits | None = None  # None: the language's
    files: tuple[InputFile, ...] = ()  # the submission's other files, beside the source
    interactor: CompiledProgram | None = None  # an interactive problem's: the checker is not used


@dataclass(frozen=True)
class CaseVerdict:
    name: str
    verdict: str
    result: Result | None  # None when the test did not run (skipped)
    message: str | None = None  # the checker's, or why the verdict is what it is


@dataclass(frozen=True)
class Judgement:
    verdict: str
    compile_result: Result | None  # None for a language without a compile step
    tests: tuple[CaseVerdict, ...] = field(default=())
    message: str | None = None


def excerpt(data: bytes, limit_bytes: int = EXCERPT_BYTES) -> str:
    """The start of an output, as text, for people (the whole of it is not kept)."""
    text = data[:limit_bytes].decode("utf-8", errors="replace")
    return text + ("…" if len(data) > limit_bytes else "")


def compile_verdict(result: Result) -> tuple[str, str | None]:
    """(verdict, message) of a compile job that did not succeed."""
    if result.status == "internal_error":
        return "internal_error", result.message or "the compile job could not run"
    if result.status == "ok":
        return "compilation_error", None
    if result.status in ("time_limit_exceeded", "memory_limit_exceeded", "output_limit_exceeded"):
        return "compilation_error", f"the compiler exceeded its {result.limit_hit or 'limits'} limit"
    return "compilation_error", f"the compiler ended with {result.status}"


async def build(language: Language, source: bytes, run: RunJob, role: str = "compile",
                limits: Limits | None = None, others: tuple[InputFile, ...] = ()
                ) -> tuple[tuple[InputFile, ...] | None, Result | None, str | None]:
    """(the files every run is given, the compile's result, a failure message). Files are
    None when the compile failed; a language without a compile step gets its source (and
    `others`, the submission's other files)."""
    if language.compile_argv is None:
        return source_files(language, source, others), None, None
    result = await run(compile_job(language, source, limits, others), role)
    if result.status != "ok" or result.exit_code != 0:
        return None, result, compile_verdict(result)[1]
    try:
        return compiled_files(result), result, None
    except ArtifactError as error:
        return None, result, str(error)


def run_verdict(result: Result) -> str | None:
    """The verdict a run's end gives by itself; None when it ended well (the output decides)."""
    if result.status == "ok":
        return None
    return _STATUS_VERDICTS.get(result.status, "internal_error")


async def _check(submission: Submission, test: Case, result: Result, run: RunJob,
                 index: int) -> tuple[str, str | None]:
    if test.expected_output is None:
        return "accepted", None
    if isinstance(submission.checker, OutputChecker):
        outcome = submission.checker.check(test.expected_output, result.stdout)
        return ("accepted" if outcome.accepted else "wrong_answer"), (None if outcome.accepted else outcome.message)
    checker = submission.checker
    files = checker.files + tuple(InputFile(path=name, content=content) for name, content in
                                  zip(CHECKER_INPUTS, (test.stdin, test.expected_output, result.stdout)))
    spec = run_job(checker.language, files, None)
    spec = JobSpec(argv=spec.argv + CHECKER_INPUTS, limits=spec.limits, image=spec.image, files=spec.files)
    verdict = await run(spec, f"checker {index + 1}")
    said = excerpt(verdict.stdout + verdict.stderr, 300).strip() or None
    if verdict.status == "ok" and verdict.exit_code == 0:
        return "accepted", said
    if verdict.status == "runtime_error" and verdict.exit_code == 1:
        return "wrong_answer", said
    return "internal_error", f"the checker failed ({verdict.status}, exit {verdict.exit_code})" + (
        f": {said}" if said else "")


def _ran_out_of_memory(language: Language, result: Result) -> bool:
    return bool(result.status == "runtime_error" and language.memory_error
                and language.memory_error.encode() in result.stderr)


async def _run_test(submission: Submission, files: tuple[InputFile, ...], index: int, run: RunJob,
                    run_pair: RunPair | None) -> CaseVerdict:
    test = submission.tests[index]
    language = submission.language
    solution = run_job(language, files, test.stdin, test.limits, test.args)
    if submission.interactor is not None:
        assert run_pair is not None
        return await _run_interactive(submission.interactor, test, solution, run_pair, index)
    result = await run(solution, f"test {index + 1}")
    verdict = run_verdict(result)
    if _ran_out_of_memory(language, result):
        return CaseVerdict(test.name, "memory_limit_exceeded", result, f"{language.memory_error} on stderr")
    if verdict is not None:
        return CaseVerdict(test.name, verdict, result, result.message if verdict == "internal_error" else None)
    verdict, message = await _check(submission, test, result, run, index)
    return CaseVerdict(test.name, verdict, result, message)


def interactor_job(interactor: CompiledProgram, test: Case) -> JobSpec:
    """The interactor's job for a test: the test's input and expected output as files (their
    names as arguments), its wall clock at least the solution's and a second, so that a slow
    solution is the solution's time limit and not the interactor's failure."""
    inputs = (test.stdin, test.expected_output if test.expected_output is not None else b"")
    files = interactor.files + tuple(InputFile(path=name, content=content)
                                     for name, content in zip(INTERACTOR_INPUTS, inputs))
    limits = interactor.language.run_limits
    limits = dataclasses.replace(limits, wall_time_s=max(limits.wall_time_s, test.limits.wall_time_s + 1))
    spec = run_job(interactor.language, files, None, limits)
    return dataclasses.replace(spec, argv=spec.argv + INTERACTOR_INPUTS)


async def _run_interactive(interactor: CompiledProgram, test: Case, solution: JobSpec, run_pair: RunPair,
                           index: int) -> CaseVerdict:
    solution = dataclasses.replace(solution, stdin=None)
    result, judged = await run_pair(solution, interactor_job(interactor, test), f"test {index + 1}")
    verdict, message = interactive_verdict(interactor.language, result, judged)
    return CaseVerdict(test.name, verdict, result, message)


def interactive_verdict(language: Language, result: Result, judged: Result) -> tuple[str, str | None]:
    """(verdict, message) of an interactive test from the solution's run and the
    interactor's. The solution's limits come first (a solution too slow to answer is its
    own time limit, whatever the interactor concluded); then the interactor's exit decides:
    1 rejects, 0 accepts unless the solution crashed (a runtime error). An interactor killed
    by SIGPIPE wrote to a solution that had left: the solution's crash, or a rejection.
    Anything else is the interactor's failure, an internal error."""
    said = excerpt(judged.stderr, 300).strip() or None
    verdict = run_verdict(result)
    if _ran_out_of_memory(language, result):
        return "memory_limit_exceeded", f"{language.memory_error} on stderr"
    if verdict in ("time_limit_exceeded", "memory_limit_exceeded", "output_limit_exceeded", "internal_error"):
        return verdict, result.message if verdict == "internal_error" else said
    crashed = verdict == "runtime_error" and result.signal != signal.SIGPIPE
    if judged.status == "runtime_error" and judged.exit_code == 1:
        return "wrong_answer", said
    if judged.status == "ok" and judged.exit_code == 0:
        return ("runtime_error", said) if crashed else ("accepted", said)
    if judged.signal == signal.SIGPIPE:  # it wrote to a solution that had left
        return ("runtime_error", said) if crashed else (
            "wrong_answer", said or "the solution ended before the interactor was done")
    return "internal_error", f"the interactor failed ({judged.status}, exit {judged.exit_code}" + (
        f", signal {judged.signal})" if judged.signal else ")") + (f": {said}" if said else "")


async def judge(submission: Submission, run: RunJob, run_pair: RunPair | None = None) -> Judgement:
    """Judge a submission; `run_pair` is needed when it has an interactor."""
    if submission.interactor is not None and run_pair is None:
        raise ValueError("an interactive submission needs a way to run piped jobs")
    files, compile_result, failure = await build(submission.language, submission.source, run,
                                                 limits=submission.compile_limits, others=submission.files)
    if files is None:
        assert compile_result is not None
        verdict = compile_verdict(compile_result)[0] if compile_result.status != "ok" or \
            compile_result.exit_code != 0 else "internal_error"
        return Judgement(verdict, compile_result, message=failure)
    verdicts = await _run_tests(submission, files, run, run_pair)
    overall = next((test.verdict for test in verdicts if test.verdict not in ("accepted", "skipped")), "accepted")
    return Judgement(overall, compile_result, verdicts)


async def _run_tests(submission: Submission, files: tuple[InputFile, ...], run: RunJob,
                     run_pair: RunPair | None) -> tuple[CaseVerdict, ...]:
    count = len(submission.tests)
    slots = asyncio.Semaphore(max(1, submission.parallel_tests))
    first_failure = count  # the index of the first failing test seen so far
    tasks: list[asyncio.Task] = []

    async def one(index: int) -> CaseVerdict:
        nonlocal first_failure
        async with slots:
            if index > first_failure:
                return CaseVerdict(submission.tests[index].name, "skipped", None, "an earlier test failed")
            verdict = await _run_test(submission, files, index, run, run_pair)
        if submission.stop_on_first_failure and verdict.verdict != "accepted" and index < first_failure:
            first_failure = index
            for later in tasks[index + 1:]:
                later.cancel()
        return verdict

    tasks = [asyncio.create_task(one(index)) for index in range(count)]
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    verdicts = []
    for index, task in enumerate(tasks):
        if task.cancelled():
            verdicts.append(CaseVerdict(submission.tests[index].name, "skipped", None, "an earlier test failed"))
        elif task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        else:
            verdicts.append(task.result())
    return tuple(verdicts)
