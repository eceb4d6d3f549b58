"""N-gram prompt lookup: draft tokens copied from earlier in the sequence itself.

An output that quotes its prompt (extracting fields, fixing code, rewriting JSON)
repeats runs of tokens that are already there. When the last n tokens occurred
before, the tokens that followed them then are a good guess for what follows now:

    tokens:  ... a b c d e f ... x a b c |
                   ^^^^^ match   ^^^^^ suffix (n = 3)
    draft:         d e f ...  (up to k tokens, never past the end)

The longest suffix from max_n down to min_n is looked up; of its occurrences,
the most recent is taken (the nearest copy is the likeliest one being repeated).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens after the latest earlier occurrence of the longest matching
    suffix of min_n..max_n tokens; [] when no suffix of min_n tokens occurred before."""
    num = len(token_ids)
    if k <= 0 or num <= min_n:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    # ends: positions j before the last token where a match of the suffix ends (t[j] == t[-1]).
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    matched = 1
    while ends.size and matched < max_n:
        # Extend every candidate one token to the left; keep those that still match.
        n = matched + 1
        if n > num - 1:
            break
        ok = ends >= n - 1
        ok[ok] = tokens[ends[ok] - (n - 1)] == tokens[num - n]
        if not ok.any():
            break
        ends, matched = ends[ok], n
    if not ends.size or matched < min_n:
        return []
    start = int(ends[-1]) + 1
    return tokens[start : start + k].tolist()
