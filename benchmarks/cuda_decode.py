"""End to end on a GPU: a cuda artifact against the cpu artifact of the same model.

    python benchmarks/cuda_decode.py s-cuda.llmc --cpu s-cpu.llmc [--tokens 128 --runs 5 --batches 1,4,16]

Checks that greedy generation agrees with the cpu artifact token for token, then prints decode
tokens/s (median of ``--runs``), the achieved GB/s (weight bytes one decode step reads, times
steps/s) and its share of the card's measured bandwidth (the executor's ``stream_bandwidth``, a
device-to-device copy), for one sequence (the token sampled on the device) and for decode batches
of several sequences (one token of each per step, aggregate tokens/s, the batch's logits brought
back to pick the next tokens; each batch size replays its own captured graph). Needs a machine
with an NVIDIA GPU and its driver.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import llmc
from llmc import abi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--cpu", required=True, help="the cpu artifact of the same model and scheme")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", default="1,4,16", help="decode batch sizes (sequences), comma-separated")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    prompt_len = 32
    positions = prompt_len + args.tokens

    gpu = llmc.load(args.artifact, max_context=min(max(sizes) * positions, gpu_limit(args.artifact)))
    cpu = llmc.load(args.cpu, max_context=1024)
    prompt = np.random.default_rng(0).integers(0, gpu.vocab_size, prompt_len)
    want = cpu.generate(list(prompt), max_new_tokens=32)
    got = gpu.generate(list(prompt), max_new_tokens=32)
    agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    print(f"greedy agreement with the cpu artifact: {agree}/{len(want)} tokens")

    weights = gpu.manifest["decode_weight_bytes"]
    peak = gpu.executor.stream_bandwidth()
    for size in sizes:
        tps = decode_rate(gpu, prompt, size, args.tokens, args.runs)
        steps = tps / size
        print(f"decode batch {size:>3}: {tps:8.1f} tok/s (median of {args.runs}), {weights * steps / 1e9:.1f} GB/s "
              f"of weights, {100 * weights * steps / 1e9 / peak:.0f}% of the measured {peak:.0f} GB/s "
              f"({gpu.executor.program.arch})")


def gpu_limit(path: str) -> int:
    from llmc.artifact import read_artifact

    return int(read_artifact(path).manifest["model"]["max_seq"])


def decode_rate(gpu, prompt: np.ndarray, size: int, tokens: int, runs: int) -> float:
    """Aggregate tokens/s of greedy decoding ``size`` sequences together, one token of each per
    step, after each one's prompt is prefilled (every sequence has blocks of its own)."""
    block = gpu.layout.block_size
    per_sequence = -(-(len(prompt) + tokens) // block)
    if size * per_sequence > gpu.kv_blocks:
        raise SystemExit(f"a decode batch of {size} needs {size * per_sequence} KV blocks; the pool has {gpu.kv_blocks}")
    tables = np.arange(size * per_sequence, dtype=np.int64).reshape(size, per_sequence)
    greedy = _greedy()
    rates = []
    for _ in range(runs):
        last = [int(gpu.run_batch(abi.Batch.single(prompt, 0, tables[s], "last")).argmax()) for s in range(size)]
        tokens_now = np.array(last, np.int64)
        start = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + tokens):
            batch = abi.Batch(tokens_now, np.full(size, pos, np.int64), np.arange(size, dtype=np.int64), tables,
                              np.arange(size, dtype=np.int64))
            if size == 1:
                tokens_now = np.array([gpu.executor.sample(abi.STEP, batch.inputs(), greedy, pos)], np.int64)
            else:
                tokens_now = gpu.executor.run(abi.STEP, batch.inputs()).argmax(axis=1).astype(np.int64)
        rates.append(size * tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def _greedy():
    from llmc.runtime.sampler import SamplingParams

    return SamplingParams()


if __name__ == "__main__":
    main()
