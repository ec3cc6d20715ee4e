"""Fuzz the request path: any body and headers get a well-formed answer, and serving goes on.

Hypothesis drives a synchronous property in a worker thread; each example is sent on the test's
event loop, where the real app (``start_sidecar``) and the fake upstream run.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import provider

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/-/route"]
OK_STATUSES = {200, 400, 401, 403, 404, 405, 413, 429, 502, 503}
MODELS = [
    "deepseek-v3.2",
    "alpha/deepseek-v3.2",
    "beta/deepseek-v3.2",
    "text-embedding-3-small",
    "nope",
    "",
    7,
    None,
    ["deepseek-v3.2"],
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS)},
    optional={
        "messages": st.one_of(
            json_values,
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", 3]), "content": json_values}
                ),
                max_size=3,
            ),
        ),
        "prompt": json_values,
        "input": json_values,
        "stream": st.one_of(st.booleans(), json_values),
        "temperature": st.one_of(st.sampled_from([0, 0.0, 1]), json_values),
        "n": json_values,
        "max_tokens": json_values,
        "stream_options": json_values,
        "api_base": st.just("http://127.0.0.1:9/v1"),
    },
)
bodies = st.one_of(
    chat_bodies.map(lambda body: json.dumps(body).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        [
            "X-TokenHub-Regions",
            "X-TokenHub-Providers",
            "X-TokenHub-Cache",
            "X-TokenHub-Affinity",
            "X-Request-Id",
            "Cache-Control",
            "Content-Type",
            "Authorization",
            "Origin",
            "Host",
        ]
    ),
    st.one_of(
        st.sampled_from(["eu", "alpha", "beta,alpha", "no-store", "us", "127.0.0.1"]), header_values
    ),
    max_size=4,
)


def _check_answer(status: int, content_type: str, body: bytes) -> None:
    assert status in OK_STATUSES, (status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and "code" in error and "param" in error
    elif content_type.startswith("text/event-stream"):
        assert body.startswith(b"data: ") and body.endswith(b"\n\n"), body[-200:]
    else:
        json.loads(body)


async def test_any_body_and_headers_get_a_clean_answer(start_sidecar, make_settings, fake_upstream):
    alpha, beta = await fake_upstream(), await fake_upstream()
    sidecar = await start_sidecar(
        make_settings(
            [provider("alpha", alpha.url), provider("beta", beta.url, region="us")],
            account={"rpm": 1_000_000},
            server={"max_body_bytes": 4096},
        )
    )
    loop = asyncio.get_running_loop()
    http = aiohttp.ClientSession(skip_auto_headers=("Content-Type",))

    async def send(path: str, body: bytes, extra: dict[str, str]) -> None:
        async with http.post(sidecar.base_url + path, data=body, headers=extra) as response:
            raw = await response.read()
            _check_answer(response.status, response.headers.get("Content-Type", ""), raw)

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(path=st.sampled_from(PATHS), body=bodies, extra=headers)
    def property_holds(path: str, body: bytes, extra: dict[str, str]) -> None:
        asyncio.run_coroutine_threadsafe(send(path, body, extra), loop).result(timeout=20)

    try:
        await asyncio.to_thread(property_holds)
        async with http.get(f"{sidecar.base_url}/-/health") as health:
            assert health.status == 200
        async with http.post(
            f"{sidecar.base_url}/v1/chat/completions",
            json={"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "still?"}]},
        ) as still:
            assert still.status == 200
    finally:
        await http.close()
    assert alpha.requests or beta.requests
