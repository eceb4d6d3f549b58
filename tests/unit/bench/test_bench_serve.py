"""`pagoda bench serve` against a small in-process fake OpenAI server with known timings."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagoda.bench import serve as bench
from pagoda.tokenizer import Tokenizer

FIRST_DELAY = 0.2  # seconds before the first chunk
GAP = 0.05  # seconds between chunks
CHUNKS = 5


def fake_app(send_usage: bool) -> FastAPI:
    app = FastAPI()
    app.state.client_ports = []  # the client's port for each completion request
    app.state.bodies = []  # each completion request's JSON body
    counter = {"n": 0}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.client_ports.append(request.client.port)
        app.state.bodies.append(body)
        counter["n"] += 1
        if counter["n"] % 4 == 0:  # every fourth request fails
            return JSONResponse({"error": {"message": "boom", "code": 500}}, status_code=500)
        assert body["stream"] and body["ignore_eos"]

        async def stream():
            await asyncio.sleep(FIRST_DELAY)
            for i in range(CHUNKS):
                if i:
                    await asyncio.sleep(GAP)
                chunk = {"choices": [{"index": 0, "text": "ab"}]}  # 2 byte-tokens per chunk
                yield f"data: {json.dumps(chunk)}\n\n"
            if send_usage:
                usage = {"prompt_tokens": 4, "completion_tokens": 2 * CHUNKS, "total_tokens": 0}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def run_server(app: FastAPI) -> tuple[uvicorn.Server, str]:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def bench_args(base_url: str, tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--base-url",
            base_url,
            "--ignore-eos",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "4",
            "--disable-tqdm",
            "--result-filename",
            str(tmp_path / "result.json"),
        ]
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("send_usage", [True, False], ids=["usage", "tokenizer-count"])
def test_figures_from_known_timings(send_usage: bool, tiny_model_dir, tmp_path) -> None:
    server, url = run_server(fake_app(send_usage))
    try:
        tokenizer = Tokenizer.from_path(tiny_model_dir("llama"))
        args = bench_args(url, tmp_path)
        requests = [bench.BenchRequest("x" * 4, 4, 10) for _ in range(8)]
        summary = asyncio.run(bench.run(args, [], requests, tokenizer))
    finally:
        server.should_exit = True
    # Requests 4 and 8 failed; the other six streamed 5 chunks of 2 tokens.
    assert summary["completed"] == 6 and summary["failed"] == 2
    assert "HTTP 500" in summary["errors"][0]
    assert summary["total_output_tokens"] == 60 and summary["total_input_tokens"] == 24
    assert summary["ttft_ms"]["median"] == pytest.approx(FIRST_DELAY * 1000, abs=60)
    assert summary["itl_ms"]["median"] == pytest.approx(GAP * 1000, abs=25)
    # TPOT = (latency - TTFT) / (tokens - 1) = 4 gaps / 9
    assert summary["tpot_ms"]["median"] == pytest.approx(4 * GAP / 9 * 1000, abs=15)
    assert summary["e2el_ms"]["median"] == pytest.approx((FIRST_DELAY + 4 * GAP) * 1000, abs=80)
    assert summary["output_throughput"] == pytest.approx(60 / summary["duration_s"])

    bench.report(summary, args)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["completed"] == 6 and saved["max_concurrency"] == 4
    assert saved["ttft_ms"]["p99"] >= saved["ttft_ms"]["median"]


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "no-keep-alive"])
def test_no_keep_alive_opens_a_connection_per_request(
    keep_alive: bool, tiny_model_dir, tmp_path
) -> None:
    app = fake_app(send_usage=True)
    server, url = run_server(app)
    try:
        tokenizer = Tokenizer.from_path(tiny_model_dir("llama"))
        args = bench_args(url, tmp_path, max_concurrency=1, no_keep_alive=not keep_alive)
        requests = [bench.BenchRequest("x" * 4, 4, 10) for _ in range(8)]
        asyncio.run(bench.run(args, [], requests, tokenizer))
    finally:
        server.should_exit = True
    ports = app.state.client_ports
    assert len(ports) == 8
    # One at a time: a kept-alive connection carries every request; otherwise each has its own.
    assert len(set(ports)) == (1 if keep_alive else 8)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_requests_carry_a_seed_each(temperature: float, tiny_model_dir, tmp_path) -> None:
    """--temperature T sends T; above 0 each request also carries seed + its index, so that a
    sampled workload is the same on every run (and the same with speculation on and off)."""
    app = fake_app(send_usage=True)
    server, url = run_server(app)
    try:
        tokenizer = Tokenizer.from_path(tiny_model_dir("llama"))
        args = bench_args(url, tmp_path, max_concurrency=1, temperature=temperature, seed=40)
        requests = [bench.BenchRequest("x" * 4, 4, 10) for _ in range(8)]
        asyncio.run(bench.run(args, [], requests, tokenizer))
    finally:
        server.should_exit = True
    bodies = app.state.bodies
    assert [b["temperature"] for b in bodies] == [temperature] * 8
    if temperature:
        assert [b["seed"] for b in bodies] == list(range(40, 48))
    else:
        assert all("seed" not in b for b in bodies)


def test_a_token_holding_a_unicode_line_break_is_text(tiny_model_dir, tmp_path) -> None:
    """A sampled token may be U+2028 (or another character Python counts as a line break):
    inside a JSON string it is text, not the end of an SSE line."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def stream():
            for text in ["a\u2028b", "c\x1cd", "e"]:
                chunk = {"choices": [{"index": 0, "text": text}]}
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    server, url = run_server(app)
    try:
        tokenizer = Tokenizer.from_path(tiny_model_dir("llama"))
        args = bench_args(url, tmp_path, model="fake", num_prompts=1)
        summary = asyncio.run(bench.run(args, [], [bench.BenchRequest("x", 1, 3)], tokenizer))
    finally:
        server.should_exit = True
    assert summary["completed"] == 1 and not summary["errors"]


def test_random_dataset_has_exact_lengths(default_model_path) -> None:
    tokenizer = Tokenizer.from_path(default_model_path)
    requests = bench.random_dataset(tokenizer, 5, 256, 128, seed=3)
    for r in requests:
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == 256
    other = bench.random_dataset(tokenizer, 5, 256, 128, seed=4)
    assert requests[0].prompt != other[0].prompt


def test_percentiles() -> None:
    p = bench.percentiles([0.001 * i for i in range(1, 101)])
    assert p["median"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.0)
    assert p["mean"] == pytest.approx(50.5)


def test_structured_dataset_carries_valid_schemas(default_model_path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    tokenizer = Tokenizer.from_path(default_model_path)
    requests = bench.structured_dataset(tokenizer, 40, seed=1)
    names = set()
    for r in requests:
        assert r.response_format is not None and r.response_format["type"] == "json_schema"
        schema = r.response_format["json_schema"]["schema"]
        jsonschema.Draft202012Validator.check_schema(schema)
        names.add(r.response_format["json_schema"]["name"])
    assert len(names) > 5
    baseline = bench.structured_dataset(tokenizer, 40, seed=1, constrained=False)
    assert [r.prompt for r in baseline] == [r.prompt for r in requests]
    assert all(r.response_format is None for r in baseline)


def test_tools_dataset_carries_valid_tools(default_model_path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    tokenizer = Tokenizer.from_path(default_model_path)
    requests = bench.tools_dataset(tokenizer, 40, seed=1)
    for r in requests:
        assert r.tools is not None and 3 <= len(r.tools) <= 5
        for tool in r.tools:
            assert tool["type"] == "function"
            jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
    assert len({r.prompt for r in requests}) > 5
    baseline = bench.tools_dataset(tokenizer, 40, seed=1, with_tools=False)
    assert [r.prompt for r in baseline] == [r.prompt for r in requests]
    assert all(r.tools is None for r in baseline)


ARGUMENTS = ['{"city": ', '"Paris"', ', "unit": "celsius"', "}"]


def tool_call_app() -> FastAPI:
    """Streams one tool call: its name first, then its arguments in pieces."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        assert body["tool_choice"] == "required" and body["tools"]
        assert body["parallel_tool_calls"] is False

        async def stream():
            await asyncio.sleep(FIRST_DELAY)
            header = {"index": 0, "id": "c", "type": "function", "function": {"name": "f"}}
            yield f"data: {json.dumps({'choices': [{'delta': {'tool_calls': [header]}}]})}\n\n"
            for piece in ARGUMENTS:
                await asyncio.sleep(GAP)
                call = {"index": 0, "function": {"arguments": piece}}
                yield f"data: {json.dumps({'choices': [{'delta': {'tool_calls': [call]}}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def test_a_streamed_tool_call_is_the_answer(tiny_model_dir, tmp_path) -> None:
    """The first token is the call's name; its argument pieces are the text that follows."""
    server, url = run_server(tool_call_app())
    try:
        tokenizer = Tokenizer.from_path(tiny_model_dir("llama"))
        args = bench_args(url, tmp_path, endpoint="/v1/chat/completions", model="fake")
        tools = [{"type": "function", "function": {"name": "f"}}]
        requests = [bench.BenchRequest("x", 1, 10, tools=tools) for _ in range(4)]
        summary = asyncio.run(bench.run(args, [], requests, tokenizer))
    finally:
        server.should_exit = True
    assert summary["completed"] == 4 and summary["json_valid"] == 4
    assert summary["ttft_ms"]["median"] == pytest.approx(FIRST_DELAY * 1000, abs=60)
    assert summary["itl_ms"]["median"] == pytest.approx(GAP * 1000, abs=25)
    tokens = len(tokenizer.encode("".join(ARGUMENTS), add_special_tokens=False))
    assert summary["total_output_tokens"] == 4 * tokens  # no usage sent: counted from the text


def test_copy_dataset_asks_for_copies_of_long_prompts(default_model_path) -> None:
    tokenizer = Tokenizer.from_path(default_model_path)
    requests = bench.copy_dataset(tokenizer, 40, seed=1)
    assert len({r.prompt for r in requests}) > 5
    for r in requests:
        assert isinstance(r.prompt, str) and r.response_format is None
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
        assert 150 <= r.prompt_len <= 600 and r.output_len >= 150
