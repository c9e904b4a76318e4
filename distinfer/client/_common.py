"""What the sync and asyncio clients share: request building, credentials, metadata, retries, channel."""
from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import grpc
from grpc_health.v1 import health_pb2_grpc

from distinfer.client.errors import retry_pushback_s
from distinfer.v1 import inference_pb2 as pb
from distinfer.v1 import inference_pb2_grpc as pb_grpc

SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # the server's default too
MAX_DRAIN_TIMEOUT_S = 3600.0  # the server's upper bound
DRAIN_DEADLINE_MARGIN_S = 60.0  # beyond timeout_s: the moves before the wait, and the answer's way back
Prompt = Union[str, Sequence[int]]  # text, or token ids of the served model


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that failed with a retryable UNAVAILABLE before any response arrived
    (server not reachable yet, model still loading). Bounded: `max_attempts` calls in all."""

    max_attempts: int = 6  # with the defaults: about 2.5 to 5 s of retrying in all
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff_s(self, attempt: int, error: grpc.RpcError | None = None) -> float:
        """Sleep before attempt `attempt + 1` (attempt counts from 1): exponential with jitter, and at
        least the server's retry hint when the failed call carried one."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        hint = retry_pushback_s(error) if error is not None else 0.0
        return max(random.uniform(ceiling / 2, ceiling), min(hint, self.max_backoff_s))


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ConnectionConfig:
    """Where and how to connect."""

    target: str
    api_key: str | None = None
    root_certificates: bytes | None = None  # PEM of the CA (or self-signed cert) to trust
    tls: bool = False  # TLS with the system's trust store when no root_certificates are given
    tls_server_name: str | None = None  # the name the certificate must carry, when not the target host

    @classmethod
    def create(cls, target: str, api_key: str | None, tls: bool, root_certificates: bytes | str | Path | None,
               tls_server_name: str | None) -> "ConnectionConfig":
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        return cls(target, api_key, root_certificates, tls or root_certificates is not None, tls_server_name)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates) if self.tls else None

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 16 << 20),
            # grpc's own reconnect backoff (1 s, growing to 120 s) would outlast our retries.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def new_request_id() -> str:
    return f"client-{uuid.uuid4().hex}"


def build_generate_request(prompt: Prompt, request_id: str | None, priority: int, model: str,
                           sampling: dict[str, Any]) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt (text or token ids) and SamplingParams keyword arguments
    (None means the server's default). The server validates the values; this checks only names/types."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    given = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    request = pb.GenerateRequest(request_id=request_id or new_request_id(), priority=priority, model=model,
                                 sampling_params=pb.SamplingParams(**given))
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be a str or a sequence of token ids, not bytes: decode it first")
    else:
        request.token_ids.SetInParent()  # an empty list is still a token-id prompt (the server refuses it)
        request.token_ids.ids.extend(list(prompt))
    return request


class ClientBase:
    """Channel, stubs, default deadline, retry policy and Generate calls of `Client` and `AsyncClient`;
    `_grpc` is the module whose channels the subclass speaks (grpc, or grpc.aio)."""

    _grpc: Any = grpc

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, tls_server_name: str | None = None,
                 timeout: float | None = None, retry: RetryPolicy = RetryPolicy()) -> None:
        self.config = ConnectionConfig.create(target, api_key, tls, root_certificates, tls_server_name)
        self.timeout = timeout  # default deadline of every call, in seconds (None: none)
        self.retry = retry
        credentials = self.config.credentials()
        options = self.config.options()
        self._channel = (self._grpc.secure_channel(target, credentials, options) if credentials is not None
                         else self._grpc.insecure_channel(target, options))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _drain_call(self, instance_id: str, timeout_s: float, model: str,
                    timeout: float | None) -> tuple[pb.DrainInstanceRequest, float | None]:
        """(request, call deadline): without an explicit `timeout`, the default deadline is stretched to
        outlast the server's wait (a drain that outlives its call goes on on the server, unreported)."""
        request = pb.DrainInstanceRequest(instance_id=instance_id, timeout_s=timeout_s, model=model)
        if timeout is not None or self.timeout is None:
            return request, timeout
        wait = min(timeout_s, MAX_DRAIN_TIMEOUT_S) if math.isfinite(timeout_s) and timeout_s > 0 else 0.0
        return request, max(self.timeout, wait + DRAIN_DEADLINE_MARGIN_S)  # out of range: the server refuses it

    def _generate_call(self, prompt: Prompt, request_id: str | None, priority: int, model: str,
                       timeout: float | None, sampling: dict[str, Any]) -> tuple[Callable[[], Any], str]:
        """(a function that starts the Generate call, its request id): streams restart it on retry."""
        request = build_generate_request(prompt, request_id, priority, model, sampling)
        deadline = self._timeout(timeout)

        def start() -> Any:
            return self._stub.Generate(request, timeout=deadline, metadata=self.config.metadata())

        return start, request.request_id
