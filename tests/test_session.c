/* Saved sessions (afm_session_save / afm_session_load) on the trained model in models/mini.
     test_session save STATE LOGITS   evaluate a 500-token prompt, save the state to STATE, then go on
                                      uninterrupted: 16 more tokens one by one, every step's logits
                                      (and the prompt's last) written to LOGITS
     test_session load STATE LOGITS   in a new process: load STATE, check the same 17 logit rows bit
                                      for bit, then the refusals (another model, another adapter,
                                      another KV type, damaged and truncated copies)
   Run from the repository root; prints "N passed, N failed". */
#define AFM_IMPLEMENTATION
#include "../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_PROMPT 500
#define N_MORE 16
static int n_pass, n_fail;

static void check(int ok, const char *what) {
    if (ok) n_pass++; else n_fail++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static afm_model *load(const char *path) {
    afm_model *m;
    char err[256];
    if (afm_model_load_file(path, NULL, &m, err, sizeof err) != AFM_OK) { fprintf(stderr, "%s\n", err); exit(1); }
    return m;
}

/* A fixed pseudo-random prompt and continuation (not the model's own choices, so they test the cache). */
static int32_t token_at(int i, int vocab) { return (int32_t)(((uint32_t)i * 2654435761u >> 7) % (uint32_t)(vocab - 10) + 10); }

/* Loading `state` must fail with a message containing `want`, leaving the session unchanged. */
static void refused(afm_session *s, const void *state, size_t size, const char *want, const char *what) {
    char err[512] = "", line[700];
    int pos = afm_session_pos(s);
    afm_result r = afm_session_load(s, state, size, err, sizeof err);
    snprintf(line, sizeof line, "%s: refused (%s)", what, err);
    check(r != AFM_OK && strstr(err, want) && afm_session_pos(s) == pos, line);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long len;
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END); len = ftell(f); rewind(f);
    b = (unsigned char *)malloc((size_t)len + 1);
    if (!b || fread(b, 1, (size_t)len, f) != (size_t)len) exit(1);
    fclose(f);
    *n = (size_t)len;
    return b;
}

int main(int argc, char **argv) {
    afm_model *m;
    afm_session *s;
    afm_session_params sp;
    char err[512];
    int V, i;
    if (argc != 4) { fprintf(stderr, "usage: test_session save|load STATE LOGITS\n"); return 2; }
    m = load("models/mini/base.afm");
    V = afm_model_config(m)->vocab_size;
    memset(&sp, 0, sizeof sp);
    sp.n_threads = 2;
    if (afm_session_create(m, &sp, &s) != AFM_OK) return 1;

    if (!strcmp(argv[1], "save")) {
        int32_t prompt[N_PROMPT];
        FILE *f = fopen(argv[3], "wb");
        for (i = 0; i < N_PROMPT; i++) prompt[i] = token_at(i, V);
        check(afm_session_eval(s, prompt, N_PROMPT) == AFM_OK, "500-token prompt evaluated");
        check(afm_session_save_file(s, argv[2], err, sizeof err) == AFM_OK, "state saved to a file");
        fwrite(afm_session_logits(s, -1), 4, (size_t)V, f);
        for (i = 0; i < N_MORE; i++) {
            int32_t t = token_at(N_PROMPT + i, V);
            afm_session_eval(s, &t, 1);
            fwrite(afm_session_logits(s, -1), 4, (size_t)V, f);
        }
        fclose(f);
    } else {
        size_t n_state, n_ref, n;
        unsigned char *state = slurp(argv[2], &n_state), *copy = (unsigned char *)malloc(n_state);
        float *ref = (float *)(void *)slurp(argv[3], &n_ref);
        int same = 1, n_tok = 0;
        const int32_t *toks;
        afm_model *other = load("models/mini/draft.afm");
        afm_session *so, *s8;
        afm_adapter *json;

        /* refusals first, on a fresh session that must stay empty */
        refused(s, state, n_state - 1, "header says", "a truncated state");
        refused(s, state, 100, "too short", "a 100-byte state");
        memcpy(copy, state, n_state); copy[0] = 'X';
        refused(s, copy, n_state, "offset 0", "a wrong magic");
        memcpy(copy, state, n_state); copy[8] = 2;
        refused(s, copy, n_state, "version 2", "another version");
        memcpy(copy, state, n_state); copy[n_state / 2] ^= 1;
        refused(s, copy, n_state, "checksum", "one flipped bit in the KV cache");
        memcpy(copy, state, n_state); copy[48] = 0xff; copy[49] = 0xff;
        refused(s, copy, n_state, "offset 48", "a token count beyond the context");
        memcpy(copy, state, n_state); copy[52] = 2;
        refused(s, copy, n_state, "offset 52", "a bad has_logits flag");
        if (afm_session_create(other, NULL, &so) != AFM_OK) return 1;
        refused(so, state, n_state, "another model", "loading into another model (models/mini/draft.afm)");
        afm_session_free(so);
        if (afm_adapter_load(m, "models/mini/json.afma", NULL, &json, err, sizeof err) != AFM_OK) { puts(err); return 1; }
        afm_session_set_adapter(s, json);
        refused(s, state, n_state, "without an adapter, but this session uses adapter", "loading into a session with the JSON adapter");
        afm_session_set_adapter(s, NULL);
        sp.kv_type = AFM_KV_F16;
        if (afm_session_create(m, &sp, &s8) != AFM_OK) return 1;
        refused(s8, state, n_state, "KV cache is int8, this session's is f16", "loading into a session with an f16 cache");
        afm_session_free(s8);

        /* the real load: the same logits, bit for bit, as the uninterrupted process */
        check(afm_session_load_file(s, argv[2], err, sizeof err) == AFM_OK, "state loaded in a new process");
        toks = afm_session_tokens(s, &n_tok);
        check(n_tok == N_PROMPT && toks[0] == token_at(0, V) && toks[N_PROMPT - 1] == token_at(N_PROMPT - 1, V), "position and tokens restored (500)");
        check(n_ref == (size_t)(N_MORE + 1) * V * 4, "reference logits present");
        same = afm_session_logits(s, -1) && !memcmp(afm_session_logits(s, -1), ref, (size_t)V * 4);
        check(same, "the prompt's last logits are restored bit for bit");
        for (i = 0; i < N_MORE && same; i++) {
            int32_t t = token_at(N_PROMPT + i, V);
            same = afm_session_eval(s, &t, 1) == AFM_OK && !memcmp(afm_session_logits(s, -1), ref + (size_t)(i + 1) * V, (size_t)V * 4);
        }
        check(same, "16 further steps give logits identical to the uninterrupted session");
        check(afm_session_save(s, copy, 10, &n) == AFM_ERR_ARG && n == afm_session_state_size(s), "save into a short buffer: AFM_ERR_ARG and the size needed");
        afm_adapter_free(json);
        afm_model_free(other);
        free(state); free(copy); free(ref);
    }
    afm_session_free(s);
    afm_model_free(m);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
