"""The soak: the real daemon, three misbehaving upstreams, mixed traffic, a reload and a SIGKILL.

``SOAK_SECONDS`` (default 60) is the traffic time; ``SOAK_SEED`` the seed; ``SOAK_REPORT`` a
path to write the figures to as JSON (they are also printed: run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sidecar.ledger import rotated_numbers, rotated_path

from ..process import Daemon, start
from .driver import (
    Driver,
    Result,
    RssSampler,
    connections_to,
    free_port,
    open_fds,
    rss_bytes,
    verify_ledger,
)
from .upstream import ChaosUpstream, Served

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SEED = int(os.environ.get("SOAK_SEED", "20260509"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "32"))
ALLOWED = ("alpha", "beta", "gamma")
FORBIDDEN = "delta"  # excluded by [preferences]: must never see a request
FEE_RATE = Decimal("0.03")
MTOK = Decimal(1_000_000)
# Each provider prices differently, so a line naming the wrong provider shows in its cost.
CHAT_PRICES = {
    "alpha": ("0.28", "0.42", "0.028"),
    "beta": ("0.30", "0.60", "0.03"),
    "gamma": ("0.50", "1.10", "0.05"),
    "delta": ("0.01", "0.01", "0.001"),
}
EMBED_PRICES = {"alpha": "0.02", "beta": "0.03", "gamma": "0.05", "delta": "0.01"}
KILL_GRACE_S = 2.0
FD_SLACK = 6
RSS_GROWTH_BOUND = 30 * 1024 * 1024
# The response cache may hold this much by design. Its resident cost is several times its stored
# bytes (small entries interleaved with short-lived objects fragment the heap: 1 MiB of entries
# settles at about +10 MB of RSS, 4 MiB at about +40 MB), so it is kept small enough to fill
# during warm-up: growth past the bound then means a leak, not a cache filling up.
CACHE_MAX_BYTES = 1024 * 1024
CACHE_MODE = os.environ.get("SOAK_CACHE_MODE", "deterministic")
SIDECAR_REJECTIONS = {400, 401, 403, 404, 413, 429, 503}


def _provider(name: str, url: str) -> str:
    chat_in, chat_out, chat_cached = CHAT_PRICES[name]
    return f"""
[[providers]]
name = "{name}"
base_url = "{url}"
region = "eu"
api_key_env = "{name.upper()}_KEY"
  [providers.models."deepseek-v3.2"]
  upstream = "{name}-deepseek"
  input_per_mtok = "{chat_in}"
  output_per_mtok = "{chat_out}"
  cached_input_per_mtok = "{chat_cached}"
  [providers.models."text-embedding-3-small"]
  kind = "embedding"
  input_per_mtok = "{EMBED_PRICES[name]}"
"""


def write_config(path: Path, port: int, fakes: dict[str, ChaosUpstream], *, ttl_s: int) -> None:
    head = f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_timeout_s = 10
[log]
format = "json"
level = "info"
[account]
plan = "enterprise"
rpm = 1000000
[preferences]
exclude_providers = ["{FORBIDDEN}"]
[routing]
max_providers = 3
connect_timeout_s = 1
first_byte_timeout_s = 1.5
first_token_timeout_s = 1.5
idle_timeout_s = 2
[cache]
mode = "{CACHE_MODE}"
ttl_s = {ttl_s}
max_bytes = {CACHE_MAX_BYTES}
[ledger]
path = "{path.parent / "ledger.jsonl"}"
fsync = "interval"
fsync_interval_ms = 200
rotate_bytes = 1048576
"""
    path.write_text(head + "".join(_provider(n, f.url) for n, f in fakes.items()))


def ledger_records(path: Path) -> list[dict[str, Any]]:
    files = [rotated_path(path, n) for n in rotated_numbers(path)] + [path]
    records = []
    for file in files:
        if file.exists():
            records += [json.loads(line) for line in file.read_text().splitlines() if line]
    return records


def expected_cost(record: dict[str, Any]) -> Decimal:
    usage = record["usage"]
    provider = record["provider"]
    fee: Decimal
    if record["model"] == "text-embedding-3-small":
        fee = usage["input_tokens"] * Decimal(EMBED_PRICES[provider]) / MTOK
    else:
        chat_in, chat_out, chat_cached = (Decimal(p) for p in CHAT_PRICES[provider])
        cached = usage["cached_tokens"]
        fee = (
            (usage["input_tokens"] - cached) * chat_in
            + cached * chat_cached
            + usage["output_tokens"] * chat_out
        ) / MTOK
    return fee + fee * FEE_RATE


def usage_as_ledger(usage: dict[str, Any]) -> tuple[int, int, int]:
    details = usage.get("prompt_tokens_details") or {}
    return (
        usage["prompt_tokens"],
        usage.get("completion_tokens", 0),
        details.get("cached_tokens", 0),
    )


def ledger_usage(record: dict[str, Any]) -> tuple[int, int, int]:
    usage = record["usage"]
    return usage["input_tokens"], usage["output_tokens"], usage["cached_tokens"]


class Soak:
    """The run's state: fakes, the daemon (replaced once), the driver and the readings."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fakes = {name: ChaosUpstream(name, seed=SEED + i) for i, name in enumerate(ALLOWED)}
        self.forbidden = ChaosUpstream(FORBIDDEN, seed=SEED + 9, mix={"ok": 1})
        self.port = free_port()
        self.config = tmp / "config.toml"
        self.ledger = tmp / "ledger.jsonl"
        self.env = {f"{n.upper()}_KEY": f"sk-soak-{n}" for n in (*ALLOWED, FORBIDDEN)}
        self.clock = time.monotonic
        self.figures: dict[str, Any] = {}
        self.kill_window: tuple[float, float] = (0.0, 0.0)
        self.daemon: Daemon | None = None

    def all_fakes(self) -> dict[str, ChaosUpstream]:
        return {**self.fakes, FORBIDDEN: self.forbidden}

    def fake_ports(self) -> set[int]:
        return {f.port for f in self.all_fakes().values()}

    async def start(self) -> None:
        for fake in self.all_fakes().values():
            await fake.start()
        write_config(self.config, self.port, self.all_fakes(), ttl_s=600)
        self.daemon = await start(self.config, env=self.env)

    async def close(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
            (self.tmp / "daemon.log").write_bytes(bytes(self.daemon.stderr))
        for fake in self.all_fakes().values():
            await fake.close()

    async def reload(self) -> None:
        assert self.daemon is not None
        before = len(self.daemon.events())
        write_config(self.config, self.port, self.all_fakes(), ttl_s=300)
        self.daemon.proc.send_signal(signal.SIGHUP)
        await self.daemon.wait_for_event("reloaded", after=before)

    async def kill_and_restart(self) -> None:
        assert self.daemon is not None
        killed_at = self.clock()
        await self.daemon.stop()
        (self.tmp / "daemon-before-kill.log").write_bytes(bytes(self.daemon.stderr))
        self.daemon = await start(self.config, env=self.env)
        self.kill_window = (killed_at, self.clock())
        self.figures["kill_window"] = self.kill_window

    async def refusals(self, deadline: float, rng: random.Random) -> None:
        """Now and then one upstream stops listening for a second (connections refused)."""
        while self.clock() < deadline:
            await asyncio.sleep(rng.uniform(3, 8))
            rng.choice(list(self.fakes.values())).refuse_for(1.0)

    async def idle_reading(self, driver: Driver) -> dict[str, int]:
        """Hold traffic, let pooled upstream connections expire, read fds, sockets and RSS."""
        assert self.daemon is not None
        driver.paused.set()
        await driver.wait_idle()
        await asyncio.sleep(3.0)  # the fakes close idle keep-alive connections after 2 s
        pid = self.daemon.pid
        conns = connections_to(pid, self.fake_ports())
        clients = sum(connections_to(pid, {self.port}, local=True).values())
        reading = {
            # the driver's own keep-alive connections to the daemon are not the daemon's leak
            "fds": open_fds(pid) - clients,
            "client_connections": clients,
            "upstream_established": conns.get("established", 0),
            "upstream_close_wait": conns.get("close_wait", 0),
            "rss": rss_bytes(pid),
        }
        driver.paused.clear()
        return reading


async def _at(soak: Soak, moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - soak.clock()))


async def _scenario(soak: Soak, driver: Driver, t0: float, deadline: float) -> None:
    span = deadline - t0
    await _at(soak, t0 + span * 0.25)
    await soak.reload()
    await _at(soak, t0 + span * 0.4)
    await soak.kill_and_restart()
    await _at(soak, t0 + span * 0.55)
    soak.figures["idle_after_warmup"] = await soak.idle_reading(driver)


@contextlib.contextmanager
def _report(soak: Soak) -> Iterator[None]:
    try:
        yield
    finally:
        text = json.dumps(soak.figures, indent=2, sort_keys=True, default=str)
        print("\nsoak figures:\n" + text)
        if target := os.environ.get("SOAK_REPORT"):
            Path(target).write_text(text + "\n")


@pytest.mark.slow
async def test_soak(tmp_path: Path) -> None:
    soak = Soak(tmp_path)
    with _report(soak):
        try:
            await soak.start()
            driver, records, sampler = await _run(soak)
        finally:
            await soak.close()
        _check(soak, driver, records, sampler)


async def _run(soak: Soak) -> tuple[Driver, list[dict[str, Any]], RssSampler]:
    assert soak.daemon is not None
    driver = Driver(f"http://127.0.0.1:{soak.port}", SEED, concurrency=CONCURRENCY)
    sampler = RssSampler(soak.daemon.pid)
    sampling = asyncio.ensure_future(sampler.run())
    t0 = soak.clock()
    deadline = t0 + SOAK_SECONDS
    chaos = asyncio.ensure_future(soak.refusals(deadline, random.Random(SEED)))
    scenario = asyncio.ensure_future(_scenario(soak, driver, t0, deadline))

    async def follow_restarts() -> None:
        while True:
            if soak.daemon is not None:
                sampler.pid = soak.daemon.pid
            await asyncio.sleep(0.2)

    following = asyncio.ensure_future(follow_restarts())
    try:
        await driver.run_until(deadline, soak.clock)
        await scenario
    finally:
        for task in (chaos, scenario, following):
            task.cancel()
    soak.figures["idle_at_end"] = await _settled_reading(soak, driver)
    sampling.cancel()
    assert soak.daemon is not None
    soak.daemon.signal(signal.SIGTERM)
    code = await soak.daemon.wait()
    assert code == 0, soak.daemon.output()
    records = ledger_records(soak.ledger)
    verified, said = await verify_ledger(soak.ledger)
    assert verified == 0, said
    return driver, records, sampler


async def _settled_reading(soak: Soak, driver: Driver) -> dict[str, int]:
    """The idle reading at the end, retried for a while: fds may take a moment to settle."""
    baseline = soak.figures["idle_after_warmup"]
    reading = await soak.idle_reading(driver)
    for _ in range(5):
        if reading["fds"] <= baseline["fds"] + FD_SLACK:
            break
        reading = await soak.idle_reading(driver)
    return reading


def _check(soak: Soak, driver: Driver, records: list[dict[str, Any]], sampler: RssSampler) -> None:
    results = driver.results
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(record["request_id"], []).append(record)
    served: dict[str, Served] = {}
    for fake in soak.fakes.values():
        served.update(fake.served)
    _figures(soak, results, records, sampler)
    _check_bounds(soak, records)
    _check_lines_belong(results, by_id)
    for result in results:
        lines = by_id.get(result.request_id, [])
        if result.complete:
            _check_complete(result, lines, served)
        elif _in_kill_window(soak, result):
            assert len(lines) <= 1, (result, lines)
        elif result.transport_error:
            raise AssertionError(f"a connection broke outside the SIGKILL: {result}")
        elif result.disconnected:
            assert len(lines) == 1, (result, lines, soak.kill_window)
        else:
            _check_failure(result, lines)
    _check_idle(soak, sampler)


def _in_kill_window(soak: Soak, result: Result) -> bool:
    """In flight at the SIGKILL, or ended just before it: a line written after the client's
    last byte (a hang-up, a failure) may still have been queued in the daemon when it died."""
    killed, restarted = soak.kill_window
    return (
        result.started <= restarted
        and result.ended >= killed - KILL_GRACE_S
        and not result.complete
    )


def _check_bounds(soak: Soak, records: list[dict[str, Any]]) -> None:
    assert soak.forbidden.requests == 0, "the excluded provider received requests"
    for record in records:
        providers = [a["provider"] for a in record["attempts"]]
        assert len(set(providers)) == len(providers) <= 3, record
        assert set(providers) <= set(ALLOWED), record
        assert record["provider"] in ALLOWED, record


def _check_lines_belong(results: list[Result], by_id: dict[str, list[dict[str, Any]]]) -> None:
    sent = {r.request_id for r in results}
    strangers = set(by_id) - sent
    assert not strangers, f"ledger lines for requests never sent: {sorted(strangers)[:5]}"
    doubles = {k: len(v) for k, v in by_id.items() if len(v) > 1}
    assert not doubles, f"requests with more than one ledger line: {doubles}"


def _check_complete(result: Result, lines: list[dict[str, Any]], served: dict[str, Served]) -> None:
    assert len(lines) == 1, (result, lines)
    line = lines[0]
    assert result.usage is not None, result
    origin = served.get(result.answer_id)
    assert origin is not None, f"the client got an answer no upstream sent whole: {result}"
    assert line["provider"] == result.provider == origin.provider, (result, line, origin)
    assert ledger_usage(line) == usage_as_ledger(result.usage), (result, line)
    if result.cache == "hit":
        assert line["outcome"] == "cache_hit" and line["billable"] is False, line
        assert Decimal(line["total_usd"]) == 0, line
        assert Decimal(line["saved_usd"]) == expected_cost(line), line
        return
    assert origin.usage == result.usage, (result, origin)
    assert line["outcome"] == "ok" and line["billable"] is True, (result, line)
    assert Decimal(line["total_usd"]) == expected_cost(line), line
    assert line["attempts"][-1]["provider"] == line["provider"], line


def _check_failure(result: Result, lines: list[dict[str, Any]]) -> None:
    if result.status in SIDECAR_REJECTIONS:
        assert lines == [], (result, lines)
        return
    assert len(lines) == 1, (result, lines)
    line = lines[0]
    assert line["billable"] is False and Decimal(line["total_usd"]) == 0, (result, line)
    assert line["outcome"] in ("upstream_failed", "stream_cut", "upstream_error"), line


def _check_idle(soak: Soak, sampler: RssSampler) -> None:
    start = soak.figures["idle_after_warmup"]
    end = soak.figures["idle_at_end"]
    assert end["fds"] <= start["fds"] + FD_SLACK, (start, end)
    assert end["upstream_established"] <= start["upstream_established"] + 2, (start, end)
    assert end["upstream_close_wait"] == 0, end
    assert end["rss"] <= start["rss"] + RSS_GROWTH_BOUND, (start, end)


def _figures(
    soak: Soak, results: list[Result], records: list[dict[str, Any]], sampler: RssSampler
) -> None:
    outcomes = Counter(r["outcome"] for r in records)
    faults: Counter[str] = Counter()
    for fake in soak.fakes.values():
        faults.update(fake.faults)
    assert soak.daemon is not None
    final = sampler.of(soak.daemon.pid)
    seen = Counter(
        "complete"
        if r.complete
        else "disconnected"
        if r.disconnected
        else "transport_error"
        if r.transport_error
        else f"failed_{r.status}"
        if r.status != 200
        else "stream_failed"
        for r in results
    )
    soak.figures.update(
        {
            "seconds": SOAK_SECONDS,
            "seed": SEED,
            "requests": len(results),
            "client_saw": dict(seen),
            "by_kind": dict(Counter(r.kind for r in results)),
            "ledger_lines": len(records),
            "ledger_outcomes": dict(outcomes),
            "failovers": sum(1 for r in records if len(r["attempts"]) > 1),
            "faults_injected": dict(faults),
            "upstream_requests": {n: f.requests for n, f in soak.all_fakes().items()},
            "rss_final_process_mb": {
                "first": round(final[0] / 2**20, 1) if final else None,
                "peak": round(max(final) / 2**20, 1) if final else None,
                "last": round(final[-1] / 2**20, 1) if final else None,
            },
            "rss_peak_any_mb": round(max((s for _, s in sampler.samples), default=0) / 2**20, 1),
        }
    )
