"""Hugging Face-named tensors into a model's parameters: the one table from those names to ours.

Both formats arrive here under Hugging Face names: safetensors files carry them,
and gguf.py renames GGUF tensors to them first. Ours differ only where the
loader fuses projections: q/k/v into qkv_proj and gate/up into gate_up_proj.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.model.layers.embedding import Embedding
from pagoda.model.layers.linear import Linear
from pagoda.model.models.base import CausalLM
from pagoda.model.ops.quantized_linear import GGUFWeight, stack
from pagoda.model.spec import ModelLoadError, ModelSpec

# Hugging Face weight name part -> (our fused parameter, shard); shards are stacked in this order.
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def param_name(hf_name: str, spec: ModelSpec) -> tuple[str | None, int]:
    """Our parameter and shard for a Hugging Face tensor name; None for tensors we ignore."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None, 0
    name = hf_name.removeprefix("model.")
    if name == "lm_head.weight" and spec.tie_word_embeddings:
        return None, 0
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, shard = FUSED[part]
            parts[i] = fused
            return ".".join(parts), shard
    return name, 0


def _shard_sizes(name: str, spec: ModelSpec) -> list[int] | None:
    if ".qkv_proj." in name:
        return [spec.q_size, spec.kv_size, spec.kv_size]
    if ".gate_up_proj." in name:
        return [spec.intermediate_size] * 2
    return None


def _add_shard(
    pending: dict[str, dict[int, GGUFWeight]], name: str, shard: int, w: GGUFWeight, count: int
) -> list[GGUFWeight]:
    """Collects a projection's shards in their file form: all of them, in order, once complete."""
    shards = pending.setdefault(name, {})
    shards[shard] = w
    if len(shards) < count:
        return []
    del pending[name]
    return [shards[i] for i in range(count)]


def _projection(model: CausalLM, name: str) -> Linear:
    module = model.get_submodule(name.removesuffix(".weight"))
    assert isinstance(module, Linear), name
    return module


@torch.no_grad()
def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor | GGUFWeight]]) -> None:
    """Copies Hugging Face-named tensors in, fusing q/k/v and gate/up; checks completeness.

    A weight the model holds in blocks (its module's weight dropped, see
    loader/quantization.py), or in blocks besides its dense copy, arrives as a GGUFWeight:
    a projection gets its file form once all of its shards have come in, the embedding its
    table (when it has no dense one), and the output layer (the embedding's when tied)
    compute_logits's.
    """
    spec = model.spec
    params = dict(model.named_parameters())
    held = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is None
    }
    expected = {name: len(_shard_sizes(name, spec) or [0]) for name in [*params, *held]}
    seen: dict[str, set[int]] = {name: set() for name in expected}
    gguf_shards: dict[str, dict[int, GGUFWeight]] = {}

    for hf_name, tensor in weights:
        name, shard = param_name(hf_name, spec)
        if name is None:
            continue
        if name not in expected:
            raise ModelLoadError(f"unexpected tensor {hf_name!r} for a {spec.family} model")
        if isinstance(tensor, GGUFWeight):
            # Held in blocks only, or (a dense copy kept) in blocks too, for a few rows.
            _hold(model, name, shard, tensor, gguf_shards, expected[name])
            if name in held:
                seen[name].add(shard)
            continue
        assert name not in held, name
        target: torch.Tensor = params[name]
        sizes = _shard_sizes(name, spec)
        if sizes is not None:
            target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
        if target.shape != tensor.shape:
            raise ModelLoadError(
                f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
        seen[name].add(shard)

    missing = [n for n, count in expected.items() if len(seen[n]) != count]
    if missing:
        raise ModelLoadError(f"missing weights: {', '.join(sorted(missing)[:8])}")


def _hold(
    model: CausalLM,
    name: str,
    shard: int,
    w: GGUFWeight,
    pending: dict[str, dict[int, GGUFWeight]],
    count: int,
) -> None:
    """Gives the module of a weight held in blocks its file form (an embedding with a dense
    table gathers from that instead)."""
    if name == "embed_tokens.weight" and model.embed_tokens.weight is None:
        embedding = model.embed_tokens
        assert isinstance(embedding, Embedding)
        embedding.gguf = w
    if name == model.output_weight_name():
        model.output_gguf = w
    elif name != "embed_tokens.weight" and (parts := _add_shard(pending, name, shard, w, count)):
        # one part is kept as it came (a view of the file); several are stacked (copied)
        _projection(model, name).gguf = tuple(parts) if len(parts) == 1 else stack(parts)
