"""Distributed tests: real Ray actors and real gloo process groups on CPU, no mocks.

One local Ray instance (on 127.0.0.1, with more logical CPUs than cores, so tp=2 x pp=2 places
on a 2-core machine) is shared by the whole session; every test leaves no worker actor and no
placement group behind, which `_no_leftovers` checks after each test that used Ray.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_llama

# Tiny but not trivial: 4 heads / 2 KV heads split over tp=2, 4 layers split over pp=2, the real
# tokenizer's vocabulary (49152) so text prompts and detokenization work as on the real model.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)
RAY_LOGICAL_CPUS = 8
TEST_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    """A random Llama saved as safetensors, with the default model's tokenizer."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")), default_model_dir, **TINY)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ray_session():
    """The local Ray every in-process distributed engine of this session attaches to."""
    import ray

    from distinfer.executor.ray import ensure_ray

    ensure_ray(world_size=RAY_LOGICAL_CPUS - 1)  # a logical CPU per rank; more than enough bundles
    yield ray
    ray.shutdown()


def live_workers() -> list[dict]:
    """distinfer worker actors that are not dead, from the GCS (works without the dashboard)."""
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == "RayWorker" and a["State"] != "DEAD"]


def live_placement_groups() -> list[dict]:
    import ray

    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def wait_released(timeout_s: float = 15.0) -> tuple[list[dict], list[dict]]:
    """Live workers and placement groups left once Ray has processed the kills (a few ms normally)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers, groups = live_workers(), live_placement_groups()
        if (not workers and not groups) or time.monotonic() > deadline:
            return workers, groups
        time.sleep(0.1)


def pytest_collection_modifyitems(items) -> None:
    """A hang (e.g. a collective that never completes) fails its test instead of the whole run."""
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _no_leftovers(request):
    yield
    if "ray_session" not in request.fixturenames:
        return
    workers, groups = wait_released()
    assert not workers, f"worker actors left behind: {[(w['ActorID'], w['State']) for w in workers]}"
    assert not groups, f"placement groups left behind: {[g['placement_group_id'] for g in groups]}"
