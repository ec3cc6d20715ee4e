"""A lean HTTP/1.1 client for the hot path: one POST, its answer whole or as a stream, and a
keep-alive pool.

aiohttp's client runs some 800 lines of Python per request (its session, request, connector,
response and stream-reader objects): two fifths of the Python a proxied request ran, and over a
quarter of its instructions. A chat, completion, embedding or Responses API call needs none of
what that buys (cookies, redirects, proxies, auth helpers, trace hooks, multipart), so it goes
through this client; media, uploads and health probes keep aiohttp's.

A connection goes back to the pool only after a complete, well-framed response that allows
keep-alive. Anything else (a timeout, a cut, a response closed unread, a parse error, bytes
nobody asked for) closes it, so a late answer can never be read as the reply to another request.

A host name is looked up once per ``DNS_TTL_S`` (as aiohttp's connector is told to), not once
per connection: a burst of streams to a pool with no idle connection opens one connection per
stream, and each lookup is a round trip to the resolver from one of libuv's four lookup threads.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from typing import Any, Final, Protocol, cast

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

MAX_HEAD_BYTES: Final = 65536
# How long a host name's addresses are used before it is looked up again.
DNS_TTL_S: Final = 300.0
_NO_BODY_STATUSES = frozenset({204, 304})


class InvalidResponse(Exception):
    """The upstream's bytes are not an HTTP/1.x response head we can read."""


class BodyCut(ConnectionError):
    """The connection ended, or the bytes stopped making sense, before the body was whole."""


class _Head:
    __slots__ = ("status", "headers", "keep_alive", "chunked", "length", "encoding")

    def __init__(self, status: int, headers: CIMultiDict[str], keep_alive: bool) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunked = False
        self.length: int | None = None  # None (and not chunked): until the connection closes
        self.encoding = ""


class StreamSink(Protocol):
    """Takes a stream's bytes inside the read callback, in place of ``readany()``."""

    def on_data(self, data: bytes) -> None: ...

    def on_end(self, error: Exception | None) -> None:
        """The body ended: cleanly (None) or cut (the error)."""


class _Connection(asyncio.Protocol):
    """One upstream connection and the response it is reading: whole (``body()``) or as it
    comes (``readany()``, or pushed to a ``StreamSink``, for streams)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._chunk_left = _CHUNK_SIZE  # chunked: data bytes of this chunk still to come, or
        # which delimiter is next
        self._plain_chunked_stream = False  # a read that is one whole chunk skips the buffer
        self._length_left = 0  # Content-Length: body bytes still to come
        self._decoder: Any = None  # a zlib decompressobj for a gzip/deflate body
        self._head_waiter: asyncio.Future[_Head] | None = None
        self._expecting = False  # a response (or the rest of one) is due
        self._stream = False
        # A whole answer: its parts, and the future that gets them joined.
        self._parts: list[bytes] = []
        self._body_waiter: asyncio.Future[bytes] | None = None
        # A stream: bytes not yet read, the reader waiting for more, how it ended.
        self._feed = bytearray()
        self._feed_waiter: asyncio.Future[None] | None = None
        self._sink: StreamSink | None = None
        self._eof = False
        self._error: Exception | None = None
        self._paused = False
        self._last_read = 0.0
        self._timeout_s = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self._expecting:
            self.abort()  # bytes nobody asked for: this connection is out of step
            return
        self._last_read = self._loop.time()
        if (
            self._plain_chunked_stream
            and self._chunk_left == _CHUNK_SIZE
            and not self._buffer
            and self._take_whole_chunk(data)
        ):
            return
        self._buffer += data
        try:
            self._advance()
        except (InvalidResponse, BodyCut) as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._expecting:
            return
        head = self._head
        if head is not None and head.length is None and not head.chunked:
            self._end()  # a body that ends with the connection
        else:
            self._fail(BodyCut("connection closed"))

    # -- one exchange ----------------------------------------------------------------------

    def send(self, request: bytes, timeout_s: float, *, stream: bool) -> asyncio.Future[_Head]:
        """Write ``request``; the future has the response head. No byte for ``timeout_s`` fails
        it with TimeoutError, and the body too unless ``stream`` (a stream's reader keeps its
        own clocks)."""
        assert self.transport is not None
        self._head = None
        self._chunk_left = _CHUNK_SIZE
        self._plain_chunked_stream = False
        self._decoder = None
        self._buffer.clear()
        self._parts = []
        self._feed.clear()
        self._sink = None
        self.set_reading(True)
        self._eof = False
        self._error = None
        self._stream = stream
        self._head_waiter = waiter = self._loop.create_future()
        self._body_waiter = None
        self._expecting = True
        self._last_read = self._loop.time()
        self._timeout_s = timeout_s
        self._timer = self._loop.call_at(self._last_read + timeout_s, self._check_quiet)
        self.transport.write(request)
        return waiter

    def body(self) -> asyncio.Future[bytes]:
        assert self._body_waiter is not None, "a whole answer's body comes after its head"
        return self._body_waiter

    async def readany(self) -> bytes:
        """A stream's bytes that came since the last call, waiting for some; b"" at its end.
        Raises ``BodyCut`` (or what else ended it) when it was cut."""
        while True:
            if self._feed:
                data = bytes(self._feed)
                self._feed.clear()
                self.set_reading(True)
                return data
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            waiter = self._feed_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._feed_waiter = None

    def push_to(self, sink: StreamSink) -> None:
        """From now on hand the stream's bytes to ``sink`` as they arrive (what came before
        first, at once). A task waiting on each read costs more than the relay's own work."""
        self._sink = sink
        self.set_reading(True)
        if self._feed:
            data = bytes(self._feed)
            self._feed.clear()
            sink.on_data(data)
        if self._error is not None:
            sink.on_end(self._error)
        elif self._eof:
            sink.on_end(None)

    def pull(self) -> None:
        """Stop pushing: bytes from now on wait for ``readany()``."""
        self._sink = None

    def set_reading(self, on: bool) -> None:
        """Pause reading (a client slower than the upstream) or resume it."""
        if self._paused == (not on) or self.transport is None:
            return
        self._paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    @property
    def streaming(self) -> bool:
        return self._stream

    def reusable(self) -> bool:
        """The last response was read to its well-framed end and nothing broke since."""
        return not self.closed and not self._expecting and self._error is None

    def mark_idle(self) -> None:
        self.idle_since = self._loop.time()

    def abort(self) -> None:
        """Close at once; whoever still waits on this response hears that it was cut."""
        self._fail(BodyCut("connection closed"))

    def finish(self, pool: H1Pool, grace_s: float) -> None:
        """The reader of a stream is done (its last event came): pool this connection, now if
        the body has ended, else when its end follows within ``grace_s``, dropping what else the
        body brings. A body that is broken, or not over by then, drops the connection."""
        if self.reusable():
            pool.release(self)
        elif self.closed or not self._expecting or not self._stream or self._error is not None:
            self.abort()
        else:
            self._feed.clear()
            self._sink = _PoolAtEnd(self, pool)
            self.set_reading(True)
            self._stop_timer()
            self._timer = self._loop.call_later(grace_s, self.abort)

    # -- reading ---------------------------------------------------------------------------

    def _check_quiet(self) -> None:
        self._timer = None
        due = self._last_read + self._timeout_s
        if self._loop.time() < due:  # bytes came meanwhile: wait from the last of them
            self._timer = self._loop.call_at(due, self._check_quiet)
            return
        self._fail(TimeoutError(f"no data within {self._timeout_s:g}s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        self._expecting = False
        self._stop_timer()
        for waiter in (self._head_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        if self._stream and not self._eof and self._error is None:
            self._error = exc
            if self._sink is not None:
                self._sink.on_end(exc)
            self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _deliver(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                raise BodyCut(f"the body is not valid {self._head_encoding()}: {exc}") from None
        self._take(data)

    def _take(self, data: bytes) -> None:
        if not data:
            return
        sink = self._sink  # set only for a pushed stream: its reads take no other step
        if sink is not None:
            sink.on_data(data)
        elif self._stream:
            self._feed += data
            if len(self._feed) > _FEED_HIGH_WATER:
                self.set_reading(False)  # a slow client: stop reading until it catches up
            self._wake()
        else:
            self._parts.append(data)

    def _end(self, *, spoiled: bool = False) -> None:
        """The body is whole. ``spoiled``: bytes came after it, so the connection is out of
        step; the answer stands but the connection is dropped."""
        self._stop_timer()
        self._buffer.clear()
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            if not decoder.eof:
                self._fail(BodyCut(f"the body is not valid {self._head_encoding()}: it ends early"))
                return
            self._take(decoder.flush())
        self._expecting = False
        if self._stream:
            self._eof = True
            if self._sink is not None:
                self._sink.on_end(None)
            self._wake()
        else:
            waiter = self._body_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(b"".join(self._parts))
        if spoiled:
            self.abort()

    def _head_encoding(self) -> str:
        return self._head.encoding if self._head is not None else ""

    def _wake(self) -> None:
        waiter = self._feed_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _advance(self) -> None:
        if self._head is None and not self._read_head():
            return
        head = self._head
        assert head is not None
        if not self._expecting:
            return
        buffer = self._buffer
        if head.chunked:
            self._read_chunks()
        elif head.length is None:
            if buffer:
                data = bytes(buffer)
                buffer.clear()
                self._deliver(data)
        elif len(buffer) >= self._length_left:
            left = self._length_left
            spoiled = len(buffer) > left
            self._deliver(bytes(buffer[:left]))
            self._end(spoiled=spoiled)
        elif self._stream and buffer:
            self._length_left -= len(buffer)
            data = bytes(buffer)
            buffer.clear()
            self._deliver(data)

    def _read_head(self) -> bool:
        """Parse the response head once it is all in, skipping 1xx heads; True once parsed."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise InvalidResponse("response head over 64 KiB")
                return False
            head = _parse_head(bytes(buffer[:end]).split(b"\r\n"))
            del buffer[: end + 4]
            if 100 <= head.status < 200:
                continue  # 100 Continue, 103 Early Hints: the final head follows
            self._head = head
            self._length_left = head.length or 0
            if head.encoding:
                self._decoder = _decoder_for(head.encoding)
            if self._stream:
                self._stop_timer()
                self._plain_chunked_stream = head.chunked and not head.encoding
            else:
                self._body_waiter = self._loop.create_future()
                # A failure counts as seen even if the body is never read (closed unread).
                self._body_waiter.add_done_callback(_seen)
            waiter, self._head_waiter = self._head_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(head)
            return True

    def _take_whole_chunk(self, data: bytes) -> bool:
        """Pass on a read that is exactly one whole non-empty chunk (``1a\\r\\n<data>\\r\\n``),
        as most reads of an upstream stream are, without the buffer; False leaves any other
        read to ``_read_chunks``."""
        line_end = data.find(b"\r\n", 0, 10)
        if line_end <= 0:
            return False
        size = _hex_size(data[:line_end])  # None: an extension, spaces, or not a size at all
        if not size:
            return False
        stop = line_end + 2 + size
        if len(data) != stop + 2 or not data.endswith(b"\r\n"):
            return False
        self._take(data[line_end + 2 : stop])
        return True

    def _read_chunks(self) -> None:
        """Decode what the buffer holds of a chunked body. The data of every chunk in it, whole
        or begun, is passed on at once (a stream is not held back by a large chunk); the buffer
        is trimmed once."""
        buffer = self._buffer
        pos, end = 0, len(buffer)
        parts: list[bytes] = []  # passed on together: one read, one hand-over
        try:
            while pos < end:
                left = self._chunk_left
                if left > 0:  # data of the current chunk
                    take = min(left, end - pos)
                    parts.append(bytes(buffer[pos : pos + take]))
                    pos += take
                    self._chunk_left = left - take or _CHUNK_CRLF
                elif left == _CHUNK_CRLF:
                    if end - pos < 2:
                        return
                    if buffer[pos : pos + 2] != b"\r\n":
                        raise BodyCut("a chunk is not followed by CRLF")
                    pos += 2
                    self._chunk_left = _CHUNK_SIZE
                else:
                    line_end = buffer.find(b"\r\n", pos)
                    if line_end < 0:
                        if end - pos > 4096:
                            raise BodyCut("chunk size line over 4 KiB")
                        return
                    size = _chunk_size(bytes(buffer[pos:line_end]))
                    if size:
                        start = line_end + 2
                        stop = start + size
                        if stop + 2 <= end:  # the whole chunk is in: take it in one step
                            parts.append(bytes(buffer[start:stop]))
                            pos = stop + 2
                            if buffer[stop:pos] != b"\r\n":
                                raise BodyCut("a chunk is not followed by CRLF")
                            continue
                        pos = start
                        self._chunk_left = size
                        continue
                    # The last chunk, then trailer lines up to an empty line.
                    if buffer[line_end : line_end + 4] == b"\r\n\r\n":
                        last = line_end + 4
                    else:
                        last = buffer.find(b"\r\n\r\n", line_end + 2)
                        if last < 0:
                            return
                        last += 4
                    pos = end
                    self._deliver_parts(parts)
                    self._end(spoiled=end > last)
                    return
        finally:
            if pos:
                del buffer[:pos]
            self._deliver_parts(parts)

    def _deliver_parts(self, parts: list[bytes]) -> None:
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            self._deliver(data)


class _PoolAtEnd:
    """The sink of a stream its reader is done with: what else comes is dropped, and the
    connection is pooled at the body's well-framed end."""

    __slots__ = ("connection", "pool")

    def __init__(self, connection: _Connection, pool: H1Pool) -> None:
        self.connection = connection
        self.pool = pool

    def on_data(self, data: bytes) -> None:
        pass

    def on_end(self, error: Exception | None) -> None:
        if error is None and self.connection.reusable():
            self.pool.release(self.connection)


_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_CHUNK_SIZE: Final = -1  # _chunk_left: a chunk size line is next
_CHUNK_CRLF: Final = -2  # _chunk_left: the CRLF after a chunk's data is next


_FEED_HIGH_WATER: Final = 1 << 20


def _decoder_for(encoding: str) -> Any:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS + 32)  # zlib or gzip header, detected
    raise InvalidResponse(f"Content-Encoding {encoding!r} is not supported")


def _seen(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


def _chunk_size(line: bytes) -> int:
    size = _hex_size(line.split(b";", 1)[0].strip())
    if size is None:
        raise BodyCut("bad chunk size line")
    return size


def _hex_size(text: bytes) -> int | None:
    """A chunk size: 1 to 15 hex digits and nothing else (``int()`` alone would also take a
    sign, ``0x``, ``_`` and spaces)."""
    if not text or len(text) > 15 or text.lstrip(_HEX_DIGITS):
        return None
    return int(text, 16)


def _parse_head(lines: list[bytes]) -> _Head:
    status_line = lines[0]
    code = status_line[9:12]
    if (
        not status_line.startswith(b"HTTP/1.")
        or len(status_line) < 12
        or not code.isdigit()
        or status_line[12:13] not in (b"", b" ")
    ):
        raise InvalidResponse("not an HTTP/1.x status line")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise InvalidResponse("a malformed header line")
        headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))
    connection = headers.get("Connection", "").lower()
    if status_line[7:8] == b"1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    head = _Head(int(code), headers, keep_alive)
    transfer = headers.get("Transfer-Encoding")
    if head.status in _NO_BODY_STATUSES or 100 <= head.status < 200:
        head.length = 0
    elif transfer is not None:
        if transfer.strip().lower() != "chunked":
            raise InvalidResponse(f"Transfer-Encoding {transfer!r} is not supported")
        head.chunked = True
    else:
        length = headers.get("Content-Length")
        if length is None:
            head.keep_alive = False
        elif length.isdigit():
            head.length = int(length)
        else:
            raise InvalidResponse("a malformed Content-Length")
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        head.encoding = encoding
    return head


class H1Response:
    """A response whose head arrived: ``read()`` waits for a whole answer's body, ``readany()``
    (also as ``content.readany()``) reads a stream as it comes. The part of
    ``aiohttp.ClientResponse`` that the relay uses."""

    __slots__ = ("status", "headers", "_connection", "_pool", "_keep_alive", "_body")

    def __init__(self, head: _Head, connection: _Connection, pool: H1Pool) -> None:
        self.status = head.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(head.headers)
        self._connection: _Connection | None = connection
        self._pool = pool
        self._keep_alive = head.keep_alive
        self._body: bytes | None = None

    @property
    def content(self) -> H1Response:
        return self

    async def read(self) -> bytes:
        """A whole answer's body. Raises TimeoutError when no byte came within the read timeout
        and ``BodyCut`` (a ConnectionError) when the connection ended or the body was malformed."""
        if self._body is None:
            connection = self._connection
            if connection is None:
                raise BodyCut("the response was closed before its body was read")
            if connection.streaming:  # a stream answered with an error body, say
                parts = []
                while part := await connection.readany():
                    parts.append(part)
                self._body = b"".join(parts)
            else:
                self._body = await connection.body()
        return self._body

    async def readany(self) -> bytes:
        """A stream's next bytes; b"" at its end. Raises ``BodyCut`` when it was cut."""
        connection = self._connection
        if connection is None:
            raise BodyCut("the response was closed")
        return await connection.readany()

    def push_to(self, sink: StreamSink) -> None:
        """Hand a stream's bytes to ``sink`` as they arrive, instead of ``readany()``."""
        connection = self._connection
        if connection is None:
            sink.on_end(BodyCut("the response was closed"))
        else:
            connection.push_to(sink)

    def pull(self) -> None:
        """Stop pushing to a sink: ``readany()`` reads what comes next."""
        if self._connection is not None:
            self._connection.pull()

    def set_reading(self, on: bool) -> None:
        if self._connection is not None:
            self._connection.set_reading(on)

    def close(self) -> None:
        """Pool the connection if the response was read to its end and keep-alive holds; else
        drop it (which also stops a stream's generation upstream)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._keep_alive and connection.reusable():
            self._pool.release(connection)
        else:
            connection.abort()

    def finish(self, grace_s: float) -> None:
        """Like ``close()``, for a stream whose last event came (``[DONE]``, say) before its
        body's end: the connection is pooled once that end follows, within ``grace_s``, as
        servers that write the last event and the body's end apart let it. ``close()`` would
        drop it, and the next request would pay a new connection (a TLS handshake, for most
        providers)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._keep_alive:
            connection.finish(self._pool, grace_s)
        else:
            connection.abort()

    async def __aenter__(self) -> H1Response:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()


class H1Pool:
    """Keep-alive connections to one upstream origin, for JSON POSTs."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context`` (https only) defaults to the system's trust store, verifying the
        certificate and host name as aiohttp does."""
        url = URL(base_url)
        if url.scheme not in ("http", "https") or url.raw_host is None:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self._host = url.raw_host
        self._port: int = url.port or (443 if url.scheme == "https" else 80)
        self._tls = url.scheme == "https"
        self._ssl = ssl_context
        self._prefix = url.raw_path.rstrip("/").encode()
        lines = [f"Host: {url.host_port_subcomponent}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._head_lines = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: deque[_Connection] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._literal = _is_ip_literal(self._host)
        self._addresses: list[tuple[int, str, int]] = []  # (family, host, port) to connect to
        self._addresses_until = 0.0
        self._lookup: asyncio.Future[list[tuple[int, str, int]]] | None = None

    async def post(
        self, path: str, content_type: str, body: bytes, *, stream: bool = False
    ) -> H1Response:
        """POST ``body`` to the base URL's path + ``path``; return once the head arrived.
        ``stream``: the body is read as it comes, with no read timeout after the head.

        Raises OSError (connect failed or timed out), TimeoutError (no head within the read
        timeout), ``InvalidResponse`` or ``BodyCut`` (closed before the head).
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        connection = self._pooled(loop) or await self._connect(loop)
        request = b"POST %s%s HTTP/1.1\r\n%sContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
            self._prefix,
            path.encode(),
            self._head_lines,
            content_type.encode("latin-1"),
            len(body),
        )
        waiter = connection.send(request + body, self._read_timeout_s, stream=stream)
        try:
            head = await waiter
        except BaseException:
            connection.abort()
            raise
        return H1Response(head, connection, self)

    def release(self, connection: _Connection) -> None:
        """Pool ``connection``, first dropping the oldest idle ones that are closed or past
        keep-alive (a burst's connections do not linger once traffic falls). A closed pool
        drops it (a stream finished after a reload closed its runtime's pools)."""
        if self._closed:
            connection.abort()
            return
        connection.mark_idle()
        idle = self._idle
        oldest = connection.idle_since - self._keepalive_s
        while idle and (idle[0].closed or idle[0].idle_since <= oldest):
            idle.popleft().abort()
        idle.append(connection)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()

    def _pooled(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """The most recently used live connection, dropping those idle past keep-alive."""
        idle = self._idle
        oldest = loop.time() - self._keepalive_s
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > oldest:
                return connection
            connection.abort()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        if self._tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._literal:
                    return await self._open(loop, 0, self._host, self._port)
                failure = OSError(errno.EHOSTUNREACH, f"no address found for {self._host}")
                for family, host, port in await self._resolved(loop):
                    try:
                        return await self._open(loop, family, host, port)
                    except OSError as exc:
                        failure = exc
                self._addresses_until = 0.0  # none answered: look the name up again next time
                raise failure
        except TimeoutError:
            timeout = f"timed out after {self._connect_timeout_s:g}s"
            raise OSError(errno.ETIMEDOUT, timeout) from None

    async def _open(
        self, loop: asyncio.AbstractEventLoop, family: int, host: str, port: int
    ) -> _Connection:
        _, connection = await loop.create_connection(
            lambda: _Connection(loop),
            host,
            port,
            family=family,
            ssl=self._ssl if self._tls else None,
            server_hostname=self._host if self._tls else None,
        )
        return connection

    async def _resolved(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, str, int]]:
        """The host's addresses, looked up at most once per ``DNS_TTL_S``; connections opened
        while a lookup runs wait for that one (which a waiter's cancellation does not stop)."""
        if self._addresses and loop.time() < self._addresses_until:
            return self._addresses
        if self._lookup is None:
            self._lookup = lookup = loop.create_task(self._look_up(loop))
            lookup.add_done_callback(self._looked_up)
        return await asyncio.shield(self._lookup)

    async def _look_up(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, str, int]]:
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        self._addresses = [(info[0], str(info[4][0]), int(info[4][1])) for info in infos]
        self._addresses_until = loop.time() + DNS_TTL_S
        return self._addresses

    def _looked_up(self, lookup: asyncio.Task[list[tuple[int, str, int]]]) -> None:
        self._lookup = None
        if not lookup.cancelled():
            lookup.exception()  # a failed lookup is each waiter's to raise, not a stray log line


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
