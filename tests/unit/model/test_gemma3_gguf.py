"""The real Gemma 3 270M Q4_K_M GGUF: logits against transformers' reading of the same file,
and its greedy continuation of a prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.kv_memory import allocate_kv_cache
from pagoda.model.loader import load_model

pytestmark = pytest.mark.slow

# Both dequantize the same codes to float32; what differs is summation order over 18 layers
# and transformers' float32 reading of the norms the file stores as 1 + w.
ATOL = 2e-3


def test_logits_match_transformers_reading_the_same_file(gemma3_gguf_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf_path.parent), gguf_file=gemma3_gguf_path.name, dtype=torch.float32
    )
    model = load_model(gemma3_gguf_path)
    s = model.spec
    assert s.sliding_window == 512
    num_blocks, block_size = 48, 16
    model.bind_kv_cache(
        allocate_kv_cache(
            s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim, torch.float32
        )
    )
    # 700 tokens: the local layers' window (512) is passed.
    ids = [2] + torch.randint(3, 20000, (699,), generator=torch.Generator().manual_seed(0)).tolist()
    attn, positions = AttentionMetadata.build(
        [0], [len(ids)], [list(range(num_blocks))], block_size
    )
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(ids), positions, attn))
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_greedy_continuation(gemma3_gguf_path: Path) -> None:
    from pagoda.engine.llm import LLM
    from pagoda.sampling_params import SamplingParams

    llm = LLM(str(gemma3_gguf_path), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512)
    (out,) = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
    )
    assert out.outputs[0].text == " the capital of the country of France. It is the largest"
