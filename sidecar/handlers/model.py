"""The model endpoints that speak JSON in and JSON or SSE out: chat, completions, embeddings.

Each request reads like a recipe: parse -> scope -> limits -> cache -> relay -> record -> respond.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from .. import billing, routing, wire
from ..billing import Usage
from ..budget import Reservation
from ..cache import CachedAnswer, directive
from ..errors import SidecarError
from ..relay import AllAttemptsFailed, Answer, OpenStream
from ..replay import replay_chunks
from ..scope import Scope, Target, parse_narrowing
from .context import Incoming, Outlet, WholeResponse, on_aiohttp
from .exchange import (
    BYTES_PER_TOKEN,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Exchange,
    Surface,
    ensure_ledger,
    record,
    record_unanswered,
    store_answer,
)
from .streaming import ChatStream

__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "handle", "serve"]


async def handle(request: web.Request, surface: Surface) -> web.StreamResponse:
    """The aiohttp route for a model endpoint."""
    return await on_aiohttp(request, partial(serve, surface=surface))


async def serve(
    incoming: Incoming, outlet: Outlet, surface: Surface, parsed: dict[str, Any] | None = None
) -> WholeResponse | None:
    """Answer one model request: whole (returned), or streamed through ``outlet`` (None).
    ``parsed``: the body, if the caller has parsed it already."""
    runtime = incoming.runtime
    runtime.enter()
    cap = runtime.cap
    try:
        if not cap.try_enter():
            await cap.wait_turn()
        try:
            exchange = _prepare(incoming, surface, parsed)
            reservation = _reserve(exchange)
            try:
                if exchange.cache_key is None or not exchange.decision.lookup:
                    _count_cache(exchange, "bypass")
                    return await _from_upstream(outlet, exchange)
                return await _answer(outlet, exchange)
            finally:
                if reservation is not None:
                    runtime.budget.settle(reservation, exchange.spent)
        finally:
            cap.leave()
    finally:
        runtime.leave()


def _prepare(incoming: Incoming, surface: Surface, parsed: dict[str, Any] | None) -> Exchange:
    info = incoming.info
    runtime = incoming.runtime
    runtime.bucket.take()
    raw = incoming.body
    body = wire.parse_object(raw) if parsed is None else parsed
    requested = wire.model_of(body)
    info.requested = requested
    wire.reject_redirecting_fields(body)
    stream = surface.streams and wire.wants_stream(body)
    settings = runtime.settings
    headers = incoming.headers
    narrowing = parse_narrowing(
        headers.get("X-TokenHub-Regions"), headers.get("X-TokenHub-Providers"), settings
    )
    scope = runtime.catalog.resolve(requested, narrowing, kinds=surface.kinds)
    sticky = settings.routing.sticky
    affinity = (
        routing.affinity_key(headers.get("X-TokenHub-Affinity"), body)
        if routing.needs_affinity(scope, sticky=sticky)
        else ""
    )
    plan = routing.plan(
        scope,
        runtime.health,
        affinity=affinity,
        sticky=sticky,
        max_providers=settings.routing.max_providers,
    )
    ensure_ledger(runtime)
    decision = runtime.cache.decide(
        surface.endpoint,
        body,
        directive(headers.get("X-TokenHub-Cache"), headers.get("Cache-Control")),
    )
    cache_key = (
        runtime.cache.key(surface.endpoint, body, scope.key, info.client_token_id)
        if decision.lookup or decision.store
        else None
    )
    return Exchange(
        surface,
        runtime,
        info,
        body,
        requested,
        stream,
        scope,
        plan,
        decision,
        cache_key,
        info.started,
        input_estimate=max(1, len(raw) // BYTES_PER_TOKEN),
    )


def _reserve(exchange: Exchange) -> Reservation | None:
    """Budget caps hold under concurrency because each request reserves its worst case first."""
    runtime = exchange.runtime
    caps = runtime.settings.budget
    if caps.daily_usd is None and caps.monthly_usd is None:
        return None
    max_tokens = wire.max_tokens_of(exchange.body)
    worst = max(
        billing.worst_case(
            t.spec, runtime.fee_rate, input_tokens=exchange.input_estimate, max_tokens=max_tokens
        )
        for t in exchange.plan
    )
    return runtime.budget.reserve(worst)


async def _answer(outlet: Outlet, exchange: Exchange) -> WholeResponse | None:
    """Serve from the cache, or share an identical in-flight call, or go upstream."""
    runtime = exchange.runtime
    key = exchange.cache_key
    assert key is not None
    hit = runtime.cache.get(key, exchange.scope.allows)
    if hit is not None:
        return await _serve_hit(outlet, exchange, hit)
    led: WholeResponse | None = None
    leading = False

    async def lead() -> CachedAnswer | None:
        nonlocal led, leading
        leading = True
        _count_cache(exchange, "miss")
        led = await _from_upstream(outlet, exchange)
        return runtime.cache.peek(key, exchange.scope.allows)

    try:
        shared_answer, shared = await runtime.flights.run(key, lead)
    except (SidecarError, ConnectionError):
        if leading:
            raise
        # The call we waited on failed: this request tries on its own (and gets its own line).
        _count_cache(exchange, "miss")
        return await _from_upstream(outlet, exchange)
    if not shared:
        return led
    if shared_answer is not None:
        return await _serve_hit(outlet, exchange, shared_answer)
    _count_cache(exchange, "miss")
    return await _from_upstream(outlet, exchange)


def _count_cache(exchange: Exchange, result: str) -> None:
    """Each request counts once, with the ``X-TokenHub-Cache`` value it is answered with."""
    exchange.info.cache = result
    exchange.runtime.metrics.count_cache(result)


async def _from_upstream(outlet: Outlet, exchange: Exchange) -> WholeResponse | None:
    runtime = exchange.runtime
    path = exchange.surface.upstream_path
    trail = exchange.trail
    try:
        if exchange.stream:
            streamed = ChatStream(outlet, exchange)
            try:
                opened = await runtime.relay.open_stream(
                    path, exchange.plan, exchange.body, exchange.scope, trail, streamed.on_commit
                )
            except (ConnectionError, asyncio.CancelledError):
                if streamed.began:  # the client went away as the answer began, in the callback
                    await streamed.abandon()
                raise
            if isinstance(opened, OpenStream):
                await streamed.relay(opened)
                return None
            return await _respond_answer(exchange, opened)
        answer = await runtime.relay.call(path, exchange.plan, exchange.body, exchange.scope, trail)
    except AllAttemptsFailed as exc:
        exchange.info.attempts = len(trail.attempts)
        await record_unanswered(exchange, exc.status, "upstream_failed")
        raise
    except asyncio.CancelledError:
        if trail.current is not None and not exchange.recorded:
            trail.end(None, "client cancelled")
            await asyncio.shield(record_unanswered(exchange, 499, "client_cancelled"))
        raise
    return await _respond_answer(exchange, answer)


async def _respond_answer(exchange: Exchange, answer: Answer) -> WholeResponse:
    usage = billing.usage_from_openai(answer.body.get("usage")) if answer.body else None
    if answer.passed_back:
        outcome, cost = "upstream_error", billing.ZERO
    else:
        outcome = "ok"
        cost = billing.cost(usage or Usage(), answer.target.spec, exchange.runtime.fee_rate)
        exchange.spent = cost.total
    total_usd = await record(
        exchange,
        answer.target,
        answer.attempts,
        answer.status,
        outcome,
        usage or Usage(),
        "reported" if usage else "none",
        cost,
    )
    headers = exchange.base_headers(answer.target, len(answer.attempts), exchange.cache_header)
    if not answer.passed_back:
        headers["X-TokenHub-Cost-USD"] = total_usd
        if answer.body is not None:
            store_answer(exchange, answer.target, answer.body)
    exchange.info.status = answer.status
    return WholeResponse(answer.status, headers, answer.raw, wire.mime_type(answer.content_type))


async def _serve_hit(outlet: Outlet, exchange: Exchange, hit: CachedAnswer) -> WholeResponse | None:
    runtime = exchange.runtime
    _count_cache(exchange, "hit")
    target = _target_of(exchange.scope, hit)
    usage = billing.usage_from_openai(hit.body.get("usage")) or Usage()
    would_cost = billing.cost(usage, target.spec, runtime.fee_rate)
    await record(
        exchange,
        target,
        [],
        200,
        "cache_hit",
        usage,
        "reported",
        billing.ZERO,
        saved=would_cost.total,
    )
    headers = exchange.base_headers(target, 0, "hit")
    headers["X-TokenHub-Route"] = (
        f"{target.provider} ({target.region}) answered this before: cache hit"
    )
    exchange.info.status = 200
    if not exchange.stream:
        headers["X-TokenHub-Cost-USD"] = "0"
        return WholeResponse(200, headers, orjson.dumps(hit.body), wire.JSON_TYPE)
    await outlet.start_stream(headers)
    await outlet.write_eof(
        b"".join(replay_chunks(hit.body, include_usage=wire.wants_usage(exchange.body)))
    )
    return None


def _target_of(scope: Scope, hit: CachedAnswer) -> Target:
    for target in scope.targets:
        if target.provider == hit.provider and target.model == hit.model:
            return target
    raise AssertionError("a cache hit outside the scope was served")
