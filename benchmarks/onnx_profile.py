"""Where an onnx artifact's decode step spends its time, beside ONNX Runtime GenAI's: both under
ORT's own profiler in one run, the engines interleaved round by round (the order reversed every
other round), each round a ``--prompt``-token prefill then ``--steps`` decode steps; per op type,
milliseconds a decode step (medians over rounds), and the median of per-round ratios of the steps'
totals. Also what one ONNX node costs by itself (chains of 2000 tiny nodes), to tell the graph's
node count from its work.

    python benchmarks/onnx_profile.py ARTIFACT GENAI_FOLDER [--prompt 512] [--steps 16] [--rounds 3]

GENAI_FOLDER is ORT GenAI's model builder output (benchmarks/ort_peer.py makes SmolLM2's); its
genai_config.json gets ``enable_profiling`` in a copy. 2 threads. The profiler adds its own cost
to every node, so a profiled step exceeds an unprofiled one and cheap ops read dearer than they
are: compare the expensive op types, and the per-node cost measured apart. MatMul is split by
what it multiplies: by a constant (llmc's q4 group minimums, one small product beside each q4
linear) or not (attention's products). Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = 2


def node_cost(op: str, count: int = 2000, rounds: int = 50) -> float:
    """Microseconds one ``op`` node costs in a chain of ``count`` on a [1, 576] f32 tensor."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    operand = "one" if op == "Add" else "shape"
    nodes, previous = [], "x"
    for i in range(count):
        nodes.append(helper.make_node(op, [previous, operand], [f"t{i}"]))
        previous = f"t{i}"
    initializer = (onnx.numpy_helper.from_array(np.ones((1, 576), np.float32), "one") if op == "Add"
                   else onnx.numpy_helper.from_array(np.array([1, 576], np.int64), "shape"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 576])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, 576])], [initializer])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.zeros((1, 576), np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(rounds):
        session.run(None, {"x": x})
    return (time.perf_counter() - start) / rounds / count * 1e6


def llmc_engine(artifact: Path, folder: Path, context: int):
    """(run(prompt, steps), end() -> profile path): llmc's onnx executor with its session profiled."""
    import onnxruntime as ort

    import llmc

    plain = ort.SessionOptions

    class Profiled(plain):                    # the executor makes its session with these options
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(folder / "llmc")

    ort.SessionOptions = Profiled
    try:
        model = llmc.load(artifact, max_context=context, threads=THREADS)
    finally:
        ort.SessionOptions = plain
    return (lambda prompt, steps: model.generate(prompt, max_new_tokens=steps + 1),
            lambda: Path(model.executor.session.end_profiling()))


def genai_engine(source: Path, folder: Path, context: int):
    """The same for ORT GenAI, from a copy of its folder whose config turns profiling on."""
    import onnxruntime_genai as og

    copy = folder / "genai"
    shutil.copytree(source, copy)
    config = json.loads((copy / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["enable_profiling"] = str(folder / "genai")
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
    (copy / "genai_config.json").write_text(json.dumps(config))
    state = {"model": og.Model(str(copy))}

    def run(prompt, steps):
        params = og.GeneratorParams(state["model"])
        params.set_search_options(max_length=context, do_sample=False)
        generator = og.Generator(state["model"], params)
        generator.append_tokens(np.asarray(prompt, np.int32))
        for _ in range(steps + 1):            # ORT runs the model for all but the last: 1 + steps runs
            generator.generate_next_token()

    def end() -> Path:
        state.clear()                         # ORT writes a session's profile when the session goes
        import gc

        gc.collect()
        return max(folder.glob("genai*.json"), key=lambda p: p.stat().st_mtime)
    return run, end


def decode_ops(profile: Path, rounds: int, steps: int) -> list[collections.Counter]:
    """Per round, microseconds per op type over its ``steps`` decode runs (each round's first run
    is the prefill)."""
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    if len(runs) != rounds * (1 + steps):
        raise SystemExit(f"{profile}: {len(runs)} runs, not {rounds} rounds of 1 + {steps}")
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    out = []
    for r in range(rounds):
        decode = runs[r * (1 + steps) + 1:(r + 1) * (1 + steps)]
        first, last = decode[0]["ts"], decode[-1]["ts"] + decode[-1]["dur"]
        spent = collections.Counter()
        for e in nodes:
            if first <= e["ts"] <= last:
                op = e["args"]["op_name"]
                if op == "MatMul":            # the profile lists the shapes of inputs that are not constants
                    shapes = e["args"].get("input_type_shape", [])
                    op = "MatMul by a constant" if len(shapes) == 1 else "MatMul (attention)"
                spent[op] += e["dur"]
                spent[op, "count"] += 1
        spent["(step total)"] = sum(r["dur"] for r in decode)
        out.append(spent)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("genai", type=Path, help="ORT GenAI's model folder")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for op in ("Add", "Reshape"):
        print(f"one {op} node alone: {node_cost(op):.2f} us (chains of 2000, {THREADS} threads)")
    folder = Path(tempfile.mkdtemp(prefix="llmc-onnx-profile-"))
    context = args.prompt + args.steps + 8
    engines = {"llmc onnx": llmc_engine(args.artifact, folder, context),
               "ORT GenAI": genai_engine(args.genai, folder, context)}
    prompt = np.random.default_rng(0).integers(0, 1000, args.prompt).tolist()     # any model has 1000 tokens
    for r in range(args.rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            engines[name][0](prompt, args.steps)
    per_round = {name: decode_ops(end(), args.rounds, args.steps) for name, (_, end) in engines.items()}
    print(f"{args.steps} decode steps after {args.prompt} tokens, under the profiler, {args.rounds} rounds "
          "(medians, ms a step)")
    for name, rounds in per_round.items():
        ops = sorted({op for r in rounds for op in r if isinstance(op, str)},
                     key=lambda op: -statistics.median(r[op] for r in rounds))
        print(f"  {name}:")
        for op in ops[:16]:
            count = rounds[0][op, "count"] // args.steps
            print(f"    {op:34s} {statistics.median(r[op] for r in rounds) / args.steps / 1000:7.2f}"
                  + (f"  x{count}" if count else ""))
    ratios = [a["(step total)"] / b["(step total)"] for a, b in zip(per_round["llmc onnx"], per_round["ORT GenAI"])]
    print(f"  llmc onnx / ORT GenAI, a profiled step: {statistics.median(ratios):.2f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
