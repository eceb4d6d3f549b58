"""Scanning JSON calls as they are written: {"name": ..., "arguments": {...}} objects, alone or
in an array, with the arguments kept as the model's own text.

Keeping the arguments' text (not a re-dump of the parsed object) lets a stream send each new
piece of it at once, and the pieces add up to exactly what the finished answer reports. A
finished object is checked with json.loads, so what is reported as a call is valid JSON.
"""

from __future__ import annotations

import json
import re

from pagoda.entrypoints.openai.tool_parsers.base import Malformed, PartialCall

ARGUMENT_KEYS = ("arguments", "parameters")  # hermes and mistral say arguments, llama parameters

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET_OR_QUOTE = re.compile(r'[{}\[\]"]')
_LITERAL_END = re.compile(r"[,}\]\s]")
_WHITESPACE = re.compile(r"\s*")


def skip_ws(text: str, i: int) -> int:
    match = _WHITESPACE.match(text, i)
    assert match is not None
    return match.end()


def scan_value(text: str, i: int) -> int | None:
    """The end of the JSON value that starts at text[i]; None when the text stops inside it."""
    if text[i] == '"':
        match = _STRING.match(text, i)
        return match.end() if match else None
    if text[i] not in "{[":
        literal = _LITERAL_END.search(text, i)  # a number or true/false/null
        return literal.start() if literal else None
    depth = 0
    j = i
    while (found := _BRACKET_OR_QUOTE.search(text, j)) is not None:
        j = found.start()
        if text[j] == '"':
            match = _STRING.match(text, j)
            if match is None:
                return None
            j = match.end()
            continue
        depth += 1 if text[j] in "{[" else -1
        j += 1
        if depth == 0:
            return j
    return None


def scan_call(text: str, i: int) -> tuple[PartialCall, int | None]:
    """The call object at text[i] ('{') as far as it goes, and its end (None: not yet).

    Raises Malformed when the text cannot become {"name": str, "arguments": object}.
    """
    start, n = i, len(text)
    call = PartialCall()
    has_arguments = False
    i = skip_ws(text, i + 1)
    first = True
    while True:
        if i == n:
            return call, None
        if text[i] == "}":
            break
        if not first:
            if text[i] != ",":
                raise Malformed
            i = skip_ws(text, i + 1)
            if i == n:
                return call, None
        if text[i] != '"':
            raise Malformed
        key_end = scan_value(text, i)
        if key_end is None:
            return call, None
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i == n:
            return call, None
        if text[i] != ":":
            raise Malformed
        i = skip_ws(text, i + 1)
        if i == n:
            return call, None
        end = scan_value(text, i)
        if key == "name":
            if text[i] != '"':
                raise Malformed
            if end is None:
                return call, None
            call.name = json.loads(text[i:end])
        elif key in ARGUMENT_KEYS:
            if text[i] != "{" or has_arguments:
                raise Malformed
            has_arguments = True
            call.arguments = text[i : n if end is None else end]
        if end is None:
            return call, None
        i = skip_ws(text, end)
        first = False
    if call.name is None:
        raise Malformed
    if not has_arguments:
        call.arguments = "{}"
    check_json(text[start : i + 1])
    return call, i + 1


def scan_call_array(text: str, i: int) -> tuple[list[PartialCall], int | None]:
    """The array of call objects at text[i] ('['), as far as it goes, and its end."""
    calls: list[PartialCall] = []
    n = len(text)
    i = skip_ws(text, i + 1)
    while True:
        if i == n:
            return calls, None
        if text[i] == "]" and calls:
            return calls, i + 1
        if calls:
            if text[i] != ",":
                raise Malformed
            i = skip_ws(text, i + 1)
            if i == n:
                return calls, None
        if text[i] != "{":
            raise Malformed
        call, end = scan_call(text, i)
        calls.append(call)
        if end is None:
            return calls, None
        i = skip_ws(text, end)


def check_json(text: str) -> None:
    """Raises Malformed unless text is valid JSON."""
    try:
        json.loads(text)
    except ValueError:
        raise Malformed from None
