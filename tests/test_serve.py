"""The service's life: quotas and back-pressure, fairness, SIGKILL and restart, SIGTERM drain.
Each test runs its own real service on a loopback port with its own state directory."""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import threading
from pathlib import Path

import pytest

from conftest import leftover_job_cgroups
from servicekit import Service, add_tenant, sandboxd, service_leftovers
from sandboxd.store.jobs import RESTARTED_MESSAGE
from sandboxd.scheduler.scheduler import STOPPED_MESSAGE


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o711)
    return path


def job_row(state_dir: Path, job_id: str) -> dict:
    with sqlite3.connect(state_dir / "sandboxd.db") as connection:
        connection.row_factory = sqlite3.Row
        return dict(connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def launcher_pidfds(service: Service) -> list[int]:
    """pidfds of the service's processes other than itself: the launcher and containers."""
    marker = str(service.state_dir)
    fds = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != service.process.pid:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if marker in cmdline and "sandboxd.runtime.launcher" in cmdline:
                    fds.append(os.pidfd_open(int(pid)))
            except (OSError, ProcessLookupError):
                continue
    return fds


def all_exit(pidfds: list[int], timeout_s: float) -> bool:
    """Wait (on the pidfds, not a sleep) until every process has ended."""
    pending = list(pidfds)
    while pending:
        ready, _, _ = select.select(pending, [], [], timeout_s)
        if not ready:
            return False
        pending = [fd for fd in pending if fd not in ready]
    return True


def test_sigkill_then_restart_finishes_running_jobs_and_runs_queued_ones_once(state_dir):
    key = add_tenant(state_dir, "tina")
    service = Service(state_dir, "--workers", "1", "--warm", "0").start()
    running = service.request("POST", "/v1/jobs", key, {"cmd": ["sleep", "60"]}).json()
    queued = [service.request("POST", "/v1/jobs", key, {"cmd": ["echo", f"queued {n}"]}).json() for n in range(3)]
    assert running["state"] == "running" and all(job["state"] == "queued" for job in queued)
    processes = launcher_pidfds(service)
    assert processes, "the launcher process was not found"
    service.kill()
    # The launcher and the containers die with the service, whatever killed it.
    assert all_exit(processes, 30)

    service = Service(state_dir, "--workers", "1", "--warm", "0").start()
    try:
        interrupted = service.request("GET", f"/v1/jobs/{running['id']}", key).json()
        assert interrupted["state"] == "done"
        assert interrupted["result"]["status"] == "internal_error"
        assert interrupted["result"]["message"] == RESTARTED_MESSAGE
        assert leftover_job_cgroups() == []
        # The tenant's jobs run in order: when this one is done, the requeued ones are too.
        service.run(key, {"cmd": ["true"]})
        for n, job in enumerate(queued):
            done = service.request("GET", f"/v1/jobs/{job['id']}", key).json()
            assert done["state"] == "done" and done["result"]["stdout"] == f"queued {n}\n"
    finally:
        assert service.stop() == 0
    started = [event["job_id"] for event in service.log_events() if event["event"] == "job.running"]
    for job in [running, *queued]:
        assert started.count(job["id"]) == 1, f"job {job['id']} ran {started.count(job['id'])} times"
    assert service_leftovers(state_dir) == []


def test_sigkill_during_a_stream_of_submissions_loses_no_accepted_job(state_dir):
    key = add_tenant(state_dir, "sam")
    service = Service(state_dir, "--workers", "2", "--warm", "1").start()
    accepted: list[str] = []
    enough = threading.Event()

    def submit() -> None:
        while True:
            try:
                reply = service.request("POST", "/v1/jobs", key, {"cmd": ["echo", "once"]}, timeout_s=10)
            except OSError:
                return  # the service is gone
            if reply.status == 201:
                accepted.append(reply.json()["id"])
                if len(accepted) >= 30:
                    enough.set()

    clients = [threading.Thread(target=submit) for _ in range(4)]
    for client in clients:
        client.start()
    assert enough.wait(60), "the service accepted fewer than 30 jobs in a minute"
    service.kill()  # mid-stream: requests in flight, jobs queued, running and finishing
    for client in clients:
        client.join()

    service = Service(state_dir, "--workers", "2", "--warm", "0").start()
    try:
        service.run(key, {"cmd": ["true"]})  # the tenant's queue is FIFO: all before it ended
        for job_id in accepted:
            job = service.request("GET", f"/v1/jobs/{job_id}", key).json()
            assert job["state"] == "done", job
            result = job["result"]
            assert (result["status"], result["stdout"]) == ("ok", "once\n") or (
                result["status"] == "internal_error" and result["message"] == RESTARTED_MESSAGE), job
    finally:
        assert service.stop() == 0
    started = [event["job_id"] for event in service.log_events() if event["event"] == "job.running"]
    assert all(started.count(job_id) <= 1 for job_id in accepted)
    assert service_leftovers(state_dir) == []


def test_sigterm_lets_running_jobs_finish_and_refuses_new_ones(state_dir):
    key = add_tenant(state_dir, "tom")
    service = Service(state_dir, "--warm", "0", "--grace", "60").start()
    job = service.request("POST", "/v1/jobs", key, {"cmd": ["sh", "-c", "sleep 1; echo finished"]}).json()
    assert job["state"] == "running"
    service.process.send_signal(signal.SIGTERM)
    # Draining: no new work is accepted, by refused connection or by 503.
    try:
        late = service.request("POST", "/v1/jobs", key, {"cmd": ["true"]}, timeout_s=10)
        assert late.status == 503 and late.error_code == "shutting_down"
    except OSError:
        pass
    assert service.stop() == 0
    row = job_row(state_dir, job["id"])
    assert (row["state"], row["status"]) == ("done", "ok")
    assert service_leftovers(state_dir) == []


def test_sigterm_stops_jobs_still_running_after_the_grace_period(state_dir):
    key = add_tenant(state_dir, "tess")
    service = Service(state_dir, "--warm", "0", "--grace", "0.5").start()
    job = service.request("POST", "/v1/jobs", key, {"cmd": ["sleep", "60"]}).json()
    assert service.stop(timeout_s=30) == 0
    row = job_row(state_dir, job["id"])
    assert (row["state"], row["status"], row["message"]) == ("done", "internal_error", STOPPED_MESSAGE)
    assert row["wall_time_ms"] < 30_000
    assert service_leftovers(state_dir) == []


def test_a_second_service_on_the_same_state_dir_is_refused(state_dir):
    service = Service(state_dir, "--warm", "0").start()
    try:
        second = sandboxd("serve", "--port", "0", "--state-dir", str(state_dir), check=False)
        assert second.returncode == 1 and "another sandboxd serve" in second.stderr
    finally:
        assert service.stop() == 0


def test_tenant_quotas_answer_429_and_422(state_dir):
    limited = add_tenant(state_dir, "lim", "--max-concurrent", "1", "--max-queued", "1",
                         "--max-memory", "64m", "--max-cpu-time", "2")
    service = Service(state_dir, "--warm", "0").start()
    try:
        first = service.request("POST", "/v1/jobs", limited, {"cmd": ["sleep", "30"]}).json()
        assert first["limits"]["memory"] == 64 << 20 and first["limits"]["cpu_time"] == 2
        second = service.request("POST", "/v1/jobs", limited, {"cmd": ["true"]}).json()
        assert (first["state"], second["state"]) == ("running", "queued")
        third = service.request("POST", "/v1/jobs", limited, {"cmd": ["true"]})
        assert third.status == 429 and third.error_code == "too_many_queued" and third.headers["Retry-After"]
        over = service.request("POST", "/v1/jobs", limited, {"cmd": ["true"], "limits": {"memory": "128m"}})
        assert over.status == 422 and over.json()["error"]["details"]["field"] == "limits.memory"
        over = service.request("POST", "/v1/jobs", limited, {"cmd": ["true"], "limits": {"cpu_time": 5}})
        assert over.status == 422 and over.json()["error"]["details"]["field"] == "limits.cpu_time"
        assert service.request("DELETE", f"/v1/jobs/{first['id']}", limited).status == 200
        assert service.request("GET", f"/v1/jobs/{second['id']}", limited).json()["state"] in ("running", "done")
    finally:
        assert service.stop() == 0


def test_cpu_seconds_per_day_is_enforced_with_retry_after(state_dir):
    key = add_tenant(state_dir, "cpu", "--cpu-seconds-per-day", "0.05")
    service = Service(state_dir, "--warm", "0").start()
    try:
        burn = service.run(key, {"cmd": ["python3", "-c", "sum(range(2 * 10**7))"]})
        assert burn["result"]["cpu_time_ms"] >= 50
        refused = service.request("POST", "/v1/jobs", key, {"cmd": ["true"]})
        assert refused.status == 429 and refused.error_code == "cpu_quota_exhausted"
        assert 0 < int(refused.headers["Retry-After"]) <= 86_401
    finally:
        assert service.stop() == 0


def test_a_full_queue_is_503_with_retry_after(state_dir):
    key = add_tenant(state_dir, "q")
    service = Service(state_dir, "--warm", "0", "--workers", "1", "--max-queue", "1").start()
    try:
        running = service.request("POST", "/v1/jobs", key, {"cmd": ["sleep", "30"]}).json()
        assert service.request("POST", "/v1/jobs", key, {"cmd": ["true"]}).status == 201
        full = service.request("POST", "/v1/jobs", key, {"cmd": ["true"]})
        assert full.status == 503 and full.error_code == "queue_full" and full.headers["Retry-After"]
        assert service.request("DELETE", f"/v1/jobs/{running['id']}", key).status == 200
    finally:
        assert service.stop() == 0


def test_one_tenants_flood_does_not_starve_another(state_dir):
    flooder = add_tenant(state_dir, "flood")
    quiet = add_tenant(state_dir, "quiet")
    service = Service(state_dir, "--warm", "0", "--workers", "1").start()
    try:
        flood = service.request("POST", "/v1/jobs/batch", flooder,
                                {"jobs": [{"cmd": ["true"]} for _ in range(40)]}).json()["jobs"]
        mine = service.run(quiet, {"cmd": ["true"]})
        flood_ids = [job["id"] for job in flood]
        last = service.run(flooder, {"cmd": ["true"]})  # after every earlier flood job
        assert last["state"] == "done"
        starts = sorted((service.request("GET", f"/v1/jobs/{job_id}", flooder).json()["started_at"], job_id)
                        for job_id in flood_ids)
        started_after_mine = [job_id for started, job_id in starts if started > mine["started_at"]]
        # One worker: the quiet tenant's job waited for at most the job running and one turn.
        assert len(started_after_mine) >= len(flood_ids) - 2
    finally:
        assert service.stop() == 0


def test_garbage_from_one_tenant_does_not_stop_another_being_served(state_dir):
    noisy = add_tenant(state_dir, "noisy")
    calm = add_tenant(state_dir, "calm")
    service = Service(state_dir, "--warm", "0").start()
    errors: list[int] = []

    def spam() -> None:
        for n in range(200):
            errors.append(service.request("POST", "/v1/jobs", noisy, raw=b"{" * (n % 7 + 1)).status)

    try:
        threads = [threading.Thread(target=spam) for _ in range(4)]
        for thread in threads:
            thread.start()
        served = [service.run(calm, {"cmd": ["echo", "ok"]})["result"]["stdout"] for _ in range(5)]
        for thread in threads:
            thread.join()
        assert served == ["ok\n"] * 5
        assert set(errors) == {400}
    finally:
        assert service.stop() == 0


def test_tenant_commands_manage_keys(state_dir):
    key = add_tenant(state_dir, "kim")
    listed = json.loads(sandboxd("tenant", "ls", "--json", "--state-dir", str(state_dir)).stdout)
    assert [t["tenant"] for t in listed] == ["kim"]
    assert "key" not in json.dumps(listed)
    duplicate = sandboxd("tenant", "add", "kim", "--state-dir", str(state_dir), check=False)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad = sandboxd("tenant", "add", "Bad Name!", "--state-dir", str(state_dir), check=False)
    assert bad.returncode == 1 and "must match" in bad.stderr
    new_key = json.loads(sandboxd("tenant", "rotate-key", "kim", "--json", "--state-dir", str(state_dir)).stdout)["api_key"]
    assert new_key != key
    service = Service(state_dir, "--warm", "0").start()
    try:
        assert service.request("GET", "/v1/jobs", key).status == 401
        assert service.request("GET", "/v1/jobs", new_key).status == 200
    finally:
        assert service.stop() == 0
    sandboxd("tenant", "rm", "kim", "--state-dir", str(state_dir))
    assert json.loads(sandboxd("tenant", "ls", "--json", "--state-dir", str(state_dir)).stdout) == []
