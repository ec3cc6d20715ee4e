"""One worker thread for blocking calls that must run in order, off the event loop.

The ledger hands it every write, fsync and rename. Each call's outcome goes back to the loop
through a wake-up pipe the loop watches, and the thread runs under ``SCHED_BATCH`` where Linux
has it. Both are there for the thread switches when the loop and the thread share a core: a call
then costs two (the thread runs when the loop waits, the loop runs when the call is done), where
an ordinary thread and ``call_soon_threadsafe`` cost about six. The thread, woken while the loop
held the GIL, preempted the loop only to wait for the GIL; the loop, woken while the thread
still held it, did the same in turn. A batch thread does not preempt at its wake-up (it runs at
the loop's next wait, or the next tick), and ``os.write`` lets go of the GIL before it wakes the
loop.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

# Called on the loop with what a blocking call returned, or what it raised.
Done = Callable[[Any, BaseException | None], None]
_Job = tuple[Callable[..., Any], tuple[Any, ...], Done]
_Outcome = tuple[Done, Any, BaseException | None]


class IoThread:
    """Runs the calls it is given one after another on its own thread; each ``done`` runs on
    the loop, in order, with the call's result or the exception it raised."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._outcomes: deque[_Outcome] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        loop.add_reader(self._wake_read, self._deliver)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
        self._jobs.put((call, args, done))

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        future = self._loop.create_future()
        self.submit(call, args, partial(_settle, future))
        return await future

    async def stop(self) -> None:
        """Finish the calls already submitted, deliver their outcomes, then end the thread."""
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._loop.remove_reader(self._wake_read)
        self._deliver()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _serve(self) -> None:
        _run_as_batch()
        while (job := self._jobs.get()) is not None:
            call, args, done = job
            try:
                outcome: _Outcome = (done, call(*args), None)
            except BaseException as exc:  # handed to the loop, as to_thread would
                outcome = (done, None, exc)
            self._outcomes.append(outcome)
            try:
                os.write(self._wake_write, b"\0")
            except OSError:  # the pipe is full: the loop has wake-ups enough to read it
                pass

    def _deliver(self) -> None:
        """On the loop: read the wake-up pipe, then run every outcome that is in. One read
        takes all a pipe holds in practice (a byte per outcome); were more left, the pipe would
        stay readable and call this again."""
        try:
            os.read(self._wake_read, 4096)
        except BlockingIOError:  # stop() calls this whether or not a byte is waiting
            pass
        outcomes = self._outcomes
        while outcomes:
            done, result, error = outcomes.popleft()
            try:
                done(result, error)
            except Exception as exc:  # as the loop treats a failing callback: report, go on
                self._loop.call_exception_handler(
                    {"message": "an I/O thread outcome callback failed", "exception": exc}
                )


def _run_as_batch() -> None:
    """Linux: never preempt the loop at wake-up (see the module docstring). Best effort."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
