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
from ..relay import OpenStream, event_object
from ..scope import Target
from ..upstream import Upstream, UpstreamError
from . import model, passthrough, streaming
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
_ERRORS = frozenset({"error", "response.failed"})


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

    async def next_event(self) -> _Event | None:
        """The next event (None at the end of the body); UpstreamError on a stall or cut."""
        while (payload := await self.stream.next_payload()) is not None:
            if payload != b"[DONE]":
                return payload, event_object(payload)
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
                if event.get("type") in _ERRORS:
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
    headers = exchange.base_headers(target, len(exchange.trail.attempts), "bypass")
    exchange.info.status = 200
    tally = StreamTally()
    try:
        await outlet.start_stream(headers)
        batch = [_outgoing(payload, event, tally) for payload, event in opened.held]
        outcome = await streaming.forward(outlet, _Events(opened.stream, tally), batch)
        await _record(exchange, target, outcome, tally)
        if outcome != "ok":
            batch.append(_interrupted())
        await outlet.write_eof(b"".join(batch))
    except (ConnectionError, asyncio.CancelledError):
        opened.stream.close()
        if not exchange.recorded:
            await asyncio.shield(_record(exchange, target, "client_cancelled", tally))
        raise


class _Events:
    """What a Responses stream's typed events mean to ``streaming.forward``: it ends well at
    ``response.completed`` (or ``.incomplete``), which goes out after the ledger line."""

    __slots__ = ("stream", "tally")

    def __init__(self, stream: OpenStream, tally: StreamTally) -> None:
        self.stream = stream
        self.tally = tally

    def relay(self, payload: bytes, batch: list[bytes]) -> str | None:
        if payload == b"[DONE]":
            return None
        try:
            event = event_object(payload)
        except UpstreamError as exc:
            return self.cut(exc.reason)
        batch.append(_outgoing(payload, event, self.tally))
        kind = event.get("type")
        if kind in _FINAL:
            return "ok"
        if kind in _ERRORS:
            return self.cut("error event after content")
        return None

    def cut(self, reason: str) -> str:
        self.stream.attempts[-1].reason = reason
        return "stream_cut"

    def unfinished(self) -> str:
        return self.cut("stream ended without response.completed")


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
