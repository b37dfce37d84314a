"""End to end on a GPU: a cuda artifact against the cpu artifact of the same model.

    python benchmarks/cuda_decode.py s-cuda.llmc --cpu s-cpu.llmc [--tokens 128 --runs 5]

Checks that greedy generation agrees with the cpu artifact token for token, then prints decode
tokens/s (median of ``--runs``), the achieved GB/s (weight bytes one decode step reads, times
tokens/s) and its share of the card's measured bandwidth (a device-to-device copy, timed with the
driver). Needs a machine with an NVIDIA GPU and its driver.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np

import llmc


def device_bandwidth(driver, megabytes: int = 1024, runs: int = 5) -> float:
    """GB/s of a device-to-device copy (each byte read once and written once)."""
    nbytes = megabytes << 20
    src, dst = driver.alloc(nbytes), driver.alloc(nbytes)
    rates = []
    for _ in range(runs + 1):
        driver.synchronize()
        start = time.perf_counter()
        driver.check("cuMemcpyDtoDAsync_v2", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes),
                     driver.stream)
        driver.synchronize()
        rates.append(2 * nbytes / (time.perf_counter() - start) / 1e9)
    driver.free(src), driver.free(dst)
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--cpu", required=True, help="the cpu artifact of the same model and scheme")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    gpu = llmc.load(args.artifact, max_context=1024)
    cpu = llmc.load(args.cpu, max_context=1024)
    prompt = list(np.random.default_rng(0).integers(0, gpu.vocab_size, 32))
    want = cpu.generate(prompt, max_new_tokens=32)
    got = gpu.generate(prompt, max_new_tokens=32)
    agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    print(f"greedy agreement with the cpu artifact: {agree}/{len(want)} tokens")

    rates = []
    for _ in range(args.runs):
        gpu.step(prompt, 0)
        token, start = int(prompt[-1]), time.perf_counter()
        for pos in range(len(prompt), len(prompt) + args.tokens):
            token = gpu.executor.step_token(np.array([token], np.int64), pos, _greedy(), pos)
        rates.append(args.tokens / (time.perf_counter() - start))
    tps = statistics.median(rates)
    weights = gpu.manifest["decode_weight_bytes"]
    peak = device_bandwidth(gpu.executor.driver)
    print(f"decode {tps:.1f} tok/s (median of {args.runs}), {weights * tps / 1e9:.1f} GB/s of weights, "
          f"{100 * weights * tps / 1e9 / peak:.0f}% of the measured {peak:.0f} GB/s ({gpu.executor.program.arch})")


def _greedy():
    from llmc.runtime.sampler import SamplingParams

    return SamplingParams()


if __name__ == "__main__":
    main()
