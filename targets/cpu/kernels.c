/* llmc CPU kernels. Included once into every generated model (and built alone for the kernel
 * tests and the autotuner). Every kernel is called by all threads of one OpenMP parallel region
 * and splits its work with orphaned `omp for` loops, whose implicit barrier ends the op: the
 * threads are started once per step, never per op. Called outside a parallel region, the same
 * code runs on one thread.
 *
 * Paths: AVX2 + FMA + F16C when the build targets x86-64-v3 (or native on such a CPU); plain C
 * the compiler vectorises otherwise. Layouts follow llmc/quant.py: groups run along K, 4-bit codes
 * pack element j in the low nibble and element j + G/2 in the high nibble of byte j. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLMC_AVX2 1
#else
#define LLMC_AVX2 0
#endif

#ifndef LLMC_KERNEL
#define LLMC_KERNEL
#endif

typedef _Float16 f16;

/* ---------------------------------------------------------------------------------------------
 * Dot products */

static inline float dot_f32(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#if LLMC_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

static inline float dot_f16(const f16* w, const float* x, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#if LLMC_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i))), _mm256_loadu_ps(x + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i + 8))), _mm256_loadu_ps(x + i + 8), s1);
    }
    __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) total += (float)w[i] * x[i];
    return total;
}

#if LLMC_AVX2
static inline float hsum256(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

/* ---------------------------------------------------------------------------------------------
 * Linear layers: y[m, n] = x[m, :] . W[n, :] (+ b[n]); x rows at a stride, y contiguous [M, N].
 * `tile` (from the autotuner) is the number of W rows one task takes. */

static inline int64_t llmc_tasks(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

/* y[m, n] = x[m, :] . w[n, :] + b[n] for M x-rows and N w-rows (both K-contiguous, at strides
 * ldx / ldw), into y at row stride ldy: 4 x-rows by 2 w-rows at a time, each W load feeding four
 * FMAs. The serial body of a task; callers split N across threads. */
static void gemm_f32_block(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* b, float* y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K) {
    int64_t m = 0;
#if LLMC_AVX2
    for (; m + 4 <= M; m += 4) {
        const float* x0 = x + m * ldx; const float* x1 = x0 + ldx; const float* x2 = x1 + ldx; const float* x3 = x2 + ldx;
        int64_t n = 0;
        for (; n + 2 <= N; n += 2) {
            const float* w0 = w + n * ldw; const float* w1 = w0 + ldw;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) {
                __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k), u;
                u = _mm256_loadu_ps(x0 + k); a00 = _mm256_fmadd_ps(u, v0, a00); a01 = _mm256_fmadd_ps(u, v1, a01);
                u = _mm256_loadu_ps(x1 + k); a10 = _mm256_fmadd_ps(u, v0, a10); a11 = _mm256_fmadd_ps(u, v1, a11);
                u = _mm256_loadu_ps(x2 + k); a20 = _mm256_fmadd_ps(u, v0, a20); a21 = _mm256_fmadd_ps(u, v1, a21);
                u = _mm256_loadu_ps(x3 + k); a30 = _mm256_fmadd_ps(u, v0, a30); a31 = _mm256_fmadd_ps(u, v1, a31);
            }
            float r[8] = {hsum256(a00), hsum256(a01), hsum256(a10), hsum256(a11),
                          hsum256(a20), hsum256(a21), hsum256(a30), hsum256(a31)};
            for (; k < K; k++) {
                r[0] += x0[k] * w0[k]; r[1] += x0[k] * w1[k]; r[2] += x1[k] * w0[k]; r[3] += x1[k] * w1[k];
                r[4] += x2[k] * w0[k]; r[5] += x2[k] * w1[k]; r[6] += x3[k] * w0[k]; r[7] += x3[k] * w1[k];
            }
            for (int i = 0; i < 4; i++) {
                y[(m + i) * ldy + n] = r[2 * i] + (b ? b[n] : 0.0f);
                y[(m + i) * ldy + n + 1] = r[2 * i + 1] + (b ? b[n + 1] : 0.0f);
            }
        }
        for (; n < N; n++)
            for (int i = 0; i < 4; i++) y[(m + i) * ldy + n] = dot_f32(x + (m + i) * ldx, w + n * ldw, K) + (b ? b[n] : 0.0f);
    }
#endif
    for (; m < M; m++)
        for (int64_t n = 0; n < N; n++) y[m * ldy + n] = dot_f32(x + m * ldx, w + n * ldw, K) + (b ? b[n] : 0.0f);
}

#define LLMC_PACKED_ROWS 16    /* from this many x rows on, linears run the packed outer-product kernel */
#define LLMC_PANEL 16          /* W columns per packed panel */
#define LLMC_STRIP 6           /* x rows per micro-tile */
#define LLMC_ROWS_IN_L2 96     /* x rows kept in L2 while a task's panels pass over them */

#if LLMC_AVX2
/* W rows [0, N) as panels of 16, k-major: panel p holds w[16p + j][k] at p*16*K + k*16 + j (zeros past N). */
static void pack_panels(const float* w, int64_t ldw, int64_t N, int64_t K, float* packed) {
    for (int64_t p = 0; p * LLMC_PANEL < N; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < LLMC_PANEL; j++) {
                int64_t n = p * LLMC_PANEL + j;
                packed[(p * K + k) * LLMC_PANEL + j] = n < N ? w[n * ldw + k] : 0.0f;
            }
}

/* y[0..rows, 0..cols) (+ b) = x[0..rows, :] . panel: 6 rows by 16 columns in 12 accumulators; each k
 * loads two W vectors and broadcasts six x values. Rows past `rows` repeat the last one, unstored. */
static void micro_6x16(const float* x, int64_t ldx, const float* panel, int64_t K, const float* b, float* y,
                       int64_t ldy, int64_t rows, int64_t cols) {
    /* named accumulators (an array of them is kept in memory by gcc, not in registers) */
    const float *x0 = x, *x1 = x + (rows > 1 ? 1 : 0) * ldx, *x2 = x + (rows > 2 ? 2 : rows - 1) * ldx,
                *x3 = x + (rows > 3 ? 3 : rows - 1) * ldx, *x4 = x + (rows > 4 ? 4 : rows - 1) * ldx,
                *x5 = x + (rows > 5 ? 5 : rows - 1) * ldx;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(panel + k * LLMC_PANEL), w1 = _mm256_loadu_ps(panel + k * LLMC_PANEL + 8), v;
        v = _mm256_broadcast_ss(x0 + k); a00 = _mm256_fmadd_ps(v, w0, a00); a01 = _mm256_fmadd_ps(v, w1, a01);
        v = _mm256_broadcast_ss(x1 + k); a10 = _mm256_fmadd_ps(v, w0, a10); a11 = _mm256_fmadd_ps(v, w1, a11);
        v = _mm256_broadcast_ss(x2 + k); a20 = _mm256_fmadd_ps(v, w0, a20); a21 = _mm256_fmadd_ps(v, w1, a21);
        v = _mm256_broadcast_ss(x3 + k); a30 = _mm256_fmadd_ps(v, w0, a30); a31 = _mm256_fmadd_ps(v, w1, a31);
        v = _mm256_broadcast_ss(x4 + k); a40 = _mm256_fmadd_ps(v, w0, a40); a41 = _mm256_fmadd_ps(v, w1, a41);
        v = _mm256_broadcast_ss(x5 + k); a50 = _mm256_fmadd_ps(v, w0, a50); a51 = _mm256_fmadd_ps(v, w1, a51);
    }
    float out[LLMC_STRIP][LLMC_PANEL];
    _mm256_storeu_ps(out[0], a00); _mm256_storeu_ps(out[0] + 8, a01);
    _mm256_storeu_ps(out[1], a10); _mm256_storeu_ps(out[1] + 8, a11);
    _mm256_storeu_ps(out[2], a20); _mm256_storeu_ps(out[2] + 8, a21);
    _mm256_storeu_ps(out[3], a30); _mm256_storeu_ps(out[3] + 8, a31);
    _mm256_storeu_ps(out[4], a40); _mm256_storeu_ps(out[4] + 8, a41);
    _mm256_storeu_ps(out[5], a50); _mm256_storeu_ps(out[5] + 8, a51);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) y[i * ldy + j] = out[i][j] + (b ? b[j] : 0.0f);
}

/* The serial body of a task over many x rows: pack W rows [0, N), then strips of x rows against
 * every panel, x blocked to stay in L2. `packed` holds ceil(N/16)*16*K floats. */
static void gemm_packed_block(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* b, float* y,
                              int64_t ldy, int64_t M, int64_t N, int64_t K, float* packed) {
    pack_panels(w, ldw, N, K, packed);
    for (int64_t m0 = 0; m0 < M; m0 += LLMC_ROWS_IN_L2) {
        int64_t m1 = m0 + LLMC_ROWS_IN_L2 < M ? m0 + LLMC_ROWS_IN_L2 : M;
        for (int64_t p = 0; p * LLMC_PANEL < N; p++) {
            int64_t cols = N - p * LLMC_PANEL < LLMC_PANEL ? N - p * LLMC_PANEL : LLMC_PANEL;
            for (int64_t m = m0; m < m1; m += LLMC_STRIP)
                micro_6x16(x + m * ldx, ldx, packed + p * K * LLMC_PANEL, K, b ? b + p * LLMC_PANEL : 0,
                           y + m * ldy + p * LLMC_PANEL, ldy, m1 - m < LLMC_STRIP ? m1 - m : LLMC_STRIP, cols);
        }
    }
}
#endif

/* A task's W rows [n0, n1) against every x row: packed outer products for many rows (AVX2), the
 * dot-product block otherwise. `packed` is the task's packing buffer (NULL: none). */
static void linear_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* b, float* y,
                        int64_t ldy, int64_t M, int64_t N, int64_t K, float* packed) {
#if LLMC_AVX2
    if (packed && M >= LLMC_PACKED_ROWS) {
        gemm_packed_block(x, ldx, w, ldw, b, y, ldy, M, N, K, packed);
        return;
    }
#endif
    (void)packed;
    gemm_f32_block(x, ldx, w, ldw, b, y, ldy, M, N, K);
}

static float* packing_buffer(int64_t M, int64_t tile, int64_t K) {
    if (!LLMC_AVX2 || M < LLMC_PACKED_ROWS) return 0;
    return (float*)malloc((size_t)(llmc_tasks(tile, LLMC_PANEL) * LLMC_PANEL * K) * sizeof(float));
}

LLMC_KERNEL void llmc_linear_f32(const float* x, int64_t ldx, const float* w, const float* b, float* y,
                                 int64_t M, int64_t N, int64_t K, int64_t tile) {
    int64_t tasks = llmc_tasks(N, tile);
    float* packed = packing_buffer(M, tile, K);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        linear_rows(x, ldx, w + n0 * K, K, b ? b + n0 : 0, y + n0, N, M, n1 - n0, K, packed);
    }
    free(packed);
}

LLMC_KERNEL void llmc_linear_f16(const float* x, int64_t ldx, const f16* w, const float* b, float* y,
                                 int64_t M, int64_t N, int64_t K, int64_t tile) {
    int64_t tasks = llmc_tasks(N, tile);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n1 = t * tile + tile < N ? t * tile + tile : N;
        for (int64_t n = t * tile; n < n1; n++)
            for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_f16(w + n * K, x + m * ldx, K) + (b ? b[n] : 0.0f);
    }
}

/* Activations for the integer dot products: each row of x in blocks of 32 as int8 codes with
 * an f32 scale d and s = d * sum(codes) (what a weight group's min multiplies). */
typedef struct { float d, s; } llmc_xblock;

/* With `paired`, the codes of blocks 2p and 2p+1 inside each full span of eight blocks are stored
 * as [2p: 0..15][2p+1: 0..15][2p: 16..31][2p+1: 16..31], the order in which one 32-byte load of
 * 4-bit weight codes (two groups) yields its low and its high nibbles. */
static void llmc_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* codes, llmc_xblock* blocks,
                               int paired) {
    int64_t per_row = K / 32, spanned = paired ? per_row / 8 * 8 : 0;
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < M * per_row; task++) {
        int64_t m = task / per_row, j = task % per_row;
        const float* src = x + m * ldx + j * 32;
        int8_t* dst = codes + m * K + j * 32;
        int64_t lo = 0, hi = 16;                  /* where elements 0..15 and 16..31 go */
        if (j < spanned) {
            dst = codes + m * K + (j & ~1) * 32;
            lo = (j & 1) * 16;
            hi = 32 + (j & 1) * 16;
        }
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(src[i]));
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            int q = (int)nearbyintf(src[i] * inv);
            dst[i < 16 ? lo + i : hi + i - 16] = (int8_t)q;
            sum += q;
        }
        blocks[m * per_row + j].d = d;
        blocks[m * per_row + j].s = d * (float)sum;
    }
}

/* sum of 32 products of weight codes (unsigned 4-bit in 32 bytes, or signed 8-bit) with int8 x */
#if LLMC_AVX2
static inline __m256 q4_dot32(__m256i w, const int8_t* x) {
    __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)x));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
static inline __m256 q8_dot32(const int8_t* w, const int8_t* x) {
    __m256i a = _mm256_loadu_si256((const __m256i*)w), b = _mm256_loadu_si256((const __m256i*)x);
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
/* a group of 32 4-bit codes (16 bytes: elements 0..15 low nibbles, 16..31 high) as 32 bytes */
static inline __m256i q4_unpack32(const uint8_t* q) {
    __m128i raw = _mm_loadu_si128((const __m128i*)q);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
#endif

#if LLMC_AVX2
/* The eight int32 lanes of each of s[0..7] summed: lane j of the result is the sum of s[j]. */
static inline __m256i hsum8_epi32(const __m256i* s) {
    __m256i s0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    __m256i s4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20), _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* the d (even = 0) or s (odd = 1) fields of eight consecutive x blocks */
static inline __m256 xblock_field8(const llmc_xblock* xb, int odd) {
    __m256 a = _mm256_loadu_ps((const float*)xb), b = _mm256_loadu_ps((const float*)(xb + 4));
    __m256 picked = odd ? _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)) : _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(picked), _MM_SHUFFLE(3, 1, 2, 0)));
}

/* Eight groups of 32 at a time (G = 32: every x block meets one weight group): integer sums
 * reduced to one vector of eight group sums, then one FMA with eight combined scales. Returns the
 * number of groups done; the caller finishes the rest. */
static inline int64_t q4g32_dot_blocks8(const uint8_t* q, const f16* scales, const f16* mins, const int8_t* xq,
                                        const llmc_xblock* xb, int64_t groups, __m256* acc, __m256* minacc) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256i sums[8];
        for (int j = 0; j < 8; j++) {
            __m256i p = _mm256_maddubs_epi16(q4_unpack32(q + (g + j) * 16),
                                             _mm256_loadu_si256((const __m256i*)(xq + (g + j) * 32)));
            sums[j] = _mm256_madd_epi16(p, ones);
        }
        __m256 total = _mm256_cvtepi32_ps(hsum8_epi32(sums));
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + g)));
        __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + g)));
        *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, xblock_field8(xb + g, 0)), total, *acc);
        *minacc = _mm256_fmadd_ps(mw, xblock_field8(xb + g, 1), *minacc);
    }
    return g;
}

/* As q4g32_dot_blocks8 over pair-interleaved x codes: one load covers two groups' codes. */
static inline int64_t q4g32_dot_paired8(const uint8_t* q, const f16* scales, const f16* mins, const int8_t* xq,
                                        const llmc_xblock* xb, int64_t groups, __m256* acc, __m256* minacc) {
    const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0F);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256i pairs[4];
        for (int p = 0; p < 4; p++) {
            __m256i w = _mm256_loadu_si256((const __m256i*)(q + (g + 2 * p) * 16));
            const int8_t* x = xq + (g + 2 * p) * 32;
            __m256i low = _mm256_maddubs_epi16(_mm256_and_si256(w, nibble), _mm256_loadu_si256((const __m256i*)x));
            __m256i high = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), nibble),
                                                _mm256_loadu_si256((const __m256i*)(x + 32)));
            pairs[p] = _mm256_madd_epi16(_mm256_add_epi16(low, high), ones);   /* lanes 0-3: 2p, 4-7: 2p+1 */
        }
        __m256i mixed = _mm256_hadd_epi32(_mm256_hadd_epi32(pairs[0], pairs[1]), _mm256_hadd_epi32(pairs[2], pairs[3]));
        __m256 total = _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(mixed, order));
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + g)));
        __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + g)));
        *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, xblock_field8(xb + g, 0)), total, *acc);
        *minacc = _mm256_fmadd_ps(mw, xblock_field8(xb + g, 1), *minacc);
    }
    return g;
}

static inline int64_t q8_dot_blocks8(const int8_t* q, const f16* scales, const int8_t* xq, const llmc_xblock* xb,
                                     int64_t groups, __m256* acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256i sums[8];
        for (int j = 0; j < 8; j++) {
            __m256i w = _mm256_loadu_si256((const __m256i*)(q + (g + j) * 32));
            __m256i x = _mm256_loadu_si256((const __m256i*)(xq + (g + j) * 32));
            sums[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
        }
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scales + g)));
        *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, xblock_field8(xb + g, 0)), _mm256_cvtepi32_ps(hsum8_epi32(sums)), *acc);
    }
    return g;
}

/* Codes 32s .. 32s+31 of one 4-bit group of G as 32 bytes. G = 32: elements 0..15 are the low
 * nibbles of the group's 16 bytes, 16..31 the high ones; G >= 64: element e < G/2 is the low
 * nibble of byte e, the rest the high nibble of byte e - G/2. */
static inline __m256i q4_codes32(const uint8_t* gq, int64_t G, int64_t s) {
    if (G == 32) return q4_unpack32(gq);
    int64_t e0 = s * 32, half = G / 2;
    __m256i raw = _mm256_loadu_si256((const __m256i*)(gq + (e0 < half ? e0 : e0 - half)));
    if (e0 >= half) raw = _mm256_srli_epi16(raw, 4);
    return _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
}
#endif

/* One W row (4-bit groups of G) against one quantized x row. */
static inline float q4_row_dot(const uint8_t* q, const f16* scales, const f16* mins, const int8_t* xq,
                               const llmc_xblock* xb, int64_t K, int64_t G, int paired) {
    int64_t groups = K / G, sub = G / 32;
    float total = 0.0f;
#if LLMC_AVX2
    __m256 acc = _mm256_setzero_ps(), minvec = _mm256_setzero_ps();
    float minacc = 0.0f;
    int64_t first = G != 32 ? 0 : paired ? q4g32_dot_paired8(q, scales, mins, xq, xb, groups, &acc, &minvec)
                                         : q4g32_dot_blocks8(q, scales, mins, xq, xb, groups, &acc, &minvec);
    for (int64_t g = first; g < groups; g++) {
        const uint8_t* gq = q + g * (G / 2);
        float d = (float)scales[g], mn = (float)mins[g];
        for (int64_t s = 0; s < sub; s++) {
            const llmc_xblock* blk = xb + g * sub + s;
            __m256i w = q4_codes32(gq, G, s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * blk->d), q4_dot32(w, xq + g * G + s * 32), acc);
            minacc += mn * blk->s;
        }
    }
    total = hsum256(acc) + hsum256(minvec) + minacc;
#else
    int64_t half = G / 2;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t* gq = q + g * half;
        float d = (float)scales[g], mn = (float)mins[g];
        for (int64_t s = 0; s < sub; s++) {
            const llmc_xblock* blk = xb + g * sub + s;
            int isum = 0;
            for (int64_t i = 0; i < 32; i++) {
                int64_t e = s * 32 + i;
                int code = e < half ? (gq[e] & 0x0F) : (gq[e - half] >> 4);
                isum += code * xq[g * G + e];
            }
            total += d * blk->d * (float)isum + mn * blk->s;
        }
    }
#endif
    return total;
}

static inline float q8_row_dot(const int8_t* q, const f16* scales, const int8_t* xq, const llmc_xblock* xb, int64_t K) {
    int64_t groups = K / 32;
    float total = 0.0f;
#if LLMC_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = q8_dot_blocks8(q, scales, xq, xb, groups, &acc); g < groups; g++)
        acc = _mm256_fmadd_ps(_mm256_set1_ps((float)scales[g] * xb[g].d), q8_dot32(q + g * 32, xq + g * 32), acc);
    total = hsum256(acc);
#else
    for (int64_t g = 0; g < groups; g++) {
        int isum = 0;
        for (int i = 0; i < 32; i++) isum += q[g * 32 + i] * xq[g * 32 + i];
        total += (float)scales[g] * xb[g].d * (float)isum;
    }
#endif
    return total;
}

/* Four x rows against one W row: each weight group is decoded once for all four. */
static inline void q_rows_dot4(const void* codes, const f16* scales, const f16* mins, int64_t bits, const int8_t* xq,
                               const llmc_xblock* xb, int64_t K, int64_t G, float* r) {
    int64_t groups = K / G, sub = G / 32, blocks = K / 32;
#if LLMC_AVX2
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float minacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = 0; g < groups; g++) {
        float d = (float)scales[g], mn = bits == 4 ? (float)mins[g] : 0.0f;
        for (int64_t s = 0; s < sub; s++) {
            int64_t e0 = g * G + s * 32, b = g * sub + s;
            if (bits == 8) {
                __m256i w = _mm256_loadu_si256((const __m256i*)((const int8_t*)codes + e0));
                __m256i wabs = _mm256_sign_epi8(w, w);
                for (int j = 0; j < 4; j++) {
                    __m256i x = _mm256_loadu_si256((const __m256i*)(xq + j * K + e0));
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb[j * blocks + b].d), _mm256_cvtepi32_ps(p), acc[j]);
                }
                continue;
            }
            const uint8_t* gq = (const uint8_t*)codes + g * (G / 2);
            __m256i w = q4_codes32(gq, G, s);
            for (int j = 0; j < 4; j++) {
                const llmc_xblock* blk = xb + j * blocks + b;
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * blk->d), q4_dot32(w, xq + j * K + e0), acc[j]);
                minacc[j] += mn * blk->s;
            }
        }
    }
    for (int j = 0; j < 4; j++) r[j] = hsum256(acc[j]) + minacc[j];
#else
    for (int j = 0; j < 4; j++)
        r[j] = bits == 4 ? q4_row_dot((const uint8_t*)codes, scales, mins, xq + j * K, xb + j * blocks, K, G, 0)
                         : q8_row_dot((const int8_t*)codes, scales, xq + j * K, xb + j * blocks, K);
#endif
}

#define LLMC_ROW_BLOCK 64      /* x rows kept hot while a task's W rows pass over them */

/* Quantized linear: x rows are quantized to int8 blocks in `scratch` (M*K bytes, then M*K/32
 * blocks), then each task takes `tile` W rows against every x row. bits 4: codes/scales/mins of
 * group G; bits 8: codes/scales, G = 32. */
/* W rows [n0, n1) of a quantized weight as f32 rows of K in out */
static void dequantize_rows(const void* codes, const f16* scales, const f16* mins, int64_t bits, int64_t K, int64_t G,
                            int64_t n0, int64_t n1, float* out) {
    int64_t groups = K / G;
    for (int64_t n = n0; n < n1; n++) {
        float* dst = out + (n - n0) * K;
        for (int64_t g = 0; g < groups; g++) {
            float d = (float)scales[n * groups + g];
            if (bits == 8) {
                const int8_t* q = (const int8_t*)codes + n * K + g * G;
                for (int64_t e = 0; e < G; e++) dst[g * G + e] = (float)q[e] * d;
            } else {
                const uint8_t* q = (const uint8_t*)codes + n * (K / 2) + g * (G / 2);
                float mn = (float)mins[n * groups + g];
                for (int64_t e = 0; e < G / 2; e++) {
                    dst[g * G + e] = (float)(q[e] & 0x0F) * d + mn;
                    dst[g * G + e + G / 2] = (float)(q[e] >> 4) * d + mn;
                }
            }
        }
    }
}

#define LLMC_DEQUANT_ROWS 16   /* prefill: from this many x rows on, W tiles are widened to f32 */

LLMC_KERNEL void llmc_linear_q(const float* x, int64_t ldx, const void* codes, const f16* scales, const f16* mins,
                               const float* b, float* y, int64_t M, int64_t N, int64_t K, int64_t bits, int64_t G,
                               int64_t tile, void* scratch) {
    if (M >= LLMC_DEQUANT_ROWS) {
        /* Many rows: widening each task's W rows once costs little next to M dot products per row,
         * and the f32 block is both faster here and exact (no activation rounding). */
        float* wide = (float*)malloc((size_t)(tile * K) * sizeof(float));
        float* packed = packing_buffer(M, tile, K);
        int64_t tasks = llmc_tasks(N, tile);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
            dequantize_rows(codes, scales, mins, bits, K, G, n0, n1, wide);
            linear_rows(x, ldx, wide, K, b ? b + n0 : 0, y + n0, N, M, n1 - n0, K, packed);
        }
        free(packed);
        free(wide);
        return;
    }
    int8_t* xq = (int8_t*)scratch;
    llmc_xblock* xb = (llmc_xblock*)((char*)scratch + ((M * K + 63) / 64) * 64);
    /* decode on AVX2: pair-interleaved x codes for the 4-bit groups-of-32 fast path */
    int paired = LLMC_AVX2 && M == 1 && bits == 4 && G == 32;
    llmc_quantize_rows(x, ldx, M, K, xq, xb, paired);
    int64_t tasks = llmc_tasks(N, tile), groups = K / G, row_bytes = bits == 4 ? K / 2 : K;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        for (int64_t m0 = 0; m0 < M; m0 += LLMC_ROW_BLOCK) {
            int64_t m1 = m0 + LLMC_ROW_BLOCK < M ? m0 + LLMC_ROW_BLOCK : M;
            for (int64_t n = n0; n < n1; n++) {
                const char* wq = (const char*)codes + n * row_bytes;
                const f16* ws = scales + n * groups;
                const f16* wm = bits == 4 ? mins + n * groups : 0;
                float bias = b ? b[n] : 0.0f;
                int64_t m = m0;
                for (; m + 4 <= m1; m += 4) {
                    float r[4];
                    q_rows_dot4(wq, ws, wm, bits, xq + m * K, xb + m * (K / 32), K, G, r);
                    for (int j = 0; j < 4; j++) y[(m + j) * N + n] = r[j] + bias;
                }
                for (; m < m1; m++) {
                    float v = bits == 4 ? q4_row_dot((const uint8_t*)wq, ws, wm, xq + m * K, xb + m * (K / 32), K, G,
                                                     paired)
                                        : q8_row_dot((const int8_t*)wq, ws, xq + m * K, xb + m * (K / 32), K);
                    y[m * N + n] = v + bias;
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Embeddings */

LLMC_KERNEL void llmc_embedding(const char* table, int64_t row_bytes, int64_t rows, const int64_t* ids, int64_t n,
                                char* out) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i] < 0 ? 0 : (ids[i] >= rows ? rows - 1 : ids[i]);
        memcpy(out + i * row_bytes, table + id * row_bytes, (size_t)row_bytes);
    }
}

LLMC_KERNEL void llmc_embedding_q(const void* codes, const f16* scales, const f16* mins, int64_t rows, int64_t K,
                                  int64_t bits, int64_t G, const int64_t* ids, int64_t n, float* out) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i] < 0 ? 0 : (ids[i] >= rows ? rows - 1 : ids[i]);
        dequantize_rows(codes, scales, mins, bits, K, G, id, id + 1, out + i * K);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Norms over the last axis: rows of D at a stride in, contiguous rows out. add_norm first writes
 * sum = x + r (contiguous), then normalises it. kind 0: RMSNorm, 1: LayerNorm. */

static inline void norm_row(const float* x, const float* w, const float* b, float eps, int kind, int64_t D, float* out) {
    if (kind == 0) {
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
        float scale = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[i] = x[i] * scale * (w ? w[i] : 1.0f);
    } else {
        float mean = 0.0f, var = 0.0f;
        for (int64_t i = 0; i < D; i++) mean += x[i];
        mean /= (float)D;
        for (int64_t i = 0; i < D; i++) var += (x[i] - mean) * (x[i] - mean);
        float scale = 1.0f / sqrtf(var / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[i] = (x[i] - mean) * scale * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
    }
}

LLMC_KERNEL void llmc_norm(const float* x, int64_t ldx, const float* w, const float* b, float eps, int64_t kind,
                           int64_t R, int64_t D, float* out) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) norm_row(x + r * ldx, w, b, eps, (int)kind, D, out + r * D);
}

LLMC_KERNEL void llmc_add_norm(const float* x, int64_t ldx, const float* res, int64_t ldr, const float* w,
                               const float* b, float eps, int64_t kind, int64_t R, int64_t D, float* sum, float* out) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        float* s = sum + r * D;
        for (int64_t i = 0; i < D; i++) s[i] = x[r * ldx + i] + res[r * ldr + i];
        norm_row(s, w, b, eps, (int)kind, D, out + r * D);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Attention over the KV cache. q [Hq, seq, D], k/v [Hk, seq, D] at element strides (head, pos),
 * D contiguous; the layer's caches are [Hk, ctx, D] (f32, or int8 codes with an f32 scale per
 * head and position). This step's K/V are written at start..start+seq, then query i (position
 * start+i) attends causally over 0..start+i, within the last `window` positions when window > 0.
 * Online softmax in blocks of keys; out [seq, Hq, D] at strides (head, pos). Decode (seq = 1)
 * splits the keys of each head across `splits` tasks (flash-decoding) and merges the partial
 * results, kept in scratch: splits * Hq * (D + 2) floats. */

#define LLMC_KEY_BLOCK 32

static inline void kv8_quantize(const float* src, int64_t D, int8_t* codes, float* scale) {
    float amax = 0.0f;
    for (int64_t i = 0; i < D; i++) amax = fmaxf(amax, fabsf(src[i]));
    float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int64_t i = 0; i < D; i++) {
        float q = nearbyintf(src[i] * inv);
        codes[i] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
    }
    *scale = s;
}

/* partial attention of one query over keys [lo, hi): running max m, sum l, unnormalised acc */
static void attend_span(const float* q, const void* kc, const float* ks, const void* vc, const float* vs, int kv8,
                        int64_t lo, int64_t hi, int64_t D, float scale, float* m_out, float* l_out, float* acc) {
    float m = -INFINITY, l = 0.0f, scores[LLMC_KEY_BLOCK];
    for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
    float kbuf[512];
    for (int64_t t0 = lo; t0 < hi; t0 += LLMC_KEY_BLOCK) {
        int64_t n = hi - t0 < LLMC_KEY_BLOCK ? hi - t0 : LLMC_KEY_BLOCK;
        float block_max = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            float s;
            if (kv8) {
                const int8_t* kr = (const int8_t*)kc + (t0 + j) * D;
                for (int64_t i = 0; i < D; i++) kbuf[i] = (float)kr[i];
                s = dot_f32(q, kbuf, D) * ks[t0 + j];
            } else {
                s = dot_f32(q, (const float*)kc + (t0 + j) * D, D);
            }
            scores[j] = s * scale;
            block_max = fmaxf(block_max, scores[j]);
        }
        float m_new = fmaxf(m, block_max);
        float correction = expf(m - m_new);
        l *= correction;
        for (int64_t i = 0; i < D; i++) acc[i] *= correction;
        for (int64_t j = 0; j < n; j++) {
            float p = expf(scores[j] - m_new);
            l += p;
            if (kv8) {
                const int8_t* vr = (const int8_t*)vc + (t0 + j) * D;
                float pv = p * vs[t0 + j];
                for (int64_t i = 0; i < D; i++) acc[i] += pv * (float)vr[i];
            } else {
                const float* vr = (const float*)vc + (t0 + j) * D;
                for (int64_t i = 0; i < D; i++) acc[i] += p * vr[i];
            }
        }
        m = m_new;
    }
    *m_out = m;
    *l_out = l;
}

LLMC_KERNEL void llmc_attention(const float* q, int64_t q_h, int64_t q_s, const float* k, int64_t k_h, int64_t k_s,
                                const float* v, int64_t v_h, int64_t v_s, void* k_cache, float* k_scale,
                                void* v_cache, float* v_scale, int64_t kv8, int64_t ctx, int64_t Hq, int64_t Hk,
                                int64_t D, int64_t seq, int64_t start, float scale, int64_t window,
                                float* out, int64_t o_h, int64_t o_s, float* scratch, int64_t max_splits) {
    /* 1. this step's keys and values into the cache */
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < Hk * seq; task++) {
        int64_t h = task / seq, i = task % seq, pos = h * ctx + start + i;
        if (kv8) {
            kv8_quantize(k + h * k_h + i * k_s, D, (int8_t*)k_cache + pos * D, k_scale + pos);
            kv8_quantize(v + h * v_h + i * v_s, D, (int8_t*)v_cache + pos * D, v_scale + pos);
        } else {
            memcpy((float*)k_cache + pos * D, k + h * k_h + i * k_s, (size_t)D * sizeof(float));
            memcpy((float*)v_cache + pos * D, v + h * v_h + i * v_s, (size_t)D * sizeof(float));
        }
    }
    int64_t group = Hq / Hk, elem = kv8 ? 1 : 4;
    int64_t keys = start + seq;
    int64_t splits = 1;
    if (seq == 1 && max_splits > 1) {
        splits = (keys + 255) / 256;                      /* at least 256 keys per split */
        if (splits > max_splits) splits = max_splits;
    }
    /* 2. every (head, query, split) */
    #pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < Hq * seq * splits; task++) {
        int64_t h = task / (seq * splits), rest = task % (seq * splits), i = rest / splits, part = rest % splits;
        int64_t kh = h / group, pos = start + i;
        int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0, hi = pos + 1;
        int64_t span = (hi - lo + splits - 1) / splits;
        int64_t a = lo + part * span, z = a + span < hi ? a + span : hi;
        const char* kc = (const char*)k_cache + kh * ctx * D * elem;
        const char* vc = (const char*)v_cache + kh * ctx * D * elem;
        const float* ks = kv8 ? k_scale + kh * ctx : 0;
        const float* vs = kv8 ? v_scale + kh * ctx : 0;
        float* dst = splits == 1 ? out + h * o_h + i * o_s : scratch + (h * splits + part) * (D + 2);
        float m = -INFINITY, l = 0.0f;
        if (a < z) attend_span(q + h * q_h + i * q_s, kc, ks, vc, vs, (int)kv8, a, z, D, scale, &m, &l, dst);
        else for (int64_t d = 0; d < D; d++) dst[d] = 0.0f;
        if (splits == 1) {
            float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int64_t d = 0; d < D; d++) dst[d] *= inv;
        } else {
            dst[D] = m;
            dst[D + 1] = l;
        }
    }
    if (splits == 1) return;
    /* 3. merge the splits of each head */
    #pragma omp for schedule(static)
    for (int64_t h = 0; h < Hq; h++) {
        float m = -INFINITY, l = 0.0f;
        for (int64_t p = 0; p < splits; p++) m = fmaxf(m, scratch[(h * splits + p) * (D + 2) + D]);
        float* dst = out + h * o_h;
        for (int64_t d = 0; d < D; d++) dst[d] = 0.0f;
        for (int64_t p = 0; p < splits; p++) {
            const float* part = scratch + (h * splits + p) * (D + 2);
            if (part[D + 1] == 0.0f) continue;
            float c = expf(part[D] - m);
            l += c * part[D + 1];
            for (int64_t d = 0; d < D; d++) dst[d] += c * part[d];
        }
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; d++) dst[d] *= inv;
    }
}
