"""Per-tenant usage reports over the jobs table: what each tenant's ended jobs used.

A job counts once it ended (`finished_at` is set: state `done` or `cancelled`), and in the
half-open window [from, to) on `finished_at`. Its reporting status is `cancelled` when it was
cancelled (even if it had started and has a result), else its result's `status`.

Figures, summed per row; NULL figures (a job cancelled while queued) count as 0:
- `cpu_seconds`: CPU time, `sum(cpu_time_ms) / 1000`.
- `wall_seconds`: wall-clock time, `sum(wall_time_ms) / 1000`.
- `memory_gb_seconds`: memory held over time in GiB-seconds (2**30 bytes for one second),
  `sum(memory_peak_bytes / 2**30 * wall_time_ms / 1000)`: the peak is charged for the
  job's whole wall time, as a billing figure would.
Floats are rounded to 6 decimals. Days and hours are UTC (`YYYY-MM-DD`, `YYYY-MM-DDTHH`).

Speed: a report reads the whole UTC days of its window from `usage_daily` (sums per tenant,
day, image or label value, and status; a few rows a day, added as each job ends, see
store/db.py) and only the partial days at the window's edges job by job. Hours, which
usage_daily does not keep, are read job by job over the whole window.

Job by job, every statement reads one index range, `tenant = ? AND finished_at >= ? AND
finished_at < ?`, of the covering index `jobs_usage (tenant, finished_at, ...)` (or, for a
label, of job_label_usage's key `(name, tenant, finished_at, ...)`), so it never touches the
table's rows. SQLite can only aggregate an index in its own order; anything else it sorts,
and sorting a million rows costs more than scanning them. So the report walks the index
itself: tenant by tenant (a seek each), day or hour groups as index ranges (one statement per
group), and image or status groups chunk by chunk of a few thousand rows, which SQLite sorts
in cache, folding the chunks' sums here.

Grouped by a label, the jobs without it (the group None) are every job's sums less the
labelled jobs' sums: nothing is looked up job by job, however many jobs carry the label. At
the edges (less than a day on each side) a label's rows are grouped by one statement.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Iterator, Sequence

from sandboxd.job import STATUSES
from sandboxd.jobs import CANCELLED
from sandboxd.store.db import REPORT_STATUS_SQL, format_time

REPORT_STATUSES = (*STATUSES, CANCELLED)
TIME_GROUPS = {"day": len("YYYY-MM-DD"), "hour": len("YYYY-MM-DDTHH")}
PLAIN_GROUPS = (*TIME_GROUPS, "image", "status")
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?(Z|[+-]\d{2}:\d{2})?)?$"
)
TIME_SHAPE = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS[.ffffff]] with Z, +HH:MM or no zone (UTC)"

# Stored times are ASCII text: "" sorts before every one of them and DEL after, so an open
# bound becomes a closed one and every statement keeps the same index range.
_BEFORE_ALL = ""
_AFTER_ALL = "\x7f"
_MIDNIGHT = "T00:00:00.000000Z"
_DAY = len("YYYY-MM-DD")
_EVERY_JOB = ""  # the usage_daily name that sums every job (its value: the image)
# Rows per chunk for groups the index is not ordered by: small enough that SQLite sorts the
# chunk in its page cache, large enough that statements stay few (measured: 1k-4k is best).
_CHUNK_ROWS = 4096
_BYTE_MS_PER_GIB_SECOND = 2**30 * 1000

_RANGE = "tenant = :tenant AND finished_at >= :lo AND finished_at < :hi"
_FIGURES = "COUNT(*), TOTAL(cpu_time_ms), TOTAL(wall_time_ms), TOTAL(memory_peak_bytes * wall_time_ms)"
# FILTER, not SUM(CASE ...): it skips the aggregate step for rows that do not match
# (measured a third cheaper than SUM(CASE) and than grouping by status and folding here).
_STATUS_COUNTS = ", ".join(
    [f"COUNT(*) FILTER (WHERE status = '{status}' AND state <> '{CANCELLED}')" for status in STATUSES]
    + [f"COUNT(*) FILTER (WHERE state = '{CANCELLED}')"]
)
_REPORT_STATUS = f"CASE WHEN state = '{CANCELLED}' THEN '{CANCELLED}' ELSE status END"

_NEXT_TENANT_SQL = "SELECT MIN(tenant) FROM jobs WHERE tenant > :after"
_TOTALS_SQL = f"SELECT {_FIGURES}, {_STATUS_COUNTS} FROM jobs WHERE {_RANGE}"
_FIRST_TIME_SQL = f"SELECT MIN(finished_at) FROM jobs WHERE {_RANGE}"
# One statement per day or hour: its sums, and where the next non-empty group starts.
_TIME_GROUP_SQL = (
    f"SELECT {_FIGURES}, {_STATUS_COUNTS},"
    " (SELECT MIN(finished_at) FROM jobs WHERE tenant = :tenant AND finished_at >= :group_end"
    "  AND finished_at < :hi)"
    " FROM jobs WHERE tenant = :tenant AND finished_at >= :lo AND finished_at < :group_end"
)
_CHUNK_END_SQL = f"SELECT finished_at FROM jobs WHERE {_RANGE} ORDER BY finished_at LIMIT 1 OFFSET :rows"
_NEXT_TIME_SQL = "SELECT MIN(finished_at) FROM jobs WHERE tenant = :tenant AND finished_at > :lo AND finished_at < :hi"
_IMAGE_CHUNK_SQL = f"SELECT image, {_FIGURES}, {_STATUS_COUNTS} FROM jobs WHERE {_RANGE} GROUP BY image"
_STATUS_CHUNK_SQL = (
    f"SELECT {_REPORT_STATUS} AS report_status, {_FIGURES} FROM jobs WHERE {_RANGE} GROUP BY report_status"
)
# usage_daily (see store/db.py): the whole days of a window, one row per group and status.
_DAILY_RANGE = "name = :name AND tenant = :tenant AND day >= :day_lo AND day < :day_hi"
_DAILY_FIGURES = "SUM(jobs), TOTAL(cpu_time_ms), TOTAL(wall_time_ms), TOTAL(memory_byte_ms)"
_DAILY_SQL = {
    group_by: f"SELECT {column}, report_status, {_DAILY_FIGURES} FROM usage_daily WHERE {_DAILY_RANGE}"
              f" GROUP BY {column}, report_status"
    for group_by, column in [(None, "NULL"), ("status", "NULL"), ("day", "day"), ("image", "value"),
                             ("label", "value")]
}
# job_label_usage: a label's jobs in the partial days at a window's edges, one by one.
_LABEL_RANGE_SQL = (
    f"SELECT value, {REPORT_STATUS_SQL} AS report_status, {_FIGURES} FROM job_label_usage"
    " WHERE name = :name AND tenant = :tenant AND finished_at >= :lo AND finished_at < :hi"
    " GROUP BY value, report_status"
)


class UsageQueryError(ValueError):
    """A usage query's from, to, tenant or group_by is invalid; the message names which."""


def parse_time_bound(text: str, name: str) -> str:
    """`text` as a stored time (UTC, microseconds); `name` is the parameter, for errors."""
    match = _TIME_RE.match(text.strip())
    if match is None:
        raise UsageQueryError(f"{name}: expected {TIME_SHAPE}, got {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
            int((fraction or "0").ljust(6, "0")), tzinfo=_zone(zone),
        )
        return format_time(moment)
    except (ValueError, OverflowError) as error:
        raise UsageQueryError(f"{name}: {text!r} is not a valid time ({error})") from None


def _zone(text: str | None) -> timezone:
    if text is None or text == "Z":
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if minutes >= 60:
        raise ValueError(f"offset minutes {minutes} out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


@dataclass(frozen=True)
class UsageQuery:
    """What to report. from_time/to_time are stored-time texts (see parse_time_bound);
    build one from user input with parse_usage_query."""

    tenant: str | None = None  # None: every tenant
    from_time: str | None = None
    to_time: str | None = None  # the window is [from_time, to_time) on finished_at
    group_by: str | None = None  # day, hour, image, status or label:NAME

    def __post_init__(self) -> None:
        if self.tenant is not None and not self.tenant:
            raise UsageQueryError("tenant: must not be empty")
        if self.group_by is not None and self.group_by not in PLAIN_GROUPS:
            name = self.group_by.removeprefix("label:")
            if not self.group_by.startswith("label:") or not LABEL_NAME_RE.match(name):
                raise UsageQueryError(
                    f"group_by: expected one of {', '.join(PLAIN_GROUPS)} or label:NAME (NAME "
                    f"matching {LABEL_NAME_RE.pattern}), got {self.group_by!r}")
        if self.from_time is not None and self.to_time is not None and self.from_time >= self.to_time:
            raise UsageQueryError(f"from ({self.from_time}) must be earlier than to ({self.to_time})")

    @property
    def label(self) -> str | None:
        """The label name when grouping by a label."""
        if self.group_by is not None and self.group_by.startswith("label:"):
            return self.group_by.removeprefix("label:")
        return None

    @classmethod
    def parse(cls, tenant: str | None, from_text: str | None, to_text: str | None,
              group_by_text: str | None) -> UsageQuery:
        return parse_usage_query(tenant, from_text, to_text, group_by_text)


def parse_usage_query(tenant: str | None, from_text: str | None, to_text: str | None,
                      group_by_text: str | None) -> UsageQuery:
    """A query from user input (CLI, API); None or "" leaves from, to or group_by out."""
    return UsageQuery(
        tenant=tenant,
        from_time=parse_time_bound(from_text, "from") if from_text else None,
        to_time=parse_time_bound(to_text, "to") if to_text else None,
        group_by=group_by_text or None,
    )


@dataclass
class _Figures:
    """Unrounded sums for one row of the report."""

    jobs: int = 0
    cpu_ms: float = 0.0
    wall_ms: float = 0.0
    memory_byte_ms: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_sql(cls, values: Sequence[Any], with_status_counts: bool = True) -> _Figures:
        """From `_FIGURES` (and `_STATUS_COUNTS`) columns, in that order."""
        jobs, cpu_ms, wall_ms, memory_byte_ms = values[:4]
        by_status = dict(zip(REPORT_STATUSES, values[4:4 + len(REPORT_STATUSES)])) if with_status_counts else {}
        return cls(jobs, cpu_ms, wall_ms, memory_byte_ms, by_status)

    def add(self, other: _Figures, sign: int = 1) -> None:
        self.jobs += sign * other.jobs
        self.cpu_ms += sign * other.cpu_ms
        self.wall_ms += sign * other.wall_ms
        self.memory_byte_ms += sign * other.memory_byte_ms
        for status, count in other.by_status.items():
            self.by_status[status] = self.by_status.get(status, 0) + sign * count

    def to_json(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "cpu_seconds": _round(self.cpu_ms / 1000),
            "wall_seconds": _round(self.wall_ms / 1000),
            "memory_gb_seconds": _round(self.memory_byte_ms / _BYTE_MS_PER_GIB_SECOND),
            "by_status": {status: self.by_status[status] for status in _status_order(self.by_status)
                          if self.by_status[status]},
        }


def _round(value: float) -> float:
    # + 0.0: a difference of equal sums may round to -0.0
    return round(value, 6) + 0.0


def _status_order(by_status: dict[str, int]) -> list[str]:
    known = [status for status in REPORT_STATUSES if status in by_status]
    return known + sorted(status for status in by_status if status not in REPORT_STATUSES)


Groups = dict[tuple[str, str | None], _Figures]


def usage_report(connection: sqlite3.Connection, query: UsageQuery) -> dict[str, Any]:
    """The report as a JSON-ready dict: from, to, group_by, rows (sorted by tenant, then
    group; None first), totals."""
    # Many statements, one snapshot: a job finishing meanwhile must not land in one
    # statement's sums and miss another's.
    own_transaction = not connection.in_transaction
    if own_transaction:
        connection.execute("BEGIN")
    try:
        groups = _groups(connection, query)
    finally:
        if own_transaction and connection.in_transaction:
            connection.execute("ROLLBACK")  # it only read
    rows, totals = [], _Figures()
    for (tenant, group), figures in sorted(groups.items(), key=_row_order):
        if figures.jobs:
            rows.append({"tenant": tenant, "group": group, **figures.to_json()})
            totals.add(figures)
    return {"from": query.from_time, "to": query.to_time, "group_by": query.group_by,
            "rows": rows, "totals": totals.to_json()}


def _row_order(item: tuple[tuple[str, str | None], _Figures]) -> tuple[str, bool, str]:
    (tenant, group), _ = item
    return tenant, group is not None, group or ""


def _groups(connection: sqlite3.Connection, query: UsageQuery) -> Groups:
    tenants = [query.tenant] if query.tenant is not None else list(_tenants(connection))
    lo, hi = query.from_time or _BEFORE_ALL, query.to_time or _AFTER_ALL
    groups: Groups = {}
    for tenant in tenants:
        for group, figures in _tenant_groups(connection, tenant, lo, hi, query).items():
            groups[(tenant, group)] = figures
    return groups


def _tenants(connection: sqlite3.Connection) -> Iterator[str]:
    """Every tenant with a job, one index seek each (no scan, no sort)."""
    tenant = connection.execute(_NEXT_TENANT_SQL, {"after": _BEFORE_ALL}).fetchone()[0]
    while tenant is not None:
        yield tenant
        tenant = connection.execute(_NEXT_TENANT_SQL, {"after": tenant}).fetchone()[0]


def _tenant_groups(connection: sqlite3.Connection, tenant: str, lo: str, hi: str,
                   query: UsageQuery) -> dict[str | None, _Figures]:
    """One tenant's groups: whole days from usage_daily, the partial days at the edges (or
    every hour, which usage_daily does not keep) from the jobs, job by job."""
    if query.group_by == "hour":
        return dict(_job_groups(connection, tenant, lo, hi, query.group_by))
    days, edges = _split_days(lo, hi)
    if query.label is not None:
        return _label_groups(connection, tenant, days, edges, query.label)
    groups: dict[str | None, _Figures] = {}
    if days is not None:
        rows = _daily_rows(connection, _DAILY_SQL[query.group_by], _EVERY_JOB, tenant, days)
        if query.group_by == "status":
            # the status is the group; a job with none is in the group None, counted in no status
            rows = ((status or None, status, *figures) for _, status, *figures in rows)
        _fold(groups, rows, any_status=query.group_by == "status")
    for edge_lo, edge_hi in edges:
        for group, figures in _job_groups(connection, tenant, edge_lo, edge_hi, query.group_by):
            groups.setdefault(group, _Figures()).add(figures)
    return groups


def _split_days(lo: str, hi: str) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """[lo, hi) as its whole UTC days, [first, last + 1) for usage_daily (None if it holds
    no whole day), and the time ranges left at its edges."""
    start = lo if lo == _BEFORE_ALL or lo.endswith(_MIDNIGHT) else _next_day(lo[:_DAY]) + _MIDNIGHT
    end = hi if hi == _AFTER_ALL else hi[:_DAY] + _MIDNIGHT
    if start >= end:
        return None, [(lo, hi)]
    return (start[:_DAY], end[:_DAY]), [(a, b) for a, b in [(lo, start), (end, hi)] if a < b]


def _next_day(day: str) -> str:
    try:
        return (date.fromisoformat(day) + timedelta(days=1)).isoformat()
    except OverflowError:  # past 9999-12-31
        return _AFTER_ALL


def _daily_rows(connection: sqlite3.Connection, sql: str, name: str, tenant: str,
                days: tuple[str, str]) -> list[sqlite3.Row]:
    return connection.execute(sql, {"name": name, "tenant": tenant, "day_lo": days[0], "day_hi": days[1]}).fetchall()


def _fold(groups: dict[str | None, _Figures], rows: Iterable[Sequence[Any]], any_status: bool = False) -> None:
    """Add rows of (group, report status, jobs, cpu_ms, wall_ms, memory_byte_ms) to groups.
    The status is counted if it is one of REPORT_STATUSES (any non-empty one if
    any_status), as `_STATUS_COUNTS` and `_status_groups` count it."""
    for group, status, jobs, cpu_ms, wall_ms, memory_byte_ms in rows:
        counted = status in REPORT_STATUSES or (any_status and bool(status))
        figures = _Figures(jobs, cpu_ms, wall_ms, memory_byte_ms, {status: jobs} if counted else {})
        groups.setdefault(group, _Figures()).add(figures)


def _job_groups(connection: sqlite3.Connection, tenant: str, lo: str, hi: str,
                group_by: str | None) -> Iterator[tuple[str | None, _Figures]]:
    """Groups summed job by job over the covering index."""
    if group_by is None:
        yield None, _totals(connection, tenant, lo, hi)
    elif group_by in TIME_GROUPS:
        yield from _time_groups(connection, tenant, lo, hi, TIME_GROUPS[group_by])
    elif group_by == "image":
        yield from _chunked_groups(connection, _IMAGE_CHUNK_SQL, {"tenant": tenant, "lo": lo, "hi": hi}).items()
    else:
        yield from _status_groups(connection, tenant, lo, hi).items()


def _totals(connection: sqlite3.Connection, tenant: str, lo: str, hi: str) -> _Figures:
    values = connection.execute(_TOTALS_SQL, {"tenant": tenant, "lo": lo, "hi": hi}).fetchone()
    return _Figures.from_sql(values)


def _time_groups(connection: sqlite3.Connection, tenant: str, lo: str, hi: str,
                 width: int) -> Iterator[tuple[str, _Figures]]:
    """Days or hours: each group is an index range, so each is summed with no sort, and
    empty days or hours cost nothing."""
    start = connection.execute(_FIRST_TIME_SQL, {"tenant": tenant, "lo": lo, "hi": hi}).fetchone()[0]
    while start is not None:
        group = start[:width]
        group_end = min(group + _AFTER_ALL, hi)
        values = connection.execute(
            _TIME_GROUP_SQL, {"tenant": tenant, "lo": start, "group_end": group_end, "hi": hi}).fetchone()
        yield group, _Figures.from_sql(values)
        start = values[-1]


def _chunks(connection: sqlite3.Connection, tenant: str, lo: str, hi: str) -> Iterator[tuple[str, str]]:
    """[lo, hi) cut into ranges of about _CHUNK_ROWS of the tenant's jobs. Ranges are cut
    between distinct times, so a chunk may hold more rows when many jobs share a time."""
    start = lo
    while True:
        params = {"tenant": tenant, "lo": start, "hi": hi, "rows": _CHUNK_ROWS}
        row = connection.execute(_CHUNK_END_SQL, params).fetchone()
        end: str | None = row[0] if row is not None else None
        if end == start:
            end = connection.execute(_NEXT_TIME_SQL, params).fetchone()[0]
        if end is None:
            yield start, hi
            return
        yield start, end
        start = end


def _chunked_groups(connection: sqlite3.Connection, sql: str, params: dict[str, Any],
                    with_status_counts: bool = True) -> dict[str | None, _Figures]:
    """`sql` (a GROUP BY over `_RANGE`, the group first) run per chunk, sums folded."""
    groups: dict[str | None, _Figures] = {}
    for lo, hi in _chunks(connection, params["tenant"], params["lo"], params["hi"]):
        for values in connection.execute(sql, {**params, "lo": lo, "hi": hi}):
            figures = _Figures.from_sql(values[1:], with_status_counts)
            groups.setdefault(values[0], _Figures()).add(figures)
    return groups


def _status_groups(connection: sqlite3.Connection, tenant: str, lo: str, hi: str) -> dict[str | None, _Figures]:
    groups = _chunked_groups(connection, _STATUS_CHUNK_SQL, {"tenant": tenant, "lo": lo, "hi": hi},
                             with_status_counts=False)
    for status, figures in groups.items():
        figures.by_status = {status: figures.jobs} if status is not None else {}
    return groups


def _label_groups(connection: sqlite3.Connection, tenant: str, days: tuple[str, str] | None,
                  edges: list[tuple[str, str]], label: str) -> dict[str | None, _Figures]:
    """Jobs by their value of a label, and those without it as the group None: every
    job's sums less the labelled ones. Both from usage_daily for whole days; at the edges,
    the labelled jobs from job_label_usage and every job from the covering index."""
    every: dict[str | None, _Figures] = {None: _Figures()}
    labelled: dict[str | None, _Figures] = {}
    if days is not None:
        _fold(every, _daily_rows(connection, _DAILY_SQL[None], _EVERY_JOB, tenant, days))
        _fold(labelled, _daily_rows(connection, _DAILY_SQL["label"], label, tenant, days))
    for lo, hi in edges:
        every[None].add(_totals(connection, tenant, lo, hi))
        _fold(labelled, connection.execute(_LABEL_RANGE_SQL, {"name": label, "tenant": tenant, "lo": lo, "hi": hi}))
    unlabelled = every[None]
    for figures in labelled.values():
        unlabelled.add(figures, sign=-1)
    return {None: unlabelled, **labelled}


def report_plans(connection: sqlite3.Connection, query: UsageQuery) -> list[str]:
    """EXPLAIN QUERY PLAN details of the statements a report for `query` may run, so a
    test or an operator can check that each reads one index range: jobs through the
    covering index, usage_daily and job_label_usage through their primary keys."""
    statements = [_TOTALS_SQL, _FIRST_TIME_SQL, _CHUNK_END_SQL]
    if query.group_by in TIME_GROUPS:
        statements.append(_TIME_GROUP_SQL)
    elif query.group_by == "image":
        statements.append(_IMAGE_CHUNK_SQL)
    elif query.group_by == "status":
        statements.append(_STATUS_CHUNK_SQL)
    elif query.label is not None:
        statements.append(_LABEL_RANGE_SQL)
    if query.group_by != "hour":
        statements.append(_DAILY_SQL[None])
        statements.append(_DAILY_SQL["label" if query.label is not None else query.group_by])
    params = {"tenant": "t", "lo": _BEFORE_ALL, "hi": _AFTER_ALL, "group_end": _AFTER_ALL, "rows": _CHUNK_ROWS,
              "name": query.label or _EVERY_JOB, "day_lo": _BEFORE_ALL, "day_hi": _AFTER_ALL}
    details = []
    for sql in statements:
        details += [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    return details


CSV_COLUMNS = ("tenant", "group", "jobs", "cpu_seconds", "wall_seconds", "memory_gb_seconds", *REPORT_STATUSES)


def _fixed(value: float) -> str:
    return f"{value:.6f}"


def _csv_line(tenant: str, group: str | None, row: dict[str, Any]) -> list[str]:
    return [tenant, group or "", str(row["jobs"]), _fixed(row["cpu_seconds"]), _fixed(row["wall_seconds"]),
            _fixed(row["memory_gb_seconds"]), *(str(row["by_status"].get(status, 0)) for status in REPORT_STATUSES)]


def usage_csv(report: dict[str, Any]) -> str:
    """One line per row, then TOTAL (group empty); one column per status in
    REPORT_STATUSES (a status outside them counts in jobs only)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in report["rows"]:
        writer.writerow(_csv_line(row["tenant"], row["group"], row))
    writer.writerow(_csv_line("TOTAL", None, report["totals"]))
    return out.getvalue()


def usage_table(report: dict[str, Any]) -> str:
    """Aligned text: numbers right, statuses as `ok=3 runtime_error=1`, a TOTAL line."""
    header = ["tenant", "group", "jobs", "cpu_s", "wall_s", "memory_GiB_s", "statuses"]
    lines = [_table_line(row["tenant"], row["group"] or "", row) for row in report["rows"]]
    total = _table_line("TOTAL", "", report["totals"])
    widths = [max(len(line[i]) for line in [header, *lines, total]) for i in range(len(header))]
    # the statuses column can be long; its rule stops at its header
    rule = ["-" * width for width in widths[:-1]] + ["-" * len(header[-1])]
    return "\n".join(_align(line, widths) for line in [header, rule, *lines, rule, total]) + "\n"


def _table_line(tenant: str, group: str, row: dict[str, Any]) -> list[str]:
    statuses = " ".join(f"{status}={count}" for status, count in row["by_status"].items())
    return [tenant, group, str(row["jobs"]), f"{row['cpu_seconds']:.3f}", f"{row['wall_seconds']:.3f}",
            f"{row['memory_gb_seconds']:.3f}", statuses]


def _align(cells: list[str], widths: list[int]) -> str:
    left = {0, 1, 6}  # text columns; the figures are right-aligned
    padded = [cell.ljust(width) if index in left else cell.rjust(width)
              for index, (cell, width) in enumerate(zip(cells, widths))]
    return "  ".join(padded).rstrip()
