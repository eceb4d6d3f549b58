"""Products of many rows with a K-quant weight in its GGUF blocks (csrc/quantized_gemm.cpp).

A step of many rows is compute-bound; an int8 product instruction (vpdpbusd) does twice
the products of a bfloat16 one. As llama.cpp does (its Q8_K), the input is quantized to
int8 per 256 values, and each super-block's dot product is taken in integers with the
weight's codes and sub-block scales, one float product per super-block:

    dx * (d * sum_j sc_j * sum_{l in j} q_l x_l + dm * sum_j mn_j * sum_{l in j} x_l)

for sub-blocks j of the super-block's 256 weights w = d * sc_j * q + dm * mn_j: Q4_K's 8
of 32 (dm = -dmin, mn_j the 6-bit minimum) and Q6_K's 16 of 16 (q - 32: dm = d, mn_j =
-32 sc_j). The twin takes the integer sums exactly (in float64) and combines them in float64.
"""

from __future__ import annotations

import functools

import torch

from pagoda import kernels
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.quants import BLOCK_BYTES, SUPER_BLOCK, integer_form


@functools.cache
def gemm_formats() -> frozenset[str]:
    """The formats the C++ kernel takes in this build (none without AVX-512 VNNI)."""
    return frozenset(torch.ops.pagoda.gguf_gemm_formats()) if kernels.load() else frozenset()


def gemm_takes(x: torch.Tensor, w: GGUFWeight) -> bool:
    return (
        kernels.available(x)
        and w.format in gemm_formats()
        and x.dtype in (torch.float32, torch.bfloat16)
    )


def gguf_gemm(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
    """x @ W.T in float32, x quantized to int8 per 256 values first."""
    if gemm_takes(x, w):
        return torch.ops.pagoda.gguf_gemm(x.contiguous(), w.blocks, w.format)
    return gguf_gemm_torch(x, w)


def quantize_inputs_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] as int8 codes per 256 values ([rows, k / 256, 256], float64) and their
    scales dx ([rows, k / 256], float32): codes round(x * (127 / amax)), rounding half to
    even, dx = amax / 127."""
    blocks = x.float().reshape(x.shape[0], -1, SUPER_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, amax.new_tensor(127.0) / amax, 0))
    return codes.double(), (amax / 127).squeeze(-1)


def integer_parts(w: GGUFWeight) -> tuple[torch.Tensor, ...]:
    """(codes q [n, supers, subs, values], sc [n, supers, subs], mn [n, supers, subs],
    d [n, supers], dm [n, supers]): the weight as w = d * sc * q + dm * mn per sub-block,
    the integer parts in float64 (exact)."""
    n = w.blocks.shape[0]
    q, sc, mn, d, dm = integer_form(w.format, w.blocks.reshape(-1, BLOCK_BYTES[w.format]))
    blocks = q.shape[0]
    return (
        q.double().reshape(n, blocks // n, *q.shape[1:]),
        sc.double().reshape(n, blocks // n, -1),
        mn.double().reshape(n, blocks // n, -1),
        d.double().reshape(n, -1),
        dm.double().reshape(n, -1),
    )


def gguf_gemm_torch(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
    q, sc, mn, d, dm = integer_parts(w)
    codes, dx = quantize_inputs_torch(x)
    rows, supers = codes.shape[:2]
    xs = codes.reshape(rows, supers, q.shape[2], q.shape[3])  # [rows, supers, subs, values]
    dots = torch.einsum("rsjl,nsjl->rnsj", xs, q)
    total = (dots * sc).sum(-1)  # [rows, n, supers]
    minimum = torch.einsum("rsj,nsj->rns", xs.sum(-1), mn)
    return (dx.double().unsqueeze(1) * (d * total + dm * minimum)).sum(-1).float()
