"""Gemma 3 GGUF files: the metadata into the spec, the tensor names, the norms' stored offset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tiny_gguf import tiny_gemma3, write_gemma3_gguf
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from pagoda.model.gguf_metadata import GGUFFile, open_gguf
from pagoda.model.loader import gguf as gguf_loader
from pagoda.model.spec import ModelLoadError, ModelSpec


def assert_spec_matches(spec: ModelSpec, config: transformers.Gemma3TextConfig) -> None:
    """Each spec field against what transformers' Gemma3TextConfig calls it."""
    assert spec.family == "gemma3"
    assert spec.vocab_size == config.vocab_size
    assert spec.hidden_size == config.hidden_size
    assert spec.intermediate_size == config.intermediate_size
    assert spec.num_layers == config.num_hidden_layers
    assert spec.num_heads == config.num_attention_heads
    assert spec.num_kv_heads == config.num_key_value_heads
    assert spec.head_dim == config.head_dim
    assert spec.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)  # stored as float32
    assert spec.max_position_embeddings == config.max_position_embeddings
    assert spec.tie_word_embeddings == config.tie_word_embeddings
    assert spec.hidden_activation == config.hidden_activation
    assert spec.query_pre_attn_scalar == config.query_pre_attn_scalar
    assert spec.sliding_window == config.sliding_window
    assert spec.layer_types == tuple(config.layer_types)
    assert spec.rope_theta == config.rope_parameters["full_attention"]["rope_theta"]
    assert spec.rope_local_base_freq == config.rope_parameters["sliding_attention"]["rope_theta"]
    assert spec.final_logit_softcapping == config.final_logit_softcapping
    assert spec.qk_norm and not spec.attention_bias


@pytest.fixture(scope="module")
def reference_config(gemma3_gguf_path: Path) -> transformers.Gemma3TextConfig:
    """transformers' own reading of the file; what it leaves out is Gemma3TextConfig's default."""
    fields = load_gguf_checkpoint(str(gemma3_gguf_path), return_tensors=False)["config"]
    del fields["model_type"], fields["_model_name_or_path"]
    return transformers.Gemma3TextConfig(**fields)


@pytest.fixture(scope="module")
def gemma3_file(gemma3_gguf_path: Path) -> GGUFFile:
    return open_gguf(gemma3_gguf_path)


def test_real_file_spec_equals_transformers_reading(
    gemma3_file: GGUFFile, reference_config: transformers.Gemma3TextConfig
) -> None:
    spec = gguf_loader.read_spec(gemma3_file)
    assert_spec_matches(spec, reference_config)
    # Gemma 3 270M: 18 layers, every sixth global, a 512-token window elsewhere.
    assert spec.layer_types is not None and spec.layer_types.count("full_attention") == 3
    assert (spec.sliding_window, spec.rope_local_base_freq, spec.rope_theta) == (512, 1e4, 1e6)
    assert spec.attention_scale == 256**-0.5


def test_real_file_tensor_names_are_transformers_parameters(
    gemma3_file: GGUFFile, reference_config: transformers.Gemma3TextConfig
) -> None:
    spec = gguf_loader.read_spec(gemma3_file)
    with torch.device("meta"):
        hf = transformers.Gemma3ForCausalLM(reference_config)
    wanted = set(hf.state_dict()) - {"lm_head.weight"}  # tied to the embedding
    file_names = [t.name for t in gemma3_file.tensors]
    assert {gguf_loader.hf_name(n, spec.family) for n in file_names} == wanted
    assert set(gguf_loader.expected_tensors(spec)) == set(file_names)


@pytest.mark.parametrize("with_extras", [False, True])
def test_tiny_gemma3_spec_and_weights(tmp_path: Path, with_extras: bool) -> None:
    hf = tiny_gemma3(layers=3)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    extra = {}
    config = hf.config
    if with_extras:
        # a per-layer pattern (True: sliding), a local RoPE base and a logit cap in the file
        extra = dict(
            sliding_window_pattern=[False, True, False],
            rope_freq_base_swa=20000.0,
            final_logit_softcapping=30.0,
        )
        config = transformers.Gemma3TextConfig(
            **{
                **hf.config.to_dict(),
                "layer_types": ["full_attention", "sliding_attention", "full_attention"],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 2e4},
                },
                "final_logit_softcapping": 30.0,
            }
        )
    write_gemma3_gguf(tmp_path / "g.gguf", state, config, **extra)
    gguf_file = open_gguf(tmp_path / "g.gguf")
    spec = gguf_loader.read_spec(gguf_file)
    assert_spec_matches(spec, config)

    weights = dict(gguf_loader.iter_weights(gguf_file, spec, torch.float32))
    assert set(weights) == set(state)
    for name, w in weights.items():
        assert isinstance(w, torch.Tensor)
        # the file's norms are 1 + weight, as llama.cpp's converter writes them
        torch.testing.assert_close(w, state[name], rtol=0, atol=1e-7, msg=name)


def test_tiny_gemma3_missing_norm_is_named(tmp_path: Path) -> None:
    hf = tiny_gemma3(layers=2)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    del state["model.layers.1.post_feedforward_layernorm.weight"]
    write_gemma3_gguf(tmp_path / "g.gguf", state, hf.config)
    gguf_file = open_gguf(tmp_path / "g.gguf")
    with pytest.raises(ModelLoadError, match=r"lacks the tensors blk\.1\.post_ffw_norm\.weight$"):
        next(gguf_loader.iter_weights(gguf_file, gguf_loader.read_spec(gguf_file), torch.float32))
