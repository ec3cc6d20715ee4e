"""The plan's requests-per-minute as a token bucket, and the cap on concurrent requests.

Both are per process and per app: a reload builds new ones (or calls ``TokenBucket.resize``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from sidecar import errors


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` style: ``"0s"``, ``"250ms"``, ``"1.5s"``, ``"6m0s"``."""
    ms = math.ceil(max(seconds, 0.0) * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if minutes == 0:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


class TokenBucket:
    """Capacity ``rpm`` requests, refilled at ``rpm / 60`` per second; clock injected."""

    def __init__(
        self,
        rpm: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        plan: str | None = None,
    ) -> None:
        if rpm <= 0:
            raise ValueError("rpm must be positive")
        self._clock = clock
        self._plan = plan
        self._rpm = rpm
        self._tokens = float(rpm)
        self._stamp = clock()

    @property
    def rpm(self) -> int:
        return self._rpm

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._stamp, 0.0)  # a clock that steps back must not drain us
        self._tokens = min(float(self._rpm), self._tokens + elapsed * self._rpm / 60)
        self._stamp = now

    def _seconds_until(self, tokens: float) -> float:
        return max(tokens - self._tokens, 0.0) * 60 / self._rpm

    def take(self) -> None:
        """Spend one request, or raise ``RateLimited`` (429) saying when one will be free."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return
        wait = self._seconds_until(1)
        retry_after = max(1, math.ceil(wait))
        raise errors.RateLimited(
            f"Rate limit reached: {self._describe()} allows {self._rpm} requests per minute. "
            f"Retry after {retry_after} second{'s' if retry_after != 1 else ''}, "
            "or ask for a higher rpm in the plan.",
            headers={"Retry-After": str(retry_after), **self._headers(reset_in=wait)},
        )

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for a response that passed."""
        self._refill()
        return self._headers(reset_in=self._seconds_until(self._rpm))

    def _headers(self, *, reset_in: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self._rpm),
            "x-ratelimit-remaining-requests": str(int(self._tokens)),
            "x-ratelimit-reset-requests": format_duration(reset_in),
        }

    def _describe(self) -> str:
        return f"the {self._plan} plan" if self._plan else "the account"

    def resize(self, rpm: int, *, plan: str | None = None) -> None:
        """Apply a reloaded rpm, keeping the share of the bucket that was left."""
        if rpm <= 0:
            raise ValueError("rpm must be positive")
        self._refill()
        self._tokens = self._tokens * rpm / self._rpm
        self._rpm = rpm
        self._plan = plan if plan is not None else self._plan


class ConcurrencyCap:
    """At most ``limit`` requests inside at once; the next ones wait their turn (FIFO).

    Waiting instead of refusing is deliberate: a 429 would read as "the plan's RPM is spent"
    and a 5xx would make the OpenAI SDK retry, adding load exactly when there is too much. The
    client's own timeout bounds the wait, and a cancelled waiter leaves the queue cleanly.
    Below the limit, entering is a counter increment: no lock, no future.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self._limit = limit
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits: the common case, with no coroutine."""
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return True
        return False

    async def wait_turn(self) -> None:
        """Queue for a slot (FIFO) when ``try_enter`` found none; ``leave()`` gives it back."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # a leaving request hands its slot over; in_flight stays counted
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a slot in the same instant: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_flight -= 1

    async def __aenter__(self) -> None:
        if not self.try_enter():
            await self.wait_turn()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.leave()
