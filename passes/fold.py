"""Weight folding: an elementwise expression of weights and constants (Gemma's ``1 + weight``, a
bias times a scale) is computed once at compile time and becomes a new named weight."""

from __future__ import annotations

import numpy as np

from llmc import ops
from llmc.interpret import evaluate_node
from llmc.ir import Graph, Node, numpy_dtype
from llmc.passes.rewrite import add_weight, rebuild


def _constant(node: Node) -> bool:
    return node.op in ("weight", "const")


def fold_weights(graph: Graph) -> Graph:
    weights = graph.weights

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if original.op == "input" or ops.OPS[original.op].kind != "elementwise" or not inputs:
            return None
        if not all(_constant(i) for i in inputs) or not any(i.op == "weight" for i in inputs):
            return None
        if any(not isinstance(d, int) for d in original.type.shape):
            return None
        args = [weights[i.attrs["name"]] if i.op == "weight"
                else np.asarray(i.attrs["value"], numpy_dtype(i.type.dtype)) for i in inputs]
        node = Node(original.op, inputs, original.attrs, original.type)
        value = evaluate_node(graph, node, args, {})
        base = next(i.attrs["name"] for i in inputs if i.op == "weight")
        return add_weight(weights, f"{base}.{original.op}", np.ascontiguousarray(value))

    return rebuild(graph, replace)
