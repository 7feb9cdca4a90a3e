"""Scheduling: quotas at the door, a fair queue, `workers` jobs at once, and every transition
written to the database by the writer thread.

Durability: a job is committed before its submission is answered; it is committed as
running before the runtime sees it, so after a crash it is either still queued (and runs)
or was running (and is finished as an internal error): never lost, never run twice. The
final result is written off the hot path; until it is, the record is served from memory.

Riders: an interactive problem's interactor (side 1 of a pipe group) submitted right after
its solution (side 0) rides with it: it starts when the solution does, takes no worker slot
and no turn in the queue. The two must run at once (each waits for the other's output), and
a tenant limited to one job at a time would otherwise never see them both started.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Protocol

from sandboxd.job import JobSpec, Result, internal_error_result, new_job_id
from sandboxd.jobs import CANCELLED, DONE, QUEUED, RUNNING, JobRecord, JobRequest
from sandboxd.log import info_soon
from sandboxd.metrics import ServiceMetrics
from sandboxd.scheduler.queue import FairQueue
from sandboxd.store.db import Reader, Writer, utc_now
from sandboxd.store.jobs import cpu_seconds_since, finish_job, insert_jobs, mark_running, recover
from sandboxd.store.tenants import Tenant, get_tenant

STOPPED_MESSAGE = "the service stopped before the job finished"


class Runner(Protocol):
    def launch(self, spec: JobSpec) -> Awaitable[Result]: ...

    def kill(self, job_id: str) -> None: ...


class QuotaError(Exception):
    """A submission refused for capacity: 429 (the tenant's quota) or 503 (the service's)."""

    def __init__(self, http_status: int, code: str, message: str, retry_after_s: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.retry_after_s = retry_after_s
        self.details = details or {}


@dataclass
class _Active:
    """A job the scheduler holds: queued or running."""

    record: JobRecord
    request: JobRequest
    tenant: Tenant
    done: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: list[asyncio.Future] = field(default_factory=list)  # wait()s, woken by _finish
    launched: Awaitable[Result] | None = None  # sent to the runner while its row commits
    cancel_requested: bool = False
    stop_requested: bool = False
    rider: _Active | None = None  # the job piped to this one, started with it
    riding: bool = False  # a rider: takes no worker slot of its own, and is never queued


def _rides_with(request: JobRequest, leader: _Active | None) -> bool:
    """Whether `request` is the piped partner (side 1) of `leader` (side 0): an interactor
    rides with its solution, so the two always run together and neither waits for the
    other behind a tenant's concurrency limit."""
    pipe = request.stdio_pipe
    lead = leader.request.stdio_pipe if leader is not None else None
    return pipe is not None and lead is not None and pipe.side == 1 and lead.side == 0 and pipe.group == lead.group


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _seconds_to_next_utc_day() -> int:
    now = datetime.now(timezone.utc)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()) + 1)


def _utc_day() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


class Scheduler:
    def __init__(self, *, writer: Writer, reader: Reader, runner: Runner, workers: int, max_queue: int,
                 metrics: ServiceMetrics, log: Any) -> None:
        self._writer = writer
        self._reader = reader
        self._runner = runner
        self.workers = workers
        self.max_queue = max_queue
        self._metrics = metrics
        self._log = log
        self._queue = FairQueue()
        self._active: dict[str, _Active] = {}
        self._tenants: dict[str, Tenant] = {}  # quotas as of each tenant's latest submission
        self._unpersisted: dict[str, JobRecord] = {}  # final, its write not yet committed
        self._running: Counter[str] = Counter()
        self._running_total = 0
        self._tasks: set[asyncio.Task] = set()
        self._writes: set[asyncio.Future] = set()
        self._cpu_day = _utc_day()
        self._cpu_seconds_today: dict[str, float] = {}
        self._draining = False
        metrics.bind_gauges(lambda: len(self._queue), lambda: self._running_total)

    # --- figures -----------------------------------------------------------------------------

    @property
    def queued_total(self) -> int:
        return len(self._queue)

    @property
    def running_total(self) -> int:
        return self._running_total

    def live(self, job_id: str) -> JobRecord | None:
        """The freshest record of a job the database may not have caught up with."""
        active = self._active.get(job_id)
        if active is not None:
            return active.record
        return self._unpersisted.get(job_id)

    def cpu_seconds_today(self, tenant: str) -> float:
        self._roll_day()
        return self._cpu_seconds_today.get(tenant, 0.0)

    # --- start-up ----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish jobs a killed service left running, and queue the ones it left queued."""
        interrupted, queued = await self._writer.run(lambda c: recover(c, utc_now()))
        for job_id in interrupted:
            self._log.warning("job.interrupted_by_restart", job_id=job_id)
        since = self._cpu_day + "T00:00:00.000000Z"
        self._cpu_seconds_today = await self._reader.aread(lambda c: cpu_seconds_since(c, since))
        tenants: dict[str, Tenant] = {}
        previous: _Active | None = None
        for record, request in queued:
            if record.tenant not in tenants:
                found = await self._reader.aread(lambda c, name=record.tenant: get_tenant(c, name))
                tenants[record.tenant] = self._tenants[record.tenant] = found or Tenant(name=record.tenant)
            active = self._active[record.id] = _Active(record, request, tenants[record.tenant])
            if previous is not None and _rides_with(request, previous):
                active.riding, previous.rider = True, active
            else:
                self._queue.push(record.tenant, record.id)
            previous = active
        if queued:
            self._log.info("scheduler.requeued", jobs=len(queued))
        self._pump()

    # --- submissions -------------------------------------------------------------------------

    def _roll_day(self) -> None:
        today = _utc_day()
        if today != self._cpu_day:
            self._cpu_day = today
            self._cpu_seconds_today = {}

    def _may_start(self, tenant: Tenant) -> bool:
        return self._running_total < self.workers and (
            tenant.max_concurrent is None or self._running[tenant.name] < tenant.max_concurrent)

    def _check_quotas(self, tenant: Tenant, count: int) -> None:
        if self._draining:
            raise QuotaError(503, "shutting_down", "the service is shutting down", retry_after_s=5)
        if tenant.cpu_seconds_per_day is not None and self.cpu_seconds_today(tenant.name) >= tenant.cpu_seconds_per_day:
            raise QuotaError(429, "cpu_quota_exhausted",
                             f"tenant {tenant.name!r} used its {tenant.cpu_seconds_per_day:g} CPU seconds for today (UTC)",
                             retry_after_s=_seconds_to_next_utc_day(),
                             details={"cpu_seconds_today": round(self.cpu_seconds_today(tenant.name), 3)})
        if tenant.max_queued is not None and self._queue.depth(tenant.name) + count > tenant.max_queued:
            raise QuotaError(429, "too_many_queued",
                             f"tenant {tenant.name!r} may have at most {tenant.max_queued} jobs queued",
                             retry_after_s=1, details={"queued": self._queue.depth(tenant.name)})
        if len(self._queue) + count > self.max_queue:
            raise QuotaError(503, "queue_full", f"the queue is full ({self.max_queue} jobs)", retry_after_s=1)

    def admit(self, tenant: Tenant, count: int = 1) -> None:
        """Raise QuotaError if `count` jobs of this tenant would be refused now (for work that
        submits its jobs later, as a judged submission does)."""
        self._check_quotas(tenant, count)

    async def submit(self, tenant: Tenant, requests: list[JobRequest]) -> list[JobRecord]:
        """Accept the jobs: committed to the database when this returns."""
        self._check_quotas(tenant, len(requests))
        self._tenants[tenant.name] = tenant
        now = utc_now()
        starting: list[_Active] = []
        accepted: list[_Active] = []
        for request in requests:
            record = JobRecord(id=new_job_id(), tenant=tenant.name, state=QUEUED, created_at=now,
                               image=request.image, argv=request.argv, limits=request.limits, labels=request.labels)
            active = _Active(record, request, tenant)
            leader = accepted[-1] if accepted else None
            if leader is not None and _rides_with(request, leader):
                active.riding, leader.rider = True, active
                if leader.record.state == RUNNING:
                    active.record = record.replace(state=RUNNING, started_at=now)
                    starting.append(active)
                accepted.append(active)
                continue
            # Straight to running when a worker is free and the tenant has nothing waiting:
            # one commit instead of two, and no turn through the queue.
            if self._queue.depth(tenant.name) == 0 and self._may_start(tenant):
                active.record = record.replace(state=RUNNING, started_at=now)
                self._reserve(tenant.name)
                starting.append(active)
            accepted.append(active)
        # Jobs that start now go to the runner before their row is even queued (the writer
        # thread would otherwise take the GIL on their way) and run while it commits: the
        # answer (201) still waits for the commit, and the writer commits the row before any
        # later write of the same job. A crash before the commit loses only a job nobody was
        # told was accepted.
        for active in starting:
            self._active[active.record.id] = active
            active.launched = self._runner.launch(active.request.spec(active.record.id))
            self._spawn(self._execute(active))
        inserted = asyncio.wrap_future(
            self._writer.submit(lambda c: insert_jobs(c, [(a.record, a.request) for a in accepted])))
        try:
            await inserted
        except BaseException:
            for active in starting:
                active.stop_requested = True
                self._runner.kill(active.record.id)
            raise
        for active in accepted:
            info_soon(self._log, "job.accepted", job_id=active.record.id, tenant=tenant.name,
                      state=active.record.state)
            if active.record.state == QUEUED:
                self._active[active.record.id] = active
                if not active.riding:
                    self._queue.push(tenant.name, active.record.id)
        self._metrics.jobs_submitted.inc(amount=len(accepted))
        self._pump()
        return [active.record for active in accepted]

    # --- running -----------------------------------------------------------------------------

    def _reserve(self, tenant: str) -> None:
        self._running[tenant] += 1
        self._running_total += 1

    def _release(self, tenant: str) -> None:
        self._running[tenant] -= 1
        if self._running[tenant] <= 0:
            del self._running[tenant]
        self._running_total -= 1

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump(self) -> None:
        """Start queued jobs while workers are free, tenants in turn."""
        while self._running_total < self.workers and len(self._queue):
            picked = self._queue.pop(lambda name: self._may_start(self._active_tenant(name)))
            if picked is None:
                return
            active = self._active[picked[1]]
            active.record = active.record.replace(state=RUNNING, started_at=utc_now())
            self._reserve(active.tenant.name)
            rider = active.rider
            if rider is not None and rider.record.state == QUEUED:
                rider.record = rider.record.replace(state=RUNNING, started_at=active.record.started_at)
                self._spawn(self._start_queued(rider))
            self._spawn(self._start_queued(active))

    def _active_tenant(self, name: str) -> Tenant:
        return self._tenants.get(name) or Tenant(name=name)

    async def _start_queued(self, active: _Active) -> None:
        record = active.record
        try:
            await self._writer.run(lambda c: mark_running(c, record.id, record.started_at or utc_now()))
        except Exception as error:  # noqa: BLE001 - the job must end, not vanish
            self._finish(active, DONE, internal_error_result(f"cannot record the job as running: {error}"))
            return
        await self._execute(active)

    async def _execute(self, active: _Active) -> None:
        record = active.record
        info_soon(self._log, "job.running", job_id=record.id, tenant=record.tenant)
        if active.cancel_requested and active.launched is None:
            self._finish(active, CANCELLED, None)
            return
        try:
            # No await between the check above and this call: launch() sends the order at
            # once, so a later kill() always follows it.
            result = await (active.launched or self._runner.launch(active.request.spec(record.id)))
        except asyncio.CancelledError:
            self._runner.kill(record.id)
            self._finish(active, DONE, internal_error_result(STOPPED_MESSAGE))
            raise
        except Exception as error:  # noqa: BLE001
            result = internal_error_result(f"the runtime failed: {error}")
        if active.stop_requested and not active.cancel_requested:
            result = internal_error_result(STOPPED_MESSAGE) if result.status == "signaled" else result
        self._finish(active, CANCELLED if active.cancel_requested else DONE, result)

    def _finish(self, active: _Active, state: str, result: Result | None) -> None:
        record = active.record
        was_running = record.state == RUNNING
        final = record.replace(state=state, finished_at=utc_now(), result=result)
        active.record = final
        del self._active[record.id]
        if was_running and not active.riding:
            self._release(record.tenant)
        self._unpersisted[record.id] = final
        if result is not None:
            self._roll_day()
            self._cpu_seconds_today[record.tenant] = (
                self._cpu_seconds_today.get(record.tenant, 0.0) + result.cpu_time_ms / 1000)
            self._metrics.job_duration.observe(result.wall_time_ms / 1000)
        self._metrics.jobs_finished.inc(CANCELLED if state == CANCELLED else (result.status if result else DONE))
        for waiter in active.waiters:
            _wake(waiter)
        active.done.set()
        # After the answers of the waiters woken above: rendering the line and waking the
        # writer thread then take no one's answer's time.
        info_soon(self._log, "job.finished", job_id=record.id, tenant=record.tenant, state=state,
                  status=result.status if result else None, cpu_time_ms=result.cpu_time_ms if result else None)
        asyncio.get_running_loop().call_soon(self._store_final, final)
        self._pump()

    def _store_final(self, final: JobRecord) -> None:
        write = asyncio.wrap_future(self._writer.submit(lambda c: finish_job(c, final)))
        self._writes.add(write)
        write.add_done_callback(lambda future, job_id=final.id: self._persisted(job_id, future))

    def _persisted(self, job_id: str, future: asyncio.Future) -> None:
        self._writes.discard(future)
        if future.cancelled() or future.exception() is not None:
            error = "cancelled" if future.cancelled() else future.exception()
            self._log.error("job.result_not_stored", job_id=job_id, error=str(error))
            return  # kept in memory: still served, and a restart finishes it as interrupted
        self._unpersisted.pop(job_id, None)

    # --- waiting, cancelling, draining --------------------------------------------------------

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """The job once it is final, or as it is at the timeout; None if not held here."""
        active = self._active.get(job_id)
        if active is None:
            return self.live(job_id)
        # A future of its own, woken straight by _finish(): one turn of the loop, not several.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        active.waiters.append(waiter)
        timer = loop.call_later(timeout_s, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in active.waiters:
                active.waiters.remove(waiter)
        return active.record  # final once done: _finish() leaves it here

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued or running job; None when the scheduler does not hold it (it is
        final already, or unknown)."""
        active = self._active.get(job_id)
        if active is None:
            return None
        if active.record.state == QUEUED:
            self._queue.remove(active.tenant.name, job_id)
            self._finish(active, CANCELLED, None)
            rider = active.rider
            if rider is not None and rider.record.state == QUEUED:  # it would wait for no one
                self._finish(rider, CANCELLED, None)
        else:
            active.cancel_requested = True
            self._runner.kill(job_id)
            await active.done.wait()
        self._log.info("job.cancelled", job_id=job_id, tenant=active.tenant.name)
        return active.record

    async def drain(self, grace_s: float) -> None:
        """Refuse new jobs, let running ones finish within grace_s, stop the rest; queued jobs
        stay queued in the database for the next start. Then flush every write."""
        self._draining = True
        self.workers = 0  # nothing more starts
        deadline = time.monotonic() + grace_s
        running = [a for a in self._active.values() if a.record.state == RUNNING]
        if running:
            self._log.info("scheduler.draining", running=len(running), grace_s=grace_s)
            await asyncio.wait([asyncio.ensure_future(a.done.wait()) for a in running],
                               timeout=max(0.0, deadline - time.monotonic()))
        for active in [a for a in self._active.values() if a.record.state == RUNNING]:
            active.stop_requested = True
            self._runner.kill(active.record.id)
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._writes:
            await asyncio.wait(list(self._writes))
