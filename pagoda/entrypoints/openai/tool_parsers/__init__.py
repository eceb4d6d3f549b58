"""Tool-call parsers, one file per format, found by the name --tool-call-parser takes."""

from __future__ import annotations

from pagoda.entrypoints.openai.tool_parsers.base import (
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolDelta,
    ToolParser,
)
from pagoda.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagoda.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from pagoda.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from pagoda.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (
        HermesToolParser,
        Llama3JsonToolParser,
        MistralToolParser,
        PythonicToolParser,
    )
}


def get_tool_parser(name: str) -> ToolParser:
    """A parser by its --tool-call-parser name; raises KeyError naming the known ones."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise KeyError(
            f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}"
        ) from None


__all__ = [
    "TOOL_PARSERS",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolDelta",
    "ToolParser",
    "get_tool_parser",
]
