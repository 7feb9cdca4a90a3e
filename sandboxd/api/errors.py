"""Errors as the API reports them: `{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class ApiError(Exception):
    def __init__(self, http_status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message, "details": self.details}}
        return web.Response(status=self.http_status, text=json.dumps(body), content_type="application/json",
                             headers=self.headers)


def invalid(field: str, message: str) -> ApiError:
    """A request that parsed but is not acceptable: 422, naming the field."""
    return ApiError(422, "invalid_request", f"{field}: {message}", {"field": field})
