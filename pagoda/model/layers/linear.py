"""Linear layers whose weight may also be held in its GGUF file form, for small batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.ops import quantized_linear
from pagoda.model.ops.quantized_linear import GGUFWeight


class Linear(nn.Linear):
    """nn.Linear that can also hold its weight as the GGUF file's blocks, used for small batches.

    A few rows of input make a matrix-vector product whose time is reading the
    weight, so the file's 4-8 bits a weight are faster there than bfloat16's 16;
    many rows make it compute-bound, where the dense bfloat16 GEMM wins.
    """

    # Up to this many input rows the GGUF kernel beats the dense one (BENCHMARKS.md, section 2).
    GGUF_MAX_ROWS = 8

    gguf: tuple[GGUFWeight, ...] = ()  # the weight's rows in their file form, a run per format
    prepacked = False  # weight is in oneDNN's blocked layout (pack_for_onednn)

    def pack_for_onednn(self) -> None:
        """Lays the weight out in advance as oneDNN's GEMM reads it (same values).

        F.linear would otherwise reorder the weight on every call; prepacked, a
        bfloat16 projection runs 1.1-2x faster (BENCHMARKS.md). CPU only.
        """
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.prepacked = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.gguf
            and x.shape[0] <= self.GGUF_MAX_ROWS
            and all(quantized_linear.kernel_takes(x, w) for w in self.gguf)
        ):
            parts = [quantized_linear.gguf_linear(x, w) for w in self.gguf]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
