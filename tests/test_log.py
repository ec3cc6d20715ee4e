"""Log lines: JSON when not a terminal, readable on one, and never carrying a secret."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import structlog

from sidecar import log


def emit(fmt: str, redactor: log.Redactor | None = None, **fields: object) -> str:
    out = io.StringIO()
    log.configure(format=fmt, level="info", redactor=redactor, stream=out)
    try:
        log.get_logger().info("request", **fields)
    finally:
        structlog.reset_defaults()
    return out.getvalue()


def test_auto_is_json_when_not_a_terminal():
    line = emit("auto", request_id="abc", status=200)
    assert json.loads(line) | {"timestamp": None} == {
        "event": "request",
        "request_id": "abc",
        "status": 200,
        "level": "info",
        "timestamp": None,
    }


def test_console_format_is_readable():
    line = emit("console", request_id="abc", status=200)
    assert "request" in line and "request_id=abc" in line
    assert not line.lstrip().startswith("{")


def test_secrets_are_redacted_in_every_field():
    redactor = log.Redactor(["k3y-configured-secret-value"])
    line = emit(
        "json",
        redactor,
        error="upstream said: invalid key k3y-configured-secret-value",
        header="Bearer abcdefghijklmnop",
        url="https://x.example/v1?key=hunter2hunter2",
        nested={"api_key": "sk-abcdefghijklmnopqrstuvwx"},
    )
    assert "k3y-configured-secret-value" not in line
    assert "abcdefghijklmnop" not in line
    assert "hunter2" not in line
    assert "sk-abcdefghijklmnopqrstuvwx" not in line
    assert line.count(log.REDACTED) == 4


def request_lines(redactor: log.Redactor, fmt: str, **fields: object) -> str:
    sink = io.BytesIO()
    request_log = log.RequestLog(format=fmt, redactor=redactor, stream=sink)
    request_log.write(dict(fields))
    request_log.flush()
    return sink.getvalue().decode()


def test_request_line_redacts_secrets_even_where_json_escapes_them():
    quoted = 'k3y"with\\escapes-and-more'
    redactor = log.Redactor(["plain-configured-key-0042", quoted])
    out = request_lines(
        redactor,
        "json",
        request_id="r1",
        path="/v1/chat/completions?x=plain-configured-key-0042",
        model=f"m-{quoted}",
        provider="sk-abcdefghijklmnop",
        status=200,
    )
    line = json.loads(out)
    assert "plain-configured-key-0042" not in out and "with\\\\escapes" not in out
    assert "sk-abcdefghijklmnop" not in out
    assert line["path"] == "/v1/chat/completions?x=[redacted]"
    assert line["model"] == "m-[redacted]"
    assert line["status"] == 200 and line["request_id"] == "r1"
    assert len(line["timestamp"]) == len("2026-11-27T10:00:00.123456Z")


def test_request_line_without_secrets_is_written_as_given():
    redactor = log.Redactor(["plain-configured-key-0042"])
    out = request_lines(redactor, "console", model="m", status=200)
    assert out.endswith("request  model=m status=200\n")


def test_utc_stamps_format_each_second_once_and_keep_microseconds():
    moments = iter([1_795_000_000.25, 1_795_000_000.5, 1_795_000_061.75])
    stamps = log.UtcStamps(lambda: next(moments))
    assert stamps.now() == "2026-11-18T11:06:40.250000Z"
    assert stamps.now() == "2026-11-18T11:06:40.500000Z"
    assert stamps.now() == "2026-11-18T11:07:41.750000Z"


class StalledSink:
    """A stream whose writes block until ``go`` is set: stderr piped to a stalled collector."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.go.wait(10)
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


async def test_a_stalled_stream_never_blocks_the_loop_and_drops_past_the_limit() -> None:
    sink = StalledSink()
    writer = log.BatchWriter(sink, limit_bytes=100)  # type: ignore[arg-type]
    batches = [b"line-%d-0123456789\n" % i for i in range(10)]  # 18 bytes each: 5 fit
    for batch in batches:
        writer.write(batch)  # a write that waited for the sink would hang here for 10 s
    assert sink.data == b""
    sink.go.set()
    await asyncio.to_thread(writer.close)
    lines = bytes(sink.data).splitlines()
    assert [line for line in lines if line.startswith(b"line-")] == [b.strip() for b in batches[:5]]
    [dropped] = [json.loads(line) for line in lines if not line.startswith(b"line-")]
    assert dropped["event"] == "request_log_dropped" and dropped["lines"] == 5
    writer.write(b"after close\n")  # written at once: no thread is left to do it
    assert bytes(sink.data).endswith(b"after close\n")


async def test_close_waits_a_bounded_time_for_a_stalled_stream_and_drops_what_follows() -> None:
    sink = StalledSink()
    writer = log.BatchWriter(sink)  # type: ignore[arg-type]
    writer.write(b"first\n")
    await asyncio.to_thread(writer.close, 0.1)  # returns although the sink still blocks
    writer.write(b"later\n")  # a stop must not hang on it: dropped, not written at once
    sink.go.set()
    async with asyncio.timeout(10):
        while bytes(sink.data) != b"first\n":
            await asyncio.sleep(0.01)
    assert b"later" not in sink.data
