"""Between stream and non-stream answers: assemble a stream into the equivalent response object,
and replay a stored response as the SSE chunks OpenAI would have streamed. Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
CHUNK_CHARS = 64
_HEADER_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": "".join(self.arguments)}
        return {"id": self.id, "type": self.type, "function": function}


@dataclass(slots=True)
class _Choice:
    role: str = "assistant"
    text: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    function_call: _ToolCall | None = None
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def feed_delta(self, delta: Mapping[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            if isinstance(call, Mapping):
                index = call.get("index", len(self.tool_calls))
                _feed_call(self.tool_calls.setdefault(index, _ToolCall()), call)
        if isinstance(delta.get("function_call"), Mapping):
            self.function_call = self.function_call or _ToolCall()
            _feed_call(self.function_call, {"function": delta["function_call"]})

    def feed_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, Mapping):
            return
        for name, values in logprobs.items():
            if isinstance(values, list):
                self.logprobs.setdefault(name, []).extend(values)

    def merged_logprobs(self, chat: bool) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if chat:
            return {name: self.logprobs.get(name) for name in ("content", "refusal")}
        return dict(self.logprobs)

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role,
            "content": "".join(self.text) if self.text else None,
            "refusal": "".join(self.refusal) if self.refusal else None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].result() for i in sorted(self.tool_calls)]
        if self.function_call is not None:
            call = self.function_call.result()["function"]
            message["function_call"] = call
        return message


def _feed_call(target: _ToolCall, call: Mapping[str, Any]) -> None:
    if isinstance(call.get("id"), str):
        target.id = call["id"]
    if isinstance(call.get("type"), str):
        target.type = call["type"]
    function = call.get("function")
    if isinstance(function, Mapping):
        if isinstance(function.get("name"), str):
            target.name += function["name"]
        if isinstance(function.get("arguments"), str):
            target.arguments.append(function["arguments"])


class StreamAssembler:
    """Builds the non-stream response object from the parsed chunks of one upstream stream."""

    def __init__(self) -> None:
        self._header: dict[str, Any] = {}
        self._object: str | None = None
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self._failed = False

    def feed(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk:
            self._failed = True
            return
        if self._object is None and isinstance(chunk.get("object"), str):
            self._object = chunk["object"]
        for name in _HEADER_FIELDS:
            if chunk.get(name) is not None:
                self._header.setdefault(name, chunk[name])
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for raw in chunk.get("choices") or ():
            if isinstance(raw, Mapping):
                self._feed_choice(raw)

    def _feed_choice(self, raw: Mapping[str, Any]) -> None:
        choice = self._choices.setdefault(int(raw.get("index", 0)), _Choice())
        if isinstance(raw.get("delta"), Mapping):
            choice.feed_delta(raw["delta"])
        if isinstance(raw.get("text"), str):
            choice.text.append(raw["text"])
        choice.feed_logprobs(raw.get("logprobs"))
        if raw.get("finish_reason") is not None:
            choice.finish_reason = raw["finish_reason"]

    def complete(self) -> dict[str, Any] | None:
        """The equivalent response, or None if any choice never finished (or an error came)."""
        if self._failed or not self._choices:
            return None
        if any(c.finish_reason is None for c in self._choices.values()):
            return None
        chat = self._object != "text_completion"
        body: dict[str, Any] = {
            "id": self._header.get("id", ""),
            "object": "chat.completion" if chat else "text_completion",
        }
        body["created"] = self._header.get("created", 0)
        body["model"] = self._header.get("model", "")
        body["choices"] = [self._choice_result(i, chat) for i in sorted(self._choices)]
        for name in ("system_fingerprint", "service_tier"):
            if name in self._header:
                body[name] = self._header[name]
        if self._usage is not None:
            body["usage"] = self._usage
        return body

    def _choice_result(self, index: int, chat: bool) -> dict[str, Any]:
        choice = self._choices[index]
        result: dict[str, Any] = {"index": index}
        if chat:
            result["message"] = choice.message()
        else:
            result["text"] = "".join(choice.text)
        result["logprobs"] = choice.merged_logprobs(chat)
        result["finish_reason"] = choice.finish_reason
        return result


def replay_chunks(
    answer_body: Mapping[str, Any], *, include_usage: bool, chunk_chars: int = CHUNK_CHARS
) -> list[bytes]:
    """The SSE events OpenAI would have streamed for this chat.completion or text_completion."""
    kind = answer_body.get("object")
    if kind == "chat.completion":
        payloads = list(_chat_chunks(answer_body, include_usage, chunk_chars))
    elif kind == "text_completion":
        payloads = list(_text_chunks(answer_body, include_usage, chunk_chars))
    else:
        raise ValueError(f"cannot replay a {kind!r} object as a stream")
    return [sse(p) for p in payloads] + [DONE]


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _base(body: Mapping[str, Any], kind: str, include_usage: bool) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": body.get("id", ""),
        "object": kind,
        "created": body.get("created", 0),
        "model": body.get("model", ""),
    }
    for name in ("service_tier", "system_fingerprint"):
        if name in body:
            base[name] = body[name]
    if include_usage:
        base["usage"] = None
    return base


def _usage_chunk(body: Mapping[str, Any], base: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    if body.get("usage") is not None:
        yield {**base, "choices": [], "usage": body["usage"]}


def _chat_chunks(
    body: Mapping[str, Any], include_usage: bool, size: int
) -> Iterator[dict[str, Any]]:
    base = _base(body, "chat.completion.chunk", include_usage)
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        for delta, logprobs in _chat_deltas(choice, size):
            yield {**base, "choices": [_chat_choice(index, delta, logprobs, None)]}
        yield {**base, "choices": [_chat_choice(index, {}, None, choice.get("finish_reason"))]}
    if include_usage:
        yield from _usage_chunk(body, base)


def _chat_choice(index: int, delta: dict[str, Any], logprobs: Any, finish: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _chat_deltas(choice: Mapping[str, Any], size: int) -> Iterator[tuple[dict[str, Any], Any]]:
    message = choice.get("message") or {}
    content, logprobs = message.get("content"), choice.get("logprobs")
    first = "" if isinstance(content, str) else None
    yield {"role": message.get("role", "assistant"), "content": first, "refusal": None}, None
    if content:
        # Logprobs belong to the whole content, so it then goes out in one piece with them.
        pieces = [content] if logprobs else _pieces(content, size)
        for n, piece in enumerate(pieces):
            yield {"content": piece}, logprobs if n == 0 else None
    if message.get("refusal"):
        for piece in _pieces(message["refusal"], size):
            yield {"refusal": piece}, None
    for i, call in enumerate(message.get("tool_calls") or ()):
        yield from _tool_call_deltas(i, call, size)
    if message.get("function_call"):
        function = message["function_call"]
        yield {"function_call": {"name": function.get("name", ""), "arguments": ""}}, None
        for piece in _pieces(function.get("arguments", ""), size):
            yield {"function_call": {"arguments": piece}}, None


def _tool_call_deltas(
    index: int, call: Mapping[str, Any], size: int
) -> Iterator[tuple[dict[str, Any], Any]]:
    function = call.get("function") or {}
    head = {
        "index": index,
        "id": call.get("id"),
        "type": call.get("type", "function"),
        "function": {"name": function.get("name", ""), "arguments": ""},
    }
    yield {"tool_calls": [head]}, None
    for piece in _pieces(function.get("arguments", ""), size):
        yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None


def _text_chunks(
    body: Mapping[str, Any], include_usage: bool, size: int
) -> Iterator[dict[str, Any]]:
    base = _base(body, "text_completion", include_usage)
    for choice in body.get("choices") or ():
        index, logprobs = choice.get("index", 0), choice.get("logprobs")
        text = choice.get("text") or ""
        pieces = [text] if logprobs else _pieces(text, size)
        for n, piece in enumerate(pieces):
            lp = logprobs if n == 0 else None
            yield {**base, "choices": [_text_choice(index, piece, lp, None)]}
        yield {**base, "choices": [_text_choice(index, "", None, choice.get("finish_reason"))]}
    if include_usage:
        yield from _usage_chunk(body, base)


def _text_choice(index: int, text: str, logprobs: Any, finish: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
