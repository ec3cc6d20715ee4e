"""Per-request facts the canonical log line and the handlers share."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from .. import wire
from ..state import LIVE, Runtime

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True)
class RequestInfo:
    request_id: str
    started: float = field(default_factory=time.monotonic)
    client_token_id: str | None = None
    requested: str | None = None
    model: str | None = None
    provider: str | None = None
    status: int | None = None
    attempts: int = 0
    cache: str | None = None


INFO = web.RequestKey("tokenhub_info", RequestInfo)


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


def new_request_info(headers: Mapping[str, str], ids: RequestIds) -> RequestInfo:
    """Echo a well-formed client ``X-Request-Id``; otherwise make one."""
    given = headers.get("X-Request-Id")
    return RequestInfo(given if given and _REQUEST_ID.match(given) else ids.next())


def request_info(request: web.Request) -> RequestInfo:
    return request[INFO]


@dataclass(slots=True)
class Incoming:
    """A model request as the handlers need it, whichever server front read it."""

    headers: Mapping[str, str]
    body: bytes
    info: RequestInfo
    runtime: Runtime


@dataclass(slots=True)
class WholeResponse:
    """An answer sent in one piece (a streamed one goes out through an ``Outlet``)."""

    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str


class Outlet(Protocol):
    """Where a streamed answer goes: aiohttp's ``StreamResponse`` or the lean front's
    connection. The head goes out with the first write."""

    async def start_stream(self, headers: dict[str, str]) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes) -> None: ...

    def pushed(self) -> PushOutlet | None:
        """This outlet, if it also takes writes from a callback; None if only ``write``."""


class PushOutlet(Outlet, Protocol):
    """An ``Outlet`` that also takes a write at once, from a callback (the lean front)."""

    def begin_stream(self, headers: dict[str, str]) -> None:
        """``start_stream``, from a callback."""

    def send_now(self, data: bytes) -> bool:
        """Write ``data`` now; False when the client reads slower than that: ``drain()``."""

    def send_paced(self, data: bytes) -> bool:
        """``send_now``; or, while the loop runs late, held for a moment and sent with the next
        (``pacing.py``). The write that carries the stream's head always goes out at once."""

    async def drain(self) -> None: ...


class WebOutlet:
    """An ``Outlet`` over aiohttp: a 200 ``text/event-stream`` answer to ``request``."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start_stream(self, headers: dict[str, str]) -> None:
        response = web.StreamResponse(headers=headers)
        response.content_type = wire.SSE_TYPE
        self.response = response
        await response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def write_eof(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write_eof(data)

    def pushed(self) -> None:
        return None


Serve = Callable[[Incoming, Outlet], Awaitable[WholeResponse | None]]


async def on_aiohttp(request: web.Request, serve: Serve) -> web.StreamResponse:
    """Serve a request that aiohttp read: its body in full, then aiohttp's response."""
    outlet = WebOutlet(request)
    incoming = Incoming(
        request.headers, await request.read(), request_info(request), request.app[LIVE].current
    )
    whole = await serve(incoming, outlet)
    if whole is not None:
        return web_response(whole)
    assert outlet.response is not None
    return outlet.response


def web_response(whole: WholeResponse) -> web.Response:
    return web.Response(
        status=whole.status, body=whole.body, headers=whole.headers, content_type=whole.content_type
    )
