"""Dequantization of every supported GGUF type equals the gguf package's numpy code bit for bit."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_gguf import SCALE_BYTES, random_blocks

from pagoda.model.gguf_metadata import TensorInfo, open_gguf
from pagoda.model.loader import gguf as gguf_loader
from pagoda.model.loader import quantization
from pagoda.model.ops import quantized_linear
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.quants import FORMATS, dequantize

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
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
    assert_same_bits(random_blocks(qtype, 64), qtype, device)


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


def test_projections_of_the_gemma3_file_load_in_their_file_form(gemma3_gguf_path: Path) -> None:
    """Held in blocks, a projection is a GGUFWeight: the dense tensor's values in the file's
    bytes; the rest comes dense as before."""
    if not quantized_linear.kernel_formats():
        pytest.skip("the C++ kernels are not built")
    gguf_file = open_gguf(gemma3_gguf_path)
    spec = gguf_loader.read_spec(gguf_file)
    in_blocks, _ = quantization.held_in_blocks(gguf_file, spec)
    dense = gguf_loader.iter_weights(gguf_file, spec, torch.float32)
    blocks = gguf_loader.iter_weights(gguf_file, spec, torch.float32, frozenset(in_blocks))
    formats = set()
    for (name, want), (blocks_name, w) in itertools.islice(zip(dense, blocks), 40):
        assert name == blocks_name and isinstance(want, torch.Tensor)
        if not isinstance(w, GGUFWeight):
            assert name not in in_blocks and torch.equal(w, want), name
            continue
        assert name in in_blocks and w.blocks.shape[0] == want.shape[0]
        values = dequantize(w.blocks, w.format).reshape(want.shape)
        assert torch.equal(values, want), name  # q/k rows un-permuted as the dense ones
        formats.add(w.format)
    assert {"Q8_0", "Q5_0", "Q4_K"} <= formats  # the embedding, q/k/v, o_proj
