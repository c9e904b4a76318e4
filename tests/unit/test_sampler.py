"""Sampler: greedy, penalties, min_tokens, truncation support, seeding, temperature, logprobs."""
from __future__ import annotations

import pytest
import torch

from distinfer.sampling_params import SamplingParams
from distinfer.worker.sampler import Sampler, SamplingRow, apply_penalties_, make_generator, sample_inverse_cdf, top_p_threshold

V = 16


def row(params: SamplingParams | None = None, prompt: list[int] | None = None, output: list[int] | None = None) -> SamplingRow:
    params = params or SamplingParams(temperature=0.0)
    return SamplingRow(params, prompt or [], output or [], make_generator(params.seed))


def test_greedy_equals_argmax_first_max_on_ties() -> None:
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    logits[3, 2] = logits[3, 9] = 100.0  # tie: the first index wins, like torch/HF
    before = logits.clone()
    out = Sampler()(logits, [row() for _ in range(8)])
    tokens, logprobs = out.token_ids, out.logprobs
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[3] == 2
    assert logprobs == [None] * 8
    assert torch.equal(logits, before)  # input untouched


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0], [2.0, -2.0, 2.0, -2.0, 1.0]])
    rows = [row(SamplingParams(repetition_penalty=2.0), prompt=[0, 0], output=[1, 1]), row(prompt=[2], output=[3])]
    apply_penalties_(logits, rows)
    # row 0: tokens 0 (prompt) and 1 (output) penalised once each; 2, 3, 4 unseen. Row 1: no penalty.
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0], [2.0, -2.0, 2.0, -2.0, 1.0]]


def test_frequency_and_presence_penalties_use_output_tokens_only() -> None:
    logits = torch.zeros(1, 5)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties_(logits, [row(params, prompt=[3, 3, 4], output=[0, 0, 0, 1])])
    assert logits[0].tolist() == pytest.approx([-1.75, -0.75, 0.0, 0.0, 0.0])


def test_penalties_change_greedy_choice_only_for_their_row() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]] * 2)
    rows = [row(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[0]), row()]
    tokens = Sampler()(logits, rows).token_ids
    assert tokens == [1, 0]


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]] * 4)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2], eos_token_ids=[1])
    ignore_eos = SamplingParams(temperature=0.0, min_tokens=2, eos_token_ids=[1], ignore_eos=True)
    rows = [row(params, output=[4]), row(params, output=[4, 4]), row(ignore_eos), row()]
    tokens = Sampler()(logits, rows).token_ids
    assert tokens == [3, 1, 1, 1]  # masks eos and stop ids; lifted at min_tokens; ignore_eos: eos allowed


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 4000, seed: int = 0) -> torch.Tensor:
    tokens = Sampler(seed)(logits.expand(n, -1).contiguous(), [row(params) for _ in range(n)]).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1])


LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5])


def test_top_k_keeps_only_k_most_likely() -> None:
    counts = _draws(SamplingParams(top_k=3), LOGITS)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1, 2}


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = LOGITS.softmax(-1)  # cumulative: 0.37, 0.60, 0.73, 0.81, ...
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    counts = _draws(SamplingParams(top_p=0.7), LOGITS)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1, 2}


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    # p_i / p_max = exp(-0.5 i): 1, .61, .37, .22, .14 -> min_p 0.3 keeps tokens 0..2
    counts = _draws(SamplingParams(min_p=0.3), LOGITS)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1, 2}


def test_top_k_and_top_p_combine() -> None:
    counts = _draws(SamplingParams(top_k=2, top_p=0.99), LOGITS)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scaling_matches_softmax(temperature: float) -> None:
    n = 20000
    counts = _draws(SamplingParams(temperature=temperature), LOGITS, n=n)
    expected = (LOGITS / temperature).softmax(-1)
    assert torch.allclose(counts / n, expected, atol=0.015)


def _run_steps(sampler: Sampler, rows: list[SamplingRow], target: int, logits: list[torch.Tensor]) -> list[int]:
    out = []
    for step_logits in logits:
        tokens = sampler(step_logits, rows).token_ids
        out.append(tokens[target])
    return out


def test_seeded_rows_reproducible_and_batch_independent() -> None:
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(V, generator=gen) for _ in range(6)]
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = _run_steps(Sampler(0), [row(params)], 0, [b.unsqueeze(0) for b in base])
    again = _run_steps(Sampler(99), [row(params)], 0, [b.unsqueeze(0) for b in base])
    assert alone == again
    # Same seed among other rows (random, seeded, greedy), at a different position, other sampler seed.
    others = [row(SamplingParams(temperature=1.0)), row(SamplingParams(temperature=0.7, seed=5)), row()]
    rows = others[:2] + [row(params)] + others[2:]
    batched = [torch.stack([torch.randn(V, generator=gen), torch.randn(V, generator=gen), b, torch.randn(V, generator=gen)]) for b in base]
    assert _run_steps(Sampler(7), rows, 2, batched) == alone
    different = _run_steps(Sampler(0), [row(SamplingParams(temperature=1.0, seed=4321))], 0, [b.unsqueeze(0) for b in base])
    assert len(set(alone)) > 1 and different != alone


def test_logprobs_from_raw_logits_with_ranks() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=5.0), prompt=list(range(V))),
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=1.0, logprobs=0, seed=0)),
    ]
    out = Sampler()(logits, rows)
    tokens, logprobs = out.token_ids, out.logprobs
    ref = logits.log_softmax(-1)
    assert logprobs[1] is None
    lp0, lp2 = logprobs[0], logprobs[2]
    assert lp0 is not None and lp2 is not None
    top = ref[0].topk(3)
    assert lp0.top_token_ids == top.indices.tolist()
    assert lp0.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
    for i, lp in ((0, lp0), (2, lp2)):
        assert lp.sampled_token_id == tokens[i]
        assert lp.sampled_logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-6)
        assert lp.sampled_rank == int((ref[i] > ref[i, tokens[i]]).sum()) + 1
    assert lp2.top_token_ids == [] and lp2.top_logprobs == []


def test_greedy_batch_of_128_full_vocab() -> None:
    logits = torch.randn(128, 49152)
    sampler, rows = Sampler(), [row() for _ in range(128)]
    tokens = sampler(logits, rows).token_ids
    assert tokens == logits.argmax(-1).tolist()


def _sorted_top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference nucleus by a full sort (vLLM's formulation): keep where ascending cumsum > 1 - p."""
    values, idx = logits.sort(descending=False)
    drop = values.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[-1] = False
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[idx[drop]] = False
    return keep


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat (full-vocab search) to peaked (first top-k)
def test_top_p_threshold_matches_sorted_reference(scale: float) -> None:
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(1)) * scale
    top_p = torch.tensor([0.5, 0.9, 0.99, 1.0])
    keep = logits >= top_p_threshold(logits, top_p)
    for i, p in enumerate(top_p.tolist()):
        ref = _sorted_top_p_keep(logits[i], p)
        assert (keep[i] != ref).sum() <= 1, (i, int(keep[i].sum()), int(ref.sum()))  # float32 edge rounding
    assert keep[3].all()


def test_inverse_cdf_never_picks_zero_probability_tokens() -> None:
    vocab = 3000  # three blocks of 1024, the last one padded
    probs = torch.zeros(4, vocab)
    probs[:, [5, 1023, 1024, 2999]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    extremes = torch.tensor([0.0, 1.0 - 2**-53, 0.15, 0.35], dtype=torch.float64)
    assert sample_inverse_cdf(probs, extremes)[0].tolist() == [5, 2999, 1023, 1024]
    draws, _ = sample_inverse_cdf(probs[:1].expand(20000, -1), torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=vocab)[[5, 1023, 1024, 2999]] / 20000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015)
