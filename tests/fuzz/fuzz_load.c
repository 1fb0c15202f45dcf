/* libFuzzer harness for the model loader (load from memory), and, when the fuzzed file is
   a valid model small enough, a short forward pass and a sample over it.
   Build with clang -fsanitize=fuzzer,address,undefined (make fuzz), or with -DAFM_FUZZ_MAIN
   as a plain program that replays files given on the command line (make test does this). */
#define AFM_IMPLEMENTATION
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    afm_model *m = NULL;
    char err[512];
    if (afm_model_load_memory(data, size, NULL, &m, err, sizeof err) != AFM_OK) {
        if (!err[0]) abort(); /* every refusal must say why */
        return 0;
    }
    {
        const afm_config *c = afm_model_config(m);
        uint64_t work = (uint64_t)c->n_layers * (uint64_t)c->dim * ((uint64_t)c->ffn_dim + (uint64_t)c->n_heads * c->head_dim) +
                        (uint64_t)c->vocab_size * c->dim;
        if (work < (1u << 22)) {
            afm_session *s;
            afm_session_params p;
            afm_sampler *sm;
            afm_sampler_params sp;
            int32_t toks[3] = { 0, 0, 0 };
            memset(&p, 0, sizeof p);
            p.n_ctx = 4;
            toks[1] = c->vocab_size - 1;
            toks[2] = c->vocab_size / 2;
            memset(&sp, 0, sizeof sp);
            sp.temperature = 0.8f;
            sp.top_p = 0.9f;
            if (afm_session_create(m, &p, &s) == AFM_OK) {
                if (afm_session_eval(s, toks, 3) == AFM_OK && afm_sampler_create(&sp, c->vocab_size, NULL, &sm) == AFM_OK) {
                    const float *lg = afm_session_logits(s, -1);
                    int32_t t = afm_sampler_sample(sm, lg), i, finite = 0, usable = 1;
                    for (i = 0; i < c->vocab_size; i++) {
                        if (lg[i] != lg[i] || lg[i] > FLT_MAX) usable = 0;
                        if (lg[i] >= -FLT_MAX) finite = 1;
                    }
                    if (usable && finite ? t < 0 || t >= c->vocab_size : t != -1) abort(); /* -1: logits not usable */
                    afm_sampler_free(sm);
                }
                afm_session_free(s);
            }
        }
    }
    afm_model_free(m);
    return 0;
}

#include "replay.h"
