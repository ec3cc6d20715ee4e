"""`tokenhub-sidecar demo` as a newcomer runs it: a real process, answering the openai package."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from sidecar import config
from sidecar.demo import DemoProviders, demo_config
from sidecar.log import RequestLog


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_healthy(base: str, process: subprocess.Popen[str], within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            try:
                async with session.get(f"{base}/-/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the demo did not become healthy in time")


@pytest.mark.slow
async def test_demo_serves_stream_and_non_stream_to_the_openai_package(tmp_path: Path):
    port = free_port()
    ledger = tmp_path / "demo-ledger.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--listen",
            f"127.0.0.1:{port}",
            "--ledger",
            str(ledger),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )
        async with client:
            reply = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
            )
            assert reply.choices[0].message.content
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], stream=True
            )
            pieces = [
                c.choices[0].delta.content
                async for c in stream
                if c.choices and c.choices[0].delta.content
            ]
            assert len(pieces) > 3, "the demo streams token by token"
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "curl" in output and "from openai import OpenAI" in output
    assert "Traceback" not in output
    lines = ledger.read_text().splitlines()
    assert len(lines) == 2


async def test_one_log_line_per_request_with_the_facts(start_sidecar, tmp_path: Path):
    sink = io.BytesIO()
    async with DemoProviders(token_delay_s=0) as providers:
        raw = demo_config(providers, listen="127.0.0.1:0", ledger_path=str(tmp_path / "l.jsonl"))
        settings = config.from_mapping(raw, environ={})
        request_log = RequestLog(format="json", stream=sink)
        sidecar = await start_sidecar(settings, request_log=request_log)
        await sidecar.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
        )
        request_log.close()  # writes what waits (lines go out from a thread of their own)
    [line] = [json.loads(raw_line) for raw_line in sink.getvalue().splitlines()]
    assert line["event"] == "request" and line["level"] == "info"
    assert line["model"] == "gpt-4o-mini" and line["provider"] == "borealis"
    assert line["status"] == 200 and line["attempts"] == 1 and line["cache"] == "bypass"
    assert line["latency_ms"] > 0 and len(line["request_id"]) >= 16


def test_request_log_console_format_and_level():
    sink = io.BytesIO()
    RequestLog(format="console", stream=sink).write({"request_id": "r1", "status": 200})
    assert b"request  request_id=r1 status=200" in sink.getvalue()
    quiet = io.BytesIO()
    RequestLog(format="json", level="warning", stream=quiet).write({"request_id": "r1"})
    assert quiet.getvalue() == b""
