"""Where the engine's memory grows under load: KV cache written, glibc's heap, the rest.

    .venv/bin/python benchmarks/engine_memory.py FILE.gguf [--concurrency 32] [--glibc-defaults]

Runs the engine in-process (`LLM`, with the server's token budget and, unless
--glibc-defaults, the malloc settings of the server's engine process) on `concurrency`
prompts of 256 random tokens at once, 128 output tokens each with EOS ignored, and
prints the process's anonymous memory when ready, at its peak and after, beside the KV
cache blocks the load wrote (every block handed out once counts) and glibc's heap
(`mallinfo2`: allocated and free-but-kept bytes). Whatever grows beyond the two is outside
the heap: pymalloc's arenas, other mmaps.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import threading

from serve_memory import MIB, memory  # the same directory, first on sys.path

from pagoda.config import SERVING_MAX_NUM_BATCHED_TOKENS
from pagoda.core.block_pool import KVCacheBlock
from pagoda.engine.core import limit_heap
from pagoda.engine.llm import LLM
from pagoda.model.runner import kv_bytes_per_block
from pagoda.sampling_params import SamplingParams


class Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")
        + ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def heap_mib() -> dict[str, float]:
    """glibc's main and thread heaps: bytes allocated and bytes free but kept, in MiB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return {"allocated": info.uordblks / MIB, "kept_free": info.fordblks / MIB}


def anon_mib() -> float:
    return memory(os.getpid())[0] / MIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--glibc-defaults", action="store_true", help="without the engine process's limit_heap"
    )
    args = parser.parse_args()
    if not args.glibc_defaults:
        limit_heap()

    llm = LLM(args.model, max_num_batched_tokens=SERVING_MAX_NUM_BATCHED_TOKENS)
    pool = llm.engine.scheduler.kv.pool
    runner = llm.engine.runner
    written: set[int] = set()
    get_new_blocks = pool.get_new_blocks

    def recording(n: int) -> list[KVCacheBlock]:
        blocks = get_new_blocks(n)
        written.update(b.block_id for b in blocks)
        return blocks

    pool.get_new_blocks = recording  # type: ignore[method-assign]

    ready_anon, ready_heap = anon_mib(), heap_mib()
    peak = [ready_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], anon_mib())

    threading.Thread(target=sample, daemon=True).start()
    rng = random.Random(0)
    vocab = runner.spec.vocab_size  # ids from 1000 up: no special tokens
    prompts = [[rng.randrange(1000, vocab) for _ in range(256)] for _ in range(args.concurrency)]
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    done.set()

    per_block = kv_bytes_per_block(runner.spec, runner.block_size, runner.kv_cache_dtype)
    after_heap = heap_mib()
    record = {
        "anon_ready_mib": ready_anon,
        "anon_peak_mib": max(peak[0], anon_mib()),
        "anon_after_mib": anon_mib(),
        "kv_written_mib": len(written) * per_block / MIB,
        "kv_blocks_written": len(written),
        "heap_ready_mib": ready_heap,
        "heap_after_mib": after_heap,
    }
    growth = record["anon_after_mib"] - ready_anon
    heap_growth = sum(after_heap.values()) - sum(ready_heap.values())
    print(
        f"anonymous: ready {ready_anon:.0f}, peak {record['anon_peak_mib']:.0f}, "
        f"after {record['anon_after_mib']:.0f} MiB (+{growth:.0f}): KV cache written "
        f"{record['kv_written_mib']:.0f} ({len(written)} blocks), heap +{heap_growth:.0f} "
        f"(allocated {after_heap['allocated'] - ready_heap['allocated']:+.0f}, kept free "
        f"{after_heap['kept_free'] - ready_heap['kept_free']:+.0f}), other "
        f"{growth - record['kv_written_mib'] - heap_growth:+.0f}"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
