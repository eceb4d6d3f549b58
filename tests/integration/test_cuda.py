"""The same engine on a CUDA device: tokens and logprobs as on the CPU, and a real server.

Skipped where torch sees no GPU (CI has none); on a GPU machine:
`python -m pytest tests/integration/test_cuda.py`.
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from tiny_models import VARIANTS

from pagoda.engine.llm import LLM
from pagoda.outputs import CompletionOutput
from pagoda.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS: list[str | list[int]] = [
    [5, 17, 42, 99, 3],
    list(range(30, 90)),
    [7] * 40,
    list(range(200, 256)),
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)


def generate(variant: str, tiny_model_dir, device: str, dtype: str) -> list[CompletionOutput]:
    llm = LLM(str(tiny_model_dir(variant)), device=device, dtype=dtype, kv_cache_memory=64 << 20)
    return [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_and_logprobs_match_cpu(variant: str, tiny_model_dir) -> None:
    cpu = generate(variant, tiny_model_dir, "cpu", "float32")
    gpu = generate(variant, tiny_model_dir, "cuda", "float32")
    for c, g in zip(cpu, gpu):
        assert g.token_ids == c.token_ids
        assert c.logprobs is not None and g.logprobs is not None
        for lc, lg in zip(c.logprobs, g.logprobs):
            assert lc.keys() == lg.keys()
            for token in lc:
                assert math.isclose(lc[token][0], lg[token][0], abs_tol=1e-3)


def test_bfloat16_is_deterministic(tiny_model_dir) -> None:
    first = [o.token_ids for o in generate("llama", tiny_model_dir, "cuda", "bfloat16")]
    second = [o.token_ids for o in generate("llama", tiny_model_dir, "cuda", "bfloat16")]
    assert first == second
    assert all(len(t) == 16 for t in first)


def test_serve_on_cuda(start_server, tiny_model_dir) -> None:
    server = start_server(str(tiny_model_dir("llama")), "--device", "cuda")
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) > 2
