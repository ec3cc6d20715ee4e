from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.cache import (
    KEY_DENY_LIST,
    Decision,
    Directive,
    ResponseCache,
    SingleFlight,
    directive,
)
from sidecar.config import CacheConfig
from sidecar.errors import InvalidRequest
from sidecar.replay import StreamAssembler

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(clock: Callable[[], float] | None = None, **overrides: Any) -> ResponseCache:
    config = CacheConfig(**overrides)
    return ResponseCache(config, clock=clock) if clock else ResponseCache(config)


def chat_answer(content: str | None = "Hello there.", **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": None, **extra}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "deepseek-v3.2",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def put(
    cache: ResponseCache,
    key: str,
    body: dict[str, Any],
    provider: str = "alpha",
    region: str = "eu",
) -> None:
    """Store ``body`` as the handlers do."""
    cache.store(
        key,
        CHAT,
        body,
        provider=provider,
        region=region,
        model="deepseek-v3.2",
        upstream_model="deepseek-chat",
    )


def entry_size(body: dict[str, Any]) -> int:
    """The bytes the cache accounts ``body`` at, read back from a cache of its own."""
    cache = make_cache()
    put(cache, "k", body)
    entry = cache.peek("k", anywhere)
    assert entry is not None
    return entry.size


def anywhere(_provider: str, _model: str) -> bool:
    return True


# --- directives -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("own", "http", "expected"),
    [
        (None, None, "default"),
        ("default", None, "default"),
        ("no-cache", None, "no-cache"),
        (" No-Store ", None, "no-store"),
        (None, "no-cache", "no-cache"),
        (None, "max-age=0", "no-cache"),
        (None, "private, no-store", "no-store"),
        (None, "max-age=60", "default"),
        ("default", "no-store", "no-store"),
        ("no-store", "no-cache", "no-store"),
        ("no-cache", "no-store", "no-store"),
        ("", "", "default"),
    ],
)
def test_directive_takes_the_stronger_header(
    own: str | None, http: str | None, expected: Directive
) -> None:
    assert directive(own, http) == expected


def test_unknown_cache_header_value_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        directive("sometimes", None)
    assert caught.value.status == 400
    assert "X-TokenHub-Cache" in caught.value.message


# --- decide: mode, temperature, n, endpoint, directive ---------------------------------------


@pytest.mark.parametrize(
    ("mode", "endpoint", "body", "lookup"),
    [
        ("deterministic", CHAT, {"model": "m", "temperature": 0}, True),
        ("deterministic", CHAT, {"model": "m", "temperature": 0.0, "stream": True}, True),
        ("deterministic", CHAT, {"model": "m", "temperature": 0, "n": 1}, True),
        ("deterministic", CHAT, {"model": "m", "temperature": 0, "n": 2}, False),
        ("deterministic", CHAT, {"model": "m", "temperature": 0.7}, False),
        ("deterministic", CHAT, {"model": "m"}, False),  # OpenAI's default temperature is 1
        ("deterministic", CHAT, {"model": "m", "temperature": False}, False),
        ("deterministic", "/v1/completions", {"model": "m", "temperature": 0}, True),
        ("deterministic", EMBED, {"model": "e", "input": "x"}, True),
        ("deterministic", "/v1/images/generations", {"model": "i", "temperature": 0}, False),
        ("all", CHAT, {"model": "m", "temperature": 1.2, "n": 3}, True),
        ("all", CHAT, {"model": "m", "stream": True}, True),
        ("all", "/v1/responses", {"model": "m"}, False),
        ("off", CHAT, {"model": "m", "temperature": 0}, False),
        ("off", EMBED, {"model": "e", "input": "x"}, False),
    ],
)
def test_decide_by_mode_and_temperature(
    mode: str, endpoint: str, body: dict[str, Any], lookup: bool
) -> None:
    decision = make_cache(mode=mode).decide(endpoint, body, "default")
    assert decision.lookup is lookup
    assert decision.store is lookup
    assert decision.reason


def test_no_cache_skips_the_read_but_stores_and_no_store_does_neither() -> None:
    cache = make_cache()
    body = {"model": "m", "temperature": 0}
    assert cache.decide(CHAT, body, "no-cache") == Decision(False, True, "no-cache")
    assert cache.decide(CHAT, body, "no-store") == Decision(False, False, "no-store")
    assert cache.decide(CHAT, body, "no-store").bypass
    uncacheable = {"model": "m", "temperature": 1}
    assert cache.decide(CHAT, uncacheable, "no-cache").store is False


# --- key ----------------------------------------------------------------------------------------


def test_key_is_stable_across_processes_and_key_order() -> None:
    cache = make_cache()
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    reordered = {"messages": [{"content": "hi", "role": "user"}], "temperature": 0.0, "model": "m"}
    key = cache.key(CHAT, body, "scope-a", "token-1234567890abcdef")
    assert key == cache.key(CHAT, reordered, "scope-a", "token-1234567890abcdef")
    # A golden value: a change to the canonical form would orphan every persisted expectation.
    assert key == "606e59d6c04f35b2f36e7ce153cc7e41af4a16b53ea45fabb69f27cdc0881585"
    assert "token-1234567890abcdef" not in key


def test_key_ignores_only_the_deny_list() -> None:
    cache = make_cache()
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    base = cache.key(CHAT, body, "s", None)
    noisy = {**body, "stream": True, "stream_options": {"include_usage": True}, "user": "u-7"}
    assert cache.key(CHAT, noisy, "s", None) == base
    assert cache.key(EMBED, body, "s", None) != base
    assert cache.key(CHAT, body, "s2", None) != base
    assert cache.key(CHAT, body, "s", "client-token-aaaaaaaa") != base
    assert cache.key(CHAT, body, "s", "client-token-aaaaaaaa") != cache.key(
        CHAT, body, "s", "client-token-bbbbbbbb"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "other"),
        ("messages", [{"role": "user", "content": "bye"}]),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("seed", 7),
        ("max_tokens", 5),
        ("max_completion_tokens", 5),
        ("stop", ["\n"]),
        ("logit_bias", {"50256": -100}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("prompt_cache_key", "p"),
        ("reasoning_effort", "high"),
        ("parallel_tool_calls", False),
        ("metadata", {"a": "b"}),
    ],
)
def test_request_fields_that_change_the_answer_change_the_key(field: str, value: Any) -> None:
    cache = make_cache()
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    assert cache.key(CHAT, {**body, field: value}, "s", None) != cache.key(CHAT, body, "s", None)


def test_key_handles_integers_outside_64_bits() -> None:
    cache = make_cache()
    small = cache.key(CHAT, {"model": "m", "seed": 2**64}, "s", None)
    big = cache.key(CHAT, {"model": "m", "seed": 2**65}, "s", None)
    assert small != big


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_name = st.text(min_size=1, max_size=12).filter(lambda k: k not in KEY_DENY_LIST)
bodies = st.dictionaries(field_name, json_value, min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(body=bodies, data=st.data())
def test_every_field_outside_the_deny_list_changes_the_key(
    body: dict[str, Any], data: st.DataObject
) -> None:
    cache = make_cache()
    name = data.draw(st.sampled_from(sorted(body)))
    other = data.draw(json_value)
    # Python equality is looser than JSON's (0 == 0.0 == False): skip values that count as equal.
    assume(not _json_equal(other, body[name]))
    base = cache.key(CHAT, body, "scope", None)
    assert cache.key(CHAT, {**body, name: other}, "scope", None) != base
    without = {k: v for k, v in body.items() if k != name}
    assert cache.key(CHAT, without, "scope", None) != base
    denied = data.draw(st.sampled_from(sorted(KEY_DENY_LIST)))
    assert cache.key(CHAT, {**body, denied: other}, "scope", None) == base


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


# --- get / put: hits, misses, bounds, TTL --------------------------------------------------------


def test_hit_after_put_and_miss_before() -> None:
    cache = make_cache()
    key = cache.key(CHAT, {"model": "m", "temperature": 0}, "s", None)
    assert cache.get(key, anywhere) is None
    put(cache, key, chat_answer())
    hit = cache.get(key, anywhere)
    assert hit is not None
    assert hit.body == chat_answer()
    assert (hit.provider, hit.region, hit.model, hit.upstream_model) == (
        "alpha",
        "eu",
        "deepseek-v3.2",
        "deepseek-chat",
    )
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.stores, stats.entries) == (1, 1, 1, 1)
    assert stats.bytes == hit.size


def test_peek_reads_without_counting() -> None:
    cache = make_cache()
    assert cache.peek("k", anywhere) is None
    put(cache, "k", chat_answer())
    peeked = cache.peek("k", anywhere)
    assert peeked is not None and peeked.body == chat_answer()
    assert cache.peek("k", lambda _p, _m: False) is None
    assert (cache.stats.hits, cache.stats.misses) == (0, 0)


def test_a_returned_body_cannot_change_the_stored_one() -> None:
    cache = make_cache()
    put(cache, "k", chat_answer("original"))
    first = cache.get("k", anywhere)
    assert first is not None
    first.body["choices"][0]["message"]["content"] = "tampered"
    second = cache.get("k", anywhere)
    assert second is not None
    assert second.body["choices"][0]["message"]["content"] == "original"


def test_a_hit_from_a_provider_outside_the_current_bounds_is_a_miss() -> None:
    cache = make_cache()
    put(cache, "k", chat_answer(), provider="alpha", region="eu")
    regions = {"alpha": "eu", "beta": "us"}

    def only_us(provider: str, _model: str) -> bool:
        return regions[provider] == "us"

    def only_other_model(_provider: str, model: str) -> bool:
        return model == "qwen3-max"

    assert cache.get("k", only_us) is None
    assert cache.get("k", only_other_model) is None
    assert cache.get("k", anywhere) is not None  # still there for a request that allows it
    assert (cache.stats.hits, cache.stats.misses) == (1, 2)


def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl_s=60)
    put(cache, "k", chat_answer())
    clock.now += 59.9
    assert cache.get("k", anywhere) is not None
    clock.now += 0.2
    assert cache.get("k", anywhere) is None
    put(cache, "other", chat_answer())  # an insert purges what expired
    assert cache.stats.entries == 1


def test_byte_bound_holds_under_a_flood_of_large_answers() -> None:
    max_bytes = 64 * 1024
    cache = make_cache(max_bytes=max_bytes)
    sizes: dict[str, int] = {}
    for i in range(400):
        body = chat_answer(f"{i:04d}" + "x" * (1000 + 37 * (i % 50)))
        put(cache, f"k{i}", body)
        sizes[f"k{i}"] = entry_size(body)
        assert cache.stats.bytes <= max_bytes
    stats = cache.stats
    assert stats.evictions > 300
    assert stats.stores == 400
    present = [k for k in sizes if cache.get(k, anywhere) is not None]
    assert "k399" in present and "k0" not in present
    assert sum(sizes[k] for k in present) == stats.bytes
    # The newest entries survive: what is present is a suffix of the insertion order.
    assert present == [f"k{i}" for i in range(400 - len(present), 400)]


def test_an_answer_larger_than_max_bytes_is_not_stored() -> None:
    cache = make_cache(max_bytes=4096)
    put(cache, "small", chat_answer("ok"))
    put(cache, "huge", chat_answer("x" * 10_000))
    assert cache.get("huge", anywhere) is None
    assert cache.get("small", anywhere) is not None
    assert cache.stats.rejected == 1
    assert cache.stats.evictions == 0


def test_max_bytes_zero_stores_nothing() -> None:
    cache = make_cache(max_bytes=0)
    put(cache, "k", chat_answer())
    assert cache.get("k", anywhere) is None


def test_eviction_is_least_recently_used() -> None:
    cache = make_cache(max_bytes=entry_size(chat_answer("a" * 1000)) * 3)
    for key in ("a", "b", "c"):
        put(cache, key, chat_answer(key * 1000))
    assert cache.get("a", anywhere) is not None  # "a" is now the most recently used
    put(cache, "d", chat_answer("d" * 1000))
    assert cache.get("b", anywhere) is None
    assert cache.get("a", anywhere) is not None
    assert cache.stats.evictions == 1


# --- storable ----------------------------------------------------------------------------------

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}


def with_finish(body: dict[str, Any], finish: str | None) -> dict[str, Any]:
    body["choices"][0]["finish_reason"] = finish
    return body


@pytest.mark.parametrize(
    ("body", "tools_configured", "ok"),
    [
        (chat_answer(), False, True),
        (with_finish(chat_answer(), "length"), False, True),
        (with_finish(chat_answer(), "content_filter"), False, False),
        (with_finish(chat_answer(), None), False, False),
        (with_finish(chat_answer(None, tool_calls=[TOOL_CALL]), "tool_calls"), False, False),
        (with_finish(chat_answer(None, tool_calls=[TOOL_CALL]), "tool_calls"), True, True),
        (chat_answer("x", tool_calls=[TOOL_CALL]), False, False),
        ({"error": {"message": "bad", "type": "x", "param": None, "code": "y"}}, False, False),
        ({**chat_answer(), "choices": []}, False, False),
        (
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "model": "e",
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            },
            False,
            True,
        ),
        ({"object": "list", "data": []}, False, False),
        (
            {
                "object": "text_completion",
                "id": "c",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}],
            },
            False,
            True,
        ),
        ({"object": "response"}, False, False),
    ],
)
def test_storable(body: dict[str, Any], tools_configured: bool, ok: bool) -> None:
    assert make_cache(cache_tool_calls=tools_configured).storable(body) is ok


def test_an_answer_assembled_from_a_stream_serves_a_non_stream_request() -> None:
    cache = make_cache()
    streamed = {
        "model": "m",
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [],
    }
    plain = {"model": "m", "temperature": 0, "messages": []}
    assembler = StreamAssembler()
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    for choices, usage in (
        (
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            None,
        ),
        ([{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}], None),
        ([{"index": 0, "delta": {}, "finish_reason": "stop"}], None),
        ([], {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}),
    ):
        assembler.feed({**base, "choices": choices, "usage": usage})
    body = assembler.complete()
    assert body is not None and cache.storable(body)
    put(cache, cache.key(CHAT, streamed, "s", None), body)
    hit = cache.get(cache.key(CHAT, plain, "s", None), anywhere)
    assert hit is not None
    assert hit.body["choices"][0]["message"]["content"] == "Hi"
    assert hit.body["usage"]["total_tokens"] == 3


# --- single-flight -----------------------------------------------------------------------------


async def test_twenty_identical_callers_share_exactly_one_call() -> None:
    flights = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def upstream() -> dict[str, str]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"answer": "42"}

    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(flights.run("k", upstream)) for _ in range(20)]
        await _until(lambda: len(flights) == 1 and calls == 1)
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(result == {"answer": "42"} for result, _ in results)
    assert sorted(shared for _, shared in results) == [False] + [True] * 19
    assert len(flights) == 0


async def test_different_keys_do_not_share() -> None:
    flights = SingleFlight()
    calls: list[str] = []

    async def call_for(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0)
        return key

    async with asyncio.timeout(10):
        results = await asyncio.gather(*(flights.run(k, partial(call_for, k)) for k in "abc"))
    assert [r for r, _ in results] == ["a", "b", "c"]
    assert sorted(calls) == ["a", "b", "c"]


async def test_a_failing_shared_call_releases_every_waiter() -> None:
    flights = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        raise ConnectionError("upstream reset")

    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(flights.run("k", failing)) for _ in range(20)]
        await _until(lambda: calls == 1)
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert len(flights) == 0

    async def works() -> str:
        return "fresh"

    assert await flights.run("k", works) == ("fresh", False)  # nothing left behind


async def test_a_cancelled_leader_lets_the_followers_try_on_their_own() -> None:
    flights = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def slow_then_fast() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.Event().wait()  # the leader's client goes away while it waits
        await release.wait()
        return "second try"

    async with asyncio.timeout(10):
        leader = asyncio.create_task(flights.run("k", slow_then_fast))
        await started.wait()
        followers = [asyncio.create_task(flights.run("k", slow_then_fast)) for _ in range(5)]
        for _ in range(5):
            await asyncio.sleep(0)
        leader.cancel()
        await _until(lambda: calls == 2)
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*followers)
    assert leader.cancelled()
    assert calls == 2
    assert [r for r, _ in results] == ["second try"] * 5
    assert sorted(s for _, s in results) == [False] + [True] * 4
    assert len(flights) == 0


async def test_a_cancelled_follower_does_not_cancel_the_shared_call() -> None:
    flights = SingleFlight()
    release = asyncio.Event()

    async def upstream() -> str:
        await release.wait()
        return "done"

    async with asyncio.timeout(10):
        leader = asyncio.create_task(flights.run("k", upstream))
        await _until(lambda: len(flights) == 1)
        follower = asyncio.create_task(flights.run("k", upstream))
        await asyncio.sleep(0)
        follower.cancel()
        release.set()
        assert await leader == ("done", False)
    assert follower.cancelled()
    assert len(flights) == 0


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)
