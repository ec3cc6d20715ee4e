"""Tests of the benchmark harness itself: `.venv/bin/pytest bench/test_bench.py -q`."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import instructions
import orjson
import pytest
import raw_proxy
import run
import streams
import upstream
from aiohttp import web

from sidecar.config import load

WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:1234/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.61ms    2.01ms  30.25ms   90.12%
    Req/Sec     8.45k   512.33     9.10k    75.00%
  Latency Distribution
     50%  750.00us
     75%    7.90ms
     90%    9.01ms
     99%    1.20s
  16890 requests in 2.00s, 6.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   8444.61
Transfer/sec:      3.06MB
"""


def test_parse_wrk_reads_rate_percentiles_and_failures() -> None:
    stats = run.parse_wrk(WRK_OUTPUT)
    assert stats["rps"] == pytest.approx(8444.61)
    assert stats["p50"] == pytest.approx(0.75)
    assert stats["p99"] == pytest.approx(1200.0)
    assert stats["requests"] == 16890
    assert stats["non2xx"] == 5
    assert stats["socket_errors"] == 3


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert streams.percentile(values, 50) == 50.0
    assert streams.percentile(values, 99) == 99.0
    assert streams.percentile(values, 100) == 100.0
    assert streams.percentile([], 50) == 0.0


def test_has_content_skips_role_only_and_done() -> None:
    role = upstream.chunk_event("m", {"role": "assistant", "content": ""}).strip()
    token = upstream.chunk_event("m", {"content": "hi"}).strip()
    assert not streams.has_content(role)
    assert streams.has_content(token)
    assert not streams.has_content(b"data: [DONE]")
    assert not streams.has_content(b": keep-alive")


def test_parse_request_handles_length_chunked_and_partial() -> None:
    body = b'{"model":"m"}'
    plain = b"POST /v1/x HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunked = b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunked += b"5\r\n" + body[:5] + b"\r\n" + b"%x\r\n" % (len(body) - 5) + body[5:]
    chunked += b"\r\n0\r\n\r\n"
    parsed = upstream.parse_request(bytearray(plain + chunked))
    assert parsed is not None and parsed[0].body == body and parsed[0].keep_alive
    second = upstream.parse_request(bytearray(chunked))
    assert second is not None and second[0].body == body and not second[0].keep_alive
    assert second[1] == len(chunked)
    assert upstream.parse_request(bytearray(plain[:-3])) is None


@pytest.mark.parametrize("cache,fsync", [("off", "default"), ("deterministic", "always")])
def test_generated_sidecar_config_is_valid(tmp_path: Path, cache: str, fsync: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(run.sidecar_config(tmp_path, 8711, 8712, cache, fsync), encoding="utf-8")
    settings = load(path, environ={})
    assert settings.cache.mode == cache
    assert settings.ledger.fsync == ("interval" if fsync == "default" else fsync)
    assert settings.providers[0].base_url == "http://127.0.0.1:8712/v1"
    assert settings.providers[0].models["bench-model"].upstream == run.UPSTREAM_MODEL


@pytest.fixture
async def fake_upstream() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    answers = upstream.Answers(upstream.StreamShape(chunks=3, delay_s=0.001))
    pacer = upstream.Pacer(loop, answers.shape.delay_s)
    server = await loop.create_server(lambda: upstream.Connection(answers, pacer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    pacer.close()
    await server.wait_closed()


async def test_upstream_stream_shape_and_keep_alive(fake_upstream: str) -> None:
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the second request reuses the connection
            async with session.post(f"{fake_upstream}/v1/chat/completions", json=body) as resp:
                assert resp.headers["Content-Type"] == "text/event-stream"
                text = await resp.read()
        events = [line[6:] for line in text.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        parsed = [orjson.loads(e) for e in events[:-1]]
        assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        contents = [p["choices"][0]["delta"].get("content") for p in parsed[1:4]]
        assert contents == ["w0 ", "w1 ", "w2 "]
        assert parsed[4]["choices"][0]["finish_reason"] == "stop"
        assert parsed[5]["usage"]["completion_tokens"] == 3
        async with session.post(f"{fake_upstream}/v1/embeddings", json={"input": ["a", "b"]}) as r:
            assert len((await r.json())["data"]) == 2


async def test_raw_proxy_pipes_answers_and_streams_unchanged(fake_upstream: str) -> None:
    loop = asyncio.get_running_loop()
    pool: list[raw_proxy.UpstreamConnection] = []
    up_port = int(fake_upstream.rsplit(":", 1)[1])
    server = await loop.create_server(
        lambda: raw_proxy.ClientConnection(up_port, pool), "127.0.0.1", 0
    )
    proxy = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    direct = f"{fake_upstream}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as session:
            for stream in (False, True, False, True):  # keep-alive on both sides
                body: dict[str, Any] = {"model": "bench-model", "messages": [], "stream": stream}
                async with session.post(proxy, json=body) as resp:
                    via_proxy = (resp.status, resp.headers["Content-Type"], await resp.read())
                body["model"] = raw_proxy.UPSTREAM_MODEL.decode()
                async with session.post(direct, json=body) as resp:
                    direct_answer = (resp.status, resp.headers["Content-Type"], await resp.read())
                assert via_proxy == direct_answer
        assert len(pool) == 1  # one upstream connection served all four
    finally:
        for connection in pool:
            if connection.transport is not None:
                connection.transport.close()
        server.close()
        await server.wait_closed()


def test_the_runner_starts_the_raw_proxy_as_a_target(tmp_path: Path) -> None:
    with run.Procs(tmp_path, None) as procs:
        direct = run.start_upstream(procs, "upstream", 2, 1)
        raw = run.start_raw(procs, "t", direct.port)
        assert not direct.problem and not raw.problem, (direct.problem, raw.problem)
        # The stream driver, not wrk: `make test` must pass where wrk is not installed.
        row = run.run_streams(run.Driver(None, tmp_path), raw, 2, 1, hold=False)
    assert row.problem == "" and "failed" not in row.note and row.rps and row.rps > 0, row


async def test_stream_driver_measures_against_upstream(fake_upstream: str) -> None:
    args = streams.parse_args(
        ["--url", f"{fake_upstream}/v1/chat/completions", "-c", "5", "--hold"]
    )
    result = await streams.drive(args)
    assert result["streams"] == 5 and result["errors"] == 0
    assert 0 < result["ttft_ms"]["p50"] <= result["total_ms"]["p50"]


async def test_stream_driver_counts_each_connections_first_stream_as_the_start_burst(
    fake_upstream: str,
) -> None:
    args = streams.parse_args(
        ["--url", f"{fake_upstream}/v1/chat/completions", "-c", "3", "-d", "0.3"]
    )
    result = await streams.drive(args)
    burst = result["start_burst"]
    assert result["errors"] == 0 and burst["streams"] == 3 and result["streams"] > 3
    assert 0 < burst["ttft_ms"]["p50"] and 0 < result["ttft_ms"]["p50"]
    assert result["all_ttft_ms"]["max"] == max(burst["ttft_ms"]["max"], result["ttft_ms"]["max"])


async def test_stream_driver_counts_failures() -> None:
    app = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no"}}, status=503)

    app.router.add_post("/v1/chat/completions", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        args = streams.parse_args(
            ["--url", f"http://127.0.0.1:{port}/v1/chat/completions", "-c", "2", "--hold"]
        )
        result = await streams.drive(args)
    finally:
        await runner.cleanup()
    assert result["streams"] == 0 and result["errors"] == 2
    assert "HTTP 503" in result["first_error"]


def test_table_marks_failures_and_ratios() -> None:
    rows = [
        run.Row("s", "direct", "rps", rps=1000.0, p50=1.0, p99=2.0),
        run.Row("s", "floor", "rps", rps=500.0, p50=1.5, p99=3.0),
        run.Row("s", "sidecar", "rps", problem="did not start (exit 2): boom"),
    ]
    text = run.table(rows, {})
    floor_line = next(line for line in text.splitlines() if "| floor |" in line)
    assert "0.50x/s, +0.50 ms" in floor_line
    sidecar_line = next(line for line in text.splitlines() if "| sidecar |" in line)
    assert "did not start (exit 2): boom" in sidecar_line


def test_idle_rows_read_each_servers_resident_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "IDLE_SETTLE_S", 0.0)
    me = run.Target("sidecar", "http://127.0.0.1:1", os.getpid())
    broken = run.Target("floor", problem="did not start (exit 1): no")
    rows = run.idle_rows([broken, me])
    assert rows[0].problem and rows[0].rss_mb is None
    own_kb = run.status_kb(os.getpid(), "VmRSS")
    assert rows[1].rss_mb is not None and abs(rows[1].rss_mb * 1024 - own_kb) < 16 * 1024
    text = run.table(rows + [run.Row(run.IDLE, "direct", "idle", rss_mb=rows[1].rss_mb / 2)], {})
    assert "2.0x RSS" in next(line for line in text.splitlines() if "| sidecar |" in line)


def test_total_instructions_reads_each_files_totals(tmp_path: Path) -> None:
    dumped = tmp_path / "sidecar.callgrind.42.1"
    dumped.write_text("events: Ir\nsummary: 0\nfl=x\n1 5\ntotals: 961853000\n")
    at_exit = tmp_path / "sidecar.callgrind.42"
    at_exit.write_text("events: Ir\nsummary: 1200\n")
    assert instructions.total_instructions([dumped, at_exit]) == 961_854_200


def test_instructions_says_how_to_get_valgrind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert instructions.main(["--only", "chat1", "--out", str(tmp_path / "out.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [instructions.VALGRIND_MISSING]
    assert not (tmp_path / "out.md").exists()


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_counts_the_floor_and_the_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "instructions.md"
    kept = tmp_path / "runs"
    cpus = os.sched_getaffinity(0)
    argv = ["--quick", "--only", "chat1", "--out", str(out), "--keep", str(kept)]
    assert instructions.main(argv) == 0
    assert os.sched_getaffinity(0) == cpus
    for target in ("floor", "sidecar"):
        files = list((kept / f"chat1-{target}").glob(f"{target}.callgrind.*"))
        assert files and instructions.total_instructions(files) > 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| chat, 1"))
    _, _, requests, floor, sidecar, ratio, _ = (cell.strip() for cell in row.split("|"))
    assert requests == "100"
    floor_count, sidecar_count = int(floor.replace(",", "")), int(sidecar.replace(",", ""))
    # A proxied request in Python is hundreds of thousands of instructions; a broken count is 0.
    assert 100_000 < floor_count < 10_000_000
    assert 100_000 < sidecar_count < 10_000_000
    assert ratio == f"{sidecar_count / floor_count:.2f}x"
