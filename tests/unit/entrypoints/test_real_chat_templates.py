"""Qwen3's and Llama 3.2's own chat templates (copied verbatim from the models' Hugging Face
files, as llama.cpp keeps them in models/templates/) on tiny random-weight models of those
architectures: a multi-turn conversation with tools, tool calls and tool results, sent the
OpenAI way (arguments as JSON text, content null beside calls, thinking as reasoning), is
rendered by the chat server exactly as transformers' apply_chat_template renders the same
conversation."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient
from tiny_models import save_hf_model

from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "chat_templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}


def call(id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


# The conversations as transformers takes them: arguments as objects. Llama 3.2's template
# takes one call per assistant turn; Qwen3's several, and keeps the thinking of the turns
# after the last user message (here, every one: the conversation ends in tool results).
QWEN3 = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Tokyo, and the time?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Two cities, then the time.",
        "tool_calls": [
            call("c1", "get_weather", {"city": "Paris", "unit": "celsius"}),
            call("c2", "get_weather", {"city": "東京"}),
        ],
    },
    {"role": "tool", "content": '{"temperature": 18}', "tool_call_id": "c1"},
    {"role": "tool", "content": '{"temperature": 24}', "tool_call_id": "c2"},
    {
        "role": "assistant",
        "content": "Now the time.",
        "tool_calls": [call("c3", "get_time", {})],
    },
    {"role": "tool", "content": "10:42", "tool_call_id": "c3"},
]
LLAMA3 = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [call("c1", "get_weather", {"city": "Paris"})],
    },
    {"role": "tool", "content": '{"temperature": 18}', "tool_call_id": "c1"},
    {"role": "assistant", "content": "It is 18 °C in Paris."},
    {"role": "user", "content": "And the time?"},
    {"role": "assistant", "content": "", "tool_calls": [call("c2", "get_time", {})]},
    {"role": "tool", "content": "10:42", "tool_call_id": "c2"},
]
CASES = {
    "qwen3": ("qwen3", "qwen3.jinja", QWEN3, {"bos_token": None, "eos_token": "<|im_end|>"}),
    "llama3.2": (
        "llama3-rope",
        "llama3.2.jinja",
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(model directory, conversation) for a tiny model that carries the real template."""
    variant, template, conversation, specials = CASES[request.param]
    path = save_hf_model(variant, tmp_path_factory.mktemp(request.param))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(specials, chat_template=(TEMPLATES / template).read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path, conversation


def openai_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as an OpenAI client sends it: arguments as JSON text, no content
    beside calls, the thinking under vLLM's name."""
    messages = copy.deepcopy(conversation)
    for m in messages:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
        if m.get("tool_calls") and not m["content"]:
            m["content"] = None
        if "reasoning_content" in m:
            m["reasoning"] = m.pop("reasoning_content")
    return messages


def rendered_by_server(path: Path, conversation: list[dict[str, Any]], **fields: Any) -> str:
    engine = FakeEngineClient(Tokenizer.from_path(path), max_model_len=8192)
    client = TestClient(build_app(engine, ServerConfig()), raise_server_exceptions=False)
    body = {"messages": openai_messages(conversation), "max_tokens": 1, **fields}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert engine.last_prompt is not None
    return engine.last_prompt["prompt"]


@pytest.mark.parametrize("tool_choice", ["none", "required"])
def test_the_conversation_renders_as_transformers_renders_it(model: Any, tool_choice: str) -> None:
    path, conversation = model
    expected = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        conversation, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False
    )
    if "qwen3" in path.name:  # the thinking of a turn after the last user message stays
        assert "<think>\nTwo cities, then the time.\n</think>" in expected
    else:
        assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in expected
    got = rendered_by_server(path, conversation, tools=[WEATHER, TIME], tool_choice=tool_choice)
    assert got == expected


def test_template_kwargs_reach_the_real_template(model: Any) -> None:
    path, conversation = model
    if "qwen3" not in path.name:
        pytest.skip("enable_thinking is Qwen3's")
    expected = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        conversation,
        tools=[WEATHER, TIME],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    kwargs = {"enable_thinking": False}
    got = rendered_by_server(
        path, conversation, tools=[WEATHER, TIME], tool_choice="none", chat_template_kwargs=kwargs
    )
    assert got == expected
