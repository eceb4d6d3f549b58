"""The model against transformers, and the paged cache against itself along every path."""

from __future__ import annotations

import pytest
import torch
from tiny_models import BLOCK_SIZE, VARIANTS, bind_cache, forward, make_hf_model

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.kv_memory import allocate_kv_cache
from pagoda.model.loader import load_model
from pagoda.model.models import CausalLM

# float32 against float32: only summation order differs.
ATOL = 1e-4


def reference_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant: str, tiny_model_dir) -> None:
    path = tiny_model_dir(variant)
    model = load_model(path)
    bind_cache(model)
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = forward(model, [(ids, 0, list(range(10)))])[0]
    ref = reference_logits(make_hf_model(variant), ids)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_sharded_safetensors_load(tmp_path) -> None:
    from tiny_models import save_hf_model

    path = save_hf_model("llama3-rope", tmp_path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    model = load_model(path)
    bind_cache(model)
    ids = list(range(3, 40))
    ours = forward(model, [(ids, 0, list(range(10)))])[0]
    torch.testing.assert_close(
        ours, reference_logits(make_hf_model("llama3-rope"), ids), atol=ATOL, rtol=0
    )


@pytest.fixture(scope="module")
def qwen3_model(tiny_model_dir) -> CausalLM:
    return load_model(tiny_model_dir("qwen3"))


def full_prefill(model: CausalLM, ids: list[int]) -> torch.Tensor:
    bind_cache(model)
    return forward(model, [(ids, 0, list(range(20)))])[0]


def test_prefill_then_decode_matches_full_prefill(qwen3_model) -> None:
    ids = list(range(10, 33))
    expected = full_prefill(qwen3_model, ids)
    bind_cache(qwen3_model)
    table = [7, 3, 11, 0, 5, 9, 2]  # blocks need not be in order
    got = [forward(qwen3_model, [(ids[:5], 0, table)])[0]]
    for i in range(5, len(ids)):
        got.append(forward(qwen3_model, [(ids[i : i + 1], i, table)])[0])
    torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)


def test_chunked_prefill_across_block_boundaries(qwen3_model) -> None:
    ids = list(range(40, 70))
    expected = full_prefill(qwen3_model, ids)
    bind_cache(qwen3_model)
    table = list(range(30, 38))
    got, done = [], 0
    for size in (3, 7, 5, 9, 6):  # chunk edges fall mid-block
        got.append(forward(qwen3_model, [(ids[done : done + size], done, table)])[0])
        done += size
    torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)


def test_mixed_batch_matches_each_sequence_alone(qwen3_model) -> None:
    prompts = [list(range(1, 20)), list(range(50, 57)), list(range(100, 131)), [9, 8, 7]]
    expected = [full_prefill(qwen3_model, p) for p in prompts]
    bind_cache(qwen3_model)
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 26)), list(range(26, 30))]
    # Step 1: sequences 0 and 1 prefill a first part; 2 and 3 wait.
    step1 = forward(qwen3_model, [(prompts[0][:10], 0, tables[0]), (prompts[1], 0, tables[1])])
    # Step 2: seq 0 finishes its prefill, 1 decodes, 2 starts a chunk, 3 prefills whole.
    step2 = forward(
        qwen3_model,
        [
            (prompts[0][10:], 10, tables[0]),
            ([5], 7, tables[1]),
            (prompts[2][:13], 0, tables[2]),
            (prompts[3], 0, tables[3]),
        ],
    )
    # Step 3: seq 0 and 1 decode, 2 finishes, 3 decodes.
    step3 = forward(
        qwen3_model,
        [
            ([4], 19, tables[0]),
            ([6], 8, tables[1]),
            (prompts[2][13:], 13, tables[2]),
            ([1], 3, tables[3]),
        ],
    )
    torch.testing.assert_close(torch.cat([step1[0], step2[0]]), expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(step1[1], expected[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([step2[2], step3[2]]), expected[2], atol=ATOL, rtol=0)
    torch.testing.assert_close(step2[3], expected[3], atol=ATOL, rtol=0)
    # Decode steps equal a full prefill of the extended sequences.
    for seq, extra, logits in ((0, [4], step3[0]), (1, [5, 6], step3[1]), (3, [1], step3[3])):
        full = full_prefill(qwen3_model, prompts[seq] + extra)
        torch.testing.assert_close(logits[-1], full[-1], atol=ATOL, rtol=0)
    bind_cache(qwen3_model)


def test_kept_rows_match_the_full_forward_and_fill_the_cache(qwen3_model) -> None:
    """keep: only the chosen rows come out, the same as from the full pass, and the last
    layer still caches every token, so decoding after a kept-rows prefill is unchanged."""
    prompts = [list(range(3, 22)), list(range(60, 65))]
    expected = [full_prefill(qwen3_model, p + [7]) for p in prompts]
    bind_cache(qwen3_model)
    tables = [list(range(0, 8)), list(range(8, 16))]
    attn, positions = AttentionMetadata.build([0, 0], [19, 5], tables, BLOCK_SIZE)
    ids = torch.tensor(prompts[0] + prompts[1])
    keep = torch.tensor([18, 23])  # each prompt's last token
    hidden = qwen3_model(ids, positions, attn, keep)
    assert hidden.shape[0] == 2
    logits = qwen3_model.compute_logits(hidden)
    torch.testing.assert_close(logits[0], expected[0][18], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], expected[1][4], atol=ATOL, rtol=0)
    step = forward(qwen3_model, [([7], 19, tables[0]), ([7], 5, tables[1])])
    torch.testing.assert_close(step[0][0], expected[0][19], atol=ATOL, rtol=0)
    torch.testing.assert_close(step[1][0], expected[1][5], atol=ATOL, rtol=0)
    bind_cache(qwen3_model)


def test_bfloat16_is_close_to_float32(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    ids = list(range(5, 30))
    f32 = full_prefill(load_model(path, torch.float32), ids)
    bf16 = full_prefill(load_model(path, torch.bfloat16), ids)
    assert bf16.dtype == torch.float32  # logits always come out in float32
    assert (bf16 - f32).abs().max() < 0.05 * f32.abs().max()


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32
    )
    model = load_model(default_model_path)
    s = model.spec
    model.bind_kv_cache(
        allocate_kv_cache(s.num_layers, 16, 16, s.num_kv_heads, s.head_dim, torch.float32)
    )
    ids = [504, 3575, 282, 4649, 314, 7042, 30, 378, 1345, 2939, 9646, 28, 253]
    attn, positions = AttentionMetadata.build([0], [len(ids)], [list(range(16))], 16)
    ours = model.compute_logits(model(torch.tensor(ids), positions, attn))
    torch.testing.assert_close(ours, reference_logits(hf, ids), atol=2e-4, rtol=0)
