"""Speed of the linear kernels against an earlier kernels.c, in one process, run by run.

    python benchmarks/linear_invariance.py [--base 98b906e] [--new FILE] [--rounds 7] [--threads 2]
                                           [--kernels f32,f16,q8,q4g32,q4g128]

Builds targets/cpu/kernels.c as it is in the tree ("new", or --new FILE) and as it is at git
revision --base ("old") into two kernel libraries (x86-64-v3, the linear kernels' wrappers only),
then times llmc_linear_f32 / _f16 / llmc_linear_q on
SmolLM2-135M's shapes (N x K = 1536 x 576 and 576 x 1536), at M = 1 (decode) and M = 512 (a prefill
chunk), with the default tiles. Each round times every case on old and new back to back (which one
goes first alternates), and the figure is the median over rounds of the per-round ratio new / old:
the machine is shared, so single timings are noisy and only ratios taken close together mean much.

Decode is timed twice: "hot" calls one weight again and again (it stays in L2/L3: the kernel's
arithmetic speed), "cold" walks through copies of the weight that together exceed the last-level
cache, as a real decode step walks through the model (memory bandwidth).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(1536, 576), (576, 1536)]           # SmolLM2-135M: gate/up (and merged qkv-sized), down
COLD_BYTES = 64 << 20                         # weight copies for the cold decode: well past a 16-32 MB L3


def linear_library(kernels: str) -> ctypes.CDLL:
    from llmc.targets.cpu.build import build_shared_library
    from llmc.targets.cpu import kernel_constants
    from llmc.targets.cpu.harness import LINEAR_WRAPPERS, SIGNATURES
    from llmc.targets.cpu.launch import load_library

    source = "\n".join(["#define LLMC_KERNEL static", '#define LLMC_EXPORT __attribute__((visibility("default")))',
                        kernel_constants(), kernels, LINEAR_WRAPPERS])
    code, _ = build_shared_library(source, "x86-64-v3", name="harness")
    lib = load_library(code)
    for name in ("h_linear_f32", "h_linear_f16", "h_linear_q"):
        getattr(lib, name).argtypes = SIGNATURES[name]
    return lib


def old_kernels(revision: str) -> str:
    return subprocess.run(["git", "show", f"{revision}:targets/cpu/kernels.c"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


class Case:
    """One kernel call on fixed random data; ``run(lib)`` makes one call, walking the weight copies."""

    def __init__(self, kernel: str, n: int, k: int, m: int, cold: bool):
        from llmc.quant import parse_scheme, quantize
        from llmc.targets.cpu.lower import DEFAULT_TILES

        self.kernel, self.n, self.k, self.m, self.cold = kernel, n, k, m, cold
        self.tile = DEFAULT_TILES["gemv" if m == 1 else "gemm"]
        rng = np.random.default_rng(n + k + m)
        self.x = rng.standard_normal((m, k)).astype(np.float32)
        self.y = np.empty((m, n), np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        if kernel == "f32":
            parts = {"w": w}
        elif kernel == "f16":
            parts = {"w": w.astype(np.float16)}
        else:
            self.scheme = parse_scheme(kernel)
            parts = quantize(w, self.scheme)
            self.scratch = np.empty(m * (k + 64) + m * (k // 32) * 8 + 64, np.uint8)
        self.weight_bytes = sum(a.nbytes for a in parts.values())
        copies = max(1, COLD_BYTES // self.weight_bytes) if cold else 1
        self.copies = [{key: a.copy() for key, a in parts.items()} for _ in range(copies)]
        self.turn = 0

    @property
    def name(self) -> str:
        what = "decode cold" if self.cold else ("decode hot" if self.m == 1 else "prefill")
        return f"{self.kernel:<7} {self.n:>4}x{self.k:<4} M={self.m:<3} {what}"

    def run(self, lib) -> None:
        parts = self.copies[self.turn]
        self.turn = (self.turn + 1) % len(self.copies)
        x, y, m, n, k = self.x.ctypes.data, self.y.ctypes.data, self.m, self.n, self.k
        if self.kernel == "f32":
            lib.h_linear_f32(x, k, parts["w"].ctypes.data, None, y, m, n, k, self.tile)
        elif self.kernel == "f16":
            lib.h_linear_f16(x, k, parts["w"].ctypes.data, None, y, m, n, k, self.tile)
        else:
            mins = parts["mins"].ctypes.data if "mins" in parts else None
            lib.h_linear_q(x, k, parts["q"].ctypes.data, parts["scales"].ctypes.data, mins, None, y, m, n, k,
                           self.scheme.bits, self.scheme.group, self.tile, self.scratch.ctypes.data)

    def rate(self, seconds: float) -> str:
        if self.m == 1:
            return f"{self.weight_bytes / seconds / 1e9:6.1f} GB/s"
        return f"{2 * self.m * self.n * self.k / seconds / 1e9:6.1f} GFLOP/s"


def seconds_per_call(case: Case, lib, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        case.run(lib)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="98b906e", help="git revision of the old kernels.c (default 98b906e, "
                        "the last before the batch-invariant kernels)")
    parser.add_argument("--new", default=str(ROOT / "targets" / "cpu" / "kernels.c"),
                        help="the new kernels.c (default: the tree's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", default="f32,q4g32,q8", help="comma-separated: f32, f16, q8, q4g32, q4g128 "
                        "(q4g128 only on K = 1536: 576 is not a multiple of 128)")
    parser.add_argument("--seconds", type=float, default=0.15, help="time per measurement")
    args = parser.parse_args()

    libs = {"old": linear_library(old_kernels(args.base)),
            "new": linear_library(Path(args.new).read_text())}
    for lib in libs.values():
        lib.h_set_threads(args.threads)
    fits = lambda kernel, k: kernel != "q4g128" or k % 128 == 0           # 576 = 4.5 groups of 128
    cases = [Case(kernel, n, k, m, cold) for kernel in args.kernels.split(",") for n, k in SHAPES if fits(kernel, k)
             for m, cold in ((1, False), (1, True), (512, False))]
    calls = []
    for case in cases:                        # warm up both, and size each measurement
        once = max(seconds_per_call(case, lib, 3) for lib in libs.values())
        calls.append(max(3, int(args.seconds / once)))
    times = {(i, side): [] for i in range(len(cases)) for side in libs}
    ratios = [[] for _ in cases]
    print(f"{len(cases)} cases, {args.rounds} rounds, {args.threads} threads, old = kernels.c at {args.base}",
          file=sys.stderr)
    for round_ in range(args.rounds):
        order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
        for i, case in enumerate(cases):
            got = {side: seconds_per_call(case, libs[side], calls[i]) for side in order}
            for side, seconds in got.items():
                times[i, side].append(seconds)
            ratios[i].append(got["new"] / got["old"])
        print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'case':<38} {'old':>10} {'new':>10}   {'new rate':>15}   new/old (median of {args.rounds} rounds; "
          "min-max)")
    for i, case in enumerate(cases):
        old, new = (statistics.median(times[i, side]) for side in ("old", "new"))
        r = ratios[i]
        print(f"{case.name:<38} {old * 1e6:8.0f}us {new * 1e6:8.0f}us   {case.rate(new):>15}   "
              f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})")


if __name__ == "__main__":
    # The harness opens one parallel region per call; threads that go to sleep between calls would
    # make each call also time the machine's wake-up latency (milliseconds on a busy VM).
    os.environ.setdefault("OMP_WAIT_POLICY", "active")
    main()
