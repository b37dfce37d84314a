"""Chains of elementwise ops left after the named fusions become one ``fused`` op, which a target
generates as a single loop. A chain grows from its last op through inputs of the same shape that
nothing else reads; inputs of other shapes (scalars, broadcast rows) stay operands of the loop."""

from __future__ import annotations

from llmc import ops
from llmc.ir import Graph, Node, format_value
from llmc.passes.rewrite import emit, rebuild


def _groupable(node: Node) -> bool:
    return (node.op in ops.OPS and ops.OPS[node.op].kind == "elementwise"
            and node.op not in ("const", "fused") and bool(node.inputs))


def group_elementwise(graph: Graph) -> Graph:
    order = graph.nodes()
    position = {id(n): i for i, n in enumerate(order)}
    uses: dict[int, int] = {}
    for node in order:
        for i in node.inputs:
            uses[id(i)] = uses.get(id(i), 0) + 1
    for out in graph.outputs:
        uses[id(out)] = uses.get(id(out), 0) + 1

    groups: dict[int, list[Node]] = {}
    absorbed: set[int] = set()
    for root in reversed(order):
        if id(root) in absorbed or not _groupable(root):
            continue
        members, stack = {id(root): root}, [root]
        while stack:
            for i in stack.pop().inputs:
                if (id(i) not in members and id(i) not in absorbed and _groupable(i)
                        and uses.get(id(i)) == 1 and i.type.shape == root.type.shape):
                    members[id(i)] = i
                    stack.append(i)
        if len(members) >= 2:
            groups[id(root)] = sorted(members.values(), key=lambda n: position[id(n)])
            absorbed.update(members)
    if not groups:
        return graph

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if id(original) not in groups:
            return None
        members = groups[id(original)]
        temps = {id(m): f"t{k}" for k, m in enumerate(members)}
        operands: list[Node] = []
        refs: dict[int, str] = {}
        body = []
        for member in members:
            step = [member.op]
            for i in member.inputs:
                if id(i) in temps:
                    step.append(temps[id(i)])
                else:
                    if id(i) not in refs:
                        refs[id(i)] = f"in{len(operands)}"
                        operands.append(rebuilt(i))
                    step.append(refs[id(i)])
            step += [f"{k}={format_value(member.attrs[k])}" for k in sorted(member.attrs)]
            body.append(step)
        return emit("fused", operands, body=body)

    return rebuild(graph, replace)
