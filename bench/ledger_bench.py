"""Ledger benchmarks: append throughput per fsync policy, and ``usage`` over 1,000,000 lines.

    .venv/bin/python bench/ledger_bench.py [--records 5000] [--lines 1000000] [--dir DIR]
        [--ledger PATH] [--no-append] [--baseline] [--repeat 3] [--no-pin]

Targets: ``tokenhub-sidecar usage`` over a 1,000,000-line ledger in under 3 s on one core.
Append rates depend on the disk's fsync latency (``always`` is bounded by it; group commit
batches concurrent appends).

The generated ledger is what the daemon writes with the default config: rotated files of at most
``rotate_bytes`` (100 MiB), each with the summary the daemon writes after a rotation (by the
same function), then the live file; the hash chain runs across them. ``--ledger PATH`` keeps it
there and reuses it on the next run. ``usage`` runs as the CLI in a child process (start-up
included), pinned with this process to one CPU unless ``--no-pin``: warm, with the summaries,
and cold, with them deleted before each run (a cold run writes them again). The files are in the
page cache either way. Each figure is the median of ``--repeat`` runs (wall time, with that
run's CPU time), printed with the 1-minute load average at its start, since the machine may be
shared. ``--baseline`` also times just reading the files and just orjson.loads of every line,
for context.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import random
import resource
import subprocess
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
from sidecar.ledger import GENESIS, Ledger, format_ts, rotated_numbers, rotated_path
from sidecar.ledger_summary import summary_path, write_summary
from sidecar.usage import ledger_files, verify

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


def _create(path: Path) -> io.BufferedWriter:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def generate(path: Path, lines: int, rotate_bytes: int = LedgerConfig().rotate_bytes) -> None:
    """Write what the daemon writes: ``lines`` hash-chained records spread over ~60 days.

    Rotated as ``Ledger`` rotates (a line that would take the file past ``rotate_bytes`` starts
    the next one), each rotated file summarized by ``write_summary``, the function ``Ledger``
    runs after a rotation. Lines are written here rather than through ``Ledger.append`` (~13k
    lines/s on one core here: over a minute), and drawn from 5,000 priced templates.
    """
    rng = random.Random(1)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    templates = [make_record(rng, start, i) for i in range(5000)]
    step = timedelta(days=60) / lines
    head = GENESIS
    size, number = 0, 0
    out = _create(path)
    try:
        for i in range(lines):
            record = {**templates[i % 5000], "ts": format_ts(start + step * i)}
            body = orjson.dumps(record)
            line = b'%s,"prev":"%s"}\n' % (body[:-1], head.encode())
            head = hashlib.sha256(line).hexdigest()
            if size + len(line) > rotate_bytes and size > 0:
                out.close()
                number += 1
                os.rename(path, rotated_path(path, number))
                write_summary(rotated_path(path, number))
                out, size = _create(path), 0
            out.write(line)
            size += len(line)
    finally:
        out.close()


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
    files = ledger_files(path)
    started, load = time.perf_counter(), _load()
    count = 0
    for file in files:
        with file.open("rb") as f:
            count += sum(1 for _ in f)
    took = time.perf_counter() - started
    print(f"baseline: iterate {count:,} lines        {took:6.2f} s  {load}")
    started, load = time.perf_counter(), _load()
    loads = orjson.loads
    for file in files:
        with file.open("rb") as f:
            for line in f:
                loads(line)
    print(f"baseline: iterate + orjson.loads      {time.perf_counter() - started:6.2f} s  {load}")


def drop_summaries(path: Path) -> None:
    for number in rotated_numbers(path):
        summary_path(rotated_path(path, number)).unlink(missing_ok=True)


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_usage(path: Path, by: str) -> tuple[float, float, str, bytes]:
    """One ``tokenhub-sidecar usage`` in a child process: wall s, CPU s, load, its output."""
    argv = [sys.executable, "-m", "sidecar", "usage", "--ledger", str(path), "--format", "json"]
    started, cpu, load = time.perf_counter(), _child_cpu(), _load()
    done = subprocess.run([*argv, "--by", by] if by else argv, capture_output=True, check=True)
    return time.perf_counter() - started, _child_cpu() - cpu, load, done.stdout


def time_usage(path: Path, repeat: int) -> None:
    cores = len(os.sched_getaffinity(0))
    rotated = len(rotated_numbers(path))
    print(f"usage over {rotated} rotated files + the live file, {cores} CPU(s), median of {repeat}")
    for by in ("", "day,model,provider,outcome"):
        outputs = []
        for state in ("warm", "cold"):
            runs = []
            for _ in range(repeat):
                if state == "cold":
                    drop_summaries(path)
                runs.append(run_usage(path, by))
            elapsed, cpu, load, output = sorted(runs)[len(runs) // 2]
            outputs.append(output)
            verdict = "ok" if elapsed < 3 else "OVER the 3 s target"
            label = f"{state} ({'summaries' if state == 'warm' else 'no summaries'})"
            spread = f"{min(r[0] for r in runs):.2f}-{max(r[0] for r in runs):.2f}"
            print(
                f"usage {label:<24} --by {by or '(none)':<26} {elapsed:6.2f} s  "
                f"(cpu {cpu:.2f} s; runs {spread} s)  {load}  [{verdict}]"
            )
        same = "identical" if outputs[0] == outputs[1] else "DIFFERENT"
        print(f"usage --by {by or '(none)'}: warm and cold output {same}")


def ledger_for(path: Path, lines: int) -> Path:
    if path.exists():
        size = sum(file.stat().st_size for file in ledger_files(path))
        print(f"reusing {path} ({size / 1e6:.0f} MB in {len(ledger_files(path))} files)")
        return path
    started = time.perf_counter()
    generate(path, lines)
    took = time.perf_counter() - started
    files = ledger_files(path)
    size = sum(file.stat().st_size for file in files)
    print(
        f"generated {lines:,} lines ({size / 1e6:.0f} MB, {len(files) - 1} rotated files with "
        f"summaries + the live file) in {took:.1f} s"
    )
    return path


def pin_to_one_cpu() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {allowed[-1]})
    print(f"pinned to CPU {allowed[-1]} (children too)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--ledger", type=Path, default=None, help="keep/reuse the big ledger")
    parser.add_argument("--no-append", action="store_true", help="skip the append benchmark")
    parser.add_argument("--baseline", action="store_true", help="also time reading alone")
    parser.add_argument("--repeat", type=int, default=3, help="runs per usage figure")
    parser.add_argument("--no-pin", action="store_true", help="use every CPU allowed")
    args = parser.parse_args()
    if not args.no_pin:
        pin_to_one_cpu()
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
        time_usage(path, args.repeat)
        started = time.perf_counter()
        result = verify(path)
        took = time.perf_counter() - started
        print(f"ledger verify: ok={result.ok} {result.lines:,} lines in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
