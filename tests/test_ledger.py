import asyncio
import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from sidecar.config import LedgerConfig
from sidecar.errors import LedgerUnavailable
from sidecar.ledger import GENESIS, Ledger, LedgerLocked, rotated_path

NOW = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)


def fixed_clock() -> datetime:
    return NOW


def record(i: int, **extra: Any) -> dict[str, Any]:
    return {"request_id": f"req-{i}", "outcome": "ok", "total_usd": "0.001", **extra}


def read_chain(path: Path) -> list[dict[str, Any]]:
    """Every record of the ledger (rotated files first), asserting the hash chain."""
    numbered = sorted(path.parent.glob(path.name + ".[0-9][0-9][0-9][0-9][0-9][0-9]"))
    records = []
    head = GENESIS
    for file in [*numbered, path]:
        for line in file.read_bytes().splitlines(keepends=True):
            parsed = orjson.loads(line)
            assert parsed["prev"] == head, f"chain broken in {file.name}"
            head = hashlib.sha256(line).hexdigest()
            records.append(parsed)
    return records


class Seams:
    """The file layer's write and fsync, with switchable failures (a full disk, an EIO)."""

    def __init__(self) -> None:
        self.fail_write: int | None = None  # errno to raise
        self.short_then_fail = False
        self.fail_fsync = False
        self.fsyncs = 0
        self.write_delay_s = 0.0  # each write blocks the I/O thread this long
        self.fsync_gate: threading.Event | None = None  # each fsync waits for it

    def write(self, fd: int, data: bytes) -> int:
        time.sleep(self.write_delay_s)
        if self.short_then_fail:
            self.short_then_fail = False
            self.fail_write = errno.ENOSPC
            return os.write(fd, data[: len(data) // 2])
        if self.fail_write is not None:
            raise OSError(self.fail_write, os.strerror(self.fail_write))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fsync_gate is not None:
            self.fsync_gate.wait(5.0)
        if self.fail_fsync:
            raise OSError(errno.EIO, "Input/output error")
        self.fsyncs += 1
        os.fsync(fd)


@pytest.fixture
async def make_ledger(tmp_path: Path) -> AsyncIterator[Callable[..., Ledger]]:
    opened: list[Ledger] = []

    def make(**config: Any) -> Ledger:
        seams: Seams | None = config.pop("seams", None)
        kwargs: dict[str, Any] = {"clock": fixed_clock, "retry_s": 0.01}
        if "on_failure" in config:
            kwargs["on_failure"] = config.pop("on_failure")
        if seams is not None:
            kwargs.update(write=seams.write, fsync=seams.fsync)
        settings = LedgerConfig(path=tmp_path / "ledger.jsonl", **config)
        ledger = Ledger(settings, **kwargs)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        await ledger.close()


async def wait_until(condition: Callable[[], bool], *, tries: int = 500) -> None:
    """Poll ``condition`` every 10 ms, ``tries`` times at most."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def test_append_adds_v_ts_and_chain(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    await ledger.open()
    await ledger.append(record(1, model_fee_usd=Decimal("3.3166E-6")))
    await ledger.append(record(2, prev="ignored"))
    records = read_chain(ledger.path)
    assert [r["request_id"] for r in records] == ["req-1", "req-2"]
    assert records[0]["v"] == 1
    assert records[0]["ts"] == "2025-03-04T05:06:07.891Z"
    assert records[0]["prev"] == GENESIS
    assert records[0]["model_fee_usd"] == "0.0000033166"
    assert list(records[0])[:2] == ["v", "ts"] and list(records[0])[-1] == "prev"
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600


async def test_concurrent_appends_keep_file_order_equal_chain_order(
    make_ledger: Callable[..., Ledger],
) -> None:
    seams = Seams()
    ledger = make_ledger(fsync="always", seams=seams)
    await ledger.open()
    await asyncio.gather(*(ledger.append(record(i)) for i in range(200)))
    records = read_chain(ledger.path)
    assert sorted(r["request_id"] for r in records) == sorted(f"req-{i}" for i in range(200))
    assert 1 <= seams.fsyncs < 200  # group commit: one fsync per batch, not per line


async def test_fsync_policies(make_ledger: Callable[..., Ledger], tmp_path: Path) -> None:
    never = Seams()
    ledger = make_ledger(fsync="never", seams=never)
    await ledger.open()
    for i in range(5):
        await ledger.append(record(i))
    assert never.fsyncs == 0
    await ledger.close()
    assert never.fsyncs == 1  # close flushes

    interval = Seams()
    ledger = make_ledger(fsync="interval", fsync_interval_ms=10, seams=interval)
    await ledger.open()
    await ledger.append(record(9))
    await wait_until(lambda: interval.fsyncs >= 1)


async def test_interval_fsync_happens_while_appends_never_stop(
    make_ledger: Callable[..., Ledger],
) -> None:
    """Under steady load the queue is never empty; the interval fsync must still come due."""
    seams = Seams()
    ledger = make_ledger(fsync="interval", fsync_interval_ms=20, seams=seams)
    await ledger.open()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + 0.3

    async def appender(worker: int) -> None:
        n = 0
        while loop.time() < stop_at:
            await ledger.append(record(worker * 100_000 + n))
            n += 1

    await asyncio.gather(*(appender(w) for w in range(8)))
    assert seams.fsyncs >= 3, f"{seams.fsyncs} fsyncs in 300 ms of appends at a 20 ms interval"
    await ledger.close()
    assert len(read_chain(ledger.path)) > 8


async def test_an_interval_fsync_does_not_hold_the_write_it_follows(
    make_ledger: Callable[..., Ledger],
) -> None:
    """Under ``interval`` a caller waits for its line to reach the OS, not the disk: the due
    fsync runs after the write it follows, and only lines queued after it wait for it."""
    seams = Seams()
    ledger = make_ledger(fsync="interval", fsync_interval_ms=10, seams=seams)
    await ledger.open()
    await ledger.append(record(1))  # the file is dirty: an fsync is due 10 ms after open
    seams.write_delay_s = 0.1
    second = asyncio.create_task(ledger.append(record(2)))
    await asyncio.sleep(0.05)  # the fsync came due while the second write runs
    seams.write_delay_s = 0.0
    seams.fsync_gate = gate = threading.Event()
    fsyncs = seams.fsyncs
    try:
        third = asyncio.create_task(ledger.append(record(3)))  # its write carries the fsync
        await second
        await asyncio.wait_for(third, 2.0)  # times out if the caller waits for the fsync
        fourth = asyncio.create_task(ledger.append(record(4)))
        await asyncio.sleep(0.05)
        assert not fourth.done(), "a line was written while the fsync before it still ran"
    finally:
        gate.set()
    await fourth
    assert seams.fsyncs > fsyncs
    assert [r["request_id"] for r in read_chain(ledger.path)] == [f"req-{i}" for i in range(1, 5)]


def test_the_chain_holds_when_appends_meet_the_fsync_timer(tmp_path: Path) -> None:
    """Under uvloop (as the daemon runs) the interval fsync's timer can fire in the very turn
    an append wakes the parked writer; whichever wins, the chain must follow the file."""
    seams = Seams()
    config = LedgerConfig(path=tmp_path / "ledger.jsonl", fsync="interval", fsync_interval_ms=1)
    ledger = Ledger(config, clock=fixed_clock, write=seams.write, fsync=seams.fsync)

    async def waves() -> int:
        await ledger.open()
        n = 0
        try:
            for wave in range(300):
                await asyncio.gather(*(ledger.append(record(n + i)) for i in range(1 + wave % 3)))
                n += 1 + wave % 3
                await asyncio.sleep((wave % 4) * 0.0005)
        finally:
            await ledger.close()
        return n

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        n = runner.run(waves())
    assert [r["request_id"] for r in read_chain(ledger.path)] == [f"req-{i}" for i in range(n)]
    assert seams.fsyncs > 0


async def test_torn_tail_is_moved_aside_and_chain_goes_on(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger()
    await ledger.open()
    await ledger.append(record(1))
    await ledger.append(record(2))
    await ledger.close()
    whole = ledger.path.read_bytes()
    torn = b"\0\0\0\0\n" + b'{"v":1,"ts":"2025-03-04T05:06:07.891Z","request_id":"re'
    with ledger.path.open("ab") as f:
        f.write(torn)

    reopened = make_ledger()
    await reopened.open()
    assert ledger.path.read_bytes() == whole
    torn_file = ledger.path.with_name("ledger.jsonl.torn")
    assert torn_file.read_bytes() == torn + b"\n"
    assert stat.S_IMODE(torn_file.stat().st_mode) == 0o600
    await reopened.append(record(3))
    assert [r["request_id"] for r in read_chain(ledger.path)] == ["req-1", "req-2", "req-3"]


async def test_all_garbage_file_starts_a_fresh_chain(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    ledger.path.write_bytes(b"\0" * 5000)
    await ledger.open()
    await ledger.append(record(1))
    assert read_chain(ledger.path)[0]["prev"] == GENESIS


async def test_second_daemon_is_locked_out(make_ledger: Callable[..., Ledger]) -> None:
    first = make_ledger()
    await first.open()
    second = make_ledger()
    with pytest.raises(LedgerLocked) as caught:
        await second.open()
    message = str(caught.value)
    assert "\n" not in message
    assert str(first.path) in message and "another tokenhub-sidecar" in message
    await first.close()
    await second.open()
    await second.append(record(1))


async def test_rotation_continues_the_chain(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(rotate_bytes=4096)
    await ledger.open()
    padding = "x" * 300
    for i in range(40):
        await ledger.append(record(i, pad=padding))
    await asyncio.gather(*(ledger.append(record(100 + i, pad=padding)) for i in range(20)))
    assert rotated_path(ledger.path, 1).exists() and rotated_path(ledger.path, 4).exists()
    for file in ledger.path.parent.glob("ledger.jsonl.[0-9][0-9][0-9][0-9][0-9][0-9]"):
        assert file.stat().st_size <= 4096
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert len(read_chain(ledger.path)) == 60
    await ledger.close()

    # Restarting right after a rotation (empty live file) chains to the rotated file.
    ledger.path.write_bytes(b"")
    reopened = make_ledger(rotate_bytes=4096)
    await reopened.open()
    await reopened.append(record(999))
    assert read_chain(ledger.path)[-1]["request_id"] == "req-999"


async def test_disk_full_refuses_then_recovers(make_ledger: Callable[..., Ledger]) -> None:
    seams = Seams()
    failures: list[int] = []
    ledger = make_ledger(seams=seams, on_failure=lambda: failures.append(1))
    await ledger.open()
    await ledger.append(record(1))
    before = ledger.path.read_bytes()

    seams.short_then_fail = True  # half a line reaches the file, then ENOSPC
    with pytest.raises(LedgerUnavailable):
        await ledger.append(record(2))
    assert not ledger.available
    assert failures, "the failure is reported (to the ledger error metric)"
    assert ledger.path.read_bytes() == before  # the partial line was cut off again
    with pytest.raises(LedgerUnavailable):
        await ledger.append(record(3))
    assert ledger.path.read_bytes() == before

    seams.fail_write = None  # space is freed
    await wait_until(lambda: ledger.available)
    await ledger.append(record(4))
    assert [r["request_id"] for r in read_chain(ledger.path)] == ["req-1", "req-4"]
    assert not ledger.path.with_name("ledger.jsonl.probe").exists()


async def test_fsync_error_makes_ledger_unavailable(make_ledger: Callable[..., Ledger]) -> None:
    seams = Seams()
    ledger = make_ledger(fsync="always", seams=seams)
    await ledger.open()
    seams.fail_fsync = True
    with pytest.raises(LedgerUnavailable):
        await ledger.append(record(1))
    assert not ledger.available
    await asyncio.sleep(0.05)
    assert not ledger.available  # the probe's fsync fails too
    seams.fail_fsync = False
    await wait_until(lambda: ledger.available)
    await ledger.append(record(2))
    assert read_chain(ledger.path)[-1]["request_id"] == "req-2"


async def test_an_interval_fsync_error_fails_no_caller_whose_line_was_written(
    make_ledger: Callable[..., Ledger],
) -> None:
    """The due fsync rides with the next write; if only the fsync fails, that write's callers
    have their lines and are told so (an error would make a client retry and pay twice)."""
    failures: list[int] = []
    seams = Seams()
    ledger = make_ledger(
        fsync="interval", fsync_interval_ms=100, seams=seams, on_failure=lambda: failures.append(1)
    )
    await ledger.open()
    await ledger.append(record(1))  # the file is dirty: an fsync is due 100 ms after open
    seams.write_delay_s = 0.3
    second = asyncio.create_task(ledger.append(record(2)))
    await asyncio.sleep(0.2)  # the fsync came due while the second write runs
    seams.fail_fsync = True
    await ledger.append(record(3))  # queued behind the second write; goes out with the fsync
    await second
    assert failures, "the failed fsync was not noticed"
    assert [r["request_id"] for r in read_chain(ledger.path)] == ["req-1", "req-2", "req-3"]
    seams.fail_fsync = False
    seams.write_delay_s = 0.0


async def test_cancelled_caller_still_gets_its_line(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    await ledger.open()
    task = asyncio.create_task(ledger.append(record(1)))
    await asyncio.sleep(0)
    task.cancel()
    await ledger.append(record(2))
    assert [r["request_id"] for r in read_chain(ledger.path)] == ["req-1", "req-2"]


async def test_append_after_close_is_refused(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    with pytest.raises(LedgerUnavailable):
        await ledger.append(record(1))
    await ledger.open()
    await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await ledger.append(record(1))
