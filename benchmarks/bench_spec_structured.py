"""N-gram speculation on constrained requests whose answers copy their prompt.

    .venv/bin/python benchmarks/bench_spec_structured.py [MODEL] [--num 8]

Each chat prompt holds a JSON record and asks for it back; the answer follows the record's
JSON schema (response_format json_schema). Every request runs alone and greedily through
the offline engine, speculation off and then on (k=4, lookup 2-4): prints the time per
output token after the first (the decode steps), the engine steps, the drafted and
accepted tokens, the outputs that differ, and one JSON record.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import msgspec

from pagoda.config import SpeculativeConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4)
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "zip"],
        },
    },
    "required": ["id", "name", "email", "city", "tags", "address"],
}
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov"]
CITIES = ["London", "Manchester", "Arlington", "Rotterdam", "Boston", "Zurich"]
TAGS = ["compilers", "logic", "networks", "databases", "graphics", "security", "theory"]
STREETS = ["Baker Street", "Canal Road", "Harbour Lane", "Mill Street", "Oak Avenue"]


def records(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        name = rng.choice(NAMES)
        out.append(
            {
                "id": rng.randrange(1000, 99999),
                "name": name,
                "email": name.lower().replace(" ", ".") + "@example.org",
                "city": rng.choice(CITIES),
                "tags": rng.sample(TAGS, 3),
                "address": {
                    "street": f"{rng.randrange(1, 300)} {rng.choice(STREETS)}",
                    "zip": f"{rng.randrange(10000, 99999)}",
                },
            }
        )
    return out


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> dict:
    """Each prompt alone: outputs, decode seconds per token after the first, steps.

    Each prompt is prefilled once first, so that its timed run and its timed prefill
    (max_tokens 1, subtracted) both find it in the prefix cache."""
    first_only = msgspec.structs.replace(params, max_tokens=1)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    scheduler = llm.engine.scheduler
    stats = scheduler.spec_stats
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    outputs, decode_s, decode_tokens, steps = [], 0.0, 0, 0
    for prompt in prompts:
        llm.generate([prompt], first_only, use_tqdm=False)
        start, steps0 = time.perf_counter(), scheduler.num_steps
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        total = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate([prompt], first_only, use_tqdm=False)
        prefill = time.perf_counter() - start
        tokens = out.outputs[0].token_ids
        outputs.append(tokens)
        decode_s += total - prefill
        decode_tokens += len(tokens) - 1
        steps += scheduler.num_steps - steps0
    return {
        "outputs": outputs,
        "tpot_ms": 1000 * decode_s / decode_tokens,
        "steps": steps,
        "tokens": sum(len(t) for t in outputs),
        "drafted": stats.num_draft_tokens - drafted,
        "accepted": stats.num_accepted_tokens - accepted,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    llm = LLM(args.model, dtype=args.dtype, speculative_config=SPEC)
    tok = llm.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Copy this JSON record exactly.\n{json.dumps(r)}"}]
        )
        for r in records(args.num, args.seed)
    ]
    params = SamplingParams(
        temperature=0,
        max_tokens=160,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    result = {}
    for mode, spec in (("off", None), ("on", SPEC)):
        old = llm.engine.scheduler
        llm.engine.scheduler = Scheduler(
            llm.config.scheduler,
            llm.config.cache,
            llm.engine.runner.num_blocks,
            old.max_model_len,
            forced_tokens=old.forced_tokens,
            speculative=spec,
        )
        result[mode] = run(llm, prompts, params)
    off, on = result["off"], result["on"]
    differ = sum(a != b for a, b in zip(off["outputs"], on["outputs"]))
    print(
        f"{len(prompts)} requests, {on['tokens']} output tokens: TPOT {off['tpot_ms']:.2f} ms "
        f"off, {on['tpot_ms']:.2f} ms on ({on['tpot_ms'] / off['tpot_ms']:.2f}x); steps "
        f"{off['steps']} / {on['steps']}; drafted {on['drafted']}, accepted {on['accepted']} "
        f"({on['accepted'] / max(on['drafted'], 1):.0%}); {differ} outputs differ ({args.dtype})"
    )
    for r in result.values():
        r.pop("outputs")
    print(json.dumps({"dtype": args.dtype, "num": len(prompts), **result, "differ": differ}))


if __name__ == "__main__":
    main()
