"""Greedy sampling's argmax over each row of logits (csrc/argmax.cpp)."""

from __future__ import annotations

import torch

from pagoda import kernels


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1). On the CPU, ATen's runs one scalar loop a row (1.2 ms for 32
    rows of 49152 logits here); the C++ kernel finds the same index in 0.1 ms."""
    if kernels.available(logits) and logits.dtype == torch.float32:
        return torch.ops.pagoda.argmax_rows(logits.contiguous())
    return argmax_rows_torch(logits)


def argmax_rows_torch(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)
