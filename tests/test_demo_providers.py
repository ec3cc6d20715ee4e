"""The demo providers answer in OpenAI's shapes (proven with the openai SDK) and fit the config."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import struct
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from sidecar import config
from sidecar.demo import DEMO_SPECS, DemoProvider, DemoProviders, create_demo_app, demo_config
from sidecar.demo.replies import split_tokens

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "How should I cache LLM responses?"}
]


@pytest.fixture
async def demo() -> AsyncIterator[dict[str, DemoProvider]]:
    """The three demo providers, none failing, no pacing (fast tests)."""
    reliable = [dataclasses.replace(spec, failure_rate=0.0) for spec in DEMO_SPECS]
    async with DemoProviders(token_delay_s=0, specs=reliable) as providers:
        yield {p.name: p for p in providers}


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)


async def chat(url: str, **body: Any) -> Any:
    async with sdk(url) as client:
        return await client.chat.completions.create(
            model=body.pop("model", "deepseek-v3.2"),
            messages=body.pop("messages", QUESTION),
            **body,
        )


async def test_chat_answer_with_consistent_usage(demo: dict[str, DemoProvider]) -> None:
    answer = await chat(demo["aurora"].url, temperature=0)
    content = answer.choices[0].message.content
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.system_fingerprint.startswith("fp_")
    assert "cache LLM responses" in content
    assert answer.choices[0].finish_reason == "stop"
    usage = answer.usage
    assert usage.completion_tokens == len(split_tokens(content))
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details.reasoning_tokens == 0


async def test_temperature_zero_is_deterministic_and_otherwise_varied(
    demo: dict[str, DemoProvider],
) -> None:
    url = demo["borealis"].url
    fixed = {
        (await chat(url, temperature=0, model="gpt-4o-mini")).choices[0].message.content
        for _ in range(3)
    }
    varied = {(await chat(url, model="gpt-4o-mini")).choices[0].message.content for _ in range(6)}
    assert len(fixed) == 1
    assert len(varied) > 1


async def test_a_repeated_prefix_reports_cached_tokens(demo: dict[str, DemoProvider]) -> None:
    url = demo["cirrus"].url
    first = await chat(url, temperature=0)
    turn = [*QUESTION, first.choices[0].message.model_dump(), {"role": "user", "content": "more"}]
    second = await chat(url, temperature=0, messages=turn)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens


async def test_stream_with_usage_matches_the_plain_answer(demo: dict[str, DemoProvider]) -> None:
    url = demo["aurora"].url
    plain = await chat(url, temperature=0, model="qwen3-max")
    async with sdk(url) as client:
        stream = await client.chat.completions.create(
            model="qwen3-max",
            messages=QUESTION,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[0].choices[0].delta.content
    contents = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert "".join(c or "" for c in contents) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(contents) == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


async def test_stream_without_usage_ends_with_done(demo: dict[str, DemoProvider]) -> None:
    body = {
        "model": "deepseek-ai/DeepSeek-V3.2",
        "messages": QUESTION,
        "stream": True,
        "max_tokens": 3,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{demo['borealis'].url}/chat/completions", json=body) as response:
            assert response.content_type == "text/event-stream"
            raw = await response.read()
    events = [line[len(b"data: ") :] for line in raw.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[0]["model"] == "deepseek-ai/DeepSeek-V3.2"
    assert len(chunks) == 1 + 3 + 1


async def test_completions_plain_and_streamed(demo: dict[str, DemoProvider]) -> None:
    async with sdk(demo["aurora"].url) as client:
        plain = await client.completions.create(
            model="deepseek-v3.2", prompt="Write a haiku", max_tokens=4, temperature=0
        )
        stream = await client.completions.create(
            model="deepseek-v3.2",
            prompt="Write a haiku",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 4
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


async def test_embeddings_float_and_base64_agree(demo: dict[str, DemoProvider]) -> None:
    async with sdk(demo["borealis"].url) as client:
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
        )
        decoded = await client.embeddings.create(model="text-embedding-3-small", input="alpha")
        small = await client.embeddings.create(
            model="text-embedding-3-small", input="alpha", dimensions=16, encoding_format="float"
        )
    alpha, beta = floats.data[0].embedding, floats.data[1].embedding
    assert len(alpha) == 1536 and alpha != beta
    assert sum(x * x for x in alpha) == pytest.approx(1.0)
    assert decoded.data[0].embedding == pytest.approx(alpha, abs=1e-6)
    assert len(small.data[0].embedding) == 16
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0


async def test_base64_embedding_is_little_endian_float32(demo: dict[str, DemoProvider]) -> None:
    body = {"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{demo['aurora'].url}/embeddings", json=body) as response:
            packed = (await response.json())["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert len(struct.unpack(f"<{len(raw) // 4}f", raw)) == 1536


async def test_models_list_and_retrieve(demo: dict[str, DemoProvider]) -> None:
    async with sdk(demo["borealis"].url) as client:
        listed = await client.models.list()
        one = await client.models.retrieve("deepseek-ai/DeepSeek-V3.2")
    assert [m.id for m in listed.data] == [
        "deepseek-ai/DeepSeek-V3.2",
        "gpt-4o-mini",
        "text-embedding-3-small",
        "gpt-image-1",
        "sora-2",
    ]
    assert one.owned_by == "borealis" and one.object == "model"


async def test_unknown_model_is_a_404_in_openai_shape(demo: dict[str, DemoProvider]) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await chat(demo["aurora"].url, model="gpt-4o-mini")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await chat(demo["aurora"].url, model="text-embedding-3-small")


async def test_bad_body_is_a_400(demo: dict[str, DemoProvider]) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{demo['aurora'].url}/chat/completions", data=b"{") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_the_flaky_provider_fails_now_and_then(aiohttp_client: Any) -> None:
    flaky = next(spec for spec in DEMO_SPECS if spec.failure_rate > 0)
    assert [s.name for s in DEMO_SPECS if s.failure_rate > 0] == ["cirrus"]
    app: web.Application = create_demo_app(flaky, rng=random.Random(7), token_delay_s=0)
    client = await aiohttp_client(app)
    statuses = []
    for _ in range(60):
        response = await client.post(
            "/v1/chat/completions", json={"model": "deepseek-v3.2", "messages": QUESTION}
        )
        body = await response.json()
        statuses.append(response.status)
        if response.status == 503:
            assert body["error"]["type"] == "server_error"
    assert 1 <= statuses.count(503) <= 20
    assert statuses.count(200) + statuses.count(503) == 60


async def test_providers_stop_on_exit() -> None:
    async with DemoProviders(token_delay_s=0) as providers:
        url = providers[0].url
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"{url}/models")


async def test_demo_config_is_valid_and_gives_routing_choices(
    demo: dict[str, DemoProvider],
) -> None:
    raw = demo_config(list(demo.values()), listen="127.0.0.1:8700", ledger_path="/tmp/l.jsonl")
    settings = config.from_mapping(raw, environ={})
    assert {p.region for p in settings.providers} == {"eu", "us", "sg"}
    assert all(
        p.api_key is None and p.base_url.startswith("http://127.0.0.1:") for p in settings.providers
    )
    serving = {
        model: [p.name for p in settings.providers if model in p.models]
        for model in ("deepseek-v3.2", "qwen3-max", "gpt-4o-mini", "text-embedding-3-small")
    }
    assert [len(names) for names in serving.values()] == [3, 2, 1, 2]
    prices = {p.models["deepseek-v3.2"].input_per_mtok for p in settings.providers}
    assert len(prices) == 3 and all(isinstance(p, Decimal) for p in prices)
    assert settings.providers[0].models["text-embedding-3-small"].kind == "embedding"
    assert settings.aliases == {"tokenhub-chat": ("deepseek-v3.2", "qwen3-max")}
    assert settings.cache.mode == "deterministic"
    assert str(settings.ledger.path) == "/tmp/l.jsonl"
    assert settings.server.listen == "127.0.0.1:8700"
