"""structlog configured once; everyone else calls ``get_logger()``.

Lines are rendered by orjson as JSON when stderr is not a terminal (or when configured), and as
readable key=value lines on a terminal. Every line passes through ``redact`` so that no configured
secret can reach a log, whatever a caller puts in it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,})|(Bearer\s+[A-Za-z0-9._\-~+/=]{8,})|((?:api[_-]?)?key=[^&\s\"']+)",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


class Redactor:
    """Masks configured secret values and well-known key shapes in any string."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _SECRET_PATTERNS.sub(REDACTED, text)

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
        structlog.contextvars.merge_contextvars,
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
