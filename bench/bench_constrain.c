/* Constraint benchmark: vocabulary build time, compile time per schema, and mask time per token
   along sampled outputs, on a SentencePiece tokenizer (the 153,600-piece one tests/gen/train_tok_models.py
   trains: see docs/BENCHMARKS.md).

     cc -std=c99 -O2 bench/bench_constrain.c -o build/bench_constrain -lm -lpthread
     build/bench_constrain TOKENIZER.model [-w WALKS] [--reuse] SCHEMA.json ...

   For each schema: the median of 20 compiles; then WALKS outputs (default 20), each from a fresh
   constraint state (no mask computed before, as for a new reply), each token drawn uniformly from
   the allowed ones (the stop token once allowed, with probability 1/4), up to 256 tokens; with
   --reuse one state per schema, rewound to the start for each output (its transitions and masks
   stay cached, as in a server that keeps a state per schema and thread). Prints the
   median and p99 of the time of afm_constraint_state_mask per token over all outputs of all
   schemas, and per schema (thread CPU time). */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#define AFM_IMPLEMENTATION
#include "../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    char *p;
    long sz;
    if (!f) { fprintf(stderr, "cannot open %s\n", path); exit(1); }
    fseek(f, 0, SEEK_END);
    sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    p = (char *)malloc((size_t)sz + 1);
    if (!p || fread(p, 1, (size_t)sz, f) != (size_t)sz) exit(1);
    fclose(f);
    p[sz] = 0;
    *n = (size_t)sz;
    return p;
}
/* The thread's CPU time where there is one: on a shared machine, wall time also counts the
   moments the scheduler gives the core to someone else. */
static double cpu_now(void) {
#if defined(CLOCK_THREAD_CPUTIME_ID)
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
#else
    return afm__now();
#endif
}
static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double pct(double *v, size_t n, double p) {
    size_t k;
    if (!n) return 0;
    qsort(v, n, sizeof *v, cmp_d);
    k = (size_t)(p * (double)(n - 1) + 0.5);
    return v[k];
}

int main(int argc, char **argv) {
    size_t n, cap = 1 << 20, all_n = 0;
    char *buf, err[512];
    afm_tokenizer *tok = NULL;
    afm_constraint_vocab *v = NULL;
    double t0, *all = (double *)malloc(cap * sizeof *all);
    int i, walks = 20, first = 2, reuse = 0;
    uint64_t rng = 88172645463325252ull;
    if (argc < 3) { fprintf(stderr, "usage: bench_constrain TOKENIZER.model [-w WALKS] SCHEMA.json ...\n"); return 1; }
    if (!strcmp(argv[first], "-w") && argc > first + 2) { walks = atoi(argv[first + 1]); first += 2; }
    if (!strcmp(argv[first], "--reuse") && argc > first + 1) { reuse = 1; first++; }
    buf = slurp(argv[1], &n);
    if (afm_tokenizer_load(buf, n, AFM_TOKENIZER_SENTENCEPIECE, NULL, &tok, err, sizeof err) != AFM_OK) { fprintf(stderr, "%s\n", err); return 1; }
    free(buf);
    t0 = cpu_now();
    if (afm_constraint_vocab_create(tok, NULL, &v) != AFM_OK) return 1;
    printf("tokenizer %s: %d pieces; vocabulary bytes and prefix tree (%d nodes) built in %.1f ms\n", argv[1],
           afm_tokenizer_n_vocab(tok), v->n_nodes, (cpu_now() - t0) * 1e3);
    printf("%-16s %10s %10s %10s %8s %8s\n", "schema", "compile", "mask med", "mask p99", "tokens", "complete");
    for (i = first; i < argc; i++) {
        afm_constraint *c = NULL;
        double ct[20], *mt = (double *)malloc(256 * (size_t)walks * sizeof *mt);
        size_t m = 0;
        int k, w, complete = 0;
        char name[64];
        const char *base = strrchr(argv[i], '/') ? strrchr(argv[i], '/') + 1 : argv[i];
        buf = slurp(argv[i], &n);
        for (k = 0; k < 20; k++) {
            afm_constraint_free(c);
            c = NULL;
            t0 = cpu_now();
            if (afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, buf, n, NULL, &c, err, sizeof err) != AFM_OK) { fprintf(stderr, "%s: %s\n", argv[i], err); return 1; }
            ct[k] = cpu_now() - t0;
        }
        afm_constraint_state *s = NULL;
        for (w = 0; w < walks; w++) {
            int step;
            if (!reuse || !s) afm_constraint_state_create(c, v, &s);
            else afm_constraint_state_rewind(s, 0);
            for (step = 0; step < 256; step++) {
                const uint32_t *mask;
                int32_t t, pick = -1, cnt = 0;
                t0 = cpu_now();
                mask = afm_constraint_state_mask(s);
                mt[m++] = cpu_now() - t0;
                if (!mask) { fprintf(stderr, "%s\n", afm_constraint_state_error(s)); return 1; }
                if (afm_constraint_state_complete(s) && (rng = rng * 6364136223846793005ull + 1442695040888963407ull) >> 62 == 0) break;
                for (t = 0; t < v->n_vocab; t++)
                    if (((mask[t >> 5] >> (t & 31)) & 1) && v->kind[t] == 1) {
                        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                        if ((rng >> 33) % (uint64_t)++cnt == 0) pick = t;
                    }
                if (pick < 0) break;
                afm_constraint_state_advance(s, pick);
            }
            complete += afm_constraint_state_complete(s);
            if (!reuse || w + 1 == walks) { afm_constraint_state_free(s); s = NULL; }
        }
        for (k = 0; k < (int)m && all_n < cap; k++) all[all_n++] = mt[k];
        snprintf(name, sizeof name, "%.*s", (int)(strlen(base) > 5 ? strlen(base) - 5 : strlen(base)), base);
        {
            double med = pct(mt, m, 0.5), p99 = pct(mt, m, 0.99);
            printf("%-16s %8.2f ms %7.1f us %7.1f us %8d %5d/%d\n", name, pct(ct, 20, 0.5) * 1e3, med * 1e6, p99 * 1e6, (int)m, complete, walks);
        }
        free(mt);
        free(buf);
        afm_constraint_free(c);
    }
    {
        double med = pct(all, all_n, 0.5), p99 = pct(all, all_n, 0.99), mx = all_n ? all[all_n - 1] : 0;
        printf("all schemas: mask median %.1f us, p99 %.1f us, max %.1f us over %d tokens (thread CPU time)\n", med * 1e6, p99 * 1e6,
               mx * 1e6, (int)all_n);
    }
    afm_constraint_vocab_free(v);
    afm_tokenizer_free(tok);
    free(all);
    return 0;
}
