/* Tokenizer tests: vectors from the reference libraries (tests/gen/gen_tok_vectors.py), streaming ==
   one-shot decoding, round trips, the AFM layer, bad inputs.

     cc -std=c99 tests/test_tokenizer.c -o test_tokenizer && ./test_tokenizer
         runs the committed vectors (tests/vectors/tok_*) and the unit tests
     ./test_tokenizer --vectors MODEL KIND VECTORS.txt
         checks one vector file (KIND 1 SentencePiece, 2 tokenizer.json); used for the large local runs
   Closing line: "N passed, N failed". */
#define AFM_IMPLEMENTATION
#define AFM_HF_TOKENIZER /* tokenizer.json too (afm_tokenizer.h) */
#include "../afm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static int g_pass, g_fail, g_fail_shown;
#define CHECK(cond, ...)                                                                                \
    do {                                                                                              \
        if (cond) g_pass++;                                                                           \
        else {                                                                                        \
            g_fail++;                                                                                 \
            if (g_fail_shown++ < 30) {                                                                \
                printf("FAIL %s:%d: ", __FILE__, __LINE__);                                           \
                printf(__VA_ARGS__);                                                                  \
                printf("\n");                                                                         \
            }                                                                                         \
        }                                                                                             \
    } while (0)

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *p;
    long sz;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    p = (unsigned char *)malloc((size_t)sz + 1);
    if (p && fread(p, 1, (size_t)sz, f) != (size_t)sz) {
        free(p);
        p = NULL;
    }
    fclose(f);
    if (p) {
        p[sz] = 0;
        *n = (size_t)sz;
    }
    return p;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}
/* decodes hex in [s, e) into a new buffer */
static char *unhex(const char *s, const char *e, size_t *n) {
    size_t len = (size_t)(e - s) / 2, i;
    char *o = (char *)malloc(len + 1);
    for (i = 0; i < len; i++) o[i] = (char)(hexval(s[2 * i]) * 16 + hexval(s[2 * i + 1]));
    o[len] = 0;
    *n = len;
    return o;
}
static int32_t *parse_ids(const char *s, const char *e, size_t *n) {
    size_t cap = 16;
    int32_t *v = (int32_t *)malloc(cap * sizeof(int32_t));
    *n = 0;
    while (s < e) {
        char *end;
        long x;
        while (s < e && *s == ' ') s++;
        if (s >= e) break;
        x = strtol(s, &end, 10);
        if (end == s) break;
        s = end;
        if (*n == cap) {
            cap *= 2;
            v = (int32_t *)realloc(v, cap * sizeof(int32_t));
        }
        v[(*n)++] = (int32_t)x;
    }
    return v;
}

static int valid_utf8(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t m;
        if (afm__tok_utf8((const unsigned char *)s + i, n - i, &m) < 0) return 0;
        i += m;
    }
    return 1;
}

static void show_ids(const char *what, const int32_t *v, size_t n) {
    size_t i;
    printf("  %s:", what);
    for (i = 0; i < n && i < 40; i++) printf(" %d", (int)v[i]);
    printf("%s\n", n > 40 ? " ..." : "");
}

/* encode with exactly-sized buffer; returns malloc'd ids */
static int32_t *encode(const afm_tokenizer *t, const char *s, size_t n, unsigned flags, size_t *count) {
    size_t need = 0;
    int32_t *ids;
    afm_result r = afm_tokenize(t, s, n, flags, NULL, 0, &need);
    if (r != AFM_OK && r != AFM_ERR_ARG) {
        *count = (size_t)-1;
        return NULL;
    }
    ids = (int32_t *)malloc((need + 1) * sizeof(int32_t));
    r = afm_tokenize(t, s, n, flags, ids, need, count);
    if (r != AFM_OK) *count = (size_t)-1;
    return ids;
}

/* decode one-shot and streaming; checks they agree and that no chunk splits a character */
static char *decode(const afm_tokenizer *t, const int32_t *ids, size_t n, unsigned flags, size_t *len) {
    size_t need = 0, got = 0, i, sl = 0, cap = afm_tokenizer_max_token_bytes(t) + 16;
    char *out, *chunk, *stream;
    afm_detokenizer d;
    afm_result r = afm_detokenize(t, ids, n, flags, NULL, 0, &need);
    CHECK(r == AFM_ERR_ARG || (r == AFM_OK && need == 0), "detokenize sizing returned %d", (int)r);
    out = (char *)malloc(need + 1);
    r = afm_detokenize(t, ids, n, flags, out, need + 1, &got);
    CHECK(r == AFM_OK && got == need, "detokenize returned %d (%lu vs %lu)", (int)r, (unsigned long)got, (unsigned long)need);
    stream = (char *)malloc(need + 1);
    chunk = (char *)malloc(cap);
    afm_detokenizer_init(&d, t, flags);
    for (i = 0; i <= n; i++) {
        size_t m = 0;
        if (i < n) r = afm_detokenizer_push(&d, ids[i], chunk, cap, &m);
        else r = afm_detokenizer_flush(&d, chunk, cap, &m);
        CHECK(r == AFM_OK, "detokenizer_push returned %d", (int)r);
        CHECK(valid_utf8(chunk, m), "streamed chunk is not whole UTF-8 characters");
        if (sl + m <= need) memcpy(stream + sl, chunk, m);
        sl += m;
    }
    CHECK(sl == need && memcmp(stream, out, need) == 0, "streaming decode differs from one-shot (%lu vs %lu bytes)",
          (unsigned long)sl, (unsigned long)need);
    free(stream);
    free(chunk);
    *len = got;
    return out;
}

static int run_vectors(const char *model_path, int kind, const char *vec_path) {
    size_t msize = 0, vsize = 0;
    unsigned char *mdata = read_file(model_path, &msize), *vdata;
    afm_tokenizer *t = NULL;
    char err[256];
    char *line, *next;
    int f0 = g_fail, lineno = 0, lossless;
    if (!mdata) {
        CHECK(0, "cannot read %s", model_path);
        return 1;
    }
    vdata = read_file(vec_path, &vsize);
    if (!vdata) {
        CHECK(0, "cannot read %s", vec_path);
        free(mdata);
        return 1;
    }
    if (afm_tokenizer_load(mdata, msize, kind, NULL, &t, err, sizeof err) != AFM_OK) {
        CHECK(0, "load %s: %s", model_path, err);
        free(mdata);
        free(vdata);
        return 1;
    }
    free(mdata); /* the tokenizer keeps copies */
    /* SentencePiece models that keep every byte: no charsmap, no whitespace folding, byte fallback */
    lossless = kind == 1 && !t->n_trie && !t->remove_extra_ws && t->byte_fallback && t->escape_ws;
    for (line = (char *)vdata; line && *line; line = next) {
        char *f[64], *e = strchr(line, '\n');
        int nf = 0;
        next = e ? e + 1 : NULL;
        if (e) *e = 0;
        lineno++;
        f[nf++] = line;
        while (nf < 64 && (f[nf] = strchr(f[nf - 1], '\t')) != NULL) *f[nf]++ = 0, nf++;
        if ((line[0] == 'E' || line[0] == 'N') && nf >= 4) {
            size_t tl, nexp, ngot, dl, el;
            unsigned flags = line[0] == 'N' ? AFM_TOK_NEWLINE : 0;
            char *text = unhex(f[1], f[1] + strlen(f[1]), &tl);
            int32_t *exp = parse_ids(f[2], f[2] + strlen(f[2]), &nexp);
            int32_t *got = encode(t, text, tl, flags, &ngot);
            char *dexp = unhex(f[3], f[3] + strlen(f[3]), &el), *dec;
            int ok = ngot == nexp && (nexp == 0 || memcmp(exp, got, nexp * sizeof(int32_t)) == 0);
            CHECK(ok, "%s line %d: encode of %.60s differs", vec_path, lineno, text);
            if (!ok && g_fail_shown <= 30) {
                show_ids("expected", exp, nexp);
                if (ngot != (size_t)-1) show_ids("got     ", got, ngot);
            }
            dec = decode(t, exp, nexp, flags, &dl);
            CHECK(dl == el && memcmp(dec, dexp, el) == 0, "%s line %d: decode differs: got \"%.60s\" want \"%.60s\"", vec_path, lineno, dec, dexp);
            if (lossless && valid_utf8(text, tl) && !strstr(text, "\xE2\x96\x81") && !(flags && strstr(text, "<n>")) &&
                strlen(text) == tl)
                CHECK(dl == tl && memcmp(dec, text, tl) == 0, "%s line %d: decode(encode(x)) != x", vec_path, lineno);
            free(text); free(exp); free(got); free(dexp); free(dec);
        } else if (line[0] == 'D' && nf >= 3) {
            size_t n, dl, el;
            int32_t *ids = parse_ids(f[1], f[1] + strlen(f[1]), &n);
            char *dexp = unhex(f[2], f[2] + strlen(f[2]), &el);
            char *dec = decode(t, ids, n, 0, &dl);
            CHECK(dl == el && memcmp(dec, dexp, el) == 0, "%s line %d: decode of ids differs: got \"%.60s\" want \"%.60s\"", vec_path, lineno, dec, dexp);
            free(ids); free(dexp); free(dec);
        } else if (line[0] == 'C' && nf >= 4) {
            int gen = atoi(f[1]), nt = atoi(f[2]), nm, i, k = 3;
            const char *tools[16];
            afm_chat_message msgs[16];
            char *bufs[48];
            int nb = 0;
            size_t dummy, nexp, ngot = 0;
            int32_t *exp, got[4096];
            for (i = 0; i < nt && i < 16; i++) tools[i] = bufs[nb++] = unhex(f[k], f[k] + strlen(f[k]), &dummy), k++;
            nm = atoi(f[k++]);
            for (i = 0; i < nm && i < 16; i++) {
                msgs[i].role = bufs[nb++] = unhex(f[k], f[k] + strlen(f[k]), &dummy), k++;
                msgs[i].content = bufs[nb++] = unhex(f[k], f[k] + strlen(f[k]), &dummy), k++;
            }
            exp = parse_ids(f[k], f[k] + strlen(f[k]), &nexp);
            CHECK(afm_chat_tokenize(t, msgs, nm, tools, nt, gen, got, 4096, &ngot) == AFM_OK && ngot == nexp &&
                      memcmp(got, exp, nexp * sizeof(int32_t)) == 0,
                  "%s line %d: chat prompt ids differ", vec_path, lineno);
            for (i = 0; i < nb; i++) free(bufs[i]);
            free(exp);
        }
    }
    afm_tokenizer_free(t);
    free(vdata);
    printf("%s: %d records, %s\n", vec_path, lineno, g_fail == f0 ? "ok" : "FAILED");
    return g_fail != f0;
}

/* ---- unit tests that need no vectors ---- */
static void test_tool_calls(void) {
    const char *s = "Sure.<executable_start> ```function\nget_weather(city=\"Paris\")\n```<executable_end> and "
                    "<executable_start>```function\nf()```<executable_end><executable_start> partial";
    size_t pos = 0, n;
    const char *c;
    int done;
    CHECK(afm_tool_call_next(s, strlen(s), &pos, &c, &n, &done) == 1 && done && n == strlen("get_weather(city=\"Paris\")") &&
              memcmp(c, "get_weather(city=\"Paris\")", n) == 0, "first tool call");
    CHECK(afm_tool_call_next(s, strlen(s), &pos, &c, &n, &done) == 1 && done && n == 3 && memcmp(c, "f()", 3) == 0, "second tool call");
    CHECK(afm_tool_call_next(s, strlen(s), &pos, &c, &n, &done) == 1 && !done && n == 7 && memcmp(c, "partial", 7) == 0, "partial tool call");
    CHECK(afm_tool_call_next(s, strlen(s), &pos, &c, &n, &done) == 0, "no more tool calls");
}

static void test_chat_render(void) {
    afm_chat_message m[2];
    const char *tools[1];
    char buf[512];
    size_t len = 0;
    m[0].role = "user";
    m[0].content = "Hi\nthere";
    tools[0] = "{\"name\": \"f\"}";
    CHECK(afm_chat_render(m, 1, NULL, 0, 1, buf, sizeof buf, &len) == AFM_OK &&
              strcmp(buf, "<turn_start> system<n>A conversation between a user and a helpful assistant.<turn_end>"
                          "<turn_start> user<n>Hi\nthere<turn_end><turn_start> assistant<n>") == 0 && len == strlen(buf),
          "chat render: %s", buf);
    CHECK(afm_chat_render(m, 1, tools, 1, 0, buf, sizeof buf, &len) == AFM_OK &&
              strcmp(buf, "<turn_start> system<n>A conversation between a user and a helpful assistant.<n>system tools: "
                          "{\"name\": \"f\"}<turn_end><turn_start> user<n>Hi\nthere<turn_end>") == 0,
          "chat render with tools: %s", buf);
    CHECK(afm_chat_render(m, 1, NULL, 0, 1, buf, 10, &len) == AFM_ERR_ARG && len > 10 && strlen(buf) == 9, "chat render small buffer");
}

/* afm.h's JSON reader (tokenizer.json, adapter metadata.json): strict RFC 8259, escapes undone */
static void test_json(void) {
    static const char *bad[] = {
        "", "{", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "{\"a\":}", "{1:2}", "[1 2]", "[1}", "{]", "01", "1.", "1e", "-", "+1",
        ".5", "tru", "nul", "\"abc", "\"a\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"",
        "\"tab\there\"", "[1] 2", "{} {}", "[\"a\" \"b\"]",
        /* a key twice (readers disagree on which counts), also spelt with an escape or deep inside */
        "{\"a\":1,\"a\":2}", "{\"a\":1,\"\\u0061\":1}", "{\"o\":[{\"x\":1,\"y\":2,\"x\":3}]}",
    };
    static const char *good[] = { "0", "-0.5e+3", "true", " null ", "\"\"", "[]", "{}", "[[],{}]", "{\"a\":{\"b\":[1,2,{\"c\":null}]}}",
                                  "{\"a\":{\"a\":1}}", "[{\"a\":1},{\"a\":2}]", "{\"a\":1,\"A\":2,\"a \":3}" };
    afm_allocator a = afm__malloc_allocator;
    afm__json j;
    size_t where = 0, i, len;
    const char *why = "";
    char deep[300], out[64];
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&j, 0, sizeof j);
        CHECK(!afm__json_parse(&a, bad[i], strlen(bad[i]), &j, &where, &why) && where <= strlen(bad[i]) && why[0],
              "JSON refused: %s", bad[i]);
        afm__json_free(&a, &j);
    }
    for (i = 0; i < sizeof good / sizeof good[0]; i++) {
        memset(&j, 0, sizeof j);
        CHECK(afm__json_parse(&a, good[i], strlen(good[i]), &j, &where, &why), "JSON accepted: %s (%s at %lu)", good[i], why, (unsigned long)where);
        afm__json_free(&a, &j);
    }
    for (i = 0; i < sizeof deep; i++) deep[i] = i < 150 ? '[' : ']';
    memset(&j, 0, sizeof j);
    CHECK(!afm__json_parse(&a, deep, sizeof deep, &j, &where, &why) && strstr(why, "deep"), "JSON nested too deeply: %s", why);
    afm__json_free(&a, &j);
    {
        const char *doc = "{\"k\": \"a\\n\\u00e9\\ud83d\\ude42\\\"/\", \"n\": 4096, \"neg\": -1, \"f\": 2.5, \"t\": true,"
                          " \"z\": \"x\\u0000y\"}";
        memset(&j, 0, sizeof j);
        CHECK(afm__json_parse(&a, doc, strlen(doc), &j, &where, &why), "JSON document: %s", why);
        if (j.n) {
            int32_t k = afm__json_get(&j, 0, "k");
            len = afm__json_unescape(&j, k, out);
            CHECK(len == 10 && memcmp(out, "a\n\xc3\xa9\xf0\x9f\x99\x82\"/", 10) == 0, "JSON escapes undone, surrogate pair joined");
            CHECK(afm__json_cstr(&j, k, out, sizeof out) && strlen(out) == 10, "JSON C string");
            CHECK(!afm__json_cstr(&j, k, out, 10), "JSON C string too long for the buffer");
            CHECK(!afm__json_cstr(&j, afm__json_get(&j, 0, "z"), out, sizeof out), "JSON C string with a NUL refused");
            CHECK(afm__json_int(&j, afm__json_get(&j, 0, "n")) == 4096 && afm__json_int(&j, afm__json_get(&j, 0, "neg")) == -1 &&
                      afm__json_int(&j, afm__json_get(&j, 0, "f")) == -1 && afm__json_int(&j, afm__json_get(&j, 0, "missing")) == -1,
                  "JSON integers");
            CHECK(afm__json_bool(&j, afm__json_get(&j, 0, "t"), 0) == 1 && afm__json_bool(&j, -1, 1) == 1, "JSON booleans");
            CHECK(afm__json_get(&j, afm__json_get(&j, 0, "n"), "k") == -1, "JSON get on a non-object");
        }
        afm__json_free(&a, &j);
    }
}

/* hostile inputs must fail cleanly (the fuzzers do much more) */
static void test_bad_models(const char *model_path) {
    size_t n = 0, i;
    unsigned char *d = read_file(model_path, &n);
    afm_tokenizer *t;
    char err[256];
    int ok = 0;
    if (!d) return;
    CHECK(afm_tokenizer_load(d, n, 1, NULL, &t, err, sizeof err) == AFM_OK, "load %s: %s", model_path, err);
    afm_tokenizer_free(t);
    for (i = 0; i < n; i += n / 97 + 1) {
        afm_result r = afm_tokenizer_load(d, i, 1, NULL, &t, err, sizeof err);
        if (r == AFM_OK) afm_tokenizer_free(t);
        else if (t == NULL && err[0]) ok++;
    }
    CHECK(ok > 0, "truncated models are refused with a message");
    CHECK(afm_tokenizer_load("\x08\x03", 2, 1, NULL, &t, err, sizeof err) != AFM_OK && t == NULL, "garbage refused");
    CHECK(afm_tokenizer_load(d, n, 7, NULL, &t, err, sizeof err) == AFM_ERR_UNSUPPORTED, "unknown kind refused");
    {
        /* a second trainer_spec field merges into the first (protobuf rules): model_type = UNIGRAM */
        unsigned char *u = (unsigned char *)malloc(n + 4);
        memcpy(u, d, n);
        memcpy(u + n, "\x12\x02\x18\x01", 4);
        CHECK(afm_tokenizer_load(u, n + 4, 1, NULL, &t, err, sizeof err) == AFM_ERR_UNSUPPORTED && strstr(err, "UNIGRAM"),
              "a unigram model is refused by name: %s", err);
        memcpy(u + n, "\x12\x02\x18\x02", 4); /* BPE again */
        CHECK(afm_tokenizer_load(u, n + 4, 1, NULL, &t, err, sizeof err) == AFM_OK, "merged trainer_spec: %s", err);
        afm_tokenizer_free(t);
        free(u);
    }
    free(d);
}

static void test_api_edges(const char *model_path) {
    size_t n = 0, cnt = 0;
    unsigned char *d = read_file(model_path, &n);
    afm_tokenizer *t;
    int32_t ids[4];
    char err[256];
    if (!d) return;
    if (afm_tokenizer_load(d, n, 1, NULL, &t, err, sizeof err) != AFM_OK) {
        CHECK(0, "load: %s", err);
        free(d);
        return;
    }
    CHECK(afm_tokenize(t, "", 0, 0, NULL, 0, &cnt) == AFM_OK && cnt == 0, "empty text");
    CHECK(afm_tokenize(t, "hello world, this is long", 25, 0, ids, 2, &cnt) == AFM_ERR_ARG && cnt > 2, "small token buffer");
    CHECK(afm_tokenize(t, NULL, 3, 0, ids, 4, &cnt) == AFM_ERR_ARG, "NULL text");
    CHECK(afm_detokenize(t, ids, 1, 0, err, sizeof err, &cnt) == AFM_OK, "decode");
    ids[0] = -1;
    CHECK(afm_detokenize(t, ids, 1, 0, err, sizeof err, &cnt) == AFM_ERR_ARG, "decode bad id");
    ids[0] = afm_tokenizer_n_vocab(t);
    CHECK(afm_detokenize(t, ids, 1, 0, err, sizeof err, &cnt) == AFM_ERR_ARG, "decode id past vocab");
    CHECK(afm_tokenizer_special(t, AFM_SPECIAL_TURN_END) >= 0 && afm_tokenizer_is_stop(t, afm_tokenizer_special(t, AFM_SPECIAL_TURN_END)),
          "<turn_end> is a stop token");
    {
        /* AFM_TOK_SPECIAL: control pieces in the text become tokens; without it they are text */
        int32_t v[64];
        size_t nv = 0;
        int32_t bos = afm_tokenizer_special(t, AFM_SPECIAL_BOS), eos = afm_tokenizer_special(t, AFM_SPECIAL_EOS);
        char text[64];
        CHECK(bos >= 0 && eos >= 0 && afm_tokenizer_token_type(t, bos) == AFM_TOKEN_CONTROL, "bos/eos are control pieces");
        CHECK(afm_tokenize(t, "<s>hi</s>", 9, AFM_TOK_SPECIAL, v, 64, &nv) == AFM_OK && nv >= 3 && v[1] == bos && v[nv - 1] == eos,
              "control pieces matched with AFM_TOK_SPECIAL");
        CHECK(afm_tokenize(t, "<s>hi</s>", 9, 0, v, 64, &nv) == AFM_OK && v[1] != bos && v[nv - 1] != eos, "control pieces are text without it");
        CHECK(afm_tokenize(t, "<s>hi</s>", 9, AFM_TOK_SPECIAL, v, 64, &nv) == AFM_OK &&
                  afm_detokenize(t, v, nv, AFM_TOK_SPECIAL, text, sizeof text, &cnt) == AFM_OK && strcmp(text, "<s>hi</s>") == 0,
              "AFM_TOK_SPECIAL decode writes control pieces: %s", text);
        CHECK(afm_detokenize(t, v, nv, 0, text, sizeof text, &cnt) == AFM_OK && strcmp(text, "hi") == 0, "control pieces decode to nothing: %s", text);
        /* the AFM layer: newlines <-> <n> */
        CHECK(afm_tokenize(t, "a\nb", 3, AFM_TOK_NEWLINE, v, 64, &nv) == AFM_OK && nv >= 3 && v[nv - 2] == afm_tokenizer_special(t, AFM_SPECIAL_NEWLINE),
              "newline becomes <n>");
        CHECK(afm_detokenize(t, v, nv, AFM_TOK_NEWLINE, text, sizeof text, &cnt) == AFM_OK && strcmp(text, "a\nb") == 0, "<n> decodes to a newline");
        CHECK(afm_detokenize(t, v, nv, 0, text, sizeof text, &cnt) == AFM_OK && strcmp(text, "a<n>b") == 0, "<n> is text without the flag");
        CHECK(afm_tokenizer_piece_id(t, "<turn_end>", 10) == afm_tokenizer_special(t, AFM_SPECIAL_TURN_END), "piece_id");
        {
            size_t pl = 0;
            const char *pp = afm_tokenizer_piece(t, afm_tokenizer_special(t, AFM_SPECIAL_EXEC_START), &pl);
            CHECK(pp && pl == 18 && memcmp(pp, "<executable_start>", 18) == 0, "piece text");
        }
    }
    afm_tokenizer_free(t);
    free(d);
}

/* allocator hooks: every allocation is freed, and running out of memory at any point fails cleanly */
typedef struct counting { long allocs, frees, fail_at; } counting;
static void *c_alloc(void *user, size_t n) {
    counting *c = (counting *)user;
    if (c->fail_at >= 0 && c->allocs >= c->fail_at) return NULL;
    c->allocs++;
    return malloc(n);
}
static void c_free(void *user, void *p) {
    counting *c = (counting *)user;
    if (p) c->frees++;
    free(p);
}
static void test_allocator(const char *path, int kind) {
    size_t n = 0, cnt = 0;
    unsigned char *d = read_file(path, &n);
    afm_tokenizer *t;
    afm_allocator a;
    counting c;
    char err[256];
    long total, k, ok_fail = 0, tries = 0;
    int32_t ids[256];
    if (!d) { CHECK(0, "cannot read %s", path); return; }
    a.alloc = c_alloc;
    a.free = c_free;
    a.user = &c;
    memset(&c, 0, sizeof c);
    c.fail_at = -1;
    CHECK(afm_tokenizer_load(d, n, kind, &a, &t, err, sizeof err) == AFM_OK, "load with an allocator: %s", err);
    CHECK(afm_tokenize(t, "Hello, world! \xe6\x97\xa5\xe6\x9c\xac", 20, AFM_TOK_NEWLINE, ids, 256, &cnt) == AFM_OK, "encode with an allocator");
    afm_tokenizer_free(t);
    total = c.allocs;
    CHECK(c.allocs == c.frees && total > 0, "%s: %ld allocations, %ld frees", path, c.allocs, c.frees);
    for (k = 0; k < total; k += total / 40 + 1) {
        afm_result r;
        memset(&c, 0, sizeof c);
        c.fail_at = k;
        r = afm_tokenizer_load(d, n, kind, &a, &t, err, sizeof err);
        tries++;
        if (r == AFM_ERR_NOMEM && t == NULL) ok_fail++;
        if (r == AFM_OK) {
            /* loading got through: running out of memory while encoding must fail cleanly too */
            afm_result e2 = afm_tokenize(t, "Hello, world! \xe6\x97\xa5\xe6\x9c\xac", 20, AFM_TOK_NEWLINE, ids, 256, &cnt);
            if (e2 == AFM_OK || e2 == AFM_ERR_NOMEM) ok_fail++;
            afm_tokenizer_free(t);
        }
        if (c.allocs != c.frees) break;
    }
    CHECK(ok_fail == tries && c.allocs == c.frees, "%s: out of memory at every point fails cleanly (%ld of %ld)", path, ok_fail, tries);
    free(d);
}

static const char *g_vectors[][3] = {
    /* model, kind, vectors */
    {"tests/vectors/tok_afm1k_id.model", "1", "tests/vectors/tok_afm1k_id.txt"},
    {"tests/vectors/tok_afm8k_nfkc.model", "1", "tests/vectors/tok_afm8k_nfkc.txt"},
    {"tests/vectors/tok_bpe4k_nofb_cf.model", "1", "tests/vectors/tok_bpe4k_nofb_cf.txt"},
    {"tests/vectors/tok_bpe3k_suffix_nodp.model", "1", "tests/vectors/tok_bpe3k_suffix_nodp.txt"},
    {"tests/vectors/tok_hf_gpt2_nfkc.json", "2", "tests/vectors/tok_hf_gpt2_nfkc.txt"},
    {"tests/vectors/tok_hf_gpt2_prefix.json", "2", "tests/vectors/tok_hf_gpt2_prefix.txt"},
    {"tests/vectors/tok_hf_llama3.json", "2", "tests/vectors/tok_hf_llama3.txt"},
    {"tests/vectors/tok_hf_qwen2_nfc.json", "2", "tests/vectors/tok_hf_qwen2_nfc.txt"},
};

/* --unicode-dump IN OUT: the Unicode tables and the hand-written pre-tokenizers/normalizers, for
   tests/gen/check_unicode_tables.py to compare with the `regex` module and unicodedata */
static int unicode_dump(const char *in, const char *out) {
    size_t n = 0, a;
    unsigned char *d = read_file(in, &n);
    char path[1024];
    FILE *f;
    int32_t c;
    int k;
    static const char *pats[3] = {"gpt2", "llama3", "qwen2"};
    static const char *forms[4] = {"nfd", "nfc", "nfkd", "nfkc"};
    FILE *pf[3], *nf[4];
    afm_allocator m = afm__malloc_allocator;
    afm__tok_buf b;
    if (!d) return 1;
    memset(&b, 0, sizeof b);
    snprintf(path, sizeof path, "%s.classes", out);
    f = fopen(path, "wb");
    if (!f) return 1;
    for (c = 0; c < 0x110000; c++) fputc((int)afm__tok_class(c), f);
    fclose(f);
    for (k = 0; k < 3; k++) {
        snprintf(path, sizeof path, "%s.%s", out, pats[k]);
        pf[k] = fopen(path, "wb");
    }
    for (k = 0; k < 4; k++) {
        snprintf(path, sizeof path, "%s.%s", out, forms[k]);
        nf[k] = fopen(path, "wb");
    }
    for (a = 0; a < n;) {
        size_t e = a, i;
        while (e < n && d[e] != '\n') e++;
        for (k = 0; k < 3; k++) {
            for (i = a; i < e;) {
                size_t end = afm__tok_pretok_match(k + 1, (const char *)d + a, e - a, i - a) + a;
                fprintf(pf[k], "%s%lu", i == a ? "" : " ", (unsigned long)(end - i));
                i = end;
            }
            fputc('\n', pf[k]);
        }
        for (k = 0; k < 4; k++) {
            b.n = 0;
            afm__tok_nf(&m, (const char *)d + a, e - a, k, &b);
            fwrite(b.p, 1, b.n, nf[k]);
            fputc('\n', nf[k]);
        }
        a = e + 1;
    }
    for (k = 0; k < 3; k++) fclose(pf[k]);
    for (k = 0; k < 4; k++) fclose(nf[k]);
    afm__free(&m, b.p);
    free(d);
    return 0;
}

int main(int argc, char **argv) {
    size_t i;
    if (argc == 4 && strcmp(argv[1], "--unicode-dump") == 0) return unicode_dump(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "--vectors") == 0) {
        run_vectors(argv[2], atoi(argv[3]), argv[4]);
    } else {
        for (i = 0; i < sizeof g_vectors / sizeof g_vectors[0]; i++)
            run_vectors(g_vectors[i][0], atoi(g_vectors[i][1]), g_vectors[i][2]);
        test_tool_calls();
        test_chat_render();
        test_json();
        test_bad_models(g_vectors[0][0]);
        test_api_edges(g_vectors[0][0]);
        test_allocator("tests/vectors/tok_afm8k_nfkc.model", 1);
        test_allocator("tests/vectors/tok_hf_gpt2_prefix.json", 2);
    }
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
