"""Rotary position embeddings (the rotate-half form Hugging Face uses), with llama3 or linear
scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """The per-pair rotation frequencies, [head_dim // 2], in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    if scaling["rope_type"] == "factors":
        return (inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)).float()
    if scaling["rope_type"] == "linear":  # positions slowed down uniformly
        return (inv_freq / scaling["factor"]).float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled).float()


class RotaryEmbedding(torch.nn.Module):
    """The cos/sin table by which ops.rope_and_cache rotates q and k at each position."""

    cos_sin: torch.Tensor  # [max_positions, head_dim] float32: cos | sin

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin", torch.empty(max_positions, head_dim), persistent=False)

    @torch.no_grad()
    def init_table(self) -> None:
        """Fills the cos/sin table; called once the module lives on its real device."""
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_positions, head_dim]
        self.cos_sin.copy_(table.to(self.cos_sin.device))
