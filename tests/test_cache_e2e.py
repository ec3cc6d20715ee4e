"""The response cache end to end: the openai package (or aiohttp) -> the sidecar -> fake upstreams.

Covers SPEC "Cache consistency": hit/miss/bypass by mode and temperature, the request directives,
the bounds rule, SSE replay of hits, single-flight, what is never cached, the ledger lines of
hits, and the cache metrics.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest

from .conftest import provider
from .fakes import cut_after_content, ok, stall, status

MESSAGES = [{"role": "user", "content": "What is two plus two?"}]
DETERMINISTIC = {"model": "deepseek-v3.2", "messages": MESSAGES, "temperature": 0}
FEE = Decimal("1.03")  # starter plan: 3% service fee


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {**DETERMINISTIC, **overrides}


async def post(
    sidecar: Any, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw POST to /v1/chat/completions: status, headers and the whole body."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sidecar.base_url}/v1/chat/completions", json=body, headers=headers or {}
        ) as response:
            return response.status, dict(response.headers), await response.read()


async def one_sidecar(start_sidecar, make_settings, fake_upstream, **sections: Any):
    fake = await fake_upstream()
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)], **sections))
    return sidecar, fake


def chat_calls(fake: Any) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))


async def upstream_reached(fake: Any, calls: int = 1) -> None:
    """Wait (bounded) until the fake has seen ``calls`` chat requests: ordering, not timing."""

    async def poll() -> None:
        while chat_calls(fake) < calls:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout=10)


async def metrics_text(sidecar: Any) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sidecar.base_url}/metrics") as response:
            assert response.status == 200
            return await response.text()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --- hit, miss and bypass -------------------------------------------------------------------


async def test_deterministic_repeat_is_a_hit_with_the_same_answer(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="Four, exactly"))
    client = sidecar.client()
    first = await client.chat.completions.with_raw_response.create(**DETERMINISTIC)
    second = await client.chat.completions.with_raw_response.create(**DETERMINISTIC)
    assert first.headers["X-TokenHub-Cache"] == "miss"
    assert second.headers["X-TokenHub-Cache"] == "hit"
    assert second.headers["X-TokenHub-Provider"] == "alpha"
    assert second.headers["X-TokenHub-Attempts"] == "0"
    assert second.headers["X-TokenHub-Cost-USD"] == "0"
    assert second.parse().choices[0].message.content == "Four, exactly"
    assert chat_calls(fake) == 1
    paid, hit = sidecar.ledger_lines()
    assert Decimal(first.headers["X-TokenHub-Cost-USD"]) > 0
    assert first.headers["X-TokenHub-Cost-USD"] == paid["total_usd"]
    assert hit["total_usd"] == "0" and hit["saved_usd"] == paid["total_usd"]


@pytest.mark.parametrize(
    ("mode", "extra", "cached"),
    [
        ("deterministic", {"temperature": 0}, True),
        ("deterministic", {"temperature": 0.0, "n": 1}, True),
        ("deterministic", {"temperature": 0.7}, False),
        ("deterministic", {}, False),
        ("deterministic", {"temperature": 0, "n": 2}, False),
        ("all", {"temperature": 0.7}, True),
        ("all", {}, True),
        ("off", {"temperature": 0}, False),
    ],
)
async def test_mode_and_temperature_decide_what_is_cached(
    start_sidecar, make_settings, fake_upstream, mode, extra, cached
):
    sidecar, fake = await one_sidecar(
        start_sidecar, make_settings, fake_upstream, cache={"mode": mode}
    )
    body = {"model": "deepseek-v3.2", "messages": MESSAGES, **extra}
    _, first, _ = await post(sidecar, body)
    _, second, _ = await post(sidecar, body)
    if cached:
        assert (first["X-TokenHub-Cache"], second["X-TokenHub-Cache"]) == ("miss", "hit")
        assert chat_calls(fake) == 1
    else:
        assert (first["X-TokenHub-Cache"], second["X-TokenHub-Cache"]) == ("bypass", "bypass")
        assert chat_calls(fake) == 2


async def test_a_different_body_field_is_a_different_entry(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    await post(sidecar, chat_body())
    _, headers, _ = await post(sidecar, chat_body(max_tokens=5))
    assert headers["X-TokenHub-Cache"] == "miss"
    _, headers, _ = await post(sidecar, chat_body(user="someone-else"))  # on the deny-list
    assert headers["X-TokenHub-Cache"] == "hit"
    assert chat_calls(fake) == 2


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-TokenHub-Cache", "no-cache"), ("Cache-Control", "no-cache")],
)
async def test_no_cache_skips_the_read_but_stores_the_result(
    start_sidecar, make_settings, fake_upstream, header, value
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="old answer"), ok(content="fresh answer"))
    await post(sidecar, chat_body())
    _, headers, body = await post(sidecar, chat_body(), {header: value})
    assert headers["X-TokenHub-Cache"] == "bypass"
    assert b"fresh answer" in body
    _, headers, body = await post(sidecar, chat_body())
    assert headers["X-TokenHub-Cache"] == "hit"
    assert b"fresh answer" in body  # the no-cache request's answer replaced the old entry
    assert chat_calls(fake) == 2


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-TokenHub-Cache", "no-store"), ("Cache-Control", "private, no-store")],
)
async def test_no_store_neither_reads_nor_stores(
    start_sidecar, make_settings, fake_upstream, header, value
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    _, first, _ = await post(sidecar, chat_body(), {header: value})
    _, second, _ = await post(sidecar, chat_body(), {header: value})
    assert (first["X-TokenHub-Cache"], second["X-TokenHub-Cache"]) == ("bypass", "bypass")
    _, third, _ = await post(sidecar, chat_body())
    assert third["X-TokenHub-Cache"] == "miss"  # nothing was stored by the no-store requests
    assert chat_calls(fake) == 3


async def test_unknown_cache_directive_is_a_400(start_sidecar, make_settings, fake_upstream):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    code, _, body = await post(sidecar, chat_body(), {"X-TokenHub-Cache": "sometimes"})
    assert code == 400
    assert b"invalid_request" in body
    assert chat_calls(fake) == 0


async def test_client_tokens_do_not_share_entries(start_sidecar, make_settings, fake_upstream):
    tokens = ["client-token-one-0123456789", "client-token-two-0123456789"]
    sidecar, fake = await one_sidecar(
        start_sidecar, make_settings, fake_upstream, server={"client_tokens": tokens}
    )
    one = sidecar.client(api_key=tokens[0])
    two = sidecar.client(api_key=tokens[1])
    await one.chat.completions.create(**DETERMINISTIC)
    other = await two.chat.completions.with_raw_response.create(**DETERMINISTIC)
    again = await one.chat.completions.with_raw_response.create(**DETERMINISTIC)
    assert other.headers["X-TokenHub-Cache"] == "miss"
    assert again.headers["X-TokenHub-Cache"] == "hit"
    assert chat_calls(fake) == 2


# --- the bounds rule ------------------------------------------------------------------------


async def test_a_narrowing_to_another_region_is_a_miss_and_goes_upstream(
    start_sidecar, make_settings, fake_upstream
):
    eu, us = await fake_upstream(), await fake_upstream()
    eu.default, us.default = ok(content="from eu"), ok(content="from us")
    sidecar = await start_sidecar(
        make_settings(
            [provider("alpha", eu.url, region="eu"), provider("beta", us.url, region="us")],
            routing={"sticky": False},
        )
    )
    _, first, body = await post(sidecar, chat_body())
    assert first["X-TokenHub-Provider"] == "alpha" and b"from eu" in body
    _, narrowed, body = await post(sidecar, chat_body(), {"X-TokenHub-Regions": "us"})
    assert narrowed["X-TokenHub-Cache"] == "miss"
    assert narrowed["X-TokenHub-Provider"] == "beta"
    assert b"from us" in body
    assert (chat_calls(eu), chat_calls(us)) == (1, 1)
    # Each scope now holds its own entry, from a provider inside it.
    _, wide, body = await post(sidecar, chat_body())
    assert (wide["X-TokenHub-Cache"], wide["X-TokenHub-Provider"]) == ("hit", "alpha")
    _, narrow, body = await post(sidecar, chat_body(), {"X-TokenHub-Regions": "us"})
    assert (narrow["X-TokenHub-Cache"], narrow["X-TokenHub-Provider"]) == ("hit", "beta")
    assert (chat_calls(eu), chat_calls(us)) == (1, 1)


async def test_a_pinned_request_never_gets_another_providers_entry(
    start_sidecar, make_settings, fake_upstream
):
    a, b = await fake_upstream(), await fake_upstream()
    sidecar = await start_sidecar(
        make_settings(
            [provider("alpha", a.url), provider("beta", b.url)], routing={"sticky": False}
        )
    )
    await post(sidecar, chat_body())
    _, pinned, _ = await post(sidecar, chat_body(model="beta/deepseek-v3.2"))
    assert (pinned["X-TokenHub-Cache"], pinned["X-TokenHub-Provider"]) == ("miss", "beta")
    assert (chat_calls(a), chat_calls(b)) == (1, 1)


# --- streams ----------------------------------------------------------------------------------


async def test_a_stream_hit_is_replayed_as_sse_that_the_openai_package_reads(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="The answer is four", prompt_tokens=12))
    client = sidecar.client()
    stored = await client.chat.completions.create(**DETERMINISTIC)
    raw = await client.chat.completions.with_raw_response.create(
        **DETERMINISTIC, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["X-TokenHub-Cache"] == "hit"
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    text, usage, finish = "", None, None
    async for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == stored.choices[0].message.content == "The answer is four"
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens == 12
    assert usage.completion_tokens == stored.usage.completion_tokens
    assert chat_calls(fake) == 1


async def test_a_stream_hit_ends_with_done_and_has_usage_only_when_asked(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    await post(sidecar, chat_body())
    _, headers, body = await post(sidecar, chat_body(stream=True))
    assert headers["X-TokenHub-Cache"] == "hit"
    assert "X-TokenHub-Cost-USD" not in headers
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body
    _, _, body = await post(sidecar, chat_body(stream=True, stream_options={"include_usage": True}))
    assert b'"usage":{' in body and body.endswith(b"data: [DONE]\n\n")
    assert chat_calls(fake) == 1


async def test_a_non_stream_request_hits_an_entry_a_stream_produced(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="streamed once, served twice"))
    client = sidecar.client()
    stream = await client.chat.completions.create(**DETERMINISTIC, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    raw = await client.chat.completions.with_raw_response.create(**DETERMINISTIC)
    assert raw.headers["X-TokenHub-Cache"] == "hit"
    completion = raw.parse()
    assert completion.choices[0].message.content == streamed == "streamed once, served twice"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens == 10
    assert chat_calls(fake) == 1
    paid, hit = sidecar.ledger_lines()
    assert (paid["stream"], paid["usage_source"]) == (True, "reported")
    assert hit["outcome"] == "cache_hit" and hit["saved_usd"] == paid["total_usd"] != "0"


async def test_a_text_completion_stream_hit_is_replayed(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="once upon a time"))
    client = sidecar.client()
    args = {"model": "deepseek-v3.2", "prompt": "Tell a story", "temperature": 0}
    stored = await client.completions.create(**args)
    raw = await client.completions.with_raw_response.create(**args, stream=True)
    assert raw.headers["X-TokenHub-Cache"] == "hit"
    text = "".join([c.choices[0].text async for c in raw.parse() if c.choices])
    assert text == stored.choices[0].text == "once upon a time"
    assert sum(1 for r in fake.requests if r.path.endswith("/v1/completions")) == 1


async def test_a_stream_leader_answers_concurrent_non_stream_requests(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="one call for all shapes", chunk_delay_s=0.05, delay_s=0.2))
    leader = asyncio.create_task(post(sidecar, chat_body(stream=True)))
    await upstream_reached(fake)
    followers = [post(sidecar, chat_body()) for _ in range(5)]
    results = await asyncio.wait_for(asyncio.gather(leader, *followers), timeout=20)
    assert chat_calls(fake) == 1
    code, headers, body = results[0]
    assert code == 200 and headers["X-TokenHub-Cache"] == "miss"
    assert body.endswith(b"data: [DONE]\n\n")
    for code, headers, body in results[1:]:
        assert code == 200 and headers["X-TokenHub-Cache"] == "hit"
        assert headers["Content-Type"].startswith("application/json")
        assert b"one call for all shapes" in body


async def test_a_cut_stream_is_not_cached(start_sidecar, make_settings, fake_upstream):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(cut_after_content(2, content="one two three four"))
    _, headers, body = await post(sidecar, chat_body(stream=True))
    assert headers["X-TokenHub-Cache"] == "miss"
    assert not body.endswith(b"data: [DONE]\n\n")
    _, again, _ = await post(sidecar, chat_body())
    assert again["X-TokenHub-Cache"] == "miss"
    assert chat_calls(fake) == 2
    outcomes = [line["outcome"] for line in sidecar.ledger_lines()]
    assert outcomes == ["stream_cut", "ok"]


# --- not cached ---------------------------------------------------------------------------


def tool_call_answer() -> dict[str, Any]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'},
    }
    return {
        "id": "chatcmpl-tool",
        "object": "chat.completion",
        "created": 1735689600,
        "model": "alpha-deepseek",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
    }


@pytest.mark.parametrize(("cache_tool_calls", "second"), [(False, "miss"), (True, "hit")])
async def test_tool_call_answers_are_cached_only_when_configured(
    start_sidecar, make_settings, fake_upstream, cache_tool_calls, second
):
    sidecar, fake = await one_sidecar(
        start_sidecar, make_settings, fake_upstream, cache={"cache_tool_calls": cache_tool_calls}
    )
    fake.default = status(200, body=tool_call_answer())
    client = sidecar.client()
    first = await client.chat.completions.with_raw_response.create(**DETERMINISTIC)
    again = await client.chat.completions.with_raw_response.create(**DETERMINISTIC)
    assert first.headers["X-TokenHub-Cache"] == "miss"
    assert again.headers["X-TokenHub-Cache"] == second
    assert again.parse().choices[0].message.tool_calls[0].function.name == "add"
    assert chat_calls(fake) == (1 if cache_tool_calls else 2)


@pytest.mark.parametrize("failure", [status(500), status(400)])
async def test_errors_are_not_cached(start_sidecar, make_settings, fake_upstream, failure):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(failure)
    code, headers, _ = await post(sidecar, chat_body())
    assert code == failure.code if failure.code == 400 else code == 502
    code, headers, body = await post(sidecar, chat_body())
    assert code == 200
    assert headers["X-TokenHub-Cache"] == "miss"
    assert chat_calls(fake) == 2


async def test_a_response_larger_than_max_bytes_is_not_cached(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(
        start_sidecar, make_settings, fake_upstream, cache={"max_bytes": 256}
    )
    fake.default = ok(content="word " * 200)
    await post(sidecar, chat_body())
    _, headers, _ = await post(sidecar, chat_body())
    assert headers["X-TokenHub-Cache"] == "miss"
    assert chat_calls(fake) == 2


async def test_embeddings_are_cached(start_sidecar, make_settings, fake_upstream):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    client = sidecar.client()
    args = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    first = await client.embeddings.with_raw_response.create(**args)
    again = await client.embeddings.with_raw_response.create(**args)
    assert (first.headers["X-TokenHub-Cache"], again.headers["X-TokenHub-Cache"]) == (
        "miss",
        "hit",
    )
    assert again.parse().data[1].embedding == first.parse().data[1].embedding
    assert sum(1 for r in fake.requests if r.path.endswith("/embeddings")) == 1


# --- single-flight --------------------------------------------------------------------------


async def test_twenty_identical_requests_in_flight_make_one_upstream_call(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="shared by all", delay_s=0.3))
    client = sidecar.client()
    calls = [client.chat.completions.with_raw_response.create(**DETERMINISTIC) for _ in range(20)]
    answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=20)
    assert chat_calls(fake) == 1
    assert {a.parse().choices[0].message.content for a in answers} == {"shared by all"}
    assert sorted(a.headers["X-TokenHub-Cache"] for a in answers) == ["hit"] * 19 + ["miss"]
    lines = sidecar.ledger_lines()
    assert len(lines) == 20
    assert len({line["request_id"] for line in lines}) == 20
    assert sorted(line["outcome"] for line in lines) == ["cache_hit"] * 19 + ["ok"]


async def test_concurrent_streams_share_one_call_and_all_get_the_whole_stream(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="one stream for five", chunk_delay_s=0.05, delay_s=0.2))
    results = await asyncio.wait_for(
        asyncio.gather(*[post(sidecar, chat_body(stream=True)) for _ in range(5)]), timeout=20
    )
    assert chat_calls(fake) == 1
    for code, _, body in results:
        assert code == 200 and body.endswith(b"data: [DONE]\n\n")
    assert sorted(h["X-TokenHub-Cache"] for _, h, _ in results) == ["hit"] * 4 + ["miss"]
    assert len(sidecar.ledger_lines()) == 5


async def test_a_failing_shared_call_releases_every_waiter(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    # The shared call stalls, then fails; the waiters then try on their own.
    fake.script(stall(0.3, then=status(503)))
    client = sidecar.client()
    calls = [client.chat.completions.with_raw_response.create(**DETERMINISTIC) for _ in range(20)]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=20)
    failed = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(failed) + len(answered) == 20, outcomes
    assert [e.status_code for e in failed] == [502]
    assert all(e.response.headers["x-should-retry"] == "false" for e in failed)
    assert {a.parse().choices[0].message.content for a in answered} == {"Hello world"}
    lines = sidecar.ledger_lines()
    assert len(lines) == 20
    assert sorted(line["outcome"] for line in lines).count("upstream_failed") == 1


async def test_a_cancelled_leader_hands_the_call_to_a_waiter(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(stall(5), ok(content="second try", delay_s=0.2))
    leader = asyncio.create_task(post(sidecar, chat_body()))
    await upstream_reached(fake)
    waiters = [asyncio.create_task(post(sidecar, chat_body())) for _ in range(5)]
    await asyncio.sleep(0.2)
    leader.cancel()
    results = await asyncio.wait_for(asyncio.gather(*waiters), timeout=20)
    assert all(code == 200 and b"second try" in body for code, _, body in results)
    assert chat_calls(fake) == 2
    await asyncio.wait_for(fake.client_gone.wait(), timeout=5)
    outcomes = sorted(line["outcome"] for line in sidecar.ledger_lines())
    assert outcomes == ["cache_hit"] * 4 + ["client_cancelled", "ok"]


# --- the ledger -----------------------------------------------------------------------------


async def test_a_hit_is_an_unbilled_cache_hit_line_with_what_it_saved(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="one two three", prompt_tokens=1000, cached_tokens=400))
    await post(sidecar, chat_body())
    await post(sidecar, chat_body(), {"X-Request-Id": "hit-1"})
    paid, hit = sidecar.ledger_lines()
    # 600 fresh input tokens at 0.28, 400 cached at 0.028, 3 output at 0.42 per million; +3%.
    model_fee = (600 * Decimal("0.28") + 400 * Decimal("0.028") + 3 * Decimal("0.42")) / 10**6
    expected = model_fee * FEE
    assert Decimal(paid["total_usd"]) == expected
    assert paid["billable"] is True and paid["outcome"] == "ok"
    assert hit["request_id"] == "hit-1"
    assert hit["outcome"] == "cache_hit"
    assert hit["billable"] is False
    assert hit["saved_usd"] == paid["total_usd"] == "0.0001858738"
    assert Decimal(hit["saved_usd"]) == expected
    assert (hit["model_fee_usd"], hit["service_fee_usd"], hit["total_usd"]) == ("0", "0", "0")
    assert hit["attempts"] == []
    assert (hit["provider"], hit["model"], hit["region"]) == ("alpha", "deepseek-v3.2", "eu")
    assert hit["usage"]["input_tokens"] == 1000 and hit["usage"]["cached_tokens"] == 400
    assert hit["status"] == 200
    assert paid["saved_usd"] == "0"


async def test_a_stream_hit_line_says_stream(start_sidecar, make_settings, fake_upstream):
    sidecar, _ = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    await post(sidecar, chat_body())
    await post(sidecar, chat_body(stream=True))
    paid, hit = sidecar.ledger_lines()
    assert (paid["stream"], hit["stream"]) == (False, True)
    assert hit["outcome"] == "cache_hit" and hit["saved_usd"] == paid["total_usd"]


# --- metrics --------------------------------------------------------------------------------


async def test_cache_results_bytes_and_evictions_show_at_metrics(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, _ = await one_sidecar(
        start_sidecar, make_settings, fake_upstream, cache={"max_bytes": 1500}
    )
    await post(sidecar, chat_body())  # miss, stored
    await post(sidecar, chat_body())  # hit
    await post(sidecar, chat_body(), {"X-TokenHub-Cache": "no-store"})  # bypass
    await post(sidecar, chat_body(temperature=1))  # bypass: not deterministic
    text = await metrics_text(sidecar)
    results = {
        r: metric(text, "tokenhub_cache_requests_total", f'result="{r}"')
        for r in ("hit", "miss", "bypass")
    }
    assert results == {"hit": 1, "miss": 1, "bypass": 2}
    held = metric(text, "tokenhub_cache_bytes")
    assert held == sidecar.runtime.cache.stats.bytes > 0
    assert metric(text, "tokenhub_cache_entries") == 1
    assert metric(text, "tokenhub_cache_evictions_total") == 0
    for n in range(1, 6):  # each entry is several hundred bytes: older ones must go
        await post(sidecar, chat_body(max_tokens=n))
    text = await metrics_text(sidecar)
    stats = sidecar.runtime.cache.stats
    assert stats.evictions > 0
    assert metric(text, "tokenhub_cache_evictions_total") == stats.evictions
    assert metric(text, "tokenhub_cache_entries") == stats.entries
    assert metric(text, "tokenhub_cache_bytes") == stats.bytes <= 1500
    assert metric(text, "tokenhub_cache_requests_total", 'result="miss"') == 6


async def test_a_stream_leader_whose_client_leaves_hands_the_call_to_the_waiters(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fake = await one_sidecar(start_sidecar, make_settings, fake_upstream)
    fake.script(ok(content="a b c d e f g h", chunk_delay_s=0.1), ok(content="second call"))
    session = aiohttp.ClientSession()
    response = await session.post(
        f"{sidecar.base_url}/v1/chat/completions", json=chat_body(stream=True)
    )
    await response.content.readline()  # the stream is committed: content is flowing
    waiters = [asyncio.create_task(post(sidecar, chat_body())) for _ in range(5)]
    await asyncio.sleep(0.05)
    response.close()
    await session.close()
    results = await asyncio.wait_for(asyncio.gather(*waiters), timeout=20)
    assert all(code == 200 and b"second call" in body for code, _, body in results)
    assert chat_calls(fake) == 2
    outcomes = sorted(line["outcome"] for line in sidecar.ledger_lines())
    assert outcomes == ["cache_hit"] * 4 + ["client_cancelled", "ok"]
