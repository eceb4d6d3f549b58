"""The model's small steps, each as plain PyTorch and, on the CPU, as one C++ kernel.

The PyTorch functions (`*_torch`) define what each step computes; the C++
kernels (pagoda/kernels) compute the same in one pass over the data, and are
used for CPU tensors once built. Both paths are tested against each other.
"""

from __future__ import annotations

import torch

from pagoda import kernels
from pagoda.model.layers.linear import Q8Weight
from pagoda.model.ops.attention import paged_attention

__all__ = [
    "add_rms_norm",
    "paged_attention",
    "q8_0_linear",
    "rms_norm",
    "rope_and_cache",
    "silu_mul",
]


_kernel = kernels.available


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalises the last dimension in float32, then scales by weight in x's dtype."""
    if _kernel(x) and x.is_contiguous():
        if x.dim() == 2:  # the hidden states: no views to make (this runs twice a layer)
            return torch.ops.pagoda.rms_norm.default(x, weight, eps)
        return torch.ops.pagoda.rms_norm(x.view(-1, x.shape[-1]), weight, eps).view(x.shape)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype before the norm.

    The C++ kernel does both in one pass and in place: x and residual are overwritten.
    """
    if _kernel(x) and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
        torch.ops.pagoda.add_rms_norm.default(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2n] = [gate | up] -> silu(gate) * up, [..., n]."""
    if _kernel(x) and x.dim() == 2 and x.stride(1) == 1:
        return torch.ops.pagoda.silu_mul(x)
    return silu_mul_torch(x)


def silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place by position, then caches k and v.

    cos_sin is the [max_positions, D] float32 table of RotaryEmbedding: cos | sin.
    """
    if _kernel(q):
        torch.ops.pagoda.rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    else:
        rope_and_cache_torch(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)


def rope_and_cache_torch(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping) -> None:
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):  # the rotate-half form Hugging Face uses
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))
    block_size = k_cache.shape[2]
    blocks, rows = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, rows] = k  # [tokens, kv_heads, head_dim] into each head's row
    v_cache[blocks, :, rows] = v


def q8_0_linear(x: torch.Tensor, w: Q8Weight, dense: torch.Tensor) -> torch.Tensor:
    """x @ W.T in float32 for W in Q8_0 form; dense is W dequantized, for the PyTorch path."""
    if _kernel(x) and x.is_contiguous():
        return torch.ops.pagoda.q8_0_linear(x, w.codes, w.scale)
    return torch.nn.functional.linear(x, dense).float()
