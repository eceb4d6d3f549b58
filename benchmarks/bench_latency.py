"""Single-sequence latency of the default model: load, prefill, decode, and the bandwidth bound.

    .venv/bin/python benchmarks/bench_latency.py [--dtype float32 bfloat16] [--model PATH]

Prints one summary line per dtype and a JSON record. Prefill is a 512-token
prompt generating one token; decode is the extra time of 128 more tokens. The
bound is the time to read, once per decoded token, the weight bytes a
one-sequence step uses (the GGUF file's blocks where the model keeps them) at
the copy bandwidth measured here (bytes read plus bytes written by a 1 GiB copy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import psutil
import torch


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bandwidth of a large tensor copy, counting bytes read and written (as STREAM does)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: each projection in the form a single row uses
    (the file's blocks or their repacked form where it has them), the output layer likewise,
    the norms; the
    embedding table contributes one row."""
    from pagoda.model.layers.linear import Linear

    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            total += (
                sum(w.blocks.nbytes for w in module.gguf)
                + sum(w.data.nbytes for w in getattr(module, "repacked", ()))
                or module.weight.nbytes
            )
            total += module.bias.nbytes if module.bias is not None else 0
    for name, p in model.named_parameters():
        if "norm" in name:
            total += p.nbytes
    output = model.output_gguf
    total += output.blocks.nbytes if output is not None else model.output_weight().nbytes
    return total


def measure(model: str | None, dtype: str, seed: int = 0) -> dict:
    from pagoda.engine.llm import LLM
    from pagoda.sampling_params import SamplingParams

    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, kv_cache_memory=64 << 20)
    load_s = time.perf_counter() - start
    rss_after = psutil.Process().memory_info().rss
    weight_bytes = decode_bytes(llm.engine.runner.model)

    rng = random.Random(seed)
    vocab = llm.tokenizer.vocab_size

    def prompt() -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(512)]

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([prompt()], params, use_tqdm=False)
        return time.perf_counter() - t

    timed(8)  # warm-up
    prefill_s = min(timed(1) for _ in range(3))
    decode_s = min(timed(129) for _ in range(2)) - prefill_s
    return {
        "dtype": dtype,
        "load_s": load_s,
        "rss_mib": rss_after / 2**20,
        "rss_added_by_load_mib": (rss_after - rss_before) / 2**20,
        "decode_read_mib": weight_bytes / 2**20,
        "prefill_tokens_per_s": 512 / prefill_s,
        "decode_tokens_per_s": 128 / decode_s,
        "decode_ms_per_token": decode_s / 128 * 1000,
        "weight_bytes": weight_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    bandwidth = copy_bandwidth_gbs()
    results = []
    for dtype in args.dtype:
        r = measure(args.model, dtype)
        r["copy_bandwidth_gbs"] = bandwidth
        r["decode_bound_tokens_per_s"] = bandwidth * 1e9 / r["weight_bytes"]
        r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["decode_bound_tokens_per_s"]
        results.append(r)
        print(
            f"{dtype}: load {r['load_s']:.2f} s, RSS {r['rss_mib']:.0f} MiB, "
            f"prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
            f"decode {r['decode_tokens_per_s']:.1f} tok/s ({r['decode_ms_per_token']:.1f} ms), "
            f"bound {r['decode_bound_tokens_per_s']:.0f} tok/s at {bandwidth:.1f} GB/s "
            f"({r['fraction_of_bound']:.0%} of it)"
        )
    print(
        json.dumps({"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "results": results})
    )


if __name__ == "__main__":
    main()
