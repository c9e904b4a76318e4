"""Sampler: logits of the rows that sample this step -> token ids (+ logprobs).

vLLM semantics and order: repetition / frequency / presence penalties, min_tokens masking of stop ids,
then greedy argmax, or temperature -> top-k -> top-p -> min-p -> sampling. Random rows sample by
inverse CDF with one uniform draw per row (exact categorical sampling); a seeded row draws it from
its own generator only, so its tokens do not depend on the rest of the batch or its position.
Logprobs come from the raw logits (before penalties and temperature), like vLLM's default.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from distinfer.messages import TokenLogprobs
from distinfer.sampling_params import SamplingParams, SamplingType

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
_TOP_P_FIRST_K, _TOP_P_GROWTH = 256, 16  # nucleus search: top-256, top-4096, then the vocab
_CDF_BLOCK = 1024  # tokens per block in the two-level inverse CDF


@dataclass
class SamplingRow:
    """One request that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step
    generator: torch.Generator | None  # per-request, from make_generator(params.seed)


@dataclass
class SamplerOutput:
    """One token per row, logprobs where asked, and the rows that could not be sampled: their requests
    end with an error while the other rows of the batch go on."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: dict[int, str] = field(default_factory=dict)  # row index -> reason, safe to show the client


NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"
SAMPLING_FAILED = "internal error while sampling (details are in the server log)"


def make_generator(seed: int | None) -> torch.Generator | None:
    """The per-request generator for a seeded request (None when unseeded). Always a CPU generator:
    its draws are copied to the logits' device, so a seed gives the same draws on every device."""
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def generator_state_after(seed: int, num_draws: int) -> bytes:
    """The state of a seeded request's generator after `num_draws` draws (one per token sampled with
    temperature > 0, as Sampler draws them): what a request resumed from its tokens alone continues from."""
    generator = make_generator(seed)
    for _ in range(num_draws):
        torch.rand(1, dtype=torch.float64, generator=generator)
    return generator.get_state().numpy().tobytes()


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _flat_keys(lists: list[list[int]], row_ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """row * vocab + token for every token of every listed row (indices into logits.view(-1))."""
    tokens = torch.tensor([t for lst in lists for t in lst], dtype=torch.long, device=device)
    lengths = torch.tensor([len(lst) for lst in lists], device=device)
    return torch.tensor(row_ids, dtype=torch.long, device=device).repeat_interleave(lengths) * vocab + tokens


def apply_penalties_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place, vLLM-style: repetition penalty on prompt + output tokens (positive logits divided,
    negative multiplied), then frequency (x count) and presence penalties on output tokens only.

    Sparse: only the logits of tokens that occurred are touched. logits must be contiguous.
    """
    vocab, device = logits.shape[1], logits.device
    flat = logits.view(-1)
    ids = [i for i, r in enumerate(rows) if _has_penalties(r.params)]
    out_keys = _flat_keys([rows[i].output_token_ids for i in ids], ids, vocab, device)
    rep_ids = [i for i in ids if rows[i].params.repetition_penalty != 1.0]
    if rep_ids:
        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)
        prompt_keys = _flat_keys([rows[i].prompt_token_ids for i in rep_ids], rep_ids, vocab, device)
        seen = torch.cat([prompt_keys, out_keys]).unique()
        seen = seen[rep[seen // vocab] != 1.0]
        values, penalty = flat[seen], rep[seen // vocab]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if out_keys.numel():
        keys, counts = out_keys.unique(return_counts=True)
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)
        presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)
        row = keys // vocab
        flat[keys] -= freq[row] * counts + presence[row]


def _min_tokens_mask(rows: list[SamplingRow], vocab: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs to set to -inf: stop ids of rows still below min_tokens."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            stop_ids = [t for t in row.params.all_stop_token_ids if t < vocab]  # ids past the vocab never occur
            row_idx.extend([i] * len(stop_ids))
            tok_idx.extend(stop_ids)
    return row_idx, tok_idx


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask all but the top_k[i] largest logits of row i (ties with the k-th are kept)."""
    kth = logits.topk(int(top_k.max()), dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p_threshold(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, 1] logit threshold of the nucleus: tokens kept while the mass before them is < top_p.

    A full sort of the vocabulary is slow; the nucleus usually lies within the top few hundred
    tokens, so look at a growing top-k until it covers top_p for every row. Rows with top_p = 1
    get -inf (keep everything); ties at the edge are kept.
    """
    vocab = logits.shape[-1]
    lse = logits.logsumexp(dim=-1, keepdim=True)
    k = min(_TOP_P_FIRST_K, vocab)
    while True:
        values = logits.topk(k, dim=-1).values  # descending
        probs = (values - lse).exp()
        cum_mass = probs.cumsum(dim=-1)
        if k == vocab or bool(((cum_mass[:, -1] >= top_p) | (top_p >= 1.0)).all()):
            break
        k = min(k * _TOP_P_GROWTH, vocab)
    num_kept = (cum_mass - probs < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = values.gather(1, num_kept - 1)
    return threshold.masked_fill((top_p >= 1.0).unsqueeze(1), _NEG_INF)


def min_p_threshold(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[R, 1] logit threshold for min-p: p < min_p * p_max  <=>  logit < max_logit + log(min_p)."""
    return logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact categorical sampling, one U[0,1) per row: first token whose CDF exceeds u * total.

    Two levels keep it cheap and precise: float64 CDF over block sums picks a block, then a
    float64 CDF inside that block picks the token. A token with zero probability is never chosen.
    Returns (tokens, ok): a row whose mass is not finite and positive (NaN from non-finite logits) is
    sampled from a uniform stand-in so the batch never indexes out of range, and reported not ok.
    """
    rows, vocab = probs.shape
    pad = (-vocab) % _CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(rows, -1, _CDF_BLOCK)
    block_mass = blocks.sum(dim=-1).double()
    total_mass = block_mass.sum(dim=-1)
    ok = torch.isfinite(total_mass) & (total_mass > 0)
    if not bool(ok.all()):
        blocks = torch.where(ok.view(rows, 1, 1), blocks, torch.ones_like(blocks))
        block_mass = blocks.sum(dim=-1).double()
    block_cdf = block_mass.cumsum(dim=-1)
    v = torch.minimum(u.unsqueeze(1) * block_cdf[:, -1:], _just_below(block_cdf[:, -1:]))
    block = torch.searchsorted(block_cdf, v, right=True)  # first block with cdf > v: positive mass
    mass = block_mass.gather(1, block)
    frac = (v - (block_cdf.gather(1, block) - mass)) / mass  # where v falls inside the block, in [0, 1)
    inner_cdf = blocks[torch.arange(rows, device=probs.device), block.squeeze(1)].double().cumsum(dim=-1)
    total = inner_cdf[:, -1:]
    v_inner = torch.minimum(frac.clamp_min(0.0) * total, _just_below(total))
    token = torch.searchsorted(inner_cdf, v_inner, right=True)
    return (block * _CDF_BLOCK + token).squeeze(1), ok


def _just_below(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.zeros_like(x))


class Sampler:
    """Samples one token per row. Unseeded random rows share this sampler's generator.

    A row whose logits are not finite ends its request with an error; an unexpected exception while
    sampling the batch is retried row by row, with the same random draws, so only the failing row ends.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generator = make_generator(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [len(rows), vocab]."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        u = self._uniforms(rows)  # drawn first: a row-by-row retry reuses them, so seeds stay reproducible
        try:
            return self._sample(logits, rows, u)
        except Exception:
            logger.exception("sampling a batch of %d rows failed; sampling its rows one by one", len(rows))
        output = SamplerOutput([0] * len(rows), [None] * len(rows))
        for i, row in enumerate(rows):
            try:
                alone = self._sample(logits[i:i + 1], [row], u[i:i + 1])
            except Exception:
                logger.exception("sampling row %d failed", i)
                output.errors[i] = SAMPLING_FAILED
                continue
            output.token_ids[i], output.logprobs[i] = alone.token_ids[0], alone.logprobs[0]
            if alone.errors:
                output.errors[i] = alone.errors[0]
        return output

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], u: torch.Tensor) -> SamplerOutput:
        raw_logits = logits
        logits = self._process_logits(logits.float(), rows)
        best, token_ids_t = logits.max(dim=-1)  # the first max, as argmax; NaN and +inf propagate to `best`
        bad = ~torch.isfinite(best)
        random_rows = [i for i, r in enumerate(rows) if r.params.sampling_type != SamplingType.GREEDY]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            random_logits = logits if len(random_rows) == len(rows) else logits[index]
            sampled, ok = self._sample_random(random_logits, [rows[i] for i in random_rows], u[random_rows])
            token_ids_t = token_ids_t.index_copy(0, index, sampled)
            bad[index] |= ~ok
        token_ids, bad_rows = torch.stack((token_ids_t, bad.long())).tolist()  # the step's one device->host read
        errors = {i: NON_FINITE_LOGITS for i, is_bad in enumerate(bad_rows) if is_bad}
        return SamplerOutput(token_ids, self._logprobs(raw_logits, rows, token_ids, errors), errors)

    def _process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Penalties and min_tokens masking; returns logits untouched when no row needs them."""
        penalty_rows = [i for i, r in enumerate(rows) if _has_penalties(r.params)]
        mask_rows, mask_toks = _min_tokens_mask(rows, logits.shape[1])
        if not penalty_rows and not mask_rows:
            return logits
        logits = logits.clone(memory_format=torch.contiguous_format)
        if penalty_rows:
            apply_penalties_(logits, rows)
        if mask_rows:
            logits[mask_rows, mask_toks] = _NEG_INF
        return logits

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow], u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, top-k, top-p, min-p, then one inverse-CDF draw per row: (tokens, row ok)."""
        device, vocab = logits.device, logits.shape[1]
        temps = torch.tensor([r.params.temperature for r in rows], device=device)
        logits = logits / temps.unsqueeze(1)
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        top_p = [r.params.top_p for r in rows]
        k_tensor = torch.tensor(top_k, device=device) if min(top_k) < vocab else None
        if k_tensor is not None:
            logits = apply_top_k(logits, k_tensor)
        # top-p (on the top-k distribution) and min-p both keep a prefix of the most likely tokens.
        thresholds = []
        if min(top_p) < 1.0:
            thresholds.append(top_p_threshold(logits, torch.tensor(top_p, device=device)))
        min_p = [r.params.min_p for r in rows]
        if max(min_p) > 0.0:
            thresholds.append(min_p_threshold(logits, torch.tensor(min_p, device=device)))
        if thresholds:
            logits = logits.masked_fill(logits < torch.cat(thresholds, dim=1).amax(dim=1, keepdim=True), _NEG_INF)
        probs = logits.softmax(dim=-1)
        return sample_inverse_cdf(probs, u.to(device))

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """One U[0, 1) float64 per row, on the CPU (greedy rows: 0): seeded rows from their own
        generator, unseeded random rows from ours."""
        u = torch.zeros(len(rows), dtype=torch.float64)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None and r.params.sampling_type != SamplingType.GREEDY]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self._generator)
        for i, row in enumerate(rows):
            if row.generator is not None and row.params.sampling_type != SamplingType.GREEDY:
                u[i] = torch.rand(1, dtype=torch.float64, generator=row.generator)[0]
        return u

    def _logprobs(self, raw_logits: torch.Tensor, rows: list[SamplingRow], token_ids: list[int],
                  errors: dict[int, str]) -> list[TokenLogprobs | None]:
        """Raw-logit logprobs of the sampled token (value, 1-based rank) and the top-N tokens."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None and i not in errors]
        result: list[TokenLogprobs | None] = [None] * len(rows)
        if not want:
            return result
        logprobs = raw_logits[want].float().log_softmax(dim=-1)
        sampled = torch.tensor([token_ids[i] for i in want], device=logprobs.device).unsqueeze(1)
        sampled_lp = logprobs.gather(1, sampled)
        ranks = (logprobs >= sampled_lp).sum(dim=-1, dtype=torch.int32).tolist()
        top_n = max(rows[i].params.logprobs or 0 for i in want)
        top_lp, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], sampled[:, :0])
        top_lp_l, top_ids_l, sampled_l = top_lp.tolist(), top_ids.tolist(), sampled_lp.squeeze(1).tolist()
        for j, i in enumerate(want):
            n = rows[i].params.logprobs or 0
            result[i] = TokenLogprobs(token_ids[i], sampled_l[j], ranks[j], top_ids_l[j][:n], top_lp_l[j][:n])
        return result
