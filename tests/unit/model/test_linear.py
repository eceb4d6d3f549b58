"""Linear's faster forms compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import bind_cache, forward

from pagoda.model.linear import Linear
from pagoda.model.loader import load_model


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


def test_prepacked_model_gives_the_same_logits(tiny_model_dir) -> None:
    model = load_model(tiny_model_dir("llama"), torch.bfloat16)
    bind_cache(model)
    chunk = [(list(range(3, 40)), 0, list(range(10)))]
    expected = forward(model, chunk)
    model.pack_for_onednn()
    assert model.output_prepacked is not None
    for got, want in zip(forward(model, chunk), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("in_features", [96, 576, 97])  # 97 is prime: a rotation of 1 x 97
def test_int8_rotation_leaves_the_product_unchanged(in_features: int) -> None:
    torch.manual_seed(0)
    layer = Linear(in_features, 40, bias=False)
    x, w = torch.randn(7, in_features), layer.weight.detach().clone()
    layer.set_int8()
    turned_x, turned_w = layer._rotate(x), layer._rotate(w)
    torch.testing.assert_close(turned_x @ turned_w.T, x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(turned_x.norm(dim=1), x.norm(dim=1))


@pytest.mark.parametrize("bias", [False, True])
def test_int8_weight_is_close_to_the_dense_one_despite_outlier_channels(bias: bool) -> None:
    torch.manual_seed(0)
    layer = Linear(576, 200, bias=bias).to(torch.bfloat16)
    x = torch.randn(40, 576)
    x[:, 7] *= 100  # one channel far larger than the rest, as transformer activations have
    x = x.to(torch.bfloat16)
    dense = layer(x).float()
    layer.set_int8()
    assert layer.weight is None
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # Without the rotation, the outlier would take the whole int8 range of each row
    # and leave the other channels 0 or +-1: an error of the order of the output.
    assert (out.float() - dense).norm() / dense.norm() < 0.02


def test_w8a8_model_logits_stay_close(tiny_model_dir) -> None:
    model = load_model(tiny_model_dir("llama"), torch.bfloat16)
    bind_cache(model)
    chunk = [(list(range(3, 40)), 0, list(range(10)))]
    expected = forward(model, chunk)
    model.use_int8()
    for got, want in zip(forward(model, chunk), expected):
        assert (got - want).norm() / want.norm() < 0.05
