"""Holding a stream's writes for a moment while the event loop runs late.

Each upstream read of a stream is one write to its client: a syscall, and a wake-up of the
reader. With hundreds of streams open the loop's core is full, and every new request's first
token waits its turn behind those writes. So while the loop runs late (a timer fired over
``LATE_S`` after it was due), a stream's writes after its first content are held and sent
together at the next tick, at most ``INTERVAL_S`` later. A stream's first content and its end
always go out at once, and on a loop that keeps up nothing is held.

Measured at 256 streams of 20 chunks 5 ms apart, interleaved with the same daemon without it
(ten runs each): CPU per stream 0.36-0.38 to 0.33-0.35 ms, first-token p50 13.6-16.8 to
11.9-13.4 ms, p99 median 27.9 to 24.0 ms. At 16 streams the loop keeps up: nothing changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

INTERVAL_S = 0.010
LATE_S = 0.002


class Held(Protocol):
    """A writer with data held back."""

    def flush(self) -> None:
        """Send what is held (nothing if its connection has gone)."""


class Pacer:
    """Tells whether the loop runs late, and flushes held writes once per tick.

    It ticks only while streams are open (``opened``/``closed``), so an idle daemon keeps no
    timer."""

    __slots__ = ("busy", "_loop", "_interval_s", "_late_s", "_clock", "_open", "_held", "_timer")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        interval_s: float = INTERVAL_S,
        late_s: float = LATE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.busy = False
        self._loop = loop
        self._interval_s = interval_s
        self._late_s = late_s
        self._clock = clock
        self._open = 0
        self._held: dict[Held, None] = {}  # in the order they were first held
        self._timer: asyncio.TimerHandle | None = None

    @property
    def ticking(self) -> bool:
        return self._timer is not None

    def opened(self) -> None:
        self._open += 1
        if self._timer is None:
            self._schedule(self._clock())

    def closed(self) -> None:
        self._open -= 1

    def hold(self, writer: Held) -> None:
        """``writer`` holds data: flush it at the next tick."""
        self._held[writer] = None

    def _schedule(self, now: float) -> None:
        self._timer = self._loop.call_later(self._interval_s, self._tick, now + self._interval_s)

    def _tick(self, due: float) -> None:
        now = self._clock()
        self.busy = now - due > self._late_s
        held, self._held = self._held, {}
        for writer in held:
            writer.flush()
        if self._open > 0 or self._held:
            self._schedule(now)
        else:
            self._timer = None
            self.busy = False
