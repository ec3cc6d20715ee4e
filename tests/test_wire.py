"""The SSE decoder: events however the upstream's bytes are split into reads."""

from __future__ import annotations

import pytest

from sidecar.wire import SSEDecoder

STREAM = (
    b'data: {"a":1}\n\n: keep-alive\n\nevent: message\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n'
)
EVENTS = [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]  # the keep-alive carries no data: no event


def decode(reads: list[bytes]) -> list[bytes]:
    decoder = SSEDecoder()
    events: list[bytes] = []
    for data in reads:
        events.extend(decoder.feed(data))
    assert decoder.pending == b""
    return events


def test_one_read_per_event() -> None:
    reads = [event + b"\n\n" for event in STREAM.split(b"\n\n")[:-1]]
    assert decode(reads) == EVENTS


def test_all_events_in_one_read() -> None:
    assert decode([STREAM]) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_events_split_across_reads(size: int) -> None:
    assert decode([STREAM[i : i + size] for i in range(0, len(STREAM), size)]) == EVENTS


def test_crlf_line_endings() -> None:
    assert decode([STREAM.replace(b"\n", b"\r\n")]) == EVENTS


def test_an_unfinished_event_stays_pending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert decoder.pending == b'data: {"b"'
    assert decoder.feed(b":2}\n\n") == [b'{"b":2}']


def test_a_read_of_keep_alives_yields_no_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\n") == []
    assert decoder.feed(b": ping\n\n: ping\n\n") == []
    assert decoder.feed(b': ping\n\ndata: {"a":1}\n\n') == [b'{"a":1}']


@pytest.mark.parametrize(
    ("read", "events"),
    [
        (b"data:{}\n\n", [b"{}"]),  # no space after the colon
        (b"event: x\n\n", []),
        (b"data: {}\nX", []),  # a newline one byte from the end, but no blank line yet
        (b"\n\n", []),
    ],
)
def test_one_line_reads(read: bytes, events: list[bytes]) -> None:
    assert SSEDecoder().feed(read) == events
