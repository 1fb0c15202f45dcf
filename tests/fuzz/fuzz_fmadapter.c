/* libFuzzer harness for the .fmadapter package reader (afm_adapter_load_fmadapter_memory)
   against the fake toolkit base tests/vectors/toolkit.afm (run from the repository root).
   Input: u32 little-endian length of metadata.json, metadata.json, then adapter_weights.bin.
   Built with -DAFM_FUZZ_MAIN it replays packed files or package directories given as arguments. */
#define AFM_IMPLEMENTATION
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static afm_model *base_model(void) {
    static afm_model *m; /* the harness's own state, loaded once */
    char err[256];
    if (!m && afm_model_load_file("tests/vectors/toolkit.afm", NULL, &m, err, sizeof err) != AFM_OK) {
        fprintf(stderr, "fuzz_fmadapter: %s (run from the repository root)\n", err);
        abort();
    }
    return m;
}

static void try_package(const char *json, size_t json_size, const uint8_t *w, size_t w_size) {
    afm_adapter *ad = NULL;
    char err[512];
    afm_model *m = base_model();
    if (afm_adapter_load_fmadapter_memory(m, json, json_size, w, w_size, &ad, err, sizeof err) != AFM_OK) {
        if (!err[0] || ad) abort(); /* a refusal must say why and return nothing */
        return;
    }
    {   /* a loaded adapter must run */
        afm_session *s;
        int32_t toks[2] = { 1, 2 };
        if (afm_session_create(m, NULL, &s) == AFM_OK) {
            afm_session_set_adapter(s, ad);
            afm_session_eval(s, toks, 2);
            afm_session_free(s);
        }
    }
    afm_adapter_free(ad);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint32_t n;
    if (size < 4) return 0;
    n = (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 | (uint32_t)data[3] << 24;
    if (n > size - 4) return 0;
    try_package((const char *)data + 4, n, data + 4 + n, size - 4 - n);
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

int main(int argc, char **argv) {
    int i;
    for (i = 1; i < argc; i++) {
        char p[1024];
        size_t js = 0, ws = 0;
        unsigned char *j, *w;
        snprintf(p, sizeof p, "%s/metadata.json", argv[i]);
        j = slurp(p, &js);
        snprintf(p, sizeof p, "%s/adapter_weights.bin", argv[i]);
        w = slurp(p, &ws);
        if (j || w) try_package((const char *)(j ? j : (unsigned char *)""), j ? js : 0, w ? w : (unsigned char *)"", w ? ws : 0);
        else if ((w = slurp(argv[i], &ws)) != NULL) LLVMFuzzerTestOneInput(w, ws);
        free(j);
        free(w);
    }
    printf("replayed %d inputs\n", argc - 1);
    afm_model_free(base_model());
    return 0;
}
#endif
