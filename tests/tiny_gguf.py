"""Tiny random-weight llamas written as GGUF files, the way llama.cpp's converter lays them out."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tiny_models import COMMON

from pagoda.model.loader.gguf import NAME_TABLE


def permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    qtype: str,
    embedding_qtype: str | None = None,
    arch: str = "llama",
) -> dict[str, torch.Tensor]:
    """Writes a tiny llama as GGUF (2-D weights in qtype); returns the weights as stored.

    arch is the architecture the file declares (its metadata keys are prefixed with it).
    """
    to_gguf = {}
    for g, h in NAME_TABLE.items():
        for i in range(COMMON["num_hidden_layers"]):
            to_gguf[h.format(i=i)] = g.format(i=i)
    writer = gguf.GGUFWriter(str(path), arch)
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
