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
#include <omp.h>
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
 * e^x in plain C that the compiler vectorises (Cephes' expf, as exp256 in the attention: within 2
 * ulp; x is clamped to [-87.3, 88], so far below it gives about 1e-38, not 0): the generated
 * loops' silu, sigmoid and swiglu, where libm's expf would keep them scalar. */
static inline float llmc_expf(float x) {
    x = x < -87.3365f ? -87.3365f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + (r + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

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
 * `tile` (from the autotuner) is the number of W rows one task takes; tasks split N across threads.
 *
 * Batch invariance: the arithmetic of an output y[m, n] depends on x row m, W row n and K alone,
 * never on M, on the row's place in x, on the tile or on the thread count, so a sequence gets the
 * same bits alone or in any batch. Each kernel fixes one accumulation order per output; register
 * tiles of several x rows by several W rows only share loads, and every output inside a tile is
 * computed exactly as it would be alone. */

static inline int64_t llmc_tasks(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

#if LLMC_AVX2
/* hsum256's tree, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), for four vectors at once:
 * the sums of a, b, c, d in that order. */
static inline __m128 hsum256x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    __m256d abd = _mm256_castps_pd(ab), cdd = _mm256_castps_pd(cd);
    __m256 u = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(abd, cdd)), _mm256_castpd_ps(_mm256_unpackhi_pd(abd, cdd)));
    __m256 s = _mm256_add_ps(u, _mm256_permute_ps(u, 0xB1));           /* a a c c | b b d d */
    return _mm_blend_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1), 0xA);
}

/* The same tree for eight vectors: the sums of v0 v2 v4 v6 v1 v3 v5 v7, in that order. */
static inline __m256 hsum256x8(const __m256* v) {
    __m256d h[4];
    for (int i = 0; i < 4; i++)
        h[i] = _mm256_castps_pd(_mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                                              _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31)));
    __m256 u0 = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(h[0], h[1])),
                              _mm256_castpd_ps(_mm256_unpackhi_pd(h[0], h[1])));
    __m256 u1 = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(h[2], h[3])),
                              _mm256_castpd_ps(_mm256_unpackhi_pd(h[2], h[3])));
    return _mm256_add_ps(_mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

/* ---------------------------------------------------------------------------------------------
 * f32 and f16 linears. Every output is one dot product in a fixed order: eight lanes, lane j
 * accumulating k = 8t + j by FMA for t = 0, 1, ... (the last eight padded with zeros), the lanes
 * summed by hsum256's tree, then the bias. The GEMM runs it 3 x rows by 4 W rows at a time (12
 * accumulators; per 8 k three x loads, four W loads, twelve FMAs: as few loads per FMA as a 6x16
 * outer-product tile, and no packing), decode 1 x row by 8 W rows. `half`: W is f16, widened by
 * F16C as it is loaded. */

static inline const void* w_row(const void* w, int half, int64_t n, int64_t K) {
    return half ? (const void*)((const f16*)w + n * K) : (const void*)((const float*)w + n * K);
}

#if LLMC_AVX2
/* v[at .. at + n) (n <= 8 halves) in the low lanes, zeros above, reading only v[0 .. total) */
static inline __m128i load_halves(const f16* v, int64_t total, int64_t at, int64_t n) {
    static const uint8_t keep[32] = {255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255};
    static const uint8_t down[48] = {128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128,
                                     0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                     128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128};
    if (n == 8) return _mm_loadu_si128((const __m128i*)(v + at));
    if (at + 8 <= total)
        return _mm_and_si128(_mm_loadu_si128((const __m128i*)(v + at)),
                             _mm_loadu_si128((const __m128i*)(keep + 16 - 2 * n)));
    if (at + n >= 8)      /* the eight halves ending at at + n, moved down */
        return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(v + at + n - 8)),
                                _mm_loadu_si128((const __m128i*)(down + 16 + 2 * (8 - n))));
    uint16_t few[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(few, v + at, (size_t)n * sizeof(f16));
    return _mm_loadu_si128((const __m128i*)few);
}

static inline __m256i lanes_below(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* acc[i * C + j] += the eight lanes of x row i . W row j over k in [k0, k1), for R x rows and
 * C W rows */
static inline __attribute__((always_inline)) void dot_tile(int R, int C, int half, const float* x, int64_t ldx,
                                                          const void* w, int64_t K, int64_t k0, int64_t k1,
                                                          __m256* acc) {
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
        if (half && R == 1 && k % 32 == 0) {
            /* decode reads C short f16 rows side by side, which the hardware prefetcher follows
             * late (measured on Zen 2): ask for the next tile's rows a tile ahead */
            #pragma GCC unroll 8
            for (int j = 0; j < C; j++) _mm_prefetch((const char*)((const f16*)w + (2 * C + j) * K + k), _MM_HINT_T0);
        }
        if (R > C) {             /* W vectors held, each x vector loaded once */
            __m256 wv[8];
            #pragma GCC unroll 8
            for (int j = 0; j < C; j++)
                wv[j] = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const f16*)w + j * K + k)))
                             : _mm256_loadu_ps((const float*)w + j * K + k);
            #pragma GCC unroll 4
            for (int i = 0; i < R; i++) {
                __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
                #pragma GCC unroll 8
                for (int j = 0; j < C; j++) acc[i * C + j] = _mm256_fmadd_ps(xv, wv[j], acc[i * C + j]);
            }
        } else {                 /* x vectors held, each W vector loaded once */
            __m256 xv[4];
            #pragma GCC unroll 4
            for (int i = 0; i < R; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
            #pragma GCC unroll 8
            for (int j = 0; j < C; j++) {
                __m256 wv = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const f16*)w + j * K + k)))
                                 : _mm256_loadu_ps((const float*)w + j * K + k);
                #pragma GCC unroll 4
                for (int i = 0; i < R; i++) acc[i * C + j] = _mm256_fmadd_ps(xv[i], wv, acc[i * C + j]);
            }
        }
    }
    if (k < k1) {                /* the last K % 8, zero-padded */
        __m256i lanes = lanes_below(K - k);
        #pragma GCC unroll 8
        for (int j = 0; j < C; j++) {
            __m256 wv = half ? _mm256_cvtph_ps(load_halves((const f16*)w + j * K, K, k, K - k))
                             : _mm256_maskload_ps((const float*)w + j * K + k, lanes);
            #pragma GCC unroll 4
            for (int i = 0; i < R; i++)
                acc[i * C + j] = _mm256_fmadd_ps(_mm256_maskload_ps(x + i * ldx + k, lanes), wv, acc[i * C + j]);
        }
    }
}

static inline __m128 bias4(const float* b) { return b ? _mm_loadu_ps(b) : _mm_setzero_ps(); }

#define LLMC_K_CHUNK 640       /* k per pass of a 3-row strip: its x and a W tile's rows stay in L1 */
#define LLMC_COL_GROUP 64      /* W rows whose accumulators wait between passes */

static inline __attribute__((always_inline)) void zero(__m256* acc, int n) {
    #pragma GCC unroll 12
    for (int i = 0; i < n; i++) acc[i] = _mm256_setzero_ps();
}

/* x rows m .. m + 3 against W rows [n0, n1) (n1 - n0 <= LLMC_COL_GROUP, a multiple of 4): K in
 * chunks, each chunk over every 4-row tile, the tiles' accumulators kept in `parked` in between */
static inline __attribute__((always_inline)) void strip_3x4(const float* xm, int64_t ldx, const void* w, int half,
                                                           const float* b, float* ym, int64_t ldy, int64_t n0,
                                                           int64_t n1, int64_t K, __m256* parked) {
    __m256 acc[12];
    int64_t passes = (K + LLMC_K_CHUNK - 1) / LLMC_K_CHUNK, chunk = (K / passes + 7) & ~(int64_t)7;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        int64_t k1 = k0 + chunk < K ? k0 + chunk : K;
        for (int64_t n = n0; n < n1; n += 4) {
            __m256* park = parked + (n - n0) / 4 * 12;
            if (k0 == 0) zero(acc, 12);
            else for (int i = 0; i < 12; i++) acc[i] = park[i];
            dot_tile(3, 4, half, xm, ldx, w_row(w, half, n, K), K, k0, k1, acc);
            if (k1 < K) {
                for (int i = 0; i < 12; i++) park[i] = acc[i];
                continue;
            }
            __m256 rows01[8] = {acc[0], acc[4], acc[1], acc[5], acc[2], acc[6], acc[3], acc[7]};
            __m256 two = _mm256_add_ps(hsum256x8(rows01),
                                       b ? _mm256_broadcast_ps((const __m128*)(b + n)) : _mm256_setzero_ps());
            _mm_storeu_ps(ym + n, _mm256_castps256_ps128(two));
            _mm_storeu_ps(ym + ldy + n, _mm256_extractf128_ps(two, 1));
            _mm_storeu_ps(ym + 2 * ldy + n, _mm_add_ps(hsum256x4(acc[8], acc[9], acc[10], acc[11]), bias4(b ? b + n : 0)));
        }
    }
}

/* W rows [0, N) against M x rows, into y at row stride ldy; b: the N biases or NULL. Inlined into
 * each kernel, so that `half` is a constant there. */
static inline __attribute__((always_inline)) void linear_block(const float* x, int64_t ldx, const void* w, int half,
                                                              const float* b, float* y, int64_t ldy, int64_t M,
                                                              int64_t N, int64_t K) {
    __m256 acc[12], parked[LLMC_COL_GROUP / 4 * 12];
    int64_t m = 0, N4 = N / 4 * 4;
    for (; m + 3 <= M; m += 3) {
        const float* xm = x + m * ldx;
        float* ym = y + m * ldy;
        for (int64_t n0 = 0; n0 < N4; n0 += LLMC_COL_GROUP)
            strip_3x4(xm, ldx, w, half, b, ym, ldy, n0, n0 + LLMC_COL_GROUP < N4 ? n0 + LLMC_COL_GROUP : N4, K, parked);
        for (int64_t n = N4; n < N; n++) {
            zero(acc, 3);
            dot_tile(3, 1, half, xm, ldx, w_row(w, half, n, K), K, 0, K, acc);
            float sums[4];
            _mm_storeu_ps(sums, hsum256x4(acc[0], acc[1], acc[2], acc[2]));
            for (int i = 0; i < 3; i++) ym[i * ldy + n] = sums[i] + (b ? b[n] : 0.0f);
        }
    }
    for (; m < M; m++) {
        const float* xm = x + m * ldx;
        float* ym = y + m * ldy;
        int64_t n = 0;
        for (; n + 8 <= N; n += 8) {
            zero(acc, 8);
            dot_tile(1, 8, half, xm, ldx, w_row(w, half, n, K), K, 0, K, acc);
            __m256 ordered[8] = {acc[0], acc[4], acc[1], acc[5], acc[2], acc[6], acc[3], acc[7]};
            __m256 bias = b ? _mm256_loadu_ps(b + n) : _mm256_setzero_ps();
            _mm256_storeu_ps(ym + n, _mm256_add_ps(hsum256x8(ordered), bias));
        }
        for (; n < N; n++) {
            zero(acc, 1);
            dot_tile(1, 1, half, xm, ldx, w_row(w, half, n, K), K, 0, K, acc);
            ym[n] = hsum256(acc[0]) + (b ? b[n] : 0.0f);
        }
    }
}
#else
/* Portable: the same eight lanes and tree (without FMA), one output at a time. */
static float dot_lanes(const float* x, const void* w, int half, int64_t K) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t k = 0; k < K; k += 8)
        for (int j = 0; j < 8 && k + j < K; j++)
            acc[j] += x[k + j] * (half ? (float)((const f16*)w)[k + j] : ((const float*)w)[k + j]);
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

static void linear_block(const float* x, int64_t ldx, const void* w, int half, const float* b, float* y,
                         int64_t ldy, int64_t M, int64_t N, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++)
            y[m * ldy + n] = dot_lanes(x + m * ldx, w_row(w, half, n, K), half, K) + (b ? b[n] : 0.0f);
}
#endif

LLMC_KERNEL void llmc_linear_f32(const float* x, int64_t ldx, const float* w, const float* b, float* y,
                                 int64_t M, int64_t N, int64_t K, int64_t tile) {
    int64_t tasks = llmc_tasks(N, tile);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        linear_block(x, ldx, w + n0 * K, 0, b ? b + n0 : 0, y + n0, N, M, n1 - n0, K);
    }
}

LLMC_KERNEL void llmc_linear_f16(const float* x, int64_t ldx, const f16* w, const float* b, float* y,
                                 int64_t M, int64_t N, int64_t K, int64_t tile) {
    int64_t tasks = llmc_tasks(N, tile);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        linear_block(x, ldx, w + n0 * K, 1, b ? b + n0 : 0, y + n0, N, M, n1 - n0, K);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Quantized linears (bits 4: codes/scales/mins of groups of G = 32 or 128, the schemes of
 * llmc/quant.py; bits 8: codes/scales, G = 32). At every M, each row of x is first rounded to int8
 * per block of 32 (scale d = amax/127, and s = d * sum of codes, what a weight group's min
 * multiplies), as llama.cpp's q8_1 activations; integer dot products of 32 codes then give each
 * block's exact sum S, whatever order computes it. The float arithmetic of an output is fixed:
 * the blocks in runs of eight, each run one step of eight lanes,
 *     acc = fma(dw * d, S, acc)  then, 4-bit,  acc = fma(min, s, acc)
 * with dw and min the block's weight group's scale and min (a last, shorter run adds zeros to the
 * lanes past its end); then hsum256's tree, then the bias. Lane j of a run holds its block j, or
 * for a full run of 4-bit groups of 32 its block RUN_ORDER[j] = 0 2 4 6 1 3 5 7, the order the
 * pair reductions leave their sums in. Decode runs it for one x row; a GEMM tile runs four rows
 * (the last two or three of a call together), each weight group decoded once for them. */

typedef struct {
    int64_t bits, G, K, blocks, tail;          /* blocks of 32 per row; blocks in the last, short run */
    const void* codes; const f16* scales; const f16* mins;
    int64_t row_bytes, groups, all_groups;     /* W: bytes and groups per row, groups in all N rows */
    const int8_t* xq; const float* xd; const float* xs;   /* x codes [M][K], block scales and sums [M][blocks] */
} llmc_qlinear;

/* One block of 32 x values as int8 codes (round to nearest even of x * 127/amax) into lo[0..15]
 * and hi[0..15]; returns the sum of the codes, *d the scale amax/127. */
static inline int quantize_block(const float* src, int8_t* lo, int8_t* hi, float* d) {
#if LLMC_AVX2
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(src + 8 * i);
        top = _mm256_max_ps(top, _mm256_and_ps(v[i], magnitude));
    }
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));   /* rounds to nearest even */
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128i w01 = _mm_packs_epi32(_mm256_castsi256_si128(q[0]), _mm256_extracti128_si256(q[0], 1));
    __m128i w23 = _mm_packs_epi32(_mm256_castsi256_si128(q[1]), _mm256_extracti128_si256(q[1], 1));
    __m128i w45 = _mm_packs_epi32(_mm256_castsi256_si128(q[2]), _mm256_extracti128_si256(q[2], 1));
    __m128i w67 = _mm_packs_epi32(_mm256_castsi256_si128(q[3]), _mm256_extracti128_si256(q[3], 1));
    _mm_storeu_si128((__m128i*)lo, _mm_packs_epi16(w01, w23));
    _mm_storeu_si128((__m128i*)hi, _mm_packs_epi16(w45, w67));
    *d = amax / 127.0f;
    return _mm_cvtsi128_si32(s4);
#else
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) {
        float a = fabsf(src[i]);
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int i = 0; i < 32; i++) {
        int q = (int)nearbyintf(src[i] * inv);
        (i < 16 ? lo : hi - 16)[i] = (int8_t)q;
        sum += q;
    }
    *d = amax / 127.0f;
    return sum;
#endif
}

/* x rows as int8 codes per block of 32, with the blocks' d and s. With `paired` (4-bit groups of
 * 32 on AVX2), the codes of blocks 2p and 2p+1 are stored [2p: 0..15][2p+1: 0..15][2p: 16..31]
 * [2p+1: 16..31], the order in which one 32-byte load of 4-bit weight codes (two groups) yields its
 * low and its high nibbles, and the d and s of each full run of eight blocks in RUN_ORDER. */
static inline void quantize_task(const float* x, int64_t ldx, int64_t K, int paired, int8_t* codes, float* xd,
                                 float* xs, int64_t task) {
    int64_t per_row = K / 32, paired_blocks = paired ? per_row / 2 * 2 : 0, in_runs = paired ? per_row / 8 * 8 : 0;
    int64_t m = task / per_row, j = task % per_row;
    int8_t* dst = codes + m * K + j * 32;
    int8_t *lo = dst, *hi = dst + 16;                  /* where elements 0..15 and 16..31 go */
    if (j < paired_blocks) {
        lo = codes + m * K + (j & ~1) * 32 + (j & 1) * 16;
        hi = lo + 32;
    }
    float d;
    int sum = quantize_block(x + m * ldx + j * 32, lo, hi, &d);
    int64_t at = j < in_runs ? (j & ~7) + (j & 1) * 4 + (j & 7) / 2 : j;     /* full runs in RUN_ORDER */
    xd[m * per_row + at] = d;
    xs[m * per_row + at] = d * (float)sum;
}

static void llmc_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int paired, int8_t* codes,
                               float* xd, float* xs) {
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < M * (K / 32); task++) quantize_task(x, ldx, K, paired, codes, xd, xs, task);
}

/* At most this many x values (a decode step's row or two) are rounded by every thread for itself,
 * into its stack, rather than shared out: a few hundred ns of redundant work instead of the
 * barrier that sharing them needs (one of a linear's two). The values are the same either way. */
#define LLMC_PRIVATE_X 4096
typedef struct {
    int8_t codes[LLMC_PRIVATE_X] __attribute__((aligned(32)));
    float d[LLMC_PRIVATE_X / 32], s[LLMC_PRIVATE_X / 32];
} llmc_private_x;

static inline void quantize_rows_alone(const float* x, int64_t ldx, int64_t M, int64_t K, int paired,
                                       llmc_private_x* own) {
    for (int64_t task = 0; task < M * (K / 32); task++) quantize_task(x, ldx, K, paired, own->codes, own->d, own->s, task);
}

#if LLMC_AVX2
/* Integer sums are exact in any order, so these reductions use in-lane unpacks and adds (one
 * cycle each) rather than phaddd (two on Zen 2). */

/* [a0+a2, b0+b2, a1+a3, b1+b3] in each 128-bit half, of 32-bit lanes (or of pairs of 16-bit ones) */
static inline __m256i fold32(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}
static inline __m256i fold32_epi16(__m256i a, __m256i b) {
    return _mm256_add_epi16(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}

/* with fold32 before: the four sums of each 128-bit half of a, b, c, d (ab = fold32(a, b), ...) */
static inline __m256i fold64(__m256i ab, __m256i cd) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}
static inline __m256i fold64_epi16(__m256i ab, __m256i cd) {
    return _mm256_add_epi16(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}

/* The eight int32 lanes of each of s[0..7] summed: lane j of the result is the sum of s[j]. */
static inline __m256i hsum8_epi32(const __m256i* s) {
    __m256i s0123 = fold64(fold32(s[0], s[1]), fold32(s[2], s[3]));     /* halves: s0..s3 low, s0..s3 high */
    __m256i s4567 = fold64(fold32(s[4], s[5]), fold32(s[6], s[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20), _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* The same for sixteen int16 lanes each (the 4-bit codes' partial sums: at most 2 * 15 * 127 per
 * lane, so eight of them still fit int16): the pairs stay in int16 until one final vpmaddwd, which
 * on Zen 2 shares its one pipe with vpmaddubsw. */
static inline __m256i hsum8_epi16(const __m256i* s) {
    __m256i s0123 = fold64_epi16(fold32_epi16(s[0], s[1]), fold32_epi16(s[2], s[3]));
    __m256i s4567 = fold64_epi16(fold32_epi16(s[4], s[5]), fold32_epi16(s[6], s[7]));
    __m256i pairs = _mm256_add_epi16(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                                     _mm256_permute2x128_si256(s0123, s4567, 0x31));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* The schemes' integer steps: block sums of one run (n <= 8 blocks) of one W row (its codes from
 * the run's first block at q) against R x rows (their codes from the same block at x[r]): S[r]
 * lane j is block j's sum (RUN_ORDER[j]'s for a full run of groups of 32), 0 past n. */
enum { LLMC_Q8, LLMC_Q4G32, LLMC_Q4G128 };

/* 4-bit groups of 32: one 32-byte load of codes covers two groups, whose x codes are paired */
static inline __attribute__((always_inline)) void q4g32_run_sums(int R, int64_t n, const uint8_t* q,
                                                                const int8_t* const* x, __m256i* S) {
    const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0F);
    int64_t pairs = n / 2;
    __m256i lo[4], hi[4], w = _mm256_setzero_si256();
    #pragma GCC unroll 4
    for (int64_t p = 0; p < pairs; p++) {
        w = _mm256_loadu_si256((const __m256i*)(q + p * 32));
        lo[p] = _mm256_and_si256(w, nibble);
        hi[p] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
    }
    if (n & 1) {                 /* a last group without a pair: its 16 bytes alone */
        w = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(q + pairs * 32)));
        lo[pairs] = _mm256_and_si256(w, nibble);
        hi[pairs] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        /* int16 sums, group 2p in the low half, 2p+1 in the high (each lane at most 4 * 15 * 127,
         * and the folds below add four: still within int16) */
        __m256i sums[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        #pragma GCC unroll 4
        for (int64_t p = 0; p < pairs; p++) {
            const int8_t* xp = x[r] + p * 64;
            sums[p] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[p], _mm256_loadu_si256((const __m256i*)xp)),
                                       _mm256_maddubs_epi16(hi[p], _mm256_loadu_si256((const __m256i*)(xp + 32))));
        }
        if (n & 1) {             /* its x codes in order, 0..15 then 16..31 */
            const int8_t* xp = x[r] + pairs * 64;
            sums[pairs] = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo[pairs], _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)xp))),
                _mm256_maddubs_epi16(hi[pairs], _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(xp + 16)))));
        }
        /* the folds leave groups 0 2 4 6 1 3 5 7: kept for a full run (RUN_ORDER), put in order for a short one */
        __m256i mixed = _mm256_madd_epi16(fold64_epi16(fold32_epi16(sums[0], sums[1]), fold32_epi16(sums[2], sums[3])), ones);
        S[r] = n == 8 ? mixed : _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    }
}

/* 4-bit groups of 128 (a run holds two; a short run, one): a 32-byte load at byte 32h of a group
 * gives its block h (low nibbles) and block h + 2 (high) */
static inline __attribute__((always_inline)) void q4g128_run_sums(int R, int64_t n, const uint8_t* q,
                                                                 const int8_t* const* x, __m256i* S) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i w[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; j++) w[j] = _mm256_setzero_si256();                /* past n: unread */
    #pragma GCC unroll 2
    for (int64_t g = 0; g < n / 4; g++)
        #pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i raw = _mm256_loadu_si256((const __m256i*)(q + g * 64 + h * 32));
            w[4 * g + h] = _mm256_and_si256(raw, nibble);
            w[4 * g + h + 2] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
        }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        __m256i sums[8];
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j++) sums[j] = _mm256_setzero_si256();
        #pragma GCC unroll 8
        for (int64_t j = 0; j < n; j++)
            sums[j] = _mm256_maddubs_epi16(w[j], _mm256_loadu_si256((const __m256i*)(x[r] + j * 32)));
        S[r] = hsum8_epi16(sums);
    }
}

/* 8-bit codes, signed: the sign trick, |w| . (x * sign w) */
static inline __attribute__((always_inline)) void q8_run_sums(int R, int64_t n, const int8_t* q, const int8_t* const* x,
                                                             __m256i* S) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i w[8], wabs[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; j++) w[j] = wabs[j] = _mm256_setzero_si256();     /* past n: unread */
    #pragma GCC unroll 8
    for (int64_t j = 0; j < n; j++) {
        w[j] = _mm256_loadu_si256((const __m256i*)(q + j * 32));
        wabs[j] = _mm256_sign_epi8(w[j], w[j]);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        __m256i sums[8];
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j++) sums[j] = _mm256_setzero_si256();
        #pragma GCC unroll 8
        for (int64_t j = 0; j < n; j++) {
            __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(x[r] + j * 32)), w[j]);
            sums[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[j], xv), ones);
        }
        S[r] = hsum8_epi32(sums);
    }
}

/* The weight scales (or mins) of the groups under n blocks from block b0 of W row `row`, as the
 * run's eight lanes, 0 past n. */
static inline __attribute__((always_inline)) __m256 group_lanes(int kind, const llmc_qlinear* p, const f16* v,
                                                               int64_t row, int64_t b0, int64_t n) {
    const f16* at = v + row * p->groups;
    if (kind == LLMC_Q4G32 && n == 8)        /* in RUN_ORDER */
        return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(at + b0)),
                                                _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)));
    if (kind != LLMC_Q4G128) {
        if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(at + b0)));
        return _mm256_cvtph_ps(load_halves(v, p->all_groups, row * p->groups + b0, n));
    }
    uint32_t two = 0;                        /* the run's two groups (a short run's one) */
    memcpy(&two, at + b0 / 4, (size_t)(n / 4) * sizeof(f16));
    __m256 lanes = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_cvtsi32_si128((int)two)),
                                            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    return n == 8 ? lanes : _mm256_and_ps(lanes, _mm256_castsi256_ps(lanes_below(n)));
}

/* One run of W row `row` against R x rows (from row m): S from the codes, then each output's
 * float steps. */
static inline __attribute__((always_inline)) void q_run(int kind, int R, const llmc_qlinear* p, int64_t row,
                                                       int64_t m, int64_t b0, int64_t n, __m256* acc) {
    __m256i S[4];
    const int8_t* x[4];
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) x[r] = p->xq + (m + r) * p->K + b0 * 32;
    const char* wq = (const char*)p->codes + row * p->row_bytes;
    if (kind == LLMC_Q8) q8_run_sums(R, n, (const int8_t*)wq + b0 * 32, x, S);
    else if (kind == LLMC_Q4G32) q4g32_run_sums(R, n, (const uint8_t*)wq + b0 * 16, x, S);
    else q4g128_run_sums(R, n, (const uint8_t*)wq + b0 * 16, x, S);
    __m256 dw = group_lanes(kind, p, p->scales, row, b0, n);
    __m256 mw = kind != LLMC_Q8 ? group_lanes(kind, p, p->mins, row, b0, n) : _mm256_setzero_ps();
    __m256i lanes = lanes_below(n);
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const float* d = p->xd + (m + r) * p->blocks + b0;
        __m256 xdv = n == 8 ? _mm256_loadu_ps(d) : _mm256_maskload_ps(d, lanes);
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, xdv), _mm256_cvtepi32_ps(S[r]), acc[r]);
        if (kind != LLMC_Q8) {
            const float* s = p->xs + (m + r) * p->blocks + b0;
            acc[r] = _mm256_fmadd_ps(mw, n == 8 ? _mm256_loadu_ps(s) : _mm256_maskload_ps(s, lanes), acc[r]);
        }
    }
}

/* W row `row` against x rows m .. m + R: their eight-lane accumulators */
static inline __attribute__((always_inline)) void q_tile(int kind, int R, const llmc_qlinear* p, int64_t row, int64_t m,
                                                        __m256* acc) {
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t b0 = 0;
    for (; b0 + 8 <= p->blocks; b0 += 8) q_run(kind, R, p, row, m, b0, 8, acc);
    /* the short last run, its common lengths as constants (K = 576, 896, 960, ...): as loops of
     * unknown length the run costs as much as a full one */
    switch (p->tail) {
    case 0: break;
    case 2: q_run(kind, R, p, row, m, b0, 2, acc); break;
    case 4: q_run(kind, R, p, row, m, b0, 4, acc); break;
    case 6: q_run(kind, R, p, row, m, b0, 6, acc); break;
    default: q_run(kind, R, p, row, m, b0, p->tail, acc);
    }
}

/* W rows [n0, n1) against x rows m .. m + R (R = 2, 3 or 4), each W row's groups decoded once
 * for the R rows; hsum256x4's tree is hsum256's, so each output is what it is alone */
static inline __attribute__((always_inline)) void q_rows(int kind, int R, const llmc_qlinear* p, const float* b,
                                                        int64_t n0, int64_t n1, int64_t m, float* y, int64_t ldy) {
    __m256 acc[4];
    for (int64_t n = n0; n < n1; n++) {
        q_tile(kind, R, p, n, m, acc);
        #pragma GCC unroll 4
        for (int r = R; r < 4; r++) acc[r] = _mm256_setzero_ps();
        float sums[4];
        _mm_storeu_ps(sums, _mm_add_ps(hsum256x4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(b ? b[n] : 0.0f)));
        for (int i = 0; i < R; i++) y[(m + i) * ldy + n] = sums[i];
    }
}

/* W rows [n0, n1) against x rows [0, M), into y at row stride ldy: four x rows at a time (their
 * codes stay in L1 while the task's W rows pass over them), then the two or three left together,
 * or the one alone */
static inline __attribute__((always_inline)) void q_block_of(int kind, const llmc_qlinear* p, const float* b,
                                                            int64_t n0, int64_t n1, int64_t M, float* y, int64_t ldy) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q_rows(kind, 4, p, b, n0, n1, m, y, ldy);
    if (M - m == 3) q_rows(kind, 3, p, b, n0, n1, m, y, ldy);
    else if (M - m == 2) q_rows(kind, 2, p, b, n0, n1, m, y, ldy);
    else if (M - m == 1) {
        __m256 acc[1];
        for (int64_t n = n0; n < n1; n++) {
            q_tile(kind, 1, p, n, m, acc);
            y[m * ldy + n] = hsum256(acc[0]) + (b ? b[n] : 0.0f);
        }
    }
}

static void q_block(const llmc_qlinear* p, const float* b, int64_t n0, int64_t n1, int64_t M, float* y, int64_t ldy) {
    if (p->bits == 8) q_block_of(LLMC_Q8, p, b, n0, n1, M, y, ldy);
    else if (p->G == 32) q_block_of(LLMC_Q4G32, p, b, n0, n1, M, y, ldy);
    else q_block_of(LLMC_Q4G128, p, b, n0, n1, M, y, ldy);
}
#else
/* Portable: one output at a time, blocks in order (x codes in order, not paired). */
static float q_dot(const llmc_qlinear* p, int64_t row, int64_t m) {
    const int8_t* xq = p->xq + m * p->K;
    const float *xd = p->xd + m * p->blocks, *xs = p->xs + m * p->blocks;
    int64_t sub = p->G / 32, half = p->G / 2;
    float total = 0.0f;
    for (int64_t blk = 0; blk < p->blocks; blk++) {
        int64_t g = blk / sub;
        float d = (float)p->scales[row * p->groups + g];
        int isum = 0;
        if (p->bits == 8) {
            const int8_t* q = (const int8_t*)p->codes + row * p->row_bytes + blk * 32;
            for (int i = 0; i < 32; i++) isum += q[i] * xq[blk * 32 + i];
            total += d * xd[blk] * (float)isum;
            continue;
        }
        const uint8_t* gq = (const uint8_t*)p->codes + row * p->row_bytes + g * half;
        for (int64_t i = 0; i < 32; i++) {
            int64_t e = (blk % sub) * 32 + i;
            int code = e < half ? (gq[e] & 0x0F) : (gq[e - half] >> 4);
            isum += code * xq[blk * 32 + i];
        }
        total += d * xd[blk] * (float)isum + (float)p->mins[row * p->groups + g] * xs[blk];
    }
    return total;
}

static void q_block(const llmc_qlinear* p, const float* b, int64_t n0, int64_t n1, int64_t M, float* y, int64_t ldy) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) y[m * ldy + n] = q_dot(p, n, m) + (b ? b[n] : 0.0f);
}
#endif

/* x rows are quantized into `scratch` (M*K bytes of codes, rounded up to 64, then M*K/32 block
 * scales d and M*K/32 sums s), then each task takes `tile` W rows against every x row. */
LLMC_KERNEL void llmc_linear_q(const float* x, int64_t ldx, const void* codes, const f16* scales, const f16* mins,
                               const float* b, float* y, int64_t M, int64_t N, int64_t K, int64_t bits, int64_t G,
                               int64_t tile, void* scratch) {
    int64_t blocks = K / 32;
    int8_t* xq = (int8_t*)scratch;
    float* xd = (float*)((char*)scratch + ((M * K + 63) / 64) * 64);
    float* xs = xd + M * blocks;
    const int paired = LLMC_AVX2 && bits == 4 && G == 32;
    llmc_private_x own;
    if (M * K <= LLMC_PRIVATE_X) {
        quantize_rows_alone(x, ldx, M, K, paired, &own);
        xq = own.codes, xd = own.d, xs = own.s;
    } else {
        llmc_quantize_rows(x, ldx, M, K, paired, xq, xd, xs);
    }
    llmc_qlinear p = {bits, G, K, blocks, blocks % 8, codes, scales, mins, bits == 4 ? K / 2 : K, K / G, N * (K / G),
                      xq, xd, xs};
    int64_t tasks = llmc_tasks(N, tile);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        q_block(&p, b, n0, n1, M, y, N);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Quantized weights in panels of eight W rows (the cpu target's layout of q4g32 and q8 weights
 * whose N is a multiple of 8: targets/cpu/layout.py). Panel P holds W rows 8P .. 8P + 7; its block
 * b (K elements 32b .. 32b + 31) is 4-bit: 128 bytes of codes, four vectors of 32, in vector L
 * bytes 4i .. 4i + 3 row 8P + i's elements 32b + 8L + t (low nibble) and 32b + 8L + 4 + t (high),
 * t = 0..3; 8-bit: 256 bytes, eight vectors, in vector L row 8P + i's elements 32b + 4L + t. The
 * block's 8 scales (and mins), lane i = row 8P + i, follow the same panel-block order in their own
 * parts. So a 32-bit lane is one W row: four x codes broadcast to every lane multiply eight rows
 * at once (vpmaddubsw; 8-bit codes by the sign trick). A 4-bit block's int16 sums stay int16 (16
 * products of at most 15 * 127) until one vpmaddwd; an 8-bit one's pairs reach 2 * 127 * 127 and
 * go to int32 at once. Then
 *     acc = fma(dw * dx, S, acc)  then, 4-bit,  acc = fma(min, s, acc)
 * leaves the eight outputs in the eight lanes: no horizontal sums, and each output is the same
 * chain of FMAs over its blocks in order whatever the number of x rows, tile or thread count. */

#ifndef LLMC_PANEL_ROWS
#define LLMC_PANEL_ROWS 4                           /* x rows a tile runs against one panel */
#endif

typedef struct {
    int64_t K, blocks;                              /* blocks of 32 per row */
    const void* codes; const f16* scales; const f16* mins;
    const int8_t* xq; const float* xd; const float* xs;   /* x codes [M][K] in order, block d and s [M][blocks] */
} llmc_panels;

#if LLMC_AVX2
/* block b of panel P against x rows m .. m + R: each row's eight int32 block sums in S[r] */
static inline __attribute__((always_inline)) void panel_sums(int bits, int R, const llmc_panels* p, int64_t P,
                                                            int64_t b, const int8_t* x, __m256i* S) {
    const __m256i ones = _mm256_set1_epi16(1);
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) S[r] = _mm256_setzero_si256();
    if (bits == 4) {
        const __m256i nibble = _mm256_set1_epi8(0x0F);
        const uint8_t* w = (const uint8_t*)p->codes + (P * p->blocks + b) * 128;
        #pragma GCC unroll 4
        for (int L = 0; L < 4; L++) {
            __m256i raw = _mm256_loadu_si256((const __m256i*)(w + L * 32));
            __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                int32_t x0, x1;
                memcpy(&x0, x + r * p->K + b * 32 + L * 8, 4);
                memcpy(&x1, x + r * p->K + b * 32 + L * 8 + 4, 4);
                S[r] = _mm256_add_epi16(S[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                S[r] = _mm256_add_epi16(S[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
                /* keeps each sum in a register here: left free, the compiler reorders the integer
                 * adds into trees that hold every product at once and spill */
                __asm__("" : "+x"(S[r]));
            }
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) S[r] = _mm256_madd_epi16(S[r], ones);
    } else {
        const int8_t* w = (const int8_t*)p->codes + (P * p->blocks + b) * 256;
        #pragma GCC unroll 8
        for (int L = 0; L < 8; L++) {
            __m256i raw = _mm256_loadu_si256((const __m256i*)(w + L * 32)), magnitude = _mm256_sign_epi8(raw, raw);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                int32_t x0;
                memcpy(&x0, x + r * p->K + b * 32 + L * 4, 4);
                __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(x0), raw);
                S[r] = _mm256_add_epi32(S[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), ones));
                __asm__("" : "+x"(S[r]));
            }
        }
    }
}

/* panel P against x rows m .. m + R: the eight outputs of each row in acc[r] */
static inline __attribute__((always_inline)) void panel_tile(int bits, int R, const llmc_panels* p, int64_t P,
                                                            int64_t m, __m256* acc) {
    const f16 *sc = p->scales + P * p->blocks * 8, *mn = bits == 4 ? p->mins + P * p->blocks * 8 : 0;
    const int8_t* x = p->xq + m * p->K;
    const float *xd = p->xd + m * p->blocks, *xs = p->xs + m * p->blocks;
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < p->blocks; b++) {
        __m256i S[8];
        panel_sums(bits, R, p, P, b, x, S);
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sc + b * 8)));
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xd[r * p->blocks + b])), _mm256_cvtepi32_ps(S[r]),
                                     acc[r]);
        if (bits == 4) {
            __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + b * 8)));
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[r * p->blocks + b]), acc[r]);
        }
    }
}

static inline __attribute__((always_inline)) void panel_rows(int bits, int R, const llmc_panels* p, const float* b,
                                                            int64_t P0, int64_t P1, int64_t m, float* y, int64_t ldy) {
    __m256 acc[8];
    for (int64_t P = P0; P < P1; P++) {
        panel_tile(bits, R, p, P, m, acc);
        __m256 bias = b ? _mm256_loadu_ps(b + 8 * P) : _mm256_setzero_ps();
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (m + r) * ldy + 8 * P, _mm256_add_ps(acc[r], bias));
    }
}

static inline __attribute__((always_inline)) void panel_block_of(int bits, const llmc_panels* p, const float* b,
                                                                int64_t P0, int64_t P1, int64_t M, float* y,
                                                                int64_t ldy) {
    int64_t m = 0;
    for (; m + LLMC_PANEL_ROWS <= M; m += LLMC_PANEL_ROWS) panel_rows(bits, LLMC_PANEL_ROWS, p, b, P0, P1, m, y, ldy);
    for (; m + 4 <= M; m += 4) panel_rows(bits, 4, p, b, P0, P1, m, y, ldy);
    if (M - m == 3) panel_rows(bits, 3, p, b, P0, P1, m, y, ldy);
    else if (M - m == 2) panel_rows(bits, 2, p, b, P0, P1, m, y, ldy);
    else if (M - m == 1) panel_rows(bits, 1, p, b, P0, P1, m, y, ldy);
}

static void panel_block(int64_t bits, const llmc_panels* p, const float* b, int64_t P0, int64_t P1, int64_t M,
                        float* y, int64_t ldy) {
    if (bits == 4) panel_block_of(4, p, b, P0, P1, M, y, ldy);
    else panel_block_of(8, p, b, P0, P1, M, y, ldy);
}
#else
static void panel_block(int64_t bits, const llmc_panels* p, const float* b, int64_t P0, int64_t P1, int64_t M,
                        float* y, int64_t ldy) {
    const int64_t bytes = bits == 4 ? 128 : 256;
    for (int64_t m = 0; m < M; m++)
        for (int64_t P = P0; P < P1; P++)
            for (int i = 0; i < 8; i++) {
                float acc = 0.0f;
                for (int64_t blk = 0; blk < p->blocks; blk++) {
                    const int64_t at = P * p->blocks + blk;
                    const int8_t* x = p->xq + m * p->K + blk * 32;
                    int isum = 0;
                    if (bits == 4) {
                        const uint8_t* w = (const uint8_t*)p->codes + at * bytes;
                        for (int L = 0; L < 4; L++)
                            for (int t = 0; t < 4; t++) {
                                uint8_t byte = w[L * 32 + i * 4 + t];
                                isum += (byte & 0x0F) * x[L * 8 + t] + (byte >> 4) * x[L * 8 + 4 + t];
                            }
                    } else {
                        const int8_t* w = (const int8_t*)p->codes + at * bytes;
                        for (int L = 0; L < 8; L++)
                            for (int t = 0; t < 4; t++) isum += w[L * 32 + i * 4 + t] * x[L * 4 + t];
                    }
                    acc += (float)p->scales[at * 8 + i] * p->xd[m * p->blocks + blk] * (float)isum;
                    if (bits == 4) acc += (float)p->mins[at * 8 + i] * p->xs[m * p->blocks + blk];
                }
                y[m * ldy + 8 * P + i] = acc + (b ? b[8 * P + i] : 0.0f);
            }
}
#endif

/* The quantized linear on panels (bits 4: q4g32, 8: q8): x rows quantized into `scratch` as
 * llmc_linear_q does (in order), then each task takes `tile` W rows (rounded up to whole panels)
 * against every x row. */
LLMC_KERNEL void llmc_linear_panels(const float* x, int64_t ldx, const void* codes, const f16* scales,
                                    const f16* mins, const float* b, float* y, int64_t M, int64_t N, int64_t K,
                                    int64_t bits, int64_t tile, void* scratch) {
    int64_t blocks = K / 32;
    int8_t* xq = (int8_t*)scratch;
    float* xd = (float*)((char*)scratch + ((M * K + 63) / 64) * 64);
    float* xs = xd + M * blocks;
    llmc_private_x own;
    if (M * K <= LLMC_PRIVATE_X) {
        quantize_rows_alone(x, ldx, M, K, 0, &own);
        xq = own.codes, xd = own.d, xs = own.s;
    } else {
        llmc_quantize_rows(x, ldx, M, K, 0, xq, xd, xs);
    }
    llmc_panels p = {K, blocks, codes, scales, mins, xq, xd, xs};
    int64_t panels = N / 8, per = (tile + 7) / 8, tasks = llmc_tasks(panels, per);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t P0 = t * per, P1 = P0 + per < panels ? P0 + per : panels;
        panel_block(bits, &p, b, P0, P1, M, y, N);
    }
}

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

/* The exact path for quantized weights (the cpu option quant_activations = "f32"): each task's W
 * rows dequantized to f32 into the thread's buffer, then the f32 linear's block on x as it is, not
 * rounded to int8: the product with the dequantized weight, as the reference computes it, in the
 * f32 linear's fixed order (batch invariant as it is). Should the buffer not grow to a task's
 * rows, they go one at a time (the same arithmetic, more calls). */
LLMC_KERNEL void llmc_linear_q_exact(const float* x, int64_t ldx, const void* codes, const f16* scales,
                                     const f16* mins, const float* b, float* y, int64_t M, int64_t N, int64_t K,
                                     int64_t bits, int64_t G, int64_t tile) {
    static __thread float* rows = 0;
    static __thread int64_t capacity = 0;              /* floats */
    int64_t tasks = llmc_tasks(N, tile);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N, step = n1 - n0;
        if (step * K > capacity) {
            float* grown = (float*)realloc(rows, (size_t)(step * K) * sizeof(float));
            if (grown) {
                rows = grown;
                capacity = step * K;
            }
        }
        if (step * K > capacity) step = 1;
        if (K > capacity) abort();                     /* out of memory for one row of K floats */
        for (int64_t r0 = n0; r0 < n1; r0 += step) {
            int64_t r1 = r0 + step < n1 ? r0 + step : n1;
            dequantize_rows(codes, scales, mins, bits, K, G, r0, r1, rows);
            linear_block(x, ldx, rows, 0, b ? b + r0 : 0, y + r0, N, M, r1 - r0, K);
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

/* The same rows of a weight stored in panels (llmc_linear_panels' layout: a tied LM head) */
LLMC_KERNEL void llmc_embedding_panels(const void* codes, const f16* scales, const f16* mins, int64_t rows,
                                       int64_t K, int64_t bits, const int64_t* ids, int64_t n, float* out) {
    int64_t blocks = K / 32;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i] < 0 ? 0 : (ids[i] >= rows ? rows - 1 : ids[i]), lane = id % 8;
        float* dst = out + i * K;
        for (int64_t b = 0; b < blocks; b++) {
            int64_t at = (id / 8) * blocks + b;
            float d = (float)scales[at * 8 + lane];
            if (bits == 8) {
                const int8_t* w = (const int8_t*)codes + at * 256 + lane * 4;
                for (int L = 0; L < 8; L++)
                    for (int t = 0; t < 4; t++) dst[b * 32 + L * 4 + t] = (float)w[L * 32 + t] * d;
                continue;
            }
            const uint8_t* w = (const uint8_t*)codes + at * 128 + lane * 4;
            float mn = (float)mins[at * 8 + lane];
            for (int L = 0; L < 4; L++)
                for (int t = 0; t < 4; t++) {
                    dst[b * 32 + L * 8 + t] = (float)(w[L * 32 + t] & 0x0F) * d + mn;
                    dst[b * 32 + L * 8 + 4 + t] = (float)(w[L * 32 + t] >> 4) * d + mn;
                }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Mixture of experts (the moe and qmoe ops). x: T rows of H at stride ldx; the router [E][H] f32;
 * expert e's gate/up weight is rows e * U .. e * U + U - 1 (U = 2I gated: gate rows then up rows,
 * else I) of the stacked `up`, its down weight rows e * H .. of the stacked `down` [E * H][I], stored
 * as `kind` says: f32, f16, quantized codes + f16 scales (+ mins) read on int8 activations
 * (plain or in panels, whose rows of one expert are whole panels), or read exactly. Steps:
 *   1. the router's logits (the f32 linear);
 *   2. per token: softmax, the top k (the lower index first among equals), renormalised if asked;
 *   3. one thread sorts the T * k (token, choice) pairs by expert, stably: expert e's pairs are
 *      rows offsets[e] .. offsets[e + 1] - 1, and pair t * k + j went to row slot[t * k + j];
 *   4. the pairs' x rows gathered in that order;
 *   5. per expert that has pairs: its gate/up linear over its rows (so each expert's weights are
 *      read once a step, however many tokens chose it), the activation, its down linear;
 *   6. per token: out = the sum over j of weight j * its pair's row, in the router's order.
 * A token's result depends on its own row alone (a linear's row does not depend on how many rows
 * it runs with, and step 6 adds in a fixed order): the step stays batch invariant. */

enum { LLMC_W_F32, LLMC_W_F16, LLMC_W_Q, LLMC_W_PANELS, LLMC_W_Q_EXACT };   /* `kind` */
enum { LLMC_ACT_SILU, LLMC_ACT_GELU, LLMC_ACT_GELU_TANH, LLMC_ACT_RELU };    /* `act` */

static inline float moe_act(int64_t act, float x) {
    switch (act) {
    case LLMC_ACT_SILU: return x / (1 + llmc_expf(-x));
    case LLMC_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case LLMC_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default: return x > 0 ? x : 0;
    }
}

/* M rows of x (contiguous, K each) through rows n0 .. n0 + N - 1 of a stacked weight */
static void expert_linear(int64_t kind, int64_t bits, int64_t G, const void* codes, const f16* scales,
                          const f16* mins, int64_t n0, const float* x, int64_t M, int64_t N, int64_t K, float* y,
                          int64_t gemv, int64_t gemm, void* scratch) {
    int64_t tile = M == 1 ? gemv : gemm;
    if (kind == LLMC_W_F32) {
        llmc_linear_f32(x, K, (const float*)codes + n0 * K, 0, y, M, N, K, tile);
        return;
    }
    if (kind == LLMC_W_F16) {
        llmc_linear_f16(x, K, (const f16*)codes + n0 * K, 0, y, M, N, K, tile);
        return;
    }
    int64_t groups = K / G;                 /* panels keep a row's bytes and groups: the same offsets */
    const void* q = (const char*)codes + n0 * (bits == 4 ? K / 2 : K);
    const f16* s = scales + n0 * groups;
    const f16* m = mins ? mins + n0 * groups : 0;
    if (kind == LLMC_W_Q) llmc_linear_q(x, K, q, s, m, 0, y, M, N, K, bits, G, tile, scratch);
    else if (kind == LLMC_W_PANELS) llmc_linear_panels(x, K, q, s, m, 0, y, M, N, K, bits, tile, scratch);
    else llmc_linear_q_exact(x, K, q, s, m, 0, y, M, N, K, bits, G, tile);
}

/* Each expert's rows offsets[e] .. offsets[e + 1] - 1 of x (K each) through its N rows of a stacked
 * weight, into the same rows of y (N each); every thread runs the same loop, each linear's omp for
 * splits it. */
static void each_expert(int64_t E, const int64_t* offsets, int64_t kind, int64_t bits, int64_t G, const void* codes,
                        const f16* scales, const f16* mins, const float* x, int64_t N, int64_t K, float* y,
                        int64_t gemv, int64_t gemm, void* scratch) {
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n) expert_linear(kind, bits, G, codes, scales, mins, e * N, x + r0 * K, n, N, K, y + r0 * N, gemv, gemm,
                             scratch);
    }
}

static inline char* moe_take(char** at, int64_t bytes) {
    char* p = (char*)(((uintptr_t)*at + 63) & ~(uintptr_t)63);
    *at = p + bytes;
    return p;
}

/* `scratch`: the bytes targets/cpu/lower.py's moe_scratch gives; `tiles`: the router's, the
 * gate/up's and the down's (gemv, gemm) tiles. */
LLMC_KERNEL void llmc_moe(const float* x, int64_t ldx, int64_t T, int64_t H, const float* router, int64_t E,
                          int64_t k, int64_t normalize, int64_t act, int64_t gated, int64_t I, int64_t kind,
                          int64_t bits, int64_t G, const void* up, const f16* up_scales, const f16* up_mins,
                          const void* down, const f16* down_scales, const f16* down_mins, const int64_t* tiles,
                          float* out, void* scratch) {
    int64_t P = T * k, U = gated ? 2 * I : I;
    char* at = (char*)scratch;
    float* logits = (float*)moe_take(&at, T * E * 4);
    float* weights = (float*)moe_take(&at, P * 4);
    int64_t* ids = (int64_t*)moe_take(&at, P * 8);
    int64_t* slot = (int64_t*)moe_take(&at, P * 8);
    int64_t* offsets = (int64_t*)moe_take(&at, (E + 1) * 8);
    int64_t* cursor = (int64_t*)moe_take(&at, E * 8);
    float* xs = (float*)moe_take(&at, P * H * 4);
    float* h = (float*)moe_take(&at, P * U * 4);
    float* a = (float*)moe_take(&at, P * I * 4);
    float* o = (float*)moe_take(&at, P * H * 4);
    void* qscratch = moe_take(&at, 0);
    llmc_linear_f32(x, ldx, router, 0, logits, T, E, H, T == 1 ? tiles[0] : tiles[1]);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float* p = logits + t * E, top = p[0], total = 0.0f, chosen = 0.0f;
        for (int64_t e = 1; e < E; e++) top = p[e] > top ? p[e] : top;
        for (int64_t e = 0; e < E; e++) total += (p[e] = expf(p[e] - top));
        for (int64_t e = 0; e < E; e++) p[e] /= total;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)                   /* (a NaN is never better: still an expert) */
                if (p[e] != -2.0f && (best < 0 || p[e] > p[best])) best = e;
            ids[t * k + j] = best;
            chosen += (weights[t * k + j] = p[best]);
            p[best] = -2.0f;                                  /* taken */
        }
        if (normalize)
            for (int64_t j = 0; j < k; j++) weights[t * k + j] /= chosen;
    }
    #pragma omp single
    {
        for (int64_t e = 0; e <= E; e++) offsets[e] = 0;
        for (int64_t p = 0; p < P; p++) offsets[ids[p] + 1]++;
        for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
        for (int64_t e = 0; e < E; e++) cursor[e] = offsets[e];
        for (int64_t p = 0; p < P; p++) slot[p] = cursor[ids[p]]++;
    }
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < P; p++) memcpy(xs + slot[p] * H, x + (p / k) * ldx, (size_t)H * sizeof(float));
    each_expert(E, offsets, kind, bits, G, up, up_scales, up_mins, xs, U, H, h, tiles[2], tiles[3], qscratch);
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < P; r++) {
        const float* hr = h + r * U;
        float* ar = a + r * I;
        for (int64_t i = 0; i < I; i++) ar[i] = gated ? moe_act(act, hr[i]) * hr[I + i] : moe_act(act, hr[i]);
    }
    each_expert(E, offsets, kind, bits, G, down, down_scales, down_mins, a, H, I, o, tiles[4], tiles[5], qscratch);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float* y = out + t * H;
        for (int64_t i = 0; i < H; i++) y[i] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float* row = o + slot[t * k + j] * H;
            float w = weights[t * k + j];
            for (int64_t i = 0; i < H; i++) y[i] += w * row[i];
        }
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
 * Paged attention of one step's tokens, from any sequences at any positions. q [Hq, n, D] and
 * k/v [Hk, n, D] at element strides (head, token), D contiguous. The layer's pool is
 * [blocks, Hk, B, D] (f32, f16, or int8 codes with an f32 scale per [block, head, offset]); position p
 * of sequence s lives in block tables[s * max_blocks + p / B] at offset p % B. Every token's K/V
 * is written first; then token t (position p of sequence seq_index[t]) attends causally over its
 * sequence's positions 0..p, within the last `window` when window > 0. out [n, Hq, D] at
 * strides (head, token).
 *
 * Batch invariance: a token's keys [lo, hi) are cut into spans by its own key count alone
 * (splits = ceil((hi - lo) / LLMC_SPLIT_KEYS), at most LLMC_MAX_SPLITS), each span an online
 * softmax from scratch, and the spans merged in order by one function, whether the spans run as separate tasks (a step
 * of few tokens: flash-decoding, partials in scratch) or one after another in a task. So a
 * token's result does not depend on the step it is in. */

#define LLMC_KEY_BLOCK 32
#define LLMC_WIDE_D 256           /* the largest head the AVX2 attention takes (larger ones: the scalar loop) */
#define LLMC_QUERY_TILE 8         /* tokens of one sequence whose prefill attention reads each key block once */
enum { LLMC_KV_F32, LLMC_KV_I8, LLMC_KV_F16 };   /* the pool's format (`kv`): f32, int8 codes + scales, f16 */
#define LLMC_SPLIT_KEYS 512       /* keys per span, at least */
#define LLMC_PARTS (2 * LLMC_MAX_SPLITS * (512 + 2))   /* floats of one many-token task's partials */
/* LLMC_MAX_SPLITS (spans of one token, at most) and LLMC_SPLIT_TOKENS (steps of at most this many
 * tokens run spans as separate tasks) come from lower.py, which sizes the scratch with them. */

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

/* Where one sequence's positions live in one head of one layer's pool. */
typedef struct {
    const char* k; const char* v; const float* ks; const float* vs;   /* the layer's pool */
    const int64_t* table;                                             /* the sequence's block table */
    int64_t head, heads, B, D, elem;
    float softcap;                                                    /* > 0: scores become cap * tanh(s / cap) */
} llmc_paged;

/* slot index (into [blocks, Hk, B]) of position p */
static inline int64_t paged_slot(const llmc_paged* c, int64_t p) {
    return (c->table[p / c->B] * c->heads + c->head) * c->B + p % c->B;
}

/* partial attention of one query over positions [lo, hi): max m, sum l, unnormalised acc [D]; the
 * portable build's, and any head size that is not a multiple of 8 */
static __attribute__((noinline)) void attend_span_scalar(const float* q, const llmc_paged* c, int kv, int64_t lo,
                                                  int64_t hi, float scale, float* m_out, float* l_out, float* acc) {
    const int64_t D = c->D;
    float m = -INFINITY, l = 0.0f, scores[LLMC_KEY_BLOCK];
    int64_t slots[LLMC_KEY_BLOCK];
    for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
    float kbuf[512];
    for (int64_t t0 = lo; t0 < hi; t0 += LLMC_KEY_BLOCK) {
        int64_t n = hi - t0 < LLMC_KEY_BLOCK ? hi - t0 : LLMC_KEY_BLOCK;
        float block_max = -INFINITY;
        int64_t offset = t0 % c->B;
        for (int64_t j = 0; j < n; j++, offset++) {
            /* consecutive positions share a block: look the table up once per block */
            if (offset == c->B) offset = 0;
            slots[j] = j > 0 && offset != 0 ? slots[j - 1] + 1 : paged_slot(c, t0 + j);
            float s;
            if (kv == LLMC_KV_I8) {
                const int8_t* kr = (const int8_t*)c->k + slots[j] * D;
                for (int64_t i = 0; i < D; i++) kbuf[i] = (float)kr[i];
                s = dot_f32(q, kbuf, D) * c->ks[slots[j]];
            } else if (kv == LLMC_KV_F16) {
                const f16* kr = (const f16*)c->k + slots[j] * D;
                for (int64_t i = 0; i < D; i++) kbuf[i] = (float)kr[i];
                s = dot_f32(q, kbuf, D);
            } else {
                s = dot_f32(q, (const float*)c->k + slots[j] * D, D);
            }
            scores[j] = s * scale;
            if (c->softcap > 0.0f) scores[j] = c->softcap * tanhf(scores[j] / c->softcap);
            block_max = fmaxf(block_max, scores[j]);
        }
        float m_new = fmaxf(m, block_max);
        float correction = expf(m - m_new);
        l *= correction;
        for (int64_t i = 0; i < D; i++) acc[i] *= correction;
        for (int64_t j = 0; j < n; j++) {
            float p = expf(scores[j] - m_new);
            l += p;
            if (kv == LLMC_KV_I8) {
                const int8_t* vr = (const int8_t*)c->v + slots[j] * D;
                float pv = p * c->vs[slots[j]];
                for (int64_t i = 0; i < D; i++) acc[i] += pv * (float)vr[i];
            } else if (kv == LLMC_KV_F16) {
                const f16* vr = (const f16*)c->v + slots[j] * D;
                for (int64_t i = 0; i < D; i++) acc[i] += p * (float)vr[i];
            } else {
                const float* vr = (const float*)c->v + slots[j] * D;
                for (int64_t i = 0; i < D; i++) acc[i] += p * vr[i];
            }
        }
        m = m_new;
    }
    *m_out = m;
    *l_out = l;
}

/* A head's partial over a span, in the layout merge_spans reads: acc [D], then m, then l. */
#define PART_M(part, D) ((part)[D])
#define PART_L(part, D) ((part)[(D) + 1])

/* The queries one call of attend_span runs over one span of keys: T tokens of one sequence, each
 * with the G query heads of one K/V head. Query (j, g) is q[j] + g * q_h; its keys run from the
 * span's start to z[j]; its partial goes to dst[j] + g * d_h. */
typedef struct {
    int64_t T, G, q_h, d_h;
    const float* q[LLMC_QUERY_TILE];
    int64_t z[LLMC_QUERY_TILE];
    float* dst[LLMC_QUERY_TILE];
} llmc_queries;

#if LLMC_AVX2
/* e^x in eight lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial in r, times
 * 2^n from the exponent bits; within 2 ulp), for x <= 0; below -87.3 it gives about 1e-38, not 0. */
/* Gemma 2's soft cap of attention scores, cap * tanh(s / cap), lane by lane with libm's tanhf
 * (the same function as the scalar path: results do not depend on the path) */
static inline __m256 softcap256(__m256 s, float cap) {
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    for (int i = 0; i < 8; i++) lanes[i] = cap * tanhf(lanes[i] / cap);
    return _mm256_loadu_ps(lanes);
}

static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

static inline float hmax256(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* eight values of a K or V row from element i, as f32 */
static inline __attribute__((always_inline)) __m256 kv_load(const char* row, int kv, int64_t i) {
    if (kv == LLMC_KV_I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + i))));
    if (kv == LLMC_KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const f16*)row + i)));
    return _mm256_loadu_ps((const float*)row + i);
}

/* acc[c0 * 8 ..) = acc * correction + sum over the n keys of p[j] * V row j, for C chunks of eight
 * values: C accumulators in registers, the keys in order. */
static inline __attribute__((always_inline)) void pv_chunks(int C, float* acc, int64_t c0, __m256 correction,
                                                           const float* p, const char* const* rows, int kv,
                                                           int64_t n) {
    __m256 a[8];
    #pragma GCC unroll 8
    for (int c = 0; c < C; c++) a[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + (c0 + c) * 8), correction);
    for (int64_t j = 0; j < n; j++) {
        __m256 pj = _mm256_broadcast_ss(p + j);
        #pragma GCC unroll 8
        for (int c = 0; c < C; c++) a[c] = _mm256_fmadd_ps(pj, kv_load(rows[j], kv, (c0 + c) * 8), a[c]);
    }
    #pragma GCC unroll 8
    for (int c = 0; c < C; c++) _mm256_storeu_ps(acc + (c0 + c) * 8, a[c]);
}

/* attend_span for head sizes that are multiples of 8, for G query heads that share the K/V head
 * (GQA), and for the T tokens of a query tile, a block of up to 32 keys at a time: the block's
 * rows are looked up once and stay in L1 for every query that reaches them; per query, eight
 * keys' scores at once (eight dot products, one transpose), their exponentials in eight lanes, and
 * the values summed D/8 vectors at a time in registers. A query's arithmetic depends on its own
 * values and keys [lo, z) alone, never on the other queries of the call: a block's keys past its
 * end are scored (whoever's they are) and masked. */
static inline __attribute__((always_inline)) void attend_span_of(int kv, const llmc_queries* Q, const llmc_paged* c,
                                                                 int64_t lo, float scale) {
    const int64_t D = c->D, chunks = D / 8, G = Q->G;
    const size_t row_bytes = (size_t)(D * c->elem);
    /* f16 or int8 rows are widened to f32 here once a key block (not once per query row: the
     * conversions, not the FMAs, bounded the loops); the loops below then read f32 (`rk`) */
    const int rk = LLMC_KV_F32;
    float wide[kv == LLMC_KV_F32 ? 1 : 2 * LLMC_KEY_BLOCK * LLMC_WIDE_D] __attribute__((aligned(32)));
    const __m256i key_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);    /* undoes hsum256x8's order */
    float p[LLMC_KEY_BLOCK] __attribute__((aligned(32)));
    const char *krow[LLMC_KEY_BLOCK], *vrow[LLMC_KEY_BLOCK];
    int64_t slots[LLMC_KEY_BLOCK];
    int64_t hi = lo;
    for (int64_t t = 0; t < Q->T; t++) {
        hi = Q->z[t] > hi ? Q->z[t] : hi;
        for (int64_t g = 0; g < G; g++) {
            float* part = Q->dst[t] + g * Q->d_h;
            for (int64_t i = 0; i < D; i++) part[i] = 0.0f;
            PART_M(part, D) = -INFINITY;
            PART_L(part, D) = 0.0f;
        }
    }
    for (int64_t t0 = lo; t0 < hi; t0 += LLMC_KEY_BLOCK) {
        int64_t most = hi - t0 < LLMC_KEY_BLOCK ? hi - t0 : LLMC_KEY_BLOCK;
        int64_t offset = t0 % c->B;
        for (int64_t j = 0; j < most; j++, offset++) {
            /* consecutive positions share a block: look the table up once per block */
            if (offset == c->B) offset = 0;
            slots[j] = j > 0 && offset != 0 ? slots[j - 1] + 1 : paged_slot(c, t0 + j);
            krow[j] = c->k + slots[j] * row_bytes;
            vrow[j] = c->v + slots[j] * row_bytes;
        }
        if (kv != LLMC_KV_F32)                 /* the block's rows widened once for every query row */
            for (int64_t j = 0; j < most; j++) {
                float *kw = wide + j * D, *vw = wide + (LLMC_KEY_BLOCK + j) * D;
                for (int64_t i = 0; i < chunks; i++) {
                    _mm256_store_ps(kw + 8 * i, kv_load(krow[j], kv, 8 * i));
                    _mm256_store_ps(vw + 8 * i, kv_load(vrow[j], kv, 8 * i));
                }
                krow[j] = (const char*)kw;
                vrow[j] = (const char*)vw;
            }
        for (int64_t j = most; j < (most + 7) / 8 * 8; j++) krow[j] = krow[most - 1];   /* scored, then masked */
        float ks[LLMC_KEY_BLOCK] = {0};
        if (kv == LLMC_KV_I8)
            for (int64_t j = 0; j < most; j++) ks[j] = c->ks[slots[j]];
        for (int64_t tg = 0; tg < Q->T * G; tg++) {
            const int64_t t = tg / G, g = tg % G;
            if (Q->z[t] <= t0) continue;                  /* this query's keys have ended */
            const int64_t n = Q->z[t] - t0 < LLMC_KEY_BLOCK ? Q->z[t] - t0 : LLMC_KEY_BLOCK;
            const float* qg = Q->q[t] + g * Q->q_h;
            float* part = Q->dst[t] + g * Q->d_h;
            __m256 s[LLMC_KEY_BLOCK / 8];
            __m256 top = _mm256_set1_ps(-INFINITY);
            for (int64_t b = 0; b < LLMC_KEY_BLOCK / 8; b++) {
                int64_t have = n - 8 * b;
                if (have <= 0) {
                    s[b] = _mm256_set1_ps(-INFINITY);
                    continue;
                }
                __m256 dots[8];
                #pragma GCC unroll 8
                for (int j = 0; j < 8; j++) dots[j] = _mm256_setzero_ps();
                const char* const* rows = krow + 8 * b;
                for (int64_t i = 0; i < chunks; i++) {
                    __m256 qv = _mm256_loadu_ps(qg + 8 * i);
                    #pragma GCC unroll 8
                    for (int j = 0; j < 8; j++) dots[j] = _mm256_fmadd_ps(qv, kv_load(rows[j], rk, 8 * i), dots[j]);
                }
                __m256 sc = _mm256_permutevar8x32_ps(hsum256x8(dots), key_order);
                if (kv == LLMC_KV_I8) sc = _mm256_mul_ps(sc, _mm256_loadu_ps(ks + 8 * b));
                sc = _mm256_mul_ps(sc, _mm256_set1_ps(scale));
                if (c->softcap > 0.0f) sc = softcap256(sc, c->softcap);
                if (have < 8)
                    sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sc, _mm256_castsi256_ps(lanes_below(have)));
                s[b] = sc;
                top = _mm256_max_ps(top, sc);
            }
            float m = PART_M(part, D), m_new = fmaxf(m, hmax256(top));
            float correction = expf(m - m_new);
            __m256 mv = _mm256_set1_ps(m_new), total = _mm256_setzero_ps();
            for (int64_t b = 0; b < LLMC_KEY_BLOCK / 8; b++) {
                /* a lane past the block's keys is -inf: its weight is 0 */
                __m256 pb = _mm256_and_ps(exp256(_mm256_sub_ps(s[b], mv)),
                                          _mm256_cmp_ps(s[b], _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
                total = _mm256_add_ps(total, pb);
                _mm256_store_ps(p + 8 * b, pb);
            }
            PART_L(part, D) = PART_L(part, D) * correction + hsum256(total);
            PART_M(part, D) = m_new;
            if (kv == LLMC_KV_I8)
                for (int64_t j = 0; j < n; j++) p[j] *= c->vs[slots[j]];
            __m256 corr = _mm256_set1_ps(correction);
            int64_t c0 = 0;
            for (; c0 + 8 <= chunks; c0 += 8) pv_chunks(8, part, c0, corr, p, vrow, rk, n);
            switch (chunks - c0) {          /* D = 64, 128, 256: none; 80, 96, 112: 2, 4, 6 */
            case 0: break;
            case 1: pv_chunks(1, part, c0, corr, p, vrow, rk, n); break;
            case 2: pv_chunks(2, part, c0, corr, p, vrow, rk, n); break;
            case 3: pv_chunks(3, part, c0, corr, p, vrow, rk, n); break;
            case 4: pv_chunks(4, part, c0, corr, p, vrow, rk, n); break;
            case 5: pv_chunks(5, part, c0, corr, p, vrow, rk, n); break;
            case 6: pv_chunks(6, part, c0, corr, p, vrow, rk, n); break;
            default: pv_chunks(7, part, c0, corr, p, vrow, rk, n); break;
            }
        }
    }
}

static __attribute__((noinline)) void attend_span_f32(const llmc_queries* Q, const llmc_paged* c, int64_t lo,
                                                      float scale) {
    attend_span_of(LLMC_KV_F32, Q, c, lo, scale);
}

static __attribute__((noinline)) void attend_span_kv8(const llmc_queries* Q, const llmc_paged* c, int64_t lo,
                                                      float scale) {
    attend_span_of(LLMC_KV_I8, Q, c, lo, scale);
}

static __attribute__((noinline)) void attend_span_f16(const llmc_queries* Q, const llmc_paged* c, int64_t lo,
                                                      float scale) {
    attend_span_of(LLMC_KV_F16, Q, c, lo, scale);
}
#endif

/* The queries Q over the keys from lo (query t's to Q->z[t]): each (t, g)'s partial (acc [D], m, l) */
static void attend_span(const llmc_queries* Q, const llmc_paged* c, int kv, int64_t lo, float scale) {
#if LLMC_AVX2
    if (c->D % 8 == 0 && c->D <= LLMC_WIDE_D) {
        (kv == LLMC_KV_I8 ? attend_span_kv8 : kv == LLMC_KV_F16 ? attend_span_f16 : attend_span_f32)(Q, c, lo, scale);
        return;
    }
#endif
    for (int64_t t = 0; t < Q->T; t++)
        for (int64_t g = 0; g < Q->G; g++) {
            float* part = Q->dst[t] + g * Q->d_h;
            attend_span_scalar(Q->q[t] + g * Q->q_h, c, kv, lo, Q->z[t], scale, &PART_M(part, c->D),
                               &PART_L(part, c->D), part);
        }
}

/* out [D] = the spans' partials (each D values, then m, then l) merged in order, normalised */
static __attribute__((noinline)) void merge_spans(const float* parts, int64_t splits, int64_t D, float* out) {
    float m = -INFINITY, l = 0.0f;
    for (int64_t p = 0; p < splits; p++) m = fmaxf(m, parts[p * (D + 2) + D]);
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t p = 0; p < splits; p++) {
        const float* part = parts + p * (D + 2);
        if (part[D + 1] == 0.0f) continue;
        float c = expf(part[D] - m);
        l += c * part[D + 1];
        for (int64_t d = 0; d < D; d++) out[d] += c * part[d];
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < D; d++) out[d] *= inv;
}

/* The keys [lo, hi) of position `pos`, cut into spans of *span keys from lo (512, or a multiple
 * of it past 512 * LLMC_MAX_SPLITS keys): returns how many. The spans of a sequence's tokens line
 * up, so a tile of its tokens runs each span together. */
static inline int64_t token_spans(int64_t pos, int64_t window, int64_t* lo, int64_t* hi, int64_t* span) {
    *lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
    *hi = pos + 1;
    int64_t keys = *hi - *lo, need = (keys + LLMC_SPLIT_KEYS - 1) / LLMC_SPLIT_KEYS;
    *span = LLMC_SPLIT_KEYS * ((need + LLMC_MAX_SPLITS - 1) / LLMC_MAX_SPLITS);
    return (keys + *span - 1) / *span;
}

/* span `part` of one token's G heads (query q at head stride q_h, partials at dst + g * d_h) */
static void attend_part(const float* q, int64_t q_h, int64_t G, const llmc_paged* c, int kv, int64_t lo, int64_t hi,
                        int64_t span, int64_t part, float scale, float* dst, int64_t d_h) {
    int64_t a = lo + part * span;
    llmc_queries Q = {.T = 1, .G = G, .q_h = q_h, .d_h = d_h, .q = {q}, .z = {a + span < hi ? a + span : hi},
                      .dst = {dst}};
    attend_span(&Q, c, kv, a, scale);
}

LLMC_KERNEL void llmc_attention(const float* q, int64_t q_h, int64_t q_s, const float* k, int64_t k_h, int64_t k_s,
                                const float* v, int64_t v_h, int64_t v_s, void* k_pool, float* k_scale,
                                void* v_pool, float* v_scale, int64_t kv, const int64_t* positions,
                                const int64_t* seq_index, const int64_t* tables, int64_t max_blocks, int64_t n,
                                int64_t Hq, int64_t Hk, int64_t D, int64_t B, float scale, int64_t window,
                                float softcap, float* out, int64_t o_h, int64_t o_s, float* scratch) {
    const int64_t elem = kv == LLMC_KV_I8 ? 1 : kv == LLMC_KV_F16 ? 2 : 4, group = Hq / Hk;
    /* 1. every token's keys and values into its block slot */
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < Hk * n; task++) {
        int64_t h = task / n, t = task % n, p = positions[t];
        llmc_paged c = {0, 0, 0, 0, tables + seq_index[t] * max_blocks, h, Hk, B, D, elem};
        int64_t slot = paged_slot(&c, p);
        if (kv == LLMC_KV_I8) {
            kv8_quantize(k + h * k_h + t * k_s, D, (int8_t*)k_pool + slot * D, k_scale + slot);
            kv8_quantize(v + h * v_h + t * v_s, D, (int8_t*)v_pool + slot * D, v_scale + slot);
        } else if (kv == LLMC_KV_F16) {           /* rounded to nearest even, as numpy's astype */
            const float *ks = k + h * k_h + t * k_s, *vs = v + h * v_h + t * v_s;
            f16 *kd = (f16*)k_pool + slot * D, *vd = (f16*)v_pool + slot * D;
            for (int64_t i = 0; i < D; i++) {
                kd[i] = (f16)ks[i];
                vd[i] = (f16)vs[i];
            }
        } else {
            memcpy((float*)k_pool + slot * D, k + h * k_h + t * k_s, (size_t)D * sizeof(float));
            memcpy((float*)v_pool + slot * D, v + h * v_h + t * v_s, (size_t)D * sizeof(float));
        }
    }
    const int64_t stride = LLMC_MAX_SPLITS * (D + 2);      /* partials of one (token, head) */
    if (n > LLMC_SPLIT_TOKENS) {
        /* 2a. many tokens: a task per LLMC_QUERY_TILE tokens and K/V head. Consecutive tokens of one
         * sequence (without a window: their spans line up) run each span together, every block of
         * keys read once for them all, as far as their partials fit in `parts`; a token whose
         * partials alone do not fit runs its query heads a few at a time. */
        const int64_t tiles = (n + LLMC_QUERY_TILE - 1) / LLMC_QUERY_TILE;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tiles * Hk; task++) {
            const int64_t hk = task % Hk, end = (task / Hk + 1) * LLMC_QUERY_TILE < n ? (task / Hk + 1) * LLMC_QUERY_TILE : n;
            float parts[LLMC_PARTS];
            for (int64_t t = task / Hk * LLMC_QUERY_TILE, u; t < end; t = u) {
                int64_t lo, hi, span, splits[LLMC_QUERY_TILE];
                splits[0] = token_spans(positions[t], window, &lo, &hi, &span);
                int64_t most = splits[0], per = group * (D + 2);      /* floats of a token's span, all heads */
                for (u = t + 1; u < end && window == 0 && seq_index[u] == seq_index[t]; u++) {
                    int64_t lo_u, hi_u, span_u, s_u = token_spans(positions[u], window, &lo_u, &hi_u, &span_u);
                    int64_t widest = s_u > most ? s_u : most;
                    if (span_u != span || (u - t + 1) * widest * per > LLMC_PARTS) break;
                    splits[u - t] = s_u;
                    most = widest;
                }
                llmc_paged c = {(const char*)k_pool, (const char*)v_pool, k_scale, v_scale,
                                tables + seq_index[t] * max_blocks, hk, Hk, B, D, elem, softcap};
                /* (token j, head g, span p)'s partial at parts + ((j * heads + g) * most + p) * (D + 2) */
                int64_t fit = LLMC_PARTS / (most * (D + 2)), heads = fit < group ? fit : group;
                for (int64_t h0 = hk * group; h0 < (hk + 1) * group; h0 += heads) {
                    int64_t G = (hk + 1) * group - h0 < heads ? (hk + 1) * group - h0 : heads;
                    for (int64_t part = 0; part < most; part++) {
                        llmc_queries Q = {.T = 0, .G = G, .q_h = q_h, .d_h = most * (D + 2)};
                        for (int64_t j = 0; j < u - t; j++) {
                            if (part >= splits[j]) continue;
                            int64_t z = lo + (part + 1) * span, end_j = positions[t + j] + 1;
                            Q.q[Q.T] = q + h0 * q_h + (t + j) * q_s;
                            Q.z[Q.T] = z < end_j ? z : end_j;
                            Q.dst[Q.T++] = parts + (j * G * most + part) * (D + 2);
                        }
                        attend_span(&Q, &c, (int)kv, lo + part * span, scale);
                    }
                    for (int64_t j = 0; j < u - t; j++)
                        for (int64_t g = 0; g < G; g++)
                            merge_spans(parts + (j * G + g) * most * (D + 2), splits[j], D,
                                        out + (h0 + g) * o_h + (t + j) * o_s);
                }
            }
        }
        return;
    }
    /* 2b. few tokens (decode): every (token, span, head) is a task, partials in scratch; the heads
     * of a K/V head go together (read once for them all) when that still leaves every thread two
     * tasks */
    int64_t first[LLMC_SPLIT_TOKENS + 1];            /* token t's tasks start at first[t] * heads */
    first[0] = 0;
    for (int64_t t = 0; t < n; t++) {
        int64_t lo, hi, span;
        first[t + 1] = first[t] + token_spans(positions[t], window, &lo, &hi, &span);
    }
    const int64_t G = first[n] * Hk >= 2 * omp_get_num_threads() ? group : 1, heads = Hq / G;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < first[n] * heads; task++) {
        int64_t t = 0;
        while (task >= first[t + 1] * heads) t++;
        int64_t within = task - first[t] * heads, splits = first[t + 1] - first[t];
        int64_t h = within / splits * G, part = within % splits, lo, hi, span;
        token_spans(positions[t], window, &lo, &hi, &span);
        llmc_paged c = {(const char*)k_pool, (const char*)v_pool, k_scale, v_scale,
                        tables + seq_index[t] * max_blocks, h / group, Hk, B, D, elem, softcap};
        attend_part(q + h * q_h + t * q_s, q_h, G, &c, (int)kv, lo, hi, span, part, scale,
                    scratch + (t * Hq + h) * stride + part * (D + 2), stride);
    }
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < n * Hq; task++) {
        int64_t t = task / Hq, h = task % Hq, lo, hi, span;
        int64_t splits = token_spans(positions[t], window, &lo, &hi, &span);
        merge_spans(scratch + task * stride, splits, D, out + h * o_h + t * o_s);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The step's own check of what it is given (llmc.abi checks the same in Python): non-zero when a
 * count is out of range or an index would reach outside the tokens, tables, rows or pool. B = 0:
 * the step has no KV pool, and reads no block tables. */

LLMC_KERNEL int llmc_check_step(int64_t n, int64_t max_tokens, const int64_t* tokens, int64_t vocab,
                                const int64_t* positions, const int64_t* seq_index, int64_t seqs, int64_t max_blocks,
                                const int64_t* tables, int64_t rows, const int64_t* logit_rows, int64_t blocks,
                                int64_t B) {
    if (n < 1 || n > max_tokens || rows < 1 || rows > n || seqs < 1 || max_blocks < 1 || blocks < 1) return 1;
    for (int64_t r = 0; r < rows; r++)
        if (logit_rows[r] < 0 || logit_rows[r] >= n) return 1;
    for (int64_t t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= vocab || positions[t] < 0 || seq_index[t] < 0 || seq_index[t] >= seqs)
            return 1;
        if (B == 0) continue;
        int64_t last = positions[t] / B;
        if (last >= max_blocks) return 1;
        for (int64_t j = 0; j <= last; j++) {        /* every block the token reads */
            int64_t b = tables[seq_index[t] * max_blocks + j];
            if (b < 0 || b >= blocks) return 1;
        }
    }
    return 0;
}
