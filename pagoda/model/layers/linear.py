"""Linear layers whose weight may also be held as 4- or 8-bit codes, for small batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import kernels


@dataclass
class Int4Weight:
    """A [rows, cols] matrix as 4-bit codes: weight = (code - 8) * scale + zero per 32 columns."""

    codes: torch.Tensor  # [rows, cols] uint8 in 0..15
    scale: torch.Tensor  # [rows, cols / 32] float32
    zero: torch.Tensor  # [rows, cols / 32] float32

    def rows(self, index: torch.Tensor) -> Int4Weight:
        return Int4Weight(self.codes[index], self.scale[index], self.zero[index])

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Stacks matrices with the same columns, rows of the first first."""
        return Int4Weight(
            *(torch.cat(p) for p in zip(*((w.codes, w.scale, w.zero) for w in parts)))
        )


@dataclass
class Q8Weight:
    """A [rows, cols] matrix in GGUF's Q8_0 form: weight = scale * code per 32 columns."""

    codes: torch.Tensor  # [rows, cols] int8
    scale: torch.Tensor  # [rows, cols / 32] float32

    def rows(self, index: torch.Tensor) -> Q8Weight:
        return Q8Weight(self.codes[index], self.scale[index])

    @staticmethod
    def cat(parts: list[Q8Weight]) -> Q8Weight:
        """Stacks matrices with the same columns, rows of the first first."""
        return Q8Weight(torch.cat([w.codes for w in parts]), torch.cat([w.scale for w in parts]))


class Linear(nn.Linear):
    """nn.Linear that can also hold its weight as 4-bit codes, used for small batches.

    A few rows of input make a matrix-vector product whose time is reading the
    weight, so 4-bit codes (a quarter of bfloat16's bytes) are faster there; many
    rows make it compute-bound, where the dense bfloat16 GEMM wins.
    """

    # Up to this many input rows the int4 kernel beats the dense one, and the int8 one
    # (which converts its codes once per row) does (BENCHMARKS.md, section 2).
    INT4_MAX_ROWS = 8
    Q8_MAX_ROWS = 1

    int4: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed codes, scales and zeros)
    q8: Q8Weight | None = None  # int8 codes of a Q8_0 or Q5_0 weight, for the C++ kernel
    prepacked = False  # weight is in oneDNN's blocked layout (pack_for_onednn)

    def set_int4(self, w: Int4Weight) -> None:
        """Packs w ([out, in] codes) for the int4 kernel, scales in the weight's dtype."""
        self.int4 = (
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes.to(torch.int32), 1),
            torch.stack([w.scale, w.zero], dim=-1)
            .transpose(0, 1)
            .contiguous()
            .to(self.weight.dtype),
        )

    def pack_for_onednn(self) -> None:
        """Lays the weight out in advance as oneDNN's GEMM reads it (same values).

        F.linear would otherwise reorder the weight on every call; prepacked, a
        bfloat16 projection runs 1.1-2x faster (BENCHMARKS.md). CPU only.
        """
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.prepacked = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and x.shape[0] <= self.INT4_MAX_ROWS:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4[0], 32, self.int4[1])
            return out if self.bias is None else out + self.bias
        if self.q8 is not None and x.shape[0] <= self.Q8_MAX_ROWS and kernels.available(x):
            out = torch.ops.pagoda.q8_0_linear(x.contiguous(), self.q8.codes, self.q8.scale)
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
