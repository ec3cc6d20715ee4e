"""The demo providers' images, audio and video, through the real sidecar with the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import wave
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import Settings
from sidecar.demo import DemoProviders, demo_config
from sidecar.demo.media import FAKE_MP4, png, wav

from .conftest import RunningSidecar

StartSidecar = Callable[[Settings], Awaitable[RunningSidecar]]


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar, tmp_path: Path) -> AsyncIterator[RunningSidecar]:
    async with DemoProviders(token_delay_s=0, video_duration_s=0.3) as providers:
        raw = demo_config(providers, listen="127.0.0.1:0", ledger_path=str(tmp_path / "l.jsonl"))
        yield await start_sidecar(config.from_mapping(raw, environ={}))


def test_png_and_wav_are_well_formed() -> None:
    image = png(4, 3, (200, 100, 50))
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", image[16:24]) == (4, 3)
    idat = image.index(b"IDAT")
    (length,) = struct.unpack(">I", image[idat - 4 : idat])
    assert len(zlib.decompress(image[idat + 4 : idat + 4 + length])) == 3 * (1 + 4 * 3)
    with wave.open(io.BytesIO(wav(0.5, 440)), "rb") as reader:
        assert reader.getnframes() == 4000 and reader.getsampwidth() == 2


async def test_images_generate_bills_per_image(sidecar: RunningSidecar) -> None:
    client = sidecar.client(default_headers={"X-TokenHub-Providers": "aurora"})
    result = await client.images.generate(model="gpt-image-1", prompt="a lighthouse", n=2)
    assert result.data is not None and len(result.data) == 2
    picture = base64.b64decode(result.data[0].b64_json or "")
    assert picture.startswith(b"\x89PNG") and picture != base64.b64decode(
        result.data[1].b64_json or ""
    )
    (line,) = sidecar.ledger_lines()
    assert line["provider"] == "aurora" and line["usage"]["images"] == 2
    assert line["model_fee_usd"] == "0.08" and line["total_usd"] == "0.0824"


async def test_images_edit_takes_a_file(sidecar: RunningSidecar) -> None:
    client = sidecar.client(default_headers={"X-TokenHub-Providers": "borealis"})
    source = ("in.png", io.BytesIO(png(8, 8, (10, 20, 30))), "image/png")
    result = await client.images.edit(model="gpt-image-1", image=source, prompt="add a hat")
    assert result.data is not None and len(result.data) == 1
    (line,) = sidecar.ledger_lines()
    assert line["provider"] == "borealis" and line["total_usd"] == "0.04326"


async def test_speech_then_its_transcription(sidecar: RunningSidecar) -> None:
    client = sidecar.client()
    text = "Hello from the demo provider."  # 29 characters
    speech = await client.audio.speech.create(model="tts-1", voice="alloy", input=text)
    with wave.open(io.BytesIO(speech.content), "rb") as reader:
        seconds = reader.getnframes() / reader.getframerate()
    assert seconds == pytest.approx(29 * 0.06)
    transcript = await client.audio.transcriptions.create(
        model="whisper-1", file=("hello.wav", io.BytesIO(speech.content), "audio/wav")
    )
    assert transcript.text.endswith(".")
    said, heard = sidecar.ledger_lines()
    assert said["endpoint"] == "/v1/audio/speech" and said["provider"] == "aurora"
    # 29 characters at 15 USD per million, plus the 3 % service fee.
    assert said["model_fee_usd"] == "0.000435" and said["total_usd"] == "0.00044805"
    # ceil(1.74 s) = 2 s at 0.0001 USD a second, plus 3 %.
    assert heard["usage"]["seconds"] == 2 and heard["total_usd"] == "0.000206"


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
async def test_video_job_completes_and_is_billed_once(sidecar: RunningSidecar) -> None:
    client = sidecar.client()
    job = await client.videos.create(model="sora-2", prompt="waves", seconds="4")
    assert job.status == "queued"
    states = [job.status]
    for _ in range(100):
        job = await client.videos.retrieve(job.id)
        states.append(job.status)
        if job.status == "completed":
            break
        await asyncio.sleep(0.05)
    assert states[-1] == "completed" and "in_progress" in states
    content = await client.videos.download_content(job.id)
    assert content.content == FAKE_MP4
    created, *polls, download = sidecar.ledger_lines()
    assert created["billable"] is False and len(polls) == len(states) - 1
    billed = [p for p in polls if p["billable"]]
    assert billed == [polls[-1]] and billed[0]["usage"]["seconds"] == 4
    # 4 s at 0.10 USD a second, plus 3 %.
    assert billed[0]["model_fee_usd"] == "0.4" and billed[0]["total_usd"] == "0.412"
    assert download["billable"] is False and download["total_usd"] == "0"
