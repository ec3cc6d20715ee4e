"""``tokenhub-sidecar demo``: the daemon in front of three built-in demo providers."""

from __future__ import annotations

import asyncio
import sys

from .. import config, daemon, log
from .providers import DemoProviders, demo_config

BANNER = """\
tokenhub-sidecar demo is serving on http://{address}/v1 with three demo providers:
{providers}
No keys and no network are needed; the ledger is {ledger}.

Try it:
  curl -s http://{address}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "deepseek-v3.2", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Or from Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="http://{address}/v1", api_key="unused")
  print(client.chat.completions.create(model="deepseek-v3.2", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

Then: tokenhub-sidecar usage --ledger {ledger}   (Ctrl-C stops the demo)
"""  # noqa: E501


async def run_demo(*, listen: str, ledger: str) -> int:
    async with DemoProviders() as providers:
        raw = demo_config(providers, listen=listen, ledger_path=ledger)
        settings = config.from_mapping(raw, source="demo config", environ={})
        writer = log.configure(
            format=settings.log.format, level=settings.log.level, background=True
        )
        listing = "\n".join(f"  {p.name:<10} region {p.region:<4} at {p.url}" for p in providers)

        def announce(address: str) -> None:
            print(
                BANNER.format(address=address, providers=listing, ledger=ledger),
                file=sys.stdout,
                flush=True,
            )

        try:
            return await daemon.run(
                settings, config_path=None, announce=announce, log_writer=writer
            )
        finally:
            if writer is not None:
                await asyncio.to_thread(writer.close)
