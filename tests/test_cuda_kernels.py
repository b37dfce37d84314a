"""Every Triton kernel of the cuda target against its numpy reference, run by Triton's interpreter
on CPU tensors (conftest sets TRITON_INTERPRET=1) at small, awkward sizes. Outputs start as NaN
so a kernel that skips an element fails."""

import numpy as np
import pytest
import torch

from llmc.ops import MOE_ACT_CODES, OPS
from llmc.quant import dequantize, parse_scheme, quantize
from llmc.targets.cuda import kernels as K
from llmc.targets.cuda.elementwise import body, kernel_source
from llmc.targets.cuda.emulate import interpreter, load_module

interpreter()
rng = np.random.default_rng(7)


def t(array, dtype=None):
    out = torch.from_numpy(np.ascontiguousarray(array))
    return out.to(dtype) if dtype is not None else out


def nans(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def rel(got, want) -> float:
    got = got.float().numpy() if isinstance(got, torch.Tensor) else got
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def half(array):
    """What the device holds: values rounded to fp16."""
    return np.asarray(array, np.float32).astype(np.float16).astype(np.float64)


# -- linear -----------------------------------------------------------------------------------

def _weight_parts(n, k, scheme):
    w = rng.standard_normal((n, k)).astype(np.float32)
    if scheme in ("f32", "f16"):
        parts = [t(w, torch.float16 if scheme == "f16" else None)]
        return parts, (half(w) if scheme == "f16" else w.astype(np.float64)), 0, 1
    s = parse_scheme(scheme)
    q = quantize(w, s)
    return [t(q[n]) for n in s.parts], dequantize(q, s, k).astype(np.float64), s.bits, s.group


@pytest.mark.parametrize("scheme", ["f32", "f16", "q8", "q4g32", "q4g128"])
@pytest.mark.parametrize("m,block_m", [(1, 1), (3, 1), (19, 16), (37, 32)])
def test_linear(scheme, m, block_m):
    n, k = 45, 256
    parts, dense, mode, group = _weight_parts(n, k, scheme)
    ldx = k + 9                                              # rows that do not touch
    x = rng.standard_normal((m, ldx)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    xs = t(x, torch.float16)
    out = nans(m, n, dtype=torch.float16)
    w, scales, mins = (parts + [parts[0]] * 2)[:3]
    if mode == 8:
        mins = scales
    grid = (-(-n // 16), m if block_m == 1 else -(-m // block_m))
    K.linear[grid](xs, ldx, w, scales, mins, t(bias), out, n, m, n, k, MODE=mode, GROUP=group, HAS_BIAS=True,
                   BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=64)
    want = half(x[:, :k]) @ dense.T + bias
    # Tensor-core tiles take the dequantized weight in fp16; the GEMV multiplies in fp32.
    assert rel(out, want) < (4e-3 if block_m > 1 else 2e-3)


@pytest.mark.parametrize("scheme", ["f32", "q8", "q4g32"])
def test_embedding(scheme):
    rows, width = 29, 96
    parts, dense, mode, group = _weight_parts(rows, width, scheme)
    ids = np.array([3, 0, 28, 3, 17], np.int64)
    table, scales, mins = (parts + [parts[0]] * 2)[:3]
    if mode == 8:
        mins = scales
    out = nans(len(ids), width, dtype=torch.float16)
    K.embedding[(len(ids), 2)](table, scales, mins, t(ids), out, width, MODE=mode, GROUP=group, BLOCK=64)
    assert rel(out, dense[ids]) < 1e-3


# -- norms and RoPE -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,add,params", [(0, False, 1), (0, True, 1), (1, False, 2), (1, True, 0)])
def test_norm(kind, add, params):
    rows, n, ld = 5, 100, 131
    x = rng.standard_normal((rows, ld)).astype(np.float32)
    r = rng.standard_normal((rows, ld)).astype(np.float32)
    w, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    total, normed = nans(rows, n, dtype=torch.float16), nans(rows, n, dtype=torch.float16)
    xs, rs = t(x, torch.float16), t(r, torch.float16)
    K.norm[(rows,)](xs, ld, rs, ld, t(w), t(b), total, normed, n, 1e-5, KIND=kind, ADD=add, HAS_W=params > 0,
                    HAS_B=params > 1, BLOCK=128)
    v = half(x[:, :n]) + (half(r[:, :n]) if add else 0)
    if add:
        assert rel(total, v) < 1e-3
        v = half(v)
    if kind == 0:
        y = v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5)
    else:
        c = v - v.mean(-1, keepdims=True)
        y = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)
    y = y * (w if params > 0 else 1) + (b if params > 1 else 0)
    assert rel(normed, y) < 2e-3


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_on_a_permuted_view_with_broadcast_tables(interleaved):
    heads, seq, d = 3, 7, 24
    raw = rng.standard_normal((seq, heads, d)).astype(np.float32)          # [seq, heads, d] in memory
    x = raw.transpose(1, 0, 2)[None]                                         # viewed as [1, heads, seq, d]
    cos, sin = rng.standard_normal((seq, d)).astype(np.float32), rng.standard_normal((seq, d)).astype(np.float32)
    out = nans(heads * seq, d, dtype=torch.float16)
    xs = t(raw, torch.float16)
    K.rope[(heads * seq,)](xs, 0, d, heads * d, t(cos), 0, 0, d, 1, t(sin), 0, 0, d, 1, out, heads, seq, d, BLOCK=32,
                           INTERLEAVED=interleaved)
    want = OPS["rope"].ref([half(x), cos[None, None], sin[None, None]], {"interleaved": interleaved}, None, None)
    assert rel(out.reshape(1, heads, seq, d), want) < 2e-3


# -- attention over the paged KV pool ---------------------------------------------------------

# (tokens already in the pool, tokens this step) per sequence: fresh prompts, chunks continuing a
# prompt, decode tokens. Some end exactly at a block boundary (lengths 4, 24, 32, 40 with blocks
# of 4; 32 with blocks of 16), one chunk starts on one, and two runs are longer than a tile.
SEQUENCES = [(0, 7), (13, 1), (5, 19), (31, 1), (0, 1), (16, 24), (3, 1)]


def _paged_batch(block_size, heads, heads_kv, d, layers=2):
    """A mixed step over a paged pool: every sequence's earlier keys and values in blocks picked
    at random, the step's tokens of all sequences in one flat batch (one sequence split into two
    runs), q/k/v for them, and the numpy reference's inputs. Slots no token may read hold NaN,
    and so does a block the tables name past each sequence's last position."""
    lengths = [start + n for start, n in SEQUENCES]
    need = [-(-length // block_size) for length in lengths]
    width = max(need) + 1
    blocks = sum(need) + 2
    poison = blocks - 1
    order = rng.permutation(blocks - 1)
    tables = np.full((len(SEQUENCES), width), poison, np.int64)
    at = 0
    for s, count in enumerate(need):
        tables[s, :count] = order[at: at + count]
        at += count
    pool = [np.full((layers, blocks, heads_kv, block_size, d), np.nan) for _ in range(2)]
    for s, (start, _) in enumerate(SEQUENCES):
        for pos in range(start):
            for cache in pool:
                cache[:, tables[s, pos // block_size], :, pos % block_size] = half(rng.standard_normal((heads_kv, d)))
    runs = [(s, start, n) for s, (start, n) in enumerate(SEQUENCES)]
    longest = max(runs, key=lambda r: r[2])
    runs = [runs[i] for i in rng.permutation(len(runs)) if runs[i] != longest]
    s, start, n = longest                               # its tokens in two runs, another between
    runs = [(s, start, n // 2)] + runs[:1] + [(s, start + n // 2, n - n // 2)] + runs[1:]
    positions = np.concatenate([np.arange(start, start + n) for _, start, n in runs]).astype(np.int64)
    seq_index = np.concatenate([np.full(n, s) for s, _, n in runs]).astype(np.int64)
    n = len(positions)
    q, k, v = (half(rng.standard_normal((1, h, n, d))) for h in (heads, heads_kv, heads_kv))
    return q, k, v, pool, positions, seq_index, tables


def _paged_reference(q, k, v, pool, positions, seq_index, tables, layer, scale, window, softcap=0.0):
    """The attention op's reference: its output [1, heads, n, d] and the pool it wrote."""
    k_cache, v_cache = (np.nan_to_num(c, nan=0.0) for c in pool)
    capped = {"softcap": softcap} if softcap else {}
    out = OPS["attention"].ref([q, k, v, k_cache, v_cache, positions, seq_index, tables],
                               {"layer": layer, "scale": scale, "window": window, **capped}, None, None)
    return out, k_cache, v_cache


def _device_pool(pool, layer):
    """The pool as the device holds it (fp16) and the layer's view the kernels get."""
    caches = [t(c, torch.float16) for c in pool]
    return caches, [c[layer] for c in caches]


def _write_kv(k, v, layer_pool, positions, seq_index, tables, block_size):
    n, heads_kv, d = k.shape[2], k.shape[1], k.shape[3]
    ks, vs = (t(x[0], torch.float16) for x in (k, v))            # [heads_kv, n, d]
    K.kv_write[(n, heads_kv)](ks, n * d, d, vs, n * d, d, layer_pool[0], layer_pool[1], t(positions),
                              t(seq_index), t(tables), tables.shape[1], heads_kv, d, KV_BLOCK=block_size,
                              BLOCK_D=32)


def _check_written(caches, want_k, want_v, layer):
    for got, want in zip(caches, (want_k, want_v)):
        written = ~np.isnan(got[layer].float().numpy())
        assert np.array_equal(got[layer].float().numpy()[written], want[layer][written])


# The fast tier runs the first (blocks of one token); CI runs all four.
ATTENTION_CASES = [(1, 4, 2, 0, 0.0), pytest.param(4, 6, 2, 5, 0.0, marks=pytest.mark.slow),
                   pytest.param(16, 3, 3, 0, 0.0, marks=pytest.mark.slow),
                   pytest.param(4, 8, 1, 3, 0.0, marks=pytest.mark.slow),
                   pytest.param(4, 4, 2, 0, 0.8, marks=pytest.mark.slow)]        # Gemma 2's soft-capped scores


@pytest.mark.parametrize("block_size,heads,heads_kv,window,softcap", ATTENTION_CASES)
def test_paged_decode_attention_on_a_mixed_batch(block_size, heads, heads_kv, window, softcap):
    """The decode kernel takes every token as its own query, so it is checked on a mixed batch."""
    d, layer, splits, scale = 24, 1, 4, 24 ** -0.5
    q, k, v, pool, positions, seq_index, tables = _paged_batch(block_size, heads, heads_kv, d)
    want, want_k, want_v = _paged_reference(q, k, v, pool, positions, seq_index, tables, layer, scale, window,
                                            softcap)
    caches, layer_pool = _device_pool(pool, layer)
    _write_kv(k, v, layer_pool, positions, seq_index, tables, block_size)
    _check_written(caches, want_k, want_v, layer)
    n, group = len(positions), heads // heads_kv
    part = nans(n * heads * splits * 34)
    qs = t(q[0].transpose(1, 0, 2), torch.float16)                  # [n, heads, d] in memory
    K.attn_decode[(n, heads_kv, splits)](qs, d, heads * d, layer_pool[0], layer_pool[1], part, t(positions),
                                         t(seq_index), t(tables), tables.shape[1], heads_kv, group, d, scale, window,
                                         KV_BLOCK=block_size, SPLITS=splits, BLOCK_H=16, BLOCK_N=16, BLOCK_D=32,
                                         SOFTCAP=softcap)
    out = nans(n, heads, d, dtype=torch.float16)
    K.attn_merge[(n, heads)](part, out, heads * d, d, heads, d, SPLITS=splits, BLOCK_D=32)
    assert rel(out.permute(1, 0, 2)[None], want) < 2e-3


@pytest.mark.parametrize("block_size,heads,heads_kv,window,softcap", ATTENTION_CASES)
def test_paged_prefill_attention_on_a_mixed_batch(block_size, heads, heads_kv, window, softcap):
    from llmc.targets.cuda.plan import attention_tiles

    d, layer, scale, block_m = 24, 0, 24 ** -0.5, 16
    q, k, v, pool, positions, seq_index, tables = _paged_batch(block_size, heads, heads_kv, d)
    want, want_k, want_v = _paged_reference(q, k, v, pool, positions, seq_index, tables, layer, scale, window,
                                            softcap)
    caches, layer_pool = _device_pool(pool, layer)
    _write_kv(k, v, layer_pool, positions, seq_index, tables, block_size)
    _check_written(caches, want_k, want_v, layer)
    n = len(positions)
    tiles = attention_tiles(seq_index, block_m)
    assert len(tiles) > len(SEQUENCES) and tiles[:, 1].max() == block_m    # a split run, a full tile
    out = nans(n, heads, d, dtype=torch.float16)
    qs = t(q[0], torch.float16)                                     # [heads, n, d] in memory
    K.attn_prefill[(len(tiles), heads)](qs, n * d, d, layer_pool[0], layer_pool[1], out, d, heads * d, t(tiles),
                                        t(positions), t(seq_index), t(tables), tables.shape[1], heads_kv,
                                        heads // heads_kv, d, scale, window, KV_BLOCK=block_size, BLOCK_M=block_m,
                                        BLOCK_N=16, BLOCK_D=32, SOFTCAP=softcap)
    assert rel(out.permute(1, 0, 2)[None], want) < 3e-3


def test_attention_tiles_cut_runs_of_one_sequence():
    from llmc.targets.cuda.plan import attention_tiles

    tiles = attention_tiles(np.array([2, 2, 2, 2, 2, 0, 1, 1, 2]), 2)
    assert tiles.tolist() == [[0, 2], [2, 2], [4, 1], [5, 1], [6, 2], [8, 1]]


# -- sampling ----------------------------------------------------------------------------------

def _draw(logits, temperature, top_k, top_p, min_p, seed):
    token = torch.full((1,), -1, dtype=torch.int64)
    params = torch.tensor([temperature, top_k, top_p, min_p], dtype=torch.float32)
    K.sample[(1,)](t(logits), len(logits), params, seed, token, BLOCK=64, STEPS=32)
    return int(token[0])


def test_argmax_takes_the_first_largest():
    logits = rng.standard_normal(300).astype(np.float32)
    logits[[77, 201]] = 9.0
    token = torch.full((1,), -1, dtype=torch.int64)
    K.argmax[(1,)](t(logits), 300, token, BLOCK=64)
    assert int(token[0]) == 77


@pytest.mark.slow
def test_sampling_respects_top_k_top_p_and_min_p():
    logits = rng.standard_normal(150).astype(np.float32) * 2
    order = np.argsort(-logits)
    assert _draw(logits, 1.0, 1, 1.0, 0.0, 3) == order[0]
    top3 = {_draw(logits, 5.0, 3, 1.0, 0.0, seed) for seed in range(40)}
    assert top3 <= set(order[:3]) and len(top3) > 1
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1]
    assert {_draw(logits, 1.0, 0, 0.5, 0.0, seed) for seed in range(40)} <= set(nucleus)
    kept = set(np.flatnonzero(probs >= 0.3 * probs.max()))
    assert {_draw(logits, 1.0, 0, 1.0, 0.3, seed) for seed in range(40)} <= kept
    assert _draw(logits, 1.0, 0, 1.0, 0.0, 11) == _draw(logits, 1.0, 0, 1.0, 0.0, 11)


@pytest.mark.slow
def test_sampling_follows_the_softmax():
    logits = np.array([0.0, 1.0, 2.0, -1.0, 0.5], np.float32)
    draws = np.bincount([_draw(logits, 1.0, 0, 1.0, 0.0, seed) for seed in range(600)], minlength=5) / 600
    probs = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(draws - probs).max() < 0.06


# -- generated elementwise kernels ---------------------------------------------------------

UNARY = ["neg", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "erf", "sigmoid", "silu", "relu",
         "abs"]


def _run_elementwise(op, attrs, inputs, out_dtype="f32"):
    """One generated kernel over broadcast inputs (second input as a strided column)."""
    shape = (3, 5, 37)
    ir = ["bool" if a.dtype == np.bool_ else ("i64" if a.dtype == np.int64 else "f32") for a in inputs]
    statements, result = body(op, attrs, [(f"a{k}", d) for k, d in enumerate(ir)], out_dtype)
    storage = [("i8" if d == "bool" else d, d) for d in ir]
    name, source = kernel_source(statements, result, storage)
    fn = getattr(load_module(source, _folder()), name)
    out = torch.full(shape, float("nan"), dtype=torch.float32)
    args = [out, 0, 5 * 37, 37, 1]                 # viewed as [1, 3, 5, 37]
    for a in inputs:
        tensor = t(a.astype(np.int8) if a.dtype == np.bool_ else a)
        strides = [0 if size == 1 else s // a.itemsize for size, s in zip(a.shape, a.strides)]
        args += [tensor, 0] + [0] * (3 - a.ndim) + strides
    fn[(3 * 5, 1)](*args, 3, 5, 37, BLOCK=64)
    return out.numpy()


def _folder():
    from llmc.targets.cuda.build import cache_dir

    return cache_dir() / "emulate"


@pytest.mark.parametrize("op", UNARY)
def test_unary_elementwise(op):
    x = (rng.random((3, 5, 37)).astype(np.float32) + 0.1) * (1 if op in ("log", "sqrt", "rsqrt") else 3)
    if op not in ("log", "sqrt", "rsqrt"):
        x -= 1.5
    want = OPS[op].ref([x], {}, x.shape, "f32")
    assert rel(_run_elementwise(op, {}, [x]), want) < 1e-5


@pytest.mark.parametrize("op,attrs", [("add", {}), ("mul", {}), ("div", {}), ("maximum", {}), ("pow", {}),
                                      ("swiglu", {}), ("geglu", {"approximate": "tanh"}),
                                      ("geglu", {"approximate": "none"})])
def test_binary_elementwise_broadcasts(op, attrs):
    x = rng.standard_normal((3, 5, 37)).astype(np.float32)
    y = rng.standard_normal((5, 1)).astype(np.float32)
    if op == "pow":
        x, y = np.abs(x) + 0.5, np.round(y * 2)
    want = OPS[op].ref([x, np.broadcast_to(y, x.shape)], attrs, x.shape, "f32")
    assert rel(_run_elementwise(op, attrs, [x, y]), want) < 1e-5


def test_where_and_comparisons_in_a_fused_body():
    x = rng.standard_normal((3, 5, 37)).astype(np.float32)
    y = rng.standard_normal((3, 5, 37)).astype(np.float32)
    body_text = [["gt", "in0", "in1"], ["where", "t0", "in0", "in1"], ["mul", "t1", "in1"]]
    got = _run_elementwise("fused", {"body": body_text}, [x, y])
    assert rel(got, np.where(x > y, x, y) * y) < 1e-6


# -- mixture of experts -----------------------------------------------------------------------


def run_moe(x, router, up_parts, down_parts, mode, group, inner, attrs, block_m=16):
    """The five launches of targets/cuda/lower.py's moe, at the grids it gives them: (out, ids)."""
    tokens, hidden = x.shape
    experts, top_k, gated = attrs["experts"], attrs["top_k"], attrs["gated"]
    pairs = tokens * top_k
    max_blocks = -(-(pairs + experts * (block_m - 1)) // block_m)
    slots_bound, blocks_bound = pairs + experts * block_m, pairs + experts
    ids, weights = torch.full((pairs,), -7, dtype=torch.int32), nans(pairs)
    slots, rows = torch.full((pairs,), -7, dtype=torch.int32), torch.full((slots_bound,), -7, dtype=torch.int32)
    block_experts = torch.full((blocks_bound,), -7, dtype=torch.int32)
    a, o = nans(slots_bound, inner, dtype=torch.float16), nans(slots_bound, hidden, dtype=torch.float16)
    out = nans(tokens, hidden, dtype=torch.float16)
    xs = t(x, torch.float16)
    K.moe_route[(tokens,)](xs, hidden, t(router), ids, weights, hidden, experts, TOP_K=top_k,
                           NORMALIZE=attrs["normalize"], BLOCK_E=16, BLOCK_H=32)
    K.moe_sort[(1,)](ids, slots, rows, block_experts, pairs, experts, slots_bound, blocks_bound, BLOCK_M=block_m,
                     BLOCK_P=16)
    (w, scales, mins), (dw, dscales, dmins) = [(p + [p[0]] * 2)[:3] for p in (up_parts, down_parts)]
    if mode == 8:
        mins, dmins = scales, dscales
    K.moe_up[(-(-inner // 16), max_blocks)](xs, hidden, rows, block_experts, w, scales, mins, a, hidden, inner,
                                            TOP_K=top_k, MODE=mode, GROUP=group, GATED=gated,
                                            ACT=MOE_ACT_CODES[attrs["act"]], BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=32)
    K.moe_down[(-(-hidden // 16), max_blocks)](a, rows, block_experts, dw, dscales, dmins, o, hidden, inner,
                                               MODE=mode, GROUP=group, BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=32)
    K.moe_combine[(tokens, -(-hidden // 32))](o, slots, weights, out, hidden, TOP_K=top_k, BLOCK=32)
    return out, ids.numpy().reshape(tokens, top_k)


@pytest.mark.parametrize("scheme", ["f32", "q8", "q4g32"])      # (f16 reads as f32 does: test_linear's _weight_tile)
@pytest.mark.parametrize("tokens,act,gated,normalize", [(1, "silu", True, True), (5, "gelu_tanh", True, False),
                                                         (19, "relu", False, True)])
def test_moe_matches_the_reference(scheme, tokens, act, gated, normalize):
    """Route, sort by expert, the experts' two matmuls and the weighted sum against
    ops.moe_reference over the weights as stored, on fp16 activations: the same experts chosen,
    and every pair's rows where the grouping put them (outputs start as NaN: a pair left out fails)."""
    from llmc.ops import moe_reference, moe_route

    experts, top_k, hidden, inner = 5, 2, 64, 96
    up_parts, up, mode, group = _weight_parts(experts * inner * (2 if gated else 1), hidden, scheme)
    down_parts, down, _, _ = _weight_parts(experts * hidden, inner, scheme)
    x = half(rng.standard_normal((tokens, hidden)) * 0.15)
    router = (rng.standard_normal((experts, hidden)) / 8).astype(np.float32)        # logits ~ N(0, 1)
    attrs = dict(experts=experts, top_k=top_k, normalize=normalize, act=act, gated=gated)
    got, ids = run_moe(x.astype(np.float32), router, up_parts, down_parts, mode, group, inner, attrs)
    assert (ids == moe_route(x, router, attrs)[0]).all()
    assert rel(got, moe_reference(x, router, up, down, attrs)) < 5e-3
