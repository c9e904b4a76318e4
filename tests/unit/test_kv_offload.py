"""The KV host tier: block copies device <-> host are bit-exact, touch only the named blocks, run in order,
and reject malformed ops; through the executor (collective_rpc) a request continues from KV that went to
the host and back."""
from __future__ import annotations

import pytest
import torch

from distinfer.config import CacheConfig, DistInferConfig, ModelConfig, ParallelConfig
from distinfer.messages import KVBlockCopy, KVCopyDirection, NewRequestData, SchedulerOutput
from distinfer.sampling_params import SamplingParams
from distinfer.worker.kv_offload import HostKVCache, copy_blocks_staged, host_runs, validate_op
from tests.conftest import save_tiny_llama

OUT, IN = KVCopyDirection.SWAP_OUT, KVCopyDirection.SWAP_IN
BLOCK_SHAPE = (4, 2, 2, 8)  # block_size, K/V, kv heads, head dim
NUM_LAYERS, NUM_DEVICE_BLOCKS, NUM_HOST_BLOCKS = 3, 12, 10
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _random_caches(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Random bit patterns (NaNs and infinities included), so equality below is bitwise."""
    gen = torch.Generator().manual_seed(seed)
    bits = _BITS[dtype]
    info = torch.iinfo(bits)
    return [torch.randint(info.min, info.max, (NUM_DEVICE_BLOCKS, *BLOCK_SHAPE), generator=gen, dtype=bits).view(dtype)
            for _ in range(NUM_LAYERS)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


def _run_with(path: str, host: HostKVCache, ops: list[KVBlockCopy], device: list[torch.Tensor]) -> None:
    """`run`: the CPU path (index_select + index_copy_); `staged`: the CUDA path's copies, here on CPU."""
    if path == "run":
        host.run(ops, device)
        return
    for op in ops:
        validate_op(op, NUM_DEVICE_BLOCKS, host.num_blocks)
        copy_blocks_staged(op, host.caches, device)


@pytest.mark.parametrize("path", ["run", "staged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_bit_exact_and_touches_only_named_blocks(dtype, seed, path):
    device = _random_caches(dtype, seed)
    original = [c.clone() for c in device]
    host = HostKVCache.like(device, NUM_HOST_BLOCKS, pin=False)
    assert host.caches[0].shape == (NUM_HOST_BLOCKS, *BLOCK_SHAPE) and host.caches[0].dtype == dtype
    gen = torch.Generator().manual_seed(100 + seed)
    dev_perm = torch.randperm(NUM_DEVICE_BLOCKS, generator=gen).tolist()
    host_perm = torch.randperm(NUM_HOST_BLOCKS, generator=gen).tolist()
    src_a, src_b, dst = dev_perm[:3], dev_perm[3:5], dev_perm[5:10]  # dst: where the blocks come back
    host_a, host_b = host_perm[:3], host_perm[3:5]
    ops = [KVBlockCopy(OUT, src_a, host_a), KVBlockCopy(OUT, src_b, host_b),
           KVBlockCopy(IN, dst, host_b + host_a)]  # the same call reads what it just wrote
    _run_with(path, host, ops, device)
    for layer in range(NUM_LAYERS):
        expect_host = torch.zeros_like(host.caches[layer])
        expect_host[host_a + host_b] = original[layer][src_a + src_b]
        assert torch.equal(_bits(host.caches[layer]), _bits(expect_host))  # untouched host blocks stay zero
        expect_device = original[layer].clone()
        expect_device[dst] = original[layer][src_b + src_a]
        assert torch.equal(_bits(device[layer]), _bits(expect_device))  # only dst changed


def test_ops_run_in_order_within_one_call():
    """Swap out, overwrite the host block by a second swap-out, swap in: the device gets the second."""
    device = _random_caches(torch.float32, 3)
    original = [c.clone() for c in device]
    host = HostKVCache.like(device, NUM_HOST_BLOCKS, pin=False)
    host.run([KVBlockCopy(OUT, [0], [7]), KVBlockCopy(OUT, [1], [7]), KVBlockCopy(IN, [2], [7]),
              KVBlockCopy(OUT, [2], [6]), KVBlockCopy(IN, [3], [6])], device)
    for layer in range(NUM_LAYERS):
        assert torch.equal(_bits(device[layer][2]), _bits(original[layer][1]))
        assert torch.equal(_bits(device[layer][3]), _bits(original[layer][1]))


def test_bytes_per_block_matches_the_device_layout():
    device = _random_caches(torch.bfloat16, 0)
    host = HostKVCache.like(device, 2, pin=False)
    assert host.bytes_per_block == NUM_LAYERS * 4 * 2 * 2 * 8 * 2
    assert HostKVCache.like(device, 0, pin=False).bytes_per_block == host.bytes_per_block


def test_host_runs_group_consecutive_ids():
    assert host_runs([]) == []
    assert host_runs([3, 4, 5]) == [(0, 3, 3)]
    assert host_runs([0, 2, 3, 3, 4, 9]) == [(0, 0, 1), (1, 2, 2), (3, 3, 2), (5, 9, 1)]


@pytest.mark.parametrize("op, message", [
    (KVBlockCopy(OUT, [0, 1], [0]), "2 device block ids but 1 host block ids"),
    (KVBlockCopy(OUT, [NUM_DEVICE_BLOCKS], [0]), f"device block id {NUM_DEVICE_BLOCKS} is not in"),
    (KVBlockCopy(IN, [0], [-1]), "host block id -1 is not in"),
    (KVBlockCopy(IN, [0], [NUM_HOST_BLOCKS]), f"host block id {NUM_HOST_BLOCKS} is not in"),
    (KVBlockCopy(IN, [0], [1.0]), "host block id 1.0 is not in"),
    (KVBlockCopy(OUT, [0, 1], [2, 2]), "a destination host block id appears twice"),
    (KVBlockCopy(IN, [3, 3], [0, 1]), "a destination device block id appears twice"),
    (KVBlockCopy("sideways", [0], [0]), "unknown direction 'sideways'"),
])
def test_bad_ops_raise_before_any_copy(op, message):
    device = _random_caches(torch.float32, 0)
    original = [c.clone() for c in device]
    host = HostKVCache.like(device, NUM_HOST_BLOCKS, pin=False)
    with pytest.raises(ValueError, match=f"kv_ops\\[1\\].*{message}"):
        host.run([KVBlockCopy(IN, [5], [0]), op], device)  # the valid first op must not run either
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(device, original))


def test_layout_mismatch_raises():
    device = _random_caches(torch.float32, 0)
    host = HostKVCache.like(device, NUM_HOST_BLOCKS, pin=False)
    with pytest.raises(ValueError, match="2 device cache layers but the host cache has 3"):
        host.run([KVBlockCopy(OUT, [0], [0])], device[:2])
    with pytest.raises(ValueError, match="layer 0: device blocks"):
        host.run([KVBlockCopy(OUT, [0], [0])], [c.to(torch.bfloat16) for c in device])


def test_string_directions_are_accepted():
    """KVCopyDirection is a str enum: "swap_out" from a decoded message works like SWAP_OUT."""
    device = _random_caches(torch.float32, 0)
    host = HostKVCache.like(device, NUM_HOST_BLOCKS, pin=False)
    host.run([KVBlockCopy("swap_out", [4], [2])], device)
    assert torch.equal(_bits(host.caches[1][2]), _bits(device[1][4]))


# ---------------------------------------------------------------- through the executor and the model


PROMPT = list(range(300, 320))  # 20 tokens: blocks of 8 -> 3 blocks, the last one partly filled
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)


def tiny_config(model_dir: str, tp: int = 1, pp: int = 1) -> DistInferConfig:
    return DistInferConfig(model=ModelConfig(model=model_dir, device="cpu", max_model_len=256),
                           cache=CacheConfig(block_size=8, num_kv_blocks=16),
                           parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp))


def _step(req_id: str, block_ids: list[int], computed: int) -> SchedulerOutput:
    new = NewRequestData(req_id, PROMPT, SamplingParams(temperature=0, logprobs=3), block_ids, computed)
    n = len(PROMPT) - computed
    return SchedulerOutput([new], [], {req_id: n}, n)


def _sampled(output) -> tuple[int, float, list[int]]:
    lp = output.logprobs[0][0]
    return output.sampled_token_ids[0][0], lp.sampled_logprob, lp.top_token_ids


def swap_round_trip(executor, kv_bytes_per_block: int) -> None:
    """Prefill `a` in blocks 0-2; a step with only KV copies sends them to host blocks 5,3,4 and back into
    device blocks 9-11; `b` (same prompt, blocks 9-11, all but the last token computed) then samples what
    `a` sampled. `c` on never-written blocks 12-14 does not: the test sees a missing copy."""
    world = executor.config.parallel.world_size
    assert executor.collective_rpc("determine_num_host_blocks", 8 * kv_bytes_per_block) == [8] * world
    assert executor.collective_rpc("initialize_host_cache", 8) == [None] * world
    a = _sampled(executor.execute_model(_step("a", [0, 1, 2], 0)))
    copies = SchedulerOutput([], [], {}, 0, finished_req_ids={"a"},
                             kv_ops=[KVBlockCopy(OUT, [0, 1, 2], [5, 3, 4]), KVBlockCopy(IN, [10, 11, 9], [3, 4, 5])])
    assert copies.is_empty and copies.has_work
    assert executor.execute_model(copies).req_ids == []
    b = _sampled(executor.execute_model(_step("b", [9, 10, 11], len(PROMPT) - 1)))
    c = _sampled(executor.execute_model(_step("c", [12, 13, 14], len(PROMPT) - 1)))
    assert b[0] == a[0] and b[2] == a[2] and b[1] == pytest.approx(a[1], abs=1e-4)
    assert c[1] != pytest.approx(a[1], abs=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama-kv")), default_model_dir, **TINY)


def test_local_executor_swap_round_trip(tiny_dir):
    from distinfer.executor.local import LocalExecutor

    executor = LocalExecutor(tiny_config(tiny_dir))
    try:
        executor.initialize_kv_cache(16)
        per_block = executor.worker.runner.model.kv_cache_bytes_per_block(8)
        assert per_block == 2 * 8 * 2 * 16 * 4 * 2  # K/V, block, kv heads, head dim, fp32, layers
        swap_round_trip(executor, per_block)
        assert executor.worker.runner.host_cache.bytes_per_block == per_block
    finally:
        executor.shutdown()


def test_kv_ops_without_a_host_cache_fail_clearly(tiny_dir):
    from distinfer.executor.local import LocalExecutor

    executor = LocalExecutor(tiny_config(tiny_dir))
    try:
        executor.initialize_kv_cache(16)
        executor.collective_rpc("initialize_host_cache", 0)
        with pytest.raises(RuntimeError, match="1 KV copies but this rank has no host KV cache"):
            executor.execute_model(SchedulerOutput([], [], {}, 0, kv_ops=[KVBlockCopy(OUT, [0], [0])]))
    finally:
        executor.shutdown()


def test_a_host_tier_larger_than_the_node_is_refused():
    from distinfer.worker.kv_offload import check_host_memory

    check_host_memory(1 << 20)
    with pytest.raises(ValueError, match="kv_offloading_size asks .* GiB .* available"):
        check_host_memory(1 << 60)
