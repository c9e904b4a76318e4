"""Triton paged attention on CUDA against the float64 reference (the unit module's case builders, with
longer contexts and bigger batches), float32 exactness with TF32 off and on, and a decode captured in a
CUDA graph at a max_seq_len bound and replayed with other lengths and block tables. Needs CUDA.
"""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_triton_attention import (
    DTYPE_IDS,
    DTYPES,
    HEAD_IDS,
    HEADS,
    backend_step,
    check,
    make_case,
    poisoned_out,
    run_decode,
    run_prefill,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_decode_cuda(heads, dtype, tf32_off):
    lens = [3000, 0, 1, 17, 513, 2048, 0, 77] * 3
    case = make_case([1] * len(lens), lens, heads, block_size=16 if heads[2] == 64 else 32, dtype=dtype,
                     device="cuda")
    check(run_decode(case), case, heads[2] ** -0.5)
    case = make_case([1] * 4, [5, 700, 0, 1500], heads, block_size=16, dtype=dtype, device="cuda", seed=1)
    check(run_decode(case, max_seq_len=8192), case, heads[2] ** -0.5)  # a capture bound far above


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_prefill_cuda(heads, dtype, tf32_off):
    # long fresh prompt, long prompt after a long cached prefix over partial blocks, decode rows, empty row
    qlens = [1000, 1, 333, 1, 0, 129]
    lens = [1000, 2500, 333 + 1111, 1, 0, 129 + 5]
    case = make_case(qlens, lens, heads, block_size=32 if heads[2] == 64 else 16, dtype=dtype, device="cuda",
                     seed=2)
    check(run_prefill(case, max_query_len=1024), case, heads[2] ** -0.5)


def test_fp32_is_not_tf32_with_tf32_allowed():
    # the kernels pin input_precision="ieee": exact float32 whatever torch's TF32 switch says
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        case = make_case([1] * 4, [4000, 3, 900, 64], (8, 2, 128), block_size=16, dtype=torch.float32,
                         device="cuda", seed=3)
        check(run_decode(case), case, 128 ** -0.5)
        case = make_case([600, 40], [600, 840], (8, 2, 128), block_size=16, dtype=torch.float32, device="cuda",
                         seed=4)
        check(run_prefill(case), case, 128 ** -0.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_backend_matches_torch_sdpa_cuda(tf32_off):
    # decode rows + a fresh prompt + prompts after cached prefixes over partial blocks; then pure decode
    got, want = backend_step([1, 300, 1, 90, 1], [1200, 300, 17, 90 + 700, 2500], (32, 8, 128), 16, seed=7,
                             device="cuda")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    got, want = backend_step([1] * 6, [3000, 5, 64, 1, 700, 2049], (8, 2, 64), 32, seed=8, device="cuda")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_decode_cuda_graph_replay(tf32_off):
    """Captured once at a max_seq_len bound; replays with other lengths, tables and queries match."""
    from distinfer.model.kernels import triton_attention as ta

    heads, bs, bound = (16, 2, 64), 16, 4096
    lens_a, lens_b = [1000, 0, 3, 2047], [0, 4000, 250, 1]
    case_a = make_case([1] * 4, lens_a, heads, bs, torch.bfloat16, device="cuda", seed=5)
    case_b = make_case([1] * 4, lens_b, heads, bs, torch.bfloat16, device="cuda", seed=6)
    width = max(case_a.block_tables.shape[1], case_b.block_tables.shape[1])
    cache = torch.full((max(c.kv_cache.shape[0] for c in (case_a, case_b)),) + case_a.kv_cache.shape[1:],
                       float("nan"), dtype=torch.bfloat16, device="cuda")
    q, kv = case_a.q.clone(), case_a.kv.clone()
    tables = torch.zeros(4, width, dtype=torch.int32, device="cuda")
    seq_lens, slots = torch.zeros(4, dtype=torch.int32, device="cuda"), case_a.slot_mapping.clone()
    out = poisoned_out(case_a)

    def step() -> None:
        ta.write_kv(cache, kv, slots)
        ta.paged_decode_attention(q, cache, tables, seq_lens, 0.125, bound, out=out)

    def load(case) -> None:
        cache[: case.kv_cache.shape[0]].copy_(case.kv_cache)
        tables.zero_()
        tables[:, : case.block_tables.shape[1]] = case.block_tables
        for dst, src in ((q, case.q), (kv, case.kv), (seq_lens, case.seq_lens_t), (slots, case.slot_mapping)):
            dst.copy_(src)

    load(case_a)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for case in (case_b, case_a):
        load(case)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        case.kv_cache = cache[: case.kv_cache.shape[0]]
        check(out, case, 0.125)
