/* libFuzzer harness for the constraint compilers: the first byte picks the kind (regular
   expression, GBNF grammar, JSON Schema), the rest is the text. What compiles is then driven: a
   few dozen steps of masks over a small vocabulary (every byte and some multi-byte tokens),
   advancing by tokens the input chooses, checking that every chosen allowed token advances and
   that rewinding gives the same mask back, also after other masks went through the cache. Built with -DAFM_FUZZ_MAIN it replays files instead. */
#define AFM_IMPLEMENTATION
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const g_multi[] = { "{\"", "\":", "\",\"", "true", "null", "12", "\xE6\x97\xA5", "\xE6\x97", "ab", "\\n", NULL };
static afm_constraint_vocab *g_vocab;

static afm_constraint_vocab *make_vocab(void) {
    afm_constraint_vocab *v = (afm_constraint_vocab *)afm__calloc(&afm__malloc_allocator, 1, sizeof *v);
    int n_multi = 0, V, i;
    size_t total = 256;
    while (g_multi[n_multi]) total += strlen(g_multi[n_multi++]);
    V = 256 + n_multi + 1;
    v->alloc = afm__malloc_allocator;
    v->n_vocab = V;
    v->kind = (uint8_t *)afm__calloc(&v->alloc, (size_t)V, 1);
    v->boff = (uint32_t *)afm__alloc(&v->alloc, ((size_t)V + 1) * sizeof *v->boff);
    v->bytes = (unsigned char *)afm__alloc(&v->alloc, total);
    v->stops = (int32_t *)afm__alloc(&v->alloc, sizeof *v->stops);
    for (i = 0, total = 0; i < V; i++) {
        v->boff[i] = (uint32_t)total;
        if (i < 256) { v->bytes[total++] = (unsigned char)i; v->kind[i] = 1; }
        else if (i < V - 1) { memcpy(v->bytes + total, g_multi[i - 256], strlen(g_multi[i - 256])); total += strlen(g_multi[i - 256]); v->kind[i] = 1; }
        else v->kind[i] = 2;
    }
    v->boff[V] = (uint32_t)total;
    v->stops[0] = V - 1;
    v->n_stops = 1;
    if (afm__vocab_tree(v) != AFM_OK) abort();
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    afm_constraint *c = NULL;
    afm_constraint_state *m = NULL;
    char err[256];
    int step;
    if (!g_vocab) g_vocab = make_vocab();
    if (size < 1 || size > 65536) return 0;
    if (afm_constraint_compile((afm_constraint_kind)(1 + data[0] % 3), (const char *)data + 1, size - 1, NULL, &c, err, sizeof err) != AFM_OK) {
        if (c || !err[0]) abort(); /* a failure always says why */
        return 0;
    }
    if (afm_constraint_state_create(c, g_vocab, &m) != AFM_OK) { afm_constraint_free(c); return 0; }
    for (step = 0; step < 48; step++) {
        const uint32_t *mask = afm_constraint_state_mask(m);
        int32_t t, pick = -1, n = 0, want;
        if (!mask) break; /* failed cleanly (too ambiguous, out of memory) */
        want = (int32_t)(data[(size_t)step % size] * 7 + step);
        for (t = 0; t < g_vocab->n_vocab; t++)
            if ((mask[t >> 5] >> (t & 31)) & 1) { if (n++ <= want % 97) pick = t; }
        if (pick < 0) break;
        if (afm_constraint_state_advance(m, pick) != AFM_OK) abort(); /* an allowed token always advances */
    }
    if (afm_constraint_state_n_tokens(m) > 0) { /* rewind one token: the mask is the same as before it */
        int n = afm_constraint_state_n_tokens(m);
        const uint32_t *a;
        uint32_t *copy = (uint32_t *)malloc((size_t)m->words * 4);
        afm_constraint_state_rewind(m, n - 1);
        if ((a = afm_constraint_state_mask(m)) != NULL) {
            size_t k;
            memcpy(copy, a, (size_t)m->words * 4);
            for (k = 0; k < m->n_hist; k++) afm__cm_mask(m, m->hist[k]); /* churn the mask cache */
            a = afm_constraint_state_mask(m);
            if (a && memcmp(copy, a, (size_t)m->words * 4) != 0) abort();
        }
        free(copy);
    }
    afm_constraint_state_free(m);
    afm_constraint_free(c);
    return 0;
}

#ifdef AFM_FUZZ_MAIN
int main(int argc, char **argv) {
    int i;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        long n;
        uint8_t *buf;
        if (!f) { fprintf(stderr, "cannot open %s\n", argv[i]); return 1; }
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        rewind(f);
        buf = (uint8_t *)malloc((size_t)n + 1);
        if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) return 1;
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)n);
        free(buf);
    }
    afm_constraint_vocab_free(g_vocab);
    printf("replayed %d inputs\n", argc - 1);
    return 0;
}
#endif
