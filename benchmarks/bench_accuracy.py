"""bfloat16, with each --quantization, against float32: the same tokens?

    .venv/bin/python benchmarks/bench_accuracy.py [--model FILE] [--llama-cpp-python PYTHON]
        [--kv-cache-dtype bfloat16]

--model: a GGUF file or model directory (default: the default model). float32 with
--quantization none computes with the file's weights dequantized exactly, so it is the
reference. --llama-cpp-python: also llama.cpp on the same GGUF file (that interpreter must
have llama-cpp-python, e.g. ../shared/anchors' llamacpp-venv), measured the same way.
--kv-cache-dtype: instead of the configurations below, --dtype auto --quantization auto with
its own KV cache and with this one (bfloat16 under auto's float32 on a CPU without native
bfloat16), both against float32.

Two measurements, one for each path a step can take:

- decoding at batch size 1 (auto's int4 path): greedy continuations of a
  fixed prompt set, the share of prompts whose continuations are identical,
  the share of positions that agree before the first divergence, and the
  largest next-token logit difference on the prompts themselves;
- whole sequences in one step (the bfloat16 path of prompts and large
  batches): float32's own greedy continuations of the 12 first prompts of
  Pagoda's shipped prompt set (128 tokens each), fed back whole, and at every
  position the share where the top token agrees with float32's and the mean
  KL divergence from float32's next-token distribution.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

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


# (dtype, quantization, KV cache dtype); float32 is the reference. gguf keeps no dense copy: a
# small model's prompts then run from the blocks as a big model's do (the int8 GEMM for the
# k-quants).
CONFIGS = [
    ("float32", "none", "auto"),
    ("bfloat16", "none", "auto"),
    ("bfloat16", "auto", "auto"),
    ("bfloat16", "gguf", "auto"),
]


def sequence_logits(llm, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits at every position of each sequence, run as one prompt step."""
    from pagoda.model.attention_metadata import AttentionMetadata

    model, out = llm.engine.runner.model, []
    with torch.inference_mode():
        for ids in sequences:
            blocks = list(range(-(-len(ids) // 16)))
            attn, positions = AttentionMetadata.build([0], [len(ids)], [blocks], 16)
            out.append(model.compute_logits(model(torch.tensor(ids), positions, attn)).float())
    return out


def whole_sequence_agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    want, got = torch.cat(reference), torch.cat(other)
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    return {
        "sequence_positions": len(want),
        "sequence_top1_agreement": float((want.argmax(-1) == got.argmax(-1)).float().mean()),
        "sequence_mean_kl": float(kl.mean()),
    }


def llama_cpp_run(
    python: str, model: str, sequences: list[list[int]], prompts: list[list[int]], new_tokens: int
) -> tuple[list[list[int]], torch.Tensor, list[torch.Tensor]]:
    """llama.cpp's greedy continuations, next-token logits and whole-sequence logits."""
    import numpy as np

    script = Path(__file__).with_name("llamacpp_logits.py")
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"sequences": sequences, "prompts": prompts, "new_tokens": new_tokens}
        (Path(tmp) / "in.json").write_text(json.dumps(spec))
        out = Path(tmp) / "out.npz"
        subprocess.run([python, str(script), model, f"{tmp}/in.json", str(out)], check=True)
        arrays = np.load(out)
        continuations = [arrays[f"continuation_{i}"].tolist() for i in range(len(prompts))]
        whole = [torch.from_numpy(arrays[f"sequence_{i}"]) for i in range(len(sequences))]
        return continuations, torch.from_numpy(arrays["next"]), whole


def main() -> None:
    from pagoda.engine.llm import LLM
    from pagoda.model.attention_metadata import AttentionMetadata
    from pagoda.sampling_params import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file or model directory")
    parser.add_argument("--llama-cpp-python", default=None, help="measure llama.cpp too")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16"])
    args = parser.parse_args()
    configs = CONFIGS
    if args.kv_cache_dtype:
        configs = [CONFIGS[0], ("auto", "auto", "auto"), ("auto", "auto", args.kv_cache_dtype)]

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    runs, logits, sequence_runs = {}, {}, {}
    sequences: list[list[int]] = []
    prompt_ids: list[list[int]] = []
    for config in configs:
        dtype, quantization, kv_cache_dtype = config
        llm = LLM(
            args.model,
            dtype=dtype,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_memory=128 << 20,
        )
        if not sequences:  # float32 writes the texts that every configuration reads
            lines = resources.files("pagoda.bench").joinpath("prompts.jsonl").read_text()
            texts = [json.loads(line)["prompt"] for line in lines.splitlines()[:12]]
            long = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
            outputs = llm.generate(texts, long)
            sequences = [
                llm.tokenizer.encode(t) + o.outputs[0].token_ids for t, o in zip(texts, outputs)
            ]
        sequence_runs[config] = sequence_logits(llm, sequences)
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
            if config == configs[0]:
                prompt_ids.append(ids)
        logits[config] = torch.cat(rows)

    reference, configs = configs[0], configs[1:]
    if args.llama_cpp_python:
        if args.model is None or not args.model.endswith(".gguf"):
            parser.error("--llama-cpp-python needs --model FILE.gguf")
        llama = ("llama.cpp", "file types", "float16")
        runs[llama], logits[llama], sequence_runs[llama] = llama_cpp_run(
            args.llama_cpp_python, args.model, sequences, prompt_ids, params.max_tokens
        )
        configs.append(llama)
    results = []
    for config in configs:
        same = sum(a == b for a, b in zip(runs[reference], runs[config]))
        agreeing = total = 0
        for a, b in zip(runs[reference], runs[config]):
            first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            agreeing += first_diff
            total += len(a)
        result = {
            "dtype": config[0],
            "quantization": config[1],
            "kv_cache_dtype": config[2],
            "prompts": len(PROMPTS),
            "identical_continuations": same,
            "positions_before_first_divergence": agreeing / total,
            "max_abs_logit_diff": float((logits[reference] - logits[config]).abs().max()),
            "logit_scale": float(logits[reference].abs().max()),
            "same_next_token": int(
                (logits[reference].argmax(-1) == logits[config].argmax(-1)).sum()
            ),
            **whole_sequence_agreement(sequence_runs[reference], sequence_runs[config]),
        }
        print(
            f"{config[0]}, quantization {config[1]}, KV cache {config[2]} vs float32: "
            f"{same}/{len(PROMPTS)} identical "
            f"32-token continuations, {result['positions_before_first_divergence']:.0%} of "
            f"positions before the first divergence, next token equal on "
            f"{result['same_next_token']}/{len(PROMPTS)}, max logit difference "
            f"{result['max_abs_logit_diff']:.3f} (logits up to {result['logit_scale']:.1f}); "
            f"whole sequences: top token equal at {result['sequence_top1_agreement']:.2%} of "
            f"{result['sequence_positions']} positions, mean KL {result['sequence_mean_kl']:.4f}"
        )
        results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
