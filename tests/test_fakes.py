"""The fake upstream's behaviours, proven with aiohttp's client and the official openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from .fakes import (
    FakeUpstream,
    cut_after_content,
    cut_before_content,
    garbage,
    ok,
    refuse,
    refused_url,
    slow_chunks,
    slow_first_token,
    sse,
    stall,
    status,
    usage_in_last_content_chunk,
)

CHAT = {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)


async def read_events(response: aiohttp.ClientResponse) -> list[Any]:
    """SSE data payloads, JSON decoded, "[DONE]" kept."""
    events: list[Any] = []
    async for line in response.content:
        if line.startswith(b"data: "):
            payload = line[len(b"data: ") :].strip()
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


async def read_until_cut(response: aiohttp.ClientResponse) -> list[Any]:
    events: list[Any] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: ") :]))
    return events


async def test_sdk_parses_chat_answer_and_request_is_recorded(fake: FakeUpstream) -> None:
    fake.script(ok("Hi there friend", prompt_tokens=7, cached_tokens=3))
    async with sdk(fake.url) as client:
        answer = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert answer.choices[0].message.content == "Hi there friend"
    assert answer.object == "chat.completion"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 3)
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 3
    [request] = fake.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.json["messages"] == CHAT["messages"]


async def test_sdk_parses_stream_with_usage(fake: FakeUpstream) -> None:
    async with sdk(fake.url) as client:
        stream = await client.chat.completions.create(**STREAM)  # type: ignore[call-overload]
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert "".join(t or "" for t in texts) == "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


async def test_stream_wire_shape_without_usage(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    body = {**CHAT, "stream": True}
    async with http.post(f"{fake.url}/chat/completions", json=body) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = await read_events(response)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": " world"},
        {},
    ]
    assert not any("usage" in e for e in events[:-1])


async def test_sdk_parses_completions_embeddings_and_models(fake: FakeUpstream) -> None:
    async with sdk(fake.url) as client:
        text = await client.completions.create(model="qwen3-max", prompt="Say hi")
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
        )
        packed = await client.embeddings.create(model="text-embedding-3-small", input="a")
        models = await client.models.list()
    assert text.object == "text_completion" and text.choices[0].text == "Hello world"
    assert len(floats.data) == 2
    assert packed.data[0].embedding == floats.data[0].embedding
    assert fake.requests[2].json["encoding_format"] == "base64"
    assert "gpt-4o-mini" in [m.id for m in models.data]


async def test_script_is_consumed_in_order_then_default_repeats(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(status(429, headers={"Retry-After": "2"}), status(503), ok("second"))
    seen = []
    for _ in range(4):
        async with http.post(f"{fake.url}/chat/completions", json=CHAT) as response:
            seen.append(
                (response.status, response.headers.get("Retry-After"), await response.json())
            )
    assert [s[0] for s in seen] == [429, 503, 200, 200]
    assert seen[0][1] == "2"
    assert seen[0][2]["error"]["type"] == "rate_limit_error"
    assert seen[1][2]["error"]["type"] == "server_error"
    assert seen[2][2]["choices"][0]["message"]["content"] == "second"
    assert seen[3][2]["choices"][0]["message"]["content"] == "Hello world"
    assert fake.pending == 0


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
async def test_sdk_maps_scripted_errors(
    fake: FakeUpstream, code: int, error: type[openai.APIStatusError]
) -> None:
    fake.script(status(code))
    async with sdk(fake.url) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert caught.value.status_code == code


async def test_status_with_custom_body_serves_any_shape(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(status(200, body={"object": "response", "id": "resp_1"}), status(502, body=b"oops"))
    async with http.post(f"{fake.url}/responses", json={}) as response:
        assert await response.json() == {"object": "response", "id": "resp_1"}
    async with http.post(f"{fake.url}/responses", json={}) as response:
        assert (response.status, await response.read()) == (502, b"oops")


async def test_refuse_closes_without_response(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(refuse())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.post(f"{fake.url}/chat/completions", json=CHAT)
    assert len(fake.requests) == 1
    assert fake.disconnects == 0


async def test_garbage_is_not_json_nor_sse(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script(garbage(), garbage())
    async with http.post(f"{fake.url}/chat/completions", json=CHAT) as response:
        assert (response.status, response.content_type) == (200, "application/json")
        with pytest.raises(json.JSONDecodeError):
            json.loads(await response.read())
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        assert (response.status, response.content_type) == (200, "text/event-stream")
        assert b"data:" not in await response.read()


async def test_cut_before_content_sends_only_the_role_chunk(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(cut_before_content())
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        events = await read_until_cut(response)
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": ""}]


async def test_cut_after_content_sends_n_chunks(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(cut_after_content(2, content="one two three four"))
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        events = await read_until_cut(response)
    deltas = [e["choices"][0]["delta"].get("content") for e in events]
    assert deltas == ["", "one", " two"]


async def test_cut_on_a_plain_request_truncates_the_body(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(cut_after_content())
    async with http.post(f"{fake.url}/chat/completions", json=CHAT) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_slow_chunks_are_sent_as_they_come(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(slow_chunks(0.05, content="a b c"))
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        await response.content.readuntil(b"\n\n")  # the role chunk
        first = await response.content.readuntil(b"\n\n")
        assert b'"a"' in first
        assert fake.active_streams == 1  # the rest is not written yet: nothing was buffered
        rest = await response.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert fake.active_streams == 0


async def test_slow_first_token_sends_role_chunk_first(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(slow_first_token(0.05))
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        role = await response.content.readuntil(b"\n\n")
        assert b'"role": "assistant"' in role
        assert fake.active_streams == 1
        events = await read_events(response)
    assert events[0]["choices"][0]["delta"] == {"content": "Hello"}


async def test_usage_in_last_content_chunk(fake: FakeUpstream) -> None:
    fake.script(usage_in_last_content_chunk(content="x y"))
    async with sdk(fake.url) as client:
        stream = await client.chat.completions.create(**STREAM)  # type: ignore[call-overload]
        chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices[0].delta.content == " y"
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is not None and last.usage.total_tokens == 12
    assert all(c.choices for c in chunks)


async def test_sse_sends_raw_events(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script(sse({"error": {"message": "overloaded"}}, b": comment\n\n", done=False))
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        assert await response.read() == (
            b'data: {"error": {"message": "overloaded"}}\n\n: comment\n\n'
        )


async def test_stall_notices_the_client_leaving(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(stall(30))
    call = asyncio.ensure_future(http.post(f"{fake.url}/chat/completions", json=CHAT))
    # Leave only once the fake holds the request: a client that gave up before the fake read
    # it (a fixed client timeout on a loaded machine) would leave no handler to notice.
    async with asyncio.timeout(5):
        while not fake.requests:
            await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(fake.client_gone.wait(), 5)
    assert fake.disconnects == 1


async def test_stream_notices_the_client_leaving(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(slow_chunks(0.02, content=" ".join(["word"] * 200)))
    async with http.post(f"{fake.url}/chat/completions", json=STREAM) as response:
        await response.content.readuntil(b"\n\n")
        response.close()
    await asyncio.wait_for(fake.client_gone.wait(), 5)
    assert fake.active_streams == 0


async def test_open_connections_counts_kept_alive_sockets(fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake.url}/models") as response:
            await response.read()
        assert fake.open_connections == 1


async def test_path_script_only_applies_to_that_path(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.script(status(503), path="/models")
    async with http.post(f"{fake.url}/chat/completions", json=CHAT) as response:
        assert response.status == 200
    async with http.get(f"{fake.url}/models") as response:
        assert response.status == 503
    async with http.get(f"{fake.url}/models") as response:
        assert response.status == 200


async def test_refused_url_refuses(http: aiohttp.ClientSession) -> None:
    url = await refused_url()
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.get(f"{url}/models")
