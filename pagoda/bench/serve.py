"""`pagoda bench serve`: load an OpenAI-compatible server and report latency and throughput.

In the manner of `vllm bench serve`: a dataset of prompts, a maximum number of
requests in flight, an arrival process (Poisson at --request-rate, or all at
once), streaming requests, and a report of TTFT, TPOT, ITL and end-to-end
latency. Output token counts come from the server's usage when it sends one,
otherwise from the tokenizer; never from counting chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx


@dataclass
class BenchRequest:
    prompt: str | list[dict[str, str]]  # text, or chat messages
    prompt_len: int
    output_len: int
    response_format: dict | None = None  # a JSON schema to follow (the structured dataset)
    tools: list[dict] | None = None  # function tools, one call required (the tools dataset)


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pagoda.cli import at_least

    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument(
        "--model", default=None, help="model name sent in requests (default: first of /v1/models)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="model directory or GGUF whose tokenizer builds and counts prompts "
        "(default: the embedded default model)",
    )
    p.add_argument(
        "--dataset-name",
        default="random",
        choices=["random", "prompts", "structured", "tools", "copy"],
        help="structured: chat requests that each ask for JSON following a schema "
        "(response_format json_schema); tools: chat requests with three to five function "
        'tools and tool_choice "required", one call each (parallel_tool_calls false); copy: '
        "requests whose answers repeat much of their prompt (code, JSON, CSV or HTML to "
        "repeat with one change, a passage to quote), the work n-gram speculation speeds up",
    )
    p.add_argument(
        "--unconstrained",
        action="store_true",
        help="send the structured or tools dataset's requests without their schemas or "
        "tools (the baseline)",
    )
    p.add_argument("--random-input-len", type=at_least(1), default=256)
    p.add_argument("--random-output-len", type=at_least(1), default=128)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--ban-token-ids",
        default="",
        help="comma-separated token ids sent as logit_bias -100 (for servers "
        "without ignore_eos, such as llama.cpp's)",
    )
    p.add_argument(
        "--no-keep-alive",
        action="store_true",
        help="a new connection for every request (for servers that drop a kept-alive "
        "connection as the next request goes out on it, such as llama.cpp's llama-server)",
    )
    p.add_argument("--num-prompts", type=at_least(1), default=64)
    p.add_argument("--max-concurrency", type=at_least(1), default=None)
    p.add_argument(
        "--request-rate",
        type=at_least(0, float, strict=True),
        default=float("inf"),
        help="requests per second, Poisson arrivals; inf sends all at once",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--temperature",
        type=at_least(0, float),
        default=0.0,
        help="sampling temperature of every request (default 0, greedy); above 0 request i "
        "also carries seed SEED + i, so that the sampled outputs repeat from run to run",
    )
    p.add_argument("--num-warmups", type=at_least(0), default=1)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default="", help="a name for the server, kept in the JSON")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--timeout", type=at_least(0, float, strict=True), default=600.0)


# ---- datasets ---------------------------------------------------------------------------------


def random_dataset(tokenizer, num: int, input_len: int, output_len: int, seed: int):
    """Prompts of exactly input_len tokens: random ids, decoded, re-encoded and trimmed."""
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    requests = []
    for _ in range(num):
        ids = [rng.randrange(100, vocab) for _ in range(input_len)]
        for _ in range(10):  # decoding and re-encoding may merge or split tokens
            text = tokenizer.decode(ids)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < input_len:
                ids += [rng.randrange(100, vocab) for _ in range(input_len - len(ids))]
            ids = ids[:input_len]
            if len(tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)) == input_len:
                break
        text = tokenizer.decode(ids)
        requests.append(BenchRequest(text, input_len, output_len))
    return requests


def prompts_dataset(tokenizer, num: int, seed: int) -> list[BenchRequest]:
    """The realistic chat-shaped prompts that ship with Pagoda, sampled with replacement."""
    out = []
    for item, prompt_len in _sample_shipped("prompts.jsonl", tokenizer, num, seed):
        out.append(BenchRequest(item["prompt"], prompt_len, item["max_tokens"]))
    return out


def copy_dataset(tokenizer, num: int, seed: int) -> list[BenchRequest]:
    """Requests that ship with Pagoda whose answers copy their prompts, sampled with
    replacement: code, JSON, CSV or HTML of a few hundred tokens to repeat with one change,
    and passages to answer from by quoting."""
    return [
        BenchRequest(item["prompt"], prompt_len, item["max_tokens"])
        for item, prompt_len in _sample_shipped("copy.jsonl", tokenizer, num, seed)
    ]


def structured_dataset(
    tokenizer, num: int, seed: int, constrained: bool = True
) -> list[BenchRequest]:
    """Extraction-style chat requests that ship with Pagoda, each with its JSON schema."""
    out = []
    for item, prompt_len in _sample_shipped("structured.jsonl", tokenizer, num, seed):
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": item["name"], "schema": item["schema"], "strict": True},
        }
        out.append(
            BenchRequest(
                item["prompt"],
                prompt_len,
                item["max_tokens"],
                response_format if constrained else None,
            )
        )
    return out


def tools_dataset(tokenizer, num: int, seed: int, with_tools: bool = True) -> list[BenchRequest]:
    """Agent-style chat requests that ship with Pagoda, each with the tools it may call."""
    out = []
    for item, prompt_len in _sample_shipped("tools.jsonl", tokenizer, num, seed):
        tools = item["tools"] if with_tools else None
        out.append(BenchRequest(item["prompt"], prompt_len, item["max_tokens"], tools=tools))
    return out


def _sample_shipped(name: str, tokenizer, num: int, seed: int) -> list[tuple[dict, int]]:
    """num items of a dataset file that ships with Pagoda, sampled with replacement, each
    with its prompt's length in tokens."""
    text = resources.files("pagoda.bench").joinpath(name).read_text()
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    rng = random.Random(seed)
    chosen = [rng.choice(items) for _ in range(num)]
    return [
        (item, len(tokenizer.encode(item["prompt"], add_special_tokens=False))) for item in chosen
    ]


# ---- one request ------------------------------------------------------------------------------


async def _sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, split at newlines only: httpx's aiter_lines also splits at U+2028
    and the other Unicode line breaks, which a sampled token may hold inside a JSON string."""
    pending = ""
    async for text in response.aiter_text():
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.rstrip("\r")
    if pending:
        yield pending.rstrip("\r")


async def send(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    model: str,
    request: BenchRequest,
    tokenizer,
    seed: int | None = None,
) -> RequestResult:
    chat = args.endpoint.endswith("chat/completions")
    body: dict = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.temperature > 0 and seed is not None:
        body["seed"] = seed
    if chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if request.tools is not None:
        body.update(tools=request.tools, tool_choice="required", parallel_tool_calls=False)
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.ban_token_ids:
        body["logit_bias"] = {t.strip(): -100 for t in args.ban_token_ids.split(",") if t.strip()}

    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    usage_tokens = None
    try:
        async with client.stream("POST", args.base_url + args.endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in _sse_lines(response):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = _delta_text(delta) if chat else choice.get("text") or ""
                    # A tool call's first delta (its name) begins the answer, arguments or not.
                    if not piece and not delta.get("tool_calls"):
                        continue
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.text += piece
        result.latency = time.perf_counter() - start
        result.output_tokens = (
            usage_tokens
            if usage_tokens is not None
            else len(tokenizer.encode(result.text, add_special_tokens=False))
        )
        result.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _delta_text(delta: dict) -> str:
    """What a chat delta adds to the answer's text: its content, or its tool calls'
    argument pieces (one call's arguments alone are its JSON object)."""
    calls = delta.get("tool_calls") or []
    arguments = "".join((c.get("function") or {}).get("arguments") or "" for c in calls)
    return (delta.get("content") or "") + arguments


# ---- the run ----------------------------------------------------------------------------------


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "mean": statistics.fmean(values) * scale,
        "median": statistics.median(values) * scale,
        "p99": p99 * scale,
    }


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles(tpots),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]),
        "e2el_ms": percentiles([r.latency for r in ok]),
        # the outputs that parse as JSON (meaningful for the structured dataset)
        "json_valid": sum(_is_json(r.text) for r in ok),
    }


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


async def run(
    args: argparse.Namespace,
    warmups: list[BenchRequest],
    requests: list[BenchRequest],
    tokenizer,
) -> dict:
    """Sends the warm-ups one by one, then the timed requests; returns the summary."""
    limits = httpx.Limits(
        max_connections=None, max_keepalive_connections=0 if args.no_keep_alive else None
    )
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        model = args.model
        if model is None:
            models = (await client.get(args.base_url + "/v1/models")).json()
            model = models["data"][0]["id"]
        for warmup in warmups:
            short = BenchRequest(
                warmup.prompt,
                warmup.prompt_len,
                min(warmup.output_len, 8),
                warmup.response_format,
                warmup.tools,
            )
            await send(client, args, model, short, tokenizer)

        semaphore = asyncio.Semaphore(args.max_concurrency or len(requests))
        rng = random.Random(args.seed)
        progress = None
        if not args.disable_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(requests), desc="Requests")

        async def one(request: BenchRequest, seed: int) -> RequestResult:
            async with semaphore:
                result = await send(client, args, model, request, tokenizer, seed)
            if progress is not None:
                progress.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for i, request in enumerate(requests):
            tasks.append(asyncio.create_task(one(request, args.seed + i)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    summary = summarize(list(results), duration)
    summary["model"] = model
    return summary


def report(summary: dict, args: argparse.Namespace) -> None:
    print(
        f"{args.label or args.base_url}: {summary['completed']} ok, {summary['failed']} failed "
        f"in {summary['duration_s']:.1f} s | {summary['output_throughput']:.1f} output tok/s, "
        f"{summary['request_throughput']:.2f} req/s | TTFT p50 {summary['ttft_ms']['median']:.0f}"
        f" ms | TPOT p50 {summary['tpot_ms']['median']:.1f} ms | "
        f"ITL p50 {summary['itl_ms']['median']:.1f} ms"
    )
    record = {
        "label": args.label,
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "dataset": args.dataset_name,
        "input_len": args.random_input_len,
        "output_len": args.random_output_len,
        "num_prompts": args.num_prompts,
        "max_concurrency": args.max_concurrency,
        "request_rate": str(args.request_rate),
        "seed": args.seed,
        "temperature": args.temperature,
        **summary,
    }
    print(json.dumps(record))
    if args.save_result or args.result_filename:
        path = Path(args.result_filename or f"bench-serve-{int(time.time())}.json")
        path.write_text(json.dumps(record, indent=2))


def main(args: argparse.Namespace) -> int:
    from pagoda.model_files import resolve_model_path
    from pagoda.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(resolve_model_path(args.tokenizer))
    total = args.num_prompts + args.num_warmups
    if args.dataset_name == "random":
        requests = random_dataset(
            tokenizer, total, args.random_input_len, args.random_output_len, args.seed
        )
    elif args.dataset_name == "structured":
        requests = structured_dataset(tokenizer, total, args.seed, not args.unconstrained)
    elif args.dataset_name == "tools":
        requests = tools_dataset(tokenizer, total, args.seed, not args.unconstrained)
    elif args.dataset_name == "copy":
        requests = copy_dataset(tokenizer, total, args.seed)
    else:
        requests = prompts_dataset(tokenizer, total, args.seed)
    warmups, timed = requests[: args.num_warmups], requests[args.num_warmups :]
    summary = asyncio.run(run(args, warmups, timed, tokenizer))
    report(summary, args)
    return 0 if summary["failed"] == 0 else 1
