"""The whole SPEC config schema as frozen pydantic models, and ``load()`` from TOML.

Loading does everything that can fail up front (parse, validate, read every API key) and reports
every problem at once, each under its dotted key path, so a bad file never starts a half-working
daemon.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

PLAN_RPM: Mapping[str, int] = {"starter": 600, "pro": 3000, "enterprise": 10000}
DEFAULT_SERVICE_FEE_RATE = Decimal("0.03")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
ModelKind = Literal["chat", "embedding", "image", "audio", "video"]


class ConfigError(Exception):
    """A config that cannot be used; ``str()`` is the readable block printed at the command line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(source, problems)
        self.source = source
        self.problems = problems

    def __str__(self) -> str:
        if len(self.problems) == 1 and self.problems[0].startswith(self.source):
            return self.problems[0]
        lines = [f"{self.source}: {len(self.problems)} problem(s) in the config:"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _money(value: object) -> object:
    """Prices are decimal strings: a float has already lost digits before we see it."""
    if isinstance(value, float):
        raise ValueError(f'write money as a decimal string, e.g. "{value}", not a float')
    if isinstance(value, str):
        if value.strip() == "":
            raise ValueError("an empty string is not an amount; remove the key instead")
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
        if not amount.is_finite():
            raise ValueError(f"{value!r} is not a finite amount")
        return amount
    return value


Money = Annotated[Decimal, BeforeValidator(_money), Field(ge=0)]


def _optional_money(value: object) -> object:
    return None if value == "" else _money(value)


OptionalMoney = Annotated[Money | None, BeforeValidator(_optional_money)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class ServerConfig(Frozen):
    listen: str = "127.0.0.1:8700"
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    client_tokens: tuple[SecretStr, ...] = ()
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
    allowed_origins: tuple[str, ...] = ()
    shutdown_timeout_s: float = Field(default=30, ge=0)
    max_concurrent_requests: int = Field(default=4096, gt=0)
    header_timeout_s: float = Field(default=10, gt=0)

    @field_validator("listen")
    @classmethod
    def _listen_parses(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("client_tokens")
    @classmethod
    def _tokens_not_empty(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(len(t.get_secret_value()) < 16 for t in value):
            raise ValueError("each client token must be at least 16 characters")
        return value


class LogConfig(Frozen):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class AccountConfig(Frozen):
    plan: Literal["starter", "pro", "enterprise"] = "starter"
    service_fee_rate: Money = DEFAULT_SERVICE_FEE_RATE
    rpm: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _fee_waiver_needs_plan(self) -> AccountConfig:
        if self.plan == "starter" and self.service_fee_rate != DEFAULT_SERVICE_FEE_RATE:
            raise ValueError(
                "service_fee_rate: only the pro and enterprise plans may waive or change the 3% "
                "service fee; remove the key or set plan"
            )
        if self.service_fee_rate > 1:
            raise ValueError("service_fee_rate: a rate above 1 (100%) is surely a typo")
        return self

    @property
    def effective_rpm(self) -> int:
        return self.rpm if self.rpm is not None else PLAN_RPM[self.plan]


class PreferencesConfig(Frozen):
    """Hard bounds: nothing is ever routed outside them. Empty allow-lists allow anything."""

    regions: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    exclude_providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    exclude_models: tuple[str, ...] = ()


class RoutingConfig(Frozen):
    max_providers: int = Field(default=3, ge=1, le=3)
    sticky: bool = True
    connect_timeout_s: float = Field(default=5, gt=0)
    first_byte_timeout_s: float = Field(default=60, gt=0)
    first_token_timeout_s: float = Field(default=30, gt=0)
    idle_timeout_s: float = Field(default=60, gt=0)
    probe_interval_s: float = Field(default=0, ge=0)


class CacheConfig(Frozen):
    mode: Literal["off", "deterministic", "all"] = "deterministic"
    ttl_s: float = Field(default=600, gt=0)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    cache_tool_calls: bool = False


class BudgetConfig(Frozen):
    daily_usd: OptionalMoney = None
    monthly_usd: OptionalMoney = None


class LedgerConfig(Frozen):
    path: Path = Path("/var/lib/tokenhub-sidecar/ledger.jsonl")
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval_ms: int = Field(default=1000, gt=0)
    rotate_bytes: int = Field(default=100 * 1024 * 1024, ge=4096)


_PRICE_FIELDS_BY_KIND: Mapping[str, frozenset[str]] = {
    "chat": frozenset({"input_per_mtok", "output_per_mtok", "cached_input_per_mtok"}),
    "embedding": frozenset({"input_per_mtok"}),
    "image": frozenset({"per_image", "input_per_mtok", "output_per_mtok"}),
    "audio": frozenset({"input_per_mtok", "output_per_mtok", "per_second", "per_mchar"}),
    "video": frozenset({"per_second"}),
}
_REQUIRED_PRICES_BY_KIND: Mapping[str, tuple[frozenset[str], ...]] = {
    "chat": (frozenset({"input_per_mtok"}), frozenset({"output_per_mtok"})),
    "embedding": (frozenset({"input_per_mtok"}),),
    "image": (frozenset({"per_image"}),),
    "audio": (frozenset({"input_per_mtok", "output_per_mtok", "per_second", "per_mchar"}),),
    "video": (frozenset({"per_second"}),),
}


class ModelConfig(Frozen):
    """One model as one provider serves it, with its prices (USD)."""

    kind: ModelKind = "chat"
    upstream: str = Field(min_length=1)
    max_output_tokens: int | None = Field(default=None, gt=0)
    input_per_mtok: Money | None = None
    output_per_mtok: Money | None = None
    cached_input_per_mtok: Money | None = None
    per_image: Money | None = None
    per_second: Money | None = None
    per_mchar: Money | None = None

    @model_validator(mode="after")
    def _prices_fit_kind(self) -> ModelConfig:
        given = {name for name in _ALL_PRICE_FIELDS if getattr(self, name) is not None}
        misfits = sorted(given - _PRICE_FIELDS_BY_KIND[self.kind])
        if misfits:
            raise ValueError(
                f"{_article(self.kind)} {self.kind} model cannot have {', '.join(misfits)}; "
                f"its prices are {', '.join(sorted(_PRICE_FIELDS_BY_KIND[self.kind]))}"
            )
        for needed in _REQUIRED_PRICES_BY_KIND[self.kind]:
            if not given & needed:
                raise ValueError(
                    f"{_article(self.kind)} {self.kind} model needs {' or '.join(sorted(needed))} "
                    '(a decimal string of USD, "0" for free)'
                )
        return self


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_ALL_PRICE_FIELDS = (
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "per_image",
    "per_second",
    "per_mchar",
)


class ProviderConfig(Frozen):
    name: str
    base_url: str
    region: str = Field(min_length=1)
    weight: float = Field(default=1, gt=0)
    api_key_env: str | None = None
    api_key_file: Path | None = None
    api_key_credential: str | None = None
    models: dict[str, ModelConfig] = Field(min_length=1)
    # Filled in by load(), never read from TOML (see _reject_inline_keys).
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _default_upstream_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = {}
            for public, spec in data["models"].items():
                if isinstance(spec, dict) and "upstream" not in spec:
                    spec = {**spec, "upstream": public}
                models[public] = spec
            data = {**data, "models": models}
        return data

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not NAME_PATTERN.match(value) or "/" in value:
            raise ValueError(
                f"{value!r} is not a usable provider name: use letters, digits, '.', '_', '-'"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError(
                f"{value!r} is not an http(s) URL without query or fragment, "
                "e.g. https://api.example.com/v1"
            )
        return value.rstrip("/")

    @field_validator("models")
    @classmethod
    def _model_names_are_plain(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for public in value:
            if not NAME_PATTERN.match(public):
                raise ValueError(
                    f"{public!r} is not a usable public model name: no '/' or spaces "
                    "(the provider's own name goes in `upstream`)"
                )
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        sources = [self.api_key_env, self.api_key_file, self.api_key_credential]
        if sum(s is not None for s in sources) > 1:
            raise ValueError("set only one of api_key_env, api_key_file and api_key_credential")
        return self


class Settings(Frozen):
    """The whole, validated configuration; one instance is handed down to every part."""

    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    account: AccountConfig = AccountConfig()
    preferences: PreferencesConfig = PreferencesConfig()
    routing: RoutingConfig = RoutingConfig()
    cache: CacheConfig = CacheConfig()
    budget: BudgetConfig = BudgetConfig()
    ledger: LedgerConfig = LedgerConfig()
    providers: tuple[ProviderConfig, ...] = ()
    aliases: dict[str, tuple[str, ...]] = {}

    @model_validator(mode="after")
    def _names_are_consistent(self) -> Settings:
        problems: list[str] = []
        seen: set[str] = set()
        for i, provider in enumerate(self.providers):
            if provider.name in seen:
                problems.append(f"providers[{i}].name: {provider.name!r} is used twice")
            seen.add(provider.name)
        models = {m for p in self.providers for m in p.models}
        for alias, targets in self.aliases.items():
            if "/" in alias or not NAME_PATTERN.match(alias):
                problems.append(f"aliases.{alias}: not a usable alias name (no '/' or spaces)")
            if alias in models:
                problems.append(f"aliases.{alias}: a model of that name exists; pick another alias")
            if not targets:
                problems.append(f"aliases.{alias}: needs at least one model")
            problems += [
                f"aliases.{alias}: {t!r} is not a model any provider serves"
                for t in targets
                if t not in models
            ]
        prefs = self.preferences
        for key, names, known in (
            ("providers", prefs.providers, seen),
            ("exclude_providers", prefs.exclude_providers, seen),
            ("models", prefs.models, models),
            ("exclude_models", prefs.exclude_models, models),
        ):
            problems += [
                f"preferences.{key}: {n!r} is not configured (known: {', '.join(sorted(known))})"
                for n in names
                if n not in known
            ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)


def parse_listen(value: str) -> tuple[str, int] | str:
    """``host:port`` or ``[v6]:port`` to a (host, port) pair; ``unix:/path`` to the path."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{value!r}: a unix socket needs an absolute path, unix:/run/x.sock")
        return path
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if not match:
        raise ValueError(f"{value!r} is not host:port, [v6]:port or unix:/path")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"{value!r}: port {port} is out of range")
    return host, port


def _dotted(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config.example.toml)"
        # Errors raised by a model validator may carry several lines with their own paths.
        for line in message.split("\n"):
            if re.match(r"^[a-z_]+(\[\d+\])?[.:]", line) and not loc:
                problems.append(line)
            elif re.match(r"^[a-z_]+: ", line):
                problems.append(f"{_dotted(loc)}.{line}" if loc else line)
            else:
                problems.append(f"{_dotted(loc)}: {line}")
    return problems


def _read_key(
    i: int, provider: ProviderConfig, environ: Mapping[str, str]
) -> tuple[SecretStr | None, str | None]:
    where = f"providers[{i}]"
    if provider.api_key_env is not None:
        value = environ.get(provider.api_key_env, "")
        if not value:
            return None, (
                f"{where}.api_key_env: environment variable {provider.api_key_env} is not set"
            )
        return _checked_key(f"{where}.api_key_env", value.strip())
    if provider.api_key_credential is not None:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return None, (
                f"{where}.api_key_credential: $CREDENTIALS_DIRECTORY is not set "
                "(use LoadCredential= in the systemd unit, or api_key_file)"
            )
        credential = Path(directory) / provider.api_key_credential
        return _read_key_file(f"{where}.api_key_credential", credential)
    if provider.api_key_file is not None:
        return _read_key_file(f"{where}.api_key_file", provider.api_key_file)
    return None, None


def _read_key_file(where: str, path: Path) -> tuple[SecretStr | None, str | None]:
    try:
        mode = path.stat().st_mode
        if mode & stat.S_IROTH:
            return None, (
                f"{where}: {path} is readable by every user; run `chmod 600 {path}` first"
            )
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        return None, f"{where}: cannot read {path}: {exc.strerror or exc}"
    if not value:
        return None, f"{where}: {path} is empty"
    return _checked_key(where, value)


def _checked_key(where: str, value: str) -> tuple[SecretStr | None, str | None]:
    """A key goes into an HTTP header as it is: printable ASCII only (a line break inside it
    could add a header of its own)."""
    if value.isascii() and value.isprintable():
        return SecretStr(value), None
    return None, (
        f"{where}: the key holds a line break, a control or a non-ASCII character; "
        "store the key alone, as the provider issued it"
    )


def _reject_inline_keys(raw: Mapping[str, Any]) -> list[str]:
    providers = raw.get("providers")
    if not isinstance(providers, list):
        return []
    return [
        f"providers[{i}].api_key: keys never go in the config file; "
        "use api_key_env, api_key_file or api_key_credential"
        for i, p in enumerate(providers)
        if isinstance(p, dict) and "api_key" in p
    ]


def from_mapping(
    raw: Mapping[str, Any], *, source: str = "config", environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate an already-parsed config and read its keys; raise ConfigError with every problem."""
    env = os.environ if environ is None else environ
    problems = _reject_inline_keys(raw)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, problems + _validation_problems(exc)) from None
    providers = []
    for i, provider in enumerate(settings.providers):
        key, problem = _read_key(i, provider, env)
        if problem:
            problems.append(problem)
        providers.append(provider.model_copy(update={"api_key": key}))
    if problems:
        raise ConfigError(source, problems)
    return settings.model_copy(update={"providers": tuple(providers)})


def load(path: Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a TOML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = f"{path}: cannot read the config file: {exc.strerror or exc}"
        raise ConfigError(str(path), [problem]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"{path}: not valid TOML: {exc}"]) from None
    return from_mapping(raw, source=str(path), environ=environ)


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("TOKENHUB_SIDECAR_CONFIG"):
        return Path(env["TOKENHUB_SIDECAR_CONFIG"])
    local = Path("config.toml")
    return local if local.exists() else Path("/etc/tokenhub-sidecar/config.toml")
