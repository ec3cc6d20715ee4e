"""The lower bound of a Python proxy on this machine: raw asyncio protocols, no aiohttp at all.

    python bench/raw_proxy.py --port 8703 --upstream-port 8702

It parses the request head and its Content-Length body, swaps ``model`` (orjson), forwards on a
pooled upstream connection and pipes the response bytes to the client exactly as they come, for
whole answers and streams alike (any other method gets "ok", for readiness checks). It knows a
response has ended by its Content-Length or the chunked terminator. That is enough for
``upstream.py``'s answers and is no general proxy: no SSE parsing, no checks, no features. It is
a target only with ``run.py --raw``: it measures how much of the floor's cost is aiohttp itself
(``bench/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop

UPSTREAM_MODEL = b"bench-model-upstream"
_CHUNKED_END = b"0\r\n\r\n"


def content_length(head: bytes) -> int:
    """The Content-Length of a lower-cased head, or -1 without one."""
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        return -1
    end = head.find(b"\r\n", start + 2)
    return int(head[start + 17 : end if end > 0 else None])


class UpstreamConnection(asyncio.Protocol):
    """One pooled upstream connection, piping the response of its current request."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.BaseTransport | None = None
        self.done: asyncio.Future[None] | None = None
        self.closed = False
        self._in_head = True
        self._left = -1  # body bytes still due (Content-Length), or -1 (chunked)
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed"))

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)  # type: ignore[attr-defined]
        if self._in_head:
            end = data.find(b"\r\n\r\n")
            self._in_head = False
            self._left = content_length(data[:end].lower())
            if self._left >= 0:
                self._left -= len(data) - end - 4
        elif self._left >= 0:
            self._left -= len(data)
        ended = self._left == 0 or (self._left < 0 and (self._tail + data).endswith(_CHUNKED_END))
        self._tail = data[-len(_CHUNKED_END) :]
        if ended:
            self._in_head, self._tail = True, b""
            done, self.done = self.done, None
            if done is not None and not done.done():
                done.set_result(None)


class ClientConnection(asyncio.Protocol):
    """One client connection: a request at a time, forwarded on a pooled upstream one."""

    def __init__(self, upstream_port: int, pool: list[UpstreamConnection]) -> None:
        self.upstream_port = upstream_port
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = max(0, content_length(self.buffer[:end].lower()))
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        is_post = self.buffer.startswith(b"POST ")
        self.buffer = self.buffer[end + 4 + length :]
        if is_post:
            asyncio.ensure_future(self.forward(body))
        elif self.transport is not None:  # GET /-/health, for the runner's readiness check
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def forward(self, body: bytes) -> None:
        request = orjson.loads(body)
        request["model"] = UPSTREAM_MODEL.decode()
        payload = orjson.dumps(request)
        loop = asyncio.get_running_loop()
        upstream = None
        while self.pool and upstream is None:
            candidate = self.pool.pop()
            upstream = None if candidate.closed else candidate
        if upstream is None:
            _, upstream = await loop.create_connection(
                UpstreamConnection, "127.0.0.1", self.upstream_port
            )
        assert upstream.transport is not None
        upstream.client, upstream.done = self.transport, loop.create_future()
        upstream.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: upstream\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )
        try:
            await upstream.done
        except ConnectionError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.client = None
        self.pool.append(upstream)


async def serve(port: int, upstream_port: int) -> None:
    pool: list[UpstreamConnection] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: ClientConnection(upstream_port, pool), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="raw asyncio proxy: a Python lower bound")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
