"""What every target's lowering shares: walking the graph's needed nodes in order, values as
strided views (view ops cost nothing), buffers with live ranges for the arena plan, and the
``out`` buffer written in place by the output's producer.

A target subclasses ``GraphLowering`` and provides ``lower(node)`` for the ops that compute
(calling ``lower_view`` first), ``alloc`` and ``copy_into``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from llmc import abi, dims
from llmc.errors import LlmcError
from llmc.ir import Graph, Node, Type
from llmc.ops import OPS

from .arena import Buffer
from .views import View

SYMBOLS = {"seq", "rows", "seqs", "max_blocks", "blocks"}     # the step's symbolic dims (llmc.abi)
BATCH_INPUTS = tuple(name for name, _ in abi.BATCH_INPUTS)


def f16_weight(node: Node) -> Node | None:
    """The f16 weight behind ``cast(weight f16) -> f32`` (f16 storage), read directly by kernels."""
    if node.op == "cast" and node.inputs[0].op == "weight" and node.inputs[0].type.dtype == "f16" \
            and node.type.dtype == "f32":
        return node.inputs[0]
    return None


class GraphLowering(ABC):
    error: type[LlmcError] = LlmcError     # the target's LoweringError
    target = ""
    fallback = "ref"                        # the target to suggest for a graph this one cannot lower

    def __init__(self, graph: Graph):
        self.graph = graph
        self.buffers: list[Buffer] = []
        self.values: dict[int, View | tuple[View, ...]] = {}
        self.index = 0
        self.out_node: int | None = None

    # -- the walk ------------------------------------------------------------------------------

    def operands(self, node: Node) -> tuple[Node, ...]:
        """The inputs whose values the node's code reads (a linear or moe reads an f16 weight directly)."""
        if node.op == "linear" and f16_weight(node.inputs[1]) is not None:
            return (node.inputs[0], f16_weight(node.inputs[1])) + node.inputs[2:]
        if node.op == "moe":
            return tuple(f16_weight(i) or i for i in node.inputs)
        return node.inputs

    def walk(self, on_node=None, soft_errors: tuple = ()) -> View:
        """Lower every node the output needs, in order; returns the output's view. ``soft_errors``
        are an elementwise printer's refusals, reported as this target's LoweringError."""
        graph = self.graph
        if len(graph.outputs) != 1 or graph.outputs[0].type.dtype != "f32":
            raise self.error(f"the {self.target} target lowers graphs with one f32 output")
        for node in graph.nodes():
            for d in (node.type.shape if isinstance(node.type, Type) else ()):
                if not isinstance(d, int) and not dims.symbols(d) <= SYMBOLS:
                    raise self.error(f"dimension {d} of {node.op} uses symbols other than the step's "
                                     f"{', '.join(sorted(SYMBOLS))}")
        out = graph.outputs[0]
        producer = out
        while producer.op == "reshape":
            producer = producer.inputs[0]
        # The output's producer writes its contiguous result straight into ``out``.
        self.out_node = id(producer) if producer.op in ("linear", "qlinear") else None
        order = graph.nodes()
        needed = {id(out)}
        for node in reversed(order):
            if id(node) in needed:
                needed.update(id(i) for i in self.operands(node))
        for self.index, node in enumerate(order):
            if id(node) in needed:
                if on_node:
                    on_node(node)
                try:
                    self.values[id(node)] = self.lower(node)
                except soft_errors as exc:
                    raise self.error(f"cannot lower {node.op} ({exc}); build with --target {self.fallback}") from None
        self.index = len(order)
        result = self.read(out)
        if not (result.base == "out" and result.contiguous and result.offset == 0):
            self.copy_into(result, View.of_buffer("f32", result.shape, "out"))
        return result

    @abstractmethod
    def lower(self, node: Node):
        """Emit the target's code for one node that is not a view."""

    @abstractmethod
    def alloc(self, dtype: str, shape, node: Node | None = None) -> View:
        """A fresh buffer in the target's arena for ``node``'s value."""

    @abstractmethod
    def copy_into(self, source: View, dest: View) -> None:
        """Emit a copy of a (strided) view into another."""

    # -- values and buffers ----------------------------------------------------------------

    def read(self, node: Node) -> View:
        value = self.values[id(node)]
        if isinstance(value, tuple):
            raise self.error(f"{node.op} has several results; read them with get")
        self.use(value)
        return value

    def use(self, view: View) -> None:
        """Extend the live range of the view's buffer to the node being lowered."""
        if view.buffer is not None:
            buffer = self.buffers[view.buffer]
            buffer.last = max(buffer.last, self.index)

    def new_buffer(self, nbytes) -> int:
        self.buffers.append(Buffer(nbytes, self.index, self.index))
        return len(self.buffers) - 1

    def contiguous(self, view: View) -> View:
        if view.contiguous:
            return view
        out = self.alloc(view.dtype, view.shape)
        self.copy_into(view, out)
        return out

    def rows(self, view: View) -> tuple[View, object, object]:
        """(view, row count, row stride) of a view read as rows of its last axis (copied if need be)."""
        got = view.rows()
        if got is None:
            view = self.contiguous(view)
            got = view.rows()
        return view, got[0], got[1]

    def heads(self, view: View) -> View:
        """q/k/v as [1, heads, seq, head_dim] with head_dim contiguous."""
        return view if view.strides[-1] == 1 or view.shape[-1] == 1 else self.contiguous(view)

    # -- ops every target lowers the same way --------------------------------------------------

    def lower_view(self, node: Node) -> View | tuple | None:
        """View ops (and get) as views of their input; None for any other op."""
        op, a, t = node.op, node.attrs, node.type
        if op == "reshape":
            view = self.read(node.inputs[0])
            reshaped = view.reshape(t.shape)
            return reshaped if reshaped is not None else self.contiguous(view).reshape(t.shape)
        if op == "permute":
            return self.read(node.inputs[0]).permute(a["perm"])
        if op == "slice":
            return self.read(node.inputs[0]).slice(a["axis"], a["start"], a["end"], a["step"], t.shape[a["axis"]])
        if op == "expand":
            return self.read(node.inputs[0]).expand(t.shape)
        if op == "get":
            value = self.values[id(node.inputs[0])]
            self.use(value[a["index"]])
            return value[a["index"]]
        return None

    def kernel_op(self, node: Node):
        """The target's ``_<op>`` method for a node, or an error naming the op and another target."""
        handler = getattr(self, "_" + node.op, None)
        if handler is None:
            doc = OPS[node.op].doc if node.op in OPS else ""
            raise self.error(f"the {self.target} target has no kernel for op {node.op!r} ({doc}); "
                             f"build with --target {self.fallback}")
        return handler(node)

    def concat(self, node: Node, out: View, parts: list[View]) -> View:
        """Each part copied into its slice of ``out`` along the concat axis."""
        axis, start = node.attrs["axis"], 0
        for i, part in zip(node.inputs, parts):
            length = i.type.shape[axis]
            self.copy_into(part, out.slice(axis, start, dims.add(start, length), 1, length))
            start = dims.add(start, length)
        return out

    def cache_index(self, name: str) -> int | None:
        """The position of a graph input among the KV pool inputs (after the batch's)."""
        caches = [i.attrs["name"] for i in self.graph.inputs[len(BATCH_INPUTS):]]
        return caches.index(name) if name in caches else None
