"""``llmc bench FILE --concurrency N``: an offline load run through the engine.

``concurrency`` clients each keep one request in flight (a closed loop, as vLLM's
``benchmark_serving`` and llama.cpp's server bench do), reading its tokens as they stream, until
``requests`` requests have finished. Prompts are random token ids (a fixed seed; no two share a
prefix, so the prefix cache does not flatter the figures), each request generates exactly its
``decode_tokens`` (end of sequence ignored). Reported: throughput (requests/s, generated and
prompt tok/s), time to first token, time per output token (per request: the time after the
first token over the tokens after it) and inter-token latency, p50 and p99.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def load_run(engine, prompt_lengths: Sequence[int], decode_tokens: int, concurrency: int, requests: int,
             progress: Callable[[int, int], None] | None = None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocab = engine.model.vocab_size
    prompts = [rng.integers(0, vocab, prompt_lengths[i % len(prompt_lengths)]).tolist() for i in range(requests)]
    lock = threading.Lock()
    queue = list(reversed(range(requests)))
    records: list[dict] = []
    errors: list[BaseException] = []

    def client():
        while True:
            with lock:
                if not queue or errors:
                    return
                index = queue.pop()
            try:
                start = time.perf_counter()
                handle = engine.submit(prompts[index], max_tokens=decode_tokens, ignore_eos=True)
                stamps = []
                for delta in handle:
                    if delta.token_ids:
                        stamps.append(time.perf_counter())
                end = time.perf_counter()
            except BaseException as exc:      # reported once the clients stop
                with lock:
                    errors.append(exc)
                return
            with lock:
                records.append({"prompt": len(prompts[index]), "tokens": len(stamps), "start": start, "end": end,
                                "stamps": stamps})
                if progress:
                    progress(len(records), requests)

    began = time.perf_counter()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - began
    ttft = [r["stamps"][0] - r["start"] for r in records if r["stamps"]]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in records if len(r["stamps"]) > 1]
    itl = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:])]
    generated = sum(r["tokens"] for r in records)
    metrics = engine.metrics()
    return {
        "requests": len(records), "concurrency": concurrency, "prompt_tokens": list(prompt_lengths),
        "decode_tokens": decode_tokens, "seconds": seconds,
        "requests_per_s": len(records) / seconds, "generated_tok_s": generated / seconds,
        "prompt_tok_s": sum(r["prompt"] for r in records) / seconds,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "preemptions": metrics["preemptions"], "steps": metrics["steps"],
        "mean_step_tokens": metrics["step_tokens"] / max(1, metrics["steps"]),
        "model_share": metrics["step_seconds"] / seconds,
    }


def format_load_report(path, result: dict) -> str:
    r = result
    ms = 1e3
    return "\n".join([
        f"llmc bench {path}  ({r['requests']} requests, {r['concurrency']} at a time; prompts of "
        f"{','.join(map(str, r['prompt_tokens']))} tokens, {r['decode_tokens']} generated each)",
        f"throughput     {r['requests_per_s']:8.2f} requests/s  {r['generated_tok_s']:9.1f} generated tok/s  "
        f"{r['prompt_tok_s']:9.1f} prompt tok/s  ({r['seconds']:.1f} s)",
        f"first token    p50 {r['ttft_p50_s'] * ms:8.1f} ms   p99 {r['ttft_p99_s'] * ms:8.1f} ms",
        f"per out token  p50 {r['tpot_p50_s'] * ms:8.1f} ms   p99 {r['tpot_p99_s'] * ms:8.1f} ms",
        f"inter-token    p50 {r['itl_p50_s'] * ms:8.1f} ms   p99 {r['itl_p99_s'] * ms:8.1f} ms",
        f"engine         {r['steps']} steps of {r['mean_step_tokens']:.1f} tokens on average, "
        f"{r['preemptions']} preemptions; {100 * r['model_share']:.0f}% of the time in the model's step",
    ])
