"""RMSNorm's C++ kernels against their PyTorch twins, in both dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE

from pagoda.model.ops.norm import add_rms_norm_torch, rms_norm_torch

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
