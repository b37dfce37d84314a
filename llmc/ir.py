"""The llmc IR: a typed SSA graph with symbolic dimensions, its text form, and its verifier.

A ``Node`` is an op name, its input nodes, its attributes and its result ``Type``; nothing
else hides in it. A ``Graph`` is its input nodes, its output nodes and the weights that its
``weight`` nodes name. Nodes refer to their inputs directly, so the graph is whatever is
reachable from the outputs: a rewrite builds new nodes and dead code disappears on its own.
Weights live in one dict shared by every graph derived from the same import; passes never
copy them.

Text form (stable, diffable, parseable)::

    graph @main(%input_ids: i64[1, seq]) {
      %0 = weight() {name="model.embed_tokens.weight"} : f32[49152, 576]
      %1 = embedding(%0, %input_ids) : f32[1, seq, 576]
      return %1
    }
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from llmc import dims, ops
from llmc.types import (DTYPES, FLOAT_DTYPES, IRError, TupleType, Type, dtype_of_array, format_attrs,  # noqa: F401
                        format_value, numpy_dtype, parse_attrs, parse_type, result_types)

class Node:
    __slots__ = ("op", "inputs", "attrs", "type")

    def __init__(self, op: str, inputs: Iterable["Node"], attrs: Mapping[str, Any], type: Type):
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = dict(attrs)
        self.type = type

    def __repr__(self) -> str:
        args = ", ".join(i.op for i in self.inputs)
        return f"<Node {self.op}({args}) {format_attrs(self.attrs)} : {self.type}>"


class Graph:
    """Inputs, outputs and the weights referenced by ``weight`` nodes (shared, never copied)."""

    def __init__(self, inputs: list[Node], outputs: list[Node],
                 weights: dict[str, np.ndarray] | None = None, name: str = "main"):
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.weights = weights if weights is not None else {}
        self.name = name

    def nodes(self) -> list[Node]:
        """Every node reachable from the outputs, inputs first, in a deterministic topological order."""
        order: list[Node] = list(self.inputs)
        seen = {id(n) for n in order}
        for root in self.outputs:
            stack = [(root, 0)]
            while stack:
                node, i = stack.pop()
                if id(node) in seen:
                    continue
                if i < len(node.inputs):
                    stack.append((node, i + 1))
                    child = node.inputs[i]
                    if id(child) not in seen:
                        stack.append((child, 0))
                else:
                    seen.add(id(node))
                    order.append(node)
        return order

    def op_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes():
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def weight_bytes(self) -> int:
        names = {n.attrs["name"] for n in self.nodes() if n.op == "weight"}
        return sum(self.weights[name].nbytes for name in names if name in self.weights)

    def __str__(self) -> str:
        return print_graph(self)


# ---------------------------------------------------------------------------------------------
# Text form: printer

def print_graph(graph: Graph) -> str:
    names: dict[int, str] = {}
    for node in graph.inputs:
        names[id(node)] = node.attrs["name"]
    params = ", ".join(f"%{n.attrs['name']}: {n.type}" for n in graph.inputs)
    lines = [f"graph @{graph.name}({params}) {{"]
    counter = 0
    for node in graph.nodes():
        if node.op == "input":
            continue
        names[id(node)] = str(counter)
        counter += 1
        args = ", ".join(f"%{names[id(i)]}" for i in node.inputs)
        attrs = format_attrs(node.attrs)
        lines.append(f"  %{names[id(node)]} = {node.op}({args})"
                     + (f" {attrs}" if attrs else "") + f" : {node.type}")
    lines.append("  return " + ", ".join(f"%{names[id(n)]}" for n in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Text form: parser (used by tests to write Before/Expected graphs)

_HEADER = re.compile(r"graph @(\w+)\((.*)\)\s*\{")
_NODE = re.compile(r"%(\w+) = (\w+)\(([^)]*)\)(?: (\{.*\}))? : (.+)")


def parse_graph(text: str, weights: dict[str, np.ndarray] | None = None) -> Graph:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    header = _HEADER.fullmatch(lines[0]) if lines else None
    if not header or lines[-1] != "}":
        raise IRError("IR text must look like 'graph @name(%x: f32[...]) { ... }'")
    values: dict[str, Node] = {}
    inputs = []
    params = header.group(2).strip()
    for param in re.findall(r"%(\w+):\s*(\w+\[[^\]]*\])", params):
        node = Node("input", (), {"name": param[0]}, parse_type(param[1]))
        values[param[0]] = node
        inputs.append(node)
    outputs = None
    for line in lines[1:-1]:
        if line.startswith("return"):
            names = re.findall(r"%(\w+)", line)
            outputs = [_lookup(values, n, line) for n in names]
            continue
        m = _NODE.fullmatch(line)
        if not m:
            raise IRError(f"cannot parse IR line: {line}")
        name, op, args, attrs, type_text = m.groups()
        operands = [_lookup(values, a, line) for a in re.findall(r"%(\w+)", args)]
        node = Node(op, operands, parse_attrs(attrs[1:-1]) if attrs else {}, parse_type(type_text))
        if name in values:
            raise IRError(f"%{name} is defined twice")
        values[name] = node
    if outputs is None:
        raise IRError("IR text has no return line")
    return Graph(inputs, outputs, weights, name=header.group(1))


def _lookup(values: dict[str, Node], name: str, line: str) -> Node:
    if name not in values:
        raise IRError(f"%{name} is used before it is defined: {line}")
    return values[name]


# ---------------------------------------------------------------------------------------------
# Verifier

def verify(graph: Graph) -> None:
    """Check every invariant of ``graph``; raise IRError naming the first node that breaks one."""
    if not graph.outputs:
        raise IRError("graph has no outputs")
    bound: set[str] = set()
    for node in graph.inputs:
        if node.op != "input" or "name" not in node.attrs:
            raise IRError(f"graph input {node!r} is not an input node")
        bound |= {d for d in node.type.shape if isinstance(d, str) and d.isidentifier()}
    input_ids = {id(n) for n in graph.inputs}
    for node in graph.nodes():
        if node.op == "input":
            if id(node) not in input_ids:
                raise IRError(f"input node %{node.attrs.get('name')} is not among the graph's inputs")
            continue
        try:
            expected = ops.infer(node.op, [i.type for i in node.inputs], node.attrs)
        except ops.OpError as exc:
            raise IRError(f"{_describe(node)}: {exc}") from None
        if expected is not None and expected != node.type:
            raise IRError(f"{_describe(node)}: declared type {node.type} but the op's rule gives {expected}")
        free = {s for t in result_types(node.type) for d in t.shape for s in dims.symbols(d)} - bound
        if free:
            raise IRError(f"{_describe(node)}: symbols {sorted(free)} are not bound by any graph input")
        if node.op == "weight" and graph.weights:
            name = node.attrs["name"]
            if name not in graph.weights:
                raise IRError(f"{_describe(node)}: no weight named {name!r}")
            array = graph.weights[name]
            if tuple(array.shape) != node.type.shape:
                raise IRError(f"{_describe(node)}: weight {name!r} has shape {tuple(array.shape)}")


def _describe(node: Node) -> str:
    attrs = format_attrs(node.attrs)
    args = ", ".join(str(i.type) for i in node.inputs)
    return f"{node.op}({args}){' ' + attrs if attrs else ''}"
