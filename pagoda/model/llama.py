"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as one readable transformer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model import ops
from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.layers.linear import Int4Weight, Linear, Q8Weight
from pagoda.model.layers.rope import RotaryEmbedding
from pagoda.model.spec import ModelLoadError, ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        # Normalise in float32, as the reference does, then scale in the run dtype.
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        self.qkv_proj = Linear(
            spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.attention_bias
        )
        self.o_proj = Linear(spec.q_size, spec.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.rope = rope
        self.scale = spec.attention_scale
        # Set by the runner once the cache is allocated: (k_cache, v_cache).
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        attn: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every token's keys and values go to the cache; the output is keep's rows only."""
        spec = self.spec
        q, k, v = self.qkv_proj(x).split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = q.view(-1, spec.num_heads, spec.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, spec.num_kv_heads, spec.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        assert self.kv_cache is not None, "the runner binds a KV cache before the first forward"
        ops.rope_and_cache(q, k, v, positions, self.rope.cos_sin, *self.kv_cache, attn.slot_mapping)
        out = ops.paged_attention(q, *self.kv_cache, attn, self.scale)
        return self.o_proj(out if keep is None else out[keep])


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rope)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is residual + x: the previous layer hands its last addend
        over unadded, so that the add happens inside the next norm's pass over the rows.
        The first layer gets the embeddings as x and no residual. With keep, the rows
        after attention are keep's only."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, attn, keep)
        if keep is not None:
            residual = residual[keep]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Token ids in, hidden states out; compute_logits turns chosen rows into logits."""

    # Hugging Face weight name -> (our fused parameter, shard); shards are stacked in this order.
    FUSED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        # One table for all layers: the rotations do not depend on the layer.
        self.rope = RotaryEmbedding(
            spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, self.rope) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size].

        keep: the rows the caller will read (default all), e.g. the last token of each
        prompt. The last layer then writes every token's keys and values to the cache,
        as it must, but runs its output projection and MLP on keep's rows only: for a
        prompt of n tokens, n - 1 rows of the last layer's work that nothing reads.
        """
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x, residual = layer(positions, x, residual, attn, keep if last else None)
        return self.norm(x, residual)[0]

    # Up to this many rows, logits come from the Q8_0 output layer when there is one.
    Q8_LOGITS_MAX_ROWS = 4
    logits_q8: Q8Weight | None = None
    output_prepacked: torch.Tensor | None = None  # the output layer in oneDNN's layout

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> float32 logits [n, vocab_size]."""
        if self.logits_q8 is not None and hidden.shape[0] <= self.Q8_LOGITS_MAX_ROWS:
            # A decode step of a few sequences reads the whole output layer (a fifth of
            # this model's bytes) for a few rows: 1 byte per weight beats bfloat16's 2.
            return ops.q8_0_linear(hidden, self.logits_q8, self.output_weight())
        if self.output_prepacked is not None:
            return torch.ops.mkldnn._linear_pointwise(
                hidden, self.output_prepacked, None, "none", [], ""
            ).float()
        return F.linear(hidden, self.output_weight()).float()

    def pack_for_onednn(self) -> None:
        """Prepacks the projections and a copy of the output layer for oneDNN (CPU, bfloat16).

        The output layer is copied because a tied one is also the embedding table,
        whose rows must stay readable.
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_onednn()
        weight = self.output_weight().detach()
        self.output_prepacked = torch.ops.mkldnn._reorder_linear_weight(weight, 32)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight: lm_head's, or the embedding table when they are tied."""
        return self.get_parameter(self._output_weight_name())

    def _output_weight_name(self) -> str:
        return "embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hands each layer its (k_cache, v_cache) pair."""
        assert len(caches) == len(self.layers)
        for layer, cache in zip(self.layers, caches):
            layer.self_attn.kv_cache = cache

    @torch.no_grad()
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | Int4Weight | Q8Weight]]
    ) -> None:
        """Copies Hugging Face-named tensors in, fusing q/k/v and gate/up; checks completeness.

        An Int4Weight arriving beside a projection's dense weight gives that
        projection its 4-bit form too, once all of its shards have come in 4 bits;
        a Q8Weight of the output layer gives compute_logits its Q8_0 form.
        """
        params = dict(self.named_parameters())
        expected = {name: 1 for name in params}
        for name in params:
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                expected[name] = 3
            elif name.endswith("gate_up_proj.weight"):
                expected[name] = 2
        seen: dict[str, set[int]] = {name: set() for name in params}
        int4_shards: dict[str, dict[int, Int4Weight]] = {}

        for hf_name, tensor in weights:
            name, shard = self._param_name(hf_name)
            if name is None:
                continue
            if name not in params:
                raise ModelLoadError(
                    f"unexpected tensor {hf_name!r} for a {self.spec.family} model"
                )
            if isinstance(tensor, Q8Weight):
                if name == self._output_weight_name():
                    self.logits_q8 = tensor
                continue
            if isinstance(tensor, Int4Weight):
                shards = int4_shards.setdefault(name, {})
                shards[shard] = tensor
                if len(shards) == expected[name]:  # all in 4 bits: stack the shards in order
                    module = self.get_submodule(name.removesuffix(".weight"))
                    module.set_int4(Int4Weight.cat([shards.pop(i) for i in range(len(shards))]))
                continue
            target = self._shard_view(params[name], name, shard)
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
        self.rope.init_table()

    def _param_name(self, hf_name: str) -> tuple[str | None, int]:
        """Our parameter and shard for a Hugging Face tensor name; None for tensors we ignore."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None, 0
        name = hf_name.removeprefix("model.")
        if name == "lm_head.weight" and self.spec.tie_word_embeddings:
            return None, 0
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in self.FUSED:
                fused, shard = self.FUSED[part]
                parts[i] = fused
                return ".".join(parts), shard
        return name, 0

    def _shard_view(self, param: torch.Tensor, name: str, shard: int) -> torch.Tensor:
        spec = self.spec
        if ".qkv_proj." in name:
            sizes = [spec.q_size, spec.kv_size, spec.kv_size]
        elif ".gate_up_proj." in name:
            sizes = [spec.intermediate_size] * 2
        else:
            return param
        return param.narrow(0, sum(sizes[:shard]), sizes[shard])
