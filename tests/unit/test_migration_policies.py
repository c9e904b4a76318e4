"""Migration triggers (router/rebalance.py) on hand-built loads: balance moves from the most to the least
loaded instance only when the gap is large; defrag frees room for a queued request that does not fit."""
from __future__ import annotations

import pytest

from distinfer.router.rebalance import BalancePolicy, DefragPolicy, Move, make_migration_policy, migration_policy_names
from distinfer.router.policies import InstanceView, RequestView
from tests.unit.test_dispatch_policies import view


def test_registry():
    assert migration_policy_names() == ["balance", "defrag", "none"]
    assert make_migration_policy("none").plan([view("a", free=0, running=5), view("b")]) == []
    with pytest.raises(ValueError, match="unknown migration policy 'shuffle'; known: balance, defrag, none"):
        make_migration_policy("shuffle")
    with pytest.raises(ValueError, match="gap"):
        BalancePolicy(gap=0)


def requests(*sizes: int, started: bool = True, prefix: str = "r") -> tuple[RequestView, ...]:
    """Requests of these many tokens each (ids r0, r1, ...)."""
    return tuple(RequestView(f"{prefix}{i}", n, started) for i, n in enumerate(sizes))


def test_balance_moves_the_largest_request_that_does_not_reverse_the_gap():
    policy = BalancePolicy(gap=0.3)
    # c: 90 of 100 blocks used, b: 10; the gap (0.8) allows moving up to 40 blocks (640 tokens)
    views = [view("a", free=40, movable=requests(320, 320, 320)), view("b", free=90, movable=requests(160)),
             view("c", free=10, movable=requests(160, 600, 800, 480))]
    assert policy.plan(views) == [Move("c", "b", "r1")]  # 600 tokens = 38 blocks; r2 (50 blocks) would bounce
    assert policy.plan([view("a", free=60, movable=requests(320, 320)), view("b", free=80, movable=requests(160))]) \
        == []  # gap 0.2
    # one request bigger than the gap allows: moving it would only move the imbalance, so nothing moves
    assert policy.plan([view("a", free=0, movable=requests(1600)), view("b")]) == []
    # queued demand counts: 60 blocks of queued tokens make "a" (0.65) the loaded one, not "b" (0.1)
    queued = requests(320, 320, 320, started=False, prefix="q")  # 20 blocks each: one may move (gap 0.55)
    assert policy.plan([view("a", free=95, waiting=3, queued=960, movable=queued),
                        view("b", free=90, movable=requests(80))]) == [Move("a", "b", "q0")]
    assert policy.plan([view("a")]) == []


def blocked(free: int = 5, head_blocks: int = 20, **kwargs) -> InstanceView:
    """Instance "a": its first waiting request (q0, 320 tokens) needs `head_blocks`, it has `free`."""
    running = kwargs.pop("running_sizes", (64, 400, 900))
    return view("a", free=free, running=len(running), waiting=1, queued=320, head=("q0", head_blocks),
                movable=requests(*running) + requests(320, started=False, prefix="q"), **kwargs)


def test_defrag_hands_the_blocked_request_to_an_instance_where_it_starts_at_once():
    policy = DefragPolicy()
    assert policy.plan([blocked(), view("b", free=50, running=1)]) == [Move("a", "b", "q0")]
    assert policy.plan([blocked(free=30), view("b", free=50)]) == []  # it fits where it is
    assert policy.plan([blocked(), view("b", free=50, waiting=1, queued=16)]) == []  # b has its own queue


def test_defrag_moves_out_the_smallest_running_request_that_makes_room():
    policy = DefragPolicy()
    # b has room for 15 blocks: not for q0 (20); a is 15 short: r1 (400 tokens, 25 blocks) would make room but
    # does not fit b, and r0 (4 blocks) is too small
    assert policy.plan([blocked(), view("b", free=15, running=1)]) == []
    # q0 needs 28 (b has 27): r1 makes room (a is 23 short) and fits b
    assert policy.plan([blocked(head_blocks=28), view("b", free=27)]) == [Move("a", "b", "r1")]
    assert policy.plan([blocked(head_blocks=8), view("b", free=6)]) == [Move("a", "b", "r0")]  # 3 short: r0 frees 4


def test_router_options_at_the_edge():
    """`distinfer serve` / the Serve app's args: the prefill/decode split, the migration policy and transport
    are checked before anything starts."""
    from distinfer.serving.ray_serve import ServeAppArgs
    from distinfer.serving.server import ServeOptions

    options = ServeOptions(prefill_instances=1, decode_instances=2, migration_policy="balance",
                           migration_transport="p2p")
    assert options.router_kwargs == dict(num_instances=3, dispatch_policy=None, prefill_instances=1,
                                         decode_instances=2, migration_policy="balance", migration_transport="p2p")
    for bad, message in [(dict(prefill_instances=1), "1 prefill and >= 1 decode"),
                         (dict(num_instances=2, prefill_instances=1, decode_instances=2), "does not match"),
                         (dict(migration_policy="balance"), "more than one instance"),
                         (dict(num_instances=2, migration_policy="shuffle"), "unknown migration policy"),
                         (dict(num_instances=2, migration_transport="pigeon"), "unknown migration transport")]:
        with pytest.raises(ValueError, match=message):
            ServeOptions(**bad)
    assert ServeAppArgs(prefill_instances=1, decode_instances=1).num_instances == 2
    with pytest.raises(ValueError, match="1 prefill"):
        ServeAppArgs(prefill_instances=0, decode_instances=2)
