"""Model identifier + preference bounds + narrowing headers -> the targets a request may use.

Pure: values in, values out. Every route the sidecar takes (failover, stickiness, cache hits,
aliases) starts from a ``Scope`` built here, so no path can leave the bounds.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.config import ModelConfig, PreferencesConfig, ProviderConfig, Settings
from sidecar.errors import InvalidRequest, ModelNotFound, NoProviderInScope, OutsideBounds

REGIONS_HEADER = "X-TokenHub-Regions"
PROVIDERS_HEADER = "X-TokenHub-Providers"
OWNER = "tokenhub-sidecar"
LISTING_HINT = "GET /v1/models lists the models in scope"

ENDPOINTS_BY_KIND = {
    "chat": "POST /v1/chat/completions, /v1/completions or /v1/responses",
    "embedding": "POST /v1/embeddings",
    "image": "POST /v1/images/generations or /v1/images/edits",
    "audio": "POST /v1/audio/transcriptions or /v1/audio/speech",
    "video": "POST /v1/videos",
}


@dataclass(frozen=True, slots=True)
class Target:
    """One model at one provider: what a single attempt sends to."""

    provider: str
    region: str
    model: str
    upstream_model: str
    spec: ModelConfig
    weight: float


@dataclass(frozen=True, slots=True)
class Narrowing:
    """The per-request narrowing headers; ``providers`` keeps the header's (preferred) order."""

    regions: tuple[str, ...] | None = None
    providers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Exclusion:
    provider: str
    model: str
    why: str


@dataclass(frozen=True, slots=True)
class Scope:
    """The resolved request: targets inside the bounds, and why every other one is out."""

    requested: str
    targets: tuple[Target, ...]
    excluded: tuple[Exclusion, ...]
    pinned: bool
    preferred: tuple[str, ...] | None
    key: str

    def allows(self, provider: str, model: str) -> bool:
        for target in self.targets:
            if target.provider == provider and target.model == model:
                return True
        return False


NO_NARROWING = Narrowing()


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [part.strip() for part in value.split(",")]
    unique = tuple(dict.fromkeys(item for item in items if item))
    return unique or None


def _fold(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.casefold() for v in values)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def _preference_bound(provider: ProviderConfig, prefs: PreferencesConfig) -> str | None:
    """The [preferences] bound that excludes this provider, if any."""
    if provider.name in prefs.exclude_providers:
        return "[preferences].exclude_providers"
    if prefs.providers and provider.name not in prefs.providers:
        return f"[preferences].providers allows only {', '.join(prefs.providers)}"
    if prefs.regions and provider.region.casefold() not in _fold(prefs.regions):
        return f"[preferences].regions allows only {', '.join(prefs.regions)}"
    return None


def _narrowing_bound(provider: ProviderConfig, narrowing: Narrowing) -> str | None:
    if narrowing.providers is not None and provider.name not in narrowing.providers:
        return f"{PROVIDERS_HEADER}: {','.join(narrowing.providers)}"
    if narrowing.regions is not None and provider.region.casefold() not in _fold(narrowing.regions):
        return f"{REGIONS_HEADER}: {','.join(narrowing.regions)}"
    return None


def _model_bound(model: str, prefs: PreferencesConfig) -> str | None:
    if model in prefs.exclude_models:
        return "[preferences].exclude_models"
    if prefs.models and model not in prefs.models:
        return f"[preferences].models allows only {', '.join(prefs.models)}"
    return None


def parse_narrowing(regions: str | None, providers: str | None, settings: Settings) -> Narrowing:
    """Parse the narrowing headers; they may only narrow [preferences], never widen them."""
    if regions is None and providers is None:
        return NO_NARROWING
    narrowing = Narrowing(regions=_split(regions), providers=_split(providers))
    prefs = settings.preferences
    for name in narrowing.providers or ():
        provider = settings.provider(name)
        if provider is None:
            known = ", ".join(p.name for p in settings.providers) or "none"
            raise InvalidRequest(
                f"{PROVIDERS_HEADER} names {name!r}, which is not a configured provider "
                f"(known: {known}); fix the header or drop it"
            )
        bound = _preference_bound(provider, prefs)
        if bound is not None:
            raise OutsideBounds(
                f"{PROVIDERS_HEADER} names {name} ({provider.region}), which is outside the "
                f"bounds: {bound}; a narrowing header can only narrow them"
            )
    allowed_regions = _fold(prefs.regions)
    for region in narrowing.regions or ():
        if allowed_regions and region.casefold() not in allowed_regions:
            raise OutsideBounds(
                f"{REGIONS_HEADER} names {region}, which is outside the bounds: "
                f"[preferences].regions allows only {', '.join(prefs.regions)}; "
                "a narrowing header can only narrow them"
            )
    return narrowing


@dataclass(frozen=True, slots=True)
class _Served:
    """One (provider, model) pair the config knows, before any bound is applied."""

    provider: ProviderConfig
    model: str
    spec: ModelConfig

    def target(self) -> Target:
        p = self.provider
        return Target(p.name, p.region, self.model, self.spec.upstream, self.spec, p.weight)


MEMO_ENTRIES = 4096


class Catalog:
    """Indexes of one config's models, providers and aliases; resolves identifiers to scopes."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._prefs = settings.preferences
        self._providers = {p.name: p for p in settings.providers}
        by_model: dict[str, list[_Served]] = {}
        for provider in settings.providers:
            for model, spec in provider.models.items():
                by_model.setdefault(model, []).append(_Served(provider, model, spec))
        self._by_model = {m: tuple(s) for m, s in by_model.items()}
        self._aliases = dict(settings.aliases)
        self._memo: dict[tuple[str, Narrowing, frozenset[str] | None], Scope] = {}

    # -- resolve ---------------------------------------------------------------------------

    def resolve(
        self, requested: str, narrowing: Narrowing, *, kinds: frozenset[str] | None = None
    ) -> Scope:
        """Raise ModelNotFound, OutsideBounds, InvalidRequest or NoProviderInScope, or scope it.

        A catalog never changes (a reload builds a new one), so scopes are remembered.
        """
        memo_key = (requested, narrowing, kinds)
        scope = self._memo.get(memo_key)
        if scope is None:
            scope = self._resolve(requested, narrowing, kinds)
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[memo_key] = scope
        return scope

    def _resolve(self, requested: str, narrowing: Narrowing, kinds: frozenset[str] | None) -> Scope:
        requested = requested.strip()
        if "/" in requested:
            return self._resolve_pinned(requested, narrowing, kinds)
        if requested in self._by_model:
            models: tuple[str, ...] = (requested,)
        elif requested in self._aliases:
            models = self._aliases[requested]
        else:
            raise ModelNotFound(self._unknown_message(requested), param="model")
        return self._resolve_models(requested, models, narrowing, kinds)

    def _resolve_models(
        self,
        requested: str,
        models: tuple[str, ...],
        narrowing: Narrowing,
        kinds: frozenset[str] | None,
    ) -> Scope:
        excluded: list[Exclusion] = []
        candidates: list[_Served] = []
        for model in models:
            bound = _model_bound(model, self._prefs)
            if bound is None:
                candidates += self._by_model[model]
            else:
                served = self._by_model[model]
                excluded += [Exclusion(s.provider.name, model, bound) for s in served]
        if not candidates:
            raise OutsideBounds(self._model_outside_message(requested, models), param="model")
        candidates = self._fit_kinds(requested, candidates, kinds, excluded)
        targets: list[Target] = []
        for pair in candidates:
            why = _preference_bound(pair.provider, self._prefs) or _narrowing_bound(
                pair.provider, narrowing
            )
            if why is None:
                targets.append(pair.target())
            else:
                excluded.append(Exclusion(pair.provider.name, pair.model, why))
        if not targets:
            message = self._no_provider_message(requested, models, candidates, excluded)
            raise NoProviderInScope(message + self._alternatives(narrowing, kinds), param="model")
        return _scope(requested, targets, excluded, pinned=False, narrowing=narrowing)

    def _resolve_pinned(
        self, requested: str, narrowing: Narrowing, kinds: frozenset[str] | None
    ) -> Scope:
        name, _, model = requested.partition("/")
        provider = self._providers.get(name)
        if provider is None:
            raise ModelNotFound(
                f"{requested!r}: there is no provider named {name!r} "
                f"(known: {', '.join(self._providers) or 'none'}); {LISTING_HINT}",
                param="model",
            )
        spec = provider.models.get(model)
        if spec is None:
            raise ModelNotFound(
                f"{requested!r}: {name} does not serve {model!r} (it serves "
                f"{', '.join(provider.models)}); {LISTING_HINT}",
                param="model",
            )
        if _model_bound(model, self._prefs) is not None:
            raise OutsideBounds(self._model_outside_message(requested, (model,)), param="model")
        bound = _preference_bound(provider, self._prefs) or _narrowing_bound(provider, narrowing)
        if bound is not None:
            raise OutsideBounds(
                f"{requested} is pinned to {name} ({provider.region}), which is outside the "
                f"bounds: {bound}; a pinned model is never sent to another provider, so request "
                f"{model} without the provider prefix or widen the bounds",
                param="model",
            )
        self._fit_kinds(requested, [_Served(provider, model, spec)], kinds, [])
        others = [
            Exclusion(s.provider.name, model, f"pinned to {name}")
            for s in self._by_model[model]
            if s.provider.name != name
        ]
        target = _Served(provider, model, spec).target()
        return _scope(requested, [target], others, pinned=True, narrowing=narrowing)

    def _fit_kinds(
        self,
        requested: str,
        candidates: list[_Served],
        kinds: frozenset[str] | None,
        excluded: list[Exclusion],
    ) -> list[_Served]:
        if kinds is None:
            return candidates
        fitting = [s for s in candidates if s.spec.kind in kinds]
        if not fitting:
            kind = candidates[0].spec.kind
            raise InvalidRequest(
                f"{requested} is {_article(kind)} {kind} model, which "
                f"this endpoint does not serve; send it to {ENDPOINTS_BY_KIND[kind]}",
                param="model",
            )
        excluded += [
            Exclusion(
                s.provider.name,
                s.model,
                f"serves it as {_article(s.spec.kind)} {s.spec.kind} model",
            )
            for s in candidates
            if s.spec.kind not in kinds
        ]
        return fitting

    # -- messages --------------------------------------------------------------------------

    def _unknown_message(self, requested: str) -> str:
        names = list(self._by_model) + list(self._aliases)
        close = difflib.get_close_matches(requested, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"The model {requested!r} does not exist here; {hint}{LISTING_HINT}"

    def _model_outside_message(self, requested: str, models: tuple[str, ...]) -> str:
        bounds = sorted({b for m in models if (b := _model_bound(m, self._prefs))})
        subject = requested if models == (requested,) else f"{requested} ({', '.join(models)})"
        inside = sorted(self._models_inside(Narrowing(), None))
        return (
            f"{subject} is outside the bounds: {'; '.join(bounds)}. "
            + (f"Models inside the bounds: {', '.join(inside)}." if inside else "")
        ).strip()

    def _no_provider_message(
        self,
        requested: str,
        models: tuple[str, ...],
        candidates: list[_Served],
        excluded: list[Exclusion],
    ) -> str:
        subject = requested if models == (requested,) else f"{requested} ({', '.join(models)})"
        providers = dict.fromkeys(f"{s.provider.name} ({s.provider.region})" for s in candidates)
        pairs = {(s.provider.name, s.model) for s in candidates}
        by_why: dict[str, list[str]] = {}
        for ex in excluded:
            names = by_why.setdefault(ex.why, []) if (ex.provider, ex.model) in pairs else None
            if names is not None and ex.provider not in names:
                names.append(ex.provider)
        if len(by_why) == 1:
            reasons = next(iter(by_why))
        else:
            reasons = "; ".join(f"{why} (excludes {', '.join(ps)})" for why, ps in by_why.items())
        return f"{subject} is served by {_join(list(providers))}; {reasons}."

    def _alternatives(self, narrowing: Narrowing, kinds: frozenset[str] | None) -> str:
        inside = sorted(self._models_inside(narrowing, kinds))
        if not inside:
            return " No model is served inside the bounds; widen [preferences] or the headers."
        return f" Models served inside the bounds: {', '.join(inside)}."

    def _models_inside(self, narrowing: Narrowing, kinds: frozenset[str] | None) -> list[str]:
        return [
            model
            for model, served in self._by_model.items()
            if _model_bound(model, self._prefs) is None
            and any(self._in_bounds(s, narrowing, kinds) for s in served)
        ]

    def _in_bounds(
        self, served: _Served, narrowing: Narrowing, kinds: frozenset[str] | None
    ) -> bool:
        return (
            (kinds is None or served.spec.kind in kinds)
            and _preference_bound(served.provider, self._prefs) is None
            and _narrowing_bound(served.provider, narrowing) is None
        )

    # -- listing ---------------------------------------------------------------------------

    def listing(self, narrowing: Narrowing | None = None) -> list[dict[str, Any]]:
        """OpenAI Model objects for every bare name, provider/model form and alias in scope."""
        narrowing = narrowing or Narrowing()
        inside = set(self._models_inside(narrowing, None))
        bare = [_model_object(m, OWNER) for m in self._by_model if m in inside]
        pinned = [
            _model_object(f"{s.provider.name}/{m}", s.provider.name)
            for m, served in self._by_model.items()
            if m in inside
            for s in served
            if self._in_bounds(s, narrowing, None)
        ]
        aliases = [
            _model_object(alias, OWNER)
            for alias, models in self._aliases.items()
            if any(m in inside for m in models)
        ]
        return bare + pinned + aliases

    def model_entry(
        self, model_id: str, narrowing: Narrowing | None = None
    ) -> dict[str, Any] | None:
        return next((m for m in self.listing(narrowing) if m["id"] == model_id), None)


def _model_object(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def _scope(
    requested: str,
    targets: Sequence[Target],
    excluded: Sequence[Exclusion],
    *,
    pinned: bool,
    narrowing: Narrowing,
) -> Scope:
    key = ",".join(sorted(f"{t.provider}/{t.model}" for t in targets))
    return Scope(
        requested=requested,
        targets=tuple(targets),
        excluded=tuple(excluded),
        pinned=pinned,
        preferred=narrowing.providers,
        key=key,
    )
