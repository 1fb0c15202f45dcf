/* The engine's tests: parity with Apple's MLX reference, incremental decode, rewind, hostile
   model files, sessions, sampling. Run from the repository root (paths are relative to it).
   Ends with the line "N passed, N failed" and exits non-zero on any failure. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#define AFM_IMPLEMENTATION
#define AFM_TESTING /* test hooks: session->test_accept_rule, test_late_threads */
#include "../afm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifndef _WIN32
#include <pthread.h>
#endif

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

/* A reference vector file written by tests/gen/gen_ref.py: tokens and MLX logits per position. */
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
   each compared with MLX: max |diff| <= 1e-4 x std of the reference logits. `adapter` is NULL,
   "embedded" (the model's base adapter) or a path to an adapter file or .fmadapter directory. */
static void test_parity_with(const char *model, const char *refname, const char *adapter, int n_threads) {
    char mpath[256], rpath[256], err[512];
    afm_model *m;
    afm_session *s;
    afm_adapter *ad = NULL;
    ref r;
    int i, V;
    double worst = 0;
    snprintf(mpath, sizeof mpath, "tests/vectors/%s.afm", model);
    snprintf(rpath, sizeof rpath, "tests/vectors/%s.ref", refname);
    if (!load_ref(rpath, &r)) { CHECK(0, "%s: cannot read reference %s", refname, rpath); return; }
    m = load(mpath);
    CHECK(m != NULL, "%s: model loads", model);
    if (!m) { free_ref(&r); return; }
    if (adapter) {
        afm_result res = !strcmp(adapter, "embedded") ? afm_adapter_embedded(m, &ad, err, sizeof err)
                                                      : afm_adapter_load(m, adapter, NULL, &ad, err, sizeof err);
        CHECK(res == AFM_OK, "%s: adapter %s loads: %s", refname, adapter, err);
        if (res != AFM_OK) { afm_model_free(m); free_ref(&r); return; }
    }
    V = r.vocab;
    CHECK(afm_model_config(m)->vocab_size == V, "%s: vocab matches reference", refname);
    s = session(m, n_threads, 1, 0);
    if (s && ad) CHECK(afm_session_set_adapter(s, ad) == AFM_OK, "set adapter");
    CHECK(s && afm_session_eval(s, r.tokens, r.n_prompt) == AFM_OK, "%s: prefill", refname);
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
    CHECK(worst <= 1e-4 * r.std, "%s (%d threads): max |dlogit| %.3g > 1e-4 x std %.3g", refname, n_threads, worst, r.std);
    printf("  parity %-14s threads %d: max |dlogit| %.3g = %.2g x std (limit 1e-4)\n", refname, n_threads, worst, worst / r.std);
    afm_session_free(s);
    afm_adapter_free(ad);
    afm_model_free(m);
    free_ref(&r);
}

static void test_parity(const char *name, int n_threads) { test_parity_with(name, name, NULL, n_threads); }

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


/* ---- hostile model files: each mutation of a valid file must give a clear error ---- */

static unsigned char *g_valid;  /* a valid model file, loaded once by test_hostile */
static size_t g_valid_size;

static void wr32(unsigned char *p, uint32_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24); }
static void wr64(unsigned char *p, uint64_t v) { wr32(p, (uint32_t)v); wr32(p + 4, (uint32_t)(v >> 32)); }
static uint32_t rd32(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static float rdf(const unsigned char *p) { uint32_t u = rd32(p); float f; memcpy(&f, &u, 4); return f; }
static void wrf(unsigned char *p, float f) { uint32_t u; memcpy(&u, &f, 4); wr32(p, u); }

/* Loads buf (size bytes) and checks it fails with AFM_ERR_FORMAT and a message containing want. */
static void expect_bad(const unsigned char *buf, size_t size, const char *want, const char *what) {
    afm_model *m = NULL;
    char err[512] = "";
    afm_result r = afm_model_load_memory(buf, size, NULL, &m, err, sizeof err);
    CHECK(r == AFM_ERR_FORMAT && m == NULL && strstr(err, want), "%s: expected a format error mentioning '%s', got %d '%s'", what, want, (int)r, err);
    if (m) afm_model_free(m);
}

static unsigned char *copy_valid(void) {
    unsigned char *b = (unsigned char *)malloc(g_valid_size);
    memcpy(b, g_valid, g_valid_size);
    return b;
}

/* Byte position of field `off` of directory entry i, and the entry index of a named tensor. */
static size_t dirent(size_t i, size_t off) { return (size_t)rd64(g_valid + 56) + i * 128 + off; }
static int find_tensor(const char *name) {
    uint32_t i, n = rd32(g_valid + 72);
    for (i = 0; i < n; i++)
        if (!strcmp((const char *)g_valid + dirent(i, 0), name)) return (int)i;
    return -1;
}

typedef struct mutation { const char *what; size_t at; int width; double value; const char *want; } mutation;

static void test_hostile(const char *name) {
    char path[256];
    size_t cfg, i, n_cuts = 0, cuts[4096];
    unsigned char *b;
    int emb = -1, norm = -1, n_t;
    snprintf(path, sizeof path, "tests/vectors/%s.afm", name);
    g_valid = read_file(path, &g_valid_size);
    CHECK(g_valid != NULL, "read %s", path);
    if (!g_valid) return;
    {
        afm_model *m;
        char err[256];
        CHECK(afm_model_load_memory(g_valid, g_valid_size, NULL, &m, err, sizeof err) == AFM_OK, "the unmutated file loads: %s", err);
        afm_model_free(m);
    }
    cfg = (size_t)rd64(g_valid + 24);
    n_t = (int)rd32(g_valid + 72);
    emb = find_tensor("tok_embd");
    norm = find_tensor("out_norm");
    CHECK(emb >= 0 && norm >= 0, "tok_embd and out_norm found");
    if (emb < 0 || norm < 0) return;

    /* single-field corruptions: width 4 = u32, 8 = u64, -4 = f32 */
    {
        const mutation muts[] = {
            { "wrong magic", 0, 4, 0x4c444f4d, "magic" },
            { "version 2", 8, 4, 2, "version" },
            { "version 0", 8, 4, 0, "version" },
            { "header size", 12, 4, 64, "header_size" },
            { "config past the end", 24, 8, (double)g_valid_size, "config section" },
            { "config offset huge", 24, 8, 1.8e19, "config section" },
            { "config inside header", 24, 8, 64, "header" },
            { "config size small", 32, 4, 100, "config_size" },
            { "config overlaps directory", 32, 8, 1e6, "" },
            { "directory size wrong", 64, 8, 128, "dir_size" },
            { "no tensors", 72, 4, 0, "n_tensors" },
            { "too many tensors", 72, 4, 1e6, "n_tensors" },
            { "directory past the end", 56, 8, (double)g_valid_size - 64, "directory section" },
            { "directory overlaps config", 56, 8, (double)cfg, "overlaps" },
            { "data misaligned", 80, 8, (double)(rd64(g_valid + 80) + 8), "multiple of 64" },
            { "data past the end", 88, 8, (double)g_valid_size, "data section" },
            { "reserved header", 100, 4, 1, "reserved" },
            { "tokenizer offset without size", 40, 8, 128, "tokenizer" },
            { "arch", cfg + 0, 4, 7, "arch" },
            { "vocab 0", cfg + 4, 4, 0, "vocab_size" },
            { "vocab absurd", cfg + 4, 4, 4e9, "vocab_size" },
            { "dim 0", cfg + 8, 4, 0, "dim" },
            { "dim absurd", cfg + 8, 4, 1e7, "dim" },
            { "layers 0", cfg + 12, 4, 0, "n_layers" },
            { "reuse >= layers", cfg + 16, 4, 1000, "n_reuse_layers" },
            { "heads 0", cfg + 20, 4, 0, "n_heads" },
            { "kv heads 0", cfg + 24, 4, 0, "n_kv_heads" },
            { "head_dim odd", cfg + 28, 4, 33, "head_dim" },
            { "head_dim absurd", cfg + 28, 4, 1e6, "head_dim" },
            { "ffn 0", cfg + 32, 4, 0, "ffn_dim" },
            { "context 0", cfg + 36, 4, 0, "context_length" },
            { "rope theta NaN", cfg + 40, -4, NAN, "rope_theta" },
            { "rope theta inf", cfg + 40, -4, INFINITY, "rope_theta" },
            { "rope theta negative", cfg + 40, -4, -5, "rope_theta" },
            { "eps NaN", cfg + 44, -4, NAN, "norm_eps" },
            { "eps zero", cfg + 44, -4, 0, "norm_eps" },
            { "qk eps NaN", cfg + 48, -4, NAN, "qk_norm_eps" },
            { "rope layout interleaved", cfg + 52, 4, 0, "rope_layout" },
            { "unknown flag", cfg + 56, 4, 0xff, "flags" },
            { "not tied", cfg + 56, 4, 6, "flags" },
            { "lora rank absurd", cfg + 60, 4, 1e6, "lora_rank" },
            { "lora rank without tensors", cfg + 60, 4, 8, "missing" },
            { "signature not hex", cfg + 72, 4, 0x5a5a5a5a, "signature" },
            { "tensor type unknown", dirent((size_t)norm, 64), 4, 9, "unknown type" },
            { "tensor type does not match size", dirent((size_t)norm, 64), 4, 1, "size is" },
            { "n_dims 0", dirent((size_t)norm, 68), 4, 0, "n_dims" },
            { "n_dims 5", dirent((size_t)norm, 68), 4, 5, "n_dims" },
            { "dim zero", dirent((size_t)norm, 72), 8, 0, "dimension" },
            { "dim absurd", dirent((size_t)emb, 72), 8, 1e15, "absurd" },
            { "dims overflow", dirent((size_t)emb, 80), 8, 1e12, "" },
            { "unused dim set", dirent((size_t)norm, 80), 8, 3, "unused" },
            { "tensor offset misaligned", dirent((size_t)norm, 104), 8, 32, "multiple of 64" },
            { "tensor past data", dirent((size_t)norm, 104), 8, 1.6e19, "past the data section" },
            { "tensors overlap", dirent((size_t)norm, 104), 8, (double)rd64(g_valid + dirent((size_t)emb, 104)), "overlap" },
            { "size wrong", dirent((size_t)norm, 112), 8, 12, "size is" },
            { "group size on float", dirent((size_t)norm, 120), 4, 64, "group_size" },
            { "entry reserved", dirent((size_t)norm, 124), 4, 1, "reserved" },
            { "embedding shape", dirent((size_t)emb, 72), 8, (double)(rd64(g_valid + dirent((size_t)emb, 72)) - 1), "" },
            { "name illegal byte", dirent((size_t)norm, 0), 4, 0x2f74756f, "illegal" },
            { "name unknown", dirent((size_t)norm, 0), 4, 0x7a7a7a7a, "unknown tensor" },
            { "name empty", dirent((size_t)norm, 0), 4, 0, "empty" },
        };
        for (i = 0; i < sizeof muts / sizeof muts[0]; i++) {
            b = copy_valid();
            if (muts[i].width == 4) wr32(b + muts[i].at, (uint32_t)muts[i].value);
            else if (muts[i].width == 8) wr64(b + muts[i].at, muts[i].value >= 1.8e19 ? ~(uint64_t)0 : (uint64_t)muts[i].value);
            else wrf(b + muts[i].at, (float)muts[i].value);
            expect_bad(b, g_valid_size, muts[i].want, muts[i].what);
            free(b);
        }
    }
    b = copy_valid();
    memset(b + dirent((size_t)norm, 0), 'a', 64);
    expect_bad(b, g_valid_size, "NUL-terminated", "name unterminated");
    free(b);
    /* a name "out_norm" duplicated, a required tensor missing, a tensor that does not belong */
    b = copy_valid();
    memcpy(b + dirent((size_t)emb, 0), "out_norm", 9);
    expect_bad(b, g_valid_size, "twice", "duplicate tensor name");
    free(b);
    b = copy_valid();
    {
        int last = n_t - 1;
        char missing[64];
        memcpy(missing, g_valid + dirent((size_t)last, 0), 64);
        wr32(b + 72, (uint32_t)(n_t - 1));
        wr64(b + 64, (uint64_t)(n_t - 1) * 128);
        expect_bad(b, g_valid_size, missing, "last tensor dropped from the directory");
    }
    free(b);
    b = copy_valid();
    memcpy(b + dirent((size_t)norm, 0), "l0.wq\0\0\0\0", 9);
    expect_bad(b, g_valid_size, "", "segment-1 tensor in segment 0");
    free(b);
    /* NaN or negative KV scales */
    {
        int ks = find_tensor("kv_scale");
        if (ks >= 0) {
            size_t at = (size_t)(rd64(g_valid + 80) + rd64(g_valid + dirent((size_t)ks, 104)));
            b = copy_valid();
            wrf(b + at, NAN);
            expect_bad(b, g_valid_size, "kv_scale", "NaN KV scale");
            wrf(b + at, -1.0f);
            expect_bad(b, g_valid_size, "kv_scale", "negative KV scale");
            free(b);
        }
    }
    (void)rdf;

    /* truncation: at every section boundary, every tensor start, and a sweep of the first 4 KB;
       once as is (file_size disagrees) and once with file_size patched to agree */
    for (i = 0; i < 4096 && i < g_valid_size; i += 7) cuts[n_cuts++] = i;
    cuts[n_cuts++] = (size_t)rd64(g_valid + 24) + 1;
    cuts[n_cuts++] = (size_t)rd64(g_valid + 56) + 64;
    cuts[n_cuts++] = (size_t)rd64(g_valid + 80);
    cuts[n_cuts++] = g_valid_size - 1;
    for (i = 0; i < (size_t)n_t && n_cuts < 4096; i++)
        cuts[n_cuts++] = (size_t)(rd64(g_valid + 80) + rd64(g_valid + dirent(i, 104)) + 1);
    {
        int all_refused = 1, all_clear = 1;
        for (i = 0; i < n_cuts; i++) {
            size_t cut = cuts[i];
            int pass;
            if (cut >= g_valid_size) continue;
            for (pass = 0; pass < 2; pass++) {
                afm_model *m = NULL;
                char err[512] = "";
                b = (unsigned char *)malloc(cut ? cut : 1);
                memcpy(b, g_valid, cut);
                if (pass && cut >= 24) wr64(b + 16, cut);
                if (afm_model_load_memory(b, cut, NULL, &m, err, sizeof err) != AFM_ERR_FORMAT) { all_refused = 0; printf("  cut at %zu (pass %d) not refused\n", cut, pass); }
                if (!err[0]) all_clear = 0;
                afm_model_free(m);
                free(b);
            }
        }
        CHECK(all_refused, "every truncation (%zu cut points, 2 ways) is refused", n_cuts);
        CHECK(all_clear, "every truncation gets a message");
    }
    {
        afm_model *m;
        char err[256];
        CHECK(afm_model_load_file("tests/vectors/does-not-exist.afm", NULL, &m, err, sizeof err) == AFM_ERR_IO && strstr(err, "does-not-exist"), "missing file: %s", err);
        CHECK(afm_model_load_file("tests", NULL, &m, err, sizeof err) == AFM_ERR_IO, "a directory is refused: %s", err);
    }
    free(g_valid);
    g_valid = NULL;
}

/* ---- sessions: limits, bad tokens, KV types, memory loading, allocator, threads ---- */

typedef struct counting_alloc { long live, total; } counting_alloc;
static void *count_alloc(void *u, size_t n) { ((counting_alloc *)u)->live++; ((counting_alloc *)u)->total++; return malloc(n); }
static void count_free(void *u, void *p) { if (p) ((counting_alloc *)u)->live--; free(p); }

static void test_sessions(const char *name) {
    char path[256];
    afm_model *m, *mm;
    afm_session *s;
    afm_session_params p;
    size_t size;
    unsigned char *bytes;
    int32_t toks[12] = { 1, 5, 9, 2, 7, 3, 3, 8, 0, 4, 6, 1 };
    float *a;
    int V;
    char err[256];
    counting_alloc ca = { 0, 0 };
    afm_allocator al;
    afm_load_params lp;

    snprintf(path, sizeof path, "tests/vectors/%s.afm", name);
    if (!(m = load(path))) { CHECK(0, "load %s", path); return; }
    V = afm_model_config(m)->vocab_size;
    a = (float *)malloc((size_t)V * 4);

    memset(&p, 0, sizeof p);
    p.n_ctx = 8;
    CHECK(afm_session_create(m, &p, &s) == AFM_OK, "session with n_ctx 8");
    CHECK(afm_session_eval(s, toks, 9) == AFM_ERR_CONTEXT_FULL && strstr(afm_session_error(s), "context"), "9 tokens into 8 refused: %s", afm_session_error(s));
    CHECK(afm_session_eval(s, toks, 8) == AFM_OK, "8 tokens fit");
    CHECK(afm_session_eval(s, toks, 1) == AFM_ERR_CONTEXT_FULL, "the 9th is refused");
    CHECK(afm_session_pos(s) == 8, "position unchanged by a refused eval");
    afm_session_rewind(s, 0);
    {
        int32_t bad[2] = { 1, 0 };
        bad[1] = V;
        CHECK(afm_session_eval(s, bad, 2) == AFM_ERR_ARG && strstr(afm_session_error(s), "vocabulary"), "token id = vocab refused: %s", afm_session_error(s));
        bad[1] = -1;
        CHECK(afm_session_eval(s, bad, 2) == AFM_ERR_ARG, "negative token refused");
        CHECK(afm_session_eval(s, bad, 0) == AFM_ERR_ARG, "zero tokens refused");
    }
    afm_session_free(s);

    /* memory loading equals file loading; preallocation equals growth */
    bytes = read_file(path, &size);
    CHECK(afm_model_load_memory(bytes, size, NULL, &mm, err, sizeof err) == AFM_OK, "load from memory: %s", err);
    memset(&p, 0, sizeof p);
    afm_session_create(m, &p, &s);
    afm_session_eval(s, toks, 12);
    memcpy(a, afm_session_logits(s, -1), (size_t)V * 4);
    afm_session_free(s);
    p.preallocate = 1;
    p.n_ctx = 300; /* larger than the first growth step */
    afm_session_create(mm, &p, &s);
    afm_session_eval(s, toks, 12);
    CHECK(!memcmp(a, afm_session_logits(s, -1), (size_t)V * 4), "memory-loaded, preallocated session gives the same logits");
    afm_session_free(s);
    afm_model_free(mm);
    free(bytes);

    /* other KV cache types run and stay close to the int8 reference path */
    {
        afm_kv_type kinds[2] = { AFM_KV_F32, AFM_KV_F16 };
        int k;
        for (k = 0; k < 2; k++) {
            memset(&p, 0, sizeof p);
            p.kv_type = kinds[k];
            CHECK(afm_session_create(m, &p, &s) == AFM_OK && afm_session_eval(s, toks, 12) == AFM_OK, "KV type %d", (int)kinds[k]);
            afm_session_free(s);
        }
        if (!afm_model_config(m)->has_kv_scales) {
            p.kv_type = AFM_KV_INT8;
            CHECK(afm_session_create(m, &p, &s) == AFM_ERR_UNSUPPORTED, "int8 KV without scales refused");
        }
    }

    /* allocator hooks: every allocation goes through them and is returned */
    al.alloc = count_alloc;
    al.free = count_free;
    al.user = &ca;
    memset(&lp, 0, sizeof lp);
    lp.allocator = &al;
    lp.no_mmap = 1;
    CHECK(afm_model_load_file(path, &lp, &mm, err, sizeof err) == AFM_OK, "load with allocator hooks");
    memset(&p, 0, sizeof p);
    p.n_threads = 2;
    afm_session_create(mm, &p, &s);
    afm_session_eval(s, toks, 12);
    CHECK(!memcmp(a, afm_session_logits(s, -1), (size_t)V * 4), "no-mmap load with hooks, 2 threads: same logits");
    afm_session_free(s);
    afm_model_free(mm);
    CHECK(ca.total > 5 && ca.live == 0, "allocator: %ld allocations, %ld not freed", ca.total, ca.live);
    /* the same hooks without no_mmap: the file is mapped (on Linux afm.h reads a model into memory
       advised for huge pages only when the memory is its own) */
    lp.no_mmap = 0;
    CHECK(afm_model_load_file(path, &lp, &mm, err, sizeof err) == AFM_OK, "mapped load with allocator hooks");
    afm_session_create(mm, &p, &s);
    afm_session_eval(s, toks, 12);
    CHECK(!memcmp(a, afm_session_logits(s, -1), (size_t)V * 4), "mapped load with hooks, 2 threads: same logits");
    afm_session_free(s);
    afm_model_free(mm);
    CHECK(ca.live == 0, "allocator after the mapped load: %ld not freed", ca.live);
    free(a);
    afm_model_free(m);
}

/* ---- sampling ---- */

static void test_sampler(void) {
    float logits[5];
    int counts[5] = { 0, 0, 0, 0, 0 }, i, same = 1, differ = 0;
    afm_sampler *a, *b;
    afm_sampler_params p;
    logits[0] = logf(0.5f); logits[1] = logf(0.3f); logits[2] = logf(0.2f); logits[3] = -INFINITY; logits[4] = -1e30f;

    memset(&p, 0, sizeof p);
    afm_sampler_create(&p, 5, NULL, &a);
    CHECK(afm_sampler_sample(a, logits) == 0, "greedy picks the argmax");
    afm_sampler_free(a);

    p.temperature = 1.0f;
    p.seed = 42;
    afm_sampler_create(&p, 5, NULL, &a);
    afm_sampler_create(&p, 5, NULL, &b);
    for (i = 0; i < 30000; i++) {
        int x = afm_sampler_sample(a, logits), y = afm_sampler_sample(b, logits);
        same &= x == y;
        counts[x]++;
    }
    CHECK(same, "same seed, same draws");
    CHECK(fabs(counts[0] / 30000.0 - 0.5) < 0.015 && fabs(counts[1] / 30000.0 - 0.3) < 0.015 && fabs(counts[2] / 30000.0 - 0.2) < 0.015 && counts[3] == 0 && counts[4] == 0,
          "temperature 1 follows the distribution: %d %d %d %d %d", counts[0], counts[1], counts[2], counts[3], counts[4]);
    afm_sampler_free(b);
    p.seed = 43;
    afm_sampler_create(&p, 5, NULL, &b);
    for (i = 0; i < 100; i++) differ |= afm_sampler_sample(a, logits) != afm_sampler_sample(b, logits);
    CHECK(differ, "different seeds, different draws");
    afm_sampler_free(a);
    afm_sampler_free(b);

    p.seed = 1;
    p.top_p = 0.6f;
    afm_sampler_create(&p, 5, NULL, &a);
    memset(counts, 0, sizeof counts);
    for (i = 0; i < 5000; i++) counts[afm_sampler_sample(a, logits)]++;
    CHECK(counts[2] == 0 && counts[0] > 0 && counts[1] > 0, "top-p 0.6 keeps {0, 1}: %d %d %d", counts[0], counts[1], counts[2]);
    afm_sampler_free(a);
    p.top_p = 0;
    p.top_k = 1;
    afm_sampler_create(&p, 5, NULL, &a);
    for (i = 0, same = 1; i < 1000; i++) same &= afm_sampler_sample(a, logits) == 0;
    CHECK(same, "top-k 1 is greedy");
    afm_sampler_free(a);
    p.top_k = 0;
    p.min_p = 0.5f; /* keeps p >= 0.25 */
    afm_sampler_create(&p, 5, NULL, &a);
    memset(counts, 0, sizeof counts);
    for (i = 0; i < 5000; i++) counts[afm_sampler_sample(a, logits)]++;
    CHECK(counts[2] == 0 && counts[1] > 0, "min-p 0.5 drops token 2: %d %d %d", counts[0], counts[1], counts[2]);
    afm_sampler_free(a);
    p.min_p = 2.0f;
    CHECK(afm_sampler_create(&p, 5, NULL, &a) == AFM_ERR_ARG, "min-p 2 refused");
    p.min_p = 0;
    p.temperature = NAN;
    CHECK(afm_sampler_create(&p, 5, NULL, &a) == AFM_ERR_ARG, "NaN temperature refused");
}

/* ---- concurrent sessions on one model ---- */
#ifndef _WIN32
typedef struct conc_arg { afm_model *m; const int32_t *toks; int n; float *out; } conc_arg;
static void *conc_run(void *p) {
    conc_arg *c = (conc_arg *)p;
    afm_session *s;
    afm_session_create(c->m, NULL, &s);
    afm_session_eval(s, c->toks, c->n);
    memcpy(c->out, afm_session_logits(s, -1), (size_t)afm_model_config(c->m)->vocab_size * 4);
    afm_session_free(s);
    return NULL;
}
static void test_concurrent(const char *name) {
    char path[256];
    afm_model *m;
    int32_t t1[6] = { 1, 2, 3, 4, 5, 6 }, t2[9] = { 9, 8, 7, 6, 5, 4, 3, 2, 1 };
    conc_arg a[2], alone[2];
    pthread_t th[2];
    int V, k;
    snprintf(path, sizeof path, "tests/vectors/%s.afm", name);
    if (!(m = load(path))) return;
    V = afm_model_config(m)->vocab_size;
    for (k = 0; k < 2; k++) {
        a[k].m = alone[k].m = m;
        a[k].toks = alone[k].toks = k ? t2 : t1;
        a[k].n = alone[k].n = k ? 9 : 6;
        a[k].out = (float *)malloc((size_t)V * 4);
        alone[k].out = (float *)malloc((size_t)V * 4);
        conc_run(&alone[k]);
    }
    for (k = 0; k < 2; k++) pthread_create(&th[k], NULL, conc_run, &a[k]);
    for (k = 0; k < 2; k++) pthread_join(th[k], NULL);
    CHECK(!memcmp(a[0].out, alone[0].out, (size_t)V * 4) && !memcmp(a[1].out, alone[1].out, (size_t)V * 4),
          "two sessions run concurrently give the same logits as each alone");
    for (k = 0; k < 2; k++) { free(a[k].out); free(alone[k].out); }
    afm_model_free(m);
}
#endif

/* ---- generation and speculative decoding ---- */

typedef struct collect { int32_t toks[512]; int n; } collect;
static int collect_token(void *u, int32_t t) { collect *c = (collect *)u; if (c->n < 512) c->toks[c->n++] = t; return 0; }

/* A drafter that proposes random tokens: mostly wrong, so acceptance stays near 0. */
typedef struct rand_drafter { uint64_t x; int V; } rand_drafter;
static int draft_random(void *u, const int32_t *ctx, int n, int k, int32_t *out) {
    rand_drafter *r = (rand_drafter *)u;
    int i;
    (void)ctx; (void)n;
    for (i = 0; i < k; i++) { r->x = r->x * 6364136223846793005ull + 1442695040888963407ull; out[i] = (int32_t)((r->x >> 33) % (uint64_t)r->V); }
    return k;
}

/* A drafter that knows the base's greedy continuation and proposes it (an oracle). */
typedef struct oracle { const int32_t *seq; int n_prompt, n_seq; } oracle;
static int draft_oracle(void *u, const int32_t *ctx, int n, int k, int32_t *out) {
    oracle *o = (oracle *)u;
    int i, at = n - o->n_prompt; /* ctx ends with the pending token = seq[at - 1] */
    (void)ctx;
    for (i = 0; i < k && at + i < o->n_seq; i++) out[i] = o->seq[at + i];
    return i;
}

static void greedy_plain(afm_session *s, const int32_t *prompt, int n_prompt, int n_predict, collect *out) {
    afm_generate_params gp;
    memset(&gp, 0, sizeof gp);
    gp.n_predict = n_predict;
    gp.on_token = collect_token;
    gp.user = out;
    out->n = 0;
    afm_session_rewind(s, 0);
    afm_generate(s, prompt, n_prompt, &gp, NULL);
}

static void test_speculative_greedy(const char *base_name, const char *draft_name, int with_adapter) {
    char path[256], err[256];
    afm_model *m, *dm;
    afm_session *s, *ds;
    afm_adapter *ad = NULL;
    int V, trial, kind, all_equal = 1, runs = 0, pos_ok = 1;
    long drafted = 0, accepted = 0;
    snprintf(path, sizeof path, "tests/vectors/%s.afm", base_name);
    m = load(path);
    snprintf(path, sizeof path, "tests/vectors/%s.afm", draft_name);
    dm = load(path);
    if (!m || !dm) { CHECK(0, "load models"); return; }
    V = afm_model_config(m)->vocab_size;
    s = session(m, 2, 0, 0);
    ds = session(dm, 1, 0, 0);
    if (with_adapter) {
        CHECK(afm_adapter_embedded(m, &ad, err, sizeof err) == AFM_OK, "embedded adapter");
        afm_session_set_adapter(s, ad);
    }
    for (trial = 0; trial < 6; trial++) {
        int32_t prompt[40];
        int n_prompt = 5 + trial * 6, i;
        collect plain, spec;
        uint64_t x = 1234567 + (uint64_t)trial * 7919;
        for (i = 0; i < n_prompt; i++) { x = x * 6364136223846793005ull + 1; prompt[i] = (int32_t)((x >> 33) % (uint64_t)V); }
        if (trial % 2) for (i = n_prompt / 2; i < n_prompt; i++) prompt[i] = prompt[i - n_prompt / 2]; /* repetition: lookup finds matches */
        greedy_plain(s, prompt, n_prompt, 40, &plain);
        for (kind = 0; kind < 4; kind++) {
            afm_generate_params gp;
            afm_generate_stats st;
            rand_drafter rd;
            oracle orc;
            memset(&gp, 0, sizeof gp);
            gp.n_predict = 40;
            gp.on_token = collect_token;
            gp.user = &spec;
            spec.n = 0;
            rd.x = (uint64_t)trial; rd.V = V;
            orc.seq = plain.toks; orc.n_prompt = n_prompt; orc.n_seq = plain.n;
            if (kind == 0) gp.draft = ds;
            else if (kind == 1) gp.lookup = 1;
            else if (kind == 2) { gp.draft_fn = draft_random; gp.draft_user = &rd; gp.fixed_k = 1; gp.draft_k = 3; }
            else { gp.draft_fn = draft_oracle; gp.draft_user = &orc; gp.fixed_k = 1; gp.draft_k = 4; } /* fixed K: the engine's
                                                      own K follows measured (noisy) timings */
            afm_session_rewind(s, 0);
            afm_session_rewind(ds, 0);
            CHECK(afm_generate(s, prompt, n_prompt, &gp, &st) == AFM_OK, "generate: %s", afm_session_error(s));
            all_equal &= spec.n == plain.n && !memcmp(spec.toks, plain.toks, (size_t)plain.n * 4);
            pos_ok &= afm_session_pos(s) == n_prompt + 40;
            drafted += st.n_drafted;
            accepted += st.n_accepted;
            runs++;
            if (kind == 3) CHECK(st.n_accepted == st.n_drafted && st.n_steps <= 9, "oracle drafter: %d/%d accepted in %d steps (40 tokens, K = 4)", st.n_accepted, st.n_drafted, st.n_steps);
        }
    }
    CHECK(all_equal, "greedy speculative output equals plain greedy (%s, draft %s, adapter %d; %d runs: draft model, lookup, random, oracle)", base_name, draft_name, with_adapter, runs);
    CHECK(pos_ok, "every generated token is in the cache afterwards");
    printf("  speculative greedy %s%s: %d runs identical to plain; %ld/%ld drafts accepted\n", base_name, with_adapter ? "+adapter" : "", runs, accepted, drafted);
    afm_session_free(s);
    afm_session_free(ds);
    afm_adapter_free(ad);
    afm_model_free(m);
    afm_model_free(dm);
}

/* afm_generate's choice of K from measured costs: a draft length whose one measurement came in a
   slow moment (6 tokens at 1000 x a step) is not chosen while that measurement is fresh, and is
   tried again once it is older than AFM__TV_FRESH rounds (before, it was never measured again). */
static void test_choose_k_expiry(void) {
    afm__gen g;
    afm_generate_params p;
    int n, k_fresh, k_old;
    memset(&g, 0, sizeof g);
    memset(&p, 0, sizeof p);
    g.p = &p;
    g.kmax = 5;
    g.probe_every = 16;
    g.acc_hits = 9; /* 90 % acceptance */
    g.acc_trials = 10;
    for (n = 1; n <= 5; n++) g.tv[n] = 1.0 + 0.1 * (n - 1);
    g.tv[6] = 1000.0;
    g.round = 10;
    k_fresh = afm__choose_k(&g);
    g.round = 10 + AFM__TV_FRESH + 1;
    for (n = 2; n <= 5; n++) g.tv_round[n] = g.round - 1; /* the shorter drafts measured just now */
    k_old = afm__choose_k(&g);
    CHECK(k_fresh == 4 && k_old == 5, "K with 6 tokens measured slow once: %d while fresh (expected 4), %d once old (expected 5)", k_fresh, k_old);
}

/* A drafter that proposes the base model's own greedy continuation, computed on a session of its
   own: deterministic proposals that the sampler accepts with probability p(token). */
static int draft_greedy_self(void *u, const int32_t *ctx, int n, int k, int32_t *out) {
    afm_session *d = (afm_session *)u;
    int i;
    afm_session_rewind(d, 0);
    afm_session_eval(d, ctx, n);
    for (i = 0; i < k; i++) {
        const float *lg = afm_session_logits(d, -1);
        int v, V = afm_model_config(d->model)->vocab_size, best = 0;
        for (v = 1; v < V; v++) if (lg[v] > lg[best]) best = v;
        out[i] = best;
        if (i + 1 < k) afm_session_eval(d, &out[i], 1);
    }
    return k;
}

/* Chi-square upper critical value for `dof` degrees of freedom at significance 0.001
   (Wilson-Hilferty approximation; z = 3.0902). */
static double chi2_crit(int dof) {
    double z = 3.0902, a = 2.0 / (9.0 * dof), t = 1 - a + z * sqrt(a);
    return dof * t * t * t;
}

/* Samples 3-token continuations many times with a speculative drafter (drafter 0: the draft
   session ds as a draft model; 1: ds proposing its greedy tokens) and compares the joint
   distribution with the exact one computed from the base model. Returns the chi-square value. */
static double spec_chi2(afm_model *m, afm_session *ds, int drafter, int wrong_rule, int n_runs, int *dof_out) {
    enum { K = 3 }; /* top-k: 27 possible sequences */
    afm_session *s = session(m, 1, 0, 0), *e = session(m, 1, 0, 0);
    afm_sampler_params sp;
    afm_sampler *sm;
    int32_t prompt[6] = { 7, 1, 9, 7, 1, 9 }, top1[K], seq[4];
    double prob[K * K * K], chi2 = 0;
    float p1[K];
    long counts[K * K * K];
    int V = afm_model_config(m)->vocab_size, a, b, c, i, run, dof = 0, outside = 0;
    float *dist = (float *)malloc((size_t)V * 4);
    memset(counts, 0, sizeof counts);
    memset(prob, 0, sizeof prob);
    memset(&sp, 0, sizeof sp);
    sp.temperature = 1.3f;
    sp.top_k = K;
    afm_sampler_create(&sp, V, NULL, &sm);
    /* exact distribution: p(a) p(b|a) p(c|a,b) over the top-3 sets */
    afm_session_eval(e, prompt, 6);
    afm__sampler_dist(sm, afm_session_logits(e, -1), dist);
    for (i = 0, a = 0; i < V; i++) if (dist[i] > 0) { p1[a] = dist[i]; top1[a++] = i; }
    for (a = 0; a < K; a++) {
        float pa = p1[a];
        int32_t ta = top1[a], top2[K];
        float *d2 = (float *)malloc((size_t)V * 4);
        afm_session_rewind(e, 6);
        afm_session_eval(e, &ta, 1);
        afm__sampler_dist(sm, afm_session_logits(e, -1), d2);
        for (i = 0, b = 0; i < V; i++) if (d2[i] > 0) top2[b++] = i;
        for (b = 0; b < K; b++) {
            int32_t tb = top2[b];
            afm_session_rewind(e, 7);
            afm_session_eval(e, &tb, 1);
            afm__sampler_dist(sm, afm_session_logits(e, -1), dist);
            for (i = 0, c = 0; i < V; i++)
                if (dist[i] > 0) { prob[(a * K + b) * K + c] = (double)pa * d2[tb] * dist[i]; c++; }
        }
        free(d2);
    }
    /* observed */
    s->test_accept_rule = wrong_rule;
    for (run = 0; run < n_runs; run++) {
        afm_generate_params gp;
        collect out;
        memset(&gp, 0, sizeof gp);
        gp.n_predict = 3;
        gp.sampler = sp;
        gp.sampler.seed = (uint64_t)run + 1;
        gp.on_token = collect_token;
        gp.user = &out;
        gp.fixed_k = 1;
        gp.draft_k = 2;
        out.n = 0;
        if (drafter == 0) gp.draft = ds;
        else { gp.draft_fn = draft_greedy_self; gp.draft_user = ds; }
        afm_session_rewind(s, 0);
        afm_generate(s, prompt, 6, &gp, NULL);
        for (i = 0; i < 3; i++) seq[i] = out.toks[i];
        /* map to a cell via the exact computation's candidate sets */
        {
            int ca = -1, cb = -1, cc = -1;
            int32_t t2[K], t3[K];
            for (a = 0; a < K; a++) if (top1[a] == seq[0]) ca = a;
            if (ca < 0) { outside++; continue; }
            afm_session_rewind(e, 6);
            afm_session_eval(e, &seq[0], 1);
            afm__sampler_dist(sm, afm_session_logits(e, -1), dist);
            for (i = 0, b = 0; i < V; i++) if (dist[i] > 0) t2[b++] = i;
            for (b = 0; b < K; b++) if (t2[b] == seq[1]) cb = b;
            if (cb < 0) { outside++; continue; }
            afm_session_eval(e, &seq[1], 1);
            afm__sampler_dist(sm, afm_session_logits(e, -1), dist);
            for (i = 0, c = 0; i < V; i++) if (dist[i] > 0) t3[c++] = i;
            for (c = 0; c < K; c++) if (t3[c] == seq[2]) cc = c;
            if (cc < 0) { outside++; continue; }
            counts[(ca * K + cb) * K + cc]++;
        }
    }
    for (i = 0; i < K * K * K; i++) {
        double expct = prob[i] * n_runs;
        if (expct > 0) { chi2 += (counts[i] - expct) * (counts[i] - expct) / expct; dof++; }
    }
    chi2 += outside * 1e9; /* a token outside the sampler's support is an outright failure */
    if (getenv("AFM_DEBUG_CHI2")) for (i = 0; i < K * K * K; i++) printf("cell %d: p %.4f expected %.1f observed %ld\n", i, prob[i], prob[i] * n_runs, counts[i]);
    *dof_out = dof - 1;
    free(dist);
    afm_sampler_free(sm);
    afm_session_free(s);
    afm_session_free(e);
    return chi2;
}

static void test_speculative_distribution(void) {
    afm_model *m = load("tests/vectors/afm_mini.afm"), *dm = load("tests/vectors/draft_mini.afm");
    afm_session *ds, *self;
    double c_draft, c_self, c_greedy, c_wrong;
    int dof = 0, n = getenv("AFM_TEST_LIGHT") ? 1000 : 3000; /* lighter under emulators and sanitizers */
    if (!m || !dm) { CHECK(0, "load"); return; }
    ds = session(dm, 1, 0, 0);
    self = session(m, 1, 0, 0);
    c_draft = spec_chi2(m, ds, 0, 0, n, &dof);   /* a different model: mostly rejections */
    c_self = spec_chi2(m, self, 0, 0, n, &dof);  /* the base as its own draft: q = p, all accepted */
    c_greedy = spec_chi2(m, self, 1, 0, n, &dof); /* deterministic proposals, accepted with p(token) */
    c_wrong = spec_chi2(m, self, 1, 1, n, &dof);  /* the same, but accepting every draft */
    CHECK(c_draft < chi2_crit(dof), "sampled speculative (draft model) matches the base distribution: chi2 %.1f, dof %d, critical %.1f", c_draft, dof, chi2_crit(dof));
    CHECK(c_self < chi2_crit(dof), "sampled speculative (base as draft) matches: chi2 %.1f, critical %.1f", c_self, chi2_crit(dof));
    CHECK(c_greedy < chi2_crit(dof), "sampled speculative (greedy proposals) matches: chi2 %.1f, critical %.1f", c_greedy, chi2_crit(dof));
    CHECK(c_wrong > chi2_crit(dof), "a wrong acceptance rule (accept every draft) fails the same test: chi2 %.1f > critical %.1f", c_wrong, chi2_crit(dof));
    printf("  speculative sampling, %d runs x 3 tokens, top-k 3 (dof %d, critical %.1f at p = 0.001): chi2 %.1f draft model, %.1f base as draft, %.1f greedy proposals; wrong rule %.1f\n",
           n, dof, chi2_crit(dof), c_draft, c_self, c_greedy, c_wrong);
    afm_session_free(ds);
    afm_session_free(self);
    afm_model_free(m);
    afm_model_free(dm);
}

/* ---- adapters: switching, concurrent sessions, hostile packages ---- */

typedef struct ad_arg { afm_model *m; const afm_adapter *ad; const int32_t *toks; int n; float *out; } ad_arg;
static void *ad_run(void *p) {
    ad_arg *c = (ad_arg *)p;
    afm_session *s;
    afm_session_create(c->m, NULL, &s);
    afm_session_set_adapter(s, c->ad);
    afm_session_eval(s, c->toks, c->n);
    memcpy(c->out, afm_session_logits(s, -1), (size_t)afm_model_config(c->m)->vocab_size * 4);
    afm_session_free(s);
    return NULL;
}

static void test_adapter_sessions(void) {
    afm_model *m = load("tests/vectors/toolkit.afm");
    afm_adapter *a1 = NULL, *a2 = NULL;
    afm_session *s;
    char err[256];
    int32_t toks[10] = { 3, 1, 4, 1, 5, 9, 2, 6, 5, 3 };
    ad_arg alone[2], both[2];
    float *none;
    int V, k, differ = 0;
    if (!m) return;
    V = afm_model_config(m)->vocab_size;
    CHECK(afm_adapter_load(m, "tests/vectors/lora/adapter.afma", NULL, &a1, err, sizeof err) == AFM_OK, "adapter.afma: %s", err);
    CHECK(afm_adapter_load(m, "tests/vectors/lora/adapter2.afma", NULL, &a2, err, sizeof err) == AFM_OK, "adapter2.afma: %s", err);
    if (!a1 || !a2) return;
    for (k = 0; k < 2; k++) {
        alone[k].m = both[k].m = m;
        alone[k].ad = both[k].ad = k ? a2 : a1;
        alone[k].toks = both[k].toks = toks;
        alone[k].n = both[k].n = 10;
        alone[k].out = (float *)malloc((size_t)V * 4);
        both[k].out = (float *)malloc((size_t)V * 4);
        ad_run(&alone[k]);
    }
#ifndef _WIN32
    {
        pthread_t th[2];
        for (k = 0; k < 2; k++) pthread_create(&th[k], NULL, ad_run, &both[k]);
        for (k = 0; k < 2; k++) pthread_join(th[k], NULL);
        CHECK(!memcmp(both[0].out, alone[0].out, (size_t)V * 4) && !memcmp(both[1].out, alone[1].out, (size_t)V * 4),
              "two sessions with different adapters, run concurrently, give the same logits as each alone");
    }
#endif
    for (k = 0; k < V; k++) differ |= alone[0].out[k] != alone[1].out[k];
    CHECK(differ, "the two adapters give different logits");
    /* one session switching: adapter 1, none, adapter 2, adapter 1 again */
    none = (float *)malloc((size_t)V * 4);
    afm_session_create(m, NULL, &s);
    afm_session_eval(s, toks, 10);
    memcpy(none, afm_session_logits(s, -1), (size_t)V * 4);
    CHECK(afm_session_set_adapter(s, a1) == AFM_OK && afm_session_pos(s) == 0, "switching rewinds the session to 0");
    afm_session_eval(s, toks, 10);
    CHECK(!memcmp(afm_session_logits(s, -1), alone[0].out, (size_t)V * 4), "switched to adapter 1");
    CHECK(afm_session_set_adapter(s, a1) == AFM_OK && afm_session_pos(s) == 10, "setting the same adapter keeps the cache");
    afm_session_set_adapter(s, NULL);
    afm_session_eval(s, toks, 10);
    CHECK(!memcmp(afm_session_logits(s, -1), none, (size_t)V * 4), "switched back to no adapter");
    afm_session_set_adapter(s, a2);
    afm_session_eval(s, toks, 10);
    CHECK(!memcmp(afm_session_logits(s, -1), alone[1].out, (size_t)V * 4), "switched to adapter 2");
    {
        afm_model *other = load("tests/vectors/afm_mini.afm");
        afm_adapter *wrong = NULL;
        CHECK(afm_adapter_load(other, "tests/vectors/lora/adapter.afma", NULL, &wrong, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "base with"),
              "an adapter for another base is refused: %s", err);
        afm_adapter_free(wrong);
        afm_model_free(other);
    }
    afm_session_free(s);
    free(none);
    for (k = 0; k < 2; k++) { free(alone[k].out); free(both[k].out); }
    afm_adapter_free(a1);
    afm_adapter_free(a2);
    afm_model_free(m);
}

static void test_fmadapter_hostile(void) {
    static const struct { const char *dir, *want; } cases[] = {
        { "signature_not_hex", "baseModelSignature" }, { "bad_json", "metadata.json: offset" },
        { "metadata_not_object", "not a JSON object" }, { "missing_metadata", "metadata.json: cannot open" },
        { "missing_weights", "adapter_weights.bin: cannot open" }, { "identifier_hyphen", "adapterIdentifier" },
        { "identifier_missing", "adapterIdentifier" }, { "rank_zero", "loraRank" }, { "rank_string", "loraRank" },
        { "rank_mismatch", "record 0" }, { "bad_version", "version 3" }, { "wrong_record_count", "47 tensors" },
        { "extra_record", "49 tensors" }, { "bad_magic", "record 5" }, { "bad_dtype", "dtype 2" },
        { "wrong_size", "record 7" }, { "overlapping_offsets", "record 2" }, { "misplaced_offset", "record 3" },
        { "truncated_blob", "truncated" }, { "truncated_header", "shorter than" }, { "trailing_garbage", "after the last" },
        { "nan_value", "NaN" },
    };
    afm_model *m = load("tests/vectors/toolkit.afm"), *signed_m = NULL;
    afm_adapter *ad = NULL;
    char path[256], err[512];
    size_t i, size;
    unsigned char *bytes;
    if (!m) return;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        afm_result r;
        snprintf(path, sizeof path, "tests/fuzz/corpus/fmadapter/%s", cases[i].dir);
        err[0] = 0;
        r = afm_adapter_load(m, path, NULL, &ad, err, sizeof err);
        CHECK(r != AFM_OK && ad == NULL && strstr(err, cases[i].want), "hostile package %s: expected an error mentioning '%s', got %d '%s'", cases[i].dir, cases[i].want, (int)r, err);
        afm_adapter_free(ad);
        ad = NULL;
    }
    CHECK(afm_adapter_load(m, "tests/fuzz/corpus/fmadapter/valid_rank2", NULL, &ad, err, sizeof err) == AFM_OK, "valid package loads: %s", err);
    afm_adapter_free(ad);
    ad = NULL;
    CHECK(afm_adapter_load(m, "tests/fuzz/corpus/fmadapter/signature_mismatch", NULL, &ad, err, sizeof err) == AFM_OK, "an unsigned model accepts any signature: %s", err);
    afm_adapter_free(ad);
    ad = NULL;
    /* the same model with Apple's base signature refuses the mismatching package */
    bytes = read_file("tests/vectors/toolkit.afm", &size);
    memcpy(bytes + 128 + 72, "9799725ff8e851184037110b422d891ad3b92ec1", 40);
    CHECK(afm_model_load_memory(bytes, size, NULL, &signed_m, err, sizeof err) == AFM_OK, "signed model: %s", err);
    CHECK(afm_adapter_load(signed_m, "tests/fuzz/corpus/fmadapter/signature_mismatch", NULL, &ad, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "base model"),
          "signature mismatch refused: %s", err);
    CHECK(afm_adapter_load(signed_m, "tests/fuzz/corpus/fmadapter/valid_rank2", NULL, &ad, err, sizeof err) == AFM_OK, "matching signature accepted: %s", err);
    afm_adapter_free(ad);
    afm_model_free(signed_m);
    free(bytes);
    afm_model_free(m);
}

/* ---- quantized weights ---- */

/* A Q2B/Q4 model against an F32 model holding its decoded weights (decoded by tools/quant.py):
   the only difference left is the int8 quantization of activations inside the kernels. */
static double quant_vs_deq(int f32_activations, const char **kname) {
    afm_model *q = load("tests/vectors/quant_q2b.afm"), *f = load("tests/vectors/quant_deq.afm");
    afm_session *sq, *sf;
    afm_session_params p;
    int32_t toks[48];
    int i, V, n = 48;
    double worst = 0, ref_max = 0;
    if (!q || !f) return INFINITY;
    V = afm_model_config(q)->vocab_size;
    for (i = 0; i < n; i++) toks[i] = (int32_t)((i * 37 + 11) % V);
    memset(&p, 0, sizeof p);
    p.n_threads = 2;
    p.all_logits = 1;
    p.f32_activations = f32_activations;
    afm_session_create(q, &p, &sq);
    sf = session(f, 2, 1, 0);
    afm_session_eval(sq, toks, n);
    afm_session_eval(sf, toks, n);
    for (i = 0; i < n; i++) {
        const float *a = afm_session_logits(sq, i), *b = afm_session_logits(sf, i);
        int v;
        for (v = 0; v < V; v++) {
            double d = fabs((double)a[v] - b[v]);
            if (!(d <= worst)) worst = d;
            if (fabs(b[v]) > ref_max) ref_max = fabs(b[v]);
        }
    }
    *kname = sq->kern.name;
    afm_session_free(sq);
    afm_session_free(sf);
    afm_model_free(q);
    afm_model_free(f);
    return worst / ref_max;
}

/* A Q2B/Q4 model against an F32 model holding its decoded weights (decoded by tools/quant.py).
   With f32 activations the two must agree to float rounding; with the default int8 activation
   blocks the difference is the activations' quantization, which is reported and bounded. */
static void test_quantized(void) {
    const char *kname = "";
    double exact = quant_vs_deq(1, &kname), fast = quant_vs_deq(0, &kname);
    CHECK(exact <= 1e-3, "Q2B/Q4 with f32 activations vs F32 on the decoded weights: %.3g of max |logit| > 1e-3", exact);
    CHECK(fast <= 0.1, "Q2B/Q4 with int8 activations vs F32 on the decoded weights: %.3g of max |logit| > 0.1", fast);
    printf("  Q2B/Q4 vs F32 on the decoded weights (max |dlogit| / max |logit|): %.2g with f32 activations (limit 1e-3), %.2g with int8 activations (kernels %s)\n",
           exact, fast, kname);
}

/* ---- exact parity of the shipped miniature family (models/mini, docs/TRAINING.md) ---- */

/* A top-k reference written by tests/gen/gen_ref.py --mini: MLX's logits on the files' decoded weights,
   every row's k largest (ids and values) and a few rows in full. The tokens were chosen so that no
   int8 K/V value lies within 1e-3 of a rounding boundary (margin) and every row's top-1 / top-2 gap
   is at least 0.25 of its std (gap), so float noise cannot change the reference's rounding or argmax. */
typedef struct topk_ref {
    int n_prompt, n_decode, vocab, k, n_full;
    float std, margin, gap;
    int32_t *tokens, *full_rows, *ids; /* ids: [n][k] */
    float *vals, *full;                /* vals: [n][k], full: [n_full][vocab] */
} topk_ref;

static int load_topk(const char *path, topk_ref *r) {
    size_t size, n, i, o;
    uint32_t h[6];
    unsigned char *p = read_file(path, &size);
    memset(r, 0, sizeof *r);
    if (!p) return 0;
    if (size < 48 || memcmp(p, "AFMTOPK1", 8)) { free(p); return 0; }
    memcpy(h, p + 8, sizeof h);
    memcpy(&r->std, p + 32, 4);
    memcpy(&r->margin, p + 36, 4);
    memcpy(&r->gap, p + 40, 4);
    if (h[0] < 1 || h[0] > 4096 || h[1] > 4096 || h[2] < 2 || h[2] > (1u << 20) || h[3] < 1 || h[3] > h[2] || h[4] > h[0] + h[1]) { free(p); return 0; }
    r->n_prompt = (int)h[0]; r->n_decode = (int)h[1]; r->vocab = (int)h[2]; r->k = (int)h[3]; r->n_full = (int)h[4];
    n = (size_t)(r->n_prompt + r->n_decode);
    if (size != 48 + 4 * (n + (size_t)r->n_full) + n * (size_t)r->k * 8 + (size_t)r->n_full * (size_t)r->vocab * 4) { free(p); return 0; }
    r->tokens = (int32_t *)malloc(n * 4);
    r->full_rows = (int32_t *)malloc((size_t)r->n_full * 4 + 4);
    r->ids = (int32_t *)malloc(n * (size_t)r->k * 4);
    r->vals = (float *)malloc(n * (size_t)r->k * 4);
    r->full = (float *)malloc((size_t)r->n_full * (size_t)r->vocab * 4 + 4);
    memcpy(r->tokens, p + 48, n * 4);
    memcpy(r->full_rows, p + 48 + n * 4, (size_t)r->n_full * 4);
    o = 48 + 4 * (n + (size_t)r->n_full);
    for (i = 0; i < n; i++, o += (size_t)r->k * 8) {
        memcpy(r->ids + i * (size_t)r->k, p + o, (size_t)r->k * 4);
        memcpy(r->vals + i * (size_t)r->k, p + o + (size_t)r->k * 4, (size_t)r->k * 4);
    }
    memcpy(r->full, p + o, (size_t)r->n_full * (size_t)r->vocab * 4);
    free(p);
    for (i = 0; i < n * (size_t)r->k; i++) if (r->ids[i] < 0 || r->ids[i] >= r->vocab) return 0;
    for (i = 0; i < (size_t)r->n_full; i++) if (r->full_rows[i] < 0 || (size_t)r->full_rows[i] >= n) return 0;
    return 1;
}

static void free_topk(topk_ref *r) { free(r->tokens); free(r->full_rows); free(r->ids); free(r->vals); free(r->full); }

/* Prefill of n_prompt tokens in one eval (logits of every position), then one token at a time.
   Returns max |dlogit| over every row's stored top-k and the full rows (INFINITY on an error) and
   counts the rows whose argmax over the whole vocabulary is not the reference's top-1. */
static double topk_run(afm_model *m, const afm_adapter *ad, const topk_ref *r, int f32_activations, int *argmax_bad) {
    afm_session *s = NULL;
    afm_session_params p;
    int i, j, n = r->n_prompt + r->n_decode;
    double worst = 0;
    memset(&p, 0, sizeof p);
    p.n_threads = 2;
    p.all_logits = 1;
    p.f32_activations = f32_activations;
    *argmax_bad = n;
    if (afm_session_create(m, &p, &s) != AFM_OK) return INFINITY;
    if ((ad && afm_session_set_adapter(s, ad) != AFM_OK) || afm_session_eval(s, r->tokens, r->n_prompt) != AFM_OK) {
        afm_session_free(s);
        return INFINITY;
    }
    *argmax_bad = 0;
    for (i = 0; i < n; i++) {
        const float *l;
        const int32_t *ids = r->ids + (size_t)i * r->k;
        const float *vals = r->vals + (size_t)i * r->k;
        int best = 0;
        if (i >= r->n_prompt && afm_session_eval(s, &r->tokens[i], 1) != AFM_OK) { worst = INFINITY; break; }
        l = afm_session_logits(s, i < r->n_prompt ? i : 0);
        for (j = 0; j < r->k; j++) {
            double d = fabs((double)l[ids[j]] - vals[j]);
            if (!(d <= worst)) worst = d;
        }
        for (j = 0; j < r->n_full; j++)
            if (r->full_rows[j] == i) {
                double d = max_abs_diff(l, r->full + (size_t)j * r->vocab, r->vocab);
                if (!(d <= worst)) worst = d;
            }
        for (j = 1; j < r->vocab; j++) if (l[j] > l[best]) best = j;
        *argmax_bad += best != ids[0];
    }
    afm_session_free(s);
    return worst;
}

/* The shipped Q2B / Q4 files against MLX on their decoded weights: with f32 activations the engine
   computes exactly those weights (max |dlogit| <= 1e-4 x std); with the default int8 activation
   blocks the logits move by a few percent of their std, and the greedy argmax must still agree. */
static void test_mini_parity(const char *refname, const char *model, const char *adapter) {
    char rpath[256], err[512];
    topk_ref r;
    afm_model *m;
    afm_adapter *ad = NULL;
    double exact, fast;
    int bad_exact, bad_fast, n;
    snprintf(rpath, sizeof rpath, "tests/vectors/%s.topk", refname);
    if (!load_topk(rpath, &r)) { CHECK(0, "%s: cannot read reference %s", refname, rpath); free_topk(&r); return; }
    n = r.n_prompt + r.n_decode;
    CHECK(r.margin > 1e-3f && r.gap > 0.25f, "%s: reference margins %g (K/V) and %g (top-2 gap)", refname, (double)r.margin, (double)r.gap);
    m = load(model);
    CHECK(m != NULL, "%s: model %s loads", refname, model);
    if (!m) { free_topk(&r); return; }
    CHECK(afm_model_config(m)->vocab_size == r.vocab, "%s: vocab matches reference", refname);
    if (adapter) {
        afm_result res = afm_adapter_load(m, adapter, NULL, &ad, err, sizeof err);
        CHECK(res == AFM_OK, "%s: adapter %s loads: %s", refname, adapter, err);
        if (res != AFM_OK) { afm_model_free(m); free_topk(&r); return; }
    }
    exact = topk_run(m, ad, &r, 1, &bad_exact);
    fast = topk_run(m, ad, &r, 0, &bad_fast);
    CHECK(exact <= 1e-4 * r.std, "%s, f32 activations: max |dlogit| %.3g > 1e-4 x std %.3g", refname, exact, (double)r.std);
    CHECK(bad_exact == 0, "%s, f32 activations: argmax differs at %d of %d positions", refname, bad_exact, n);
    CHECK(bad_fast == 0, "%s, int8 activations: argmax differs at %d of %d positions", refname, bad_fast, n);
    CHECK(fast <= 0.25 * r.std, "%s, int8 activations: max |dlogit| %.3g > 0.25 x std %.3g", refname, fast, (double)r.std);
    printf("  parity %-10s (%d + %d tokens): f32 activations max |dlogit| %.3g = %.2g x std (limit 1e-4); "
           "int8 activations %.2g x std, argmax agrees at %d/%d positions\n",
           refname, r.n_prompt, r.n_decode, exact, exact / r.std, fast / r.std, n - bad_fast, n);
    afm_adapter_free(ad);
    afm_model_free(m);
    free_topk(&r);
}

/* Token-for-token batch invariance on any model: one pass over n tokens vs chunks of 7 then
   single tokens gives the same logits bit for bit (speculative verification relies on it). */
static void test_batch_invariance(const char *name) {
    char path[256];
    afm_model *m;
    afm_session *full, *inc;
    int32_t toks[40];
    int i, V, same = 1, n = 40;
    snprintf(path, sizeof path, "tests/vectors/%s.afm", name);
    if (!(m = load(path))) { CHECK(0, "load %s", name); return; }
    V = afm_model_config(m)->vocab_size;
    for (i = 0; i < n; i++) toks[i] = (int32_t)((i * 53 + 7) % V);
    full = session(m, 2, 1, 0);
    inc = session(m, 1, 0, 7);
    afm_session_eval(full, toks, n);
    afm_session_eval(inc, toks, 30);
    same &= !memcmp(afm_session_logits(inc, -1), afm_session_logits(full, 29), (size_t)V * 4);
    for (i = 30; i < n; i++) {
        afm_session_eval(inc, &toks[i], 1);
        same &= !memcmp(afm_session_logits(inc, -1), afm_session_logits(full, i), (size_t)V * 4);
    }
    CHECK(same, "%s: chunked and single-token evaluation equal one full pass bit for bit", name);
    afm_session_free(full);
    afm_session_free(inc);
    afm_model_free(m);
}

/* Thread-count invariance: a prompt in one pass (every position's logits) then single tokens give
   the same bits at 3, 8 and 17 threads as at 1 (17: more threads than the products have first
   chunks), and also when odd threads leave their first chunk of every product to the others, as a
   thread that starts late does (the chunks no thread claimed must still be computed, once). */
static void test_thread_invariance(const char *name) {
    static const int threads[] = { 3, 8, 17, 8, 5 }; /* the last two: odd threads late */
    char path[256];
    afm_model *m;
    afm_session *ref, *s;
    int32_t toks[28];
    int i, k, V, n = 28, n_prompt = 24;
    float *want;
    snprintf(path, sizeof path, "tests/vectors/%s.afm", name);
    if (!(m = load(path))) { CHECK(0, "load %s", name); return; }
    V = afm_model_config(m)->vocab_size;
    for (i = 0; i < n; i++) toks[i] = (int32_t)((i * 31 + 5) % V);
    want = (float *)malloc((size_t)n * V * 4);
    ref = session(m, 1, 1, 0);
    CHECK(ref && want, "%s: 1-thread session", name);
    if (!ref || !want) { free(want); afm_model_free(m); return; }
    afm_session_eval(ref, toks, n_prompt);
    memcpy(want, afm_session_logits(ref, 0), (size_t)n_prompt * V * 4);
    for (i = n_prompt; i < n; i++) {
        afm_session_eval(ref, &toks[i], 1);
        memcpy(want + (size_t)i * V, afm_session_logits(ref, 0), (size_t)V * 4);
    }
    for (k = 0; k < (int)(sizeof threads / sizeof threads[0]); k++) {
        int same = 1, late = k >= 3;
        s = session(m, threads[k], 1, 0);
        if (!s) { CHECK(0, "%s: %d-thread session", name, threads[k]); continue; }
        s->test_late_threads = late;
        CHECK(afm_session_eval(s, toks, n_prompt) == AFM_OK, "%s: prompt at %d threads", name, threads[k]);
        same &= !memcmp(afm_session_logits(s, 0), want, (size_t)n_prompt * V * 4);
        for (i = n_prompt; i < n; i++) {
            afm_session_eval(s, &toks[i], 1);
            same &= !memcmp(afm_session_logits(s, 0), want + (size_t)i * V, (size_t)V * 4);
        }
        CHECK(same, "%s: %d threads%s give the 1-thread logits bit for bit", name, threads[k], late ? " (odd threads late)" : "");
        afm_session_free(s);
    }
    afm_session_free(ref);
    free(want);
    afm_model_free(m);
}

int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : NULL;
    static const char *const parity_models[] = { "afm_mini", "draft_mini", "odd_mini", "toolkit" };
    size_t i;
    for (i = 0; i < sizeof parity_models / sizeof parity_models[0]; i++) {
        if (only && strcmp(only, parity_models[i])) continue;
        test_parity(parity_models[i], 1);
        test_parity(parity_models[i], 2);
        test_incremental_and_rewind(parity_models[i]);
    }
    if (only) { /* `test_main NAME`: just that model's parity, for quick checks on one platform */
        printf("%d passed, %d failed\n", n_pass, n_fail);
        return n_fail != 0;
    }
    test_parity_with("toolkit", "toolkit_lora", "embedded", 2);
    test_parity_with("toolkit", "lora/adapter", "tests/vectors/lora/adapter.afma", 2);
    test_parity_with("toolkit", "lora/adapter", "tests/vectors/lora/test.fmadapter", 1);
    test_parity_with("toolkit", "lora/adapter2", "tests/vectors/lora/adapter2.afma", 2);
    test_parity_with("toolkit", "lora/base_adapter", "tests/vectors/lora/base_adapter.afma", 1);
    test_adapter_sessions();
    test_fmadapter_hostile();
    test_quantized();
    if (!getenv("AFM_TEST_LIGHT")) /* light runs (sanitizers, qemu): the base is in mini_json too */
        test_mini_parity("mini_base", "models/mini/base.afm", NULL);
    test_mini_parity("mini_json", "models/mini/base.afm", "models/mini/json.afma");
    test_mini_parity("mini_draft", "models/mini/draft.afm", NULL);
    test_batch_invariance("quant_q2b");
    test_batch_invariance("quant_grid");
    test_thread_invariance("quant_q2b");
    test_thread_invariance("afm_mini");
    test_speculative_greedy("quant_q2b", "draft_mini", 0);
    test_hostile("afm_mini");
    test_sessions("afm_mini");
    test_sampler();
    test_speculative_greedy("afm_mini", "draft_mini", 0);
    test_speculative_greedy("toolkit", "draft_mini", 1);
    test_speculative_distribution();
    test_choose_k_expiry();
#ifndef _WIN32
    test_concurrent("afm_mini");
#endif
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
