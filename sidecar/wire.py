"""The OpenAI wire format: the few body fields we act on, SSE framing, error bodies.

Everything else in a request body is forwarded untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .errors import InvalidJSON, InvalidRequest

SSE_DONE = b"data: [DONE]\n\n"
JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream"


def parse_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(
            f"The request body is not valid JSON ({exc.msg} at position {exc.pos}); "
            "send a JSON object with Content-Type: application/json."
        ) from None
    if not isinstance(body, dict):
        raise InvalidJSON(
            f"The request body is a JSON {type(body).__name__}, not an object; "
            'send an object such as {"model": "...", ...}.'
        )
    return body


def model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest(
            "The request has no `model`; set it to a model name, provider/model or an alias "
            "(GET /v1/models lists them).",
            param="model",
        )
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("`model` must be a non-empty string.", param="model")
    return model.strip()


# Fields some SDKs and proxies use to choose the upstream or its credentials. The config alone
# decides where a request goes and with which key (cf. LiteLLM's CVE-2024-6587).
REDIRECTING_FIELDS = ("api_base", "base_url", "api_key", "extra_headers")


def reject_redirecting_fields(body: Mapping[str, Any]) -> None:
    for name in REDIRECTING_FIELDS:
        if name in body:
            raise InvalidRequest(
                f"`{name}` is not accepted: the sidecar sends requests only to the providers in "
                "its config, with their stored keys. Remove the field from the request body.",
                param=name,
            )


def wants_stream(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false.", param="stream")
    return stream


def wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def max_tokens_of(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def mime_type(content_type: str) -> str:
    """The media type of a Content-Type header, parameters dropped (JSON when absent)."""
    return content_type.split(";", 1)[0].strip() or JSON_TYPE


def error_body(message: str, *, type: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def sse_event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_data(payload: bytes) -> bytes:
    """An event carrying ``payload`` as received: data that spanned several ``data:`` lines
    upstream (SSE allows it) goes out on as many, so the client joins it back the same way."""
    if 10 in payload:  # b"\n"; an int test, as bytes-in-bytes is slow on Python 3.11
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


STREAM_INTERRUPTED = sse_event(
    {
        "error": {
            "message": (
                "upstream stream interrupted; the answer above is incomplete, retry the request"
            ),
            "type": "upstream_error",
            "param": None,
            "code": "stream_interrupted",
        }
    }
)


class SSEDecoder:
    """Splits an upstream byte stream into SSE events, keeping each event's raw bytes.

    Events are separated by a blank line; ``data:`` lines of one event are joined with newlines.
    Comment lines (``:``) and other fields are ignored but kept in the raw bytes.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""  # the start of an event still coming

    def feed(self, data: bytes) -> list[bytes]:
        """Each complete event's data payload, in order; events without data (comments,
        keep-alives) yield nothing."""
        buffer = self.pending + data if self.pending else data
        # ``13 in buffer`` tests a byte value: half the cost of ``find(b"\r")``, and a bytes
        # needle with ``in`` is worse (see Redactor.may_leak). A read that is one one-line event
        # then needs a single scan, for its first newline.
        if 13 in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        first = buffer.find(10)
        if first == len(buffer) - 2 and buffer[-1] == 10:  # one one-line event, as most reads
            self.pending = b""
            if buffer.startswith(b"data: "):
                return [buffer[6:first]]
            payload = _event_data(buffer[:first])
            return [payload] if payload is not None else []
        blocks = buffer.split(b"\n\n")
        self.pending = blocks.pop()  # the start of an event still coming, or b""
        events: list[bytes] = []
        for block in blocks:
            if (payload := _event_data(block)) is not None:
                events.append(payload)
        return events


def _event_data(block: bytes) -> bytes | None:
    if block.startswith(b"data: ") and block.find(b"\n") < 0:
        return block[6:]
    parts = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line.startswith(b"data: ") else line[5:])
    return b"\n".join(parts) if parts else None


def has_content(chunk: Mapping[str, Any]) -> bool:
    """True once a chunk carries something a user sees: the stream's commit point.

    Role-only and empty deltas are not content; a finish_reason is (an empty answer is an answer).
    """
    choices = chunk.get("choices")
    if not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():  # a role chunk's delta has two keys, not five
                if value and key in _CONTENT_KEYS:
                    return True
    return False


_CONTENT_KEYS = frozenset(
    ("content", "tool_calls", "refusal", "function_call", "reasoning_content")
)
