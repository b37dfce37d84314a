"""The autotuner: for each linear kernel and weight shape, time candidate tiles (W rows per task)
on this machine and keep the fastest, for decode (one row of x) and prefill (many rows).

Results live in ``<cache>/cpu/tuning.json`` (``llmc.cache``), keyed by CPU model, feature level,
thread count, kernel and shape, so a second compile of the same model measures nothing. ``--tune
off`` uses the defaults (sound on any machine, and the same on every machine: a reproducible build
across machines tunes nothing), ``fast`` a few candidates, ``full`` more candidates and longer runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from llmc.cache import active
from llmc.errors import UsageError

from .lower import DEFAULT_TILES

MODES = ("off", "fast", "full")
CANDIDATES = {"fast": {"gemv": (4, 16, 64), "gemm": (8, 32)},
              "full": {"gemv": (2, 4, 8, 16, 32, 64, 128), "gemm": (4, 8, 16, 32, 64)}}
PREFILL_ROWS = 64


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


class Tuner:
    def __init__(self, level: str, mode: str, features: set[str], progress=None):
        from .build import LEVELS

        self.level, self.mode, self.progress = level, mode, progress
        missing = [f for f in LEVELS[level][1] or [] if f not in features]
        if mode != "off" and missing:
            raise UsageError(f"cannot tune {level} kernels on this machine, which lacks {', '.join(missing)}: "
                             "build with --tune off (tiles are then the defaults, sound on any machine)")
        self.threads = len(os.sched_getaffinity(0))
        self.cpu = cpu_model()
        self.build_cache = active()
        self.table = self._read(self.build_cache.entry("cpu", "tuning.json")) \
            if mode != "off" and self.build_cache.reads else {}
        self.measured: dict[str, dict] = {}
        self.counts = {"measured": 0, "cached": 0, "default": 0}

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def key(self, kernel: str, n: int, k: int) -> str:
        return f"{self.cpu}|{self.level}|{self.threads}t|{kernel}|{n}x{k}"

    def tiles(self, kernel: str, n: int, k: int) -> dict:
        if self.mode == "off":
            self.counts["default"] += 1
            return dict(DEFAULT_TILES)
        key = self.key(kernel, n, k)
        if key in self.table:
            self.counts["cached"] += 1
            self.build_cache.record("cpu tuning", hit=True)
            return self.table[key]
        self.table[key] = self.measured[key] = {kind: self._best(kernel, n, k, kind) for kind in ("gemv", "gemm")}
        self.counts["measured"] += 1
        self.build_cache.record("cpu tuning", hit=False)
        return self.table[key]

    def _best(self, kernel: str, n: int, k: int, kind: str) -> int:
        candidates = CANDIDATES[self.mode][kind]
        rows = 1 if kind == "gemv" else PREFILL_ROWS
        call = _bench_call(kernel, n, k, rows, self.level, self.threads)
        repeats = 5 if self.mode == "fast" else 11
        times = {}
        for i, tile in enumerate(candidates):
            call(tile)                                   # warm up
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                call(tile)
                runs.append(time.perf_counter() - start)
            times[tile] = float(np.median(runs))
            self._show(f"{kernel} {n}x{k} {kind}", i + 1, len(candidates))
        return min(times, key=times.get)

    def _show(self, what: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        bar = "#" * (20 * done // total)
        self.progress.write(f"\r      tune {what:<36} [{bar:<20}] {done}/{total}")
        if done == total:
            self.progress.write("\n")
        self.progress.flush()

    def finish(self) -> None:
        """Store what was measured, merged into the table as it is now (another build may have
        added to it meanwhile); nothing when the cache policy stores nothing."""
        if not self.measured or not self.build_cache.writes:
            return
        path = self.build_cache.entry("cpu", "tuning.json")
        table = self._read(path)
        table.update(self.measured)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dict(sorted(table.items())), indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            sys.stderr.write(f"warning: cannot save the tuning cache {path}: {exc}\n")

    def summary(self) -> dict:
        return dict(self.counts)


def _bench_call(kernel: str, n: int, k: int, rows: int, level: str, threads: int):
    """A closure that runs ``kernel`` once on random data of this shape with a given tile."""
    from llmc.quant import parse_scheme, quantize

    from .harness import harness

    lib = harness(level)
    lib.h_set_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = np.empty((rows, n), np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kernel == "llmc_linear_f32":
        return lambda tile: lib.h_linear_f32(x.ctypes.data, k, w.ctypes.data, None, y.ctypes.data, rows, n, k, tile)
    if kernel == "llmc_linear_f16":
        w16 = w.astype(np.float16)
        return lambda tile: lib.h_linear_f16(x.ctypes.data, k, w16.ctypes.data, None, y.ctypes.data, rows, n, k, tile)
    scratch = np.empty(rows * (k + 64) + rows * (k // 32) * 8 + 64, np.uint8)
    if kernel in ("llmc_linear_q4p", "llmc_linear_q8p"):         # q4g32 / q8 in panels (layout.py)
        from .layout import to_panels

        bits = 4 if kernel == "llmc_linear_q4p" else 8
        panels = to_panels(quantize(w, parse_scheme("q4g32" if bits == 4 else "q8")))
        mins = panels["mins"].ctypes.data if "mins" in panels else None
        return lambda tile: lib.h_linear_panels(x.ctypes.data, k, panels["q"].ctypes.data,
                                                panels["scales"].ctypes.data, mins, None, y.ctypes.data, rows, n, k,
                                                bits, tile, scratch.ctypes.data)
    scheme = parse_scheme(kernel.removeprefix("llmc_linear_").removesuffix("_exact"))
    parts = quantize(w, scheme)
    if kernel.endswith("_exact"):
        mins = parts["mins"].ctypes.data if "mins" in parts else None
        return lambda tile: lib.h_linear_q_exact(x.ctypes.data, k, parts["q"].ctypes.data, parts["scales"].ctypes.data,
                                                 mins, None, y.ctypes.data, rows, n, k, scheme.bits, scheme.group, tile)
    mins = parts["mins"].ctypes.data if "mins" in parts else None
    return lambda tile: lib.h_linear_q(x.ctypes.data, k, parts["q"].ctypes.data, parts["scales"].ctypes.data, mins,
                                       None, y.ctypes.data, rows, n, k, scheme.bits, scheme.group, tile,
                                       scratch.ctypes.data)
