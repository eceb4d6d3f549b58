"""The op families' tests: kernels_built, for the tests that call the C++ kernels, and
linear_kernels / gemm_kernels for those that call the quantized ones."""

from __future__ import annotations

import pytest
from kernel_checks import cpu_flags

from pagoda import envs, kernels
from pagoda.model.ops.quantized_gemm import gemm_formats
from pagoda.model.ops.quantized_linear import kernel_formats

# The quantized kernels (quantized_linear.cpp, quantized_gemm.cpp) are compiled for AVX-512
# VNNI or, without it, for AVX2 + FMA + F16C: on a CPU that has these a build without those
# kernels is a failure; on one without them their tests skip and the PyTorch twins run.
AVX2_KERNEL_FLAGS = frozenset({"avx2", "fma", "f16c"})


@pytest.fixture(scope="session")
def kernels_built() -> None:
    """Skips where the kernels are switched off; fails where they should be there but are not."""
    if envs.PAGODA_DISABLE_KERNELS:
        pytest.skip("kernels disabled (PAGODA_DISABLE_KERNELS)")
    assert kernels.load(), "the C++ kernels are not built: python -m pagoda.kernels"


def _quantized(formats: frozenset[str], op: str, flags: frozenset[str], needs: str) -> None:
    if formats:
        return
    assert not flags <= cpu_flags(), f"this CPU runs {op}, but the build lacks it"
    pytest.skip(f"{op} is not built for this CPU (it needs {needs})")


@pytest.fixture(scope="session")
def linear_kernels(kernels_built: None) -> None:
    """As kernels_built, for gguf_linear and the dequantizer: skips on a CPU they need more of."""
    _quantized(kernel_formats(), "gguf_linear", AVX2_KERNEL_FLAGS, "AVX2, FMA and F16C")


@pytest.fixture(scope="session")
def gemm_kernels(kernels_built: None) -> None:
    """As kernels_built, for the int8 GEMM: skips on a CPU it needs more of."""
    _quantized(gemm_formats(), "gguf_gemm", AVX2_KERNEL_FLAGS, "AVX2, FMA and F16C")
