"""The KV host tier on CUDA: pinned host blocks, copies on a side stream ordered against the compute stream
(a swap-out sees what a kernel just wrote; a kernel right after a swap-in sees the swapped-in block), and the
same bit-exact round trip as on CPU. Needs CUDA."""
from __future__ import annotations

import pytest
import torch

from distinfer.messages import KVBlockCopy, KVCopyDirection
from distinfer.worker.kv_offload import HostKVCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(300),
]

OUT, IN = KVCopyDirection.SWAP_OUT, KVCopyDirection.SWAP_IN
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _caches(dtype: torch.dtype, blocks: int = 64, layers: int = 4) -> list[torch.Tensor]:
    info = torch.iinfo(BITS[dtype])
    return [torch.randint(info.min, info.max, (blocks, 16, 2, 8, 64), dtype=BITS[dtype], device="cuda").view(dtype)
            for _ in range(layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_on_cuda(dtype):
    device = _caches(dtype)
    original = [c.clone() for c in device]
    host = HostKVCache.like(device, 48, pin=True)
    assert host.caches[0].is_pinned()
    perm = torch.randperm(64).tolist()
    host_ids = torch.randperm(48).tolist()[:20]
    src, dst = perm[:20], perm[20:40]
    host.run([KVBlockCopy(OUT, src, host_ids), KVBlockCopy(IN, dst, host_ids[10:] + host_ids[:10])], device)
    torch.cuda.synchronize()
    for layer in range(4):
        expect = original[layer].clone()
        expect[dst] = original[layer][src[10:] + src[:10]]
        assert torch.equal(device[layer].view(BITS[dtype]), expect.view(BITS[dtype]))
        assert torch.equal(host.caches[layer][host_ids].view(BITS[dtype]),
                           original[layer][src].cpu().view(BITS[dtype]))


def test_copies_are_ordered_against_the_compute_stream():
    device = [torch.zeros(8, 16, 2, 8, 64, device="cuda") for _ in range(2)]
    host = HostKVCache.like(device, 4, pin=True)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):  # keep the compute stream busy, then write block 1 at its end
        big = big @ big / 64
    device[0][1].fill_(7.0)
    host.run([KVBlockCopy(OUT, [1], [2]), KVBlockCopy(IN, [5], [2])], device)
    seen = device[0][5].sum()  # on the compute stream: after the swap-in
    assert seen.item() == 7.0 * device[0][5].numel()
    torch.cuda.synchronize()
    assert bool((host.caches[0][2] == 7.0).all())
