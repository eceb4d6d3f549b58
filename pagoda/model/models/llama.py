"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as one readable transformer."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.layers.attention import Attention
from pagoda.model.layers.embedding import Embedding
from pagoda.model.layers.mlp import GatedMLP
from pagoda.model.layers.norm import RMSNorm
from pagoda.model.layers.rope import RotaryEmbedding
from pagoda.model.models.base import CausalLM
from pagoda.model.spec import ModelSpec


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding, window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rope, RMSNorm if spec.qk_norm else None, window)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_activation)

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


class LlamaForCausalLM(CausalLM):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        # One table for all layers: the rotations do not depend on the layer.
        self.rope = RotaryEmbedding(
            spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, self.rope, spec.layer_window(i)) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
