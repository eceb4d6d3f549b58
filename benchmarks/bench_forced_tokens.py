"""Decode steps that forced tokens save on the structured workload, and what they cost.

    .venv/bin/python benchmarks/bench_forced_tokens.py [MODEL]

Runs each request of `pagoda bench serve --dataset-name structured` (chat prompts, each
with its JSON schema) alone and greedily through the offline engine, once with forced
tokens (the grammar's only allowed token appended and computed in the next step's chunk)
and once without, and counts the outputs that differ: in float32 (the default) none do;
in bfloat16 a chunk of tokens and the same tokens decoded one by one round differently,
so a near tie between two tokens may go either way. Prints the engine steps each way, the
share of steps saved, the time spent in steps, and one JSON record. Alone, a request
takes one step per token it decodes, so the saved share is the share of output tokens
that were forced.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

from pagoda.config import StructuredOutputsConfig
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams


def run(llm: LLM, items: list[dict]) -> tuple[list[list[int]], int, float]:
    """Each item alone: (output token ids, engine steps, seconds), after one warm-up."""
    generate_one(llm, items[0])
    outputs, steps, seconds = [], 0, 0.0
    for item in items:
        before, start = llm.engine.scheduler.num_steps, time.perf_counter()
        outputs.append(generate_one(llm, item))
        steps += llm.engine.scheduler.num_steps - before
        seconds += time.perf_counter() - start
    return outputs, steps, seconds


def generate_one(llm: LLM, item: dict) -> list[int]:
    params = SamplingParams(
        temperature=0,
        max_tokens=item["max_tokens"],
        structured_outputs=StructuredOutputsParams(json=item["schema"]),
    )
    (out,) = llm.chat([{"role": "user", "content": item["prompt"]}], params, use_tqdm=False)
    return out.outputs[0].token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    text = resources.files("pagoda.bench").joinpath("structured.jsonl").read_text()
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    results = {}
    for forced in (True, False):
        config = StructuredOutputsConfig(forced_tokens=forced)
        llm = LLM(args.model, dtype=args.dtype, structured_outputs_config=config)
        results[forced] = run(llm, items)
    (on_out, on_steps, on_s), (off_out, off_steps, off_s) = results[True], results[False]
    differ = sum(a != b for a, b in zip(on_out, off_out))
    tokens = sum(len(o) for o in on_out)
    record = {
        "dtype": args.dtype,
        "requests": len(items),
        "outputs_that_differ": differ,
        "output_tokens": tokens,
        "steps_forced": on_steps,
        "steps_unforced": off_steps,
        "steps_saved_share": 1 - on_steps / off_steps,
        "seconds_forced": on_s,
        "seconds_unforced": off_s,
    }
    print(
        f"{len(items)} requests, {tokens} output tokens: {on_steps} steps with forced tokens, "
        f"{off_steps} without ({record['steps_saved_share']:.0%} saved); "
        f"{on_s:.2f} s against {off_s:.2f} s; {differ} outputs differ ({args.dtype})"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
