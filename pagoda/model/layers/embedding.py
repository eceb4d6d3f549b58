"""Token embeddings, optionally scaled (Gemma multiplies them by sqrt(hidden_size))."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.model.ops import quantized_gemm, quantized_linear
from pagoda.model.ops.quantized_gemm import RepackedWeight
from pagoda.model.ops.quantized_linear import GGUFWeight


class Embedding(nn.Embedding):
    """nn.Embedding whose table can be the GGUF file's blocks, or a tied output layer's
    repacked form: rows gathered, then decoded."""

    gguf: GGUFWeight | None = None  # the table's rows in their file form
    repacked: RepackedWeight | None = None  # or in the repacked output layer's (tied)
    gguf_dtype = torch.float32  # what they are decoded to

    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__(vocab_size, hidden_size)
        self.scale = scale

    def hold_in_blocks(self, dtype: torch.dtype) -> None:
        """Drops the dense table: the loader gives the layer its file form (gguf) instead,
        whose rows are decoded to dtype."""
        self.weight = None  # type: ignore[assignment]
        self.gguf_dtype = dtype

    def gather_from(self, w: RepackedWeight) -> None:
        """Gathers the rows from w, the tied output layer repacked, and no longer from the
        file's blocks: those pages are not read again, so the table is resident once."""
        self.repacked, self.gguf = w, None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.repacked is not None:
            x = quantized_gemm.repacked_rows(self.repacked, input_ids, self.gguf_dtype)
        elif self.gguf is not None:
            x = quantized_linear.dequantize_rows(self.gguf.rows(input_ids), self.gguf_dtype)
        else:
            x = super().forward(input_ids)
        if self.scale is None:
            return x
        # The scale is rounded to the run dtype first, as transformers does.
        return x * torch.tensor(self.scale, dtype=x.dtype)
