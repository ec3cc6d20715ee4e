"""The model endpoints that speak JSON in and JSON or SSE out: chat, completions, embeddings.

Each request reads like a recipe: parse -> scope -> limits -> cache -> relay -> record -> respond.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from .. import billing, routing, wire
from ..billing import Cost, Usage
from ..budget import Reservation
from ..cache import CachedAnswer, Decision, directive
from ..errors import LedgerUnavailable, SidecarError
from ..relay import AllAttemptsFailed, Answer, Attempt, OpenStream, Trail
from ..replay import StreamAssembler, replay_chunks
from ..scope import Scope, Target, parse_narrowing
from ..state import LIVE, Runtime
from ..upstream import UpstreamError
from .context import RequestInfo, request_info


@dataclass(frozen=True, slots=True)
class Surface:
    """One OpenAI endpoint: where it goes upstream and which models fit it."""

    endpoint: str
    upstream_path: str
    kinds: frozenset[str]
    streams: bool


# A JSON body carries about four bytes per token: good enough to estimate a cut stream's input.
BYTES_PER_TOKEN = 4
CHARS_PER_TOKEN = 4

CHAT = Surface("/v1/chat/completions", "/chat/completions", frozenset({"chat"}), True)
COMPLETIONS = Surface("/v1/completions", "/completions", frozenset({"chat"}), True)
EMBEDDINGS = Surface("/v1/embeddings", "/embeddings", frozenset({"embedding"}), False)


@dataclass(slots=True)
class Exchange:
    """One request's working state, from parse to ledger line."""

    surface: Surface
    runtime: Runtime
    info: RequestInfo
    body: dict[str, Any]
    requested: str
    stream: bool
    scope: Scope
    plan: list[Target]
    decision: Decision
    cache_key: str | None
    started: float
    input_estimate: int
    trail: Trail = field(default_factory=Trail)
    spent: Decimal = Decimal(0)

    def base_headers(self, target: Target, attempts: int, cache: str) -> dict[str, str]:
        self.info.provider = target.provider
        self.info.model = target.model
        self.info.attempts = attempts
        return {
            "X-TokenHub-Provider": target.provider,
            "X-TokenHub-Attempts": str(attempts),
            "X-TokenHub-Cache": cache,
            "X-TokenHub-Route": route_reason(self, target, attempts),
        }

    @property
    def cache_header(self) -> str:
        return "miss" if self.decision.lookup else "bypass"


def route_reason(exchange: Exchange, target: Target, attempts: int) -> str:
    scope = exchange.scope
    if scope.pinned:
        why = f"pinned by {exchange.requested}"
    elif scope.preferred:
        why = "first healthy in X-TokenHub-Providers order"
    elif exchange.runtime.settings.routing.sticky and len({t.provider for t in scope.targets}) > 1:
        why = "sticky choice for the affinity key among healthy providers"
    else:
        why = "first healthy provider in config order"
    if attempts > 1:
        why += f", after {attempts - 1} failed attempt{'s' if attempts > 2 else ''}"
    return f"{target.provider} ({target.region}) serves {target.model}: {why}"


async def handle(request: web.Request, surface: Surface) -> web.StreamResponse:
    runtime = request.app[LIVE].current
    runtime.enter()
    try:
        exchange = await _prepare(request, surface, runtime)
        reservation = _reserve(exchange)
        try:
            return await _answer(request, exchange)
        finally:
            if reservation is not None:
                runtime.budget.settle(reservation, exchange.spent)
    finally:
        runtime.leave()


async def _prepare(request: web.Request, surface: Surface, runtime: Runtime) -> Exchange:
    info = request_info(request)
    runtime.bucket.take()
    raw = await request.read()
    body = wire.parse_object(raw)
    requested = wire.model_of(body)
    info.requested = requested
    stream = surface.streams and wire.wants_stream(body)
    settings = runtime.settings
    headers = request.headers
    narrowing = parse_narrowing(
        headers.get("X-TokenHub-Regions"), headers.get("X-TokenHub-Providers"), settings
    )
    scope = runtime.catalog.resolve(requested, narrowing, kinds=surface.kinds)
    plan = routing.plan(
        scope,
        runtime.health,
        affinity=routing.affinity_key(headers.get("X-TokenHub-Affinity"), body),
        sticky=settings.routing.sticky,
        max_providers=settings.routing.max_providers,
    )
    if not runtime.ledger.available:
        raise LedgerUnavailable(
            "The usage ledger cannot be written (disk full or I/O error), so model requests are "
            "refused rather than served unrecorded; free space at the ledger path and retry."
        )
    decision = runtime.cache.decide(
        surface.endpoint, body, directive(headers.get("X-TokenHub-Cache"), headers.get("Cache-Control"))
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


async def _answer(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    """Serve from the cache, or share an identical in-flight call, or go upstream."""
    runtime = exchange.runtime
    key = exchange.cache_key
    if key is None or not exchange.decision.lookup:
        return await _from_upstream(request, exchange)
    hit = runtime.cache.get(key, exchange.scope.allows)
    if hit is not None:
        return await _serve_hit(request, exchange, hit)
    led: web.StreamResponse | None = None
    leading = False

    async def lead() -> CachedAnswer | None:
        nonlocal led, leading
        leading = True
        led = await _from_upstream(request, exchange)
        return runtime.cache.get(key, exchange.scope.allows)

    try:
        shared_answer, shared = await runtime.flights.run(key, lead)
    except (SidecarError, ConnectionError):
        if leading:
            raise
        # The call we waited on failed: this request tries on its own (and gets its own line).
        return await _from_upstream(request, exchange)
    if not shared:
        assert led is not None
        return led
    if shared_answer is not None:
        return await _serve_hit(request, exchange, shared_answer)
    return await _from_upstream(request, exchange)


async def _from_upstream(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    runtime = exchange.runtime
    path = exchange.surface.upstream_path
    trail = exchange.trail
    try:
        if exchange.stream:
            opened = await runtime.relay.open_stream(
                path, exchange.plan, exchange.body, exchange.scope, trail
            )
            if isinstance(opened, OpenStream):
                return await _relay_stream(request, exchange, opened)
            return await _respond_answer(exchange, opened)
        answer = await runtime.relay.call(path, exchange.plan, exchange.body, exchange.scope, trail)
    except AllAttemptsFailed as exc:
        await _record_unanswered(exchange, exc.status, "upstream_failed")
        raise
    except asyncio.CancelledError:
        if trail.current is not None:
            trail.end(None, "client cancelled")
            await asyncio.shield(_record_unanswered(exchange, 499, "client_cancelled"))
        raise
    return await _respond_answer(exchange, answer)


async def _record_unanswered(exchange: Exchange, status: int, outcome: str) -> None:
    """A request that reached an upstream but got no answer still gets its unbilled line."""
    target = exchange.trail.current
    if target is None:
        return
    await _append(
        exchange, target, exchange.trail.attempts, status, outcome, Usage(), "none", billing.ZERO
    )


async def _respond_answer(exchange: Exchange, answer: Answer) -> web.Response:
    usage = billing.usage_from_openai(answer.body.get("usage")) if answer.body else None
    if answer.passed_back:
        outcome, cost = "upstream_error", billing.ZERO
    else:
        outcome = "ok"
        cost = billing.cost(usage or Usage(), answer.target.spec, exchange.runtime.fee_rate)
        exchange.spent = cost.total
    await _append(
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
        headers["X-TokenHub-Cost-USD"] = billing.usd(cost.total)
        if answer.body is not None:
            _store(exchange, answer.target, answer.body)
    exchange.info.status = answer.status
    return web.Response(
        status=answer.status, body=answer.raw, headers=headers, content_type=_mime(answer.content_type)
    )


def _mime(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip() or wire.JSON_TYPE


def _store(exchange: Exchange, target: Target, body: dict[str, Any]) -> None:
    cache = exchange.runtime.cache
    if exchange.cache_key is None or not exchange.decision.store or not cache.storable(body):
        return
    cache.put(
        exchange.cache_key,
        CachedAnswer.build(
            exchange.surface.endpoint,
            body,
            provider=target.provider,
            region=target.region,
            model=target.model,
            upstream_model=target.upstream_model,
        ),
    )


async def _serve_hit(
    request: web.Request, exchange: Exchange, hit: CachedAnswer
) -> web.StreamResponse:
    runtime = exchange.runtime
    target = _target_of(exchange.scope, hit)
    usage = billing.usage_from_openai(hit.body.get("usage")) or Usage()
    would_cost = billing.cost(usage, target.spec, runtime.fee_rate)
    await _append(
        exchange, target, [], 200, "cache_hit", usage, "reported", billing.ZERO, saved=would_cost.total
    )
    headers = exchange.base_headers(target, 0, "hit")
    headers["X-TokenHub-Route"] = f"{target.provider} ({target.region}) answered this before: cache hit"
    exchange.info.status = 200
    if not exchange.stream:
        headers["X-TokenHub-Cost-USD"] = "0"
        return web.Response(body=orjson.dumps(hit.body), headers=headers, content_type=wire.JSON_TYPE)
    response = web.StreamResponse(headers=headers)
    response.content_type = wire.SSE_TYPE
    await response.prepare(request)
    await response.write(b"".join(replay_chunks(hit.body, include_usage=wire.wants_usage(exchange.body))))
    await response.write_eof()
    return response


def _target_of(scope: Scope, hit: CachedAnswer) -> Target:
    for target in scope.targets:
        if target.provider == hit.provider and target.model == hit.model:
            return target
    raise AssertionError("a cache hit outside the scope was served")


async def _relay_stream(
    request: web.Request, exchange: Exchange, stream: OpenStream
) -> web.StreamResponse:
    """Forward a committed stream chunk by chunk; its ledger line goes out before ``[DONE]``."""
    target = stream.target
    client_wants_usage = wire.wants_usage(exchange.body)
    assembler = StreamAssembler() if exchange.decision.store and exchange.cache_key else None
    tally = _StreamTally()
    response = web.StreamResponse(
        headers=exchange.base_headers(target, len(stream.attempts), exchange.cache_header)
    )
    response.content_type = wire.SSE_TYPE
    exchange.info.status = 200
    outcome = "stream_cut"
    try:
        await response.prepare(request)
        for payload, chunk in stream.held:
            await _forward(response, payload, chunk, tally, assembler, client_wants_usage)
        while True:
            try:
                payload = await stream.next_payload()
            except UpstreamError as exc:
                stream.attempts[-1].reason = exc.reason
                break
            if payload is None:
                break
            if payload == b"[DONE]":
                outcome = "ok"
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                stream.attempts[-1].reason = "stream event is not JSON"
                break
            if not isinstance(chunk, dict) or "error" in chunk:
                stream.attempts[-1].reason = "error event after content"
                break
            await _forward(response, payload, chunk, tally, assembler, client_wants_usage)
        stream.close()
        await _finish_stream(exchange, stream, response, outcome, tally, assembler)
    except (ConnectionError, asyncio.CancelledError):
        stream.close()
        await asyncio.shield(_record_stream(exchange, stream, "client_cancelled", tally))
        raise
    return response


@dataclass(slots=True)
class _StreamTally:
    usage: Usage | None = None
    output_chars: int = 0


async def _forward(
    response: web.StreamResponse,
    payload: bytes,
    chunk: dict[str, Any],
    tally: _StreamTally,
    assembler: StreamAssembler | None,
    client_wants_usage: bool,
) -> None:
    if assembler is not None:
        assembler.feed(chunk)
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            tally.output_chars += len(delta["content"])
        elif isinstance(choice, dict) and isinstance(choice.get("text"), str):
            tally.output_chars += len(choice["text"])
    reported = chunk.get("usage")
    if reported:
        tally.usage = billing.usage_from_openai(reported)
        if not client_wants_usage:
            if not chunk.get("choices"):
                return
            payload = orjson.dumps({k: v for k, v in chunk.items() if k != "usage"})
    await response.write(b"data: " + payload + b"\n\n")


async def _finish_stream(
    exchange: Exchange,
    stream: OpenStream,
    response: web.StreamResponse,
    outcome: str,
    tally: _StreamTally,
    assembler: StreamAssembler | None,
) -> None:
    await _record_stream(exchange, stream, outcome, tally)
    if outcome == "ok":
        await response.write(wire.SSE_DONE)
        if assembler is not None:
            completed = assembler.complete()
            if completed is not None:
                _store(exchange, stream.target, completed)
    else:
        await response.write(wire.STREAM_INTERRUPTED)
    await response.write_eof()


async def _record_stream(
    exchange: Exchange,
    stream: OpenStream,
    outcome: str,
    tally: _StreamTally,
) -> None:
    target = stream.target
    if tally.usage is not None:
        usage, source = tally.usage, "reported"
    else:
        usage = Usage(
            input_tokens=exchange.input_estimate,
            output_tokens=-(-tally.output_chars // CHARS_PER_TOKEN),
        )
        source = "estimated"
    cost = billing.cost(usage, target.spec, exchange.runtime.fee_rate)
    if outcome == "ok":
        exchange.spent = cost.total
        await _append(exchange, target, stream.attempts, 200, outcome, usage, source, cost)
    else:
        await _append(
            exchange, target, stream.attempts, 200, outcome, usage, source, billing.ZERO,
            estimated=cost.total,
        )


async def _append(
    exchange: Exchange,
    target: Target,
    attempts: list[Attempt],
    status: int,
    outcome: str,
    usage: Usage,
    usage_source: str,
    cost: Cost,
    *,
    saved: Decimal | None = None,
    estimated: Decimal | None = None,
) -> None:
    runtime = exchange.runtime
    record: dict[str, Any] = {
        "request_id": exchange.info.request_id,
        "endpoint": exchange.surface.endpoint,
        "requested": exchange.requested,
        "model": target.model,
        "provider": target.provider,
        "upstream_model": target.upstream_model,
        "region": target.region,
        "stream": exchange.stream,
        "status": status,
        "outcome": outcome,
        "billable": outcome == "ok",
        "attempts": [a.ledger_fields() for a in attempts],
        "usage": usage.ledger_fields(),
        "usage_source": usage_source,
        "model_fee_usd": billing.usd(cost.model_fee),
        "service_fee_usd": billing.usd(cost.service_fee),
        "total_usd": billing.usd(cost.total),
        "saved_usd": billing.usd(saved or Decimal(0)),
        "latency_ms": int((time.monotonic() - exchange.started) * 1000),
    }
    if estimated is not None and outcome != "ok":
        record["estimated_usd"] = billing.usd(estimated)
    await runtime.ledger.append(record)
    runtime.metrics.add_spend(target.provider, target.model, cost.total)
    if saved:
        runtime.metrics.add_saved(target.model, saved)

