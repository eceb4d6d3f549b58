"""Small GGUF files that carry only a tokenizer, in the shape real files of each family have.

The vocabularies are learned from a short corpus with the `tokenizers` trainers, so that merges and
scores are consistent, then written with the metadata keys llama.cpp's converter writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog didn't care; it's lazy.",
    "Hello world! Hello there, world. 1234567 + 89 = 1234656",
    "def main():\n    print('hello')\n    return 0\n\n\nif __name__ == '__main__':\n    main()",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "naïve café résumé — über straße; Ünïcödé and CamelCaseWords and HTTPServer",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "   leading spaces, trailing spaces   \n\t tabs\tand\r\nwindows lines",
    "I'm, you're, we've, they'll, she'd, HE'S, WE'RE shouting",
]

# The split patterns llama.cpp's converter records under `tokenizer.ggml.pre`, as the original
# tokenizer.json files have them (the vocabulary is learned with the same split).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre -> (architecture, split pattern, special tokens: bos, eos, others)
BPE_VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "llama-bpe": (
        "llama",
        _LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"],
    ),
    "qwen2": ("qwen2", _QWEN2, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    "qwen35": ("qwen2", _QWEN35, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    "tekken": ("llama", _TEKKEN, ["<s>", "</s>", "[INST]", "[/INST]"]),
    "llama4": ("llama", _GPT4O, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot|>"]),
}


def _train(tokenizer: Tokenizer, trainer: Any) -> Tokenizer:
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer


def _write(
    path: Path,
    arch: str,
    model: str,
    pre: str,
    tokens: list[str],
    types: list[int],
    *,
    scores: list[float] | None = None,
    merges: list[str] | None = None,
    bos: int | None = None,
    eos: int | None = None,
    unk: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)  # transformers reads a model config from the file too
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for value, add in (
        (bos, w.add_bos_token_id),
        (eos, w.add_eos_token_id),
        (unk, w.add_unk_token_id),
    ):
        if value is not None:
            add(value)
    for key, value in (extra or {}).items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_bpe_gguf(path: Path, pre: str, **extra: Any) -> Path:
    """A byte-level BPE vocabulary split by the `pre` variant's pattern, as llama.cpp writes it."""
    arch, pattern, specials = BPE_VARIANTS[pre]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    _train(tok, trainer)
    state = tok.to_str()
    import json

    model = json.loads(state)["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    # A user-defined token (type 4), matched whole but not special, as `<think>` in newer files.
    tokens.append("<think>")
    types.append(4)
    return _write(
        path,
        arch,
        "gpt2",
        pre,
        tokens,
        types,
        merges=merges,
        bos=tokens.index(specials[0]),
        eos=tokens.index(specials[1]),
        extra=extra,
    )


def write_sentencepiece_gguf(path: Path, **extra: Any) -> Path:
    """A Llama 2 style SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, scored pieces."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False, max_token_length=16)
    _train(tok, trainer)
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *bytes_, *pieces, "<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    # SentencePiece scores its pieces best-first: the earlier a piece was learned, the higher.
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))] + [0.0]
    return _write(
        path,
        "llama",
        "llama",
        "default",
        tokens,
        types,
        scores=scores,
        bos=1,
        eos=2,
        unk=0,
        extra=extra,
    )
