"""A decode step split into its graph and the Python around it. Engines: ``generator`` (ORT
GenAI's), ``runtime`` (llmc's ``Model.step`` on an onnx artifact: the batch check, the executor's
rows and pool), and each graph run by one bare loop, ``genai-bare`` and ``llmc-bare`` (IO binding,
batch 1, the caches bound as both past and present, a greedy token a step, ORT's own time timed
apart: what a runtime with no Python between steps would cost). ``--engines`` picks two or more,
interleaved round by round in one process (the order reversed every other round); each round is
``--decode`` steps after a ``--prompt``-token prefill; figures are ms a step (medians) and the
median of per-round ratios of each engine's speed to the first's.

    python benchmarks/onnx_decode_split.py ARTIFACT GENAI_FOLDER [--engines generator,runtime]
        [--prompt 512] [--decode 64] [--rounds 10]

GENAI_FOLDER is ORT GenAI's model builder output (benchmarks/ort_peer.py makes SmolLM2's). Pair
the engines, a process for each pair: with four ORT sessions in one process they slow each other
(the generator read 1.15x its own graph run bare beside three others, 1.01x beside it alone). Not
a test: the machine is shared and noisy, so only ratios within one run compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ort_peer import THREADS, ort_run      # noqa: E402
from step_kernels import _llmc_run         # noqa: E402


class Bare:
    """A bare decode loop over one ONNX Runtime session: its caches bound once as past and
    present, the step's few inputs written in place, the logits bound to one buffer."""

    def __init__(self, session, caches: dict[str, tuple[str, np.ndarray]]):
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self.values = []                    # the caches' OrtValues, kept alive while bound
        for past, (present, array) in caches.items():
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
            self.values.append(value)
        self.logits = np.empty(0, np.float32)

    def bind(self, inputs: dict[str, np.ndarray], logits: np.ndarray) -> None:
        for name, array in inputs.items():
            self.binding.bind_cpu_input(name, array)
        self.logits = logits
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)

    def decode(self, first: int, steps: int, set_step) -> tuple[float, float]:
        """(seconds a step, of which ORT's) for ``steps`` greedy tokens from position ``first``."""
        token, inside = 5, 0.0
        start = time.perf_counter()
        for position in range(first, first + steps):
            set_step(token, position)
            began = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            inside += time.perf_counter() - began
            token = int(np.argmax(self.logits.reshape(-1)))
        return (time.perf_counter() - start) / steps, inside / steps


def llmc_bare(model, prompt: np.ndarray, steps: int):
    """llmc's graph run bare: the executor's session, a cache row filled by the runtime's prefill."""
    executor = model.executor
    model.step(prompt, 0)                                   # the one sequence's row: row 0
    capacity = executor.rows.k.shape[3]
    caches = {}
    for layer in range(executor.layers):
        for which, rows in (("k", executor.rows.k), ("v", executor.rows.v)):
            caches[f"past_{which}.{layer}"] = (f"present_{which}.{layer}", np.array(rows[layer, :1, :, :capacity]))
    inputs = {"tokens": np.zeros(1, np.int64), "positions": np.zeros(1, np.int64),
              "logit_rows": np.zeros(1, np.int64), "gqa_tokens": np.zeros((1, 1, 2), np.int64),
              "gqa_slots": np.zeros((1, 1, 2), np.int64), "seqlens_k": np.zeros(1, np.int32),
              "query_seqlens": np.ones(1, np.int32), "total_length": np.zeros((), np.int32)}
    bare = Bare(executor.session, caches)
    bare.bind(inputs, np.empty((1, executor.vocab), np.float32))

    def set_step(token: int, position: int) -> None:
        inputs["tokens"][0], inputs["positions"][0] = token, position
        inputs["seqlens_k"][0], inputs["total_length"][...] = position, position + 1
    return lambda: bare.decode(len(prompt), steps, set_step)


def genai_bare(folder: Path, prompt: np.ndarray, steps: int, *, layers: int, kv_heads: int, head_dim: int,
               vocab: int):
    """ORT GenAI's graph run bare by plain onnxruntime, its caches shared past/present buffers as
    its generator binds them (``past_present_share_buffer``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    capacity = len(prompt) + steps + 8
    caches = {f"past_key_values.{layer}.{which}": (f"present.{layer}.{which}",
                                                   np.zeros((1, kv_heads, capacity, head_dim), np.float32))
              for layer in range(layers) for which in ("key", "value")}
    masks = {n: np.ones((1, n), np.int64) for n in range(len(prompt), capacity + 1)}
    bare = Bare(session, caches)
    bare.bind({"input_ids": np.asarray(prompt, np.int64)[None], "attention_mask": masks[len(prompt)]},
              np.empty((1, len(prompt), vocab), np.float32))
    session.run_with_iobinding(bare.binding)               # the prefill, once: each round decodes after it
    inputs = {"input_ids": np.zeros((1, 1), np.int64)}
    bare.bind(inputs, np.empty((1, 1, vocab), np.float32))

    def set_step(token: int, position: int) -> None:
        inputs["input_ids"][0, 0] = token
        bare.binding.bind_cpu_input("attention_mask", masks[position + 1])
    return lambda: bare.decode(len(prompt), steps, set_step)


def main() -> None:
    import llmc
    from llmc.artifact import read_artifact

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("genai", type=Path, help="ORT GenAI's model folder")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--engines", default="generator,runtime",
                        help="two or more of generator, runtime, genai-bare, llmc-bare, interleaved in this "
                             "process (the first is the ratios' base): more ORT sessions in one process slow "
                             "each other, so pair them")
    args = parser.parse_args()
    prompt = np.random.default_rng(0).integers(100, 40000, args.prompt)
    context = args.prompt + args.decode + 8
    makers = {
        "generator": lambda: (lambda run: lambda: (run()[1] / args.decode, None))(
            ort_run(args.genai, prompt.tolist(), args.decode, context)),
        "runtime": lambda: (lambda run: lambda: (run()[1] / args.decode, None))(
            _llmc_run(llmc.load(args.artifact, max_context=context, threads=THREADS), prompt.tolist(), args.decode)),
        "genai-bare": lambda: genai_bare(args.genai, prompt, args.decode, **shape),
        "llmc-bare": lambda: llmc_bare(llmc.load(args.artifact, max_context=context, threads=THREADS), prompt,
                                       args.decode),
    }
    names = args.engines.split(",")
    if not set(names) <= set(makers) or len(names) < 2:
        parser.error(f"--engines takes two or more of {', '.join(makers)}")
    manifest = read_artifact(args.artifact).manifest
    pool = manifest["kv_pool"]
    shape = {"layers": int(pool["layers"]), "kv_heads": int(pool["kv_heads"]), "head_dim": int(pool["head_dim"]),
             "vocab": int(manifest["vocab_size"])}
    engines = {name: makers[name]() for name in names}
    figures: dict[str, list[tuple[float, float | None]]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            figures[name].append(engines[name]())
    base = figures[names[0]]
    print(f"{args.decode} decode steps after {args.prompt} tokens, {args.rounds} rounds, {THREADS} threads")
    for name, rounds in figures.items():
        step = statistics.median(s for s, _ in rounds)
        ratio = statistics.median(b[0] / s[0] for b, s in zip(base, rounds))
        inside = [o for _, o in rounds if o is not None]
        ort_part = f", ORT alone {statistics.median(inside) * 1e3:.3f} ms" if inside else ""
        print(f"  {name:12s} {step * 1e3:7.3f} ms a step{ort_part}; speed / {names[0]}'s {ratio:.3f}")


if __name__ == "__main__":
    main()
