"""A dead worker fails the instance fast and cleanly, and a new instance can take its place.

Streams are in flight on a tp=2 AsyncLLM when one worker actor is killed (`ray.kill`), or its
model's forward is replaced (through the actor's `__ray_call__`, no hook in product code) by one
that raises or that exits the process. Every stream must end with EngineDeadError within seconds,
new requests must be refused with the same error, the surviving rank (blocked in an all-reduce with
the dead one) must not keep the instance alive, and shutdown leaves no actor or placement group.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from distinfer import LLM, AsyncLLM, SamplingParams
from distinfer.executor.base import EngineDeadError, EngineDrainingError

from .conftest import live_placement_groups, live_workers, wait_released

ENGINE_ARGS = dict(tensor_parallel_size=2, num_kv_blocks=128, block_size=16, max_model_len=512)
NUM_STREAMS = 4
FAILURE_DEADLINE_S = 10.0  # generous on a loaded 2-core machine; the failure normally lands in ms


def _crash_forward(how: str):
    """A function for RayWorker.__ray_call__: the next forward on that rank fails."""

    def install(actor) -> int:
        def forward(*args, **kwargs):
            if how == "exit":
                os._exit(3)
            raise RuntimeError("injected forward failure")

        actor.worker.runner.model.forward = forward
        return os.getpid()

    return install


async def _stream(engine: AsyncLLM, index: int, started: asyncio.Event) -> tuple[int, BaseException | None, float]:
    """Consume one long stream; (tokens received, the error it ended with, when it ended)."""
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    received = 0
    try:
        async for delta in engine.generate(f"Request {index} tells a long story:", params, request_id=f"r{index}"):
            received += len(delta.outputs[0].token_ids)
            if received >= 2:
                started.set()
        return received, None, time.monotonic()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return received, exc, time.monotonic()


async def _fail_during_streams(engine: AsyncLLM, inject) -> tuple[list, float]:
    started = asyncio.Event()
    tasks = [asyncio.create_task(_stream(engine, i, started)) for i in range(NUM_STREAMS)]
    await asyncio.wait_for(started.wait(), timeout=60)
    injected_at = time.monotonic()
    inject(engine.engine.executor.workers)
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=FAILURE_DEADLINE_S + 20)
    return results, injected_at


def _assert_refused(engine: AsyncLLM, error: EngineDeadError) -> None:
    async def one() -> None:
        async for _ in engine.generate("a new request", SamplingParams(max_tokens=4), request_id="after-death"):
            pass

    with pytest.raises(EngineDeadError) as refused:
        asyncio.run(one())
    assert str(refused.value) == str(error)


def _inject(mode: str):
    import ray

    def inject(workers) -> None:
        if mode == "kill":
            ray.kill(workers[1])
            return
        installed = workers[1].__ray_call__.remote(_crash_forward(mode))
        try:
            ray.get(installed, timeout=30)
        except ray.exceptions.ActorDiedError:
            if mode != "exit":
                raise
            # The next forward (already queued behind the install) may exit before the install's reply
            # leaves the process: the actor is dead either way, which is what this mode injects.

    return inject


EXPECTED = {
    "kill": "killed by `ray.kill`",
    "raise": "RuntimeError: injected forward failure",
    "exit": "ActorDiedError",
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_worker_failure_fails_streams_and_refuses_new_requests(mode, ray_session, tiny_model_dir):
    engine = AsyncLLM(tiny_model_dir, **ENGINE_ARGS)
    worker_pids = {w["Pid"] for w in live_workers()}
    assert len(worker_pids) == 2
    try:
        results, injected_at = asyncio.run(_fail_during_streams(engine, _inject(mode)))
        errors = [error for _, error, _ in results]
        assert all(isinstance(e, EngineDeadError) for e in errors), errors
        assert all(ended - injected_at < FAILURE_DEADLINE_S for _, _, ended in results)
        assert all(received < 400 for received, _, _ in results)
        message = str(errors[0])
        assert message.startswith("engine is dead: worker rank 1 failed in execute_model") and EXPECTED[mode] in message
        assert engine.is_dead and engine.dead_error is errors[0]
        _assert_refused(engine, engine.dead_error)
        # The instance released itself: the surviving rank is not left waiting in a collective.
        workers, groups = wait_released()
        assert not workers and not groups
    finally:
        engine.shutdown()
    assert not live_workers() and not live_placement_groups()


def test_new_instance_serves_after_a_failure(ray_session, tiny_model_dir):
    """The replacement gets the released bundles and serves; shutdown releases everything."""
    llm = LLM(tiny_model_dir, **ENGINE_ARGS)
    try:
        _inject("kill")(llm.engine.executor.workers)
        with pytest.raises(EngineDeadError, match="worker rank 1"):
            llm.generate("The capital of France is", SamplingParams(max_tokens=4), use_tqdm=False)
        with pytest.raises(EngineDeadError):  # the sync API refuses too, at once
            llm.generate("again", SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.shutdown()
    replacement = LLM(tiny_model_dir, **ENGINE_ARGS)
    try:
        out = replacement.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 6
        assert len(live_workers()) == 2 and len(live_placement_groups()) == 1
    finally:
        replacement.shutdown()
    workers, groups = wait_released()
    assert not workers and not groups


def test_shutdown_with_steps_in_flight_releases_everything(ray_session, tiny_model_dir):
    """Shutting down a busy pipeline-parallel AsyncLLM ends its streams and leaks nothing."""

    async def run() -> list:
        engine = AsyncLLM(tiny_model_dir, pipeline_parallel_size=2, num_kv_blocks=128, max_model_len=512)
        started = asyncio.Event()
        tasks = [asyncio.create_task(_stream(engine, i, started)) for i in range(NUM_STREAMS)]
        await asyncio.wait_for(started.wait(), timeout=60)
        await asyncio.to_thread(engine.shutdown)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    results = asyncio.run(run())
    assert all(isinstance(error, EngineDrainingError) for _, error, _ in results), results
