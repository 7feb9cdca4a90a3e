"""The Judge0-compatible API on the real service (real jobs through the scheduler), and its
pure parts (status mapping, callback allowlist, archives) on their own."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import re
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiohttp import web

from servicekit import Service, add_tenant, sandboxd, service_leftovers
from sandboxd.api.errors import ApiError
from sandboxd.api.callbacks import CallbackAllowlist
from sandboxd.api.judge0 import (ALL_FIELDS, DEFAULT_FIELDS, NOT_UTF8, STATUSES, judge0_time, parse_submission,
                                 requested_fields, run_status, unzip_additional_files)
from sandboxd.judge.languages import load_languages
from sandboxd.limits import default_limit_policy
from sandboxd.store.tenants import Tenant

JUDGE0_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
PYTHON, C = 71, 50
PY_SUM = "a, b = map(int, input().split())\nprint(a + b)"
FINAL_WAIT_S = 180.0


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("judge0-state")
    keys = {"alice": add_tenant(state_dir, "alice"), "bob": add_tenant(state_dir, "bob"),
            "tight": add_tenant(state_dir, "tight", "--max-memory", "64m", "--max-cpu-time", "2")}
    service = Service(state_dir, "--warm", "1", "--callback-host", "127.0.0.1").start()
    service.keys = keys
    yield service
    assert service.stop() == 0, service.log()
    assert service_leftovers(state_dir) == []


def call(api, method: str, path: str, key: str | None = None, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout_s: float = 120):
    """A request as Judge0 clients send it: the key in X-Auth-Token."""
    sent = {**({"X-Auth-Token": key} if key else {}), **(headers or {})}
    return api.request(method, "/judge0" + path, None, body, raw=raw, headers=sent, timeout_s=timeout_s)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def judged(api, body: dict, key: str | None = None, query: str = "fields=*") -> dict:
    """Create with wait=true: the finished submission."""
    reply = call(api, "POST", f"/submissions?wait=true&{query}", key or api.keys["alice"], body, timeout_s=300)
    assert reply.status == 201, reply.body
    submission = reply.json()
    assert submission["status"]["id"] not in (1, 2), submission
    return submission


def polled(api, tokens: list[str], key: str, query: str = "fields=*") -> list[dict | None]:
    """GET /submissions/batch until every submission there is finished (as Judge0 clients poll)."""
    deadline = time.monotonic() + FINAL_WAIT_S
    while True:
        reply = call(api, "GET", f"/submissions/batch?tokens={','.join(tokens)}&{query}", key)
        assert reply.status == 200, reply.body
        submissions = reply.json()["submissions"]
        if all(item is None or item["status"]["id"] not in (1, 2) for item in submissions):
            return submissions
        assert time.monotonic() < deadline, submissions
        time.sleep(0.05)


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


# --- information ----------------------------------------------------------------------------

def test_statuses_about_version_and_system_info(api):
    key = api.keys["alice"]
    statuses = call(api, "GET", "/statuses", key)
    assert statuses.status == 200 and statuses.json() == [{"id": i, "description": d} for i, d in STATUSES]
    assert [item["id"] for item in statuses.json()] == list(range(1, 15))
    assert statuses.json()[6]["description"] == "Runtime Error (SIGSEGV)"
    assert call(api, "GET", "/statuses/", key).json() == statuses.json()  # a trailing slash is the same path
    about = call(api, "GET", "/about", key).json()
    assert about["version"] == "1.13.1" and {"homepage", "source_code", "maintainer"} <= set(about)
    version = call(api, "GET", "/version", key)
    assert (version.status, version.body) == (200, b"1.13.1")
    info = call(api, "GET", "/system_info", key).json()
    assert info["Architecture"] and int(info["CPU(s)"]) >= 1


def test_config_info_shows_the_limits_that_apply_to_the_caller(api):
    policy = default_limit_policy()
    config = call(api, "GET", "/config_info", api.keys["alice"]).json()
    assert config["max_memory_limit"] == policy.maximum.memory_bytes // 1024
    assert config["memory_limit"] == policy.defaults.memory_bytes // 1024
    assert config["max_cpu_time_limit"] == policy.maximum.cpu_time_s
    assert config["max_file_size"] == policy.defaults.output_bytes // 1024
    assert (config["enable_callbacks"], config["callbacks_max_tries"], config["enable_compiler_options"],
            config["allow_enable_network"], config["max_submission_batch_size"]) == (True, 3, False, False, 20)
    tight = call(api, "GET", "/config_info", api.keys["tight"]).json()
    assert (tight["max_memory_limit"], tight["memory_limit"]) == (65536, 65536)
    assert (tight["max_cpu_time_limit"], tight["cpu_time_limit"]) == (2.0, 2.0)
    assert set(tight) == set(config)


def test_languages_are_the_available_ones_with_judge0_ids(api):
    reply = call(api, "GET", "/languages", api.keys["alice"], timeout_s=300)
    assert reply.status == 200
    languages = reply.json()
    ids = {language["id"] for language in languages}
    assert {50, 52, 71} <= ids and all(set(language) == {"id", "name"} for language in languages)
    assert [language["name"] for language in languages] == sorted(language["name"] for language in languages)
    every = call(api, "GET", "/languages/all", api.keys["alice"]).json()
    assert {language["id"] for language in every if not language["is_archived"]} == ids
    python = call(api, "GET", "/languages/71", api.keys["alice"]).json()
    assert (python["source_file"], python["run_cmd"], python["is_archived"]) == ("main.py", "python3 main.py", False)
    assert python["name"].startswith("Python 3 (3.")
    missing = call(api, "GET", "/languages/9999", api.keys["alice"])
    assert missing.status == 404 and set(missing.json()) == {"error"}


# --- submissions ----------------------------------------------------------------------------

def test_plain_create_then_poll_with_the_default_fields(api):
    key = api.keys["alice"]
    created = call(api, "POST", "/submissions", key,
                   {"source_code": PY_SUM, "language_id": PYTHON, "stdin": "40 2\n", "expected_output": "42"})
    assert created.status == 201 and set(created.json()) == {"token"}
    token = created.json()["token"]
    assert UUID4.match(token), token
    [submission] = polled(api, [token], key, query="base64_encoded=false")
    assert tuple(submission) == DEFAULT_FIELDS
    assert (submission["status"], submission["stdout"], submission["stderr"], submission["token"]) == (
        {"id": 3, "description": "Accepted"}, "42\n", None, token)
    assert float(submission["time"]) >= 0 and submission["memory"] > 0 and submission["message"] is None
    single = call(api, "GET", f"/submissions/{token}", key)
    assert single.status == 200 and single.json() == submission


def test_base64_mode_round_trips_bytes_and_plain_mode_refuses_them(api):
    key = api.keys["alice"]
    source = "import sys\nsys.stdout.buffer.write(sys.stdin.buffer.read()[::-1] + b'\\xff\\n')"
    submission = judged(api, {"source_code": b64(source), "language_id": PYTHON, "stdin": b64(b"\x00abc")}, key,
                        query="base64_encoded=true&fields=stdout,status,stdin,source_code,message,token")
    assert base64.b64decode(submission["stdout"]) == b"cba\x00\xff\n"
    assert base64.b64decode(submission["source_code"]).decode() == source
    assert (submission["stdin"], submission["status"]["id"], submission["message"]) == (b64(b"\x00abc"), 3, None)
    token = submission["token"]
    plain = call(api, "GET", f"/submissions/{token}", key)
    assert plain.status == 400 and plain.json() == {"error": NOT_UTF8}
    # Fields that are text are refused only when asked for.
    fine = call(api, "GET", f"/submissions/{token}?fields=status,time,memory", key)
    assert fine.status == 200 and fine.json()["status"]["id"] == 3
    batch = call(api, "GET", f"/submissions/batch?tokens={token}", key)
    assert batch.status == 400 and "use base64_encoded=true" in batch.json()["error"]


def test_wait_echoes_every_field_and_the_runs_are_jobs_of_the_tenant(api):
    key = api.keys["alice"]
    source = ("import sys\nprint(open('data/words.txt').read().strip(), sys.argv[1:], flush=True)\n"
              "print('to stderr', file=sys.stderr, flush=True)\nprint(input())")
    body = {"source_code": source, "language_id": PYTHON, "stdin": "line\n", "number_of_runs": 2,
            "command_line_arguments": "one 'two words' \"three\"", "redirect_stderr_to_stdout": True,
            "additional_files": b64(zip_of({"data/words.txt": b"from the archive\n"})),
            "cpu_time_limit": 2, "cpu_extra_time": 0.5, "wall_time_limit": 5, "memory_limit": 131072,
            "stack_limit": 32768, "max_processes_and_or_threads": 16, "max_file_size": 2048,
            "an_unknown_field": "ignored, as Judge0 ignores it"}
    submission = judged(api, body, key)
    assert tuple(submission) == ALL_FIELDS
    assert submission["status"] == {"id": 3, "description": "Accepted"}, submission
    assert submission["stdout"] == "from the archive ['one', 'two words', 'three']\nto stderr\nline\n"
    assert submission["stderr"] is None and submission["exit_code"] == 0 and submission["exit_signal"] is None
    assert (submission["cpu_time_limit"], submission["cpu_extra_time"], submission["wall_time_limit"]) == (
        "2.0", "0.5", "5.0")
    assert (submission["memory_limit"], submission["stack_limit"], submission["max_processes_and_or_threads"],
            submission["max_file_size"], submission["number_of_runs"]) == (131072, 32768, 16, 2048, 2)
    assert (submission["language_id"], submission["status_id"], submission["language"]["id"]) == (71, 3, 71)
    assert submission["source_code"] == source and submission["stdin"] == "line\n"
    assert submission["command_line_arguments"] == body["command_line_arguments"]
    assert (submission["redirect_stderr_to_stdout"], submission["enable_network"], submission["compiler_options"],
            submission["callback_url"]) == (True, False, None, None)
    assert submission["additional_files"] == body["additional_files"]
    assert JUDGE0_TIME.match(submission["created_at"]) and JUDGE0_TIME.match(submission["finished_at"])
    assert submission["created_at"] <= submission["finished_at"]
    assert UUID4.match(submission["token"]) and float(submission["wall_time"]) > 0 and submission["memory"] > 0

    submission_id = uuid.UUID(submission["token"]).hex
    jobs = api.request("GET", f"/v1/jobs?label=submission={submission_id}", key).json()["jobs"]
    assert sorted(job["labels"]["role"] for job in jobs) == ["compile", "test 1", "test 2"]
    assert all(job["tenant"] == "alice" and job["labels"]["api"] == "judge0" for job in jobs)
    run = next(job for job in jobs if job["labels"]["role"] == "test 1")
    assert (run["limits"]["cpu_time"], run["limits"]["memory"], run["limits"]["pids"]) == (2.5, 128 << 20, 16)
    assert (run["limits"]["wall_time"], run["limits"]["stack"]) == (5, 32 << 20)
    assert run["limits"]["output"] == run["limits"]["file_size"] == 2 << 20
    native = api.request("GET", f"/v1/submissions/{submission_id}", key).json()
    assert native["verdict"] == "accepted" and len(native["tests"]) == 2

    for other in ("bob", "tight"):
        reply = call(api, "GET", f"/submissions/{submission['token']}", api.keys[other])
        assert reply.status == 404 and set(reply.json()) == {"error"}


def test_batch_create_answers_per_item_and_batch_get_polls_them(api):
    key = api.keys["alice"]
    items = [{"source_code": PY_SUM, "language_id": PYTHON, "stdin": "1 2", "expected_output": "3"},
             {"source_code": PY_SUM, "language_id": 9999},
             {"source_code": b64("#include <stdio.h>\nint main(void){puts(\"hi from C\");}"), "language_id": C}]
    # base64_encoded applies to every item.
    reply = call(api, "POST", "/submissions/batch?base64_encoded=true", key,
                 {"submissions": [{**items[0], "source_code": b64(PY_SUM), "stdin": b64("1 2"),
                                   "expected_output": b64("3")}, {**items[1], "source_code": b64(PY_SUM)}, items[2]]})
    assert reply.status == 201, reply.body
    first, refused, third = reply.json()
    assert set(first) == {"token"} and set(third) == {"token"}
    assert refused == {"language_id": ["language with id 9999 doesn't exist"]}
    unknown = str(uuid.uuid4())
    submissions = polled(api, [first["token"], unknown, third["token"]], key,
                         query="base64_encoded=true&fields=token,status,stdout,language_id")
    assert submissions[1] is None
    assert [(item["status"]["id"], item["language_id"]) for item in (submissions[0], submissions[2])] == [(3, 71), (3, 50)]
    assert base64.b64decode(submissions[2]["stdout"]) == b"hi from C\n"
    assert [item["token"] for item in (submissions[0], submissions[2])] == [first["token"], third["token"]]
    # Another tenant sees none of them.
    theirs = call(api, "GET", f"/submissions/batch?tokens={first['token']},{third['token']}", api.keys["bob"])
    assert theirs.json() == {"submissions": [None, None]}
    nothing = call(api, "POST", "/submissions/batch", key, {"submissions": [items[1], {**items[1], "language_id": 50,
                                                                                     "source_code": ""}]})
    assert nothing.status == 422 and nothing.json() == [{"language_id": ["language with id 9999 doesn't exist"]},
                                                        {"source_code": ["can't be blank"]}]


C_CRASHES = ("#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
             "int main(int argc, char **argv){volatile int zero = 0; volatile int *null = 0;\n"
             "if(!strcmp(argv[1], \"segv\")) return *null;\n"
             "if(!strcmp(argv[1], \"fpe\")) return argc / zero;\n"
             "if(!strcmp(argv[1], \"abort\")) abort();\n"
             "FILE *f = fopen(\"big\", \"w\"); for(int i = 0; i < (1 << 20); i++) fputc('x', f); fclose(f);}")
STATUS_CASES = {
    "wrong answer": ({"source_code": "print('4')", "language_id": PYTHON, "expected_output": "5"}, 4),
    "time limit": ({"source_code": "while True:\n    pass", "language_id": PYTHON, "cpu_time_limit": 0.5}, 5),
    # Judge0's extra time: killed only after 0.2 + 1 s, but over 0.2 s is over the limit.
    "time limit within the extra time": ({
        "source_code": "import time\nwhile time.process_time() < 0.5:\n    pass\nprint('done')",
        "language_id": PYTHON, "cpu_time_limit": 0.2, "cpu_extra_time": 1}, 5),
    "wall time limit": ({"source_code": "import time\ntime.sleep(30)", "language_id": PYTHON,
                         "wall_time_limit": 1}, 5),
    "compilation error": ({"source_code": "int main(void){ this is not C }", "language_id": C}, 6),
    "SIGSEGV": ({"source_code": C_CRASHES, "language_id": C, "command_line_arguments": "segv"}, 7),
    "SIGXFSZ": ({"source_code": C_CRASHES, "language_id": C, "command_line_arguments": "file",
                 "max_file_size": 16}, 8),
    "output limit": ({"source_code": "print('x' * (1 << 20))", "language_id": PYTHON, "max_file_size": 64}, 8),
    "SIGFPE": ({"source_code": C_CRASHES, "language_id": C, "command_line_arguments": "fpe"}, 9),
    "SIGABRT": ({"source_code": C_CRASHES, "language_id": C, "command_line_arguments": "abort"}, 10),
    "NZEC": ({"source_code": "import sys\nprint('bye', file=sys.stderr)\nsys.exit(3)", "language_id": PYTHON}, 11),
    "memory limit": ({"source_code": "x = bytearray(300 << 20)\nprint(len(x))", "language_id": PYTHON,
                      "memory_limit": 65536}, 12),
}


def test_every_status_a_run_can_come_to(api):
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = dict(zip(STATUS_CASES, pool.map(lambda case: judged(api, case[0]), STATUS_CASES.values())))
    got = {name: submission["status"]["id"] for name, submission in results.items()}
    assert got == {name: status for name, (_, status) in STATUS_CASES.items()}, {
        name: (submission["status"], submission["message"], submission["stderr"], submission["exit_signal"])
        for name, submission in results.items()}
    assert results["wrong answer"]["stdout"] == "4\n" and results["wrong answer"]["message"] is None
    slow = results["time limit"]
    assert slow["message"] == "Time limit exceeded" and float(slow["time"]) >= 0.5
    extra = results["time limit within the extra time"]
    assert extra["stdout"] == "done\n" and extra["exit_code"] == 0 and 0.5 <= float(extra["time"]) < 1.2
    assert results["wall time limit"]["message"] == "Time limit exceeded (wall clock)"
    broken = results["compilation error"]
    assert "error" in broken["compile_output"] and broken["stdout"] is None and broken["time"] is None
    for name, signal in (("SIGSEGV", 11), ("SIGXFSZ", 25), ("SIGFPE", 8), ("SIGABRT", 6)):
        assert results[name]["exit_signal"] == signal, results[name]
        assert results[name]["message"] == f"Caught fatal signal {signal}"
    assert results["output limit"]["message"] == "Output limit exceeded"
    assert len(results["output limit"]["stdout"]) <= 64 * 1024
    nzec = results["NZEC"]
    assert (nzec["exit_code"], nzec["stderr"], nzec["message"]) == (3, "bye\n", "Exited with error status 3")
    memory = results["memory limit"]
    assert memory["message"] == "Memory limit exceeded" and memory["memory"] <= 65536


# --- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, query, field, message", [
    ({"source_code": PY_SUM, "language_id": 9999}, "", "language_id", "language with id 9999 doesn't exist"),
    ({"source_code": PY_SUM}, "", "language_id", "can't be blank"),
    ({"source_code": PY_SUM, "language_id": "python"}, "", "language_id", "is not a number"),
    ({"language_id": PYTHON}, "", "source_code", "can't be blank"),
    ({"source_code": "  \n", "language_id": PYTHON}, "", "source_code", "can't be blank"),
    ({"source_code": "not base64!", "language_id": PYTHON}, "?base64_encoded=true", "source_code",
     "is not valid base64"),
    ({"source_code": b64(PY_SUM), "language_id": PYTHON, "stdin": "%%%"}, "?base64_encoded=true", "stdin",
     "is not valid base64"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "memory_limit": 99 << 30}, "", "memory_limit",
     "must be less than or equal to"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "memory_limit": 1024}, "", "memory_limit",
     "must be greater than or equal to 4096"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "cpu_time_limit": 10**6}, "", "cpu_time_limit",
     "must be less than or equal to"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "cpu_time_limit": "fast"}, "", "cpu_time_limit",
     "is not a number"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "cpu_time_limit": 3599, "cpu_extra_time": 5}, "",
     "cpu_extra_time", "cpu_time_limit + cpu_extra_time"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "max_file_size": 1.5}, "", "max_file_size",
     "must be an integer"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "number_of_runs": 0}, "", "number_of_runs",
     "must be greater than 0"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "compiler_options": "-O3"}, "", "compiler_options",
     "setting compiler options is not allowed"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "enable_network": True}, "", "enable_network",
     "enabling network is not allowed"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "enable_per_process_and_thread_time_limit": True}, "",
     "enable_per_process_and_thread_time_limit", "this option cannot be enabled"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "command_line_arguments": "'unbalanced"}, "",
     "command_line_arguments", "No closing quotation"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "callback_url": "ftp://127.0.0.1/hook"}, "", "callback_url",
     "must be an http or https URL"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "callback_url": "http://localhost:9/hook"}, "",
     "callback_url", "host localhost is not in this service's callback allowlist"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "callback_url": "http:///nohost"}, "", "callback_url",
     "must name a host"),
    ({"source_code": PY_SUM, "language_id": PYTHON, "additional_files": b64(b"not a zip")}, "",
     "additional_files", "is not a zip archive"),
])
def test_invalid_submissions_are_422_naming_the_field(api, body, query, field, message):
    reply = call(api, "POST", f"/submissions{query}", api.keys["alice"], body)
    assert reply.status == 422, reply.body
    errors = reply.json()
    assert list(errors) == [field] and any(message in said for said in errors[field]), errors


def test_every_wrong_field_is_named_at_once_and_the_tenants_maxima_apply(api):
    reply = call(api, "POST", "/submissions", api.keys["alice"],
                 {"language_id": PYTHON, "memory_limit": "lots", "wall_time_limit": -1, "enable_network": True})
    assert reply.status == 422
    assert set(reply.json()) == {"source_code", "memory_limit", "wall_time_limit", "enable_network"}
    tight = call(api, "POST", "/submissions", api.keys["tight"],
                 {"source_code": PY_SUM, "language_id": PYTHON, "memory_limit": 131072, "cpu_time_limit": 3})
    assert tight.json() == {"memory_limit": ["must be less than or equal to 65536"],
                            "cpu_time_limit": ["must be less than or equal to 2"]}


def test_errors_are_in_judge0_style(api):
    key = api.keys["alice"]
    for headers in ({}, {"X-Auth-Token": "sbx_not-a-key"}):
        reply = api.request("GET", "/judge0/languages", headers=headers)
        assert reply.status == 401 and set(reply.json()) == {"error"}, reply.body
    cases = [
        ("GET", f"/submissions/{uuid.uuid4()}", None, 404, "not found"),
        ("GET", "/submissions/not-a-token", None, 404, "not found"),
        ("GET", "/no_such_route", None, 404, "Not Found"),
        ("PUT", "/statuses", b"{}", 405, "Method Not Allowed"),
        ("GET", f"/submissions/{uuid.uuid4()}?fields=token,bogus,nope", None, 400, "invalid fields: [bogus, nope]"),
        ("DELETE", f"/submissions/{uuid.uuid4()}", None, 400, "delete not allowed"),
        ("GET", "/submissions", None, 403, "not supported"),
        ("GET", "/submissions/batch", None, 400, "at least one submission"),
        ("GET", "/submissions/batch?tokens=" + ",".join(str(uuid.uuid4()) for _ in range(21)), None, 400,
         "less than or equal to 20"),
        ("POST", "/submissions/batch", b'{"submissions": []}', 400, "at least one submission"),
        ("POST", "/submissions", b"{not json", 400, "not valid JSON"),
        ("POST", "/submissions?wait=maybe", b"{}", 422, None),
    ]
    for method, path, raw, status, said in cases:
        reply = call(api, method, path, key, raw=raw)
        assert reply.status == status, (method, path, reply.body)
        if said is not None:
            assert list(reply.json()) == ["error"] and said in reply.json()["error"], (path, reply.body)
    assert call(api, "POST", "/submissions?wait=maybe", key, raw=b"{}").json() == {"wait": ["must be true or false"]}
    assert call(api, "POST", "/authenticate", key).status == 200
    assert call(api, "POST", "/authorize", key).status == 403


# --- callbacks ------------------------------------------------------------------------------

class CallbackServer:
    """A real aiohttp server on 127.0.0.1, in a thread of its own, that records each PUT."""

    def __init__(self) -> None:
        self.received: queue.Queue = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="callback-server", daemon=True)
        self.port = 0

    def __enter__(self) -> CallbackServer:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/hook/{name}", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.put((request.method, request.match_info["name"], request.content_type, await request.read()))
        return web.Response(status=204)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def test_a_callback_is_put_to_an_allowlisted_host_when_the_submission_finishes(api):
    key = api.keys["alice"]
    with CallbackServer() as server:
        created = call(api, "POST", "/submissions", key,
                       {"source_code": "print('called back')", "language_id": PYTHON,
                        "callback_url": f"http://127.0.0.1:{server.port}/hook/first"})
        assert created.status == 201, created.body
        method, name, content_type, body = server.received.get(timeout=FINAL_WAIT_S)
    assert (method, name, content_type) == ("PUT", "first", "application/json")
    payload = json.loads(body)
    assert tuple(payload) == DEFAULT_FIELDS and payload["token"] == created.json()["token"]
    assert payload["status"] == {"id": 3, "description": "Accepted"}
    assert base64.b64decode(payload["stdout"]) == b"called back\n"  # callbacks are base64, as Judge0's
    again = call(api, "GET", f"/submissions/{payload['token']}?base64_encoded=true", key).json()
    assert again == payload
    assert server.received.empty()


def test_serve_refuses_a_callback_host_that_is_not_one(tmp_path, monkeypatch):
    refused = sandboxd("serve", "--state-dir", str(tmp_path), "--callback-host", "http://x/", check=False)
    assert refused.returncode == 2 and "--callback-host: 'http://x/' is not a host name" in refused.stderr
    monkeypatch.setenv("SANDBOXD_CALLBACK_HOSTS", "hooks.example.com, bad host")
    refused = sandboxd("serve", "--state-dir", str(tmp_path), check=False)
    assert refused.returncode == 2 and "SANDBOXD_CALLBACK_HOSTS: 'bad host' is not a host name" in refused.stderr


# --- the pure parts -------------------------------------------------------------------------

LANGUAGES = {language.judge0_id: language for language in load_languages().values()}


def parsed(body: dict, callbacks: CallbackAllowlist = CallbackAllowlist(), base64_encoded: bool = False):
    return parse_submission(body, base64_encoded=base64_encoded, languages=LANGUAGES, policy=default_limit_policy(),
                            tenant=Tenant(name="t"), callbacks=callbacks)


def test_without_an_allowlist_every_callback_is_refused():
    with pytest.raises(ApiError) as refused:
        parsed({"source_code": PY_SUM, "language_id": PYTHON, "callback_url": "https://example.com/hook"})
    assert refused.value.http_status == 422
    assert refused.value.details["fields"] == {
        "callback_url": ["setting callback is not allowed (this service has no callback allowlist)"]}
    ok = parsed({"source_code": PY_SUM, "language_id": PYTHON, "callback_url": ""})
    assert ok.callback_url is None and ok.submission.api_request["callback_url"] is None


def test_run_statuses_follow_judge0s_signal_mapping():
    def test(**fields) -> dict:
        return {"verdict": "runtime_error", "status": "signaled", "exit_code": None, "signal": None,
                "cpu_time_ms": 10.0, "limit_hit": None, "message": None, **fields}

    assert [run_status(test(signal=signal), 1.0)[0] for signal in (11, 25, 8, 6, 9, 5)] == [7, 8, 9, 10, 12, 12]
    assert run_status(test(status="runtime_error", exit_code=2), 1.0) == (11, "Exited with error status 2")
    assert run_status(test(verdict="accepted", status="ok", exit_code=0), 1.0) == (3, None)
    assert run_status(test(verdict="accepted", status="ok", exit_code=0, cpu_time_ms=1500.0), 1.0) == (
        5, "Time limit exceeded")
    assert run_status(test(verdict="time_limit_exceeded", status="time_limit_exceeded", limit_hit="wall_time"),
                      1.0) == (5, "Time limit exceeded (wall clock)")
    assert run_status(test(verdict="memory_limit_exceeded", status="runtime_error"), 1.0) == (
        12, "Memory limit exceeded")
    assert run_status(test(verdict="output_limit_exceeded", status="output_limit_exceeded"), 1.0) == (
        8, "Output limit exceeded")
    assert run_status(test(verdict="internal_error", status="internal_error", message="boom"), 1.0) == (13, "boom")
    assert run_status(test(verdict="internal_error", status="internal_error",
                           message="execve: Exec format error"), 1.0)[0] == 14
    assert run_status(test(verdict="wrong_answer", status="ok", exit_code=0), 1.0) == (4, None)


def test_fields_tokens_and_times_as_judge0_writes_them():
    assert requested_fields(None) == DEFAULT_FIELDS and requested_fields("") == DEFAULT_FIELDS
    assert requested_fields("*") == ALL_FIELDS and requested_fields("stdout, status") == ("stdout", "status")
    with pytest.raises(ApiError, match=r"invalid fields: \[nope\]"):
        requested_fields("stdout,nope")
    assert judge0_time("2026-01-02T03:04:05.678901Z") == "2026-01-02T03:04:05.678Z"
    assert judge0_time(None) is None


def test_additional_files_are_checked_before_they_are_unpacked():
    files = unzip_additional_files(zip_of({"a.txt": b"A", "dir/b.bin": b"\x00\x01"}), "main.py")
    assert [(file.path, file.content) for file in files] == [("a.txt", b"A"), ("dir/b.bin", b"\x00\x01")]
    for archive, said in ((b"nope", "is not a zip archive"), (zip_of({"../up.txt": b"x"}), ".."),
                          (zip_of({"main.py": b"x"}), "the source file's own name"),
                          (zip_of({"big": b"\x00" * (11 << 20)}), "unpacks to more than")):
        with pytest.raises(ValueError, match=re.escape(said)):
            unzip_additional_files(archive, "main.py")
    link = io.BytesIO()
    with zipfile.ZipFile(link, "w") as archive:
        entry = zipfile.ZipInfo("link")
        entry.external_attr = (0o120777 << 16)
        archive.writestr(entry, "/etc/passwd")
    with pytest.raises(ValueError, match="not a regular file"):
        unzip_additional_files(link.getvalue(), "main.py")


def test_the_parsed_submission_runs_once_per_run_with_judge0s_comparison():
    submission = parsed({"source_code": PY_SUM, "language_id": PYTHON, "stdin": "1 2", "expected_output": "3  \n\n",
                         "number_of_runs": 3, "command_line_arguments": "a 'b c' $HOME;rm"}).submission
    assert len(submission.tests) == 3 and submission.stop_on_first_failure and submission.keep_output
    assert submission.tests[0].args == ("a", "b c", "$HOME;rm")  # words, never shell text
    checker = submission.checker
    assert checker.check(b"3  \n\n", b"3\n").accepted and not checker.check(b"3", b" 3\n").accepted
    assert not checker.check(b"", b"").accepted  # Judge0: no output never equals an expected one
    redirected = parsed({"source_code": PY_SUM, "language_id": PYTHON, "redirect_stderr_to_stdout": "true"})
    assert redirected.submission.language.run_argv[:3] == ("sh", "-c", 'exec "$@" 2>&1')
    assert redirected.submission.language.run_argv[4:] == LANGUAGES[PYTHON].run_argv
