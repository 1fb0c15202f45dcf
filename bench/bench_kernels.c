/* bench/bench_kernels.c - throughput of afm.h's matrix kernels next to measured memory
   bandwidth, in one run.
     cc -O2 -std=c99 -D_GNU_SOURCE bench/bench_kernels.c -lpthread -lm -o bench && ./bench [options]
   Options: -l LEVEL  (afm_kernels: 1 scalar, 2 avx2, 3 avx512, 4 avx512vnni, 5 neon, 6 neon-dotprod,
                       7 amx; default best)
            -q        quick (fewer repetitions)
            -d        decode (matvec) table only
            -c        compute ceilings only (in-cache, CPU time: robust on a busy machine)
            -b        Q2B by batch size: the panel kernel against the unpacked matrix-matrix one
                      (2048 x 6656, 1 thread, CPU time, us per token; where gemm_min comes from)
   Decode: matvec (n_tok = 1) over a set of distinct matrices larger than the last-level cache,
   rows split over threads with a barrier after every matrix, as the forward pass does; GB/s counts
   weight bytes (codes + scales). Prefill: n_tok = 64 and 512, GFLOP/s = 2*rows*cols*n_tok / time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#define AFM_IMPLEMENTATION
#include "../afm.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static uint64_t rs = 88172645463325252ull;
static uint32_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (uint32_t)(rs >> 20); }

/* ---- memory read bandwidth: each thread sums its part of a buffer as 4 interleaved sequential
   streams (as a matvec reading 4 rows at once does); the best of several passes ---- */
typedef struct { const uint64_t *p; size_t n; uint64_t sum; pthread_barrier_t *bar; int reps; double t; } bw_arg;
#ifdef AFM__X86
AFM__T_AVX2 static uint64_t bw_sum_avx2(const uint64_t *p, size_t n) {
    const size_t q = n / 4 / 16 * 16; /* 4 streams of q words */
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    size_t i;
    for (i = 0; i < q; i += 8) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(p + q + i)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(p + q + i + 4)));
        s4 = _mm256_add_epi64(s4, _mm256_loadu_si256((const __m256i *)(p + 2 * q + i)));
        s5 = _mm256_add_epi64(s5, _mm256_loadu_si256((const __m256i *)(p + 2 * q + i + 4)));
        s6 = _mm256_add_epi64(s6, _mm256_loadu_si256((const __m256i *)(p + 3 * q + i)));
        s7 = _mm256_add_epi64(s7, _mm256_loadu_si256((const __m256i *)(p + 3 * q + i + 4)));
    }
    s0 = _mm256_add_epi64(_mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)),
                          _mm256_add_epi64(_mm256_add_epi64(s4, s5), _mm256_add_epi64(s6, s7)));
    return (uint64_t)_mm256_extract_epi64(s0, 0) + (uint64_t)_mm256_extract_epi64(s0, 1) +
           (uint64_t)_mm256_extract_epi64(s0, 2) + (uint64_t)_mm256_extract_epi64(s0, 3);
}
#endif
static uint64_t bw_sum(const uint64_t *p, size_t n, int simd) {
    const size_t q = n / 4;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i;
#ifdef AFM__X86
    if (simd) return bw_sum_avx2(p, n);
#endif
    (void)simd;
    for (i = 0; i < q; i += 2) {
        s0 += p[i] + p[i + 1]; s1 += p[q + i] + p[q + i + 1];
        s2 += p[2 * q + i] + p[2 * q + i + 1]; s3 += p[3 * q + i] + p[3 * q + i + 1];
    }
    return s0 + s1 + s2 + s3;
}
static int bw_simd;
static void *bw_worker(void *v) {
    bw_arg *a = (bw_arg *)v;
    int r;
    for (r = 0; r < a->reps; r++) {
        double t0;
        pthread_barrier_wait(a->bar);
        t0 = now();
        a->sum += bw_sum(a->p, a->n, bw_simd);
        pthread_barrier_wait(a->bar);
        if (r == 0 || now() - t0 < a->t) a->t = now() - t0;
    }
    return NULL;
}
/* Large buffers on huge pages where afm.h asks for them for a model's weights (Linux). */
static void *big_alloc(size_t n) {
    void *p = malloc(n);
#ifdef AFM__HUGE_PAGES
    if (p) afm__advise_huge_pages(p, n);
#endif
    return p;
}
static double measure_bw(int nt, size_t bytes, int reps) {
    uint64_t *buf = (uint64_t *)big_alloc(bytes);
    pthread_t th[64];
    bw_arg a[64];
    pthread_barrier_t bar;
    size_t n = bytes / 8, i;
    double worst = 0;
    int k;
    for (i = 0; i < n; i++) buf[i] = i * 2654435761u;
    pthread_barrier_init(&bar, NULL, (unsigned)nt);
    for (k = 0; k < nt; k++) {
        a[k].p = buf + n / (size_t)nt * (size_t)k; a[k].n = n / (size_t)nt; a[k].sum = 0; a[k].bar = &bar; a[k].reps = reps; a[k].t = 0;
        pthread_create(&th[k], NULL, bw_worker, &a[k]);
    }
    for (k = 0; k < nt; k++) { pthread_join(th[k], NULL); if (a[k].t > worst) worst = a[k].t; }
    pthread_barrier_destroy(&bar);
    free(buf);
    return (double)bytes / worst / 1e9;
}

/* ---- matrix products on threads ---- */
typedef struct {
    const afm__kernels *k;
    const afm__wmat *w; int n_w;       /* matrices, used in turn */
    afm__act *act;                     /* prepared activations (shared) */
    const float *X;
    float *Y;
    int n_tok, iters, id, nt, prep;    /* prep: also time the preparation (split over tokens) */
    void *scratch;                     /* this thread's matrix-matrix kernel scratch */
    pthread_barrier_t *bar;
} mm_arg;

static void *mm_worker(void *v) {
    mm_arg *a = (mm_arg *)v;
    int it, m;
    for (it = 0; it < a->iters; it++)
        for (m = 0; m < a->n_w; m++) {
            const afm__wmat *w = &a->w[m];
            /* row ranges in multiples of 16 rows */
            int per = (w->rows / 16 + a->nt - 1) / a->nt * 16;
            int r0 = per * a->id, r1 = r0 + per > w->rows ? w->rows : r0 + per;
            if (a->prep) {
                int tp = (a->n_tok + a->nt - 1) / a->nt, t0 = tp * a->id, t1 = t0 + tp > a->n_tok ? a->n_tok : t0 + tp;
                if (t0 < t1) afm__prepare_activations(a->k, a->act, a->X, (size_t)w->cols, t0, t1);
                pthread_barrier_wait(a->bar);
            }
            if (r0 < r1) afm__matmul_rows(a->k, w, a->act, a->Y, (size_t)w->rows, r0, r1, a->scratch);
            pthread_barrier_wait(a->bar);
        }
    return NULL;
}

/* seconds per pass over all matrices (best of `reps` runs of `iters` passes) */
static double run_mm(const afm__kernels *k, const afm__wmat *w, int n_w, int n_tok, int nt, int iters, int reps, int prep) {
    const int cols = w[0].cols, rows = w[0].rows;
    float *X = (float *)malloc(sizeof(float) * (size_t)n_tok * (size_t)cols);
    float *Y = (float *)malloc(sizeof(float) * (size_t)n_tok * (size_t)rows);
    void *buf = malloc(afm__act_size(w[0].type, n_tok, cols));
    const size_t gsz = afm__gemm_scratch_size(w[0].kpad);
    void *gs = malloc(gsz * (size_t)nt);
    afm__act act;
    pthread_t th[64];
    mm_arg a[64];
    pthread_barrier_t bar;
    double best = 1e30;
    int i, r;
    for (i = 0; i < n_tok * cols; i++) X[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
    afm__act_init(&act, w[0].type, n_tok, cols, buf);
    afm__prepare_activations(k, &act, X, (size_t)cols, 0, n_tok);
    for (r = 0; r < reps; r++) {
        double t0;
        pthread_barrier_init(&bar, NULL, (unsigned)nt);
        t0 = now();
        for (i = 0; i < nt; i++) {
            a[i].k = k; a[i].w = w; a[i].n_w = n_w; a[i].act = &act; a[i].X = X; a[i].Y = Y; a[i].n_tok = n_tok;
            a[i].iters = iters; a[i].id = i; a[i].nt = nt; a[i].bar = &bar; a[i].prep = prep;
            a[i].scratch = (char *)gs + (size_t)i * gsz;
            if (i) pthread_create(&th[i], NULL, mm_worker, &a[i]);
        }
        mm_worker(&a[0]);
        for (i = 1; i < nt; i++) pthread_join(th[i], NULL);
        t0 = (now() - t0) / iters;
        if (t0 < best) best = t0;
        pthread_barrier_destroy(&bar);
    }
    free(X); free(Y); free(buf); free(gs);
    return best;
}

/* n distinct random matrices (valid fp16 scales / float weights) */
static afm__wmat *make_set(int type, int rows, int cols, int group, int n, uint8_t **mem, size_t *bytes_each) {
    const uint32_t g = afm__type_is_quant(type) ? (uint32_t)group : 0;
    const size_t sz = (size_t)afm__type_size(type, (uint64_t)rows, (uint64_t)cols, g);
    afm__wmat *w = (afm__wmat *)malloc(sizeof(afm__wmat) * (size_t)n);
    size_t i;
    int m;
    *mem = (uint8_t *)big_alloc(sz * (size_t)n + 64);
    for (m = 0; m < n; m++) {
        uint8_t *p = *mem + sz * (size_t)m;
        for (i = 0; i < sz; i++) p[i] = (uint8_t)rnd();
        afm__wmat_init(&w[m], type, p, sz, rows, cols, (int)g);
        if (afm__type_is_quant(type)) {
            for (i = 0; i < (size_t)rows * (size_t)w[m].n_groups; i++) {
                uint16_t h = afm__f2h(0.01f + (float)(rnd() % 100) * 1e-4f);
                memcpy((uint8_t *)w[m].scales + 2 * i, &h, 2);
            }
        } else if (type == AFM_TYPE_F16) {
            for (i = 0; i < sz / 2; i++) { uint16_t h = afm__f2h((float)((int)(rnd() % 2001) - 1000) * 1e-5f); memcpy(p + 2 * i, &h, 2); }
        }
        if (type == AFM_TYPE_Q2B) { /* in panels, in place, as the loader does (every shape here has rows % 16 == 0) */
            uint8_t *tmp = (uint8_t *)malloc(afm__q2b_panel_tmp_size(&w[m]));
            afm__q2b_panelize(&w[m], p, tmp);
            free(tmp);
        }
    }
    *bytes_each = sz;
    return w;
}

/* -c: compute ceilings. Matrices small enough to stay in L2, timed in per-thread CPU time
   (CLOCK_THREAD_CPUTIME_ID), so other processes on the machine barely disturb the figures. */
static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static void ceilings(const afm__kernels *k) {
    static const int types[] = {AFM_TYPE_Q2B, AFM_TYPE_Q4, AFM_TYPE_Q8, AFM_TYPE_F16};
    static const struct { int rows, cols, n_tok; } shapes[] = {{128, 6656, 1}, {256, 2048, 1}, {64, 6656, 64}, {256, 6656, 512}};
    int ti, si;
    printf("\ncompute ceilings (in cache, 1 thread, CPU time): matvec in GB/s of weights, matmul in GFLOP/s\n");
    for (si = 0; si < 4; si++)
        for (ti = 0; ti < 4; ti++) {
            const int type = types[ti], rows = shapes[si].rows, cols = shapes[si].cols, nt = shapes[si].n_tok;
            uint8_t *mem;
            size_t each;
            afm__wmat *w = make_set(type, rows, cols, afm__type_is_quant(type) ? 64 : 0, 1, &mem, &each);
            float *X = (float *)malloc(sizeof(float) * (size_t)nt * (size_t)cols), *Y = (float *)malloc(sizeof(float) * (size_t)nt * (size_t)rows);
            void *buf = malloc(afm__act_size(type, nt, cols)), *gs = malloc(afm__gemm_scratch_size(w->kpad));
            afm__act act;
            double best = 1e30;
            int i, rep, it, iters = nt == 1 ? 50 : nt > 100 ? 1 : 3;
            for (i = 0; i < nt * cols; i++) X[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
            afm__act_init(&act, type, nt, cols, buf);
            afm__prepare_activations(k, &act, X, (size_t)cols, 0, nt);
            for (rep = 0; rep < 10; rep++) {
                double t0 = cpu_now();
                for (it = 0; it < iters; it++) afm__matmul_rows(k, w, &act, Y, (size_t)rows, 0, rows, gs);
                t0 = (cpu_now() - t0) / iters;
                if (t0 < best) best = t0;
            }
            if (nt == 1) printf("  %-4s %4dx%-5d matvec  %7.2f GB/s\n", afm__type_name(type), rows, cols, (double)each / best / 1e9);
            else printf("  %-4s %4dx%-5d n_tok=%-3d %7.1f GFLOP/s\n", afm__type_name(type), rows, cols, nt, 2.0 * rows * cols * nt / best / 1e9);
            free(X); free(Y); free(buf); free(gs); free(w); free(mem);
        }
}

/* -b: us per token of a Q2B product by batch size, through the level's panel kernel (matmul) and,
   where it has one, its unpacked matrix-matrix kernel (gemm_q2b), whatever gemm_min says. */
static void batch_sizes(const afm__kernels *k) {
    static const int toks[] = {1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 256};
    afm__wmat *w;
    uint8_t *mem;
    size_t each;
    void *gs;
    int ti, r;
    w = make_set(AFM_TYPE_Q2B, 2048, 6656, 64, 1, &mem, &each);
    gs = malloc(afm__gemm_scratch_size(w->kpad));
    printf("\nQ2B 2048x6656 group 64, 1 thread, CPU time, best of 5, us per token (gemm_min %d)\n", k->gemm_q2b ? k->gemm_min : 0);
    printf("%6s %10s %10s\n", "tokens", "panel", "unpacked");
    for (ti = 0; ti < (int)(sizeof toks / sizeof toks[0]); ti++) {
        const int nt = toks[ti];
        float *X = (float *)malloc(sizeof(float) * 6656 * (size_t)nt), *Y = (float *)malloc(sizeof(float) * 2048 * (size_t)nt);
        void *buf = malloc(afm__act_size(AFM_TYPE_Q2B, nt, 6656));
        afm__act act;
        double bp = 1e30, bg = 1e30, t0;
        size_t i;
        for (i = 0; i < (size_t)nt * 6656; i++) X[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
        afm__act_init(&act, AFM_TYPE_Q2B, nt, 6656, buf);
        afm__prepare_activations(k, &act, X, 6656, 0, nt);
        for (r = 0; r < 5; r++) {
            t0 = cpu_now(); k->matmul[afm__type_slot(AFM_TYPE_Q2B)](w, &act, Y, 2048, 0, 2048); t0 = cpu_now() - t0;
            if (t0 < bp) bp = t0;
            if (k->gemm_q2b) { t0 = cpu_now(); k->gemm_q2b(w, &act, Y, 2048, 0, 2048, gs); t0 = cpu_now() - t0; if (t0 < bg) bg = t0; }
        }
        if (k->gemm_q2b) printf("%6d %10.1f %10.1f\n", nt, bp * 1e6 / nt, bg * 1e6 / nt);
        else printf("%6d %10.1f %10s\n", nt, bp * 1e6 / nt, "-");
        free(X); free(Y); free(buf);
    }
    free(gs); free(w); free(mem);
}

int main(int argc, char **argv) {
    afm__kernels k;
    int level = AFM__LEVEL_MAX, quick = 0, decode_only = 0, ceil_only = 0, batch_only = 0, i, nt;
    const size_t llc_beat = (size_t)256 << 20; /* weight sets of at least 256 MB: far past any L3 */
    double bw[3];
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-l") && i + 1 < argc) level = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-q")) quick = 1;
        else if (!strcmp(argv[i], "-d")) decode_only = 1;
        else if (!strcmp(argv[i], "-c")) ceil_only = 1;
        else if (!strcmp(argv[i], "-b")) batch_only = 1;
    }
    bw_simd = afm__select_kernels(&k, level) >= 1;
    printf("kernels: %s\n", k.name);
    if (batch_only) { batch_sizes(&k); return 0; }
    if (ceil_only) { ceilings(&k); return 0; }
    for (nt = 1; nt <= 2; nt++) {
        bw[nt] = measure_bw(nt, (size_t)1 << 30, quick ? 3 : 6);
        printf("memory read bandwidth, %d thread%s: %.2f GB/s (sum over 1 GiB, 4 streams per thread, best of %d)\n", nt, nt > 1 ? "s" : "", bw[nt],
               quick ? 3 : 6);
    }
    printf("\n%-6s %-16s %5s %3s %10s %9s %9s %8s\n", "type", "shape", "group", "thr", "bytes/pass", "ms/pass", "GB/s", "%bw");
    {
        static const struct { int type, rows, cols, group; } cases[] = {
            {AFM_TYPE_Q2B, 2048, 6656, 64}, {AFM_TYPE_Q2B, 2048, 6656, 128}, {AFM_TYPE_Q4, 2048, 6656, 64}, {AFM_TYPE_Q8, 2048, 6656, 64},
            {AFM_TYPE_F16, 2048, 6656, 0},  {AFM_TYPE_Q2B, 153600, 2048, 64}, {AFM_TYPE_Q4, 153600, 2048, 64},
        };
        int c;
        for (c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
            uint8_t *mem;
            size_t each;
            afm__wmat *w = make_set(cases[c].type, cases[c].rows, cases[c].cols, cases[c].group, 1, &mem, &each);
            int n = (int)((llc_beat + each - 1) / each);
            free(w); free(mem);
            if (n > 1 && each * (size_t)n > ((size_t)600 << 20)) n = (int)(((size_t)600 << 20) / each);
            w = make_set(cases[c].type, cases[c].rows, cases[c].cols, cases[c].group, n, &mem, &each);
            for (nt = 1; nt <= 2; nt++) {
                double t = run_mm(&k, w, n, 1, nt, quick ? 2 : 5, quick ? 2 : 3, 0) / n;
                double gbs = (double)each / t / 1e9;
                char shape[32];
                snprintf(shape, sizeof shape, "%dx%d", cases[c].rows, cases[c].cols);
                printf("%-6s %-16s %5d %3d %10zu %9.3f %9.2f %7.1f%%\n", afm__type_name(cases[c].type), shape, cases[c].group, nt, each,
                       t * 1e3, gbs, 100.0 * gbs / bw[nt]);
            }
            free(w); free(mem);
        }
    }
    if (decode_only) return 0;
    printf("\nprefill (matrix-matrix), 2048x6656, activations prepared once per product\n");
    printf("%-6s %5s %5s %3s %10s %10s %14s\n", "type", "group", "n_tok", "thr", "ms", "GFLOP/s", "GFLOP/s+prep");
    {
        static const int types[] = {AFM_TYPE_Q2B, AFM_TYPE_Q4, AFM_TYPE_Q8, AFM_TYPE_F16};
        static const int toks[] = {64, 512};
        int ti, ni;
        for (ti = 0; ti < 4; ti++)
            for (ni = 0; ni < 2; ni++) {
                uint8_t *mem;
                size_t each;
                const int type = types[ti], g = afm__type_is_quant(type) ? 64 : 0;
                afm__wmat *w = make_set(type, 2048, 6656, g, 1, &mem, &each);
                for (nt = 1; nt <= 2; nt++) {
                    const int nk = toks[ni], it = quick ? 1 : (nk > 100 ? 2 : 5);
                    double t = run_mm(&k, w, 1, nk, nt, it, 2, 0), tp = run_mm(&k, w, 1, nk, nt, it, 2, 1);
                    double fl = 2.0 * 2048 * 6656 * nk;
                    printf("%-6s %5d %5d %3d %10.2f %10.1f %14.1f\n", afm__type_name(type), g, nk, nt, t * 1e3, fl / t / 1e9, fl / tp / 1e9);
                }
                free(w); free(mem);
            }
    }
    return 0;
}
