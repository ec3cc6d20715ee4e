"""Forwarding a committed stream chunk by chunk, and its one ledger line before ``[DONE]``."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from .. import billing, wire
from ..relay import OpenStream
from ..replay import StreamAssembler
from ..upstream import UpstreamError
from .context import Outlet
from .exchange import Exchange, StreamTally, record_stream_end, store_answer


async def relay_stream(outlet: Outlet, exchange: Exchange, stream: OpenStream) -> None:
    """Forward a committed stream chunk by chunk; its ledger line goes out before ``[DONE]``."""
    target = stream.target
    client_wants_usage = wire.wants_usage(exchange.body)
    assembler = StreamAssembler() if exchange.decision.store and exchange.cache_key else None
    tally = StreamTally()
    headers = exchange.base_headers(target, len(stream.attempts), exchange.cache_header)
    exchange.info.status = 200
    outcome = "stream_cut"
    try:
        await outlet.start_stream(headers)
        # Events that came in one read go out in one write: one syscall, not one per event.
        batch: list[bytes] = []
        for held, held_chunk in stream.held:
            out = _outgoing(held, held_chunk, tally, assembler, client_wants_usage)
            if out is not None:
                batch.append(out)
        while True:
            if batch and not stream.has_buffered:
                await outlet.write(b"".join(batch))
                batch.clear()
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
            out = _outgoing(payload, chunk, tally, assembler, client_wants_usage)
            if out is not None:
                batch.append(out)
        stream.close()
        await _finish_stream(exchange, stream, outlet, outcome, tally, assembler, batch)
    except (ConnectionError, asyncio.CancelledError):
        stream.close()
        if not exchange.recorded:  # a client gone after the line was written keeps that line
            stream.attempts[-1].reason = "client cancelled"
            await asyncio.shield(_record_stream(exchange, stream, "client_cancelled", tally))
        raise


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
    tally: StreamTally,
    assembler: StreamAssembler | None,
    unsent: list[bytes],
) -> None:
    """Record the stream, then send what is left, its last event and the end in one write."""
    await _record_stream(exchange, stream, outcome, tally)
    if outcome == "ok":
        unsent.append(wire.SSE_DONE)
        if assembler is not None:
            completed = assembler.complete()
            if completed is not None:
                store_answer(exchange, stream.target, completed)
    else:
        unsent.append(wire.STREAM_INTERRUPTED)
    await outlet.write_eof(b"".join(unsent))


async def _record_stream(
    exchange: Exchange, stream: OpenStream, outcome: str, tally: StreamTally
) -> None:
    await record_stream_end(exchange, stream.target, stream.attempts, outcome, tally)
