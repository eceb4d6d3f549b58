"""RMSNorm, Llama's and Gemma's, alone and fused with the residual add before it (csrc/norm.cpp)."""

from __future__ import annotations

import torch

from pagoda import kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalises the last dimension in float32, then scales by weight in x's dtype."""
    if kernels.available(x) and x.is_contiguous():
        if x.dim() == 2:  # the hidden states: no views to make (this runs twice a layer)
            return torch.ops.pagoda.rms_norm.default(x, weight, eps)
        return torch.ops.pagoda.rms_norm(x.view(-1, x.shape[-1]), weight, eps).view(x.shape)
    return rms_norm_torch(x, weight, eps)


def _normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x in float32 divided by the root mean square of its last dimension: both norms' core."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * _normalised(x, eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype before the norm.

    The C++ kernel does both in one pass and in place: x and residual are overwritten.
    """
    if kernels.available(x) and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
        torch.ops.pagoda.add_rms_norm.default(x, residual, weight, eps)
        return x, residual
    return add_rms_norm_torch(x, residual, weight, eps)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalises and scales by (1 + weight) in float32, then rounds to x's
    dtype. x is [rows, n], or [tokens, heads, n] with contiguous rows (attention's per-head
    q and k views into the qkv rows)."""
    fits = 2 <= x.dim() <= 3 and x.stride(-1) == 1 and weight.dtype == x.dtype
    if kernels.available(x) and fits:
        return torch.ops.pagoda.gemma_rms_norm.default(x, weight, eps)
    return gemma_rms_norm_torch(x, weight, eps)


def gemma_rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (_normalised(x, eps) * (1.0 + weight.float())).to(x.dtype)


def gemma_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemma_rms_norm(x + residual), x + residual), the sum rounded to x's dtype before the
    norm; in place where the kernel runs, as add_rms_norm."""
    fits = x.dim() == 2 and x.is_contiguous() and residual.is_contiguous()
    if kernels.available(x) and fits and weight.dtype == x.dtype:
        torch.ops.pagoda.gemma_add_rms_norm.default(x, residual, weight, eps)
        return x, residual
    return gemma_add_rms_norm_torch(x, residual, weight, eps)


def gemma_add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return gemma_rms_norm_torch(residual, weight, eps), residual
