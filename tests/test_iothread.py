"""The ledger's I/O thread: calls run in order off the loop, outcomes come back on it."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from sidecar.iothread import IoThread


async def test_calls_run_in_order_on_one_other_thread() -> None:
    loop = asyncio.get_running_loop()
    io = IoThread(loop, "test-io")
    seen: list[tuple[int, int]] = []

    def call(n: int) -> int:
        seen.append((n, threading.get_ident()))
        return n * 10

    results = await asyncio.gather(*(io.run(call, n) for n in range(50)))
    await io.stop()
    assert results == [n * 10 for n in range(50)]
    assert [n for n, _ in seen] == list(range(50))
    threads = {ident for _, ident in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    io = IoThread(asyncio.get_running_loop(), "test-io")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await io.run(fail)
    assert await io.run(os.getpid) == os.getpid()
    await io.stop()


async def test_done_runs_on_the_loop_thread_and_stop_delivers_what_is_left() -> None:
    loop = asyncio.get_running_loop()
    io = IoThread(loop, "test-io")
    delivered: list[tuple[Any, BaseException | None, int]] = []

    def done(result: Any, error: BaseException | None) -> None:
        delivered.append((result, error, threading.get_ident()))

    for n in range(5):
        io.submit(int, (n,), done)
    await io.stop()  # no loop turn in between: stop() hands over the outcomes itself
    assert [r for r, _, _ in delivered] == list(range(5))
    assert {ident for _, _, ident in delivered} == {threading.get_ident()}


async def test_a_failing_done_does_not_strand_the_next_outcomes() -> None:
    loop = asyncio.get_running_loop()
    reported: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    io = IoThread(loop, "test-io")
    delivered: list[int] = []

    def broken(_result: Any, _error: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    io.submit(int, (1,), broken)
    async with asyncio.timeout(10):  # a stranded outcome would wait forever
        assert await io.run(int, 2) == 2
    io.submit(int, (3,), lambda result, _error: delivered.append(result))
    await io.stop()
    assert delivered == [3]
    assert [str(exc) for exc in reported] == ["callback bug"]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_the_thread_runs_as_a_batch_thread_so_it_never_preempts_the_loop() -> None:
    io = IoThread(asyncio.get_running_loop(), "test-io")
    policy = await io.run(os.sched_getscheduler, 0)
    await io.stop()
    assert policy == os.SCHED_BATCH
    assert os.sched_getscheduler(0) != os.SCHED_BATCH, "the loop's own thread keeps its policy"
