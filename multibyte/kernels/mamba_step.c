/* One position of a Mamba stack (MambaByte) on its recurrent states, in fp32 on a CPU: the native
 * twin of `multibyte.model.Stack.forward(x[:, None], states)` whose blocks are
 * `multibyte.mixers.mamba.MambaMixer` (its `step` is the reference; tests/test_native_kernels.py
 * holds the two together).
 *
 * Per row, for each block (E = inner width, N = state size, K = convolution taps, R = dt rank):
 *   h = rms_norm(x) * w;  (x_in, z) = in_proj(h);
 *   window = (conv state, x_in);  conv state <- window[1:];  s = SiLU(bias + sum_k window[k] * taps[k]);
 *   (d, B, C) = x_proj(s);  delta = softplus(dt_proj(d) + dt_bias);
 *   state[e, n] = exp(delta[e] A[e, n]) state[e, n] + delta[e] s[e] B[n];
 *   y[e] = (sum_n C[n] state[e, n] + D[e] s[e]) * SiLU(z[e]);  x += out_proj(y)
 * then y = rms_norm(x) * w_final. A (= -exp(A_log), E x N) comes precomputed. A batch-1 step reads
 * every weight once, so on a CPU it is bound by memory traffic; this makes it one pass over them
 * instead of ~20 PyTorch ops a block. Every loop over the inner width is written to vectorize:
 * the transcendental functions are the polynomial ones of vector_ops.h (a libm call per element
 * would cost as much as the block's products), and the readout sum_n C[n] state[e, n] is a
 * matrix-vector product of the (E, N) state with C, eight rows at a time like the projections.
 * Everything per channel after x_proj (`channels`) is split between two threads when E is large.
 */
#include "mamba_step.h"

static inline float silu(float v) { return v / (1.f + exp_vectorizable(-v)); }

/* log(1 + u) for u in [0, 1]: 2 atanh(s) with s = u / (2 + u) in [0, 1/3] (no cancellation for
 * small u), atanh by its odd series to s^17 (truncation below 2e-10 relative). */
static inline float log1p_unit(float u) {
    const float s = u / (2.f + u), s2 = s * s;
    float p = 1.f / 17.f;
    p = p * s2 + 1.f / 15.f;
    p = p * s2 + 1.f / 13.f;
    p = p * s2 + 1.f / 11.f;
    p = p * s2 + 1.f / 9.f;
    p = p * s2 + 1.f / 7.f;
    p = p * s2 + 1.f / 5.f;
    p = p * s2 + 1.f / 3.f;
    p = p * s2 + 1.f;
    return 2.f * s * p;
}

/* torch.nn.functional.softplus (beta 1; beyond its threshold 20 the two agree in fp32):
 * log(1 + e^v) = max(v, 0) + log(1 + e^-|v|). */
static inline float softplus(float v) { return (v > 0.f ? v : 0.f) + log1p_unit(exp_vectorizable(v > 0.f ? -v : v)); }

/* One row's work per channel after x_proj, for channels e0..e1-1 (e0 a multiple of 8). */
typedef struct {
    const MambaStack *s;
    const MambaBlock *blk;
    const float *d, *Bn, *Cn; /* x_proj's output: (R), (N), (N) */
    const float *c, *z;       /* the convolution's output (E), the gate's input (E) */
    float *ssm, *m, *dt;      /* the state (E, N), the output (E), delta (E) */
} Channels;

/* delta = softplus(dt_proj(d) + dt_bias); the state update; m = (C . state + D s) * SiLU(z). */
static void channels(const void *context, int64_t e0, int64_t e1) {
    const Channels *j = context;
    const MambaBlock *blk = j->blk;
    const int64_t E = j->s->d_inner, N = j->s->d_state, R = j->s->dt_rank;
    float *dt = j->dt, *m = j->m;
    linear_part(blk->dt_weight, WEIGHT_FORMAT, j->d, dt, 1, E, R, e0, e1);
#pragma omp simd
    for (int64_t e = e0; e < e1; e++) dt[e] = softplus(dt[e] + blk->dt_bias[e]);
    for (int64_t e = e0; e < e1; e++) {
        const float delta = dt[e], impulse = delta * j->c[e];
        const float *A = blk->A + e * N;
        float *h_e = j->ssm + e * N;
#pragma omp simd
        for (int64_t n = 0; n < N; n++) h_e[n] = exp_vectorizable(delta * A[n]) * h_e[n] + impulse * j->Bn[n];
    }
    linear_part_f32(j->ssm, j->Cn, m, 1, E, N, e0, e1); /* m[e] = sum_n C[n] state[e, n] */
#pragma omp simd
    for (int64_t e = e0; e < e1; e++) m[e] = (m[e] + j->c[e] * blk->D[e]) * silu(j->z[e]);
}

/* Channels from which a row's per-channel work is split between two threads. */
#define PARALLEL_MIN_CHANNELS 256

int64_t multibyte_mamba_workspace(const MambaStack *s, int64_t rows) {
    const int64_t D = s->d_model, E = s->d_inner;
    return rows * (2 * D + 4 * E + s->dt_rank + 2 * s->d_state) + E;
}

int multibyte_mamba_step(const MambaStack *s, int64_t B, const float *x, float *y, float *work) {
    const int64_t D = s->d_model, E = s->d_inner, N = s->d_state, K = s->d_conv, R = s->dt_rank, P = R + 2 * N;
    /* per row: normed input (D), x_in and z (2E), the convolution's output (E), the mixer's
     * output before out_proj (E), (d, B, C) (P), out_proj's result (D); then delta (E, one row
     * at a time) */
    float *h = work, *xz = h + B * D, *conv = xz + 2 * B * E, *mixed = conv + B * E, *dbc = mixed + B * E, *r = dbc + B * P;
    float *dt = r + B * D;
    for (int64_t i = 0; i < B * D; i++) y[i] = x[i];
    for (int64_t l = 0; l < s->n_blocks; l++) {
        const MambaBlock *blk = s->blocks + l;
        rms_norm_rows(y, blk->norm, h, B, D, s->eps);
        linear(blk->in_proj, h, xz, B, 2 * E, D);
        for (int64_t b = 0; b < B; b++) {
            const float *x_in = xz + b * 2 * E, *taps = blk->conv_weight;
            float *state = blk->conv_state + b * (K - 1) * E, *c = conv + b * E;
            /* tap by tap over all channels (the taps come transposed, (K, E)): unit-stride loops */
#pragma omp simd
            for (int64_t e = 0; e < E; e++) c[e] = 0.f;
            for (int64_t k = 0; k < K - 1; k++) {
#pragma omp simd
                for (int64_t e = 0; e < E; e++) c[e] += state[k * E + e] * taps[k * E + e];
            }
#pragma omp simd
            for (int64_t e = 0; e < E; e++) c[e] = silu(c[e] + x_in[e] * taps[(K - 1) * E + e] + blk->conv_bias[e]);
            for (int64_t k = 0; k + 1 < K - 1; k++)
                for (int64_t e = 0; e < E; e++) state[k * E + e] = state[(k + 1) * E + e];
            if (K > 1)
                for (int64_t e = 0; e < E; e++) state[(K - 2) * E + e] = x_in[e];
        }
        linear(blk->x_proj, conv, dbc, B, P, E);
        for (int64_t b = 0; b < B; b++) {
            const float *d = dbc + b * P;
            const Channels job = {s, blk, d, d + R, d + R + N, conv + b * E, xz + b * 2 * E + E, blk->ssm_state + b * E * N, mixed + b * E, dt};
            /* the channels are independent: split them with the helper thread when there are many */
            if (E < PARALLEL_MIN_CHANNELS || multibyte_parallel_for(channels, &job, (E / 16) * 8, E) != 0) channels(&job, 0, E);
        }
        linear(blk->out_proj, mixed, r, B, D, E);
        for (int64_t i = 0; i < B * D; i++) y[i] += r[i];
    }
    rms_norm_rows(y, s->final_norm, y, B, D, s->eps);
    return 0;
}
