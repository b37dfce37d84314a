"""Rotary embedding as one op: ``x*cos + concat(-x[..., D/2:], x[..., :D/2])*sin`` -> rope(x, cos, sin).

The cos/sin tables stay in the graph as computed from the positions (after the attention phase,
the step's ``positions``), so every rope_scaling variant keeps its own formula."""

from __future__ import annotations

from llmc.ir import Node
from llmc.ops import OpError
from llmc.passes.rewrite import P, commuted, emit


def _is_half(node: Node, x: Node, first: bool) -> bool:
    if node.op != "slice" or node.inputs[0] is not x or node.attrs["axis"] != x.type.rank - 1:
        return False
    size = x.type.shape[-1]
    if not isinstance(size, int):
        return False
    start, end = (0, size // 2) if first else (size // 2, size)
    return node.attrs["start"] == start and node.attrs["end"] == end and node.attrs["step"] == 1


def _is_rotate_half(node: Node, x: Node) -> bool:
    if node.op != "concat" or len(node.inputs) != 2 or node.attrs["axis"] != x.type.rank - 1:
        return False
    negated, first = node.inputs
    return negated.op == "neg" and _is_half(negated.inputs[0], x, first=False) and _is_half(first, x, first=True)


def rope(root: Node) -> Node | None:
    for straight, rotated in commuted(root):
        if straight.op != "mul" or rotated.op != "mul":
            continue
        for x, cos in commuted(straight):
            for half, sin in commuted(rotated):
                if _is_rotate_half(half, x) and root.type == x.type:
                    try:
                        return emit("rope", [x, cos, sin])
                    except OpError:      # tables that do not broadcast to x: not a rope
                        return None
    return None


RULES = [(P("add", name="root"), rope)]
