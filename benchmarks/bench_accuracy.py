"""bfloat16 against float32 on the default model: do they choose the same tokens?

    .venv/bin/python benchmarks/bench_accuracy.py

Greedy continuations of a fixed prompt set in both dtypes: the share of
prompts whose continuations are identical, the share of positions that agree
before the first divergence, and the largest next-token logit difference on
the prompts themselves.
"""

from __future__ import annotations

import json

import torch

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The three primary colours are",
    "Translate to French: good morning",
    "In 1969, the first humans",
    "My favourite programming language is Python because",
    "Roses are red, violets are blue,",
    "Explain photosynthesis in one sentence.",
    "A list of fruits: apple, banana,",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "The quick brown fox",
    "Here are three tips for writing clear code:",
]


def main() -> None:
    from pagoda.engine.llm import LLM
    from pagoda.model.attention import AttentionMetadata
    from pagoda.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    runs, logits = {}, {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(dtype=dtype, kv_cache_memory=128 << 20)
        runs[dtype] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        model, rows = llm.engine.runner.model, []
        for prompt in PROMPTS:
            ids = llm.tokenizer.encode(prompt)
            attn, positions = AttentionMetadata.build([0], [len(ids)], [list(range(8))], 16)
            with torch.inference_mode():
                rows.append(model.compute_logits(model(torch.tensor(ids), positions, attn)[-1:]))
        logits[dtype] = torch.cat(rows)
    same = sum(a == b for a, b in zip(runs["float32"], runs["bfloat16"]))
    agreeing = total = 0
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agreeing += first_diff
        total += len(a)
    result = {
        "prompts": len(PROMPTS),
        "identical_continuations": same,
        "positions_before_first_divergence": agreeing / total,
        "max_abs_logit_diff": float((logits["float32"] - logits["bfloat16"]).abs().max()),
        "logit_scale": float(logits["float32"].abs().max()),
        "same_next_token": int(
            (logits["float32"].argmax(-1) == logits["bfloat16"].argmax(-1)).sum()
        ),
    }
    print(
        f"bfloat16 vs float32: {same}/{len(PROMPTS)} identical 32-token continuations, "
        f"{result['positions_before_first_divergence']:.0%} of positions before the first "
        f"divergence, next token equal on {result['same_next_token']}/{len(PROMPTS)}, "
        f"max logit difference {result['max_abs_logit_diff']:.3f} "
        f"(logits up to {result['logit_scale']:.1f})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
