"""`sandboxd serve`: wire the store, the launcher, the scheduler and the HTTP API together,
recover what a previous run left, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import fcntl
import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from sandboxd.api.http import ServiceContext, create_app
from sandboxd.images import available_images
from sandboxd.judge.languages import LanguageError, load_languages
from sandboxd.judge.service import JudgeService
from sandboxd.limits import default_limit_policy
from sandboxd.log import configure_logging
from sandboxd.metrics import ServiceMetrics
from sandboxd.runtime.launcher import LauncherClient
from sandboxd.scheduler.scheduler import Scheduler
from sandboxd.store.db import Reader, Writer, open_database
from sandboxd.store.tenants import Tenant, add_tenant, list_tenants

LOCK_FILE = "service.lock"
BOOTSTRAP_TENANT = "admin"


class ServeError(RuntimeError):
    """The service cannot start; the message says why."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path("/var/lib/sandboxd")
    workers: int = max(2, 2 * (os.cpu_count() or 1))
    max_queue: int = 10_000
    warm_containers: int = 2
    grace_s: float = 30.0
    log_level: str = "info"
    callback_hosts: tuple[str, ...] = ()  # where Judge0 callback_urls may point (see api/callbacks.py)


def _lock_state_dir(state_dir: Path) -> int:
    """One service per state directory: two would run each other's queued jobs."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServeError(f"another sandboxd serve is using {state_dir}") from None
    return fd


def cgroup_base_for(state_dir: Path) -> str:
    """The service's own cgroup subtree, stable across restarts of the same state dir, so
    that a restarted service removes what a killed one left and nothing of anyone else's."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return f"sandboxd/service-{digest}"


def _bootstrap_tenant(writer: Writer, reader: Reader) -> str | None:
    """On first start, an admin tenant, so that the service is usable at once."""
    if reader.read(list_tenants):
        return None
    return writer.submit(lambda c: add_tenant(c, Tenant(name=BOOTSTRAP_TENANT, admin=True))).result()


def _welcome(url: str, key: str | None) -> str:
    lines = [f"sandboxd is serving on {url}"]
    if key is not None:
        lines += [
            f"created the admin tenant {BOOTSTRAP_TENANT!r}; its API key (shown only now; "
            f"`sandboxd tenant rotate-key {BOOTSTRAP_TENANT}` makes a new one):",
            f"  {key}",
        ]
    shown = key or "KEY"
    lines += [
        "submit a first job:",
        f"  curl -s -H 'Authorization: Bearer {shown}' -d '{{\"cmd\": [\"python3\", \"-c\", \"print(6*7)\"]}}' "
        f"'{url}/v1/jobs?wait=true'",
        "more tenants: sandboxd tenant add NAME",
    ]
    return "\n".join(lines)


async def serve(options: ServeOptions) -> int:
    log = configure_logging(options.log_level)
    state_dir = options.state_dir
    state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    try:
        languages = load_languages()
    except LanguageError as error:
        raise ServeError(str(error)) from None
    lock_fd = _lock_state_dir(state_dir)
    db_path = open_database(state_dir)
    writer, reader = Writer(db_path), Reader(db_path)
    launcher = LauncherClient(state_dir=state_dir, warm_containers=options.warm_containers,
                              cgroup_base=cgroup_base_for(state_dir))
    runner: web.AppRunner | None = None
    try:
        key = _bootstrap_tenant(writer, reader)
        await launcher.start()
        metrics = ServiceMetrics()
        scheduler = Scheduler(writer=writer, reader=reader, runner=launcher, workers=options.workers,
                              max_queue=options.max_queue, metrics=metrics, log=log)
        await scheduler.recover()
        judge = JudgeService(languages=languages, scheduler=scheduler, writer=writer, reader=reader,
                             run=launcher.run, log=log)
        await judge.start()  # after the scheduler's recovery: it cancels what that requeued
        draining = False
        context = ServiceContext(scheduler=scheduler, reader=reader, policy=default_limit_policy(),
                                 images=lambda: available_images(state_dir), metrics=metrics, log=log,
                                 draining=lambda: draining, judge=judge, callback_hosts=options.callback_hosts)
        runner = web.AppRunner(create_app(context), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, options.host, options.port, reuse_address=True)
        await site.start()
        port = _bound_port(site, options.port)
        host = f"[{options.host}]" if ":" in options.host else options.host
        url = f"http://{host}:{port}"
        log.info("service.listening", url=url, port=port, workers=options.workers, state_dir=str(state_dir))
        print(_welcome(url, key), flush=True)
        # What start-up built lives as long as the service: out of the collector's reach,
        # full collections walk only what requests leave behind.
        gc.freeze()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        draining = True
        log.info("service.draining", grace_s=options.grace_s, running=scheduler.running_total)
        await site.stop()  # no new connections; open ones get their answers
        # One grace period for both: submissions being judged first (their jobs still run),
        # then whatever jobs are left.
        deadline = loop.time() + options.grace_s
        await judge.drain(options.grace_s)
        await scheduler.drain(max(0.0, deadline - loop.time()))
        log.info("service.stopped")
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Closing the loop would restore the default action, and a second SIGTERM while
            # the interpreter exits would then turn a clean drain into death by signal.
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        await launcher.close()
        writer.close()
        reader.close()
        os.close(lock_fd)


def _bound_port(site: web.TCPSite, asked: int) -> int:
    server: Any = site._server  # aiohttp keeps the asyncio server here; the port may be 0
    sockets = getattr(server, "sockets", None) or []
    return sockets[0].getsockname()[1] if sockets else asked


def run_service(options: ServeOptions) -> int:
    try:
        return asyncio.run(serve(options))
    except ServeError as error:
        print(f"sandboxd: {error}", file=sys.stderr)
        return 1
