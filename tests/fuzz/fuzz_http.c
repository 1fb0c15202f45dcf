/* libFuzzer harness for afm-server's request parsers (examples/server.c built without its main):
   the HTTP/1.1 head parser, the JSON reader and the mapping of a JSON body onto a generation
   request. The input is split at its first NUL: the HTTP head before it, a JSON body after it (a
   completion request when the body starts with a space, else a chat request). No model is needed.
   Built with -DAFM_FUZZ_MAIN it replays the files given as arguments. */
#define AFM_SERVER_NO_MAIN
#include "../../examples/server.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int verbose; /* the replay prints each verdict */

static void check_head(const char *p, size_t n) {
    http_req r;
    int status = 0;
    const char *msg = NULL;
    long k = http_parse_head(p, n, &r, &status, &msg);
    if (verbose) {
        if (k < 0) printf("  head: %d %s\n", status, msg);
        else if (k == 0) printf("  head: incomplete\n");
        else printf("  head: %s %s, %ld bytes, content-length %lld\n", r.method, r.path, k, r.content_length);
    }
    if (k < 0 && (!msg || !msg[0] || status < 400 || status > 599)) abort(); /* a refusal says why, with a 4xx/5xx */
    if (k > 0 && ((size_t)k > n || r.method[0] == 0 || r.path[0] != '/' || r.content_length < -1)) abort();
}

static void check_body(const char *p, size_t n, int chat) {
    jdoc d;
    gen_req *g = (gen_req *)malloc(sizeof *g);
    int i;
    if (!g) return;
    if (json_parse(&d, p, n) == 0) {
        int r = req_from_json(g, &d, chat);
        if (verbose) printf("  body: %d %s\n", r == 0 ? 200 : g->status, r == 0 ? "ok" : g->err);
        if (r == 0) {
            if (!g->model || (chat ? g->n_msgs < 1 : !g->prompt)) abort();
            for (i = 0; i < g->n_msgs; i++)
                if (!g->msgs[i].role || !g->msgs[i].content) abort();
            for (i = 0; i < g->n_stops; i++)
                if (!g->stops[i] || !g->stops[i][0]) abort();
        } else if (!g->err[0] || g->status < 400 || g->status > 499) abort();
    } else {
        if (!d.err[0]) abort();
        if (verbose) printf("  body: invalid JSON: %s\n", d.err);
    }
    json_free(&d);
    free(g);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = (const uint8_t *)memchr(data, 0, size);
    size_t head = nul ? (size_t)(nul - data) : size;
    char *h = (char *)malloc(head + 1), *b;
    if (!h) return 0;
    memcpy(h, data, head); /* its own allocation, so ASan sees reads past the end */
    check_head(h, head);
    free(h);
    if (nul) {
        size_t n = size - head - 1;
        if (!(b = (char *)malloc(n + 1))) return 0;
        memcpy(b, nul + 1, n);
        check_body(b, n, n == 0 || b[0] != ' ');
        free(b);
    }
    return 0;
}

#ifdef AFM_FUZZ_MAIN
int main(int argc, char **argv) {
    int i;
    verbose = 1;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        printf("%s\n", argv[i]);
        unsigned char *b;
        long n;
        if (!f) continue;
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        rewind(f);
        b = (unsigned char *)malloc((size_t)n + 1);
        if (b && fread(b, 1, (size_t)n, f) == (size_t)n) LLVMFuzzerTestOneInput(b, (size_t)n);
        free(b);
        fclose(f);
    }
    printf("replayed %d inputs\n", argc - 1);
    return 0;
}
#endif
