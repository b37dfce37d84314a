"""Where an onnx artifact's decode step spends its time: ONNX Runtime's own profiler over decode
steps deep in a prompt, by op type, and what one ONNX node costs by itself (chains of 2000 tiny
nodes), to tell the graph's node count from its work.

    python benchmarks/onnx_profile.py ARTIFACT [--prompt 512] [--steps 16]

2 threads. The profiler adds its own cost to every node, so the step's total under it exceeds an
unprofiled step and cheap ops read dearer than they are: compare op types by their share, and the
per-node cost measured apart. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import collections
import json
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


def profile(artifact: Path, prompt: int, steps: int) -> None:
    import onnxruntime as ort

    import llmc

    folder = tempfile.mkdtemp(prefix="llmc-onnx-profile-")
    plain = ort.SessionOptions

    class Profiled(plain):                    # the executor makes its session with these options
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(Path(folder) / "step")

    ort.SessionOptions = Profiled
    try:
        model = llmc.load(artifact, max_context=prompt + steps + 8, threads=THREADS)
    finally:
        ort.SessionOptions = plain
    ids = np.random.default_rng(0).integers(0, 1000, prompt).tolist()       # any model has 1000 tokens
    model.generate(ids, max_new_tokens=steps + 1)
    events = json.loads(Path(model.executor.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    first, last = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    spent, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and first <= e["ts"] <= last:
            spent[e["args"]["op_name"]] += e["dur"]
            counts[e["args"]["op_name"]] += 1
    total = sum(spent.values())
    print(f"{artifact}: {steps} decode steps after {prompt} tokens, under the profiler")
    print(f"  a step {np.mean([r['dur'] for r in runs]) / 1000:.1f} ms, its nodes' kernels "
          f"{total / steps / 1000:.1f} ms, {sum(counts.values()) // steps} nodes")
    for op, us in spent.most_common(12):
        print(f"  {op:34s} {us / steps / 1000:6.2f} ms  {100 * us / total:5.1f}%  x{counts[op] // steps}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    for op in ("Add", "Reshape"):
        print(f"one {op} node alone: {node_cost(op):.2f} us (chains of 2000, {THREADS} threads)")
    profile(args.artifact, args.prompt, args.steps)


if __name__ == "__main__":
    main()
