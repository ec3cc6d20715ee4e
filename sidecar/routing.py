"""The route plan: order a scope's targets by health, then preference or affinity; pure.

Healthy (and half-open) providers come before ejected ones. Among each group the order is the
``X-TokenHub-Providers`` order if given, else weighted rendezvous hashing of the affinity key
(``sticky``), else the config's order. Alias models keep their order, each across its providers.
Every target comes from the scope, so a plan can never leave the bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from sidecar.health import HealthBook
from sidecar.scope import Scope, Target

_HASH_SPACE = float(2**64)


def affinity_key(header: str | None, body: Mapping[str, Any]) -> str:
    """The sticky-routing key: the header, else ``prompt_cache_key``, else the prompt's prefix."""
    if header and header.strip():
        return header.strip()
    cache_key = body.get("prompt_cache_key")
    if isinstance(cache_key, str) and cache_key:
        return cache_key
    digest = hashlib.blake2b(_canonical(_stable_prefix(body)), digest_size=16).hexdigest()
    return f"prefix:{digest}"


def _stable_prefix(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a request that repeats across turns: what a provider's prompt cache keys on."""
    prefix: dict[str, Any] = {"model": body.get("model"), "tools": body.get("tools")}
    messages = body.get("messages")
    if isinstance(messages, list):
        dicts = [m for m in messages if isinstance(m, dict)]
        prefix["system"] = [m.get("content") for m in dicts if m.get("role") in _SYSTEM_ROLES]
        prefix["user"] = next((m.get("content") for m in dicts if m.get("role") == "user"), None)
    else:
        prefix["instructions"] = body.get("instructions")
        prefix["input"] = body.get("prompt", body.get("input"))
    return prefix


_SYSTEM_ROLES = ("system", "developer")


def _canonical(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:  # orjson refuses integers beyond 64 bits, which JSON allows
        return json.dumps(value, sort_keys=True, default=str).encode()


def rendezvous_score(key: str, provider: str, weight: float) -> float:
    """Weighted rendezvous score ``-weight / ln(u)``, u uniform in (0, 1) from the hash."""
    digest = hashlib.blake2b(f"{key}\x00{provider}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _HASH_SPACE
    return -weight / math.log(u)


def _rank(scope: Scope, affinity: str, sticky: bool) -> tuple[list[str], str]:
    """Every provider of the scope in preference order, and the rule that ordered them."""
    weights: dict[str, float] = {}
    for target in scope.targets:
        weights.setdefault(target.provider, target.weight)
    config_order = list(weights)
    if sticky:
        rule = "sticky rendezvous rank"
        order = sorted(config_order, key=lambda p: (-rendezvous_score(affinity, p, weights[p]), p))
    else:
        rule, order = "config order", config_order
    if scope.preferred:
        rule = "X-TokenHub-Providers order"
        named = [p for p in scope.preferred if p in weights]
        order = named + [p for p in order if p not in named]
    return order, rule


def _ordered(
    scope: Scope, health: HealthBook, affinity: str, sticky: bool
) -> list[tuple[Target, str]]:
    """All targets in attempt order with a reason each; no cap, no de-duplication."""
    order, rule = _rank(scope, affinity, sticky)
    position = {p: i for i, p in enumerate(order)}
    ejected = {p for p in order if health.state(p) == "ejected"}
    # Alias models keep their order (sort is stable), each across its providers by rank.
    model_index = {m: i for i, m in enumerate(dict.fromkeys(t.model for t in scope.targets))}
    targets = sorted(
        scope.targets,
        key=lambda t: (t.provider in ejected, model_index[t.model], position[t.provider]),
    )
    return [(t, _why(t, health, rule, position[t.provider] + 1, scope)) for t in targets]


def _why(target: Target, health: HealthBook, rule: str, rank: int, scope: Scope) -> str:
    if scope.pinned:
        return f"pinned to {target.provider}; {health.describe(target.provider)}"
    state = health.state(target.provider)
    if state == "ejected":
        return f"{health.describe(target.provider)}; tried after the healthy ones"
    return f"{health.describe(target.provider)}; {rule} #{rank}"


def _capped(
    ordered: Sequence[tuple[Target, str]], max_providers: int
) -> tuple[list[tuple[Target, str]], list[tuple[Target, str]]]:
    """Keep each provider once and at most ``max_providers`` of them; say why the rest were cut."""
    kept: list[tuple[Target, str]] = []
    cut: list[tuple[Target, str]] = []
    chosen: dict[str, str] = {}
    for target, why in ordered:
        if target.provider in chosen:
            first = chosen[target.provider]
            why = f"{target.provider} is already a candidate for {first}; each provider once"
            cut.append((target, why))
        elif len(chosen) >= max_providers:
            cut.append((target, f"beyond routing.max_providers = {max_providers}"))
        else:
            chosen[target.provider] = target.model
            kept.append((target, why))
    return kept, cut


def needs_affinity(scope: Scope, *, sticky: bool) -> bool:
    """Whether ``plan`` will rank by affinity: worth computing the key only then."""
    if not sticky or scope.preferred or len(scope.targets) < 2:
        return False
    first = scope.targets[0].provider
    return any(t.provider != first for t in scope.targets)


def plan(
    scope: Scope, health: HealthBook, *, affinity: str, sticky: bool, max_providers: int
) -> list[Target]:
    """The targets to try, in order: never empty when the scope has targets."""
    if len(scope.targets) == 1:
        return [scope.targets[0]]
    kept, _ = _capped(_ordered(scope, health, affinity, sticky), max(1, max_providers))
    return [target for target, _ in kept]


def dry_run(
    scope: Scope, health: HealthBook, *, affinity: str, sticky: bool, max_providers: int
) -> dict[str, Any]:
    """The ``POST /-/route`` body: the plan with reasons, and every excluded target with why."""
    kept, cut = _capped(_ordered(scope, health, affinity, sticky), max(1, max_providers))
    candidates = [
        {
            "provider": t.provider,
            "model": t.model,
            "upstream_model": t.upstream_model,
            "why": why,
        }
        for t, why in kept
    ]
    excluded = [{"provider": e.provider, "model": e.model, "why": e.why} for e in scope.excluded]
    excluded += [{"provider": t.provider, "model": t.model, "why": why} for t, why in cut]
    return {"requested": scope.requested, "candidates": candidates, "excluded": excluded}
