"""AsyncClient: the asyncio gRPC client (grpc.aio); create it inside the event loop that uses it."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

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


class AsyncGenerateStream:
    """Async iterator of GenerateDelta for one request. `cancel()`, leaving its `async with` block
    early, or cancelling the consuming task cancels the call, which aborts the request on the server."""

    def __init__(self, start: Callable[[], Any], request_id: str, retry: RetryPolicy) -> None:
        self.request_id = request_id
        self._start, self._retry = start, retry
        self._call: Any = None
        self._received = False
        self._done = False

    def __aiter__(self) -> "AsyncGenerateStream":
        return self

    async def __anext__(self) -> GenerateDelta:
        if self._done:
            raise StopAsyncIteration
        attempt = 0
        while True:
            attempt += 1
            if self._call is None:
                self._call = self._start()
            try:
                message = await self._call.read()
            except grpc.RpcError as exc:
                if not self._received and is_retryable(exc) and attempt < self._retry.max_attempts:
                    logger.info("Generate unavailable (%s); retrying", exc.details())
                    self._call = None
                    await asyncio.sleep(self._retry.backoff_s(attempt, exc))
                    continue
                self._done = True
                raise from_rpc_error(exc) from None
            except asyncio.CancelledError:
                self.cancel()
                raise
            if message is grpc.aio.EOF:
                self._done = True
                raise StopAsyncIteration
            self._received = True
            return GenerateDelta.from_proto(message)

    def cancel(self) -> None:
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> "AsyncGenerateStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient(ClientBase):
    """asyncio client of a distinfer gRPC server.

        async with AsyncClient("127.0.0.1:50051") as client:
            async for delta in client.generate_stream("Hello", max_tokens=16):
                print(delta.text, end="")
    """

    _grpc = grpc.aio

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=self._timeout(timeout), metadata=self.config.metadata())
            except grpc.RpcError as exc:
                if is_retryable(exc) and attempt < self.retry.max_attempts:
                    await asyncio.sleep(self.retry.backoff_s(attempt, exc))
                    continue
                raise from_rpc_error(exc) from None

    def generate_stream(self, prompt: Prompt, *, request_id: str | None = None, priority: int = 0, model: str = "",
                        timeout: float | None = None, **sampling: Any) -> AsyncGenerateStream:
        """Stream deltas; `sampling` takes SamplingParams names (max_tokens, temperature, stop, n, ...)."""
        start, request_id = self._generate_call(prompt, request_id, priority, model, timeout, sampling)
        return AsyncGenerateStream(start, request_id, self.retry)

    async def generate(self, prompt: Prompt, *, request_id: str | None = None, priority: int = 0, model: str = "",
                       timeout: float | None = None, **sampling: Any) -> GenerateResult:
        async with self.generate_stream(prompt, request_id=request_id, priority=priority, model=model,
                                        timeout=timeout, **sampling) as stream:
            builder = ResultBuilder(stream.request_id)
            async for delta in stream:
                builder.add(delta)
        return builder.result()

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return (await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)).found

    async def model_info(self, timeout: float | None = None, *, model: str = "") -> ModelInfo:
        """The served model's limits; `model` picks one where an application serves several (empty: the
        server's only model, or its first)."""
        request = pb.GetModelInfoRequest(model=model)
        return ModelInfo.from_proto(await self._unary(self._stub.GetModelInfo, request, timeout))

    async def server_info(self, timeout: float | None = None, *, model: str = "") -> ServerInfo:
        """Version, parallelism, load and instances of the server of `model` (empty: the only/first one)."""
        request = pb.GetServerInfoRequest(model=model)
        return ServerInfo.from_proto(await self._unary(self._stub.GetServerInfo, request, timeout))

    async def drain_instance(self, instance_id: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, *,
                             model: str = "", timeout: float | None = None) -> DrainResult:
        """Admin (a server with several instances behind a router): stop sending requests to one instance,
        move its running requests to the others, wait up to timeout_s for the rest; NotFoundError for an
        unknown id, FailedPreconditionError on a single-engine server. Ids: server_info(model=model).instances;
        `model` names the model whose instance it is where an application serves several (empty: the only/first)."""
        request, deadline = self._drain_call(instance_id, timeout_s, model, timeout)
        return DrainResult.from_proto(await self._unary(self._stub.DrainInstance, request, deadline))

    async def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float | None = None, *,
                       model: str = "") -> TokenizeResult:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens, model=model)
        msg = await self._unary(self._stub.Tokenize, request, timeout)
        return TokenizeResult(list(msg.token_ids), list(msg.tokens), msg.max_model_len)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        msg = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)

    async def wait_until_serving(self, timeout: float = 60.0, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        last = "UNREACHABLE"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except UnavailableError as exc:
                last = f"UNREACHABLE ({exc.details})"
            await asyncio.sleep(poll_s)
        raise UnavailableError(f"server {self.config.target} not serving after {timeout}s: {last}")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
