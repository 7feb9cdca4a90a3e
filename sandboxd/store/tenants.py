"""Tenants and their API keys. A key is shown once, when made; only its SHA-256 is stored.
Keys are 256 random bits, so a fast hash suffices: there is nothing to brute-force."""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass

from sandboxd.store.db import utc_now

TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
KEY_PREFIX = "sbx_"


class TenantError(ValueError):
    """A tenant name is invalid, taken or unknown."""


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False
    max_concurrent: int | None = None  # running at once; None: only the service's --workers
    max_queued: int | None = None  # waiting at once; None: only the service's queue bound
    cpu_seconds_per_day: float | None = None  # per UTC day
    max_memory_bytes: int | None = None  # per job
    max_cpu_time_s: float | None = None  # per job
    created_at: str = ""

    def public(self) -> dict:
        return {
            "tenant": self.name,
            "admin": self.admin,
            "max_concurrent": self.max_concurrent,
            "max_queued": self.max_queued,
            "cpu_seconds_per_day": self.cpu_seconds_per_day,
            "max_memory_bytes": self.max_memory_bytes,
            "max_cpu_time_s": self.max_cpu_time_s,
            "created_at": self.created_at,
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(
        name=row["name"],
        admin=bool(row["admin"]),
        max_concurrent=row["max_concurrent"],
        max_queued=row["max_queued"],
        cpu_seconds_per_day=row["cpu_seconds_per_day"],
        max_memory_bytes=row["max_memory_bytes"],
        max_cpu_time_s=row["max_cpu_time_s"],
        created_at=row["created_at"],
    )


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME_RE.match(name):
        raise TenantError(f"tenant name {name!r} must match {TENANT_NAME_RE.pattern}")
    return name


def add_tenant(connection: sqlite3.Connection, tenant: Tenant) -> str:
    """Create the tenant; returns its API key (the only time it is known)."""
    check_tenant_name(tenant.name)
    key = new_key()
    try:
        connection.execute(
            "INSERT INTO tenants (name, key_hash, admin, max_concurrent, max_queued, cpu_seconds_per_day,"
            " max_memory_bytes, max_cpu_time_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (tenant.name, hash_key(key), int(tenant.admin), tenant.max_concurrent, tenant.max_queued,
             tenant.cpu_seconds_per_day, tenant.max_memory_bytes, tenant.max_cpu_time_s, utc_now()),
        )
    except sqlite3.IntegrityError:
        raise TenantError(f"tenant {tenant.name!r} already exists") from None
    return key


def list_tenants(connection: sqlite3.Connection) -> list[Tenant]:
    return [_tenant(row) for row in connection.execute("SELECT * FROM tenants ORDER BY name")]


def tenant_by_key(connection: sqlite3.Connection, key: str) -> Tenant | None:
    row = connection.execute("SELECT * FROM tenants WHERE key_hash = ?", (hash_key(key),)).fetchone()
    return None if row is None else _tenant(row)


def remove_tenant(connection: sqlite3.Connection, name: str) -> None:
    """The tenant can no longer authenticate; its jobs and their accounting stay."""
    if connection.execute("DELETE FROM tenants WHERE name = ?", (name,)).rowcount == 0:
        raise TenantError(f"no tenant {name!r}")


def rotate_key(connection: sqlite3.Connection, name: str) -> str:
    key = new_key()
    if connection.execute("UPDATE tenants SET key_hash = ? WHERE name = ?", (hash_key(key), name)).rowcount == 0:
        raise TenantError(f"no tenant {name!r}")
    return key


def get_tenant(connection: sqlite3.Connection, name: str) -> Tenant | None:
    row = connection.execute("SELECT * FROM tenants WHERE name = ?", (name,)).fetchone()
    return None if row is None else _tenant(row)
