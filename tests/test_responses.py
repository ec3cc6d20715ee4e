"""POST /v1/responses through the sidecar with the openai SDK: routing, failover, usage, ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest

from sidecar import billing
from sidecar.billing import Usage
from sidecar.config import Settings

from .conftest import PRICES, Pair, RunningSidecar, provider
from .fakes import FakeUpstream, Gated, Sse, sse, status

MODELS = {"gpt-4o-mini": {"upstream": "up-mini", **PRICES}}
USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 20},
    "output_tokens": 50,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 150,
}


def response_body(text: str = "Hello there", usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1735689600,
        "model": "up-mini",
        "status": "completed",
        "output": [
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage if usage is not None else USAGE,
    }


def stream_events(words: list[str]) -> list[dict[str, Any]]:
    started = {**response_body(), "status": "in_progress", "output": [], "usage": None}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress"}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {
            "type": "response.content_part.added",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    for word in words:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": word,
                "logprobs": [],
            }
        )
    events.append({"type": "response.completed", "response": response_body("".join(words))})
    return [{**e, "sequence_number": n} for n, e in enumerate(events)]


def expected_total(usage: Usage) -> str:
    spec_prices = {k: Decimal(v) for k, v in PRICES.items()}
    model_fee = (
        (usage.input_tokens - usage.cached_tokens) * spec_prices["input_per_mtok"]
        + usage.cached_tokens * spec_prices["cached_input_per_mtok"]
        + usage.output_tokens * spec_prices["output_per_mtok"]
    ).scaleb(-6)
    return billing.usd(model_fee * Decimal("1.03"))


StartSidecar = Callable[[Settings], Awaitable[RunningSidecar]]


@pytest.fixture
async def two(eu_and_us: Callable[[dict[str, Any]], Awaitable[Pair]]) -> Pair:
    return await eu_and_us(MODELS)


async def test_create_routes_rewrites_model_and_bills_responses_usage(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    alpha.script(status(200, body=response_body()))
    reply = await sidecar.client().responses.create(model="gpt-4o-mini", input="Say hello")
    assert reply.output_text == "Hello there"
    assert len(alpha.requests) == 1 and not beta.requests
    sent = alpha.requests[0]
    assert sent.path == "/v1/responses"
    assert sent.json["model"] == "up-mini" and sent.json["input"] == "Say hello"
    assert sent.headers["Authorization"].endswith("-alpha")
    (line,) = sidecar.ledger_lines()
    assert line["endpoint"] == "/v1/responses" and line["provider"] == "alpha"
    assert line["billable"] is True and line["outcome"] == "ok"
    assert line["usage"]["input_tokens"] == 100 and line["usage"]["cached_tokens"] == 20
    assert line["total_usd"] == expected_total(Usage(100, 50, 20))


async def test_create_fails_over_within_the_region_bound(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    beta.script(status(503))
    client = sidecar.client(default_headers={"X-TokenHub-Regions": "us"})
    with pytest.raises(openai.APIStatusError) as failed:
        await client.responses.create(model="gpt-4o-mini", input="hi")
    assert failed.value.status_code == 502
    assert not alpha.requests, "the region bound kept alpha (eu) out even on failover"
    # Without the narrowing header, a failing alpha hands over to beta.
    alpha.script(status(503))
    beta.script(status(200, body=response_body("from beta")))
    reply = await sidecar.client().responses.create(model="gpt-4o-mini", input="hi")
    assert reply.output_text == "from beta"
    line = sidecar.ledger_lines()[-1]
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta"]
    assert line["provider"] == "beta" and line["billable"] is True


async def test_stream_with_the_sdk_helper_bills_the_completed_event(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    alpha.script(sse(*stream_events(["Hel", "lo"]), done=False))
    deltas: list[str] = []
    async with sidecar.client().responses.stream(model="gpt-4o-mini", input="hi") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert deltas == ["Hel", "lo"]
    assert final.output_text == "Hello"
    assert alpha.requests[0].json["stream"] is True
    assert "stream_options" not in alpha.requests[0].json
    (line,) = sidecar.ledger_lines()
    assert line["stream"] is True and line["outcome"] == "ok"
    assert line["usage_source"] == "reported"
    assert line["total_usd"] == expected_total(Usage(100, 50, 20))


async def test_stream_fails_over_before_content_and_marks_a_cut_after_it(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    events = stream_events(["one ", "two"])
    alpha.script(sse(*events[:4], done=False))  # preamble only, then the body ends
    beta.script(sse(*events, done=False))
    stream = await sidecar.client().responses.create(model="gpt-4o-mini", input="hi", stream=True)
    seen = [event.type async for event in stream]
    assert seen[-1] == "response.completed"
    line = sidecar.ledger_lines()[-1]
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta"]
    assert line["provider"] == "beta" and line["billable"] is True
    # Content, then the upstream stops without response.completed: an error event, no bill.
    alpha.script(sse(*events[:5], done=False))
    stream = await sidecar.client().responses.create(model="gpt-4o-mini", input="hi", stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    line = sidecar.ledger_lines()[-1]
    assert line["outcome"] == "stream_cut" and line["billable"] is False
    assert line["total_usd"] == "0" and line["usage_source"] == "estimated"


async def test_a_stream_reserves_its_worst_case_against_the_budget_cap(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
) -> None:
    alpha = await fake_upstream()
    settings = make_settings(
        [provider("alpha", alpha.url, models=MODELS)], budget={"daily_usd": "0.01"}
    )
    sidecar = await start_sidecar(settings)
    client = sidecar.client()
    with pytest.raises(openai.RateLimitError) as caught:  # 100k output tokens x 0.42/M > 0.01
        await client.responses.create(
            model="gpt-4o-mini", input="hi", stream=True, max_output_tokens=100_000
        )
    assert caught.value.code == "budget_exceeded"
    assert not alpha.requests and not sidecar.ledger_lines()
    alpha.script(sse(*stream_events(["Hel", "lo"]), done=False))
    stream = await client.responses.create(
        model="gpt-4o-mini", input="hi", stream=True, max_output_tokens=1000
    )
    assert [e.type async for e in stream][-1] == "response.completed"
    assert sidecar.runtime.budget.day_spent == Decimal(expected_total(Usage(100, 50, 20)))
    assert sidecar.runtime.budget.reserved == 0


async def test_stream_events_reach_the_client_as_the_upstream_wrote_them(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    """Each event's data is forwarded byte for byte (not re-encoded), under its ``event:`` line."""
    alpha, _, sidecar = two
    events = stream_events(["Hel", "lo"])
    alpha.script(sse(*events, done=False))  # the fake writes json.dumps: spaces, key order kept
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
        async with session.post(f"{sidecar.base_url}/v1/responses", json=body) as resp:
            raw = (await resp.read()).decode()
    blocks = [block.split("\n") for block in raw.split("\n\n") if block]
    assert [lines[0] for lines in blocks] == [f"event: {event['type']}" for event in events]
    assert [lines[1] for lines in blocks] == [f"data: {json.dumps(event)}" for event in events]


async def test_a_stream_event_followed_by_a_keep_alive_is_not_held_for_the_next_read(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    """The upstream sends no more until the client has the first delta: holding it would hang."""
    alpha, _, sidecar = two
    events = stream_events(["Hel", "lo"])
    first = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events[:5])
    rest = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events[5:])
    upstream = Gated(first + b": keep-alive\n\n", rest, done=False)
    alpha.script(upstream)
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
        async with session.post(f"{sidecar.base_url}/v1/responses", json=body) as resp:
            seen = b""
            async with asyncio.timeout(10):
                while b'"Hel"' not in seen:
                    seen += await resp.content.readany()
            upstream.gate.set()
            seen += await resp.read()
    assert seen.count(b"event: response.output_text.delta") == 2
    assert b"event: response.completed" in seen


async def test_a_stream_that_stalls_after_content_is_cut_on_the_relays_idle_clock(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: Callable[[Settings], Awaitable[RunningSidecar]],
) -> None:
    alpha = await fake_upstream()
    settings = make_settings(
        [provider("alpha", alpha.url, "eu", models=MODELS)], routing={"idle_timeout_s": 0.3}
    )
    sidecar = await start_sidecar(settings)
    events = stream_events(["Hel", "lo"])
    first = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events[:5])
    upstream = Gated(first, b"", done=False)  # content, then nothing: the gate is never opened
    alpha.script(upstream)
    stream = await sidecar.client().responses.create(model="gpt-4o-mini", input="hi", stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="interrupted"):
        async with asyncio.timeout(10):
            async for event in stream:
                seen.append(event.type)
    upstream.gate.set()
    assert seen[-1] == "response.output_text.delta"
    line = sidecar.ledger_lines()[-1]
    assert line["outcome"] == "stream_cut" and line["billable"] is False
    assert line["attempts"][-1]["reason"] == "no data between chunks within 0.3s"


@pytest.mark.parametrize("front", ["lean", "aiohttp"])
async def test_a_stream_ends_the_same_way_whichever_front_serves_it(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar], front: str
) -> None:
    """Pushed from the upstream's reads (the lean front) or pulled event by event (aiohttp's
    server, here for the query string): the same events, the same ledger line, the same cuts."""
    alpha, _, sidecar = two
    url = f"{sidecar.base_url}/v1/responses" + ("?via=aiohttp" if front == "aiohttp" else "")
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    events = stream_events(["Hel", "lo"])
    failed = {"type": "response.failed", "response": {**response_body(), "status": "failed"}}
    cases = [
        (events, "ok", None),
        (events[:5], "stream_cut", "stream ended without response.completed"),
        ([*events[:5], failed], "stream_cut", "error event after content"),
    ]
    async with aiohttp.ClientSession() as session:
        for sent, outcome, reason in cases:
            alpha.script(sse(*sent, done=True))  # a [DONE] after the events is skipped
            async with session.post(url, json=body) as resp:
                assert ("Server" not in resp.headers) == (front == "lean")
                raw = (await resp.read()).decode()
            blocks = [block.split("\n") for block in raw.split("\n\n") if block]
            got = [json.loads(lines[1].removeprefix("data: ")) for lines in blocks]
            assert got[: len(sent)] == sent
            line = sidecar.ledger_lines()[-1]
            assert line["outcome"] == outcome
            if reason is None:
                assert len(got) == len(sent) and line["total_usd"] == expected_total(
                    Usage(100, 50, 20)
                )
            else:
                assert got[-1]["type"] == "error" and got[-1]["code"] == "stream_interrupted"
                assert line["attempts"][-1]["reason"] == reason and line["billable"] is False


async def test_a_completed_stream_leaves_its_upstream_connection_pooled(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    """The body's end may follow ``response.completed`` a moment later: the connection is
    pooled all the same, and the next stream reuses it."""
    alpha, _, sidecar = two
    events = stream_events(["Hel", "lo"])
    alpha.script(Sse(events, done=False, end_delay_s=0.2), Sse(events, done=False))
    for _ in range(2):
        stream = await sidecar.client().responses.create(
            model="gpt-4o-mini", input="hi", stream=True
        )
        assert [event.type async for event in stream][-1] == "response.completed"
        await asyncio.sleep(0.3)
    first, second = alpha.requests
    assert first.peer is not None and first.peer == second.peer
