"""Token embeddings, optionally scaled (Gemma multiplies them by sqrt(hidden_size))."""

from __future__ import annotations

import torch
from torch import nn


class Embedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__(vocab_size, hidden_size)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        if self.scale is None:
            return x
        # The scale is rounded to the run dtype first, as transformers does.
        return x * torch.tensor(self.scale, dtype=x.dtype)
