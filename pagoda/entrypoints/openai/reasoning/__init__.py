"""Reasoning parsers, one file per format, found by the name --reasoning-parser takes."""

from __future__ import annotations

from pagoda.entrypoints.openai.reasoning.base import (
    Phase,
    ReasoningParser,
    ReasoningStream,
    Split,
)
from pagoda.entrypoints.openai.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from pagoda.entrypoints.openai.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """A parser by its --reasoning-parser name; raises KeyError naming the known ones."""
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise KeyError(
            f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}"
        ) from None


__all__ = [
    "REASONING_PARSERS",
    "Phase",
    "ReasoningParser",
    "ReasoningStream",
    "Split",
    "get_reasoning_parser",
]
