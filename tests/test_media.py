"""Images and audio through the sidecar with the openai SDK; a 20 MB upload's daemon RSS."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from sidecar.config import Settings

from .conftest import Pair, RunningSidecar, provider
from .fakes import FakeUpstream, status
from .process import key_env, running, write_config

MODELS = {
    "gpt-image-1": {"kind": "image", "upstream": "up-image", "per_image": "0.04"},
    "whisper-1": {"kind": "audio", "upstream": "up-whisper", "per_second": "0.0001"},
    "tts-1": {"kind": "audio", "upstream": "up-tts", "per_mchar": "15"},
}
IMAGES = {"created": 1735689600, "data": [{"b64_json": "iVBORw0KGgo="}, {"b64_json": "iVBO"}]}
WAV = b"RIFF" + b"\x00" * 4096

StartSidecar = Callable[[Settings], Awaitable[RunningSidecar]]


@pytest.fixture
async def two(eu_and_us: Callable[[dict[str, Any]], Awaitable[Pair]]) -> Pair:
    return await eu_and_us(MODELS)


async def test_images_generate_bills_per_image_and_fails_over(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    alpha.script(status(429, headers={"Retry-After": "5"}))
    beta.script(status(200, body=IMAGES))
    result = await sidecar.client().images.generate(model="gpt-image-1", prompt="a cat", n=2)
    assert result.data is not None and len(result.data) == 2
    assert beta.requests[0].path == "/v1/images/generations"
    assert beta.requests[0].json == {"model": "up-image", "prompt": "a cat", "n": 2}
    (line,) = sidecar.ledger_lines()
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta"]
    assert line["usage"]["images"] == 2
    assert line["model_fee_usd"] == "0.08" and line["total_usd"] == "0.0824"


async def test_images_edit_passes_the_file_through_with_the_model_rewritten(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    alpha.script(status(200, body={**IMAGES, "data": IMAGES["data"][:1]}))
    picture = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    client = sidecar.client(default_headers={"X-TokenHub-Providers": "alpha"})
    result = await client.images.edit(
        model="gpt-image-1", image=("cat.png", io.BytesIO(picture), "image/png"), prompt="hat"
    )
    assert result.data is not None and len(result.data) == 1
    sent = alpha.requests[0]
    assert sent.path == "/v1/images/edits"
    assert sent.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="model"\r\n\r\nup-image\r\n' in sent.body
    assert b"gpt-image-1" not in sent.body
    assert picture in sent.body and b'filename="cat.png"' in sent.body
    (line,) = sidecar.ledger_lines()
    assert line["endpoint"] == "/v1/images/edits" and line["total_usd"] == "0.0412"


async def test_images_stay_inside_the_region_bound_and_the_model_kind(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    beta.script(status(503))
    client = sidecar.client(default_headers={"X-TokenHub-Regions": "us"})
    with pytest.raises(openai.APIStatusError) as failed:
        await client.images.generate(model="gpt-image-1", prompt="x")
    assert failed.value.status_code == 502
    assert not alpha.requests, "failover never leaves the narrowed region"
    (line,) = sidecar.ledger_lines()
    assert line["outcome"] == "upstream_failed" and line["billable"] is False
    with pytest.raises(openai.BadRequestError, match="audio model"):
        await sidecar.client().images.generate(model="whisper-1", prompt="x")
    assert len(beta.requests) == 1 and len(sidecar.ledger_lines()) == 1


async def test_transcription_bills_reported_seconds(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    alpha.script(status(502))
    beta.script(status(200, body={"text": "hello", "usage": {"type": "duration", "seconds": 12}}))
    result = await sidecar.client().audio.transcriptions.create(
        model="whisper-1", file=("a.wav", io.BytesIO(WAV), "audio/wav")
    )
    assert result.text == "hello"
    sent = beta.requests[0]
    assert b'name="model"\r\n\r\nup-whisper\r\n' in sent.body and WAV in sent.body
    (line,) = sidecar.ledger_lines()
    assert line["provider"] == "beta" and line["usage"]["seconds"] == 12
    assert line["model_fee_usd"] == "0.0012" and line["total_usd"] == "0.001236"


async def test_speech_streams_audio_and_bills_characters(
    two: tuple[FakeUpstream, FakeUpstream, RunningSidecar],
) -> None:
    alpha, beta, sidecar = two
    alpha.script(status(500))
    beta.script(status(200, body=WAV))
    speech = await sidecar.client().audio.speech.create(
        model="tts-1", voice="alloy", input="Hello, world"
    )
    assert speech.content == WAV
    assert beta.requests[0].json["model"] == "up-tts"
    (line,) = sidecar.ledger_lines()
    assert [a["provider"] for a in line["attempts"]] == ["alpha", "beta"]
    # 12 characters at 15 USD per million characters, plus the 3 % service fee.
    assert line["model_fee_usd"] == "0.00018" and line["total_usd"] == "0.0001854"


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def test_a_20_mb_upload_passes_through_without_growing_the_daemon(
    tmp_path: Path, fake_upstream: Callable[..., Awaitable[FakeUpstream]]
) -> None:
    upstream = await fake_upstream(default=status(200, body={"text": "ok"}))
    providers = [provider("alpha", upstream.url, models=MODELS)]
    path = write_config(
        tmp_path / "config.toml", providers, server={"max_body_bytes": 32 * 1024 * 1024}
    )
    size = 20 * 1024 * 1024

    def form(payload: bytes) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("model", "whisper-1")
        data.add_field("file", io.BytesIO(payload), filename="big.wav", content_type="audio/wav")
        return data

    async with running(path, env=key_env(providers)) as daemon, aiohttp.ClientSession() as http:
        url = f"{daemon.url}/v1/audio/transcriptions"
        async with http.post(url, data=form(WAV)) as warm:
            assert warm.status == 200
        before = _rss_kib(daemon.pid, "VmRSS")
        payload = bytes(range(251)) * (size // 251)  # a pattern: a lost or moved chunk shows
        async with http.post(url, data=form(payload)) as big:
            assert big.status == 200, await big.text()
        peak = _rss_kib(daemon.pid, "VmHWM")
    assert payload in upstream.requests[-1].body
    assert peak - before < 10 * 1024, f"daemon RSS grew by {peak - before} KiB"


async def test_budget_caps_refuse_media_requests_by_their_worst_case(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: StartSidecar,
) -> None:
    alpha = await fake_upstream(default=status(200, body={**IMAGES, "data": IMAGES["data"][:1]}))
    settings = make_settings(
        [provider("alpha", alpha.url, models=MODELS)], budget={"daily_usd": "0.05"}
    )
    sidecar = await start_sidecar(settings)
    client = sidecar.client()

    async def refused(call: Awaitable[object]) -> None:
        with pytest.raises(openai.RateLimitError) as caught:
            await call
        assert caught.value.code == "budget_exceeded"

    # images: n x per_image = 2 x 0.04 (+3 %) > 0.05
    await refused(client.images.generate(model="gpt-image-1", prompt="x", n=2))
    # transcription: unknown length, reserved as 600 s x 0.0001 (+3 %) = 0.0618 > 0.05
    await refused(
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", io.BytesIO(WAV)))
    )
    assert not alpha.requests and not sidecar.ledger_lines(), "refused before any upstream call"
    await client.images.generate(model="gpt-image-1", prompt="x")  # 0.0412 fits, and is settled
    # speech: 1000 characters x 15 per million (+3 %) = 0.01545 > the 0.0088 left today
    await refused(client.audio.speech.create(model="tts-1", voice="alloy", input="a" * 1000))
    await refused(client.images.generate(model="gpt-image-1", prompt="x"))
    assert len(alpha.requests) == 1 and len(sidecar.ledger_lines()) == 1
