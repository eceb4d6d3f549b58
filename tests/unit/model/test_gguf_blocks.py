"""--quantization auto without a dense copy: projections, embedding and output layer held only
in the GGUF file's blocks compute what the model with a bfloat16/float32 copy computes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_gguf import random_blocks, write_gguf
from tiny_models import bind_cache, forward, make_hf_model

from pagoda.model.layers.embedding import Embedding
from pagoda.model.layers.linear import Linear
from pagoda.model.loader import load_model, quantization
from pagoda.model.models import CausalLM
from pagoda.model.ops import quantized_gemm, quantized_linear
from pagoda.model.ops.quantized_linear import GGUFWeight

KERNEL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# The k-quants' super-blocks hold 256 weights: every projection needs that many columns.
K_SIZES = dict(hidden_size=256, intermediate_size=512)

pytestmark = pytest.mark.skipif(
    not quantized_linear.kernel_formats(), reason="the C++ kernels are not built"
)


def write_tiny(path: Path, qtype: str, tied: bool = True) -> Path:
    """A tiny llama whose projections and embedding (and output layer) are all in qtype."""
    sizes: dict[str, Any] = K_SIZES if qtype.endswith("_K") else {}
    hf = make_hf_model("llama", **sizes)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if tied:
        del state["lm_head.weight"]
    else:  # stored apart: the file has an output layer of its own
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    write_gguf(path, state, qtype, embedding_qtype=qtype, **sizes)
    return path


def with_dense_copy(path: Path, blocks: CausalLM, dtype: torch.dtype) -> CausalLM:
    """The model as it was with a dense copy: the file's blocks for a few rows (the same
    limits as blocks'), the dense weights above them."""
    model = load_model(path, dtype, quantized=False)
    dense = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    for name, m in blocks.named_modules():
        if isinstance(m, Linear):
            dense[name].gguf, dense[name].gguf_max_rows = m.gguf, m.gguf_max_rows
    model.output_gguf, model.gguf_logits_max_rows = blocks.output_gguf, blocks.gguf_logits_max_rows
    return model


def without_gemm(model: CausalLM) -> CausalLM:
    """The model with decoded tiles above the row limit wherever the load chose the int8
    GEMM (projections and output layer): nothing is quantized there, as with the dense copy."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.gemm_formats = frozenset()
    model.output_gemm = False
    return model


def greedy(
    model: CausalLM, prompts: list[list[int]], steps: int, together: bool
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations of the prompts, all in one batch a step or each alone; and the
    logits of every step."""
    tables, start = [], 0
    for p in prompts:
        blocks = (len(p) + steps + 3) // 4
        tables.append(list(range(start, start + blocks)))
        start += blocks
    bind_cache(model, num_blocks=start)
    tokens: list[list[int]] = [[] for _ in prompts]
    seen: list[torch.Tensor] = []
    groups = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    for step in range(steps):
        for group in groups:
            chunks = [
                (prompts[i], 0, tables[i])
                if step == 0
                else ([tokens[i][-1]], len(prompts[i]) + step - 1, tables[i])
                for i in group
            ]
            for i, logits in zip(group, forward(model, chunks)):
                tokens[i].append(int(logits[-1].argmax()))
                seen.append(logits[-1])
    return tokens, seen


def assert_same_greedy(
    model: CausalLM, reference: CausalLM, prompts: list[list[int]], steps: int, tolerance: float
) -> None:
    """The same greedy tokens and (within tolerance) logits, each sequence alone and all in
    one batch."""
    for together in (False, True):
        want, want_logits = greedy(reference, prompts, steps, together)
        got, got_logits = greedy(model, prompts, steps, together)
        assert got == want
        for a, b in zip(got_logits, want_logits):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_a_dense_load_holds_no_blocks(tmp_path: Path) -> None:
    model = load_model(write_tiny(tmp_path / "m.gguf", "Q8_0"), torch.float32)
    assert not model.holds_blocks()


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_the_model_holds_no_dense_copy(tmp_path: Path, qtype: str) -> None:
    model = load_model(write_tiny(tmp_path / "m.gguf", qtype), torch.bfloat16, quantized=True)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and (m.gguf or m.repacked) for m in linears)
    assert model.holds_blocks()  # so a float32 run's KV cache is bfloat16 under auto
    embedding = model.embed_tokens
    assert embedding.weight is None
    # tied: one table, the file's blocks or, with the output layer repacked, that form
    if model.output_repacked is None:
        assert embedding.gguf is model.output_gguf and embedding.repacked is None
    else:
        assert embedding.repacked is model.output_repacked and embedding.gguf is None
    # Only the norms' weights are left as parameters, and no buffer is a weight.
    assert all(name.endswith("norm.weight") for name, _ in model.named_parameters())
    assert all(name.endswith("cos_sin") for name, _ in model.named_buffers())
    dense = load_model(tmp_path / "m.gguf", torch.bfloat16, quantized=False)
    assert all(
        m.weight is not None and not m.gguf for m in dense.modules() if isinstance(m, Linear)
    )
    assert dense.output_gguf is None and dense.embed_tokens.gguf is None


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_blocks_alone_give_what_the_dense_copy_gave(
    tmp_path: Path, qtype: str, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens and logits, each sequence alone (the kernel) and 12 in a batch (decoded
    tiles where the dense copy was), after prompts of up to 300 tokens; tiles of 48 weight
    rows, so that every matrix takes several and a last short one."""
    if not tied and qtype not in ("Q8_0", "Q6_K"):
        pytest.skip("an untied output layer: one legacy format and one k-quant")
    monkeypatch.setattr(quantized_linear, "TILE_BYTES", 0)
    monkeypatch.setattr(quantized_linear, "MIN_TILE_ROWS", 48)
    path = write_tiny(tmp_path / "m.gguf", qtype, tied)
    blocks = without_gemm(load_model(path, torch.float32, quantized=True, repack=False))
    assert blocks.embed_tokens.weight is None and blocks.output_gguf is not None
    reference = with_dense_copy(path, blocks, torch.float32)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([300, 1, 9] * 4)]
    assert_same_greedy(blocks, reference, prompts, 6, tolerance=1e-4)


def test_blocks_give_the_dense_models_outputs_above_the_row_limit(tmp_path: Path) -> None:
    """Above the kernel's row limit nothing is quantized: the dense model's logits."""
    path = write_tiny(tmp_path / "m.gguf", "Q4_K")
    blocks = without_gemm(load_model(path, torch.float32, quantized=True, repack=False))
    dense = load_model(path, torch.float32, quantized=False)
    for model in (blocks, dense):
        bind_cache(model)
    chunk = [(list(range(3, 103)), 0, list(range(25)))]  # 100 rows: above every limit tried
    torch.testing.assert_close(forward(blocks, chunk), forward(dense, chunk))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_gemm_gives_the_same_greedy_tokens_batched_as_alone(
    tmp_path: Path, qtype: str, dtype: torch.dtype
) -> None:
    """Every step through the int8 GEMM (a row limit of 0): prompts of up to 300 tokens, 12
    sequences a step or each alone, the same greedy tokens and logits (each row's inputs
    are quantized on their own); the prompts' logits near the dense copy's."""
    path = write_tiny(tmp_path / "m.gguf", qtype)
    blocks = load_model(path, dtype, quantized=True, repack=False)
    for m in blocks.modules():
        if isinstance(m, Linear):
            m.gemm_formats, m.gguf_max_rows = frozenset([qtype]), 0
    blocks.gguf_logits_max_rows, blocks.output_gemm = 0, True  # the output layer's too
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([300, 1, 9] * 4)]
    alone, alone_logits = greedy(blocks, prompts, 6, together=False)
    together, logits = greedy(blocks, prompts, 6, together=True)
    assert together == alone
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2  # a code flipped by a rounding
    for a, b in zip(logits, alone_logits):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    dense = load_model(path, dtype, quantized=False)
    _, dense_logits = greedy(dense, prompts, 1, together=True)
    # the first step's (the same inputs): about 2-4 % on average, as for the kernel's inputs
    # quantized per 32 values (2-3 %), on this random model
    errors = [
        float((a - b).float().norm() / b.float().norm()) for a, b in zip(logits, dense_logits)
    ]
    assert max(errors) < 0.1 and sum(errors) / len(errors) < 0.06


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repacked_projections_give_the_same_greedy_tokens_batched_as_alone(
    tmp_path: Path, qtype: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the load repacks (here: told the repacked GEMM won), every projection and the
    output layer run the int8 GEMM on their repacked form at every row count: the same greedy
    tokens and logits, 12 sequences a step or each alone, and the logits of the GEMM on the
    file's blocks."""
    monkeypatch.setattr(quantization, "_repack_wins", lambda *args: True)
    path = write_tiny(tmp_path / "m.gguf", qtype)
    repacked = load_model(path, dtype, quantized=True)
    linears = [m for m in repacked.modules() if isinstance(m, Linear)]
    assert linears and all(m.repacked and not m.gguf for m in linears)
    assert repacked.output_repacked is not None  # the output layer's too
    blocks = load_model(path, dtype, quantized=True, repack=False)
    for m in blocks.modules():
        if isinstance(m, Linear):
            m.gemm_formats, m.gguf_max_rows = frozenset([qtype]), 0
    for model in (repacked, blocks):  # the output layer's through the GEMM too
        model.gguf_logits_max_rows, model.output_gemm = 0, True
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([300, 1, 9] * 4)]
    alone, alone_logits = greedy(repacked, prompts, 6, together=False)
    together, logits = greedy(repacked, prompts, 6, together=True)
    assert together == alone
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2  # a code flipped by a rounding
    for a, b in zip(logits, alone_logits):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    want, want_logits = greedy(blocks, prompts, 6, together=True)
    assert want == together
    for a, b in zip(logits, want_logits):
        assert torch.equal(a, b)  # the same products, bit for bit


@pytest.mark.parametrize("tied", [True, False])
def test_the_output_layer_runs_the_int8_gemm_above_its_row_limit_where_chosen(
    tmp_path: Path, tied: bool
) -> None:
    """Logits of more rows than the kernel's limit: the int8 GEMM on the output layer's
    blocks where the load chose it, the decoded tiles where not."""
    path = write_tiny(tmp_path / "m.gguf", "Q6_K", tied=tied)
    model = load_model(path, torch.float32, quantized=True, repack=False)
    w = model.output_gguf
    assert w is not None and model.output_held_in_blocks()
    hidden = torch.randn(20, 256, generator=torch.Generator().manual_seed(0))
    model.gguf_logits_max_rows = 4
    model.output_gemm = True
    assert torch.equal(model.compute_logits(hidden), quantized_gemm.gguf_gemm(hidden, w))
    model.output_gemm = False
    assert torch.equal(model.compute_logits(hidden), quantized_linear.gguf_matmul(hidden, w))
    model.gguf_logits_max_rows, model.output_gemm = 32, True  # the kernel below the limit
    assert torch.equal(model.compute_logits(hidden), quantized_linear.gguf_linear(hidden, w))


@pytest.mark.parametrize("wins", [True, False])
def test_the_load_times_the_int8_gemm_on_the_output_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wins: bool
) -> None:
    """The output layer's GEMM is chosen on its own measurement (the output layer's weight,
    not a projection's), and its row limit is then measured against what was chosen."""
    path = write_tiny(tmp_path / "m.gguf", "Q6_K", tied=False)
    model = load_model(path, torch.float32, quantized=True, repack=False)
    output = model.output_gguf
    timed_against: dict[str, bool] = {}

    def gemm_wins(w: GGUFWeight, dtype: torch.dtype) -> bool:
        return wins if w is output else not wins

    def row_limit(w: GGUFWeight, dtype: torch.dtype, candidates: Any, gemm: bool = False) -> int:
        timed_against["output" if w is output else w.format] = gemm
        return 8

    monkeypatch.setattr(quantization, "_gemm_wins", gemm_wins)
    monkeypatch.setattr(quantization, "_row_limit", row_limit)
    quantization.choose_paths(model, torch.float32, repack=False)
    assert model.output_gemm is wins and timed_against["output"] is wins
    assert timed_against["Q6_K"] is not wins
    assert model.gguf_logits_max_rows == 8


@pytest.mark.parametrize("rounds_lost", [0, 2, 3])
def test_repacking_is_chosen_by_a_win_at_8_rows_in_any_of_three_rounds(rounds_lost: int) -> None:
    """A round the repacked GEMM loses (a loaded machine slowing its turns) does not decide;
    three lost rounds do."""
    w = GGUFWeight(torch.from_numpy(random_blocks("Q4_K", 64 * 2)).reshape(64, -1), "Q4_K")
    ticks: list[float] = []
    repeats = quantization.REPEATS
    for round in range(3):
        kernel = 1.0 if round < rounds_lost else 2.0  # the repacked GEMM takes 1.0
        for _ in range(repeats):
            ticks += [0.0, 1.0, 0.0, kernel]  # the repacked GEMM's turn, then the kernel's
    clock = iter(ticks).__next__
    assert quantization._repack_wins(w, torch.float32, clock) is (rounds_lost < 3)


def test_a_repacked_format_is_not_timed_for_the_file_blocks_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once a format is repacked, the load spends no time choosing the file's blocks' row
    limit and GEMM for it (on an 8B file that timing took seconds of the start-up), and its
    log line speaks of no such limit."""
    path = write_tiny(tmp_path / "m.gguf", "Q4_K")
    model = load_model(path, torch.float32, quantized=True, repack=False)
    timed: list[GGUFWeight] = []

    def row_limit(w: GGUFWeight, *args: Any, **kwargs: Any) -> int:
        timed.append(w)
        return 8

    monkeypatch.setattr(quantization, "_repack_wins", lambda *args: True)
    monkeypatch.setattr(quantization, "_gemm_wins", lambda w, dtype: timed.append(w) or False)
    monkeypatch.setattr(quantization, "_row_limit", row_limit)
    caplog.clear()  # the line of the load above, which did not repack
    with caplog.at_level(logging.INFO, logger="pagoda.model.loader"):
        quantization.choose_paths(model, torch.float32)
    assert all(m.repacked for m in model.modules() if isinstance(m, Linear))
    assert model.output_repacked is not None
    assert timed == []
    line = next(r.getMessage() for r in caplog.records if "--quantization" in r.getMessage())
    assert "output layer" in line and "rows" not in line


def test_the_load_times_each_format_on_its_largest_projection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A format is timed on its largest projection (a tiny one's products take microseconds,
    where the threads' wake-ups would decide the choice)."""
    path = write_tiny(tmp_path / "m.gguf", "Q6_K", tied=False)
    model = load_model(path, torch.float32, quantized=True, repack=False)
    weights = [w for m in model.modules() if isinstance(m, Linear) for w in m.gguf]
    largest = max(weights, key=lambda w: min(w.blocks.shape[0], 1024) * w.blocks.shape[1])
    assert any(w.blocks.numel() < largest.blocks.numel() for w in weights)
    timed: list[GGUFWeight] = []

    def gemm_wins(w: GGUFWeight, dtype: torch.dtype) -> bool:
        timed.append(w)
        return False

    monkeypatch.setattr(quantization, "_gemm_wins", gemm_wins)
    monkeypatch.setattr(quantization, "_row_limit", lambda *args, **kwargs: 8)
    quantization.choose_paths(model, torch.float32, repack=False)
    assert timed[0] is largest


@pytest.mark.parametrize("scale", [None, 16.0])
def test_embedding_rows_from_blocks_equal_the_dense_tables(scale: float | None) -> None:
    """Rows gathered from the blocks and dequantized are the dense table's, scaled as before
    (Gemma multiplies by sqrt(hidden_size), rounded to the dtype first)."""
    w = GGUFWeight(torch.from_numpy(random_blocks("Q6_K", 40)), "Q6_K")  # 40 rows of 256
    dense = Embedding(40, 256, scale).to(torch.bfloat16)
    dense.weight.data = quantized_linear.dequantize_rows_torch(w, torch.bfloat16)
    blocks = Embedding(40, 256, scale)
    blocks.hold_in_blocks(torch.bfloat16)
    blocks.gguf = w
    assert blocks.weight is None
    ids = torch.tensor([3, 0, 39, 3, 17])
    assert torch.equal(blocks(ids), dense(ids))


def test_auto_says_what_it_chose(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiny(tmp_path / "m.gguf", "Q6_K")
    with caplog.at_level(logging.INFO, logger="pagoda.model.loader"):
        model = load_model(path, torch.bfloat16, quantized=True)
    line = next(r.getMessage() for r in caplog.records if "file's blocks" in r.getMessage())
    assert "Q6_K" in line and "MiB" in line
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    # a limit in rows is said of what stays in the file's blocks, if anything does
    output_kept = model.output_gguf is not None and model.output_repacked is None
    kept = any(m.gguf for m in linears) or output_kept
    assert ("rows" in line) is kept
    limits = {m.gguf_max_rows for m in model.modules() if isinstance(m, Linear)}
    assert all(limit >= 1 for limit in limits) and model.gguf_logits_max_rows >= 1


@pytest.mark.parametrize("tied", [True, False])
def test_auto_keeps_a_small_dense_copy_beside_the_blocks(
    tmp_path: Path, tied: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Up to dense_copy_max_bytes (auto: 1 GiB) the dense weights stay too, for big steps,
    and the embedding gathers from its dense table; one byte less, and none is kept."""
    path = write_tiny(tmp_path / "m.gguf", "Q4_K", tied)
    with caplog.at_level(logging.INFO, logger="pagoda.model.loader"):
        kept = load_model(path, torch.float32, quantized=True, dense_copy_max_bytes=1 << 30)
    assert any("copy" in r.getMessage() and "MiB" in r.getMessage() for r in caplog.records)
    linears = [m for m in kept.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is not None and m.gguf for m in linears)
    assert kept.embed_tokens.weight is not None and kept.embed_tokens.gguf is None
    assert kept.output_gguf is not None and not kept.output_held_in_blocks()
    copy = sum(m.weight.nbytes for m in linears) + kept.embed_tokens.weight.nbytes
    if not tied:
        copy += kept.output_weight().nbytes
    smaller = load_model(path, torch.float32, quantized=True, dense_copy_max_bytes=copy - 1)
    assert all(m.weight is None for m in smaller.modules() if isinstance(m, Linear))
    exact = load_model(path, torch.float32, quantized=True, dense_copy_max_bytes=copy)
    assert all(m.weight is not None for m in exact.modules() if isinstance(m, Linear))
    # What it computes: the kernel for a few rows, the dense weights above (the model that
    # held both before the copy became optional).
    reference = with_dense_copy(path, kept, torch.float32)
    prompts = [[(5 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([40, 1, 9] * 4)]
    assert_same_greedy(kept, reference, prompts, 4, tolerance=0)


def test_weights_held_as_stored_are_views_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No copy of a tensor the model uses as the file stores it (o_proj, down_proj, the
    embedding): its blocks lie in the file's mapping, which they keep alive; reordered
    (q, k) and stacked (q/k/v, gate/up) ones are copies. The model computes the same."""
    import gc

    from pagoda.model import loader

    path = write_tiny(tmp_path / "m.gguf", "Q8_0")
    opened: list[Any] = []
    open_gguf = loader.open_gguf

    def open_and_keep(p: Path) -> Any:
        opened.append(open_gguf(p))
        return opened[-1]

    monkeypatch.setattr(loader, "open_gguf", open_and_keep)
    model = load_model(path, torch.float32, quantized=True)
    start = opened[0].data.ctypes.data
    stop = start + len(opened[0].data)

    def in_file(w: GGUFWeight) -> bool:
        return start <= w.blocks.data_ptr() < stop

    layer = model.layers[0]
    assert in_file(layer.self_attn.o_proj.gguf[0]) and in_file(layer.mlp.down_proj.gguf[0])
    assert model.embed_tokens.gguf is not None and in_file(model.embed_tokens.gguf)
    assert not in_file(layer.self_attn.qkv_proj.gguf[0])
    assert not in_file(layer.mlp.gate_up_proj.gguf[0])

    monkeypatch.undo()
    opened.clear()
    gc.collect()
    again = load_model(path, torch.float32, quantized=True)
    for a, b in zip(model.modules(), again.modules()):  # the same paths (limits are timed)
        if isinstance(a, Linear) and isinstance(b, Linear):
            b.gguf_max_rows = a.gguf_max_rows
    again.gguf_logits_max_rows = model.gguf_logits_max_rows
    for m in (model, again):
        bind_cache(m)
    chunk = [(list(range(3, 40)), 0, list(range(10)))]
    torch.testing.assert_close(forward(model, chunk), forward(again, chunk), rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_a_repacked_output_layer_gives_the_gemms_logits(
    tmp_path: Path, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits of 1 to 20 rows from the repacked output layer: the int8 GEMM's on the file's
    blocks, bit for bit; a tied embedding gathers its rows from the repacked form, the file's
    values to the bit, and no longer reads the file."""
    monkeypatch.setattr(quantization, "_repack_wins", lambda *args: True)
    path = write_tiny(tmp_path / "m.gguf", "Q6_K", tied=tied)
    model = load_model(path, torch.float32, quantized=True)
    w = model.output_gguf
    assert w is not None and model.output_repacked is not None
    for rows in (1, 3, 20):
        hidden = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(model.compute_logits(hidden), quantized_gemm.gguf_gemm(hidden, w))
    embedding = model.embed_tokens
    if tied:
        assert embedding.gguf is None and embedding.repacked is model.output_repacked
        ids = torch.tensor([0, 5, 255, 5, 17])
        assert torch.equal(
            embedding(ids), quantized_linear.dequantize_rows(w.rows(ids), torch.float32)
        )
    else:
        assert embedding.repacked is None
