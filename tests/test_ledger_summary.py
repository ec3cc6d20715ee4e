"""Rotated-file summaries: written at rotation, used by ``usage`` only while they still hold."""

import asyncio
import io
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar import ledger_summary
from sidecar.config import LedgerConfig
from sidecar.ledger import Ledger, rotated_numbers, rotated_path
from sidecar.ledger_summary import summary_path
from sidecar.usage import (
    Sums,
    _bound,
    cmd_verify,
    iter_records,
    json_document,
    ledger_files,
    ledger_sums,
    spent_since,
    summarize,
    verify,
)

from .test_ledger import wait_until
from .test_usage import MODELS, OUTCOMES, full, run_usage, usage_json, write_ledger

START = datetime(2025, 3, 1, 20, 0, tzinfo=UTC)
ROTATE = 6000  # ~8 lines a file, so day boundaries fall inside files


def entries(count: int) -> list[tuple[str, dict[str, Any]]]:
    """Lines 37 minutes apart from 2025-03-01T20:00Z, over four days."""
    return [
        (
            (START + timedelta(minutes=37 * n)).isoformat(),
            full(OUTCOMES[n % len(OUTCOMES)], n, model=MODELS[n % len(MODELS)]),
        )
        for n in range(count)
    ]


@pytest.fixture
async def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, entries(120), rotate_bytes=ROTATE)
    return path


def rotated(path: Path) -> list[Path]:
    return [rotated_path(path, n) for n in rotated_numbers(path)]


def reference(
    path: Path, since: str | None = None, until: str | None = None, by: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``usage --format json`` the plain way: every line through orjson, no summaries."""
    groups, overall = summarize(
        iter_records(path),
        since=_bound(since, "", upper=False) if since else "",
        until=_bound(until, "", upper=True) if until else "\uffff",
        by=by,
    )
    return json_document(groups, overall, by)


def document(sums: Sums) -> dict[str, Any]:
    return json_document(sums.groups, sums.overall(), sums.by)


def stamps(file: Path) -> list[str]:
    return [orjson.loads(line)["ts"] for line in file.read_bytes().splitlines()]


def cut_by(files: list[Path], *bounds: str) -> set[Path]:
    """The files holding lines on both sides of one of the bounds (as ``ts`` strings)."""
    return {
        file
        for file in files
        for ts in (stamps(file),)
        if any(min(ts) < bound <= max(ts) for bound in bounds)
    }


def drop_summaries(path: Path) -> None:
    for file in rotated(path):
        summary_path(file).unlink(missing_ok=True)


QUERIES: list[tuple[str | None, str | None, tuple[str, ...]]] = [
    (None, None, ()),
    (None, None, ("day", "model", "provider", "outcome")),
    ("2025-03-02", None, ("model",)),
    ("2025-03-02", "2025-03-03", ("day", "provider")),  # --until is inclusive: a midnight bound
    (None, "2025-03-03T23:59:59.999Z", ("outcome",)),  # ... and so is this one
    ("2025-03-02T05:17:00Z", None, ("outcome",)),  # inside a day and inside a file
    ("2025-03-02", "2025-03-03T13:00:00.500Z", ("day", "model", "provider", "outcome")),
    ("2025-03-02T01:00:00Z", "2025-03-02T03:30:00Z", ("provider",)),  # both in one file
    ("2030-01-01", None, ("model",)),  # after every line
    (None, "2025-02-01", ()),  # before every line
]


@pytest.mark.parametrize(("since", "until", "by"), QUERIES)
async def test_summaries_sum_what_a_full_read_sums(
    ledger: Path, since: str | None, until: str | None, by: tuple[str, ...]
) -> None:
    files = rotated(ledger)
    assert len(files) >= 10 and all(ledger_summary.load(f) is not None for f in files)
    expected = reference(ledger, since, until, by)
    assert expected["totals"]["requests"] or since == "2030-01-01" or until == "2025-02-01"
    query = {"since": since, "until": until, "by": [",".join(by)] if by else []}
    assert usage_json(ledger, **query) == expected

    # Only the live file, and a file a bound cuts inside a day, are read line by line.
    lo = _bound(since, "", upper=False) if since else ""
    hi = _bound(until, "", upper=True) if until else "\uffff"
    inside_a_day = [b for b in (lo, hi) if b not in ("", "\uffff") and b[10:] != "T00:00:00.000Z"]
    sums = ledger_sums(ledger, since=lo, until=hi, by=by, workers=1)
    assert set(sums.scanned) == {ledger, *cut_by(files, *inside_a_day)}
    if inside_a_day and since != "2030-01-01":
        assert len(sums.scanned) > 1

    # Without summaries (written again on the way), and in worker processes: the same digits.
    drop_summaries(ledger)
    assert usage_json(ledger, **query) == expected
    assert all(ledger_summary.load(f) is not None for f in files)
    drop_summaries(ledger)
    assert usage_json(ledger, **query, workers=2, parallel_min_bytes=0) == expected
    assert all(ledger_summary.load(f) is not None for f in files)
    assert usage_json(ledger, **query, workers=2, parallel_min_bytes=0) == expected


async def test_every_format_matches_with_and_without_summaries(ledger: Path) -> None:
    for fmt in ("table", "csv", "json"):
        args = {"by": ["day,model"], "since": "2025-03-02", "fmt": fmt}
        warm = run_usage(ledger, **args)
        drop_summaries(ledger)
        for file in rotated(ledger):
            summary_path(file).mkdir()  # no summary can be written: every file is read
        cold = run_usage(ledger, **args)
        for file in rotated(ledger):
            summary_path(file).rmdir()
        assert warm == cold and warm[0] == 0


# -- written by the daemon's rotation --------------------------------------------------------


async def test_rotation_writes_each_rotated_files_summary(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    clock_at = iter(START + timedelta(minutes=37 * n) for n in range(1000))
    writer = Ledger(LedgerConfig(path=path, rotate_bytes=ROTATE), clock=clock_at.__next__)
    await writer.open()
    records = [record for _, record in entries(60)]
    for record in records[:20]:
        await writer.append(record)
    first = rotated_path(path, 1)
    for _ in range(500):  # written in the background while the ledger stays open
        if ledger_summary.load(first) is not None:
            break
        await asyncio.sleep(0.01)
    assert ledger_summary.load(first) is not None
    await asyncio.gather(*(writer.append(record) for record in records[20:]))
    await writer.close()  # waits for summaries still being written

    files = rotated(path)
    assert len(files) >= 5
    for file in files:
        summary = ledger_summary.load(file)
        assert summary is not None
        assert ledger_summary.encode(summary) == ledger_summary.encode(ledger_summary.compute(file))
        assert stat.S_IMODE(summary_path(file).stat().st_mode) == 0o600
    assert not summary_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert set(ledger_sums(path).scanned) == {path}
    assert usage_json(path, by=["day,model,provider,outcome"]) == reference(
        path, by=("day", "model", "provider", "outcome")
    )


async def test_a_summary_that_cannot_be_written_is_only_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ledger.jsonl"
    blocked = summary_path(rotated_path(path, 1))
    blocked.mkdir(parents=True)  # the summary's name is taken by a folder
    await write_ledger(path, entries(40), rotate_bytes=ROTATE)
    captured = capsys.readouterr()
    assert "ledger_summary_failed" in captured.out + captured.err
    assert verify(path).ok and verify(path).lines == 40
    assert ledger_summary.load(rotated_path(path, 1)) is None
    assert ledger_summary.load(rotated_path(path, 2)) is not None
    assert usage_json(path, by=["model"]) == reference(path, by=("model",))


def run_summary_command(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sidecar.ledger_summary", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_summary_command_the_daemon_runs_in_a_child_process(ledger: Path) -> None:
    first, second = rotated(ledger)[:2]
    drop_summaries(ledger)
    done = run_summary_command(str(first))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    written = ledger_summary.load(first)
    assert written is not None
    assert ledger_summary.encode(written) == ledger_summary.encode(ledger_summary.compute(first))
    assert ledger_summary.load(second) is None  # only the file it was given

    stamp = summary_path(first).stat().st_mtime_ns
    assert run_summary_command("--unless-usable", str(first)).returncode == 0
    assert summary_path(first).stat().st_mtime_ns == stamp  # it still held: left as it was
    assert run_summary_command("--unless-usable", str(second)).returncode == 0
    assert ledger_summary.load(second) is not None

    summary_path(first).unlink()
    summary_path(first).mkdir()  # the summary's name is taken: one line that says so
    failed = run_summary_command(str(first))
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith(f"{first}: ") and failed.stderr.count("\n") == 1
    assert "Traceback" not in failed.stderr
    wrong = run_summary_command()
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: ")


async def test_verify_and_the_listing_ignore_summaries_and_leftovers(ledger: Path) -> None:
    files = rotated(ledger)
    folder = ledger.parent
    (folder / "ledger.jsonl.torn").write_bytes(b'{"v":1,"ts":"2025\n')
    (folder / f".{files[0].name}.summary.x1y2.tmp").write_bytes(b"half a summary")
    assert all(summary_path(f).exists() for f in files)
    assert ledger_files(ledger) == [*files, ledger]
    out = io.StringIO()
    assert cmd_verify(ledger, out) == 0
    assert out.getvalue() == f"ok: 120 lines in {len(files) + 1} file(s), hash chain intact\n"


# -- a summary that no longer holds is not used, and is written again ------------------------

Edit = Callable[[Path, Path], None]


def _same_size_edit_inside(file: Path, _: Path) -> None:
    """An amount changed in a middle line, same length, mtime put back: ctime still moves."""
    before = file.stat()
    data = file.read_bytes()
    lines = data.splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines[1:-1], 1) if b'"billable":true' in line)
    lines[index] = re.sub(rb'"total_usd":"(\d)', b'"total_usd":"9', lines[index], count=1)
    assert len(b"".join(lines)) == len(data) and b"".join(lines) != data
    time.sleep(0.05)  # past the file clock's tick, so the edit's ctime differs
    file.write_bytes(b"".join(lines))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def _line_appended(file: Path, _: Path) -> None:
    last = file.read_bytes().splitlines(keepends=True)[-1]
    with file.open("ab") as f:
        f.write(last.replace(b'"outcome":"', b'"outcome":"x'))


def _last_line_replaced(file: Path, _: Path) -> None:
    lines = file.read_bytes().splitlines(keepends=True)
    top = re.sub(rb'"provider":"(alpha|beta)"', lambda m: m[0].upper(), lines[-1], count=1)
    assert top != lines[-1]
    lines[-1] = top
    time.sleep(0.05)
    file.write_bytes(b"".join(lines))


def _summary_numbers_edited(_: Path, summary: Path) -> None:
    document = orjson.loads(summary.read_bytes())
    document["groups"][0][4] = str(int(document["groups"][0][4]) + 1000)
    summary.write_bytes(orjson.dumps(document))


def _summary_cut_short(_: Path, summary: Path) -> None:
    summary.write_bytes(summary.read_bytes()[:-40])


def _summary_of_another_file(file: Path, summary: Path) -> None:
    other = rotated_path(file.with_name("ledger.jsonl"), 1)
    summary.write_bytes(summary_path(other).read_bytes())


def _summary_claims_another_size(_: Path, summary: Path) -> None:
    """A consistent checksum, but it describes a file of another size."""
    document = orjson.loads(summary.read_bytes())
    del document["sha256"]
    document["size"] += 1
    document["sha256"] = ledger_summary._checksum(document)
    summary.write_bytes(orjson.dumps(document))


def _summary_of_a_newer_format(_: Path, summary: Path) -> None:
    document = orjson.loads(summary.read_bytes())
    del document["sha256"]
    document["v"] = 2
    document["sha256"] = ledger_summary._checksum(document)
    summary.write_bytes(orjson.dumps(document))


@pytest.mark.parametrize(
    "edit",
    [
        _same_size_edit_inside,
        _line_appended,
        _last_line_replaced,
        _summary_numbers_edited,
        _summary_cut_short,
        _summary_of_another_file,
        _summary_claims_another_size,
        _summary_of_a_newer_format,
    ],
)
async def test_a_stale_or_tampered_summary_is_not_used(ledger: Path, edit: Edit) -> None:
    by = ("day", "model", "provider", "outcome")
    target = rotated(ledger)[3]
    summary = summary_path(target)
    stale = ledger_summary.decode(summary.read_bytes())
    assert stale is not None
    before = usage_json(ledger, by=[",".join(by)])
    edit(target, summary)

    assert ledger_summary.load(target) is None
    expected = reference(ledger, by=by)
    if edit.__name__.startswith("_summary"):
        assert expected == before  # the ledger is as it was: the summary alone was wrong
    else:
        assert expected != before  # using the old summary would have been wrong
    sums = ledger_sums(ledger, by=by, workers=1)
    assert (sums.summarized, sums.scanned) == ([target], [ledger])  # read again, in full
    assert document(sums) == expected
    rewritten = ledger_summary.load(target)  # and its summary written again on the way
    assert rewritten is not None
    assert ledger_summary.encode(rewritten) == ledger_summary.encode(ledger_summary.compute(target))
    assert usage_json(ledger, by=[",".join(by)]) == expected
    assert ledger_sums(ledger).summarized == []


# -- written at open, for the rotated files whose summary usage could not use ----------------


async def wait_for(condition: Callable[[], bool]) -> None:
    await wait_until(condition, tries=1000)  # up to ~10 s on a loaded machine


def tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


async def test_open_writes_the_summaries_usage_could_not_use(ledger: Path) -> None:
    files = rotated(ledger)
    missing, stale, newer = files[0], files[3], files[5]
    summary_path(missing).unlink()
    _summary_numbers_edited(stale, summary_path(stale))
    _summary_of_a_newer_format(newer, summary_path(newer))
    assert all(ledger_summary.load(f) is None for f in (missing, stale, newer))

    writer = Ledger(LedgerConfig(path=ledger, rotate_bytes=ROTATE))
    await writer.open()
    assert not summary_path(missing).exists()  # open() did not wait for the back-fill
    await writer.append({"request_id": "during-back-fill", "outcome": "ok"})
    await wait_for(lambda: all(ledger_summary.load(f) is not None for f in files))
    await writer.close()

    for file in files:
        written = summary_path(file).read_bytes()
        assert written == ledger_summary.encode(ledger_summary.compute(file))
        assert stat.S_IMODE(summary_path(file).stat().st_mode) == 0o600
    assert tmp_leftovers(ledger.parent) == []
    sums = ledger_sums(ledger, by=("day", "model", "provider", "outcome"), workers=1)
    assert (sums.summarized, sums.scanned) == ([], [ledger])
    assert verify(ledger).ok


async def test_open_leaves_usable_summaries_alone(ledger: Path) -> None:
    files = rotated(ledger)
    first, last = files[0], files[-1]
    summary_path(first).unlink()
    summary_path(last).unlink()
    middle = {file: summary_path(file).stat() for file in files[1:-1]}

    writer = Ledger(LedgerConfig(path=ledger, rotate_bytes=ROTATE))
    await writer.open()
    # The back-fill goes through the files in order, one way or the other: both ends written
    # means every file in between was looked at.
    await wait_for(lambda: summary_path(first).exists() and summary_path(last).exists())
    await writer.close()

    for file, before in middle.items():
        after = summary_path(file).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert ledger_summary.load(first) is not None and ledger_summary.load(last) is not None


async def test_a_back_fill_failure_is_only_a_warning(
    ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = rotated(ledger)
    drop_summaries(ledger)
    summary_path(files[-1]).mkdir()  # the first one the back-fill tries cannot be written

    writer = Ledger(LedgerConfig(path=ledger, rotate_bytes=ROTATE))
    await writer.open()
    await wait_for(lambda: all(ledger_summary.load(f) is not None for f in files[:-1]))
    await writer.append({"request_id": "after-the-failure", "outcome": "ok"})
    await writer.close()

    captured = capsys.readouterr()
    assert "ledger_summary_failed" in captured.out + captured.err
    assert str(files[-1]) in captured.out + captured.err
    assert verify(ledger).ok


async def test_close_waits_for_the_summary_in_progress_and_starts_no_other(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, entries(40), rotate_bytes=ROTATE)
    # The newest rotated file, summarized first, is large, so that close() comes while its
    # summary is being written (were close() not to wait for it, its task would be left over).
    await write_ledger(path, entries(3000), fsync="never")
    await write_ledger(path, entries(1), rotate_bytes=ROTATE)
    files = rotated(path)
    assert files[-1].stat().st_size > 1_000_000
    drop_summaries(path)

    writer = Ledger(LedgerConfig(path=path, rotate_bytes=ROTATE))
    await writer.open()
    await asyncio.sleep(0)  # one loop turn: the back-fill has started on the newest file
    await writer.close()

    assert asyncio.all_tasks() == {asyncio.current_task()}
    newest = summary_path(files[-1])
    assert newest.read_bytes() == ledger_summary.encode(ledger_summary.compute(files[-1]))
    assert [f for f in files[:-1] if summary_path(f).exists()] == []
    assert tmp_leftovers(tmp_path) == []


# -- the budget's starting spend -------------------------------------------------------------


def spent_reference(path: Path, day: str, month: str) -> tuple[Decimal, Decimal]:
    """The billed total_usd since each start, line by line (what spent_since always meant)."""
    spent_day = spent_month = Decimal(0)
    for record in iter_records(path):
        ts = record.get("ts")
        if isinstance(ts, str) and ts >= month and record.get("billable"):
            amount = Decimal(record.get("total_usd") or 0)
            spent_month += amount
            spent_day += amount if ts >= day else 0
    return spent_day, spent_month


@pytest.mark.parametrize("summaries", [True, False])
async def test_spent_since_reads_summaries_to_the_same_amounts(
    ledger: Path, summaries: bool
) -> None:
    if not summaries:
        drop_summaries(ledger)
    day, month = datetime(2025, 3, 3, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)
    got = spent_since(ledger, day, month)
    expected = spent_reference(ledger, "2025-03-03T00:00:00.000Z", "2025-03-01T00:00:00.000Z")
    assert got == expected and str(got[0]) == str(expected[0]) and got[0] < got[1]
    assert all(ledger_summary.load(f) is not None for f in rotated(ledger))
    assert spent_since(ledger, day, datetime(2025, 3, 2, tzinfo=UTC)) == spent_reference(
        ledger, "2025-03-03T00:00:00.000Z", "2025-03-02T00:00:00.000Z"
    )


async def test_spent_since_counts_an_odd_ts_by_the_string_like_before(ledger: Path) -> None:
    """A hand-edited ts on the day but sorting before its midnight is not that day's spend."""
    lines = ledger.read_bytes().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if b'"billable":true' in line)
    lines[index] = re.sub(rb'"ts":"[^"]*"', b'"ts":"2025-03-04 09:00"', lines[index])
    ledger.write_bytes(b"".join(lines))
    day, month = datetime(2025, 3, 4, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)
    expected = spent_reference(ledger, "2025-03-04T00:00:00.000Z", "2025-03-01T00:00:00.000Z")
    assert spent_since(ledger, day, month) == expected
    by_day = usage_json(ledger, by=["day"], since="2025-03-04")["groups"]
    assert [g["key"]["day"] for g in by_day] == ["2025-03-04"]  # the line is not in there
