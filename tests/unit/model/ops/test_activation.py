"""silu_mul's C++ kernel against its PyTorch twin, in both dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE

from pagoda.model.ops.activation import silu_mul_torch

pytestmark = pytest.mark.usefixtures("kernels_built")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    x = torch.randn(19, 2 * 83).to(dtype) * 4  # 83: the vector loop and its scalar tail
    torch.testing.assert_close(torch.ops.pagoda.silu_mul(x), silu_mul_torch(x), **TOLERANCE[dtype])
