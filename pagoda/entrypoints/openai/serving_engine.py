"""What completions and chat share: model check, limits, sampling params, result streaming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from pagoda.config import ServerConfig
from pagoda.engine.protocol import (
    EngineClient,
    EngineDeadError,
    EngineShuttingDown,
    PromptType,
    RequestAborted,
)
from pagoda.entrypoints.openai.errors import OpenAIError, error_body
from pagoda.entrypoints.openai.limits import max_prompt_chars
from pagoda.entrypoints.openai.protocol import SamplingFields
from pagoda.entrypoints.openai.structured import constraint_field, structured_outputs
from pagoda.outputs import Logprobs, RequestOutput
from pagoda.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    SamplingParamsError,
    StructuredOutputsParams,
)

T = TypeVar("T")


class OpenAIServing:
    def __init__(
        self,
        engine: EngineClient,
        server_config: ServerConfig,
        on_engine_dead: Callable[[], Awaitable[None]],
    ) -> None:
        self.engine = engine
        self.on_engine_dead = on_engine_dead  # lets the server stop at once, not at its next check
        self.server_config = server_config
        self.max_prompt_chars = max_prompt_chars(engine.tokenizer, engine.config.max_model_len)
        self.tokenizer = engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.config.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.engine.config.served_model_names:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, "model")

    def encode(
        self, text: str, param: str, add_special_tokens: bool = True, bounded: bool = True
    ) -> list[int]:
        """The text's token ids; text the tokenizer cannot take is a 400 naming param.

        bounded: the text must fit the context, so one whose characters alone prove it too
        long is a 400 before the tokenizer spends seconds and much memory on it.
        """
        limit = self.max_prompt_chars
        if bounded and limit is not None and len(text) > limit:
            max_len = self.engine.config.max_model_len
            raise OpenAIError(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"{param} has {len(text)} characters, more than {max_len} tokens can hold.",
                400,
                param,
            )
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (TypeError, UnicodeError) as e:
            message = f"{param}: the tokenizer cannot take this text: {e}"
            raise OpenAIError(message, 400, param) from None

    def check_lengths(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """The max_tokens to use; a prompt or request that cannot fit the context is a 400."""
        limit = self.engine.config.max_model_len
        if num_prompt_tokens == 0:
            raise OpenAIError("the prompt is empty", 400, "prompt")
        if num_prompt_tokens >= limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {num_prompt_tokens} tokens, leaving no room for output.",
                400,
                "prompt",
            )
        if max_tokens is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + max_tokens > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Reduce the prompt or max_tokens.",
                400,
                "max_tokens",
            )
        return max_tokens

    def truncate(self, ids: list[int], request: SamplingFields) -> list[int]:
        """The prompt cut to truncate_prompt_tokens, before the length check: the last tokens
        kept, or the first with truncation_side "right" (vLLM's rules and wording)."""
        n = request.truncate_prompt_tokens
        if n is None:
            return ids
        limit = self.engine.config.max_model_len
        n = limit if n == -1 else n
        if n > limit:
            raise OpenAIError(
                f"truncate_prompt_tokens value ({n}) is greater than max_model_len ({limit}). "
                "Please, select a smaller truncation size.",
                400,
                "truncate_prompt_tokens",
            )
        if len(ids) <= n:
            return ids
        return ids[:n] if request.truncation_side == "right" else ids[len(ids) - n :]

    def sampling_params(
        self,
        request: SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        tool_constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """The request's sampling fields, validated; a bad value is a 400 naming the field.

        tool_constraint: the constraint a forced tool_choice sets, which takes the place of
        the request's own (a request with both is a 400).
        """
        if request.logprob_token_ids is not None:
            if not request.logprob_token_ids:
                raise OpenAIError(
                    "`logprob_token_ids` must not be an empty list.", 400, "logprob_token_ids"
                )
            if logprobs is None:
                # chat's logprobs is a flag, completions' a count: vLLM words them apart
                flag = " to true" if isinstance(getattr(request, "logprobs", None), bool) else ""
                raise OpenAIError(
                    f"when using `logprob_token_ids`, `logprobs` must be set{flag}.",
                    400,
                    "logprob_token_ids",
                )
            logprobs = 0  # the asked tokens take the place of the top k
        if request.use_beam_search:
            raise OpenAIError("beam search is not supported", 400, "use_beam_search")
        if request.stream and request.prompt_logprobs not in (None, 0):
            raise OpenAIError(
                "`prompt_logprobs` are not available when `stream=True`.", 400, "prompt_logprobs"
            )
        if request.stream_options is not None and not request.stream:
            # vLLM's rule: stream_options with any field set needs stream=True.
            if request.stream_options.model_fields_set:
                raise OpenAIError(
                    "Stream options can only be defined when `stream=True`.",
                    400,
                    "stream_options",
                )
        if request.n > self.server_config.max_n:
            raise OpenAIError(
                f"n must be at most {self.server_config.max_n}, got {request.n}", 400, "n"
            )
        logit_bias = self._logit_bias(request.logit_bias)
        constraint = structured_outputs(request, self.engine.config.structured)
        if tool_constraint is not None:
            if constraint is not None:
                raise OpenAIError(
                    f"tool_choice: a required or named tool choice is a constraint of its own "
                    f"and cannot be combined with {constraint_field(request)}",
                    400,
                    "tool_choice",
                )
            constraint = tool_constraint
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        vocab = self.tokenizer.vocab_size
        # -1 asks for every token's logprob, as in vLLM.
        logprobs = vocab if logprobs == -1 else logprobs
        prompt_logprobs = vocab if prompt_logprobs == -1 else prompt_logprobs
        params = SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            min_p=request.min_p or 0.0,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=(
                1.0 if request.repetition_penalty is None else request.repetition_penalty
            ),
            logit_bias=logit_bias,
            allowed_token_ids=request.allowed_token_ids,
            logprob_token_ids=request.logprob_token_ids,
            min_tokens=request.min_tokens,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            stop=stop,
            stop_token_ids=request.stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            structured_outputs=constraint,
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
        )
        try:
            params.validate(self.tokenizer.vocab_size, self.server_config.max_logprobs)
        except SamplingParamsError as e:
            raise OpenAIError(str(e), 400, e.param) from None
        return params

    def _logit_bias(self, raw: dict[str, float] | None) -> dict[int, float] | None:
        """Token ids from the JSON keys; every key that is not a token id is named at once,
        with the vocabulary size, in vLLM's words."""
        if not raw:
            return None
        ids = {key: _token_id(key) for key in raw}
        not_ids = [key for key, token_id in ids.items() if token_id is None]
        if not_ids:
            raise OpenAIError(
                f"logit_bias: keys {', '.join(map(repr, not_ids))} are not token ids",
                400,
                "logit_bias",
            )
        vocab = self.tokenizer.vocab_size
        bias = {token_id: raw[key] for key, token_id in ids.items() if token_id is not None}
        out_of_vocab = [t for t in bias if not 0 <= t < vocab]
        if out_of_vocab:
            raise OpenAIError(
                f"token_id(s) {out_of_vocab} in logit_bias contain out-of-vocab token ids. "
                f"Vocabulary size: {vocab}",
                400,
                "logit_bias",
            )
        return bias

    def check_output(self, request: SamplingFields, output: RequestOutput) -> None:
        """A sample the engine failed alone (a grammar it could not use) fails the request
        with a 400 naming the constraint's field; the engine has already ended it."""
        for c in output.outputs:
            if c.error is not None:
                raise OpenAIError(c.error, 400, constraint_field(request))

    def tokens_as_ids(self, request: SamplingFields) -> bool:
        """Whether logprob tokens are written "token_id:{id}": the request's choice, else the
        server's."""
        if request.return_tokens_as_token_ids is not None:
            return request.return_tokens_as_token_ids
        return self.server_config.return_tokens_as_token_ids

    def token_text(self, token_id: int, as_id: bool) -> str:
        """One token as logprobs show it."""
        if as_id:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def prompt_logprobs_json(self, entries: list[Logprobs | None] | None) -> list | None:
        """vLLM's shape: per prompt token, None or {token id: {logprob, rank, decoded_token}}."""
        if entries is None:
            return None
        return [
            None
            if entry is None
            else {
                token_id: {
                    "logprob": max(logprob, -9999.0),
                    "rank": rank,
                    "decoded_token": self.tokenizer.decode([token_id], skip_special_tokens=False),
                }
                for token_id, (logprob, rank) in entry.items()
            }
            for entry in entries
        ]

    def stream_usage(self, request: SamplingFields) -> tuple[bool, bool]:
        """(a usage chunk at the end, usage on every chunk), as vLLM decides them."""
        if self.server_config.enable_force_include_usage:
            return True, True
        options = request.stream_options
        include = bool(options and options.include_usage)
        return include, include and bool(options and options.continuous_usage_stats)

    def generate_many(
        self, prompts: list[PromptType], params: SamplingParams, request_id: str
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Runs several prompts at once; yields (prompt index, output) as they come."""
        streams = [
            self.engine.generate(prompt, params, f"{request_id}-{i}")
            for i, prompt in enumerate(prompts)
        ]
        return merge_streams(streams)

    async def on_engine_error(self, error: BaseException) -> dict:
        """The error body for an exception met while generating."""
        if isinstance(error, EngineDeadError):
            await self.on_engine_dead()
            return error_body(f"the engine is dead: {error}", 500)
        if isinstance(error, (EngineShuttingDown, RequestAborted)):
            return error_body(str(error), 503)
        if isinstance(error, OpenAIError):
            return error_body(error.message, error.status, error.param)
        return error_body(f"internal error: {type(error).__name__}: {error}", 500)


def _token_id(key: str) -> int | None:
    """A logit_bias key as a token id; None when it is not an integer."""
    try:
        return int(key)
    except ValueError:
        return None


async def merge_streams(
    streams: list[AsyncIterator[T]],
) -> AsyncIterator[tuple[int, T]]:
    """Interleaves several async iterators; closing the merge closes (and aborts) them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    # An item with its stream's index, a stream's error, or None when a stream ends.
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            entry = await queue.get()
            if entry is None:
                remaining -= 1
                continue
            if isinstance(entry, BaseException):
                raise entry
            yield entry
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Awaits work, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a JSON chunk."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
