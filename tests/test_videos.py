"""Video jobs through the sidecar with the openai SDK: create, poll, bill once, download."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar.config import Settings
from sidecar.handlers.videos import JOBS

from .conftest import RunningSidecar, provider
from .fakes import FakeUpstream, status

# The SDK marks its videos resource deprecated (the Sora API shuts down in 2026).
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

MODELS = {"sora-2": {"kind": "video", "upstream": "up-sora", "per_second": "0.1"}}


def video(state: str, job_id: str = "video_1") -> dict[str, Any]:
    return {
        "id": job_id,
        "object": "video",
        "model": "up-sora",
        "status": state,
        "progress": 100 if state == "completed" else 10,
        "created_at": 1735689600,
        "seconds": "8",
        "size": "720x1280",
    }


async def test_video_job_fails_over_on_create_then_bills_once_at_its_provider(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: Callable[[Settings], Awaitable[RunningSidecar]],
) -> None:
    alpha, beta = await fake_upstream(), await fake_upstream()
    settings = make_settings(
        [provider("alpha", alpha.url, models=MODELS), provider("beta", beta.url, models=MODELS)],
        routing={"sticky": False},
    )
    sidecar = await start_sidecar(settings)
    alpha.script(status(503))
    beta.script(
        status(200, body=video("queued")),
        status(200, body=video("in_progress")),
        status(200, body=video("completed")),
        status(200, body=video("completed")),
        status(200, body=b"MP4DATA"),
    )
    client = sidecar.client()
    job = await client.videos.create(model="sora-2", prompt="a cat", seconds="8")
    assert job.id == "video_1"
    assert b'name="model"\r\n\r\nup-sora\r\n' in beta.requests[0].body
    (created,) = sidecar.ledger_lines()
    assert created["billable"] is False and created["total_usd"] == "0"
    assert [a["provider"] for a in created["attempts"]] == ["alpha", "beta"]
    assert (await client.videos.retrieve(job.id)).status == "in_progress"
    assert (await client.videos.retrieve(job.id)).status == "completed"
    assert (await client.videos.retrieve(job.id)).status == "completed"
    content = await client.videos.download_content(job.id)
    assert content.content == b"MP4DATA"
    assert len(alpha.requests) == 1, "follow-ups go only to the provider holding the job"
    lines = sidecar.ledger_lines()
    billed = [line for line in lines if line["billable"]]
    assert len(billed) == 1 and billed[0]["usage"]["seconds"] == 8
    assert billed[0]["model_fee_usd"] == "0.8" and billed[0]["total_usd"] == "0.824"


async def test_a_job_nobody_polls_is_billed_by_the_sidecars_own_poll(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: Callable[[Settings], Awaitable[RunningSidecar]],
) -> None:
    alpha = await fake_upstream()
    sidecar = await start_sidecar(make_settings([provider("alpha", alpha.url, models=MODELS)]))
    alpha.script(
        status(200, body=video("queued", "video_9")),
        status(200, body=video("completed", "video_9")),
    )
    await sidecar.client().videos.create(model="sora-2", prompt="x")
    jobs = sidecar.app[JOBS]
    await jobs.poll_once(sidecar.runtime)
    await jobs.poll_once(sidecar.runtime)  # closed: not asked again, not billed again
    assert len(alpha.requests) == 2
    billed = [line for line in sidecar.ledger_lines() if line["billable"]]
    assert len(billed) == 1 and billed[0]["total_usd"] == "0.824"
    assert jobs.open_book.path.exists() and jobs.open_book.get("video_9").billed  # type: ignore[union-attr]
