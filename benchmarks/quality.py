"""Perplexity and decode speed of SmolLM2 per quantization scheme, and of llama.cpp on the same
tokens, in one run.

    python benchmarks/quality.py [--text benchmarks/data/alice.txt] [--schemes f32,q8,q4g32+calib,gguf]
                                 [--kv int8] [--target cpu] [--runs 3]

Each scheme (``name+calib``: calibrated on llmc's default text) is compiled into a temporary folder
and scored with llmc's sliding-window perplexity (context 256, stride 128), once with each window
as one prefill and once token by token through decode (what generation computes: on the cpu
target, quantized decode rounds activations to int8); decode tok/s is the
median of --runs runs of 128 greedy tokens after a 16-token prompt (as ``llmc bench``). llama.cpp
(llama-cpp-python, the GGUF as shipped: Q4_1, 2 threads) is scored on exactly the same token ids
and windows and timed the same way. Needs llama-cpp-python for the last row.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def llama_cpp_perplexity(gguf: Path, ids: list[int], context: int, stride: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, logits_all=True, n_threads=2, verbose=False)
    total, count, scored = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        llm.reset()
        llm.eval(ids[begin:end])
        logits = np.asarray(llm.scores[: end - begin], dtype=np.float64)
        for t in range(max(scored, begin + 1), end):
            row = logits[t - begin - 1]
            total -= row[ids[t]] - row.max() - math.log(np.exp(row - row.max()).sum())
            count += 1
        scored = end
        if end == len(ids):
            break
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(HERE / "data" / "alice.txt"))
    parser.add_argument("--schemes", default="f32,f16,q8,q8+calib,q4g32,q4g32+calib,gguf")
    parser.add_argument("--target", default="cpu", choices=["cpu", "ref"])
    parser.add_argument("--runs", type=int, default=3, help="decode timing runs (0: no timing)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--kv", default="f32", choices=["f32", "int8"], help="KV cache format of every artifact")
    args = parser.parse_args()
    import llmc
    from llmc.compiler import compile_model
    from llmc.frontend import import_model
    from llmc.runtime.bench import bench
    from llmc.runtime.evaluate import perplexity

    imported = import_model("smollm2")
    text = Path(args.text).read_text()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.schemes.split(","):
            scheme, _, calibrated = name.partition("+")
            path = Path(folder) / f"{scheme}.llmc"
            compile_model(imported, path, target=args.target, quant=scheme, kv=args.kv,
                          calib="default" if calibrated else None, progress=None)
            model = llmc.load(path, max_context=max(args.context, 16 + 128))
            ids = model.tokenizer.encode(text)
            result = perplexity(model, ids, args.context)
            stepped = perplexity(model, ids, args.context, by_step=True).perplexity
            speed = bench(model, (), 128, args.runs, bandwidth_gbs=1.0)["decode"]["tokens_per_s"] if args.runs else 0
            rows[name] = (result.perplexity, path.stat().st_size)
            print(f"{name:<14} perplexity {result.perplexity:8.4f}  by step {stepped:8.4f}  decode {speed:6.1f} tok/s  "
                  f"({result.tokens} tokens, "
                  f"artifact {path.stat().st_size / 1e6:.0f} MB, KV cache {args.kv}: "
                  f"{model.cache_bytes / model.max_context / 1e3:.1f} KB per position)", flush=True)
    try:
        gguf = imported.source.path
        ppl = llama_cpp_perplexity(gguf, ids, args.context, args.context // 2)
        rows["llama.cpp Q4_1"] = (ppl, gguf.stat().st_size)
        speed = 0.0
        if args.runs:
            sys.path.insert(0, str(HERE))
            from peers import DECODE, bench_llama_cpp

            speed = DECODE / bench_llama_cpp(args.runs, prefill_too=False)["decode_seconds"]
        print(f"{'llama.cpp Q4_1':<14} perplexity {ppl:8.4f}  decode {speed:6.1f} tok/s", flush=True)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
    if "f32" in rows:
        base = rows["f32"][0]
        for name, (ppl, _) in rows.items():
            print(f"{name:<15} {100 * (ppl / base - 1):+.2f}% vs f32")


if __name__ == "__main__":
    main()
