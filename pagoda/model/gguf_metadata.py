"""The tokenizer fields of a GGUF file, read with the gguf package (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from pagoda.model.spec import ModelLoadError


def open_reader(path: Path) -> gguf.GGUFReader:
    """Opens a GGUF file, turning the reader's errors into one that names the file."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e


def read_tokenizer_fields(path: Path) -> dict[str, Any]:
    """Tokens, merges, token types, special ids and chat template of a GGUF file."""
    reader = open_reader(path)

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(f"tokenizer.{key}")
        return f.contents() if f is not None else default

    if get("ggml.tokens") is None:
        raise ModelLoadError(f"{path} carries no tokenizer")
    return {
        "model": get("ggml.model"),
        "pre": get("ggml.pre", "default"),
        "tokens": get("ggml.tokens"),
        "merges": get("ggml.merges", []),
        "token_types": get("ggml.token_type", []),
        "bos_token_id": get("ggml.bos_token_id"),
        "eos_token_id": get("ggml.eos_token_id"),
        "eot_token_id": get("ggml.eot_token_id"),
        "add_bos": bool(get("ggml.add_bos_token", False)),
        "chat_template": get("chat_template"),
    }
