"""The batched step's kernels on SmolLM2 (issue 15's figures): decode throughput by batch size,
decode and prefill deep in the context against llama.cpp, and the KV cache formats' cost and
quality.

    python benchmarks/step_kernels.py batch ARTIFACT... [--batches 1,2,4,8,16,32] [--position 150] [--rounds 5]
    python benchmarks/step_kernels.py deep ARTIFACT... [--prompt 3000] [--decode 64] [--rounds 3]
    python benchmarks/step_kernels.py kv [--quant gguf] [--context 1024]

batch: one step of B decode tokens (B sequences at ``--position``, ``Model.run_batch``) for each
artifact, the artifacts interleaved step by step within a round and the order reversed every
other round; aggregate tok/s (medians over rounds) and its ratio to batch 1.

deep: prefill of a ``--prompt``-token prompt, then ``--decode`` greedy tokens, for each llmc
artifact, for llama.cpp (llama-cpp-python, SmolLM2's Q4_1 GGUF requantized to Q4_0, the fair
peer of q4g32) with and without its flash attention, and for ONNX Runtime GenAI's int4 build
(benchmarks/ort_peer.py; each peer where it is installed); engines interleaved, the order
reversed every other round; medians and the median of per-round ratios to each peer.

kv: the same weights built with each KV cache format (f32, f16, int8): bytes per position, and
perplexity on benchmarks/data/alice.txt in windows of ``--context`` tokens (stride half of it)
against the f32 cache's.

2 threads everywhere. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
THREADS = 2


def batch(args) -> dict:
    import llmc
    from llmc.abi import Batch

    batches = [int(b) for b in args.batches.split(",")]
    width = -(-(args.position + 2) // 16)
    models = {Path(p).name: llmc.load(p, max_context=width * 16, kv_blocks=max(batches) * width + 1, threads=THREADS)
              for p in args.artifacts}
    out: dict = {name: {} for name in models}
    for size in batches:
        tables = np.arange(size * width, dtype=np.int64).reshape(size, width)
        step = Batch(np.full(size, 100, np.int64), np.full(size, args.position, np.int64),
                     np.arange(size, dtype=np.int64), tables, np.arange(size, dtype=np.int64))
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for model in models.values():
            model.run_batch(step)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                for _ in range(3):
                    models[name].run_batch(step)
                times[name].append((time.perf_counter() - start) / 3)
        for name in names:
            seconds = statistics.median(times[name])
            out[name][size] = {"step_ms": round(1e3 * seconds, 2), "tok_s": round(size / seconds, 1)}
    for name, rows in out.items():
        first = rows[batches[0]]["tok_s"]
        for size, row in rows.items():
            row["x_batch_1"] = round(row["tok_s"] / first, 2)
    return out


def llama_cpp_q4_0(folder: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from engine import q4_0_gguf

    return q4_0_gguf(folder)


def deep(args) -> dict:
    import llmc

    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, args.prompt).tolist()
    context = args.prompt + args.decode + 8
    engines = {}
    for path in args.artifacts:
        model = llmc.load(path, max_context=context, threads=THREADS)
        engines[Path(path).name] = _llmc_run(model, prompt, args.decode)
    folder = Path(tempfile.mkdtemp())
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
    if Llama is not None:
        gguf = llama_cpp_q4_0(folder)
        for flash in (False, True):
            llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=THREADS,
                        n_threads_batch=THREADS, flash_attn=flash, verbose=False)
            engines[f"llama.cpp Q4_0{' flash' if flash else ''}"] = _llama_run(llm, prompt, args.decode)
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        from ort_peer import ort_int4, ort_run, smollm2_hf_folder

        engines["ORT GenAI int4"] = ort_run(ort_int4(smollm2_hf_folder(folder), folder / "ort-int4"), prompt,
                                            args.decode, context)
    names = list(engines)
    figures: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            prefill, decode = engines[name]()
            figures[name]["prefill"].append(args.prompt / prefill)
            figures[name]["decode"].append(args.decode / decode)
    out = {}
    peers = [n for n in names if n.startswith(("llama.cpp", "ORT"))]
    for name in names:
        row = {phase: round(statistics.median(v), 1) for phase, v in figures[name].items()}
        for peer in peers if name not in peers else []:
            for phase in ("prefill", "decode"):
                ratios = [a / b for a, b in zip(figures[name][phase], figures[peer][phase])]
                row[f"{phase} / {peer}"] = round(statistics.median(ratios), 2)
        out[name] = row
    return out


def _llmc_run(model, prompt, decode):
    def run() -> tuple[float, float]:
        ids = np.asarray(prompt, np.int64)
        start = time.perf_counter()
        logits = model.step(ids, 0)
        prefill = time.perf_counter() - start
        token = int(np.argmax(logits))
        start = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + decode):
            token = int(np.argmax(model.step(np.array([token]), pos)))
        return prefill, time.perf_counter() - start
    return run


def _llama_run(llm, prompt, decode):
    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        vocab = llm.n_vocab()
        for _ in range(decode):     # the last token's logits (llm.scores holds them only with logits_all)
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
            llm.eval([token])
        return prefill, time.perf_counter() - start
    return run


def kv(args) -> dict:
    import llmc
    from llmc.compiler import compile_model
    from llmc.runtime.evaluate import perplexity

    text = (HERE / "data" / "alice.txt").read_text()
    folder = Path(tempfile.mkdtemp())
    out = {}
    base = None
    for kind in ("f32", "f16", "int8"):
        path = folder / f"{kind}.llmc"
        compile_model("smollm2", path, quant=args.quant, kv=kind, progress=None)
        model = llmc.load(path, max_context=args.context, threads=THREADS)
        tokens = model.tokenizer.encode(text)
        ppl = perplexity(model, tokens, args.context, args.context // 2).perplexity
        base = base or ppl
        out[kind] = {"bytes_per_position": model.bytes_per_position, "perplexity": round(ppl, 4),
                     "vs_f32": f"{100 * (ppl / base - 1):+.3f}%", "tokens": len(tokens)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("batch")
    b.add_argument("artifacts", nargs="+")
    b.add_argument("--batches", default="1,2,4,8,16,32")
    b.add_argument("--position", type=int, default=150)
    b.add_argument("--rounds", type=int, default=5)
    d = commands.add_parser("deep")
    d.add_argument("artifacts", nargs="+")
    d.add_argument("--prompt", type=int, default=3000)
    d.add_argument("--decode", type=int, default=64)
    d.add_argument("--rounds", type=int, default=3)
    k = commands.add_parser("kv")
    k.add_argument("--quant", default="gguf")
    k.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    result = {"batch": batch, "deep": deep, "kv": kv}[args.command](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
