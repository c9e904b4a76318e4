"""DrainInstance, the admin RPC over RouterEngine.drain_instance: a real gRPC server on loopback over two
engine instances of the tiny Llama (real Ray actors), called through the client SDK. Streams running on the
drained instance move to the other one and finish exactly as the transformers oracle says, with no error;
the drained instance ends empty and closed to new requests; bad input, an unknown id and a missing API key
get their status codes and drain nothing.

Order matters: the refusals run first, while both instances take requests; the drain is the last user of
the module's RouterEngine.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest

from distinfer.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    DrainResult,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
)
from distinfer.serving.grpc_server import GrpcServerThread
from tests.conftest import hf_greedy
from tests.distributed.test_router import ENGINE_ARGS, instance_state, stop_engine, wait_idle

# Room for every request on one instance: 4 x (6 + 240) tokens is 64 blocks of 16, of 128.
DRAIN_ENGINE_ARGS = dict(ENGINE_ARGS, num_kv_blocks=128)
PROMPTS = [[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2], [1, 6, 1, 8], [5, 7, 7, 2, 1, 5]]
MAX_TOKENS = 240
API_KEY = "drain-key"


@pytest.fixture(scope="module")
def engine(ray_session, tiny_model_dir):
    from distinfer.router import RouterEngine

    engine = RouterEngine(tiny_model_dir, num_instances=2, **DRAIN_ENGINE_ARGS)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with GrpcServerThread(engine, model_name="tiny") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=120) as client:
        yield client


def _open_instances(client: Client) -> dict[str, bool]:
    return {i.instance_id: i.draining for i in client.server_info().instances}


BAD = [  # (instance_id, timeout_s, field the message starts with)
    ("", 30.0, "instance_id"),
    ("i" * 257, 30.0, "instance_id"),
    ("instance-\n0", 30.0, "instance_id"),
    ("instance-0", -1.0, "timeout_s"),
    ("instance-0", math.nan, "timeout_s"),
    ("instance-0", math.inf, "timeout_s"),
    ("instance-0", 3600.5, "timeout_s"),
]


def test_refusals_drain_nothing(engine, server, client):
    info = client.server_info()
    assert sorted(i.instance_id for i in info.instances) == ["instance-0", "instance-1"]
    assert all(not i.draining and i.load.num_total_blocks == 128 for i in info.instances)
    assert info.load.num_total_blocks == 256  # the sum of the instances'
    for instance_id, timeout_s, field in BAD:
        with pytest.raises(InvalidArgumentError) as bad:
            client.drain_instance(instance_id, timeout_s=timeout_s)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.details.startswith(field), bad.value
    with pytest.raises(NotFoundError, match="unknown instance 'instance-7'") as missing:
        client.drain_instance("instance-7")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND

    async def unknown_async() -> None:
        async with AsyncClient(server.target, timeout=60) as aclient:
            with pytest.raises(NotFoundError):
                await aclient.drain_instance("instance-9", timeout_s=0)

    asyncio.run(unknown_async())
    with GrpcServerThread(engine, model_name="tiny", api_key=API_KEY) as auth_server:
        for key in (None, "wrong"):
            with Client(auth_server.target, api_key=key, timeout=60, retry=RetryPolicy(max_attempts=1)) as other:
                with pytest.raises(AuthenticationError) as refused:
                    other.drain_instance("instance-0")
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(auth_server.target, api_key=API_KEY, timeout=60) as admin:
            with pytest.raises(NotFoundError):
                admin.drain_instance("instance-8")
    assert _open_instances(client) == {"instance-0": False, "instance-1": False}
    assert not engine.is_draining


def test_drain_moves_running_streams_which_finish_exactly(engine, client, tiny_hf_model):
    """Last user of the engine: one instance ends drained."""
    expected = [hf_greedy(tiny_hf_model, p, MAX_TOKENS) for p in PROMPTS]
    results: dict[int, tuple[list[int], str | None, BaseException | None]] = {}
    started = [threading.Event() for _ in PROMPTS]

    def consume(i: int) -> None:
        tokens: list[int] = []
        finish: str | None = None
        try:
            for delta in client.generate_stream(PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True):
                tokens += delta.token_ids
                finish = delta.finish_reason or finish
                started[i].set()
            results[i] = (tokens, finish, None)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[i] = (tokens, finish, exc)
        finally:
            started[i].set()

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in started)
    before = instance_state(engine)  # per instance: (pending, running + waiting, free, total blocks)
    victim = max(before, key=lambda i: before[i][0])
    held = before[victim][0]
    assert held >= 1 and sum(pending for pending, *_ in before.values()) == len(PROMPTS), before

    result = client.drain_instance(victim, timeout_s=30)
    # every request there moved, or (a loaded host) ended there before or during its move
    assert isinstance(result, DrainResult) and (result.instance_id, result.remaining) == (victim, 0), (result, before)
    assert 1 <= result.moved <= result.moved + result.finished_in_place <= held, (result, before)
    pending, requests, free, total = instance_state(engine)[victim]
    assert (pending, requests, free) == (0, 0, total), f"{victim} is not empty after the drain"

    for thread in threads:
        thread.join(120)
    for i, (tokens, finish, error) in sorted(results.items()):
        assert error is None, f"stream {i}: {error!r}"
        assert finish == "length" and len(tokens) == MAX_TOKENS and tokens == expected[i], f"stream {i} differs"
    assert len(results) == len(PROMPTS)

    deadline = time.monotonic() + 10  # the server's view of the instances is refreshed every 0.25 s
    while _open_instances(client)[victim] is not True and time.monotonic() < deadline:
        time.sleep(0.1)
    other = next(i for i in before if i != victim)
    assert _open_instances(client) == {victim: True, other: False}
    assert not client.server_info().draining  # the other instance still takes requests
    new = client.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True)
    assert new.token_ids == hf_greedy(tiny_hf_model, PROMPTS[0], 8)
    wait_idle(engine)
