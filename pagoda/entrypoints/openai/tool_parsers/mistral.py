"""Mistral: text, then [TOOL_CALLS] and either a JSON array of {"name", "arguments"} objects
(older tokenizers) or name[ARGS]{...} per call, each after its own [TOOL_CALLS] (v11 and on).

Mistral's templates want call ids of nine letters and digits.
"""

from __future__ import annotations

import json
import random
import re
import string

from pagoda.entrypoints.openai.tool_parsers.base import (
    Malformed,
    PartialCall,
    Scan,
    Status,
    ToolParser,
    plain,
)
from pagoda.entrypoints.openai.tool_parsers.json_calls import (
    check_json,
    scan_call_array,
    scan_value,
    skip_ws,
)

TOKEN, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ID_CHARS = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"
    skip_special_tokens = False  # [TOOL_CALLS] is a control token

    def new_id(self) -> str:
        return "".join(random.choices(_ID_CHARS, k=9))

    def scan(self, text: str) -> Scan:
        i = text.find(TOKEN)
        if i < 0:
            return plain(text, TOKEN)
        scan = Scan(text[:i])
        i = skip_ws(text, i + len(TOKEN))
        if i < len(text) and text[i] == "[":
            scan.calls, end = scan_call_array(text, i)
            if end is None:
                scan.status = Status.PARTIAL
            return scan  # text after the array is dropped
        while True:  # text[i:] follows a [TOOL_CALLS]
            end = self._scan_named(text, i, scan)
            if end is None:
                scan.status = Status.PARTIAL
                return scan
            i = skip_ws(text, end)
            if text.startswith(TOKEN, i):
                i = skip_ws(text, i + len(TOKEN))
            elif i < len(text) and TOKEN.startswith(text[i:]):
                scan.status = Status.PARTIAL
                return scan
            else:
                return scan

    @staticmethod
    def _scan_named(text: str, i: int, scan: Scan) -> int | None:
        """Reads name[ARGS]{...} at text[i] into scan; its end, None when not yet whole."""
        n = len(text)
        name = _NAME.match(text, i)
        if name is None:
            if i == n:
                return None
            raise Malformed
        i = name.end()
        if i == n:
            return None
        if text.startswith(ARGS, i):
            i += len(ARGS)
        elif text[i] != "{":
            if ARGS.startswith(text[i:]):
                return None
            raise Malformed
        i = skip_ws(text, i)
        call = PartialCall(name.group())
        scan.calls.append(call)
        if i == n:
            return None
        if text[i] != "{":
            raise Malformed
        end = scan_value(text, i)
        call.arguments = text[i : n if end is None else end]
        if end is not None:
            check_json(call.arguments)
            if not isinstance(json.loads(call.arguments), dict):
                raise Malformed
        return end
