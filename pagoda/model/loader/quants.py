"""Dequantization of GGUF block formats in PyTorch (runs on whatever device holds the bytes).

Each format stores a row as blocks of 32 weights; a block is a small header of
float16 scales followed by packed integers:

    Q8_0  [d: f16][32 x int8]              w = d * q
    Q4_0  [d: f16][16 bytes: 32 nibbles]   w = d * (q - 8)
    Q4_1  [d: f16][m: f16][16 bytes]       w = d * q + m

In the 4-bit formats byte j holds weight j in its low nibble and weight j + 16
in its high nibble.
"""

from __future__ import annotations

import torch

from pagoda.model.layers.linear import Int4Weight, Q8Weight

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32, reading little-endian float16."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32] uint8 values 0..15 in weight order."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """Raw uint8 bytes of a tensor in format qtype -> float32 values, flat."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"unsupported GGUF tensor type {qtype}")
    blocks = raw.reshape(-1, BLOCK_BYTES[qtype])
    d = _f16(blocks[:, 0:2])
    if qtype == "Q8_0":
        values = d * blocks[:, 2:].contiguous().view(torch.int8).float()
    elif qtype == "Q4_0":
        values = d * (_nibbles(blocks[:, 2:]).float() - 8)
    else:  # Q4_1
        values = d * _nibbles(blocks[:, 4:]).float() + _f16(blocks[:, 2:4])
    return values.reshape(-1)


def q4_1_to_int4(raw: torch.Tensor, rows: int) -> Int4Weight:
    """Raw Q4_1 bytes of a [rows, cols] tensor as an Int4Weight, exactly: zero = m + 8 d."""
    blocks = raw.reshape(-1, BLOCK_BYTES["Q4_1"])
    d = _f16(blocks[:, 0:2]).reshape(rows, -1)
    m = _f16(blocks[:, 2:4]).reshape(rows, -1)
    codes = _nibbles(blocks[:, 4:]).reshape(rows, -1)
    return Int4Weight(codes, d, m + 8 * d)


def q8_0_to_q8(raw: torch.Tensor, rows: int) -> Q8Weight:
    """Raw Q8_0 bytes of a [rows, cols] tensor as a Q8Weight, exactly."""
    blocks = raw.reshape(-1, BLOCK_BYTES["Q8_0"])
    codes = blocks[:, 2:].contiguous().view(torch.int8).reshape(rows, -1)
    return Q8Weight(codes, _f16(blocks[:, 0:2]).reshape(rows, -1))
