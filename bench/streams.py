"""Stream load driver: time to first content token and total time, at N concurrent streams.

    python bench/streams.py --url http://127.0.0.1:8700/v1/chat/completions -c 16 -d 10
    python bench/streams.py --url ... -c 1000 --hold     # N streams at once, each exactly once

Prints one JSON object: streams, errors, streams_per_s, ttft_ms and total_ms percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop


class StreamFailed(Exception):
    pass


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
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


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float]:
    """(time to first content, total time) in seconds for one streamed completion."""
    start = time.perf_counter()
    ttft: float | None = None
    pending, tail = b"", b""
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise StreamFailed(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for data in resp.content.iter_any():
            tail = (tail + data)[-64:]
            if ttft is None:
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                if any(has_content(line) for line in lines):
                    ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    if ttft is None:
        raise StreamFailed("stream ended without content")
    if b"[DONE]" not in tail:
        raise StreamFailed("stream ended without [DONE]")
    return ttft, total


async def record(
    tally: Tally, session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> None:
    try:
        ttft, total = await one_stream(session, url, body, headers)
    except (TimeoutError, StreamFailed, aiohttp.ClientError) as exc:
        tally.fail(f"{type(exc).__name__}: {exc}")
        return
    tally.ttft.append(ttft)
    tally.total.append(total)


async def worker(
    deadline: float,
    tally: Tally,
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    while time.perf_counter() < deadline:
        await record(tally, session, url, body, headers)


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
    body = request_body(args.model, args.include_usage)
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=args.read_timeout)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.hold:
            jobs = [record(tally, session, args.url, body, headers) for _ in range(args.c)]
        else:
            deadline = start + args.d
            jobs = [
                worker(deadline, tally, session, args.url, body, headers) for _ in range(args.c)
            ]
        await asyncio.gather(*jobs)
    elapsed = time.perf_counter() - start
    return summary(tally, elapsed)


def summary(tally: Tally, elapsed: float) -> dict[str, Any]:
    def ms(values: list[float], pct: float) -> float:
        return round(percentile(values, pct) * 1000, 3)

    return {
        "streams": len(tally.ttft),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed_s": round(elapsed, 3),
        "streams_per_s": round(len(tally.ttft) / elapsed, 2) if elapsed > 0 else 0.0,
        "ttft_ms": {p: ms(tally.ttft, q) for p, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "total_ms": {p: ms(tally.total, q) for p, q in (("p50", 50), ("p99", 99), ("max", 100))},
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
    parser.add_argument("--read-timeout", type=float, default=60.0)
    parser.add_argument("-H", "--header", type=header, action="append", default=[])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(drive(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
