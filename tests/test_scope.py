from __future__ import annotations

from typing import Any

import pytest

from sidecar import config, errors
from sidecar.scope import Catalog, Narrowing, Scope, parse_narrowing

CHAT = {"input_per_mtok": "0.28", "output_per_mtok": "0.42"}
EMBED = {"kind": "embedding", "input_per_mtok": "0.02"}


def make_settings(**preferences: Any) -> config.Settings:
    raw = {
        "preferences": preferences,
        "providers": [
            {
                "name": "alibaba",
                "base_url": "http://127.0.0.1:1/v1",
                "region": "cn",
                "models": {"deepseek-v3.2": CHAT, "qwen3-max": CHAT, "text-embed": EMBED},
            },
            {
                "name": "together",
                "base_url": "http://127.0.0.1:2/v1",
                "region": "us",
                "weight": 2,
                "models": {
                    "deepseek-v3.2": {**CHAT, "upstream": "deepseek-ai/DeepSeek-V3.2"},
                    "llama-4": CHAT,
                },
            },
            {
                "name": "mistral",
                "base_url": "http://127.0.0.1:3/v1",
                "region": "eu",
                "models": {"mistral-large": CHAT, "text-embed": EMBED},
            },
        ],
        "aliases": {"tokenhub-chat": ["deepseek-v3.2", "qwen3-max"]},
    }
    return config.from_mapping(raw, environ={})


def resolve(
    requested: str,
    headers: dict[str, str] | None = None,
    *,
    kinds: frozenset[str] | None = None,
    **preferences: Any,
) -> Scope:
    settings = make_settings(**preferences)
    headers = headers or {}
    narrowing = parse_narrowing(headers.get("regions"), headers.get("providers"), settings)
    return Catalog(settings).resolve(requested, narrowing, kinds=kinds)


def pairs(scope: Scope) -> list[tuple[str, str]]:
    return [(t.provider, t.model) for t in scope.targets]


# -- narrowing headers -----------------------------------------------------------------------


def test_narrowing_parses_and_keeps_order() -> None:
    settings = make_settings()
    narrowing = parse_narrowing(" eu , us,,eu", "together , alibaba", settings)
    assert narrowing == Narrowing(regions=("eu", "us"), providers=("together", "alibaba"))


def test_absent_or_blank_headers_do_not_narrow() -> None:
    assert parse_narrowing(None, " , ", make_settings()) == Narrowing()


@pytest.mark.parametrize(
    ("regions", "providers", "preferences", "error", "fragments"),
    [
        (None, "nope", {}, errors.InvalidRequest, ["'nope'", "not a configured provider"]),
        (
            None,
            "alibaba",
            {"exclude_providers": ["alibaba"]},
            errors.OutsideBounds,
            ["alibaba (cn)", "[preferences].exclude_providers", "only narrow"],
        ),
        (
            None,
            "together",
            {"providers": ["alibaba", "mistral"]},
            errors.OutsideBounds,
            ["together", "[preferences].providers allows only alibaba, mistral"],
        ),
        (
            None,
            "alibaba",
            {"regions": ["eu", "us"]},
            errors.OutsideBounds,
            ["alibaba (cn)", "[preferences].regions allows only eu, us"],
        ),
        (
            "eu,cn",
            None,
            {"regions": ["eu"]},
            errors.OutsideBounds,
            ["X-TokenHub-Regions names cn", "[preferences].regions allows only eu"],
        ),
    ],
)
def test_narrowing_errors(
    regions: str | None,
    providers: str | None,
    preferences: dict[str, Any],
    error: type[errors.SidecarError],
    fragments: list[str],
) -> None:
    with pytest.raises(error) as caught:
        parse_narrowing(regions, providers, make_settings(**preferences))
    for fragment in fragments:
        assert fragment in caught.value.message


def test_region_header_is_case_insensitive() -> None:
    assert pairs(resolve("deepseek-v3.2", {"regions": "US"})) == [("together", "deepseek-v3.2")]


# -- resolving identifiers -------------------------------------------------------------------


def test_bare_model_is_every_provider_in_config_order() -> None:
    scope = resolve("deepseek-v3.2")
    assert pairs(scope) == [("alibaba", "deepseek-v3.2"), ("together", "deepseek-v3.2")]
    assert scope.targets[1].upstream_model == "deepseek-ai/DeepSeek-V3.2"
    assert scope.targets[1].weight == 2
    assert scope.targets[1].region == "us"
    assert not scope.pinned and scope.excluded == ()


def test_pinned_model_goes_only_to_its_provider() -> None:
    scope = resolve("together/deepseek-v3.2")
    assert scope.pinned
    assert pairs(scope) == [("together", "deepseek-v3.2")]
    assert [(e.provider, e.why) for e in scope.excluded] == [("alibaba", "pinned to together")]
    assert scope.allows("together", "deepseek-v3.2")
    assert not scope.allows("alibaba", "deepseek-v3.2")


def test_alias_is_its_models_in_order_each_across_providers() -> None:
    scope = resolve("tokenhub-chat")
    assert pairs(scope) == [
        ("alibaba", "deepseek-v3.2"),
        ("together", "deepseek-v3.2"),
        ("alibaba", "qwen3-max"),
    ]


def test_bounds_exclude_with_reasons() -> None:
    scope = resolve("deepseek-v3.2", {"regions": "us,eu"}, exclude_providers=["mistral"])
    assert pairs(scope) == [("together", "deepseek-v3.2")]
    assert [(e.provider, e.why) for e in scope.excluded] == [
        ("alibaba", "X-TokenHub-Regions: us,eu")
    ]


def test_preferred_order_comes_from_the_providers_header() -> None:
    scope = resolve("deepseek-v3.2", {"providers": "together,alibaba"})
    assert scope.preferred == ("together", "alibaba")


def test_alias_skips_models_outside_the_model_bounds() -> None:
    scope = resolve("tokenhub-chat", exclude_models=["deepseek-v3.2"])
    assert pairs(scope) == [("alibaba", "qwen3-max")]
    assert {(e.provider, e.model, e.why) for e in scope.excluded} == {
        ("alibaba", "deepseek-v3.2", "[preferences].exclude_models"),
        ("together", "deepseek-v3.2", "[preferences].exclude_models"),
    }


def test_scope_key_names_the_allowed_set() -> None:
    full = resolve("deepseek-v3.2")
    assert full.key == "alibaba/deepseek-v3.2,together/deepseek-v3.2"
    assert resolve("deepseek-v3.2", {"regions": "us"}).key == "together/deepseek-v3.2"
    assert resolve("together/deepseek-v3.2").key == "together/deepseek-v3.2"
    assert resolve("deepseek-v3.2", {"providers": "together,alibaba"}).key == full.key


def test_kinds_exclude_misfits_but_keep_fitting_providers() -> None:
    scope = resolve("text-embed", kinds=frozenset({"embedding"}))
    assert pairs(scope) == [("alibaba", "text-embed"), ("mistral", "text-embed")]
    mixed = make_settings()
    catalog = Catalog(mixed.model_copy(update={"aliases": {"mix": ("text-embed", "llama-4")}}))
    scope = catalog.resolve("mix", Narrowing(), kinds=frozenset({"chat"}))
    assert pairs(scope) == [("together", "llama-4")]
    assert [e.why for e in scope.excluded] == ["serves it as an embedding model"] * 2


# -- errors, each with its message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "headers", "preferences", "kinds", "error", "fragments"),
    [
        (
            "deepseek-v9",
            {},
            {},
            None,
            errors.ModelNotFound,
            ["'deepseek-v9' does not exist", "did you mean 'deepseek-v3.2'", "GET /v1/models"],
        ),
        ("zzz", {}, {}, None, errors.ModelNotFound, ["'zzz' does not exist", "GET /v1/models"]),
        (
            "nobody/deepseek-v3.2",
            {},
            {},
            None,
            errors.ModelNotFound,
            ["no provider named 'nobody'", "known: alibaba, together, mistral", "GET /v1/models"],
        ),
        (
            "mistral/deepseek-v3.2",
            {},
            {},
            None,
            errors.ModelNotFound,
            ["mistral does not serve 'deepseek-v3.2'", "it serves mistral-large, text-embed"],
        ),
        (
            "alibaba/deepseek-v3.2",
            {},
            {"regions": ["eu", "us"]},
            None,
            errors.OutsideBounds,
            ["pinned to alibaba (cn)", "[preferences].regions allows only eu, us"],
        ),
        (
            "alibaba/deepseek-v3.2",
            {},
            {"exclude_providers": ["alibaba"]},
            None,
            errors.OutsideBounds,
            ["pinned to alibaba", "[preferences].exclude_providers", "without the provider"],
        ),
        (
            "alibaba/deepseek-v3.2",
            {"regions": "us"},
            {},
            None,
            errors.OutsideBounds,
            ["pinned to alibaba (cn)", "X-TokenHub-Regions: us"],
        ),
        (
            "alibaba/qwen3-max",
            {},
            {"exclude_models": ["qwen3-max"]},
            None,
            errors.OutsideBounds,
            ["alibaba/qwen3-max (qwen3-max) is outside the bounds: [preferences].exclude_models"],
        ),
        (
            "qwen3-max",
            {},
            {"models": ["deepseek-v3.2", "llama-4"]},
            None,
            errors.OutsideBounds,
            [
                "qwen3-max is outside the bounds",
                "[preferences].models allows only deepseek-v3.2, llama-4",
                "Models inside the bounds: deepseek-v3.2, llama-4",
            ],
        ),
        (
            "tokenhub-chat",
            {},
            {"exclude_models": ["deepseek-v3.2", "qwen3-max"]},
            None,
            errors.OutsideBounds,
            ["tokenhub-chat (deepseek-v3.2, qwen3-max) is outside", "exclude_models"],
        ),
        (
            "deepseek-v3.2",
            {},
            {"regions": ["eu"]},
            None,
            errors.NoProviderInScope,
            [
                "deepseek-v3.2 is served by alibaba (cn) and together (us); "
                "[preferences].regions allows only eu.",
                "Models served inside the bounds: mistral-large, text-embed.",
            ],
        ),
        (
            "deepseek-v3.2",
            {"regions": "eu"},
            {"exclude_providers": ["together"]},
            None,
            errors.NoProviderInScope,
            [
                "served by alibaba (cn) and together (us); ",
                "[preferences].exclude_providers (excludes together)",
                "X-TokenHub-Regions: eu (excludes alibaba)",
                "Models served inside the bounds: mistral-large, text-embed.",
            ],
        ),
        (
            "deepseek-v3.2",
            {"providers": "mistral"},
            {},
            frozenset({"chat"}),
            errors.NoProviderInScope,
            ["X-TokenHub-Providers: mistral", "inside the bounds: mistral-large."],
        ),
        (
            "tokenhub-chat",
            {},
            {"providers": ["mistral"]},
            None,
            errors.NoProviderInScope,
            [
                "tokenhub-chat (deepseek-v3.2, qwen3-max) is served by alibaba (cn) and "
                "together (us); [preferences].providers allows only mistral.",
            ],
        ),
        (
            "llama-4",
            {"regions": "antarctica"},
            {},
            None,
            errors.NoProviderInScope,
            ["X-TokenHub-Regions: antarctica", "No model is served inside the bounds"],
        ),
        (
            "text-embed",
            {},
            {},
            frozenset({"chat"}),
            errors.InvalidRequest,
            ["text-embed is an embedding model", "POST /v1/embeddings"],
        ),
        (
            "deepseek-v3.2",
            {},
            {},
            frozenset({"embedding"}),
            errors.InvalidRequest,
            ["a chat model", "POST /v1/chat/completions"],
        ),
    ],
)
def test_errors_name_what_to_do(
    requested: str,
    headers: dict[str, str],
    preferences: dict[str, Any],
    kinds: frozenset[str] | None,
    error: type[errors.SidecarError],
    fragments: list[str],
) -> None:
    with pytest.raises(errors.SidecarError) as caught:
        resolve(requested, headers, kinds=kinds, **preferences)
    assert type(caught.value) is error
    assert caught.value.param == "model"
    for fragment in fragments:
        assert fragment in caught.value.message


def test_error_statuses_match_the_spec() -> None:
    statuses = {
        errors.OutsideBounds: (403, "outside_preference_bounds"),
        errors.ModelNotFound: (404, "model_not_found"),
        errors.NoProviderInScope: (503, "no_provider_in_scope"),
        errors.InvalidRequest: (400, "invalid_request"),
    }
    for cls, (status, code) in statuses.items():
        assert (cls.status, cls.code) == (status, code)


# -- listing ---------------------------------------------------------------------------------


def test_listing_has_bare_pinned_and_alias_forms_in_bounds() -> None:
    catalog = Catalog(make_settings(regions=["us", "cn"]))
    ids = [m["id"] for m in catalog.listing()]
    assert ids == [
        "deepseek-v3.2",
        "qwen3-max",
        "text-embed",
        "llama-4",
        "alibaba/deepseek-v3.2",
        "together/deepseek-v3.2",
        "alibaba/qwen3-max",
        "alibaba/text-embed",
        "together/llama-4",
        "tokenhub-chat",
    ]
    assert catalog.listing()[0] == {
        "id": "deepseek-v3.2",
        "object": "model",
        "created": 0,
        "owned_by": "tokenhub-sidecar",
    }


def test_listing_follows_narrowing_and_model_bounds() -> None:
    settings = make_settings(exclude_models=["qwen3-max"])
    catalog = Catalog(settings)
    ids = [m["id"] for m in catalog.listing(parse_narrowing("eu", None, settings))]
    assert ids == ["text-embed", "mistral-large", "mistral/text-embed", "mistral/mistral-large"]


def test_model_entry() -> None:
    catalog = Catalog(make_settings(regions=["us"]))
    assert catalog.model_entry("together/llama-4") == {
        "id": "together/llama-4",
        "object": "model",
        "created": 0,
        "owned_by": "together",
    }
    assert catalog.model_entry("alibaba/qwen3-max") is None
    assert catalog.model_entry("tokenhub-chat") is not None
    assert catalog.model_entry("nope") is None
