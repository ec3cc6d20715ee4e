"""Prometheus metrics: one registry per ``Metrics`` (so every app and test has its own).

prometheus-client lives here only, and only renders: the values are plain floats that the event
loop updates without a lock (prometheus-client takes a mutex on every increment, which cost a few
percent of a proxied request's CPU). Everything here is updated on the loop's thread only. Label
values are plain (``status="200"``); a request that never reached a provider has
``provider=""``. Money is a float here only because Prometheus has no decimals; the ledger keeps
the exact amounts.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

PROVIDER_STATES = ("healthy", "ejected", "half_open")
# Model calls take from tens of milliseconds (embeddings) to minutes (long generations).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
LEDGER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

ProviderStates = Callable[[], Mapping[str, str]]


class Value:
    """A counter or gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Buckets:
    """A histogram: counts per bucket (``le`` inclusive) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


Child = TypeVar("Child", Value, Buckets)


class _Family(Generic[Child]):
    """One metric name and its children, one per label-value tuple (made by ``_new_child``)."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], Child] = {}
        if not labelnames:
            self.labels()  # shows 0 before its first change

    def labels(self, *values: str) -> Child:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self.children[values] = self._new_child()
        return child

    def _new_child(self) -> Child:
        raise NotImplementedError


class Scalars(_Family[Value]):
    """A counter or a gauge family (``kind``); label-less ones are used directly."""

    def __init__(
        self, kind: str, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> None:
        self.kind = kind
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> Value:
        return Value()

    def clear(self) -> None:
        self.children.clear()

    def inc(self, amount: float = 1.0) -> None:
        self.labels().value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.labels().value -= amount

    def set(self, value: float) -> None:
        self.labels().set(value)

    def collect(self) -> Metric:
        names = list(self.labelnames)
        family: CounterMetricFamily | GaugeMetricFamily
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.documentation, labels=names)
        else:
            family = GaugeMetricFamily(self.name, self.documentation, labels=names)
        for values, child in self.children.items():
            family.add_metric(values, child.value)
        return family


class Histograms(_Family[Buckets]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self._le = [_go_float(b) for b in (*self.bounds, math.inf)]
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> Buckets:
        return Buckets(self.bounds)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        for values, child in self.children.items():
            cumulative = itertools.accumulate(child.counts)
            buckets = [(le, float(n)) for le, n in zip(self._le, cumulative, strict=True)]
            family.add_metric(values, buckets, child.sum)
        return family


def _go_float(value: float) -> str:
    """How Prometheus spells a bucket bound (``0.5``, ``1.0``, ``+Inf``)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def counter(name: str, doc: str, labelnames: Sequence[str] = ()) -> Scalars:
    return Scalars("counter", name, doc, labelnames)


def gauge(name: str, doc: str, labelnames: Sequence[str] = ()) -> Scalars:
    return Scalars("gauge", name, doc, labelnames)


class Metrics:
    """Every metric the sidecar exports, in its own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self._provider_states: ProviderStates | None = None
        # The status stays an int on the hot path; its label string is made once per child.
        self._request_children: dict[tuple[str, str | None, str | None, int], Value] = {}
        self._define_traffic()
        self._define_cache()
        self._define_ledger()
        self._families = tuple(
            value for value in vars(self).values() if isinstance(value, Scalars | Histograms)
        )
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def _define_traffic(self) -> None:
        self.requests = counter(
            "tokenhub_requests",
            "Requests answered, by endpoint, public model, serving provider and HTTP status.",
            ("endpoint", "model", "provider", "status"),
        )
        self.in_flight = gauge("tokenhub_requests_in_flight", "Requests being handled now.")
        self.attempts = counter(
            "tokenhub_upstream_attempts",
            "Upstream attempts, by provider and outcome (ok, or the failure reason).",
            ("provider", "outcome"),
        )
        self.failovers = counter(
            "tokenhub_failovers", "Moves from a failed provider to the next one."
        )
        self.upstream_latency = Histograms(
            "tokenhub_upstream_latency_seconds",
            "Time from sending an upstream request to its response headers.",
            ("provider",),
            buckets=UPSTREAM_BUCKETS,
        )
        self.ttft = Histograms(
            "tokenhub_time_to_first_token_seconds",
            "Streams: time from sending the upstream request to the first content token.",
            ("provider",),
            buckets=TTFT_BUCKETS,
        )
        self.provider_state = gauge(
            "tokenhub_provider_state",
            "1 for the state each provider is in now, 0 for the others.",
            ("provider", "state"),
        )
        self.spend_usd = counter(
            "tokenhub_spend_usd",
            "Sum of the ledger's total_usd, by provider and model.",
            ("provider", "model"),
        )
        self.saved_usd = counter(
            "tokenhub_saved_usd",
            "Sum of the ledger's saved_usd (what cache hits would have cost).",
            ("model",),
        )

    def _define_cache(self) -> None:
        self.cache_requests = counter(
            "tokenhub_cache_requests",
            "Response cache lookups, by result (hit, miss, bypass).",
            ("result",),
        )
        self.cache_bytes = gauge("tokenhub_cache_bytes", "Bytes held by the response cache.")
        self.cache_entries = gauge("tokenhub_cache_entries", "Entries held by the response cache.")
        self.cache_evictions = counter(
            "tokenhub_cache_evictions",
            "Entries dropped from the response cache to stay under max_bytes.",
        )

    def _define_ledger(self) -> None:
        self.ledger_write_seconds = Histograms(
            "tokenhub_ledger_write_seconds",
            "Time to append one ledger line (including fsync when it ran).",
            buckets=LEDGER_BUCKETS,
        )
        self.ledger_errors = counter(
            "tokenhub_ledger_errors",
            "Ledger write or fsync failures (each one refuses requests with 503).",
        )

    def observe_request(
        self, endpoint: str, model: str | None, provider: str | None, status: int
    ) -> None:
        key = (endpoint, model, provider, status)
        child = self._request_children.get(key)
        if child is None:
            labels = (endpoint, model or "", provider or "", str(status))
            child = self._request_children[key] = self.requests.labels(*labels)
        child.value += 1

    def add_spend(self, provider: str, model: str, total_usd: Decimal) -> None:
        if total_usd > 0:
            self.spend_usd.labels(provider, model).value += float(total_usd)

    def observe_attempt(self, provider: str, outcome: str, seconds: float, *, stream: bool) -> None:
        """One upstream attempt; a successful one's time feeds the latency or TTFT histogram."""
        self.attempts.labels(provider, outcome).value += 1
        if outcome == "ok":
            (self.ttft if stream else self.upstream_latency).labels(provider).observe(seconds)

    def count_cache(self, result: str) -> None:
        self.cache_requests.labels(result).value += 1

    def add_saved(self, model: str, saved_usd: Decimal) -> None:
        if saved_usd > 0:
            self.saved_usd.labels(model).value += float(saved_usd)

    def set_provider_state(self, provider: str, state: str) -> None:
        for candidate in PROVIDER_STATES:
            self.provider_state.labels(provider, candidate).set(1 if candidate == state else 0)

    def track_provider_states(self, source: ProviderStates | None) -> None:
        """Read states from ``source`` at each scrape (an ejection ends without any event)."""
        self._provider_states = source

    def collect(self) -> Iterator[Metric]:
        """The registry's collector protocol."""
        for family in self._families:
            yield family.collect()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text body and its Content-Type."""
        if self._provider_states is not None:
            self.provider_state.clear()
            for provider, state in self._provider_states().items():
                self.set_provider_state(provider, state)
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
