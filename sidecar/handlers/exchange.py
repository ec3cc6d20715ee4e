"""One request's working state, how its route is explained, and how its ledger line is written."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .. import billing, routing
from ..billing import Cost, Usage
from ..cache import CacheStats, Decision
from ..errors import LedgerUnavailable
from ..metrics import Metrics
from ..relay import Attempt, Trail
from ..scope import Scope, Target
from ..state import Runtime
from .context import RequestInfo


@dataclass(frozen=True, slots=True)
class Surface:
    """One OpenAI endpoint: where it goes upstream and which models fit it."""

    endpoint: str
    upstream_path: str
    kinds: frozenset[str]
    streams: bool


# A JSON body carries about four bytes per token: good enough to estimate a cut stream's input.
BYTES_PER_TOKEN = 4
CHARS_PER_TOKEN = 4

CHAT = Surface("/v1/chat/completions", "/chat/completions", frozenset({"chat"}), True)
COMPLETIONS = Surface("/v1/completions", "/completions", frozenset({"chat"}), True)
EMBEDDINGS = Surface("/v1/embeddings", "/embeddings", frozenset({"embedding"}), False)


@dataclass(slots=True)
class Exchange:
    """One request's working state, from parse to ledger line."""

    surface: Surface
    runtime: Runtime
    info: RequestInfo
    body: dict[str, Any]
    requested: str
    stream: bool
    scope: Scope
    plan: list[Target]
    decision: Decision
    cache_key: str | None
    started: float
    input_estimate: int
    trail: Trail = field(default_factory=Trail)
    spent: Decimal = Decimal(0)
    recorded: bool = False

    def base_headers(self, target: Target, attempts: int, cache: str) -> dict[str, str]:
        self.info.provider = target.provider
        self.info.model = target.model
        self.info.attempts = attempts
        headers = self.runtime.bucket.headers()
        headers["X-Request-Id"] = self.info.request_id
        headers["X-TokenHub-Provider"] = target.provider
        headers["X-TokenHub-Attempts"] = str(attempts)
        headers["X-TokenHub-Cache"] = cache
        headers["X-TokenHub-Route"] = route_reason(self, target, attempts)
        return headers

    @property
    def cache_header(self) -> str:
        return "miss" if self.decision.lookup else "bypass"


def route_reason(exchange: Exchange, target: Target, attempts: int) -> str:
    scope = exchange.scope
    if scope.pinned:
        why = f"pinned by {exchange.requested}"
    elif scope.preferred:
        why = "first healthy in X-TokenHub-Providers order"
    elif routing.needs_affinity(scope, sticky=exchange.runtime.settings.routing.sticky):
        why = "sticky choice for the affinity key among healthy providers"
    else:
        why = "first healthy provider in config order"
    if attempts > 1:
        why += f", after {attempts - 1} failed attempt{'s' if attempts > 2 else ''}"
    return f"{target.provider} ({target.region}) serves {target.model}: {why}"


def store_answer(exchange: Exchange, target: Target, body: dict[str, Any]) -> None:
    cache = exchange.runtime.cache
    if exchange.cache_key is None or not exchange.decision.store or not cache.storable(body):
        return
    evicted = cache.stats.evictions
    cache.store(
        exchange.cache_key,
        exchange.surface.endpoint,
        body,
        provider=target.provider,
        region=target.region,
        model=target.model,
        upstream_model=target.upstream_model,
    )
    stats = cache.stats
    metrics = exchange.runtime.metrics
    metrics.cache_evictions.inc(stats.evictions - evicted)
    cache_gauges(metrics, stats)


def cache_gauges(metrics: Metrics, stats: CacheStats) -> None:
    metrics.cache_bytes.set(stats.bytes)
    metrics.cache_entries.set(stats.entries)


@dataclass(slots=True)
class StreamTally:
    """What a stream showed on its way: the usage it reported, or enough to estimate it."""

    usage: Usage | None = None
    output_chars: int = 0


async def record_stream_end(
    exchange: Exchange, target: Target, attempts: list[Attempt], outcome: str, tally: StreamTally
) -> None:
    """A stream's one line: billed when it completed, else unbilled with its usage estimated."""
    if tally.usage is not None:
        usage, source = tally.usage, "reported"
    else:
        usage = Usage(
            input_tokens=exchange.input_estimate,
            output_tokens=-(-tally.output_chars // CHARS_PER_TOKEN),
        )
        source = "estimated"
    cost = billing.cost(usage, target.spec, exchange.runtime.fee_rate)
    if outcome == "ok":
        exchange.spent = cost.total
        await record(exchange, target, attempts, 200, outcome, usage, source, cost)
    else:
        await record(
            exchange,
            target,
            attempts,
            200,
            outcome,
            usage,
            source,
            billing.ZERO,
            estimated=cost.total,
        )


def ensure_ledger(runtime: Runtime) -> None:
    """Model requests are refused rather than served unrecorded."""
    if not runtime.ledger.available:
        raise LedgerUnavailable(
            "The usage ledger cannot be written (disk full or I/O error), so model requests are "
            "refused rather than served unrecorded; free space at the ledger path and retry."
        )


async def record_unanswered(exchange: Exchange, status: int, outcome: str) -> None:
    """A request that reached an upstream but got no answer still gets its unbilled line."""
    target = exchange.trail.current
    if target is None or exchange.recorded:
        return
    await record(
        exchange, target, exchange.trail.attempts, status, outcome, Usage(), "none", billing.ZERO
    )


async def record(
    exchange: Exchange,
    target: Target,
    attempts: list[Attempt],
    status: int,
    outcome: str,
    usage: Usage,
    usage_source: str,
    cost: Cost,
    *,
    saved: Decimal | None = None,
    estimated: Decimal | None = None,
    billable: bool | None = None,
) -> str:
    """Write the request's one ledger line and return its ``total_usd`` (the
    ``X-TokenHub-Cost-USD`` header). ``billable`` defaults to ``outcome == "ok"`` (a video
    create or poll is ``ok`` yet unbilled: only the response showing the job completed bills)."""
    runtime = exchange.runtime
    exchange.recorded = True
    fees = cost.ledger_fields()
    record: dict[str, Any] = {
        "request_id": exchange.info.request_id,
        "endpoint": exchange.surface.endpoint,
        "requested": exchange.requested,
        "model": target.model,
        "provider": target.provider,
        "upstream_model": target.upstream_model,
        "region": target.region,
        "stream": exchange.stream,
        "status": status,
        "outcome": outcome,
        "billable": outcome == "ok" if billable is None else billable,
        "attempts": [a.ledger_fields() for a in attempts],
        "usage": usage.ledger_fields(),
        "usage_source": usage_source,
        **fees,
        "saved_usd": billing.usd(saved) if saved else "0",
        "latency_ms": int((time.monotonic() - exchange.started) * 1000),
    }
    if estimated is not None and outcome != "ok":
        record["estimated_usd"] = billing.usd(estimated)
    await runtime.ledger.append(record)
    # Counted once the loop turns, which is after the answer (or its last event) went out.
    runtime.loop.call_soon(
        _count_metrics, runtime.metrics, target, attempts, exchange.stream, cost.total, saved
    )
    return fees["total_usd"]


def attempt_outcome(attempt: Attempt) -> str:
    """A bounded label for an attempt's outcome (its reason is free text)."""
    reason = attempt.reason
    if reason == "ok":
        return "ok"
    if reason == "passed back":
        return "passed_back"
    if reason == "client cancelled":
        return "client_cancelled"
    if attempt.status is not None and attempt.status >= 400:
        return f"http_{attempt.status}"
    if reason.startswith("connect"):
        return "connect_error"
    if reason.startswith("no "):
        return "timeout"
    if "cut" in reason or "closed" in reason:
        return "cut"
    return "invalid_response"


def _count_metrics(
    metrics: Metrics,
    target: Target,
    attempts: list[Attempt],
    stream: bool,
    spent: Decimal,
    saved: Decimal | None,
) -> None:
    for attempt in attempts:
        outcome = attempt_outcome(attempt)
        metrics.observe_attempt(attempt.provider, outcome, attempt.ms / 1000, stream=stream)
    if len(attempts) > 1:
        metrics.failovers.inc(len(attempts) - 1)
    metrics.add_spend(target.provider, target.model, spent)
    if saved:
        metrics.add_saved(target.model, saved)
