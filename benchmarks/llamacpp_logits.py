"""llama.cpp's logits for given token ids, for bench_accuracy.py (run by llama-cpp-python's Python).

    PYTHON benchmarks/llamacpp_logits.py MODEL.gguf IN.json OUT.npz

IN.json holds {"sequences": [[ids]], "prompts": [[ids]], "new_tokens": n}. OUT.npz gets, in
float32: "sequence_i", the logits at every position of sequence i evaluated as one batch (as a
prompt is); "next", the last position's logits of each prompt, its last token evaluated alone
after the rest (as decoding computes it); and "continuation_i", n greedy tokens after prompt i.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    model, inputs, out = sys.argv[1:4]
    spec = json.loads(open(inputs).read())
    longest = max(len(s) for s in spec["sequences"] + spec["prompts"]) + spec["new_tokens"]
    llm = Llama(
        model_path=model, n_ctx=longest + 8, n_batch=longest + 8, logits_all=True, verbose=False
    )
    arrays: dict[str, np.ndarray] = {}
    for i, ids in enumerate(spec["sequences"]):
        llm.reset()
        llm.eval(ids)
        arrays[f"sequence_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    nexts = []
    for i, ids in enumerate(spec["prompts"]):
        llm.reset()
        llm.eval(ids[:-1])
        llm.eval(ids[-1:])
        nexts.append(np.array(llm.scores[len(ids) - 1], dtype=np.float32))
        tokens, n = [], len(ids)
        for _ in range(spec["new_tokens"]):
            token = int(np.argmax(llm.scores[n - 1]))
            tokens.append(token)
            llm.eval([token])
            n += 1
        arrays[f"continuation_{i}"] = np.array(tokens, dtype=np.int64)
    arrays["next"] = np.stack(nexts)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
