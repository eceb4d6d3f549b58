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


def test_rope_and_cache_refuses_out_of_cache_slots() -> None:
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
    with pytest.raises(RuntimeError, match="out of the cache"):
        torch.ops.pagoda.rope_and_cache(q, k, v, positions, table, kc, vc, attn.slot_mapping + 999)
