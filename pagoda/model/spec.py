"""ModelSpec: the hyper-parameters of a Llama-family model, whatever file they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Hugging Face architecture name -> our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ModelLoadError(ValueError):
    """A model directory or file that cannot be loaded; the message names what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model code needs to build a Llama-family network."""

    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head before RoPE (qwen3)
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    # Gemma 3 (names as in transformers' Gemma3TextConfig); the defaults are Llama's.
    hidden_activation: str = "silu"  # the gate's activation: silu | gelu_pytorch_tanh
    query_pre_attn_scalar: float | None = None  # scores scale by its -1/2 power (else head_dim)
    sliding_window: int | None = None  # a local layer's query sees the last this many positions
    layer_types: tuple[str, ...] | None = None  # sliding_attention | full_attention, per layer
    rope_local_base_freq: float | None = None  # RoPE base of the local layers (no scaling)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a layer: None where it attends to every earlier position."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Builds a spec from a Hugging Face config.json dictionary."""
        archs = config.get("architectures") or []
        family = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if not archs and config.get("model_type") in SUPPORTED_ARCHITECTURES.values():
            family = config["model_type"]
        if family is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or config.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if key not in config:
                raise ModelLoadError(f"config.json lacks the field {key!r}")
            return config[key]

        hidden_size = need("hidden_size")
        num_heads = need("num_attention_heads")
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(config),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            rope_scaling=_rope_scaling(config),
        )


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling dict, or None for plain RoPE (newer configs call it rope_parameters)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: llama3")
    return dict(scaling)
