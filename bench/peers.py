"""The peers we compare against: LiteLLM's proxy and Portkey's gateway, one worker each.

Each is installed from its own registry into ``bench/.peers/`` (git-ignored):

    python bench/peers.py install            # both; or: install litellm | install portkey
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PEERS = ("litellm", "portkey")
ROOT = Path(__file__).resolve().parent / ".peers"
LITELLM_KEY = "sk-bench-0f3c9a7e5d1b4c2a8e6f0d9b7c5a3e1f"  # not a secret: loopback only
PORTKEY_SERVER = Path("node_modules/@portkey-ai/gateway/build/start-server.js")


@dataclass(frozen=True)
class Launch:
    """How to start one peer and talk to it."""

    name: str
    argv: list[str]
    base_url: str
    health_path: str
    start_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def installed(name: str, root: Path = ROOT) -> bool:
    if name == "litellm":
        return (root / "litellm" / "bin" / "litellm").exists()
    return (root / "portkey" / PORTKEY_SERVER).exists()


def install(name: str, root: Path = ROOT) -> str | None:
    """Install one peer; None on success, else a one-line reason."""
    root.mkdir(parents=True, exist_ok=True)
    if name == "litellm":
        venv = root / "litellm"
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
        ]
    else:
        (root / "portkey").mkdir(exist_ok=True)
        steps = [
            [
                "npm",
                "install",
                "--prefix",
                str(root / "portkey"),
                "--no-audit",
                "--no-fund",
                "@portkey-ai/gateway",
            ],
        ]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{argv[0]}: {exc}"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
            return f"{Path(argv[0]).name} exited {done.returncode}: {lines[-1][:160]}"
    return None if installed(name, root) else "install finished but the entry point is missing"


def litellm_config(upstream_port: int) -> str:
    return (
        "model_list:\n"
        "  - model_name: bench-model\n"
        "    litellm_params:\n"
        "      model: openai/bench-model-upstream\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: sk-bench\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )


def launch(name: str, port: int, upstream_port: int, workdir: Path, root: Path = ROOT) -> Launch:
    base = f"http://127.0.0.1:{port}"
    if name == "litellm":
        config = workdir / "litellm.yaml"
        config.write_text(litellm_config(upstream_port), encoding="utf-8")
        argv = [
            str(root / "litellm" / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
        return Launch(name, argv, base, "/health/liveliness", 120.0, env, headers)
    argv = ["node", str(root / "portkey" / PORTKEY_SERVER), f"--port={port}", "--headless"]
    headers = {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"http://127.0.0.1:{upstream_port}/v1",
        "Authorization": "Bearer sk-bench",
    }
    return Launch(name, argv, base, "/", 30.0, {"NODE_ENV": "production"}, headers)


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "install" or not set(argv[1:]) <= set(PEERS):
        print("usage: python bench/peers.py install [litellm] [portkey]", file=sys.stderr)
        return 2
    failed = 0
    for name in argv[1:] or PEERS:
        problem = None if installed(name) else install(name)
        print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
