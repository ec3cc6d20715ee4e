import csv
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.config import LedgerConfig
from sidecar.ledger import Ledger, rotated_path
from sidecar.ledger_scan import is_fast_line
from sidecar.usage import (
    cmd_usage,
    cmd_verify,
    iter_records,
    json_document,
    ledger_files,
    spent_since,
    split_segments,
    summarize,
    verify,
)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def line(
    outcome: str, *, model: str = "m1", provider: str = "alpha", **extra: Any
) -> dict[str, Any]:
    billable = outcome == "ok"
    return {
        "request_id": "r",
        "model": model,
        "provider": provider,
        "outcome": outcome,
        "billable": billable,
        "usage": {
            "input_tokens": 100,
            "output_tokens": 10,
            "cached_tokens": 40,
            "images": 0,
            "seconds": 0,
        },
        "model_fee_usd": "0.0001" if billable else "0",
        "service_fee_usd": "0.000003" if billable else "0",
        "total_usd": "0.000103" if billable else "0",
        "saved_usd": "0",
        **extra,
    }


async def write_ledger(
    path: Path, entries: list[tuple[str, dict[str, Any]]], **config: Any
) -> None:
    clock = Clock()
    ledger = Ledger(LedgerConfig(path=path, **config), clock=clock)
    await ledger.open()
    for ts, record in entries:
        clock.now = datetime.fromisoformat(ts)
        await ledger.append(record)
    await ledger.close()


SAMPLE = [
    ("2025-03-01T10:00:00+00:00", line("ok")),
    ("2025-03-01T11:00:00+00:00", line("ok", model="m2")),
    ("2025-03-01T12:00:00+00:00", line("cache_hit", saved_usd="0.000103")),
    (
        "2025-03-02T09:00:00+00:00",
        line("stream_cut", usage_source="estimated", estimated_usd="0.00005"),
    ),
    ("2025-03-02T10:00:00+00:00", line("upstream_failed", provider="beta")),
    ("2025-03-03T23:59:59.999+00:00", line("client_cancelled", estimated_usd="0.00001")),
    ("2025-03-04T00:00:00+00:00", line("ok", provider="beta")),
]


@pytest.fixture
async def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, SAMPLE, rotate_bytes=4096)
    return path


def run_usage(path: Path, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args: dict[str, Any] = {"since": None, "until": None, "by": [], "fmt": "json"}
    args.update(kwargs)
    code = cmd_usage(path, out=out, err=err, **args)
    return code, out.getvalue(), err.getvalue()


async def test_usage_json_totals(ledger_path: Path) -> None:
    code, out, _ = run_usage(ledger_path)
    assert code == 0
    document = orjson.loads(out)
    assert document["groups"] == []
    assert document["totals"] == {
        "requests": 7,
        "billable_requests": 3,
        "failures": 2,
        "input_tokens": 300,
        "output_tokens": 30,
        "cached_tokens": 120,
        "model_fee_usd": "0.0003",
        "service_fee_usd": "0.000009",
        "total_usd": "0.000309",
        "saved_usd": "0.000103",
        "unbilled_estimated_usd": "0.00006",
    }


async def test_usage_groups_and_filters(ledger_path: Path) -> None:
    code, out, _ = run_usage(
        ledger_path, by=["day", "provider"], since="2025-03-02", until="2025-03-03"
    )
    assert code == 0
    groups = orjson.loads(out)["groups"]
    assert [(g["key"], g["requests"]) for g in groups] == [
        ({"day": "2025-03-02", "provider": "alpha"}, 1),
        ({"day": "2025-03-02", "provider": "beta"}, 1),
        ({"day": "2025-03-03", "provider": "alpha"}, 1),  # until is inclusive of the whole day
    ]
    _, out, _ = run_usage(
        ledger_path, since="2025-03-03T23:59:59.999Z", until="2025-03-04T00:00:00Z"
    )
    assert orjson.loads(out)["totals"]["requests"] == 2
    _, out, _ = run_usage(ledger_path, by=["model,outcome"])
    keys = [g["key"] for g in orjson.loads(out)["groups"]]
    assert {"model": "m2", "outcome": "ok"} in keys


async def test_usage_csv_and_table(ledger_path: Path) -> None:
    code, out, _ = run_usage(ledger_path, by=["provider"], fmt="csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["provider"] for r in rows] == ["alpha", "beta"]
    assert rows[1]["total_usd"] == "0.000103" and rows[1]["failures"] == "1"
    code, out, _ = run_usage(ledger_path, by=["outcome"], fmt="table")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["outcome", "requests", "billable"]
    assert lines[-2].split()[:2] == ["TOTAL", "7"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"since": "yesterday"}, "--since: 'yesterday' is not a date"),
        ({"until": "2025-13-01"}, "--until"),
        ({"by": ["model,colour"]}, "--by: unknown field 'colour'"),
        ({"fmt": "xml"}, "--format"),
    ],
)
async def test_usage_user_errors_are_one_line(
    ledger_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    code, out, err = run_usage(ledger_path, **kwargs)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_missing_ledger_is_one_line(tmp_path: Path) -> None:
    code, _, err = run_usage(tmp_path / "nope.jsonl")
    assert code == 2 and "no ledger at" in err and err.count("\n") == 1
    out, err_io = io.StringIO(), io.StringIO()
    assert cmd_verify(tmp_path / "nope.jsonl", out, err_io) == 2
    assert "no ledger at" in err_io.getvalue()


async def test_verify_reads_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(
        path, [(ts, line("ok", pad="x" * 600)) for ts, _ in SAMPLE * 3], rotate_bytes=4096
    )
    files = ledger_files(path)
    assert files[0] == rotated_path(path, 1) and files[-1] == path and len(files) >= 3
    out = io.StringIO()
    assert cmd_verify(path, out) == 0
    assert out.getvalue().startswith("ok: 21 lines")
    code, text, _ = run_usage(path)
    assert orjson.loads(text)["totals"]["requests"] == 21


Tamper = Callable[[list[bytes]], None]


def _edit_amount(lines: list[bytes]) -> None:
    lines[2] = lines[2].replace(b'"total_usd":"0"', b'"total_usd":"9"')


def _drop_line(lines: list[bytes]) -> None:
    del lines[1]


def _swap_lines(lines: list[bytes]) -> None:
    lines[1], lines[2] = lines[2], lines[1]


def _garbage(lines: list[bytes]) -> None:
    lines[2] = b"not json\n"


@pytest.mark.parametrize(
    ("tamper", "bad_line", "reason"),
    [
        (_edit_amount, 4, "prev does not match"),  # the edited line's successor notices
        (_drop_line, 2, "prev does not match"),
        (_swap_lines, 2, "prev does not match"),
        (_garbage, 3, "not valid JSON"),
    ],
)
async def test_verify_detects_tampering(
    tmp_path: Path, tamper: Tamper, bad_line: int, reason: str
) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, SAMPLE)
    lines = path.read_bytes().splitlines(keepends=True)
    tamper(lines)
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert not result.ok
    assert (result.bad_file, result.bad_line) == (path, bad_line)
    assert reason in result.reason
    out = io.StringIO()
    assert cmd_verify(path, out) == 1
    assert out.getvalue().startswith(f"{path}:{bad_line}: ")


async def test_verify_names_the_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(
        path, [(ts, line("ok", pad="x" * 600)) for ts, _ in SAMPLE * 2], rotate_bytes=4096
    )
    first = rotated_path(path, 1)
    lines = first.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"outcome":"ok"', b'"outcome":"OK"')
    first.write_bytes(b"".join(lines))
    result = verify(path)
    assert (result.bad_file, result.bad_line) == (first, 2)


async def test_torn_tail_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, SAMPLE)
    with path.open("ab") as f:
        f.write(b'{"v":1,"ts":"2025')
    result = verify(path)
    assert result.bad_line == len(SAMPLE) + 1 and "cut off" in result.reason


async def test_spent_since_seeds_the_budget(ledger_path: Path) -> None:
    day, month = spent_since(
        ledger_path,
        datetime(2025, 3, 4, tzinfo=UTC),
        datetime(2025, 3, 1, tzinfo=UTC),
    )
    assert str(day) == "0.000103" and str(month) == "0.000309"


# -- the fast path, its fallback, and the split over worker processes ---------------------------

BY_ALL = ["day,model,provider,outcome"]


def full(outcome: str, n: int, *, model: str = "deepseek-v3.2", **extra: Any) -> dict[str, Any]:
    """A record in ``handlers.exchange.record``'s field order (the layout of the fast path)."""
    billable = outcome == "ok"
    record: dict[str, Any] = {
        "request_id": f"req_{n:08x}",
        "endpoint": "/v1/chat/completions",
        "requested": model,
        "model": model,
        "provider": ("alpha", "beta")[n % 2],
        "upstream_model": model,
        "region": "sg",
        "stream": bool(n % 3),
        "status": 200,
        "outcome": outcome,
        "billable": billable,
        "attempts": [{"provider": "alpha", "status": 502, "reason": "http 502", "ms": 1}] * (n % 3),
        "usage": {
            "input_tokens": 1000 + n,
            "output_tokens": 10 * n,
            "cached_tokens": n % 7,
            "images": 0,
            "seconds": "1.5" if n % 5 == 0 else 0,
        },
        "usage_source": "reported",
        "model_fee_usd": f"0.{n:04d}0{n % 9}" if billable else "0",
        "service_fee_usd": f"0.0000{n:03d}" if billable else "0",
        "total_usd": f"{n % 3}.{n:05d}01" if billable else "0",
        "saved_usd": f"0.00{n:02d}" if outcome == "cache_hit" else "0",
        "latency_ms": 40 + n,
    }
    if outcome in ("stream_cut", "client_cancelled"):
        record["estimated_usd"] = f"0.000{n}"
    record.update(extra)
    return record


OUTCOMES = ("ok", "ok", "ok", "cache_hit", "stream_cut", "upstream_failed", "client_cancelled")
MODELS = ("deepseek-v3.2", "qwen3-max", "模型-ü", 'ascii"quoted')


def full_entries(count: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            f"2025-03-0{1 + n % 3}T{n % 24:02d}:00:00+00:00",
            full(OUTCOMES[n % len(OUTCOMES)], n, model=MODELS[n % len(MODELS)]),
        )
        for n in range(count)
    ]


def orjson_path(path: Path, **kwargs: Any) -> dict[str, Any]:
    """What the plain orjson reading (``summarize`` over ``iter_records``) gives."""
    fields = tuple(f for item in kwargs.get("by", []) for f in item.split(","))
    groups, overall = summarize(iter_records(path), by=fields)
    return json_document(groups, overall, fields)


def usage_json(path: Path, **kwargs: Any) -> dict[str, Any]:
    code, out, err = run_usage(path, **kwargs)
    assert code == 0, err
    document: dict[str, Any] = orjson.loads(out)
    return document


async def test_writer_lines_take_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(60))
    lines = path.read_text("utf-8").splitlines(keepends=True)
    fast = [is_fast_line(text) for text in lines]
    # Every line but those whose model needs a JSON escape (the quoted one) is a fast line.
    assert fast == ['\\"' not in text for text in lines]
    assert sum(fast) == 45
    for by in ([], BY_ALL, ["model"], ["day,outcome"]):
        assert usage_json(path, by=by) == orjson_path(path, by=by)


def _reordered(record: dict[str, Any]) -> bytes:
    return orjson.dumps(dict(reversed(list(record.items())))) + b"\n"


def _spaced(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"  # ", " and ": ", and \\u escapes for non-ASCII


def _pretty_numbers(record: dict[str, Any]) -> bytes:
    text = orjson.dumps(record).replace(b'"status":200', b'"status":2.0E2')
    return text.replace(b'"region":"sg"', b'"region":null') + b"\n"


@pytest.mark.parametrize("edit", [_reordered, _spaced, _pretty_numbers])
async def test_hand_edited_lines_sum_the_same(tmp_path: Path, edit: Callable[..., bytes]) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(42))
    lines = path.read_bytes().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"".join(edit(orjson.loads(text)) for text in lines))
    assert not any(is_fast_line(t) for t in edited.read_text("utf-8").splitlines(keepends=True))
    for by in ([], BY_ALL):
        assert usage_json(edited, by=by) == usage_json(path, by=by) == orjson_path(path, by=by)
    # Fast and edited lines mixed in one file, in one chunk.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(edit(orjson.loads(t)) if i % 2 else t for i, t in enumerate(lines)))
    assert usage_json(mixed, by=BY_ALL) == usage_json(path, by=BY_ALL)


async def test_escapes_elsewhere_keep_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    entries = [
        (ts, {**record, "request_id": 'req "\\ \u00e9 \\u', "requested": "x\ny"})
        for ts, record in full_entries(14)
        if '"' not in record["model"]
    ]
    await write_ledger(path, entries)
    lines = path.read_text("utf-8").splitlines(keepends=True)
    assert all(is_fast_line(text) for text in lines)
    assert usage_json(path, by=BY_ALL) == orjson_path(path, by=BY_ALL)


async def test_a_duplicate_key_counts_as_orjson_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(7))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"latency_ms"', b'"total_usd":"5","latency_ms"')
    path.write_bytes(b"".join(lines))
    assert not is_fast_line(lines[0].decode())
    document = usage_json(path)
    assert document == orjson_path(path)
    assert Decimal(document["totals"]["total_usd"]) > 5  # the later "total_usd" wins


async def test_bad_bytes_and_a_torn_tail_are_skipped_like_before(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(21))
    good = usage_json(path, by=BY_ALL)
    with path.open("ab") as f:
        f.write(b'{"v":1,"ts":"2025-03-01T00:00:00.000Z","model":"\xff\xfe"}\n')
        f.write(b'{"v":1,"ts":"2025')
    assert usage_json(path, by=BY_ALL) == good == orjson_path(path, by=BY_ALL)


@pytest.mark.parametrize("parts", [2, 3, 5, 8])
async def test_split_cuts_at_line_starts_and_covers_every_byte(tmp_path: Path, parts: int) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(70), rotate_bytes=9000)
    files = ledger_files(path)
    assert len(files) >= 3
    plan = split_segments(files, parts)
    assert len(plan) == parts
    covered: dict[Path, list[tuple[int, int]]] = {f: [] for f in files}
    for segments in plan:
        for file, start, end in segments:
            data = file.read_bytes()
            assert start == 0 or data[start - 1 : start] == b"\n"  # cut mid-file: at a line start
            covered[file].append((start, end))
    for file, ranges in covered.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == file.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


async def test_worker_processes_sum_the_same(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(90), rotate_bytes=20000)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = _spaced(orjson.loads(lines[3]))  # one fallback line in the live file
    path.write_bytes(b"".join(lines))
    for by in ([], BY_ALL):
        single = usage_json(path, by=by, workers=1)
        for workers in (2, 3):
            assert usage_json(path, by=by, workers=workers, parallel_min_bytes=0) == single
        assert single == orjson_path(path, by=by)
    assert usage_json(path, since="2025-03-02", workers=2, parallel_min_bytes=0) == usage_json(
        path, since="2025-03-02", workers=1
    )


async def test_since_and_until_on_fast_lines(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    await write_ledger(path, full_entries(63))
    lines = path.read_bytes().splitlines(keepends=True)
    inside = tmp_path / "inside.jsonl"
    inside.write_bytes(
        b"".join(t for t in lines if b'"ts":"2025-03-02T' in t or b"03T02:00:00.000Z" in t)
    )
    # --until is inclusive of the instant given; the hour-05 lines of day 3 stay out.
    document = usage_json(path, by=BY_ALL, since="2025-03-02", until="2025-03-03T02:00:00Z")
    assert document == orjson_path(inside, by=BY_ALL)
    assert document["totals"]["requests"] == 21 + 3
