"""CausalLM: what every architecture shares around its layers (logits, caches, packing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.layers.attention import Attention
from pagoda.model.layers.linear import Linear, onednn_packs_bfloat16
from pagoda.model.ops import quantized_gemm, quantized_linear
from pagoda.model.ops.quantized_gemm import RepackedWeight
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.spec import ModelSpec


class CausalLM(nn.Module):
    """Token ids in, hidden states out; compute_logits turns chosen rows into logits.

    A subclass builds `embed_tokens`, its `layers` (each with an Attention, called as
    layer(positions, x, residual, attn, keep) -> (x, residual)), the final `norm` (which
    adds the residual) and, unless the output layer is tied to the embeddings, `lm_head`.
    """

    spec: ModelSpec
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module

    # Up to this many rows, logits come from the GGUF kernel when the output layer is held
    # in the file's blocks (the loader measures the limit); above it, from the int8 GEMM where
    # the loader measured it faster (output_gemm), else from decoded tiles.
    GGUF_LOGITS_MAX_ROWS = 4
    gguf_logits_max_rows = GGUF_LOGITS_MAX_ROWS
    output_gemm = False
    output_gguf: GGUFWeight | None = None  # the output layer in its file form, if held so
    # The output layer repacked for the int8 GEMM (quantized_gemm.repack), which then computes
    # every step's logits (a tied embedding gathers its rows from it too); output_gguf stays,
    # a view of the file that is not read again.
    output_repacked: RepackedWeight | None = None
    output_prepacked: torch.Tensor | None = None  # the output layer in oneDNN's layout

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

    def holds_blocks(self) -> bool:
        """Whether some projection computes from a GGUF file's blocks (as read or repacked)."""
        return any(isinstance(m, Linear) and bool(m.gguf or m.repacked) for m in self.modules())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> float32 logits [n, vocab_size]."""
        logits = self._output_layer(hidden)
        cap = self.spec.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _output_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_repacked is not None:
            return quantized_gemm.gguf_gemm_repacked(hidden, self.output_repacked)
        w = self.output_gguf
        if (
            w is not None
            and hidden.shape[0] <= self.gguf_logits_max_rows
            and quantized_linear.kernel_takes(hidden, w)
        ):
            # A decode step of a few sequences reads the whole output layer (for a large
            # vocabulary, a good part of the model's bytes) for a few rows.
            return quantized_linear.gguf_linear(hidden, w)
        if self.output_held_in_blocks():
            assert w is not None
            if self.output_gemm and quantized_gemm.gemm_takes(hidden, w):
                return quantized_gemm.gguf_gemm(hidden, w)
            return quantized_linear.gguf_matmul(hidden, w).float()
        if self.output_prepacked is not None:
            return torch.ops.mkldnn._linear_pointwise(
                hidden, self.output_prepacked, None, "none", [], ""
            ).float()
        return F.linear(hidden, self.output_weight()).float()

    def pack_for_onednn(self) -> None:
        """Prepacks the projections and a copy of the output layer for oneDNN (CPU, bfloat16).

        The output layer is copied because a tied one is also the embedding table,
        whose rows must stay readable. Nothing changes on a CPU oneDNN cannot pack for.
        """
        if not onednn_packs_bfloat16():
            return
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_onednn()
        if not self.output_held_in_blocks():
            weight = self.output_weight().detach()
            self.output_prepacked = torch.ops.mkldnn._reorder_linear_weight(weight, 32)

    def output_held_in_blocks(self) -> bool:
        """Whether the output layer exists only as its file form (no dense weight)."""
        name = self.output_weight_name().removesuffix(".weight")
        return self.output_gguf is not None and self.get_submodule(name).weight is None

    def output_weight(self) -> torch.Tensor:
        """The output layer's dense weight: lm_head's, or the embedding table when they are
        tied (not there when output_held_in_blocks)."""
        return self.get_parameter(self.output_weight_name())

    def output_weight_name(self) -> str:
        return "embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hands each layer's attention its (k_cache, v_cache) pair, in layer order."""
        attentions = [m for m in self.modules() if isinstance(m, Attention)]
        assert len(caches) == len(attentions)
        for attention, cache in zip(attentions, caches):
            attention.kv_cache = cache
