"""Operator endpoints under ``/-/`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .. import routing, wire
from ..scope import parse_narrowing
from ..state import LIVE
from .exchange import cache_gauges


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=wire.JSON_TYPE)


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    runtime = request.app[LIVE].current
    if not runtime.ledger.available:
        return _json({"status": "unavailable", "reason": "the ledger cannot be written"}, 503)
    return _json({"status": "ready", "providers": len(runtime.upstreams)})


async def providers(request: web.Request) -> web.Response:
    return _json({"providers": request.app[LIVE].current.health.snapshot()})


async def route(request: web.Request) -> web.Response:
    """Dry run: which providers this request would try, in order, and why the others not."""
    runtime = request.app[LIVE].current
    body = wire.parse_object(await request.read())
    requested = wire.model_of(body)
    headers = request.headers
    narrowing = parse_narrowing(
        headers.get("X-TokenHub-Regions"), headers.get("X-TokenHub-Providers"), runtime.settings
    )
    scope = runtime.catalog.resolve(requested, narrowing)
    return _json(
        routing.dry_run(
            scope,
            runtime.health,
            affinity=routing.affinity_key(headers.get("X-TokenHub-Affinity"), body),
            sticky=runtime.settings.routing.sticky,
            max_providers=runtime.settings.routing.max_providers,
        )
    )


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[LIVE].current
    # A reload swaps in a new (empty) cache, so the gauges follow the current one at each scrape.
    cache_gauges(runtime.metrics, runtime.cache.stats)
    body, content_type = runtime.metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
