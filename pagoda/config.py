"""The engine's configuration, as frozen dataclasses built once from flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16")
# auto: in bfloat16 on the CPU, a GGUF's Q4_1 projections and Q8_0 output layer also run
# in their file form for small batches (model/layers/linear.py, LlamaForCausalLM.compute_logits).
QUANTIZATIONS = ("auto", "none")


@dataclass(frozen=True)
class ModelConfig:
    path: Path  # a model directory or GGUF file, already resolved
    dtype: str = "auto"  # auto | float32 | bfloat16
    max_model_len: int | None = None  # None = the model's own context length
    served_model_names: tuple[str, ...] = ()
    seed: int = 0
    quantization: str = "auto"  # auto | none

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for K and V of all layers
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # Tokens per step, for serving. Small enough that a step of prompts stays short
    # (about 0.3 s here), so that decodes are not stalled and first tokens come early:
    # a step finishes one 256-token prompt rather than two. Median time to first token
    # at 8 concurrent requests: 720-750 ms with 512, 420-450 ms with 384, for about 8 %
    # less output at 32 (BENCHMARKS.md). Offline generation (LLM) takes 512.
    max_num_batched_tokens: int = 384


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP layer's settings (the launcher's own are its keyword arguments)."""

    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""
    max_n: int = 64  # the largest n a request may ask for
    disable_log_requests: bool = False
    # Usage in every stream, on every chunk, whatever stream_options say (vLLM's flag).
    enable_force_include_usage: bool = False
