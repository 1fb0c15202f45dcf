/* libFuzzer harness for session state files (afm_session_load) against the trained model in
   models/mini (run from the repository root). The input is a state file; the session it is loaded
   into has the KV type the header names (offset 32) and the JSON adapter when the header's adapter
   fingerprint (offset 24) is not zero, so mutations reach the checks behind those two.
   Built with -DAFM_FUZZ_MAIN it replays the files given as arguments; `--seeds DIR` writes the seed
   corpus (valid states of each kind, and hostile ones whose checksum is made right so that the later
   checks are what refuses them). */
#define AFM_IMPLEMENTATION
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct harness { afm_model *m; afm_adapter *json; afm_session *s[2][4]; } harness;

static harness *state(void) {
    static harness h; /* the harness's own state, loaded once */
    char err[256];
    if (!h.m) {
        if (afm_model_load_file("models/mini/base.afm", NULL, &h.m, err, sizeof err) != AFM_OK ||
            afm_adapter_load(h.m, "models/mini/json.afma", NULL, &h.json, err, sizeof err) != AFM_OK) {
            fprintf(stderr, "fuzz_session: %s (run from the repository root)\n", err);
            abort();
        }
    }
    return &h;
}

/* The session for a KV type (1..3) and with or without the adapter, created on first use. */
static afm_session *session(int kv, int adapter) {
    harness *h = state();
    if (!h->s[adapter][kv]) {
        afm_session_params sp;
        memset(&sp, 0, sizeof sp);
        sp.kv_type = (afm_kv_type)kv;
        sp.n_ctx = 64;
        if (afm_session_create(h->m, &sp, &h->s[adapter][kv]) != AFM_OK) abort();
        if (adapter) afm_session_set_adapter(h->s[adapter][kv], h->json);
    }
    afm_session_rewind(h->s[adapter][kv], 0);
    return h->s[adapter][kv];
}

/* Loads one state; err gets the refusal ("" when it loaded). */
static afm_result try_state(const uint8_t *data, size_t size, char *err, size_t errn) {
    int kv = size >= 36 && data[32] >= 1 && data[32] <= 3 ? (int)data[32] : (int)AFM_KV_INT8, adapter = 0, i;
    afm_session *s;
    afm_result r;
    for (i = 24; i < 32 && (size_t)i < size; i++) adapter |= data[i] != 0;
    s = session(kv, adapter);
    if ((r = afm_session_load(s, data, size, err, errn)) != AFM_OK) {
        if (!err[0] || afm_session_pos(s) != 0) abort(); /* a refusal must say why and change nothing */
        return r;
    }
    {   /* a loaded state must continue */
        int32_t t = 10;
        if (afm_session_pos(s) < 64) afm_session_eval(s, &t, 1);
    }
    return r;
}

/* A saved sampler state (afm_sampler_save): loaded into samplers with a penalty window of 8, an
   unbounded one and none; what loads must save back to the same bytes. */
static void try_sampler_state(const uint8_t *data, size_t size) {
    static const int windows[3] = { 8, -1, 0 };
    int w;
    for (w = 0; w < 3; w++) {
        afm_sampler_params p;
        afm_sampler *sm;
        char err[256];
        memset(&p, 0, sizeof p);
        if (w < 2) { p.presence_penalty = 0.5f; p.penalty_last_n = windows[w]; }
        if (afm_sampler_create(&p, 64, NULL, &sm) != AFM_OK) abort();
        if (afm_sampler_load(sm, data, size, err, sizeof err) == AFM_OK) {
            unsigned char *back = (unsigned char *)malloc(size + 1);
            size_t n = 0;
            if (!back || afm_sampler_save(sm, back, size + 1, &n) != AFM_OK || n != size || memcmp(back, data, size)) abort();
            free(back);
        } else if (!err[0]) abort(); /* a refusal always says why */
        afm_sampler_free(sm);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[512];
    try_state(data, size, err, sizeof err);
    if (size >= 8 && !memcmp(data, "AFMSMPL1", 8)) try_sampler_state(data, size);
    return 0;
}

#ifdef AFM_FUZZ_MAIN
static unsigned char *slurp(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    b = (unsigned char *)malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    fclose(f);
    *size = (size_t)n;
    return b;
}

static void put(const char *dir, const char *name, unsigned char *b, size_t n, int fix_checksum) {
    char path[1024];
    FILE *f;
    if (fix_checksum) afm__wr64(b + 56, afm__hash(0, b + AFM__STATE_HEADER, n - AFM__STATE_HEADER));
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (!(f = fopen(path, "wb")) || fwrite(b, 1, n, f) != n) { perror(path); exit(1); }
    fclose(f);
}

/* A state of n tokens (with the last logits when logits is set), saved into b; returns its size. */
static size_t make(int kv, int adapter, int n, int logits, unsigned char *b, size_t cap) {
    afm_session *s = session(kv, adapter);
    int32_t toks[4] = { 10, 200, 3000, 4 };
    size_t size = 0;
    if (n) afm_session_eval(s, toks, n);
    if (!logits) afm_session_rewind(s, n); /* drops the logits */
    if (afm_session_save(s, b, cap, &size) != AFM_OK) abort();
    return size;
}

static void write_seeds(const char *dir) {
    size_t cap = 1 << 20, n;
    unsigned char *b = (unsigned char *)malloc(cap);
    n = make(AFM_KV_INT8, 0, 0, 0, b, cap); put(dir, "empty", b, n, 0);
    n = make(AFM_KV_INT8, 0, 3, 0, b, cap); put(dir, "int8_3_tokens", b, n, 0);
    n = make(AFM_KV_INT8, 0, 2, 1, b, cap); put(dir, "int8_2_tokens_logits", b, n, 0);
    n = make(AFM_KV_F16, 0, 3, 0, b, cap); put(dir, "f16_3_tokens", b, n, 0);
    n = make(AFM_KV_F32, 0, 1, 1, b, cap); put(dir, "f32_1_token_logits", b, n, 0);
    n = make(AFM_KV_INT8, 1, 2, 0, b, cap); put(dir, "adapter_2_tokens", b, n, 0);
    /* hostile: each breaks one rule */
    n = make(AFM_KV_INT8, 0, 3, 0, b, cap);
    b[0] = 'B'; put(dir, "bad_magic", b, n, 0); b[0] = 'A';
    put(dir, "truncated", b, n - 7, 0);
    b[12] = 64; put(dir, "bad_header_size", b, n, 0); b[12] = 128;
    b[125] = 1; put(dir, "reserved_not_zero", b, n, 0); b[125] = 0;
    b[16] ^= 1; put(dir, "other_model", b, n, 0); b[16] ^= 1;
    b[24] = 1; put(dir, "other_adapter", b, n, 0); b[24] = 0;
    b[32] = 9; put(dir, "bad_kv_type", b, n, 0); b[32] = AFM_KV_INT8;
    b[36] = 7; put(dir, "bad_vocab", b, n, 0); b[36] = 0;
    b[48] = 200; put(dir, "too_many_tokens", b, n, 0); b[48] = 3;
    b[52] = 5; put(dir, "bad_logits_flag", b, n, 0); b[52] = 0;
    b[n - 1] ^= 0x40; put(dir, "bad_checksum", b, n, 0); b[n - 1] ^= 0x40;
    afm__wr32(b + AFM__STATE_HEADER + 4, 8192); put(dir, "token_out_of_range", b, n, 1);
    n = make(AFM_KV_INT8, 1, 2, 0, b, cap);
    memset(b + 64, 'x', 56); put(dir, "identifier_unterminated", b, n, 0);
    n = make(AFM_KV_F16, 0, 3, 0, b, cap);
    b[AFM__STATE_HEADER + 12 + 1] = 0x7c; put(dir, "f16_infinite_key", b, n, 1);
    n = make(AFM_KV_F32, 0, 1, 1, b, cap);
    afm__wr32(b + n - 4, 0x7fc00000u); put(dir, "f32_nan_logit", b, n, 1);
    free(b);
}

int main(int argc, char **argv) {
    int i, j, k;
    harness *h;
    if (argc == 3 && !strcmp(argv[1], "--seeds")) write_seeds(argv[2]);
    else
        for (i = 1; i < argc; i++) {
            size_t n = 0;
            unsigned char *b = slurp(argv[i], &n);
            char err[512] = "";
            if (b) printf("%s: %s\n", argv[i], try_state(b, n, err, sizeof err) == AFM_OK ? "loaded" : err);
            free(b);
        }
    if (argc != 3 || strcmp(argv[1], "--seeds")) printf("replayed %d inputs\n", argc - 1);
    h = state();
    for (j = 0; j < 2; j++)
        for (k = 0; k < 4; k++) afm_session_free(h->s[j][k]);
    afm_adapter_free(h->json);
    afm_model_free(h->m);
    return 0;
}
#endif
