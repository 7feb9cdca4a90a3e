"""The judging API on the real service: submissions judged with real jobs through the
scheduler (accounted to the tenant), the languages this machine runs, and a restart."""

from __future__ import annotations

import base64
import shutil
import sqlite3

import pytest

from servicekit import Service, add_tenant, service_leftovers
from sandboxd.api.submissions import MAX_TESTS
from sandboxd.store.submissions import RESTARTED_MESSAGE

CPP_SUM = "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<'\\n';}"
PY_SUM = "a, b = map(int, input().split())\nprint(a + b)"
TESTS = [{"stdin": "1 2\n", "expected_output": "3\n"}, {"stdin": "40 2\n", "expected_output": "42\n"},
         {"stdin": "-5 5\n", "expected_output": "0\n"}]
TEST_FIELDS = {"name", "verdict", "message", "status", "exit_code", "signal", "cpu_time_ms", "wall_time_ms",
               "memory_peak_bytes", "stdout_excerpt", "stderr_excerpt"}
SUBMISSION_FIELDS = {"id", "tenant", "state", "language", "verdict", "created_at", "finished_at", "message", "labels",
                     "compile", "tests"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("judge-state")
    keys = {"alice": add_tenant(state_dir, "alice"), "bob": add_tenant(state_dir, "bob"),
            "carol": add_tenant(state_dir, "carol", "--max-concurrent", "1")}
    service = Service(state_dir, "--warm", "1").start()
    service.keys = keys
    yield service
    assert service.stop() == 0, service.log()
    assert service_leftovers(state_dir) == []


def judged(api, body: dict, key: str | None = None) -> dict:
    reply = api.request("POST", "/v1/submissions?wait=true&timeout=120", key or api.keys["alice"], body,
                        timeout_s=180)
    assert reply.status == 200, reply.body
    submission = reply.json()
    assert submission["state"] == "finished" and set(submission) == SUBMISSION_FIELDS, submission
    return submission


def test_languages_lists_the_shipped_ones_with_their_availability(api):
    reply = api.request("GET", "/v1/languages?wait=true&timeout=240", api.keys["alice"], timeout_s=300)
    assert reply.status == 200
    languages = {language["id"]: language for language in reply.json()["languages"]}
    expected = {"c", "cpp", "python"} | {name for name, tool in (("java", "javac"), ("javascript", "node"))
                                          if shutil.which(tool)}
    for language_id in expected:
        language = languages[language_id]
        assert (language["available"], language["status"], language["reason"]) == (True, "available", None), language
        assert language["version"] and isinstance(language["judge0_id"], int) and language["piston"]
    assert languages["cpp"]["name"] == "C++" and "c++" in languages["cpp"]["piston"]
    for language in languages.values():
        assert language["status"] in ("available", "unavailable")
        assert language["available"] or language["reason"]


def test_an_accepted_cpp_submission_waited_for(api):
    submission = judged(api, {"language": "cpp", "source": CPP_SUM, "tests": TESTS, "labels": {"contest": "c1"}})
    assert (submission["verdict"], submission["language"], submission["tenant"]) == ("accepted", "cpp", "alice")
    assert submission["labels"] == {"contest": "c1"} and submission["message"] is None
    assert submission["finished_at"] >= submission["created_at"]
    assert submission["compile"]["status"] == "ok" and submission["compile"]["exit_code"] == 0
    assert set(submission["compile"]) == {"status", "exit_code", "output", "cpu_time_ms", "wall_time_ms",
                                          "memory_peak_bytes"}
    assert [test["name"] for test in submission["tests"]] == ["1", "2", "3"]
    for test, case in zip(submission["tests"], TESTS):
        assert set(test) == TEST_FIELDS
        assert (test["verdict"], test["status"], test["exit_code"]) == ("accepted", "ok", 0)
        assert test["stdout_excerpt"] == case["expected_output"] and test["cpu_time_ms"] >= 0
    again = api.request("GET", f"/v1/submissions/{submission['id']}", api.keys["alice"])
    assert again.status == 200 and again.json() == submission


def test_the_runs_are_jobs_of_the_tenant_labelled_with_the_submission(api):
    submission = judged(api, {"language": "python", "source": PY_SUM, "tests": TESTS})
    reply = api.request("GET", f"/v1/jobs?label=submission={submission['id']}", api.keys["alice"])
    jobs = reply.json()["jobs"]
    assert sorted(job["labels"]["role"] for job in jobs) == ["compile", "test 1", "test 2", "test 3"]
    assert all(job["tenant"] == "alice" and job["state"] == "done" and job["result"]["cpu_time_ms"] > 0
               for job in jobs)
    usage = api.request("GET", "/v1/usage?group_by=label:submission", api.keys["alice"]).json()
    mine = [row for row in usage["rows"] if row["group"] == submission["id"]]
    assert [(row["tenant"], row["jobs"]) for row in mine] == [("alice", 4)], usage
    assert api.request("GET", f"/v1/jobs?label=submission={submission['id']}", api.keys["bob"]).json()["jobs"] == []


def test_a_wrong_answer_names_the_failing_test(api):
    source = "a, b = map(int, input().split())\nprint(a + b if a != 40 else 41)"
    tests = [{**test, "name": name} for test, name in zip(TESTS, ("small", "answer", "negative"))]
    submission = judged(api, {"language": "python", "source": source, "tests": tests})
    assert submission["verdict"] == "wrong_answer"
    verdicts = {test["name"]: test["verdict"] for test in submission["tests"]}
    assert verdicts == {"small": "accepted", "answer": "wrong_answer", "negative": "accepted"}
    failing = submission["tests"][1]
    assert "expected '42'" in failing["message"] and "41" in failing["message"], failing


def test_stop_on_first_failure_skips_the_later_tests(api):
    source = "a, b = map(int, input().split())\nprint(-1)"  # wrong on every test
    submission = judged(api, {"language": "python", "source": source, "tests": TESTS, "stop_on_first_failure": True})
    assert submission["verdict"] == "wrong_answer"
    assert [test["verdict"] for test in submission["tests"]][0] == "wrong_answer"
    assert {test["verdict"] for test in submission["tests"][1:]} <= {"skipped", "wrong_answer"}


def test_a_compilation_error_shows_the_compilers_output(api):
    submission = judged(api, {"language": "cpp", "source": "int main(){ return undeclared; }", "tests": TESTS})
    assert submission["verdict"] == "compilation_error" and submission["tests"] == []
    assert submission["compile"]["exit_code"] != 0 and "undeclared" in submission["compile"]["output"]


def test_a_checker_program_decides_and_one_that_does_not_compile_is_an_internal_error(api):
    first_token = ("import sys\nwant = open(sys.argv[2]).read().split()\ngot = open(sys.argv[3]).read().split()\n"
                   "sys.exit(0 if got[:1] == want[:1] else 1)")
    source = "a, b = map(int, input().split())\nprint(a + b, 'and more')"
    checker = {"type": "program", "language": "python", "source": first_token}
    submission = judged(api, {"language": "python", "source": source, "tests": TESTS, "checker": checker})
    assert submission["verdict"] == "accepted", submission
    jobs = api.request("GET", f"/v1/jobs?label=submission={submission['id']}", api.keys["alice"]).json()["jobs"]
    assert {"checker compile", "checker 1"} <= {job["labels"]["role"] for job in jobs}
    broken = {"type": "program", "language": "python", "source": "def broken(:\n    pass"}
    submission = judged(api, {"language": "python", "source": PY_SUM, "tests": TESTS, "checker": broken})
    assert submission["verdict"] == "internal_error" and "checker does not compile" in submission["message"]


# Python ignores SIGPIPE: writing to a solution that has left raises, and that must be a
# rejection (exit 1), not the interactor's crash.
GUESS_INTERACTOR = """
import os, sys
def reject(why):
    print(why, file=sys.stderr, flush=True)
    os._exit(1)
secret = int(open(sys.argv[1]).read())
for guesses in range(1, 8):
    line = sys.stdin.readline()
    if not line:
        reject("the solution stopped guessing")
    guess = int(line)
    try:
        print("=" if guess == secret else ("<" if secret < guess else ">"), flush=True)
    except BrokenPipeError:
        reject("the solution stopped guessing")
    if guess == secret:
        sys.exit(0)
reject("out of guesses")
"""
GUESS_SOLUTION = """
low, high = 1, 100
while True:
    middle = (low + high) // 2
    print(middle, flush=True)
    answer = input()
    if answer == "=":
        break
    low, high = (low, middle - 1) if answer == "<" else (middle + 1, high)
"""


def test_an_interactive_submission_pipes_each_test_to_its_interactor_even_one_job_at_a_time(api):
    # carol may run one job at a time: the interactor rides with its solution, or the two
    # would wait for each other forever.
    tests = [{"stdin": str(secret)} for secret in (1, 50, 100)]
    submission = judged(api, {"language": "python", "source": GUESS_SOLUTION, "tests": tests,
                              "interactor": {"language": "python", "source": GUESS_INTERACTOR}}, api.keys["carol"])
    assert submission["verdict"] == "accepted", submission
    assert [test["verdict"] for test in submission["tests"]] == ["accepted"] * 3
    jobs = api.request("GET", f"/v1/jobs?label=submission={submission['id']}", api.keys["carol"]).json()["jobs"]
    assert sorted(job["labels"]["role"] for job in jobs) == sorted(
        ["compile", "interactor compile", "test 1", "test 2", "test 3", "interactor 1", "interactor 2",
         "interactor 3"])
    assert all(job["state"] == "done" and job["result"]["status"] == "ok" for job in jobs), jobs
    lost = judged(api, {"language": "python", "source": "print(1, flush=True)\ninput()\nprint(1, flush=True)",
                        "tests": tests[2:], "interactor": {"language": "python", "source": GUESS_INTERACTOR}},
                  api.keys["carol"])
    assert lost["verdict"] == "wrong_answer", lost
    assert lost["tests"][0]["message"] == "the solution stopped guessing"


def test_a_submission_of_several_files_compiles_and_runs_them_together(api):
    helper = {"adder.py": "def add(a, b):\n    return a + b\n"}
    main = "from adder import add\na, b = map(int, input().split())\nprint(add(a, b))"
    for body in ({"source": main, "files": helper}, {"files": {**helper, "main.py": main}}):
        submission = judged(api, {"language": "python", "tests": TESTS, **body})
        assert submission["verdict"] == "accepted", submission
    header = {"sum.h": "static long sum(long a, long b) { return a + b; }\n"}
    source = "#include <stdio.h>\n#include \"sum.h\"\nint main(void){long a,b;scanf(\"%ld %ld\",&a,&b);" \
             "printf(\"%ld\\n\",sum(a,b));}"
    assert judged(api, {"language": "c", "source": source, "files": header, "tests": TESTS})["verdict"] == "accepted"


def test_without_wait_the_submission_is_accepted_at_once(api):
    reply = api.request("POST", "/v1/submissions", api.keys["alice"],
                        {"language": "python", "source": {"base64": base64.b64encode(PY_SUM.encode()).decode()},
                         "tests": [{"stdin": {"base64": base64.b64encode(b"2 2\n").decode()}, "expected_output": "4"}]})
    assert reply.status == 201
    submission = reply.json()
    assert submission["state"] in ("queued", "running", "finished") and submission["id"]


@pytest.mark.parametrize("body, field", [
    ({"language": "cobol", "source": PY_SUM, "tests": TESTS}, "language"),
    ({"language": "python", "source": "", "tests": TESTS}, "source"),
    ({"language": "python", "source": "  \n", "tests": TESTS}, "source"),
    ({"language": "python", "source": PY_SUM, "tests": [{"stdin": "1 1\n"}] * (MAX_TESTS + 1)}, "tests"),
    ({"language": "python", "source": PY_SUM, "tests": []}, "tests"),
    ({"language": "python", "source": {"base64": "not base64!"}, "tests": TESTS}, "source"),
    ({"language": "python", "source": PY_SUM, "tests": [{"stdin": {"base64": "%%%"}}]}, "tests[0].stdin"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "checker": {"type": "fuzzy"}}, "checker"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "checker": {"type": "lines", "x": 1}}, "checker"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS,
      "checker": {"type": "program", "language": "cobol", "source": "x"}}, "checker.language"),
    ({"language": "python", "source": PY_SUM, "tests": [{"stdin": "1 1\n", "limits": {"memory": "1t"}}]},
     "tests[0].limits.memory"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "limits": {"bogus": 1}}, "limits.bogus"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "labels": {"role": "x"}}, "labels['role']"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "extra": 1}, "extra"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "checker": "tokens",
      "interactor": {"language": "python", "source": "x"}}, "checker"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS,
      "interactor": {"language": "cobol", "source": "x"}}, "interactor.language"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "interactor": {"language": "python"}},
     "interactor.source"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "interactor": "python"}, "interactor"),
    ({"language": "python", "tests": TESTS, "files": {"other.py": "x = 1"}}, "source"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "files": {"main.py": "x"}}, "files['main.py']"),
    ({"language": "python", "source": PY_SUM, "tests": TESTS, "files": {"../up.py": "x"}}, "files['../up.py']"),
])
def test_invalid_submissions_are_422_naming_the_field(api, body, field):
    reply = api.request("POST", "/v1/submissions?wait=true", api.keys["alice"], body)
    assert reply.status == 422 and reply.error_code == "invalid_request", reply.body
    assert reply.json()["error"]["details"]["field"] == field, reply.body


def test_another_tenants_submission_is_404(api):
    submission = judged(api, {"language": "python", "source": PY_SUM, "tests": TESTS[:1]})
    reply = api.request("GET", f"/v1/submissions/{submission['id']}", api.keys["bob"])
    assert reply.status == 404 and reply.error_code == "submission_not_found"
    for unknown in ("0" * 32, "not-an-id"):
        assert api.request("GET", f"/v1/submissions/{unknown}", api.keys["alice"]).status == 404


def test_a_submission_left_running_by_a_previous_process_is_finished_on_start(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o711)
    key = add_tenant(state_dir, "rita")  # creates the database
    submission_id = "ab" * 16
    with sqlite3.connect(state_dir / "sandboxd.db") as connection:
        connection.execute(
            "INSERT INTO submissions (id, tenant, language, state, created_at, labels)"
            " VALUES (?, 'rita', 'cpp', 'running', '2026-01-01T00:00:00.000000Z', '{}')", (submission_id,))
    service = Service(state_dir, "--warm", "0").start()
    try:
        reply = service.request("GET", f"/v1/submissions/{submission_id}", key)
        assert reply.status == 200, reply.body
        submission = reply.json()
        assert (submission["state"], submission["verdict"], submission["message"]) == (
            "finished", "internal_error", RESTARTED_MESSAGE)
        assert submission["finished_at"] and submission["tests"] == [] and submission["compile"] is None
    finally:
        assert service.stop() == 0
    assert service_leftovers(state_dir) == []
