"""A request's tools: checked, shown to the model, turned into a constraint where the choice
is forced, and the parser that reads the calls back from the text.

tool_choice, as vLLM takes it: absent means "auto" when tools are given; "none" ignores the
tools (the template still sees them); "auto" lets the model write calls in the format of
--tool-call-parser; "required" and a named function are constraints (a JSON array of calls,
or the function's arguments), so that they hold on any model. Templates that ignore `tools`
get the tool prompt below in a system message, and earlier calls and results written out as
text, so that the model still learns what it may call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagoda.config import ServerConfig, StructuredOutputsConfig
from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.tool_parsers import ToolParser, get_tool_parser
from pagoda.entrypoints.openai.tool_parsers.forced import NamedCall, RequiredCalls
from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured.grammar import StructuredOutputsError, grammar_of, with_defaults

AUTO_NEEDS_FLAGS = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)
_NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(frozen=True)
class ToolUse:
    """What the request asks of its tools."""

    mode: str  # "none", "auto", "required" or "function" (a named one)
    tools: tuple[dict[str, Any], ...] = ()  # each tool's "function" object
    function: str | None = None  # the named function
    parallel: bool = True  # more than one call allowed

    def parser(self, config: ServerConfig) -> ToolParser | None:
        """The parser that reads this request's calls; None when it makes none."""
        if self.mode == "function":
            assert self.function is not None
            return NamedCall(self.function)
        if self.mode == "required":
            return RequiredCalls()
        if self.mode == "auto":
            assert config.tool_call_parser is not None
            return get_tool_parser(config.tool_call_parser)
        return None

    def constraint(self, defaults: StructuredOutputsConfig) -> StructuredOutputsParams | None:
        """The JSON schema that forces required or named calls; None for none and auto.

        Objects that do not say otherwise take no extra keys, so that a small model cannot
        wander into properties the function does not have.
        """
        if self.mode == "function":
            schema = next(_parameters(t) for t in self.tools if t["name"] == self.function)
        elif self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["name"]}, "arguments": _parameters(t)},
                    "required": ["name", "arguments"],
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
        else:
            return None
        params = StructuredOutputsParams(json=schema, disable_additional_properties=True)
        params = with_defaults(params, defaults)
        try:
            grammar_of(params)  # as structured.py checks a request's own constraint
        except StructuredOutputsError as e:
            raise OpenAIError(f"tools: {e}", 400, "tools") from None
        return params


def tool_use(
    request: ChatCompletionRequest, config: ServerConfig, check_schemas: bool = True
) -> ToolUse:
    """The request's tool_choice and tools, checked: a bad one is a 400 naming its field.

    check_schemas: compile each function's parameters (prepare does; the response, reading
    the same request again, need not).
    """
    tools, choice = request.tools, request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolUse("none")
    if not tools:
        if choice == "required" and tools is not None:
            return ToolUse("none")  # OpenAI takes required with an empty list as none
        raise OpenAIError("When using `tool_choice`, `tools` must be set.", 400, "tool_choice")
    functions = _functions(tools, check_schemas)
    if isinstance(choice, dict):
        return ToolUse("function", functions, _named(choice, functions), parallel=False)
    if choice not in ("auto", "required"):
        raise OpenAIError(
            f"Invalid value for `tool_choice`: {choice!r}! Only named tools, "
            '"none", "auto" or "required" are supported.',
            400,
            "tool_choice",
        )
    if choice == "auto" and not (config.enable_auto_tool_choice and config.tool_call_parser):
        raise OpenAIError(AUTO_NEEDS_FLAGS, 400, "tool_choice")
    return ToolUse(choice, functions, parallel=request.parallel_tool_calls)


def _functions(tools: list[dict[str, Any]], check_schemas: bool) -> tuple[dict[str, Any], ...]:
    """Each tool's function object; a tool that is not a well-formed function is a 400."""
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if tool.get("type") != "function":
            raise OpenAIError(
                f"{where}: only function tools are supported, got type {tool.get('type')!r}",
                400,
                "tools",
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise OpenAIError(f"{where}.function must be an object", 400, "tools")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise OpenAIError(f"{where}.function.name must be a non-empty string", 400, "tools")
        if any(f["name"] == name for f in functions):
            raise OpenAIError(f"{where}: two tools are named {name!r}", 400, "tools")
        parameters = function.get("parameters")
        if parameters is not None and check_schemas:
            if not isinstance(parameters, dict):
                raise OpenAIError(
                    f"{where}.function.parameters must be a JSON schema object", 400, "tools"
                )
            try:
                grammar_of(StructuredOutputsParams(json=parameters))
            except StructuredOutputsError as e:
                raise OpenAIError(f"{where}.function.parameters: {e}", 400, "tools") from None
        functions.append(function)
    return tuple(functions)


def _named(choice: dict[str, Any], functions: tuple[dict[str, Any], ...]) -> str:
    function = choice.get("function")
    if choice.get("type", "function") != "function" or not isinstance(function, dict):
        raise OpenAIError(
            f"Invalid value for `function`: `{function}` in `tool_choice`! {_NAMED_USAGE}",
            400,
            "tool_choice",
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise OpenAIError(
            f"Expected field `name` in `function` in `tool_choice`! {_NAMED_USAGE}",
            400,
            "tool_choice",
        )
    if not any(f["name"] == name for f in functions):
        raise OpenAIError(
            f"The tool specified in `tool_choice` ({name!r}) does not match any of the "
            "specified `tools`",
            400,
            "tool_choice",
        )
    return name


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


# ---- the prompt for templates that ignore tools ---------------------------------------


def with_tool_prompt(messages: list[dict[str, Any]], use: ToolUse) -> list[dict[str, Any]]:
    """The messages for a template that ignores `tools`: the tools and how to call them in a
    system message (unless the choice is none), earlier calls as <tool_call> text, results
    as user <tool_response> text."""
    out = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = "\n".join(_call_text(call) for call in message["tool_calls"])
            text = f"{message['content']}\n{calls}" if message["content"] else calls
            message = {"role": "assistant", "content": text}
        elif message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n"}
            message["content"] += "</tool_response>"
        out.append(message)
    if use.mode == "none":
        return out  # the history only: the model is not to call
    prompt = tool_prompt(use)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def tool_prompt(use: ToolUse) -> str:
    """The tools as JSON, one a line, and the format the request's choice expects."""
    tools = "\n".join(json.dumps({"type": "function", "function": f}) for f in use.tools)
    if use.mode == "function":
        how = f"Answer with the arguments for {use.function} as a JSON object."
    elif use.mode == "required":
        how = (
            'Answer with a JSON array of the calls to make, each {"name": <function name>, '
            '"arguments": <arguments object>}.'
        )
    else:
        how = (
            "To call a function, write <tool_call>\n"
            '{"name": <function name>, "arguments": <arguments object>}\n'
            "</tool_call>\nOtherwise answer in plain text."
        )
    return f"You can call these functions:\n{tools}\n\n{how}"


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name"), "arguments": function.get("arguments")}
    return f"<tool_call>\n{json.dumps(body)}\n</tool_call>"
