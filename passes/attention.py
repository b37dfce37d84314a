"""The attention phase: a full-sequence forward becomes one batched, paged generation step.

Before: ``forward(input_ids[1, seq]) -> logits[1, seq, vocab]`` with attention as traced (the SDPA op,
or eager matmul-softmax-matmul, or SDPA as torch.onnx writes it out), K/V repeated for GQA, a mask
built from positions, positions from ``arange(seq)``. After: the step of ``llmc.abi``::

    step(tokens[seq], positions[seq], seq_index[seq], block_tables[seqs, max_blocks], logit_rows[rows],
         k_cache, v_cache[, k_scale, v_scale]) -> logits[rows, vocab]

The ``seq`` tokens may come from several sequences (prefill chunks and decode tokens mixed): each
has its own position and its sequence's row of the block tables. The KV pool is
``[layers, blocks, kv_heads, block_size, head_dim]``; each attention site becomes one ``attention``
op that writes every token's K/V to its sequence's block slot and attends over that sequence's
positions ``0..position``. The traced ``arange(seq)`` positions become the ``positions`` input, so
RoPE tables (any rope_scaling variant) and learned position embeddings follow without knowing the
formula; row-wise ops (linears, norms, MLPs) do not see the batching at all. The LM head runs only
for the ``logit_rows`` rows.

A mask is recognised by what it computes, not by its shape: it must depend on the sequence length
only, and evaluated at several lengths it must equal a causal mask, or a causal sliding window.
If any site does not fit, the graph is returned unchanged and the context's notes say why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmc import ops
from llmc.interpret import run
from llmc.ir import Graph, Node, Type
from llmc.passes.context import PassContext
from llmc.passes.rewrite import emit, rebuild

SEQ = "seq"                 # tokens in the step, from any number of sequences
ROWS = "rows"               # token rows whose logits the step returns
SEQS, MAX_BLOCKS = "seqs", "max_blocks"     # block tables: one row per sequence in the step
BLOCKS = "blocks"           # blocks in the KV pool: chosen when the artifact is loaded
EPILOGUE = ("mul", "div", "add", "sub", "tanh")     # ops of the logits' epilogue that run on picked rows


class Decline(Exception):
    """An attention site (or the graph) does not have a form this pass can rewrite."""


@dataclass
class Site:
    node: Node
    q: Node
    k: Node
    v: Node
    scale: float
    window: int
    softcap: float = 0.0        # Gemma 2: scores become cap * tanh(scores / cap) before the mask


def rewrite_attention(graph: Graph, ctx: PassContext) -> Graph:
    try:
        return _rewrite(graph, ctx)
    except Decline as reason:
        ctx.note(f"attention: left the graph as traced, without a KV cache: {reason}")
        return graph


def _rewrite(graph: Graph, ctx: PassContext) -> Graph:
    if len(graph.inputs) != 1 or graph.inputs[0].type != Type("i64", (1, SEQ)) or len(graph.outputs) != 1:
        raise Decline("the graph is not input_ids[1, seq] -> logits")
    input_ids = graph.inputs[0]
    sites = [_site(graph, node, ctx) for node in graph.nodes() if _is_attention(node)]
    if not sites:
        raise Decline("no attention was found")
    kv_shapes = {(s.k.type.shape[1], s.k.type.shape[3], s.v.type.shape[3], s.k.type.dtype) for s in sites}
    if len(kv_shapes) != 1:
        raise Decline(f"layers differ in key/value heads or sizes {sorted(map(str, kv_shapes))}")
    heads, key_size, value_size, dtype = kv_shapes.pop()
    layers = len(sites)

    def step_input(name: str, dtype: str, shape: tuple) -> Node:
        return Node("input", (), {"name": name}, Type(dtype, shape))

    tokens = step_input("tokens", "i64", (SEQ,))
    positions = step_input("positions", "i64", (SEQ,))
    seq_index = step_input("seq_index", "i64", (SEQ,))
    block_tables = step_input("block_tables", "i64", (SEQS, MAX_BLOCKS))
    logit_rows = step_input("logit_rows", "i64", (ROWS,))
    int8 = ctx.kv == "int8"
    cache_dtype = "i8" if int8 else ("f16" if ctx.kv == "f16" and dtype == "f32" else dtype)
    pool = (layers, BLOCKS, heads, ctx.block_size)
    k_cache = step_input("k_cache", cache_dtype, pool + (key_size,))
    v_cache = step_input("v_cache", cache_dtype, pool + (value_size,))
    cache_inputs = [k_cache, v_cache]
    if int8:
        k_scale, v_scale = step_input("k_scale", "f32", pool), step_input("v_scale", "f32", pool)
        cache_inputs += [k_scale, v_scale]
    paging = [positions, seq_index, block_tables]
    layer_of = {id(s.node): (i, s) for i, s in enumerate(sites)}

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if original is input_ids:
            return emit("reshape", [tokens], shape=[1, SEQ])
        if id(original) in layer_of:
            layer, site = layer_of[id(original)]
            qkv = [rebuilt(site.q), rebuilt(site.k), rebuilt(site.v)]
            attrs = dict(layer=layer, scale=site.scale, window=site.window)
            if site.softcap:
                attrs["softcap"] = site.softcap
            if int8:
                return emit("attention_kv8", qkv + [k_cache, k_scale, v_cache, v_scale] + paging, **attrs)
            return emit("attention", qkv + [k_cache, v_cache] + paging, **attrs)
        if _is_positions(original):
            return positions
        return None

    out = rebuild(graph, replace, inputs=[tokens, positions, seq_index, block_tables, logit_rows] + cache_inputs)
    out.outputs = [_logits(out.outputs[0], logit_rows)]
    leftover = [n.op for n in out.nodes() if _is_attention(n)]
    if leftover:
        raise Decline(f"{len(leftover)} attention sites remain after the rewrite")
    across = next((n for n in out.nodes() if _reduces_tokens(n)), None)
    if across is not None:
        raise Decline(f"the model reduces over all of a call's tokens ({across.op} over seq), which one step of "
                      "several sequences cannot do (transformers' LongRoPE and dynamic NTK rotary pick their "
                      "frequencies by a call's longest position: compile the Hugging Face model instead, which "
                      "fixes them for the context)")
    return out


def _reduces_tokens(node: Node) -> bool:
    """A reduction whose axes include the step's token axis (``seq``): in a step it would mix the
    tokens of different sequences."""
    if ops.OPS[node.op].kind != "reduce":
        return False
    axes = node.attrs["axes"] if "axes" in node.attrs else [node.attrs["axis"]]
    return any(node.inputs[0].type.shape[a] == SEQ for a in axes)


# ---------------------------------------------------------------------------------------------
# Recognising attention sites

def _is_attention(node: Node) -> bool:
    if node.op == "sdpa":
        return True
    return node.op == "matmul" and _unguarded(node.inputs[0]).op == "softmax"


def _unguarded(node: Node) -> Node:
    """p for ``where(p != p, 0, p)``: a softmax whose NaN rows (all keys masked) become zeros, as
    torch.onnx writes SDPA (its IsNaN arrives as ``p != p``)."""
    if node.op == "where":
        cond, zero, p = node.inputs
        if cond.op == "ne" and cond.inputs[0] is p and cond.inputs[1] is p and _constant_value(zero, 1.0) == 0.0:
            return p
    return node


def _site(graph: Graph, node: Node, ctx: PassContext) -> Site:
    if node.op == "sdpa":
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) == 4 else None
        scale, causal = node.attrs["scale"], node.attrs["causal"]
    else:
        q, k, v, scale, mask, softcap = _eager_parts(node)
        causal = False
    if mask is None and not causal:
        raise Decline("an attention without a causal mask (bidirectional attention)")
    window = 0 if mask is None else _mask_window(graph, mask, ctx)
    hq = q.type.shape[1]
    k, v = _unrepeat(k, hq), _unrepeat(v, hq)
    for t in (q, k, v):
        if t.type.rank != 4 or t.type.shape[0] != 1 or t.type.shape[2] != SEQ:
            raise Decline(f"attention operand {t.type} is not [1, heads, seq, head_dim]")
    return Site(node, q, k, v, float(scale), window, softcap if node.op != "sdpa" else 0.0)


def _eager_parts(node: Node):
    probs, v = node.inputs
    probs = _unguarded(probs)
    scores = probs.inputs[0]
    if probs.attrs["axis"] != scores.type.rank - 1:
        raise Decline("a softmax over another axis than the keys")
    mask = None
    if scores.op == "add":
        a, b = scores.inputs
        scores, mask = (a, b) if _is_qk(_unscaled(_uncapped(a)[0])[0]) else (b, a)
    elif scores.op == "where":
        cond, kept, dropped = scores.inputs
        if not (_constant_value(dropped, default=0.0) <= -1e30):
            raise Decline("a where() on attention scores that does not mask with -inf")
        scores, mask = kept, cond
    capped, softcap = _uncapped(scores)
    raw, scale = _unscaled(capped)
    if not _is_qk(raw):
        raise Decline(f"attention scores computed by {raw.op}, not q @ k.T")
    (q, q_scale), (kt, k_scale) = _unscaled(raw.inputs[0]), _unscaled(raw.inputs[1])
    if q_scale * k_scale != 1:
        scale *= _square_root_scales(q_scale * k_scale, q.type.shape[-1])
    return q, _key(kt), v, scale, mask, softcap


def _square_root_scales(product: float, head_dim) -> float:
    """The scale of q and k.T scaled each by an f32 sqrt(scale) (torch.onnx's SDPA): the default
    1/sqrt(head_dim) when the product is that within the f32 roundings, else the product."""
    if isinstance(head_dim, int) and head_dim > 0 and abs(product * math.sqrt(head_dim) - 1) < 1e-6:
        return 1.0 / math.sqrt(head_dim)
    return product


def _key(kt: Node) -> Node:
    """k of the scores' k.T operand: a permute that puts the key axis last, or (torch.onnx's form)
    ``reshape(permute(y))`` transposing y's last two axes with only the leading axes reshaped."""
    if kt.op == "reshape":
        transposed, shape = kt.inputs[0], kt.type.shape
        y = transposed.inputs[0]
        rank = y.type.rank
        if transposed.attrs["perm"] != list(range(rank - 2)) + [rank - 1, rank - 2] or \
                shape[-2:] != transposed.type.shape[-2:]:
            raise Decline(f"attention keys transposed by a reshape {kt.type} of {transposed.type}")
        base = y.inputs[0] if y.op == "reshape" else y
        want = list(shape[:-2]) + [shape[-1], shape[-2]]
        return base if list(base.type.shape) == want else emit("reshape", [base], shape=want)
    perm = kt.attrs["perm"]
    k = kt.inputs[0]
    if perm != list(range(len(perm) - 2)) + [len(perm) - 1, len(perm) - 2]:
        # The transpose merged with a head permute: k itself is x permuted by perm with its last two swapped.
        k = emit("permute", [k], perm=perm[:-2] + [perm[-1], perm[-2]])
    return k


def _uncapped(node: Node) -> tuple[Node, float]:
    """(scores, cap) for soft-capped scores ``tanh(scores / cap) * cap`` (Gemma 2), else (node, 0)."""
    if node.op != "mul":
        return node, 0.0
    for tanh, cap in (node.inputs, node.inputs[::-1]):
        if tanh.op != "tanh" or cap.op != "const" or float(cap.attrs["value"]) <= 0:
            continue
        inner, divisor = _unscaled(tanh.inputs[0])
        if divisor and abs(divisor * float(cap.attrs["value"]) - 1) < 1e-6:
            return inner, float(cap.attrs["value"])
    return node, 0.0


def _unscaled(node: Node) -> tuple[Node, float]:
    if node.op in ("mul", "div"):
        a, b = node.inputs
        if b.op == "const" or (node.op == "mul" and a.op == "const"):
            tensor, c = (a, b) if b.op == "const" else (b, a)
            value = float(c.attrs["value"])
            return tensor, value if node.op == "mul" else 1.0 / value
    return node, 1.0


def _is_qk(node: Node) -> bool:
    """matmul(q, permute(x)) where the permute puts the key axis last (k.T, possibly merged); either
    operand may be scaled by a constant first (torch.onnx scales q and k.T by sqrt(scale) each)."""
    if node.op != "matmul":
        return False
    kt = _unscaled(node.inputs[1])[0]
    if kt.op == "reshape" and kt.inputs[0].op == "permute":
        kt = kt.inputs[0]
    return kt.op == "permute" and kt.type.rank >= 2


def _constant_value(node: Node, default: float) -> float:
    if node.op in ("const", "full"):
        return float(node.attrs["value"])
    return default


def _unrepeat(node: Node, query_heads: int) -> Node:
    """The K/V tensor before GQA's repeat (reshape -> expand over a group axis -> reshape)."""
    if node.op != "reshape" or node.inputs[0].op != "expand" or node.inputs[0].inputs[0].op != "reshape":
        return node
    outer, expand, inner = node, node.inputs[0], node.inputs[0].inputs[0]
    base = inner.inputs[0]
    if base.type.rank != 4 or not isinstance(base.type.shape[1], int) or base.type.shape[1] == 0:
        return node
    b, h, s, d = base.type.shape
    groups = query_heads // h
    if (inner.type.shape == (b, h, 1, s, d) and expand.type.shape == (b, h, groups, s, d)
            and outer.type.shape == (b, query_heads, s, d)):
        return base
    return node


# ---------------------------------------------------------------------------------------------
# Masks

def _ancestors(node: Node) -> list[Node]:
    seen, stack, out = set(), [node], []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        out.append(n)
        stack.extend(n.inputs)
    return out


def _mask_window(graph: Graph, mask: Node, ctx: PassContext) -> int:
    """0 for a causal mask, W for a causal sliding window of W positions; Decline otherwise."""
    if any(n.op == "input" for n in _ancestors(mask)):
        raise Decline("the attention mask depends on the token values (padding or custom masking)")
    hint = ctx.config.get("sliding_window") or 0
    longest = min(ctx.max_seq, hint + 9 if hint else 300)
    lengths = sorted({n for n in (1, 2, 7, 67, longest) if n <= ctx.max_seq})
    probe = Graph(graph.inputs, [mask], graph.weights)
    allowed_by_length = {}
    for n in lengths:
        value = run(probe, [np.zeros((1, n), np.int64)])[0]
        if value.ndim < 2 or any(d != 1 for d in value.shape[:-2]) or value.shape[-2:] not in ((n, n), (1, n)):
            raise Decline(f"a mask of shape {value.shape} at length {n} (per-head or per-batch masks)")
        value = np.broadcast_to(value.reshape(value.shape[-2:]), (n, n))
        if value.dtype != np.bool_:
            if not np.all((value == 0) | (value <= -1e30)):
                raise Decline("an additive mask with values other than 0 and -inf (a position bias)")
            value = value == 0
        allowed_by_length[n] = value
    window = max(int(a.sum(axis=1).max()) for a in allowed_by_length.values())
    window = 0 if window >= max(lengths) else window
    for n, allowed in allowed_by_length.items():
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        want = (j <= i) & ((i - j < window) if window else True)
        if not np.array_equal(allowed, want):
            raise Decline(f"the mask at length {n} is neither causal nor a causal sliding window")
    return window


# ---------------------------------------------------------------------------------------------
# Positions and logits

def _is_positions(node: Node) -> bool:
    a = node.attrs
    return (node.op == "arange" and a["start"] == 0 and a["end"] == SEQ and a["step"] == 1
            and node.type.dtype == "i64")


def _logits(out: Node, logit_rows: Node) -> Node:
    """Logits [rows, vocab] of the token rows ``logit_rows`` names, gathered before the LM head
    (so the head's matmul runs only for them)."""
    shape = out.type.shape
    if out.type.rank != 3 or shape[:2] != (1, SEQ):
        raise Decline(f"the output {out.type} is not logits [1, seq, vocab]")

    def picked(x: Node) -> Node:
        rows = emit("reshape", [x], shape=[SEQ, x.type.shape[2]])
        return emit("embedding", [rows, logit_rows])

    # An elementwise epilogue with constants (Gemma 2's tanh(x / cap) * cap, Granite's scale) runs
    # after the head on the picked rows only.
    epilogue, head = [], out
    while head.op in EPILOGUE and all(i.op == "const" for i in head.inputs[1:]) and head.type == out.type:
        epilogue.append(head)
        head = head.inputs[0]
    if head.op == "linear" and head.inputs[0].type.rank == 3 and head.inputs[0].type.shape[1] == SEQ:
        result = emit("linear", [picked(head.inputs[0])] + list(head.inputs[1:]))
        for node in reversed(epilogue):
            result = emit(node.op, [result] + list(node.inputs[1:]), **node.attrs)
        return result
    return picked(out)
