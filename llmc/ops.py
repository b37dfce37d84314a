"""The op set. Every op has a one-line meaning, an arity, its attributes, a shape/dtype rule and a
numpy reference; the reference interpreter is nothing more than these references run in order.

Conventions: binary elementwise ops take inputs of one dtype and broadcast numpy-style (scalars
are 0-d ``const`` nodes of the other input's dtype); axes are non-negative; a dimension held in
an attribute (listed in ``dim_attrs``) may be symbolic, and the interpreter binds it before the
reference runs. ``llmc.ops.describe()`` prints the whole table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from llmc import dims
from llmc.dims import Dim
from llmc.types import FLOAT_DTYPES, TupleType, Type, numpy_dtype


class OpError(Exception):
    """An op applied to inputs or attributes that its rule rejects."""


Infer = Callable[[list[Type], dict], Type]
Ref = Callable[[list[np.ndarray], dict, tuple, str], np.ndarray]


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str
    doc: str
    arity: tuple[int, Optional[int]]
    attrs: tuple[str, ...]
    dim_attrs: tuple[str, ...]
    infer: Optional[Infer]      # None: the node's type is declared (graph inputs, weights)
    ref: Optional[Ref]


OPS: dict[str, OpDef] = {}


def define(name: str, kind: str, doc: str, arity, attrs=(), dim_attrs=(), *, infer=None, ref=None):
    arity = (arity, arity) if isinstance(arity, int) else arity
    OPS[name] = OpDef(name, kind, doc, arity, tuple(attrs), tuple(dim_attrs), infer, ref)


def infer(op: str, input_types: list[Type], attrs: dict) -> Type | None:
    definition = OPS.get(op)
    if definition is None:
        raise OpError(f"unknown op {op!r}")
    low, high = definition.arity
    if len(input_types) < low or (high is not None and len(input_types) > high):
        want = str(low) if low == high else f"{low}..{high if high is not None else ''}"
        raise OpError(f"{op} takes {want} inputs, got {len(input_types)}")
    missing = [a for a in definition.attrs if a not in attrs]
    if missing:
        raise OpError(f"{op} needs attributes {missing}")
    if definition.infer is None:
        return None
    return definition.infer(list(input_types), attrs)


def describe() -> str:
    """The op table, one line per op, grouped by kind."""
    lines = []
    for kind in dict.fromkeys(d.kind for d in OPS.values()):
        lines.append(f"{kind}:")
        for d in (d for d in OPS.values() if d.kind == kind):
            attrs = f" {{{', '.join(d.attrs)}}}" if d.attrs else ""
            lines.append(f"  {d.name:<12} {d.doc}{attrs}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Shape helpers

def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        column = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0}
        column.discard(1)
        if len(column) > 1:
            raise OpError(f"shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(column.pop() if column else 1)
    return tuple(out)


def _check_axis(axis: int, rank: int) -> int:
    if not isinstance(axis, int) or not 0 <= axis < rank:
        raise OpError(f"axis {axis} is out of range for rank {rank}")
    return axis


def _same_dtype(types: list[Type]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise OpError(f"inputs have different dtypes {sorted(dtypes)}")
    return dtypes.pop()


def _float(t: Type) -> Type:
    if t.dtype not in FLOAT_DTYPES:
        raise OpError(f"needs a floating-point input, got {t.dtype}")
    return t


# ---------------------------------------------------------------------------------------------
# Sources

define("input", "source", "a graph input (its type is declared)", 0, ["name"])
define("weight", "source", "a named constant tensor held in graph.weights", 0, ["name"])
define("const", "source", "a scalar (0-d) constant", 0, ["value", "dtype"],
       infer=lambda ts, a: Type(a["dtype"], ()),
       ref=lambda xs, a, shape, dt: np.array(a["value"], dtype=numpy_dtype(dt)))
define("full", "source", "a tensor of one value", 0, ["shape", "value", "dtype"], ["shape"],
       infer=lambda ts, a: Type(a["dtype"], tuple(a["shape"])),
       ref=lambda xs, a, shape, dt: np.full(shape, a["value"], dtype=numpy_dtype(dt)))


def _arange_infer(ts, a):
    start, end, step = a["start"], a["end"], a["step"]
    if step == 0:
        raise OpError("arange step must not be 0")
    if isinstance(end, int) and isinstance(start, int):
        length = max(0, -(-(end - start) // step))
    elif step == 1:
        length = dims.sub(end, start)
    else:
        raise OpError("a symbolic arange needs step 1")
    return Type(a["dtype"], (length,))


define("arange", "source", "start, start+step, ... below end", 0, ["start", "end", "step", "dtype"],
       ["start", "end"], infer=_arange_infer,
       ref=lambda xs, a, shape, dt: (a["start"] + a["step"] * np.arange(shape[0])).astype(numpy_dtype(dt)))


# ---------------------------------------------------------------------------------------------
# Elementwise

_ERF = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    # The reference favours exactness over speed: math.erf per element, in float64.
    return _ERF(x.astype(np.float64)).astype(x.dtype)


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        c = np.asarray(math.sqrt(2.0 / math.pi), dtype=x.dtype)
        return 0.5 * x * (1.0 + np.tanh(c * (x + np.asarray(0.044715, x.dtype) * x * x * x)))
    return 0.5 * x * (1.0 + _erf(x / np.asarray(math.sqrt(2.0), x.dtype)))


_UNARY = {
    "neg": ("-x", np.negative),
    "exp": ("e**x", np.exp),
    "log": ("natural logarithm", np.log),
    "sqrt": ("square root", np.sqrt),
    "rsqrt": ("1/sqrt(x)", lambda x: 1 / np.sqrt(x)),
    "reciprocal": ("1/x", lambda x: 1 / x),
    "abs": ("|x|", np.abs),
    "sin": ("sine", np.sin),
    "cos": ("cosine", np.cos),
    "tanh": ("hyperbolic tangent", np.tanh),
    "erf": ("error function", _erf),
    "sigmoid": ("1/(1+e**-x)", lambda x: 1 / (1 + np.exp(-x))),
    "silu": ("x*sigmoid(x)", lambda x: x / (1 + np.exp(-x))),
    "relu": ("max(x, 0)", lambda x: np.maximum(x, 0)),
}
def _signed(t: Type) -> Type:
    if t.dtype == "bool":
        raise OpError("needs a numeric input, got bool")
    return t


for _name, (_doc, _fn) in _UNARY.items():
    _rule = _signed if _name in ("neg", "abs") else _float
    define(_name, "elementwise", _doc, 1, infer=lambda ts, a, rule=_rule: rule(ts[0]),
           ref=lambda xs, a, shape, dt, fn=_fn: fn(xs[0]))

define("gelu", "elementwise", "Gaussian error linear unit (exact or tanh form)", 1, ["approximate"],
       infer=lambda ts, a: _float(ts[0]), ref=lambda xs, a, shape, dt: _gelu(xs[0], a["approximate"]))


def _not_infer(ts, a):
    if ts[0].dtype != "bool":
        raise OpError("not takes a bool input")
    return ts[0]


define("not", "elementwise", "logical not", 1, infer=_not_infer, ref=lambda xs, a, shape, dt: ~xs[0])
define("cast", "elementwise", "convert to another dtype", 1, ["dtype"],
       infer=lambda ts, a: Type(a["dtype"], ts[0].shape),
       ref=lambda xs, a, shape, dt: xs[0].astype(numpy_dtype(a["dtype"])))


def _binary_infer(ts, a):
    return Type(_same_dtype(ts), broadcast_shapes(ts[0].shape, ts[1].shape))


def _compare_infer(ts, a):
    _same_dtype(ts)
    return Type("bool", broadcast_shapes(ts[0].shape, ts[1].shape))


def _logical_infer(ts, a):
    if _same_dtype(ts) != "bool":
        raise OpError("logical ops take bool inputs")
    return Type("bool", broadcast_shapes(ts[0].shape, ts[1].shape))


def _divide(x, y):
    if np.issubdtype(x.dtype, np.integer):
        raise OpError("div of integers is not defined; cast to a float dtype first")
    return x / y


_BINARY = {
    "add": ("x + y", _binary_infer, np.add),
    "sub": ("x - y", _binary_infer, np.subtract),
    "mul": ("x * y", _binary_infer, np.multiply),
    "div": ("x / y (true division)", _binary_infer, _divide),
    "pow": ("x ** y", _binary_infer, np.power),
    "maximum": ("elementwise max", _binary_infer, np.maximum),
    "minimum": ("elementwise min", _binary_infer, np.minimum),
    "eq": ("x == y", _compare_infer, np.equal),
    "ne": ("x != y", _compare_infer, np.not_equal),
    "lt": ("x < y", _compare_infer, np.less),
    "le": ("x <= y", _compare_infer, np.less_equal),
    "gt": ("x > y", _compare_infer, np.greater),
    "ge": ("x >= y", _compare_infer, np.greater_equal),
    "and": ("logical and", _logical_infer, np.logical_and),
    "or": ("logical or", _logical_infer, np.logical_or),
}
for _name, (_doc, _infer, _fn) in _BINARY.items():
    define(_name, "elementwise", _doc, 2, infer=_infer,
           ref=lambda xs, a, shape, dt, fn=_fn: np.asarray(fn(xs[0], xs[1])))


def _where_infer(ts, a):
    if ts[0].dtype != "bool":
        raise OpError("where's condition must be bool")
    return Type(_same_dtype(ts[1:]), broadcast_shapes(*(t.shape for t in ts)))


define("where", "elementwise", "cond ? x : y", 3, infer=_where_infer,
       ref=lambda xs, a, shape, dt: np.where(xs[0], xs[1], xs[2]))


# ---------------------------------------------------------------------------------------------
# Reductions and scans

def _reduce_infer(ts, a):
    shape = ts[0].shape
    axes = sorted({_check_axis(x, len(shape)) for x in a["axes"]})
    if a["keepdim"]:
        out = tuple(1 if i in axes else d for i, d in enumerate(shape))
    else:
        out = tuple(d for i, d in enumerate(shape) if i not in axes)
    return Type(ts[0].dtype, out)


def _reducer(fn):
    return lambda xs, a, shape, dt: np.asarray(fn(xs[0], axis=tuple(a["axes"]), keepdims=a["keepdim"]))


define("sum", "reduce", "sum over axes", 1, ["axes", "keepdim"], infer=_reduce_infer, ref=_reducer(np.sum))
define("mean", "reduce", "mean over axes", 1, ["axes", "keepdim"], infer=_reduce_infer, ref=_reducer(np.mean))
define("max", "reduce", "maximum over axes", 1, ["axes", "keepdim"], infer=_reduce_infer, ref=_reducer(np.max))
define("min", "reduce", "minimum over axes", 1, ["axes", "keepdim"], infer=_reduce_infer, ref=_reducer(np.min))


def _argmax_infer(ts, a):
    t = _reduce_infer(ts, {"axes": [a["axis"]], "keepdim": a["keepdim"]})
    return Type("i64", t.shape)


define("argmax", "reduce", "index of the maximum along axis (first on ties)", 1, ["axis", "keepdim"],
       infer=_argmax_infer,
       ref=lambda xs, a, shape, dt: np.argmax(xs[0], axis=a["axis"], keepdims=a["keepdim"]).astype(np.int64))


def _softmax(x, axis):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _axis_float_infer(ts, a):
    _check_axis(a["axis"], ts[0].rank)
    return _float(ts[0])


define("softmax", "reduce", "exp(x)/sum(exp(x)) along axis", 1, ["axis"], infer=_axis_float_infer,
       ref=lambda xs, a, shape, dt: _softmax(xs[0], a["axis"]))
define("log_softmax", "reduce", "log of softmax along axis", 1, ["axis"], infer=_axis_float_infer,
       ref=lambda xs, a, shape, dt: _log_softmax(xs[0], a["axis"]))


def _topk_infer(ts, a):
    x = ts[0]
    axis = _check_axis(a["axis"], x.rank)
    size, k = x.shape[axis], a["k"]
    if not isinstance(k, int) or k < 1 or (isinstance(size, int) and k > size):
        raise OpError(f"topk of {k} along an axis of {size}")
    if x.dtype == "bool":
        raise OpError("topk of bool: cast to a numeric dtype first")
    shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
    return TupleType((Type(x.dtype, shape), Type("i64", shape)))


def topk_indices(x: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """The indices of the k largest along axis, largest first (the lower index first among equals)."""
    return np.take(np.argsort(-x, axis=axis, kind="stable"), np.arange(k), axis=axis)


def _topk_ref(xs, a, shape, dt):
    indices = topk_indices(xs[0], a["k"], a["axis"])
    return np.take_along_axis(xs[0], indices, axis=a["axis"]), indices.astype(np.int64)


define("topk", "reduce", "(values, indices) of the k largest along axis, largest first", 1, ["k", "axis"],
       infer=_topk_infer, ref=_topk_ref)


def _cumsum_infer(ts, a):
    _check_axis(a["axis"], ts[0].rank)
    if ts[0].dtype == "bool":
        raise OpError("cumsum of bool: cast to an integer dtype first")
    return ts[0]


define("cumsum", "reduce", "running sum along axis", 1, ["axis"], infer=_cumsum_infer,
       ref=lambda xs, a, shape, dt: np.cumsum(xs[0], axis=a["axis"], dtype=xs[0].dtype))


# ---------------------------------------------------------------------------------------------
# Shape and data movement

def _reshape_infer(ts, a):
    target = tuple(a["shape"])
    if dims.product(ts[0].shape) != dims.product(target):
        raise OpError(f"cannot reshape {list(ts[0].shape)} to {list(target)}")
    return Type(ts[0].dtype, target)


define("reshape", "shape", "same elements, new shape", 1, ["shape"], ["shape"], infer=_reshape_infer,
       ref=lambda xs, a, shape, dt: xs[0].reshape(shape))


def _permute_infer(ts, a):
    perm = list(a["perm"])
    if sorted(perm) != list(range(ts[0].rank)):
        raise OpError(f"perm {perm} is not a permutation of {ts[0].rank} axes")
    return Type(ts[0].dtype, tuple(ts[0].shape[p] for p in perm))


define("permute", "shape", "reorder axes", 1, ["perm"], infer=_permute_infer,
       ref=lambda xs, a, shape, dt: np.transpose(xs[0], a["perm"]))


def _expand_infer(ts, a):
    target = tuple(a["shape"])
    src = ts[0].shape
    if len(target) < len(src):
        raise OpError(f"cannot expand {list(src)} to fewer axes {list(target)}")
    for s, t in zip(src[::-1], target[::-1]):
        if s != 1 and s != t:
            raise OpError(f"cannot expand {list(src)} to {list(target)}")
    return Type(ts[0].dtype, target)


define("expand", "shape", "broadcast size-1 axes to a larger shape", 1, ["shape"], ["shape"],
       infer=_expand_infer, ref=lambda xs, a, shape, dt: np.broadcast_to(xs[0], shape))


def _slice_infer(ts, a):
    shape = ts[0].shape
    axis = _check_axis(a["axis"], len(shape))
    start, end, step = a["start"], a["end"], a["step"]
    if not isinstance(step, int) or step < 1:
        raise OpError("slice step must be a positive int")
    if isinstance(start, int) and isinstance(end, int):
        if start < 0 or end < start or (isinstance(shape[axis], int) and end > shape[axis]):
            raise OpError(f"slice [{start}:{end}] is outside axis {axis} of size {shape[axis]}")
        length = -(-(end - start) // step)
    elif step == 1:
        length = dims.sub(end, start)
    else:
        length = dims.exact_div(dims.sub(dims.add(end, step - 1), start), step)
    return Type(ts[0].dtype, shape[:axis] + (length,) + shape[axis + 1:])


def _slice_ref(xs, a, shape, dt):
    index = [slice(None)] * xs[0].ndim
    index[a["axis"]] = slice(a["start"], a["end"], a["step"])
    return xs[0][tuple(index)]


define("slice", "shape", "x[start:end:step] along axis", 1, ["axis", "start", "end", "step"],
       ["start", "end"], infer=_slice_infer, ref=_slice_ref)


def _concat_infer(ts, a):
    dtype = _same_dtype(ts)
    rank = ts[0].rank
    axis = _check_axis(a["axis"], rank)
    total: Dim = 0
    for t in ts:
        if t.rank != rank or any(t.shape[i] != ts[0].shape[i] for i in range(rank) if i != axis):
            raise OpError(f"cannot concatenate {', '.join(str(t) for t in ts)} along axis {axis}")
        total = dims.add(total, t.shape[axis])
    return Type(dtype, ts[0].shape[:axis] + (total,) + ts[0].shape[axis + 1:])


define("concat", "shape", "join inputs along axis", (1, None), ["axis"], infer=_concat_infer,
       ref=lambda xs, a, shape, dt: np.concatenate(xs, axis=a["axis"]))


def _index_infer(ts, a):
    x, indices = ts[0], ts[1:]
    axes = list(a["axes"])
    if len(axes) != len(indices) or sorted(set(axes)) != axes:
        raise OpError(f"index needs one index tensor per axis in increasing order, got axes {axes}")
    for axis in axes:
        _check_axis(axis, x.rank)
    if any(t.dtype not in ("i64", "i32") for t in indices):
        raise OpError("index tensors must be i64 or i32")
    batch = broadcast_shapes(*(t.shape for t in indices))
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    if axes == list(range(axes[0], axes[0] + len(axes))):  # adjacent: the result stays in place
        out = x.shape[:axes[0]] + batch + x.shape[axes[-1] + 1:]
    else:
        out = batch + tuple(rest)
    return Type(x.dtype, tuple(out))


def _index_ref(xs, a, shape, dt):
    key: list[Any] = [slice(None)] * xs[0].ndim
    for axis, idx in zip(a["axes"], xs[1:]):
        key[axis] = idx
    return xs[0][tuple(key)]


define("index", "shape", "x[..., idx, ...]: gather with index tensors on axes", (2, None), ["axes"],
       infer=_index_infer, ref=_index_ref)


def _embedding_infer(ts, a):
    table, ids = ts
    if table.rank != 2 or ids.dtype not in ("i64", "i32"):
        raise OpError("embedding takes a [vocab, dim] table and integer ids")
    return Type(table.dtype, ids.shape + (table.shape[1],))


define("embedding", "shape", "rows of table picked by ids", 2, infer=_embedding_infer,
       ref=lambda xs, a, shape, dt: xs[0][xs[1]])


# ---------------------------------------------------------------------------------------------
# Linear algebra and neural-network ops

def _matmul_infer(ts, a):
    x, y = ts
    dtype = _same_dtype(ts)
    if x.rank == 0 or y.rank == 0:
        raise OpError("matmul needs inputs of rank >= 1")
    xs = x.shape if x.rank > 1 else (1,) + x.shape
    ys = y.shape if y.rank > 1 else y.shape + (1,)
    if xs[-1] != ys[-2]:
        raise OpError(f"matmul of {x} and {y}: inner dimensions differ")
    out = broadcast_shapes(xs[:-2], ys[:-2]) + (xs[-2], ys[-1])
    if x.rank == 1:
        out = out[:-2] + out[-1:]
    if y.rank == 1:
        out = out[:-1]
    return Type(dtype, out)


define("matmul", "linalg", "batched matrix product (numpy matmul rules)", 2, infer=_matmul_infer,
       ref=lambda xs, a, shape, dt: np.matmul(xs[0], xs[1]))


def _linear_infer(ts, a):
    x, w = ts[0], ts[1]
    _same_dtype(ts)
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise OpError(f"linear of {x} with weight {w}: the weight must be [out, {x.shape[-1] if x.rank else '?'}]")
    if len(ts) == 3 and ts[2].shape != (w.shape[0],):
        raise OpError(f"linear bias {ts[2]} must be [{w.shape[0]}]")
    return Type(x.dtype, x.shape[:-1] + (w.shape[0],))


def _linear_ref(xs, a, shape, dt):
    y = np.matmul(xs[0], xs[1].T)
    return y + xs[2] if len(xs) == 3 else y


define("linear", "linalg", "x @ w.T (+ b)", (2, 3), infer=_linear_infer, ref=_linear_ref)


def _layer_norm_infer(ts, a):
    x = _float(ts[0])
    for t in ts[1:]:
        if t.shape != (x.shape[-1],):
            raise OpError(f"layer_norm parameter {t} must be [{x.shape[-1]}]")
    return x


def _layer_norm_ref(xs, a, shape, dt):
    x = xs[0]
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    y = centered / np.sqrt(var + np.asarray(a["eps"], x.dtype))
    if len(xs) > 1:
        y = y * xs[1]
    if len(xs) > 2:
        y = y + xs[2]
    return y


define("layer_norm", "nn", "(x-mean)/sqrt(var+eps) over the last axis (* w + b)", (1, 3), ["eps"],
       infer=_layer_norm_infer, ref=_layer_norm_ref)


def _sdpa_infer(ts, a):
    q, k, v = ts[:3]
    dtype = _same_dtype([_float(q), k, v])
    if q.rank < 3 or k.rank != q.rank or v.rank != q.rank:
        raise OpError("sdpa takes q, k, v of one rank >= 3: [..., heads, seq, head_dim]")
    hq, hk = q.shape[-3], k.shape[-3]
    if hk != v.shape[-3] or k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        raise OpError(f"sdpa shapes q={q} k={k} v={v} do not agree")
    if hq != hk and not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
        raise OpError(f"sdpa: {hq} query heads are not a multiple of {hk} key/value heads")
    batch = broadcast_shapes(q.shape[:-3], k.shape[:-3])
    if len(ts) == 4:
        mask = ts[3]
        if mask.dtype != "bool" and mask.dtype != dtype:
            raise OpError(f"sdpa mask must be bool or {dtype}, got {mask.dtype}")
        broadcast_shapes(mask.shape, batch + (hq, q.shape[-2], k.shape[-2]))
    return Type(dtype, batch + (hq, q.shape[-2], v.shape[-1]))


def _sdpa_ref(xs, a, shape, dt):
    q, k, v = xs[:3]
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = np.repeat(k, groups, axis=-3)
        v = np.repeat(v, groups, axis=-3)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(a["scale"], q.dtype)
    seq, ctx = q.shape[-2], k.shape[-2]
    if a["causal"]:
        scores = np.where(np.tril(np.ones((seq, ctx), dtype=bool)), scores, -np.inf)
    if len(xs) == 4:
        mask = xs[3]
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    return np.matmul(_softmax(scores, -1), v).astype(q.dtype)


define("sdpa", "nn", "softmax(q@k.T*scale + mask) @ v over the whole sequence (k/v heads shared by groups)",
       (3, 4), ["scale", "causal"], infer=_sdpa_infer, ref=_sdpa_ref)


# ---------------------------------------------------------------------------------------------
# Generation ops (introduced by passes)

def _paged_infer(q, k, v, k_cache, v_cache, paging, a, dtype=None):
    """The result type of (int8 or float) paged attention; ``paging`` = positions, seq_index,
    block_tables."""
    dtype = dtype or _same_dtype([_float(q), k, v])
    if q.rank != 4 or k.rank != 4 or v.rank != 4 or q.shape[0] != 1:
        raise OpError("attention takes q, k, v of shape [1, heads, seq, head_dim]")
    hq, hk = q.shape[1], k.shape[1]
    if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
        raise OpError(f"attention: {hq} query heads are not a multiple of {hk} key/value heads")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2] or v.shape[1] != hk or k.shape[3] != q.shape[3]:
        raise OpError(f"attention shapes q={q} k={k} v={v} do not agree")
    positions, seq_index, tables = paging
    for name, t in (("positions", positions), ("seq_index", seq_index)):
        if t.dtype != "i64" or t.shape != (q.shape[2],):
            raise OpError(f"attention's {name} must be i64[{q.shape[2]}], one per token, not {t}")
    if tables.dtype != "i64" or tables.rank != 2:
        raise OpError(f"attention's block_tables must be i64[seqs, max_blocks], not {tables}")
    for cache, step in ((k_cache, k), (v_cache, v)):
        # an f32 model may keep its pool in f16 (half the bytes; values rounded as they are stored)
        stored = cache.dtype == dtype or (dtype == "f32" and cache.dtype == "f16")
        if cache.rank != 5 or not stored or cache.shape[2] != hk or cache.shape[4] != step.shape[3] \
                or not isinstance(cache.shape[3], int):
            raise OpError(f"KV pool {cache} does not hold [layers, blocks, {hk}, block_size, {step.shape[3]}] "
                          f"of {dtype}")
        if not 0 <= a["layer"] < cache.shape[0]:
            raise OpError(f"layer {a['layer']} is outside a KV pool of {cache.shape[0]} layers")
    if k_cache.shape[:4] != v_cache.shape[:4]:
        raise OpError(f"the key and value pools {k_cache} and {v_cache} differ in layers, blocks or block size")
    return Type(dtype, (1, hq, q.shape[2], v.shape[3]))


def _attention_infer(ts, a):
    q, k, v, k_cache, v_cache = ts[:5]
    return _paged_infer(q, k, v, k_cache, v_cache, ts[5:], a)


def kv_slots(positions: np.ndarray, seq_index: np.ndarray, tables: np.ndarray, blocks: int,
             block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(block, offset) in the KV pool of every token, checked against the tables and the pool."""
    from llmc.errors import InterpretError

    if positions.size == 1 and seq_index.size == 1:      # a lone decode token: the same checks on ints
        position, seq = int(positions.item(0)), int(seq_index.item(0))
        if position >= 0 and 0 <= seq < tables.shape[0] and position // block_size < tables.shape[1]:
            block = int(tables[seq, position // block_size])
            if 0 <= block < blocks:
                return np.array([block], np.int64), np.array([position % block_size], np.int64)
    positions, seq_index = positions.astype(np.int64), seq_index.astype(np.int64)
    if positions.size and positions.min() < 0:
        raise InterpretError("token positions must be >= 0")
    if seq_index.size and (seq_index.min() < 0 or seq_index.max() >= tables.shape[0]):
        raise InterpretError(f"a token's seq_index is outside the {tables.shape[0]} block tables")
    logical = positions // block_size
    if logical.size and logical.max() >= tables.shape[1]:
        raise InterpretError(f"position {int(positions.max())} needs more than the {tables.shape[1]} blocks "
                             "a block table holds")
    block = tables[seq_index, logical]
    if block.size and (block.min() < 0 or block.max() >= blocks):
        raise InterpretError(f"a block table names block {int(block.max() if block.max() >= blocks else block.min())}"
                             f" outside the pool of {blocks} blocks")
    return block, positions % block_size


def _attention_ref(xs, a, shape, dt):
    q, k, v, k_cache, v_cache, positions, seq_index, tables = xs
    layer = a["layer"]
    block, offset = kv_slots(positions, seq_index, tables, k_cache.shape[1], k_cache.shape[3])
    k_cache[layer, block, :, offset] = k[0].transpose(1, 0, 2)      # an f16 pool rounds them to nearest even
    v_cache[layer, block, :, offset] = v[0].transpose(1, 0, 2)
    return _attend_paged(q, lambda keys: (k_cache[layer, keys[0], :, keys[1]].astype(q.dtype),
                                          v_cache[layer, keys[0], :, keys[1]].astype(q.dtype)),
                         positions, seq_index, tables, k_cache.shape[3], a)


define("attention", "generation",
       "write each token's k, v to its sequence's KV blocks at its position, then causal (windowed) "
       "attention over that sequence's positions 0..position (scores soft-capped by cap * tanh(s / cap) when "
       "the optional attribute softcap is set)",
       8, ["layer", "scale", "window"], infer=_attention_infer, ref=_attention_ref)


def _rope_infer(ts, a):
    x, cos, sin = ts
    _same_dtype([_float(x), cos, sin])
    if broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape or not isinstance(x.shape[-1], int) \
            or x.shape[-1] % 2:
        raise OpError(f"rope tables {cos}, {sin} must broadcast to {x} with an even last axis")
    return x


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_pairs(x):
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    return np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def _rope_ref(xs, a, shape, dt):
    x, cos, sin = xs
    return x * cos + (_rotate_pairs(x) if a.get("interleaved") else _rotate_half(x)) * sin


define("rope", "generation",
       "rotary embedding: x*cos + rotate_half(x)*sin (halves (i, i + D/2) rotated), or with the optional attribute "
       "interleaved set, pairs (2i, 2i + 1): x*cos + (-x[2i+1], x[2i])*sin", 3, infer=_rope_infer, ref=_rope_ref)


# ---------------------------------------------------------------------------------------------
# Fused ops (introduced by the fuse phase)

def _rms_norm_infer(ts, a):
    x, w = ts
    _same_dtype([_float(x), w])
    if w.shape != (x.shape[-1],):
        raise OpError(f"rms_norm weight {w} must be [{x.shape[-1]}]")
    return x


def _rms_norm_ref(xs, a, shape, dt):
    x, w = xs
    mean_square = (x * x).mean(axis=-1, keepdims=True)
    return x * (1 / np.sqrt(mean_square + np.asarray(a["eps"], x.dtype))) * w


define("rms_norm", "nn", "x / sqrt(mean(x*x over the last axis) + eps) * w", 2, ["eps"],
       infer=_rms_norm_infer, ref=_rms_norm_ref)


def _gated_infer(ts, a):
    gate, up = ts
    dtype = _same_dtype([_float(gate), up])
    if gate.shape != up.shape:
        raise OpError(f"gate {gate} and up {up} must have one shape")
    return Type(dtype, gate.shape)


define("swiglu", "nn", "silu(gate) * up", 2, infer=_gated_infer,
       ref=lambda xs, a, shape, dt: xs[0] / (1 + np.exp(-xs[0])) * xs[1])
define("geglu", "nn", "gelu(gate) * up", 2, ["approximate"], infer=_gated_infer,
       ref=lambda xs, a, shape, dt: _gelu(xs[0], a["approximate"]) * xs[1])


def fused_body(body: list) -> list[tuple[str, list[str], dict]]:
    """Decode a fused op's body: each step is [op, arg, ..., "key=value", ...]; an arg is "inN"
    (the N-th input) or "tN" (the N-th step's result)."""
    from llmc.types import parse_attrs

    steps = []
    for step in body:
        op, rest = step[0], step[1:]
        args = [r for r in rest if "=" not in r]
        attrs = parse_attrs(", ".join(r for r in rest if "=" in r))
        if op not in OPS or OPS[op].kind != "elementwise":
            raise OpError(f"fused body step {step} is not an elementwise op")
        steps.append((op, args, attrs))
    return steps


def _fused_values(body, inputs, apply):
    temps = []
    for op, args, attrs in fused_body(body):
        operands = []
        for ref in args:
            index = int(ref[2:]) if ref.startswith("in") else int(ref[1:])
            pool = inputs if ref.startswith("in") else temps
            if not (ref.startswith(("in", "t")) and 0 <= index < len(pool)):
                raise OpError(f"fused body refers to {ref!r}, which is not defined before its use")
            operands.append(pool[index])
        temps.append(apply(op, operands, attrs))
    if not temps:
        raise OpError("fused body is empty")
    return temps[-1]


define("fused", "elementwise", "a chain of elementwise ops run as one loop (body: steps over inputs)",
       (1, None), ["body"],
       infer=lambda ts, a: _fused_values(a["body"], ts, lambda op, args, attrs: infer(op, args, attrs)),
       ref=lambda xs, a, shape, dt: _fused_values(
           a["body"], xs, lambda op, args, attrs: np.asarray(OPS[op].ref(args, attrs, None, None))))


def _get_infer(ts, a):
    if not isinstance(ts[0], TupleType) or not 0 <= a["index"] < len(ts[0].types):
        raise OpError(f"get {a['index']} of {ts[0]}: not a result of a multi-result node")
    return ts[0].types[a["index"]]


define("get", "shape", "one result of a multi-result node", 1, ["index"], infer=_get_infer,
       ref=lambda xs, a, shape, dt: xs[0][a["index"]])


def _add_norm_infer(ts, a):
    x, residual = ts[:2]
    if x != residual:
        raise OpError(f"add_norm of {x} and {residual}: the residual stream has one type")
    norm = "rms_norm" if a["norm"] == "rms" else "layer_norm"
    if a["norm"] not in ("rms", "layer"):
        raise OpError(f"add_norm's norm is 'rms' or 'layer', not {a['norm']!r}")
    return TupleType((x, infer(norm, [x] + ts[2:], {"eps": a["eps"]})))


def _add_norm_ref(xs, a, shapes, dt):
    total = xs[0] + xs[1]
    norm = _rms_norm_ref if a["norm"] == "rms" else _layer_norm_ref
    return total, norm([total] + xs[2:], a, None, None)


define("add_norm", "nn", "(x + residual, norm(x + residual)): the residual add fused with the next norm",
       (3, 4), ["norm", "eps"], infer=_add_norm_infer, ref=_add_norm_ref)


# ---------------------------------------------------------------------------------------------
# Quantized weights (introduced by the quantize phase; formats in llmc.quant)

def _quant_parts_infer(parts: list[Type], a) -> tuple[int, int]:
    """(rows, cols) of the [N, K] float weight that quantized parts stand for."""
    from llmc.quant import parse_scheme

    scheme = parse_scheme(a["scheme"])
    if scheme.format is None:
        raise OpError(f"{a['scheme']} is not a quantized scheme")
    if len(parts) != len(scheme.parts) or parts[0].rank != 2 or not isinstance(parts[0].shape[1], int):
        raise OpError(f"{a['scheme']} takes its weight as {', '.join(scheme.parts)}, not {', '.join(map(str, parts))}")
    rows, cols = parts[0].shape[0], scheme.cols(parts[0].shape[1])
    want = [Type(dtype, shape) for dtype, shape in scheme.part_types(rows, cols)]
    if list(parts) != want:
        raise OpError(f"{a['scheme']} weight parts {', '.join(map(str, parts))} are not "
                      f"{', '.join(f'{n} {t}' for n, t in zip(scheme.parts, want))}")
    return rows, cols


def _parts_count(a) -> int:
    from llmc.quant import parse_scheme

    return len(parse_scheme(a["scheme"]).parts)


def _qlinear_infer(ts, a):
    count = _parts_count(a)
    x, parts, rest = ts[0], ts[1:1 + count], ts[1 + count:]
    rows, cols = _quant_parts_infer(parts, a)
    if x.dtype != "f32" or x.shape[-1] != cols:
        raise OpError(f"qlinear of {x} with a [{rows}, {cols}] weight")
    if rest and rest[0].shape != (rows,):
        raise OpError(f"qlinear bias {rest[0]} must be [{rows}]")
    return Type("f32", x.shape[:-1] + (rows,))


def _dequantized(parts, a):
    from llmc.quant import dequantize, parse_scheme

    scheme = parse_scheme(a["scheme"])
    return dequantize(dict(zip(scheme.parts, parts)), scheme, scheme.cols(parts[0].shape[1]))


def _qlinear_ref(xs, a, shape, dt):
    count = _parts_count(a)
    y = np.matmul(xs[0], _dequantized(xs[1:1 + count], a).T)
    return y + xs[1 + count] if len(xs) > 1 + count else y


define("qlinear", "linalg", "x @ dequantize(codes, scales[, mins]).T (+ b), weight quantized per group",
       (3, 5), ["scheme"], infer=_qlinear_infer, ref=_qlinear_ref)


def _qembedding_infer(ts, a):
    count = _parts_count(a)
    rows, cols = _quant_parts_infer(ts[:count], a)
    ids = ts[count]
    if len(ts) != count + 1 or ids.dtype not in ("i64", "i32"):
        raise OpError("qembedding takes the quantized table's parts and integer ids")
    return Type("f32", ids.shape + (cols,))


def _qembedding_ref(xs, a, shape, dt):
    count = _parts_count(a)
    ids = xs[count]
    rows = [x[ids.reshape(-1)] for x in xs[:count]]          # dequantize only the rows looked up
    return _dequantized(rows, a).reshape(shape)


define("qembedding", "shape", "rows of a quantized table picked by ids, dequantized", (3, 4), ["scheme"],
       infer=_qembedding_infer, ref=_qembedding_ref)


# ---------------------------------------------------------------------------------------------
# Mixture of experts (introduced by llmc.passes.moe)

MOE_ACTS = {"silu": lambda x: x / (1 + np.exp(-x)), "gelu": lambda x: _gelu(x, "none"),
            "gelu_tanh": lambda x: _gelu(x, "tanh"), "relu": lambda x: np.maximum(x, 0)}
# The number each target's moe kernel knows an activation by (kernels.c's LLMC_ACT_*, kernels.py's ACT)
MOE_ACT_CODES = {act: code for code, act in enumerate(MOE_ACTS)}


def _moe_shapes(x: Type, router: Type, up: tuple[int, int], down: tuple[int, int], a) -> Type:
    """The routed block's result type, from x, the router's type and the [rows, cols] of the
    stacked expert weights: gate_up [E * (2 if gated) * I, H], down [E * H, I]."""
    experts, top_k = a["experts"], a["top_k"]
    if a["act"] not in MOE_ACTS:
        raise OpError(f"moe activation {a['act']!r} is not one of {', '.join(MOE_ACTS)}")
    if not (isinstance(experts, int) and isinstance(top_k, int) and 1 <= top_k <= experts):
        raise OpError(f"moe of top {top_k} among {experts} experts")
    if x.dtype != "f32" or x.rank != 2 or router.dtype != "f32":
        raise OpError(f"moe takes f32 rows [tokens, hidden] and an f32 router, not {x} and {router}")
    hidden = x.shape[1]
    if router.shape != (experts, hidden):
        raise OpError(f"moe router {router} must be [{experts}, {hidden}]")
    if down[0] != experts * hidden:
        raise OpError(f"moe down weight of {down[0]} rows: want {experts} experts x {hidden}")
    inner = down[1]
    want = experts * inner * (2 if a["gated"] else 1)
    if up != (want, hidden):
        raise OpError(f"moe gate/up weight {list(up)}: want [{want}, {hidden}] for {experts} experts of {inner}")
    return Type("f32", x.shape)


def _moe_infer(ts, a):
    x, router, up, down = ts
    for w in (up, down):
        if w.dtype != "f32" or w.rank != 2:
            raise OpError(f"moe expert weights are f32 [experts * rows, cols], not {w}")
    return _moe_shapes(x, router, up.shape, down.shape, a)


def moe_route(x: np.ndarray, router: np.ndarray, a) -> tuple[np.ndarray, np.ndarray]:
    """Each token's experts [T, k], best first, and their weights [T, k]: softmax over the router's
    logits, the top k (the lower index first among equals), renormalised to sum 1 if asked."""
    probs = _softmax(np.matmul(x, router.T), -1)
    ids = topk_indices(probs, a["top_k"], -1)
    weights = np.take_along_axis(probs, ids, axis=-1)
    if a["normalize"]:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids, weights.astype(np.float32)


def moe_reference(x: np.ndarray, router: np.ndarray, up: np.ndarray, down: np.ndarray, a) -> np.ndarray:
    """The routed block over stacked expert weights: each token through its top-k experts' MLPs
    (act(gate) * up, or act(up) when not gated), weighted and summed in the router's order."""
    experts, hidden = a["experts"], x.shape[1]
    up, down = up.reshape(experts, -1, hidden), down.reshape(experts, hidden, -1)
    ids, weights = moe_route(x, router, a)
    act = MOE_ACTS[a["act"]]
    out = np.zeros_like(x)
    for j in range(ids.shape[1]):
        h = np.einsum("tnh,th->tn", up[ids[:, j]], x)
        if a["gated"]:
            inner = h.shape[1] // 2
            h = act(h[:, :inner]) * h[:, inner:]
        else:
            h = act(h)
        out += weights[:, j:j + 1] * np.einsum("thi,ti->th", down[ids[:, j]], h)
    return out.astype(np.float32)


MOE_ATTRS = ["experts", "top_k", "normalize", "act", "gated"]
define("moe", "linalg",
       "a routed expert block: softmax of x @ router.T, each token's top_k experts (weights renormalised if "
       "normalize), their MLPs down @ act(gate) * up (gated) or down @ act(up) summed by weight",
       4, MOE_ATTRS, infer=_moe_infer,
       ref=lambda xs, a, shape, dt: moe_reference(xs[0], xs[1], xs[2], xs[3], a))


def _qmoe_infer(ts, a):
    count = _parts_count(a)
    if len(ts) != 2 + 2 * count:
        raise OpError(f"qmoe takes x, the router and two {a['scheme']} weights of {count} parts each")
    up = _quant_parts_infer(ts[2:2 + count], a)
    down = _quant_parts_infer(ts[2 + count:], a)
    return _moe_shapes(ts[0], ts[1], up, down, a)


def _qmoe_ref(xs, a, shape, dt):
    count = _parts_count(a)
    return moe_reference(xs[0], xs[1], _dequantized(xs[2:2 + count], a), _dequantized(xs[2 + count:], a), a)


define("qmoe", "linalg", "moe whose expert weights are quantized (parts of gate_up, then of down)", (6, 8),
       ["scheme"] + MOE_ATTRS, infer=_qmoe_infer, ref=_qmoe_ref)


def _attention_kv8_infer(ts, a):
    q, k, v, k_cache, k_scale, v_cache, v_scale = ts[:7]
    for cache, scale in ((k_cache, k_scale), (v_cache, v_scale)):
        if cache.dtype != "i8" or scale.dtype != "f32" or scale.shape != cache.shape[:4]:
            raise OpError(f"int8 KV pool {cache} needs i8 codes and an f32 scale per [layer, block, head, offset], "
                          f"got {scale}")
    dtype = _same_dtype([_float(q), k, v])
    as_float = [Type(dtype, c.shape) for c in (k_cache, v_cache)]
    return _paged_infer(q, k, v, as_float[0], as_float[1], ts[7:], a, dtype)


def quantize_kv_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (one head's vector at one position): (codes, scales)."""
    scale = np.abs(rows).max(axis=-1) / 127.0
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    return np.clip(np.rint(rows * inverse[..., None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def _attention_kv8_ref(xs, a, shape, dt):
    q, k, v, k_cache, k_scale, v_cache, v_scale, positions, seq_index, tables = xs
    layer = a["layer"]
    block, offset = kv_slots(positions, seq_index, tables, k_cache.shape[1], k_cache.shape[3])
    for step, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        cache[layer, block, :, offset], scales[layer, block, :, offset] = quantize_kv_rows(step[0].transpose(1, 0, 2))

    def gather(keys):
        b, o = keys
        return (k_cache[layer, b, :, o].astype(np.float32) * k_scale[layer, b, :, o][..., None],
                v_cache[layer, b, :, o].astype(np.float32) * v_scale[layer, b, :, o][..., None])

    return _attend_paged(q, gather, positions, seq_index, tables, k_cache.shape[3], a)


def _attend_paged(q, gather, positions, seq_index, tables, block_size: int, a) -> np.ndarray:
    """Each token's causal (windowed) attention over its sequence's positions 0..position, read
    through its block table: q [1, Hq, seq, D]; ``gather((blocks, offsets))`` gives the keys and
    values [n, Hkv, D] at those slots (K/V heads shared by groups of query heads)."""
    rows = []
    for s in np.unique(seq_index):
        tokens = np.flatnonzero(seq_index == s)
        end = int(positions[tokens].max()) + 1
        key_pos = np.arange(end)
        keys, values = gather((tables[s, key_pos // block_size], key_pos % block_size))
        rows.append((tokens, _attend(q[:, :, tokens], keys.transpose(1, 0, 2), values.transpose(1, 0, 2),
                                     positions[tokens], a)))
    width = rows[0][1].shape[-1] if rows else q.shape[-1]
    out = np.zeros(q.shape[:3] + (width,), q.dtype)
    for tokens, result in rows:
        out[:, :, tokens] = result
    return out


def _attend(q, keys, values, query_pos, a):
    """Causal (windowed) attention of q [1, Hq, n, D] at positions ``query_pos`` [n] over
    keys/values [Hkv, n_keys, D] at positions 0..n_keys-1 (K/V heads shared by groups of query heads)."""
    end = keys.shape[1]
    groups = q.shape[1] // keys.shape[0]
    keys, values = np.repeat(keys, groups, axis=0), np.repeat(values, groups, axis=0)
    scores = np.matmul(q[0], np.swapaxes(keys, -1, -2)) * np.asarray(a["scale"], q.dtype)
    cap = a.get("softcap", 0.0)
    if cap:                                  # Gemma 2's soft cap of the scores
        scores = (np.asarray(cap, q.dtype) * np.tanh(scores / np.asarray(cap, q.dtype))).astype(q.dtype)
    query_pos = np.asarray(query_pos)[:, None]
    key_pos = np.arange(end)[None, :]
    allowed = key_pos <= query_pos
    if a["window"]:
        allowed &= query_pos - key_pos < a["window"]
    scores = np.where(allowed, scores, -np.inf)
    return np.matmul(_softmax(scores, -1), values)[None].astype(q.dtype)


define("attention_kv8", "generation",
       "attention whose KV pool holds int8 codes with an f32 scale per head and slot",
       10, ["layer", "scale", "window"], infer=_attention_kv8_infer, ref=_attention_kv8_ref)
