"""Judging submissions with real sandboxed jobs: one compile, every test on its files, each
output checked, a verdict per test and overall, for every shipped language."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import pytest

from conftest import EMULATED_CPU, JVM_FLAGS
from sandboxd.job import JobSpec, Result
from sandboxd.judge.checkers import OutputChecker
from sandboxd.judge.judging import CompiledProgram, Judgement, Submission, Case, build, judge
from sandboxd.judge.languages import load_languages

LANGUAGES = load_languages()

# A + B in each language, and the same program wrong, slow, greedy and crashing.
SOURCES = {
    "c": {
        "accepted": "#include <stdio.h>\nint main(void){long a,b;scanf(\"%ld %ld\",&a,&b);printf(\"%ld\\n\",a+b);}",
        "wrong_answer": "#include <stdio.h>\nint main(void){long a,b;scanf(\"%ld %ld\",&a,&b);printf(\"%ld\\n\",a-b);}",
        "time_limit_exceeded": "int main(void){volatile long x=0;for(;;)x++;}",
        "memory_limit_exceeded": "#include <stdlib.h>\n#include <string.h>\nint main(void){for(;;){char*p=malloc(1<<20);"
                                 "if(!p)return 3;memset(p,1,1<<20);}}",
        "runtime_error": "int main(void){int*p=0;return *p;}",
        "compilation_error": "int main(void){ this is not C }",
    },
    "cpp": {
        "accepted": "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<'\\n';}",
        "wrong_answer": "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a*b<<'\\n';}",
        "time_limit_exceeded": "int main(){volatile long x=0;for(;;)x++;}",
        "memory_limit_exceeded": "#include <vector>\nint main(){std::vector<std::vector<char>> v;"
                                 "for(;;)v.emplace_back(1<<20,1);}",
        "runtime_error": "#include <stdexcept>\nint main(){throw std::runtime_error(\"boom\");}",
        "compilation_error": "int main(){ return undeclared; }",
    },
    "python": {
        "accepted": "a, b = map(int, input().split())\nprint(a + b)",
        "wrong_answer": "a, b = map(int, input().split())\nprint(a + b + 1)",
        "time_limit_exceeded": "while True:\n    pass",
        "memory_limit_exceeded": "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))",
        "runtime_error": "raise SystemExit(3)",
        "compilation_error": "def broken(:\n    pass",
    },
    "java": {
        "accepted": "import java.util.*;\npublic class Main{public static void main(String[] a){Scanner s=new Scanner(System.in);"
                    "System.out.println(s.nextLong()+s.nextLong());}}",
        "wrong_answer": "public class Main{public static void main(String[] a){System.out.println(0);}}",
        "time_limit_exceeded": "public class Main{public static void main(String[] a){long x=0;while(true)x++;}}",
        "memory_limit_exceeded": "import java.util.*;\npublic class Main{public static void main(String[] a){"
                                 "List<long[]> l=new ArrayList<>();while(true)l.add(new long[1<<17]);}}",
        "runtime_error": "public class Main{public static void main(String[] a){throw new RuntimeException(\"boom\");}}",
        "compilation_error": "public class Main{ int x = ; }",
    },
    "javascript": {
        "accepted": "const [a, b] = require('fs').readFileSync(0, 'utf8').trim().split(/\\s+/).map(Number);\n"
                    "console.log(a + b);",
        "wrong_answer": "console.log(-1);",
        "time_limit_exceeded": "for (;;) {}",
        "memory_limit_exceeded": "const blocks = []; for (;;) blocks.push(Buffer.alloc(1 << 20, 1));",
        "runtime_error": "throw new Error('boom');",
        "compilation_error": "function (",
    },
}
TESTS_INPUT = [("1 2\n", "3\n"), ("40 2\n", "42\n"), ("-5 5\n", "0\n")]


def _available(language_id: str) -> bool:
    tool = {"c": "gcc", "cpp": "g++", "python": "python3", "java": "javac", "javascript": "node"}[language_id]
    return shutil.which(tool) is not None


def _runner(runtime):
    # The Runtime builds containers from the main thread only: jobs run one after another here
    # (the service runs them through its scheduler, in parallel).
    async def run(spec: JobSpec, role: str) -> Result:
        return runtime.run(spec)
    return run


# Under emulation node alone needs two seconds of CPU to start.
TEST_CPU_TIME_S, TEST_WALL_TIME_S = (12, 40) if EMULATED_CPU else (2, 6)


def _tests(language, **limits) -> tuple[Case, ...]:
    run_limits = language.run_limits_with({"cpu_time": TEST_CPU_TIME_S, "wall_time": TEST_WALL_TIME_S, **limits})
    return tuple(Case(f"t{index + 1}", stdin.encode(), expected.encode(), run_limits)
                 for index, (stdin, expected) in enumerate(TESTS_INPUT))


def _judge(runtime, language_id: str, source: str, **kwargs) -> Judgement:
    language = LANGUAGES[language_id]
    if JVM_FLAGS and language_id == "java":
        language = dataclasses.replace(language, run_argv=(language.run_argv[0], *JVM_FLAGS, *language.run_argv[1:]))
    limits = kwargs.pop("limits", {})
    submission = Submission(language=language, source=source.encode(), tests=_tests(language, **limits),
                            checker=kwargs.pop("checker", OutputChecker("lines")), **kwargs)
    return asyncio.run(judge(submission, _runner(runtime)))


@pytest.mark.parametrize("language_id", sorted(SOURCES))
@pytest.mark.parametrize("expected", ["accepted", "wrong_answer", "time_limit_exceeded", "memory_limit_exceeded",
                                      "runtime_error", "compilation_error"])
def test_each_language_gets_each_verdict(runtime, language_id, expected):
    if not _available(language_id):
        pytest.skip(f"{language_id}'s toolchain is not installed on this machine")
    limits = {"memory": "96m"} if expected == "memory_limit_exceeded" and language_id != "java" else {}
    judgement = _judge(runtime, language_id, SOURCES[language_id][expected], limits=limits)
    assert judgement.verdict == expected, judgement
    if expected == "compilation_error":
        assert judgement.tests == () and judgement.compile_result is not None
        assert judgement.compile_result.stderr, "the compiler's diagnostics reach the submitter"
    elif expected == "accepted":
        assert [test.verdict for test in judgement.tests] == ["accepted"] * 3


def test_the_program_is_compiled_once_and_every_test_runs_on_its_files(runtime):
    roles = []

    async def run(spec: JobSpec, role: str) -> Result:
        roles.append(role)
        return runtime.run(spec)

    language = LANGUAGES["c"]
    submission = Submission(language=language, source=SOURCES["c"]["accepted"].encode(), tests=_tests(language),
                            checker=OutputChecker("exact"), parallel_tests=3)
    judgement = asyncio.run(judge(submission, run))
    assert judgement.verdict == "accepted"
    assert roles[0] == "compile" and sorted(roles[1:]) == ["test 1", "test 2", "test 3"]


def test_stop_on_first_failure_skips_the_tests_after_it(runtime):
    source = "a, b = map(int, input().split())\nprint(a + b if a != 40 else 0)"
    judgement = _judge(runtime, "python", source, stop_on_first_failure=True)
    assert judgement.verdict == "wrong_answer"
    assert [test.verdict for test in judgement.tests] == ["accepted", "wrong_answer", "skipped"]
    assert judgement.tests[1].message and "expected" in judgement.tests[1].message


def test_a_compiler_bomb_is_a_compilation_error_within_the_compile_limits(runtime):
    # The preprocessor doubles the text at each level: gigabytes from a few lines.
    bomb = "#define A(x) x x\n" + "".join(f"#define L{n}(x) L{n - 1}(x) L{n - 1}(x)\n" for n in range(1, 40)) \
        .replace("L0", "A") + "int main(){ L39(1); }"
    language = LANGUAGES["c"]
    limits = dataclasses.replace(language.compile_limits, cpu_time_s=3.0, wall_time_s=10.0)
    submission = Submission(language=language, source=bomb.encode(), tests=_tests(language),
                            checker=OutputChecker("exact"), compile_limits=limits)
    judgement = asyncio.run(judge(submission, _runner(runtime)))
    assert judgement.verdict == "compilation_error"
    assert judgement.compile_result.status in ("time_limit_exceeded", "memory_limit_exceeded", "output_limit_exceeded")
    assert "exceeded" in judgement.message


def _checker(runtime, source: str) -> CompiledProgram:
    language = LANGUAGES["python"]
    files, _, failure = asyncio.run(build(language, source.encode(), _runner(runtime), "checker compile"))
    assert files is not None, failure
    return CompiledProgram(language, files)


def test_a_checker_program_decides_and_a_failing_checker_is_an_internal_error(runtime):
    lenient = ("import sys\nexpected = open(sys.argv[2]).read().split()\nout = open(sys.argv[3]).read().split()\n"
               "sys.exit(0 if out[:1] == expected[:1] else 1)")
    program = "a, b = map(int, input().split())\nprint(a + b, 'and more')"
    assert _judge(runtime, "python", program, checker=_checker(runtime, lenient)).verdict == "accepted"
    strict = "import sys\nsys.exit(0 if open(sys.argv[3]).read() == open(sys.argv[2]).read() else 1)"
    assert _judge(runtime, "python", program, checker=_checker(runtime, strict)).verdict == "wrong_answer"
    crashing = "import os, sys\nprint('checker bug', file=sys.stderr, flush=True)\nos.abort()"
    judgement = _judge(runtime, "python", program, checker=_checker(runtime, crashing))
    assert judgement.verdict == "internal_error"
    assert "the checker failed (signaled" in judgement.tests[0].message and "checker bug" in judgement.tests[0].message


def test_a_looping_checker_is_an_internal_error_not_an_acceptance(runtime):
    looping = "while True:\n    pass"
    judgement = _judge(runtime, "python", SOURCES["python"]["accepted"], checker=_checker(runtime, looping))
    assert judgement.verdict == "internal_error"
    assert "time_limit_exceeded" in judgement.tests[0].message

