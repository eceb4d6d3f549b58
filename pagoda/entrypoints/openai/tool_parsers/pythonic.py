"""Pythonic calls (Llama 3.2/4, ToolACE): the whole answer is a Python list of calls,
[get_weather(city="Paris", unit="celsius"), ...], optionally inside <|python_start|> and
<|python_end|>; keyword arguments with literal values only.

The arguments are reported as JSON (json.dumps of the literals), so a call's arguments go out
in one piece once its closing parenthesis arrives; its name goes out as soon as it is read.
"""

from __future__ import annotations

import ast
import json
import re

from pagoda.entrypoints.openai.tool_parsers.base import (
    Malformed,
    PartialCall,
    Scan,
    Status,
    ToolParser,
)
from pagoda.entrypoints.openai.tool_parsers.json_calls import skip_ws

START, END = "<|python_start|>", "<|python_end|>"
_NAME = re.compile(r"[A-Za-z_][\w.]*")
_BRACKET_OR_QUOTE = re.compile(r"[()\[\]{}'\"]")
_STRINGS = {q: re.compile(rf"{q}(?:[^{q}\\]|\\.)*{q}", re.DOTALL) for q in "'\""}


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def scan(self, text: str) -> Scan:
        n = len(text)
        i = skip_ws(text, 0)
        if text.startswith(START, i):
            i = skip_ws(text, i + len(START))
        elif i < n and START.startswith(text[i:]):
            return Scan("", status=Status.PARTIAL)
        if i == n:
            return Scan("", status=Status.PARTIAL if n else Status.COMPLETE)
        if text[i] != "[":
            return Scan(text)
        scan = Scan("", status=Status.PARTIAL)
        i = skip_ws(text, i + 1)
        while True:
            if i == n:
                return scan
            if text[i] == "]" and scan.calls:
                break
            if scan.calls:
                if text[i] != ",":
                    raise Malformed
                i = skip_ws(text, i + 1)
            name = _NAME.match(text, i)
            if name is None:
                if i == n:
                    return scan
                raise Malformed
            j = skip_ws(text, name.end())
            if j == n:
                return scan
            if text[j] != "(":
                raise Malformed
            call = PartialCall(name.group())
            scan.calls.append(call)
            end = _closing(text, j)
            if end is None:
                return scan
            call.arguments = _arguments(text[i:end])
            i = skip_ws(text, end)
        i = skip_ws(text, i + 1)
        if text.startswith(END, i):
            i = skip_ws(text, i + len(END))
        elif i < n and END.startswith(text[i:]):
            return scan
        if i < n:
            raise Malformed
        scan.status = Status.COMPLETE
        return scan


def _closing(text: str, i: int) -> int | None:
    """The end of the bracketed Python expression at text[i]; None when not yet closed."""
    depth = 0
    while (found := _BRACKET_OR_QUOTE.search(text, i)) is not None:
        i = found.start()
        if text[i] in "'\"":
            match = _STRINGS[text[i]].match(text, i)
            if match is None:
                return None
            i = match.end()
            continue
        depth += 1 if text[i] in "([{" else -1
        i += 1
        if depth == 0:
            return i
    return None


def _arguments(source: str) -> str:
    """The JSON text of a call's keyword arguments; raises Malformed for anything else."""
    try:
        call = ast.parse(source, mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise Malformed
        values = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if None in values:  # **kwargs
            raise Malformed
        return json.dumps(values, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        raise Malformed from None
