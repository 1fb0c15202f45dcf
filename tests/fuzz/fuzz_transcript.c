/* libFuzzer harness for the tool-calling readers: the first byte picks what the rest is, a saved
   transcript (afm_transcript_from_json) or a tools array (afm_transcript_add_tools_json). A refusal
   must say why and leave the transcript empty; what is accepted must be written back
   (afm_transcript_to_json), read again and written again to the same bytes, rendered as the prompt
   the loop would give the model, and its call schema (the union of the tools) must compile.
   Built with -DAFM_FUZZ_MAIN it replays the files given as arguments. */
#define AFM_IMPLEMENTATION
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *write_json(const afm_transcript *t) {
    size_t n = 0;
    char *s;
    afm_transcript_to_json(t, NULL, 0, &n);
    if (!(s = (char *)malloc(n + 1)) || afm_transcript_to_json(t, s, n + 1, &n) != AFM_OK) abort();
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    afm_transcript *t, *t2;
    char err[256], *a, *b, *prompt, *schema;
    afm_constraint *c = NULL;
    afm_result r;
    int n_e, n_t;
    if (size < 1 || size > 65536) return 0;
    if (afm_transcript_create(NULL, &t) != AFM_OK || afm_transcript_create(NULL, &t2) != AFM_OK) abort();
    err[0] = 0;
    if (data[0] & 1) r = afm_transcript_add_tools_json(t, (const char *)data + 1, size - 1, err, sizeof err);
    else r = afm_transcript_from_json(t, (const char *)data + 1, size - 1, err, sizeof err);
    afm_transcript_entries(t, &n_e);
    afm_transcript_tools(t, &n_t);
#ifdef AFM_FUZZ_MAIN
    printf("%s\n", r == AFM_OK ? "accepted" : err);
#endif
    if (r != AFM_OK) {
        if (!err[0] || n_e || n_t) abort(); /* a refusal says why and keeps nothing */
        goto out;
    }
    a = write_json(t);
    if (afm_transcript_from_json(t2, a, strlen(a), err, sizeof err) != AFM_OK) { fprintf(stderr, "%s\n", err); abort(); }
    b = write_json(t2);
    if (strcmp(a, b) != 0) abort(); /* written, read, written: the same bytes */
    if (!(prompt = afm__transcript_render(t2, ""))) abort();
    if (n_t) {
        if (!(schema = afm__call_schema(&afm__malloc_allocator, afm_transcript_tools(t2, NULL), n_t, NULL))) abort();
        if (afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, schema, strlen(schema), NULL, &c, err, sizeof err) != AFM_OK) {
            fprintf(stderr, "call schema: %s\n", err);
            abort();
        }
        afm_constraint_free(c);
        afm__free(&afm__malloc_allocator, schema);
    }
    afm__free(&afm__malloc_allocator, prompt);
    free(a);
    free(b);
out:
    afm_transcript_free(t);
    afm_transcript_free(t2);
    return 0;
}

#include "replay.h"
