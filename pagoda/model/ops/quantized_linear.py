"""Matrix products with a weight kept in a quantized GGUF form (csrc/quantized_linear.cpp):
for a few rows of input, where reading the weight is the whole cost."""

from __future__ import annotations

import torch

from pagoda import kernels
from pagoda.model.layers.linear import Q8Weight


def q8_0_linear(x: torch.Tensor, w: Q8Weight, dense: torch.Tensor) -> torch.Tensor:
    """x @ W.T in float32 for W in Q8_0 form; dense is W dequantized, for the PyTorch path."""
    if kernels.available(x) and x.is_contiguous():
        return torch.ops.pagoda.q8_0_linear(x, w.codes, w.scale)
    return q8_0_linear_torch(x, w, dense)


def q8_0_linear_torch(x: torch.Tensor, w: Q8Weight, dense: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, dense).float()
