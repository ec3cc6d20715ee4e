"""The skeleton's promises, end to end: the openai package -> the sidecar -> fake upstreams."""

from __future__ import annotations

import time

import aiohttp

from .conftest import TEST_KEY, provider
from .fakes import ok


async def test_chat_non_stream_reaches_upstream_with_stored_key(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    fake.script(ok(content="Hello from alpha"))
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    client = sidecar.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="deepseek-v3.2", messages=[{"role": "user", "content": "Hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from alpha"
    assert raw.headers["X-TokenHub-Provider"] == "alpha"
    assert raw.headers["X-TokenHub-Attempts"] == "1"
    assert raw.headers["X-Request-Id"]
    seen = fake.requests[0]
    assert seen.headers["Authorization"] == f"Bearer {TEST_KEY}-alpha"
    assert seen.json["model"] == "alpha-deepseek"
    assert "sk-client-token-never-forwarded" not in str(dict(seen.headers))


async def test_stream_chunks_arrive_as_the_upstream_sends_them(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    fake.script(ok(content="one two three four", chunk_delay_s=0.3))
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    stream = await sidecar.client().chat.completions.create(
        model="deepseek-v3.2", messages=[{"role": "user", "content": "count"}], stream=True
    )
    arrivals: list[tuple[float, str]] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert "".join(text for _, text in arrivals).split() == ["one", "two", "three", "four"]
    # Unbuffered: the first word arrived well before the last one was even produced upstream.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.6


async def test_only_allow_listed_headers_reach_the_upstream(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    client_headers = {
        "Authorization": "Bearer sk-client-secret-0000000000",
        "Cookie": "session=abc123",
        "Proxy-Authorization": "Basic eHh4",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Host": "attacker.example",
        "Upgrade": "websocket",
        "TE": "trailers",
        "OpenAI-Organization": "org-client",
        "X-Custom": "anything",
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sidecar.base_url}/v1/chat/completions",
            json={"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "Hi"}]},
            headers=client_headers,
        ) as response:
            assert response.status == 200
    seen = fake.requests[0].headers
    for name in client_headers:
        if name != "Authorization":
            assert name not in seen, f"{name} was forwarded upstream"
    assert seen["Authorization"] == f"Bearer {TEST_KEY}-alpha"
    assert "sk-client-secret" not in str(dict(seen))
