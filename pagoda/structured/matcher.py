"""The engine side of structured outputs: a matcher per request and its allowed-token mask.

The mask is a bitmask over the model's vocabulary rows, one int32 word per 32 tokens (bit
i of word w allows token 32*w + i), which the sampler expands and applies. Rows beyond
the tokenizer's vocabulary (padding) are never allowed.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured.grammar import StructuredOutputsError, grammar_of

logger = logging.getLogger(__name__)


class GrammarCompiler:
    """Builds matchers in a worker thread, so that compiling overlaps the engine's steps.

    llguidance releases the GIL while it builds its tokenizer and compiles a grammar. The
    tokenizer (0.4 s for a 49k vocabulary, 4 s for 262k) is built once, first thing.
    """

    def __init__(self, model_path: Path, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._tokenizer = self._pool.submit(_build_tokenizer, model_path, vocab_size)

    def compile(
        self, params: StructuredOutputsParams, end_token_ids: tuple[int, ...]
    ) -> RequestGrammar:
        """A request's grammar; its matcher is still being built when this returns."""
        grammar = RequestGrammar(self.vocab_size, end_token_ids)
        grammar.building = self._pool.submit(self._build, params, grammar)
        return grammar

    def _build(self, params: StructuredOutputsParams, grammar: RequestGrammar) -> Any:
        """The matcher, and its first mask: the first fill builds much of the lexer lazily
        (about 1.5 ms for a small schema), here rather than when the first token samples."""
        import llguidance

        text = grammar_of(params, check=False)
        matcher = llguidance.LLMatcher(self._tokenizer.result(), text, log_level=0)
        if matcher.is_error():
            kind = params.kinds[0]
            raise StructuredOutputsError(kind, f"invalid {kind}: {matcher.get_error().strip()}")
        grammar.fill_mask(matcher)
        return matcher


def _build_tokenizer(model_path: Path, vocab_size: int) -> Any:
    import llguidance

    from pagoda.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(model_path)
    return llguidance.LLTokenizer(
        tokenizer.backend.to_str(),
        n_vocab=max(vocab_size, tokenizer.vocab_size),
        eos_token=tokenizer.eos_token_ids or None,
    )


class RequestGrammar:
    """One request's matcher: the mask of the next token, and the tokens accepted so far.

    end_token_ids (EOS unless ignored, and the request's stop tokens) are allowed only
    where the grammar may end. `error` is set once the matcher fails (a grammar that did
    not compile, or a token it refused); the request then ends with that error.
    """

    def __init__(self, vocab_size: int, end_token_ids: tuple[int, ...]):
        self.building: Future[Any] | None = None  # the matcher, with the first mask filled
        self._matcher: Any = None
        self.vocab_size = vocab_size
        self.end_token_ids = end_token_ids
        self.error: str | None = None
        # numpy, not torch: this is a few thousand words read and written in small steps,
        # where numpy's per-call cost is a fraction of torch's.
        self.mask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._mask_is_current = False

    @property
    def matcher(self) -> Any:
        """The matcher, waiting for it if it is still being built; None after an error."""
        if self._matcher is None and self.error is None:
            assert self.building is not None, "GrammarCompiler.compile starts the build"
            try:
                self._matcher = self.building.result()
                self._mask_is_current = True
            except StructuredOutputsError as e:
                self.error = f"{e.param}: {e}"
            except Exception as e:  # a bug in the backend: the request fails, not the engine
                logger.exception("building a grammar matcher failed")
                self.error = f"structured_outputs: {e}"
        return self._matcher

    @property
    def is_ready(self) -> bool:
        """The matcher is built (or failed): reading it does not wait."""
        return (
            self._matcher is not None
            or self.error is not None
            or (self.building is not None and self.building.done())
        )

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and admits nothing more."""
        return self.matcher is not None and self.matcher.is_stopped()

    def allowed_mask(self) -> np.ndarray:
        """The bitmask of tokens allowed next ([words] int32); all allowed after an error."""
        matcher = self.matcher
        if not self._mask_is_current:
            if matcher is None:
                self.mask.fill(-1)
            else:
                self.fill_mask(matcher)
            self._mask_is_current = True
        return self.mask

    def fill_mask(self, matcher: Any, mask: np.ndarray | None = None) -> None:
        """Writes the matcher's allowed tokens into `mask` (by default the request's own),
        end tokens where it may end."""
        mask = self.mask if mask is None else mask
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if self.end_token_ids and matcher.is_accepting():
            words = mask.view(np.uint32)
            for token in self.end_token_ids:
                if token < self.vocab_size:
                    words[token >> 5] |= np.uint32(1 << (token & 31))

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False (and `error` set) if the grammar refuses it."""
        matcher = self.matcher
        if matcher is None:
            return False
        self._mask_is_current = False
        if not matcher.consume_token(token_id):
            self.error = f"structured_outputs: the grammar refused token {token_id}: " + (
                matcher.get_error() or "not allowed here"
            )
            return False
        return True

    def valid_draft(self, draft: list[int]) -> list[int]:
        """The longest prefix of a draft the grammar takes from here, without advancing it.

        It stops before an end token too: a draft that ends the request gains nothing
        over the model's own token there, and what follows it has no grammar state.
        """
        matcher = self.matcher
        if matcher is None:
            return []
        for i, token in enumerate(draft):
            if token in self.end_token_ids:
                draft = draft[:i]
                break
        return draft[: matcher.validate_tokens(draft)] if draft else []

    def draft_masks(self, draft: list[int]) -> np.ndarray:
        """The masks of the positions after the request's last token and after each token of
        a valid draft ([1 + len(draft), words] int32): each one the grammar's state as if
        the draft tokens before it had been sampled. The grammar is left where it was."""
        masks = np.empty((len(draft) + 1, self.mask.shape[0]), dtype=np.int32)
        masks[0] = self.allowed_mask()
        matcher = self.matcher
        if matcher is None:  # failed: everything is allowed everywhere
            masks[1:] = -1
            return masks
        for j, token in enumerate(draft):
            taken = matcher.consume_token(token)
            assert taken, "drafts are cut to what the grammar takes (valid_draft)"
            self.fill_mask(matcher, masks[j + 1])
        if draft:
            rolled_back = matcher.rollback(len(draft))
            assert rolled_back, matcher.get_error()
        return masks

    def forced_token(self) -> int | None:
        """The next token when the grammar allows exactly one (never an end token), else None."""
        if self.matcher is None:
            return None
        mask = self.allowed_mask()
        words = np.flatnonzero(mask)
        if len(words) != 1:
            return None
        word = int(mask.view(np.uint32)[words[0]])
        if word & (word - 1):
            return None  # more than one bit
        token = int(words[0]) * 32 + word.bit_length() - 1
        return None if token in self.end_token_ids else token
