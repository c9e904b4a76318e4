"""Loader: HF directories (single and sharded safetensors), dummy weights, dtypes, the default
GGUF model converted to a cached HF directory, all checked against transformers."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from distinfer.config import ModelConfig
from distinfer.model.attention.paged import AttentionMetadata
from distinfer.model.loader import load_hf_config, load_model, load_tokenizer, resolve_model_path

_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


def _load(path, **kw):
    mc = ModelConfig(model=str(path), **kw)
    return load_model(mc, load_hf_config(mc))


def _prefill_logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """All-position logits of one fresh prompt."""
    n = len(ids)
    kv = model.make_kv_caches(-(-n // block_size), block_size, "cpu")
    md = AttentionMetadata.build([n], [n], [list(range(kv[0].shape[0]))], block_size, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), kv, md))


def _greedy(model, prompt: list[int], max_new: int, block_size: int = 16) -> list[int]:
    """Trivial greedy loop: prefill, then one decode step per token, block ids reversed."""
    total = len(prompt) + max_new
    nblocks = -(-total // block_size)
    kv = model.make_kv_caches(nblocks, block_size, "cpu")
    table = list(reversed(range(nblocks)))
    tokens, out = list(prompt), []
    q = len(prompt)
    with torch.inference_mode():
        while len(out) < max_new:
            s = len(tokens)
            md = AttentionMetadata.build([q], [s], [table], block_size, "cpu")
            hidden = model(torch.tensor(tokens[s - q:]), torch.arange(s - q, s), kv, md)
            nxt = int(model.compute_logits(hidden[-1:]).argmax(-1))
            tokens.append(nxt)
            out.append(nxt)
            q = 1
    return out


@pytest.fixture(scope="module")
def tiny_hf():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**_TINY, tie_word_embeddings=False)).eval()


def test_sharded_safetensors_index(tiny_hf, tmp_path):
    tiny_hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = list(range(3, 15))
    with torch.no_grad():
        ref = tiny_hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_prefill_logits(_load(tmp_path), ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_load(tiny_hf, tmp_path, dtype):
    tiny_hf.save_pretrained(str(tmp_path))
    model = _load(tmp_path, dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    ids = list(range(1, 9))
    with torch.no_grad():
        ref = tiny_hf(torch.tensor([ids])).logits[0]
    logits = _prefill_logits(model, ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=0.1, rtol=0.05)


def test_dummy_weights_from_config_only(tmp_path):
    LlamaConfig(**_TINY, architectures=["LlamaForCausalLM"]).save_pretrained(str(tmp_path))
    assert not list(tmp_path.glob("*.safetensors"))
    a = _load(tmp_path, load_format="dummy", seed=1)
    b = _load(tmp_path, load_format="dummy", seed=1)
    c = _load(tmp_path, load_format="dummy", seed=2, dtype="bfloat16")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight.float())
    logits = _prefill_logits(a, [1, 2, 3])
    assert logits.shape == (3, 97) and torch.isfinite(logits).all()


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_unsupported_architecture_in_checkpoint(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="Unsupported architecture 'GPT2LMHeadModel'"):
        load_hf_config(ModelConfig(model=str(tmp_path)))


# ---------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def default_model():
    mc = ModelConfig()
    hf_config = load_hf_config(mc)
    ours = load_model(mc, hf_config)
    path = resolve_model_path(None)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf, load_tokenizer(mc), path


def test_default_model_is_converted_once(default_model):
    ours, _, _, path = default_model
    cfg = json.loads(open(f"{path}/config.json").read())
    assert "quantization_config" not in cfg
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] and cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert resolve_model_path(None) == path  # cached: no second conversion


def test_default_model_logits_match_hf(default_model):
    ours, hf, tok, _ = default_model
    for prompt in ["The capital of France is", "def fibonacci(n):\n    "]:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(_prefill_logits(ours, ids)[-1], ref[-1], atol=1e-4, rtol=0)


def test_default_model_greedy_generation_matches_hf(default_model):
    ours, hf, tok, _ = default_model
    text = tok.apply_chat_template([{"role": "user", "content": "What is the tallest mountain?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text).input_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                          pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert _greedy(ours, ids, 20) == ref
