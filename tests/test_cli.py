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


def _hand_edited_ledger(folder: Path) -> Path:
    """A one-line ledger whose billable line says ``"input_tokens":"twelve"``."""
    line = (
        '{"v":1,"ts":"2026-11-27T10:00:00.000Z","request_id":"r-edited","endpoint":'
        '"/v1/chat/completions","requested":"m","model":"m","provider":"p","upstream_model":"m",'
        '"region":"local","stream":false,"status":200,"outcome":"ok","billable":true,'
        '"attempts":[],"usage":{"input_tokens":"twelve","output_tokens":20,"cached_tokens":0,'
        '"images":0,"seconds":0},"usage_source":"reported","model_fee_usd":"0.1",'
        '"service_fee_usd":"0","total_usd":"0.1","saved_usd":"0","latency_ms":1,'
        f'"prev":"{"0" * 64}"}}\n'
    )
    ledger = folder / "ledger.jsonl"
    ledger.write_text(line)
    ledger.chmod(0o600)
    return ledger


def test_a_hand_edited_ledger_line_is_one_line_for_usage_and_serve(tmp_path: Path):
    ledger = _hand_edited_ledger(tmp_path)
    result = run("usage", "--ledger", str(ledger))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "'r-edited' has a usage.input_tokens that is not a whole number" in result.stderr

    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[budget]\ndaily_usd = "5"\n'
        f'[ledger]\npath = "{ledger}"\n'
        '[[providers]]\nname = "p"\nbase_url = "http://127.0.0.1:9/v1"\nregion = "local"\n'
        '[providers.models."m"]\nkind = "chat"\ninput_per_mtok = "1"\noutput_per_mtok = "1"\n'
    )
    result = run("serve", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "BufferError" not in result.stderr
    assert "cannot read today's spend for [budget]" in result.stderr
    assert "'r-edited'" in result.stderr


def test_a_hand_edited_amount_names_its_field(tmp_path: Path):
    ledger = _hand_edited_ledger(tmp_path)
    text = (
        ledger.read_text()
        .replace('"twelve"', "12")
        .replace('"total_usd":"0.1"', '"total_usd":"lots"')
    )
    ledger.write_text(text)
    result = run("usage", "--ledger", str(ledger), "--by", "model")
    assert result.returncode == 1, result.stderr
    assert "'r-edited' has a total_usd that is not a decimal amount" in result.stderr
