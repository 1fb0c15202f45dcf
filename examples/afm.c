/* afm - command-line front end of afm.h.

   afm info FILE                           configuration, parameter counts, bytes per type
   afm [generate] -m FILE -p TEXT ...      continue a text (greedy unless --temp > 0)
   afm [generate] -m FILE --chat -p TEXT   answer TEXT as the user's turn of an AFM chat
   afm [generate] -m FILE --ids 1,2,3 ...  generate from token ids, print token ids
   afm tokenize -m FILE TEXT               text -> token ids
   afm detokenize -m FILE ID ...           token ids -> text
   afm bench FILE                          speed

   Run `afm --help` for every option. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#endif
#define AFM_IMPLEMENTATION
#define AFM_HF_TOKENIZER /* --tokenizer also takes a tokenizer.json (needs afm_tokenizer.h) */
#include "../afm.h"
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if !defined(_WIN32)
#include <sys/stat.h>
#endif

static const char *usage_text =
    "usage: afm bench FILE [-t N[,N...]] [-p N] [-n N] [-r N] [--adapter PATH]\n"    "       afm bench FILE --grammar [--tokenizer TOK.model] [-w N] [-n N] [-t N] SCHEMA.json ...\n"
    "       afm info FILE\n"
    "       afm info ADAPTER -m BASE.afm\n"
    "       afm [generate] -m FILE (-p TEXT | -f FILE | --ids ID,ID,...) [options]\n"
    "       afm tokenize (-m FILE | --tokenizer FILE) (TEXT | -p TEXT | -f FILE) [options]\n"
    "       afm detokenize (-m FILE | --tokenizer FILE) (ID ... | --ids LIST | -f FILE) [options]\n"
    "\n"
    "commands:\n"
    "  info FILE              print the model's configuration, parameter counts per group,\n"
    "                         bytes per weight type and signature\n"
    "  info ADAPTER -m BASE   check an adapter (.afma file or .fmadapter directory) against\n"
    "                         its base model and print rank, scale, identifier, metadata\n"
    "  generate               (default) encode the prompt, then generate -n tokens and print them\n"
    "                         as they come (whole UTF-8 characters only); statistics go to stderr\n"
    "  tokenize               print the token ids of a text, separated by spaces (with the AFM\n"
    "                         layer: \"\\n\" is the <n> token); no sequence-start token unless --chat\n"
    "  detokenize             print the text of token ids (arguments, --ids or -f; '-' is stdin)\n"
    "  bench FILE --grammar [--tokenizer TOK] [-w N] SCHEMA.json ...  guided generation: per JSON\n"
    "                         schema the compile time (median of 20), the token mask time along\n"
    "                         -w random walks (default 20; median, p99; on TOK's vocabulary if\n"
    "                         given) and decode tok/s with and without the schema (-n tokens, the\n"
    "                         first -t thread count)\n"
    "  bench FILE --spec      speculative decoding: time to verify 1..16 tokens relative to one\n"
    "                         decode step, and speedup over plain greedy decoding with a drafter\n"
    "                         that proposes the base's own next token with probability p\n"
    "                         (median and range of the -r runs; acceptance over all of them).\n"
    "                         Each run is timed against a plain step or run taken just before\n"
    "                         it, so a machine whose speed drifts changes both sides alike\n"
    "  bench FILE             prefill -p tokens (default 512), then decode -n tokens (default\n"
    "                         128), -r runs each (default 3, median reported), for each thread\n"
    "                         count in -t (default 1,2); prints tok/s, bytes read per decode\n"
    "                         token (weights, output head, KV cache), the read rate that makes\n"
    "                         (bytes x tok/s), the memory read bandwidth measured in the same\n"
    "                         run at that thread count and on all cores (the roofline) with\n"
    "                         the rate as a percentage of each, and peak RSS; with --adapter:\n"
    "                         adapter load and switch times, and decode tok/s with and without\n"
    "                         it in alternating runs\n"
    "\n";

/* (several strings: C99 compilers need only support 4095 characters in one) */
static const char *usage_options =
    "prompt and text (generate, tokenize, detokenize):\n"
    "  -m, --model FILE       model file (.afm, see docs/FORMAT.md); its embedded tokenizer is used\n"
    "  -p, --prompt TEXT      the prompt as text. Without --chat it is continued as is: EOS, then\n"
    "                         the encoded text (AFM's sequence start), and the output repeats the\n"
    "                         prompt before the continuation (see --no-display-prompt)\n"
    "  -f, --file FILE        read the prompt (detokenize: the ids) from FILE; '-' is stdin\n"
    "      --ids LIST         the prompt as token ids separated by commas or spaces; generate\n"
    "                         then prints token ids instead of text\n"
    "      --chat             wrap the prompt in AFM's chat template (docs/MODEL.md section 7.3) as the\n"
    "                         user's turn; print only the reply. For chat adapters and\n"
    "                         instruction-tuned weights; not the default because base weights\n"
    "                         just continue text. tokenize --chat: the ids of that prompt\n"
    "      --system TEXT      the system message of the chat (implies --chat; default: \"A\n"
    "                         conversation between a user and a helpful assistant.\")\n"
    "      --show-prompt      print the rendered prompt and its token ids to stderr, then go on\n"
    "      --tokenizer FILE   use this tokenizer instead of the model's: a SentencePiece\n"
    "                         tokenizer.model or a Hugging Face tokenizer.json (byte-level BPE)\n"
    "      --special          control tokens (<turn_end>, <executable_start>, ...) written in the\n"
    "                         text are tokens, and decoded ones are printed (default: nothing)\n"
    "      --plain            no AFM newline layer: \"\\n\" is encoded as the tokenizer does by\n"
    "                         itself, and <n> is not printed as a newline\n"
    "      --no-display-prompt  print only the continuation (text prompts without --chat)\n"
    "      --pieces           tokenize: one line per token, id and piece\n"
    "\n";
static const char *usage_generation =
    "generation:\n"
    "      --adapter PATH     LoRA adapter: an .afma file, an Apple .fmadapter directory, or\n"
    "                         'base' for the base adapter embedded in the model file\n"
    "  -n, --n-predict N      tokens to generate (default 16)\n"
    "  -t, --threads N        threads (default 1)\n"
    "  -c, --ctx-size N       context limit in tokens (default and most: the model's training\n"
    "                         context). Generation that fills it stops with \"context full\" and\n"
    "                         exit status 1\n"
    "  -b, --batch-size N     tokens per forward pass during prefill (default 256)\n"
    "      --temp T           temperature; 0 is greedy (default 0)\n"
    "      --top-k K          keep the K most likely tokens (default 0: off)\n"
    "      --top-p P          nucleus sampling (default 1: off)\n"
    "      --min-p P          drop tokens below P x the top probability (default 0: off)\n"
    "      --repeat-penalty F penalize tokens in the last --repeat-last-n ones (prompt included):\n"
    "                         positive logits divided by F, negative ones multiplied (default 1: off)\n"
    "      --presence-penalty F   subtract F from the logit of every such token (default 0)\n"
    "      --frequency-penalty F  subtract F per occurrence (default 0)\n"
    "      --repeat-last-n N  the penalties' window in tokens (default 64; -1: the whole context)\n"
    "  -l, --logit-bias ID(+|-)BIAS  add BIAS to token ID's logit, e.g. 15+1 or 15-inf (bans it);\n"
    "                         may be given several times\n"
    "      --stop-string TEXT text prompts: stop when the generated text contains TEXT, also across\n"
    "                         tokens; TEXT is not printed (may be given several times)\n"
    "  -s, --seed N           sampler seed (default 0); the same seed gives the same text with\n"
    "                         or without --draft / --lookup, at any -t and -b\n"
    "      --kv TYPE          KV cache: auto, f32, f16, int8 (default auto: int8 when the model\n"
    "                         carries KV scales, else f16)\n"
    "      --exact            quantized weights meet f32 activations and attention runs in float:\n"
    "                         the decoded weights' exact result, as the reference computes it; slower\n"
    "      --draft FILE       speculative decoding with a draft model (same vocabulary)\n"
    "      --draft-adapter P  LoRA adapter for the draft model\n"
    "      --lookup           speculative decoding with prompt lookup (n-gram matches in the context)\n"
    "      --draft-k N        most draft tokens per verification (default: the adapter's\n"
    "                         speculativeDecodingDraftTokenCount, else 5; adapted at run time)\n"
    "      --fixed-k          always draft --draft-k tokens instead of adapting\n"
    "      --stop ID,...      also stop after generating one of these token ids\n";

static const char *usage_more =
    "      --json-schema FILE guided generation: the output is JSON valid under the schema in FILE\n"
    "                         (compact, properties in schema order; docs/CONSTRAINTS.md lists the\n"
    "                         supported keywords), then the stop token\n"
    "      --grammar FILE     the output matches the GBNF grammar in FILE (llama.cpp's format,\n"
    "                         start rule root)\n"
    "      --regex RE         the whole output matches the regular expression RE\n"
    "      --no-fast-forward  sample every token, even those the constraint forces\n"
    "      --tools FILE       tool calling (a chat; docs/TOOL_CALLING.md): FILE is a JSON array of\n"
    "                         tools, each {\"name\", \"description\", \"parameters\": a JSON Schema}\n"
    "                         (or OpenAI's {\"type\":\"function\",\"function\":{...}}), shown in the\n"
    "                         system turn. A call is valid by construction: a declared tool's name\n"
    "                         and arguments matching its schema. Calls and outputs go to stderr,\n"
    "                         the answer to stdout; -n bounds each reply\n"
    "      --tool-exec CMD    run each call with the shell command CMD: the call's JSON\n"
    "                         {\"name\":...,\"arguments\":{...}} on its stdin, the result from its\n"
    "                         stdout; a non-zero exit status is a failure, fed back as the error.\n"
    "                         Without it the loop stops at the first call (the app's turn)\n"
    "      --tool-mode MODE   allowed (the model may call or answer; default), required (the\n"
    "                         first reply is a call), none (no calls)\n"
    "      --tool-rounds N    stop after N replies that are calls (default 8)\n"
    "      --transcript FILE  the conversation as JSON (messages, calls, outputs, tools): read\n"
    "                         from FILE when it exists (-p adds the next user turn), written back\n"
    "                         after the run; the same seed continues it as the original session\n"
    "      --no-schema-prompt with --json-schema: do not show the schema to the model (by default\n"
    "                         the user's message is followed by a blank line, \"" AFM_SCHEMA_PROMPT_INTRO "\"\n"
    "                         and the schema as compact JSON)\n"
    "      --schema-prompt TEXT  with --json-schema: show TEXT after the user's message instead\n"
    "      --ignore-eos       text prompts: do not stop at EOS and <turn_end> (stopping there is\n"
    "                         the default; --ids prompts stop only at --stop ids)\n"
    "      --prompt-cache FILE  keep the session's state after the prompt in FILE (KV cache, tokens,\n"
    "                         logits; docs/FORMAT.md) and, when FILE exists, start from it: only\n"
    "                         the part of the prompt after the longest prefix it shares with the\n"
    "                         saved tokens is evaluated. The file is tied to the model, adapter and\n"
    "                         --kv type; another one is refused\n"
    "      --dump-logits FILE write the logits of the prompt's last position and of every\n"
    "                         generated step as raw little-endian f32 [steps][vocab]\n"
    "      --no-mmap          read the model into memory instead of mapping it\n"
    "      --kernels NAME     kernel level: scalar, avx2, avx512, avx512vnni, amx (x86-64),\n"
    "                         neon, neon-dotprod (arm64); default: the best this CPU has (afm\n"
    "                         info prints it). Every level gives the same results, bit for bit\n"
    "  -h, --help             this text\n"
    "\n"
    "exit status: 0 on success, 1 on any error (bad arguments or files, a full context, logits\n"
    "that are not finite)\n"
    "\n"
    "examples:\n"
    "  afm -m models/mini/base.afm -p \"In the beginning\" -n 40\n"
    "  afm -m models/mini/base.afm --adapter models/mini/json.afma --chat \\\n"
    "      -p \"Describe as JSON: Blessed are the meek: for they shall inherit the earth.\"\n"
    "  afm -m models/mini/base.afm --chat -p \"Describe Genesis 1:1\" -n 80 --temp 1 \\\n"
    "      --json-schema schema.json\n"
    "  afm tokenize -m models/mini/base.afm \"Hello world\"\n"
    "  afm detokenize -m models/mini/base.afm 3 825 272\n";

static void usage(FILE *f) {
    fputs(usage_text, f);
    fputs(usage_options, f);
    fputs(usage_generation, f);
    fputs(usage_more, f);
}

void die(const char *fmt, const char *arg) {
    fprintf(stderr, "afm: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    exit(1);
}

long parse_int(const char *s, const char *opt, long lo, long hi) {
    char *end;
    long v;
    if (!s) die("option %s needs a value", opt);
    v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v < lo || v > hi) {
        fprintf(stderr, "afm: option %s: '%s' is not an integer in [%ld, %ld]\n", opt, s, lo, hi);
        exit(1);
    }
    return v;
}

float parse_float(const char *s, const char *opt) {
    char *end;
    float v;
    if (!s) die("option %s needs a value", opt);
    v = strtof(s, &end);
    if (*s == 0 || *end != 0 || v != v) die("option %s: not a number", opt);
    return v;
}

static int parse_ids(const char *s, int32_t **out) {
    int n = 0, cap = 16;
    int32_t *ids = (int32_t *)malloc(cap * sizeof *ids);
    while (ids && *s) {
        char *end;
        long v;
        while (*s == ',' || *s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
        if (!*s) break;
        v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 0x7fffffff) die("'%s' is not a list of token ids (non-negative integers)", s);
        if (n == cap) ids = (int32_t *)realloc(ids, (cap *= 2) * sizeof *ids);
        if (!ids) break;
        ids[n++] = (int32_t)v;
        s = end;
    }
    if (!ids) die("%s", "out of memory");
    *out = ids;
    return n;
}

double now_seconds(void) {
#if defined(_WIN32)
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)c.QuadPart / (double)f.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
#endif
}

static int print_token(void *user, int32_t token) {
    (void)user;
    printf("%d ", (int)token);
    fflush(stdout);
    return 0;
}

afm_model *load_or_die(const char *path, int no_mmap) {
    afm_model *m;
    afm_load_params lp;
    char err[512];
    memset(&lp, 0, sizeof lp);
    lp.no_mmap = no_mmap;
    if (afm_model_load_file(path, &lp, &m, err, sizeof err) != AFM_OK) {
        fprintf(stderr, "afm: %s\n", err);
        exit(1);
    }
    return m;
}

afm_adapter *load_adapter_or_die(afm_model *m, const char *path) {
    afm_adapter *ad;
    char err[512];
    afm_result r = !strcmp(path, "base") ? afm_adapter_embedded(m, &ad, err, sizeof err)
                                         : afm_adapter_load(m, path, NULL, &ad, err, sizeof err);
    if (r != AFM_OK) {
        fprintf(stderr, "afm: %s\n", err);
        exit(1);
    }
    return ad;
}

/* ---- text: tokenizers, prompts, streaming output ---- */

/* A whole file, or stdin for "-"; NUL-terminated. */
static char *read_all(const char *path, size_t *n) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    size_t cap = 1 << 16, len = 0, got;
    char *buf = (char *)malloc(cap);
    if (!f) die("cannot open '%s'", path);
    while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (cap - len - 1 == 0) {
            char *nb = (char *)realloc(buf, cap * 2);
            if (!nb) free(buf);
            buf = nb;
            cap *= 2;
        }
    }
    if (!buf) die("%s", "out of memory");
    if (ferror(f)) die("cannot read '%s'", path);
    if (f != stdin) fclose(f);
    buf[len] = 0;
    *n = len;
    return buf;
}

/* The tokenizer: a standalone file (--tokenizer; a tokenizer.json starts with '{', anything else is
   read as a SentencePiece model) or the one embedded in the model file. */
static afm_tokenizer *tokenizer_or_die(const afm_model *m, const char *model_path, const char *path) {
    afm_tokenizer *t;
    char err[512];
    if (path) {
        size_t n, i = 0;
        char *d = read_all(path, &n);
        int kind;
        afm_result r;
        while (i < n && (d[i] == ' ' || d[i] == '\t' || d[i] == '\n' || d[i] == '\r')) i++;
        kind = i < n && d[i] == '{' ? AFM_TOKENIZER_HF_JSON : AFM_TOKENIZER_SENTENCEPIECE;
        r = afm_tokenizer_load(d, n, kind, NULL, &t, err, sizeof err);
        free(d);
        if (r != AFM_OK) {
            fprintf(stderr, "afm: %s: not a usable %s: %s\n", path, kind == AFM_TOKENIZER_HF_JSON ? "tokenizer.json" : "SentencePiece model", err);
            exit(1);
        }
    } else {
        if (!afm_model_tokenizer_bytes(m, NULL, NULL))
            die("%s has no tokenizer: give one with --tokenizer FILE, or the prompt as --ids", model_path);
        if (afm_model_tokenizer(m, NULL, &t, err, sizeof err) != AFM_OK) {
            fprintf(stderr, "afm: %s: its tokenizer cannot be loaded: %s\n", model_path, err);
            exit(1);
        }
    }
    if (m && afm_tokenizer_n_vocab(t) > afm_model_config(m)->vocab_size) {
        fprintf(stderr, "afm: the tokenizer has %d tokens, more than the model's vocabulary of %d\n", afm_tokenizer_n_vocab(t),
                afm_model_config(m)->vocab_size);
        exit(1);
    }
    return t;
}

/* Encodes text (or, with chat, a conversation of an optional system message and one user message)
   into a malloc'd array. add_eos puts EOS first (AFM's sequence start; afm_chat_tokenize does it). */
static int32_t *encode_or_die(const afm_tokenizer *t, const char *text, int chat, const char *system, unsigned flags,
                              int add_eos, int *n_out) {
    afm_chat_message msgs[2];
    int n_msgs = 0, pre = 0;
    int32_t eos = afm_tokenizer_special(t, AFM_SPECIAL_EOS);
    size_t cap = strlen(text) + 64, n = 0;
    int32_t *ids = NULL;
    afm_result r = AFM_ERR_ARG;
    if (system) { msgs[n_msgs].role = "system"; msgs[n_msgs++].content = system; }
    msgs[n_msgs].role = "user";
    msgs[n_msgs++].content = text;
    if (!chat && add_eos && eos >= 0) pre = 1;
    if (chat && (eos < 0 || afm_tokenizer_special(t, AFM_SPECIAL_TURN_START) < 0))
        die("%s", "--chat needs AFM's tokenizer: this one has no EOS or no <turn_start> token");
    while (r == AFM_ERR_ARG) {
        free(ids);
        if (!(ids = (int32_t *)malloc((cap + 1) * sizeof *ids))) die("%s", "out of memory");
        r = chat ? afm_chat_tokenize(t, msgs, n_msgs, NULL, 0, 1, ids, cap, &n)
                 : afm_tokenize(t, text, strlen(text), flags, ids + pre, cap, &n);
        if (r == AFM_ERR_ARG && n <= cap) die("%s", "the text cannot be encoded (invalid argument)");
        cap = n;
    }
    if (r != AFM_OK) die("the text cannot be encoded: %s", afm_result_string(r));
    if (pre) ids[0] = eos;
    if (n + (size_t)pre > 0x7fffffff) die("%s", "the text is too long");
    *n_out = (int)n + pre;
    return ids;
}

/* Prints generated tokens as text, streaming; stop tokens are not printed. */
typedef struct text_out {
    const afm_tokenizer *tok;
    afm_detokenizer d;
    afm_stop *stop;         /* --stop-string, or NULL */
    const int32_t *stops;
    int n_stops;
    char *buf;
    size_t cap;
} text_out;

static void text_out_init(text_out *o, const afm_tokenizer *tok, unsigned flags, const int32_t *stops, int n_stops) {
    o->tok = tok;
    afm_detokenizer_init(&o->d, tok, flags);
    o->stops = stops;
    o->n_stops = n_stops;
    o->stop = NULL;
    o->cap = afm_tokenizer_max_token_bytes(tok) + 16;
    o->buf = (char *)malloc(o->cap);
    if (!o->buf) die("%s", "out of memory");
}

static int print_text(void *user, int32_t token) {
    text_out *o = (text_out *)user;
    size_t n = 0;
    int i;
    for (i = 0; i < o->n_stops; i++)
        if (token == o->stops[i]) return 0;
    if (afm_detokenizer_push(&o->d, token, o->buf, o->cap, &n) != AFM_OK) return 0;
    if (o->stop) { /* text that may begin a stop string waits until it cannot */
        const char *shown;
        int r = afm_stop_push(o->stop, o->buf, n, &shown, &n);
        if (r < 0) die("%s", "out of memory");
        fwrite(shown, 1, n, stdout);
        fflush(stdout);
        return r;
    }
    fwrite(o->buf, 1, n, stdout);
    fflush(stdout);
    return 0;
}

static void text_out_end(text_out *o) {
    size_t n = 0;
    const char *shown;
    if (afm_detokenizer_flush(&o->d, o->buf, o->cap, &n) == AFM_OK) {
        if (o->stop && afm_stop_push(o->stop, o->buf, n, &shown, &n) == 0) fwrite(shown, 1, n, stdout);
        else if (!o->stop) fwrite(o->buf, 1, n, stdout);
    }
    if (o->stop) {
        afm_stop_flush(o->stop, &shown, &n);
        fwrite(shown, 1, n, stdout);
    }
    free(o->buf);
}

/* ---- afm tokenize, afm detokenize ---- */

static int cmd_tokenize(int argc, char **argv, int detokenize) {
    const char *model_path = NULL, *tok_path = NULL, *text = NULL, *file = NULL, *ids_text = NULL, *system = NULL;
    int chat = 0, pieces = 0, i, n;
    unsigned flags = AFM_TOK_AFM;
    char *owned = NULL, *joined = NULL;
    size_t len = 0;
    afm_model *m = NULL;
    afm_tokenizer *t;
    int32_t *ids;
    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (!v) die("option %s needs a value", a); model_path = v; i++; }
        else if (!strcmp(a, "--tokenizer")) { if (!v) die("option %s needs a value", a); tok_path = v; i++; }
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) { if (!v) die("option %s needs a value", a); file = v; i++; }
        else if (!detokenize && (!strcmp(a, "-p") || !strcmp(a, "--prompt"))) { if (!v) die("option %s needs a value", a); text = v; i++; }
        else if (!detokenize && !strcmp(a, "--system")) { if (!v) die("option %s needs a value", a); system = v; chat = 1; i++; }
        else if (!detokenize && !strcmp(a, "--chat")) chat = 1;
        else if (!detokenize && !strcmp(a, "--pieces")) pieces = 1;
        else if (detokenize && !strcmp(a, "--ids")) { if (!v) die("option %s needs a value", a); ids_text = v; i++; }
        else if (!strcmp(a, "--special")) flags |= AFM_TOK_SPECIAL;
        else if (!strcmp(a, "--plain")) flags &= ~AFM_TOK_AFM;
        else if (a[0] == '-' && a[1] && !(detokenize && a[1] >= '0' && a[1] <= '9'))
            die(detokenize ? "unknown detokenize option '%s' (see afm --help)" : "unknown tokenize option '%s' (see afm --help)", a);
        else { /* the text (tokenize) or the ids (detokenize): the remaining arguments, joined by spaces */
            size_t al = strlen(a), jl = joined ? strlen(joined) : 0;
            char *nj = (char *)realloc(joined, jl + al + 2);
            if (!nj) die("%s", "out of memory");
            if (jl) nj[jl++] = ' ';
            memcpy(nj + jl, a, al + 1);
            joined = nj;
        }
    }
    if (!model_path && !tok_path) die("%s", "no tokenizer: give -m MODEL (its embedded tokenizer) or --tokenizer FILE");
    if (!!text + !!file + !!joined + !!ids_text != 1)
        die("%s", detokenize ? "give the ids once: as arguments, with --ids LIST or with -f FILE"
                             : "give the text once: as an argument, with -p TEXT or with -f FILE");
    if (file) text = owned = read_all(file, &len);
    if (joined) text = joined;
    if (ids_text) text = ids_text;
    if (model_path && !tok_path) m = load_or_die(model_path, 0);
    t = tokenizer_or_die(m, model_path, tok_path);
    if (detokenize) {
        int32_t *dids;
        char *out;
        size_t need = 0;
        afm_result r;
        n = parse_ids(text, &dids);
        for (i = 0; i < n; i++)
            if (dids[i] >= afm_tokenizer_n_vocab(t)) {
                fprintf(stderr, "afm: token id %d is out of range (the vocabulary has %d tokens)\n", (int)dids[i], afm_tokenizer_n_vocab(t));
                exit(1);
            }
        afm_detokenize(t, dids, (size_t)n, flags, NULL, 0, &need);
        out = (char *)malloc(need + 1);
        if (!out) die("%s", "out of memory");
        r = afm_detokenize(t, dids, (size_t)n, flags, out, need + 1, &need);
        if (r != AFM_OK) die("cannot decode the ids: %s", afm_result_string(r));
        fwrite(out, 1, need, stdout);
        printf("\n");
        free(out);
        free(dids);
    } else {
        if (file && memchr(text, 0, len)) die("%s contains a NUL byte", file);
        ids = encode_or_die(t, text, chat, system, flags, 0, &n);
        for (i = 0; i < n; i++) {
            if (pieces) {
                size_t pl = 0, k;
                const char *p = afm_tokenizer_piece(t, ids[i], &pl);
                printf("%6d  ", (int)ids[i]);
                for (k = 0; p && k < pl; k++) {
                    unsigned char c = (unsigned char)p[k];
                    if (c < 0x20 || c == 0x7f || c == '\\') printf("\\x%02x", c);
                    else putchar(c);
                }
                printf("\n");
            } else printf("%d%s", (int)ids[i], i + 1 < n ? " " : "");
        }
        if (!pieces) printf("\n");
        free(ids);
    }
    free(owned);
    free(joined);
    afm_tokenizer_free(t);
    afm_model_free(m);
    return 0;
}

/* ---- afm info ---- */

static void print_count(const char *label, unsigned long long n);

static int cmd_info_adapter(const char *path, const char *model_path) {
    afm_model *m = load_or_die(model_path, 0);
    afm_adapter *ad = load_adapter_or_die(m, path);
    afm_adapter_info info;
    afm_adapter_get_info(ad, &info);
    printf("%s (adapter for %s)\n", path, model_path);
    printf("  identifier: %s\n", info.identifier);
    printf("  rank %d, alpha %g, scale %g\n", info.rank, (double)info.alpha, (double)info.scale);
    printf("  speculative draft tokens: %d\n", info.draft_token_count);
    printf("  base-model signature: %s\n", info.signature[0] ? info.signature : "(none)");
    print_count("LoRA parameters", (unsigned long long)info.n_params);
    if (info.metadata_json) printf("metadata:\n%s\n", info.metadata_json);
    afm_adapter_free(ad);
    afm_model_free(m);
    return 0;
}

static void print_count(const char *label, unsigned long long n) {
    char buf[32], out[48];
    int len, i, j = 0;
    snprintf(buf, sizeof buf, "%llu", n);
    len = (int)strlen(buf);
    for (i = 0; i < len; i++) {
        if (i && (len - i) % 3 == 0) out[j++] = ',';
        out[j++] = buf[i];
    }
    out[j] = 0;
    printf("  %-22s %15s\n", label, out);
}

afm_kernels kernels_or_die(const char *name) {
    int k = afm_kernels_from_name(name);
    if (!name) die("%s", "option --kernels needs a value");
    if (k < 0 || k == AFM_KERNELS_AUTO)
        die("--kernels: '%s' is not one of scalar, avx2, avx512, avx512vnni, amx, neon, neon-dotprod", name);
    if (!afm_kernels_supported((afm_kernels)k)) die("--kernels: this CPU (or this build) cannot run '%s'", name);
    return (afm_kernels)k;
}

/* "avx2 (also: scalar)": the level sessions use by default, then the others this CPU can run. */
static void print_kernels(void) {
    int k, first = 1;
    printf("kernels: %s (also:", afm_kernels_name(afm_kernels_best()));
    for (k = AFM_KERNELS_SCALAR; k <= AFM_KERNELS_AMX; k++)
        if (k != (int)afm_kernels_best() && afm_kernels_supported((afm_kernels)k)) { printf("%s%s", first ? " " : ", ", afm_kernels_name((afm_kernels)k)); first = 0; }
    printf("%s); every level gives the same results\n", first ? " none" : "");
}

static int cmd_info(const char *path) {
    afm_model *m = load_or_die(path, 0);
    const afm_config *c = afm_model_config(m);
    unsigned long long groups[5] = { 0, 0, 0, 0, 0 }, bytes[6] = { 0, 0, 0, 0, 0, 0 }, lora, total;
    uint64_t lora64 = 0;
    static const char *group_names[5] = { "embedding", "segment 0 layers", "segment 1 layers", "output norm", "other" };
    static const char *type_names[6] = { "F32", "F16", "BF16", "Q2B", "Q4", "Q8" };
    int i, n_seg0 = c->n_layers - c->n_reuse_layers, tok_kind;
    size_t tok_size;

    total = afm_model_n_params(m, &lora64);
    lora = lora64;
    for (i = 0; i < afm_model_n_tensors(m); i++) {
        afm_tensor_info t;
        int layer;
        afm_model_tensor(m, i, &t);
        if ((int)t.type >= 0 && (int)t.type < 3) bytes[t.type] += t.n_bytes;
        else if ((int)t.type >= AFM_TYPE_Q2B && (int)t.type <= AFM_TYPE_Q8) bytes[3 + t.type - AFM_TYPE_Q2B] += t.n_bytes;
        if (strstr(t.name, ".lora_") || !strcmp(t.name, "kv_scale")) continue;
        if (!strcmp(t.name, "tok_embd")) groups[0] += t.n_elements;
        else if (!strcmp(t.name, "out_norm")) groups[3] += t.n_elements;
        else if (sscanf(t.name, "l%d.", &layer) == 1) groups[layer < n_seg0 ? 1 : 2] += t.n_elements;
        else groups[4] += t.n_elements;
    }
    afm_model_tokenizer_bytes(m, &tok_kind, &tok_size);

    printf("%s\n", path);
    print_kernels();
    printf("config:\n");
    printf("  vocab_size %d, dim %d, layers %d (segment 0: %d, segment 1 / KV reuse: %d)\n", c->vocab_size, c->dim,
           c->n_layers, n_seg0, c->n_reuse_layers);
    printf("  heads %d x %d, KV heads %d, FFN %d (SwiGLU)\n", c->n_heads, c->head_dim, c->n_kv_heads, c->ffn_dim);
    printf("  RoPE theta %g (half-split layout), norm eps %g, QK-norm eps %g, context %d\n", (double)c->rope_theta,
           (double)c->norm_eps, (double)c->qk_norm_eps, c->context_length);
    printf("  KV cache: %s\n", c->has_kv_scales ? "int8 with per-layer scales" : "no scales (f16 by default)");
    printf("  tokenizer: %s (%llu bytes)", tok_kind == 1 ? "SentencePiece" : tok_kind == 2 ? "tokenizer.json" : "none",
           (unsigned long long)tok_size);
    if (tok_kind) {
        afm_tokenizer *t;
        char err[256];
        if (afm_model_tokenizer(m, NULL, &t, err, sizeof err) == AFM_OK) {
            static const char *names[5] = { "EOS", "<n>", "<turn_start>", "<turn_end>", "<executable_start>" };
            static const afm_special_token which[5] = { AFM_SPECIAL_EOS, AFM_SPECIAL_NEWLINE, AFM_SPECIAL_TURN_START,
                                                        AFM_SPECIAL_TURN_END, AFM_SPECIAL_EXEC_START };
            printf(", %d tokens", afm_tokenizer_n_vocab(t));
            for (i = 0; i < 5; i++)
                if (afm_tokenizer_special(t, which[i]) >= 0) printf(", %s %d", names[i], (int)afm_tokenizer_special(t, which[i]));
            afm_tokenizer_free(t);
        } else printf(", cannot be loaded: %s", err);
    }
    printf("\n");
    printf("  signature: %s\n", c->signature[0] ? c->signature : "(none)");
    printf("parameters:\n");
    for (i = 0; i < 5; i++)
        if (groups[i] || i < 4) print_count(group_names[i], groups[i]);
    print_count("base total", total);
    if (c->lora_rank) {
        printf("  base adapter: rank %d, alpha %g\n", c->lora_rank, (double)c->lora_alpha);
        print_count("LoRA", lora);
        print_count("base + LoRA", total + lora);
    }
    printf("bytes by type:\n");
    for (i = 0; i < 6; i++)
        if (bytes[i]) print_count(type_names[i], bytes[i]);
    printf("tensors: %d\n", afm_model_n_tensors(m));
    afm_model_free(m);
    return 0;
}

/* ---- afm generate ---- */

/* --prompt-cache: loads FILE when it exists, keeps the longest prefix its tokens share with the
   prompt, evaluates the rest and saves the state after the prompt back to FILE. Afterwards the
   session's last logits are those of the prompt's last token. */
static void prompt_cache(afm_session *s, const char *path, const int32_t *prompt, int n_prompt) {
    char err[512];
    const int32_t *have;
    int n_have = 0, common = 0;
    FILE *f = fopen(path, "rb");
    if (f) {
        fclose(f);
        if (afm_session_load_file(s, path, err, sizeof err) != AFM_OK) die("--prompt-cache: %s", err);
        have = afm_session_tokens(s, &n_have);
        while (common < n_have && common < n_prompt && have[common] == prompt[common]) common++;
    }
    /* without the saved logits of exactly this prompt, its last token is evaluated again */
    if (common == n_prompt && !(n_have == n_prompt && afm_session_logits(s, -1))) common--;
    if ((common < afm_session_pos(s) && afm_session_rewind(s, common) != AFM_OK) ||
        (common < n_prompt && afm_session_eval(s, prompt + common, n_prompt - common) != AFM_OK))
        die("%s", afm_session_error(s));
    fprintf(stderr, "prompt cache %s: %d of %d prompt tokens reused\n", path, common, n_prompt);
    if (common < n_prompt && afm_session_save_file(s, path, err, sizeof err) != AFM_OK) die("--prompt-cache: %s", err);
}

/* ---- tool calling: --tools, --tool-exec, --tool-mode, --transcript ---- */

typedef struct tool_cli {
    const char *tools_path, *exec, *mode, *transcript_path;
    int max_rounds;
    char *result; /* the last tool's output (kept until the next call) */
} tool_cli;

#if defined(_WIN32)
#define popen _popen
#define pclose _pclose
#endif

/* --tool-exec CMD: the call's JSON {"name":...,"arguments":{...}} on CMD's stdin (through a
   temporary file), its stdout the result; a non-zero exit status makes it a failure whose error is
   that output (or the exit status when there is none). */
static afm_tool_status exec_tool(void *user, const char *name, const char *arguments, const char **result) {
    tool_cli *o = (tool_cli *)user;
    char path[64], *cmd;
    size_t cap = 4096, len = 0, got;
    FILE *in, *p;
    int status;
    free(o->result);
    o->result = NULL;
    *result = "";
#if defined(_WIN32)
    if (!tmpnam(path)) return AFM_TOOL_FAILED;
    in = fopen(path, "wb");
#else
    {
        int fd;
        snprintf(path, sizeof path, "/tmp/afm-tool-XXXXXX");
        fd = mkstemp(path);
        in = fd >= 0 ? fdopen(fd, "wb") : NULL;
    }
#endif
    if (!in) { *result = "afm: cannot create a temporary file for the tool's input"; return AFM_TOOL_FAILED; }
    fprintf(in, "{\"name\":\"%s\",\"arguments\":%s}\n", name, arguments); /* tool names need no escapes */
    fclose(in);
    if (!(cmd = (char *)malloc(strlen(o->exec) + strlen(path) + 8)) || !(o->result = (char *)malloc(cap))) die("%s", "out of memory");
    sprintf(cmd, "%s < %s", o->exec, path);
    fflush(stdout);
    if (!(p = popen(cmd, "r"))) { remove(path); free(cmd); *result = "afm: cannot run --tool-exec"; return AFM_TOOL_FAILED; }
    while ((got = fread(o->result + len, 1, cap - 1 - len, p)) > 0) {
        len += got;
        if (len + 1 == cap && !(o->result = (char *)realloc(o->result, cap *= 2))) die("%s", "out of memory");
    }
    o->result[len] = 0;
    while (len && (o->result[len - 1] == '\n' || o->result[len - 1] == '\r')) o->result[--len] = 0;
    status = pclose(p);
    remove(path);
    free(cmd);
    if (memchr(o->result, 0, len)) { *result = "the tool's output contains a NUL byte"; return AFM_TOOL_FAILED; }
    if (status != 0 && !len) {
        free(o->result);
        if (!(o->result = (char *)malloc(64))) die("%s", "out of memory");
        snprintf(o->result, 64, "the tool exited with status %d", status);
    }
    *result = o->result;
    return status == 0 ? AFM_TOOL_OK : AFM_TOOL_FAILED;
}

/* The conversation: the saved transcript when --transcript names an existing file, else a new one
   with --system; then the tools of --tools and the user's turn. */
static afm_transcript *tool_transcript(const tool_cli *o, const char *text, const char *system) {
    afm_transcript *t;
    char err[512];
    size_t len;
    int n = 0;
    FILE *f = o->transcript_path ? fopen(o->transcript_path, "rb") : NULL;
    if (afm_transcript_create(NULL, &t) != AFM_OK) die("%s", "out of memory");
    if (f) {
        char *json;
        fclose(f);
        json = read_all(o->transcript_path, &len);
        if (afm_transcript_from_json(t, json, len, err, sizeof err) != AFM_OK) {
            fprintf(stderr, "afm: %s: %s\n", o->transcript_path, err);
            exit(1);
        }
        free(json);
        if (system) die("%s", "--system: the transcript has its system turn already");
    } else if (system && afm_transcript_add_message(t, "system", system) != AFM_OK) die("%s", "out of memory");
    if (o->tools_path && (afm_transcript_tools(t, &n), n > 0))
        die("%s declares its tools already: leave out --tools", o->transcript_path);
    if (o->tools_path) {
        char *json = read_all(o->tools_path, &len);
        if (afm_transcript_add_tools_json(t, json, len, err, sizeof err) != AFM_OK) {
            fprintf(stderr, "afm: %s: %s\n", o->tools_path, err);
            exit(1);
        }
        free(json);
    }
    if (afm_transcript_add_message(t, "user", text) != AFM_OK) die("%s", "out of memory");
    return t;
}

static void save_transcript(const afm_transcript *t, const char *path) {
    size_t n = 0;
    char *json;
    FILE *f;
    afm_transcript_to_json(t, NULL, 0, &n);
    if (!(json = (char *)malloc(n + 1)) || afm_transcript_to_json(t, json, n + 1, &n) != AFM_OK) die("%s", "out of memory");
    if (!(f = fopen(path, "wb")) || fwrite(json, 1, n, f) != n || fclose(f) != 0) die("cannot write the transcript '%s'", path);
    free(json);
}

/* The tool loop: each call and output on stderr, the answer on stdout. */
static afm_result run_tools(afm_session *s, const afm_tokenizer *tok, const char *text, const char *system, tool_cli *o,
                            const afm_generate_params *gp) {
    static const char *stops[] = { "error", "answer", "the app's turn (no --tool-exec)", "the round limit (--tool-rounds)",
                                   "-n tokens", "a callback", "a full context" };
    afm_transcript *t = tool_transcript(o, text, system);
    afm_tool_params tp;
    afm_tool_stats st;
    const afm_transcript_entry *e;
    int n0, n, i;
    afm_result r;
    memset(&tp, 0, sizeof tp);
    tp.gen = *gp;
    tp.max_rounds = o->max_rounds;
    if (!o->mode || !strcmp(o->mode, "allowed")) tp.mode = AFM_TOOL_ALLOWED;
    else if (!strcmp(o->mode, "required")) tp.mode = AFM_TOOL_REQUIRED;
    else if (!strcmp(o->mode, "none")) tp.mode = AFM_TOOL_NONE;
    else die("--tool-mode: '%s' is not one of allowed, required, none", o->mode);
    if (o->exec) {
        tp.call = exec_tool;
        tp.call_user = o;
    }
    afm_transcript_entries(t, &n0);
    r = afm_tool_run(s, tok, t, &tp, &st);
    e = afm_transcript_entries(t, &n);
    for (i = n0; i < n; i++) {
        if (e[i].kind == AFM_ENTRY_TOOL_CALL)
            fprintf(stderr, "%s%scall: %s %s\n", e[i].content, e[i].content[0] ? "\n" : "", e[i].name, e[i].arguments);
        else if (e[i].kind == AFM_ENTRY_TOOL_OUTPUT) fprintf(stderr, "%s %s: %s\n", e[i].name, e[i].failed ? "failed" : "returned", e[i].content);
        else if (i == n - 1) printf("%s\n", e[i].content);
        else fprintf(stderr, "%s\n", e[i].content);
    }
    fflush(stdout);
    if (r != AFM_OK) fprintf(stderr, "afm: %s\n", afm_session_error(s));
    else fprintf(stderr, "tools: %d calls, %d tokens; stopped at %s\n", st.n_calls, st.n_generated, stops[st.stop]);
    if (o->transcript_path && r == AFM_OK) save_transcript(t, o->transcript_path);
    afm_transcript_free(t);
    free(o->result);
    return r;
}

static int cmd_generate(int argc, char **argv) {
    const char *model_path = NULL, *ids_text = NULL, *dump_path = NULL, *adapter_path = NULL;
    const char *draft_path = NULL, *draft_adapter_path = NULL, *stop_text = NULL;
    const char *text = NULL, *file = NULL, *system = NULL, *tok_path = NULL, *cache_path = NULL;
    const char *schema_path = NULL, *grammar_path = NULL, *regex = NULL, *schema_prompt = NULL;
    int no_fast_forward = 0, no_schema_prompt = 0;
    char *prompt_with_schema = NULL;
    tool_cli tools;
    int lookup = 0, draft_k = 0, fixed_k = 0, chat = 0, show_prompt = 0, ignore_eos = 0, display_prompt = 1;
    int n_predict = 16, no_mmap = 0, i, n_prompt, n_eog = 0;
    unsigned tok_flags = AFM_TOK_AFM;
    char *file_text = NULL;
    afm_tokenizer *tokenizer = NULL;
    text_out out;
    int32_t eog[2];
    afm_session_params sp;
    afm_sampler_params smp;
    afm_logit_bias biases[64];
    const char *stop_strings[16];
    int n_stop_strings = 0;
    afm_model *m;
    afm_session *s;
    afm_sampler *sampler;
    afm_adapter *adapter = NULL;
    int32_t *prompt, tok;
    FILE *dump = NULL;
    double t0, t1, t2;
    afm_result r;

    memset(&sp, 0, sizeof sp);
    memset(&smp, 0, sizeof smp);
    memset(&tools, 0, sizeof tools);
    smp.top_p = 1.0f;
    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (!v) die("option %s needs a value", a); model_path = v; i++; }
        else if (!strcmp(a, "--ids")) { if (!v) die("option %s needs a value", a); ids_text = v; i++; }
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { if (!v) die("option %s needs a value", a); text = v; i++; }
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) { if (!v) die("option %s needs a value", a); file = v; i++; }
        else if (!strcmp(a, "--system")) { if (!v) die("option %s needs a value", a); system = v; chat = 1; i++; }
        else if (!strcmp(a, "--tokenizer")) { if (!v) die("option %s needs a value", a); tok_path = v; i++; }
        else if (!strcmp(a, "--chat")) chat = 1;
        else if (!strcmp(a, "--show-prompt")) show_prompt = 1;
        else if (!strcmp(a, "--special")) tok_flags |= AFM_TOK_SPECIAL;
        else if (!strcmp(a, "--plain")) tok_flags &= ~AFM_TOK_AFM;
        else if (!strcmp(a, "--ignore-eos")) ignore_eos = 1;
        else if (!strcmp(a, "--no-display-prompt")) display_prompt = 0;
        else if (!strcmp(a, "--adapter")) { if (!v) die("option %s needs a value", a); adapter_path = v; i++; }
        else if (!strcmp(a, "--draft")) { if (!v) die("option %s needs a value", a); draft_path = v; i++; }
        else if (!strcmp(a, "--draft-adapter")) { if (!v) die("option %s needs a value", a); draft_adapter_path = v; i++; }
        else if (!strcmp(a, "--stop")) { if (!v) die("option %s needs a value", a); stop_text = v; i++; }
        else if (!strcmp(a, "--lookup")) lookup = 1;
        else if (!strcmp(a, "--fixed-k")) fixed_k = 1;
        else if (!strcmp(a, "--draft-k")) { draft_k = (int)parse_int(v, a, 1, 16); i++; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) { n_predict = (int)parse_int(v, a, 0, 1 << 24); i++; }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { sp.n_threads = (int)parse_int(v, a, 1, 1024); i++; }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) { sp.n_ctx = (int)parse_int(v, a, 1, 1 << 24); i++; }
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) { sp.n_batch = (int)parse_int(v, a, 1, 1 << 16); i++; }
        else if (!strcmp(a, "--temp")) { smp.temperature = parse_float(v, a); i++; }
        else if (!strcmp(a, "--top-k")) { smp.top_k = (int)parse_int(v, a, 0, 1 << 30); i++; }
        else if (!strcmp(a, "--top-p")) { smp.top_p = parse_float(v, a); i++; }
        else if (!strcmp(a, "--min-p")) { smp.min_p = parse_float(v, a); i++; }
        else if (!strcmp(a, "--repeat-penalty")) { smp.repeat_penalty = parse_float(v, a); i++; }
        else if (!strcmp(a, "--presence-penalty")) { smp.presence_penalty = parse_float(v, a); i++; }
        else if (!strcmp(a, "--frequency-penalty")) { smp.frequency_penalty = parse_float(v, a); i++; }
        else if (!strcmp(a, "--repeat-last-n")) { smp.penalty_last_n = (int)parse_int(v, a, -1, 1 << 24); i++; }
        else if (!strcmp(a, "-l") || !strcmp(a, "--logit-bias")) {
            char *end;
            long id;
            if (!v) die("option %s needs a value", a);
            if (smp.n_logit_bias == 64) die("%s: at most 64 biases", a);
            id = strtol(v, &end, 10);
            if (end == v || (*end != '+' && *end != '-') || id < 0 || id > 0x7fffffffL) die("--logit-bias: '%s' is not ID+BIAS or ID-BIAS", v);
            biases[smp.n_logit_bias].token = (int32_t)id;
            if (!strcmp(end, "-inf")) biases[smp.n_logit_bias].bias = -INFINITY;
            else biases[smp.n_logit_bias].bias = parse_float(end, a);
            smp.logit_bias = biases;
            smp.n_logit_bias++;
            i++;
        } else if (!strcmp(a, "--stop-string")) {
            if (!v || !v[0]) die("%s needs a non-empty text", a);
            if (n_stop_strings == 16) die("%s: at most 16 stop strings", a);
            stop_strings[n_stop_strings++] = v;
            i++;
        }
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) { smp.seed = (uint64_t)parse_int(v, a, 0, 0x7fffffffL); i++; }
        else if (!strcmp(a, "--dump-logits")) { if (!v) die("option %s needs a value", a); dump_path = v; i++; }
        else if (!strcmp(a, "--prompt-cache")) { if (!v) die("option %s needs a value", a); cache_path = v; i++; }
        else if (!strcmp(a, "--no-mmap")) no_mmap = 1;
        else if (!strcmp(a, "--kernels")) { sp.kernels = kernels_or_die(v); i++; }
        else if (!strcmp(a, "--json-schema")) { if (!v) die("option %s needs a value", a); schema_path = v; i++; }
        else if (!strcmp(a, "--grammar")) { if (!v) die("option %s needs a value", a); grammar_path = v; i++; }
        else if (!strcmp(a, "--regex")) { if (!v) die("option %s needs a value", a); regex = v; i++; }
        else if (!strcmp(a, "--no-fast-forward")) no_fast_forward = 1;
        else if (!strcmp(a, "--tools")) { if (!v) die("option %s needs a value", a); tools.tools_path = v; i++; }
        else if (!strcmp(a, "--tool-exec")) { if (!v) die("option %s needs a value", a); tools.exec = v; i++; }
        else if (!strcmp(a, "--tool-mode")) { if (!v) die("option %s needs a value", a); tools.mode = v; i++; }
        else if (!strcmp(a, "--tool-rounds")) { tools.max_rounds = (int)parse_int(v, a, 1, 1000); i++; }
        else if (!strcmp(a, "--transcript")) { if (!v) die("option %s needs a value", a); tools.transcript_path = v; i++; }
        else if (!strcmp(a, "--no-schema-prompt")) no_schema_prompt = 1;
        else if (!strcmp(a, "--schema-prompt")) { if (!v) die("option %s needs a value", a); schema_prompt = v; i++; }
        else if (!strcmp(a, "--exact")) sp.f32_activations = 1;
        else if (!strcmp(a, "--kv")) {
            if (!v) die("option %s needs a value", a);
            if (!strcmp(v, "auto")) sp.kv_type = AFM_KV_AUTO;
            else if (!strcmp(v, "f32")) sp.kv_type = AFM_KV_F32;
            else if (!strcmp(v, "f16")) sp.kv_type = AFM_KV_F16;
            else if (!strcmp(v, "int8")) sp.kv_type = AFM_KV_INT8;
            else die("--kv: '%s' is not one of auto, f32, f16, int8", v);
            i++;
        } else die("unknown option '%s' (see afm --help)", a);
    }
    if (!model_path) die("%s", "no model given (-m FILE); see afm --help");
    if (!!ids_text + !!text + !!file != 1) die("%s", "give the prompt once: -p TEXT, -f FILE or --ids 1,2,3; see afm --help");
    if (ids_text && (chat || tok_path)) die("%s", "--ids is a prompt of token ids: leave out --chat, --system and --tokenizer");
    if (smp.top_p <= 0 || smp.top_p > 1) die("%s", "--top-p must be in (0, 1]");
    if (smp.min_p < 0 || smp.min_p > 1) die("%s", "--min-p must be in [0, 1]");
    if (!!schema_path + !!grammar_path + !!regex > 1) die("%s", "give one constraint: --json-schema, --grammar or --regex");
    if ((schema_path || grammar_path || regex) && (ids_text || dump_path)) die("%s", "a constraint needs a text prompt and the generation loop (no --ids, --dump-logits)");
    if (tools.tools_path || tools.transcript_path) { /* the tool loop is a chat */
        if (ids_text || dump_path || cache_path || draft_path || schema_path || grammar_path || regex || n_stop_strings || stop_text)
            die("%s", "--tools / --transcript run the tool loop: leave out --ids, --dump-logits, --prompt-cache, --draft, "
                      "--json-schema, --grammar, --regex, --stop and --stop-string");
        chat = 1;
    } else if (tools.exec || tools.mode || tools.max_rounds) die("%s", "--tool-exec, --tool-mode and --tool-rounds need --tools or --transcript");
    if (file) {
        size_t len;
        text = file_text = read_all(file, &len);
        if (memchr(text, 0, len)) die("%s contains a NUL byte", file);
    }

    m = load_or_die(model_path, no_mmap);
    if (ids_text) {
        n_prompt = parse_ids(ids_text, &prompt);
        if (n_prompt == 0) die("%s", "--ids: the prompt is empty");
    } else {
        /* a text prompt: encode it, print text, stop at EOS / <turn_end> */
        int32_t stop_ids[2];
        int k;
        tokenizer = tokenizer_or_die(m, model_path, tok_path);
        if (schema_path && !no_schema_prompt) { /* the schema shown to the model too (docs/CONSTRAINTS.md) */
            size_t slen = 0, plen = 0, tlen = strlen(text);
            char *stext = schema_prompt ? NULL : read_all(schema_path, &slen);
            if (stext && afm_schema_prompt(stext, slen, NULL, 0, &plen) != AFM_OK) die("%s: not one JSON value", schema_path);
            if (schema_prompt) plen = strlen(schema_prompt);
            if (!(prompt_with_schema = (char *)malloc(tlen + plen + 3))) die("%s", "out of memory");
            memcpy(prompt_with_schema, text, tlen);
            memcpy(prompt_with_schema + tlen, "\n\n", 2);
            if (schema_prompt) memcpy(prompt_with_schema + tlen + 2, schema_prompt, plen + 1);
            else afm_schema_prompt(stext, slen, prompt_with_schema + tlen + 2, plen + 1, &plen);
            free(stext);
            text = prompt_with_schema;
        }
        prompt = encode_or_die(tokenizer, text, chat, system, tok_flags, 1, &n_prompt);
        if (n_prompt == 0) die("%s", "the prompt is empty");
        stop_ids[0] = afm_tokenizer_special(tokenizer, AFM_SPECIAL_EOS);
        stop_ids[1] = afm_tokenizer_special(tokenizer, AFM_SPECIAL_TURN_END);
        for (k = 0; k < 2 && !ignore_eos; k++)
            if (stop_ids[k] >= 0) eog[n_eog++] = stop_ids[k];
        if (show_prompt) {
            if (chat) {
                afm_chat_message msgs[2];
                int n_msgs = 0;
                size_t len = 0;
                char *rendered;
                if (system) { msgs[n_msgs].role = "system"; msgs[n_msgs++].content = system; }
                msgs[n_msgs].role = "user";
                msgs[n_msgs++].content = text;
                afm_chat_render(msgs, n_msgs, NULL, 0, 1, NULL, 0, &len);
                if (!(rendered = (char *)malloc(len + 1))) die("%s", "out of memory");
                afm_chat_render(msgs, n_msgs, NULL, 0, 1, rendered, len + 1, &len);
                fprintf(stderr, "prompt (AFM chat template; encoded, first token dropped, EOS prepended):\n%s\n", rendered);
                free(rendered);
            } else fprintf(stderr, "prompt (EOS, then the text):\n%s\n", text);
            fprintf(stderr, "prompt ids (%d):", n_prompt);
            for (k = 0; k < n_prompt; k++) fprintf(stderr, " %d", (int)prompt[k]);
            fprintf(stderr, "\n");
        }
    }
    if (sp.n_ctx > afm_model_config(m)->context_length) {
        fprintf(stderr, "afm: -c %d is above the model's training context of %d tokens\n", sp.n_ctx, afm_model_config(m)->context_length);
        exit(1);
    }
    if ((r = afm_session_create(m, &sp, &s)) != AFM_OK) die("cannot create a session: %s", afm_result_string(r));
    if (adapter_path) {
        adapter = load_adapter_or_die(m, adapter_path);
        if (afm_session_set_adapter(s, adapter) != AFM_OK) die("%s", afm_session_error(s));
    }
    if ((r = afm_sampler_create(&smp, afm_model_config(m)->vocab_size, NULL, &sampler)) != AFM_OK)
        die("cannot create the sampler: %s (a --logit-bias id out of the vocabulary, every token banned, or a bad penalty)", afm_result_string(r));
    if (n_stop_strings && !tokenizer) die("%s", "--stop-string needs a text prompt (not --ids)");
    if (dump_path && !(dump = fopen(dump_path, "wb"))) die("cannot open '%s' for writing", dump_path);
    if (dump && (draft_path || lookup)) die("%s", "--dump-logits runs the plain loop; leave out --draft and --lookup");
    if (dump && cache_path) die("%s", "--dump-logits writes the prompt's logits: leave out --prompt-cache");
    if (tokenizer) {
        /* text output; the prompt is pushed through the detokenizer first so that the continuation
           is spaced as in the whole text, and printed too unless it is a chat or not wanted */
        text_out_init(&out, tokenizer, tok_flags, eog, n_eog);
        if (n_stop_strings && afm_stop_create(stop_strings, n_stop_strings, NULL, &out.stop) != AFM_OK) die("%s", "out of memory");
        if (!chat) {
            int k;
            for (k = 0; k < n_prompt; k++) {
                size_t n = 0;
                if (afm_detokenizer_push(&out.d, prompt[k], out.buf, out.cap, &n) == AFM_OK && display_prompt)
                    fwrite(out.buf, 1, n, stdout);
            }
            fflush(stdout);
        }
    }

    if (tools.tools_path || tools.transcript_path) {
        afm_generate_params gp;
        memset(&gp, 0, sizeof gp);
        gp.n_predict = n_predict;
        gp.sampler = smp;
        gp.lookup = lookup;
        gp.draft_k = draft_k;
        gp.fixed_k = fixed_k;
        gp.no_fast_forward = no_fast_forward;
        r = run_tools(s, tokenizer, text, system, &tools, &gp);
        free(out.buf); /* the text printer is not used */
    } else if (dump) {
        /* the plain loop, one step at a time, writing each step's logits */
        t0 = now_seconds();
        if (afm_session_eval(s, prompt, n_prompt) != AFM_OK) die("%s", afm_session_error(s));
        t1 = now_seconds();
        r = AFM_OK;
        for (i = 0; i < n_predict; i++) {
            const float *logits = afm_session_logits(s, -1);
            fwrite(logits, sizeof(float), (size_t)afm_model_config(m)->vocab_size, dump);
            tok = afm_sampler_sample(sampler, logits);
            if (tok < 0) {
                fprintf(stderr, "\nafm: the logits after position %d are not finite (NaN or +inf, or all -inf)\n", afm_session_pos(s) - 1);
                r = AFM_ERR_NUMERIC;
                break;
            }
            if (tokenizer && print_text(&out, tok)) { i++; break; } /* a stop string */
            else printf("%d%s", (int)tok, i + 1 < n_predict ? " " : "\n");
            if ((r = afm_session_eval(s, &tok, 1)) != AFM_OK) { fprintf(stderr, "\nafm: %s\n", afm_session_error(s)); break; }
        }
        if (tokenizer) {
            text_out_end(&out);
            printf("\n");
        }
        fflush(stdout);
        if (n_predict == 0) fwrite(afm_session_logits(s, -1), sizeof(float), (size_t)afm_model_config(m)->vocab_size, dump);
        t2 = now_seconds();
        fprintf(stderr, "prompt: %d tokens in %.3f s (%.1f tok/s); generated: %d tokens in %.3f s (%.1f tok/s)\n", n_prompt,
                t1 - t0, n_prompt / (t1 - t0 + 1e-12), i, t2 - t1, i / (t2 - t1 + 1e-12));
    } else {
        afm_generate_params gp;
        afm_generate_stats st;
        afm_model *dm = NULL;
        afm_session *ds = NULL;
        afm_adapter *dad = NULL;
        afm_constraint *con = NULL;
        afm_constraint_vocab *cv = NULL;
        afm_constraint_state *cs = NULL;
        int32_t *stops = NULL;
        memset(&gp, 0, sizeof gp);
        if (schema_path || grammar_path || regex) { /* guided generation */
            char err[512];
            size_t len = 0;
            char *ctext = regex ? NULL : read_all(schema_path ? schema_path : grammar_path, &len);
            afm_constraint_kind kind = regex ? AFM_CONSTRAINT_REGEX : schema_path ? AFM_CONSTRAINT_JSON_SCHEMA : AFM_CONSTRAINT_GBNF;
            if (regex) len = strlen(regex);
            if (afm_constraint_compile(kind, regex ? regex : ctext, len, NULL, &con, err, sizeof err) != AFM_OK)
                die("%s", err);
            free(ctext);
            if (afm_constraint_vocab_create(tokenizer, NULL, &cv) != AFM_OK || afm_constraint_state_create(con, cv, &cs) != AFM_OK)
                die("%s", "out of memory building the constraint");
            gp.constraint = cs;
            gp.no_fast_forward = no_fast_forward;
        }
        gp.n_predict = n_predict;
        gp.sampler = smp;
        gp.on_token = tokenizer ? print_text : print_token;
        gp.user = &out;
        gp.lookup = lookup;
        gp.draft_k = draft_k;
        gp.fixed_k = fixed_k;
        if (stop_text) gp.n_stop_tokens = parse_ids(stop_text, &stops);
        if (n_eog) { /* EOS and <turn_end> end a text prompt's generation too */
            int32_t *all = (int32_t *)realloc(stops, (size_t)(gp.n_stop_tokens + n_eog) * sizeof *all);
            if (!all) die("%s", "out of memory");
            memcpy(all + gp.n_stop_tokens, eog, (size_t)n_eog * sizeof *all);
            stops = all;
            gp.n_stop_tokens += n_eog;
        }
        gp.stop_tokens = stops;
        if (draft_path) {
            afm_session_params dsp = sp;
            dm = load_or_die(draft_path, no_mmap);
            dsp.n_threads = sp.n_threads;
            if ((r = afm_session_create(dm, &dsp, &ds)) != AFM_OK) die("cannot create the draft session: %s", afm_result_string(r));
            if (draft_adapter_path) {
                dad = load_adapter_or_die(dm, draft_adapter_path);
                if (afm_session_set_adapter(ds, dad) != AFM_OK) die("%s", afm_session_error(ds));
            }
            gp.draft = ds;
        }
        if (cache_path) { /* the prompt goes in here, reusing the cached prefix; generation continues */
            prompt_cache(s, cache_path, prompt, n_prompt);
            r = afm_generate(s, NULL, 0, &gp, &st);
        } else r = afm_generate(s, prompt, n_prompt, &gp, &st);
        if (tokenizer) text_out_end(&out);
        printf("\n");
        fflush(stdout);
        if (r != AFM_OK) fprintf(stderr, "afm: %s\n", afm_session_error(s));
        if (cs && r == AFM_OK && !afm_constraint_state_complete(cs))
            fprintf(stderr, "afm: the output is incomplete: generation stopped at -n %d tokens before the constraint was satisfied\n", n_predict);
        fprintf(stderr, "prompt: %d tokens in %.3f s (%.1f tok/s); generated: %d tokens in %.3f s (%.1f tok/s)\n", st.n_prompt,
                st.t_prompt, st.n_prompt / (st.t_prompt + 1e-12), st.n_generated, st.t_total - st.t_prompt,
                st.n_generated / (st.t_total - st.t_prompt + 1e-12));
        if (st.n_drafted)
            fprintf(stderr, "speculative: %d drafted, %d accepted (%.1f%%), %.2f tokens per verification, draft %.3f s, verify %.3f s\n",
                    st.n_drafted, st.n_accepted, 100.0 * st.n_accepted / st.n_drafted, (double)st.n_generated / (st.n_steps + 1e-12),
                    st.t_draft, st.t_verify);
        free(stops);
        afm_constraint_state_free(cs);
        afm_constraint_vocab_free(cv);
        afm_constraint_free(con);
        afm_session_free(ds);
        afm_adapter_free(dad);
        afm_model_free(dm);
    }
    if (dump && fclose(dump) != 0 && r == AFM_OK) {
        fprintf(stderr, "afm: cannot write '%s'\n", dump_path);
        r = AFM_ERR_IO;
    }
    free(prompt);
    free(file_text);
    free(prompt_with_schema);
    if (tokenizer) afm_stop_free(out.stop);
    afm_tokenizer_free(tokenizer);
    afm_sampler_free(sampler);
    afm_session_free(s);
    afm_adapter_free(adapter);
    afm_model_free(m);
    return r != AFM_OK; /* "context full" and other generation errors are failures too */
}


/* An .fmadapter package is a directory. */
static int is_directory(const char *path) {
#if defined(_WIN32)
    DWORD a = GetFileAttributesA(path);
    return a != INVALID_FILE_ATTRIBUTES && (a & FILE_ATTRIBUTE_DIRECTORY);
#else
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
#endif
}

/* Only a regular file is opened to peek at its magic: opening a FIFO would block. */
static int is_regular_file(const char *path) {
#if defined(_WIN32)
    DWORD a = GetFileAttributesA(path);
    return a != INVALID_FILE_ATTRIBUTES && !(a & FILE_ATTRIBUTE_DIRECTORY);
#else
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
#endif
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2;
    }
    if (!strcmp(argv[1], "info")) {
        FILE *f;
        char magic[8] = { 0 };
        int is_adapter;
        if (argc == 5 && (!strcmp(argv[3], "-m") || !strcmp(argv[3], "--model"))) return cmd_info_adapter(argv[2], argv[4]);
        if (argc != 3) die("%s", "usage: afm info FILE  |  afm info ADAPTER -m BASE.afm");
        f = is_regular_file(argv[2]) ? fopen(argv[2], "rb") : NULL; /* anything else: the loader says what is wrong */
        is_adapter = f && fread(magic, 1, 8, f) == 8 && !memcmp(magic, "AFMADAPT", 8);
        if (f) fclose(f);
        if (is_adapter || is_directory(argv[2])) die("%s is an adapter: give its base model too (afm info ADAPTER -m BASE.afm)", argv[2]);
        return cmd_info(argv[2]);
    }
    if (!strcmp(argv[1], "generate")) return cmd_generate(argc - 2, argv + 2);
    if (!strcmp(argv[1], "tokenize")) return cmd_tokenize(argc - 2, argv + 2, 0);
    if (!strcmp(argv[1], "detokenize")) return cmd_tokenize(argc - 2, argv + 2, 1);
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc - 2, argv + 2);
    return cmd_generate(argc - 1, argv + 1);
}
