"""The batched step's kernels on SmolLM2 (issue 15's figures): decode throughput by batch size,
decode and prefill deep in the context against llama.cpp, and the KV cache formats' cost and
quality.

    python benchmarks/step_kernels.py batch ARTIFACT... [--batches 1,2,4,8,16,32] [--position 150] [--rounds 5]
    python benchmarks/step_kernels.py deep ARTIFACT... [--prompt 3000] [--decode 64] [--rounds 3]
    python benchmarks/step_kernels.py big [--work DIR] [--prompt 512] [--decode 64] [--rounds 3]
    python benchmarks/step_kernels.py kv [--quant gguf] [--context 1024]

batch: one step of B decode tokens (B sequences at ``--position``, ``Model.run_batch``) for each
artifact, the artifacts interleaved step by step within a round and the order reversed every
other round; aggregate tok/s (medians over rounds) and its ratio to batch 1.

deep: prefill of a ``--prompt``-token prompt, then ``--decode`` greedy tokens, for each llmc
artifact, for llama.cpp (llama-cpp-python, SmolLM2's Q4_1 GGUF requantized to Q4_0, the fair
peer of q4g32) with and without its flash attention, and for ONNX Runtime GenAI's int4 build
(benchmarks/ort_peer.py; each peer where it is installed); engines interleaved, the order
reversed every other round; medians and the median of per-round ratios to each peer.

big: the same on a random-weight Llama of 0.90B parameters (built with transformers, kept in
``--work``) compiled by llmc (q4g32) and by ONNX Runtime GenAI's builder (int4); no llama.cpp
(llama-cpp-python ships no HF-to-GGUF converter).

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
    return compare(engines, args.prompt, args.decode, args.rounds)


def compare(engines: dict, prompt: int, decode: int, rounds: int) -> dict:
    """Each engine's prefill and decode tok/s over ``rounds`` interleaved rounds (the order reversed
    every other round): medians, and the median of per-round ratios to each peer."""
    names = list(engines)
    figures: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            prefill, seconds = engines[name]()
            figures[name]["prefill"].append(prompt / prefill)
            figures[name]["decode"].append(decode / seconds)
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


def big(args) -> dict:
    """A random-weight Llama of about 0.9B parameters: llmc q4g32 against ORT GenAI int4."""
    import llmc
    from llmc.compiler import compile_model
    from ort_peer import model_bytes, ort_int4, ort_run

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = random_llama_folder(work / "llama-0.9b")
    artifact = work / "llama-0.9b-q4g32.llmc"
    if not artifact.exists():
        compile_model(str(hf), artifact, quant="q4g32", progress=None)
    ort = work / "llama-0.9b-ort-int4"
    if not (ort / "genai_config.json").exists():
        ort_int4(hf, ort)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 30000, args.prompt).tolist()
    context = args.prompt + args.decode + 8
    engines = {"llmc q4g32": _llmc_run(llmc.load(artifact, max_context=context, threads=THREADS), prompt, args.decode),
               "ORT GenAI int4": ort_run(ort, prompt, args.decode, context)}
    out = compare(engines, args.prompt, args.decode, args.rounds)
    out["bytes"] = {"llmc q4g32": artifact.stat().st_size, "ORT GenAI int4": model_bytes(ort)}
    return out


def random_llama_folder(out: Path) -> Path:
    """hidden 2048, 16 layers, 32 query / 8 K/V heads, MLP 6144, vocab 32000, untied: 0.90B
    parameters, random (seed 0), saved as a Hugging Face folder (once)."""
    if (out / "config.json").exists():
        return out
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=6144, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    _placeholder_tokenizer(config.vocab_size).save_pretrained(out)     # ORT's builder wants one
    return out


def _placeholder_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up tokens (the benchmark feeds token ids)."""
    import tokenizers
    import transformers

    words = {f"t{i}": i for i in range(vocab)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t1", eos_token="t2",
                                                unk_token="t0")


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
    g = commands.add_parser("big")
    g.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llmc-big"))
    g.add_argument("--prompt", type=int, default=512)
    g.add_argument("--decode", type=int, default=64)
    g.add_argument("--rounds", type=int, default=3)
    k = commands.add_parser("kv")
    k.add_argument("--quant", default="gguf")
    k.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    result = {"batch": batch, "deep": deep, "big": big, "kv": kv}[args.command](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
