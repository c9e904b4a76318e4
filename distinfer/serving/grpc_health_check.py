"""Standard grpc.health.v1 health for the inference service, derived from the engine's state.

SERVING only while the model is loaded and the engine neither dead nor draining. `Check` reads the
state when asked; a small poller pushes changes to `Watch` subscribers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from grpc_health.v1 import health, health_pb2

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EngineHealthServicer(health.aio.HealthServicer):
    """Reports `is_serving()` for the overall server ("") and each name in `services`."""

    def __init__(self, services: list[str], is_serving: Callable[[], bool], poll_interval_s: float = 0.25) -> None:
        super().__init__()
        self._services = ["", *services]
        self._is_serving = is_serving
        self._poll_interval_s = poll_interval_s
        self._task: asyncio.Task | None = None
        self._current: int | None = None
        for service in self._services:
            self._server_status[service] = NOT_SERVING

    async def refresh(self) -> int:
        try:
            status = SERVING if self._is_serving() else NOT_SERVING
        except Exception:  # a broken probe means not serving, never a crashed health service
            logger.exception("health probe failed")
            status = NOT_SERVING
        if status != self._current:
            logger.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            self._current = status
            for service in self._services:
                await self.set(service, status)
        return status

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if not self._gracefully_shutting_down:
            await self.refresh()
        return await super().Check(request, context)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="distinfer-grpc-health")

    async def _poll(self) -> None:
        while not self._gracefully_shutting_down:
            await self.refresh()
            await asyncio.sleep(self._poll_interval_s)

    async def shutdown(self) -> None:
        await self.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
