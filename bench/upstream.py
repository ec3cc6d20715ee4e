"""A fast fake OpenAI upstream on raw asyncio: HTTP/1.1 keep-alive, no framework.

It must never be the bottleneck of a benchmark, so it parses only what it needs (request line,
Content-Length or chunked body, the JSON body's ``model``/``stream``/``stream_options``) and
answers from prebuilt bytes.

    python bench/upstream.py --port 0 --chunks 20 --chunk-delay-ms 5

Routes: POST /v1/chat/completions (JSON, or SSE when ``stream`` is true: a role-only chunk, then
``--chunks`` content chunks ``--chunk-delay-ms`` apart, a finish chunk, a usage chunk when
``stream_options.include_usage``, ``[DONE]``), POST /v1/embeddings, GET /v1/models, GET /-/health.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

PROMPT_TOKENS = 12
HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 65536


@dataclass(frozen=True)
class StreamShape:
    """What a stream looks like: N content chunks, D ms apart (the first one after D too)."""

    chunks: int = 20
    delay_s: float = 0.005
    embed_dims: int = 256


@dataclass
class Request:
    method: bytes
    path: bytes
    body: bytes
    keep_alive: bool


@dataclass
class Answers:
    """Prebuilt response bytes, per model name (the few a benchmark uses)."""

    shape: StreamShape
    _chat: dict[str, bytes] = field(default_factory=dict)
    _streams: dict[tuple[str, bool], StreamBytes] = field(default_factory=dict)

    def chat(self, model: str) -> bytes:
        cached = self._chat.get(model)
        if cached is None:
            cached = response(200, "application/json", orjson.dumps(chat_body(model, self.shape)))
            if len(self._chat) < 64:
                self._chat[model] = cached
        return cached

    def stream(self, model: str, with_usage: bool) -> StreamBytes:
        cached = self._streams.get((model, with_usage))
        if cached is None:
            cached = stream_bytes(model, with_usage, self.shape)
            if len(self._streams) < 64:
                self._streams[(model, with_usage)] = cached
        return cached


@dataclass(frozen=True)
class StreamBytes:
    """One stream's writes: the head with the role chunk, each content chunk, and the tail."""

    first: bytes
    chunks: tuple[bytes, ...]
    last: bytes


def stream_bytes(model: str, with_usage: bool, shape: StreamShape) -> StreamBytes:
    role = chunk_event(model, {"role": "assistant", "content": ""})
    chunks = tuple(
        http_chunk(chunk_event(model, {"content": f"w{i} "})) for i in range(shape.chunks)
    )
    tail = chunk_event(model, {}, "stop")
    if with_usage:
        tail += usage_event(model, shape)
    return StreamBytes(
        STREAM_HEAD + http_chunk(role),
        chunks,
        http_chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n",
    )


def response(status: int, content_type: str, body: bytes, close: bool = False) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    conn = "close" if close else "keep-alive"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {conn}\r\n\r\n"
    )
    return head.encode() + body


def usage(shape: StreamShape) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": shape.chunks,
        "total_tokens": PROMPT_TOKENS + shape.chunks,
    }


def chat_body(model: str, shape: StreamShape) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "w " * shape.chunks},
                "finish_reason": "stop",
            }
        ],
        "usage": usage(shape),
    }


def chunk_event(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def usage_event(model: str, shape: StreamShape) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [],
        "usage": usage(shape),
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def embeddings(body: dict[str, Any], shape: StreamShape) -> bytes:
    raw = body.get("input", "")
    inputs = raw if isinstance(raw, list) else [raw]
    vector = [0.001 * (i % 97) for i in range(shape.embed_dims)]
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))]
    tokens = 8 * len(inputs)
    out = {
        "object": "list",
        "data": data,
        "model": body.get("model", "bench-embed"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return response(200, "application/json", orjson.dumps(out))


MODELS = response(
    200,
    "application/json",
    orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "bench"}
                for m in ("bench-model", "bench-model-upstream", "bench-embed")
            ],
        }
    ),
)
HEALTH = response(200, "text/plain", b"ok")
NOT_FOUND = response(404, "application/json", b'{"error":{"message":"no such route"}}')
BAD_REQUEST = response(400, "application/json", b'{"error":{"message":"bad request"}}', True)


def parse_chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body from ``buf[start:]``; (body, end offset) or None if incomplete."""
    parts: list[bytes] = []
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", pos)
            return (b"".join(parts), trailer_end + 2) if trailer_end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


def parse_request(buf: bytearray) -> tuple[Request, int] | None:
    """One request from the front of ``buf``: (request, bytes consumed) or None if incomplete."""
    head_end = buf.find(HEADER_END)
    if head_end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise ValueError("header too large")
        return None
    lines = bytes(buf[:head_end]).split(b"\r\n")
    method, path, version = lines[0].split(b" ", 2)
    length, chunked = 0, False
    keep_alive = version != b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    body_start = head_end + 4
    if chunked:
        decoded = parse_chunked(buf, body_start)
        if decoded is None:
            return None
        return Request(method, path, decoded[0], keep_alive), decoded[1]
    if len(buf) < body_start + length:
        return None
    body = bytes(buf[body_start : body_start + length])
    return Request(method, path, body, keep_alive), body_start + length


class Pacer:
    """Sends every open stream's next chunk when it is due, from one timer.

    A task per stream sleeping between chunks cost more CPU than a proxy relaying the chunk, so
    at 256 streams the fake upstream was what held the direct target back. Every stream has the
    same delay, so chunks fall due in about the order they were queued: one FIFO, and one timer
    for its head.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float) -> None:
        self._loop = loop
        self._delay_s = delay_s
        self._due: deque[tuple[float, Stream]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, stream: Stream) -> None:
        """Queue ``stream``'s first content chunk one delay from now."""
        self._queue(self._loop.time() + self._delay_s, stream)

    def _queue(self, due: float, stream: Stream) -> None:
        self._due.append((due, stream))
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        # uvloop's clock and timers count whole milliseconds: a timer may fire with its due
        # time a fraction of a millisecond ahead, and waiting for it would spin the loop.
        queue, now = self._due, self._loop.time() + 0.001
        while queue and queue[0][0] <= now:
            due, stream = queue.popleft()
            if stream.send_next():
                queue.append((due + self._delay_s, stream))
        if queue:
            self._timer = self._loop.call_at(queue[0][0], self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due.clear()


class Stream:
    """One SSE answer in progress on a connection."""

    __slots__ = ("connection", "parts", "sent", "keep_alive")

    def __init__(self, connection: Connection, parts: StreamBytes, keep_alive: bool) -> None:
        self.connection = connection
        self.parts = parts
        self.sent = 0
        self.keep_alive = keep_alive

    def send_next(self) -> bool:
        """Send the next content chunk (and the tail after the last); True while more are due.
        A chunk is due ``delay`` after the one before was due, however busy the reader: a
        provider generates at its own pace."""
        transport = self.connection.transport
        if transport is None or transport.is_closing():
            return False  # the client went away
        chunks = self.parts.chunks
        if self.sent < len(chunks):
            transport.write(chunks[self.sent])
            self.sent += 1
            if self.sent < len(chunks):
                return True
        transport.write(self.parts.last)
        self.connection.stream_done(self.keep_alive)
        return False


class Connection(asyncio.Protocol):
    """One keep-alive client connection; requests are answered strictly in order."""

    def __init__(self, answers: Answers, pacer: Pacer) -> None:
        self.answers = answers
        self.pacer = pacer
        self.buf = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while self.transport is not None and not self.busy:
            try:
                parsed = parse_request(self.buf)
            except ValueError:
                self.transport.write(BAD_REQUEST)
                self.transport.close()
                return
            if parsed is None:
                return
            request, used = parsed
            del self.buf[:used]
            self.answer(request)

    def answer(self, request: Request) -> None:
        assert self.transport is not None
        if request.method == b"GET":
            get = {b"/v1/models": MODELS, b"/-/health": HEALTH}
            self.transport.write(get.get(request.path.split(b"?")[0], NOT_FOUND))
        elif request.path.endswith(b"/chat/completions"):
            self.chat(request)
        elif request.path.endswith(b"/embeddings"):
            self.transport.write(embeddings(orjson.loads(request.body), self.answers.shape))
        else:
            self.transport.write(NOT_FOUND)
        if not request.keep_alive and not self.busy:
            self.transport.close()

    def chat(self, request: Request) -> None:
        assert self.transport is not None
        try:
            body = orjson.loads(request.body)
            model = str(body.get("model", "bench-model"))
        except (orjson.JSONDecodeError, AttributeError):
            self.transport.write(BAD_REQUEST)
            self.transport.close()
            return
        if not body.get("stream"):
            self.transport.write(self.answers.chat(model))
            return
        options = body.get("stream_options") or {}
        with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        stream = Stream(self, self.answers.stream(model, with_usage), request.keep_alive)
        self.transport.write(stream.parts.first)
        self.busy = True
        if stream.parts.chunks:
            self.pacer.start(stream)
        else:
            stream.send_next()

    def stream_done(self, keep_alive: bool) -> None:
        self.busy = False
        if self.transport is not None and not keep_alive:
            self.transport.close()
        elif self.buf:
            self.process()


async def serve(host: str, port: int, shape: StreamShape) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(shape)
    pacer = Pacer(loop, shape.delay_s)
    server = await loop.create_server(
        lambda: Connection(answers, pacer), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fake OpenAI upstream for benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--chunk-delay-ms", type=float, default=5.0)
    parser.add_argument("--embed-dims", type=int, default=256)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shape = StreamShape(args.chunks, args.chunk_delay_ms / 1000, args.embed_dims)
    try:
        run(serve(args.host, args.port, shape))
    except KeyboardInterrupt:
        pass


def run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


if __name__ == "__main__":
    main()
