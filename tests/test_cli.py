"""The command line: one readable line (or block) per problem, SPEC's exit codes, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "sidecar"]


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_check_accepts_the_example(tmp_path: Path):
    example = Path(__file__).parent.parent / "config.example.toml"
    result = run("check", "-c", str(example), env={"ALIBABA_API_KEY": "a", "TOGETHER_API_KEY": "b"})
    assert result.returncode == 0, result.stderr
    assert "ok (2 providers" in result.stdout


def test_bad_config_exits_2_with_key_paths(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[routing]\nmax_providers = 9\n[server]\nlisten = "x"\ncolour = "blue"\n')
    for command in ("check", "serve"):
        result = run(command, "-c", str(bad))
        assert result.returncode == 2
        assert "routing.max_providers" in result.stderr
        assert "server.listen" in result.stderr
        assert "server.colour: unknown key" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_config_is_one_line(tmp_path: Path):
    result = run("serve", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "nope.toml: cannot read the config file" in result.stderr


def test_default_config_from_environment(tmp_path: Path):
    config_file = tmp_path / "c.toml"
    config_file.write_text('[cache]\nmode = "off"\n')
    result = run("check", env={"TOKENHUB_SIDECAR_CONFIG": str(config_file)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(config_file) in result.stdout


def test_usage_errors_exit_2():
    result = run("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
