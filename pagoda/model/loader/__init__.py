"""load_model: a model directory or GGUF file -> a ready model (models.CausalLM) on a device."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from pagoda.model.gguf_metadata import open_gguf
from pagoda.model.layers.rope import RotaryEmbedding
from pagoda.model.loader import gguf as gguf_loader
from pagoda.model.loader import quantization
from pagoda.model.loader import safetensors as st_loader
from pagoda.model.loader.weights import load_weights
from pagoda.model.models import MODELS, CausalLM, build_model
from pagoda.model.ops.quantized_linear import GGUFWeight
from pagoda.model.spec import ModelLoadError, ModelSpec
from pagoda.model_files import is_gguf

logger = logging.getLogger(__name__)


def read_spec(path: Path) -> ModelSpec:
    """The hyper-parameters of a model directory or GGUF file, without loading weights."""
    if is_gguf(path):
        return gguf_loader.read_spec(open_gguf(path))
    return st_loader.read_spec(path)


def load_model(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantized: bool = False,
    dense_copy_max_bytes: int = 0,
    repack: bool = True,
) -> CausalLM:
    """Builds the model on the meta device, then streams the weights in; logs time and memory.

    quantized holds a GGUF's projections, embedding and output layer in their file form,
    with no dense copy unless that copy would take at most dense_copy_max_bytes (CPU; see
    loader/quantization.py); without a dense copy, repack lets the load repack the formats
    whose repacked int8 GEMM it measured faster.
    """
    start = time.perf_counter()
    weights: Iterator[tuple[str, torch.Tensor | GGUFWeight]]
    in_blocks: set[str] = set()
    held: set[str] = set()
    gguf_file = open_gguf(path) if is_gguf(path) else None
    if gguf_file is not None:
        spec = gguf_loader.read_spec(gguf_file)
        if quantized:
            in_blocks, held = quantization.held_in_blocks(gguf_file, spec)
        num_tensors = len(gguf_file.tensors)
    else:
        spec = st_loader.read_spec(path)
        num_tensors = 0

    if spec.family not in MODELS:
        raise ModelLoadError(
            f"{path.name} is a {spec.family} model, which Pagoda reads but cannot run yet; "
            f"it runs: {', '.join(MODELS)}"
        )
    with torch.device("meta"), _SkipInit():
        model = build_model(spec)
    copy_bytes = quantization.dense_bytes(model, held, dtype)
    dense_copy = bool(held) and copy_bytes <= dense_copy_max_bytes
    if gguf_file is not None:
        weights = gguf_loader.iter_weights(gguf_file, spec, dtype, frozenset(in_blocks), dense_copy)
    else:
        weights = st_loader.iter_weights(path, dtype)
    if not dense_copy:
        quantization.drop_dense_weights(model, held, dtype)
    model = _materialize(model, device, dtype)
    ropes = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    for rope in ropes:
        rope.cos_sin = rope.cos_sin.float()  # the rotation tables stay float32
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    file_bytes = path.stat().st_size if gguf_file is not None else 0
    progress = tqdm(
        weights,
        total=num_tensors or None,
        desc="Loading weights",
        unit="tensor",
        disable=max(nbytes, file_bytes) < (1 << 30),  # small models load in a blink
    )
    load_weights(model, progress)
    if gguf_file is not None:
        gguf_file.release_pages()  # those the last stacking read; views fault theirs in on use
    for rope in ropes:
        rope.init_table()
    model.eval().requires_grad_(False)
    logger.info(
        "Loaded %s (%s, %d layers) in %.2f s: %.1f MiB of dense weights in %s",
        path.name,
        spec.family,
        spec.num_layers,
        time.perf_counter() - start,
        nbytes / 2**20,
        dtype,
    )
    if dense_copy:
        quantization.log_dense_copy(model, copy_bytes)
    elif quantized and gguf_file is not None:
        quantization.choose_paths(model, dtype, gguf_file.release_pages, repack)
    return model


# Every weight comes from the file. On the meta device nn's random initialisation and
# Module.to_empty run torch's Python reference ops, whose first use imports torch._dynamo
# and sympy: about 70 MiB of the engine process's memory for a compiler it never runs.


class _SkipInit(TorchFunctionMode):
    """Makes torch.nn.init's functions (modules' reset_parameters) leave the tensor as is."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _materialize(model: CausalLM, device: torch.device | str, dtype: torch.dtype) -> CausalLM:
    """Module.to_empty(device).to(dtype) in one pass, with plain factory calls."""

    def empty(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(
            t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device
        )

    return model._apply(empty)  # what to_empty does, with torch.empty for empty_like


def release_freed_memory() -> None:
    """Hands the heap space of loading's temporaries back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
