from __future__ import annotations

from pagoda.core.block_pool import BlockPool, hash_block_tokens


def test_new_blocks_come_in_order_and_return_lru() -> None:
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)
    assert [b.block_id for b in a] == [0, 1, 2]
    b = pool.get_new_blocks(2)
    assert [x.block_id for x in b] == [3, 4]
    pool.free_blocks(reversed(a))  # tail first: 2, 1, 0 join the queue in that order
    pool.check_invariants()
    assert list(pool.free_queue) == [5, 2, 1, 0]
    assert [x.block_id for x in pool.get_new_blocks(2)] == [5, 2]


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
