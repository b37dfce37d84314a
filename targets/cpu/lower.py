"""Lower an optimised step graph to one C function over the kernels of kernels.c.

The function runs one batched step (``llmc.abi``) inside a single OpenMP parallel region::

    int NAME(int64_t seq, const int64_t* tokens, const int64_t* positions, const int64_t* seq_index,
             int64_t seqs, int64_t max_blocks, const int64_t* block_tables, int64_t rows,
             const int64_t* logit_rows, int64_t blocks, void* const* caches, const void* const* W,
             char* arena, float* out)

``caches`` are the KV pool's tensors in order (``blocks`` blocks each), ``W`` the weights in the
order of ``WeightTable.names``, ``arena`` the activation memory (``arena_bytes``, planned here for
``seq <= chunk``) and ``out`` the graph's single f32 output, [rows, vocab]. The function checks
every index it is given before any kernel runs (returning non-zero otherwise). Nodes are lowered
in topological order; view ops make views (views.py), elementwise ops become generated loops, the
rest call kernels. The target never rewrites the graph: where a kernel wants a layout a view
lacks, the view is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmc import dims
from llmc.errors import LlmcError
from llmc.ir import Graph, Node, Type, numpy_dtype
from llmc.ops import MOE_ACT_CODES, OPS
from llmc.quant import parse_scheme

from .layout import LAYOUTS, panels_fit
from .scalar import ScalarError, c_type, expression, literal
from ..arena import plan_arena
from ..lowering import BATCH_INPUTS, GraphLowering, f16_weight
from ..views import View, c_dim

ALIGN = 64
MAX_SPLITS = 16            # flash-decoding spans of one token's keys (kernels.c's LLMC_MAX_SPLITS)
SPLIT_TOKENS = 4           # steps of at most this many tokens run spans as tasks (LLMC_SPLIT_TOKENS)
DEFAULT_TILES = {"gemv": 16, "gemm": 32}
KV_KINDS = {"f32": 0, "i8": 1, "f16": 2}        # the attention kernel's pool formats (kernels.c's LLMC_KV_*)


class LoweringError(LlmcError):
    """A graph the CPU target cannot generate code for."""


class SiteTable:
    """The profiled sites of a library (``LLMC_PROFILE``): one label per op that runs code, in the
    order of the marks, ``kind|detail`` (``linear_q4g32|1536x576``); site 0 is the step's entry."""

    def __init__(self):
        self.labels: list[str] = ["step|checks and thread start"]

    def add(self, label: str) -> int:
        self.labels.append(label)
        return len(self.labels) - 1


class WeightTable:
    """The weights the generated code reads, in the order the runtime passes their pointers, and
    the quantized weights it reads in its own layout (layout.py): ``panels`` lists each one's
    parts (codes, scales, mins) by name."""

    def __init__(self):
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.panels: list[tuple[str, ...]] = []
        self._layouts: dict[str, str] = {}

    def index(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.names)
            self.names.append(name)
        return self._index[name]

    def in_panels(self, parts: tuple[str, ...], layout: str) -> None:
        if parts not in self.panels:
            self.panels.append(parts)
            self._layouts.update(dict.fromkeys(parts, layout))

    @property
    def layouts(self) -> dict[str, str]:
        """weight name -> its layout, for the weights not stored in their scheme's rows"""
        return dict(self._layouts)


@dataclass
class Lowered:
    name: str
    code: str
    arena_bytes: int
    kernels: dict[str, int] = field(default_factory=dict)     # kernel -> call sites


class FunctionLowering(GraphLowering):
    error = LoweringError
    target = "cpu"

    def __init__(self, graph: Graph, name: str, weights: WeightTable, tiles: Callable[[str, int, int], dict],
                 chunk: int, sites: SiteTable | None = None, exact: bool = False):
        super().__init__(graph)
        self.name = name
        self.weights = weights
        self.sites = sites or SiteTable()
        self._called: str | None = None          # the last kernel called (the profile label's kind)
        self._reads: set[int] = set()             # the buffers the op being lowered reads
        # the loops since the last barrier, if the last op was one: (its pragma's line, their reads, writes)
        self._previous: tuple | None = None
        self.tiles = tiles
        self.chunk = chunk
        self.exact = exact          # quantized linears on f32 activations (the cpu option quant_activations)
        vocab = graph.outputs[0].type.shape[-1] if graph.outputs[0].type.rank else None
        self.vocab = vocab if isinstance(vocab, int) else "INT64_MAX"
        # k_cache is [layers, blocks, Hk, B, D]; a graph without a pool reads no block tables (B 0).
        pool = graph.inputs[len(BATCH_INPUTS):]
        self.block_size = pool[0].type.shape[3] if pool else 0
        self.lines: list[str] = []
        self.kernels: dict[str, int] = {}

    # -- driver ----------------------------------------------------------------------------

    def run(self) -> Lowered:
        self.walk(lambda node: self.lines.append(f"/* %{self.index} {node.op} : {node.type} */"), (ScalarError,))
        self.lines.append(f"LLMC_MARK({self.sites.add('step|output copy and end')});")
        arena_bytes = self._plan()
        return Lowered(self.name, self._function(), arena_bytes, self.kernels)

    # -- buffers -----------------------------------------------------------------------------

    def alloc(self, dtype: str, shape, node: Node | None = None) -> View:
        """A fresh contiguous buffer for a result (``out`` itself for the output's producer)."""
        if node is not None and id(node) == self.out_node:
            return View.of_buffer(dtype, shape, "out")
        buffer = self.new_buffer(dims.mul(dims.product(shape), _itemsize(dtype)))
        return View.of_buffer(dtype, shape, f"(arena + {self._macro(buffer)})", buffer)

    def scratch(self, nbytes) -> str:
        return f"(arena + {self._macro(self.new_buffer(nbytes))})"

    def _macro(self, buffer: int) -> str:
        return f"{self.name.upper()}_B{buffer}"

    def copy_into(self, source: View, dest: View) -> None:
        self.loop(dest, [source], lambda load: ([], load(0, "i")))

    # -- generated loops ------------------------------------------------------------------

    def loop(self, out: View, inputs: list[View], body) -> None:
        """out[...] = body over the inputs, broadcast to out's shape. ``body(load)`` returns
        (statements, expression); ``load(k, index)`` reads input k at inner index ``index``."""
        shape = out.shape
        lead, inner = (shape[:-1], shape[-1]) if shape else ((), 1)
        views = [v.expand(shape) if v.shape != shape else v for v in inputs]
        rows = dims.product(lead)
        code = [f"{{ const int64_t R = {c_dim(rows)}, I = {c_dim(inner)};",
                "  #pragma omp for schedule(static)",
                "  for (int64_t r = 0; r < R; r++) {",
                "    int64_t rem = r;"]
        for axis in range(len(lead) - 1, -1, -1):
            if axis == 0:
                code.append(f"    const int64_t i{axis} = rem;")
            else:
                code.append(f"    const int64_t i{axis} = rem % {c_dim(lead[axis])}; rem /= {c_dim(lead[axis])};")

        def pointer(name: str, view: View, const: bool) -> str:
            terms = [f"i{a} * {c_dim(s)}" for a, s in enumerate(view.strides[:-1] if shape else ()) if s != 0]
            offset = " + ".join(terms) or "0"
            qualifier = "const " if const else ""
            return f"    {qualifier}{c_type(view.dtype)}* {name} = {view.pointer(c_type(view.dtype))} + {offset};"

        for k, view in enumerate(views):
            if view.literal is None:
                self.use(view)
                code.append(pointer(f"p{k}", view, True))
        code.append(pointer("o", out, False))

        def load(k: int, index: str) -> str:
            view = views[k]
            if view.literal is not None:
                return view.literal
            step = view.strides[-1] if shape else 0
            if step == 0:
                return f"p{k}[0]"
            return f"p{k}[{index}]" if step == 1 else f"p{k}[({index}) * {c_dim(step)}]"

        statements, result = body(load)
        out_step = out.strides[-1] if shape else 0
        target = "o[i]" if out_step == 1 else ("o[0]" if out_step == 0 else f"o[i * {c_dim(out_step)}]")
        code.append("    for (int64_t i = 0; i < I; i++) {")
        code += [f"      {s}" for s in statements]
        code.append(f"      {target} = {result};")
        code += ["    }", "  }", "}"]
        self.lines += code

    def elementwise(self, node: Node) -> View:
        inputs = [self.read(i) for i in node.inputs]
        out = self.alloc(node.type.dtype, node.type.shape, node)
        if node.op == "fused":
            self.loop(out, inputs, lambda load: _fused_body(node, load))
        else:
            dtype = node.inputs[0].type.dtype if node.inputs else node.type.dtype
            if node.op == "where":
                dtype = node.inputs[1].type.dtype
            self.loop(out, inputs, lambda load: ([], expression(
                node.op, [load(k, "i") for k in range(len(inputs))], node.attrs, dtype, node.type.dtype)))
        return out

    # -- the ops -----------------------------------------------------------------------------

    def lower(self, node: Node):
        """The node's code, then (if it ran any) a profile mark: the op's time ends at the barrier
        that ends its last loop."""
        before, self._called, self._reads = len(self.lines), None, set()
        value = self._lower(node)
        if len(self.lines) > before:
            self._join_loops(before, value)
            self.lines.append(f"LLMC_MARK({self.sites.add(self._label(node))});")
        return value

    def use(self, view: View) -> None:
        super().use(view)
        if view.buffer is not None:
            self._reads.add(view.buffer)

    def _join_loops(self, start: int, value) -> None:
        """Generated loops in a row that are independent share one barrier (a layer's two RoPE
        loops): a loop drops its barrier when the next one reads nothing the loops since the last
        barrier wrote and cannot be given their inputs' memory (each is still read by it or
        later). A loop writes only its new output, so nothing else can race."""
        added = self.lines[start:]
        loops = [i for i, line in enumerate(added) if line.strip() == "#pragma omp for schedule(static)"]
        views = value if isinstance(value, tuple) else (value,)
        writes = {v.buffer for v in views if isinstance(v, View) and v.buffer is not None}
        one_loop = self._called is None and len(loops) == 1 and len(writes) == len(views)
        previous, self._previous = self._previous, None
        if not one_loop:
            return
        reads = set(self._reads)
        if previous is not None:          # the loops since the last barrier, and what they read and wrote
            pragma, group_reads, group_writes = previous
            if not group_writes & reads and all(self.buffers[b].last >= self.index for b in group_reads):
                self.lines[pragma] += " nowait"
                reads, writes = reads | group_reads, writes | group_writes
        self._previous = (start + loops[0], reads, writes)

    def _label(self, node: Node) -> str:
        kind = self._called.removeprefix("llmc_") if self._called else f"loop {node.op}"
        if node.op in ("linear", "qlinear"):        # N x K (a 4-bit weight's codes hold K/2 bytes a row)
            return f"{kind}|{node.inputs[1].type.shape[0]}x{node.inputs[0].type.shape[-1]}"
        if node.op.startswith("attention"):
            q = node.inputs[0].type.shape
            return f"{kind}|{q[1]} heads of {q[-1]}"
        shape = node.type.shape if isinstance(node.type, Type) else node.type.types[0].shape
        return f"{kind}|{'x'.join(str(d) for d in shape)}"

    def _lower(self, node: Node):
        op, a, t = node.op, node.attrs, node.type
        if op == "input":
            return self._input(node)
        if op == "weight":
            index = self.weights.index(a["name"])
            return View.of_buffer(t.dtype, t.shape, f"W[{index}]")
        if op == "const":
            return View.scalar(t.dtype, literal(a["value"], t.dtype))
        if op == "full":
            return View.scalar(t.dtype, literal(a["value"], t.dtype), t.shape)
        if op == "arange":
            out = self.alloc(t.dtype, t.shape, node)
            start, step = a["start"], a["step"]
            self.loop(out, [], lambda load: ([], f"(({c_type(t.dtype)})({c_dim(start)} + {step} * i))"))
            return out
        view = self.lower_view(node)
        if view is not None:
            return view
        if op == "concat":
            return self.concat(node, self.alloc(t.dtype, t.shape, node), [self.read(i) for i in node.inputs])
        if op == "rope":
            return self._rope(node)
        if op in ("swiglu", "geglu") or (op in OPS and OPS[op].kind == "elementwise"):
            return self.elementwise(node)
        return self.kernel_op(node)

    def _input(self, node: Node) -> View:
        name, t = node.attrs["name"], node.type
        if name in BATCH_INPUTS:
            return View.of_buffer("i64", t.shape, name)
        cache = self.cache_index(name)
        if cache is not None:
            return View.of_buffer(t.dtype, t.shape, f"caches[{cache}]")
        raise LoweringError(f"graph input {name!r} is not one of the step's {', '.join(BATCH_INPUTS)} or its KV pool")

    def _call(self, function: str, *args, kernel: str | None = None) -> None:
        """Call a kernel function; ``kernel`` names the variant for the report (default: the function)."""
        kernel = kernel or function
        self.kernels[kernel] = self.kernels.get(kernel, 0) + 1
        self._called = kernel
        self.lines.append(f"{function}({', '.join(str(x) for x in args)});")

    def _tile(self, kernel: str, rows, n: int, k: int) -> str:
        tiles = self.tiles(kernel, n, k)
        if rows == 1:
            return str(tiles["gemv"])
        return f"({c_dim(rows)} == 1 ? {tiles['gemv']} : {tiles['gemm']})"

    def _linear(self, node: Node) -> View:
        x, m, ldx = self.rows(self.read(node.inputs[0]))
        f16 = f16_weight(node.inputs[1])
        w = self.read(f16) if f16 is not None else self.contiguous(self.read(node.inputs[1]))
        n, k = w.shape
        bias = self._bias(node.inputs[2]) if len(node.inputs) > 2 else "0"
        out = self.alloc("f32", node.type.shape, node)
        kernel = "llmc_linear_f16" if f16 is not None else "llmc_linear_f32"
        self._call(kernel, x.pointer("float"), c_dim(ldx), w.pointer("f16" if f16 is not None else "float"), bias,
                   out.pointer("float"), c_dim(m), n, k, self._tile(kernel, m, n, k))
        return out

    def _bias(self, node: Node) -> str:
        return self.contiguous(self.read(node)).pointer("float")

    def _panels(self, scheme, parts: tuple[Node, ...], n: int, k: int) -> bool:
        """Whether a quantized weight is read in panels of eight rows (layout.py), recording it in
        the weight table if so: 4-bit or 8-bit groups of 32 stored as whole weights, N a multiple
        of 8."""
        if self.exact or not (panels_fit(scheme.bits, scheme.group, n, k) and all(p.op == "weight" for p in parts)):
            return False
        self.weights.in_panels(tuple(p.attrs["name"] for p in parts), LAYOUTS[scheme.bits])
        return True

    def _qlinear(self, node: Node) -> View:
        scheme = parse_scheme(node.attrs["scheme"])
        count = len(scheme.parts)
        x, m, ldx = self.rows(self.read(node.inputs[0]))
        parts = [self.contiguous(self.read(i)) for i in node.inputs[1:1 + count]]
        n = parts[0].shape[0]
        k = node.inputs[0].type.shape[-1]
        bias = self._bias(node.inputs[1 + count]) if len(node.inputs) > 1 + count else "0"
        out = self.alloc("f32", node.type.shape, node)
        mins = parts[scheme.parts.index("mins")].pointer("f16") if "mins" in scheme.parts else "0"
        if self.exact:
            kernel = f"llmc_linear_{scheme.name}_exact"
            self._call("llmc_linear_q_exact", x.pointer("float"), c_dim(ldx), parts[0].pointer("void"),
                       parts[1].pointer("f16"), mins, bias, out.pointer("float"), c_dim(m), n, k, scheme.bits,
                       scheme.group, self._tile(kernel, m, n, k), kernel=kernel)
            return out
        scratch = self.scratch(dims.add(dims.mul(m, _round_up(k, ALIGN)), dims.mul(m, (k // 32) * 8)))
        if self._panels(scheme, node.inputs[1:1 + count], n, k):
            kernel = f"llmc_linear_q{scheme.bits}p"         # the tuner's and the profile's name
            self._call("llmc_linear_panels", x.pointer("float"), c_dim(ldx), parts[0].pointer("void"),
                       parts[1].pointer("f16"), mins, bias, out.pointer("float"), c_dim(m), n, k, scheme.bits,
                       self._tile(kernel, m, n, k), scratch, kernel=kernel)
            return out
        kernel = f"llmc_linear_{scheme.name}"
        self._call("llmc_linear_q", x.pointer("float"), c_dim(ldx), parts[0].pointer("void"),
                   parts[1].pointer("f16"), mins, bias, out.pointer("float"), c_dim(m), n, k, scheme.bits,
                   scheme.group, self._tile(kernel, m, n, k), scratch, kernel=kernel)
        return out

    def _moe(self, node: Node) -> View:
        return self._experts(node, None)

    def _qmoe(self, node: Node) -> View:
        return self._experts(node, parse_scheme(node.attrs["scheme"]))

    def _experts(self, node: Node, scheme) -> View:
        """kernels.c's llmc_moe over the stacked expert weights, in the storage ``kind`` it names."""
        a = node.attrs
        x, tokens, ldx = self.rows(self.read(node.inputs[0]))
        router = self.contiguous(self.read(node.inputs[1]))
        experts, hidden = router.shape
        count = len(scheme.parts) if scheme else 1
        stacks = [node.inputs[2:2 + count], node.inputs[2 + count:]]
        inner = node.inputs[-count].type.shape[1]
        inner = scheme.cols(inner) if scheme else inner
        shapes = [(inner * (2 if a["gated"] else 1), hidden), (hidden, inner)]     # one expert's (N, K) of each
        if scheme is None:
            kind, bits, group, linear, parts = self._float_experts(stacks)
        else:
            kind, bits, group, linear, parts = self._quantized_experts(stacks, scheme, experts, shapes)
        tiles = [self.tiles("llmc_linear_f32", experts, hidden)] + [self.tiles(linear, n, k) for n, k in shapes]
        table = ", ".join(str(t[key]) for t in tiles for key in ("gemv", "gemm"))
        scratch = self.scratch(moe_scratch(tokens, hidden, experts, a["top_k"], inner, a["gated"]))
        out = self.alloc("f32", node.type.shape, node)
        pointers = [view.pointer(c) if view is not None else "0"
                    for part in parts for view, c in zip(part, ("void", "f16", "f16"))]
        self.lines.append(f"{{ static const int64_t tiles[6] = {{{table}}};")
        self._call("llmc_moe", x.pointer("float"), c_dim(ldx), c_dim(tokens), hidden, router.pointer("float"),
                   experts, a["top_k"], int(a["normalize"]), MOE_ACT_CODES[a["act"]], int(a["gated"]), inner, kind, bits,
                   group, *pointers, "tiles", out.pointer("float"), scratch,
                   kernel=linear.replace("llmc_linear_", "llmc_moe_"))
        self.lines.append("}")
        return out

    def _float_experts(self, stacks):
        """(kind, bits, group, the linear kernel it runs, [codes, scales, mins] views) of f32 or f16 experts."""
        halves = [f16_weight(s[0]) for s in stacks]
        if (halves[0] is None) != (halves[1] is None):
            raise LoweringError("moe expert weights stored one in f16, the other in f32")
        if halves[0] is not None:
            return "LLMC_W_F16", 16, 0, "llmc_linear_f16", [[self.read(h), None, None] for h in halves]
        return "LLMC_W_F32", 32, 0, "llmc_linear_f32", [[self.contiguous(self.read(s[0])), None, None] for s in stacks]

    def _quantized_experts(self, stacks, scheme, experts: int, shapes):
        """The same for quantized experts: read exactly, in panels (where each expert's rows of both
        weights are whole panels), or plain."""
        panels = not self.exact and all(
            n % 8 == 0 and panels_fit(scheme.bits, scheme.group, n * experts, k) and all(i.op == "weight" for i in s)
            for s, (n, k) in zip(stacks, shapes))
        if panels:
            for s, (n, k) in zip(stacks, shapes):
                self._panels(scheme, s, n * experts, k)
        kind, linear = ("LLMC_W_Q_EXACT", f"llmc_linear_{scheme.name}_exact") if self.exact else \
            ("LLMC_W_PANELS", f"llmc_linear_q{scheme.bits}p") if panels else ("LLMC_W_Q", f"llmc_linear_{scheme.name}")
        parts = []
        for s in stacks:
            views = [self.contiguous(self.read(i)) for i in s]
            parts.append([views[0], views[1], views[scheme.parts.index("mins")] if "mins" in scheme.parts else None])
        return kind, scheme.bits, scheme.group, linear, parts

    def _embedding(self, node: Node) -> View:
        table = self.contiguous(self.read(node.inputs[0]))
        ids = self.contiguous(self.read(node.inputs[1]))
        rows, width = table.shape
        out = self.alloc(table.dtype, node.type.shape, node)
        self._call("llmc_embedding", table.pointer("char"), width * _itemsize(table.dtype), rows,
                   ids.pointer("int64_t"), c_dim(dims.product(ids.shape)), out.pointer("char"))
        return out

    def _qembedding(self, node: Node) -> View:
        scheme = parse_scheme(node.attrs["scheme"])
        count = len(scheme.parts)
        parts = [self.contiguous(self.read(i)) for i in node.inputs[:count]]
        ids = self.contiguous(self.read(node.inputs[count]))
        k = node.type.shape[-1]
        out = self.alloc("f32", node.type.shape, node)
        n_ids = c_dim(dims.product(ids.shape))
        mins = parts[scheme.parts.index("mins")].pointer("f16") if "mins" in scheme.parts else "0"
        if self._panels(scheme, node.inputs[:count], parts[0].shape[0], k):
            self._call("llmc_embedding_panels", parts[0].pointer("void"), parts[1].pointer("f16"), mins,
                       parts[0].shape[0], k, scheme.bits, ids.pointer("int64_t"), n_ids, out.pointer("float"))
            return out
        self._call("llmc_embedding_q", parts[0].pointer("void"), parts[1].pointer("f16"), mins, parts[0].shape[0],
                   k, scheme.bits, scheme.group, ids.pointer("int64_t"), n_ids, out.pointer("float"))
        return out

    def _norm_params(self, node: Node, params: tuple[Node, ...]) -> tuple[str, str, str]:
        """(weight, bias, eps) arguments of a norm kernel; a missing weight or bias is a null pointer."""
        pointers = [self.contiguous(self.read(p)).pointer("float") for p in params] + ["0", "0"]
        return pointers[0], pointers[1], repr(float(node.attrs["eps"])) + "f"

    def _rms_norm(self, node: Node) -> View:
        return self._plain_norm(node, 0)

    def _layer_norm(self, node: Node) -> View:
        return self._plain_norm(node, 1)

    def _plain_norm(self, node: Node, kind: int) -> View:
        x, rows, ldx = self.rows(self.read(node.inputs[0]))
        w, b, eps = self._norm_params(node, node.inputs[1:])
        out = self.alloc("f32", node.type.shape, node)
        self._call("llmc_norm", x.pointer("float"), c_dim(ldx), w, b, eps, kind, c_dim(rows),
                   node.type.shape[-1], out.pointer("float"))
        return out

    def _add_norm(self, node: Node) -> tuple[View, View]:
        kind = 0 if node.attrs["norm"] == "rms" else 1
        x, rows, ldx = self.rows(self.read(node.inputs[0]))
        r, _, ldr = self.rows(self.read(node.inputs[1]))
        w, b, eps = self._norm_params(node, node.inputs[2:])
        shape = node.type.types[0].shape
        total, normed = self.alloc("f32", shape), self.alloc("f32", shape)
        self._call("llmc_add_norm", x.pointer("float"), c_dim(ldx), r.pointer("float"), c_dim(ldr), w, b, eps, kind,
                   c_dim(rows), shape[-1], total.pointer("float"), normed.pointer("float"))
        return total, normed

    def _rope(self, node: Node) -> View:
        x, cos, sin = (self.read(i) for i in node.inputs)
        if x.strides[-1] != 1:
            x = self.contiguous(x)
        half = node.type.shape[-1] // 2
        out = self.alloc("f32", node.type.shape, node)

        def body(load):
            if node.attrs.get("interleaved"):             # pairs (2i, 2i + 1)
                rotated = f"(i % 2 == 0 ? -{load(0, 'i + 1')} : {load(0, 'i - 1')})"
            else:
                rotated = f"(i < {half} ? -{load(0, f'i + {half}')} : {load(0, f'i - {half}')})"
            return [], f"{load(0, 'i')} * {load(1, 'i')} + {rotated} * {load(2, 'i')}"

        self.loop(out, [x, cos, sin], body)
        return out

    def _attention(self, node: Node) -> View:
        return self._attend(node, kv8=False)

    def _attention_kv8(self, node: Node) -> View:
        return self._attend(node, kv8=True)

    def _attend(self, node: Node, kv8: bool) -> View:
        a = node.attrs
        q, k, v = (self.heads(self.read(i)) for i in node.inputs[:3])
        pools = [self.read(i) for i in node.inputs[3:7 if kv8 else 5]]
        positions, seq_index, tables = (self.contiguous(self.read(i)) for i in node.inputs[-3:])
        k_pool, v_pool = (pools[0], pools[2]) if kv8 else pools
        kind = KV_KINDS["i8" if kv8 else k_pool.dtype]
        layers, blocks, heads_kv, block_size, head_dim = k_pool.shape
        heads, seq = q.shape[1], q.shape[2]
        if head_dim > 512:
            raise LoweringError(f"attention heads of {head_dim} values exceed the cpu kernel's 512")
        layer_slots = dims.mul(dims.mul(blocks, heads_kv), block_size)      # one layer's [blocks, Hk, B]

        def layer_of(pool: View, item: int, width: int) -> str:
            return f"((char*)({pool.base}) + {c_dim(dims.mul(a['layer'], dims.mul(layer_slots, width * item)))})"

        elem = _itemsize(k_pool.dtype)
        k_at, v_at = layer_of(k_pool, elem, head_dim), layer_of(v_pool, elem, head_dim)
        ks_at = f"(float*){layer_of(pools[1], 4, 1)}" if kv8 else "0"
        vs_at = f"(float*){layer_of(pools[3], 4, 1)}" if kv8 else "0"
        # The result is laid out [seq, heads, head_dim], what the next permute + reshape reads.
        raw = self.alloc("f32", (seq, heads, head_dim))
        out = raw.reshape((1, seq, heads, head_dim)).permute((0, 2, 1, 3))
        scratch = self.scratch(SPLIT_TOKENS * MAX_SPLITS * heads * (head_dim + 2) * 4)
        self._call("llmc_attention", q.pointer("float"), c_dim(q.strides[1]), c_dim(q.strides[2]),
                   k.pointer("float"), c_dim(k.strides[1]), c_dim(k.strides[2]),
                   v.pointer("float"), c_dim(v.strides[1]), c_dim(v.strides[2]),
                   k_at, ks_at, v_at, vs_at, kind, positions.pointer("int64_t"), seq_index.pointer("int64_t"),
                   tables.pointer("int64_t"), c_dim(tables.shape[1]), c_dim(seq), heads, heads_kv, head_dim,
                   block_size, repr(float(a["scale"])) + "f", a["window"], repr(float(a.get("softcap", 0.0))) + "f",
                   raw.pointer("float"), head_dim,
                   c_dim(heads * head_dim), f"(float*){scratch}")
        return out

    # -- output ------------------------------------------------------------------------------

    def _plan(self) -> int:
        return plan_arena(self.buffers, {"seq": self.chunk, "rows": self.chunk}, ALIGN)

    def _function(self) -> str:
        defines = [f"#define {self._macro(i)} {b.offset}" for i, b in enumerate(self.buffers)]
        head = [f"LLMC_EXPORT int {self.name}(int64_t seq, const int64_t* tokens, const int64_t* positions,",
                "        const int64_t* seq_index, int64_t seqs, int64_t max_blocks, const int64_t* block_tables,",
                "        int64_t rows, const int64_t* logit_rows, int64_t blocks, void* const* caches,",
                "        const void* const* W, char* arena, float* out) {",
                "  if (llmc_profiling) llmc_prof_last = omp_get_wtime();",
                f"  if (llmc_check_step(seq, LLMC_CHUNK, tokens, {self.vocab}, positions, seq_index, seqs, max_blocks,",
                f"                      block_tables, rows, logit_rows, blocks, {self.block_size})) return 1;",
                "  #pragma omp parallel num_threads(llmc_nthreads)",
                "  {",
                "    LLMC_MARK(0);"]
        body = ["    " + line for line in "\n".join(self.lines).split("\n")]
        return "\n".join(defines + head + body + ["  }", "  llmc_prof_steps += llmc_profiling;", "  return 0;", "}", ""])


def _fused_body(node: Node, load) -> tuple[list[str], str]:
    from llmc.ops import fused_body, infer

    statements = []
    types: list[str] = []
    input_types = [i.type.dtype for i in node.inputs]

    def operand(ref: str) -> tuple[str, str]:
        if ref.startswith("in"):
            k = int(ref[2:])
            return load(k, "i"), input_types[k]
        k = int(ref[1:])
        return f"t{k}", types[k]

    for index, (op, args, attrs) in enumerate(fused_body(node.attrs["body"])):
        values = [operand(r) for r in args]
        in_dtype = values[1][1] if op == "where" else values[0][1]
        out_dtype = infer(op, [Type(d, ()) for _, d in values], attrs).dtype
        types.append(out_dtype)
        statements.append(f"const {c_type(out_dtype)} t{index} = "
                          f"{expression(op, [v for v, _ in values], attrs, in_dtype, out_dtype)};")
    return statements, f"t{len(types) - 1}"


def moe_scratch(tokens, hidden: int, experts: int, top_k: int, inner: int, gated: bool):
    """The bytes of llmc_moe's scratch (kernels.c lays it out, each part 64-aligned): the router's
    logits, the pairs' weights, ids and slots, the expert offsets, then the pairs' x rows, gate/up
    rows, activations and down rows, then a quantized linear's x codes (for the wider of H and I)."""
    pairs = dims.mul(tokens, top_k)
    widest = max(hidden, inner)
    floats = dims.add(dims.mul(tokens, experts), dims.mul(pairs, 1 + hidden + inner * (2 if gated else 1) + inner
                                                          + hidden))
    total = dims.add(dims.mul(floats, 4), dims.mul(pairs, 16))
    total = dims.add(total, (2 * experts + 1) * 8)
    quantized = dims.add(dims.mul(pairs, _round_up(widest, ALIGN)), dims.mul(pairs, (widest // 32) * 8))
    return dims.add(dims.add(total, quantized), 11 * ALIGN)


def _itemsize(dtype: str) -> int:
    return np.dtype(numpy_dtype(dtype)).itemsize


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def lower_graph(graph: Graph, name: str, weights: WeightTable, tiles, chunk: int,
                sites: SiteTable | None = None, exact: bool = False) -> Lowered:
    return FunctionLowering(graph, name, weights, tiles, chunk, sites, exact).run()
