"""The human units users type (sizes: 512m, 1g; durations in seconds) and read (10.2 kB)."""

from __future__ import annotations

import math
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UnitError(ValueError):
    """A value a user typed is not a valid size, duration or count."""


def parse_size_bytes(value: str | int | float) -> int:
    """'512m' -> 536870912. Suffixes are binary (k = 1024) as in docker --memory."""
    if isinstance(value, bool):
        raise UnitError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise UnitError(f"size must be a non-negative number of bytes, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(value)
    if not match:
        raise UnitError(f"not a size: {value!r} (use bytes or a suffix k, m, g: e.g. 512m)")
    number, suffix, _ = match.groups()
    return int(float(number) * _SIZE_FACTORS[suffix.lower()])


def parse_seconds(value: str | int | float) -> float:
    """'1.5' -> 1.5; must be finite and non-negative."""
    if isinstance(value, bool):
        raise UnitError(f"not a duration: {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UnitError(f"not a number of seconds: {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise UnitError(f"seconds must be a finite non-negative number, got {value!r}")
    return seconds


def parse_count(value: str | int) -> int:
    if isinstance(value, bool):
        raise UnitError(f"not a count: {value!r}")
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UnitError(f"not a whole number: {value!r}") from None
    if count < 0:
        raise UnitError(f"must not be negative, got {value!r}")
    return count


def human_bytes(count: int) -> str:
    """10.2 kB, 101.6 MB: decimal units, as sizes of downloads and layers are usually shown."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"
