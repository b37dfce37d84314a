"""The CPU target's launcher: runs an artifact's compiled library through ctypes (no torch).

The library is written once to ``<cache>/cpu/lib/<sha256>.so`` (dlopen needs a file) and loaded;
weights are pointers into the artifact's memory-mapped weights section; the KV cache arrays and
the activation arena are numpy arrays owned by the Model.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from llmc.artifact import Artifact, ArtifactError

ABI_VERSION = 1


def library_file(code: bytes) -> Path:
    """A file holding ``code`` (dlopen needs one), written once per content."""
    from .. import cache_dir

    digest = hashlib.sha256(code).hexdigest()
    for folder in (cache_dir() / "cpu" / "lib", Path(tempfile.gettempdir()) / f"llmc-{os.getuid()}"):
        path = folder / f"{digest}.so"
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                return path
        except OSError:
            pass
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
            with os.fdopen(fd, "wb") as f:
                f.write(code)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    raise ArtifactError("cannot write the artifact's library to a cache folder; set LLMC_CACHE_DIR to a writable folder")


class CpuExecutor:
    """Target ``cpu``: the artifact's shared library, called once per prefill chunk or decode step."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        target = artifact.manifest["target"]
        code = bytes(artifact.section("code"))
        try:
            self.lib = ctypes.CDLL(str(library_file(code)))
            abi = self.lib.llmc_abi()
        except (OSError, AttributeError) as exc:
            raise ArtifactError(f"{artifact.path}: its cpu library cannot be loaded ({exc}); rebuild the artifact "
                                "on this machine, or check that libgomp is installed") from None
        if abi != ABI_VERSION:
            raise ArtifactError(f"{artifact.path}: its library has ABI {abi}, this llmc runs {ABI_VERSION}; rebuild it")
        self.chunk = int(target["chunk"])
        self.vocab = int(artifact.manifest["vocab_size"])
        self.arena = np.zeros(int(target["arena_bytes"]) + 64, np.uint8)
        arena_at = self.arena.ctypes.data
        self._arena = ctypes.c_void_p(arena_at + (-arena_at) % 64)
        weights = artifact.weights()
        self._keep = [weights[name] for name in target["weights"]]
        self._weights = (ctypes.c_void_p * len(self._keep))(*[w.ctypes.data for w in self._keep])
        self.functions = {}
        for graph, symbol in target["functions"].items():
            fn = getattr(self.lib, symbol)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            self.functions[graph] = fn
        self.lib.llmc_stream_read.restype = ctypes.c_double
        self.lib.llmc_stream_read.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.set_threads(threads)

    def set_threads(self, threads: int | None) -> None:
        self.threads = max(1, int(threads or len(os.sched_getaffinity(0))))
        self.lib.llmc_set_threads(ctypes.c_int(self.threads))

    def stream_bandwidth(self, megabytes: int = 512, runs: int = 5) -> float:
        """GB/s of a streaming read by the library's own threads (median of ``runs``)."""
        probe = self.lib.llmc_stream_read
        data = np.ones(megabytes * (1 << 20) // 4, np.float32)
        probe(data.ctypes.data, data.size)
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            probe(data.ctypes.data, data.size)
            rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
        return float(np.median(rates))

    def run(self, graph: str, tokens: np.ndarray, start_pos: int, caches: list[np.ndarray]) -> np.ndarray:
        """Logits of ``graph`` for ``tokens`` at ``start_pos``, split into chunks the arena was planned for."""
        ctx = caches[0].shape[2]
        pointers = (ctypes.c_void_p * len(caches))(*[c.ctypes.data for c in caches])
        pieces = []
        for at in range(0, len(tokens), self.chunk):
            ids = np.ascontiguousarray(tokens[at: at + self.chunk], dtype=np.int64)
            rows = len(ids) if graph == "graph_all" else 1
            out = np.empty((rows, self.vocab), np.float32)
            status = self.functions[graph](ids.ctypes.data, len(ids), start_pos + at, ctx, pointers, self._weights,
                                           self._arena, out.ctypes.data)
            if status != 0:
                raise ArtifactError(f"the cpu library refused a step of {len(ids)} tokens at position {start_pos + at}")
            pieces.append(out)
        return pieces[0] if len(pieces) == 1 else (np.concatenate(pieces) if graph == "graph_all" else pieces[-1])
