"""Forwarding a committed stream chunk by chunk, and its one ledger line before ``[DONE]``.

``forward`` is the relay loop both streaming surfaces share: chat and completions (``_Events``
here) and the Responses API (typed events, in ``responses.py``) differ only in what each event
means, which their ``StreamEvents`` say.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import orjson

from .. import billing, wire
from ..h1 import H1Response
from ..relay import OpenStream
from ..replay import StreamAssembler
from ..upstream import UpstreamError
from .context import Outlet, PushOutlet
from .exchange import Exchange, StreamTally, record_stream_end, store_answer


async def relay_stream(outlet: Outlet, exchange: Exchange, stream: OpenStream) -> None:
    """Forward a committed stream chunk by chunk; its ledger line goes out before ``[DONE]``."""
    events = _Events(exchange, stream)
    headers = exchange.base_headers(stream.target, len(stream.attempts), exchange.cache_header)
    exchange.info.status = 200
    try:
        await outlet.start_stream(headers)
        # Events that came in one read go out in one write: one syscall, not one per event.
        batch: list[bytes] = []
        for held, held_chunk in stream.held:
            out = _outgoing(held, held_chunk, events.tally, events.assembler, events.wants_usage)
            if out is not None:
                batch.append(out)
        outcome = await forward(outlet, events, batch)
        await _finish_stream(exchange, stream, outlet, outcome, events, batch)
    except (ConnectionError, asyncio.CancelledError):
        stream.close()
        if not exchange.recorded:  # a client gone after the line was written keeps that line
            stream.attempts[-1].reason = "client cancelled"
            await asyncio.shield(_record_stream(exchange, stream, "client_cancelled", events.tally))
        raise


class StreamEvents(Protocol):
    """What one committed stream's events mean, for ``forward``."""

    @property
    def stream(self) -> OpenStream: ...

    def relay(self, payload: bytes, batch: list[bytes]) -> str | None:
        """One upstream event: what the client gets of it goes on ``batch``. Returns the
        stream's outcome when it ends here, else None."""

    def cut(self, reason: str) -> str:
        """The outcome of a stream cut for ``reason`` (kept on its attempt)."""

    def unfinished(self) -> str:
        """The outcome of an upstream body that ended before the stream's last event."""


async def forward(outlet: Outlet, events: StreamEvents, batch: list[bytes]) -> str:
    """Relay a committed stream to ``outlet`` until it ends, then let its upstream go (pooled
    when it ended well, dropped otherwise); returns its outcome. What is left on ``batch`` then
    (the last event, when the stream ended well) is for the caller to send after the ledger
    line."""
    stream = events.stream
    pushed = outlet.pushed()
    if pushed is not None:
        outcome = await _push(pushed, stream.response, events, batch)
    else:
        outcome = await _pull(outlet, stream, events, batch)
    if outcome == "ok":
        stream.finish()
    else:
        stream.close()
    return outcome


class _Events:
    """What one stream's events add up to, and what each one sends on."""

    __slots__ = ("stream", "tally", "assembler", "wants_usage")

    def __init__(self, exchange: Exchange, stream: OpenStream) -> None:
        self.stream = stream
        self.tally = StreamTally()
        self.assembler = (
            StreamAssembler() if exchange.decision.store and exchange.cache_key else None
        )
        self.wants_usage = wire.wants_usage(exchange.body)

    def relay(self, payload: bytes, batch: list[bytes]) -> str | None:
        """One upstream event: what the client gets of it goes on ``batch``. Returns the
        stream's outcome when it ends here (``ok`` at ``[DONE]``), else None."""
        if payload == b"[DONE]":
            return "ok"
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self.cut("stream event is not JSON")
        if not isinstance(chunk, dict) or "error" in chunk:
            return self.cut("error event after content")
        out = _outgoing(payload, chunk, self.tally, self.assembler, self.wants_usage)
        if out is not None:
            batch.append(out)
        return None

    def cut(self, reason: str) -> str:
        self.stream.attempts[-1].reason = reason
        return "stream_cut"

    def unfinished(self) -> str:
        return "stream_cut"


async def _pull(
    outlet: Outlet, stream: OpenStream, events: StreamEvents, batch: list[bytes]
) -> str:
    """Read event by event, writing each read's events at once (aiohttp's server)."""
    while True:
        if batch and not stream.has_buffered:
            await outlet.write(b"".join(batch))
            batch.clear()
        try:
            payload = await stream.next_payload()
        except UpstreamError as exc:
            return events.cut(exc.reason)
        if payload is None:
            return events.unfinished()
        outcome = events.relay(payload, batch)
        if outcome is not None:
            return outcome


async def _push(
    outlet: PushOutlet, response: H1Response, events: StreamEvents, batch: list[bytes]
) -> str:
    """Relay each read from inside the upstream's read callback (the lean front): no task
    wakes per chunk. What is left on ``batch`` at the end goes out after the ledger line."""
    pump = _Pump(outlet, response, events, batch)
    try:
        for payload in _drained(events.stream.pending):
            outcome = events.relay(payload, batch)
            if outcome is not None:
                return outcome
        response.push_to(pump)
        if batch and not pump.done.done():
            pump.send()
        return await pump.done
    finally:
        pump.close()


def _drained(pending: deque[bytes]) -> Iterator[bytes]:
    while pending:
        yield pending.popleft()


class _Pump:
    """The ``StreamSink`` of a pushed stream: decodes, checks and forwards each read."""

    __slots__ = ("outlet", "response", "events", "batch", "done", "_draining")

    def __init__(
        self, outlet: PushOutlet, response: H1Response, events: StreamEvents, batch: list[bytes]
    ) -> None:
        self.outlet = outlet
        self.response = response
        self.events = events
        self.batch = batch
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._draining: asyncio.Task[None] | None = None

    def on_data(self, data: bytes) -> None:
        done = self.done
        if done.done():
            return
        batch, events = self.batch, self.events
        try:
            for payload in events.stream.decode(data):
                outcome = events.relay(payload, batch)
                if outcome is not None:
                    done.set_result(outcome)
                    return
            if batch:
                self.send()
        except UpstreamError as exc:
            done.set_result(events.cut(exc.reason))
        except Exception as exc:  # the client went away, or a bug: relay_stream raises it
            done.set_exception(exc)

    def on_end(self, error: Exception | None) -> None:
        if self.done.done():
            return
        try:
            self.events.stream.ended(error)
        except UpstreamError as exc:
            self.done.set_result(self.events.cut(exc.reason))
        else:
            self.done.set_result(self.events.unfinished())  # a clean end before the last event

    def send(self) -> None:
        data = b"".join(self.batch)
        self.batch.clear()
        if not self.outlet.send_now(data):
            self.response.set_reading(False)  # the client reads slower: hold the upstream
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.outlet.drain()
        except ConnectionError as exc:
            if not self.done.done():
                self.done.set_exception(exc)
            return
        self.response.set_reading(True)

    def close(self) -> None:
        if self._draining is not None:
            self._draining.cancel()


def _outgoing(
    payload: bytes,
    chunk: dict[str, Any],
    tally: StreamTally,
    assembler: StreamAssembler | None,
    client_wants_usage: bool,
) -> bytes | None:
    """The SSE bytes to send the client for one upstream event (None: send nothing)."""
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
                return None
            payload = orjson.dumps({k: v for k, v in chunk.items() if k != "usage"})
    return wire.sse_data(payload)


async def _finish_stream(
    exchange: Exchange,
    stream: OpenStream,
    outlet: Outlet,
    outcome: str,
    events: _Events,
    unsent: list[bytes],
) -> None:
    """Record the stream, then send what is left, its last event and the end in one write."""
    await _record_stream(exchange, stream, outcome, events.tally)
    if outcome == "ok":
        unsent.append(wire.SSE_DONE)
        if events.assembler is not None:
            completed = events.assembler.complete()
            if completed is not None:
                store_answer(exchange, stream.target, completed)
    else:
        unsent.append(wire.STREAM_INTERRUPTED)
    await outlet.write_eof(b"".join(unsent))


async def _record_stream(
    exchange: Exchange, stream: OpenStream, outcome: str, tally: StreamTally
) -> None:
    await record_stream_end(exchange, stream.target, stream.attempts, outcome, tally)
