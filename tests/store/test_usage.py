"""Usage reports over a real database file, filled through the job writes the scheduler
uses: what counts, how it groups, how it is printed, and that each statement reads one index
range."""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandboxd.job import STATUSES, Result
from sandboxd.jobs import CANCELLED, QUEUED, RUNNING, JobRecord, JobRequest
from sandboxd.limits import default_limit_policy
from sandboxd.store import usage
from sandboxd.store.db import DATABASE_FILE, connect
from sandboxd.store.jobs import finish_job, insert_jobs
from sandboxd.store.usage import (
    CSV_COLUMNS,
    UsageQuery,
    UsageQueryError,
    parse_time_bound,
    parse_usage_query,
    report_plans,
    usage_csv,
    usage_report,
    usage_table,
)
from sandboxd.usage_cli import add_usage_parser, run_usage_command

GIB = 2**30


@dataclass
class Job:
    tenant: str = "acme"
    finished_at: str | None = "2026-03-01T10:00:00.000000Z"
    state: str = "done"
    status: str | None = "ok"
    image: str = "host"
    cpu_ms: float | None = 1000.0
    wall_ms: float | None = 2000.0
    memory: int | None = GIB
    labels: dict[str, str] = field(default_factory=dict)


LIMITS = default_limit_policy().defaults
CREATED = "2026-01-01T00:00:00.000000Z"


def result_of(job: Job) -> Result | None:
    if job.status is None:
        assert (job.cpu_ms, job.wall_ms, job.memory) == (None, None, None), "figures come with a result"
        return None
    assert job.cpu_ms is not None and job.wall_ms is not None and job.memory is not None
    return Result(status=job.status, exit_code=0 if job.status == "ok" else 1, signal=None, cpu_time_ms=job.cpu_ms,
                  cpu_user_ms=job.cpu_ms, cpu_sys_ms=0.0, wall_time_ms=job.wall_ms, memory_peak_bytes=job.memory,
                  pids_peak=1, oom_killed=False, limit_hit=None, stdout=b"", stderr=b"", stdout_truncated=False,
                  stderr_truncated=False, accounting_source={})


def insert(connection: sqlite3.Connection, *jobs: Job) -> None:
    """Store the jobs as the scheduler does: submitted, then (unless still queued or
    running) finished with their result."""
    connection.execute("BEGIN")
    for job in jobs:
        labels = tuple(sorted(job.labels.items()))
        queued = job.state == QUEUED or (job.state == CANCELLED and job.status is None)
        record = JobRecord(id=uuid.uuid4().hex, tenant=job.tenant, state=QUEUED if queued else RUNNING,
                           created_at=CREATED, image=job.image, argv=("true",), limits=LIMITS, labels=labels,
                           started_at=None if queued else CREATED)
        insert_jobs(connection, [(record, JobRequest(argv=("true",), image=job.image, limits=LIMITS, labels=labels))])
        if job.finished_at is not None:
            finish_job(connection, record.replace(state=job.state, finished_at=job.finished_at, result=result_of(job)))
    connection.execute("COMMIT")


def report(connection: sqlite3.Connection, tenant: str | None = None, from_text: str | None = None,
           to_text: str | None = None, group_by: str | None = None) -> dict[str, Any]:
    return usage_report(connection, parse_usage_query(tenant, from_text, to_text, group_by))


def groups(result: dict[str, Any]) -> dict[tuple[str, str | None], int]:
    return {(row["tenant"], row["group"]): row["jobs"] for row in result["rows"]}


def at(day: int, hour: int = 10, minute: int = 0, second: int = 0, micro: int = 0) -> str:
    return f"2026-03-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}Z"


# --- what counts -------------------------------------------------------------------------

def test_totals_equal_the_sum_of_every_finished_jobs_figures(db: sqlite3.Connection) -> None:
    jobs = [
        Job(tenant="acme", cpu_ms=1500.25, wall_ms=3000.5, memory=GIB // 2),
        Job(tenant="acme", cpu_ms=10.0, wall_ms=20.0, memory=3 * GIB, status="runtime_error"),
        Job(tenant="beta", cpu_ms=0.125, wall_ms=1.0, memory=4096),
        Job(tenant="beta", state="cancelled", status=None, cpu_ms=None, wall_ms=None, memory=None),
    ]
    insert(db, *jobs)
    totals = report(db)["totals"]
    assert totals["jobs"] == 4
    assert totals["cpu_seconds"] == round(sum(job.cpu_ms or 0 for job in jobs) / 1000, 6)
    assert totals["wall_seconds"] == round(sum(job.wall_ms or 0 for job in jobs) / 1000, 6)
    expected_gib_s = sum((job.memory or 0) / GIB * (job.wall_ms or 0) / 1000 for job in jobs)
    assert totals["memory_gb_seconds"] == pytest.approx(round(expected_gib_s, 6), abs=1e-6)
    assert totals["by_status"] == {"ok": 2, "runtime_error": 1, "cancelled": 1}


def test_memory_is_charged_in_gib_seconds_over_the_wall_time(db: sqlite3.Connection) -> None:
    insert(db, Job(memory=2 * GIB, wall_ms=1500.0))
    assert report(db)["totals"]["memory_gb_seconds"] == 3.0


def test_each_tenant_gets_its_own_row_and_the_tenant_filter_keeps_one(db: sqlite3.Connection) -> None:
    insert(db, Job(tenant="acme"), Job(tenant="acme"), Job(tenant="beta"), Job(tenant="zeta"))
    assert groups(report(db)) == {("acme", None): 2, ("beta", None): 1, ("zeta", None): 1}
    only = report(db, tenant="beta")
    assert groups(only) == {("beta", None): 1}
    assert only["totals"]["jobs"] == 1
    assert report(db, tenant="nobody")["rows"] == []


def test_queued_and_running_jobs_are_not_counted(db: sqlite3.Connection) -> None:
    insert(db, Job(), Job(state="queued", finished_at=None, status=None, cpu_ms=None, wall_ms=None, memory=None),
           Job(state="running", finished_at=None, status=None, cpu_ms=None, wall_ms=None, memory=None))
    result = report(db)
    assert result["totals"]["jobs"] == 1
    assert result["totals"]["cpu_seconds"] == 1.0


def test_cancelled_jobs_count_as_cancelled_even_with_a_result(db: sqlite3.Connection) -> None:
    insert(db,
           Job(state="cancelled", status="signaled", cpu_ms=500.0, wall_ms=700.0),  # cancelled while running
           Job(state="cancelled", status=None, cpu_ms=None, wall_ms=None, memory=None),  # while queued
           Job(status="signaled"))
    result = report(db)
    assert result["totals"]["by_status"] == {"signaled": 1, "cancelled": 2}
    assert result["totals"]["cpu_seconds"] == 1.5  # the running one's figures count; NULLs as 0
    assert groups(report(db, group_by="status")) == {("acme", "signaled"): 1, ("acme", "cancelled"): 2}


def test_window_is_half_open_on_finished_at(db: sqlite3.Connection) -> None:
    insert(db, Job(finished_at=at(1, 9, 59, 59, 999999)), Job(finished_at=at(1, 10)),
           Job(finished_at=at(2, 9, 59, 59, 999999)), Job(finished_at=at(2, 10)))
    assert report(db, from_text="2026-03-01T10:00", to_text="2026-03-02T10:00Z")["totals"]["jobs"] == 2
    assert report(db, from_text="2026-03-01T10:00")["totals"]["jobs"] == 3
    assert report(db, to_text="2026-03-01T10:00:00.000000Z")["totals"]["jobs"] == 1
    # the same instants written in another zone
    assert report(db, from_text="2026-03-01T11:00+01:00", to_text="2026-03-02T05:00-05:00")["totals"]["jobs"] == 2


def test_report_echoes_the_canonical_window_and_grouping(db: sqlite3.Connection) -> None:
    result = report(db, from_text="2026-03-01", to_text="2026-03-01T12:30+02:00", group_by="day")
    assert (result["from"], result["to"], result["group_by"]) == (
        "2026-03-01T00:00:00.000000Z", "2026-03-01T10:30:00.000000Z", "day")
    assert result["rows"] == []
    assert result["totals"] == {"jobs": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0,
                                "memory_gb_seconds": 0.0, "by_status": {}}


# --- grouping ----------------------------------------------------------------------------

def test_group_by_day_and_hour_use_the_utc_prefix_of_finished_at(db: sqlite3.Connection) -> None:
    insert(db, Job(finished_at=at(1, 23, 59, 59)), Job(finished_at=at(2, 0)), Job(finished_at=at(2, 0, 30)),
           Job(tenant="beta", finished_at=at(2, 7)))
    assert groups(report(db, group_by="day")) == {
        ("acme", "2026-03-01"): 1, ("acme", "2026-03-02"): 2, ("beta", "2026-03-02"): 1}
    assert groups(report(db, group_by="hour")) == {
        ("acme", "2026-03-01T23"): 1, ("acme", "2026-03-02T00"): 2, ("beta", "2026-03-02T07"): 1}
    # a window that starts and ends inside an hour keeps only that part of it
    inside = report(db, from_text="2026-03-02T00:15", to_text="2026-03-02T07:00", group_by="hour")
    assert groups(inside) == {("acme", "2026-03-02T00"): 1}


def test_group_by_image_sums_each_image_apart(db: sqlite3.Connection) -> None:
    insert(db, Job(image="host", cpu_ms=100.0), Job(image="gcc13", cpu_ms=200.0), Job(image="gcc13", cpu_ms=300.0))
    rows = report(db, group_by="image")["rows"]
    assert [(row["group"], row["jobs"], row["cpu_seconds"]) for row in rows] == [
        ("gcc13", 2, 0.5), ("host", 1, 0.1)]


def test_group_by_status_gives_each_row_its_own_status(db: sqlite3.Connection) -> None:
    insert(db, Job(status="ok"), Job(status="time_limit_exceeded"), Job(status="ok"))
    rows = report(db, group_by="status")["rows"]
    assert [(row["group"], row["jobs"], row["by_status"]) for row in rows] == [
        ("ok", 2, {"ok": 2}), ("time_limit_exceeded", 1, {"time_limit_exceeded": 1})]


@pytest.mark.parametrize("labelled", [1, 9], ids=["rare-label", "common-label"])
def test_group_by_label_puts_jobs_without_it_in_group_none(db: sqlite3.Connection, labelled: int) -> None:
    jobs = [Job(labels={"problem": f"p{index % 2}"} if index < labelled else {"other": "x"},
                cpu_ms=float(index + 1)) for index in range(10)]
    insert(db, *jobs, Job(tenant="beta"))
    rows = report(db, group_by="label:problem")["rows"]
    expected_none = [job for job in jobs if "problem" not in job.labels]
    by_group = {(row["tenant"], row["group"]): row for row in rows}
    assert by_group[("acme", None)]["jobs"] == len(expected_none)
    assert by_group[("acme", None)]["cpu_seconds"] == round(sum(job.cpu_ms or 0 for job in expected_none) / 1000, 6)
    assert by_group[("beta", None)]["jobs"] == 1
    for value in ("p0", "p1"):
        members = [job for job in jobs if job.labels.get("problem") == value]
        if members:
            assert by_group[("acme", value)]["jobs"] == len(members)
    assert [key for key in by_group] == sorted(by_group, key=lambda key: (key[0], key[1] is not None, key[1] or ""))
    assert sum(row["jobs"] for row in rows) == 11


def test_a_label_every_job_carries_leaves_no_group_none(db: sqlite3.Connection) -> None:
    jobs = [Job(finished_at=at(day, hour), labels={"queue": f"h{hour}"}, cpu_ms=float(hour))
            for day in (1, 2, 3) for hour in (0, 11, 23)]
    insert(db, *jobs)
    for window in [(None, None), ("2026-03-02", "2026-03-03"), ("2026-03-01T11:00", "2026-03-03T11:00")]:
        rows = report(db, None, *window, "label:queue")["rows"]
        assert all(row["group"] is not None for row in rows)
        assert sum(row["jobs"] for row in rows) == report(db, None, *window)["totals"]["jobs"]
    assert groups(report(db, group_by="label:queue")) == {("acme", "h0"): 3, ("acme", "h11"): 3, ("acme", "h23"): 3}


def test_rows_are_sorted_by_tenant_then_group_with_none_first(db: sqlite3.Connection) -> None:
    insert(db, Job(tenant="b", labels={"k": "z"}), Job(tenant="b"), Job(tenant="a", labels={"k": "y"}))
    rows = report(db, group_by="label:k")["rows"]
    assert [(row["tenant"], row["group"]) for row in rows] == [("a", "y"), ("b", None), ("b", "z")]


Expected = dict[tuple[str, str | None], tuple[int, float, float, float, dict[str, int]]]


def reference(jobs: list[Job], query: UsageQuery) -> Expected:
    """The report, computed the obvious way from the inserted jobs."""
    out: dict[tuple[str, str | None], list[Any]] = {}
    for job in jobs:
        if job.finished_at is None or (query.tenant is not None and job.tenant != query.tenant):
            continue
        if query.from_time and job.finished_at < query.from_time:
            continue
        if query.to_time and job.finished_at >= query.to_time:
            continue
        status = "cancelled" if job.state == "cancelled" else job.status
        group = {None: None, "day": job.finished_at[:10], "hour": job.finished_at[:13], "image": job.image,
                 "status": status}.get(query.group_by, job.labels.get(query.label or ""))
        entry = out.setdefault((job.tenant, group), [0, 0.0, 0.0, 0.0, {}])
        entry[0] += 1
        entry[1] += (job.cpu_ms or 0) / 1000
        entry[2] += (job.wall_ms or 0) / 1000
        entry[3] += (job.memory or 0) / GIB * (job.wall_ms or 0) / 1000
        entry[4][status] = entry[4].get(status, 0) + 1
    return {key: tuple(value) for key, value in out.items()}


def random_jobs(count: int) -> list[Job]:
    chooser = random.Random(20260301)
    times = [at(chooser.randint(1, 3), chooser.randint(0, 23), chooser.choice([0, 30])) for _ in range(count // 4)]
    jobs = []
    for _ in range(count):
        state = chooser.choice(["done"] * 8 + ["cancelled", "queued"])
        status = None
        if state == "done":
            status = chooser.choice(STATUSES)
        elif state == "cancelled" and chooser.random() < 0.5:
            status = "signaled"  # cancelled while running; else while queued, with no result
        jobs.append(Job(
            tenant=chooser.choice(["acme", "beta", "gamma"]),
            finished_at=chooser.choice(times) if state != "queued" else None,  # many share a time
            state=state,
            status=status,
            image=chooser.choice(["host", "gcc13", "jdk21"]),
            cpu_ms=chooser.randint(0, 10**6) / 8 if status else None,
            wall_ms=chooser.randint(0, 10**6) / 4 if status else None,
            memory=chooser.randint(0, 4 * GIB) if status else None,
            labels={"origin": chooser.choice(["web", "api"]),  # on every job
                    **({"problem": chooser.choice(["a", "b"])} if chooser.random() < 0.3 else {})},
        ))
    return jobs


# Windows: open; whole days; partial days at both edges around a whole one; inside one day.
WINDOWS = [
    (None, (None, None)),
    (None, ("2026-03-02", "2026-03-03")),
    ("beta", ("2026-03-01T12:30", "2026-03-03T06:00")),
    (None, ("2026-03-02T05:00", None)),
    (None, (None, "2026-03-02T00:00:00.000001Z")),
    ("gamma", ("2026-03-02T03:00", "2026-03-02T17:30")),
]


@pytest.mark.parametrize("group_by", [None, "day", "hour", "image", "status", "label:problem", "label:origin"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 4096])
def test_report_matches_a_job_by_job_sum_however_the_index_is_chunked(
        db: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch, group_by: str | None, chunk_rows: int) -> None:
    # Tiny chunks force many chunk boundaries, some inside runs of jobs that share a time.
    monkeypatch.setattr(usage, "_CHUNK_ROWS", chunk_rows)
    jobs = random_jobs(400)
    insert(db, *jobs)
    for tenant, window in WINDOWS:
        query = parse_usage_query(tenant, *window, group_by)
        rows = usage_report(db, query)["rows"]
        expected = reference(jobs, query)
        assert {(row["tenant"], row["group"]) for row in rows} == set(expected)
        for row in rows:
            count, cpu_s, wall_s, gib_s, statuses = expected[(row["tenant"], row["group"])]
            assert row["jobs"] == count
            assert row["cpu_seconds"] == pytest.approx(cpu_s, abs=2e-6)
            assert row["wall_seconds"] == pytest.approx(wall_s, abs=2e-6)
            assert row["memory_gb_seconds"] == pytest.approx(gib_s, abs=2e-6)
            assert row["by_status"] == statuses


def test_a_report_inside_the_callers_transaction_leaves_it_open(db: sqlite3.Connection) -> None:
    insert(db, Job())
    db.execute("BEGIN")
    assert report(db)["totals"]["jobs"] == 1
    assert db.in_transaction
    db.execute("COMMIT")


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, stored", [
    ("2026-03-01", "2026-03-01T00:00:00.000000Z"),
    ("2026-03-01T10:05", "2026-03-01T10:05:00.000000Z"),
    ("2026-03-01T10:05:06Z", "2026-03-01T10:05:06.000000Z"),
    ("2026-03-01T10:05:06.5", "2026-03-01T10:05:06.500000Z"),
    ("2026-03-01T10:05:06.123456+02:30", "2026-03-01T07:35:06.123456Z"),
    ("2026-03-01T23:00-01:00", "2026-03-02T00:00:00.000000Z"),
])
def test_time_bounds_accept_dates_and_iso_times_in_any_zone(text: str, stored: str) -> None:
    assert parse_time_bound(text, "from") == stored


@pytest.mark.parametrize("arguments, named", [
    ((None, "yesterday", None, None), "from"),
    ((None, None, "2026-13-01", None), "to"),
    ((None, "2026-02-30", None, None), "from"),
    ((None, None, "2026-03-01T10", None), "to"),
    ((None, "2026-03-01T10:00+25:00", None, None), "from"),
    ((None, "2026-03-01T10:00:00.1234567", None, None), "from"),
    ((None, "2026-03-02", "2026-03-01", None), "from"),
    ((None, "2026-03-01", "2026-03-01T00:00Z", None), "to"),
    ((None, None, None, "week"), "group_by"),
    ((None, None, None, "label:"), "group_by"),
    ((None, None, None, "label:has space"), "group_by"),
    ((None, None, None, "label:" + "x" * 65), "group_by"),
    (("", None, None, None), "tenant"),
])
def test_bad_query_input_raises_an_error_naming_the_parameter(arguments: tuple, named: str) -> None:
    with pytest.raises(UsageQueryError, match=rf"\b{named}\b"):
        parse_usage_query(*arguments)


def test_usage_query_error_is_a_value_error() -> None:
    assert issubclass(UsageQueryError, ValueError)
    with pytest.raises(ValueError):
        UsageQuery(group_by="label:a/b")


# --- output ------------------------------------------------------------------------------

def test_csv_has_one_column_per_status_and_parses_back_with_a_total_line(db: sqlite3.Connection) -> None:
    insert(db, Job(image="host", cpu_ms=1234.5), Job(image="gcc13", status="runtime_error"),
           Job(tenant="beta", image="host", state="cancelled", status=None, cpu_ms=None, wall_ms=None, memory=None))
    result = report(db, group_by="image")
    lines = list(csv.reader(io.StringIO(usage_csv(result))))
    assert lines[0] == ["tenant", "group", "jobs", "cpu_seconds", "wall_seconds", "memory_gb_seconds",
                        *STATUSES, "cancelled"]
    assert tuple(lines[0]) == CSV_COLUMNS
    records = list(csv.DictReader(io.StringIO(usage_csv(result))))
    assert [(record["tenant"], record["group"], record["jobs"]) for record in records] == [
        ("acme", "gcc13", "1"), ("acme", "host", "1"), ("beta", "host", "1"), ("TOTAL", "", "3")]
    host = records[1]
    assert float(host["cpu_seconds"]) == 1.2345
    assert (host["ok"], host["runtime_error"], host["cancelled"]) == ("1", "0", "0")
    total = records[-1]
    assert float(total["memory_gb_seconds"]) == result["totals"]["memory_gb_seconds"]
    assert {status: total[status] for status in ("ok", "runtime_error", "cancelled")} == {
        "ok": "1", "runtime_error": "1", "cancelled": "1"}


def test_table_aligns_every_row_and_ends_with_the_total(db: sqlite3.Connection) -> None:
    insert(db, Job(tenant="acme", status="ok"), Job(tenant="acme", status="runtime_error"), Job(tenant="b"))
    lines = usage_table(report(db)).splitlines()
    assert lines[0].split() == ["tenant", "group", "jobs", "cpu_s", "wall_s", "memory_GiB_s", "statuses"]
    assert lines[2].split() == ["acme", "2", "2.000", "4.000", "4.000", "ok=1", "runtime_error=1"]
    assert lines[3].split() == ["b", "1", "1.000", "2.000", "2.000", "ok=1"]
    assert lines[-1].split() == ["TOTAL", "3", "3.000", "6.000", "6.000", "ok=2", "runtime_error=1"]
    assert lines[2].index("2.000") + len("2.000") == lines[-1].index("3.000") + len("3.000")  # right-aligned


# --- the command -------------------------------------------------------------------------

def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sandboxd")
    commands = parser.add_subparsers(dest="command", required=True)
    add_usage_parser(commands, argparse.ArgumentParser)
    return run_usage_command(parser.parse_args(["usage", *argv]))


def test_cli_on_a_missing_database_exits_1_without_creating_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "never-served"
    assert run_cli("--state-dir", str(state), "--format", "json") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no database" in captured.err and str(state / DATABASE_FILE) in captured.err
    assert not state.exists()


def test_cli_prints_the_report_as_json(db: sqlite3.Connection, db_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    insert(db, Job(finished_at=at(1)), Job(finished_at=at(2)))
    assert run_cli("--state-dir", str(db_dir), "--format", "json", "--group-by", "day",
                   "--from", "2026-03-02") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report(db, from_text="2026-03-02", group_by="day")))
    assert [row["group"] for row in printed["rows"]] == ["2026-03-02"]


def test_cli_prints_csv_and_table(db: sqlite3.Connection, db_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    insert(db, Job())
    assert run_cli("--state-dir", str(db_dir), "--format", "csv") == 0
    assert capsys.readouterr().out == usage_csv(report(db))
    assert run_cli("--state-dir", str(db_dir)) == 0
    assert capsys.readouterr().out == usage_table(report(db))


def test_cli_bad_query_exits_2_naming_the_option(db_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--state-dir", str(db_dir), "--group-by", "week") == 2
    assert "group_by" in capsys.readouterr().err
    assert run_cli("--state-dir", str(db_dir), "--from", "soon") == 2
    assert "from" in capsys.readouterr().err


def test_cli_reads_through_a_read_only_connection(db: sqlite3.Connection, db_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[bool] = []
    real_connect = connect

    def recording_connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
        opened.append(readonly)
        return real_connect(path, readonly=readonly)

    monkeypatch.setattr("sandboxd.usage_cli.connect", recording_connect)
    assert run_cli("--state-dir", str(db_dir), "--format", "json") == 0
    assert opened == [True]


# --- speed -------------------------------------------------------------------------------

@pytest.mark.parametrize("group_by", [None, "day", "hour", "image", "status", "label:problem"])
def test_report_statements_each_read_one_index_range(db: sqlite3.Connection, group_by: str | None) -> None:
    insert(db, *random_jobs(50))
    details = report_plans(db, parse_usage_query(None, None, None, group_by))
    jobs_range = "SEARCH jobs USING COVERING INDEX jobs_usage (tenant=? AND finished_at>? AND finished_at<?)"
    daily_range = "SEARCH usage_daily USING PRIMARY KEY (name=? AND tenant=? AND day>? AND day<?)"
    label_range = ("SEARCH job_label_usage USING PRIMARY KEY"
                   " (name=? AND tenant=? AND finished_at>? AND finished_at<?)")
    assert jobs_range in details
    assert (daily_range in details) == (group_by != "hour")  # usage_daily has no hours
    assert (label_range in details) == (group_by == "label:problem")
    reads = [detail for detail in details if detail.split()[0] in ("SCAN", "SEARCH")]
    assert set(reads) <= {jobs_range, daily_range, label_range}
