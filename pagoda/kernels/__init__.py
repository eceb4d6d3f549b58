"""Optional C++ kernels for the CPU (csrc/: one .cpp per op family), built once at install time.

`python -m pagoda.kernels` compiles them into build/ (scripts/setup.sh does);
`load()` registers them as torch.ops.pagoda.* when a build of the current
source is there. Without one, pagoda/model/ops/ runs the same computations
in plain PyTorch, only slower. PAGODA_DISABLE_KERNELS=1 forces that path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pagoda import envs

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
BUILD_DIR = Path(__file__).parent / "build"
NAME = "pagoda_kernels"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _sources() -> list[Path]:
    """The files compiled (every .cpp) and the headers they include, in a fixed order."""
    return sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))


def _source_digest() -> str:
    """A digest of every source file, by name and content, and of the flags."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build(verbose: bool = False) -> Path:
    """Compiles the kernels (about a minute) and records which source they came from."""
    from torch.utils import cpp_extension

    BUILD_DIR.mkdir(exist_ok=True)
    cpp_extension.load(
        name=NAME,
        sources=[str(p) for p in _sources() if p.suffix == ".cpp"],
        extra_cflags=FLAGS,
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=verbose,
    )
    (BUILD_DIR / "source.sha256").write_text(_source_digest())
    return BUILD_DIR / f"{NAME}.so"


def available(x: torch.Tensor) -> bool:
    """Whether the C++ kernels take x: a CPU tensor, with a build of this source loaded.

    The one place this is decided; each op's dispatcher adds only its own shape rules."""
    return x.device.type == "cpu" and load()


@functools.cache
def load() -> bool:
    """Registers torch.ops.pagoda.* from a build of the current source; False without one."""
    if envs.PAGODA_DISABLE_KERNELS:
        return False
    library = BUILD_DIR / f"{NAME}.so"
    stamp = BUILD_DIR / "source.sha256"
    if not library.exists() or not stamp.exists() or stamp.read_text() != _source_digest():
        logger.warning(
            "C++ kernels are not built for this source; running the slower PyTorch path "
            "(build them with: python -m pagoda.kernels)"
        )
        return False
    import torch

    torch.ops.load_library(str(library))
    return True
