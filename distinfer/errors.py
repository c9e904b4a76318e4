"""The exception types every layer raises or maps, at the bottom of the import graph so that the serving
front ends never import engine or executor internals to recognise them."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine (or one of its workers) died, or its step loop hung past the step timeout; in-flight
    and new requests fail with this, and the serving process exits so that a supervisor restarts it."""


class EngineDrainingError(RuntimeError):
    """The engine is shutting down gracefully: it refuses new requests, and requests still running when
    the drain time runs out end with this. Another replica can take them (retryable)."""


class QueueFullError(RuntimeError):
    """The bound on pending requests is reached (429 / RESOURCE_EXHAUSTED); retry later."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (non-finite logits, a sampling or detokenizing error) and was
    ended alone; the others go on. The message is safe to show to the client: details are in the log."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason

    def __reduce__(self) -> tuple:  # pickles with its own arguments (it crosses Ray actors)
        return type(self), (self.request_id, self.reason)


class RequestMovedError(RuntimeError):
    """The request left this engine instance for another (live migration): its stream here ends with this
    and goes on from the other instance. Raised to the router, never to a client."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} moved to another instance")
        self.request_id = request_id

    def __reduce__(self):  # crosses Ray from an instance to the router
        return (type(self), (self.request_id,))
