"""The architectures, each a short file over the shared layers, by family name."""

from __future__ import annotations

from pagoda.model.models.base import CausalLM
from pagoda.model.models.gemma3 import Gemma3ForCausalLM
from pagoda.model.models.llama import LlamaForCausalLM
from pagoda.model.spec import ModelSpec

# ModelSpec.family -> the class that builds it (spec.py maps the file's names to families).
MODELS: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def build_model(spec: ModelSpec) -> CausalLM:
    """The network for spec, its parameters uninitialised (build it on the meta device)."""
    return MODELS[spec.family](spec)
