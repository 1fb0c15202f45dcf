/* bench/bench_attention.c - decode at a long context against a short one, without the prefill.
     cc -O2 -std=c99 -D_GNU_SOURCE bench/bench_attention.c -lpthread -lm -o bench_attention
     ./bench_attention MODEL [-t THREADS] [-r RUNS] [-p SHORT,LONG] [-c] [-l LEVEL]
   The session's int8 KV cache is filled with random codes up to the longer position (the speed of
   attention does not depend on the values; `afm bench -p 4000` spends minutes on the prefill that
   produces real ones), then each run times, at each position: attention alone over every layer
   (afm__attention, the queries random) and one whole decode step (afm__forward of one token). Runs
   alternate between the positions, so a busy machine slows both alike; medians are printed, and the
   ratio of decode speed at the long position to the short one.
   -c: CPU time instead of wall time (robust on a busy machine; meaningful with -t 1 only).
   -l: kernel level (0 scalar, 1 avx2/neon, ...; default the best). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define AFM_IMPLEMENTATION
#include "../afm.h"

static int use_cpu;
static double now(void) {
    struct timespec t;
    clock_gettime(use_cpu ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
static double median(double *v, int n) { qsort(v, (size_t)n, sizeof *v, cmp_d); return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]); }
static uint64_t rs = 88172645463325252ull;
static uint32_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (uint32_t)(rs >> 20); }

#define MAX_RUNS 100

int main(int argc, char **argv) {
    const char *path = NULL;
    int threads = 2, runs = 5, pos[2] = {512, 4000}, level = AFM_KERNELS_AUTO, i, r, l, h;
    double t_att[2][MAX_RUNS], t_dec[2][MAX_RUNS], ratio[MAX_RUNS], a[2], d[2];
    afm_model *m;
    afm_session *s;
    afm_session_params sp;
    char err[256];
    size_t n, k;
    int q_stride;
    for (i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "-t") && v) { threads = atoi(v); i++; }
        else if (!strcmp(argv[i], "-r") && v) { runs = atoi(v); i++; }
        else if (!strcmp(argv[i], "-p") && v) { if (sscanf(v, "%d,%d", &pos[0], &pos[1]) != 2) pos[0] = -1; i++; }
        else if (!strcmp(argv[i], "-l") && v) { level = atoi(v); i++; }
        else if (!strcmp(argv[i], "-c")) use_cpu = 1;
        else if (argv[i][0] != '-' && !path) path = argv[i];
        else { fprintf(stderr, "unknown or incomplete option '%s'\n", argv[i]); return 2; }
    }
    if (!path || threads < 1 || runs < 1 || runs > MAX_RUNS || pos[0] < 1 || pos[1] < 1) {
        fprintf(stderr, "usage: %s MODEL [-t THREADS] [-r RUNS (1-%d)] [-p SHORT,LONG] [-c] [-l LEVEL]\n", argv[0], MAX_RUNS);
        return 2;
    }
    if (afm_model_load_file(path, NULL, &m, err, sizeof err) != AFM_OK) { fprintf(stderr, "%s\n", err); return 1; }
    memset(&sp, 0, sizeof sp);
    sp.n_ctx = (pos[0] > pos[1] ? pos[0] : pos[1]) + 1;
    sp.n_threads = threads;
    sp.kernels = (afm_kernels)level;
    if (sp.n_ctx > m->config.context_length || afm_session_create(m, &sp, &s) != AFM_OK || s->kv_type != AFM_KV_INT8 ||
        afm__reserve(s, sp.n_ctx) != AFM_OK) {
        fprintf(stderr, "cannot make a session with an int8 cache of %d positions\n", sp.n_ctx);
        return 1;
    }
    n = (size_t)m->n_seg0 * (size_t)s->cap * (size_t)s->kv_dim;
    for (k = 0; k < n; k++) { ((int8_t *)s->k_cache)[k] = (int8_t)(rnd() % 255 - 127); ((int8_t *)s->v_cache)[k] = (int8_t)(rnd() % 255 - 127); }
    q_stride = m->config.n_heads * m->config.head_dim + 2 * s->kv_dim;
    printf("model %s: %d layers, %d heads on %d KV heads of %d; kernels %s, %d threads, %s time, median of %d\n", path,
           m->config.n_layers, m->config.n_heads, m->config.n_kv_heads, m->config.head_dim, s->kern.name, threads,
           use_cpu ? "CPU" : "wall", runs);
    for (r = 0; r < runs; r++)
        for (i = 0; i < 2; i++) {
            int32_t tok = 1000 % m->config.vocab_size;
            double t0;
            size_t j;
            for (j = 0; j < (size_t)q_stride; j++) s->qkv[j] = (float)(rnd() % 2001) / 1000.0f - 1.0f;
            s->pos = pos[i];
            s->q = s->qkv;
            for (h = 0; h < m->config.n_heads; h++) /* as the forward pass does after RoPE and the norm */
                afm__quant_query(s, 0, h, s->qkv + (size_t)h * m->config.head_dim);
            t0 = now();
            for (l = 0; l < m->config.n_layers; l++) afm__attention(s, afm__cache_layer(m, l), 1, q_stride);
            t_att[i][r] = now() - t0;
            t0 = now();
            afm__forward(s, &tok, 1, s->logits, 0); /* writes position pos[i] of the cache: random codes stay random enough */
            t_dec[i][r] = now() - t0;
            if (i == 1) ratio[r] = t_dec[0][r] / t_dec[1][r];
        }
    for (i = 0; i < 2; i++) {
        a[i] = median(t_att[i], runs) * 1e3;
        d[i] = median(t_dec[i], runs) * 1e3;
        printf("position %5d: attention %7.2f ms (%d layers), decode step %7.2f ms = %6.2f tok/s\n", pos[i], a[i],
               m->config.n_layers, d[i], 1e3 / d[i]);
    }
    printf("decode at %d: %.1f %% of the speed at %d (median of the runs' own ratios: %.1f %%)\n", pos[1],
           100.0 * d[0] / d[1], pos[0], 100.0 * median(ratio, runs));
    afm_session_free(s);
    afm_model_free(m);
    return 0;
}
