"""Structured outputs through a real `pagoda serve` and the openai client: parse() with a
pydantic model, a streamed schema, choices, a regex, the length limit and a bad schema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from conftest import Server
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 60
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Capital(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # Compact JSON by default: the flag reaches the engine through the API's constraint.
    s = Server("--structured-outputs-config", '{"disable_any_whitespace": true}').wait_ready()
    yield s
    s.stop()
    s.assert_no_process_left()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format=Capital,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital)
    assert ": " not in choice.message.content  # the server's compact default


def test_a_streamed_schema_concatenates_to_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_constrained_request_cut_by_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL,
        prompt="A person as JSON:",
        max_tokens=3,
        temperature=0,
        extra_body={"structured_outputs": {"json": PERSON}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text.startswith("{") and completion.usage.completion_tokens == 3


def test_choice_on_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL,
        prompt="Is Paris in France? Answer:",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    )
    assert completion.choices[0].text in ("yes", "no", "maybe")
    assert completion.choices[0].finish_reason == "stop"


def test_guided_regex(client: openai.OpenAI) -> None:
    pattern = "[0-9]{3}-[0-9]{4}"
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a phone number."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"guided_regex": pattern},
    )
    assert re.fullmatch(pattern, completion.choices[0].message.content or "")


def test_a_bad_schema_is_a_400(client: openai.OpenAI, server: Server) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            response_format=bad,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
        )
    assert error.value.body["param"] == "response_format"  # type: ignore[index]
    assert "invalid JSON schema" in error.value.message
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
