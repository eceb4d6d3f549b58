"""The `tokenizers` backend that a GGUF file's vocabulary describes.

A GGUF carries no tokenizer.json: it stores the tokens, their types and scores, the merges (for
byte-level BPE) and a few flags under llama.cpp's keys. Two families of vocabulary come out of it:

    tokenizer.ggml.model   what it is                              examples
    gpt2                   byte-level BPE, split by a regex that   SmolLM2, Llama 3, Qwen2/3,
                           `tokenizer.ggml.pre` names              Mistral Nemo (tekken)
    llama                  SentencePiece BPE with byte fallback;   Llama 2, Mistral 7B,
                           merges ranked by the pieces' scores     TinyLlama, Gemma 1-3

Each is built as transformers builds it from the same file (transformers/integrations/gguf), so
that both agree token for token. The pre-tokenizer patterns are those of the original
tokenizer.json files, which llama.cpp's llama-vocab.cpp also follows.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from pagoda.model.spec import ModelLoadError

SUPPORTED_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}

# llama.cpp's token types (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns of byte-level BPE vocabularies, by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 and Qwen3 split digits one by one.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# Qwen3.5 also keeps combining marks with the letters they follow.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken: words split at case changes (CamelCase -> Camel, Case), digits one by one,
# no English contractions.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-4o and Llama 4: tekken's case split with the contractions kept on the word.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("falcon3", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# Vocabularies split by GPT-2's own pattern (ByteLevel's regex); SmolLM also splits digits.
_GPT2_PRES = ("default", "gpt2", "smollm")

# Architectures whose SentencePiece files need Gemma's treatment (see _gemma).
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


# Tokens that end a turn in chat templates; llama.cpp stops at them whatever the file says.
_END_OF_TURN_TOKENS = frozenset(
    (
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<end_of_utterance>",
    )
)


def supported_pre_tokenizers() -> list[str]:
    return sorted([*_GPT2_PRES, *_PRE_SPLITS])


def build_backend(meta: dict[str, Any]) -> Backend:
    """The backend for the GGUF tokenizer fields `meta` (gguf_metadata.read_tokenizer_fields)."""
    kind = meta["model"]
    if kind == "gpt2":
        backend = _byte_level(meta)
    elif kind == "llama" and meta["architecture"] in _GEMMA_ARCHITECTURES:
        backend = _gemma(meta)
    elif kind == "llama":
        backend = _sentencepiece(meta)
    else:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items())
        raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r}; supported: {supported}")
    _add_file_tokens(backend, meta)
    backend.post_processor = _post_processor(meta)
    return backend


def end_of_generation_ids(meta: dict[str, Any]) -> list[int]:
    """The ids that end a generation: EOS, EOT and EOM when the file names them, and the
    end-of-turn tokens that llama.cpp recognises by their text (Gemma's files name only <eos>,
    while its turns end with <end_of_turn>)."""
    ids = [meta[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if meta[k] is not None]
    ids += [i for i, t in enumerate(meta["tokens"]) if t in _END_OF_TURN_TOKENS]
    return list(dict.fromkeys(ids))


def add_bos(meta: dict[str, Any]) -> bool:
    """Whether encode() starts with BOS: the file's flag; SentencePiece files without one do."""
    if meta["add_bos"] is not None:
        return bool(meta["add_bos"])
    return meta["model"] == "llama"


def _byte_level(meta: dict[str, Any]) -> Backend:
    pre = meta["pre"]
    if pre not in _PRE_SPLITS and pre not in _GPT2_PRES:
        raise ModelLoadError(
            f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
            f"supported: {', '.join(supported_pre_tokenizers())}"
        )
    # Every token of a byte-level vocabulary is spelled in GPT-2's byte alphabet; a few files
    # store some (special ones) as plain text, which is respelled byte by byte.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
        for i, t in enumerate(meta["tokens"])
    }
    merges = _file_merges(meta) or _merges_from_vocab(vocab, None)
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    if pre in _PRE_SPLITS:
        split = pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        steps: list[pre_tokenizers.PreTokenizer] = [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(meta: dict[str, Any]) -> Backend:
    """Llama 2 / Mistral / TinyLlama: "▁" for spaces, a "▁" before the text, bytes as <0xXX>."""
    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = meta["scores"] or [0.0] * len(tokens)
    merges = _file_merges(meta) or _merges_from_vocab(vocab, dict(zip(tokens, scores)))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # `tokenizer.ggml.add_space_prefix` (absent in older files: on) puts a "▁" before the
    # first word, as SentencePiece's dummy prefix; decoding drops it again.
    prefix = meta["add_space_prefix"] is not False
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _gemma(meta: dict[str, Any]) -> Backend:
    """Gemma 1-3: SentencePiece without the dummy prefix, and two quirks of their files.

    Tokens of two or more spaces are stored as spaces, not "▁"s: they are respelled so that the
    text (whose spaces become "▁") can reach them. And the files list no merges; the scores do not
    follow the merge order, the order of the tokens in the file does, so that ranks the merges.
    """
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in meta["tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(meta) or _merges_from_vocab(vocab, {t: -i for i, t in enumerate(tokens)})
    unk = meta["unk_token_id"]
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=True,
            byte_fallback=True,
            unk_token=tokens[unk] if unk is not None else "<unk>",
        )
    )
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return backend


def _file_merges(meta: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta["merges"]]  # type: ignore[misc]


def _merges_from_vocab(
    vocab: dict[str, int], scores: dict[str, float] | None
) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every way to cut a token into two tokens of it.

    Ranked best first by the merged token's score (or, without scores, by its id, lowest
    first), then by the lengths of the two halves; as transformers' generate_merges ranks them.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    items = scores.items() if scores is not None else vocab.items()
    for token, score in items:
        cuts = [
            (vocab[token[:i]], vocab[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        for _, _, i in sorted(cuts):
            ranked.append((score, i, len(token) - i, token[:i], token[i:]))
    # sorted() is stable for reverse=True too: equal keys keep the order above.
    ranked.sort(key=lambda m: m[:3], reverse=scores is not None)
    return [(left, right) for _, _, _, left, right in ranked]


def _add_file_tokens(backend: Backend, meta: dict[str, Any]) -> None:
    """Control tokens (<s>, <|im_end|>) become special; user-defined ones (<think>) are matched
    whole but stay text. A byte-level file's control token outside the byte alphabet is a
    mislabel of llama.cpp's converter and is left alone, as transformers does."""
    tokens, types = meta["tokens"], meta["token_types"]
    alphabet = set(_bytes_to_unicode().values()) if meta["model"] == "gpt2" else None
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    vocab = backend.get_vocab()
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in vocab
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    # The file's unknown and padding tokens are special too, whatever their type.
    for key in ("unk_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        i = meta.get(key)
        if i is not None and i < len(tokens):
            backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)])


def _post_processor(meta: dict[str, Any]) -> processors.TemplateProcessing:
    """BOS before and EOS after the text, as `add_bos_token` / `add_eos_token` ask."""
    tokens = meta["tokens"]
    bos, eos = meta["bos_token_id"], meta["eos_token_id"]
    before = [(tokens[bos], bos)] if bos is not None and add_bos(meta) else []
    after = [(tokens[eos], eos)] if eos is not None and meta["add_eos"] else []
    single = [f"{t}:0" for t, _ in before] + ["$A:0"] + [f"{t}:0" for t, _ in after]
    pair = single + [f"{t}:1" for t, _ in before] + ["$B:1"] + [f"{t}:1" for t, _ in after]
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=before + after
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(extra)},
    }
