"""KVCacheManager: which blocks a request holds, how many of its tokens are cached already."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from pagoda.core.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # a request's blocks hashed so far
        self.prefix_stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _update_block_hashes(self, request: Request) -> None:
        """Extends request.block_hashes to cover every full block of its tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, request.all_token_ids[i * bs : (i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached blocks that starts the request, and its token count.

        Only looks. At least one token is always left to compute, so that the
        step has a position whose logits it can sample from.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[int] | None:
        """Room for num_new_tokens after the computed ones: the new block ids, or None if full.

        computed_blocks are the cache hits of get_computed_blocks(), adopted on
        success. Full blocks that the step will compute are hashed right away:
        nothing else is scheduled before the forward pass writes them.
        """
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(blocks) - len(computed_blocks)
        # Free hits are counted as free, but touching them takes them out of the queue.
        num_free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_free_hits:
            return None

        self.pool.touch(computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_new_blocks, 0))
        blocks = blocks + computed_blocks + new_blocks
        self.req_blocks[request.request_id] = blocks

        if self.enable_caching:
            # Only blocks full of the request's own tokens: draft tokens scheduled past
            # num_tokens may be rejected, and a block must never be found by a hash of
            # tokens it does not hold.
            self._update_block_hashes(request)
            first = self.num_cached_blocks.get(request.request_id, len(computed_blocks))
            num_full = min(num_computed + num_new_tokens, request.num_tokens) // self.block_size
            for i in range(first, num_full):
                self.pool.cache_block(blocks[i], request.block_hashes[i])
            self.num_cached_blocks[request.request_id] = max(first, num_full)
        return [b.block_id for b in new_blocks]

    def free_tail(self, request: Request, num_tokens: int) -> None:
        """Gives back the blocks past the first num_tokens tokens (rejected drafts' slots)."""
        blocks = self.req_blocks.get(request.request_id, [])
        keep = -(-num_tokens // self.block_size)
        if keep < len(blocks):
            self.pool.free_blocks(reversed(blocks[keep:]))
            del blocks[keep:]

    def free(self, request: Request) -> None:
        """Gives the request's blocks back, tail first."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert held.get(block.block_id, 0) == block.ref_cnt, (
                f"block {block.block_id} has ref_cnt {block.ref_cnt}, "
                f"held by {held.get(block.block_id, 0)} requests"
            )
