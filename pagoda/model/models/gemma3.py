"""Gemma 3 (text): Llama's shape with four norms a layer, GeGLU, and local/global layers.

    x ─ norm ─ attention ─ norm ─(+)─ norm ─ GeGLU ─ norm ─(+)─▶
    └───────────────────────────┘ └──────────────────────────┘

Norms scale by (1 + w); q and k are normalised per head before RoPE; the
embeddings are multiplied by sqrt(hidden_size). Layers alternate (layer_types):
a local layer's query sees only the last sliding_window positions and rotates
by RoPE base rope_local_base_freq; a global layer sees every earlier position
and uses rope_theta with the model's rope scaling. Every layer keeps all of a
sequence's blocks: local layers leave the ones behind their window unread.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.layers.attention import Attention
from pagoda.model.layers.embedding import Embedding
from pagoda.model.layers.mlp import GatedMLP
from pagoda.model.layers.norm import GemmaRMSNorm
from pagoda.model.layers.rope import RotaryEmbedding
from pagoda.model.models.base import CausalLM
from pagoda.model.spec import ModelSpec


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding, window: int | None) -> None:
        super().__init__()
        size, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = Attention(spec, rope, GemmaRMSNorm, window)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GatedMLP(size, spec.intermediate_size, spec.hidden_activation)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer: the residual stream is residual + x, added by the next norm."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, attn, keep)
        if keep is not None:
            residual = residual[keep]
        x = self.post_attention_layernorm(x)
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        assert spec.rope_local_base_freq is not None
        self.spec = spec
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size, spec.hidden_size**0.5)
        positions = spec.max_position_embeddings
        self.rope_global = RotaryEmbedding(
            spec.head_dim, positions, spec.rope_theta, spec.rope_scaling
        )
        self.rope_local = RotaryEmbedding(spec.head_dim, positions, spec.rope_local_base_freq, None)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(spec, self.rope_global, None)
            if spec.layer_window(i) is None
            else Gemma3DecoderLayer(spec, self.rope_local, spec.layer_window(i))
            for i in range(spec.num_layers)
        )
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
