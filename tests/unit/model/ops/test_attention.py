"""The attention family: the C++ decode and prompt kernels and the C++ softmax against
the PyTorch twin, in both dtypes, over awkward shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, TOLERANCE, cpu_flags, random_batch

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


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_decode_kernel_over_a_bfloat16_cache(dim: int) -> None:
    """A float32 query over a bfloat16 cache (--kv-cache-dtype bfloat16 on a float32
    model) is the float32 attention over the cache's values."""
    torch.manual_seed(0)
    _, (q, _, _), attn, _, (kc, vc), _ = random_batch(
        torch.float32, dim=dim, cache_dtype=torch.bfloat16
    )
    for group in attn.groups:
        out = torch.ops.pagoda.paged_attention(
            q[group.flat_index], kc, vc, group.block_tables, group.token_seq, group.positions, 0.3
        )
        assert out.dtype == torch.float32
        reference = attend_group(q, kc.float(), vc.float(), group, 0.3)
        torch.testing.assert_close(out, reference, **TOLERANCE[torch.float32])


def scattered_tables(
    num_computed: list[int], num_new: list[int], block_size: int
) -> tuple[list[list[int]], int]:
    """Block tables for sequences of these lengths over a shuffled pool; and the pool's size."""
    num_blocks = sum(-(-(c + n) // block_size) for c, n in zip(num_computed, num_new))
    order = torch.randperm(num_blocks).tolist()
    tables = []
    for c, n in zip(num_computed, num_new):
        used = -(-(c + n) // block_size)
        tables.append(order[:used])
        order = order[used:]
    return tables, num_blocks


# (query heads, KV heads, head_dim): every register-blocked group size of both head_dims,
# and the general path's head_dim 256 (Gemma 3's) and 48.
DECODE_SHAPES = [
    (4, 4, 64),
    (16, 8, 64),
    (9, 3, 64),
    (32, 8, 64),
    (10, 2, 64),
    (12, 2, 64),
    (4, 4, 128),
    (4, 2, 128),
    (12, 4, 128),
    (32, 8, 128),
    (4, 1, 256),
    (6, 2, 48),
]


@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, dim", DECODE_SHAPES)
def test_decode_kernel_over_long_scattered_contexts_equals_float32(
    heads: int, kv_heads: int, dim: int, cache_dtype: torch.dtype
) -> None:
    """Decodes after 1 to 300 positions in scattered blocks of 16, a float32 query over a
    cache of either dtype: the kernel's vector loops over whole and partial blocks, and its
    reads a block ahead, against float32 attention over the cache's values."""
    torch.manual_seed(0)
    block_size = 16
    num_computed = [0, 7, 16, 40, 129, 299]
    num_new = [1] * len(num_computed)
    tables, num_blocks = scattered_tables(num_computed, num_new, block_size)
    attn, _ = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    (decodes,) = attn.groups
    q = torch.randn(len(num_new), heads, dim)
    shape = (num_blocks, kv_heads, block_size, dim)
    kc, vc = torch.randn(shape).to(cache_dtype), torch.randn(shape).to(cache_dtype)
    out = torch.ops.pagoda.paged_attention(
        q, kc, vc, decodes.block_tables, decodes.token_seq, decodes.positions, dim**-0.5
    )
    reference = attend_group(q, kc.float(), vc.float(), decodes, dim**-0.5)
    torch.testing.assert_close(out, reference, **TOLERANCE[torch.float32])


def test_paged_attention_over_a_bfloat16_cache_equals_the_pytorch_path() -> None:
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(
        torch.float32, cache_dtype=torch.bfloat16
    )
    torch.testing.assert_close(
        paged_attention(q, kc, vc, attn, 0.3),
        paged_attention_torch(q, kc, vc, attn, 0.3),
        **TOLERANCE[torch.float32],
    )


def test_paged_attention_equals_the_pytorch_path() -> None:
    """paged_attention (kernel for decodes, matmuls for chunks) equals the PyTorch path."""
    qkv, (q, k, v), attn, positions, (kc, vc), table = random_batch(torch.float32)
    torch.testing.assert_close(
        paged_attention(q, kc, vc, attn, 0.3),
        paged_attention_torch(q, kc, vc, attn, 0.3),
        **TOLERANCE[torch.float32],
    )


def prompt_kernel_built(dtype: torch.dtype, dim: int, heads_per_kv: int) -> bool:
    """Whether this build's prompt kernel takes the shape: its tiles with AVX512-BF16 (bfloat16,
    head_dim 64 and 128), the decode kernel token by token with AVX2 alone (head_dim 64)."""
    return kernels.load() and prompt_kernel_takes(dtype, dim, heads_per_kv)


def skip_unless_prompt_kernel(dtype: torch.dtype, dim: int, heads_per_kv: int) -> None:
    if not prompt_kernel_built(dtype, dim, heads_per_kv):
        pytest.skip(f"this build's prompt kernel does not take {dtype} at head_dim {dim}")


# (query heads, KV heads, head_dim, block size): every register-blocked group size, both
# head_dims, and blocks smaller and larger than the kernel's tiles of 16 tokens and keys.
@pytest.mark.parametrize("dtype", DTYPES)
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
    heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype
) -> None:
    """Chunks from position 0, after a context, longer and shorter than a tile, side by side
    with a decode, queries of dtype over a bfloat16 cache; the kernel against the PyTorch
    path in float32 on the same values."""
    skip_unless_prompt_kernel(dtype, dim, heads // kv_heads)
    torch.manual_seed(0)
    num_computed, num_new = [0, 21, 40, 0, 5], [37, 16, 1, 2, 70]
    tables, num_blocks = scattered_tables(num_computed, num_new, block_size)
    attn, _ = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    q = torch.randn(sum(num_new), heads, dim).to(dtype)
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
    torch.testing.assert_close(out.float(), reference[chunks.flat_index], **TOLERANCE[dtype])
    # paged_attention takes it for the chunks, the decode kernel for the decode.
    torch.testing.assert_close(
        paged_attention(q, kc, vc, attn, dim**-0.5).float(), reference, **TOLERANCE[dtype]
    )


# (query heads, KV heads, head_dim): 1 to 6 query heads per KV head, both head_dims.
VERIFY_SHAPES = [(9, 3, 64), (4, 4, 64), (4, 2, 128), (16, 4, 64), (10, 2, 64), (12, 2, 128)]


@pytest.mark.parametrize("window", [None, 3, 40])
@pytest.mark.parametrize("heads, kv_heads, dim", VERIFY_SHAPES)
def test_prompt_attention_of_short_runs_equals_float32(
    heads: int, kv_heads: int, dim: int, window: int | None
) -> None:
    """A step that verifies drafts: runs of 2 to 17 tokens (a token and 1 to 16 drafts) after
    contexts of 1 to 300 positions, each run's token times heads filling a tile's lanes or not;
    the kernel against the PyTorch path in float32 on the same values."""
    skip_unless_prompt_kernel(torch.bfloat16, dim, heads // kv_heads)
    torch.manual_seed(0)
    block_size = 16
    num_computed = [1, 40, 300, 15, 63, 7, 129]
    num_new = [2, 5, 5, 3, 6, 17, 9]
    tables, num_blocks = scattered_tables(num_computed, num_new, block_size)
    attn, _ = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    (runs,) = attn.groups
    q = torch.randn(sum(num_new), heads, dim).bfloat16()
    shape = (num_blocks, kv_heads, block_size, dim)
    kc, vc = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    reference = attend_group(q.float(), kc.float(), vc.float(), runs, dim**-0.5, window)
    out = torch.ops.pagoda.prompt_attention(
        q, kc, vc, runs.block_tables, runs.token_seq, runs.positions, dim**-0.5, window
    )
    torch.testing.assert_close(out.float(), reference, **TOLERANCE[torch.bfloat16])


def test_prompt_kernel_states_its_shapes_and_refuses_others() -> None:
    takes = [
        (dtype, dim, group)
        for dtype in DTYPES
        for dim in (32, 64, 96, 128, 256)
        for group in range(1, 9)
        if prompt_kernel_takes(dtype, dim, group)
    ]
    # The build is for this CPU (-march=native): the tiles with AVX512-BF16, the decode
    # kernel token by token with AVX2 and FMA but no AVX-512, else nothing.
    flags = cpu_flags()
    if "avx512_bf16" in flags:
        expected = [(torch.bfloat16, dim, g) for dim in (64, 128) for g in range(1, 7)]
    elif {"avx2", "fma"} <= flags and "avx512f" not in flags:
        expected = [(dtype, 64, g) for dtype in DTYPES for g in range(1, 7)]
    else:
        expected = []
    assert takes == expected
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
    if prompt_kernel_built(torch.bfloat16, 64, 3):
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


@pytest.mark.parametrize("dim", [32, 64])
def test_attention_kernels_refuse_tokens_outside_their_tables(dim: int) -> None:
    """A token whose sequence has no row of block_tables, a position past its row's blocks,
    or token_seq and positions not one per query: a clear error from each kernel (dim 32:
    the decode kernel's general loop, 64: its register-blocked one and the prompt kernel's
    shapes), never a read outside the tensors."""
    _, (q, _, _), attn, _, (kc, vc), _ = random_batch(torch.bfloat16, dim=dim)
    chunk = attn.groups[1]  # 7 tokens of a 2-block sequence, positions 0..6
    kernels_ = [torch.ops.pagoda.paged_attention]
    if prompt_kernel_built(torch.bfloat16, dim, 3):
        kernels_.append(torch.ops.pagoda.prompt_attention)
    rows, seq, pos = q[chunk.flat_index], chunk.token_seq, chunk.positions
    cases = [
        (seq + 1, pos, "must index block_tables"),
        (seq, pos + 8, "block_tables is too short for position"),
        (seq[:3], pos, "one per token of q"),
        (seq, pos.int(), "one per token of q"),
    ]
    for kernel in kernels_:
        for bad_seq, bad_pos, message in cases:
            with pytest.raises(RuntimeError, match=message):
                kernel(rows, kc, vc, chunk.block_tables, bad_seq, bad_pos, 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax(dtype: torch.dtype) -> None:
    _, _, attn, _, _, _ = random_batch(dtype)
    for group in attn.groups:  # the decodes, and the chunk and prompt padded to 7 queries
        shape = (len(group.block_tables), 2, 3, group.max_query_len, group.max_seq_len)
        scores = (torch.randn(shape) * 4).to(dtype)
        got = torch.ops.pagoda.causal_softmax(scores, group.query_pos)
        torch.testing.assert_close(got, causal_softmax_torch(scores, group), **TOLERANCE[dtype])
        assert (got.float().sum(-1) - 1).abs().max() < 0.02


# ---- Sliding window: a query at position p sees keys p - window < key <= p.


def window_batch(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block_size: int):
    """A whole prompt, chunks (one from after a context of 21), decodes early and at 300,
    over a shuffled cache: q, (k_cache, v_cache), attn, the block tables."""
    num_computed, num_new = [0, 21, 40, 0, 5, 300], [37, 16, 1, 2, 70, 1]
    tables, num_blocks = scattered_tables(num_computed, num_new, block_size)
    attn, _ = AttentionMetadata.build(num_computed, num_new, tables, block_size)
    q = torch.randn(sum(num_new), heads, dim).to(dtype)
    shape = (num_blocks, kv_heads, block_size, dim)
    caches = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    return q, caches, attn, tables


# 1: the token itself; 7, 16, 24: edges inside tiles, on a tile, and crossed by the chunk at
# 21..36; 33: across the whole prompt of 37; 300: wider than every context but the last.
WINDOWS = [1, 7, 16, 24, 33, 300]


@pytest.mark.parametrize("window", WINDOWS)
def test_window_twin_sees_the_last_window_positions(window: int) -> None:
    """The PyTorch twin against attention written out token by token in float64."""
    torch.manual_seed(0)
    q, (kc, vc), attn, tables = window_batch(torch.float32, 4, 2, 16, 4)
    got = paged_attention_torch(q, kc, vc, attn, 0.25, window)
    num_computed, num_new = [0, 21, 40, 0, 5, 300], [37, 16, 1, 2, 70, 1]
    t = 0
    for seq, (c, n) in enumerate(zip(num_computed, num_new)):
        slots = torch.tensor([tables[seq][p // 4] * 4 + p % 4 for p in range(c + n)])
        keys = kc.transpose(1, 2).reshape(-1, 2, 16)[slots].double()  # [positions, 2, 16]
        values = vc.transpose(1, 2).reshape(-1, 2, 16)[slots].double()
        for p in range(c, c + n):
            seen = slice(max(0, p - window + 1), p + 1)
            for h in range(4):
                scores = keys[seen, h // 2] @ q[t, h].double() * 0.25
                want = scores.softmax(0) @ values[seen, h // 2]
                torch.testing.assert_close(
                    got[t, h * 16 : (h + 1) * 16].double(), want, rtol=1e-5, atol=1e-5
                )
            t += 1


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_kernel_with_window_equals_float32(
    dtype: torch.dtype, dim: int, window: int
) -> None:
    """The decode kernel (register-blocked for 64 and 128, general for 32) on every group."""
    torch.manual_seed(0)
    q, (kc, vc), attn, _ = window_batch(dtype, 6, 2, dim, 16)
    for group in attn.groups:
        out = torch.ops.pagoda.paged_attention(
            q[group.flat_index],
            kc,
            vc,
            group.block_tables,
            group.token_seq,
            group.positions,
            0.3,
            window,
        )
        reference = attend_group(q.float(), kc.float(), vc.float(), group, 0.3, window)
        torch.testing.assert_close(out.float(), reference, **TOLERANCE[dtype])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize(
    "heads, kv_heads, dim, block_size", [(9, 3, 64, 16), (4, 4, 64, 4), (4, 2, 128, 32)]
)
def test_prompt_kernel_with_window_equals_float32(
    heads: int, kv_heads: int, dim: int, block_size: int, window: int
) -> None:
    """A prefill longer than the window, a chunk crossing the window's edge, short chunks."""
    skip_unless_prompt_kernel(torch.bfloat16, dim, heads // kv_heads)
    torch.manual_seed(0)
    q, (kc, vc), attn, _ = window_batch(torch.bfloat16, heads, kv_heads, dim, block_size)
    chunks = next(g for g in attn.groups if g.max_query_len > 1)
    reference = attend_group(q.float(), kc.float(), vc.float(), chunks, dim**-0.5, window)
    out = torch.ops.pagoda.prompt_attention(
        q[chunks.flat_index],
        kc,
        vc,
        chunks.block_tables,
        chunks.token_seq,
        chunks.positions,
        dim**-0.5,
        window,
    )
    torch.testing.assert_close(out.float(), reference, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("window", [7, 24])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_with_window_equals_the_twin(dtype: torch.dtype, window: int) -> None:
    """The dispatcher: decode kernel, and the prompt kernel where the build has one for the
    shape or matmuls with the C++ softmax, against the twin in float32."""
    torch.manual_seed(0)
    q, (kc, vc), attn, _ = window_batch(dtype, 6, 2, 64, 16)
    torch.testing.assert_close(
        paged_attention(q, kc, vc, attn, 0.125, window).float(),
        paged_attention_torch(q.float(), kc.float(), vc.float(), attn, 0.125, window),
        **TOLERANCE[dtype],
    )


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax_with_window(dtype: torch.dtype, window: int) -> None:
    torch.manual_seed(0)
    _, _, attn, _ = window_batch(dtype, 6, 2, 16, 16)
    for group in attn.groups:
        shape = (len(group.block_tables), 2, 3, group.max_query_len, group.max_seq_len)
        scores = (torch.randn(shape) * 4).to(dtype)
        got = torch.ops.pagoda.causal_softmax(scores, group.query_pos, window)
        want = causal_softmax_torch(scores, group, window)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
        assert torch.equal(got > 0, want > 0)  # the same keys, and no others, kept


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_window_wider_than_every_context_changes_nothing(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q, (kc, vc), attn, _ = window_batch(dtype, 9, 3, 64, 16)
    for group in attn.groups:
        args = (kc, vc, group.block_tables, group.token_seq, group.positions, 0.125)
        rows = q[group.flat_index]
        kernels_ = [torch.ops.pagoda.paged_attention]
        if prompt_kernel_built(dtype, 64, 3) and group.max_query_len > 1:
            kernels_.append(torch.ops.pagoda.prompt_attention)
        for kernel in kernels_:
            assert torch.equal(kernel(rows, *args, 301), kernel(rows, *args))
        scores = torch.randn(len(group.block_tables), 3, 3, group.max_query_len, group.max_seq_len)
        scores = scores.to(dtype)
        assert torch.equal(
            torch.ops.pagoda.causal_softmax(scores, group.query_pos, 301),
            torch.ops.pagoda.causal_softmax(scores, group.query_pos),
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_read_no_block_before_the_window(dtype: torch.dtype) -> None:
    """Blocks wholly before every query's window are given ids out of the cache: the kernels,
    which check each block they read, must not touch them, and still give the twin's result."""
    torch.manual_seed(0)
    window, block_size = 8, 4  # the chunk at 21..36 sees from 14 on, its first 3 blocks not
    q, (kc, vc), attn, _ = window_batch(dtype, 6, 2, 64, block_size)
    for group in attn.groups:
        first_seen = torch.full((len(group.block_tables),), 1 << 40)
        first_seen.scatter_reduce_(0, group.token_seq, group.positions - window + 1, "amin")
        before = torch.arange(group.block_tables.shape[1]) * block_size + block_size <= (
            first_seen.unsqueeze(1)
        )
        assert before.any()  # some blocks lie before every window of their sequence
        tables = group.block_tables.masked_fill(before, 10**6)
        kernels_ = [torch.ops.pagoda.paged_attention]
        if prompt_kernel_built(dtype, 64, 3) and group.max_query_len > 1:
            kernels_.append(torch.ops.pagoda.prompt_attention)
        reference = attend_group(q.float(), kc.float(), vc.float(), group, 0.125, window)
        for kernel in kernels_:
            rows = q[group.flat_index]
            out = kernel(rows, kc, vc, tables, group.token_seq, group.positions, 0.125, window)
            torch.testing.assert_close(out.float(), reference, **TOLERANCE[dtype])
            with pytest.raises(RuntimeError, match="out of the cache"):  # without the window
                kernel(rows, kc, vc, tables, group.token_seq, group.positions, 0.125)


def test_window_must_be_positive() -> None:
    q, (kc, vc), attn, _ = window_batch(torch.float32, 6, 2, 64, 16)
    group = attn.groups[0]
    with pytest.raises(RuntimeError, match="window must be at least 1"):
        torch.ops.pagoda.paged_attention(
            q[group.flat_index],
            kc,
            vc,
            group.block_tables,
            group.token_seq,
            group.positions,
            0.3,
            0,
        )
