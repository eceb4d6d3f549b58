"""A real `pagoda serve` on the default model, driven by the official openai client."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_completion_streamed_equals_plain(client) -> None:
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    assert "Paris" in plain.choices[0].text
    assert plain.usage.completion_tokens == 16 and plain.usage.prompt_tokens == 5
    stream = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_streamed_equals_plain(client) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=24, temperature=0
    )
    text = plain.choices[0].message.content
    assert "Paris" in text and plain.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_sixteen_concurrent_requests(server) -> None:
    async def main() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(
            *[
                aclient.completions.create(
                    model=MODEL,
                    prompt=f"Count from {i}:",
                    max_tokens=12,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                for i in range(16)
            ]
        )

    results = asyncio.run(main())
    assert all(r.usage.completion_tokens == 12 for r in results)
    assert all(r.choices[0].finish_reason == "length" for r in results)


def test_tokenize_detokenize_round_trip(server) -> None:
    text = "Pagoda serves models: ünïcode, 東京, and numbers 12345."
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert back == text


def test_bad_request_gets_openai_error(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-3)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi")


def test_metrics_move(server, client) -> None:
    before = server.metric("vllm:generation_tokens_total")
    prompt_before = server.metric("vllm:prompt_tokens_total")
    success = server.metric("vllm:request_success_total")
    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    assert server.metric("vllm:generation_tokens_total") - before == 5
    assert server.metric("vllm:prompt_tokens_total") - prompt_before == 2
    assert server.metric("vllm:request_success_total") - success == 1
    assert server.metric("vllm:time_to_first_token_seconds_count") >= 1
    assert server.metric("vllm:num_requests_running") == 0


def test_disconnect_mid_stream_frees_the_request(server) -> None:
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story.",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("vllm:num_requests_running") == 1
    deadline = time.monotonic() + 60  # generous: 2000 tokens take far longer on this machine
    while server.metric("vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.05)


def test_disconnect_non_streaming_frees_the_request(server) -> None:
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story.",
        "max_tokens": 2000,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 60  # generous: 2000 tokens take far longer on this machine
    while server.metric("vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.05)


# ---- header limits, checked on the raw socket ---------------------------------------------


def raw_request(port: int, head: bytes, chunk: int | None = None) -> bytes:
    """Sends a request head (in one piece or in chunks) and returns the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            if chunk is None:
                s.sendall(head)
            else:
                for i in range(0, len(head), chunk):
                    s.sendall(head[i : i + chunk])
                    time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything
        data = b""
        try:
            while b"\r\n" not in data:
                part = s.recv(4096)
                if not part:
                    break
                data += part
        except ConnectionResetError:
            pass
    return data.split(b"\r\n", 1)[0]


def head_with(headers: list[bytes]) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(headers) + b"\r\n"


@pytest.mark.parametrize("chunk", [None, 7])
def test_header_count_limit(server, chunk) -> None:
    many = head_with([f"X-H{i}: v\r\n".encode() for i in range(300)])
    assert raw_request(server.port, many, chunk).startswith(b"HTTP/1.1 431")
    fine = head_with([f"X-H{i}: v\r\n".encode() for i in range(200)])
    assert raw_request(server.port, fine, chunk).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("chunk", [None, 65536])
def test_header_size_limit(server, chunk) -> None:
    huge = head_with([b"X-Big: " + b"a" * (5 * 1024 * 1024) + b"\r\n"])
    assert raw_request(server.port, huge, chunk).startswith(b"HTTP/1.1 431")
    line = head_with([b"X-Big: " + b"a" * (100 * 1024) + b"\r\n"])  # over the 64 KiB default
    assert raw_request(server.port, line, chunk).startswith(b"HTTP/1.1 431")
    cookie = head_with([b"Cookie: " + b"c" * (40 * 1024) + b"\r\n"])
    assert raw_request(server.port, cookie, chunk).startswith(b"HTTP/1.1 200")
    endless = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"b" * (5 * 1024 * 1024)
    assert raw_request(server.port, endless, chunk).startswith(b"HTTP/1.1 431")
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_prompt_logprobs_and_echo(client) -> None:
    out = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=2,
        temperature=0,
        echo=True,
        logprobs=1,
        extra_body={"prompt_logprobs": 1},
    )
    choice = out.choices[0]
    assert choice.text.startswith("The capital of France is")
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == 5 and prompt_logprobs[0] is None
    assert all(entry for entry in prompt_logprobs[1:])
    # echo's logprobs cover the prompt too: None for its first token, then each token's own,
    # as lm-eval-harness reads them to score a prompt
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == 5 + 2
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, 5):
        entry = next(iter(prompt_logprobs[i].values()))  # the prompt's own token comes first
        assert logprobs.token_logprobs[i] == pytest.approx(entry["logprob"])
        assert logprobs.tokens[i] == entry["decoded_token"]


def test_echo_scores_a_prompt_as_generation_would(client) -> None:
    """The logprob echo gives a prompt's last token equals the one generation gave it."""
    first = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=0
    )
    token_logprob = first.choices[0].logprobs.token_logprobs[0]
    scored = client.completions.create(
        model=MODEL,
        prompt="The capital of France is" + first.choices[0].text,
        max_tokens=0,
        echo=True,
        logprobs=0,
    )
    choice = scored.choices[0]
    assert choice.text == "The capital of France is" + first.choices[0].text
    assert choice.logprobs.token_logprobs[0] is None
    # Prefill and decode compute differently (bfloat16): close, not equal. One position off
    # would be far.
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(token_logprob, abs=0.05)
