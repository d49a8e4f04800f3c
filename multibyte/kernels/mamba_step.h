/* The Mamba stack step's structures and entry points (mamba_step.c), shared by the libraries
 * that run it: mamba_step (the stack step alone) and decode_run (whole steps). */
#ifndef MULTIBYTE_KERNELS_MAMBA_STEP_H
#define MULTIBYTE_KERNELS_MAMBA_STEP_H

#include "vector_ops.h"

typedef struct {
    const float *norm;        /* (D,) RMSNorm gain before the mixer */
    const weight_t *in_proj;  /* (2E, D) */
    const float *conv_weight; /* (K, E): tap k of every channel, contiguous */
    const float *conv_bias;   /* (E,) */
    const weight_t *x_proj;   /* (R + 2N, E) */
    const weight_t *dt_weight; /* (E, R) */
    const float *dt_bias;     /* (E,) */
    const float *A;           /* (E, N): -exp(A_log), negative */
    const float *D;           /* (E,) */
    const weight_t *out_proj; /* (D, E) */
    float *conv_state;        /* (B, K - 1, E) */
    float *ssm_state;         /* (B, E, N) */
} MambaBlock;

typedef struct {
    int64_t d_model, d_inner, d_state, d_conv, dt_rank, n_blocks;
    float eps;
    const float *final_norm; /* (D,) */
    const MambaBlock *blocks;
} MambaStack;

/* Workspace floats `multibyte_mamba_step` needs for `rows` rows of a stack. */
int64_t multibyte_mamba_workspace(const MambaStack *s, int64_t rows);

/* x (B, D) in, y (B, D) out (may not alias x); work: multibyte_mamba_workspace(s, B) floats.
 * Updates every block's convolution and state space states; returns 0. */
int multibyte_mamba_step(const MambaStack *s, int64_t B, const float *x, float *y, float *work);

#endif
