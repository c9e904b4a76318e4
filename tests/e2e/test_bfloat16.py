"""bfloat16 serving on the real model (fused bf16 CPU kernels, the AVX512-BF16 small-batch linear).

bfloat16 cannot match the float32 oracle token for token (its rounding flips near-ties), so the
check is that every greedy token is the float32 model's argmax or within a near-tie of it: the
float32 transformers model, teacher-forced on our bf16 output, finds each chosen token's logit
within NEAR_TIE of its best. A wrong RoPE, norm, attention or matmul in bf16 breaks this at once.
"""
from __future__ import annotations

import pytest
import torch

from distinfer import LLM, SamplingParams

NEAR_TIE = 0.5  # logits; bf16 runs measured <= 0.11 over these prompts
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of robotics are", "Water boils at", "x " * 300 + "The end. Now a poem:"]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(dtype="bfloat16")
    yield engine
    engine.shutdown()


def _fp32_logit_gaps(hf_model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(token_ids)[:, None])[:, 0]
    return logits.max(-1).values - chosen


@pytest.mark.parametrize("group", [PROMPTS[:2], PROMPTS], ids=["batch2-bf16-gemv-kernel", "batch6-torch-gemm"])
def test_bf16_greedy_follows_fp32_model_up_to_near_ties(llm, hf_model, group):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(group, params, use_tqdm=False)
    for prompt, out in zip(group, outputs):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 32 and out.outputs[0].text.strip()
        gaps = _fp32_logit_gaps(hf_model, out.prompt_token_ids, tokens)
        assert gaps.max() <= NEAR_TIE, f"{prompt[:30]!r}: token {int(gaps.argmax())} is {gaps.max():.3f} below the best"
        assert (gaps == 0).float().mean() >= 0.8, f"{prompt[:30]!r}: too few fp32-argmax tokens"
