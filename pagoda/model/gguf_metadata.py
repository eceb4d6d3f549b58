"""A GGUF file's header, read once: its metadata key-value pairs and its tensor table.

The header is parsed with struct and numpy, arrays in bulk; the tensor data stays memory-mapped
(copy-on-write: nothing is written back), and a loader's weights can be views of it.
gguf.GGUFReader builds numpy views for each element of every array, which takes about 18 s for
a 262,144-token vocabulary; this reads the same values in a fraction of a second. It needs no
torch, so the API-server process reads its tokenizer here.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pagoda.model.spec import ModelLoadError

# GGUF value types (gguf.GGUFValueType) -> struct format of a scalar, numpy dtype of an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS |= {12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8"}
_NUMPY |= {11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32  # of the tensor data, unless general.alignment says otherwise


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: a tensor's name, shape and type, and where its bytes lie."""

    name: str
    shape: tuple[int, ...]  # rows first, as PyTorch orders it (GGUF stores the reverse)
    type: str  # a gguf.GGMLQuantizationType name: "F32", "Q8_0", "Q4_K", ...
    offset: int  # of its first byte, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (as gguf's `ReaderField.contents()` gives it) and tensor table."""

    path: Path
    fields: dict[str, Any]
    tensors: list[TensorInfo]
    data: np.ndarray  # the whole file, memory-mapped, as uint8
    mapping: mmap.mmap  # the mapping data views

    def raw_bytes(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as the file stores them: a view of the mapping, which it keeps
        alive (a write would change this process's copy only)."""
        return self.data[t.offset : t.offset + t.nbytes]

    def release_pages(self, t: TensorInfo | None = None) -> None:
        """Drops the tensor's pages (all of them without t) from this process's resident
        memory; views read them from the page cache again when next used."""
        start, stop = (0, len(self.mapping)) if t is None else (t.offset, t.offset + t.nbytes)
        start -= start % mmap.PAGESIZE
        if stop > start:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


class _Corrupt(ValueError):
    """The header holds something a GGUF file cannot."""


def open_gguf(path: Path) -> GGUFFile:
    """Reads a GGUF file's header; a truncated or unreadable file raises an error naming it."""
    try:
        with path.open("rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        fields, tensors = _Header(mapping).read()
    except _Corrupt as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt): {e}") from None
    except (struct.error, IndexError, ValueError) as e:
        raise ModelLoadError(
            f"{path} ends at byte {path.stat().st_size}, inside its header: the file is "
            f"truncated or corrupt ({e})"
        ) from None
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if end > len(mapping):
        raise ModelLoadError(
            f"{path} is truncated: it has {len(mapping)} bytes, its tensor data runs to byte {end}"
        )
    return GGUFFile(path, fields, tensors, np.frombuffer(mapping, np.uint8), mapping)


class _Header:
    """Reads the header from the start of a mapped file, one value after the other."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def read(self) -> tuple[dict[str, Any], list[TensorInfo]]:
        magic, version, num_tensors, num_kv = self.unpack("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise _Corrupt(
                f"not a little-endian GGUF file of version 2 or 3 ({magic!r}, {version})"
            )
        fields = {}
        for _ in range(num_kv):
            key = self.string()
            (kind,) = self.unpack("<I")
            fields[key] = self.value(kind)
        infos = [self.tensor_info() for _ in range(num_tensors)]
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        data_start = -(-self.pos // alignment) * alignment
        tensors = [replace(t, offset=data_start + t.offset) for t in infos]
        if len({t.name for t in tensors}) != len(tensors):
            raise _Corrupt("a tensor name comes twice")
        return fields, tensors

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        if self.pos + n > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<IQ")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_numpy_type(item))
            items = np.frombuffer(self.data, dtype, count, self.pos).tolist()
            self.pos += dtype.itemsize * count
            return items
        if kind not in _SCALARS:
            raise _Corrupt(f"unknown value type {kind}")
        return self.unpack("<" + _SCALARS[kind])[0]

    def tensor_info(self) -> TensorInfo:
        """An entry with its offset from the start of the data section."""
        name = self.string()
        (num_dims,) = self.unpack("<I")
        dims = self.unpack(f"<{num_dims}Q")
        kind, offset = self.unpack("<IQ")
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise _Corrupt(f"tensor {name!r} has the unknown type {kind}") from None
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        num_elements = int(np.prod(dims, dtype=np.int64))
        if num_elements % block_size:
            raise _Corrupt(f"tensor {name!r} is no whole number of {qtype.name} blocks")
        nbytes = num_elements // block_size * block_bytes
        return TensorInfo(name, tuple(reversed(dims)), qtype.name, offset, nbytes)


def _numpy_type(kind: int) -> str:
    if kind not in _NUMPY:
        raise _Corrupt(f"unknown array item type {kind}")
    return _NUMPY[kind]


def read_tokenizer_fields(path: Path) -> dict[str, Any]:
    """Tokens, scores, merges, token types, special ids, flags and chat template of a GGUF file.

    A flag the file does not set is None, so that the tokenizer can apply llama.cpp's default.
    """
    fields = open_gguf(path).fields

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
