"""Golden fixtures for every tool-call parser: the whole answer, and the same answer streamed
one character at a time and split in two at every position."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pagoda.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ToolCallStream,
    get_tool_parser,
)

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [
    pytest.param(name, case, id=f"{name}: {case['case']}")
    for name in sorted(TOOL_PARSERS)
    for case in json.loads((FIXTURES / f"{name}.json").read_text())
]


def test_every_parser_has_fixtures() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(TOOL_PARSERS)


@pytest.mark.parametrize(("name", "case"), CASES)
def test_extract(name: str, case: dict[str, Any]) -> None:
    content, calls = get_tool_parser(name).extract(case["text"])
    assert content == case["content"]
    assert [{"name": c.name, "arguments": c.arguments} for c in calls] == case["calls"]
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)
    assert len({c.id for c in calls}) == len(calls)


def stream(name: str, pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The content and calls a client assembles from the deltas of pieces."""
    parser = get_tool_parser(name)
    s = ToolCallStream(parser)
    content = ""
    calls: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        delta = s.push(piece, final=k == len(pieces) - 1)
        content += delta.content
        for d in delta.calls:
            if d.index == len(calls):  # a call's first delta: index, id and name
                assert d.id is not None and d.name is not None
                calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
            else:
                assert d.index == len(calls) - 1, "calls arrive in order"
                assert d.id is None and d.name is None
                calls[d.index]["arguments"] += d.arguments
    return content, calls


def splits(text: str) -> list[list[str]]:
    return [list(text)] + [[text[:k], text[k:]] for k in range(len(text) + 1)]


@pytest.mark.parametrize(("name", "case"), CASES)
def test_stream_adds_up_to_extract(name: str, case: dict[str, Any]) -> None:
    text = case["text"]
    for pieces in splits(text):
        content, calls = stream(name, pieces)
        if case["case"].startswith("malformed") and calls:
            # A call that went out before its text went wrong cannot be taken back: the
            # stream stops there.
            assert text.startswith(content)
            continue
        assert content == case["content"], pieces
        assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == case["calls"]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_a_marker_is_held_back_until_it_is_not_one(name: str) -> None:
    marker = {
        "hermes": "<tool_call>",
        "llama3_json": "<|python_tag|>",
        "mistral": "[TOOL_CALLS]",
        "pythonic": "<|python_start|>",
    }[name]
    before = "" if name == "pythonic" else "x"  # pythonic calls only begin the answer
    s = ToolCallStream(get_tool_parser(name))
    assert s.push(before + marker[:-1]).content == before
    assert s.push("?").content == marker[:-1] + "?"


def test_unknown_parser_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="hermes"):
        get_tool_parser("nope")
