"""Building blocks against their transformers counterparts, and the weight loaders' slicing."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from distinfer.model.layers.activation import GatedActivation
from distinfer.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from distinfer.model.layers.norm import RMSNorm
from distinfer.model.layers.rotary import RotaryEmbedding
from distinfer.model.layers.weight_utils import narrow
from distinfer.model.llama import pp_layer_range

_ROPES = {
    "default": None,
    "linear": dict(rope_type="linear", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),  # attention scaling != 1
}


@pytest.mark.parametrize("rope", list(_ROPES))
def test_rotary_matches_hf(rope):
    params = {"rope_theta": 5000.0, **(_ROPES[rope] or {"rope_type": "default"})}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=params)
    ours, hf = RotaryEmbedding(cfg, head_dim=16), LlamaRotaryEmbedding(cfg)
    positions = torch.tensor([0, 1, 7, 100, 255, 3])
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    hf_cos, hf_sin = hf(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    fused = torch.cat([q, k], dim=1).view(6, -1)  # q and k heads side by side, as in the qkv projection
    cos, sin = ours.cos_sin(positions, torch.float32)
    RotaryEmbedding.forward(fused.view(6, 6, 16), cos, sin)
    out = fused.view(6, 6, 16)
    torch.testing.assert_close(out[:, :4], ref_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, 4:], ref_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_dynamic_rope_is_rejected():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="Unsupported rope_type 'dynamic'"):
        RotaryEmbedding(cfg, head_dim=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype):
    hf = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    ours = RMSNorm(48, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x, res = torch.randn(5, 48, dtype=dtype), torch.randn(5, 48, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-6)
        expected_sum = x + res
        normed, new_res = ours(x, res.clone())
        torch.testing.assert_close(new_res, expected_sum, atol=0, rtol=0)
        torch.testing.assert_close(normed, hf(expected_sum), atol=1e-6, rtol=1e-6)


def test_qkv_loader_separate_fused_and_lazy_slices(tmp_path):
    torch.manual_seed(0)
    q, k, v = torch.randn(8 * 4, 16), torch.randn(2 * 4, 16), torch.randn(2 * 4, 16)
    separate = QKVParallelLinear(16, 4, total_num_heads=8, total_num_kv_heads=2, bias=False)
    for sid, w in (("q", q), ("k", k), ("v", v)):
        separate.weight.weight_loader(separate.weight, w, sid)
    fused = QKVParallelLinear(16, 4, total_num_heads=8, total_num_kv_heads=2, bias=False)
    save_file({"qkv": torch.cat([q, k, v])}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        fused.weight.weight_loader(fused.weight, f.get_slice("qkv"))  # no shard id: a fused checkpoint
    assert torch.equal(separate.weight, torch.cat([q, k, v]))
    assert torch.equal(fused.weight, separate.weight)
    x = torch.randn(3, 16)
    torch.testing.assert_close(separate(x), x @ torch.cat([q, k, v]).T)


def test_merged_and_row_loaders():
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    gu = MergedColumnParallelLinear(4, [6, 6])
    gu.weight.weight_loader(gu.weight, up, 1)
    gu.weight.weight_loader(gu.weight, gate, 0)
    assert torch.equal(gu.weight, torch.cat([gate, up]))
    row = RowParallelLinear(6, 4, bias=True)
    row.weight.weight_loader(row.weight, down)
    row.bias.weight_loader(row.bias, torch.ones(4))
    x = torch.randn(2, 6)
    torch.testing.assert_close(row(x), x @ down.T + 1)
    with pytest.raises(ValueError, match="has 7 on dim 1, expected 6"):
        row.weight.weight_loader(row.weight, torch.randn(4, 7))
    with pytest.raises(ValueError, match="expected 12"):
        gu.weight.weight_loader(gu.weight, torch.randn(13, 4))  # fused gate_up of the wrong size


def test_narrow_on_lazy_slice(tmp_path):
    t = torch.arange(24.0).view(4, 6)
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert torch.equal(narrow(f.get_slice("t"), 1, 2, 3), t[:, 2:5])
        assert torch.equal(narrow(f.get_slice("t"), -2, 1, 2), t[1:3])


def test_gated_activation():
    x = torch.randn(3, 8)
    torch.testing.assert_close(GatedActivation("silu")(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])
    with pytest.raises(ValueError, match="Unsupported hidden_act 'relu2'"):
        GatedActivation("relu2")


@pytest.mark.parametrize("layers,pp,expected", [
    (30, 1, [(0, 30)]), (30, 4, [(0, 8), (8, 16), (16, 23), (23, 30)]), (3, 2, [(0, 2), (2, 3)]),
])
def test_pp_layer_range(layers, pp, expected):
    assert [pp_layer_range(layers, r, pp) for r in range(pp)] == expected
