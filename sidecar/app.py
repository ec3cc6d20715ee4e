"""``create_app(settings)``: the routes, the middlewares and every resource's lifetime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import security
from .budget import Budget
from .cache import ResponseCache, SingleFlight
from .config import Settings
from .errors import MethodNotAllowed, NotFound, RequestTooLarge, SidecarError
from .handlers import media, model, models, operator, responses, videos
from .handlers.context import (
    INFO,
    RequestIds,
    RequestInfo,
    WholeResponse,
    new_request_info,
    web_response,
)
from .health import HealthBook, Prober
from .ledger import Ledger
from .log import BatchWriter, Redactor, RequestLog, get_logger
from .metrics import Metrics
from .ratelimit import ConcurrencyCap, TokenBucket
from .relay import Relay
from .scope import Catalog
from .state import LIVE, Live, Runtime
from .upstream import Upstream
from .wire import JSON_TYPE, error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Liveness and readiness answer any caller (kubelet probes use the pod IP as Host).
OPEN_PATHS = frozenset({"/-/health", "/-/ready"})

LEDGER = web.AppKey("ledger", Ledger)
BUDGET = web.AppKey("budget", Budget)
METRICS = web.AppKey("metrics", Metrics)
SETTINGS = web.AppKey("settings", Settings)
BACKGROUND = web.AppKey("background", set[asyncio.Task[None]])


def redactor_for(settings: Settings) -> Redactor:
    secrets = [p.api_key.get_secret_value() for p in settings.providers if p.api_key is not None]
    secrets += [t.get_secret_value() for t in settings.server.client_tokens]
    return Redactor(secrets)


def fee_rate(settings: Settings) -> Decimal:
    return settings.account.service_fee_rate


def build_runtime(
    settings: Settings, *, ledger: Ledger, budget: Budget, metrics: Metrics
) -> Runtime:
    """Everything that one config decides; cheap enough to rebuild on every reload. Runs on
    the event loop (at startup and on SIGHUP)."""
    health = HealthBook(settings.providers)
    metrics.track_provider_states(lambda: {name: health.state(name) for name in health.names})
    upstreams = {p.name: Upstream(p, settings.routing) for p in settings.providers}
    return Runtime(
        settings=settings,
        catalog=Catalog(settings),
        health=health,
        upstreams=upstreams,
        relay=Relay(
            upstreams,
            health,
            first_token_timeout_s=settings.routing.first_token_timeout_s,
            idle_timeout_s=settings.routing.idle_timeout_s,
        ),
        cache=ResponseCache(settings.cache),
        flights=SingleFlight(),
        bucket=TokenBucket(settings.account.effective_rpm, plan=settings.account.plan),
        cap=ConcurrencyCap(settings.server.max_concurrent_requests),
        ledger=ledger,
        budget=budget,
        metrics=metrics,
        redactor=redactor_for(settings),
        fee_rate=fee_rate(settings),
        loop=asyncio.get_running_loop(),
    )


def keep_task(app: web.Application, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
    """Start a background task the app holds a reference to until it ends."""
    tasks = app[BACKGROUND]
    task: asyncio.Task[None] = asyncio.ensure_future(coro)
    task.set_name(name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def swap_runtime(app: web.Application, settings: Settings) -> None:
    """SIGHUP: the new config serves new requests; the old one finishes what it started."""
    live = app[LIVE]
    old = live.current
    new = build_runtime(settings, ledger=app[LEDGER], budget=app[BUDGET], metrics=app[METRICS])
    new.health.adopt(old.health)
    app[BUDGET].configure(settings.budget)
    live.current = new
    old.retired = True
    _start_prober(app)

    async def retire() -> None:
        await old.wait_idle()
        await old.close_upstreams()

    keep_task(app, retire(), "retire-runtime")


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    ledger = app[LEDGER]
    await ledger.open()
    budget = app[BUDGET]
    if settings.budget.daily_usd is not None or settings.budget.monthly_usd is not None:
        from .usage import spent_since  # the ledger reader is only needed when caps are set

        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        day_spent, month_spent = await asyncio.to_thread(
            spent_since, settings.ledger.path, day, day.replace(day=1)
        )
        budget.seed(day_spent, month_spent)
    try:
        yield
    finally:
        await ledger.close()


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    app[LIVE].current = build_runtime(
        app[SETTINGS], ledger=app[LEDGER], budget=app[BUDGET], metrics=app[METRICS]
    )
    try:
        yield
    finally:
        background = app[BACKGROUND]
        tasks = list(background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app[LIVE].current.close_upstreams()


def _start_prober(app: web.Application) -> None:
    """(Re)start active probes of ejected providers for the current runtime, if configured."""
    live = app[LIVE]
    if live.prober is not None:
        live.prober.cancel()
        live.prober = None
    runtime = live.current
    interval = runtime.settings.routing.probe_interval_s
    if interval <= 0:
        return
    upstreams = runtime.upstreams

    async def probe(name: str) -> bool:
        upstream = upstreams.get(name)
        return upstream is not None and await upstream.probe()

    live.prober = keep_task(app, Prober(runtime.health, probe, interval).run(), "health-probes")


async def _prober_ctx(app: web.Application) -> AsyncIterator[None]:
    _start_prober(app)
    yield


@dataclass(frozen=True, slots=True)
class Guard:
    """The app's parts every request touches before and after its handler, whichever server
    front read it (aiohttp's, through ``guard_for``, or the daemon's lean front)."""

    live: Live
    metrics: Metrics
    request_log: RequestLog
    ids: RequestIds

    def admit(
        self, path: str, headers: Mapping[str, str], content_length: int | None
    ) -> str | None:
        """Host, Origin, client token and body size; returns the client token's id."""
        if path in OPEN_PATHS:
            return None
        server = self.live.current.settings.server
        security.check_host(headers.get("Host"), server.allowed_hosts)
        security.check_origin(headers.get("Origin"), server.allowed_origins)
        token_id = security.check_client_token(headers.get("Authorization"), server.client_tokens)
        if content_length and content_length > server.max_body_bytes:
            raise _too_large(server.max_body_bytes)
        return token_id

    def log_line(
        self, method: str, path: str, endpoint: str, info: RequestInfo, status: int
    ) -> None:
        """The request's canonical log line and its request metrics, once its answer is out."""
        latency_ms = round((time.monotonic() - info.started) * 1000, 2)
        self.metrics.observe_request(endpoint, info.model, info.provider, status)
        self.request_log.write(
            {
                "request_id": info.request_id,
                "method": method,
                "path": path,
                "model": info.model or info.requested,
                "provider": info.provider,
                "status": status,
                "latency_ms": latency_ms,
                "attempts": info.attempts,
                "cache": info.cache,
            }
        )


GUARD = web.AppKey("guard", Guard)


def guard_for(guard: Guard) -> Middleware:
    """Request id, security checks, error rendering and the one log line per request; bound to
    the app's parts, so a request looks none of them up."""
    live, metrics, ids = guard.live, guard.metrics, guard.ids

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = new_request_info(request.headers, ids)
        request[INFO] = info
        runtime = live.current
        response: web.StreamResponse | None = None
        in_flight = metrics.in_flight
        in_flight.inc()
        try:
            info.client_token_id = guard.admit(
                request.path, request.headers, request.content_length
            )
            response = _redact_error_body(await handler(request), runtime.redactor)
            return response
        except web.HTTPException as exc:
            error = _from_http(exc, runtime.settings.server.max_body_bytes)
            response = web_response(error_response(error, runtime.redactor))
            return response
        except asyncio.CancelledError:
            info.status = 499
            raise
        except Exception as exc:
            routed = request.path.startswith("/v1/")
            whole = error_answer(exc, info, runtime.redactor, routed=routed)
            response = web_response(whole)
            return response
        finally:
            in_flight.dec()
            if response is not None and not response.prepared:
                response.headers.setdefault("X-Request-Id", info.request_id)
            # aiohttp sends a returned response before the loop runs the next callback, so the
            # log line and request metrics come after the answer's last byte, not before it.
            runtime.loop.call_soon(_log_line, guard, request, info, response)

    return middleware


def redact_body(body: bytes, redactor: Redactor) -> bytes:
    """An upstream 4xx passed back as it came may echo our key (``Incorrect API key: sk-...``)."""
    text = body.decode("utf-8", "replace")
    clean = redactor(text)
    return body if clean == text else clean.encode()


def _redact_error_body(response: web.StreamResponse, redactor: Redactor) -> web.StreamResponse:
    if response.status < 400 or not isinstance(response, web.Response):
        return response
    if isinstance(response.body, bytes):
        response.body = redact_body(response.body, redactor)
    return response


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than server.max_body_bytes ({limit} bytes); "
        "send a smaller body or raise the limit in the config."
    )


def _from_http(exc: web.HTTPException, limit: int) -> SidecarError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large(limit)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"{exc.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}."
        )
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(
            "No such endpoint; the OpenAI API is served under /v1 (e.g. POST /v1/chat/completions)."
        )
    error = SidecarError(exc.reason)
    error.status = exc.status
    return error


def _internal_error() -> SidecarError:
    error = SidecarError(
        "The sidecar hit an internal error; the details are in its log. Retry the request."
    )
    error.status, error.type, error.code = 500, "server_error", "internal_error"
    return error


def error_answer(
    exc: Exception, info: RequestInfo, redactor: Redactor, *, routed: bool
) -> WholeResponse:
    """The answer to a request whose handler raised ``exc``: a ``SidecarError``'s own (with
    ``X-TokenHub-Route`` on a ``routed`` path), anything else a logged 500."""
    if isinstance(exc, SidecarError):
        whole = error_response(exc, redactor)
        if routed:
            whole.headers.setdefault("X-TokenHub-Route", f"not routed: {exc.code}")
        return whole
    get_logger().error("unhandled error", request_id=info.request_id, error=repr(exc))
    return error_response(_internal_error(), redactor)


def error_response(exc: SidecarError, redactor: Redactor) -> WholeResponse:
    body = error_body(redactor(exc.message), type=exc.type, code=exc.code, param=exc.param)
    return WholeResponse(exc.status, dict(exc.headers), body, JSON_TYPE)


def _log_line(
    guard: Guard, request: web.Request, info: RequestInfo, response: web.StreamResponse | None
) -> None:
    status = info.status or (response.status if response is not None else 499)
    # Labels stay bounded: the matched route, not the raw path; a resolved model, not any string.
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"
    guard.log_line(request.method, request.path, endpoint, info, status)


async def _close_request_log(app: web.Application) -> None:
    request_log = app[GUARD].request_log
    request_log.flush()  # on the loop, which owns the flush timer
    await asyncio.to_thread(request_log.close)  # waits for the writer thread


def create_app(
    settings: Settings,
    *,
    ledger: Ledger | None = None,
    request_log: RequestLog | None = None,
    log_writer: BatchWriter | None = None,
) -> web.Application:
    """The daemon's aiohttp application; resources open on startup and close on cleanup."""
    metrics = Metrics()
    live = Live()
    ids = RequestIds()
    request_log = request_log or RequestLog(
        format=settings.log.format,
        level=settings.log.level,
        redactor=redactor_for(settings),
        writer=log_writer,
    )
    guard = Guard(live, metrics, request_log, ids)
    app = web.Application(
        middlewares=[guard_for(guard)],
        client_max_size=settings.server.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[LEDGER] = ledger or Ledger(
        settings.ledger,
        observe=metrics.ledger_write_seconds.observe,
        on_failure=metrics.ledger_errors.inc,
    )
    app[BUDGET] = Budget(settings.budget)
    app[BACKGROUND] = set()
    app[LIVE] = live
    app[GUARD] = guard
    app.on_cleanup.append(_close_request_log)
    app.cleanup_ctx.extend([_ledger_ctx, _runtime_ctx, _prober_ctx])
    app.router.add_routes(
        [
            web.post("/v1/chat/completions", partial(model.handle, surface=model.CHAT)),
            web.post("/v1/completions", partial(model.handle, surface=model.COMPLETIONS)),
            web.post("/v1/embeddings", partial(model.handle, surface=model.EMBEDDINGS)),
            web.post("/v1/responses", responses.handle),
            web.post("/v1/images/generations", media.images_generations),
            web.post("/v1/images/edits", media.images_edits),
            web.post("/v1/audio/transcriptions", media.transcriptions),
            web.post("/v1/audio/speech", media.speech),
            web.post("/v1/videos", videos.create_video),
            web.get("/v1/videos/{video_id}", videos.retrieve_video),
            web.get("/v1/videos/{video_id}/content", videos.video_content),
            web.get("/v1/models", models.list_models),
            web.get("/v1/models/{model_id:.+}", models.get_model),
            web.get("/-/health", operator.health),
            web.get("/-/ready", operator.ready),
            web.get("/-/providers", operator.providers),
            web.post("/-/route", operator.route),
            web.get("/metrics", operator.metrics),
        ]
    )
    videos.install(app)
    return app
