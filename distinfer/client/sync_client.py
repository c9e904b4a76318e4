"""Client: the blocking gRPC client (one channel, thread-safe)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from distinfer.client._common import DEFAULT_DRAIN_TIMEOUT_S, ClientBase, Prompt, RetryPolicy
from distinfer.client.errors import UnavailableError, from_rpc_error, is_retryable
from distinfer.client.types import (
    DrainResult,
    GenerateDelta,
    GenerateResult,
    ModelInfo,
    ResultBuilder,
    ServerInfo,
    TokenizeResult,
)
from distinfer.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)
T = TypeVar("T")


class GenerateStream:
    """Iterator of GenerateDelta for one request. Closing it (or leaving its `with` block, or
    `cancel()`) before the end cancels the call, which aborts the request on the server."""

    def __init__(self, start: Callable[[], Any], request_id: str, retry: RetryPolicy) -> None:
        self.request_id = request_id
        self._start, self._retry = start, retry
        self._call: Any = None
        self._received = False
        self._done = False

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> GenerateDelta:
        if self._done:
            raise StopIteration
        attempt = 0
        while True:
            attempt += 1
            if self._call is None:
                self._call = self._start()
            try:
                message = next(self._call)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as exc:
                if not self._received and is_retryable(exc) and attempt < self._retry.max_attempts:
                    logger.info("Generate unavailable (%s); retrying", exc.details())
                    self._call = None
                    time.sleep(self._retry.backoff_s(attempt, exc))
                    continue
                self._done = True
                raise from_rpc_error(exc) from None
            self._received = True
            return GenerateDelta.from_proto(message)

    def cancel(self) -> None:
        """Cancel the call (the server aborts the request and frees its KV blocks)."""
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True

    close = cancel

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client(ClientBase):
    """Blocking client of a distinfer gRPC server.

        client = Client("127.0.0.1:50051", api_key="...")
        print(client.generate("The capital of France is", max_tokens=16, temperature=0).text)
    """

    _grpc = grpc

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=self._timeout(timeout), metadata=self.config.metadata())
            except grpc.RpcError as exc:
                if is_retryable(exc) and attempt < self.retry.max_attempts:
                    time.sleep(self.retry.backoff_s(attempt, exc))
                    continue
                raise from_rpc_error(exc) from None

    # ------------------------------------------------------------ API

    def generate_stream(self, prompt: Prompt, *, request_id: str | None = None, priority: int = 0, model: str = "",
                        timeout: float | None = None, **sampling: Any) -> GenerateStream:
        """Stream deltas; `sampling` takes SamplingParams names (max_tokens, temperature, stop, n, ...)."""
        start, request_id = self._generate_call(prompt, request_id, priority, model, timeout, sampling)
        return GenerateStream(start, request_id, self.retry)

    def generate(self, prompt: Prompt, *, request_id: str | None = None, priority: int = 0, model: str = "",
                 timeout: float | None = None, **sampling: Any) -> GenerateResult:
        """Generate and wait for the whole result."""
        with self.generate_stream(prompt, request_id=request_id, priority=priority, model=model,
                                  timeout=timeout, **sampling) as stream:
            builder = ResultBuilder(stream.request_id)
            for delta in stream:
                builder.add(delta)
        return builder.result()

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        """Abort a running request; False when the server knows no running request of that id."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout).found

    def model_info(self, timeout: float | None = None, *, model: str = "") -> ModelInfo:
        """The served model's limits; `model` picks one where an application serves several (empty: the
        server's only model, or its first)."""
        request = pb.GetModelInfoRequest(model=model)
        return ModelInfo.from_proto(self._unary(self._stub.GetModelInfo, request, timeout))

    def server_info(self, timeout: float | None = None, *, model: str = "") -> ServerInfo:
        """Version, parallelism, load and instances of the server of `model` (empty: the only/first one)."""
        request = pb.GetServerInfoRequest(model=model)
        return ServerInfo.from_proto(self._unary(self._stub.GetServerInfo, request, timeout))

    def drain_instance(self, instance_id: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, *,
                       model: str = "", timeout: float | None = None) -> DrainResult:
        """Admin (a server with several instances behind a router): stop sending requests to one instance,
        move its running requests to the others, wait up to timeout_s for the rest; NotFoundError for an
        unknown id, FailedPreconditionError on a single-engine server. Ids: server_info(model=model).instances;
        `model` names the model whose instance it is where an application serves several (empty: the only/first)."""
        request, deadline = self._drain_call(instance_id, timeout_s, model, timeout)
        return DrainResult.from_proto(self._unary(self._stub.DrainInstance, request, deadline))

    def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float | None = None, *,
                 model: str = "") -> TokenizeResult:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens, model=model)
        msg = self._unary(self._stub.Tokenize, request, timeout)
        return TokenizeResult(list(msg.token_ids), list(msg.tokens), msg.max_model_len)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", ..."""
        msg = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)

    def wait_until_serving(self, timeout: float = 60.0, poll_s: float = 0.2) -> None:
        """Block until health says SERVING; UnavailableError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "UNREACHABLE"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except UnavailableError as exc:
                last = f"UNREACHABLE ({exc.details})"
            time.sleep(poll_s)
        raise UnavailableError(f"server {self.config.target} not serving after {timeout}s: {last}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
