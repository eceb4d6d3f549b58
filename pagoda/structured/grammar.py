"""A request's constraint -> an llguidance grammar, checked; torch-free (the API side uses it).

llguidance compiles JSON schemas, regular expressions, Lark and GBNF grammars into one
grammar format; the engine builds its matcher from the text made here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from pagoda.config import StructuredOutputsConfig
from pagoda.sampling_params import StructuredOutputsParams


class StructuredOutputsError(ValueError):
    """A constraint that cannot be used; `param` names the field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def with_defaults(
    params: StructuredOutputsParams, config: StructuredOutputsConfig
) -> StructuredOutputsParams:
    """The constraint with the server's layout defaults where the request left them unset."""
    return msgspec.structs.replace(
        params,
        disable_any_whitespace=params.disable_any_whitespace or config.disable_any_whitespace,
        disable_additional_properties=(
            params.disable_additional_properties or config.disable_additional_properties
        ),
    )


def grammar_of(params: StructuredOutputsParams, check: bool = True) -> str:
    """The llguidance grammar of the constraint; raises StructuredOutputsError.

    check compiles it once to find errors (the API server's 400); the engine, which
    compiles it into its matcher anyway and reads the matcher's error, skips that.
    """
    llg = _llguidance()
    if (problem := params.kinds_problem()) is not None:
        raise StructuredOutputsError("structured_outputs", problem)
    kind = params.kinds[0]
    try:
        if kind in ("json", "json_object"):
            schema = _schema(params) if kind == "json" else {"type": "object"}
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(params))
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(params.regex)
        elif kind == "choice":
            choices = params.choice or []
            if not choices:
                raise StructuredOutputsError(kind, "must list at least one choice")
            grammar = llg.grammar_from("choice", json.dumps(choices))
        else:
            # "grammar" takes Lark, and GBNF (converted to Lark when it looks like GBNF)
            grammar = llg.grammar_from("grammar", params.grammar or "")
    except ValueError as e:  # JSON that is not an object, GBNF that does not convert
        raise StructuredOutputsError(kind, str(e)) from None
    if params.thinking_end is not None:
        grammar = after_thinking(grammar, params.thinking_end, params.thinking_start)
    error = llg.LLMatcher.validate_grammar(grammar) if check else ""
    if error:
        raise StructuredOutputsError(kind, f"invalid {_NAMES[kind]}: {error.strip()}")
    return grammar


def after_thinking(grammar: str, end: str, start: str | None = None) -> str:
    """The grammar preceded by a reasoning model's thinking: free text up to the first end
    marker, then optional whitespace. With start, the thinking is optional and opens with
    start; without it, the text starts inside the thinking.

    The answer's grammar becomes a subgrammar of a Lark grammar for the whole output, so any
    kind of constraint (JSON schema, regex, choice, grammar) composes the same way. Its own
    whitespace rules apply only inside it.
    """
    top = _top_level(grammar)
    answer, *others = top["grammars"]
    answer = {**answer, "name": answer.get("name") or "answer"}
    # lazy: the thinking ends at the first end marker, wherever a longer match might end.
    thinking = f"thinking[lazy]: /(?s:.*){_lark_regex(end)}/"
    head = "thinking /[ \\t\\r\\n]*/"
    if start is not None:
        head = f"({json.dumps(start)} {head})?"
    start_rule = f"start: {head} @{answer['name']}"
    lark = f"{start_rule}\n{thinking}\n"
    return json.dumps({**top, "grammars": [{"lark_grammar": lark}, answer, *others]})


def _top_level(grammar: str) -> dict[str, Any]:
    """llguidance's grammar text as its top-level form: a list of named grammars (JSON),
    from either that JSON or a bare Lark grammar."""
    try:
        top = json.loads(grammar)
    except ValueError:
        top = None
    if isinstance(top, dict) and "grammars" in top:
        return top
    return {"grammars": [{"lark_grammar": grammar}]}


def _lark_regex(text: str) -> str:
    """text as a regex that matches it literally, inside Lark's /.../."""
    return re.escape(text).replace("/", "\\/")


_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON object",
    "regex": "regular expression",
    "choice": "choice",
    "grammar": "grammar",
}


def _schema(params: StructuredOutputsParams) -> dict[str, Any]:
    schema = params.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputsError("json", f"the schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise StructuredOutputsError("json", "the schema must be a JSON object")
    if params.disable_additional_properties:
        schema = closed_schema(schema)
    return schema


def closed_schema(schema: Any) -> Any:
    """The schema with additionalProperties false on every object that does not say."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    if params.whitespace_pattern is not None:
        return {"whitespace_flexible": True, "whitespace_pattern": params.whitespace_pattern}
    if params.disable_any_whitespace:
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputsError(
            "structured_outputs",
            "structured outputs need the llguidance package: pip install 'pagoda[structured]'",
        ) from None
    return llguidance
