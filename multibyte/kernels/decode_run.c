/* Whole decoding steps of a hierarchical byte model with fixed units (or SpaceByte's word units),
 * and runs of them with the draw of every next byte, in fp32 on a CPU: the native twin of
 * `multibyte.model.HierarchicalByteModel._decode_byte_in_step` followed by
 * `multibyte.sampling.sample_with_noise` (see `multibyte.kernels.decode_run.NativeDecode`).
 *
 * With two stages or more, the step is chosen by the byte's position t (the next byte is t + 1):
 *   - the byte step, when t + 1 starts no unit of an outer stage (11 of 12 bytes with P = 12):
 *     record the byte (and its position's vector, when the model has byte positions), move the
 *     counters on, run the innermost stack on
 *     embedding(byte) + context[(t + 1) % P_inner], the head;
 *   - the unit step of a two-stage (MEGABYTE-shaped) model, when t + 1 starts a patch: record
 *     the byte, pool the patch (its bytes' vectors side by side), add the lagged patches'
 *     projection and the patch's position, run the outer stack, project its output into the
 *     local model's P contexts, restart the local model from its pad + context 0, the head.
 * A one-stage model (the vanilla byte transformer, MambaByte) has one step: embedding (+ byte
 * position), its attention or Mamba stack, the head.
 * With SpaceByte's word boundaries instead of fixed patches (two stages), the same two steps,
 * chosen by the patcher's rule on the byte being fed (`multibyte_space_run`).
 * A run feeds one byte, draws the next from the logits with the caller's Exp(1) noise (the
 * exponential race: argmax softmax(logits / T) / noise after the top-k and top-p masks; T = 0:
 * argmax logits) and feeds it, k times, so a whole patch costs one call from Python instead of
 * a dozen.
 */
#include "attention_step.h"
#include "mamba_step.h"

typedef struct {
    const AttentionStack *stack; /* the innermost stage's stack */
    const float *embedding;      /* (V_in, D) its byte embedding */
    float *contexts;             /* (B, siblings, D) its slices of the parent's output */
    const weight_t *head;        /* (V, D) */
    int64_t vocab_in, siblings, vocab;
    int64_t *unit_tokens;  /* (B, unit_slots) */
    uint8_t *unit_present; /* (B, unit_slots), torch.bool */
    int64_t *coords;       /* (B, num_stages) */
    int64_t *unit_lengths; /* (B, num_stages - 1) */
    int64_t *positions;    /* (B,) */
    int64_t unit_slots, num_stages;
    const float *position_table; /* (position_rows, extra_width) byte positions, or NULL */
    int64_t position_rows, extra_width;
    float *unit_extra; /* (B, unit_slots, extra_width): the unit's bytes' positions, for the outer pooling */
} ByteStep;

typedef struct {
    const ByteStep *inner;          /* the local (innermost) stage, the head and the counters */
    const AttentionStack *stack;    /* the global (outer) stage's stack */
    const float *embedding;         /* (V_in, width): a patch is its bytes' vectors side by side */
    int64_t width;                  /* D_0 / unit_slots */
    const weight_t *lag_proj;       /* (D_0, n_lags * D_0), NULL without lags */
    float *lag_ring;                /* (B, ring, D_0): patch k at slot k % ring */
    const int64_t *lags;            /* (n_lags,) */
    int64_t n_lags, ring;
    const float *unit_position;     /* (position_rows, D_0) learned positions, or NULL */
    int64_t position_rows;
    const float *grid_rows;         /* (grid_r, D_0) or NULL */
    const float *grid_cols;         /* (grid_c, D_0) */
    int64_t grid_r, grid_c;
    const weight_t *from_parent;    /* (D_1, D_0 / siblings) */
    const float *pad;               /* (D_1,) the local stage's pad */
} UnitStep;

int64_t multibyte_byte_step_workspace(const ByteStep *s, int64_t rows) {
    return 2 * rows * s->stack->d_model + multibyte_attention_workspace(s->stack, rows);
}

/* Record bytes (B,) at `slot` of the outermost unit (with their positions' vectors, for the
 * outermost stage's pooling) and move the common counters on by one byte. */
static void record(const ByteStep *s, int64_t B, const int64_t *bytes, int64_t slot) {
    const int64_t U = s->unit_slots, w = s->extra_width;
    for (int64_t b = 0; b < B; b++) {
        if (s->position_table) {
            const int64_t row = s->positions[b] < s->position_rows - 1 ? s->positions[b] : s->position_rows - 1;
            const float *p = s->position_table + row * w;
            float *extra = s->unit_extra + (b * U + slot) * w;
            for (int64_t i = 0; i < w; i++) extra[i] = p[i];
        }
        s->unit_tokens[b * U + slot] = bytes[b];
        s->unit_present[b * U + slot] = 1;
        s->positions[b] += 1;
    }
}

/* Consume bytes (B,) at `slot` of the outermost unit when the next byte starts no outer unit:
 * record them, move the counters on (the innermost stage's unit index to `context_index`, every
 * outer unit one byte longer), run the stack on embedding + context, write the head's (B, V)
 * logits. Returns 0, or 1 (nothing written) when a byte is out of range or a cache is full. */
int multibyte_byte_step(const ByteStep *s, int64_t B, const int64_t *bytes, int64_t slot, int64_t context_index,
                        float *logits, float *work) {
    const int64_t D = s->stack->d_model, N = s->num_stages;
    float *x = work, *y = x + B * D;
    for (int64_t b = 0; b < B; b++)
        if (bytes[b] < 0 || bytes[b] >= s->vocab_in) return 1;
    for (int64_t b = 0; b < B; b++) {
        const float *e = s->embedding + bytes[b] * D, *c = s->contexts + (b * s->siblings + context_index) * D;
        for (int64_t i = 0; i < D; i++) x[b * D + i] = e[i] + c[i];
    }
    if (multibyte_attention_step(s->stack, B, x, y, y + B * D)) return 1;
    record(s, B, bytes, slot);
    for (int64_t b = 0; b < B; b++) {
        s->coords[b * N + N - 1] += 1;
        for (int64_t j = 0; j < N - 1; j++) s->unit_lengths[b * (N - 1) + j] += 1;
    }
    linear(s->head, y, logits, B, s->vocab, D);
    return 0;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

int64_t multibyte_unit_step_workspace(const UnitStep *u, int64_t rows) {
    const int64_t D0 = u->stack->d_model, D1 = u->inner->stack->d_model;
    const int64_t stacks = max64(multibyte_attention_workspace(u->stack, rows), multibyte_attention_workspace(u->inner->stack, rows));
    return rows * (2 * D0 + u->n_lags * D0 + D0 + 2 * D1) + stacks;
}

/* Consume bytes (B,) at the last `slot` of a patch (the next byte starts a patch) of a
 * two-stage model; the (B, V) logits of the next byte. Returns 0, or 1 (nothing written) when a
 * byte or the patch's position is out of range or a cache is full. */
int multibyte_unit_step(const UnitStep *u, int64_t B, const int64_t *bytes, int64_t slot, float *logits, float *work) {
    const ByteStep *s = u->inner;
    const int64_t D0 = u->stack->d_model, D1 = s->stack->d_model, U = s->unit_slots, S = s->siblings;
    const int64_t w = u->width, piece = D0 / S, L = u->n_lags;
    float *x = work, *h = x + B * D0, *lagged = h + B * D0, *projected = lagged + B * L * D0;
    float *x1 = projected + B * D0, *h1 = x1 + B * D1, *rest = h1 + B * D1;
    for (int64_t b = 0; b < B; b++) {
        if (bytes[b] < 0 || bytes[b] >= s->vocab_in) return 1;
        if (u->unit_position && s->coords[b * 2] + 1 >= u->position_rows) return 1;
    }
    if (multibyte_attention_full(u->stack, B) || s->stack->slots < 2) return 1;
    /* Record the byte; the patch k = coords[b, 0] + 1 starts at the next byte. */
    record(s, B, bytes, slot);
    for (int64_t b = 0; b < B; b++) {
        s->coords[b * 2] += 1;
        s->coords[b * 2 + 1] = 0;
        s->unit_lengths[b] = 0;
    }
    /* The finished patch: its present bytes' vectors (+ their positions') side by side, absent
     * slots zeros. */
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < U; j++) {
            const float *e = u->embedding + s->unit_tokens[b * U + j] * w;
            const int present = s->unit_present[b * U + j];
            float *xj = x + b * D0 + j * w;
            if (s->position_table) {
                const float *extra = s->unit_extra + (b * U + j) * w;
                for (int64_t i = 0; i < w; i++) xj[i] = present ? e[i] + extra[i] : 0.f;
            } else {
                for (int64_t i = 0; i < w; i++) xj[i] = present ? e[i] : 0.f;
            }
        }
    if (u->lag_proj) { /* patch k - 1 into the ring, then patches k - lag back out (zeros before 0) */
        for (int64_t b = 0; b < B; b++) {
            const int64_t k = s->coords[b * 2];
            float *ring = u->lag_ring + b * u->ring * D0;
            const int64_t written = ((k - 1) % u->ring + u->ring) % u->ring;
            for (int64_t i = 0; i < D0; i++) ring[written * D0 + i] = x[b * D0 + i];
            for (int64_t l = 0; l < L; l++) {
                const int64_t back = k - u->lags[l];
                const float *v = ring + ((back % u->ring + u->ring) % u->ring) * D0;
                float *out = lagged + (b * L + l) * D0;
                for (int64_t i = 0; i < D0; i++) out[i] = back >= 0 ? v[i] : 0.f;
            }
        }
        linear(u->lag_proj, lagged, projected, B, D0, L * D0);
        for (int64_t i = 0; i < B * D0; i++) x[i] += projected[i];
    }
    for (int64_t b = 0; b < B; b++) { /* the patch's position at the global scale */
        const int64_t k = s->coords[b * 2];
        float *xb = x + b * D0;
        if (u->unit_position) {
            const float *p = u->unit_position + k * D0;
            for (int64_t i = 0; i < D0; i++) xb[i] += p[i];
        } else if (u->grid_rows) {
            const int64_t cell = k % (u->grid_r * u->grid_c);
            const float *r = u->grid_rows + (cell / u->grid_c) * D0, *c = u->grid_cols + (cell % u->grid_c) * D0;
            for (int64_t i = 0; i < D0; i++) xb[i] += r[i] + c[i];
        }
    }
    multibyte_attention_step(u->stack, B, x, h, rest); /* room checked above */
    /* The local model's contexts: slice j of the global output, projected, for byte j. */
    for (int64_t b = 0; b < B; b++)
        linear(u->from_parent, h + b * D0, s->contexts + b * S * D1, S, D1, piece);
    /* The local model restarts: empty caches, input pad + context 0. */
    for (int64_t l = 0; l < s->stack->n_blocks; l++)
        for (int64_t b = 0; b < B; b++) s->stack->blocks[l].lengths[b] = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < D1; i++) x1[b * D1 + i] = u->pad[i] + s->contexts[b * S * D1 + i];
    multibyte_attention_step(s->stack, B, x1, h1, rest);
    for (int64_t i = 0; i < B * U; i++) s->unit_present[i] = 0; /* the next patch starts empty */
    linear(s->head, h1, logits, B, s->vocab, D1);
    return 0;
}

/* How the next byte is drawn: `sample_with_noise`'s options and generate's stop byte. */
typedef struct {
    float temperature; /* 0: greedy (argmax of the logits; the rest is ignored) */
    int64_t top_k;     /* keep the top_k likeliest (ties with the k-th kept); 0: all */
    float top_p;       /* then the likeliest whose probabilities add up to top_p; >= 1: all */
    int64_t stop;      /* once a row draws this byte it keeps drawing it; -1: none */
} DrawRule;

/* order (V,) := 0..V-1 by z descending, ties by index ascending: a stable bottom-up merge sort
 * (scratch: V more indices). */
static void sort_descending(const float *z, int32_t *order, int32_t *scratch, int64_t V) {
    int32_t *from = order, *to = scratch;
    for (int64_t v = 0; v < V; v++) order[v] = (int32_t)v;
    for (int64_t width = 1; width < V; width *= 2) {
        for (int64_t lo = 0; lo < V; lo += 2 * width) {
            const int64_t mid = lo + width < V ? lo + width : V, hi = lo + 2 * width < V ? lo + 2 * width : V;
            int64_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) to[k++] = z[from[j]] > z[from[i]] ? from[j++] : from[i++];
            while (i < mid) to[k++] = from[i++];
            while (j < hi) to[k++] = from[j++];
        }
        int32_t *swap = from;
        from = to, to = swap;
    }
    if (from != order) memcpy(order, from, (size_t)V * sizeof *order);
}

/* The byte `sample_with_noise` draws from one row of logits (V,) with its Exp(1) noise (V,):
 * z = logits / T, top-k and top-p masks (-inf), then argmax_v softmax(z)_v / noise_v, the
 * first on ties; T = 0 (or no noise): argmax of the logits. z: V floats of scratch, order: 2V. */
static int64_t draw(const float *logits, const float *noise, const DrawRule *rule, int64_t V, float *z, int32_t *order) {
    int64_t best = 0;
    if (rule->temperature == 0.f || !noise) {
        for (int64_t v = 1; v < V; v++)
            if (logits[v] > logits[best]) best = v;
        return best;
    }
    for (int64_t v = 0; v < V; v++) z[v] = logits[v] / rule->temperature;
    const int masks = (rule->top_k > 0 && rule->top_k < V) || rule->top_p < 1.f;
    if (masks) sort_descending(z, order, order + V, V);
    if (rule->top_k > 0 && rule->top_k < V) {
        const float kth = z[order[rule->top_k - 1]];
        for (int64_t v = 0; v < V; v++)
            if (z[v] < kth) z[v] = -INFINITY;
    }
    if (rule->top_p < 1.f) { /* the mass of the likelier bytes before each, in sorted order */
        const float top = z[order[0]];
        float total = 0.f, before = 0.f;
        for (int64_t r = 0; r < V; r++) total += expf(z[order[r]] - top);
        for (int64_t r = 0; r < V; r++) {
            const float p = expf(z[order[r]] - top) / total;
            if (before >= rule->top_p) z[order[r]] = -INFINITY;
            before += p;
        }
    }
    float top = -INFINITY, total = 0.f;
    for (int64_t v = 0; v < V; v++) top = z[v] > top ? z[v] : top;
    for (int64_t v = 0; v < V; v++) total += (z[v] = expf(z[v] - top)); /* expf(-inf) = 0 */
    float best_score = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        const float score = z[v] / total / noise[v];
        if (score > best_score) best_score = score, best = v;
    }
    return best;
}

/* Draw every row's next byte from its logits (B, V) and noise (B, V) (NULL: greedy) into out
 * (B,), with the stop rule; returns how many rows still run (B without a stop byte). */
static int64_t draw_rows(const float *logits, const float *noise, const DrawRule *rule, uint8_t *stopped, int64_t *out,
                         int64_t B, int64_t V, float *z, int32_t *order) {
    int64_t running = B;
    for (int64_t b = 0; b < B; b++) {
        int64_t byte = draw(logits + b * V, noise ? noise + b * V : 0, rule, V, z, order);
        if (rule->stop >= 0) {
            if (stopped[b]) byte = rule->stop;
            stopped[b] |= byte == rule->stop;
            running -= stopped[b];
        }
        out[b] = byte;
    }
    return running;
}

int64_t multibyte_decode_run_workspace(const ByteStep *s, const UnitStep *u, int64_t rows) {
    const int64_t steps = u ? max64(multibyte_byte_step_workspace(s, rows), multibyte_unit_step_workspace(u, rows))
                            : multibyte_byte_step_workspace(s, rows);
    return rows * s->vocab + 3 * s->vocab + steps; /* logits, z, order and its scratch (int32) */
}

/* Up to k steps from position t0: feed `first` (B,) at t0, draw the byte after it from
 * noise[0] (k, B, V) (NULL: greedy) by `rule` into out[0] (k, B), feed that at t0 + 1, ... With
 * a stop byte, `stopped` (B,) marks the rows that drew it (they draw it from then on) and the run
 * ends once every row has. A step at a position that starts an outer unit needs the unit step
 * (`u`, two stages only); `inner_period` is the innermost stage's parent unit in bytes. Returns
 * the steps done: fewer than k where every row stopped or the next step cannot run here (no unit
 * step, a cache full, a byte out of range; nothing of that step written). */
int64_t multibyte_decode_run(const ByteStep *s, const UnitStep *u, int64_t B, int64_t t0, int64_t inner_period,
                             const int64_t *first, int64_t k, const float *noise, const DrawRule *rule, uint8_t *stopped,
                             int64_t *out, float *work) {
    const int64_t V = s->vocab, U = s->unit_slots;
    float *logits = work, *z = logits + B * V, *rest = z + 3 * V;
    int32_t *order = (int32_t *)(z + V);
    const int64_t *feed = first;
    for (int64_t j = 0; j < k; j++) {
        const int64_t t = t0 + j, next = t + 1;
        int failed;
        if (next % inner_period)
            failed = multibyte_byte_step(s, B, feed, t % U, next % inner_period, logits, rest);
        else if (u && next % U == 0)
            failed = multibyte_unit_step(u, B, feed, t % U, logits, rest);
        else
            failed = 1;
        if (failed) return j;
        feed = out + j * B;
        if (!draw_rows(logits, noise ? noise + j * B * V : 0, rule, stopped, out + j * B, B, V, z, order)) return j + 1;
    }
    return k;
}

/* SpaceByte's rule (multibyte/patchers/space.py): a byte is space-like unless it is an ASCII
 * letter or digit or a UTF-8 continuation byte. (Exported for the tests.) */
int multibyte_space_like(int64_t byte) {
    const int letter = (byte >= 'A' && byte <= 'Z') || (byte >= 'a' && byte <= 'z');
    const int digit = byte >= '0' && byte <= '9', continuation = byte >= 0x80 && byte <= 0xBF;
    return !(letter || digit || continuation);
}

/* `multibyte_decode_run` for a two-stage model whose outer units end at SpaceByte's word
 * boundaries: the byte being fed ends its unit when it is space-like and the byte before was not
 * (`spacy` (B,), the patcher's state, says whether it was), or when the unit would otherwise
 * grow past `max_length` bytes; then the unit step runs, else the byte step, at the slot
 * coords[b, 1]. levels[j] (k,) receives each step's level (0: the next byte starts a unit, 1:
 * not), for the caller's cache bookkeeping. The rows must agree on the level and the slot: the
 * first step where they do not is left to the caller (fewer than k steps done, as for a full
 * cache or a byte out of range). */
int64_t multibyte_space_run(const ByteStep *s, const UnitStep *u, int64_t B, uint8_t *spacy, int64_t max_length,
                            const int64_t *first, int64_t k, const float *noise, const DrawRule *rule, uint8_t *stopped,
                            int64_t *out, int64_t *levels, float *work) {
    const int64_t V = s->vocab;
    float *logits = work, *z = logits + B * V, *rest = z + 3 * V;
    int32_t *order = (int32_t *)(z + V);
    const int64_t *feed = first;
    if (s->num_stages != 2 || !u) return 0;
    for (int64_t j = 0; j < k; j++) {
        const int64_t slot = s->coords[1];
        int starts = 0;
        for (int64_t b = 0; b < B; b++) {
            const int row_starts = (multibyte_space_like(feed[b]) && !spacy[b]) || s->unit_lengths[b] + 1 >= max_length;
            if (b == 0)
                starts = row_starts;
            else if (row_starts != starts || s->coords[b * 2 + 1] != slot)
                return j;
        }
        if (slot < 0 || slot >= s->unit_slots || (!starts && slot + 1 >= s->siblings)) return j;
        const int failed = starts ? multibyte_unit_step(u, B, feed, slot, logits, rest)
                                  : multibyte_byte_step(s, B, feed, slot, slot + 1, logits, rest);
        if (failed) return j;
        for (int64_t b = 0; b < B; b++) spacy[b] = (uint8_t)multibyte_space_like(feed[b]);
        levels[j] = starts ? 0 : 1;
        feed = out + j * B;
        if (!draw_rows(logits, noise ? noise + j * B * V : 0, rule, stopped, out + j * B, B, V, z, order)) return j + 1;
    }
    return k;
}

/* A one-stage model (the vanilla byte transformer, MambaByte): its byte embedding (+ the byte
 * position's vector), one stack, the head: the twin of `_decode_byte_in_step` with N = 1. */
typedef struct {
    const void *stack;           /* an AttentionStack, or a MambaStack when `mamba` */
    int64_t mamba;
    const float *embedding;      /* (V_in, D) */
    const float *position_table; /* (position_rows, D) byte positions, or NULL */
    int64_t position_rows;
    const weight_t *head;        /* (V, D) */
    int64_t vocab_in, vocab, d_model;
    int64_t *coords;             /* (B, 1): bytes so far, as the unit index of the one stage */
    int64_t *positions;          /* (B,) */
} SingleStage;

int64_t multibyte_single_workspace(const SingleStage *s, int64_t rows) {
    const int64_t stack = s->mamba ? multibyte_mamba_workspace(s->stack, rows) : multibyte_attention_workspace(s->stack, rows);
    return rows * s->vocab + 3 * s->vocab + 2 * rows * s->d_model + stack;
}

/* Consume bytes (B,): the (B, V) logits of the next. Returns 0, or 1 (nothing written) when a
 * byte is out of range or an attention cache is full. */
int multibyte_single_step(const SingleStage *s, int64_t B, const int64_t *bytes, float *logits, float *work) {
    const int64_t D = s->d_model;
    float *x = work, *y = x + B * D, *rest = y + B * D;
    for (int64_t b = 0; b < B; b++)
        if (bytes[b] < 0 || bytes[b] >= s->vocab_in) return 1;
    if (!s->mamba && multibyte_attention_full(s->stack, B)) return 1;
    for (int64_t b = 0; b < B; b++) {
        const float *e = s->embedding + bytes[b] * D;
        if (s->position_table) {
            const int64_t row = s->positions[b] < s->position_rows - 1 ? s->positions[b] : s->position_rows - 1;
            const float *p = s->position_table + row * D;
            for (int64_t i = 0; i < D; i++) x[b * D + i] = e[i] + p[i];
        } else {
            for (int64_t i = 0; i < D; i++) x[b * D + i] = e[i];
        }
    }
    if (s->mamba)
        multibyte_mamba_step(s->stack, B, x, y, rest);
    else
        multibyte_attention_step(s->stack, B, x, y, rest);
    for (int64_t b = 0; b < B; b++) s->coords[b] += 1, s->positions[b] += 1;
    linear(s->head, y, logits, B, s->vocab, D);
    return 0;
}

/* `multibyte_decode_run` for a one-stage model. */
int64_t multibyte_single_run(const SingleStage *s, int64_t B, const int64_t *first, int64_t k, const float *noise,
                             const DrawRule *rule, uint8_t *stopped, int64_t *out, float *work) {
    const int64_t V = s->vocab;
    float *logits = work, *z = logits + B * V, *rest = z + 3 * V;
    int32_t *order = (int32_t *)(z + V);
    const int64_t *feed = first;
    for (int64_t j = 0; j < k; j++) {
        if (multibyte_single_step(s, B, feed, logits, rest)) return j;
        feed = out + j * B;
        if (!draw_rows(logits, noise ? noise + j * B * V : 0, rule, stopped, out + j * B, B, V, z, order)) return j + 1;
    }
    return k;
}
