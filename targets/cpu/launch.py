"""The CPU target's launcher: runs an artifact's compiled library through ctypes (no torch).

The library is written once to ``<cache>/cpu/lib/<sha256>.so`` (dlopen needs a file) and loaded
through the descriptor its bytes were checked through (``load_library``), after the manifest was
checked against the record of what it was built for (expects.py);
weights are pointers into the artifact's memory-mapped weights section; the KV pool and the
activation arena are numpy arrays the executor owns.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llmc.abi import BATCH_INPUTS
from llmc.artifact import Artifact, ArtifactError
from llmc.runtime.profile import Profile, format_profile, profile_requested

from . import ABI_VERSION
from .expects import check_against_library
from .. import pool_arrays

_I64 = ctypes.POINTER(ctypes.c_int64)


def load_library(code: bytes) -> ctypes.CDLL:
    """``code`` loaded (dlopen needs a file): written once per content into a folder that only
    this user can write (the cache's cpu/lib, else ``$TMPDIR/llmc-<uid>``; a folder another user
    owns or may write is passed over), and loaded through the very descriptor its bytes were
    checked through, so nothing can swap the file between the check and the load. Where no such
    folder can be had, the code is loaded from an anonymous memory file."""
    from .. import cache_dir

    digest = hashlib.sha256(code).hexdigest()
    if digest in _LOADED:
        return _LOADED[digest]
    for folder in (cache_dir() / "cpu" / "lib", Path(tempfile.gettempdir()) / f"llmc-{os.getuid()}"):
        try:
            _private_folder(folder)
            path = folder / f"{digest}.so"
            fd = _checked(path, digest)
            if fd is None:
                handle, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
                try:
                    with os.fdopen(handle, "wb") as f:
                        f.write(code)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                fd = _checked(path, digest)
        except OSError:
            continue
        if fd is not None:
            return _open_descriptor(fd, digest)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"llmc-{digest[:16]}.so", os.MFD_CLOEXEC)
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(code)
        return _open_descriptor(fd, digest)
    raise ArtifactError("cannot find a folder only this user can write to hold the artifact's library; set "
                        "LLMC_CACHE_DIR to one")


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (mode 0700) if it is missing; an OSError unless it is a folder this user
    owns and no one else may write."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{folder} is not a folder only this user may write")


def _checked(path: Path, digest: str) -> int | None:
    """A descriptor of ``path`` if it is a regular file this user owns, no one else may write,
    holding the bytes of ``digest``; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    hasher = hashlib.sha256()
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        with os.fdopen(os.dup(fd), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
    if hasher.hexdigest() == digest:
        return fd
    os.close(fd)
    return None


# Libraries loaded by this process, by the sha256 of their code. Each one's descriptor stays open
# while the process lives: dlopen knows a library by its name, and a closed descriptor's number
# (its /proc/self/fd name) would be reused for the next library, which dlopen would then take
# for the first.
_LOADED: dict[str, ctypes.CDLL] = {}


def _open_descriptor(fd: int, digest: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise
    _LOADED[digest] = lib
    return lib


class CpuExecutor:
    """Target ``cpu``: the artifact's shared library, one call per step."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        target = artifact.manifest["target"]
        code = bytes(artifact.section("code"))
        check_against_library(artifact.manifest, code, artifact.path)       # before any of it runs
        try:
            self.lib = load_library(code)
            abi = self.lib.llmc_abi()
        except (OSError, AttributeError) as exc:
            raise ArtifactError(f"{artifact.path}: its cpu library cannot be loaded ({exc}); rebuild the artifact "
                                "on this machine, or check that libgomp is installed") from None
        if abi != ABI_VERSION:
            raise ArtifactError(f"{artifact.path}: its library has ABI {abi}, this llmc runs {ABI_VERSION}; rebuild it")
        self.artifact = artifact
        self.arena = np.zeros(int(target["arena_bytes"]) + 64, np.uint8)
        arena_at = self.arena.ctypes.data
        self._arena = ctypes.c_void_p(arena_at + (-arena_at) % 64)
        weights = artifact.weights()
        self._keep = [weights[name] for name in target["weights"]]
        self._weights = (ctypes.c_void_p * len(self._keep))(*[w.ctypes.data for w in self._keep])
        self.vocab = int(artifact.manifest["vocab_size"])
        self.functions = {}
        for entry, symbol in target["functions"].items():
            fn = getattr(self.lib, symbol)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int64, _I64, _I64, _I64, ctypes.c_int64, ctypes.c_int64, _I64, ctypes.c_int64,
                           _I64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            self.functions[entry] = fn
        self.lib.llmc_check_buffers.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                ctypes.c_int64, ctypes.c_int64]
        self.lib.llmc_stream_read.restype = ctypes.c_double
        self.lib.llmc_stream_read.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.pool: list[np.ndarray] = []
        self.set_threads(threads)
        self._profile_wall: float | None = None
        if profile_requested():
            if self.start_profile():
                atexit.register(self._print_profile)
            else:
                print(f"llmc: {artifact.path} was built before LLMC_PROFILE existed; rebuild it to profile it",
                      file=sys.stderr)

    # -- LLMC_PROFILE ------------------------------------------------------------------------

    def start_profile(self) -> bool:
        """Count time per op from now on (from zero); False for a library built without marks."""
        if not hasattr(self.lib, "llmc_profile_read"):
            return False
        self.lib.llmc_profile_name.restype = ctypes.c_char_p
        self.lib.llmc_profile_read.restype = ctypes.c_int64
        self.lib.llmc_profile(ctypes.c_int(1))
        self._profile_wall = 0.0
        return True

    def profile(self, reset: bool = False) -> Profile | None:
        """Seconds per op since ``start_profile`` (or the last reset); None when not profiling."""
        if self._profile_wall is None:
            return None
        count = self.lib.llmc_profile_sites()
        seconds = (ctypes.c_double * count)()
        steps = self.lib.llmc_profile_read(seconds)
        labels = [self.lib.llmc_profile_name(i).decode() for i in range(count)]
        result = Profile(int(steps), list(zip(labels, seconds)), self._profile_wall, self.threads)
        if reset:
            self.lib.llmc_profile(ctypes.c_int(1))
            self._profile_wall = 0.0
        return result

    def _print_profile(self) -> None:
        result = self.profile()
        if result is not None and result.steps:
            print(format_profile(result, f"llmc profile of {self.artifact.path}"), file=sys.stderr)

    def set_threads(self, threads: int | None) -> None:
        self.threads = max(1, int(threads or len(os.sched_getaffinity(0))))
        self.lib.llmc_set_threads(ctypes.c_int(self.threads))

    def allocate_pool(self, blocks: int) -> int:
        pool = pool_arrays(self.artifact, blocks)
        # The library checks every buffer it will be given against what it was built for.
        weight_bytes = (ctypes.c_int64 * max(len(self._keep), 1))(*[w.nbytes for w in self._keep])
        block_bytes = (ctypes.c_int64 * max(len(pool), 1))(*[a.nbytes // blocks for a in pool])
        if self.lib.llmc_check_buffers(len(self._keep), weight_bytes, len(pool), block_bytes, self.arena.nbytes - 64, self.vocab) != 0:
            raise ArtifactError(f"{self.artifact.path}: its cpu library refused the buffers its manifest sizes "
                                "(weights, KV pool, arena or vocabulary differ from what it was built for); "
                                "rebuild the artifact")
        self.pool = pool
        self._pool = (ctypes.c_void_p * len(self.pool))(*[a.ctypes.data for a in self.pool])
        self.blocks = blocks
        return sum(a.nbytes for a in self.pool)

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

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The logits [rows, vocab] of one step (inputs as ``llmc.abi.Batch.inputs()``)."""
        start = time.perf_counter() if self._profile_wall is not None else 0.0
        arrays = [np.ascontiguousarray(inputs[name], np.int64) for name, _ in BATCH_INPUTS]
        tokens, positions, seq_index, tables, rows = arrays
        if not self.pool or positions.size != tokens.size or seq_index.size != tokens.size or tables.ndim != 2:
            raise ArtifactError("a cpu step needs a KV pool (allocate_pool) and one position and sequence per token")
        out = np.empty((rows.size, self.vocab), np.float32)
        pointer = [a.ctypes.data_as(_I64) for a in arrays]
        status = self.functions[entry](tokens.size, pointer[0], pointer[1], pointer[2], tables.shape[0],
                                       tables.shape[1], pointer[3], rows.size, pointer[4], self.blocks, self._pool,
                                       self._weights, self._arena, out.ctypes.data)
        if self._profile_wall is not None:
            self._profile_wall += time.perf_counter() - start
        if status != 0:
            raise ArtifactError(f"the cpu library refused a step of {tokens.size} tokens (an index outside its "
                                f"tables, rows or KV pool of {self.blocks} blocks, or more tokens than it takes)")
        return out
