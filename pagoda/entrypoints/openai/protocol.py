"""The OpenAI wire shapes (and vLLM's extra fields) as pydantic models."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# JSON may escape half of a UTF-16 surrogate pair ("\ud800") on its own; Python then holds a
# string that is not Unicode text, which neither the tokenizer nor a UTF-8 response can take.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any) -> Any:
    """Raises ValueError when a string anywhere in value holds a lone surrogate."""
    if isinstance(value, str):
        found = _LONE_SURROGATE.search(value)
        if found:
            raise ValueError(
                f"contains a lone surrogate ({ascii(found.group())[1:-1]}) at character "
                f"{found.start()}, which is not Unicode text"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_text(item)
    elif isinstance(value, list):
        for item in value:
            check_text(item)
    return value


# A string that reaches the tokenizer or the chat template.
Text = Annotated[str, AfterValidator(check_text)]


# Fields whose null says something of its own: max_tokens null is "up to the context length".
_NULL_IS_A_VALUE = {"max_tokens"}


class OpenAIModel(BaseModel):
    # Unknown fields are ignored, as the OpenAI and vLLM servers do.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit JSON null is the field's default, as OpenAI's server takes it."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in _NULL_IS_A_VALUE}
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# A JSON object that may reach the constraint backend (a schema): its strings are checked too.
JSONObject = Annotated[dict[str, Any], AfterValidator(check_text)]


class JsonSchemaFormat(OpenAIModel):
    """response_format's json_schema, as the openai client's `parse` sends it."""

    name: str
    description: str | None = None
    # "schema" in the wire shape; pydantic models have a schema() of their own. None: any JSON.
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: str  # text, json_object or json_schema; others are a 400 naming response_format
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's `structured_outputs`: one constraint kind and the JSON layout options."""

    # "json" in the wire shape (BaseModel has a json() of its own): a schema or its text
    json_schema: Text | JSONObject | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    structural_tag: Any = None  # vLLM's; refused
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Text | None = None


class SamplingFields(OpenAIModel):
    """Sampling fields shared by completions and chat completions."""

    model: Text | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these
    logprob_token_ids: list[int] | None = None  # vLLM's: these tokens' logprobs, each position
    seed: int | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None  # None = the server's flag
    return_token_ids: bool | None = None  # prompt_token_ids and token_ids in the response
    use_beam_search: bool = False  # refused: Pagoda has no beam search
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # -1 = the context length
    truncation_side: Literal["left", "right"] | None = None  # left (default): keep the end
    # Structured outputs (entrypoints/openai/structured.py): at most one constraint kind among
    # response_format, structured_outputs and vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: Text | JSONObject | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    guided_whitespace_pattern: Text | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: one backend, llguidance


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class ContentPart(OpenAIModel):
    type: str
    text: Text | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object's text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Text
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # the call a "tool" message answers
    # An assistant's earlier thinking, by either name (vLLM's, and the older one).
    reasoning: Text | None = None
    reasoning_content: Text | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(check_text)] | None = None
    tools: Annotated[list[dict[str, Any]], AfterValidator(check_text)] | None = None
    # none, auto, required or {"type": "function", "function": {"name": ...}} (tools.py)
    tool_choice: Any = None
    parallel_tool_calls: bool = True


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # OpenAI's schema wants an object here, never null.
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


# ---- completions -------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's extras, always sent (null unless asked for)
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


# ---- chat ------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None  # required by OpenAI's schema, null when the model answers
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # The thinking, with --reasoning-parser: vLLM's name, and the older one some clients read.
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    # vLLM's extras, always sent (null unless asked for)
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None  # in a call's first delta only
    arguments: str = ""  # the next piece of the arguments' text


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None  # id and type: in a call's first delta only
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None  # as ChatResponseMessage's, with --reasoning-parser
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids: this chunk's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids: the first chunk


# ---- models, tokenizer --------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(check_text)] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = (
        None  # with return_token_strs: each token as the vocabulary has it
    )


class DetokenizeRequest(OpenAIModel):
    model: Text | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
