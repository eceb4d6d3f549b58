"""bfloat16, with and without int4 projections, against float32: the same tokens?

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


# (dtype, quantization); float32 is the reference.
CONFIGS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "auto")]


def main() -> None:
    from pagoda.engine.llm import LLM
    from pagoda.model.attention import AttentionMetadata
    from pagoda.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    runs, logits = {}, {}
    for config in CONFIGS:
        dtype, quantization = config
        llm = LLM(dtype=dtype, quantization=quantization, kv_cache_memory=128 << 20)
        # One prompt at a time, so that decoding runs at batch size 1 (the int4 path).
        runs[config] = [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]
        model, rows = llm.engine.runner.model, []
        for prompt in PROMPTS:
            # The prompt but its last token, then that token alone, as decoding computes it.
            ids = llm.tokenizer.encode(prompt)
            n = len(ids) - 1
            with torch.inference_mode():
                for computed, new in ((0, ids[:n]), (n, ids[n:])):
                    attn, positions = AttentionMetadata.build(
                        [computed], [len(new)], [list(range(8))], 16
                    )
                    out = model.compute_logits(model(torch.tensor(new), positions, attn)[-1:])
            rows.append(out)
        logits[config] = torch.cat(rows)

    reference = CONFIGS[0]
    results = []
    for config in CONFIGS[1:]:
        same = sum(a == b for a, b in zip(runs[reference], runs[config]))
        agreeing = total = 0
        for a, b in zip(runs[reference], runs[config]):
            first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            agreeing += first_diff
            total += len(a)
        result = {
            "dtype": config[0],
            "quantization": config[1],
            "prompts": len(PROMPTS),
            "identical_continuations": same,
            "positions_before_first_divergence": agreeing / total,
            "max_abs_logit_diff": float((logits[reference] - logits[config]).abs().max()),
            "logit_scale": float(logits[reference].abs().max()),
            "same_next_token": int(
                (logits[reference].argmax(-1) == logits[config].argmax(-1)).sum()
            ),
        }
        print(
            f"{config[0]}, quantization {config[1]} vs float32: {same}/{len(PROMPTS)} identical "
            f"32-token continuations, {result['positions_before_first_divergence']:.0%} of "
            f"positions before the first divergence, next token equal on "
            f"{result['same_next_token']}/{len(PROMPTS)}, max logit difference "
            f"{result['max_abs_logit_diff']:.3f} (logits up to {result['logit_scale']:.1f})"
        )
        results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
