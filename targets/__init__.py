"""Hardware targets, one package each, installed as ``llmc.targets``. A target turns an
optimised graph into code, builds it and launches it; it never rewrites the graph. What targets
share: views.py, arena.py, lowering.py, and the cache folder below."""
from __future__ import annotations

import os
from pathlib import Path

from llmc.errors import LlmcError


def cache_dir() -> Path:
    """Where targets keep built code, kernels and tuning tables: $LLMC_CACHE_DIR, else ~/.cache/llmc."""
    return Path(os.environ.get("LLMC_CACHE_DIR") or Path.home() / ".cache" / "llmc")


def check_chunk(chunk) -> None:
    """Refuse a prefill chunk (tokens per call) that is not a positive int."""
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise LlmcError(f"the prefill chunk must be a positive number of tokens, not {chunk!r}")
