"""The engine's configuration, as frozen dataclasses built once from flags.

This is the one home of every default: `pagoda serve`, `pagoda bench` and the
offline `LLM` read them from here. A configuration that cannot work (a zero
step budget, a negative context length, ...) is refused when it is built, with
a ConfigError that names the flag, rather than starting an engine that hangs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16")
# auto: in bfloat16 on the CPU, a GGUF's Q4_1/Q4_K/Q8_0/Q5_0 projections and Q8_0 output layer run
# in their file form for small batches too (model/layers/linear.py, CausalLM.compute_logits).
QUANTIZATIONS = ("auto", "gguf", "none")

# Tokens per step. Serving takes fewer, so that a step of prompts stays short (about
# 0.3 s here), decodes are not stalled and first tokens come early: a step finishes one
# 256-token prompt rather than two. Median time to first token at 8 concurrent requests:
# 720-750 ms with 512, 420-450 ms with 384, for about 8 % less output at 32
# (BENCHMARKS.md). Offline generation (LLM, bench throughput) has no first token to
# hurry and keeps the larger batches.
SERVING_MAX_NUM_BATCHED_TOKENS = 384
OFFLINE_MAX_NUM_BATCHED_TOKENS = 512


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the flag."""


def _require(ok: bool, flag: str, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"{flag} must be {what}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: Path  # a model directory or GGUF file, already resolved
    dtype: str = "auto"  # auto | float32 | bfloat16
    # None: the model's own context length, lowered to what the KV cache holds (with a
    # warning). Given: an error at startup when the KV cache cannot hold it.
    max_model_len: int | None = None
    served_model_names: tuple[str, ...] = ()
    seed: int = 0
    quantization: str = "auto"  # auto | gguf | none

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, "--dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        _require(
            self.quantization in QUANTIZATIONS,
            "--quantization",
            self.quantization,
            f"one of {', '.join(QUANTIZATIONS)}",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 2,
            "--max-model-len",
            self.max_model_len,
            "at least 2 (a prompt token and a generated one)",
        )


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV-cache block
    # Bytes for K and V of all layers. Reserved, not written: pages become resident as
    # blocks are first used. 1 GiB holds about 46k tokens of SmolLM2-135M in bfloat16
    # (23k in float32), room for the offline benchmark's 64 x 384 tokens at once.
    kv_cache_memory: int = 1 << 30
    enable_prefix_caching: bool = True
    # auto: the model's dtype, as vLLM's auto, but bfloat16 where a float32 model computes
    # from a GGUF file's blocks (runner.resolve_kv_cache_dtype). bfloat16 under a float32
    # model halves the bytes a token (K and V rounded once, as written; attention in float32).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "--block-size", self.block_size, "a positive integer")
        _require(
            self.kv_cache_dtype in DTYPES,
            "--kv-cache-dtype",
            self.kv_cache_dtype,
            f"one of {', '.join(DTYPES)}",
        )
        _require(
            self.kv_cache_memory >= 1,
            "--kv-cache-memory",
            self.kv_cache_memory,
            "a positive size such as 512M",
        )


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = SERVING_MAX_NUM_BATCHED_TOKENS

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "--max-num-seqs", self.max_num_seqs, "at least 1")
        _require(
            self.max_num_batched_tokens >= 1,
            "--max-num-batched-tokens",
            self.max_num_batched_tokens,
            "at least 1",
        )


STRUCTURED_BACKENDS = ("auto", "guidance", "llguidance")


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsConfig:
    """Structured outputs' server defaults (--structured-outputs-config, vLLM's names)."""

    backend: str = "auto"  # auto = guidance = llguidance, the one backend
    disable_any_whitespace: bool = False  # JSON as "," and ":" with no spaces
    disable_additional_properties: bool = False  # objects take only the properties listed
    # Tokens the grammar forces (the only one it allows) are appended at once and computed
    # as a chunk in the next step instead of one decode step each; the output is the same.
    forced_tokens: bool = True

    def __post_init__(self) -> None:
        _require(
            self.backend in STRUCTURED_BACKENDS,
            "--structured-outputs-config backend",
            self.backend,
            f"one of {', '.join(STRUCTURED_BACKENDS)}",
        )

    @classmethod
    def from_json(cls, text: str) -> StructuredOutputsConfig:
        """The config from a JSON object such as '{"disable_any_whitespace": true}'."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--structured-outputs-config is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError("--structured-outputs-config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"--structured-outputs-config: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(known)}"
            )
        for name, value in values.items():
            expected = str if name == "backend" else bool
            _require(
                isinstance(value, expected),
                f"--structured-outputs-config {name}",
                value,
                f"a {expected.__name__}",
            )
        return cls(**values)


SPECULATIVE_METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    """Speculative decoding (--speculative-config, vLLM's names): n-gram prompt lookup.

    Each step a decoding request may carry up to num_speculative_tokens draft tokens: what
    followed the last earlier occurrence of its last n tokens (n from prompt_lookup_max
    down to prompt_lookup_min). The model checks them all in one step (spec_decode/).
    """

    method: str = "ngram"
    num_speculative_tokens: int
    prompt_lookup_min: int = 5  # vLLM's: 5 when neither bound is given, else the other one
    prompt_lookup_max: int = 5
    # No drafts in a step whose batch has this many requests or more (vLLM's name; its
    # default is None, never). A large batch makes a step compute-bound on a CPU, and the
    # draft tokens then cost about what they save (BENCHMARKS.md section 11, measured).
    disable_by_batch_size: int | None = 32
    # Pagoda's own: a request whose drafts keep failing stops drafting. Once it has had
    # min_draft_tokens draft tokens, it drafts no more if fewer than min_acceptance_rate of
    # them were accepted: a step's drafts must keep about that fraction to pay for the
    # rows they add (BENCHMARKS.md section 11). 0 never stops a request.
    min_acceptance_rate: float = 0.4
    min_draft_tokens: int = 16

    def __post_init__(self) -> None:
        flag = "--speculative-config"
        _require(
            self.method in SPECULATIVE_METHODS,
            f"{flag} method",
            self.method,
            f"one of {', '.join(SPECULATIVE_METHODS)}",
        )
        _require(
            1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
            f"{flag} num_speculative_tokens",
            self.num_speculative_tokens,
            f"from 1 to {MAX_SPECULATIVE_TOKENS}",
        )
        _require(
            self.prompt_lookup_min >= 1,
            f"{flag} prompt_lookup_min",
            self.prompt_lookup_min,
            "at least 1",
        )
        _require(
            self.prompt_lookup_max >= self.prompt_lookup_min,
            f"{flag} prompt_lookup_max",
            self.prompt_lookup_max,
            f"at least prompt_lookup_min ({self.prompt_lookup_min})",
        )
        if self.disable_by_batch_size is not None:
            _require(
                self.disable_by_batch_size >= 1,
                f"{flag} disable_by_batch_size",
                self.disable_by_batch_size,
                "at least 1",
            )
        _require(
            self.min_draft_tokens >= 1,
            f"{flag} min_draft_tokens",
            self.min_draft_tokens,
            "at least 1",
        )
        _require(
            0.0 <= self.min_acceptance_rate <= 1.0,
            f"{flag} min_acceptance_rate",
            self.min_acceptance_rate,
            "from 0 to 1",
        )

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """The config from a JSON object such as '{"method": "ngram", "num_speculative_tokens": 4}'.

        As vLLM's: one lookup bound given stands for both, neither means 5 and 5.
        """
        flag = "--speculative-config"
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{flag} must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{flag}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "num_speculative_tokens" not in values:
            raise ConfigError(f"{flag} num_speculative_tokens is required")
        for name, value in values.items():
            if name == "method":
                expected: tuple[type, ...] = (str,)
            elif name == "min_acceptance_rate":
                expected = (int, float)
            elif name == "disable_by_batch_size":
                expected = (int, type(None))  # null: drafts at any batch size
            else:
                expected = (int,)
            _require(
                isinstance(value, expected) and not isinstance(value, bool),
                f"{flag} {name}",
                value,
                "a string" if expected == (str,) else "a number",
            )
        lo, hi = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
        values["prompt_lookup_min"] = lo if lo is not None else (hi if hi is not None else 5)
        values["prompt_lookup_max"] = hi if hi is not None else values["prompt_lookup_min"]
        return cls(**values)


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
DEFAULT_DEVICE = "cpu"


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    device: str = DEFAULT_DEVICE

    def __post_init__(self) -> None:
        _require(
            _DEVICE.fullmatch(self.device) is not None, "--device", self.device, "cpu or cuda[:N]"
        )

    @classmethod
    def from_flags(
        cls,
        path: Path,
        *,
        dtype: str = ModelConfig.dtype,
        quantization: str = ModelConfig.quantization,
        max_model_len: int | None = ModelConfig.max_model_len,
        served_model_names: tuple[str, ...] = ModelConfig.served_model_names,
        seed: int = ModelConfig.seed,
        block_size: int = CacheConfig.block_size,
        kv_cache_memory: int = CacheConfig.kv_cache_memory,
        kv_cache_dtype: str = CacheConfig.kv_cache_dtype,
        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
        max_num_seqs: int = SchedulerConfig.max_num_seqs,
        max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
        structured_outputs_config: StructuredOutputsConfig | None = None,
        speculative_config: SpeculativeConfig | None = None,
        device: str = DEFAULT_DEVICE,
    ) -> EngineConfig:
        """The configuration from the engine's flags (`pagoda serve`, `pagoda bench`, `LLM`).

        Raises ConfigError, naming the flag, for a value that cannot work.
        """
        return cls(
            model=ModelConfig(
                path=path,
                dtype=dtype,
                max_model_len=max_model_len,
                served_model_names=served_model_names,
                seed=seed,
                quantization=quantization,
            ),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                kv_cache_dtype=kv_cache_dtype,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            ),
            structured=structured_outputs_config or StructuredOutputsConfig(),
            speculative=speculative_config,
            device=device,
        )


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The HTTP layer's settings (the launcher's own are its keyword arguments)."""

    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""
    max_n: int = 64  # the largest n a request may ask for
    chat_template: str | None = None  # replaces the model's own (--chat-template); None: keep it
    # tool_choice "auto" (the default with tools) needs both: the model's calls are read in
    # the format of the tool_parsers/ module named here (vLLM's flags).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # The thinking format of the reasoning/ module named here (vLLM's --reasoning-parser):
    # chat answers carry the thinking apart from the content, and constraints hold after it.
    reasoning_parser: str | None = None
    # The most prompts one completion request may list (OpenAI's limit for a batch of
    # inputs); each is a request of its own in the engine.
    max_prompts_per_request: int = 2048
    # The largest request body in bytes; None: room for a prompt that fills the context in
    # the worst JSON escaping, and at least 16 MiB (entrypoints/openai/limits.py).
    max_request_body_size: int | None = None
    disable_log_requests: bool = False
    # Usage in every stream, on every chunk, whatever stream_options say (vLLM's flag).
    enable_force_include_usage: bool = False
    max_logprobs: int = 20  # the most logprobs a request may ask per token; -1 = the vocabulary
    # Logprob tokens as "token_id:{id}" unless a request says otherwise (vLLM's flag).
    return_tokens_as_token_ids: bool = False
    # HTTP limits, so that a client cannot hold memory or connections forever.
    # A request head (request line and headers) of at most 64 KiB, as AWS's load balancer
    # allows: room for large bearer tokens and cookies (browsers keep each cookie under
    # 4 KiB); vLLM's 4 MiB let one header line of megabytes in.
    h11_max_incomplete_event_size: int = 64 << 10
    h11_max_header_count: int = 256
    # Seconds a client has to send a whole request head, from connecting (or from the end
    # of its previous response); a slow sender of heads otherwise holds its connection open.
    header_read_timeout: float = 30.0
    # Open connections beyond this are answered 503 and closed at once.
    max_connections: int = 2048
    # Seconds the engine may stay silent (no step's outputs, no idle heartbeat) before it
    # counts as hung, and then as dead. One step computes at most max_num_batched_tokens
    # tokens, about 0.3 s here with the default 384; SGLang's watchdog waits 300 s.
    # 0: never.
    watchdog_timeout: float = 120.0
    enable_request_id_headers: bool = False  # X-Request-Id on every response (vLLM's flag)
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info (vLLM's flag)
    # API server processes: Pagoda runs one (scale out with replicas: DESIGN.md).
    api_server_count: int = 1

    def __post_init__(self) -> None:
        _require(self.max_n >= 1, "--max-n", self.max_n, "at least 1")
        _require(
            self.max_prompts_per_request >= 1,
            "--max-prompts-per-request",
            self.max_prompts_per_request,
            "at least 1",
        )
        if self.max_request_body_size is not None:
            _require(
                self.max_request_body_size >= 1,
                "--max-request-body-size",
                self.max_request_body_size,
                "at least 1",
            )
        _require(self.max_logprobs >= -1, "--max-logprobs", self.max_logprobs, "-1 or more")
        for flag, value in (
            ("--h11-max-incomplete-event-size", self.h11_max_incomplete_event_size),
            ("--h11-max-header-count", self.h11_max_header_count),
            ("--max-connections", self.max_connections),
            ("--max-prompts-per-request", self.max_prompts_per_request),
        ):
            _require(value >= 1, flag, value, "at least 1")
        _require(
            self.api_server_count == 1,
            "--api-server-count",
            self.api_server_count,
            "1: Pagoda runs one API server process (for more, run more replicas behind "
            "a load balancer)",
        )
        _require(self.watchdog_timeout >= 0, "--watchdog-timeout", self.watchdog_timeout, ">= 0")
        _require(
            self.header_read_timeout > 0,
            "--header-read-timeout",
            self.header_read_timeout,
            "more than 0",
        )
