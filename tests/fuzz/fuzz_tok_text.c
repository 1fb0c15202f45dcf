/* libFuzzer harness for encoding and decoding: the input is text (and, read another way, token ids)
   for fixed tokenizers from tests/vectors (SentencePiece with and without a charsmap and byte
   fallback, tokenizer.json GPT-2/NFKC and Llama-3). Checks: ids in range, the buffer-size contract,
   streaming decode == one-shot decode, no chunk ends inside a character, and decode(encode(x)) == x
   for valid UTF-8 on the lossless SentencePiece model.
   Run from the repository root (the models are read from tests/vectors). Build as fuzz_tok_load.c. */
#define AFM_IMPLEMENTATION
#define AFM_HF_TOKENIZER /* tokenizer.json too (afm_tokenizer.h) */
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *g_paths[][2] = {
    {"tests/vectors/tok_afm1k_id.model", "1"}, {"tests/vectors/tok_afm8k_nfkc.model", "1"},
    {"tests/vectors/tok_bpe4k_nofb_cf.model", "1"}, {"tests/vectors/tok_hf_gpt2_nfkc.json", "2"},
    {"tests/vectors/tok_hf_llama3.json", "2"},
};
#define N_TOK (sizeof g_paths / sizeof g_paths[0])
static afm_tokenizer *g_tok[N_TOK];

static void load_all(void) {
    size_t i;
    for (i = 0; i < N_TOK; i++) {
        FILE *f = fopen(g_paths[i][0], "rb");
        long n;
        char *buf, err[256];
        if (!f) { fprintf(stderr, "run from the repository root: cannot open %s\n", g_paths[i][0]); abort(); }
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        rewind(f);
        buf = (char *)malloc((size_t)n);
        if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) abort();
        fclose(f);
        if (afm_tokenizer_load(buf, (size_t)n, atoi(g_paths[i][1]), NULL, &g_tok[i], err, sizeof err) != AFM_OK) {
            fprintf(stderr, "%s: %s\n", g_paths[i][0], err);
            abort();
        }
        free(buf);
    }
}

static int valid_utf8(const char *s, size_t n) {
    size_t i = 0, m;
    while (i < n) {
        if (afm__tok_utf8((const unsigned char *)s + i, n - i, &m) < 0) return 0;
        i += m;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t i;
    if (!g_tok[0]) load_all();
    if (size > 8192) return 0;
    for (i = 0; i < N_TOK; i++) {
        const afm_tokenizer *t = g_tok[i];
        unsigned flags = size ? data[0] & 3 : 0;
        size_t n = 0, n2 = 0, len = 0, k, total = 0, m, cap = afm_tokenizer_max_token_bytes(t) + 16;
        int32_t *ids, small[2];
        char *out, *chunk;
        afm_detokenizer d;
        afm_result r = afm_tokenize(t, (const char *)data, size, flags, NULL, 0, &n);
        if (r != AFM_OK && r != AFM_ERR_ARG) abort();
        ids = (int32_t *)malloc((n + 1) * sizeof(int32_t));
        if (afm_tokenize(t, (const char *)data, size, flags, ids, n, &n2) != AFM_OK || n2 != n) abort();
        if (n > 2 && (afm_tokenize(t, (const char *)data, size, flags, small, 2, &n2) != AFM_ERR_ARG || n2 != n ||
                      small[0] != ids[0] || small[1] != ids[1])) abort();
        for (k = 0; k < n; k++)
            if (ids[k] < 0 || ids[k] >= afm_tokenizer_n_vocab(t)) abort();
        afm_detokenize(t, ids, n, flags, NULL, 0, &len);
        out = (char *)malloc(len + 1);
        if (afm_detokenize(t, ids, n, flags, out, len + 1, &m) != AFM_OK || m != len) abort();
        if (i == 0 && !(flags & AFM_TOK_SPECIAL) && valid_utf8((const char *)data, size) && !memchr(data, 0, size)) {
            /* tok_afm1k_id keeps every byte: decode(encode(x)) == x unless x has U+2581 or a literal <n> */
            int plain = 1;
            for (k = 0; k + 2 < size; k++)
                if (data[k] == 0xE2 && data[k + 1] == 0x96 && data[k + 2] == 0x81) plain = 0;
            for (k = 0; k + 2 < size; k++)
                if (data[k] == '<' && data[k + 1] == 'n' && data[k + 2] == '>') plain = 0;
            for (k = 0; k + 3 < size; k++)
                if (data[k] == '<' && memchr("tex", data[k + 1], 3)) plain = 0; /* user-defined pieces */
            if (plain && (len != size || memcmp(out, data, size) != 0)) abort();
        }
        chunk = (char *)malloc(cap);
        afm_detokenizer_init(&d, t, flags);
        for (k = 0; k <= n; k++) {
            r = k < n ? afm_detokenizer_push(&d, ids[k], chunk, cap, &m) : afm_detokenizer_flush(&d, chunk, cap, &m);
            if (r != AFM_OK || total + m > len || memcmp(out + total, chunk, m) != 0 || !valid_utf8(chunk, m)) abort();
            total += m;
        }
        if (total != len) abort();
        free(chunk);
        free(out);
        free(ids);
        /* the input as token ids */
        if (size >= 4) {
            int32_t v[256];
            size_t nv = 0;
            for (k = 0; k + 2 < size && nv < 256; k += 2)
                v[nv++] = (int32_t)(((uint32_t)data[k] | ((uint32_t)data[k + 1] << 8)) % (uint32_t)afm_tokenizer_n_vocab(t));
            afm_detokenize(t, v, nv, flags, NULL, 0, &len);
        }
    }
    return 0;
}

#include "replay.h"
