"""Which dtype a run takes, and whether a GGUF model's weights stay in their file's blocks."""

from __future__ import annotations

import pytest
import torch

from pagoda.model import runner
from pagoda.model.runner import computes_from_blocks, resolve_dtype


@pytest.mark.parametrize(
    ("requested", "dtype", "device", "quantization", "blocks"),
    [
        ("auto", torch.bfloat16, "cpu", "auto", True),  # a CPU with native bfloat16
        ("bfloat16", torch.bfloat16, "cpu", "gguf", True),
        ("auto", torch.float32, "cpu", "auto", True),  # auto's float32 on an AVX2-only CPU
        ("auto", torch.float32, "cpu", "gguf", True),
        ("float32", torch.float32, "cpu", "auto", False),  # the dense float32 reference
        ("auto", torch.float32, "cpu", "none", False),
        ("bfloat16", torch.bfloat16, "cpu", "none", False),
        ("auto", torch.bfloat16, "cuda", "auto", False),
    ],
)
def test_weights_stay_in_blocks_where_auto_or_bfloat16_runs_on_the_cpu(
    requested: str, dtype: torch.dtype, device: str, quantization: str, blocks: bool
) -> None:
    assert computes_from_blocks(requested, dtype, device, quantization) is blocks


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_only_where_the_cpu_computes_in_it(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(runner, "_cpu_has_bf16", lambda: native)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float32", "cpu") == torch.float32
