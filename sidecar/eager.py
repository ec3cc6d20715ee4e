"""Starting a coroutine at once, in the calling callback, and only its rest as a task.

A task's first step waits for the loop's next turn; on a busy loop that turn is the rest of the
current round of I/O callbacks (4 ms at the median with 256 streams open). A request read in a
callback that starts at once writes its upstream request in that same callback. Python 3.12's
``asyncio.eager_task_factory`` does this; on 3.11 the coroutine is stepped here by hand.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")
_HANDED_OVER: Any = object()


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """Run ``coro`` now up to its first suspension, then as a task; None if it finished then.

    On 3.11 it runs outside any task until that suspension (``asyncio.current_task()`` is
    None, so it must not enter ``asyncio.timeout``). An exception it raises by then is raised
    here."""
    if sys.version_info >= (3, 12):
        task: asyncio.Task[T] = asyncio.eager_task_factory(loop, coro)  # type: ignore[attr-defined,unused-ignore]
        if task.done():
            task.result()
            return None
        return task
    context = contextvars.copy_context()
    try:
        pending = context.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_Rest(coro, pending), context=context)


class _Rest(collections.abc.Coroutine[Any, Any, T]):
    """The rest of a coroutine stepped outside a task, for the task that runs it: its first step
    hands over the future the coroutine waits on; later steps, and anything thrown in (a
    cancellation, even one before that first step), go to the coroutine itself."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, T], pending: Any) -> None:
        self._coro = coro
        self._pending: Any = pending  # until the first step: what the coroutine waits on

    def send(self, value: Any) -> Any:
        pending = self._pending
        if pending is _HANDED_OVER:
            return self._coro.send(value)
        self._pending = _HANDED_OVER
        return pending

    def throw(self, *exc: Any) -> Any:
        pending, self._pending = self._pending, _HANDED_OVER
        if isinstance(pending, asyncio.Future):
            pending.cancel()  # as the task would have cancelled what it waited on
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()
