"""Reasoning output at the HTTP edge (--reasoning-parser): the thinking in message.reasoning
and reasoning_content, the answer in content, streamed pieces that add up to the unstreamed
ones, constraints that hold after the thinking, and earlier thinking given to the template."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient

from pagoda.cli import main
from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.tokenizer import Tokenizer

CHAT = "/v1/chat/completions"
# Qwen3's way: the model opens its thinking, or enable_thinking=false writes an empty one.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% if m.reasoning %}[{{ m.reasoning }}]{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
)
THOUGHT = "<think>\nThe user asks 2+2.\n</think>\n\nIt is 4."
TIME = {"type": "function", "function": {"name": "get_time"}}


def client_of(engine: FakeEngineClient, **config: Any) -> TestClient:
    config = {"chat_template": TEMPLATE, **config}
    return TestClient(build_app(engine, ServerConfig(**config)), raise_server_exceptions=False)


@pytest.fixture
def qwen3(engine: FakeEngineClient) -> TestClient:
    return client_of(engine, reasoning_parser="qwen3")


def script(engine: FakeEngineClient, tokenizer: Tokenizer, text: str) -> int:
    engine.script = tokenizer.encode(text, add_special_tokens=False)
    return len(engine.script)


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "2+2?"}], **fields}


def stream_events(client: TestClient, fields: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", CHAT, json={**fields, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def streamed(client: TestClient, fields: dict[str, Any]) -> dict[str, Any]:
    """What a client assembles from the stream: reasoning, content, calls, finish reason."""
    out: dict[str, Any] = {"reasoning": "", "content": "", "calls": [], "finish_reason": None}
    for event in stream_events(client, fields):
        for c in event["choices"]:
            delta = c["delta"]
            assert delta.get("reasoning") == delta.get("reasoning_content")
            out["reasoning"] += delta.get("reasoning") or ""
            out["content"] += delta.get("content") or ""
            for d in delta.get("tool_calls") or []:
                if d["index"] == len(out["calls"]):
                    out["calls"].append({"name": d["function"]["name"], "arguments": ""})
                out["calls"][d["index"]]["arguments"] += d["function"]["arguments"]
            out["finish_reason"] = c["finish_reason"] or out["finish_reason"]
    return out


def test_thinking_goes_to_reasoning_and_the_answer_to_content(
    qwen3: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    n = script(engine, tokenizer, THOUGHT)
    r = qwen3.post(CHAT, json=body(max_tokens=n))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "\nThe user asks 2+2.\n"
    assert message["content"] == "\n\nIt is 4."
    assert streamed(qwen3, body(max_tokens=n)) == {
        "reasoning": message["reasoning"],
        "content": message["content"],
        "calls": [],
        "finish_reason": "length",
    }


def test_thinking_cut_off_has_no_content(
    qwen3: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(THOUGHT, add_special_tokens=False)
    cut = next(k for k in range(len(ids)) if tokenizer.decode(ids[:k]).endswith("asks"))
    script(engine, tokenizer, THOUGHT)
    message = qwen3.post(CHAT, json=body(max_tokens=cut)).json()["choices"][0]["message"]
    assert message["content"] is None and message["reasoning"] == "\nThe user asks"


def test_without_a_parser_the_thinking_is_content(
    engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    n = script(engine, tokenizer, THOUGHT)
    message = client_of(engine).post(CHAT, json=body(max_tokens=n)).json()["choices"][0]["message"]
    assert message["content"] == THOUGHT and message["reasoning"] is None


def test_enable_thinking_false_reaches_the_template_and_all_is_content(
    qwen3: TestClient, engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    """The template writes an empty thinking into the prompt: what the model writes next,
    markers and all, is the answer; a response format holds from its first token."""
    text = "Use <think> and </think>."
    n = script(engine, tokenizer, text)
    fields = body(max_tokens=n, chat_template_kwargs={"enable_thinking": False})
    message = qwen3.post(CHAT, json=fields).json()["choices"][0]["message"]
    assert message["content"] == text and message["reasoning"] is None
    assert engine.last_prompt is not None
    assert engine.last_prompt["prompt"].endswith("<think>\n\n</think>\n\n")
    assert streamed(qwen3, fields)["content"] == text
    fields["response_format"] = {"type": "json_object"}
    assert qwen3.post(CHAT, json=fields).status_code == 200
    constraint = engine.last_params.structured_outputs
    assert constraint is not None and constraint.json_object
    assert constraint.thinking_end is None and constraint.thinking_start is None


@pytest.mark.parametrize(
    ("parser", "start"), [("qwen3", "<think>"), ("deepseek_r1", None), (None, None)]
)
def test_a_response_format_holds_after_the_thinking(
    engine: FakeEngineClient, parser: str | None, start: str | None
) -> None:
    client = client_of(engine, reasoning_parser=parser)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    assert client.post(CHAT, json=body(max_tokens=2, response_format=fmt)).status_code == 200
    constraint = engine.last_params.structured_outputs
    assert constraint is not None and constraint.json == schema
    assert constraint.thinking_start == start
    assert constraint.thinking_end == ("</think>" if parser else None)


def test_required_tool_choice_after_thinking(
    engine: FakeEngineClient, tokenizer: Tokenizer
) -> None:
    client = client_of(engine, reasoning_parser="deepseek_r1")
    n = script(engine, tokenizer, 'Time.</think>\n[{"name": "get_time", "arguments": {}}]')
    fields = body(tools=[TIME], tool_choice="required", max_tokens=n)
    r = client.post(CHAT, json=fields)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert engine.last_params.structured_outputs.thinking_end == "</think>"
    assert choice["message"]["reasoning"] == "Time."
    assert choice["message"]["content"] is None
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_time", "arguments": "{}"}
    ]
    assert choice["finish_reason"] == "tool_calls"
    assert streamed(client, fields) == {
        "reasoning": "Time.",
        "content": "",
        "calls": [{"name": "get_time", "arguments": "{}"}],
        "finish_reason": "tool_calls",
    }


@pytest.mark.parametrize("name", ["reasoning", "reasoning_content"])
def test_earlier_thinking_reaches_the_template_by_either_name(
    qwen3: TestClient, engine: FakeEngineClient, name: str
) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", name: "Easy."},
        {"role": "user", "content": "3+3?"},
    ]
    assert qwen3.post(CHAT, json={"messages": messages, "max_tokens": 1}).status_code == 200
    assert engine.last_prompt is not None
    assert "assistant\n<think>Easy.</think>[Easy.]4<|im_end|>" in engine.last_prompt["prompt"]


def test_an_unknown_reasoning_parser_stops_serve(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--reasoning-parser", "nope"])
    assert e.value.code == 2
    assert "--reasoning-parser: unknown parser 'nope'; known: deepseek_r1, qwen3" in (
        capsys.readouterr().err
    )
