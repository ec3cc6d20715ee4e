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

from .. import billing
from ..billing import Usage
from ..config import ModelConfig
from ..errors import NotFound, UpstreamFailed
from ..jobs import Job, JobBook, jobs_path
from ..log import get_logger
from ..relay import Attempt
from ..scope import Scope, Target
from ..state import LIVE, Runtime
from ..upstream import Upstream, UpstreamError
from . import passthrough
from .context import RequestInfo, request_info
from .exchange import Exchange, Surface, record
from .media import multipart_sender, walk_recorded
from .passthrough import CHUNK_BYTES, Reply

__all__ = ["JOBS", "VIDEOS", "create_video", "install", "retrieve_video", "video_content"]

VIDEOS = Surface("/v1/videos", "/videos", frozenset({"video"}), False)
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
            try:
                reply = await _fetch(runtime, job, f"/videos/{quote(job.id, safe='')}", {})
            except (UpstreamFailed, UpstreamError) as exc:
                get_logger().warning("video job poll failed", job=job.id, error=str(exc))
                continue
            await observe(self.open_book, runtime, job, reply, "poll-" + uuid.uuid4().hex)

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
    book.load()
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
            request, VIDEOS, runtime, dict(spool.fields), passthrough.require_model(spool), 1
        )
        timeout_s = runtime.settings.routing.idle_timeout_s

        async def settle(target: Target, response: aiohttp.ClientResponse) -> Reply:
            reply = await passthrough.read_reply(target, response, timeout_s=timeout_s, json=True)
            if not reply.passed_back and not isinstance((reply.body or {}).get("id"), str):
                raise UpstreamError("video job has no id")
            return reply

        reply: Reply = await walk_recorded(
            exchange, multipart_sender(VIDEOS.upstream_path, spool), settle
        )
    finally:
        spool.close()
    return await _created(request, exchange, reply)


async def _created(request: web.Request, exchange: Exchange, reply: Reply) -> web.Response:
    target = reply.target
    attempts = exchange.trail.attempts
    job: Job | None = None
    if not reply.passed_back:
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
        book.add(job)
    outcome = "upstream_error" if reply.passed_back else "ok"
    await record(
        exchange,
        target,
        attempts,
        reply.status,
        outcome,
        Usage(),
        "none",
        billing.ZERO,
        billable=False,
    )
    headers = exchange.base_headers(target, len(attempts), "bypass")
    if job is not None:
        headers["X-TokenHub-Cost-USD"] = "0"
        await observe(request.app[JOBS].open_book, exchange.runtime, job, reply, None)
    exchange.info.status = reply.status
    return web.Response(
        status=reply.status,
        body=reply.raw,
        headers=headers,
        content_type=reply.content_type.split(";", 1)[0].strip() or "application/json",
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


async def retrieve_video(request: web.Request) -> web.StreamResponse:
    runtime = request.app[LIVE].current
    job = _job_of(request)
    info = request_info(request)
    info.requested, info.provider, info.model = job.requested, job.provider, job.model
    reply = await _fetch(runtime, job, f"/videos/{quote(job.id, safe='')}", {})
    await observe(request.app[JOBS].open_book, runtime, job, reply, info.request_id)
    return web.Response(
        status=reply.status,
        body=reply.raw,
        headers={"X-TokenHub-Provider": job.provider, "X-TokenHub-Cache": "bypass"},
        content_type=reply.content_type.split(";", 1)[0].strip() or "application/json",
    )


async def video_content(request: web.Request) -> web.StreamResponse:
    runtime = request.app[LIVE].current
    job = _job_of(request)
    info = request_info(request)
    info.requested, info.provider, info.model = job.requested, job.provider, job.model
    upstream = _upstream_of(runtime, job)
    params = {k: v for k, v in request.query.items() if k == "variant"}
    try:
        answer = await upstream.send(
            "GET",
            f"/videos/{quote(job.id, safe='')}/content",
            params=params,
            headers={"Accept": "*/*"},
        )
    except UpstreamError as exc:
        raise _unreachable(job, exc.reason) from None
    response = web.StreamResponse(
        status=answer.status,
        headers={"X-TokenHub-Provider": job.provider, "X-TokenHub-Cache": "bypass"},
    )
    response.content_type = answer.headers.get("Content-Type", "application/octet-stream")
    if answer.content_length is not None:
        response.content_length = answer.content_length
    async with answer:
        await response.prepare(request)
        async for chunk in answer.content.iter_chunked(CHUNK_BYTES):
            await response.write(chunk)
    await response.write_eof()
    return response


def _upstream_of(runtime: Runtime, job: Job) -> Upstream:
    upstream = runtime.upstreams.get(job.provider)
    if upstream is None:
        raise _unreachable(job, "the provider is no longer in the config")
    return upstream


def _unreachable(job: Job, reason: str) -> UpstreamFailed:
    return UpstreamFailed(
        f"The provider {job.provider} holding video job {job.id} could not be reached "
        f"({reason}); only it has the job, so retry later."
    )


async def _fetch(runtime: Runtime, job: Job, path: str, params: dict[str, str]) -> Reply:
    upstream = _upstream_of(runtime, job)
    try:
        response = await upstream.send("GET", path, params=params)
        return await passthrough.read_reply(
            _pseudo_target(job),
            response,
            timeout_s=runtime.settings.routing.idle_timeout_s,
            json=False,
        )
    except UpstreamError as exc:
        raise _unreachable(job, exc.reason) from None


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
    book: JobBook, runtime: Runtime, job: Job, reply: Reply, request_id: str | None
) -> None:
    """Write the job's billable line the first time a response shows it completed; exactly once."""
    body = reply.body
    if reply.passed_back or body is None or job.closed:
        return
    state = body.get("status")
    if state == "failed":
        book.mark_closed(job.id)
        return
    if state != "completed":
        return
    async with book.lock:
        if job.billed:
            return
        target = _pseudo_target(job)
        usage = Usage(seconds=video_seconds(body))
        cost = billing.cost(usage, target.spec, runtime.fee_rate)
        info = RequestInfo(request_id or "poll-" + uuid.uuid4().hex)
        await record(
            job_exchange(runtime, job, info),
            target,
            [Attempt(job.provider, reply.status, "ok", 0)],
            reply.status,
            "ok",
            usage,
            "reported",
            cost,
            billable=True,
        )
        book.mark_billed(job.id)


def job_exchange(runtime: Runtime, job: Job, info: RequestInfo) -> Exchange:
    """A follow-up call's working state: its one target is the provider holding the job."""
    target = _pseudo_target(job)
    scope = Scope(job.requested, (target,), (), False, None, "")
    return Exchange(
        VIDEOS,
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
