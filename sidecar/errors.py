"""The few errors the sidecar raises on purpose, each knowing its HTTP status and OpenAI code.

One middleware renders them (``app.py``); nothing else turns an exception into a response.
"""

from __future__ import annotations

from collections.abc import Mapping


class SidecarError(Exception):
    """An error a client can trigger; rendered as the OpenAI error shape."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})
        if self.status >= 500:
            # The sidecar was already the retry loop; an SDK retry would only repeat the chain.
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidJSON(SidecarError):
    code = "invalid_json"


class InvalidRequest(SidecarError):
    code = "invalid_request"


class InvalidClientToken(SidecarError):
    status = 401
    type = "authentication_error"
    code = "invalid_client_token"


class OutsideBounds(SidecarError):
    status = 403
    type = "permission_error"
    code = "outside_preference_bounds"


class HostNotAllowed(SidecarError):
    status = 403
    type = "permission_error"
    code = "host_not_allowed"


class OriginNotAllowed(SidecarError):
    status = 403
    type = "permission_error"
    code = "origin_not_allowed"


class ModelNotFound(SidecarError):
    status = 404
    code = "model_not_found"


class NotFound(SidecarError):
    status = 404
    code = "not_found"


class MethodNotAllowed(SidecarError):
    status = 405
    code = "method_not_allowed"


class RequestTooLarge(SidecarError):
    status = 413
    code = "request_too_large"


class RateLimited(SidecarError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(SidecarError):
    status = 429
    type = "rate_limit_error"
    code = "budget_exceeded"


class UpstreamFailed(SidecarError):
    """Every attempt failed."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class NoProviderInScope(SidecarError):
    status = 503
    type = "server_error"
    code = "no_provider_in_scope"


class LedgerUnavailable(SidecarError):
    status = 503
    type = "server_error"
    code = "ledger_unavailable"
