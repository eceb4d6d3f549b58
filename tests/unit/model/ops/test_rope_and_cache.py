"""rope_and_cache's C++ kernel against its PyTorch twin, in both dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE, random_batch

from pagoda.model.ops.rope_and_cache import rope_and_cache_torch

pytestmark = pytest.mark.usefixtures("kernels_built")


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache(dtype: torch.dtype, dim: int) -> None:
    results = []
    for rope in (torch.ops.pagoda.rope_and_cache, rope_and_cache_torch):
        torch.manual_seed(0)
        qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(dtype, dim=dim)
        rope(q, k, v, positions, table, kc, vc, attn.slot_mapping)
        results.append((qkv, kc, vc))
    (qkv_a, kc_a, vc_a), (qkv_b, kc_b, vc_b) = results
    torch.testing.assert_close(qkv_a, qkv_b, **TOLERANCE[dtype])
    torch.testing.assert_close(kc_a, kc_b, **TOLERANCE[dtype])
    assert torch.equal(vc_a, vc_b)  # values are copied, not computed


@pytest.mark.parametrize("dim", [32, 64])
def test_rope_and_cache_into_a_bfloat16_cache(dim: int) -> None:
    """float32 q, k and v, a bfloat16 cache (--kv-cache-dtype bfloat16 on a float32 model):
    the kernel rounds k and v to bfloat16 as the twin's copy does, bit for bit."""
    results = []
    for rope in (torch.ops.pagoda.rope_and_cache, rope_and_cache_torch):
        torch.manual_seed(0)
        qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(
            torch.float32, dim=dim, cache_dtype=torch.bfloat16
        )
        rope(q, k, v, positions, table, kc, vc, attn.slot_mapping)
        results.append((qkv, kc, vc))
    (qkv_a, kc_a, vc_a), (qkv_b, kc_b, vc_b) = results
    assert kc_a.dtype == vc_a.dtype == torch.bfloat16
    torch.testing.assert_close(qkv_a, qkv_b, **TOLERANCE[torch.float32])
    torch.testing.assert_close(kc_a, kc_b, **TOLERANCE[torch.bfloat16])
    assert torch.equal(vc_a, vc_b)
    written = attn.slot_mapping
    rows = vc_a.permute(0, 2, 1, 3).reshape(-1, *vc_a.shape[1::2])[written]
    assert torch.equal(rows, v.to(torch.bfloat16))  # each value row, rounded once


def test_rope_and_cache_refuses_a_cache_of_another_dtype() -> None:
    """A bfloat16 q over a float32 cache is no combination the engine makes."""
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(
        torch.bfloat16, cache_dtype=torch.float32
    )
    with pytest.raises(RuntimeError, match="cache"):
        torch.ops.pagoda.rope_and_cache(q, k, v, positions, table, kc, vc, attn.slot_mapping)


def test_rope_and_cache_refuses_out_of_cache_slots() -> None:
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
    with pytest.raises(RuntimeError, match="out of the cache"):
        torch.ops.pagoda.rope_and_cache(q, k, v, positions, table, kc, vc, attn.slot_mapping + 999)
