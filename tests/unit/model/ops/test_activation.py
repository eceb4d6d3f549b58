"""silu_mul's and gelu_tanh_mul's C++ kernels against their PyTorch twins, in both dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE

from pagoda.model import ops
from pagoda.model.ops.activation import gelu_tanh_mul_torch, silu_mul_torch

pytestmark = pytest.mark.usefixtures("kernels_built")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    x = torch.randn(19, 2 * 83).to(dtype) * 4  # 83: the vector loop and its scalar tail
    x[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 1e4, -1e4, 1e-3, -1e-3])  # tails and zero
    torch.testing.assert_close(torch.ops.pagoda.silu_mul(x), silu_mul_torch(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_mul(dtype: torch.dtype) -> None:
    x = torch.randn(19, 2 * 83).to(dtype) * 4  # 83: the vector loop and its scalar tail
    x[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 1e4, -1e4, 1e-3, -1e-3])  # tails and zero
    torch.testing.assert_close(
        torch.ops.pagoda.gelu_tanh_mul(x), gelu_tanh_mul_torch(x), **TOLERANCE[dtype]
    )


def test_gelu_tanh_mul_rows_view() -> None:
    """The dispatcher takes rows with a stride (a slice of wider rows) and other shapes."""
    wide = torch.randn(7, 300)
    x = wide[:, : 2 * 96]
    torch.testing.assert_close(
        ops.gelu_tanh_mul(x), gelu_tanh_mul_torch(x), **TOLERANCE[torch.float32]
    )
    x3 = torch.randn(2, 3, 2 * 40)
    torch.testing.assert_close(
        ops.gelu_tanh_mul(x3), gelu_tanh_mul_torch(x3), **TOLERANCE[torch.float32]
    )
