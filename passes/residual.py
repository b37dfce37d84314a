"""The residual add fused with the norm that reads it: ``h = a + b; n = norm(h)`` becomes one
``add_norm(a, b, w...)`` with two results, the sum (the residual stream goes on) and the norm."""

from __future__ import annotations

from llmc.ir import Graph, Node
from llmc.passes.rewrite import emit, rebuild

NORMS = {"rms_norm": "rms", "layer_norm": "layer"}


def fuse_residual_norms(graph: Graph) -> Graph:
    pairs: dict[int, Node] = {}          # the add -> the norm that reads it (the first one)
    for node in graph.nodes():
        if node.op in NORMS and len(node.inputs) >= 2 and node.inputs[0].op == "add":
            total = node.inputs[0]
            if total.inputs[0].type == total.inputs[1].type == total.type and id(total) not in pairs:
                pairs[id(total)] = node
    norms = {id(norm): total_id for total_id, norm in pairs.items()}
    fused: dict[int, Node] = {}

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if id(original) in pairs:
            norm = pairs[id(original)]
            params = [rebuilt(p) for p in norm.inputs[1:]]
            fused[id(original)] = emit("add_norm", inputs + params, norm=NORMS[norm.op], eps=norm.attrs["eps"])
            return emit("get", [fused[id(original)]], index=0)
        if id(original) in norms:
            return emit("get", [fused[norms[id(original)]]], index=1)
        return None

    return rebuild(graph, replace) if pairs else graph
