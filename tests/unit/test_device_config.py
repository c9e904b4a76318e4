"""Device, dtype and KV-budget options (issue 9): what "auto" resolves to, what is refused, and the
pieces of GPU start-up that are plain arithmetic (profile batch, CUDA graph batch sizes)."""
from __future__ import annotations

import pytest
import torch

from distinfer.cli import build_parser, engine_kwargs
from distinfer.config import CacheConfig, DistInferConfig, ModelConfig, ParallelConfig, resolve_device, resolve_dtype
from distinfer.engine.llm import build_config
from distinfer.worker.cuda_graphs import capture_sizes
from distinfer.worker.gpu_memory import profile_batch
from distinfer.worker.worker import cuda_device

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_CUDA, reason="checks the GPU-less resolution")
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    config = ModelConfig()
    assert (config.device, config.torch_dtype, config.attention_backend) == ("cpu", torch.float32, "auto")


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:3") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("float16", "cuda") is torch.float16  # an explicit dtype wins
    with pytest.raises(ValueError, match="dtype must be one of auto"):
        resolve_dtype("int8")


@pytest.mark.parametrize("spec,expected", [("cpu", "cpu"), ("CUDA", "cuda"), (" cuda:0 ", "cuda:0"),
                                           (torch.device("cpu"), "cpu")])
def test_device_specs(spec, expected):
    if expected.startswith("cuda:") and not NO_CUDA and torch.cuda.device_count() < 1:
        pytest.skip("needs a GPU")
    assert resolve_device(spec) == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "tpu:0", ""])
def test_bad_device_specs_are_refused(spec):
    with pytest.raises(ValueError, match="device must be"):
        ModelConfig(device=spec)


def test_explicit_gpu_index_needs_one_rank():
    with pytest.raises(ValueError, match="pass device='cuda'"):
        DistInferConfig(model=ModelConfig(device="cuda:1"), parallel=ParallelConfig(tensor_parallel_size=2))
    DistInferConfig(model=ModelConfig(device="cuda"), parallel=ParallelConfig(tensor_parallel_size=2))


@pytest.mark.skipif(not NO_CUDA, reason="checks the GPU-less error")
def test_cuda_without_a_gpu_fails_at_start_with_the_reason():
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        cuda_device(torch.device("cuda"))


@pytest.mark.parametrize("value", [0.0, -0.5, 1.01, float("nan")])
def test_gpu_memory_utilization_bounds(value):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=value)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        ModelConfig(attention_backend="flash")


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["generate", "hi", "--device", "cpu", "--dtype", "bfloat16",
                                      "--attention-backend", "torch_sdpa", "--enforce-eager",
                                      "--gpu-memory-utilization", "0.5", "--kv-cache-bytes", "1000000"])
    config = build_config(None, **engine_kwargs(args))
    assert (config.model.device, config.model.torch_dtype, config.model.attention_backend) == (
        "cpu", torch.bfloat16, "torch_sdpa")
    assert config.model.enforce_eager and config.cache.gpu_memory_utilization == 0.5
    assert config.cache.kv_cache_bytes == 1_000_000
    defaults = build_config(None, **engine_kwargs(build_parser().parse_args(["generate", "hi"])))
    assert (defaults.model.attention_backend, defaults.model.enforce_eager) == ("auto", False)
    assert defaults.cache.gpu_memory_utilization == 0.9


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(128)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(128)[-1] == 128
    for max_num_seqs in (1, 3, 8, 20, 256):
        sizes = capture_sizes(max_num_seqs)
        assert all(any(s >= n for s in sizes) for n in range(1, max_num_seqs + 1))
        assert max(sizes) == max_num_seqs and sizes == sorted(set(sizes))


@pytest.mark.parametrize("tokens,seqs,max_len,block", [(2048, 128, 8192, 16), (100, 256, 64, 16),
                                                        (8192, 2, 1000, 32), (1, 1, 1, 1)])
def test_profile_batch_is_the_largest_step_the_scheduler_can_form(tokens, seqs, max_len, block):
    batch = profile_batch(tokens, seqs, max_len, block)
    assert sum(batch.query_lens) == tokens and all(1 <= n <= max_len for n in batch.query_lens)
    assert len(batch.query_lens) <= max(seqs, -(-tokens // max_len))
    blocks = [b for table in batch.block_tables for b in table]
    assert sorted(blocks) == list(range(batch.num_blocks))  # disjoint, all allocated
    assert all(len(t) * block >= n for t, n in zip(batch.block_tables, batch.query_lens))
