/* Constraint tests: masks against a brute-force oracle along random walks over many regular
   expressions, grammars and schemas; what the compilers accept and reject (with the error they
   give); fast-forward; rewinding; masked sampling; the model's own tokenizer.

     cc -std=c99 tests/test_constrain.c -o test_constrain -lm -lpthread && ./test_constrain
   Closing line: "N passed, N failed". */
#define AFM_IMPLEMENTATION
#define AFM__VOCAB_BIG 2 /* the prefix tree's subtree shortcut on small vocabularies too */
#include "../afm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_pass, g_fail, g_fail_shown;
#define CHECK(cond, ...)                                                                              \
    do {                                                                                            \
        if (cond) g_pass++;                                                                         \
        else {                                                                                      \
            g_fail++;                                                                               \
            if (g_fail_shown++ < 30) {                                                              \
                printf("FAIL %s:%d: ", __FILE__, __LINE__);                                         \
                printf(__VA_ARGS__);                                                                \
                printf("\n");                                                                       \
            }                                                                                       \
        }                                                                                           \
    } while (0)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}

/* A small vocabulary that splits characters and JSON punctuation in many ways: every single
   byte (as byte-fallback tokens would), pieces of UTF-8 characters, and multi-character tokens
   that cross the boundaries between JSON's parts. The last token is the stop token. */
static const char *const k_pieces[] = {
    "{\"", "\"}", "\":", "\":\"", "\",\"", "\",", "},", "[{", "}]", "\"]", "[\"", "true", "false", "null", "tru", "nu",
    "ll", "12", "0.", "e+", "-1", "name", "age", "\"name\":\"", "\xC3\xA9", "\xE6\x97\xA5", "\xE6\x97\xA5\xE6\x9C\xAC",
    "\xE6\x97", "\xA5\"", "ab", "abc", "a\"", "\\n", "\\\"", "  ", "id", "\"id\":", "00", "99", "123", "1.5", ".5", "e-",
    "\":[", "],", ":{", "\":{\"", "\"tags\":[", "hello", " world", "x", "xy", "yes", "no", "\"yes\"", "\"no\"", "1,", "0,",
    "\\u00", "\\\\", "\xF0\x9F", "\x99\x82", "\xF0\x9F\x99\x82", "==", "->", "foo", "bar", "a-z", "\n\n", NULL };

static afm_constraint_vocab *make_vocab(void) {
    afm_constraint_vocab *v = (afm_constraint_vocab *)afm__calloc(&afm__malloc_allocator, 1, sizeof *v);
    int n_multi = 0, V, i;
    size_t total = 0;
    while (k_pieces[n_multi]) total += strlen(k_pieces[n_multi++]);
    V = 256 + n_multi + 1;
    v->alloc = afm__malloc_allocator;
    v->n_vocab = V;
    v->kind = (uint8_t *)afm__calloc(&v->alloc, (size_t)V, 1);
    v->boff = (uint32_t *)afm__alloc(&v->alloc, ((size_t)V + 1) * sizeof *v->boff);
    v->bytes = (unsigned char *)afm__alloc(&v->alloc, total + 256 + 1);
    v->stops = (int32_t *)afm__alloc(&v->alloc, sizeof *v->stops);
    total = 0;
    for (i = 0; i < V; i++) {
        v->boff[i] = (uint32_t)total;
        if (i < 256) { v->bytes[total++] = (unsigned char)i; v->kind[i] = 1; }
        else if (i < V - 1) {
            size_t n = strlen(k_pieces[i - 256]);
            memcpy(v->bytes + total, k_pieces[i - 256], n);
            total += n;
            v->kind[i] = 1;
        } else v->kind[i] = 2;
    }
    v->boff[V] = (uint32_t)total;
    v->stops[0] = V - 1;
    v->n_stops = 1;
    if (afm__vocab_tree(v) != AFM_OK) { printf("vocabulary tree failed\n"); exit(1); }
    return v;
}

/* The brute-force oracle: token t is allowed iff stepping its bytes one at a time (no prefix tree,
   no mask cache) keeps the matcher alive; the stop token iff the state accepts. The byte steps are
   the memoised ones; memo_agrees() checks every memoised step against a fresh computation. */
static int oracle(afm_constraint_state *m, int32_t s, int32_t t) {
    const afm_constraint_vocab *v = m->v;
    uint32_t k;
    if (v->kind[t] == 2) return m->sacc[s];
    if (!v->kind[t]) return 0;
    for (k = v->boff[t]; k < v->boff[t + 1] && s >= 0; k++) s = afm__cm_step(m, s, v->bytes[k]);
    return s >= 0;
}
static int memo_agrees(afm_constraint_state *m) {
    size_t s, n = m->n_s;
    unsigned b;
    for (s = 0; s < n; s++)
        for (b = 0; b < 256 && m->str[s] >= 0; b++) {
            int32_t memo = AFM__CM_ROW(m->trans, m->str[s])[b];
            if (memo != AFM__CM_UNKNOWN && memo != afm__cm_step_slow(m, (int32_t)s, b)) return 0;
        }
    return 1;
}

/* Random walks: at every step the mask equals the oracle for every token; then a random allowed
   token is appended. Returns the number of walks that ended complete. */
static int walks(const char *what, afm_constraint *c, afm_constraint_vocab *v, int n_walks, int max_len) {
    afm_constraint_state *m = NULL;
    int w, complete = 0, bad = 0;
    CHECK(afm_constraint_state_create(c, v, &m) == AFM_OK, "%s: state", what);
    if (!m) return 0;
    for (w = 0; w < n_walks && !bad; w++) {
        int step;
        afm_constraint_state_rewind(m, 0);
        for (step = 0; step < max_len && !bad; step++) {
            const uint32_t *mask = afm_constraint_state_mask(m);
            int32_t s = m->hist[m->n_hist - 1], t, pick = -1, n_allowed = 0;
            if (!mask) { CHECK(0, "%s: mask failed: %s", what, afm_constraint_state_error(m)); bad = 1; break; }
            for (t = 0; t < v->n_vocab; t++) {
                int got = (int)((mask[t >> 5] >> (t & 31)) & 1), want = s >= 0 ? oracle(m, s, t) : 0;
                if (got != want) {
                    CHECK(0, "%s: walk %d step %d: token %d mask %d, oracle %d", what, w, step, t, got, want);
                    bad = 1;
                    break;
                }
                if (got && rnd() % (unsigned)++n_allowed == 0) pick = t; /* reservoir sampling */
            }
            if (bad) break;
            if (pick < 0) { /* nothing allowed: only after the stop token */
                CHECK(s == -4, "%s: walk %d step %d: no token allowed in a live state", what, w, step);
                break;
            }
            if (afm_constraint_state_advance(m, pick) != AFM_OK) { CHECK(0, "%s: advance of an allowed token failed", what); bad = 1; }
        }
        if (afm_constraint_state_complete(m)) complete++;
    }
    CHECK(!bad, "%s: masks equal the oracle over %d random walks", what, n_walks);
    CHECK(memo_agrees(m), "%s: every memoised transition equals a fresh step", what);
    afm_constraint_state_free(m);
    return complete;
}

/* Whole strings: accepted iff stepping all bytes ends in an accepting state. */
static int matches(afm_constraint *c, afm_constraint_vocab *v, const char *str) {
    afm_constraint_state *m = NULL;
    int32_t s;
    size_t i, n = strlen(str);
    int ok;
    if (afm_constraint_state_create(c, v, &m) != AFM_OK) return -1;
    s = m->hist[0];
    for (i = 0; i < n && s >= 0; i++) s = afm__cm_step(m, s, (unsigned char)str[i]);
    ok = s >= 0 && m->sacc[s];
    afm_constraint_state_free(m);
    return ok;
}

static afm_constraint *compile(afm_constraint_kind kind, const char *text, char *err, size_t errn) {
    afm_constraint *c = NULL;
    afm_constraint_compile(kind, text, strlen(text), NULL, &c, err, errn);
    return c;
}

typedef struct { afm_constraint_kind kind; const char *text; const char *yes[4]; const char *no[4]; } spec;

static const spec k_specs[] = {
    { AFM_CONSTRAINT_REGEX, "abc", { "abc" }, { "ab", "abcd", "" } },
    { AFM_CONSTRAINT_REGEX, "a|b|cd", { "a", "cd" }, { "c", "ab" } },
    { AFM_CONSTRAINT_REGEX, "[0-9]+(\\.[0-9]+)?", { "12", "0.5" }, { "1.", ".5" } },
    { AFM_CONSTRAINT_REGEX, "(ab)*c?", { "", "abab", "abc" }, { "aba", "cc" } },
    { AFM_CONSTRAINT_REGEX, "x{2,4}y{0,2}", { "xx", "xxxxyy" }, { "x", "xxxxx" } },
    { AFM_CONSTRAINT_REGEX, "[^a-z\"]{1,3}", { "A", "12\xC3\xA9" }, { "a", "\"" } },
    { AFM_CONSTRAINT_REGEX, "\\d{3}-\\w+", { "123-foo_1" }, { "12-a" } },
    { AFM_CONSTRAINT_REGEX, "(yes|no|maybe)", { "yes", "maybe" }, { "ye" } },
    { AFM_CONSTRAINT_REGEX, "\xE6\x97\xA5+[\xC3\xA9-\xC3\xBF]", { "\xE6\x97\xA5\xC3\xA9" }, { "\xE6\x97\xA5" } },
    { AFM_CONSTRAINT_REGEX, ".{0,5}", { "", "ab\xE6\x97\xA5" }, { "\n" } },
    { AFM_CONSTRAINT_REGEX, "^(a*)*b$", { "b", "aab" }, { "a" } },
    { AFM_CONSTRAINT_REGEX, "(?:foo|bar)+(?<n>[0-9])?", { "foobar1" }, { "fo" } },
    { AFM_CONSTRAINT_REGEX, "[\\s\\S]{2}", { "\n\n", "ab" }, { "a" } },
    { AFM_CONSTRAINT_GBNF, "root ::= \"a\" root | \"b\"", { "b", "aab" }, { "a", "ba" } },
    { AFM_CONSTRAINT_GBNF, "root ::= list\nlist ::= \"[\" (item (\",\" item)*)? \"]\"\nitem ::= [0-9]+ | list", { "[]", "[1,[2,[]]]" }, { "[1,]" } },
    { AFM_CONSTRAINT_GBNF, "root ::= expr\nexpr ::= term ((\"+\" | \"-\") term)*\nterm ::= [0-9]+ | \"(\" expr \")\"", { "1+(2-3)" }, { "1+" } },
    { AFM_CONSTRAINT_GBNF, "# comment\nroot ::= greeting \" \" name # trailing\ngreeting ::= \"hello\" | \"hi\"\nname ::= [a-z]{1,8}", { "hello world" }, { "hello " } },
    { AFM_CONSTRAINT_GBNF, "root ::= (\"ab\"? \"c\")* \"d\"\n", { "d", "abccd" }, { "abd" } },
    { AFM_CONSTRAINT_GBNF, "root ::= x{3}\nx ::= [xy]", { "xyx" }, { "xy" } },
    { AFM_CONSTRAINT_GBNF, "root ::= \"\\u65e5\" [^\\x00-\\x7f]* .", { "\xE6\x97\xA5" "a" }, { "\xE6\x97\xA5" } },
    { AFM_CONSTRAINT_GBNF, "root ::= a b\na ::= \"x\"?\nb ::= \"y\"?", { "", "xy", "y" }, { "yx" } },
    { AFM_CONSTRAINT_GBNF, "root ::= \"true\"\n  | \"false\"", { "true", "false" }, { "t" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":\"integer\"}},\"required\":[\"name\",\"age\"]}",
      { "{\"name\":\"ab\",\"age\":12}" }, { "{\"age\":12,\"name\":\"ab\"}", "{\"name\":\"ab\"}" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"boolean\"},\"b\":{\"type\":\"null\"},\"c\":{\"type\":\"number\"}}}",
      { "{}", "{\"a\":true,\"c\":-1.5e+3}", "{\"b\":null}" }, { "{,\"b\":null}", "{\"c\":01}" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"enum\":[\"yes\",\"no\",1,null,{\"k\":[1,2]}]}", { "\"yes\"", "1", "{\"k\":[1,2]}" }, { "\"maybe\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"array\",\"items\":{\"type\":\"integer\",\"minimum\":-5,\"maximum\":120},\"minItems\":1,\"maxItems\":3}",
      { "[1]", "[-5,120,0]" }, { "[]", "[121]", "[1,2,3,4]" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"minLength\":2,\"maxLength\":3}", { "\"ab\"", "\"\\n\xE6\x97\xA5x\"" }, { "\"a\"", "\"abcd\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"pattern\":\"^[a-z]+@[a-z]+\\\\.com$\"}", { "\"ab@cd.com\"" }, { "\"ab@cd.org\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"pattern\":\"id\"}", { "\"id\"", "\"xidx\"" }, { "\"i\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"anyOf\":[{\"type\":\"integer\",\"exclusiveMinimum\":9},{\"const\":\"none\"}]}", { "10", "\"none\"" }, { "9", "\"x\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"next\":{\"anyOf\":[{\"$ref\":\"#/$defs/node\"},{\"type\":\"null\"}]}},\"required\":[\"v\",\"next\"]}},\"$ref\":\"#/$defs/node\"}",
      { "{\"v\":1,\"next\":{\"v\":2,\"next\":null}}" }, { "{\"v\":1}" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":[\"string\",\"null\"],\"maxLength\":1}", { "null", "\"a\"" }, { "\"ab\"" } },
    /* length bounds at 0, 1, max and a large maxLength (the masks test whole characters and cut by
       the characters left: multi-byte characters, escapes and the closing quote at each bound) */
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"maxLength\":0}", { "\"\"" }, { "\"a\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"minLength\":1,\"maxLength\":1}", { "\"\xE6\x97\xA5\"", "\"\\n\"" }, { "\"\"", "\"ab\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"minLength\":3,\"maxLength\":10000}", { "\"abc\"", "\"\xC3\xA9\xE6\x97\xA5\xF0\x9F\x98\x80\"" }, { "\"ab\"" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":4},\"maxItems\":3}", { "[]", "[\"abcd\",\"\"]" }, { "[\"abcde\"]" } },
    { AFM_CONSTRAINT_REGEX, "[a-z\xC3\xA9]{2,6}!", { "ab!", "\xC3\xA9\xC3\xA9" "abcd!" }, { "a!", "abcdefg!" } },
    { AFM_CONSTRAINT_REGEX, ".{0,10000}", { "", "abc" }, { "\n" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{}", { "{\"a\":[1,\"x\",true]}", "-0.5" }, { "{a:1}" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\",\"properties\":{\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"x\",\"yes\"]}},\"id\":{\"type\":\"integer\",\"minimum\":100,\"maximum\":1234}},\"required\":[\"id\"],\"additionalProperties\":false}",
      { "{\"id\":100}", "{\"tags\":[\"x\"],\"id\":1234}" }, { "{\"id\":99}", "{\"id\":1235}", "{\"tags\":[]}" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"integer\",\"minimum\":-120,\"maximum\":-7}", { "-7", "-120", "-99" }, { "-6", "-121", "0" } },
    { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"integer\",\"minimum\":5}", { "5", "1000000", "9999999999999999" }, { "4", "-1", "05", "10000000000000000" } },
};

static void test_specs(afm_constraint_vocab *v) {
    size_t i;
    int k, total_complete = 0;
    for (i = 0; i < sizeof k_specs / sizeof *k_specs; i++) {
        char err[256] = "", what[64];
        afm_constraint *c = compile(k_specs[i].kind, k_specs[i].text, err, sizeof err);
        snprintf(what, sizeof what, "spec %d", (int)i);
        CHECK(c != NULL, "%s compiles: %s", what, err);
        if (!c) continue;
        for (k = 0; k < 4 && k_specs[i].yes[k]; k++) CHECK(matches(c, v, k_specs[i].yes[k]) == 1, "%s matches '%s'", what, k_specs[i].yes[k]);
        for (k = 0; k < 4 && k_specs[i].no[k]; k++) CHECK(matches(c, v, k_specs[i].no[k]) == 0, "%s rejects '%s'", what, k_specs[i].no[k]);
        total_complete += walks(what, c, v, 60, 40);
        afm_constraint_free(c);
    }
    CHECK(total_complete > 200, "random walks reach complete matches (%d)", total_complete);
    printf("%d specs, %d random walks each, %d ended complete\n", (int)(sizeof k_specs / sizeof *k_specs), 60, total_complete);
}

/* Bad input: a clear error (checked for a telling word), never a crash or a hang. */
static void test_errors(void) {
    static const struct { afm_constraint_kind kind; const char *text, *want; } bad[] = {
        { AFM_CONSTRAINT_REGEX, "(ab", "missing ')'" }, { AFM_CONSTRAINT_REGEX, "ab)", "unmatched ')'" },
        { AFM_CONSTRAINT_REGEX, "[ab", "unterminated" }, { AFM_CONSTRAINT_REGEX, "a{3,1}", "repetition" },
        { AFM_CONSTRAINT_REGEX, "*a", "nothing to repeat" }, { AFM_CONSTRAINT_REGEX, "(?=a)b", "lookaround" },
        { AFM_CONSTRAINT_REGEX, "(a)\\1", "backreference" }, { AFM_CONSTRAINT_REGEX, "a{100001}", "repetition" },
        { AFM_CONSTRAINT_REGEX, "[z-a]", "out of order" }, { AFM_CONSTRAINT_REGEX, "a^b", "anchors" },
        { AFM_CONSTRAINT_REGEX, "\xff", "UTF-8" }, { AFM_CONSTRAINT_REGEX, "[^\\x00-\\U0010FFFF]", "matches nothing" },
        { AFM_CONSTRAINT_GBNF, "root ::= root \"a\" | \"a\"", "left recursion" },
        { AFM_CONSTRAINT_GBNF, "root ::= x\nx ::= y \"a\"\ny ::= \"\" | x", "left recursion" },
        { AFM_CONSTRAINT_GBNF, "root ::= \"a\" root", "never finish" },
        { AFM_CONSTRAINT_GBNF, "root ::= undefined-rule", "never defined" },
        { AFM_CONSTRAINT_GBNF, "start ::= \"a\"", "root" },
        { AFM_CONSTRAINT_GBNF, "root ::= \"a\"\nroot ::= \"b\"", "defined twice" },
        { AFM_CONSTRAINT_GBNF, "root ::= \"abc", "line 1" },
        { AFM_CONSTRAINT_GBNF, "root := \"a\"", "'::='" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\",\"properties\":{\"a\":{\"not\":{}}}}", "/properties/a: unsupported keyword 'not'" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"strin\"}", "unknown type" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\",", "invalid JSON" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"$ref\":\"#/$defs/missing\"}", "points to nothing" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"$ref\":\"#\"}", "never finish" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"number\",\"minimum\":1}", "not supported" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"pattern\":\"(a\"}", "/pattern" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"array\",\"items\":{\"type\":\"string\",\"format\":\"email\"}}", "/items: unsupported keyword 'format'" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\",\"properties\":{},\"required\":[\"x\"]}", "required property 'x'" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"integer\",\"minimum\":5,\"maximum\":4}", "no integer" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "false", "matches nothing" },
        { AFM_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"array\",\"minItems\":-1}", "minItems" },
    };
    size_t i;
    char *big;
    int d;
    for (i = 0; i < sizeof bad / sizeof *bad; i++) {
        char err[256] = "";
        afm_constraint *c = compile(bad[i].kind, bad[i].text, err, sizeof err);
        CHECK(!c && strstr(err, bad[i].want), "'%s' is refused with an error containing \"%s\": got \"%s\"", bad[i].text, bad[i].want, err);
        afm_constraint_free(c);
    }
    /* nesting: 300 levels of parentheses, arrays in a schema, and $ref chains */
    big = (char *)malloc(1 << 21);
    for (d = 0; d < 300; d++) big[d] = '(';
    big[300] = 'a';
    for (d = 0; d < 300; d++) big[301 + d] = ')';
    big[601] = 0;
    {
        char err[256] = "";
        afm_constraint *c = compile(AFM_CONSTRAINT_REGEX, big, err, sizeof err);
        CHECK(!c && strstr(err, "nested too deeply"), "300 nested groups: %s", err);
        afm_constraint_free(c);
    }
    {
        char err[256] = "";
        size_t w = 0;
        afm_constraint *c;
        for (d = 0; d < 150; d++) w += (size_t)sprintf(big + w, "{\"type\":\"array\",\"items\":");
        w += (size_t)sprintf(big + w, "{\"type\":\"integer\"}");
        for (d = 0; d < 150; d++) big[w++] = '}';
        big[w] = 0;
        c = compile(AFM_CONSTRAINT_JSON_SCHEMA, big, err, sizeof err);
        CHECK(!c && strstr(err, "nested too deeply"), "schema nested 150 deep: %s", err);
        afm_constraint_free(c);
    }
    { /* a huge enum and a 1 MB schema compile (or fail cleanly) */
        char err[256] = "";
        size_t w = 0;
        afm_constraint *c;
        w += (size_t)sprintf(big + w, "{\"enum\":[");
        for (d = 0; d < 20000; d++) w += (size_t)sprintf(big + w, "%s\"value %d\"", d ? "," : "", d);
        w += (size_t)sprintf(big + w, "]}");
        c = compile(AFM_CONSTRAINT_JSON_SCHEMA, big, err, sizeof err);
        CHECK(c != NULL, "an enum of 20000 strings compiles: %s", err);
        afm_constraint_free(c);
        w = (size_t)sprintf(big, "{\"type\":\"object\",\"properties\":{");
        for (d = 0; w < (1 << 20) - 200; d++)
            w += (size_t)sprintf(big + w, "%s\"p%d\":{\"type\":\"string\",\"description\":\"a property of a very large schema\",\"maxLength\":%d}", d ? "," : "", d, d % 7);
        w += (size_t)sprintf(big + w, "}}");
        c = compile(AFM_CONSTRAINT_JSON_SCHEMA, big, err, sizeof err);
        CHECK(c != NULL || err[0], "a 1 MB schema (%d properties) compiles or gives a reason: %s", d, err);
        printf("1 MB schema (%lu bytes, %d properties): %s\n", (unsigned long)w, d, c ? "compiled" : err);
        afm_constraint_free(c);
    }
    free(big);
    { /* argument checks */
        afm_constraint *c = NULL;
        CHECK(afm_constraint_compile((afm_constraint_kind)9, "a", 1, NULL, &c, NULL, 0) == AFM_ERR_ARG && !c, "unknown kind");
        CHECK(afm_constraint_compile(AFM_CONSTRAINT_REGEX, NULL, 3, NULL, &c, NULL, 0) == AFM_ERR_ARG, "NULL text");
        CHECK(afm_constraint_state_create(NULL, NULL, NULL) == AFM_ERR_ARG, "NULL state");
    }
}

/* Fast-forward, rewind, masked sampling. */
static void test_api(afm_constraint_vocab *v) {
    char err[256] = "";
    const char *schema = "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"ok\":{\"type\":\"boolean\"}},\"required\":[\"name\",\"ok\"]}";
    afm_constraint *c = compile(AFM_CONSTRAINT_JSON_SCHEMA, schema, err, sizeof err);
    afm_constraint_state *m = NULL;
    int32_t f[16], t;
    int n, i;
    char text[64];
    size_t w = 0;
    CHECK(c && afm_constraint_state_create(c, v, &m) == AFM_OK, "schema state: %s", err);
    if (!m) return;
    n = afm_constraint_state_forced(m, f, 16);
    for (i = 0; i < n; i++) {
        memcpy(text + w, v->bytes + v->boff[f[i]], v->boff[f[i] + 1] - v->boff[f[i]]);
        w += v->boff[f[i] + 1] - v->boff[f[i]];
        CHECK(afm_constraint_state_advance(m, f[i]) == AFM_OK, "forced token %d is allowed", f[i]);
    }
    text[w] = 0;
    CHECK(strcmp(text, "{\"name\":\"") == 0 && n == 3, "fast-forward spells {\"name\":\" greedily ({\" name \":\"): '%s' in %d", text, n);
    CHECK(afm_constraint_state_forced(m, f, 16) == 0, "no fast-forward inside a free string");
    for (t = 0; t < v->n_vocab && !(afm_constraint_state_allows(m, t) && v->boff[t + 1] - v->boff[t] == 3 && memcmp(v->bytes + v->boff[t], "abc", 3) == 0); t++) {}
    CHECK(t < v->n_vocab && afm_constraint_state_advance(m, t) == AFM_OK, "'abc' inside the string");
    n = afm_constraint_state_forced(m, f, 16);
    CHECK(n == 0, "a choice after abc: more characters or the closing quote");
    { /* rewind gives back the same masks */
        uint32_t *before = (uint32_t *)malloc((size_t)m->words * 4);
        const uint32_t *after;
        memcpy(before, afm_constraint_state_mask(m), (size_t)m->words * 4);
        for (t = 0; t < v->n_vocab; t++)
            if (afm_constraint_state_allows(m, t) && v->bytes[v->boff[t]] == '"') break;
        CHECK(afm_constraint_state_advance(m, t) == AFM_OK, "closing quote");
        CHECK(!afm_constraint_state_allows(m, t), "no second quote");
        CHECK(afm_constraint_state_advance(m, t) == AFM_ERR_ARG, "a disallowed token is refused");
        CHECK(afm_constraint_state_rewind(m, afm_constraint_state_n_tokens(m) - 1) == AFM_OK, "rewind");
        after = afm_constraint_state_mask(m);
        CHECK(memcmp(before, after, (size_t)m->words * 4) == 0, "the mask after rewinding is the mask before");
        CHECK(afm_constraint_state_rewind(m, 99) == AFM_ERR_ARG, "rewind past the end is refused");
        free(before);
    }
    { /* masked sampling: every sampler stays inside the mask */
        afm_sampler_params sp[4];
        int k, j;
        float *logits = (float *)malloc((size_t)v->n_vocab * sizeof *logits);
        const uint32_t *mask = afm_constraint_state_mask(m);
        uint32_t none[64];
        memset(sp, 0, sizeof sp);
        sp[1].temperature = 1.0f;
        sp[2].temperature = 0.8f; sp[2].top_k = 5;
        sp[3].temperature = 1.5f; sp[3].top_p = 0.9f; sp[3].min_p = 0.05f;
        for (j = 0; j < v->n_vocab; j++) logits[j] = (float)(rnd() % 1000) / 100.0f;
        for (k = 0; k < 4; k++) {
            afm_sampler *sm = NULL;
            int inside = 1;
            afm_sampler_create(&sp[k], v->n_vocab, NULL, &sm);
            for (j = 0; j < 200; j++) {
                int32_t x = afm_sampler_sample_masked(sm, logits, mask);
                if (x < 0 || !((mask[x >> 5] >> (x & 31)) & 1)) inside = 0;
            }
            CHECK(inside, "sampler %d picks allowed tokens only", k);
            memset(none, 0, sizeof none);
            CHECK(afm_sampler_sample_masked(sm, logits, none) == -1, "sampler %d: -1 when nothing is allowed", k);
            afm_sampler_free(sm);
        }
        free(logits);
    }
    afm_constraint_state_free(m);
    afm_constraint_free(c);
}

/* The shipped model's tokenizer: a schema's masks against the oracle over the real vocabulary. */
static void test_real_vocab(void) {
    afm_model *model = NULL;
    afm_tokenizer *tok = NULL;
    afm_constraint_vocab *v = NULL;
    afm_constraint *c = NULL;
    char err[256] = "";
    const char *schema = "{\"type\":\"object\",\"properties\":{\"verse\":{\"type\":\"string\",\"maxLength\":40},\"book\":{\"enum\":[\"Genesis\",\"Exodus\"]},\"chapter\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":50}},\"required\":[\"verse\",\"book\"]}";
    if (afm_model_load_file("models/mini/base.afm", NULL, &model, err, sizeof err) != AFM_OK) { printf("skip: real vocabulary (%s)\n", err); return; }
    CHECK(afm_model_tokenizer(model, NULL, &tok, err, sizeof err) == AFM_OK, "tokenizer: %s", err);
    CHECK(tok && afm_constraint_vocab_create(tok, NULL, &v) == AFM_OK, "vocabulary");
    c = compile(AFM_CONSTRAINT_JSON_SCHEMA, schema, err, sizeof err);
    CHECK(c != NULL, "schema: %s", err);
    if (v && c) {
        int32_t nl = afm_tokenizer_special(tok, AFM_SPECIAL_NEWLINE), te = afm_tokenizer_special(tok, AFM_SPECIAL_TURN_END);
        CHECK(v->kind[te] == 2 && v->kind[nl] == 1 && v->boff[nl + 1] - v->boff[nl] == 1 && v->bytes[v->boff[nl]] == '\n',
              "<turn_end> is the stop token, <n> is a newline");
        walks("mini vocabulary", c, v, 4, 60);
    }
    afm_constraint_free(c);
    afm_constraint_vocab_free(v);
    afm_tokenizer_free(tok);
    afm_model_free(model);
}

/* afm_generate under a constraint on the shipped model: greedy output is the same with and without
   drafting (draft model, prompt lookup) and always matches, also without fast-forward (which
   spells forced bytes with its own tokens, so that output differs); sampled outputs are the same
   with and without a draft model and match too; masks and advances stay consistent across rejected drafts. */
typedef struct { int32_t toks[512]; int n; } gen_out;
static int collect(void *user, int32_t t) {
    gen_out *o = (gen_out *)user;
    if (o->n < 512) o->toks[o->n++] = t;
    return 0;
}
static int replays_complete(afm_constraint *c, afm_constraint_vocab *v, const gen_out *o) {
    afm_constraint_state *m = NULL;
    int i, ok = 1;
    afm_constraint_state_create(c, v, &m);
    for (i = 0; i < o->n && ok; i++) ok = afm_constraint_state_advance(m, o->toks[i]) == AFM_OK;
    ok = ok && afm_constraint_state_complete(m);
    afm_constraint_state_free(m);
    return ok;
}
static void test_generate(void) {
    afm_model *base = NULL, *draft = NULL;
    afm_tokenizer *tok = NULL;
    afm_constraint_vocab *v = NULL;
    afm_constraint *c = NULL;
    afm_session *s = NULL, *ds = NULL;
    char err[256] = "";
    const char *schema = "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":12},\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"earth\",\"heaven\",\"light\"]},\"maxItems\":3},\"n\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":99}},\"required\":[\"name\",\"tags\",\"n\"]}";
    afm_chat_message msg = { "user", "Describe the first day as JSON." };
    int32_t prompt[256], stop;
    size_t n_prompt = 0;
    int mode, seed;
    gen_out ref;
    afm_session_params sp;
    if (afm_model_load_file("models/mini/base.afm", NULL, &base, err, sizeof err) != AFM_OK ||
        afm_model_load_file("models/mini/draft.afm", NULL, &draft, err, sizeof err) != AFM_OK) {
        printf("skip: generation under a constraint (%s)\n", err);
        afm_model_free(base);
        return;
    }
    memset(&sp, 0, sizeof sp);
    sp.n_ctx = 1024;
    afm_model_tokenizer(base, NULL, &tok, err, sizeof err);
    afm_constraint_vocab_create(tok, NULL, &v);
    c = compile(AFM_CONSTRAINT_JSON_SCHEMA, schema, err, sizeof err);
    CHECK(c && v, "schema for generation: %s", err);
    afm_chat_tokenize(tok, &msg, 1, NULL, 0, 1, prompt, 256, &n_prompt);
    stop = afm_tokenizer_special(tok, AFM_SPECIAL_TURN_END);
    afm_session_create(base, &sp, &s);
    afm_session_create(draft, &sp, &ds);
    memset(&ref, 0, sizeof ref);
    for (mode = 0; mode < 4 && c && v; mode++) { /* greedy: plain, draft model, lookup, no fast-forward */
        afm_generate_params gp;
        afm_constraint_state *cs = NULL;
        gen_out o;
        memset(&gp, 0, sizeof gp);
        memset(&o, 0, sizeof o);
        afm_constraint_state_create(c, v, &cs);
        gp.n_predict = 200;
        gp.constraint = cs;
        gp.on_token = collect;
        gp.user = &o;
        gp.stop_tokens = &stop;
        gp.n_stop_tokens = 1;
        gp.draft = mode == 1 ? ds : NULL;
        gp.lookup = mode == 2;
        gp.no_fast_forward = mode == 3;
        gp.draft_k = mode ? 4 : 0;
        gp.fixed_k = mode == 1 || mode == 2;
        afm_session_rewind(s, 0);
        CHECK(afm_generate(s, prompt, (int)n_prompt, &gp, NULL) == AFM_OK, "generate mode %d: %s", mode, afm_session_error(s));
        CHECK(afm_constraint_state_complete(cs) && o.n > 0 && v->kind[o.toks[o.n - 1]] == 2, "greedy mode %d ends complete with a stop token (%d tokens, last %d, complete %d, state tokens %d)", mode, o.n, o.n ? o.toks[o.n - 1] : -1, afm_constraint_state_complete(cs), afm_constraint_state_n_tokens(cs));
        CHECK(replays_complete(c, v, &o), "greedy mode %d: the tokens replay to a complete match", mode);
        CHECK(afm_constraint_state_n_tokens(cs) == o.n, "greedy mode %d: the state advanced once per emitted token", mode);
        if (mode == 0) ref = o;
        else if (mode < 3) CHECK(o.n == ref.n && memcmp(o.toks, ref.toks, (size_t)o.n * sizeof *o.toks) == 0, "greedy mode %d gives the plain greedy output", mode);
        afm_constraint_state_free(cs);
    }
    if (ref.n) {
        char text[2048];
        size_t len = 0;
        afm_detokenize(tok, ref.toks, (size_t)ref.n, AFM_TOK_NEWLINE, text, sizeof text, &len);
        printf("greedy under the schema: %s\n", text);
    }
    for (seed = 1; seed <= 8 && c && v; seed++) { /* sampling without, then with a draft model: the same output */
        afm_generate_params gp;
        afm_generate_stats st;
        afm_constraint_state *cs = NULL;
        gen_out o;
        int with_draft = seed > 4, sd = with_draft ? seed - 4 : seed;
        static gen_out plain[5];
        memset(&gp, 0, sizeof gp);
        memset(&o, 0, sizeof o);
        afm_constraint_state_create(c, v, &cs);
        gp.n_predict = 300;
        gp.sampler.temperature = 1.0f;
        gp.sampler.top_p = sd == 2 ? 0.9f : 0;
        gp.sampler.top_k = sd == 3 ? 20 : 0;
        gp.sampler.min_p = sd == 4 ? 0.05f : 0;
        gp.sampler.seed = (uint64_t)sd;
        gp.constraint = cs;
        gp.on_token = collect;
        gp.user = &o;
        gp.stop_tokens = &stop;
        gp.n_stop_tokens = 1;
        gp.draft = with_draft ? ds : NULL;
        gp.draft_k = 4;
        gp.fixed_k = 1;
        afm_session_rewind(s, 0);
        CHECK(afm_generate(s, prompt, (int)n_prompt, &gp, &st) == AFM_OK, "sampled generate seed %d: %s", seed, afm_session_error(s));
        CHECK(afm_constraint_state_n_tokens(cs) == o.n && (o.n == 300 || replays_complete(c, v, &o)),
              "sampled, seed %d, draft %d: %d tokens, %d drafted, %d accepted, complete", sd, with_draft, o.n, st.n_drafted, st.n_accepted);
        if (!with_draft) plain[sd] = o;
        else CHECK(o.n == plain[sd].n && memcmp(o.toks, plain[sd].toks, (size_t)o.n * sizeof *o.toks) == 0,
                   "sampled, seed %d: the same output with a draft model as without", sd);
        afm_constraint_state_free(cs);
    }
    afm_session_free(s);
    afm_session_free(ds);
    afm_constraint_free(c);
    afm_constraint_vocab_free(v);
    afm_tokenizer_free(tok);
    afm_model_free(base);
    afm_model_free(draft);
}

/* afm_schema_prompt: the documented rendering, its length query, a buffer too small, bad JSON. */
static void test_schema_prompt(void) {
    const char *schema = "{\n  \"type\": \"object\",\n  \"properties\": {\"name\": {\"type\": \"string\", \"description\": \"a \\\"full\\\" name, e.g. { Adam }\"}}\n}";
    const char *want = AFM_SCHEMA_PROMPT_INTRO "\n{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"description\":\"a \\\"full\\\" name, e.g. { Adam }\"}}}";
    char buf[512], small[16];
    size_t len = 0;
    CHECK(afm_schema_prompt(schema, strlen(schema), NULL, 0, &len) == AFM_OK && len == strlen(want), "schema prompt: length %d", (int)len);
    CHECK(afm_schema_prompt(schema, strlen(schema), buf, sizeof buf, &len) == AFM_OK && !strcmp(buf, want), "schema prompt: '%s'", buf);
    CHECK(afm_schema_prompt(schema, strlen(schema), small, sizeof small, &len) == AFM_ERR_ARG && len == strlen(want) && strlen(small) == sizeof small - 1,
          "schema prompt: a buffer too small is an error, truncated and terminated");
    CHECK(afm_schema_prompt("{\"a\":\"b", 7, buf, sizeof buf, &len) == AFM_ERR_FORMAT, "schema prompt: an unterminated string");
    CHECK(afm_schema_prompt("{\"a\":1}}", 8, buf, sizeof buf, &len) == AFM_ERR_FORMAT, "schema prompt: unbalanced brackets");
    CHECK(afm_schema_prompt("[{]}", 4, buf, sizeof buf, &len) == AFM_ERR_FORMAT, "schema prompt: mismatched brackets");
}

int main(void) {
    afm_constraint_vocab *v = make_vocab();
    test_schema_prompt();
    test_specs(v);
    test_errors();
    test_api(v);
    test_real_vocab();
    test_generate();
    afm_constraint_vocab_free(v);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
