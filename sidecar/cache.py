"""The response cache (byte-bounded LRU with a TTL), its key and policy, and single-flight.

Entries are stored as the orjson bytes of the non-stream answer, so ``max_bytes`` bounds what is
really held and a caller can never mutate a cached body through a returned dict.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import cachetools
import orjson

from sidecar.config import CacheConfig
from sidecar.errors import InvalidRequest

T = TypeVar("T")
Directive = Literal["default", "no-cache", "no-store"]

CACHEABLE_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
DETERMINISTIC_ENDPOINTS = frozenset({"/v1/embeddings"})
# Fields that change how an answer is delivered, not what it is (SPEC "Cache consistency").
KEY_DENY_LIST = frozenset({"stream", "stream_options", "user"})
NORMAL_FINISH = frozenset({"stop", "length"})
TOOL_FINISH = frozenset({"tool_calls", "function_call"})
_DIRECTIVES: tuple[Directive, ...] = ("default", "no-cache", "no-store")
_STRENGTH: Mapping[Directive, int] = {"default": 0, "no-cache": 1, "no-store": 2}
_ENTRY_OVERHEAD = 128  # rough bytes for the entry object, its metadata and the key
_SAFE_INT = 2**53


def directive(x_tokenhub_cache: str | None, cache_control: str | None) -> Directive:
    """The stronger of the two headers wins: either can only narrow what the cache may do."""
    own = _own_directive(x_tokenhub_cache)
    http = _cache_control_directive(cache_control)
    return own if _STRENGTH[own] >= _STRENGTH[http] else http


def _own_directive(value: str | None) -> Directive:
    if value is None or not value.strip():
        return "default"
    wanted = value.strip().lower()
    for known in _DIRECTIVES:
        if wanted == known:
            return known
    raise InvalidRequest(
        f"X-TokenHub-Cache: {value.strip()!r} is not one of default, no-cache, no-store",
        param="X-TokenHub-Cache",
    )


def _cache_control_directive(value: str | None) -> Directive:
    if not value:
        return "default"
    tokens = {part.strip().lower() for part in value.split(",")}
    if "no-store" in tokens:
        return "no-store"
    if "no-cache" in tokens or "max-age=0" in tokens:
        return "no-cache"
    return "default"


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to look the request up and whether to store its answer; ``reason`` says why."""

    lookup: bool
    store: bool
    reason: str

    @property
    def bypass(self) -> bool:
        return not self.lookup


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A complete non-stream OpenAI response and where it came from."""

    endpoint: str
    body: dict[str, Any]
    provider: str
    region: str
    model: str
    upstream_model: str
    size: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the cache's counters; ``bytes`` and ``entries`` are current values."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    rejected: int = 0
    bytes: int = 0
    entries: int = 0


@dataclass(slots=True)
class _Counters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class _Entry:
    endpoint: str
    raw: bytes
    provider: str
    region: str
    model: str
    upstream_model: str
    size: int


def _entry_size(raw: bytes, *names: str) -> int:
    return len(raw) + sum(len(n) for n in names) + _ENTRY_OVERHEAD


class _ByteLRU(cachetools.TTLCache[str, _Entry]):
    """TTLCache (LRU order) sized by entry bytes, counting evictions made for room."""

    def __init__(
        self, counters: _Counters, max_bytes: int, ttl: float, timer: Callable[[], float]
    ) -> None:
        super().__init__(maxsize=max_bytes, ttl=ttl, timer=timer, getsizeof=_size_of)
        self._counters = counters

    def popitem(self) -> tuple[str, _Entry]:
        item = super().popitem()
        self._counters.evictions += 1
        return item


def _size_of(entry: _Entry) -> int:
    return entry.size


CACHE_OFF = Decision(False, False, "cache off")


class ResponseCache:
    """The response cache: policy (``decide``), key, and a byte-bounded LRU with a TTL."""

    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._counters = _Counters()
        self._entries = _ByteLRU(self._counters, config.max_bytes, config.ttl_s, clock)

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def stats(self) -> CacheStats:
        c = self._counters
        return CacheStats(
            c.hits,
            c.misses,
            c.stores,
            c.evictions,
            c.rejected,
            int(self._entries.currsize),
            len(self._entries),
        )

    def decide(self, endpoint: str, body: Mapping[str, Any], directive: Directive) -> Decision:
        if self._config.mode == "off":
            return CACHE_OFF
        if directive == "no-store":
            return Decision(False, False, "no-store")
        why_not = self._not_cacheable(endpoint, body)
        if why_not:
            return Decision(False, False, why_not)
        if directive == "no-cache":
            return Decision(False, True, "no-cache")
        return Decision(True, True, "cacheable")

    def _not_cacheable(self, endpoint: str, body: Mapping[str, Any]) -> str | None:
        if endpoint not in CACHEABLE_ENDPOINTS:
            return f"{endpoint} is not cached"
        if self._config.mode == "all" or endpoint in DETERMINISTIC_ENDPOINTS:
            return None
        temperature = body.get("temperature")
        if not _is_number(temperature) or temperature != 0:
            return "deterministic mode: temperature is not 0"
        n = body.get("n")
        if n is not None and (not _is_number(n) or n != 1):
            return "deterministic mode: n > 1"
        return None

    def key(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        scope_key: str,
        client_token: str | None,
    ) -> str:
        """sha256 of the canonical request: stable across processes and key orders."""
        material = {
            "endpoint": endpoint,
            "body": {k: _canonical(v) for k, v in body.items() if k not in KEY_DENY_LIST},
            "scope": scope_key,
            "client": _token_digest(client_token),
        }
        return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def get(self, key: str, allows: Callable[[str, str], bool]) -> CachedAnswer | None:
        """The live entry under ``key`` if ``allows(provider, model)``; anything else is a miss."""
        answer = self.peek(key, allows)
        if answer is None:
            self._counters.misses += 1
        else:
            self._counters.hits += 1
        return answer

    def peek(self, key: str, allows: Callable[[str, str], bool]) -> CachedAnswer | None:
        """Like ``get`` but not counted as a hit or miss (a leader reading back its own store)."""
        entry = self._entries.get(key)
        if entry is None or not allows(entry.provider, entry.model):
            return None
        return CachedAnswer(
            entry.endpoint,
            orjson.loads(entry.raw),
            entry.provider,
            entry.region,
            entry.model,
            entry.upstream_model,
            entry.size,
        )

    def storable(self, body: Mapping[str, Any]) -> bool:
        if "error" in body:
            return False
        kind = body.get("object")
        if kind == "list":
            return isinstance(body.get("data"), list) and bool(body["data"])
        if kind not in ("chat.completion", "text_completion"):
            return False
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            return False
        return all(self._choice_storable(c) for c in choices)

    def _choice_storable(self, choice: Any) -> bool:
        if not isinstance(choice, Mapping):
            return False
        finish = choice.get("finish_reason")
        calls_tools = finish in TOOL_FINISH or _has_tool_calls(choice.get("message"))
        if calls_tools:
            return self._config.cache_tool_calls and finish in NORMAL_FINISH | TOOL_FINISH
        return finish in NORMAL_FINISH

    def store(
        self,
        key: str,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        provider: str,
        region: str,
        model: str,
        upstream_model: str,
    ) -> None:
        """Store ``body`` (serialized once, here); one larger than ``max_bytes`` is not stored."""
        raw = orjson.dumps(body)
        size = _entry_size(raw, provider, region, model, upstream_model)
        if size > self._config.max_bytes:
            self._counters.rejected += 1
            return
        self._entries[key] = _Entry(endpoint, raw, provider, region, model, upstream_model, size)
        self._counters.stores += 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _has_tool_calls(message: Any) -> bool:
    if not isinstance(message, Mapping):
        return False
    return bool(message.get("tool_calls")) or bool(message.get("function_call"))


def _token_digest(token: str | None) -> str | None:
    # The key never carries the token itself, only a digest of it.
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-equal values hash equal (0 and 0.0); ints beyond orjson's range stay distinct."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < _SAFE_INT else value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else {"$int": str(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


class _LeaderGone(Exception):
    """The leader was cancelled before it had a result: followers retry on their own."""


class SingleFlight:
    """Identical keys in flight at once share one call; nothing stays behind when it ends."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``(result, shared)``: the result is shared with the other waiters, so do not mutate
        it; an exception from ``call`` is raised to every waiter."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, call), False
            try:
                result: T = await asyncio.shield(flight)
            except _LeaderGone:
                continue
            return result, True

    async def _lead(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        flight: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            result = await call()
        except asyncio.CancelledError:
            flight.set_exception(_LeaderGone(key))
            raise
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if flight.done() and not flight.cancelled():
                flight.exception()  # marks it retrieved when no follower was waiting
