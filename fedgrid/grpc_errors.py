"""fedgrid errors and gRPC status codes, both ways: the server answers a FedgridError with a status
code and its message; clients turn the status back into the matching error, so a caller of the
Session API catches the same exception types the server raised."""

from __future__ import annotations

import grpc

from fedgrid import errors

STATUS_OF: list[tuple[type[errors.FedgridError], grpc.StatusCode]] = [
    (errors.IdentityError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.AuthorizationError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.EncryptionError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FrameError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.TransferError, grpc.StatusCode.DATA_LOSS),
    (errors.KitError, grpc.StatusCode.FAILED_PRECONDITION),
]


class UnreachableError(errors.FedgridError):
    """The server could not be reached (not running, wrong address, or our certificate refused)."""


def status_of(exc: errors.FedgridError) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


ERROR_KEY = "fedgrid-error"
"""Trailing metadata key carrying the name of the error class the server raised."""


def error_metadata(exc: errors.FedgridError) -> tuple[tuple[str, str], ...]:
    return ((ERROR_KEY, type(exc).__name__),)


def error_from_rpc(exc: grpc.RpcError, prefix: str = "") -> errors.FedgridError:
    """The FedgridError a failed call stands for: the server's own class when it named one."""
    name = ""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == ERROR_KEY:
                name = value
    except Exception:  # noqa: BLE001 - no metadata on this error: fall back to the status code
        name = ""
    details = f"{prefix}{exc.details() or ''}"
    return error_from_status(exc.code(), details, name)


def error_from_status(code: grpc.StatusCode, details: str, name: str = "") -> errors.FedgridError:
    """The error class the server raised (by `name`, else by `code`), carrying its message."""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnreachableError(details)
    cls = getattr(errors, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, errors.FedgridError):
        return cls(details)
    for cls, status in STATUS_OF:
        if status == code:
            if cls is errors.ConfigError:
                return errors.JobSpecError(details)
            return cls(details)
    return errors.FedgridError(details)
