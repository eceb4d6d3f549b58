"""Which dtype a run takes, and whether a GGUF model's weights stay in their file's blocks."""

from __future__ import annotations

import pytest
import torch

from pagoda.config import ConfigError
from pagoda.model import runner
from pagoda.model.runner import computes_from_blocks, resolve_dtype, resolve_kv_cache_dtype


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


@pytest.mark.parametrize(
    ("flag", "dtype", "from_blocks", "cache"),
    [
        ("auto", torch.float32, False, torch.float32),  # the model's dtype, as vLLM's auto
        ("auto", torch.bfloat16, False, torch.bfloat16),
        ("auto", torch.bfloat16, True, torch.bfloat16),
        ("auto", torch.float32, True, torch.bfloat16),  # float32 from a GGUF file's blocks
        ("float32", torch.float32, True, torch.float32),  # asked for: kept
        ("bfloat16", torch.float32, False, torch.bfloat16),  # half the bytes under float32
        ("bfloat16", torch.bfloat16, False, torch.bfloat16),
        ("float32", torch.float32, False, torch.float32),
    ],
)
def test_kv_cache_dtype(
    flag: str, dtype: torch.dtype, from_blocks: bool, cache: torch.dtype
) -> None:
    assert resolve_kv_cache_dtype(flag, dtype, from_blocks) == cache


def test_a_float32_cache_under_a_bfloat16_model_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="--kv-cache-dtype float32"):
        resolve_kv_cache_dtype("float32", torch.bfloat16)
