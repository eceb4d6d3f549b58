"""Products of many rows with a K-quant weight in its GGUF blocks (csrc/quantized_gemm.cpp).

A step of many rows is compute-bound; an int8 product instruction (vpdpbusd) does twice
the products of a bfloat16 one. As llama.cpp does (its Q8_K), the input is quantized to
int8 per 256 values, and each super-block's dot product is taken in integers with the
weight's codes and sub-block scales, one float product per super-block:

    dx * (d * sum_j sc_j * sum_{l in j} q_l x_l + dm * sum_j mn_j * sum_{l in j} x_l)

for sub-blocks j of the super-block's 256 weights w = d * sc_j * q + dm * mn_j: Q4_K's 8
of 32 (dm = -dmin, mn_j the 6-bit minimum) and Q6_K's 16 of 16 (q - 32: dm = d, mn_j =
-32 sc_j). The twin takes the integer sums exactly (in float64) and combines them in float64.

A weight can also be repacked once, at load (repack), into the layout the kernel's
microkernel reads as it is: 16 columns in a vector's dword lanes, 4 consecutive codes a
lane, two such vectors a 64-byte load (low and high nibbles; Q6_K's top 2 bits in a plane
of their own), the sub-blocks' scales and minimums as bytes per lane and d, dm as float16,
in about the file's bytes. gguf_gemm_repacked then computes exactly what gguf_gemm computes
from the file's blocks, bit for bit, without decoding a tile a call: at a few rows too,
where the decoding used to be most of its time. repack_torch is the repacking's twin.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagoda import kernels
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.quants import BLOCK_BYTES, SUPER_BLOCK, integer_form

LANES = 16  # output columns a vector of the microkernel
# A repacked super-block of 16 columns, field by field in byte order: (name, entries a
# lane, bytes an entry), each field [entries][16 lanes][bytes] (csrc/quantized_gemm.h's
# RepackedQ4_K and RepackedQ6_K). "q": the 32 code vectors of 64 bytes, a lane's 4 bytes
# each; "pad": Q6_K's 32 zero bytes, to a multiple of 64.
REPACKED_FIELDS = {
    "Q4_K": (("q", 32, 4), ("sc", 8, 1), ("mn", 4, 2), ("d", 1, 2), ("dm", 1, 2)),
    "Q6_K": (("q", 32, 4), ("high", 16, 4), ("sc", 16, 1), ("d", 1, 2), ("pad", 1, 2)),
}


def _layout(fields: tuple[tuple[str, int, int], ...]) -> dict[str, tuple[int, int, int]]:
    """Each field's (first byte, entries a lane, bytes an entry)."""
    layout, at = {}, 0
    for name, count, width in fields:
        layout[name] = (at, count, width)
        at += LANES * count * width
    return layout


REPACKED_LAYOUT = {fmt: _layout(fields) for fmt, fields in REPACKED_FIELDS.items()}
# Bytes of a super-block of 16 columns, repacked (the file's: 16 x 144 and 16 x 210).
REPACKED_BYTES = {
    fmt: sum(LANES * count * width for _, count, width in fields)
    for fmt, fields in REPACKED_FIELDS.items()
}


@dataclass(frozen=True)
class RepackedWeight:
    """A [rows, cols] K-quant matrix repacked for gguf_gemm_repacked: data is [ceil(rows /
    16), cols / 256, REPACKED_BYTES[format]] uint8, a column vector's super-blocks in turn."""

    data: torch.Tensor
    format: str
    rows: int

    @property
    def cols(self) -> int:
        return self.data.shape[1] * SUPER_BLOCK


@functools.cache
def gemm_formats() -> frozenset[str]:
    """The formats the C++ kernel takes in this build (none without AVX-512 VNNI or AVX2)."""
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


def repack_formats() -> frozenset[str]:
    """The formats that have a repacked layout in this build (those of the C++ GEMM)."""
    return gemm_formats() & REPACKED_BYTES.keys()


def repack(w: GGUFWeight) -> RepackedWeight:
    """w in the repacked layout (C++, in parallel; a format of repack_formats())."""
    return RepackedWeight(torch.ops.pagoda.gguf_repack(w.blocks, w.format), w.format, len(w.blocks))


def gguf_gemm_repacked(x: torch.Tensor, w: RepackedWeight) -> torch.Tensor:
    """x @ W.T in float32 as gguf_gemm computes it (bit for bit), from w's repacked form; x
    float32 or bfloat16."""
    return torch.ops.pagoda.gguf_gemm_repacked(x.contiguous(), w.data, w.format, w.rows)


def repack_torch(w: GGUFWeight) -> torch.Tensor:
    """The bytes repack gives, [ceil(rows / 16), supers, REPACKED_BYTES[format]] uint8,
    the fields of REPACKED_FIELDS in turn.

    Per 16 columns (lanes L; columns past the last are zeros) and super-block: the codes
    as 64 quads t of 4 consecutive codes, byte 4 L + b of quad t the code 4 t + b of column
    L; vector j h + u (h the quads of half a sub-block) holds quad 2 j h + u in its low
    nibbles and quad (2 j + 1) h + u in its high ones. Q4_K then: sc bytes, the minimums
    (mn_2p, mn_2p+1) a lane, d and dm = -dmin float16. Q6_K: the top 2 bits (quad 4 j +
    e's at bits 2 e, 2 e + 1 of the sub-block j's vector), sc int8, d float16."""
    q, sc, mn, d, dm = integer_form(w.format, w.blocks.reshape(-1, BLOCK_BYTES[w.format]))
    n, supers = w.blocks.shape[0], q.shape[0] // max(w.blocks.shape[0], 1)
    vectors = -(-n // LANES)

    def lanes(t: torch.Tensor) -> torch.Tensor:
        """[n, supers, ...] -> [vectors, supers, ..., 16]: zero columns added, lanes last."""
        t = t.reshape(n, supers, -1)
        t = torch.cat([t, t.new_zeros(vectors * LANES - n, *t.shape[1:])])
        return t.reshape(vectors, LANES, supers, -1).permute(0, 2, 3, 1)

    codes = lanes(q.to(torch.uint8)).reshape(vectors, supers, 64, 4, LANES)
    quads = codes.transpose(-1, -2).reshape(vectors, supers, 64, 64)  # [t][4 L + b]
    subs = sc.shape[1]
    half = 64 // subs // 2  # quads in half a sub-block
    t = torch.arange(64).reshape(subs, 2, half)
    packed = (quads[:, :, t[:, 0]] & 0x0F) | ((quads[:, :, t[:, 1]] & 0x0F) << 4)
    parts = {"q": packed, "d": _f16_bytes(lanes(d))}
    if w.format == "Q4_K":
        minimums = lanes(mn.to(torch.uint8)).reshape(vectors, supers, 4, 2, LANES)
        parts |= {
            "sc": lanes(sc.to(torch.uint8)),
            "mn": minimums.transpose(-1, -2),
            "dm": _f16_bytes(lanes(dm)),
        }
    else:
        top = (quads.reshape(vectors, supers, subs, 4, 64) >> 4) & 3
        shift = (2 * torch.arange(4, dtype=torch.uint8)).reshape(4, 1)
        parts |= {
            "high": (top << shift).sum(3, dtype=torch.uint8),
            "sc": lanes(sc.to(torch.int8)).contiguous().view(torch.uint8),
            "pad": torch.zeros(vectors, supers, 32, dtype=torch.uint8),
        }
    fields = REPACKED_FIELDS[w.format]
    return torch.cat([parts[name].reshape(vectors, supers, -1) for name, _, _ in fields], dim=-1)


def repacked_rows(w: RepackedWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ids of w's matrix, [len(ids), cols] in dtype, decoded from its repacked form
    alone (a tied embedding's lookup when the output layer is repacked): the file's values,
    to the bit."""
    if kernels.available(w.data) and w.format in repack_formats():
        return torch.ops.pagoda.gguf_repacked_rows(w.data, w.format, w.rows, ids, dtype)
    return repacked_rows_torch(w, ids).to(dtype)


def repacked_rows_torch(w: RepackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """repack_torch's layout read back for rows ids: float32 (d * sc) * q + dm * mn, Q6_K's
    as (d * sc) * (q - 32), as the file's decoding computes them."""
    n, q4 = len(ids), w.format == "Q4_K"
    if n == 0:
        return torch.zeros(0, w.cols)
    subs, values = (8, 32) if q4 else (16, 16)
    half = values // 8  # quads in half a sub-block
    # [n, supers, bytes]: the rows' vectors, then each row's lane of every per-lane field
    data = w.data[ids // LANES]
    lane = (ids % LANES).reshape(n, 1, 1, 1)
    layout = REPACKED_LAYOUT[w.format]

    def field(name: str, dtype: torch.dtype) -> torch.Tensor:
        """The field as [n, supers, entries, bytes an entry] of each row's lane, in dtype."""
        start, count, width = layout[name]
        t = data[..., start : start + count * LANES * width].reshape(n, -1, count, LANES, width)
        index = lane.unsqueeze(-1).expand(n, t.shape[1], count, 1, width)
        return t.gather(3, index).squeeze(3).contiguous().view(dtype)

    quads = field("q", torch.uint8).reshape(n, -1, subs, 1, half * 4)
    codes = torch.cat([quads & 0x0F, quads >> 4], dim=3).reshape(n, -1, subs, values)
    d = field("d", torch.float16).float()
    if q4:
        sc = field("sc", torch.uint8)
        mn = field("mn", torch.uint8).reshape(n, -1, subs, 1)
        dm = field("dm", torch.float16).float()
        return ((d * sc) * codes + dm * mn).reshape(n, -1)
    top = field("high", torch.uint8).reshape(n, -1, subs, 1, 4)
    shifts = (2 * torch.arange(4, dtype=torch.uint8)).reshape(4, 1)  # quad e's bits 2e, 2e + 1
    codes |= (((top >> shifts) & 3) << 4).reshape(n, -1, subs, values)
    sc = field("sc", torch.int8)
    return ((d * sc) * (codes.to(torch.int16) - 32)).reshape(n, -1)


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """[vectors, supers, 1, 16] float32 -> [vectors, supers, 32] the float16 bytes."""
    return t.half().contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1], -1)


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
