"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jinja2

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
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
)
from pagoda.entrypoints.openai.serving_engine import SSE_DONE, OpenAIServing, sse
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
        if request.tool_choice not in (None, "none"):
            raise OpenAIError("tool calling is not supported", 400, "tool_choice")
        if request.top_logprobs is not None:
            if request.top_logprobs < -1:
                raise OpenAIError(
                    "`top_logprobs` must be a positive value or -1.", 400, "top_logprobs"
                )
            if request.top_logprobs != 0 and not request.logprobs:
                raise OpenAIError("top_logprobs requires logprobs to be true", 400, "top_logprobs")
        text = self.render(request)
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
        params = self.sampling_params(request, max_tokens, logprobs, prompt_logprobs)
        return TokensPrompt(prompt_token_ids=ids, prompt=text), params

    def render(self, request: ChatCompletionRequest) -> str:
        """The prompt text: the messages through the chat template; template errors are 400s."""
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
        template = self.server_config.chat_template or self.tokenizer.chat_template
        if template is None:
            raise OpenAIError(
                "this model has no chat template, so it serves /v1/completions only; "
                "start the server with --chat-template FILE to supply one",
                400,
                "messages",
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=request.add_generation_prompt and not continue_final,
                chat_template=template,
                **kwargs,
            )
        except (jinja2.TemplateError, ValueError) as e:
            raise OpenAIError(f"chat template failed: {e}", 400, "messages") from None
        except Exception as e:  # the template met a shape it cannot handle
            raise OpenAIError(
                f"chat template failed: {type(e).__name__}: {e}", 400, "messages"
            ) from None
        if continue_final:
            # Cut whatever the template appends after the last message (its end-of-turn).
            last = messages[-1]["content"]
            text = text[: text.rfind(last) + len(last)]
        return text

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
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=self._echo(request) + c.text),
                logprobs=self._choice_logprobs(request, c),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                token_ids=c.token_ids if request.return_token_ids else None,
            )
            for c in final.outputs
        ]
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
                    if not c.text and not c.finished and not wanted:
                        continue
                    choice = ChatStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=c.text),
                        logprobs=self._choice_logprobs(request, c),
                        finish_reason=c.finish_reason,
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
