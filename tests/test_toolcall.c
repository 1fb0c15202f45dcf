/* Tool calling (the TOOL CALLING section of afm.h) on the trained model in models/mini, run from the
   repository root: two tools, one returning data and one failing, called through the automatic loop
   with forced (required) calls; every call checked against its tool's schema here, independently of
   the constraint engine; the failing tool's error fed back; the transcript through JSON and back; a
   session restored from it continuing token for token as the original; hand-off, the round limit,
   mode none; hostile tools and transcripts refused with messages naming the place.
   Prints "N passed, N failed" last (tests/run.sh counts it). */
#define AFM_IMPLEMENTATION
#include "../afm.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;
static void check(int cond, const char *what) {
    if (cond) passed++;
    else failed++;
    printf("%s %s\n", cond ? "ok  " : "FAIL", what);
}

static const char *tools_json =
    "[{\"name\":\"get_weather\",\"description\":\"The weather in a city\",\"parameters\":{\"type\":\"object\","
    "\"properties\":{\"city\":{\"enum\":[\"Paris\",\"Oslo\",\"Lima\"]},\"days\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":7}},"
    "\"required\":[\"city\",\"days\"],\"additionalProperties\":false}},\n"
    " {\"type\":\"function\",\"function\":{\"name\":\"cancel_order\",\"description\":\"Cancels an order\",\"parameters\":"
    "{\"type\":\"object\",\"properties\":{\"order\":{\"type\":\"string\",\"pattern\":\"^[A-Z][0-9]{3}$\"}},"
    "\"required\":[\"order\"],\"additionalProperties\":false}}}]";

/* ---- an independent check of the arguments against the two schemas above ---- */
static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int weather_args_ok(const char *a) {
    /* {"city":ENUM,"days":1..7}, compact, in schema order */
    static const char *cities[] = { "Paris", "Oslo", "Lima" };
    char want[64];
    int i;
    for (i = 0; i < 3; i++) {
        int d;
        for (d = 1; d <= 7; d++) {
            snprintf(want, sizeof want, "{\"city\":\"%s\",\"days\":%d}", cities[i], d);
            if (!strcmp(a, want)) return 1;
        }
    }
    return 0;
}
static int cancel_args_ok(const char *a) {
    /* {"order":"X999"} with X an upper-case letter */
    return strlen(a) == 16 && !strncmp(a, "{\"order\":\"", 10) && a[10] >= 'A' && a[10] <= 'Z' && is_digit(a[11]) &&
           is_digit(a[12]) && is_digit(a[13]) && !strcmp(a + 14, "\"}");
}

typedef struct calls { int n, bad; char last[256]; } calls;
static afm_tool_status run_tool(void *user, const char *name, const char *arguments, const char **result) {
    calls *c = (calls *)user;
    c->n++;
    snprintf(c->last, sizeof c->last, "%s %s", name, arguments);
    if (!strcmp(name, "get_weather")) {
        c->bad += !weather_args_ok(arguments);
        *result = "{\"sky\":\"clear\",\"celsius\":21}";
        return AFM_TOOL_OK;
    }
    c->bad += strcmp(name, "cancel_order") != 0 || !cancel_args_ok(arguments);
    *result = "the order database is offline";
    return AFM_TOOL_FAILED;
}

typedef struct tokens { int32_t t[4096]; int n; } tokens;
static int keep_token(void *user, int32_t token) {
    tokens *k = (tokens *)user;
    if (k->n < 4096) k->t[k->n++] = token;
    return 0;
}

static char *to_json(const afm_transcript *t) {
    size_t n = 0;
    char *s;
    afm_transcript_to_json(t, NULL, 0, &n);
    s = (char *)malloc(n + 1);
    if (!s || afm_transcript_to_json(t, s, n + 1, &n) != AFM_OK) abort();
    return s;
}
static afm_transcript *from_json(const char *s) {
    afm_transcript *t;
    char err[256];
    if (afm_transcript_create(NULL, &t) != AFM_OK) abort();
    if (afm_transcript_from_json(t, s, strlen(s), err, sizeof err) != AFM_OK) { printf("from_json: %s\n", err); abort(); }
    return t;
}

static void params_init(afm_tool_params *p, const afm_constraint_vocab *v, calls *c, tokens *k, uint64_t seed) {
    memset(p, 0, sizeof *p);
    p->gen.n_predict = 40;
    p->gen.sampler.temperature = 1.0f;
    p->gen.sampler.seed = seed;
    p->gen.on_token = keep_token;
    p->gen.user = k;
    p->call = run_tool;
    p->call_user = c;
    p->vocab = v;
    p->max_rounds = 3;
}

/* A hostile input must be refused with a message that contains `want`. */
static void refused_tools(const char *json, const char *want) {
    afm_transcript *t;
    char err[256], what[400];
    afm_result r;
    int n = -1;
    afm_transcript_create(NULL, &t);
    r = afm_transcript_add_tools_json(t, json, strlen(json), err, sizeof err);
    afm_transcript_tools(t, &n);
    snprintf(what, sizeof what, "tools refused: %s -> %s", want, r == AFM_OK ? "(accepted)" : err);
    check(r != AFM_OK && strstr(err, want) != NULL && n == 0, what); /* all or none */
    afm_transcript_free(t);
}
static void refused_transcript(const char *json, const char *want) {
    afm_transcript *t;
    char err[256], what[400];
    afm_result r;
    int n = -1;
    afm_transcript_create(NULL, &t);
    r = afm_transcript_from_json(t, json, strlen(json), err, sizeof err);
    afm_transcript_entries(t, &n);
    snprintf(what, sizeof what, "transcript refused: %s -> %s", want, r == AFM_OK ? "(accepted)" : err);
    check(r != AFM_OK && strstr(err, want) != NULL && n == 0, what);
    afm_transcript_free(t);
}

static void hostile(void) {
    refused_tools("[{\"name\":\"f\"", "tools: byte 12: unexpected end");
    refused_tools("{\"name\":\"f\"}", "tools: expected an array");
    refused_tools("[{\"name\":\"ok\"},{\"name\":\"f\",\"parameters\":{\"type\":\"object\",\"properties\":{\"when\":"
                  "{\"type\":\"string\",\"format\":\"date\"}}}}]",
                  "tools[1]: tool 'f': parameters: json schema at /properties/when: unsupported keyword 'format'");
    refused_tools("[{\"name\":\"f\",\"paramters\":{}}]", "tools[0]: unknown key 'paramters'");
    refused_tools("[{\"name\":\"f g\"}]", "tools[0]: tool name 'f g'");
    refused_tools("[{\"name\":\"f\"},{\"name\":\"f\"}]", "tools[1]: tool 'f' is declared twice");
    refused_tools("[{\"name\":7}]", "tools[0].name: expected a string");
    refused_tools("[{\"name\":\"f\",\"parameters\":[1]}]", "tools[0].parameters: expected a JSON Schema object");
    refused_tools("[{\"type\":\"function\",\"function\":3}]", "tools[0].function: expected an object");
    refused_tools("[{\"name\":\"f\",\"description\":\"a\\u0000b\"}]", "tools[0].description: a string holds a NUL");
    refused_tools("[{\"name\":\"f\",\"parameters\":{\"$ref\":\"#/$defs/nope\"}}]", "tools[0]: tool 'f': parameters: json schema");
    refused_transcript("", "transcript: byte 0: unexpected end");
    refused_transcript("[]", "transcript: expected {\"tools\":[...],\"messages\":[...]}");
    refused_transcript("{\"messages\":[{\"role\":\"user\"}]}", "transcript: messages[0].content: expected a string");
    refused_transcript("{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"\","
                       "\"tool_call\":{\"name\":\"f\",\"arguments\":[]}}]}",
                       "transcript: messages[1].tool_call.arguments: expected an object");
    refused_transcript("{\"messages\":[{\"role\":\"user\",\"content\":\"\",\"tool_call\":{\"name\":\"f\",\"arguments\":{}}}]}",
                       "transcript: messages[0].tool_call: only an assistant message carries a tool call");
    refused_transcript("{\"messages\":[{\"role\":\"tool\",\"name\":\"f\",\"content\":\"x\",\"failed\":1}]}",
                       "transcript: messages[0].failed: expected true or false");
    refused_transcript("{\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"extra\":1}]}", "transcript: messages[0]: unknown key");
    refused_transcript("{\"tools\":[{\"name\":\"f\",\"parameters\":{\"type\":\"object\",\"not\":{}}}],\"messages\":[]}",
                       "transcript: tools[0]: tool 'f': parameters: json schema at (root): unsupported keyword 'not'");
    refused_transcript("{\"messages\":[],\"messages\":[]}", "transcript: byte");
}

int main(void) {
    afm_model *m;
    afm_tokenizer *tok;
    afm_constraint_vocab *v;
    afm_session *s, *s2;
    afm_session_params sp;
    afm_transcript *t, *t2;
    afm_tool_params p;
    afm_tool_stats st;
    calls c;
    tokens k1, k2;
    char err[256], *saved, *after1, *after2;
    const afm_transcript_entry *e;
    int n, i, n_exec = 0;
    afm_result r;

    hostile();
    if (afm_model_load_file("models/mini/base.afm", NULL, &m, err, sizeof err) != AFM_OK ||
        afm_model_tokenizer(m, NULL, &tok, err, sizeof err) != AFM_OK) {
        printf("FAIL %s (run from the repository root)\n", err);
        return 1;
    }
    memset(&sp, 0, sizeof sp);
    sp.n_ctx = 2048;
    sp.n_threads = 2;
    if (afm_constraint_vocab_create(tok, NULL, &v) != AFM_OK || afm_session_create(m, &sp, &s) != AFM_OK ||
        afm_session_create(m, &sp, &s2) != AFM_OK || afm_transcript_create(NULL, &t) != AFM_OK)
        return 1;
    r = afm_transcript_add_tools_json(t, tools_json, strlen(tools_json), err, sizeof err);
    check(r == AFM_OK, r == AFM_OK ? "two tools declared from JSON (plain and OpenAI form)" : err);

    /* 1. a forced call of the data tool */
    memset(&c, 0, sizeof c);
    k1.n = 0;
    afm_transcript_add_message(t, "user", "What is the weather in Paris this week?");
    params_init(&p, v, &c, &k1, 7);
    p.mode = AFM_TOOL_REQUIRED;
    p.tool_name = "get_weather";
    r = afm_tool_run(s, tok, t, &p, &st);
    printf("     first run: stop %d, %d calls, last call: %s\n", (int)st.stop, st.n_calls, c.last);
    check(r == AFM_OK && st.stop != AFM_TOOL_STOP_NONE, r == AFM_OK ? "required: the loop ran and stopped" : afm_session_error(s));
    e = afm_transcript_entries(t, &n);
    check(n >= 3 && e[1].kind == AFM_ENTRY_TOOL_CALL && !strcmp(e[1].name, "get_weather") && weather_args_ok(e[1].arguments),
          "required: the first reply is a get_weather call whose arguments match its schema");
    check(n >= 3 && e[2].kind == AFM_ENTRY_TOOL_OUTPUT && !e[2].failed && strstr(e[2].content, "clear") != NULL,
          "the tool's data is the next entry (a tool turn)");
    check(c.n >= 1 && c.bad == 0, "every call the callback saw is valid JSON matching its tool's schema");
    check(st.stop == AFM_TOOL_STOP_ANSWER || st.stop == AFM_TOOL_STOP_ROUNDS || st.stop == AFM_TOOL_STOP_N_PREDICT,
          "the loop terminated with a reason");

    /* 2. a forced call of the failing tool: its error goes back to the model */
    afm_transcript_add_message(t, "user", "Cancel my order B123.");
    p.tool_name = "cancel_order";
    r = afm_tool_run(s, tok, t, &p, &st);
    printf("     second run: stop %d, %d calls, last call: %s\n", (int)st.stop, st.n_calls, c.last);
    e = afm_transcript_entries(t, &i);
    check(r == AFM_OK && i >= n + 3 && e[n + 1].kind == AFM_ENTRY_TOOL_CALL && !strcmp(e[n + 1].name, "cancel_order") &&
              cancel_args_ok(e[n + 1].arguments),
          "required: a cancel_order call with arguments matching its pattern");
    check(i >= n + 3 && e[n + 2].kind == AFM_ENTRY_TOOL_OUTPUT && e[n + 2].failed &&
              !strcmp(e[n + 2].content, "the order database is offline"),
          "the failure is recorded as a failed tool output");
    {   /* the model saw the error: the session's cache holds the rendered failure */
        int nt = 0;
        const int32_t *ct = afm_session_tokens(s, &nt);
        size_t len = 0;
        char *text;
        afm_detokenize(tok, ct, (size_t)nt, AFM_TOK_NEWLINE | AFM_TOK_SPECIAL, NULL, 0, &len);
        text = (char *)malloc(len + 1);
        afm_detokenize(tok, ct, (size_t)nt, AFM_TOK_NEWLINE | AFM_TOK_SPECIAL, text, len + 1, &len);
        check(strstr(text, "<turn_start> tool\nerror: the order database is offline<turn_end>") != NULL,
              "the error was fed back: the context holds the tool turn 'error: ...'");
        check(strstr(text, "system tools: {\"name\":\"get_weather\",\"description\":\"The weather in a city\",\"parameters\":{") != NULL,
              "the tools are rendered into the system turn");
        free(text);
    }
    check(c.bad == 0, "still every call valid");

    /* 3. the transcript through JSON and back */
    saved = to_json(t);
    t2 = from_json(saved);
    after1 = to_json(t2);
    check(!strcmp(saved, after1), "the transcript round-trips through JSON byte for byte");
    free(after1);

    /* 4. the original and a fresh session restored from the JSON continue identically */
    afm_transcript_add_message(t, "user", "And in Oslo?");
    afm_transcript_add_message(t2, "user", "And in Oslo?");
    params_init(&p, v, &c, &k1, 42);
    k1.n = 0;
    r = afm_tool_run(s, tok, t, &p, &st);
    params_init(&p, v, &c, &k2, 42);
    k2.n = 0;
    check(r == AFM_OK && afm_tool_run(s2, tok, t2, &p, NULL) == AFM_OK, "both continue");
    check(k1.n > 0 && k1.n == k2.n && !memcmp(k1.t, k2.t, (size_t)k1.n * sizeof k1.t[0]),
          "the restored session generates the same tokens as the original (same seed)");
    after1 = to_json(t);
    after2 = to_json(t2);
    check(!strcmp(after1, after2), "and ends with the same transcript");
    printf("     continuation: %d tokens, stop %d\n", k1.n, (int)st.stop);
    free(after1);
    free(after2);
    free(saved);

    /* 5. hand-off: no callback; the call waits for the app */
    params_init(&p, v, &c, &k1, 3);
    p.call = NULL;
    p.mode = AFM_TOOL_REQUIRED;
    afm_transcript_add_message(t2, "user", "Weather in Lima?");
    r = afm_tool_run(s2, tok, t2, &p, &st);
    e = afm_transcript_entries(t2, &n);
    check(r == AFM_OK && st.stop == AFM_TOOL_STOP_HANDOFF && e[n - 1].kind == AFM_ENTRY_TOOL_CALL && st.n_calls == 0,
          "no callback: stops with the call as the last entry");
    r = afm_tool_run(s2, tok, t2, &p, &st);
    check(r == AFM_ERR_ARG && strstr(afm_session_error(s2), "has no output yet") != NULL, "running again before its output is refused");
    afm_transcript_add_tool_output(t2, e[n - 1].name, "{\"sky\":\"rain\"}", 0);
    p.mode = AFM_TOOL_ALLOWED;
    check(afm_tool_run(s2, tok, t2, &p, &st) == AFM_OK, "with the app's output added, the loop goes on");

    /* 6. the round limit: one reply, which is a forced call */
    params_init(&p, v, &c, &k1, 5);
    p.mode = AFM_TOOL_REQUIRED;
    p.max_rounds = 1;
    afm_transcript_add_message(t2, "user", "Weather in Oslo for 2 days?");
    r = afm_tool_run(s2, tok, t2, &p, &st);
    e = afm_transcript_entries(t2, &n);
    check(r == AFM_OK && st.stop == AFM_TOOL_STOP_ROUNDS && st.n_calls == 1 && e[n - 1].kind == AFM_ENTRY_TOOL_OUTPUT,
          "max_rounds 1: stops after the call's output with AFM_TOOL_STOP_ROUNDS");

    /* 7. mode none: <executable_start> never comes, whatever the seed */
    for (i = 0; i < 4; i++) {
        int j;
        params_init(&p, v, &c, &k1, 100 + (uint64_t)i);
        k1.n = 0;
        p.mode = AFM_TOOL_NONE;
        p.gen.sampler.temperature = 2.0f;
        afm_transcript_add_message(t2, "user", "Call a tool now.");
        if (afm_tool_run(s2, tok, t2, &p, &st) != AFM_OK) n_exec += 1000;
        for (j = 0; j < k1.n; j++) n_exec += k1.t[j] == afm_tokenizer_special(tok, AFM_SPECIAL_EXEC_START);
        n_exec += st.n_calls;
    }
    check(n_exec == 0, "mode none: no call in 4 replies at temperature 2");
    check(afm_tool_run(s2, tok, t2, &p, NULL) == AFM_OK, "a transcript ending in an answer continues");
    p.mode = AFM_TOOL_REQUIRED;
    p.tool_name = "nope";
    check(afm_tool_run(s2, tok, t2, &p, NULL) == AFM_ERR_ARG && strstr(afm_session_error(s2), "no tool named 'nope'") != NULL,
          "an undeclared tool name is refused");

    afm_transcript_free(t);
    afm_transcript_free(t2);
    afm_session_free(s);
    afm_session_free(s2);
    afm_constraint_vocab_free(v);
    afm_tokenizer_free(tok);
    afm_model_free(m);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
