"""SamplingParams: how one request wants its tokens chosen and when it stops."""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import msgspec


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries all text and tokens so far
    DELTA = 1  # every output carries only what is new
    FINAL_ONLY = 2  # one output, when the request finishes


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


MAX_LOGPROBS = 20  # vLLM's default for --max-logprobs
MAX_TEMPERATURE = 2.0  # vLLM's and OpenAI's upper bound
# The sampler divides (or multiplies) logits by the repetition penalty in float32: beyond
# these a logit of a few tens overflows to infinity, or every seen token ties at zero.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# Integers travel to the engine as 64-bit values and become int64 tensors there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on the output, as vLLM's `structured_outputs`: exactly one kind is set.

    The options say how JSON is laid out: by default one line with ", " and ": " between
    items (no other whitespace, so that a small model cannot run away in newlines);
    disable_any_whitespace makes it "," and ":", and whitespace_pattern allows whitespace
    matching that regex wherever JSON allows it.
    """

    json: str | dict[str, Any] | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF (llama.cpp's grammar format)
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False  # objects take only the properties listed
    whitespace_pattern: str | None = None
    # Reasoning models: the constraint holds on the answer that follows the thinking, which is
    # free text up to thinking_end (then optional whitespace). With thinking_start the
    # output may instead answer at once, or think after that marker; without it, the
    # output starts inside the thinking (the prompt opened it). Set by the chat server.
    thinking_end: str | None = None
    thinking_start: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "json_object")

    @property
    def kinds(self) -> list[str]:
        """The constraint kinds set (valid params have exactly one)."""
        return [k for k in self.KINDS if getattr(self, k) not in (None, False)]

    def kinds_problem(self) -> str | None:
        """What is wrong with the kinds set, unless exactly one is."""
        kinds = self.kinds
        if len(kinds) == 1:
            return None
        return (
            "exactly one of json, regex, choice, grammar and json_object must be set, "
            f"got {', '.join(kinds) if kinds else 'none'}"
        )


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """vLLM's sampling fields; validate() names the first bad one and never clamps."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = all tokens
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these
    min_tokens: int = 0
    max_tokens: int | None = 16  # None = up to the context length
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-k logprobs per sampled token (0 = only the sampled one)
    logprob_token_ids: list[int] | None = None  # these tokens' logprobs too, at each position
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None, max_logprobs: int = MAX_LOGPROBS) -> None:
        """Raises SamplingParamsError for the first field out of range."""

        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamsError(param, message)

        # NaN fails every comparison below, so each range check also rejects it.
        check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        check(
            0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"must be >= 0 and at most {MAX_TEMPERATURE:g}, got {self.temperature}",
        )
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(
            -1 <= self.top_k <= INT64_MAX,
            "top_k",
            f"must be -1, 0 (disabled) or a positive 64-bit integer, got {self.top_k}",
        )
        check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2 <= value <= 2, name, f"must be in [-2, 2], got {value}")
        low, high = REPETITION_PENALTY_RANGE
        check(
            low <= self.repetition_penalty <= high,
            "repetition_penalty",
            f"must be in [{low:g}, {high:g}] (> 0; 1 = no penalty), got {self.repetition_penalty}",
        )
        if self.seed is not None:
            check(
                INT64_MIN <= self.seed <= INT64_MAX,
                "seed",
                f"must be in [-2**63, 2**63 - 1], got {self.seed}",
            )
        if self.max_tokens is not None:
            check(self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        # vLLM's rule and wording; -1 (every token) is resolved at the edge, and a limit of
        # -1 means the whole vocabulary.
        if max_logprobs == -1 and vocab_size is not None:
            max_logprobs = vocab_size
        for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            value = getattr(self, name)
            if value is not None:
                check(value >= 0, name, f"must be a positive value or -1, got {value}")
                check(
                    max_logprobs == -1 or value <= max_logprobs,
                    name,
                    f"Requested {kind} logprobs of {value}, which is greater than max allowed: "
                    f"{max_logprobs}",
                )
        if self.stop is not None:
            check(all(s for s in self.stop), "stop", "stop strings must not be empty")
        if self.logprob_token_ids is not None:
            ids = self.logprob_token_ids
            bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
            check(
                not bad,
                "logprob_token_ids",
                f"token_id(s) {bad} in logprob_token_ids contain out-of-vocab token ids. "
                f"Vocabulary size: {vocab_size}",
            )
            check(
                max_logprobs == -1 or len(ids) <= max_logprobs,
                "logprob_token_ids",
                f"requested logprob_token_ids of length {len(ids)}, which is greater than max "
                f"allowed: {max_logprobs}",
            )
        logit_bias = self.logit_bias or {}
        bad = [t for t in logit_bias if t < 0 or (vocab_size is not None and t >= vocab_size)]
        check(
            not bad,
            "logit_bias",
            f"token_id(s) {bad} in logit_bias contain out-of-vocab token ids. "
            f"Vocabulary size: {vocab_size}",
        )
        for bias in logit_bias.values():
            check(-100 <= bias <= 100, "logit_bias", f"bias must be in [-100, 100], got {bias}")
        if self.allowed_token_ids is not None:
            check(bool(self.allowed_token_ids), "allowed_token_ids", "must not be empty")
            check(
                all(0 <= t < (vocab_size or t + 1) for t in self.allowed_token_ids),
                "allowed_token_ids",
                "contains out-of-vocab token id",
            )
        for token_id in self.stop_token_ids or []:
            ok = token_id >= 0 and (vocab_size is None or token_id < vocab_size)
            check(ok, "stop_token_ids", f"token id {token_id} is out of vocabulary")
        if self.structured_outputs is not None:
            problem = self.structured_outputs.kinds_problem()
            check(problem is None, "structured_outputs", problem or "")
