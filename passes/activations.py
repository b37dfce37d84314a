"""Activations recognised by what they compute, and gated MLPs as one op.

An elementwise subgraph over a single tensor (constants aside) is a unary function; evaluated on
sample points it is compared with the known activations, so GPT-2's hand-written tanh GELU (or any
other spelling of one) becomes ``gelu``. Then ``silu(g) * u`` becomes ``swiglu(g, u)`` and
``gelu(g) * u`` becomes ``geglu(g, u)``.
"""

from __future__ import annotations

import numpy as np

from llmc import ops
from llmc.ir import Graph, Node, numpy_dtype
from llmc.passes.rewrite import P, commuted, emit, rebuild

SAMPLES = np.linspace(-8.0, 8.0, 2001, dtype=np.float32)
KNOWN = [  # (op, attrs): tried in order, first match wins
    ("gelu", {"approximate": "tanh"}),
    ("gelu", {"approximate": "none"}),
    ("silu", {}),
    ("sigmoid", {}),
    ("relu", {}),
]


def _elementwise(node: Node) -> bool:
    return node.op in ops.OPS and ops.OPS[node.op].kind == "elementwise" and node.op not in ("const", "fused")


def _unary_subgraph(root: Node) -> tuple[Node, list[Node]] | None:
    """(x, nodes in topological order) if root is an elementwise function of one tensor x."""
    leaves, inner, order, stack = set(), {}, [], [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in inner:
            continue
        inner[id(node)] = node
        stack.append((node, True))
        for i in node.inputs:
            if i.op == "const" and i.type.rank == 0:
                continue
            if _elementwise(i) and i.type == root.type:
                stack.append((i, False))
            else:
                leaves.add(i)
    if len(leaves) != 1 or len(order) < 2:
        return None
    x = leaves.pop()
    return (x, order) if x.type == root.type and x.type.dtype in ("f32", "f16", "bf16", "f64") else None


def _evaluate(x: Node, order: list[Node]) -> np.ndarray:
    values = {id(x): SAMPLES}
    with np.errstate(all="ignore"):
        for node in order:
            args = [values[id(i)] if id(i) in values else np.asarray(i.attrs["value"], numpy_dtype(i.type.dtype))
                    for i in node.inputs]
            values[id(node)] = np.asarray(ops.OPS[node.op].ref(args, node.attrs, SAMPLES.shape, "f32"))
    return values[id(order[-1])]


def recognise_activations(graph: Graph) -> Graph:
    found: dict[int, tuple[str, dict, Node]] = {}
    claimed: set[int] = set()
    for node in reversed(graph.nodes()):          # outermost first: the largest subgraph wins
        if id(node) in claimed or not _elementwise(node):
            continue
        match = _unary_subgraph(node)
        if match is None:
            continue
        x, order = match
        got = _evaluate(x, order)
        for op, attrs in KNOWN:
            want = ops.OPS[op].ref([SAMPLES], attrs, SAMPLES.shape, "f32")
            if np.allclose(got, want, rtol=1e-5, atol=1e-6):
                found[id(node)] = (op, attrs, x)
                claimed.update(id(n) for n in order)
                break

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if id(original) not in found:
            return None
        op, attrs, x = found[id(original)]
        return emit(op, [rebuilt(x)], **attrs)

    return rebuild(graph, replace) if found else graph


def gated(root: Node) -> Node | None:
    for activated, up in commuted(root):
        if activated.op in ("silu", "gelu") and activated.type == up.type == root.type:
            gate = activated.inputs[0]
            if activated.op == "silu":
                return emit("swiglu", [gate, up])
            return emit("geglu", [gate, up], approximate=activated.attrs["approximate"])
    return None


GATED_RULES = [(P("mul", name="root"), gated)]
