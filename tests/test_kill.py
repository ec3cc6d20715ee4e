"""SIGKILL mid-load: every answer a client received has its one ledger line; the lock holds."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import provider
from .fakes import FakeUpstream, ok
from .process import ROOT, chat, ledger_lines, running, spawn, write_config

pytestmark = pytest.mark.slow

REQUESTS = 300
KILL_AFTER = 120


async def _one(http: aiohttp.ClientSession, url: str, n: int, done: list[str]) -> None:
    """One request; its id goes to ``done`` only once the whole answer has arrived."""
    request_id = f"kill-{n:04d}"
    stream = n % 3 == 0
    async with http.post(
        url, json=chat(f"question {n}", stream=stream), headers={"X-Request-Id": request_id}
    ) as response:
        body = await response.read()
    if response.status != 200:
        return
    if stream:
        if not body.rstrip().endswith(b"data: [DONE]"):
            return
    else:
        assert json.loads(body)["choices"][0]["message"]["content"]
    done.append(request_id)


async def _load_then_kill(url: str, daemon_kill: Any) -> list[str]:
    done: list[str] = []
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as http:
        tasks = [asyncio.ensure_future(_one(http, url, n, done)) for n in range(REQUESTS)]
        async with asyncio.timeout(30):
            while len(done) < KILL_AFTER:
                await asyncio.sleep(0.005)
        daemon_kill()
        await asyncio.gather(*tasks, return_exceptions=True)
    return list(done)


def _verify(ledger: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "ledger", "verify", "--ledger", str(ledger)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_sigkill_mid_load_keeps_exactly_one_line_per_completed_answer(
    tmp_path: Path, fake_upstream: Any
) -> None:
    fake: FakeUpstream = await fake_upstream(default=ok("one two three", delay_s=0.05))
    path = write_config(
        tmp_path / "config.toml",
        [provider("alpha", fake.url)],
        cache={"mode": "off"},
        account={"rpm": 100000},
    )
    env = {"ALPHA_KEY": "sk-alpha-key-kill-test"}
    ledger = tmp_path / "ledger.jsonl"
    async with running(path, env=env) as daemon:
        url = f"{daemon.url}/v1/chat/completions"
        done = await _load_then_kill(url, lambda: daemon.signal(signal.SIGKILL))
        assert await daemon.wait() == -signal.SIGKILL
    assert KILL_AFTER <= len(done) < REQUESTS, "the kill should land mid-way"

    raw = ledger.read_bytes()
    assert raw.endswith(b"\n")
    lines = ledger_lines(ledger)  # every line parses: none is torn
    ids = [line["request_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a request was recorded twice"
    assert set(done) <= set(ids), f"answers without a line: {sorted(set(done) - set(ids))}"

    async with running(path, env=env) as again:
        async with aiohttp.ClientSession() as http:
            after = f"{again.url}/v1/chat/completions"
            async with http.post(after, json=chat(), headers={"X-Request-Id": "after"}) as r:
                assert r.status == 200
        again.signal(signal.SIGTERM)
        assert await again.wait() == 0
    assert ledger_lines(ledger)[-1]["request_id"] == "after"
    verified = _verify(ledger)
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_second_daemon_on_the_same_ledger_exits_2_with_one_line(
    tmp_path: Path, fake_upstream: Any
) -> None:
    fake: FakeUpstream = await fake_upstream()
    env = {"ALPHA_KEY": "sk-alpha-key-lock-test"}
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    ledger = {"path": str(tmp_path / "shared-ledger.jsonl")}
    first = write_config(first_dir / "config.toml", [provider("alpha", fake.url)], ledger=ledger)
    second = write_config(second_dir / "config.toml", [provider("alpha", fake.url)], ledger=ledger)
    async with running(first, env=env) as daemon:
        intruder = await spawn(second, env=env)
        assert await intruder.wait() == 2
        assert intruder.stdout == b""
        message = bytes(intruder.stderr).decode()
        assert message.count("\n") == 1, message
        assert "shared-ledger.jsonl" in message and "Traceback" not in message
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{daemon.url}/-/ready") as ready:
                assert ready.status == 200
