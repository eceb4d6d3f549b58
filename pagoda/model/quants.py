"""Dequantization of GGUF tensor types in PyTorch (runs on whatever device holds the bytes).

Each function takes a tensor's raw bytes as [blocks, bytes per block] uint8 and
returns [blocks, weights per block] float32, doing the float32 arithmetic in
the same order as the `gguf` package's numpy code, so the values are equal bit
for bit. Scales are little-endian float16; "nibble j" of a 16-byte run is the
low half of byte j for j < 16 and the high half of byte j - 16 otherwise.

The 32-weight formats ("legacy" quants), one scale d (and minimum m) a block:

    Q8_0  [d][32 x int8]                      w = d * q
    Q4_0  [d][16 B nibbles]                   w = d * (q - 8)
    Q4_1  [d][m][16 B nibbles]                w = d * q + m
    Q5_0  [d][qh: 4 B][16 B nibbles]          w = d * (q - 16), q = nibble | qh bit << 4
    Q5_1  [d][m][qh: 4 B][16 B nibbles]       w = d * q + m

The k-quants pack 256 weights as a super-block whose float16 d (and dmin)
scale small integer scales (and minimums) of 16- or 32-weight sub-blocks:

    Q2_K  [16 B: sc | mn << 4][64 B: 2-bit q][d][dmin]          w = d*sc * q - dmin*mn, 16 x 16
    Q3_K  [32 B: high bits][64 B: 2-bit q][12 B: 6-bit sc][d]  w = d*(sc - 32) * q, q in -4..3
    Q4_K  [d][dmin][12 B: 6-bit sc, mn][128 B: nibbles]        w = d*sc * q - dmin*mn, 8 x 32
    Q5_K  [d][dmin][12 B][32 B: fifth bits][128 B: nibbles]    as Q4_K with 5-bit q
    Q6_K  [128 B: nibbles][64 B: top 2 bits][16 x int8 sc][d]  w = d*sc * (q - 32), 16 x 16
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BLOCK = 32  # weights per block of the legacy formats
SUPER_BLOCK = 256  # weights per super-block of the k-quants


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32, reading little-endian float16."""
    return raw.contiguous().view(torch.float16).float()


def _int8(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.int8)


def _bits(packed: torch.Tensor, shifts: range, mask: int) -> torch.Tensor:
    """[..., k] bytes -> [..., len(shifts), k]: field (byte >> shift) & mask for each shift."""
    shift = torch.tensor(list(shifts), dtype=torch.uint8, device=packed.device).reshape(-1, 1)
    return (packed.unsqueeze(-2) >> shift) & mask


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16 k] packed bytes -> [n, 32 k] uint8 values 0..15, each 16-byte run as 32 weights."""
    n = qs.shape[0]
    return _bits(qs.reshape(n, -1, 16), range(0, 8, 4), 0x0F).reshape(n, -1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] its bits, bit 0 first."""
    return _bits(qh, range(8), 1).transpose(1, 2).reshape(qh.shape[0], 32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _int8(b[:, 2:]).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and minimums, [n, 8] each.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7 minimums 0-3; scales and
    minimums 4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from
    the top of bytes 0-3 and 4-7.
    """
    d, m, low = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    # two 32-byte halves, each holding 4 x 32 weights at shifts 0, 2, 4, 6
    q = _bits(qs.reshape(n, 2, 32), range(0, 8, 2), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, SUPER_BLOCK)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low 4 bits from bytes 0-7 (low halves, then high halves),
    # top 2 bits from bytes 8-11 (shifts 0, 2, 4, 6)
    low = _bits(scales[:, :8], range(0, 8, 4), 0x0F).reshape(n, 16)
    high = _bits(scales[:, 8:], range(0, 8, 2), 3).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int16) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), range(0, 8, 2), 3).reshape(n, 16, 16)
    # a set high bit means no offset; a clear one subtracts 4
    qh = _bits(hmask, range(8), 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).float()
    return (dl * q).reshape(n, SUPER_BLOCK)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's sub-block scales d * sc and minimums dmin * mn, [n, 8] float32 each."""
    sc, mn = _k_scale_min(b[:, 4:16])
    return _f16(b[:, :2]) * sc.float(), _f16(b[:, 2:4]) * mn.float()


def _k_4_5(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K from the [n, 8, 32] codes q: w = (d * sc) * q - dmin * mn per sub-block."""
    n = b.shape[0]
    scale, minimum = _k_scales(b)
    return (scale.reshape(n, 8, 1) * q.float() - minimum.reshape(n, 8, 1)).reshape(n, SUPER_BLOCK)


def _q4_k_codes(b: torch.Tensor) -> torch.Tensor:
    """[n, 8, 32] codes 0..15: 4 x 32 bytes, each the low then high nibbles of 64 weights."""
    return _bits(b[:, 16:].reshape(-1, 4, 32), range(0, 8, 4), 0x0F).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_4_5(b, _q4_k_codes(b))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = _bits(b[:, 48:].reshape(n, 4, 32), range(0, 8, 4), 0x0F).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], range(8), 1)  # [n, 8, 32]: bit i of byte j is weight 32 i + j's
    return _k_4_5(b, ql | (qh << 4))


def _q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """[n, 16, 16] codes 0..63 (w = d * sc * (q - 32)): two halves of 128 weights, each 64
    bytes of nibbles and 32 bytes of 2-bit high parts."""
    n = b.shape[0]
    low = _bits(b[:, :128].reshape(n, 2, 64), range(0, 8, 4), 0x0F).reshape(n, 2, 4, 32)
    high = _bits(b[:, 128:192].reshape(n, 2, 32), range(0, 8, 2), 3)  # [n, 2, 4, 32]
    return (low | (high << 4)).reshape(n, 16, 16)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl = (_f16(b[:, 208:210]) * _int8(b[:, 192:208]).float()).reshape(n, 16, 1)
    q = (_q6_k_codes(b).to(torch.int16) - 32).float()
    return (dl * q).reshape(n, SUPER_BLOCK)


def integer_form(format: str, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Q4_K or Q6_K super-block [n, bytes] as integers and two float scales, w = d * sc * q
    + dm * mn per sub-block: (codes q [n, subs, values], sc [n, subs] and mn [n, subs] as
    int32, d [n, 1] and dm [n, 1] float32). The int8 kernels compute in this form."""
    if format == "Q4_K":
        sc, mn = _k_scale_min(b[:, 4:16])
        return _q4_k_codes(b), sc.int(), mn.int(), _f16(b[:, :2]), -_f16(b[:, 2:4])
    if format == "Q6_K":
        sc = _int8(b[:, 192:208]).int()
        d = _f16(b[:, 208:210])
        return _q6_k_codes(b), sc, -32 * sc, d, d
    raise ValueError(f"no integer form for {format}")


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


# type name -> (weights per block, bytes per block, [blocks, bytes] uint8 -> [blocks, weights])
FORMATS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16_values),
    "BF16": (1, 2, _bf16),
    "Q8_0": (BLOCK, 34, _q8_0),
    "Q4_0": (BLOCK, 18, _q4_0),
    "Q4_1": (BLOCK, 20, _q4_1),
    "Q5_0": (BLOCK, 22, _q5_0),
    "Q5_1": (BLOCK, 24, _q5_1),
    "Q2_K": (SUPER_BLOCK, 84, _q2_k),
    "Q3_K": (SUPER_BLOCK, 110, _q3_k),
    "Q4_K": (SUPER_BLOCK, 144, _q4_k),
    "Q5_K": (SUPER_BLOCK, 176, _q5_k),
    "Q6_K": (SUPER_BLOCK, 210, _q6_k),
}
BLOCK_BYTES = {name: nbytes for name, (_, nbytes, _) in FORMATS.items()}


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """Raw uint8 bytes of a tensor of GGUF type qtype -> float32 values, flat."""
    if qtype not in FORMATS:
        raise ValueError(f"unsupported GGUF tensor type {qtype}; supported: {', '.join(FORMATS)}")
    _, nbytes, blocks_to_values = FORMATS[qtype]
    return blocks_to_values(raw.reshape(-1, nbytes)).reshape(-1)
