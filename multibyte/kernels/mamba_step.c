/* One position of a Mamba stack (MambaByte) on its recurrent states, in fp32 on a CPU: the native
 * twin of `multibyte.model.Stack.forward(x[:, None], states)` whose blocks are
 * `multibyte.mixers.mamba.MambaMixer` (its `step` is the reference; tests/test_native_kernels.py
 * holds the two together).
 *
 * Per row, for each block (E = inner width, N = state size, K = convolution taps, R = dt rank):
 *   h = rms_norm(x) * w;  (x_in, z) = in_proj(h);
 *   window = (conv state, x_in);  conv state <- window[1:];  s = SiLU(bias + sum_k window[k] * taps[k]);
 *   (d, B, C) = x_proj(s);  delta = softplus(dt_proj(d) + dt_bias);  A = -exp(A_log);
 *   state[e, n] = exp(delta[e] A[e, n]) state[e, n] + delta[e] s[e] B[n];
 *   y[e] = (sum_n C[n] state[e, n] + D[e] s[e]) * SiLU(z[e]);  x += out_proj(y)
 * then y = rms_norm(x) * w_final. A batch-1 step reads every weight once, so on a CPU it is bound
 * by memory traffic; this makes it one pass over them instead of ~20 PyTorch ops a block.
 */
#include "mamba_step.h"

static float silu(float v) { return v / (1.f + expf(-v)); }

/* torch.nn.functional.softplus with beta 1 and threshold 20. */
static float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

int64_t multibyte_mamba_workspace(const MambaStack *s, int64_t rows) {
    const int64_t D = s->d_model, E = s->d_inner;
    return rows * (2 * D + 4 * E + s->dt_rank + 2 * s->d_state) + E;
}

int multibyte_mamba_step(const MambaStack *s, int64_t B, const float *x, float *y, float *work) {
    const int64_t D = s->d_model, E = s->d_inner, N = s->d_state, K = s->d_conv, R = s->dt_rank, P = R + 2 * N;
    /* per row: normed input (D), x_in and z (2E), the convolution's output (E), the mixer's
     * output before out_proj (E), (d, B, C) (P), out_proj's result (D); then dt_proj's result
     * (E, one row at a time) */
    float *h = work, *xz = h + B * D, *conv = xz + 2 * B * E, *mixed = conv + B * E, *dbc = mixed + B * E, *r = dbc + B * P;
    float *dt = r + B * D;
    for (int64_t i = 0; i < B * D; i++) y[i] = x[i];
    for (int64_t l = 0; l < s->n_blocks; l++) {
        const MambaBlock *blk = s->blocks + l;
        rms_norm_rows(y, blk->norm, h, B, D, s->eps);
        linear(blk->in_proj, h, xz, B, 2 * E, D);
        for (int64_t b = 0; b < B; b++) {
            const float *x_in = xz + b * 2 * E;
            float *state = blk->conv_state + b * (K - 1) * E, *c = conv + b * E;
            for (int64_t e = 0; e < E; e++) {
                const float *taps = blk->conv_weight + e * K;
                float acc = 0.f;
                for (int64_t k = 0; k < K - 1; k++) acc += state[k * E + e] * taps[k];
                acc += x_in[e] * taps[K - 1];
                c[e] = silu(acc + blk->conv_bias[e]);
            }
            for (int64_t k = 0; k + 1 < K - 1; k++)
                for (int64_t e = 0; e < E; e++) state[k * E + e] = state[(k + 1) * E + e];
            if (K > 1)
                for (int64_t e = 0; e < E; e++) state[(K - 2) * E + e] = x_in[e];
        }
        linear(blk->x_proj, conv, dbc, B, P, E);
        for (int64_t b = 0; b < B; b++) {
            const float *d = dbc + b * P, *Bn = d + R, *Cn = Bn + N, *c = conv + b * E, *z = xz + b * 2 * E + E;
            float *ssm = blk->ssm_state + b * E * N, *m = mixed + b * E;
            linear(blk->dt_weight, d, dt, 1, E, R);
            for (int64_t e = 0; e < E; e++) {
                const float delta = softplus(dt[e] + blk->dt_bias[e]), impulse = delta * c[e];
                const float *A_log = blk->A_log + e * N;
                float *h_e = ssm + e * N, out = 0.f;
#pragma omp simd reduction(+ : out)
                for (int64_t n = 0; n < N; n++) {
                    const float decay = exp_vectorizable(delta * -exp_vectorizable(A_log[n]));
                    h_e[n] = decay * h_e[n] + impulse * Bn[n];
                    out += h_e[n] * Cn[n];
                }
                m[e] = (out + c[e] * blk->D[e]) * silu(z[e]);
            }
        }
        linear(blk->out_proj, mixed, r, B, D, E);
        for (int64_t i = 0; i < B * D; i++) y[i] += r[i];
    }
    rms_norm_rows(y, s->final_norm, y, B, D, s->eps);
    return 0;
}
