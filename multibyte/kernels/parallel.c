/* A helper thread for the large matrix-vector products of a decoding step (and other work that
 * splits into independent ranges: the Mamba step's channels).
 *
 * A batch-1 step of a large stack (MambaByte's 30 MB of weights, a MEGABYTE global model) reads
 * every weight once; one core cannot draw what the memory system can deliver, two together come
 * much closer, and weights read in int8 are bound by their conversions, which two cores do twice as
 * fast. So `multibyte_parallel_for` hands the second part of a range to one helper thread and runs
 * the first part itself; `multibyte_parallel_linear` splits a product's output rows that way. Each
 * output is computed by one thread with the same code as alone, so the result is bit-identical to
 * the one-thread result.
 *
 * The helper is started on first use (one per library and process; again in a forked child). It
 * waits for work by spinning for a short while (the products of one step follow each other within
 * microseconds) and then sleeps on a condition variable, so between generations it costs nothing.
 */
#define _POSIX_C_SOURCE 200809L
#include "parallel.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "vector_ops.h"

typedef struct {
    multibyte_range_fn run;
    const void *context;
    int64_t first, end; /* the helper's part: first..end-1 */
} Job;

typedef struct {
    const void *W; /* in `format` (vector_ops.h's WEIGHTS_...) */
    int format;
    const float *X;
    float *Y;
    int64_t rows, out, in;
} Product;

/* Output rows j0..j1-1 of a product. */
static void product_rows(const void *context, int64_t j0, int64_t j1) {
    const Product *p = context;
    linear_part(p->W, p->format, p->X, p->Y, p->rows, p->out, p->in, j0, j1);
}

static int threads_allowed = 1;
static int helper_state = 0; /* 0: not started, 1: running, -1: could not start */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t owner = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time hands over work */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_long posted, finished; /* jobs handed to the helper, jobs it finished */
static atomic_int sleeping;
static Job job; /* written before `posted` moves on, read by the helper after it sees that */

static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* How long the helper spins for the next job before it sleeps. */
#define SPIN_SECONDS 200e-6

static void *helper_main(void *unused) {
    (void)unused;
    long seen = atomic_load(&finished);
    for (;;) {
        long now = atomic_load(&posted);
        if (now == seen) {
            const double until = seconds() + SPIN_SECONDS;
            for (int spins = 0; (now = atomic_load(&posted)) == seen; spins++) {
                relax();
                if ((spins & 255) == 255 && seconds() > until) {
                    pthread_mutex_lock(&lock);
                    atomic_store(&sleeping, 1);
                    while ((now = atomic_load(&posted)) == seen) pthread_cond_wait(&wake, &lock);
                    atomic_store(&sleeping, 0);
                    pthread_mutex_unlock(&lock);
                    break;
                }
            }
        }
        const Job j = job;
        j.run(j.context, j.first, j.end);
        seen = now;
        atomic_store(&finished, now);
    }
    return 0;
}

/* In a forked child the helper thread does not exist: start afresh there. */
static void after_fork_in_child(void) {
    helper_state = 0;
    atomic_store(&posted, 0);
    atomic_store(&finished, 0);
    atomic_store(&sleeping, 0);
    pthread_mutex_init(&lock, 0);
    pthread_mutex_init(&owner, 0);
    pthread_cond_init(&wake, 0);
}

static void register_fork_handler(void) { pthread_atfork(0, 0, after_fork_in_child); }

static int start_helper(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    pthread_attr_t attributes;
    pthread_t thread;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    helper_state = pthread_create(&thread, &attributes, helper_main, 0) == 0 ? 1 : -1;
    pthread_attr_destroy(&attributes);
    return helper_state;
}

int multibyte_set_threads(int threads) {
    threads_allowed = threads > 1 ? 2 : 1;
    return threads_allowed;
}

int multibyte_parallel_for(multibyte_range_fn run, const void *context, int64_t first, int64_t end) {
    if (threads_allowed < 2 || first <= 0 || first >= end) return 1;
    /* Several threads of the process may decode at once: the one that holds the helper hands
     * work over, the others compute alone. */
    if (pthread_mutex_trylock(&owner) != 0) return 1;
    if (helper_state == 0) start_helper();
    if (helper_state != 1) {
        pthread_mutex_unlock(&owner);
        return 1;
    }
    job = (Job){.run = run, .context = context, .first = first, .end = end};
    const long id = atomic_fetch_add(&posted, 1) + 1;
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&lock);
        pthread_cond_signal(&wake);
        pthread_mutex_unlock(&lock);
    }
    run(context, 0, first);
    while (atomic_load(&finished) != id) relax();
    pthread_mutex_unlock(&owner);
    return 0;
}

int multibyte_parallel_linear(const void *W, int format, const float *X, float *Y, int64_t rows, int64_t out, int64_t in) {
    const Product product = {.W = W, .format = format, .X = X, .Y = Y, .rows = rows, .out = out, .in = in};
    return multibyte_parallel_for(product_rows, &product, (out / 16) * 8, out); /* the caller: whole groups of 8 */
}
