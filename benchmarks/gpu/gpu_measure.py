"""Measurements for the GPU benchmark: device copy bandwidth, decode rate by difference, the GPU busy
fraction of engine steps (torch.profiler), seeded workloads, and the benchmark model's directory."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared helpers
from common import Workload  # noqa: E402

_WINDOW = "distinfer_bench_window"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, the device idle before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy (best of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    del src, dst
    return 2 * nbytes / best



def random_prompts(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[list[int]]:
    """Random token ids (fresh each call, so no run gets prefix-cache hits from another)."""
    return [rng.integers(100, vocab, size=int(n)).tolist() for n in lengths]


def fixed_workload(rng: np.random.Generator, num: int, prompt_len: int, output_len: int, vocab: int) -> Workload:
    return Workload(random_prompts(rng, [prompt_len] * num, vocab), [output_len] * num)


def sharegpt_like(rng: np.random.Generator, num: int, vocab: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int]) -> Workload:
    """Log-normal prompt and output lengths (long-tailed, as ShareGPT), clipped to the ranges."""
    prompt_lens = np.clip(rng.lognormal(mean=5.3, sigma=0.9, size=num), *prompt_range).astype(int)
    output_lens = np.clip(rng.lognormal(mean=5.0, sigma=0.8, size=num), *output_range).astype(int)
    return Workload(random_prompts(rng, prompt_lens.tolist(), vocab), output_lens.tolist())


def decode_rate(run: Callable[[list[list[int]], int], None], batch: int, prompt_len: int, short: int, long: int,
                vocab: int, rng: np.random.Generator, device: torch.device, repeats: int = 1) -> float:
    """Decode tokens/s without prefill: `batch` prompts generating `long` vs `short` tokens each; the time
    difference is (long - short) decode steps. Fresh prompts per run; an untimed warm-up run of the same
    shape first (first calls of a shape pay one-off costs: kernel selection, allocator growth); best of `repeats`."""
    run(random_prompts(rng, [prompt_len] * batch, vocab), long)
    best = 0.0
    for _ in range(repeats):
        a, b = random_prompts(rng, [prompt_len] * batch, vocab), random_prompts(rng, [prompt_len] * batch, vocab)
        t_short = timed(lambda: run(a, short), device)
        t_long = timed(lambda: run(b, long), device)
        best = max(best, batch * (long - short) / max(t_long - t_short, 1e-9))
    return best


def interval_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        covered += stop - max(start, end)
        end = stop
    return covered


def busy_fraction(step: Callable[[], None], steps: int, device: torch.device) -> dict:
    """Profile `steps` calls of `step`: the union of device kernel intervals over the wall window (from the
    profiler's own clock). Copies (memcpy/memset) are reported apart. None on a device without a trace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function(_WINDOW):
            for _ in range(steps):
                step()
            sync(device)
    events = prof.events()
    window = next(e for e in events if e.name == _WINDOW and e.device_type == DeviceType.CPU)
    start, end = window.time_range.start, window.time_range.end
    device_events = [e for e in events if e.device_type == DeviceType.CUDA and e.name != _WINDOW
                     and not getattr(e, "is_user_annotation", False)]
    clip = [(e.name, max(e.time_range.start, start), min(e.time_range.end, end)) for e in device_events]
    kernels = [(a, b) for name, a, b in clip if b > a and not name.lower().startswith(("memcpy", "memset"))]
    copies = [(a, b) for name, a, b in clip if b > a and name.lower().startswith(("memcpy", "memset"))]
    wall = end - start
    return {"steps": steps, "window_ms": wall / 1e3, "kernel_events": len(kernels),
            "kernel_busy_ms": interval_union(kernels) / 1e3,
            "busy_fraction": interval_union(kernels) / wall if kernels else None,
            "busy_fraction_incl_copies": interval_union(kernels + copies) / wall if kernels else None}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def write_model_dir(path: Path, tokenizer_dir: str, shape: dict) -> Path:
    """config.json for a Llama of `shape` plus the tokenizer files: what load_format="dummy" needs."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(architectures=["LlamaForCausalLM"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, path / name)
    return path
