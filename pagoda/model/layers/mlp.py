"""The gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one projection."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.model import ops
from pagoda.model.layers.linear import Linear

# Hugging Face's activation names -> act(gate) * up on the fused [gate | up] rows.
ACTIVATIONS = {"silu": ops.silu_mul, "gelu_pytorch_tanh": ops.gelu_tanh_mul}


class GatedMLP(nn.Module):
    """SwiGLU (silu: Llama) or GeGLU (gelu_pytorch_tanh: Gemma)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.act_mul = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_mul(self.gate_up_proj(x)))
