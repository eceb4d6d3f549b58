"""RMSNorm's C++ kernels against their PyTorch twins, in both dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE

from pagoda.model.ops.norm import (
    add_rms_norm_torch,
    gemma_add_rms_norm,
    gemma_add_rms_norm_torch,
    gemma_rms_norm,
    gemma_rms_norm_torch,
    rms_norm_torch,
)

pytestmark = pytest.mark.usefixtures("kernels_built")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype: torch.dtype) -> None:
    x = torch.randn(37, 96).to(dtype) * 3
    w = torch.randn(96).to(dtype)
    torch.testing.assert_close(
        torch.ops.pagoda.rms_norm(x, w, 1e-5), rms_norm_torch(x, w, 1e-5), **TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype: torch.dtype) -> None:
    """In place: residual becomes the sum, exactly as torch rounds it, and x its norm."""
    x, residual = torch.randn(37, 96).to(dtype) * 3, torch.randn(37, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    want_x, want_residual = add_rms_norm_torch(x, residual, w, 1e-5)
    torch.ops.pagoda.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(x, want_x, **TOLERANCE[dtype])


# Gemma's form: scale by (1 + w) in float32, one rounding at the end. Widths 96 and 256 (the
# per-head q/k norms), 83 for a row that no vector width divides.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [83, 96, 256])
def test_gemma_rms_norm(dtype: torch.dtype, n: int) -> None:
    x = torch.randn(37, n).to(dtype) * 3
    w = torch.randn(n).to(dtype) * 0.5
    torch.testing.assert_close(
        torch.ops.pagoda.gemma_rms_norm(x, w, 1e-6),
        gemma_rms_norm_torch(x, w, 1e-6),
        **TOLERANCE[dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_gemma_rms_norm_per_head_view(dtype: torch.dtype, tokens: int) -> None:
    """q and k as attention has them: [tokens, heads, head_dim] views into the qkv rows."""
    heads, kv_heads, dim = 4, 1, 256
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype) * 2
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    w = torch.randn(dim).to(dtype)
    for t, h in ((q, heads), (k, kv_heads)):
        t = t.view(tokens, h, dim)
        got = gemma_rms_norm(t, w, 1e-6)
        assert got.shape == t.shape
        torch.testing.assert_close(got, gemma_rms_norm_torch(t, w, 1e-6), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_add_rms_norm(dtype: torch.dtype) -> None:
    """In place, as add_rms_norm: residual becomes the sum as torch rounds it, x its norm."""
    x, residual = torch.randn(37, 640).to(dtype) * 3, torch.randn(37, 640).to(dtype)
    w = torch.randn(640).to(dtype)
    want_x, want_residual = gemma_add_rms_norm_torch(x, residual, w, 1e-6)
    got_x, got_residual = gemma_add_rms_norm(x, residual, w, 1e-6)
    assert got_x.data_ptr() == x.data_ptr() and got_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(x, want_x, **TOLERANCE[dtype])
