"""The KV host tier on every rank of a Ray instance: collective_rpc sizes and builds it, and a request
continues from KV that went to the host and back, split over tp=2 (heads) or pp=2 (layers)."""
from __future__ import annotations

import pytest

from distinfer.errors import EngineDeadError
from tests.unit.test_kv_offload import swap_round_trip, tiny_config

# tests/distributed/conftest.py TINY: 4 layers, 2 KV heads of 16 dims; fp32 blocks of 8 tokens.
FULL_BYTES_PER_BLOCK = 2 * 8 * 2 * 16 * 4 * 4


def _host_shapes(executor) -> list[tuple[int, tuple[int, ...]]]:
    import ray

    def shape(actor) -> tuple[int, tuple[int, ...]]:
        host = actor.worker.runner.host_cache
        return len(host.caches), tuple(host.caches[0].shape)

    return ray.get([w.__ray_call__.remote(shape) for w in executor.workers])


@pytest.mark.parametrize("tp, pp, layers, kv_heads", [(2, 1, 4, 1), (1, 2, 2, 2)])
def test_swap_round_trip_on_every_rank(tp, pp, layers, kv_heads, ray_session, tiny_model_dir):
    from distinfer.executor.ray import RayExecutor

    executor = RayExecutor(tiny_config(tiny_model_dir, tp, pp))
    try:
        executor.initialize_kv_cache(16)
        swap_round_trip(executor, FULL_BYTES_PER_BLOCK)
        assert _host_shapes(executor) == [(layers, (8, 8, 2, kv_heads, 16))] * 2
        with pytest.raises(EngineDeadError, match="execute_method: AttributeError"):
            executor.collective_rpc("no_such_method")
    finally:
        executor.shutdown()
