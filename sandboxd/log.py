"""Structured logs: one JSON object per line on stderr (structlog)."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from typing import Any

import structlog


def configure_logging(level: str = "info") -> structlog.typing.FilteringBoundLogger:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("sandboxd")


def info_soon(log: Any, event: str, **fields: Any) -> None:
    """Log on the event loop's next turn: what a request or job is waiting for (an answer, an
    order to the launcher) goes out before the line is rendered and written."""
    asyncio.get_running_loop().call_soon(functools.partial(log.info, event, **fields))
