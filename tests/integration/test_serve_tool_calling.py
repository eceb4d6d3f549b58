"""Tool calling through a real `pagoda serve` on the default model (whose template ignores
`tools`, so the tool prompt stands in): required over three tools gives a listed name and
arguments valid against its schema, streamed and not, and a tool result fed back is
answered; --enable-auto-tool-choice reads hermes calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from conftest import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 80
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "The sum of two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {}) for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server("--enable-auto-tool-choice", "--tool-call-parser", "hermes").wait_ready()
    yield s
    s.stop()
    s.assert_no_process_left()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def assert_valid(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    schema = {**SCHEMAS[name], "additionalProperties": False}
    jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("seed", range(5))
def test_required_gives_valid_calls(client: openai.OpenAI, seed: int) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # one call: a sampled list could outrun max_tokens
        temperature=1.0,
        seed=seed,
        max_tokens=MAX_TOKENS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert_valid(call.function.name, call.function.arguments)  # type: ignore[union-attr]


def test_named_and_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    name, arguments, finish = None, "", None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                name = d.function.name or name  # type: ignore[union-attr]
                arguments += d.function.arguments or ""  # type: ignore[union-attr]
            finish = c.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert_valid(name, arguments)


def streamed_message(stream: Any) -> dict[str, Any]:
    """The assistant message a client assembles from a stream: content and tool calls."""
    content, calls, finish = "", list[dict[str, Any]](), None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.index == len(calls):
                    assert d.id and d.type == "function" and d.function.name
                    calls.append(
                        {"id": d.id, "type": "function", "function": {"name": d.function.name}}
                    )
                    calls[-1]["function"]["arguments"] = ""
                calls[d.index]["function"]["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return {"message": message, "finish_reason": finish}


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_result_fed_back_is_answered(client: openai.OpenAI, stream: bool) -> None:
    """The round trip an agent makes: a call, its result fed back, a final answer."""

    def ask(messages: list[Any], **fields: Any) -> dict[str, Any]:
        common = dict(model=MODEL, messages=messages, tools=TOOLS, temperature=0)
        if stream:
            return streamed_message(client.chat.completions.create(**common, **fields, stream=True))
        choice = client.chat.completions.create(**common, **fields).choices[0]
        message = choice.message.model_dump(exclude_none=True)
        return {"message": message, "finish_reason": choice.finish_reason}

    named = {"type": "function", "function": {"name": "get_weather"}}
    first = ask(ASK, tool_choice=named, max_tokens=MAX_TOKENS)
    assert first["finish_reason"] == "tool_calls"
    [call] = first["message"]["tool_calls"]
    assert_valid(call["function"]["name"], call["function"]["arguments"])
    messages: list[Any] = [
        *ASK,
        first["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 18}'},
    ]
    second = ask(messages, tool_choice="none", max_tokens=30)
    assert second["message"]["content"] and not second["message"].get("tool_calls")
    assert second["finish_reason"] in ("stop", "length")


def test_bad_tool_choice_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not match"):
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
            max_tokens=5,
        )
