from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.replay import DONE, StreamAssembler, replay_chunks

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
}
TOOL_CALL = {
    "id": "call_abc",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "u": "C"}'},
}


def chat_body(*contents: str | None, usage: bool = True, **message_extra: Any) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None, **message_extra},
            "logprobs": None,
            "finish_reason": "tool_calls" if "tool_calls" in message_extra else "stop",
        }
        for i, text in enumerate(contents)
    ]
    body: dict[str, Any] = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "deepseek-v3.2",
        "choices": choices,
        "system_fingerprint": "fp_fc9f1d7035",
    }
    if usage:
        body["usage"] = USAGE
    return body


def text_body(text: str) -> dict[str, Any]:
    return {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
        "object": "text_completion",
        "created": 1589478378,
        "model": "deepseek-v3.2",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def parse_events(events: list[bytes]) -> list[dict[str, Any]]:
    assert events[-1] == DONE
    parsed = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert b"\n" not in event[:-2]
        parsed.append(orjson.loads(event[len(b"data: ") : -2]))
    return parsed


def reassemble(events: list[bytes]) -> dict[str, Any] | None:
    assembler = StreamAssembler()
    for chunk in parse_events(events):
        assembler.feed(chunk)
    return assembler.complete()


LONG = "The image shows a wooden boardwalk path running through a lush green field. " * 4


@pytest.mark.parametrize(
    "body",
    [
        chat_body(LONG),
        chat_body("short"),
        chat_body(""),
        chat_body("first choice", "second, longer choice " * 5),
        chat_body(None, tool_calls=[TOOL_CALL, {**TOOL_CALL, "id": "call_def"}]),
        chat_body("I can't help with that.", usage=False),
        text_body(LONG),
        text_body(""),
    ],
    ids=["long", "short", "empty", "n2", "tools", "no-usage", "text", "text-empty"],
)
def test_replay_reassembles_into_the_same_response(body: dict[str, Any]) -> None:
    assert reassemble(replay_chunks(body, include_usage=True)) == body
    without_usage = {k: v for k, v in body.items() if k != "usage"}
    assert reassemble(replay_chunks(body, include_usage=False)) == without_usage


def test_replayed_chat_chunks_have_openai_shapes() -> None:
    chunks = parse_events(replay_chunks(chat_body(LONG), include_usage=True, chunk_chars=50))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG" for c in chunks)
    assert all(c["system_fingerprint"] == "fp_fc9f1d7035" for c in chunks)
    first, *middle, finish, usage = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert len(middle) == -(-len(LONG) // 50)
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["usage"] is None for c in [first, *middle, finish])
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert usage["choices"] == [] and usage["usage"] == USAGE


def test_without_include_usage_no_chunk_carries_usage() -> None:
    chunks = parse_events(replay_chunks(chat_body("hi"), include_usage=False))
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)


def test_replayed_text_completion_chunks() -> None:
    chunks = parse_events(replay_chunks(text_body("abc"), include_usage=True))
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert [c["choices"] for c in chunks[:2]] == [
        [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
    ]
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 12


def test_logprobs_survive_the_round_trip() -> None:
    body = chat_body("Hi there")
    token = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    body["choices"][0]["logprobs"] = {
        "content": [token, {**token, "token": " there"}],
        "refusal": None,
    }
    assert reassemble(replay_chunks(body, include_usage=True)) == body


def test_embeddings_cannot_be_replayed_as_a_stream() -> None:
    with pytest.raises(ValueError, match="list"):
        replay_chunks({"object": "list", "data": []}, include_usage=False)


@settings(max_examples=60, deadline=None)
@given(
    contents=st.lists(st.text(max_size=300), min_size=1, max_size=3),
    size=st.integers(min_value=1, max_value=80),
)
def test_any_content_round_trips(contents: list[str], size: int) -> None:
    body = chat_body(*contents)
    assert reassemble(replay_chunks(body, include_usage=True, chunk_chars=size)) == body


# --- the assembler on upstream-like streams ------------------------------------------------------


def upstream_chunks() -> list[dict[str, Any]]:
    base = {
        "id": "c9",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "qwen3-max",
        "service_tier": "default",
        "system_fingerprint": "fp_1",
        "usage": None,
    }

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    return [
        choice({"role": "assistant", "content": "", "refusal": None}),
        choice({"content": "Hel"}),
        {**choice({"content": "lo"}), "obfuscation": "xyz"},
        choice({}, "stop"),
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    ]


def test_assembler_builds_the_non_stream_object() -> None:
    assembler = StreamAssembler()
    for chunk in upstream_chunks():
        assembler.feed(chunk)
    assert assembler.complete() == {
        "id": "c9",
        "object": "chat.completion",
        "created": 7,
        "model": "qwen3-max",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "system_fingerprint": "fp_1",
        "service_tier": "default",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_assembler_joins_streamed_tool_call_arguments() -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": None}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}, None),
        ({}, "tool_calls"),
    ]
    assembler = StreamAssembler()
    for delta, finish in deltas:
        assembler.feed({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    body = assembler.complete()
    assert body is not None
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_an_incomplete_stream_assembles_to_nothing() -> None:
    chunks = upstream_chunks()
    cut = StreamAssembler()
    for chunk in chunks[:3]:
        cut.feed(chunk)
    assert cut.complete() is None
    assert StreamAssembler().complete() is None


def test_a_stream_with_an_error_event_assembles_to_nothing() -> None:
    assembler = StreamAssembler()
    for chunk in upstream_chunks()[:2]:
        assembler.feed(chunk)
    assembler.feed(
        {
            "error": {
                "message": "upstream stream interrupted",
                "type": "upstream_error",
                "code": "stream_interrupted",
            }
        }
    )
    for chunk in upstream_chunks()[2:]:
        assembler.feed(chunk)
    assert assembler.complete() is None


def test_a_multi_choice_stream_needs_every_choice_finished() -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    assembler = StreamAssembler()
    for index, finish in ((0, None), (1, None), (0, "stop")):
        assembler.feed(
            {
                **base,
                "choices": [{"index": index, "delta": {"content": "x"}, "finish_reason": finish}],
            }
        )
    assert assembler.complete() is None
    assembler.feed({**base, "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]})
    body = assembler.complete()
    assert body is not None
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]


# --- the official SDK reads the replay ------------------------------------------------------------


async def serve_events(aiohttp_server: ServerFactory, events: list[bytes]) -> str:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_post("/v1/completions", handler)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/v1"


async def test_the_openai_sdk_reads_a_replayed_chat_stream(aiohttp_server: ServerFactory) -> None:
    body = chat_body(LONG)
    base_url = await serve_events(aiohttp_server, replay_chunks(body, include_usage=True))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="deepseek-v3.2",
            messages=[{"role": "user", "content": "describe"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        content, finish, usage = [], None, None
        async for chunk in stream:
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
    assert "".join(content) == LONG
    assert finish == "stop"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (19, 10, 29)


async def test_the_openai_sdk_reads_a_replayed_tool_call_stream(
    aiohttp_server: ServerFactory,
) -> None:
    body = chat_body(None, tool_calls=[TOOL_CALL])
    base_url = await serve_events(aiohttp_server, replay_chunks(body, include_usage=False))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        async with client.chat.completions.stream(
            model="deepseek-v3.2", messages=[{"role": "user", "content": "weather?"}]
        ) as stream:
            final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].id == "call_abc"
    assert calls[0].function.name == "get_weather"
    assert orjson.loads(calls[0].function.arguments) == {"city": "Oslo", "u": "C"}


async def test_the_openai_sdk_reads_a_replayed_completions_stream(
    aiohttp_server: ServerFactory,
) -> None:
    base_url = await serve_events(
        aiohttp_server, replay_chunks(text_body(LONG), include_usage=True)
    )
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        stream = await client.completions.create(
            model="deepseek-v3.2",
            prompt="p",
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = [], None
        async for chunk in stream:
            text += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
    assert "".join(text) == LONG
    assert usage is not None and usage.total_tokens == 12
