"""How big a request may be: its body in bytes, and a prompt in characters before tokenizing.

A request too big to serve is refused before it costs the server much: the body
by its Content-Length (or, when the body streams, as soon as more has arrived than
the limit), and a prompt whose characters alone prove it longer than the context
before the tokenizer spends seconds and a gigabyte on it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.entrypoints.openai.errors import error_response
from pagoda.tokenizer import Tokenizer

# The most bytes of JSON one character of a prompt can take: "\u001f" (6), as much as the
# 12 bytes of an escaped surrogate pair that stands for 2 characters.
_JSON_BYTES_PER_CHAR = 6
_MIN_BODY_LIMIT = 16 << 20  # room for a batch of prompts of modest context, whatever the model


@functools.lru_cache(maxsize=8)  # a scan of the vocabulary, once per tokenizer
def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text that any one token stands for.

    A token's vocabulary string is at least as long in UTF-8 as the text it stands for:
    byte-level BPE spells each byte as one character of 1 or 2 bytes, SentencePiece spells
    a space as "▁" (3 bytes) and a byte it falls back to as "<0x0A>".
    """
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)


def max_prompt_chars(tokenizer: Tokenizer, max_model_len: int) -> int | None:
    """The most characters a prompt that fits the context can have; None when the
    tokenizer gives no such bound.

    Each token covers at most longest_token_bytes() bytes of the text, and a character is at
    least one byte, so a prompt of more characters than max_model_len times that has more
    tokens than the context holds. That holds only while the tokenizer keeps every character
    of the text: no normalizer that may drop or merge characters, no pre-tokenizer that drops
    whitespace, no run of unknown characters fused into one token. For any other tokenizer
    there is no bound, and the prompt is tokenized (off the event loop) and measured.
    """
    if not _keeps_every_character(tokenizer):
        return None
    return max_model_len * longest_token_bytes(tokenizer)


@functools.lru_cache(maxsize=8)
def _keeps_every_character(tokenizer: Tokenizer) -> bool:
    config = json.loads(tokenizer.backend.to_str())
    model = config.get("model") or {}
    return (
        model.get("type") == "BPE"
        and not (model.get("fuse_unk") and model.get("unk_token") is not None)
        and _keeps_characters(config.get("normalizer"), _SAFE_NORMALIZERS)
        and _keeps_characters(config.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS)
    )


# Steps that only split text, spell it differently or add to it, never drop or merge it.
_SAFE_NORMALIZERS = {"Prepend", "Replace"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Split", "Metaspace", "Punctuation"}


def _keeps_characters(step: dict[str, Any] | None, safe: set[str]) -> bool:
    if step is None:
        return True
    kind = step.get("type")
    if kind == "Sequence":
        parts = step.get("normalizers") or step.get("pretokenizers") or []
        return all(_keeps_characters(part, safe) for part in parts)
    if kind == "Replace" and not step.get("content"):
        return False  # replaces its pattern with nothing
    if kind in ("Split", "Punctuation") and str(step.get("behavior", "")).lower() == "removed":
        return False
    return kind in safe


def default_body_limit(tokenizer: Tokenizer, max_model_len: int) -> int:
    """Room for a prompt that fills the context, in the worst JSON escaping, and at least
    16 MiB."""
    prompt_bytes = max_model_len * longest_token_bytes(tokenizer) * _JSON_BYTES_PER_CHAR
    return max(_MIN_BODY_LIMIT, prompt_bytes + (1 << 20))


class BodySizeLimitMiddleware:
    """Answers 413 to a request body over the limit: at once from its Content-Length, or,
    for a body that streams without one, as soon as more than the limit has arrived. The
    body is never read past the limit."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_size
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send)
            return

        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Whatever the route made of the body that stopped short, the answer is the 413.
            if too_large:
                if not started:
                    started = True
                    await self._refuse(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if too_large and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            f"the request body is larger than {self.max_body_size} bytes (--max-request-body-size)",
            413,
        )
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised into the route that reads a body past the limit."""
