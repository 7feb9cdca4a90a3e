"""Submission rows: written by the judge service through the db Writer, read by the API
through the Reader. Each function takes a connection; none commits (the Writer does).

A submission's row holds its lifecycle (queued, running, finished), its overall verdict and,
once finished, the judgement as JSON (`result`: message, compile, tests, as the API shows
them). Its jobs are ordinary jobs rows, labelled submission=<id>: accounted like any job.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

QUEUED, RUNNING, FINISHED = "queued", "running", "finished"
SUBMISSION_STATES = (QUEUED, RUNNING, FINISHED)
RESTARTED_MESSAGE = "the service restarted while judging"


@dataclass(frozen=True)
class SubmissionRecord:
    id: str
    tenant: str
    language: str
    state: str
    created_at: str
    labels: tuple[tuple[str, str], ...] = ()
    verdict: str | None = None
    finished_at: str | None = None
    message: str | None = None
    compile: dict[str, Any] | None = None  # as the API shows it; None: no compile step (or not yet)
    tests: tuple[dict[str, Any], ...] = ()  # likewise, one per test, once finished
    request: dict[str, Any] | None = None  # what the API that made it echoes back (Judge0's fields)

    def replace(self, **changes: Any) -> SubmissionRecord:
        return dataclasses.replace(self, **changes)

    @property
    def final(self) -> bool:
        return self.state == FINISHED


def _result_json(record: SubmissionRecord) -> str | None:
    if not record.final:
        return None
    return json.dumps({"message": record.message, "compile": record.compile, "tests": list(record.tests)})


def insert_submission(connection: sqlite3.Connection, record: SubmissionRecord) -> None:
    connection.execute(
        "INSERT INTO submissions (id, tenant, language, state, verdict, created_at, finished_at, labels, result,"
        " request) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.id, record.tenant, record.language, record.state, record.verdict, record.created_at,
         record.finished_at, json.dumps(dict(record.labels)), _result_json(record),
         None if record.request is None else json.dumps(record.request)))


def mark_submission_running(connection: sqlite3.Connection, submission_id: str) -> None:
    connection.execute("UPDATE submissions SET state = ? WHERE id = ? AND state = ?",
                       (RUNNING, submission_id, QUEUED))


def finish_submission(connection: sqlite3.Connection, record: SubmissionRecord) -> None:
    connection.execute("UPDATE submissions SET state = ?, verdict = ?, finished_at = ?, result = ? WHERE id = ?",
                       (FINISHED, record.verdict, record.finished_at, _result_json(record), record.id))


def _record(row: sqlite3.Row) -> SubmissionRecord:
    result = json.loads(row["result"]) if row["result"] else {}
    return SubmissionRecord(
        id=row["id"], tenant=row["tenant"], language=row["language"], state=row["state"],
        created_at=row["created_at"], labels=tuple(sorted(json.loads(row["labels"]).items())),
        verdict=row["verdict"], finished_at=row["finished_at"], message=result.get("message"),
        compile=result.get("compile"), tests=tuple(result.get("tests") or ()),
        request=json.loads(row["request"]) if row["request"] else None,
    )


def get_submission(connection: sqlite3.Connection, submission_id: str) -> SubmissionRecord | None:
    row = connection.execute("SELECT * FROM submissions WHERE id = ?", (submission_id,)).fetchone()
    return None if row is None else _record(row)


def recover_submissions(connection: sqlite3.Connection, now: str) -> list[str]:
    """After a restart: submissions a previous process was judging (queued or running) are
    finished as internal errors; their ids are returned (their jobs are the scheduler's)."""
    rows = connection.execute("SELECT id FROM submissions WHERE state IN (?, ?) ORDER BY seq",
                              (QUEUED, RUNNING)).fetchall()
    result = json.dumps({"message": RESTARTED_MESSAGE, "compile": None, "tests": []})
    connection.execute(
        "UPDATE submissions SET state = ?, verdict = 'internal_error', finished_at = ?, result = ?"
        " WHERE state IN (?, ?)", (FINISHED, now, result, QUEUED, RUNNING))
    return [row["id"] for row in rows]
