"""read_metadata reads a GGUF header's key-value pairs as the gguf package's reader does."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_tokenizers import write_bpe_gguf, write_sentencepiece_gguf

from pagoda.model.gguf_metadata import open_reader, read_metadata
from pagoda.model.spec import ModelLoadError


def assert_same_as_gguf(path: Path) -> None:
    reader = open_reader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    fields = read_metadata(path)
    assert fields.keys() == expected.keys()
    for key, value in expected.items():
        assert fields[key] == value, key
        assert type(fields[key]) is type(value), key


def test_small_files(tmp_path: Path) -> None:
    assert_same_as_gguf(write_sentencepiece_gguf(tmp_path / "s.gguf", add_space_prefix=False))
    assert_same_as_gguf(write_bpe_gguf(tmp_path / "b.gguf", "qwen2", chat_template="{{ x }}"))


def test_default_model(default_model_path: Path) -> None:
    assert_same_as_gguf(default_model_path)


def test_truncated_header_is_named(tmp_path: Path) -> None:
    path = write_sentencepiece_gguf(tmp_path / "s.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.gguf ends at byte"):
        read_metadata(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        read_metadata(tmp_path / "bad.gguf")
