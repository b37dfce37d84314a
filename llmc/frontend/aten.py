"""Import a torch.export ``ExportedProgram`` (ATen, before decompositions) into llmc IR.

Each ATen op maps through one handler in ``HANDLERS``. Shapes come from torch's own fake-tensor
metadata: symbolic sizes become llmc dims (the traced sequence length is ``seq``), and every node
the importer builds is checked against torch's type on the spot, so a wrong mapping fails here,
naming the op, not later as a numerical mismatch.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from llmc import dims, ops
from llmc.errors import UnsupportedOpError
from llmc.frontend import last_frame
from llmc.ir import Graph, Node, Type
from llmc.types import coerce

aten = torch.ops.aten

TORCH_DTYPES = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}


class ImporterBug(AssertionError):
    """A handler built a node whose type disagrees with torch's: a bug in llmc, not in the model."""


def source_location(fx_node: torch.fx.Node) -> str:
    """'file:line: code' of the model source line that produced an fx node, if torch recorded it."""
    return last_frame(fx_node.meta.get("stack_trace") or "") or "unknown location"


class Importer:
    def __init__(self, program: ExportedProgram, symbol_names: dict[str, str], weight_prefix: str = ""):
        self.program = program
        self.symbol_names = symbol_names
        self.weight_prefix = weight_prefix
        self.values: dict[torch.fx.Node, Any] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.current: torch.fx.Node | None = None

    # -- conversion of torch metadata ------------------------------------------------------

    def dim(self, size: Any) -> dims.Dim:
        if isinstance(size, torch.fx.Node):
            return self.values[size]
        if isinstance(size, int):
            return size
        expr = size.node.expr if isinstance(size, torch.SymInt) else size
        text = re.sub(r"\b[a-z]\d+\b", lambda m: self._symbol(m.group(0)), str(expr))
        try:
            return dims.canonical(text)
        except dims.DimError:
            raise self.unsupported(f"the symbolic size {expr} (only sums and products of sizes are supported)") from None

    def _symbol(self, name: str) -> str:
        if name not in self.symbol_names:
            raise self.unsupported(f"a data-dependent size ({name}); llmc needs shapes that follow from the input length")
        return self.symbol_names[name]

    def type_of(self, value: Any) -> Type:
        if not isinstance(value, torch.Tensor):
            raise ImporterBug(f"expected a tensor, got {value!r}")
        if value.dtype not in TORCH_DTYPES:
            raise self.unsupported(f"tensors of dtype {value.dtype}")
        return Type(TORCH_DTYPES[value.dtype], tuple(self.dim(s) for s in value.shape))

    def meta_type(self, fx_node: torch.fx.Node) -> Type:
        return self.type_of(fx_node.meta["val"])

    def unsupported(self, what: str) -> UnsupportedOpError:
        node = self.current
        where = f" ({node.target} at {source_location(node)})" if node is not None else ""
        return UnsupportedOpError(f"llmc cannot import {what}{where}")

    # -- building nodes --------------------------------------------------------------------

    def emit(self, op: str, inputs: list[Node], **attrs: Any) -> Node:
        try:
            type = ops.infer(op, [i.type for i in inputs], attrs)
        except ops.OpError as exc:
            raise ImporterBug(f"{op} built for {self.current.target if self.current else '?'}: {exc}") from None
        return Node(op, inputs, attrs, type)

    def const(self, value: Any, dtype: str) -> Node:
        return Node("const", (), {"value": coerce(value, dtype), "dtype": dtype}, Type(dtype, ()))

    def tensor(self, arg: Any, dtype: str | None = None) -> Node:
        """The IR node for an argument: an imported tensor, or a Python number as a const."""
        if isinstance(arg, torch.fx.Node):
            node = self.values[arg]
            if not isinstance(node, Node):
                raise self.unsupported(f"a size used as a tensor ({arg.name})")
            return self.cast(node, dtype) if dtype else node
        if isinstance(arg, (bool, int, float)):
            return self.const(arg, dtype or ("bool" if isinstance(arg, bool) else "i64" if isinstance(arg, int) else "f32"))
        raise self.unsupported(f"an argument of type {type(arg).__name__}")

    def cast(self, node: Node, dtype: str) -> Node:
        return node if node.type.dtype == dtype else self.emit("cast", [node], dtype=dtype)

    def reshape(self, node: Node, shape: tuple) -> Node:
        return node if node.type.shape == tuple(shape) else self.emit("reshape", [node], shape=list(shape))

    def axis(self, axis: int, rank: int) -> int:
        return axis + rank if axis < 0 else axis

    # -- the walk --------------------------------------------------------------------------

    def run(self) -> Graph:
        program = self.program
        specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
        inputs: list[Node] = []
        by_storage: dict[tuple, str] = {}
        for fx_node in program.graph.nodes:
            self.current = fx_node
            if fx_node.op == "placeholder":
                spec = specs[fx_node.name]
                if spec.kind == InputKind.USER_INPUT:
                    node = Node("input", (), {"name": fx_node.name}, self.meta_type(fx_node))
                    inputs.append(node)
                    self.values[fx_node] = node
                elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                    self.values[fx_node] = self.weight(spec.target, by_storage)
                else:
                    raise self.unsupported(f"a graph input of kind {spec.kind.name}")
            elif fx_node.op == "call_function":
                self.values[fx_node] = self.call(fx_node)
            elif fx_node.op == "output":
                results = fx_node.args[0]
                outputs = [self.tensor(r) for r in results]
            else:
                raise self.unsupported(f"an fx node of kind {fx_node.op}")
        self.current = None
        graph = Graph(inputs, outputs, self.weights)
        used = {n.attrs["name"] for n in graph.nodes() if n.op == "weight"}
        for name in [n for n in self.weights if n not in used]:   # e.g. a buffer the forward never reads
            del self.weights[name]
        return graph

    def weight(self, target: str, by_storage: dict[tuple, str]) -> Node:
        tensor = self.program.state_dict.get(target)
        if tensor is None:
            tensor = self.program.constants[target]
        tensor = tensor.detach()
        if isinstance(tensor, torch.nn.Parameter):
            tensor = tensor.data
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        name = by_storage.get(key)
        if name is None:
            name = target[len(self.weight_prefix):] if target.startswith(self.weight_prefix) else target
            by_storage[key] = name
            # A CPU tensor's numpy view shares its memory: the weights are never copied.
            array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor.contiguous()).numpy()
            self.weights[name] = array
        return Node("weight", (), {"name": name}, self.type_of(tensor))

    def call(self, fx_node: torch.fx.Node) -> Any:
        target = fx_node.target
        value = fx_node.meta.get("val")
        if target in SKIPPED:
            return None
        if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool) and target is not operator.getitem:
            return self.dim(value)               # size arithmetic: kept as a symbolic dim
        if target is operator.getitem:
            return self.values[fx_node.args[0]][fx_node.args[1]]
        handler = HANDLERS.get(target)
        if handler is None:
            raise self.unsupported(f"the ATen op {target}")
        result = handler(self, fx_node, *fx_node.args, **fx_node.kwargs)
        self.check(fx_node, result)
        return result

    def check(self, fx_node: torch.fx.Node, result: Any) -> None:
        value = fx_node.meta.get("val")
        if isinstance(result, list):
            for r, v in zip(result, value):
                self._check_one(fx_node, r, v)
        else:
            self._check_one(fx_node, result, value)

    def _check_one(self, fx_node, node: Node, value) -> None:
        want = self.type_of(value)
        if node.type != want:
            raise ImporterBug(f"{fx_node.target} at {source_location(fx_node)}: built {node.type}, torch says {want}")


# ---------------------------------------------------------------------------------------------
# Handlers: (importer, fx_node, *args, **kwargs) -> Node or list[Node]

Handler = Callable[..., Any]
HANDLERS: dict[Any, Handler] = {}
SKIPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}


def handles(*targets):
    def register(fn):
        for target in targets:
            HANDLERS[target] = fn
        return fn
    return register


def _meta(arg):
    return arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg


def _unary(op):
    return lambda imp, n, x, *rest, **kw: imp.emit(op, [imp.tensor(x)])


for _target, _op in {
    aten.neg.default: "neg", aten.exp.default: "exp", aten.log.default: "log", aten.sqrt.default: "sqrt",
    aten.rsqrt.default: "rsqrt", aten.reciprocal.default: "reciprocal", aten.abs.default: "abs",
    aten.sin.default: "sin", aten.cos.default: "cos", aten.tanh.default: "tanh", aten.erf.default: "erf",
    aten.sigmoid.default: "sigmoid", aten.silu.default: "silu", aten.relu.default: "relu",
    aten.logical_not.default: "not", aten.bitwise_not.default: "not",
}.items():
    HANDLERS[_target] = _unary(_op)


@handles(aten.square.default)
def _square(imp, n, x):
    node = imp.tensor(x, imp.meta_type(n).dtype)
    return imp.emit("mul", [node, node])


@handles(aten.gelu.default)
def _gelu(imp, n, x, approximate="none"):
    return imp.emit("gelu", [imp.tensor(x)], approximate=approximate)


def _binary(op, compare=False):
    def handler(imp, n, a, b, alpha=1):
        out = imp.meta_type(n)
        common = TORCH_DTYPES[torch.result_type(_meta(a), _meta(b))] if compare else out.dtype
        x, y = imp.tensor(a, common), imp.tensor(b, common)
        if alpha != 1:
            y = imp.emit("mul", [y, imp.const(alpha, common)])
        return imp.emit(op, [x, y])
    return handler


for _op, _targets in {
    "add": (aten.add.Tensor, aten.add.Scalar), "sub": (aten.sub.Tensor, aten.sub.Scalar),
    "mul": (aten.mul.Tensor, aten.mul.Scalar), "div": (aten.div.Tensor, aten.div.Scalar),
    "pow": (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar),
    "maximum": (aten.maximum.default,), "minimum": (aten.minimum.default,),
}.items():
    for _target in _targets:
        HANDLERS[_target] = _binary(_op)


def _in_place(op):
    """``x.add_(y)`` and kin on a tensor the forward made: the result replaces ``x`` for every
    later use (the traced program reads the mutated tensor through ``x``'s node). A graph input,
    a weight or a view of another tensor is refused: the mutation would have to reach them."""
    def handler(imp, n, a, b, alpha=1):
        target = imp.tensor(a)
        if target.op in ("input", "weight") or _meta(a)._is_view():
            raise imp.unsupported(f"the in-place {n.target} on a graph input, weight or view")
        result = _binary(op)(imp, n, a, b, alpha)
        imp.values[a] = result
        return result
    return handler


for _op in ("add", "sub", "mul", "div"):
    HANDLERS[getattr(aten, f"{_op}_").Tensor] = _in_place(_op)
    HANDLERS[getattr(aten, f"{_op}_").Scalar] = _in_place(_op)

for _op, _names in {"eq": ("eq",), "ne": ("ne",), "lt": ("lt",), "le": ("le",), "gt": ("gt",), "ge": ("ge",)}.items():
    HANDLERS[getattr(aten, _op).Tensor] = _binary(_op, compare=True)
    HANDLERS[getattr(aten, _op).Scalar] = _binary(_op, compare=True)


def _logical(op):
    def handler(imp, n, a, b):
        if imp.meta_type(n).dtype != "bool":
            raise imp.unsupported(f"bitwise {op} of integer tensors")
        return imp.emit(op, [imp.tensor(a, "bool"), imp.tensor(b, "bool")])
    return handler


for _target in (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default):
    HANDLERS[_target] = _logical("and")
for _target in (aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default):
    HANDLERS[_target] = _logical("or")


@handles(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(imp, n, x, other, alpha=1):
    return _binary("sub")(imp, n, other, x, alpha)


@handles(aten.clamp.default)
def _clamp(imp, n, x, min=None, max=None):
    out = imp.tensor(x)
    if min is not None:
        out = imp.emit("maximum", [out, imp.const(min, out.type.dtype)])
    if max is not None:
        out = imp.emit("minimum", [out, imp.const(max, out.type.dtype)])
    return out


@handles(aten.clamp_min.default)
def _clamp_min(imp, n, x, min):
    return _clamp(imp, n, x, min=min)


@handles(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(imp, n, cond, a, b):
    dtype = imp.meta_type(n).dtype
    return imp.emit("where", [imp.tensor(cond, "bool"), imp.tensor(a, dtype), imp.tensor(b, dtype)])


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(imp, n, x, mask, value):
    dtype = imp.meta_type(n).dtype
    return imp.emit("where", [imp.tensor(mask, "bool"), imp.tensor(value, dtype), imp.tensor(x, dtype)])


# -- dtype conversion and identities ---------------------------------------------------------

@handles(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default)
def _convert(imp, n, x, *args, **kwargs):
    return imp.cast(imp.tensor(x), imp.meta_type(n).dtype)


@handles(aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default,
         aten.lift_fresh_copy.default)
def _identity(imp, n, x, *args, **kwargs):
    return imp.tensor(x)


@handles(aten.dropout.default, aten.feature_dropout.default)
def _dropout(imp, n, x, p, train):
    if train and p > 0:
        raise imp.unsupported("dropout in training mode (call model.eval() first)")
    return imp.tensor(x)


# -- shapes ----------------------------------------------------------------------------------

@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.view_as.default, aten.reshape_as.default)
def _reshape(imp, n, x, *args, **kwargs):
    return imp.reshape(imp.tensor(x), imp.meta_type(n).shape)


@handles(aten.expand.default, aten.expand_as.default)
def _expand(imp, n, x, *args, **kwargs):
    node = imp.tensor(x)
    shape = imp.meta_type(n).shape
    return node if node.type.shape == shape else imp.emit("expand", [node], shape=list(shape))


@handles(aten.permute.default)
def _permute(imp, n, x, perm):
    node = imp.tensor(x)
    return imp.emit("permute", [node], perm=[imp.axis(p, node.type.rank) for p in perm])


@handles(aten.transpose.int)
def _transpose(imp, n, x, a, b):
    node = imp.tensor(x)
    perm = list(range(node.type.rank))
    a, b = imp.axis(a, node.type.rank), imp.axis(b, node.type.rank)
    perm[a], perm[b] = perm[b], perm[a]
    return imp.emit("permute", [node], perm=perm)


@handles(aten.t.default)
def _t(imp, n, x):
    node = imp.tensor(x)
    return imp.emit("permute", [node], perm=[1, 0]) if node.type.rank == 2 else node


@handles(aten.numpy_T.default)
def _numpy_t(imp, n, x):
    """``x.T``: every axis reversed."""
    node = imp.tensor(x)
    return imp.emit("permute", [node], perm=list(reversed(range(node.type.rank)))) if node.type.rank > 1 else node


@handles(aten.repeat_interleave.self_int)
def _repeat_interleave(imp, n, x, repeats, dim=None, output_size=None):
    """Each element ``repeats`` times in a row along ``dim`` (flattened when None): a new axis
    after ``dim``, expanded, then merged into ``dim`` (how interleaved rotary tables are built)."""
    node = imp.tensor(x)
    if dim is None:
        node = imp.reshape(node, (dims.product(node.type.shape),))
        dim = 0
    axis = imp.axis(dim, node.type.rank)
    shape = list(node.type.shape)
    spread = imp.reshape(node, tuple(shape[:axis + 1] + [1] + shape[axis + 1:]))
    spread = imp.emit("expand", [spread], shape=shape[:axis + 1] + [repeats] + shape[axis + 1:])
    return imp.reshape(spread, imp.meta_type(n).shape)


def _slice_to(imp, node: Node, axis: int, start: dims.Dim, length: dims.Dim, step: int = 1) -> Node:
    end = dims.add(start, dims.add(dims.mul(dims.sub(length, 1), step), 1)) if length != 0 else start
    if start == 0 and step == 1 and length == node.type.shape[axis]:
        return node
    return imp.emit("slice", [node], axis=axis, start=start, end=end, step=step)


@handles(aten.slice.Tensor)
def _slice(imp, n, x, dim=0, start=None, end=None, step=1):
    node = imp.tensor(x)
    axis = imp.axis(dim, node.type.rank)
    size = node.type.shape[axis]
    start = 0 if start is None else imp.dim(start)
    if isinstance(start, int) and start < 0:
        start = dims.add(size, start)
        if isinstance(start, int):
            start = max(start, 0)
    if isinstance(start, int) and isinstance(size, int):
        start = min(start, size)
    length = imp.meta_type(n).shape[axis]
    return _slice_to(imp, node, axis, start, length, step)


@handles(aten.select.int)
def _select(imp, n, x, dim, index):
    node = imp.tensor(x)
    axis = imp.axis(dim, node.type.rank)
    index = imp.dim(index)
    if isinstance(index, int) and index < 0:
        index = dims.add(node.type.shape[axis], index)
    return imp.reshape(_slice_to(imp, node, axis, index, 1), imp.meta_type(n).shape)


@handles(aten.cat.default, aten.concat.default)
def _cat(imp, n, tensors, dim=0):
    dtype = imp.meta_type(n).dtype
    nodes = [imp.tensor(t, dtype) for t in tensors]
    nodes = [x for x in nodes if not (x.type.rank == 1 and x.type.shape == (0,))] or nodes
    return nodes[0] if len(nodes) == 1 else imp.emit("concat", nodes, axis=imp.axis(dim, nodes[0].type.rank))


@handles(aten.stack.default)
def _stack(imp, n, tensors, dim=0):
    """A new axis ``dim`` holding each tensor in turn: each reshaped to have it, then joined."""
    out = imp.meta_type(n)
    axis = imp.axis(dim, out.rank)
    nodes = [imp.tensor(t, out.dtype) for t in tensors]
    nodes = [imp.reshape(x, tuple(x.type.shape[:axis]) + (1,) + tuple(x.type.shape[axis:])) for x in nodes]
    return nodes[0] if len(nodes) == 1 else imp.emit("concat", nodes, axis=axis)


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
         aten.tensor_split.sections)
def _split(imp, n, x, arg=None, dim=0, **kwargs):
    node = imp.tensor(x)
    if n.target == aten.unbind.int:
        dim = arg if arg is not None else 0
    axis = imp.axis(dim, node.type.rank)
    pieces, offset = [], 0
    for value in n.meta["val"]:
        want = imp.type_of(value)
        length = want.shape[axis] if want.rank == node.type.rank else 1
        pieces.append(imp.reshape(_slice_to(imp, node, axis, offset, length), want.shape))
        offset = dims.add(offset, length)
    return pieces


@handles(aten.index.Tensor)
def _index(imp, n, x, indices):
    node = imp.tensor(x)
    axes, index_nodes = [], []
    for axis, idx in enumerate(indices):
        if idx is None:
            continue
        idx_node = imp.tensor(idx)
        if idx_node.type.dtype == "bool":
            raise imp.unsupported("boolean-mask indexing (its result size depends on the data)")
        axes.append(axis)
        index_nodes.append(idx_node)
    return imp.emit("index", [node] + index_nodes, axes=axes)


@handles(aten.embedding.default)
def _embedding(imp, n, weight, ids, *args):
    return imp.emit("embedding", [imp.tensor(weight), imp.tensor(ids)])


# -- creation --------------------------------------------------------------------------------

@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(imp, n, *args, **kwargs):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (list(args) + [1])[:3]
    start, end = imp.dim(start), imp.dim(end)
    for value in (start, end, step):
        if isinstance(value, float) and not float(value).is_integer():
            raise imp.unsupported("arange with fractional bounds")
    return imp.emit("arange", [], start=start, end=end, step=int(step), dtype=imp.meta_type(n).dtype)


def _filled(value_of):
    def handler(imp, n, *args, **kwargs):
        t = imp.meta_type(n)
        return imp.emit("full", [], shape=list(t.shape), value=coerce(value_of(args, kwargs), t.dtype), dtype=t.dtype)
    return handler


for _target, _value in {
    aten.new_ones.default: lambda a, k: 1, aten.ones.default: lambda a, k: 1, aten.ones_like.default: lambda a, k: 1,
    aten.new_zeros.default: lambda a, k: 0, aten.zeros.default: lambda a, k: 0, aten.zeros_like.default: lambda a, k: 0,
    aten.new_full.default: lambda a, k: a[2], aten.full.default: lambda a, k: a[1],
    aten.full_like.default: lambda a, k: a[1], aten.scalar_tensor.default: lambda a, k: a[0],
}.items():
    HANDLERS[_target] = _filled(_value)


# -- reductions ------------------------------------------------------------------------------

def _reduction(op):
    def handler(imp, n, x, axes=None, keepdim=False, dtype=None):
        out = imp.meta_type(n)
        node = imp.tensor(x, out.dtype)
        rank = node.type.rank
        axes = list(range(rank)) if not axes else [imp.axis(a, rank) for a in axes]
        return imp.emit(op, [node], axes=sorted(axes), keepdim=bool(keepdim))
    return handler


HANDLERS[aten.mean.dim] = _reduction("mean")
HANDLERS[aten.sum.dim_IntList] = _reduction("sum")
HANDLERS[aten.amax.default] = _reduction("max")
HANDLERS[aten.amin.default] = _reduction("min")
HANDLERS[aten.mean.default] = lambda imp, n, x, dtype=None: _reduction("mean")(imp, n, x)
HANDLERS[aten.sum.default] = lambda imp, n, x, dtype=None: _reduction("sum")(imp, n, x)


@handles(aten.argmax.default)
def _argmax(imp, n, x, dim=None, keepdim=False):
    node = imp.tensor(x)
    if dim is None:
        node = imp.reshape(node, (dims.product(node.type.shape),))
        dim = 0
    return imp.emit("argmax", [node], axis=imp.axis(dim, node.type.rank), keepdim=bool(keepdim))


@handles(aten.topk.default)
def _topk(imp, n, x, k, dim=-1, largest=True, sorted=True):
    """The k largest along dim, largest first (an MoE router's expert choice)."""
    if not largest:
        raise imp.unsupported("topk of the smallest values")
    node = imp.tensor(x)
    both = imp.emit("topk", [node], k=int(k), axis=imp.axis(dim, node.type.rank))
    return [imp.emit("get", [both], index=i) for i in range(2)]


def _softmax_like(op):
    def handler(imp, n, x, dim, *rest):
        out = imp.meta_type(n)
        node = imp.tensor(x, out.dtype)
        return imp.emit(op, [node], axis=imp.axis(dim, node.type.rank))
    return handler


for _target in (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default):
    HANDLERS[_target] = _softmax_like("softmax")
for _target in (aten.log_softmax.int, aten._log_softmax.default):
    HANDLERS[_target] = _softmax_like("log_softmax")


@handles(aten.cumsum.default)
def _cumsum(imp, n, x, dim, dtype=None):
    node = imp.tensor(x, imp.meta_type(n).dtype)
    return imp.emit("cumsum", [node], axis=imp.axis(dim, node.type.rank))


@handles(aten.diff.default)
def _diff(imp, n, x, n_times=1, dim=-1, prepend=None, append=None):
    node = imp.tensor(x)
    axis = imp.axis(dim, node.type.rank)
    parts = [imp.tensor(p, node.type.dtype) for p in (prepend, x, append) if p is not None]
    node = parts[0] if len(parts) == 1 else imp.emit("concat", parts, axis=axis)
    for _ in range(n_times):
        length = dims.sub(node.type.shape[axis], 1)
        later, earlier = _slice_to(imp, node, axis, 1, length), _slice_to(imp, node, axis, 0, length)
        node = imp.emit("ne" if node.type.dtype == "bool" else "sub", [later, earlier])
    return node


# -- linear algebra and neural-network ops ---------------------------------------------------

@handles(aten.linear.default)
def _linear(imp, n, x, weight, bias=None):
    inputs = [imp.tensor(x), imp.tensor(weight)] + ([imp.tensor(bias)] if bias is not None else [])
    return imp.emit("linear", inputs)


@handles(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(imp, n, a, b):
    return imp.emit("matmul", [imp.tensor(a), imp.tensor(b)])


@handles(aten.addmm.default)
def _addmm(imp, n, bias, a, b, beta=1, alpha=1):
    product = imp.emit("matmul", [imp.tensor(a), imp.tensor(b)])
    if alpha != 1:
        product = imp.emit("mul", [product, imp.const(alpha, product.type.dtype)])
    bias_node = imp.tensor(bias)
    if beta != 1:
        bias_node = imp.emit("mul", [bias_node, imp.const(beta, bias_node.type.dtype)])
    return imp.emit("add", [product, bias_node])


@handles(aten.layer_norm.default)
def _layer_norm(imp, n, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if len(normalized_shape) != 1:
        raise imp.unsupported("layer_norm over more than the last axis")
    node = imp.tensor(x)
    params = [imp.tensor(weight)] if weight is not None else []
    if bias is not None:
        if weight is None:
            params.append(imp.emit("full", [], shape=[node.type.shape[-1]], value=1.0, dtype=node.type.dtype))
        params.append(imp.tensor(bias))
    return imp.emit("layer_norm", [node] + params, eps=float(eps))


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(imp, n, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        raise imp.unsupported("attention dropout (call model.eval() first)")
    qn, kn, vn = imp.tensor(q), imp.tensor(k), imp.tensor(v)
    head_dim = qn.type.shape[-1]
    if scale is None:
        if not isinstance(head_dim, int):
            raise imp.unsupported("attention with a symbolic head size")
        scale = 1.0 / math.sqrt(head_dim)
    inputs = [qn, kn, vn]
    if attn_mask is not None:
        mask = imp.tensor(attn_mask)
        if mask.type.dtype != "bool":
            mask = imp.cast(mask, qn.type.dtype)
        inputs.append(mask)
    return imp.emit("sdpa", inputs, scale=float(scale), causal=bool(is_causal))
