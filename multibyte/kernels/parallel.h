/* A second thread for the large matrix-vector products of a decoding step (parallel.c). */
#ifndef MULTIBYTE_KERNELS_PARALLEL_H
#define MULTIBYTE_KERNELS_PARALLEL_H

#include <stdint.h>

/* Products of at least this many weights are split between two threads (when allowed): below it,
 * handing over costs more than half the product. */
#define PARALLEL_MIN_WEIGHTS (128 * 1024)

/* How many threads the large products may use: 1 (the caller's alone) or 2; returns the count
 * now in force. Set from Python (`multibyte.kernels.native_threads`). */
int multibyte_set_threads(int threads);

/* Y = X W^T as `linear` (vector_ops.h) for W in `format` (WEIGHTS_F32, WEIGHTS_BF16 or
 * WEIGHTS_INT8), the output rows split between the caller and a helper thread; returns 0, or 1
 * (nothing written) when there is no helper (one thread allowed, or it could not start): the
 * caller then computes it alone. */
int multibyte_parallel_linear(const void *W, int format, const float *X, float *Y, int64_t rows, int64_t out, int64_t in);

#endif
