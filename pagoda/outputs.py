"""RequestOutput: what EngineClient.generate() and LLM.generate() hand back."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.core.request import FinishReason

# One position's logprobs: token id -> (logprob, rank), the sampled token among them.
Logprobs = dict[int, tuple[float, int]]


@dataclass
class CompletionOutput:
    """One of the n sequences generated for a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None  # a str: "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[Logprobs] | None = None
    cumulative_logprob: float | None = None
    # Why the engine failed this sequence alone (finish_reason "abort"), e.g. a grammar it
    # could not use; None for a sequence that ended normally or was aborted by its caller.
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprobs | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
