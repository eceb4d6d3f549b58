"""A model without a chat template, and the template `--chat-template` supplies."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient

from pagoda.cli import build_parser, main
from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.tokenizer import Tokenizer, load_chat_template

TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def with_template(default_model_path) -> Tokenizer:
    return Tokenizer.from_path(default_model_path)


@pytest.fixture(scope="module")
def without_template(with_template) -> Tokenizer:
    t = with_template
    return Tokenizer(t.backend, eos_token_ids=t.eos_token_ids, bos_token=t.bos_token)


def client(tokenizer: Tokenizer, chat_template: str | None = None) -> TestClient:
    config = ServerConfig(chat_template=chat_template)
    return TestClient(build_app(FakeEngineClient(tokenizer), config))


def test_without_template_chat_is_400_and_completions_work(without_template) -> None:
    c = client(without_template)
    r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "no chat template" in error["message"] and "--chat-template" in error["message"]
    assert error["type"] == "BadRequestError"
    r = c.post("/tokenize", json={"messages": MESSAGES})
    assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " one two"


def test_supplied_template_serves_chat(without_template) -> None:
    c = client(without_template, TEMPLATE)
    r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == " one two"
    tokens = c.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    expected = "[user] Hi there\n[assistant]"
    assert tokens == without_template.encode(expected, add_special_tokens=False)


def test_supplied_template_replaces_the_models_own(with_template) -> None:
    own = client(with_template).post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    supplied = client(with_template, TEMPLATE).post("/tokenize", json={"messages": MESSAGES})
    assert supplied.json()["tokens"] != own
    assert with_template.decode(supplied.json()["tokens"]) == "[user] Hi there\n[assistant]"


def test_load_chat_template_from_file_or_inline(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    # Inline, as on a command line: escapes are read as in vLLM ("\\n" is a newline).
    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"


def test_load_chat_template_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="chat template"):
        load_chat_template("{% for m in messages %}unclosed")


def test_serve_flag(tmp_path: Path, capsys) -> None:
    args = build_parser().parse_args(["serve", "--chat-template", "t.jinja"])
    assert args.chat_template == "t.jinja"
    assert build_parser().parse_args(["serve"]).chat_template is None
    # A template that cannot be read stops `pagoda serve` before anything starts.
    with pytest.raises(SystemExit) as e:
        main(["serve", "--chat-template", str(tmp_path / "missing.jinja")])
    assert e.value.code == 2
    assert "missing.jinja" in capsys.readouterr().err
