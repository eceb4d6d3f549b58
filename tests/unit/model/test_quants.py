"""Dequantization of every supported GGUF type equals the gguf package's numpy code bit for bit."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagoda.model.loader.quants import FORMATS, dequantize

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
    smallest: dict[str, gguf.ReaderTensor] = {}
    for t in gguf.GGUFReader(str(gemma3_gguf_path)).tensors:
        kind = t.tensor_type.name
        if kind not in smallest or t.n_bytes < smallest[kind].n_bytes:
            smallest[kind] = t
    assert {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= set(smallest)
    for kind, t in smallest.items():
        assert_same_bits(np.asarray(t.data), kind, device)
