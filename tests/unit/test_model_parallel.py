"""Tensor and pipeline parallel (2 processes, gloo) give HF's logits; each rank loads only its shard."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from distinfer.config import ModelConfig
from distinfer.distributed import comm, parallel_state as ps
from distinfer.model.attention.paged import AttentionMetadata
from distinfer.model.loader import load_hf_config, load_model

_BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.1)
CONFIGS = {
    "kv_replicated_untied": LlamaConfig(**_BASE, num_key_value_heads=1, tie_word_embeddings=False),
    "kv_split_tied_bias": Qwen2Config(**_BASE, num_key_value_heads=2, tie_word_embeddings=True),
}
SEQ = [5, 17, 33, 2, 90, 41, 7, 7, 64, 12, 100, 3]
STEPS = [(6, 6), (3, 9), (1, 10), (1, 11), (1, 12)]  # (query_len, seq_len): prefill, chunk, decodes
BLOCK_SIZE, TABLE = 4, [5, 1, 3]


def _run_steps(model, pp: bool) -> list[torch.Tensor] | None:
    """Drive one request through STEPS; returns per-step logits on the rank that has them."""
    kv = model.make_kv_caches(6, BLOCK_SIZE, "cpu")
    hidden_size, results = model.config.hidden_size, []
    with torch.inference_mode():
        for q, s in STEPS:
            md = AttentionMetadata.build([q], [s], [TABLE], BLOCK_SIZE, "cpu")
            ids, pos = torch.tensor(SEQ[s - q:s]), torch.arange(s - q, s)
            inter = None
            if pp and not model.model.is_first:
                inter = {k: comm.pp_recv((q, hidden_size), torch.float32, "cpu") for k in ("hidden_states", "residual")}
            out = model(ids, pos, kv, md, inter)
            if pp and not model.model.is_last:
                comm.pp_send(out["hidden_states"])
                comm.pp_send(out["residual"])
            else:
                results.append(model.compute_logits(out))
    return results if results else None


def _worker(rank: int, port: int, dirs: dict[str, str], out_dir: str) -> None:
    ps.init_distributed_environment(2, rank, f"tcp://127.0.0.1:{port}", backend="gloo")
    for name, path in dirs.items():
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
        model = load_model(ModelConfig(model=path), load_hf_config(ModelConfig(model=path)))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        torch.save({"logits": _run_steps(model, pp=False), "shapes": shapes}, f"{out_dir}/tp-{name}-{rank}.pt")
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    path = dirs["kv_replicated_untied"]
    model = load_model(ModelConfig(model=path), load_hf_config(ModelConfig(model=path)))
    layers = (model.model.start_layer, model.model.end_layer)
    torch.save({"logits": _run_steps(model, pp=True), "layers": layers}, f"{out_dir}/pp-{rank}.pt")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    refs, dirs = {}, {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
            refs[name] = hf(torch.tensor([SEQ])).logits[0]
        dirs[name] = str(root / name)
        hf.save_pretrained(dirs[name], max_shard_size="30KB")  # lazy slices across several files
    mp.spawn(_worker, args=(_free_port(), dirs, str(root)), nprocs=2, join=True)
    return root, refs


def _check_logits(step_logits: list[torch.Tensor], ref: torch.Tensor) -> None:
    for (q, s), logits in zip(STEPS, step_logits):
        torch.testing.assert_close(logits, ref[s - q:s], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_matches_hf(parallel_run, name):
    root, refs = parallel_run
    cfg, hd = CONFIGS[name], 16
    for rank in range(2):
        res = torch.load(root / f"tp-{name}-{rank}.pt")
        _check_logits(res["logits"], refs[name])
        kv_local = max(cfg.num_key_value_heads // 2, 1)
        assert res["shapes"]["model.layers.0.self_attn.qkv_proj.weight"] == ((2 + 2 * kv_local) * hd, 64)
        assert res["shapes"]["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
        assert res["shapes"]["model.layers.0.mlp.gate_up_proj.weight"] == (96, 64)
        assert res["shapes"]["model.embed_tokens.weight"] == (51, 64)  # ceil(101 / 2) rows, last one padding


def test_pipeline_parallel_matches_hf(parallel_run):
    root, refs = parallel_run
    first, last = torch.load(root / "pp-0.pt"), torch.load(root / "pp-1.pt")
    assert first["layers"] == (0, 2) and last["layers"] == (2, 3)
    assert first["logits"] is None
    _check_logits(last["logits"], refs["kv_replicated_untied"])


def test_single_process_defaults():
    assert (ps.get_tp_rank(), ps.get_tp_world_size(), ps.get_pp_rank(), ps.get_pp_world_size()) == (0, 1, 0, 1)
    assert ps.get_tp_group().group is None and ps.get_sp_world_size() == 1
    x = torch.ones(3)
    assert comm.tensor_model_parallel_all_reduce(x) is x
    assert comm.tensor_model_parallel_all_gather(x) is x
