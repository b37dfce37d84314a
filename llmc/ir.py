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

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from llmc import dims
from llmc.dims import Dim

DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool")
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")

_NUMPY_DTYPES = {
    "f64": np.float64, "f32": np.float32, "f16": np.float16,
    # numpy has no bfloat16: the interpreter holds bf16 values in float32, rounded to bf16.
    "bf16": np.float32,
    "i64": np.int64, "i32": np.int32, "i16": np.int16, "i8": np.int8, "u8": np.uint8,
    "bool": np.bool_,
}


def numpy_dtype(dtype: str) -> type:
    return _NUMPY_DTYPES[dtype]


def dtype_of_array(array: np.ndarray) -> str:
    for name, np_type in _NUMPY_DTYPES.items():
        if name != "bf16" and array.dtype == np_type:
            return name
    raise IRError(f"numpy dtype {array.dtype} has no llmc equivalent")


class IRError(Exception):
    """A malformed graph or IR text. Raised by the parser and the verifier."""


@dataclass(frozen=True)
class Type:
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(dims.canonical(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class TupleType:
    """The type of a node with several results (a fused op); ``get`` picks one."""
    types: tuple[Type, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.types) + ")"


def result_types(t: Type | TupleType) -> tuple[Type, ...]:
    return t.types if isinstance(t, TupleType) else (t,)


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

def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise IRError(f"attribute value {value!r} of type {type(value).__name__} has no text form")


def format_attrs(attrs: Mapping[str, Any]) -> str:
    if not attrs:
        return ""
    return "{" + ", ".join(f"{k}={format_value(attrs[k])}" for k in sorted(attrs)) + "}"


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

_VALUE_TOKEN = re.compile(r"""\s*(?:("(?:[^"\\]|\\.)*")|([\[\],=])|([^\s\[\],=]+))""")


def _parse_scalar(word: str) -> Any:
    if word == "none":
        return None
    if word in ("true", "false"):
        return word == "true"
    if word in ("inf", "-inf", "nan"):
        return float(word)
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    try:
        return float(word)
    except ValueError:
        raise IRError(f"cannot parse attribute value {word!r}") from None


def parse_attrs(text: str) -> dict[str, Any]:
    tokens = [t for t in _VALUE_TOKEN.findall(text)]
    flat = []
    for string, punct, word in tokens:
        flat.append(("str", json.loads(string)) if string else ("p", punct) if punct else ("w", word))
    pos = 0

    def value():
        nonlocal pos
        kind, tok = flat[pos]
        pos += 1
        if kind == "str":
            return tok
        if (kind, tok) == ("p", "["):
            items = []
            while flat[pos] != ("p", "]"):
                items.append(value())
                if flat[pos] == ("p", ","):
                    pos += 1
            pos += 1
            return items
        if kind == "w":
            return _parse_scalar(tok)
        raise IRError(f"unexpected {tok!r} in attributes {text!r}")

    attrs = {}
    try:
        while pos < len(flat):
            kind, key = flat[pos]
            if kind != "w" or flat[pos + 1] != ("p", "="):
                raise IRError(f"expected name=value in attributes {text!r}")
            pos += 2
            attrs[key] = value()
            if pos < len(flat) and flat[pos] == ("p", ","):
                pos += 1
    except IndexError:
        raise IRError(f"truncated attributes {text!r}") from None
    return attrs


def parse_type(text: str) -> Type | TupleType:
    text = text.strip()
    if text.startswith("("):
        return TupleType(tuple(parse_type(t) for t in re.findall(r"\w+\[[^\]]*\]", text)))
    m = re.fullmatch(r"\s*(\w+)\[(.*)\]\s*", text)
    if not m:
        raise IRError(f"cannot parse type {text!r}")
    body = m.group(2).strip()
    shape = [] if not body else [_parse_dim(d) for d in body.split(",")]
    return Type(m.group(1), tuple(shape))


def _parse_dim(text: str) -> Dim:
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else dims.canonical(text)


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
    from llmc import ops

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
