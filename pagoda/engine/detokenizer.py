"""IncrementalDetokenizer: token ids arrive step by step, text leaves once it is whole."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from pagoda.tokenizer import Tokenizer

# Prompt tokens fed to the stream first, so that the first output token is spaced as in context.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """push(token_ids) returns only the new text, holding back incomplete UTF-8 characters."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.backend = tokenizer.backend
        self.stream = DecodeStream(
            ids=prompt_token_ids[-_CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens
        )

    def push(self, token_ids: list[int]) -> str:
        pieces = (self.stream.step(self.backend, t) for t in token_ids)
        return "".join(p for p in pieces if p)
