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

/* Work over the index range 0..end-1 whose parts may run on different threads: run(context, i0, i1)
 * does i0..i1-1 and writes nothing another part writes. */
typedef void (*multibyte_range_fn)(const void *context, int64_t i0, int64_t i1);

/* run(context, 0, first) on the calling thread while the helper runs run(context, first, end);
 * returns 0 when both are done, or 1 (nothing run) when there is no helper (one thread allowed,
 * it could not start, or another thread of the process holds it): the caller then runs it all. */
int multibyte_parallel_for(multibyte_range_fn run, const void *context, int64_t first, int64_t end);

/* Y = X W^T as `linear` (vector_ops.h) for W in `format` (WEIGHTS_F32, WEIGHTS_BF16 or
 * WEIGHTS_INT8), the output rows split between the caller and a helper thread; returns 0, or 1
 * (nothing written) when there is no helper (one thread allowed, or it could not start): the
 * caller then computes it alone. */
int multibyte_parallel_linear(const void *W, int format, const float *X, float *Y, int64_t rows, int64_t out, int64_t in);

#endif
