"""The append-only cost ledger: one I/O thread, a SHA-256 hash chain, fsync policy, rotation.

Every record is one JSON line whose ``prev`` is the SHA-256 (hex) of the previous line's bytes,
newline included. Handlers call ``append()``; it returns once the line is written to the OS (and
fsynced under ``fsync = "always"``), so a handler that awaits it before sending the last byte
never delivers an unrecorded answer, even under SIGKILL.

Lines queued while a write or fsync runs go out together in the next write (group commit), and
every write, fsync and rename runs on one I/O thread, never on the event loop. Under
``fsync = "interval"`` the fsync that comes due runs right after the next write, so steady load
cannot put it off; that write's callers are settled before it starts, as their lines are already
in the OS (only ``always`` promises a line on disk). A write or fsync error makes the ledger
unavailable (handlers answer 503 ``ledger_unavailable``) until the file can be written again:
the ledger reopens it, repairs its tail and probes the disk every ``retry_s``.

After a rotation, the rotated file's summary (``ledger_summary``) is written by a task of its
own, in a child process at the lowest CPU priority, so appends never wait for it and the event
loop never waits for the GIL it would hold; failing to write one is only a warning. At open,
one more such task writes the summaries that the rotated files there lack or that no longer
hold, so that the first ``usage`` after an upgrade need not read those files.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import re
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson

from sidecar.billing import usd
from sidecar.config import LedgerConfig
from sidecar.errors import LedgerUnavailable
from sidecar.iothread import IoThread
from sidecar.log import UtcStamps, get_logger

LEDGER_VERSION: Final = 1
GENESIS: Final = "0" * 64
_TAIL_WINDOW = 1 << 20
_LINE: Final = b'{"v":%d,"ts":"%%b",%%b,"prev":"%%b"}\n' % LEDGER_VERSION
_PROBE_BYTES = 4096
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def rotated_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number:06d}")


def rotated_numbers(path: Path) -> list[int]:
    """The numbers of the rotated files beside ``path`` (``<path>.000001`` ...), ascending."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d{6,})")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


def format_ts(moment: datetime) -> str:
    """UTC ISO-8601 with milliseconds and ``Z``: ``2025-01-31T23:59:59.123Z``."""
    if moment.tzinfo is UTC:
        return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return usd(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _is_record(line: bytes) -> bool:
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("prev"), str)


def _last_record(data: bytes) -> tuple[int, bytes | None]:
    """(end offset of the last whole, parseable line in ``data``, that line) or (0, None)."""
    end = len(data)
    while end > 0:
        newline = data.rfind(b"\n", 0, end)
        if newline < 0:
            return 0, None
        start = data.rfind(b"\n", 0, newline) + 1
        line = data[start : newline + 1]
        if _is_record(line):
            return newline + 1, line
        end = start
    return 0, None


def find_tail(fd: int) -> tuple[int, int, bytes | None]:
    """(file size, offset where the valid lines end, last valid line) of an open ledger file.

    Reads backwards in growing windows, so a 100 MB file costs one small read.
    """
    size = os.fstat(fd).st_size
    window = _TAIL_WINDOW
    while True:
        base = max(0, size - window)
        data = os.pread(fd, size - base, base)
        if base > 0:
            # Start at a line boundary: drop the partial first line of the window.
            first = data.find(b"\n")
            if first < 0:
                window *= 2
                continue
            base += first + 1
            data = data[first + 1 :]
        end, line = _last_record(data)
        if line is not None or base == 0:
            return size, base + end, line
        window *= 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LedgerLocked(Exception):
    """Another daemon holds the ledger; ``str()`` is the one line printed at start."""

    def __init__(self, path: Path, lock_path: Path) -> None:
        super().__init__(path, lock_path)
        self.path = path
        self.lock_path = lock_path

    def __str__(self) -> str:
        return (
            f"{self.path}: another tokenhub-sidecar is using this ledger (it holds "
            f"{self.lock_path}); stop that daemon or set ledger.path to a different file"
        )


class _WriteFailed(Exception):
    def __init__(self, written: int, cause: BaseException) -> None:
        super().__init__(written, cause)
        self.written = written
        self.cause = cause


# A queued line: its ``ts``, its fields as JSON without the braces, and who waits for it.
_Item = tuple[bytes, bytes, "asyncio.Future[None]"]


class Ledger:
    """The single writer of one ledger file (and its rotated predecessors).

    There is no writer task. When nothing runs on the I/O thread, ``append()`` schedules the
    next job for the end of the loop turn; each job's completion, on the loop, settles its
    callers and schedules the next. At most one job (a write, an fsync, a recovery) runs at a
    time, and the lines queued meanwhile go out together in the next write.
    """

    def __init__(
        self,
        config: LedgerConfig,
        *,
        clock: Callable[[], datetime] | None = None,
        write: Callable[[int, bytes], int] = os.write,
        fsync: Callable[[int], None] = os.fsync,
        retry_s: float = 1.0,
        observe: Callable[[float], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._path = config.path
        self._lock_path = config.path.with_name(config.path.name + ".lock")
        # The default stamps format the date once a second; a given clock is for tests.
        self._stamp = UtcStamps(digits=3).now if clock is None else lambda: format_ts(clock())
        self._write = write
        self._fsync = fsync
        self._retry_s = retry_s
        self._observe = observe
        self._on_failure = on_failure
        self._pending: list[_Item] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: IoThread | None = None
        self._busy = False  # a job runs on the I/O thread
        self._kicked = False  # _kick is scheduled
        self._sync_due = False  # the interval fsync follows the next write
        self._sync_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None  # close() waits on it
        self._rotated: list[Path] = []  # rotated by the I/O thread, not yet summarized
        self._summaries: set[asyncio.Task[None]] = set()
        self._closing = False
        self._fd = -1
        self._lock_fd = -1
        self._size = 0
        self._last_hash = GENESIS
        self._dirty = False
        self._available = False
        self._last_sync = 0.0
        self._failed_at = 0.0
        self._log = get_logger("sidecar.ledger")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def available(self) -> bool:
        return self._available

    @property
    def last_hash(self) -> str:
        return self._last_hash

    async def open(self) -> None:
        """Take the lock, repair a torn tail, find the chain's head and start the I/O thread;
        then back-fill the rotated files' summaries in the background."""
        rotated = await asyncio.to_thread(self._open_sync)
        self._loop = asyncio.get_running_loop()
        self._io = IoThread(self._loop, "ledger-io")
        self._available = True
        self._last_sync = self._loop.time()
        self._track_summary(self._backfill_summaries(rotated), "ledger-summary-backfill")

    async def close(self) -> None:
        """Write what is queued, fsync, close the file and release the lock."""
        if self._io is None or self._closing:
            return
        self._closing = True
        if self._busy or self._kicked:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        for timer in (self._sync_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        await self._io.run(self._close_sync)
        await self._io.stop()
        # A summary being written finishes (asyncio.run would wait for its thread anyway); the
        # back-fill starts no other.
        await asyncio.gather(*self._summaries)

    async def append(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as a line that starts with ``v`` and ``ts`` and ends with ``prev``
        (so ``record`` holds none of those three); see the module docstring."""
        if self._loop is None or self._closing:
            raise LedgerUnavailable("the ledger is not open; requests are refused until it is")
        if not record:
            raise ValueError("a ledger record needs at least one field")
        body = orjson.dumps(record, default=_json_default)
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((self._stamp().encode(), body[1:-1], future))
        if not self._busy:
            self._schedule()
        await future

    # -- jobs: started on the loop, run on the I/O thread, completed on the loop -------------

    def _schedule(self) -> None:
        """Start the next job at the end of this loop turn, not now: the lines every handler
        queues in this turn then go out in one write (group commit)."""
        if not self._kicked:
            self._kicked = True
            self._running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        self._kicked = False
        if self._busy:  # a probe started meanwhile; its end schedules the next job
            return
        self._start_next()
        if not self._busy and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _start_next(self) -> None:
        """Start the next job, if there is one: the queued lines (with the fsync, if one is
        due), a due fsync alone, or, while the file is unavailable, a reopen for queued lines."""
        assert self._io is not None and not self._busy
        if not self._available:
            if self._pending:
                self._busy = True
                self._io.submit(self._recover_sync, (False,), self._reopened)
        elif self._pending:
            batch, self._pending = self._pending, []
            lines, head = self._chain(batch)
            always = self._config.fsync == "always"
            sync_after = self._sync_due and not always
            done = partial(self._written, batch, head, always, sync_after, self._now())
            self._busy = True
            self._io.submit(self._write_sync, (lines, always), done)
            if sync_after:  # the thread fsyncs while the loop settles the write's callers
                self._io.submit(self._sync_sync, (), self._synced)
        elif self._sync_due:
            if self._dirty:
                self._busy = True
                self._io.submit(self._sync_sync, (), self._synced)
            else:
                self._sync_due = False

    def _finished(self) -> None:
        """A job is done: arm the timers, then the next job (or close()) goes on."""
        self._busy = False
        self._summarize_rotated()
        if not self._closing:
            self._arm_timers()
        self._schedule()

    def _written(
        self,
        batch: list[_Item],
        head: str,
        synced: bool,
        sync_after: bool,
        started: float,
        _result: object,
        error: BaseException | None,
    ) -> None:
        """A write is done; with ``sync_after`` its fsync runs on, and ``_synced`` ends the job."""
        if error is None:
            self._resolve(batch)
            self._last_hash = head
            if synced:
                self._sync_due = False
                self._last_sync = self._now()
            if self._observe is not None:
                self._observe(self._now() - started)
        else:
            failed = error if isinstance(error, _WriteFailed) else _WriteFailed(0, error)
            self._fail(failed.cause)
            self._resolve(batch, failed.written)
        if not sync_after:
            self._finished()

    def _synced(self, _result: object, error: BaseException | None) -> None:
        if error is not None:
            self._fail(error)
        self._sync_due = False
        self._last_sync = self._now()
        self._finished()

    def _reopened(self, _result: object, error: BaseException | None) -> None:
        """A reopen (for queued lines) or a probe (on the retry timer) is done; if it failed,
        the lines queued meanwhile fail with it."""
        if error is None:
            self._available = True
            self._last_sync = self._now()
            self._log.info("ledger_available", path=str(self._path))
        else:
            self._fail(error)
            batch, self._pending = self._pending, []
            self._resolve(batch, 0)
        self._finished()

    def _arm_timers(self) -> None:
        loop = self._running_loop()
        if not self._available:
            if self._retry_timer is None:
                self._retry_timer = loop.call_at(self._failed_at + self._retry_s, self._retry)
        elif (
            self._config.fsync == "interval"
            and self._dirty
            and self._sync_timer is None
            and not self._sync_due
        ):
            due = self._last_sync + self._config.fsync_interval_ms / 1000
            self._sync_timer = loop.call_at(due, self._sync_now)

    def _sync_now(self) -> None:
        self._sync_timer = None
        self._sync_due = True
        if not self._busy and not self._closing:
            self._schedule()

    def _retry(self) -> None:
        self._retry_timer = None
        if self._busy or self._available or self._closing:  # a running job re-arms it
            return
        assert self._io is not None
        self._busy = True
        self._io.submit(self._recover_sync, (True,), self._reopened)

    def _now(self) -> float:
        return self._running_loop().time()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the ledger runs only between open() and close()"
        return self._loop

    def _chain(self, batch: list[_Item]) -> tuple[list[bytes], str]:
        head = self._last_hash
        lines = []
        for ts, fields, _ in batch:
            line = _LINE % (ts, fields, head.encode())
            head = line_hash(line)
            lines.append(line)
        return lines, head

    def _summarize_rotated(self) -> None:
        for file in self._rotated:
            self._track_summary(self._summarize(file), "ledger-summary")
        self._rotated.clear()

    def _track_summary(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` as a task that close() waits for."""
        task = asyncio.create_task(work, name=name)
        self._summaries.add(task)
        task.add_done_callback(self._summaries.discard)

    async def _summarize(self, file: Path, *, unless_usable: bool = False) -> None:
        """Run ``python -m sidecar.ledger_summary`` for ``file`` and wait for it. A summary
        only spares ``usage`` a read: its failure is a warning, never a ledger failure."""
        argv = [sys.executable, "-m", "sidecar.ledger_summary"]
        argv += ["--unless-usable", str(file)] if unless_usable else [str(file)]
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            self._log.warning("ledger_summary_failed", path=str(file), error=str(exc))
            return
        try:
            _, errors = await child.communicate()
        except BaseException:
            child.kill()
            await child.wait()
            raise
        if child.returncode != 0:
            lines = errors.decode("utf-8", "replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {child.returncode}"
            self._log.warning("ledger_summary_failed", path=str(file), error=why)

    async def _backfill_summaries(self, rotated: list[Path]) -> None:
        """Write each summary of ``rotated`` that ``usage`` could not use (none, or one that no
        longer holds), until close().

        Newest first: at start the budget's ``spent_since`` summarizes this month's files oldest
        first, so the two meet at one file instead of both going through all of them. A close()
        waits only for the file in progress, not for the rest (a stop must not take minutes).
        """
        for file in reversed(rotated):
            if self._closing:
                return
            await self._summarize(file, unless_usable=True)

    def _resolve(self, batch: list[_Item], written: int | None = None) -> None:
        """Settle each caller: the first ``written`` (default: all) succeed, the rest fail."""
        if written is None:
            written = len(batch)
        for index, (_, _, future) in enumerate(batch):
            if future.done():  # the caller was cancelled; its line is written all the same
                continue
            if index < written:
                future.set_result(None)
            else:
                future.set_exception(
                    LedgerUnavailable(
                        "the ledger cannot be written (disk full or I/O error); model requests "
                        f"are refused until {self._path} is writable again"
                    )
                )

    def _fail(self, exc: BaseException) -> None:
        if self._on_failure is not None:
            self._on_failure()
        if self._available:
            self._log.error("ledger_unavailable", path=str(self._path), error=str(exc))
        self._available = False
        self._failed_at = self._now()

    # -- blocking parts, run in a worker thread ---------------------------------------------

    def _open_sync(self) -> list[Path]:
        """Lock and open the ledger; return the rotated files there are before any append, so
        that the back-fill leaves those this ledger rotates to their own summary task."""
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        try:
            self._open_file()
        except BaseException:
            self._unlock()
            raise
        return self._rotated_files()

    def _rotated_files(self) -> list[Path]:
        try:
            numbers = rotated_numbers(self._path)
        except OSError as exc:  # only the back-fill needs the list: not a reason to refuse
            self._log.warning("ledger_summary_failed", path=str(self._path), error=str(exc))
            return []
        return [rotated_path(self._path, number) for number in numbers]

    def _lock(self) -> None:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLocked(self._path, self._lock_path) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = -1

    def _open_file(self) -> None:
        fd = os.open(self._path, _OPEN_FLAGS, 0o600)
        try:
            size, end, last = find_tail(fd)
            if end < size:
                self._move_torn(fd, end, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, end
        self._last_hash = line_hash(last) if last is not None else self._previous_head()
        self._dirty = False

    def _move_torn(self, fd: int, end: int, size: int) -> None:
        torn = os.pread(fd, size - end, end)
        torn_path = self._path.with_name(self._path.name + ".torn")
        out = os.open(torn_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(out, torn if torn.endswith(b"\n") else torn + b"\n")
            os.fsync(out)
        finally:
            os.close(out)
        os.ftruncate(fd, end)
        self._fsync(fd)
        self._log.warning(
            "ledger_torn_tail_moved", path=str(self._path), bytes=size - end, to=str(torn_path)
        )

    def _previous_head(self) -> str:
        """The hash of the last line of the newest rotated file, or 64 zeros."""
        numbers = rotated_numbers(self._path)
        if not numbers:
            return GENESIS
        fd = os.open(rotated_path(self._path, numbers[-1]), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _, _, last = find_tail(fd)
        finally:
            os.close(fd)
        return line_hash(last) if last is not None else GENESIS

    def _write_sync(self, lines: list[bytes], sync: bool) -> None:
        """Write ``lines`` (rotating as needed), then fsync if ``sync`` (``fsync = "always"``,
        whose callers were promised an fsynced line). A failed write or fsync raises
        ``_WriteFailed``."""
        written = 0
        group: list[bytes] = []
        pending = 0
        try:
            for line in lines:
                full = self._size + pending + len(line) > self._config.rotate_bytes
                if full and self._size + pending > 0:
                    self._write_group(b"".join(group))
                    self._rotate()
                    written += len(group)
                    group, pending = [], 0
                group.append(line)
                pending += len(line)
            self._write_group(b"".join(group))
        except OSError as exc:
            raise _WriteFailed(written, exc) from exc
        if sync:
            try:
                self._sync_sync()
            except OSError as exc:
                raise _WriteFailed(written, exc) from exc

    def _write_group(self, data: bytes) -> None:
        if not data:
            return
        if self._fd < 0:
            raise OSError(errno.EBADF, "the ledger file is not open")
        start = self._size
        done = 0
        try:
            while done < len(data):
                count = self._write(self._fd, data[done:] if done else data)
                if count <= 0:
                    raise OSError(errno.EIO, "the ledger write made no progress")
                done += count
        except OSError:
            # No partial line stays behind: O_APPEND writes go to the end we truncate to.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        self._size += len(data)
        self._dirty = True

    def _sync_sync(self) -> None:
        self._fsync(self._fd)
        self._dirty = False

    def _rotate(self) -> None:
        self._fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        number = max(rotated_numbers(self._path), default=0) + 1
        rotated = rotated_path(self._path, number)
        os.rename(self._path, rotated)
        self._rotated.append(rotated)
        self._fd = os.open(self._path, _OPEN_FLAGS | os.O_EXCL, 0o600)
        self._size = 0
        self._dirty = False
        _fsync_dir(self._path.parent)
        self._log.info("ledger_rotated", path=str(self._path), number=number)

    def _recover_sync(self, probe: bool) -> None:
        if probe:
            self._probe()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._open_file()

    def _probe(self) -> None:
        """Write, fsync and remove a small file beside the ledger: is the disk writable again?"""
        probe_path = self._path.with_name(self._path.name + ".probe")
        fd = os.open(probe_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = b"\0" * _PROBE_BYTES
            done = 0
            while done < len(data):
                done += self._write(fd, data[done:])
            self._fsync(fd)
        finally:
            os.close(fd)
            probe_path.unlink(missing_ok=True)

    def _close_sync(self) -> None:
        try:
            if self._fd >= 0:
                if self._dirty:
                    self._fsync(self._fd)
                os.close(self._fd)
        except OSError as exc:
            self._log.error("ledger_close_failed", path=str(self._path), error=str(exc))
        finally:
            self._fd = -1
            self._available = False
            self._unlock()
