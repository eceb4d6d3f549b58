"""Structured outputs at the HTTP edge: response_format, structured_outputs and vLLM's older
guided_* fields become one constraint for the engine, with the server's defaults; a bad or
conflicting constraint is a 400 naming the field that was sent, before the engine sees it;
a request the engine failed alone is a 400 (or an error event in a stream)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient

from pagoda.config import ServerConfig, StructuredOutputsConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.sampling_params import StructuredOutputsParams
from pagoda.tokenizer import Tokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = [CHAT, COMPLETIONS]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def body(path: str, **fields: Any) -> dict[str, Any]:
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if path == CHAT else {"prompt": "Hi"}
    return {**prompt, "max_tokens": 4, **fields}


@pytest.fixture
def client(engine: FakeEngineClient) -> TestClient:
    return TestClient(build_app(engine, ServerConfig()), raise_server_exceptions=False)


def sent(client: TestClient, engine: FakeEngineClient, path: str, **fields: Any):
    """The constraint the engine received for a request with these fields."""
    r = client.post(path, json=body(path, **fields))
    assert r.status_code == 200, r.text
    assert engine.last_params is not None
    return engine.last_params.structured_outputs


def assert_400(
    client: TestClient, engine: FakeEngineClient, path: str, param: str, match: str, **fields: Any
) -> None:
    r = client.post(path, json=body(path, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == 400, error
    assert match.lower() in error["message"].lower(), error["message"]
    assert engine.last_params is None  # refused before the engine saw it
    assert not engine.processor.has_unfinished()


# ---- what the engine receives ----------------------------------------------------------------


@pytest.mark.parametrize("path", ENDPOINTS)
def test_response_format_json_schema_is_the_schema(client, engine, path) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True, "description": "x"},
    }
    assert sent(client, engine, path, response_format=fmt) == StructuredOutputsParams(json=SCHEMA)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_response_format_json_schema_without_a_schema_is_any_json(client, engine, path) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "anything"}}
    assert sent(client, engine, path, response_format=fmt) == StructuredOutputsParams(json={})


@pytest.mark.parametrize("path", ENDPOINTS)
def test_response_format_json_object(client, engine, path) -> None:
    constraint = sent(client, engine, path, response_format={"type": "json_object"})
    assert constraint == StructuredOutputsParams(json_object=True)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_response_format_text_and_nothing_are_no_constraint(client, engine, path) -> None:
    assert sent(client, engine, path, response_format={"type": "text"}) is None
    assert sent(client, engine, path) is None


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    "fields",
    [
        {"json": SCHEMA},
        {"json": json.dumps(SCHEMA)},  # a schema may come as its JSON text
        {"regex": "[0-9]{3}"},
        {"choice": ["yes", "no"]},
        {"grammar": 'start: "a"+'},
        {"json_object": True},
        {"json": SCHEMA, "disable_any_whitespace": True, "disable_additional_properties": True},
        {"json": SCHEMA, "whitespace_pattern": "[ ]?"},
    ],
)
def test_structured_outputs_is_passed_on(client, engine, path, fields) -> None:
    constraint = sent(client, engine, path, structured_outputs=fields)
    assert constraint == StructuredOutputsParams(**fields)


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"guided_json": SCHEMA}, {"json": SCHEMA}),
        ({"guided_json": json.dumps(SCHEMA)}, {"json": json.dumps(SCHEMA)}),
        ({"guided_regex": "[a-z]+"}, {"regex": "[a-z]+"}),
        ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
        ({"guided_grammar": 'start: "x"'}, {"grammar": 'start: "x"'}),
        (
            {"guided_json": SCHEMA, "guided_whitespace_pattern": "[ \\n]*"},
            {"json": SCHEMA, "whitespace_pattern": "[ \\n]*"},
        ),
        # the backend a client names is accepted and ignored: llguidance is the one backend
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, {"regex": "a"}),
    ],
)
def test_guided_fields_are_passed_on(client, engine, path, fields, expected) -> None:
    assert sent(client, engine, path, **fields) == StructuredOutputsParams(**expected)


def test_response_format_takes_the_layout_options_of_the_other_fields(client, engine) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    options = {"disable_any_whitespace": True, "disable_additional_properties": True}
    constraint = sent(client, engine, CHAT, response_format=fmt, structured_outputs=options)
    assert constraint == StructuredOutputsParams(json=SCHEMA, **options)
    constraint = sent(client, engine, CHAT, response_format=fmt, guided_whitespace_pattern=" ?")
    assert constraint == StructuredOutputsParams(json=SCHEMA, whitespace_pattern=" ?")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_the_servers_defaults_apply(tokenizer: Tokenizer, path) -> None:
    defaults = StructuredOutputsConfig(
        disable_any_whitespace=True, disable_additional_properties=True
    )
    engine = FakeEngineClient(tokenizer, structured=defaults)
    client = TestClient(build_app(engine, ServerConfig()))
    constraint = sent(client, engine, path, structured_outputs={"json": SCHEMA})
    assert constraint == StructuredOutputsParams(
        json=SCHEMA, disable_any_whitespace=True, disable_additional_properties=True
    )
    # a request cannot switch a server default off, only on (vLLM's rule too)
    constraint = sent(
        client, engine, path, structured_outputs={"json": SCHEMA, "disable_any_whitespace": False}
    )
    assert constraint is not None and constraint.disable_any_whitespace


def test_a_constrained_request_streams_and_ends_with_length(client, engine) -> None:
    fmt = {"type": "json_object"}
    r = client.post(CHAT, json=body(CHAT, response_format=fmt, stream=True, max_tokens=3))
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert engine.last_params is not None and engine.last_params.structured_outputs is not None


# ---- 400s, before the engine -----------------------------------------------------------------


@pytest.mark.parametrize("path", ENDPOINTS)
def test_unknown_response_format_type_is_400(client, engine, path) -> None:
    fmt = {"type": "xml"}
    assert_400(client, engine, path, "response_format", "xml", response_format=fmt)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_json_schema_type_without_json_schema_is_400(client, engine, path) -> None:
    fmt = {"type": "json_schema"}
    assert_400(client, engine, path, "response_format", "json_schema", response_format=fmt)


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    ("fields", "param", "match"),
    [
        (
            {
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"},
            },
            "structured_outputs",
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a"}, "guided_choice": ["x"]}, "guided_choice", "one"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", "guided_json"),
        ({"structured_outputs": {"regex": "a", "choice": ["x"]}}, "structured_outputs", "choice"),
        ({"structured_outputs": {}}, "structured_outputs", "none"),
        ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs", "none"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "none"),
    ],
)
def test_not_exactly_one_constraint_is_400(client, engine, path, fields, param, match) -> None:
    assert_400(client, engine, path, param, match, **fields)


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    ("fields", "param", "match"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format",
            "invalid JSON schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}},
                }
            },
            "response_format",
            "nowhere",
        ),
        # look-behind is a schema feature llguidance does not support
        (
            {"structured_outputs": {"json": {"type": "string", "pattern": "(?<=a)b"}}},
            "structured_outputs",
            "look-around",
        ),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json", "must be a JSON object"),
        ({"guided_json": {"type": "string", "format": "bogus"}}, "guided_json", "bogus"),
        ({"guided_regex": "[0-9"}, "guided_regex", "invalid regular expression"),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "regular expression"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
        ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs", "unknown name"),
        ({"guided_choice": []}, "guided_choice", "at least one choice"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "at least one choice"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    ],
)
def test_a_constraint_that_does_not_compile_is_400(
    client, engine, path, fields, param, match
) -> None:
    assert_400(client, engine, path, param, match, **fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, None),
        ({"guided_regex": 5}, "guided_regex"),
    ],
)
def test_wrong_types_are_400(client, engine, fields, param) -> None:
    r = client.post(CHAT, json=body(CHAT, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param is None or error["param"] == param, error
    assert engine.last_params is None


def test_a_schema_with_a_lone_surrogate_is_400(client, engine) -> None:
    text = json.dumps(body(CHAT, guided_json={"type": "string", "enum": ["x"]}))
    text = text.replace('"x"', '"\\ud800"')
    r = client.post(CHAT, content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_without_llguidance_a_constraint_is_400_naming_the_field(
    client, engine, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance fails
    assert_400(client, engine, CHAT, "guided_regex", "pagoda[structured]", guided_regex="[0-9]+")
    # an unconstrained request still runs
    assert client.post(CHAT, json=body(CHAT)).status_code == 200


# ---- a request the engine failed alone -------------------------------------------------------

ENGINE_ERROR = "json: the grammar did not compile in the engine"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_request_the_engine_failed_is_400(client, engine, path) -> None:
    engine.request_error = (1, ENGINE_ERROR)
    r = client.post(path, json=body(path, structured_outputs={"regex": "[a-z ]+"}, n=2))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] == ENGINE_ERROR and error["param"] == "structured_outputs"
    assert not engine.processor.has_unfinished() and not engine.processor.engine_ids
    engine.request_error = None
    again = client.post(path, json=body(path, structured_outputs={"regex": "[a-z ]+"}))
    assert again.status_code == 200, again.text


def test_a_tool_choice_the_engine_failed_is_400_naming_tool_choice(client, engine) -> None:
    engine.request_error = (1, ENGINE_ERROR)
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
    }
    r = client.post(CHAT, json=body(CHAT, tools=[tool], tool_choice="required"))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_stream_the_engine_failed_ends_with_an_error_event(client, engine, path) -> None:
    engine.request_error = (2, ENGINE_ERROR)
    fmt = {"type": "json_object"}
    r = client.post(path, json=body(path, response_format=fmt, stream=True, max_tokens=8))
    assert r.status_code == 200
    lines = [line for line in r.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    error = events[-1]["error"]
    assert error["code"] == 400 and error["message"] == ENGINE_ERROR
    assert error["param"] == "response_format"
    # the tokens before the failure were streamed; no chunk says "abort"
    assert any(e.get("choices") for e in events[:-1])
    reasons = [c.get("finish_reason") for e in events[:-1] for c in e.get("choices", [])]
    assert "abort" not in reasons
    assert not engine.processor.has_unfinished()
