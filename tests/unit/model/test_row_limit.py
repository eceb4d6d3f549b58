"""The row limit measured at load (loader/quantization.py) is steady: the median of
interleaved timings decides, and the kernel must win by a margin, so a stray slow or fast
run, or a near tie, does not move the limit from one start to the next."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagoda.model.loader import quantization
from pagoda.model.ops import quantized_gemm, quantized_linear
from pagoda.model.ops.quantized_linear import GGUFWeight


class FakeClock:
    """A clock that each product advances by a scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_median_ignores_a_stray_run_either_way() -> None:
    clock = FakeClock()
    order: list[str] = []
    durations = {"a": iter([9.0, 1.0, 1.1, 50.0, 0.9]), "b": iter([9.0, 2.0, 0.1, 2.1, 2.0])}

    def timed(name: str):
        def product(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
            order.append(name)
            clock.now += next(durations[name])
            return x

        return product

    x = torch.zeros(1, 4)
    w = GGUFWeight(torch.zeros(1, 1, dtype=torch.uint8), "Q8_0")
    a, b = quantization._median_times(4, [timed("a"), timed("b")], x, w, clock)
    assert (a, b) == pytest.approx((1.05, 2.0))
    assert order[:2] == ["a", "b"] and order[2:] == ["a", "b"] * 4  # warm-up, then alternating


@pytest.mark.parametrize(
    ("kernel", "tiles", "wins"),
    [(1.0, 2.0, True), (1.0, 1.0, False), (1.0, 1.0 + quantization.MARGIN / 2, False)],
)
def test_the_kernel_must_win_by_the_margin(kernel: float, tiles: float, wins: bool) -> None:
    assert quantization.kernel_wins(kernel, tiles) is wins


def measured_limit(monkeypatch: pytest.MonkeyPatch, stray: bool) -> int:
    """Kernel time grows with the rows (1 a row), the tiles' does not (16): the kernel wins
    up to 8 rows and ties at 16. With stray, a slow kernel run and a fast tiles run at
    every row count."""
    clock = FakeClock()
    kernel_runs = itertools.cycle([1.0, 40.0 if stray else 1.0, 1.0, 1.0, 1.0])
    tiles_runs = itertools.cycle([16.0, 16.0, 0.5 if stray else 16.0, 16.0, 16.0])

    def kernel(x: torch.Tensor, _w: GGUFWeight) -> torch.Tensor:
        clock.now += x.shape[0] * next(kernel_runs)
        return x

    def tiles(x: torch.Tensor, _w: GGUFWeight) -> torch.Tensor:
        clock.now += next(tiles_runs)
        return x

    monkeypatch.setattr(quantized_linear, "gguf_linear", kernel)
    monkeypatch.setattr(quantized_linear, "gguf_matmul", tiles)
    w = GGUFWeight(torch.zeros(600, 34, dtype=torch.uint8), "Q8_0")  # 600 rows of 32
    return quantization._row_limit(w, torch.float32, (2, 4, 8, 16, 32), clock)


def test_the_limit_is_the_same_with_stray_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert measured_limit(monkeypatch, stray=False) == 8
    assert measured_limit(monkeypatch, stray=True) == 8


def test_the_limit_is_measured_against_the_int8_gemm_where_it_was_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gemm=True: the kernel (1 a row) against the int8 GEMM (6 a step), not the tiles (16)."""
    clock = FakeClock()

    def timed(per_row: float, fixed: float):
        def product(x: torch.Tensor, _w: GGUFWeight) -> torch.Tensor:
            clock.now += per_row * x.shape[0] + fixed
            return x

        return product

    monkeypatch.setattr(quantized_linear, "gguf_linear", timed(1.0, 0.0))
    monkeypatch.setattr(quantized_linear, "gguf_matmul", timed(0.0, 16.0))
    monkeypatch.setattr(quantized_gemm, "gguf_gemm", timed(0.0, 6.0))
    w = GGUFWeight(torch.zeros(600, 144, dtype=torch.uint8), "Q4_K")  # 600 rows of 256
    candidates = (2, 4, 8, 16, 32)
    assert quantization._row_limit(w, torch.float32, candidates, clock, gemm=False) == 8
    assert quantization._row_limit(w, torch.float32, candidates, clock, gemm=True) == 4


@pytest.mark.parametrize(("gemm", "tiles", "chosen"), [(6.0, 16.0, True), (16.0, 16.0, False)])
def test_the_int8_gemm_is_chosen_where_it_wins_by_the_margin(
    monkeypatch: pytest.MonkeyPatch, gemm: float, tiles: float, chosen: bool
) -> None:
    clock = FakeClock()

    def timed(seconds: float):
        def product(x: torch.Tensor, _w: GGUFWeight) -> torch.Tensor:
            clock.now += seconds
            return x

        return product

    monkeypatch.setattr(quantized_gemm, "gemm_takes", lambda x, w: w.format == "Q4_K")
    monkeypatch.setattr(quantized_gemm, "gguf_gemm", timed(gemm))
    monkeypatch.setattr(quantized_linear, "gguf_matmul", timed(tiles))
    w = GGUFWeight(torch.zeros(600, 144, dtype=torch.uint8), "Q4_K")
    assert quantization._gemm_wins(w, torch.float32, clock) is chosen
    other = GGUFWeight(torch.zeros(600, 34 * 8, dtype=torch.uint8), "Q8_0")
    assert quantization._gemm_wins(other, torch.float32, clock) is False
