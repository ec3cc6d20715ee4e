"""The demo providers' image, audio and video endpoints: small generated files, no real models.

Images are a 64 x 64 gradient PNG coloured by the prompt; speech is a WAV sine tone as long as
the text takes to read; a transcription answers a plausible sentence with the audio's seconds; a
video job is queued, then in progress, then completed ``video_duration_s`` after its creation, and
its content is a few bytes of a fake MP4.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
import struct
import wave
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.demo.providers import DemoModel, DemoSpec

Clock = Callable[[], float]
IMAGE_SIDE = 64
SAMPLE_RATE = 8000
SECONDS_PER_CHARACTER = 0.06  # about 15 characters a second, as a person reads aloud
MAX_SPEECH_SECONDS = 10.0
VIDEO_SECONDS = ("4", "8", "12")
VIDEO_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
# The shortest valid-looking MP4: an ftyp box and an empty-ish mdat box.
FAKE_MP4 = (
    struct.pack(">I", 24)
    + b"ftypisom"
    + struct.pack(">I", 512)
    + b"isomiso2"
    + struct.pack(">I", 16)
    + b"mdat"
    + b"tokenhub"
)
_SENTENCES = (
    "Thanks for calling, this is the demo transcription speaking.",
    "The quarterly numbers look good and the team is on track.",
    "Please remember to water the plants before the weekend.",
    "Let's meet again on Thursday to go over the plan.",
)


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """An RGB PNG: a diagonal gradient from black to ``colour``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            shade = (x + y) / max(width + height - 2, 1)
            rows.extend(int(c * shade) for c in colour)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


def wav(seconds: float, frequency: float, rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV sine tone."""
    frames = int(seconds * rate)
    samples = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * frequency * i / rate)))
        for i in range(frames)
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples)
    return out.getvalue()


def audio_seconds(data: bytes) -> float:
    """A WAV's length from its header; any other audio is taken as 16 kB a second (128 kbit/s)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            return reader.getnframes() / reader.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError):
        return len(data) / 16000


def _colour(text: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(text.encode()).digest()
    return (64 + digest[0] % 192, 64 + digest[1] % 192, 64 + digest[2] % 192)


@dataclass
class _VideoJob:
    id: str
    model: str
    prompt: str
    seconds: str
    size: str
    created: float


@dataclass
class DemoMedia:
    """One demo provider's media endpoints and its video jobs."""

    spec: DemoSpec
    rng: random.Random
    clock: Clock
    video_duration_s: float
    jobs: dict[str, _VideoJob] = field(default_factory=dict)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/images/generations", self.images_generations),
            web.post("/v1/images/edits", self.images_edits),
            web.post("/v1/audio/speech", self.speech),
            web.post("/v1/audio/transcriptions", self.transcriptions),
            web.post("/v1/videos", self.create_video),
            web.get("/v1/videos/{video_id}", self.retrieve_video),
            web.get("/v1/videos/{video_id}/content", self.video_content),
        ]

    async def images_generations(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        self._model(body.get("model"), "image", request.path)
        return self._images(body.get("prompt"), body.get("n"), salt="")

    async def images_edits(self, request: web.Request) -> web.Response:
        form = await request.post()
        self._model(form.get("model"), "image", request.path)
        uploads = [
            v for k, v in form.items() if k.startswith("image") and isinstance(v, web.FileField)
        ]
        if not uploads:
            raise _reject(400, "an image file is required", "image")
        return self._images(form.get("prompt"), form.get("n"), salt=uploads[0].filename or "image")

    def _images(self, prompt: object, n: object, *, salt: str) -> web.Response:
        if not isinstance(prompt, str) or not prompt:
            raise _reject(400, "'prompt' must be a non-empty string", "prompt")
        count = int(n) if isinstance(n, (int, str)) and str(n).isdigit() else 1
        if not 1 <= count <= 10:
            raise _reject(400, "'n' must be an integer from 1 to 10", "n")
        data = [
            {
                "b64_json": base64.b64encode(
                    png(IMAGE_SIDE, IMAGE_SIDE, _colour(f"{salt}{prompt}{i}"))
                ).decode()
            }
            for i in range(count)
        ]
        return web.json_response({"created": int(self.clock()), "data": data})

    async def speech(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        self._model(body.get("model"), "audio", request.path)
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise _reject(400, "'input' must be a non-empty string", "input")
        seconds = min(MAX_SPEECH_SECONDS, max(0.2, len(text) * SECONDS_PER_CHARACTER))
        voice = str(body.get("voice", "alloy"))
        tone = 220 + _colour(voice)[0] * 2
        return web.Response(body=wav(seconds, tone), content_type="audio/wav")

    async def transcriptions(self, request: web.Request) -> web.Response:
        form = await request.post()
        self._model(form.get("model"), "audio", request.path)
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise _reject(400, "a 'file' upload is required", "file")
        seconds = max(1, math.ceil(audio_seconds(upload.file.read())))
        text = " ".join(self.rng.choice(_SENTENCES) for _ in range(1 + seconds // 10))
        usage = {"type": "duration", "seconds": seconds}
        fmt = form.get("response_format", "json")
        if fmt == "text":
            return web.Response(text=text)
        if fmt == "verbose_json":
            return web.json_response(
                {
                    "task": "transcribe",
                    "language": "english",
                    "duration": seconds,
                    "text": text,
                    "usage": usage,
                }
            )
        return web.json_response({"text": text, "usage": usage})

    async def create_video(self, request: web.Request) -> web.Response:
        fields: dict[str, Any]
        if request.content_type.startswith("multipart/"):
            fields = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        else:
            fields = await _json_body(request)
        model = self._model(fields.get("model"), "video", request.path)
        seconds, size = str(fields.get("seconds", "4")), str(fields.get("size", VIDEO_SIZES[0]))
        if seconds not in VIDEO_SECONDS:
            raise _reject(400, f"'seconds' must be one of {', '.join(VIDEO_SECONDS)}", "seconds")
        if size not in VIDEO_SIZES:
            raise _reject(400, f"'size' must be one of {', '.join(VIDEO_SIZES)}", "size")
        job_id = "video_" + "".join(self.rng.choices("0123456789abcdef", k=32))
        job = _VideoJob(
            job_id, model.upstream, str(fields.get("prompt", "")), seconds, size, self.clock()
        )
        self.jobs[job_id] = job
        return web.json_response(self._video(job))

    async def retrieve_video(self, request: web.Request) -> web.Response:
        return web.json_response(self._video(self._job(request)))

    async def video_content(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if self._video(job)["status"] != "completed":
            raise _reject(400, f"video {job.id} is not completed yet", None, "video_not_ready")
        return web.Response(body=FAKE_MP4, content_type="video/mp4")

    def _job(self, request: web.Request) -> _VideoJob:
        job = self.jobs.get(request.match_info["video_id"])
        if job is None:
            raise _reject(404, f"no video {request.match_info['video_id']!r}", None, "not_found")
        return job

    def _video(self, job: _VideoJob) -> dict[str, Any]:
        duration = self.video_duration_s
        elapsed = self.clock() - job.created
        done = elapsed >= duration
        if done:
            status, progress = "completed", 100
        elif elapsed < duration / 4:
            status, progress = "queued", 0
        else:
            status, progress = "in_progress", int(100 * elapsed / duration)
        return {
            "id": job.id,
            "object": "video",
            "model": job.model,
            "status": status,
            "progress": progress,
            "created_at": int(job.created),
            "completed_at": int(job.created + duration) if done else None,
            "expires_at": int(job.created + 86400) if done else None,
            "prompt": job.prompt,
            "size": job.size,
            "seconds": job.seconds,
            "remixed_from_video_id": None,
            "error": None,
        }

    def _model(self, name: object, kind: str, path: str) -> DemoModel:
        if not isinstance(name, str) or not name:
            raise _reject(400, "you must provide a model parameter", "model")
        model = self.spec.model(name)
        if model is None:
            raise _reject(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                "model",
                "model_not_found",
            )
        if model.kind != kind:
            raise _reject(
                400,
                f"{name} is a {model.kind} model; it is not supported on {path}",
                "model",
                "unsupported_model",
            )
        return model


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _reject(400, "We could not parse the JSON body of your request.", None) from None
    if not isinstance(body, dict):
        raise _reject(400, "the body must be a JSON object", None)
    return body


def _reject(
    status: int, message: str, param: str | None, code: str | None = None
) -> web.HTTPException:
    """An OpenAI-shaped error answer, raised from a handler."""
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    kind = web.HTTPNotFound if status == 404 else web.HTTPBadRequest
    return kind(text=json.dumps(body), content_type="application/json")
