"""FakeEngineClient: the EngineClient contract in-process, with a scripted "model".

It runs the real OutputProcessor (detokenization, stop strings, n, output kinds);
only the engine is replaced: sample i of a request produces the token ids
FAKE_TEXT encodes to, shifted by nothing for sample 0 and cycled for the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pagoda.config import StructuredOutputsConfig
from pagoda.core.request import FinishReason
from pagoda.engine.messages import EngineOutput, EngineOutputs, WireLogprob
from pagoda.engine.output import OutputProcessor
from pagoda.engine.protocol import (
    EngineClient,
    EngineDeadError,
    PromptType,
    RequestAborted,
    ServingConfig,
    StatLogger,
)
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer import Tokenizer

FAKE_TEXT = " one two three four five six seven eight nine ten eleven twelve"


class FakeEngineClient(EngineClient):
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int = 128,
        structured: StructuredOutputsConfig | None = None,
        speculative: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self._config = ServingConfig(
            model_path="/fake/model",
            served_model_names=("fake-model",),
            max_model_len=max_model_len,
            vocab_size=tokenizer.vocab_size,
            dtype="float32",
            num_gpu_blocks=64,
            block_size=16,
            enable_prefix_caching=True,
            speculative=speculative,
            structured=structured or StructuredOutputsConfig(),
        )
        self.script = tokenizer.encode(FAKE_TEXT, add_special_tokens=False)
        self.dead = False
        self.aborted: list[str] = []
        self.step_delay = 0.0
        self.last_params: SamplingParams | None = None
        self.last_prompt: PromptType | None = None
        self.stat_loggers: list[StatLogger] = []
        self.killed = False
        # (step, error): every sample fails alone at that step, as the engine reports a
        # grammar it could not use (finish_reason abort with an error).
        self.request_error: tuple[int, str] | None = None

    @property
    def config(self) -> ServingConfig:
        return self._config

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("the fake engine is dead")
        self.last_params = sampling_params
        self.last_prompt = prompt
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        engine_requests = self.processor.add_request(request_id, text, ids, sampling_params)
        for er in engine_requests:
            for stat_logger in self.stat_loggers:
                stat_logger.request_added(er)
        finished = False
        try:
            for step in range(sampling_params.max_tokens or 16):
                await asyncio.sleep(self.step_delay)
                if self.dead:
                    raise EngineDeadError("the fake engine died")
                if request_id not in self.processor.requests:
                    raise RequestAborted(f"request {request_id} was aborted")
                last = step + 1 == sampling_params.max_tokens
                error = self.request_error
                failing = error[1] if error is not None and error[0] == step else None
                outputs = []
                for i, er in enumerate(engine_requests):
                    token = self.script[(step + i) % len(self.script)]
                    output = EngineOutput(
                        er.request_id, [token], finish_reason=FinishReason.LENGTH if last else None
                    )
                    if failing is not None:
                        output.finish_reason, output.error = FinishReason.ABORT, failing
                    if sampling_params.logprobs is not None:
                        entry = self.fake_logprobs(token, sampling_params.logprobs)
                        for j, t in enumerate(sampling_params.logprob_token_ids or []):
                            entry.append((t, -5.0 - j, 100 + j))
                        output.new_logprobs = [entry]
                    k = sampling_params.prompt_logprobs
                    if k is not None and step == 0:
                        output.prompt_logprobs = [self.fake_logprobs(t, k) for t in ids[1:]]
                    outputs.append(output)
                delivered, _ = self.processor.process_outputs(outputs)
                for stat_logger in self.stat_loggers:
                    stat_logger.step(EngineOutputs(outputs), delivered)
                for out in delivered:
                    finished = out.finished
                    yield out
                if finished:
                    return
        finally:
            if not finished:
                self.aborted.append(request_id)
                engine_ids = self.processor.abort_request(request_id)
                for stat_logger in self.stat_loggers:
                    stat_logger.request_aborted(engine_ids)

    def fake_logprobs(self, token_id: int, k: int) -> list[WireLogprob]:
        """The token as the most likely one (logprob -0.25), then k - 1 tokens of the script."""
        others = [t for t in dict.fromkeys(self.script) if t != token_id][: max(k - 1, 0)]
        return [(token_id, -0.25, 1)] + [(t, -1.0 - j, j + 2) for j, t in enumerate(others)]

    async def abort(self, request_id: str) -> None:
        self.processor.abort_request(request_id)

    @property
    def is_running(self) -> bool:
        return not self.dead

    @property
    def errored(self) -> bool:
        return self.dead

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError("the fake engine is dead")

    async def check_health(self) -> None:
        if self.dead:
            raise self.dead_error

    def shutdown(self, timeout: float = 0.0) -> None:
        self.dead = True

    def kill(self) -> None:
        self.dead = self.killed = True

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        self.stat_loggers.append(stat_logger)
