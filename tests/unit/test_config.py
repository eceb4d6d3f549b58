"""Configurations that cannot work are refused when they are built, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.cli import main
from pagoda.config import ConfigError, EngineConfig, ServerConfig, SpeculativeConfig

MODEL = Path("/nonexistent/model.gguf")  # from_flags only builds; nothing is loaded


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        ({"max_model_len": 0}, "--max-model-len"),
        ({"max_model_len": -5}, "--max-model-len"),
        ({"max_model_len": 1}, "--max-model-len"),  # no room for a prompt and a token
        ({"max_num_seqs": 0}, "--max-num-seqs"),
        ({"max_num_seqs": -1}, "--max-num-seqs"),
        ({"max_num_batched_tokens": 0}, "--max-num-batched-tokens"),
        ({"max_num_batched_tokens": -384}, "--max-num-batched-tokens"),
        ({"block_size": 0}, "--block-size"),
        ({"block_size": -16}, "--block-size"),
        ({"kv_cache_memory": 0}, "--kv-cache-memory"),
        ({"kv_cache_memory": -(1 << 20)}, "--kv-cache-memory"),
        ({"dtype": "float16"}, "--dtype"),
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
        ({"quantization": "q4"}, "--quantization"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_engine_config_refuses_what_cannot_work(flags: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        EngineConfig.from_flags(MODEL, **flags)


def test_engine_config_keeps_what_works() -> None:
    config = EngineConfig.from_flags(
        MODEL, max_model_len=2, max_num_seqs=1, max_num_batched_tokens=1, block_size=1
    )
    assert config.model.max_model_len == 2
    assert config.scheduler.max_num_seqs == 1
    assert EngineConfig.from_flags(MODEL, device="cuda:1").device == "cuda:1"


def test_server_config_refuses_max_n_below_one() -> None:
    with pytest.raises(ConfigError, match="--max-n"):
        ServerConfig(max_n=0)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-model-len", "0"], "--max-model-len"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
        (["--kv-cache-memory", "0"], "--kv-cache-memory"),
        (["--max-n", "0"], "--max-n"),
        (["--port", "70000"], "--port"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--h11-max-header-count", "0"], "--h11-max-header-count"),
        (["--h11-max-incomplete-event-size", "0"], "--h11-max-incomplete-event-size"),
        (["--structured-outputs-config", "{nope"], "--structured-outputs-config"),
        (["--structured-outputs-config", '{"backend": "xgrammar"}'], "--structured-outputs-config"),
        (["--structured-outputs-config", '{"compact": true}'], "--structured-outputs-config"),
        (["--structured-outputs-config", "[]"], "--structured-outputs-config"),
    ],
)
def test_serve_refuses_at_startup(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error comes before any model is loaded or any port is bound."""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "0", *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--structured-outputs-config", '{"forced_tokens": 1}'], "--structured-outputs-config"),
    ],
)
def test_bench_throughput_refuses_at_startup(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "throughput", *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["bench", "throughput"]])
def test_structured_outputs_config_reaches_the_engine_config(command: list[str]) -> None:
    from pagoda.cli import build_parser, engine_config_from_args
    from pagoda.config import StructuredOutputsConfig

    flag = '{"disable_any_whitespace": true, "forced_tokens": false, "backend": "guidance"}'
    args = build_parser().parse_args([*command, "--structured-outputs-config", flag])
    assert engine_config_from_args(args, MODEL).structured == StructuredOutputsConfig(
        backend="guidance", disable_any_whitespace=True, forced_tokens=False
    )


def test_serve_bench_and_llm_share_the_defaults() -> None:
    """Each default is stated once, in pagoda.config; only the step budget differs, by name."""
    import inspect

    from pagoda.cli import build_parser, engine_config_from_args
    from pagoda.config import OFFLINE_MAX_NUM_BATCHED_TOKENS, SERVING_MAX_NUM_BATCHED_TOKENS
    from pagoda.engine.llm import LLM

    parser = build_parser()
    serve = engine_config_from_args(parser.parse_args(["serve"]), MODEL)
    assert serve == EngineConfig.from_flags(MODEL)
    assert serve.scheduler.max_num_batched_tokens == SERVING_MAX_NUM_BATCHED_TOKENS

    llm_defaults = {
        name: p.default
        for name, p in inspect.signature(LLM.__init__).parameters.items()
        if name not in ("self", "model")
    }
    offline = EngineConfig.from_flags(MODEL, **llm_defaults)
    bench = engine_config_from_args(parser.parse_args(["bench", "throughput"]), MODEL)
    assert bench == offline
    assert offline.scheduler.max_num_batched_tokens == OFFLINE_MAX_NUM_BATCHED_TOKENS
    differ = EngineConfig.from_flags(MODEL, max_num_batched_tokens=OFFLINE_MAX_NUM_BATCHED_TOKENS)
    assert offline == differ


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--num-prompts", "0"], "--num-prompts"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--request-rate", "0"], "--request-rate"),
        (["--random-input-len", "0"], "--random-input-len"),
        (["--num-warmups", "-1"], "--num-warmups"),
        (["--timeout", "0"], "--timeout"),
    ],
)
def test_bench_serve_refuses_what_cannot_work(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_server_config_refuses_max_prompts_per_request_below_one() -> None:
    with pytest.raises(ConfigError, match="--max-prompts-per-request"):
        ServerConfig(max_prompts_per_request=0)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"method": "eagle", "num_speculative_tokens": 3}', "method"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 17}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": "3"}', "num_speculative_tokens"),
        (
            '{"num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
            "prompt_lookup_max",
        ),
        ('{"num_speculative_tokens": 3, "prompt_lookup_min": 0}', "prompt_lookup_min"),
        ('{"num_speculative_tokens": 3, "disable_by_batch_size": 0}', "disable_by_batch_size"),
        ('{"num_speculative_tokens": 3, "min_acceptance_rate": 2}', "min_acceptance_rate"),
        ('{"num_speculative_tokens": 3, "min_draft_tokens": 0}', "min_draft_tokens"),
        ('{"num_speculative_tokens": 3, "min_acceptance_rate": null}', "min_acceptance_rate"),
        ('{"num_speculative_tokens": 3, "draft_model": "x"}', "draft_model"),
        ("{nope", "not valid JSON"),
        ("[3]", "JSON object"),
    ],
)
def test_serve_refuses_a_bad_speculative_config(
    text: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "0", "--speculative-config", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and field in err


@pytest.mark.parametrize(
    ("values", "lookup"),
    [
        ({}, (5, 5)),  # vLLM's defaults
        ({"prompt_lookup_max": 3}, (3, 3)),  # one bound stands for both
        ({"prompt_lookup_min": 2}, (2, 2)),
        ({"prompt_lookup_min": 2, "prompt_lookup_max": 4}, (2, 4)),
    ],
)
@pytest.mark.parametrize("command", [["serve"], ["bench", "throughput"]])
def test_speculative_config_reaches_the_engine_config(
    command: list[str], values: dict, lookup: tuple[int, int]
) -> None:
    import json

    from pagoda.cli import build_parser, engine_config_from_args

    flag = json.dumps({"method": "ngram", "num_speculative_tokens": 4, **values})
    args = build_parser().parse_args([*command, "--speculative-config", flag])
    spec = engine_config_from_args(args, MODEL).speculative
    assert spec is not None and spec.num_speculative_tokens == 4
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == lookup
    assert engine_config_from_args(build_parser().parse_args(command), MODEL).speculative is None


def test_speculation_switches_itself_off_where_it_does_not_pay_unless_told() -> None:
    """By default drafts stop at 32 requests and for a request that kept fewer than 40 % of
    its first 16 draft tokens (the break-evens measured in BENCHMARKS.md section 11); null
    and 0 switch the two cuts off, as vLLM's default of no batch limit."""
    spec = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 4}')
    assert spec.disable_by_batch_size == 32
    assert (spec.min_acceptance_rate, spec.min_draft_tokens) == (0.4, 16)
    spec = SpeculativeConfig.from_json(
        '{"num_speculative_tokens": 4, "disable_by_batch_size": null, "min_acceptance_rate": 0}'
    )
    assert spec.disable_by_batch_size is None and spec.min_acceptance_rate == 0
