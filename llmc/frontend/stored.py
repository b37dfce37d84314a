"""Imported models kept in the build cache (``<cache>/import/<key>.llmc``).

Loading a model, tracing it and converting its tokenizer is most of an unchanged rebuild's time
(SmolLM2: about 30 s of 40). An entry holds what that work produced: the imported graph as IR
text, its weights, the config, the longest sequence and the tokenizer. It is an llmc container
(``llmc.artifact``), so every part is checksummed and a damaged entry is rebuilt, never used.

The key covers everything that decides the entry: the source files' hashes, the import options,
the llmc version and the code of the importer itself (so a changed importer never reuses an old
graph), and the versions of the libraries that load and trace the model.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from llmc import __version__
from llmc.artifact import ArtifactError, read_artifact, write_artifact
from llmc.cache import active
from llmc.errors import LlmcWarning
from llmc.frontend import Imported, check_context, import_model
from llmc.frontend.onnx_model import reader_version
from llmc.frontend.sources import ModelSource, resolve
from llmc.frontend.tokenizer import TokenizerInfo, tokenizer_info
from llmc.ir import dtype_of_array, parse_graph

KIND = "llmc imported model"
LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "numpy")
_LLMC = Path(__file__).resolve().parent.parent
IMPORTER_FILES = sorted((_LLMC / "frontend").glob("*.py")) + [_LLMC / name for name in ("ir.py", "ops.py", "dims.py")]


def import_key(source: ModelSource, attn_implementation: str | None, max_seq: int | None) -> str | None:
    """The cache key of importing ``source`` with these options; None for an in-memory module,
    whose code and weights llmc cannot hash."""
    hashes = source.hashes()
    if not hashes:
        return None
    code = hashlib.sha256()
    for path in IMPORTER_FILES:
        code.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    described = {"kind": source.kind, "inputs": hashes, "attn": attn_implementation, "max_seq": max_seq,
                 "llmc": __version__, "importer": code.hexdigest(), "libraries": _versions()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _versions() -> dict[str, str | None]:
    out = {"python": ".".join(map(str, sys.version_info[:2]))}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["onnx reader"] = reader_version()          # what parses an ONNX source (llmc.frontend.onnx_model)
    return out


def import_stored(spec: Any, *, attn_implementation: str | None = None, max_seq: int | None = None) -> Imported:
    """``import_model`` through the build cache, with the tokenizer read as well (``tokenizer``)."""
    cache = active()
    source = resolve(spec, attn_implementation)
    key = import_key(source, attn_implementation, max_seq)
    if key is None:
        return _fresh(source, attn_implementation, max_seq)
    start = time.perf_counter()
    entry = cache.entry("import", f"{key}.llmc")
    imported = _read(entry, source) if cache.reads and entry.exists() else None
    cache.record("import", imported is not None)
    if imported is not None:
        check_context(max_seq, imported.config, source.spec)
        imported.timings = {"cached": time.perf_counter() - start}
        return imported
    imported = _fresh(source, attn_implementation, max_seq)
    if not cache.writes:                         # nothing would read it
        return imported
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _write(entry, imported)
    except (OSError, ArtifactError) as exc:        # a full disk costs the next build time, not this one
        warnings.warn(f"cannot store the imported model in the cache: {exc}", LlmcWarning, stacklevel=2)
    return imported


def _fresh(source: ModelSource, attn_implementation: str | None, max_seq: int | None) -> Imported:
    imported = import_model(source, attn_implementation=attn_implementation, max_seq=max_seq)
    start = time.perf_counter()
    imported.tokenizer = tokenizer_info(source, imported.config)
    imported.timings["tokenizer"] = time.perf_counter() - start
    return imported


def _write(path: Path, imported: Imported) -> None:
    weights = imported.graph.weights
    tokenizer = imported.tokenizer
    manifest = {
        "kind": KIND, "config": imported.config, "max_seq": imported.max_seq,
        # The weights' order and numpy types, so the graph comes back exactly as it was imported.
        "order": list(weights), "numpy": {name: array.dtype.str for name, array in weights.items()},
        "tokenizer": tokenizer.manifest(), "timings": imported.timings,
    }
    sections = {"graph": str(imported.graph).encode()}
    if tokenizer.tokenizer_json is not None:
        sections["tokenizer"] = tokenizer.tokenizer_json.encode()
    write_artifact(path, manifest, sections, weights, {name: dtype_of_array(a) for name, a in weights.items()})


def _read(path: Path, source: ModelSource) -> Imported | None:
    """The entry at ``path``; None if it is damaged (it is then rebuilt and stored again)."""
    try:
        art = read_artifact(path, machine=False)
        manifest = art.manifest
        if manifest.get("kind") != KIND:
            return None
        return _imported(art, manifest, source)
    except (ArtifactError, KeyError, ValueError, TypeError):
        return None


def _imported(art, manifest: dict, source: ModelSource) -> Imported:
    stored = art.weights()
    weights = {}
    for name in manifest["order"]:
        array = stored[name]
        wanted = np.dtype(manifest["numpy"][name])
        if array.dtype != wanted:                  # stored as raw bytes: a dtype numpy names differently
            array = array.view(wanted).reshape(manifest["tensors"][name]["shape"])
        weights[name] = array
    graph = parse_graph(bytes(art.section("graph")).decode(), weights)
    tokenizer = TokenizerInfo(**manifest["tokenizer"])
    if "tokenizer" in manifest["sections"]:
        tokenizer.tokenizer_json = bytes(art.section("tokenizer")).decode()
    return Imported(graph, source, manifest["config"], int(manifest["max_seq"]), cached=True, tokenizer=tokenizer)
