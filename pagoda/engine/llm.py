"""LLM: offline generation that steps an in-process EngineCore until every prompt is done."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any, cast

from tqdm import tqdm

from pagoda.config import (
    OFFLINE_MAX_NUM_BATCHED_TOKENS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
)
from pagoda.engine.core import EngineCore
from pagoda.engine.output import OutputProcessor
from pagoda.model_files import resolve_model_path
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.structured.grammar import grammar_of, with_defaults
from pagoda.tokenizer import Tokenizer

Prompt = str | list[int]
Conversation = list[dict[str, Any]]


class LLM:
    """`LLM(model=None).generate(prompts, params)` or `.chat(messages, params)`: one
    RequestOutput per prompt or conversation, in order."""

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = ModelConfig.dtype,
        quantization: str = ModelConfig.quantization,
        max_model_len: int | None = ModelConfig.max_model_len,
        block_size: int = CacheConfig.block_size,
        kv_cache_memory: int = CacheConfig.kv_cache_memory,
        kv_cache_dtype: str = CacheConfig.kv_cache_dtype,
        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
        max_num_seqs: int = SchedulerConfig.max_num_seqs,
        max_num_batched_tokens: int = OFFLINE_MAX_NUM_BATCHED_TOKENS,
        seed: int = ModelConfig.seed,
        device: str = EngineConfig.device,
        structured_outputs_config: StructuredOutputsConfig | None = None,
        speculative_config: SpeculativeConfig | dict | None = None,
    ) -> None:
        """Loads the model; a flag that cannot work raises ConfigError before anything loads."""
        path = resolve_model_path(model)
        self.config = EngineConfig.from_flags(
            path,
            dtype=dtype,
            quantization=quantization,
            max_model_len=max_model_len,
            seed=seed,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            structured_outputs_config=structured_outputs_config,
            speculative_config=(
                SpeculativeConfig.from_json(json.dumps(speculative_config))
                if isinstance(speculative_config, dict)
                else speculative_config
            ),
            device=device,
        )
        self.tokenizer = Tokenizer.from_path(path)
        self.engine = EngineCore(self.config)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_special_tokens: bool = True,
    ) -> list[RequestOutput]:
        """Text prompts are tokenized with the tokenizer's special tokens (BOS) unless told not."""
        prompts = _prompt_list(prompts)
        params_list = (
            list(sampling_params)
            if isinstance(sampling_params, Sequence)
            else [sampling_params or SamplingParams()] * len(prompts)
        )
        assert len(params_list) == len(prompts), "one SamplingParams per prompt, or one for all"
        order = []
        for prompt, params in zip(prompts, params_list):
            order.append(self.add_request(prompt, params, add_special_tokens))
        done = self.run_until_done(use_tqdm and len(order) >= 8)
        return [done[request_id] for request_id in order]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, rendered with the chat template.

        The rendered text already holds what the template writes (<bos> included), so it is
        tokenized without the tokenizer's special tokens, as the chat server does.
        """
        conversations = (
            [cast(Conversation, messages)]
            if messages and isinstance(messages[0], dict)
            else list(cast(Sequence[Conversation], messages))
        )
        texts = [
            self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt, chat_template, **(chat_template_kwargs or {})
            )
            for conversation in conversations
        ]
        return self.generate(texts, sampling_params, use_tqdm, add_special_tokens=False)

    def add_request(
        self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True
    ) -> str:
        """Validates and queues one prompt; returns its request id."""
        text = prompt if isinstance(prompt, str) else None
        token_ids = (
            self.tokenizer.encode(prompt, add_special_tokens)
            if isinstance(prompt, str)
            else list(prompt)
        )
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; the context holds {self.max_model_len}"
            )
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        params = _replace(params, max_tokens=max_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
        params.validate(self.tokenizer.vocab_size)
        if params.structured_outputs is not None:
            constraint = with_defaults(params.structured_outputs, self.config.structured)
            grammar_of(constraint)  # raises StructuredOutputsError (a ValueError) naming the field
            params = _replace(params, structured_outputs=constraint)
        request_id = str(next(self._ids))
        for engine_request in self.processor.add_request(request_id, text, token_ids, params):
            self.engine.add_request(engine_request)
        return request_id

    def run_until_done(self, progress: bool = False) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(self.processor.requests), desc="Generating", disable=not progress)
        while self.processor.has_unfinished():
            # Each step computes something (the scheduler asserts it), so this ends.
            assert self.engine.has_work, "requests unfinished, but none in the engine"
            step = self.engine.step()
            outputs, to_abort = self.processor.process_outputs(step.outputs)
            if to_abort:
                self.engine.abort_requests(to_abort)
            for output in outputs:
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
        bar.close()
        return finished


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or several, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [cast(list[int], prompts)]
    return list(cast(Sequence[Prompt], prompts))


def _replace(params: SamplingParams, **changes: object) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(params, **changes)
