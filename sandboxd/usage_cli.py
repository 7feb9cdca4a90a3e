"""`sandboxd usage`: per-tenant usage reports, read straight from the service's database.

It opens the database read-only, so it runs beside the service (WAL: neither waits for
the other) and never creates or changes a state directory.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from sandboxd.store.db import DATABASE_FILE, connect
from sandboxd.store.usage import UsageQueryError, parse_usage_query, usage_csv, usage_report, usage_table

EXIT_FAILED = 1
EXIT_USAGE = 2
FORMATS = ("table", "csv", "json")


def add_usage_parser(subparsers: Any, parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add `usage` to the command line's sub-commands. `parser_class` is the class the command
    line builds its parsers from: argparse makes the sub-parser from the sub-commands' own
    class, so this only checks they agree (bad options must be reported the same way)."""
    usage = subparsers.add_parser(
        "usage", help="report what tenants' jobs used",
        description="Report the CPU, wall-clock and memory time of ended jobs, per tenant.")
    if not isinstance(usage, parser_class):
        raise TypeError(f"the sub-commands build {type(usage).__name__}, not {parser_class.__name__}")
    usage.add_argument("--state-dir", type=Path, metavar="PATH",
                       help="the service's state directory (default: as for `sandboxd serve`)")
    usage.add_argument("--tenant", metavar="NAME", help="only this tenant (default: every tenant)")
    usage.add_argument("--from", dest="from_time", metavar="TIME",
                       help="jobs that finished at or after TIME (YYYY-MM-DD[THH:MM[:SS]][Z|+HH:MM], UTC if no zone)")
    usage.add_argument("--to", dest="to_time", metavar="TIME", help="jobs that finished before TIME")
    usage.add_argument("--group-by", metavar="day|hour|image|status|label:NAME",
                       help="one row per tenant and group (days and hours in UTC)")
    usage.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    return usage


def run_usage_command(args: argparse.Namespace) -> int:
    """Print the report; 0 on success, 1 when the database cannot be read, 2 for a bad query."""
    try:
        query = parse_usage_query(args.tenant, args.from_time, args.to_time, args.group_by)
    except UsageQueryError as error:
        return _fail(str(error), EXIT_USAGE)
    path = _state_dir(args) / DATABASE_FILE
    # Checked here because SQLite's own error for a missing file says only "unable to open".
    if not path.is_file():
        return _fail(f"no database at {path}: has sandboxd served from this state directory? "
                     f"(--state-dir or SANDBOXD_STATE_DIR)", EXIT_FAILED)
    try:
        connection = connect(path, readonly=True)
        try:
            report = usage_report(connection, query)
        finally:
            connection.close()
    except sqlite3.Error as error:
        return _fail(f"cannot read {path}: {error}", EXIT_FAILED)
    sys.stdout.write(_render(report, args.format))
    return 0


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return args.state_dir
    from sandboxd.state import default_state_dir

    return default_state_dir()


def _render(report: dict[str, Any], output_format: str) -> str:
    if output_format == "json":
        return json.dumps(report, indent=2) + "\n"
    if output_format == "csv":
        return usage_csv(report)
    return usage_table(report)


def _fail(message: str, status: int) -> int:
    print(f"sandboxd: error: {message}", file=sys.stderr)
    return status
