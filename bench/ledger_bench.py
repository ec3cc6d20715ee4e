"""Ledger benchmarks: append throughput per fsync policy, and ``usage`` over 1,000,000 lines.

    .venv/bin/python bench/ledger_bench.py [--records 5000] [--lines 1000000] [--dir DIR]
        [--ledger PATH] [--no-append] [--baseline]

Targets: ``usage`` over a 1,000,000-line ledger in under 3 s. Append rates depend on the disk's
fsync latency (``always`` is bounded by it; group commit batches concurrent appends).
``--ledger PATH`` keeps the generated ledger there and reuses it on the next run (generating
takes longer than reading). ``usage`` runs once in one process and once with the default worker
processes; each timing is printed with the 1-minute load average at its start, since the
machine may be shared. ``--baseline`` also times just reading the file and just orjson.loads of
every line, for context.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from sidecar.billing import Usage, cost, usd
from sidecar.config import LedgerConfig, ModelConfig
from sidecar.ledger import GENESIS, Ledger, format_ts
from sidecar.usage import cmd_usage, verify

MODELS = {
    "deepseek-v3.2": ModelConfig(
        upstream="deepseek-v3.2",
        input_per_mtok=Decimal("0.28"),
        output_per_mtok=Decimal("0.42"),
        cached_input_per_mtok=Decimal("0.028"),
    ),
    "qwen3-max": ModelConfig(
        upstream="qwen3-max", input_per_mtok=Decimal("1.2"), output_per_mtok=Decimal("6")
    ),
}
PROVIDERS = ("alibaba", "volc", "tencent")
OUTCOMES = (
    ("ok",) * 90
    + ("cache_hit",) * 5
    + ("upstream_failed", "stream_cut") * 2
    + ("client_cancelled",)
)
FEE = Decimal("0.03")


def make_record(rng: random.Random, moment: datetime, i: int) -> dict[str, Any]:
    model = rng.choice(tuple(MODELS))
    provider = rng.choice(PROVIDERS)
    outcome = rng.choice(OUTCOMES)
    usage = Usage(
        input_tokens=(inp := rng.randint(10, 20000)),
        output_tokens=rng.randint(1, 4000),
        cached_tokens=rng.choice((0, 0, inp // 2)),
    )
    price = cost(usage, MODELS[model], FEE)
    billable = outcome == "ok"
    money = (
        price.ledger_fields()
        if billable
        else {"model_fee_usd": "0", "service_fee_usd": "0", "total_usd": "0"}
    )
    record: dict[str, Any] = {
        "v": 1,
        "ts": format_ts(moment),
        "request_id": f"req_{i:024x}",
        "endpoint": "/v1/chat/completions",
        "requested": model,
        "model": model,
        "provider": provider,
        "upstream_model": model,
        "region": "sg",
        "stream": bool(i & 1),
        "status": 200 if outcome in ("ok", "cache_hit", "stream_cut", "client_cancelled") else 502,
        "outcome": outcome,
        "billable": billable,
        "attempts": [
            {"provider": provider, "status": 200, "reason": "ok", "ms": rng.randint(50, 9000)}
        ],
        "usage": usage.ledger_fields(),
        "usage_source": "reported",
        **money,
        "saved_usd": usd(price.total) if outcome == "cache_hit" else "0",
        "latency_ms": rng.randint(50, 9000),
    }
    if not billable and outcome != "cache_hit":
        record["estimated_usd"] = usd(price.total)
    return record


def generate(path: Path, lines: int) -> None:
    """Write a valid hash-chained ledger of ``lines`` records spread over ~60 days.

    Records are drawn from 5,000 priced templates so that generating is quicker than reading.
    """
    rng = random.Random(1)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    templates = [make_record(rng, start, i) for i in range(5000)]
    step = timedelta(days=60) / lines
    head = GENESIS
    with path.open("wb") as out:
        for i in range(lines):
            record = {**templates[i % 5000], "ts": format_ts(start + step * i)}
            body = orjson.dumps(record)
            line = b'%s,"prev":"%s"}\n' % (body[:-1], head.encode())
            head = hashlib.sha256(line).hexdigest()
            out.write(line)


async def append_rate(folder: Path, policy: str, records: int, concurrency: int) -> float:
    config = LedgerConfig(path=folder / f"append-{policy}-{concurrency}.jsonl", fsync=policy)  # type: ignore[arg-type]
    ledger = Ledger(config)
    await ledger.open()
    record = make_record(random.Random(2), datetime.now(UTC), 0)
    del record["v"], record["ts"]
    started = time.perf_counter()
    for _ in range(records // concurrency):
        await asyncio.gather(*(ledger.append(record) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await ledger.close()
    return records // concurrency * concurrency / elapsed


def _load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def baseline(path: Path) -> None:
    """Reading alone and orjson alone, to put the ``usage`` timings in context."""
    started, load = time.perf_counter(), _load()
    with path.open("rb") as f:
        count = sum(1 for _ in f)
    took = time.perf_counter() - started
    print(f"baseline: iterate {count:,} lines        {took:6.2f} s  {load}")
    started, load = time.perf_counter(), _load()
    loads = orjson.loads
    with path.open("rb") as f:
        for line in f:
            loads(line)
    print(f"baseline: iterate + orjson.loads      {time.perf_counter() - started:6.2f} s  {load}")


def time_usage(path: Path) -> None:
    for workers in (1, None):
        for by in ([], ["day,model,provider,outcome"]):
            sink = io.StringIO()
            started, load = time.perf_counter(), _load()
            code = cmd_usage(
                path, since=None, until=None, by=by, fmt="json", out=sink, workers=workers
            )
            elapsed = time.perf_counter() - started
            verdict = "ok" if elapsed < 3 else "OVER the 3 s target"
            label = ",".join(by) or "(none)"
            procs = "1 process " if workers == 1 else f"{len(os.sched_getaffinity(0))} workers "
            print(
                f"usage {procs} --by {label:<26} {elapsed:6.2f} s  {load}  [{verdict}] exit {code}"
            )


def ledger_for(path: Path, lines: int) -> Path:
    if path.exists():
        print(f"reusing {path} ({path.stat().st_size / 1e6:.0f} MB)")
        return path
    started = time.perf_counter()
    generate(path, lines)
    took = time.perf_counter() - started
    size = path.stat().st_size
    print(f"generated {lines:,} lines ({size / 1e6:.0f} MB) in {took:.1f} s")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--ledger", type=Path, default=None, help="keep/reuse the big ledger")
    parser.add_argument("--no-append", action="store_true", help="skip the append benchmark")
    parser.add_argument("--baseline", action="store_true", help="also time reading alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        for policy in () if args.no_append else ("always", "interval", "never"):
            for concurrency in (1, 64):
                count = (
                    args.records if policy != "always" or concurrency > 1 else args.records // 10
                )
                rate = asyncio.run(append_rate(folder, policy, count, concurrency))
                label = f"fsync={policy:<8} concurrency={concurrency:<3}"
                print(f"append {label} {rate:>10,.0f} records/s")
        path = ledger_for(args.ledger or folder / "big.jsonl", args.lines)
        if args.baseline:
            baseline(path)
        time_usage(path)
        started = time.perf_counter()
        result = verify(path)
        took = time.perf_counter() - started
        print(f"ledger verify: ok={result.ok} {result.lines:,} lines in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
