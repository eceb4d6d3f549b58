"""q8_0_linear's C++ kernel against its PyTorch twin on the dequantized weight."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.layers.linear import Q8Weight
from pagoda.model.ops.quantized_linear import q8_0_linear_torch

pytestmark = pytest.mark.usefixtures("kernels_built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_q8_0_linear(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(0)
    n, k = 70, 96  # 3 blocks of 32 a row
    w = Q8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32) / 64)
    dense = (w.codes.float().view(n, -1, 32) * w.scale.unsqueeze(-1)).view(n, k)
    x = torch.randn(rows, k).to(dtype)
    got = torch.ops.pagoda.q8_0_linear(x, w.codes, w.scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, q8_0_linear_torch(x.float(), w, dense), rtol=1e-4, atol=1e-4)
