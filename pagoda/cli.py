"""`pagoda`: the command line (generate, serve, serve-ray, bench)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagoda.config import (
    DTYPES,
    OFFLINE_MAX_NUM_BATCHED_TOKENS,
    QUANTIZATIONS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
)


def _generate(args: argparse.Namespace) -> int:
    from pagoda.engine.llm import LLM
    from pagoda.sampling_params import SamplingParams

    llm = LLM(args.model, dtype="float32", kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    (output,) = llm.generate([args.prompt], params, use_tqdm=False)
    print(args.prompt + output.outputs[0].text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from pagoda.entrypoints.launcher import bind_socket, bind_unix_socket

    # Built before the port and the engine: a flag that cannot work fails here (main()).
    engine_config, server_config = _serve_configs(args)
    try:
        # Bound before the engine starts: a taken port fails fast.
        sock = bind_unix_socket(args.uds) if args.uds else bind_socket(args.host, args.port)
    except OSError as e:
        print(f"error: {e.strerror or e}", file=sys.stderr)
        return 1
    return asyncio.run(_run_server(args, engine_config, server_config, sock))


def _serve_ray(args: argparse.Namespace) -> int:
    from pagoda.deploy.config import set_serve_defaults

    set_serve_defaults()  # before Ray Serve is imported
    try:
        from pagoda.deploy.ray import serve_ray
    except ImportError as e:
        print(f"error: serve-ray needs Ray Serve (pip install 'pagoda[ray]'): {e}", file=sys.stderr)
        return 1
    engine_config, server_config = _serve_configs(args)
    try:
        return serve_ray(args, engine_config, server_config, _launcher_options(args))
    except OSError as e:  # the port is taken
        print(f"error: {e.strerror or e}", file=sys.stderr)
        return 1


def _serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    from pagoda import envs
    from pagoda.model_files import DEFAULT_MODEL_NAME, resolve_model_path

    names = tuple(args.served_model_name or [args.model or DEFAULT_MODEL_NAME])
    engine_config = engine_config_from_args(args, resolve_model_path(args.model), names)
    api_keys = list(args.api_key or [])
    if not api_keys and envs.PAGODA_API_KEY:
        api_keys = [k for k in envs.PAGODA_API_KEY.split(",") if k]
    server_config = ServerConfig(
        api_keys=tuple(api_keys),
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        root_path=args.root_path,
        max_n=args.max_n,
        chat_template=_chat_template(args.chat_template),
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=_tool_call_parser(args),
        reasoning_parser=_reasoning_parser(args.reasoning_parser),
        max_prompts_per_request=args.max_prompts_per_request,
        max_request_body_size=args.max_request_body_size,
        disable_log_requests=args.disable_log_requests,
        enable_force_include_usage=args.enable_force_include_usage,
        max_logprobs=args.max_logprobs,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        header_read_timeout=args.header_read_timeout,
        max_connections=args.max_connections,
        watchdog_timeout=args.watchdog_timeout,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        api_server_count=args.api_server_count,
    )
    return engine_config, server_config


def _chat_template(value: str | None) -> str | None:
    from pagoda.tokenizer import load_chat_template

    try:
        return load_chat_template(value) if value is not None else None
    except ValueError as e:
        raise ConfigError(f"--chat-template: {e}") from None


def _tool_call_parser(args: argparse.Namespace) -> str | None:
    from pagoda.entrypoints.openai.tool_parsers import TOOL_PARSERS

    name = args.tool_call_parser
    if name is not None and name not in TOOL_PARSERS:
        raise ConfigError(
            f"--tool-call-parser: unknown parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}"
        )
    if args.enable_auto_tool_choice and name is None:
        raise ConfigError("--enable-auto-tool-choice requires --tool-call-parser")
    return name


def _reasoning_parser(name: str | None) -> str | None:
    from pagoda.entrypoints.openai.reasoning import REASONING_PARSERS

    if name is not None and name not in REASONING_PARSERS:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ConfigError(f"--reasoning-parser: unknown parser {name!r}; known: {known}")
    return name


def engine_config_from_args(
    args: argparse.Namespace, path: Path, served_model_names: tuple[str, ...] = ()
) -> EngineConfig:
    """The EngineConfig of the engine flags that `_add_engine_flags` declares."""
    return EngineConfig.from_flags(
        path,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        served_model_names=served_model_names,
        seed=args.seed,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        structured_outputs_config=structured_outputs_config_of(args),
        speculative_config=speculative_config_of(args),
        device=args.device,
    )


def structured_outputs_config_of(args: argparse.Namespace) -> StructuredOutputsConfig | None:
    """--structured-outputs-config's JSON; None when absent. ConfigError names the flag."""
    text = args.structured_outputs_config
    return None if text is None else StructuredOutputsConfig.from_json(text)


def speculative_config_of(args: argparse.Namespace) -> SpeculativeConfig | None:
    """--speculative-config's JSON; None when absent. ConfigError names the flag and field."""
    text = args.speculative_config
    return None if text is None else SpeculativeConfig.from_json(text)


async def _run_server(
    args: argparse.Namespace,
    engine_config: EngineConfig,
    server_config: ServerConfig,
    sock: socket.socket,
) -> int:
    from pagoda.engine.async_client import AsyncEngineClient
    from pagoda.engine.protocol import EngineDeadError
    from pagoda.entrypoints.launcher import serve_http
    from pagoda.entrypoints.openai.api_server import build_app

    names = engine_config.model.served_model_names
    engine = AsyncEngineClient(
        engine_config,
        served_model_names=names,
        watchdog_timeout=server_config.watchdog_timeout or None,
    )
    try:
        await engine.ready()
    except (EngineDeadError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        engine.shutdown(0)
        return 1
    app = build_app(engine, server_config)
    return await serve_http(app, sock, **_launcher_options(args))


def _launcher_options(args: argparse.Namespace) -> dict[str, Any]:
    """serve_http's keyword arguments from the flags (serve and serve-ray alike)."""
    return dict(
        enable_ssl_refresh=args.enable_ssl_refresh,
        shutdown_timeout=args.shutdown_timeout,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        timeout_keep_alive=5,
    )


def parse_size(text: str) -> int:
    """Bytes from '536870912', '512M', '512MiB', '1G' or '1.5GB' (binary units)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def at_least(
    low: float, parse: Callable[[str], float] = int, *, strict: bool = False
) -> Callable[[str], float]:
    """An argparse type: parse, then refuse values below low (or equal to it, if strict).

    argparse names the flag in the error.
    """

    def check(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (strict and value == low):
            what = "more than" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be {what} {low}, got {text}")
        return value

    return check


def _port(text: str) -> int:
    port = int(at_least(0)(text))
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {text}")
    return port


def _json_list(text: str) -> list[str]:
    import json

    value = json.loads(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
    return [str(v) for v in value]


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by serve and bench; their defaults live in pagoda.config.

    Values that parse but cannot work are refused by the config dataclasses.
    """
    p.add_argument("--dtype", choices=DTYPES, default=ModelConfig.dtype)
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=ModelConfig.quantization,
        help="gguf: in bfloat16, hold a GGUF's projections, embedding and output layer in "
        "their file form only (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K): the int8 kernel "
        "for a few rows, decoded tiles for more; auto: as gguf, but a model whose bfloat16 "
        "copy takes at most 1 GiB keeps it too, for steps of more than a few rows (faster); "
        "none: dequantize every weight",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=ModelConfig.max_model_len,
        help="the context length; an error when the KV cache cannot hold it (default: the "
        "model's own, lowered with a warning to what the KV cache holds)",
    )
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=SchedulerConfig.max_num_batched_tokens,
        help="tokens per step: fewer for earlier first tokens, more for throughput "
        "(default: %(default)s)",
    )
    p.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    p.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=CacheConfig.kv_cache_memory,
        help="memory for the KV cache, e.g. 512M or 2G (default: %(default)s bytes)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=DTYPES,
        default=CacheConfig.kv_cache_dtype,
        help="auto: the model's dtype, but bfloat16 where a float32 model computes from a GGUF "
        "file's quantized blocks; bfloat16 under a float32 model holds twice the tokens in the "
        "same memory (attention still computes in float32); float32 needs a float32 model",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=CacheConfig.enable_prefix_caching,
    )
    p.add_argument("--seed", type=int, default=ModelConfig.seed)
    p.add_argument("--device", default=EngineConfig.device, help="cpu or cuda[:N]")
    p.add_argument(
        "--structured-outputs-config",
        default=None,
        metavar="JSON",
        help="structured outputs' defaults as a JSON object, e.g. "
        "'{\"disable_any_whitespace\": true}': backend (auto, guidance, llguidance: the one "
        "backend), disable_any_whitespace (JSON without spaces), disable_additional_properties "
        "(objects take only the properties their schema lists), forced_tokens (default true)",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding by n-gram prompt lookup, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\'; '
        "also disable_by_batch_size (no drafts in a step of that many requests or more; "
        "default 32, null for none) and min_acceptance_rate, min_draft_tokens (a request "
        "whose first min_draft_tokens drafts, default 16, were accepted less often than "
        "that, default 0.4, stops drafting)",
    )


def build_parser() -> argparse.ArgumentParser:
    from pagoda.config import ServerConfig

    parser = argparse.ArgumentParser(prog="pagoda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedily continue a prompt and print it")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory or GGUF file")
    gen.add_argument("--max-tokens", type=at_least(1), default=32)
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model directory or GGUF file (default: SmolLM2-135M-Instruct)",
    )
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument(
        "--api-key",
        action="append",
        help="require this bearer key on /v1 (repeatable; env PAGODA_API_KEY)",
    )
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument(
        "--max-n", type=int, default=ServerConfig.max_n, help="the largest n a request may ask"
    )
    serve.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=ServerConfig.max_prompts_per_request,
        help="the most prompts one completion request may list (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-body-size",
        type=parse_size,
        default=None,
        help="the largest request body, e.g. 16M; larger is a 413 (default: room for a "
        "prompt that fills the context, and at least 16 MiB)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=at_least(0, float),
        default=0.0,
        help="seconds that in-flight requests get to finish on SIGTERM",
    )
    serve.add_argument("--ssl-keyfile")
    serve.add_argument("--ssl-certfile")
    serve.add_argument("--ssl-ca-certs")
    serve.add_argument(
        "--ssl-cert-reqs",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="whether a client certificate is required: 0 none, 1 optional, 2 required",
    )
    serve.add_argument(
        "--enable-ssl-refresh",
        action="store_true",
        help="reload the TLS files when they change on disk",
    )
    serve.add_argument(
        "--h11-max-incomplete-event-size",
        type=at_least(1, parse_size),
        default=ServerConfig.h11_max_incomplete_event_size,
        help="the largest request head (request line and headers), e.g. 64K; larger is "
        "answered 431 (default: %(default)s bytes)",
    )
    serve.add_argument(
        "--h11-max-header-count",
        type=at_least(1),
        default=ServerConfig.h11_max_header_count,
        help="the most headers a request may carry; more is answered 431 (default: %(default)s)",
    )
    serve.add_argument(
        "--header-read-timeout",
        type=at_least(0.001, float),
        default=ServerConfig.header_read_timeout,
        help="seconds a client has to send a whole request head; later is answered 408 and "
        "the connection closed (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=at_least(1),
        default=ServerConfig.max_connections,
        help="open connections beyond this are answered 503 and closed (default: %(default)s)",
    )
    serve.add_argument(
        "--watchdog-timeout",
        type=at_least(0, float),
        default=ServerConfig.watchdog_timeout,
        help="seconds without progress (a step's outputs or an idle engine's heartbeat) "
        "after which the engine counts as hung: /health answers 503 and the server exits "
        "as on a dead engine; 0: never (default: %(default)s)",
    )
    serve.add_argument("--allowed-origins", type=_json_list, default=["*"])
    serve.add_argument("--allowed-methods", type=_json_list, default=["*"])
    serve.add_argument("--allowed-headers", type=_json_list, default=["*"])
    serve.add_argument("--allow-credentials", action="store_true")
    serve.add_argument(
        "--root-path",
        default="",
        help="the path prefix a proxy in front adds, e.g. /llm: both /llm/v1/... and /v1/... "
        "are served",
    )
    serve.add_argument("--uds", default=None, help="listen on this Unix domain socket instead")
    serve.add_argument(
        "--api-server-count",
        type=int,
        default=ServerConfig.api_server_count,
        help="API server processes; Pagoda runs one (default: %(default)s)",
    )
    serve.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="send X-Request-Id (the request's own, or a new one) on every response",
    )
    serve.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (the tokenizer's configuration, chat template included)",
    )
    serve.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    serve.add_argument("--disable-uvicorn-access-log", action="store_true")
    serve.add_argument("--disable-log-requests", action="store_true")
    serve.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template, as a file path or inline; replaces the model's own, and "
        "lets a model without one serve /v1/chat/completions",
    )
    serve.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let tool_choice "auto" (the default when a request has tools) read the '
        "model's calls, in the format of --tool-call-parser",
    )
    serve.add_argument(
        "--tool-call-parser",
        default=None,
        help="the format of the model's tool calls: hermes (Qwen2.5, Qwen3, Hermes), "
        "llama3_json, mistral or pythonic",
    )
    serve.add_argument(
        "--reasoning-parser",
        default=None,
        help="the model's thinking format, qwen3 or deepseek_r1: chat answers carry the "
        "thinking in message.reasoning (and reasoning_content), apart from the content, and "
        "response formats and forced tool choices hold on the answer after it",
    )
    serve.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="send usage in every stream, on every chunk, whatever stream_options say",
    )
    serve.add_argument(
        "--max-logprobs",
        type=int,
        default=ServerConfig.max_logprobs,
        help="the most logprobs a request may ask for per token; -1: the whole vocabulary "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help='write logprob tokens as "token_id:{id}" unless a request says otherwise',
    )
    _add_engine_flags(serve)
    serve.set_defaults(func=_serve)

    # serve-ray: the same flags as serve (parents= copies them), and the Ray ones.
    serve_ray = sub.add_parser(
        "serve-ray",
        parents=[serve],
        add_help=False,
        help="serve replicas of a model on Ray Serve (pip install pagoda[ray])",
    )
    from pagoda.deploy.config import add_ray_flags

    add_ray_flags(serve_ray)
    serve_ray.set_defaults(func=_serve_ray)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from pagoda.bench import serve as bench_serve
    from pagoda.bench import throughput

    tp = bench.add_parser("throughput", help="offline generation throughput")
    throughput.add_arguments(tp)
    _add_engine_flags(tp)
    tp.set_defaults(func=throughput.main, max_num_batched_tokens=OFFLINE_MAX_NUM_BATCHED_TOKENS)
    sv = bench.add_parser("serve", help="load an OpenAI-compatible server")
    bench_serve.add_arguments(sv)
    sv.set_defaults(func=bench_serve.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    from pagoda.model.spec import ModelLoadError

    try:
        return int(args.func(args))
    except ConfigError as e:
        parser.error(str(e))  # exits with 2, as argparse does for a malformed flag
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
