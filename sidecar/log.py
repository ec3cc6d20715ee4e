"""structlog configured once; everyone else calls ``get_logger()``.

Lines are rendered by orjson as JSON when stderr is not a terminal (or when configured), and as
readable key=value lines on a terminal. Every line passes through ``redact`` so that no configured
secret can reach a log, whatever a caller puts in it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, BinaryIO, TextIO, cast

import orjson
import structlog

_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,})|(Bearer\s+[A-Za-z0-9._\-~+/=]{8,})|((?:api[_-]?)?key=[^&\s\"']+)",
    re.IGNORECASE,
)
REDACTED = "[redacted]"
_KEY_SHAPES = (b"sk-", b"bearer", b"key=")  # what _SECRET_PATTERNS looks for, lowercased


class Redactor:
    """Masks configured secret values and well-known key shapes in any string."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))
        # A secret as it appears in UTF-8 text and inside a JSON string (escaped, if it must be).
        self._secret_bytes = frozenset(
            form for s in self._secrets for form in (s.encode(), orjson.dumps(s)[1:-1])
        )

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        lowered = text.lower()
        if "sk-" in lowered or "bearer" in lowered or "key=" in lowered:
            return _SECRET_PATTERNS.sub(REDACTED, text)
        return text

    def may_leak(self, data: bytes) -> bool:
        """False when rendered bytes hold no secret and no key shape: nothing to redact."""
        # bytes.find, not ``in``: ``bytes in bytes`` first tries the needle as an int and
        # raises (and drops) a TypeError each time.
        for secret in self._secret_bytes:
            if data.find(secret) >= 0:
                return True
        lowered = data.lower()
        for shape in _KEY_SHAPES:
            if lowered.find(shape) >= 0:
                return True
        return False

    def processor(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self(value)
            elif not isinstance(value, int | float | bool | type(None)):
                event[key] = self(str(value))
        return event


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(
    *,
    format: str = "auto",
    level: str = "info",
    redactor: Redactor | None = None,
    stream: TextIO | None = None,
    background: bool = False,
) -> BatchWriter | None:
    """Set up structlog for the process: called by the daemon and the CLI, never at import.

    With ``background`` (the daemon), lines go out through a ``BatchWriter`` on the stream's
    bytes, off the event loop; the daemon's request log shares it, so that the two never write
    at once, and the caller closes it at exit.
    """
    out = stream or sys.stderr
    tty = out.isatty()
    binary = getattr(out, "buffer", None)  # a StringIO has none: then lines go out at once
    writer = BatchWriter(binary) if background and binary is not None else None
    as_json = format == "json" or (format == "auto" and not tty)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=tty)
    )
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        (redactor or Redactor()).processor,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(
            out if writer is None else cast(TextIO, _Lines(writer, tty=tty))  # all print() needs
        ),
        cache_logger_on_first_use=False,
    )
    return writer


class _Lines:
    """A text stream for structlog's ``PrintLogger`` that hands whole lines to a ``BatchWriter``
    (``print`` writes the message and its newline separately, then flushes)."""

    def __init__(self, writer: BatchWriter, *, tty: bool) -> None:
        self._writer = writer
        self._tty = tty
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        if self._parts:
            text = "".join(self._parts)
            self._parts.clear()
            self._writer.write(text.encode("utf-8", "replace"))

    def isatty(self) -> bool:
        return self._tty


def get_logger(name: str = "sidecar") -> Any:
    return structlog.get_logger(name)


class BatchWriter:
    """Writes batches of log lines to a stream from a thread of its own.

    A blocking write to stderr (a pipe to a log collector that stalls, say) then never stops the
    event loop. At most ``limit_bytes`` wait; a batch past that is dropped and its lines
    counted, and a ``request_log_dropped`` line says how many once the stream takes data again.
    Outside a running loop before the thread started, or after ``close()``, a batch is written
    at once.
    """

    def __init__(self, stream: BinaryIO, *, limit_bytes: int = 8 << 20) -> None:
        self._stream = stream
        self._limit = limit_bytes
        self._batches: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the two counts below
        self._waiting = 0
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stalled = False

    def write(self, data: bytes) -> None:
        if self._thread is None:
            if self._stalled:
                return
            if self._closed or not _in_running_loop():
                self._put(data)
                return
            self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
            self._thread.start()
        with self._lock:
            if self._waiting + len(data) > self._limit:
                self._dropped += data.count(b"\n")
                return
            self._waiting += len(data)
        self._batches.put(data)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what waits, then stop the thread (waiting at most ``timeout_s`` for a stalled
        stream); later batches are written at once, or dropped if the stream is still stalled
        (a stop must not hang on it)."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._batches.put(None)
            thread.join(timeout_s)
            self._stalled = thread.is_alive()

    def _run(self) -> None:
        while (data := self._batches.get()) is not None:
            self._put(data)
            with self._lock:
                self._waiting -= len(data)
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._put(_dropped_line(dropped))

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:  # an unbuffered stderr (python -u) may take part of it, as a pipe may
                written = self._stream.write(view)
                if not written:
                    break
                view = view[written:]
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not take requests down with it


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _dropped_line(lines: int) -> bytes:
    event = {
        "event": "request_log_dropped",
        "level": "warning",
        "lines": lines,
        "why": "stderr took no data while the log writer's buffer was full",
    }
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


class RequestLog:
    """The canonical line per request: redacted, rendered by orjson, written in small batches.

    structlog's processor chain costs tens of microseconds a line, a large share of a proxied
    request; this path costs a few, and batching turns thousands of lines a second into a few
    writes, made by a ``BatchWriter`` off the event loop. Lines wait at most
    ``flush_interval_s`` (and are written out by ``close()`` at shutdown).
    """

    def __init__(
        self,
        *,
        format: str = "auto",
        level: str = "info",
        redactor: Redactor | None = None,
        stream: BinaryIO | None = None,
        writer: BatchWriter | None = None,
        flush_interval_s: float = 0.05,
    ) -> None:
        """``writer``: the process's one writer to stderr, shared with structlog (see
        ``configure``); by default one of its own on ``stream``."""
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._writer = writer or BatchWriter(self._stream)
        self._enabled = logging.getLevelNamesMapping()[level.upper()] <= logging.INFO
        self._json = format == "json" or (format == "auto" and not _isatty(self._stream))
        self._redactor = redactor or Redactor()
        self._interval = flush_interval_s
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stamps = UtcStamps()

    def write(self, fields: dict[str, Any]) -> None:
        if not self._enabled:
            return
        if self._json:
            fields["event"] = "request"
            fields["level"] = "info"
            fields["timestamp"] = self._stamps.now()
            line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
            if self._redactor.may_leak(line):  # rare: render again from redacted fields
                line = orjson.dumps(self._redacted(fields), option=orjson.OPT_APPEND_NEWLINE)
            self._lines.append(line)
        else:
            pairs = " ".join(f"{k}={v}" for k, v in self._redacted(fields).items())
            self._lines.append(f"{self._stamps.now()} [info     ] request  {pairs}\n".encode())
        if len(self._lines) >= 256:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)
            except RuntimeError:
                self.flush()

    def _redacted(self, fields: dict[str, Any]) -> dict[str, Any]:
        redact = self._redactor
        return {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._writer.write(data)

    def close(self) -> None:
        """Flush, and wait (briefly) until every line is written."""
        self.flush()
        self._writer.close()


class UtcStamps:
    """ISO-8601 UTC timestamps with ``digits`` of the second (6 or 3) and ``Z``; the date and
    time of day are formatted once a second, not once a line."""

    def __init__(self, clock: Callable[[], float] = time.time, *, digits: int = 6) -> None:
        self._clock = clock
        self._scale = 10**digits
        self._format = f"%s.%0{digits}dZ"
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        moment = self._clock()
        second = int(moment)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._format % (self._prefix, (moment - second) * self._scale)


def _isatty(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
