"""Provider availability from live traffic (and optional probes): healthy, ejected, half-open.

A provider is ejected after a run of consecutive failures, a high recent error rate, a rejected
key (401/403) or a 429 with Retry-After. The back-off doubles on each repeat ejection; when it
ends the provider is half-open: the next success restores it, the next failure ejects it again.
Ejection only reorders candidates (tried last), it never removes them; that is ``routing.plan``'s
job. The clock is injected, so tests step time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from sidecar.config import ProviderConfig
from sidecar.log import get_logger

State = Literal["healthy", "ejected", "half_open"]


def parse_retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """``retry-after-ms``, then ``retry-after`` (seconds or HTTP-date) -> seconds from now."""
    lowered = {k.lower(): v.strip() for k, v in headers.items()}
    millis = _number(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = lowered.get("retry-after")
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _number(value: str | None) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 and number != float("inf") else None


def iso_utc(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """When to eject and for how long: Envoy-style outlier detection, scaled down."""

    consecutive_failures: int = 3
    window_s: float = 60.0
    min_requests: int = 5
    max_error_rate: float = 0.5
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    max_retry_after_s: float = 3600.0
    forget_after_s: float = 600.0  # healthy this long after an ejection: the back-off starts over


@dataclass(slots=True)
class _Provider:
    config: ProviderConfig
    outcomes: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=1000))
    consecutive: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    last_until: float | None = None  # the latest ejection's end, kept after it is over
    held_by_retry_after: bool = False
    last_failure: str = ""


class HealthBook:
    """Per-provider observations -> state; one per config, shared by every request."""

    def __init__(
        self,
        providers: Sequence[ProviderConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        policy: HealthPolicy | None = None,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._policy = policy or HealthPolicy()
        self._providers = {p.name: _Provider(p) for p in providers}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._providers)

    def adopt(self, previous: HealthBook) -> None:
        """Carry observations over a config reload for providers present in both configs."""
        for name, entry in self._providers.items():
            old = previous._providers.get(name)
            if old is not None:
                entry.outcomes.extend(old.outcomes)
                entry.consecutive, entry.ejections = old.consecutive, old.ejections
                entry.ejected_until, entry.last_until = old.ejected_until, old.last_until
                entry.held_by_retry_after = old.held_by_retry_after
                entry.last_failure = old.last_failure

    def state(self, provider: str) -> State:
        entry = self._providers[provider]
        if entry.ejected_until is None:
            return "healthy"
        return "ejected" if self._clock() < entry.ejected_until else "half_open"

    def ejected_until(self, provider: str) -> str | None:
        """The ejection's end as ISO-8601 UTC while ejected, else None."""
        entry = self._providers[provider]
        if self.state(provider) != "ejected" or entry.ejected_until is None:
            return None
        return iso_utc(self._wall() + entry.ejected_until - self._clock())

    def describe(self, provider: str) -> str:
        """One line for humans: the state and, when not healthy, why."""
        entry = self._providers[provider]
        state = self.state(provider)
        if state == "healthy":
            return "healthy"
        if state == "half_open":
            return f"half_open: ejection over, on trial (last failure: {entry.last_failure})"
        return f"ejected until {self.ejected_until(provider)} ({entry.last_failure})"

    def error_rate(self, provider: str) -> float:
        outcomes = self._recent(self._providers[provider])
        if not outcomes:
            return 0.0
        return sum(1 for _, ok in outcomes if not ok) / len(outcomes)

    def record_success(self, provider: str) -> None:
        entry = self._providers[provider]
        now = self._clock()
        entry.outcomes.append((now, True))
        entry.consecutive = 0
        if entry.ejected_until is not None and not (
            entry.held_by_retry_after and now < entry.ejected_until
        ):
            entry.ejected_until = None
            entry.held_by_retry_after = False

    def record_failure(
        self,
        provider: str,
        *,
        reason: str,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """401/403 eject at once; a Retry-After ejects until then; else the run and rate rules."""
        entry = self._providers[provider]
        now = self._clock()
        entry.outcomes.append((now, False))
        entry.consecutive += 1
        shown = status is None or str(status) in reason
        entry.last_failure = reason if shown else f"{reason}, status {status}"
        state = self.state(provider)
        if retry_after_s is not None:
            self._hold(entry, now, min(retry_after_s, self._policy.max_retry_after_s))
        elif state == "ejected":
            return
        elif state == "half_open" or status in (401, 403) or self._tripped(entry):
            self._eject(entry, now)

    def record_probe(self, provider: str, ok: bool) -> None:
        """An active probe: success ends an ejection early (not one a Retry-After asked for)."""
        entry = self._providers[provider]
        now = self._clock()
        if ok and entry.ejected_until is not None and not entry.held_by_retry_after:
            entry.ejected_until = min(entry.ejected_until, now)
        elif not ok and self.state(provider) == "half_open":
            entry.last_failure = "probe failed"
            self._eject(entry, now)

    def snapshot(self) -> list[dict[str, Any]]:
        """The ``GET /-/providers`` items."""
        return [
            {
                "name": name,
                "region": entry.config.region,
                "state": self.state(name),
                "ejected_until": self.ejected_until(name),
                "error_rate": round(self.error_rate(name), 4),
                "models": list(entry.config.models),
            }
            for name, entry in self._providers.items()
        ]

    def _recent(self, entry: _Provider) -> list[tuple[float, bool]]:
        horizon = self._clock() - self._policy.window_s
        while entry.outcomes and entry.outcomes[0][0] < horizon:
            entry.outcomes.popleft()
        return list(entry.outcomes)

    def _tripped(self, entry: _Provider) -> bool:
        policy = self._policy
        if entry.consecutive >= policy.consecutive_failures:
            return True
        outcomes = self._recent(entry)
        failures = sum(1 for _, ok in outcomes if not ok)
        return len(outcomes) >= policy.min_requests and failures / len(outcomes) > (
            policy.max_error_rate
        )

    def _eject(self, entry: _Provider, now: float) -> None:
        policy = self._policy
        if entry.last_until is not None and entry.last_until <= now - policy.forget_after_s:
            entry.ejections = 0
        entry.ejections += 1
        backoff = policy.base_ejection_s * 2 ** min(entry.ejections - 1, 16)
        entry.ejected_until = entry.last_until = now + min(backoff, policy.max_ejection_s)
        entry.held_by_retry_after = False
        entry.consecutive = 0

    def _hold(self, entry: _Provider, now: float, seconds: float) -> None:
        until = now + seconds
        if entry.ejected_until is None or entry.ejected_until < until:
            entry.ejected_until = entry.last_until = until
            entry.held_by_retry_after = True


class Prober:
    """Optional active probes of providers that are not healthy; ``probe`` does the HTTP GET."""

    def __init__(
        self,
        book: HealthBook,
        probe: Callable[[str], Awaitable[bool]],
        interval_s: float,
    ) -> None:
        self._book = book
        self._probe = probe
        self._interval_s = interval_s
        self._log = get_logger("sidecar.health")

    async def run(self) -> None:
        """Probe every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.probe_once()

    async def probe_once(self) -> None:
        names = [n for n in self._book.names if self._book.state(n) != "healthy"]
        results = await asyncio.gather(*(self._probe(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                # A broken probe must not end the loop; it counts as a failed probe.
                self._log.warning("probe_error", provider=name, error=repr(result))
            self._book.record_probe(name, result is True)
