"""Llama 3.1/3.2 JSON calls: [<|python_tag|>]{"name": ..., "parameters": {...}}, several
joined by ";".

Without <|python_tag|> in the text the answer is a call only when it begins with "{" (after
whitespace); with it, the text before the tag is content.
"""

from __future__ import annotations

from pagoda.entrypoints.openai.tool_parsers.base import Malformed, Scan, Status, ToolParser, plain
from pagoda.entrypoints.openai.tool_parsers.json_calls import scan_call, skip_ws

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def scan(self, text: str) -> Scan:
        tag = text.find(TAG)
        n = len(text)
        if tag >= 0:
            scan, i = Scan(text[:tag]), skip_ws(text, tag + len(TAG))
        else:
            i = skip_ws(text, 0)
            if i < n and text[i] != "{":
                return plain(text, TAG)
            scan = Scan("")
        while True:
            if i == n:
                scan.status = Status.PARTIAL if n else Status.COMPLETE
                return scan
            if text[i] != "{":
                raise Malformed
            call, end = scan_call(text, i)
            scan.calls.append(call)
            if end is None:
                scan.status = Status.PARTIAL
                return scan
            i = skip_ws(text, end)
            if i == n:
                return scan
            if text[i] != ";":
                raise Malformed
            i = skip_ws(text, i + 1)
