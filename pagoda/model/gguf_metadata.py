"""The tokenizer fields of a GGUF file, read with the gguf package (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pagoda.model.spec import ModelLoadError


class _PastEnd(Exception):
    """A read that runs past the end of the file."""

    def __init__(self, end: int, in_data: bool) -> None:
        self.end, self.in_data = end, in_data


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that stops at a read past the end of the file (it would fail on a short array)."""

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: Any = None
    ) -> np.ndarray:
        end = offset + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            # data_offset is set once the header (metadata and tensor infos) has been read
            raise _PastEnd(end, in_data=hasattr(self, "data_offset"))
        return super()._get(offset, dtype, count, override_order)


def open_reader(path: Path) -> gguf.GGUFReader:
    """Opens a GGUF file; a truncated or unreadable one raises an error that names the file."""
    try:
        return _CheckedReader(str(path))
    except _PastEnd as e:
        size = path.stat().st_size
        if e.in_data:
            raise ModelLoadError(
                f"{path} is truncated: it has {size} bytes, its tensor data runs to byte {e.end}"
            ) from None
        raise ModelLoadError(
            f"{path} ends at byte {size}, inside its header: the file is truncated or corrupt"
        ) from None
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt): {e}") from e


def read_tokenizer_fields(path: Path) -> dict[str, Any]:
    """Tokens, scores, merges, token types, special ids, flags and chat template of a GGUF file.

    A flag the file does not set is None, so that the tokenizer can apply llama.cpp's default.
    """
    reader = open_reader(path)

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    if get("tokenizer.ggml.tokens") is None:
        raise ModelLoadError(f"{path} carries no tokenizer")
    return {
        "architecture": get("general.architecture"),
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre", "default"),
        "tokens": get("tokenizer.ggml.tokens"),
        "scores": get("tokenizer.ggml.scores", []),
        "merges": get("tokenizer.ggml.merges", []),
        "token_types": get("tokenizer.ggml.token_type", []),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "eot_token_id": get("tokenizer.ggml.eot_token_id"),
        "eom_token_id": get("tokenizer.ggml.eom_token_id"),
        "unk_token_id": get("tokenizer.ggml.unknown_token_id"),
        "pad_token_id": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "add_eos": bool(get("tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix"),
        "chat_template": get("tokenizer.chat_template"),
    }
