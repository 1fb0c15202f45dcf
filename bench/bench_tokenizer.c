/* Tokenizer encode speed, one core.
     cc -O2 -std=c99 bench/bench_tokenizer.c -o bench_tokenizer -lm -lpthread
     ./bench_tokenizer MODEL KIND TEXT [SECONDS]
   Encodes TEXT line by line (each line one call, as the reference benchmarks do) for about SECONDS
   seconds and prints "lines MB/s", then the whole text as one call with the AFM newline mapping. */
#define _POSIX_C_SOURCE 199309L
#define AFM_IMPLEMENTATION
#define AFM_HF_TOKENIZER /* tokenizer.json too (afm_tokenizer.h) */
#include "../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); /* CPU time: other processes on the machine do not count */
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    char *p;
    long sz;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    p = (char *)malloc((size_t)sz + 1);
    if (fread(p, 1, (size_t)sz, f) != (size_t)sz) { fclose(f); free(p); return NULL; }
    fclose(f);
    *n = (size_t)sz;
    return p;
}
int main(int argc, char **argv) {
    size_t mn, tn, total = 0, ntok = 0, cap = 1 << 22, i;
    char *model, *text, err[256];
    afm_tokenizer *t;
    int32_t *ids;
    double t0, secs = argc > 4 ? atof(argv[4]) : 3.0, el;
    if (argc < 4) { fprintf(stderr, "usage: %s MODEL KIND TEXT [SECONDS]\n", argv[0]); return 2; }
    model = slurp(argv[1], &mn);
    text = slurp(argv[3], &tn);
    if (!model || !text) { fprintf(stderr, "cannot read input\n"); return 1; }
    t0 = now();
    if (afm_tokenizer_load(model, mn, atoi(argv[2]), NULL, &t, err, sizeof err) != AFM_OK) { fprintf(stderr, "%s\n", err); return 1; }
    printf("load %.1f ms, vocab %d\n", (now() - t0) * 1e3, afm_tokenizer_n_vocab(t));
    ids = (int32_t *)malloc(cap * sizeof(int32_t));
    t0 = now();
    do {
        size_t a = 0;
        while (a < tn) {
            size_t e = a, n = 0;
            while (e < tn && text[e] != '\n') e++;
            if (e > a) {
                afm_tokenize(t, text + a, e - a, 0, ids, cap, &n);
                ntok += n;
                total += e - a;
            }
            a = e + 1;
        }
        el = now() - t0;
    } while (el < secs);
    printf("lines: %.1f MB/s (%lu bytes, %lu tokens, %.2f s)\n", total / el / 1e6, (unsigned long)total, (unsigned long)ntok, el);
    total = 0;
    t0 = now();
    do {
        size_t n = 0;
        afm_tokenize(t, text, tn, AFM_TOK_NEWLINE, ids, cap, &n);
        total += tn;
        el = now() - t0;
        for (i = 0; i < 1; i++) ntok = n;
    } while (el < secs);
    printf("whole text (AFM newlines): %.1f MB/s (%lu tokens per pass)\n", total / el / 1e6, (unsigned long)ntok);
    afm_tokenizer_free(t);
    free(ids);
    free(model);
    free(text);
    return 0;
}
