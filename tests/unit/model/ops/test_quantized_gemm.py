"""gguf_gemm's C++ kernel against its PyTorch twin, and the twin against the gguf package's
dequantization and a float32 product."""

from __future__ import annotations

import gc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from kernel_checks import DTYPES
from tiny_gguf import random_blocks

from pagoda.model.ops.quantized_gemm import (
    REPACKED_BYTES,
    RepackedWeight,
    gemm_formats,
    gguf_gemm,
    gguf_gemm_repacked,
    gguf_gemm_torch,
    quantize_inputs_torch,
    repack,
    repack_formats,
    repack_torch,
    repacked_rows,
    repacked_rows_torch,
)
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.quants import FORMATS, dequantize

GEMM_FORMATS = ["Q4_K", "Q6_K"]


def random_weight(qtype: str, rows: int, cols: int, seed: int = 0) -> GGUFWeight:
    blocks = random_blocks(qtype, rows * cols // FORMATS[qtype][0], seed)
    return GGUFWeight(torch.from_numpy(blocks).reshape(rows, -1), qtype)


def gguf_dense(w: GGUFWeight) -> torch.Tensor:
    """The weight as the gguf package dequantizes it, [rows, cols] float32."""
    values = gguf.quants.dequantize(w.blocks.numpy(), gguf.GGMLQuantizationType[w.format])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def assert_kernel_equals_twin(x: torch.Tensor, w: GGUFWeight) -> None:
    got = torch.ops.pagoda.gguf_gemm(x, w.blocks, w.format)
    want = gguf_gemm_torch(x, w)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # float32 rounding of the per-super-block terms and their sum, relative to their size
    scale = (
        x.float().abs() @ dequantize(w.blocks, w.format).reshape(w.blocks.shape[0], -1).abs().T
    ).max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-6)


def test_the_build_has_a_gemm_for_the_k_quants(gemm_kernels: None) -> None:
    assert gemm_formats() == set(GEMM_FORMATS)


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17, 33, 64, 255, 300])
def test_kernel_equals_twin(gemm_kernels: None, qtype: str, dtype: torch.dtype, rows: int) -> None:
    """Row counts around the microkernel's 4 rows; 133 weight rows (8 full tiles' column
    vectors, then a partial one: 5 columns of 16); 10 super-blocks a row (a tile of 8 and
    one of 2 along k)."""
    cols = 256 * 10
    w = random_weight(qtype, 133, cols, seed=rows)
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    x[0, :256] = 0  # an all-zero super-block: scale 0, no division by it
    assert_kernel_equals_twin(x, w)


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize(("rows", "n", "cols"), [(1024, 40, 768), (130, 600, 256), (6, 1, 512)])
def test_kernel_equals_twin_on_big_and_thin_shapes(
    gemm_kernels: None, qtype: str, rows: int, n: int, cols: int
) -> None:
    w = random_weight(qtype, n, cols, seed=n)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(n)) * 3
    assert_kernel_equals_twin(x, w)


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize("n", [8, 13, 24, 31, 40])
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_kernel_equals_twin_on_partial_column_vectors(
    gemm_kernels: None, qtype: str, n: int, rows: int
) -> None:
    """Output columns that end in either half of a 16-column vector (the AVX2 microkernel's
    8 columns a vector), or at its end."""
    w = random_weight(qtype, n, 512, seed=n)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    assert_kernel_equals_twin(x, w)
    assert torch.equal(
        gguf_gemm_repacked(x, repack(w)), torch.ops.pagoda.gguf_gemm(x, w.blocks, qtype)
    )


def extreme_weight(qtype: str, code_byte: int, scale_byte: int, rows: int, cols: int) -> GGUFWeight:
    """Random blocks with every code byte set to code_byte (Q4_K: codes 15 from 0xFF; Q6_K:
    codes 63 from 0xFF, 0 from 0x00) and every scale (and minimum) byte to scale_byte."""
    blocks = random_blocks(qtype, rows * cols // FORMATS[qtype][0], seed=1).copy()
    if qtype == "Q4_K":  # [d][dmin][12 scale and minimum bytes][128 code bytes]
        blocks[:, 4:16], blocks[:, 16:144] = scale_byte, code_byte
    else:  # [128 low nibbles][64 top bits][16 int8 scales][d]
        blocks[:, 0:192], blocks[:, 192:208] = code_byte, scale_byte
    return GGUFWeight(torch.from_numpy(blocks).reshape(rows, -1), qtype)


@pytest.mark.parametrize(
    ("qtype", "code_byte", "scale_byte"),
    [("Q4_K", 0xFF, 0xFF), ("Q6_K", 0xFF, 0x7F), ("Q6_K", 0x00, 0x80), ("Q6_K", 0x00, 0x7F)],
)
def test_kernel_equals_twin_at_the_extremes(
    gemm_kernels: None, qtype: str, code_byte: int, scale_byte: int
) -> None:
    """The largest codes (and Q6_K's smallest, q - 32 = -32) and scales against inputs that all
    quantize to +127 or -127: the integer sums at their bounds (in int16, 16 x 15 x 127 and
    8 x 32 x 127 for the AVX2 microkernel's pairs) come out exact."""
    cols = 1024
    w = extreme_weight(qtype, code_byte, scale_byte, 20, cols)
    signs = torch.ones(cols)
    x = (
        torch.stack(
            [
                signs,
                -signs,
                signs * torch.tensor([1.0, -1.0]).repeat(cols // 2),
                signs * torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(cols // 4),
                -signs * torch.arange(cols).remainder(16).lt(8),
            ]
        )
        * 3
    )
    assert_kernel_equals_twin(x, w)
    codes, _ = quantize_inputs_torch(x)
    assert codes.abs().max() == 127
    assert torch.equal(
        gguf_gemm_repacked(x, repack(w)), torch.ops.pagoda.gguf_gemm(x, w.blocks, qtype)
    )


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
def test_twin_is_the_float32_product_up_to_int8_inputs(qtype: str) -> None:
    """Quantizing the inputs to int8 per 256 values costs under 2 % of the product (about
    0.7 % measured on random blocks), against the gguf package's values in float32."""
    cols = 1024
    w = random_weight(qtype, 64, cols)
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(1))
    exact = x @ gguf_dense(w).T
    error = (gguf_gemm_torch(x, w) - exact).norm() / exact.norm()
    assert 0 < error < 0.02


def test_inputs_hold_at_most_255_levels_a_super_block() -> None:
    x = torch.randn(3, 512)
    codes, dx = quantize_inputs_torch(x)
    assert codes.shape == (3, 2, 256) and dx.shape == (3, 2)
    assert torch.equal(codes, codes.round()) and codes.abs().max() == 127
    torch.testing.assert_close(
        (codes * dx.double().unsqueeze(-1)).float().reshape(3, 512),
        x,
        rtol=0,
        atol=float(dx.max()) / 2 + 1e-6,
    )


def test_the_op_falls_back_to_the_twin_for_other_dtypes(kernels_built: None) -> None:
    w = random_weight("Q4_K", 20, 256)
    x = torch.randn(3, 256, dtype=torch.float64)
    torch.testing.assert_close(gguf_gemm(x, w), gguf_gemm_torch(x, w))


def test_gemm_rejects_other_formats_and_shapes(gemm_kernels: None) -> None:
    w = random_weight("Q4_K", 2, 512)
    with pytest.raises(RuntimeError, match="no kernel for format Q8_0"):
        torch.ops.pagoda.gguf_gemm(torch.randn(3, 512), w.blocks, "Q8_0")
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.pagoda.gguf_gemm(torch.randn(3, 128), w.blocks, "Q4_K")
    with pytest.raises(RuntimeError, match="w must be"):
        torch.ops.pagoda.gguf_gemm(torch.randn(3, 256), w.blocks, "Q4_K")


def test_the_build_repacks_the_k_quants(gemm_kernels: None) -> None:
    assert repack_formats() == set(GEMM_FORMATS)


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize(("n", "cols"), [(1, 256), (16, 512), (40, 768), (133, 2560), (300, 256)])
def test_repacking_equals_its_twin(gemm_kernels: None, qtype: str, n: int, cols: int) -> None:
    """The same bytes, padding lanes (columns past a multiple of 16) and padding included."""
    w = random_weight(qtype, n, cols, seed=n + cols)
    got = repack(w)
    assert got.data.shape == (-(-n // 16), cols // 256, REPACKED_BYTES[qtype])
    assert got.rows == n and got.cols == cols
    assert torch.equal(got.data, repack_torch(w))


def mapping_at(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps entry of the mapping that holds address (None if none does): its
    fields by name, and its first and last byte + 1 as "start" and "end" (hex)."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:  # a mapping's first line: start-end perms ...
            if entry is not None:
                return entry
            start, _, end = first.partition("-")
            inside = int(start, 16) <= address < int(end, 16)
            entry = {"start": start, "end": end} if inside else None
        elif entry is not None and ":" in first:
            entry[first.rstrip(":")] = line.split(":", 1)[1].strip()
    return entry


def transparent_huge_pages() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[never]" not in path.read_text()


@pytest.mark.skipif(not transparent_huge_pages(), reason="no transparent huge pages here")
def test_a_repacked_weight_lies_on_huge_pages(gemm_kernels: None) -> None:
    """A repacked weight streams through the caches at every step: its mapping starts on a
    2 MiB boundary, is advised for huge pages and ends at its last 4 KiB page (no memory
    added), and is unmapped when the weight dies."""
    w = repack(random_weight("Q4_K", 16 * 84, 256 * 16))  # 84 x 16 x 2368 bytes: 3.0 MiB
    address, nbytes = w.data.data_ptr(), w.data.numel()
    assert address % (2 << 20) == 0
    mapping = mapping_at(address)
    assert mapping is not None and mapping["THPeligible"] == "1"
    # (a mapping below with the same flags may have merged with it; none can above: the
    # unmapped rest of the 2 MiB it was cut from lies there)
    assert int(mapping["end"], 16) == address + -(-nbytes // 4096) * 4096
    del w
    gc.collect()
    assert mapping_at(address) is None


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 48, 49, 64, 96, 255, 300])
def test_the_repacked_gemm_is_the_gemm_bit_for_bit(
    gemm_kernels: None, qtype: str, dtype: torch.dtype, rows: int
) -> None:
    """Row counts around the microkernels' blocks of 3 and 4 rows, the few-row order of work
    and where tiles are expanded (above 16 rows; on AVX2 above 8 for Q6_K); 133 weight rows
    (a partial vector of 5 columns); 10 super-blocks a row (summed 8 and 2)."""
    cols = 256 * 10
    w = random_weight(qtype, 133, cols, seed=rows)
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    x[0, :256] = 0
    got = gguf_gemm_repacked(x, repack(w))
    assert torch.equal(got, torch.ops.pagoda.gguf_gemm(x, w.blocks, w.format))


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize(("rows", "n", "cols"), [(1, 2048, 8192), (6, 1, 512), (130, 600, 256)])
def test_the_repacked_gemm_is_the_gemm_on_big_and_thin_shapes(
    gemm_kernels: None, qtype: str, rows: int, n: int, cols: int
) -> None:
    w = random_weight(qtype, n, cols, seed=n)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(n)) * 3
    got = gguf_gemm_repacked(x, repack(w))
    assert torch.equal(got, torch.ops.pagoda.gguf_gemm(x, w.blocks, w.format))


def test_the_repacked_gemm_rejects_a_weight_of_other_columns(gemm_kernels: None) -> None:
    w = repack(random_weight("Q4_K", 20, 512))
    with pytest.raises(RuntimeError, match="repacked Q4_K weight of 20 rows and 256 columns"):
        torch.ops.pagoda.gguf_gemm_repacked(torch.randn(3, 256), w.data, "Q4_K", 20)
    with pytest.raises(RuntimeError, match="no layout for format Q8_0"):
        torch.ops.pagoda.gguf_gemm_repacked(torch.randn(3, 512), w.data, "Q8_0", 20)


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize(("n", "cols"), [(1, 256), (16, 512), (40, 768), (133, 2560)])
def test_rows_of_a_repacked_weight_are_the_files_rows(qtype: str, n: int, cols: int) -> None:
    """The twin reads any row back from the repacked bytes alone (a lane of a partial vector
    too), to the bit of the file's decoding; so a tied embedding needs no other copy."""
    w = random_weight(qtype, n, cols, seed=n + cols)
    repacked = RepackedWeight(repack_torch(w), qtype, n)
    ids = torch.tensor([n - 1, 0, n // 2, n - 1, n // 3], dtype=torch.int64)
    got = repacked_rows_torch(repacked, ids)
    assert got.dtype == torch.float32 and got.shape == (len(ids), cols)
    assert torch.equal(got, dequantize(w.rows(ids).blocks, qtype).reshape(len(ids), cols))


@pytest.mark.parametrize("qtype", GEMM_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "cols", "count"), [(1, 256, 1), (40, 768, 0), (133, 2560, 300)])
def test_the_row_gather_equals_its_twin(
    gemm_kernels: None, qtype: str, dtype: torch.dtype, n: int, cols: int, count: int
) -> None:
    w = repack(random_weight(qtype, n, cols, seed=n))
    ids = torch.randint(0, n, (count,), generator=torch.Generator().manual_seed(count))
    got = repacked_rows(w, ids, dtype)
    assert got.dtype == dtype and got.shape == (count, cols)
    assert torch.equal(got, repacked_rows_torch(w, ids).to(dtype))


def test_the_row_gather_refuses_rows_outside_the_weight(gemm_kernels: None) -> None:
    w = repack(random_weight("Q6_K", 20, 256))
    for bad in (20, -1):
        with pytest.raises(RuntimeError, match="ids must be in \\[0, 20\\)"):
            repacked_rows(w, torch.tensor([3, bad]), torch.float32)
    with pytest.raises(RuntimeError, match="ids must be int64"):
        torch.ops.pagoda.gguf_repacked_rows(
            w.data, "Q6_K", 20, torch.tensor([3]).int(), torch.float32
        )
