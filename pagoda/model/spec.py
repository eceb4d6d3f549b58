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
    "Gemma3ForCausalLM": "gemma3",
}
# config.json's model_type, for configs that name no architecture, where it is not the family.
MODEL_TYPES = {"gemma3_text": "gemma3"}


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
        model_type = MODEL_TYPES.get(config.get("model_type", ""), config.get("model_type"))
        if not archs and model_type in SUPPORTED_ARCHITECTURES.values():
            family = model_type
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
        fields: dict[str, Any] = dict(
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
            rope_scaling=_rope_scaling(config.get("rope_scaling") or config.get("rope_parameters")),
        )
        if family == "gemma3":
            fields.update(_gemma3_fields(config, fields["num_layers"]))
        else:
            fields.update(_window_fields(config, family, fields["num_layers"]))
        return cls(**fields)


def _window_fields(config: dict[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """Sliding-window attention as transformers applies it: a config's own layer_types, else
    Mistral's window on every layer and Qwen's (with use_sliding_window) from layer
    max_window_layers on; none where no layer is windowed."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is None and family == "mistral":
        layer_types = ["sliding_attention"] * num_layers
    elif layer_types is None and config.get("use_sliding_window"):
        first = config.get("max_window_layers", num_layers)
        layer_types = [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        ]
    if window is None or layer_types is None or "sliding_attention" not in layer_types:
        return {}
    if len(layer_types) != num_layers:
        raise ModelLoadError(f"layer_types names {len(layer_types)} layers, not {num_layers}")
    return dict(sliding_window=window, layer_types=tuple(layer_types))


def _gemma3_fields(config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """What Gemma 3 sets apart, with Gemma3TextConfig's defaults where config.json is silent."""
    if config.get("attn_logit_softcapping") is not None:
        raise ModelLoadError("attention logit soft-capping is not supported")
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("silu", "gelu_pytorch_tanh"):
        raise ModelLoadError(f"unsupported hidden_activation {activation!r}")
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:  # newer configs: one RoPE dict per layer type
        full, local = rope["full_attention"], rope.get("sliding_attention") or {}
    else:  # older ones: rope_theta and rope_scaling for global layers, a base for local ones
        full = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta")}
        local = {"rope_theta": config.get("rope_local_base_freq")}
    if _rope_scaling(local) is not None:
        raise ModelLoadError("RoPE scaling of the sliding-window layers is not supported")
    pattern = config.get("sliding_window_pattern") or 6  # every 6th layer is global
    layer_types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise ModelLoadError(f"layer_types names {len(layer_types)} layers, not {num_layers}")
    return dict(
        head_dim=config.get("head_dim") or 256,
        tie_word_embeddings=config.get("tie_word_embeddings", True),
        max_position_embeddings=config.get("max_position_embeddings", 131072),
        qk_norm=True,
        hidden_activation=activation,
        query_pre_attn_scalar=config.get("query_pre_attn_scalar") or 256,
        sliding_window=config.get("sliding_window") or 4096,
        layer_types=tuple(layer_types),
        rope_theta=float(full.get("rope_theta") or 1_000_000.0),
        rope_scaling=_rope_scaling(full),
        rope_local_base_freq=float(local.get("rope_theta") or 10_000.0),
        final_logit_softcapping=config.get("final_logit_softcapping"),
    )


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """The rope scaling dict, or None for plain RoPE (newer configs call it rope_parameters)."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: llama3, linear")
    return {**scaling, "rope_type": kind}
