"""A scriptable fake OpenAI upstream: a real aiohttp server on 127.0.0.1, port 0.

Each request takes the next scripted behaviour; once the script is used up, ``fake.default``
(``ok()`` unless changed) answers every request. Every request is recorded.

Example::

    async with FakeUpstream() as fake:               # or: fake = await start_fake(); ...; close()
        fake.script(status(429, headers={"Retry-After": "2"}), ok(content="Hi there"))
        settings = make_settings(providers=[{"name": "alpha", "base_url": fake.url, ...}])
        ...                                          # send two requests through the sidecar
        assert fake.requests[0].json["model"] == "deepseek-v3.2"
        assert fake.requests[1].headers["Authorization"] == "Bearer sk-test"

``ok()`` answers ``/chat/completions``, ``/completions``, ``/embeddings`` and ``GET /models`` in
OpenAI's shapes. When the body has ``"stream": true`` it streams: a role-only chunk, one content
chunk per word, a finish chunk, a usage chunk (``"choices": []``) if
``stream_options.include_usage`` is true, then ``data: [DONE]``. Its knobs compose, e.g.
``ok(content="a b c", chunk_delay_s=0.05, cut_after_chunks=2)``. For any other shape (tool calls,
``/responses``, images) script ``status(200, body={...})`` or ``sse({...}, {...})``.

A disconnect test waits on ``fake.client_gone`` (set when a handler saw its client go away;
``fake.disconnects`` counts them). ``fake.active_streams`` counts streams in progress and
``fake.open_connections`` the TCP connections the server holds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict

DEFAULT_MODELS = ("deepseek-v3.2", "qwen3-max", "gpt-4o-mini", "text-embedding-3-small")
EMBEDDING_DIMENSIONS = 8
_CREATED = 1735689600
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    peer: Any = None  # the client's (host, port): requests on one connection share it

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None if it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


RECORDED = web.RequestKey("recorded", Recorded)


class Behaviour(Protocol):
    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse: ...


def _body_of(request: web.Request) -> dict[str, Any]:
    recorded: Recorded = request[RECORDED]
    parsed = recorded.json
    return parsed if isinstance(parsed, dict) else {}


def _wants_stream(request: web.Request) -> bool:
    return _body_of(request).get("stream") is True


def _abort(request: web.Request) -> None:
    """Drop the connection at once, mid-response if need be, as a crashed upstream would."""
    if request.transport is not None:
        request.transport.abort()


def _sse(event: Mapping[str, Any] | bytes | str) -> bytes:
    if isinstance(event, bytes):
        return event
    if isinstance(event, str):
        return event.encode()
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _start_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


@dataclass(frozen=True)
class Ok:
    """A successful answer; see ``ok()``."""

    content: str = "Hello world"
    prompt_tokens: int = 10
    completion_tokens: int | None = None  # default: one per content chunk
    cached_tokens: int = 0
    usage: Mapping[str, Any] | None = None  # the whole usage object, verbatim
    report_usage: bool = True
    finish_reason: str = "stop"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0  # before the response headers
    first_token_delay_s: float = 0  # stream: between the role chunk and the first content
    chunk_delay_s: float = 0  # stream: between content chunks
    cut_after_chunks: int | None = None  # close abruptly after this many content chunks
    usage_in_last_content_chunk: bool = False

    def pieces(self) -> list[str]:
        return re.findall(r"\s*\S+", self.content) or [self.content]

    def usage_object(self) -> dict[str, Any]:
        if self.usage is not None:
            return dict(self.usage)
        completion = (
            len(self.pieces()) if self.completion_tokens is None else self.completion_tokens
        )
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await asyncio.sleep(self.delay_s)
        path = request.path.rstrip("/")
        if path.endswith("/models"):
            return self._models(fake)
        if path.endswith("/embeddings"):
            return self._embeddings(request)
        text = path.endswith("/completions") and not path.endswith("/chat/completions")
        if _wants_stream(request):
            async with fake.streaming():
                return await self._stream(request, text=text)
        return await self._complete(request, text=text)

    def _head(self, request: web.Request, *, text: bool, chunk: bool) -> dict[str, Any]:
        obj = "text_completion" if text else "chat.completion.chunk" if chunk else "chat.completion"
        recorded: Recorded = request[RECORDED]
        return {
            "id": f"{'cmpl' if text else 'chatcmpl'}-fake{id(recorded):x}",
            "object": obj,
            "created": _CREATED,
            "model": _body_of(request).get("model", "unknown"),
            "system_fingerprint": "fp_fake",
        }

    async def _complete(self, request: web.Request, *, text: bool) -> web.StreamResponse:
        if text:
            choice = {"text": self.content, "index": 0, "logprobs": None}
        else:
            message = {"role": "assistant", "content": self.content, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None}
        body = {
            **self._head(request, text=text, chunk=False),
            "choices": [{**choice, "finish_reason": self.finish_reason}],
        }
        if self.report_usage:
            body["usage"] = self.usage_object()
        if self.cut_after_chunks is None:
            return web.json_response(body, headers=self.headers)
        return await self._cut_json(request, json.dumps(body).encode())

    async def _cut_json(self, request: web.Request, data: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={**self.headers, "Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        _abort(request)
        return response

    async def _stream(self, request: web.Request, *, text: bool) -> web.StreamResponse:
        head = self._head(request, text=text, chunk=True)
        response = web.StreamResponse(
            headers={
                **self.headers,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if text:
                choice: dict[str, Any] = {"text": delta or "", "index": 0, "logprobs": None}
            else:
                choice = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""}
                    if role
                    else {}
                    if delta is None
                    else {"content": delta},
                    "logprobs": None,
                }
            return {**head, "choices": [{**choice, "finish_reason": finish}]}

        include_usage = _include_usage(request) and self.report_usage
        if not text:
            await response.write(_sse(chunk(None, None, role=True)))
        await asyncio.sleep(self.first_token_delay_s)
        pieces = self.pieces()
        for n, piece in enumerate(pieces):
            if n == self.cut_after_chunks:
                _abort(request)
                return response
            if n:
                await asyncio.sleep(self.chunk_delay_s)
            event = chunk(piece, None)
            if include_usage and self.usage_in_last_content_chunk and n == len(pieces) - 1:
                event = {**chunk(piece, self.finish_reason), "usage": self.usage_object()}
            await response.write(_sse(event))
        if self.cut_after_chunks is not None:
            _abort(request)
            return response
        if not (include_usage and self.usage_in_last_content_chunk):
            await response.write(_sse(chunk(None, self.finish_reason)))
        if include_usage and not self.usage_in_last_content_chunk:
            await response.write(_sse({**head, "choices": [], "usage": self.usage_object()}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = _body_of(request)
        raw = body.get("input", "")
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        vector = [0.125 * (i + 1) for i in range(EMBEDDING_DIMENSIONS)]
        packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": packed if body.get("encoding_format") == "base64" else vector,
            }
            for i in range(len(inputs))
        ]
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        return web.json_response(
            {"object": "list", "data": data, "model": body.get("model", "unknown"), "usage": usage},
            headers=self.headers,
        )

    def _models(self, fake: FakeUpstream) -> web.StreamResponse:
        data = [
            {"id": m, "object": "model", "created": _CREATED, "owned_by": "fake"}
            for m in fake.models
        ]
        return web.json_response({"object": "list", "data": data}, headers=self.headers)


def _include_usage(request: web.Request) -> bool:
    options = _body_of(request).get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(frozen=True)
class Status:
    """Any status with a JSON (or raw) body; an OpenAI error body by default."""

    code: int
    body: Mapping[str, Any] | bytes | str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        body = self.body if self.body is not None else _error_body(self.code)
        if isinstance(body, (bytes, str)):
            return web.Response(status=self.code, body=body, headers=self.headers)
        return web.json_response(dict(body), status=self.code, headers=self.headers)


def _error_body(code: int) -> dict[str, Any]:
    error_type = _ERROR_TYPES.get(code, "server_error" if code >= 500 else "invalid_request_error")
    return {
        "error": {
            "message": f"fake upstream answered {code}",
            "type": error_type,
            "param": None,
            "code": None,
        }
    }


@dataclass(frozen=True)
class Stall:
    """Accept, send nothing for ``seconds``, then answer with ``then`` (default: ``ok()``)."""

    seconds: float
    then: Behaviour | None = None

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await asyncio.sleep(self.seconds)
        return await (self.then or Ok()).respond(request, fake)


@dataclass(frozen=True)
class Refuse:
    """Close the connection without any response."""

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        _abort(request)
        return web.Response()


@dataclass(frozen=True)
class Garbage:
    """A 200 whose body is not JSON (or, for a stream request, not SSE)."""

    body: bytes = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        if _wants_stream(request):
            response = await _start_stream(request)
            await response.write(self.body)
            await response.write_eof()
            return response
        return web.Response(body=self.body, content_type="application/json")


@dataclass(frozen=True)
class Sse:
    """A stream of raw events: mappings become ``data: <json>``, bytes/str go out verbatim."""

    events: Sequence[Mapping[str, Any] | bytes | str]
    done: bool = True
    chunk_delay_s: float = 0
    end_delay_s: float = 0  # between the last event and the body's end (its last chunk)

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        async with fake.streaming():
            response = await _start_stream(request)
            for n, event in enumerate(self.events):
                if n:
                    await asyncio.sleep(self.chunk_delay_s)
                await response.write(_sse(event))
            if self.done:
                await response.write(b"data: [DONE]\n\n")
            if self.end_delay_s:
                await asyncio.sleep(self.end_delay_s)
            await response.write_eof()
            return response


class Gated:
    """Sends ``first`` in one write, then waits for ``gate`` before ``rest`` (and [DONE]).

    A test sets the gate once its client has seen what ``first`` carries: a sidecar that held
    back part of ``first`` until more data came would hang such a test instead of passing it.
    """

    def __init__(self, first: bytes, rest: bytes, *, done: bool = True) -> None:
        self.first, self.rest, self.done = first, rest, done
        self.gate = asyncio.Event()

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        async with fake.streaming():
            response = await _start_stream(request)
            await response.write(self.first)
            await self.gate.wait()
            await response.write(self.rest + (b"data: [DONE]\n\n" if self.done else b""))
            await response.write_eof()
            return response


def ok(content: str = "Hello world", **knobs: Any) -> Ok:
    """A successful answer; ``knobs`` are ``Ok``'s fields (usage, cached_tokens, delay_s, ...)."""
    return Ok(content=content, **knobs)


def status(
    code: int,
    body: Mapping[str, Any] | bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Status:
    return Status(code, body, dict(headers or {}))


def stall(seconds: float, then: Behaviour | None = None) -> Stall:
    return Stall(seconds, then)


def refuse() -> Refuse:
    return Refuse()


def garbage(body: bytes | None = None) -> Garbage:
    return Garbage() if body is None else Garbage(body)


def sse(
    *events: Mapping[str, Any] | bytes | str, done: bool = True, end_delay_s: float = 0
) -> Sse:
    return Sse(events, done=done, end_delay_s=end_delay_s)


def cut_before_content(**knobs: Any) -> Ok:
    """Stream: the role-only chunk, then the connection drops."""
    return Ok(cut_after_chunks=0, **knobs)


def cut_after_content(n_chunks: int = 2, **knobs: Any) -> Ok:
    """Stream: ``n_chunks`` content chunks, then the connection drops."""
    return Ok(cut_after_chunks=n_chunks, **knobs)


def slow_first_token(seconds: float, **knobs: Any) -> Ok:
    """Stream: headers and the role chunk at once, the first content after ``seconds``."""
    return Ok(first_token_delay_s=seconds, **knobs)


def slow_chunks(seconds_between: float, **knobs: Any) -> Ok:
    return Ok(chunk_delay_s=seconds_between, **knobs)


def usage_in_last_content_chunk(**knobs: Any) -> Ok:
    """Stream: usage rides on the last content chunk (with finish_reason), no separate chunk."""
    return Ok(usage_in_last_content_chunk=True, **knobs)


@dataclass(frozen=True)
class Noted:
    """Notes which provider's fake answered, in order, then behaves as ``inner``."""

    calls: list[str]
    name: str
    inner: Behaviour

    async def respond(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        self.calls.append(self.name)
        return await self.inner.respond(request, fake)


class FakeUpstream:
    """The fake server; see the module docstring."""

    def __init__(
        self, *, default: Behaviour | None = None, models: Sequence[str] = DEFAULT_MODELS
    ) -> None:
        self.url = ""
        self.requests: list[Recorded] = []
        self.default: Behaviour = default or Ok()
        self.models = tuple(models)
        self.active_streams = 0
        self.disconnects = 0
        self.client_gone = asyncio.Event()
        self._script: deque[Behaviour] = deque()
        self._by_path: dict[str, deque[Behaviour]] = {}
        self._runner: web.AppRunner | None = None

    def script(self, *behaviours: Behaviour, path: str | None = None) -> None:
        """Queue behaviours, one per request in order; with ``path`` (e.g. "/models") only for
        requests whose path ends with it."""
        queue = self._script if path is None else self._by_path.setdefault(path, deque())
        queue.extend(behaviours)

    @property
    def pending(self) -> int:
        """Scripted behaviours not yet used."""
        return len(self._script) + sum(len(q) for q in self._by_path.values())

    @property
    def open_connections(self) -> int:
        return (
            0
            if self._runner is None or self._runner.server is None
            else len(self._runner.server.connections)
        )

    def streaming(self) -> _Streaming:
        return _Streaming(self)

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a stalled handler learns at once that its client went away.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _next(self, path: str) -> Behaviour:
        for suffix, queue in self._by_path.items():
            if queue and path.rstrip("/").endswith(suffix):
                return queue.popleft()
        return self._script.popleft() if self._script else self.default

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        recorded = Recorded(
            request.method,
            request.path,
            CIMultiDict(request.headers),
            await request.read(),
            transport.get_extra_info("peername") if transport is not None else None,
        )
        self.requests.append(recorded)
        request[RECORDED] = recorded
        try:
            return await self._next(request.path).respond(request, self)
        except asyncio.CancelledError:
            self._saw_client_go()
            raise
        except ConnectionResetError:
            self._saw_client_go()
            return web.Response()  # never sent: the connection is gone

    def _saw_client_go(self) -> None:
        self.disconnects += 1
        self.client_gone.set()


class _Streaming:
    """Counts a stream in progress on the fake."""

    def __init__(self, fake: FakeUpstream) -> None:
        self._fake = fake

    async def __aenter__(self) -> None:
        self._fake.active_streams += 1

    async def __aexit__(self, *exc_info: object) -> None:
        self._fake.active_streams -= 1


async def start_fake(**opts: Any) -> FakeUpstream:
    """Start a ``FakeUpstream(**opts)``; ``await fake.close()`` when done."""
    return await FakeUpstream(**opts).start()


async def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
