"""The soak's daemon process, its /proc readings, and the client driver of mixed traffic.

The driver runs ``concurrency`` client loops against the daemon until a deadline. Each request
carries its own ``X-Request-Id`` and ends in one ``Result``: what the client saw, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("chat", "chat_stream", "embedding", "repeat", "repeat_stream", "disconnect")
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "chat": 25,
    "chat_stream": 30,
    "embedding": 15,
    "repeat": 10,
    "repeat_stream": 10,
    "disconnect": 10,
}
REPEAT_PROMPTS = 12


def free_port() -> int:
    """A loopback port free right now (the daemon keeps it across its restart)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def verify_ledger(path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "ledger",
        "verify",
        "--ledger",
        str(path),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode("utf-8", "replace")


# -- /proc readings --------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def connections_to(pid: int, ports: set[int], *, local: bool = False) -> dict[str, int]:
    """The daemon's TCP sockets whose remote (or, ``local``, own) port is one of ``ports``,
    counted by TCP state."""
    states = {"01": "established", "08": "close_wait", "06": "time_wait", "04": "fin_wait1"}
    inodes = _socket_inodes(pid)
    counts: dict[str, int] = {}
    for raw in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        parts = raw.split()
        port = int(parts[1 if local else 2].split(":")[1], 16)
        if port in ports and parts[9] in inodes and parts[3] != "0A":
            state = states.get(parts[3], parts[3])
            counts[state] = counts.get(state, 0) + 1
    return counts


@dataclass
class RssSampler:
    """VmRSS of the current daemon every ``interval_s``; ``pid`` may change (a restart)."""

    pid: int
    interval_s: float = 1.0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (pid, bytes)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError, AssertionError):
                self.samples.append((self.pid, rss_bytes(self.pid)))
            await asyncio.sleep(self.interval_s)

    def of(self, pid: int) -> list[int]:
        return [rss for p, rss in self.samples if p == pid]


# -- the client driver -----------------------------------------------------------------------


@dataclass
class Result:
    """One request as the client saw it."""

    request_id: str
    kind: str
    stream: bool
    status: int | None = None
    complete: bool = False  # non-stream 200 with a parsed body, or a stream that ended in [DONE]
    failed: bool = False  # a non-2xx, or a stream that ended without [DONE]
    disconnected: bool = False  # the client hung up on purpose mid-stream
    transport_error: str = ""  # the connection to the daemon broke (e.g. the SIGKILL)
    provider: str = ""
    cache: str = ""
    attempts: int | None = None
    error_code: str = ""
    usage: dict[str, Any] | None = None
    answer_id: str = ""
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Driver:
    base_url: str
    seed: int
    concurrency: int = 32
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    results: list[Result] = field(default_factory=list)
    paused: asyncio.Event = field(default_factory=asyncio.Event)  # set: hold new requests
    in_flight: int = 0
    _serial: int = 0

    async def run_until(self, deadline: float, clock: Callable[[], float]) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency * 2, force_close=False)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            loops = [
                self._loop(session, random.Random(self.seed * 1000 + i), deadline, clock)
                for i in range(self.concurrency)
            ]
            await asyncio.gather(*loops)

    async def wait_idle(self, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while self.in_flight:
                await asyncio.sleep(0.05)

    async def _loop(
        self,
        session: aiohttp.ClientSession,
        rng: random.Random,
        deadline: float,
        clock: Callable[[], float],
    ) -> None:
        kinds = list(self.weights)
        weights = [self.weights[k] for k in kinds]
        while clock() < deadline:
            if self.paused.is_set():
                await asyncio.sleep(0.05)
                continue
            kind = rng.choices(kinds, weights)[0]
            self._serial += 1
            result = Result(f"soak-{self.seed}-{self._serial}", kind, kind.endswith("stream"))
            result.stream = result.stream or kind == "disconnect"
            self.in_flight += 1
            result.started = clock()
            try:
                async with asyncio.timeout(max(1.0, deadline - clock() + 15)):
                    await self._one(session, rng, result)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                result.transport_error = f"{type(exc).__name__}: {exc}"
                result.complete = False
                await asyncio.sleep(0.1)  # the daemon may be restarting: no busy loop
            finally:
                result.ended = clock()
                self.in_flight -= 1
                self.results.append(result)

    async def _one(
        self, session: aiohttp.ClientSession, rng: random.Random, result: Result
    ) -> None:
        path, body = _request_body(result, rng)
        headers = {"X-Request-Id": result.request_id}
        async with session.post(self.base_url + path, json=body, headers=headers) as response:
            result.status = response.status
            result.provider = response.headers.get("X-TokenHub-Provider", "")
            result.cache = response.headers.get("X-TokenHub-Cache", "")
            attempts = response.headers.get("X-TokenHub-Attempts")
            result.attempts = int(attempts) if attempts is not None else None
            if response.status != 200:
                result.failed = True
                with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                    error = (await response.json()).get("error") or {}
                    result.error_code = str(error.get("code") or "")
                return
            if response.content_type != "text/event-stream":
                parsed = await response.json()
                result.usage = parsed.get("usage")
                result.answer_id = str(parsed.get("id", ""))
                result.complete = True
                return
            await _read_stream(response, result)


async def _read_stream(response: aiohttp.ClientResponse, result: Result) -> None:
    done = False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            result.error_code = str((event["error"] or {}).get("code") or "stream_error")
            continue
        result.answer_id = result.answer_id or str(event.get("id", ""))
        if event.get("usage"):
            result.usage = event["usage"]
        if result.kind == "disconnect" and event.get("choices"):
            result.disconnected = True
            response.close()
            return
    result.complete = done
    result.failed = not done


def _request_body(result: Result, rng: random.Random) -> tuple[str, dict[str, Any]]:
    if result.kind == "embedding":
        return "/v1/embeddings", {
            "model": "text-embedding-3-small",
            "input": f"{result.request_id} {rng.random()}",
        }
    repeat = result.kind.startswith("repeat")
    content = f"repeat {rng.randrange(REPEAT_PROMPTS)}" if repeat else result.request_id
    body: dict[str, Any] = {
        "model": "deepseek-v3.2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0 if repeat else 0.7,
    }
    if result.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body
