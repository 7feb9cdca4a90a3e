"""The service's SQLite database: schema, connections, and the one thread that writes.

One file in the state directory, in WAL mode: readers never wait for the writer. Every write
goes through `Writer`, a single thread that runs queued operations and commits them together
(group commit), so the event loop never blocks on SQLite and a burst of submissions costs one
commit, not one per job. With synchronous=NORMAL a commit survives the process being killed
(SIGKILL); only a power loss may take the last commits back.

Times are ISO 8601 UTC text with microseconds (`2026-11-29T05:02:01.123456Z`): they sort as
text, and a day or an hour is a prefix.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import sqlite_utils

from sandboxd.jobs import CANCELLED

DATABASE_FILE = "sandboxd.db"
SCHEMA_VERSION = 1
T = TypeVar("T")

# The jobs table holds one row per job: its lifecycle and, once it ended, every figure of its
# result. Bulky parts live beside it (job_inputs until the job starts, job_outputs after) so
# that a usage report reading millions of jobs reads only the covering index `jobs_usage`.
#
# Usage reports (store/usage.py) also read two tables that store/jobs.py writes when a job
# ends, in the same transaction, and nothing else changes (rebuild_usage derives them anew):
# - usage_daily: sums per UTC day (`YYYY-MM-DD` of finished_at), label name and value, and
#   report status (`cancelled` for a cancelled job, else its result's status, '' if none).
#   The empty name sums every ended job, with its image as the value. A report reads the
#   whole days of its window here, a few rows a day, and the partial days at its edges job
#   by job.
# - job_label_usage: per label of an ended job, what a report sums, keyed in the order of a
#   report's range (label, tenant, finished_at): a label's jobs at a window's edges, read
#   with no lookup per job. job_labels stays the index for listing jobs by label.
# The submissions table (store/submissions.py) holds one row per judged submission: its
# lifecycle, its overall verdict, and once finished the whole judgement as JSON (`result`:
# message, compile, tests) and, for a submission made through Judge0's API, the request's
# fields that API shows back (`request`). Its jobs are ordinary jobs rows, labelled
# submission=<id>.
SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0,
    max_concurrent INTEGER,
    max_queued INTEGER,
    cpu_seconds_per_day REAL,
    max_memory_bytes INTEGER,
    max_cpu_time_s REAL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    image TEXT NOT NULL,
    cmd TEXT NOT NULL,
    limits TEXT NOT NULL,
    labels TEXT NOT NULL,
    status TEXT,
    exit_code INTEGER,
    signal INTEGER,
    cpu_time_ms REAL,
    cpu_user_ms REAL,
    cpu_sys_ms REAL,
    wall_time_ms REAL,
    memory_peak_bytes INTEGER,
    pids_peak INTEGER,
    oom_killed INTEGER,
    limit_hit TEXT,
    stdout_truncated INTEGER,
    stderr_truncated INTEGER,
    accounting_source TEXT,
    message TEXT
);
CREATE INDEX IF NOT EXISTS jobs_tenant_seq ON jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_usage ON jobs (
    tenant, finished_at, state, status, image, cpu_time_ms, wall_time_ms, memory_peak_bytes
);
CREATE INDEX IF NOT EXISTS jobs_usage_all ON jobs (
    finished_at, tenant, state, status, image, cpu_time_ms, wall_time_ms, memory_peak_bytes
);
CREATE TABLE IF NOT EXISTS job_labels (
    job_seq INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (name, job_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_labels_value ON job_labels (name, value, job_seq);
CREATE TABLE IF NOT EXISTS job_label_usage (
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    job_seq INTEGER NOT NULL,
    value TEXT NOT NULL,
    state TEXT NOT NULL,
    status TEXT,
    cpu_time_ms REAL,
    wall_time_ms REAL,
    memory_peak_bytes INTEGER,
    PRIMARY KEY (name, tenant, finished_at, job_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_daily (
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    day TEXT NOT NULL,
    value TEXT NOT NULL,
    report_status TEXT NOT NULL,
    jobs INTEGER NOT NULL,
    cpu_time_ms REAL NOT NULL,
    wall_time_ms REAL NOT NULL,
    memory_byte_ms REAL NOT NULL,
    PRIMARY KEY (name, tenant, day, value, report_status)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_inputs (
    job_seq INTEGER PRIMARY KEY REFERENCES jobs (seq) ON DELETE CASCADE,
    request TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_outputs (
    job_seq INTEGER PRIMARY KEY REFERENCES jobs (seq) ON DELETE CASCADE,
    stdout BLOB NOT NULL,
    stderr BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS submissions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    language TEXT NOT NULL,
    state TEXT NOT NULL,
    verdict TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    labels TEXT NOT NULL,
    result TEXT,
    request TEXT
);
CREATE INDEX IF NOT EXISTS submissions_tenant ON submissions (tenant, seq);
CREATE INDEX IF NOT EXISTS submissions_state ON submissions (state, seq);
"""

# usage_daily's report status, from a job's state and status (as in store/jobs.py).
REPORT_STATUS_SQL = f"CASE WHEN state = '{CANCELLED}' THEN '{CANCELLED}' ELSE COALESCE(status, '') END"
_USAGE_DAILY_INSERT = (
    "INSERT INTO usage_daily (name, tenant, day, value, report_status, jobs, cpu_time_ms, wall_time_ms,"
    " memory_byte_ms) SELECT {name}, tenant, substr(finished_at, 1, 10), {value}, " + REPORT_STATUS_SQL + ","
    " COUNT(*), TOTAL(cpu_time_ms), TOTAL(wall_time_ms), TOTAL(memory_peak_bytes * wall_time_ms)"
    " FROM {source} GROUP BY 1, 2, 3, 4, 5"
)
_REBUILD_USAGE_SQL = [
    "DELETE FROM job_label_usage",
    "DELETE FROM usage_daily",
    "INSERT INTO job_label_usage (name, tenant, finished_at, job_seq, value, state, status, cpu_time_ms,"
    " wall_time_ms, memory_peak_bytes)"
    " SELECT job_labels.name, jobs.tenant, jobs.finished_at, jobs.seq, job_labels.value, jobs.state, jobs.status,"
    " jobs.cpu_time_ms, jobs.wall_time_ms, jobs.memory_peak_bytes"
    " FROM job_labels JOIN jobs ON jobs.seq = job_labels.job_seq WHERE jobs.finished_at IS NOT NULL",
    _USAGE_DAILY_INSERT.format(name="''", value="image", source="jobs WHERE finished_at IS NOT NULL"),
    _USAGE_DAILY_INSERT.format(name="name", value="value", source="job_label_usage"),
]
# Every ended job has a usage_daily row: none while a job ended means they were never filled.
_USAGE_MISSING_SQL = (
    "SELECT NOT EXISTS (SELECT 1 FROM usage_daily) AND EXISTS (SELECT 1 FROM jobs WHERE finished_at IS NOT NULL)"
)


class StoreError(RuntimeError):
    """The database cannot be opened or is not ours."""


def utc_now() -> str:
    return format_time(datetime.now(timezone.utc))


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the settings every part of sandboxd relies on."""
    if readonly:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                     isolation_level=None)
    else:
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.row_factory = sqlite3.Row
    return connection


def open_database(state_dir: Path) -> Path:
    """Create or upgrade the database in state_dir; returns its path."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / DATABASE_FILE
    connection = connect(path)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {version} is newer than this sandboxd ({SCHEMA_VERSION})")
        database = sqlite_utils.Database(connection)
        database.executescript(SCHEMA)
        if "request" not in database["submissions"].columns_dict:  # a table from before the column
            connection.execute("ALTER TABLE submissions ADD COLUMN request TEXT")
        if connection.execute(_USAGE_MISSING_SQL).fetchone()[0]:
            # A database from before the usage tables: derive them from its jobs, once.
            connection.execute("BEGIN IMMEDIATE")
            rebuild_usage(connection)
            connection.execute("COMMIT")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path}: {error}") from None
    finally:
        connection.close()
    return path


def rebuild_usage(connection: sqlite3.Connection) -> None:
    """Recompute job_label_usage and usage_daily from jobs and job_labels, as the job writes
    in store/jobs.py would have left them. For a database that predates them, and for
    rows bulk-loaded with SQL (bench/usage.py). The caller commits."""
    for sql in _REBUILD_USAGE_SQL:
        connection.execute(sql)


class Writer:
    """The single writing thread. `submit(fn)` queues fn(connection) and returns a future;
    operations queued together are committed in one transaction."""

    _MAX_BATCH = 256

    def __init__(self, path: Path) -> None:
        self._connection = connect(path)
        self._queue: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="sandboxd-db-writer", daemon=True)
        self._thread.start()

    def submit(self, operation: Callable[[sqlite3.Connection], T]) -> Future:
        future: Future = Future()
        self._queue.put((operation, future))
        return future

    async def run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.submit(operation))

    def close(self) -> None:
        """Finish what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()
        self._connection.close()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self._MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._commit(batch)
                    return
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Future]]) -> None:
        connection = self._connection
        results: list[tuple[Future, Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            for _, future in batch:
                future.set_exception(StoreError(f"database: {error}"))
            return
        for operation, future in batch:
            connection.execute("SAVEPOINT op")
            try:
                value = operation(connection)
            except BaseException as error:  # noqa: BLE001 - one bad operation fails only itself
                connection.execute("ROLLBACK TO op")
                connection.execute("RELEASE op")
                results.append((future, None, error))
            else:
                connection.execute("RELEASE op")
                results.append((future, value, None))
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            connection.execute("ROLLBACK")
            for future, _, _ in results:
                future.set_exception(StoreError(f"database commit failed: {error}"))
            return
        for future, value, error in results:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


class Reader:
    """Reads on a small thread pool, each thread with its own connection (WAL: they never
    wait for the writer)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = connect(self._path)
            connection.execute("PRAGMA query_only = ON")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run query in the calling thread (CLI, tests, or inside `aread`)."""
        return query(self._connection())

    async def aread(self, query: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.read, query)

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
