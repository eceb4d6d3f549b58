"""`pagoda bench throughput`: offline generation speed, in the manner of `vllm bench throughput`.

Random token prompts of a fixed length, a fixed number of output tokens each
(EOS ignored), all submitted at once to the offline LLM; one summary line and
a JSON record.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pagoda.cli import at_least

    p.add_argument("--model", default=None, help="model directory or GGUF (default: SmolLM2)")
    p.add_argument("--input-len", type=at_least(1), default=256)
    p.add_argument("--output-len", type=at_least(1), default=128)
    p.add_argument("--num-prompts", type=at_least(1), default=64)
    p.add_argument("--output-json", default=None, help="write the result here too")
    # The engine's own flags (--dtype, --seed, ...) are those of `pagoda serve`.


def random_prompts(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly, away from the first few (often special) ids."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


def main(args: argparse.Namespace) -> int:
    from pagoda.cli import speculative_config_of, structured_outputs_config_of
    from pagoda.engine.llm import LLM
    from pagoda.sampling_params import SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        device=args.device,
        structured_outputs_config=structured_outputs_config_of(args),
        speculative_config=speculative_config_of(args),
    )
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    vocab = llm.tokenizer.vocab_size
    # Warm-up with other prompts, so that the timed run meets no cached prefix.
    llm.generate(
        random_prompts(vocab, 4, args.input_len, args.seed + 1),
        SamplingParams(max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    prompts = random_prompts(vocab, args.num_prompts, args.input_len, args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(p) for p in prompts)
    result = {
        "elapsed_s": elapsed,
        "num_requests": len(prompts),
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "dtype": str(llm.engine.runner.dtype),
    }
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, "
        f"{result['total_tokens_per_s']:.2f} total tokens/s, "
        f"{result['output_tokens_per_s']:.2f} output tokens/s"
    )
    print(json.dumps(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
