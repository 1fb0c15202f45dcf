/* The smallest useful program on afm.h: load a model, feed a prompt of token ids, and
   print the greedy continuation. Copy it into your app and go from there.
   Build: cc -O2 simple.c -o simple -lm -lpthread        Run: ./simple model.afm 1 2 3 */
#define AFM_IMPLEMENTATION
#include "../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    afm_model *model;
    afm_session *session;
    afm_session_params params;
    int32_t prompt[256], token;
    int n = 0, i;
    char err[512];

    if (argc < 3) { fprintf(stderr, "usage: %s MODEL.afm ID [ID ...]\n", argv[0]); return 1; }
    for (i = 2; i < argc && n < 256; i++) prompt[n++] = (int32_t)atoi(argv[i]);

    if (afm_model_load_file(argv[1], NULL, &model, err, sizeof err) != AFM_OK) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    memset(&params, 0, sizeof params);           /* zero means defaults */
    params.n_threads = 2;
    if (afm_session_create(model, &params, &session) != AFM_OK) return 1;

    if (afm_session_eval(session, prompt, n) != AFM_OK) {   /* prefill the prompt */
        fprintf(stderr, "%s\n", afm_session_error(session));
        return 1;
    }
    for (i = 0; i < 16; i++) {                                /* greedy decoding */
        const float *logits = afm_session_logits(session, -1);
        int v, vocab = afm_model_config(model)->vocab_size;
        token = 0;
        for (v = 1; v < vocab; v++)
            if (logits[v] > logits[token]) token = v;
        printf("%d ", (int)token);
        if (afm_session_eval(session, &token, 1) != AFM_OK) break;
    }
    printf("\n");
    afm_session_free(session);
    afm_model_free(model);
    return 0;
}
