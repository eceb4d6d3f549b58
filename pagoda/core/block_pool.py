"""BlockPool: the fixed set of KV-cache blocks, their reference counts and the prefix cache.

A block is free when no request holds it (ref_cnt == 0). A free block may still
hold the K/V of a full, hashed block of some earlier request: it stays findable
by its hash until the pool needs it for something else. get_new_blocks() pops
the front of the free queue:

    free queue:  [uncached freed, newest first | never written | cached, oldest free first]
    cached:      hash -> block (free or in use)  touch() revives a free hit

A freed block without a hash (a partial last block, a rejected draft's slot, any
block when caching is off) can never be found again, so it is handed out before
a never-written one: the pool's pages are only written as far as the load needs
at once, which is what its resident memory costs. Cached blocks are evicted LRU,
and only once the never-written blocks are gone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The chain hash of a full block: its tokens and everything before them."""
    return hash((parent_hash, tuple(token_ids)))


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Owns every block; requests borrow them by reference count."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """The block holding this hash, or None when it was never cached or was evicted."""
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Takes n free blocks (evicting their cached hashes); the caller checked there are n."""
        assert n <= self.num_free_blocks, f"asked for {n} blocks, {self.num_free_blocks} free"
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes one more reference to cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference each; blocks that reach zero join the free queue.

        Cached blocks join its end. Callers pass a request's blocks tail first, so
        that its last blocks (the least likely to be shared) are evicted before its
        first ones. Blocks without a hash go to its front, to be reused first.
        """
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Makes a full, computed block findable by its chain hash."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is cached already; this one stays private
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (blocks in use keep their contents).

        The free blocks among them are now worth nothing: they move to the front.
        """
        for block in self.cached.values():
            block.block_hash = None
            if block.ref_cnt == 0:
                self.free_queue.move_to_end(block.block_id, last=False)
        self.cached.clear()

    def check_invariants(self) -> None:
        """free + used == total, no negative counts, every cached hash points at a live block."""
        free = set(self.free_queue)
        used = {b.block_id for b in self.blocks if b.ref_cnt > 0}
        assert not free & used, f"blocks both free and used: {sorted(free & used)[:8]}"
        assert len(free) + len(used) == self.num_blocks, (
            f"free {len(free)} + used {len(used)} != total {self.num_blocks}"
        )
        assert all(b.ref_cnt >= 0 for b in self.blocks)
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, f"cache entry {block_hash} points at {block}"
