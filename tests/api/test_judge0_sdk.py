"""The official Judge0 Python SDK (PyPI `judge0`), unmodified, against the real service: its
client pointed at /judge0 with the tenant's key in X-Auth-Token, as README tells users to."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta

import judge0
import pytest

from servicekit import Service, add_tenant, service_leftovers

SDK_POLL_S = 240.0  # the SDK polls every 0.1 s; a bound, so that a hang fails instead


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("judge0-sdk-state")
    key = add_tenant(state_dir, "sdk")
    service = Service(state_dir, "--warm", "1").start()
    service.key = key
    # The SDK's client reads /languages at once, within httpx's 5 s: wait for the start-up
    # probes first (minutes under the VM lane's emulation), as README tells deployments to.
    ready = service.request("GET", "/v1/languages?wait=true&timeout=280", key, timeout_s=300)
    assert ready.status == 200 and all(language["status"] != "probing" for language in ready.json()["languages"])
    yield service
    assert service.stop() == 0, service.log()
    assert service_leftovers(state_dir) == []


@pytest.fixture(scope="module")
def client(service):
    return judge0.Client(f"{service.url}/judge0", {"X-Auth-Token": service.key},
                         retry_strategy=judge0.MaxWaitTime(SDK_POLL_S))


def test_the_client_reads_the_languages_config_and_version(service, client):
    assert client.version == "1.13.1"
    assert {language.id for language in client.languages} >= {50, 52, 71}
    assert all(client.is_language_supported(alias) for alias in (judge0.PYTHON, judge0.C, judge0.CPP))
    config = client.config  # the SDK's model: every field it requires, typed
    assert (config.max_submission_batch_size, config.enable_callbacks, config.enable_compiler_options) == (
        20, False, False)
    assert config.max_memory_limit >= config.memory_limit > 0
    assert [status["id"] for status in client.get_statuses()] == list(range(1, 15))
    assert client.get_language(71).source_file == "main.py"
    with pytest.raises(RuntimeError, match="Authentication failed"):
        judge0.Client(f"{service.url}/judge0", {"X-Auth-Token": "sbx_wrong"})


def test_run_one_submission_by_language_alias(client):
    submission = judge0.run(client=client, source_code="name = input()\nprint(f'héllo, {name} ✓')",
                            language=judge0.PYTHON, stdin="wörld")
    assert submission.status == judge0.Status.ACCEPTED, submission
    assert submission.stdout == "héllo, wörld ✓\n" and submission.stderr is None
    assert isinstance(submission.time, float) and submission.time >= 0 and submission.memory > 0
    assert uuid.UUID(str(submission.token)).version == 4
    assert isinstance(submission.created_at, datetime) and isinstance(submission.finished_at, datetime)
    assert timedelta(0) <= submission.finished_at - submission.created_at < timedelta(minutes=5)


def test_test_cases_go_as_a_batch_and_come_back_judged(client):
    results = judge0.run(client=client, source_code="a, b = map(int, input().split())\nprint(a + b)",
                         language=judge0.PYTHON,
                         test_cases=[("1 2", "3"), judge0.TestCase(input="40 2", expected_output="42"),
                                     {"input": "2 2", "expected_output": "5"}])
    assert [result.status for result in results] == [judge0.Status.ACCEPTED, judge0.Status.ACCEPTED,
                                                      judge0.Status.WRONG_ANSWER]
    assert [result.stdout for result in results] == ["3\n", "42\n", "4\n"]
    assert len({str(result.token) for result in results}) == 3


def test_submissions_created_then_waited_for_with_every_kind_of_end(client):
    submissions = [
        judge0.Submission(source_code="#include <stdio.h>\nint main(void){printf(\"%d\\n\", 6 * 7);}",
                          language=judge0.C),
        judge0.Submission(source_code="int main(void){ nope }", language=judge0.C),
        judge0.Submission(source_code="import sys\nsys.exit(3)", language=judge0.PYTHON),
        judge0.Submission(source_code="while True:\n    pass", language=judge0.PYTHON, cpu_time_limit=0.5),
    ]
    created = judge0.async_execute(client=client, submissions=submissions)
    assert all(submission.token is not None and submission.status is None for submission in created)
    done = judge0.wait(client=client, submissions=created)
    assert [submission.status for submission in done] == [
        judge0.Status.ACCEPTED, judge0.Status.COMPILATION_ERROR, judge0.Status.RUNTIME_ERROR_NZEC,
        judge0.Status.TIME_LIMIT_EXCEEDED]
    accepted, broken, failing, slow = done
    assert accepted.stdout == "42\n" and broken.stdout is None and "error" in broken.compile_output
    assert failing.exit_code == 3 and slow.time >= 0.5
    # As from Judge0: `message` comes base64 encoded too, and this SDK leaves it so.
    assert base64.b64decode(failing.message) == b"Exited with error status 3"


def test_the_implicit_client_finds_the_service_through_the_sdks_environment(service, monkeypatch):
    # Both flavours point here: without them the SDK would fall back to a public cloud instance.
    for flavour in ("CE", "EXTRA_CE"):
        monkeypatch.setenv(f"JUDGE0_{flavour}_ENDPOINT", f"{service.url}/judge0")
        monkeypatch.setenv(f"JUDGE0_{flavour}_AUTH_HEADERS", json.dumps({"X-Auth-Token": service.key}))
        monkeypatch.setattr(judge0, f"JUDGE0_IMPLICIT_{flavour}_CLIENT", None)
    submission = judge0.run(source_code="print(6 * 7)", language=judge0.PYTHON)
    assert (submission.status, submission.stdout) == (judge0.Status.ACCEPTED, "42\n")
    assert judge0.get_client(judge0.CE).endpoint == f"{service.url}/judge0"
