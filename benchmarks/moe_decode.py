"""Decode speed of a routed mixture of experts against its dense equivalent (issue 16).

A small random Mixtral (8 experts, top 2) is built twice from the same weights: as it is, and with
``num_experts_per_tok = 8``, so every token runs every expert (the dense equivalent: the same
matrices, all of them computed). Both are compiled for cpu at each scheme and decoded at batch 1
on 2 threads, the two artifacts interleaved round by round in this one process; the figure is the
median of the per-round ratios. Decode is also given as GB/s (the weights a token reads, from the
manifest's decode_weight_bytes, plus the KV cache at the mean position) against the bandwidth the
artifact's threads measure streaming 256 MiB.

    python benchmarks/moe_decode.py [--rounds 7] [--quant q4g32 f32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import llmc
from llmc.compiler import compile_model

CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, num_local_experts=8, num_experts_per_tok=2)
PROMPT, DECODE = 16, 64


def models():
    import torch
    import transformers

    torch.manual_seed(0)
    routed = transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG)).eval()
    dense = transformers.MixtralForCausalLM(transformers.MixtralConfig(**dict(CONFIG, num_experts_per_tok=8))).eval()
    dense.load_state_dict(routed.state_dict())
    return routed, dense


def decode_seconds(model, ids) -> float:
    token = int(np.argmax(model.step(ids, 0)[-1]))
    start = time.perf_counter()
    for pos in range(len(ids), len(ids) + DECODE):
        token = int(np.argmax(model.step([token], pos)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quant", nargs="+", default=["q4g32", "f32"])
    args = parser.parse_args()
    routed, dense = models()
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], PROMPT)
    print("| scheme | engine | decode tok/s | weights read per token | GB/s | of bandwidth | routed / dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for quant in args.quant:
            loaded = {}
            for name, model in (("routed", routed), ("dense", dense)):
                path = Path(folder) / f"{name}-{quant}.llmc"
                compile_model(model, path, target="cpu", quant=quant, progress=None)
                loaded[name] = llmc.load(path, max_context=256, threads=2)
                decode_seconds(loaded[name], ids)                       # warm up
            times = {name: [] for name in loaded}
            for round_ in range(args.rounds):
                order = list(loaded) if round_ % 2 == 0 else list(reversed(loaded))
                for name in order:
                    times[name].append(decode_seconds(loaded[name], ids))
            ratios = [d / r for r, d in zip(times["routed"], times["dense"])]
            bandwidth = loaded["routed"].executor.stream_bandwidth(megabytes=256, runs=3)
            for name, model in loaded.items():
                tps = DECODE / statistics.median(times[name])
                weights = model.manifest["decode_weight_bytes"]
                per_token = weights + model.bytes_per_position * (PROMPT + DECODE // 2)
                gbs = per_token * tps / 1e9
                ratio = f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})" \
                    if name == "routed" else ""
                print(f"| {quant} | {name} | {tps:.1f} | {weights / 1e6:.1f} MB | {gbs:.1f} | "
                      f"{100 * gbs / bandwidth:.0f}% of {bandwidth:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
