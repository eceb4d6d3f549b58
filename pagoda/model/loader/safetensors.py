"""Hugging Face model directories: config.json plus one or more *.safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pagoda.model.spec import ModelLoadError, ModelSpec


def read_spec(model_dir: Path) -> ModelSpec:
    """Reads config.json into a ModelSpec."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    return ModelSpec.from_hf_config(config)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory, through the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards named in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors files")
    return files


def iter_weights(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (Hugging Face name, tensor in dtype); the names are already ours, so no table."""
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        except Exception as e:  # safetensors raises its own types for corrupt headers
            raise ModelLoadError(f"cannot read {path}: {e}") from e
