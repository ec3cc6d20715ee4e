"""The pacer: a late loop holds a stream's writes after its first content, for one tick.

Unit tests drive ``Pacer`` on the test's own loop, made late by blocking it; the end-to-end test
streams through the lean front while the loop is kept late."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable

import aiohttp

from sidecar.front import Connection
from sidecar.pacing import Pacer

from .conftest import provider
from .fakes import slow_chunks


class Writer:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


async def ticks(count: int, interval_s: float) -> None:
    await asyncio.sleep(count * interval_s + 0.005)


def on_time() -> float:
    """A clock for which every tick comes exactly when due."""
    return 0.0


def always_late() -> Callable[[], float]:
    """A clock that moves a second on each reading: every tick is a second late."""
    return itertools.count(0.0, 1.0).__next__


async def test_a_loop_that_keeps_up_is_not_busy():
    pacer = Pacer(asyncio.get_running_loop(), interval_s=0.002, clock=on_time)
    pacer.opened()
    await ticks(4, 0.002)
    assert pacer.ticking and not pacer.busy


async def test_while_the_loop_runs_late_held_writers_are_flushed_once_a_tick():
    pacer = Pacer(asyncio.get_running_loop(), interval_s=0.002, clock=always_late())
    pacer.opened()
    await ticks(1, 0.002)
    assert pacer.busy
    writer = Writer()
    pacer.hold(writer)
    pacer.hold(writer)  # held twice within one tick: flushed once
    await ticks(2, 0.002)
    assert writer.flushes == 1


async def test_the_pacer_stops_ticking_once_no_stream_is_open():
    pacer = Pacer(asyncio.get_running_loop(), interval_s=0.002, clock=always_late())
    pacer.opened()
    await ticks(1, 0.002)
    writer = Writer()
    pacer.hold(writer)
    pacer.closed()
    await ticks(2, 0.002)
    assert writer.flushes == 1  # what was held still goes out
    assert not pacer.ticking and not pacer.busy


def _keep_late(loop: asyncio.AbstractEventLoop, until: float) -> None:
    """Block the loop for 8 ms every 4 ms: each pacer tick fires late."""
    if time.monotonic() < until:
        time.sleep(0.008)
        loop.call_later(0.004, _keep_late, loop, until)


async def test_a_stream_through_a_late_loop_arrives_whole(
    start_sidecar, make_settings, fake_upstream, monkeypatch
):
    """Frames held back by the pacer go out in order, before the stream's last write."""
    flushed: list[int] = []
    flush = Connection.flush

    def counting(self: Connection) -> None:
        flushed.append(len(self._held))
        flush(self)

    monkeypatch.setattr(Connection, "flush", counting)
    fake = await fake_upstream()
    words = [f"w{n}" for n in range(30)]
    fake.script(slow_chunks(0.003, content=" ".join(words)))
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    loop = asyncio.get_running_loop()
    body = {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sidecar.base_url}/v1/chat/completions", json={**body, "stream": True}
        ) as response:
            loop.call_soon(_keep_late, loop, time.monotonic() + 5)
            raw = await response.read()
    events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in json.loads(event)["choices"]
    )
    assert text == " ".join(words)
    assert any(flushed), "no frame was held back"
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "ok"
    pacer = sidecar.runner.server.pacer
    async with asyncio.timeout(2):
        while pacer.ticking:  # no timer is left once no stream is open
            await asyncio.sleep(0.01)
