"""Tiny random-weight models of each supported architecture, saved as Hugging Face directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.kv_memory import allocate_kv_cache
from pagoda.model.models import CausalLM

COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

SLIDING_WINDOW = 6  # the windowed variants'

# name -> (transformers config class, extra config fields)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    # Mistral 7B v0.1's form: every layer sees the last sliding_window positions.
    "mistral-window": (
        "MistralConfig",
        dict(tie_word_embeddings=False, sliding_window=SLIDING_WINDOW),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # Qwen2's: layers from max_window_layers on are windowed, the ones before global.
    "qwen2-window": (
        "Qwen2Config",
        dict(
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=1,
        ),
    ),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32)),
    # Local layers see the last 6 positions (a window that is no multiple of the block
    # size); the global layer's RoPE is linearly scaled, the local ones' not.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=SLIDING_WINDOW,
            head_dim=32,
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            },
            tie_word_embeddings=True,
        ),
    ),
}


def make_hf_model(variant: str, seed: int = 0, **sizes: Any) -> torch.nn.Module:
    """A transformers model of the variant with random weights in float32; sizes override
    COMMON's."""
    import transformers

    cls_name, extra = VARIANTS[variant]
    config = getattr(transformers, cls_name)(**{**COMMON, **sizes, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so that they are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer with one token per byte (256 ids) and no merges."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": alphabet[2]}))


def save_hf_model(variant: str, path: Path, seed: int = 0, **save_kwargs: Any) -> Path:
    model = make_hf_model(variant, seed)
    model.save_pretrained(path, **save_kwargs)
    save_byte_tokenizer(path)
    return path


BLOCK_SIZE = 4


def bind_cache(model: CausalLM, num_blocks: int = 64) -> None:
    s = model.spec
    model.bind_kv_cache(
        allocate_kv_cache(
            s.num_layers,
            num_blocks,
            BLOCK_SIZE,
            s.num_kv_heads,
            s.head_dim,
            next(model.parameters()).dtype,
        )
    )


def forward(
    model: CausalLM,
    chunks: list[tuple[list[int], int, list[int]]],
) -> list[torch.Tensor]:
    """One forward pass over (new token ids, num computed, block table) per sequence."""
    attn, positions = AttentionMetadata.build(
        [c for _, c, _ in chunks],
        [len(t) for t, _, _ in chunks],
        [b for _, _, b in chunks],
        BLOCK_SIZE,
    )
    ids = torch.tensor([t for tokens, _, _ in chunks for t in tokens])
    logits = model.compute_logits(model(ids, positions, attn))
    return list(logits.split([len(t) for t, _, _ in chunks]))
