"""Batch-1 decode and 512-token prefill of artifacts built by two llmc versions, interleaved round by
round in one run (the machine is noisy: compare within a round, report medians of ratios).

    python benchmarks/before_after.py --before-path /tmp/oldpkg \\
        --pair old-q4g32.llmc new-q4g32.llmc --pair old-f32.llmc new-f32.llmc [--rounds 7]

``--before-path`` is a folder on PYTHONPATH holding the earlier llmc as an importable ``llmc``
package (e.g. a ``git worktree`` of the earlier commit with ``passes/`` and ``targets/`` linked
inside ``llmc/``); the after engine is the installed llmc. Each measurement runs in its own
process (one llmc per process), alternating which engine goes first. Decode is reported as tok/s
and GB/s (weights plus the KV cache read per token) against the bandwidth the artifact's own
threads measure streaming 256 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MEASURE = r"""
import json, statistics, sys, time
import numpy as np
import llmc

path, prompt, decode, runs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = llmc.load(path, max_context=1024, threads=threads)
rng = np.random.default_rng(0)
ids = rng.integers(0, model.vocab_size, prompt)
model.step(ids, 0)                                  # warm up
prefill = []
for _ in range(runs):
    start = time.perf_counter()
    model.step(ids, 0)
    prefill.append(time.perf_counter() - start)
decodes = []
for _ in range(runs):
    token = int(np.argmax(model.step(ids[:16], 0)))
    start = time.perf_counter()
    for pos in range(16, 16 + decode):
        token = int(np.argmax(model.step([token], pos)))
    decodes.append(time.perf_counter() - start)
manifest = model.manifest
pool = manifest.get("kv_pool")          # format 2; a format-1 artifact has no pool, and only its speed is reported
per_position = pool["bytes_per_block"] // pool["block_size"] if pool else 0
bytes_per_token = manifest["decode_weight_bytes"] + per_position * (16 + decode // 2)
print(json.dumps({"prefill_tps": prompt / statistics.median(prefill),
                  "decode_tps": decode / statistics.median(decodes), "bytes_per_token": bytes_per_token,
                  "bandwidth": model.executor.stream_bandwidth(megabytes=256, runs=3)}))
"""


def measure(path: str, python_path: str | None, args) -> dict:
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    result = subprocess.run([sys.executable, "-c", MEASURE, path, str(args.prompt), str(args.decode), str(args.runs),
                             str(args.threads)], capture_output=True, text=True, env=env, cwd="/", timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"measuring {path} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-path", required=True, help="PYTHONPATH folder of the earlier llmc")
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="medians of this many runs inside a measurement")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = {tuple(pair): {"before": [], "after": []} for pair in args.pair}
    for round_ in range(args.rounds):
        for before, after in args.pair:
            order = [("before", before, args.before_path), ("after", after, None)]
            for side, path, python_path in (order if round_ % 2 == 0 else order[::-1]):
                results[(before, after)][side].append(measure(path, python_path, args))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{args.rounds} rounds, {args.threads} threads; prefill of {args.prompt} tokens, decode of {args.decode} "
          f"tokens after 16 (medians of {args.runs} runs per measurement); ratio = after / before, median of "
          "per-round ratios")
    print("| artifacts | prefill before (tok/s) | prefill after | ratio | decode before (tok/s) | decode after | "
          "ratio | decode after (GB/s, % of measured) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (before, after), sides in results.items():
        b, a = sides["before"], sides["after"]
        ratio = {k: statistics.median(x[k] / y[k] for x, y in zip(a, b)) for k in ("prefill_tps", "decode_tps")}
        med = {side: {k: statistics.median(r[k] for r in runs) for k in r0} for side, runs in sides.items()
               for r0 in [runs[0]]}
        gbs = med["after"]["decode_tps"] * med["after"]["bytes_per_token"] / 1e9
        print(f"| {os.path.basename(before)} -> {os.path.basename(after)} | {med['before']['prefill_tps']:.1f} | "
              f"{med['after']['prefill_tps']:.1f} | {ratio['prefill_tps']:.3f} | {med['before']['decode_tps']:.1f} | "
              f"{med['after']['decode_tps']:.1f} | {ratio['decode_tps']:.3f} | {gbs:.1f} "
              f"({100 * gbs / med['after']['bandwidth']:.0f}% of {med['after']['bandwidth']:.1f}) |")


if __name__ == "__main__":
    main()
