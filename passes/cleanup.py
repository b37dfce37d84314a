"""Cleanup: no-op casts and shape ops removed, reshape/permute chains collapsed, ``1/sqrt`` made
``rsqrt``, constant arithmetic folded, common subexpressions shared, a weight's rows picked by
index made an embedding lookup. Dead code needs no pass: a graph is what its outputs reach."""

from __future__ import annotations

import numpy as np

from llmc import ops
from llmc.interpret import evaluate_node
from llmc.ir import Graph, Node, format_attrs, numpy_dtype
from llmc.passes.rewrite import P, emit, rewrite


def _same_type_as_input(node: Node) -> bool:
    return node.type == node.inputs[0].type


def drop_noop(x, root):
    return x


def merge_reshapes(inner, root):
    x = inner.inputs[0]
    return x if x.type.shape == root.type.shape else Node("reshape", [x], root.attrs, root.type)


def merge_permutes(inner, root):
    perm = [inner.attrs["perm"][p] for p in root.attrs["perm"]]
    x = inner.inputs[0]
    if perm == list(range(len(perm))):
        return x
    return Node("permute", [x], {"perm": perm}, root.type)


def rsqrt_of_sqrt(sqrt, root):
    """``1 / sqrt(x)`` is ``rsqrt(x)`` (ONNX has no rsqrt: RMSNorm arrives as Sqrt, Reciprocal)."""
    return Node("rsqrt", [sqrt.inputs[0]], {}, root.type)


def drop_empty_operands(root):
    """concat ignores operands of size 0 along its axis (Phi-3's pass-through of a full rotary)."""
    axis = root.attrs["axis"]
    kept = [i for i in root.inputs if i.type.shape[axis] != 0]
    if len(kept) == len(root.inputs) or not kept:
        return None
    return kept[0] if len(kept) == 1 else Node("concat", kept, root.attrs, root.type)


def _is_identity_permute(node: Node) -> bool:
    return node.attrs["perm"] == list(range(node.type.rank))


def _is_full_slice(node: Node) -> bool:
    a = node.attrs
    return a["start"] == 0 and a["step"] == 1 and a["end"] == node.inputs[0].type.shape[a["axis"]]


def _scalar(value):
    def test(node: Node) -> bool:
        if node.op == "const":
            return node.attrs["value"] == value
        return node.op == "full" and node.attrs["value"] == value
    return test


def _broadcast_free(root: Node) -> bool:
    return root.type == root.inputs[0].type


def _elementwise_of_constants(node: Node) -> bool:
    return (ops.OPS[node.op].kind == "elementwise" and bool(node.inputs)
            and all(i.op == "const" for i in node.inputs))


def fold_constants(root):
    """An elementwise op whose inputs are all scalar constants becomes one constant."""
    args = [np.asarray(i.attrs["value"], dtype=numpy_dtype(i.type.dtype)) for i in root.inputs]
    with np.errstate(all="ignore"):
        value = evaluate_node(Graph([], [root]), root, args, {})
    return Node("const", (), {"value": value.item(), "dtype": root.type.dtype}, root.type)


X = P(name="x")


def _rows_of_a_table(node: Node) -> bool:
    return list(node.attrs["axes"]) == [0] and len(node.inputs) == 2 and node.inputs[0].op == "weight" \
        and node.inputs[0].type.rank == 2


def rows_as_embedding(root):
    """``table[ids]`` of a [rows, dim] weight is an embedding lookup (GPT-J's sin/cos table by
    position), which every target has a kernel for."""
    return emit("embedding", list(root.inputs))


NOOP_RULES = [
    (P("index", name="root", where=_rows_of_a_table), rows_as_embedding),
    (P("cast", X, name="root", where=_same_type_as_input), drop_noop),
    (P("reshape", X, name="root", where=_same_type_as_input), drop_noop),
    (P("expand", X, name="root", where=_same_type_as_input), drop_noop),
    (P("permute", X, name="root", where=_is_identity_permute), drop_noop),
    (P("slice", X, name="root", where=_is_full_slice), drop_noop),
    (P("concat", X, name="root"), drop_noop),
    (P("concat", name="root"), drop_empty_operands),
    (P("reshape", P("reshape", name="inner"), name="root"), merge_reshapes),
    (P("permute", P("permute", name="inner"), name="root"), merge_permutes),
    (P("reciprocal", P("sqrt", name="sqrt"), name="root"), rsqrt_of_sqrt),
    (P("mul", X, P(where=_scalar(1.0)), name="root", where=_broadcast_free), drop_noop),
    (P("add", X, P(where=_scalar(0.0)), name="root", where=_broadcast_free), drop_noop),
    (P(name="root", where=_elementwise_of_constants), fold_constants),
]


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Nodes with the same op, inputs, attributes and type become one (walks the graph: it must)."""
    seen: dict[tuple, Node] = {}
    mapping: dict[int, Node] = {}
    for original in graph.nodes():
        if original.op == "input":
            mapping[id(original)] = original
            continue
        inputs = [mapping[id(i)] for i in original.inputs]
        key = (original.op, tuple(id(i) for i in inputs), format_attrs(original.attrs), original.type)
        if key not in seen:
            node = original if all(a is b for a, b in zip(inputs, original.inputs)) else \
                Node(original.op, inputs, original.attrs, original.type)
            seen[key] = node
        mapping[id(original)] = seen[key]
    return Graph(graph.inputs, [mapping[id(o)] for o in graph.outputs], graph.weights, graph.name)


def simplify(graph: Graph) -> Graph:
    """The simplify phase: CSE, then the no-op / chain / folding table to a fixpoint, then CSE again."""
    graph = eliminate_common_subexpressions(graph)
    graph = rewrite(graph, NOOP_RULES)
    return eliminate_common_subexpressions(graph)
