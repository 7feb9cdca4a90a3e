"""The `sandboxd` command line: `run` one job, `serve` the API, manage `tenant`s, report
`usage`, `setup` rootless delegation."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from sandboxd.limits import LIMIT_NAMES, LimitError, default_limit_policy
from sandboxd.image_cli import add_image_parser, run_image_command
from sandboxd.usage_cli import add_usage_parser, run_usage_command

EXIT_USAGE = 2
EXIT_INTERNAL = 125
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _key_value(text: str, what: str, shape: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"{what} must look like {shape}, got {text!r}")
    return key, value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandboxd", description="Rootless sandbox for untrusted code.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run one command in a fresh container",
                              description="Run CMD in a fresh container and report what it used.")
    run.add_argument("--image", default="host", help="image to run over (default: host)")
    for name in LIMIT_NAMES:
        run.add_argument(f"--{name.replace('_', '-')}", dest=f"limit_{name}", metavar="VALUE",
                         help=f"{name.replace('_', ' ')} limit (default from policies/limits.toml)")
    run.add_argument("--stdin", metavar="PATH", help="file to feed as standard input (default: empty)")
    run.add_argument("--file", action="append", default=[], metavar="DEST=SRC",
                     help="copy host file SRC to DEST in the work directory /work (repeatable)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="set an environment variable in the job (repeatable)")
    run.add_argument("--json", action="store_true", help="print one JSON object with the result")
    run.add_argument("--base64", action="store_true", help="with --json, add base64 copies of the output")
    run.add_argument("--state-dir", type=Path, help="where generated layers live")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    setup = commands.add_parser("setup", help="as root: delegate cgroups to a user for rootless use")
    setup.add_argument("--user", required=True, help="the user who will run sandboxd")

    serve = commands.add_parser("serve", help="run the HTTP job service",
                                description="Serve the job API on HTTP (SQLite in the state directory).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--state-dir", type=Path, help="database and layers (default: see README)")
    serve.add_argument("--workers", type=_positive, help="jobs running at once (default: 2 x cores)")
    serve.add_argument("--max-queue", type=_positive, default=10_000, help="jobs waiting at most (default 10000)")
    serve.add_argument("--warm", type=_non_negative, default=2, help="prepared containers kept ready (default 2)")
    serve.add_argument("--grace", type=float, default=30.0, metavar="SEC",
                       help="on SIGTERM, how long running jobs may finish (default 30)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.add_argument("--callback-host", action="append", default=[], metavar="HOST",
                       help="a host (name or address) Judge0 callback_urls may point to (repeatable; '*': any "
                            "host with only public addresses; also $SANDBOXD_CALLBACK_HOSTS, comma-separated; "
                            "default: none, callbacks are refused)")

    tenant = commands.add_parser("tenant", help="add, list, remove tenants; rotate their keys")
    tenants = tenant.add_subparsers(dest="tenant_command", required=True, parser_class=_Parser)
    add = tenants.add_parser("add", help="add a tenant and print its API key (shown once)")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see every tenant's jobs, usage and metrics")
    add.add_argument("--max-concurrent", type=_positive, help="jobs running at once")
    add.add_argument("--max-queued", type=_non_negative, help="jobs waiting at once (beyond: 429)")
    add.add_argument("--cpu-seconds-per-day", type=float, metavar="S", help="CPU seconds per UTC day (beyond: 429)")
    add.add_argument("--max-memory", metavar="SIZE", help="largest memory limit a job may ask for")
    add.add_argument("--max-cpu-time", type=float, metavar="SEC", help="largest CPU time limit a job may ask for")
    add.add_argument("--json", action="store_true", help='print {"tenant": NAME, "api_key": KEY}')
    listing = tenants.add_parser("ls", help="list tenants")
    listing.add_argument("--json", action="store_true")
    remove = tenants.add_parser("rm", help="remove a tenant (its jobs and usage stay)")
    remove.add_argument("name")
    rotate = tenants.add_parser("rotate-key", help="give a tenant a new API key; the old one stops working")
    rotate.add_argument("name")
    rotate.add_argument("--json", action="store_true")
    for sub in (add, listing, remove, rotate):
        sub.add_argument("--state-dir", type=Path, help="the service's state directory")

    add_usage_parser(commands, _Parser)
    add_image_parser(commands, _Parser)
    return parser


def _port(text: str) -> int:
    value = _non_negative(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _read_host_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"cannot read {what} {path!r}: {error.strerror}") from None


def _spec_from_args(args: argparse.Namespace):
    from sandboxd.job import InputFile, JobSpec, SpecError, normalize_workdir_path

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("missing command: sandboxd run [OPTIONS] -- CMD [ARG...]")
    overrides = {name: getattr(args, f"limit_{name}") for name in LIMIT_NAMES
                 if getattr(args, f"limit_{name}") is not None}
    try:
        limits = default_limit_policy().resolve(overrides, where="option")
    except LimitError as error:
        raise UsageError(str(error)) from None
    files = []
    for entry in args.file:
        dest, src = _key_value(entry, "--file", "DEST=SRC")
        try:
            path = normalize_workdir_path(dest)
        except SpecError as error:
            raise UsageError(str(error)) from None
        files.append(InputFile(path=path, content=_read_host_file(src, "--file source")))
    env = tuple(_key_value(entry, "--env", "KEY=VALUE") for entry in args.env)
    stdin = _read_host_file(args.stdin, "--stdin file") if args.stdin else None
    try:
        return JobSpec(argv=tuple(argv), limits=limits, image=args.image, env=env, stdin=stdin,
                       files=tuple(files))
    except SpecError as error:
        raise UsageError(str(error)) from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_run(args: argparse.Namespace) -> int:
    from sandboxd.images import UnknownImageError, resolve_image
    from sandboxd.runtime.cgroup import CgroupError
    from sandboxd.runtime.launch import Runtime
    from sandboxd.state import default_state_dir

    spec = _spec_from_args(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    state_dir = args.state_dir or default_state_dir()
    try:
        resolve_image(spec.image, state_dir)
        runtime = Runtime(state_dir=state_dir)
    except UnknownImageError as error:
        raise UsageError(str(error.args[0])) from None
    except (CgroupError, OSError) as error:
        hint = ""
        if os.geteuid() != 0 and "setup" not in str(error):
            hint = (f"; as root, `sandboxd setup --user {getpass.getuser()}` prepares a state "
                    f"directory and cgroups for this user (or set SANDBOXD_STATE_DIR)")
        print(f"sandboxd: cannot start the runtime: {error}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
    try:
        result = runtime.run(spec)
    except KeyboardInterrupt:
        print("sandboxd: interrupted; the job was killed", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        runtime.close()  # the container's teardown and cgroup removal, before we exit
    if args.json:
        json.dump(result.to_json_dict(include_base64=args.base64), sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        if result.status not in ("ok", "runtime_error") or result.message:
            detail = f" ({result.message})" if result.message else ""
            print(f"sandboxd: {result.status}{detail}", file=sys.stderr)
    if result.status == "internal_error":
        return EXIT_INTERNAL
    return result.shell_exit_status


def _cmd_setup(args: argparse.Namespace) -> int:
    from sandboxd.rootless import SetupError, setup_user

    try:
        for line in setup_user(args.user):
            print(line)
    except SetupError as error:
        print(f"sandboxd: setup failed: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from sandboxd.serve import ServeOptions, run_service
    from sandboxd.state import default_state_dir

    if args.grace < 0:
        raise UsageError("--grace must not be negative")
    options = ServeOptions(host=args.host, port=args.port, state_dir=args.state_dir or default_state_dir(),
                           max_queue=args.max_queue, warm_containers=args.warm, grace_s=args.grace,
                           log_level=args.log_level, callback_hosts=_callback_hosts(args.callback_host))
    if args.workers:
        options = dataclasses.replace(options, workers=args.workers)
    return run_service(options)


def _callback_hosts(options: list[str]) -> tuple[str, ...]:
    """--callback-host, then $SANDBOXD_CALLBACK_HOSTS (comma-separated), each checked now so
    that a typo stops the service instead of refusing every callback."""
    from sandboxd.api.callbacks import normalize_callback_host

    entries = [("--callback-host", entry) for entry in options]
    from_environment = os.environ.get("SANDBOXD_CALLBACK_HOSTS", "").split(",")
    entries += [("SANDBOXD_CALLBACK_HOSTS", entry) for entry in from_environment]
    hosts = []
    for where, entry in entries:
        if not entry.strip():
            continue
        try:
            hosts.append(normalize_callback_host(entry.strip()))
        except ValueError as error:
            raise UsageError(f"{where}: {error}") from None
    return tuple(dict.fromkeys(hosts))


def _cmd_tenant(args: argparse.Namespace) -> int:
    from sandboxd.state import default_state_dir
    from sandboxd.store.db import StoreError, connect, open_database
    from sandboxd.store import tenants
    from sandboxd.units import UnitError, parse_size_bytes

    try:
        connection = connect(open_database(args.state_dir or default_state_dir()))
    except (StoreError, OSError) as error:
        print(f"sandboxd: cannot open the database: {error}", file=sys.stderr)
        return 1
    try:
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            if args.tenant_command == "add":
                try:
                    max_memory = parse_size_bytes(args.max_memory) if args.max_memory else None
                except UnitError as error:
                    raise UsageError(f"--max-memory: {error}") from None
                key = tenants.add_tenant(connection, tenants.Tenant(
                    name=args.name, admin=args.admin, max_concurrent=args.max_concurrent,
                    max_queued=args.max_queued, cpu_seconds_per_day=args.cpu_seconds_per_day,
                    max_memory_bytes=max_memory, max_cpu_time_s=args.max_cpu_time))
                _print_key(args, key)
            elif args.tenant_command == "rotate-key":
                _print_key(args, tenants.rotate_key(connection, args.name))
            elif args.tenant_command == "rm":
                tenants.remove_tenant(connection, args.name)
                print(f"removed tenant {args.name!r} (its jobs and usage are kept)")
            else:
                listed = tenants.list_tenants(connection)
                if args.json:
                    json.dump([t.public() for t in listed], sys.stdout)
                    sys.stdout.write("\n")
                for t in [] if args.json else listed:
                    print(f"{t.name}\t{'admin' if t.admin else 'tenant'}\tcreated {t.created_at}")
    except tenants.TenantError as error:
        print(f"sandboxd: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0


def _print_key(args: argparse.Namespace, key: str) -> None:
    if args.json:
        json.dump({"tenant": args.name, "api_key": key}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(key)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "tenant":
            return _cmd_tenant(args)
        if args.command == "usage":
            return run_usage_command(args)
        if args.command == "image":
            return run_image_command(args)
        return _cmd_setup(args)
    except UsageError as error:
        print(f"sandboxd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
