"""Sampler: logits of a batch -> one token per request, vectorized over the batch.

Randomness is counter-based: the uniform number a request draws at a position
is a hash of (request seed, position). The same seed therefore gives the same
tokens whatever else shares the batch, and a preempted request resamples
exactly what it sampled before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagoda.core.request import Request
from pagoda.model.ops.argmax import argmax_rows

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step, as tensors (built by from_requests)."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_p: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B] int64, 0 = all
    min_p: torch.Tensor  # [B]
    seeds: torch.Tensor  # [B] int64 (32-bit values)
    positions: torch.Tensor  # [B] int64: the position of the token being sampled
    all_greedy: bool
    needs_top_k_top_p: bool
    needs_min_p: bool
    # Penalties, only when some row uses one.
    output_counts: torch.Tensor | None  # [B, V] float32 occurrences in the output
    prompt_mask: torch.Tensor | None  # [B, V] bool, token occurs in the prompt
    presence: torch.Tensor | None  # [B]
    frequency: torch.Tensor | None  # [B]
    repetition: torch.Tensor | None  # [B]
    # Sparse edits: logit_bias additions and banned tokens (min_tokens not reached).
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, values
    banned: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids
    # allowed_token_ids: the rows that have them, and which tokens each row allows
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # rows [R], mask [R, V] bool
    # structured outputs: the rows that follow a grammar, and each one's allowed-token bitmask
    grammar: tuple[torch.Tensor, torch.Tensor] | None  # rows [G], bitmask [G, ceil(V/32)] int32
    max_logprobs: int | None  # the most top logprobs any row asked for; None = no row asked
    # logprob_token_ids: (row, the token ids whose logprobs that row wants)
    logprob_token_ids: list[tuple[int, torch.Tensor]]

    @classmethod
    def from_requests(
        cls,
        requests: list[Request],
        vocab_size: int,
        device: torch.device | str,
        drafts: list[list[int]] | None = None,
    ) -> SamplingMetadata:
        """One row per request; with drafts, 1 + len(drafts[i]) rows for request i.

        Row j of a request samples the token after its own tokens and its first j
        drafts: its position, output counts (penalties) and min_tokens bans are those
        the request would have if those drafts were accepted.
        """
        # (request, the drafts taken as its output so far) for each row
        rows: list[tuple[Request, list[int]]] = []
        for i, r in enumerate(requests):
            d = drafts[i] if drafts is not None else []
            rows.extend((r, d[:j]) for j in range(len(d) + 1))
        params = [r.sampling_params for r, _ in rows]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        penalised = [
            p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
            for p in params
        ]
        # Penalties' tensors only when a row uses one (a step of greedy rows makes none).
        counts = prompt_mask = presence = frequency = repetition = None
        if any(penalised):
            presence = column([p.presence_penalty for p in params], torch.float32)
            frequency = column([p.frequency_penalty for p in params], torch.float32)
            repetition = column([p.repetition_penalty for p in params], torch.float32)
            counts = torch.zeros(len(rows), vocab_size, device=device)
            prompt_mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
            for i, (r, extra) in enumerate(rows):
                if penalised[i]:
                    out = torch.tensor(r.output_token_ids + extra, dtype=torch.long, device=device)
                    counts[i].index_add_(0, out, torch.ones(len(out), device=device))
                    prompt_mask[i, torch.tensor(r.prompt_token_ids, device=device)] = True

        bias_rows, bias_ids, bias_vals, ban_rows, ban_ids = [], [], [], [], []
        for i, ((r, extra), p) in enumerate(zip(rows, params)):
            for token_id, value in (p.logit_bias or {}).items():
                bias_rows.append(i)
                bias_ids.append(token_id)
                bias_vals.append(value)
            if r.num_output_tokens + len(extra) < p.min_tokens:
                stops = [*(() if p.ignore_eos else r.eos_token_ids), *(p.stop_token_ids or ())]
                ban_rows.extend([i] * len(stops))
                ban_ids.extend(stops)
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
        allowed = None
        allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
        if allowed_rows:
            mask = torch.zeros(len(allowed_rows), vocab_size, dtype=torch.bool, device=device)
            for j, i in enumerate(allowed_rows):
                mask[j, column(params[i].allowed_token_ids or [], torch.long)] = True
            allowed = (column(allowed_rows, torch.long), mask)
        grammar = None
        grammar_rows: list[int] = []
        masks: list[np.ndarray] = []
        first_row = 0
        for i, r in enumerate(requests):
            d = drafts[i] if drafts is not None else []
            if r.grammar is not None:
                # Each draft row under the grammar's state after the drafts before it.
                grammar_rows.extend(range(first_row, first_row + len(d) + 1))
                masks.append(r.grammar.draft_masks(d) if d else r.grammar.allowed_mask()[None])
            first_row += len(d) + 1
        if grammar_rows:
            bitmask = torch.from_numpy(np.concatenate(masks)).to(device)
            grammar = (column(grammar_rows, torch.long), bitmask)

        return cls(
            temperature=column([p.temperature for p in params], torch.float32),
            top_p=column([p.top_p for p in params], torch.float32),
            top_k=column(top_k, torch.long),
            min_p=column([p.min_p for p in params], torch.float32),
            seeds=column([r.sampling_seed & _MASK32 for r, _ in rows], torch.long),
            positions=column([r.num_tokens + len(extra) for r, extra in rows], torch.long),
            all_greedy=all(p.temperature == 0 for p in params),
            needs_top_k_top_p=any(k > 0 for k in top_k) or any(p.top_p < 1 for p in params),
            needs_min_p=any(p.min_p > 0 for p in params),
            output_counts=counts,
            prompt_mask=prompt_mask,
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            bias=(
                (
                    column(bias_rows, torch.long),
                    column(bias_ids, torch.long),
                    column(bias_vals, torch.float32),
                )
                if bias_rows
                else None
            ),
            banned=(column(ban_rows, torch.long), column(ban_ids, torch.long))
            if ban_rows
            else None,
            allowed=allowed,
            grammar=grammar,
            max_logprobs=max(logprob_counts) if logprob_counts else None,
            logprob_token_ids=[
                (i, column(p.logprob_token_ids, torch.long))
                for i, p in enumerate(params)
                if p.logprob_token_ids and p.logprobs is not None
            ],
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    # When some row asked for logprobs: of the sampled token, its rank, and the top-k.
    sampled_logprobs: torch.Tensor | None = None  # [B]
    sampled_ranks: torch.Tensor | None = None  # [B]
    top_logprobs: torch.Tensor | None = None  # [B, k]
    top_ids: torch.Tensor | None = None  # [B, k]
    # Rows with logprob_token_ids: row -> (logprobs, ranks) of those tokens, in their order.
    asked: dict[int, tuple[list[float], list[int]]] = field(default_factory=dict)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    """Penalties, bias, bans and allowed tokens, then greedy or top-k/top-p/min-p sampling."""
    # logits: [B, V] float32, straight from the model (logprobs are reported from these)
    raw = logits
    if meta.output_counts is not None:
        logits = apply_penalties(logits, meta)  # a new tensor
    edits = (meta.bias, meta.banned, meta.allowed, meta.grammar)
    if any(edit is not None for edit in edits):
        logits = logits.clone() if logits is raw else logits
    if meta.bias is not None:
        rows, ids, values = meta.bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if meta.banned is not None:
        logits[meta.banned] = float("-inf")
    if meta.allowed is not None:
        # After penalties, bias and bans; before temperature and top-k/top-p.
        rows, mask = meta.allowed
        logits[rows] = logits[rows].masked_fill(~mask, float("-inf"))
    if meta.grammar is not None:
        rows, bitmask = meta.grammar
        allowed_by_grammar = unpack_bitmask(bitmask, logits.shape[1])
        logits[rows] = logits[rows].masked_fill(~allowed_by_grammar, float("-inf"))

    greedy = argmax_rows(logits)
    if meta.all_greedy:
        tokens = greedy
    else:
        temperature = torch.where(meta.temperature > 0, meta.temperature, 1.0)
        # Shifted so that each row's largest logit is 0 before dividing: a tiny temperature
        # then sends the others to -inf (never the largest to +inf, which made softmax NaN),
        # and sampling becomes what it tends to as the temperature goes to 0, greedy.
        logits = logits - logits.max(dim=-1, keepdim=True).values
        logits = logits / temperature.unsqueeze(1)
        if meta.needs_top_k_top_p:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        if meta.needs_min_p:
            keep = probs >= meta.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(keep, probs, 0.0)
        # Inverse CDF: the first token whose cumulative probability reaches u.
        cdf = probs.cumsum(dim=-1)
        u = uniform_from(meta.seeds, meta.positions).to(cdf.dtype) * cdf[:, -1]
        sampled = torch.searchsorted(cdf, u.unsqueeze(1)).squeeze(1).clamp_(max=cdf.shape[1] - 1)
        tokens = torch.where(meta.temperature > 0, sampled, greedy)

    out = SamplerOutput(token_ids=tokens)
    if meta.max_logprobs is not None:
        logprobs = raw.log_softmax(dim=-1)
        out.sampled_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        out.sampled_ranks = (logprobs > out.sampled_logprobs.unsqueeze(1)).sum(dim=-1) + 1
        if meta.max_logprobs > 0:
            out.top_logprobs, out.top_ids = logprobs.topk(meta.max_logprobs, dim=-1)
        for row, ids in meta.logprob_token_ids:
            chosen = logprobs[row, ids]  # [n]
            ranks = (logprobs[row].unsqueeze(0) > chosen.unsqueeze(1)).sum(dim=-1) + 1
            out.asked[row] = (chosen.tolist(), ranks.tolist())
    return out


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, vocab_size] bool: bit i of word w is token 32 * w + i."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """vLLM's (and OpenAI's) presence, frequency and repetition penalties."""
    assert meta.output_counts is not None and meta.prompt_mask is not None
    assert meta.repetition is not None and meta.presence is not None
    assert meta.frequency is not None
    counts = meta.output_counts
    seen = meta.prompt_mask | (counts > 0)
    rep = meta.repetition.unsqueeze(1)
    # Repetition: seen tokens' positive logits are divided, negative ones multiplied.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - meta.frequency.unsqueeze(1) * counts
    return logits - meta.presence.unsqueeze(1) * (counts > 0).float()


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Masks (to -inf) what lies outside each row's top-k tokens and top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already reach top_p (the first always stays).
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def uniform_from(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1) per row [B], a pure function of (seed, position).

    splitmix64's finaliser over the pair, in int64: multiplication wraps as unsigned
    arithmetic does, and each right shift is masked so that it acts as a logical one.
    """

    def logical_shift(x: torch.Tensor, n: int) -> torch.Tensor:
        return (x >> n) & ((1 << (64 - n)) - 1)

    h = seeds * _i64(0x9E3779B97F4A7C15) + positions * _i64(0xD1B54A32D192ED03)
    h = (h ^ logical_shift(h, 30)) * _i64(0xBF58476D1CE4E5B9)
    h = (h ^ logical_shift(h, 27)) * _i64(0x94D049BB133111EB)
    h = h ^ logical_shift(h, 31)
    return (logical_shift(h, 11).double() + 0.5) * 2.0**-53


def _i64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value
