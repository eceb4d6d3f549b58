"""Gemma 3 against transformers, along every path the sliding window must survive.

The tiny model's local layers see the last SLIDING_WINDOW (6) positions, so every
test below runs past the window, and chunk edges and cache hits fall around it.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import BLOCK_SIZE, SLIDING_WINDOW, bind_cache, forward, make_hf_model

from pagoda.model.loader import load_model
from pagoda.model.models import CausalLM
from pagoda.model.spec import ModelSpec

ATOL = 1e-4  # float32 against float32: only summation order differs


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> CausalLM:
    return load_model(tiny_model_dir("gemma3"))


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    return make_hf_model("gemma3")


def reference(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def ids_of(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_spec_reads_the_layer_types_and_both_rope_bases(model) -> None:
    s = model.spec
    assert s.family == "gemma3" and s.head_dim == 32 and s.attention_scale == 24**-0.5
    assert [s.layer_window(i) for i in range(3)] == [SLIDING_WINDOW, None, SLIDING_WINDOW]
    assert (s.rope_theta, s.rope_local_base_freq) == (1e6, 10000.0)
    assert s.rope_scaling is not None and s.rope_scaling["rope_type"] == "linear"


def test_older_config_fields_give_the_same_spec() -> None:
    """Configs written before layer_types and rope_parameters (as on the Hub for Gemma 3)."""
    common = dict(
        architectures=["Gemma3ForCausalLM"],
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        query_pre_attn_scalar=256,
    )
    old = ModelSpec.from_hf_config(
        {
            **common,
            "rope_theta": 1e6,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 6,
        }
    )
    new = ModelSpec.from_hf_config(
        {
            **common,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        }
    )
    assert old.layer_types == new.layer_types
    assert (old.rope_theta, old.rope_local_base_freq) == (new.rope_theta, new.rope_local_base_freq)
    assert old.rope_scaling is not None and new.rope_scaling is not None
    assert old.rope_scaling["factor"] == new.rope_scaling["factor"] == 8.0


def test_long_prompt_matches_transformers(model, hf_model) -> None:
    ids = ids_of(1, 41)  # nearly 7 windows
    bind_cache(model)
    ours = forward(model, [(ids, 0, list(range(11)))])[0]
    torch.testing.assert_close(ours, reference(hf_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("sizes", [(5, 1, 1, 4, 9, 3), (6, 6, 6, 6, 1), (2, 11, 3, 7, 1, 1)])
def test_chunks_across_the_window_edge_match_transformers(model, hf_model, sizes) -> None:
    """Chunk edges before, on and after the window's edge, then decodes (chunks of 1)."""
    ids = ids_of(2, sum(sizes))
    bind_cache(model)
    table = [9, 2, 14, 0, 7, 3, 11, 5]  # blocks need not be in order
    got, done = [], 0
    for size in sizes:
        got.append(forward(model, [(ids[done : done + size], done, table)])[0])
        done += size
    torch.testing.assert_close(torch.cat(got), reference(hf_model, ids), atol=ATOL, rtol=0)


def test_mixed_batch_matches_transformers(model, hf_model) -> None:
    """Decodes past the window, a chunk crossing it and whole prompts, in one batch."""
    prompts = [ids_of(10 + i, n) for i, n in enumerate((15, 9, 23, 4))]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(4)]
    bind_cache(model)
    step1 = forward(model, [(prompts[0][:14], 0, tables[0]), (prompts[1][:8], 0, tables[1])])
    step2 = forward(
        model,
        [
            (prompts[0][14:], 14, tables[0]),  # decode at position 14
            (prompts[1][8:], 8, tables[1]),  # decode at position 8
            (prompts[2][:5], 0, tables[2]),  # a chunk inside the window
            (prompts[3], 0, tables[3]),  # a prompt shorter than the window
        ],
    )
    step3 = forward(model, [(prompts[2][5:], 5, tables[2])])  # a chunk across the edge
    got = [
        torch.cat([step1[0], step2[0]]),
        torch.cat([step1[1], step2[1]]),
        torch.cat([step2[2], step3[0]]),
        step2[3],
    ]
    for prompt, logits in zip(prompts, got):
        torch.testing.assert_close(logits, reference(hf_model, prompt), atol=ATOL, rtol=0)


def test_prefix_cache_hit_matches_transformers(model, hf_model) -> None:
    """A second sequence reads the first one's cached blocks for its first 12 positions."""
    first, shared = ids_of(20, 17), 12  # 3 full blocks, twice the window
    second = first[:shared] + ids_of(21, 9)
    bind_cache(model)
    forward(model, [(first, 0, [4, 8, 1, 6, 2])])
    table = [4, 8, 1] + [10, 12, 13]  # the hit blocks, then its own
    assert shared == 3 * BLOCK_SIZE
    ours = forward(model, [(second[shared:], shared, table)])[0]
    torch.testing.assert_close(ours, reference(hf_model, second)[shared:], atol=ATOL, rtol=0)


def test_bfloat16_is_close_to_float32(tiny_model_dir, hf_model) -> None:
    ids = ids_of(3, 30)
    model = load_model(tiny_model_dir("gemma3"), torch.bfloat16)
    bind_cache(model)
    bf16 = forward(model, [(ids, 0, list(range(8)))])[0]
    f32 = reference(hf_model, ids)
    assert (bf16 - f32).abs().max() < 0.05 * f32.abs().max()
