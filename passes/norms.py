"""RMSNorm as one op: ``w * (x * rsqrt(mean(x**2, last axis) + eps))`` in any operand order (eps may
be absent: 0); and
LayerNorm without a bias written out the same way around ``x - mean(x)`` (Cohere's). (LayerNorm
called as ``F.layer_norm`` arrives as one op from the importer already.)"""

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
            if scale.op != "rsqrt":
                continue
            for mean, eps in _mean_plus_eps(scale.inputs[0]):
                if (mean.op == "mean" and mean.attrs["keepdim"]
                        and mean.attrs["axes"] == [x.type.rank - 1] and _square_of(mean.inputs[0], x)
                        and root.type == x.type):
                    return emit("rms_norm", [x, weight], eps=eps)
    return None


def _mean_plus_eps(node: Node):
    """(mean, eps) candidates of ``mean + eps``; a bare mean is eps 0 (an exporter may fold a tiny
    eps away: torch.onnx drops Helium's 1e-8)."""
    if node.op == "add":
        return [(mean, float(eps.attrs["value"])) for mean, eps in commuted(node) if eps.op == "const"]
    return [(node, 0.0)]


def _mean_last(node: Node, rank: int) -> bool:
    return node.op == "mean" and node.attrs["keepdim"] and list(node.attrs["axes"]) == [rank - 1]


def layer_norm(root: Node) -> Node | None:
    """LayerNorm written out (Cohere's): ``w * ((x - mean(x)) * rsqrt(mean((x - mean(x))**2) + eps))``."""
    for weight, normed in commuted(root):
        if weight.op != "weight" or weight.type.rank != 1 or normed.op != "mul":
            continue
        for centered, scale in commuted(normed):
            if centered.op != "sub" or scale.op != "rsqrt" or scale.inputs[0].op != "add":
                continue
            x, mean_x = centered.inputs
            if mean_x.inputs[0] is not x or not _mean_last(mean_x, x.type.rank) or root.type != x.type:
                continue
            for variance, eps in commuted(scale.inputs[0]):
                if eps.op == "const" and _mean_last(variance, x.type.rank) and _square_of(variance.inputs[0], centered):
                    return emit("layer_norm", [x, weight], eps=float(eps.attrs["value"]))
    return None


# LayerNorm first: written out, it is also an RMSNorm of x - mean(x), which would leave the mean behind.
RULES = [(P("mul", name="root"), layer_norm), (P("mul", name="root"), rms_norm)]
