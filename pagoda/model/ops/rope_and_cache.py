"""Rotary position embedding of q and k, and the write of k and v into the paged cache
(csrc/rope_and_cache.cpp): one pass over each new token."""

from __future__ import annotations

import torch

from pagoda import kernels


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place by position, then caches k and v (in
    the caches' dtype: q's, or bfloat16 under a float32 q).

    cos_sin is the [max_positions, D] float32 table of RotaryEmbedding: cos | sin.
    """
    if kernels.available(q):
        torch.ops.pagoda.rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    else:
        rope_and_cache_torch(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)


def rope_and_cache_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):  # the rotate-half form Hugging Face uses
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))
    block_size = k_cache.shape[2]
    blocks, rows = slot_mapping // block_size, slot_mapping % block_size
    # [tokens, kv_heads, head_dim] into each head's row, rounded to the cache's dtype
    k_cache[blocks, :, rows] = k.to(k_cache.dtype)
    v_cache[blocks, :, rows] = v.to(v_cache.dtype)
