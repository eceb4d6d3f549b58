"""Tokenizer: text <-> token ids and the chat template, from a model directory or a GGUF file.

Built on the `tokenizers` library; the API-server process uses it, so it imports no torch.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from pagoda.model.spec import ModelLoadError
from pagoda.model_files import is_gguf

# The split patterns of the byte-level BPE tokenizers that GGUF names by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm", "gpt2", "default"):
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return pre_tokenizers.Sequence(steps)
    if pre in ("llama-bpe", "llama3", "qwen2"):
        pattern = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}")


class Tokenizer:
    """Encodes, decodes and renders chat messages for one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        eos_token_ids: list[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.add_bos = add_bos  # prepend BOS by hand (GGUF); HF files do it in the post-processor
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Renders messages with the model's chat template, as transformers does."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None: json.dumps(
                x, ensure_ascii=False, indent=indent
            )
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    @classmethod
    def from_path(cls, path: Path) -> Tokenizer:
        """Loads the tokenizer of a model directory or GGUF file."""
        return cls._from_gguf(path) if is_gguf(path) else cls._from_hf_dir(path)

    @classmethod
    def _from_hf_dir(cls, model_dir: Path) -> Tokenizer:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json")
        backend = Backend.from_file(str(path))
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        eos_ids = generation.get("eos_token_id", [])
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        if eos and backend.token_to_id(eos) is not None and backend.token_to_id(eos) not in eos_ids:
            eos_ids.append(backend.token_to_id(eos))
        return cls(
            backend,
            eos_token_ids=eos_ids,
            bos_token=bos,
            eos_token=eos,
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def _from_gguf(cls, path: Path) -> Tokenizer:
        from pagoda.model.gguf_metadata import read_tokenizer_fields

        meta = read_tokenizer_fields(path)
        if meta["model"] != "gpt2":
            raise ModelLoadError(
                f"unsupported GGUF tokenizer model {meta['model']!r}; "
                "supported: gpt2 (byte-level BPE)"
            )
        tokens: list[str] = meta["tokens"]
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta["pre"])
        backend.decoder = decoders.ByteLevel()
        # Control tokens (type 3) are special; user-defined ones (type 4) are whole words.
        types = meta["token_types"]
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, types)
                if k == 4
            ]
        )

        def text(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if i is not None else None

        eos_ids = [meta["eos_token_id"]] if meta.get("eos_token_id") is not None else []
        if meta.get("eot_token_id") is not None and meta["eot_token_id"] not in eos_ids:
            eos_ids.append(meta["eot_token_id"])
        return cls(
            backend,
            eos_token_ids=eos_ids,
            bos_token=text("bos_token_id"),
            eos_token=text("eos_token_id"),
            add_bos=meta["add_bos"],
            chat_template=meta["chat_template"],
        )


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    return token.get("content") if isinstance(token, dict) else token
