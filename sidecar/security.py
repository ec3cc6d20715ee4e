"""Who may talk to the sidecar: Host (DNS rebinding), Origin (browser pages), client tokens.

Pure checks that raise the matching ``errors`` class; ``app.py`` wires them into a middleware.
Values a client sent are echoed only shortened and quoted, and tokens never.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Sequence

from pydantic import SecretStr

from sidecar import errors

_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def split_host(value: str) -> tuple[str, str | None]:
    """``"LocalHost:8700"`` -> ``("localhost", "8700")``; ``"[::1]"`` -> ``("[::1]", None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return value, None
        name, rest = value[: end + 1], value[end + 1 :]
        return name, rest[1:] if rest.startswith(":") else (rest or None)
    if value.count(":") == 1:
        name, port = value.split(":")
        return name.rstrip("."), port
    return value.rstrip("."), None


@functools.lru_cache(maxsize=256)
def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """An entry without a port allows any port; an entry with one allows only that port.

    Memoized (a pure function of two strings): clients send the same few Hosts every time.
    """
    name, port = split_host(host)
    if not name or (port is not None and not port.isdigit()):
        return False
    for entry in allowed:
        want_name, want_port = split_host(entry)
        if want_name == name and want_port in (None, port):
            return True
    return False


def check_host(host: str | None, allowed: Sequence[str]) -> None:
    """Refuse a Host the sidecar does not answer to: a page on another name (DNS rebinding)."""
    if not host:
        raise errors.HostNotAllowed(
            "The request has no Host header; send one of server.allowed_hosts "
            f"({', '.join(allowed) or 'none configured'})."
        )
    if not host_allowed(host, tuple(allowed)):  # a tuple stays itself: no copy
        raise errors.HostNotAllowed(
            f"Host {_shown(host)} is not allowed. Call the sidecar as one of "
            f"{', '.join(allowed) or '(none configured)'}, or add the name to "
            "server.allowed_hosts (this guards against DNS rebinding)."
        )


def _origin_key(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


def check_origin(origin: str | None, allowed: Sequence[str]) -> None:
    """No Origin header (SDKs, curl) passes; a browser page's Origin must be listed."""
    if origin is None:
        return
    if _origin_key(origin) in {_origin_key(a) for a in allowed}:
        return
    raise errors.OriginNotAllowed(
        f"Origin {_shown(origin)} is not allowed: browser pages may call the sidecar only from "
        "an origin listed in server.allowed_origins."
    )


def client_token_id(token: SecretStr) -> str:
    """A stable, non-secret name for a token (cache scoping, logs)."""
    digest = hashlib.sha256(token.get_secret_value().encode()).hexdigest()
    return f"ct-{digest[:16]}"


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def check_client_token(authorization: str | None, tokens: Sequence[SecretStr]) -> str | None:
    """None when no tokens are configured, else the id of the token presented (or 401)."""
    if not tokens:
        return None
    presented = _bearer(authorization)
    if presented is None:
        raise errors.InvalidClientToken(
            "Missing client token: send 'Authorization: Bearer <token>' with one of "
            "server.client_tokens (with the OpenAI SDK: api_key=<token>)."
        )
    given = presented.encode("utf-8", "surrogatepass")
    match: SecretStr | None = None
    for token in tokens:  # compare with every token, so timing does not tell which one is close
        if hmac.compare_digest(given, token.get_secret_value().encode()):
            match = token
    if match is None:
        raise errors.InvalidClientToken(
            "Invalid client token: the bearer token is not one of server.client_tokens. "
            "Check the api_key your client sends."
        )
    return client_token_id(match)


def safe_header_value(value: str) -> bool:
    """No CR, LF or NUL: such a value could split or smuggle a header upstream."""
    return not any(c in value for c in _FORBIDDEN_IN_HEADERS)


def check_header_values(headers: Iterable[tuple[str, str]]) -> None:
    """Raise 400 ``invalid_request`` naming the first header with CR, LF or NUL in it."""
    for name, value in headers:
        if not (safe_header_value(name) and safe_header_value(value)):
            raise errors.InvalidRequest(
                f"Header {_shown(name, 40)} contains a CR, LF or NUL character; remove it.",
                param=name if safe_header_value(name) else None,
            )
