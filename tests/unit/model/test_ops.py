"""The C++ kernels against their PyTorch definitions, in both dtypes, over awkward shapes."""

from __future__ import annotations

import pytest
import torch

from pagoda import envs, kernels
from pagoda.model import ops
from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.ops.attention import (
    attend_group,
    causal_softmax_torch,
    paged_attention_torch,
)

pytestmark = pytest.mark.skipif(envs.PAGODA_DISABLE_KERNELS, reason="kernels disabled")

# float32: only summation order differs. bfloat16: both paths round at the same steps, but a
# different summation order can flip the last bit of an element (one bf16 ulp is 2^-8 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def built() -> None:
    assert kernels.load(), "the C++ kernels are not built: python -m pagoda.kernels"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype: torch.dtype) -> None:
    x = torch.randn(37, 96).to(dtype) * 3
    w = torch.randn(96).to(dtype)
    torch.testing.assert_close(
        torch.ops.pagoda.rms_norm(x, w, 1e-5), ops.rms_norm_torch(x, w, 1e-5), **TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype: torch.dtype) -> None:
    """In place: residual becomes the sum, exactly as torch rounds it, and x its norm."""
    x, residual = torch.randn(37, 96).to(dtype) * 3, torch.randn(37, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    want_x, want_residual = ops.rms_norm_torch(x + residual, w, 1e-5), x + residual
    torch.ops.pagoda.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(x, want_x, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    x = torch.randn(19, 2 * 83).to(dtype) * 4  # 83: the vector loop and its scalar tail
    torch.testing.assert_close(
        torch.ops.pagoda.silu_mul(x), ops.silu_mul_torch(x), **TOLERANCE[dtype]
    )


def random_batch(dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, dim: int = 32):
    """A mixed batch (decodes, a chunk, a whole prompt) over a shuffled 40-block cache."""
    block_size, num_blocks = 4, 40
    num_computed, num_new = [9, 0, 5, 13], [1, 7, 4, 1]
    order = torch.randperm(num_blocks).tolist()
    tables = [order[0:6], order[6:10], order[10:13], order[13:20]]
    attn, positions = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    tokens = sum(num_new)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.view(tokens, -1, dim) for t in (q, k, v))
    shape = (num_blocks, kv_heads, block_size, dim)
    caches = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    table = torch.randn(64, dim).float()
    return qkv, (q, k, v), attn, positions, caches, table


def test_argmax_rows_equals_torch_argmax() -> None:
    """Ties go to the first index, a NaN wins, rows of -inf give 0, as in torch.argmax."""
    x = torch.randn(32, 4099)  # 4099: the vector loops and their scalar tails
    x[1, 7] = x[1, 4000] = 100.0  # a tie
    x[2] = float("-inf")
    x[3, 4098] = float("inf")
    x[4, 20] = x[4, 30] = float("nan")
    x[5, 4097] = float("nan")
    assert torch.equal(torch.ops.pagoda.argmax_rows(x), x.argmax(dim=-1))


# head_dim 64 and 128 take the kernel's register-blocked path, 32 its general one.
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_then_attention(dtype: torch.dtype, dim: int) -> None:
    results = []
    for rope in (torch.ops.pagoda.rope_and_cache, ops.rope_and_cache_torch):
        torch.manual_seed(0)
        qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(dtype, dim=dim)
        rope(q, k, v, positions, table, kc, vc, attn.slot_mapping)
        results.append((qkv, kc, vc, q, attn))
    (qkv_a, kc_a, vc_a, q_a, attn), (qkv_b, kc_b, vc_b, q_b, _) = results
    torch.testing.assert_close(qkv_a, qkv_b, **TOLERANCE[dtype])
    torch.testing.assert_close(kc_a, kc_b, **TOLERANCE[dtype])
    assert torch.equal(vc_a, vc_b)  # values are copied, not computed

    # The kernel is run on every group, prompt chunks included (which ops.paged_attention gives
    # to matmuls instead), against float32: the kernel keeps scores and weights in float32
    # where the PyTorch path rounds them to bfloat16.
    assert [g.max_query_len for g in attn.groups] == [1, 7]
    for group in attn.groups:
        out = torch.ops.pagoda.paged_attention(
            q_b[group.flat_index],
            kc_b,
            vc_b,
            group.block_tables,
            group.token_seq,
            group.positions,
            0.3,
        )
        reference = attend_group(q_b.float(), kc_b.float(), vc_b.float(), group, 0.3)
        torch.testing.assert_close(out.float(), reference, **TOLERANCE[dtype])


def test_paged_attention_equals_the_pytorch_path() -> None:
    """ops.paged_attention (kernel for decodes, matmuls for chunks) equals the PyTorch path."""
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
    torch.testing.assert_close(
        ops.paged_attention(q, kc, vc, attn, 0.3),
        paged_attention_torch(q, kc, vc, attn, 0.3),
        **TOLERANCE[torch.float32],
    )


needs_prompt_kernel = pytest.mark.skipif(
    not kernels.load() or not hasattr(torch.ops.pagoda, "prompt_attention"),
    reason="the prompt attention kernel needs a CPU with AVX512-BF16",
)


# (query heads, KV heads, head_dim, block size): every register-blocked group size, both
# head_dims, and blocks smaller and larger than the kernel's tiles of 16 tokens and keys.
@needs_prompt_kernel
@pytest.mark.parametrize(
    "heads, kv_heads, dim, block_size",
    [
        (9, 3, 64, 16),
        (4, 4, 64, 4),
        (4, 2, 128, 32),
        (16, 4, 64, 16),
        (10, 2, 64, 8),
        (12, 2, 128, 16),
    ],
)
def test_prompt_attention_equals_float32(
    heads: int, kv_heads: int, dim: int, block_size: int
) -> None:
    """Chunks from position 0, after a context, longer and shorter than a tile, side by side
    with a decode; the kernel against the PyTorch path in float32 on the same values."""
    torch.manual_seed(0)
    num_computed, num_new = [0, 21, 40, 0, 5], [37, 16, 1, 2, 70]
    num_blocks = sum(-(-(c + n) // block_size) for c, n in zip(num_computed, num_new))
    order = torch.randperm(num_blocks).tolist()
    tables = []
    for c, n in zip(num_computed, num_new):
        used = -(-(c + n) // block_size)
        tables.append(order[:used])
        order = order[used:]
    attn, _ = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    q = torch.randn(sum(num_new), heads, dim).bfloat16()
    shape = (num_blocks, kv_heads, block_size, dim)
    kc, vc = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    reference = paged_attention_torch(q.float(), kc.float(), vc.float(), attn, dim**-0.5)
    chunks = next(g for g in attn.groups if g.max_query_len > 1)
    out = torch.ops.pagoda.prompt_attention(
        q[chunks.flat_index],
        kc,
        vc,
        chunks.block_tables,
        chunks.token_seq,
        chunks.positions,
        dim**-0.5,
    )
    torch.testing.assert_close(
        out.float(), reference[chunks.flat_index], **TOLERANCE[torch.bfloat16]
    )
    # ops.paged_attention takes it for the chunks, the decode kernel for the decode.
    torch.testing.assert_close(
        ops.paged_attention(q, kc, vc, attn, dim**-0.5).float(),
        reference,
        **TOLERANCE[torch.bfloat16],
    )


def test_kernels_refuse_out_of_cache_slots() -> None:
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
    with pytest.raises(RuntimeError, match="out of the cache"):
        torch.ops.pagoda.rope_and_cache(q, k, v, positions, table, kc, vc, attn.slot_mapping + 999)
    with pytest.raises(RuntimeError, match="out of the cache"):
        torch.ops.pagoda.paged_attention(
            q[:1],
            kc,
            vc,
            attn.groups[0].block_tables + 99,
            torch.tensor([0]),
            torch.tensor([9]),
            0.3,
        )
    if hasattr(torch.ops.pagoda, "prompt_attention"):
        qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.bfloat16, dim=64)
        chunk = attn.groups[1]
        with pytest.raises(RuntimeError, match="out of the cache"):
            torch.ops.pagoda.prompt_attention(
                q[chunk.flat_index],
                kc,
                vc,
                chunk.block_tables + 99,
                chunk.token_seq,
                chunk.positions,
                0.3,
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax(dtype: torch.dtype) -> None:
    _, _, attn, _, _, _ = random_batch(dtype)
    for group in attn.groups:  # the decodes, and the chunk and prompt padded to 7 queries
        shape = (len(group.block_tables), 2, 3, group.max_query_len, group.max_seq_len)
        scores = (torch.randn(shape) * 4).to(dtype)
        got = torch.ops.pagoda.causal_softmax(scores, group.query_pos)
        torch.testing.assert_close(got, causal_softmax_torch(scores, group), **TOLERANCE[dtype])
        assert (got.float().sum(-1) - 1).abs().max() < 0.02


def test_decode_only_metadata_equals_the_general_build() -> None:
    # Block tables longer and shorter than needed, a context ending on a block boundary.
    num_computed, tables = [9, 0, 15, 31], [[4, 7, 1], [3], [0, 9, 2], [5, 6]]
    fast, fast_positions = AttentionMetadata._build_decode(num_computed, tables, 16, "cpu")
    slow, slow_positions = AttentionMetadata._build_mixed(num_computed, [1] * 4, tables, 16, "cpu")
    assert torch.equal(fast_positions, slow_positions)
    assert torch.equal(fast.slot_mapping, slow.slot_mapping)
    (a,), (b,) = fast.groups, slow.groups
    for field in a.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field


def test_kv_cache_is_zeroed_and_each_tensor_its_own() -> None:
    from pagoda.model.kv_memory import allocate_kv_cache

    caches = allocate_kv_cache(3, 5, 4, 2, 8, torch.bfloat16)
    tensors = [t for pair in caches for t in pair]
    assert all(t.shape == (5, 2, 4, 8) and t.is_contiguous() and not t.any() for t in tensors)
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    assert [int(t[0, 0, 0, 0]) for t in tensors] == list(range(1, 7))
    assert all(bool((t == i + 1).all()) for i, t in enumerate(tensors))
