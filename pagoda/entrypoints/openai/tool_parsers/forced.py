"""The formats that tool_choice "required" and a named function force through a JSON-schema
constraint, read with the same scans as the model's own formats.

required: a JSON array of {"name": ..., "arguments": {...}} objects; a named function: its
arguments object alone. Neither is registered: the request picks them, not a flag.
"""

from __future__ import annotations

from pagoda.entrypoints.openai.tool_parsers.base import (
    Malformed,
    PartialCall,
    Scan,
    Status,
    ToolParser,
)
from pagoda.entrypoints.openai.tool_parsers.json_calls import (
    check_json,
    scan_call_array,
    scan_value,
    skip_ws,
)


class RequiredCalls(ToolParser):
    name = "required"

    def scan(self, text: str) -> Scan:
        scan = Scan("", status=Status.PARTIAL)
        i = skip_ws(text, 0)
        if i == len(text):
            return scan
        if text[i] != "[":
            raise Malformed
        scan.calls, end = scan_call_array(text, i)
        if end is not None:
            if skip_ws(text, end) != len(text):
                raise Malformed
            scan.status = Status.COMPLETE
        return scan


class NamedCall(ToolParser):
    """The one call of a named function; its header goes out with the first delta."""

    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def scan(self, text: str) -> Scan:
        call = PartialCall(self.function)
        scan = Scan("", [call], Status.PARTIAL)
        i = skip_ws(text, 0)
        if i == len(text):
            return scan
        if text[i] != "{":
            raise Malformed
        end = scan_value(text, i)
        call.arguments = text[i : len(text) if end is None else end]
        if end is not None:
            check_json(call.arguments)
            if skip_ws(text, end) != len(text):
                raise Malformed
            scan.status = Status.COMPLETE
        return scan
