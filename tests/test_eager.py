"""``eager.start``: a coroutine runs at once up to its first suspension, the rest as a task,
with results, exceptions and cancellations passed through as a task would."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sidecar import eager


async def test_a_coroutine_runs_at_once_until_it_waits_then_as_a_task():
    loop = asyncio.get_running_loop()
    steps: list[tuple[str, asyncio.Task[object] | None]] = []
    gate: asyncio.Future[str] = loop.create_future()

    async def work() -> str:
        steps.append(("before", asyncio.current_task()))
        got = await gate
        steps.append(("after", asyncio.current_task()))
        await asyncio.sleep(0)  # a bare yield passes through too
        return got + "!"

    started: asyncio.Future[asyncio.Task[str] | None] = loop.create_future()
    loop.call_soon(lambda: started.set_result(eager.start(loop, work())))  # from a callback
    task = await started
    assert steps[0][0] == "before"
    if sys.version_info < (3, 12):
        assert steps[0][1] is None  # it ran in the callback, outside any task
    assert task is not None and not task.done()
    gate.set_result("done")
    assert await task == "done!"
    assert steps[1] == ("after", task)


async def test_a_coroutine_that_never_waits_finishes_with_no_task():
    finished: list[bool] = []

    async def work() -> None:
        finished.append(True)

    assert eager.start(asyncio.get_running_loop(), work()) is None
    assert finished == [True]


async def test_an_exception_before_the_first_wait_is_raised_at_once():
    async def work() -> None:
        raise ValueError("bad request")

    with pytest.raises(ValueError, match="bad request"):
        eager.start(asyncio.get_running_loop(), work())


async def test_an_exception_after_the_first_wait_is_the_tasks():
    loop = asyncio.get_running_loop()

    async def work() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    task = eager.start(loop, work())
    assert task is not None
    with pytest.raises(ValueError, match="later"):
        await task


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits():
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    cleaned: list[str] = []

    async def work() -> None:
        try:
            await never
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            await asyncio.sleep(0)  # cleanup that itself waits
            cleaned.append("cleaned up")
            raise

    task = eager.start(loop, work())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["cancelled", "cleaned up"]
    assert never.cancelled()


async def test_a_cancellation_thrown_in_before_the_task_first_ran_reaches_the_coroutine():
    loop = asyncio.get_running_loop()
    done_early: asyncio.Future[None] = loop.create_future()
    done_early.set_result(None)
    seen: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(0)
            seen.append("resumed")
            await loop.create_future()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = eager.start(loop, work())
    assert task is not None
    task.cancel()  # before its first step: thrown in, not a cancelled future
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]
