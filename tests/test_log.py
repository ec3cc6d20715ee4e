"""Log lines: JSON when not a terminal, readable on one, and never carrying a secret."""

from __future__ import annotations

import io
import json

import structlog

from sidecar import log


def emit(fmt: str, redactor: log.Redactor | None = None, **fields: object) -> str:
    out = io.StringIO()
    log.configure(format=fmt, level="info", redactor=redactor, stream=out)
    try:
        log.get_logger().info("request", **fields)
    finally:
        structlog.reset_defaults()
    return out.getvalue()


def test_auto_is_json_when_not_a_terminal():
    line = emit("auto", request_id="abc", status=200)
    assert json.loads(line) | {"timestamp": None} == {
        "event": "request",
        "request_id": "abc",
        "status": 200,
        "level": "info",
        "timestamp": None,
    }


def test_console_format_is_readable():
    line = emit("console", request_id="abc", status=200)
    assert "request" in line and "request_id=abc" in line
    assert not line.lstrip().startswith("{")


def test_secrets_are_redacted_in_every_field():
    redactor = log.Redactor(["k3y-configured-secret-value"])
    line = emit(
        "json",
        redactor,
        error="upstream said: invalid key k3y-configured-secret-value",
        header="Bearer abcdefghijklmnop",
        url="https://x.example/v1?key=hunter2hunter2",
        nested={"api_key": "sk-abcdefghijklmnopqrstuvwx"},
    )
    assert "k3y-configured-secret-value" not in line
    assert "abcdefghijklmnop" not in line
    assert "hunter2" not in line
    assert "sk-abcdefghijklmnopqrstuvwx" not in line
    assert line.count(log.REDACTED) == 4
