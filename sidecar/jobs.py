"""The video job map: which provider holds each job, and whether its one billable line is written.

A small JSON file beside the ledger (``<ledger path>.jobs.json``), replaced atomically on every
change, so a restart neither loses an open job nor bills a finished one twice. The write and its
fsync run in a worker thread, one at a time and in the order of the changes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from .log import get_logger


@dataclass(slots=True)
class Job:
    id: str
    provider: str
    model: str
    upstream_model: str
    region: str
    requested: str
    per_second: str
    created: float
    billed: bool = False
    closed: bool = False  # failed or billed: nothing left to poll

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def jobs_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".jobs.json")


class JobBook:
    """Job id -> ``Job``; ``lock`` serialises the check-then-bill of a completed job."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self.lock = asyncio.Lock()
        self._saving = asyncio.Lock()

    def load(self) -> None:
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            get_logger().error(
                "video job map unreadable; moved aside", path=str(aside), error=repr(exc)
            )
            os.replace(self.path, aside)
            return
        jobs = raw.get("jobs", {}) if isinstance(raw, dict) else {}
        self._jobs = {key: Job.from_json(value) for key, value in jobs.items()}

    async def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        await self._save()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def open_jobs(self) -> Iterator[Job]:
        return iter([job for job in self._jobs.values() if not job.closed])

    async def mark_billed(self, job_id: str) -> None:
        job = self._jobs[job_id]
        job.billed = job.closed = True
        await self._save()

    async def mark_closed(self, job_id: str) -> None:
        self._jobs[job_id].closed = True
        await self._save()

    def new_job(self, **values: Any) -> Job:
        return Job(created=self._clock(), **values)

    async def _save(self) -> None:
        # Shielded: a cancelled caller must not let the next save start while this write runs.
        await asyncio.shield(self._save_in_order())

    async def _save_in_order(self) -> None:
        async with self._saving:  # one write at a time, each of the newest snapshot
            data = orjson.dumps(
                {"jobs": {key: asdict(job) for key, job in self._jobs.items()}},
                option=orjson.OPT_INDENT_2,
            )
            await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
