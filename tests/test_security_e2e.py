"""Every security rule end to end: Host, Origin, client tokens, limits, slowloris, header
injection, fixed upstream URLs, no redirects, file modes, and redaction of every output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar import config
from sidecar.app import create_app
from sidecar.config import ConfigError
from sidecar.front import DaemonRunner

from .conftest import TEST_KEY, provider
from .fakes import FakeUpstream, status
from .process import chat, running, write_config

CLIENT_TOKEN = "client-token-0123456789abcdef"


async def _post(url: str, body: Any = None, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body if body is not None else chat(), **kwargs) as r:
            return r.status, await r.json(content_type=None)


def _code(answer: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    status_code, body = answer
    return status_code, body["error"]["code"]


async def _sidecar(
    start_sidecar: Any, make_settings: Any, fake: FakeUpstream, **sections: Any
) -> str:
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)], **sections))
    return f"{sidecar.base_url}/v1/chat/completions"


async def test_a_foreign_host_header_is_refused(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    url = await _sidecar(start_sidecar, make_settings, fake)
    answer = await _post(url, headers={"Host": "evil.example"})
    assert _code(answer) == (403, "host_not_allowed")
    allowed, _ = await _post(url, headers={"Host": "localhost:8700"})
    assert allowed == 200
    assert len(fake.requests) == 1  # only the localhost one


async def test_a_browser_origin_is_refused_unless_configured(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    url = await _sidecar(
        start_sidecar, make_settings, fake, server={"allowed_origins": ["https://app.example"]}
    )
    refused = await _post(url, headers={"Origin": "https://evil.example"})
    assert _code(refused) == (403, "origin_not_allowed")
    allowed, _ = await _post(url, headers={"Origin": "https://app.example"})
    assert allowed == 200
    assert len(fake.requests) == 1


async def test_client_tokens_are_required_checked_and_never_forwarded(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    tokens = {"client_tokens": [CLIENT_TOKEN]}
    url = await _sidecar(start_sidecar, make_settings, fake, server=tokens)
    assert _code(await _post(url)) == (401, "invalid_client_token")
    wrong = {"Authorization": f"Bearer {CLIENT_TOKEN[:-1]}x"}
    missing_answer = await _post(url, headers=wrong)
    assert _code(missing_answer) == (401, "invalid_client_token")
    assert CLIENT_TOKEN[:-1] not in json.dumps(missing_answer[1])
    good, _ = await _post(url, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert good == 200
    assert len(fake.requests) == 1
    seen = fake.requests[0]
    assert seen.headers["Authorization"] == f"Bearer {TEST_KEY}-alpha"
    assert CLIENT_TOKEN not in str(dict(seen.headers)) + seen.body.decode()


async def test_a_body_over_the_limit_is_413(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    url = await _sidecar(start_sidecar, make_settings, fake, server={"max_body_bytes": 2048})
    big = chat("x" * 4096)
    assert _code(await _post(url, big)) == (413, "request_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        yield json.dumps(big).encode()

    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=chunks()) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
    assert fake.requests == []


@pytest.fixture
async def deadline_server(make_settings, fake_upstream) -> AsyncIterator[tuple[int, FakeUpstream]]:
    """The daemon's own runner (with the head deadline) on a free port, in this process."""
    fake = await fake_upstream()
    settings = make_settings([provider("alpha", fake.url)], server={"header_timeout_s": 0.5})
    runner = DaemonRunner(create_app(settings), header_timeout_s=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1], fake
    await runner.cleanup()


async def _dribble(port: int, data: bytes, pause_s: float) -> tuple[int, bytes]:
    """Send ``data`` a byte at a time; how many bytes went out before the server hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(pause_s)
            if reader.at_eof():
                break
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
    return sent, answer


async def test_slowloris_headers_are_cut_off_after_the_header_timeout(deadline_server):
    port, fake = deadline_server
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 200
    sent, answer = await _dribble(port, head, 0.02)
    assert sent < len(head), "the server should have hung up mid-header"
    assert answer == b""
    assert fake.requests == []


async def test_a_slow_body_after_a_prompt_head_is_not_cut(deadline_server):
    port, fake = deadline_server
    body = json.dumps(chat()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    for start in range(0, len(body), len(body) // 4 + 1):  # four pieces over ~1 s (> 0.5 s)
        await asyncio.sleep(0.25)
        writer.write(body[start : start + len(body) // 4 + 1])
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "header",
    [b"X-TokenHub-Affinity: a\rb", b"X-TokenHub-Affinity: a\x00b", b"X-Request-Id: a\rX: b"],
)
async def test_cr_lf_nul_in_headers_are_rejected(deadline_server, header):
    port, fake = deadline_server
    body = json.dumps(chat()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + header
        + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # aiohttp's parser refuses it before any handler runs (a plain-text 400, never forwarded).
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert fake.requests == []


async def test_upstream_urls_come_only_from_the_config(start_sidecar, make_settings, fake_upstream):
    fake, evil = await fake_upstream(), await fake_upstream()
    url = await _sidecar(start_sidecar, make_settings, fake)
    headers = {
        "X-Forwarded-Host": evil.url[7:].split("/")[0],
        "OpenAI-Base-URL": evil.url,
        "X-TokenHub-Base-Url": evil.url,
    }
    code, _ = await _post(url, chat(), headers=headers)
    assert code == 200
    assert len(fake.requests) == 1 and evil.requests == []
    assert fake.requests[0].headers["Authorization"] == f"Bearer {TEST_KEY}-alpha"
    # Body fields that choose an upstream or a key are refused outright (400), never forwarded.
    for field, value in (("api_base", evil.url), ("base_url", evil.url), ("api_key", "sk-x-000")):
        code, answer = await _post(url, chat(**{field: value}))
        assert code == 400
        assert answer["error"]["param"] == field
    assert len(fake.requests) == 1 and evil.requests == []


async def test_upstream_redirects_are_not_followed(start_sidecar, make_settings, fake_upstream):
    fake, evil = await fake_upstream(), await fake_upstream()
    fake.default = status(307, body=b"", headers={"Location": f"{evil.url}/chat/completions"})
    url = await _sidecar(start_sidecar, make_settings, fake)
    code, _ = await _post(url)
    assert code != 200
    assert len(fake.requests) == 1
    assert evil.requests == []


async def test_ledger_and_lock_are_0600_and_open_key_files_are_refused(
    tmp_path, start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    code, _ = await _post(f"{sidecar.base_url}/v1/chat/completions")
    assert code == 200
    ledger = sidecar.settings.ledger.path
    created = [p for p in ledger.parent.iterdir() if p.name.startswith(ledger.name)]
    assert created and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in created), created

    key_file = tmp_path / "alpha.key"
    key_file.write_text("sk-from-a-file-0123456789")
    raw = {"providers": [{**provider("alpha", fake.url), "api_key_env": None}]}
    raw["providers"][0]["api_key_file"] = str(key_file)
    del raw["providers"][0]["api_key_env"]
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.from_mapping(raw, environ={})
    os.chmod(key_file, 0o600)
    settings = config.from_mapping(raw, environ={})
    assert settings.providers[0].api_key is not None


async def test_a_key_echoed_by_an_upstream_never_reaches_the_client_providers_or_ledger(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    key = f"{TEST_KEY}-alpha"
    echo = {"error": {"message": f"Incorrect API key provided: {key}", "type": "x", "code": None}}
    fake.script(status(401, body=echo), status(400, body=echo), status(422, body=echo))
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    outputs = []
    for _ in range(3):
        code, body = await _post(f"{sidecar.base_url}/v1/chat/completions")
        assert code in (400, 422, 502)
        outputs.append(json.dumps(body))
    async with aiohttp.ClientSession() as http:
        for path in ("/-/providers", "/metrics"):
            async with http.get(sidecar.base_url + path) as r:
                outputs.append(await r.text())
    outputs.append(sidecar.settings.ledger.path.read_text())
    assert len(fake.requests) == 3
    for text in outputs:
        assert key not in text and TEST_KEY not in text, text


@pytest.mark.slow
async def test_no_configured_secret_appears_in_any_output_of_a_daemon_run(tmp_path, fake_upstream):
    alpha: FakeUpstream = await fake_upstream()
    beta: FakeUpstream = await fake_upstream()
    keys = {"ALPHA_KEY": "sk-live-alpha-7f3a9c0e1d2b4a6f", "BETA_KEY": "beta-plain-secret-55aa77cc"}
    echo = {"error": {"message": "key {} is wrong", "type": "authentication_error", "code": None}}

    def echoing(code: int, name: str) -> Any:
        body = {"error": {**echo["error"], "message": echo["error"]["message"].format(keys[name])}}
        return status(code, body=body)

    alpha.script(echoing(401, "ALPHA_KEY"), echoing(400, "ALPHA_KEY"), echoing(403, "ALPHA_KEY"))
    beta.script(echoing(401, "BETA_KEY"))
    path = write_config(
        tmp_path / "config.toml",
        [provider("alpha", alpha.url), provider("beta", beta.url)],
        server={"client_tokens": [CLIENT_TOKEN]},
        log={"level": "debug"},
        routing={"sticky": False},
    )
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    seen: list[str] = []
    async with running(path, env=keys) as daemon:
        base = daemon.url
        async with aiohttp.ClientSession(headers=auth) as http:
            for n in range(6):
                async with http.post(f"{base}/v1/chat/completions", json=chat(f"q{n}")) as r:
                    seen.append(await r.text())
            async with http.post(f"{base}/v1/chat/completions", json=chat(stream=True)) as r:
                seen.append(await r.text())
            for bad in (b"{not json", json.dumps({"model": "nope"}).encode()):
                async with http.post(f"{base}/v1/chat/completions", data=bad) as r:
                    seen.append(await r.text())
            async with http.post(
                f"{base}/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer x"}
            ) as r:
                seen.append(await r.text())
            for path_ in ("/-/providers", "/metrics", "/v1/models", "/-/ready"):
                async with http.get(base + path_) as r:
                    seen.append(await r.text())
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_event("reloaded")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    everything = daemon.output() + "".join(seen) + (tmp_path / "ledger.jsonl").read_text()
    assert "request" in daemon.events()
    for secret in [*keys.values(), CLIENT_TOKEN]:
        assert secret not in everything, f"a secret leaked: {secret[:6]}..."
    assert len(alpha.requests) + len(beta.requests) >= 6
