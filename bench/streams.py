"""Stream load driver: time to first content token and total time, at N concurrent streams.

    python bench/streams.py --url http://127.0.0.1:8700/v1/chat/completions -c 16 -d 10
    python bench/streams.py --url ... -c 1000 --hold     # N streams at once, each exactly once

Each stream is one POST on a keep-alive connection of its own worker, read with raw asyncio.
Prints one JSON object: streams, errors, streams_per_s, ttft_ms and total_ms percentiles.

In load mode the N workers' first streams all start at the same instant, a burst the steady
load never repeats: they are counted apart (``start_burst``), and ``ttft_ms`` and ``total_ms``
are over the streams after them. At 256 streams for 10 s the burst is about 1% of the streams,
so a p99 over all of them measured where the burst ended, not the steady load (``all_ttft_ms``
keeps that figure). With ``--hold`` every stream is in the one burst, and all are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop


class StreamFailed(Exception):
    pass


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    burst_ttft: list[float] = field(default_factory=list)  # each worker's first stream
    burst_total: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def fail(self, reason: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or reason


def has_content(line: bytes) -> bool:
    """True for an SSE ``data:`` line whose first choice carries non-empty delta content."""
    if not line.startswith(b"data:"):
        return False
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return False
    try:
        event = orjson.loads(payload)
        return bool(event["choices"][0]["delta"].get("content"))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return False


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of unsorted values; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


class Reply(asyncio.Protocol):
    """One keep-alive connection to the target, reading one streamed answer at a time.

    Raw asyncio, like the fake upstream: at 256 streams aiohttp's client spent a whole core on
    the driver's side, and the direct target's times were the driver's own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[float, float]] | None = None
        self._start = 0.0
        self._ttft: float | None = None
        self._lines = b""  # body text up to the first content, split into SSE lines
        self._tail = b""  # the body's last bytes, to see [DONE]
        self._status = 0
        self._error_body = b""
        self._chunked = False
        self._length: int | None = None  # body bytes still due (Content-Length)
        self._chunk_left = -1  # chunked: data bytes of this chunk still due; -1: a size line
        self._close = False
        self._in_head = True
        self._read_timeout = 60.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if not self._in_head and not self._chunked and self._length is None:
            self._finish()  # a body that ends with the connection
        else:
            self._fail(StreamFailed(f"connection closed mid-answer ({exc or 'EOF'})"))

    def stream(self, request: bytes, read_timeout: float) -> asyncio.Future[tuple[float, float]]:
        """Send ``request``; the future has (time to first content, total time) in seconds, or
        fails once ``read_timeout`` passes without a byte."""
        assert self.transport is not None
        self._read_timeout, self._last_read = read_timeout, self._loop.time()
        self._timer = self._loop.call_at(self._last_read + read_timeout, self._check_quiet)
        self._waiter = self._loop.create_future()
        self._buf.clear()
        self._ttft, self._lines, self._tail = None, b"", b""
        self._in_head, self._chunk_left, self._error_body = True, -1, b""
        self.reusable = False
        self._start = time.perf_counter()
        self.transport.write(request)
        return self._waiter

    def _check_quiet(self) -> None:
        due = self._last_read + self._read_timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_quiet)
            return
        self._timer = None
        self._fail(TimeoutError(f"no data within {self._read_timeout:g}s"))
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            return
        self._last_read = self._loop.time()
        if self._in_head:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._read_head(bytes(self._buf[:end]))
            data = bytes(self._buf[end + 4 :])
            self._buf.clear()
        if self._chunked:
            self._buf += data
            self._dechunk()
        elif self._length is not None:
            take = data[: self._length]
            self._length -= len(take)
            self._body(take)
            if self._length == 0:
                self._finish()
        else:
            self._body(data)

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        self._in_head, self._chunked, self._length = False, False, None
        self._close = lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                self._chunked = b"chunked" in value
            elif name == b"content-length":
                self._length = int(value)
            elif name == b"connection":
                self._close = value == b"close"

    def _dechunk(self) -> None:
        buf, pos = self._buf, 0
        while pos < len(buf):
            if self._chunk_left > 0:
                take = min(self._chunk_left, len(buf) - pos)
                self._body(bytes(buf[pos : pos + take]))
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_left = -2  # its CRLF is next
                continue
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            if self._chunk_left == -2:
                pos, self._chunk_left = line_end + 2, -1
                continue
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                del buf[:]
                self._finish()
                return
            self._chunk_left = size
        del buf[:pos]

    def _body(self, data: bytes) -> None:
        if self._status != 200:
            self._error_body += data
            return
        self._tail = (self._tail + data)[-64:]
        if self._ttft is None:
            lines = (self._lines + data).split(b"\n")
            self._lines = lines.pop()
            if any(has_content(line) for line in lines):
                self._ttft = time.perf_counter() - self._start
                self._lines = b""

    def _finish(self) -> None:
        total = time.perf_counter() - self._start
        self._stop_timer()
        self.reusable = not self._close and self.transport is not None
        if self._status != 200:
            self._fail(StreamFailed(f"HTTP {self._status}: {self._error_body[:200]!r}"))
        elif self._ttft is None:
            self._fail(StreamFailed("stream ended without content"))
        elif b"[DONE]" not in self._tail:
            self._fail(StreamFailed("stream ended without [DONE]"))
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._ttft, total))

    def _fail(self, exc: Exception) -> None:
        self._stop_timer()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass
class Target:
    host: str
    port: int
    request: bytes

    @classmethod
    def parse(cls, url: str, body: bytes, headers: dict[str, str]) -> Target:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        lines = [
            f"POST {parts.path or '/'} HTTP/1.1",
            f"Host: {parts.netloc}",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        return cls(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


async def one_stream(
    target: Target, reply: Reply | None, read_timeout: float
) -> tuple[tuple[float, float], Reply | None]:
    """(time to first content, total time) in seconds for one streamed completion, and the
    connection to reuse (None once it cannot be)."""
    loop = asyncio.get_running_loop()
    if reply is None or not reply.reusable:
        if reply is not None and reply.transport is not None:
            reply.transport.close()
        _, reply = await loop.create_connection(lambda: Reply(loop), target.host, target.port)
    try:
        times = await reply.stream(target.request, read_timeout)
    except BaseException:
        if reply.transport is not None:
            reply.transport.close()
        raise
    return times, (reply if reply.reusable else None)


async def worker(deadline: float, tally: Tally, target: Target, args: argparse.Namespace) -> None:
    reply: Reply | None = None
    first = not args.hold  # held streams are all one burst: counted as the load itself
    while True:
        try:
            (ttft, total), reply = await one_stream(target, reply, args.read_timeout)
        except (TimeoutError, StreamFailed, OSError) as exc:
            tally.fail(f"{type(exc).__name__}: {exc}")
            reply = None
        else:
            (tally.burst_ttft if first else tally.ttft).append(ttft)
            (tally.burst_total if first else tally.total).append(total)
        first = False
        if args.hold or time.perf_counter() >= deadline:
            break
    if reply is not None and reply.transport is not None:
        reply.transport.close()


def request_body(model: str, include_usage: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say twenty words."}],
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", **dict(args.header)}
    target = Target.parse(args.url, request_body(args.model, args.include_usage), headers)
    tally = Tally()
    start = time.perf_counter()
    deadline = start + args.d
    await asyncio.gather(*(worker(deadline, tally, target, args) for _ in range(args.c)))
    elapsed = time.perf_counter() - start
    return summary(tally, elapsed)


def summary(tally: Tally, elapsed: float) -> dict[str, Any]:
    def ms(values: list[float], pct: float) -> float:
        return round(percentile(values, pct) * 1000, 3)

    def spread(values: list[float]) -> dict[str, float]:
        return {p: ms(values, q) for p, q in (("p50", 50), ("p99", 99), ("max", 100))}

    streams = len(tally.ttft) + len(tally.burst_ttft)
    return {
        "streams": streams,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed_s": round(elapsed, 3),
        "streams_per_s": round(streams / elapsed, 2) if elapsed > 0 else 0.0,
        "ttft_ms": spread(tally.ttft),
        "total_ms": spread(tally.total),
        "start_burst": {
            "streams": len(tally.burst_ttft),
            "ttft_ms": spread(tally.burst_ttft),
            "total_ms": spread(tally.burst_total),
        },
        "all_ttft_ms": spread(tally.ttft + tally.burst_ttft),
    }


def header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'Name: value'")
    return name.strip(), rest.strip()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SSE stream load driver")
    parser.add_argument("--url", required=True, help=".../v1/chat/completions")
    parser.add_argument("-c", type=int, default=16, help="concurrent streams")
    parser.add_argument("-d", type=float, default=10.0, help="seconds (load mode)")
    parser.add_argument("--hold", action="store_true", help="open -c streams at once, once each")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--include-usage", action="store_true")
    parser.add_argument("--read-timeout", type=float, default=60.0, help="seconds without a byte")
    parser.add_argument("-H", "--header", type=header, action="append", default=[])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(drive(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
