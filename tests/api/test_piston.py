"""Piston's API on the real service: the runtimes this machine runs, executions with real jobs
(an interpreted and a compiled language, and how runs fail), the jobs they are, Piston's
error style and both path layouts."""

from __future__ import annotations

import base64
import json

import pytest

from servicekit import Service, add_tenant, service_leftovers
from sandboxd.api.piston import MAX_FILES, MAX_FILES_BYTES
from sandboxd.api.submissions import MAX_SOURCE_BYTES

EXECUTE = "/piston/api/v2/execute"
RUNTIMES = "/piston/api/v2/runtimes"
STAGE_FIELDS = {"stdout", "stderr", "output", "code", "signal", "message", "status", "cpu_time", "wall_time", "memory"}
MIB = 1 << 20

MAIN_PY = """import sys
import helper
data = open("data.bin", "rb").read()
print(helper.greet(input()), sys.argv[1:], data.hex(), open("notes/table.txt").read())
print("to stderr", file=sys.stderr)
"""
HELPER_PY = "def greet(name):\n    return 'hello ' + name\n"
MAIN_C = """#include <stdio.h>
#include "greeting.h"
int main(int argc, char **argv) {
    char name[64];
    if (scanf("%63s", name) != 1) return 2;
    printf(GREETING " %s: %d args, the first %s\\n", name, argc - 1, argv[1]);
    fprintf(stderr, "done\\n");
    return 0;
}
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("piston-state")
    keys = {"alice": add_tenant(state_dir, "alice"), "bob": add_tenant(state_dir, "bob"),
            "tiny": add_tenant(state_dir, "tiny", "--max-memory", "128m", "--max-cpu-time", "5")}
    service = Service(state_dir, "--warm", "1").start()
    service.keys = keys
    yield service
    assert service.stop() == 0, service.log()
    assert service_leftovers(state_dir) == []


@pytest.fixture(scope="module")
def versions(api) -> dict[str, str]:
    """Piston's language name -> the version probed, as the native API reports it."""
    reply = api.request("GET", "/v1/languages?wait=true&timeout=240", api.keys["alice"], timeout_s=300)
    assert reply.status == 200, reply.body
    return {language["piston"][0]: language["version"] for language in reply.json()["languages"]
            if language["available"]}


def execute(api, body: dict, path: str = EXECUTE, **options) -> dict:
    options.setdefault("key", api.keys["alice"])
    reply = api.request("POST", path, body=body, timeout_s=300, **options)
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert set(answer) <= {"language", "version", "run", "compile"} and set(answer["run"]) == STAGE_FIELDS, answer
    return answer


def piston_jobs(api, key: str) -> list[dict]:
    reply = api.request("GET", "/v1/jobs?label=api=piston&limit=500", key)
    assert reply.status == 200, reply.body
    return reply.json()["jobs"]


def test_runtimes_lists_the_available_languages_with_their_probed_versions(api, versions):
    reply = api.request("GET", RUNTIMES, api.keys["alice"], timeout_s=300)
    assert reply.status == 200, reply.body
    runtimes = reply.json()
    assert all(set(runtime) == {"language", "version", "aliases"} for runtime in runtimes), runtimes
    assert {runtime["language"]: runtime["version"] for runtime in runtimes} == versions
    assert {"c", "c++", "python", "bash"} <= set(versions)
    by_name = {runtime["language"]: runtime for runtime in runtimes}
    assert by_name["c++"]["aliases"] == ["cpp", "g++"] and "py" in by_name["python"]["aliases"]


@pytest.mark.parametrize("path", [RUNTIMES + "/", "/piston/api/v2/piston/runtimes", "/piston/api/v2/piston/runtimes/"])
def test_runtimes_answers_with_a_trailing_slash_and_at_the_public_instances_path(api, versions, path):
    reply = api.request("GET", path, headers={"Authorization": api.keys["alice"]}, timeout_s=300)
    assert reply.status == 200, reply.body
    assert {runtime["language"]: runtime["version"] for runtime in reply.json()} == versions


def test_a_python_program_with_modules_data_files_stdin_and_args(api, versions):
    files = [{"name": "solution.py", "content": MAIN_PY}, {"name": "helper.py", "content": HELPER_PY},
             {"name": "data.bin", "content": base64.b64encode(b"\x00\xffpiston").decode(), "encoding": "base64"},
             {"name": "notes/table.txt", "content": "6869", "encoding": "hex"}]
    body = {"language": "py", "version": "3", "files": files, "stdin": "world", "args": ["a b", "--c"],
            "compile_memory_limit": -1, "run_memory_limit": -1, "unknown_field": "is ignored, as Piston does"}
    answer = execute(api, body)
    assert (answer["language"], answer["version"]) == ("python", versions["python"])
    run = answer["run"]
    assert run["stdout"] == "hello world ['a b', '--c'] 00ff706973746f6e hi\n"
    assert run["stderr"] == "to stderr\n" and run["output"] == run["stdout"] + run["stderr"]
    assert (run["code"], run["signal"], run["status"], run["message"]) == (0, None, None, None)
    assert run["memory"] > 0 and all(isinstance(run[name], int) for name in ("cpu_time", "wall_time", "memory"))
    assert answer["compile"]["code"] == 0 and answer["compile"]["status"] is None


def test_an_execution_is_a_job_of_the_tenant_with_the_limits_asked_for(api, versions):
    before = len(piston_jobs(api, api.keys["alice"]))
    body = {"language": "sh", "version": "*", "files": [{"content": "read -r line; echo \"got $line\""}],
            "stdin": "x", "run_timeout": 5000, "run_cpu_time": 2500, "run_memory_limit": 64 * MIB}
    answer = execute(api, body)
    assert answer["run"]["stdout"] == "got x\n" and "compile" not in answer  # bash: no compile step
    jobs = piston_jobs(api, api.keys["alice"])
    assert len(jobs) == before + 1
    job = jobs[0]
    assert (job["tenant"], job["state"], job["labels"]["role"], job["labels"]["api"]) == ("alice", "done", "test 1",
                                                                                          "piston")
    assert (job["limits"]["wall_time"], job["limits"]["cpu_time"], job["limits"]["memory"]) == (5, 2.5, 64 * MIB)
    assert piston_jobs(api, api.keys["bob"]) == []


def test_a_c_program_compiled_and_run_through_the_public_instances_path(api, versions):
    files = [{"name": "prog.c", "content": MAIN_C}, {"name": "greeting.h", "content": '#define GREETING "hi"\n'}]
    body = {"language": "gcc", "version": versions["c"], "files": files, "stdin": "sandboxd\n", "args": ["one", "two"],
            "compile_timeout": 15000, "compile_memory_limit": 300 * MIB, "run_timeout": 3000}
    answer = execute(api, body, "/piston/api/v2/piston/execute/", key=None,
                     headers={"Authorization": api.keys["alice"]})  # as aiopyston sends its key
    assert (answer["language"], answer["version"]) == ("c", versions["c"])
    compiled, run = answer["compile"], answer["run"]
    assert set(compiled) == STAGE_FIELDS and (compiled["code"], compiled["status"], compiled["stdout"]) == (0, None, "")
    assert run["stdout"] == "hi sandboxd: 2 args, the first one\n" and run["stderr"] == "done\n"
    assert (run["code"], run["status"], run["signal"]) == (0, None, None)
    submission = piston_jobs(api, api.keys["alice"])[0]["labels"]["submission"]
    jobs = api.request("GET", f"/v1/jobs?label=submission={submission}", api.keys["alice"]).json()["jobs"]
    limits = {job["labels"]["role"]: job["limits"] for job in jobs}
    assert (limits["compile"]["wall_time"], limits["compile"]["memory"]) == (15, 300 * MIB)
    assert limits["test 1"]["wall_time"] == 3


def test_a_compile_error_stands_for_the_run_too(api, versions):
    body = {"language": "c", "version": "*", "files": [{"content": "int main(void) { return undeclared; }"}]}
    answer = execute(api, body)
    compiled = answer["compile"]
    assert compiled["code"] == 1 and compiled["status"] == "RE" and "undeclared" in compiled["stderr"]
    assert compiled["message"] == "Exited with error status 1" and compiled["output"] == compiled["stderr"]
    assert answer["run"] == compiled  # as Piston answers, for clients that read only `run`


@pytest.mark.parametrize("script, expected", [
    ("echo partial; echo oops >&2; exit 3",
     {"status": "RE", "code": 3, "signal": None, "message": "Exited with error status 3", "stdout": "partial\n",
      "stderr": "oops\n"}),
    ("echo before; kill -SEGV $$",
     {"status": "SG", "code": None, "signal": "SIGSEGV", "message": "Caught fatal signal 11", "stdout": "before\n"}),
    ("echo waiting; exec sleep 60",
     {"status": "TO", "code": None, "signal": "SIGKILL", "message": "Time limit exceeded (wall clock)",
      "stdout": "waiting\n"}),
    ("head -c 3000000 /dev/zero", {"status": "OL", "code": None, "signal": "SIGKILL",
                                   "message": "stdout length exceeded"}),
    ("head -c 3000000 /dev/zero >&2", {"status": "EL", "code": None, "signal": "SIGKILL",
                                       "message": "stderr length exceeded"}),
], ids=["exit-code", "signal", "timeout", "stdout-limit", "stderr-limit"])
def test_how_a_run_ends_in_piston_terms(api, versions, script, expected):
    answer = execute(api, {"language": "bash", "version": "*", "files": [{"content": script}], "run_timeout": 1500})
    run = answer["run"]
    assert {name: run[name] for name in expected} == expected, run
    if expected["status"] == "TO":
        assert 1400 <= run["wall_time"] < 30_000, run


def _files(*contents: str, **file) -> list[dict]:
    return [{"content": content, **file} for content in contents]


PY = {"language": "python", "version": "*"}
BAD_REQUESTS = [
    ({}, "language is required as a string"),
    ({"language": 3, "version": "*", "files": _files("print(1)")}, "language is required as a string"),
    ({"language": "python", "files": _files("print(1)")}, "version is required as a string"),
    ({**PY}, "files is required as an array"),
    ({**PY, "files": {"main.py": "print(1)"}}, "files is required as an array"),
    ({**PY, "files": []}, "files must include at least one utf8 encoded file"),
    ({**PY, "files": ["print(1)"]}, "files[0] must be an object"),
    ({**PY, "files": [{"name": "main.py"}]}, "files[0].content is required as a string"),
    ({**PY, "files": _files("cHJpbnQoMSk=", encoding="base64")}, "files must include at least one utf8 encoded file"),
    ({**PY, "files": _files("print(1)", encoding="utf-16")}, "files[0].encoding must be one of utf8, base64, hex"),
    ({**PY, "files": _files("print(1)") + _files("%%%", encoding="base64")}, "files[1].content is not valid base64"),
    ({**PY, "files": _files("print(1)") + _files("abc", encoding="hex")}, "files[1].content is not valid hex"),
    ({**PY, "files": _files("")}, "files[0].content must not be empty"),
    ({**PY, "files": _files(" \n\t")}, "files[0].content must not be empty"),
    ({**PY, "files": _files("print(1)") * (MAX_FILES + 1)}, f"files: at most {MAX_FILES} files"),
    ({**PY, "files": _files("#" * (MAX_SOURCE_BYTES + 1))}, f"the program is over {MAX_SOURCE_BYTES} bytes"),
    ({**PY, "files": _files("print(1)", "x" * MAX_FILES_BYTES)}, f"over {MAX_FILES_BYTES} bytes together"),
    ({**PY, "files": [{"content": "print(1)"}, {"name": "/etc/passwd", "content": "x"}]},
     "files[1].name must be a path relative to the job's directory"),
    ({**PY, "files": [{"content": "print(1)"}, {"name": "../escape.py", "content": "x"}]}, "'..' component"),
    ({**PY, "files": [{"content": "print(1)"}, {"name": "lib/../../x", "content": "x"}]}, "'..' component"),
    ({**PY, "files": [{"name": "/main.py", "content": "print(1)"}]}, "files[0].name must be a path relative"),
    ({**PY, "files": [{"content": "print(1)"}, {"name": "a.txt", "content": "1"}, {"name": "a.txt", "content": "2"}]},
     "files[2].name: another file is named 'a.txt'"),
    ({**PY, "files": [{"content": "print(1)"}, {"name": "main.py", "content": "x"}]},
     "'main.py' is the name the program (files[0]) is given here"),
    ({**PY, "files": [{"content": "print(1)"}, {"name": "a", "content": "1"}, {"name": "a/b", "content": "2"}]},
     "'a' is a file, so 'a/b' cannot be in it"),
    ({**PY, "files": _files("print(1)"), "args": "-v"}, "args must be an array of strings"),
    ({**PY, "files": _files("print(1)"), "args": ["ok", 2]}, "args[1] must be a string without NUL"),
    ({**PY, "files": _files("print(1)"), "stdin": ["1"]}, "stdin must be a string"),
    ({"language": "cobol", "version": "*", "files": _files("x")}, "cobol-* runtime is unknown: no language"),
    ({"language": "python", "version": "2", "files": _files("print(1)")},
     "python-2 runtime is unknown: python is version"),
    ({"language": "python", "version": "3.11.0-rc1", "files": _files("print(1)")},
     "version '3.11.0-rc1' is not understood"),
    ({**PY, "files": _files("print(1)"), "run_timeout": "3000"}, "If specified, run_timeout must be a number"),
    ({**PY, "files": _files("print(1)"), "run_cpu_time": -5}, "run_cpu_time must be non-negative"),
    ({**PY, "files": _files("print(1)"), "run_memory_limit": -2}, "run_memory_limit must be non-negative or -1"),
    ({**PY, "files": _files("print(1)"), "run_timeout": 10**10}, "run_timeout cannot exceed the configured limit of"),
    ({**PY, "files": _files("print(1)"), "run_memory_limit": 1000},
     "run_memory_limit: 1000 is below what a job may have"),
    ({**PY, "files": _files("print(1)"), "compile_timeout": 10**6},
     "compile_timeout cannot exceed the configured limit of 20000"),
    ({**PY, "files": _files("print(1)"), "compile_memory_limit": 1 << 40},
     "compile_memory_limit cannot exceed the configured limit of"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS, ids=[str(index) for index in range(len(BAD_REQUESTS))])
def test_a_bad_request_is_a_400_in_pistons_style(api, versions, body, message):
    reply = api.request("POST", EXECUTE, api.keys["alice"], body)
    assert reply.status == 400 and set(reply.json()) == {"message"}, reply.body
    assert message in reply.json()["message"], reply.body


def test_a_body_that_is_not_a_json_object_is_a_400(api):
    for raw in (b"{not json", json.dumps(["python"]).encode()):
        reply = api.request("POST", EXECUTE, api.keys["alice"], raw=raw)
        assert reply.status == 400 and set(reply.json()) == {"message"}, reply.body


@pytest.mark.parametrize("limit, value, maximum", [("run_memory_limit", 256 * MIB, 128 * MIB),
                                                   ("run_cpu_time", 6000, 5000),
                                                   ("compile_memory_limit", 256 * MIB, 128 * MIB)])
def test_limits_past_the_tenants_maxima_are_refused(api, versions, limit, value, maximum):
    body = {"language": "c", "version": "*", "files": _files("int main(void) { return 0; }"), limit: value}
    reply = api.request("POST", EXECUTE, api.keys["tiny"], body)
    assert reply.status == 400, reply.body
    assert reply.json() == {"message": f"{limit} cannot exceed the configured limit of {maximum}"}


def test_errors_under_piston_are_in_its_style(api):
    body = {**PY, "files": _files("print(1)")}
    for reply in (api.request("POST", EXECUTE, None, body), api.request("GET", RUNTIMES),
                  api.request("POST", EXECUTE, headers={"Authorization": "not-a-key"}, body=body)):
        assert reply.status == 401 and set(reply.json()) == {"message"}, reply.body
    missing = api.request("GET", "/piston/api/v2/packages", api.keys["alice"])
    assert missing.status == 404 and set(missing.json()) == {"message"}, missing.body
    wrong_method = api.request("GET", EXECUTE, api.keys["alice"])
    assert wrong_method.status == 405 and set(wrong_method.json()) == {"message"}, wrong_method.body
