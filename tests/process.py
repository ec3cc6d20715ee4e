"""The daemon as a real process: write a config, start ``python -m sidecar serve``, collect output.

The daemon listens on port 0 (or on an inherited socket) and its JSON ``listening`` log line says
where; ``Daemon.url`` is that address. Both output streams are read all the time (so a chatty
daemon never blocks on a full pipe) and kept whole for assertions such as secret scans.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conftest import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 15.0

# Socket activation: the child sets LISTEN_PID to its own pid, then runs the CLI in-process.
ACTIVATION_WRAPPER = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "from sidecar.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def toml_value(value: Any) -> str:
    """Enough TOML for our configs: strings, numbers, booleans, arrays and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_dumps(raw: Mapping[str, Any]) -> str:
    top = [f"{k} = {toml_value(v)}" for k, v in raw.items() if not isinstance(v, Mapping)]
    lines = top + [""]
    for section, body in raw.items():
        if isinstance(body, Mapping):
            lines.append(f"[{section}]")
            lines += [f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in body.items()]
            lines.append("")
    return "\n".join(lines)


def key_env(providers: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The environment holding each provider's key, as ``make_settings`` names them."""
    return {f"{p['name'].upper()}_KEY": f"{TEST_KEY}-{p['name']}" for p in providers}


def write_config(path: Path, providers: Sequence[Mapping[str, Any]], **sections: Any) -> Path:
    """A daemon config on port 0 with a JSON log and a ledger beside the config."""
    raw: dict[str, Any] = {"providers": list(providers), **sections}
    raw["server"] = {"listen": "127.0.0.1:0", **sections.get("server", {})}
    raw["log"] = {"format": "json", **sections.get("log", {})}
    ledger = {"path": str(path.parent / "ledger.jsonl"), "fsync": "never"}
    raw["ledger"] = {**ledger, **sections.get("ledger", {})}
    path.write_text(toml_dumps(raw))
    return path


@dataclass
class Daemon:
    """A running ``sidecar serve`` child and everything it printed so far."""

    proc: asyncio.subprocess.Process
    config_path: Path
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    address: str = ""
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return (bytes(self.stdout) + bytes(self.stderr)).decode("utf-8", "replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines on stderr (anything else is skipped)."""
        lines = []
        for raw in bytes(self.stderr).splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
                if isinstance(parsed, dict):
                    lines.append(parsed)
        return lines

    def events(self) -> list[str]:
        return [str(line.get("event")) for line in self.log_lines()]

    async def wait_for_event(
        self, event: str, timeout: float = 10.0, *, after: int = 0
    ) -> dict[str, Any]:
        """The first log line with ``event`` past the first ``after`` lines (see ``events``)."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.log_lines()[after:]:
                    if line.get("event") == event:
                        return line
                if self.proc.returncode is not None:
                    raise AssertionError(f"daemon exited before {event!r}:\n{self.output()}")
                await asyncio.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for the exit and for the pipes to be read to the end; the exit code."""
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self.readers)
        return code

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.wait()


async def _read(daemon: Daemon, stream: asyncio.StreamReader, into: bytearray) -> None:
    while line := await stream.readline():
        into += line
        if daemon.listening.is_set():
            continue
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict) and parsed.get("event") == "listening":
                daemon.address = str(parsed["address"])
                daemon.listening.set()


async def spawn(
    config_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    pass_fds: Sequence[int] = (),
    stderr: int | None = None,
) -> Daemon:
    """Start the daemon; returns at once (see ``start`` to wait until it listens).

    ``stderr``: a descriptor for the daemon's stderr, which the caller then reads (or not);
    by default a pipe read into ``Daemon.stderr``.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    environ.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})})
    args = argv or ["-m", "sidecar", "serve", "-c", str(config_path)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=str(config_path.parent),
        env=environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
        pass_fds=tuple(pass_fds),
        limit=1 << 20,
    )
    daemon = Daemon(proc, config_path)
    assert proc.stdout is not None
    daemon.readers = [asyncio.ensure_future(_read(daemon, proc.stdout, daemon.stdout))]
    if proc.stderr is not None:
        daemon.readers.append(asyncio.ensure_future(_read(daemon, proc.stderr, daemon.stderr)))
    return daemon


async def start(config_path: Path, **kwargs: Any) -> Daemon:
    """Start the daemon and wait for its ``listening`` line."""
    daemon = await spawn(config_path, **kwargs)
    exited = asyncio.ensure_future(daemon.proc.wait())
    listening = asyncio.ensure_future(daemon.listening.wait())
    await asyncio.wait(
        {exited, listening}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    exited.cancel()
    listening.cancel()
    if not daemon.listening.is_set():
        await daemon.stop()
        raise AssertionError(f"the daemon did not start:\n{daemon.output()}")
    return daemon


@asynccontextmanager
async def running(config_path: Path, **kwargs: Any) -> AsyncIterator[Daemon]:
    """``start`` the daemon, and kill it on the way out if the test did not stop it."""
    daemon = await start(config_path, **kwargs)
    try:
        yield daemon
    finally:
        await daemon.stop()


def chat(content: str = "Hi", *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A chat completions body for the usual test model."""
    body: dict[str, Any] = {
        "model": "deepseek-v3.2",
        "messages": [{"role": "user", "content": content}],
        **extra,
    }
    if stream:
        body["stream"] = True
    return body


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
