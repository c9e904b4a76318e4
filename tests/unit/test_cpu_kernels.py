"""The fused float32/bfloat16 CPU kernels against the torch ops they replace (transformers' order of
operations: bfloat16 results round where torch rounds, so they match to a bfloat16 ulp or better)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from distinfer.model.attention.paged import (AttentionMetadata, TorchSDPABackend, get_attention_backend, make_kv_cache,
                                            resolve_attention_backend)
from distinfer.model.kernels import cpu
from distinfer.model.layers.activation import GatedActivation
from distinfer.model.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(os.environ.get("DISTINFER_CPU_KERNELS") == "0", reason="kernels disabled")


def test_kernels_build_and_are_the_default_backend():
    assert cpu.load() is not None, "a C compiler is on this machine, so the kernels must build"
    assert resolve_attention_backend("auto", "cpu") == "cpu_paged"
    assert cpu.enabled_for(torch.ones(1)) and cpu.enabled_for(torch.ones(1, dtype=torch.bfloat16))
    assert not cpu.enabled_for(torch.ones(1, dtype=torch.float16))
    assert not cpu.enabled_for(torch.ones(1), torch.ones(1, dtype=torch.bfloat16))  # mixed dtypes


TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}
DTYPES = [torch.float32, torch.bfloat16]


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 37])
def test_rms_norm_with_and_without_residual(rows, dtype):
    torch.manual_seed(0)
    x, res, w = (torch.randn(*shape).to(dtype) for shape in ((rows, 576), (rows, 576), (576,)))
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), _hf_rms_norm(x, w, 1e-5), **TOL[dtype])
    total = res.clone()
    out = cpu.rms_norm(x, w, 1e-5, residual=total)
    assert torch.equal(total, x + res)  # the sum rounds exactly like torch's add
    torch.testing.assert_close(out, _hf_rms_norm(x + res, w, 1e-5), **TOL[dtype])
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 19])
def test_rope_in_place_on_strided_heads(tokens, dtype):
    torch.manual_seed(1)
    d, hq, hkv = 64, 6, 2
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = (torch.arange(tokens) + 3)[:, None].float() * inv
    cos = torch.cat((freqs.cos(), freqs.cos()), -1).unsqueeze(1).to(dtype)
    sin = torch.cat((-freqs.sin(), freqs.sin()), -1).unsqueeze(1).to(dtype)
    ref = qkv.clone()
    heads = ref[:, : (hq + hkv) * d].view(tokens, hq + hkv, d)
    swapped = heads.reshape(tokens, hq + hkv, 2, d // 2).flip(2).view(tokens, hq + hkv, d)
    heads.copy_(heads * cos + swapped * sin)
    out = qkv.clone()
    RotaryEmbedding.forward(out[:, : (hq + hkv) * d].view(tokens, hq + hkv, d), cos, sin)  # kernel path
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(out[:, (hq + hkv) * d:], qkv[:, (hq + hkv) * d:])  # V untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 9])
def test_silu_and_mul(rows, dtype):
    x = (torch.randn(rows, 2 * 1536) * 4).to(dtype)
    ref = F.silu(x[:, :1536]) * x[:, 1536:]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(GatedActivation("silu")(x), ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_into_slots_from_strided_rows(dtype):
    cache = make_kv_cache(6, 4, 2, 8, dtype, "cpu")
    qkv = torch.randn(3, 4 * 8 + 2 * 2 * 8).to(dtype)
    kv = qkv[:, 32:].view(3, 2, 2, 8)
    cpu.write_kv(cache, kv, torch.tensor([5, 17, 0]))
    flat = cache.view(-1, 2, 2, 8)
    assert torch.equal(flat[5], kv[0]) and torch.equal(flat[17], kv[1]) and torch.equal(flat[0], kv[2])
    assert flat[[i for i in range(24) if i not in (0, 5, 17)]].abs().sum() == 0


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (4, 1, 16), (2, 2, 256)])
@pytest.mark.parametrize("lens", [[1, 17, 300, 64, 5], [300]])  # one request: work split by KV head
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_matches_sdpa_backend(hq, hkv, d, lens, dtype):
    torch.manual_seed(2)
    bs = 16
    cache = torch.randn(80, bs, 2, hkv, d).to(dtype)
    perm = (torch.randperm(79) + 1).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    md = AttentionMetadata.build([1] * len(lens), lens, tables, bs)
    q = torch.randn(len(lens), hq + 2 * hkv, d).to(dtype)[:, :hq]  # rows strided like the fused qkv projection
    ref = TorchSDPABackend._decode(q.contiguous(), cache, md, d ** -0.5)
    out = get_attention_backend("cpu_paged")._decode(q, cache, md, d ** -0.5)
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_small_batch_linear_matches_torch(rows, bias):
    from distinfer.model.layers.linear import linear

    torch.manual_seed(3)
    x, w = torch.randn(rows, 576).bfloat16(), torch.randn(1536, 576).bfloat16()
    b = torch.randn(1536).bfloat16() if bias else None
    if not cpu.small_batch_linear_applies(x, w):
        pytest.skip("this CPU has no AVX512-BF16")
    out, ref = linear(x, w, b), F.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # float32 accumulation in another order: equal up to one bfloat16 rounding step
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=8e-3)
    assert (out != ref).float().mean() < 0.01
    assert not cpu.small_batch_linear_applies(torch.randn(8, 576).bfloat16(), w)  # larger batches: torch GEMM
    assert not cpu.small_batch_linear_applies(torch.randn(1, 576), w.float())  # float32: MKL is at bandwidth


def test_out_of_range_slots_and_blocks_raise_instead_of_touching_memory():
    cache = make_kv_cache(4, 4, 1, 8, torch.float32, "cpu")
    kv = torch.randn(2, 2, 1, 8)
    with pytest.raises(IndexError, match="outside the cache's 16 slots"):
        cpu.write_kv(cache, kv, torch.tensor([3, 16]))
    assert cache.abs().sum() == 0  # nothing written, not even the valid slot
    q = torch.randn(1, 2, 8)
    for table, lens in (([[0, 4]], [6]), ([[0, -1]], [6]), ([[0]], [6])):  # block past the cache, negative, short table
        with pytest.raises(IndexError):
            cpu.paged_decode_attention(q, cache, torch.tensor(table), torch.tensor(lens), 0.3)
