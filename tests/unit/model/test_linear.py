"""Linear's faster forms compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import bind_cache, forward

from pagoda.model.layers.linear import Linear, onednn_packs_bfloat16
from pagoda.model.loader import load_model


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_prepacked_weight_gives_the_same_outputs(bias: bool) -> None:
    torch.manual_seed(0)
    layer = Linear(96, 80, bias=bias).to(torch.bfloat16)
    inputs = [torch.randn(rows, 96, dtype=torch.bfloat16) for rows in (1, 5, 33, 300)]
    expected = [layer(x) for x in inputs]
    layer.pack_for_onednn()
    assert layer.prepacked is onednn_packs_bfloat16()  # an AVX2-only CPU keeps it as it is
    for x, want in zip(inputs, expected):
        assert torch.equal(layer(x), want)


def test_prepacked_model_gives_the_same_logits(tiny_model_dir) -> None:
    model = load_model(tiny_model_dir("llama"), torch.bfloat16)
    bind_cache(model)
    chunk = [(list(range(3, 40)), 0, list(range(10)))]
    expected = forward(model, chunk)
    model.pack_for_onednn()
    assert (model.output_prepacked is not None) is onednn_packs_bfloat16()
    for got, want in zip(forward(model, chunk), expected):
        assert torch.equal(got, want)
