"""``llmc bench``: prefill and decode speed of an artifact on this machine.

Decode on a CPU is a memory-bandwidth contest, so decode speed is also reported as achieved GB/s
(the weights read per token, plus the KV cache read at the mean position) and as a fraction of
this machine's bandwidth, measured here: a numpy streaming read, or the artifact's own threads
streaming, whichever is faster. Every figure is the median of
several runs; the machine is shared and noisy.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from llmc.runtime.model import Model
from llmc.runtime.profile import Profile, format_profile


def measure_bandwidth(megabytes: int = 512, runs: int = 5) -> float:
    """Memory bandwidth in GB/s: the best median of a streaming read (sum) and a copy (read + write)."""
    src = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    reads, copies = [], []
    for _ in range(runs):
        start = time.perf_counter()
        src.sum()
        reads.append(src.nbytes / (time.perf_counter() - start))
        start = time.perf_counter()
        np.copyto(dst, src)
        copies.append(2 * src.nbytes / (time.perf_counter() - start))
    return max(statistics.median(reads), statistics.median(copies)) / 1e9


def machine_bandwidth(model: Model | None = None) -> float:
    """This machine's bandwidth in GB/s: the numpy probe, or, for a compiled artifact, a streaming
    read by the artifact's own threads when that is faster (one numpy thread cannot saturate
    memory on every machine)."""
    probe = getattr(getattr(model, "executor", None), "stream_bandwidth", None)
    return max(measure_bandwidth(), probe()) if probe else measure_bandwidth()


def bytes_per_decode_token(model: Model, position: int) -> int:
    """Weights read for one token (recorded at compile time) plus the KV cache read at ``position``."""
    return int(model.manifest["decode_weight_bytes"]) + model.bytes_per_position * position


def bench(model: Model, prompt_lengths=(128, 512), decode_tokens: int = 128, runs: int = 3,
          bandwidth_gbs: float | None = None, profile: bool = False) -> dict:
    """Prefill and decode speed; with ``profile``, each phase's time per op kind as well
    (``result["profile"]``; none for a target or library without profile marks)."""
    start_profile = getattr(model.executor, "start_profile", None) if profile else None
    profiles: dict[str, Profile] = {}

    def profiled(phase: str, work):
        """work(), its steps added to the phase's profile"""
        if start_profile is None or not start_profile():
            return work()
        value = work()
        profiles[phase] = _merge(profiles.get(phase), model.executor.profile())
        return value

    rng = np.random.default_rng(0)
    vocab = model.vocab_size
    result: dict = {"target": model.manifest["target"]["name"], "quantization": model.manifest["quantization"],
                    "runs": runs, "prefill": {}, "decode": {}}
    for length in prompt_lengths:
        if length > model.max_context:
            continue
        ids = rng.integers(0, vocab, length)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            profiled(f"prefill {length}", lambda: model.step(ids, 0))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        result["prefill"][str(length)] = {"seconds": seconds, "tokens_per_s": length / seconds}
    prompt = 16
    decode_tokens = min(decode_tokens, model.max_context - prompt)
    times = []
    for _ in range(runs):
        ids = rng.integers(0, vocab, prompt)
        model.step(ids, 0)
        start = time.perf_counter()
        profiled("decode", lambda: _decode(model, int(ids[-1]), prompt, decode_tokens))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    per_token = bytes_per_decode_token(model, prompt + decode_tokens // 2)
    tokens_per_s = decode_tokens / seconds
    achieved = per_token * tokens_per_s / 1e9
    bandwidth = machine_bandwidth(model) if bandwidth_gbs is None else bandwidth_gbs
    result["decode"] = {"tokens": decode_tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
                        "bytes_per_token": per_token, "achieved_gbs": achieved,
                        "machine_bandwidth_gbs": bandwidth, "fraction_of_bandwidth": achieved / bandwidth}
    if profiles:
        result["profile"] = {phase: {"summary": p.summary(), "table": format_profile(p, f"profile of {phase}")}
                             for phase, p in profiles.items()}
    return result


def _decode(model: Model, token: int, start: int, count: int) -> None:
    for pos in range(start, start + count):
        token = int(np.argmax(model.step(np.array([token]), pos)))


def _merge(a: Profile | None, b: Profile) -> Profile:
    """Two profiles of one library as one."""
    if a is None:
        return b
    return Profile(a.steps + b.steps, [(label, x + y) for (label, x), (_, y) in zip(a.sites, b.sites)],
                   a.wall + b.wall, a.threads)


def format_report(path, result: dict) -> str:
    lines = [f"llmc bench {path}  (target {result['target']}, {result['quantization']}; "
             f"medians of {result['runs']} runs)"]
    for length, r in result["prefill"].items():
        lines.append(f"prefill {int(length):>5} tokens  {r['tokens_per_s']:9.1f} tok/s  ({r['seconds']:.2f} s)")
    d = result["decode"]
    lines.append(f"decode  {d['tokens']:>5} tokens  {d['tokens_per_s']:9.1f} tok/s  {d['achieved_gbs']:.1f} GB/s "
                 f"= {100 * d['fraction_of_bandwidth']:.0f}% of the measured {d['machine_bandwidth_gbs']:.1f} GB/s "
                 f"({d['bytes_per_token'] / 1e6:.0f} MB read per token)")
    lines += [p["table"] for p in result.get("profile", {}).values()]
    return "\n".join(lines)
