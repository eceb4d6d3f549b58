"""GGUF loading: dequantization, the name table, Q/K un-permutation, metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_gguf import write_gguf
from tiny_models import COMMON, bind_cache, forward, make_hf_model

from pagoda.model.layers.linear import Linear
from pagoda.model.loader import load_model
from pagoda.model.ops import quantized_linear
from pagoda.model.ops.quantized_linear import quantize_rows_torch

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


@pytest.mark.parametrize("qtype", QTYPES)
def test_projections_keep_their_file_form(tmp_path: Path, qtype: str) -> None:
    """Each projection and the output layer keep the file's blocks, and for a few rows compute
    with them: the dense weights' product on the int8-quantized inputs."""
    if not quantized_linear.kernel_formats():
        pytest.skip("the C++ kernels are not built")
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "tiny.gguf", state, qtype, embedding_qtype=qtype)
    model = load_model(tmp_path / "tiny.gguf", quantized=True)
    dense = load_model(tmp_path / "tiny.gguf", quantized=False)
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    dense_projections = [m for m in dense.modules() if isinstance(m, Linear)]
    assert len(projections) == 4 * COMMON["num_hidden_layers"]
    for m, d in zip(projections, dense_projections):
        assert [w.format for w in m.gguf] == [qtype]
        x = torch.randn(3, m.in_features)
        want = F.linear(quantize_rows_torch(x), d.weight)  # q/k rows un-permuted as the dense ones
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    assert model.output_gguf is not None and model.output_gguf.format == qtype
    hidden = torch.randn(1, COMMON["hidden_size"])
    want = quantize_rows_torch(hidden) @ dense.embed_tokens.weight.T
    torch.testing.assert_close(model.compute_logits(hidden), want, rtol=1e-4, atol=1e-5)

    # Each row's product is its own: a sequence's logits alone equal its logits in a batch.
    bind_cache(model)
    alone = forward(model, [([5], 0, [0])])[0]
    batch = forward(model, [([5], 0, [0]), ([7], 0, [1]), ([9, 3], 0, [2])])[0]
    assert torch.equal(alone, batch)
    assert all(not m.gguf for m in dense.modules() if isinstance(m, Linear))
    assert dense.output_gguf is None
