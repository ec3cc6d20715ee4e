"""What the handlers share, under typed app keys: one ``Runtime`` per loaded config.

SIGHUP builds a new ``Runtime`` and swaps ``Live.current``; requests already running keep the
one they started with, and its upstream sessions close once the last of them is done.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal

from aiohttp import web

from .budget import Budget
from .cache import ResponseCache, SingleFlight
from .config import Settings
from .health import HealthBook
from .ledger import Ledger
from .log import Redactor
from .metrics import Metrics
from .ratelimit import ConcurrencyCap, TokenBucket
from .relay import Relay
from .scope import Catalog
from .upstream import Upstream


@dataclass(eq=False, slots=True)
class Runtime:
    """Everything derived from one config, plus the process-lifetime parts it uses."""

    settings: Settings
    catalog: Catalog
    health: HealthBook
    upstreams: dict[str, Upstream]
    relay: Relay
    cache: ResponseCache
    flights: SingleFlight
    bucket: TokenBucket
    cap: ConcurrencyCap
    ledger: Ledger
    budget: Budget
    metrics: Metrics
    redactor: Redactor
    fee_rate: Decimal
    # Held for call_soon on the hot path: asyncio.get_running_loop() costs a getpid() syscall
    # on Python 3.11.
    loop: asyncio.AbstractEventLoop
    in_flight: int = 0
    retired: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self.in_flight:
            await self._idle.wait()

    async def close_upstreams(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()


@dataclass(eq=False, slots=True)
class Live:
    """The app's handle on the current runtime (set at startup) and its probe task."""

    current: Runtime = field(init=False)
    prober: asyncio.Task[None] | None = None


LIVE = web.AppKey("live", Live)
