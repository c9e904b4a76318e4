"""The fused float32 CPU kernels against the torch ops they replace."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from distinfer.model.attention.paged import AttentionMetadata, TorchSDPABackend, get_attention_backend, make_kv_cache
from distinfer.model.kernels import cpu
from distinfer.model.layers.activation import GatedActivation
from distinfer.model.layers.norm import RMSNorm
from distinfer.model.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(os.environ.get("DISTINFER_CPU_KERNELS") == "0", reason="kernels disabled")


def test_kernels_build_and_are_the_default_backend():
    assert cpu.load() is not None, "a C compiler is on this machine, so the kernels must build"
    assert get_attention_backend().name == "cpu_paged"
    assert cpu.enabled_for(torch.ones(1)) and not cpu.enabled_for(torch.ones(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 37])
def test_rms_norm_with_and_without_residual(rows):
    torch.manual_seed(0)
    x, res, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), atol=2e-6, rtol=2e-6)
    total = res.clone()
    out = cpu.rms_norm(x, w, 1e-5, residual=total)
    assert torch.equal(total, x + res)  # the sum rounds exactly like torch's add
    torch.testing.assert_close(out, F.rms_norm(x + res, (576,), w, 1e-5), atol=2e-6, rtol=2e-6)


def test_rms_norm_layer_uses_kernel_and_keeps_bf16_on_torch():
    norm = RMSNorm(64, 1e-6, torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16  # torch path; the kernel only takes float32


@pytest.mark.parametrize("tokens", [1, 19])
def test_rope_in_place_on_strided_heads(tokens):
    torch.manual_seed(1)
    d, hq, hkv = 64, 6, 2
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = (torch.arange(tokens) + 3)[:, None].float() * inv
    cos = torch.cat((freqs.cos(), freqs.cos()), -1).unsqueeze(1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), -1).unsqueeze(1)
    ref = qkv.clone()
    heads = ref[:, : (hq + hkv) * d].view(tokens, hq + hkv, d)
    swapped = heads.reshape(tokens, hq + hkv, 2, d // 2).flip(2).view(tokens, hq + hkv, d)
    heads.copy_(heads * cos + swapped * sin)
    out = qkv.clone()
    RotaryEmbedding.forward(out[:, : (hq + hkv) * d].view(tokens, hq + hkv, d), cos, sin)  # kernel path
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[:, (hq + hkv) * d:], qkv[:, (hq + hkv) * d:])  # V untouched


@pytest.mark.parametrize("rows", [1, 9])
def test_silu_and_mul(rows):
    x = torch.randn(rows, 2 * 1536) * 4
    ref = F.silu(x[:, :1536]) * x[:, 1536:]
    torch.testing.assert_close(GatedActivation("silu")(x), ref, atol=1e-5, rtol=1e-5)


def test_write_kv_into_slots_from_strided_rows():
    cache = make_kv_cache(6, 4, 2, 8, torch.float32, "cpu")
    qkv = torch.randn(3, 4 * 8 + 2 * 2 * 8)
    kv = qkv[:, 32:].view(3, 2, 2, 8)
    cpu.write_kv(cache, kv, torch.tensor([5, 17, 0]))
    flat = cache.view(-1, 2, 2, 8)
    assert torch.equal(flat[5], kv[0]) and torch.equal(flat[17], kv[1]) and torch.equal(flat[0], kv[2])
    assert flat[[i for i in range(24) if i not in (0, 5, 17)]].abs().sum() == 0


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (4, 1, 16), (2, 2, 256)])
@pytest.mark.parametrize("lens", [[1, 17, 300, 64, 5], [300]])  # one request: work split by KV head
def test_paged_decode_attention_matches_sdpa_backend(hq, hkv, d, lens):
    torch.manual_seed(2)
    bs = 16
    cache = torch.randn(80, bs, 2, hkv, d)
    perm = (torch.randperm(79) + 1).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    md = AttentionMetadata.build([1] * len(lens), lens, tables, bs)
    q = torch.randn(len(lens), hq + 2 * hkv, d)[:, :hq]  # rows strided like the fused qkv projection
    ref = TorchSDPABackend._decode(q.contiguous(), cache, md, d ** -0.5)
    out = get_attention_backend("cpu_paged")._decode(q, cache, md, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
