"""The model's small steps, one op family a module, each as plain PyTorch and as C++.

A family's module holds its dispatcher and its `*_torch` twin: the twin defines
what the step computes; the dispatcher runs the C++ kernel of the same name
(pagoda/kernels/csrc/<family>.cpp: one pass over the data) where
kernels.available(x) says the kernels take x, and the twin elsewhere. Each
family's tests (tests/unit/model/ops/test_<family>.py) hold the two together.

    norm               rms_norm, add_rms_norm, gemma_rms_norm, gemma_add_rms_norm
    activation         silu_mul, gelu_tanh_mul
    rope_and_cache     rope_and_cache
    attention          paged_attention (decode and prompt kernels)
    quantized_linear   gguf_linear, gguf_matmul (tile by tile), dequantize_rows
    argmax             argmax_rows
"""

from pagoda.model.ops.activation import gelu_tanh_mul, silu_mul
from pagoda.model.ops.argmax import argmax_rows
from pagoda.model.ops.attention import paged_attention
from pagoda.model.ops.norm import add_rms_norm, gemma_add_rms_norm, gemma_rms_norm, rms_norm
from pagoda.model.ops.quantized_linear import gguf_linear
from pagoda.model.ops.rope_and_cache import rope_and_cache

__all__ = [
    "add_rms_norm",
    "argmax_rows",
    "gelu_tanh_mul",
    "gemma_add_rms_norm",
    "gemma_rms_norm",
    "gguf_linear",
    "paged_attention",
    "rms_norm",
    "rope_and_cache",
    "silu_mul",
]
