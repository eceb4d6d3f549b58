"""Shared by the op families' tests (tests/unit/model/ops): tolerances, a random batch and the
CPU's flags."""

from __future__ import annotations

from pathlib import Path

import torch

from pagoda.model.attention_metadata import AttentionMetadata

# float32: only summation order differs. bfloat16: both paths round at the same steps, but a
# different summation order can flip the last bit of an element (one bf16 ulp is 2^-8 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def random_batch(
    dtype: torch.dtype,
    heads: int = 6,
    kv_heads: int = 2,
    dim: int = 32,
    cache_dtype: torch.dtype | None = None,
):
    """A mixed batch (decodes, a chunk, a whole prompt) over a shuffled 40-block cache (of
    cache_dtype, dtype's by default): qkv, (q, k, v), attn, positions, (k_cache, v_cache),
    the cos_sin table."""
    block_size, num_blocks = 4, 40
    num_computed, num_new = [9, 0, 5, 13], [1, 7, 4, 1]
    order = torch.randperm(num_blocks).tolist()
    tables = [order[0:6], order[6:10], order[10:13], order[13:20]]
    attn, positions = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    tokens = sum(num_new)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.view(tokens, -1, dim) for t in (q, k, v))
    shape = (num_blocks, kv_heads, block_size, dim)
    cache_dtype = cache_dtype or dtype
    caches = torch.randn(shape).to(cache_dtype), torch.randn(shape).to(cache_dtype)
    table = torch.randn(64, dim).float()
    return qkv, (q, k, v), attn, positions, caches, table


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
