"""The gated MLP's activation: silu(gate) * up or gelu_tanh(gate) * up (csrc/activation.cpp)."""

from __future__ import annotations

import torch

from pagoda import kernels


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2n] = [gate | up] -> silu(gate) * up, [..., n]."""
    if kernels.available(x) and x.dim() == 2 and x.stride(1) == 1:
        return torch.ops.pagoda.silu_mul(x)
    return silu_mul_torch(x)


def silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2n] = [gate | up] -> gelu(gate, tanh approximation) * up, [..., n] (GeGLU)."""
    if kernels.available(x) and x.dim() == 2 and x.stride(1) == 1:
        return torch.ops.pagoda.gelu_tanh_mul(x)
    return gelu_tanh_mul_torch(x)


def gelu_tanh_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
