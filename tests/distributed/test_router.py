"""Two engine instances behind the router, as real Ray actors on the tiny Llama: exact greedy outputs,
load-aware and round-robin dispatch read from each instance's own counters, abort and disconnect freeing
the blocks of the instance that held the request (through the Python API, gRPC and HTTP), and a killed
instance's requests resuming on the other (failover), exactly.

Each RouterEngine is shared by the tests of one class, one per policy (starting two instances costs
seconds); its last user is the test that drains or kills it. Its teardown, at the end of the class, shuts
it down and checks that no EngineInstance or Router actor is left (the conftest checks workers and
placement groups after every test).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import httpx
import pytest

from distinfer import SamplingParams
from distinfer.errors import EngineDeadError, EngineDrainingError
from distinfer.serving.server import ServeOptions, ServerThread, make_engine
from distinfer.v1 import inference_pb2 as pb
from distinfer.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import hf_greedy

ENGINE_ARGS = dict(dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=512)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [42], [100, 200, 300, 400],
           [5, 4, 3, 2, 1, 0]]
LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
IDLE_TIMEOUT_S = 20.0


def router_actors() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values()
            if a["ActorClassName"] in ("EngineInstance", "Router") and a["State"] != "DEAD"]


def start_engine(model_dir: str, policy: str):
    from distinfer.router import RouterEngine

    if policy == "least_load":  # the way `distinfer serve --instances 2` and the Serve replica build it
        engine = make_engine(model_dir, dict(ENGINE_ARGS), num_instances=2, dispatch_policy=policy)
        assert isinstance(engine, RouterEngine)
        return engine
    return RouterEngine(model_dir, num_instances=2, dispatch_policy=policy, **ENGINE_ARGS)


def stop_engine(engine) -> None:
    engine.shutdown()
    deadline = time.monotonic() + 15
    while router_actors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not router_actors(), f"router actors left behind: {router_actors()}"


@pytest.fixture(scope="class")
def least_load(ray_session, tiny_model_dir):
    engine = start_engine(tiny_model_dir, "least_load")
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="class")
def round_robin(ray_session, tiny_model_dir):
    engine = start_engine(tiny_model_dir, "round_robin")
    yield engine
    stop_engine(engine)


def actors(engine) -> dict[str, Any]:
    import ray

    return ray.get(engine.router.instance_actors.remote())


def instance_state(engine) -> dict[str, tuple[int, int, int, int]]:
    """Per live instance, from the instance itself: (requests pending, running + waiting, free, total blocks)."""
    import ray

    out = {}
    for instance_id, actor in actors(engine).items():
        load = ray.get(actor.load.remote())
        pending = ray.get(actor.num_pending_requests.remote())
        out[instance_id] = (pending, load.num_running + load.num_waiting, load.num_free_blocks, load.num_total_blocks)
    return out


def wait_idle(engine) -> dict[str, tuple[int, int, int, int]]:
    """Every live instance has no request and every KV block free, and the router has no stream."""
    import ray

    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        state = instance_state(engine)
        streams = ray.get(engine.router.state.remote()).num_streams
        if (streams == 0 and all(p == 0 and n == 0 and free == total for p, n, free, total in state.values())) \
                or time.monotonic() > deadline:
            assert streams == 0 and engine.num_pending_requests == 0
            for instance_id, (pending, requests, free, total) in state.items():
                assert (pending, requests, free) == (0, 0, total), f"{instance_id} still holds a request: {state}"
            return state
        time.sleep(0.1)


async def collect(engine, prompt, params: SamplingParams, request_id: str) -> list[int]:
    tokens: list[int] = []
    async for output in engine.generate(prompt, params, request_id):
        tokens += output.outputs[0].token_ids
    return tokens


def _grpc_request(prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True))


def _sse_text(response: httpx.Response, stop_after: int | None = None) -> str:
    pieces = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            pieces += [c["text"] for c in json.loads(line[6:]).get("choices", [])]
            if stop_after is not None and len(pieces) >= stop_after:
                break
    return "".join(pieces)


async def _outputs(engine, prompt, params: SamplingParams) -> list:
    return [o async for o in engine.generate(prompt, params, f"direct-{time.monotonic_ns()}")]


class TestLeastLoad:
    def test_concurrent_greedy_outputs_equal_the_oracle(self, least_load, tiny_hf_model):
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

        async def run() -> list[list[int]]:
            return await asyncio.gather(*(collect(least_load, p, params, f"exact-{i}") for i, p in enumerate(PROMPTS)))

        got = asyncio.run(run())
        assert got == [hf_greedy(tiny_hf_model, p, 12) for p in PROMPTS]

        async def text() -> list:
            return [o async for o in least_load.generate("Hello there", params, "text-prompt")]

        outputs = asyncio.run(text())  # the prompt is restored on every output (instances do not send it back)
        ids = least_load.tokenizer.encode("Hello there", add_special_tokens=True)
        assert all(o.prompt == "Hello there" and o.prompt_token_ids == ids for o in outputs)
        assert [t for o in outputs for t in o.outputs[0].token_ids] == hf_greedy(tiny_hf_model, ids, 12)


    def test_least_load_spreads_a_burst_and_closing_streams_frees_both(self, least_load):
        async def run() -> dict[str, tuple[int, int, int, int]]:
            streams = [least_load.generate([3, 1, 4, 1, 5, 9, 2, 6], LONG, f"burst-{i}") for i in range(6)]
            for stream in streams:  # every request is running or queued on its instance
                await stream.__anext__()
            during = await asyncio.to_thread(instance_state, least_load)
            for stream in streams:  # the client goes away: each request is aborted on its instance
                await stream.aclose()
            return during

        during = asyncio.run(run())
        assert sorted(during) == ["instance-0", "instance-1"]
        assert sum(n for _, n, _, _ in during.values()) == 6
        assert all(pending == n >= 2 for pending, n, _, _ in during.values()), during  # both took part of the burst
        assert all(free < total for _, _, free, total in during.values())
        wait_idle(least_load)


    def test_abort_and_disconnect_free_the_blocks_of_the_instance_that_held_the_request(self, least_load):
        async def run() -> None:
            for how in ("abort", "disconnect"):
                request_id = f"{how}-1"
                stream = least_load.generate([9, 9, 9, 9], LONG, request_id)
                await stream.__anext__()
                holder = await least_load.router.where.remote(request_id)
                state = await asyncio.to_thread(instance_state, least_load)
                assert state[holder][0] == 1 and state[holder][2] < state[holder][3]
                if how == "abort":
                    await least_load.abort(request_id)
                    rest = [output async for output in stream]  # deltas already queued, then the abort
                    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
                else:
                    await stream.aclose()
                await asyncio.to_thread(wait_idle, least_load)
                assert await least_load.router.where.remote(request_id) is None

        asyncio.run(run())


    def test_grpc_and_http_streams_through_the_router(self, least_load, tiny_hf_model):
        """Last user of `least_load`: stopping the server drains the engine."""
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        expected_text = "".join(o.outputs[0].text for o in asyncio.run(_outputs(least_load, PROMPTS[0], params)))
        with ServerThread(least_load, ServeOptions(http_port=0, grpc_port=0, served_model_name="tiny")) as server, \
                grpc.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            tokens = [t for r in stub.Generate(_grpc_request(PROMPTS[2], 10), timeout=60) for t in r.token_ids]
            assert tokens == hf_greedy(tiny_hf_model, PROMPTS[2], 10)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.load.num_total_blocks == 128 and not info.dead  # summed over both instances
            body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", server.http_url + "/v1/completions", json=body, timeout=60) as response:
                assert response.status_code == 200 and _sse_text(response) == expected_text
            # disconnects: a cancelled gRPC call and a closed SSE connection abort on the instances
            call = stub.Generate(_grpc_request([5, 6, 7], 400), timeout=60)
            assert next(call).token_ids
            call.cancel()
            with httpx.stream("POST", server.http_url + "/v1/completions", timeout=60,
                              json=dict(body, prompt=[8, 9, 10], max_tokens=400)) as response:
                assert _sse_text(response, stop_after=3)
            wait_idle(least_load)
            metrics = httpx.get(server.http_url + "/metrics", timeout=10).text
            assert 'distinfer:num_kv_cache_blocks{model_name="tiny"} 128.0' in metrics
            assert 'distinfer:request_success_total{finished_reason="abort",model_name="tiny"} 2.0' in metrics


class TestRoundRobin:
    def test_round_robin_alternates(self, round_robin):
        async def holders() -> list[str]:
            seen = []
            for i in range(4):  # one at a time: each instance's own pending count says who has it
                stream = round_robin.generate([2, 7, 1, 8], LONG, f"rr-{i}")
                await stream.__anext__()
                state = await asyncio.to_thread(instance_state, round_robin)
                (holder,) = [instance_id for instance_id, (pending, *_) in state.items() if pending == 1]
                seen.append(holder)
                await stream.aclose()
            return seen

        seen = asyncio.run(holders())
        assert seen[0] != seen[1] and seen[0::2] == [seen[0]] * 2 and seen[1::2] == [seen[1]] * 2
        wait_idle(round_robin)


    def test_killed_instance_requests_fail_over_exactly(self, round_robin, tiny_hf_model):
        """The requests of a killed instance resume on the other from what they streamed, and finish as the
        oracle says (nothing streamed twice). Last user of `round_robin`: its instances are killed."""
        import ray

        async def run() -> None:
            started = asyncio.Event()

            async def consume(i: int) -> tuple[list[int], BaseException | None]:
                tokens: list[int] = []
                try:
                    async for output in round_robin.generate([i + 1, 2, 3], LONG, f"kill-{i}"):
                        tokens += output.outputs[0].token_ids
                        if len(tokens) >= 2 and i == 3:
                            started.set()
                    return tokens, None
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    return tokens, exc

            tasks = [asyncio.ensure_future(consume(i)) for i in range(4)]
            await asyncio.wait_for(started.wait(), 60)
            where = {i: await round_robin.router.where.remote(f"kill-{i}") for i in range(4)}
            victim = where[0]
            assert sorted(where.values()).count(victim) == 2  # round robin: two on each
            ray.kill(actors(round_robin)[victim])
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            for i, (tokens, error) in enumerate(results):
                assert error is None, f"request {i} (on {where[i]}, victim {victim}): {error!r}"
                assert tokens == hf_greedy(tiny_hf_model, [i + 1, 2, 3], LONG.max_tokens)
            assert await round_robin.router.where.remote("kill-0") is None
            # new requests go to the survivor, exactly as before; the service is not dead
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            for i in range(2):
                got = await collect(round_robin, PROMPTS[i], params, f"after-{i}")
                assert got == hf_greedy(tiny_hf_model, PROMPTS[i], 8)
            assert not round_robin.is_dead and victim not in actors(round_robin)

            survivor = next(iter(actors(round_robin)))
            with pytest.raises(ValueError, match="unknown instance"):
                await round_robin.drain_instance("instance-7")
            await round_robin.drain_instance(survivor, timeout_s=5)  # no instance takes requests any more
            with pytest.raises(EngineDrainingError):
                await collect(round_robin, PROMPTS[0], params, "after-drain")
            ray.kill(actors(round_robin)[survivor])
            deadline = time.monotonic() + IDLE_TIMEOUT_S
            while not round_robin.is_dead and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert round_robin.is_dead and "every engine instance has died" in str(round_robin.dead_error)
            with pytest.raises(EngineDeadError):
                await collect(round_robin, PROMPTS[0], params, "after-death")

        asyncio.run(run())


@pytest.mark.slow
def test_serve_app_replica_hosts_a_router(ray_session, tiny_model_dir, tiny_hf_model):
    """The Ray Serve app with num_instances=2: the replica hosts a RouterEngine; both of Serve's proxies
    answer through it, and shutting the app down ends the router and its instances."""
    from pathlib import Path

    import yaml
    from ray import serve

    from distinfer.serving.ray_serve import app_builder
    from distinfer.serving.server import free_port

    config = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
    servicers = yaml.safe_load(config.read_text())["grpc_options"]["grpc_servicer_functions"]
    http_port, grpc_port = free_port(), free_port()
    args = {"model": tiny_model_dir, "served_model_name": "tiny", "num_instances": 2, "dispatch_policy": "round_robin",
            "engine_kwargs": ENGINE_ARGS}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": servicers})
        serve.run(app_builder(args), name="distinfer", route_prefix="/")
        assert sorted(a["ActorClassName"] for a in router_actors()) == ["EngineInstance", "EngineInstance", "Router"]
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 6
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for prompt in PROMPTS[:2]:  # round robin: one on each instance
                tokens = [t for r in stub.Generate(_grpc_request(prompt, 6), timeout=60) for t in r.token_ids]
                assert tokens == hf_greedy(tiny_hf_model, prompt, 6)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            assert info.load.num_total_blocks == 128
            assert sorted(i.instance_id for i in info.instances) == ["instance-0", "instance-1"]
            # the admin RPC through Serve's proxy: an unknown id, then an idle instance (nothing to move)
            with pytest.raises(grpc.RpcError) as missing:
                stub.DrainInstance(pb.DrainInstanceRequest(instance_id="instance-9"), timeout=30)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            drained = stub.DrainInstance(pb.DrainInstanceRequest(instance_id="instance-1", timeout_s=0), timeout=60)
            assert (drained.instance_id, drained.moved, drained.remaining) == ("instance-1", 0, 0)
    finally:
        serve.shutdown()
    deadline = time.monotonic() + 15
    while router_actors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not router_actors()
