/* afm_bench.c - `afm bench`: prefill and decode speed, bytes read per decode token against the
   memory bandwidth measured in the same run, adapter and speculative-decoding costs. Uses the
   public API of afm.h only; the shared CLI helpers are in cli.h. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise */
#endif
#include "../afm.h"
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32)
#include <pthread.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__linux__) || defined(__APPLE__)
#include <sys/resource.h>
static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
#if defined(__APPLE__)
    return ru.ru_maxrss / 1048576.0;
#else
    return ru.ru_maxrss / 1024.0;
#endif
}
#else
static double peak_rss_mb(void) { return 0; }
#endif

/* ---- the roofline: memory read bandwidth, measured ----

   A decode step is a read stream over every weight (about 1 GB for the full-size model), its rows
   split among the threads. The roofline is how fast the memory system delivers such a stream, so the
   probe reads a buffer much larger than the caches, each thread summing its own part, first touched
   by that same thread (on a NUMA machine the pages then sit on the reading thread's node). It
   measures at the benchmark's thread count and with one thread on every online core: the saturated
   figure, which no read stream of afm's can beat. A core's share of the bandwidth is bounded by the
   cache misses it keeps in flight, and that depends on the loads: one Zen 3 core reads 13-15 GB/s
   with 8-byte loads and 18-23 with 32-byte ones. (The first probe, 8-byte loads on the benchmark's threads
   only, read less than afm itself did on a 16-core Xeon.) So the probe tries several read patterns -
   the widest vector loads the CPU has, one to four sequential streams per thread, with and without
   software prefetch as afm's decode kernels use - and keeps the best pass of the best pattern. */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define BW_X86 1 /* AVX2 / AVX-512 variants, compiled for their targets, chosen at run time */
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define BW_NEON 1
#endif
#if defined(__GNUC__)
#define BW_PREFETCH(p) __builtin_prefetch(p)
#else
#define BW_PREFETCH(p) ((void)(p))
#endif
#if defined(_WIN32)
#include <windows.h>
#else
#include <unistd.h>
#endif

/* Every pattern reads its part as `streams` equal contiguous ranges in lockstep, BW_STEP bytes of each
   per step (two 64-byte lines: two misses per stream in flight from the loop alone); with prefetch it
   also asks for the lines BW_PF bytes ahead (inside its range: a pointer past the buffer would be
   undefined). Parts are multiples of BW_ALIGN, so every pattern reads every byte of its part. */
#define BW_STEP 128
#define BW_PF 1024
#define BW_MAX_STREAMS 4
#define BW_ALIGN (BW_STEP * BW_MAX_STREAMS)

typedef uint64_t (*bw_read_fn)(const unsigned char *p, size_t n, int streams, int prefetch);

/* Portable: 16 independent 8-byte sums per step, so no add waits on another. */
static uint64_t bw_read_scalar(const unsigned char *p, size_t n, int streams, int prefetch) {
    uint64_t s[16] = { 0 }, total = 0;
    size_t len = n / (size_t)streams, i;
    int j, k;
    for (i = 0; i < len; i += BW_STEP)
        for (j = 0; j < streams; j++) {
            const uint64_t *q = (const uint64_t *)(p + (size_t)j * len + i);
            if (prefetch && i + BW_PF < len) BW_PREFETCH(p + (size_t)j * len + i + BW_PF);
            for (k = 0; k < 16; k++) s[k] += q[k];
        }
    for (k = 0; k < 16; k++) total += s[k];
    return total;
}

#if defined(BW_X86)
__attribute__((target("avx2"))) static uint64_t bw_read_avx2(const unsigned char *p, size_t n, int streams, int prefetch) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    uint64_t o[4];
    size_t len = n / (size_t)streams, i;
    int j;
    for (i = 0; i < len; i += BW_STEP)
        for (j = 0; j < streams; j++) {
            const unsigned char *q = p + (size_t)j * len + i;
            if (prefetch && i + BW_PF < len) { BW_PREFETCH(q + BW_PF); BW_PREFETCH(q + BW_PF + 64); }
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)q));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(q + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(q + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(q + 96)));
        }
    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    _mm256_storeu_si256((__m256i *)o, a0);
    return o[0] + o[1] + o[2] + o[3];
}
__attribute__((target("avx512f"))) static uint64_t bw_read_avx512(const unsigned char *p, size_t n, int streams, int prefetch) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    uint64_t o[8];
    size_t len = n / (size_t)streams, i;
    int j, k;
    for (i = 0; i < len; i += BW_STEP)
        for (j = 0; j < streams; j++) {
            const unsigned char *q = p + (size_t)j * len + i;
            if (prefetch && i + BW_PF < len) { BW_PREFETCH(q + BW_PF); BW_PREFETCH(q + BW_PF + 64); }
            a0 = _mm512_add_epi64(a0, _mm512_loadu_si512((const void *)q));
            a1 = _mm512_add_epi64(a1, _mm512_loadu_si512((const void *)(q + 64)));
        }
    _mm512_storeu_si512((void *)o, _mm512_add_epi64(a0, a1));
    for (k = 1; k < 8; k++) o[0] += o[k];
    return o[0];
}
#endif

#if defined(BW_NEON)
static uint64_t bw_read_neon(const unsigned char *p, size_t n, int streams, int prefetch) {
    uint64x2_t a[8];
    size_t len = n / (size_t)streams, i;
    int j, k;
    for (k = 0; k < 8; k++) a[k] = vdupq_n_u64(0);
    for (i = 0; i < len; i += BW_STEP)
        for (j = 0; j < streams; j++) {
            const uint64_t *q = (const uint64_t *)(p + (size_t)j * len + i);
            if (prefetch && i + BW_PF < len) { BW_PREFETCH((const unsigned char *)q + BW_PF); BW_PREFETCH((const unsigned char *)q + BW_PF + 64); }
            for (k = 0; k < 8; k++) a[k] = vaddq_u64(a[k], vld1q_u64(q + 2 * k));
        }
    for (k = 1; k < 8; k++) a[0] = vaddq_u64(a[0], a[k]);
    return vgetq_lane_u64(a[0], 0) + vgetq_lane_u64(a[0], 1);
}
#endif

typedef struct bw_pattern { const char *name; bw_read_fn fn; int streams, prefetch; } bw_pattern;

/* Six patterns of one read function: 1, 2 and 4 streams, each without and with prefetch. */
static int bw_add_level(bw_pattern *out, int n, const char *name, bw_read_fn fn) {
    int s;
    for (s = 1; s <= BW_MAX_STREAMS; s *= 2) {
        out[n].name = name; out[n].fn = fn; out[n].streams = s; out[n].prefetch = 0; n++;
        out[n].name = name; out[n].fn = fn; out[n].streams = s; out[n].prefetch = 1; n++;
    }
    return n;
}

/* The patterns this CPU can run (at most 24): scalar always, each vector level where afm's own
   kernel selection says the CPU (and the OS) have it. */
static int bw_patterns(bw_pattern *out) {
    int n = bw_add_level(out, 0, "scalar", bw_read_scalar);
#if defined(BW_X86)
    if (afm_kernels_supported(AFM_KERNELS_AVX2)) n = bw_add_level(out, n, "avx2", bw_read_avx2);
    if (afm_kernels_supported(AFM_KERNELS_AVX512)) n = bw_add_level(out, n, "avx512", bw_read_avx512);
#endif
#if defined(BW_NEON)
    n = bw_add_level(out, n, "neon", bw_read_neon);
#endif
    return n;
}

/* Online cores; the fallback where the system cannot say. */
static int bw_online_cores(int fallback) {
    long n = 0;
#if defined(_WIN32)
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    n = (long)si.dwNumberOfProcessors;
#elif defined(_SC_NPROCESSORS_ONLN)
    n = sysconf(_SC_NPROCESSORS_ONLN);
#endif
    return n >= 1 ? (n > 1024 ? 1024 : (int)n) : fallback;
}

/* The probe's threads: persistent for all its passes, so the thread that first touched a part is
   the one that reads it. Thread 0 is the caller; each job (touch, or a timed pass) is handed to all
   by bumping `gen` and ends when `pending` reaches 0. */
typedef struct bw_probe bw_probe;
typedef struct bw_thread { bw_probe *pr; int ith; uint64_t sum; } bw_thread;
struct bw_probe {
    unsigned char *buf;
    size_t part; /* bytes per thread, a multiple of BW_ALIGN */
    int n_threads, pattern, gen, pending, quit;
    const bw_pattern *pat;
    bw_thread *th;
#if defined(_WIN32)
    HANDLE *handles;
    CRITICAL_SECTION lock;
    CONDITION_VARIABLE wake, done;
#else
    pthread_t *handles;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
#endif
};
#if defined(_WIN32)
#define BW_LOCK(pr) EnterCriticalSection(&(pr)->lock)
#define BW_UNLOCK(pr) LeaveCriticalSection(&(pr)->lock)
#define BW_WAIT(pr, cv) SleepConditionVariableCS(&(pr)->cv, &(pr)->lock, INFINITE)
#define BW_BROADCAST(pr, cv) WakeAllConditionVariable(&(pr)->cv)
#else
#define BW_LOCK(pr) pthread_mutex_lock(&(pr)->lock)
#define BW_UNLOCK(pr) pthread_mutex_unlock(&(pr)->lock)
#define BW_WAIT(pr, cv) pthread_cond_wait(&(pr)->cv, &(pr)->lock)
#define BW_BROADCAST(pr, cv) pthread_cond_broadcast(&(pr)->cv)
#endif

/* One job on thread t's part: pattern < 0 first-touches it (writes every page), else reads it. */
static void bw_job(bw_thread *t) {
    bw_probe *pr = t->pr;
    unsigned char *p = pr->buf + (size_t)t->ith * pr->part;
    if (pr->pattern < 0) {
        size_t i;
        for (i = 0; i < pr->part; i += 8) { uint64_t v = i; memcpy(p + i, &v, 8); }
    } else {
        const bw_pattern *pat = &pr->pat[pr->pattern];
        t->sum += pat->fn(p, pr->part, pat->streams, pat->prefetch);
    }
}

#if defined(_WIN32)
static DWORD WINAPI bw_worker(LPVOID arg) {
#else
static void *bw_worker(void *arg) {
#endif
    bw_thread *t = (bw_thread *)arg;
    bw_probe *pr = t->pr;
    int seen = 0;
    for (;;) {
        BW_LOCK(pr);
        while (pr->gen == seen && !pr->quit) BW_WAIT(pr, wake);
        seen = pr->gen;
        if (pr->quit) { BW_UNLOCK(pr); return 0; }
        BW_UNLOCK(pr);
        bw_job(t);
        BW_LOCK(pr);
        if (--pr->pending == 0) BW_BROADCAST(pr, done);
        BW_UNLOCK(pr);
    }
}

/* Runs one job on every thread; returns its wall time. */
static double bw_run(bw_probe *pr, int pattern) {
    double t0 = now_seconds();
    BW_LOCK(pr);
    pr->pattern = pattern;
    pr->pending = pr->n_threads - 1;
    pr->gen++;
    BW_BROADCAST(pr, wake);
    BW_UNLOCK(pr);
    bw_job(&pr->th[0]);
    BW_LOCK(pr);
    while (pr->pending > 0) BW_WAIT(pr, done);
    BW_UNLOCK(pr);
    return now_seconds() - t0;
}

#define BW_PASSES 3

/* Read bandwidth in bytes/s with n_threads threads over about `bytes` bytes: the best of `passes`
   passes of every pattern and 2 x `passes` more of the best (0 if nothing could be allocated).
   best_pattern: the winning pattern's name. */
static double measure_bandwidth(int n_threads, size_t bytes, int passes, char *best_pattern, size_t best_cap) {
    bw_pattern pats[32];
    bw_probe pr;
    int n_pat = bw_patterns(pats), i, k, started = 1, best_k = 0;
    double best = 0;
    memset(&pr, 0, sizeof pr);
    if (best_pattern && best_cap) best_pattern[0] = 0;
    pr.n_threads = n_threads < 1 ? 1 : n_threads;
    pr.part = bytes / (size_t)pr.n_threads / BW_ALIGN * BW_ALIGN;
    if (pr.part == 0) return 0;
    /* 64-byte aligned start: every load of a step then lies in one cache line */
    pr.buf = (unsigned char *)malloc(pr.part * (size_t)pr.n_threads + 64);
    pr.th = (bw_thread *)calloc((size_t)pr.n_threads, sizeof *pr.th);
    pr.handles = (
#if defined(_WIN32)
        HANDLE
#else
        pthread_t
#endif
        *)calloc((size_t)pr.n_threads, sizeof *pr.handles);
    if (!pr.buf || !pr.th || !pr.handles) { free(pr.buf); free(pr.th); free(pr.handles); return 0; }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    { /* huge pages, as afm.h asks for a model's weights: a probe on 4 KiB pages would pay TLB
         misses the decode does not */
        const uintptr_t huge = (uintptr_t)1 << 21, lo = ((uintptr_t)pr.buf + huge - 1) & ~(huge - 1),
                        hi = ((uintptr_t)pr.buf + pr.part * (size_t)pr.n_threads) & ~(huge - 1);
        if (hi > lo) madvise((void *)lo, (size_t)(hi - lo), MADV_HUGEPAGE);
    }
#endif
    {
        unsigned char *base = pr.buf;
        pr.buf = base + (64 - (size_t)((uintptr_t)base % 64)) % 64;
        pr.pat = pats;
#if defined(_WIN32)
        InitializeCriticalSection(&pr.lock);
        InitializeConditionVariable(&pr.wake);
        InitializeConditionVariable(&pr.done);
#else
        pthread_mutex_init(&pr.lock, NULL);
        pthread_cond_init(&pr.wake, NULL);
        pthread_cond_init(&pr.done, NULL);
#endif
        for (i = 0; i < pr.n_threads; i++) { pr.th[i].pr = &pr; pr.th[i].ith = i; }
        for (i = 1; i < pr.n_threads && started; i++) {
#if defined(_WIN32)
            pr.handles[i] = CreateThread(NULL, 0, bw_worker, &pr.th[i], 0, NULL);
            started = pr.handles[i] != NULL;
#else
            started = pthread_create(&pr.handles[i], NULL, bw_worker, &pr.th[i]) == 0;
#endif
        }
        if (!started) pr.n_threads = i - 1; /* the threads that run; the rest of the buffer is unused */
        bw_run(&pr, -1);
        /* every pattern `passes` times, then the best one as often again: on a shared machine a pass
           can lose its core to another job, and more passes of the pattern that matters find a quiet one */
        for (k = 0, i = 0; k <= n_pat; k++) {
            int kk = k < n_pat ? k : best_k, reps = k < n_pat ? passes : 2 * passes;
            for (i = 0; i < reps; i++) {
                double rate = (double)pr.part * pr.n_threads / bw_run(&pr, kk);
                if (rate > best) {
                    best = rate;
                    best_k = kk;
                }
            }
        }
        if (best_pattern) snprintf(best_pattern, best_cap, "%s, %d stream%s%s", pats[best_k].name, pats[best_k].streams,
                                   pats[best_k].streams > 1 ? "s" : "", pats[best_k].prefetch ? ", prefetch" : "");
        BW_LOCK(&pr);
        pr.quit = 1;
        BW_BROADCAST(&pr, wake);
        BW_UNLOCK(&pr);
        for (i = 1; i < pr.n_threads; i++) {
#if defined(_WIN32)
            WaitForSingleObject(pr.handles[i], INFINITE);
            CloseHandle(pr.handles[i]);
#else
            pthread_join(pr.handles[i], NULL);
#endif
        }
#if defined(_WIN32)
        DeleteCriticalSection(&pr.lock);
#else
        pthread_mutex_destroy(&pr.lock);
        pthread_cond_destroy(&pr.wake);
        pthread_cond_destroy(&pr.done);
#endif
        free(base);
    }
    free(pr.th);
    free(pr.handles);
    return best;
}

/* The probe at n_threads: 1 GiB (32x the largest L3 of one Zen 3 chiplet, many times any L2), or a
   quarter of physical memory if that is less; halved while it cannot be allocated. *used: the size. */
static double probe_bandwidth(int n_threads, char *best_pattern, size_t best_cap, size_t *used) {
    size_t bytes = (size_t)1 << 30;
    double bw = 0;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    {
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        if (pages > 0 && psz > 0 && (double)pages * psz / 4 < (double)bytes) bytes = (size_t)((double)pages * psz / 4);
    }
#endif
    for (; bytes >= ((size_t)64 << 20) && bw == 0; bytes /= 2)
        if ((bw = measure_bandwidth(n_threads, bytes, BW_PASSES, best_pattern, best_cap)) > 0 && used) *used = bytes;
    return bw;
}

/* Bytes per cached key or value element. */
static int kv_bytes(afm_kv_type t) { return t == AFM_KV_INT8 ? 1 : t == AFM_KV_F16 ? 2 : 4; }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
/* The median of v[0 .. n) (sorted in place): of an even count the mean of the middle two, not the
   upper one (with -r 2 that was the slower time and the faster rate). */
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Bytes one decode step must bring from memory. Weights: every tensor of the base once (the tied
   embedding as the output head, whose 153,600 rows every step reads; the input row is one of them),
   the adapter's A and B. KV cache: each segment-0 layer reads its own keys and values at every
   position so far; the n_reuse_layers segment-1 layers re-read the last segment-0 layer's, which
   the step has just read (a few hundred KB at these contexts, still in cache), so they count once.
   Counting distinct bytes keeps this a lower bound of the memory traffic, so the achieved rate
   (bytes x tok/s) is one too. */
static double weight_bytes(const afm_model *m, const afm_adapter *ad) {
    double w = 0;
    int i;
    for (i = 0; i < afm_model_n_tensors(m); i++) {
        afm_tensor_info t;
        afm_model_tensor(m, i, &t);
        if (!strstr(t.name, ".lora_")) w += (double)t.n_bytes; /* the embedded base adapter: only if chosen */
    }
    if (ad) {
        afm_adapter_info info;
        afm_adapter_get_info(ad, &info);
        w += info.n_params * 2.0; /* upper bound: F16 */
    }
    return w;
}
static double kv_read_bytes(const afm_model *m, double kv_positions, int kv_elt) {
    const afm_config *c = afm_model_config(m);
    return (double)(c->n_layers - c->n_reuse_layers) * kv_positions * c->n_kv_heads * c->head_dim * 2.0 * kv_elt;
}


/* ---- afm bench --spec: verification cost and speedup against a controlled drafter ---- */

/* Proposes the base's own greedy continuation (known from a plain run) with probability p per
   token, else a wrong token, so the acceptance rate is controlled. */
typedef struct controlled { const int32_t *ref; int n_prompt, n_ref, vocab; double p; uint64_t rng; } controlled;
static int draft_controlled(void *u, const int32_t *ctx, int n, int k, int32_t *out) {
    controlled *c = (controlled *)u;
    int i, at = n - c->n_prompt; /* ctx ends with the pending token ref[at - 1] */
    (void)ctx;
    for (i = 0; i < k && at + i < c->n_ref; i++) {
        c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
        out[i] = (double)(c->rng >> 11) / 9007199254740992.0 < c->p ? c->ref[at + i] : (c->ref[at + i] + 1) % c->vocab;
    }
    return i;
}

/* A generation's decode tok/s: the tokens after the prompt over their time (0 if none was timed). */
static double stats_decode_tps(const afm_generate_stats *st) {
    return st->t_total > st->t_prompt ? st->n_generated / (st->t_total - st->t_prompt) : 0;
}

/* Plain greedy decoding of n_gen tokens after the prompt, from an empty session: its decode tok/s
   (0 if it failed). */
static double plain_run(afm_session *s, const int32_t *prompt, int n_prompt, int n_gen) {
    afm_generate_params gp;
    afm_generate_stats st;
    memset(&gp, 0, sizeof gp);
    gp.n_predict = n_gen;
    afm_session_rewind(s, 0);
    return afm_generate(s, prompt, n_prompt, &gp, &st) == AFM_OK ? stats_decode_tps(&st) : 0;
}

static int cmd_bench_spec(afm_model *m, afm_adapter *ad, afm_kernels kernels, int n_threads, int n_prompt, int n_gen, int runs) {
    const afm_config *c = afm_model_config(m);
    afm_session_params sp;
    afm_session *s, *s1;
    int32_t *toks = (int32_t *)malloc((size_t)(n_prompt + n_gen + 32) * sizeof *toks), *ref;
    uint64_t x = 88172645463325252ull;
    int i, n, r, pi;
    static const double ps[] = { 0.0, 0.5, 0.7, 0.8, 0.9, 1.0 };
    memset(&sp, 0, sizeof sp);
    sp.kernels = kernels;
    sp.n_threads = n_threads;
    sp.n_ctx = n_prompt + n_gen + 64;
    sp.all_logits = 1;
    if (afm_session_create(m, &sp, &s) != AFM_OK) die("%s", "cannot create a session");
    if (ad) afm_session_set_adapter(s, ad);
    for (i = 0; i < n_prompt + 32; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; toks[i] = (int32_t)(x % (uint64_t)c->vocab_size); }
    afm_session_eval(s, toks, n_prompt);
    /* Beside it a session that computes the logits of the last position only: the difference is what
       the output head (vocabulary x dim) costs for the other positions a verification needs. The two
       alternate, so a busy machine slows both alike. */
    sp.all_logits = 0;
    if (afm_session_create(m, &sp, &s1) != AFM_OK) die("%s", "cannot create a session");
    if (ad) afm_session_set_adapter(s1, ad);
    afm_session_eval(s1, toks, n_prompt);
    printf("verification cost at position %d, %d threads (median of %d); last only: the same without the output head\n"
           "for all but the last position; x decode: the median of each run's ratio to a 1-token step taken just before it\n"
           "%6s %10s %10s %14s %10s\n", n_prompt, n_threads, runs, "tokens", "ms", "x decode", "last only ms", "x decode");
    for (n = 1; n <= 16; n++) {
        double t[100], tl[100], x[100], xl[100];
        for (r = 0; r < runs; r++) {
            /* a 1-token step beside every measurement: a machine whose speed drifts (shared, or
               changing clocks) then changes each ratio's two sides alike */
            double t1, t0 = now_seconds();
            afm_session_eval(s, toks + n_prompt, 1);
            t1 = now_seconds() - t0;
            afm_session_rewind(s, n_prompt);
            t0 = now_seconds();
            afm_session_eval(s, toks + n_prompt, n);
            t[r] = now_seconds() - t0;
            afm_session_rewind(s, n_prompt);
            t0 = now_seconds();
            afm_session_eval(s1, toks + n_prompt, n);
            tl[r] = now_seconds() - t0;
            afm_session_rewind(s1, n_prompt);
            x[r] = t[r] / t1;
            xl[r] = tl[r] / t1;
        }
        printf("%6d %10.2f %10.2f %14.2f %10.2f\n", n, median(t, runs) * 1e3, median(x, runs), median(tl, runs) * 1e3, median(xl, runs));
        fflush(stdout);
    }
    afm_session_free(s1);
    afm_session_free(s);
    /* plain greedy reference (its tokens are what the controlled drafter proposes), then each
       speculative run right after a plain run of its own */
    afm_session_create(m, &sp, &s);
    if (ad) afm_session_set_adapter(s, ad);
    ref = (int32_t *)malloc((size_t)n_gen * sizeof *ref);
    if (plain_run(s, toks, n_prompt, n_gen) <= 0) die("%s", "plain greedy decoding failed");
    {
        int np;
        const int32_t *all = afm_session_tokens(s, &np);
        memcpy(ref, all + n_prompt, (size_t)n_gen * sizeof *ref);
    }
    printf("\nspeculative greedy decoding, %d tokens after a %d-token prompt, %d threads, K chosen by the engine;\n"
           "speedup: the median (and range) of each run's tok/s over that of a plain run just before it\n", n_gen, n_prompt, n_threads);
    printf("%6s %12s %12s %12s %10s %10s %16s\n", "p", "acceptance", "tok/verify", "tok/s", "plain t/s", "speedup", "runs' range");
    for (pi = 0; pi < (int)(sizeof ps / sizeof ps[0]); pi++) {
        afm_generate_params gp;
        afm_generate_stats st;
        controlled cd;
        double tps[100], plain[100], sp_x[100];
        long drafted = 0, accepted = 0, generated = 0, steps = 0;
        for (r = 0; r < runs; r++) {
            if ((plain[r] = plain_run(s, toks, n_prompt, n_gen)) <= 0) die("%s", "plain greedy decoding failed");
            memset(&gp, 0, sizeof gp);
            gp.n_predict = n_gen;
            cd.ref = ref; cd.n_prompt = n_prompt; cd.n_ref = n_gen; cd.vocab = c->vocab_size; cd.p = ps[pi]; cd.rng = 12345 + (uint64_t)r;
            gp.draft_fn = draft_controlled;
            gp.draft_user = &cd;
            afm_session_rewind(s, 0);
            afm_generate(s, toks, n_prompt, &gp, &st);
            {
                int np;
                const int32_t *all = afm_session_tokens(s, &np);
                if (np < n_prompt + n_gen || memcmp(all + n_prompt, ref, (size_t)n_gen * sizeof *ref))
                    die("%s", "speculative output differs from plain greedy output");
            }
            tps[r] = stats_decode_tps(&st);
            sp_x[r] = tps[r] / plain[r];
            drafted += st.n_drafted; accepted += st.n_accepted; generated += st.n_generated; steps += st.n_steps;
        }
        { /* acceptance and tokens per verification over all runs; the speedup's median and range, sp_x
             sorted by median() (one run's drafts are a few dozen coin flips: at p = 0.7 a 128-token run
             ranges over 1.4-1.8x) */
            const double x = median(sp_x, runs);
            printf("%6.2f %11.1f%% %12.2f %12.2f %10.2f %9.2fx %8.2f-%.2fx\n", ps[pi], drafted ? 100.0 * accepted / drafted : 0.0,
                   steps ? (double)generated / steps : 0.0, median(tps, runs), median(plain, runs), x, sp_x[0], sp_x[runs - 1]);
        }
        fflush(stdout);
    }
    free(ref);
    free(toks);
    afm_session_free(s);
    return 0;
}

/* ---- afm bench FILE --grammar: guided generation's costs ---- */
/* The thread's CPU time where there is one (on a shared machine, wall time also counts the moments
   the scheduler gives the core to someone else). */
static double thread_seconds(void) {
#if defined(CLOCK_THREAD_CPUTIME_ID)
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
#else
    return now_seconds();
#endif
}
static char *slurp_or_die(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    char *p;
    long sz = 0;
    if (!f || fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) die("cannot read '%s'", path);
    if (!(p = (char *)malloc((size_t)sz + 1)) || fread(p, 1, (size_t)sz, f) != (size_t)sz) die("cannot read '%s'", path);
    fclose(f);
    p[sz] = 0;
    *n = (size_t)sz;
    return p;
}
static double pctl(double *v, size_t n, double p) {
    if (!n) return 0;
    qsort(v, n, sizeof *v, cmp_double);
    return v[(size_t)(p * (double)(n - 1) + 0.5)];
}
static double decode_tps(afm_model *m, const int32_t *prompt, int n_prompt, int n_gen, int n_threads, afm_kernels kernels,
                         afm_constraint_state *cs, const int32_t *stops, int n_stops) {
    afm_session *s;
    afm_session_params sp;
    afm_generate_params gp;
    afm_generate_stats st;
    memset(&sp, 0, sizeof sp);
    sp.n_threads = n_threads;
    sp.kernels = kernels;
    if (afm_session_create(m, &sp, &s) != AFM_OK) die("%s", "cannot create a session");
    memset(&gp, 0, sizeof gp);
    gp.n_predict = n_gen;
    gp.sampler.temperature = 1.0f;
    gp.sampler.seed = 1;
    gp.constraint = cs;
    gp.stop_tokens = stops;
    gp.n_stop_tokens = n_stops;
    if (afm_generate(s, prompt, n_prompt, &gp, &st) != AFM_OK) die("%s", afm_session_error(s));
    afm_session_free(s);
    return st.n_generated / (st.t_total - st.t_prompt + 1e-12);
}
/* Per schema: the median of 20 compiles; then walks outputs from a fresh constraint state, each
   token drawn uniformly among the allowed ones (the stop token, once allowed, with probability 1/4),
   up to 256 tokens, timing afm_constraint_state_mask (thread CPU time); then, with a model, decode
   tok/s at temperature 1 under the schema and without it. */
static int cmd_bench_grammar(afm_model *m, const char *tok_path, char **schemas, int n_schemas, int walks, int n_gen,
                             int n_threads, afm_kernels kernels) {
    afm_tokenizer *tok = NULL, *mtok = NULL;
    afm_constraint_vocab *v = NULL, *mv = NULL;
    char err[512];
    double t0, *all = NULL;
    size_t n_all = 0, n;
    int i, V;
    uint64_t rng = 88172645463325252ull;
    int32_t prompt[512], stops[2];
    size_t n_prompt = 0;
    int n_stops = 0;
    if (afm_model_tokenizer(m, NULL, &mtok, err, sizeof err) != AFM_OK) die("%s", err);
    if (tok_path) {
        char *d = slurp_or_die(tok_path, &n);
        if (afm_tokenizer_load(d, n, AFM_TOKENIZER_SENTENCEPIECE, NULL, &tok, err, sizeof err) != AFM_OK) die("%s", err);
        free(d);
    } else tok = mtok;
    V = afm_tokenizer_n_vocab(tok);
    t0 = thread_seconds();
    if (afm_constraint_vocab_create(tok, NULL, &v) != AFM_OK) die("%s", "out of memory");
    printf("masks on %s (%d pieces): vocabulary object built in %.1f ms\n", tok_path ? tok_path : "the model's tokenizer", V,
           (thread_seconds() - t0) * 1e3);
    if (tok != mtok && afm_constraint_vocab_create(mtok, NULL, &mv) != AFM_OK) die("%s", "out of memory");
    if (!mv) mv = v;
    {
        afm_chat_message msg;
        msg.role = "user";
        msg.content = "Describe a person from Genesis as JSON.";
        if (afm_chat_tokenize(mtok, &msg, 1, NULL, 0, 1, prompt, 512, &n_prompt) != AFM_OK) die("%s", "cannot encode the prompt");
        stops[n_stops] = afm_tokenizer_special(mtok, AFM_SPECIAL_EOS);
        if (stops[n_stops] >= 0) n_stops++;
        stops[n_stops] = afm_tokenizer_special(mtok, AFM_SPECIAL_TURN_END);
        if (stops[n_stops] >= 0) n_stops++;
    }
    if (!(all = (double *)malloc((size_t)n_schemas * (size_t)walks * 256 * sizeof *all))) die("%s", "out of memory");
    printf("%-20s %9s %10s %10s %7s %9s %10s %10s\n", "schema", "compile", "mask med", "mask p99", "tokens", "complete",
           "free tok/s", "JSON tok/s");
    for (i = 0; i < n_schemas; i++) {
        afm_constraint *c = NULL;
        double ct[20], *mt = all + n_all, tps_free = 0, tps_con = 0;
        size_t m_n = 0;
        int k, w, complete = 0;
        char *text = slurp_or_die(schemas[i], &n);
        const char *base = strrchr(schemas[i], '/') ? strrchr(schemas[i], '/') + 1 : schemas[i];
        for (k = 0; k < 20; k++) {
            afm_constraint_free(c);
            c = NULL;
            t0 = thread_seconds();
            if (afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, text, n, NULL, &c, err, sizeof err) != AFM_OK) {
                fprintf(stderr, "afm: %s: %s\n", schemas[i], err);
                exit(1);
            }
            ct[k] = thread_seconds() - t0;
        }
        for (w = 0; w < walks; w++) {
            afm_constraint_state *cs = NULL;
            int step;
            if (afm_constraint_state_create(c, v, &cs) != AFM_OK) die("%s", "out of memory");
            for (step = 0; step < 256; step++) {
                const uint32_t *mask;
                int32_t t, pick = -1, cnt = 0;
                t0 = thread_seconds();
                mask = afm_constraint_state_mask(cs);
                mt[m_n++] = thread_seconds() - t0;
                if (!mask) die("%s", afm_constraint_state_error(cs));
                if (afm_constraint_state_complete(cs) && (rng = rng * 6364136223846793005ull + 1442695040888963407ull) >> 62 == 0) break;
                for (t = 0; t < V; t++)
                    if (((mask[t >> 5] >> (t & 31)) & 1) && !afm_tokenizer_is_stop(tok, t)) {
                        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                        if ((rng >> 33) % (uint64_t)++cnt == 0) pick = t;
                    }
                if (pick < 0) break;
                afm_constraint_state_advance(cs, pick);
            }
            complete += afm_constraint_state_complete(cs);
            afm_constraint_state_free(cs);
        }
        if (n_gen > 0) {
            afm_constraint_state *cs = NULL;
            if (afm_constraint_state_create(c, mv, &cs) != AFM_OK) die("%s", "out of memory");
            tps_free = decode_tps(m, prompt, (int)n_prompt, n_gen, n_threads, kernels, NULL, NULL, 0);
            tps_con = decode_tps(m, prompt, (int)n_prompt, n_gen, n_threads, kernels, cs, stops, n_stops);
            afm_constraint_state_free(cs);
        }
        n_all += m_n;
        {
            double med, p99;
            med = pctl(mt, m_n, 0.5);
            p99 = pctl(mt, m_n, 0.99);
            printf("%-20.20s %6.3f ms %7.1f us %7.1f us %7d %6d/%-3d %10.1f %10.1f\n", base, pctl(ct, 20, 0.5) * 1e3, med * 1e6,
                   p99 * 1e6, (int)m_n, complete, walks, tps_free, tps_con);
        }
        afm_constraint_free(c);
        free(text);
    }
    {
        double med = pctl(all, n_all, 0.5), p99 = pctl(all, n_all, 0.99), mx = n_all ? all[n_all - 1] : 0;
        printf("all schemas: mask median %.1f us, p99 %.1f us, max %.1f us over %d tokens (thread CPU time)\n", med * 1e6, p99 * 1e6,
               mx * 1e6, (int)n_all);
    }
    free(all);
    if (mv != v) afm_constraint_vocab_free(mv);
    afm_constraint_vocab_free(v);
    if (tok != mtok) afm_tokenizer_free(tok);
    afm_tokenizer_free(mtok);
    return 0;
}

int cmd_bench(int argc, char **argv) {
    const char *path = NULL, *threads_text = "1,2", *adapter_path = NULL, *tok_path = NULL;
    int n_prompt = 512, n_gen = 128, runs = 3, i, ti, n_threads_list[16], n_tl = 0, spec = 0, grammar = 0, walks = 20, n_schemas = 0;
    char **schemas = (char **)malloc(((size_t)argc + 1) * sizeof *schemas);
    afm_kernels kernels = AFM_KERNELS_AUTO;
    afm_model *m;
    afm_adapter *ad = NULL;
    const afm_config *c;
    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { if (!v) die("option %s needs a value", a); threads_text = v; i++; }
        else if (!strcmp(a, "-p") || !strcmp(a, "--n-prompt")) { n_prompt = (int)parse_int(v, a, 1, 1 << 16); i++; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) { n_gen = (int)parse_int(v, a, 1, 1 << 16); i++; }
        else if (!strcmp(a, "-r") || !strcmp(a, "--runs")) { runs = (int)parse_int(v, a, 1, 100); i++; }
        else if (!strcmp(a, "--adapter")) { if (!v) die("option %s needs a value", a); adapter_path = v; i++; }
        else if (!strcmp(a, "--spec")) spec = 1;
        else if (!strcmp(a, "--grammar")) grammar = 1;
        else if (!strcmp(a, "--tokenizer")) { if (!v) die("option %s needs a value", a); tok_path = v; i++; }
        else if (!strcmp(a, "-w") || !strcmp(a, "--walks")) { walks = (int)parse_int(v, a, 1, 10000); i++; }
        else if (a[0] != '-' && path && schemas) schemas[n_schemas++] = argv[i];
        else if (!strcmp(a, "--kernels")) { kernels = kernels_or_die(v); i++; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (!v) die("option %s needs a value", a); path = v; i++; }
        else if (a[0] != '-' && !path) path = a;
        else die("unknown bench option '%s' (see afm --help)", a);
    }
    if (!path) die("%s", "usage: afm bench FILE [-t 1,2] [-p 512] [-n 128] [-r 3]");
    {
        const char *q = threads_text;
        while (*q && n_tl < 16) {
            char *end;
            long v = strtol(q, &end, 10);
            if (end == q || v < 1 || v > 1024) die("-t: '%s' is not a list of thread counts", threads_text);
            n_threads_list[n_tl++] = (int)v;
            q = *end == ',' ? end + 1 : end;
            if (*end && *end != ',') die("-t: '%s' is not a list of thread counts", threads_text);
        }
    }
    if (!schemas) die("%s", "out of memory");
    m = load_or_die(path, 0);
    c = afm_model_config(m);
    if (grammar) {
        if (!n_schemas) die("%s", "usage: afm bench FILE --grammar [--tokenizer TOK.model] [-w WALKS] [-n N] [-t N] SCHEMA.json ...");
        i = cmd_bench_grammar(m, tok_path, schemas, n_schemas, walks, n_gen, n_threads_list[0], kernels);
        free(schemas);
        afm_model_free(m);
        return i;
    }
    if (n_schemas) die("unknown bench argument '%s' (schemas go with --grammar)", schemas[0]);
    free(schemas);
    if (adapter_path) ad = load_adapter_or_die(m, adapter_path);
    if (ad) {
        /* adapter cost: load and switch times, then decode with and without it, alternating */
        double t_load[6], t_switch[6], t0;
        afm_session *s;
        afm_session_params sp;
        afm_adapter *again;
        int k;
        char err[512];
        for (k = 0; k < 6; k++) {
            t0 = now_seconds();
            if (afm_adapter_load(m, adapter_path, NULL, &again, err, sizeof err) != AFM_OK) die("%s", err);
            t_load[k] = now_seconds() - t0;
            afm_adapter_free(again);
        }
        memset(&sp, 0, sizeof sp);
        sp.kernels = kernels;
        afm_session_create(m, &sp, &s);
        for (k = 0; k < 6; k++) {
            t0 = now_seconds();
            afm_session_set_adapter(s, k & 1 ? NULL : ad);
            t_switch[k] = now_seconds() - t0;
        }
        afm_session_free(s);
        qsort(t_load + 1, 5, sizeof *t_load, cmp_double);
        qsort(t_switch, 6, sizeof *t_switch, cmp_double);
        printf("adapter %s: load %.1f ms the first time, then %.1f ms (median of 5); switching a session %.3f ms\n",
               adapter_path, t_load[0] * 1e3, t_load[3] * 1e3, t_switch[3] * 1e3);
    }
    if (ad && !spec) {
        printf("decode tok/s with and without the adapter, alternating runs (prefill %d, decode %d), median of %d:\n", n_prompt, n_gen, runs);
        printf("%7s %14s %14s %8s\n", "threads", "no adapter", "adapter", "ratio");
        for (ti = 0; ti < n_tl; ti++) {
            double with[100], without[100];
            int r, k;
            afm_session_params sp;
            afm_session *s;
            int32_t *toks = (int32_t *)malloc((size_t)(n_prompt + n_gen) * sizeof *toks);
            for (i = 0; i < n_prompt + n_gen; i++) toks[i] = (int32_t)((i * 7919 + 13) % c->vocab_size);
            memset(&sp, 0, sizeof sp);
            sp.kernels = kernels;
            sp.n_threads = n_threads_list[ti];
            sp.n_ctx = n_prompt + n_gen + 8;
            afm_session_create(m, &sp, &s);
            for (r = 0; r < runs; r++)
                for (k = 0; k < 2; k++) {
                    double t0, t1;
                    afm_session_set_adapter(s, k ? ad : NULL);
                    afm_session_rewind(s, 0);
                    afm_session_eval(s, toks, n_prompt);
                    t0 = now_seconds();
                    for (i = 0; i < n_gen; i++) afm_session_eval(s, &toks[n_prompt + i], 1);
                    t1 = now_seconds();
                    (k ? with : without)[r] = n_gen / (t1 - t0);
                }
            {
                const double a = median(without, runs), b = median(with, runs);
                printf("%7d %14.2f %14.2f %7.1f%%\n", n_threads_list[ti], a, b, 100 * b / a);
            }
            afm_session_free(s);
            free(toks);
        }
        afm_adapter_free(ad);
        afm_model_free(m);
        return 0;
    }
    if (spec) {
        for (ti = 0; ti < n_tl; ti++) cmd_bench_spec(m, ad, kernels, n_threads_list[ti], n_prompt, n_gen, runs);
        afm_adapter_free(ad);
        afm_model_free(m);
        return 0;
    }
    printf("model %s: %d layers, dim %d, vocab %d%s%s; kernels %s\n", path, c->n_layers, c->dim, c->vocab_size, ad ? ", adapter " : "",
           ad ? adapter_path : "", afm_kernels_name(kernels ? kernels : afm_kernels_best()));
    printf("prefill %d tokens, then decode %d tokens; median of %d runs\n", n_prompt, n_gen, runs);
    fflush(stdout); /* before the progress lines on stderr */
    {
        double pre_med[16], dec_med[16], rss[16], kv[16] = { 0 }, w = weight_bytes(m, ad), head = 0, kv_pos = n_prompt + (n_gen + 1) / 2.0;
        double bw_all, bw_sat, bw_t[16];
        char pat_all[64], pat_t[16][64];
        size_t probe_bytes = 0;
        int n_cores, max_t = 1;
        for (i = 0; i < afm_model_n_tensors(m); i++) { /* the output head: the tensor with a vocabulary-long dimension */
            afm_tensor_info t;
            afm_model_tensor(m, i, &t);
            if (t.n_dims == 2 && (t.dims[0] == (uint64_t)c->vocab_size || t.dims[1] == (uint64_t)c->vocab_size)) head = (double)t.n_bytes;
        }
        for (ti = 0; ti < n_tl; ti++) {
            int nt = n_threads_list[ti], r;
            double pre[100], dec[100];
            afm_session_params sp;
            afm_session *s;
            int32_t *toks = (int32_t *)malloc((size_t)(n_prompt + n_gen) * sizeof *toks);
            uint64_t x = 88172645463325252ull;
            if (nt > max_t) max_t = nt;
            memset(&sp, 0, sizeof sp);
            sp.kernels = kernels;
            sp.n_threads = nt;
            sp.n_ctx = c->context_length;
            sp.n_batch = n_prompt < 512 ? n_prompt : 512;
            sp.preallocate = 1;
            if (afm_session_create(m, &sp, &s) != AFM_OK) die("%s", "cannot create a session");
            if (ad) afm_session_set_adapter(s, ad);
            for (i = 0; i < n_prompt; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; toks[i] = (int32_t)(x % (uint64_t)c->vocab_size); }
            for (r = 0; r < runs; r++) {
                double t0, t1, t2;
                afm_session_rewind(s, 0);
                t0 = now_seconds();
                if (afm_session_eval(s, toks, n_prompt) != AFM_OK) die("%s", afm_session_error(s));
                t1 = now_seconds();
                for (i = 0; i < n_gen; i++) {
                    const float *lg = afm_session_logits(s, -1);
                    int v, best = 0;
                    for (v = 1; v < c->vocab_size; v++) if (lg[v] > lg[best]) best = v;
                    toks[n_prompt + i] = best;
                    if (afm_session_eval(s, &toks[n_prompt + i], 1) != AFM_OK) die("%s", afm_session_error(s));
                }
                t2 = now_seconds();
                pre[r] = n_prompt / (t1 - t0);
                dec[r] = n_gen / (t2 - t1);
            }
            pre_med[ti] = median(pre, runs);
            dec_med[ti] = median(dec, runs);
            rss[ti] = peak_rss_mb(); /* before the bandwidth buffer below inflates it */
            kv[ti] = kv_read_bytes(m, kv_pos, kv_bytes(afm_session_kv_type(s)));
            fprintf(stderr, "  %d threads: prefill %.1f tok/s, decode %.2f tok/s\n", nt, pre_med[ti], dec_med[ti]);
            afm_session_free(s);
            free(toks);
        }
        /* the probes run after the sessions are gone, so their buffer does not compete with the model for memory */
        n_cores = bw_online_cores(max_t);
        bw_all = probe_bandwidth(n_cores, pat_all, sizeof pat_all, &probe_bytes);
        for (ti = 0; ti < n_tl; ti++) {
            if (n_threads_list[ti] == n_cores) { bw_t[ti] = bw_all; memcpy(pat_t[ti], pat_all, sizeof pat_all); }
            else bw_t[ti] = probe_bandwidth(n_threads_list[ti], pat_t[ti], sizeof pat_t[ti], NULL);
        }
        /* The saturated bandwidth is at least every rate a probe reached. All cores should reach the
           most, but on a shared machine another job can take a core from the all-core probe and
           leave it below a smaller one; then the best smaller one stands in (and the line says so). */
        bw_sat = bw_all;
        for (ti = 0; ti < n_tl; ti++)
            if (bw_t[ti] > bw_sat) bw_sat = bw_t[ti];
        printf("bytes read per decode token: %.1f MB of weights (every tensor once, the %.1f MB output head included) + %.1f MB of\n"
               "  KV cache (%d layers' keys and values at the mean position, %.1f) = %.1f MB\n",
               w / 1e6, head / 1e6, kv[0] / 1e6, c->n_layers - c->n_reuse_layers, kv_pos, (w + kv[0]) / 1e6);
        printf("memory read bandwidth: %.0f MiB read by each thread count, each thread its own first-touched part;\n"
               "  the best pass of %d of each read pattern and %d more of the best one\n", probe_bytes / 1048576.0, BW_PASSES,
               2 * BW_PASSES);
        printf("  %d thread%s (all online cores): %.2f GB/s (%s)%s\n", n_cores, n_cores > 1 ? "s" : "", bw_all / 1e9, pat_all,
               bw_sat > bw_all ? "; less than with fewer threads below: other jobs were running, the saturated figure is the best probe" : "");
        for (ti = 0; ti < n_tl; ti++)
            if (n_threads_list[ti] != n_cores) printf("  %d thread%s: %.2f GB/s (%s)\n", n_threads_list[ti], n_threads_list[ti] > 1 ? "s" : "", bw_t[ti] / 1e9, pat_t[ti]);
        printf("%7s %11s %10s %8s %12s %10s %8s %14s %11s %11s\n", "threads", "prefill t/s", "decode t/s", "MB/tok", "achieved GB/s",
               "probe GB/s", "% probe", "saturated GB/s", "% saturated", "peak RSS MB");
        for (ti = 0; ti < n_tl; ti++) {
            double got = (w + kv[ti]) * dec_med[ti];
            printf("%7d %11.1f %10.2f %8.1f %13.2f %10.2f %7.1f%% %14.2f %10.1f%% %11.0f\n", n_threads_list[ti], pre_med[ti], dec_med[ti],
                   (w + kv[ti]) / 1e6, got / 1e9, bw_t[ti] / 1e9, bw_t[ti] > 0 ? 100 * got / bw_t[ti] : 0, bw_sat / 1e9,
                   bw_sat > 0 ? 100 * got / bw_sat : 0, rss[ti]);
            if (got > bw_sat && bw_sat > 0)
                printf("  (above the saturated probe: part of the model stays in cache between tokens, or the probe missed a faster read pattern)\n");
        }
        printf("achieved GB/s = MB/tok x decode t/s; %% probe: of the probe at the same thread count; saturated: the all-core probe\n"
               "(or a faster one with fewer threads, on a busy machine)\n");
    }
    afm_adapter_free(ad);
    afm_model_free(m);
    return 0;
}

