"""Streams end to end: the commit point, stream timeouts, cuts after content, client disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from sidecar.front import Connection

from .conftest import provider
from .fakes import (
    FakeUpstream,
    Gated,
    Sse,
    cut_after_content,
    cut_before_content,
    garbage,
    ok,
    slow_chunks,
    slow_first_token,
    sse,
    stall,
    status,
)

FAST = {"first_byte_timeout_s": 0.3, "first_token_timeout_s": 0.3, "idle_timeout_s": 0.3}
HI = [{"role": "user", "content": "Hi"}]
STREAM = {"model": "deepseek-v3.2", "messages": HI, "stream": True}


async def pair(start_sidecar, make_settings, fake_upstream, **routing: Any):
    alpha, beta = await fake_upstream(), await fake_upstream()
    settings = make_settings(
        [provider("alpha", alpha.url), provider("beta", beta.url)],
        routing={**FAST, "sticky": False, **routing},
    )
    return await start_sidecar(settings), alpha, beta


async def read_events(sidecar, body: dict[str, Any]) -> tuple[int, Any, list[Any]]:
    """Status, headers and every SSE event's data (parsed JSON, or the raw ``[DONE]``)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.base_url}/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            if resp.content_type != "text/event-stream":
                return resp.status, resp.headers.copy(), [json.loads(raw)]
            events: list[Any] = []
            for block in raw.decode().split("\n\n"):
                if block.startswith("data: "):
                    data = block[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
            return resp.status, resp.headers.copy(), events


def text_of(events: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", [])
    )


def role_chunks(events: list[Any]) -> int:
    return sum(
        1
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", [])
        if choice["delta"].get("role")
    )


ROLE_ONLY = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
# Each misbehaviour before the first content, and how the ledger's attempt reason starts: the
# same reasons as after content (and as the Responses API's streams), for it is one reader.
PRE_CONTENT_FAILURES = {
    "cut before content": (cut_before_content(), "stream cut: "),
    "slow first token": (slow_first_token(2.0), "no content within 0.3s"),
    "not SSE": (garbage(), "stream ended inside an event"),
    "error event before content": (
        sse(ROLE_ONLY, {"error": {"message": "overloaded", "type": "server_error"}}),
        "error event before any content",
    ),
    "ends before content": (sse(ROLE_ONLY), "stream ended before any content"),
    "ends between events": (Sse([ROLE_ONLY], done=False), "stream ended before any content"),
    "ends inside an event": (
        Sse([ROLE_ONLY, b'data: {"choices": ['], done=False),
        "stream ended inside an event",
    ),
    "an endless event": (Sse([ROLE_ONLY, b"x" * (2 << 20)], done=False), "stream event too large"),
    "503": (status(503), "HTTP 503"),
    "stall before headers": (stall(2.0), "no response headers within 0.3s"),
}


@pytest.mark.parametrize(
    ("misbehaviour", "reason"), list(PRE_CONTENT_FAILURES.values()), ids=list(PRE_CONTENT_FAILURES)
)
async def test_a_stream_fails_over_until_its_first_content(
    start_sidecar, make_settings, fake_upstream, misbehaviour, reason
):
    sidecar, alpha, beta = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(misbehaviour)
    beta.script(ok(content="from beta"))
    code, headers, events = await read_events(sidecar, STREAM)
    assert code == 200
    assert headers["X-TokenHub-Provider"] == "beta"
    assert headers["X-TokenHub-Attempts"] == "2"
    assert "X-TokenHub-Route" in headers
    # The client sees beta's stream only: alpha's held role chunk never went out.
    assert text_of(events) == "from beta"
    assert role_chunks(events) == 1
    assert events[-1] == "[DONE]"
    assert len(alpha.requests) == 1 and len(beta.requests) == 1
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "ok" and line["billable"] is True and line["stream"] is True
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta"]
    assert line["attempts"][0]["reason"].startswith(reason)


async def test_a_stream_that_never_gets_content_anywhere_is_a_502(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, beta = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(slow_first_token(2.0))
    beta.script(cut_before_content())
    code, headers, [body] = await read_events(sidecar, STREAM)
    assert code == 502
    assert body["error"]["code"] == "upstream_failed"
    assert "alpha: HTTP 200 (no content within 0.3s)" in body["error"]["message"]
    assert headers["x-should-retry"] == "false"
    assert headers["X-TokenHub-Attempts"] == "2"
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "upstream_failed" and line["billable"] is False


async def test_an_upstream_4xx_on_a_stream_is_passed_back(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, beta = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(status(400))
    code, headers, [body] = await read_events(sidecar, STREAM)
    assert code == 400
    assert body["error"]["message"] == "fake upstream answered 400"
    assert headers["X-TokenHub-Attempts"] == "1"
    assert beta.requests == []
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "upstream_error" and line["billable"] is False


def assert_ends_with_one_error_event(events: list[Any]) -> None:
    assert "[DONE]" not in events
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors == [events[-1]]
    assert events[-1]["error"]["code"] == "stream_interrupted"


async def test_a_cut_after_content_ends_with_one_error_event_and_no_done(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, beta = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(cut_after_content(2, content="one two three four"))
    code, headers, events = await read_events(sidecar, STREAM)
    assert code == 200 and headers["X-TokenHub-Provider"] == "alpha"
    assert text_of(events) == "one two"
    assert_ends_with_one_error_event(events)
    assert beta.requests == []  # past the commit point: no failover
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "stream_cut"
    assert line["billable"] is False and line["total_usd"] == "0"
    assert line["usage_source"] == "estimated"
    assert line["usage"]["output_tokens"] >= 1
    assert [a["provider"] for a in line["attempts"]] == ["alpha"]


async def test_the_sdk_raises_on_a_cut_stream(start_sidecar, make_settings, fake_upstream):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(cut_after_content(1, content="one two three"))
    stream = await sidecar.client().chat.completions.create(
        model="deepseek-v3.2", messages=HI, stream=True
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="interrupted"):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
    assert seen == ["one"]


async def test_an_error_event_after_content_ends_the_stream(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    content = {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
    alpha.script(sse(content, {"error": {"message": "overloaded", "type": "server_error"}}))
    code, _, events = await read_events(sidecar, STREAM)
    assert code == 200
    assert text_of(events) == "partial"
    assert_ends_with_one_error_event(events)
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "stream_cut"
    assert line["attempts"][0]["reason"] == "error event after content"


async def test_idle_timeout_between_chunks_cuts_the_stream(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, beta = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(slow_chunks(2.0, content="one two"))
    code, _, events = await read_events(sidecar, STREAM)
    assert code == 200
    assert text_of(events) == "one"
    assert_ends_with_one_error_event(events)
    assert beta.requests == []
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "stream_cut"
    assert "between chunks" in line["attempts"][0]["reason"]
    # The sidecar dropped the stalled upstream request rather than leaving it running.
    await asyncio.wait_for(alpha.client_gone.wait(), 1.0)


async def test_the_usage_chunk_is_removed_unless_asked_for(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    _, _, plain = await read_events(sidecar, STREAM)
    asked = {**STREAM, "stream_options": {"include_usage": True}}
    _, _, with_usage = await read_events(sidecar, asked)
    assert not any(isinstance(e, dict) and e.get("usage") for e in plain)
    assert [
        e["usage"]["completion_tokens"]
        for e in with_usage
        if isinstance(e, dict) and e.get("usage")
    ] == [2]
    # Upstream was asked for usage both times, and the ledger has what it reported.
    assert all(r.json["stream_options"]["include_usage"] is True for r in alpha.requests)
    lines = sidecar.ledger_lines()
    assert [line["usage_source"] for line in lines] == ["reported", "reported"]
    assert [line["usage"]["output_tokens"] for line in lines] == [2, 2]


async def test_a_client_that_goes_away_mid_stream_closes_the_upstream_request(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream, idle_timeout_s=30)
    alpha.script(slow_chunks(0.2, content=" ".join(["word"] * 50)))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM)
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert b"word" in first or b"assistant" in first
        await resp.content.readuntil(b"\n\n")
        assert alpha.active_streams == 1
        resp.close()  # the client goes away mid-stream
        await asyncio.wait_for(alpha.client_gone.wait(), 0.1)
    await asyncio.wait_for(_ledger_has_line(sidecar), 2.0)
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "client_cancelled"
    assert line["billable"] is False and line["total_usd"] == "0"
    assert line["usage_source"] == "estimated"
    assert alpha.active_streams == 0


async def _ledger_has_line(sidecar) -> None:
    while not sidecar.ledger_lines():
        await asyncio.sleep(0.01)


async def test_a_client_that_goes_away_before_content_closes_the_upstream_request(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, beta = await pair(
        start_sidecar, make_settings, fake_upstream, first_token_timeout_s=30
    )
    alpha.script(slow_first_token(20.0))
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(
            session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM)
        )
        while not alpha.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(alpha.client_gone.wait(), 0.1)
    await asyncio.wait_for(_ledger_has_line(sidecar), 2.0)
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "client_cancelled" and line["billable"] is False
    assert [a["provider"] for a in line["attempts"]] == ["alpha"]
    assert beta.requests == []


async def test_fakes_count_no_orphaned_connections_after_cancel(
    start_sidecar, make_settings, fake_upstream
):
    """After a cancelled stream, the fake holds no connection the sidecar forgot to close."""
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream, idle_timeout_s=30)
    alpha.script(slow_chunks(0.2, content=" ".join(["word"] * 50)))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM)
        await resp.content.readuntil(b"\n\n")
        resp.close()
        await asyncio.wait_for(alpha.client_gone.wait(), 0.1)
    await asyncio.wait_for(_no_connections(alpha), 1.0)


async def _no_connections(fake: FakeUpstream) -> None:
    while fake.open_connections:
        await asyncio.sleep(0.01)


async def test_comments_and_keep_alives_mid_stream_do_not_end_it(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    one = {"choices": [{"index": 0, "delta": {"content": "one"}, "finish_reason": None}]}
    two = {"choices": [{"index": 0, "delta": {"content": " two"}, "finish_reason": "stop"}]}
    alpha.script(sse(": PROCESSING\n\n", role, ": keep-alive\n\n", one, ": ping\n\n", two))
    code, _, events = await read_events(sidecar, STREAM)
    assert code == 200
    assert text_of(events) == "one two"
    assert events[-1] == "[DONE]"
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "ok"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_a_client_that_goes_away_before_headers_closes_the_upstream_request(
    start_sidecar, make_settings, fake_upstream, stream
):
    sidecar, alpha, beta = await pair(
        start_sidecar, make_settings, fake_upstream, first_byte_timeout_s=30
    )
    alpha.script(stall(20.0))
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(
            session.post(
                f"{sidecar.base_url}/v1/chat/completions", json={**STREAM, "stream": stream}
            )
        )
        while not alpha.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(alpha.client_gone.wait(), 0.1)
    await asyncio.wait_for(_ledger_has_line(sidecar), 2.0)
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "client_cancelled" and line["billable"] is False
    assert line["attempts"] == [{**line["attempts"][0], "provider": "alpha", "status": None}]
    assert beta.requests == []


async def test_an_endless_event_after_content_cuts_the_stream(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    one = {"choices": [{"index": 0, "delta": {"content": "one"}, "finish_reason": None}]}
    two = {"choices": [{"index": 0, "delta": {"content": " two"}, "finish_reason": "stop"}]}
    alpha.script(Sse([one, b"x" * (2 << 20), two], chunk_delay_s=0.05))
    code, _, events = await read_events(sidecar, STREAM)
    assert code == 200
    assert text_of(events) == "one"
    assert_ends_with_one_error_event(events)
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "stream_cut"
    assert line["attempts"][0]["reason"] == "stream event too large (not SSE?)"


def _content(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _http_chunks_until(resp: aiohttp.ClientResponse, marker: bytes) -> list[bytes]:
    """The body's HTTP chunks, as the sidecar wrote them, up to the one that holds ``marker``."""
    chunks: list[bytes] = []
    async for data, _ in resp.content.iter_chunks():
        chunks.append(data)
        if marker in b"".join(chunks):
            return chunks
    raise AssertionError(f"{marker!r} never arrived")


async def test_events_that_arrive_together_are_forwarded_in_one_write(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    together = _event(_content("B")) + _event(_content("C")) + _event(_content("D", "stop"))
    upstream = Gated(_event(_content("A")), together)
    alpha.script(upstream)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM) as resp:
            await _http_chunks_until(resp, b'"A"')
            upstream.gate.set()
            chunks = await _http_chunks_until(resp, b'"B"')
            rest = await resp.read()
    assert b'"C"' in chunks[-1] and b'"D"' in chunks[-1], chunks
    assert (b"".join(chunks) + rest).endswith(b"data: [DONE]\n\n")
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "ok"


async def test_a_stream_whose_ledger_line_cannot_be_written_never_gets_its_done(
    start_sidecar, make_settings, fake_upstream
):
    """When the ledger refuses the line at the stream's end, the client's stream is cut
    before ``[DONE]``: no answer goes out unrecorded."""
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    upstream = Gated(_event(_content("A")), _event(_content("B", "stop")))
    alpha.script(upstream)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM) as resp:
            chunks = await _http_chunks_until(resp, b'"A"')
            await sidecar.runtime.ledger.close()
            upstream.gate.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                chunks += [await resp.content.read()]
    assert b"[DONE]" not in b"".join(chunks)
    assert sidecar.ledger_lines() == []


async def test_an_event_followed_by_a_keep_alive_is_not_held_for_the_next_read(
    start_sidecar, make_settings, fake_upstream
):
    """The upstream sends no more until the client has the event: holding it would hang."""
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream, idle_timeout_s=30)
    first = _event(_content("A")) + _event(_content("B")) + b": keep-alive\n\n"
    upstream = Gated(first, _event(_content("C", "stop")))
    alpha.script(upstream)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM) as resp:
            async with asyncio.timeout(10):
                await _http_chunks_until(resp, b'"B"')
            upstream.gate.set()
            rest = await resp.read()
    assert b'"C"' in rest and rest.endswith(b"data: [DONE]\n\n")


async def test_an_event_whose_data_spans_several_lines_reaches_the_sdk_whole(
    start_sidecar, make_settings, fake_upstream
):
    """SSE lets one event's data take several ``data:`` lines; each must stay a ``data:`` line."""
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    split = (
        b'data: {"choices":[{"index":0,\n'
        b'data: "delta":{"content":"B"},"finish_reason":"stop"}]}\n\n'
    )
    alpha.script(sse(_content("A"), split))
    stream = await sidecar.client().chat.completions.create(
        model="deepseek-v3.2", messages=HI, stream=True
    )
    seen = [c.choices[0].delta.content async for c in stream if c.choices]
    assert seen == ["A", "B"]


@pytest.mark.parametrize("end_delay_s", [0.0, 0.2])
async def test_a_stream_that_ends_well_leaves_its_upstream_connection_pooled(
    start_sidecar, make_settings, fake_upstream, end_delay_s
):
    """A server may end the body a moment after ``[DONE]`` (aiohttp's writes the last chunk
    apart): the connection still goes back to the pool, and the next stream needs no new one
    (with TLS, no new handshake)."""
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    events = [ROLE_ONLY, _content("A"), _content("B", "stop")]
    alpha.script(Sse(events, end_delay_s=end_delay_s), Sse(events))
    for _ in range(2):
        status_code, _, got = await read_events(sidecar, STREAM)
        assert status_code == 200 and got[-1] == "[DONE]" and text_of(got) == "AB"
        await asyncio.sleep(end_delay_s + 0.1)  # the first body's end has reached the sidecar
    first, second = alpha.requests
    assert first.peer is not None and first.peer == second.peer
    assert [line["outcome"] for line in sidecar.ledger_lines()] == ["ok", "ok"]


async def test_a_stream_whose_body_never_ends_after_done_drops_its_connection(
    start_sidecar, make_settings, fake_upstream
):
    """The wait for the body's end after ``[DONE]`` is bounded (``relay.END_GRACE_S``): a
    server that never ends it loses the connection, and the next stream opens a new one."""
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    events = [ROLE_ONLY, _content("A", "stop")]
    alpha.script(Sse(events, end_delay_s=30), Sse(events))
    status_code, _, got = await read_events(sidecar, STREAM)
    assert status_code == 200 and got[-1] == "[DONE]"
    async with asyncio.timeout(10):
        while alpha.open_connections:
            await asyncio.sleep(0.05)
    status_code, _, got = await read_events(sidecar, STREAM)
    assert status_code == 200 and got[-1] == "[DONE]"
    first, second = alpha.requests
    assert first.peer != second.peer


async def test_the_lean_front_begins_the_answer_inside_the_upstream_read_callback(
    start_sidecar, make_settings, fake_upstream, monkeypatch
):
    """The head, the held role chunk and the first content go out from the read callback that
    brought the content, not after the request's task got its next turn on the loop."""
    began_in: list[asyncio.Task[Any] | None] = []
    begin_stream = Connection.begin_stream

    def spy(self: Connection, headers: dict[str, str]) -> None:
        began_in.append(asyncio.current_task())
        begin_stream(self, headers)

    monkeypatch.setattr(Connection, "begin_stream", spy)
    sidecar, alpha, _ = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(slow_first_token(0.1, content="called back"))
    chunks = await sidecar.client().chat.completions.create(
        model="deepseek-v3.2", messages=HI, stream=True
    )
    got = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert got == "called back"
    assert began_in == [None]  # no task: a callback
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "ok" and [a["reason"] for a in line["attempts"]] == ["ok"]


async def test_a_client_gone_as_the_answer_begins_keeps_one_ledger_line(
    start_sidecar, make_settings, fake_upstream, monkeypatch
):
    """The client's connection is found closed by the first write, inside the read callback:
    the upstream stream is dropped and the request's one line says the client went away."""
    begin_stream = Connection.begin_stream

    def client_gone(self: Connection, headers: dict[str, str]) -> None:
        begin_stream(self, headers)
        assert self.transport is not None
        self.transport.abort()

    monkeypatch.setattr(Connection, "begin_stream", client_gone)
    sidecar, alpha, beta = await pair(start_sidecar, make_settings, fake_upstream)
    alpha.script(slow_chunks(0.05, first_token_delay_s=0.1))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(f"{sidecar.base_url}/v1/chat/completions", json=STREAM) as resp:
                await resp.read()
        await asyncio.wait_for(alpha.client_gone.wait(), 1.0)
    await asyncio.wait_for(_ledger_has_line(sidecar), 2.0)
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "client_cancelled" and line["billable"] is False
    assert [(a["provider"], a["reason"]) for a in line["attempts"]] == [
        ("alpha", "client cancelled")
    ]
    assert beta.requests == []
    await asyncio.sleep(0.1)
    assert len(sidecar.ledger_lines()) == 1
