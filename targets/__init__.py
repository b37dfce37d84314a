"""Hardware targets, one package each, installed as ``llmc.targets``. A target turns an
optimised graph into code, builds it and launches it; it never rewrites the graph. What targets
share: views.py, arena.py, lowering.py, and the cache folder below."""
from __future__ import annotations

from pathlib import Path

from llmc.errors import UsageError


def cache_dir() -> Path:
    """The cache folder (``llmc.cache``), for what the runtime keeps there; builds go through
    ``llmc.cache.active()``, which applies the build's cache policy."""
    from llmc.cache import root

    return root()


def check_chunk(chunk) -> None:
    """Refuse a prefill chunk (tokens per call) that is not a positive int."""
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise UsageError(f"the prefill chunk must be a positive number of tokens, not {chunk!r}")
