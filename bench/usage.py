"""Usage reports over a large jobs table, against the one-second target.

    .venv/bin/python bench/usage.py [--rows N] [--label-every K] [--submissions V] [--state-dir DIR]

Fills a fresh database (in a temporary state directory unless --state-dir) with N jobs
(default 1,000,000): 10 tenants, 5 images, every status, about 2% cancelled and 0.1% still
running, finishing over 30 days, one job in K (default 10) with a `problem` label (7
values) and every job with a `submission` label (V values, default 10). The usage tables
are derived from them with db.rebuild_usage, as the job writes would have left them. Then
it runs ANALYZE, as a long-lived database would have had, and times each report through a
read-only connection, as `sandboxd usage` opens it: median of 5, and its ratio to 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sandboxd.store.db import connect, open_database, rebuild_usage
from sandboxd.store.usage import UsageQuery, parse_usage_query, report_plans, usage_report

TARGET_S = 1.0
RUNS = 5
START_EPOCH = 1767225600  # 2026-01-01T00:00:00Z
DAYS = 30

# One statement, no Python per row: a recursive CTE numbers the jobs and multiplicative
# hashes of the number pick tenant, image and outcome, so the figures are the same every run
# and independent of one another.
_GENERATE_SQL = f"""
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :rows - 1),
shaped AS (
    SELECT i,
           {START_EPOCH} + i * ({DAYS} * 86400.0 / :rows) AS finished,
           (((i * 2654435761) % 4294967296) >> 20) % 10 AS tenant_no,
           (((i * 3266489917) % 4294967296) >> 16) % 5 AS image_no,
           (((i * 2246822519) % 4294967296) >> 16) % 1000 AS dice
    FROM n
),
outcome AS (
    SELECT *,
           CASE WHEN dice < 20 THEN 'cancelled' WHEN dice < 21 THEN 'running' ELSE 'done' END AS state,
           CASE WHEN dice < 21 THEN NULL WHEN dice < 800 THEN 'ok' WHEN dice < 920 THEN 'runtime_error'
                WHEN dice < 950 THEN 'time_limit_exceeded' WHEN dice < 970 THEN 'memory_limit_exceeded'
                WHEN dice < 980 THEN 'signaled' WHEN dice < 990 THEN 'output_limit_exceeded'
                ELSE 'internal_error' END AS status,
           strftime('%Y-%m-%dT%H:%M:%S', finished - 5, 'unixepoch') || '.000000Z' AS created
    FROM shaped
)
INSERT INTO jobs (id, tenant, state, created_at, started_at, finished_at, image, cmd, limits, labels,
                  status, exit_code, cpu_time_ms, wall_time_ms, memory_peak_bytes)
SELECT printf('bench-%012d', i), 'tenant-' || tenant_no, state, created, created,
       CASE WHEN state = 'running' THEN NULL
            ELSE strftime('%Y-%m-%dT%H:%M:%S', finished, 'unixepoch')
                 || printf('.%06dZ', CAST(finished * 1000000 AS INTEGER) % 1000000) END,
       CASE image_no WHEN 0 THEN 'host' WHEN 1 THEN 'python3.12' WHEN 2 THEN 'gcc13'
                     WHEN 3 THEN 'node20' ELSE 'jdk21' END,
       '["./solution"]', '{{}}', '{{}}', status,
       CASE WHEN status IS NULL THEN NULL WHEN status = 'ok' THEN 0 ELSE 1 END,
       CASE WHEN status IS NULL THEN NULL ELSE (i % 5000) + 0.5 END,
       CASE WHEN status IS NULL THEN NULL ELSE (i % 9000) + 1.25 END,
       CASE WHEN status IS NULL THEN NULL ELSE 1048576 * (1 + i % 512) END
FROM outcome
"""
_LABEL_SQL = """
INSERT INTO job_labels (job_seq, name, value)
SELECT seq, 'problem', 'p' || (seq % 7) FROM jobs WHERE seq % :every = 0
UNION ALL
SELECT seq, 'submission', 's' || (seq % :submissions) FROM jobs
"""
_LABEL_JSON_SQL = """
UPDATE jobs SET labels = CASE WHEN seq % :every = 0
    THEN json_object('problem', 'p' || (seq % 7), 'submission', 's' || (seq % :submissions))
    ELSE json_object('submission', 's' || (seq % :submissions)) END
"""

REPORTS: list[tuple[str, UsageQuery]] = [
    ("all tenants", parse_usage_query(None, None, None, None)),
    ("one tenant", parse_usage_query("tenant-3", None, None, None)),
    ("group by day", parse_usage_query(None, None, None, "day")),
    ("group by hour", parse_usage_query(None, None, None, "hour")),
    ("group by image", parse_usage_query(None, None, None, "image")),
    ("group by status", parse_usage_query(None, None, None, "status")),
    ("group by label:problem", parse_usage_query(None, None, None, "label:problem")),
    ("group by label:submission", parse_usage_query(None, None, None, "label:submission")),
    ("label:submission, 10.5 d", parse_usage_query(None, "2026-01-10T06:00", "2026-01-20T18:00", "label:submission")),
    ("image, 10.5 days", parse_usage_query(None, "2026-01-10T06:00", "2026-01-20T18:00", "image")),
    ("one-day window", parse_usage_query(None, "2026-01-15", "2026-01-16", None)),
]


def generate(path: Path, rows: int, label_every: int, submissions: int) -> None:
    connection = connect(path)
    try:
        connection.execute("BEGIN")
        connection.execute(_GENERATE_SQL, {"rows": rows})
        connection.execute(_LABEL_SQL, {"every": label_every, "submissions": submissions})
        connection.execute(_LABEL_JSON_SQL, {"every": label_every, "submissions": submissions})
        rebuild_usage(connection)
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
    finally:
        connection.close()


def time_report(path: Path, query: UsageQuery) -> tuple[float, int]:
    connection = connect(path, readonly=True)
    try:
        samples, report = [], None
        for _ in range(RUNS):
            started = time.perf_counter()
            report = usage_report(connection, query)
            samples.append(time.perf_counter() - started)
        assert report is not None
        return statistics.median(samples), len(report["rows"])
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--label-every", type=int, default=10, help="one job in K has the label (default 10)")
    parser.add_argument("--submissions", type=int, default=10,
                        help="values of the label every job has (default 10)")
    parser.add_argument("--state-dir", type=Path, help="keep the database here (default: a temporary directory)")
    args = parser.parse_args()
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="sandboxd-bench-usage-"))
    try:
        path = open_database(state_dir)
        started = time.perf_counter()
        generate(path, args.rows, args.label_every, args.submissions)
        connection = connect(path, readonly=True)
        count, labels, label_usage, daily = (
            connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("jobs", "job_labels", "job_label_usage", "usage_daily"))
        plans = sorted(set(report_plans(connection, parse_usage_query(None, None, None, "label:problem"))))
        connection.close()
        print(f"generated {count:,} jobs ({labels:,} labels; {label_usage:,} job_label_usage and {daily:,}"
              f" usage_daily rows) in {time.perf_counter() - started:.1f} s (with ANALYZE)")
        print("query plans:", *plans, sep="\n  ")
        print(f"{'report':<27} {'median s':>9} {'of 1 s':>7} {'rows':>6}")
        for name, query in REPORTS:
            seconds, row_count = time_report(path, query)
            print(f"{name:<27} {seconds:9.3f} {seconds / TARGET_S:6.0%} {row_count:6d}")
    finally:
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
