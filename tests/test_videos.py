"""Video jobs through the sidecar with the openai SDK: create, poll, bill once, download."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import openai
import pytest

from sidecar.config import Settings
from sidecar.handlers.videos import JOBS

from .conftest import RunningSidecar, provider
from .fakes import FakeUpstream, status

# The SDK marks its videos resource deprecated (the Sora API shuts down in 2026): ignored only on
# the tests that call it.
sora_deprecated = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

MODELS = {"sora-2": {"kind": "video", "upstream": "up-sora", "per_second": "0.1"}}


StartAlpha = Callable[..., Awaitable[tuple[FakeUpstream, RunningSidecar]]]


@pytest.fixture
def alpha_sidecar(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: Callable[[Settings], Awaitable[RunningSidecar]],
) -> StartAlpha:
    """Start one fake provider, alpha, serving ``MODELS``, and a sidecar in front of it."""

    async def start(**sections: Any) -> tuple[FakeUpstream, RunningSidecar]:
        alpha = await fake_upstream()
        settings = make_settings([provider("alpha", alpha.url, models=MODELS)], **sections)
        return alpha, await start_sidecar(settings)

    return start


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


@sora_deprecated
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
    created, *polls, download = sidecar.ledger_lines()
    assert len(polls) == 3, "each client poll writes its one line"
    assert [p["billable"] for p in polls] == [False, True, False]
    assert all(p["endpoint"] == "/v1/videos/{video_id}" and p["outcome"] == "ok" for p in polls)
    assert [p["total_usd"] for p in polls] == ["0", "0.824", "0"]
    billed = polls[1]
    assert billed["usage"]["seconds"] == 8 and billed["model_fee_usd"] == "0.8"
    assert billed["provider"] == "beta" and billed["upstream_model"] == "up-sora"
    assert download["endpoint"] == "/v1/videos/{video_id}/content"
    assert download["billable"] is False and download["total_usd"] == "0"
    assert download["outcome"] == "ok" and download["attempts"][0]["provider"] == "beta"


@sora_deprecated
async def test_a_job_nobody_polls_is_billed_by_the_sidecars_own_poll(
    alpha_sidecar: StartAlpha,
) -> None:
    alpha, sidecar = await alpha_sidecar()
    alpha.script(
        status(200, body=video("queued", "video_9")),
        status(200, body=video("in_progress", "video_9")),
        status(200, body=video("completed", "video_9")),
    )
    await sidecar.client().videos.create(model="sora-2", prompt="x")
    jobs = sidecar.app[JOBS]
    await jobs.poll_once(sidecar.runtime)  # in progress: no line
    assert len(sidecar.ledger_lines()) == 1
    await jobs.poll_once(sidecar.runtime)
    await jobs.poll_once(sidecar.runtime)  # closed: not asked again, not billed again
    assert len(alpha.requests) == 3
    created, billed = sidecar.ledger_lines()  # its own polls write only the billing line
    assert created["billable"] is False and billed["billable"] is True
    assert billed["total_usd"] == "0.824" and billed["request_id"].startswith("poll-")
    assert jobs.open_book.path.exists() and jobs.open_book.get("video_9").billed  # type: ignore[union-attr]


@sora_deprecated
async def test_a_poll_that_cannot_reach_the_jobs_provider_is_a_502_with_its_unbilled_line(
    alpha_sidecar: StartAlpha,
) -> None:
    alpha, sidecar = await alpha_sidecar()
    alpha.script(status(200, body=video("queued", "video_5")))
    client = sidecar.client()
    await client.videos.create(model="sora-2", prompt="x")
    await alpha.close()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.videos.retrieve("video_5")
    assert caught.value.status_code == 502
    _, failed = sidecar.ledger_lines()
    assert failed["outcome"] == "upstream_failed" and failed["billable"] is False
    assert failed["status"] == 502 and failed["attempts"][0]["status"] is None


@sora_deprecated
async def test_a_create_reserves_its_seconds_and_a_poll_bill_counts_against_the_cap(
    alpha_sidecar: StartAlpha,
) -> None:
    alpha, sidecar = await alpha_sidecar(budget={"daily_usd": "1"})
    alpha.script(
        status(200, body=video("queued", "video_7")),
        status(200, body=video("completed", "video_7")),
    )
    client = sidecar.client()
    with pytest.raises(openai.RateLimitError) as caught:  # 12 s x 0.1 (+3 %) = 1.236 > 1
        await client.videos.create(model="sora-2", prompt="x", seconds="12")
    assert caught.value.code == "budget_exceeded" and not alpha.requests
    await client.videos.create(model="sora-2", prompt="x", seconds="8")  # reserves 0.824
    await client.videos.retrieve("video_7")  # bills 0.824 (the fake's video says 8 s)
    assert sidecar.runtime.budget.day_spent == Decimal("0.824")
    with pytest.raises(openai.RateLimitError):  # the default 4 s: 0.412 more would pass 1
        await client.videos.create(model="sora-2", prompt="x")
    assert len(alpha.requests) == 2
