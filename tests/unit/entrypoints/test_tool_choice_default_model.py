"""Forced tool choice on the default model (SmolLM2-135M, whose template ignores `tools`, so
the tool prompt stands in), through the chat server's own prepare and parsers and a real
engine: "required" and a named function over four tools give a listed name and arguments
valid against its schema in every one of 50 seeded runs each (required without
parallel_tool_calls: exactly one call)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fake_engine import FakeEngineClient

from pagoda.config import ServerConfig
from pagoda.core.request import FinishReason
from pagoda.engine.llm import LLM
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.tools import tool_use

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

pytestmark = pytest.mark.slow

RUNS = 50
MAX_TOKENS = 200
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 60},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query", "max_results"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an email",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "string", "maxLength": 40},
                    "subject": {"type": "string", "maxLength": 40},
                    "urgent": {"type": "boolean"},
                },
                "required": ["to", "subject"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {}) for t in TOOLS}
QUESTIONS = [
    "What is the weather in Paris?",
    "Find me three articles about solar power.",
    "Email Bob that the meeting moved to Friday.",
    "What time is it?",
    "Is it raining in Tokyo, and what should I read about umbrellas?",
]


@pytest.fixture(scope="module")
def llm(default_model_path) -> LLM:
    return LLM(str(default_model_path))


def prepared(llm: LLM, requests: list[ChatCompletionRequest]) -> list[tuple[list[int], Any]]:
    """Each request's prompt ids and params, as the chat server makes them."""
    engine = FakeEngineClient(llm.tokenizer, max_model_len=llm.max_model_len)

    async def unused() -> None: ...

    chat = OpenAIServingChat(engine, ServerConfig(), unused)
    out = []
    for request in requests:
        prompt, params = chat.prepare(request)
        out.append((prompt["prompt_token_ids"], params))
    return out


def answers(llm: LLM, requests: list[ChatCompletionRequest]) -> list[tuple[Any, list[Any]]]:
    """Each request's finished sample and the calls the chat server's parser reads in it."""
    batch = prepared(llm, requests)
    outputs = llm.generate([ids for ids, _ in batch], [p for _, p in batch], use_tqdm=False)
    result = []
    for request, output in zip(requests, outputs):
        c = output.outputs[0]
        parser = tool_use(request, ServerConfig()).parser(ServerConfig())
        assert parser is not None
        content, calls = parser.extract(c.text)
        if c.finish_reason == FinishReason.STOP:  # the grammar completed
            assert content == "" and calls, c.text
        result.append((c, calls))
    return result


def assert_valid(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), {**SCHEMAS[name], "additionalProperties": False})


def request(seed: int, **fields: Any) -> ChatCompletionRequest:
    question = QUESTIONS[seed % len(QUESTIONS)]
    return ChatCompletionRequest(
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        temperature=1.0,
        seed=seed,
        max_tokens=MAX_TOKENS,
        **fields,
    )


def test_required_without_parallel_calls_gives_one_valid_call(llm: LLM) -> None:
    requests = [
        request(seed, tool_choice="required", parallel_tool_calls=False) for seed in range(RUNS)
    ]
    for c, calls in answers(llm, requests):
        assert c.finish_reason == FinishReason.STOP, c.text
        [call] = calls
        assert_valid(call.name, call.arguments)


def test_required_with_parallel_calls_gives_valid_calls(llm: LLM) -> None:
    """Every call is valid. Sampled at temperature 1, SmolLM2 often lists the same call again
    and again (2 on average, up to 7): a few lists outrun max_tokens and end by length,
    unparsed (4 of these 50)."""
    requests = [request(seed, tool_choice="required") for seed in range(RUNS)]
    finished = 0
    for c, calls in answers(llm, requests):
        finished += c.finish_reason == FinishReason.STOP
        for call in calls:
            assert_valid(call.name, call.arguments)
    assert finished >= 0.8 * RUNS, finished


def test_a_named_function_gives_its_valid_arguments(llm: LLM) -> None:
    names = list(SCHEMAS)
    requests = [
        request(seed, tool_choice={"type": "function", "function": {"name": names[seed % 4]}})
        for seed in range(RUNS)
    ]
    for seed, (c, calls) in enumerate(answers(llm, requests)):
        assert c.finish_reason == FinishReason.STOP, c.text
        [call] = calls
        assert call.name == names[seed % 4]
        assert_valid(call.name, call.arguments)
