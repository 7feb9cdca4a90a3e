"""The HTTP API (aiohttp): authentication, request validation, JSON in and out. It talks to
the scheduler and reads the store; it knows nothing of containers."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from sandboxd.api.errors import ApiError, invalid
from sandboxd.api.openapi import openapi_document
from sandboxd.api.requests import parse_batch, parse_job
from sandboxd.jobs import FINAL_STATES, STATES, JobRecord, limits_to_public
from sandboxd.limits import LimitPolicy
from sandboxd.log import info_soon
from sandboxd.metrics import ServiceMetrics
from sandboxd.scheduler.scheduler import QuotaError, Scheduler
from sandboxd.store.db import Reader
from sandboxd.store.jobs import JobFilter, get_job, list_jobs
from sandboxd.store.tenants import Tenant, hash_key, tenant_by_key
from sandboxd.store.usage import UsageQueryError, parse_usage_query, usage_csv, usage_report

if TYPE_CHECKING:
    from sandboxd.judge.service import JudgeService

MAX_BODY_BYTES = 16 << 20
MAX_WAIT_S = 300.0
DEFAULT_WAIT_S = 60.0
MAX_PAGE = 500
DEFAULT_PAGE = 50
TENANT_CACHE_S = 2.0  # how long a removed tenant or rotated key may still be accepted
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
LABEL_FILTER_RE = re.compile(r"^([A-Za-z0-9_.-]{1,64})=(.{0,256})$", re.S)
TENANT_KEY = web.AppKey("tenant", Tenant)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServiceContext:
    scheduler: Scheduler
    reader: Reader
    policy: LimitPolicy
    images: Callable[[], list[dict[str, Any]]]
    metrics: ServiceMetrics
    log: Any
    draining: Callable[[], bool]
    judge: JudgeService | None = None  # None: no judging routes answer (503)
    # Path prefix -> how errors are shown under it: the compatible APIs (Judge0's, Piston's)
    # answer in their own style, authentication errors included.
    error_styles: dict[str, Callable[[ApiError], web.Response]] = field(default_factory=dict)
    # Hosts (names or addresses) a Judge0 callback_url may name; with none, no callbacks.
    callback_hosts: tuple[str, ...] = ()


def job_object(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "state": record.state,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "image": record.image,
        "cmd": list(record.argv),
        "limits": limits_to_public(record.limits),
        "labels": dict(record.labels),
        "result": record.result.to_json_dict() if record.result is not None else None,
    }


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


async def _body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body_too_large", f"the request body is over {MAX_BODY_BYTES} bytes",
                       {"max_bytes": MAX_BODY_BYTES}) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None


def _query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise invalid(unknown[0], f"unknown query parameter (known: {', '.join(sorted(allowed)) or 'none'})")
    return {key: request.query[key] for key in request.query}


def _flag(value: str | None, field: str) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise invalid(field, "must be true or false")


def _number(value: str | None, field: str, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise invalid(field, "must be a number") from None
    if not low <= number <= high:
        raise invalid(field, f"must be between {low:g} and {high:g}")
    return number


def _tenant_scope(tenant: Tenant, query: dict[str, str], what: str) -> str | None:
    """Whose data a request covers: the caller's own; an admin's, everyone's (None) unless
    `tenant=` names one. Naming another tenant is for admins only."""
    if "tenant" in query:
        if not tenant.admin and query["tenant"] != tenant.name:
            raise ApiError(403, "forbidden", f"only an admin may see another tenant's {what}")
        return query["tenant"]
    return None if tenant.admin else tenant.name


class Api:
    def __init__(self, context: ServiceContext) -> None:
        self.c = context
        self._tenants: dict[str, tuple[Tenant | None, float]] = {}

    # --- middleware ------------------------------------------------------------------------

    @staticmethod
    def _key(request: web.Request) -> str | None:
        """The API key: `Authorization: Bearer KEY`; or as the compatible APIs' clients send
        it, `X-Auth-Token: KEY` (Judge0's) or `Authorization: KEY` (Piston's)."""
        header = request.headers.get("Authorization", "").strip()
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
        if header and not key:
            return header
        return request.headers.get("X-Auth-Token", "").strip() or None

    async def _authenticate(self, request: web.Request) -> Tenant:
        key = self._key(request)
        if key is None:
            raise ApiError(401, "unauthorized", "missing API key: send Authorization: Bearer KEY",
                           headers={"WWW-Authenticate": "Bearer"})
        key_hash = hash_key(key)
        cached = self._tenants.get(key_hash)
        now = time.monotonic()
        if cached is None or cached[1] < now:
            tenant = await self.c.reader.aread(lambda c: tenant_by_key(c, key))
            if len(self._tenants) > 10_000:
                self._tenants.clear()  # unknown keys must not grow the cache without bound
            self._tenants[key_hash] = (tenant, now + TENANT_CACHE_S)
        else:
            tenant = cached[0]
        if tenant is None:
            raise ApiError(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        return tenant

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        tenant_name = None
        try:
            if route != "/healthz":
                tenant = await self._authenticate(request)
                tenant_name = tenant.name
                request[TENANT_KEY] = tenant
            response = await handler(request)
        except ApiError as error:
            response = self._error(request, error)
        except web.HTTPRequestEntityTooLarge:
            response = self._error(request, ApiError(413, "body_too_large",
                                                     f"the request body is over {MAX_BODY_BYTES} bytes",
                                                     {"max_bytes": MAX_BODY_BYTES}))
        except web.HTTPException as error:
            code = {404: "not_found", 405: "method_not_allowed"}.get(error.status, "http_error")
            response = self._error(request, ApiError(error.status, code, error.reason))
        except Exception as error:  # noqa: BLE001 - one request's bug must not take the service down
            self.c.log.exception("request.failed", path=request.path)
            response = self._error(request, ApiError(500, "internal_error",
                                                     f"internal error: {type(error).__name__}"))
        elapsed = time.monotonic() - started
        self.c.metrics.request_duration.observe(elapsed, request.method, route, str(response.status))
        info_soon(self.c.log, "request", method=request.method, path=request.path, status=response.status,
                  tenant=tenant_name, duration_ms=round(elapsed * 1000, 3))
        return response

    def _error(self, request: web.Request, error: ApiError) -> web.Response:
        for prefix, style in self.c.error_styles.items():
            if request.path.startswith(prefix):
                return style(error)
        return error.response()

    # --- helpers ---------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> JobRecord:
        """The job named in the path, if this tenant may see it; else 404 (never 403: the
        existence of another tenant's job is not revealed)."""
        job_id = request.match_info["job_id"]
        tenant = request[TENANT_KEY]
        record = self.c.scheduler.live(job_id) if JOB_ID_RE.match(job_id) else None
        if record is None and JOB_ID_RE.match(job_id):
            record = await self.c.reader.aread(lambda c: get_job(c, job_id))
        if record is None or (record.tenant != tenant.name and not tenant.admin):
            raise ApiError(404, "job_not_found", f"no job {job_id!r}")
        return record

    def _image_names(self) -> set[str]:
        return {image["name"] for image in self.c.images()}

    def _refuse_while_draining(self) -> None:
        if self.c.draining():
            raise ApiError(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "5"})

    async def _submit(self, tenant: Tenant, requests: list) -> list[JobRecord]:
        try:
            return await self.c.scheduler.submit(tenant, requests)
        except QuotaError as error:
            headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else {}
            raise ApiError(error.http_status, error.code, str(error), error.details, headers) from None

    # --- routes ----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        scheduler = self.c.scheduler
        status = "draining" if self.c.draining() else "ok"
        return _json({"status": status, "queued": scheduler.queued_total, "running": scheduler.running_total,
                      "workers": scheduler.workers}, 503 if status == "draining" else 200)

    async def create_job(self, request: web.Request) -> web.Response:
        query = _query(request, {"wait", "timeout"})
        wait = _flag(query.get("wait"), "wait")
        timeout_s = _number(query.get("timeout"), "timeout", DEFAULT_WAIT_S, 0, MAX_WAIT_S)
        self._refuse_while_draining()
        tenant = request[TENANT_KEY]
        job = parse_job(await _body(request), policy=self.c.policy, tenant=tenant, images=self._image_names())
        record = (await self._submit(tenant, [job]))[0]
        if wait:
            record = await self.c.scheduler.wait(record.id, timeout_s) or record
        return _json(job_object(record), 201)

    async def create_batch(self, request: web.Request) -> web.Response:
        _query(request, set())
        self._refuse_while_draining()
        tenant = request[TENANT_KEY]
        jobs = parse_batch(await _body(request), policy=self.c.policy, tenant=tenant, images=self._image_names())
        records = await self._submit(tenant, jobs)
        return _json({"jobs": [job_object(record) for record in records]}, 201)

    async def get_job(self, request: web.Request) -> web.Response:
        _query(request, set())
        return _json(job_object(await self._record(request)))

    async def list_jobs(self, request: web.Request) -> web.Response:
        query = _query(request, {"state", "label", "limit", "cursor", "tenant"})
        tenant = request[TENANT_KEY]
        state = query.get("state")
        if state is not None and state not in STATES:
            raise invalid("state", f"must be one of {', '.join(STATES)}")
        label = None
        if "label" in query:
            match = LABEL_FILTER_RE.match(query["label"])
            if not match:
                raise invalid("label", "must look like NAME=VALUE")
            label = (match.group(1), match.group(2))
        limit = int(_number(query.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE))
        cursor = None
        if "cursor" in query:
            if not query["cursor"].isdigit():
                raise invalid("cursor", "is not a cursor this service gave out")
            cursor = int(query["cursor"])
        where = JobFilter(tenant=_tenant_scope(tenant, query, "jobs"), state=state, label=label, before_seq=cursor, limit=limit)
        records, next_seq = await self.c.reader.aread(lambda c: list_jobs(c, where))
        fresh = [self.c.scheduler.live(record.id) or record for record in records]
        return _json({"jobs": [job_object(record) for record in fresh],
                      "next_cursor": None if next_seq is None else str(next_seq)})

    async def cancel_job(self, request: web.Request) -> web.Response:
        _query(request, set())
        record = await self._record(request)
        if record.state in FINAL_STATES:
            raise ApiError(409, "job_finished", f"job {record.id} is already {record.state}", {"state": record.state})
        cancelled = await self.c.scheduler.cancel(record.id)
        if cancelled is None:  # it ended meanwhile
            record = await self._record(request)
            raise ApiError(409, "job_finished", f"job {record.id} is already {record.state}", {"state": record.state})
        return _json(job_object(cancelled))

    async def usage(self, request: web.Request) -> web.Response:
        query = _query(request, {"from", "to", "group_by", "format", "tenant"})
        tenant = request[TENANT_KEY]
        fmt = query.get("format")
        if fmt is None:
            fmt = "csv" if "text/csv" in request.headers.get("Accept", "") else "json"
        if fmt not in ("json", "csv"):
            raise invalid("format", "must be json or csv")
        try:
            usage_query = parse_usage_query(_tenant_scope(tenant, query, "usage"), query.get("from"), query.get("to"), query.get("group_by"))
        except UsageQueryError as error:
            # The message starts with the parameter's name ("from: ...", "group_by: ...").
            name, _, message = str(error).partition(": ")
            field = name if name in ("from", "to", "group_by", "tenant") else "query"
            raise invalid(field, message if field != "query" else str(error)) from None
        report = await self.c.reader.aread(lambda c: usage_report(c, usage_query))
        if fmt == "csv":
            return web.Response(text=usage_csv(report), content_type="text/csv")
        return _json(report)

    async def images(self, request: web.Request) -> web.Response:
        _query(request, set())
        return _json({"images": self.c.images()})

    async def metrics(self, request: web.Request) -> web.Response:
        if not request[TENANT_KEY].admin:
            raise ApiError(403, "forbidden", "metrics cover every tenant: an admin key is needed")
        return web.Response(text=self.c.metrics.registry.render(), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Format": "prometheus-0.0.4"})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())


def create_app(context: ServiceContext) -> web.Application:
    api = Api(context)
    app = web.Application(middlewares=[api.middleware], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_post("/v1/jobs", api.create_job)
    app.router.add_post("/v1/jobs/batch", api.create_batch)
    app.router.add_get("/v1/jobs", api.list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", api.get_job)
    app.router.add_delete("/v1/jobs/{job_id}", api.cancel_job)
    app.router.add_get("/v1/usage", api.usage)
    app.router.add_get("/v1/images", api.images)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)
    # Imported here: these routes use this module's helpers.
    from sandboxd.api import judge0, piston, submissions

    submissions.add_routes(app, context)
    judge0.add_routes(app, context)
    piston.add_routes(app, context)
    return app
