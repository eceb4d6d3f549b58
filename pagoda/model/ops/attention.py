"""Attention of each new token to its sequence's keys in the paged KV cache.

paged_attention_torch defines it: each group's queries and the keys they may
see are gathered into padded grids for two matmuls. paged_attention runs the
same on the CPU with the C++ kernels (csrc), which read the blocks in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from pagoda import kernels
from pagoda.model.attention_metadata import AttentionGroup, AttentionMetadata


def causal_softmax(
    scores: torch.Tensor, group: AttentionGroup, window: int | None = None
) -> torch.Tensor:
    """causal_softmax_torch in one pass (scores contiguous, as matmul makes them)."""
    return torch.ops.pagoda.causal_softmax.default(scores.contiguous(), group.query_pos, window)


@functools.cache
def prompt_kernel_takes(dtype: torch.dtype, head_dim: int, heads_per_kv: int) -> bool:
    """Whether the C++ prompt attention takes these shapes in this build (the kernel states
    which, in csrc/attention_prompt.cpp); asked once per shape."""
    return torch.ops.pagoda.prompt_attention_supports(dtype, head_dim, heads_per_kv)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Each query [T, H, D] attends to its own sequence's cached keys up to its position.

    With a sliding window (a local attention layer), a query at position p sees only
    the keys at p - window < position <= p; the kernels do not read the blocks before.
    Returns [T, H * D]. The cache must already hold the batch's own keys and values.
    One kernel takes the decoding sequences: one query each, so the work is reading
    their keys. Another takes prompt chunks in the shapes it states (prompt_kernel_takes):
    with AVX512-BF16, tiles of consecutive tokens that share each key they read; on AVX2,
    the decode kernel token by token. Both skip the causal half. Elsewhere prompt chunks
    go to two matmuls, which use each key for every query at once.
    """
    if not kernels.available(q):
        return paged_attention_torch(q, k_cache, v_cache, attn, scale, window)
    prompt_kernel = None
    if prompt_kernel_takes(q.dtype, q.shape[2], q.shape[1] // k_cache.shape[1]):
        prompt_kernel = torch.ops.pagoda.prompt_attention.default

    def attend(group: AttentionGroup) -> torch.Tensor:
        if group.max_query_len == 1:
            # The overload itself: resolving it from the packet costs a few us, once a layer.
            kernel = torch.ops.pagoda.paged_attention.default
        elif prompt_kernel is not None:
            kernel = prompt_kernel
        else:
            return attend_group(q, k_cache, v_cache, group, scale, window, causal_softmax)
        rows = q[group.dense[0] : group.dense[1]] if group.dense else q[group.flat_index]
        return kernel(
            rows,
            k_cache,
            v_cache,
            group.block_tables,
            group.token_seq,
            group.positions,
            scale,
            window,
        )

    return attend_groups(q, attn, attend)


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of each query [T, H, D] to its sequence's cached keys (the last `window`
    positions up to its own with a sliding window, else all up to it); returns [T, H * D]."""
    return attend_groups(
        q, attn, lambda group: attend_group(q, k_cache, v_cache, group, scale, window)
    )


def attend_groups(
    q: torch.Tensor, attn: AttentionMetadata, attend: Callable[[AttentionGroup], torch.Tensor]
) -> torch.Tensor:
    """Runs attend on each group and puts its rows back in flat batch order: [T, H * D]."""
    if len(attn.groups) == 1:
        return attend(attn.groups[0])
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for group in attn.groups:
        out[group.flat_index] = attend(group)
    return out


def attend_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scale: float,
    window: int | None = None,
    softmax: Callable[[torch.Tensor, AttentionGroup, int | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one group's queries; rows in the order of group.flat_index.

    softmax(scores [S, kv_heads, heads_per_kv, max_q, L], group, window) -> probabilities
    in the scores' dtype, each query over its own keys; causal_softmax_torch by default.
    """
    num_kv_heads, _, head_dim = k_cache.shape[1:]
    num_seqs = group.block_tables.shape[0]
    num_heads = q.shape[1]
    heads_per_kv = num_heads // num_kv_heads  # grouped-query attention

    # [num_seqs, num_kv_heads, max_blocks * block_size, head_dim], cut to the longest context,
    # in q's dtype (a bfloat16 cache under a float32 q is read as float32)
    def gather(cache: torch.Tensor) -> torch.Tensor:
        blocks = cache[group.block_tables].transpose(1, 2)  # [S, kv_heads, blocks, bs, D]
        return blocks.flatten(2, 3)[:, :, : group.max_seq_len].to(q.dtype)

    keys, values = gather(k_cache), gather(v_cache)
    if group.dense is not None:
        queries = q[group.dense[0] : group.dense[1]].view(num_seqs, -1, num_heads, head_dim)
    else:
        queries = q[group.query_index]  # [num_seqs, max_q, num_heads, head_dim]
    max_q = queries.shape[1]

    # Query head h reads KV head h // heads_per_kv: stack each KV head's query heads and
    # their positions into the rows of one matrix, so that two matmuls do the whole group.
    # [num_seqs, num_kv_heads, heads_per_kv * max_q, head_dim]
    rows = queries.view(num_seqs, max_q, num_kv_heads, heads_per_kv, head_dim)
    rows = rows.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, -1, head_dim) * scale
    scores = torch.matmul(rows, keys.transpose(2, 3))  # [S, kv_heads, rows, L]
    scores = scores.view(num_seqs, num_kv_heads, heads_per_kv, max_q, -1)
    probs = (softmax or causal_softmax_torch)(scores, group, window).flatten(2, 3)
    out = torch.matmul(probs, values)  # [S, kv_heads, rows, head_dim]
    out = out.view(num_seqs, num_kv_heads, heads_per_kv, max_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(num_seqs * max_q, num_heads * head_dim)
    return out if group.dense is not None else out[group.token_index]


def causal_softmax_torch(
    scores: torch.Tensor, group: AttentionGroup, window: int | None = None
) -> torch.Tensor:
    """Softmax in float32, with the causal/padding bias shared by all heads."""
    bias = group.bias if window is None else window_bias(group, window)
    return scores.float().add_(bias).softmax(dim=-1).to(scores.dtype)


def window_bias(group: AttentionGroup, window: int) -> torch.Tensor:
    """group.bias with a sliding window: a cell at position p may attend to the keys
    p - window < key <= p. [num_seqs, 1, 1, max_query_len, max_seq_len] float32."""
    keys = torch.arange(group.max_seq_len, device=group.query_pos.device)
    pos = group.query_pos.unsqueeze(-1)
    bias = torch.zeros(*group.query_pos.shape, group.max_seq_len, device=keys.device)
    bias.masked_fill_((keys > pos) | (keys <= pos - window), float("-inf"))
    return bias[:, None, None]
