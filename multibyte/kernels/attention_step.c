/* One position of an attention stack on its KV caches, in fp32 on a CPU: the native twin of
 * `multibyte.model.Stack.forward(x[:, None], states)` for decoding (the reference, in PyTorch,
 * is what every other path runs; tests/test_native_kernels.py holds the two together).
 *
 * Why: a batch-1 decoding step of a small stage is a few hundred thousand multiply-adds spread
 * over ~20 PyTorch ops per block, and on a CPU each op's fixed cost (dispatch, allocation) is
 * larger than its arithmetic. Here a whole stack is one call over the weights in place.
 *
 * Per row b, with t = lengths[b] positions already cached:
 *   for each block:  h = rms_norm(x) * w1;  (q, k, v) = qkv(h);  rotate q, k to position t (RoPE);
 *                    keys/values[b, :, t] = k, v;  a = softmax(q k^T / sqrt(hd)) v over 0..t;
 *                    x += out_proj(a);  x += down(gelu_tanh(up(rms_norm(x) * w2)))  (if any)
 *   y = rms_norm(x) * w_final;  every block's lengths[b] += 1.
 * Linear weights are nn.Linear's (out, in) row-major; caches are (B, H, slots, hd) contiguous.
 */
#include "attention_step.h"

/* Channel pair (j, j + hd/2) turned by the angle position * frequencies[j]. */
static void rotate(float *v, const float *frequencies, int64_t hd, int64_t position) {
    const int64_t half = hd / 2;
    for (int64_t j = 0; j < half; j++) {
        const float angle = (float)position * frequencies[j], c = cosf(angle), s = sinf(angle);
        const float x1 = v[j], x2 = v[j + half];
        v[j] = x1 * c - x2 * s;
        v[j + half] = x2 * c + x1 * s;
    }
}

/* One query over the t + 1 cached positions of one head: out = softmax(q K^T * scale) V. */
static void attend(const float *q, const float *K, const float *V, float *scores, float *out, int64_t t, int64_t hd, float scale) {
    linear_f32(K, q, scores, 1, t + 1, hd); /* the keys are the rows of a (t + 1, hd) matrix */
    float top = -INFINITY;
    for (int64_t p = 0; p <= t; p++) {
        scores[p] *= scale;
        top = scores[p] > top ? scores[p] : top;
    }
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t p = 0; p <= t; p++) total += (scores[p] = exp_vectorizable(scores[p] - top));
    for (int64_t p = 0; p <= t; p++) scores[p] /= total;
    /* out = sum_p scores[p] V[p]: where a head is one to four whole vectors wide, its sums stay in
     * registers over all positions; otherwise out is updated in memory once per position. */
    const int64_t vectors = hd / LANES;
    if (hd % LANES == 0 && vectors <= 4) {
        lanes_t sum[4] = {{0}};
        for (int64_t p = 0; p <= t; p++)
            for (int64_t c = 0; c < 4; c++)
                if (c < vectors) sum[c] += scores[p] * load_lanes(V + p * hd + c * LANES);
        for (int64_t c = 0; c < vectors; c++) memcpy(out + c * LANES, &sum[c], sizeof sum[c]);
        return;
    }
    for (int64_t i = 0; i < hd; i++) out[i] = 0.f;
    for (int64_t p = 0; p <= t; p++) {
        const float w = scores[p];
#pragma omp simd
        for (int64_t i = 0; i < hd; i++) out[i] += w * V[p * hd + i];
    }
}

int64_t multibyte_attention_workspace(const AttentionStack *s, int64_t rows) {
    return rows * (6 * s->d_model + s->hidden) + s->slots;
}

int multibyte_attention_full(const AttentionStack *s, int64_t rows) {
    for (int64_t l = 0; l < s->n_blocks; l++)
        for (int64_t b = 0; b < rows; b++)
            if (s->blocks[l].lengths[b] < 0 || s->blocks[l].lengths[b] >= s->slots - 1) return 1;
    return 0;
}

int multibyte_attention_step(const AttentionStack *s, int64_t B, const float *x, float *y, float *work) {
    const int64_t D = s->d_model, H = s->n_heads, hd = D / H, F = s->hidden, S = s->slots;
    const float scale = 1.f / sqrtf((float)hd);
    /* per row: normed input (D), q k v (3D), attention output (D), a D-wide result, hidden (F) */
    float *h = work, *qkv = h + B * D, *mixed = qkv + 3 * B * D, *r = mixed + B * D, *hidden = r + B * D, *scores = hidden + B * F;
    if (multibyte_attention_full(s, B)) return 1;
    for (int64_t i = 0; i < B * D; i++) y[i] = x[i];
    /* Block by block, each step over every row (the weights of a block are read once). */
    for (int64_t l = 0; l < s->n_blocks; l++) {
        const AttentionBlock *blk = s->blocks + l;
        rms_norm_rows(y, blk->mixer_norm, h, B, D, s->eps);
        linear(blk->qkv, h, qkv, B, 3 * D, D);
        for (int64_t b = 0; b < B; b++) {
            const int64_t t = blk->lengths[b];
            for (int64_t head = 0; head < H; head++) {
                float *q = qkv + b * 3 * D + head * hd, *k = q + D, *v = q + 2 * D;
                if (s->frequencies) {
                    rotate(q, s->frequencies, hd, t);
                    rotate(k, s->frequencies, hd, t);
                }
                float *K = blk->keys + (b * H + head) * S * hd, *V = blk->values + (b * H + head) * S * hd;
                for (int64_t i = 0; i < hd; i++) K[t * hd + i] = k[i], V[t * hd + i] = v[i];
                attend(q, K, V, scores, mixed + b * D + head * hd, t, hd, scale);
            }
        }
        linear(blk->out_proj, mixed, r, B, D, D);
        for (int64_t i = 0; i < B * D; i++) y[i] += r[i];
        if (blk->ff_norm) {
            rms_norm_rows(y, blk->ff_norm, h, B, D, s->eps);
            linear(blk->up, h, hidden, B, F, D);
            gelu_tanh(hidden, B * F);
            linear(blk->down, hidden, r, B, D, F);
            for (int64_t i = 0; i < B * D; i++) y[i] += r[i];
        }
    }
    rms_norm_rows(y, s->final_norm, y, B, D, s->eps);
    for (int64_t l = 0; l < s->n_blocks; l++)
        for (int64_t b = 0; b < B; b++) s->blocks[l].lengths[b] += 1;
    return 0;
}
