"""Tool calling at the HTTP edge: tools and tool_choice checked (a 400 naming the field),
required and named choices sent to the engine as JSON-schema constraints, the model's text
read back into message.tool_calls, and streamed calls that add up to the unstreamed ones."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient

from pagoda.cli import build_parser, main
from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.sampling_params import SamplingParams
from pagoda.structured.grammar import closed_schema
from pagoda.tokenizer import Tokenizer

CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
HERMES = (
    'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
# A template that shows what it is given: the tools, each message, earlier calls.
TEMPLATE = (
    "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }} {{ c.function.arguments.city }}"
    "{% endfor %}{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}"
)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngineClient:
    return FakeEngineClient(tokenizer, max_model_len=1024)  # room for the tool prompt


def client_of(engine: FakeEngineClient, **config: Any) -> TestClient:
    return TestClient(build_app(engine, ServerConfig(**config)), raise_server_exceptions=False)


@pytest.fixture
def client(engine: FakeEngineClient) -> TestClient:
    return client_of(engine)


@pytest.fixture
def auto(engine: FakeEngineClient) -> TestClient:
    return client_of(engine, enable_auto_tool_choice=True, tool_call_parser="hermes")


def sent_schema(params: SamplingParams | None) -> dict[str, Any]:
    """The JSON schema the engine enforces for these params."""
    assert params is not None and params.structured_outputs is not None
    constraint = params.structured_outputs
    assert isinstance(constraint.json, dict) and constraint.disable_additional_properties
    return closed_schema(constraint.json)


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}], **fields}


def script(engine: FakeEngineClient, tokenizer: Tokenizer, text: str) -> int:
    """Makes the fake model write text; the max_tokens that writes it all."""
    engine.script = tokenizer.encode(text, add_special_tokens=False)
    return len(engine.script)


@pytest.mark.parametrize(
    ("fields", "param", "match"),
    [
        ({"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice and --tool-call-parser"),
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
        ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "invalid value"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "does not match any of the specified `tools`",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "function"),
        (
            {"tools": [{"type": "retrieval"}], "tool_choice": "required"},
            "tools",
            "only function tools",
        ),
        (
            {"tools": [{"type": "function", "function": {}}], "tool_choice": "required"},
            "tools",
            "tools.0.function.name",
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "two tools"),
        (
            {
                "tools": [
                    TIME,
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string", "pattern": "("}},
                    },
                ],
                "tool_choice": "required",
            },
            "tools",
            "tools.1.function.parameters",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "response_format",
        ),
    ],
)
def test_bad_tools_are_400s_naming_the_field(
    client: TestClient, engine: FakeEngineClient, fields: dict, param: str, match: str
) -> None:
    r = client.post(CHAT, json=body(**fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert match.lower() in error["message"].lower(), error["message"]
    assert engine.last_params is None


def test_none_sends_no_constraint_and_parses_nothing(
    client: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    n = script(engine, tokenizer, HERMES)
    r = client.post(CHAT, json=body(tools=TOOLS, tool_choice="none", max_tokens=n))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] == HERMES and message["tool_calls"] == []
    assert engine.last_params is not None and engine.last_params.structured_outputs is None


def test_required_is_a_schema_of_the_calls(client: TestClient, engine: FakeEngineClient) -> None:
    r = client.post(CHAT, json=body(tools=TOOLS, tool_choice="required", max_tokens=4))
    assert r.status_code == 200, r.text
    schema = sent_schema(engine.last_params)
    good = [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
        {"name": "get_time", "arguments": {}},
    ]
    jsonschema.validate(good, schema)
    bad = [
        [],
        [{"name": "get_wether", "arguments": {"city": "Paris"}}],
        [{"name": "get_weather", "arguments": {"days": 2}}],
        [{"name": "get_weather", "arguments": {"city": "Paris", "extra": 1}}],  # closed
        [{"name": "get_time", "arguments": {"x": 1}}],
    ]
    for calls in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(calls, schema)
    assert engine.last_params.skip_special_tokens  # hermes reads plain text


def test_one_call_only_without_parallel_tool_calls(
    client: TestClient, engine: FakeEngineClient
) -> None:
    fields = body(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=4)
    assert client.post(CHAT, json=fields).status_code == 200
    schema = sent_schema(engine.last_params)
    one = {"name": "get_time", "arguments": {}}
    jsonschema.validate([one], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([one, one], schema)


def test_named_function_is_its_parameters(
    client: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    args = '{"city": "Paris", "days": 3}'
    n = script(engine, tokenizer, args)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.post(CHAT, json=body(tools=TOOLS, tool_choice=choice, max_tokens=n))
    assert r.status_code == 200, r.text
    schema = sent_schema(engine.last_params)
    jsonschema.validate(json.loads(args), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Paris", "country": "FR"}, schema)
    out = r.json()["choices"][0]
    assert out["finish_reason"] == "tool_calls"
    assert out["message"]["content"] is None
    [call] = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"] == {"name": "get_weather", "arguments": args}


def test_required_output_becomes_tool_calls(
    client: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    text = (
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    n = script(engine, tokenizer, text)
    r = client.post(CHAT, json=body(tools=TOOLS, tool_choice="required", max_tokens=n))
    out = r.json()["choices"][0]
    assert [c["function"] for c in out["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    assert out["finish_reason"] == "tool_calls"


def test_auto_reads_the_models_calls(
    auto: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    n = script(engine, tokenizer, HERMES)
    r = auto.post(CHAT, json=body(tools=TOOLS, max_tokens=n))  # auto is the default
    assert r.status_code == 200, r.text
    assert engine.last_params is not None and engine.last_params.structured_outputs is None
    out = r.json()["choices"][0]
    assert out["finish_reason"] == "tool_calls"
    assert out["message"]["content"] == "Let me look."
    calls = out["message"]["tool_calls"]
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    assert len({c["id"] for c in calls}) == 2
    r = auto.post(CHAT, json=body(tools=TOOLS, max_tokens=n, parallel_tool_calls=False))
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


def test_auto_with_malformed_calls_answers_text(
    auto: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    text = "<tool_call>\n{get_weather: Paris}\n</tool_call>"
    n = script(engine, tokenizer, text)
    r = auto.post(CHAT, json=body(tools=TOOLS, max_tokens=n))
    assert r.status_code == 200, r.text
    out = r.json()["choices"][0]
    assert out["message"]["content"] == text and out["message"]["tool_calls"] == []
    assert out["finish_reason"] == "length"


def stream_events(client: TestClient, fields: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", CHAT, json={**fields, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_streamed_calls_add_up_to_unstreamed(
    auto: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer, choice: str
) -> None:
    text, tool_choice = {
        "auto": (HERMES, "auto"),
        "required": (
            '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
            "required",
        ),
        "named": ('{"city": "Paris"}', {"type": "function", "function": {"name": "get_weather"}}),
    }[choice]
    n = script(engine, tokenizer, text)
    fields = body(tools=TOOLS, tool_choice=tool_choice, max_tokens=n)
    whole = auto.post(CHAT, json=fields).json()["choices"][0]
    content, calls, finish = "", [], None
    for event in stream_events(auto, fields):
        for c in event["choices"]:
            delta = c["delta"]
            content += delta.get("content") or ""
            assert "<tool_call" not in (delta.get("content") or "")
            for d in delta.get("tool_calls") or []:
                if d["index"] == len(calls):
                    assert d["id"] and d["type"] == "function" and d["function"]["name"]
                    calls.append({"name": d["function"]["name"], "arguments": ""})
                else:
                    assert d["id"] is None and d["function"]["name"] is None
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
            finish = c["finish_reason"] or finish
    assert content == (whole["message"]["content"] or "")
    assert calls == [c["function"] for c in whole["message"]["tool_calls"]]
    assert calls and finish == whole["finish_reason"] == "tool_calls"


def test_tools_and_history_reach_the_template(engine: FakeEngineClient) -> None:
    client = client_of(engine, chat_template=TEMPLATE)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    r = client.post(
        CHAT,
        json={"messages": messages, "tools": TOOLS, "tool_choice": "required", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert isinstance(engine.last_prompt, dict)
    prompt = engine.last_prompt["prompt"]
    assert prompt == (
        "TOOL get_weather\nTOOL get_time\nuser: Weather in Paris?\n"
        "assistant:  CALL get_weather Paris\ntool: 18 C FOR call_1\n"
    )


def test_a_template_that_ignores_tools_gets_the_tool_prompt(
    client: TestClient, engine: FakeEngineClient
) -> None:
    # The default model's template ignores `tools`.
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    fields = {"messages": messages, "tools": TOOLS, "max_tokens": 2}
    assert client.post(CHAT, json={**fields, "tool_choice": "required"}).status_code == 200
    assert isinstance(engine.last_prompt, dict)
    prompt = engine.last_prompt["prompt"]
    assert json.dumps(WEATHER) in prompt and json.dumps(TIME) in prompt
    assert "JSON array of the calls" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n18 C\n</tool_response>" in prompt
    # none: the history as text, but no tools to call
    assert client.post(CHAT, json={**fields, "tool_choice": "none"}).status_code == 200
    prompt = engine.last_prompt["prompt"]
    assert "<tool_response>\n18 C\n</tool_response>" in prompt
    assert "You can call" not in prompt and json.dumps(TIME) not in prompt


def test_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["serve", "--enable-auto-tool-choice", "--tool-call-parser", "mistral"]
    )
    assert args.enable_auto_tool_choice and args.tool_call_parser == "mistral"
    # Flags that cannot work stop `pagoda serve` before anything starts.
    for flags, match in [
        (["--enable-auto-tool-choice"], "requires --tool-call-parser"),
        (["--tool-call-parser", "nope"], "known: hermes, llama3_json, mistral, pythonic"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["serve", *flags])
        assert e.value.code == 2
        assert match in capsys.readouterr().err
