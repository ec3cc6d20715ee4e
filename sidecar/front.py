"""The daemon's connections: a lean HTTP/1.1 front for the model endpoints, aiohttp for the rest.

aiohttp's server costs about 0.2 ms of CPU per request here (its request and response objects,
router, middleware chain and writer), which is most of what the sidecar adds to a request at one
connection. So a connection first serves plain ``POST /v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings`` and ``/v1/responses`` requests itself: it parses the
head, takes a ``Content-Length`` body, runs the app's ``Guard`` and the handler's ``serve`` and
writes the answer to the socket. It also answers ``GET /v1/models`` and ``GET /v1/models/{id}``:
a hand-over is for the rest of the connection, and an SDK that lists models once at start-up
would otherwise leave that pooled connection, and every request it later carries, on aiohttp.
Anything else, or anything unusual (another path or method, a query string, a chunked or
``Expect`` body, a GET with a body, an upgrade, HTTP/1.0, a header line it does not take, a body
over ``max_body_bytes``), is handed with the bytes received so far to aiohttp's
``RequestHandler``, which this class also is, and aiohttp serves the rest of that connection as
before.

Every connection must also deliver each request head within ``header_timeout_s``: aiohttp has
no header-read timeout, so a client dribbling header bytes (slowloris) could hold a connection
forever. The clock starts when the connection opens and again when the first byte of a later
request arrives; it stops once a whole head is in. The server sweeps its connections now and
then instead of keeping a timer per request.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from .app import GUARD, Guard, error_answer, redact_body
from .handlers import model, models, responses
from .handlers.context import Incoming, Serve, WholeResponse, new_request_info
from .handlers.exchange import Surface
from .log import get_logger
from .pacing import Pacer
from .sweep import DeadlineSweep
from .wire import SSE_TYPE


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: str  # the route's pattern, the metrics label
    serve: Serve
    method: str = "POST"
    path: str | None = None  # the request's path, where it is not ``endpoint``


def _model_route(surface: Surface) -> Route:
    return Route(surface.endpoint, partial(model.serve, surface=surface))


# The request lines served here, whole: anything else goes to aiohttp.
HOT_LINES: dict[bytes, Route] = {
    b"POST /v1/chat/completions HTTP/1.1": _model_route(model.CHAT),
    b"POST /v1/completions HTTP/1.1": _model_route(model.COMPLETIONS),
    b"POST /v1/embeddings HTTP/1.1": _model_route(model.EMBEDDINGS),
    b"POST /v1/responses HTTP/1.1": Route(responses.RESPONSES.endpoint, responses.serve),
    b"GET /v1/models HTTP/1.1": Route(models.LIST, models.serve_list, "GET"),
}
_MODEL_LINE = b"GET /v1/models/"
_HTTP11 = b" HTTP/1.1"
# A model id the lean front takes as it stands in the path: no percent-escape to decode (aiohttp
# decodes those), no query, nothing that is not a path character.
_PLAIN_MODEL_ID = re.compile(rb"[A-Za-z0-9._~:@!$&'()*+,;=/-]+")
# A longer head goes to aiohttp, whose limits (16 KiB a line) answer it.
MAX_HEAD = 16384
# Pipelined bytes past this while a request is served: stop reading until it ends.
PIPELINE_BUFFER = 1 << 20
# Header lines as RFC 9110 has them: a token, a colon, a value of visible characters, spaces
# and tabs (and obs-text, which arrives surrogate-escaped). Anything else goes to aiohttp.
_FIELDS = re.compile(r"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\U0010ffff]*)*")
# One header line of a block ``_FIELDS`` took: its name and its value after the spaces before
# it. Spaces after a value are stripped only in a block that has any (``_fields``): a lazy value
# that looked ahead for them at every character cost more than the rest of the head's handling.
_FIELD = re.compile(r"\r\n([^:]+):[ \t]*([^\r\n]*)")
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
_REFUSED = ("Transfer-Encoding", "Expect", "Upgrade")
_LAST_CHUNK = b"0\r\n\r\n"


def _route(line: bytes) -> Route | None:
    """The route of a request line the lean front serves, else None."""
    route = HOT_LINES.get(line)
    if route is not None or not (line.startswith(_MODEL_LINE) and line.endswith(_HTTP11)):
        return route
    model_id = line[len(_MODEL_LINE) : -len(_HTTP11)]
    if _PLAIN_MODEL_ID.fullmatch(model_id) is None:
        return None
    path = line[4 : -len(_HTTP11)].decode()
    serve = partial(models.serve_one, model_id=model_id.decode())
    return Route(models.ONE, serve, "GET", path)


@dataclass(slots=True)
class Head:
    """A request head the lean front serves."""

    route: Route
    headers: CIMultiDict[str]
    body_start: int
    end: int
    keep_alive: bool


def parse_head(buffer: bytearray, head_end: int, max_body: int) -> Head | None:
    """The head ending at ``head_end`` (its blank line), or None: hand the connection to aiohttp."""
    line_end = buffer.find(b"\r\n")
    route = _route(bytes(buffer[:line_end]))
    if route is None:
        return None
    block = buffer[line_end:head_end].decode("utf-8", "surrogateescape")
    if _FIELDS.fullmatch(block) is None:
        return None
    headers = CIMultiDict(_fields(block))
    lengths = headers.getall("Content-Length", ())
    if route.method == "GET":
        if lengths and lengths != ["0"]:
            return None  # a GET with a body: aiohttp answers it
        lengths = ["0"]
    if len(lengths) != 1 or not _digits(lengths[0]):
        return None
    length = int(lengths[0])
    if length > max_body or any(name in headers for name in _REFUSED):
        return None
    keep_alive = True
    connection = headers.get("Connection")
    if connection is not None:
        tokens = connection.lower()
        if "upgrade" in tokens:
            return None
        keep_alive = "close" not in tokens
    body_start = head_end + 4
    return Head(route, headers, body_start, body_start + length, keep_alive)


def _fields(block: str) -> list[tuple[str, str]]:
    """(name, value) for each line of a block ``_FIELDS`` took, values without the spaces and
    tabs around them."""
    fields: list[tuple[str, str]] = _FIELD.findall(block)
    if " \r\n" in block or "\t\r\n" in block or block.endswith((" ", "\t")):
        return [(name, value.rstrip(" \t")) for name, value in fields]
    return fields


def _digits(value: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``²``, which ``int`` refuses), at most 15."""
    return value.isascii() and value.isdigit() and len(value) <= 15


def _may_be_lean(buffer: bytearray) -> bool:
    """Whether an unfinished head may still be one the lean front serves: a hot request line,
    every line ending in CRLF (a bare LF or CR goes to aiohttp, which knows what to make of it)."""
    if len(buffer) > MAX_HEAD or buffer.count(b"\n") != buffer.count(b"\r\n"):
        return False
    line_end = buffer.find(b"\r\n")
    return line_end < 0 or _route(bytes(buffer[:line_end])) is not None


class HttpDate:
    """The ``Date`` header's value, made once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True)
        return self._value


def head_bytes(status: int, headers: dict[str, str], tail: str) -> bytes:
    """A response head; a header value with a line break is dropped, never sent."""
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
        fields = "".join(
            [f"{name}: {value}\r\n" for name, value in headers.items() if _one_line(value)]
        )
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n"
    return f"{status_line}{fields}{tail}".encode("utf-8", "surrogateescape")


def _one_line(value: str) -> bool:
    return "\n" not in value and "\r" not in value


class Connection(RequestHandler):
    """One client connection: the lean front until it hands over, aiohttp after."""

    def __init__(self, manager: FrontServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._deadlines = manager.deadlines
        self._header_timeout_s = manager.header_timeout_s
        self._guard = manager.guard
        self._date = manager.date
        self.head_since: float | None = None
        self._lean = manager.guard is not None
        self._buffer = bytearray()
        self._pending: Head | None = None
        self._task: asyncio.Task[None] | None = None
        self._read_paused = False
        # The answer being streamed: its head (sent with the first data) and whether it is out.
        self._stream_head: bytes | None = None
        self._head_sent = False
        self._keep_alive = True
        self._pacer = manager.pacer
        self._stream_open = False  # counted by the pacer
        self._held: list[bytes] = []  # frames the pacer holds back

    # -- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.head_since = self._loop.time()
        self._deadlines.watch(self)

    def data_received(self, data: bytes) -> None:
        if not self._lean:
            super().data_received(data)
            if self._serving():
                self.head_since = None
            elif self.head_since is None:
                self.head_since = self._loop.time()
            return
        if self._force_close or self._close:
            return
        self._buffer += data
        if self._task is None:
            self._next_request()
        elif len(self._buffer) > PIPELINE_BUFFER and not self._read_paused:
            self._read_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._deadlines.forget(self)
        super().connection_lost(exc)
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        """Stop taking requests; a lean request in flight finishes first (graceful drain)."""
        if self._task is not None:
            self._close = True
            return
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        task = self._task
        if task is not None:
            self._close = True
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=1)
        await super().shutdown(timeout)

    def _process_keepalive(self) -> None:
        if self._task is None:
            super()._process_keepalive()
            return
        # A request in flight is not an idle connection: look again a keep-alive period later.
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    # -- the head deadline ---------------------------------------------------------------------

    def _serving(self) -> bool:
        if self._lean:
            return self._task is not None or self._pending is not None
        # A parsed head waits in the queue, or its request is being handled (body included).
        return bool(self._messages) or self._request_in_progress

    def expire(self) -> None:
        if self._serving() or self.transport is None:
            return
        get_logger().warning(
            "connection closed: request head not received in time",
            peer=str(self.peername),
            header_timeout_s=self._header_timeout_s,
        )
        self.force_close()

    # -- the lean front ------------------------------------------------------------------------

    def _next_request(self) -> None:
        buffer = self._buffer
        head = self._pending
        if head is None:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if not _may_be_lean(buffer):
                    self._hand_over()
                elif buffer and self.head_since is None:
                    self.head_since = self._loop.time()
                return
            assert self._guard is not None
            max_body = self._guard.live.current.settings.server.max_body_bytes
            head = parse_head(buffer, head_end, max_body)
            if head is None:
                self._hand_over()
                return
            self.head_since = None
            self._pending = head
        if len(buffer) < head.end:
            return
        self._pending = None
        body = bytes(buffer[head.body_start : head.end])
        del buffer[: head.end]
        self._task = self._loop.create_task(self._serve(head, body))

    def _hand_over(self) -> None:
        """aiohttp serves this connection from here on, starting with the bytes held."""
        self._lean = False
        held = bytes(self._buffer)
        self._buffer.clear()
        self.head_since = None
        if held:
            self.data_received(held)

    async def _serve(self, head: Head, body: bytes) -> None:
        guard = self._guard
        assert guard is not None
        headers = head.headers
        info = new_request_info(headers, guard.ids)
        runtime = guard.live.current
        in_flight = guard.metrics.in_flight
        in_flight.inc()
        self._stream_head = None
        self._head_sent = False
        self._keep_alive = keep_alive = head.keep_alive
        whole: WholeResponse | None = None
        endpoint = head.route.endpoint
        try:
            try:
                info.client_token_id = guard.admit(endpoint, headers, None)
                whole = await head.route.serve(Incoming(headers, body, info, runtime), self)
            except ConnectionError:
                info.status = 499
                keep_alive = False
            except Exception as exc:
                whole = error_answer(exc, info, runtime.redactor, routed=True)
            if whole is not None:
                if self._head_sent:
                    keep_alive = False  # a stream already begun cannot carry another answer
                else:
                    whole.headers.setdefault("X-Request-Id", info.request_id)
                    self._send_whole(whole, runtime.redactor, keep_alive)
        except asyncio.CancelledError:
            info.status = 499
            keep_alive = False
            raise
        finally:
            in_flight.dec()
            if self._stream_open:
                self._stream_open = False
                self._held.clear()
                self._pacer.closed()
            status = info.status or (whole.status if whole is not None else 499)
            route = head.route
            path = route.path or endpoint
            runtime.loop.call_soon(guard.log_line, route.method, path, endpoint, info, status)
            self._task = None
            self._request_done(keep_alive)

    def _request_done(self, keep_alive: bool) -> None:
        if not keep_alive or self._close or self._force_close or self.transport is None:
            self.force_close()
            return
        loop = self._loop
        close_time = loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self._buffer:
            self._next_request()

    def _send_whole(self, whole: WholeResponse, redactor: Any, keep_alive: bool) -> None:
        body = whole.body if whole.status < 400 else redact_body(whole.body, redactor)
        close = "" if keep_alive else "Connection: close\r\n"
        tail = (
            f"Content-Type: {whole.content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Date: {self._date.now()}\r\n{close}\r\n"
        )
        transport = self.transport
        if transport is not None:
            transport.write(head_bytes(whole.status, whole.headers, tail) + body)

    # -- the Outlet a stream is written to -----------------------------------------------------

    async def start_stream(self, headers: dict[str, str]) -> None:
        self.begin_stream(headers)

    def begin_stream(self, headers: dict[str, str]) -> None:
        if not self._stream_open:
            self._stream_open = True
            self._pacer.opened()
        close = "" if self._keep_alive else "Connection: close\r\n"
        tail = (
            f"Content-Type: {SSE_TYPE}\r\nTransfer-Encoding: chunked\r\n"
            f"Date: {self._date.now()}\r\n{close}\r\n"
        )
        self._stream_head = head_bytes(200, headers, tail)

    async def write(self, data: bytes) -> None:
        if not self.send_now(data):
            await self._drain_helper()

    def pushed(self) -> Connection:
        return self

    def send_now(self, data: bytes) -> bool:
        if data:
            self._send(b"%x\r\n%b\r\n" % (len(data), data))
        return not self._paused

    def send_paced(self, data: bytes) -> bool:
        pacer = self._pacer
        if not pacer.busy or self._stream_head is not None:
            return self.send_now(data)
        if data:
            self._open_transport()  # a client gone raises here, as on a write
            if not self._held:
                pacer.hold(self)
            self._held.append(b"%x\r\n%b\r\n" % (len(data), data))
        return not self._paused

    def flush(self) -> None:
        """The pacer's tick: send the frames it held back."""
        held = self._held
        if held:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(held))
            held.clear()

    async def drain(self) -> None:
        if self._paused:
            await self._drain_helper()

    async def write_eof(self, data: bytes) -> None:
        self._send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else _LAST_CHUNK)

    def _open_transport(self) -> asyncio.Transport:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        return transport

    def _send(self, frame: bytes) -> None:
        transport = self._open_transport()
        if self._stream_head is not None:
            frame = self._stream_head + frame
            self._stream_head = None
            self._head_sent = True
        elif self._held:
            self._held.append(frame)
            frame = b"".join(self._held)
            self._held.clear()
        transport.write(frame)


class FrontServer(web.Server):
    """aiohttp's server for one app, making ``Connection``s."""

    def __init__(self, base: web.Server, header_timeout_s: float, app: web.Application) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self.header_timeout_s = header_timeout_s
        self.guard: Guard | None = app.get(GUARD)
        self.date = HttpDate()
        self.pacer = Pacer(self._loop)
        self.deadlines: DeadlineSweep[Connection] = DeadlineSweep(
            header_timeout_s, since=_head_since, expire=Connection.expire, clock=self._loop.time
        )

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)


def _head_since(connection: Connection) -> float | None:
    return connection.head_since


class DaemonRunner(web.AppRunner):
    """The app runner whose connections take the lean front and the request-head deadline."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        return FrontServer(await super()._make_server(), self._header_timeout_s, self.app)
