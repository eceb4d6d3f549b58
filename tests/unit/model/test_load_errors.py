"""Bad model paths, corrupt files and unsupported models fail with errors that say why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_gguf import write_gguf
from tiny_models import make_hf_model

from pagoda.model import models
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
    with pytest.raises(ModelLoadError, match="bad.gguf is not a readable GGUF file .corrupt.: "):
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


def tiny_llama_state() -> dict[str, torch.Tensor]:
    hf = make_hf_model("llama")
    return {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def test_gguf_unsupported_architecture_is_named(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_llama_state(), "F32", arch="gpt2")
    with pytest.raises(
        ModelLoadError, match=r"unsupported GGUF architecture 'gpt2'; supported: llama, .*qwen3"
    ):
        load_model(tmp_path / "m.gguf")


def test_gguf_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_llama_state(), "Q8_0", embedding_qtype="MXFP4")
    with pytest.raises(
        ModelLoadError,
        match=r"'token_embd.weight' has type MXFP4, which Pagoda cannot read; "
        r"supported: F32, F16, BF16, Q8_0, .*Q4_K, .*Q6_K",
    ):
        load_model(tmp_path / "m.gguf")


def test_gguf_missing_tensor_is_named(tmp_path: Path) -> None:
    state = tiny_llama_state()
    del state["model.layers.1.mlp.up_proj.weight"]
    del state["model.norm.weight"]
    write_gguf(tmp_path / "m.gguf", state, "Q8_0")
    with pytest.raises(
        ModelLoadError, match=r"lacks the tensors blk\.1\.ffn_up\.weight, output_norm\.weight$"
    ):
        load_model(tmp_path / "m.gguf")


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_gguf_says_so(tmp_path: Path, cut: str) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_llama_state(), "Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    size = len(data) - 100 if cut == "data" else 200
    (tmp_path / "cut.gguf").write_bytes(data[:size])
    expected = (
        rf"cut.gguf is truncated: it has {size} bytes, its tensor data runs to byte \d+"
        if cut == "data"
        else rf"cut.gguf ends at byte {size}, inside its header: the file is truncated or corrupt"
    )
    with pytest.raises(ModelLoadError, match=expected):
        load_model(tmp_path / "cut.gguf")
    if cut == "header":  # the tokenizer reads the header alone
        with pytest.raises(ModelLoadError, match=expected):
            Tokenizer.from_path(tmp_path / "cut.gguf")


def test_architecture_without_a_model_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose metadata is understood but whose network is not built yet."""
    write_gguf(tmp_path / "m.gguf", tiny_llama_state(), "F32")
    monkeypatch.delitem(models.MODELS, "llama")
    with pytest.raises(
        ModelLoadError, match=r"m.gguf is a llama model, .* cannot run yet; it runs: "
    ):
        load_model(tmp_path / "m.gguf")
