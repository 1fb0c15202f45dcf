/* The sampler additions: logit bias, repetition / presence / frequency penalties and their window,
   stop strings across token boundaries, exact token counts, and afm_generate using them (also with
   speculative decoding, which must give the plain loop's tokens). Run from the repository root. */
#define AFM_IMPLEMENTATION
#include "../afm.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_pass, n_fail;
static void check(int ok, const char *what) {
    if (ok) n_pass++; else n_fail++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static afm_sampler *make(afm_sampler_params p, int vocab) {
    afm_sampler *sm = NULL;
    if (afm_sampler_create(&p, vocab, NULL, &sm) != AFM_OK) { printf("FAIL create\n"); exit(1); }
    return sm;
}

static void test_bias_and_penalties(void) {
    float lg[4] = { 1.0f, 1.4f, 0.2f, -3.0f };
    afm_sampler_params p;
    afm_sampler *sm;
    afm_logit_bias b[2];
    memset(&p, 0, sizeof p);
    b[0].token = 1; b[0].bias = -INFINITY;
    b[1].token = 3; b[1].bias = 4.5f;
    p.logit_bias = b; p.n_logit_bias = 1;
    sm = make(p, 4);
    check(afm_sampler_sample(sm, lg) == 0, "logit bias -inf bans the argmax (greedy takes the next)");
    afm_sampler_free(sm);
    p.n_logit_bias = 2;
    sm = make(p, 4);
    b[1].bias = 0; /* the sampler copied the array */
    check(afm_sampler_sample(sm, lg) == 3, "logit bias +4.5 lifts token 3 to the top; the array is copied");
    afm_sampler_free(sm);

    memset(&p, 0, sizeof p);
    p.presence_penalty = 0.5f;
    sm = make(p, 4);
    check(afm_sampler_sample(sm, lg) == 1, "presence penalty: nothing seen, no change");
    afm_sampler_accept(sm, 1);
    check(afm_sampler_sample(sm, lg) == 0, "presence penalty 0.5 on a seen token: 1.4 - 0.5 < 1.0");
    afm_sampler_reset(sm);
    check(afm_sampler_sample(sm, lg) == 1, "afm_sampler_reset empties the window");
    afm_sampler_free(sm);

    memset(&p, 0, sizeof p);
    p.frequency_penalty = 0.3f;
    p.penalty_last_n = 2;
    sm = make(p, 4);
    afm_sampler_accept(sm, 1);
    check(afm_sampler_sample(sm, lg) == 1, "frequency penalty 0.3 once: 1.1 > 1.0");
    afm_sampler_accept(sm, 1);
    check(afm_sampler_sample(sm, lg) == 0, "frequency penalty 0.3 twice: 0.8 < 1.0");
    afm_sampler_accept(sm, 2);
    check(afm_sampler_sample(sm, lg) == 1, "penalty_last_n 2: the first occurrence left the window");
    afm_sampler_accept(sm, 2);
    check(afm_sampler_sample(sm, lg) == 1, "penalty_last_n 2: both occurrences left the window");
    afm_sampler_free(sm);

    memset(&p, 0, sizeof p);
    p.repeat_penalty = 1.5f;
    sm = make(p, 4);
    afm_sampler_accept(sm, 1);
    check(afm_sampler_sample(sm, lg) == 0, "repeat penalty 1.5 divides a positive logit: 1.4 / 1.5 < 1.0");
    afm_sampler_free(sm);
    {   /* a negative logit is multiplied: -3 * 2 with bias +6.5 is 0.5, below 1.0 */
        float lg2[2] = { 1.0f, -3.0f };
        afm_logit_bias bb = { 1, 4.5f };
        memset(&p, 0, sizeof p);
        p.repeat_penalty = 2; p.logit_bias = &bb; p.n_logit_bias = 1;
        sm = make(p, 2);
        check(afm_sampler_sample(sm, lg2) == 1, "bias first: -3 + 4.5 = 1.5 wins before any penalty");
        afm_sampler_accept(sm, 1);
        check(afm_sampler_sample(sm, lg2) == 0, "repeat penalty 2 on a positive (biased) logit: 1.5 / 2 < 1.0");
        afm_sampler_free(sm);
    }
    {   /* refusals */
        afm_logit_bias all[4] = { { 0, -INFINITY }, { 1, -INFINITY }, { 2, -INFINITY }, { 3, -INFINITY } };
        afm_logit_bias bad = { 4, 1.0f }, nan_b = { 0, NAN }, inf_b = { 0, INFINITY };
        afm_sampler *x = NULL;
        int ok = 1;
        memset(&p, 0, sizeof p);
        p.logit_bias = all; p.n_logit_bias = 4;
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG && !x;
        p.logit_bias = &bad; p.n_logit_bias = 1;
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG;
        p.logit_bias = &nan_b;
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG;
        p.logit_bias = &inf_b;
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG;
        memset(&p, 0, sizeof p);
        p.repeat_penalty = NAN;
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG;
        p.repeat_penalty = 0; p.penalty_last_n = -2;
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG;
        p.penalty_last_n = 0; p.n_logit_bias = 3; /* no array */
        ok &= afm_sampler_create(&p, 4, NULL, &x) == AFM_ERR_ARG;
        memset(&p, 0, sizeof p);
        x = make(p, 4);
        ok &= afm_sampler_accept(x, 4) == AFM_ERR_ARG && afm_sampler_accept(x, -1) == AFM_ERR_ARG && afm_sampler_accept(x, 3) == AFM_OK;
        afm_sampler_free(x);
        check(ok, "refused: every token banned, bias on an id out of range, NaN or +inf bias, NaN penalty, window < -1, a count without an array, accept out of range");
    }
}

/* Pushes pieces through a stop matcher; returns what was shown, and whether it stopped. */
static int run_stop(const char *const *stops, int n, const char *const *pieces, int n_pieces, char *shown) {
    afm_stop *st;
    const char *o;
    size_t n_o;
    int i, r = 0;
    shown[0] = 0;
    if (afm_stop_create(stops, n, NULL, &st) != AFM_OK) return -2;
    for (i = 0; i < n_pieces && r == 0; i++) {
        r = afm_stop_push(st, pieces[i], strlen(pieces[i]), &o, &n_o);
        strncat(shown, o, n_o);
    }
    if (r == 0) { afm_stop_flush(st, &o, &n_o); strncat(shown, o, n_o); }
    afm_stop_free(st);
    return r;
}

static void test_stop_strings(void) {
    const char *stops[] = { "</end>", "STOP", "aab" };
    const char *p1[] = { "abc</e", "nd>xyz", "more" };
    const char *p2[] = { "no stop ", "here </en", "d>" };
    const char *p3[] = { "a", "a", "a", "b", "c" };
    const char *p4[] = { "ST", "OP" };
    const char *p5[] = { "partial </e" };
    const char *p6[] = { "ü", "STO", "ñ", "STOP!" };
    const char *empty[] = { "" };
    char shown[256];
    afm_stop *st = NULL;
    check(run_stop(stops, 3, p1, 3, shown) == 1 && !strcmp(shown, "abc"), "stop string split across two pushes: text before it only");
    check(run_stop(stops, 3, p2, 3, shown) == 1 && !strcmp(shown, "no stop here "), "held back tail completes the stop string a push later");
    check(run_stop(stops, 3, p3, 5, shown) == 1 && !strcmp(shown, "a"), "overlapping prefix 'aaab' finds 'aab' at offset 1");
    check(run_stop(stops, 3, p4, 2, shown) == 1 && !strcmp(shown, ""), "stop string at the very start");
    check(run_stop(stops, 3, p5, 1, shown) == 0 && !strcmp(shown, "partial </e"), "no stop: the held tail comes out at the flush");
    check(run_stop(stops, 3, p6, 4, shown) == 1 && !strcmp(shown, "üSTOñ"), "UTF-8 around a false start");
    check(run_stop(stops, 0, p1, 3, shown) == 0 && !strcmp(shown, "abc</end>xyzmore"), "no stop strings: everything passes");
    check(afm_stop_create(empty, 1, NULL, &st) == AFM_ERR_ARG && !st, "an empty stop string is refused");
}

static void test_with_model(void) {
    afm_model *m;
    afm_tokenizer *tok;
    afm_session *s;
    char err[256];
    afm_chat_message msg = { "user", "Who created the heaven and the earth?" };
    size_t n = 0;
    int32_t ids[256], out_plain[40], out_spec[40];
    int n_out, V, i, j, rep = 0;
    afm_generate_params gp;
    if (afm_model_load_file("models/mini/base.afm", NULL, &m, err, sizeof err) != AFM_OK) { printf("FAIL %s\n", err); n_fail++; return; }
    afm_model_tokenizer(m, NULL, &tok, err, sizeof err);
    V = afm_model_config(m)->vocab_size;
    afm_chat_tokenize(tok, &msg, 1, NULL, 0, 1, ids, 256, &n);
    check(afm_chat_token_count(tok, &msg, 1, NULL, 0, 1) == (long)n && n > 10, "afm_chat_token_count equals afm_chat_tokenize's count");
    afm_tokenize(tok, "In the beginning God created", 28, AFM_TOK_AFM, ids, 256, &n);
    check(afm_token_count(tok, "In the beginning God created", 28, AFM_TOK_AFM) == (long)n && afm_token_count(tok, "", 0, AFM_TOK_AFM) == 0,
          "afm_token_count equals afm_tokenize's count (and 0 for empty text)");

    /* greedy with a strong frequency penalty over the whole context: no generated token repeats */
    afm_session_create(m, NULL, &s);
    memset(&gp, 0, sizeof gp);
    gp.n_predict = 40;
    gp.sampler.frequency_penalty = 100;
    gp.sampler.penalty_last_n = -1;
    gp.on_token = NULL;
    afm_generate(s, ids, (int)n, &gp, NULL);
    {
        int n_tok;
        const int32_t *t = afm_session_tokens(s, &n_tok);
        for (i = 0; i < n_tok; i++)
            for (j = i + 1; j < n_tok; j++) rep += t[i] == t[j];
        memcpy(out_plain, t + n, 40 * sizeof(int32_t));
        n_out = n_tok - (int)n;
    }
    check(n_out == 40 && rep == 0, "afm_generate with frequency_penalty 100 over the whole context: 40 tokens, none repeated");
    /* the same with prompt lookup drafting: speculative decoding must give the plain loop's tokens */
    afm_session_rewind(s, 0);
    gp.lookup = 1;
    gp.fixed_k = 1;
    gp.draft_k = 4;
    afm_generate(s, ids, (int)n, &gp, NULL);
    memcpy(out_spec, afm_session_tokens(s, &n_out) + n, 40 * sizeof(int32_t));
    check(!memcmp(out_plain, out_spec, sizeof out_plain), "penalties with speculative decoding (lookup, k = 4): the plain loop's tokens");
    {   /* a repeat penalty and a bias: the first token is banned, so generation starts elsewhere */
        afm_logit_bias ban;
        afm_session_rewind(s, 0);
        memset(&gp, 0, sizeof gp);
        gp.n_predict = 1;
        afm_generate(s, ids, (int)n, &gp, NULL);
        ban.token = afm_session_tokens(s, &n_out)[n];
        ban.bias = -INFINITY;
        afm_session_rewind(s, 0);
        gp.sampler.logit_bias = &ban;
        gp.sampler.n_logit_bias = 1;
        gp.sampler.temperature = 0.7f;
        gp.sampler.seed = 5;
        afm_generate(s, ids, (int)n, &gp, NULL);
        check(afm_session_tokens(s, &n_out)[n] != ban.token && n_out == (int)n + 1, "afm_generate with a banned token (sampling): never produced");
        gp.sampler.n_logit_bias = -1;
        check(afm_generate(s, ids, (int)n, &gp, NULL) == AFM_ERR_ARG && strstr(afm_session_error(s), "sampler"), "afm_generate refuses bad sampler parameters");
    }
    (void)V;
    afm_session_free(s);
    afm_tokenizer_free(tok);
    afm_model_free(m);
}


/* afm_sampler_save / afm_sampler_load: a sampler restored mid-way draws what the original draws, for
   each kind of penalty window; a state for another sampler or a damaged one is refused, unchanged. */
static void sample_run(afm_sampler *sm, int n, int32_t *out) {
    float lg[64];
    int i, j;
    for (i = 0; i < n; i++) {
        for (j = 0; j < 64; j++) lg[j] = (float)((j * 37 + i * 11) % 23) * 0.25f;
        out[i] = afm_sampler_sample(sm, lg);
        afm_sampler_accept(sm, out[i]);
    }
}
static void test_sampler_state(void) {
    static const int windows[3] = { 8, -1, 0 };
    int w;
    for (w = 0; w < 3; w++) {
        afm_sampler_params p;
        afm_sampler *a, *b, *c;
        int32_t x[40], y[20];
        unsigned char buf[4096], bad[4096];
        size_t n = 0, m = 0;
        char err[256], what[160];
        memset(&p, 0, sizeof p);
        p.temperature = 1.0f; p.seed = 99; p.top_p = 0.95f;
        if (w < 2) { p.presence_penalty = 0.7f; p.frequency_penalty = 0.3f; p.penalty_last_n = windows[w]; }
        a = make(p, 64); b = make(p, 64);
        sample_run(a, 20, x);
        check(afm_sampler_save(a, NULL, 0, &n) == AFM_OK && n <= sizeof buf && afm_sampler_save(a, buf, sizeof buf, &m) == AFM_OK && m == n,
              "sampler state: size, then the bytes");
        check(afm_sampler_load(b, buf, n, err, sizeof err) == AFM_OK, "sampler state loads into a sampler made alike");
        sample_run(a, 20, x + 20);
        sample_run(b, 20, y);
        snprintf(what, sizeof what, "sampler state (window %d): the restored sampler draws the same 20 tokens", w < 2 ? windows[w] : -2);
        check(!memcmp(x + 20, y, sizeof y), what);
        memcpy(bad, buf, n);
        bad[8] ^= 1;
        check(afm_sampler_load(b, bad, n, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "vocabulary"), "sampler state: another vocabulary is refused");
        check(afm_sampler_load(b, buf, n - 1, err, sizeof err) == AFM_ERR_FORMAT, "sampler state: a truncated state is refused");
        check(afm_sampler_load(b, "AFMSTATE", 8, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "AFMSMPL1"), "sampler state: another file is refused");
        if (n > 52) {
            memcpy(bad, buf, n);
            bad[52] = 0xff; bad[53] = 0xff; /* a token id out of range */
            check(afm_sampler_load(b, bad, n, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "offset 52"), "sampler state: a token out of range is refused, naming its offset");
        }
        p.penalty_last_n = w == 0 ? 9 : 8; p.presence_penalty = 0.5f;
        c = make(p, 64);
        check(afm_sampler_load(c, buf, n, err, sizeof err) == AFM_ERR_FORMAT && strstr(err, "penalty window"), "sampler state: another penalty window is refused");
        afm_sampler_free(a); afm_sampler_free(b); afm_sampler_free(c);
    }
}

int main(void) {
    test_bias_and_penalties();
    test_stop_strings();
    test_sampler_state();
    test_with_model();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
