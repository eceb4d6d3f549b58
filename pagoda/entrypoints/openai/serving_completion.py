"""POST /v1/completions: one or many prompts, text or token ids, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from typing_extensions import TypeIs

from pagoda.engine.protocol import TokensPrompt
from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from pagoda.entrypoints.openai.serving_engine import SSE_DONE, OpenAIServing, sse
from pagoda.outputs import CompletionOutput, Logprobs, RequestOutput
from pagoda.sampling_params import SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    def prepare(self, request: CompletionRequest) -> tuple[list[TokensPrompt], SamplingParams]:
        """Validates the request: its prompts as token ids and its sampling params."""
        self.check_model(request.model)
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported", 400, "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError("best_of is not supported (other than best_of == n)", 400, "best_of")
        prompts = self._prompts(request)
        max_tokens = request.max_tokens
        for p in prompts:
            max_tokens_p = self.check_lengths(len(p["prompt_token_ids"]), request.max_tokens)
            max_tokens = max_tokens_p if max_tokens is None else min(max_tokens, max_tokens_p)
        assert max_tokens is not None
        if request.logprob_token_ids is not None and request.echo and request.max_tokens == 0:
            raise OpenAIError(
                "`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` "
                "because no output tokens are generated.",
                400,
                "logprob_token_ids",
            )
        if max_tokens == 0 and request.echo:
            # Scoring a prompt (its echo and logprobs) without generating: the engine runs
            # one step, whose token is not shown (vLLM does the same).
            max_tokens = 1
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo:
            prompt_logprobs = request.logprobs  # echoed tokens get logprobs too
        params = self.sampling_params(request, max_tokens, request.logprobs, prompt_logprobs)
        return prompts, params

    def _prompts(self, request: CompletionRequest) -> list[TokensPrompt]:
        raw: Sequence[str | list[int]]
        if isinstance(request.prompt, str):
            raw = [request.prompt]
        elif _is_token_ids(request.prompt):
            raw = [request.prompt]
        else:
            raw = request.prompt
        if not raw:
            raise OpenAIError("the prompt is empty", 400, "prompt")
        limit = self.server_config.max_prompts_per_request
        if len(raw) > limit:
            raise OpenAIError(
                f"prompt: a request may hold at most {limit} prompts, got {len(raw)} "
                "(--max-prompts-per-request)",
                400,
                "prompt",
            )
        prompts: list[TokensPrompt] = []
        vocab = self.tokenizer.vocab_size
        for i, item in enumerate(raw):
            if isinstance(item, str):
                param = "prompt" if len(raw) == 1 else f"prompt.{i}"
                bounded = request.truncate_prompt_tokens is None  # a longer prompt is cut
                ids = self.encode(item, param, request.add_special_tokens, bounded)
                kept = self.truncate(ids, request)
                text = item if len(kept) == len(ids) else self.tokenizer.decode(kept)
                prompts.append(TokensPrompt(prompt_token_ids=kept, prompt=text))
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise OpenAIError("prompt: token id out of vocabulary", 400, "prompt")
                kept = self.truncate(list(item), request)
                prompts.append(
                    TokensPrompt(prompt_token_ids=kept, prompt=self.tokenizer.decode(kept))
                )
        return prompts

    async def create(
        self, request: CompletionRequest, prompts: list[TokensPrompt], params: SamplingParams
    ) -> CompletionResponse:
        request_id = random_id("cmpl")
        finals: dict[int, RequestOutput] = {}
        async for i, output in self.generate_many(list(prompts), params, request_id):
            self.check_output(request, output)
            finals[i] = output
        choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
        for i in range(len(prompts)):
            final = finals[i]
            prompt_tokens += len(final.prompt_token_ids)
            cached += final.num_cached_tokens
            for c in final.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(self._choice(i * params.n + c.index, final, c, request))
        return CompletionResponse(
            id=request_id,
            model=request.model or self.model_name,
            choices=choices,
            usage=UsageInfo.of(prompt_tokens, completion_tokens, cached),
        )

    def _choice(
        self, index: int, final: RequestOutput, c: CompletionOutput, request: CompletionRequest
    ) -> CompletionChoice:
        text, token_ids, entries = self._echoed(request, final, c)
        k = request.logprobs
        asked = bool(request.logprob_token_ids)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=self._logprobs(token_ids, entries, k, 0, self.tokens_as_ids(request), asked)
            if k is not None
            else None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            token_ids=c.token_ids if request.return_token_ids else None,
            prompt_logprobs=self.prompt_logprobs_json(final.prompt_logprobs),
            prompt_token_ids=final.prompt_token_ids if request.return_token_ids else None,
        )

    @staticmethod
    def _echoed(
        request: CompletionRequest, output: RequestOutput, c: CompletionOutput
    ) -> tuple[str, list[int], list[Logprobs | None]]:
        """The text, token ids and logprobs of a choice, the prompt's first when echoed."""
        entries: list[Logprobs | None] = list(c.logprobs or [])
        if not request.echo:
            return c.text, c.token_ids, entries
        prompt_ids = output.prompt_token_ids
        prompt_entries = output.prompt_logprobs or [None] * len(prompt_ids)
        # With return_token_ids the prompt comes back as ids, not echoed as text (vLLM's rule).
        prompt_text = "" if request.return_token_ids else (output.prompt or "")
        if request.max_tokens == 0:  # only the prompt, scored
            return prompt_text, prompt_ids, list(prompt_entries)
        text = prompt_text + c.text
        return text, prompt_ids + c.token_ids, [*prompt_entries, *entries]

    def _logprobs(
        self,
        token_ids: list[int],
        entries: list[Logprobs] | list[Logprobs | None] | None,
        k: int,
        offset: int,
        as_ids: bool,
        asked: bool = False,
    ) -> CompletionLogprobs:
        """OpenAI's legacy shape. An entry of None (the prompt's first token) has no logprob."""
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries or []):
            token = self.token_text(token_id, as_ids)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(max(entry[token_id][0], -9999.0))
            # The entry holds the chosen token first, then the most likely ones by rank: so
            # up to k + 1 tokens, the chosen one always among them (OpenAI's rule).
            top: dict[str, float] = {}
            every = k == -1 or asked  # asked tokens are all shown, whatever k
            for t, (logprob, _) in list(entry.items())[: len(entry) if every else k + 1]:
                top.setdefault(self.token_text(t, as_ids), max(logprob, -9999.0))
            out.top_logprobs.append(top)
        return out

    async def stream(
        self, request: CompletionRequest, prompts: list[TokensPrompt], params: SamplingParams
    ) -> AsyncIterator[str]:
        request_id = random_id("cmpl")
        model = request.model or self.model_name
        include_usage, continuous_usage = self.stream_usage(request)
        as_ids = self.tokens_as_ids(request)
        asked = bool(request.logprob_token_ids)
        prompt_tokens = [len(p["prompt_token_ids"]) for p in prompts]
        # Per choice index: tokens generated and text sent (text_offset runs on across chunks).
        completion_tokens: dict[int, int] = {}
        text_sent: dict[int, int] = {}
        cached: dict[int, int] = {}  # per prompt
        try:
            async for i, output in self.generate_many(list(prompts), params, request_id):
                self.check_output(request, output)
                cached[i] = output.num_cached_tokens
                for c in output.outputs:
                    index = i * params.n + c.index
                    if not c.token_ids and not c.finished:
                        continue  # prompt logprobs of a prefill chunk: they come with the echo
                    first = index not in completion_tokens
                    completion_tokens[index] = completion_tokens.get(index, 0) + len(c.token_ids)
                    if first:
                        text, token_ids, entries = self._echoed(request, output, c)
                    else:
                        text, token_ids, entries = c.text, c.token_ids, list(c.logprobs or [])
                    offset = text_sent.get(index, 0)
                    text_sent[index] = offset + len(text)
                    choice = CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=self._logprobs(
                            token_ids, entries, request.logprobs, offset, as_ids, asked
                        )
                        if request.logprobs is not None
                        else None,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    if request.return_token_ids:
                        choice.token_ids = c.token_ids
                        if first:
                            choice.prompt_token_ids = output.prompt_token_ids
                    chunk = CompletionResponse(id=request_id, model=model, choices=[choice])
                    if continuous_usage:
                        chunk.usage = UsageInfo.of(
                            prompt_tokens[i], completion_tokens[index], cached[i]
                        )
                    yield sse(chunk)
            if include_usage:
                usage = UsageInfo.of(
                    sum(prompt_tokens), sum(completion_tokens.values()), sum(cached.values())
                )
                yield sse(CompletionResponse(id=request_id, model=model, choices=[], usage=usage))
        except Exception as e:
            yield sse(await self.on_engine_error(e))
        yield SSE_DONE


def _is_token_ids(prompt: list[str] | list[int] | list[list[int]]) -> TypeIs[list[int]]:
    """Whether a list prompt is one prompt's token ids (the request model keeps a list's items
    of one kind, so its first item tells)."""
    return bool(prompt) and isinstance(prompt[0], int)
