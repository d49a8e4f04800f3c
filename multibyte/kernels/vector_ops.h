/* Helpers shared by the kernels of this folder: fp32 vectors on a CPU. */
#ifndef MULTIBYTE_KERNELS_VECTOR_OPS_H
#define MULTIBYTE_KERNELS_VECTOR_OPS_H

#include <math.h>
#include <stdint.h>

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
