"""Routing through the HTTP app: ``X-TokenHub-Route`` on every answer, the ``POST /-/route`` dry
run, and a randomized end-to-end check that failover never leaves the bounds."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.app import create_app

from .conftest import provider
from .fakes import (
    Behaviour,
    FakeUpstream,
    Noted,
    cut_before_content,
    garbage,
    ok,
    refuse,
    status,
)

FAST = {"first_byte_timeout_s": 0.3, "first_token_timeout_s": 0.3, "idle_timeout_s": 0.3}
HI = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "deepseek-v3.2", "messages": HI}


async def post(
    base_url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}{path}", json=body, headers=headers or {}) as resp:
            raw = await resp.read()
            parsed = json.loads(raw) if resp.content_type == "application/json" else raw
            return resp.status, resp.headers.copy(), parsed


async def test_every_answer_says_why_its_provider(start_sidecar, make_settings, fake_upstream):
    alpha, beta = await fake_upstream(), await fake_upstream()
    settings = make_settings(
        [provider("alpha", alpha.url, region="eu"), provider("beta", beta.url, region="us")],
        routing={**FAST, "sticky": False},
    )
    sidecar = await start_sidecar(settings)
    url = sidecar.base_url
    alpha.script(status(500))
    cacheable = {**CHAT, "temperature": 0}
    pinned_alpha = {**CHAT, "model": "alpha/deepseek-v3.2"}
    answers = {
        "failed over": await post(url, "/v1/chat/completions", CHAT),
        "miss": await post(url, "/v1/chat/completions", cacheable),
        "hit": await post(url, "/v1/chat/completions", cacheable),
        "stream": await post(url, "/v1/chat/completions", {**CHAT, "stream": True}),
        "pinned": await post(url, "/v1/chat/completions", {**CHAT, "model": "beta/deepseek-v3.2"}),
    }
    alpha.script(status(400))
    answers["passed back"] = await post(url, "/v1/chat/completions", pinned_alpha)
    routes = {name: headers["X-TokenHub-Route"] for name, (_, headers, _) in answers.items()}
    assert routes["failed over"] == (
        "beta (us) serves deepseek-v3.2: first healthy provider in config order, "
        "after 1 failed attempt"
    )
    assert "cache hit" in routes["hit"]
    assert routes["stream"].startswith("alpha (eu) serves deepseek-v3.2")
    assert routes["pinned"] == "beta (us) serves deepseek-v3.2: pinned by beta/deepseek-v3.2"
    assert answers["passed back"][0] == 400
    assert routes["passed back"] == "alpha (eu) serves deepseek-v3.2: pinned by alpha/deepseek-v3.2"
    assert all(code == 200 for name, (code, _, _) in answers.items() if name != "passed back")
    assert routes["miss"].endswith(": first healthy provider in config order")
    beta.script(status(503))
    all_failed = await post(url, "/v1/chat/completions", {**CHAT, "model": "beta/deepseek-v3.2"})
    assert all_failed[0] == 502
    assert all_failed[1]["X-TokenHub-Route"] == "every provider tried failed: beta"


async def test_route_dry_run_lists_candidates_and_exclusions(
    start_sidecar, make_settings, fake_upstream
):
    fakes = [await fake_upstream() for _ in range(3)]
    settings = make_settings(
        [
            provider("alpha", fakes[0].url, region="eu"),
            provider("beta", fakes[1].url, region="us"),
            provider("gamma", fakes[2].url, region="sg"),
        ],
        preferences={"regions": ["eu", "us"]},
        routing={"sticky": False},
    )
    sidecar = await start_sidecar(settings)
    code, _, body = await post(
        sidecar.base_url, "/-/route", CHAT, {"X-TokenHub-Providers": "beta,alpha"}
    )
    assert code == 200
    assert body["requested"] == "deepseek-v3.2"
    assert [(c["provider"], c["upstream_model"]) for c in body["candidates"]] == [
        ("beta", "beta-deepseek"),
        ("alpha", "alpha-deepseek"),
    ]
    assert all("X-TokenHub-Providers order" in c["why"] for c in body["candidates"])
    assert [(e["provider"], e["model"]) for e in body["excluded"]] == [("gamma", "deepseek-v3.2")]
    assert "[preferences].regions" in body["excluded"][0]["why"]
    # A dry run sends nothing and writes no ledger line.
    assert all(f.requests == [] for f in fakes)
    assert sidecar.ledger_lines() == []
    code, headers, error = await post(
        sidecar.base_url, "/-/route", CHAT, {"X-TokenHub-Regions": "sg"}
    )
    assert code == 403 and error["error"]["code"] == "outside_preference_bounds"


# --- randomized: bounds, narrowing headers and failure scripts --------------------------------

REGIONS = ("eu", "us", "sg")
NAMES = ("p0", "p1", "p2")
EXAMPLES = 30


FAILS = ("500", "429", "refuse", "garbage", "401", "cut")
FINAL = ("ok", "400")


def behaviour(kind: str) -> Behaviour:
    return {
        "ok": ok(),
        "400": status(400),
        "500": status(500),
        "429": status(429, headers={"Retry-After": "30"}),
        "refuse": refuse(),
        "garbage": garbage(),
        "401": status(401),
        "cut": cut_before_content(),  # a non-stream answer: its JSON body is cut half-way
    }[kind]


@dataclass(frozen=True)
class Example:
    regions: dict[str, str]
    bounds: list[str]
    region_header: list[str] | None
    provider_header: list[str] | None
    max_providers: int
    sticky: bool
    stream: bool
    script: dict[str, str]

    @classmethod
    def draw(cls, rng: random.Random) -> Example:
        def subset(values: tuple[str, ...], least: int) -> list[str]:
            return rng.sample(values, rng.randint(least, len(values)))

        def outcome() -> str:
            if rng.random() < 0.5:
                return rng.choice(FAILS)
            return "ok" if rng.random() < 0.8 else "400"

        regions = {n: rng.choice(REGIONS) for n in NAMES}
        bounds = subset(REGIONS, 0)
        # Mostly headers inside the bounds (they narrow); sometimes any (a 403 case).
        inside = tuple(r for r in REGIONS if not bounds or r in bounds)
        pool = inside if rng.random() < 0.8 else REGIONS
        names = tuple(n for n in NAMES if regions[n] in inside)
        return cls(
            regions=regions,
            bounds=bounds,
            region_header=subset(pool, 1) if rng.random() < 0.3 else None,
            provider_header=subset(names or NAMES, 1) if rng.random() < 0.3 else None,
            max_providers=rng.randint(1, 3),
            sticky=rng.random() < 0.5,
            stream=rng.random() < 0.4,
            script={n: outcome() for n in NAMES},
        )

    def in_bounds(self, name: str) -> bool:
        return not self.bounds or self.regions[name] in self.bounds

    def allowed(self, name: str) -> bool:
        """Inside the bounds and the narrowing headers: the only providers ever to be called."""
        return (
            self.in_bounds(name)
            and (self.region_header is None or self.regions[name] in self.region_header)
            and (self.provider_header is None or name in self.provider_header)
        )

    def headers(self) -> dict[str, str]:
        headers = {"X-TokenHub-Affinity": json.dumps(self.script)}
        if self.region_header is not None:
            headers["X-TokenHub-Regions"] = ",".join(self.region_header)
        if self.provider_header is not None:
            headers["X-TokenHub-Providers"] = ",".join(self.provider_header)
        return headers


async def run_example(
    example: Example, fakes: dict[str, FakeUpstream], make_settings, ledger: Path
) -> tuple[int, Any, list[str], list[dict[str, Any]]]:
    calls: list[str] = []
    for name, fake in fakes.items():
        fake.requests.clear()
        fake.default = Noted(calls, name, behaviour(example.script[name]))
    settings = make_settings(
        [provider(n, fakes[n].url, region=example.regions[n]) for n in NAMES],
        preferences={"regions": example.bounds},
        routing={**FAST, "max_providers": example.max_providers, "sticky": example.sticky},
        ledger={"path": str(ledger)},
    )
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        body = {**CHAT, "stream": example.stream}
        code, headers, _ = await post(base_url, "/v1/chat/completions", body, example.headers())
    finally:
        await runner.cleanup()
    lines = [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.exists() else []
    return code, headers, calls, lines


async def test_randomized_failover_stays_inside_the_bounds(make_settings, tmp_path):
    fakes = {n: await FakeUpstream().start() for n in NAMES}
    rng = random.Random(20260101)
    try:
        for number in range(EXAMPLES):
            example = Example.draw(rng)
            ledger = tmp_path / f"ledger-{number}.jsonl"
            code, headers, calls, lines = await run_example(example, fakes, make_settings, ledger)
            context = f"example {number}: {example}, got {code}, calls {calls}"
            check_example(example, code, headers, calls, lines, context)
    finally:
        for fake in fakes.values():
            await fake.close()


def check_example(
    example: Example,
    code: int,
    headers: Any,
    calls: list[str],
    lines: list[dict[str, Any]],
    context: str,
) -> None:
    assert all(example.allowed(name) for name in calls), context
    assert len(calls) == len(set(calls)) <= example.max_providers, context
    if not calls:
        assert code in (403, 503), context
        assert lines == [], context
        assert not any(example.allowed(n) for n in NAMES) or code == 403, context
        return
    [line] = lines
    assert [a["provider"] for a in line["attempts"]] == calls, context
    assert headers["X-TokenHub-Attempts"] == str(len(calls)), context
    last = example.script[calls[-1]]
    assert all(example.script[name] in FAILS for name in calls[:-1]), context
    if last == "ok":
        assert (code, line["outcome"], line["billable"]) == (200, "ok", True), context
        assert headers["X-TokenHub-Provider"] == calls[-1], context
    elif last == "400":
        assert (code, line["outcome"], line["billable"]) == (400, "upstream_error", False), context
    else:
        in_scope = sum(example.allowed(n) for n in NAMES)
        assert len(calls) == min(in_scope, example.max_providers), context
        assert (code, line["outcome"], line["billable"]) == (502, "upstream_failed", False), context
        assert headers["x-should-retry"] == "false", context
