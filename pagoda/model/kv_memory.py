"""The KV cache's memory: one (k_cache, v_cache) pair of tensors per layer.

Each tensor is [num_blocks, num_kv_heads, block_size, head_dim]; the layout and
the slots the tokens go to are described in attention_metadata.py.
"""

from __future__ import annotations

import sys

import torch


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair per layer, each [num_blocks, kv_heads, block_size, head_dim].

    The cache starts zeroed (padding slots are multiplied by zero attention weights,
    and 0 * garbage could be NaN). On the CPU the zeros come from the kernel's
    zero pages, so memory is only resident once a block is written.
    """
    shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
    if torch.device(device).type == "cpu":
        caches = _lazy_zeros(shape, dtype)
    else:
        caches = torch.zeros(shape, dtype=dtype, device=device)
    return [(layer[0], layer[1]) for layer in caches]


HUGE_PAGE = 2 << 20


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages become resident as they are written, in 2 MiB pages where possible.

    The first write to a page costs a fault; under a hypervisor a 4 KiB fault costs
    about 10 us, which made writing a 256-token prompt's keys into fresh blocks take
    0.5 ms a layer. Transparent huge pages cut the faults 512-fold (BENCHMARKS.md).
    """
    import numpy as np

    nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(nbytes + HUGE_PAGE, dtype=np.uint8)  # calloc: lazily zeroed pages
    offset = -raw.ctypes.data % HUGE_PAGE
    raw = raw[offset : offset + nbytes]
    _advise_huge_pages(raw.ctypes.data, nbytes)
    return torch.from_numpy(raw).view(dtype).view(shape)


def _advise_huge_pages(address: int, length: int) -> None:
    """madvise(MADV_HUGEPAGE) on Linux; a no-op where there are no transparent huge pages."""
    import ctypes

    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
