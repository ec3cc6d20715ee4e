"""``POST /v1/responses``: routed on ``model`` like chat. A non-stream call takes the chat
pipeline as is (its ``usage`` shape is read by billing); a stream has typed events, so its commit
point and its usage (the ``response.completed`` event) are handled here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .. import billing, wire
from ..billing import Usage
from ..h1 import H1Response
from ..relay import OpenStream
from ..scope import Target
from ..upstream import Upstream, UpstreamError
from . import model, passthrough
from .context import Incoming, Outlet, WholeResponse, on_aiohttp
from .exchange import BYTES_PER_TOKEN, Exchange, StreamTally, Surface, record_stream_end
from .media import walk_recorded, whole_reply
from .passthrough import Reply

__all__ = ["RESPONSES", "handle", "serve"]

RESPONSES = Surface("/v1/responses", "/responses", frozenset({"chat"}), True)

# Events before anything a user sees: held back, so the stream can still fail over.
_PREAMBLE = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.output_item.added",
        "response.content_part.added",
    }
)
_FINAL = frozenset({"response.completed", "response.incomplete"})


async def handle(request: web.Request) -> web.StreamResponse:
    """The aiohttp route."""
    return await on_aiohttp(request, serve)


async def serve(incoming: Incoming, outlet: Outlet) -> WholeResponse | None:
    """Answer one Responses call: whole (returned), or streamed through ``outlet`` (None)."""
    body = wire.parse_object(incoming.body)
    if not wire.wants_stream(body):
        return await model.serve(incoming, outlet, RESPONSES, body)
    runtime = incoming.runtime
    runtime.enter()
    try:
        async with runtime.cap:
            runtime.bucket.take()
            return await _stream(incoming, outlet, body)
    finally:
        runtime.leave()


_Event = tuple[bytes, dict[str, Any]]  # the upstream's data bytes, and what they parse to


class _Opened:
    """An upstream stream read through the relay's ``OpenStream`` (so it shares the relay's
    idle clock and limits), with the events held before its commit point."""

    def __init__(self, stream: OpenStream) -> None:
        self.stream = stream
        self.held: list[_Event] = []

    @property
    def target(self) -> Target:
        return self.stream.target

    @property
    def has_buffered(self) -> bool:
        """True when ``next_event`` can answer from what was already read, without waiting."""
        return any(payload != b"[DONE]" for payload in self.stream.pending)

    async def next_event(self) -> _Event | None:
        """The next event (None at the end of the body); UpstreamError on a stall or cut."""
        while (payload := await self.stream.next_payload()) is not None:
            if payload == b"[DONE]":
                continue
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamError("stream event is not JSON") from None
            if not isinstance(event, dict):
                raise UpstreamError("stream event is not a JSON object")
            return payload, event
        return None


def is_content(event: dict[str, Any]) -> bool:
    return event.get("type") not in _PREAMBLE


async def _stream(incoming: Incoming, outlet: Outlet, body: dict[str, Any]) -> WholeResponse | None:
    runtime = incoming.runtime
    exchange = passthrough.prepare(
        incoming.headers,
        incoming.info,
        RESPONSES,
        runtime,
        body,
        wire.model_of(body),
        max(1, len(orjson.dumps(body)) // BYTES_PER_TOKEN),
    )
    exchange.stream = True
    settings = runtime.settings.routing

    async def send(upstream: Upstream, target: Target) -> H1Response:
        upstream_body = orjson.dumps({**body, "model": target.upstream_model})
        return await upstream.post(RESPONSES.upstream_path, upstream_body, stream=True)

    async def settle(target: Target, response: H1Response) -> Reply | _Opened:
        if response.status >= 400:
            return await passthrough.read_reply(
                target, response, timeout_s=settings.idle_timeout_s, json=False
            )
        if not response.headers.get("Content-Type", "").startswith(wire.SSE_TYPE):
            raise UpstreamError("stream is not SSE")
        opened = _Opened(runtime.relay.reader(target, response, exchange.trail.attempts))
        await _until_content(opened, settings.first_token_timeout_s)
        runtime.relay.watch_idle(opened.stream)
        return opened

    with passthrough.budgeted(exchange):  # worst case: max_output_tokens, as for chat
        answer = await walk_recorded(exchange, send, settle)
        if isinstance(answer, Reply):
            return await whole_reply(exchange, answer, lambda *_: (Usage(), "none"))
        await _forward(outlet, exchange, answer)
        return None


async def _until_content(opened: _Opened, timeout_s: float) -> None:
    """Hold the preamble events until one a user sees; one deadline for the whole phase."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                got = await opened.next_event()
                if got is None:
                    raise UpstreamError("stream ended before any content")
                event = got[1]
                if event.get("type") in ("error", "response.failed"):
                    raise UpstreamError("error event before any content")
                opened.held.append(got)
                if is_content(event):
                    return
    except TimeoutError:
        raise UpstreamError(f"no content within {timeout_s:g}s") from None


async def _forward(outlet: Outlet, exchange: Exchange, opened: _Opened) -> None:
    """Send the held events, then the rest, as the upstream wrote them (one write per read);
    the ledger line goes out before the last event."""
    target = opened.target
    attempts = exchange.trail.attempts
    headers = exchange.base_headers(target, len(attempts), "bypass")
    exchange.info.status = 200
    tally = StreamTally()
    try:
        await outlet.start_stream(headers)
        batch = [_outgoing(payload, event, tally) for payload, event in opened.held]
        outcome = "stream_cut"
        while True:
            if batch and not opened.has_buffered:
                await outlet.write(b"".join(batch))
                batch.clear()
            try:
                got = await opened.next_event()
            except UpstreamError as exc:
                attempts[-1].reason = exc.reason
                break
            if got is None:
                attempts[-1].reason = "stream ended without response.completed"
                break
            payload, event = got
            batch.append(_outgoing(payload, event, tally))  # sent after the line, if it is last
            kind = event.get("type")
            if kind in _FINAL:
                outcome = "ok"
                await _record(exchange, target, outcome, tally)
                break
            if kind in ("error", "response.failed"):
                attempts[-1].reason = "error event after content"
                break
        opened.stream.close()
        if outcome != "ok":
            await _record(exchange, target, outcome, tally)
            batch.append(_interrupted())
        await outlet.write_eof(b"".join(batch))
    except (ConnectionError, asyncio.CancelledError):
        opened.stream.close()
        if not exchange.recorded:
            await asyncio.shield(_record(exchange, target, "client_cancelled", tally))
        raise


def _see(tally: StreamTally, event: dict[str, Any]) -> None:
    if event.get("type") == "response.output_text.delta" and isinstance(event.get("delta"), str):
        tally.output_chars += len(event["delta"])
    inner = event.get("response")
    if isinstance(inner, dict) and inner.get("usage"):
        tally.usage = billing.usage_from_openai(inner.get("usage"))


def _outgoing(payload: bytes, event: dict[str, Any], tally: StreamTally) -> bytes:
    """One SSE event as the client gets it: ``event: <type>`` (as OpenAI sends), then the data."""
    _see(tally, event)
    kind = event.get("type")
    head = f"event: {kind}\n".encode() if isinstance(kind, str) and "\n" not in kind else b""
    return head + wire.sse_data(payload)


def _interrupted() -> bytes:
    error = {
        "type": "error",
        "code": "stream_interrupted",
        "message": "upstream stream interrupted; the answer above is incomplete, retry the request",
        "param": None,
    }
    return b"event: error\ndata: " + orjson.dumps({**error, "error": error}) + b"\n\n"


async def _record(exchange: Exchange, target: Target, outcome: str, tally: StreamTally) -> None:
    await record_stream_end(exchange, target, exchange.trail.attempts, outcome, tally)
