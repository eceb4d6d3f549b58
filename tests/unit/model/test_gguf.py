"""GGUF loading: dequantization, the name table, Q/K un-permutation, metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_gguf import write_gguf
from tiny_models import COMMON, bind_cache, forward, make_hf_model

from pagoda import kernels
from pagoda.model.layers.linear import Linear
from pagoda.model.loader import load_model

QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


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


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_int8_projections_compute_as_the_dense_ones(tmp_path: Path, qtype: str) -> None:
    """Q8_0 and Q5_0 projections keep int8 codes, used for one row with the C++ kernels."""
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "tiny.gguf", state, qtype)
    model = load_model(tmp_path / "tiny.gguf", quantized=True)
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(projections) == 4 * COMMON["num_hidden_layers"]
    for m in projections:
        assert m.int4 is None and m.q8 is not None
        # the codes are the file's weights exactly (q/k rows un-permuted as the dense ones)
        scale = m.q8.scale.repeat_interleave(32, dim=1)
        assert torch.equal(m.q8.codes.float() * scale, m.weight)
    if not kernels.load():
        pytest.skip("the C++ kernels are not built")
    for m in projections:
        x = torch.randn(Linear.Q8_MAX_ROWS, m.in_features)
        torch.testing.assert_close(m(x), F.linear(x, m.weight), rtol=1e-5, atol=1e-5)

    dense = load_model(tmp_path / "tiny.gguf")
    for m in (model, dense):
        bind_cache(m)
    chunk = [([5], 0, list(range(8)))]
    torch.testing.assert_close(forward(model, chunk), forward(dense, chunk), rtol=1e-4, atol=1e-4)


def test_int4_is_left_out_for_other_formats(tmp_path: Path) -> None:
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "tiny.gguf", state, "Q8_0")
    model = load_model(tmp_path / "tiny.gguf", quantized=True)
    assert all(m.int4 is None for m in model.modules() if isinstance(m, Linear))
    model = load_model(tmp_path / "tiny.gguf", quantized=False)
    assert all(m.q8 is None for m in model.modules() if isinstance(m, Linear))
