"""`make bench`: start the fake upstream, the floor proxy and the sidecar on loopback, drive them,
print one table with ratios to direct (no proxy) and to the floor (a bare aiohttp proxy).

    python bench/run.py [--quick] [--peers] [--rounds N] [--only chat,stream,hold,...]

The load driver runs on CPU 0 and every server on CPU 1 (taskset). Every target of a scenario is
measured in turn, round after round (direct, floor, sidecar, direct, ...), so slow drift on a shared
machine hits them all alike. Processes are started and stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ledger_bench as ledger_tools
import orjson
import peers

from sidecar.usage import ledger_files

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench-model"
UPSTREAM_MODEL = "bench-model-upstream"
WRK_MISSING = "wrk is missing: run `apt-get update && apt-get install -y wrk`, then `make bench`"


@dataclass(frozen=True)
class Plan:
    """Durations and sizes: full by default, short with --quick."""

    seconds: float
    rounds: int
    warmup: bool
    hold_streams: int
    hold_chunks: int
    hold_delay_ms: float
    usage_lines: int

    @classmethod
    def make(cls, quick: bool, rounds: int | None) -> Plan:
        if quick:
            return cls(2, rounds or 1, False, 1000, 30, 100, 100_000)
        return cls(10, rounds or 3, True, 1000, 100, 100, 1_000_000)


@dataclass
class Target:
    """Something to drive: the upstream itself, the floor, the sidecar or a peer."""

    name: str
    base_url: str = ""
    pid: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    problem: str = ""

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@dataclass
class Row:
    scenario: str
    target: str
    kind: str  # rps | stream | hold | idle | usage
    rps: float | None = None
    p50: float | None = None
    p99: float | None = None
    cpu_ms: float | None = None
    rss_mb: float | None = None
    seconds: float | None = None
    note: str = ""
    problem: str = ""
    burst_p99: float | None = None  # stream rows: first token p99 of the start burst
    all_p99: float | None = None  # stream rows: first token p99 over every stream, burst too


# ---------------------------------------------------------------- processes and /proc


def pin(cpu: int | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def children(pid: int) -> list[int]:
    """All descendants of pid (peers may fork workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants, from /proc/PID/stat."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A kB field (VmHWM, VmRSS) of /proc/PID/status summed over pid and its descendants."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


class Procs(contextlib.AbstractContextManager["Procs"]):
    """Servers started for one group of scenarios; all stopped by PID on exit."""

    def __init__(self, workdir: Path, cpu: int | None) -> None:
        self.workdir, self.cpu = workdir, cpu
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            pin(self.cpu, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=self.workdir,
        )
        log.close()
        self.started.append((name, proc))
        return proc.pid

    def wait_ready(self, name: str, pid: int, url: str, timeout_s: float) -> str:
        """'' once url answers, else why not (exited, or silent until the timeout)."""
        proc = next(p for n, p in self.started if p.pid == pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"did not start (exit {proc.returncode}): {self.last_line(name)}"
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status < 500:
                        return ""
            time.sleep(0.1)
        return f"did not start: no answer on {url} in {timeout_s:.0f} s; {self.last_line(name)}"

    def last_line(self, name: str) -> str:
        with contextlib.suppress(OSError):
            lines = (self.workdir / f"{name}.log").read_text(errors="replace").strip()
            return lines.splitlines()[-1][:200] if lines else "(no output)"
        return "(no log)"

    def __exit__(self, *exc: object) -> None:
        for _, proc in reversed(self.started):
            for pid in [*children(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                for pid in [*children(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()


# ---------------------------------------------------------------- the servers


def sidecar_config(workdir: Path, port: int, upstream_port: int, cache: str, fsync: str) -> str:
    fsync_line = "" if fsync == "default" else f'fsync = "{fsync}"\n'
    return f"""[server]
listen = "127.0.0.1:{port}"

[log]
format = "json"
level = "info"

[account]
plan = "enterprise"
rpm = 1000000000

[cache]
mode = "{cache}"

[ledger]
path = "{workdir / "ledger.jsonl"}"
{fsync_line}
[[providers]]
name = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
region = "local"

  [providers.models."{MODEL}"]
  kind = "chat"
  upstream = "{UPSTREAM_MODEL}"
  input_per_mtok = "0.28"
  output_per_mtok = "0.42"

  [providers.models."bench-embed"]
  kind = "embedding"
  input_per_mtok = "0.02"
"""


@dataclass(frozen=True)
class Group:
    """One set of servers: an upstream with a stream shape, the floor, the sidecar, peers."""

    chunks: int = 20
    delay_ms: float = 5
    cache: str = "off"
    fsync: str = "default"
    floor: bool = True
    raw: bool = False
    peers: tuple[str, ...] = ()


def start_group(procs: Procs, group: Group, label: str) -> tuple[Target, list[Target]]:
    """Start the group's servers; (direct target, proxies). A proxy that fails has .problem."""
    direct = start_upstream(procs, f"{label}-upstream", group.chunks, group.delay_ms)
    up_port = direct.port
    proxies = []
    if group.floor:
        proxies.append(start_floor(procs, label, up_port))
    if group.raw:
        proxies.append(start_raw(procs, label, up_port))
    proxies.append(start_sidecar(procs, group, label, up_port))
    for name in group.peers:
        proxies.append(start_peer(procs, name, label, up_port))
    return direct, proxies


def start_script(
    procs: Procs, log_name: str, target: str, script: str, args: Sequence[str], timeout_s: float
) -> Target:
    """One of the bench's own servers (``bench/<script> --port N <args>``) as a target, once it
    answers ``/-/health``; ``.problem`` if it did not start."""
    port = free_port()
    pid = procs.start(log_name, [PY, str(BENCH / script), "--port", str(port), *args])
    started = Target(target, f"http://127.0.0.1:{port}", pid)
    started.problem = procs.wait_ready(log_name, pid, f"{started.base_url}/-/health", timeout_s)
    return started


def start_upstream(procs: Procs, name: str, chunks: int, delay_ms: float) -> Target:
    """The fake upstream, as the "direct" target."""
    args = ["--chunks", str(chunks), "--chunk-delay-ms", str(delay_ms)]
    return start_script(procs, name, "direct", "upstream.py", args, 10)


def start_floor(procs: Procs, label: str, up_port: int) -> Target:
    args = ["--upstream", f"http://127.0.0.1:{up_port}", "--model", UPSTREAM_MODEL]
    return start_script(procs, f"{label}-floor", "floor", "floor.py", args, 15)


def start_raw(procs: Procs, label: str, up_port: int) -> Target:
    """``raw_proxy.py``, no aiohttp at all: how much of the floor's cost is aiohttp's."""
    args = ["--upstream-port", str(up_port)]
    return start_script(procs, f"{label}-raw", "raw (no aiohttp)", "raw_proxy.py", args, 15)


def start_sidecar(procs: Procs, group: Group, label: str, up_port: int) -> Target:
    port = free_port()
    workdir = procs.workdir / f"{label}-sidecar"
    workdir.mkdir(exist_ok=True)
    config = workdir / "config.toml"
    config.write_text(sidecar_config(workdir, port, up_port, group.cache, group.fsync), "utf-8")
    exe = REPO / ".venv" / "bin" / "tokenhub-sidecar"
    argv = [str(exe) if exe.exists() else "tokenhub-sidecar", "serve", "-c", str(config)]
    name = "sidecar" if group.fsync == "default" else f"sidecar fsync={group.fsync}"
    try:
        pid = procs.start(f"{label}-sidecar", argv)
    except OSError as exc:
        return Target(name, problem=f"did not start: {exc}")
    target = Target(name, f"http://127.0.0.1:{port}", pid)
    target.problem = procs.wait_ready(f"{label}-sidecar", pid, f"{target.base_url}/-/health", 20)
    return target


def start_peer(procs: Procs, name: str, label: str, up_port: int) -> Target:
    if not peers.installed(name):
        print(f"  installing {name} into bench/.peers/ ...", flush=True)
        problem = peers.install(name)
        if problem:
            return Target(name, problem=f"install failed: {problem}")
    launch = peers.launch(name, free_port(), up_port, procs.workdir)
    try:
        pid = procs.start(f"{label}-{name}", launch.argv, launch.env)
    except OSError as exc:
        return Target(name, problem=f"did not start: {exc}")
    target = Target(name, launch.base_url, pid, dict(launch.headers))
    url = launch.base_url + launch.health_path
    target.problem = procs.wait_ready(f"{label}-{name}", pid, url, launch.start_timeout_s)
    return target


# ---------------------------------------------------------------- drivers


def chat_body(temperature: float, *, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say twenty words."}],
        "temperature": temperature,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def wrk_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [==[{body.decode()}]==]",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    lines += [f'wrk.headers["{k}"] = [==[{v}]==]' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(text: str) -> dict[str, float]:
    """requests/s, p50/p99 (ms), requests, and failures from `wrk --latency` output."""
    out: dict[str, float] = {"non2xx": 0, "socket_errors": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = float(m.group(1))
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
            out[f"p{pct}"] = float(m.group(1)) * UNITS[m.group(2)]
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non2xx"] = float(m.group(1))
    socket_errors = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
    if m := re.search(socket_errors, text):
        out["socket_errors"] = float(sum(int(g) for g in m.groups()))
    return out


@dataclass(frozen=True)
class Driver:
    cpu: int | None
    workdir: Path


def run_wrk(drv: Driver, target: Target, conns: int, seconds: float, body: bytes) -> Row:
    script = wrk_script(drv.workdir / f"{target.name}.lua", body, target.headers)
    url = f"{target.base_url}/v1/chat/completions"
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]
    cpu_before = cpu_seconds(target.pid)
    done = subprocess.run(pin(drv.cpu, argv), capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(target.pid) - cpu_before
    stats = parse_wrk(done.stdout)
    row = Row("", target.name, "rps", stats.get("rps"), stats.get("p50"), stats.get("p99"))
    if "rps" not in stats:
        row.problem = f"wrk failed: {(done.stderr or done.stdout).strip()[:160]}"
        return row
    requests = stats.get("requests", 0)
    row.cpu_ms = cpu * 1000 / requests if requests else None
    failed = stats["non2xx"] + stats["socket_errors"]
    if failed:
        row.note = f"{failed:.0f} of {requests:.0f} failed (non-2xx or socket errors)"
    return row


def run_streams(drv: Driver, target: Target, conns: int, seconds: float, hold: bool) -> Row:
    argv = [
        PY,
        str(BENCH / "streams.py"),
        "--url",
        f"{target.base_url}/v1/chat/completions",
        "-c",
        str(conns),
        "-d",
        str(seconds),
    ]
    argv += ["--hold"] if hold else []
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    cpu_before = cpu_seconds(target.pid)
    done = subprocess.run(pin(drv.cpu, argv), capture_output=True, text=True, timeout=seconds + 300)
    cpu = cpu_seconds(target.pid) - cpu_before
    row = Row("", target.name, "hold" if hold else "stream")
    try:
        result: dict[str, Any] = orjson.loads(done.stdout)
    except orjson.JSONDecodeError:
        row.problem = f"stream driver failed: {done.stderr.strip()[-160:]}"
        return row
    ok = result["streams"]
    row.rps, row.p50, row.p99 = result["streams_per_s"], result["ttft_ms"]["p50"], None
    row.p99 = result["ttft_ms"]["p99"]
    row.cpu_ms = cpu * 1000 / ok if ok else None
    row.note = f"total p50 {result['total_ms']['p50']:.0f} ms, p99 {result['total_ms']['p99']:.0f}"
    burst = result["start_burst"]
    if burst["streams"]:
        row.burst_p99, row.all_p99 = burst["ttft_ms"]["p99"], result["all_ttft_ms"]["p99"]
    if hold:
        row.rps = None
        row.rss_mb = status_kb(target.pid, "VmHWM") / 1024
        last = result["ttft_ms"]["max"]
        row.note = f"{ok}/{conns} ok, CPU {cpu:.2f} s, last first token at {last:.0f} ms"
    if result["errors"]:
        row.note += f"; {result['errors']} failed: {result['first_error'][:100]}"
    return row


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # wrk | stream | hold
    conns: int
    temperature: float = 1.0
    ref: str = ""  # take the direct/floor rows of this scenario when this one has none


def measure(drv: Driver, plan: Plan, sc: Scenario, target: Target, warm: bool = False) -> Row:
    seconds = 1 if warm else plan.seconds
    if target.problem:
        return Row(sc.name, target.name, "rps", problem=target.problem)
    if sc.kind == "wrk":
        row = run_wrk(drv, target, sc.conns, seconds, chat_body(sc.temperature))
    else:
        row = run_streams(drv, target, sc.conns, seconds, sc.kind == "hold")
    return replace(row, scenario=sc.name)


def median_row(rows: list[Row]) -> Row:
    """One row from several rounds: the median of every number; notes of the last round."""
    good = [r for r in rows if not r.problem] or rows

    def med(attr: str) -> float | None:
        values = [v for r in good if (v := getattr(r, attr)) is not None]
        return statistics.median(values) if values else None

    last = good[-1]
    note = last.note
    burst_p99, all_p99 = med("burst_p99"), med("all_p99")
    if burst_p99 is not None and all_p99 is not None:
        note += f"; start burst p99 {fmt(burst_p99)} ms, all streams p99 {fmt(all_p99)} ms"
    rounds = f" (median of {len(good)})" if len(good) > 1 else ""
    return replace(
        last,
        rps=med("rps"),
        p50=med("p50"),
        p99=med("p99"),
        cpu_ms=med("cpu_ms"),
        rss_mb=med("rss_mb"),
        burst_p99=burst_p99,
        all_p99=all_p99,
        note=(note + rounds).strip(),
    )


def run_scenarios(
    drv: Driver, plan: Plan, scenarios: list[Scenario], targets: list[Target]
) -> list[Row]:
    rows: list[Row] = []
    for sc in scenarios:
        print(f"  {sc.name}: " + ", ".join(t.name for t in targets), flush=True)
        rounds = 1 if sc.kind == "hold" else plan.rounds
        if plan.warmup and sc.kind != "hold":
            for target in targets:
                measure(drv, plan, sc, target, warm=True)
        results: dict[str, list[Row]] = {t.name: [] for t in targets}
        for _ in range(rounds):
            for target in targets:
                results[target.name].append(measure(drv, plan, sc, target))
        rows += [median_row(results[t.name]) for t in targets]
    return rows


def group_rows(
    drv: Driver,
    plan: Plan,
    group: Group,
    label: str,
    scenarios: list[Scenario],
    *,
    idle: bool = False,
) -> list[Row]:
    """The scenarios' rows on servers started for them; with ``idle``, first each server's
    resident memory at rest, before any load."""
    print(f"[{label}] starting servers", flush=True)
    with Procs(drv.workdir, None if drv.cpu is None else 1) as procs:
        direct, proxies = start_group(procs, group, label)
        targets = ([direct] if group.floor else []) + proxies
        for target in targets:
            if target.problem:
                print(f"  {target.name}: {target.problem}", flush=True)
        rows = idle_rows(targets) if idle else []
        return rows + run_scenarios(drv, plan, scenarios, targets)


IDLE = "idle, after start"
IDLE_SETTLE_S = 2.0


def idle_rows(targets: list[Target]) -> list[Row]:
    """VmRSS of each server (and its children) once it answered its health check and sat
    still for ``IDLE_SETTLE_S``: what the process costs a host that sends it nothing."""
    print(f"  {IDLE}: " + ", ".join(t.name for t in targets), flush=True)
    time.sleep(IDLE_SETTLE_S)
    rows = []
    for target in targets:
        row = Row(IDLE, target.name, "idle", problem=target.problem)
        if not target.problem:
            row.rss_mb = status_kb(target.pid, "VmRSS") / 1024
            row.note = "VmRSS at rest, before any request"
        rows.append(row)
    return rows


# ---------------------------------------------------------------- usage over a large ledger


def timed(cpu: int | None, argv: list[str]) -> tuple[int, float, float, float, str]:
    """(exit code, wall s, CPU s, peak RSS MB, last output line) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(pin(cpu, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    last = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, last[0]


def usage_rows(drv: Driver, plan: Plan) -> list[Row]:
    """`usage` over the ledger the daemon would leave: rotated at the default ``rotate_bytes``,
    each rotated file summarized (``ledger_bench.generate``); then again with the summaries
    deleted, and the floor, which parses every line of every file."""
    print(f"[usage] writing a {plan.usage_lines:,}-line ledger as the daemon does", flush=True)
    ledger = drv.workdir / "usage-ledger.jsonl"
    ledger_tools.generate(ledger, plan.usage_lines)
    files = [str(p) for p in ledger_files(ledger)]
    exe = REPO / ".venv" / "bin" / "tokenhub-sidecar"
    name = f"usage, {plan.usage_lines:,} lines"
    usage = [str(exe), "usage", "--ledger", str(ledger), "--by", "model", "--format", "json"]
    runs = {
        "floor": [PY, str(BENCH / "usage_floor.py"), *files],
        "sidecar": usage,
        "sidecar, no summaries": usage,
    }
    server_cpu = None if drv.cpu is None else 1
    rows = []
    for target, argv in runs.items():
        if target == "sidecar, no summaries":
            ledger_tools.drop_summaries(ledger)
        code, wall, cpu, rss, last = timed(server_cpu, argv)
        row = Row(
            name,
            target,
            "usage",
            cpu_ms=cpu * 1000,
            rss_mb=rss,
            seconds=wall,
            note=f"{wall:.2f} s wall, {plan.usage_lines / wall:,.0f} lines/s, {len(files)} files",
        )
        if code != 0:
            row.problem = f"exit {code}: {last[:160]}"
        rows.append(row)
    for file in ledger.parent.glob(ledger.name + "*"):
        file.unlink()
    return rows


def ledger_bench(drv: Driver, quick: bool) -> str:
    script = BENCH / "ledger_bench.py"
    if not script.exists():
        return "bench/ledger_bench.py is not there yet."
    sizes = ["--records", "1000", "--lines", "100000"] if quick else []
    argv = pin(None if drv.cpu is None else 1, [PY, str(script), *sizes, "--dir", str(drv.workdir)])
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120 if quick else 600, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return "bench/ledger_bench.py did not finish in time."
    text = (done.stdout + ("" if done.returncode == 0 else done.stderr)).strip()
    return text if done.returncode == 0 else f"exit {done.returncode}:\n{text}"


# ---------------------------------------------------------------- the table


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def versus(row: Row, ref: Row | None) -> str:
    """The row against a reference row: throughput as a ratio, latency as added ms."""
    if ref is None or ref is row or ref.problem or row.problem:
        return "-"
    parts = []
    if row.kind in ("rps", "stream") and row.rps and ref.rps:
        parts.append(f"{row.rps / ref.rps:.2f}x/s")
    if row.kind in ("rps", "stream") and row.p50 is not None and ref.p50 is not None:
        parts.append(f"{row.p50 - ref.p50:+.2f} ms")
    if row.kind in ("hold", "idle") and row.rss_mb and ref.rss_mb:
        parts.append(f"{row.rss_mb / ref.rss_mb:.1f}x RSS")
    if row.kind == "usage" and row.seconds and ref.seconds:
        parts.append(f"{row.seconds / ref.seconds:.1f}x time")
    return ", ".join(parts) or "-"


HEADER = (
    "scenario",
    "target",
    "req/s",
    "p50 ms",
    "p99 ms",
    "CPU ms/req",
    "peak RSS MB",
    "vs direct",
    "vs floor",
    "note",
)


def table(rows: list[Row], refs: dict[str, str]) -> str:
    """One markdown table; refs maps a scenario to the one whose direct/floor rows it uses."""
    by_key = {(r.scenario, r.target): r for r in rows}
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        base = refs.get(r.scenario, r.scenario)
        direct = by_key.get((base, "direct"))
        floor = by_key.get((base, "floor"))
        cells = [
            r.scenario,
            r.target,
            fmt(r.rps),
            fmt(r.p50),
            fmt(r.p99),
            fmt(r.cpu_ms, 3),
            fmt(r.rss_mb, 1),
            versus(r, direct),
            versus(r, floor),
            r.problem or r.note,
        ]
        if r.problem:
            cells[2:9] = ["-"] * 7
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


SCENARIOS = {
    "chat": [Scenario("chat, 1 conn", "wrk", 1), Scenario("chat, 64 conns", "wrk", 64)],
    "stream": [Scenario("stream, 16", "stream", 16), Scenario("stream, 256", "stream", 256)],
    "cache": [Scenario("cache hit, 64 conns", "wrk", 64, temperature=0)],
    "ledger": [Scenario("ledger fsync=always, 64 conns", "wrk", 64, ref="chat, 64 conns")],
}


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}, commit {commit}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tokenhub-sidecar benchmarks")
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--peers", action="store_true", help="add LiteLLM and Portkey rows")
    parser.add_argument(
        "--raw", action="store_true", help="add raw_proxy.py (no aiohttp) to chat and stream rows"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario")
    parser.add_argument("--only", default="chat,stream,hold,cache,ledger,usage")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "latest.md")
    return parser.parse_args(argv)


def collect(args: argparse.Namespace, drv: Driver, plan: Plan) -> tuple[list[Row], str]:
    only = set(args.only.split(","))
    peer_names = peers.PEERS if args.peers else ()
    rows: list[Row] = []
    wanted = [s for key in ("chat", "stream") if key in only for s in SCENARIOS[key]]
    if wanted:
        rows += group_rows(drv, plan, Group(raw=args.raw, peers=peer_names), "main", wanted)
    if "hold" in only:
        hold = Group(plan.hold_chunks, plan.hold_delay_ms, peers=peer_names)
        sc = Scenario(f"{plan.hold_streams} open streams", "hold", plan.hold_streams)
        rows += group_rows(drv, plan, hold, "hold", [sc], idle=True)
    if "cache" in only:
        rows += group_rows(drv, plan, Group(cache="deterministic"), "cache", SCENARIOS["cache"])
    extra = ""
    if "ledger" in only:
        group = Group(fsync="always", floor=False)
        rows += group_rows(drv, plan, group, "ledger", SCENARIOS["ledger"])
        print("[ledger] bench/ledger_bench.py", flush=True)
        extra = ledger_bench(drv, args.quick)
    if "usage" in only:
        rows += usage_rows(drv, plan)
    return rows, extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not pinned:
        print("note: fewer than 2 CPUs or no taskset: nothing is pinned", file=sys.stderr)
    plan = Plan.make(args.quick, args.rounds)
    with tempfile.TemporaryDirectory(prefix="tokenhub-bench-") as tmp:
        drv = Driver(0 if pinned else None, Path(tmp))
        rows, extra = collect(args, drv, plan)
    refs = {s.name: s.ref for group in SCENARIOS.values() for s in group if s.ref}
    report = render(args, plan, rows, refs, extra)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n", encoding="utf-8")
    print(f"\n(written to {args.out})")
    return 0


def render(
    args: argparse.Namespace, plan: Plan, rows: list[Row], refs: dict[str, str], extra: str
) -> str:
    mode = "quick (smoke run, not for comparison)" if args.quick else "full"
    command = (
        "python bench/run.py"
        + (" --quick" if args.quick else "")
        + (" --peers" if args.peers else "")
        + (" --raw" if args.raw else "")
    )
    head = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {mode}: "
        f"{plan.seconds:g} s per run, {plan.rounds} round(s); {machine()}.",
        f"Command: `{command}`. Driver on CPU 0, servers on CPU 1.",
        "req/s is streams/s for stream rows; p50/p99 are time to first content token there, over",
        "the steady load: each run's first stream per connection, all started at once, is the",
        "start burst, whose p99 the note gives apart (with the p99 over all streams).",
        "",
        "",
    ]
    tail = ["", "ledger_bench.py:", "```", extra, "```"] if extra else []
    return "\n".join(head) + table(rows, refs) + "\n" + "\n".join(tail)


if __name__ == "__main__":
    sys.exit(main())
