"""At temperature 1 the tokens verified against drafts come from the model's distribution.

A tiny random model, a prompt whose end repeats its start (so that the prompt's own
step already carries drafts), thousands of seeds: the first token's counts and, where
the first draft was accepted, the second token's counts pass a chi-square test against
the model's probabilities computed by transformers. A logit bias towards the drafts
makes acceptance common enough to count the second token.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_hf_model

from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [10, 11, 12, 13, 10, 11]  # "10 11" again: the drafts are 12 13 10
BIAS = {12: 4.0, 13: 4.0, 10: 4.0}
NUM_SEEDS = 6000


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, critical value at p = 0.001); bins expected below 5 are pooled."""
    n = int(counts.sum())
    expected = probs * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)]).double()
    expected = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)]).double()
    if expected[-1] < 5:  # too little to pool: fold it into the largest bin
        observed[0] += observed[-1]
        expected[0] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    z = 3.09  # the standard normal's 0.999 quantile; Wilson-Hilferty for chi-square's
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def reference_probs(tokens: list[int]) -> torch.Tensor:
    model = make_hf_model("llama").eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].double()
    for t, b in BIAS.items():
        logits[t] += b
    return logits.softmax(-1)


def test_tokens_after_drafts_follow_the_model_distribution(tiny_model_dir) -> None:
    # Every request drafts in every step: the 6000 form one batch, above the default
    # disable_by_batch_size, and the acceptance cut would stop the unlucky ones.
    spec = SpeculativeConfig(
        num_speculative_tokens=3,
        prompt_lookup_min=2,
        prompt_lookup_max=2,
        disable_by_batch_size=None,
        min_acceptance_rate=0.0,
    )
    llm = LLM(str(tiny_model_dir()), dtype="float32", speculative_config=spec)
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=4, logit_bias=BIAS)
        for s in range(NUM_SEEDS)
    ]
    outputs = llm.generate([PROMPT] * NUM_SEEDS, params, use_tqdm=False)
    samples = [o.outputs[0].token_ids for o in outputs]
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_drafts >= NUM_SEEDS and stats.num_accepted_tokens > NUM_SEEDS // 10

    first = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=256)
    stat, critical = chi_square_ok(first, reference_probs(PROMPT))
    assert stat < critical, f"first token: chi-square {stat:.1f} >= {critical:.1f}"

    second = torch.bincount(torch.tensor([s[1] for s in samples if s[0] == 12]), minlength=256)
    assert second.sum() > 500  # the first draft was accepted this often
    stat, critical = chi_square_ok(second, reference_probs(PROMPT + [12]))
    assert stat < critical, f"second token: chi-square {stat:.1f} >= {critical:.1f}"

    # The same seeds without drafts: the same tokens, one decode step each.
    llm.engine.scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=4096),
        CacheConfig(),
        llm.engine.runner.num_blocks,
        llm.max_model_len,
    )
    without = llm.generate([PROMPT] * NUM_SEEDS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in without] == samples
