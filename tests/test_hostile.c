/* Regression tests for the defects that hostile testing of the generation layer and the loaders
   found (issue 12); each test is named after its defect. Run from the repository root; ends with
   "N passed, N failed" and exits non-zero on any failure.
   cc -std=c99 -O2 tests/test_hostile.c -o build/test_hostile -lm -lpthread && build/test_hostile */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* mkfifo, fork, alarm */
#endif
#define AFM_IMPLEMENTATION
#define AFM_HF_TOKENIZER
#include "../afm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifndef _WIN32
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

static int n_pass, n_fail;
#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (cond) n_pass++;                                     \
        else {                                                  \
            n_fail++;                                           \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
        }                                                       \
    } while (0)

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
    if (p) p[n] = 0;
    *size = (size_t)n;
    return p;
}

static afm_model *load(const char *path) {
    afm_model *m = NULL;
    char err[256];
    if (afm_model_load_file(path, NULL, &m, err, sizeof err) != AFM_OK) printf("cannot load %s: %s\n", path, err);
    return m;
}

typedef struct collect { int32_t toks[256]; int n; } collect;
static int collect_token(void *u, int32_t t) {
    collect *c = (collect *)u;
    if (c->n < 256) c->toks[c->n] = t;
    c->n++;
    return 0;
}

/* ---- sampler ---- */

static void test_sampler_no_survivor_tiny_temperature(void) {
    float lg[8] = { 0.1f, 0.2f, 3.0f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f };
    afm_sampler_params p;
    afm_sampler *sm;
    int i, ok = 1;
    memset(&p, 0, sizeof p);
    p.temperature = 1e-40f; /* 1/T overflows: (x - max) * inf was NaN for the max, so nothing survived */
    CHECK(afm_sampler_create(&p, 8, NULL, &sm) == AFM_OK, "create");
    for (i = 0; i < 20; i++) ok &= afm_sampler_sample(sm, lg) == 2;
    CHECK(ok, "temperature 1e-40 picks the argmax (was token 0)");
    lg[5] = 3.0f; /* a tie at the top: both stay candidates */
    for (i = 0, ok = 1; i < 50; i++) { int32_t t = afm_sampler_sample(sm, lg); ok &= t == 2 || t == 5; }
    CHECK(ok, "temperature 1e-40 with a tie picks one of the tied");
    afm_sampler_free(sm);
    p.temperature = INFINITY;
    CHECK(afm_sampler_create(&p, 8, NULL, &sm) == AFM_ERR_ARG, "an infinite temperature is refused");
}

static void test_sampler_nonfinite_logits(void) {
    float lg[8] = { 0.1f, 0.2f, 3.0f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f }, l2[8];
    afm_sampler_params p;
    afm_sampler *sm, *greedy;
    int i;
    memset(&p, 0, sizeof p);
    afm_sampler_create(&p, 8, NULL, &greedy);
    p.temperature = 0.8f;
    afm_sampler_create(&p, 8, NULL, &sm);
    memcpy(l2, lg, sizeof l2); l2[5] = INFINITY;
    CHECK(afm_sampler_sample(sm, l2) == -1 && afm_sampler_sample(greedy, l2) == -1, "a +inf logit: -1 (was token 0)");
    memcpy(l2, lg, sizeof l2); l2[0] = NAN;
    CHECK(afm_sampler_sample(sm, l2) == -1, "a NaN logit at index 0: -1 (was token 0)");
    CHECK(afm_sampler_sample(greedy, l2) == -1, "greedy with a NaN at index 0: -1 (picked the NaN)");
    for (i = 0; i < 8; i++) l2[i] = -INFINITY;
    CHECK(afm_sampler_sample(sm, l2) == -1 && afm_sampler_sample(greedy, l2) == -1, "all -inf: -1");
    l2[6] = -3e38f;
    CHECK(afm_sampler_sample(sm, l2) == 6 && afm_sampler_sample(greedy, l2) == 6, "one finite logit among -inf: that one");
    CHECK(afm_sampler_sample(sm, NULL) == -1, "no logits: -1");
    afm_sampler_free(sm);
    afm_sampler_free(greedy);
}

static void test_generate_nan_logits_numeric_error(void) {
    afm_model *m = load("tests/vectors/hostile/sampler_nan_logits.afm");
    afm_session *s;
    afm_generate_params gp;
    afm_generate_stats st;
    collect c;
    int32_t prompt[2] = { 1, 2 };
    afm_result r;
    int greedy;
    if (!m) { CHECK(0, "load"); return; }
    for (greedy = 0; greedy < 2; greedy++) {
        afm_session_create(m, NULL, &s);
        memset(&gp, 0, sizeof gp);
        gp.n_predict = 6;
        gp.sampler.temperature = greedy ? 0.0f : 0.8f;
        gp.on_token = collect_token;
        gp.user = &c;
        c.n = 0;
        r = afm_generate(s, prompt, 2, &gp, &st);
        CHECK(r == AFM_ERR_NUMERIC && c.n == 0 && strstr(afm_session_error(s), "position 1"),
              "%s: NaN logits are AFM_ERR_NUMERIC naming the position, no token (was 0 0 0 0 0 0): %s, %d tokens, '%s'",
              greedy ? "greedy" : "sampled", afm_result_string(r), c.n, afm_session_error(s));
        afm_session_free(s);
    }
    afm_model_free(m);
}

/* ---- generation ---- */

static int overclaiming_drafter(void *u, const int32_t *ctx, int n, int k, int32_t *draft) {
    int i;
    (void)u; (void)ctx; (void)n;
    for (i = 0; i < k; i++) draft[i] = 100 + i;
    return 40; /* more than the k asked for */
}

static void test_drafter_overrun(void) {
    afm_model *m = load("models/mini/base.afm");
    afm_session *s;
    afm_generate_params gp;
    collect plain, drafted;
    int32_t t[4] = { 3, 100, 200, 300 };
    afm_result r1, r2;
    if (!m) { CHECK(0, "load"); return; }
    afm_session_create(m, NULL, &s);
    memset(&gp, 0, sizeof gp);
    gp.n_predict = 10;
    gp.on_token = collect_token;
    gp.user = &plain;
    plain.n = drafted.n = 0;
    r1 = afm_generate(s, t, 4, &gp, NULL);
    afm_session_rewind(s, 0);
    gp.user = &drafted;
    gp.draft_fn = overclaiming_drafter;
    gp.fixed_k = 1;
    gp.draft_k = 4;
    r2 = afm_generate(s, t, 4, &gp, NULL);
    CHECK(r1 == AFM_OK && r2 == AFM_OK && plain.n == 10 && drafted.n == 10 && !memcmp(plain.toks, drafted.toks, 40),
          "a drafter claiming 40 of 4 tokens is clamped (was a stack overflow) and the output is the base's");
    gp.draft_k = 40; /* above the most, 16 */
    drafted.n = 0;
    afm_session_rewind(s, 0);
    r2 = afm_generate(s, t, 4, &gp, NULL);
    CHECK(r2 == AFM_OK && drafted.n == 10 && !memcmp(plain.toks, drafted.toks, 40), "draft_k 40 is clamped to 16");
    afm_session_free(s);
    afm_model_free(m);
}

#ifndef _WIN32
static volatile int spin_stop;
static void *spin(void *a) {
    volatile double x = 1;
    (void)a;
    while (!spin_stop) x = x * 1.0000001 + 1e-9;
    return NULL;
}
#endif

static int fixed_drafter(void *u, const int32_t *ctx, int n, int k, int32_t *draft) {
    int i;
    (void)u;
    for (i = 0; i < k; i++) draft[i] = ctx[(n - 1 + i) % n]; /* some right, mostly wrong */
    return k;
}

/* Seeded sampling gives the same text with and without drafters, for any K, thread count and load
   (the adaptive K came from wall-clock timings and changed how many random numbers were drawn). */
static void test_seeded_sampling_reproducible_with_drafters(void) {
    afm_model *m = load("models/mini/base.afm"), *dm = load("models/mini/draft.afm");
    afm_tokenizer *tok = NULL;
    const char *text = "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
                       "and darkness was upon the face of the deep. In the beginning God created the heaven and the earth. And";
    int32_t prompt[256];
    size_t n = 0;
    collect ref, c;
    int cfg, same = 1, n_cfg = 0, drafted = 0, greedy;
    char err[256];
    if (!m || !dm || afm_model_tokenizer(m, NULL, &tok, err, sizeof err) != AFM_OK) { CHECK(0, "load"); return; }
    afm_tokenize(tok, text, strlen(text), AFM_TOK_AFM, prompt + 1, 250, &n);
    prompt[0] = 3;
    for (greedy = 0; greedy < 2; greedy++) {
        same = 1;
        n_cfg = 0;
        for (cfg = 0; cfg < 12; cfg++) {
            afm_session *s, *ds = NULL;
            afm_session_params sp;
            afm_generate_params gp;
            afm_generate_stats st;
            afm_result r;
#ifndef _WIN32
            pthread_t th;
            int loaded = cfg % 3 == 2;
#endif
            memset(&sp, 0, sizeof sp);
            sp.n_ctx = 512;
            sp.n_threads = 1 + (cfg & 1);
            sp.n_batch = cfg % 4 == 3 ? 7 : 0;
            afm_session_create(m, &sp, &s);
            memset(&gp, 0, sizeof gp);
            gp.n_predict = 48;
            gp.sampler.temperature = greedy ? 0.0f : 0.8f;
            gp.sampler.top_p = cfg == 5 ? 0.9f : 0.0f;
            gp.sampler.seed = 42;
            gp.on_token = collect_token;
            gp.user = &c;
            switch (cfg / 2) {
            case 0: break;                                  /* plain */
            case 1: gp.lookup = 1; break;                   /* prompt lookup, adaptive K */
            case 2: afm_session_create(dm, &sp, &ds); gp.draft = ds; break;
            case 3: afm_session_create(dm, &sp, &ds); gp.draft = ds; gp.fixed_k = 1; gp.draft_k = 1 + cfg % 16; break;
            case 4: gp.lookup = 1; gp.fixed_k = 1; gp.draft_k = 16; break;
            default: gp.draft_fn = fixed_drafter; gp.fixed_k = cfg & 1; gp.draft_k = 3; break;
            }
            if (cfg == 5) gp.sampler.top_p = 0.9f;
            c.n = 0;
#ifndef _WIN32
            spin_stop = 0;
            if (loaded) pthread_create(&th, NULL, spin, NULL);
#endif
            r = afm_generate(s, prompt, (int)n + 1, &gp, &st);
#ifndef _WIN32
            if (loaded) { spin_stop = 1; pthread_join(th, NULL); }
#endif
            drafted += st.n_drafted;
            if (cfg == 0) ref = c;
            else if (cfg != 5) same &= r == AFM_OK && c.n == ref.n && !memcmp(c.toks, ref.toks, (size_t)c.n * 4);
            n_cfg++;
            afm_session_free(ds);
            afm_session_free(s);
        }
        CHECK(same && drafted > 0, "%s: the same text from %d runs with no drafter, lookup, a draft model and a custom drafter, "
              "adaptive and fixed K 1..16, 1 and 2 threads, -b 7 and 256, idle and loaded (%d tokens drafted)",
              greedy ? "greedy" : "seed 42, temperature 0.8", n_cfg - 1, drafted);
    }
    afm_tokenizer_free(tok);
    afm_model_free(dm);
    afm_model_free(m);
}

/* At the context limit afm_generate returned OK while the last emitted token was not in the cache. */
static void test_ctxend_every_emitted_token_cached(void) {
    afm_model *m = load("models/mini/base.afm"), *dm = load("models/mini/draft.afm");
    int32_t prompt[16] = { 3, 100, 200, 300, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };
    int drafter, ok = 1;
    if (!m || !dm) { CHECK(0, "load"); return; }
    for (drafter = 0; drafter < 3; drafter++) {
        afm_session *s, *ds = NULL;
        afm_session_params sp;
        afm_generate_params gp;
        afm_generate_stats st;
        collect c;
        const int32_t *toks;
        int n, i;
        afm_result r;
        memset(&sp, 0, sizeof sp);
        sp.n_ctx = 16;
        afm_session_create(m, &sp, &s);
        memset(&gp, 0, sizeof gp);
        gp.n_predict = 50;
        gp.on_token = collect_token;
        gp.user = &c;
        gp.lookup = drafter == 1;
        if (drafter == 2) { afm_session_create(dm, &sp, &ds); gp.draft = ds; gp.fixed_k = 1; gp.draft_k = 5; }
        c.n = 0;
        r = afm_generate(s, prompt, 4, &gp, &st);
        toks = afm_session_tokens(s, &n);
        for (i = 0; i < c.n && i + 4 < n; i++) ok &= toks[4 + i] == c.toks[i];
        CHECK(r == AFM_ERR_CONTEXT_FULL && st.stop == AFM_STOP_CONTEXT_FULL && n == 16 && 4 + c.n == n && ok,
              "drafter %d: a full context is AFM_ERR_CONTEXT_FULL and every emitted token is cached: %s, stop %d, prompt 4 + emitted %d, cache %d",
              drafter, afm_result_string(r), (int)st.stop, c.n, n);
        /* exactly filling the context is no error */
        afm_session_rewind(s, 0);
        gp.n_predict = 12;
        c.n = 0;
        r = afm_generate(s, prompt, 4, &gp, &st);
        CHECK(r == AFM_OK && st.stop == AFM_STOP_N_PREDICT && c.n == 12 && afm_session_pos(s) == 16,
              "drafter %d: 4 + 12 tokens fill n_ctx 16 exactly: %s, %d tokens, pos %d", drafter, afm_result_string(r), c.n, afm_session_pos(s));
        /* a prompt that fills the context leaves no room for a token */
        afm_session_rewind(s, 0);
        c.n = 0;
        r = afm_generate(s, prompt, 16, &gp, &st);
        CHECK(r == AFM_ERR_CONTEXT_FULL && c.n == 0 && afm_session_pos(s) == 16, "drafter %d: a full prompt: no token, context full (%s)",
              drafter, afm_result_string(r));
        afm_session_free(ds);
        afm_session_free(s);
    }
    afm_model_free(dm);
    afm_model_free(m);
}

/* ---- files ---- */

#ifndef _WIN32
static void on_alarm(int sig) {
    (void)sig;
    printf("FAIL: opening a FIFO hung\n");
    exit(1);
}

static void test_fifo_refused_before_open(void) {
    const char *fifo = "build/test_hostile.fifo", *pkg = "build/test_hostile_fifo.fmadapter";
    afm_model *m = NULL, *base = load("tests/vectors/toolkit.afm");
    afm_adapter *ad = NULL;
    afm_load_params lp;
    char err[256], path[256];
    int no_mmap;
    remove(fifo);
    if (mkfifo(fifo, 0600) != 0 || !base) { CHECK(0, "mkfifo / load"); return; }
    signal(SIGALRM, on_alarm);
    alarm(20);
    memset(&lp, 0, sizeof lp);
    for (no_mmap = 0; no_mmap < 2; no_mmap++) {
        lp.no_mmap = no_mmap;
        CHECK(afm_model_load_file(fifo, &lp, &m, err, sizeof err) == AFM_ERR_IO && strstr(err, "not a regular file"),
              "model from a FIFO (%s): refused at once (hung with mmap): %s", no_mmap ? "no mmap" : "mmap", err);
        CHECK(afm_adapter_load(base, fifo, &lp, &ad, err, sizeof err) == AFM_ERR_IO && strstr(err, "not a regular file"),
              "adapter from a FIFO (%s): refused: %s", no_mmap ? "no mmap" : "mmap", err);
    }
    mkdir(pkg, 0700);
    snprintf(path, sizeof path, "%s/metadata.json", pkg);
    {
        size_t n;
        unsigned char *meta = read_file("tests/vectors/lora/test.fmadapter/metadata.json", &n);
        FILE *f = fopen(path, "wb");
        if (f && meta) fwrite(meta, 1, n, f);
        if (f) fclose(f);
        free(meta);
    }
    snprintf(path, sizeof path, "%s/adapter_weights.bin", pkg);
    remove(path);
    mkfifo(path, 0600);
    lp.no_mmap = 0;
    CHECK(afm_adapter_load(base, pkg, &lp, &ad, err, sizeof err) == AFM_ERR_IO && strstr(err, "not a regular file"),
          ".fmadapter whose adapter_weights.bin is a FIFO: refused: %s", err);
    alarm(0);
    remove(path);
    snprintf(path, sizeof path, "%s/metadata.json", pkg);
    remove(path);
    rmdir(pkg);
    remove(fifo);
    afm_model_free(base);
}
#endif

/* Appends one piece of `len` bytes to a SentencePiece ModelProto (a repeated field: protobuf merges
   what comes after). Varints are written in 5 bytes (valid, if not the shortest form). */
static unsigned char *varint5(unsigned char *p, size_t v) {
    int i;
    for (i = 0; i < 4; i++) *p++ = (unsigned char)(((v >> (7 * i)) & 0x7f) | 0x80);
    *p++ = (unsigned char)((v >> 28) & 0x7f);
    return p;
}
static unsigned char *spm_with_long_piece(const unsigned char *proto, size_t n, size_t len, size_t *out_n) {
    unsigned char *o = (unsigned char *)malloc(n + len + 64), *p;
    memcpy(o, proto, n);
    p = o + n;
    *p++ = 0x0A; /* field 1 (pieces), length-delimited */
    p = varint5(p, 1 + 5 + len + 5 + 2);
    *p++ = 0x0A; /* piece */
    p = varint5(p, len);
    memset(p, 'a', len);
    p += len;
    *p++ = 0x15; /* score, f32 0 */
    memset(p, 0, 4);
    p += 4;
    *p++ = 0x18; /* type NORMAL */
    *p++ = 1;
    *out_n = (size_t)(p - o);
    return o;
}

static double now_s(void) { return afm__now(); }

/* Loading a SentencePiece model was quadratic in a piece's length (400 KB: 29.5 s). */
static void test_spm_piece_load_linear(void) {
    size_t n, m;
    unsigned char *base = read_file("tests/vectors/tok_afm1k_id.model", &n), *big;
    afm_tokenizer *t = NULL;
    char err[256];
    double t0, dt;
    afm_result r;
    size_t len;
    if (!base) { CHECK(0, "read"); return; }
    for (len = 400000; len <= 1000000; len += 600000) {
        big = spm_with_long_piece(base, n, len, &m);
        t0 = now_s();
        r = afm_tokenizer_load(big, m, AFM_TOKENIZER_SENTENCEPIECE, NULL, &t, err, sizeof err);
        dt = now_s() - t0;
        CHECK(r == AFM_OK && dt < 0.5 && afm_tokenizer_n_vocab(t) == 1001, "a %lu-byte piece loads in %.3f s (was 29.5 s at 400 KB): %s, %d pieces",
              (unsigned long)len, dt, r == AFM_OK ? "ok" : err, r == AFM_OK ? afm_tokenizer_n_vocab(t) : 0);
        afm_tokenizer_free(t);
        free(big);
    }
    free(base);
}

/* afm.h read the first of two equal keys, tools/adapterfile.py (Python's json) the last. */
static void test_json_duplicate_keys_refused(void) {
    afm_model *m = load("tests/vectors/toolkit.afm");
    size_t nm, nw, k;
    unsigned char *meta = read_file("tests/vectors/lora/test.fmadapter/metadata.json", &nm);
    unsigned char *w = read_file("tests/vectors/lora/test.fmadapter/adapter_weights.bin", &nw);
    static const char *const extra[3] = { ", \"loraRank\": 16}", ", \"adapterIdentifier\": \"x\"}", ", \"lora\\u0052ank\": 32}" };
    char buf[1024], err[256];
    afm_adapter *ad = NULL;
    afm_tokenizer *t = NULL;
    const char *tj = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"a\": 2}, \"merges\": []}}";
    if (!m || !meta || !w) { CHECK(0, "load"); return; }
    CHECK(afm_adapter_load_fmadapter_memory(m, (const char *)meta, nm, w, nw, &ad, err, sizeof err) == AFM_OK, "the package loads: %s", err);
    afm_adapter_free(ad);
    for (k = 0; k < 3; k++) {
        char *end = strrchr((char *)meta, '}');
        size_t head = (size_t)(end - (char *)meta);
        memcpy(buf, meta, head);
        strcpy(buf + head, extra[k]);
        ad = NULL;
        CHECK(afm_adapter_load_fmadapter_memory(m, buf, strlen(buf), w, nw, &ad, err, sizeof err) == AFM_ERR_FORMAT && !ad &&
                  strstr(err, "twice"),
              "metadata.json with a key twice (%s) is refused: %s", extra[k], err);
    }
    CHECK(afm_tokenizer_load(tj, strlen(tj), AFM_TOKENIZER_HF_JSON, NULL, &t, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "twice"),
          "tokenizer.json with a vocab key twice is refused: %s", err);
    free(meta);
    free(w);
    afm_model_free(m);
}

/* An .afma signature whose byte 0 is NUL and bytes 1..39 garbage was accepted (the model loader
   refuses the same); alpha 9e29 was accepted and made every logit non-finite. */
static void test_afma_signature_and_alpha(void) {
    afm_model *m = load("models/mini/base.afm");
    size_t n;
    unsigned char *a = read_file("models/mini/json.afma", &n), *b;
    afm_adapter *ad = NULL;
    char err[256];
    float huge = 9e29f, ok_alpha = 16.0f;
    if (!m || !a) { CHECK(0, "load"); return; }
    b = (unsigned char *)malloc(n);
    memcpy(b, a, n);
    CHECK(afm_adapter_load_memory(m, b, n, &ad, err, sizeof err) == AFM_OK, "json.afma loads: %s", err);
    afm_adapter_free(ad);
    memcpy(b + 128 + 49, "\x01\x02\x03\x04\x05", 5);
    CHECK(afm_adapter_load_memory(m, b, n, &ad, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "signature"),
          "signature NUL then garbage is refused: %s", err);
    memcpy(b, a, n);
    memcpy(b + 136, &huge, 4);
    CHECK(afm_adapter_load_memory(m, b, n, &ad, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "alpha"), "alpha 9e29 is refused: %s", err);
    memcpy(b + 136, &ok_alpha, 4);
    CHECK(afm_adapter_load_memory(m, b, n, &ad, err, sizeof err) == AFM_OK, "alpha 16 loads: %s", err);
    afm_adapter_free(ad);
    free(a);
    free(b);
    afm_model_free(m);
}

/* 64 trailing zero bytes were accepted after the last record, though the message says 63. */
static void test_fmadapter_trailing_64_bytes(void) {
    afm_model *m = load("tests/vectors/toolkit.afm");
    size_t nm, nw;
    unsigned char *meta = read_file("tests/vectors/lora/test.fmadapter/metadata.json", &nm);
    unsigned char *w = read_file("tests/vectors/lora/test.fmadapter/adapter_weights.bin", &nw), *w2;
    afm_adapter *ad = NULL;
    char err[256];
    if (!m || !meta || !w) { CHECK(0, "load"); return; }
    w2 = (unsigned char *)calloc(nw + 64, 1);
    memcpy(w2, w, nw);
    CHECK(afm_adapter_load_fmadapter_memory(m, (const char *)meta, nm, w2, nw + 63, &ad, err, sizeof err) == AFM_OK,
          "63 bytes of padding are accepted: %s", err);
    afm_adapter_free(ad);
    ad = NULL;
    CHECK(afm_adapter_load_fmadapter_memory(m, (const char *)meta, nm, w2, nw + 64, &ad, err, sizeof err) == AFM_ERR_FORMAT &&
              strstr(err, "at most 63"),
          "64 bytes are refused: %s", err);
    free(meta);
    free(w);
    free(w2);
    afm_model_free(m);
}

/* A 4 KB tokenizer.json with one id of 2^24-1 took 870 MB. */
static size_t g_peak, g_now;
static void *count_alloc(void *u, size_t n) {
    size_t *p = (size_t *)malloc(n + 16);
    (void)u;
    if (!p) return NULL;
    p[0] = n;
    g_now += n;
    if (g_now > g_peak) g_peak = g_now;
    return p + 2;
}
static void count_free(void *u, void *q) {
    (void)u;
    if (!q) return;
    g_now -= ((size_t *)q)[-2];
    free((size_t *)q - 2);
}
static void test_tokjson_huge_id_bounded(void) {
    size_t n;
    unsigned char *j = read_file("tests/vectors/hostile/tokjson_id_16777215.json", &n);
    afm_allocator a = { count_alloc, count_free, NULL };
    afm_tokenizer *t = NULL;
    char err[256];
    afm_result r;
    if (!j) { CHECK(0, "read"); return; }
    g_peak = g_now = 0;
    r = afm_tokenizer_load(j, n, AFM_TOKENIZER_HF_JSON, &a, &t, err, sizeof err);
    CHECK(r == AFM_ERR_FORMAT && strstr(err, "16777215") && g_peak < 64 * n + (1u << 20),
          "id 16777215 in a %lu-byte tokenizer.json is refused with at most %lu bytes allocated (was 870 MB): %s, %s",
          (unsigned long)n, (unsigned long)g_peak, afm_result_string(r), err);
    afm_tokenizer_free(t);
    free(j);
}

/* Freeing the model before its sessions was a silent use-after-free; the rule was not written.
   Each case runs in a child process: AFM_ASSERT aborts it. */
#if !defined(_WIN32) && !defined(NDEBUG)
static int child_status(int mode) {
    pid_t pid = fork();
    int status = 0;
    if (pid == 0) {
        afm_model *m = load("models/mini/base.afm");
        afm_adapter *ad = NULL;
        afm_session *s = NULL;
        char err[256];
        FILE *devnull = freopen("/dev/null", "w", stderr);
        (void)devnull;
        afm_session_create(m, NULL, &s);
        afm_adapter_load(m, "models/mini/json.afma", NULL, &ad, err, sizeof err);
        afm_session_set_adapter(s, ad);
        if (mode == 1) {
            afm_session_set_adapter(s, NULL); /* releases the adapter */
            afm_adapter_free(ad);
            afm_session_free(s);
            afm_model_free(m);
        } else if (mode == 2) {
            afm_adapter_free(ad); /* the session still uses it: must stop here */
        } else {
            afm_model_free(m); /* the session and the adapter still alive: must stop here */
        }
        _exit(0);
    }
    if (pid < 0) return -1;
    waitpid(pid, &status, 0);
    return status;
}
#endif

static void test_model_freed_before_session(void) {
#if !defined(_WIN32) && !defined(NDEBUG)
    int st = child_status(0);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT, "afm_model_free with a live session and adapter stops at AFM_ASSERT");
    st = child_status(2);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT, "afm_adapter_free while a session uses it stops at AFM_ASSERT");
    st = child_status(1);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "session, adapter and model freed in order (set_adapter(NULL) releases): no assertion");
#endif
}

int main(void) {
    test_sampler_no_survivor_tiny_temperature();
    test_sampler_nonfinite_logits();
    test_generate_nan_logits_numeric_error();
    test_drafter_overrun();
    test_seeded_sampling_reproducible_with_drafters();
    test_ctxend_every_emitted_token_cached();
#ifndef _WIN32
    test_fifo_refused_before_open();
#endif
    test_spm_piece_load_linear();
    test_json_duplicate_keys_refused();
    test_afma_signature_and_alpha();
    test_fmadapter_trailing_64_bytes();
    test_tokjson_huge_id_bounded();
    test_model_freed_before_session();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
