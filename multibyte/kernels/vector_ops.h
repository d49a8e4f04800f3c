/* Helpers shared by the kernels of this folder: fp32 vectors on a CPU. */
#ifndef MULTIBYTE_KERNELS_VECTOR_OPS_H
#define MULTIBYTE_KERNELS_VECTOR_OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "parallel.h"

/* The formats a matrix product reads its weights in (multibyte.weight_formats). */
#define WEIGHTS_F32 0
#define WEIGHTS_BF16 1
#define WEIGHTS_INT8 2

/* The type of the model's matrices (the weights of its linear layers) in this library: fp32;
 * with MULTIBYTE_BF16_WEIGHTS defined bf16 (uint16_t holding the upper half of an fp32); with
 * MULTIBYTE_INT8_WEIGHTS defined a packed int8 matrix (out, in): its rows' fp32 scales (out,)
 * followed by the int8 values (out, in), row by row. The Python side passes the compact formats
 * only for models whose matrices are on that grid (multibyte.weight_formats.matrix_format), so
 * the arithmetic, fp32, is the same up to rounding. Norms, biases, embeddings, caches and states
 * stay fp32. */
#if defined(MULTIBYTE_BF16_WEIGHTS)
typedef uint16_t weight_t;
#define WEIGHT_FORMAT WEIGHTS_BF16
#elif defined(MULTIBYTE_INT8_WEIGHTS)
typedef uint8_t weight_t;
#define WEIGHT_FORMAT WEIGHTS_INT8
#else
typedef float weight_t;
#define WEIGHT_FORMAT WEIGHTS_F32
#endif

/* e^x without a libm call, so that loops over it vectorize: x = n ln 2 + r with |r| <= ln 2 / 2,
 * e^r by its degree-7 Taylor polynomial (truncation below 1e-8 relative), 2^n put into the
 * exponent bits. Within ~2 ulp of expf; x is clamped to [-87.3, 88.7] (no subnormals, no inf),
 * so it suits softmax weights and logistic functions, not tiny results. */
static inline float exp_vectorizable(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest: 1.5 * 2^23 */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f; /* ln 2 in two parts */
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* In place over n values: GELU with the tanh approximation, 0.5 u (1 + tanh(y)) with
 * y = sqrt(2 / pi) (u + 0.044715 u^3), written as u / (1 + e^(-2y)) (the same function). */
static void gelu_tanh(float *u, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const float x = u[i], y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        u[i] = x / (1.f + exp_vectorizable(-2.f * y));
    }
}

/* Each of `rows` rows of X (rows, n): y = x / rms(x) * w (torch.nn.RMSNorm with this eps).
 * Y may be X: a row's sum of squares is taken before any of it is written. */
static void rms_norm_rows(const float *X, const float *w, float *Y, int64_t rows, int64_t n, float eps) {
    for (int64_t b = 0; b < rows; b++) {
        const float *x = X + b * n;
        float *y = Y + b * n, sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
        const float r = 1.f / sqrtf(sum / (float)n + eps);
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
    }
}

/* A vector of LANES floats in the C compilers' generic vector extension (GCC, Clang), lowered to
 * the target's registers: one AVX-512 register where there is AVX-512, else eight lanes, so that
 * `linear`'s eight accumulators and its operands fit in the register file (16 AVX2 registers,
 * 32 NEON registers of four lanes). */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_t load_lanes(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

/* GCC 12+ and Clang shuffle generic vectors; elsewhere (or with MULTIBYTE_LANE_BY_LANE_SUM
 * defined, which the tests use to check it) the sums go lane by lane. */
#if defined(__has_builtin) && !defined(MULTIBYTE_LANE_BY_LANE_SUM)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif

/* y[r] = the sum of a[r]'s lanes, r = 0..7. A transposing tree: each level adds two accumulators'
 * halves into one vector, so eight sums cost ~3 log2(LANES) shuffles and adds and never pass
 * through memory (a lane-by-lane sum of each accumulator through the stack costs more than the
 * products of a short row). */
static inline void sum_lanes8(const lanes_t *a, float *y) {
#if defined(HAVE_SHUFFLEVECTOR) && LANES == 16
#define SHUFFLE __builtin_shufflevector
    lanes_t pairs[4], quads[2];
    for (int k = 0; k < 4; k++) /* rows 2k, 2k+1: 8 lanes each */
        pairs[k] = SHUFFLE(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   SHUFFLE(a[2 * k], a[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++) /* rows 4k..4k+3: 4 lanes each */
        quads[k] = SHUFFLE(pairs[2 * k], pairs[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                   SHUFFLE(pairs[2 * k], pairs[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    /* rows 0..7: 2 lanes each, then each pair of neighbours added */
    const lanes_t twos = SHUFFLE(quads[0], quads[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                         SHUFFLE(quads[0], quads[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const lanes_t ones = twos + SHUFFLE(twos, twos, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    for (int r = 0; r < 8; r++) y[r] = ones[2 * r];
#undef SHUFFLE
#elif defined(HAVE_SHUFFLEVECTOR) && LANES == 8
#define SHUFFLE __builtin_shufflevector
    lanes_t pairs[4], quads[2];
    for (int k = 0; k < 4; k++) /* rows 2k, 2k+1: 4 lanes each */
        pairs[k] = SHUFFLE(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int k = 0; k < 2; k++) /* rows 4k..4k+3: 2 lanes each */
        quads[k] = SHUFFLE(pairs[2 * k], pairs[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13) + SHUFFLE(pairs[2 * k], pairs[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    const lanes_t ones = SHUFFLE(quads[0], quads[1], 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE(quads[0], quads[1], 1, 3, 5, 7, 9, 11, 13, 15);
    for (int r = 0; r < 8; r++) y[r] = ones[r];
#undef SHUFFLE
#else
    for (int r = 0; r < 8; r++) {
        float sum = 0.f;
        for (int k = 0; k < LANES; k++) sum += a[r][k];
        y[r] = sum;
    }
#endif
}

/* Ask for the same columns of the next group's eight weight rows (`next` is the first, rows
 * `stride` elements apart) while this group's are summed: a group reads eight rows side by side,
 * eight streams the hardware prefetchers do not run ahead of once the weights no longer fit the
 * cache. A prefetch never faults and changes no result. */
#define prefetch_rows(next, stride)                                                  \
    do {                                                                            \
        for (int r_ = 0; r_ < 8; r_++) __builtin_prefetch((next) + r_ * (stride), 0, 0); \
    } while (0)

/* Output rows j0..j1-1 of Y = X W^T for X (rows, in), W (out, in) fp32, Y (rows, out); j0 a
 * multiple of 8. Eight weight rows at a time, each applied to every row of X while it is in the L1 cache
 * (the weights are read from memory once per call), with one vector accumulator per weight row:
 * at batch 1 this is a matrix-vector product whose speed is set by how many independent
 * multiply-adds are in flight and how cheaply the accumulators are summed. The columns beyond the
 * last whole vector are added one by one. A row's result does not depend on j0 and j1. */
static void linear_part_f32(const float *W, const float *X, float *Y, int64_t rows, int64_t out, int64_t in, int64_t j0, int64_t j1) {
    const int64_t body = in - in % LANES;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        const float *w = W + j * in;
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float *y = Y + b * out + j;
            lanes_t a[8] = {0};
            for (int64_t i = 0; i < body; i += LANES) {
                if (b == 0 && j + 16 <= j1) prefetch_rows(w + 8 * in + i, in);
                const lanes_t xi = load_lanes(x + i);
                for (int r = 0; r < 8; r++) a[r] += load_lanes(w + r * in + i) * xi;
            }
            sum_lanes8(a, y);
            for (int64_t i = body; i < in; i++)
                for (int r = 0; r < 8; r++) y[r] += w[r * in + i] * x[i];
        }
    }
    for (; j < j1; j++) { /* the last rows short of a group of 8, one at a time */
        const float *w = W + j * in;
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            lanes_t a = {0};
            for (int64_t i = 0; i < body; i += LANES) a += load_lanes(w + i) * load_lanes(x + i);
            float sum = 0.f;
            for (int k = 0; k < LANES; k++) sum += a[k];
            for (int64_t i = body; i < in; i++) sum += w[i] * x[i];
            Y[b * out + j] = sum;
        }
    }
}

/* A bf16 number's value: bf16 is the upper half of an fp32. */
static inline float bf16_value(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* LANES bf16 values as fp32 lanes, one at a time (short rows, and compilers without vector
 * shuffles; linear_part_bf16 converts whole pairs of vectors without this). */
static inline lanes_t bf16_lanes(const uint16_t *p) {
    float v[LANES];
    for (int k = 0; k < LANES; k++) v[k] = bf16_value(p[k]);
    return load_lanes(v);
}

#if defined(HAVE_SHUFFLEVECTOR) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HAVE_BF16_PAIRS 1
typedef uint32_t words_t __attribute__((vector_size(LANES * sizeof(float))));
#if LANES == 16
#define EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#define EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14
#define ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15
#endif
#endif

/* linear_part_f32 with W in bf16 (out, in): the same products in fp32, over half the bytes. A
 * vector of 2 x LANES bf16 weights is read as LANES 32-bit words whose low halves are the even
 * columns and high halves the odd ones; shifting and masking turn them into two fp32 vectors
 * without moving lanes, and x is split into its even and odd columns once per 8 weight rows. */
static void linear_part_bf16(const uint16_t *W, const float *X, float *Y, int64_t rows, int64_t out, int64_t in, int64_t j0, int64_t j1) {
    const int64_t body = in - in % (2 * LANES), vectors = in - in % LANES;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        const uint16_t *w = W + j * in;
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float *y = Y + b * out + j;
            lanes_t a[8] = {0};
            for (int64_t i = 0; i < body; i += 2 * LANES) {
                if (b == 0 && j + 16 <= j1) prefetch_rows(w + 8 * in + i, in);
#ifdef HAVE_BF16_PAIRS
                const lanes_t x0 = load_lanes(x + i), x1 = load_lanes(x + i + LANES);
                const lanes_t even = __builtin_shufflevector(x0, x1, EVEN_LANES), odd = __builtin_shufflevector(x0, x1, ODD_LANES);
                const words_t high = (words_t){0} + 0xFFFF0000u;
                for (int r = 0; r < 8; r++) {
                    words_t pairs;
                    lanes_t lo, hi;
                    memcpy(&pairs, w + r * in + i, sizeof pairs);
                    const words_t lo_bits = pairs << 16, hi_bits = pairs & high;
                    memcpy(&lo, &lo_bits, sizeof lo);
                    memcpy(&hi, &hi_bits, sizeof hi);
                    a[r] += lo * even;
                    a[r] += hi * odd;
                }
#else
                for (int r = 0; r < 8; r++)
                    for (int64_t half = i; half < i + 2 * LANES; half += LANES) a[r] += bf16_lanes(w + r * in + half) * load_lanes(x + half);
#endif
            }
            for (int64_t i = body; i < vectors; i += LANES) { /* short rows (Mamba's dt_proj) */
                const lanes_t xi = load_lanes(x + i);
                for (int r = 0; r < 8; r++) a[r] += bf16_lanes(w + r * in + i) * xi;
            }
            sum_lanes8(a, y);
            for (int64_t i = vectors; i < in; i++)
                for (int r = 0; r < 8; r++) y[r] += bf16_value(w[r * in + i]) * x[i];
        }
    }
    for (; j < j1; j++) { /* the last rows short of a group of 8, one at a time */
        const uint16_t *w = W + j * in;
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float sum = 0.f;
            for (int64_t i = 0; i < in; i++) sum += bf16_value(w[i]) * x[i];
            Y[b * out + j] = sum;
        }
    }
}

/* LANES int8 values as fp32 lanes: on x86 one sign-extending load and one conversion (by
 * intrinsics: GCC lowers __builtin_convertvector from int8 to fp32 vectors one element at a time);
 * elsewhere a loop the compiler may vectorize. */
#if defined(__AVX512F__) || (defined(__AVX2__) && LANES == 8)
#include <immintrin.h>
#endif
static inline lanes_t int8_lanes(const int8_t *p) {
#if defined(__AVX512F__) && LANES == 16
    return (lanes_t)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__) && LANES == 8
    return (lanes_t)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    float v[LANES];
    for (int k = 0; k < LANES; k++) v[k] = (float)p[k];
    return load_lanes(v);
#endif
}

/* linear_part_f32 with a packed int8 W (weight_t of the int8 build: (out,) fp32 row scales, then
 * (out, in) int8): y[j] = scale[j] * sum_i q[j, i] x[i], a quarter of fp32's bytes. The columns go
 * 4 x LANES at a time (a 64-byte cache line of a row with AVX-512), so the prefetch asks for each
 * line once. */
static void linear_part_int8(const uint8_t *packed, const float *X, float *Y, int64_t rows, int64_t out, int64_t in, int64_t j0, int64_t j1) {
    const int8_t *W = (const int8_t *)(packed + out * (int64_t)sizeof(float));
    const int64_t body = in - in % (4 * LANES), vectors = in - in % LANES;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        const int8_t *w = W + j * in;
        float scale[8];
        memcpy(scale, packed + j * (int64_t)sizeof(float), sizeof scale);
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float *y = Y + b * out + j;
            lanes_t a[8] = {0};
            for (int64_t i = 0; i < body; i += 4 * LANES) {
                if (b == 0 && j + 16 <= j1) prefetch_rows(w + 8 * in + i, in);
                const lanes_t x0 = load_lanes(x + i), x1 = load_lanes(x + i + LANES);
                const lanes_t x2 = load_lanes(x + i + 2 * LANES), x3 = load_lanes(x + i + 3 * LANES);
                for (int r = 0; r < 8; r++) {
                    const int8_t *wr = w + r * in + i;
                    a[r] += int8_lanes(wr) * x0;
                    a[r] += int8_lanes(wr + LANES) * x1;
                    a[r] += int8_lanes(wr + 2 * LANES) * x2;
                    a[r] += int8_lanes(wr + 3 * LANES) * x3;
                }
            }
            for (int64_t i = body; i < vectors; i += LANES) { /* short rows (Mamba's dt_proj) */
                const lanes_t xi = load_lanes(x + i);
                for (int r = 0; r < 8; r++) a[r] += int8_lanes(w + r * in + i) * xi;
            }
            sum_lanes8(a, y);
            for (int64_t i = vectors; i < in; i++)
                for (int r = 0; r < 8; r++) y[r] += (float)w[r * in + i] * x[i];
            for (int r = 0; r < 8; r++) y[r] *= scale[r];
        }
    }
    for (; j < j1; j++) { /* the last rows short of a group of 8, one at a time */
        const int8_t *w = W + j * in;
        float scale;
        memcpy(&scale, packed + j * (int64_t)sizeof(float), sizeof scale);
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float sum = 0.f;
            for (int64_t i = 0; i < in; i++) sum += (float)w[i] * x[i];
            Y[b * out + j] = scale * sum;
        }
    }
}

/* Output rows j0..j1-1 of Y = X W^T with W in `format` (WEIGHTS_F32, _BF16 or _INT8). */
static inline void linear_part(const void *W, int format, const float *X, float *Y, int64_t rows, int64_t out, int64_t in, int64_t j0, int64_t j1) {
    if (format == WEIGHTS_BF16)
        linear_part_bf16(W, X, Y, rows, out, in, j0, j1);
    else if (format == WEIGHTS_INT8)
        linear_part_int8(W, X, Y, rows, out, in, j0, j1);
    else
        linear_part_f32(W, X, Y, rows, out, in, j0, j1);
}

/* Y = X W^T for an fp32 W that is not a model matrix (a KV cache's keys, a state); a large
 * product is split with the helper thread (parallel.c). */
static void linear_f32(const float *W, const float *X, float *Y, int64_t rows, int64_t out, int64_t in) {
    if (out * in >= PARALLEL_MIN_WEIGHTS && multibyte_parallel_linear(W, WEIGHTS_F32, X, Y, rows, out, in) == 0) return;
    linear_part_f32(W, X, Y, rows, out, in, 0, out);
}

/* Y = X W^T for a model matrix (weight_t); split with the helper thread when large. */
static void linear(const weight_t *W, const float *X, float *Y, int64_t rows, int64_t out, int64_t in) {
    if (out * in >= PARALLEL_MIN_WEIGHTS && multibyte_parallel_linear(W, WEIGHT_FORMAT, X, Y, rows, out, in) == 0) return;
    linear_part(W, WEIGHT_FORMAT, X, Y, rows, out, in, 0, out);
}

#endif
