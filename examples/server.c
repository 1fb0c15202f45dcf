/* afm-server - an OpenAI-compatible HTTP/1.1 server over afm.h (POSIX sockets and threads, nothing
   else). One model in memory, its adapters selectable by name, several sessions at once.

   afm-server -m MODEL.afm [--adapter NAME=PATH ...] [--port 8080] [--parallel 2] [options]

   POST /v1/chat/completions   AFM chat format; streamed (server-sent events) or not
   POST /v1/completions        text continuation (EOS, then the prompt, as `afm -p`)
   GET  /v1/models             the base model and every adapter, each usable as "model"
   GET  /health

   Requests beyond --parallel wait in a queue; each session keeps its KV cache, so a request that
   extends an earlier conversation only evaluates the new tokens. Run `afm-server --help` for the
   limits. Built with -DAFM_SERVER_NO_MAIN it is the parsers only (tests/fuzz/fuzz_http.c). */
#if !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#define AFM_IMPLEMENTATION
#include "../afm.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <poll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* SIGPIPE is ignored anyway */
#endif

/* ---- JSON: a strict reader into a flat node array (depth limited, every string decoded). ---- */

enum { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };
typedef struct jnode {
    int type, child, next, n;  /* first child, next sibling (-1: none), number of children */
    const char *key, *s;       /* member name (objects' children), string value; NUL-terminated */
    size_t key_len, len;
    const char *raw;           /* the value's JSON text in the input (raw_len bytes) */
    size_t raw_len;
    double num;
} jnode;
typedef struct jdoc {
    jnode *nodes;
    int n, cap, depth;
    char *strs;                /* decoded strings (2 x the input's length + 2 bytes) */
    size_t n_strs;
    const char *start, *p, *end;
    char err[160];
} jdoc;

#define JSON_MAX_DEPTH 64
#define JSON_MAX_NODES 200000

static int j_fail(jdoc *d, const char *what) {
    if (!d->err[0]) snprintf(d->err, sizeof d->err, "%s at byte %ld", what, (long)(d->p - d->start));
    return -1;
}
static void j_ws(jdoc *d) { while (d->p < d->end && (*d->p == ' ' || *d->p == '\t' || *d->p == '\n' || *d->p == '\r')) d->p++; }

static int j_new(jdoc *d, int type) {
    if (d->n == d->cap) {
        int cap = d->cap ? d->cap * 2 : 64;
        jnode *nn;
        if (d->n >= JSON_MAX_NODES || !(nn = (jnode *)realloc(d->nodes, (size_t)cap * sizeof *nn))) return -1;
        d->nodes = nn;
        d->cap = cap;
    }
    memset(&d->nodes[d->n], 0, sizeof(jnode));
    d->nodes[d->n].type = type;
    d->nodes[d->n].child = d->nodes[d->n].next = -1;
    return d->n++;
}

static int j_hex4(const char *p, unsigned *v) {
    int i;
    *v = 0;
    for (i = 0; i < 4; i++) {
        char c = p[i];
        *v <<= 4;
        if (c >= '0' && c <= '9') *v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') *v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') *v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    return 1;
}

/* A string at d->p (after the quote); decoded into d->strs. */
static int j_string(jdoc *d, const char **out, size_t *len) {
    char *o = d->strs + d->n_strs, *start = o;
    while (d->p < d->end && *d->p != '"') {
        unsigned char c = (unsigned char)*d->p++;
        if (c < 0x20) { d->p--; return j_fail(d, "control character in a string"); }
        if (c != '\\') { *o++ = (char)c; continue; }
        if (d->p >= d->end) return j_fail(d, "unterminated string");
        c = (unsigned char)*d->p++;
        if (c == 'u') {
            unsigned u, lo;
            if (d->end - d->p < 4 || !j_hex4(d->p, &u)) return j_fail(d, "bad \\u escape");
            d->p += 4;
            if (u >= 0xd800 && u < 0xdc00) { /* a surrogate pair */
                if (d->end - d->p < 6 || d->p[0] != '\\' || d->p[1] != 'u' || !j_hex4(d->p + 2, &lo) || lo < 0xdc00 || lo > 0xdfff)
                    return j_fail(d, "unpaired surrogate");
                d->p += 6;
                u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
            } else if (u >= 0xdc00 && u < 0xe000) return j_fail(d, "unpaired surrogate");
            if (u < 0x80) *o++ = (char)u;
            else if (u < 0x800) { *o++ = (char)(0xc0 | u >> 6); *o++ = (char)(0x80 | (u & 63)); }
            else if (u < 0x10000) { *o++ = (char)(0xe0 | u >> 12); *o++ = (char)(0x80 | (u >> 6 & 63)); *o++ = (char)(0x80 | (u & 63)); }
            else { *o++ = (char)(0xf0 | u >> 18); *o++ = (char)(0x80 | (u >> 12 & 63)); *o++ = (char)(0x80 | (u >> 6 & 63)); *o++ = (char)(0x80 | (u & 63)); }
        } else {
            const char *esc = strchr("\"\\/bfnrt", (int)c);
            if (!c || !esc) { d->p--; return j_fail(d, "bad escape"); }
            *o++ = "\"\\/\b\f\n\r\t"[esc - "\"\\/bfnrt"];
        }
    }
    if (d->p >= d->end) return j_fail(d, "unterminated string");
    d->p++;
    *o++ = 0;
    *out = start;
    *len = (size_t)(o - start - 1);
    d->n_strs += (size_t)(o - start);
    return 0;
}

static int j_value(jdoc *d);

static int j_container(jdoc *d, int obj) {
    int self = j_new(d, obj ? J_OBJ : J_ARR), last = -1;
    if (self < 0) return j_fail(d, "document too large");
    if (++d->depth > JSON_MAX_DEPTH) return j_fail(d, "nested too deeply");
    d->p++;
    j_ws(d);
    if (d->p < d->end && *d->p == (obj ? '}' : ']')) { d->p++; d->depth--; return self; }
    for (;;) {
        const char *key = NULL;
        size_t key_len = 0;
        int v;
        j_ws(d);
        if (obj) {
            if (d->p >= d->end || *d->p != '"') return j_fail(d, "expected a member name");
            d->p++;
            if (j_string(d, &key, &key_len) < 0) return -1;
            j_ws(d);
            if (d->p >= d->end || *d->p != ':') return j_fail(d, "expected ':'");
            d->p++;
        }
        if ((v = j_value(d)) < 0) return -1;
        d->nodes[v].key = key;
        d->nodes[v].key_len = key_len;
        if (last < 0) d->nodes[self].child = v; else d->nodes[last].next = v;
        last = v;
        d->nodes[self].n++;
        j_ws(d);
        if (d->p < d->end && *d->p == ',') { d->p++; continue; }
        if (d->p < d->end && *d->p == (obj ? '}' : ']')) { d->p++; d->depth--; return self; }
        return j_fail(d, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int j_value_at(jdoc *d);

/* A value, with the span of its text kept (a schema is handed on as text). */
static int j_value(jdoc *d) {
    const char *start;
    int v;
    j_ws(d);
    start = d->p;
    if ((v = j_value_at(d)) >= 0) { d->nodes[v].raw = start; d->nodes[v].raw_len = (size_t)(d->p - start); }
    return v;
}

static int j_value_at(jdoc *d) {
    int v;
    if (d->p >= d->end) return j_fail(d, "unexpected end");
    switch (*d->p) {
    case '{': return j_container(d, 1);
    case '[': return j_container(d, 0);
    case '"':
        if ((v = j_new(d, J_STR)) < 0) return j_fail(d, "document too large");
        d->p++;
        return j_string(d, &d->nodes[v].s, &d->nodes[v].len) < 0 ? -1 : v;
    case 't': case 'f': case 'n': {
        static const char *const words[3] = { "true", "false", "null" };
        static const int types[3] = { J_TRUE, J_FALSE, J_NULL };
        int k;
        for (k = 0; k < 3; k++) {
            size_t L = strlen(words[k]);
            if ((size_t)(d->end - d->p) >= L && !memcmp(d->p, words[k], L)) {
                d->p += L;
                return j_new(d, types[k]) < 0 ? j_fail(d, "document too large") : d->n - 1;
            }
        }
        return j_fail(d, "unexpected word");
    }
    default: {  /* a number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
        const char *s = d->p;
        char tmp[64];
        if (d->p < d->end && *d->p == '-') d->p++;
        if (d->p >= d->end || *d->p < '0' || *d->p > '9') { d->p = s; return j_fail(d, "unexpected character"); }
        if (*d->p == '0') d->p++; else while (d->p < d->end && *d->p >= '0' && *d->p <= '9') d->p++;
        if (d->p < d->end && *d->p == '.') {
            d->p++;
            if (d->p >= d->end || *d->p < '0' || *d->p > '9') return j_fail(d, "bad number");
            while (d->p < d->end && *d->p >= '0' && *d->p <= '9') d->p++;
        }
        if (d->p < d->end && (*d->p == 'e' || *d->p == 'E')) {
            d->p++;
            if (d->p < d->end && (*d->p == '+' || *d->p == '-')) d->p++;
            if (d->p >= d->end || *d->p < '0' || *d->p > '9') return j_fail(d, "bad number");
            while (d->p < d->end && *d->p >= '0' && *d->p <= '9') d->p++;
        }
        if (d->p - s >= (long)sizeof tmp) return j_fail(d, "number too long");
        memcpy(tmp, s, (size_t)(d->p - s));
        tmp[d->p - s] = 0;
        if ((v = j_new(d, J_NUM)) < 0) return j_fail(d, "document too large");
        d->nodes[v].num = strtod(tmp, NULL);
        return v;
    }
    }
}

/* Parses text; 0 and the root at node 0, or -1 with d->err. */
static int json_parse(jdoc *d, const char *text, size_t len) {
    memset(d, 0, sizeof *d);
    d->start = d->p = text;
    d->end = text + len;
    /* every decoded string and its NUL fit in the bytes of its literal; joined content parts
       (req_content) need as much again */
    if (!(d->strs = (char *)malloc(2 * len + 2))) { snprintf(d->err, sizeof d->err, "out of memory"); return -1; }
    if (j_value(d) < 0) return -1;
    j_ws(d);
    if (d->p != d->end) return j_fail(d, "trailing characters");
    return 0;
}
static void json_free(jdoc *d) { free(d->nodes); free(d->strs); }

/* The member `key` of object node o, or -1. */
static int jget(const jdoc *d, int o, const char *key) {
    int c;
    if (o < 0 || d->nodes[o].type != J_OBJ) return -1;
    for (c = d->nodes[o].child; c >= 0; c = d->nodes[c].next)
        if (d->nodes[c].key_len == strlen(key) && !memcmp(d->nodes[c].key, key, d->nodes[c].key_len)) return c;
    return -1;
}

/* ---- HTTP/1.1 requests: the head parser (strict; limits on every part). ---- */

#define HTTP_MAX_HEAD 16384
#define HTTP_MAX_HEADERS 64

typedef struct http_req {
    char method[16], path[2048];
    long long content_length;  /* -1: none */
    int keep_alive;
} http_req;

/* Parses the head in buf[0..n). Returns its length (through the blank line) when complete, 0 when
   more bytes are needed, or -1 with *status (400, 431, 501, 505) and *msg. */
static long http_parse_head(const char *buf, size_t n, http_req *r, int *status, const char **msg) {
    const char *p = buf, *end, *line_end, *sp;
    size_t head_len;
    int n_headers = 0, i;
    *status = 400;
    memset(r, 0, sizeof *r);
    r->content_length = -1;
    for (head_len = 0; head_len + 3 < n; head_len++)
        if (!memcmp(buf + head_len, "\r\n\r\n", 4)) break;
    for (i = 0; (size_t)i < head_len + 3 && (size_t)i < n; i++) /* a bare LF would leave us waiting for a CRLF CRLF */
        if (buf[i] == '\n' && (i == 0 || buf[i - 1] != '\r')) { *msg = "lines must end in CRLF"; return -1; }
    if (head_len + 3 >= n) {
        if (n >= HTTP_MAX_HEAD) { *status = 431; *msg = "request head larger than 16 KiB"; return -1; }
        return 0;
    }
    head_len += 4;
    if (head_len > HTTP_MAX_HEAD) { *status = 431; *msg = "request head larger than 16 KiB"; return -1; }
    end = buf + head_len - 2; /* the final CRLF */
    /* request line: METHOD SP TARGET SP HTTP/1.x */
    line_end = p;
    while (line_end < end && *line_end != '\r') line_end++;
    for (i = 0; p + i < line_end && p[i] >= 'A' && p[i] <= 'Z'; i++) {}
    if (i == 0 || i >= (int)sizeof r->method || p[i] != ' ') { *msg = "malformed request line"; return -1; }
    memcpy(r->method, p, (size_t)i);
    p += i + 1;
    sp = p;
    while (sp < line_end && *sp != ' ') sp++;
    if (sp == p || *p != '/' || sp >= line_end) { *msg = "malformed request target"; return -1; }
    if (sp - p >= (long)sizeof r->path) { *status = 414; *msg = "request target too long"; return -1; }
    for (i = 0; p + i < sp; i++)
        if ((unsigned char)p[i] <= 0x20 || (unsigned char)p[i] >= 0x7f) { *msg = "bad character in the request target"; return -1; }
    memcpy(r->path, p, (size_t)(sp - p));
    p = sp + 1;
    if (line_end - p != 8 || memcmp(p, "HTTP/1.", 7) || (p[7] != '0' && p[7] != '1')) {
        *status = 505; *msg = "only HTTP/1.0 and HTTP/1.1"; return -1;
    }
    r->keep_alive = p[7] == '1';
    p = line_end + 2;
    /* headers: NAME ":" OWS VALUE OWS CRLF */
    while (p < end) {
        const char *colon, *v, *ve;
        size_t name_len;
        line_end = p;
        while (line_end < end && *line_end != '\r') line_end++;
        if (line_end[1] != '\n') { *msg = "header line not ended by CRLF"; return -1; }
        if (++n_headers > HTTP_MAX_HEADERS) { *status = 431; *msg = "more than 64 header lines"; return -1; }
        for (colon = p; colon < line_end && *colon != ':'; colon++)
            if (!(((unsigned char)*colon > 0x20 && (unsigned char)*colon < 0x7f) && !strchr("()<>@,;\\\"/[]?={}", *colon))) {
                *msg = "bad character in a header name"; return -1;
            }
        if (colon == p || colon >= line_end) { *msg = "malformed header line"; return -1; }
        name_len = (size_t)(colon - p);
        v = colon + 1;
        while (v < line_end && (*v == ' ' || *v == '\t')) v++;
        ve = line_end;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        for (i = 0; v + i < ve; i++)
            if ((unsigned char)v[i] < 0x20 && v[i] != '\t') { *msg = "control character in a header value"; return -1; }
        if (name_len == 14 && !strncasecmp(p, "content-length", 14)) {
            long long cl = 0;
            if (v == ve) { *msg = "empty Content-Length"; return -1; }
            for (i = 0; v + i < ve; i++) {
                if (v[i] < '0' || v[i] > '9' || cl > 100000000000LL) { *msg = "bad Content-Length"; return -1; }
                cl = cl * 10 + (v[i] - '0');
            }
            if (r->content_length >= 0 && r->content_length != cl) { *msg = "conflicting Content-Length headers"; return -1; }
            r->content_length = cl;
        } else if (name_len == 17 && !strncasecmp(p, "transfer-encoding", 17)) {
            *status = 501; *msg = "Transfer-Encoding is not supported: send Content-Length"; return -1;
        } else if (name_len == 10 && !strncasecmp(p, "connection", 10)) {
            if (ve - v == 5 && !strncasecmp(v, "close", 5)) r->keep_alive = 0;
            if (ve - v == 10 && !strncasecmp(v, "keep-alive", 10)) r->keep_alive = 1;
        }
        p = line_end + 2;
    }
    return (long)head_len;
}

/* ---- Requests: JSON body -> what to generate. Errors carry an OpenAI-style status and message. ---- */

#define MAX_STOPS 16
#define MAX_BIAS 1024
#define MAX_MESSAGES 1024

typedef struct gen_req {
    int chat, stream, include_usage, max_tokens, n_stops, n_msgs, n_bias;
    const char *model, *prompt;              /* into the JSON document */
    const char *schema;                      /* response_format json_schema: the schema's JSON text */
    size_t schema_len;
    /* tool calling: the tools array's JSON text, the mode (tool_choice), each message's node */
    const char *tools;
    size_t tools_len;
    int use_tools;                           /* tools given, or tool calls / outputs among the messages */
    afm_tool_mode tool_mode;
    const char *tool_name;                   /* tool_choice {"type":"function","function":{"name"}} */
    int msg_node[MAX_MESSAGES];
    const char *stops[MAX_STOPS];
    afm_chat_message msgs[MAX_MESSAGES];
    afm_sampler_params sp;
    afm_logit_bias bias[MAX_BIAS];
    int status;                              /* on error: HTTP status, message, param */
    char err[256];
    const char *param, *code;
} gen_req;

static int req_fail(gen_req *g, int status, const char *param, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g->err, sizeof g->err, fmt, ap);
    va_end(ap);
    g->status = status;
    g->param = param;
    g->code = code;
    return -1;
}

/* A number member in [lo, hi] (absent: *out unchanged). */
static int req_num(gen_req *g, const jdoc *d, int o, const char *key, double lo, double hi, double *out) {
    int v = jget(d, o, key);
    if (v < 0 || d->nodes[v].type == J_NULL) return 0;
    if (d->nodes[v].type != J_NUM) return req_fail(g, 400, key, "invalid_type", "'%s' must be a number", key);
    if (!(d->nodes[v].num >= lo && d->nodes[v].num <= hi)) return req_fail(g, 400, key, "invalid_value", "'%s' must be in [%g, %g]", key, lo, hi);
    *out = d->nodes[v].num;
    return 0;
}

static int req_int(gen_req *g, const jdoc *d, int o, const char *key, double lo, double hi, double *out) {
    if (req_num(g, d, o, key, lo, hi, out) < 0) return -1;
    if (*out != floor(*out)) return req_fail(g, 400, key, "invalid_type", "'%s' must be an integer", key);
    return 0;
}

/* A message's content: a string, or an array of {"type": "text", "text": ...} parts (joined). */
static const char *req_content(gen_req *g, jdoc *d, int c) {
    int part;
    size_t total = 0;
    char *joined;
    if (c >= 0 && d->nodes[c].type == J_STR) return d->nodes[c].s;
    if (c < 0 || d->nodes[c].type != J_ARR) { req_fail(g, 400, "messages", "invalid_type", "a message's 'content' must be a string or an array of text parts"); return NULL; }
    for (part = d->nodes[c].child; part >= 0; part = d->nodes[part].next) {
        int t = jget(d, part, "type"), x = jget(d, part, "text");
        if (t < 0 || d->nodes[t].type != J_STR || strcmp(d->nodes[t].s, "text") || x < 0 || d->nodes[x].type != J_STR) {
            req_fail(g, 400, "messages", "invalid_value", "only text content parts are supported");
            return NULL;
        }
        total += d->nodes[x].len;
    }
    joined = d->strs + d->n_strs; /* room: see json_parse */
    for (part = d->nodes[c].child, total = 0; part >= 0; part = d->nodes[part].next) {
        int x = jget(d, part, "text");
        memmove(joined + total, d->nodes[x].s, d->nodes[x].len);
        total += d->nodes[x].len;
    }
    joined[total] = 0;
    d->n_strs += total + 1;
    return joined;
}

/* A message's tool parts: an assistant's tool_calls ([{"id","type":"function","function":{"name",
   "arguments": a JSON string}}]) or a "tool" message (its tool_call_id names an earlier call). */
static int req_tool_message(gen_req *g, const jdoc *d, int c, int role) {
    int calls = jget(d, c, "tool_calls"), k;
    if (!strcmp(d->nodes[role].s, "tool")) {
        int id = jget(d, c, "tool_call_id");
        if (id < 0 || d->nodes[id].type != J_STR) return req_fail(g, 400, "messages", "invalid_type", "a tool message needs its 'tool_call_id'");
        g->use_tools = 1;
    }
    if (calls < 0 || d->nodes[calls].type == J_NULL) return 0;
    if (d->nodes[calls].type != J_ARR || strcmp(d->nodes[role].s, "assistant"))
        return req_fail(g, 400, "messages", "invalid_type", "'tool_calls' must be an array, on an assistant message");
    for (k = d->nodes[calls].child; k >= 0; k = d->nodes[k].next) {
        int f = jget(d, k, "function"), id = jget(d, k, "id"), name = jget(d, f, "name"), args = jget(d, f, "arguments");
        if (id < 0 || d->nodes[id].type != J_STR || name < 0 || d->nodes[name].type != J_STR || args < 0 || d->nodes[args].type != J_STR)
            return req_fail(g, 400, "messages", "invalid_type", "each tool call needs 'id', 'function.name' and 'function.arguments' (a JSON string)");
    }
    g->use_tools = 1;
    return 0;
}

/* tools (OpenAI's function tools, passed to afm_transcript_add_tools_json) and tool_choice. */
static int req_tools(gen_req *g, const jdoc *d, int root) {
    int v = jget(d, root, "tools"), c = jget(d, root, "tool_choice");
    g->tool_mode = AFM_TOOL_ALLOWED;
    if (v >= 0 && d->nodes[v].type != J_NULL) {
        if (d->nodes[v].type != J_ARR) return req_fail(g, 400, "tools", "invalid_type", "'tools' must be an array");
        g->tools = d->nodes[v].raw;
        g->tools_len = d->nodes[v].raw_len;
        g->use_tools = 1;
    }
    if (c >= 0 && d->nodes[c].type == J_STR) {
        if (!strcmp(d->nodes[c].s, "none")) g->tool_mode = AFM_TOOL_NONE;
        else if (!strcmp(d->nodes[c].s, "required")) g->tool_mode = AFM_TOOL_REQUIRED;
        else if (strcmp(d->nodes[c].s, "auto")) return req_fail(g, 400, "tool_choice", "invalid_value", "tool_choice must be auto, none, required or a function");
    } else if (c >= 0 && d->nodes[c].type == J_OBJ) {
        int name = jget(d, jget(d, c, "function"), "name");
        if (name < 0 || d->nodes[name].type != J_STR) return req_fail(g, 400, "tool_choice", "invalid_value", "tool_choice: {\"type\":\"function\",\"function\":{\"name\":...}}");
        g->tool_mode = AFM_TOOL_REQUIRED;
        g->tool_name = d->nodes[name].s;
    } else if (c >= 0 && d->nodes[c].type != J_NULL) return req_fail(g, 400, "tool_choice", "invalid_type", "tool_choice must be a string or an object");
    if (g->tool_mode != AFM_TOOL_ALLOWED && !g->tools) return req_fail(g, 400, "tool_choice", "invalid_value", "tool_choice needs 'tools'");
    if (g->use_tools && !g->chat) return req_fail(g, 400, "tools", "unsupported", "tools are for /v1/chat/completions");
    if (g->use_tools && (g->stream || g->schema))
        return req_fail(g, 400, g->stream ? "stream" : "response_format", "unsupported", "tools work without stream and response_format");
    return 0;
}

/* Fills g from a parsed body. chat: /v1/chat/completions, else /v1/completions. */
static int req_from_json(gen_req *g, jdoc *d, int chat) {
    int root = 0, v, c;
    double num;
    memset(g, 0, sizeof *g);
    g->chat = chat;
    g->max_tokens = -1;
    g->sp.temperature = 1.0f; /* OpenAI's defaults */
    g->sp.top_p = 1.0f;
    g->sp.seed = (uint64_t)time(NULL);
    if (d->nodes[root].type != J_OBJ) return req_fail(g, 400, NULL, "invalid_request", "the request body must be a JSON object");
    v = jget(d, root, "model");
    if (v < 0 || d->nodes[v].type != J_STR) return req_fail(g, 400, "model", "invalid_type", "'model' must be a string (GET /v1/models lists them)");
    g->model = d->nodes[v].s;
    if (chat) {
        v = jget(d, root, "messages");
        if (v < 0 || d->nodes[v].type != J_ARR || d->nodes[v].n == 0) return req_fail(g, 400, "messages", "invalid_type", "'messages' must be a non-empty array");
        if (d->nodes[v].n > MAX_MESSAGES) return req_fail(g, 400, "messages", "invalid_value", "at most %d messages", MAX_MESSAGES);
        for (c = d->nodes[v].child; c >= 0; c = d->nodes[c].next) {
            int role = jget(d, c, "role");
            if (d->nodes[c].type != J_OBJ || role < 0 || d->nodes[role].type != J_STR)
                return req_fail(g, 400, "messages", "invalid_type", "each message must be an object with a string 'role'");
            if (req_tool_message(g, d, c, role) < 0) return -1;
            g->msg_node[g->n_msgs] = c;
            g->msgs[g->n_msgs].role = d->nodes[role].s;
            if (g->use_tools && (jget(d, c, "content") < 0 || d->nodes[jget(d, c, "content")].type == J_NULL)) g->msgs[g->n_msgs].content = "";
            else if (!(g->msgs[g->n_msgs].content = req_content(g, d, jget(d, c, "content")))) return -1;
            g->n_msgs++;
        }
    } else {
        v = jget(d, root, "prompt");
        if (v >= 0 && d->nodes[v].type == J_ARR && d->nodes[v].n == 1) v = d->nodes[v].child;
        if (v < 0 || d->nodes[v].type != J_STR) return req_fail(g, 400, "prompt", "invalid_type", "'prompt' must be a string (or an array of one string)");
        g->prompt = d->nodes[v].s;
        if ((v = jget(d, root, "echo")) >= 0 && d->nodes[v].type == J_TRUE) return req_fail(g, 400, "echo", "unsupported", "'echo' is not supported");
    }
    v = jget(d, root, "stream");
    if (v >= 0 && d->nodes[v].type != J_TRUE && d->nodes[v].type != J_FALSE && d->nodes[v].type != J_NULL) return req_fail(g, 400, "stream", "invalid_type", "'stream' must be a boolean");
    g->stream = v >= 0 && d->nodes[v].type == J_TRUE;
    if ((v = jget(d, root, "stream_options")) >= 0 && d->nodes[v].type == J_OBJ) {
        int u = jget(d, v, "include_usage");
        g->include_usage = u >= 0 && d->nodes[u].type == J_TRUE;
    }
    num = -1;
    if (req_int(g, d, root, "max_tokens", 1, 1 << 24, &num) < 0 || req_int(g, d, root, "max_completion_tokens", 1, 1 << 24, &num) < 0) return -1;
    g->max_tokens = (int)num;
    num = 1;
    if (req_int(g, d, root, "n", 1, 1, &num) < 0) return req_fail(g, 400, "n", "unsupported", "only n = 1 is supported");
    num = g->sp.temperature;
    if (req_num(g, d, root, "temperature", 0, 2, &num) < 0) return -1;
    g->sp.temperature = (float)num;
    num = g->sp.top_p;
    if (req_num(g, d, root, "top_p", 0, 1, &num) < 0) return -1;
    g->sp.top_p = num > 0 ? (float)num : 1.0f;
    num = -1;
    if (req_int(g, d, root, "seed", -9007199254740991.0, 9007199254740991.0, &num) < 0) return -1;
    if (jget(d, root, "seed") >= 0 && d->nodes[jget(d, root, "seed")].type == J_NUM) g->sp.seed = (uint64_t)(int64_t)num;
    num = 0;
    if (req_num(g, d, root, "presence_penalty", -2, 2, &num) < 0) return -1;
    g->sp.presence_penalty = (float)num;
    num = 0;
    if (req_num(g, d, root, "frequency_penalty", -2, 2, &num) < 0) return -1;
    g->sp.frequency_penalty = (float)num;
    if ((v = jget(d, root, "stop")) >= 0 && d->nodes[v].type != J_NULL) {
        if (d->nodes[v].type == J_STR) c = v, v = -1;
        else if (d->nodes[v].type == J_ARR) c = d->nodes[v].child;
        else return req_fail(g, 400, "stop", "invalid_type", "'stop' must be a string or an array of strings");
        for (; c >= 0; c = v >= 0 ? d->nodes[c].next : -1) {
            if (d->nodes[c].type != J_STR || d->nodes[c].len == 0) return req_fail(g, 400, "stop", "invalid_type", "'stop' strings must be non-empty strings");
            if (g->n_stops == MAX_STOPS) return req_fail(g, 400, "stop", "invalid_value", "at most %d stop strings", MAX_STOPS);
            g->stops[g->n_stops++] = d->nodes[c].s;
        }
    }
    if ((v = jget(d, root, "logit_bias")) >= 0 && d->nodes[v].type != J_NULL) {
        if (d->nodes[v].type != J_OBJ) return req_fail(g, 400, "logit_bias", "invalid_type", "'logit_bias' must be an object of token id -> bias");
        if (d->nodes[v].n > MAX_BIAS) return req_fail(g, 400, "logit_bias", "invalid_value", "at most %d biases", MAX_BIAS);
        for (c = d->nodes[v].child; c >= 0; c = d->nodes[c].next) {
            char *end;
            long id = strtol(d->nodes[c].key, &end, 10);
            if (!d->nodes[c].key[0] || *end || id < 0 || id > 0x7fffffff) return req_fail(g, 400, "logit_bias", "invalid_value", "logit_bias key '%.40s' is not a token id", d->nodes[c].key);
            if (d->nodes[c].type != J_NUM || !(d->nodes[c].num >= -100 && d->nodes[c].num <= 100))
                return req_fail(g, 400, "logit_bias", "invalid_value", "logit_bias values must be numbers in [-100, 100]");
            g->bias[g->n_bias].token = (int32_t)id;
            g->bias[g->n_bias++].bias = d->nodes[c].num <= -100 ? -INFINITY : (float)d->nodes[c].num; /* -100 bans, as OpenAI documents */
        }
        g->sp.logit_bias = g->bias;
        g->sp.n_logit_bias = g->n_bias;
    }
    if ((v = jget(d, root, "response_format")) >= 0 && d->nodes[v].type != J_NULL) {
        int t = jget(d, v, "type");
        if (t < 0 || d->nodes[t].type != J_STR) return req_fail(g, 400, "response_format", "invalid_type", "'response_format' must be an object with a 'type'");
        if (!strcmp(d->nodes[t].s, "json_schema")) { /* {"type": "json_schema", "json_schema": {"name", "schema"}} */
            int js = jget(d, v, "json_schema"), sc = jget(d, js, "schema");
            if (sc < 0 || d->nodes[sc].type != J_OBJ)
                return req_fail(g, 400, "response_format", "invalid_type", "response_format json_schema needs json_schema.schema, an object");
            g->schema = d->nodes[sc].raw;
            g->schema_len = d->nodes[sc].raw_len;
        } else if (strcmp(d->nodes[t].s, "text"))
            return req_fail(g, 400, "response_format", "unsupported", "response_format '%.40s' is not supported: use text or json_schema", d->nodes[t].s);
    }
    return req_tools(g, d, root);
}

#ifndef AFM_SERVER_NO_MAIN

/* ---- A growable byte buffer (responses, JSON output). ---- */

typedef struct sbuf { char *p; size_t n, cap; int oom; } sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap < b->n + n + 1) cap *= 2;
        if (!(p = (char *)realloc(b->p, cap))) { b->oom = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) sb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}
/* A JSON string literal; bytes are copied as they are (the text is UTF-8 from the detokenizer). */
static void sb_json(sbuf *b, const char *s, size_t n) {
    size_t i, start = 0;
    sb_put(b, "\"", 1);
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        sb_put(b, s + start, i - start);
        if (c == '"') sb_str(b, "\\\"");
        else if (c == '\\') sb_str(b, "\\\\");
        else if (c == '\n') sb_str(b, "\\n");
        else if (c == '\r') sb_str(b, "\\r");
        else if (c == '\t') sb_str(b, "\\t");
        else sb_printf(b, "\\u%04x", c);
        start = i + 1;
    }
    sb_put(b, s + start, n - start);
    sb_put(b, "\"", 1);
}


/* ---- The server: model, adapters, sessions (slots), connections. ---- */

typedef struct slot {
    afm_session *s;
    const afm_adapter *adapter;     /* the session's adapter: its cache is only reusable with it */
    int busy;
    long long used;                 /* when it was last handed out (least recently used wins ties) */
} slot;

typedef struct server {
    afm_model *model;
    afm_tokenizer *tok;
    const char *model_name;
    int n_adapters;
    const char *adapter_names[16];
    afm_adapter *adapters[16];
    slot *slots;
    int n_slots, n_ctx, n_waiting, n_conn, max_conn, max_queue, timeout_s, max_time_s;
    int no_schema_prompt;            /* --no-schema-prompt: response_format schemas are not shown to the model */
    struct waiter *queue;           /* requests waiting for a session, oldest first */
    long long max_body, clock, next_id;
    pthread_mutex_t mu;
    pthread_cond_t cv;              /* a connection ended, or shutdown began */
    volatile int stopping;
    int32_t eog[2];
    int n_eog;
    afm_constraint_vocab *cvocab;   /* the tokenizer's bytes for constraints (response_format) */
} server;

static volatile sig_atomic_t g_signal;  /* the signal handler's flag (the one global: handlers need it) */
static int g_wake[2] = { -1, -1 };     /* self-pipe: wakes the accept loop */

static void on_signal(int sig) {
    ssize_t r;
    g_signal = sig;
    r = write(g_wake[1], "x", 1);
    (void)r;
}

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static const char *status_text(int status) {
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    }
    return "Error";
}

static int send_response(int fd, int status, const char *type, const char *body, size_t n) {
    char head[256];
    int h = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %lu\r\nConnection: close\r\n\r\n",
                     status, status_text(status), type, (unsigned long)n);
    return send_all(fd, head, (size_t)h) < 0 || send_all(fd, body, n) < 0 ? -1 : 0;
}

/* {"error": {"message", "type", "param", "code"}} */
static void send_error(int fd, int status, const char *msg, const char *param, const char *code) {
    sbuf b = { NULL, 0, 0, 0 };
    sb_str(&b, "{\"error\":{\"message\":");
    sb_json(&b, msg, strlen(msg));
    sb_printf(&b, ",\"type\":\"%s\",\"param\":", status >= 500 ? "server_error" : "invalid_request_error");
    if (param) sb_json(&b, param, strlen(param)); else sb_str(&b, "null");
    sb_str(&b, ",\"code\":");
    if (code) sb_json(&b, code, strlen(code)); else sb_str(&b, "null");
    sb_str(&b, "}}");
    if (!b.oom) send_response(fd, status, "application/json", b.p, b.n);
    free(b.p);
}

/* The client closed its end (a read would return EOF). */
static int client_gone(int fd) {
    char c;
    ssize_t r = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* A request waiting for a session: waiters are served first come, first served (a freed session is
   handed to the oldest waiter), so that no request starves under load. */
typedef struct waiter {
    pthread_cond_t cv;
    slot *granted;
    struct waiter *next;
} waiter;

/* The free slot whose cached tokens share the longest prefix with the prompt (with the same
   adapter), then the least recently used; NULL when every slot is busy. */
static slot *slot_pick(server *sv, const int32_t *prompt, int n_prompt, const afm_adapter *ad) {
    slot *best = NULL;
    int i, best_common = -1;
    for (i = 0; i < sv->n_slots; i++) {
        slot *sl = &sv->slots[i];
        int n = 0, c = 0;
        const int32_t *t;
        if (sl->busy) continue;
        t = afm_session_tokens(sl->s, &n);
        while (sl->adapter == ad && c < n && c < n_prompt && t[c] == prompt[c]) c++;
        if (c > best_common || (c == best_common && sl->used < best->used)) { best = sl; best_common = c; }
    }
    return best;
}

/* Hands a slot to the oldest waiter, or frees it. Called with the lock held. */
static void slot_pass_on(server *sv, slot *sl) {
    waiter *w = sv->queue;
    if (w && !sv->stopping) {
        sv->queue = w->next;
        w->granted = sl;
        sl->used = ++sv->clock;
        pthread_cond_signal(&w->cv);
    } else sl->busy = 0;
    pthread_cond_broadcast(&sv->cv);
}

/* Takes a session: a free one at once (the best for this prompt), else waits in the queue. NULL (and
   *status 503) when the queue is full, the wait timed out, the client left or the server is stopping. */
static slot *slot_acquire(server *sv, int fd, const int32_t *prompt, int n_prompt, const afm_adapter *ad, int *status) {
    slot *got;
    waiter me, **pp;
    struct timespec until;
    *status = 503;
    pthread_mutex_lock(&sv->mu);
    if (!sv->queue && !sv->stopping && (got = slot_pick(sv, prompt, n_prompt, ad)) != NULL) {
        got->busy = 1;
        got->used = ++sv->clock;
        pthread_mutex_unlock(&sv->mu);
        return got;
    }
    if (sv->n_waiting >= sv->max_queue || sv->stopping) { pthread_mutex_unlock(&sv->mu); return NULL; }
    memset(&me, 0, sizeof me);
    pthread_cond_init(&me.cv, NULL);
    for (pp = &sv->queue; *pp; pp = &(*pp)->next) {}
    *pp = &me;
    sv->n_waiting++;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += sv->timeout_s * 6;
    while (!me.granted && !sv->stopping) {
        struct timespec tick;
        clock_gettime(CLOCK_REALTIME, &tick);
        tick.tv_sec += 1; /* wake each second to notice a client that left */
        if (tick.tv_sec > until.tv_sec) tick = until;
        if (pthread_cond_timedwait(&me.cv, &sv->mu, &tick) == ETIMEDOUT && !me.granted &&
            (tick.tv_sec >= until.tv_sec || client_gone(fd))) break;
    }
    sv->n_waiting--;
    got = me.granted;
    if (!got) /* leaving the queue without a slot */
        for (pp = &sv->queue; *pp; pp = &(*pp)->next)
            if (*pp == &me) { *pp = me.next; break; }
    if (got && sv->stopping) { slot_pass_on(sv, got); got = NULL; }
    pthread_mutex_unlock(&sv->mu);
    pthread_cond_destroy(&me.cv);
    return got;
}

static void slot_release(server *sv, slot *sl) {
    pthread_mutex_lock(&sv->mu);
    slot_pass_on(sv, sl);
    pthread_mutex_unlock(&sv->mu);
}

/* State of one generation: where the text goes and why it ended. */
typedef struct gen_out {
    server *sv;
    int fd, chat, stream, failed;
    double deadline;
    afm_detokenizer d;
    afm_stop *stop;
    char *piece;
    size_t piece_cap;
    sbuf text;                        /* the whole reply (non-streamed) */
    int n_generated;
    const char *finish;               /* "stop", or NULL (length) */
    char id[48];
    long created;
    const char *model;
} gen_out;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int send_chunk(gen_out *o, const char *text, size_t n, const char *finish) {
    sbuf b = { NULL, 0, 0, 0 };
    int r;
    sb_printf(&b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", o->id, o->chat ? "chat.completion.chunk" : "text_completion", o->created);
    sb_json(&b, o->model, strlen(o->model));
    sb_str(&b, ",\"choices\":[{\"index\":0,");
    if (o->chat) {
        sb_str(&b, "\"delta\":{");
        if (text) { sb_str(&b, "\"content\":"); sb_json(&b, text, n); }
        sb_str(&b, "}");
    } else {
        sb_str(&b, "\"text\":");
        sb_json(&b, text ? text : "", text ? n : 0);
    }
    sb_str(&b, ",\"finish_reason\":");
    if (finish) sb_printf(&b, "\"%s\"", finish); else sb_str(&b, "null");
    sb_str(&b, "}]}\n\n");
    r = b.oom ? -1 : send_all(o->fd, b.p, b.n);
    free(b.p);
    return r;
}

/* Text that is ready (stop strings already cut): sent as a chunk, or kept for the reply. */
static int emit_text(gen_out *o, const char *s, size_t n) {
    if (n == 0) return 0;
    if (o->stream) return send_chunk(o, s, n, NULL);
    sb_put(&o->text, s, n);
    return o->text.oom ? -1 : 0;
}

static int on_token(void *user, int32_t tok) {
    gen_out *o = (gen_out *)user;
    size_t n = 0;
    const char *shown;
    int i, r;
    o->n_generated++;
    for (i = 0; i < o->sv->n_eog; i++)
        if (tok == o->sv->eog[i]) { o->finish = "stop"; return 1; }
    if (afm_detokenizer_push(&o->d, tok, o->piece, o->piece_cap, &n) != AFM_OK) n = 0;
    if ((r = afm_stop_push(o->stop, o->piece, n, &shown, &n)) < 0) { o->failed = 1; return 1; }
    if (emit_text(o, shown, n) < 0) { o->failed = 1; return 1; }
    if (r == 1) { o->finish = "stop"; return 1; }
    if (o->sv->stopping || client_gone(o->fd)) { o->failed = 1; return 1; } /* the session is freed for others */
    return now_s() > o->deadline;
}

/* The prompt's ids: the chat template, or EOS then the text. */
static int32_t *encode_prompt(server *sv, const gen_req *g, int *n_out) {
    size_t n = 0, cap;
    int32_t *ids;
    long cnt = g->chat ? afm_chat_token_count(sv->tok, g->msgs, g->n_msgs, NULL, 0, 1)
                       : afm_token_count(sv->tok, g->prompt, strlen(g->prompt), AFM_TOK_AFM);
    if (cnt < 0) return NULL;
    cap = (size_t)cnt + 1;
    if (!(ids = (int32_t *)malloc(cap * sizeof *ids))) return NULL;
    if (g->chat) {
        if (afm_chat_tokenize(sv->tok, g->msgs, g->n_msgs, NULL, 0, 1, ids, cap, &n) != AFM_OK) { free(ids); return NULL; }
    } else {
        ids[0] = afm_tokenizer_special(sv->tok, AFM_SPECIAL_EOS);
        if (afm_tokenize(sv->tok, g->prompt, strlen(g->prompt), AFM_TOK_AFM, ids + 1, cap - 1, &n) != AFM_OK) { free(ids); return NULL; }
        n++;
    }
    *n_out = (int)n;
    return ids;
}

/* ---- tool calling: the request as an afm_transcript, the reply from afm_tool_run ---- */

/* The tool named by an earlier call's id (OpenAI's tool messages carry only the id). */
static const char *call_name(const gen_req *g, const jdoc *d, int upto, const char *id) {
    int i, k;
    for (i = upto - 1; i >= 0; i--) {
        int calls = jget(d, g->msg_node[i], "tool_calls");
        for (k = calls >= 0 && d->nodes[calls].type == J_ARR ? d->nodes[calls].child : -1; k >= 0; k = d->nodes[k].next)
            if (!strcmp(d->nodes[jget(d, k, "id")].s, id)) return d->nodes[jget(d, jget(d, k, "function"), "name")].s;
    }
    return NULL;
}

/* NULL after sending the 400 that says what is wrong. */
static afm_transcript *request_transcript(const gen_req *g, const jdoc *d, int fd) {
    afm_transcript *t;
    char err[300], msg[400];
    int i, k;
    if (afm_transcript_create(NULL, &t) != AFM_OK) { send_error(fd, 500, "out of memory", NULL, NULL); return NULL; }
    if (g->tools && afm_transcript_add_tools_json(t, g->tools, g->tools_len, err, sizeof err) != AFM_OK) {
        snprintf(msg, sizeof msg, "%s", err);
        send_error(fd, 400, msg, "tools", "invalid_value");
        afm_transcript_free(t);
        return NULL;
    }
    for (i = 0; i < g->n_msgs; i++) {
        int node = g->msg_node[i], calls = jget(d, node, "tool_calls");
        afm_result r = AFM_OK;
        const char *content = g->msgs[i].content;
        if (!strcmp(g->msgs[i].role, "tool")) {
            const char *name = call_name(g, d, i, d->nodes[jget(d, node, "tool_call_id")].s);
            if (!name) {
                snprintf(msg, sizeof msg, "messages[%d]: tool_call_id '%.100s' names no earlier tool call", i, d->nodes[jget(d, node, "tool_call_id")].s);
                send_error(fd, 400, msg, "messages", "invalid_value");
                afm_transcript_free(t);
                return NULL;
            }
            r = afm_transcript_add_tool_output(t, name, content, 0);
        } else if (calls >= 0 && d->nodes[calls].type == J_ARR && d->nodes[calls].n > 0) {
            for (k = d->nodes[calls].child; k >= 0 && r == AFM_OK; k = d->nodes[k].next, content = "") {
                int f = jget(d, k, "function");
                r = afm_transcript_add_tool_call(t, content, d->nodes[jget(d, f, "name")].s, d->nodes[jget(d, f, "arguments")].s);
            }
        } else r = afm_transcript_add_message(t, g->msgs[i].role, content);
        if (r != AFM_OK) {
            snprintf(msg, sizeof msg, "messages[%d]: %s", i, r == AFM_ERR_FORMAT ? "tool call arguments must be a JSON object" : "out of memory");
            send_error(fd, r == AFM_ERR_FORMAT ? 400 : 500, msg, "messages", "invalid_value");
            afm_transcript_free(t);
            return NULL;
        }
    }
    return t;
}

/* Runs the loop until the model answers or calls a tool (handed back to the client), and sends the
   chat completion: the answer, or tool_calls with finish_reason "tool_calls". */
static void tool_reply(server *sv, int fd, slot *sl, gen_req *g, afm_transcript *t, gen_out *o, int n_prompt) {
    afm_tool_params tp;
    afm_tool_stats st;
    const afm_transcript_entry *e;
    int n_before, n;
    sbuf b = { NULL, 0, 0, 0 };
    const char *finish;
    memset(&tp, 0, sizeof tp);
    tp.gen.n_predict = g->max_tokens;
    tp.gen.sampler = g->sp;
    tp.mode = g->tool_mode;
    tp.tool_name = g->tool_name;
    tp.vocab = sv->cvocab;
    afm_transcript_entries(t, &n_before);
    if (afm_tool_run(sl->s, sv->tok, t, &tp, &st) != AFM_OK) {
        int bad = strstr(afm_session_error(sl->s), "no tool named") != NULL;
        send_error(fd, bad ? 400 : 500, afm_session_error(sl->s), bad ? "tool_choice" : NULL, NULL);
        afm_session_rewind(sl->s, 0);
        return;
    }
    e = afm_transcript_entries(t, &n);
    o->n_generated = st.n_generated;
    finish = st.stop == AFM_TOOL_STOP_HANDOFF ? "tool_calls" : st.stop == AFM_TOOL_STOP_ANSWER ? "stop" : "length";
    sb_printf(&b, "{\"id\":\"%s\",\"object\":\"chat.completion\",\"created\":%ld,\"model\":", o->id, o->created);
    sb_json(&b, o->model, strlen(o->model));
    sb_str(&b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
    if (n > n_before) sb_json(&b, e[n - 1].content, strlen(e[n - 1].content));
    else sb_str(&b, "\"\"");
    if (st.stop == AFM_TOOL_STOP_HANDOFF) {
        sb_printf(&b, ",\"tool_calls\":[{\"id\":\"call_%s\",\"type\":\"function\",\"function\":{\"name\":", o->id);
        sb_json(&b, e[n - 1].name, strlen(e[n - 1].name));
        sb_str(&b, ",\"arguments\":");
        sb_json(&b, e[n - 1].arguments, strlen(e[n - 1].arguments));
        sb_str(&b, "}}]");
    }
    sb_printf(&b, "},\"logprobs\":null,\"finish_reason\":\"%s\"}],", finish);
    sb_printf(&b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}", n_prompt, st.n_generated,
              n_prompt + st.n_generated);
    o->finish = finish;
    if (b.oom) send_error(fd, 500, "out of memory", NULL, NULL);
    else send_response(fd, 200, "application/json", b.p, b.n);
    free(b.p);
}

/* Apple's way of guided generation: the schema is also shown to the model. The last user message
   gets a blank line and afm_schema_prompt's text (the CLI's --json-schema does the same); the new
   content is returned for the caller to free, NULL when the schema cannot be rendered. */
static char *show_schema(gen_req *g) {
    size_t n = 0, len;
    char *m;
    int i = g->n_msgs - 1;
    while (i >= 0 && strcmp(g->msgs[i].role, "user")) i--;
    if (i < 0) return (char *)calloc(1, 1); /* no user turn to append to: nothing shown */
    if (afm_schema_prompt(g->schema, g->schema_len, NULL, 0, &n) != AFM_OK) return NULL;
    len = strlen(g->msgs[i].content);
    if (!(m = (char *)malloc(len + 2 + n + 1))) return NULL;
    memcpy(m, g->msgs[i].content, len);
    memcpy(m + len, "\n\n", 2);
    if (afm_schema_prompt(g->schema, g->schema_len, m + len + 2, n + 1, &n) != AFM_OK) { free(m); return NULL; }
    g->msgs[i].content = m;
    return m;
}

static void handle_generate(server *sv, int fd, const char *body, size_t body_len, int chat) {
    jdoc d;
    gen_req *g = (gen_req *)calloc(1, sizeof *g);
    gen_out o;
    const afm_adapter *ad = NULL;
    int32_t *prompt = NULL;
    int n_prompt = 0, i, status, common = 0, n_have = 0;
    slot *sl = NULL;
    const int32_t *have;
    afm_generate_params gp;
    afm_result r;
    afm_constraint *cons = NULL;
    afm_constraint_state *cstate = NULL;
    afm_transcript *tr = NULL;
    char *schema_msg = NULL;
    memset(&o, 0, sizeof o);
    if (!g) { send_error(fd, 500, "out of memory", NULL, NULL); return; }
    if (json_parse(&d, body, body_len) < 0) {
        char msg[256];
        snprintf(msg, sizeof msg, "the request body is not valid JSON: %s", d.err);
        send_error(fd, 400, msg, NULL, "invalid_json");
        goto done;
    }
    if (req_from_json(g, &d, chat) < 0) { send_error(fd, g->status, g->err, g->param, g->code); goto done; }
    if (strcmp(g->model, sv->model_name)) {
        for (i = 0; i < sv->n_adapters && strcmp(g->model, sv->adapter_names[i]); i++) {}
        if (i == sv->n_adapters) {
            char msg[300];
            snprintf(msg, sizeof msg, "the model '%.200s' does not exist (GET /v1/models lists them)", g->model);
            send_error(fd, 404, msg, "model", "model_not_found");
            goto done;
        }
        ad = sv->adapters[i];
    }
    for (i = 0; i < g->n_bias; i++)
        if (g->bias[i].token >= afm_tokenizer_n_vocab(sv->tok)) { send_error(fd, 400, "a logit_bias token id is outside the vocabulary", "logit_bias", "invalid_value"); goto done; }
    if (g->schema) { /* compiled per request: a bad schema is the client's 400 */
        char cerr[256], msg[400];
        if (afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, g->schema, g->schema_len, NULL, &cons, cerr, sizeof cerr) != AFM_OK) {
            snprintf(msg, sizeof msg, "response_format json_schema: %s", cerr);
            send_error(fd, 400, msg, "response_format", "invalid_schema");
            goto done;
        }
        if (afm_constraint_state_create(cons, sv->cvocab, &cstate) != AFM_OK) { send_error(fd, 500, "out of memory", NULL, NULL); goto done; }
    }
    if (g->use_tools && !(tr = request_transcript(g, &d, fd))) goto done;
    if (g->schema && chat && !sv->no_schema_prompt && !(schema_msg = show_schema(g))) {
        send_error(fd, 400, "response_format json_schema: the schema cannot be shown to the model (unbalanced brackets or strings, or nested deeper than 256)", "response_format", "invalid_schema");
        goto done;
    }
    if (!(prompt = encode_prompt(sv, g, &n_prompt))) { send_error(fd, 400, "the prompt cannot be encoded", chat ? "messages" : "prompt", NULL); goto done; }
    if (n_prompt >= sv->n_ctx) {
        char msg[200];
        snprintf(msg, sizeof msg, "the prompt is %d tokens; this server's context is %d tokens, and at least one must be left to generate", n_prompt, sv->n_ctx);
        send_error(fd, 400, msg, chat ? "messages" : "prompt", "context_length_exceeded");
        goto done;
    }
    if (g->max_tokens < 0 || g->max_tokens > sv->n_ctx - n_prompt) g->max_tokens = sv->n_ctx - n_prompt;
    if (!(sl = slot_acquire(sv, fd, prompt, n_prompt, ad, &status))) {
        send_error(fd, status, sv->stopping ? "the server is shutting down" : "the server is busy: every session is in use and the queue is full; retry later", NULL, "server_busy");
        goto done;
    }
    /* the same adapter keeps the cache: reuse the longest common prefix (at least one token is
       evaluated, for the logits) */
    if (afm_session_set_adapter(sl->s, ad) != AFM_OK) { send_error(fd, 500, afm_session_error(sl->s), NULL, NULL); goto done; }
    sl->adapter = ad;
    have = afm_session_tokens(sl->s, &n_have);
    while (common < n_have && common < n_prompt - 1 && have[common] == prompt[common]) common++;
    afm_session_rewind(sl->s, common);

    o.sv = sv;
    o.fd = fd;
    o.chat = chat;
    o.stream = g->stream;
    o.model = g->model;
    o.created = (long)time(NULL);
    o.deadline = now_s() + sv->max_time_s;
    pthread_mutex_lock(&sv->mu);
    snprintf(o.id, sizeof o.id, "%s-%lld", chat ? "chatcmpl" : "cmpl", ++sv->next_id);
    pthread_mutex_unlock(&sv->mu);
    afm_detokenizer_init(&o.d, sv->tok, AFM_TOK_AFM);
    o.piece_cap = afm_tokenizer_max_token_bytes(sv->tok) + 16;
    o.piece = (char *)malloc(o.piece_cap);
    for (i = 1; !chat && o.piece && i < n_prompt; i++) { /* a continuation is spaced as in the whole text */
        size_t n = 0;
        afm_detokenizer_push(&o.d, prompt[i], o.piece, o.piece_cap, &n);
    }
    if (!o.piece || afm_stop_create(g->stops, g->n_stops, NULL, &o.stop) != AFM_OK) { send_error(fd, 500, "out of memory", NULL, NULL); goto done; }
    {   /* the sampling parameters are checked once here, where a 400 can still be sent */
        afm_sampler *check = NULL;
        afm_result rc = afm_sampler_create(&g->sp, afm_model_config(sv->model)->vocab_size, NULL, &check);
        afm_sampler_free(check);
        if (rc != AFM_OK) { send_error(fd, 400, rc == AFM_ERR_ARG ? "bad sampling parameters (every token banned?)" : "out of memory", NULL, "invalid_value"); goto done; }
    }
    if (o.stream) {
        const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
        if (send_all(fd, head, strlen(head)) < 0) goto done;
        if (chat) {
            sbuf b = { NULL, 0, 0, 0 };
            sb_printf(&b, "data: {\"id\":\"%s\",\"object\":\"chat.completion.chunk\",\"created\":%ld,\"model\":", o.id, o.created);
            sb_json(&b, o.model, strlen(o.model));
            sb_str(&b, ",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
            i = b.oom ? -1 : send_all(fd, b.p, b.n);
            free(b.p);
            if (i < 0) goto done;
        }
    }
    if (tr) { /* the tool loop keeps the cached prefix itself */
        tool_reply(sv, fd, sl, g, tr, &o, n_prompt);
        goto logged;
    }
    memset(&gp, 0, sizeof gp);
    gp.n_predict = g->max_tokens;
    gp.sampler = g->sp;
    gp.on_token = on_token;
    gp.user = &o;
    gp.constraint = cstate;
    r = afm_generate(sl->s, prompt + common, n_prompt - common, &gp, NULL);
    if (r != AFM_OK) {
        if (!o.stream) send_error(fd, 500, afm_session_error(sl->s), NULL, NULL);
        afm_session_rewind(sl->s, 0); /* nothing half-done is reused */
        goto done;
    }
    if (o.failed) goto logged; /* the client left, or the server is stopping: nothing more to send */
    if (!o.finish) { /* ended by max_tokens, the context or the time limit: the held-back text goes out */
        const char *rest;
        size_t n = 0, m = 0;
        afm_detokenizer_flush(&o.d, o.piece, o.piece_cap, &n);
        if (afm_stop_push(o.stop, o.piece, n, &rest, &m) == 0) emit_text(&o, rest, m);
        if (!o.finish) { afm_stop_flush(o.stop, &rest, &m); emit_text(&o, rest, m); }
    }
    slot_release(sv, sl); /* before the reply goes out: the client's next request finds it free */
    sl = NULL;
    {
        sbuf b = { NULL, 0, 0, 0 };
        const char *finish = o.finish ? o.finish : "length";
        if (o.stream) {
            if (send_chunk(&o, NULL, 0, finish) < 0) goto done;
            if (g->include_usage) {
                sb_printf(&b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", o.id, chat ? "chat.completion.chunk" : "text_completion", o.created);
                sb_json(&b, o.model, strlen(o.model));
                sb_printf(&b, ",\"choices\":[],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n", n_prompt, o.n_generated, n_prompt + o.n_generated);
            }
            sb_str(&b, "data: [DONE]\n\n");
            if (!b.oom) send_all(fd, b.p, b.n);
        } else {
            sb_printf(&b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", o.id, chat ? "chat.completion" : "text_completion", o.created);
            sb_json(&b, o.model, strlen(o.model));
            sb_str(&b, ",\"choices\":[{\"index\":0,");
            if (chat) sb_str(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
            else sb_str(&b, "\"text\":");
            sb_json(&b, o.text.p ? o.text.p : "", o.text.n);
            sb_printf(&b, "%s,\"logprobs\":null,\"finish_reason\":\"%s\"}],", chat ? "}" : "", finish);
            sb_printf(&b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d,\"prompt_tokens_details\":{\"cached_tokens\":%d}}}",
                      n_prompt, o.n_generated, n_prompt + o.n_generated, common);
            if (b.oom) send_error(fd, 500, "out of memory", NULL, NULL);
            else send_response(fd, 200, "application/json", b.p, b.n);
        }
        free(b.p);
    }
logged:
    fprintf(stderr, "afm-server: %s: model %s, %d prompt tokens (%d cached), %d generated, %s\n", o.id, g->model, n_prompt, common,
            o.n_generated, !o.failed ? (o.finish ? o.finish : "length") : sv->stopping ? "stopped by shutdown" : "client gone");
done:
    if (sl) slot_release(sv, sl); /* its cache holds every emitted token, reusable by the next request */
    afm_stop_free(o.stop);
    afm_constraint_state_free(cstate);
    afm_constraint_free(cons);
    afm_transcript_free(tr);
    free(schema_msg);
    free(o.piece);
    free(o.text.p);
    free(prompt);
    json_free(&d);
    free(g);
}

static void handle_models(server *sv, int fd) {
    sbuf b = { NULL, 0, 0, 0 };
    int i;
    sb_str(&b, "{\"object\":\"list\",\"data\":[");
    for (i = -1; i < sv->n_adapters; i++) {
        const char *name = i < 0 ? sv->model_name : sv->adapter_names[i];
        sb_str(&b, i < 0 ? "{\"id\":" : ",{\"id\":");
        sb_json(&b, name, strlen(name));
        sb_str(&b, ",\"object\":\"model\",\"created\":0,\"owned_by\":\"afm.h\"");
        if (i >= 0) { sb_str(&b, ",\"parent\":"); sb_json(&b, sv->model_name, strlen(sv->model_name)); }
        sb_str(&b, "}");
    }
    sb_str(&b, "]}");
    if (b.oom) send_error(fd, 500, "out of memory", NULL, NULL);
    else send_response(fd, 200, "application/json", b.p, b.n);
    free(b.p);
}

typedef struct conn { server *sv; int fd; } conn;

/* Reads a request (head, then Content-Length bytes of body) within the limits and routes it. */
static void *conn_main(void *arg) {
    conn *c = (conn *)arg;
    server *sv = c->sv;
    int fd = c->fd, status = 400;
    char *buf = (char *)malloc(HTTP_MAX_HEAD + 1), *body = NULL;
    size_t n = 0;
    long head = 0;
    const char *msg = "malformed request";
    http_req rq;
    free(c);
    if (!buf) goto out;
    while ((head = http_parse_head(buf, n, &rq, &status, &msg)) == 0) {
        ssize_t got = recv(fd, buf + n, HTTP_MAX_HEAD - n, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (got < 0 && n > 0) send_error(fd, 408, "timed out reading the request", NULL, NULL);
            goto out;
        }
        n += (size_t)got;
    }
    if (head < 0) { send_error(fd, status, msg, NULL, NULL); goto out; }
    if (!strcmp(rq.method, "POST")) {
        size_t have = n - (size_t)head;
        if (rq.content_length < 0) { send_error(fd, 411, "a POST needs Content-Length", NULL, NULL); goto out; }
        if (rq.content_length > sv->max_body) { send_error(fd, 413, "the request body is larger than the server's limit (--max-body)", NULL, NULL); goto out; }
        if (!(body = (char *)malloc((size_t)rq.content_length + 1))) { send_error(fd, 500, "out of memory", NULL, NULL); goto out; }
        if (have > (size_t)rq.content_length) have = (size_t)rq.content_length; /* pipelined bytes are ignored: one request per connection */
        memcpy(body, buf + head, have);
        while (have < (size_t)rq.content_length) {
            ssize_t got = recv(fd, body + have, (size_t)rq.content_length - have, 0);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) { if (got < 0) send_error(fd, 408, "timed out reading the request body", NULL, NULL); goto out; }
            have += (size_t)got;
        }
        body[have] = 0;
    }
    {
        char *q = strchr(rq.path, '?');
        int is_chat, is_cmpl, is_models, is_health;
        if (q) *q = 0; /* a query string is ignored */
        is_chat = !strcmp(rq.path, "/v1/chat/completions");
        is_cmpl = !strcmp(rq.path, "/v1/completions");
        is_models = !strcmp(rq.path, "/v1/models");
        is_health = !strcmp(rq.path, "/health");
        if ((is_chat || is_cmpl) && !strcmp(rq.method, "POST")) handle_generate(sv, fd, body, (size_t)rq.content_length, is_chat);
        else if (is_models && !strcmp(rq.method, "GET")) handle_models(sv, fd);
        else if (is_health && !strcmp(rq.method, "GET")) send_response(fd, 200, "application/json", "{\"status\":\"ok\"}", 15);
        else if (is_chat || is_cmpl || is_models || is_health) send_error(fd, 405, "method not allowed on this path", NULL, NULL);
        else send_error(fd, 404, "no such endpoint (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health)", NULL, NULL);
    }
out:
    shutdown(fd, SHUT_WR);
    close(fd);
    free(buf);
    free(body);
    pthread_mutex_lock(&sv->mu);
    sv->n_conn--;
    pthread_cond_broadcast(&sv->cv);
    pthread_mutex_unlock(&sv->mu);
    return NULL;
}

static const char *usage_text =
    "usage: afm-server -m MODEL.afm [options]\n"
    "  an OpenAI-compatible HTTP server: POST /v1/chat/completions, POST /v1/completions,\n"
    "  GET /v1/models, GET /health\n"
    "\n"
    "  -m, --model FILE       the model (.afm); its embedded tokenizer is used\n"
    "      --name NAME        the base model's name in requests and /v1/models (default: the\n"
    "                         file name without .afm)\n"
    "      --adapter NAME=PATH  serve a LoRA adapter (.afma file, .fmadapter directory or 'base'\n"
    "                         for the embedded one) as model NAME; may be given up to 16 times\n"
    "      --host ADDR        address to listen on (default 127.0.0.1)\n"
    "      --port N           port (default 8080; 0 picks a free one, printed on stderr)\n"
    "      --no-schema-prompt  response_format json_schema constrains the output only (by default the\n"
    "                         schema is also shown to the model: appended to the last user message\n"
    "                         after a blank line, as afm --json-schema does)\n"
    "      --parallel N       sessions generating at once (default 2); more requests wait\n"
    "      --queue N          requests that may wait for a session (default 64); beyond: 503\n"
    "  -t, --threads N        threads per session (default 1)\n"
    "  -c, --ctx-size N       context limit per session in tokens (default: the model's)\n"
    "      --max-body BYTES   largest request body (default 1048576; larger: 413)\n"
    "      --max-connections N  open connections at most (default 128; beyond: 503)\n"
    "      --timeout S        seconds to receive a request (default 30; then 408); waiting for a\n"
    "                         session is limited to 6 times this\n"
    "      --max-time S       seconds of generation per request (default 300; then it ends\n"
    "                         with finish_reason \"length\")\n"
    "  -h, --help             this text\n"
    "\n"
    "Requests: model (the base's name or an adapter's), messages (chat) or prompt (completions),\n"
    "max_tokens, stop, temperature (default 1), top_p, seed, presence_penalty, frequency_penalty\n"
    "(over the last 64 tokens, prompt included), logit_bias (-100 bans), stream,\n"
    "stream_options.include_usage, response_format json_schema (the output follows the schema:\n"
    "afm.h's constraint engine, docs/CONSTRAINTS.md); n must be 1. tools (function tools) and\n"
    "tool_choice (auto, required, none, a function): a call the model makes is valid under its\n"
    "tool's schema and comes back as tool_calls with finish_reason \"tool_calls\"; the client runs\n"
    "it and sends the result as a tool message (docs/TOOL_CALLING.md). Not with stream.\n"
    "SIGINT or SIGTERM: stop accepting, end running generations, exit 0.\n";

static long arg_int(const char *v, const char *opt, long lo, long hi) {
    char *end;
    long x;
    if (!v) { fprintf(stderr, "afm-server: %s needs a value\n", opt); exit(1); }
    x = strtol(v, &end, 10);
    if (!*v || *end || x < lo || x > hi) { fprintf(stderr, "afm-server: %s: '%s' is not an integer in [%ld, %ld]\n", opt, v, lo, hi); exit(1); }
    return x;
}

int main(int argc, char **argv) {
    server sv;
    const char *model_path = NULL, *host = "127.0.0.1";
    char err[512], name_buf[256];
    int port = 8080, i, lfd, one = 1, n_threads = 1;
    afm_session_params sp;
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    struct sigaction sa;

    memset(&sv, 0, sizeof sv);
    memset(&sp, 0, sizeof sp);
    sv.n_slots = 2;
    sv.max_queue = 64;
    sv.max_conn = 128;
    sv.max_body = 1 << 20;
    sv.timeout_s = 30;
    sv.max_time_s = 300;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(usage_text, stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (!v) break; model_path = v; i++; }
        else if (!strcmp(a, "--name")) { if (!v) break; sv.model_name = v; i++; }
        else if (!strcmp(a, "--host")) { if (!v) break; host = v; i++; }
        else if (!strcmp(a, "--adapter")) {
            if (!v || !strchr(v, '=') || strchr(v, '=') == v) { fprintf(stderr, "afm-server: --adapter needs NAME=PATH\n"); return 1; }
            if (sv.n_adapters == 16) { fprintf(stderr, "afm-server: at most 16 adapters\n"); return 1; }
            sv.adapter_names[sv.n_adapters++] = v; /* split after the model is loaded */
            i++;
        }
        else if (!strcmp(a, "--port")) { port = (int)arg_int(v, a, 0, 65535); i++; }
        else if (!strcmp(a, "--parallel")) { sv.n_slots = (int)arg_int(v, a, 1, 256); i++; }
        else if (!strcmp(a, "--no-schema-prompt")) sv.no_schema_prompt = 1;
        else if (!strcmp(a, "--queue")) { sv.max_queue = (int)arg_int(v, a, 0, 100000); i++; }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { n_threads = (int)arg_int(v, a, 1, 1024); i++; }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) { sp.n_ctx = (int)arg_int(v, a, 1, 1 << 24); i++; }
        else if (!strcmp(a, "--max-body")) { sv.max_body = arg_int(v, a, 1, 1L << 30); i++; }
        else if (!strcmp(a, "--max-connections")) { sv.max_conn = (int)arg_int(v, a, 1, 100000); i++; }
        else if (!strcmp(a, "--timeout")) { sv.timeout_s = (int)arg_int(v, a, 1, 86400); i++; }
        else if (!strcmp(a, "--max-time")) { sv.max_time_s = (int)arg_int(v, a, 1, 86400); i++; }
        else { fprintf(stderr, "afm-server: unknown option '%s' (see --help)\n", a); return 1; }
    }
    if (i < argc) { fprintf(stderr, "afm-server: %s needs a value\n", argv[i]); return 1; }
    if (!model_path) { fprintf(stderr, "afm-server: no model given (-m FILE); see --help\n"); return 1; }
    if (afm_model_load_file(model_path, NULL, &sv.model, err, sizeof err) != AFM_OK) { fprintf(stderr, "afm-server: %s\n", err); return 1; }
    if (afm_model_tokenizer(sv.model, NULL, &sv.tok, err, sizeof err) != AFM_OK) { fprintf(stderr, "afm-server: %s: %s\n", model_path, err); return 1; }
    if (afm_tokenizer_special(sv.tok, AFM_SPECIAL_EOS) < 0 || afm_tokenizer_special(sv.tok, AFM_SPECIAL_TURN_START) < 0) {
        fprintf(stderr, "afm-server: %s: the tokenizer has no EOS or <turn_start>: not an AFM chat model\n", model_path);
        return 1;
    }
    if (afm_constraint_vocab_create(sv.tok, NULL, &sv.cvocab) != AFM_OK) { fprintf(stderr, "afm-server: out of memory\n"); return 1; }
    sv.eog[sv.n_eog++] = afm_tokenizer_special(sv.tok, AFM_SPECIAL_EOS);
    if (afm_tokenizer_special(sv.tok, AFM_SPECIAL_TURN_END) >= 0) sv.eog[sv.n_eog++] = afm_tokenizer_special(sv.tok, AFM_SPECIAL_TURN_END);
    if (!sv.model_name) {
        const char *base = strrchr(model_path, '/') ? strrchr(model_path, '/') + 1 : model_path;
        size_t L = strlen(base);
        if (L > 4 && !strcmp(base + L - 4, ".afm")) L -= 4;
        snprintf(name_buf, sizeof name_buf, "%.*s", (int)L, base);
        sv.model_name = name_buf;
    }
    for (i = 0; i < sv.n_adapters; i++) {
        char *name = (char *)sv.adapter_names[i], *eq = strchr(name, '=');
        int k;
        *eq = 0; /* argv's own storage */
        for (k = 0; k < i; k++)
            if (!strcmp(sv.adapter_names[k], name)) { fprintf(stderr, "afm-server: adapter name '%s' given twice\n", name); return 1; }
        if (!strcmp(name, sv.model_name)) { fprintf(stderr, "afm-server: adapter name '%s' is the base model's name\n", name); return 1; }
        if (!strcmp(eq + 1, "base") ? afm_adapter_embedded(sv.model, &sv.adapters[i], err, sizeof err) != AFM_OK
                                    : afm_adapter_load(sv.model, eq + 1, NULL, &sv.adapters[i], err, sizeof err) != AFM_OK) {
            fprintf(stderr, "afm-server: adapter %s: %s\n", name, err);
            return 1;
        }
    }
    sp.n_threads = n_threads;
    sv.slots = (slot *)calloc((size_t)sv.n_slots, sizeof *sv.slots);
    if (!sv.slots) return 1;
    for (i = 0; i < sv.n_slots; i++)
        if (afm_session_create(sv.model, &sp, &sv.slots[i].s) != AFM_OK) { fprintf(stderr, "afm-server: cannot create session %d\n", i); return 1; }
    sv.n_ctx = sp.n_ctx ? sp.n_ctx : afm_model_config(sv.model)->context_length;
    pthread_mutex_init(&sv.mu, NULL);
    pthread_cond_init(&sv.cv, NULL);

    if (pipe(g_wake) < 0) return 1;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (lfd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 128) < 0 || getsockname(lfd, (struct sockaddr *)&addr, &alen) < 0) {
        fprintf(stderr, "afm-server: cannot listen on %s:%d: %s\n", host, port, strerror(errno));
        return 1;
    }
    fprintf(stderr, "afm-server: listening on http://%s:%d (model '%s', %d adapters, %d sessions)\n", host, ntohs(addr.sin_port),
            sv.model_name, sv.n_adapters, sv.n_slots);

    while (!g_signal) {
        struct pollfd pf[2];
        int fd;
        pf[0].fd = lfd; pf[0].events = POLLIN;
        pf[1].fd = g_wake[0]; pf[1].events = POLLIN;
        if (poll(pf, 2, -1) < 0 || !(pf[0].revents & POLLIN)) continue;
        if ((fd = accept(lfd, NULL, NULL)) < 0) continue;
        {
            struct timeval tv;
            pthread_t th;
            pthread_attr_t at;
            conn *c = (conn *)malloc(sizeof *c);
            int ok;
            tv.tv_sec = sv.timeout_s;
            tv.tv_usec = 0;
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            pthread_mutex_lock(&sv.mu);
            ok = c && sv.n_conn < sv.max_conn;
            if (ok) sv.n_conn++;
            pthread_mutex_unlock(&sv.mu);
            if (!ok) {
                send_error(fd, 503, "too many connections", NULL, "server_busy");
                close(fd);
                free(c);
                continue;
            }
            c->sv = &sv;
            c->fd = fd;
            pthread_attr_init(&at);
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&th, &at, conn_main, c) != 0) {
                send_error(fd, 503, "cannot start a thread", NULL, "server_busy");
                close(fd);
                free(c);
                pthread_mutex_lock(&sv.mu);
                sv.n_conn--;
                pthread_mutex_unlock(&sv.mu);
            }
            pthread_attr_destroy(&at);
        }
    }
    /* shutdown: no new connections; running generations stop at their next token */
    fprintf(stderr, "afm-server: signal %d, shutting down\n", (int)g_signal);
    close(lfd);
    pthread_mutex_lock(&sv.mu);
    sv.stopping = 1;
    pthread_cond_broadcast(&sv.cv);
    {
        struct waiter *w;
        for (w = sv.queue; w; w = w->next) pthread_cond_signal(&w->cv);
    }
    while (sv.n_conn > 0) pthread_cond_wait(&sv.cv, &sv.mu);
    pthread_mutex_unlock(&sv.mu);
    for (i = 0; i < sv.n_slots; i++) afm_session_free(sv.slots[i].s);
    for (i = 0; i < sv.n_adapters; i++) afm_adapter_free(sv.adapters[i]);
    free(sv.slots);
    afm_constraint_vocab_free(sv.cvocab);
    afm_tokenizer_free(sv.tok);
    afm_model_free(sv.model);
    pthread_mutex_destroy(&sv.mu);
    pthread_cond_destroy(&sv.cv);
    close(g_wake[0]);
    close(g_wake[1]);
    return 0;
}
#endif /* AFM_SERVER_NO_MAIN */
