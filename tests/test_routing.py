from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import config, errors
from sidecar.health import HealthBook, HealthPolicy
from sidecar.routing import affinity_key, dry_run, plan, rendezvous_score
from sidecar.scope import Catalog, Scope, parse_narrowing

PRICES = {"input_per_mtok": "1", "output_per_mtok": "2"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_767_225_600.0 + self.now


def make_settings(
    providers: list[tuple[str, str, float, list[str]]],
    *,
    aliases: dict[str, list[str]] | None = None,
    preferences: dict[str, Any] | None = None,
) -> config.Settings:
    raw = {
        "preferences": preferences or {},
        "aliases": aliases or {},
        "providers": [
            {
                "name": name,
                "base_url": f"http://127.0.0.1:{i + 1}/v1",
                "region": region,
                "weight": weight,
                "models": {m: {**PRICES, "upstream": f"{name}-{m}"} for m in models},
            }
            for i, (name, region, weight, models) in enumerate(providers)
        ],
    }
    return config.from_mapping(raw, environ={})


THREE = [("a", "eu", 1.0, ["m", "n"]), ("b", "us", 1.0, ["m"]), ("c", "eu", 1.0, ["m", "n"])]


def setup(
    providers: list[tuple[str, str, float, list[str]]] = THREE,
    requested: str = "m",
    *,
    regions: str | None = None,
    header_providers: str | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> tuple[Scope, HealthBook, FakeClock]:
    cfg = make_settings(providers, aliases=aliases)
    clock = FakeClock()
    scope = Catalog(cfg).resolve(requested, parse_narrowing(regions, header_providers, cfg))
    book = HealthBook(
        cfg.providers, clock=clock, wall=clock.wall, policy=HealthPolicy(consecutive_failures=1)
    )
    return scope, book, clock


def names(targets: list[Any]) -> list[str]:
    return [t.provider for t in targets]


# -- affinity key ----------------------------------------------------------------------------


def test_affinity_header_wins_then_prompt_cache_key() -> None:
    body = {"model": "m", "prompt_cache_key": "pck", "messages": []}
    assert affinity_key(" user-42 ", body) == "user-42"
    assert affinity_key(None, body) == "pck"
    assert affinity_key("  ", body) == "pck"


def test_affinity_prefix_ignores_later_turns_and_sampling() -> None:
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    first = {"model": "m", "temperature": 0, "messages": opening}
    later = {
        **first,
        "temperature": 1,
        "messages": [
            *opening,
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "more"},
        ],
    }
    key = affinity_key(None, first)
    assert key.startswith("prefix:")
    assert affinity_key(None, later) == key


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {
            "messages": [
                {"role": "system", "content": "be long"},
                {"role": "user", "content": "hello"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "bye"},
            ]
        },
    ],
)
def test_affinity_prefix_changes_with_the_stable_parts(change: dict[str, Any]) -> None:
    base = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ],
    }
    assert affinity_key(None, {**base, **change}) != affinity_key(None, base)


@pytest.mark.parametrize("field", ["prompt", "input"])
def test_affinity_prefix_for_completions_embeddings_and_responses(field: str) -> None:
    one = affinity_key(None, {"model": "m", field: "abc"})
    assert one == affinity_key(None, {"model": "m", field: "abc", "max_tokens": 5})
    assert one != affinity_key(None, {"model": "m", field: "abd"})


def test_affinity_survives_huge_integers() -> None:
    assert affinity_key(None, {"model": "m", "input": [2**70]}).startswith("prefix:")


# -- plan ------------------------------------------------------------------------------------


def test_config_order_without_stickiness() -> None:
    scope, book, _ = setup()
    assert names(plan(scope, book, affinity="k", sticky=False, max_providers=3)) == ["a", "b", "c"]


def test_healthy_before_ejected_and_ejected_never_skipped() -> None:
    scope, book, _ = setup()
    book.record_failure("a", reason="x", status=500)
    assert names(plan(scope, book, affinity="k", sticky=False, max_providers=3)) == ["b", "c", "a"]
    book.record_failure("b", reason="x", status=500)
    book.record_failure("c", reason="x", status=500)
    assert names(plan(scope, book, affinity="k", sticky=False, max_providers=3)) == ["a", "b", "c"]


def test_half_open_counts_as_healthy() -> None:
    scope, book, clock = setup()
    book.record_failure("a", reason="x", status=500)
    clock.now += 10
    assert book.state("a") == "half_open"
    assert names(plan(scope, book, affinity="k", sticky=False, max_providers=3)) == ["a", "b", "c"]


def test_providers_header_order_wins_among_healthy() -> None:
    scope, book, _ = setup(header_providers="c,a,b")
    assert names(plan(scope, book, affinity="k", sticky=True, max_providers=3)) == ["c", "a", "b"]
    book.record_failure("c", reason="x", status=500)
    assert names(plan(scope, book, affinity="k", sticky=True, max_providers=3)) == ["a", "b", "c"]


def test_max_providers_caps_distinct_providers() -> None:
    scope, book, _ = setup()
    assert names(plan(scope, book, affinity="k", sticky=False, max_providers=2)) == ["a", "b"]
    book.record_failure("a", reason="x", status=500)
    book.record_failure("b", reason="x", status=500)
    assert names(plan(scope, book, affinity="k", sticky=False, max_providers=1)) == ["c"]


def test_alias_models_in_order_each_provider_once() -> None:
    scope, book, _ = setup(requested="both", aliases={"both": ["n", "m"]})
    planned = plan(scope, book, affinity="k", sticky=False, max_providers=3)
    assert [(t.provider, t.model) for t in planned] == [("a", "n"), ("c", "n"), ("b", "m")]


def test_pinned_plan_is_only_the_pinned_target() -> None:
    scope, book, _ = setup(requested="b/m")
    book.record_failure("b", reason="x", status=500)
    planned = plan(scope, book, affinity="k", sticky=True, max_providers=3)
    assert [(t.provider, t.upstream_model) for t in planned] == [("b", "b-m")]


# -- stickiness ------------------------------------------------------------------------------


def test_rendezvous_score_is_stable_across_processes() -> None:
    # Fixed values: Python's randomized hash() would change them on every start.
    assert rendezvous_score("key-1", "a", 1.0) == pytest.approx(0.6228694869333578)
    assert rendezvous_score("key-1", "b", 1.0) == pytest.approx(1.635758450965415)
    assert rendezvous_score("key-1", "a", 2.0) == pytest.approx(2 * 0.6228694869333578)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 2.0, 3.0), (5.0, 1.0, 1.0)])
def test_thousand_keys_spread_in_proportion_to_weights(weights: tuple[float, ...]) -> None:
    providers = [(n, "eu", w, ["m"]) for n, w in zip("abc", weights, strict=True)]
    scope, book, _ = setup(providers)
    first = Counter(
        plan(scope, book, affinity=f"user-{i}", sticky=True, max_providers=3)[0].provider
        for i in range(1000)
    )
    total = sum(weights)
    for name, weight in zip("abc", weights, strict=True):
        expected = 1000 * weight / total
        # binomial standard deviation is at most ~16 for n=1000; allow about 4 of them
        assert abs(first[name] - expected) < 65, (name, first, expected)


def test_each_key_keeps_its_provider_and_its_second_choice() -> None:
    scope, book, _ = setup(
        [("a", "eu", 1.0, ["m"]), ("b", "eu", 2.0, ["m"]), ("c", "eu", 1.0, ["m"])]
    )
    keys = [f"conversation-{i}" for i in range(300)]
    before = {k: names(plan(scope, book, affinity=k, sticky=True, max_providers=3)) for k in keys}
    for k in keys:
        for _ in range(3):
            assert names(plan(scope, book, affinity=k, sticky=True, max_providers=3)) == before[k]
    book.record_failure("b", reason="x", status=500)
    for k in keys:
        order = names(plan(scope, book, affinity=k, sticky=True, max_providers=3))
        assert order == [p for p in before[k] if p != "b"] + ["b"]
    assert len({tuple(v) for v in before.values()}) == 6  # every order occurs for some key


# -- dry run ---------------------------------------------------------------------------------


def test_dry_run_body_names_reasons() -> None:
    cfg = make_settings(THREE + [("d", "us", 1.0, ["m"])], preferences={"regions": ["eu", "us"]})
    clock = FakeClock()
    book = HealthBook(cfg.providers, clock=clock, wall=clock.wall)
    book.record_failure("b", reason="rate limited", status=429, retry_after_s=30)
    scope = Catalog(cfg).resolve("m", parse_narrowing(None, "c,b,a", cfg))
    body = dry_run(scope, book, affinity="k", sticky=True, max_providers=2)
    assert body["requested"] == "m"
    assert body["candidates"] == [
        {
            "provider": "c",
            "model": "m",
            "upstream_model": "c-m",
            "why": "healthy; X-TokenHub-Providers order #1",
        },
        {
            "provider": "a",
            "model": "m",
            "upstream_model": "a-m",
            "why": "healthy; X-TokenHub-Providers order #3",
        },
    ]
    assert body["excluded"] == [
        {"provider": "d", "model": "m", "why": "X-TokenHub-Providers: c,b,a"},
        {
            "provider": "b",
            "model": "m",
            "why": "beyond routing.max_providers = 2",
        },
    ]


def test_dry_run_explains_ejected_and_duplicate_targets() -> None:
    scope, book, _ = setup(requested="both", aliases={"both": ["n", "m"]})
    book.record_failure("c", reason="timeout", status=None)
    body = dry_run(scope, book, affinity="k", sticky=False, max_providers=3)
    whys = {(c["provider"], c["model"]): c["why"] for c in body["candidates"]}
    assert whys[("a", "n")] == "healthy; config order #1"
    assert whys[("c", "n")].startswith("ejected until 2026-01-01T00:00:10.000Z (timeout)")
    assert whys[("c", "n")].endswith("tried after the healthy ones")
    assert list(whys) == [("a", "n"), ("b", "m"), ("c", "n")]
    assert {
        "provider": "a",
        "model": "m",
        "why": "a is already a candidate for n; each provider once",
    } in body["excluded"]


# -- the property: no plan ever leaves the bounds ----------------------------------------------

REGIONS = ["eu", "us", "cn", "sg"]
MODELS = ["m1", "m2", "m3", "m4"]
PROVIDER_NAMES = ["p0", "p1", "p2", "p3", "p4"]


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 5))
    providers = [
        (
            PROVIDER_NAMES[i],
            draw(st.sampled_from(REGIONS)),
            draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
            draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=4, unique=True)),
        )
        for i in range(count)
    ]
    names_ = [p[0] for p in providers]
    served = sorted({m for p in providers for m in p[3]})

    def subset(pool: list[str]) -> st.SearchStrategy[list[str]]:
        # Mostly unbounded, so that most examples get as far as a plan.
        some = st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True)
        return st.one_of(st.just([]), st.just([]), some)

    preferences = {
        "regions": draw(subset(REGIONS)),
        "providers": draw(subset(names_)),
        "exclude_providers": draw(subset(names_)),
        "models": draw(subset(served)),
        "exclude_models": draw(subset(served)),
    }
    aliases = {"alias": draw(st.lists(st.sampled_from(served), min_size=1, unique=True))}
    requested = draw(
        st.sampled_from(
            served + ["alias", "unknown"] + [f"{p[0]}/{m}" for p in providers for m in p[3]]
        )
    )
    header_regions = draw(st.none() | subset(REGIONS).map(",".join))
    header_providers = draw(st.none() | subset(names_).map(",".join))
    failures = draw(
        st.lists(
            st.tuples(
                st.sampled_from(names_),
                st.sampled_from([None, 401, 429, 500, 503]),
                st.none() | st.floats(0, 100),
                st.floats(0, 30),
            ),
            max_size=12,
        )
    )
    return {
        "providers": providers,
        "preferences": preferences,
        "aliases": aliases,
        "requested": requested,
        "headers": (header_regions, header_providers),
        "failures": failures,
        "max_providers": draw(st.integers(1, 3)),
        "sticky": draw(st.booleans()),
        "affinity": draw(st.text(max_size=8)),
    }


def within_bounds(world: dict[str, Any], provider: str, model: str) -> bool:
    prefs = world["preferences"]
    region = next(p[1] for p in world["providers"] if p[0] == provider)
    header_regions, header_providers = world["headers"]
    checks = [
        not prefs["regions"] or region in prefs["regions"],
        not prefs["providers"] or provider in prefs["providers"],
        provider not in prefs["exclude_providers"],
        not prefs["models"] or model in prefs["models"],
        model not in prefs["exclude_models"],
        not header_regions or region in header_regions.split(","),
        not header_providers or provider in header_providers.split(","),
    ]
    return all(checks)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_no_plan_leaves_the_bounds(world: dict[str, Any]) -> None:
    try:
        cfg = make_settings(
            world["providers"], aliases=world["aliases"], preferences=world["preferences"]
        )
    except config.ConfigError:
        return  # e.g. an alias named like a model; not a routing question
    clock = FakeClock()
    book = HealthBook(cfg.providers, clock=clock, wall=clock.wall)
    for provider, status, retry_after, advance in world["failures"]:
        book.record_failure(provider, reason="x", status=status, retry_after_s=retry_after)
        clock.now += advance
    try:
        regions, providers = world["headers"]
        scope = Catalog(cfg).resolve(world["requested"], parse_narrowing(regions, providers, cfg))
    except errors.SidecarError as exc:
        assert exc.status in (400, 403, 404, 503)
        return
    planned = plan(
        scope,
        book,
        affinity=world["affinity"],
        sticky=world["sticky"],
        max_providers=world["max_providers"],
    )
    assert planned, "a non-empty scope always yields a plan"
    providers = [t.provider for t in planned]
    assert len(providers) == len(set(providers)) <= world["max_providers"]
    requested = world["requested"]
    allowed_models = (
        world["aliases"][requested] if requested == "alias" else [requested.rpartition("/")[2]]
    )
    for target in planned:
        assert within_bounds(world, target.provider, target.model), target
        assert target.model in allowed_models
        assert scope.allows(target.provider, target.model)
        if "/" in requested:
            assert f"{target.provider}/{target.model}" == requested
    body = dry_run(
        scope,
        book,
        affinity=world["affinity"],
        sticky=world["sticky"],
        max_providers=world["max_providers"],
    )
    assert [c["provider"] for c in body["candidates"]] == providers
    states = [book.state(p) for p in providers]
    assert states == sorted(states, key=lambda s: s == "ejected"), "healthy before ejected"
