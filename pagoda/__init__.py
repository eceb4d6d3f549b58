"""Pagoda: an LLM inference and serving engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput"]

if TYPE_CHECKING:
    from pagoda.engine.llm import LLM
    from pagoda.outputs import RequestOutput
    from pagoda.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so that `import pagoda.…` in the API server does not pull in torch.
    if name == "LLM":
        from pagoda.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pagoda.sampling_params import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from pagoda.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
