"""python -m pagoda.kernels: build the C++ kernels for this machine."""

import time

from pagoda.kernels import build

start = time.perf_counter()
path = build(verbose=False)
print(f"built {path} in {time.perf_counter() - start:.0f} s")
