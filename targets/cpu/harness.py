"""The kernels built alone, each wrapped in its own parallel region: what the kernel tests and
the autotuner call through ctypes."""

from __future__ import annotations

import ctypes
from functools import lru_cache

# The linear kernels' wrappers (benchmarks/linear_invariance.py builds an older kernels.c with
# these alone: the other kernels' signatures change between versions).
LINEAR_WRAPPERS = r"""
static int h_threads = 1;
LLMC_EXPORT void h_set_threads(int n) { h_threads = n > 0 ? n : 1; }
#define PARALLEL(call) { _Pragma("omp parallel num_threads(h_threads)") { call; } }
LLMC_EXPORT void h_linear_f32(const float* x, int64_t ldx, const float* w, const float* b, float* y, int64_t M,
    int64_t N, int64_t K, int64_t tile) PARALLEL(llmc_linear_f32(x, ldx, w, b, y, M, N, K, tile))
LLMC_EXPORT void h_linear_f16(const float* x, int64_t ldx, const f16* w, const float* b, float* y, int64_t M,
    int64_t N, int64_t K, int64_t tile) PARALLEL(llmc_linear_f16(x, ldx, w, b, y, M, N, K, tile))
LLMC_EXPORT void h_linear_q(const float* x, int64_t ldx, const void* q, const f16* s, const f16* mn, const float* b,
    float* y, int64_t M, int64_t N, int64_t K, int64_t bits, int64_t G, int64_t tile, void* scratch)
    PARALLEL(llmc_linear_q(x, ldx, q, s, mn, b, y, M, N, K, bits, G, tile, scratch))
LLMC_EXPORT void h_linear_q_exact(const float* x, int64_t ldx, const void* q, const f16* s, const f16* mn,
    const float* b, float* y, int64_t M, int64_t N, int64_t K, int64_t bits, int64_t G, int64_t tile)
    PARALLEL(llmc_linear_q_exact(x, ldx, q, s, mn, b, y, M, N, K, bits, G, tile))
LLMC_EXPORT void h_linear_panels(const float* x, int64_t ldx, const void* q, const f16* s, const f16* mn,
    const float* b, float* y, int64_t M, int64_t N, int64_t K, int64_t bits, int64_t tile, void* scratch)
    PARALLEL(llmc_linear_panels(x, ldx, q, s, mn, b, y, M, N, K, bits, tile, scratch))
"""
WRAPPERS = LINEAR_WRAPPERS + r"""
LLMC_EXPORT void h_embedding(const char* table, int64_t row_bytes, int64_t rows, const int64_t* ids, int64_t n,
    char* out) PARALLEL(llmc_embedding(table, row_bytes, rows, ids, n, out))
LLMC_EXPORT void h_embedding_q(const void* q, const f16* s, const f16* mn, int64_t rows, int64_t K, int64_t bits,
    int64_t G, const int64_t* ids, int64_t n, float* out) PARALLEL(llmc_embedding_q(q, s, mn, rows, K, bits, G, ids, n, out))
LLMC_EXPORT void h_embedding_panels(const void* q, const f16* s, const f16* mn, int64_t rows, int64_t K,
    int64_t bits, const int64_t* ids, int64_t n, float* out)
    PARALLEL(llmc_embedding_panels(q, s, mn, rows, K, bits, ids, n, out))
LLMC_EXPORT void h_norm(const float* x, int64_t ldx, const float* w, const float* b, float eps, int64_t kind,
    int64_t R, int64_t D, float* out) PARALLEL(llmc_norm(x, ldx, w, b, eps, kind, R, D, out))
LLMC_EXPORT void h_add_norm(const float* x, int64_t ldx, const float* r, int64_t ldr, const float* w, const float* b,
    float eps, int64_t kind, int64_t R, int64_t D, float* sum, float* out)
    PARALLEL(llmc_add_norm(x, ldx, r, ldr, w, b, eps, kind, R, D, sum, out))
LLMC_EXPORT void h_attention(const float* q, int64_t q_h, int64_t q_s, const float* k, int64_t k_h, int64_t k_s,
    const float* v, int64_t v_h, int64_t v_s, void* kp, float* ks, void* vp, float* vs, int64_t kv8,
    const int64_t* positions, const int64_t* seq_index, const int64_t* tables, int64_t max_blocks, int64_t n,
    int64_t Hq, int64_t Hk, int64_t D, int64_t B, float scale, int64_t window, float softcap, float* out, int64_t o_h,
    int64_t o_s, float* scratch)
    PARALLEL(llmc_attention(q, q_h, q_s, k, k_h, k_s, v, v_h, v_s, kp, ks, vp, vs, kv8, positions, seq_index, tables,
                            max_blocks, n, Hq, Hk, D, B, scale, window, softcap, out, o_h, o_s, scratch))
LLMC_EXPORT void h_moe(const float* x, int64_t ldx, int64_t T, int64_t H, const float* router, int64_t E, int64_t k,
    int64_t normalize, int64_t act, int64_t gated, int64_t I, int64_t kind, int64_t bits, int64_t G, const void* up,
    const f16* up_scales, const f16* up_mins, const void* down, const f16* down_scales, const f16* down_mins,
    const int64_t* tiles, float* out, void* scratch)
    PARALLEL(llmc_moe(x, ldx, T, H, router, E, k, normalize, act, gated, I, kind, bits, G, up, up_scales, up_mins,
                      down, down_scales, down_mins, tiles, out, scratch))
"""

_FLOAT = ctypes.c_float
_INT = ctypes.c_int64
_PTR = ctypes.c_void_p
SIGNATURES = {
    "h_linear_f32": [_PTR, _INT, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT],
    "h_linear_f16": [_PTR, _INT, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT],
    "h_linear_q": [_PTR, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT, _INT, _INT, _PTR],
    "h_linear_q_exact": [_PTR, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT, _INT, _INT],
    "h_linear_panels": [_PTR, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT, _INT, _PTR],
    "h_embedding": [_PTR, _INT, _INT, _PTR, _INT, _PTR],
    "h_embedding_q": [_PTR, _PTR, _PTR, _INT, _INT, _INT, _INT, _PTR, _INT, _PTR],
    "h_embedding_panels": [_PTR, _PTR, _PTR, _INT, _INT, _INT, _PTR, _INT, _PTR],
    "h_norm": [_PTR, _INT, _PTR, _PTR, _FLOAT, _INT, _INT, _INT, _PTR],
    "h_add_norm": [_PTR, _INT, _PTR, _INT, _PTR, _PTR, _FLOAT, _INT, _INT, _INT, _PTR, _PTR],
    "h_attention": [_PTR, _INT, _INT, _PTR, _INT, _INT, _PTR, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR,
                    _PTR, _INT, _INT, _INT, _INT, _INT, _INT, _FLOAT, _INT, _FLOAT, _PTR, _INT, _INT, _PTR],
    "h_moe": [_PTR, _INT, _INT, _INT, _PTR, _INT, _INT, _INT, _INT, _INT, _INT, _INT, _INT, _INT, _PTR, _PTR, _PTR,
              _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
}


@lru_cache(maxsize=None)
def harness(level: str) -> ctypes.CDLL:
    """The kernel library for a feature level (``portable``, ``x86-64-v3``, ``native``)."""
    from . import kernel_constants
    from .build import KERNELS, build_shared_library
    from .launch import load_library

    source = "\n".join(["#define LLMC_KERNEL static", '#define LLMC_EXPORT __attribute__((visibility("default")))',
                        kernel_constants(), KERNELS.read_text(), WRAPPERS])
    code, _ = build_shared_library(source, level, name="harness")
    lib = load_library(code)
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib
