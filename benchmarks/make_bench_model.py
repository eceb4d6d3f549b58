"""Builds a random-weight benchmark model in Llama-3.2-1B's (or Llama-3.1-8B's) shape.

    .venv/bin/python benchmarks/make_bench_model.py [--shape 1b|8b] [--seed 0] [--out DIR]

Writes, deterministically from the seed, under DIR (default
~/.cache/pagoda-bench-models/llama-1b-shape, or llama-8b-shape):

    hf/                     bfloat16 safetensors, config.json, generation_config.json and the
                            tokenizer (for vLLM and Pagoda)
    model-f16.gguf          the same weights as GGUF, laid out as llama.cpp's
                            convert_hf_to_gguf does (Q/K rows permuted, norms in F32)
    model-q4_k_m.gguf       made from the F16 file by llama.cpp's own quantizer
    model-q8_0.gguf         (`llama_cpp.llama_model_quantize`, the anchors' llama-cpp-python)

The vocabulary and tokenizer are the embedded default model's (SmolLM2-135M), so that every
client and server can share them. Random weights give meaningless text but honest timings: the
projections are drawn with std 0.02 and the norms are ones, so activations stay in a sane range
(run the benchmarks with EOS ignored). `--shape 8b` builds layer by layer, writes no HF
directory and keeps only the Q4_K_M file (the F16 one, ~15 GB, is deleted unless --keep-f16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

ANCHORS = Path(os.environ.get("ANCHORS", Path.home() / ".cache" / "pagoda-anchors"))
CACHE = Path.home() / ".cache" / "pagoda-bench-models"
INIT_STD = 0.02  # as Llama's initializer_range


@dataclass(frozen=True, kw_only=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    context: int = 8192


SHAPES = {
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, tied=True),
    "8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336, tied=False),
}
# The layer tensors, HF name -> (GGUF name, rows, columns as a function of the shape).
LAYER = {
    "input_layernorm": ("attn_norm", lambda s: (s.hidden,)),
    "self_attn.q_proj": ("attn_q", lambda s: (s.heads * s.head_dim, s.hidden)),
    "self_attn.k_proj": ("attn_k", lambda s: (s.kv_heads * s.head_dim, s.hidden)),
    "self_attn.v_proj": ("attn_v", lambda s: (s.kv_heads * s.head_dim, s.hidden)),
    "self_attn.o_proj": ("attn_output", lambda s: (s.hidden, s.heads * s.head_dim)),
    "post_attention_layernorm": ("ffn_norm", lambda s: (s.hidden,)),
    "mlp.gate_proj": ("ffn_gate", lambda s: (s.ffn, s.hidden)),
    "mlp.up_proj": ("ffn_up", lambda s: (s.ffn, s.hidden)),
    "mlp.down_proj": ("ffn_down", lambda s: (s.hidden, s.ffn)),
}


def tensor_table(shape: Shape, vocab: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, shape) of every tensor, in the order they are written."""
    table = [("model.embed_tokens.weight", "token_embd.weight", (vocab, shape.hidden))]
    for i in range(shape.layers):
        for hf, (gg, dims) in LAYER.items():
            table.append((f"model.layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", dims(shape)))
    table.append(("model.norm.weight", "output_norm.weight", (shape.hidden,)))
    if not shape.tied:
        table.append(("lm_head.weight", "output.weight", (vocab, shape.hidden)))
    return table


def make_tensor(name: str, dims: tuple[int, ...], seed: int) -> torch.Tensor:
    """One bfloat16 tensor: ones for a norm, N(0, 0.02) otherwise; a function of (seed, name)."""
    if len(dims) == 1:
        return torch.ones(dims, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return (torch.randn(dims, generator=generator) * INIT_STD).to(torch.bfloat16)


def permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf order of Q/K rows (rotary pairs interleaved)."""
    # [heads, 2, head_dim // 2, hidden] -> [heads, head_dim // 2, 2, hidden]
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def to_gguf(hf_name: str, w: torch.Tensor, shape: Shape) -> np.ndarray:
    """A tensor as the F16 GGUF stores it: 1-D in float32, Q/K rows permuted."""
    if w.dim() == 1:
        return w.float().numpy()
    a = w.float().numpy().astype(np.float16)
    if hf_name.endswith("q_proj.weight"):
        a = permute(a, shape.heads)
    elif hf_name.endswith("k_proj.weight"):
        a = permute(a, shape.kv_heads)
    return a


def default_tokenizer_gguf() -> Path:
    from pagoda.model_files import default_model_path

    return default_model_path()


def copy_tokenizer_metadata(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copies the tokenizer.* keys of a GGUF file; returns its vocabulary size."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def write_hf_metadata(out: Path, shape: Shape, vocab: int, tokenizer_source: Path) -> None:
    """config.json, generation_config.json and the tokenizer files of the HF directory."""
    from pagoda.tokenizer import Tokenizer

    tok = Tokenizer.from_path(tokenizer_source)
    eos = tok.eos_token_ids[0]
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.ffn,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "max_position_embeddings": shape.context,
        "rms_norm_eps": shape.rms_eps,
        "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": shape.tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "initializer_range": INIT_STD,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": tok.eos_token_ids, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tok.backend.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.eos_token,
        "model_max_length": shape.context,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if tok.chat_template:
        (out / "chat_template.jinja").write_text(tok.chat_template)


def write_model(
    out: Path, shape: Shape, seed: int, hf: bool, tokenizer_source: Path | None = None
) -> Path:
    """Writes out/model-f16.gguf (and out/hf/ when hf), one tensor at a time; returns the GGUF."""
    tokenizer_source = tokenizer_source or default_tokenizer_gguf()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model-f16.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random llama {out.name} seed {seed}")
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = copy_tokenizer_metadata(writer, tokenizer_source)
    writer.add_vocab_size(vocab)
    table = tensor_table(shape, vocab)
    for _, gg, dims in table:
        np_dtype = np.float32 if len(dims) == 1 else np.float16
        nbytes = int(np.prod(dims)) * np.dtype(np_dtype).itemsize
        writer.add_tensor_info(gg, dims, np.dtype(np_dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    state: dict[str, torch.Tensor] = {}
    for hf_name, _, dims in table:
        w = make_tensor(hf_name, dims, seed)
        writer.write_tensor_data(to_gguf(hf_name, w, shape))
        if hf:
            state[hf_name] = w
    writer.close()
    if hf:
        from safetensors.torch import save_file

        hf_dir = out / "hf"
        hf_dir.mkdir(exist_ok=True)
        save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        write_hf_metadata(hf_dir, shape, vocab, tokenizer_source)
    return path


QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),
                                        ctypes.byref(params)))
"""


def quantize(source: Path, qtype: str, python: Path) -> Path:
    """llama.cpp's own quantizer, F16 GGUF -> qtype (Q4_K_M, Q8_0, ...)."""
    target = source.with_name(f"model-{qtype.lower()}.gguf")
    subprocess.run([str(python), "-c", QUANTIZE, str(source), str(target), qtype], check=True)
    return target


def sizes(out: Path) -> Iterator[str]:
    for path in sorted(out.rglob("*")):
        if path.is_file():
            yield f"{path.stat().st_size / 1e9:7.3f} GB  {path}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--types", nargs="*", default=None, help="default: Q4_K_M Q8_0 (1b), Q4_K_M (8b)"
    )
    parser.add_argument("--keep-f16", action="store_true", help="8b: keep the F16 GGUF")
    parser.add_argument(
        "--llamacpp-python", type=Path, default=ANCHORS / "llamacpp-venv" / "bin" / "python"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    big = args.shape == "8b"
    out = args.out or CACHE / f"llama-{args.shape}-shape"
    types = args.types if args.types is not None else (["Q4_K_M"] if big else ["Q4_K_M", "Q8_0"])
    start = time.monotonic()
    f16 = write_model(out, SHAPES[args.shape], args.seed, hf=not big)
    print(f"wrote {f16} in {time.monotonic() - start:.0f} s")
    for qtype in types:
        quantize(f16, qtype, args.llamacpp_python)
        print(f"quantized {qtype} after {time.monotonic() - start:.0f} s")
    if big and not args.keep_f16:
        f16.unlink()
    print("\n".join(sizes(out)))


if __name__ == "__main__":
    main()
