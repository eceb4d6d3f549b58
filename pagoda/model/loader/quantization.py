"""What `--quantization auto|gguf` keeps in a GGUF file's blocks, and where its kernel gives way.

Every projection, the embedding table and the output layer whose GGUF type the C++
kernels take is held as the file's blocks: a step of a few rows computes from them with
gguf_linear (int8 inputs, reading 4-8 bits a weight). Bigger steps are compute-bound:
`gguf` (and `auto` for a model whose dense copy would exceed DENSE_COPY_MAX_BYTES) keeps
no dense copy: a k-quant the int8 GEMM takes runs it (gguf_gemm: inputs quantized per 256
values, integer products from the blocks), other formats decode the blocks a tile at a
time into a small buffer for a bfloat16 GEMM (gguf_matmul), and the embedding decodes the
rows it gathers. Per format, on a slice of one of the model's own tensors, the load
measures which of the two GEMMs is faster on a prompt-sized step, then the row count at
which the kernel gives way to it; the output layer, a vocabulary-sized tensor often of
another format, is timed on its own blocks the same way. Without a dense copy, a k-quant
whose int8 GEMM on the weight repacked once into the GEMM's own layout (gguf_repack, about
the file's bytes) beats the kernel at 8 rows is repacked, and the file's pages read
for it are dropped: such a layer then runs that GEMM at every row count, with no tile
decoded a call. `auto` with a small model keeps the dense bfloat16 copy too, for the bigger
steps, where it is 1.1-1.7x faster than decoding (BENCHMARKS.md, section 9): memory for
speed where the memory is small.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pagoda.model.gguf_metadata import GGUFFile
from pagoda.model.layers.embedding import Embedding
from pagoda.model.layers.linear import Linear
from pagoda.model.loader.gguf import hf_name
from pagoda.model.loader.weights import param_name
from pagoda.model.models.base import CausalLM
from pagoda.model.ops import quantized_gemm, quantized_linear
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.quants import FORMATS
from pagoda.model.spec import ModelSpec

logger = logging.getLogger(__name__)

# auto keeps a dense copy beside the blocks up to this size: the default model's and Gemma 3
# 270M's, not a 1B model's (1.9 GiB beside its 0.6 GiB of blocks).
DENSE_COPY_MAX_BYTES = 1 << 30

# Row counts tried, in order, until the tiles win: the limit is the last the kernel won.
CANDIDATE_ROWS = (2, 4, 8, 16, 32, 64)
SAMPLE_ROWS = 1024  # weight rows of the tensor timed: enough for a GEMM, quick to run
# Each product is timed this many times, the two alternating, and the medians compared: a
# best-of-3 over 512 rows chose 8 at one start and 16 at the next for the same file.
REPEATS = 5
# The kernel keeps a row count only where it is this much faster than the tiles: near a tie
# the choice would otherwise follow the noise.
MARGIN = 0.05
# The int8 GEMM and the decoded tiles are compared on a step of this many rows (a chunk of
# a prompt); the GEMM is chosen for a format where it wins by the margin.
GEMM_SAMPLE_ROWS = 128


def held_in_blocks(gguf_file: GGUFFile, spec: ModelSpec) -> tuple[set[str], set[str]]:
    """(the Hugging Face names of the tensors to load as blocks only, our parameters they
    make): projections, embedding and output layer whose type the kernels take, a fused
    projection only when all of its parts are."""
    parts: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for t in gguf_file.tensors:
        name = hf_name(t.name, spec.family)
        if name is None:
            continue
        projection = ".layers." in name and name.endswith("proj.weight")
        output = name.endswith(("embed_tokens.weight", "lm_head.weight"))
        param, _ = param_name(name, spec)
        if param is not None and (projection or output):
            parts[param].append((name, t.type in quantized_linear.kernel_formats()))
    params = {p for p, members in parts.items() if all(ok for _, ok in members)}
    return {name for p in params for name, _ in parts[p]}, params


def dense_bytes(model: CausalLM, params: set[str], dtype: torch.dtype) -> int:
    """What a dense copy of these weights would take, in dtype (model on the meta device)."""
    return sum(model.get_parameter(name).numel() * dtype.itemsize for name in params)


def drop_dense_weights(model: CausalLM, params: set[str], dtype: torch.dtype) -> None:
    """Removes these weights from a model not yet materialised, so no memory is given them."""
    for name in params:
        module = model.get_submodule(name.removesuffix(".weight"))
        if isinstance(module, (Linear, Embedding)):
            module.hold_in_blocks(*([dtype] if isinstance(module, Embedding) else []))
        else:
            assert isinstance(module, nn.Linear), name  # an untied output layer
            module.weight = None  # type: ignore[assignment]


def choose_paths(
    model: CausalLM,
    dtype: torch.dtype,
    release_pages: Callable[[], None] = lambda: None,
    repack: bool = True,
) -> None:
    """Times the int8 GEMM against decoded tiles, then the kernel against the faster, per
    format, and sets each layer's row limit (a fused projection takes the lowest of its
    formats') and GEMM; with repack, repacks the projections whose formats' repacked GEMM
    won (release_pages drops the file's pages after each); logs what was chosen."""
    start = time.perf_counter()
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.gguf]
    # Each format is timed on its largest sample: on a small tensor (a 512-row v projection)
    # a product takes tens of microseconds, and the threads' wake-ups decide the choice.
    samples: dict[str, GGUFWeight] = {}
    for m in linears:
        for w in m.gguf:
            if w.format not in samples or _sample_size(w) > _sample_size(samples[w.format]):
                samples[w.format] = w
    repacks = {f for f, w in samples.items() if repack and _repack_wins(w, dtype)}
    for m in linears:
        if all(w.format in repacks for w in m.gguf):
            m.repacked = tuple(quantized_gemm.repack(w) for w in m.gguf)
            m.gguf = ()  # a stacked copy is freed; a view of the file is not read again
            release_pages()
    # what stays in the file's blocks: the GEMM and the kernel's row limit, per format
    kept = {w.format for m in linears for w in m.gguf}
    gemm = {f: _gemm_wins(w, dtype) for f, w in samples.items() if f in kept}
    limits = {
        f: _row_limit(w, dtype, CANDIDATE_ROWS, gemm=gemm[f])
        for f, w in samples.items()
        if f in kept
    }
    for m in linears:
        if m.gguf:
            m.gguf_max_rows = min(limits[w.format] for w in m.gguf)
            m.gemm_formats = frozenset(w.format for w in m.gguf if gemm[w.format])
    output = model.output_gguf
    if output is not None:
        if repack and _repack_wins(output, dtype):
            model.output_repacked = quantized_gemm.repack(output)
            embedding = model.embed_tokens
            if isinstance(embedding, Embedding) and embedding.gguf is output:  # tied
                embedding.gather_from(model.output_repacked)
            release_pages()
        else:
            # timed on the output layer's own blocks: a large vocabulary's tensor, often of
            # another format than the projections'
            model.output_gemm = _gemm_wins(output, dtype)
            model.gguf_logits_max_rows = _row_limit(
                output, dtype, CANDIDATE_ROWS, gemm=model.output_gemm
            )
    seconds = time.perf_counter() - start
    _log_choice(model, linears, limits, gemm, repacks, seconds)


def log_dense_copy(model: CausalLM, copy_bytes: int) -> None:
    logger.info(
        "--quantization auto: the file's blocks for steps of up to %d rows (logits %d), and a "
        "dense %s copy of them (%.1f MiB, at most %.0f MiB is kept) for bigger steps; "
        "--quantization gguf keeps the blocks only",
        Linear.GGUF_MAX_ROWS,
        model.gguf_logits_max_rows,
        next(model.parameters()).dtype,
        copy_bytes / 2**20,
        DENSE_COPY_MAX_BYTES / 2**20,
    )


def kernel_wins(kernel_s: float, tiles_s: float) -> bool:
    """Whether the kernel's time beats the tiles' by the margin."""
    return kernel_s * (1 + MARGIN) < tiles_s


def _sample_size(w: GGUFWeight) -> int:
    """The bytes of w that _sample takes."""
    return min(w.blocks.shape[0], SAMPLE_ROWS) * w.blocks.shape[1]


def _sample(w: GGUFWeight) -> tuple[GGUFWeight, int]:
    """The first SAMPLE_ROWS rows of w, and its columns."""
    per_block, block_bytes, _ = FORMATS[w.format]
    cols = w.blocks.shape[1] // block_bytes * per_block
    return GGUFWeight(w.blocks[:SAMPLE_ROWS].contiguous(), w.format), cols


def _inputs(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).to(dtype)


def _gemm_wins(
    w: GGUFWeight, dtype: torch.dtype, clock: Callable[[], float] = time.perf_counter
) -> bool:
    """Whether gguf_gemm beat gguf_matmul by the margin on GEMM_SAMPLE_ROWS rows of input
    and the first SAMPLE_ROWS rows of w (False for a format it does not take)."""
    sample, cols = _sample(w)
    x = _inputs(GEMM_SAMPLE_ROWS, cols, dtype)
    if not quantized_gemm.gemm_takes(x, sample):
        return False
    products = [quantized_gemm.gguf_gemm, quantized_linear.gguf_matmul]
    with torch.no_grad():
        gemm, tiles = _median_times(REPEATS, products, x, sample, clock)
    return kernel_wins(gemm, tiles)


def _repack_wins(
    w: GGUFWeight, dtype: torch.dtype, clock: Callable[[], float] = time.perf_counter
) -> bool:
    """Whether the int8 GEMM on w repacked beat gguf_linear by the margin at 8 rows, on the
    first SAMPLE_ROWS rows of w (False for a format it does not repack).

    Only 8 rows are timed: there the kernel is compute-bound and the sample measures what a
    served step sees (1.4-1.9x on the 1B file's formats). At one row a served step streams
    the weight from memory, where the two are within about 10 % (BENCHMARKS.md, section 9),
    but the sample sits in the cache; above the rows where it expands its tiles
    (`expand_rows` in csrc/quantized_gemm_avx512.h and _avx2.h) the repacked GEMM runs
    gguf_gemm's microkernel without decoding the file's blocks. Timing those too only let
    the noise of a loaded machine (the API process starting beside the engine) undo the
    choice.
    """
    sample, cols = _sample(w)
    if w.format not in quantized_gemm.repack_formats() or not quantized_gemm.gemm_takes(
        _inputs(1, cols, dtype), sample
    ):
        return False
    repacked = quantized_gemm.repack(sample)

    def run(x: torch.Tensor, _: GGUFWeight) -> torch.Tensor:
        return quantized_gemm.gguf_gemm_repacked(x, repacked)

    x = _inputs(8, cols, dtype)
    with torch.no_grad():
        # A served load times this while the API process starts beside it, which can slow
        # either product's turns: on the 1B file one load in three lost a 1.35x win. A win in
        # any of three rounds decides.
        for _ in range(3):
            new, kernel = _median_times(
                REPEATS, [run, quantized_linear.gguf_linear], x, sample, clock
            )
            if kernel_wins(new, kernel):
                return True
    return False


def _row_limit(
    w: GGUFWeight,
    dtype: torch.dtype,
    candidates: tuple[int, ...],
    clock: Callable[[], float] = time.perf_counter,
    gemm: bool = False,
) -> int:
    """The largest candidate row count up to which gguf_linear beat the product above it
    (gguf_gemm with gemm, else gguf_matmul) on the first SAMPLE_ROWS rows of w (1 at least:
    one row is where the kernel is made to win)."""
    sample, cols = _sample(w)
    above = quantized_gemm.gguf_gemm if gemm else quantized_linear.gguf_matmul
    products = [quantized_linear.gguf_linear, above]
    limit = 1
    with torch.no_grad():
        for rows in candidates:
            kernel, tiles = _median_times(
                REPEATS, products, _inputs(rows, cols, dtype), sample, clock
            )
            if not kernel_wins(kernel, tiles):
                break
            limit = rows
    return limit


def _median_times(
    repeats: int,
    products: Sequence[Callable[[torch.Tensor, GGUFWeight], torch.Tensor]],
    x: torch.Tensor,
    w: GGUFWeight,
    clock: Callable[[], float],
) -> list[float]:
    """The median time of each product, after a warm-up each, the products taking turns (a
    slow spell of the machine falls on both)."""
    for product in products:
        product(x, w)  # warm-up
    times: list[list[float]] = [[] for _ in products]
    for _ in range(repeats):
        for product, product_times in zip(products, times):
            start = clock()
            product(x, w)
            product_times.append(clock() - start)
    return [statistics.median(t) for t in times]


def _log_choice(
    model: CausalLM,
    linears: list[Linear],
    limits: dict[str, int],
    gemm: dict[str, bool],
    repacks: set[str],
    seconds: float,
) -> None:
    formats = Counter(
        [w.format for m in linears for w in m.gguf]
        + [w.format for m in linears for w in m.repacked]
    )
    repacked = sum(1 for m in linears if m.repacked)
    dense = sum(1 for m in model.modules() if isinstance(m, Linear) and m.weight is not None)
    embedding = model.embed_tokens
    held = []
    if linears:
        held.append(
            f"{len(linears)} projections ({', '.join(f'{f} x{n}' for f, n in formats.items())})"
        )
    if isinstance(embedding, Embedding) and embedding.gguf is not None:
        held.append(f"the embedding ({embedding.gguf.format})")
    if isinstance(embedding, Embedding) and embedding.repacked is not None:
        held.append(
            f"the embedding ({embedding.repacked.format}, gathered from the repacked output layer)"
        )
    if model.output_gguf is not None:
        tied = ", tied," if model.spec.tie_word_embeddings else ""
        repacked_output = ", repacked" if model.output_repacked is not None else ""
        held.append(f"the output layer{tied} ({model.output_gguf.format}{repacked_output})")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = {id(w.blocks): w.blocks.nbytes for m in linears for w in m.gguf}
    blocks.update({id(w.data): w.data.nbytes for m in linears for w in m.repacked})
    if model.output_repacked is not None:
        blocks[id(model.output_repacked.data)] = model.output_repacked.data.nbytes
    # a repacked output layer's file form is not read again (its pages were released)
    unread = model.output_gguf if model.output_repacked is not None else None
    for w in (getattr(embedding, "gguf", None), model.output_gguf):
        if w is not None and w is not unread:
            blocks[id(w.blocks)] = w.blocks.nbytes
    paths = [f"{repacked} projections repacked for the int8 GEMM at every row count"]
    if repacked:
        paths[0] += f" ({', '.join(sorted(repacks))})"
    if limits:  # some projections stay in the file's blocks
        paths.append(
            "the others: the kernel for up to "
            + ", ".join(f"{f}: {n}" for f, n in limits.items())
            + " rows, above it the int8 GEMM for "
            + (", ".join(f for f, wins in gemm.items() if wins) or "none")
            + ", decoded tiles for the rest"
        )
    if model.output_gguf is not None and model.output_repacked is None:
        above = "the int8 GEMM" if model.output_gemm else "decoded tiles"
        paths.append(
            f"the output layer: the kernel for up to {model.gguf_logits_max_rows} rows, "
            f"above it {above}"
        )
    logger.info(
        "--quantization: in the file's blocks, no dense copy: %s; dense: %d projections; "
        "%s (measured in %.2f s); weights resident: %.1f MiB",
        ", ".join(held) or "nothing",
        dense,
        "; ".join(paths),
        seconds,
        (nbytes + sum(blocks.values())) / 2**20,
    )
