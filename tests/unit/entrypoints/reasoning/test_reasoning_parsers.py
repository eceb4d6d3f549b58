"""Golden fixtures for every reasoning parser: the prompt that decides where the output
starts, the whole output split into reasoning and content, and the same output streamed one
character at a time and split in two at every position."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pagoda.entrypoints.openai.reasoning import (
    REASONING_PARSERS,
    Phase,
    ReasoningStream,
    get_reasoning_parser,
)

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [
    pytest.param(name, case, id=f"{name}: {case['case']}")
    for name in sorted(REASONING_PARSERS)
    for case in json.loads((FIXTURES / f"{name}.json").read_text())
]


def test_every_parser_has_fixtures() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(REASONING_PARSERS)


@pytest.mark.parametrize(("name", "case"), CASES)
def test_split(name: str, case: dict[str, Any]) -> None:
    parser = get_reasoning_parser(name)
    split = parser.split(case["text"], parser.phase(case["prompt"]))
    assert (split.reasoning, split.content) == (case["reasoning"], case["content"])


def splits(text: str) -> list[list[str]]:
    return [list(text)] + [[text[:k], text[k:]] for k in range(len(text) + 1)]


@pytest.mark.parametrize(("name", "case"), CASES)
def test_stream_adds_up_to_split(name: str, case: dict[str, Any]) -> None:
    parser = get_reasoning_parser(name)
    for pieces in splits(case["text"]):
        stream = ReasoningStream(parser, parser.phase(case["prompt"]))
        reasoning = content = ""
        for k, piece in enumerate(pieces):
            delta = stream.push(piece, final=k == len(pieces) - 1)
            reasoning += delta.reasoning
            content += delta.content
        assert (reasoning, content) == (case["reasoning"], case["content"]), pieces


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
def test_half_an_end_marker_is_held_back_until_it_is_not_one(name: str) -> None:
    stream = ReasoningStream(get_reasoning_parser(name), Phase.THINKING)
    assert stream.push("a </thi").reasoning == "a "
    assert stream.push("s").reasoning == "</this"


def test_qwen3_holds_back_what_may_open_the_thinking() -> None:
    stream = ReasoningStream(get_reasoning_parser("qwen3"), Phase.MAY_THINK)
    assert stream.push("\n<thi").content == ""
    assert stream.push("s").content == "\n<this"


@pytest.mark.parametrize(
    ("name", "prompt_end", "markers"),
    [
        ("qwen3", "assistant\n", ("<think>", "</think>")),  # it may think, or answer at once
        ("qwen3", "assistant\n<think>\n", (None, "</think>")),
        ("qwen3", "<think>\n\n</think>\n\n", None),  # enable_thinking=false
        ("deepseek_r1", "<｜Assistant｜>", (None, "</think>")),  # <think> or not, it thinks
        ("deepseek_r1", "<｜Assistant｜><think>\n", (None, "</think>")),
    ],
)
def test_where_a_constraint_starts(name: str, prompt_end: str, markers: Any) -> None:
    parser = get_reasoning_parser(name)
    assert parser.thinking_markers(parser.phase("user: hi\n" + prompt_end)) == markers


def test_unknown_parser_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("nope")
