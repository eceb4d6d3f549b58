"""Single GGUF files: hyper-parameters from the metadata, tensors dequantized to the run dtype."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from pagoda.model.gguf_metadata import GGUFFile, TensorInfo
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.quants import FORMATS, dequantize
from pagoda.model.spec import ModelLoadError, ModelSpec

# GGUF architecture -> our family. Mistral files declare "llama".
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
}

# GGUF tensor name -> Hugging Face name; {i} is the layer number.
NAME_TABLE = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Gemma 3 normalises around attention and MLP both before and after; GGUF's ffn_norm is
# the norm before the MLP, as in Llama, but Hugging Face calls that one pre_feedforward.
GEMMA3_NAME_TABLE = {
    **{g: h for g, h in NAME_TABLE.items() if not h.endswith(".bias")},
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
NAME_TABLES = {"gemma3": GEMMA3_NAME_TABLE}  # family -> table; NAME_TABLE otherwise

# llama.cpp's converter stores Gemma's RMSNorm weights w as 1 + w, the factor the norm
# multiplies by; Hugging Face's (and our) models hold w.
NORM_OFFSETS = {"gemma3": 1.0}

# Gemma 3 values llama.cpp assumes when the file does not carry them.
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # every sixth layer attends globally
GEMMA3_ROPE_LOCAL_BASE_FREQ = 10000.0

_LAYER = re.compile(r"^blk\.(\d+)\.")
_REQUIRED = object()


def field(gguf_file: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    """The value of a metadata field, or default when absent (no default: required)."""
    if key in gguf_file.fields:
        return gguf_file.fields[key]
    if default is _REQUIRED:
        raise ModelLoadError(f"GGUF metadata lacks the field {key!r}")
    return default


def read_spec(gguf_file: GGUFFile) -> ModelSpec:
    """Reads the hyper-parameters from the metadata into a ModelSpec."""
    arch = field(gguf_file, "general.architecture")
    if arch not in FAMILIES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(FAMILIES)}"
        )
    names = {t.name for t in gguf_file.tensors}
    hidden = field(gguf_file, f"{arch}.embedding_length")
    heads = field(gguf_file, f"{arch}.attention.head_count")
    spec = ModelSpec(
        family=FAMILIES[arch],
        vocab_size=field(gguf_file, f"{arch}.vocab_size", 0)
        or len(field(gguf_file, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=field(gguf_file, f"{arch}.feed_forward_length"),
        num_layers=field(gguf_file, f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=field(gguf_file, f"{arch}.attention.head_count_kv", heads),
        head_dim=field(gguf_file, f"{arch}.attention.key_length", hidden // heads),
        rms_norm_eps=field(gguf_file, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=field(gguf_file, f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=field(gguf_file, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_scaling=_rope_factors(gguf_file),
    )
    return _gemma3_spec(gguf_file, spec) if arch == "gemma3" else spec


def _gemma3_spec(gguf_file: GGUFFile, spec: ModelSpec) -> ModelSpec:
    """Gemma 3's sliding-window layers, local RoPE base, attention scale and GELU MLP."""
    window = field(gguf_file, "gemma3.attention.sliding_window", None)
    pattern = field(gguf_file, "gemma3.attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # one flag a layer, True where it slides
        sliding = [bool(p) for p in pattern]
    else:  # a period n: the last layer of every n attends globally (0: all slide)
        n = GEMMA3_SLIDING_WINDOW_PATTERN if pattern is None else pattern
        sliding = [n == 0 or i % n < n - 1 for i in range(spec.num_layers)]
    if len(sliding) != spec.num_layers:
        raise ModelLoadError(
            f"gemma3.attention.sliding_window_pattern has {len(sliding)} entries "
            f"for {spec.num_layers} layers"
        )
    # The file does not say how scores are scaled: llama.cpp follows Google's reference,
    # 1/sqrt(head_dim), except for the 27B model (62 layers): 1/sqrt(hidden / heads).
    scalar = spec.hidden_size // spec.num_heads if spec.num_layers == 62 else spec.head_dim
    return replace(
        spec,
        qk_norm=True,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=scalar,
        sliding_window=window,
        layer_types=None
        if window is None
        else tuple("sliding_attention" if s else "full_attention" for s in sliding),
        rope_local_base_freq=field(
            gguf_file, "gemma3.rope.freq_base_swa", GEMMA3_ROPE_LOCAL_BASE_FREQ
        ),
        final_logit_softcapping=field(gguf_file, "gemma3.final_logit_softcapping", None),
    )


def _rope_factors(gguf_file: GGUFFile) -> dict[str, Any] | None:
    """llama3-style scaling, which GGUF stores as a tensor of per-frequency divisors."""
    t = next((t for t in gguf_file.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    return {"rope_type": "factors", "factors": tensor_values(gguf_file, t).tolist()}


def hf_name(gguf_name: str, family: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors without one."""
    m = _LAYER.match(gguf_name)
    key = _LAYER.sub("blk.{i}.", gguf_name) if m else gguf_name
    target = NAME_TABLES.get(family, NAME_TABLE).get(key)
    return target.format(i=m.group(1)) if (target and m) else target


def unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's reordering of Q/K rows (interleaved -> rotate-half pairs)."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def tensor_values(gguf_file: GGUFFile, t: TensorInfo) -> torch.Tensor:
    """A tensor's values as float32 in PyTorch layout (rows first)."""
    return dequantize(_raw_bytes(gguf_file, t), t.type).reshape(t.shape)


def _raw_bytes(gguf_file: GGUFFile, t: TensorInfo) -> torch.Tensor:
    """A view of the file's mapping: weights held as the file stores them are not copied."""
    return torch.from_numpy(gguf_file.raw_bytes(t))


def expected_tensors(spec: ModelSpec) -> list[str]:
    """The GGUF names of the tensors a model of this spec needs."""

    def needed(target: str) -> bool:
        if target == "lm_head.weight":
            return not spec.tie_word_embeddings
        if target.endswith(".bias"):
            return spec.attention_bias
        if target.endswith(("q_norm.weight", "k_norm.weight")):
            return spec.qk_norm
        return True

    names = []
    for gguf_name, target in NAME_TABLES.get(spec.family, NAME_TABLE).items():
        if needed(target):
            names += [gguf_name.format(i=i) for i in range(spec.num_layers)]
    return list(dict.fromkeys(names))  # a name without {i} comes once


def check_tensors(gguf_file: GGUFFile, spec: ModelSpec) -> None:
    """Raises before any loading when a tensor is missing or of a type we cannot read."""
    have = {t.name: t.type for t in gguf_file.tensors}
    missing = sorted(set(expected_tensors(spec)) - set(have))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ModelLoadError(f"the GGUF file lacks the tensors {', '.join(missing[:8])}{more}")
    for name, qtype in have.items():
        if qtype not in FORMATS:
            raise ModelLoadError(
                f"tensor {name!r} has type {qtype}, which Pagoda cannot read; "
                f"supported: {', '.join(FORMATS)}"
            )


def iter_weights(
    gguf_file: GGUFFile,
    spec: ModelSpec,
    dtype: torch.dtype,
    in_blocks: frozenset[str] = frozenset(),
    dense_copy: bool = False,
) -> Iterator[tuple[str, torch.Tensor | GGUFWeight]]:
    """Yields (Hugging Face name, tensor in dtype) for every tensor the model uses; those named
    in in_blocks as a GGUFWeight instead, the file's blocks, and with dense_copy also
    dequantized, first.

    A GGUFWeight used as the file stores it is a view of the file's mapping (no copy); rows
    reordered or stacked are copied. Each tensor's pages are released once it has been
    taken, so that what was copied is not resident twice (views read theirs again on use).
    """
    check_tensors(gguf_file, spec)
    permuted = field(gguf_file, "general.architecture") in ("llama", "mistral")
    norm_offset = NORM_OFFSETS.get(spec.family, 0.0)
    for t in gguf_file.tensors:
        name = hf_name(t.name, spec.family)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue  # read into the spec's rope scaling
            raise ModelLoadError(f"unknown GGUF tensor {t.name!r}")
        rows = None
        if permuted and name.endswith("q_proj.weight"):
            rows = unpermute(torch.arange(t.shape[0]), spec.num_heads)
        elif permuted and name.endswith("k_proj.weight"):
            rows = unpermute(torch.arange(t.shape[0]), spec.num_kv_heads)
        raw = _raw_bytes(gguf_file, t)
        if name not in in_blocks or dense_copy:
            w = dequantize(raw, t.type).reshape(t.shape)
            if w.data_ptr() == raw.data_ptr():  # F32 is read in place: copy it off the file
                w = w.clone()
            if norm_offset and name.endswith("norm.weight"):
                w -= norm_offset
            yield name, (w if rows is None else w[rows]).to(dtype)
        if name in in_blocks:
            q = GGUFWeight(raw.reshape(t.shape[0], -1), t.type)
            yield name, q if rows is None else q.rows(rows)
        gguf_file.release_pages(t)
