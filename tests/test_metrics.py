from __future__ import annotations

from decimal import Decimal

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from sidecar.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_spec_names_and_plain_labels() -> None:
    m = Metrics()
    m.observe_request("/v1/chat/completions", "deepseek-v3.2", "alpha", 200)
    m.observe_request("/v1/chat/completions", "deepseek-v3.2", "alpha", 200)
    m.observe_request("/v1/chat/completions", None, None, 403)
    m.attempts.labels("alpha", "ok").inc()
    m.cache_requests.labels("hit").inc()
    m.ledger_write_seconds.observe(0.002)
    m.add_spend("alpha", "deepseek-v3.2", Decimal("0.0000033166"))
    m.add_spend("alpha", "deepseek-v3.2", Decimal("0.5"))
    got = samples(m)
    key = (
        ("endpoint", "/v1/chat/completions"),
        ("model", "deepseek-v3.2"),
        ("provider", "alpha"),
        ("status", "200"),
    )
    assert got[("tokenhub_requests_total", key)] == 2
    rejected = (
        ("endpoint", "/v1/chat/completions"),
        ("model", ""),
        ("provider", ""),
        ("status", "403"),
    )
    assert got[("tokenhub_requests_total", rejected)] == 1
    attempt = (("outcome", "ok"), ("provider", "alpha"))
    assert got[("tokenhub_upstream_attempts_total", attempt)] == 1
    assert got[("tokenhub_cache_requests_total", (("result", "hit"),))] == 1
    assert got[("tokenhub_ledger_write_seconds_count", ())] == 1
    spend = got[("tokenhub_spend_usd_total", (("model", "deepseek-v3.2"), ("provider", "alpha")))]
    assert abs(spend - 0.5000033166) < 1e-12


def test_zero_spend_creates_no_series() -> None:
    m = Metrics()
    m.add_spend("alpha", "m", Decimal("0"))
    m.add_saved("m", Decimal("0"))
    assert not any(name.startswith("tokenhub_spend_usd") for name, _ in samples(m))


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.failovers.inc()
    assert samples(first)[("tokenhub_failovers_total", ())] == 1
    assert samples(second)[("tokenhub_failovers_total", ())] == 0


def test_provider_state_is_one_hot() -> None:
    m = Metrics()
    m.set_provider_state("alpha", "ejected")
    got = samples(m)
    assert got[("tokenhub_provider_state", (("provider", "alpha"), ("state", "ejected")))] == 1
    assert got[("tokenhub_provider_state", (("provider", "alpha"), ("state", "healthy")))] == 0


def test_provider_states_are_read_at_scrape_time() -> None:
    states = {"alpha": "ejected", "beta": "healthy"}
    m = Metrics()
    m.track_provider_states(lambda: states)
    assert samples(m)[("tokenhub_provider_state", (("provider", "alpha"), ("state", "ejected")))]
    states.pop("beta")
    states["alpha"] = "half_open"
    got = samples(m)
    assert got[("tokenhub_provider_state", (("provider", "alpha"), ("state", "half_open")))] == 1
    assert got[("tokenhub_provider_state", (("provider", "alpha"), ("state", "ejected")))] == 0
    assert not any(dict(labels).get("provider") == "beta" for _, labels in got)


def test_histograms_and_cache_gauges() -> None:
    m = Metrics()
    m.upstream_latency.labels("alpha").observe(0.3)
    m.ttft.labels("alpha").observe(1.5)
    m.cache_bytes.set(1234)
    m.cache_evictions.inc(2)
    m.ledger_errors.inc()
    got = samples(m)
    bucket = "tokenhub_upstream_latency_seconds_bucket"
    assert got[(bucket, (("le", "0.5"), ("provider", "alpha")))] == 1
    assert got[(bucket, (("le", "0.25"), ("provider", "alpha")))] == 0
    assert got[("tokenhub_time_to_first_token_seconds_count", (("provider", "alpha"),))] == 1
    assert got[("tokenhub_cache_bytes", ())] == 1234
    assert got[("tokenhub_cache_evictions_total", ())] == 2
    assert got[("tokenhub_ledger_errors_total", ())] == 1


async def test_render_serves_over_aiohttp(aiohttp_client: AiohttpClient) -> None:
    m = Metrics()
    m.observe_request("/v1/embeddings", "e", "beta", 200)

    async def metrics_handler(_: web.Request) -> web.Response:
        body, content_type = m.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    client = await aiohttp_client(app)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    assert 'tokenhub_requests_total{endpoint="/v1/embeddings",model="e",' in text


async def test_attempts_failovers_latency_and_in_flight_reach_metrics(
    start_sidecar, make_settings, fake_upstream
):
    from tests.conftest import provider
    from tests.fakes import status

    broken, healthy = await fake_upstream(), await fake_upstream()
    broken.default = status(503)
    settings = make_settings(
        [provider("alpha", broken.url), provider("beta", healthy.url)],
        routing={"sticky": False},
    )
    sidecar = await start_sidecar(settings)
    client = sidecar.client()
    await client.chat.completions.create(
        model="deepseek-v3.2", messages=[{"role": "user", "content": "Hi"}]
    )
    stream = await client.chat.completions.create(
        model="deepseek-v3.2", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    async for _ in stream:
        pass
    body, _ = sidecar.runtime.metrics.render()
    text = body.decode()
    # alpha answers 503 to both (one failure does not eject it), beta serves both.
    assert 'tokenhub_upstream_attempts_total{outcome="http_503",provider="alpha"} 2.0' in text
    assert 'tokenhub_upstream_attempts_total{outcome="ok",provider="beta"} 2.0' in text
    assert "tokenhub_failovers_total 2.0" in text
    assert 'tokenhub_upstream_latency_seconds_count{provider="beta"} 1.0' in text
    assert 'tokenhub_time_to_first_token_seconds_count{provider="beta"} 1.0' in text
    assert "tokenhub_requests_in_flight 0.0" in text
    # Spend and the request counter are counted after each answer went out, before the next.
    assert 'tokenhub_spend_usd_total{model="deepseek-v3.2",provider="beta"}' in text
    assert 'tokenhub_requests_total{endpoint="/v1/chat/completions",model="deepseek-v3.2",' in text
