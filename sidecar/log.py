"""structlog configured once; everyone else calls ``get_logger()``.

Lines are rendered by orjson as JSON when stderr is not a terminal (or when configured), and as
readable key=value lines on a terminal. Every line passes through ``redact`` so that no configured
secret can reach a log, whatever a caller puts in it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, BinaryIO, TextIO

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
) -> None:
    """Set up structlog for the process: called by the daemon and the CLI, never at import."""
    out = stream or sys.stderr
    as_json = format == "json" or (format == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "sidecar") -> Any:
    return structlog.get_logger(name)


class RequestLog:
    """The canonical line per request: redacted, rendered by orjson, written in small batches.

    structlog's processor chain costs tens of microseconds a line, a large share of a proxied
    request; this path costs a few, and batching turns thousands of lines a second into a few
    writes. Lines wait at most ``flush_interval_s`` (and are flushed at shutdown).
    """

    def __init__(
        self,
        *,
        format: str = "auto",
        level: str = "info",
        redactor: Redactor | None = None,
        stream: BinaryIO | None = None,
        flush_interval_s: float = 0.05,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr.buffer
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
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not take requests down with it


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
