"""BlockPool: ref counts, free queue, stable block hashes, LRU eviction of cached blocks."""
import pytest

from distinfer.kv.block_pool import BlockPool, hash_block_tokens, hash_full_blocks


def test_allocate_and_free_track_ref_counts_and_free_count():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)
    pool.touch(blocks[:1])
    assert blocks[0].ref_cnt == 2
    pool.free(blocks)
    assert [b.ref_cnt for b in blocks] == [1, 0, 0]
    assert pool.num_free_blocks == 3
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(ValueError, match="freed more times"):
        pool.free(blocks[:1])


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(ValueError, match="only 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_block_hash_is_a_stable_chain():
    root = hash_block_tokens(None, [1, 2, 3, 4])
    assert root == hash_block_tokens(None, (1, 2, 3, 4))  # deterministic, list or tuple
    # Golden value: the hash must not depend on the process (PYTHONHASHSEED) or version.
    assert root.hex() == "73e200e2b048c86d4e8c86b86bf62bbda84c7384e34e250b01aa30ab29d234a4"
    assert hash_block_tokens(None, [1, 2, 3, 5]) != root
    child = hash_block_tokens(root, [5, 6, 7, 8])
    assert child != hash_block_tokens(None, [5, 6, 7, 8])  # depends on the parent
    assert hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == [root, child]  # partial tail ignored
    assert hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, parent_hash=root, start_block=1) == [child]


def test_lru_eviction_takes_never_used_then_least_recently_freed():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        assert pool.cache_block(block, hash_block_tokens(None, [i]))
    pool.free([blocks[2], blocks[0], blocks[1]])  # free order = eviction order, after block 3
    order = [pool.allocate(1)[0].block_id for _ in range(2)]
    assert order == [3, blocks[2].block_id]
    assert blocks[2].block_hash is None  # evicted on reuse
    assert pool.get_cached_block(hash_block_tokens(None, [2])) is None
    assert pool.get_cached_block(hash_block_tokens(None, [0])) is blocks[0]  # still cached
    assert pool.allocate(1)[0] is blocks[0]
    assert pool.num_cached_blocks == 1


def test_cached_free_block_is_reused_by_touch_and_not_evicted():
    pool = BlockPool(3)
    block = pool.allocate(1)[0]
    block_hash = hash_block_tokens(None, [7, 7])
    pool.cache_block(block, block_hash)
    pool.free([block])
    assert pool.num_free_blocks == 3  # evictable cached blocks count as free
    hit = pool.get_cached_block(block_hash)
    assert hit is block
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 2
    others = pool.allocate(2)
    assert block not in others and block.block_hash == block_hash


def test_cache_block_refuses_duplicates_and_reset_forgets_hashes():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    h = hash_block_tokens(None, [1])
    assert pool.cache_block(a, h)
    assert not pool.cache_block(b, h)  # another block already holds the hash
    assert not pool.cache_block(a, hash_block_tokens(None, [2]))  # already hashed
    assert b.block_hash is None
    pool.reset_prefix_cache()
    assert pool.get_cached_block(h) is None and a.block_hash is None
