"""The attention family: the C++ decode and prompt kernels and the C++ softmax against
the PyTorch twin, in both dtypes, over awkward shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE, random_batch

from pagoda import kernels
from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.ops.attention import (
    attend_group,
    causal_softmax_torch,
    paged_attention,
    paged_attention_torch,
    prompt_kernel_takes,
)

pytestmark = pytest.mark.usefixtures("kernels_built")


# head_dim 64 and 128 take the kernel's register-blocked path, 32 its general one.
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_kernel_equals_float32(dtype: torch.dtype, dim: int) -> None:
    """The kernel is run on every group, prompt chunks included (which paged_attention gives
    to matmuls instead), against float32: the kernel keeps scores and weights in float32
    where the PyTorch path rounds them to bfloat16."""
    torch.manual_seed(0)
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(dtype, dim=dim)
    assert [g.max_query_len for g in attn.groups] == [1, 7]
    for group in attn.groups:
        out = torch.ops.pagoda.paged_attention(
            q[group.flat_index],
            kc,
            vc,
            group.block_tables,
            group.token_seq,
            group.positions,
            0.3,
        )
        reference = attend_group(q.float(), kc.float(), vc.float(), group, 0.3)
        torch.testing.assert_close(out.float(), reference, **TOLERANCE[dtype])


def test_paged_attention_equals_the_pytorch_path() -> None:
    """paged_attention (kernel for decodes, matmuls for chunks) equals the PyTorch path."""
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
    torch.testing.assert_close(
        paged_attention(q, kc, vc, attn, 0.3),
        paged_attention_torch(q, kc, vc, attn, 0.3),
        **TOLERANCE[torch.float32],
    )


def prompt_kernel_built() -> bool:
    """The prompt kernel is in a build for a CPU with AVX512-BF16 (else skip its tests)."""
    return kernels.load() and prompt_kernel_takes(torch.bfloat16, 64, 1)


needs_prompt_kernel = pytest.mark.skipif(
    not prompt_kernel_built(), reason="the prompt attention kernel needs a CPU with AVX512-BF16"
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
    # paged_attention takes it for the chunks, the decode kernel for the decode.
    torch.testing.assert_close(
        paged_attention(q, kc, vc, attn, dim**-0.5).float(),
        reference,
        **TOLERANCE[torch.bfloat16],
    )


@needs_prompt_kernel
def test_prompt_kernel_states_its_shapes_and_refuses_others() -> None:
    takes = [
        (dtype, dim, group)
        for dtype in DTYPES
        for dim in (32, 64, 96, 128, 256)
        for group in range(1, 9)
        if prompt_kernel_takes(dtype, dim, group)
    ]
    assert takes == [(torch.bfloat16, dim, g) for dim in (64, 128) for g in range(1, 7)]
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.bfloat16, dim=32)
    chunk = attn.groups[1]
    with pytest.raises(RuntimeError, match="does not take BFloat16 with head_dim 32"):
        torch.ops.pagoda.prompt_attention(
            q[chunk.flat_index], kc, vc, chunk.block_tables, chunk.token_seq, chunk.positions, 0.3
        )


def test_attention_kernels_refuse_out_of_cache_blocks() -> None:
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
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
    if prompt_kernel_built():
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
