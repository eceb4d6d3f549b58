"""Fifty JSON schemas for the structured-output tests: each feature a user's schema may use,
and the constrained sampling parameters those tests share.

Every string is bounded (maxLength, enum, pattern or format) and every array has maxItems,
so that a small model finishes within the tests' token budget.
"""

from __future__ import annotations

from typing import Any

from pagoda.sampling_params import SamplingParams, StructuredOutputsParams


def constrained(seed: int | None = None, max_tokens: int = 40, **constraint: Any) -> SamplingParams:
    """Greedy without a seed, sampled at temperature 1 with one; constraint is
    StructuredOutputsParams' keywords (json=, regex=, choice=, grammar=, ...)."""
    return SamplingParams(
        temperature=0 if seed is None else 1.0,
        seed=seed,
        max_tokens=max_tokens,
        structured_outputs=StructuredOutputsParams(**constraint),
    )


S = {"type": "string", "maxLength": 20}
NAME = {"type": "string", "minLength": 1, "maxLength": 16}


def obj(required: bool = True, closed: bool = True, **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(properties)
    if closed:
        schema["additionalProperties"] = False
    return schema


SCHEMAS: dict[str, dict[str, Any]] = {
    # flat objects
    "person": obj(name=NAME, age={"type": "integer", "minimum": 0, "maximum": 120}),
    "city": obj(city=NAME, country=NAME, population={"type": "integer", "minimum": 0}),
    "book": obj(title=S, author=NAME, year={"type": "integer", "minimum": 1450, "maximum": 2030}),
    "flags": obj(active={"type": "boolean"}, admin={"type": "boolean"}),
    "price": obj(item=NAME, price={"type": "number", "minimum": 0, "maximum": 10000}),
    "temperature": obj(celsius={"type": "number", "minimum": -90, "maximum": 60}),
    "nullable": obj(name=NAME, nickname={"type": ["string", "null"], "maxLength": 12}),
    "const": obj(kind={"const": "fruit"}, name=NAME),
    "optional fields": obj(required=False, name=NAME, email={"type": "string", "format": "email"}),
    "open object": obj(closed=False, name=NAME),
    # enums
    "color": obj(color={"enum": ["red", "green", "blue"]}),
    "weekday": obj(day={"type": "string", "enum": ["mon", "tue", "wed", "thu", "fri"]}),
    "mixed enum": obj(value={"enum": [1, "two", 3.5, None, True]}),
    "rating": obj(stars={"type": "integer", "enum": [1, 2, 3, 4, 5]}, comment=S),
    "status": obj(status={"enum": ["open", "closed"]}, count={"type": "integer", "minimum": 0}),
    # numbers with bounds
    "percent": obj(value={"type": "number", "minimum": 0, "maximum": 100}),
    "exclusive": obj(x={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    "small int": obj(n={"type": "integer", "minimum": -5, "maximum": 5}),
    "big int": obj(n={"type": "integer", "minimum": 1000000}),
    "coordinates": obj(
        lat={"type": "number", "minimum": -90, "maximum": 90},
        lon={"type": "number", "minimum": -180, "maximum": 180},
    ),
    # string patterns and formats
    "zip code": obj(zip={"type": "string", "pattern": "^[0-9]{5}$"}),
    "sku": obj(sku={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}),
    "hex color": obj(hex={"type": "string", "pattern": "^#[0-9a-f]{6}$"}),
    "date": obj(date={"type": "string", "format": "date"}),
    "date-time": obj(at={"type": "string", "format": "date-time"}),
    "email": obj(email={"type": "string", "format": "email"}),
    "uuid": obj(id={"type": "string", "format": "uuid"}),
    "ipv4": obj(ip={"type": "string", "format": "ipv4"}),
    "bounded string": obj(code={"type": "string", "minLength": 3, "maxLength": 5}),
    # arrays
    "tags": obj(tags={"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}),
    "scores": obj(scores={"type": "array", "items": {"type": "integer"}, "maxItems": 5}),
    "exactly two": obj(pair={"type": "array", "items": S, "minItems": 2, "maxItems": 2}),
    "top array": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
    "tuple": obj(
        point={
            "type": "array",
            "prefixItems": [{"type": "number"}, {"type": "number"}],
            "items": False,
            "minItems": 2,
        }
    ),
    "array of objects": obj(
        people={
            "type": "array",
            "items": obj(name=NAME, age={"type": "integer", "minimum": 0, "maximum": 99}),
            "minItems": 1,
            "maxItems": 2,
        }
    ),
    # nesting
    "nested": obj(
        user=obj(name=NAME, address=obj(city=NAME, zip={"type": "string", "pattern": "^[0-9]{5}$"}))
    ),
    "order": obj(
        id={"type": "integer", "minimum": 1},
        items={
            "type": "array",
            "items": obj(sku=NAME, qty={"type": "integer", "minimum": 1, "maximum": 9}),
            "maxItems": 2,
        },
        paid={"type": "boolean"},
    ),
    "deep": obj(a=obj(b=obj(c=obj(d={"type": "integer", "minimum": 0, "maximum": 9})))),
    "settings": obj(
        theme={"enum": ["dark", "light"]},
        font=obj(size={"type": "integer", "minimum": 8, "maximum": 32}),
    ),
    # anyOf / oneOf / allOf
    "any of": obj(value={"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}]}),
    "any of objects": obj(
        shape={
            "anyOf": [
                obj(circle={"type": "number", "minimum": 0}),
                obj(square={"type": "number", "minimum": 0}),
            ]
        }
    ),
    "nullable any of": obj(parent={"anyOf": [NAME, {"type": "null"}]}),
    "all of": {
        "allOf": [
            obj(closed=False, a={"type": "integer"}),
            obj(closed=False, b={"type": "boolean"}),
        ]
    },
    # $ref and $defs
    "ref": {
        "$defs": {"pet": obj(name=NAME, species={"enum": ["cat", "dog"]})},
        "type": "object",
        "properties": {"pet": {"$ref": "#/$defs/pet"}},
        "required": ["pet"],
        "additionalProperties": False,
    },
    "ref array": {
        "$defs": {"item": obj(label=NAME)},
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2}
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "definitions": {
        "definitions": {"money": obj(amount={"type": "number"}, currency={"enum": ["EUR", "USD"]})},
        "type": "object",
        "properties": {"total": {"$ref": "#/definitions/money"}},
        "required": ["total"],
        "additionalProperties": False,
    },
    # additionalProperties with a schema, patterns of keys
    "dictionary": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
        "maxProperties": 3,
    },
    "empty object": {"type": "object", "properties": {}, "additionalProperties": False},
    # top-level scalars
    "top integer": {"type": "integer", "minimum": 0, "maximum": 1000},
    "top string": {"type": "string", "maxLength": 12},
    "top boolean": {"type": "boolean"},
}

assert len(SCHEMAS) >= 50, len(SCHEMAS)
