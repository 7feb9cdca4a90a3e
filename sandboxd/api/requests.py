"""Validation at the edge: untrusted JSON in, a JobRequest (or a 422 naming the field) out.
Nothing is coerced silently; unknown fields are refused so that a typo is not a default."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from sandboxd.api.errors import ApiError, invalid
from sandboxd.images.reference import REFERENCE_RE
from sandboxd.job import ENV_KEY_RE, InputFile, SpecError, normalize_workdir_path
from sandboxd.jobs import JobRequest
from sandboxd.limits import LimitError, LimitPolicy
from sandboxd.store.tenants import Tenant

JOB_FIELDS = {"cmd", "image", "stdin", "files", "env", "limits", "labels"}
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_ARGS = 4096
MAX_FILES = 1000
MAX_ENV = 256
MAX_LABELS = 32
MAX_LABEL_VALUE_CHARS = 256
MAX_BATCH_JOBS = 100


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(field, f"must be an object, got {type(value).__name__}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(field, f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise invalid(field, "must not contain NUL")
    return value


def _content(value: Any, field: str) -> bytes:
    """Text (stored as UTF-8) or {"base64": "..."} for bytes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        try:
            return base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid(field, "base64 is not valid") from None
    raise invalid(field, 'must be a string or {"base64": "..."}')


def _argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("cmd", "must be a non-empty list of strings")
    if len(value) > MAX_ARGS:
        raise invalid("cmd", f"has more than {MAX_ARGS} arguments")
    return tuple(_string(arg, f"cmd[{index}]") for index, arg in enumerate(value))


def _files(value: Any) -> tuple[InputFile, ...]:
    files = _object(value, "files")
    if len(files) > MAX_FILES:
        raise invalid("files", f"more than {MAX_FILES} files")
    parsed = []
    for path, content in files.items():
        field = f"files[{path!r}]"
        if path.startswith("/"):
            raise invalid(field, "the path must be relative to the work directory")
        try:
            relative = normalize_workdir_path(path)
        except SpecError as error:
            raise invalid(field, str(error)) from None
        parsed.append(InputFile(path=relative, content=_content(content, field)))
    return tuple(parsed)


def _string_map(value: Any, field: str, key_re: re.Pattern[str], max_items: int, key_kind: str,
                max_value_chars: int | None = None) -> tuple[tuple[str, str], ...]:
    """A JSON object of strings (env, labels): keys matching key_re, at most max_items."""
    mapping = _object(value, field)
    if len(mapping) > max_items:
        raise invalid(field, f"more than {max_items} entries")
    pairs = []
    for key, item in mapping.items():
        where = f"{field}[{key!r}]"
        if not key_re.match(key):
            raise invalid(where, f"a {key_kind} must match {key_re.pattern}")
        text = _string(item, where)
        if max_value_chars is not None and len(text) > max_value_chars:
            raise invalid(where, f"longer than {max_value_chars} characters")
        pairs.append((key, text))
    return tuple(pairs)


def _limits(value: Any, policy: LimitPolicy, tenant: Tenant):
    overrides = dict(_object(value, "limits"))
    for name, item in overrides.items():
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise invalid(f"limits.{name}", "must be a number or a string such as '256m'")
    # A tenant's maximum also caps the default: a job that names no limit still fits.
    if "memory" not in overrides and tenant.max_memory_bytes is not None:
        overrides["memory"] = min(policy.defaults.memory_bytes, tenant.max_memory_bytes)
    if "cpu_time" not in overrides and tenant.max_cpu_time_s is not None:
        overrides["cpu_time"] = min(policy.defaults.cpu_time_s, tenant.max_cpu_time_s)
    try:
        limits = policy.resolve(overrides, where="limits")
    except LimitError as error:
        message = str(error)
        match = re.match(r"limits: (?:unknown limit '([a-z_]+)'|([a-z_]+)\b)", message)
        name = (match.group(1) or match.group(2)) if match else None
        raise invalid(f"limits.{name}" if name else "limits", message.removeprefix("limits: ")) from None
    if tenant.max_memory_bytes is not None and limits.memory_bytes > tenant.max_memory_bytes:
        raise invalid("limits.memory", f"{limits.memory_bytes} bytes is over this tenant's maximum "
                                       f"{tenant.max_memory_bytes}")
    if tenant.max_cpu_time_s is not None and limits.cpu_time_s > tenant.max_cpu_time_s:
        raise invalid("limits.cpu_time", f"{limits.cpu_time_s:g} s is over this tenant's maximum "
                                         f"{tenant.max_cpu_time_s:g} s")
    return limits


def parse_job(body: Any, *, policy: LimitPolicy, tenant: Tenant, images: set[str], where: str = "") -> JobRequest:
    """A job request from decoded JSON; `where` prefixes field names (batch entries)."""
    try:
        job = _object(body, "job")
        unknown = sorted(set(job) - JOB_FIELDS)
        if unknown:
            raise invalid(unknown[0], f"unknown field (known: {', '.join(sorted(JOB_FIELDS))})")
        if "cmd" not in job:
            raise invalid("cmd", "is required")
        image = _string(job.get("image", "host"), "image")
        if image != "host" and not REFERENCE_RE.fullmatch(image):
            raise invalid("image", f"{image!r} is not a valid image name")
        if image not in images and f"{image}:latest" in images:
            image = f"{image}:latest"  # as the image's own listing names it
        if image not in images:
            raise invalid("image", f"unknown image {image!r} (available: {', '.join(sorted(images))})")
        return JobRequest(
            argv=_argv(job["cmd"]),
            image=image,
            limits=_limits(job.get("limits", {}), policy, tenant),
            stdin=_content(job["stdin"], "stdin") if job.get("stdin") is not None else None,
            files=_files(job.get("files", {})),
            env=_string_map(job.get("env", {}), "env", ENV_KEY_RE, MAX_ENV, "variable name"),
            labels=tuple(sorted(_string_map(job.get("labels", {}), "labels", LABEL_NAME_RE, MAX_LABELS,
                                            "label name", MAX_LABEL_VALUE_CHARS))),
        )
    except ApiError as error:
        if where and "field" in error.details:
            raise invalid(f"{where}.{error.details['field']}",
                          error.message.removeprefix(error.details["field"] + ": ")) from None
        raise


def parse_batch(body: Any, *, policy: LimitPolicy, tenant: Tenant, images: set[str]) -> list[JobRequest]:
    batch = _object(body, "body")
    unknown = sorted(set(batch) - {"jobs"})
    if unknown:
        raise invalid(unknown[0], "unknown field (known: jobs)")
    jobs = batch.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise invalid("jobs", "must be a non-empty list of jobs")
    if len(jobs) > MAX_BATCH_JOBS:
        raise invalid("jobs", f"at most {MAX_BATCH_JOBS} jobs per batch, got {len(jobs)}")
    return [parse_job(job, policy=policy, tenant=tenant, images=images, where=f"jobs[{index}]")
            for index, job in enumerate(jobs)]
