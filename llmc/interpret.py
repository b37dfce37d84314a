"""The reference interpreter: runs any graph with the numpy references of its ops.

It is the oracle for every pass (interpret before and after) and every kernel. It favours
clarity over speed but frees each value after its last use, so a full model runs in little more
than its weights' memory.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from llmc import dims, ops
from llmc.errors import InterpretError
from llmc.ir import Graph, Node, TupleType, Type, numpy_dtype


def bind_symbols(graph: Graph, arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Bind the symbolic dims of the graph's inputs from concrete arrays (checking the rest)."""
    env: dict[str, int] = {}
    for node, array in zip(graph.inputs, arrays):
        name, want = node.attrs["name"], node.type
        if array.ndim != want.rank:
            raise InterpretError(f"input {name!r} must have rank {want.rank} ({want}), got shape {array.shape}")
        for d, size in zip(want.shape, array.shape):
            if isinstance(d, str) and d.isidentifier():
                if env.setdefault(d, size) != size:
                    raise InterpretError(f"input {name!r}: symbol {d} is {env[d]} elsewhere but {size} here")
    for node, array in zip(graph.inputs, arrays):
        concrete = tuple(dims.evaluate(d, env) for d in node.type.shape)
        if concrete != array.shape:
            raise InterpretError(f"input {node.attrs['name']!r} must have shape {concrete}, got {array.shape}")
    return env


def run(graph: Graph, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Execute ``graph`` on ``inputs`` (by name or in order); return the outputs as numpy arrays."""
    if isinstance(inputs, Mapping):
        missing = [n.attrs["name"] for n in graph.inputs if n.attrs["name"] not in inputs]
        if missing:
            raise InterpretError(f"missing graph inputs {missing}")
        arrays = [np.asarray(inputs[n.attrs["name"]]) for n in graph.inputs]
    else:
        arrays = [np.asarray(a) for a in inputs]
        if len(arrays) != len(graph.inputs):
            raise InterpretError(f"graph takes {len(graph.inputs)} inputs, got {len(arrays)}")
    for node, array in zip(graph.inputs, arrays):
        if array.dtype != numpy_dtype(node.type.dtype):
            raise InterpretError(f"input {node.attrs['name']!r} must be {node.type.dtype}, got {array.dtype}")
    env = bind_symbols(graph, arrays)

    order = graph.nodes()
    last_use: dict[int, int] = {}
    for step, node in enumerate(order):
        for i in node.inputs:
            last_use[id(i)] = step
    for out in graph.outputs:
        last_use[id(out)] = len(order)

    values: dict[int, np.ndarray] = {id(n): a for n, a in zip(graph.inputs, arrays)}
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        for step, node in enumerate(order):
            if node.op != "input":
                values[id(node)] = evaluate_node(graph, node, [values[id(i)] for i in node.inputs], env)
            for key in {id(i) for i in node.inputs}:
                if last_use.get(key) == step:
                    del values[key]
    return [values[id(n)] for n in graph.outputs]


def evaluate_node(graph: Graph, node: Node, args: list, env: Mapping[str, int]):
    """Run one node's reference on concrete arguments and check the result against its type."""
    if isinstance(node.type, TupleType):
        shapes = [tuple(dims.evaluate(d, env) for d in t.shape) for t in node.type.types]
        results = ops.OPS[node.op].ref(args, node.attrs, shapes, None)
        return tuple(_conform(np.asarray(r), t, s, node) for r, t, s in zip(results, node.type.types, shapes))
    shape = tuple(dims.evaluate(d, env) for d in node.type.shape)
    if node.op == "weight":
        result = graph.weights[node.attrs["name"]]
    else:
        definition = ops.OPS[node.op]
        attrs = dict(node.attrs)
        for key in definition.dim_attrs:
            value = attrs[key]
            attrs[key] = [dims.evaluate(d, env) for d in value] if isinstance(value, list) else dims.evaluate(value, env)
        result = np.asarray(definition.ref(args, attrs, shape, node.type.dtype))
    return _conform(result, node.type, shape, node)


def _conform(result: np.ndarray, type: Type, shape: tuple[int, ...], node: Node) -> np.ndarray:
    if result.shape != shape:
        raise AssertionError(f"{node!r}: reference produced shape {result.shape}, type says {shape}")
    want = numpy_dtype(type.dtype)
    if result.dtype != want:
        result = result.astype(want)
    if type.dtype == "bf16":
        result = round_to_bf16(result)
    return result


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept in float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)
