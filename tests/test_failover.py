"""SPEC "Failover", row by row: fake upstreams misbehave on command; the openai SDK is the client.

Three providers in config order (``sticky = false``), so the attempt order is known in advance:
alpha, then beta, then gamma.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from .conftest import provider
from .fakes import (
    Behaviour,
    FakeUpstream,
    Noted,
    garbage,
    ok,
    refuse,
    refused_url,
    stall,
    status,
)

FAST = {"first_byte_timeout_s": 0.3, "first_token_timeout_s": 0.3, "idle_timeout_s": 0.3}
HI = [{"role": "user", "content": "Hi"}]
NAMES = ("alpha", "beta", "gamma")


class Fakes:
    """One fake upstream per provider name, all noting their calls in one list."""

    def __init__(self, named: dict[str, FakeUpstream]) -> None:
        self.named = named
        self.calls: list[str] = []
        for name in named:
            self.default(name, ok())

    def url(self, name: str) -> str:
        return self.named[name].url

    def script(self, name: str, *behaviours: Behaviour) -> None:
        self.named[name].script(*(Noted(self.calls, name, b) for b in behaviours))

    def default(self, name: str, behaviour: Behaviour) -> None:
        self.named[name].default = Noted(self.calls, name, behaviour)

    def fail_all(self, behaviour: Behaviour) -> None:
        for name in self.named:
            self.default(name, behaviour)


async def three(start_sidecar, make_settings, fake_upstream, **routing: Any):
    fakes = Fakes({name: await fake_upstream() for name in NAMES})
    providers = [provider(n, fakes.url(n), region="eu") for n in NAMES]
    settings = make_settings(providers, routing={**FAST, "sticky": False, **routing})
    return await start_sidecar(settings), fakes


async def post(sidecar, body: dict[str, Any]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.base_url}/v1/chat/completions", json=body) as resp:
            return resp.status, resp.headers.copy(), await resp.json()


MOVES_ON: dict[str, Behaviour] = {
    "refused connection": refuse(),
    "stall before headers": stall(2.0),
    "408": status(408),
    "429": status(429),
    "500": status(500),
    "502": status(502),
    "503": status(503),
    "504": status(504),
    "401 (its key)": status(401),
    "403 (its key)": status(403),
    "404 (its catalogue)": status(404),
    "200 with a body that is not JSON": garbage(),
    "200 with a JSON body that is not an object": status(200, body=b"[1, 2]"),
    "200 with a cut body": ok(cut_after_chunks=1),
}


@pytest.mark.parametrize("misbehaviour", list(MOVES_ON.values()), ids=list(MOVES_ON))
async def test_moves_on_to_the_next_provider(
    start_sidecar, make_settings, fake_upstream, misbehaviour
):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.script("alpha", misbehaviour)
    fakes.script("beta", ok(content="from beta"))
    raw = await sidecar.client().chat.completions.with_raw_response.create(
        model="deepseek-v3.2", messages=HI
    )
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content == "from beta"
    assert raw.headers["X-TokenHub-Provider"] == "beta"
    assert raw.headers["X-TokenHub-Attempts"] == "2"
    assert "after 1 failed attempt" in raw.headers["X-TokenHub-Route"]
    assert fakes.calls == ["alpha", "beta"]
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "ok" and line["billable"] is True
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta"]
    assert line["attempts"][1] == {**line["attempts"][1], "status": 200, "reason": "ok"}


async def test_connect_error_moves_on(start_sidecar, make_settings, fake_upstream):
    beta = await fake_upstream()
    settings = make_settings(
        [provider("alpha", await refused_url()), provider("beta", beta.url)],
        routing={**FAST, "sticky": False},
    )
    sidecar = await start_sidecar(settings)
    raw = await sidecar.client().chat.completions.with_raw_response.create(
        model="deepseek-v3.2", messages=HI
    )
    assert raw.headers["X-TokenHub-Provider"] == "beta"
    assert raw.headers["X-TokenHub-Attempts"] == "2"
    [line] = sidecar.ledger_lines()
    assert line["attempts"][0]["provider"] == "alpha"
    assert line["attempts"][0]["status"] is None
    assert line["attempts"][0]["reason"].startswith("connect failed")


@pytest.mark.parametrize("code", [400, 413, 422])
async def test_a_bad_request_is_passed_back_without_failover(
    start_sidecar, make_settings, fake_upstream, code
):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    upstream_error = {
        "error": {
            "message": "bad field",
            "type": "invalid_request_error",
            "param": "x",
            "code": "x",
        }
    }
    fakes.script("alpha", status(code, body=upstream_error))
    got, headers, body = await post(sidecar, {"model": "deepseek-v3.2", "messages": HI})
    assert got == code
    assert body == upstream_error
    assert headers["X-TokenHub-Provider"] == "alpha"
    assert headers["X-TokenHub-Attempts"] == "1"
    assert fakes.calls == ["alpha"]
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "upstream_error"
    assert line["status"] == code
    assert line["billable"] is False and line["total_usd"] == "0"
    assert [(a["provider"], a["status"]) for a in line["attempts"]] == [("alpha", code)]


async def test_every_attempt_failing_is_a_502_listing_each(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.script("alpha", status(503))
    fakes.script("beta", refuse())
    fakes.script("gamma", garbage())
    with pytest.raises(openai.APIStatusError) as caught:
        await sidecar.client().chat.completions.create(model="deepseek-v3.2", messages=HI)
    error = caught.value
    assert error.status_code == 502
    assert error.code == "upstream_failed"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["X-TokenHub-Attempts"] == "3"
    assert "X-TokenHub-Route" in error.response.headers
    message = error.message
    assert "alpha: HTTP 503" in message
    assert "beta:" in message and "gamma: HTTP 200 (body is not a JSON object)" in message
    assert message.index("alpha") < message.index("beta") < message.index("gamma")
    assert fakes.calls == ["alpha", "beta", "gamma"]
    [line] = sidecar.ledger_lines()
    assert line["outcome"] == "upstream_failed" and line["status"] == 502
    assert line["billable"] is False and line["total_usd"] == "0"
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta", "gamma"]
    assert [a["status"] for a in line["attempts"]] == [503, None, 200]


async def test_the_sdk_does_not_retry_the_sidecars_502(start_sidecar, make_settings, fake_upstream):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.fail_all(status(500))
    client = sidecar.client(max_retries=2)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="deepseek-v3.2", messages=HI)
    assert fakes.calls == ["alpha", "beta", "gamma"]
    assert len(sidecar.ledger_lines()) == 1


@pytest.mark.parametrize("max_providers", [1, 2])
async def test_at_most_max_providers_are_tried(
    start_sidecar, make_settings, fake_upstream, max_providers
):
    sidecar, fakes = await three(
        start_sidecar, make_settings, fake_upstream, max_providers=max_providers
    )
    fakes.fail_all(status(500))
    got, headers, body = await post(sidecar, {"model": "deepseek-v3.2", "messages": HI})
    assert got == 502 and body["error"]["code"] == "upstream_failed"
    assert headers["X-TokenHub-Attempts"] == str(max_providers)
    assert fakes.calls == list(NAMES[:max_providers])


async def test_429_retry_after_ejects_the_provider_until_then(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.script("alpha", status(429, headers={"Retry-After": "120"}))
    client = sidecar.client()
    first = await client.chat.completions.with_raw_response.create(
        model="deepseek-v3.2", messages=HI
    )
    assert first.headers["X-TokenHub-Provider"] == "beta"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sidecar.base_url}/-/providers") as resp:
            states = {p["name"]: p for p in (await resp.json())["providers"]}
    assert states["alpha"]["state"] == "ejected"
    assert states["alpha"]["ejected_until"] is not None
    assert states["beta"]["state"] == "healthy"
    # The next request goes to the healthy ones first; alpha is not called while ejected.
    second = await client.chat.completions.with_raw_response.create(
        model="deepseek-v3.2", messages=HI
    )
    assert second.headers["X-TokenHub-Provider"] == "beta"
    assert second.headers["X-TokenHub-Attempts"] == "1"
    assert fakes.calls == ["alpha", "beta", "beta"]


async def test_a_pinned_model_never_fails_over(start_sidecar, make_settings, fake_upstream):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.script("beta", status(503))
    got, headers, body = await post(sidecar, {"model": "beta/deepseek-v3.2", "messages": HI})
    assert got == 502 and body["error"]["code"] == "upstream_failed"
    assert headers["X-TokenHub-Attempts"] == "1"
    assert headers["x-should-retry"] == "false"
    assert fakes.calls == ["beta"]


async def test_narrowing_header_order_and_bounds_hold_during_failover(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.fail_all(status(500))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sidecar.base_url}/v1/chat/completions",
            json={"model": "deepseek-v3.2", "messages": HI},
            headers={"X-TokenHub-Providers": "gamma,alpha"},
        ) as resp:
            assert resp.status == 502
            assert resp.headers["X-TokenHub-Attempts"] == "2"
    assert fakes.calls == ["gamma", "alpha"]
    [line] = sidecar.ledger_lines()
    assert [a["provider"] for a in line["attempts"]] == ["gamma", "alpha"]


async def test_the_upstream_request_carries_the_providers_own_model_name(
    start_sidecar, make_settings, fake_upstream
):
    sidecar, fakes = await three(start_sidecar, make_settings, fake_upstream)
    fakes.script("alpha", status(500))
    await sidecar.client().chat.completions.create(model="deepseek-v3.2", messages=HI)
    assert fakes.named["alpha"].requests[0].json["model"] == "alpha-deepseek"
    assert fakes.named["beta"].requests[0].json["model"] == "beta-deepseek"
