"""Big requests are refused early and cheaply, and never stall the event loop."""

from __future__ import annotations

import json
import threading

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.entrypoints.openai.limits import (
    default_body_limit,
    longest_token_bytes,
    max_prompt_chars,
)
from pagoda.tokenizer import Tokenizer

DEADLINE_S = 60  # generous: only a blocked event loop misses it


@pytest.fixture
def engine(tokenizer) -> FakeEngineClient:
    return FakeEngineClient(tokenizer, max_model_len=128)


def assert_error(response, status: int, param: str | None, match: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param, error
    assert match.lower() in error["message"].lower(), error


# ---- the request body --------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_from_its_content_length(engine) -> None:
    client = TestClient(build_app(engine, ServerConfig(max_request_body_size=1000)))
    body = json.dumps({"prompt": "x" * 2000}).encode()
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, 413, None, "larger than 1000 bytes")
    assert engine.last_params is None
    ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_a_streamed_body_is_cut_off_at_the_limit(engine) -> None:
    client = TestClient(build_app(engine, ServerConfig(max_request_body_size=1000)))
    sent: list[int] = []

    def chunks():  # no Content-Length: the body arrives in pieces
        yield b'{"prompt": "'
        for _ in range(1000):
            sent.append(100)
            yield b"x" * 100
        yield b'"}'

    r = client.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert_error(r, 413, None, "larger than 1000 bytes")
    assert engine.last_params is None


def test_the_default_body_limit_fits_a_prompt_that_fills_the_context(tokenizer) -> None:
    limit = default_body_limit(tokenizer, 8192)
    assert limit >= 16 << 20
    assert limit >= 8192 * longest_token_bytes(tokenizer) * 6  # "\u001f" per character
    assert limit < 100 << 20  # the 100 MB body that was once read whole and accepted


# ---- a prompt longer in characters than the context can hold ------------------------------


def test_a_prompt_too_long_in_characters_is_400_before_tokenizing(
    engine, tokenizer, monkeypatch
) -> None:
    bound = max_prompt_chars(tokenizer, 128)
    assert bound is not None
    seen: list[int] = []
    encode = tokenizer.encode
    monkeypatch.setattr(
        tokenizer, "encode", lambda text, *a, **k: seen.append(len(text)) or encode(text, *a, **k)
    )
    client = TestClient(build_app(engine))
    big = "word " * (bound // 5 + 1)
    r = client.post("/v1/completions", json={"prompt": big})
    assert_error(r, 400, "prompt", "maximum context length is 128")
    r = client.post("/v1/completions", json={"prompt": ["Hi", big]})
    assert_error(r, 400, "prompt.1", "maximum context length is 128")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]})
    assert_error(r, 400, "messages", "maximum context length is 128")
    assert all(n < bound for n in seen)  # the big text never reached the tokenizer
    # truncate_prompt_tokens asks for a long prompt to be cut, so it is tokenized
    r = client.post(
        "/v1/completions", json={"prompt": big, "truncate_prompt_tokens": 8, "max_tokens": 1}
    )
    assert r.status_code == 200, r.text


def test_the_character_bound_never_refuses_a_prompt_that_fits(tokenizer) -> None:
    bound = max_prompt_chars(tokenizer, 100)
    assert bound is not None
    # The text of the tokens that cover the most characters, as many as fit the context.
    vocab = tokenizer.backend.get_vocab()
    widest = sorted(vocab.values(), key=lambda i: -len(tokenizer.decode([i])))[:50]
    for token_id in widest:
        text = tokenizer.decode([token_id] * 100)
        if len(tokenizer.encode(text, add_special_tokens=False)) <= 100:
            assert len(text) <= bound


def test_no_character_bound_for_a_tokenizer_that_drops_characters() -> None:
    # A whitespace pre-tokenizer drops every space: any number of them is no token at all.
    backend = Backend(models.BPE(vocab={"a": 0, "[UNK]": 1}, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_prompt_chars(Tokenizer(backend, eos_token_ids=[]), 100) is None


# ---- tokenizing off the event loop ---------------------------------------------------------


def test_health_answers_while_a_prompt_is_being_tokenized(engine, tokenizer, monkeypatch) -> None:
    started, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def slow_encode(text: str, *args, **kwargs) -> list[int]:
        if text == "the big one":
            started.set()
            release.wait(DEADLINE_S)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    client = TestClient(build_app(engine))
    results: dict[str, int] = {}

    def big_request() -> None:
        r = client.post("/v1/completions", json={"prompt": "the big one", "max_tokens": 1})
        results["big"] = r.status_code

    def health() -> None:
        results["health"] = client.get("/health").status_code

    worker = threading.Thread(target=big_request)
    worker.start()
    try:
        assert started.wait(DEADLINE_S), "the request never reached the tokenizer"
        for route in ("health", "health"):
            checker = threading.Thread(target=health)
            checker.start()
            checker.join(DEADLINE_S)
            assert not checker.is_alive(), "/health did not answer while a prompt was tokenized"
            assert results.pop(route) == 200
        assert worker.is_alive()  # the big request was still being tokenized meanwhile
    finally:
        release.set()
        worker.join(DEADLINE_S)
    assert results["big"] == 200
