"""`pagoda serve` of the Gemma 3 270M base GGUF: a SentencePiece vocabulary and no chat template."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from pagoda.model.models import MODELS
from pagoda.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("gemma3" not in MODELS, reason="the Gemma 3 architecture is not built in"),
]

# Gemma's turn format (its instruction-tuned models' template, without the system-prompt folding).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_gemma3_completions_then_chat_with_a_template(
    start_server, gemma3_gguf_path: Path, tmp_path: Path
) -> None:
    plain = start_server(str(gemma3_gguf_path), "--served-model-name", "gemma")
    client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(
        model="gemma", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    text = completion.choices[0].text
    assert completion.usage.prompt_tokens == 6  # <bos> and five pieces
    assert completion.usage.completion_tokens == 8
    # SentencePiece pieces decoded: "▁" back to spaces, no byte tokens or <bos> left in the text.
    assert text.startswith(" ") and "\u2581" not in text and "<0x" not in text and "<" not in text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=8)
    assert "no chat template" in str(e.value) and "--chat-template" in str(e.value)
    plain.stop()

    path = tmp_path / "gemma.jinja"
    path.write_text(GEMMA_TEMPLATE)
    templated = start_server(
        str(gemma3_gguf_path), "--served-model-name", "gemma", "--chat-template", str(path)
    )
    client = openai.OpenAI(base_url=f"{templated.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=16, temperature=0
    )
    tokenizer = Tokenizer.from_path(gemma3_gguf_path)
    prompt = tokenizer.apply_chat_template(MESSAGES, chat_template=GEMMA_TEMPLATE)
    assert prompt.startswith("<bos><start_of_turn>user\n")
    # <bos> is written by the template and not added a second time.
    assert chat.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    content = chat.choices[0].message.content
    assert content and "<end_of_turn>" not in content and "\u2581" not in content
    assert chat.choices[0].finish_reason in ("stop", "length")
