"""Every PAGODA_* environment variable, read once, typed."""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


# Keep the HTTP server up (with /health answering 503) when the engine process dies.
PAGODA_KEEP_ALIVE_ON_ENGINE_DEATH: bool = _flag("PAGODA_KEEP_ALIVE_ON_ENGINE_DEATH")
# Comma-separated API keys, as with --api-key.
PAGODA_API_KEY: str | None = os.environ.get("PAGODA_API_KEY") or None
# Run the PyTorch definitions of the model's small steps instead of the built C++ kernels.
PAGODA_DISABLE_KERNELS: bool = _flag("PAGODA_DISABLE_KERNELS")
