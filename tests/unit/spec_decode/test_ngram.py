"""N-gram prompt lookup proposes what followed the latest earlier copy of the suffix."""

from __future__ import annotations

import pytest

from pagoda.spec_decode.ngram import propose_ngram


def naive(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, written the slow way."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def test_copies_what_followed_the_suffix_before() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 9, 9, 2, 3, 4]
    assert propose_ngram(tokens, k=3, min_n=2, max_n=3) == [5, 6, 9]
    assert propose_ngram(tokens, k=10, min_n=2, max_n=3) == [5, 6, 9, 9, 2, 3, 4]


def test_longest_suffix_wins_then_the_latest_occurrence() -> None:
    # "3 4" occurs twice; "2 3 4" only once, early: the longer match is taken.
    tokens = [2, 3, 4, 7, 0, 3, 4, 8, 2, 3, 4]
    assert propose_ngram(tokens, k=1, min_n=2, max_n=3) == [7]
    # With max_n 2, both "3 4" match; the latest is followed by 8.
    assert propose_ngram(tokens, k=1, min_n=2, max_n=2) == [8]


def test_no_draft_below_min_n_or_without_tokens_to_copy() -> None:
    assert propose_ngram([1, 2, 3, 4, 3], k=4, min_n=2, max_n=4) == []
    assert propose_ngram([1, 2, 3, 4, 3], k=4, min_n=1, max_n=4) == [4, 3]
    assert propose_ngram([5], k=4, min_n=1, max_n=4) == []
    assert propose_ngram([5, 5], k=4, min_n=1, max_n=1) == [5]
    assert propose_ngram([1, 2, 1, 2], k=0, min_n=1, max_n=2) == []


@pytest.mark.parametrize("seed", range(30))
def test_matches_the_definition_on_random_sequences(seed: int) -> None:
    import random

    rng = random.Random(seed)
    tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
    for min_n, max_n in [(1, 1), (1, 3), (2, 5), (3, 3)]:
        assert propose_ngram(tokens, 5, min_n, max_n) == naive(tokens, 5, min_n, max_n)
