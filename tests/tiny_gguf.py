"""Tiny random-weight llamas written as GGUF files, the way llama.cpp's converter lays them out,
and random GGUF blocks of every type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tiny_models import COMMON

from pagoda.model.loader.gguf import NAME_TABLE
from pagoda.model.quants import FORMATS

# Where each block keeps its float16 scales (d, and dmin or m where there is one).
SCALE_BYTES = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def random_blocks(qtype: str, blocks: int, seed: int = 0) -> np.ndarray:
    """[blocks, bytes a block] random uint8 that reach every code and packed scale of qtype,
    its float16 scales kept small and sane."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(blocks, FORMATS[qtype][1]), dtype=np.uint8)
    for offset in SCALE_BYTES[qtype]:
        scale = (rng.standard_normal(blocks) * 0.01).astype(np.float16)
        out[:, offset : offset + 2] = scale.view(np.uint8).reshape(blocks, 2)
    return out


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
    **sizes: Any,
) -> dict[str, torch.Tensor]:
    """Writes a tiny llama as GGUF (2-D weights in qtype); returns the weights as stored.

    arch is the architecture the file declares (its metadata keys are prefixed with it);
    sizes override COMMON's. The k-quants, which the gguf package cannot make, are written
    as random blocks (random_blocks) in place of the weights.
    """
    config = {**COMMON, **sizes}
    to_gguf = {}
    for g, h in NAME_TABLE.items():
        for i in range(config["num_hidden_layers"]):
            to_gguf[h.format(i=i)] = g.format(i=i)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config["vocab_size"])
    stored = {}
    for i, (name, tensor) in enumerate(state.items()):
        w = tensor.numpy()
        if name.endswith("q_proj.weight"):
            w = permute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute(w, config["num_key_value_heads"])
        kind = gguf.GGMLQuantizationType[qtype if w.ndim == 2 else "F32"]
        if embedding_qtype and name == "model.embed_tokens.weight":
            kind = gguf.GGMLQuantizationType[embedding_qtype]
        if kind.name in ("F32", "F16"):
            raw = w.astype(np.float16 if kind.name == "F16" else np.float32)
        elif kind.name.endswith("_K"):
            per_block = FORMATS[kind.name][0]
            raw = random_blocks(kind.name, w.size // per_block, seed=i).reshape(w.shape[0], -1)
        else:
            raw = gguf.quants.quantize(w, kind)
        writer.add_tensor(to_gguf[name], raw, raw_dtype=kind)
        # What a faithful loader must reproduce: gguf's own dequantization, un-permuted.
        stored[name] = torch.from_numpy(
            gguf.quants.dequantize(raw, kind).reshape(tensor.shape).astype(np.float32)
        )
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            s = stored[name]
            stored[name] = s.reshape(heads, -1, 2, s.shape[1]).transpose(1, 2).reshape(s.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def tiny_gemma3(layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A transformers Gemma 3 (text) with random weights, norms perturbed off zero."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=16,
        query_pre_attn_scalar=32,  # head_dim, as in every Gemma 3 but the 27B
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def write_gemma3_gguf(
    path: Path, state: dict[str, torch.Tensor], config: Any, **extra: Any
) -> None:
    """Writes a Gemma 3 as llama.cpp's converter does: its names, norms stored as 1 + weight.

    extra: optional metadata (sliding_window_pattern, rope_freq_base_swa, final_logit_softcapping).
    """
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(config.vocab_size)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    for name, tensor in state.items():
        w = tensor.numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            w = w + 1
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
