"""Walks a routing plan: one attempt per provider, SPEC's failover rules, the stream commit point.

Each attempt is observed by the health book. A stream is handed back only once its first content
arrived: role-only and empty chunks are held, so a stream that fails before that can still move on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from .errors import UpstreamFailed
from .h1 import BodyCut, H1Response
from .health import HealthBook, parse_retry_after
from .scope import Scope, Target
from .sweep import DeadlineSweep
from .upstream import Upstream, UpstreamError
from .wire import JSON_TYPE as wire_json
from .wire import SSE_TYPE, SSEDecoder, has_content

# Outcomes that say "this provider, not this request": move on to the next provider.
FAILOVER_STATUSES = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})
MAX_EVENT_BYTES = 1 << 20
# How long a stream's connection waits, after the stream's last event, for the body's end that
# lets it be pooled; servers write that end right after the event, or not at all.
END_GRACE_S = 1.0


@dataclass(slots=True)
class Attempt:
    provider: str
    status: int | None
    reason: str
    ms: int

    def ledger_fields(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "ms": self.ms,
        }


@dataclass(slots=True)
class Trail:
    """The attempts of one request so far, visible to the handler even if it is cancelled."""

    attempts: list[Attempt] = field(default_factory=list)
    current: Target | None = None
    started: float = 0.0

    def begin(self, target: Target) -> None:
        self.current = target
        self.started = time.monotonic()

    def end(self, status: int | None, reason: str) -> Attempt:
        assert self.current is not None
        attempt = Attempt(self.current.provider, status, reason, _elapsed_ms(self.started))
        self.attempts.append(attempt)
        return attempt


class AllAttemptsFailed(UpstreamFailed):
    """502 ``upstream_failed``, carrying the attempts for the ledger line."""

    def __init__(self, requested: str, trail: Trail) -> None:
        super().__init__(
            failure_summary(requested, trail.attempts),
            headers={
                "X-TokenHub-Attempts": str(len(trail.attempts)),
                "X-TokenHub-Route": route_failed(trail.attempts),
            },
        )
        self.trail = trail


@dataclass(slots=True)
class Answer:
    """A complete non-stream upstream answer (2xx), or a 4xx passed back as it came."""

    target: Target
    status: int
    raw: bytes
    content_type: str
    body: dict[str, Any] | None
    attempts: list[Attempt]

    @property
    def passed_back(self) -> bool:
        return self.status >= 400


@dataclass(slots=True, eq=False)
class OpenStream:
    """A stream past its commit point: held events to send first, then ``next_payload()``."""

    target: Target
    response: H1Response
    held: list[tuple[bytes, dict[str, Any]]]
    attempts: list[Attempt]
    idle_timeout_s: float
    decoder: SSEDecoder
    pending: deque[bytes] = field(default_factory=deque)
    done: bool = False
    touched: float = field(default_factory=time.monotonic)
    timed_out: bool = False
    watch: DeadlineSweep[OpenStream] | None = None

    async def next_payload(self) -> bytes | None:
        """The next event's data (``b"[DONE]"`` included); None at a clean end of the body.

        Raises UpstreamError when the upstream stalls past the idle timeout or cuts the stream.
        """
        while True:
            if self.pending:
                return self.pending.popleft()
            try:
                data = await self.response.content.readany()
            except (aiohttp.ClientError, ConnectionError) as exc:
                self.ended(exc)
            if not data:
                self.ended(None)
                return None
            self.pending.extend(self.decode(data))

    def decode(self, data: bytes) -> list[bytes]:
        """The payloads of the events one read completed. Raises UpstreamError once an event
        grows past ``MAX_EVENT_BYTES``."""
        self.touched = time.monotonic()
        payloads = self.decoder.feed(data)
        if len(self.decoder.pending) > MAX_EVENT_BYTES:
            raise UpstreamError("stream event too large (not SSE?)")
        return payloads

    def ended(self, cut: BaseException | None) -> None:
        """The body ended, ``cut`` by an error or not: raises UpstreamError unless the end was
        clean (not timed out, not inside an event)."""
        if cut is not None or self.timed_out:
            raise UpstreamError(self._cut_reason(cut)) from None
        if self.decoder.pending.strip():
            raise UpstreamError("stream ended inside an event")

    @property
    def has_buffered(self) -> bool:
        """True when ``next_payload`` can answer from events already read, without waiting."""
        return bool(self.pending)

    def _cut_reason(self, exc: BaseException | None) -> str:
        if self.timed_out:
            return f"no data between chunks within {self.idle_timeout_s:g}s"
        return f"stream cut: {exc if isinstance(exc, BodyCut) else type(exc).__name__}"

    def close(self) -> None:
        """Drop the upstream connection at once (stops generation; never returned to the pool)."""
        if self.watch is not None:
            self.watch.forget(self)
        self.response.close()

    def finish(self) -> None:
        """The stream's last event came: its connection goes back to the pool when the body's
        end follows within ``END_GRACE_S`` (``close()`` drops it)."""
        if self.watch is not None:
            self.watch.forget(self)
        self.response.finish(END_GRACE_S)


def _last_data(stream: OpenStream) -> float:
    return stream.touched


def _cut_idle(stream: OpenStream) -> None:
    """The upstream sent nothing for ``idle_timeout_s``: ``next_payload`` then says so."""
    stream.timed_out = True
    stream.close()


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def upstream_body(body: Mapping[str, Any], target: Target, *, stream: bool) -> bytes:
    """The client's body with the provider's model name; streams always ask for usage."""
    rewritten = dict(body)
    rewritten["model"] = target.upstream_model
    if stream:
        options = body.get("stream_options")
        rewritten["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return orjson.dumps(rewritten)


def route_failed(attempts: Sequence[Attempt]) -> str:
    """The ``X-TokenHub-Route`` line of the sidecar's own 502: who was tried, in order."""
    if not attempts:
        return "no provider was tried"
    return "every provider tried failed: " + ", ".join(a.provider for a in attempts)


def failure_summary(requested: str, attempts: Sequence[Attempt]) -> str:
    tried = "; ".join(
        f"{a.provider}: {'HTTP ' + str(a.status) if a.status else a.reason}"
        + (f" ({a.reason})" if a.status and a.reason and a.reason != f"HTTP {a.status}" else "")
        for a in attempts
    )
    return (
        f"Every provider tried for {requested} failed ({len(attempts)} attempt"
        f"{'s' if len(attempts) != 1 else ''}): {tried}. The sidecar already failed over; "
        "retry later, or widen the bounds in [preferences] if more providers may serve it."
    )


class Relay:
    """Sends one request along a plan of targets, failing over as SPEC lists."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        health: HealthBook,
        *,
        first_token_timeout_s: float,
        idle_timeout_s: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._upstreams = upstreams
        self._health = health
        self._first_token_timeout_s = first_token_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._idle_watch: DeadlineSweep[OpenStream] = DeadlineSweep(
            idle_timeout_s, since=_last_data, expire=_cut_idle, clock=time.monotonic
        )
        self._wall = wall

    async def call(
        self, path: str, plan: Sequence[Target], body: Mapping[str, Any], scope: Scope, trail: Trail
    ) -> Answer:
        for target in plan:
            response = await self._open(path, target, body, scope, trail, stream=False)
            if response is None:
                continue
            async with response:
                try:
                    raw = await response.read()  # bounded by the upstream's read timeout
                except (TimeoutError, ConnectionError) as exc:
                    reason = "body timed out" if isinstance(exc, TimeoutError) else "body cut"
                    self._fail(trail, response.status, reason)
                    continue
            content_type = response.headers.get("Content-Type", wire_json)
            if response.status >= 400:
                return self._passed_back(trail, response.status, raw, content_type)
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                self._fail(trail, response.status, "body is not a JSON object")
                continue
            trail.end(response.status, "ok")
            self._health.record_success(target.provider)
            return Answer(target, response.status, raw, content_type, parsed, trail.attempts)
        raise AllAttemptsFailed(scope.requested, trail)

    async def open_stream(
        self,
        path: str,
        plan: Sequence[Target],
        body: Mapping[str, Any],
        scope: Scope,
        trail: Trail,
        on_commit: Callable[[OpenStream], None] | None = None,
    ) -> OpenStream | Answer:
        """The first stream to reach its commit point, or a 4xx passed back.

        ``on_commit`` is called with the stream inside the upstream's read callback at that
        point, before this returns: to begin the answer there and then. Without it the stream's
        reads wait for ``next_payload()``. Once ``on_commit`` began, an exception it raised, or
        a cancellation, is the caller's to account for (the stream is closed)."""
        for target in plan:
            response = await self._open(path, target, body, scope, trail, stream=True)
            if response is None:
                continue
            if response.status >= 400:
                async with response:
                    raw = await _read_quietly(response)
                content_type = response.headers.get("Content-Type", wire_json)
                return self._passed_back(trail, response.status, raw, content_type)
            stream = await self._until_content(target, response, trail, on_commit)
            if stream is not None:
                return stream
        raise AllAttemptsFailed(scope.requested, trail)

    def _passed_back(self, trail: Trail, status: int, raw: bytes, content_type: str) -> Answer:
        """An upstream 4xx about the request itself goes back to the client as it came."""
        assert trail.current is not None
        trail.end(status, "passed back")
        self._health.record_success(trail.current.provider)
        return Answer(trail.current, status, raw, content_type, None, trail.attempts)

    async def _open(
        self,
        path: str,
        target: Target,
        body: Mapping[str, Any],
        scope: Scope,
        trail: Trail,
        *,
        stream: bool,
    ) -> H1Response | None:
        """One attempt up to response headers (on the lean client, ``h1.py``); None (after
        recording why) if it must move on."""
        if target not in scope.targets:
            raise AssertionError(f"plan left the scope: {target.provider}/{target.model}")
        trail.begin(target)
        upstream = self._upstreams[target.provider]
        payload = upstream_body(body, target, stream=stream)
        try:
            response = await upstream.post(path, payload, stream=stream)
        except UpstreamError as exc:
            self._fail(trail, None, exc.reason)
            return None
        status = response.status
        if status < 400 and not 200 <= status < 300:
            response.close()
            self._fail(trail, status, f"unexpected HTTP {status}")
            return None
        if status in FAILOVER_STATUSES or status >= 500:
            retry_after = parse_retry_after(response.headers, now=self._wall())
            response.close()
            self._fail(trail, status, f"HTTP {status}", retry_after)
            return None
        return response

    async def _until_content(
        self,
        target: Target,
        response: H1Response,
        trail: Trail,
        on_commit: Callable[[OpenStream], None] | None,
    ) -> OpenStream | None:
        if not response.headers.get("Content-Type", "").startswith(SSE_TYPE):
            response.close()
            self._fail(trail, response.status, "stream is not SSE")
            return None
        stream = self.reader(target, response, trail.attempts)

        def commit() -> None:
            trail.end(response.status, "ok")
            self._health.record_success(target.provider)
            self.watch_idle(stream)
            if on_commit is None:
                response.pull()
            else:
                on_commit(stream)

        hold = _Hold(stream, commit, self._first_token_timeout_s)
        response.push_to(hold)
        try:
            await hold.committed
        except BaseException as exc:
            response.close()  # on cancellation: the client went away, stop the generation
            if hold.began or not isinstance(exc, UpstreamError):
                raise
            self._fail(trail, response.status, exc.reason)
            return None
        finally:
            hold.stop()
        return stream

    def reader(
        self,
        target: Target,
        response: H1Response,
        attempts: list[Attempt],
    ) -> OpenStream:
        """An ``OpenStream`` over an SSE response, not yet on the idle clock (the Responses
        handler, which finds its own commit point, reads its streams through one too)."""
        return OpenStream(target, response, [], attempts, self._idle_timeout_s, SSEDecoder())

    def watch_idle(self, stream: OpenStream) -> None:
        """Past the commit point: the stream is cut once it sends nothing for the idle timeout."""
        stream.touched = time.monotonic()
        stream.watch = self._idle_watch
        self._idle_watch.watch(stream)

    def _fail(
        self, trail: Trail, status: int | None, reason: str, retry_after_s: float | None = None
    ) -> None:
        attempt = trail.end(status, reason)
        self._health.record_failure(
            attempt.provider, reason=reason, status=status, retry_after_s=retry_after_s
        )


class _Hold:
    """The ``StreamSink`` of a stream before its commit point. Role-only and empty chunks are
    held; the first chunk with content commits the stream inside the read callback, so a lean
    front can send it on at once instead of after the waiting task's turn on a busy loop.

    ``committed`` resolves then, or fails with the UpstreamError that ends the attempt:
    no content within ``timeout_s``, an error event, the body's end or cut."""

    __slots__ = ("stream", "committed", "began", "_commit", "_timer")

    def __init__(self, stream: OpenStream, commit: Callable[[], None], timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.stream = stream
        self.committed: asyncio.Future[None] = loop.create_future()
        self.began = False  # the stream was committed (even if what ``commit`` did then failed)
        self._commit = commit
        self._timer = loop.call_later(timeout_s, self._expire, timeout_s)

    def on_data(self, data: bytes) -> None:
        if self.committed.done():
            return
        stream = self.stream
        try:
            payloads = stream.decode(data)
            for index, payload in enumerate(payloads):
                chunk = _chunk_before_content(payload)
                stream.held.append((payload, chunk))
                if has_content(chunk):
                    stream.pending.extend(payloads[index + 1 :])
                    self.began = True
                    self._commit()
                    self.committed.set_result(None)
                    return
        except Exception as exc:  # UpstreamError; or, from ``commit``, the client gone, a bug
            self.committed.set_exception(exc)

    def on_end(self, error: Exception | None) -> None:
        if self.committed.done():
            return
        try:
            self.stream.ended(error)
        except UpstreamError as exc:
            self.committed.set_exception(exc)
        else:
            self.committed.set_exception(UpstreamError("stream ended before any content"))

    def _expire(self, timeout_s: float) -> None:
        if not self.committed.done():
            self.committed.set_exception(UpstreamError(f"no content within {timeout_s:g}s"))

    def stop(self) -> None:
        self._timer.cancel()
        committed = self.committed
        if committed.done() and not committed.cancelled():
            committed.exception()  # seen, even by a task cancelled before it looked


def event_object(payload: bytes) -> dict[str, Any]:
    """A stream event's data as a JSON object; UpstreamError (its reason) for anything else."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError("stream event is not JSON") from None
    if not isinstance(event, dict):
        raise UpstreamError("stream event is not a JSON object")
    return event


def _chunk_before_content(payload: bytes) -> dict[str, Any]:
    if payload == b"[DONE]":
        raise UpstreamError("stream ended before any content")
    chunk = event_object(payload)
    if "error" in chunk:
        raise UpstreamError("error event before any content")
    return chunk


async def _read_quietly(response: H1Response) -> bytes:
    try:
        return await response.read()
    except ConnectionError:
        return b""
