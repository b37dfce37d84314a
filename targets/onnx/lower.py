"""The optimised step graph as an ONNX model: one ONNX node (or a few) per llmc op, over the step's
inputs; weights are initializers declared as external data that the executor hands ONNX Runtime
from the artifact (``Initializer`` says how each is made from the artifact's tensors).

Attention is ORT's GroupQueryAttention over each sequence's keys and values laid out contiguously
(inputs ``past_k.L`` / ``past_v.L`` [batch, kv_heads, capacity, head_dim], the same buffers bound as
the outputs ``present_k.L`` / ``present_v.L``, so the step's tokens are appended in place); the
executor keeps those rows beside the ABI's paged pool and copies each step's new keys and values
from them into the pool (session.py). Inputs ``gqa_tokens``, ``gqa_slots``, ``seqlens_k``,
``query_seqlens`` and ``total_length`` lay the flat batch out as GQA's right-padded [batch, chunk].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmc import dims
from llmc.errors import LlmcError
from llmc.ir import Graph, Node
from llmc.types import DTYPE_BYTES, FLOAT_DTYPES, numpy_dtype, result_types
from llmc.ops import fused_body
from llmc.quant import parse_scheme

CONTRIB = "com.microsoft"
DTYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
          "i64": TensorProto.INT64, "i32": TensorProto.INT32, "i8": TensorProto.INT8, "u8": TensorProto.UINT8,
          "bool": TensorProto.BOOL}
UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "reciprocal": "Reciprocal", "abs": "Abs",
         "sin": "Sin", "cos": "Cos", "tanh": "Tanh", "erf": "Erf", "sigmoid": "Sigmoid", "relu": "Relu", "not": "Not"}
BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min",
          "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual", "and": "And",
          "or": "Or"}
REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin"}
# With f16 activations: the ops whose handlers compute in f32 (a q4/q8 row's dequantization): their
# float inputs are cast to f32 and their result back to f16.
F32_INSIDE = ("qembedding",)
SOURCES = ("embedding", "qembedding")       # where the activations begin


class OnnxLoweringError(LlmcError):
    """A graph the onnx target cannot express."""


@dataclass(frozen=True)
class Initializer:
    """An ONNX initializer the executor makes from the artifact's tensors at load: ``kind`` is
    "weight" (the tensor as it is) or a MatMulNBits part of a quantized weight ("nibbles",
    "bytes", "scales") or a q4 weight's per-group offsets ("offsets"; targets/onnx/weights.py)."""

    name: str
    kind: str
    sources: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]

    def record(self) -> list:
        return [self.name, self.kind, list(self.sources), self.dtype, list(self.shape)]


class OnnxLowering:
    def __init__(self, graph: Graph, opset: int, accuracy_level: int, act: str = "f32"):
        self.graph = graph
        self.opset = opset
        self.accuracy_level = accuracy_level
        self.act = act
        self.half: set[str] = set()     # with act f16: the values that are activations, in f16
        self.float = "f32"              # the float dtype the node being lowered computes in
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, Initializer] = {}
        self.values: dict[int, object] = {}
        self.count = 0
        self.cache: dict[object, str] = {}      # constants, shapes and per-step values, made once
        self.symmetric_parts: dict[tuple[str, str], bool] = {}     # (scales, mins) -> every min is -8 scales
        self.layers: list[int] = []           # the attention layers lowered
        self.extra_inputs: dict[str, onnx.ValueInfoProto] = {}
        self.extra_outputs: list[onnx.ValueInfoProto] = []
        self.tokens_first: dict[int, str] = {}  # an attention's output as [1, seq, heads, head_dim]
        self.origins: dict[str, str] = {}       # a Reshape's output -> its input
        self.dims: dict[str, tuple] = {}        # the IR shape of values the lowering made, where it matters
        self.pool_dtype = "f32"
        # each symbol of the step's shapes, read from the first input that has it as a dimension
        self.sources: dict[str, tuple[str, int]] = {}
        for node in graph.inputs:
            for axis, d in enumerate(node.type.shape):
                if isinstance(d, str) and d.isidentifier():
                    self.sources.setdefault(d, (node.attrs["name"], axis))
        self.weight_types = {n.attrs["name"]: n.type for n in graph.nodes() if n.op == "weight"}

    # -- building blocks -------------------------------------------------------------------------

    def fresh(self, hint: str = "t") -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def add(self, op: str, inputs: list[str], outputs: int = 1, domain: str | None = None, unread: tuple = (),
            **attrs):
        """A node; ``unread`` names optional outputs left unnamed, so ORT neither computes nor keeps them."""
        for name in inputs:          # a graph weight is an initializer once an ONNX node reads it
            if name in self.weight_types and name not in self.initializers:
                t = self.weight_types[name]
                self.initializers[name] = Initializer(name, "weight", (name,), t.dtype, tuple(t.shape))
        names = ["" if i in unread else self.fresh(op.lower()[:12] + "_") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype: str = "i64") -> str:
        array = np.asarray(value, dtype=numpy_dtype(dtype))
        key = ("const", dtype, array.shape, array.tobytes())
        if key not in self.cache:
            name = self.fresh("c")
            self.nodes.append(helper.make_node("Constant", [], [name],
                                               value=onnx.numpy_helper.from_array(array, name)))
            self.cache[key] = name
        return self.cache[key]

    def symbol(self, name: str) -> str:
        """A symbol of the step's shapes as an i64[1] tensor, read from an input's shape."""
        key = ("symbol", name)
        if key not in self.cache:
            source, axis = self.sources[name]
            self.cache[key] = self.add("Shape", [source], start=axis, end=axis + 1)
        return self.cache[key]

    def dim(self, d) -> str:
        """A dimension (an int or a polynomial over the step's symbols) as an i64[1] tensor."""
        if isinstance(d, int):
            return self.const([d])
        key = ("dim", d)
        if key not in self.cache:
            total = None
            for mono, coeff in dims._poly(d).items():
                term = self.const([coeff])
                for symbol in mono:
                    term = self.add("Mul", [term, self.symbol(symbol)])
                total = term if total is None else self.add("Add", [total, term])
            self.cache[key] = total if total is not None else self.const([0])
        return self.cache[key]

    def shape(self, shape) -> str:
        """A shape as an i64[rank] tensor (a constant when every dimension is an int)."""
        if all(isinstance(d, int) for d in shape):
            return self.const(list(shape))
        key = ("shape", tuple(shape))
        if key not in self.cache:
            self.cache[key] = self.add("Concat", [self.dim(d) for d in shape], axis=0)
        return self.cache[key]

    def reshape(self, x: str, shape) -> str:
        """Reshape with 0 (keep) and -1 (infer) allowed in a constant shape."""
        return self.reshaped_to(x, self.const(list(shape)), keeps=0 in list(shape))

    def reshaped_to(self, x: str, shape: str, keeps: bool = False) -> str:
        """``x`` reshaped to the shape tensor ``shape``, made once. A reshape of a reshape reads the
        first one's input (unless ``shape`` keeps a dimension of its input by a 0), so chains of
        them (the model's and the lowering's) are one node."""
        if not keeps:
            x = self.origins.get(x, x)
        key = ("reshape", x, shape)
        if key not in self.cache:
            self.cache[key] = self.add("Reshape", [x, shape])
            self.origins[self.cache[key]] = x
        return self.cache[key]

    def read(self, node: Node) -> str:
        value = self.values[id(node)]
        if isinstance(value, tuple):
            raise OnnxLoweringError(f"{node.op} has several results; read them with get")
        return value

    # -- the walk --------------------------------------------------------------------------------

    def run(self) -> onnx.ModelProto:
        graph = self.graph
        if len(graph.outputs) != 1 or graph.outputs[0].type.dtype != "f32":
            raise OnnxLoweringError("the onnx target lowers graphs with one f32 output")
        inputs = []
        for node in graph.inputs:
            name = node.attrs["name"]
            if name in ("k_scale", "v_scale"):
                raise OnnxLoweringError("the onnx target keeps its KV pool in f32 or f16, not int8; "
                                        "build with --kv f16 or --kv f32")
            if name == "k_cache":
                self.pool_dtype = node.type.dtype
            inputs.append(helper.make_tensor_value_info(name, DTYPES[node.type.dtype],
                                                        [d if isinstance(d, int) else str(d) for d in node.type.shape]))
            self.values[id(node)] = name
        for node in graph.nodes():                 # the nodes the output needs, in order
            if node.op != "input":
                self.values[id(node)] = self.lower(node)
        logits = self.read(graph.outputs[0])
        if logits in self.half:
            logits = self.add("Cast", [logits], to=TensorProto.FLOAT)
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        if sorted(self.layers) != list(range(len(self.layers))):
            raise OnnxLoweringError(f"the attention layers {sorted(self.layers)} are not 0..{len(self.layers) - 1}")
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", graph.outputs[0].type.shape[-1]])]
        outputs += self.extra_outputs
        live = {o.name for o in outputs}          # the nodes the outputs need (others were read around)
        kept = []
        for node in reversed(self.nodes):
            if any(name in live for name in node.output):
                kept.append(node)
                live.update(node.input)
        self.nodes = kept[::-1]
        read = {name for node in self.nodes for name in node.input}
        inputs = [i for i in inputs if i.name in read] + list(self.extra_inputs.values())    # the pool is the executor's
        initializers = [self._declare(i) for i in self.initializers.values()]
        onnx_graph = helper.make_graph(self.nodes, "llmc_step", inputs, outputs, initializers)
        model = helper.make_model(onnx_graph, producer_name="llmc",
                                  opset_imports=[helper.make_opsetid("", self.opset), helper.make_opsetid(CONTRIB, 1)])
        model.ir_version = min(model.ir_version, 10)
        return model

    @staticmethod
    def _declare(init: Initializer) -> onnx.TensorProto:
        """An initializer whose data the executor provides (external data the file does not hold)."""
        tensor = onnx.TensorProto()
        tensor.name = init.name
        tensor.data_type = DTYPES[init.dtype]
        tensor.dims.extend(init.shape)
        tensor.data_location = TensorProto.EXTERNAL
        nbytes = int(np.prod(init.shape, dtype=np.int64)) * DTYPE_BYTES[init.dtype]
        for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def lower(self, node: Node):
        op, a = node.op, node.attrs
        xs = [self.values[id(i)] for i in node.inputs]
        if op == "weight":            # its name; add() declares it when a node reads it (MatMulNBits reads derived ones)
            return node.attrs["name"]
        if op == "get":
            return self.values[id(node.inputs[0])][a["index"]]
        if self.act == "f32":
            return self.dispatch(node, xs, a)
        # f16 activations: they begin at the embedding and spread to every node that reads one; the
        # rest (the rope's angles from the positions, masks, constants) stays f32 and is cast where
        # it meets an activation, so a long position keeps its angle's precision.
        half = op in SOURCES or any(x in self.half for x in xs if isinstance(x, str))
        self.float = "f32" if op in F32_INSIDE or not half else "f16"
        parts = self.parts(node)
        xs = [x if i in parts else self.harmonised(source, x) for i, (source, x) in enumerate(zip(node.inputs, xs))]
        out = self.dispatch(node, xs, a)
        self.float = "f32"
        if not half:
            return out
        floats = [t.dtype in FLOAT_DTYPES for t in result_types(node.type)]
        outs = list(out) if isinstance(out, tuple) else [out]
        if op in F32_INSIDE:
            outs = [self.add("Cast", [o], to=TensorProto.FLOAT16) if f else o for o, f in zip(outs, floats)]
        self.half.update(o for o, f in zip(outs, floats) if f)
        return tuple(outs) if isinstance(out, tuple) else outs[0]

    @staticmethod
    def parts(node: Node) -> range:
        """The inputs of ``node`` that are a quantized weight's parts (their initializers are made
        by weights.py in the dtype the handler asks for)."""
        if node.op not in ("qlinear", "qembedding"):
            return range(0)
        count = len(parse_scheme(node.attrs["scheme"]).parts)
        return range(1, 1 + count) if node.op == "qlinear" else range(count)

    def harmonised(self, source: Node, x: str) -> str:
        """``x`` (the value of ``source``) in the float dtype the node being lowered computes in
        (``self.float``): an activation cast to f32 for an op that computes in f32, any other float
        value cast to f16 where it meets an activation, a float weight as an initializer of that
        dtype. The pool (a graph input) and non-float values stay as they are."""
        want = self.float
        if source.type.dtype not in FLOAT_DTYPES or source.op == "input" or not isinstance(x, str):
            return x
        if source.op == "weight":
            return self.weight_as(x, want)
        if (x in self.half) == (want == "f16"):
            return x
        key = ("cast", x, want)
        if key not in self.cache:
            self.cache[key] = self.add("Cast", [x], to=DTYPES[want])
        return self.cache[key]

    def weight_as(self, name: str, dtype: str) -> str:
        """A float weight as an initializer of ``dtype``: itself, or a copy converted at load."""
        t = self.weight_types[name]
        if t.dtype == dtype:
            return name
        return self.derived(f"{name}#{dtype}", "weight", [name], dtype, tuple(t.shape))

    def dispatch(self, node: Node, xs: list, a: dict):
        op = node.op
        if op in UNARY or op in BINARY or op in ("rsqrt", "silu", "gelu", "cast", "ne", "where", "fused"):
            return self.elementwise(op, xs, a)
        handler = getattr(self, "_" + op, None)
        if handler is None:
            raise OnnxLoweringError(f"the onnx target has no lowering for op {op!r}; build with --target cpu or ref")
        return handler(node, xs, a)

    def elementwise(self, op: str, xs: list[str], a: dict) -> str:
        if op == "fused":
            temps: list[str] = []
            for step, args, attrs in fused_body(a["body"]):
                refs = [xs[int(r[2:])] if r.startswith("in") else temps[int(r[1:])] for r in args]
                temps.append(self.elementwise(step, refs, attrs))
            return temps[-1]
        if op in UNARY:
            return self.add(UNARY[op], xs)
        if op in BINARY:
            return self.add(BINARY[op], xs)
        if op == "ne":
            return self.add("Not", [self.add("Equal", xs)])
        if op == "rsqrt":
            return self.add("Reciprocal", [self.add("Sqrt", xs)])
        if op == "silu":
            return self.add("Mul", [xs[0], self.add("Sigmoid", xs)])
        if op == "gelu":
            return self.add("Gelu", xs, approximate="tanh" if a["approximate"] == "tanh" else "none")
        if op == "cast":
            if self.float == "f16" and a["dtype"] in FLOAT_DTYPES:     # an activation stays in the activation dtype
                return xs[0]
            return self.add("Cast", xs, to=DTYPES[a["dtype"]])
        return self.add("Where", xs)

    # -- sources and shapes ----------------------------------------------------------------------

    def _const(self, node, xs, a):
        return self.const(a["value"], a["dtype"])

    def _full(self, node, xs, a):
        scalar = onnx.numpy_helper.from_array(np.asarray([a["value"]], dtype=numpy_dtype(a["dtype"])))
        return self.add("ConstantOfShape", [self.shape(a["shape"])], value=scalar)

    def _arange(self, node, xs, a):
        start, end = (self.add("Squeeze", [self.dim(d), self.const([0])]) for d in (a["start"], a["end"]))
        out = self.add("Range", [start, end, self.const(a["step"])])
        return out if a["dtype"] == "i64" else self.add("Cast", [out], to=DTYPES[a["dtype"]])

    def _reshape(self, node, xs, a):
        origin = self.origins.get(xs[0], xs[0])
        if self.dims.get(origin) == tuple(a["shape"]):      # back to a shape the value had: no node
            return origin
        return self.reshaped_to(xs[0], self.shape(a["shape"]))

    def _permute(self, node, xs, a):
        if list(a["perm"]) == [0, 2, 1, 3] and id(node.inputs[0]) in self.tokens_first:     # attention's output back
            return self.tokens_first[id(node.inputs[0])]
        return self.add("Transpose", xs, perm=list(a["perm"]))

    def _expand(self, node, xs, a):
        return self.add("Expand", [xs[0], self.shape(a["shape"])])

    def _slice(self, node, xs, a):
        return self.add("Slice", [xs[0], self.dim(a["start"]), self.dim(a["end"]), self.const([a["axis"]]),
                                  self.const([a["step"]])])

    def _concat(self, node, xs, a):
        return self.add("Concat", xs, axis=a["axis"])

    def _index(self, node, xs, a):
        if len(xs) != 2:
            raise OnnxLoweringError("the onnx target indexes one axis at a time; build with --target cpu or ref")
        return self.add("Gather", xs, axis=a["axes"][0])

    def _embedding(self, node, xs, a):
        return self.add("Gather", xs, axis=0)

    # -- reductions ------------------------------------------------------------------------------

    def _reduce(self, node, xs, a):
        return self.add(REDUCE[node.op], [xs[0], self.const(list(a["axes"]))], keepdims=int(a["keepdim"]))

    _sum = _mean = _max = _min = _reduce

    def _softmax(self, node, xs, a):
        return self.add("Softmax", xs, axis=a["axis"])

    def _log_softmax(self, node, xs, a):
        return self.add("LogSoftmax", xs, axis=a["axis"])

    def _argmax(self, node, xs, a):
        return self.add("ArgMax", xs, axis=a["axis"], keepdims=int(a["keepdim"]))

    def _cumsum(self, node, xs, a):
        return self.add("CumSum", [xs[0], self.const(a["axis"])])

    # -- linear algebra and norms ----------------------------------------------------------------

    def _matmul(self, node, xs, a):
        return self.add("MatMul", xs)

    def _linear(self, node, xs, a):
        y = self.add("MatMul", [xs[0], self.add("Transpose", [xs[1]], perm=[1, 0])])
        return self.add("Add", [y, xs[2]]) if len(xs) > 2 else y

    def _qlinear(self, node, xs, a):
        """MatMulNBits over the parts re-laid out at load (weights.py): 4-bit codes two a byte in
        element order, or 8-bit codes offset by 128, with scales in the activations' dtype and its
        default zero point (8 or 128: its fast kernels; a float zero point is 30x slower). A q4
        group's min enters as w = (q - 8) * s + (min + 8 s): the group sums of x times the [K/G, N]
        offsets, one small MatMul beside it, left out when every offset is 0 (GGUF's Q4_0:
        min = -8 s)."""
        scheme = parse_scheme(a["scheme"])
        count = len(scheme.parts)
        parts = node.inputs[1:1 + count]
        rows, cols = parts[0].type.shape[0], scheme.cols(parts[0].type.shape[1])
        group, bits = scheme.group, scheme.bits
        blocks = cols // group
        names = [p.attrs["name"] for p in parts]
        codes = self.derived(f"{names[0]}#codes", "nibbles" if bits == 4 else "bytes", names, "u8",
                             (rows, blocks, group * bits // 8))
        scales = self.derived(f"{names[1]}#scales", "scales", names, self.float, (rows * blocks,))
        y = self.add("MatMulNBits", [xs[0], codes, scales], domain=CONTRIB, K=cols, N=rows, bits=bits,
                     block_size=group, accuracy_level=self.accuracy_level)
        if "mins" in scheme.parts and not self.symmetric(names[1], names[2]):
            offsets = self.derived(f"{names[2]}#offsets", "offsets", names, self.float, (blocks, rows))
            rank = node.inputs[0].type.rank
            sums = self.add("ReduceSum", [self.reshape(xs[0], [0] * (rank - 1) + [blocks, group]), self.const([-1])],
                            keepdims=0)
            y = self.add("Add", [y, self.add("MatMul", [sums, offsets])])
        return self.add("Add", [y, xs[1 + count]]) if len(xs) > 1 + count else y

    def symmetric(self, scales: str, mins: str) -> bool:
        """Whether every group's min is -8 times its scale (a GGUF Q4_0 weight, or a symmetric one):
        then the offsets min + 8 s are all 0 and MatMulNBits's default zero point alone gives the
        weight, with no group sums beside it."""
        weights = self.graph.weights
        if scales not in weights or mins not in weights:
            return False
        key = (scales, mins)                       # a tied weight is asked twice (embedding, LM head)
        if key not in self.symmetric_parts:
            self.symmetric_parts[key] = not (weights[mins].astype(np.float32)
                                             + 8 * weights[scales].astype(np.float32)).any()
        return self.symmetric_parts[key]

    def derived(self, name: str, kind: str, sources: list[str], dtype: str, shape) -> str:
        self.initializers.setdefault(name, Initializer(name, kind, tuple(sources), dtype, tuple(shape)))
        return name

    def _qembedding(self, node, xs, a):
        """The looked-up rows: ORT's GatherBlockQuantized over MatMulNBits's own parts (one node; a
        tied lm_head's initializers are the same arrays) when its default zero point gives the
        weight (q8, GGUF's Q4_0), else the rows' parts gathered and dequantized in the graph."""
        scheme = parse_scheme(a["scheme"])
        count = len(scheme.parts)
        parts, ids = xs[:count], xs[count]
        cols = scheme.cols(node.inputs[0].type.shape[1])
        group = scheme.group
        names = [p.attrs.get("name") for p in node.inputs[:count]]
        if all(p.op == "weight" for p in node.inputs[:count]) and group >= 16 and group & (group - 1) == 0 and \
                ("mins" not in scheme.parts or self.symmetric(names[1], names[2])):
            rows, bits = node.inputs[0].type.shape[0], scheme.bits
            codes = self.derived(f"{names[0]}#rows", "nibbles" if bits == 4 else "bytes", names, "u8",
                                 (rows, cols * bits // 8))
            scales = self.derived(f"{names[1]}#rowscales.{self.float}", "scales", names, self.float, (rows, cols // group))
            return self.add("GatherBlockQuantized", [codes, ids, scales], domain=CONTRIB, bits=bits, block_size=group,
                            gather_axis=0, quantize_axis=1)
        rows = [self.add("Gather", [p, ids], axis=0) for p in parts]          # [..ids, K/G or packed]
        codes = self.add("Reshape", [rows[0], self.const([0] * len(node.inputs[count].type.shape) + [cols // group, -1])])
        if scheme.bits == 4:
            low = self.add("BitwiseAnd", [codes, self.const(15, "u8")])
            high = self.add("BitShift", [codes, self.const(4, "u8")], direction="RIGHT")
            codes = self.add("Concat", [low, high], axis=-1)
        values = self.add("Mul", [self.add("Cast", [codes], to=TensorProto.FLOAT),
                                  self.add("Unsqueeze", [self.add("Cast", [rows[1]], to=TensorProto.FLOAT),
                                                         self.const([-1])])])
        if "mins" in scheme.parts:
            values = self.add("Add", [values, self.add("Unsqueeze", [self.add("Cast", [rows[2]], to=TensorProto.FLOAT),
                                                                     self.const([-1])])])
        return self.add("Reshape", [values, self.const([0] * len(node.inputs[count].type.shape) + [cols])])

    def _rms_norm(self, node, xs, a):
        return self.add("SimplifiedLayerNormalization", xs, axis=-1, epsilon=float(a["eps"]))

    def _layer_norm(self, node, xs, a):
        width = node.inputs[0].type.shape[-1]
        scale = xs[1] if len(xs) > 1 else self.const(np.ones(width), self.float)
        bias = xs[2] if len(xs) > 2 else self.const(np.zeros(width), self.float)
        return self.add("LayerNormalization", [xs[0], scale, bias], axis=-1, epsilon=float(a["eps"]))

    def _add_norm(self, node, xs, a):
        """(x + residual, its norm): Skip(Simplified)LayerNormalization, whose fourth output is the sum."""
        if a["norm"] == "rms":
            out = self.add("SkipSimplifiedLayerNormalization", xs, outputs=4, domain=CONTRIB, unread=(1, 2),
                           epsilon=float(a["eps"]))       # (normed, mean, inverse deviation, sum)
            return out[3], out[0]
        width = node.inputs[0].type.shape[-1]
        scale = xs[2] if len(xs) > 2 else self.const(np.ones(width), self.float)
        bias = xs[3] if len(xs) > 3 else self.const(np.zeros(width), self.float)
        out = self.add("SkipLayerNormalization", [xs[0], xs[1], scale, bias], outputs=4, domain=CONTRIB,
                       unread=(1, 2), epsilon=float(a["eps"]))
        return out[3], out[0]

    def _swiglu(self, node, xs, a):
        return self.add("Mul", [self.elementwise("silu", xs[:1], {}), xs[1]])

    def _geglu(self, node, xs, a):
        return self.add("Mul", [self.elementwise("gelu", xs[:1], a), xs[1]])

    def _rope(self, node, xs, a):
        x, cos, sin = xs
        return self.rotate(x, cos, sin, node.inputs[0].type.shape[-1], node.inputs[0].type.rank, a.get("interleaved"))

    def rotate(self, x: str, cos: str, sin: str, width: int, rank: int, interleaved) -> str:
        """x cos + rotate(x) sin, rotate(x) as a product with a signed permutation (exact: each
        output is one input, the other terms zero): (-x2, x1) of x's halves, or (-x[2i+1], x[2i])
        of its pairs when interleaved."""
        turn = np.zeros((width, width), np.float32)
        half = width // 2
        for i in range(half):
            if interleaved:
                turn[2 * i + 1, 2 * i], turn[2 * i, 2 * i + 1] = -1, 1
            else:
                turn[i + half, i], turn[i, i + half] = -1, 1
        rotated = self.add("MatMul", [x, self.const(turn, self.float)])
        return self.add("Add", [self.add("Mul", [x, cos]), self.add("Mul", [rotated, sin])])

    # -- attention: GroupQueryAttention over each sequence's contiguous cache ------------------

    def shared(self, key, make) -> str:
        """A value every layer uses (the slots' tokens, the rope's half tables), made once."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def step_input(self, name: str, dtype: str, shape: list) -> str:
        """An input the executor adds to the ABI's (the step's layout, the rows of the caches)."""
        self.extra_inputs.setdefault(name, helper.make_tensor_value_info(name, DTYPES[dtype], shape))
        return name

    def _attention(self, node, xs, a):
        """ORT's GroupQueryAttention, which appends each sequence's new keys and values to its
        contiguous cache in place (past and present are one buffer: session.py's rows) and attends
        causally, inside the window. The step's flat tokens go to its [batch, chunk] layout by one
        GatherND (``gqa_tokens``: each row's tokens right-padded, ``query_seqlens`` of them valid)
        and come back by another (``gqa_slots``). With an f16 pool the keys and values are rounded
        to f16 first, so the rows hold what the pool will (the executor copies them there)."""
        q, k, v = xs[:3]
        qt, kt = node.inputs[0].type, node.inputs[1].type
        heads, kv_heads, width = qt.shape[1], kt.shape[1], qt.shape[3]
        layer = a["layer"]
        act = self.float
        self.layers.append(layer)
        index = self.step_input("gqa_tokens", "i64", ["batch", "chunk", 2])
        slots = self.step_input("gqa_slots", "i64", [1, "seq", 2])
        seqlens = self.step_input("seqlens_k", "i32", ["batch"])
        fresh = self.step_input("query_seqlens", "i32", ["batch"])
        total = self.step_input("total_length", "i32", [])
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(a["scale"]),
                 "local_window_size": int(a["window"]) if a["window"] else -1}
        rotary = self.rotary(node, width) if self.pool_dtype == act else None
        if rotary is not None:            # GQA rotates q and k itself, from the step's tokens' half tables
            sources, tables = rotary
            packed = self.packed(sources, heads, kv_heads, width)
            flat = [packed] if packed else [self.token_major_value(n) for n in sources]       # [1, seq, ...]
            gathered = [self.add("GatherND", [x, index]) for x in flat] + ([""] * 2 if packed else [])
            tokens = self.shared("slot tokens", lambda: self.add("Squeeze", [self.add(
                "Slice", [index, self.const([1]), self.const([2]), self.const([2])]), self.const([2])]))
            optional = [*tables, tokens] + [""] * 6          # position_ids: each slot's token, its row of the tables
            attrs["do_rotary"] = 1
        else:
            gathered = []
            for source, value in zip(node.inputs[:3], (q, k, v)):
                tokens = self.token_major(source, value, source.type.shape[1], width)    # [1, seq, heads * head_dim]
                if source is not node.inputs[0] and self.pool_dtype == "f16" and act != "f16":
                    tokens = self.add("Cast", [self.add("Cast", [tokens], to=TensorProto.FLOAT16)], to=DTYPES[act])
                gathered.append(self.add("GatherND", [tokens, index]))
            optional = [""] * 9               # cos/sin caches .. k_norm_weight: unused (rope is the graph's)
        pasts = [self.step_input(f"past_{w}.{layer}", act, ["batch", kv_heads, "capacity", width]) for w in "kv"]
        if a.get("softcap"):
            attrs["softcap"] = float(a["softcap"])
        out = self.fresh("gqa_")
        presents = [f"present_{w}.{layer}" for w in "kv"]
        self.nodes.append(helper.make_node("GroupQueryAttention", [*gathered, *pasts, seqlens, total, *optional, fresh],
                                           [out, *presents], domain=CONTRIB, **attrs))
        for name in presents:
            self.extra_outputs.append(helper.make_tensor_value_info(name, DTYPES[act], ["batch", kv_heads, "capacity",
                                                                                       width]))
        rows = self.add("GatherND", [out, slots])                                                  # [1, seq, H*D]
        self.dims[rows] = (1, qt.shape[2], heads * width)
        self.tokens_first[id(node)] = self.reshape(rows, [1, -1, heads, width])     # what the model permutes it to
        return self.add("Transpose", [self.tokens_first[id(node)]], perm=[0, 2, 1, 3])

    def rotary(self, node: Node, width: int):
        """For an attention whose q and k are rotated by the same rope (non-interleaved, full
        width, after the model's head-major permute), with tables cos(concat(F, F)) and
        sin(concat(F, F)) times one constant: the unrotated q, k, v nodes and GQA's half tables
        [rows, head_dim / 2] (the step's tokens' rows of F, padded to ``total_length`` rows as GQA
        asks). None otherwise (the rope is then the graph's own)."""
        q, k, v = node.inputs[:3]
        if not (q.op == k.op == "rope" and q.inputs[1:] == k.inputs[1:] and not q.attrs.get("interleaved")
                and not k.attrs.get("interleaved")):
            return None
        sources = [self.before_permute(q.inputs[0]), self.before_permute(k.inputs[0]), self.before_permute(v)]
        found = [self.table(t) for t in q.inputs[1:3]]
        if None in sources or None in found or found[0][0] is not found[1][0] or found[0][2] != found[1][2] \
                or [found[0][1], found[1][1]] != ["cos", "sin"] or found[0][0].type.shape[-1] * 2 != width:
            return None
        angles, _, scale = found[0]

        def make() -> list[str]:
            half = self.reshape(self.values[id(angles)], [-1, width // 2])                  # [seq, head_dim / 2]
            total = self.add("Cast", [self.add("Reshape", ["total_length", self.const([1])])], to=TensorProto.INT64)
            short = self.add("Max", [self.add("Sub", [total, self.symbol("seq")]), self.const([0])])
            pads = self.add("Concat", [self.const([0, 0]), short, self.const([0])], axis=0)
            tables = []
            for fn in ("Cos", "Sin"):
                table = self.add(fn, [half])
                if scale is not None:
                    table = self.add("Mul", [table, self.const(scale, "f32")])
                table = self.add("Pad", [table, pads])
                tables.append(table if self.float == "f32" else self.add("Cast", [table], to=DTYPES[self.float]))
            return tables
        return sources, self.shared(("rotary", id(angles), scale, self.float), make)

    @staticmethod
    def table(node: Node):
        """(F, "cos" or "sin", constant factor or None) for a rope table fn(concat(F, F)) [* c],
        read through reshapes: its halves are equal, as GQA's half tables assume."""
        scale = None
        while True:
            if node.op == "reshape":
                node = node.inputs[0]
            elif node.op == "mul" and node.inputs[1].op == "const" and scale is None:
                scale, node = float(node.inputs[1].attrs["value"]), node.inputs[0]
            else:
                break
        if node.op not in ("cos", "sin"):
            return None
        joined = node.inputs[0]
        if joined.op != "concat" or len(joined.inputs) != 2 or joined.inputs[0] is not joined.inputs[1] \
                or joined.attrs["axis"] not in (-1, joined.type.rank - 1):
            return None
        return joined.inputs[0], node.op, scale

    def packed(self, sources: list[Node], heads: int, kv_heads: int, width: int) -> str | None:
        """[1, seq, (heads + 2 kv_heads) * width] when q, k and v are consecutive slices of one
        projection's output (a fused q/k/v linear), which GQA then reads packed."""
        cuts = []
        for node, count in zip(sources, (heads, kv_heads, kv_heads)):
            part = node.inputs[0] if node.op == "reshape" else None
            if part is None or part.op != "slice" or part.attrs["axis"] not in (-1, part.inputs[0].type.rank - 1) \
                    or part.attrs["step"] != 1 or part.type.shape[-1] != count * width:
                return None
            cuts.append((part.inputs[0], part.attrs["start"], part.attrs["end"]))
        whole = cuts[0][0]
        edges = [0, heads * width, (heads + kv_heads) * width, (heads + 2 * kv_heads) * width]
        if any(c[0] is not whole for c in cuts) or [c[1] for c in cuts] != edges[:3] \
                or [c[2] for c in cuts] != edges[1:] or whole.type.shape[-1] != edges[3]:
            return None
        return self.values[id(whole)] if whole.type.rank == 3 else self.reshape(self.values[id(whole)], [1, -1, edges[3]])

    @staticmethod
    def before_permute(n: Node) -> Node | None:
        return n.inputs[0] if n.op == "permute" and list(n.attrs["perm"]) == [0, 2, 1, 3] else None

    def token_major_value(self, inner: Node) -> str:
        """The value of ``inner`` ([1, seq, heads, width]) as [1, seq, heads * width]: read before
        its split into heads where it is one."""
        if inner.op == "reshape" and inner.inputs[0].type.rank == 3:
            return self.values[id(inner.inputs[0])]
        return self.reshape(self.values[id(inner)], [1, -1, inner.type.shape[2] * inner.type.shape[3]])

    def token_major(self, node: Node, value: str, heads: int, width: int) -> str:
        """Attention's input ``node`` (``value``, [1, heads, seq, width]) as [1, seq, heads * width],
        as GroupQueryAttention reads it. Models make it by permuting [1, seq, heads, width] (and
        rotating it after); reading the value before the permute, with the rotation done there,
        spends no transposes (the permute and the head-major rotation are then unread and pruned)."""
        inner = self.before_permute(node)
        if inner is not None:                 # a [1, seq, heads * width] split into heads: read it unsplit
            return self.token_major_value(inner)
        inner = self.before_permute(node.inputs[0]) if node.op == "rope" else None
        tables = [i.type for i in node.inputs[1:3]] if inner is not None else []
        if inner is not None and all(list(t.shape[:2]) == [1, 1] and t.rank == 4 for t in tables):
            cos, sin = (self.reshape(self.harmonised(i, self.values[id(i)]), [1, -1, 1, width])  # [1, seq, 1, width]
                        for i in node.inputs[1:3])
            rotated = self.rotate(self.values[id(inner)], cos, sin, width, 4, node.attrs.get("interleaved"))
            return self.reshape(rotated, [1, -1, heads * width])
        return self.reshape(self.add("Transpose", [value], perm=[0, 2, 1, 3]), [1, -1, heads * width])


def lower(graph: Graph, opset: int, accuracy_level: int,
          act: str = "f32") -> tuple[onnx.ModelProto, list[Initializer], str]:
    """(the ONNX model, the initializers the executor makes at load, the pool's dtype)."""
    lowering = OnnxLowering(graph, opset, accuracy_level, act)
    model = lowering.run()
    return model, list(lowering.initializers.values()), lowering.pool_dtype
