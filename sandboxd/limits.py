"""A job's resource limits: defaults and maxima from policies/limits.toml, validated at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from sandboxd.policy_files import read_policy_file
from sandboxd.units import UnitError, parse_count, parse_seconds, parse_size_bytes


class LimitError(ValueError):
    """A limit is malformed, out of range or unknown; the message names the field."""


@dataclass(frozen=True)
class Limits:
    cpu_time_s: float
    wall_time_s: float
    memory_bytes: int
    pids: int
    cpus: float
    output_bytes: int
    file_size_bytes: int
    open_files: int
    stack_bytes: int
    disk_bytes: int
    io_bytes_per_s: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Name in policy files, CLI and API -> (field, parser, smallest sane value).
_FIELDS: dict[str, tuple[str, Any, float]] = {
    "cpu_time": ("cpu_time_s", parse_seconds, 0.001),
    "wall_time": ("wall_time_s", parse_seconds, 0.001),
    "memory": ("memory_bytes", parse_size_bytes, 4 << 20),
    "pids": ("pids", parse_count, 1),
    "cpus": ("cpus", parse_seconds, 0.01),
    "output": ("output_bytes", parse_size_bytes, 0),
    "file_size": ("file_size_bytes", parse_size_bytes, 0),
    "open_files": ("open_files", parse_count, 16),
    "stack": ("stack_bytes", parse_size_bytes, 64 << 10),
    "disk": ("disk_bytes", parse_size_bytes, 1 << 20),
    "io_rate": ("io_bytes_per_s", parse_size_bytes, 1 << 20),
}
LIMIT_NAMES: tuple[str, ...] = tuple(_FIELDS)
# Public name -> Limits field.
LIMIT_FIELDS: dict[str, str] = {name: field for name, (field, _, _) in _FIELDS.items()}


def _parse_table(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for name, raw in table.items():
        if name not in _FIELDS:
            raise LimitError(f"{where}: unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
        field, parser, _ = _FIELDS[name]
        try:
            parsed[field] = parser(raw)
        except UnitError as error:
            raise LimitError(f"{where}: {name}: {error}") from None
    return parsed


@dataclass(frozen=True)
class LimitPolicy:
    defaults: Limits
    maximum: Limits

    def resolve(self, overrides: Mapping[str, Any], where: str = "limits") -> Limits:
        """Defaults with the caller's overrides applied; refuses values past the maximum."""
        changes = _parse_table(overrides, where)
        limits = dataclasses.replace(self.defaults, **changes)
        for name, (field, _, smallest) in _FIELDS.items():
            value = getattr(limits, field)
            if value < smallest:
                raise LimitError(f"{where}: {name} must be at least {smallest:g}, got {value:g}")
            if value > getattr(self.maximum, field):
                raise LimitError(
                    f"{where}: {name} {value:g} is over the maximum {getattr(self.maximum, field):g}"
                )
        return limits


def load_limit_policy(text: str, where: str) -> LimitPolicy:
    import tomllib  # imported on use: the zygote, which never calls this, stays small

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LimitError(f"{where}: {error}") from None
    tables = {}
    for section in ("defaults", "maximum"):
        table = _parse_table(document.get(section, {}), f"{where} [{section}]")
        missing = {field for field, _, _ in _FIELDS.values()} - set(table)
        if missing:
            raise LimitError(f"{where} [{section}]: missing {', '.join(sorted(missing))}")
        tables[section] = Limits(**table)
    return LimitPolicy(defaults=tables["defaults"], maximum=tables["maximum"])


@lru_cache(maxsize=1)
def default_limit_policy() -> LimitPolicy:
    text = read_policy_file("limits.toml")
    return load_limit_policy(text, "policies/limits.toml")
