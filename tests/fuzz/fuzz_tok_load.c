/* libFuzzer harness for tokenizer loading: the first byte picks the kind (even: SentencePiece
   ModelProto, odd: tokenizer.json), the rest is the file. A file that loads is then used: a few
   encodes (including of the input itself, as text, with every flag), decodes of ids taken from the
   input, streaming decode against one-shot decode.
   Build: clang -fsanitize=fuzzer,address,undefined (make fuzz-tok), or -DAFM_FUZZ_MAIN to replay files. */
#define AFM_IMPLEMENTATION
#define AFM_HF_TOKENIZER /* tokenizer.json too (afm_tokenizer.h) */
#include "../../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void exercise(const afm_tokenizer *t, const uint8_t *data, size_t size) {
    static const char *texts[] = {"Hello world", " a  b\n\nc ", "<n><turn_start> user<n>", "\xff\xfe\xe2\x82", "\xe6\x97\xa5\xe6\x9c\xac"};
    int32_t ids[512];
    char out[4096], chunk[4096];
    size_t i, n = 0, len = 0, total = 0, m;
    unsigned f;
    afm_detokenizer d;
    int nv = afm_tokenizer_n_vocab(t);
    if (nv <= 0) abort();
    for (f = 0; f < 4; f++) {
        for (i = 0; i < sizeof texts / sizeof texts[0] + 1; i++) {
            const char *s = i < sizeof texts / sizeof texts[0] ? texts[i] : (const char *)data;
            size_t sl = i < sizeof texts / sizeof texts[0] ? strlen(texts[i]) : (size < 2048 ? size : 2048);
            afm_result r = afm_tokenize(t, s, sl, f, ids, 512, &n);
            size_t k;
            if (r != AFM_OK && r != AFM_ERR_ARG && r != AFM_ERR_NOMEM) abort();
            if (r != AFM_OK) continue;
            for (k = 0; k < n; k++)
                if (ids[k] < 0 || ids[k] >= nv) abort();
            afm_detokenize(t, ids, n, f, out, sizeof out, &len);
        }
    }
    /* ids from the input bytes */
    n = 0;
    for (i = 0; i + 3 < size && n < 512; i += 3) ids[n++] = (int32_t)(((uint32_t)data[i] | ((uint32_t)data[i + 1] << 8) | ((uint32_t)data[i + 2] << 16)) % (uint32_t)nv);
    if (afm_detokenize(t, ids, n, 0, out, sizeof out, &len) == AFM_OK) {
        afm_detokenizer_init(&d, t, 0);
        for (i = 0; i <= n; i++) {
            afm_result r = i < n ? afm_detokenizer_push(&d, ids[i], chunk, sizeof chunk, &m) : afm_detokenizer_flush(&d, chunk, sizeof chunk, &m);
            if (r != AFM_OK) abort();
            if (total + m > len || memcmp(out + total, chunk, m) != 0) abort(); /* streaming == one-shot */
            total += m;
        }
        if (total != len) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    afm_tokenizer *t = NULL;
    char err[512];
    int kind;
    if (size < 1) return 0;
    kind = (data[0] & 1) ? AFM_TOKENIZER_HF_JSON : AFM_TOKENIZER_SENTENCEPIECE;
    err[0] = 0;
    if (afm_tokenizer_load(data + 1, size - 1, kind, NULL, &t, err, sizeof err) != AFM_OK) {
        if (!err[0] || t) abort(); /* every refusal says why */
        return 0;
    }
    exercise(t, data + 1, size - 1);
    afm_tokenizer_free(t);
    return 0;
}

#include "replay.h"
