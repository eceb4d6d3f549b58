"""A GGUF file's header: the gguf package's reader, and a fast one for its metadata alone.

Neither needs torch, so the API-server process reads its tokenizer with them.
"""

from __future__ import annotations

import mmap
import struct
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


# GGUF value types (gguf.GGUFValueType) -> struct format of a scalar.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8"}
_NUMPY |= {11: "<i8", 12: "<f8"}


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key-value pair of a GGUF file's header, as gguf's `ReaderField.contents()` gives it.

    gguf.GGUFReader builds numpy views for each element of every array, which takes about 10 s
    for a 262,144-token vocabulary; this reads the same values in well under a second.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_kv(data)
    except _NotGGUF as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt): {e}") from None
    except (struct.error, IndexError, ValueError) as e:
        raise ModelLoadError(
            f"{path} ends at byte {path.stat().st_size}, inside its header: the file is "
            f"truncated or corrupt ({e})"
        ) from None


class _NotGGUF(ValueError):
    """The file does not start as a GGUF file this reader knows."""


def _read_kv(data: mmap.mmap) -> dict[str, Any]:
    magic, version, _, num_kv = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise _NotGGUF(f"not a little-endian GGUF file of version 2 or 3 ({magic!r}, {version})")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        if pos + 8 + n > len(data):
            raise ValueError("a string runs past the end of the file")
        text = data[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace")
        pos += 8 + n
        return text

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item == _STRING:
                return [string() for _ in range(count)]
            if item == _ARRAY:
                return [value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY[item])
            items = np.frombuffer(data, dtype, count, pos).tolist()
            pos += dtype.itemsize * count
            return items
        fmt = "<" + _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    fields: dict[str, Any] = {}
    for _ in range(num_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        fields[key] = value(kind)
    return fields


def read_tokenizer_fields(path: Path) -> dict[str, Any]:
    """Tokens, scores, merges, token types, special ids, flags and chat template of a GGUF file.

    A flag the file does not set is None, so that the tokenizer can apply llama.cpp's default.
    """
    fields = read_metadata(path)

    def get(key: str, default: Any = None) -> Any:
        return fields.get(key, default)

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
