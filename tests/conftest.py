"""Factory fixtures: settings, fake upstreams, and the real sidecar app on a loopback port."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from sidecar import config
from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.front import DaemonRunner
from sidecar.state import LIVE, Runtime

from .fakes import FakeUpstream

TEST_KEY = "sk-test-upstream-key-0123456789"
PRICES = {"input_per_mtok": "0.28", "output_per_mtok": "0.42", "cached_input_per_mtok": "0.028"}


def provider(name: str, url: str, region: str = "eu", **extra: Any) -> dict[str, Any]:
    """A provider entry serving the usual test models, keyed by ``<NAME>_KEY`` in the env."""
    models = extra.pop(
        "models",
        {
            "deepseek-v3.2": {"upstream": f"{name}-deepseek", **PRICES},
            "text-embedding-3-small": {"kind": "embedding", "input_per_mtok": "0.02"},
        },
    )
    return {
        "name": name,
        "base_url": url,
        "region": region,
        "api_key_env": f"{name.upper()}_KEY",
        "models": models,
        **extra,
    }


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(providers: list[dict[str, Any]], **sections: Any) -> Settings:
        raw: dict[str, Any] = {"providers": providers, **sections}
        raw.setdefault("ledger", {})
        raw["ledger"] = {"path": str(tmp_path / "ledger.jsonl"), "fsync": "never", **raw["ledger"]}
        environ = {f"{p['name'].upper()}_KEY": f"{TEST_KEY}-{p['name']}" for p in providers}
        return config.from_mapping(raw, source="test config", environ=environ)

    return make


@dataclass
class RunningSidecar:
    app: web.Application
    runner: web.AppRunner
    port: int
    settings: Settings
    clients: list[openai.AsyncOpenAI]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> Runtime:
        return self.app[LIVE].current

    def client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "sk-client-token-never-forwarded")
        kwargs.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", **kwargs)
        self.clients.append(client)
        return client

    def ledger_lines(self) -> list[dict[str, Any]]:
        path = self.settings.ledger.path
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[[Settings], Awaitable[RunningSidecar]]]:
    """Start the real app on 127.0.0.1, port 0, with the daemon's runner (so its lean front)."""
    started: list[RunningSidecar] = []

    async def start(settings: Settings, **app_options: Any) -> RunningSidecar:
        app = create_app(settings, **app_options)
        runner = DaemonRunner(
            app,
            header_timeout_s=settings.server.header_timeout_s,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=5,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        sidecar = RunningSidecar(app, runner, runner.addresses[0][1], settings, [])
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in reversed(started):
        for client in sidecar.clients:
            await client.close()
        await sidecar.runner.cleanup()


@pytest.fixture
async def fake_upstream() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    fakes: list[FakeUpstream] = []

    async def start(**kwargs: Any) -> FakeUpstream:
        fake = await FakeUpstream(**kwargs).start()
        fakes.append(fake)
        return fake

    yield start
    for fake in fakes:
        await fake.close()


Pair = tuple[FakeUpstream, FakeUpstream, RunningSidecar]


@pytest.fixture
def eu_and_us(
    fake_upstream: Callable[..., Awaitable[FakeUpstream]],
    make_settings: Callable[..., Settings],
    start_sidecar: Callable[[Settings], Awaitable[RunningSidecar]],
) -> Callable[[dict[str, Any]], Awaitable[Pair]]:
    """Two fake providers (alpha in eu, beta in us) serving ``models``, config order, no sticky."""

    async def start(models: dict[str, Any]) -> Pair:
        alpha, beta = await fake_upstream(), await fake_upstream()
        settings = make_settings(
            [
                provider("alpha", alpha.url, "eu", models=models),
                provider("beta", beta.url, "us", models=models),
            ],
            routing={"sticky": False},
        )
        return alpha, beta, await start_sidecar(settings)

    return start
