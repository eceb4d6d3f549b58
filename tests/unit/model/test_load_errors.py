"""Bad model paths, corrupt files and unsupported models fail with errors that say why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda.model.loader import load_model
from pagoda.model.spec import ModelLoadError
from pagoda.model_files import resolve_model_path
from pagoda.tokenizer import Tokenizer


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("/no/such/model")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf file"):
        resolve_model_path(tmp_path / "weights.bin")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_corrupt_gguf(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(tmp_path / "bad.gguf")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        Tokenizer.from_path(tmp_path / "bad.gguf")


def test_corrupt_safetensors(tiny_model_dir, tmp_path: Path) -> None:
    path = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(path)


def test_unsupported_architecture(tiny_model_dir, tmp_path: Path) -> None:
    path = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(path)


def test_missing_tensor_is_named(tiny_model_dir, tmp_path: Path) -> None:
    path = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing weights: layers\.1\.mlp\.gate_up_proj"):
        load_model(path)


def test_shape_mismatch_is_named(tiny_model_dir, tmp_path: Path) -> None:
    path = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"k_proj.weight.*shape \(3, 64\), expected \(32, 64\)"
    ):
        load_model(path)


def test_missing_config_field_is_named(tiny_model_dir, tmp_path: Path) -> None:
    path = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'hidden_size'"):
        load_model(path)
