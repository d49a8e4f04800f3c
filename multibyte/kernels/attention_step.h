/* The attention stack step's structures and entry points (attention_step.c), shared by the
 * libraries that run it: attention_step (the stack step alone) and decode_run (whole steps). */
#ifndef MULTIBYTE_KERNELS_ATTENTION_STEP_H
#define MULTIBYTE_KERNELS_ATTENTION_STEP_H

#include "vector_ops.h"

typedef struct {
    const float *mixer_norm; /* (D,) */
    const weight_t *qkv;     /* (3D, D) */
    const weight_t *out_proj; /* (D, D) */
    const float *ff_norm;    /* (D,), NULL when the block has no feed-forward layer */
    const weight_t *up;      /* (F, D) */
    const weight_t *down;    /* (D, F) */
    float *keys;             /* (B, H, slots, hd) */
    float *values;           /* (B, H, slots, hd) */
    int64_t *lengths;        /* (B,) positions cached per row */
} AttentionBlock;

typedef struct {
    int64_t d_model, n_heads, hidden, n_blocks, slots;
    float eps;
    const float *frequencies; /* (hd / 2,) RoPE angular speeds, NULL: no rotary */
    const float *final_norm;  /* (D,) */
    const AttentionBlock *blocks;
} AttentionStack;

/* Workspace floats `multibyte_attention_step` needs for `rows` rows of a stack. */
int64_t multibyte_attention_workspace(const AttentionStack *s, int64_t rows);

/* 1 when a row's cache of some block has no room for one more position (or a length is
 * negative), else 0. */
int multibyte_attention_full(const AttentionStack *s, int64_t rows);

/* x (B, D) in, y (B, D) out (may not alias x); work: multibyte_attention_workspace(s, B) floats.
 * Returns 0, or 1 (nothing written) when a row's cache is full. */
int multibyte_attention_step(const AttentionStack *s, int64_t B, const float *x, float *y, float *work);

#endif
