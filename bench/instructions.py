"""`make bench-instructions`: instructions per proxied request, floor against sidecar, counted by
callgrind.

    python bench/instructions.py [--quick] [--only chat1,chat16,stream1,stream20]

On a shared VM the same wall-clock run moves by up to 30% from one hour to the next; the number of
instructions a server executes per request barely moves (well under 1% between runs). So this is
the figure to compare two versions of the daemon by, or the daemon against the floor.

Each server runs under ``valgrind --tool=callgrind --instr-atstart=no``, pinned with its fake
upstream to CPU 1. The driver (this process, on CPU 0) warms it up, switches counting on with
``callgrind_control -i on``, sends the scenario's requests, switches counting off and dumps. The
count covers every thread of the server (the sidecar's ledger and log threads too) in user space:
syscalls and context switches are not in it, and SHA-256 runs emulated (dearer than on hardware
with SHA extensions).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import run

VALGRIND_MISSING = (
    "valgrind is missing: run `apt-get update && apt-get install -y valgrind`, "
    "then `make bench-instructions`"
)
START_TIMEOUT_S = 180.0  # Python and its imports start some 30x slower under valgrind
WARMUP_REQUESTS = 200


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    concurrency: int
    requests: int
    stream: bool = False
    chunks: int = 20  # content chunks per upstream stream
    # Far enough apart that each chunk is one read even at valgrind's pace (at 5 ms, reads
    # sometimes bring two and the count moves by 5%).
    delay_ms: float = 20


SCENARIOS = (
    Scenario("chat1", "chat, 1 conn", 1, 1000),
    Scenario("chat16", "chat, 16 conns", 16, 2000),
    Scenario("stream1", "stream of 1 content chunk, 2 at once", 2, 200, True, chunks=1),
    Scenario("stream20", "stream of 20 content chunks, 2 at once", 2, 100, True),
)


def total_instructions(files: Sequence[Path]) -> int:
    """The events in callgrind output files: each file's ``totals:`` (else ``summary:``) line."""
    total = 0
    for file in files:
        found: dict[str, int] = {}
        for line in file.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key in ("totals", "summary") and value.strip():
                found[key] = int(value.split()[0])
        total += found.get("totals", found.get("summary", 0))
    return total


async def drive(url: str, requests: int, concurrency: int, stream: bool) -> int:
    """Send ``requests`` requests over ``concurrency`` connections; the number that failed."""
    body = run.chat_body(0.7, stream=stream)
    left = requests
    failed = 0
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            nonlocal left, failed
            while left > 0:
                left -= 1
                headers = {"Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    data = await response.read()
                    done = b"data: [DONE]" in data if stream else b'"choices"' in data
                    failed += response.status != 200 or not done

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True, timeout=120)


def server_argv(target: str, workdir: Path, port: int, up_port: int) -> list[str]:
    if target == "floor":
        upstream = f"http://127.0.0.1:{up_port}"
        script = str(run.BENCH / "floor.py")
        return [run.PY, script, "--port", str(port), "--upstream", upstream]
    config = workdir / "config.toml"
    config.write_text(run.sidecar_config(workdir, port, up_port, "off", "default"), "utf-8")
    return [run.PY, "-m", "sidecar", "serve", "-c", str(config)]


def count(scenario: Scenario, target: str, workdir: Path, cpu: int | None) -> tuple[int, str]:
    """(instructions per request, '') or (0, why not)."""
    with run.Procs(workdir, cpu) as procs:
        upstream = run.start_upstream(procs, "upstream", scenario.chunks, scenario.delay_ms)
        if upstream.problem:
            return 0, f"upstream {upstream.problem}"
        up_port = upstream.port
        port = run.free_port()
        out = workdir / f"{target}.callgrind"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        valgrind.append(f"--callgrind-out-file={out}.%p")
        pid = procs.start(target, valgrind + server_argv(target, workdir, port, up_port))
        problem = procs.wait_ready(
            target, pid, f"http://127.0.0.1:{port}/-/health", START_TIMEOUT_S
        )
        if problem:
            return 0, f"{target} {problem}"
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        warmup = min(WARMUP_REQUESTS, scenario.requests)
        asyncio.run(drive(url, warmup, scenario.concurrency, scenario.stream))
        try:
            callgrind_control("-i", "on", str(pid))
            failed = asyncio.run(
                drive(url, scenario.requests, scenario.concurrency, scenario.stream)
            )
            callgrind_control("-i", "off", str(pid))
            callgrind_control("-d", str(pid))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            return 0, f"{target}: callgrind_control did not answer ({exc})"
    if failed:
        return 0, f"{target}: {failed} of {scenario.requests} requests failed"
    files = sorted(workdir.glob(f"{out.name}.{pid}*"))
    instructions = total_instructions(files)
    if instructions == 0:
        return 0, f"{target}: callgrind wrote no count ({len(files)} files)"
    return instructions // scenario.requests, ""


def report(counts: dict[str, dict[str, tuple[int, str]]], scenarios: Sequence[Scenario]) -> str:
    lines = [
        "| scenario | requests | floor, instructions/req | sidecar, instructions/req | ratio |",
        "|---|---|---|---|---|",
    ]
    for sc in scenarios:
        floor, floor_problem = counts[sc.key]["floor"]
        sidecar, sidecar_problem = counts[sc.key]["sidecar"]
        ratio = f"{sidecar / floor:.2f}x" if floor and sidecar else "-"
        cells = [
            sc.name,
            f"{sc.requests:,}",
            f"{floor:,}" if floor else floor_problem,
            f"{sidecar:,}" if sidecar else sidecar_problem,
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "stream1" in counts and "stream20" in counts:
        per_chunk = []
        for target in ("floor", "sidecar"):
            one, many = counts["stream1"][target][0], counts["stream20"][target][0]
            per_chunk.append(f"{target} {(many - one) // 19:,}" if one and many else f"{target} -")
        lines += ["", "Each further content chunk (the two stream rows apart, / 19): "]
        lines[-1] += ", ".join(per_chunk) + " instructions."
    return "\n".join(lines)


def measure(
    scenarios: Sequence[Scenario], cpu: int | None, keep: Path | None = None
) -> dict[str, dict[str, tuple[int, str]]]:
    """Each scenario's count for the floor and the sidecar, one server at a time; with
    ``keep``, each run's folder (its callgrind files, config and logs) stays there."""
    counts: dict[str, dict[str, tuple[int, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenhub-instructions-") as tmp:
        base = Path(tmp) if keep is None else keep
        for sc in scenarios:
            for target in ("floor", "sidecar"):
                print(f"  {sc.name}: {target} under callgrind", flush=True)
                workdir = base / f"{sc.key}-{target}"
                workdir.mkdir(parents=True, exist_ok=keep is not None)
                counts.setdefault(sc.key, {})[target] = count(sc, target, workdir, cpu)
    return counts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="instructions per request under callgrind")
    parser.add_argument("--quick", action="store_true", help="a tenth of the requests: a smoke run")
    parser.add_argument("--only", default=",".join(sc.key for sc in SCENARIOS))
    parser.add_argument("--out", type=Path, default=run.BENCH / "results" / "instructions.md")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep each run's callgrind files in DIR (read them with callgrind_annotate)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print(VALGRIND_MISSING, file=sys.stderr)
        return 2
    wanted = set(args.only.split(","))
    unknown = wanted - {sc.key for sc in SCENARIOS}
    if unknown:
        known = ", ".join(sc.key for sc in SCENARIOS)
        print(f"no scenario {', '.join(sorted(unknown))}; pick from {known}", file=sys.stderr)
        return 2
    scenarios = [sc for sc in SCENARIOS if sc.key in wanted]
    if args.quick:
        scenarios = [replace(sc, requests=max(20, sc.requests // 10)) for sc in scenarios]
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    cpus = os.sched_getaffinity(0)
    if pinned:
        os.sched_setaffinity(0, {0})
    try:
        counts = measure(scenarios, 1 if pinned else None, args.keep)
    finally:
        os.sched_setaffinity(0, cpus)
    text = f"{run.machine()}; `python bench/instructions.py{' --quick' if args.quick else ''}`\n\n"
    text += report(counts, scenarios)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"\n(written to {args.out})")
    failed = any(problem for by_target in counts.values() for _, problem in by_target.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
