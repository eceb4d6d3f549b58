"""The engine process's malloc settings: big blocks freed go back to the OS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter, so that the test process's own heap is left as it is: 8 MiB is
# allocated, freed and allocated again, and mallinfo2's hblks counts the blocks glibc mapped
# on their own (the interpreter's among them: the counts are the change the second makes).
# Left alone, glibc raises its mmap threshold to the size of the first block when it is
# freed, so the second comes from the heap.
SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    from pagoda.engine.core import limit_heap

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = Mallinfo2
    if sys.argv[1] == "limited":
        assert limit_heap()
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(8 << 20)
    held = libc.mallinfo2().hblks
    libc.free(block)
    print(held - before, libc.mallinfo2().hblks - before)
    """
)


def mapped_blocks(mode: str) -> tuple[int, int]:
    """(the blocks mapped on their own more while the second 8 MiB is held, more after it is
    freed)."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    held, after = result.stdout.split()
    return int(held), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_big_blocks_stay_mapped_on_their_own_and_are_unmapped_when_freed() -> None:
    assert mapped_blocks("default") == (0, 0)  # the second block came from the heap
    assert mapped_blocks("limited") == (1, 0)  # mapped, and unmapped when freed
