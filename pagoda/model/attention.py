"""Attention over a paged KV cache, for a flattened batch of prefill chunks and decode tokens.

The K/V cache of one layer is two tensors of shape
[num_blocks, block_size, num_kv_heads, head_dim]. A sequence owns a list of
blocks (its block table); token at position p lives in block
block_table[p // block_size], row p % block_size, i.e. in "slot"
block_table[p // block_size] * block_size + p % block_size.

One forward pass carries the new tokens of many sequences back to back:

    tokens:   | seq 0: 5 prefill tokens | seq 1: 1 decode token | seq 2: 3 chunk tokens |
    context:  | positions 0..4          | positions 0..37       | positions 16..18      |

Each layer writes the new K/V into their slots first, then every query
attends to the cached keys of its own sequence up to its own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch sits in the paged cache, shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot written by each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] padded with block 0
    # The batch is attended as a padded [num_seqs, max_query_len] grid of queries:
    query_index: torch.Tensor  # [num_seqs, max_query_len] flat token of each grid cell
    token_index: torch.Tensor  # [num_tokens] grid cell of each flat token
    bias: torch.Tensor  # [num_seqs, 1, 1, max_query_len, max_seq_len] float32: 0 or -inf
    max_seq_len: int

    @classmethod
    def build(
        cls,
        num_computed: list[int],
        num_new: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata and positions for sequences that add num_new tokens after num_computed."""
        num_seqs = len(num_new)
        max_q = max(num_new)
        seq_lens = [c + n for c, n in zip(num_computed, num_new)]
        max_seq_len = max(seq_lens)
        max_blocks = -(-max_seq_len // block_size)

        computed = torch.tensor(num_computed, dtype=torch.long)
        new = torch.tensor(num_new, dtype=torch.long)
        table = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
        for i, blocks in enumerate(block_tables):
            n = min(len(blocks), max_blocks)
            table[i, :n] = torch.tensor(blocks[:n], dtype=torch.long)

        # Grid of [num_seqs, max_q]: cell (s, j) is the j-th new token of sequence s.
        j = torch.arange(max_q)
        valid = j.unsqueeze(0) < new.unsqueeze(1)  # [num_seqs, max_q]
        starts = torch.cumsum(new, 0) - new
        query_index = torch.where(valid, starts.unsqueeze(1) + j, 0)
        grid_pos = computed.unsqueeze(1) + j  # position of each grid cell
        token_index = (torch.arange(num_seqs).unsqueeze(1) * max_q + j)[valid]
        positions = grid_pos[valid]

        # Padding cells attend to key 0 only, so that no row of the mask is empty.
        query_pos = torch.where(valid, grid_pos, 0)
        mask = torch.arange(max_seq_len).view(1, 1, -1) <= query_pos.unsqueeze(-1)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), new)
        slots = table[seq_of_token, positions // block_size] * block_size + positions % block_size

        metadata = cls(
            slot_mapping=slots.to(device),
            block_tables=table.to(device),
            query_index=query_index.to(device),
            token_index=token_index.to(device),
            bias=torch.zeros(mask.shape)
            .masked_fill_(~mask, float("-inf"))[:, None, None]
            .to(device),
            max_seq_len=max_seq_len,
        )
        return metadata, positions.to(device)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Writes k/v into the cache, then attends each query to its sequence; returns [T, H * D]."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, attn.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, attn.slot_mapping, v)

    num_seqs = attn.block_tables.shape[0]
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads  # query heads per KV head (grouped-query attention)
    # [num_seqs, max_blocks * block_size, num_kv_heads, head_dim], cut to the longest context
    keys = k_cache[attn.block_tables].flatten(1, 2)[:, : attn.max_seq_len]
    values = v_cache[attn.block_tables].flatten(1, 2)[:, : attn.max_seq_len]
    queries = q[attn.query_index]  # [num_seqs, max_q, num_heads, head_dim]
    max_q = queries.shape[1]

    # Query head h reads KV head h // group: stack each KV head's group of query heads and
    # their positions into the rows of one matrix, so that two matmuls do the whole batch.
    # [num_seqs, num_kv_heads, group * max_q, head_dim]
    rows = queries.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    rows = rows.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    scores = torch.matmul(rows, keys.permute(0, 2, 3, 1))  # [S, kv_heads, group * max_q, L]
    # Softmax in float32, with the causal/padding bias shared by all heads.
    scores = scores.float().view(num_seqs, num_kv_heads, group, max_q, -1) * scale + attn.bias
    probs = scores.softmax(dim=-1).to(values.dtype).flatten(2, 3)
    out = torch.matmul(probs, values.transpose(1, 2))  # [S, kv_heads, group * max_q, head_dim]
    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs * max_q, num_heads * head_dim)[attn.token_index]


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, kv_heads, head_dim].

    The cache starts zeroed (padding slots are multiplied by zero attention weights,
    and 0 * garbage could be NaN). On the CPU the zeros come from the kernel's
    zero pages, so memory is only resident once a block is written.
    """
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [(_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(num_layers)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    element = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(int(np.prod(shape)) * element, dtype=np.uint8)  # calloc: lazily zeroed pages
    return torch.from_numpy(raw).view(dtype).view(shape)
