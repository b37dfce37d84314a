"""Every CPU kernel against its numpy reference on fresh random inputs of awkward sizes, built
for the AVX2 level (when this machine has it) and for the portable level, run on two threads."""

import numpy as np
import pytest

from llmc import ops
from llmc.artifact import host_cpu_features
from llmc.quant import dequantize, parse_scheme, quantize
from llmc.targets.cpu.build import LEVELS
from llmc.targets.cpu.harness import harness

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
    for tile in (1, 4, 64):
        y = np.full((m, n), np.nan, np.float32)
        lib.h_linear_f32(p(store), k + 3, p(w), p(b), p(y), m, n, k, tile)
        want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    w16 = w.astype(np.float16)
    y = np.full((m, n), np.nan, np.float32)
    lib.h_linear_f16(p(store), k + 3, p(w16), p(b), p(y), m, n, k, 3)
    want = x.astype(np.float64) @ w16.T.astype(np.float64) + (b if bias else 0)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("scheme", ["q8", "q4g32", "q4g128"])
@pytest.mark.parametrize("m,n", [(1, 1), (1, 45), (6, 13), (5, 70), (17, 9), (21, 40)])
def test_quantized_linear_within_the_activation_rounding_bound(lib, scheme, m, n):
    """Below 16 rows x is rounded to int8 per block of 32 (scale amax/127), so each output may
    differ from the exact product with the dequantized weight by at most sum over blocks of
    amax/254 * sum |w|. From 16 rows on (prefill) the weight tiles are widened to f32: exact."""
    rng = np.random.default_rng(n * 7 + m)
    s = parse_scheme(scheme)
    k = 384 if s.group == 128 else 32 * (2 + 8 * (n % 3))     # groups in eights (AVX2 blocks) and the rest
    store, x = rows_at_stride(rng, m, k, 5)
    w = rng.standard_normal((n, k)).astype(np.float32)
    parts = quantize(w, s)
    dense = dequantize(parts, s, k).astype(np.float64)
    b = rng.standard_normal(n).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    scratch = np.empty(m * (k + 64) + m * (k // 32) * 8 + 64, np.uint8)
    lib.h_linear_q(p(store), k + 5, p(parts["q"]), p(parts["scales"]), p(parts.get("mins")), p(b), p(y), m, n, k,
                   s.bits, s.group, 7, p(scratch))
    want = x.astype(np.float64) @ dense.T + b
    half_steps = np.abs(x).reshape(m, k // 32, 32).max(axis=-1) / 254.0            # [m, blocks]
    weight_mass = np.abs(dense).reshape(n, k // 32, 32).sum(axis=-1)              # [n, blocks]
    bound = half_steps @ weight_mass.T * 1.001 + 1e-4 * np.abs(want) + 1e-5
    if m >= 16:
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
        return
    assert np.all(np.abs(y - want) <= bound)
    assert np.abs(y - want).max() > 0 or m * n == 1        # the bound is exercised, not an exact path


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


ATTENTION_CASES = [
    # heads, kv heads, head_dim, seq, start, window, ctx
    (4, 2, 16, 7, 0, 0, 20),        # prefill from empty, GQA
    (3, 3, 5, 1, 9, 0, 12),         # decode, odd head_dim
    (6, 2, 8, 3, 5, 4, 16),         # a sliding window shorter than the context
    (4, 1, 32, 1, 700, 0, 760),     # long decode: keys split across tasks and merged
    (2, 2, 64, 1, 300, 64, 320),    # split decode with a window
]


@pytest.mark.parametrize("kv8", [False, True])
@pytest.mark.parametrize("hq,hk,d,seq,start,window,ctx", ATTENTION_CASES)
def test_attention_over_the_cache(lib, kv8, hq, hk, d, seq, start, window, ctx):
    rng = np.random.default_rng(hq * 1000 + seq * 10 + start)
    layers, layer = 2, 1
    # q/k/v as the graph hands them: [1, heads, seq, d] slices of one [seq, heads*d] projection
    proj = rng.standard_normal((seq, (hq + 2 * hk) * d)).astype(np.float32)
    heads = lambda lo, n: proj[:, lo * d:(lo + n) * d].reshape(seq, n, d).transpose(1, 0, 2)[None]
    q, k, v = heads(0, hq), heads(hq, hk), heads(hq + hk, hk)
    ref_caches = [rng.standard_normal((layers, hk, ctx, d)).astype(np.float32) for _ in range(2)]
    attrs = {"layer": layer, "scale": 1 / np.sqrt(d), "window": window}
    if kv8:
        codes = [rng.integers(-127, 128, (layers, hk, ctx, d)).astype(np.int8) for _ in range(2)]
        scales = [rng.random((layers, hk, ctx)).astype(np.float32) / 50 for _ in range(2)]
        ref_inputs = [codes[0].copy(), scales[0].copy(), codes[1].copy(), scales[1].copy()]
        want = ops.OPS["attention_kv8"].ref([q, k, v] + ref_inputs + [np.array(start)], attrs, None, None)
        caches = [c.copy() for c in codes]
        cache_scales = [s.copy() for s in scales]
    else:
        ref_inputs = [c.copy() for c in ref_caches]
        want = ops.OPS["attention"].ref([q, k, v] + ref_inputs + [np.array(start)], attrs, None, None)
        caches, cache_scales = [c.copy() for c in ref_caches], [None, None]
    out = np.full((seq, hq, d), np.nan, np.float32)          # [seq, heads, d], as the kernel lays it out
    scratch = np.empty(16 * hq * (d + 2), np.float32)
    stride = (hq + 2 * hk) * d
    at_layer = lambda a: None if a is None else a[layer].ctypes.data
    lib.h_attention(p(proj), d, stride, proj[:, hq * d:].ctypes.data, d, stride, proj[:, (hq + hk) * d:].ctypes.data,
                    d, stride, at_layer(caches[0]), at_layer(cache_scales[0]), at_layer(caches[1]),
                    at_layer(cache_scales[1]), int(kv8), ctx, hq, hk, d, seq, start, attrs["scale"], window,
                    p(out), d, hq * d, p(scratch), 16)
    np.testing.assert_allclose(out.transpose(1, 0, 2)[None], want, rtol=1e-4, atol=1e-5)
    # this step's keys and values were written where the reference wrote them
    written = slice(start, start + seq)
    if kv8:
        np.testing.assert_array_equal(caches[0][:, :, written], ref_inputs[0][:, :, written])
        np.testing.assert_allclose(cache_scales[1][:, :, written], ref_inputs[3][:, :, written], rtol=1e-7)
    else:
        np.testing.assert_array_equal(caches[0], ref_inputs[0])
        np.testing.assert_array_equal(caches[1], ref_inputs[1])
