"""Attention metadata: where each token of a flattened batch sits in the paged KV cache.

The K/V cache of one layer is two tensors of shape
[num_blocks, num_kv_heads, block_size, head_dim]. A sequence owns a list of
blocks (its block table); token at position p lives in block
block_table[p // block_size], row p % block_size of each KV head, i.e. in "slot"
block_table[p // block_size] * block_size + p % block_size. Within a block,
each KV head's rows lie together: a decode step reads one head's keys of a
block as one run of memory, not every third row of it.

One forward pass carries the new tokens of many sequences back to back:

    tokens:   | seq 0: 5 prefill tokens | seq 1: 1 decode token | seq 2: 3 chunk tokens |
    context:  | positions 0..4          | positions 0..37       | positions 16..18      |

Each layer writes the new K/V into their slots first (ops.rope_and_cache),
then every query attends to the cached keys of its own sequence up to its own
position (pagoda/model/ops/attention.py: C++ kernels reading the blocks in place,
or their PyTorch twin, which gathers them into padded grids for two matmuls).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """Sequences attended together, as a padded [num_seqs, max_query_len] grid of queries."""

    flat_index: torch.Tensor  # [group_tokens] where the group's tokens sit in the flat batch
    block_tables: torch.Tensor  # [num_seqs, max_blocks] padded with block 0
    query_index: torch.Tensor  # [num_seqs, max_query_len] flat token of each grid cell
    token_index: torch.Tensor  # [group_tokens] grid cell of each of the group's tokens
    query_pos: torch.Tensor  # [num_seqs, max_query_len] position of each cell (padding: 0)
    positions: torch.Tensor  # [group_tokens] position of each of the group's tokens
    token_seq: torch.Tensor  # [group_tokens] row of block_tables of each of the group's tokens
    max_query_len: int
    max_seq_len: int
    # (start, stop) when the grid has no padding and covers flat tokens start..stop-1 in
    # order (a batch of decodes, one whole chunk): the gathers above are then plain views.
    dense: tuple[int, int] | None = None

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """[num_seqs, 1, 1, max_query_len, max_seq_len] float32: 0 where a cell may attend
        to a key (its own position and before), -inf elsewhere. Made once a step, on first
        use: only the PyTorch path adds it (the C++ softmax masks by query_pos itself)."""
        keys = torch.arange(self.max_seq_len, device=self.query_pos.device)
        bias = torch.zeros(*self.query_pos.shape, self.max_seq_len, device=keys.device)
        bias.masked_fill_(keys > self.query_pos.unsqueeze(-1), float("-inf"))
        return bias[:, None, None]


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch sits in the paged cache, shared by all layers.

    Decoding sequences (one new token) and the others (prompts, chunks) form two
    groups: padding a decode to the length of a prompt chunk would waste most of
    the work, so each group is padded only to its own longest query.
    """

    slot_mapping: torch.Tensor  # [num_tokens] cache slot written by each new token
    groups: list[AttentionGroup]

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
        if all(n == 1 for n in num_new):
            return cls._build_decode(num_computed, block_tables, block_size, device)
        return cls._build_mixed(num_computed, num_new, block_tables, block_size, device)

    @classmethod
    def _build_mixed(
        cls,
        num_computed: list[int],
        num_new: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        new = torch.tensor(num_new, dtype=torch.long)
        starts = torch.cumsum(new, 0) - new  # first flat token of each sequence
        seq_of_token = torch.repeat_interleave(torch.arange(len(num_new)), new)
        positions = torch.tensor(num_computed, dtype=torch.long)[seq_of_token] + (
            torch.arange(int(new.sum())) - starts[seq_of_token]
        )
        max_blocks = -(-max(c + n for c, n in zip(num_computed, num_new)) // block_size)
        table = torch.zeros(len(num_new), max_blocks, dtype=torch.long)
        for i, blocks in enumerate(block_tables):
            n = min(len(blocks), max_blocks)
            table[i, :n] = torch.tensor(blocks[:n], dtype=torch.long)
        slots = table[seq_of_token, positions // block_size] * block_size + positions % block_size

        decoding = [i for i, n in enumerate(num_new) if n == 1]
        others = [i for i, n in enumerate(num_new) if n != 1]
        groups = [
            _build_group(seqs, num_computed, num_new, table, starts, block_size, device)
            for seqs in (decoding, others)
            if seqs
        ]
        return cls(slot_mapping=slots.to(device), groups=groups), positions.to(device)

    @classmethod
    def _build_decode(
        cls,
        num_computed: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """build for a batch of decoding sequences only: the same result, a few ops instead
        of a few dozen (this runs once per generated token)."""
        num_seqs = len(num_computed)
        max_seq_len = max(num_computed) + 1
        max_blocks = -(-max_seq_len // block_size)
        rows = [(blocks + [0] * max_blocks)[:max_blocks] for blocks in block_tables]
        table = torch.tensor(rows, dtype=torch.long)
        positions = torch.tensor(num_computed, dtype=torch.long)
        seqs = torch.arange(num_seqs)
        # A slot per sequence, from Python ints: one small tensor instead of five ops on them.
        slots = torch.tensor(
            [
                row[p // block_size] * block_size + p % block_size
                for row, p in zip(rows, num_computed)
            ],
            dtype=torch.long,
        )
        group = AttentionGroup(
            flat_index=seqs.to(device),
            block_tables=table.to(device),
            query_index=seqs.unsqueeze(1).to(device),
            token_index=seqs.to(device),
            query_pos=positions.unsqueeze(1).to(device),
            positions=positions.to(device),
            token_seq=seqs.to(device),
            max_query_len=1,
            max_seq_len=max_seq_len,
            dense=(0, num_seqs),
        )
        return cls(slot_mapping=slots.to(device), groups=[group]), positions.to(device)


def _build_group(
    seqs: list[int],
    num_computed: list[int],
    num_new: list[int],
    table: torch.Tensor,
    starts: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> AttentionGroup:
    computed = torch.tensor([num_computed[i] for i in seqs], dtype=torch.long)
    new = torch.tensor([num_new[i] for i in seqs], dtype=torch.long)
    max_q = int(new.max())
    max_seq_len = int((computed + new).max())
    first = starts[seqs]

    # Grid of [num_seqs, max_q]: cell (s, j) is the j-th new token of sequence s.
    j = torch.arange(max_q)
    valid = j.unsqueeze(0) < new.unsqueeze(1)  # [num_seqs, max_q]
    query_index = torch.where(valid, first.unsqueeze(1) + j, first.unsqueeze(1))
    token_index = (torch.arange(len(seqs)).unsqueeze(1) * max_q + j)[valid]
    # Padding cells attend to key 0 only, so that no row of the bias is all -inf.
    query_pos = torch.where(valid, computed.unsqueeze(1) + j, 0)
    flat = query_index[valid]
    dense = None
    if bool(valid.all()) and int(flat[-1] - flat[0]) == len(flat) - 1:
        dense = (int(flat[0]), int(flat[-1]) + 1)
    return AttentionGroup(
        flat_index=query_index[valid].to(device),
        block_tables=table[seqs, : -(-max_seq_len // block_size)].to(device),
        query_index=query_index.to(device),
        token_index=token_index.to(device),
        query_pos=query_pos.to(device),
        positions=query_pos[valid].to(device),
        token_seq=torch.arange(len(seqs)).unsqueeze(1).expand(-1, max_q)[valid].to(device),
        max_query_len=max_q,
        max_seq_len=max_seq_len,
        dense=dense,
    )
