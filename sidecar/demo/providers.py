"""Three demo providers served in-process on loopback, speaking the OpenAI wire format.

They stand in for real upstreams in ``tokenhub-sidecar demo``: different regions and prices,
shared models so routing and failover have choices, replies streamed token by token, usage
reported, and one provider ("cirrus") that answers 503 now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import string
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

from sidecar.demo.media import DemoMedia
from sidecar.demo.replies import (
    compose_reply,
    embedding_inputs,
    embedding_vector,
    encode_base64,
    message_text,
    message_tokens,
    prompt_tokens,
    seeded_rng,
    split_tokens,
)

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PREFIX_MEMORY = 4096
_ID_ALPHABET = string.ascii_letters + string.digits
_MODELS_CREATED = 1735689600  # 2025-01-01, a fixed "created" for the model list


@dataclass(frozen=True)
class DemoModel:
    """One model as a demo provider serves it, with the prices the demo config gives it."""

    public: str
    upstream: str
    input_per_mtok: str | None
    output_per_mtok: str | None = None
    cached_input_per_mtok: str | None = None
    kind: Literal["chat", "embedding", "image", "audio", "video"] = "chat"
    max_output_tokens: int | None = None
    dimensions: int = 1536
    per_image: str | None = None
    per_second: str | None = None
    per_mchar: str | None = None


@dataclass(frozen=True)
class DemoSpec:
    name: str
    region: str
    models: tuple[DemoModel, ...]
    failure_rate: float = 0.0

    def model(self, upstream: str) -> DemoModel | None:
        return next((m for m in self.models if m.upstream == upstream), None)


DEMO_SPECS: tuple[DemoSpec, ...] = (
    DemoSpec(
        name="aurora",
        region="eu",
        models=(
            DemoModel(
                "deepseek-v3.2", "deepseek-v3.2", "0.28", "0.42", "0.028", max_output_tokens=8192
            ),
            DemoModel("qwen3-max", "qwen3-max", "1.20", "6.00", "0.24", max_output_tokens=8192),
            DemoModel("text-embedding-3-small", "text-embedding-3-small", "0.02", kind="embedding"),
            DemoModel("gpt-image-1", "gpt-image-1", None, kind="image", per_image="0.04"),
            DemoModel("tts-1", "tts-1", None, kind="audio", per_mchar="15"),
            DemoModel("whisper-1", "whisper-1", None, kind="audio", per_second="0.0001"),
        ),
    ),
    DemoSpec(
        name="borealis",
        region="us",
        models=(
            DemoModel(
                "deepseek-v3.2",
                "deepseek-ai/DeepSeek-V3.2",
                "0.30",
                "0.45",
                "0.03",
                max_output_tokens=8192,
            ),
            DemoModel(
                "gpt-4o-mini", "gpt-4o-mini", "0.15", "0.60", "0.075", max_output_tokens=16384
            ),
            DemoModel(
                "text-embedding-3-small", "text-embedding-3-small", "0.025", kind="embedding"
            ),
            DemoModel("gpt-image-1", "gpt-image-1", None, kind="image", per_image="0.042"),
            DemoModel("sora-2", "sora-2", None, kind="video", per_second="0.10"),
        ),
    ),
    DemoSpec(
        name="cirrus",
        region="sg",
        models=(
            DemoModel(
                "deepseek-v3.2", "deepseek-v3.2", "0.25", "0.40", "0.025", max_output_tokens=8192
            ),
            DemoModel(
                "qwen3-max", "qwen3-max-2025-09-23", "1.00", "5.00", "0.20", max_output_tokens=8192
            ),
        ),
        failure_rate=0.1,
    ),
)
DEMO_ALIASES: dict[str, list[str]] = {"tokenhub-chat": ["deepseek-v3.2", "qwen3-max"]}


@dataclass(frozen=True)
class DemoProvider:
    name: str
    region: str
    url: str  # "http://127.0.0.1:PORT/v1"


class _Reject(Exception):
    """An OpenAI-shaped error answer, raised from deep inside a handler."""

    _TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None, param: str | None = None):
        super().__init__(message)
        self.response = web.json_response(
            {
                "error": {
                    "message": message,
                    "type": self._TYPES[status],
                    "param": param,
                    "code": code,
                }
            },
            status=status,
        )


@dataclass(frozen=True)
class _Choice:
    index: int
    pieces: list[str]
    finish_reason: str


@dataclass
class _DemoUpstream:
    """One demo provider's request handlers and the little state it keeps (its prompt cache)."""

    spec: DemoSpec
    rng: random.Random
    token_delay_s: float
    clock: Clock
    video_duration_s: float = 3.0
    seen_prefixes: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def routes(self) -> list[web.RouteDef]:
        media = DemoMedia(self.spec, self.rng, self.clock, self.video_duration_s)
        return [
            *media.routes(),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model_id:.+}", self.get_model),
        ]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._accept(request, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reject(400, "'messages' must be a non-empty array", None, "messages")
        last_user = next(
            (
                message_text(m)
                for m in reversed(messages)
                if isinstance(m, dict) and m.get("role") == "user"
            ),
            message_text(messages[-1]),
        )
        choices = self._choices(body, model, last_user, json.dumps(messages, sort_keys=True))
        prompt = sum(message_tokens(m) for m in messages) + 3
        usage = _usage(prompt, choices, self._cached_tokens(model, messages))
        head = self._head("chatcmpl-", "chat.completion", model)
        if body.get("stream") is True:
            return await self._stream(
                request, _chat_chunks(head, choices, usage, _wants_usage(body))
            )
        return web.json_response(
            {**head, "choices": [_chat_choice(c) for c in choices], "usage": usage}
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._accept(request, "chat")
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or prompt_tokens(prompt) == 0:
            raise _Reject(400, "'prompt' must be a non-empty string or array", None, "prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        choices = self._choices(body, model, text, text)
        usage = _usage(prompt_tokens(prompt), choices, 0)
        head = self._head("cmpl-", "text_completion", model)
        if body.get("stream") is True:
            return await self._stream(
                request, _text_chunks(head, choices, usage, _wants_usage(body))
            )
        return web.json_response(
            {**head, "choices": [_text_choice(c) for c in choices], "usage": usage}
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._accept(request, "embedding")
        inputs = embedding_inputs(body.get("input"))
        if inputs is None:
            raise _Reject(
                400, "'input' must be a string, an array of strings or of tokens", None, "input"
            )
        dimensions = _dimensions(body, model)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _Reject(
                400, "'encoding_format' must be 'float' or 'base64'", None, "encoding_format"
            )
        vectors = [embedding_vector(text, dimensions) for text in inputs]
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_base64(v) if encoding == "base64" else v,
            }
            for i, v in enumerate(vectors)
        ]
        tokens = prompt_tokens(body.get("input"))
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model.upstream,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [self._model_object(m) for m in self.spec.models]}
        )

    async def get_model(self, request: web.Request) -> web.Response:
        model = self.spec.model(request.match_info["model_id"])
        if model is None:
            raise _not_found(request.match_info["model_id"])
        return web.json_response(self._model_object(model))

    async def _accept(self, request: web.Request, kind: str) -> tuple[dict[str, Any], DemoModel]:
        if self.rng.random() < self.spec.failure_rate:
            raise _Reject(503, "The server is overloaded or not ready yet.", "overloaded")
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise _Reject(400, "We could not parse the JSON body of your request.", None) from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise _Reject(400, "you must provide a model parameter", None, "model")
        model = self.spec.model(body["model"])
        if model is None:
            raise _not_found(body["model"])
        if model.kind != kind:
            raise _Reject(
                400,
                f"{model.upstream} is an {model.kind} model; it is not supported on {request.path}",
                "unsupported_model",
                "model",
            )
        return body, model

    def _choices(
        self, body: dict[str, Any], model: DemoModel, prompt: str, key: str
    ) -> list[_Choice]:
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 8:
            raise _Reject(400, "'n' must be an integer from 1 to 8", None, "n")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        limit = limit if isinstance(limit, int) and limit > 0 else model.max_output_tokens
        fixed = body.get("temperature", 1) == 0
        choices = []
        for index in range(n):
            rng = seeded_rng(model.upstream, key, str(index)) if fixed else self.rng
            pieces = split_tokens(compose_reply(prompt, rng))
            cut = limit is not None and len(pieces) > limit
            choices.append(
                _Choice(index, pieces[:limit] if cut else pieces, "length" if cut else "stop")
            )
        return choices

    def _cached_tokens(self, model: DemoModel, messages: list[Any]) -> int:
        """Tokens of the longest message prefix this provider has seen (a warm prompt cache)."""
        cached, running = 0, 0
        digest = hashlib.sha256(model.upstream.encode())
        for message in messages:
            digest.update(json.dumps(message, sort_keys=True).encode())
            running += message_tokens(message)
            key = digest.hexdigest()
            if key in self.seen_prefixes:
                cached = running
                self.seen_prefixes.move_to_end(key)
            self.seen_prefixes[key] = None
        while len(self.seen_prefixes) > _PREFIX_MEMORY:
            self.seen_prefixes.popitem(last=False)
        return cached

    def _head(self, prefix: str, obj: str, model: DemoModel) -> dict[str, Any]:
        return {
            "id": prefix + "".join(self.rng.choices(_ID_ALPHABET, k=29)),
            "object": obj,
            "created": int(self.clock()),
            "model": model.upstream,
            "system_fingerprint": "fp_" + hashlib.sha256(self.spec.name.encode()).hexdigest()[:10],
        }

    def _model_object(self, model: DemoModel) -> dict[str, Any]:
        return {
            "id": model.upstream,
            "object": "model",
            "created": _MODELS_CREATED,
            "owned_by": self.spec.name,
        }

    async def _stream(
        self, request: web.Request, events: Iterator[tuple[dict[str, Any], bool]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            for event, is_token in events:
                if is_token and self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; a real model would stop generating too
        return response


def _not_found(model: str) -> _Reject:
    return _Reject(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "model_not_found",
        "model",
    )


def _dimensions(body: dict[str, Any], model: DemoModel) -> int:
    dimensions = body.get("dimensions", model.dimensions)
    if not isinstance(dimensions, int) or not 1 <= dimensions <= model.dimensions:
        raise _Reject(
            400, f"'dimensions' must be an integer from 1 to {model.dimensions}", None, "dimensions"
        )
    return dimensions


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt: int, choices: list[_Choice], cached: int) -> dict[str, Any]:
    completion = sum(len(c.pieces) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_choice(choice: _Choice) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(choice.pieces),
        "refusal": None,
        "annotations": [],
    }
    return {
        "index": choice.index,
        "message": message,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }


def _text_choice(choice: _Choice) -> dict[str, Any]:
    return {
        "text": "".join(choice.pieces),
        "index": choice.index,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }


def _chat_chunks(
    head: dict[str, Any], choices: list[_Choice], usage: dict[str, Any], with_usage: bool
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Chunks as (event, is_token): per choice a role chunk, one chunk per token, a finish chunk."""
    head = {**head, "object": "chat.completion.chunk", "service_tier": "default"}
    extra = {"usage": None} if with_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    for c in choices:
        yield chunk(c.index, {"role": "assistant", "content": "", "refusal": None}, None), False
        for piece in c.pieces:
            yield chunk(c.index, {"content": piece}, None), True
        yield chunk(c.index, {}, c.finish_reason), False
    if with_usage:
        yield {**head, "choices": [], "usage": usage}, False


def _text_chunks(
    head: dict[str, Any], choices: list[_Choice], usage: dict[str, Any], with_usage: bool
) -> Iterator[tuple[dict[str, Any], bool]]:
    extra = {"usage": None} if with_usage else {}

    def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    for c in choices:
        for piece in c.pieces:
            yield chunk(c.index, piece, None), True
        yield chunk(c.index, "", c.finish_reason), False
    if with_usage:
        yield {**head, "choices": [], "usage": usage}, False


@web.middleware
async def _render_rejections(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Reject as reject:
        return reject.response


def create_demo_app(
    spec: DemoSpec,
    *,
    rng: random.Random,
    token_delay_s: float = 0.015,
    clock: Clock = time.time,
    video_duration_s: float = 3.0,
) -> web.Application:
    """One demo provider as an aiohttp application (paths under ``/v1``)."""
    app = web.Application(middlewares=[_render_rejections])
    app.add_routes(_DemoUpstream(spec, rng, token_delay_s, clock, video_duration_s).routes())
    return app


class DemoProviders:
    """Starts the demo providers on 127.0.0.1 (free ports) and stops them on exit."""

    def __init__(
        self,
        *,
        seed: int = 0,
        token_delay_s: float = 0.015,
        specs: Sequence[DemoSpec] = DEMO_SPECS,
        clock: Clock = time.time,
        video_duration_s: float = 3.0,
    ) -> None:
        self._video_duration_s = video_duration_s
        self._seed = seed
        self._token_delay_s = token_delay_s
        self._specs = tuple(specs)
        self._clock = clock
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> list[DemoProvider]:
        try:
            return [await self._start(i, spec) for i, spec in enumerate(self._specs)]
        except BaseException:
            await self._stack.aclose()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _start(self, index: int, spec: DemoSpec) -> DemoProvider:
        rng = random.Random(f"{self._seed}:{index}:{spec.name}")
        app = create_demo_app(
            spec,
            rng=rng,
            token_delay_s=self._token_delay_s,
            clock=self._clock,
            video_duration_s=self._video_duration_s,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return DemoProvider(spec.name, spec.region, f"http://127.0.0.1:{port}/v1")


def demo_config(
    providers: Sequence[DemoProvider], *, listen: str, ledger_path: str
) -> dict[str, Any]:
    """The raw config mapping (the TOML's shape) for ``config.from_mapping()``."""
    specs = {spec.name: spec for spec in DEMO_SPECS}
    return {
        "server": {"listen": listen},
        "cache": {"mode": "deterministic"},
        "ledger": {"path": ledger_path},
        "providers": [_provider_entry(p, specs[p.name]) for p in providers],
        "aliases": _aliases({m.public for p in providers for m in specs[p.name].models}),
    }


def _aliases(served: set[str]) -> dict[str, list[str]]:
    """The demo aliases, keeping only models some started provider serves."""
    kept = {alias: [m for m in models if m in served] for alias, models in DEMO_ALIASES.items()}
    return {alias: models for alias, models in kept.items() if models}


def _provider_entry(provider: DemoProvider, spec: DemoSpec) -> dict[str, Any]:
    return {
        "name": provider.name,
        "base_url": provider.url,
        "region": provider.region,
        "models": {m.public: _model_entry(m) for m in spec.models},
    }


def _model_entry(model: DemoModel) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": model.kind, "upstream": model.upstream}
    prices = ("per_image", "per_second", "per_mchar")
    for key in (
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "max_output_tokens",
        *prices,
    ):
        value = getattr(model, key)
        if value is not None:
            entry[key] = value
    return entry
