"""open_gguf reads a GGUF header's key-value pairs and tensor table as the gguf package does."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import tiny_gemma3, write_gemma3_gguf, write_gguf
from tiny_models import make_hf_model
from tiny_tokenizers import write_bpe_gguf, write_sentencepiece_gguf

from pagoda.model.gguf_metadata import open_gguf
from pagoda.model.spec import ModelLoadError


def assert_same_as_gguf(path: Path) -> None:
    reader = gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    gguf_file = open_gguf(path)
    assert gguf_file.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert gguf_file.fields[key] == value, key
        assert type(gguf_file.fields[key]) is type(value), key
    assert [t.name for t in gguf_file.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(gguf_file.tensors, reader.tensors):
        assert ours.shape == tuple(int(n) for n in reversed(theirs.shape)), ours.name
        assert ours.type == theirs.tensor_type.name, ours.name
        assert ours.offset == theirs.data_offset and ours.nbytes == theirs.n_bytes, ours.name
        raw = np.asarray(theirs.data).reshape(-1).view(np.uint8)
        assert np.array_equal(gguf_file.raw_bytes(ours), raw), ours.name


def test_small_files(tmp_path: Path) -> None:
    assert_same_as_gguf(write_sentencepiece_gguf(tmp_path / "s.gguf", add_space_prefix=False))
    assert_same_as_gguf(write_bpe_gguf(tmp_path / "b.gguf", "qwen2", chat_template="{{ x }}"))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1", "Q5_0"])
def test_tiny_llama(tmp_path: Path, qtype: str) -> None:
    hf = make_hf_model("llama")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "m.gguf", state, qtype, embedding_qtype="Q8_0")
    assert_same_as_gguf(tmp_path / "m.gguf")


def test_tiny_gemma3(tmp_path: Path) -> None:
    hf = tiny_gemma3(layers=2)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_gemma3_gguf(tmp_path / "g.gguf", state, hf.config, sliding_window_pattern=[False, True])
    assert_same_as_gguf(tmp_path / "g.gguf")


@pytest.mark.slow
def test_gemma3_file(gemma3_gguf_path: Path) -> None:
    assert_same_as_gguf(gemma3_gguf_path)  # gguf's reader takes about 18 s on its vocabulary


def test_default_model(default_model_path: Path) -> None:
    assert_same_as_gguf(default_model_path)


def test_truncated_header_is_named(tmp_path: Path) -> None:
    path = write_sentencepiece_gguf(tmp_path / "s.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.gguf ends at byte"):
        open_gguf(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelLoadError, match="bad.gguf is not a readable GGUF file"):
        open_gguf(tmp_path / "bad.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.gguf ends at byte 0"):
        open_gguf(tmp_path / "empty.gguf")
