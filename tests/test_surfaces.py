"""Completions, embeddings and the model list through the sidecar, read by the openai package."""

from __future__ import annotations

from .conftest import provider
from .fakes import ok


async def test_completions(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    fake.script(ok(content="Once upon a time"))
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    completion = await sidecar.client().completions.create(model="deepseek-v3.2", prompt="Tell me")
    assert completion.choices[0].text == "Once upon a time"
    assert fake.requests[0].path.endswith("/completions")
    assert fake.requests[0].json["model"] == "alpha-deepseek"


async def test_completions_stream(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    fake.script(ok(content="a b c"))
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    stream = await sidecar.client().completions.create(
        model="deepseek-v3.2", prompt="Tell me", stream=True
    )
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text.split() == ["a", "b", "c"]


async def test_embeddings(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    sidecar = await start_sidecar(make_settings([provider("alpha", fake.url)]))
    result = await sidecar.client().embeddings.create(
        model="text-embedding-3-small", input=["one", "two"]
    )
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0
    assert fake.requests[0].path.endswith("/embeddings")
    [line] = sidecar.ledger_lines()
    assert line["endpoint"] == "/v1/embeddings" and line["outcome"] == "ok"


async def test_models_list_and_get(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    settings = make_settings(
        [provider("alpha", fake.url), provider("beta", fake.url, region="us")],
        aliases={"tokenhub-chat": ["deepseek-v3.2"]},
        preferences={"regions": ["eu"]},
    )
    sidecar = await start_sidecar(settings)
    client = sidecar.client()
    ids = {m.id async for m in client.models.list()}
    assert {"deepseek-v3.2", "alpha/deepseek-v3.2", "tokenhub-chat"} <= ids
    assert not any(i.startswith("beta/") for i in ids), "a provider outside the bounds is listed"
    model = await client.models.retrieve("alpha/deepseek-v3.2")
    assert model.id == "alpha/deepseek-v3.2"
