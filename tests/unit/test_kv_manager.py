"""KVCacheManager: slots, prefix hits (full blocks only, leave one token), budget errors."""
import pytest

from distinfer.kv.manager import KVCacheManager

BS = 4


def make(num_blocks=8, prefix=True, max_model_len=16):
    return KVCacheManager(num_blocks, BS, prefix, max_model_len)


def lookup(kv, request_id, tokens):
    """Admit a request with its cached prefix only; the number of tokens that prefix covers."""
    prefix = kv.find_computed(request_id, tokens)
    assert kv.admit(request_id, prefix, prefix.num_tokens) == []  # device hits only: no new blocks
    return prefix.num_tokens


def compute(kv, request_id, tokens):
    """Allocate and 'compute' every token of a request, registering its full blocks."""
    hit = lookup(kv, request_id, tokens)
    assert kv.allocate_slots(request_id, len(tokens)) is not None
    kv.cache_blocks(request_id, tokens, len(tokens))
    return hit


def test_allocate_slots_grows_the_table_by_whole_blocks():
    kv = make()
    assert kv.allocate_slots("a", 5) == [0, 1]
    assert kv.allocate_slots("a", 8) == []  # still fits in two blocks
    assert kv.allocate_slots("a", 9) == [2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)


def test_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = make(num_blocks=4)
    kv.allocate_slots("a", 12)
    assert kv.allocate_slots("b", 8) is None
    assert kv.get_block_ids("b") == [] and kv.num_free_blocks == 1


def test_prefix_hit_shares_full_blocks_and_counts_tokens():
    kv = make()
    prompt = list(range(10))
    assert compute(kv, "a", prompt) == 0
    hit = lookup(kv, "b", prompt[:8] + [99, 98, 97])
    assert hit == 8
    assert kv.get_block_ids("b") == kv.get_block_ids("a")[:2]
    assert kv.pool.blocks[kv.get_block_ids("a")[0]].ref_cnt == 2
    stats = kv.prefix_cache_stats
    assert (stats.queries, stats.hits) == (10 + 11, 8)
    assert stats.hit_rate == pytest.approx(8 / 21)


def test_prefix_hit_leaves_at_least_one_token_to_compute():
    kv = make()
    prompt = list(range(8))  # exactly two full blocks
    compute(kv, "a", prompt)
    assert lookup(kv, "b", prompt) == 4  # not 8: the last token must be computed
    kv.free("b")
    assert lookup(kv, "c", prompt + [100]) == 8


def test_partial_blocks_are_not_shared():
    kv = make()
    compute(kv, "a", list(range(10)))  # third block holds only 2 tokens
    assert kv.pool.num_cached_blocks == 2
    assert lookup(kv, "b", list(range(12)) + [50]) == 8  # 10 tokens match, 8 shared


def test_cache_blocks_only_registers_computed_full_blocks():
    kv = make()
    tokens = list(range(12))
    lookup(kv, "a", tokens)
    kv.allocate_slots("a", 12)
    kv.cache_blocks("a", tokens, 6)  # one full block computed so far
    assert kv.pool.num_cached_blocks == 1
    kv.cache_blocks("a", tokens, 12)
    assert kv.pool.num_cached_blocks == 3


def test_prefix_caching_disabled_never_hits_or_counts():
    kv = make(prefix=False)
    compute(kv, "a", list(range(10)))
    assert lookup(kv, "b", list(range(10))) == 0
    assert kv.pool.num_cached_blocks == 0
    assert kv.prefix_cache_stats.queries == 0


def test_free_releases_everything_at_once_tail_first():
    kv = make(num_blocks=4)
    compute(kv, "a", list(range(12)))
    a_blocks = kv.get_block_ids("a")
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.usage == 0.0 and kv.get_block_ids("a") == []
    # Block 3 was never used; then the tail of "a" is evicted first, its head survives longest.
    assert kv.allocate_slots("b", 8) == [3, a_blocks[2]]
    assert lookup(kv, "c", list(range(12))) == 8


def test_reset_prefix_cache_drops_hits():
    kv = make()
    compute(kv, "a", list(range(10)))
    kv.reset_prefix_cache()
    assert lookup(kv, "b", list(range(10))) == 0


def test_budget_too_small_for_max_model_len_is_a_clear_error():
    with pytest.raises(ValueError) as info:
        KVCacheManager(num_blocks=3, block_size=16, enable_prefix_caching=True, max_model_len=100)
    message = str(info.value)
    for part in ("3 blocks", "48 tokens", "max_model_len=100", "7 blocks", "num_kv_blocks", "kv_cache_bytes",
                 "lower max_model_len"):
        assert part in message
    KVCacheManager(num_blocks=7, block_size=16, enable_prefix_caching=True, max_model_len=100)  # fits


def test_lookup_on_a_request_holding_blocks_is_refused():
    kv = make()
    kv.allocate_slots("a", 4)
    with pytest.raises(ValueError, match="already holds blocks"):
        lookup(kv, "a", [1, 2, 3, 4, 5])


def test_free_with_uncache_drops_only_blocks_nobody_else_holds():
    """A failed request's blocks leave the prefix cache (their KV may hold NaN), except the blocks
    another request still holds; a normal free keeps them hittable."""
    kv = make()
    prompt = list(range(10))
    compute(kv, "a", prompt)
    compute(kv, "b", prompt[:4] + [50, 51, 52, 53, 54])  # shares a's first block
    kv.free("a", uncache=True)
    assert lookup(kv, "c", prompt) == 4  # a's second block is gone, the shared first stays
    kv.free("c")
    kv.free("b")
    assert lookup(kv, "d", prompt[:4] + [50, 51, 52, 53, 54]) == 8  # b ended normally: cached


def test_sequence_parallel_partitions_put_block_i_on_rank_i_mod_sp():
    """sp=2, 4 blocks per rank: ids 0-3 are rank 0's, 4-7 rank 1's; a request's blocks alternate."""
    kv = KVCacheManager(8, BS, True, 24, num_partitions=2)  # 24 tokens = 6 blocks = 3 per rank
    assert kv.allocate_slots("a", 13) == [0, 4, 1, 5]  # 4 blocks: rank 0, 1, 0, 1
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots("b", 20) is None  # 5 blocks would need 3 on rank 0, which has 2 left
    assert kv.num_free_blocks == 4 and kv.get_block_ids("b") == []
    assert kv.allocate_slots("b", 16) == [2, 6, 3, 7]
    kv.free("a")
    tokens = list(range(16))
    kv.cache_blocks("b", tokens, 16)
    # the same prompt finds b's blocks, each on the rank its position says
    assert lookup(kv, "c", tokens + [99]) == 16 and kv.get_block_ids("c") == [2, 6, 3, 7]
    with pytest.raises(ValueError, match="3 blocks on each of 2 sequence-parallel ranks"):
        KVCacheManager(6, BS, True, 28, num_partitions=2)  # 28 tokens = 7 blocks: 4 on rank 0
    with pytest.raises(ValueError, match="host tier"):
        KVCacheManager(8, BS, True, 16, num_host_blocks=4, num_partitions=2)
