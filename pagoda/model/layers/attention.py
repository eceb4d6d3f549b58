"""Self-attention over the paged KV cache: q/k/v projection, RoPE, cache write, attention."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagoda.model import ops
from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.layers.linear import Linear
from pagoda.model.layers.rope import RotaryEmbedding
from pagoda.model.spec import ModelSpec


class Attention(nn.Module):
    """One layer's attention; q_norm/k_norm (per head, before RoPE) where norm is given.

    With a window, a query at position p sees only keys at p - window + 1 .. p.
    """

    def __init__(
        self,
        spec: ModelSpec,
        rope: RotaryEmbedding,
        norm: Callable[[int, float], nn.Module] | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.qkv_proj = Linear(
            spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.attention_bias
        )
        self.o_proj = Linear(spec.q_size, spec.hidden_size, bias=False)
        self.qk_norm = norm is not None
        if norm is not None:
            self.q_norm = norm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = norm(spec.head_dim, spec.rms_norm_eps)
        self.rope = rope
        self.scale = spec.attention_scale
        self.window = window
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
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        assert self.kv_cache is not None, "the runner binds a KV cache before the first forward"
        ops.rope_and_cache(q, k, v, positions, self.rope.cos_sin, *self.kv_cache, attn.slot_mapping)
        out = ops.paged_attention(q, *self.kv_cache, attn, self.scale, self.window)
        return self.o_proj(out if keep is None else out[keep])
