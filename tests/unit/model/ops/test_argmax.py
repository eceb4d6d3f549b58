"""argmax_rows's C++ kernel gives torch.argmax's index."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.ops.argmax import argmax_rows_torch

pytestmark = pytest.mark.usefixtures("kernels_built")


def test_argmax_rows_equals_torch_argmax() -> None:
    """Ties go to the first index, a NaN wins, rows of -inf give 0, as in torch.argmax."""
    x = torch.randn(32, 4099)  # 4099: the vector loops and their scalar tails
    x[1, 7] = x[1, 4000] = 100.0  # a tie
    x[2] = float("-inf")
    x[3, 4098] = float("inf")
    x[4, 20] = x[4, 30] = float("nan")
    x[5, 4097] = float("nan")
    assert torch.equal(torch.ops.pagoda.argmax_rows(x), argmax_rows_torch(x))
