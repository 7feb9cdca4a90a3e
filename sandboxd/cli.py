"""The `sandboxd` command line: `run` one job, `setup` rootless delegation."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from sandboxd.limits import LIMIT_NAMES, LimitError, default_limit_policy

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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "run":
            return _cmd_run(args)
        return _cmd_setup(args)
    except UsageError as error:
        print(f"sandboxd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
