"""The tokenizer built from GGUF metadata agrees with transformers' conversion of it."""

from __future__ import annotations

import pytest

from pagoda.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is",
    "Hello 12345 world!!  \n\n  x",
    "naïve café — 東京 🙂 <|im_start|>user",
    "def f(x):\n\treturn x**2  # comment",
    "",
]


@pytest.fixture(scope="module")
def tokenizers(default_model_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name
    )
    return Tokenizer.from_path(default_model_path), ref


@pytest.mark.slow
def test_default_tokenizer_matches_transformers(tokenizers) -> None:
    ours, ref = tokenizers
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids[0] == ref.eos_token_id  # then <|endoftext|>, which ends turns too
    assert ours.eos_token_ids[1:] == [ref.convert_tokens_to_ids("<|endoftext|>")]


@pytest.mark.slow
def test_default_chat_template_matches_transformers(tokenizers) -> None:
    ours, ref = tokenizers
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for add in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
    assert "<|im_start|>assistant" in ours.apply_chat_template(messages[1:2])
