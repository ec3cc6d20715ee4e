"""The lean HTTP/1.1 client against a raw asyncio server on 127.0.0.1, port 0, that answers each
request with scripted bytes: framing, keep-alive reuse, and every way an answer can go wrong."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
import zlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sidecar import h1
from sidecar.h1 import BodyCut, H1Pool, InvalidResponse

# A reply is a sequence of steps: bytes to send, a float to sleep, or CLOSE.
CLOSE = "close"
Step = bytes | float | str


def answer(body: bytes = b'{"ok":true}', *, head: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (len(body), head, body)
    )


class RawUpstream:
    """Answers each request (head plus Content-Length body) with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: deque[Sequence[Step]] = deque()
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self.ssl: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.popleft() if self.replies else [answer()]
                for step in reply:
                    if isinstance(step, bytes):
                        writer.write(step)
                        await writer.drain()
                    elif isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.close()
                        return
        finally:
            self._tasks.discard(task)
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    server = await RawUpstream().start()
    yield server
    await server.close()


def pool_for(url: str, **options: object) -> H1Pool:
    options.setdefault("read_timeout_s", 0.3)
    return H1Pool(
        url,
        {"User-Agent": "tokenhub-sidecar/test", "Authorization": "Bearer sk-test"},
        connect_timeout_s=2.0,
        **options,  # type: ignore[arg-type]
    )


async def post(pool: H1Pool, body: bytes = b'{"model":"m"}') -> tuple[int, bytes]:
    response = await pool.post("/chat/completions", "application/json", body)
    async with response:
        return response.status, await response.read()


async def test_answers_share_one_keep_alive_connection(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.extend([[answer(b'{"n":1}')], [answer(b'{"n":2}')], [answer(b'{"n":3}')]])
    results = [await post(pool, b'{"i":%d}' % i) for i in range(3)]
    assert results == [(200, b'{"n":1}'), (200, b'{"n":2}'), (200, b'{"n":3}')]
    assert upstream.connections == 1
    first = upstream.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    for header in (
        b"Host: 127.0.0.1:%d" % upstream.port,
        b"Authorization: Bearer sk-test",
        b"Content-Type: application/json",
        b"Content-Length: 7",
    ):
        assert header + b"\r\n" in first
    assert first.endswith(b'{"i":0}')
    pool.close()


async def test_response_head_is_read_case_insensitively(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([answer(head=b"retry-after: 2\r\nX-Thing: a\r\nx-thing: b\r\n")])
    response = await pool.post("/chat/completions", "application/json", b"{}")
    async with response:
        await response.read()
    assert response.headers["Retry-After"] == "2"
    assert response.headers.getall("X-THING") == ["a", "b"]
    pool.close()


@pytest.mark.parametrize(
    ("reply", "body"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n",
            b"hello world",
            id="chunked with an extension and a trailer",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"",
            id="chunked and empty",
        ),
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer(b"after hints"),
            b"after hints",
            id="103 early hints skipped",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(gzip.compress(b'{"zipped":1}')), gzip.compress(b'{"zipped":1}')),
            b'{"zipped":1}',
            id="gzip decoded",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="204 has no body"),
    ],
)
async def test_body_framing(upstream: RawUpstream, reply: bytes, body: bytes) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([reply])
    upstream.replies.append([answer(b"next")])
    assert (await post(pool))[1] == body
    assert await post(pool) == (200, b"next")
    assert upstream.connections == 1  # framed exactly: the connection was reused
    pool.close()


async def test_connection_close_and_close_delimited_bodies_are_not_pooled(
    upstream: RawUpstream,
) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([b"HTTP/1.1 200 OK\r\n\r\nuntil the end", CLOSE])
    upstream.replies.append([answer(head=b"Connection: close\r\n"), CLOSE])
    upstream.replies.append([answer(b"third")])
    assert await post(pool) == (200, b"until the end")
    assert (await post(pool))[0] == 200
    assert await post(pool) == (200, b"third")
    assert upstream.connections == 3
    pool.close()


async def test_a_response_closed_unread_drops_its_connection(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\n", 0.05, b"busy"])
    response = await pool.post("/chat/completions", "application/json", b"{}")
    assert response.status == 503
    response.close()  # failover moves on without reading: the late body must not be reused
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


async def test_bytes_on_an_idle_connection_drop_it(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([answer(b"one"), 0.02, b"HTTP/1.1 200 OK\r\n"])
    assert await post(pool) == (200, b"one")
    await asyncio.sleep(0.05)
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        pytest.param([CLOSE], BodyCut, id="closed before the head"),
        pytest.param([b"SSH-2.0-OpenSSH\r\n\r\n"], InvalidResponse, id="not HTTP"),
        pytest.param([b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n"], InvalidResponse, id="bad header"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"], InvalidResponse, id="bad length"
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"],
            InvalidResponse,
            id="unsupported transfer coding",
        ),
        pytest.param([b"HTTP/1.1 200 OK\r\n", 1.0], TimeoutError, id="stall inside the head"),
        pytest.param([1.0], TimeoutError, id="stall before the head"),
    ],
)
async def test_failures_before_the_head(
    upstream: RawUpstream, reply: list[Step], error: type[Exception]
) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append(reply)
    with pytest.raises(error):
        await pool.post("/chat/completions", "application/json", b"{}")
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2  # the failed connection was not reused
    pool.close()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", CLOSE], BodyCut, id="cut"
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", 1.0], TimeoutError, id="stall"
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            BodyCut,
            id="bad chunk size",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"],
            BodyCut,
            id="not gzip",
        ),
    ],
)
async def test_failures_inside_the_body(
    upstream: RawUpstream, reply: list[Step], error: type[Exception]
) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append(reply)
    response = await pool.post("/chat/completions", "application/json", b"{}")
    assert response.status == 200
    with pytest.raises(error):
        async with response:
            await response.read()
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n", id="length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nX",
            id="chunked",
        ),
    ],
)
async def test_bytes_after_a_whole_body_keep_the_answer_but_drop_the_connection(
    upstream: RawUpstream, reply: bytes
) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([reply])
    assert await post(pool) == (200, b"ok")
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


async def test_a_slow_body_that_keeps_coming_is_not_timed_out(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())  # read timeout 0.3 s: a gap between bytes, not a total
    steps: list[Step] = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]
    for byte in b"abcde":
        steps += [0.15, bytes([byte])]
    upstream.replies.append(steps)
    assert await post(pool) == (200, b"abcde")
    pool.close()


async def test_a_refused_port_is_an_os_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(OSError) as caught:
        await pool_for(f"http://127.0.0.1:{port}/v1").post("/x", "application/json", b"{}")
    assert not isinstance(caught.value, BodyCut | TimeoutError)


async def test_cancelling_a_wait_drops_the_connection(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([0.2, answer(b"too late")])
    waiting = asyncio.ensure_future(pool.post("/chat/completions", "application/json", b"{}"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.25)  # the late answer arrives on a connection nobody will reuse
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


def make_certificate(directory: Path, name: str, alt_names: str) -> tuple[Path, Path]:
    """A self-signed certificate (key, cert) made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    key, cert = directory / f"{name}-key.pem", directory / f"{name}-cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
            "-addext", f"subjectAltName={alt_names}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1."""
    return make_certificate(tmp_path, "127.0.0.1", "IP:127.0.0.1")


async def test_https_verifies_the_certificate(certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    upstream = RawUpstream()
    upstream.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream.ssl.load_cert_chain(cert, key)
    await upstream.start()
    try:
        trusting = pool_for(
            upstream.url("https"), ssl_context=ssl.create_default_context(cafile=cert)
        )
        assert await post(trusting) == (200, b'{"ok":true}')
        assert await post(trusting) == (200, b'{"ok":true}')
        assert upstream.connections == 1
        trusting.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await pool_for(upstream.url("https")).post("/x", "application/json", b"{}")
    finally:
        await upstream.close()


def count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The host names the running loop is asked to look up (it still looks each one up)."""
    loop = asyncio.get_running_loop()
    asked: list[object] = []
    real = loop.getaddrinfo

    async def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        asked.append(host)
        return await real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


async def test_a_host_name_is_looked_up_once_for_a_burst_of_connections(
    upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = count_lookups(monkeypatch)
    for _ in range(8):
        upstream.replies.append([0.1, answer()])  # each answer waits: 8 at once need 8 connections
    pool = pool_for(f"http://localhost:{upstream.port}/v1", read_timeout_s=2.0)
    answers = await asyncio.gather(*(post(pool) for _ in range(8)))
    assert answers == [(200, b'{"ok":true}')] * 8
    assert upstream.connections == 8 and asked == ["localhost"]
    pool.close()
    literal = pool_for(upstream.url())
    assert await post(literal) == (200, b'{"ok":true}')
    assert asked == ["localhost"]  # an address in the URL is not looked up at all


async def test_a_host_name_is_looked_up_again_once_its_addresses_expire(
    upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = count_lookups(monkeypatch)
    monkeypatch.setattr(h1, "DNS_TTL_S", 0.05)
    pool = pool_for(f"http://localhost:{upstream.port}/v1", keepalive_s=0)
    assert await post(pool) == (200, b'{"ok":true}')
    assert await post(pool) == (200, b'{"ok":true}')
    assert len(asked) == 1
    await asyncio.sleep(0.1)
    assert await post(pool) == (200, b'{"ok":true}')
    assert asked == ["localhost", "localhost"] and upstream.connections == 3


async def test_a_host_name_none_of_whose_addresses_answers_is_looked_up_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = count_lookups(monkeypatch)
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    pool = pool_for(f"http://localhost:{port}/v1")
    for _ in range(2):
        with pytest.raises(OSError) as caught:
            await pool.post("/x", "application/json", b"{}")
        assert not isinstance(caught.value, BodyCut | TimeoutError)
    assert asked == ["localhost", "localhost"]


async def test_https_to_a_host_name_checks_that_name(tmp_path: Path) -> None:
    key, cert = make_certificate(tmp_path, "localhost", "DNS:localhost")  # not for 127.0.0.1
    upstream = RawUpstream()
    upstream.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream.ssl.load_cert_chain(cert, key)
    await upstream.start()
    trust = ssl.create_default_context(cafile=cert)
    try:
        by_name = pool_for(f"https://localhost:{upstream.port}/v1", ssl_context=trust)
        assert await post(by_name) == (200, b'{"ok":true}')  # to 127.0.0.1, as localhost
        by_name.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await pool_for(upstream.url("https"), ssl_context=trust).post("/x", "text/plain", b"")
    finally:
        await upstream.close()


async def test_idle_connections_past_keep_alive_are_dropped(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url(), keepalive_s=0.1)
    upstream.replies.extend([[0.05, answer(b"slow")], [answer(b"quick")]])
    slow = asyncio.ensure_future(post(pool))
    await asyncio.sleep(0.01)
    assert await post(pool) == (200, b"quick")  # a second connection, now idle
    assert await slow == (200, b"slow")  # the first one goes idle too
    assert upstream.connections == 2
    await asyncio.sleep(0.15)  # both are past keep-alive
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 3
    assert await post(pool) == (200, b'{"ok":true}')  # the new one is pooled, the old ones gone
    assert upstream.connections == 3
    pool.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def read_stream(pool: H1Pool) -> list[bytes]:
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    pieces = []
    async with response:
        while piece := await response.content.readany():
            pieces.append(piece)
    return pieces


async def test_a_stream_is_read_as_it_comes_then_pooled(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())  # read timeout 0.3 s: it does not apply after a stream's head
    upstream.replies.append(
        [
            STREAM_HEAD + chunk(b"data: 1\n\n"),
            0.05,
            chunk(b"data: 2\n\n"),
            0.5,
            chunk(b"data: 3\n\n") + b"0\r\n\r\n",
        ]
    )
    assert await read_stream(pool) == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 1
    pool.close()


class RecordingSink:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        assert not self.ended.done(), "data after the end"
        self.pieces.append(data)

    def on_end(self, error: Exception | None) -> None:
        self.ended.set_result(error)


async def test_a_pushed_stream_gets_each_read_whole_and_then_its_end(
    upstream: RawUpstream,
) -> None:
    pool = pool_for(upstream.url())
    three = chunk(b"data: 2\n\n") + chunk(b"data: 3\n\n") + chunk(b"data: 4\n\n")
    upstream.replies.append([STREAM_HEAD + chunk(b"data: 1\n\n"), 0.1, three, 0.1, b"0\r\n\r\n"])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    await asyncio.sleep(0.05)  # the first chunk waits in the feed: it is pushed at once
    sink = RecordingSink()
    response.push_to(sink)
    assert sink.pieces == [b"data: 1\n\n"]
    assert await asyncio.wait_for(sink.ended, 2) is None
    assert sink.pieces == [b"data: 1\n\n", b"data: 2\n\ndata: 3\n\ndata: 4\n\n"]
    response.close()
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 1  # read to its end: pooled
    pool.close()


async def test_a_pushed_stream_that_is_cut_ends_with_the_cut(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([STREAM_HEAD + chunk(b"data: 1\n\n"), 0.1, CLOSE])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    sink = RecordingSink()
    response.push_to(sink)
    assert isinstance(await asyncio.wait_for(sink.ended, 2), BodyCut)
    assert b"".join(sink.pieces) == b"data: 1\n\n"
    response.close()
    pool.close()


async def test_a_gzip_stream_is_decoded_as_it_comes(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    first = packer.compress(b"data: one\n\n") + packer.flush(zlib.Z_SYNC_FLUSH)
    rest = packer.compress(b"data: two\n\n") + packer.flush()
    head = STREAM_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
    upstream.replies.append([head + chunk(first), 0.05, chunk(rest) + b"0\r\n\r\n"])
    assert b"".join(await read_stream(pool)) == b"data: one\n\ndata: two\n\n"
    pool.close()


async def test_a_cut_stream_raises_and_is_not_pooled(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([STREAM_HEAD + chunk(b"data: 1\n\n"), 0.05, CLOSE])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    async with response:
        assert await response.readany() == b"data: 1\n\n"
        with pytest.raises(BodyCut):
            await response.readany()
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


async def test_closing_a_stream_wakes_its_reader(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([STREAM_HEAD + chunk(b"data: 1\n\n"), 5.0])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    assert await response.readany() == b"data: 1\n\n"
    reading = asyncio.ensure_future(response.readany())
    await asyncio.sleep(0.05)
    response.close()  # as the idle sweep does to a stalled stream
    with pytest.raises(BodyCut):
        await asyncio.wait_for(reading, 1.0)
    pool.close()


async def test_a_slow_reader_gets_every_byte(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    blob = bytes(range(256)) * 16384  # 4 MiB: past the feed's high-water mark, so reads pause
    upstream.replies.append([STREAM_HEAD + chunk(blob) + b"0\r\n\r\n"])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    received = bytearray()
    async with response:
        await asyncio.sleep(0.2)
        while piece := await response.readany():
            received += piece
            await asyncio.sleep(0)
    assert received == blob
    pool.close()


async def test_an_error_answer_to_a_stream_reads_whole(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append(
        [b"HTTP/1.1 429 Too Many\r\nContent-Length: 9\r\n\r\n", 0.05, b'{"e":429}']
    )
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    async with response:
        assert (response.status, await response.read()) == (429, b'{"e":429}')
    pool.close()


async def test_a_large_chunk_is_passed_on_as_it_arrives(upstream: RawUpstream) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append([STREAM_HEAD + b"12\r\ndata: 1\n\n", 0.2, b"data: 2\n\n\r\n0\r\n\r\n"])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    async with response:
        first = await asyncio.wait_for(response.readany(), 0.15)  # before the rest is sent
        assert first == b"data: 1\n\n"
        assert await response.readany() == b"data: 2\n\n"
        assert await response.readany() == b""
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 1
    pool.close()


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (chunk(b"data: 2\n\n"), b"data: 2\n\n"),  # one whole chunk: the buffer is skipped
        (b"9;ext=1\r\ndata: 2\n\n\r\n", b"data: 2\n\n"),  # an extension: the full decoder
        (chunk(b"data: 2\n\n") + chunk(b"data: 3\n\n"), b"data: 2\n\ndata: 3\n\n"),
        (chunk(b"data: 2\n\n") + b"9\r\ndata", b"data: 2\n\ndata: 3\n\n"),  # and a half
        (b" 9\r\ndata: 2\n\n\r\n", b"data: 2\n\n"),  # space around the size: the full decoder
    ],
)
async def test_reads_between_chunks_decode_alike(
    upstream: RawUpstream, read: bytes, expected: bytes
) -> None:
    rest = (b": 3\n\n\r\n" if read.endswith(b"data") else b"") + b"0\r\n\r\n"
    upstream.replies.append([STREAM_HEAD + chunk(b"data: 1\n\n"), 0.05, read, 0.05, rest])
    pool = pool_for(upstream.url())
    assert b"".join(await read_stream(pool)) == b"data: 1\n\n" + expected
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 1
    pool.close()


@pytest.mark.parametrize(
    ("read", "passed_on"),
    [
        (b"9\r\ndata: 2\n\nXY", b"data: 2\n\n"),  # the data goes on as it comes, then the cut
        (b"9\r\ndata: 2\n\n\n\r", b"data: 2\n\n"),
        (b"-9\r\ndata: 2\n\n\r\n", b""),
        (b"+9\r\ndata: 2\n\n\r\n", b""),
        (b"0x9\r\ndata: 2\n\n\r\n", b""),
        (b"1_0\r\ndata: 2\n\n\r\n", b""),
    ],
)
async def test_a_whole_looking_read_that_is_not_a_chunk_cuts_the_stream(
    upstream: RawUpstream, read: bytes, passed_on: bytes
) -> None:
    upstream.replies.append([STREAM_HEAD + chunk(b"data: 1\n\n"), 0.05, read, 1.0])
    pool = pool_for(upstream.url())
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    received = b""
    async with response:
        with pytest.raises(BodyCut):
            while True:
                received += await asyncio.wait_for(response.readany(), 0.5)
    assert received == b"data: 1\n\n" + passed_on
    pool.close()


async def test_a_finished_stream_is_pooled_once_its_end_follows(upstream: RawUpstream) -> None:
    """``finish()`` after the last event: what else the body brings is dropped, and the
    connection is pooled at the body's end (``close()`` would drop it)."""
    pool = pool_for(upstream.url())
    late = chunk(b"data: late\n\n") + b"0\r\n\r\n"
    upstream.replies.append([STREAM_HEAD + chunk(b"data: [DONE]\n\n"), 0.2, late])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    assert await response.readany() == b"data: [DONE]\n\n"
    response.finish(2.0)
    with pytest.raises(BodyCut):
        await response.readany()  # the response is over for its reader
    await asyncio.sleep(0.4)
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 1
    pool.close()


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param([STREAM_HEAD + chunk(b"data: [DONE]\n\n"), 5.0], id="end never comes"),
        pytest.param([STREAM_HEAD + chunk(b"data: [DONE]\n\n"), 0.05, CLOSE], id="cut"),
        pytest.param(
            [STREAM_HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), 0.05],
            id="not keep-alive",
        ),
    ],
)
async def test_a_finished_stream_whose_end_does_not_come_well_is_dropped(
    upstream: RawUpstream, reply: list[Step]
) -> None:
    pool = pool_for(upstream.url())
    upstream.replies.append(reply)
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    response.finish(0.2)
    await asyncio.sleep(0.5)
    assert await post(pool) == (200, b'{"ok":true}')
    assert upstream.connections == 2
    pool.close()


async def test_a_closed_pool_takes_no_connection_back(upstream: RawUpstream) -> None:
    """A stream that finishes after its pool was closed (a reload) drops its connection."""
    pool = pool_for(upstream.url())
    upstream.replies.append([STREAM_HEAD + chunk(b"data: [DONE]\n\n"), 0.1, b"0\r\n\r\n"])
    response = await pool.post("/chat/completions", "application/json", b"{}", stream=True)
    response.finish(2.0)
    pool.close()
    await asyncio.sleep(0.3)
    assert upstream.connections == 1
    assert not pool._idle
