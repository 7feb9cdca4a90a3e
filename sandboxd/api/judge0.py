"""(being written)"""

from __future__ import annotations

from aiohttp import web

from sandboxd.api.http import ServiceContext


def add_routes(app: web.Application, context: ServiceContext) -> None:
    pass
