"""A real `pagoda serve` of a model without a chat template, then with --chat-template."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_tiny_model_without_then_with_a_template(start_server, tiny_model_dir, tmp_path) -> None:
    model = str(tiny_model_dir("llama"))
    plain = start_server(model, "--served-model-name", "tiny")
    client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model="tiny", prompt="Hi", max_tokens=4)
    assert completion.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert "no chat template" in str(e.value) and "--chat-template" in str(e.value)
    plain.stop()

    path = Path(tmp_path) / "chat.jinja"
    path.write_text(TEMPLATE)
    templated = start_server(model, "--served-model-name", "tiny", "--chat-template", str(path))
    client = openai.OpenAI(base_url=f"{templated.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert chat.usage.completion_tokens == 4
    assert chat.usage.prompt_tokens == len("<user>Hi\n<assistant>")  # one token per byte
