from __future__ import annotations

from pagoda.core.block_pool import BlockPool, hash_block_tokens


def test_new_blocks_come_in_order() -> None:
    pool = BlockPool(6)
    assert [b.block_id for b in pool.get_new_blocks(3)] == [0, 1, 2]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [3, 4]
    pool.check_invariants()


def test_cached_block_survives_free_until_evicted() -> None:
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_block(block, h)
    pool.free_blocks([block])
    assert pool.get_cached_block(h) is block
    pool.touch([block])  # a hit revives it
    assert block.ref_cnt == 1 and block.block_id not in pool.free_queue
    pool.free_blocks([block])
    pool.get_new_blocks(3)  # the pool needs every block: the cached one is evicted
    assert pool.get_cached_block(h) is None and block.block_hash is None
    pool.check_invariants()


def test_chain_hash_depends_on_parent() -> None:
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(1, [1, 2]) != hash_block_tokens(2, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])


def test_invariant_check_catches_a_leak() -> None:
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    block.ref_cnt = 0  # a bug: dropped without returning to the queue
    try:
        pool.check_invariants()
    except AssertionError as e:
        assert "free" in str(e)
    else:
        raise AssertionError("the leak went unnoticed")


def test_freed_blocks_without_a_hash_are_reused_before_never_written_ones() -> None:
    # A block whose contents no later request can find is worth nothing once freed;
    # handing it out again before a never-written block keeps the pool's written pages
    # (its resident memory) at what the load needs at once.
    pool = BlockPool(8)
    a = pool.get_new_blocks(3)
    pool.free_blocks(reversed(a))  # 2, 1, 0 each go to the front: 0 is reused first
    pool.check_invariants()
    assert list(pool.free_queue) == [0, 1, 2, 3, 4, 5, 6, 7]
    b = pool.get_new_blocks(2)
    assert [x.block_id for x in b] == [0, 1]
    pool.free_blocks([b[1], b[0]])
    assert [x.block_id for x in pool.get_new_blocks(3)] == [0, 1, 2]


def test_cached_blocks_keep_lru_order_behind_the_never_written_ones() -> None:
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(4)
    hashes = [hash_block_tokens(None, [i]) for i in range(3)]
    for block, h in zip(blocks[:3], hashes, strict=True):
        pool.cache_block(block, h)
    pool.free_blocks(reversed(blocks))  # 3 (no hash) to the front; 2, 1, 0 (cached) to the end
    pool.check_invariants()
    assert list(pool.free_queue) == [3, 4, 5, 2, 1, 0]
    # The uncached block and then the never-written ones go before any cached one.
    assert [x.block_id for x in pool.get_new_blocks(3)] == [3, 4, 5]
    assert all(pool.get_cached_block(h) is not None for h in hashes)
    # Then the cached ones, least recently freed first: the request's tail goes first.
    (evicted,) = pool.get_new_blocks(1)
    assert evicted.block_id == 2 and pool.get_cached_block(hashes[2]) is None
    assert pool.get_cached_block(hashes[0]) is blocks[0]


def test_reset_prefix_cache_moves_free_cached_blocks_to_the_front() -> None:
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, hash_block_tokens(None, [1]))
    pool.free_blocks([block])
    assert list(pool.free_queue) == [1, 2, 3, 0]
    pool.reset_prefix_cache()
    assert list(pool.free_queue) == [0, 1, 2, 3]
    pool.check_invariants()
