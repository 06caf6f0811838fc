"""Errors that reach API clients.

Each error is a small class with an HTTP status and a SCREAMING_SNAKE error code, in the style
of datasette's exceptions: the HTTP layer turns any `ApiError` into
`{"detail": ..., "error_code": ...}` with that status, so the store and the job rules can raise
them without knowing about HTTP.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error with a status code and an error code, shown to the client as is."""

    status = 500
    error_code = "INTERNAL_ERROR"
    # The request field the error is about, where one is (OpenAI's error shape names it).
    param: str | None = None

    def __init__(
        self,
        detail: str,
        *,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if error_code is not None:
            self.error_code = error_code
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400
    error_code = "BAD_REQUEST"


class Unauthorized(ApiError):
    status = 401
    error_code = "INVALID_API_KEY"


class PaymentRequired(ApiError):
    status = 402
    error_code = "INSUFFICIENT_FUNDS"


class Forbidden(ApiError):
    status = 403
    error_code = "FORBIDDEN"


class NotFound(ApiError):
    status = 404
    error_code = "NOT_FOUND"


class Conflict(ApiError):
    status = 409
    error_code = "CONFLICT"


class PayloadTooLarge(ApiError):
    status = 413
    error_code = "PAYLOAD_TOO_LARGE"


class ServiceUnavailable(ApiError):
    status = 503
    error_code = "SERVICE_UNAVAILABLE"


class TooManyRequests(ApiError):
    status = 429
    error_code = "RATE_LIMITED"


class StorageFull(ApiError):
    """The node could not write to its store (a full disk, or a write the disk refused).

    Nothing was written; the same request succeeds once space is back, so the answer says
    when to retry, as a 429 does.
    """

    status = 507
    error_code = "STORAGE_FULL"
    retry_after_seconds = 10

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": str(self.retry_after_seconds)})
