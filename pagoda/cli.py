"""`pagoda`: the command line (generate, serve, bench)."""

from __future__ import annotations

import argparse
import logging
import sys


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pagoda.model.attention import AttentionMetadata, allocate_kv_cache
    from pagoda.model.loader import load_model
    from pagoda.model_files import resolve_model_path
    from pagoda.tokenizer import Tokenizer

    path = resolve_model_path(args.model)
    model = load_model(path, torch.float32)
    tokenizer = Tokenizer.from_path(path)
    spec, block_size = model.spec, 16
    ids = tokenizer.encode(args.prompt)
    num_blocks = -(-(len(ids) + args.max_tokens) // block_size)
    model.bind_kv_cache(
        allocate_kv_cache(
            spec.num_layers,
            num_blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            torch.float32,
        )
    )
    blocks = list(range(num_blocks))
    out: list[int] = []
    new, computed = ids, 0
    for _ in range(args.max_tokens):
        attn, positions = AttentionMetadata.build([computed], [len(new)], [blocks], block_size)
        with torch.no_grad():
            hidden = model(torch.tensor(new), positions, attn)
            token = int(model.compute_logits(hidden[-1:]).argmax())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        computed, new = computed + len(new), [token]
    print(args.prompt + tokenizer.decode(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedily continue a prompt and print it")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory or GGUF file")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from pagoda.model.spec import ModelLoadError

    try:
        return int(args.func(args))
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
