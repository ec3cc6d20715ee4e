"""Config loading: every problem listed by dotted key path, keys read from every source."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import ConfigError

MODEL = {"input_per_mtok": "0.28", "output_per_mtok": "0.42"}


def raw_provider(**overrides):
    return {
        "name": "alpha",
        "base_url": "https://a.example/v1",
        "region": "eu",
        "models": {"m": MODEL},
        **overrides,
    }


def problems(raw, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config.from_mapping(raw, environ=environ or {})
    return raised.value.problems


def test_defaults_match_spec():
    settings = config.from_mapping({}, environ={})
    assert settings.server.listen == "127.0.0.1:8700"
    assert settings.server.max_body_bytes == 8388608
    assert settings.routing.max_providers == 3
    assert settings.cache.mode == "deterministic"
    assert settings.account.service_fee_rate == Decimal("0.03")
    assert settings.account.effective_rpm == 600
    assert settings.ledger.fsync == "interval"


def test_settings_are_frozen():
    settings = config.from_mapping({}, environ={})
    with pytest.raises(ValueError):
        settings.routing.max_providers = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"server": {"bogus": 1}}, "server.bogus: unknown key"),
        ({"routing": {"max_providers": 4}}, "routing.max_providers:"),
        ({"server": {"listen": "nowhere"}}, "server.listen:"),
        ({"cache": {"mode": "sometimes"}}, "cache.mode:"),
        (
            {"account": {"service_fee_rate": "0"}},
            "account.service_fee_rate: only the pro and enterprise",
        ),
        ({"providers": [raw_provider(region="")]}, "providers[0].region:"),
        ({"providers": [raw_provider(base_url="ftp://x")]}, "providers[0].base_url:"),
        (
            {
                "providers": [
                    raw_provider(models={"m": {"input_per_mtok": 0.1, "output_per_mtok": "1"}})
                ]
            },
            "providers[0].models.m.input_per_mtok: write money as a decimal string",
        ),
        (
            {"providers": [raw_provider(models={"m": {"kind": "image", "input_per_mtok": "1"}})]},
            "providers[0].models.m: an image model needs per_image",
        ),
        (
            {
                "providers": [
                    raw_provider(
                        models={"m": {"kind": "video", "per_second": "1", "per_image": "1"}}
                    )
                ]
            },
            "providers[0].models.m: a video model cannot have per_image",
        ),
        (
            {"providers": [raw_provider(), raw_provider()]},
            "providers[1].name: 'alpha' is used twice",
        ),
        (
            {"providers": [raw_provider()], "aliases": {"x": ["nope"]}},
            "aliases.x: 'nope' is not a model",
        ),
        (
            {"providers": [raw_provider()], "preferences": {"providers": ["beta"]}},
            "preferences.providers: 'beta' is not configured",
        ),
        (
            {"providers": [raw_provider(api_key="sk-inline")]},
            "providers[0].api_key: keys never go in the config file",
        ),
    ],
)
def test_each_problem_names_its_key_path(raw, expected):
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once():
    found = problems(
        {"server": {"bogus": 1}, "routing": {"max_providers": 0}, "log": {"level": "loud"}}
    )
    assert len(found) == 3


def test_key_from_env_file_and_credential(tmp_path: Path):
    key_file = tmp_path / "beta.key"
    key_file.write_text("sk-from-file\n")
    key_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gamma").write_text("sk-from-credential")
    (creds / "gamma").chmod(0o600)
    raw = {
        "providers": [
            raw_provider(name="alpha", api_key_env="ALPHA_KEY"),
            raw_provider(name="beta", api_key_file=str(key_file)),
            raw_provider(name="gamma", api_key_credential="gamma"),
        ]
    }
    settings = config.from_mapping(
        raw, environ={"ALPHA_KEY": "sk-from-env", "CREDENTIALS_DIRECTORY": str(creds)}
    )
    keys = [p.api_key.get_secret_value() for p in settings.providers]
    assert keys == ["sk-from-env", "sk-from-file", "sk-from-credential"]
    assert "sk-from" not in repr(settings)


def test_world_readable_key_file_is_refused(tmp_path: Path):
    key_file = tmp_path / "k"
    key_file.write_text("sk-secret")
    os.chmod(key_file, 0o644)
    found = problems({"providers": [raw_provider(api_key_file=str(key_file))]})
    assert found == [
        f"providers[0].api_key_file: {key_file} is readable by every user; "
        f"run `chmod 600 {key_file}` first"
    ]


def test_missing_env_key_and_credentials_directory():
    found = problems(
        {
            "providers": [
                raw_provider(api_key_env="NOPE"),
                raw_provider(name="b", api_key_credential="b"),
            ]
        }
    )
    assert found[0].startswith("providers[0].api_key_env: environment variable NOPE is not set")
    assert found[1].startswith("providers[1].api_key_credential: $CREDENTIALS_DIRECTORY is not set")


def test_load_reports_missing_file_and_bad_toml(tmp_path: Path):
    with pytest.raises(ConfigError) as raised:
        config.load(tmp_path / "missing.toml")
    assert str(raised.value).startswith(f"{tmp_path / 'missing.toml'}: cannot read the config file")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError) as raised:
        config.load(bad)
    assert "not valid TOML" in str(raised.value)


def test_example_config_is_valid():
    example = Path(__file__).parent.parent / "config.example.toml"
    settings = config.load(example, environ={"ALIBABA_API_KEY": "a", "TOGETHER_API_KEY": "b"})
    assert [p.name for p in settings.providers] == ["alibaba", "together"]


@pytest.mark.parametrize("key", ["sk-one\nX-Injected: 1", "sk-tab\there", "sk-ключ"])
def test_a_key_that_could_not_go_into_a_header_is_refused(tmp_path: Path, key: str):
    key_file = tmp_path / "k"
    key_file.write_text(key)
    key_file.chmod(0o600)
    found = problems(
        {
            "providers": [
                raw_provider(api_key_env="ALPHA_KEY"),
                raw_provider(name="b", api_key_file=str(key_file)),
            ]
        },
        environ={"ALPHA_KEY": key},
    )
    expected = "the key holds a line break, a control or a non-ASCII character"
    assert [f"providers[0].api_key_env: {expected}", f"providers[1].api_key_file: {expected}"] == [
        problem.split(";")[0] for problem in found
    ]
    assert not any(key in problem for problem in found)
