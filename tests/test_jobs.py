"""The video job map on disk: every change saved in order, off the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar.jobs import Job, JobBook


def new_job(book: JobBook, n: int) -> Job:
    return book.new_job(
        id=f"video_{n}",
        provider="alpha",
        model="sora-2",
        upstream_model="sora-2",
        region="eu",
        requested="sora-2",
        per_second="0.1",
    )


async def test_concurrent_changes_all_land_even_when_a_caller_goes_away(tmp_path: Path) -> None:
    book = JobBook(tmp_path / "ledger.jsonl.jobs.json")
    adds = [asyncio.create_task(book.add(new_job(book, n))) for n in range(20)]
    await asyncio.sleep(0)  # every add has changed the map and is saving
    adds[5].cancel()  # its caller went away mid-save: the change stays, and no write tears
    await asyncio.gather(*adds, return_exceptions=True)
    await book.mark_billed("video_3")
    await book.mark_closed("video_7")

    reloaded = JobBook(book.path)
    reloaded.load()
    assert {job.id for job in reloaded.open_jobs()} == {f"video_{n}" for n in range(20)} - {
        "video_3",
        "video_7",
    }
    billed = reloaded.get("video_3")
    assert billed is not None and billed.billed and billed.closed
    assert not book.path.with_name(book.path.name + ".tmp").exists()
