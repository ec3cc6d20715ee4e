"""Cache-hit latency through the sidecar next to a direct call to a zero-latency upstream.

    python bench/cache_bench.py [--requests 2000] [--warmup 200]

Starts ``bench/upstream.py`` and ``tokenhub-sidecar serve`` (cache mode "all") as subprocesses on
free loopback ports, then sends sequential requests over one keep-alive connection:
``direct`` to the upstream, ``sidecar hit`` (every request the same, so all but the first are
hits: each one still writes its ledger line), ``sidecar bypass`` (``X-TokenHub-Cache: no-store``,
for scale: the whole upstream round trip) and ``sidecar hit, stream`` (the SSE replay, read to
``[DONE]``). Prints p50/p99/mean latency per row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODEL = "bench-model"
UPSTREAM_MODEL = "bench-model-upstream"
MESSAGES = [{"role": "user", "content": "Say hello to the cache benchmark."}]


@dataclass(frozen=True)
class Row:
    target: str
    latencies_ms: list[float]
    wrong: int  # answers that were not 200 (or, for hit rows, not X-TokenHub-Cache: hit)

    def cells(self) -> list[str]:
        values = sorted(self.latencies_ms)
        return [
            self.target,
            f"{len(values):,}",
            f"{percentile(values, 50):.3f}",
            f"{percentile(values, 99):.3f}",
            f"{statistics.fmean(values):.3f}",
            f"{1000 / statistics.fmean(values):,.0f}",
            str(self.wrong),
        ]


def percentile(ordered: list[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sidecar_config(workdir: Path, port: int, upstream_port: int) -> str:
    return f"""[server]
listen = "127.0.0.1:{port}"

[log]
format = "json"
level = "warning"

[account]
plan = "enterprise"
rpm = 1000000000

[cache]
mode = "all"

[ledger]
path = "{workdir / "ledger.jsonl"}"

[[providers]]
name = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
region = "local"
api_key_env = "BENCH_KEY"

  [providers.models."{MODEL}"]
  kind = "chat"
  upstream = "{UPSTREAM_MODEL}"
  input_per_mtok = "0.28"
  output_per_mtok = "0.42"
"""


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[tuple[str, str]]:
    """The upstream and the sidecar as subprocesses: (direct base URL, sidecar base URL)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        up_port, port = free_port(), free_port()
        started.append(
            spawn(
                workdir,
                "upstream",
                [
                    sys.executable,
                    str(BENCH / "upstream.py"),
                    "--port",
                    str(up_port),
                    "--chunks",
                    "20",
                    "--chunk-delay-ms",
                    "0",
                ],
            )
        )
        direct = f"http://127.0.0.1:{up_port}"
        wait_ready(started[-1], f"{direct}/-/health")
        config = workdir / "config.toml"
        config.write_text(sidecar_config(workdir, port, up_port), "utf-8")
        exe = REPO / ".venv" / "bin" / "tokenhub-sidecar"
        argv = [str(exe) if exe.exists() else "tokenhub-sidecar", "serve", "-c", str(config)]
        started.append(spawn(workdir, "sidecar", argv))
        sidecar = f"http://127.0.0.1:{port}"
        wait_ready(started[-1], f"{sidecar}/-/ready")
        yield direct, sidecar
    finally:
        for proc in reversed(started):
            stop(proc)


def spawn(workdir: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    with (workdir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**os.environ, "BENCH_KEY": "sk-bench-not-a-real-key"},
        )


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}; see its log")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise SystemExit(f"no answer on {url} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def measure(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    count: int,
    headers: dict[str, str],
    want_hit: bool,
) -> tuple[list[float], int]:
    latencies: list[float] = []
    wrong = 0
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            ok = response.status == 200
            if want_hit:
                ok = ok and response.headers.get("X-TokenHub-Cache") == "hit"
        latencies.append((time.perf_counter() - started) * 1000)
        wrong += not ok
    return latencies, wrong


async def bench(direct: str, sidecar: str, requests: int, warmup: int) -> list[Row]:
    plain = orjson.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 0})
    upstream_body = orjson.dumps({"model": UPSTREAM_MODEL, "messages": MESSAGES})
    stream = orjson.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 0, "stream": True})
    json_headers = {"Content-Type": "application/json"}
    cases = [
        ("direct (upstream)", f"{direct}/v1/chat/completions", upstream_body, {}, False),
        ("sidecar hit", f"{sidecar}/v1/chat/completions", plain, {}, True),
        ("sidecar hit, stream", f"{sidecar}/v1/chat/completions", stream, {}, True),
        (
            "sidecar bypass (no-store)",
            f"{sidecar}/v1/chat/completions",
            plain,
            {"X-TokenHub-Cache": "no-store"},
            False,
        ),
    ]
    rows = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for name, url, body, extra, want_hit in cases:
            headers = {**json_headers, **extra}
            await measure(session, url, body, count=warmup, headers=headers, want_hit=False)
            latencies, wrong = await measure(
                session, url, body, count=requests, headers=headers, want_hit=want_hit
            )
            rows.append(Row(name, latencies, wrong))
    return rows


def table(rows: list[Row]) -> str:
    head = ["target", "requests", "p50 ms", "p99 ms", "mean ms", "req/s", "wrong"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cache-hit latency vs a direct upstream call")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per row")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp, servers(Path(tmp)) as urls:
        try:
            import uvloop

            rows = uvloop.run(bench(*urls, args.requests, args.warmup))
        except ImportError:
            rows = asyncio.run(bench(*urls, args.requests, args.warmup))
    print(
        f"sequential requests over one keep-alive connection; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; 'wrong' = not 200 (hit rows: not a cache hit)"
    )
    print(table(rows))
    return 1 if any(row.wrong for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
