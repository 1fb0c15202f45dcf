/* simple.c - text in, text out: load a model and its tokenizer, wrap a question in AFM's chat
   format, and stream the reply as it is generated. Copy it into your app and go from there.
   Build: cc -O2 simple.c -o simple -lm -lpthread      Run: ./simple model.afm "Why is the sky blue?" */
#define AFM_IMPLEMENTATION
#include "../afm.h"
#include <stdio.h>
#include <string.h>

/* afm_generate calls this with each new token: the detokenizer turns it into text, holding back
   the bytes of a character that is not complete yet. The closing <turn_end> is not printed. */
static int print_piece(void *user, int32_t token) {
    afm_detokenizer *d = (afm_detokenizer *)user;
    char text[256];
    size_t n;
    if (!afm_tokenizer_is_stop(d->tok, token) && afm_detokenizer_push(d, token, text, sizeof text, &n) == AFM_OK)
        fwrite(text, 1, n, stdout);
    fflush(stdout);
    return 0; /* non-zero would stop the generation */
}

int main(int argc, char **argv) {
    afm_model *model = NULL;
    afm_tokenizer *tok = NULL;
    afm_session *session = NULL;
    afm_session_params sp;
    afm_generate_params gp;
    afm_chat_message msg = { "user", argc > 2 ? argv[2] : "Hello!" };
    afm_detokenizer detok;
    int32_t prompt[4096], stop;
    size_t n_prompt;
    char err[512] = "";
    int ok = 0;

    if (argc < 2) { fprintf(stderr, "usage: %s MODEL.afm [QUESTION]\n", argv[0]); return 1; }
    memset(&sp, 0, sizeof sp);                                                       /* zero: defaults */
    memset(&gp, 0, sizeof gp);
    if (afm_model_load_file(argv[1], NULL, &model, err, sizeof err) == AFM_OK &&
        afm_model_tokenizer(model, NULL, &tok, err, sizeof err) == AFM_OK &&       /* stored in the file */
        afm_chat_tokenize(tok, &msg, 1, NULL, 0, 1, prompt, 4096, &n_prompt) == AFM_OK) {
        sp.n_threads = 2;
        if (afm_session_create(model, &sp, &session) == AFM_OK) {
            afm_detokenizer_init(&detok, tok, AFM_TOK_NEWLINE);                     /* <n> -> "\n" */
            gp.n_predict = 200;                                                      /* greedy: temperature 0 */
            stop = afm_tokenizer_special(tok, AFM_SPECIAL_TURN_END);                 /* the reply's end */
            gp.stop_tokens = &stop;
            gp.n_stop_tokens = stop >= 0;
            gp.on_token = print_piece;
            gp.user = &detok;
            ok = afm_generate(session, prompt, (int)n_prompt, &gp, NULL) == AFM_OK;
            if (!ok) snprintf(err, sizeof err, "%s", afm_session_error(session));
            printf("\n");
        }
    }
    if (!ok) fprintf(stderr, "%s\n", err[0] ? err : "failed");
    afm_session_free(session);
    afm_tokenizer_free(tok);
    afm_model_free(model);
    return !ok;
}
