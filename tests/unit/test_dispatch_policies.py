"""Dispatch policies on hand-built loads, the summed stats, and the edge checks of the router options
(CLI, ServeOptions, the Serve app's args, RouterConfig). No Ray is started here."""
from __future__ import annotations

import pytest

from distinfer.messages import EngineStats
from distinfer.router.policies import (
    DispatchRequest,
    InstanceView,
    LeastLoadPolicy,
    RoundRobinPolicy,
    dispatch_policy_names,
    make_dispatch_policy,
)
from distinfer.router.stats import InstanceLoad, sum_stats

REQUEST = DispatchRequest(num_prompt_tokens=16)


def load(instance_id: str, free: int = 100, total: int = 100, queued: int = 0, running: int = 0, waiting: int = 0,
         draining: bool = False, head: tuple[str, int] | None = None) -> InstanceLoad:
    head_id, head_blocks = head or (None, 0)
    return InstanceLoad(instance_id, free, total, 0, 0, running, waiting, queued, 0, block_size=16,
                        reported_at=0.0, draining=draining, head_waiting_id=head_id, head_waiting_blocks=head_blocks)


def view(instance_id: str, **kwargs) -> InstanceView:
    names = ("unreported_tokens", "unreported_requests", "in_flight_by_priority", "movable")
    extra = {k: kwargs.pop(k) for k in names if k in kwargs}
    return InstanceView(load(instance_id, **kwargs), **extra)


def test_registry_names_and_unknown_policy():
    assert dispatch_policy_names() == ["least_load", "round_robin"]
    assert isinstance(make_dispatch_policy("least_load"), LeastLoadPolicy)
    assert isinstance(make_dispatch_policy("round_robin"), RoundRobinPolicy)
    with pytest.raises(ValueError, match="unknown dispatch policy 'random'; known: least_load, round_robin"):
        make_dispatch_policy("random")
    with pytest.raises(ValueError, match="headroom"):
        LeastLoadPolicy(headroom=1.5)


def test_virtual_usage_counts_used_blocks_and_queued_demand():
    policy = LeastLoadPolicy()
    # 40 used + ceil((100 queued + 60 unreported) / 16) = 10 blocks of demand -> 50 / 100
    assert policy.virtual_usage(view("a", free=60, queued=100, unreported_tokens=60)) == pytest.approx(0.5)
    # fewer blocks used but a long queue: a's virtual usage (30 + 32) is above b's (50 + 0)
    views = [view("a", free=70, queued=512), view("b", free=50)]
    assert policy.pick(views, REQUEST) == "b"
    assert policy.pick([view("a", free=70), view("b", free=50)], REQUEST) == "a"


def test_least_load_spreads_a_burst_between_reports():
    """Dispatches the router made since the last reports count as queued tokens: a burst of equal
    requests alternates over two idle instances instead of piling onto the first."""
    policy = LeastLoadPolicy()
    unreported = {"a": 0, "b": 0}
    picks = []
    for _ in range(6):
        views = [view(i, unreported_tokens=n, unreported_requests=n // 16) for i, n in unreported.items()]
        chosen = policy.pick(views, REQUEST)
        unreported[chosen] += REQUEST.num_prompt_tokens
        picks.append(chosen)
    assert picks == ["a", "b", "a", "b", "a", "b"]


def test_least_load_ties_go_to_fewer_requests_then_router_order():
    policy = LeastLoadPolicy()
    assert policy.pick([view("a", running=3), view("b", running=1)], REQUEST) == "b"
    assert policy.pick([view("b"), view("a")], REQUEST) == "b"


def test_high_priority_requests_in_flight_reserve_headroom():
    """A request of priority below 0 in flight on `a` adds headroom x total blocks (0.1 x 100 = 10) to a's
    virtual usage: new requests go to `b` although `b` uses 5 blocks more; a default-priority request
    in flight reserves nothing."""
    policy = LeastLoadPolicy(headroom=0.1)
    a_high = view("a", free=90, in_flight_by_priority={-1: 1, 0: 2})
    b = view("b", free=85, in_flight_by_priority={0: 3})
    assert policy.virtual_usage(a_high) == pytest.approx(0.2)
    assert policy.pick([a_high, b], REQUEST) == "b"
    a_normal = view("a", free=90, in_flight_by_priority={0: 3})
    assert policy.pick([a_normal, b], REQUEST) == "a"
    # the threshold is the policy's: with high_priority_below=-1 a priority -1 request is not high
    assert LeastLoadPolicy(headroom=0.1, high_priority_below=-1).pick([a_high, b], REQUEST) == "a"


def test_round_robin_alternates_and_skips_instances_that_left():
    policy = make_dispatch_policy("round_robin")
    views = [view("a", free=0), view("b"), view("c")]  # load is ignored
    assert [policy.pick(views, REQUEST) for _ in range(4)] == ["a", "b", "c", "a"]
    assert policy.pick([view("a"), view("c")], REQUEST) == "c"  # b left: the next after a is c
    assert policy.pick([view("a"), view("b")], REQUEST) == "a"  # the last pick (c) left: from the start
    with pytest.raises(ValueError):
        policy.pick([], REQUEST)


def test_sum_stats_adds_counts_and_recomputes_usage():
    a = EngineStats(2, 1, 0.5, 50, 100, 10, 4, 1, host_kv_cache_usage=0.25, num_host_blocks=40,
                    num_free_host_blocks=30, num_queued_tokens=7, kv_bytes_to_host=100)
    b = EngineStats(1, 0, 0.0, 300, 300, 5, 5, 0, num_queued_tokens=3)
    total = sum_stats([a, b])
    assert (total.num_running, total.num_waiting, total.num_free_blocks, total.num_total_blocks) == (3, 1, 350, 400)
    assert (total.prefix_cache_queries, total.prefix_cache_hits, total.num_preemptions) == (15, 9, 1)
    assert (total.num_queued_tokens, total.kv_bytes_to_host, total.num_host_blocks) == (10, 100, 40)
    assert total.kv_cache_usage == pytest.approx(50 / 400)
    assert total.host_kv_cache_usage == pytest.approx(10 / 40)
    assert sum_stats([]).num_total_blocks == 0 and sum_stats([]).kv_cache_usage == 0.0


def test_instance_load_from_engine_stats():
    stats = EngineStats(2, 3, 0.4, 60, 100, 0, 0, 5, num_host_blocks=8, num_free_host_blocks=6, num_queued_tokens=70)
    got = InstanceLoad.from_stats("i0", stats, block_size=16, draining=True, reported_at=12.0)
    assert got == InstanceLoad("i0", 60, 100, 6, 8, 2, 3, 70, 5, 16, 12.0, True)
    assert got.num_used_blocks == 40 and got.stats is stats


def test_router_options_are_checked_at_the_edge():
    from distinfer.cli import build_parser
    from distinfer.router.router import RouterConfig
    from distinfer.serving.ray_serve import (
        ServeAppArgs,
        placement_bundles,
        replica_actor_options,
    )
    from distinfer.serving.server import ServeOptions

    with pytest.raises(ValueError, match=r"instances.*>= 1"):
        ServeOptions(num_instances=0)
    with pytest.raises(ValueError, match="needs more than one instance"):
        ServeOptions(dispatch_policy="round_robin")
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        ServeOptions(num_instances=2, dispatch_policy="random")
    assert ServeOptions(num_instances=3, dispatch_policy="round_robin").num_instances == 3
    with pytest.raises(SystemExit):  # argparse: an unknown policy name is a usage error
        build_parser().parse_args(["serve", "--instances", "2", "--dispatch-policy", "random"])
    args = build_parser().parse_args(["serve", "--instances", "2", "--dispatch-policy", "round_robin"])
    assert (args.instances, args.dispatch_policy) == (2, "round_robin")
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="num_instances"):
            RouterConfig(num_instances=bad)
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        RouterConfig(dispatch_policy="fastest")
    with pytest.raises(ValueError, match="num_instances"):
        ServeAppArgs.model_validate({"num_instances": 0})
    with pytest.raises(ValueError, match="needs more than one instance"):
        ServeAppArgs.model_validate({"dispatch_policy": "least_load"})
    # several instances: the replica reserves only its CPU; each instance reserves its own resources
    routed = ServeAppArgs.model_validate({"num_instances": 2, "tensor_parallel_size": 2, "device": "cuda"})
    assert placement_bundles(routed) is None and replica_actor_options(routed) == {"num_cpus": 1}
