"""Our Llama-family model against the transformers oracle on tiny random checkpoints."""
from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from distinfer.config import ModelConfig
from distinfer.model.attention.paged import AttentionMetadata
from distinfer.model.loader import load_hf_config, load_model
from distinfer.model.registry import get_model_class

TOL = 1e-4
_SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-5)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)
VARIANTS: dict[str, PretrainedConfig] = {
    "llama_untied": LlamaConfig(**_SMALL, tie_word_embeddings=False),
    "llama_tied_mha_bias": LlamaConfig(**{**_SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True,
                                       attention_bias=True, mlp_bias=True),
    "llama3_rope": LlamaConfig(**_SMALL, rope_parameters=_LLAMA3_ROPE),
    "mistral_head_dim": MistralConfig(**_SMALL, head_dim=32, sliding_window=None),
    "qwen2_bias_tied": Qwen2Config(**{**_SMALL, "num_key_value_heads": 1}, tie_word_embeddings=True),
}


def make_hf_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """Random HF model; biases and norm weights randomized too so a wrong mapping shows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def save_and_load(hf_model: torch.nn.Module, path, **save_kwargs) -> torch.nn.Module:
    hf_model.save_pretrained(str(path), **save_kwargs)
    mc = ModelConfig(model=str(path))
    return load_model(mc, load_hf_config(mc))


def run_schedule(model, seqs: dict[str, list[int]], steps: list[list[tuple[str, int]]],
                 block_size: int = 4, num_blocks: int = 64, seed: int = 0) -> dict[str, dict[int, torch.Tensor]]:
    """Drive our model through `steps` (each a batch of (request, tokens to compute)) with shuffled,
    non-contiguous block ids; returns the logits of every computed position."""
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables = {r: [pool.pop() for _ in range(math.ceil(len(s) / block_size))] for r, s in seqs.items()}
    done = dict.fromkeys(seqs, 0)
    kv = model.make_kv_caches(num_blocks, block_size, "cpu")
    out: dict[str, dict[int, torch.Tensor]] = {r: {} for r in seqs}
    for step in steps:
        ids, pos, qlens, slens, bts = [], [], [], [], []
        for r, n in step:
            start = done[r]
            ids += seqs[r][start:start + n]
            pos += range(start, start + n)
            qlens.append(n)
            slens.append(start + n)
            bts.append(tables[r])
            done[r] += n
        md = AttentionMetadata.build(qlens, slens, bts, block_size, "cpu")
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), kv, md))
        row = 0
        for (r, n), s in zip(step, slens):
            for j in range(n):
                out[r][s - n + j] = logits[row + j]
            row += n
    return out


def check_against_hf(hf_model, got: dict[str, dict[int, torch.Tensor]], seqs: dict[str, list[int]]) -> None:
    for r, per_pos in got.items():
        with torch.no_grad():
            ref = hf_model(torch.tensor([seqs[r]])).logits[0]
        assert ref.abs().max() > 0.5, "logits too small for a meaningful comparison"
        for p, logits in per_pos.items():
            torch.testing.assert_close(logits, ref[p], atol=TOL, rtol=0, msg=f"request {r} position {p}")


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    hf = make_hf_model(VARIANTS[request.param])
    ours = save_and_load(hf, tmp_path_factory.mktemp(request.param))
    return hf, ours


def _seqs(vocab: int, lens: dict[str, int], seed: int = 1) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {r: torch.randint(0, vocab, (n,), generator=g).tolist() for r, n in lens.items()}


def test_full_prefill(models):
    hf, ours = models
    seqs = _seqs(hf.config.vocab_size, {"a": 13})
    check_against_hf(hf, run_schedule(ours, seqs, [[("a", 13)]]), seqs)


def test_chunked_prefill_then_decode(models):
    hf, ours = models
    seqs = _seqs(hf.config.vocab_size, {"a": 13})
    steps = [[("a", 5)], [("a", 3)]] + [[("a", 1)]] * 5
    check_against_hf(hf, run_schedule(ours, seqs, steps), seqs)


def _check_mixed_batch(hf, ours) -> None:
    """Decode rows (non-contiguous, different lengths), a chunked-prefill row and a fresh prefill row."""
    seqs = _seqs(hf.config.vocab_size, {"dec": 10, "chunk": 10, "dec2": 7, "fresh": 7})
    steps = [
        [("dec", 9), ("chunk", 4), ("dec2", 6)],
        [("dec", 1), ("chunk", 6), ("dec2", 1), ("fresh", 7)],
    ]
    check_against_hf(hf, run_schedule(ours, seqs, steps, seed=3), seqs)


def test_mixed_batch(models):
    _check_mixed_batch(*models)


def test_batched_decode_equal_and_unequal_lengths(models):
    hf, ours = models
    seqs = _seqs(hf.config.vocab_size, {"a": 9, "b": 9, "c": 12})
    steps = [[("a", 6), ("b", 6)], [("a", 1), ("b", 1)], [("c", 9)],
             [("a", 1), ("b", 1), ("c", 1)], [("c", 1), ("a", 1), ("b", 1)], [("c", 1)]]
    check_against_hf(hf, run_schedule(ours, seqs, steps, block_size=2, seed=5), seqs)


def test_tied_embeddings_share_storage(models):
    hf, ours = models
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:
        assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()


def test_kv_cache_shapes_and_bytes():
    cfg = VARIANTS["mistral_head_dim"]
    model = get_model_class(cfg)(cfg, torch.float32)
    caches = model.make_kv_caches(num_blocks=5, block_size=4, device="cpu")
    assert len(caches) == cfg.num_hidden_layers
    assert caches[0].shape == (5, 4, 2, cfg.num_key_value_heads, 32)
    total = sum(c.numel() * c.element_size() for c in caches)
    assert model.kv_cache_bytes_per_block(4) * 5 == total


def test_unsupported_architecture():
    cfg = LlamaConfig(**_SMALL)
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="Unsupported architecture 'GPT2LMHeadModel'; supported: .*LlamaForCausalLM"):
        get_model_class(cfg)


def test_registry_by_model_type():
    for cfg in VARIANTS.values():
        cfg.architectures = None
        assert get_model_class(cfg).__name__ == "LlamaForCausalLM"


def test_missing_and_unexpected_weights():
    cfg = VARIANTS["llama_untied"]
    model = get_model_class(cfg)(cfg, torch.float32)
    hf_state = make_hf_model(cfg).state_dict()
    with pytest.raises(ValueError, match="missing weights: lm_head.weight"):
        model.load_weights((k, v) for k, v in hf_state.items() if k != "lm_head.weight")
    with pytest.raises(ValueError, match="no matching parameter"):
        model.load_weights([("model.layers.0.foo.weight", torch.zeros(1))])


def test_plain_torch_path_matches_hf(models, monkeypatch):
    """With the fused CPU kernels unavailable (no compiler, or DISTINFER_CPU_KERNELS=0) every layer
    and the attention fall back to torch ops, with the same results."""
    from distinfer.model.kernels import cpu

    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", True)
    assert not cpu.enabled_for(torch.ones(1))
    _check_mixed_batch(*models)
