from __future__ import annotations

import pytest
from pydantic import SecretStr

from sidecar import errors
from sidecar.config import ServerConfig
from sidecar.security import (
    check_client_token,
    check_header_values,
    check_host,
    check_origin,
    client_token_id,
    safe_header_value,
    split_host,
)

DEFAULT_HOSTS = ServerConfig().allowed_hosts
TOKENS = (SecretStr("first-token-0123456789"), SecretStr("second-token-9876543210"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8700", ("localhost", "8700")),
        ("[::1]", ("[::1]", None)),
        ("[::1]:8700", ("[::1]", "8700")),
        ("127.0.0.1:8700", ("127.0.0.1", "8700")),
        ("localhost.:8700", ("localhost", "8700")),
    ],
)
def test_split_host(value: str, expected: tuple[str, str | None]) -> None:
    assert split_host(value) == expected


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:8700", "localhost", "LOCALHOST:8700", "[::1]", "[::1]:1234"],
)
def test_default_hosts_pass_with_or_without_port(host: str) -> None:
    check_host(host, DEFAULT_HOSTS)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8700",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8700",
        "127.0.0.2:8700",
        "localhost:notaport",
        "[::1",
        "[::2]:8700",
        "0.0.0.0:8700",
    ],
)
def test_other_hosts_are_refused(host: str) -> None:
    with pytest.raises(errors.HostNotAllowed) as caught:
        check_host(host, DEFAULT_HOSTS)
    assert caught.value.status == 403 and caught.value.code == "host_not_allowed"
    assert "server.allowed_hosts" in caught.value.message


@pytest.mark.parametrize("host", [None, ""])
def test_missing_host_is_refused(host: str | None) -> None:
    with pytest.raises(errors.HostNotAllowed):
        check_host(host, DEFAULT_HOSTS)


def test_an_entry_with_a_port_allows_only_that_port() -> None:
    allowed = ["sidecar:8700"]
    check_host("sidecar:8700", allowed)
    for host in ("sidecar", "sidecar:8701"):
        with pytest.raises(errors.HostNotAllowed):
            check_host(host, allowed)


def test_long_host_is_shortened_in_the_message() -> None:
    with pytest.raises(errors.HostNotAllowed) as caught:
        check_host("a" * 5000, DEFAULT_HOSTS)
    assert len(caught.value.message) < 400


def test_no_origin_passes() -> None:
    check_origin(None, [])


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "", "http://localhost:8700"])
def test_unlisted_origin_is_refused(origin: str) -> None:
    with pytest.raises(errors.OriginNotAllowed) as caught:
        check_origin(origin, [])
    assert caught.value.status == 403 and caught.value.code == "origin_not_allowed"


def test_listed_origin_passes_case_and_slash_insensitive() -> None:
    allowed = ["http://localhost:3000/"]
    check_origin("HTTP://LocalHost:3000", allowed)
    with pytest.raises(errors.OriginNotAllowed):
        check_origin("http://localhost:3001", allowed)


def test_no_tokens_configured_means_no_check() -> None:
    assert check_client_token(None, ()) is None
    assert check_client_token("Bearer whatever", ()) is None


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_each_configured_token_passes_with_a_stable_id(scheme: str) -> None:
    first = check_client_token(f"{scheme} first-token-0123456789", TOKENS)
    second = check_client_token("Bearer second-token-9876543210", TOKENS)
    assert first == client_token_id(TOKENS[0])
    assert second == client_token_id(TOKENS[1])
    assert first != second
    assert first is not None and "first-token" not in first


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic first-token-0123456789",
        "first-token-0123456789",
        "Bearer first-token-012345678",
        "Bearer first-token-0123456789x",
        "Bearer sk-the-openai-key-by-mistake",
        "Bearer t\udcffoken",
    ],
)
def test_missing_or_wrong_token_is_401(authorization: str | None) -> None:
    with pytest.raises(errors.InvalidClientToken) as caught:
        check_client_token(authorization, TOKENS)
    err = caught.value
    assert err.status == 401 and err.code == "invalid_client_token"
    assert "first-token" not in err.message and "sk-the" not in err.message


def test_token_id_is_stable_across_instances() -> None:
    assert client_token_id(SecretStr("first-token-0123456789")) == client_token_id(TOKENS[0])


@pytest.mark.parametrize(
    ("value", "safe"),
    [("plain value", True), ("", True), ("a\rb", False), ("a\nb", False), ("a\0b", False)],
)
def test_safe_header_value(value: str, safe: bool) -> None:
    assert safe_header_value(value) is safe


def test_check_header_values_names_the_bad_header() -> None:
    check_header_values([("X-TokenHub-Affinity", "user-42")])
    with pytest.raises(errors.InvalidRequest) as caught:
        check_header_values([("X-Ok", "fine"), ("X-TokenHub-Affinity", "a\r\nX-Evil: 1")])
    assert caught.value.status == 400
    assert caught.value.param == "X-TokenHub-Affinity"
    assert "X-TokenHub-Affinity" in caught.value.message
    assert "X-Evil" not in caught.value.message
