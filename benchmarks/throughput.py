"""Offline throughput and batch-1 decode: distinfer vs transformers on the same prompts, same run.

    python benchmarks/throughput.py [--num-prompts 128] [--hf-batch-sizes 8,16,32] [--dtype float32]

Prints tokens/s for both and the ratio, batch-1 decode tokens/s for both and the ratio, and the
fraction of this machine's memory-bandwidth bound that batch-1 decode reaches.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Workload, hf_reference_model, measure_memory_bandwidth  # noqa: E402

from distinfer import LLM, SamplingParams  # noqa: E402

logger = logging.getLogger("benchmarks.throughput")


def sharegpt_like(num: int, vocab_size: int, seed: int, max_prompt: int, max_output: int) -> Workload:
    """Log-normal prompt/output lengths shaped like ShareGPT (long-tailed), scaled to this machine."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(mean=4.6, sigma=0.8, size=num), 8, max_prompt).astype(int)
    output_lens = np.clip(rng.lognormal(mean=4.2, sigma=0.7, size=num), 8, max_output).astype(int)
    prompts = [rng.integers(100, vocab_size, size=n).tolist() for n in prompt_lens]
    return Workload(prompts, output_lens.tolist())


def run_distinfer(llm: LLM, work: Workload) -> float:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(work.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == work.num_output_tokens, (produced, work.num_output_tokens)
    return produced / elapsed


@torch.inference_mode()
def run_hf(model, work: Workload, batch_size: int, pad_id: int) -> float:
    """Static batches (left-padded); requests sorted by output length to limit over-generation.
    Only the requested tokens count, so padding and over-generation cost HF time, as in real use."""
    order = sorted(range(len(work.prompts)), key=lambda i: work.output_lens[i])
    start = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        width = max(len(work.prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(work.prompts[i]) :] = torch.tensor(work.prompts[i])
            mask[row, width - len(work.prompts[i]) :] = 1
        new = max(work.output_lens[i] for i in batch)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    return work.num_output_tokens / (time.perf_counter() - start)


def warm_up_batch1(llm: LLM, hf_model, prompt: list[int], new_tokens: int) -> None:
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    with torch.inference_mode():
        hf_model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)


def ours_batch1_seconds(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    return time.perf_counter() - start


@torch.inference_mode()
def hf_batch1_seconds(hf_model, prompt: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def batch1_decode(llm: LLM, hf_model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(our, transformers') tokens/s decoding `new_tokens` after `prompt`, one request, after a warm-up."""
    warm_up_batch1(llm, hf_model, prompt, new_tokens)
    return (new_tokens / ours_batch1_seconds(llm, prompt, new_tokens),
            new_tokens / hf_batch1_seconds(hf_model, prompt, new_tokens))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", default="8,16,32")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    llm = LLM(dtype=args.dtype, max_num_seqs=128, max_num_batched_tokens=2048)
    hf_model, hf_dtype = hf_reference_model(args.dtype)
    work = sharegpt_like(args.num_prompts, llm.engine.hf_config.vocab_size, args.seed, args.max_prompt, args.max_output)
    logger.info("workload: %d requests, %d prompt tokens, %d output tokens", len(work.prompts), sum(map(len, work.prompts)), work.num_output_tokens)

    ours = run_distinfer(llm, work)
    logger.info("distinfer: %.1f output tok/s", ours)
    hf_by_batch = {}
    for bs in (int(b) for b in args.hf_batch_sizes.split(",")):
        hf_by_batch[bs] = run_hf(hf_model, work, bs, pad_id=llm.get_tokenizer().pad_token_id or 0)
        logger.info("transformers batch %d: %.1f output tok/s", bs, hf_by_batch[bs])
    best_bs = max(hf_by_batch, key=hf_by_batch.get)

    prompt = work.prompts[0][:32]
    ours_b1, hf_b1 = batch1_decode(llm, hf_model, prompt, args.decode_tokens)
    bandwidth = measure_memory_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    bound = bandwidth / weight_bytes
    results = {
        "throughput_tok_s": ours,
        "hf_throughput_tok_s": hf_by_batch[best_bs],
        "hf_best_batch_size": best_bs,
        "throughput_ratio": ours / hf_by_batch[best_bs],
        "batch1_decode_tok_s": ours_b1,
        "hf_batch1_decode_tok_s": hf_b1,
        "batch1_ratio": ours_b1 / hf_b1,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound,
        "batch1_fraction_of_bound": ours_b1 / bound,
        "dtype": args.dtype,
        "workload": {"num_prompts": args.num_prompts, "prompt_tokens": sum(map(len, work.prompts)), "output_tokens": work.num_output_tokens},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
