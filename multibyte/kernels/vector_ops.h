/* Helpers shared by the kernels of this folder: fp32 vectors on a CPU. */
#ifndef MULTIBYTE_KERNELS_VECTOR_OPS_H
#define MULTIBYTE_KERNELS_VECTOR_OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* Y = X W^T for X (rows, in), W (out, in): four weight rows at a time, each applied to every row
 * of X while it is in the L1 cache, so the weights are read from memory once per call. */
static void linear(const float *W, const float *X, float *Y, int64_t rows, int64_t out, int64_t in) {
    int64_t j = 0;
    for (; j + 4 <= out; j += 4) {
        const float *r0 = W + j * in, *r1 = r0 + in, *r2 = r1 + in, *r3 = r2 + in;
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t i = 0; i < in; i++) {
                a0 += r0[i] * x[i];
                a1 += r1[i] * x[i];
                a2 += r2[i] * x[i];
                a3 += r3[i] * x[i];
            }
            float *y = Y + b * out + j;
            y[0] = a0, y[1] = a1, y[2] = a2, y[3] = a3;
        }
    }
    for (; j < out; j++) {
        const float *r = W + j * in;
        for (int64_t b = 0; b < rows; b++) {
            const float *x = X + b * in;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t i = 0; i < in; i++) a += r[i] * x[i];
            Y[b * out + j] = a;
        }
    }
}

#endif
