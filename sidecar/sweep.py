"""One timer for many deadlines: items that must show life within a timeout.

A sweep a quarter of the timeout apart serves every watched item, so an item goes quiet for at
most 1.25 times the timeout before it expires, where a timer per item and per event would cost
a timer handle for each of thousands of events a second. The relay cuts idle streams with it and
the daemon closes connections whose request head dribbles in (slowloris).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class DeadlineSweep(Generic[Item]):
    """Calls ``expire(item)`` for each watched item whose ``since(item)`` (None: not on the
    clock now) lies ``timeout_s`` or more in the past; ``expire`` decides whether to forget it."""

    def __init__(
        self,
        timeout_s: float,
        *,
        since: Callable[[Item], float | None],
        expire: Callable[[Item], None],
        clock: Callable[[], float],
    ) -> None:
        self._timeout_s = timeout_s
        self._since = since
        self._expire = expire
        self._clock = clock
        self._items: set[Item] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def watch(self, item: Item) -> None:
        self._items.add(item)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._timeout_s / 4, self._sweep)

    def forget(self, item: Item) -> None:
        self._items.discard(item)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self._clock() - self._timeout_s
        since = self._since
        for item in [i for i in self._items if (s := since(i)) is not None and s <= cutoff]:
            self._expire(item)
        if self._items:
            self._sweeper = asyncio.get_running_loop().call_later(self._timeout_s / 4, self._sweep)
