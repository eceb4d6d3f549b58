"""Dequantization of every supported GGUF type equals the gguf package's numpy code bit for bit."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagoda.model.gguf_metadata import TensorInfo, open_gguf
from pagoda.model.layers.linear import Int4Weight, Linear
from pagoda.model.loader import gguf as gguf_loader
from pagoda.model.loader.quants import FORMATS, dequantize, q4_k_to_int4, q5_0_to_q8

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
# Where each block keeps its float16 scales (d, and dmin or m where there is one).
SCALE_BYTES = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
QUANTIZABLE = ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants.quantize makes these


def assert_same_bits(raw: np.ndarray, qtype: str, device: str) -> None:
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    ours = dequantize(torch.from_numpy(raw.view(np.uint8).copy()).to(device), qtype)
    assert ours.device.type == device and ours.dtype == torch.float32
    assert torch.equal(ours.cpu().view(torch.int32), torch.from_numpy(expected).view(torch.int32))


def test_every_type_is_covered() -> None:
    assert set(FORMATS) == {"F32", "F16", *QUANTIZABLE, *SCALE_BYTES}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", list(SCALE_BYTES))
def test_random_blocks(qtype: str, device: str) -> None:
    """Random bytes reach every code and packed scale; the float16 scales are kept sane."""
    rng = np.random.default_rng(0)
    _, nbytes, _ = FORMATS[qtype]
    blocks = rng.integers(0, 256, size=(64, nbytes), dtype=np.uint8)
    for offset in SCALE_BYTES[qtype]:
        scale = (rng.standard_normal(64) * 0.01).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(64, 2)
    assert_same_bits(blocks, qtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ["F32", "F16", *QUANTIZABLE])
def test_quantized_by_gguf(qtype: str, device: str) -> None:
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32) * 3
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert_same_bits(raw, qtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_real_blocks_of_the_gemma3_file(gemma3_gguf_path: Path, device: str) -> None:
    """The smallest tensor of each type in a real Q4_K_M file (F32, Q8_0, Q5_0, Q4_K, Q6_K)."""
    gguf_file = open_gguf(gemma3_gguf_path)
    smallest: dict[str, TensorInfo] = {}
    for t in gguf_file.tensors:
        if t.type not in smallest or t.nbytes < smallest[t.type].nbytes:
            smallest[t.type] = t
    assert {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= set(smallest)
    for kind, t in smallest.items():
        assert_same_bits(gguf_file.raw_bytes(t).copy(), kind, device)


def random_q4_k(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random Q4_K bytes of a [rows, cols] matrix, its float16 d and dmin kept sane."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    for offset in SCALE_BYTES["Q4_K"]:
        scale = (np.abs(rng.standard_normal(len(blocks))) * 0.001).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(-1))


def int4_values(w: Int4Weight) -> torch.Tensor:
    """What the int4 kernel multiplies by: (code - 8) * scale + zero per 32 columns."""
    expand = lambda t: t.repeat_interleave(32, dim=1)  # noqa: E731
    return (w.codes.float() - 8) * expand(w.scale) + expand(w.zero)


def test_q4_k_as_int4_codes() -> None:
    """Each 32-weight sub-block of Q4_K is a scale and a minimum, as Q4_1's blocks are."""
    raw = random_q4_k(64, 512)
    dense = dequantize(raw, "Q4_K").reshape(64, 512)
    w = q4_k_to_int4(raw, 64)
    assert w.codes.shape == (64, 512) and w.scale.shape == w.zero.shape == (64, 16)
    torch.testing.assert_close(int4_values(w), dense, rtol=1e-6, atol=1e-6)

    linear = Linear(512, 64, bias=False)
    linear.weight.data = dense
    linear.set_int4(w)
    x = torch.randn(Linear.INT4_MAX_ROWS, 512)
    torch.testing.assert_close(linear(x), x @ dense.T, rtol=1e-4, atol=1e-4)  # the int4 kernel


def test_q4_k_projections_of_the_gemma3_file_load_as_int4(gemma3_gguf_path: Path) -> None:
    gguf_file = open_gguf(gemma3_gguf_path)
    spec = gguf_loader.read_spec(gguf_file)
    weights = gguf_loader.iter_weights(gguf_file, spec, torch.float32, quantized=True)
    (name, dense), (int4_name, w) = next(
        pair for pair in itertools.pairwise(weights) if isinstance(pair[1][1], Int4Weight)
    )
    assert name == int4_name == "model.layers.0.self_attn.o_proj.weight"  # Q4_K in this file
    assert isinstance(dense, torch.Tensor) and isinstance(w, Int4Weight)
    torch.testing.assert_close(int4_values(w), dense, rtol=1e-6, atol=1e-6)


def test_q5_0_as_int8_codes_exactly() -> None:
    x = np.random.default_rng(2).standard_normal((16, 128)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0).reshape(-1))
    w = q5_0_to_q8(raw, 16)
    assert w.codes.dtype == torch.int8 and int(w.codes.min()) >= -16 and int(w.codes.max()) <= 15
    values = w.codes.float() * w.scale.repeat_interleave(32, dim=1)
    assert torch.equal(values, dequantize(raw, "Q5_0").reshape(16, 128))
