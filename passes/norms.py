"""RMSNorm as one op: ``w * (x * rsqrt(mean(x**2, last axis) + eps))`` in any operand order.
(LayerNorm arrives as one op from the importer already.)"""

from __future__ import annotations

from llmc.ir import Node
from llmc.passes.rewrite import P, commuted, emit


def _square_of(node: Node, x: Node) -> bool:
    if node.op == "pow":
        base, exponent = node.inputs
        return base is x and exponent.op == "const" and exponent.attrs["value"] == 2
    return node.op == "mul" and node.inputs[0] is x and node.inputs[1] is x


def rms_norm(root: Node) -> Node | None:
    for weight, normed in commuted(root):
        if weight.op != "weight" or weight.type.rank != 1 or normed.op != "mul":
            continue
        for x, scale in commuted(normed):
            if scale.op != "rsqrt" or scale.inputs[0].op != "add":
                continue
            for mean, eps in commuted(scale.inputs[0]):
                if (mean.op == "mean" and eps.op == "const" and mean.attrs["keepdim"]
                        and mean.attrs["axes"] == [x.type.rank - 1] and _square_of(mean.inputs[0], x)
                        and root.type == x.type):
                    return emit("rms_norm", [x, weight], eps=float(eps.attrs["value"]))
    return None


RULES = [(P("mul", name="root"), rms_norm)]
