"""Per-request facts the canonical log line and the handlers share."""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

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


def new_request_info(request: web.Request, ids: RequestIds) -> RequestInfo:
    """Echo a well-formed client ``X-Request-Id``; otherwise make one."""
    given = request.headers.get("X-Request-Id")
    request_id = given if given and _REQUEST_ID.match(given) else ids.next()
    info = RequestInfo(request_id)
    request[INFO] = info
    return info


def request_info(request: web.Request) -> RequestInfo:
    return request[INFO]
