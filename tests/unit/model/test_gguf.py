"""GGUF loading: dequantization, the name table, Q/K un-permutation, metadata."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_models import COMMON, bind_cache, forward, make_hf_model

from pagoda.model.layers.linear import Linear
from pagoda.model.loader import load_model
from pagoda.model.loader.gguf import NAME_TABLE

QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path, state: dict[str, torch.Tensor], qtype: str, embedding_qtype: str | None = None
) -> dict[str, torch.Tensor]:
    """Writes a tiny llama as GGUF (2-D weights in qtype); returns the weights as stored."""
    to_gguf = {}
    for g, h in NAME_TABLE.items():
        for i in range(COMMON["num_hidden_layers"]):
            to_gguf[h.format(i=i)] = g.format(i=i)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(COMMON["num_hidden_layers"])
    writer.add_context_length(COMMON["max_position_embeddings"])
    writer.add_embedding_length(COMMON["hidden_size"])
    writer.add_feed_forward_length(COMMON["intermediate_size"])
    writer.add_head_count(COMMON["num_attention_heads"])
    writer.add_head_count_kv(COMMON["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(COMMON["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(COMMON["vocab_size"])
    stored = {}
    for name, tensor in state.items():
        w = tensor.numpy()
        if name.endswith("q_proj.weight"):
            w = permute(w, COMMON["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute(w, COMMON["num_key_value_heads"])
        kind = gguf.GGMLQuantizationType[qtype if w.ndim == 2 else "F32"]
        if embedding_qtype and name == "model.embed_tokens.weight":
            kind = gguf.GGMLQuantizationType[embedding_qtype]
        raw = (
            gguf.quants.quantize(w, kind)
            if kind.name not in ("F32", "F16")
            else w.astype(np.float16 if kind.name == "F16" else np.float32)
        )
        writer.add_tensor(to_gguf[name], raw, raw_dtype=kind)
        # What a faithful loader must reproduce: gguf's own dequantization, un-permuted.
        stored[name] = torch.from_numpy(
            gguf.quants.dequantize(raw, kind).reshape(tensor.shape).astype(np.float32)
        )
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = COMMON["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            s = stored[name]
            stored[name] = s.reshape(heads, -1, 2, s.shape[1]).transpose(1, 2).reshape(s.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", ["F32", "F16", *QTYPES])
def test_gguf_model_equals_safetensors_model(qtype: str, tmp_path: Path) -> None:
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    stored = write_gguf(tmp_path / "tiny.gguf", state, qtype)
    if qtype == "F32":
        for name in state:
            assert torch.equal(stored[name], state[name]), name  # the round trip is lossless
    hf_dir = tmp_path / "hf"
    hf.config.save_pretrained(hf_dir)
    save_file(stored, hf_dir / "model.safetensors")

    from_gguf = load_model(tmp_path / "tiny.gguf")
    from_st = load_model(hf_dir)
    assert from_gguf.spec.tie_word_embeddings and from_st.spec.tie_word_embeddings
    for (name, a), (_, b) in zip(from_gguf.named_parameters(), from_st.named_parameters()):
        assert torch.equal(a, b), name


def test_q4_1_projections_also_load_as_exact_int4(tmp_path: Path) -> None:
    """The int4 form of each projection computes with the same weights as the dense one."""
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "tiny.gguf", state, "Q4_1")
    model = load_model(tmp_path / "tiny.gguf", quantized=True)
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(projections) == 4 * COMMON["num_hidden_layers"]
    x = {n: torch.randn(3, n) for n in (COMMON["hidden_size"], COMMON["intermediate_size"])}
    for m in projections:
        assert m.int4 is not None
        inputs = x[m.in_features]
        assert inputs.shape[0] <= Linear.INT4_MAX_ROWS  # so forward takes the int4 kernel
        torch.testing.assert_close(m(inputs), F.linear(inputs, m.weight), rtol=1e-5, atol=1e-5)

    # Many rows take the dense path; few rows the int4 one: the same logits either way.
    ids = torch.arange(2 * Linear.INT4_MAX_ROWS) % COMMON["vocab_size"]
    dense = load_model(tmp_path / "tiny.gguf")
    for m in (model, dense):
        bind_cache(m)
    # The output layer in Q8_0 form: the file's own weights, so the same logits.
    assert model.logits_q8 is None  # this file's embedding is Q4_1, not Q8_0
    write_gguf(tmp_path / "q8.gguf", state, "Q4_1", embedding_qtype="Q8_0")
    q8 = load_model(tmp_path / "q8.gguf", quantized=True)
    assert q8.logits_q8 is not None
    hidden = torch.randn(q8.Q8_LOGITS_MAX_ROWS, COMMON["hidden_size"])
    torch.testing.assert_close(
        q8.compute_logits(hidden), hidden @ q8.embed_tokens.weight.T, rtol=1e-5, atol=1e-5
    )

    for n in (1, Linear.INT4_MAX_ROWS):
        chunk = [(ids[:n].tolist(), 0, list(range(8)))]
        torch.testing.assert_close(
            forward(model, chunk), forward(dense, chunk), rtol=1e-4, atol=1e-4
        )


def test_int4_is_left_out_for_other_formats(tmp_path: Path) -> None:
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "tiny.gguf", state, "Q8_0")
    model = load_model(tmp_path / "tiny.gguf", quantized=True)
    assert all(m.int4 is None for m in model.modules() if isinstance(m, Linear))
