"""Live migration through the router, two engine instances as real Ray actors on the tiny Llama: a request
moved at any point (pre-copy stages or stop-and-copy) streams exactly what it would have without moving
(tokens, logprobs, text, seeded samples); a destination that is full or dead, a request aborted or
finishing during the move: nothing lost or duplicated, and every block of both instances free after."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from distinfer import SamplingParams
from distinfer.router.migration import MigrationConfig, MigrationStatus
from tests.distributed.test_router import ENGINE_ARGS, actors, stop_engine, wait_idle

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=60, logprobs=2, ignore_eos=True,
                        stop=["zzzz"])  # a stop string: text that could start it is held back while streaming
PROMPT = {"prompt_token_ids": list(range(300, 340))}
STOP_AND_COPY = MigrationConfig(max_stages=0)
ONE_BLOCK_CHUNKS = MigrationConfig(chunk_blocks=1)  # each pre-copy stage in chunks of one block
# Long enough that it cannot finish while a move runs, even on a loaded machine (a move then ends ABORTED_SRC)
LONG = SEEDED.clone(max_tokens=200)


@pytest.fixture(scope="module")
def engine(ray_session, tiny_model_dir):
    from distinfer.router import RouterEngine

    # the last three tests drain one instance and kill two
    engine = RouterEngine(tiny_model_dir, num_instances=4, **ENGINE_ARGS)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def long_reference(engine) -> tuple:
    """What the caller gets of PROMPT with LONG when the request never moves."""
    async def run() -> tuple:
        return received([out async for out in engine.generate(PROMPT, LONG.clone(), "long-reference")])
    return asyncio.run(run())


def received(outputs) -> tuple:
    """What the caller got, concatenated: tokens, text, logprobs, and whether the last output finished it."""
    tokens, text, logprobs = [], "", []
    for out in outputs:
        tokens += out.outputs[0].token_ids
        text += out.outputs[0].text
        logprobs += out.outputs[0].logprobs or []
    return tokens, text, logprobs, outputs[-1].finished if outputs else False


def assert_same_stream(got: tuple, expected: tuple, context: str) -> None:
    """Tokens, text and the end exactly; logprobs to float tolerance, for runs whose numerics may differ in
    the last bits (batched with other requests, or KV from one prefill instead of step-by-step decoding)."""
    assert (got[0], got[1], got[3]) == (expected[0], expected[1], expected[3]), context
    for mine, theirs in zip(got[2], expected[2], strict=True):
        assert mine.keys() == theirs.keys(), context
        assert all(abs(mine[t].logprob - theirs[t].logprob) < 1e-3 for t in mine), context


async def stream_with_move(engine, request_id: str, move_after: int, config: MigrationConfig | None = None,
                           destination: str | None = None, params: SamplingParams = SEEDED):
    """The request's outputs, with a migration started once `move_after` outputs arrived; and its result."""
    outputs, moving = [], None
    async for out in engine.generate(PROMPT, params.clone(), request_id):
        outputs.append(out)
        if len(outputs) == move_after:
            moving = asyncio.ensure_future(engine.migrate(request_id, destination, config))
    try:
        return outputs, (await moving if moving is not None else None)
    except KeyError:  # the request finished before the router took up the move
        assert outputs[-1].finished
        return outputs, None


async def reference(engine) -> tuple:
    return received([out async for out in engine.generate(PROMPT, SEEDED.clone(), "reference")])


def test_moving_at_any_point_leaves_the_stream_unchanged(engine, long_reference):
    import ray

    async def run() -> None:
        expected = long_reference
        assert len(expected[0]) == 200 and expected[3]
        for move_after, config in [(1, None), (8, None), (30, None), (1, STOP_AND_COPY), (30, STOP_AND_COPY),
                                   (30, ONE_BLOCK_CHUNKS)]:
            outputs, result = await stream_with_move(engine, f"m{move_after}-{id(config)}", move_after, config,
                                                     params=LONG)
            assert result.status == MigrationStatus.FINISHED, result
            assert received(outputs) == expected, f"moved after {move_after} outputs ({result})"
            assert result.source != result.destination and len(result.stage_blocks) >= 1
            if config is STOP_AND_COPY:
                assert len(result.stage_blocks) == 1 and result.stage_blocks[0] > 0  # everything in the last stage
            if config is ONE_BLOCK_CHUNKS:  # the first stage took the 4 full blocks of 70 tokens one by one
                assert result.stage_blocks[0] >= 4, result
    asyncio.run(run())
    wait_idle(engine)
    stats = ray.get(engine.router.state.remote()).stats  # the instances count their moves (/metrics shows them)
    assert stats.num_migrated_in == stats.num_migrated_out == 6


def test_the_p2p_transport_moves_the_same_bytes(engine):
    """Stages over a gloo link between the two instances' ranks instead of Ray's object store."""
    p2p, p2p_stop_and_copy = MigrationConfig(transport="p2p"), MigrationConfig(transport="p2p", max_stages=0)

    long = LONG  # opening a link takes a while too

    async def run() -> None:
        expected = received([out async for out in engine.generate(PROMPT, long.clone(), "p2p-reference")])
        for move_after, config in [(1, p2p), (20, p2p), (10, p2p_stop_and_copy),
                                   (40, MigrationConfig(transport="p2p", chunk_blocks=1))]:
            outputs, result = await stream_with_move(engine, f"p2p-{move_after}-{config.max_stages}", move_after,
                                                     config, params=long)
            assert result.status == MigrationStatus.FINISHED and result.transport == "p2p", result
            assert received(outputs) == expected, f"moved after {move_after} outputs ({result})"
        with pytest.raises(ValueError, match="transport"):
            MigrationConfig(transport="carrier-pigeon")
        for bad in (dict(chunk_blocks=0), dict(max_stages=-1), dict(threshold_blocks=True)):
            with pytest.raises(ValueError, match=next(iter(bad))):
                MigrationConfig(**bad)
    asyncio.run(run())
    wait_idle(engine)


def test_a_full_destination_refuses_and_the_request_goes_on_at_the_source(engine):
    async def run() -> None:
        expected = await reference(engine)
        gen = engine.generate(PROMPT, SEEDED.clone(), "full-dst")
        outputs = [await anext(gen)]
        src = await engine.where("full-dst")
        dst_id, dst = next((i, a) for i, a in actors(engine).items() if i != src)
        assert await dst.reserve.remote("blocker", 63)  # the fault: the destination has 1 block free
        try:
            result = await engine.migrate("full-dst", dst_id)
        finally:
            await dst.cancel_reservation.remote("blocker")
        outputs += [out async for out in gen]
        assert result.status == MigrationStatus.ABORTED_DST and "room" in result.reason, result
        assert received(outputs) == expected
    asyncio.run(run())
    wait_idle(engine)


def _inject(instance: Any, method: str, mode: str) -> None:
    """For EngineInstance.__ray_call__: the instance's next `method` call on its engine's mover fails once
    ("full": answers False, as a destination without room; "raise": raises), then the method is back."""
    mover = instance.engine.engine.mover

    def faulty(*args: Any, **kwargs: Any) -> bool:
        del mover.__dict__[method]  # one shot
        if mode == "full":
            return False
        raise RuntimeError(f"injected {method} failure")

    setattr(mover, method, faulty)


# (side, the mover method that fails, how, the status it must give): every stage on either side
FAULTS = [
    ("dst", "reserve", "full", MigrationStatus.ABORTED_DST),  # first pre-copy stage: no room
    ("dst", "copy_in", "raise", MigrationStatus.ABORTED_DST),  # a pre-copy stage's write
    ("dst", "commit", "raise", MigrationStatus.ABORTED_DST),  # the last stage, on the destination
    ("src", "copy_out", "raise", MigrationStatus.ABORTED_SRC),  # a pre-copy stage's export
    ("src", "pause", "raise", MigrationStatus.ABORTED_SRC),  # the last stage, on the source
]


@pytest.mark.parametrize("side,method,mode,status", FAULTS, ids=[f"{f[0]}-{f[1]}" for f in FAULTS])
def test_a_fault_at_any_stage_leaves_the_request_at_the_source(engine, long_reference, side, method, mode, status):
    """Nothing lost or duplicated, the stream is the unmoved one, no block or reservation left anywhere."""
    import ray

    async def run() -> None:
        gen = engine.generate(PROMPT, LONG.clone(), f"fault-{method}")
        outputs = [await anext(gen) for _ in range(30)]  # 70 tokens: 4 full blocks for the pre-copy
        src = await engine.where(f"fault-{method}")
        dst_id = next(i for i in actors(engine) if i != src)
        victim = actors(engine)[dst_id if side == "dst" else src]
        await asyncio.to_thread(ray.get, victim.__ray_call__.remote(_inject, method, mode))
        result = await engine.migrate(f"fault-{method}", dst_id)
        outputs += [out async for out in gen]
        assert result.status == status, result
        assert await engine.where(f"fault-{method}") in (None, src)
        assert received(outputs) == long_reference, result
    asyncio.run(run())
    wait_idle(engine)  # both instances: every block free, the destination's reservation dropped


def test_abort_during_a_move_ends_the_request_everywhere(engine):
    async def run() -> None:
        for delay in (0.0, 0.01, 0.05):
            outputs = []
            gen = engine.generate(PROMPT, SEEDED.clone(), f"abort-{delay}")
            outputs.append(await anext(gen))
            moving = asyncio.ensure_future(engine.migrate(f"abort-{delay}"))
            await asyncio.sleep(delay)
            await engine.abort(f"abort-{delay}")
            outputs += [out async for out in gen]
            result = await moving
            assert result.status in (MigrationStatus.FINISHED, MigrationStatus.ABORTED_SRC), result
            assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    asyncio.run(run())
    wait_idle(engine)


def test_a_request_finishing_during_its_move_streams_everything_once(engine):
    short = SamplingParams(temperature=0.9, seed=11, max_tokens=6, ignore_eos=True)

    async def run() -> None:
        expected = received([out async for out in engine.generate(PROMPT, short.clone(), "short-ref")])
        for move_after in (3, 4, 5):
            outputs, result = await stream_with_move(engine, f"short-{move_after}", move_after, params=short)
            assert received(outputs) == expected
            assert result is None or result.status in (MigrationStatus.FINISHED, MigrationStatus.ABORTED_SRC)
    asyncio.run(run())
    wait_idle(engine)


def test_drain_moves_every_request_away_and_leaves_the_instance_empty(engine):
    import ray

    async def run() -> None:
        expected = await reference(engine)
        gens = [engine.generate(PROMPT, SEEDED.clone(), f"drain-{i}") for i in range(6)]
        outputs = [[await anext(gen)] for gen in gens]
        where = [await engine.where(f"drain-{i}") for i in range(6)]
        victim = max(set(where), key=where.count)
        result = await engine.drain_instance(victim, timeout_s=30)
        # each of the victim's requests moved, or (a loaded host) ended there before or during its move
        assert 1 <= result.moved <= result.moved + result.finished_in_place <= where.count(victim), result
        assert result.remaining == 0, result
        load = ray.get(actors(engine)[victim].load.remote())
        assert load.num_running + load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks
        for i, gen in enumerate(gens):
            outputs[i] += [out async for out in gen]
            assert_same_stream(received(outputs[i]), expected, f"request {i} (on {where[i]}, drained {victim})")
        for i in range(3):  # new requests avoid the drained instance
            await anext(engine.generate(PROMPT, SEEDED.clone(), f"after-drain-{i}"))
            assert await engine.where(f"after-drain-{i}") != victim
            await engine.abort(f"after-drain-{i}")
    asyncio.run(run())
    wait_idle(engine)


def test_a_dead_destination_leaves_the_request_at_the_source(engine):
    """Last in the module: it kills one instance."""
    import ray

    async def run() -> None:
        expected = await reference(engine)
        gen = engine.generate(PROMPT, SEEDED.clone(), "dead-dst")
        outputs = [await anext(gen)]
        src = await engine.where("dead-dst")
        dst_id, dst = next((i, a) for i, a in actors(engine).items() if i != src)
        moving = asyncio.ensure_future(engine.migrate("dead-dst", dst_id))
        ray.kill(dst)  # before the router's next load report can notice
        try:
            result = await moving
            assert result.status == MigrationStatus.ABORTED_DST, result
        except ValueError as exc:  # the router noticed the death first and refused the move
            assert "not another live instance" in str(exc)
        outputs += [out async for out in gen]
        assert received(outputs) == expected
    asyncio.run(run())


def test_requests_of_a_killed_instance_resume_elsewhere_unchanged(engine):
    """Failover: seeded sampling with logprobs, killed mid-stream; the caller's stream is what it would have
    been (its generator advanced past the tokens already sampled, nothing delivered twice)."""
    import ray

    def open_instances() -> int:  # alive and taking requests (a drained instance is alive but takes none)
        return sum(not load.draining for load in ray.get(engine.router.state.remote()).loads)

    failed_over: list[int] = []

    async def run() -> None:
        expected = await reference(engine)
        for kill_after in (1, 25):
            if open_instances() < 2:  # the request must have somewhere to go when its instance is killed
                break
            outputs = []
            async for out in engine.generate(PROMPT, SEEDED.clone(), f"failover-{kill_after}"):
                outputs.append(out)
                if len(outputs) == kill_after:
                    victim = await engine.where(f"failover-{kill_after}")
                    ray.kill(actors(engine)[victim])
            assert_same_stream(received(outputs), expected, f"killed after {kill_after} outputs")
            failed_over.append(kill_after)
        assert failed_over, "no instance could take a failed-over request"
    asyncio.run(run())
