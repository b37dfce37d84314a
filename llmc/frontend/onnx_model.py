"""Import an ONNX decoder into llmc IR: the full causal forward ``input_ids[batch, seq] ->
logits[batch, seq, vocab]`` in standard opset ops, as ``torch.onnx.export`` writes it (no KV cache;
an ``attention_mask`` and ``position_ids`` input, if it takes them, are bound to one unpadded
sequence's: ones and 0..seq-1).

Each ONNX op maps through one handler in ``HANDLERS`` onto the same IR the torch.export importer
(``llmc.frontend.aten``) builds, so the same passes and every target apply. Two kinds of values flow:

- **tensors**: IR nodes, whose types are checked on the spot against the shapes the file declares
  (its ``value_info``, as the exporter writes it; the sequence length's ``dim_param`` becomes
  ``seq``), so a wrong mapping fails at its node, not later as a numerical mismatch;
- **known integers**: the small integer tensors an exporter computes shapes with (``Shape``,
  ``Gather``, ``Concat``, ``Slice`` of shapes, the constants of ``Reshape`` and ``Slice``), kept as
  arrays of llmc dims (``seq``, ``seq+1``, 4) and folded at import, as the torch importer keeps
  ``SymInt`` sizes. One becomes a tensor (a constant) only where an op reads it as data.

A ``MatMul`` by a 2-D initializer is a ``linear`` of its transpose (one weight, stored once: a
transposed copy equal to another initializer, as a tied LM head's is to the embedding table,
becomes that one). An op without a handler, or of another domain than the standard one, is
refused with its name and the node's.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmc import dims, ops
from llmc.errors import SourceError, UnsupportedModelError, UnsupportedOpError
from llmc.frontend import last_frame
from llmc.ir import Graph, Node, Type
from llmc.types import coerce, dtype_of_array, numpy_dtype

SEQ = "seq"
INT64_BIG = 2 ** 62          # ONNX Slice's "to the end" is INT64_MAX; anything past this means it
KNOWN_LIMIT = 1024           # integer initializers up to this size are folded at import

ONNX_DTYPES = {1: "f32", 2: "u8", 3: "i8", 5: "i16", 6: "i32", 7: "i64", 9: "bool", 10: "f16", 11: "f64", 16: "bf16"}


@dataclass
class Known:
    """An integer (or bool) tensor known at import: an object array of llmc dims."""
    values: np.ndarray
    dtype: str

    @property
    def concrete(self) -> bool:
        return all(isinstance(v, (int, np.integer, bool, np.bool_)) for v in self.values.flat)


def reader_version() -> str | None:
    """The version of the onnx package that parses ONNX files (part of the import cache's key)."""
    try:
        import onnx
    except ImportError:
        return None
    return onnx.__version__


def load_onnx(path: Path, spec: str):
    """The ONNX model at ``path`` with its external data; SourceError with what to do if it can't."""
    try:
        import onnx
    except ImportError:
        raise SourceError(f"reading {spec} needs the onnx package: pip install 'llmc-compiler[onnx]'") from None
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError...
        text = str(exc).strip().splitlines()
        raise SourceError(f"{spec} is not an ONNX model llmc can read ({type(exc).__name__}: "
                          f"{text[0][:200] if text else ''})") from None


def import_onnx(model, spec: str) -> Graph:
    """The IR graph ``input_ids[1, seq] -> logits[1, seq, vocab]`` of an ONNX decoder."""
    return OnnxImporter(model, spec).run()


def position_rows(graph: Graph) -> int | None:
    """The rows of a learned position table (an embedding looked up by the positions ``arange``):
    the longest context such a model has, where no config says it."""
    rows = []
    for node in graph.nodes():
        if node.op == "embedding" and node.inputs[0].op == "weight":
            ancestors = Graph([], [node.inputs[1]]).nodes()
            if any(n.op == "arange" for n in ancestors) and not any(n.op == "input" for n in ancestors):
                rows.append(node.inputs[0].type.shape[0])
    return min(rows) if rows else None


def _decoder_shape_error(spec: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{spec} is not a decoder's full forward: {what}; llmc imports input_ids[batch, seq] -> "
        "logits[batch, seq, vocab] with a dynamic seq, as torch.onnx.export writes it "
        "(export the model without past key values)")


class OnnxImporter:
    def __init__(self, model, spec: str):
        from onnx import numpy_helper

        self.model = model
        self.spec = spec
        self.to_array = numpy_helper.to_array
        self.values: dict[str, Any] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.by_content: dict[tuple, str] = {}
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.transposed: dict[str, Node] = {}
        self.current = None              # the ONNX node being imported, for messages
        self.symbols: dict[str, Any] = {}
        self.declared: dict[str, Any] = {}

    # -- messages ------------------------------------------------------------------------

    def where(self) -> str:
        node = self.current
        if node is None:
            return ""
        name = f"node {node.name!r}: " if node.name else ""
        frame = last_frame(_metadata(node, "pkg.torch.onnx.stack_trace"))
        at = f", from {frame}" if frame else ""
        return f" ({name}{node.op_type} -> {', '.join(node.output)}{at})"

    def scope(self) -> str | None:
        """The module the current node was exported from (torch.onnx records its name scopes):
        ``model.layers.0.self_attn.q_proj`` for a linear's MatMul."""
        try:
            scopes = ast.literal_eval(_metadata(self.current, "pkg.torch.onnx.name_scopes") or "[]")
        except (ValueError, SyntaxError):
            return None
        named = [s for s in scopes[:-1] if isinstance(s, str) and s]
        return named[-1] if named else None

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"llmc cannot import {what} in {self.spec}{self.where()}")

    # -- types -----------------------------------------------------------------------------

    def onnx_type(self, value_type) -> tuple[str, tuple | None] | None:
        """(dtype, shape or None) of an ONNX tensor type; a dim the file leaves open is None."""
        if not value_type.HasField("tensor_type"):
            return None
        t = value_type.tensor_type
        dtype = ONNX_DTYPES.get(t.elem_type)
        if dtype is None:
            return None
        if not t.HasField("shape"):
            return dtype, None
        return dtype, tuple(self.dim(d) for d in t.shape.dim)

    def dim(self, d) -> dims.Dim | None:
        if d.HasField("dim_value"):
            return int(d.dim_value)
        if not d.dim_param:
            return None
        text = d.dim_param
        for name, value in sorted(self.symbols.items(), key=lambda kv: -len(kv[0])):
            text = _replace_word(text, name, str(value))
        try:
            result = dims.canonical(text)
        except dims.DimError:
            return None
        return result if dims.symbols(result) <= {SEQ} else None

    # -- building --------------------------------------------------------------------------

    def emit(self, op: str, inputs: list[Node], **attrs: Any) -> Node:
        try:
            type = ops.infer(op, [i.type for i in inputs], attrs)
        except ops.OpError as exc:
            raise self.unsupported(f"this node: its operands do not fit the IR op {op} ({exc})") from None
        return Node(op, inputs, attrs, type)

    def const(self, value: Any, dtype: str) -> Node:
        return Node("const", (), {"value": coerce(value, dtype), "dtype": dtype}, Type(dtype, ()))

    def literal(self, name: str, array: np.ndarray) -> Any:
        """An initializer's or a Constant's value: a small integer tensor is known (folded at
        import), a scalar a const, anything else a weight."""
        dtype = dtype_of_array(array)
        if (dtype[0] in "iu" or dtype == "bool") and array.size <= KNOWN_LIMIT:
            return Known(np.array(array.tolist(), dtype=object).reshape(array.shape), dtype)
        if array.ndim == 0:
            return self.const(array.item(), dtype)
        return self.weight(name, array)

    def weight(self, name: str, array: np.ndarray) -> Node:
        """A weight node for ``array``, stored once: an array equal to an earlier one is that one."""
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, hashlib.sha1(array.view(np.uint8).reshape(-1)).hexdigest())
        stored = self.by_content.get(key)
        if stored is None:
            stored = name
            while stored in self.weights:
                stored += "_"
            self.weights[stored] = array
            self.by_content[key] = stored
        return Node("weight", (), {"name": stored}, Type(dtype_of_array(array), array.shape))

    def tensor(self, value: Any, dtype: str | None = None) -> Node:
        """The IR node of a value (a known integer tensor becomes a constant)."""
        if value is None:
            raise self.unsupported("this node: an operand it needs is missing")
        if isinstance(value, Known):
            if not value.concrete:
                raise self.unsupported(f"this node: it reads a size ({value.values.tolist()}) as data")
            array = value.values.astype(numpy_dtype(value.dtype))
            if array.ndim == 0:
                node = self.const(array.item(), value.dtype)
            elif array.size and np.all(array == array.flat[0]):
                node = self.emit("full", [], shape=list(array.shape), value=array.flat[0].item(), dtype=value.dtype)
            else:
                node = self.weight(self.current.output[0] + ".const", array)
        else:
            node = value
        if dtype and node.type.dtype != dtype:
            node = self.emit("cast", [node], dtype=dtype)
        return node

    def ints(self, value: Any, what: str) -> list:
        """The entries of a known integer operand (a shape, axes, starts)."""
        if not isinstance(value, Known):
            raise self.unsupported(f"this node: its {what} is computed from the data, not known at import")
        return [int(v) if isinstance(v, (np.integer, bool)) else v for v in value.values.reshape(-1).tolist()]

    def shape_of(self, value: Any) -> tuple:
        return value.values.shape if isinstance(value, Known) else value.type.shape

    def out_shape(self, index: int = 0) -> tuple | None:
        """The shape the file declares for the current node's output ``index``, if fully known."""
        declared = self.declared.get(self.current.output[index])
        if declared is None or declared[1] is None or any(d is None for d in declared[1]):
            return None
        return declared[1]

    def reshape(self, node: Node, shape) -> Node:
        shape = tuple(shape)
        return node if node.type.shape == shape else self.emit("reshape", [node], shape=list(shape))

    # -- the walk ----------------------------------------------------------------------------

    def run(self) -> Graph:
        graph = self.model.graph
        for opset in self.model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < 13:
                raise UnsupportedModelError(f"{self.spec} uses ONNX opset {opset.version}; llmc imports opset 13 "
                                            "and later (re-export it, or convert it with onnx.version_converter)")
        given = self.signature(graph)
        for info in list(graph.value_info) + list(graph.output):
            self.declared[info.name] = self.onnx_type(info.type)
        for name, tensor in self.initializers.items():
            if tensor.data_type not in ONNX_DTYPES:
                raise UnsupportedModelError(f"{self.spec}: the initializer {name} has a data type llmc does not know")
            array = self.to_array(tensor)
            self.values[name] = self.literal(name, array.astype(np.float32) if array.dtype.kind == "V" else array)
        self.values[""] = None
        self.values.update(given)
        for node in graph.node:
            self.current = node
            if node.domain not in ("", "ai.onnx"):
                raise self.unsupported(f"the op {node.op_type} of domain {node.domain} (llmc imports standard ONNX ops)")
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                raise self.unsupported(f"the ONNX op {node.op_type}")
            attrs = {a.name: _attribute(a) for a in node.attribute}
            inputs = [self.values[name] if name in self.values else self.missing(name) for name in node.input]
            result = handler(self, *inputs, **attrs)
            results = result if isinstance(result, list) else [result]
            for name, value in zip(node.output, results):
                self.check(name, value)
                self.values[name] = value
        self.current = None
        output = self.tensor(self.values[graph.output[0].name])
        if output.type.dtype != "f32":
            output = self.emit("cast", [output], dtype="f32")
        vocab = output.type.shape[-1] if output.type.rank == 3 else None
        if output.type.rank != 3 or output.type.shape[:2] != (1, SEQ) or not isinstance(vocab, int):
            raise _decoder_shape_error(self.spec, f"its output is {output.type}, not logits [1, seq, vocab]")
        graph_ir = Graph([self.input_node], [output], self.weights)
        used = {n.attrs["name"] for n in graph_ir.nodes() if n.op == "weight"}
        for name in [n for n in self.weights if n not in used]:
            del self.weights[name]
        return graph_ir

    def missing(self, name: str):
        raise self.unsupported(f"this node: its input {name!r} is produced by no earlier node")

    def signature(self, graph) -> dict[str, Node]:
        """The IR values of the model's inputs: input_ids[batch, seq] (batch fixed to 1) and, where
        the export takes them, an all-ones ``attention_mask`` and ``position_ids`` 0..seq-1 (one
        unpadded sequence: what the step's attention and positions then replace)."""
        inputs = [i for i in graph.input if i.name not in self.initializers]
        names = [i.name for i in inputs]
        ids = [i for i in inputs if i.name == "input_ids"] or inputs[:1]
        others = [i for i in inputs if i not in ids]
        if len(ids) != 1 or any(i.name not in DEFAULTED for i in others) or len(graph.output) != 1:
            raise _decoder_shape_error(self.spec, f"it takes {len(inputs)} inputs ({', '.join(names)}) and gives "
                                                  f"{len(graph.output)} outputs")
        given = ids[0]
        t = given.type.tensor_type
        if ONNX_DTYPES.get(t.elem_type) not in ("i64", "i32") or len(t.shape.dim) != 2:
            raise _decoder_shape_error(self.spec, f"its input {given.name} is not token ids [batch, seq]")
        batch, seq = t.shape.dim
        if not seq.dim_param:
            raise _decoder_shape_error(self.spec, f"its input {given.name} has a fixed length of {seq.dim_value} "
                                                  "(export with a dynamic sequence length: dynamic_shapes)")
        if batch.dim_param:
            self.symbols[batch.dim_param] = 1
        elif batch.dim_value != 1:
            raise _decoder_shape_error(self.spec, f"its input {given.name} has a batch of {batch.dim_value}")
        self.symbols[seq.dim_param] = SEQ
        self.input_node = Node("input", (), {"name": given.name}, Type("i64", (1, SEQ)))
        values = {given.name: self.input_node}
        if ONNX_DTYPES[t.elem_type] != "i64":
            values[given.name] = Node("cast", [self.input_node], {"dtype": "i32"}, Type("i32", (1, SEQ)))
        for other in others:
            declared = self.onnx_type(other.type)
            if declared is None or declared[1] != (1, SEQ) or declared[0][0] not in "iub":
                raise _decoder_shape_error(self.spec, f"its input {other.name} is not [batch, seq] integers")
            values[other.name] = DEFAULTED[other.name](self, declared[0])
        return values

    def check(self, name: str, value: Any) -> None:
        declared = self.declared.get(name)
        if declared is None or value is None:
            return
        dtype, shape = declared
        got_dtype = value.dtype if isinstance(value, Known) else value.type.dtype
        got_shape = self.shape_of(value)
        bad_shape = shape is not None and (len(shape) != len(got_shape) or any(
            d is not None and d != g for d, g in zip(shape, got_shape)))
        if dtype != got_dtype or bad_shape:
            raise self.unsupported(f"this node as declared: llmc built {got_dtype}{list(got_shape)} for {name}, "
                                   f"the file says {dtype}{list(shape) if shape is not None else '[?]'}")


# Inputs besides the ids that an export may take, and the value each has for one unpadded sequence.
DEFAULTED = {
    "attention_mask": lambda imp, dtype: imp.emit("full", [], shape=[1, SEQ], value=True if dtype == "bool" else 1,
                                                  dtype=dtype),
    "position_ids": lambda imp, dtype: imp.reshape(imp.emit("arange", [], start=0, end=SEQ, step=1, dtype=dtype),
                                                   (1, SEQ)),
}


def _metadata(node, key: str) -> str:
    return next((p.value for p in node.metadata_props if p.key == key), "")


def _replace_word(text: str, word: str, by: str) -> str:
    return re.sub(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", by, text)


def _attribute(attr) -> Any:
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "dims") and hasattr(value, "data_type"):       # a TensorProto (Constant's value)
        return numpy_helper.to_array(value)
    return value


# ---------------------------------------------------------------------------------------------
# Handlers: (importer, *inputs, **attributes) -> value or list of values

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}


def handles(*names):
    def register(fn):
        for name in names:
            HANDLERS[name] = fn
        return fn
    return register


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _all_known(*values) -> bool:
    return all(isinstance(v, Known) for v in values if v is not None)


# -- elementwise ------------------------------------------------------------------------------

for _name, _op in {"Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
                   "Abs": "abs", "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Erf": "erf", "Sigmoid": "sigmoid",
                   "Relu": "relu", "Not": "not"}.items():
    def _unary(imp, x, _op=_op):
        if _op == "neg" and isinstance(x, Known) and x.dtype != "bool":
            return Known(np.vectorize(lambda v: dims.sub(0, v), otypes=[object])(x.values), x.dtype)
        return imp.emit(_op, [imp.tensor(x)])
    HANDLERS[_name] = _unary


@handles("IsNaN")
def _isnan(imp, x):
    node = imp.tensor(x)
    return imp.emit("ne", [node, node])          # NaN is the one value unequal to itself


KNOWN_ARITHMETIC = {
    "add": dims.add, "sub": dims.sub, "mul": dims.mul,
    "maximum": lambda a, b: max(a, b), "minimum": lambda a, b: min(a, b),
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")


def _known_binary(op: str, a: Known, b: Known) -> Known | None:
    concrete = a.concrete and b.concrete
    if op == "div":
        if not b.concrete:
            return None
        fn = (lambda x, y: int(x / y)) if concrete else (lambda x, y: dims.exact_div(x, int(y)))
    elif op in KNOWN_ARITHMETIC and (concrete or op in ("add", "sub", "mul")):
        fn = KNOWN_ARITHMETIC[op]
    else:
        return None
    try:
        values = np.vectorize(fn, otypes=[object])(a.values, b.values)
    except (dims.DimError, ZeroDivisionError):
        return None
    return Known(values, "bool" if op in COMPARISONS else a.dtype)


def _binary(op: str):
    def handler(imp, a, b):
        if isinstance(a, Known) and isinstance(b, Known) and a.dtype != "bool":
            folded = _known_binary(op, a, b)
            if folded is not None:
                return folded
        x = imp.tensor(a)
        y = imp.tensor(b, x.type.dtype)
        return imp.emit(op, [x, y])
    return handler


for _name, _op in {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Equal": "eq", "Less": "lt",
                   "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "And": "and", "Or": "or"}.items():
    HANDLERS[_name] = _binary(_op)


@handles("Clip")
def _clip(imp, x, low=None, high=None, **attrs):
    node = imp.tensor(x)
    for bound, op in ((low if low is not None else attrs.get("min"), "maximum"),
                      (high if high is not None else attrs.get("max"), "minimum")):
        if bound is not None:
            node = imp.emit(op, [node, imp.tensor(bound, node.type.dtype) if not isinstance(bound, float)
                                 else imp.const(bound, node.type.dtype)])
    return node


@handles("Trilu")
def _trilu(imp, x, k=None, upper=1):
    """The upper (or lower) triangle of the last two axes from diagonal k, zeros elsewhere (how
    older exports build a causal mask)."""
    node = imp.tensor(x)
    rows, cols = node.type.shape[-2:]
    offset = imp.ints(k, "k")[0] if k is not None else 0
    i = imp.reshape(imp.emit("arange", [], start=0, end=rows, step=1, dtype="i64"), (rows, 1))
    j = imp.emit("arange", [], start=0, end=cols, step=1, dtype="i64")
    diagonal = imp.emit("sub", [j, i])
    keep = imp.emit("ge" if upper else "le", [diagonal, imp.const(offset, "i64")])
    return imp.emit("where", [keep, node, imp.const(0, node.type.dtype)])


@handles("Pow")
def _pow(imp, x, exponent):
    base = imp.tensor(x)
    return imp.emit("pow", [base, imp.tensor(exponent, base.type.dtype)])


def _variadic(op: str):
    def handler(imp, *operands):
        result = operands[0]
        for other in operands[1:]:
            result = _binary(op)(imp, result, other)
        return result
    return handler


HANDLERS["Max"] = _variadic("maximum")
HANDLERS["Min"] = _variadic("minimum")


@handles("Where")
def _where(imp, cond, a, b):
    x = imp.tensor(a)
    return imp.emit("where", [imp.tensor(cond, "bool"), x, imp.tensor(b, x.type.dtype)])


@handles("Cast")
def _cast(imp, x, to):
    dtype = ONNX_DTYPES.get(to)
    if dtype is None:
        raise imp.unsupported(f"a cast to ONNX data type {to}")
    if isinstance(x, Known) and (dtype[0] in "iu" or dtype == "bool"):
        values = x.values if dtype != "bool" or not x.concrete else np.vectorize(bool, otypes=[object])(x.values)
        return Known(values, dtype)
    return imp.tensor(x, dtype)


@handles("Identity")
def _identity(imp, x):
    return x


@handles("Dropout")
def _dropout(imp, x, ratio=None, training_mode=None, **attrs):
    if training_mode is not None and (not isinstance(training_mode, Known) or any(training_mode.values.flat)):
        raise imp.unsupported("dropout in training mode (export the model in eval mode)")
    return [x, None]


@handles("Gelu")
def _gelu(imp, x, approximate="none"):
    return imp.emit("gelu", [imp.tensor(x)], approximate=approximate)


# -- constants and sizes ----------------------------------------------------------------------

@handles("Constant")
def _constant(imp, **attrs):
    if "value" in attrs:
        array = np.asarray(attrs["value"])
    elif "value_float" in attrs or "value_int" in attrs:
        array = np.asarray(attrs.get("value_float", attrs.get("value_int")))
    elif "value_floats" in attrs or "value_ints" in attrs:
        array = np.asarray(attrs.get("value_floats", attrs.get("value_ints")))
    else:
        raise imp.unsupported(f"a Constant given as {', '.join(attrs)}")
    return imp.literal(imp.current.output[0], array)


@handles("Shape")
def _shape(imp, x, start=0, end=None):
    shape = list(imp.shape_of(x))
    return Known(np.array(shape[slice(start, end)], dtype=object), "i64")


@handles("Size")
def _size(imp, x):
    return Known(np.array(dims.product(imp.shape_of(x)), dtype=object), "i64")


@handles("ConstantOfShape")
def _constant_of_shape(imp, shape, value=None):
    sizes = imp.ints(shape, "shape")
    array = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dtype = dtype_of_array(array)
    if (dtype[0] in "iu" or dtype == "bool") and all(isinstance(s, int) for s in sizes) \
            and int(np.prod(sizes)) <= KNOWN_LIMIT:
        return Known(np.full(sizes, array.item(), dtype=object), dtype)
    return imp.emit("full", [], shape=sizes, value=array.item(), dtype=dtype)


@handles("Range")
def _range(imp, start, limit, delta):
    first, end, step = (imp.ints(v, "bound")[0] for v in (start, limit, delta))
    if not isinstance(step, int) or step == 0:
        raise imp.unsupported("a Range with a step that is not a nonzero constant")
    dtype = start.dtype if isinstance(start, Known) else start.type.dtype
    return imp.emit("arange", [], start=first, end=end, step=step, dtype=dtype)


# -- shapes ---------------------------------------------------------------------------------

@handles("Reshape")
def _reshape(imp, x, shape, allowzero=0):
    sizes = imp.ints(shape, "shape")
    old = imp.shape_of(x)
    sizes = [old[i] if s == 0 and not allowzero else s for i, s in enumerate(sizes)]
    if -1 in sizes:
        declared = imp.out_shape()
        if declared is not None:
            sizes = list(declared)
        else:
            missing = _quotient(dims.product(old), dims.product([s for s in sizes if s != -1]))
            if missing is None:
                raise imp.unsupported("a Reshape whose -1 size llmc cannot work out")
            sizes[sizes.index(-1)] = missing
    if isinstance(x, Known):
        return Known(x.values.reshape([int(s) for s in sizes]), x.dtype)
    return imp.reshape(x, sizes)


def _quotient(total: dims.Dim, part: dims.Dim) -> dims.Dim | None:
    """``total / part`` for sizes in ``seq``, where it is an int or ``a*seq + b`` (a Reshape's -1):
    found from three lengths and checked at a fourth."""
    at = {n: (dims.evaluate(total, {SEQ: n}), dims.evaluate(part, {SEQ: n})) for n in (3, 7, 11, 64)}
    if any(p == 0 or t % p for t, p in at.values()):
        return None
    q = {n: t // p for n, (t, p) in at.items()}
    slope, offset = (q[7] - q[3]) // 4, q[3] - 3 * ((q[7] - q[3]) // 4)
    if any(slope * n + offset != value for n, value in q.items()):
        return None
    return dims.canonical(f"{slope}*{SEQ}+{offset}") if slope else offset


@handles("Flatten")
def _flatten(imp, x, axis=1):
    shape = imp.shape_of(x)
    axis = _axis(axis, len(shape))
    return imp.reshape(imp.tensor(x), (dims.product(shape[:axis]), dims.product(shape[axis:])))


def _axes_of(imp, axes, attrs_axes, rank: int) -> list[int]:
    given = imp.ints(axes, "axes") if axes is not None else list(attrs_axes or [])
    return sorted(_axis(int(a), rank) for a in given)


@handles("Unsqueeze")
def _unsqueeze(imp, x, axes=None, **attrs):
    shape = list(imp.shape_of(x))
    given = imp.ints(axes, "axes") if axes is not None else list(attrs.get("axes") or [])
    for axis in sorted(_axis(int(a), len(shape) + len(given)) for a in given):
        shape.insert(axis, 1)
    if isinstance(x, Known):
        return Known(x.values.reshape(shape), x.dtype)
    return imp.reshape(x, shape)


@handles("Squeeze")
def _squeeze(imp, x, axes=None, **attrs):
    shape = list(imp.shape_of(x))
    if axes is None and not attrs.get("axes"):
        drop = [i for i, s in enumerate(shape) if s == 1]
    else:
        drop = _axes_of(imp, axes, attrs.get("axes"), len(shape))
    shape = [s for i, s in enumerate(shape) if i not in drop]
    if isinstance(x, Known):
        return Known(x.values.reshape(shape), x.dtype)
    return imp.reshape(x, shape)


@handles("Expand")
def _expand(imp, x, shape):
    sizes = imp.ints(shape, "shape")
    old = list(imp.shape_of(x))
    rank = max(len(old), len(sizes))
    old = [1] * (rank - len(old)) + old
    sizes = [1] * (rank - len(sizes)) + sizes
    out = [b if a == 1 else a for a, b in zip(old, sizes)]
    if isinstance(x, Known) and all(isinstance(s, int) for s in out):
        return Known(np.broadcast_to(x.values.reshape(old), out).copy(), x.dtype)
    node = imp.reshape(imp.tensor(x), old)
    return node if tuple(out) == node.type.shape else imp.emit("expand", [node], shape=out)


@handles("Transpose")
def _transpose(imp, x, perm=None):
    rank = len(imp.shape_of(x))
    perm = list(perm) if perm is not None else list(reversed(range(rank)))
    if isinstance(x, Known):
        return Known(x.values.transpose(perm), x.dtype)
    return imp.emit("permute", [x], perm=perm)


@handles("Concat")
def _concat(imp, *operands, axis):
    if _all_known(*operands):
        return Known(np.concatenate([o.values for o in operands], axis=axis), operands[0].dtype)
    nodes = [imp.tensor(o) for o in operands]
    dtype = nodes[0].type.dtype
    nodes = [imp.tensor(n, dtype) for n in nodes if n.type.shape[_axis(axis, n.type.rank)] != 0] or nodes[:1]
    return nodes[0] if len(nodes) == 1 else imp.emit("concat", nodes, axis=_axis(axis, nodes[0].type.rank))


def _slice_bounds(size, start, end, step):
    """(start, end) of ONNX Slice's clamped bounds along an axis of ``size`` (step > 0)."""
    def resolve(v):
        if isinstance(v, int):
            if v >= INT64_BIG:
                return size
            if v < 0:
                v = dims.add(size, v)
        return v
    start, end = resolve(start), resolve(end)
    if isinstance(size, int):
        start = min(max(start, 0), size) if isinstance(start, int) else start
        end = min(max(end, 0), size) if isinstance(end, int) else end
    return start, end


@handles("Slice")
def _slice(imp, x, starts, ends, axes=None, steps=None):
    shape = imp.shape_of(x)
    starts, ends = imp.ints(starts, "starts"), imp.ints(ends, "ends")
    axes = [_axis(a, len(shape)) for a in imp.ints(axes, "axes")] if axes is not None else list(range(len(starts)))
    steps = imp.ints(steps, "steps") if steps is not None else [1] * len(starts)
    declared = imp.out_shape()
    if isinstance(x, Known):
        index = [slice(None)] * len(shape)
        for axis, start, end, step in zip(axes, starts, ends, steps):
            if not all(isinstance(v, int) for v in (start, end, step)):
                return _slice_nodes(imp, imp.tensor(x), axes, starts, ends, steps, declared)
            index[axis] = slice(start, min(end, INT64_BIG), step)
        return Known(x.values[tuple(index)], x.dtype)
    return _slice_nodes(imp, x, axes, starts, ends, steps, declared)


def _slice_nodes(imp, node: Node, axes, starts, ends, steps, declared) -> Node:
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if not isinstance(step, int) or step <= 0:
            raise imp.unsupported("a Slice with a negative or symbolic step")
        size = node.type.shape[axis]
        start, end = _slice_bounds(size, start, end, step)
        if declared is not None:
            length = declared[axis]
            end = dims.add(start, dims.add(dims.mul(dims.sub(length, 1), step), 1)) if length != 0 else start
        if start == 0 and step == 1 and end == size:
            continue
        node = imp.emit("slice", [node], axis=axis, start=start, end=end, step=step)
    return node


@handles("Split")
def _split(imp, x, split=None, axis=0, num_outputs=None):
    node = imp.tensor(x)
    axis = _axis(axis, node.type.rank)
    size = node.type.shape[axis]
    count = len(imp.current.output)
    if split is not None:
        lengths = imp.ints(split, "split")
    elif isinstance(size, int):
        piece = -(-size // count)
        lengths = [min(piece, size - i * piece) for i in range(count)]
    else:
        raise imp.unsupported("a Split into equal parts of a symbolic size")
    pieces, offset = [], 0
    for length in lengths:
        end = dims.add(offset, length)
        pieces.append(node if offset == 0 and end == size else
                      imp.emit("slice", [node], axis=axis, start=offset, end=end, step=1))
        offset = end
    return pieces


@handles("Gather")
def _gather(imp, data, indices, axis=0):
    rank = len(imp.shape_of(data))
    axis = _axis(axis, rank)
    if isinstance(data, Known) and isinstance(indices, Known) and indices.concrete:
        return Known(np.take(data.values, np.asarray(indices.values, dtype=np.int64), axis=axis), data.dtype)
    node = imp.tensor(data)
    if isinstance(indices, Known) and indices.values.ndim == 0 and isinstance(indices.values.item(), int):
        size = node.type.shape[axis]
        at = indices.values.item()
        at = dims.add(size, at) if at < 0 else at
        picked = imp.emit("slice", [node], axis=axis, start=at, end=dims.add(at, 1), step=1)
        return imp.reshape(picked, node.type.shape[:axis] + node.type.shape[axis + 1:])
    index = imp.tensor(indices)
    if node.op == "weight" and node.type.rank == 2 and axis == 0:
        return imp.emit("embedding", [node, index])
    return imp.emit("index", [node, index], axes=[axis])


@handles("GatherND")
def _gather_nd(imp, data, indices, batch_dims=0):
    if batch_dims:
        raise imp.unsupported("GatherND with batch_dims")
    node = imp.tensor(data)
    index = imp.tensor(indices)
    depth = index.type.shape[-1]
    if not isinstance(depth, int):
        raise imp.unsupported("GatherND with a symbolic index depth")
    lead = index.type.shape[:-1]
    parts = []
    for j in range(depth):
        part = imp.emit("slice", [index], axis=index.type.rank - 1, start=j, end=j + 1, step=1)
        parts.append(imp.reshape(part, lead))
    return imp.emit("index", [node] + parts, axes=list(range(depth)))


# -- reductions and normalisation -------------------------------------------------------------

def _reduce(op: str):
    def handler(imp, x, axes=None, keepdims=1, noop_with_empty_axes=0, **attrs):
        node = imp.tensor(x)
        rank = node.type.rank
        chosen = _axes_of(imp, axes, attrs.get("axes"), rank)
        if not chosen:
            if noop_with_empty_axes:
                return node
            chosen = list(range(rank))
        return imp.emit(op, [node], axes=chosen, keepdim=bool(keepdims))
    return handler


HANDLERS["ReduceMean"] = _reduce("mean")
HANDLERS["ReduceSum"] = _reduce("sum")
HANDLERS["ReduceMax"] = _reduce("max")
HANDLERS["ReduceMin"] = _reduce("min")


@handles("Softmax", "LogSoftmax")
def _softmax(imp, x, axis=-1):
    node = imp.tensor(x)
    op = "softmax" if imp.current.op_type == "Softmax" else "log_softmax"
    return imp.emit(op, [node], axis=_axis(axis, node.type.rank))


@handles("TopK")
def _topk(imp, x, k, axis=-1, largest=1, sorted=1):
    """The k largest along axis, largest first (an MoE router's choice of experts)."""
    if not largest:
        raise imp.unsupported("a TopK of the smallest values")
    node = imp.tensor(x)
    count = imp.ints(k, "k")[0]
    if not isinstance(count, int):
        raise imp.unsupported("a TopK of a symbolic k")
    both = imp.emit("topk", [node], k=count, axis=_axis(axis, node.type.rank))
    return [imp.emit("get", [both], index=i) for i in range(2)]


@handles("CumSum")
def _cumsum(imp, x, axis, exclusive=0, reverse=0):
    if exclusive or reverse:
        raise imp.unsupported("an exclusive or reversed CumSum")
    node = imp.tensor(x)
    return imp.emit("cumsum", [node], axis=_axis(imp.ints(axis, "axis")[0], node.type.rank))


@handles("LayerNormalization")
def _layer_norm(imp, x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    node = imp.tensor(x)
    if _axis(axis, node.type.rank) != node.type.rank - 1:
        raise imp.unsupported("a LayerNormalization over more than the last axis")
    params = [imp.tensor(scale)] + ([imp.tensor(bias)] if bias is not None else [])
    return [imp.emit("layer_norm", [node] + params, eps=float(epsilon)), None, None]


# -- linear algebra ---------------------------------------------------------------------------

def _transposed(imp, weight: Node) -> Node:
    """The weight [in, out] a MatMul reads as a linear's [out, in] (made once per weight), named
    after the module it was exported from where the file says (``...q_proj.weight``)."""
    name = weight.attrs["name"]
    if name not in imp.transposed:
        scope = imp.scope()
        imp.transposed[name] = imp.weight(f"{scope}.weight" if scope else f"{name}.T", imp.weights[name].T)
    return imp.transposed[name]


@handles("MatMul")
def _matmul(imp, a, b):
    x, w = imp.tensor(a), imp.tensor(b)
    if w.op == "weight" and w.type.rank == 2 and x.type.rank >= 2:
        return imp.emit("linear", [x, _transposed(imp, w)])
    return imp.emit("matmul", [x, w])


@handles("Gemm")
def _gemm(imp, a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    x, w = imp.tensor(a), imp.tensor(b)
    if transA:
        x = imp.emit("permute", [x], perm=[1, 0])
    if w.op == "weight":
        weight = w if transB else _transposed(imp, w)
        out = imp.emit("linear", [x, weight])
    else:
        out = imp.emit("matmul", [x, imp.emit("permute", [w], perm=[1, 0]) if transB else w])
    if alpha != 1.0:
        out = imp.emit("mul", [out, imp.const(alpha, out.type.dtype)])
    if c is not None:
        bias = imp.tensor(c, out.type.dtype)
        if beta != 1.0:
            bias = imp.emit("mul", [bias, imp.const(beta, out.type.dtype)])
        out = imp.emit("add", [out, bias])
    return out
