"""Linear's faster forms compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.linear import Linear


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_prepacked_weight_gives_the_same_outputs(bias: bool) -> None:
    torch.manual_seed(0)
    layer = Linear(96, 80, bias=bias).to(torch.bfloat16)
    inputs = [torch.randn(rows, 96, dtype=torch.bfloat16) for rows in (1, 5, 33, 300)]
    expected = [layer(x) for x in inputs]
    layer.pack_for_onednn()
    assert layer.prepacked
    for x, want in zip(inputs, expected):
        assert torch.equal(layer(x), want)
