"""Tokenizer: text <-> token ids and the chat template, from a model directory or a GGUF file.

Built on the `tokenizers` library; the API-server process uses it, so it imports no torch.
"""

from __future__ import annotations

import codecs
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as Backend

from pagoda.model.spec import ModelLoadError
from pagoda.model_files import is_gguf


class Tokenizer:
    """Encodes, decodes and renders chat messages for one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        eos_token_ids: list[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with special tokens, BOS/EOS as the model's files ask."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders messages with chat_template (default: the model's own), as transformers does."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template")
        return _compile(template).render(
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
        from pagoda.gguf_vocab import build_backend, end_of_generation_ids
        from pagoda.model.gguf_metadata import read_tokenizer_fields

        meta = read_tokenizer_fields(path)
        tokens: list[str] = meta["tokens"]

        def text(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if i is not None else None

        return cls(
            build_backend(meta),
            eos_token_ids=end_of_generation_ids(meta),
            bos_token=text("bos_token_id"),
            eos_token=text("eos_token_id"),
            chat_template=meta["chat_template"],
        )


def load_chat_template(value: str) -> str:
    """A chat template given as a file path or inline, as vLLM's --chat-template reads it.

    A readable file gives its text. Otherwise a value with Jinja's characters ({, } or a newline)
    is the template itself, its backslash escapes read ("\\n" is a newline); any other value was
    meant as a path, and is an error. The template is compiled here, so a broken one fails early.
    """
    path = Path(value).expanduser()
    if path.is_file():
        template = path.read_text()
    elif any(c in value for c in "{}\n"):
        template = codecs.decode(value, "unicode_escape")
    else:
        raise ValueError(
            f"the chat template {value!r} looks like a file path, but no such file exists"
        )
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from None
    return template


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    return token.get("content") if isinstance(token, dict) else token
