"""Lower an optimised step graph (``llmc.abi``) to a launch plan: the kernels one step runs, in order.

A plan is data (JSON in the artifact), so the launcher needs no code generation at load time::

    {"arena_bytes": int, "tile_rows": int, "steps": [{"kernel": key, "grid": [[dim, divisor], x3], "args": [...]}]}

Each argument is ``["p", base, byte_offset]`` (a device pointer: ``arena``, ``out``, a batch
input ``tokens``, ``positions``, ``seq_index``, ``block_tables``, ``logit_rows``, the prefill
attention's ``tiles``, weight ``w<i>`` or pool ``c<i>``), ``["i", dim]`` (an i32) or ``["f", value]``
(an f32), where dims are symbolic in the step's ``seq``, ``rows``, ``seqs``, ``max_blocks``,
``blocks`` and ``tiles`` (the prefill attention tiles the launcher cuts, ``tile_rows`` tokens at
most) and evaluated per call. ``kernels`` maps each key to the Triton function, its arguments'
names and types in order, and the constexprs and launch options it is compiled with.

One graph gives three plans (``PLANS``): ``step`` takes any batch; ``decode`` (one sequence, one
token) and ``decode_batch`` (one token of each of several sequences) use the flash-decoding
kernels, and the first runs its linears as GEMVs; the launcher captures the decode plans as CUDA
graphs.

Storage on the device: activations and the KV pool in the activation dtype (fp16 or bf16), logits
and small fp32 values that are not activations (RoPE angles, tables built from positions) in fp32,
booleans as int8. View ops make views (targets/views.py); the target never rewrites the graph.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from llmc import dims
from llmc.errors import LlmcError
from llmc.ir import Graph, Node, numpy_dtype
from llmc.ops import MOE_ACT_CODES, OPS
from llmc.quant import parse_scheme

from ..arena import plan_arena
from ..lowering import BATCH_INPUTS, GraphLowering, f16_weight
from ..views import View
from .build import KERNELS
from .elementwise import ElementwiseError, body, compute_type, kernel_source, literal

ALIGN = 256
POINTER_TYPES = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16", "i64": "*i64", "i32": "*i32", "i8": "*i8",
                 "u8": "*u8"}
# Ops whose f32 results are activations, stored in the activation dtype.
ACTIVATIONS = {"linear", "qlinear", "embedding", "qembedding", "rms_norm", "layer_norm", "add_norm", "attention",
               "rope", "swiglu", "geglu", "moe", "qmoe"}
MAX_NORM_WIDTH = 16384
MOE_BLOCK_M = 16                                  # slots of one expert's block in the moe kernels (tl.dot's least)
POOL_INPUTS = {"k_cache": 0, "v_cache": 1}        # the float KV pool's tensors, c0 and c1 on the device


@dataclass(frozen=True)
class PlanKind:
    """How one plan of the step graph is lowered: with the flash-decoding kernels (every token is
    its own sequence's only one) or the prefill tiles, and ``tokens`` fixed (1: GEMV linears) or
    symbolic up to the arena's size."""
    decode: bool
    tokens: int | None


PLANS = {"step": PlanKind(False, None), "decode": PlanKind(True, 1), "decode_batch": PlanKind(True, None)}


class LoweringError(LlmcError):
    """A graph the cuda target cannot generate a plan for."""


@dataclass
class KernelTable:
    """The kernel instances the plans launch: key -> what to compile, and the Triton source of
    every module they come from ("kernels" is kernels.py; the others are generated)."""
    entries: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=lambda: {"kernels": KERNELS.read_text()})

    def add(self, module: str, function: str, arguments: list, constexprs: dict, options: dict) -> str:
        entry = {"module": module, "function": function, "arguments": arguments, "constexprs": constexprs,
                 "options": options}
        digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:10]
        key = f"{'elementwise' if module != 'kernels' else function}_{digest}"
        self.entries[key] = entry
        return key


@dataclass
class WeightTable:
    """The weights the plans read, in order, with the dtype each is stored in on the device."""
    names: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)

    def index(self, name: str, dtype: str) -> int:
        if name not in self.names:
            self.names.append(name)
            self.dtypes.append(dtype)
        return self.names.index(name)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(int(n), 1) - 1).bit_length())


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bf16" else np.dtype(numpy_dtype(dtype)).itemsize


class PlanLowering(GraphLowering):
    error = LoweringError
    target = "cuda"
    fallback = "cpu"

    def __init__(self, graph: Graph, kernels: KernelTable, weights: WeightTable, tuning: dict, act: str,
                 kind: PlanKind):
        super().__init__(graph)
        self.kernels = kernels
        self.weights = weights
        self.tuning = tuning
        self.act = act
        self.kind = kind
        self.steps: list[dict] = []
        self.weight_dtypes = self._weight_storage(graph)

    # -- driver ----------------------------------------------------------------------------

    def run(self, most_tokens: int) -> dict:
        """The plan, its arena sized for steps of up to ``most_tokens`` tokens (and logit rows)."""
        self.walk(soft_errors=(ElementwiseError,))
        tokens = self.kind.tokens or most_tokens
        arena = plan_arena(self.buffers, {"seq": tokens, "rows": tokens}, ALIGN)
        return {"arena_bytes": arena, "tile_rows": self.tuning["attn_prefill"]["BLOCK_M"],
                "steps": [self._resolve(step) for step in self.steps]}

    def operands(self, node: Node) -> tuple[Node, ...]:
        """As for every target, and an embedding reads an f16 table directly too."""
        if node.op == "embedding" and f16_weight(node.inputs[0]) is not None:
            return (f16_weight(node.inputs[0]),) + node.inputs[1:]
        return super().operands(node)

    def _weight_storage(self, graph: Graph) -> dict[str, str]:
        """Device dtype per weight: f32 matrices that only linears, embeddings and experts read are
        stored in the activation dtype (what the tensor cores take); other f32 weights (a router
        among them) stay fp32."""
        readers: dict[str, set[str]] = {}
        for node in graph.nodes():
            for slot, i in enumerate(node.inputs):
                if i.op == "weight":
                    matrix = (node.op == "linear" and slot == 1) or (node.op == "embedding" and slot == 0) \
                        or (node.op == "moe" and slot >= 2)
                    readers.setdefault(i.attrs["name"], set()).add("matrix" if matrix else "other")
        out = {}
        for node in graph.nodes():
            if node.op == "weight":
                name, dtype = node.attrs["name"], node.type.dtype
                out[name] = self.act if dtype == "f32" and readers.get(name) == {"matrix"} else self._storage(dtype)
        return out

    def _storage(self, dtype: str, activation: bool = False) -> str:
        if dtype == "bool":
            return "i8"
        if dtype == "f64":
            raise LoweringError("the cuda target has no fp64 storage; build with --target cpu")
        return self.act if activation and dtype == "f32" else dtype

    # -- buffers -----------------------------------------------------------------------------

    def alloc(self, dtype: str, shape, node: Node | None = None) -> View:
        if node is not None and id(node) == self.out_node:
            return View.of_buffer("f32", shape, "out")
        buffer = self.new_buffer(dims.mul(dims.product(shape), _itemsize(dtype)))
        return View.of_buffer(dtype, shape, f"b{buffer}", buffer)

    def copy_into(self, source: View, dest: View) -> None:
        self._elementwise(dest, [source], lambda ops: ([], ops[0][0]))

    # -- launches --------------------------------------------------------------------------

    def launch(self, function: str, grid, args: list[tuple], constexprs: dict, options: dict,
               module: str = "kernels") -> None:
        """One kernel launch. ``args`` are (name, value): a View (pointer), a dim (i32) or a float."""
        arguments, encoded = [], []
        for name, value in args:
            if isinstance(value, View):
                self.use(value)
                arguments.append([name, POINTER_TYPES[value.dtype]])
                encoded.append(["p", value.base, dims.mul(value.offset, _itemsize(value.dtype))])
            elif isinstance(value, float):
                arguments.append([name, "fp32"])
                encoded.append(["f", value])
            else:
                arguments.append([name, "i32"])
                encoded.append(["i", dims.canonical(value) if isinstance(value, str) else int(value)])
        key = self.kernels.add(module, function, arguments, constexprs, options)
        grid = [list(g) if isinstance(g, tuple) else [g, 1] for g in grid] + [[1, 1]] * (3 - len(grid))
        self.steps.append({"kernel": key, "grid": grid, "args": encoded})

    def _resolve(self, step: dict) -> dict:
        """Arena buffers b<k> become offsets into the one arena, now that the plan has placed them."""
        args = []
        for arg in step["args"]:
            if arg[0] == "p" and arg[1][0] == "b" and arg[1][1:].isdigit():
                arg = ["p", "arena", dims.add(self.buffers[int(arg[1][1:])].offset, arg[2])]
            args.append(arg)
        return {**step, "args": args}

    def _options(self, kind: str) -> dict:
        tune = self.tuning[kind]
        return {"num_warps": tune["num_warps"], "num_stages": tune.get("num_stages", 1)}

    # -- the ops -----------------------------------------------------------------------------

    def lower(self, node: Node):
        op, a, t = node.op, node.attrs, node.type
        if op == "input":
            return self._input(node)
        if op == "weight":
            dtype = self.weight_dtypes[a["name"]]
            return View.of_buffer(dtype, t.shape, f"w{self.weights.index(a['name'], dtype)}")
        if op in ("const", "full"):
            return View.scalar(t.dtype, literal(a["value"], t.dtype), t.shape if op == "full" else ())
        if op == "arange":
            if not isinstance(a["start"], int):
                raise LoweringError(f"arange from {a['start']} is not supported by the cuda target")
            out = self.alloc(self._storage(t.dtype), t.shape, node)
            self._elementwise(out, [], lambda ops: ([], f"({a['start']} + {a['step']} * i).to({compute_type(t.dtype)})"))
            return out
        view = self.lower_view(node)
        if view is not None:
            return view
        if op == "concat":
            parts = [self.read(i) for i in node.inputs]
            out = self.alloc(self._storage(t.dtype, any(p.dtype == self.act for p in parts)), t.shape, node)
            return self.concat(node, out, parts)
        if op in ("swiglu", "geglu") or (op in OPS and OPS[op].kind == "elementwise"):
            return self._node_elementwise(node)
        return self.kernel_op(node)

    def _input(self, node: Node) -> View:
        name, t = node.attrs["name"], node.type
        if name in BATCH_INPUTS:
            return View.of_buffer("i64", t.shape, name)
        if name in POOL_INPUTS and t.dtype == "f32":
            return View.of_buffer(self.act, t.shape, f"c{POOL_INPUTS[name]}")
        if name in POOL_INPUTS or name in ("k_scale", "v_scale"):
            raise LoweringError(f"the cuda target keeps the KV pool in {self.act}, not {t.dtype}; build with --kv f32")
        raise LoweringError(f"graph input {name!r} is not one of the step's {', '.join(BATCH_INPUTS)} or its KV pool")

    # -- elementwise -----------------------------------------------------------------------

    def _node_elementwise(self, node: Node) -> View:
        inputs = [self.read(i) for i in node.inputs]
        activation = any(v.literal is None and v.dtype == self.act for v in inputs) or node.op in ACTIVATIONS
        out = self.alloc(self._storage(node.type.dtype, activation), node.type.shape, node)
        ir_types = [i.type.dtype for i in node.inputs]
        self._elementwise(out, inputs, lambda ops: body(node.op, node.attrs, ops, node.type.dtype), ir_types)
        return out

    def _elementwise(self, out: View, inputs: list[View], make_body, ir_types: list[str] | None = None) -> None:
        """out = body(inputs) by a generated kernel. ``make_body(operands)`` gets (expression, IR
        dtype) per input and returns (statements, result expression)."""
        ir_types = ir_types or [_ir_of(v.dtype) for v in inputs]
        shape = out.shape
        views = [v.expand(shape) if v.shape != shape else v for v in inputs]
        pointers = [k for k, v in enumerate(views) if v.literal is None]
        operands = [(f"a{pointers.index(k)}", ir_types[k]) if v.literal is None else (v.literal, ir_types[k])
                    for k, v in enumerate(views)]
        statements, result = make_body(operands)
        name, source = kernel_source(statements, result, [(views[k].dtype, ir_types[k]) for k in pointers])
        self.kernels.sources[name] = source
        lead, inner, strides = _collapse(shape, [out.strides] + [views[k].strides for k in pointers])
        rows = dims.product(lead)
        tune = self.tuning["elementwise"]
        block = tune["BLOCK"] if not isinstance(inner, int) else min(tune["BLOCK"], _pow2(inner, 32))
        args: list[tuple] = [("out", out)] + [(f"os{a}", s) for a, s in enumerate(strides[0])]
        for index, k in enumerate(pointers):
            args += [(f"in{index}", views[k])] + [(f"s{index}_{a}", s) for a, s in enumerate(strides[1 + index])]
        args += [("D1", lead[1]), ("D2", lead[2]), ("I", inner)]
        self.launch(name, [rows, (inner, block)], args, {"BLOCK": block}, self._options("elementwise"), module=name)

    # -- linear algebra ---------------------------------------------------------------------

    def _gemv(self, rows) -> bool:
        """One row: a GEMV. In the one-token plan, rows counted in tokens or logit rows are one."""
        one = {"seq": 1, "rows": 1}
        return rows == 1 or (self.kind.tokens == 1 and dims.symbols(rows) <= set(one) and dims.evaluate(rows, one) == 1)

    def _matmul(self, node: Node, x: View, m, ldx, parts: list[View], mode: int, group: int, bias) -> View:
        n, k = parts[0].shape[0], node.inputs[0].type.shape[-1]
        out = self.alloc(self.act, node.type.shape, node)
        gemv = self._gemv(m)
        tune = self.tuning["gemv" if gemv else "gemm"]
        w, scales, mins = (parts + [parts[0]] * 2)[:3]
        if mode == 8:
            mins = scales
        bias_view = self.contiguous(self.read(bias)) if bias is not None else w
        block_m = 1 if gemv else tune["BLOCK_M"]
        grid = [(n, tune["BLOCK_N"]), m if gemv else (m, block_m)]
        self.launch("linear", grid, [("x", x), ("ldx", ldx), ("w", w), ("scales", scales), ("mins", mins),
                                     ("bias", bias_view), ("out", out), ("ldo", n), ("M", m), ("N", n), ("K", k)],
                    {"MODE": mode, "GROUP": group, "HAS_BIAS": bias is not None, "BLOCK_M": block_m,
                     "BLOCK_N": tune["BLOCK_N"], "BLOCK_K": tune["BLOCK_K"]}, self._options("gemv" if gemv else "gemm"))
        return out

    def _linear(self, node: Node) -> View:
        x, m, ldx = self.rows(self.read(node.inputs[0]))
        f16 = f16_weight(node.inputs[1])
        w = self.read(f16) if f16 is not None else self.contiguous(self.read(node.inputs[1]))
        return self._matmul(node, x, m, ldx, [w], 0, 1, node.inputs[2] if len(node.inputs) > 2 else None)

    def _qlinear(self, node: Node) -> View:
        scheme = parse_scheme(node.attrs["scheme"])
        count = len(scheme.parts)
        x, m, ldx = self.rows(self.read(node.inputs[0]))
        parts = [self.contiguous(self.read(i)) for i in node.inputs[1:1 + count]]
        bias = node.inputs[1 + count] if len(node.inputs) > 1 + count else None
        return self._matmul(node, x, m, ldx, parts, scheme.bits, scheme.group, bias)

    def _moe(self, node: Node) -> View:
        f16 = [f16_weight(i) for i in node.inputs[2:]]
        stacks = [[self.read(f) if f is not None else self.contiguous(self.read(i))]
                  for f, i in zip(f16, node.inputs[2:])]
        return self._experts(node, stacks, 0, 1, node.inputs[3].type.shape[1])

    def _qmoe(self, node: Node) -> View:
        scheme = parse_scheme(node.attrs["scheme"])
        count = len(scheme.parts)
        stacks = [[self.contiguous(self.read(i)) for i in node.inputs[at:at + count]] for at in (2, 2 + count)]
        return self._experts(node, stacks, scheme.bits, scheme.group, scheme.cols(node.inputs[-count].type.shape[1]))

    def _experts(self, node: Node, stacks: list[list[View]], mode: int, group: int, inner: int) -> View:
        """kernels.py's five moe launches: route, sort the pairs into expert blocks of BLOCK_M,
        gate/up with the activation, down, and the weighted sum of each token's choices."""
        a = node.attrs
        x, tokens, ldx = self.rows(self.read(node.inputs[0]))
        router = self.contiguous(self.read(node.inputs[1]))
        experts, hidden = router.shape
        top_k, block_m = a["top_k"], MOE_BLOCK_M
        pairs = dims.mul(tokens, top_k)
        used_slots = dims.add(pairs, experts * (block_m - 1))     # ceil(this / block_m) blocks at most
        slots_bound, blocks_bound = dims.add(pairs, experts * block_m), dims.add(pairs, experts)
        ids, weights, slots = self.alloc("i32", (pairs,)), self.alloc("f32", (pairs,)), self.alloc("i32", (pairs,))
        rows, block_experts = self.alloc("i32", (slots_bound,)), self.alloc("i32", (blocks_bound,))
        act_rows, out_rows = self.alloc(self.act, (slots_bound, inner)), self.alloc(self.act, (slots_bound, hidden))
        out = self.alloc(self.act, node.type.shape, node)
        self.launch("moe_route", [tokens], [("x", x), ("ldx", ldx), ("router", router), ("ids", ids),
                                            ("weights", weights), ("H", hidden), ("E", experts)],
                    {"TOP_K": top_k, "NORMALIZE": bool(a["normalize"]), "BLOCK_E": _pow2(experts),
                     "BLOCK_H": min(_pow2(hidden), max(16, 4096 // _pow2(experts)))},   # a tile of 4096 at most
                    {"num_warps": 4, "num_stages": 1})
        self.launch("moe_sort", [1], [("ids", ids), ("slots", slots), ("rows", rows), ("block_experts", block_experts),
                                      ("P", pairs), ("E", experts), ("SLOTS", slots_bound), ("BLOCKS", blocks_bound)],
                    {"BLOCK_M": block_m, "BLOCK_P": 1024}, {"num_warps": 4, "num_stages": 1})
        tune, options = self.tuning["gemm"], self._options("gemm")
        (w, scales, mins), (dw, dscales, dmins) = [(parts + [parts[0]] * 2)[:3] for parts in stacks]
        if mode == 8:
            mins, dmins = scales, dscales
        shared = {"MODE": mode, "GROUP": group, "BLOCK_M": block_m, "BLOCK_N": tune["BLOCK_N"],
                  "BLOCK_K": tune["BLOCK_K"]}
        self.launch("moe_up", [(inner, tune["BLOCK_N"]), (used_slots, block_m)],
                    [("x", x), ("ldx", ldx), ("rows", rows), ("block_experts", block_experts), ("w", w),
                     ("scales", scales), ("mins", mins), ("out", act_rows), ("H", hidden), ("I", inner)],
                    {"TOP_K": top_k, "GATED": bool(a["gated"]), "ACT": MOE_ACT_CODES[a["act"]], **shared}, options)
        self.launch("moe_down", [(hidden, tune["BLOCK_N"]), (used_slots, block_m)],
                    [("a", act_rows), ("rows", rows), ("block_experts", block_experts), ("w", dw),
                     ("scales", dscales), ("mins", dmins), ("out", out_rows), ("H", hidden), ("I", inner)],
                    shared, options)
        block = min(1024, _pow2(hidden))
        self.launch("moe_combine", [tokens, (hidden, block)],
                    [("o", out_rows), ("slots", slots), ("weights", weights), ("out", out), ("H", hidden)],
                    {"TOP_K": top_k, "BLOCK": block}, {"num_warps": 4, "num_stages": 1})
        return out

    def _embedding(self, node: Node) -> View:
        f16 = f16_weight(node.inputs[0])
        table = self.read(f16) if f16 is not None else self.contiguous(self.read(node.inputs[0]))
        return self._lookup(node, [table], self.contiguous(self.read(node.inputs[1])), 0, 1)

    def _qembedding(self, node: Node) -> View:
        scheme = parse_scheme(node.attrs["scheme"])
        count = len(scheme.parts)
        parts = [self.contiguous(self.read(i)) for i in node.inputs[:count]]
        return self._lookup(node, parts, self.contiguous(self.read(node.inputs[count])), scheme.bits, scheme.group)

    def _lookup(self, node: Node, parts: list[View], ids: View, mode: int, group: int) -> View:
        width = node.type.shape[-1]
        out = self.alloc(self.act, node.type.shape, node)
        table, scales, mins = (parts + [parts[0]] * 2)[:3]
        if mode == 8:
            mins = scales
        block = min(1024, _pow2(width))
        self.launch("embedding", [dims.product(ids.shape), (width, block)],
                    [("table", table), ("scales", scales), ("mins", mins), ("ids", ids), ("out", out),
                     ("WIDTH", width)], {"MODE": mode, "GROUP": group, "BLOCK": block}, {"num_warps": 4, "num_stages": 1})
        return out

    # -- norms and RoPE ---------------------------------------------------------------------

    def _norm(self, node: Node, kind: int, x: View, ldx, rows, residual: tuple | None, params) -> tuple[View, View]:
        width = x.shape[-1]
        if _pow2(width) > MAX_NORM_WIDTH:
            raise LoweringError(f"rows of {width} values exceed the cuda norm kernel's {MAX_NORM_WIDTH}")
        shape = node.type.types[0].shape if residual else node.type.shape
        total = self.alloc(self.act, shape) if residual else x
        normed = self.alloc(self.act, shape, None if residual else node)
        weights = [self.contiguous(self.read(p)) for p in params]
        w, b = (weights + [x, x])[:2]
        r, ldr = residual if residual else (x, ldx)
        self.launch("norm", [rows], [("x", x), ("ldx", ldx), ("r", r), ("ldr", ldr), ("w", w), ("b", b),
                                     ("total", total), ("normed", normed), ("N", width),
                                     ("eps", float(node.attrs["eps"]))],
                    {"KIND": kind, "ADD": residual is not None, "HAS_W": len(weights) > 0, "HAS_B": len(weights) > 1,
                     "BLOCK": _pow2(width)}, {"num_warps": 4 if width <= 4096 else 8, "num_stages": 1})
        return total, normed

    def _rms_norm(self, node: Node) -> View:
        x, rows, ldx = self.rows(self.read(node.inputs[0]))
        return self._norm(node, 0, x, ldx, rows, None, node.inputs[1:])[1]

    def _layer_norm(self, node: Node) -> View:
        x, rows, ldx = self.rows(self.read(node.inputs[0]))
        return self._norm(node, 1, x, ldx, rows, None, node.inputs[1:])[1]

    def _add_norm(self, node: Node) -> tuple[View, View]:
        x, rows, ldx = self.rows(self.read(node.inputs[0]))
        r, _, ldr = self.rows(self.read(node.inputs[1]))
        return self._norm(node, 0 if node.attrs["norm"] == "rms" else 1, x, ldx, rows, (r, ldr), node.inputs[2:])

    def _rope(self, node: Node) -> View:
        x, cos, sin = (self.read(i) for i in node.inputs)
        shape = node.type.shape
        if len(shape) > 4:
            raise LoweringError(f"rope over rank {len(shape)} is not supported by the cuda target")
        if x.strides[-1] != 1:
            x = self.contiguous(x)
        cos, sin = (self.contiguous(v) if v.literal is not None else v.expand(shape) for v in (cos, sin))
        pad = 4 - len(shape)
        full = (1,) * pad + tuple(shape)

        def strides(view: View):
            return (0,) * pad + tuple(view.strides)

        xs, cs, ss = strides(x), strides(cos), strides(sin)
        out = self.alloc(self.act, shape, node)
        rows = dims.product(full[:3])
        self.launch("rope", [rows], [("x", x), ("xs0", xs[0]), ("xs1", xs[1]), ("xs2", xs[2]),
                                     ("c", cos), ("cs0", cs[0]), ("cs1", cs[1]), ("cs2", cs[2]), ("cs3", cs[3]),
                                     ("s", sin), ("ss0", ss[0]), ("ss1", ss[1]), ("ss2", ss[2]), ("ss3", ss[3]),
                                     ("out", out), ("D1", full[1]), ("D2", full[2]), ("D", full[3])],
                    {"BLOCK": _pow2(full[3]), "INTERLEAVED": bool(node.attrs.get("interleaved"))},
                    {"num_warps": 1, "num_stages": 1})
        return out

    # -- attention ---------------------------------------------------------------------------

    def _attention(self, node: Node) -> View:
        a = node.attrs
        q, k, v = (self.heads(self.read(i)) for i in node.inputs[:3])
        k_pool, v_pool = (self.read(i) for i in node.inputs[3:5])
        positions, seq_index, tables = (self.read(i) for i in node.inputs[5:8])
        layers, blocks, heads_kv, block_size, head_dim = k_pool.shape
        heads, seq = q.shape[1], q.shape[2]
        kc, vc = (self._pool_layer(pool, a["layer"]) for pool in (k_pool, v_pool))
        block_d = _pow2(head_dim)
        paging = [("positions", positions), ("seq_index", seq_index), ("tables", tables),
                  ("MAX_BLOCKS", "max_blocks"), ("HK", heads_kv)]
        self.launch("kv_write", [seq, heads_kv],
                    [("k", k), ("k_sh", k.strides[1]), ("k_ss", k.strides[2]), ("v", v), ("v_sh", v.strides[1]),
                     ("v_ss", v.strides[2]), ("kc", kc), ("vc", vc)] + paging + [("D", head_dim)],
                    {"KV_BLOCK": block_size, "BLOCK_D": block_d}, {"num_warps": 1, "num_stages": 1})
        # The result is laid out [seq, heads, head_dim], what the next permute + reshape reads.
        raw = self.alloc(self.act, (seq, heads, head_dim))
        out = raw.reshape((1, seq, heads, head_dim)).permute((0, 2, 1, 3))
        common = paging + [("GROUP", heads // heads_kv), ("D", head_dim), ("scale", float(a["scale"])),
                           ("WINDOW", int(a["window"] or 0))]
        capped = {"SOFTCAP": float(a.get("softcap", 0.0))}     # Gemma 2's soft cap; 0: none
        if self.kind.decode:
            self._attend_decode(q, kc, vc, raw, common, block_size, block_d, capped)
        else:
            tune = self.tuning["attn_prefill"]
            tiles = View.of_buffer("i32", ("tiles", 2), "tiles")
            self.launch("attn_prefill", [("tiles", 1), heads],
                        [("q", q), ("q_sh", q.strides[1]), ("q_ss", q.strides[2]), ("kc", kc), ("vc", vc),
                         ("out", raw), ("o_sh", head_dim), ("o_ss", heads * head_dim), ("tiles", tiles)] + common,
                        {"KV_BLOCK": block_size, "BLOCK_M": tune["BLOCK_M"], "BLOCK_N": tune["BLOCK_N"],
                         "BLOCK_D": block_d, **capped}, self._options("attn_prefill"))
        return out

    def _pool_layer(self, pool: View, layer: int) -> View:
        """One layer of a KV pool [layers, blocks, kv_heads, block_size, head_dim]: what the
        attention kernels address (``blocks`` is known only when the pool is allocated)."""
        shape = pool.shape[1:]
        at = dims.mul(layer, dims.product(shape))
        return View(self.act, shape, pool.strides[1:], pool.base, at)

    def _attend_decode(self, q: View, kc: View, vc: View, raw: View, common: list, block_size: int,
                       block_d: int, capped: dict) -> None:
        """Flash-decoding: the splits of each (token, key/value head), then their merge per query head."""
        seq, heads = q.shape[2], q.shape[1]
        heads_kv = kc.shape[1]
        tune = self.tuning["attn_decode"]
        splits = tune["SPLITS"]
        part = self.alloc("f32", (dims.mul(seq, heads * splits * (block_d + 2)),))
        self.launch("attn_decode", [seq, heads_kv, splits],
                    [("q", q), ("q_sh", q.strides[1]), ("q_ss", q.strides[2]), ("kc", kc), ("vc", vc),
                     ("part", part)] + common,
                    {"KV_BLOCK": block_size, "SPLITS": splits, "BLOCK_H": _pow2(heads // heads_kv),
                     "BLOCK_N": tune["BLOCK_N"], "BLOCK_D": block_d, **capped}, self._options("attn_decode"))
        head_dim = kc.shape[3]
        self.launch("attn_merge", [seq, heads], [("part", part), ("out", raw), ("o_ss", heads * head_dim),
                                                 ("o_sh", head_dim), ("HQ", heads), ("D", head_dim)],
                    {"SPLITS": splits, "BLOCK_D": block_d}, {"num_warps": 1, "num_stages": 1})

    def _attention_kv8(self, node: Node) -> View:
        raise LoweringError("the cuda target has no int8 KV pool yet; build with --kv f32 (the pool is then "
                            "stored in the activation dtype on the GPU)")


def _ir_of(storage: str) -> str:
    return "f32" if storage in ("f16", "bf16") else storage


def _collapse(shape, all_strides) -> tuple[tuple, object, list[tuple]]:
    """(lead sizes x3, inner size, per view (strides of the 3 lead axes + inner)) for the kernels'
    rank-4 indexing: axes of size 1 dropped, adjacent axes merged where every view steps through
    them as one, and the rest padded in front."""
    axes = [a for a, size in enumerate(shape) if size != 1]
    sizes = [shape[a] for a in axes]
    strides = [[s[a] for a in axes] for s in all_strides]
    while len(sizes) > 4:
        for a in range(len(sizes) - 2, -1, -1):
            if all(s[a] == dims.mul(s[a + 1], sizes[a + 1]) for s in strides):
                sizes[a:a + 2] = [dims.mul(sizes[a], sizes[a + 1])]
                for s in strides:
                    s[a:a + 2] = [s[a + 1]]
                break
        else:
            raise LoweringError(f"an elementwise op over shape {shape} needs more than 4 axes on the cuda target")
    pad = 4 - len(sizes)
    sizes = [1] * pad + sizes
    strides = [tuple([0] * pad + s) for s in strides]
    return tuple(sizes[:3]), sizes[3], strides


def lower_graph(graph: Graph, kernels: KernelTable, weights: WeightTable, tuning: dict, act: str, kind: PlanKind,
                most_tokens: int) -> dict:
    """The plan of ``kind`` for the step graph, for steps of up to ``most_tokens`` tokens."""
    return PlanLowering(graph, kernels, weights, tuning, act, kind).run(most_tokens)
