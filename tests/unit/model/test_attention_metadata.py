"""AttentionMetadata and the KV cache it addresses."""

from __future__ import annotations

import torch

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.kv_memory import allocate_kv_cache


def test_decode_only_metadata_equals_the_general_build() -> None:
    # Block tables longer and shorter than needed, a context ending on a block boundary.
    num_computed, tables = [9, 0, 15, 31], [[4, 7, 1], [3], [0, 9, 2], [5, 6]]
    fast, fast_positions = AttentionMetadata._build_decode(num_computed, tables, 16, "cpu")
    slow, slow_positions = AttentionMetadata._build_mixed(num_computed, [1] * 4, tables, 16, "cpu")
    assert torch.equal(fast_positions, slow_positions)
    assert torch.equal(fast.slot_mapping, slow.slot_mapping)
    (a,), (b,) = fast.groups, slow.groups
    for field in a.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field


def test_kv_cache_is_zeroed_and_each_tensor_its_own() -> None:
    caches = allocate_kv_cache(3, 5, 4, 2, 8, torch.bfloat16)
    tensors = [t for pair in caches for t in pair]
    assert all(t.shape == (5, 2, 4, 8) and t.is_contiguous() and not t.any() for t in tensors)
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    assert [int(t[0, 0, 0, 0]) for t in tensors] == list(range(1, 7))
    assert all(bool((t == i + 1).all()) for i, t in enumerate(tensors))
