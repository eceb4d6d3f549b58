"""What verifying draft tokens costs a decode step, by batch size: where speculation pays.

    .venv/bin/python benchmarks/bench_verify_cost.py [--batch 1 2 4 8 16 32] [--k 4]

For each batch size, B requests of 256 random prompt tokens decode 32 tokens each,
once as plain decode steps and once with k draft tokens per request every step
(drafts that are always rejected, so every step verifies k tokens and keeps one).
The ratio of the two mean step times is what a step with drafts must save: with
mean acceptance length L (tokens kept per step), speculation pays where L > ratio.
Default model, the serving dtype, one process, warm-up first.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import pagoda.core.scheduler as scheduler_module
from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams


def mean_step_ms(llm: LLM, batch: int, k: int, seed: int) -> float:
    """Mean time of the decode steps of `batch` requests (prefill steps excluded)."""
    engine = llm.engine
    # Drafts at every step: neither the batch size nor the failing drafts switch them off.
    spec = (
        SpeculativeConfig(
            num_speculative_tokens=k, disable_by_batch_size=None, min_acceptance_rate=0.0
        )
        if k
        else None
    )
    engine.scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8192),
        CacheConfig(enable_prefix_caching=False),
        engine.runner.num_blocks,
        engine.max_model_len,
        speculative=spec,
    )
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for _ in range(batch):
        llm.add_request([rng.randrange(100, 40000) for _ in range(256)], params)
    times = []
    while engine.has_work:
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        llm.processor.process_outputs(outputs.outputs)
    # Not the prompts' step; not the last ones, where max_tokens leaves room for fewer drafts.
    decode = times[1:-k] if k else times[1:]
    return 1000 * sum(decode) / len(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    # Drafts that the model never agrees with: k tokens past the vocabulary's common part.
    scheduler_module.propose_ngram = lambda tokens, k, lo, hi: [49000 + i for i in range(k)]
    llm = LLM(dtype=args.dtype)
    mean_step_ms(llm, 2, args.k, seed=0)  # warm-up
    results = {}
    for b in args.batch:
        plain = mean_step_ms(llm, b, 0, seed=b)
        drafted = mean_step_ms(llm, b, args.k, seed=b)
        results[b] = {"plain_ms": plain, "drafted_ms": drafted, "ratio": drafted / plain}
        print(
            f"batch {b:3d}: decode step {plain:6.1f} ms, with {args.k} drafts each "
            f"{drafted:6.1f} ms, ratio {drafted / plain:.2f}",
            flush=True,
        )
    print(json.dumps({"k": args.k, "dtype": args.dtype, "batches": results}))


if __name__ == "__main__":
    main()
