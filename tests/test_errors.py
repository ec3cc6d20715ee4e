"""Every error a client can trigger has SPEC's status and code, in the OpenAI shape."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from .conftest import provider


@pytest.fixture
async def sidecar(start_sidecar, make_settings, fake_upstream):
    fake = await fake_upstream()
    settings = make_settings([provider("alpha", fake.url)], server={"max_body_bytes": 2048})
    return await start_sidecar(settings)


async def post(sidecar, body: bytes, **headers: str) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sidecar.base_url}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as response:
            return response.status, response.headers.copy(), await response.json()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "invalid_request"),
        (b'{"model": 42, "messages": []}', 400, "invalid_request"),
        (b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
        (
            b'{"model": "deepseek-v3.2", "messages": [], "pad": "' + b"x" * 4096 + b'"}',
            413,
            "request_too_large",
        ),
    ],
)
async def test_request_errors(sidecar, body, status, code):
    got_status, headers, payload = await post(sidecar, body)
    assert got_status == status
    error = payload["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert len(error["message"]) > 20, "the message should say what to do"
    assert headers["X-Request-Id"]
    assert headers["X-TokenHub-Route"] == f"not routed: {code}"


async def test_request_id_is_echoed(sidecar):
    _, headers, _ = await post(sidecar, b"{}", **{"X-Request-Id": "my-trace-123"})
    assert headers["X-Request-Id"] == "my-trace-123"


async def test_openai_sdk_raises_typed_errors(sidecar):
    client = sidecar.client()
    with pytest.raises(openai.NotFoundError) as raised:
        await client.chat.completions.create(model="no-such-model", messages=[])
    assert raised.value.code == "model_not_found"


async def test_unknown_path_is_openai_shaped_404(sidecar):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sidecar.base_url}/v1/nope") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
