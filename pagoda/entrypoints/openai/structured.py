"""A request's constraint: response_format, structured_outputs or vLLM's older guided_* fields
become one StructuredOutputsParams, with the server's defaults, compiled here once to check it.

Compiling a constraint (llguidance, torch-free) takes microseconds to a few milliseconds and
runs in the request's prepare thread, so a bad schema, regex or grammar is a 400 naming the
field the client sent, and the engine only ever sees constraints that compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.config import StructuredOutputsConfig
from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import ResponseFormat, SamplingFields
from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured.grammar import StructuredOutputsError, grammar_of, with_defaults

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")

# vLLM's older fields, each setting one kind of StructuredOutputsParams.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


@dataclass(frozen=True)
class Constraint:
    """One kind of constraint and the request field that set it."""

    field: str  # response_format, structured_outputs or a guided_* field
    kind: str  # a StructuredOutputsParams.KINDS name
    value: Any


def structured_outputs(
    request: SamplingFields, defaults: StructuredOutputsConfig
) -> StructuredOutputsParams | None:
    """The request's constraint for the engine, checked; None when it has none.

    A constraint that is not exactly one kind, or that does not compile, is a 400 whose
    param names the field the client sent.
    """
    constraints = _constraints(request)
    options = request.structured_outputs
    if not constraints:
        # layout options with nothing to lay out: vLLM refuses them too
        option_field = (
            "structured_outputs"
            if options is not None
            else "guided_whitespace_pattern"
            if request.guided_whitespace_pattern is not None
            else None
        )
        if option_field is None:
            return None
        raise OpenAIError(
            f"{option_field}: exactly one of json, regex, choice, grammar and json_object "
            "must be set, got none",
            400,
            option_field,
        )
    first, *others = constraints
    if others:
        second = others[0]
        both = (
            f"{first.field} and {second.field} each set a constraint"
            if first.field != second.field
            else f"{first.field} sets {first.kind} and {second.kind}"
        )
        raise OpenAIError(
            f"{second.field}: a request takes one constraint, but {both}; exactly one of json, "
            "regex, choice, grammar and json_object must be set",
            400,
            second.field,
        )
    params = StructuredOutputsParams(
        **{first.kind: first.value},
        disable_any_whitespace=options is not None and options.disable_any_whitespace,
        disable_additional_properties=options is not None and options.disable_additional_properties,
        whitespace_pattern=(
            options.whitespace_pattern
            if options is not None and options.whitespace_pattern is not None
            else request.guided_whitespace_pattern
        ),
    )
    params = with_defaults(params, defaults)
    try:
        grammar_of(params)
    except StructuredOutputsError as e:
        raise OpenAIError(f"{first.field}: {e}", 400, first.field) from None
    return params


def constraint_field(request: SamplingFields) -> str | None:
    """The request field that set its constraint (for errors the engine reports later):
    a response format or structured-outputs field, else tool_choice (required or named
    tool choice is a constraint too)."""
    constraints = _constraints(request)
    if constraints:
        return constraints[0].field
    return "tool_choice" if getattr(request, "tool_choice", None) is not None else None


def _constraints(request: SamplingFields) -> list[Constraint]:
    """Every constraint kind the request sets, with its field, in the order fields are read."""
    found = []
    if request.response_format is not None:
        constraint = _of_response_format(request.response_format)
        if constraint is not None:
            found.append(constraint)
    options = request.structured_outputs
    if options is not None:
        if options.structural_tag is not None:
            raise OpenAIError(
                "structured_outputs: structural_tag is not supported", 400, "structured_outputs"
            )
        values = {
            "json": options.json_schema,
            "regex": options.regex,
            "choice": options.choice,
            "grammar": options.grammar,
            "json_object": options.json_object or None,
        }
        found += [
            Constraint("structured_outputs", kind, value)
            for kind, value in values.items()
            if value is not None
        ]
    for field, kind in GUIDED_FIELDS.items():
        value = getattr(request, field)
        if value is not None:
            found.append(Constraint(field, kind, value))
    return found


def _of_response_format(fmt: ResponseFormat) -> Constraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("response_format", "json_object", True)
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise OpenAIError(
                "response_format: type json_schema needs a json_schema object "
                '({"name": ..., "schema": {...}})',
                400,
                "response_format",
            )
        # No schema: any JSON value, as the empty schema allows.
        schema = fmt.json_schema.json_schema
        return Constraint("response_format", "json", {} if schema is None else schema)
    raise OpenAIError(
        f"response_format: unknown type {fmt.type!r}; expected one of "
        f"{', '.join(RESPONSE_FORMAT_TYPES)}",
        400,
        "response_format",
    )
