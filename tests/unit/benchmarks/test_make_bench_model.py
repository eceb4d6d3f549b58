"""The benchmark-model builder: its GGUF and HF forms are one model, built the same from a seed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import bind_cache, forward

from pagoda.model.loader import load_model
from pagoda.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[3]
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, tied=True)


def load_builder():
    spec = importlib.util.spec_from_file_location(
        "make_bench_model", ROOT / "benchmarks" / "make_bench_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    builder = load_builder()
    out = tmp_path_factory.mktemp("bench-model")
    gguf_path = builder.write_model(out, builder.Shape(**TINY), seed=3, hf=True)
    return gguf_path, out / "hf"


def logits(path: Path, tokens: list[int]) -> torch.Tensor:
    model = load_model(path)
    bind_cache(model)
    return forward(model, [(tokens, 0, [0, 1, 2, 3])])[0]


def test_gguf_and_hf_forms_compute_the_same_model(built: tuple[Path, Path]) -> None:
    gguf_path, hf_dir = built
    tokens = Tokenizer.from_path(hf_dir).encode("The quick brown fox jumps over the lazy dog")
    from_gguf, from_hf = logits(gguf_path, tokens), logits(hf_dir, tokens)
    # Same weights (bfloat16 values are exact in float16), Q/K rows permuted back by the loader.
    torch.testing.assert_close(from_gguf, from_hf, atol=1e-4, rtol=1e-4)
    assert from_hf.std() > 0.1  # random weights, but not a dead network


def test_tokenizer_is_the_default_models(built: tuple[Path, Path], default_model_path) -> None:
    gguf_path, hf_dir = built
    text = "Hello, world! <|im_start|>user\nhi<|im_end|>"
    expected = Tokenizer.from_path(default_model_path).encode(text)
    assert Tokenizer.from_path(hf_dir).encode(text) == expected
    assert Tokenizer.from_path(gguf_path).encode(text) == expected


def test_weights_are_a_function_of_the_seed() -> None:
    builder = load_builder()
    a = builder.make_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), seed=1)
    assert torch.equal(a, builder.make_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 1))
    assert not torch.equal(a, builder.make_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 2))
    assert not torch.equal(a, builder.make_tensor("model.layers.1.mlp.up_proj.weight", (8, 4), 1))
    assert abs(a.float().std().item() - 0.02) < 0.01
