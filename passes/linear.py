"""Linear layers in one canonical form, and siblings merged.

- ``matmul(x, W)`` with a weight ``W[in, out]`` (GPT-2's Conv1D) becomes ``linear(x, W.T)``,
  ``matmul(x, W.T)`` (Falcon's) ``linear(x, W)``, and a bias added to a linear's output becomes
  the linear's bias.
- Linears that read the same input (Q/K/V projections, gate/up) become one linear over the
  concatenated weight, followed by slices: one pass over the input, one larger GEMV/GEMM.
"""

from __future__ import annotations

import os

import numpy as np

from llmc.ir import Graph, Node
from llmc.passes.rewrite import P, add_weight, emit, rebuild, rewrite


def canonical_linear(graph: Graph) -> Graph:
    weights = graph.weights

    def transposed(w: Node) -> Node:
        return add_weight(weights, w.attrs["name"] + ".T", np.ascontiguousarray(weights[w.attrs["name"]].T))

    def from_matmul(root: Node) -> Node | None:
        x, w = root.inputs
        if w.op == "permute" and list(w.attrs["perm"]) == [1, 0] and w.inputs[0].op == "weight" and x.type.rank >= 1:
            return emit("linear", [x, w.inputs[0]])          # x @ W.T (Falcon's linear): W is [out, in]
        if w.op != "weight" or w.type.rank != 2 or x.type.rank < 1:
            return None
        return emit("linear", [x, transposed(w)])

    def add_bias(product: Node, bias: Node, root: Node) -> Node | None:
        if len(product.inputs) != 2 or bias.type.shape != (product.type.shape[-1],) or root.type != product.type:
            return None
        return emit("linear", list(product.inputs) + [bias])

    rules = [
        (P("matmul", name="root"), from_matmul),
        (P("add", P("linear", name="product"), P("weight", name="bias"), name="root"), add_bias),
        (P("add", P("weight", name="bias"), P("linear", name="product"), name="root"), add_bias),
    ]
    return rewrite(graph, rules)


def _merged_name(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    suffix = suffix[suffix.find("."):] if "." in suffix else ""
    middles = [n[len(prefix): len(n) - len(suffix)] for n in names]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def merge_sibling_linears(graph: Graph) -> Graph:
    """Linears sharing one input and of one form (weight, bias or not) become one wider linear."""
    weights = graph.weights
    groups: dict[tuple, list[Node]] = {}
    for node in graph.nodes():
        if node.op == "linear" and all(i.op == "weight" for i in node.inputs[1:]):
            key = (id(node.inputs[0]), len(node.inputs), node.inputs[1].type.shape[1], node.type.dtype)
            groups.setdefault(key, []).append(node)
    slices: dict[int, tuple[int, int, int]] = {}      # member -> (group index, start, end)
    merged_inputs: list[list[Node]] = []
    for members in (m for m in groups.values() if len(m) > 1):
        offset = 0
        for member in members:
            rows = member.inputs[1].type.shape[0]
            slices[id(member)] = (len(merged_inputs), offset, offset + rows)
            offset += rows
        merged_inputs.append(members)
    if not merged_inputs:
        return graph
    built: dict[int, Node] = {}

    def merged(index: int, x: Node) -> Node:
        if index not in built:
            members = merged_inputs[index]
            params = []
            for position in range(1, len(members[0].inputs)):
                names = [m.inputs[position].attrs["name"] for m in members]
                array = np.concatenate([weights[n] for n in names], axis=0)
                params.append(add_weight(weights, _merged_name(names), array))
            built[index] = emit("linear", [x] + params)
        return built[index]

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if id(original) not in slices:
            return None
        index, start, end = slices[id(original)]
        whole = merged(index, inputs[0])
        return emit("slice", [whole], axis=whole.type.rank - 1, start=start, end=end, step=1)

    return rebuild(graph, replace)
