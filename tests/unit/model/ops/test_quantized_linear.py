"""gguf_linear's C++ kernel against its PyTorch twin, and the twin against a float32 product."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_checks import DTYPES
from tiny_gguf import random_blocks

from pagoda.model.layers.linear import Linear
from pagoda.model.ops.quantized_linear import (
    GGUFWeight,
    dequantize_rows,
    dequantize_rows_torch,
    gguf_linear_torch,
    gguf_matmul,
    gguf_matmul_torch,
    kernel_formats,
    quantize_rows_torch,
    stack,
)
from pagoda.model.quants import FORMATS, dequantize

FORMATS_WITH_KERNEL = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def random_weight(qtype: str, rows: int, cols: int, seed: int = 0) -> GGUFWeight:
    per_block, nbytes, _ = FORMATS[qtype]
    blocks = random_blocks(qtype, rows * cols // per_block, seed)
    return GGUFWeight(torch.from_numpy(blocks).reshape(rows, -1), qtype)


def dense(w: GGUFWeight) -> torch.Tensor:
    return dequantize(w.blocks, w.format).reshape(w.blocks.shape[0], -1)


def test_the_build_has_a_kernel_for_every_format(linear_kernels: None) -> None:
    assert kernel_formats() == set(FORMATS_WITH_KERNEL)


@pytest.mark.parametrize("qtype", FORMATS_WITH_KERNEL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 8, 9, 10, 11, 17, 64, 300])
@pytest.mark.parametrize("groups", [1, 3])
def test_kernel_equals_twin(
    linear_kernels: None, qtype: str, dtype: torch.dtype, rows: int, groups: int
) -> None:
    """Every row count (one pass of up to 8 rows; passes of 4 and their remainders above)
    and an odd number of weight rows (pairs and a single one); 1 or 3 groups of 256 weights
    a row, a legacy format's last group part-filled (3 or 19 blocks of 32)."""
    cols = 256 * groups if FORMATS[qtype][0] == 256 else 32 * (8 * groups - 5)
    w = random_weight(qtype, 71, cols, seed=rows)
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    got = torch.ops.pagoda.gguf_linear(x, w.blocks, qtype)
    want = gguf_linear_torch(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 71)
    # float32 rounding of the sums, relative to the size of their terms
    scale = (quantize_rows_torch(x).abs() @ dense(w).abs().T).max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-6)


# Byte offsets of each format's float16 scales in a block; every other byte is codes (or,
# for Q4_K/Q5_K, 6-bit scales; for Q6_K, int8 scales).
_F16_AT = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


@pytest.mark.parametrize("qtype", FORMATS_WITH_KERNEL)
@pytest.mark.parametrize("fill", [0xFF, 0x80, 0x7F])
def test_extreme_codes_against_extreme_inputs(linear_kernels: None, qtype: str, fill: int) -> None:
    """Every code at its largest (0xFF: 15, 31, 63; Q8_0's -1) or Q8_0's -128 and 127 (0x80,
    0x7F) against inputs whose codes are all +127, all -127 or alternating: sums of byte
    products that a 16-bit step of the kernel would saturate on."""
    per_block, nbytes, _ = FORMATS[qtype]
    cols = 2 * per_block if per_block == 256 else 32 * 11
    blocks = np.full((7 * cols // per_block, nbytes), fill, dtype=np.uint8)
    for offset in _F16_AT[qtype]:
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    w = GGUFWeight(torch.from_numpy(blocks).reshape(7, -1), qtype)
    x = torch.ones(4, cols)
    x[1] = -1
    x[2, ::2] = -1
    x[3, 1::2] = -3
    got = torch.ops.pagoda.gguf_linear(x, w.blocks, qtype)
    want = gguf_linear_torch(x, w)
    scale = (quantize_rows_torch(x).abs() @ dense(w).abs().T).max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("rows", [1, 5])
def test_short_legacy_rows(linear_kernels: None, qtype: str, blocks: int, rows: int) -> None:
    """Rows of a few legacy blocks (fewer than a kernel's unit of 4 or group of 8, or one
    more), a single weight row and one of 2: product and dequantizer against the twins."""
    cols = 32 * blocks
    for n in (1, 2):
        w = random_weight(qtype, n, cols, seed=blocks + n)
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(blocks))
        got = torch.ops.pagoda.gguf_linear(x, w.blocks, qtype)
        want = gguf_linear_torch(x, w)
        scale = (quantize_rows_torch(x).abs() @ dense(w).abs().T).max()
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-6)
        values = torch.ops.pagoda.gguf_dequantize(w.blocks, qtype, torch.float32)
        assert torch.equal(values, dequantize_rows_torch(w, torch.float32))


@pytest.mark.parametrize("qtype", FORMATS_WITH_KERNEL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 300])
def test_bfloat16_output_is_the_float32_sums_rounded_once(
    linear_kernels: None, qtype: str, dtype: torch.dtype, rows: int
) -> None:
    """Asked for bfloat16, the kernel writes its float32 sums rounded to nearest even, as
    the twin's conversion of them does: the same bits as float32 output then .to()."""
    cols = 512 if FORMATS[qtype][0] == 256 else 32 * 11
    w = random_weight(qtype, 71, cols, seed=rows)
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    wide = torch.ops.pagoda.gguf_linear(x, w.blocks, qtype)
    narrow = torch.ops.pagoda.gguf_linear(x, w.blocks, qtype, torch.bfloat16)
    assert narrow.dtype == torch.bfloat16 and narrow.shape == (rows, 71)
    assert torch.equal(narrow, wide.to(torch.bfloat16))
    twin = gguf_linear_torch(x, w, torch.bfloat16)
    assert twin.dtype == torch.bfloat16
    torch.testing.assert_close(narrow.float(), twin.float(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("qtype", FORMATS_WITH_KERNEL)
def test_twin_is_the_float32_product_up_to_int8_inputs(qtype: str) -> None:
    """Quantizing the inputs to int8 per 32 values costs well under 1 % of the product."""
    cols = 256
    w = random_weight(qtype, 64, cols)
    x = torch.randn(5, cols)
    exact = x @ dense(w).T
    error = (gguf_linear_torch(x, w) - exact).norm() / exact.norm()
    assert error < 0.01
    assert error > 0  # the inputs were quantized: the product is not the float32 one


def test_quantized_rows_hold_at_most_255_levels_a_block() -> None:
    x = torch.randn(4, 64)
    q = quantize_rows_torch(x).reshape(4, 2, 32)
    d = x.reshape(4, 2, 32).abs().amax(-1, keepdim=True) / 127
    codes = q / d
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4


def test_stack_keeps_a_run_per_format() -> None:
    a, b, c = (random_weight(t, 4, 256) for t in ("Q5_0", "Q5_0", "Q8_0"))
    runs = stack([a, b, c])
    assert [r.format for r in runs] == ["Q5_0", "Q8_0"] and runs[0].blocks.shape[0] == 8
    assert torch.equal(
        torch.cat([dense(r) for r in runs]), torch.cat([dense(a), dense(b), dense(c)])
    )


@pytest.mark.parametrize("qtype", FORMATS_WITH_KERNEL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 300])
def test_dequantize_kernel_equals_twin_bit_for_bit(
    linear_kernels: None, qtype: str, dtype: torch.dtype, rows: int
) -> None:
    """scale * q (+ min) in float32 in the twin's order, rounded once to the dtype: equal to the
    bit, over row counts that split unevenly between threads; rows of 3 or 11 legacy blocks (a
    part-filled group of 8, alone or after a full one) or 2 or 3 super-blocks."""
    for blocks in (3, 11) if FORMATS[qtype][0] == 32 else (2, 3):
        cols = blocks * FORMATS[qtype][0]
        w = random_weight(qtype, rows, cols, seed=rows + blocks)
        got = torch.ops.pagoda.gguf_dequantize(w.blocks, qtype, dtype)
        assert got.dtype == dtype and got.shape == (rows, cols)
        assert torch.equal(got, dequantize_rows_torch(w, dtype))
        picked = dequantize_rows(w.rows(torch.tensor([rows - 1, 0])), dtype)
        assert torch.equal(picked, got[[-1, 0]])


@pytest.mark.parametrize("qtype", FORMATS_WITH_KERNEL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "tile"), [(1, 256), (9, 5), (40, 64), (300, 33)])
def test_tiled_product_equals_twin(
    linear_kernels: None, qtype: str, dtype: torch.dtype, rows: int, tile: int
) -> None:
    """gguf_matmul over tiles that divide the weight's 70 rows unevenly, or hold all of them."""
    cols = 96 if FORMATS[qtype][0] == 32 else 512
    w = random_weight(qtype, 70, cols, seed=rows)
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    got = torch.ops.pagoda.gguf_matmul(x, w.blocks, qtype, tile)
    assert got.dtype == dtype and got.shape == (rows, 70)
    want = gguf_matmul_torch(x, w).float()
    # the rounding of float32 sums (or of the bfloat16 result), relative to their terms' size
    scale = (x.float().abs() @ dense(w).abs().T).max()
    atol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.float() / scale, want / scale, rtol=0, atol=atol)
    torch.testing.assert_close(gguf_matmul(x, w).float() / scale, want / scale, rtol=0, atol=atol)


def test_dequantize_rejects_blocks_of_the_wrong_size(linear_kernels: None) -> None:
    w = random_weight("Q4_K", 2, 256)
    with pytest.raises(RuntimeError, match="multiple of 144"):
        torch.ops.pagoda.gguf_dequantize(w.blocks[:, :100].contiguous(), "Q4_K", torch.float32)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.pagoda.gguf_matmul(torch.randn(3, 128), w.blocks, "Q4_K", 64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_layer_held_in_blocks_rounds_its_float32_sums_once(
    linear_kernels: None, bias: bool, dtype: torch.dtype
) -> None:
    """A Linear of two runs (Q4_K rows, then Q6_K rows, as a fused q/k/v can be): x's dtype
    out, the float32 products concatenated (+ bias) and rounded once."""
    runs = (random_weight("Q4_K", 40, 512, seed=1), random_weight("Q6_K", 24, 512, seed=2))
    layer = Linear(512, 64, bias=bias)
    layer.hold_in_blocks()
    layer.gguf = runs
    for rows in (1, 3):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(dtype)
        sums = torch.cat([torch.ops.pagoda.gguf_linear(x, w.blocks, w.format) for w in runs], -1)
        want = (sums if layer.bias is None else sums + layer.bias).to(dtype)
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == dtype and torch.equal(got, want)
