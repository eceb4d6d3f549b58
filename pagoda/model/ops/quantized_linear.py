"""Matrix products with a weight kept in its GGUF block form (csrc/quantized_linear.cpp).

For a few rows of input, where reading the weight is the whole cost of the product,
reading the file's 4-8 bits a weight beats reading bfloat16's 16. As llama.cpp does,
the input is quantized to int8 per 32 values, so each block's dot product is integer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda import kernels
from pagoda.model.quants import BLOCK, dequantize


@dataclass
class GGUFWeight:
    """A [rows, cols] matrix in one GGUF block format, as the file holds it: row r is
    blocks[r], its cols weights in consecutive blocks of the format."""

    blocks: torch.Tensor  # [rows, bytes a row] uint8
    format: str  # the GGUF type name: Q8_0, Q4_K, ...

    def rows(self, index: torch.Tensor) -> GGUFWeight:
        return GGUFWeight(self.blocks[index], self.format)


def stack(parts: list[GGUFWeight]) -> tuple[GGUFWeight, ...]:
    """Matrices with the same columns stacked by rows, the first first: one a run of a format."""
    runs: list[list[GGUFWeight]] = []
    for part in parts:
        if runs and runs[-1][0].format == part.format:
            runs[-1].append(part)
        else:
            runs.append([part])
    return tuple(GGUFWeight(torch.cat([p.blocks for p in run]), run[0].format) for run in runs)


@functools.cache
def kernel_formats() -> frozenset[str]:
    """The formats the C++ kernel takes in this build (none without AVX-512 VNNI)."""
    return frozenset(torch.ops.pagoda.gguf_linear_formats()) if kernels.load() else frozenset()


def kernel_takes(x: torch.Tensor, w: GGUFWeight) -> bool:
    return kernels.available(x) and w.format in kernel_formats()


def gguf_linear(x: torch.Tensor, w: GGUFWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ W.T, x quantized to int8 per 32 values first; summed in float32, then rounded
    once to dtype (float32 or bfloat16)."""
    if kernel_takes(x, w):
        return torch.ops.pagoda.gguf_linear(x.contiguous(), w.blocks, w.format, dtype)
    return gguf_linear_torch(x, w, dtype)


def gguf_linear_torch(
    x: torch.Tensor, w: GGUFWeight, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    weight = dequantize(w.blocks, w.format).reshape(w.blocks.shape[0], -1)
    return F.linear(quantize_rows_torch(x), weight).to(dtype)


def quantize_rows_torch(x: torch.Tensor) -> torch.Tensor:
    """x in float32 as int8 codes per 32 values hold it: round(x * 127 / m) * m / 127 for
    m = max |x| of the block, rounding half to even."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a division (127 / amax would be amax.reciprocal() * 127, a different rounding)
    codes = torch.round(blocks * torch.where(amax > 0, amax.new_tensor(127.0) / amax, 0))
    return (codes * (amax / 127)).reshape(x.shape)


# Steps of many rows are compute-bound, where a bfloat16 GEMM beats gguf_linear; gguf_matmul
# decodes the weight a tile of rows at a time into one reused buffer of about this many bytes
# and multiplies from there, so no full-precision copy of the weight is kept (BENCHMARKS.md,
# section 9: tiles of 512-2048 rows of 2048 weights measured best, whole matrices no better).
TILE_BYTES = 8 << 20
MIN_TILE_ROWS = 256  # a GEMM of a useful width


def dequantize_rows(w: GGUFWeight, dtype: torch.dtype) -> torch.Tensor:
    """The matrix's values [rows, cols] in dtype (float32 arithmetic, rounded once)."""
    if kernels.available(w.blocks) and w.format in kernel_formats() and dtype in _DTYPES:
        return torch.ops.pagoda.gguf_dequantize(w.blocks, w.format, dtype)
    return dequantize_rows_torch(w, dtype)


def dequantize_rows_torch(w: GGUFWeight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(w.blocks, w.format).reshape(w.blocks.shape[0], -1).to(dtype)


def gguf_matmul(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
    """x @ W.T in x's dtype, W dequantized to that dtype tile by tile (x is not quantized)."""
    if kernel_takes(x, w) and x.dtype in _DTYPES:
        return torch.ops.pagoda.gguf_matmul(x.contiguous(), w.blocks, w.format, tile_rows(w, x))
    return gguf_matmul_torch(x, w)


def gguf_matmul_torch(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
    return F.linear(x, dequantize_rows_torch(w, x.dtype))


def tile_rows(w: GGUFWeight, x: torch.Tensor) -> int:
    """Weight rows a tile: TILE_BYTES of x's dtype, at least MIN_TILE_ROWS."""
    return max(MIN_TILE_ROWS, TILE_BYTES // (x.shape[1] * x.element_size()))


_DTYPES = (torch.float32, torch.bfloat16)  # what the dequantizing kernels write
