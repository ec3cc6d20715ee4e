"""The daemon's lean front: what it serves itself, what it hands to aiohttp, and the wire rules
both keep (keep-alive, pipelining, close, drain). aiohttp's answers carry its ``Server`` header
and the lean front's do not, which is how these tests tell who answered."""

from __future__ import annotations

import asyncio
import io
import json
import random
from typing import Any

import openai
import orjson
import pytest

from sidecar.app import create_app
from sidecar.front import DaemonRunner, head_bytes, parse_head
from sidecar.log import RequestLog

from .conftest import provider
from .fakes import ok, sse, status
from .test_responses import MODELS, response_body, stream_events

CHAT = {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "Hi"}]}


def post(
    path: str = "/v1/chat/completions",
    body: dict[str, Any] | None = None,
    *,
    extra: str = "",
    version: str = "HTTP/1.1",
) -> bytes:
    data = orjson.dumps(body if body is not None else CHAT)
    return (
        f"POST {path} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{extra}\r\n"
    ).encode() + data


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def lean(self) -> bool:
        return "server" not in self.headers

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response off the wire: a Content-Length body or a chunked one."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body)


def sse_text(body: bytes) -> str:
    """The content a chat stream's events carry, joined."""
    text = ""
    for event in body.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in json.loads(event[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


@pytest.fixture
async def alpha(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    return fake, sidecar


async def connect(sidecar: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", sidecar.port)


async def test_model_requests_are_served_by_the_lean_front(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="whole"), ok(content="in parts"))
    client = sidecar.client()
    raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content == "whole"
    assert "server" not in raw.headers
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["date"].endswith("GMT")
    async with client.chat.completions.with_streaming_response.create(
        **CHAT, stream=True
    ) as streamed:
        assert "server" not in streamed.headers
        assert streamed.headers["content-type"] == "text/event-stream"
        text = "".join(
            [c.choices[0].delta.content or "" async for c in await streamed.parse() if c.choices]
        )
    assert text == "in parts"
    lines = sidecar.ledger_lines()
    assert [(line["stream"], line["outcome"]) for line in lines] == [(False, "ok"), (True, "ok")]


async def test_responses_calls_are_served_by_the_lean_front(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    fake.script(
        status(200, body=response_body("whole")), sse(*stream_events(["in ", "parts"]), done=False)
    )
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url, models=MODELS)]))
    client = sidecar.client()
    raw = await client.responses.with_raw_response.create(model="gpt-4o-mini", input="hi")
    assert raw.parse().output_text == "whole"
    assert "server" not in raw.headers
    async with client.responses.with_streaming_response.create(
        model="gpt-4o-mini", input="hi", stream=True
    ) as streamed:
        assert "server" not in streamed.headers
        events = [event async for event in await streamed.parse()]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["in ", "parts"]
    assert events[-1].type == "response.completed"
    lines = sidecar.ledger_lines()
    assert [(line["endpoint"], line["stream"], line["outcome"]) for line in lines] == [
        ("/v1/responses", False, "ok"),
        ("/v1/responses", True, "ok"),
    ]


async def test_pipelined_requests_are_answered_in_order_on_one_connection(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="first"), ok(content="second part"), ok(content="third"))
    reader, writer = await connect(sidecar)
    second = post(body={**CHAT, "stream": True}, extra="X-Request-Id: req-2\r\n")
    writer.write(
        post(extra="X-Request-Id: req-1\r\n") + second + post(extra="X-Request-Id: r3\r\n")
    )
    answers = [await read_answer(reader) for _ in range(3)]
    writer.close()
    assert [a.headers["x-request-id"] for a in answers] == ["req-1", "req-2", "r3"]
    assert all(a.status == 200 and a.lean for a in answers)
    assert answers[0].json()["choices"][0]["message"]["content"] == "first"
    assert sse_text(answers[1].body) == "second part"
    assert answers[1].body.endswith(b"data: [DONE]\n\n")
    assert answers[2].json()["choices"][0]["message"]["content"] == "third"


@pytest.mark.parametrize("seed", range(4))
async def test_pipelined_requests_cut_at_random_places_are_all_answered(alpha, seed):
    fake, sidecar = alpha
    fake.script(*[ok(content=f"answer {n}") for n in range(4)])
    wire = b"".join(
        post(body={**CHAT, "stream": n % 2 == 1}, extra=f"X-Request-Id: r{n}\r\n") for n in range(4)
    )
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(wire)), 12))
    reader, writer = await connect(sidecar)
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        writer.write(wire[start:end])
        await writer.drain()
        await asyncio.sleep(rng.choice((0, 0, 0.01)))
    answers = [await read_answer(reader) for _ in range(4)]
    writer.close()
    assert [a.headers["x-request-id"] for a in answers] == ["r0", "r1", "r2", "r3"]
    assert all(a.status == 200 and a.lean for a in answers)
    texts = [
        sse_text(a.body) if n % 2 else a.json()["choices"][0]["message"]["content"]
        for n, a in enumerate(answers)
    ]
    assert texts == ["answer 0", "answer 1", "answer 2", "answer 3"]


async def test_a_request_dribbled_byte_by_byte_is_served(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="slowly"))
    reader, writer = await connect(sidecar)
    for byte in post():
        writer.write(bytes([byte]))
        await writer.drain()
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 200 and answer.lean
    assert answer.json()["choices"][0]["message"]["content"] == "slowly"


async def test_listing_models_keeps_the_connection_on_the_lean_front(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="still lean"))
    reader, writer = await connect(sidecar)
    answers = []
    for target in ("/v1/models", "/v1/models/alpha/deepseek-v3.2", "/v1/models/nope"):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answers.append(await read_answer(reader))
    writer.write(post())
    chat = await read_answer(reader)
    # The same questions asked of aiohttp (a query string hands a connection over).
    handed = []
    for target in ("/v1/models?x=1", "/v1/models/alpha/deepseek-v3.2?x=1", "/v1/models/nope?x=1"):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        handed.append(await read_answer(reader))
    writer.close()
    assert [a.lean for a in answers] == [True, True, True] and chat.lean
    assert [a.lean for a in handed] == [False, False, False]
    for lean, aio in zip(answers, handed, strict=True):
        assert (lean.status, lean.json()) == (aio.status, aio.json())
        assert lean.headers["content-type"] == aio.headers["content-type"]
    listing, entry, missing = answers
    assert "deepseek-v3.2" in {m["id"] for m in listing.json()["data"]}
    assert entry.json() == {
        "id": "alpha/deepseek-v3.2",
        "object": "model",
        "created": 0,
        "owned_by": "alpha",
    }
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert chat.json()["choices"][0]["message"]["content"] == "still lean"


async def test_the_sdk_lists_and_retrieves_models_from_the_lean_front(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    sink = io.BytesIO()
    request_log = RequestLog(format="json", stream=sink)
    settings = make_settings([provider("alpha", fake.url)])
    sidecar = await start_sidecar(settings, request_log=request_log)
    client = sidecar.client()
    listed = await client.models.with_raw_response.list()
    assert "server" not in listed.headers
    assert "deepseek-v3.2" in {m.id async for m in listed.parse()}
    got = await client.models.with_raw_response.retrieve("deepseek-v3.2")
    assert "server" not in got.headers and got.parse().id == "deepseek-v3.2"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-nope")
    assert missing.value.code == "model_not_found" and "gpt-nope" in missing.value.message
    request_log.close()  # writes what waits (lines go out from a thread of their own)
    logged = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [(line["method"], line["path"], line["status"]) for line in logged] == [
        ("GET", "/v1/models", 200),
        ("GET", "/v1/models/deepseek-v3.2", 200),
        ("GET", "/v1/models/gpt-nope", 404),
    ]
    assert sidecar.ledger_lines() == []  # nothing reached an upstream or the cache


async def test_other_requests_hand_the_connection_to_aiohttp(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="after the hand-over"))
    reader, writer = await connect(sidecar)
    writer.write(b"GET /v1/models?page=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    models = await read_answer(reader)
    writer.write(post())
    chat = await read_answer(reader)
    writer.close()
    assert models.status == 200 and not models.lean
    assert "deepseek-v3.2" in {m["id"] for m in models.json()["data"]}
    # Same connection, now aiohttp's: the chat route there answers the same way.
    assert chat.status == 200 and not chat.lean
    assert chat.json()["choices"][0]["message"]["content"] == "after the hand-over"
    assert chat.headers["x-tokenhub-provider"] == "alpha"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%b\r\n0\r\n\r\n"
            % (len(orjson.dumps(CHAT)), orjson.dumps(CHAT)),
            id="chunked body",
        ),
        pytest.param(post(extra="Expect: 100-continue\r\n"), id="expect"),
        pytest.param(post("/v1/chat/completions?trace=1"), id="query string"),
        pytest.param(post(version="HTTP/1.0"), id="http/1.0"),
        pytest.param(post(extra="X-Odd:\x01value\r\n"), id="control character"),
    ],
)
async def test_unusual_requests_are_served_by_aiohttp(alpha, request_bytes):
    fake, sidecar = alpha
    fake.script(ok(content="handled"))
    reader, writer = await connect(sidecar)
    writer.write(request_bytes)
    if b"Expect" in request_bytes:
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    answer = await read_answer(reader)
    writer.close()
    assert not answer.lean
    if b"\x01" in request_bytes:
        assert answer.status == 400  # aiohttp's parser refuses it, as it always did
    else:
        assert answer.status == 200
        assert answer.json()["choices"][0]["message"]["content"] == "handled"


async def test_a_body_over_the_limit_is_refused_with_the_openai_error_shape(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    sidecar = await start_sidecar(
        make_settings([provider("alpha", fake.url)], server={"max_body_bytes": 1024})
    )
    reader, writer = await connect(sidecar)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    writer.write(post(body=big))
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert fake.requests == []


async def test_refusals_on_the_lean_front_keep_the_error_shape_and_the_connection(
    start_sidecar, make_settings, fake_upstream
):
    fake = await fake_upstream()
    fake.script(ok(content="allowed"))
    settings = make_settings(
        [provider("alpha", fake.url)], server={"client_tokens": ["sk-the-right-token-123456"]}
    )
    sidecar = await start_sidecar(settings)
    reader, writer = await connect(sidecar)
    writer.write(post(extra="Authorization: Bearer sk-a-wrong-token-1234567\r\n"))
    refused = await read_answer(reader)
    writer.write(post(extra="Authorization: Bearer sk-the-right-token-123456\r\n"))
    served = await read_answer(reader)
    writer.close()
    assert refused.status == 401 and refused.lean
    assert refused.json()["error"]["type"] == "authentication_error"
    assert refused.headers["x-request-id"]
    assert refused.headers["x-tokenhub-route"].startswith("not routed:")
    assert b"sk-a-wrong" not in refused.body
    assert served.status == 200 and served.lean


async def test_connection_close_is_honoured(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="bye"))
    reader, writer = await connect(sidecar)
    writer.write(post(extra="Connection: close\r\n"))
    answer = await read_answer(reader)
    assert answer.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_an_idle_connection_closes_but_a_long_stream_is_not_cut(
    make_settings, fake_upstream, tmp_path
):
    fake = await fake_upstream()
    fake.script(ok(content="a b c d e f", chunk_delay_s=0.15), ok(content="idle next"))
    settings = make_settings([provider("alpha", fake.url)])
    runner = DaemonRunner(create_app(settings), header_timeout_s=5, keepalive_timeout=0.4)
    await runner.setup()
    try:
        from aiohttp import web

        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(body={**CHAT, "stream": True}))
        streamed = await read_answer(reader)  # about 1 s: longer than the keep-alive timeout
        assert streamed.lean and sse_text(streamed.body) == "a b c d e f"
        writer.write(post())
        second = await read_answer(reader)
        assert second.status == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # idle past 0.4 s: closed
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_stream_in_flight_finishes_when_the_server_drains(alpha):
    fake, sidecar = alpha
    fake.script(ok(content="one two three", chunk_delay_s=0.2))
    reader, writer = await connect(sidecar)
    writer.write(post(body={**CHAT, "stream": True}))
    await reader.readuntil(b"\r\n\r\n")
    cleanup = asyncio.ensure_future(sidecar.runner.cleanup())
    rest = await asyncio.wait_for(reader.read(), 10)
    await cleanup
    writer.close()
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert [line["outcome"] for line in sidecar.ledger_lines()] == ["ok"]


async def test_a_stream_to_a_client_that_stops_reading_is_held_then_sent_whole(alpha):
    """Megabytes of events to a client that reads nothing for a while: the pushed relay pauses
    the upstream once the client's socket is full, resumes when it drains, and loses nothing."""
    fake, sidecar = alpha
    pieces = [f"{n:04d}" + "x" * 60_000 for n in range(200)]  # 12 MB: past every socket buffer
    fake.script(sse(*[chunk_event(piece) for piece in pieces]))
    reader, writer = await connect(sidecar)
    writer.transport.pause_reading()
    writer.write(post(body={**CHAT, "stream": True}))
    await asyncio.sleep(1.0)
    writer.transport.resume_reading()
    answer = await asyncio.wait_for(read_answer(reader), 30)
    writer.close()
    assert answer.lean and answer.body.endswith(b"data: [DONE]\n\n")
    assert sse_text(answer.body) == "".join(pieces)
    assert [line["outcome"] for line in sidecar.ledger_lines()] == ["ok"]


def chunk_event(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-big",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-v3.2",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }


def test_parse_head_takes_only_plain_requests():
    def parse(head: bytes) -> Any:
        buffer = bytearray(head + b"\r\n\r\n")
        return parse_head(buffer, len(head), 1000)

    plain = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-A:  b c \t"
    head = parse(plain)
    assert head is not None and head.route.endpoint == "/v1/embeddings"
    assert head.headers["x-a"] == "b c" and head.end == len(plain) + 4 + 12
    assert head.keep_alive
    assert not parse(plain + b"\r\nConnection: close").keep_alive
    odd_fields = "\r\nX-Obs: caf\u00e9 \r\nX-Empty:\r\nX-Colon: a:b".encode() + b"\r\nX-Raw: \xff"
    odd = parse(plain + odd_fields)
    assert odd is not None
    assert odd.headers["x-obs"] == "caf\u00e9" and odd.headers["x-empty"] == ""
    assert odd.headers["x-colon"] == "a:b" and odd.headers["x-raw"] == "\udcff"
    assert parse(b"POST /v1/embeddings HTTP/1.1") is None  # no Content-Length
    for refused in (
        b"\r\nContent-Length: 12",  # twice
        b"\r\nTransfer-Encoding: chunked",
        b"\r\nUpgrade: h2c",
        b"\r\nBad Name: x",
        b"\r\n folded",
        b"\r\nX-B: a\rb",
        b"\r\nX-B: a\nb",
        b"\r\nX-B: a\x7fb",
        b"\r\n: no name",
        b"\r\nNo-Colon",
        b"\r\n",
    ):
        assert parse(plain + refused) is None, refused
    assert parse(plain.replace(b"12", b"1001")) is None  # over the limit: aiohttp answers 413
    assert parse(plain.replace(b"12", b"+12")) is None
    assert parse(plain.replace(b"12", "1\u00b2".encode())) is None  # int() refuses it
    assert parse(plain.replace(b"POST", b"GET")) is None
    models = b"GET /v1/models HTTP/1.1\r\nHost: x"
    listing = parse(models)
    assert listing is not None and listing.end == len(models) + 4
    assert parse(models + b"\r\nContent-Length: 0") is not None
    assert parse(models + b"\r\nContent-Length: 2") is None  # a GET with a body
    one = parse(models.replace(b"models", b"models/ft:gpt-4o:org/x"))
    assert one is not None and one.route.path == "/v1/models/ft:gpt-4o:org/x"
    for odd in (b"models/", b"models/a%2Fb", b"models/a?b=1", b"models/a b", b"models/caf\xc3\xa9"):
        assert parse(models.replace(b"models", odd)) is None, odd


def test_a_header_value_with_a_line_break_is_never_sent():
    head = head_bytes(200, {"X-Good": "fine", "X-Bad": "a\r\nSet-Cookie: x"}, "\r\n")
    assert head == b"HTTP/1.1 200 OK\r\nX-Good: fine\r\n\r\n"
    assert head_bytes(529, {}, "\r\n").startswith(b"HTTP/1.1 529 \r\n")
