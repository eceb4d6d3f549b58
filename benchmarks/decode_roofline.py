"""The decode roofline of model files: weight bytes a one-sequence step reads ÷ memory bandwidth.

    .venv/bin/python benchmarks/decode_roofline.py FILE.gguf|HF_DIR ...

A decode step of one sequence reads every projection once, the output layer once (the
embedding table, when tied) and one row of the embedding table; so its bytes are those of the
file's 2-D weights as stored, less the embedding table when the output layer is its own tensor.
The bandwidth is that of a 1 GiB tensor copy with 2 threads, bytes read plus bytes written (as
bench_latency.py measures it), best of 5, measured 3 times; the bound uses the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_latency import copy_bandwidth_gbs


def gguf_decode_bytes(path: Path) -> dict[str, int]:
    """Bytes per tensor type that one decode step reads from a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # one row of it per step
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return by_type


def safetensors_decode_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes per dtype that one decode step reads from a Hugging Face directory."""
    from safetensors import safe_open

    by_type: dict[str, int] = {}
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[name] = f.get_slice(name)
    for name, s in tensors.items():
        if name == "model.embed_tokens.weight" and "lm_head.weight" in tensors:
            continue
        dtype = s.get_dtype()
        size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
        numel = 1
        for d in s.get_shape():
            numel *= d
        by_type[dtype] = by_type.get(dtype, 0) + numel * size
    return by_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bandwidths = [copy_bandwidth_gbs() for _ in range(3)]
    bandwidth = statistics.median(bandwidths)
    print(f"copy bandwidth, 2 threads: {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s")
    records = []
    for path in args.models:
        by_type = gguf_decode_bytes(path) if path.is_file() else safetensors_decode_bytes(path)
        total = sum(by_type.values())
        bound = bandwidth * 1e9 / total
        records.append({"model": str(path), "bytes": by_type, "total": total, "bound_tok_s": bound})
        print(
            f"{path}: {total / 2**20:.0f} MiB a step "
            f"({', '.join(f'{k} {v / 2**20:.0f}' for k, v in by_type.items())}) -> "
            f"bound {bound:.1f} tok/s, {1000 / bound:.1f} ms a token at {bandwidth:.1f} GB/s"
        )
    print(json.dumps({"bandwidth_gbs": bandwidths, "models": records}))


if __name__ == "__main__":
    main()
