"""Job rows: written by the scheduler through the db Writer, read by the API through the
Reader. Each function takes a connection; none commits (the Writer does).

When a job ends (finish_job, or recover after a restart) its usage is also written to
job_label_usage (one row per label) and added to usage_daily, in the same transaction, for
usage reports (store/usage.py); db.rebuild_usage derives the same rows from jobs alone.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace

from sandboxd.job import Result
from sandboxd.jobs import CANCELLED, DONE, QUEUED, RUNNING, JobRecord, JobRequest, limits_from_public, limits_to_public

RESTARTED_MESSAGE = "the service restarted while the job was running; it was stopped"


@dataclass(frozen=True)
class JobFilter:
    tenant: str | None = None  # None: every tenant (admins)
    state: str | None = None
    label: tuple[str, str] | None = None
    before_seq: int | None = None  # the cursor: only jobs older than this
    limit: int = 50


@dataclass(frozen=True)
class _Usage:
    """What usage reports count of an ended job."""

    seq: int
    tenant: str
    image: str
    labels: tuple[tuple[str, str], ...]
    finished_at: str
    state: str
    status: str | None
    cpu_time_ms: float | None
    wall_time_ms: float | None
    memory_peak_bytes: int | None

    @classmethod
    def of_row(cls, row: sqlite3.Row) -> _Usage:
        return cls(row["seq"], row["tenant"], row["image"], tuple(sorted(json.loads(row["labels"]).items())),
                   row["finished_at"], row["state"], row["status"], row["cpu_time_ms"], row["wall_time_ms"],
                   row["memory_peak_bytes"])


_USAGE_COLUMNS = "seq, tenant, image, labels, finished_at, state, status, cpu_time_ms, wall_time_ms, memory_peak_bytes"
_LABEL_USAGE_INSERT = (
    "INSERT OR REPLACE INTO job_label_usage (name, tenant, finished_at, job_seq, value, state, status,"
    " cpu_time_ms, wall_time_ms, memory_peak_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_LABEL_USAGE_DELETE = "DELETE FROM job_label_usage WHERE name = ? AND tenant = ? AND finished_at = ? AND job_seq = ?"
_USAGE_DAILY_ADD = (
    "INSERT INTO usage_daily (name, tenant, day, value, report_status, jobs, cpu_time_ms, wall_time_ms,"
    " memory_byte_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET jobs = jobs + excluded.jobs,"
    " cpu_time_ms = cpu_time_ms + excluded.cpu_time_ms, wall_time_ms = wall_time_ms + excluded.wall_time_ms,"
    " memory_byte_ms = memory_byte_ms + excluded.memory_byte_ms"
)
_USAGE_DAILY_DROP_EMPTY = (
    "DELETE FROM usage_daily WHERE name = ? AND tenant = ? AND day = ? AND value = ? AND report_status = ?"
    " AND jobs = 0"
)


def report_status(state: str, status: str | None) -> str:
    """A job's status in usage_daily: cancelled, else its result's status ('' for none)."""
    return CANCELLED if state == CANCELLED else (status or "")


def _count_usage(connection: sqlite3.Connection, usage: _Usage, sign: int) -> None:
    """Add (sign 1) or take back (sign -1) an ended job's rows in job_label_usage and its
    sums in usage_daily: under the empty name with its image, and under each label."""
    cpu_ms, wall_ms = usage.cpu_time_ms or 0.0, usage.wall_time_ms or 0.0
    memory_byte_ms = (usage.memory_peak_bytes or 0) * wall_ms
    day, status = usage.finished_at[:10], report_status(usage.state, usage.status)
    keys = [(name, usage.tenant, day, value, status) for name, value in [("", usage.image), *usage.labels]]
    connection.executemany(_USAGE_DAILY_ADD, [(*key, sign, sign * cpu_ms, sign * wall_ms, sign * memory_byte_ms)
                                              for key in keys])
    if sign > 0:
        connection.executemany(_LABEL_USAGE_INSERT, [
            (name, usage.tenant, usage.finished_at, usage.seq, value, usage.state, usage.status,
             usage.cpu_time_ms, usage.wall_time_ms, usage.memory_peak_bytes) for name, value in usage.labels])
    else:
        connection.executemany(_LABEL_USAGE_DELETE, [(name, usage.tenant, usage.finished_at, usage.seq)
                                                     for name, _ in usage.labels])
        connection.executemany(_USAGE_DAILY_DROP_EMPTY, keys)


def insert_jobs(connection: sqlite3.Connection, jobs: list[tuple[JobRecord, JobRequest]]) -> None:
    for record, request in jobs:
        seq = connection.execute(
            "INSERT INTO jobs (id, tenant, state, created_at, started_at, image, cmd, limits, labels)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.tenant, record.state, record.created_at, record.started_at, record.image,
             json.dumps(list(record.argv)), json.dumps(limits_to_public(record.limits)),
             json.dumps(dict(record.labels))),
        ).lastrowid
        if record.labels:
            connection.executemany("INSERT INTO job_labels (job_seq, name, value) VALUES (?, ?, ?)",
                                   [(seq, name, value) for name, value in record.labels])
        if record.state == QUEUED:
            connection.execute("INSERT INTO job_inputs (job_seq, request) VALUES (?, ?)",
                               (seq, request.inputs_json()))


def mark_running(connection: sqlite3.Connection, job_id: str, started_at: str) -> None:
    connection.execute(
        "DELETE FROM job_inputs WHERE job_seq = (SELECT seq FROM jobs WHERE id = ?)", (job_id,))
    connection.execute("UPDATE jobs SET state = ?, started_at = ? WHERE id = ? AND state = ?",
                       (RUNNING, started_at, job_id, QUEUED))


def finish_job(connection: sqlite3.Connection, record: JobRecord) -> None:
    """Store the final state and every figure of the result (none for a job cancelled
    while queued), and count the job's usage. Finishing a job again replaces what it
    counted before."""
    result = record.result
    previous = connection.execute(f"SELECT {_USAGE_COLUMNS} FROM jobs WHERE id = ?", (record.id,)).fetchone()
    if previous is None:
        raise KeyError(f"no job {record.id!r} to finish")
    if previous["finished_at"] is not None:
        _count_usage(connection, _Usage.of_row(previous), -1)
    figures: tuple = (None,) * 15
    if result is not None:
        figures = (
            result.status, result.exit_code, result.signal, result.cpu_time_ms, result.cpu_user_ms,
            result.cpu_sys_ms, result.wall_time_ms, result.memory_peak_bytes, result.pids_peak,
            int(result.oom_killed), result.limit_hit, int(result.stdout_truncated),
            int(result.stderr_truncated), json.dumps(result.accounting_source), result.message,
        )
    seq = connection.execute(
        "UPDATE jobs SET state = ?, started_at = ?, finished_at = ?, status = ?, exit_code = ?, signal = ?,"
        " cpu_time_ms = ?, cpu_user_ms = ?, cpu_sys_ms = ?, wall_time_ms = ?, memory_peak_bytes = ?,"
        " pids_peak = ?, oom_killed = ?, limit_hit = ?, stdout_truncated = ?, stderr_truncated = ?,"
        " accounting_source = ?, message = ? WHERE id = ? RETURNING seq",
        (record.state, record.started_at, record.finished_at, *figures, record.id),
    ).fetchone()[0]
    connection.execute("DELETE FROM job_inputs WHERE job_seq = ?", (seq,))
    if result is not None:
        connection.execute("INSERT OR REPLACE INTO job_outputs (job_seq, stdout, stderr) VALUES (?, ?, ?)",
                           (seq, result.stdout, result.stderr))
    if record.finished_at is not None:
        figures = (None, None, None, None) if result is None else (
            result.status, result.cpu_time_ms, result.wall_time_ms, result.memory_peak_bytes)
        _count_usage(connection, _Usage(seq, record.tenant, record.image, record.labels, record.finished_at,
                                        record.state, *figures), 1)


def _record(row: sqlite3.Row, outputs: tuple[bytes, bytes] | None) -> JobRecord:
    result = None
    if row["status"] is not None:
        stdout, stderr = outputs or (b"", b"")
        result = Result(
            status=row["status"], exit_code=row["exit_code"], signal=row["signal"],
            cpu_time_ms=row["cpu_time_ms"], cpu_user_ms=row["cpu_user_ms"], cpu_sys_ms=row["cpu_sys_ms"],
            wall_time_ms=row["wall_time_ms"], memory_peak_bytes=row["memory_peak_bytes"],
            pids_peak=row["pids_peak"], oom_killed=bool(row["oom_killed"]), limit_hit=row["limit_hit"],
            stdout=bytes(stdout), stderr=bytes(stderr), stdout_truncated=bool(row["stdout_truncated"]),
            stderr_truncated=bool(row["stderr_truncated"]),
            accounting_source=json.loads(row["accounting_source"] or "{}"), message=row["message"],
        )
    return JobRecord(
        id=row["id"], tenant=row["tenant"], state=row["state"], created_at=row["created_at"],
        image=row["image"], argv=tuple(json.loads(row["cmd"])), limits=limits_from_public(json.loads(row["limits"])),
        labels=tuple(sorted(json.loads(row["labels"]).items())), started_at=row["started_at"],
        finished_at=row["finished_at"], result=result,
    )


def _outputs(connection: sqlite3.Connection, seqs: list[int]) -> dict[int, tuple[bytes, bytes]]:
    if not seqs:
        return {}
    marks = ",".join("?" * len(seqs))
    rows = connection.execute(f"SELECT job_seq, stdout, stderr FROM job_outputs WHERE job_seq IN ({marks})", seqs)
    return {row[0]: (row[1], row[2]) for row in rows}


def get_job(connection: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    return _record(row, _outputs(connection, [row["seq"]]).get(row["seq"]))


def list_jobs(connection: sqlite3.Connection, where: JobFilter) -> tuple[list[JobRecord], int | None]:
    """Newest first; also the cursor for the next page (None on the last)."""
    clauses, params = [], []
    if where.tenant is not None:
        clauses.append("jobs.tenant = ?")
        params.append(where.tenant)
    if where.state is not None:
        clauses.append("jobs.state = ?")
        params.append(where.state)
    if where.label is not None:
        clauses.append("jobs.seq IN (SELECT job_seq FROM job_labels WHERE name = ? AND value = ?)")
        params += list(where.label)
    if where.before_seq is not None:
        clauses.append("jobs.seq < ?")
        params.append(where.before_seq)
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(clauses) if clauses else "")
    rows = connection.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, where.limit + 1)).fetchall()
    more = len(rows) > where.limit
    rows = rows[: where.limit]
    outputs = _outputs(connection, [row["seq"] for row in rows])
    records = [_record(row, outputs.get(row["seq"])) for row in rows]
    return records, (rows[-1]["seq"] if more else None)


def recover(connection: sqlite3.Connection, now: str) -> tuple[list[str], list[tuple[JobRecord, JobRequest]]]:
    """After a restart: jobs that were running are finished as internal errors (their
    containers died with the old service); queued jobs are returned, oldest first, to run."""
    running = connection.execute(f"SELECT id, {_USAGE_COLUMNS} FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
    interrupted = [row["id"] for row in running]
    connection.execute(
        "UPDATE jobs SET state = ?, finished_at = ?, status = 'internal_error', message = ?,"
        " cpu_time_ms = 0, cpu_user_ms = 0, cpu_sys_ms = 0, wall_time_ms = 0, memory_peak_bytes = 0,"
        " pids_peak = 0, oom_killed = 0, stdout_truncated = 0, stderr_truncated = 0, accounting_source = '{}'"
        " WHERE state = ?",
        (DONE, now, RESTARTED_MESSAGE, RUNNING),
    )
    for row in running:
        # Labels from the jobs row: the same as in job_labels, which is not indexed by job.
        _count_usage(connection, replace(_Usage.of_row(row), finished_at=now, state=DONE, status="internal_error",
                                         cpu_time_ms=0.0, wall_time_ms=0.0, memory_peak_bytes=0), 1)
    queued = []
    rows = connection.execute(
        "SELECT jobs.*, job_inputs.request FROM jobs JOIN job_inputs ON job_inputs.job_seq = jobs.seq"
        " WHERE jobs.state = ? ORDER BY jobs.seq", (QUEUED,))
    for row in rows:
        request = JobRequest.from_stored(cmd=row["cmd"], image=row["image"], limits=row["limits"],
                                         labels=row["labels"], inputs=row["request"])
        queued.append((_record(row, None), request))
    return interrupted, queued


def cpu_seconds_since(connection: sqlite3.Connection, since: str) -> dict[str, float]:
    rows = connection.execute(
        "SELECT tenant, SUM(cpu_time_ms) FROM jobs WHERE finished_at >= ? GROUP BY tenant", (since,))
    return {tenant: (total or 0.0) / 1000 for tenant, total in rows}

