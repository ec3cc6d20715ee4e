"""A seeded, randomly misbehaving OpenAI upstream for the soak: a real aiohttp server on loopback.

Each request draws one fault from ``mix`` (weights by kind) with the fake's own seeded ``Random``:

- ``ok``: a normal answer (stream or not), with random token counts;
- ``reset``: the connection is dropped before any response byte;
- ``stall``: nothing until ``stall_s`` (past the sidecar's first-byte timeout), then an answer;
- ``rate_limit``: 429 with ``Retry-After: 1``; ``server_error``: 500, 502, 503 or 504;
- ``garbage``: a 200 whose body is neither JSON nor SSE;
- ``cut_before_content``: a stream cut after its role chunk (a non-stream answer cut in half);
- ``cut_after_content``: a stream cut after some content (a non-stream answer cut in half);
- ``stall_first_token``: a stream whose first content comes after ``stall_s`` (else: ``stall``);
- ``slow_tokens``: an answer whose content chunks come ``token_delay_s`` apart.

Besides, ``refuse_for(seconds)`` closes the listening socket for a while, so connects are refused
(``ECONNREFUSED``), then listens again on the same port.

Every answer sent whole is recorded in ``served`` under its unique response ``id`` with the
usage the fake reported, so the soak can compare what the client got and what the ledger says.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

FAULT_KINDS = (
    "ok",
    "reset",
    "stall",
    "rate_limit",
    "server_error",
    "garbage",
    "cut_before_content",
    "cut_after_content",
    "stall_first_token",
    "slow_tokens",
)
DEFAULT_MIX: Mapping[str, float] = {
    "ok": 70,
    "reset": 3,
    "stall": 2,
    "rate_limit": 4,
    "server_error": 5,
    "garbage": 3,
    "cut_before_content": 4,
    "cut_after_content": 4,
    "stall_first_token": 2,
    "slow_tokens": 3,
}
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
_CREATED = 1735689600


@dataclass(frozen=True)
class Served:
    """One answer the fake sent whole."""

    provider: str
    path: str
    stream: bool
    usage: dict[str, Any]


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _sse(event: Mapping[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event)
    return f"data: {data}\n\n".encode()


class ChaosUpstream:
    """One misbehaving provider. ``await start()``, ``url``, ``await close()``."""

    def __init__(
        self,
        name: str,
        *,
        seed: int,
        mix: Mapping[str, float] = DEFAULT_MIX,
        stall_s: float = 3.0,
        token_delay_s: float = 0.05,
        keepalive_s: float = 2.0,
    ) -> None:
        unknown = set(mix) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        self.name = name
        self.served: dict[str, Served] = {}
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self.refusals = 0
        self._random = random.Random(seed)
        self._kinds = list(mix)
        self._weights = [mix[k] for k in self._kinds]
        self._stall_s = stall_s
        self._token_delay_s = token_delay_s
        self._keepalive_s = keepalive_s
        self._serial = 0
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._outages: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=self._keepalive_s, handler_cancellation=True
        )
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        for task in list(self._outages):
            task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()

    def refuse_for(self, seconds: float) -> None:
        """Stop listening for ``seconds``: new connections are refused, open ones stay."""
        if self._server is None:
            return
        self.refusals += 1
        self.faults["refuse"] += 1
        self._server.close()
        self._server = None
        task = asyncio.ensure_future(self._listen_after(seconds))
        self._outages.add(task)
        task.add_done_callback(self._outages.discard)

    async def _listen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._runner.server, sock=sock, backlog=1024)

    def _next_id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self.name}-{self._serial}"

    def _draw(self) -> str:
        return self._random.choices(self._kinds, self._weights)[0]

    def _usage(self, *, completion: int | None) -> dict[str, Any]:
        prompt = self._random.randint(5, 400)
        if completion is None:
            return {"prompt_tokens": prompt, "total_tokens": prompt}
        cached = self._random.choice((0, 0, prompt // 2))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method == "GET":
            return web.json_response({"object": "list", "data": []})
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        kind = self._draw()
        stream = bool(body.get("stream")) and request.path.endswith("/chat/completions")
        if kind == "stall_first_token" and not stream:
            kind = "stall"
        self.faults[kind] += 1
        try:
            return await self._respond(request, body, kind, stream)
        except (ConnectionError, asyncio.CancelledError):
            _abort(request)
            raise

    async def _respond(
        self, request: web.Request, body: dict[str, Any], kind: str, stream: bool
    ) -> web.StreamResponse:
        if kind == "reset":
            _abort(request)
            return web.Response()
        if kind == "stall":
            await asyncio.sleep(self._stall_s)
        if kind == "rate_limit":
            return _error(429, "rate_limit_error", {"Retry-After": "1"})
        if kind == "server_error":
            return _error(self._random.choice((500, 502, 503, 504)), "server_error", {})
        if kind == "garbage":
            ctype = "text/event-stream" if stream else "application/json"
            return web.Response(body=b"<html>\x00 not what you asked for", content_type=ctype)
        if request.path.endswith("/embeddings"):
            return await self._embeddings(request, body, kind)
        if stream:
            return await self._stream(request, body, kind)
        return await self._complete(request, body, kind)

    async def _embeddings(
        self, request: web.Request, body: dict[str, Any], kind: str
    ) -> web.StreamResponse:
        answer_id = self._next_id("emb")
        usage = self._usage(completion=None)
        answer = {
            "id": answer_id,
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.125] * 8}],
            "model": body.get("model", "unknown"),
            "usage": usage,
        }
        return await self._send_json(request, answer_id, answer, kind, usage)

    async def _complete(
        self, request: web.Request, body: dict[str, Any], kind: str
    ) -> web.StreamResponse:
        answer_id = self._next_id("chatcmpl")
        words = self._random.choices(WORDS, k=self._random.randint(2, 12))
        usage = self._usage(completion=len(words))
        answer = {
            "id": answer_id,
            "object": "chat.completion",
            "created": _CREATED,
            "model": body.get("model", "unknown"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        if kind == "slow_tokens":
            await asyncio.sleep(self._token_delay_s * len(words))
        return await self._send_json(request, answer_id, answer, kind, usage)

    async def _send_json(
        self,
        request: web.Request,
        answer_id: str,
        answer: dict[str, Any],
        kind: str,
        usage: dict[str, Any],
    ) -> web.StreamResponse:
        data = json.dumps(answer).encode()
        if kind in ("cut_before_content", "cut_after_content"):
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            _abort(request)
            return response
        response = web.Response(body=data, content_type="application/json")
        await response.prepare(request)
        await response.write_eof()
        self.served[answer_id] = Served(self.name, request.path, False, usage)
        return response

    async def _stream(
        self, request: web.Request, body: dict[str, Any], kind: str
    ) -> web.StreamResponse:
        answer_id = self._next_id("chatcmpl")
        words = self._random.choices(WORDS, k=self._random.randint(2, 12))
        usage = self._usage(completion=len(words))
        head = {
            "id": answer_id,
            "object": "chat.completion.chunk",
            "created": _CREATED,
            "model": body.get("model", "unknown"),
        }
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        await response.write(_sse({**head, "choices": [role]}))
        if kind == "cut_before_content":
            _abort(request)
            return response
        if kind == "stall_first_token":
            await asyncio.sleep(self._stall_s)
        cut_at = self._random.randint(1, len(words)) if kind == "cut_after_content" else None
        for i, word in enumerate(words):
            if cut_at is not None and i == cut_at:
                _abort(request)
                return response
            if kind == "slow_tokens":
                await asyncio.sleep(self._token_delay_s)
            delta = {"index": 0, "delta": {"content": (" " if i else "") + word}}
            await response.write(_sse({**head, "choices": [{**delta, "finish_reason": None}]}))
        if cut_at is not None:
            _abort(request)
            return response
        finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
        await response.write(_sse({**head, "choices": [finish]}))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            await response.write(_sse({**head, "choices": [], "usage": usage}))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        self.served[answer_id] = Served(self.name, request.path, True, usage)
        return response


def _error(status: int, kind: str, headers: Mapping[str, str]) -> web.Response:
    body = {"error": {"message": f"fake {status}", "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=dict(headers))
