"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jinja2
import msgspec

from pagoda.engine.protocol import TokensPrompt
from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    UsageInfo,
    random_id,
)
from pagoda.entrypoints.openai.reasoning import (
    Phase,
    ReasoningParser,
    ReasoningStream,
    get_reasoning_parser,
)
from pagoda.entrypoints.openai.serving_engine import SSE_DONE, OpenAIServing, sse
from pagoda.entrypoints.openai.tool_parsers import ToolCall as ParsedCall
from pagoda.entrypoints.openai.tool_parsers import ToolCallStream
from pagoda.entrypoints.openai.tools import ToolUse, tool_use, with_tool_prompt
from pagoda.outputs import CompletionOutput, Logprobs, RequestOutput
from pagoda.sampling_params import SamplingParams

# What the template is given besides chat_template_kwargs (see Tokenizer.apply_chat_template).
_TEMPLATE_ARGUMENTS = {
    "messages",
    "add_generation_prompt",
    "chat_template",
    "bos_token",
    "eos_token",
    "tools",
}


class OpenAIServingChat(OpenAIServing):
    def prepare(self, request: ChatCompletionRequest) -> tuple[TokensPrompt, SamplingParams]:
        self.check_model(request.model)
        if not request.messages:
            raise OpenAIError("messages must not be empty", 400, "messages")
        use = tool_use(request, self.server_config)
        if request.top_logprobs is not None:
            if request.top_logprobs < -1:
                raise OpenAIError(
                    "`top_logprobs` must be a positive value or -1.", 400, "top_logprobs"
                )
            if request.top_logprobs != 0 and not request.logprobs:
                raise OpenAIError("top_logprobs requires logprobs to be true", 400, "top_logprobs")
        text = self.render(request, use)
        bounded = request.truncate_prompt_tokens is None  # a longer prompt is cut
        full = self.encode(text, "messages", add_special_tokens=False, bounded=bounded)
        ids = self.truncate(full, request)
        if len(ids) < len(full):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        max_tokens = self.check_lengths(
            len(ids), request.max_completion_tokens or request.max_tokens
        )
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo:
            prompt_logprobs = request.top_logprobs or 0  # vLLM scores an echoed prompt too
        constraint = use.constraint(self.engine.config.structured)
        params = self.sampling_params(request, max_tokens, logprobs, prompt_logprobs, constraint)
        reasoning = self.reasoning_parser()
        if reasoning is not None and params.structured_outputs is not None:
            # The constraint holds on the answer: the thinking before it is free.
            markers = reasoning.thinking_markers(reasoning.phase(text))
            if markers is not None:
                start, end = markers
                params.structured_outputs = msgspec.structs.replace(
                    params.structured_outputs, thinking_start=start, thinking_end=end
                )
        parser = use.parser(self.server_config)
        if parser is not None and not parser.skip_special_tokens:
            params.skip_special_tokens = False  # the parser reads markers that are special
        return TokensPrompt(prompt_token_ids=ids, prompt=text), params

    def reasoning_parser(self) -> ReasoningParser | None:
        """The --reasoning-parser's format; None without one."""
        name = self.server_config.reasoning_parser
        return get_reasoning_parser(name) if name is not None else None

    def render(self, request: ChatCompletionRequest, use: ToolUse | None = None) -> str:
        """The prompt text: the messages through the chat template; template errors are 400s.

        A template that renders the same with and without `tools` ignores them; its messages
        then carry the tool prompt and the earlier calls and results as text (tools.py).
        """
        messages = [self._message(i, m) for i, m in enumerate(request.messages)]
        kwargs: dict[str, Any] = dict(request.chat_template_kwargs or {})
        clash = sorted(kwargs.keys() & _TEMPLATE_ARGUMENTS)
        if clash:
            raise OpenAIError(
                f"chat_template_kwargs: {', '.join(clash)} cannot be set here "
                "(the request's own fields set them)",
                400,
                "chat_template_kwargs",
            )
        if request.tools:
            kwargs["tools"] = request.tools
        continue_final = request.continue_final_message
        # vLLM refuses both only when the client set add_generation_prompt itself.
        if (
            continue_final
            and request.add_generation_prompt
            and "add_generation_prompt" in request.model_fields_set
        ):
            raise OpenAIError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                400,
            )
        if continue_final and messages[-1]["role"] != "assistant":
            raise OpenAIError(
                "continue_final_message needs a final assistant message", 400, "messages"
            )
        generation_prompt = request.add_generation_prompt and not continue_final
        text = self._apply(messages, generation_prompt, kwargs)
        if use is not None and request.tools:
            kwargs.pop("tools")
            if text == self._apply(messages, generation_prompt, kwargs):
                messages = with_tool_prompt(messages, use)
                text = self._apply(messages, generation_prompt, kwargs)
        if continue_final:
            # Cut whatever the template appends after the last message (its end-of-turn).
            last = messages[-1]["content"]
            text = text[: text.rfind(last) + len(last)]
        return text

    def _apply(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any]
    ) -> str:
        template = self.server_config.chat_template or self.tokenizer.chat_template
        if template is None:
            raise OpenAIError(
                "this model has no chat template, so it serves /v1/completions only; "
                "start the server with --chat-template FILE to supply one",
                400,
                "messages",
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                chat_template=template,
                **kwargs,
            )
        except (jinja2.TemplateError, ValueError) as e:
            raise OpenAIError(f"chat template failed: {e}", 400, "messages") from None
        except Exception as e:  # the template met a shape it cannot handle
            raise OpenAIError(
                f"chat template failed: {type(e).__name__}: {e}", 400, "messages"
            ) from None

    @staticmethod
    def _message(index: int, message: Any) -> dict[str, Any]:
        content = message.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(
                        f"messages.{index}.content: only text parts are supported, "
                        f"got {part.type!r}",
                        400,
                        f"messages.{index}.content",
                    )
                parts.append(part.text)
            content = "\n".join(parts)  # as vLLM joins text parts
        out: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name:
            out["name"] = message.name
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
        reasoning = message.reasoning
        if reasoning is None:
            reasoning = message.reasoning_content
        if reasoning is not None and message.role == "assistant":
            # Templates read either name (Qwen3's reasoning_content): give both, as vLLM does.
            out["reasoning"] = out["reasoning_content"] = reasoning
        if message.tool_calls:
            # Templates (Qwen's, Llama's) write arguments with tojson: give them the object,
            # as vLLM does, where the text is one.
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in message.tool_calls
            ]
        return out

    def _echo(self, request: ChatCompletionRequest) -> str:
        """What echo prepends to each choice: the last message's content, if the assistant's."""
        if not request.echo or request.messages[-1].role != "assistant":
            return ""
        return self._message(len(request.messages) - 1, request.messages[-1])["content"]

    def _choice_logprobs(
        self, request: ChatCompletionRequest, c: CompletionOutput
    ) -> ChatLogprobs | None:
        if not request.logprobs:
            return None
        k = request.top_logprobs or 0
        if k == -1 or request.logprob_token_ids:
            k = self.tokenizer.vocab_size  # every entry: the top k, or the asked tokens
        return self._logprobs(c.token_ids, c.logprobs, k, self.tokens_as_ids(request))

    def _logprobs(
        self, token_ids: list[int], logprobs: list[Logprobs] | None, k: int, as_ids: bool
    ) -> ChatLogprobs:
        content = []
        for token_id, entry in zip(token_ids, logprobs or []):
            top = sorted(entry.items(), key=lambda kv: kv[1][1])[:k]
            content.append(
                TokenLogprob(
                    **self._top(token_id, entry[token_id][0], as_ids).model_dump(),
                    top_logprobs=[self._top(t, lp, as_ids) for t, (lp, _) in top],
                )
            )
        return ChatLogprobs(content=content)

    def _top(self, token_id: int, logprob: float, as_ids: bool) -> TopLogprob:
        token = self.token_text(token_id, as_ids)
        return TopLogprob(token=token, logprob=max(logprob, -9999.0), bytes=list(token.encode()))

    async def create(
        self, request: ChatCompletionRequest, prompt: TokensPrompt, params: SamplingParams
    ) -> ChatCompletionResponse:
        request_id = random_id("chatcmpl")
        final: RequestOutput | None = None
        async for _, output in self.generate_many([prompt], params, request_id):
            self.check_output(request, output)
            final = output
        assert final is not None
        parser = tool_use(request, self.server_config, check_schemas=False).parser(
            self.server_config
        )
        reasoner = self.reasoning_parser()
        phase = reasoner.phase(prompt.get("prompt") or "") if reasoner else Phase.ANSWERING
        choices = []
        for c in final.outputs:
            reasoning, text = "", c.text
            if reasoner is not None:
                split = reasoner.split(c.text, phase)
                reasoning, text = split.reasoning, split.content
            content, calls = text, list[ParsedCall]()
            if parser is not None:
                content, calls = parser.extract(text)
                calls = calls if request.parallel_tool_calls else calls[:1]
            message = ChatResponseMessage(
                content=(
                    self._echo(request) + content if content or not (calls or reasoning) else None
                ),
                tool_calls=[
                    ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                    for t in calls
                ],
                reasoning=reasoning or None,
                reasoning_content=reasoning or None,
            )
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._choice_logprobs(request, c),
                    finish_reason="tool_calls" if calls else c.finish_reason,
                    stop_reason=c.stop_reason,
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        prompt_tokens = len(final.prompt_token_ids)
        return ChatCompletionResponse(
            id=request_id,
            model=request.model or self.model_name,
            choices=choices,
            usage=UsageInfo.of(prompt_tokens, completion_tokens, final.num_cached_tokens),
            prompt_logprobs=self.prompt_logprobs_json(final.prompt_logprobs),
            prompt_token_ids=final.prompt_token_ids if request.return_token_ids else None,
        )

    async def stream(
        self, request: ChatCompletionRequest, prompt: TokensPrompt, params: SamplingParams
    ) -> AsyncIterator[str]:
        request_id = random_id("chatcmpl")
        model = request.model or self.model_name
        include_usage, continuous_usage = self.stream_usage(request)
        prompt_tokens = len(prompt["prompt_token_ids"])
        completion_tokens = [0] * params.n
        cached = 0
        parser = tool_use(request, self.server_config, check_schemas=False).parser(
            self.server_config
        )
        tool_streams = [ToolCallStream(parser) for _ in range(params.n)] if parser else []
        reasoner = self.reasoning_parser()
        reasoning_streams = []
        if reasoner is not None:
            phase = reasoner.phase(prompt.get("prompt") or "")
            reasoning_streams = [ReasoningStream(reasoner, phase) for _ in range(params.n)]

        def chunk(
            choices: list[ChatStreamChoice],
            usage: UsageInfo | None = None,
            prompt_token_ids: list[int] | None = None,
        ) -> str:
            if usage is None and continuous_usage:
                index = choices[0].index
                usage = UsageInfo.of(prompt_tokens, completion_tokens[index], cached)
            return sse(
                ChatCompletionChunk(
                    id=request_id,
                    model=model,
                    choices=choices,
                    usage=usage,
                    prompt_token_ids=prompt_token_ids,
                )
            )

        try:
            # The first chunk of each choice names the role, as OpenAI's server does.
            prompt_ids = prompt["prompt_token_ids"] if request.return_token_ids else None
            for i in range(params.n):
                role = ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                yield chunk([role], prompt_token_ids=prompt_ids)
            if echo := self._echo(request):
                for i in range(params.n):
                    yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=echo))])
            async for _, output in self.generate_many([prompt], params, request_id):
                self.check_output(request, output)
                cached = output.num_cached_tokens
                for c in output.outputs:
                    completion_tokens[c.index] += len(c.token_ids)
                    # Tokens that make no text yet still carry their ids and logprobs.
                    wanted = c.token_ids and (request.return_token_ids or request.logprobs)
                    text, reasoning = c.text, ""
                    if reasoning_streams:
                        split = reasoning_streams[c.index].push(c.text, c.finished)
                        text, reasoning = split.content, split.reasoning
                    delta = DeltaMessage(content=text)
                    finish_reason: str | None = c.finish_reason
                    if tool_streams:
                        tools = tool_streams[c.index]
                        delta = _tool_delta(tools, text, c.finished, request.parallel_tool_calls)
                        if tools.called and finish_reason is not None:
                            finish_reason = "tool_calls"
                    if reasoning:
                        delta.reasoning = delta.reasoning_content = reasoning
                        delta.content = delta.content or None
                    if not delta.content and not delta.tool_calls and not reasoning:
                        if not c.finished and not wanted:
                            continue
                    choice = ChatStreamChoice(
                        index=c.index,
                        delta=delta,
                        logprobs=self._choice_logprobs(request, c),
                        finish_reason=finish_reason,
                        stop_reason=c.stop_reason,
                        token_ids=c.token_ids if request.return_token_ids else None,
                    )
                    yield chunk([choice])
            if include_usage:
                usage = UsageInfo.of(prompt_tokens, sum(completion_tokens), cached)
                yield chunk([], usage)
        except Exception as e:
            yield sse(await self.on_engine_error(e))
        yield SSE_DONE


def _tool_delta(tools: ToolCallStream, text: str, final: bool, parallel: bool) -> DeltaMessage:
    """The stream's next delta with its parser's reading: content and call pieces."""
    delta = tools.push(text, final)
    calls = [
        DeltaToolCall(
            index=d.index,
            id=d.id,
            type="function" if d.id is not None else None,
            function=DeltaFunctionCall(name=d.name, arguments=d.arguments),
        )
        for d in delta.calls
        if parallel or d.index == 0
    ]
    return DeltaMessage(content=delta.content, tool_calls=calls or None)


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
