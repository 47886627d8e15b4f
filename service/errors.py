"""Domain errors: a stable `code`, a message that says what to do next, and an HTTP status."""

from __future__ import annotations


class AipError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(AipError):
    """The request itself is wrong; retrying it unchanged cannot help."""

    status = 422
    code = "invalid_input"


class UnsupportedMedia(AipError):
    status = 415
    code = "unsupported_media"


class PayloadTooLarge(AipError):
    status = 413
    code = "payload_too_large"


class NotFound(AipError):
    status = 404
    code = "not_found"


class Conflict(AipError):
    status = 409
    code = "conflict"


class Gone(AipError):
    status = 410
    code = "gone"


class Forbidden(AipError):
    status = 403
    code = "forbidden"


class Unauthorized(AipError):
    status = 401
    code = "unauthorized"


class DiskFull(AipError):
    """The data directory's disk has no room left; nothing was accepted."""

    status = 507
    code = "disk_full"


class OverBudget(AipError):
    """A model load that would not fit the memory budget; the message gives both numbers."""

    status = 409
    code = "over_budget"


class ModelUnavailable(AipError):
    """A model is missing, still loading or failed to load: the service cannot run jobs yet."""

    status = 503
    code = "model_unavailable"


class Unavailable(AipError):
    """This machine lacks what the request needs (a PDF converter)."""

    status = 503


class JobFailure(Exception):
    """Why one attempt at a job failed; `transient` ones are retried with backoff."""

    def __init__(self, code: str, message: str, *, transient: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.transient = transient


class StartupRefused(AipError):
    """The service will not start as configured (its data directory or inbox is taken); the
    message is one sentence naming the setting that fixes it."""

    status = 409
    code = "startup_refused"
