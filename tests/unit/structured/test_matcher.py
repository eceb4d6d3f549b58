"""The engine-side matcher on the tiny byte tokenizer (token id = byte's place in the byte-level
alphabet): its bitmask, end tokens, forced tokens and padding rows, and the sampler's unpacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagoda.sample.sampler import unpack_bitmask
from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured.matcher import GrammarCompiler
from pagoda.tokenizer import Tokenizer

pytest.importorskip("llguidance")

VOCAB = 300  # the model's rows: 44 beyond the tokenizer's 256 are padding
EOS = 2


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir()
    return GrammarCompiler(path, VOCAB), Tokenizer.from_path(path)


def allowed(grammar) -> set[int]:
    bits = unpack_bitmask(torch.from_numpy(grammar.allowed_mask()[None]), VOCAB)[0]
    return set(torch.nonzero(bits).flatten().tolist())


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_mask_follows_the_grammar_and_ends_only_where_it_may(setup) -> None:
    compiler, tokenizer = setup
    grammar = compiler.compile(StructuredOutputsParams(regex="ab+"), end_token_ids=(EOS,))
    assert allowed(grammar) == set(ids(tokenizer, "a"))  # no EOS, no padding row
    assert grammar.forced_token() == ids(tokenizer, "a")[0]
    assert grammar.accept(ids(tokenizer, "a")[0])
    assert allowed(grammar) == set(ids(tokenizer, "b"))
    assert grammar.accept(ids(tokenizer, "b")[0])
    assert allowed(grammar) == set(ids(tokenizer, "b")) | {EOS}  # it may end here
    assert grammar.forced_token() is None  # two choices
    assert not grammar.is_terminated


def test_a_finished_grammar_terminates_and_a_refused_token_is_an_error(setup) -> None:
    compiler, tokenizer = setup
    grammar = compiler.compile(StructuredOutputsParams(choice=["hi"]), end_token_ids=(EOS,))
    for token in ids(tokenizer, "hi"):
        assert grammar.forced_token() == token
        assert grammar.accept(token)
    assert grammar.is_terminated
    other = compiler.compile(StructuredOutputsParams(choice=["hi"]), end_token_ids=())
    assert not other.accept(ids(tokenizer, "x")[0])
    assert other.error is not None and "refused" in other.error


def test_a_grammar_that_does_not_compile_allows_everything_and_says_why(setup) -> None:
    compiler, _ = setup
    grammar = compiler.compile(StructuredOutputsParams(regex="[a-"), end_token_ids=())
    assert np.all(grammar.allowed_mask() == -1)
    assert grammar.error is not None and grammar.error.startswith("regex")
    assert not grammar.accept(5) and grammar.forced_token() is None


def test_unpack_bitmask_reads_every_bit_including_the_sign_bit() -> None:
    words = torch.tensor([[1 | (1 << 5) | -(1 << 31), 1 << 2]], dtype=torch.int32)
    bits = unpack_bitmask(words, 40)
    assert torch.nonzero(bits[0]).flatten().tolist() == [0, 5, 31, 34]
    assert bits.shape == (1, 40)


def walk(grammar, tokenizer: Tokenizer, text: str) -> None:
    for token in ids(tokenizer, text):
        assert token in allowed(grammar), f"{text!r}: token {token} refused"
        assert grammar.accept(token)


@pytest.mark.parametrize(
    "constraint, answer",
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "integer"}}}), '{"a": 1}'),
        (dict(regex="[0-9]+"), "42"),
        (dict(choice=["yes", "no"]), "yes"),
        (dict(grammar='start: "x" NUM\nNUM: /[0-9]+/'), "x12"),
    ],
)
def test_a_constraint_after_thinking_holds_on_the_answer_only(setup, constraint, answer) -> None:
    """Reasoning models: free text up to the end marker (anything, even what looks like the
    answer or half the marker; the grammar cannot end there, so EOS is refused), then the
    constraint."""
    compiler, tokenizer = setup
    params = StructuredOutputsParams(**constraint, thinking_end="</think>")
    grammar = compiler.compile(params, end_token_ids=(EOS,))
    free = set(ids(tokenizer, "Zz{}<>/ \n0"))
    assert free <= allowed(grammar)
    walk(grammar, tokenizer, f"Say {answer}? </thin> no.\n")
    assert free <= allowed(grammar) and not grammar.matcher.is_accepting()
    walk(grammar, tokenizer, "</think>\n\n")
    assert ids(tokenizer, "Z")[0] not in allowed(grammar)
    walk(grammar, tokenizer, answer)
    assert grammar.matcher.is_accepting() and grammar.error is None


def test_thinking_with_a_start_marker_is_optional(setup) -> None:
    """A model that may think (Qwen3) opens its thinking with <think>, or answers at once."""
    compiler, tokenizer = setup
    params = StructuredOutputsParams(
        regex="[0-9]+", thinking_start="<think>", thinking_end="</think>"
    )
    thinks = compiler.compile(params, end_token_ids=(EOS,))
    assert allowed(thinks) == set(ids(tokenizer, "<0123456789"))
    walk(thinks, tokenizer, "<think>\nNine? 42.</think>42")
    assert thinks.matcher.is_accepting()
    answers = compiler.compile(params, end_token_ids=(EOS,))
    walk(answers, tokenizer, "42")
    assert answers.matcher.is_accepting()


def test_a_draft_is_cut_at_the_first_token_the_grammar_refuses(setup) -> None:
    """Speculative decoding: a draft is checked without advancing the grammar; it is cut at
    the first refused token, and before an end token (the request would stop there)."""
    compiler, tokenizer = setup
    grammar = compiler.compile(StructuredOutputsParams(regex="ab{0,3}c?"), end_token_ids=(EOS,))
    before = allowed(grammar)
    assert grammar.valid_draft(ids(tokenizer, "abbbbc")) == ids(tokenizer, "abbb")
    assert grammar.valid_draft(ids(tokenizer, "abc")) == ids(tokenizer, "abc")
    assert grammar.valid_draft(ids(tokenizer, "ab") + [EOS]) == ids(tokenizer, "ab")
    assert grammar.valid_draft(ids(tokenizer, "x")) == []
    assert allowed(grammar) == before  # nothing was consumed
    walk(grammar, tokenizer, "ab")
    assert grammar.valid_draft(ids(tokenizer, "bbbc")) == ids(tokenizer, "bb")


@pytest.mark.parametrize(
    "constraint, prefix, draft",
    [
        (dict(regex="ab{0,3}c?"), "", "abb"),
        (dict(json={"type": "object", "properties": {"a": {"type": "integer"}}}), '{"', 'a": 12'),
        (dict(choice=["red", "green", "redder"]), "r", "edd"),
    ],
)
def test_draft_masks_are_the_masks_the_grammar_has_after_each_draft_token(
    setup, constraint, prefix, draft
) -> None:
    """Row j is the mask after the first j draft tokens, end tokens included; the grammar
    is where it was afterwards, as if the draft had never been looked at."""
    compiler, tokenizer = setup
    params = StructuredOutputsParams(**constraint)
    grammar = compiler.compile(params, end_token_ids=(EOS,))
    walk(grammar, tokenizer, prefix)
    tokens = ids(tokenizer, draft)
    masks = grammar.draft_masks(tokens)
    assert masks.shape == (len(tokens) + 1, grammar.mask.shape[0])
    stepped = compiler.compile(params, end_token_ids=(EOS,))
    walk(stepped, tokenizer, prefix)
    for j, token in enumerate(tokens):
        assert np.array_equal(masks[j], stepped.allowed_mask()), j
        assert stepped.accept(token)
    assert np.array_equal(masks[-1], stepped.allowed_mask())
    # The grammar itself has not moved: it takes the draft again, token by token.
    assert np.array_equal(grammar.allowed_mask(), masks[0])
    walk(grammar, tokenizer, draft)
    assert np.array_equal(grammar.allowed_mask(), masks[-1])
