"""RMS norms, each of which can also add the residual stream in the same pass."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.model import ops


class RMSNorm(nn.Module):
    """Llama's: normalise in float32, round to the run dtype, then scale by w."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's: normalise and scale by (1 + w) both in float32, then round to the run dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.gemma_rms_norm(x, self.weight, self.eps)
        return ops.gemma_add_rms_norm(x, residual, self.weight, self.eps)
