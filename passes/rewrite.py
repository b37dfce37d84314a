"""Patterns, rewrite tables, and the one driver that applies a table to a fixpoint.

A rule is ``(pattern, fn)``. A pattern matches a node by op (one name, several, or any), by its
inputs' patterns and by an optional predicate, and binds named sub-nodes. ``fn(**bindings)``
returns a replacement node of the same type, or ``None`` to decline. Passes are written as such
tables; only passes that need a whole-graph view (CSE) walk the graph themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from llmc.ir import Graph, Node, format_attrs


class RewriteError(AssertionError):
    """A rule produced a node of another type, or a table did not reach a fixpoint: a bug in a pass."""


@dataclass(frozen=True)
class Pat:
    op: Optional[str | tuple[str, ...]] = None
    inputs: Optional[tuple["Pat", ...]] = None
    name: Optional[str] = None
    where: Optional[Callable[[Node], bool]] = None

    def match(self, node: Node, bound: dict[str, Node]) -> bool:
        if self.op is not None and node.op not in ((self.op,) if isinstance(self.op, str) else self.op):
            return False
        if self.where is not None and not self.where(node):
            return False
        if self.name is not None:
            if self.name in bound and bound[self.name] is not node:
                return False
            bound[self.name] = node
        if self.inputs is not None:
            if len(self.inputs) != len(node.inputs):
                return False
            return all(p.match(i, bound) for p, i in zip(self.inputs, node.inputs))
        return True


def P(op=None, *inputs: Pat, name: str | None = None, where=None) -> Pat:
    """``P("mul", P(name="x"), P("const", name="c"), name="root")``: inputs given means exactly these."""
    return Pat(op, tuple(inputs) if inputs else None, name, where)


Rule = tuple[Pat, Callable[..., Optional[Node]]]

MAX_ROUNDS = 50


def rewrite(graph: Graph, rules: Sequence[Rule]) -> Graph:
    """Apply ``rules`` bottom-up, again and again, until no rule fires. Returns a new graph."""
    for _ in range(MAX_ROUNDS):
        graph, fired = _one_round(graph, rules)
        if not fired:
            return graph
    raise RewriteError(f"rules did not reach a fixpoint in {MAX_ROUNDS} rounds")


def _one_round(graph: Graph, rules: Sequence[Rule]) -> tuple[Graph, int]:
    mapping: dict[int, Node] = {}
    fired = 0
    for original in graph.nodes():
        if original.op == "input":
            mapping[id(original)] = original
            continue
        inputs = [mapping[id(i)] for i in original.inputs]
        node = original
        if any(a is not b for a, b in zip(inputs, original.inputs)):
            node = Node(original.op, inputs, original.attrs, original.type)
        mapping[id(original)], count = _apply(node, rules)
        fired += count
    return Graph(graph.inputs, [mapping[id(o)] for o in graph.outputs], graph.weights, graph.name), fired


def _apply(node: Node, rules: Sequence[Rule]) -> tuple[Node, int]:
    count = 0
    for _ in range(MAX_ROUNDS):
        for pattern, fn in rules:
            bound: dict[str, Node] = {}
            if not pattern.match(node, bound):
                continue
            result = fn(**bound)
            if result is None or result is node:
                continue
            if result.type != node.type:
                raise RewriteError(f"{fn.__name__} turned {node.op} {format_attrs(node.attrs)} of type {node.type} "
                                   f"into {result.op} of type {result.type}")
            node, count = result, count + 1
            break
        else:
            return node, count
    raise RewriteError(f"rules keep rewriting {node.op}: no fixpoint")


def rebuild(graph: Graph, replace: Callable[[Node, list[Node], Callable[[Node], Node]], Optional[Node]],
            inputs: Sequence[Node] | None = None) -> Graph:
    """Walk ``graph`` once in topological order; ``replace(original, new_inputs, rebuilt)`` may return
    a new node for ``original`` (inputs included), or None to keep it (rebuilt on the new inputs).
    ``rebuilt(node)`` gives the new node of an original one already walked, or of a new node built
    over original ones. For passes that change the signature or need a whole-graph view."""
    mapping: dict[int, Node] = {}

    def rebuilt(node: Node) -> Node:
        if id(node) in mapping:
            return mapping[id(node)]
        return Node(node.op, [rebuilt(i) for i in node.inputs], node.attrs, node.type)

    for original in graph.nodes():
        new_inputs = [mapping[id(i)] for i in original.inputs]
        node = replace(original, new_inputs, rebuilt)
        if node is None:
            node = original
            if any(a is not b for a, b in zip(new_inputs, original.inputs)):
                node = Node(original.op, new_inputs, original.attrs, original.type)
        mapping[id(original)] = node
    return Graph(list(inputs) if inputs is not None else graph.inputs,
                 [mapping[id(o)] for o in graph.outputs], graph.weights, graph.name)


def commuted(node: Node):
    """Both operand orders of a commutative binary node, for rules that don't care which is which."""
    a, b = node.inputs
    yield a, b
    yield b, a


def emit(op: str, inputs: Sequence[Node], **attrs) -> Node:
    """A new node whose type is the op's rule applied to its inputs."""
    from llmc.ops import infer

    return Node(op, inputs, attrs, infer(op, [i.type for i in inputs], attrs))


def add_weight(weights: dict, name: str, array) -> Node:
    """A weight node for a new constant; the name is made unique deterministically."""
    import numpy as np

    from llmc.ir import Type, dtype_of_array

    candidate, n = name, 1
    while candidate in weights and not (weights[candidate].shape == array.shape
                                        and np.array_equal(weights[candidate], array)):
        n += 1
        candidate = f"{name}#{n}"
    weights[candidate] = array
    return Node("weight", (), {"name": candidate}, Type(dtype_of_array(array), tuple(array.shape)))
