"""Migration triggers (router/rebalance.py) on hand-built loads: balance moves from the most to the least
loaded instance only when the gap is large; defrag frees room for a queued request that does not fit."""
from __future__ import annotations

import pytest

from distinfer.router.rebalance import BalancePolicy, DefragPolicy, Move, make_migration_policy, migration_policy_names
from tests.unit.test_dispatch_policies import view


def test_registry():
    assert migration_policy_names() == ["balance", "defrag", "none"]
    assert make_migration_policy("none").plan([view("a", free=0, running=5), view("b")]) == []
    with pytest.raises(ValueError, match="unknown migration policy 'shuffle'; known: balance, defrag, none"):
        make_migration_policy("shuffle")
    with pytest.raises(ValueError, match="gap"):
        BalancePolicy(gap=0)


def test_balance_moves_from_the_most_to_the_least_loaded_when_the_gap_is_large():
    policy = BalancePolicy(gap=0.3)
    views = [view("a", free=40, running=3), view("b", free=90, running=1), view("c", free=10, running=4)]
    assert policy.plan(views) == [Move("c", "b")]  # usage 0.9 vs 0.1
    assert policy.plan([view("a", free=60, running=3), view("b", free=80, running=2)]) == []  # gap 0.2
    assert policy.plan([view("a", free=0, running=1), view("b")]) == []  # one request: moving it gains nothing
    # queued demand counts: 60 blocks of queued tokens make "a" (0.65) the loaded one, not "b" (0.1)
    assert policy.plan([view("a", free=95, running=1, waiting=2, queued=960), view("b", free=90, running=2)]) == \
        [Move("a", "b")]
    assert policy.plan([view("a")]) == []


def test_defrag_frees_room_for_a_queued_request_that_does_not_fit():
    policy = DefragPolicy()
    stuck = view("a", free=5, running=3, waiting=1, queued=320)  # needs 20 blocks, has 5
    assert policy.plan([stuck, view("b", free=50, running=1)]) == [Move("a", "b")]
    assert policy.plan([stuck, view("b", free=10, running=1)]) == []  # no instance has room
    assert policy.plan([view("a", free=30, running=3, waiting=1, queued=320), view("b", free=50)]) == []  # it fits
    assert policy.plan([stuck, view("b", free=50, waiting=1, queued=16)]) == []  # b has its own queue


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
