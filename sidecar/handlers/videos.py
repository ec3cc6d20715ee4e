"""Video jobs: create (multipart, routed and failed over like any model call), then retrieve and
download at the provider that created the job, as the job map says.

The create line costs nothing and is not billable; the first response that shows the job
completed (a client's poll or the sidecar's own poll of open jobs) writes its one billable line,
priced ``per_second`` of the video.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from .. import billing, wire
from ..billing import Usage
from ..config import ModelConfig
from ..errors import NotFound, UpstreamFailed
from ..jobs import Job, JobBook, jobs_path
from ..log import get_logger
from ..scope import Scope, Target
from ..state import LIVE, Runtime
from ..upstream import Upstream, UpstreamError
from . import passthrough
from .context import RequestInfo, request_info
from .exchange import Exchange, Surface, record
from .media import copy_body, multipart_sender, walk_recorded
from .passthrough import Reply

__all__ = ["JOBS", "VIDEOS", "create_video", "install", "retrieve_video", "video_content"]

VIDEOS = Surface("/v1/videos", "/videos", frozenset({"video"}), False)
# Follow-up calls: their ledger lines name the route, not the job id.
RETRIEVE = Surface("/v1/videos/{video_id}", "/videos/{video_id}", frozenset({"video"}), False)
CONTENT = Surface(
    "/v1/videos/{video_id}/content", "/videos/{video_id}/content", frozenset({"video"}), False
)
POLL_INTERVAL_S = 10.0


class Jobs:
    """The app's job map (opened at startup) and the poller of open jobs."""

    def __init__(self, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.book: JobBook | None = None
        self.poll_interval_s = poll_interval_s

    @property
    def open_book(self) -> JobBook:
        assert self.book is not None, "the job map opens at startup"
        return self.book

    async def poll_once(self, runtime: Runtime) -> None:
        """Ask each open job's provider for its state; bill the ones that completed."""
        for job in list(self.open_book.open_jobs()):
            exchange = job_exchange(runtime, RETRIEVE, job, RequestInfo("poll-" + uuid.uuid4().hex))
            try:
                reply = await _fetch(exchange, job)
            except (UpstreamFailed, UpstreamError) as exc:
                get_logger().warning("video job poll failed", job=job.id, error=str(exc))
                continue
            # Not a client request: it writes a line only if it is the one that bills the job.
            await observe(self.open_book, exchange, job, reply, unbilled_line=False)

    async def run(self, app: web.Application) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.poll_once(app[LIVE].current)


JOBS = web.AppKey("video_jobs", Jobs)


def install(app: web.Application) -> None:
    """The job map under ``JOBS``, opened (and its poller started) with the app."""
    app[JOBS] = Jobs()
    app.cleanup_ctx.append(_jobs_ctx)


async def _jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    jobs = app[JOBS]
    book = JobBook(jobs_path(app[LIVE].current.settings.ledger.path))
    await asyncio.to_thread(book.load)
    jobs.book = book
    poller = asyncio.ensure_future(jobs.run(app))
    try:
        yield
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


async def create_video(request: web.Request) -> web.StreamResponse:
    runtime = request.app[LIVE].current
    runtime.enter()
    try:
        async with runtime.cap:
            runtime.bucket.take()
            return await _create(request, runtime)
    finally:
        runtime.leave()


async def _create(request: web.Request, runtime: Runtime) -> web.Response:
    spool = await passthrough.spool_multipart(
        request, runtime.settings.server.max_body_bytes, passthrough.spool_folder(runtime)
    )
    try:
        exchange = passthrough.prepare(
            request.headers,
            request_info(request),
            VIDEOS,
            runtime,
            dict(spool.fields),
            passthrough.require_model(spool),
            1,
        )
        timeout_s = runtime.settings.routing.idle_timeout_s

        async def settle(target: Target, response: aiohttp.ClientResponse) -> Reply:
            reply = await passthrough.read_reply(target, response, timeout_s=timeout_s, json=True)
            if not reply.passed_back and not isinstance((reply.body or {}).get("id"), str):
                raise UpstreamError("video job has no id")
            return reply

        with passthrough.budgeted(exchange, seconds=requested_seconds(exchange.body)):
            reply: Reply = await walk_recorded(
                exchange, multipart_sender(VIDEOS.upstream_path, spool), settle
            )
            return await _created(request, exchange, reply)
    finally:
        spool.close()


# OpenAI's default clip length, and its longest: what a create reserves when ``seconds`` is
# absent, or present but not a number.
DEFAULT_SECONDS = Decimal(4)
LONGEST_SECONDS = Decimal(12)


def requested_seconds(fields: dict[str, Any]) -> Decimal:
    if "seconds" not in fields:
        return DEFAULT_SECONDS
    return video_seconds(fields) or LONGEST_SECONDS


async def _created(request: web.Request, exchange: Exchange, reply: Reply) -> web.Response:
    target = reply.target
    attempts = exchange.trail.attempts
    headers = exchange.base_headers(target, len(attempts), "bypass")
    if reply.passed_back:
        await record(
            exchange,
            target,
            attempts,
            reply.status,
            "upstream_error",
            Usage(),
            "none",
            billing.ZERO,
        )
    else:
        assert reply.body is not None
        book = request.app[JOBS].open_book
        job = book.new_job(
            id=reply.body["id"],
            provider=target.provider,
            model=target.model,
            upstream_model=target.upstream_model,
            region=target.region,
            requested=exchange.requested,
            per_second=str(target.spec.per_second or 0),
        )
        await book.add(job)
        cost = await observe(book, exchange, job, reply, unbilled_line=True)
        headers["X-TokenHub-Cost-USD"] = billing.usd(cost)
    exchange.info.status = reply.status
    return web.Response(
        status=reply.status,
        body=reply.raw,
        headers=headers,
        content_type=wire.mime_type(reply.content_type),
    )


def _job_of(request: web.Request) -> Job:
    job_id = request.match_info["video_id"]
    job = request.app[JOBS].open_book.get(job_id)
    if job is None:
        raise NotFound(
            f"No video job {job_id!r} was created through this sidecar; create it with "
            "POST /v1/videos here so its follow-up calls reach the provider that holds it."
        )
    return job


def _follow_up(request: web.Request, surface: Surface) -> tuple[Job, Exchange]:
    job = _job_of(request)
    info = request_info(request)
    info.requested, info.provider, info.model = job.requested, job.provider, job.model
    return job, job_exchange(request.app[LIVE].current, surface, job, info)


async def retrieve_video(request: web.Request) -> web.StreamResponse:
    """A client's poll: one ledger line, billable only if it is the first to show completion."""
    job, exchange = _follow_up(request, RETRIEVE)
    try:
        reply = await _fetch(exchange, job)
    except UpstreamError as exc:
        raise await _unreachable_recorded(exchange, job, exc.reason) from None
    cost = await observe(request.app[JOBS].open_book, exchange, job, reply, unbilled_line=True)
    headers = {"X-TokenHub-Provider": job.provider, "X-TokenHub-Cache": "bypass"}
    if not reply.passed_back:
        headers["X-TokenHub-Cost-USD"] = billing.usd(cost)
    exchange.info.status = reply.status
    return web.Response(
        status=reply.status,
        body=reply.raw,
        headers=headers,
        content_type=wire.mime_type(reply.content_type),
    )


async def video_content(request: web.Request) -> web.StreamResponse:
    """The video's bytes, streamed through; the download's line is never billable (the job is
    billed once, by the poll that sees it completed)."""
    job, exchange = _follow_up(request, CONTENT)
    target, trail = exchange.plan[0], exchange.trail
    upstream = _upstream_of(exchange, job)
    params = {k: v for k, v in request.query.items() if k == "variant"}
    trail.begin(target)
    try:
        answer = await upstream.send(
            "GET",
            f"/videos/{quote(job.id, safe='')}/content",
            params=params,
            headers={"Accept": "*/*"},
        )
    except UpstreamError as exc:
        trail.end(None, exc.reason)
        raise await _unreachable_recorded(exchange, job, exc.reason) from None
    outcome = "upstream_error" if answer.status >= 400 else "ok"
    trail.end(answer.status, "ok" if answer.status < 400 else "passed back")
    response = web.StreamResponse(
        status=answer.status,
        headers={
            "X-Request-Id": exchange.info.request_id,
            "X-TokenHub-Provider": job.provider,
            "X-TokenHub-Cache": "bypass",
        },
    )
    response.content_type = answer.headers.get("Content-Type", "application/octet-stream")
    if answer.content_length is not None:
        response.content_length = answer.content_length
    exchange.info.status = answer.status
    timeout_s = exchange.runtime.settings.routing.idle_timeout_s
    try:
        await response.prepare(request)
        async with answer:
            await copy_body(
                answer,
                response,
                timeout_s,
                before_last=lambda: _unbilled(exchange, target, answer.status, outcome),
            )
    except UpstreamError as exc:
        trail.attempts[-1].reason = exc.reason
        await _unbilled(exchange, target, answer.status, "stream_cut")
        if request.transport is not None:
            request.transport.close()  # no clean end: the client must see the file is cut
        return response
    except (ConnectionError, asyncio.CancelledError):
        if not exchange.recorded:
            await asyncio.shield(_unbilled(exchange, target, answer.status, "client_cancelled"))
        raise
    await response.write_eof()
    return response


async def _unbilled(exchange: Exchange, target: Target, status: int, outcome: str) -> None:
    await record(
        exchange,
        target,
        exchange.trail.attempts,
        status,
        outcome,
        Usage(),
        "none",
        billing.ZERO,
        billable=False,
    )


def _upstream_of(exchange: Exchange, job: Job) -> Upstream:
    upstream = exchange.runtime.upstreams.get(job.provider)
    if upstream is None:
        raise _unreachable(job, "the provider is no longer in the config")
    return upstream


def _unreachable(job: Job, reason: str) -> UpstreamFailed:
    return UpstreamFailed(
        f"The provider {job.provider} holding video job {job.id} could not be reached "
        f"({reason}); only it has the job, so retry later."
    )


async def _unreachable_recorded(exchange: Exchange, job: Job, reason: str) -> UpstreamFailed:
    """The follow-up reached for its upstream and got nothing: an unbilled upstream_failed line."""
    await _unbilled(exchange, exchange.plan[0], 502, "upstream_failed")
    return _unreachable(job, reason)


async def _fetch(exchange: Exchange, job: Job) -> Reply:
    """GET the job's state at the provider holding it (UpstreamError, attempt ended, if not)."""
    upstream = _upstream_of(exchange, job)
    target = exchange.plan[0]
    exchange.trail.begin(target)
    try:
        response = await upstream.send("GET", f"/videos/{quote(job.id, safe='')}")
        reply = await passthrough.read_reply(
            target, response, timeout_s=exchange.runtime.settings.routing.idle_timeout_s, json=False
        )
    except UpstreamError as exc:
        exchange.trail.end(None, exc.reason)
        raise
    exchange.trail.end(reply.status, "ok" if reply.status < 400 else "passed back")
    return reply


def _pseudo_target(job: Job) -> Target:
    spec = ModelConfig(
        kind="video", upstream=job.upstream_model, per_second=Decimal(job.per_second)
    )
    return Target(job.provider, job.region, job.model, job.upstream_model, spec, 1.0)


def video_seconds(body: dict[str, Any]) -> Decimal:
    try:
        seconds = Decimal(str(body.get("seconds", 0)))
    except InvalidOperation:
        return Decimal(0)
    return seconds if seconds.is_finite() and seconds > 0 else Decimal(0)


async def observe(
    book: JobBook, exchange: Exchange, job: Job, reply: Reply, *, unbilled_line: bool
) -> Decimal:
    """Write the response's ledger line; returns what it billed.

    The first response that shows the job completed writes the job's one billable line, priced
    per_second. Any other response writes an unbilled line when ``unbilled_line`` (a client's
    call, which SPEC records once per request), and nothing otherwise (the sidecar's own poll).
    """
    target = reply.target
    body = reply.body
    state = body.get("status") if body is not None and not reply.passed_back else None
    if state == "failed" and not job.closed:
        await book.mark_closed(job.id)
    if state == "completed":
        async with book.lock:
            if not job.billed:
                usage = Usage(seconds=video_seconds(body or {}))
                cost = billing.cost(usage, target.spec, exchange.runtime.fee_rate)
                exchange.spent = cost.total
                await record(
                    exchange,
                    target,
                    exchange.trail.attempts,
                    reply.status,
                    "ok",
                    usage,
                    "reported",
                    cost,
                    billable=True,
                )
                await book.mark_billed(job.id)
                if exchange.surface is not VIDEOS:
                    passthrough.charge(exchange.runtime, cost.total)  # no reservation held it
                return cost.total
    if unbilled_line:
        outcome = "upstream_error" if reply.passed_back else "ok"
        await _unbilled(exchange, target, reply.status, outcome)
    return Decimal(0)


def job_exchange(runtime: Runtime, surface: Surface, job: Job, info: RequestInfo) -> Exchange:
    """A video call's working state at the provider holding the job (its one target)."""
    target = _pseudo_target(job)
    scope = Scope(job.requested, (target,), (), False, None, "")
    return Exchange(
        surface,
        runtime,
        info,
        {},
        job.requested,
        False,
        scope,
        [target],
        passthrough.NOT_CACHED,
        None,
        info.started,
        input_estimate=0,
    )
