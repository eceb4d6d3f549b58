"""Linear layers whose weight may be held in its GGUF file form instead of a dense copy."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.ops import quantized_gemm, quantized_linear
from pagoda.model.ops.quantized_gemm import RepackedWeight
from pagoda.model.ops.quantized_linear import GGUFWeight

Product = Callable[[torch.Tensor, GGUFWeight], torch.Tensor]


@functools.cache
def onednn_packs_bfloat16() -> bool:
    """Whether oneDNN lays bfloat16 weights out in advance on this CPU (it needs AVX-512 BW,
    VL and DQ, or AVX-NE-CONVERT; an AVX2-only CPU has neither, and its reorder raises)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Linear):
    """nn.Linear whose weight can be the GGUF file's blocks (`gguf`), with no dense copy.

    A few rows of input make a matrix-vector product whose time is reading the
    weight, so the gguf_linear kernel reads the file's 4-8 bits a weight; many rows
    make it compute-bound: the weight is then multiplied by the int8 GEMM from its
    blocks (gguf_gemm, the k-quants it takes), or decoded a tile at a time for a
    bfloat16 GEMM (gguf_matmul), or read from the dense weight where there is one.
    A weight the loader repacked for the int8 GEMM (`repacked`, then no `gguf`) runs that
    GEMM at every row count: without a tile to decode a call it beats the kernel at one row.
    """

    # Up to this many input rows the GGUF kernel beats the dense one (BENCHMARKS.md, section
    # 2); the loader measures the limit for the model's formats (loader/quantization.py).
    GGUF_MAX_ROWS = 8

    gguf: tuple[GGUFWeight, ...] = ()  # the weight's rows in their file form, a run per format
    # The same runs repacked for the int8 GEMM (quantized_gemm.repack), instead of gguf.
    repacked: tuple[RepackedWeight, ...] = ()
    gguf_max_rows = GGUF_MAX_ROWS
    # The formats whose steps above the row limit run the int8 GEMM rather than the decoded
    # tiles: the loader measures which is faster per format.
    gemm_formats: frozenset[str] = frozenset()
    prepacked = False  # weight is in oneDNN's blocked layout (pack_for_onednn)

    def hold_in_blocks(self) -> None:
        """Drops the dense weight: the loader gives the layer its file form (gguf) instead."""
        self.weight = None  # type: ignore[assignment]

    def pack_for_onednn(self) -> None:
        """Lays the weight out in advance as oneDNN's GEMM reads it (same values).

        F.linear would otherwise reorder the weight on every call; prepacked, a
        bfloat16 projection runs 1.1-2x faster (BENCHMARKS.md). CPU only; a layer
        held in blocks has no dense weight to pack, and a CPU oneDNN cannot pack for keeps
        the weight as it is.
        """
        if self.weight is None or not onednn_packs_bfloat16():
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.prepacked = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repacked:
            parts = [quantized_gemm.gguf_gemm_repacked(x, w) for w in self.repacked]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.gguf and (
            self.weight is None
            or (
                x.shape[0] <= self.gguf_max_rows
                and all(quantized_linear.kernel_takes(x, w) for w in self.gguf)
            )
        ):
            return self._from_blocks(x)
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.gguf_max_rows:
            # Without a bias to add in float32, the kernel rounds its sums to x's dtype
            # itself: no conversion op a projection (a decode step has over a hundred).
            dtype = x.dtype if self.bias is None else torch.float32
            parts = [quantized_linear.gguf_linear(x, w, dtype) for w in self.gguf]
        else:
            parts = [self._many_rows_product(w.format)(x, w) for w in self.gguf]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return (out if self.bias is None else out + self.bias).to(x.dtype)

    def _many_rows_product(self, format: str) -> Product:
        if format in self.gemm_formats:
            return quantized_gemm.gguf_gemm
        return quantized_linear.gguf_matmul
