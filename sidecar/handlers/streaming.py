"""Forwarding a committed stream chunk by chunk, and its one ledger line before ``[DONE]``.

``forward`` is the relay loop both streaming surfaces share: chat and completions (``_Events``
here) and the Responses API (typed events, in ``responses.py``) differ only in what each event
means, which their ``StreamEvents`` say.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import orjson

from .. import billing, wire
from ..h1 import H1Response
from ..relay import OpenStream
from ..replay import StreamAssembler
from ..upstream import UpstreamError
from .context import Outlet, PushOutlet
from .exchange import Exchange, StreamTally, record_stream_end, store_answer


class ChatStream:
    """A chat or completions answer streamed from its upstream stream, with its one ledger line
    before ``[DONE]``.

    On the lean front the answer begins at the stream's commit point itself, inside the
    upstream's read callback (``on_commit``): the head, the held chunks and the first content go
    out in one write, with no wait for the request's task to get its turn on a busy loop. On
    aiohttp's server it begins once ``Relay.open_stream`` has returned the stream."""

    __slots__ = ("outlet", "pushed", "exchange", "stream", "events", "batch", "pump")

    def __init__(self, outlet: Outlet, exchange: Exchange) -> None:
        self.outlet = outlet
        self.pushed = outlet.pushed()
        self.exchange = exchange
        self.stream: OpenStream | None = None
        self.events: _Events | None = None
        self.batch: list[bytes] = []  # events that came in one read go out in one write
        self.pump: _Pump | None = None

    @property
    def on_commit(self) -> Callable[[OpenStream], None] | None:
        """For ``Relay.open_stream``: begins the answer in the read callback, where it can."""
        return None if self.pushed is None else self._begin_pushed

    @property
    def began(self) -> bool:
        return self.stream is not None

    async def relay(self, stream: OpenStream) -> None:
        """Forward the committed ``stream`` to its end; its ledger line goes out before
        ``[DONE]``."""
        try:
            pump = self.pump
            if pump is None:
                events = self._begin(stream)
                await self.outlet.start_stream(self._headers(stream))
                outcome = await forward(self.outlet, events, self.batch)
            else:
                assert self.events is not None
                events = self.events
                outcome = _settle(stream, await pump.outcome())
            await _finish_stream(self.exchange, stream, self.outlet, outcome, events, self.batch)
        except (ConnectionError, asyncio.CancelledError):
            await self.abandon()
            raise

    async def abandon(self) -> None:
        """The client went away after the answer began: drop the upstream, keep one line."""
        stream, exchange = self.stream, self.exchange
        assert stream is not None
        stream.close()
        if not exchange.recorded:  # a client gone after the line was written keeps that line
            stream.attempts[-1].reason = "client cancelled"
            tally = self.events.tally if self.events is not None else StreamTally()
            await asyncio.shield(_record_stream(exchange, stream, "client_cancelled", tally))

    def _begin(self, stream: OpenStream) -> _Events:
        self.stream = stream
        events = self.events = _Events(self.exchange, stream)
        self.exchange.info.status = 200
        batch = self.batch
        for held, held_chunk in stream.held:
            out = _outgoing(held, held_chunk, events.tally, events.assembler, events.wants_usage)
            if out is not None:
                batch.append(out)
        return events

    def _begin_pushed(self, stream: OpenStream) -> None:
        outlet = self.pushed
        assert outlet is not None
        events = self._begin(stream)
        outlet.begin_stream(self._headers(stream))
        self.pump = _Pump.start(outlet, events, self.batch)

    def _headers(self, stream: OpenStream) -> dict[str, str]:
        exchange = self.exchange
        return exchange.base_headers(stream.target, len(stream.attempts), exchange.cache_header)


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
        outcome = await _Pump.start(pushed, events, batch).outcome()
    else:
        outcome = await _pull(outlet, stream, events, batch)
    return _settle(stream, outcome)


def _settle(stream: OpenStream, outcome: str) -> str:
    """Let a stream's upstream go: pooled when it ended well, dropped otherwise."""
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

    @classmethod
    def start(cls, outlet: PushOutlet, events: StreamEvents, batch: list[bytes]) -> _Pump:
        """Relay the events already read, then each read from inside the upstream's read
        callback: no task wakes per chunk. What is left on ``batch`` at the end goes out
        after the ledger line."""
        stream = events.stream
        pump = cls(outlet, stream.response, events, batch)
        for payload in _drained(stream.pending):
            outcome = events.relay(payload, batch)
            if outcome is not None:
                pump.done.set_result(outcome)
                return pump
        stream.response.push_to(pump)
        if batch and not pump.done.done():
            pump.send()
        return pump

    async def outcome(self) -> str:
        """The stream's outcome, once it ended."""
        try:
            return await self.done
        finally:
            self.close()

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
        except Exception as exc:  # the client went away, or a bug: the relay raises it
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
        if not self.outlet.send_paced(data):
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
