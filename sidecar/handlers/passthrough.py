"""What the media surfaces share: a failover walk over raw upstream responses, and multipart
bodies spooled to a temporary file so an upload is never held in memory and can still be sent
again to the next provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, BinaryIO, TypeVar

import aiohttp
import orjson
from aiohttp import web

from .. import billing, routing, wire
from ..budget import Reservation
from ..cache import Decision
from ..errors import InvalidRequest, RequestTooLarge
from ..h1 import H1Response
from ..health import parse_retry_after
from ..relay import FAILOVER_STATUSES, AllAttemptsFailed
from ..scope import Target, parse_narrowing
from ..state import Runtime
from ..upstream import Upstream, UpstreamError
from .context import RequestInfo
from .exchange import Exchange, Surface, ensure_ledger

CHUNK_BYTES = 1 << 16
# A spool's writes and reads go to a worker thread this many bytes at a time, not on the loop.
SPOOL_IO_BYTES = 1 << 20
NOT_CACHED = Decision(False, False, "not a cached endpoint")

T = TypeVar("T")
# Either client's response: the Responses API streams on the lean one, media on aiohttp's.
R = TypeVar("R", aiohttp.ClientResponse, H1Response)
Send = Callable[[Upstream, Target], Awaitable[R]]


@dataclass(slots=True)
class Reply:
    """A complete upstream answer: a 2xx, or a 4xx about the request passed back as it came."""

    target: Target
    status: int
    raw: bytes
    content_type: str
    body: dict[str, Any] | None

    @property
    def passed_back(self) -> bool:
        return self.status >= 400


async def walk(
    exchange: Exchange,
    send: Send[R],
    settle: Callable[[Target, R], Awaitable[T]],
) -> T:
    """Try the plan in order with the same failover rules as ``Relay``.

    ``settle`` turns a 2xx (or a passed-back 4xx) into the answer, or raises ``UpstreamError``
    (a 200 that is not what the endpoint promises) to move on to the next provider.
    """
    runtime, trail = exchange.runtime, exchange.trail
    for target in exchange.plan:
        if not exchange.scope.allows(target.provider, target.model):
            raise AssertionError(f"plan left the scope: {target.provider}/{target.model}")
        trail.begin(target)
        try:
            response = await send(runtime.upstreams[target.provider], target)
        except UpstreamError as exc:
            _fail(runtime, exchange, None, exc.reason)
            continue
        status = response.status
        if status in FAILOVER_STATUSES or status >= 500 or 300 <= status < 400:
            retry_after = parse_retry_after(response.headers, now=time.time())
            response.close()
            _fail(runtime, exchange, status, f"HTTP {status}", retry_after)
            continue
        try:
            answer = await settle(target, response)
        except UpstreamError as exc:
            response.close()
            _fail(runtime, exchange, status, exc.reason)
            continue
        trail.end(status, "ok" if status < 400 else "passed back")
        runtime.health.record_success(target.provider)
        return answer
    raise AllAttemptsFailed(exchange.scope.requested, trail)


async def read_reply(
    target: Target,
    response: aiohttp.ClientResponse | H1Response,
    *,
    timeout_s: float,
    json: bool,
) -> Reply:
    """Read a whole answer; with ``json`` a 2xx must be a JSON object (else: fail over)."""
    content_type = response.headers.get("Content-Type", wire.JSON_TYPE)
    try:
        async with response, asyncio.timeout(timeout_s):
            raw = await response.read()
    except TimeoutError:
        raise UpstreamError("body timed out") from None
    except (aiohttp.ClientError, ConnectionError):
        raise UpstreamError("body cut") from None
    if response.status >= 400:
        return Reply(target, response.status, raw, content_type, None)
    body: dict[str, Any] | None = None
    if json or content_type.startswith(wire.JSON_TYPE):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UpstreamError("body is not a JSON object")
        body = parsed
    return Reply(target, response.status, raw, content_type, body)


def _fail(
    runtime: Runtime,
    exchange: Exchange,
    status: int | None,
    reason: str,
    retry_after_s: float | None = None,
) -> None:
    attempt = exchange.trail.end(status, reason)
    runtime.health.record_failure(
        attempt.provider, reason=reason, status=status, retry_after_s=retry_after_s
    )


def prepare(
    headers: Mapping[str, str],
    info: RequestInfo,
    surface: Surface,
    runtime: Runtime,
    body: dict[str, Any],
    requested: str,
    input_estimate: int,
) -> Exchange:
    """Scope, plan and ledger check for a request the response cache never serves."""
    info.requested = requested
    settings = runtime.settings
    narrowing = parse_narrowing(
        headers.get("X-TokenHub-Regions"), headers.get("X-TokenHub-Providers"), settings
    )
    scope = runtime.catalog.resolve(requested, narrowing, kinds=surface.kinds)
    plan = routing.plan(
        scope,
        runtime.health,
        affinity=routing.affinity_key(headers.get("X-TokenHub-Affinity"), body),
        sticky=settings.routing.sticky,
        max_providers=settings.routing.max_providers,
    )
    ensure_ledger(runtime)
    return Exchange(
        surface,
        runtime,
        info,
        body,
        requested,
        False,
        scope,
        plan,
        NOT_CACHED,
        None,
        info.started,
        input_estimate=input_estimate,
    )


@dataclass(slots=True)
class Spool:
    """A multipart body minus its ``model`` field, on disk; small text fields kept in ``fields``."""

    path: str
    boundary: str
    size: int = 0
    model: str | None = None
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _model_part(self, upstream_model: str) -> bytes:
        return _part_head(self.boundary, "model", None, None) + upstream_model.encode() + b"\r\n"

    def length(self, upstream_model: str) -> int:
        return len(self._model_part(upstream_model)) + self.size

    async def body(self, upstream_model: str) -> AsyncIterator[bytes]:
        """The body for one attempt: the provider's model name, then the spooled parts."""
        yield self._model_part(upstream_model)
        with open(self.path, "rb") as spooled:
            while chunk := await asyncio.to_thread(spooled.read, SPOOL_IO_BYTES):
                yield chunk

    def headers(self, upstream_model: str) -> dict[str, str]:
        return {
            "Content-Type": self.content_type,
            "Content-Length": str(self.length(upstream_model)),
        }

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# Text fields worth keeping in memory (routing, billing); anything larger is only spooled.
_KEPT_FIELD_BYTES = 4096


def _part_head(boundary: str, name: str, filename: str | None, content_type: str | None) -> bytes:
    disposition = f'form-data; name="{_quote(name)}"'
    if filename is not None:
        disposition += f'; filename="{_quote(filename)}"'
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return (head + "\r\n").encode()


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "").replace("\n", "")


async def spool_multipart(request: web.Request, limit: int, folder: str | None) -> Spool:
    """Copy a multipart request to a temp file chunk by chunk, setting the ``model`` field aside."""
    if not request.content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            f"{request.path} takes multipart/form-data (a file upload); send the fields as "
            "form parts, as the OpenAI SDK does."
        )
    handle, path = tempfile.mkstemp(prefix="tokenhub-upload-", dir=folder)
    spool = Spool(path, "tokenhub-" + uuid.uuid4().hex)
    try:
        with os.fdopen(handle, "wb") as file:
            out = _SpoolWriter(file)
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, aiohttp.BodyPartReader) or not part.name:
                    raise InvalidRequest("a multipart part has no field name (or is nested).")
                await _copy_part(part, spool, out, limit)
            closing = f"--{spool.boundary}--\r\n".encode()
            await out.write(closing)
            spool.size += len(closing)
            await out.flush()
    except BaseException:
        spool.close()
        raise
    return spool


class _SpoolWriter:
    """Gathers a spool's bytes and writes them from a worker thread, a megabyte at a time."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._parts: list[bytes] = []
        self._size = 0

    async def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= SPOOL_IO_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            await asyncio.to_thread(self._file.write, data)


async def _copy_part(
    part: aiohttp.BodyPartReader, spool: Spool, out: _SpoolWriter, limit: int
) -> None:
    name = part.name or ""
    if name == "model" and part.filename is None:
        spool.model = (await part.text()).strip()
        return
    content_type = part.headers.get("Content-Type") if part.filename is not None else None
    head = _part_head(spool.boundary, name, part.filename, content_type)
    await out.write(head)
    spool.size += len(head)
    kept = bytearray() if part.filename is None else None
    while chunk := await part.read_chunk(CHUNK_BYTES):
        spool.size += len(chunk)
        if spool.size > limit:
            raise RequestTooLarge(
                f"The request body is larger than server.max_body_bytes ({limit} bytes); "
                "send a smaller file or raise the limit in the config."
            )
        await out.write(chunk)
        if kept is not None and len(kept) <= _KEPT_FIELD_BYTES:
            kept += chunk
    await out.write(b"\r\n")
    spool.size += 2
    if kept is not None and len(kept) <= _KEPT_FIELD_BYTES:
        spool.fields[name] = kept.decode("utf-8", "replace")


def require_model(spool: Spool) -> str:
    if not spool.model:
        raise InvalidRequest(
            "The request has no `model` form field; set it to a model name, provider/model or "
            "an alias (GET /v1/models lists them).",
            param="model",
        )
    return spool.model


def spool_folder(runtime: Runtime) -> str:
    """Uploads spool beside the ledger: a disk the operator already sized, not a tmpfs in RAM."""
    return str(runtime.settings.ledger.path.parent)


def _capped(runtime: Runtime) -> bool:
    caps = runtime.settings.budget
    return caps.daily_usd is not None or caps.monthly_usd is not None


def reserve(
    exchange: Exchange,
    *,
    images: int = 0,
    seconds: Decimal = Decimal(0),
    characters: int = 0,
) -> Reservation | None:
    """Hold the request's worst case against the ``[budget]`` caps before it is sent (as the chat
    path does), over every target it may reach; raises BudgetExceeded (429) when a cap would pass.
    """
    runtime = exchange.runtime
    if not _capped(runtime):
        return None
    max_tokens = wire.max_tokens_of(exchange.body)
    worst = max(
        (
            billing.worst_case(
                t.spec,
                runtime.fee_rate,
                input_tokens=exchange.input_estimate,
                max_tokens=max_tokens,
                images=images,
                seconds=seconds,
                characters=characters,
            )
            for t in exchange.plan
        ),
        default=Decimal(0),
    )
    return runtime.budget.reserve(worst)


@contextlib.contextmanager
def budgeted(
    exchange: Exchange,
    *,
    images: int = 0,
    seconds: Decimal = Decimal(0),
    characters: int = 0,
) -> Iterator[None]:
    """Reserve the worst case, and settle what the request actually cost (``exchange.spent``)."""
    reservation = reserve(exchange, images=images, seconds=seconds, characters=characters)
    try:
        yield
    finally:
        if reservation is not None:
            exchange.runtime.budget.settle(reservation, exchange.spent)


def charge(runtime: Runtime, amount: Decimal) -> None:
    """Count spend no reservation held (a video job billed by a later poll) against the caps."""
    if _capped(runtime) and amount > 0:
        runtime.budget.charge(amount)
