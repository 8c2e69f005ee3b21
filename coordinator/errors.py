"""Errors raised inside the coordinator, each knowing its OpenAI error envelope.

    CoordinatorError                 500 server_error
    ├── InvalidRequest               400 invalid_request_error
    ├── AuthenticationFailed         401 authentication_error
    ├── InsufficientCredit           402 insufficient_quota
    ├── PermissionDenied             403 permission_error
    ├── NotFound                     404 not_found_error
    │   └── ModelNotFound            404 model_not_found
    ├── PayloadTooLarge              413 invalid_request_error
    ├── RateLimited                  429 rate_limit_error            (+ Retry-After)
    ├── UpstreamFailed               502 upstream_error
    ├── NoCapacity                   503 service_unavailable         (+ Retry-After)
    └── UpstreamTimeout              504 timeout

Services raise these; the HTTP layer turns them into `{"error": {...}}` in one place, and
foreign errors (engine, gRPC, database) are mapped to them where they are caught.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s


class InvalidRequest(CoordinatorError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(CoordinatorError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InsufficientCredit(CoordinatorError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDenied(CoordinatorError):
    status = 403
    type = "permission_error"


class NotFound(CoordinatorError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(CoordinatorError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(CoordinatorError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RateLimited(CoordinatorError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamFailed(CoordinatorError):
    status = 502
    type = "upstream_error"


class NoCapacity(CoordinatorError):
    status = 503
    type = "service_unavailable"
    code = "no_capacity"


class UpstreamTimeout(CoordinatorError):
    status = 504
    type = "timeout"


def error_body(exc: CoordinatorError) -> dict[str, dict[str, str | None]]:
    """OpenAI's error envelope for `exc`: the one builder, for HTTP bodies and SSE alike."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}  # fmt: skip
