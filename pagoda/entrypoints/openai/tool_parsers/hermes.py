"""Hermes (Qwen2.5, Qwen3, Hermes 2/3): text, then calls as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one after another.

Content is the text before the first <tool_call>; the last call may go unclosed (the model
stopped after its JSON). Text after a closed call that does not begin another is dropped,
as vLLM drops it.
"""

from __future__ import annotations

from pagoda.entrypoints.openai.tool_parsers.base import Malformed, Scan, Status, ToolParser, plain
from pagoda.entrypoints.openai.tool_parsers.json_calls import scan_call, skip_ws

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def scan(self, text: str) -> Scan:
        i = text.find(START)
        if i < 0:
            return plain(text, START)
        scan = Scan(text[:i])
        n = len(text)
        while True:  # text[i:] begins with START
            i = skip_ws(text, i + len(START))
            if i == n:
                return _partial(scan)
            if text[i] != "{":
                raise Malformed
            call, end = scan_call(text, i)
            scan.calls.append(call)
            if end is None:
                return _partial(scan)
            i = skip_ws(text, end)
            if i == n:
                return scan
            if not text.startswith(END, i):
                if END.startswith(text[i:]):
                    return _partial(scan)
                raise Malformed
            i = skip_ws(text, i + len(END))
            if not text.startswith(START, i):
                rest = text[i:]
                return _partial(scan) if rest and START.startswith(rest) else scan


def _partial(scan: Scan) -> Scan:
    scan.status = Status.PARTIAL
    return scan
