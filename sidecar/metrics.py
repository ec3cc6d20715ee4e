"""Prometheus metrics: one registry per ``Metrics`` (so every app and test has its own).

prometheus-client lives here only. Label values are plain (``status="200"``); a request that
never reached a provider has ``provider=""``. Money is a float here only because Prometheus
has no decimals; the ledger keeps the exact amounts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

PROVIDER_STATES = ("healthy", "ejected", "half_open")
# Model calls take from tens of milliseconds (embeddings) to minutes (long generations).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
LEDGER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

ProviderStates = Callable[[], Mapping[str, str]]


class Metrics:
    """Every metric the sidecar exports, in its own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._provider_states: ProviderStates | None = None
        # Label lookups take a lock and build a key each time; the hot path reuses children.
        self._request_children: dict[tuple[str, str, str, int], Any] = {}
        self._spend_children: dict[tuple[str, str], Any] = {}
        self._cache_children: dict[str, Any] = {}
        self._define_traffic()
        self._define_cache()
        self._define_ledger()

    def _define_traffic(self) -> None:
        r = self.registry
        self.requests = Counter(
            "tokenhub_requests",
            "Requests answered, by endpoint, public model, serving provider and HTTP status.",
            ("endpoint", "model", "provider", "status"),
            registry=r,
        )
        self.in_flight = Gauge(
            "tokenhub_requests_in_flight", "Requests being handled now.", registry=r
        )
        self.attempts = Counter(
            "tokenhub_upstream_attempts",
            "Upstream attempts, by provider and outcome (ok, or the failure reason).",
            ("provider", "outcome"),
            registry=r,
        )
        self.failovers = Counter(
            "tokenhub_failovers", "Moves from a failed provider to the next one.", registry=r
        )
        self.upstream_latency = Histogram(
            "tokenhub_upstream_latency_seconds",
            "Time from sending an upstream request to its response headers.",
            ("provider",),
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tokenhub_time_to_first_token_seconds",
            "Streams: time from sending the upstream request to the first content token.",
            ("provider",),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.provider_state = Gauge(
            "tokenhub_provider_state",
            "1 for the state each provider is in now, 0 for the others.",
            ("provider", "state"),
            registry=r,
        )
        self.spend_usd = Counter(
            "tokenhub_spend_usd",
            "Sum of the ledger's total_usd, by provider and model.",
            ("provider", "model"),
            registry=r,
        )
        self.saved_usd = Counter(
            "tokenhub_saved_usd",
            "Sum of the ledger's saved_usd (what cache hits would have cost).",
            ("model",),
            registry=r,
        )

    def _define_cache(self) -> None:
        r = self.registry
        self.cache_requests = Counter(
            "tokenhub_cache_requests",
            "Response cache lookups, by result (hit, miss, bypass).",
            ("result",),
            registry=r,
        )
        self.cache_bytes = Gauge(
            "tokenhub_cache_bytes", "Bytes held by the response cache.", registry=r
        )
        self.cache_entries = Gauge(
            "tokenhub_cache_entries", "Entries held by the response cache.", registry=r
        )
        self.cache_evictions = Counter(
            "tokenhub_cache_evictions",
            "Entries dropped from the response cache to stay under max_bytes.",
            registry=r,
        )

    def _define_ledger(self) -> None:
        r = self.registry
        self.ledger_write_seconds = Histogram(
            "tokenhub_ledger_write_seconds",
            "Time to append one ledger line (including fsync when it ran).",
            buckets=LEDGER_BUCKETS,
            registry=r,
        )
        self.ledger_errors = Counter(
            "tokenhub_ledger_errors",
            "Ledger write or fsync failures (each one refuses requests with 503).",
            registry=r,
        )

    def observe_request(
        self, endpoint: str, model: str | None, provider: str | None, status: int
    ) -> None:
        key = (endpoint, model or "", provider or "", status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key[:3], str(status))
        child.inc()

    def add_spend(self, provider: str, model: str, total_usd: Decimal) -> None:
        if total_usd > 0:
            key = (provider, model)
            child = self._spend_children.get(key)
            if child is None:
                child = self._spend_children[key] = self.spend_usd.labels(provider, model)
            child.inc(float(total_usd))

    def observe_attempt(
        self, provider: str, outcome: str, seconds: float, *, stream: bool
    ) -> None:
        """One upstream attempt; a successful one's time feeds the latency or TTFT histogram."""
        self.attempts.labels(provider, outcome).inc()
        if outcome == "ok":
            (self.ttft if stream else self.upstream_latency).labels(provider).observe(seconds)

    def count_cache(self, result: str) -> None:
        child = self._cache_children.get(result)
        if child is None:
            child = self._cache_children[result] = self.cache_requests.labels(result)
        child.inc()

    def add_saved(self, model: str, saved_usd: Decimal) -> None:
        if saved_usd > 0:
            self.saved_usd.labels(model).inc(float(saved_usd))

    def set_provider_state(self, provider: str, state: str) -> None:
        for candidate in PROVIDER_STATES:
            self.provider_state.labels(provider, candidate).set(1 if candidate == state else 0)

    def track_provider_states(self, source: ProviderStates | None) -> None:
        """Read states from ``source`` at each scrape (an ejection ends without any event)."""
        self._provider_states = source

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text body and its Content-Type."""
        if self._provider_states is not None:
            self.provider_state.clear()
            for provider, state in self._provider_states().items():
                self.set_provider_state(provider, state)
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
