"""Every CPU kernel against its numpy reference on fresh random inputs of awkward sizes, built
for the AVX2 level (when this machine has it) and for the portable level, run on two threads."""

import numpy as np
import pytest

from llmc import ops
from llmc.artifact import host_cpu_features
from llmc.quant import dequantize, parse_scheme, quantize
from llmc.targets.cpu.build import LEVELS
from llmc.targets.cpu.harness import harness
from llmc.targets.cpu.layout import from_panels, panels_fit, to_panels
from llmc.targets.cpu.lower import KV_KINDS, MAX_SPLITS, SPLIT_TOKENS

LEVEL_NAMES = (["x86-64-v3"] if set(LEVELS["x86-64-v3"][1]) <= host_cpu_features() else []) + ["portable"]


@pytest.fixture(params=LEVEL_NAMES)
def lib(request):
    library = harness(request.param)
    library.h_set_threads(2)
    return library


def p(array):
    return None if array is None else array.ctypes.data


def rows_at_stride(rng, m, k, pad):
    """An [m, k] f32 matrix whose rows sit `k + pad` floats apart (a view, as kernels see slices)."""
    store = rng.standard_normal((m, k + pad)).astype(np.float32)
    return store, store[:, :k]


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 37, 67), (3, 5, 8), (7, 33, 131), (4, 6, 40), (9, 2, 17),
                                   (16, 16, 8), (17, 35, 67), (23, 1, 3), (101, 50, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_f32_and_f16(lib, m, n, k, bias):
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    store, x = rows_at_stride(rng, m, k, 3)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    w16 = w.astype(np.float16)
    for tile in (1, 4, 64):
        y = np.full((m, n), np.nan, np.float32)
        lib.h_linear_f32(p(store), k + 3, p(w), p(b), p(y), m, n, k, tile)
        want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
        y = np.full((m, n), np.nan, np.float32)
        lib.h_linear_f16(p(store), k + 3, p(w16), p(b), p(y), m, n, k, tile)
        want = x.astype(np.float64) @ w16.T.astype(np.float64) + (b if bias else 0)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def quantized_weight(rng, scheme: str, n: int, k: int):
    """(Scheme, parts) of a random [n, k] weight. ``q4g32-q4_0`` is q4g32 with min = -8 * scale,
    as the GGUF passthrough stores Q4_0 blocks; a ``-panels`` suffix names the same weight run by
    the kernel that reads it in panels of eight rows (its layout is applied in linear_q)."""
    s = parse_scheme(scheme.removesuffix("-panels").removesuffix("-q4_0"))
    parts = quantize(rng.standard_normal((n, k)).astype(np.float32), s)
    if "-q4_0" in scheme:
        parts["mins"] = (parts["scales"].astype(np.float32) * -8).astype(np.float16)
    return s, parts


def linear_q(lib, s, parts, store, ldx, b, m, n, k, tile, panels=False, exact=False):
    y = np.full((m, n), np.nan, np.float32)
    if exact:
        lib.h_linear_q_exact(p(store), ldx, p(parts["q"]), p(parts["scales"]), p(parts.get("mins")), p(b), p(y), m, n,
                             k, s.bits, s.group, tile)
        return y
    scratch = np.empty(m * (k + 64) + m * (k // 32) * 8 + 64, np.uint8)
    if panels:
        laid = to_panels(parts)
        lib.h_linear_panels(p(store), ldx, p(laid["q"]), p(laid["scales"]), p(laid.get("mins")), p(b), p(y), m, n, k,
                            s.bits, tile, p(scratch))
        return y
    lib.h_linear_q(p(store), ldx, p(parts["q"]), p(parts["scales"]), p(parts.get("mins")), p(b), p(y), m, n, k,
                   s.bits, s.group, tile, p(scratch))
    return y


@pytest.mark.parametrize("scheme", ["q4g32", "q8"])
def test_the_panel_layout_is_a_permutation_of_the_rows(scheme):
    rng = np.random.default_rng(11)
    s = parse_scheme(scheme)
    parts = quantize(rng.standard_normal((24, 96)).astype(np.float32), s)
    laid = to_panels(parts)
    assert {name: (a.dtype, a.shape) for name, a in laid.items()} == \
        {name: (a.dtype, a.shape) for name, a in parts.items()}
    assert not np.array_equal(laid["q"], parts["q"])
    assert all(np.array_equal(back, parts[name]) for name, back in from_panels(laid).items())
    # row 8P + i's element e: panel P, block e // 32, then (4-bit) vector (e % 32) // 8, lane i,
    # nibble (e % 8) // 4, or (8-bit) vector (e % 32) // 4, lane i
    row, e = 13, 75
    if scheme == "q8":
        assert laid["q"].reshape(3, 3, 8, 8, 4)[row // 8, e // 32, e % 32 // 4, row % 8, e % 4] == parts["q"][row, e]
    else:
        nibbles = parts["q"].reshape(24, 3, 16)
        codes = np.concatenate([nibbles & 15, nibbles >> 4], -1).reshape(24, 96)
        byte = laid["q"].reshape(3, 3, 4, 8, 4)[row // 8, e // 32, e % 32 // 8, row % 8, e % 4]
        assert (byte >> 4 if e % 8 >= 4 else byte & 15) == codes[row, e]
    assert laid["scales"].reshape(3, 3, 8)[row // 8, e // 32, row % 8] == parts["scales"][row, e // 32]
    assert panels_fit(s.bits, s.group, 24, 96) and not panels_fit(s.bits, s.group, 20, 96)
    assert not panels_fit(s.bits, s.group, 24, 80) and not panels_fit(4, 128, 24, 256)


# Blocks of 32 per row: runs of eight (the AVX2 steps) with and without a shorter last run, and odd
# counts (a last 4-bit group without a pair).
Q_SIZES = {32: [32, 96, 256, 352, 576], 128: [128, 384, 1024, 1152]}


@pytest.mark.parametrize("scheme", ["q8", "q4g32", "q4g32-q4_0", "q4g128", "q4g32-panels", "q4g32-q4_0-panels",
                                    "q8-panels"])
@pytest.mark.parametrize("m,n", [(1, 1), (1, 45), (6, 13), (5, 70), (17, 9), (21, 40)])
def test_quantized_linear_within_the_activation_rounding_bound(lib, scheme, m, n):
    """x is rounded to int8 per block of 32 (scale amax/127) at every M, so each output may differ
    from the exact product with the dequantized weight by at most sum over blocks of amax/254 *
    sum |w| (plus float rounding). The error must also reach a real part of that bound (rounding
    errors of random sign add up to about 0.7/sqrt(K) of it; float rounding alone to ~1e-5): the
    rounding is applied at this M, and the bound is not so loose it could never fail."""
    rng = np.random.default_rng(n * 7 + m)
    panels = scheme.endswith("-panels")
    n = -(-n // 8) * 8 if panels else n                   # panels hold eight rows
    sizes = Q_SIZES[parse_scheme(scheme.removesuffix("-panels").removesuffix("-q4_0")).group]
    k = sizes[(m + n) % len(sizes)]
    s, parts = quantized_weight(rng, scheme, n, k)
    store, x = rows_at_stride(rng, m, k, 5)
    dense = dequantize(parts, s, k).astype(np.float64)
    b = rng.standard_normal(n).astype(np.float32)
    y = linear_q(lib, s, parts, store, k + 5, b, m, n, k, 7, panels)
    want = x.astype(np.float64) @ dense.T + b
    half_steps = np.abs(x).reshape(m, k // 32, 32).max(axis=-1) / 254.0            # [m, blocks]
    weight_mass = np.abs(dense).reshape(n, k // 32, 32).sum(axis=-1)              # [n, blocks]
    rounding = half_steps @ weight_mass.T
    error = np.abs(y - want)
    assert np.all(error <= rounding * 1.001 + 1e-5 * np.abs(want) + 1e-5)
    assert (error / rounding).max() > 0.1 / np.sqrt(k)


@pytest.mark.parametrize("scheme", ["q8", "q4g32", "q4g32-q4_0", "q4g128"])
@pytest.mark.parametrize("m,n", [(1, 1), (1, 45), (6, 13), (17, 9), (21, 40)])
def test_quantized_linear_on_f32_activations_is_the_exact_product(lib, scheme, m, n):
    """quant_activations f32: x as it is times the dequantized weight, within f32 rounding."""
    rng = np.random.default_rng(n * 5 + m)
    sizes = Q_SIZES[parse_scheme(scheme.removesuffix("-q4_0")).group]
    k = sizes[(m + n) % len(sizes)]
    s, parts = quantized_weight(rng, scheme, n, k)
    store, x = rows_at_stride(rng, m, k, 5)
    b = rng.standard_normal(n).astype(np.float32)
    for tile in (1, 7, 64):
        y = linear_q(lib, s, parts, store, k + 5, b, m, n, k, tile, exact=True)
        want = x.astype(np.float64) @ dequantize(parts, s, k).astype(np.float64).T + b
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("kernel,k", [("f32", 67), ("f32", 256), ("f16", 67), ("f16", 256), ("q8", 352),
                                      ("q4g32", 352), ("q4g32-q4_0", 576), ("q4g128", 384), ("q4g128", 1024),
                                      ("q4g32-panels", 352), ("q4g32-q4_0-panels", 576), ("q8-panels", 352),
                                      ("q4g32-exact", 352), ("q4g128-exact", 384)])
def test_linear_rows_do_not_depend_on_the_batch(lib, kernel, k):
    """Batch invariance: each x row's outputs are bitwise the same computed alone (M = 1) as inside
    any batch, at any row of it, next to any other rows, with any tile and thread count."""
    rng = np.random.default_rng(k)
    n, pool, pad = (40 if kernel.endswith("-panels") else 37), 130, 3
    store, _ = rows_at_stride(rng, pool, k, pad)
    store *= rng.choice([1e-3, 1.0, 30.0], size=(pool, 1)).astype(np.float32)      # rows of different scales
    b = rng.standard_normal(n).astype(np.float32)
    if kernel in ("f32", "f16"):
        w = rng.standard_normal((n, k)).astype(np.float32 if kernel == "f32" else np.float16)
        call = lib.h_linear_f32 if kernel == "f32" else lib.h_linear_f16

        def run(rows, tile):
            y = np.full((len(rows), n), np.nan, np.float32)
            call(p(rows), k + pad, p(w), p(b), p(y), len(rows), n, k, tile)
            return y
    else:
        s, parts = quantized_weight(rng, kernel.removesuffix("-exact"), n, k)

        def run(rows, tile):
            return linear_q(lib, s, parts, rows, k + pad, b, len(rows), n, k, tile, kernel.endswith("-panels"),
                            kernel.endswith("-exact"))

    try:
        lib.h_set_threads(1)
        alone = np.concatenate([run(store[i:i + 1], 16) for i in range(pool)])
        for threads in (1, 2):
            lib.h_set_threads(threads)
            for m in (2, 3, 5, 16, 17, 64, 130):
                for shift in (0, 1, m // 2):
                    picked = (np.arange(m) * 7 + shift * 11 + m) % pool        # other rows around, each at new places
                    for tile in (1, 3, 16, 64):
                        got = run(np.ascontiguousarray(store[picked]), tile)
                        assert np.array_equal(got, alone[picked]), (threads, m, shift, tile)
    finally:
        lib.h_set_threads(2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_embedding_rows(lib, dtype):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((29, 13)).astype(dtype)
    ids = rng.integers(0, 29, 11).astype(np.int64)
    out = np.empty((11, 13), dtype)
    lib.h_embedding(p(table), table[0].nbytes, 29, p(ids), 11, p(out))
    np.testing.assert_array_equal(out, table[ids])


@pytest.mark.parametrize("scheme", ["q8", "q4g32", "q4g128"])
def test_quantized_embedding_rows(lib, scheme):
    rng = np.random.default_rng(4)
    s = parse_scheme(scheme)
    k = 256
    table = rng.standard_normal((31, k)).astype(np.float32)
    parts = quantize(table, s)
    ids = np.array([0, 30, 7, 7, 19], np.int64)
    out = np.empty((5, k), np.float32)
    lib.h_embedding_q(p(parts["q"]), p(parts["scales"]), p(parts.get("mins")), 31, k, s.bits, s.group, p(ids), 5,
                      p(out))
    want = ops.OPS["qembedding"].ref([parts[key] for key in ("q", "scales", "mins") if key in parts] + [ids],
                                     {"scheme": scheme}, (5, k), "f32")
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["q4g32", "q8"])
def test_quantized_embedding_rows_from_panels(lib, scheme):
    """A tied LM head in panels: the embedding reads the same rows from them."""
    rng = np.random.default_rng(5)
    s, k = parse_scheme(scheme), 160
    parts = quantize(rng.standard_normal((40, k)).astype(np.float32), s)
    laid = to_panels(parts)
    ids = np.array([0, 39, 7, 8, 8, 23, -4, 99], np.int64)     # out of range: clamped, as llmc_embedding_q
    out = np.empty((len(ids), k), np.float32)
    lib.h_embedding_panels(p(laid["q"]), p(laid["scales"]), p(laid.get("mins")), 40, k, s.bits, p(ids), len(ids),
                           p(out))
    want = ops.OPS["qembedding"].ref([parts[key] for key in ("q", "scales", "mins") if key in parts] +
                                     [np.clip(ids, 0, 39)], {"scheme": scheme}, (len(ids), k), "f32")
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [1, 7, 64, 67])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norms_and_add_norm(lib, d, kind):
    rng = np.random.default_rng(d)
    r = 5
    store, x = rows_at_stride(rng, r, d, 2)
    res_store, res = rows_at_stride(rng, r, d, 1)
    w = rng.standard_normal(d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32) if kind == "layer" else None
    code = 0 if kind == "rms" else 1
    params = [w] + ([b] if b is not None else [])
    ref = ops.OPS["rms_norm" if kind == "rms" else "layer_norm"].ref
    out = np.empty((r, d), np.float32)
    lib.h_norm(p(store), d + 2, p(w), p(b), 1e-5, code, r, d, p(out))
    np.testing.assert_allclose(out, ref([np.ascontiguousarray(x)] + params, {"eps": 1e-5}, None, None), rtol=1e-5,
                               atol=1e-5)
    total, normed = np.empty((r, d), np.float32), np.empty((r, d), np.float32)
    lib.h_add_norm(p(store), d + 2, p(res_store), d + 1, p(w), p(b), 1e-5, code, r, d, p(total), p(normed))
    want_total, want_norm = ops.OPS["add_norm"].ref([np.ascontiguousarray(x), np.ascontiguousarray(res)] + params,
                                                    {"norm": kind, "eps": 1e-5}, None, None)
    np.testing.assert_array_equal(total, want_total)
    np.testing.assert_allclose(normed, want_norm, rtol=1e-5, atol=1e-5)


# Each case: heads, kv heads, head_dim, block size, window, and the step's sequences as
# (tokens already in the pool, tokens this step). A step of at most 4 tokens runs each token's key
# spans as tasks (flash-decoding); a longer one runs them in order in one task.
ATTENTION_CASES = [
    (4, 2, 16, 4, 0, [(0, 7)]),                          # a prefill from empty, GQA
    (3, 3, 5, 1, 0, [(9, 1)]),                           # decode, odd head_dim, blocks of one
    (6, 2, 8, 16, 4, [(5, 3), (0, 2)]),                  # a window shorter than the context
    (4, 1, 32, 16, 0, [(700, 1), (299, 1)]),             # long decodes: keys split over tasks and merged
    (2, 2, 64, 4, 64, [(300, 1), (17, 1), (3, 1)]),      # decodes within a window
    (4, 2, 16, 4, 0, [(11, 5), (40, 1), (0, 8), (600, 1)]),   # mixed: chunks, decodes, one ends at a block's end
    (16, 1, 128, 16, 0, [(4000, 5), (3, 2)]),            # 8 spans of 16 heads: a task takes them 15 at a time
    (8, 2, 32, 8, 0, [(1100, 1), (40, 1)]),              # decode tasks of four heads (of one alone: of one head)
    (4, 2, 16, 4, 0, [(500, 30), (7, 9)]),               # query tiles whose tokens have one span or two
]


def scattered_tables(rng, needs: list[int], block_size: int) -> tuple[np.ndarray, int]:
    """Block tables for sequences of the given lengths over a shuffled pool (with spare blocks)."""
    counts = [-(-n // block_size) for n in needs]
    blocks = sum(counts) + 3
    order = rng.permutation(blocks)
    tables = np.full((len(needs), max(counts)), blocks - 1, np.int64)
    at = 0
    for s, count in enumerate(counts):
        tables[s, :count] = order[at: at + count]
        at += count
    return tables, blocks


def run_attention(lib, q, k, v, pools, positions, seq_index, tables, block_size, window, kv, softcap=0.0):
    """The kernel on q/k/v [1, heads, n, d] (as views of one projection, the way the graph hands
    them) over the pools (one layer of them: [blocks, Hk, B, d] arrays, changed in place)."""
    _, hq, n, d = q.shape
    hk = k.shape[1]
    proj = np.concatenate([x[0].transpose(1, 0, 2).reshape(n, -1) for x in (q, k, v)], axis=1).copy()
    stride = proj.shape[1]
    out = np.full((n, hq, d), np.nan, np.float32)
    scratch = np.empty(SPLIT_TOKENS * MAX_SPLITS * hq * (d + 2), np.float32)    # what lower.py plans
    kp, ks, vp, vs = pools if kv == "int8" else (pools[0], None, pools[1], None)
    lib.h_attention(p(proj), d, stride, proj[:, hq * d:].ctypes.data, d, stride, proj[:, (hq + hk) * d:].ctypes.data,
                    d, stride, p(kp), p(ks), p(vp), p(vs), KV_KINDS["i8" if kv == "int8" else kv], p(positions), p(seq_index), p(tables),
                    tables.shape[1], n, hq, hk, d, block_size, 1 / np.sqrt(d), window, softcap, p(out), d, hq * d,
                    p(scratch))
    return out.transpose(1, 0, 2)[None]


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
@pytest.mark.parametrize("hq,hk,d,bs,window,sequences", ATTENTION_CASES)
def test_paged_attention_matches_the_reference_and_each_sequence_alone(lib, kv, hq, hk, d, bs, window, sequences):
    """A step of several sequences against the reference op, and bitwise against each sequence run
    alone over its own copy of the pool (batch invariance)."""
    check_attention(lib, kv, hq, hk, d, bs, window, sequences)


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
@pytest.mark.parametrize("hq,hk,d,bs,window,sequences", [ATTENTION_CASES[i] for i in (0, 2, 3, 5, 8)])
def test_soft_capped_attention_matches_the_reference(lib, kv, hq, hk, d, bs, window, sequences):
    """Gemma 2's cap * tanh(score / cap), on every path (scalar head sizes, vector, split spans)."""
    check_attention(lib, kv, hq, hk, d, bs, window, sequences, softcap=1.5)


def check_attention(lib, kv, hq, hk, d, bs, window, sequences, softcap=0.0):
    rng = np.random.default_rng(hq * 1000 + d * 10 + bs)
    tables, blocks = scattered_tables(rng, [done + new for done, new in sequences], bs)
    positions = np.concatenate([np.arange(done, done + new) for done, new in sequences]).astype(np.int64)
    seq_index = np.concatenate([np.full(new, s) for s, (_, new) in enumerate(sequences)]).astype(np.int64)
    order = rng.permutation(positions.size)             # tokens of the sequences interleaved
    positions, seq_index = positions[order], seq_index[order]
    n = positions.size
    q, k, v = (rng.standard_normal((1, h, n, d)).astype(np.float32) for h in (hq, hk, hk))
    if kv == "int8":
        pools = [rng.integers(-127, 128, (2, blocks, hk, bs, d)).astype(np.int8),
                 rng.random((2, blocks, hk, bs)).astype(np.float32) / 50,
                 rng.integers(-127, 128, (2, blocks, hk, bs, d)).astype(np.int8),
                 rng.random((2, blocks, hk, bs)).astype(np.float32) / 50]
    else:
        pools = [rng.standard_normal((2, blocks, hk, bs, d)).astype(np.float16 if kv == "f16" else np.float32)
                 for _ in range(2)]
    attrs = {"layer": 1, "scale": 1 / np.sqrt(d), "window": window, **({"softcap": softcap} if softcap else {})}
    reference = [a.copy() for a in pools]
    op = ops.OPS["attention_kv8" if kv == "int8" else "attention"]
    want = op.ref([q, k, v] + reference + [positions, seq_index, tables], attrs, None, None)
    batched = [a[1].copy() for a in pools]
    got = run_attention(lib, q, k, v, batched, positions, seq_index, tables, bs, window, kv, softcap)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(batched, reference):        # K/V (codes and scales) where the reference put them
        np.testing.assert_allclose(mine, theirs[1], rtol=1e-7, atol=0)
    for s in range(len(sequences)):
        rows = np.flatnonzero(seq_index == s)
        alone = [a[1].copy() for a in pools]
        single = run_attention(lib, q[:, :, rows], k[:, :, rows], v[:, :, rows], alone, positions[rows],
                               np.zeros(rows.size, np.int64), tables[s:s + 1].copy(), bs, window, kv, softcap)
        assert np.array_equal(single, got[:, :, rows]), f"sequence {s} differs alone and in the batch"


# -- mixture of experts ------------------------------------------------------------------------

MOE_KINDS = {"f32": 0, "f16": 1, "q": 2, "panels": 3, "exact": 4}     # kernels.c's LLMC_W_*


def moe_weights(rng, storage: str, experts: int, hidden: int, inner: int, gated: bool):
    """(kind, bits, group, [up parts], [down parts], up and down as the kernel's numbers dequantize)
    for ``storage`` = f32, f16, or scheme[-panels|-exact]."""
    up = rng.standard_normal((experts * inner * (2 if gated else 1), hidden)).astype(np.float32) * 0.2
    down = rng.standard_normal((experts * hidden, inner)).astype(np.float32) * 0.2
    if storage in ("f32", "f16"):
        dtype = np.float32 if storage == "f32" else np.float16
        stored = [w.astype(dtype) for w in (up, down)]
        return MOE_KINDS[storage], 32, 0, [[w, None, None] for w in stored], [w.astype(np.float32) for w in stored]
    name, _, how = storage.partition("-")
    s = parse_scheme(name)
    parts = [quantize(w, s) for w in (up, down)]
    dense = [dequantize(q, s, w.shape[1]) for q, w in zip(parts, (up, down))]
    laid = [to_panels(q) for q in parts] if how == "panels" else parts
    kind = MOE_KINDS[how or "q"]
    return kind, s.bits, s.group, [[q["q"], q["scales"], q.get("mins")] for q in laid], dense


def run_moe(lib, x, ldx, router, experts, top_k, normalize, act, gated, inner, weights):
    from llmc.targets.cpu.lower import moe_scratch

    kind, bits, group, (up, down), _ = weights
    tokens, hidden = x.shape[0], router.shape[1]
    out = np.full((tokens, hidden), np.nan, np.float32)
    scratch = np.empty(moe_scratch(tokens, hidden, experts, top_k, inner, gated), np.uint8)
    tiles = np.array([16, 32, 3, 16, 5, 64], np.int64)
    lib.h_moe(p(x), ldx, tokens, hidden, p(router), experts, top_k, int(normalize), ops.MOE_ACT_CODES[act], int(gated), inner,
              kind, bits, group, *(p(a) for a in up), *(p(a) for a in down), p(tiles), p(out), p(scratch))
    return out


@pytest.mark.parametrize("storage,hidden,inner", [("f32", 67, 37), ("f16", 40, 9), ("q4g32", 96, 64),
                                                  ("q8", 64, 96), ("q4g128", 128, 128), ("q4g32-panels", 96, 64),
                                                  ("q8-panels", 64, 32), ("q4g32-exact", 96, 64)])
@pytest.mark.parametrize("tokens", [1, 19])
def test_moe_matches_the_reference_and_each_token_alone(lib, storage, hidden, inner, tokens):
    """The routed block against ops.moe_reference over the weights as stored (int8-rounded
    activations within a few percent, float storage and exact reading within f32 rounding), and
    each token's row bitwise the same computed alone."""
    rng = np.random.default_rng(hidden * 31 + tokens)
    experts, top_k = 5, 2
    for act, gated, normalize in (("silu", True, True), ("gelu_tanh", True, False), ("relu", False, True)):
        weights = moe_weights(rng, storage, experts, hidden, inner, gated)
        store, x = rows_at_stride(rng, tokens, hidden, 3)
        router = (rng.standard_normal((experts, hidden)) / np.sqrt(hidden)).astype(np.float32)   # logits ~ N(0, 1)
        got = run_moe(lib, store, hidden + 3, router, experts, top_k, normalize, act, gated, inner, weights)
        attrs = dict(experts=experts, top_k=top_k, normalize=normalize, act=act, gated=gated)
        want = ops.moe_reference(np.ascontiguousarray(x), router, *weights[4], attrs)
        if storage.partition("-")[0] in ("f32", "f16") or storage.endswith("-exact"):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(hidden))
        else:       # x and the activations each rounded to int8 per block: about 1% (measured 0.6-1.9%)
            assert np.linalg.norm(got - want) <= 0.03 * np.linalg.norm(want)
        alone = np.concatenate([run_moe(lib, np.ascontiguousarray(x[t:t + 1]), hidden, router, experts, top_k,
                                        normalize, act, gated, inner, weights) for t in range(tokens)])
        assert np.array_equal(got, alone), (act, gated)
