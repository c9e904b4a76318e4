"""distinfer.client: the gRPC client SDK (blocking `Client`, asyncio `AsyncClient`).

Light on purpose: grpcio and protobuf only (no torch, no engine imports).
"""
from __future__ import annotations

from distinfer.client._common import RetryPolicy
from distinfer.client.async_client import AsyncClient, AsyncGenerateStream
from distinfer.client.errors import (
    AlreadyExistsError,
    AuthenticationError,
    DeadlineExceededError,
    DistinferClientError,
    FailedPreconditionError,
    InternalServerError,
    InvalidArgumentError,
    NotFoundError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnavailableError,
)
from distinfer.client.sync_client import Client, GenerateStream
from distinfer.client.types import (
    Completion,
    DrainResult,
    GenerateDelta,
    GenerateResult,
    InstanceStatus,
    Load,
    ModelInfo,
    ParallelConfig,
    ServerInfo,
    TokenizeResult,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AlreadyExistsError", "AsyncClient", "AsyncGenerateStream", "AuthenticationError", "Client", "Completion",
    "DeadlineExceededError", "DistinferClientError", "DrainResult", "FailedPreconditionError", "GenerateDelta",
    "GenerateResult", "GenerateStream", "InstanceStatus", "InternalServerError", "InvalidArgumentError", "Load",
    "ModelInfo", "NotFoundError", "ParallelConfig", "RequestCancelledError", "ResourceExhaustedError", "RetryPolicy",
    "ServerInfo", "TokenizeResult", "TokenLogprob", "UnavailableError", "Usage",
]
