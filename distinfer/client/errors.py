"""Typed client errors: one class per status code a caller may want to handle, all carrying the
server's message (`details`) and status code (`code`)."""
from __future__ import annotations

import grpc

RETRYABLE_KEY = "distinfer-retryable"  # the server's trailing metadata on UNAVAILABLE
RETRY_AFTER_KEY = "grpc-retry-pushback-ms"  # gRPC's own retry hint, sent with a retryable UNAVAILABLE


class DistinferClientError(Exception):
    """Base of every error the client raises for a failed call."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details if code is None else f"{code.name}: {details}")
        self.details = details
        self.code = code


class InvalidArgumentError(DistinferClientError, ValueError):
    """The request was refused; `details` names the field."""


class AlreadyExistsError(DistinferClientError):
    """The request_id is already in use by a running request."""


class ResourceExhaustedError(DistinferClientError):
    """The server has too many pending requests; retry later."""


class UnavailableError(DistinferClientError):
    """The server cannot be reached, is still loading, draining, or its engine is dead."""


class NotFoundError(DistinferClientError, LookupError):
    """What the call names does not exist (DrainInstance: no engine instance of that id)."""


class FailedPreconditionError(DistinferClientError):
    """The server is not in a state the call needs (DrainInstance on a server with a single engine)."""


class DeadlineExceededError(DistinferClientError, TimeoutError):
    """The call's deadline passed; the server aborted the request."""


class AuthenticationError(DistinferClientError):
    """Missing or wrong API key (UNAUTHENTICATED)."""


class RequestCancelledError(DistinferClientError):
    """The call was cancelled (by this client, or by the server shutting down)."""


class InternalServerError(DistinferClientError):
    """The server failed unexpectedly (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[DistinferClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def from_rpc_error(error: grpc.RpcError) -> DistinferClientError:
    """The typed error for a failed grpc call (sync or asyncio)."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, InternalServerError) if code is not None else InternalServerError
    return cls(details, code)


def is_retryable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE while connecting, while the model loads or while the server drains (another replica
    may answer); not when the server says it is final (dead engine)."""
    if not hasattr(error, "code") or error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return all(not (k == RETRYABLE_KEY and v == "false") for k, v in _trailing(error))


def retry_pushback_s(error: grpc.RpcError) -> float:
    """The server's hint (grpc-retry-pushback-ms) of how long to wait before a retry; 0 without one."""
    for key, value in _trailing(error):
        if key == RETRY_AFTER_KEY and str(value).isdigit():
            return int(value) / 1000.0
    return 0.0


def _trailing(error: grpc.RpcError) -> tuple:
    """The call's trailing metadata; empty when a transport failure carried none."""
    try:
        return tuple(error.trailing_metadata() or ())
    except Exception:  # some transport failures carry no metadata at all
        return ()
