"""Linear layers whose weight may also be held as 4-bit codes (small batches) or int8 (large)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model import ops


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


class Linear(nn.Linear):
    """nn.Linear that can also hold its weight as 4-bit codes, used for small batches.

    A few rows of input make a matrix-vector product whose time is reading the
    weight, so 4-bit codes (a quarter of bfloat16's bytes) are faster there; many
    rows make it compute-bound, where the dense bfloat16 GEMM wins, or, at some
    cost in accuracy, an int8 one (set_int8).
    """

    # Up to this many input rows the int4 kernel beats the dense one (BENCHMARKS.md).
    INT4_MAX_ROWS = 8

    int4: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed codes, scales and zeros)
    int8: tuple[torch.Tensor, torch.Tensor] | None = None  # (codes [in, out], scale [out])
    rotation: tuple[torch.Tensor, torch.Tensor]  # set with int8, as is int8_dtype: see set_int8
    int8_dtype: torch.dtype
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

    def set_int8(self) -> None:
        """Replaces the dense weight by int8 codes per output row, and inputs by int8 rows.

        The product then runs on int8 dot-product instructions, at twice bfloat16's
        rate (BENCHMARKS.md). A few channels of a transformer's activations are far
        larger than the rest, and would leave the rest a handful of the 255 levels
        of their row. So, as QuaRot does, inputs and weight rows are first turned by
        the same random rotation R, which leaves x @ W.T = (x R) @ (W R).T and
        spreads every channel's share over all of them. R is the Kronecker product
        of two small random rotations (a [p, q] view of the row, turned on each
        side), which costs 2 (p + q) multiply-adds per input value, not 2 p q.
        """
        cols = self.in_features
        p = max(d for d in range(1, math.isqrt(cols) + 1) if cols % d == 0)
        generator = torch.Generator().manual_seed(0)
        self.rotation = tuple(
            torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
            .float()
            .to(self.weight.device)
            for n in (p, cols // p)
        )
        w = self._rotate(self.weight.float())
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.int8 = (torch.round(w / scale[:, None]).to(torch.int8).t(), scale)
        self.int8_dtype = self.weight.dtype  # of the outputs
        self.weight = None

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x (float32) times the Kronecker product of the two rotations."""
        left, right = self.rotation
        return (left.T @ x.view(-1, len(left), len(right)) @ right).view(x.shape)

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
        elif self.int8 is not None:
            out = ops.int8_linear(self._rotate(x.float()), *self.int8, self.int8_dtype)
        else:
            return self._dense(x)
        return out if self.bias is None else out + self.bias

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
