"""Job rows over a real database file: what is written at submission and at the end comes
back as it went in, listing filters and pages, a restart finishes running jobs and hands back
queued ones, and the usage rows written with each ended job add up to its figures."""

from __future__ import annotations

import itertools
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sandboxd.job import STATUSES, InputFile, Result
from sandboxd.jobs import CANCELLED, DONE, QUEUED, RUNNING, JobRecord, JobRequest
from sandboxd.limits import default_limit_policy
from sandboxd.store.db import open_database, rebuild_usage
from sandboxd.store.jobs import (
    RESTARTED_MESSAGE,
    JobFilter,
    finish_job,
    get_job,
    insert_jobs,
    list_jobs,
    mark_running,
    recover,
)
from sandboxd.store.usage import REPORT_STATUSES, parse_usage_query, usage_report

LIMITS = default_limit_policy().defaults
GIB = 2**30
_ids = itertools.count(1)


def at(day: int, hour: int = 10, minute: int = 0) -> str:
    return f"2026-03-{day:02d}T{hour:02d}:{minute:02d}:00.000000Z"


def submit(connection: sqlite3.Connection, *, tenant: str = "acme", labels: dict[str, str] | None = None,
           image: str = "host", state: str = QUEUED, request: JobRequest | None = None) -> JobRecord:
    """Insert one job as the scheduler does at submission."""
    pairs = tuple(sorted((labels or {}).items()))
    request = request or JobRequest(argv=("python3", "main.py"), image=image, limits=LIMITS, labels=pairs)
    record = JobRecord(id=f"job-{next(_ids):06d}", tenant=tenant, state=state, created_at=at(1, 0),
                       image=image, argv=request.argv, limits=LIMITS, labels=pairs,
                       started_at=at(1, 0) if state == RUNNING else None)
    insert_jobs(connection, [(record, request)])
    return record


def result(status: str = "ok", *, cpu_ms: float = 1500.5, wall_ms: float = 2000.25, memory: int = GIB,
           stdout: bytes = b"out\n", stderr: bytes = b"") -> Result:
    return Result(status=status, exit_code=0 if status == "ok" else 1, signal=9 if status == "signaled" else None,
                  cpu_time_ms=cpu_ms, cpu_user_ms=cpu_ms * 0.75, cpu_sys_ms=cpu_ms * 0.25, wall_time_ms=wall_ms,
                  memory_peak_bytes=memory, pids_peak=3, oom_killed=status == "memory_limit_exceeded",
                  limit_hit="memory" if status == "memory_limit_exceeded" else None, stdout=stdout, stderr=stderr,
                  stdout_truncated=False, stderr_truncated=bool(stderr), accounting_source={"cpu": "cgroup"},
                  message=None)


def finish(connection: sqlite3.Connection, record: JobRecord, finished_at: str, outcome: Result | None,
           state: str = DONE) -> JobRecord:
    final = record.replace(state=state, finished_at=finished_at, result=outcome,
                           started_at=record.started_at or (at(1, 0) if outcome is not None else None))
    finish_job(connection, final)
    return final


def usage_rows(connection: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Both usage tables, in key order, figures rounded (sums may add up in another order)."""
    def rounded(row: sqlite3.Row) -> tuple[Any, ...]:
        return tuple(round(value, 3) if isinstance(value, float) else value for value in row)
    return {
        "job_label_usage": [rounded(row) for row in connection.execute(
            "SELECT * FROM job_label_usage ORDER BY name, tenant, finished_at, job_seq")],
        "usage_daily": [rounded(row) for row in connection.execute(
            "SELECT * FROM usage_daily ORDER BY name, tenant, day, value, report_status")],
    }


def rebuilt(connection: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """The usage tables as rebuild_usage derives them from the jobs (left unchanged)."""
    connection.execute("BEGIN")
    try:
        rebuild_usage(connection)
        return usage_rows(connection)
    finally:
        connection.execute("ROLLBACK")


# --- round trip --------------------------------------------------------------------------

def test_a_job_comes_back_as_it_was_submitted_and_finished(db: sqlite3.Connection) -> None:
    record = submit(db, labels={"problem": "p1", "contest": "spring"}, image="python3.12")
    stored = get_job(db, record.id)
    assert stored == record  # queued: no result, no times but the creation
    mark_running(db, record.id, at(1, 1))
    running = get_job(db, record.id)
    assert running is not None and (running.state, running.started_at) == (RUNNING, at(1, 1))
    outcome = result("runtime_error", stdout=b"\x00binary\xff", stderr=b"Traceback\n")
    final = record.replace(state=DONE, started_at=at(1, 1), finished_at=at(1, 2), result=outcome)
    finish_job(db, final)
    assert get_job(db, record.id) == final  # every figure, the outputs and the labels
    assert get_job(db, "no-such-job") is None


def test_a_job_cancelled_while_queued_has_no_result(db: sqlite3.Connection) -> None:
    record = submit(db, labels={"problem": "p1"})
    final = finish(db, record, at(2), None, state=CANCELLED)
    assert get_job(db, record.id) == final
    label_usage = db.execute("SELECT state, status, cpu_time_ms FROM job_label_usage").fetchall()
    assert [tuple(row) for row in label_usage] == [(CANCELLED, None, None)]


# --- listing -----------------------------------------------------------------------------

def test_list_filters_by_tenant_state_and_label_newest_first(db: sqlite3.Connection) -> None:
    queued = submit(db, labels={"problem": "p1"})
    running = submit(db, labels={"problem": "p1", "contest": "c"}, state=RUNNING)
    done = finish(db, submit(db, labels={"problem": "p2"}), at(2), result())
    other = finish(db, submit(db, tenant="beta", labels={"problem": "p1"}), at(2), result())

    def ids(where: JobFilter) -> list[str]:
        records, cursor = list_jobs(db, where)
        assert cursor is None
        return [record.id for record in records]

    assert ids(JobFilter()) == [other.id, done.id, running.id, queued.id]
    assert ids(JobFilter(tenant="acme")) == [done.id, running.id, queued.id]
    assert ids(JobFilter(tenant="acme", state=QUEUED)) == [queued.id]
    assert ids(JobFilter(state=DONE)) == [other.id, done.id]
    # the label filter finds jobs in every state, not only ended ones
    assert ids(JobFilter(tenant="acme", label=("problem", "p1"))) == [running.id, queued.id]
    assert ids(JobFilter(label=("problem", "p1"))) == [other.id, running.id, queued.id]
    assert ids(JobFilter(label=("contest", "c"), state=RUNNING)) == [running.id]
    assert ids(JobFilter(label=("problem", "nope"))) == []
    records, _ = list_jobs(db, JobFilter(tenant="acme", state=DONE))
    assert records == [done]  # with its result and outputs


def test_list_pages_with_the_cursor(db: sqlite3.Connection) -> None:
    records = [submit(db, labels={"k": "v"} if index % 2 else {}) for index in range(7)]
    newest_first = [record.id for record in reversed(records)]
    seen, cursor = [], None
    while True:
        page, cursor = list_jobs(db, JobFilter(tenant="acme", before_seq=cursor, limit=3))
        seen.append([record.id for record in page])
        if cursor is None:
            break
    assert seen == [newest_first[0:3], newest_first[3:6], newest_first[6:]]
    labelled, cursor = list_jobs(db, JobFilter(label=("k", "v"), limit=2))
    assert [record.id for record in labelled] == [records[5].id, records[3].id]
    rest, last = list_jobs(db, JobFilter(label=("k", "v"), limit=2, before_seq=cursor))
    assert ([record.id for record in rest], last) == ([records[1].id], None)


# --- restart -----------------------------------------------------------------------------

def test_recover_finishes_running_jobs_and_returns_queued_ones_with_their_inputs(db: sqlite3.Connection) -> None:
    running = submit(db, labels={"problem": "p1", "contest": "c"}, state=RUNNING)
    request = JobRequest(argv=("sh", "-c", "cat in.txt"), image="host", limits=LIMITS, stdin=b"\x00\x01 stdin",
                         files=(InputFile("in.txt", b"data\n", 0o600), InputFile("bin/run", b"#!/bin/sh\n", 0o755)),
                         env=(("A", "1"), ("B", "two")), labels=(("problem", "p2"),))
    queued = submit(db, labels={"problem": "p2"}, request=request)
    done = finish(db, submit(db, labels={"problem": "p1"}), at(2), result())
    now = at(3, 12)

    interrupted, waiting = recover(db, now)

    assert interrupted == [running.id]
    assert waiting == [(queued, request)]
    stopped = get_job(db, running.id)
    assert stopped is not None and stopped.result is not None
    assert (stopped.state, stopped.finished_at, stopped.result.status, stopped.result.message) == (
        DONE, now, "internal_error", RESTARTED_MESSAGE)
    assert (stopped.result.cpu_time_ms, stopped.result.wall_time_ms, stopped.result.memory_peak_bytes) == (0, 0, 0)
    assert get_job(db, done.id) == done
    label_usage = db.execute(
        "SELECT name, value, finished_at, state, status FROM job_label_usage WHERE job_seq ="
        " (SELECT seq FROM jobs WHERE id = ?) ORDER BY name", (running.id,)).fetchall()
    assert [tuple(row) for row in label_usage] == [
        ("contest", "c", now, DONE, "internal_error"), ("problem", "p1", now, DONE, "internal_error")]
    report = usage_report(db, parse_usage_query("acme", None, None, "label:problem"))
    assert {(row["group"], row["jobs"]): row["by_status"] for row in report["rows"]} == {
        ("p1", 2): {"ok": 1, "internal_error": 1}}
    assert usage_rows(db) == rebuilt(db)
    assert recover(db, at(4)) == ([], [(queued, request)])  # nothing more to finish


# --- usage rows --------------------------------------------------------------------------

def random_history(connection: sqlite3.Connection, count: int, seed: int) -> list[JobRecord]:
    """Jobs in every state over three days, ended ones through finish_job."""
    chooser = random.Random(seed)
    times = [at(day, hour, minute) for day in (1, 2, 3) for hour in (0, 9, 23) for minute in (0, 30)]
    records = []
    for _ in range(count):
        labels = {"origin": chooser.choice(["web", "api"])}  # on every job
        if chooser.random() < 0.3:
            labels["problem"] = chooser.choice(["a", "b", "c"])
        record = submit(connection, tenant=chooser.choice(["acme", "beta"]), labels=labels,
                        image=chooser.choice(["host", "gcc13"]), state=chooser.choice([QUEUED, RUNNING]))
        ending = chooser.choice(["done"] * 6 + ["cancelled-queued", "cancelled-running", "open"])
        if ending == "done":
            outcome = result(chooser.choice(STATUSES), cpu_ms=chooser.randint(0, 10**6) / 8,
                             wall_ms=chooser.randint(0, 10**6) / 4, memory=chooser.randint(0, 4 * GIB))
            record = finish(connection, record, chooser.choice(times), outcome)
        elif ending == "cancelled-queued":
            record = finish(connection, record, chooser.choice(times), None, state=CANCELLED)
        elif ending == "cancelled-running":
            record = finish(connection, record, chooser.choice(times), result("signaled"), state=CANCELLED)
        records.append(record)
    return records


def per_job_sums(records: list[JobRecord], tenant: str | None, lo: str | None, hi: str | None,
                 label: str) -> dict[tuple[str, str | None], tuple[int, float, float, float, dict[str, int]]]:
    """The report by label, summed job by job from the records."""
    out: dict[tuple[str, str | None], list[Any]] = {}
    for record in records:
        if record.finished_at is None or (tenant is not None and record.tenant != tenant):
            continue
        if (lo is not None and record.finished_at < lo) or (hi is not None and record.finished_at >= hi):
            continue
        status = CANCELLED if record.state == CANCELLED else record.result.status if record.result else None
        entry = out.setdefault((record.tenant, dict(record.labels).get(label)), [0, 0.0, 0.0, 0.0, {}])
        figures = record.result
        entry[0] += 1
        entry[1] += figures.cpu_time_ms / 1000 if figures else 0.0
        entry[2] += figures.wall_time_ms / 1000 if figures else 0.0
        entry[3] += figures.memory_peak_bytes / GIB * figures.wall_time_ms / 1000 if figures else 0.0
        if status in REPORT_STATUSES:
            entry[4][status] = entry[4].get(status, 0) + 1
    return {key: tuple(value) for key, value in out.items()}


@pytest.mark.parametrize("label", ["problem", "origin", "absent"])
@pytest.mark.parametrize("tenant, lo, hi", [
    (None, None, None),
    ("acme", "2026-03-02", "2026-03-03"),
    (None, "2026-03-01T09:00", "2026-03-03T09:30"),
    ("beta", "2026-03-02T00:30", "2026-03-02T23:00"),
])
def test_usage_by_label_equals_a_per_job_sum(db: sqlite3.Connection, label: str, tenant: str | None,
                                             lo: str | None, hi: str | None) -> None:
    records = random_history(db, 300, seed=7)
    query = parse_usage_query(tenant, lo, hi, f"label:{label}")
    rows = usage_report(db, query)["rows"]
    expected = per_job_sums(records, tenant, query.from_time, query.to_time, label)
    assert [(row["tenant"], row["group"]) for row in rows] == sorted(
        expected, key=lambda key: (key[0], key[1] is not None, key[1] or ""))
    for row in rows:
        jobs, cpu_s, wall_s, gib_s, by_status = expected[(row["tenant"], row["group"])]
        assert (row["jobs"], row["by_status"]) == (jobs, by_status)
        assert row["cpu_seconds"] == pytest.approx(cpu_s, abs=2e-6)
        assert row["wall_seconds"] == pytest.approx(wall_s, abs=2e-6)
        assert row["memory_gb_seconds"] == pytest.approx(gib_s, abs=2e-6)


def test_usage_rows_written_with_each_job_equal_a_rebuild_from_the_jobs(db: sqlite3.Connection) -> None:
    random_history(db, 200, seed=11)
    recover(db, at(3, 23, 59))
    written = usage_rows(db)
    assert written["job_label_usage"] and written["usage_daily"]
    assert written == rebuilt(db)


def test_finishing_a_job_again_replaces_what_it_counted(db: sqlite3.Connection) -> None:
    record = submit(db, labels={"problem": "p1"})
    finish(db, record, at(1), result("ok", cpu_ms=100.0))
    finish(db, record, at(2), result("runtime_error", cpu_ms=300.0))
    assert usage_rows(db) == rebuilt(db)
    report = usage_report(db, parse_usage_query(None, None, None, "label:problem"))
    assert [(row["group"], row["jobs"], row["cpu_seconds"], row["by_status"]) for row in report["rows"]] == [
        ("p1", 1, 0.3, {"runtime_error": 1})]


def test_opening_a_database_without_the_usage_tables_derives_them(db: sqlite3.Connection, db_dir: Path) -> None:
    random_history(db, 50, seed=3)
    written = usage_rows(db)
    db.execute("DROP TABLE usage_daily")
    db.execute("DROP TABLE job_label_usage")
    open_database(db_dir)
    assert usage_rows(db) == written
