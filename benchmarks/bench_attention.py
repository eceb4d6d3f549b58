"""Decode attention over the paged KV cache: the C++ kernel on the default model's shapes.

    .venv/bin/python benchmarks/bench_attention.py [--seqs 32] [--context 330] [--window W]
        [--tokens T]

Times one decode step's attention (one query token per sequence, 30 layers, the
default model's 9 query and 3 KV heads of 64) with each sequence's blocks laid out
two ways: contiguous, as a fresh server hands them out, and scattered at random
over the cache, as they are after the free queue has cycled for a while. Prints
the median over 20 steps and the rate at which the keys and values were read.
With --window, each query sees only its last W positions (a local attention
layer), and the same steps are also timed without the window, in turn.
With --tokens T > 1, each sequence brings T consecutive query tokens ending at the
context's last position, as a step that verifies T - 1 draft tokens does; paged_attention
gives such runs to the prompt kernel, and so does this benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagoda import kernels
from pagoda.model.kv_memory import allocate_kv_cache

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 30, 9, 3, 64, 16, 1456


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--context", type=int, default=330)
    parser.add_argument("--window", type=int, default=None, help="a sliding window (positions)")
    parser.add_argument("--tokens", type=int, default=1, help="query tokens per sequence")
    args = parser.parse_args()
    if not kernels.load():
        raise SystemExit("the C++ kernels are not built: python -m pagoda.kernels")
    torch.manual_seed(0)
    per_seq = -(-args.context // BLOCK_SIZE)
    num_blocks = max(NUM_BLOCKS, args.seqs * per_seq)
    caches = allocate_kv_cache(
        LAYERS, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cpu")
    )
    for k, v in caches:
        k.normal_()
        v.normal_()
    tokens = args.tokens
    q = torch.randn(args.seqs * tokens, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    token_seq = torch.arange(args.seqs).repeat_interleave(tokens)
    positions = (args.context - tokens + torch.arange(tokens)).repeat(args.seqs)
    attention = (
        torch.ops.pagoda.paged_attention if tokens == 1 else torch.ops.pagoda.prompt_attention
    )
    layouts = {
        "contiguous": torch.arange(args.seqs * per_seq),
        "scattered": torch.randperm(num_blocks)[: args.seqs * per_seq],
    }
    windows = [None] if args.window is None else [args.window, None]
    for name, blocks in layouts.items():
        tables = blocks.view(args.seqs, per_seq).contiguous()
        times: dict[int | None, list[float]] = {w: [] for w in windows}
        for i in range(23):
            for window in windows:  # in turn, so that both see the same machine
                start = time.perf_counter()
                for k, v in caches:
                    attention(q, k, v, tables, token_seq, positions, 0.125, window)
                if i >= 3:  # warm-up
                    times[window].append(time.perf_counter() - start)
        for window in windows:
            step = statistics.median(times[window])
            seen = min(args.context, window or args.context)
            kv_bytes = args.seqs * seen * KV_HEADS * HEAD_DIM * 2 * 2 * LAYERS
            label = f"{name}, window {window}" if window else name
            print(
                f"{label:>22}: {step * 1e3:.2f} ms a step ({step / LAYERS * 1e6:.0f} us a "
                f"layer), keys and values read at {kv_bytes / step / 1e9:.1f} GB/s"
            )


if __name__ == "__main__":
    main()
