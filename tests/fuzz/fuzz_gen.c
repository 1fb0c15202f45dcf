/* libFuzzer harness for the generation layer: a fuzzed model driven through afm_session_eval,
   the sampler and afm_generate with fuzzed parameters and drafters, and the sampler alone on
   fuzzed logits (NaN, infinities, huge and tiny values, fuzzed temperature / top-k / top-p / min-p).

   Input: a 32-byte header of parameters, then a model file (the seeds are the loader corpus's
   tiny models behind headers: tests/gen/make_fuzz_corpus.py --gen). Checks, beyond the sanitizers:
   - the sampler returns -1 exactly when the logits hold a NaN or +inf or are all -inf, else an
     id in range, and greedy is the lowest-id argmax;
   - afm_generate returns a known code; after it every emitted token is in the cache, in order
     (also after AFM_ERR_CONTEXT_FULL or AFM_ERR_NUMERIC); a full context says so in stats.stop;
   - seeded means reproducible: the same generation without a drafter emits the same tokens and
     ends with the same code as with the fuzzed drafter and K.
   Build with clang -fsanitize=fuzzer,address,undefined (make fuzz), or with -DAFM_FUZZ_MAIN as a
   program that replays the files given on the command line (make test does this). */
#define AFM_IMPLEMENTATION
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define HDR 32
#define MAX_OUT 80

typedef struct run { int32_t out[MAX_OUT]; int n; int stop_after; } run;

static int on_token(void *user, int32_t t) {
    run *r = (run *)user;
    if (r->n < MAX_OUT) r->out[r->n] = t;
    r->n++;
    return r->stop_after > 0 && r->n >= r->stop_after;
}

/* A custom drafter that misbehaves as the input says: claims `claim` tokens (may be negative or more
   than asked), writes at most k of them (ids may be out of range). */
typedef struct drafter { const uint8_t *src; int claim, vocab; } drafter;
static int draft_fn(void *user, const int32_t *ctx, int n_ctx, int k, int32_t *draft) {
    drafter *d = (drafter *)user;
    int i;
    if (n_ctx < 1 || !ctx) abort();
    for (i = 0; i < k; i++) draft[i] = (int32_t)(d->src[i % 6] % (d->vocab + 2)) - (d->src[i % 6] == 255);
    return d->claim;
}

static float rd_f32(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

/* The sampler on up to 64 logits taken from the input's bytes. */
static void fuzz_sampler(const uint8_t *h, const uint8_t *p, size_t n) {
    float lg[64];
    int V = (int)(n / 4 > 64 ? 64 : n / 4), i, bad = 0, best = 0, rep;
    afm_sampler_params sp;
    afm_sampler *sm;
    if (V < 1) return;
    for (i = 0; i < V; i++) lg[i] = rd_f32(p + 4 * i);
    for (i = 0; i < V; i++) {
        if (lg[i] != lg[i] || lg[i] == INFINITY) bad = 1;
        else if (lg[i] > lg[best] || lg[best] != lg[best]) best = i;
    }
    if (!bad && lg[best] == -INFINITY) bad = 1;
    memset(&sp, 0, sizeof sp);
    sp.temperature = rd_f32(h + 8);
    sp.top_k = h[5] % 8;
    sp.top_p = h[6] / 255.0f;
    sp.min_p = h[7] / 255.0f;
    memcpy(&sp.seed, h + 12, 4);
    if (afm_sampler_create(&sp, V, NULL, &sm) != AFM_OK) {
        if (!(sp.temperature != sp.temperature || sp.temperature > FLT_MAX)) abort(); /* only those are refused here */
        return;
    }
    for (rep = 0; rep < 3; rep++) {
        int32_t t = afm_sampler_sample(sm, lg);
        if (bad ? t != -1 : (t < 0 || t >= V)) abort();
        if (!bad && !(sp.temperature > 0) && t != best) abort();
        if (!bad && !(lg[t] > -INFINITY)) abort(); /* a -inf logit has probability 0 */
    }
    afm_sampler_free(sm);
}

/* One afm_generate on a fresh session; returns its code, the tokens in r, and checks the cache. */
static afm_result generate(afm_model *m, const uint8_t *h, const int32_t *prompt, int n_prompt, int use_drafter, run *r,
                           afm_generate_stats *st) {
    const afm_config *c = afm_model_config(m);
    afm_session_params spp;
    afm_session *s = NULL, *ds = NULL;
    afm_generate_params gp;
    drafter d;
    afm_result res;
    int32_t stop;
    memset(&spp, 0, sizeof spp);
    spp.n_ctx = h[2] % 48 + 1;
    spp.n_batch = h[3] % 9;
    spp.kv_type = (h[0] & 32) ? AFM_KV_F32 : AFM_KV_AUTO;
    spp.n_threads = (h[0] & 64) && (h[3] & 128) ? 2 : 1;
    spp.preallocate = (h[0] >> 7) & 1;
    if (afm_session_create(m, &spp, &s) != AFM_OK) return AFM_ERR_ARG;
    memset(&gp, 0, sizeof gp);
    memset(r, 0, sizeof *r);
    gp.n_predict = h[1] % 64;
    gp.sampler.temperature = (h[0] & 1) ? rd_f32(h + 8) : 0.0f;
    gp.sampler.top_k = h[5] % 8;
    gp.sampler.top_p = h[6] / 255.0f;
    gp.sampler.min_p = h[7] / 255.0f;
    memcpy(&gp.sampler.seed, h + 12, 4);
    gp.on_token = on_token;
    gp.user = r;
    r->stop_after = h[4] >> 5; /* 0: never; else the callback stops after that many */
    stop = (int32_t)(h[28] % (c->vocab_size + 1));
    gp.stop_tokens = &stop;
    gp.n_stop_tokens = (h[4] & 16) ? 1 : 0;
    if (use_drafter) {
        gp.draft_k = h[4] % 20; /* above 16 is clamped */
        gp.fixed_k = (h[0] >> 3) & 1;
        d.src = h + 26;
        d.claim = (int)h[25] - 4;
        d.vocab = c->vocab_size;
        switch ((h[0] >> 1) & 3) {
        case 1: gp.draft_fn = draft_fn; gp.draft_user = &d; break;
        case 2: gp.lookup = 1; break;
        case 3:
            if (afm_session_create(m, &spp, &ds) == AFM_OK) gp.draft = ds;
            break;
        }
    }
    res = afm_generate(s, prompt, n_prompt, &gp, st);
    if (res == AFM_OK || res == AFM_ERR_CONTEXT_FULL || res == AFM_ERR_NUMERIC) {
        int n, i;
        const int32_t *toks = afm_session_tokens(s, &n);
        /* every emitted token is in the cache, right after the prompt (which is not there when it
           did not fit: stats.n_prompt is 0 then, and nothing was generated) */
        int base = st->n_prompt;
        if ((base != 0 && base != n_prompt) || n != base + r->n) abort();
        for (i = 0; i < r->n && i < MAX_OUT; i++)
            if (toks[base + i] != r->out[i]) abort();
        if (st->n_generated != r->n) abort();
        if ((res == AFM_ERR_CONTEXT_FULL) != (st->stop == AFM_STOP_CONTEXT_FULL)) abort();
        if (res == AFM_OK && gp.n_predict > 0 && st->stop == AFM_STOP_NONE) abort();
        if (res != AFM_OK && !afm_session_error(s)[0]) abort();
    } else if (res != AFM_ERR_ARG && res != AFM_ERR_NOMEM) abort();
    afm_session_free(ds);
    afm_session_free(s);
    return res;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    afm_model *m = NULL;
    char err[512];
    const uint8_t *h = data;
    if (size < HDR) return 0;
    fuzz_sampler(h, data + HDR, size - HDR);
    if (afm_model_load_memory(data + HDR, size - HDR, NULL, &m, err, sizeof err) != AFM_OK) {
        if (!err[0]) abort();
        return 0;
    }
    {
        const afm_config *c = afm_model_config(m);
        uint64_t work = (uint64_t)c->n_layers * (uint64_t)c->dim * ((uint64_t)c->ffn_dim + (uint64_t)c->n_heads * c->head_dim) +
                        (uint64_t)c->vocab_size * c->dim;
        if (work < (1u << 20)) {
            int32_t prompt[8];
            int n_prompt = h[24] % 9, i;
            run a, b;
            afm_generate_stats sa, sb;
            afm_result ra, rb;
            for (i = 0; i < n_prompt; i++) prompt[i] = (int32_t)(h[16 + i] % (c->vocab_size + 1)); /* the last id is out of range */
            ra = generate(m, h, prompt, n_prompt, 1, &a, &sa);
            rb = generate(m, h, prompt, n_prompt, 0, &b, &sb);
            if (getenv("FUZZ_GEN_VERBOSE"))
                fprintf(stderr, "fuzz_gen: %d + %d tokens, %s (stop %d), %d drafted, %d accepted\n", n_prompt, a.n, afm_result_string(ra),
                        (int)sa.stop, sa.n_drafted, sa.n_accepted);
            /* seeded means reproducible: the drafter and K change nothing */
            if (ra != rb || a.n != b.n || memcmp(a.out, b.out, (size_t)(a.n < MAX_OUT ? a.n : MAX_OUT) * sizeof a.out[0])) {
                fprintf(stderr, "fuzz_gen: with the drafter %d tokens (%s), without %d (%s)\n", a.n, afm_result_string(ra), b.n,
                        afm_result_string(rb));
                abort();
            }
        }
    }
    afm_model_free(m);
    return 0;
}

#include "replay.h"
