"""Loading a model leaves torch's compiler stack unimported: the engine never uses it, and
importing torch._dynamo and sympy costs the engine process about 70 MiB of memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LOAD = """
import sys
import torch
from pathlib import Path
from pagoda.model.loader import load_model
model = load_model(Path(sys.argv[1]), torch.bfloat16, "cpu", quantized=sys.argv[2] == "gguf")
assert model.embed_tokens.weight is not None or model.embed_tokens.gguf is not None
print(" ".join(m for m in ("torch._dynamo", "sympy") if m in sys.modules) or "none")
"""


def imported_after_loading(path: Path, form: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), form],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_loading_a_gguf_file_imports_no_compiler(default_model_path: Path) -> None:
    assert imported_after_loading(default_model_path, "gguf") == "none"


@pytest.mark.slow
def test_loading_a_safetensors_directory_imports_no_compiler(tiny_model_dir) -> None:
    assert imported_after_loading(tiny_model_dir("llama"), "dense") == "none"
