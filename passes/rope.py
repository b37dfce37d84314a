"""Rotary embedding as one op: ``x*cos + concat(-x[..., D/2:], x[..., :D/2])*sin`` -> rope(x, cos, sin),
and the interleaved form (pairs (2i, 2i + 1), Helium, Cohere, GPT-J), whose rotation is traced as
``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` -> rope(x, cos, sin) {interleaved}.

Partial rotary (StableLM, Phi, GPT-J) slices the rotated part off first: the rope runs on that
slice, and the concat with the part that passes through stays a copy. The cos/sin tables stay in
the graph as computed from the positions (after the attention phase, the step's ``positions``),
so every rope_scaling variant keeps its own formula."""

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


def _is_every_other(node: Node, x: Node, start: int) -> bool:
    """node = x[..., start::2] over the last axis."""
    if node.op != "slice" or node.inputs[0] is not x or node.attrs["axis"] != x.type.rank - 1:
        return False
    size = x.type.shape[-1]
    return isinstance(size, int) and node.attrs["start"] == start and node.attrs["step"] == 2 \
        and node.type.shape[-1] == size // 2


def _is_rotate_pairs(node: Node, x: Node) -> bool:
    """node = stack((-x[..., 1::2], x[..., ::2]), -1) flattened back to x's shape."""
    if node.op != "reshape" or node.type != x.type or node.inputs[0].op != "concat":
        return False
    joined = node.inputs[0]
    if joined.attrs["axis"] != x.type.rank or len(joined.inputs) != 2:
        return False
    negated, even = (i.inputs[0] if i.op == "reshape" and i.type.shape[-1] == 1 else None for i in joined.inputs)
    return negated is not None and even is not None and negated.op == "neg" \
        and _is_every_other(negated.inputs[0], x, 1) and _is_every_other(even, x, 0)


def rope(root: Node) -> Node | None:
    for straight, rotated in commuted(root):
        if straight.op != "mul" or rotated.op != "mul":
            continue
        for x, cos in commuted(straight):
            for turned, sin in commuted(rotated):
                if root.type != x.type:
                    continue
                attrs = {} if _is_rotate_half(turned, x) else {"interleaved": True} \
                    if _is_rotate_pairs(turned, x) else None
                if attrs is None:
                    continue
                try:
                    return emit("rope", [x, cos, sin], **attrs)
                except OpError:      # tables that do not broadcast to x: not a rope
                    return None
    return None


RULES = [(P("add", name="root"), rope)]
