"""The daemon as a real process: SIGHUP reload, SIGTERM drain, sd_notify, socket activation."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import provider
from .fakes import FakeUpstream, ok
from .process import (
    ACTIVATION_WRAPPER,
    START_TIMEOUT_S,
    chat,
    ledger_lines,
    running,
    spawn,
    write_config,
)

pytestmark = pytest.mark.slow


class Notifications:
    """A fake systemd: the unix datagram socket ``$NOTIFY_SOCKET`` points at."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._task = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 4096)
            self.messages.append(data.decode())

    def count(self, line: str) -> int:
        return sum(line in message.splitlines() for message in self.messages)

    async def wait_for(self, line: str, n: int = 1, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.count(line) < n:
                await asyncio.sleep(0.02)

    def close(self) -> None:
        self._task.cancel()
        self._sock.close()


@pytest.fixture
async def notifications(tmp_path: Path) -> AsyncIterator[Notifications]:
    box = Notifications(tmp_path / "notify.sock")
    yield box
    box.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def _first_content(response: aiohttp.ClientResponse) -> list[bytes]:
    """Read SSE lines until the first content delta has arrived."""
    lines = []
    async for line in response.content:
        lines.append(line)
        if b'"content": "' in line or b'"content":"' in line:
            return lines
    raise AssertionError(f"stream ended before any content: {lines!r}")


def _words(lines: list[bytes]) -> str:
    text = ""
    for line in lines:
        if line.startswith(b"data: {"):
            event: dict[str, Any] = json.loads(line[6:])
            for choice in event.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


async def test_sighup_reload_keeps_live_stream_on_old_config_and_refuses_bad_config(
    tmp_path: Path, fake_upstream: Any, notifications: Notifications, http: aiohttp.ClientSession
) -> None:
    slow = ok("one two three four five", chunk_delay_s=0.2)
    alpha: FakeUpstream = await fake_upstream(default=slow)
    beta: FakeUpstream = await fake_upstream()
    providers = [provider("alpha", alpha.url), provider("beta", beta.url)]
    path = write_config(tmp_path / "config.toml", providers[:1], cache={"mode": "off"})
    env = {
        "NOTIFY_SOCKET": str(notifications.path),
        "WATCHDOG_USEC": "200000",
        "ALPHA_KEY": "sk-alpha-key-for-reload-test",
        "BETA_KEY": "sk-beta-key-for-reload-test",
    }
    async with running(path, env=env) as daemon:
        await notifications.wait_for("READY=1")
        await notifications.wait_for("WATCHDOG=1", n=2)
        url = f"{daemon.url}/v1/chat/completions"
        async with http.post(url, json=chat(stream=True)) as stream:
            assert stream.headers["X-TokenHub-Provider"] == "alpha"
            seen = await _first_content(stream)
            write_config(tmp_path / "config.toml", providers[1:], cache={"mode": "off"})
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for_event("reloaded")
            async with http.post(url, json=chat("after reload")) as after:
                assert after.status == 200
                assert after.headers["X-TokenHub-Provider"] == "beta"
            seen += [line async for line in stream.content]
        assert _words(seen).split() == ["one", "two", "three", "four", "five"]
        assert seen[-1].strip() == b"" and b"data: [DONE]" in seen[-2]
        assert notifications.count("RELOADING=1") == 1
        await notifications.wait_for("READY=1", n=2)

        (tmp_path / "config.toml").write_text("[routing]\nmax_providers = 7\n")
        daemon.signal(signal.SIGHUP)
        failed = await daemon.wait_for_event("reload failed; keeping the running config")
        assert "routing.max_providers" in str(failed["problems"])
        async with http.post(url, json=chat("after a bad reload")) as still:
            assert still.status == 200
            assert still.headers["X-TokenHub-Provider"] == "beta"
        assert daemon.proc.returncode is None
    assert len(alpha.requests) == 1 and len(beta.requests) == 2


async def test_sigterm_drains_in_flight_requests_then_exits_zero_with_the_ledger_written(
    tmp_path: Path, fake_upstream: Any, notifications: Notifications, http: aiohttp.ClientSession
) -> None:
    fake: FakeUpstream = await fake_upstream()
    fake.script(ok("a b c d e", chunk_delay_s=0.25), ok("slow answer", delay_s=1.0))
    path = write_config(
        tmp_path / "config.toml",
        [provider("alpha", fake.url)],
        server={"shutdown_timeout_s": 10},
        cache={"mode": "off"},
    )
    env = {"NOTIFY_SOCKET": str(notifications.path), "ALPHA_KEY": "sk-alpha-key-drain-test"}
    async with running(path, env=env) as daemon:
        url = f"{daemon.url}/v1/chat/completions"
        stream = await http.post(url, json=chat(stream=True), headers={"X-Request-Id": "drain-s"})
        seen = await _first_content(stream)
        plain = asyncio.ensure_future(
            http.post(url, json=chat("slow"), headers={"X-Request-Id": "drain-p"})
        )
        async with asyncio.timeout(5):
            while len(fake.requests) < 2:
                await asyncio.sleep(0.02)
        daemon.signal(signal.SIGTERM)
        await notifications.wait_for("STOPPING=1")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(url, json=chat("too late")):
                pass
        seen += [line async for line in stream.content]
        stream.release()
        answer = await plain
        assert answer.status == 200
        assert (await answer.json())["choices"][0]["message"]["content"] == "slow answer"
        assert _words(seen).split() == ["a", "b", "c", "d", "e"]
        assert await daemon.wait() == 0
    assert "stopped" in daemon.events()
    ids = sorted(line["request_id"] for line in ledger_lines(tmp_path / "ledger.jsonl"))
    assert ids == ["drain-p", "drain-s"]


async def test_socket_activation_serves_on_the_inherited_listening_socket(
    tmp_path: Path, fake_upstream: Any, notifications: Notifications, http: aiohttp.ClientSession
) -> None:
    fake: FakeUpstream = await fake_upstream()
    path = write_config(tmp_path / "config.toml", [provider("alpha", fake.url)])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    wrapper = f"import os; os.dup2({fd}, 3); os.close({fd}); " if fd != 3 else ""
    env = {"LISTEN_FDS": "1", "NOTIFY_SOCKET": str(notifications.path), "ALPHA_KEY": "sk-a-key-x"}
    argv = ["-c", wrapper + ACTIVATION_WRAPPER, "serve", "-c", str(path)]
    try:
        async with running(path, env=env, argv=argv, pass_fds=(fd,)) as daemon:
            listener.close()  # only the child holds the socket now
            assert daemon.port == port
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
                assert r.headers["X-TokenHub-Provider"] == "alpha"
            await notifications.wait_for("READY=1")
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait() == 0
            await notifications.wait_for("STOPPING=1")
    finally:
        listener.close()
    assert len(fake.requests) == 1
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


@pytest.mark.slow
async def test_serves_on_a_unix_socket_readable_by_owner_and_group(tmp_path, fake_upstream):
    fake = await fake_upstream()
    sock = tmp_path / "sidecar.sock"
    config_path = write_config(
        tmp_path / "config.toml",
        [provider("alpha", fake.url)],
        server={"listen": f"unix:{sock}", "allowed_hosts": ["localhost"]},
    )
    async with running(config_path, env={"ALPHA_KEY": "sk-alpha-key-unix-0000"}) as daemon:
        assert daemon.address == f"unix:{sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post("http://localhost/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
                assert r.headers["X-TokenHub-Provider"] == "alpha"
    assert len(fake.requests) == 1


async def test_requests_go_on_while_nobody_reads_stderr(tmp_path: Path, fake_upstream: Any) -> None:
    """A stalled log collector (a full stderr pipe) must not stop the event loop: log lines
    wait off the loop and all come out once stderr is read again."""
    fake: FakeUpstream = await fake_upstream()
    path = write_config(tmp_path / "config.toml", [provider("alpha", fake.url)])
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # full after about a dozen request lines
    os.set_blocking(read_end, False)
    daemon = await spawn(path, env={"ALPHA_KEY": "sk-alpha-stderr-test"}, stderr=write_end)
    proc = daemon.proc
    os.close(write_end)
    seen = bytearray()

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 65536):
                seen.extend(chunk)

    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while b'"listening"' not in seen:
                drain()
                await asyncio.sleep(0.02)
        address = next(
            json.loads(line)["address"] for line in seen.splitlines() if b'"listening"' in line
        )
        # From here on nobody reads stderr: 200 request lines are far more than the pipe holds,
        # and the reload halfway logs through structlog rather than the request log.
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            for n in range(200):
                if n == 100:
                    proc.send_signal(signal.SIGHUP)
                async with session.post(
                    f"http://{address}/v1/chat/completions",
                    json=chat(),
                    headers={"X-Request-Id": f"quiet-{n}"},
                ) as response:
                    assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            while proc.returncode is None:
                drain()
                await asyncio.sleep(0.02)
        drain()
    finally:
        await daemon.stop()
        os.close(read_end)
    assert proc.returncode == 0
    logged = [json.loads(line) for line in seen.splitlines() if line.startswith(b"{")]
    ids = {line.get("request_id") for line in logged if line.get("event") == "request"}
    assert ids == {f"quiet-{n}" for n in range(200)}
    assert [line["event"] for line in logged if line["event"] in ("reloaded", "stopped")] == [
        "reloaded",
        "stopped",
    ]
