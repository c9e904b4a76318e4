"""Where a batch-1 decode token's time goes, distinfer vs transformers, same run.

    python benchmarks/batch1_split.py [--dtype float32] [--new-tokens 64] [--rounds 2]

Times `--new-tokens` greedy tokens after a 32-token prompt on both sides and, separately, the time
spent inside `F.linear` (the weight-streaming matmuls, lm_head included). "rest" is everything else:
norms, RoPE, attention, sampling, Python. The ratio ceiling is what transformers' total would be
over its own matmul time alone: the speedup a runtime with zero non-matmul cost would get when its
matmuls run as fast as transformers' (they stream the same weights). In bfloat16 our decode matmuls
are the C kernel (not `F.linear`), so only our total is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hf_reference_model  # noqa: E402
from throughput import hf_batch1_seconds, ours_batch1_seconds, warm_up_batch1  # noqa: E402

from distinfer import LLM  # noqa: E402


class LinearTimer:
    """Accumulates wall time spent in F.linear while installed (our layers and transformers call it)."""

    def __init__(self) -> None:
        self.seconds, self._orig = 0.0, F.linear

    def _timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._orig(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out

    def __enter__(self) -> "LinearTimer":
        self.seconds = 0.0
        F.linear = self._timed
        return self

    def __exit__(self, *exc) -> None:
        F.linear = self._orig


def measure(llm: LLM, hf_model, prompt: list[int], new_tokens: int) -> dict:
    warm_up_batch1(llm, hf_model, prompt, new_tokens)
    with LinearTimer() as hf_linear:
        hf_total = hf_batch1_seconds(hf_model, prompt, new_tokens)
    with LinearTimer() as our_linear:
        our_total = ours_batch1_seconds(llm, prompt, new_tokens)
    per_token = 1e3 / new_tokens
    return {
        "hf_ms": hf_total * per_token, "hf_linear_ms": hf_linear.seconds * per_token,
        "hf_rest_ms": (hf_total - hf_linear.seconds) * per_token,
        "ours_ms": our_total * per_token, "ours_linear_ms": our_linear.seconds * per_token,
        "ours_rest_ms": (our_total - our_linear.seconds) * per_token,
        "ratio": hf_total / our_total, "ratio_ceiling": hf_total / hf_linear.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype)
    hf_model, _ = hf_reference_model(args.dtype)
    prompt = list(range(1000, 1032))
    rounds = [measure(llm, hf_model, prompt, args.new_tokens) for _ in range(args.rounds)]
    if args.dtype == "bfloat16":  # our decode matmuls bypass F.linear: the split would be meaningless
        for r in rounds:
            del r["ours_linear_ms"], r["ours_rest_ms"]
    print(json.dumps({"dtype": args.dtype, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
