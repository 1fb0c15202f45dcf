/* The engine's tests: parity with Apple's MLX reference, incremental decode, rewind, hostile
   model files, sessions, sampling. Run from the repository root (paths are relative to it).
   Ends with the line "N passed, N failed" and exits non-zero on any failure. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#define AFM_IMPLEMENTATION
#include "../afm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) n_pass++;                                                  \
        else {                                                               \
            n_fail++;                                                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                      \
            printf(__VA_ARGS__);                                             \
            printf("\n");                                                    \
        }                                                                    \
    } while (0)

/* ---- helpers ---- */

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *p;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    p = (unsigned char *)malloc((size_t)n + 1);
    if (p && fread(p, 1, (size_t)n, f) != (size_t)n) { free(p); p = NULL; }
    fclose(f);
    *size = (size_t)n;
    return p;
}

/* A reference vector file written by tools/gen_ref.py: tokens and MLX logits per position. */
typedef struct ref {
    int n_prompt, n_decode, vocab;
    int32_t *tokens;
    float *logits; /* [n_prompt + n_decode][vocab] */
    double std;
} ref;

static int load_ref(const char *path, ref *r) {
    size_t size, n, i;
    unsigned char *p = read_file(path, &size);
    double sum = 0, sq = 0;
    if (!p) return 0;
    if (size < 24 || memcmp(p, "AFMREF1", 8)) { free(p); return 0; }
    memcpy(&r->n_prompt, p + 8, 4);
    memcpy(&r->n_decode, p + 12, 4);
    memcpy(&r->vocab, p + 16, 4);
    n = (size_t)(r->n_prompt + r->n_decode);
    if (size != 24 + n * 4 + n * r->vocab * 4) { free(p); return 0; }
    r->tokens = (int32_t *)malloc(n * 4);
    r->logits = (float *)malloc(n * r->vocab * 4);
    memcpy(r->tokens, p + 24, n * 4);
    memcpy(r->logits, p + 24 + n * 4, n * r->vocab * 4);
    for (i = 0; i < n * r->vocab; i++) { sum += r->logits[i]; sq += (double)r->logits[i] * r->logits[i]; }
    r->std = sqrt(sq / (n * r->vocab) - (sum / (n * r->vocab)) * (sum / (n * r->vocab)));
    free(p);
    return 1;
}

static void free_ref(ref *r) { free(r->tokens); free(r->logits); }

static double max_abs_diff(const float *a, const float *b, int n) {
    double m = 0;
    int i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates */
    }
    return m;
}

static afm_model *load(const char *path) {
    afm_model *m = NULL;
    char err[512];
    if (afm_model_load_file(path, NULL, &m, err, sizeof err) != AFM_OK) printf("load %s: %s\n", path, err);
    return m;
}

static afm_session *session(afm_model *m, int n_threads, int all_logits, int n_batch) {
    afm_session *s = NULL;
    afm_session_params p;
    memset(&p, 0, sizeof p);
    p.n_threads = n_threads;
    p.all_logits = all_logits;
    p.n_batch = n_batch;
    if (afm_session_create(m, &p, &s) != AFM_OK) return NULL;
    return s;
}

/* ---- parity with the MLX reference ---- */

/* Prefill n_prompt tokens in one eval (logits of every position), then one token at a time,
   each compared with MLX: max |diff| <= 1e-4 x std of the reference logits. */
static void test_parity(const char *name, int n_threads) {
    char mpath[256], rpath[256];
    afm_model *m;
    afm_session *s;
    ref r;
    int i, V;
    double worst = 0;
    snprintf(mpath, sizeof mpath, "tests/vectors/%s.afm", name);
    snprintf(rpath, sizeof rpath, "tests/vectors/%s.ref", name);
    if (!load_ref(rpath, &r)) { CHECK(0, "%s: cannot read reference %s", name, rpath); return; }
    m = load(mpath);
    CHECK(m != NULL, "%s: model loads", name);
    if (!m) { free_ref(&r); return; }
    V = r.vocab;
    CHECK(afm_model_config(m)->vocab_size == V, "%s: vocab matches reference", name);
    s = session(m, n_threads, 1, 0);
    CHECK(s && afm_session_eval(s, r.tokens, r.n_prompt) == AFM_OK, "%s: prefill", name);
    for (i = 0; s && i < r.n_prompt; i++) {
        double d = max_abs_diff(afm_session_logits(s, i), r.logits + (size_t)i * V, V);
        if (!(d <= worst)) worst = d;
    }
    for (i = 0; s && i < r.n_decode; i++) {
        double d;
        if (afm_session_eval(s, &r.tokens[r.n_prompt + i], 1) != AFM_OK) { worst = INFINITY; break; }
        d = max_abs_diff(afm_session_logits(s, 0), r.logits + (size_t)(r.n_prompt + i) * V, V);
        if (!(d <= worst)) worst = d;
    }
    CHECK(worst <= 1e-4 * r.std, "%s (%d threads): max |dlogit| %.3g > 1e-4 x std %.3g", name, n_threads, worst, r.std);
    printf("  parity %-12s threads %d: max |dlogit| %.3g = %.2g x std (limit 1e-4)\n", name, n_threads, worst, worst / r.std);
    afm_session_free(s);
    afm_model_free(m);
    free_ref(&r);
}

/* ---- incremental decode vs full recompute, and rewind ---- */

static void test_incremental_and_rewind(const char *name) {
    char mpath[256], rpath[256];
    afm_model *m;
    afm_session *full, *inc;
    ref r;
    int n, i, V, same = 1;
    float *saved;
    snprintf(mpath, sizeof mpath, "tests/vectors/%s.afm", name);
    snprintf(rpath, sizeof rpath, "tests/vectors/%s.ref", name);
    if (!load_ref(rpath, &r)) { CHECK(0, "%s: cannot read reference", name); return; }
    if (!(m = load(mpath))) { CHECK(0, "%s: load", name); free_ref(&r); return; }
    V = r.vocab;
    n = r.n_prompt + r.n_decode;
    full = session(m, 2, 1, 0);
    inc = session(m, 1, 0, 7); /* odd batch size: prefill split into chunks of 7 */
    CHECK(full && inc, "sessions created");
    if (!full || !inc) return;
    CHECK(afm_session_eval(full, r.tokens, n) == AFM_OK, "full eval");
    CHECK(afm_session_eval(inc, r.tokens, r.n_prompt) == AFM_OK, "chunked prefill");
    same &= !memcmp(afm_session_logits(inc, -1), afm_session_logits(full, r.n_prompt - 1), (size_t)V * 4);
    for (i = r.n_prompt; i < n; i++) {
        afm_session_eval(inc, &r.tokens[i], 1);
        same &= !memcmp(afm_session_logits(inc, -1), afm_session_logits(full, i), (size_t)V * 4);
    }
    CHECK(same, "%s: incremental decode (1 thread, batches of 7) equals full recompute (2 threads) bit for bit", name);

    /* rewind: go back to position 40, re-evaluate the same tokens, get the same logits */
    saved = (float *)malloc((size_t)V * 4);
    memcpy(saved, afm_session_logits(inc, -1), (size_t)V * 4);
    CHECK(afm_session_rewind(inc, 40) == AFM_OK && afm_session_pos(inc) == 40, "rewind to 40");
    CHECK(afm_session_logits(inc, -1) == NULL, "logits are gone after rewind");
    CHECK(afm_session_eval(inc, r.tokens + 40, n - 40) == AFM_OK, "re-eval after rewind");
    CHECK(!memcmp(afm_session_logits(inc, -1), saved, (size_t)V * 4), "%s: rewind then re-eval reproduces the logits exactly", name);
    /* rewind to a different continuation and back again */
    afm_session_rewind(inc, n - 3);
    {
        int32_t other[3] = { 1, 2, 3 };
        afm_session_eval(inc, other, 3);
    }
    afm_session_rewind(inc, n - 3);
    afm_session_eval(inc, r.tokens + n - 3, 3);
    CHECK(!memcmp(afm_session_logits(inc, -1), saved, (size_t)V * 4), "%s: rewind over a different continuation", name);
    CHECK(afm_session_rewind(inc, n + 1) == AFM_ERR_ARG && strstr(afm_session_error(inc), "rewind"), "rewind past the end is refused");
    free(saved);
    afm_session_free(full);
    afm_session_free(inc);
    afm_model_free(m);
    free_ref(&r);
}

int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : NULL;
    (void)only;
    test_parity("q", 1);
    test_parity("q", 2);
    test_incremental_and_rewind("q");
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
