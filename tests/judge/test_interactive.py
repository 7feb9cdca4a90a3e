"""Interactive problems with real sandboxed jobs: the solution and the interactor, each in its
own container with its own limits, talk through pipes; the interactor's exit decides, and
neither side can hang the other past the wall limit."""

from __future__ import annotations

import asyncio

from conftest import EMULATED_CPU, overhead_ms, run_piped
from sandboxd.job import JobSpec, Result
from sandboxd.judge.checkers import OutputChecker
from sandboxd.judge.judging import CompiledProgram, Judgement, Submission, Case, build, interactor_job, judge
from sandboxd.judge.languages import load_languages

LANGUAGES = load_languages()
# A guessing game: the secret is in the test's input; each guess is answered "<" (the secret
# is smaller), ">" or "=". Binary search needs 20 guesses for a million; more are refused.
GUESSING_INTERACTOR = r'''
import sys
secret = int(open(sys.argv[1]).read())
for guesses in range(1, 21):
    line = sys.stdin.readline()
    if not line:
        print("the solution stopped guessing", file=sys.stderr)
        sys.exit(1)
    guess = int(line)
    if guess == secret:
        print("=", flush=True)
        print(f"found in {guesses} guesses", file=sys.stderr)
        sys.exit(0)
    print("<" if secret < guess else ">", flush=True)
print("more than 20 guesses", file=sys.stderr)
sys.exit(1)
'''
BINARY_SEARCH = r'''
#include <iostream>
#include <string>
int main() {
    long low = 1, high = 1000000;
    while (low <= high) {
        long middle = (low + high) / 2;
        std::cout << middle << std::endl;
        std::string answer;
        if (!(std::cin >> answer) || answer == "=") return 0;
        if (answer == "<") high = middle - 1; else low = middle + 1;
    }
}
'''
LINEAR_SEARCH = '''
guess = 1
while True:
    print(guess, flush=True)
    if input() == "=":
        break
    guess += 1
'''
SECRETS = (b"1\n", b"777777\n", b"1000000\n")
TEST_CPU_TIME_S, TEST_WALL_TIME_S = (12, 40) if EMULATED_CPU else (2, 4)


def _pair_runner(runtime):
    # The Runtime builds containers from the main thread only: one job or pair at a time here.
    async def run(spec: JobSpec, role: str) -> Result:
        return runtime.run(spec)

    async def run_pair(solution: JobSpec, interactor: JobSpec, role: str) -> tuple[Result, Result]:
        return run_piped(runtime, solution, interactor)
    return run, run_pair


def _compiled(runtime, language_id: str, source: str) -> CompiledProgram:
    language = LANGUAGES[language_id]
    files, _, failure = asyncio.run(build(language, source.encode(), _pair_runner(runtime)[0]))
    assert files is not None, failure
    return CompiledProgram(language, files)


def _judge_interactive(runtime, language_id: str, source: str, interactor: str = GUESSING_INTERACTOR,
                       **limits) -> Judgement:
    language = LANGUAGES[language_id]
    run_limits = language.run_limits_with({"cpu_time": TEST_CPU_TIME_S, "wall_time": TEST_WALL_TIME_S, **limits})
    tests = tuple(Case(f"secret {secret.decode().strip()}", secret, None, run_limits) for secret in SECRETS)
    submission = Submission(language=language, source=source.encode(), tests=tests, checker=OutputChecker("exact"),
                            interactor=_compiled(runtime, "python", interactor))
    run, run_pair = _pair_runner(runtime)
    return asyncio.run(judge(submission, run, run_pair))


def test_a_binary_search_wins_the_guessing_game(runtime):
    judgement = _judge_interactive(runtime, "cpp", BINARY_SEARCH)
    assert judgement.verdict == "accepted", judgement
    assert [test.verdict for test in judgement.tests] == ["accepted"] * 3
    assert all(test.message and test.message.startswith("found in ") for test in judgement.tests)
    assert int(judgement.tests[1].message.split()[2]) <= 20
    # What the solution wrote went to the interactor, not to the result.
    assert all(test.result.stdout == b"" for test in judgement.tests)


def test_a_linear_search_is_refused_by_the_interactor(runtime):
    judgement = _judge_interactive(runtime, "python", LINEAR_SEARCH)
    assert [test.verdict for test in judgement.tests] == ["accepted", "wrong_answer", "wrong_answer"], judgement
    assert judgement.verdict == "wrong_answer"
    assert judgement.tests[1].message == "more than 20 guesses"


def test_a_solution_that_waits_for_the_interactor_forever_is_a_time_limit(runtime):
    # Both read first: a deadlock. The solution's wall limit ends it, and the interactor then
    # reads end of file.
    judgement = _judge_interactive(runtime, "python", "input()", wall_time=1)
    for test in judgement.tests:
        assert (test.verdict, test.result.limit_hit) == ("time_limit_exceeded", "wall_time"), test
        assert test.result.wall_time_ms <= 1000 + overhead_ms(1000, 4000)


def test_a_solution_that_crashes_ends_the_game_at_once(runtime):
    judgement = _judge_interactive(runtime, "python", "raise SystemExit(3)")
    for test in judgement.tests:
        assert (test.verdict, test.message) == ("wrong_answer", "the solution stopped guessing"), test
        assert test.result.wall_time_ms < TEST_WALL_TIME_S * 1000 / 2


def test_a_crashing_interactor_is_an_internal_error_not_an_acceptance(runtime):
    broken = "import sys\nsys.stdin.readline()\nprint('cannot judge', file=sys.stderr)\nsys.exit(3)"
    judgement = _judge_interactive(runtime, "cpp", BINARY_SEARCH, interactor=broken)
    assert judgement.verdict == "internal_error"
    for test in judgement.tests:
        assert test.verdict == "internal_error" and "the interactor failed" in test.message, test
        assert "cannot judge" in test.message


def test_a_solution_over_its_memory_limit_is_a_memory_limit(runtime):
    greedy = "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))"
    judgement = _judge_interactive(runtime, "python", greedy, memory="64m")
    assert {test.verdict for test in judgement.tests} == {"memory_limit_exceeded"}, judgement


def test_the_interactor_keeps_its_own_limits_and_outlasts_the_solution():
    python = LANGUAGES["python"]
    interactor = CompiledProgram(python, ())
    slow = Case("1", b"5\n", b"", python.run_limits_with({"memory": "64m", "wall_time": 30}))
    spec = interactor_job(interactor, slow)
    assert spec.limits.memory_bytes == python.run_limits.memory_bytes != slow.limits.memory_bytes
    assert spec.limits.wall_time_s == 31
    assert spec.argv[-2:] == ("input", "expected_output")
    assert {file.path: file.content for file in spec.files} == {"input": b"5\n", "expected_output": b""}
