"""Images and audio: generations and speech take JSON; edits and transcriptions take multipart
uploads, passed through from a spool file with only ``model`` rewritten; speech audio is streamed
to the client as it comes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .. import billing, wire
from ..billing import Usage
from ..config import ModelConfig
from ..relay import AllAttemptsFailed
from ..scope import Target
from ..state import LIVE, Runtime
from ..upstream import Upstream, UpstreamError
from . import passthrough
from .context import WholeResponse, request_info, web_response
from .exchange import CHARS_PER_TOKEN, Exchange, Surface, record, record_unanswered
from .passthrough import CHUNK_BYTES, Reply, Spool

__all__ = [
    "IMAGE_EDITS",
    "IMAGES",
    "SPEECH",
    "TRANSCRIPTIONS",
    "TRANSCRIPTION_RESERVE_SECONDS",
    "copy_body",
    "images_edits",
    "multipart_sender",
    "walk_recorded",
    "images_generations",
    "speech",
    "transcriptions",
    "worst_case_of",
]

IMAGES = Surface("/v1/images/generations", "/images/generations", frozenset({"image"}), False)
IMAGE_EDITS = Surface("/v1/images/edits", "/images/edits", frozenset({"image"}), False)
TRANSCRIPTIONS = Surface(
    "/v1/audio/transcriptions", "/audio/transcriptions", frozenset({"audio"}), False
)
SPEECH = Surface("/v1/audio/speech", "/audio/speech", frozenset({"audio"}), False)

# How one answer's body and the request say what was consumed: (usage, usage_source).
Metering = Callable[[Exchange, Target, dict[str, Any] | None], tuple[Usage, str]]


async def images_generations(request: web.Request) -> web.StreamResponse:
    return await _guarded(request, lambda runtime: _json_call(request, IMAGES, runtime))


async def images_edits(request: web.Request) -> web.StreamResponse:
    return await _guarded(request, lambda runtime: _multipart_call(request, IMAGE_EDITS, runtime))


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _guarded(
        request, lambda runtime: _multipart_call(request, TRANSCRIPTIONS, runtime)
    )


async def speech(request: web.Request) -> web.StreamResponse:
    return await _guarded(request, lambda runtime: _speech(request, runtime))


async def _guarded(
    request: web.Request, serve: Callable[[Runtime], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    runtime = request.app[LIVE].current
    runtime.enter()
    try:
        async with runtime.cap:
            runtime.bucket.take()
            return await serve(runtime)
    finally:
        runtime.leave()


async def _json_exchange(request: web.Request, surface: Surface, runtime: Runtime) -> Exchange:
    raw = await request.read()
    body = wire.parse_object(raw)
    return passthrough.prepare(
        request.headers,
        request_info(request),
        surface,
        runtime,
        body,
        wire.model_of(body),
        max(1, len(raw) // CHARS_PER_TOKEN),
    )


async def _json_call(request: web.Request, surface: Surface, runtime: Runtime) -> web.Response:
    exchange = await _json_exchange(request, surface, runtime)

    async def send(upstream: Upstream, target: Target) -> aiohttp.ClientResponse:
        body = orjson.dumps({**exchange.body, "model": target.upstream_model})
        return await upstream.send(
            "POST", surface.upstream_path, body, headers={"Content-Type": wire.JSON_TYPE}
        )

    return await _complete(exchange, send, json=True)


async def _multipart_call(request: web.Request, surface: Surface, runtime: Runtime) -> web.Response:
    spool = await passthrough.spool_multipart(
        request, runtime.settings.server.max_body_bytes, passthrough.spool_folder(runtime)
    )
    try:
        exchange = passthrough.prepare(
            request.headers,
            request_info(request),
            surface,
            runtime,
            dict(spool.fields),
            passthrough.require_model(spool),
            max(1, len(spool.fields.get("prompt", "")) // CHARS_PER_TOKEN),
        )
        return await _complete(exchange, multipart_sender(surface.upstream_path, spool), json=False)
    finally:
        spool.close()


def multipart_sender(path: str, spool: Spool) -> passthrough.Send[aiohttp.ClientResponse]:
    async def send(upstream: Upstream, target: Target) -> aiohttp.ClientResponse:
        return await upstream.send(
            "POST",
            path,
            spool.body(target.upstream_model),
            headers=spool.headers(target.upstream_model),
        )

    return send


async def _complete(
    exchange: Exchange, send: passthrough.Send[aiohttp.ClientResponse], *, json: bool
) -> web.Response:
    timeout_s = exchange.runtime.settings.routing.idle_timeout_s

    async def settle(target: Target, response: aiohttp.ClientResponse) -> Reply:
        return await passthrough.read_reply(target, response, timeout_s=timeout_s, json=json)

    with passthrough.budgeted(exchange, **worst_case_of(exchange)):
        reply = await walk_recorded(exchange, send, settle)
        return await respond_reply(exchange, reply, _METERS[exchange.surface.endpoint])


# A transcription's audio length is unknown until the provider has decoded it (we do not parse
# audio files), so a budget reservation assumes this many seconds; the line bills what is reported.
TRANSCRIPTION_RESERVE_SECONDS = Decimal(600)


def _count_of(value: object) -> int:
    """``n`` from JSON (an int) or a form field (a string); 1 when absent or not a count."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def worst_case_of(exchange: Exchange) -> dict[str, Any]:
    """The usage a budget reservation assumes for one media request, by surface."""
    endpoint = exchange.surface.endpoint
    if endpoint in (IMAGES.endpoint, IMAGE_EDITS.endpoint):
        return {"images": _count_of(exchange.body.get("n"))}
    if endpoint == TRANSCRIPTIONS.endpoint:
        return {"seconds": TRANSCRIPTION_RESERVE_SECONDS}
    if endpoint == SPEECH.endpoint:
        text = exchange.body.get("input")
        return {"characters": len(text) if isinstance(text, str) else 0}
    return {}


async def walk_recorded(
    exchange: Exchange,
    send: passthrough.Send[passthrough.R],
    settle: Callable[[Target, passthrough.R], Awaitable[Any]],
) -> Any:
    try:
        return await passthrough.walk(exchange, send, settle)
    except AllAttemptsFailed as exc:
        await record_unanswered(exchange, exc.status, "upstream_failed")
        raise
    except asyncio.CancelledError:
        trail = exchange.trail
        if trail.current is not None and not exchange.recorded:
            if len(trail.attempts) == 0 or trail.attempts[-1].provider != trail.current.provider:
                trail.end(None, "client cancelled")
            await asyncio.shield(record_unanswered(exchange, 499, "client_cancelled"))
        raise


async def respond_reply(exchange: Exchange, reply: Reply, meter: Metering) -> web.Response:
    """Record the answer's ledger line, then send it with the sidecar's headers."""
    return web_response(await whole_reply(exchange, reply, meter))


async def whole_reply(exchange: Exchange, reply: Reply, meter: Metering) -> WholeResponse:
    """``respond_reply`` for a request whichever front read it."""
    target = reply.target
    if reply.passed_back:
        usage, source, cost, outcome = Usage(), "none", billing.ZERO, "upstream_error"
    else:
        usage, source = meter(exchange, target, reply.body)
        cost = billing.cost(usage, target.spec, exchange.runtime.fee_rate)
        outcome = "ok"
        exchange.spent = cost.total
    attempts = exchange.trail.attempts
    total_usd = await record(exchange, target, attempts, reply.status, outcome, usage, source, cost)
    headers = exchange.base_headers(target, len(attempts), "bypass")
    if not reply.passed_back:
        headers["X-TokenHub-Cost-USD"] = total_usd
    exchange.info.status = reply.status
    return WholeResponse(reply.status, headers, reply.raw, wire.mime_type(reply.content_type))


def _token_usage(body: dict[str, Any] | None) -> Usage | None:
    return billing.usage_from_openai(body.get("usage")) if body else None


def image_usage(
    exchange: Exchange, target: Target, body: dict[str, Any] | None
) -> tuple[Usage, str]:
    """Images are counted from ``data``; token usage (gpt-image) is kept when reported."""
    data = body.get("data") if body else None
    images = len(data) if isinstance(data, list) else 0
    tokens = _token_usage(body) or Usage()
    usage = Usage(
        input_tokens=tokens.input_tokens,
        output_tokens=tokens.output_tokens,
        cached_tokens=tokens.cached_tokens,
        images=images,
    )
    return usage, "reported"


def transcription_usage(
    exchange: Exchange, target: Target, body: dict[str, Any] | None
) -> tuple[Usage, str]:
    """``usage`` of type tokens or duration; else a verbose_json ``duration``; else none."""
    reported = _token_usage(body)
    if reported is not None and (
        reported.seconds or reported.input_tokens or reported.output_tokens
    ):
        return reported, "reported"
    duration = body.get("duration") if body else None
    if isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0:
        return Usage(seconds=Decimal(str(duration))), "reported"
    return Usage(), "none"


def speech_usage(exchange: Exchange, spec: ModelConfig) -> tuple[Usage, str]:
    """Speech reports no usage: characters are counted; tokens, if priced, are estimated."""
    text = exchange.body.get("input")
    characters = len(text) if isinstance(text, str) else 0
    if spec.input_per_mtok is None:
        return Usage(characters=characters), "reported"
    return (
        Usage(characters=characters, input_tokens=math.ceil(characters / CHARS_PER_TOKEN)),
        "estimated",
    )


_METERS: dict[str, Metering] = {
    IMAGES.endpoint: image_usage,
    IMAGE_EDITS.endpoint: image_usage,
    TRANSCRIPTIONS.endpoint: transcription_usage,
}


async def _speech(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    exchange = await _json_exchange(request, SPEECH, runtime)

    async def send(upstream: Upstream, target: Target) -> aiohttp.ClientResponse:
        body = orjson.dumps({**exchange.body, "model": target.upstream_model})
        return await upstream.send(
            "POST",
            SPEECH.upstream_path,
            body,
            headers={"Content-Type": wire.JSON_TYPE, "Accept": "*/*"},
        )

    timeout_s = runtime.settings.routing.idle_timeout_s

    async def settle(
        target: Target, response: aiohttp.ClientResponse
    ) -> Reply | tuple[Target, aiohttp.ClientResponse]:
        if response.status >= 400:
            return await passthrough.read_reply(target, response, timeout_s=timeout_s, json=False)
        return target, response

    with passthrough.budgeted(exchange, **worst_case_of(exchange)):
        answer = await walk_recorded(exchange, send, settle)
        if isinstance(answer, Reply):
            return await respond_reply(exchange, answer, transcription_usage)
        target, response = answer
        return await stream_binary(request, exchange, target, response)


async def stream_binary(
    request: web.Request, exchange: Exchange, target: Target, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Forward a binary body chunk by chunk; the ledger line goes out before the last byte."""
    usage, source = speech_usage(exchange, target.spec)
    cost = billing.cost(usage, target.spec, exchange.runtime.fee_rate)
    attempts = exchange.trail.attempts
    response = web.StreamResponse(headers=exchange.base_headers(target, len(attempts), "bypass"))
    response.content_type = upstream.headers.get("Content-Type", "application/octet-stream")
    exchange.info.status = 200
    timeout_s = exchange.runtime.settings.routing.idle_timeout_s
    try:
        await response.prepare(request)
        async with upstream:
            await copy_body(upstream, response, timeout_s)
    except UpstreamError as exc:
        attempts[-1].reason = exc.reason
        await record(
            exchange,
            target,
            attempts,
            200,
            "stream_cut",
            usage,
            source,
            billing.ZERO,
            estimated=cost.total,
        )
        if request.transport is not None:
            request.transport.close()  # no clean end: the client must see the audio is cut
        return response
    except (ConnectionError, asyncio.CancelledError):
        await asyncio.shield(
            record(
                exchange,
                target,
                attempts,
                200,
                "client_cancelled",
                usage,
                source,
                billing.ZERO,
                estimated=cost.total,
            )
        )
        raise
    exchange.spent = cost.total
    await record(exchange, target, attempts, 200, "ok", usage, source, cost)
    await response.write_eof()
    return response


async def copy_body(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    timeout_s: float,
    *,
    before_last: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Forward the body; ``before_last`` runs before the last chunk goes out, so with a
    Content-Length the client cannot have the whole body before it (the ledger line) is done."""
    held = b""
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await upstream.content.read(CHUNK_BYTES)
        except TimeoutError:
            raise UpstreamError(f"no data within {timeout_s:g}s") from None
        except (aiohttp.ClientError, ConnectionResetError) as exc:
            raise UpstreamError(f"stream cut: {type(exc).__name__}") from None
        if not chunk:
            break
        if held:
            await response.write(held)
        held = chunk
    if before_last is not None:
        await before_last()
    if held:
        await response.write(held)
