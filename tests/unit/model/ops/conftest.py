"""The op families' tests: kernels_built, for the tests that call the C++ kernels."""

from __future__ import annotations

import pytest

from pagoda import envs, kernels


@pytest.fixture(scope="session")
def kernels_built() -> None:
    """Skips where the kernels are switched off; fails where they should be there but are not."""
    if envs.PAGODA_DISABLE_KERNELS:
        pytest.skip("kernels disabled (PAGODA_DISABLE_KERNELS)")
    assert kernels.load(), "the C++ kernels are not built: python -m pagoda.kernels"
