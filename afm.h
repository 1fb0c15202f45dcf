/* afm.h - v0.1 - Apple on-device foundation model (AFMTextV7) inference in one C header.

   Runs the AFMTextV7 family - the 3.18B two-segment base, its 48.8M draft model and rank-32
   LoRA adapters - on any CPU, exact to Apple's MLX reference. No dependencies.

   DO THIS in exactly one C or C++ file:
       #define AFM_IMPLEMENTATION
       #include "afm.h"
   Everywhere else just #include "afm.h".

   USAGE (see examples/simple.c for a complete program):
       afm_model *m; char err[256];
       if (afm_model_load_file("model.afm", NULL, &m, err, sizeof err) != AFM_OK) { puts(err); return 1; }
       afm_session *s; afm_session_create(m, NULL, &s);
       afm_session_eval(s, tokens, n_tokens);                  // prefill
       const float *logits = afm_session_logits(s, -1);       // last position
       ... sample a token, afm_session_eval(s, &tok, 1), repeat ...
       afm_session_free(s); afm_model_free(m);

   CONFIGURATION MACROS (define before including the implementation)
       AFM_STATIC           make every API function static (private copy in one translation unit)
       AFM_NO_THREADS       no thread pool; everything runs on the caller's thread
       AFM_NO_MMAP          never map files; read them into memory instead
       AFM_NO_SIMD          scalar kernels only (the reference every SIMD kernel is tested against)
       AFM_ASSERT(x)        your assert (default: assert from <assert.h>); only checks internal invariants

   Models are converted once from Apple's assets with tools/convert.py; the file format is
   docs/FORMAT.md. The library never prints, never exits, and checks every byte of a model file
   before it uses it: a bad file is an error code plus a message naming the file, offset or tensor.

   LICENSE: MIT, at the end of this file.
*/
#ifndef AFM_H
#define AFM_H

#include <stddef.h>
#include <stdint.h>

#define AFM_VERSION_MAJOR 0
#define AFM_VERSION_MINOR 1
#define AFM_VERSION_PATCH 0

#ifndef AFMDEF
#ifdef AFM_STATIC
#define AFMDEF static
#else
#define AFMDEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Result codes. Every call that can fail returns one; a message says more. ---- */
typedef enum afm_result {
    AFM_OK = 0,
    AFM_ERR_ARG,          /* a bad argument from the caller */
    AFM_ERR_IO,           /* the file could not be opened, read or mapped */
    AFM_ERR_FORMAT,       /* the file is not a valid model (message says where and why) */
    AFM_ERR_UNSUPPORTED,  /* valid, but uses something this build does not implement */
    AFM_ERR_NOMEM,        /* an allocation failed */
    AFM_ERR_CONTEXT_FULL, /* the session's context limit would be exceeded */
    AFM_ERR_THREAD        /* a worker thread could not be started */
} afm_result;

AFMDEF const char *afm_result_string(afm_result r);

/* ---- Allocator hooks. NULL means malloc/free. Alignment requests are at most 64. ---- */
typedef struct afm_allocator {
    void *(*alloc)(void *user, size_t size);  /* returns NULL on failure */
    void (*free)(void *user, void *ptr);      /* ptr may be NULL */
    void *user;
} afm_allocator;

/* ---- Weight types of the model file (docs/FORMAT.md). ---- */
typedef enum afm_type {
    AFM_TYPE_F32 = 0,
    AFM_TYPE_F16 = 1,
    AFM_TYPE_BF16 = 2,
    AFM_TYPE_Q2B = 16,  /* 2-bit balanced {-1.5,-0.5,0.5,1.5} x f16 scale per group (Apple's QAT grid) */
    AFM_TYPE_Q4 = 17,   /* 4-bit balanced, f16 scale per group (embedding / output head) */
    AFM_TYPE_Q8 = 18    /* int8, f16 scale per group */
} afm_type;

/* ---- The model's configuration, as read from the file. ---- */
typedef struct afm_config {
    int vocab_size, dim, n_layers, n_reuse_layers, n_heads, n_kv_heads, head_dim, ffn_dim;
    int context_length;     /* training context */
    float rope_theta, norm_eps, qk_norm_eps;
    int has_kv_scales;      /* int8 KV cache with per-layer scales (exact to Apple's fake-quant) */
    int lora_rank;          /* rank of the embedded base adapter, 0 if none */
    float lora_alpha;
    char signature[41];     /* base-model signature, "" if none */
} afm_config;

typedef struct afm_model afm_model;
typedef struct afm_session afm_session;

typedef struct afm_load_params {
    const afm_allocator *allocator; /* NULL: malloc/free */
    int no_mmap;                    /* read the file into memory instead of mapping it */
} afm_load_params;

/* Loads a model file. On failure *out is NULL and err (if given) holds a message. */
AFMDEF afm_result afm_model_load_file(const char *path, const afm_load_params *params,
                                      afm_model **out, char *err, size_t err_size);
/* Loads from memory the caller keeps alive and unchanged until afm_model_free (zero-copy). */
AFMDEF afm_result afm_model_load_memory(const void *data, size_t size, const afm_load_params *params,
                                        afm_model **out, char *err, size_t err_size);
AFMDEF void afm_model_free(afm_model *model);
AFMDEF const afm_config *afm_model_config(const afm_model *model);

/* Tensor inspection (for tools, `afm info`, tests). Index 0 .. afm_model_n_tensors()-1. */
typedef struct afm_tensor_info {
    const char *name;
    afm_type type;
    int n_dims;
    uint64_t dims[4];
    uint64_t n_elements, n_bytes;
} afm_tensor_info;
AFMDEF int afm_model_n_tensors(const afm_model *model);
AFMDEF afm_result afm_model_tensor(const afm_model *model, int index, afm_tensor_info *info);
/* Parameter counts: base weights (everything but LoRA) and the embedded base adapter. */
AFMDEF uint64_t afm_model_n_params(const afm_model *model, uint64_t *lora_params);
/* The tokenizer bytes stored in the file: kind 1 SentencePiece, 2 tokenizer.json; NULL if none. */
AFMDEF const void *afm_model_tokenizer_bytes(const afm_model *model, int *kind, size_t *size);

/* ---- Sessions: one conversation timeline over a model. Many may share one model. ---- */
typedef enum afm_kv_type {
    AFM_KV_AUTO = 0, /* int8 when the model has KV scales (exact to Apple), else F16 */
    AFM_KV_F32,
    AFM_KV_F16,
    AFM_KV_INT8      /* requires the model's KV scales */
} afm_kv_type;

typedef struct afm_session_params {
    int n_ctx;          /* context limit in tokens; 0: the model's context_length */
    int n_threads;      /* worker threads including the caller; 0: 1 */
    int n_batch;        /* tokens per forward pass during prefill; 0: 256 */
    int all_logits;     /* keep logits for every position of an eval, not just the last */
    int preallocate;    /* reserve the whole KV cache now instead of growing it on demand */
    afm_kv_type kv_type;
    int f32_activations; /* quantized weights meet f32 activations (decoded row by row: slow, exact to
                            the decoded weights) instead of int8 activation blocks (fast, the default) */
} afm_session_params;

AFMDEF afm_result afm_session_create(afm_model *model, const afm_session_params *params, afm_session **out);
AFMDEF void afm_session_free(afm_session *session);
/* Appends tokens at the current position and runs the model over them. */
AFMDEF afm_result afm_session_eval(afm_session *session, const int32_t *tokens, int n_tokens);
/* Logits (vocab_size floats) of position i of the last eval; i = -1 is its last token. NULL if not kept. */
AFMDEF const float *afm_session_logits(const afm_session *session, int i);
/* Forgets every token at index >= pos; the next eval continues from pos. */
AFMDEF afm_result afm_session_rewind(afm_session *session, int pos);
AFMDEF int afm_session_pos(const afm_session *session);
AFMDEF const char *afm_session_error(const afm_session *session);

/* ---- Sampling: greedy when temperature <= 0. Seeded and deterministic. ---- */
typedef struct afm_sampler_params {
    float temperature;  /* 0: greedy */
    int top_k;          /* 0: off */
    float top_p;        /* 0 or 1: off */
    float min_p;        /* 0: off */
    uint64_t seed;
} afm_sampler_params;

typedef struct afm_sampler afm_sampler;
AFMDEF afm_result afm_sampler_create(const afm_sampler_params *params, int vocab_size,
                                     const afm_allocator *allocator, afm_sampler **out);
AFMDEF void afm_sampler_free(afm_sampler *sampler);
AFMDEF int32_t afm_sampler_sample(afm_sampler *sampler, const float *logits);


/* ---- LoRA adapters (AFM_SPEC section 3): y = W x + (alpha / rank) * B (A x) on every adapted
   projection, applied at run time so a 2-bit base needs no merge. Several adapters may be loaded
   against one model; each session picks one (or none). An adapter must outlive the sessions that
   use it and the model must outlive the adapter. ---- */
typedef struct afm_adapter afm_adapter;

typedef struct afm_adapter_info {
    int rank;
    float alpha, scale;          /* scale = alpha / rank */
    int draft_token_count;       /* speculativeDecodingDraftTokenCount (5 when not given) */
    uint64_t n_params;
    const char *identifier;      /* adapterIdentifier, or the file name */
    const char *signature;       /* base-model signature, "" if none */
    const char *metadata_json;   /* the package's metadata.json, or NULL */
} afm_adapter_info;

/* An adapter file (.afma, tools/convert_adapter.py) or an Apple .fmadapter package directory.
   Checked against the model: shapes, rank, signature (when both carry one), tensor sizes. */
AFMDEF afm_result afm_adapter_load(afm_model *model, const char *path, const afm_load_params *params,
                                   afm_adapter **out, char *err, size_t err_size);
/* An .afma file's bytes, kept alive by the caller (zero-copy when 64-byte aligned). */
AFMDEF afm_result afm_adapter_load_memory(afm_model *model, const void *data, size_t size,
                                          afm_adapter **out, char *err, size_t err_size);
/* An .fmadapter package's metadata.json and adapter_weights.bin, kept alive by the caller. */
AFMDEF afm_result afm_adapter_load_fmadapter_memory(afm_model *model, const char *metadata_json, size_t json_size,
                                                    const void *weights, size_t weights_size,
                                                    afm_adapter **out, char *err, size_t err_size);
/* The base_adapter stored inside the model file (converted from Apple's base-model.pt). */
AFMDEF afm_result afm_adapter_embedded(afm_model *model, afm_adapter **out, char *err, size_t err_size);
AFMDEF void afm_adapter_free(afm_adapter *adapter);
AFMDEF void afm_adapter_get_info(const afm_adapter *adapter, afm_adapter_info *info);
/* Chooses the session's adapter (NULL: none). The KV cache holds keys and values computed with
   the previous adapter, so the session is rewound to position 0 unless the adapter is unchanged. */
AFMDEF afm_result afm_session_set_adapter(afm_session *session, const afm_adapter *adapter);

/* ---- Generation: a sampling loop with streaming, stop tokens and speculative decoding. A
   drafter proposes up to K tokens, the base verifies them all in one forward pass and keeps the
   longest valid prefix, so the output is what the base alone would produce: token for token when
   greedy, the same distribution when sampling (accept with min(1, p/q), else resample from
   max(0, p - q)). K adapts to the measured acceptance and costs; 0 means plain decoding. ---- */

/* A custom drafter: propose up to k tokens continuing context[0 .. n_context) into draft;
   return how many (0 for none). Called with the base's context; must not keep the pointer. */
typedef int (*afm_draft_fn)(void *user, const int32_t *context, int n_context, int k, int32_t *draft);

typedef struct afm_generate_params {
    int n_predict;                  /* tokens to generate at most */
    afm_sampler_params sampler;
    const int32_t *stop_tokens;     /* generation ends after emitting one of these */
    int n_stop_tokens;
    int (*on_token)(void *user, int32_t token); /* each generated token; return non-zero to stop */
    void *user;
    /* drafters (the first one set is used; none: plain decoding) */
    afm_draft_fn draft_fn;          /* custom */
    void *draft_user;
    afm_session *draft;             /* a session on the draft model (same vocabulary); may carry its own adapter */
    int lookup;                     /* prompt lookup: continue the latest earlier match of the last 2-4 tokens */
    int draft_k;                    /* most tokens per verification; 0: the adapter's count, else 5 (max 16) */
    int fixed_k;                    /* always draft draft_k tokens instead of adapting */
} afm_generate_params;

typedef struct afm_generate_stats {
    int n_prompt, n_generated;
    int n_steps;                    /* base forward passes after the prompt */
    int n_drafted, n_accepted;      /* acceptance rate = n_accepted / n_drafted */
    double t_prompt, t_draft, t_verify, t_total; /* seconds */
} afm_generate_stats;

/* Evaluates the prompt (may be empty to continue from the session's last logits), then
   generates. Every emitted token is in the session's cache when it returns. */
AFMDEF afm_result afm_generate(afm_session *session, const int32_t *prompt, int n_prompt,
                               const afm_generate_params *params, afm_generate_stats *stats);
/* The tokens in the session's cache (n of them). Valid until the next call on the session. */
AFMDEF const int32_t *afm_session_tokens(const afm_session *session, int *n);

#ifdef __cplusplus
}
#endif
#endif /* AFM_H */

/* ======================================================================================== */
#ifdef AFM_IMPLEMENTATION
#ifndef AFM_IMPLEMENTATION_DONE
#define AFM_IMPLEMENTATION_DONE

#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <stdarg.h>
#include <math.h>
#include <float.h>
#include <time.h>

#ifndef AFM_ASSERT
#include <assert.h>
#define AFM_ASSERT(x) assert(x)
#endif

#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
#else
#include <sys/types.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/time.h>
#ifndef AFM_NO_MMAP
#include <sys/mman.h>
#endif
#ifndef AFM_NO_THREADS
#include <pthread.h>
#endif
#endif

/* ======================================================================================== */
/* ==== ERRORS ============================================================================ */
/* ======================================================================================== */

AFMDEF const char *afm_result_string(afm_result r) {
    switch (r) {
    case AFM_OK: return "ok";
    case AFM_ERR_ARG: return "invalid argument";
    case AFM_ERR_IO: return "i/o error";
    case AFM_ERR_FORMAT: return "invalid model file";
    case AFM_ERR_UNSUPPORTED: return "unsupported";
    case AFM_ERR_NOMEM: return "out of memory";
    case AFM_ERR_CONTEXT_FULL: return "context full";
    case AFM_ERR_THREAD: return "thread error";
    }
    return "unknown error";
}

/* Writes a message into a caller's buffer (may be NULL) and returns the code, so that
   error paths read `return afm__fail(buf, n, AFM_ERR_FORMAT, "...", ...)`. */
static afm_result afm__fail(char *buf, size_t size, afm_result code, const char *fmt, ...) {
    if (buf && size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, size, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* ======================================================================================== */
/* ==== ALLOCATION ======================================================================== */
/* ======================================================================================== */

static void *afm__default_alloc(void *user, size_t size) { (void)user; return malloc(size); }
static void afm__default_free(void *user, void *p) { (void)user; free(p); }
static const afm_allocator afm__malloc_allocator = { afm__default_alloc, afm__default_free, NULL };

/* Every buffer the library owns is 64-byte aligned: the raw block is over-allocated and the
   offset to its start is kept just below the aligned pointer. */
static void *afm__alloc(const afm_allocator *a, size_t size) {
    unsigned char *raw, *p;
    if (size > (size_t)-1 - 128) return NULL;
    raw = (unsigned char *)a->alloc(a->user, size + 64 + sizeof(size_t));
    if (!raw) return NULL;
    p = raw + sizeof(size_t);
    p += (64 - ((uintptr_t)p & 63)) & 63;
    ((size_t *)(void *)p)[-1] = (size_t)(p - raw);
    return p;
}

static void *afm__calloc(const afm_allocator *a, size_t n, size_t size) {
    void *p;
    if (size && n > ((size_t)-1 - 128) / size) return NULL;
    p = afm__alloc(a, n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

static void afm__free(const afm_allocator *a, void *p) {
    if (p) a->free(a->user, (unsigned char *)p - ((size_t *)p)[-1]);
}

/* ======================================================================================== */
/* ==== PLATFORM: files, threads, time ==================================================== */
/* ======================================================================================== */

/* A file's bytes, either mapped or read into an owned buffer. */
typedef struct afm__blob {
    const unsigned char *data;
    uint64_t size;
    void *owned;          /* afm__alloc'd copy, or NULL */
    void *map;            /* mapping base, or NULL */
    uint64_t map_size;
#if defined(_WIN32)
    HANDLE file, mapping;
#endif
} afm__blob;

static afm_result afm__read_whole(const afm_allocator *a, FILE *f, uint64_t size, afm__blob *b,
                                  const char *path, char *err, size_t errn) {
    size_t got;
    if (size > (uint64_t)((size_t)-1 - 128)) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: file of %llu bytes does not fit in memory", path, (unsigned long long)size);
    b->owned = afm__alloc(a, (size_t)size ? (size_t)size : 1);
    if (!b->owned) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: cannot allocate %llu bytes to read it", path, (unsigned long long)size);
    got = fread(b->owned, 1, (size_t)size, f);
    if (got != (size_t)size) return afm__fail(err, errn, AFM_ERR_IO, "%s: read %llu of %llu bytes", path, (unsigned long long)got, (unsigned long long)size);
    b->data = (const unsigned char *)b->owned;
    b->size = size;
    return AFM_OK;
}

/* populate: map every page now (adapters are read whole at load anyway; models map lazily). */
static afm_result afm__blob_open_ex(const afm_allocator *a, const char *path, int no_mmap, int populate, afm__blob *b,
                                    char *err, size_t errn) {
    afm_result r;
    FILE *f;
    uint64_t size;
    (void)populate; /* MAP_POPULATE is Linux-only and hidden under strict C99 */
    memset(b, 0, sizeof *b);
#if defined(_WIN32) && !defined(AFM_NO_MMAP)
    if (!no_mmap) {
        LARGE_INTEGER li;
        b->file = CreateFileA(path, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
        if (b->file == INVALID_HANDLE_VALUE) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
        if (!GetFileSizeEx(b->file, &li)) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot get file size", path); }
        size = (uint64_t)li.QuadPart;
        if (size == 0) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: file is empty", path); }
        b->mapping = CreateFileMappingA(b->file, NULL, PAGE_READONLY, 0, 0, NULL);
        if (!b->mapping) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot map file", path); }
        b->map = MapViewOfFile(b->mapping, FILE_MAP_READ, 0, 0, 0);
        if (!b->map) { CloseHandle(b->mapping); CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot map file", path); }
        b->data = (const unsigned char *)b->map;
        b->size = b->map_size = size;
        return AFM_OK;
    }
#elif !defined(_WIN32) && !defined(AFM_NO_MMAP)
    if (!no_mmap) {
        struct stat st;
        int fd = open(path, O_RDONLY);
        if (fd < 0) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); return afm__fail(err, errn, AFM_ERR_IO, "%s: not a regular file", path); }
        size = (uint64_t)st.st_size;
        if (size == 0) { close(fd); return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: file is empty", path); }
        if (size > (uint64_t)(size_t)-1) { close(fd); return afm__fail(err, errn, AFM_ERR_IO, "%s: file too large to map", path); }
#ifdef MAP_POPULATE
        b->map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE | (populate ? MAP_POPULATE : 0), fd, 0);
#else
        b->map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
#endif
        close(fd);
        if (b->map == MAP_FAILED) { b->map = NULL; return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot map file", path); }
        b->data = (const unsigned char *)b->map;
        b->size = b->map_size = size;
        return AFM_OK;
    }
#endif
    (void)no_mmap;
#if !defined(_WIN32)
    {
        struct stat st;
        if (stat(path, &st) != 0) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
        if (!S_ISREG(st.st_mode)) return afm__fail(err, errn, AFM_ERR_IO, "%s: not a regular file", path);
    }
#endif
    f = fopen(path, "rb");
    if (!f) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot seek", path); }
    {
        long end = ftell(f);
        if (end < 0) { fclose(f); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot get file size", path); }
        size = (uint64_t)end;
    }
    rewind(f);
    if (size == 0) { fclose(f); return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: file is empty", path); }
    r = afm__read_whole(a, f, size, b, path, err, errn);
    fclose(f);
    return r;
}

static afm_result afm__blob_open(const afm_allocator *a, const char *path, int no_mmap, afm__blob *b, char *err, size_t errn) {
    return afm__blob_open_ex(a, path, no_mmap, 0, b, err, errn);
}

static void afm__blob_close(const afm_allocator *a, afm__blob *b) {
#if defined(_WIN32) && !defined(AFM_NO_MMAP)
    if (b->map) { UnmapViewOfFile(b->map); CloseHandle(b->mapping); CloseHandle(b->file); }
#elif !defined(AFM_NO_MMAP)
    if (b->map) munmap(b->map, (size_t)b->map_size);
#endif
    afm__free(a, b->owned);
    memset(b, 0, sizeof *b);
}

/* ---- thread pool: persistent workers that run one job at a time, split by thread index ----
   A decode step hands the pool several hundred small jobs, so the hand-off must take about a
   microsecond: workers spin on an atomic job counter for a while before sleeping on a condition
   variable, and the caller spins on the count of unfinished workers before sleeping likewise. */
typedef void (*afm__job_fn)(void *ctx, int ith, int nth);

#ifndef AFM_NO_THREADS
#if defined(_MSC_VER)
#include <intrin.h>
typedef volatile long afm__atomic;
static long afm__atomic_get(afm__atomic *p) { return _InterlockedCompareExchange(p, 0, 0); }
static long afm__atomic_add(afm__atomic *p, long v) { return _InterlockedExchangeAdd(p, v) + v; }
#define afm__cpu_relax() YieldProcessor()
#else
typedef volatile long afm__atomic;
static long afm__atomic_get(afm__atomic *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static long afm__atomic_add(afm__atomic *p, long v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
#if defined(__x86_64__) || defined(__i386__)
#define afm__cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define afm__cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define afm__cpu_relax() ((void)0)
#endif
#endif
#define AFM__SPIN 2000 /* pause instructions (tens of microseconds) before sleeping */
#endif

typedef struct afm__pool {
    int n_threads;
#ifndef AFM_NO_THREADS
#if defined(_WIN32)
    HANDLE *threads;
    CRITICAL_SECTION lock;
    CONDITION_VARIABLE wake, done;
#else
    pthread_t *threads;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
#endif
    afm__job_fn fn;
    void *ctx;
    afm__atomic generation;     /* bumped for every job; workers run each generation once */
    afm__atomic pending;        /* workers still running the current job */
    afm__atomic quit;
#endif
} afm__pool;

#ifndef AFM_NO_THREADS
typedef struct afm__worker_arg { afm__pool *pool; int ith; } afm__worker_arg;

#if defined(_WIN32)
#define afm__lock(p) EnterCriticalSection(&(p)->lock)
#define afm__unlock(p) LeaveCriticalSection(&(p)->lock)
#define afm__wait(p, cv) SleepConditionVariableCS(&(p)->cv, &(p)->lock, INFINITE)
#define afm__broadcast(p, cv) WakeAllConditionVariable(&(p)->cv)
#else
#define afm__lock(p) pthread_mutex_lock(&(p)->lock)
#define afm__unlock(p) pthread_mutex_unlock(&(p)->lock)
#define afm__wait(p, cv) pthread_cond_wait(&(p)->cv, &(p)->lock)
#define afm__broadcast(p, cv) pthread_cond_broadcast(&(p)->cv)
#endif

static void afm__worker_loop(afm__pool *p, int ith) {
    long seen = 0;
    for (;;) {
        int spin;
        for (spin = 0; spin < AFM__SPIN && afm__atomic_get(&p->generation) == seen; spin++) afm__cpu_relax();
        if (afm__atomic_get(&p->generation) == seen) {
            afm__lock(p);
            while (afm__atomic_get(&p->generation) == seen && !afm__atomic_get(&p->quit)) afm__wait(p, wake);
            afm__unlock(p);
        }
        if (afm__atomic_get(&p->quit)) return;
        seen = afm__atomic_get(&p->generation);
        p->fn(p->ctx, ith, p->n_threads); /* fn and ctx were written before the generation bump */
        if (afm__atomic_add(&p->pending, -1) == 0) {
            afm__lock(p);
            afm__broadcast(p, done);
            afm__unlock(p);
        }
    }
}

#if defined(_WIN32)
static DWORD WINAPI afm__worker_main(LPVOID arg) {
#else
static void *afm__worker_main(void *arg) {
#endif
    afm__worker_arg a = *(afm__worker_arg *)arg;
    free(arg);
    afm__worker_loop(a.pool, a.ith);
    return 0;
}
#endif /* AFM_NO_THREADS */

static void afm__pool_destroy(const afm_allocator *a, afm__pool *p) {
#ifndef AFM_NO_THREADS
    int i;
    if (!p->threads) return;
    afm__lock(p);
    afm__atomic_add(&p->quit, 1);
    afm__atomic_add(&p->generation, 1);
    afm__broadcast(p, wake);
    afm__unlock(p);
    for (i = 1; i < p->n_threads; i++) {
#if defined(_WIN32)
        WaitForSingleObject(p->threads[i], INFINITE);
        CloseHandle(p->threads[i]);
#else
        pthread_join(p->threads[i], NULL);
#endif
    }
#if defined(_WIN32)
    DeleteCriticalSection(&p->lock);
#else
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
#endif
    afm__free(a, p->threads);
    p->threads = NULL;
#else
    (void)a; (void)p;
#endif
}

static afm_result afm__pool_init(const afm_allocator *a, afm__pool *p, int n_threads) {
    memset(p, 0, sizeof *p);
    if (n_threads < 1) n_threads = 1;
#ifdef AFM_NO_THREADS
    (void)a;
    p->n_threads = 1;
    return AFM_OK;
#else
    p->n_threads = n_threads;
    if (n_threads == 1) return AFM_OK;
    p->threads = (
#if defined(_WIN32)
        HANDLE
#else
        pthread_t
#endif
        *)afm__calloc(a, (size_t)n_threads, sizeof *p->threads);
    if (!p->threads) return AFM_ERR_NOMEM;
#if defined(_WIN32)
    InitializeCriticalSection(&p->lock);
    InitializeConditionVariable(&p->wake);
    InitializeConditionVariable(&p->done);
#else
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
#endif
    {
        int i;
        for (i = 1; i < n_threads; i++) {
            afm__worker_arg *arg = (afm__worker_arg *)malloc(sizeof *arg);
            int ok;
            if (!arg) ok = 0;
            else {
                arg->pool = p;
                arg->ith = i;
#if defined(_WIN32)
                p->threads[i] = CreateThread(NULL, 0, afm__worker_main, arg, 0, NULL);
                ok = p->threads[i] != NULL;
#else
                ok = pthread_create(&p->threads[i], NULL, afm__worker_main, arg) == 0;
#endif
                if (!ok) free(arg);
            }
            if (!ok) { p->n_threads = i; afm__pool_destroy(a, p); return AFM_ERR_THREAD; }
        }
    }
    return AFM_OK;
#endif
}

/* Runs fn(ctx, ith, nth) on every thread of the pool (the caller is thread 0) and waits. */
static void afm__pool_run(afm__pool *p, afm__job_fn fn, void *ctx) {
#ifndef AFM_NO_THREADS
    if (p->n_threads > 1) {
        int spin;
        p->fn = fn;
        p->ctx = ctx;
        afm__atomic_add(&p->pending, p->n_threads - 1);
        afm__lock(p);
        afm__atomic_add(&p->generation, 1);  /* spinning workers see this at once */
        afm__broadcast(p, wake);             /* sleeping ones are woken */
        afm__unlock(p);
        fn(ctx, 0, p->n_threads);
        for (spin = 0; spin < AFM__SPIN && afm__atomic_get(&p->pending) > 0; spin++) afm__cpu_relax();
        if (afm__atomic_get(&p->pending) > 0) {
            afm__lock(p);
            while (afm__atomic_get(&p->pending) > 0) afm__wait(p, done);
            afm__unlock(p);
        }
        return;
    }
#else
    (void)p;
#endif
    fn(ctx, 0, 1);
}

/* The share [*lo, *hi) of n items that thread ith of nth handles. */
static void afm__split(int n, int ith, int nth, int *lo, int *hi) {
    *lo = (int)((int64_t)n * ith / nth);
    *hi = (int)((int64_t)n * (ith + 1) / nth);
}


/* ======================================================================================== */
/* ==== KERNELS: weight types, scalar reference, AVX2, AVX-512, NEON ===================== */
/* ======================================================================================== */
/* The weight types (docs/FORMAT.md, "Types") and every compute kernel. Decode is a
   matrix-vector product bound by memory bandwidth, prefill and verification are matrix-matrix
   products bound by arithmetic; both go through the same calls: activations are prepared once
   per product (int8 blocks for quantized weights, an f32 copy for float ones), then each thread
   computes its own rows. A scalar kernel is always compiled and is what every SIMD kernel is
   tested against (tests/test_kernels.c); x86 SIMD is chosen at run time from cpuid, arm64 NEON at
   compile time. */

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* ======================================================================================== */
/* Platform                                                                                 */
/* ======================================================================================== */

#if defined(_MSC_VER) && !defined(__clang__)
#define AFM__FORCEINLINE static __forceinline
#define AFM__ALIGN(n) __declspec(align(n))
#else
#define AFM__FORCEINLINE static inline __attribute__((always_inline))
#define AFM__ALIGN(n) __attribute__((aligned(n)))
#endif

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define AFM__UNROLL _Pragma("GCC unroll 16")
#elif defined(__clang__)
#define AFM__UNROLL _Pragma("unroll")
#else
#define AFM__UNROLL
#endif

#if !defined(AFM_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER))
#define AFM__X86 1
#include <immintrin.h>
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#define AFM__T_AVX2
#define AFM__T_AVX512
#define AFM__T_VNNI
#else
#include <cpuid.h>
#define AFM__T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define AFM__T_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define AFM__T_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif
#endif

#if !defined(AFM_NO_SIMD) && (defined(__aarch64__) || defined(_M_ARM64)) && \
    (defined(__ARM_NEON) || defined(_M_ARM64))
#define AFM__NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define AFM__NEON_DOT 1
#endif
#endif

/* ======================================================================================== */
/* Types                                                                                    */
/* ======================================================================================== */

/* Decode (one token) streams every weight once: prefetch this many bytes ahead in the code stream
   (0: off). Software prefetch keeps more cache misses in flight than one hardware stream per thread. */
#ifndef AFM__PF_DIST
#define AFM__PF_DIST 4096
#endif

/* Type codes of the file format (docs/FORMAT.md). */
#define AFM__F32 0
#define AFM__F16 1
#define AFM__BF16 2
#define AFM__Q2B 16 /* 2-bit balanced: (c - 1.5) * scale, c in 0..3 */
#define AFM__Q4 17  /* 4-bit balanced: (c - 7.5) * scale, c in 0..15 */
#define AFM__Q8 18  /* 8-bit symmetric: c * scale, c in -127..127 */
#define AFM__NTYPES 6 /* slots in the kernel table: F32 F16 BF16 Q2B Q4 Q8 */

/* Slot of a type in the kernel table, -1 if unknown. */
static inline int afm__type_slot(int type) {
    switch (type) {
    case AFM__F32: return 0;
    case AFM__F16: return 1;
    case AFM__BF16: return 2;
    case AFM__Q2B: return 3;
    case AFM__Q4: return 4;
    case AFM__Q8: return 5;
    default: return -1;
    }
}
static inline int afm__type_is_quant(int type) { return type == AFM__Q2B || type == AFM__Q4 || type == AFM__Q8; }
static inline const char *afm__type_name(int type) {
    switch (type) {
    case AFM__F32: return "F32";
    case AFM__F16: return "F16";
    case AFM__BF16: return "BF16";
    case AFM__Q2B: return "Q2B";
    case AFM__Q4: return "Q4";
    case AFM__Q8: return "Q8";
    default: return "?";
    }
}

/* Rows of a quantized type are padded to a multiple of this many elements (the code block),
   and of the group size when that is larger. */
static inline int afm__type_unit(int type) {
    return type == AFM__Q2B ? 256 : type == AFM__Q4 ? 128 : type == AFM__Q8 ? 64 : 1;
}
/* Group sizes a quantized type accepts: 64, 128, 256, 512. Returns log2(group/64), -1 if invalid. */
static inline int afm__group_shift(uint32_t group) {
    switch (group) {
    case 64: return 0;
    case 128: return 1;
    case 256: return 2;
    case 512: return 3;
    default: return -1;
    }
}
/* Padded row length in elements. */
static inline uint64_t afm__row_pad(int type, uint64_t cols, uint32_t group) {
    uint64_t u = (uint64_t)afm__type_unit(type);
    if (afm__type_is_quant(type) && group > u) u = group;
    return (cols + u - 1) / u * u;
}

/* The exact byte size of a tensor of `rows` rows of `cols` elements (cols = the last dim, rows =
   the product of the others), or 0 if the type/group is invalid or the size overflows.
   Float types: group must be 0. Quantized: group in {64,128,256,512}; codes of all rows first
   (rows * kpad * bits / 8 bytes), then fp16 scales (rows * kpad / group * 2 bytes). */
static inline uint64_t afm__type_size(int type, uint64_t rows, uint64_t cols, uint32_t group) {
    uint64_t n, kpad, per_row;
    if (rows == 0 || cols == 0 || rows > ((uint64_t)1 << 40) || cols > ((uint64_t)1 << 30)) return 0;
    switch (type) {
    case AFM__F32: if (group) return 0; n = rows * cols; return n > (UINT64_MAX >> 3) ? 0 : n * 4;
    case AFM__F16:
    case AFM__BF16: if (group) return 0; n = rows * cols; return n > (UINT64_MAX >> 3) ? 0 : n * 2;
    case AFM__Q2B:
    case AFM__Q4:
    case AFM__Q8:
        if (afm__group_shift(group) < 0) return 0;
        kpad = afm__row_pad(type, cols, group);
        per_row = kpad / (type == AFM__Q2B ? 4 : type == AFM__Q4 ? 2 : 1) + kpad / group * 2;
        if (rows > UINT64_MAX / 8 / per_row) return 0;
        return rows * per_row;
    default: return 0;
    }
}

/* ---- fp16 / bf16 scalar conversions (portable, exact, round-to-nearest-even) ---- */
static inline float afm__f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t afm__bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float afm__h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return afm__f32_from_bits(sign | 0x7f800000u | (man << 13));
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in f32 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return afm__f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}
static inline uint16_t afm__f2h(float f) {
    uint32_t u = afm__bits_from_f32(f), sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
    if (a < 0x38800000u) { /* below the smallest normal fp16: round to a multiple of 2^-24 */
        float v = afm__f32_from_bits(a) * 16777216.0f; /* exact: a power of two scale */
        uint32_t m = (uint32_t)v; float fr = v - (float)m;
        if (fr > 0.5f || (fr == 0.5f && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    { uint32_t r = a + 0xfffu + ((a >> 13) & 1); /* round to nearest even on bit 13 */
      return (uint16_t)(sign | ((r - 0x38000000u) >> 13)); }
}
static inline float afm__bf2f(uint16_t b) { return afm__f32_from_bits((uint32_t)b << 16); }
static inline uint16_t afm__rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* ======================================================================================== */
/* Weight matrix view and prepared activations                                             */
/* ======================================================================================== */

typedef struct afm__wmat {
    const uint8_t *data;   /* row r's codes (or elements) start at data + r * row_bytes */
    const uint8_t *scales; /* quantized: fp16 scales, row r's at scales + r * n_groups * 2 */
    int type, rows, cols;
    int group, gshift;     /* quantized: group size and log2(group / 64) */
    int kpad;              /* padded row length in elements (== cols for float types) */
    int n_groups;          /* scales per row (quantized) */
    size_t row_bytes;
} afm__wmat;

/* Fills w for a tensor of `size` bytes at data. 0 on success, -1 if the size or group is wrong. */
static inline int afm__wmat_init(afm__wmat *w, int type, const void *data, uint64_t size, int rows, int cols, int group) {
    uint64_t need;
    memset(w, 0, sizeof *w);
    if (rows <= 0 || cols <= 0 || afm__type_slot(type) < 0) return -1;
    need = afm__type_size(type, (uint64_t)rows, (uint64_t)cols, (uint32_t)(afm__type_is_quant(type) ? group : 0));
    if (need == 0 || need != size) return -1;
    w->data = (const uint8_t *)data;
    w->type = type; w->rows = rows; w->cols = cols;
    if (afm__type_is_quant(type)) {
        w->group = group; w->gshift = afm__group_shift((uint32_t)group);
        w->kpad = (int)afm__row_pad(type, (uint64_t)cols, (uint32_t)group);
        w->n_groups = w->kpad / group;
        w->row_bytes = (size_t)w->kpad / (type == AFM__Q2B ? 4 : type == AFM__Q4 ? 2 : 1);
        w->scales = w->data + (size_t)rows * w->row_bytes;
    } else {
        w->kpad = cols;
        w->row_bytes = (size_t)cols * (type == AFM__F32 ? 4 : 2);
    }
    return 0;
}

/* Activations prepared for one matrix product.
   Quantized weights: each token's row, zero-padded to kpad (a multiple of 512), is cut in blocks
   of 64; block b has d = max|x| / 127, codes q = round_even(x * (127 / max|x|)) in -127..127
   (0 when the block is all zero), and m = d * sum(q) (for the -1.5 / -7.5 offset of Q2B / Q4).
   Float weights: an f32 copy of X with row stride kpad (n_in rounded up to 16, zero-padded). */
typedef struct afm__act {
    int n_tok, n_in, kpad, nsb; /* nsb = kpad / 64 */
    int quant;                  /* 1: int8 blocks (q, d, m); 0: f32 (x) */
    int8_t *q;                  /* [n_tok][kpad] */
    float *d, *m;               /* [n_tok][nsb] */
    float *x;                   /* [n_tok][kpad] */
} afm__act;

static inline size_t afm__align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Bytes afm__act_init needs for n_tok tokens of n_in features against weights of `type`
   (includes 64 bytes of slack so that any buffer can be aligned). */
static inline size_t afm__act_size(int type, int n_tok, int n_in) {
    size_t kpad;
    if (afm__type_is_quant(type)) {
        kpad = ((size_t)n_in + 511) & ~(size_t)511;
        return 64 + afm__align64((size_t)n_tok * kpad) + 2 * afm__align64((size_t)n_tok * (kpad / 64) * sizeof(float));
    }
    kpad = ((size_t)n_in + 15) & ~(size_t)15;
    return 64 + afm__align64((size_t)n_tok * kpad * sizeof(float));
}

static inline void afm__act_init(afm__act *a, int type, int n_tok, int n_in, void *buf) {
    uint8_t *p = (uint8_t *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    memset(a, 0, sizeof *a);
    a->n_tok = n_tok; a->n_in = n_in;
    a->quant = afm__type_is_quant(type);
    if (a->quant) {
        a->kpad = (n_in + 511) & ~511;
        a->nsb = a->kpad / 64;
        a->q = (int8_t *)p; p += afm__align64((size_t)n_tok * (size_t)a->kpad);
        a->d = (float *)p; p += afm__align64((size_t)n_tok * (size_t)a->nsb * sizeof(float));
        a->m = (float *)p;
    } else {
        a->kpad = (n_in + 15) & ~15;
        a->x = (float *)p;
    }
}

/* ======================================================================================== */
/* The kernel table                                                                         */
/* ======================================================================================== */

/* prepare: fills tokens [t0, t1) of a from X (row t at X + t * ldx).
   matmul: Y[t*ldy + r] for r in [r0, r1), every token of a (a prepared for w's type).
   dequant: out[0 .. cols-1] = row `row` of w as f32.
   kv_scores: s[h*lds + p] = scale * sum_i q[h*ldq + i] * k[p*k_stride + i], h < nq, p < n_pos.
   kv_values: o[h*ldo + i] = scale * sum_p pr[h*ldp + p] * v[p*v_stride + i], h < nq, i < dim. */
typedef void (*afm__prepare_fn)(afm__act *a, const float *X, size_t ldx, int t0, int t1);
typedef void (*afm__matmul_fn)(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1);
typedef void (*afm__dequant_fn)(const afm__wmat *w, int row, float *out);
typedef void (*afm__kv_scores_fn)(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                  int n_pos, int dim, float scale, float *s, size_t lds);
typedef void (*afm__kv_values_fn)(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                  int n_pos, int dim, float scale, float *o, size_t ldo);

typedef struct afm__kernels {
    const char *name;
    afm__prepare_fn prepare_q8;   /* for quantized weights */
    afm__prepare_fn prepare_f32;  /* for float weights */
    afm__matmul_fn matmul[AFM__NTYPES];
    afm__dequant_fn dequant[AFM__NTYPES];
    afm__kv_scores_fn kv_scores;
    afm__kv_values_fn kv_values;
} afm__kernels;

/* Levels for afm__select_kernels's max_level (tests use it to force a lower level). */
#define AFM__LEVEL_SCALAR 0
#define AFM__LEVEL_AVX2 1       /* x86: AVX2 + FMA + F16C */
#define AFM__LEVEL_AVX512 2     /* x86: AVX-512 F/BW/DQ/VL */
#define AFM__LEVEL_AVX512VNNI 3 /* x86: + AVX512_VNNI */
#define AFM__LEVEL_NEON 1       /* arm64: NEON (+dotprod if compiled with it) */
#define AFM__LEVEL_MAX 99

/* ======================================================================================== */
/* Scalar reference kernels                                                                 */
/* ======================================================================================== */

/* Round to nearest, ties to even (the default FP environment); identical to cvtps_epi32/vcvtnq. */
static inline int afm__round_even(float x) { return (int)lrintf(x); }

static void afm__prepare_q8_scalar(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    int t, b, i;
    for (t = t0; t < t1; t++) {
        const float *x = X + (size_t)t * ldx;
        int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
        float *d = a->d + (size_t)t * (size_t)a->nsb, *m = a->m + (size_t)t * (size_t)a->nsb;
        for (b = 0; b < a->nsb; b++) {
            int n = a->n_in - b * 64, sum = 0;
            float amax = 0.0f, id;
            if (n > 64) n = 64;
            if (n < 0) n = 0;
            for (i = 0; i < n; i++) { float v = fabsf(x[b * 64 + i]); amax = amax > v ? amax : v; }
            id = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (i = 0; i < n; i++) { int c = afm__round_even(x[b * 64 + i] * id); q[b * 64 + i] = (int8_t)c; sum += c; }
            for (; i < 64; i++) q[b * 64 + i] = 0;
            d[b] = amax / 127.0f;
            m[b] = d[b] * (float)sum;
        }
    }
}

static void afm__prepare_f32_scalar(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    int t;
    for (t = t0; t < t1; t++) {
        float *x = a->x + (size_t)t * (size_t)a->kpad;
        memcpy(x, X + (size_t)t * ldx, (size_t)a->n_in * sizeof(float));
        memset(x + a->n_in, 0, (size_t)(a->kpad - a->n_in) * sizeof(float));
    }
}

/* Integer dot of sub-block sb (64 weights) of a quantized row with 64 int8 activations. */
static inline int32_t afm__dot_sb_scalar(int type, const uint8_t *row, int sb, const int8_t *q) {
    int32_t s = 0;
    int i;
    if (type == AFM__Q2B) { /* block sb/4, plane sb%4: byte j holds weights j, j+64, j+128, j+192 */
        const uint8_t *b = row + (size_t)(sb >> 2) * 64;
        int sh = (sb & 3) * 2;
        for (i = 0; i < 64; i++) s += ((b[i] >> sh) & 3) * q[i];
    } else if (type == AFM__Q4) { /* block sb/2: byte j holds weight j (low nibble), j+64 (high) */
        const uint8_t *b = row + (size_t)(sb >> 1) * 64;
        int sh = (sb & 1) * 4;
        for (i = 0; i < 64; i++) s += ((b[i] >> sh) & 15) * q[i];
    } else {
        const int8_t *b = (const int8_t *)row + (size_t)sb * 64;
        for (i = 0; i < 64; i++) s += b[i] * q[i];
    }
    return s;
}

static inline float afm__type_offset(int type) { return type == AFM__Q2B ? 1.5f : type == AFM__Q4 ? 7.5f : 0.0f; }

/* y = sum_sb s_g * (d_sb * dot_sb) - off * sum_sb s_g * m_sb  (the reference formula) */
static void afm__matmul_q_scalar(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    const int nsb = w->kpad / 64;
    const float off = afm__type_offset(w->type);
    int r, t, sb;
    for (r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        const uint8_t *sc = w->scales + (size_t)r * (size_t)w->n_groups * 2;
        for (t = 0; t < a->n_tok; t++) {
            const int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
            const float *d = a->d + (size_t)t * (size_t)a->nsb, *m = a->m + (size_t)t * (size_t)a->nsb;
            float acc = 0.0f, accm = 0.0f;
            for (sb = 0; sb < nsb; sb++) {
                float s = afm__h2f(afm__rd16(sc + 2 * (size_t)(sb >> w->gshift)));
                int32_t dot = afm__dot_sb_scalar(w->type, row, sb, q + sb * 64);
                acc += s * (d[sb] * (float)dot);
                accm += s * m[sb];
            }
            Y[(size_t)t * ldy + (size_t)r] = acc - off * accm;
        }
    }
}

static inline float afm__wf_scalar(int type, const uint8_t *row, int i) {
    if (type == AFM__F32) { float f; memcpy(&f, row + 4 * (size_t)i, 4); return f; }
    if (type == AFM__F16) return afm__h2f(afm__rd16(row + 2 * (size_t)i));
    return afm__bf2f(afm__rd16(row + 2 * (size_t)i));
}

static void afm__matmul_f_scalar(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    int r, t, i;
    for (r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        for (t = 0; t < a->n_tok; t++) {
            const float *x = a->x + (size_t)t * (size_t)a->kpad;
            float acc = 0.0f;
            for (i = 0; i < w->cols; i++) acc += afm__wf_scalar(w->type, row, i) * x[i];
            Y[(size_t)t * ldy + (size_t)r] = acc;
        }
    }
}

static void afm__dequant_scalar(const afm__wmat *w, int row, float *out) {
    const uint8_t *p = w->data + (size_t)row * w->row_bytes;
    int i;
    if (!afm__type_is_quant(w->type)) {
        for (i = 0; i < w->cols; i++) out[i] = afm__wf_scalar(w->type, p, i);
        return;
    }
    {
        const uint8_t *sc = w->scales + (size_t)row * (size_t)w->n_groups * 2;
        const int gs = 6 + w->gshift; /* log2(group) */
        for (i = 0; i < w->cols; i++) {
            float s = afm__h2f(afm__rd16(sc + 2 * (size_t)(i >> gs)));
            if (w->type == AFM__Q2B) {
                int c = (p[(i >> 8) * 64 + (i & 63)] >> (((i >> 6) & 3) * 2)) & 3;
                out[i] = ((float)c - 1.5f) * s;
            } else if (w->type == AFM__Q4) {
                int c = (p[(i >> 7) * 64 + (i & 63)] >> (((i >> 6) & 1) * 4)) & 15;
                out[i] = ((float)c - 7.5f) * s;
            } else {
                out[i] = (float)(int8_t)p[i] * s;
            }
        }
    }
}

static void afm__kv_scores_scalar(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                  int n_pos, int dim, float scale, float *s, size_t lds) {
    int h, p, i;
    for (h = 0; h < nq; h++)
        for (p = 0; p < n_pos; p++) {
            const int8_t *kp = k + (size_t)p * k_stride;
            float acc = 0.0f;
            for (i = 0; i < dim; i++) acc += q[(size_t)h * ldq + (size_t)i] * (float)kp[i];
            s[(size_t)h * lds + (size_t)p] = acc * scale;
        }
}

static void afm__kv_values_scalar(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                  int n_pos, int dim, float scale, float *o, size_t ldo) {
    int h, p, i;
    for (h = 0; h < nq; h++) {
        float *oh = o + (size_t)h * ldo;
        for (i = 0; i < dim; i++) oh[i] = 0.0f;
        for (p = 0; p < n_pos; p++) {
            const int8_t *vp = v + (size_t)p * v_stride;
            float w = pr[(size_t)h * ldp + (size_t)p];
            for (i = 0; i < dim; i++) oh[i] += w * (float)vp[i];
        }
        for (i = 0; i < dim; i++) oh[i] *= scale;
    }
}

/* Scales of sub-blocks c .. c+n-1 (n <= 8) of a row as floats. */
static inline void afm__scales_chunk(const uint8_t *sc, int gshift, int c, int n, float *out) {
    int j;
    for (j = 0; j < n; j++) out[j] = afm__h2f(afm__rd16(sc + 2 * (size_t)((c + j) >> gshift)));
}

/* Drivers: rows [r0, r1) x all tokens of a kernel for one row (quantized) or R rows (float) x T tokens. */
#define AFM__NOTARGET
/* Rows [r0, r1) x all tokens: blocks of rows whose weights stay in L2 (~192 KB), inside each
   token tiles of 8 (then one tile of the 1..7 left), rows inside those: a weight row is reused from registers across
   the tile's tokens, a token tile's activations from L1/L2 across the block's rows. */
static inline int afm__row_block(const afm__wmat *w) {
    size_t rb = ((size_t)192 << 10) / (w->row_bytes + (size_t)w->n_groups * 2 + 1);
    return rb < 8 ? 8 : rb > 4096 ? 4096 : (int)rb;
}
#define AFM__DEF_QMM(ISA, TYPE, TNAME, TARGET)                                                              \
    TARGET static void afm__matmul_##TNAME##_##ISA(const afm__wmat *w, const afm__act *a, float *Y,         \
                                                   size_t ldy, int r0, int r1) {                          \
        const int rb = a->n_tok > 8 ? afm__row_block(w) : r1 - r0;                                          \
        int b0, t, r;                                                                                       \
        for (b0 = r0; b0 < r1; b0 += rb) {                                                                  \
            const int b1 = r1 - b0 > rb ? b0 + rb : r1;                                                     \
            for (t = 0; t + 8 <= a->n_tok; t += 8)                                                          \
                for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 8, TYPE);                     \
            switch (a->n_tok - t) { /* the rest in one tile: a row's codes are read once more, not 3 times */ \
            case 7: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 7, TYPE); break;          \
            case 6: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 6, TYPE); break;          \
            case 5: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 5, TYPE); break;          \
            case 4: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 4, TYPE); break;          \
            case 3: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 3, TYPE); break;          \
            case 2: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 2, TYPE); break;          \
            case 1: for (r = b0; r < b1; r++) afm__qtile_##ISA(w, a, Y, ldy, r, t, 1, TYPE); break;          \
            default: break;                                                                                 \
            }                                                                                               \
        }                                                                                                   \
    }
#define AFM__DEF_FMM(ISA, TYPE, TNAME, TARGET, RB, TB)                                                      \
    TARGET static void afm__matmul_##TNAME##_##ISA(const afm__wmat *w, const afm__act *a, float *Y,         \
                                                   size_t ldy, int r0, int r1) {                          \
        int t = 0, r;                                                                                       \
        for (; t + TB <= a->n_tok; t += TB) {                                                               \
            for (r = r0; r + RB <= r1; r += RB) afm__ftile_##ISA(w, a, Y, ldy, r, t, RB, TB, TYPE);         \
            for (; r < r1; r++) afm__ftile_##ISA(w, a, Y, ldy, r, t, 1, TB, TYPE);                          \
        }                                                                                                   \
        for (; t < a->n_tok; t++) {                                                                         \
            for (r = r0; r + 4 <= r1; r += 4) afm__ftile_##ISA(w, a, Y, ldy, r, t, 4, 1, TYPE);             \
            for (; r < r1; r++) afm__ftile_##ISA(w, a, Y, ldy, r, t, 1, 1, TYPE);                           \
        }                                                                                                   \
    }
/* ======================================================================================== */
/* x86-64: AVX2 + FMA + F16C                                                                */
/* ======================================================================================== */
#ifdef AFM__X86

AFM__T_AVX2 static inline float afm__hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AFM__T_AVX2 static void afm__prepare_q8_avx2(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int t, b, i;
    for (t = t0; t < t1; t++) {
        const float *x = X + (size_t)t * ldx;
        int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
        float *d = a->d + (size_t)t * (size_t)a->nsb, *m = a->m + (size_t)t * (size_t)a->nsb;
        for (b = 0; b < a->nsb; b++) {
            int n = a->n_in - b * 64;
            if (n >= 64) {
                __m256 v[8], mx;
                __m128 h;
                float amax, id;
                __m256i q32[8], s16, s8, sum32;
                for (i = 0; i < 8; i++) v[i] = _mm256_loadu_ps(x + b * 64 + i * 8);
                mx = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                                 _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask))),
                                   _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[4], absmask), _mm256_and_ps(v[5], absmask)),
                                                 _mm256_max_ps(_mm256_and_ps(v[6], absmask), _mm256_and_ps(v[7], absmask))));
                h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                h = _mm_max_ss(h, _mm_movehdup_ps(h));
                amax = _mm_cvtss_f32(h);
                id = amax > 0.0f ? 127.0f / amax : 0.0f;
                for (i = 0; i < 8; i++) q32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
                sum32 = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(q32[0], q32[1]), _mm256_add_epi32(q32[2], q32[3])),
                                         _mm256_add_epi32(_mm256_add_epi32(q32[4], q32[5]), _mm256_add_epi32(q32[6], q32[7])));
                for (i = 0; i < 2; i++) { /* pack 32 -> 16 -> 8 and undo the lane interleave */
                    s16 = _mm256_packs_epi32(q32[4 * i + 0], q32[4 * i + 1]);
                    s8 = _mm256_packs_epi32(q32[4 * i + 2], q32[4 * i + 3]);
                    s8 = _mm256_packs_epi16(s16, s8);
                    s8 = _mm256_permutevar8x32_epi32(s8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                    _mm256_storeu_si256((__m256i *)(q + b * 64 + 32 * i), s8);
                }
                {
                    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
                    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
                    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
                    d[b] = amax / 127.0f;
                    m[b] = d[b] * (float)_mm_cvtsi128_si32(s4);
                }
            } else { /* partial or empty last block: the scalar reference on a copy */
                afm__act one = *a;
                float tmp[64];
                int k;
                for (k = 0; k < 64; k++) tmp[k] = k < n ? x[b * 64 + k] : 0.0f;
                one.n_in = 64; one.kpad = 64; one.nsb = 1;
                one.q = q + b * 64; one.d = d + b; one.m = m + b;
                afm__prepare_q8_scalar(&one, tmp, 64, 0, 1);
            }
        }
    }
}

/* 8 fp16 scales of sub-blocks c .. c+7 (c a multiple of 8) as floats. */
AFM__T_AVX2 static inline __m256 afm__scales8_avx2(const uint8_t *sc, int gshift, int c) {
    const uint8_t *p = sc + 2 * (size_t)(c >> gshift);
    __m128i h;
    uint64_t u64; uint32_t u32; uint16_t u16;
    switch (gshift) {
    case 0: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    case 1: memcpy(&u64, p, 8); h = _mm_cvtsi64_si128((long long)u64);
        return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    case 2: memcpy(&u32, p, 4); h = _mm_cvtsi32_si128((int)u32);
        return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    default: memcpy(&u16, p, 2); h = _mm_cvtsi32_si128((int)u16);
        return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setzero_si256());
    }
}

/* One row r of a quantized matrix against tokens t0 .. t0+T-1 (T <= 8, a constant after inlining).
   Per sub-block sb (64 weights) the integer dot is formed in 8 int32 lanes, converted to float and
   accumulated with the factor s_g * d_sb (times 1/4^plane for Q2B planes read without a shift);
   the offset term -off * sum s_g m_sb is accumulated separately per 8 sub-blocks. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__qtile_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                                  int r, int t0, const int T, const int type) {
    const int NA = 1; /* one accumulator per token whatever the tile: a token sums in the same order
                         in a matvec and in any tile, so results do not depend on the batch */
    const int SBB = type == AFM__Q2B ? 4 : type == AFM__Q4 ? 2 : 1; /* sub-blocks per 64-byte block */
    const int nsb = w->kpad >> 6, gshift = w->gshift;
    const uint8_t *row = w->data + (size_t)r * w->row_bytes;
    const uint8_t *sc = w->scales + (size_t)r * (size_t)w->n_groups * 2;
    const float off = afm__type_offset(type);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256 pf = type == AFM__Q2B ? _mm256_setr_ps(1.0f, 0.25f, 0.0625f, 0.0625f, 1.0f, 0.25f, 0.0625f, 0.0625f)
                                       : _mm256_set1_ps(1.0f);
    const int8_t *qb[8];
    const float *db[8], *mb[8];
    __m256 acc[8][4], accm[8];
    float tailm[8];
    AFM__ALIGN(32) float sd[8][8];
    int t, j, c;
    AFM__UNROLL for (t = 0; t < T; t++) {
        qb[t] = a->q + (size_t)(t0 + t) * (size_t)a->kpad;
        db[t] = a->d + (size_t)(t0 + t) * (size_t)a->nsb;
        mb[t] = a->m + (size_t)(t0 + t) * (size_t)a->nsb;
        AFM__UNROLL for (j = 0; j < NA; j++) acc[t][j] = _mm256_setzero_ps();
        accm[t] = _mm256_setzero_ps();
        tailm[t] = 0.0f;
    }
    for (c = 0; c < nsb; c += 8) {
        const int n = nsb - c < 8 ? nsb - c : 8;
        if (T == 1 && AFM__PF_DIST > 0) _mm_prefetch((const char *)sc + 2 * (size_t)(c >> gshift) + AFM__PF_DIST / 8, _MM_HINT_T0);
        if (n == 8) {
            const __m256 S = afm__scales8_avx2(sc, gshift, c), SP = _mm256_mul_ps(S, pf);
            AFM__UNROLL for (t = 0; t < T; t++) {
                _mm256_store_ps(sd[t], _mm256_mul_ps(SP, _mm256_loadu_ps(db[t] + c)));
                if (type != AFM__Q8) accm[t] = _mm256_fmadd_ps(S, _mm256_loadu_ps(mb[t] + c), accm[t]);
            }
        } else {
            float s8[8];
            afm__scales_chunk(sc, gshift, c, n, s8);
            AFM__UNROLL for (t = 0; t < T; t++)
                for (j = 0; j < n; j++) {
                    static const float pq[4] = {1.0f, 0.25f, 0.0625f, 0.0625f};
                    sd[t][j] = s8[j] * (type == AFM__Q2B ? pq[j & 3] : 1.0f) * db[t][c + j];
                    tailm[t] += s8[j] * mb[t][c + j];
                }
        }
        for (j = 0; j < n; j += SBB) {
            const int sb0 = c + j;
            const uint8_t *blk = row + (size_t)(sb0 / SBB) * 64;
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)blk);
            if (T == 1 && AFM__PF_DIST > 0) _mm_prefetch((const char *)blk + AFM__PF_DIST, _MM_HINT_T0);
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(blk + 32));
            int k;
            AFM__UNROLL for (k = 0; k < SBB; k++) {
                const int sb = sb0 + k;
                __m256i c0, c1;
                if (type == AFM__Q2B) {
                    /* planes 0,1,2 masked in place (codes x1, x4, x16), plane 3 shifted by 2 (x16) */
                    if (k == 3) {
                        c0 = _mm256_and_si256(_mm256_srli_epi16(v0, 2), _mm256_set1_epi8(0x30));
                        c1 = _mm256_and_si256(_mm256_srli_epi16(v1, 2), _mm256_set1_epi8(0x30));
                    } else {
                        const __m256i mk = _mm256_set1_epi8((char)(3 << (2 * k)));
                        c0 = _mm256_and_si256(v0, mk);
                        c1 = _mm256_and_si256(v1, mk);
                    }
                } else if (type == AFM__Q4) {
                    if (k == 0) {
                        c0 = _mm256_and_si256(v0, _mm256_set1_epi8(0x0f));
                        c1 = _mm256_and_si256(v1, _mm256_set1_epi8(0x0f));
                    } else {
                        c0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), _mm256_set1_epi8(0x0f));
                        c1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), _mm256_set1_epi8(0x0f));
                    }
                } else {
                    c0 = v0; c1 = v1;
                }
                AFM__UNROLL for (t = 0; t < T; t++) {
                    const __m256i x0 = _mm256_load_si256((const __m256i *)(qb[t] + sb * 64));
                    const __m256i x1 = _mm256_load_si256((const __m256i *)(qb[t] + sb * 64 + 32));
                    __m256i i32;
                    if (type == AFM__Q8) {
                        const __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(c0), _mm256_sign_epi8(x0, c0));
                        const __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(c1), _mm256_sign_epi8(x1, c1));
                        i32 = _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
                    } else {
                        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1));
                        i32 = _mm256_madd_epi16(p, ones);
                    }
                    acc[t][k % NA] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_broadcast_ss(&sd[t][j + k]), acc[t][k % NA]);
                }
            }
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) {
        __m256 s = acc[t][0];
        AFM__UNROLL for (j = 1; j < NA; j++) s = _mm256_add_ps(s, acc[t][j]);
        Y[(size_t)(t0 + t) * ldy + (size_t)r] = afm__hsum_avx2(s) - off * (afm__hsum_avx2(accm[t]) + tailm[t]);
    }
}

AFM__DEF_QMM(avx2, AFM__Q2B, q2b, AFM__T_AVX2)
AFM__DEF_QMM(avx2, AFM__Q4, q4, AFM__T_AVX2)
AFM__DEF_QMM(avx2, AFM__Q8, q8, AFM__T_AVX2)

/* 8 weights of a float type as f32 */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__ld8_avx2(const uint8_t *row, int i, const int type) {
    if (type == AFM__F32) return _mm256_loadu_ps((const float *)(const void *)(row + 4 * (size_t)i));
    if (type == AFM__F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)i))), 16));
}

/* R rows x T tokens of a float matrix: dot products in 8 lanes, then a horizontal sum each. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__ftile_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                                  int r, int t0, const int R, const int T, const int type) {
    const int K = w->cols, K8 = K & ~7;
    const uint8_t *rows[4];
    const float *xs[4];
    __m256 acc[4][4];
    int i, u, t;
    AFM__UNROLL for (u = 0; u < R; u++) rows[u] = w->data + (size_t)(r + u) * w->row_bytes;
    AFM__UNROLL for (t = 0; t < T; t++) xs[t] = a->x + (size_t)(t0 + t) * (size_t)a->kpad;
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) acc[u][t] = _mm256_setzero_ps();
    for (i = 0; i < K8; i += 8) {
        __m256 wv[4];
        AFM__UNROLL for (u = 0; u < R; u++) wv[u] = afm__ld8_avx2(rows[u], i, type);
        AFM__UNROLL for (t = 0; t < T; t++) {
            const __m256 xv = _mm256_loadu_ps(xs[t] + i);
            AFM__UNROLL for (u = 0; u < R; u++) acc[u][t] = _mm256_fmadd_ps(wv[u], xv, acc[u][t]);
        }
    }
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) {
        float s = afm__hsum_avx2(acc[u][t]);
        for (i = K8; i < K; i++) s += afm__wf_scalar(type, rows[u], i) * xs[t][i];
        Y[(size_t)(t0 + t) * ldy + (size_t)(r + u)] = s;
    }
}

AFM__DEF_FMM(avx2, AFM__F32, f32, AFM__T_AVX2, 4, 2)
AFM__DEF_FMM(avx2, AFM__F16, f16, AFM__T_AVX2, 4, 2)
AFM__DEF_FMM(avx2, AFM__BF16, bf16, AFM__T_AVX2, 4, 2)

AFM__T_AVX2 static void afm__prepare_f32_avx2(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    afm__prepare_f32_scalar(a, X, ldx, t0, t1);
}

/* Q4 row dequantization (the embedding lookup): 64-byte block -> 128 floats. */
AFM__T_AVX2 static void afm__dequant_avx2(const afm__wmat *w, int row, float *out) {
    if (w->type == AFM__Q4 || w->type == AFM__Q2B) {
        const int Q4 = w->type == AFM__Q4, per = Q4 ? 128 : 256, SBB = Q4 ? 2 : 4;
        const uint8_t *p = w->data + (size_t)row * w->row_bytes;
        const uint8_t *sc = w->scales + (size_t)row * (size_t)w->n_groups * 2;
        const __m256 offv = _mm256_set1_ps(Q4 ? 7.5f : 1.5f);
        const __m128i mask = _mm_set1_epi8((char)(Q4 ? 15 : 3));
        int b, k, h;
        float tmp[256];
        for (b = 0; b * per < w->cols; b++) {
            const int full = (b + 1) * per <= w->cols;
            float *o = full ? out + b * per : tmp;
            for (k = 0; k < SBB; k++) {
                const int sb = b * SBB + k;
                const __m256 s = _mm256_set1_ps(afm__h2f(afm__rd16(sc + 2 * (size_t)(sb >> w->gshift))));
                for (h = 0; h < 4; h++) { /* 16 bytes -> 16 codes of plane k */
                    __m128i v = _mm_loadu_si128((const __m128i *)(p + (size_t)b * 64 + 16 * h));
                    v = _mm_and_si128(_mm_srli_epi16(v, Q4 ? 4 * k : 2 * k), mask);
                    _mm256_storeu_ps(o + k * 64 + 16 * h, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), offv), s));
                    _mm256_storeu_ps(o + k * 64 + 16 * h + 8,
                                     _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), offv), s));
                }
            }
            if (!full) memcpy(out + b * per, tmp, (size_t)(w->cols - b * per) * sizeof(float));
        }
        return;
    }
    if (w->type == AFM__F16) {
        const uint8_t *p = w->data + (size_t)row * w->row_bytes;
        int i = 0;
        for (; i + 8 <= w->cols; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * (size_t)i))));
        for (; i < w->cols; i++) out[i] = afm__h2f(afm__rd16(p + 2 * (size_t)i));
        return;
    }
    afm__dequant_scalar(w, row, out);
}

/* int8 -> f32 of 8 keys/values */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__i8x8_avx2(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)));
}

AFM__T_AVX2 static void afm__kv_scores_avx2(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                            int n_pos, int dim, float scale, float *s, size_t lds) {
    const int d8 = dim & ~7;
    int h0, p, i, h;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int nh = nq - h0 < 4 ? nq - h0 : 4;
        for (p = 0; p < n_pos; p++) {
            const int8_t *kp = k + (size_t)p * k_stride;
            __m256 acc[4];
            for (h = 0; h < 4; h++) acc[h] = _mm256_setzero_ps();
            if (nh == 4) {
                for (i = 0; i < d8; i += 8) {
                    const __m256 kv = afm__i8x8_avx2(kp + i);
                    AFM__UNROLL for (h = 0; h < 4; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)(h0 + h) * ldq + i), kv, acc[h]);
                }
            } else {
                for (i = 0; i < d8; i += 8) {
                    const __m256 kv = afm__i8x8_avx2(kp + i);
                    for (h = 0; h < nh; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)(h0 + h) * ldq + i), kv, acc[h]);
                }
            }
            for (h = 0; h < nh; h++) {
                float sum = afm__hsum_avx2(acc[h]);
                for (i = d8; i < dim; i++) sum += q[(size_t)(h0 + h) * ldq + (size_t)i] * (float)kp[i];
                s[(size_t)(h0 + h) * lds + (size_t)p] = sum * scale;
            }
        }
    }
}

AFM__T_AVX2 static void afm__kv_values_avx2(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                            int n_pos, int dim, float scale, float *o, size_t ldo) {
    const int d8 = dim & ~7;
    const __m256 sv = _mm256_set1_ps(scale);
    int h0, p, i, h;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int nh = nq - h0 < 4 ? nq - h0 : 4;
        for (i = 0; i < d8; i += 16) { /* 16 columns x up to 4 heads: 8 accumulators */
            const int two = i + 16 <= d8;
            __m256 acc[4][2];
            for (h = 0; h < 4; h++) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
            for (p = 0; p < n_pos; p++) {
                const int8_t *vp = v + (size_t)p * v_stride + i;
                const __m256 x0 = afm__i8x8_avx2(vp);
                const __m256 x1 = two ? afm__i8x8_avx2(vp + 8) : _mm256_setzero_ps();
                for (h = 0; h < nh; h++) {
                    const __m256 wgt = _mm256_broadcast_ss(pr + (size_t)(h0 + h) * ldp + p);
                    acc[h][0] = _mm256_fmadd_ps(wgt, x0, acc[h][0]);
                    acc[h][1] = _mm256_fmadd_ps(wgt, x1, acc[h][1]);
                }
            }
            for (h = 0; h < nh; h++) {
                _mm256_storeu_ps(o + (size_t)(h0 + h) * ldo + i, _mm256_mul_ps(acc[h][0], sv));
                if (two) _mm256_storeu_ps(o + (size_t)(h0 + h) * ldo + i + 8, _mm256_mul_ps(acc[h][1], sv));
            }
        }
        for (h = 0; h < nh; h++)
            for (i = d8; i < dim; i++) {
                float sum = 0.0f;
                for (p = 0; p < n_pos; p++) sum += pr[(size_t)(h0 + h) * ldp + (size_t)p] * (float)v[(size_t)p * v_stride + (size_t)i];
                o[(size_t)(h0 + h) * ldo + (size_t)i] = sum * scale;
            }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* x86-64: AVX-512 (F, BW, DQ, VL) and AVX-512 VNNI                                        */
/* ---------------------------------------------------------------------------------------- */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push /* g++ 12 flags _mm512_undefined_*() inside its own headers */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

AFM__T_AVX512 static inline float afm__hsum_avx512(__m512 v) {
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return afm__hsum_avx2(s);
}

/* 8 scale factors of sub-blocks c..c+7 as the low 8 lanes of a zmm (upper lanes unused) */
AFM__FORCEINLINE AFM__T_AVX512 void afm__sdprep_avx512(const afm__wmat *w, const afm__act *a, const uint8_t *sc, int c, int n,
                                                       const int T, const int type, const float **db, const float **mb,
                                                       float (*sd)[8], __m256 *accm, float *tailm) {
    int t, j;
    if (n == 8) {
        const __m256 pf = type == AFM__Q2B ? _mm256_setr_ps(1.0f, 0.25f, 0.0625f, 0.0625f, 1.0f, 0.25f, 0.0625f, 0.0625f)
                                           : _mm256_set1_ps(1.0f);
        const __m256 S = afm__scales8_avx2(sc, w->gshift, c), SP = _mm256_mul_ps(S, pf);
        AFM__UNROLL for (t = 0; t < T; t++) {
            _mm256_store_ps(sd[t], _mm256_mul_ps(SP, _mm256_loadu_ps(db[t] + c)));
            if (type != AFM__Q8) accm[t] = _mm256_fmadd_ps(S, _mm256_loadu_ps(mb[t] + c), accm[t]);
        }
    } else {
        float s8[8];
        static const float pq[4] = {1.0f, 0.25f, 0.0625f, 0.0625f};
        afm__scales_chunk(sc, w->gshift, c, n, s8);
        AFM__UNROLL for (t = 0; t < T; t++)
            for (j = 0; j < n; j++) {
                sd[t][j] = s8[j] * (type == AFM__Q2B ? pq[j & 3] : 1.0f) * db[t][c + j];
                tailm[t] += s8[j] * mb[t][c + j];
            }
    }
    (void)a;
}

/* As afm__qtile_avx2 with one 64-byte block per zmm. VNNI: vpdpbusd (u8 x s8 -> s32);
   otherwise vpmaddubsw + vpmaddwd. */
AFM__FORCEINLINE AFM__T_AVX512 __m512i afm__dot64_avx512bw(__m512i u, __m512i s) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}
AFM__FORCEINLINE AFM__T_VNNI __m512i afm__dot64_vnni(__m512i u, __m512i s) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
}

#define AFM__DEF_QTILE512(ISA, TARGET, DOT)                                                                      \
    AFM__FORCEINLINE TARGET void afm__qtile_##ISA(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,   \
                                                  int r, int t0, const int T, const int type) {                  \
        const int NA = 1; /* batch-invariant summation order, as in afm__qtile_avx2 */                           \
        const int SBB = type == AFM__Q2B ? 4 : type == AFM__Q4 ? 2 : 1;                                          \
        const int nsb = w->kpad >> 6;                                                                            \
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;                                                 \
        const uint8_t *sc = w->scales + (size_t)r * (size_t)w->n_groups * 2;                                     \
        const float off = afm__type_offset(type);                                                                \
        const int8_t *qb[8];                                                                                     \
        const float *db[8], *mb[8];                                                                              \
        __m512 acc[8][4];                                                                                        \
        __m256 accm[8];                                                                                          \
        float tailm[8];                                                                                          \
        AFM__ALIGN(32) float sd[8][8];                                                                           \
        int t, j, c;                                                                                             \
        AFM__UNROLL for (t = 0; t < T; t++) {                                                                    \
            qb[t] = a->q + (size_t)(t0 + t) * (size_t)a->kpad;                                                   \
            db[t] = a->d + (size_t)(t0 + t) * (size_t)a->nsb;                                                    \
            mb[t] = a->m + (size_t)(t0 + t) * (size_t)a->nsb;                                                    \
            AFM__UNROLL for (j = 0; j < NA; j++) acc[t][j] = _mm512_setzero_ps();                                \
            accm[t] = _mm256_setzero_ps();                                                                       \
            tailm[t] = 0.0f;                                                                                     \
        }                                                                                                        \
        for (c = 0; c < nsb; c += 8) {                                                                           \
            const int n = nsb - c < 8 ? nsb - c : 8;                                                             \
            if (T == 1 && AFM__PF_DIST > 0)                                                                      \
                _mm_prefetch((const char *)sc + 2 * (size_t)(c >> w->gshift) + AFM__PF_DIST / 8, _MM_HINT_T0);   \
            afm__sdprep_avx512(w, a, sc, c, n, T, type, db, mb, sd, accm, tailm);                                \
            for (j = 0; j < n; j += SBB) {                                                                       \
                const int sb0 = c + j;                                                                           \
                const __m512i v = _mm512_loadu_si512((const void *)(row + (size_t)(sb0 / SBB) * 64));            \
                if (T == 1 && AFM__PF_DIST > 0)                                                                  \
                    _mm_prefetch((const char *)(row + (size_t)(sb0 / SBB) * 64) + AFM__PF_DIST, _MM_HINT_T0);    \
                int k;                                                                                           \
                AFM__UNROLL for (k = 0; k < SBB; k++) {                                                          \
                    const int sb = sb0 + k;                                                                      \
                    __m512i cv;                                                                                  \
                    if (type == AFM__Q2B)                                                                        \
                        cv = k == 3 ? _mm512_and_si512(_mm512_srli_epi16(v, 2), _mm512_set1_epi8(0x30))          \
                                    : _mm512_and_si512(v, _mm512_set1_epi8((char)(3 << (2 * k))));               \
                    else if (type == AFM__Q4)                                                                    \
                        cv = _mm512_and_si512(k ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0f));          \
                    else                                                                                         \
                        cv = _mm512_abs_epi8(v);                                                                 \
                    AFM__UNROLL for (t = 0; t < T; t++) {                                                        \
                        __m512i x = _mm512_load_si512((const void *)(qb[t] + sb * 64));                          \
                        if (type == AFM__Q8) /* sign of the weight moved onto the activation */                 \
                            x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(v), _mm512_setzero_si512(), x);      \
                        acc[t][k % NA] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DOT(cv, x)),                         \
                                                         _mm512_set1_ps(sd[t][j + k]), acc[t][k % NA]);          \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        AFM__UNROLL for (t = 0; t < T; t++) {                                                                    \
            __m512 s = acc[t][0];                                                                                \
            AFM__UNROLL for (j = 1; j < NA; j++) s = _mm512_add_ps(s, acc[t][j]);                                \
            Y[(size_t)(t0 + t) * ldy + (size_t)r] = afm__hsum_avx512(s) - off * (afm__hsum_avx2(accm[t]) + tailm[t]); \
        }                                                                                                        \
    }
AFM__DEF_QTILE512(avx512, AFM__T_AVX512, afm__dot64_avx512bw)
AFM__DEF_QTILE512(vnni, AFM__T_VNNI, afm__dot64_vnni)
AFM__DEF_QMM(avx512, AFM__Q2B, q2b, AFM__T_AVX512)
AFM__DEF_QMM(avx512, AFM__Q4, q4, AFM__T_AVX512)
AFM__DEF_QMM(avx512, AFM__Q8, q8, AFM__T_AVX512)
AFM__DEF_QMM(vnni, AFM__Q2B, q2b, AFM__T_VNNI)
AFM__DEF_QMM(vnni, AFM__Q4, q4, AFM__T_VNNI)
AFM__DEF_QMM(vnni, AFM__Q8, q8, AFM__T_VNNI)

AFM__FORCEINLINE AFM__T_AVX512 __m512 afm__ld16_avx512(const uint8_t *row, int i, const int type) {
    if (type == AFM__F32) return _mm512_loadu_ps((const void *)(row + 4 * (size_t)i));
    if (type == AFM__F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)i))), 16));
}

AFM__FORCEINLINE AFM__T_AVX512 void afm__ftile_avx512(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                                      int r, int t0, const int R, const int T, const int type) {
    const int K = w->cols, K16 = K & ~15;
    const uint8_t *rows[4];
    const float *xs[4];
    __m512 acc[4][4];
    int i, u, t;
    AFM__UNROLL for (u = 0; u < R; u++) rows[u] = w->data + (size_t)(r + u) * w->row_bytes;
    AFM__UNROLL for (t = 0; t < T; t++) xs[t] = a->x + (size_t)(t0 + t) * (size_t)a->kpad;
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) acc[u][t] = _mm512_setzero_ps();
    for (i = 0; i < K16; i += 16) {
        __m512 wv[4];
        AFM__UNROLL for (u = 0; u < R; u++) wv[u] = afm__ld16_avx512(rows[u], i, type);
        AFM__UNROLL for (t = 0; t < T; t++) {
            const __m512 xv = _mm512_loadu_ps(xs[t] + i);
            AFM__UNROLL for (u = 0; u < R; u++) acc[u][t] = _mm512_fmadd_ps(wv[u], xv, acc[u][t]);
        }
    }
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) {
        float s = afm__hsum_avx512(acc[u][t]);
        for (i = K16; i < K; i++) s += afm__wf_scalar(type, rows[u], i) * xs[t][i];
        Y[(size_t)(t0 + t) * ldy + (size_t)(r + u)] = s;
    }
}
AFM__DEF_FMM(avx512, AFM__F32, f32, AFM__T_AVX512, 4, 4)
AFM__DEF_FMM(avx512, AFM__F16, f16, AFM__T_AVX512, 4, 4)
AFM__DEF_FMM(avx512, AFM__BF16, bf16, AFM__T_AVX512, 4, 4)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* ---- run-time CPU detection ---- */
#if defined(_MSC_VER) && !defined(__clang__)
static void afm__cpuid(int leaf, int sub, uint32_t r[4]) {
    int v[4];
    __cpuidex(v, leaf, sub);
    r[0] = (uint32_t)v[0]; r[1] = (uint32_t)v[1]; r[2] = (uint32_t)v[2]; r[3] = (uint32_t)v[3];
}
static uint64_t afm__xgetbv0(void) { return (uint64_t)_xgetbv(0); }
#else
static void afm__cpuid(int leaf, int sub, uint32_t r[4]) {
    r[0] = r[1] = r[2] = r[3] = 0;
    __cpuid_count((unsigned)leaf, (unsigned)sub, r[0], r[1], r[2], r[3]);
}
static uint64_t afm__xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

/* Highest AFM__LEVEL_* this CPU and OS support. */
static int afm__x86_level(void) {
    uint32_t r[4], max_leaf, ecx1, ebx7, ecx7;
    uint64_t xcr0;
    afm__cpuid(0, 0, r);
    max_leaf = r[0];
    if (max_leaf < 7) return AFM__LEVEL_SCALAR;
    afm__cpuid(1, 0, r);
    ecx1 = r[2];
    /* FMA (12), OSXSAVE (27), AVX (28), F16C (29) */
    if ((ecx1 & ((1u << 12) | (1u << 27) | (1u << 28) | (1u << 29))) != ((1u << 12) | (1u << 27) | (1u << 28) | (1u << 29)))
        return AFM__LEVEL_SCALAR;
    xcr0 = afm__xgetbv0();
    if ((xcr0 & 6) != 6) return AFM__LEVEL_SCALAR; /* XMM and YMM state enabled by the OS */
    afm__cpuid(7, 0, r);
    ebx7 = r[1]; ecx7 = r[2];
    if (!(ebx7 & (1u << 5))) return AFM__LEVEL_SCALAR; /* AVX2 */
    /* AVX512F (16), DQ (17), BW (30), VL (31); opmask, ZMM_Hi256, Hi16_ZMM state (xcr0 bits 5-7) */
    if ((ebx7 & ((1u << 16) | (1u << 17) | (1u << 30) | (1u << 31))) != ((1u << 16) | (1u << 17) | (1u << 30) | (1u << 31)) ||
        (xcr0 & 0xe0) != 0xe0)
        return AFM__LEVEL_AVX2;
    if (!(ecx7 & (1u << 11))) return AFM__LEVEL_AVX512; /* AVX512_VNNI */
    return AFM__LEVEL_AVX512VNNI;
}
#endif /* AFM__X86 */

/* ======================================================================================== */
/* arm64: NEON (baseline) and the dot-product extension (compile time)                      */
/* ======================================================================================== */
#ifdef AFM__NEON

static void afm__prepare_q8_neon(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    int t, b, i;
    for (t = t0; t < t1; t++) {
        const float *x = X + (size_t)t * ldx;
        int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
        float *d = a->d + (size_t)t * (size_t)a->nsb, *m = a->m + (size_t)t * (size_t)a->nsb;
        for (b = 0; b < a->nsb; b++) {
            const int n = a->n_in - b * 64;
            if (n >= 64) {
                float32x4_t v[16], mx = vdupq_n_f32(0.0f), vid;
                int32x4_t s = vdupq_n_s32(0);
                float amax, id;
                for (i = 0; i < 16; i++) { v[i] = vld1q_f32(x + b * 64 + 4 * i); mx = vmaxq_f32(mx, vabsq_f32(v[i])); }
                amax = vmaxvq_f32(mx);
                id = amax > 0.0f ? 127.0f / amax : 0.0f;
                vid = vdupq_n_f32(id);
                for (i = 0; i < 16; i += 4) {
                    int32x4_t a0 = vcvtnq_s32_f32(vmulq_f32(v[i + 0], vid)), a1 = vcvtnq_s32_f32(vmulq_f32(v[i + 1], vid));
                    int32x4_t a2 = vcvtnq_s32_f32(vmulq_f32(v[i + 2], vid)), a3 = vcvtnq_s32_f32(vmulq_f32(v[i + 3], vid));
                    int16x8_t h0 = vcombine_s16(vmovn_s32(a0), vmovn_s32(a1)), h1 = vcombine_s16(vmovn_s32(a2), vmovn_s32(a3));
                    s = vaddq_s32(s, vaddq_s32(vaddq_s32(a0, a1), vaddq_s32(a2, a3)));
                    vst1q_s8(q + b * 64 + 4 * i, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
                }
                d[b] = amax / 127.0f;
                m[b] = d[b] * (float)vaddvq_s32(s);
            } else {
                afm__act one = *a;
                float tmp[64];
                int k;
                for (k = 0; k < 64; k++) tmp[k] = k < n ? x[b * 64 + k] : 0.0f;
                one.n_in = 64; one.kpad = 64; one.nsb = 1;
                one.q = q + b * 64; one.d = d + b; one.m = m + b;
                afm__prepare_q8_scalar(&one, tmp, 64, 0, 1);
            }
        }
    }
}

/* Scale factors for sub-blocks c..c+n-1 (vector conversion when all 8 groups are distinct). */
static inline void afm__scales8_neon(const uint8_t *sc, int gshift, int c, int n, float *s8) {
    if (n == 8) {
        uint16_t h[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        float f[8];
        int j;
        memcpy(h, sc + 2 * (size_t)(c >> gshift), (size_t)(16 >> gshift));
        vst1q_f32(f, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))));
        vst1q_f32(f + 4, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + 4))));
        for (j = 0; j < 8; j++) s8[j] = f[j >> gshift];
    } else {
        afm__scales_chunk(sc, gshift, c, n, s8);
    }
}

/* int32x4 dot of 64 weight codes (four 16-byte quarters, values fit int8) with 64 activations. */
AFM__FORCEINLINE int32x4_t afm__dot64_neon(const int8x16_t *cq, const int8_t *x, const int type) {
#ifdef AFM__NEON_DOT
    int32x4_t s = vdupq_n_s32(0);
    (void)type;
    s = vdotq_s32(s, cq[0], vld1q_s8(x));
    s = vdotq_s32(s, cq[1], vld1q_s8(x + 16));
    s = vdotq_s32(s, cq[2], vld1q_s8(x + 32));
    s = vdotq_s32(s, cq[3], vld1q_s8(x + 48));
    return s;
#else
    int j;
    if (type == AFM__Q8) { /* products up to 127*127: two per int16 lane, then widen */
        int32x4_t s = vdupq_n_s32(0);
        for (j = 0; j < 4; j++) {
            const int8x16_t xv = vld1q_s8(x + 16 * j);
            int16x8_t p = vmull_s8(vget_low_s8(cq[j]), vget_low_s8(xv));
            p = vmlal_high_s8(p, cq[j], xv);
            s = vpadalq_s16(s, p);
        }
        return s;
    } else { /* codes <= 15: eight products per int16 lane stay below 2^15 */
        int16x8_t p = vdupq_n_s16(0);
        for (j = 0; j < 4; j++) {
            const int8x16_t xv = vld1q_s8(x + 16 * j);
            p = vmlal_s8(p, vget_low_s8(cq[j]), vget_low_s8(xv));
            p = vmlal_high_s8(p, cq[j], xv);
        }
        return vpaddlq_s16(p);
    }
#endif
}

AFM__FORCEINLINE void afm__qtile_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                      int r, int t0, const int T, const int type) {
    const int NA = 1; /* batch-invariant summation order, as in afm__qtile_avx2 */
    const int SBB = type == AFM__Q2B ? 4 : type == AFM__Q4 ? 2 : 1;
    const int nsb = w->kpad >> 6;
    const uint8_t *row = w->data + (size_t)r * w->row_bytes;
    const uint8_t *sc = w->scales + (size_t)r * (size_t)w->n_groups * 2;
    const float off = afm__type_offset(type);
    const int8_t *qb[8];
    const float *db[8], *mb[8];
    float32x4_t acc[8][4], accm[8];
    float sd[8][8];
    int t, j, c;
    AFM__UNROLL for (t = 0; t < T; t++) {
        qb[t] = a->q + (size_t)(t0 + t) * (size_t)a->kpad;
        db[t] = a->d + (size_t)(t0 + t) * (size_t)a->nsb;
        mb[t] = a->m + (size_t)(t0 + t) * (size_t)a->nsb;
        AFM__UNROLL for (j = 0; j < NA; j++) acc[t][j] = vdupq_n_f32(0.0f);
        accm[t] = vdupq_n_f32(0.0f);
    }
    for (c = 0; c < nsb; c += 8) {
        const int n = nsb - c < 8 ? nsb - c : 8;
        float s8[8];
        afm__scales8_neon(sc, w->gshift, c, n, s8);
        if (n == 8) {
            const float32x4_t S0 = vld1q_f32(s8), S1 = vld1q_f32(s8 + 4);
            AFM__UNROLL for (t = 0; t < T; t++) {
                vst1q_f32(sd[t], vmulq_f32(S0, vld1q_f32(db[t] + c)));
                vst1q_f32(sd[t] + 4, vmulq_f32(S1, vld1q_f32(db[t] + c + 4)));
                if (type != AFM__Q8) {
                    accm[t] = vfmaq_f32(accm[t], S0, vld1q_f32(mb[t] + c));
                    accm[t] = vfmaq_f32(accm[t], S1, vld1q_f32(mb[t] + c + 4));
                }
            }
        } else {
            AFM__UNROLL for (t = 0; t < T; t++) {
                float tm = 0.0f;
                for (j = 0; j < n; j++) { sd[t][j] = s8[j] * db[t][c + j]; tm += s8[j] * mb[t][c + j]; }
                accm[t] = vsetq_lane_f32(vgetq_lane_f32(accm[t], 0) + tm, accm[t], 0);
            }
        }
        for (j = 0; j < n; j += SBB) {
            const int sb0 = c + j;
            const uint8_t *blk = row + (size_t)(sb0 / SBB) * 64;
            const uint8x16_t v0 = vld1q_u8(blk), v1 = vld1q_u8(blk + 16), v2 = vld1q_u8(blk + 32), v3 = vld1q_u8(blk + 48);
#if defined(__GNUC__) || defined(__clang__)
            if (T == 1 && AFM__PF_DIST > 0) __builtin_prefetch(blk + AFM__PF_DIST, 0, 3);
#endif
            int k;
            AFM__UNROLL for (k = 0; k < SBB; k++) {
                const int sb = sb0 + k;
                int8x16_t cq[4];
                if (type == AFM__Q2B) {
                    if (k == 0) {
                        const uint8x16_t m3 = vdupq_n_u8(3);
                        cq[0] = vreinterpretq_s8_u8(vandq_u8(v0, m3)); cq[1] = vreinterpretq_s8_u8(vandq_u8(v1, m3));
                        cq[2] = vreinterpretq_s8_u8(vandq_u8(v2, m3)); cq[3] = vreinterpretq_s8_u8(vandq_u8(v3, m3));
                    } else if (k == 3) {
                        cq[0] = vreinterpretq_s8_u8(vshrq_n_u8(v0, 6)); cq[1] = vreinterpretq_s8_u8(vshrq_n_u8(v1, 6));
                        cq[2] = vreinterpretq_s8_u8(vshrq_n_u8(v2, 6)); cq[3] = vreinterpretq_s8_u8(vshrq_n_u8(v3, 6));
                    } else {
                        const uint8x16_t m3 = vdupq_n_u8(3);
                        if (k == 1) {
                            cq[0] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v0, 2), m3)); cq[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v1, 2), m3));
                            cq[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v2, 2), m3)); cq[3] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v3, 2), m3));
                        } else {
                            cq[0] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v0, 4), m3)); cq[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v1, 4), m3));
                            cq[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v2, 4), m3)); cq[3] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v3, 4), m3));
                        }
                    }
                } else if (type == AFM__Q4) {
                    if (k == 0) {
                        const uint8x16_t mf = vdupq_n_u8(15);
                        cq[0] = vreinterpretq_s8_u8(vandq_u8(v0, mf)); cq[1] = vreinterpretq_s8_u8(vandq_u8(v1, mf));
                        cq[2] = vreinterpretq_s8_u8(vandq_u8(v2, mf)); cq[3] = vreinterpretq_s8_u8(vandq_u8(v3, mf));
                    } else {
                        cq[0] = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)); cq[1] = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
                        cq[2] = vreinterpretq_s8_u8(vshrq_n_u8(v2, 4)); cq[3] = vreinterpretq_s8_u8(vshrq_n_u8(v3, 4));
                    }
                } else {
                    cq[0] = vreinterpretq_s8_u8(v0); cq[1] = vreinterpretq_s8_u8(v1);
                    cq[2] = vreinterpretq_s8_u8(v2); cq[3] = vreinterpretq_s8_u8(v3);
                }
                AFM__UNROLL for (t = 0; t < T; t++) {
                    const int32x4_t i32 = afm__dot64_neon(cq, qb[t] + sb * 64, type);
                    acc[t][k % NA] = vfmaq_n_f32(acc[t][k % NA], vcvtq_f32_s32(i32), sd[t][j + k]);
                }
            }
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) {
        float32x4_t s = acc[t][0];
        AFM__UNROLL for (j = 1; j < NA; j++) s = vaddq_f32(s, acc[t][j]);
        Y[(size_t)(t0 + t) * ldy + (size_t)r] = vaddvq_f32(s) - off * vaddvq_f32(accm[t]);
    }
}
AFM__DEF_QMM(neon, AFM__Q2B, q2b, AFM__NOTARGET)
AFM__DEF_QMM(neon, AFM__Q4, q4, AFM__NOTARGET)
AFM__DEF_QMM(neon, AFM__Q8, q8, AFM__NOTARGET)

AFM__FORCEINLINE float32x4_t afm__ld4_neon(const uint8_t *row, int i, const int type) {
    if (type == AFM__F32) return vld1q_f32((const float *)(const void *)(row + 4 * (size_t)i));
    if (type == AFM__F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)(row + 2 * (size_t)i))));
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)(const void *)(row + 2 * (size_t)i)), 16));
}

AFM__FORCEINLINE void afm__ftile_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                      int r, int t0, const int R, const int T, const int type) {
    const int K = w->cols, K4 = K & ~3;
    const uint8_t *rows[4];
    const float *xs[4];
    float32x4_t acc[4][4];
    int i, u, t;
    AFM__UNROLL for (u = 0; u < R; u++) rows[u] = w->data + (size_t)(r + u) * w->row_bytes;
    AFM__UNROLL for (t = 0; t < T; t++) xs[t] = a->x + (size_t)(t0 + t) * (size_t)a->kpad;
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) acc[u][t] = vdupq_n_f32(0.0f);
    for (i = 0; i < K4; i += 4) {
        float32x4_t wv[4];
        AFM__UNROLL for (u = 0; u < R; u++) wv[u] = afm__ld4_neon(rows[u], i, type);
        AFM__UNROLL for (t = 0; t < T; t++) {
            const float32x4_t xv = vld1q_f32(xs[t] + i);
            AFM__UNROLL for (u = 0; u < R; u++) acc[u][t] = vfmaq_f32(acc[u][t], wv[u], xv);
        }
    }
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) {
        float s = vaddvq_f32(acc[u][t]);
        for (i = K4; i < K; i++) s += afm__wf_scalar(type, rows[u], i) * xs[t][i];
        Y[(size_t)(t0 + t) * ldy + (size_t)(r + u)] = s;
    }
}
AFM__DEF_FMM(neon, AFM__F32, f32, AFM__NOTARGET, 4, 3)
AFM__DEF_FMM(neon, AFM__F16, f16, AFM__NOTARGET, 4, 3)
AFM__DEF_FMM(neon, AFM__BF16, bf16, AFM__NOTARGET, 4, 3)

static void afm__kv_scores_neon(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                int n_pos, int dim, float scale, float *s, size_t lds) {
    const int d8 = dim & ~7;
    int h0, p, i, h;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int nh = nq - h0 < 4 ? nq - h0 : 4;
        for (p = 0; p < n_pos; p++) {
            const int8_t *kp = k + (size_t)p * k_stride;
            float32x4_t acc[4][2];
            for (h = 0; h < 4; h++) acc[h][0] = acc[h][1] = vdupq_n_f32(0.0f);
            for (i = 0; i < d8; i += 8) {
                const int16x8_t k16 = vmovl_s8(vld1_s8(kp + i));
                const float32x4_t k0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(k16))), k1 = vcvtq_f32_s32(vmovl_high_s16(k16));
                for (h = 0; h < nh; h++) {
                    const float *qh = q + (size_t)(h0 + h) * ldq + i;
                    acc[h][0] = vfmaq_f32(acc[h][0], vld1q_f32(qh), k0);
                    acc[h][1] = vfmaq_f32(acc[h][1], vld1q_f32(qh + 4), k1);
                }
            }
            for (h = 0; h < nh; h++) {
                float sum = vaddvq_f32(vaddq_f32(acc[h][0], acc[h][1]));
                for (i = d8; i < dim; i++) sum += q[(size_t)(h0 + h) * ldq + (size_t)i] * (float)kp[i];
                s[(size_t)(h0 + h) * lds + (size_t)p] = sum * scale;
            }
        }
    }
}

static void afm__kv_values_neon(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                int n_pos, int dim, float scale, float *o, size_t ldo) {
    const int d8 = dim & ~7;
    int h0, p, i, h;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int nh = nq - h0 < 4 ? nq - h0 : 4;
        for (i = 0; i < d8; i += 8) {
            float32x4_t acc[4][2];
            for (h = 0; h < 4; h++) acc[h][0] = acc[h][1] = vdupq_n_f32(0.0f);
            for (p = 0; p < n_pos; p++) {
                const int16x8_t v16 = vmovl_s8(vld1_s8(v + (size_t)p * v_stride + i));
                const float32x4_t x0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(v16))), x1 = vcvtq_f32_s32(vmovl_high_s16(v16));
                for (h = 0; h < nh; h++) {
                    const float wgt = pr[(size_t)(h0 + h) * ldp + (size_t)p];
                    acc[h][0] = vfmaq_n_f32(acc[h][0], x0, wgt);
                    acc[h][1] = vfmaq_n_f32(acc[h][1], x1, wgt);
                }
            }
            for (h = 0; h < nh; h++) {
                vst1q_f32(o + (size_t)(h0 + h) * ldo + i, vmulq_n_f32(acc[h][0], scale));
                vst1q_f32(o + (size_t)(h0 + h) * ldo + i + 4, vmulq_n_f32(acc[h][1], scale));
            }
        }
        for (h = 0; h < nh; h++)
            for (i = d8; i < dim; i++) {
                float sum = 0.0f;
                for (p = 0; p < n_pos; p++) sum += pr[(size_t)(h0 + h) * ldp + (size_t)p] * (float)v[(size_t)p * v_stride + (size_t)i];
                o[(size_t)(h0 + h) * ldo + (size_t)i] = sum * scale;
            }
    }
}
#endif /* AFM__NEON */

/* ======================================================================================== */
/* Selection and dispatch                                                                   */
/* ======================================================================================== */

/* Fills k with the best kernels for this CPU, at most max_level (AFM__LEVEL_MAX: no limit).
   Returns the level chosen. Scalar kernels fill every slot the SIMD level does not override. */
static inline int afm__select_kernels(afm__kernels *k, int max_level) {
    int i, level = AFM__LEVEL_SCALAR;
    k->name = "scalar";
    k->prepare_q8 = afm__prepare_q8_scalar;
    k->prepare_f32 = afm__prepare_f32_scalar;
    for (i = 0; i < AFM__NTYPES; i++) {
        k->matmul[i] = i < 3 ? afm__matmul_f_scalar : afm__matmul_q_scalar;
        k->dequant[i] = afm__dequant_scalar;
    }
    k->kv_scores = afm__kv_scores_scalar;
    k->kv_values = afm__kv_values_scalar;
#if defined(AFM__X86)
    level = afm__x86_level();
    if (level > max_level) level = max_level;
    if (level >= AFM__LEVEL_AVX2) {
        k->name = "avx2";
        k->prepare_q8 = afm__prepare_q8_avx2;
        k->prepare_f32 = afm__prepare_f32_avx2;
        k->matmul[0] = afm__matmul_f32_avx2; k->matmul[1] = afm__matmul_f16_avx2; k->matmul[2] = afm__matmul_bf16_avx2;
        k->matmul[3] = afm__matmul_q2b_avx2; k->matmul[4] = afm__matmul_q4_avx2; k->matmul[5] = afm__matmul_q8_avx2;
        for (i = 0; i < AFM__NTYPES; i++) k->dequant[i] = afm__dequant_avx2;
        k->kv_scores = afm__kv_scores_avx2;
        k->kv_values = afm__kv_values_avx2;
    }
    if (level >= AFM__LEVEL_AVX512) {
        k->name = "avx512";
        k->matmul[0] = afm__matmul_f32_avx512; k->matmul[1] = afm__matmul_f16_avx512; k->matmul[2] = afm__matmul_bf16_avx512;
        k->matmul[3] = afm__matmul_q2b_avx512; k->matmul[4] = afm__matmul_q4_avx512; k->matmul[5] = afm__matmul_q8_avx512;
    }
    if (level >= AFM__LEVEL_AVX512VNNI) {
        k->name = "avx512vnni";
        k->matmul[3] = afm__matmul_q2b_vnni; k->matmul[4] = afm__matmul_q4_vnni; k->matmul[5] = afm__matmul_q8_vnni;
    }
#elif defined(AFM__NEON)
    if (max_level >= AFM__LEVEL_NEON) {
        level = AFM__LEVEL_NEON;
#ifdef AFM__NEON_DOT
        k->name = "neon-dotprod";
#else
        k->name = "neon";
#endif
        k->prepare_q8 = afm__prepare_q8_neon;
        k->matmul[0] = afm__matmul_f32_neon; k->matmul[1] = afm__matmul_f16_neon; k->matmul[2] = afm__matmul_bf16_neon;
        k->matmul[3] = afm__matmul_q2b_neon; k->matmul[4] = afm__matmul_q4_neon; k->matmul[5] = afm__matmul_q8_neon;
        k->kv_scores = afm__kv_scores_neon;
        k->kv_values = afm__kv_values_neon;
    }
#else
    (void)max_level;
#endif
    return level;
}

/* Prepares tokens [t0, t1) of a (for a matrix of type `type`). */
static inline void afm__prepare_activations(const afm__kernels *k, afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    if (a->quant) k->prepare_q8(a, X, ldx, t0, t1);
    else k->prepare_f32(a, X, ldx, t0, t1);
}

/* Y[t*ldy + r] = W[r] . X[t] for r in [r0, r1), every token of a. */
static inline void afm__matmul_rows(const afm__kernels *k, const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    if (r0 >= r1 || a->n_tok <= 0) return;
    k->matmul[afm__type_slot(w->type)](w, a, Y, ldy, r0, r1);
}

static inline void afm__dequantize_row(const afm__kernels *k, const afm__wmat *w, int row, float *out) {
    k->dequant[afm__type_slot(w->type)](w, row, out);
}


/* ======================================================================================== */
/* ==== FILE LOADER (docs/FORMAT.md) ====================================================== */
/* ======================================================================================== */

#define AFM__HEADER_SIZE 128u
#define AFM__CONFIG_SIZE 128u
#define AFM__DIRENT_SIZE 128u
#define AFM__MAX_TENSORS 65536u
#define AFM__FLAG_TIED 1u
#define AFM__FLAG_QKNORM 2u
#define AFM__FLAG_KV_SCALES 4u

/* The adapted projections of a layer, in the order of FORMAT.md. */
enum { AFM__P_Q, AFM__P_K, AFM__P_V, AFM__P_WQ, AFM__P_WO, AFM__P_GATE, AFM__P_UP, AFM__P_DOWN, AFM__N_PROJ };
static const char *const afm__proj_names[AFM__N_PROJ] = { "q", "k", "v", "wq", "wo", "gate", "up", "down" };

typedef struct afm__tensor {
    char name[64];
    afm_type type;
    int n_dims;
    uint64_t dims[4];
    uint64_t n_elements, n_bytes, offset;
    uint32_t group_size;
    const void *data;
    afm__wmat w;          /* the matrix view kernels use (2-D tensors) */
} afm__tensor;

typedef struct afm__layer {
    int reuse;                               /* segment 1: attends over the last segment-0 cache */
    const float *attn_norm, *q_norm, *k_norm, *ffn_norm;
    const afm__tensor *qkv, *wq, *wo, *gate, *up, *down;
    const afm__tensor *lora_a[AFM__N_PROJ], *lora_b[AFM__N_PROJ];
    float k_scale, v_scale;                  /* int8 KV scales (segment 0, when the model has them) */
} afm__layer;

struct afm_model {
    afm_allocator alloc;
    afm__blob blob;
    afm_config config;
    int n_seg0;                              /* layers in segment 0 */
    int n_tensors;
    afm__tensor *tensors;
    afm__layer *layers;
    const afm__tensor *tok_embd;
    const float *out_norm;
    const void *tok_bytes;
    size_t tok_size;
    int tok_kind;
    uint64_t n_params, n_lora_params;
    afm__kernels kern;                       /* chosen for this CPU at load */
};

static uint32_t afm__rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t afm__rd64(const unsigned char *p) { return (uint64_t)afm__rd32(p) | (uint64_t)afm__rd32(p + 4) << 32; }
static float afm__rdf32(const unsigned char *p) {
    uint32_t u = afm__rd32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}


/* State of one load: the bytes, their name for messages, and the error buffer. */
typedef struct afm__loader {
    const char *name;
    const unsigned char *p;
    uint64_t size;
    char *err;
    size_t errn;
} afm__loader;

#define AFM__BAD(L, ...) afm__fail((L)->err, (L)->errn, AFM_ERR_FORMAT, __VA_ARGS__)

/* A section [off, off+len) must lie inside the file. */
static int afm__in_file(const afm__loader *L, uint64_t off, uint64_t len) {
    return off <= L->size && len <= L->size - off;
}

static afm_result afm__check_sections(afm__loader *L, const uint64_t off[4], const uint64_t len[4]) {
    static const char *const names[4] = { "config", "tokenizer", "directory", "data" };
    int i, j;
    for (i = 0; i < 4; i++) {
        if (len[i] == 0) continue;
        if (!afm__in_file(L, off[i], len[i]))
            return AFM__BAD(L, "%s: %s section [%llu, +%llu) extends past the end of the file (%llu bytes)", L->name,
                            names[i], (unsigned long long)off[i], (unsigned long long)len[i], (unsigned long long)L->size);
        if (off[i] < AFM__HEADER_SIZE)
            return AFM__BAD(L, "%s: %s section at offset %llu overlaps the 128-byte header", L->name, names[i], (unsigned long long)off[i]);
        for (j = 0; j < i; j++)
            if (len[j] && off[i] < off[j] + len[j] && off[j] < off[i] + len[i])
                return AFM__BAD(L, "%s: %s section [%llu, +%llu) overlaps %s section [%llu, +%llu)", L->name, names[i],
                                (unsigned long long)off[i], (unsigned long long)len[i], names[j],
                                (unsigned long long)off[j], (unsigned long long)len[j]);
    }
    return AFM_OK;
}

static afm_result afm__parse_config(afm__loader *L, const unsigned char *c, afm_config *cfg, uint32_t *flags) {
    struct { const char *name; uint32_t off, lo, hi; } ints[] = {
        { "vocab_size", 4, 1, 1u << 24 }, { "dim", 8, 1, 65536 }, { "n_layers", 12, 1, 1024 },
        { "n_reuse_layers", 16, 0, 1023 }, { "n_heads", 20, 1, 1024 }, { "n_kv_heads", 24, 1, 1024 },
        { "head_dim", 28, 2, 1024 }, { "ffn_dim", 32, 1, 1u << 20 }, { "context_length", 36, 1, 1u << 24 },
    };
    struct { const char *name; uint32_t off; float lo, hi; } floats[] = {
        { "rope_theta", 40, 1.0f, 1e30f }, { "norm_eps", 44, 0.0f, 1.0f }, { "qk_norm_eps", 48, 0.0f, 1.0f },
    };
    uint64_t cfg_off = (uint64_t)(c - L->p);
    uint32_t v, i;
    int *dst[] = { &cfg->vocab_size, &cfg->dim, &cfg->n_layers, &cfg->n_reuse_layers, &cfg->n_heads,
                   &cfg->n_kv_heads, &cfg->head_dim, &cfg->ffn_dim, &cfg->context_length };
    float *fdst[] = { &cfg->rope_theta, &cfg->norm_eps, &cfg->qk_norm_eps };

    if ((v = afm__rd32(c)) != 1)
        return AFM__BAD(L, "%s: offset %llu: config arch is %u, expected 1 (AFM two-segment)", L->name, (unsigned long long)cfg_off, v);
    for (i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        v = afm__rd32(c + ints[i].off);
        if (v < ints[i].lo || v > ints[i].hi)
            return AFM__BAD(L, "%s: offset %llu: config %s is %u, expected %u..%u", L->name,
                            (unsigned long long)(cfg_off + ints[i].off), ints[i].name, v, ints[i].lo, ints[i].hi);
        *dst[i] = (int)v;
    }
    for (i = 0; i < sizeof floats / sizeof floats[0]; i++) {
        float f = afm__rdf32(c + floats[i].off);
        if (!(f > floats[i].lo && f < floats[i].hi)) /* also false for NaN */
            return AFM__BAD(L, "%s: offset %llu: config %s is %g, expected a finite value in (%g, %g)", L->name,
                            (unsigned long long)(cfg_off + floats[i].off), floats[i].name, (double)f,
                            (double)floats[i].lo, (double)floats[i].hi);
        *fdst[i] = f;
    }
    if (cfg->n_reuse_layers >= cfg->n_layers)
        return AFM__BAD(L, "%s: config n_reuse_layers %d must be less than n_layers %d", L->name, cfg->n_reuse_layers, cfg->n_layers);
    if (cfg->n_heads % cfg->n_kv_heads)
        return AFM__BAD(L, "%s: config n_heads %d is not a multiple of n_kv_heads %d", L->name, cfg->n_heads, cfg->n_kv_heads);
    if (cfg->head_dim % 2)
        return AFM__BAD(L, "%s: config head_dim %d must be even for RoPE", L->name, cfg->head_dim);
    if ((v = afm__rd32(c + 52)) != 1)
        return AFM__BAD(L, "%s: offset %llu: config rope_layout is %u, expected 1 (half-split)", L->name, (unsigned long long)(cfg_off + 52), v);
    *flags = afm__rd32(c + 56);
    if ((*flags & ~7u) || !(*flags & AFM__FLAG_TIED) || !(*flags & AFM__FLAG_QKNORM))
        return AFM__BAD(L, "%s: offset %llu: config flags 0x%x: expected bits 0 and 1 set and only bits 0-2 used", L->name,
                        (unsigned long long)(cfg_off + 56), *flags);
    cfg->has_kv_scales = (*flags & AFM__FLAG_KV_SCALES) != 0;
    v = afm__rd32(c + 60);
    if (v > 4096)
        return AFM__BAD(L, "%s: offset %llu: config lora_rank is %u, expected 0..4096", L->name, (unsigned long long)(cfg_off + 60), v);
    cfg->lora_rank = (int)v;
    cfg->lora_alpha = afm__rdf32(c + 64);
    if (cfg->lora_rank && !(cfg->lora_alpha > -1e30f && cfg->lora_alpha < 1e30f))
        return AFM__BAD(L, "%s: offset %llu: config lora_alpha is not finite", L->name, (unsigned long long)(cfg_off + 64));
    if (c[72]) {
        for (i = 0; i < 40; i++) {
            unsigned char ch = c[72 + i];
            if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')))
                return AFM__BAD(L, "%s: offset %llu: signature byte 0x%02x is not a lowercase hex digit", L->name,
                                (unsigned long long)(cfg_off + 72 + i), ch);
            cfg->signature[i] = (char)ch;
        }
    } else {
        for (i = 0; i < 40; i++)
            if (c[72 + i]) return AFM__BAD(L, "%s: offset %llu: signature is neither 40 hex digits nor all zero", L->name, (unsigned long long)(cfg_off + 72 + i));
    }
    cfg->signature[40] = 0;
    return AFM_OK;
}

/* Where a directory entry goes: a global tensor, or (layer, field). */
enum { AFM__T_EMBD, AFM__T_OUT_NORM, AFM__T_KV_SCALE, AFM__T_N_GLOBAL };
enum { AFM__F_ATTN_NORM, AFM__F_QKV, AFM__F_WQ, AFM__F_Q_NORM, AFM__F_K_NORM, AFM__F_WO, AFM__F_FFN_NORM,
       AFM__F_GATE, AFM__F_UP, AFM__F_DOWN, AFM__F_LORA_A, AFM__F_LORA_B = AFM__F_LORA_A + AFM__N_PROJ,
       AFM__N_FIELDS = AFM__F_LORA_B + AFM__N_PROJ };
static const char *const afm__field_names[] = { "attn_norm", "qkv", "wq", "q_norm", "k_norm", "wo", "ffn_norm", "gate", "up", "down" };

/* Maps a tensor name to a slot: globals are 0..2, layer fields are 3 + layer * N_FIELDS + field. */
static int afm__slot_of(const char *name, int n_layers) {
    static const char *const globals[AFM__T_N_GLOBAL] = { "tok_embd", "out_norm", "kv_scale" };
    const char *p;
    int i, layer = 0;
    for (i = 0; i < AFM__T_N_GLOBAL; i++)
        if (!strcmp(name, globals[i])) return i;
    if (name[0] != 'l' || name[1] < '0' || name[1] > '9') return -1;
    p = name + 1;
    if (p[0] == '0' && p[1] != '.') return -1; /* no leading zeros: one spelling per tensor */
    while (*p >= '0' && *p <= '9') {
        layer = layer * 10 + (*p++ - '0');
        if (layer >= n_layers) return -1;
    }
    if (*p++ != '.') return -1;
    for (i = 0; i < (int)(sizeof afm__field_names / sizeof afm__field_names[0]); i++)
        if (!strcmp(p, afm__field_names[i])) return AFM__T_N_GLOBAL + layer * AFM__N_FIELDS + i;
    for (i = 0; i < AFM__N_PROJ; i++) {
        size_t n = strlen(afm__proj_names[i]);
        if (!strncmp(p, afm__proj_names[i], n) && p[n] == '.') {
            if (!strcmp(p + n + 1, "lora_a")) return AFM__T_N_GLOBAL + layer * AFM__N_FIELDS + AFM__F_LORA_A + i;
            if (!strcmp(p + n + 1, "lora_b")) return AFM__T_N_GLOBAL + layer * AFM__N_FIELDS + AFM__F_LORA_B + i;
        }
    }
    return -1;
}

static afm_result afm__parse_dirent(afm__loader *L, const unsigned char *e, uint64_t data_size, afm__tensor *t) {
    uint64_t e_off = (uint64_t)(e - L->p), n = 1;
    uint32_t type, nd, i;
    const char *what = NULL;
    memcpy(t->name, e, 64);
    if (!memchr(t->name, 0, 64))
        return AFM__BAD(L, "%s: offset %llu: tensor name is not NUL-terminated within 64 bytes", L->name, (unsigned long long)e_off);
    if (!t->name[0]) return AFM__BAD(L, "%s: offset %llu: tensor name is empty", L->name, (unsigned long long)e_off);
    for (i = 0; t->name[i]; i++) {
        char ch = t->name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '.'))
            return AFM__BAD(L, "%s: offset %llu: tensor name has illegal byte 0x%02x", L->name, (unsigned long long)(e_off + i), (unsigned char)ch);
    }
    type = afm__rd32(e + 64);
    nd = afm__rd32(e + 68);
    if (afm__type_slot((int)type) < 0)
        return AFM__BAD(L, "%s: tensor '%s': unknown type %u (this build knows F32=0, F16=1, BF16=2, Q2B=16, Q4=17, Q8=18)", L->name, t->name, type);
    if (nd < 1 || nd > 4) return AFM__BAD(L, "%s: tensor '%s': n_dims is %u, expected 1..4", L->name, t->name, nd);
    t->type = (afm_type)type;
    t->n_dims = (int)nd;
    for (i = 0; i < 4; i++) {
        t->dims[i] = afm__rd64(e + 72 + 8 * i);
        if (i < nd) {
            if (t->dims[i] < 1 || t->dims[i] > ((uint64_t)1 << 40)) what = "a dimension is 0 or absurd";
            else if (n > ((uint64_t)1 << 60) / t->dims[i]) what = "the element count overflows";
            else n *= t->dims[i];
        } else if (t->dims[i]) what = "an unused dimension is not 0";
        if (what) return AFM__BAD(L, "%s: tensor '%s': %s (dims[%u] = %llu)", L->name, t->name, what, i, (unsigned long long)t->dims[i]);
    }
    t->n_elements = n;
    t->offset = afm__rd64(e + 104);
    t->n_bytes = afm__rd64(e + 112);
    t->group_size = afm__rd32(e + 120);
    if (afm__type_is_quant(t->type)) {
        if (nd != 2) return AFM__BAD(L, "%s: tensor '%s': quantized type %s needs 2 dimensions, has %u", L->name, t->name, afm__type_name(t->type), nd);
        if (afm__group_shift(t->group_size) < 0)
            return AFM__BAD(L, "%s: tensor '%s': group_size is %u, expected 64, 128, 256 or 512 for %s", L->name, t->name, t->group_size, afm__type_name(t->type));
    } else if (t->group_size) return AFM__BAD(L, "%s: tensor '%s': group_size is %u, expected 0 for a float type", L->name, t->name, t->group_size);
    {
        uint64_t cols = t->dims[nd - 1], rows = n / cols, want = afm__type_size(t->type, rows, cols, t->group_size);
        if (want == 0 || t->n_bytes != want)
            return AFM__BAD(L, "%s: tensor '%s': size is %llu bytes, but %llu x %llu %s elements need %llu", L->name, t->name,
                            (unsigned long long)t->n_bytes, (unsigned long long)rows, (unsigned long long)cols, afm__type_name(t->type),
                            (unsigned long long)want);
    }
    if (afm__rd32(e + 124)) return AFM__BAD(L, "%s: tensor '%s': reserved field is not 0", L->name, t->name);
    if (t->offset % 64) return AFM__BAD(L, "%s: tensor '%s': data offset %llu is not a multiple of 64", L->name, t->name, (unsigned long long)t->offset);
    if (t->offset > data_size || t->n_bytes > data_size - t->offset)
        return AFM__BAD(L, "%s: tensor '%s': data [%llu, +%llu) extends past the data section (%llu bytes)", L->name, t->name,
                        (unsigned long long)t->offset, (unsigned long long)t->n_bytes, (unsigned long long)data_size);
    return AFM_OK;
}

static int afm__cmp_offset(const void *a, const void *b) {
    const afm__tensor *x = *(const afm__tensor *const *)a, *y = *(const afm__tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static afm_result afm__check_overlaps(afm__loader *L, const afm_allocator *a, const afm__tensor *tensors, int n) {
    const afm__tensor **order = (const afm__tensor **)afm__alloc(a, (size_t)n * sizeof *order);
    afm_result r = AFM_OK;
    int i;
    if (!order) return afm__fail(L->err, L->errn, AFM_ERR_NOMEM, "%s: out of memory", L->name);
    for (i = 0; i < n; i++) order[i] = &tensors[i];
    qsort(order, (size_t)n, sizeof *order, afm__cmp_offset);
    for (i = 1; i < n && r == AFM_OK; i++)
        if (order[i - 1]->offset + order[i - 1]->n_bytes > order[i]->offset)
            r = AFM__BAD(L, "%s: tensors '%s' [%llu, +%llu) and '%s' [%llu, +%llu) overlap", L->name, order[i - 1]->name,
                         (unsigned long long)order[i - 1]->offset, (unsigned long long)order[i - 1]->n_bytes, order[i]->name,
                         (unsigned long long)order[i]->offset, (unsigned long long)order[i]->n_bytes);
    afm__free(a, (void *)order);
    return r;
}

/* Checks one tensor's shape and type against what the config says it must be. */
static afm_result afm__expect(afm__loader *L, const afm__tensor *t, const char *name, uint64_t d0, uint64_t d1, int float_only, int lora) {
    int nd = d1 ? 2 : 1;
    if (!t) return AFM__BAD(L, "%s: required tensor '%s' is missing", L->name, name);
    if (t->n_dims != nd || t->dims[0] != d0 || (nd == 2 && t->dims[1] != d1)) {
        char want[64], got[96];
        if (nd == 2) snprintf(want, sizeof want, "[%llu, %llu]", (unsigned long long)d0, (unsigned long long)d1);
        else snprintf(want, sizeof want, "[%llu]", (unsigned long long)d0);
        if (t->n_dims == 1) snprintf(got, sizeof got, "[%llu]", (unsigned long long)t->dims[0]);
        else snprintf(got, sizeof got, "[%llu, %llu%s]", (unsigned long long)t->dims[0], (unsigned long long)t->dims[1], t->n_dims > 2 ? ", ..." : "");
        return AFM__BAD(L, "%s: tensor '%s': shape %s, expected %s", L->name, t->name, got, want);
    }
    if (float_only && t->type != AFM_TYPE_F32)
        return AFM__BAD(L, "%s: tensor '%s': type %s, expected F32", L->name, t->name, afm__type_name(t->type));
    if (lora && t->type != AFM_TYPE_F32 && t->type != AFM_TYPE_F16)
        return AFM__BAD(L, "%s: tensor '%s': type %s, expected F32 or F16 for LoRA", L->name, t->name, afm__type_name(t->type));
    return AFM_OK;
}

static afm_result afm__bind_tensors(afm__loader *L, afm_model *m) {
    const afm_config *c = &m->config;
    int n_slots = AFM__T_N_GLOBAL + c->n_layers * AFM__N_FIELDS, i, p;
    const afm__tensor **slot = (const afm__tensor **)afm__calloc(&m->alloc, (size_t)n_slots, sizeof *slot);
    uint64_t q = (uint64_t)c->n_heads * c->head_dim, kv = (uint64_t)c->n_kv_heads * c->head_dim;
    uint64_t d = (uint64_t)c->dim, f = (uint64_t)c->ffn_dim, r = (uint64_t)c->lora_rank;
    afm_result res = AFM_OK;
    char nm[64];

    if (!slot) return afm__fail(L->err, L->errn, AFM_ERR_NOMEM, "%s: out of memory", L->name);
    for (i = 0; i < m->n_tensors && !res; i++) {
        int s = afm__slot_of(m->tensors[i].name, c->n_layers);
        if (s < 0) res = AFM__BAD(L, "%s: unknown tensor '%s' (not in docs/FORMAT.md for a %d-layer model)", L->name, m->tensors[i].name, c->n_layers);
        else if (slot[s]) res = AFM__BAD(L, "%s: tensor '%s' appears twice in the directory", L->name, m->tensors[i].name);
        else slot[s] = &m->tensors[i];
    }
#define AFM__EXPECT(t, nm_, d0, d1, fo, lo) do { if (!res) res = afm__expect(L, t, nm_, d0, d1, fo, lo); } while (0)
    AFM__EXPECT(slot[AFM__T_EMBD], "tok_embd", (uint64_t)c->vocab_size, d, 0, 0);
    AFM__EXPECT(slot[AFM__T_OUT_NORM], "out_norm", d, 0, 1, 0);
    if (!res && c->has_kv_scales) AFM__EXPECT(slot[AFM__T_KV_SCALE], "kv_scale", (uint64_t)m->n_seg0, 2, 1, 0);
    if (!res && !c->has_kv_scales && slot[AFM__T_KV_SCALE])
        res = AFM__BAD(L, "%s: tensor 'kv_scale' is present but config flags bit 2 (int8 KV scales) is not set", L->name);
    for (i = 0; i < c->n_layers && !res; i++) {
        const afm__tensor **s = slot + AFM__T_N_GLOBAL + i * AFM__N_FIELDS;
        afm__layer *ly = &m->layers[i];
        int reuse = i >= m->n_seg0;
        static const int absent0[] = { AFM__F_WQ }, absent1[] = { AFM__F_QKV, AFM__F_K_NORM };
        const int *absent = reuse ? absent1 : absent0;
        int n_absent = reuse ? 2 : 1, k;
        ly->reuse = reuse;
#define AFM__LNAME(field) (snprintf(nm, sizeof nm, "l%d.%s", i, field), nm)
        AFM__EXPECT(s[AFM__F_ATTN_NORM], AFM__LNAME("attn_norm"), d, 0, 1, 0);
        AFM__EXPECT(s[AFM__F_Q_NORM], AFM__LNAME("q_norm"), (uint64_t)c->head_dim, 0, 1, 0);
        if (reuse) AFM__EXPECT(s[AFM__F_WQ], AFM__LNAME("wq"), q, d, 0, 0);
        else {
            AFM__EXPECT(s[AFM__F_QKV], AFM__LNAME("qkv"), q + 2 * kv, d, 0, 0);
            AFM__EXPECT(s[AFM__F_K_NORM], AFM__LNAME("k_norm"), (uint64_t)c->head_dim, 0, 1, 0);
        }
        AFM__EXPECT(s[AFM__F_WO], AFM__LNAME("wo"), d, q, 0, 0);
        AFM__EXPECT(s[AFM__F_FFN_NORM], AFM__LNAME("ffn_norm"), d, 0, 1, 0);
        AFM__EXPECT(s[AFM__F_GATE], AFM__LNAME("gate"), f, d, 0, 0);
        AFM__EXPECT(s[AFM__F_UP], AFM__LNAME("up"), f, d, 0, 0);
        AFM__EXPECT(s[AFM__F_DOWN], AFM__LNAME("down"), d, f, 0, 0);
        for (k = 0; k < n_absent && !res; k++)
            if (s[absent[k]])
                res = AFM__BAD(L, "%s: tensor '%s' does not belong in a segment-%d layer", L->name, s[absent[k]]->name, reuse);
        if (res) break;
        ly->attn_norm = (const float *)s[AFM__F_ATTN_NORM]->data;
        ly->q_norm = (const float *)s[AFM__F_Q_NORM]->data;
        ly->k_norm = reuse ? NULL : (const float *)s[AFM__F_K_NORM]->data;
        ly->ffn_norm = (const float *)s[AFM__F_FFN_NORM]->data;
        ly->qkv = s[AFM__F_QKV];
        ly->wq = s[AFM__F_WQ];
        ly->wo = s[AFM__F_WO];
        ly->gate = s[AFM__F_GATE];
        ly->up = s[AFM__F_UP];
        ly->down = s[AFM__F_DOWN];
        /* The embedded base adapter: all adapted projections of the layer, or none. */
        for (p = 0; p < AFM__N_PROJ && !res; p++) {
            uint64_t in = p == AFM__P_WO ? q : p == AFM__P_DOWN ? f : d;
            uint64_t out = p == AFM__P_Q || p == AFM__P_WQ ? q : p == AFM__P_K || p == AFM__P_V ? kv
                         : p == AFM__P_GATE || p == AFM__P_UP ? f : d;
            int wanted = c->lora_rank > 0 && (reuse ? (p != AFM__P_Q && p != AFM__P_K && p != AFM__P_V) : p != AFM__P_WQ);
            const afm__tensor *a = s[AFM__F_LORA_A + p], *b = s[AFM__F_LORA_B + p];
            if (!wanted && (a || b)) {
                res = AFM__BAD(L, "%s: tensor '%s' is not expected (lora_rank is %d, layer %d is in segment %d)", L->name,
                               (a ? a : b)->name, c->lora_rank, i, reuse);
                break;
            }
            if (!wanted) continue;
            snprintf(nm, sizeof nm, "l%d.%s.lora_a", i, afm__proj_names[p]);
            AFM__EXPECT(a, nm, r, in, 0, 1);
            snprintf(nm, sizeof nm, "l%d.%s.lora_b", i, afm__proj_names[p]);
            AFM__EXPECT(b, nm, out, r, 0, 1);
            ly->lora_a[p] = a;
            ly->lora_b[p] = b;
        }
#undef AFM__LNAME
    }
#undef AFM__EXPECT
    if (!res) {
        m->tok_embd = slot[AFM__T_EMBD];
        m->out_norm = (const float *)slot[AFM__T_OUT_NORM]->data;
        if (c->has_kv_scales) {
            const float *ks = (const float *)slot[AFM__T_KV_SCALE]->data;
            for (i = 0; i < m->n_seg0 && !res; i++) {
                float k = ks[2 * i], v = ks[2 * i + 1];
                if (!(k > 0 && k < FLT_MAX && v > 0 && v < FLT_MAX))
                    res = AFM__BAD(L, "%s: tensor 'kv_scale': layer %d scales (%g, %g) must be finite and positive", L->name, i, (double)k, (double)v);
                m->layers[i].k_scale = k;
                m->layers[i].v_scale = v;
            }
        }
        for (i = 0; i < m->n_tensors; i++) {
            int s = afm__slot_of(m->tensors[i].name, c->n_layers);
            int is_lora = s >= AFM__T_N_GLOBAL && (s - AFM__T_N_GLOBAL) % AFM__N_FIELDS >= AFM__F_LORA_A;
            if (s == AFM__T_KV_SCALE) continue; /* quantizer state, not a parameter */
            if (is_lora) m->n_lora_params += m->tensors[i].n_elements;
            else m->n_params += m->tensors[i].n_elements;
        }
    }
    afm__free(&m->alloc, (void *)slot);
    return res;
}

/* What the container of a model or adapter file holds once its header, sections and tensor
   directory have been checked (docs/FORMAT.md). The caller owns `tensors`. */
typedef struct afm__container {
    const unsigned char *config;   /* at least 128 bytes */
    const unsigned char *extra;    /* the tokenizer (model) or metadata (adapter) bytes, or NULL */
    uint64_t extra_off, extra_len;
    uint32_t extra_kind;
    afm__tensor *tensors;
    int n_tensors;
} afm__container;

static afm_result afm__parse_container(afm__loader *L, const char *magic, const afm_allocator *a, afm__container *c) {
    const unsigned char *h = L->p;
    uint64_t off[4], len[4], file_size, i;
    uint32_t v, n_tensors;
    afm_result r;

    memset(c, 0, sizeof *c);
    if (L->size < AFM__HEADER_SIZE)
        return AFM__BAD(L, "%s: file is %llu bytes, shorter than the 128-byte header", L->name, (unsigned long long)L->size);
    if (memcmp(h, magic, 8)) {
        if (!memcmp(h, "AFMMODEL", 8) || !memcmp(h, "AFMADAPT", 8))
            return AFM__BAD(L, "%s: offset 0: this is %s file, expected \"%.8s\"", L->name, h[3] == 'M' ? "a model" : "an adapter", magic);
        return AFM__BAD(L, "%s: offset 0: bad magic (expected \"%.8s\"); not an afm file", L->name, magic);
    }
    if ((v = afm__rd32(h + 8)) != 1)
        return AFM__BAD(L, "%s: offset 8: format version %u, this build reads version 1", L->name, v);
    if ((v = afm__rd32(h + 12)) != AFM__HEADER_SIZE)
        return AFM__BAD(L, "%s: offset 12: header_size %u, expected 128", L->name, v);
    file_size = afm__rd64(h + 16);
    if (file_size != L->size)
        return AFM__BAD(L, "%s: offset 16: header says the file is %llu bytes, but it is %llu (truncated or padded?)", L->name,
                        (unsigned long long)file_size, (unsigned long long)L->size);
    off[0] = afm__rd64(h + 24); len[0] = afm__rd64(h + 32);
    off[1] = afm__rd64(h + 40); len[1] = afm__rd64(h + 48);
    off[2] = afm__rd64(h + 56); len[2] = afm__rd64(h + 64);
    n_tensors = afm__rd32(h + 72);
    off[3] = afm__rd64(h + 80);
    len[3] = afm__rd64(h + 88);
    if (afm__rd32(h + 76)) return AFM__BAD(L, "%s: offset 76: reserved field is not 0", L->name);
    for (i = 96; i < 128; i++)
        if (h[i]) return AFM__BAD(L, "%s: offset %llu: reserved header byte is not 0", L->name, (unsigned long long)i);
    if (len[0] < AFM__CONFIG_SIZE)
        return AFM__BAD(L, "%s: offset 32: config_size %llu, expected at least 128", L->name, (unsigned long long)len[0]);
    if (len[1] != 0 && len[1] < 16)
        return AFM__BAD(L, "%s: offset 48: tokenizer_size %llu, expected 0 or at least 16", L->name, (unsigned long long)len[1]);
    if (len[1] == 0 && off[1] != 0)
        return AFM__BAD(L, "%s: offset 40: tokenizer_offset is %llu but tokenizer_size is 0", L->name, (unsigned long long)off[1]);
    if (n_tensors < 1 || n_tensors > AFM__MAX_TENSORS)
        return AFM__BAD(L, "%s: offset 72: n_tensors is %u, expected 1..%u", L->name, n_tensors, AFM__MAX_TENSORS);
    if (len[2] != (uint64_t)n_tensors * AFM__DIRENT_SIZE)
        return AFM__BAD(L, "%s: offset 64: dir_size %llu, expected n_tensors x 128 = %llu", L->name, (unsigned long long)len[2],
                        (unsigned long long)n_tensors * AFM__DIRENT_SIZE);
    if (off[3] % 64) return AFM__BAD(L, "%s: offset 80: data_offset %llu is not a multiple of 64", L->name, (unsigned long long)off[3]);
    if ((r = afm__check_sections(L, off, len)) != AFM_OK) return r;

    c->config = h + off[0];
    if (len[1]) {
        uint64_t n = afm__rd64(h + off[1] + 8);
        if (n > len[1] - 16)
            return AFM__BAD(L, "%s: offset %llu: section length %llu exceeds its section (%llu bytes)", L->name,
                            (unsigned long long)(off[1] + 8), (unsigned long long)n, (unsigned long long)(len[1] - 16));
        c->extra_kind = afm__rd32(h + off[1]);
        c->extra = h + off[1] + 16;
        c->extra_off = off[1];
        c->extra_len = n;
    }
    c->n_tensors = (int)n_tensors;
    c->tensors = (afm__tensor *)afm__calloc(a, n_tensors, sizeof *c->tensors);
    if (!c->tensors) return afm__fail(L->err, L->errn, AFM_ERR_NOMEM, "%s: out of memory", L->name);
    for (i = 0; i < n_tensors; i++) {
        afm__tensor *t = &c->tensors[i];
        if ((r = afm__parse_dirent(L, h + off[2] + i * AFM__DIRENT_SIZE, len[3], t)) != AFM_OK) return r;
        t->data = h + off[3] + t->offset;
        if (t->n_dims == 2 && t->dims[0] < (1u << 30) && t->dims[1] < (1u << 30))
            afm__wmat_init(&t->w, (int)t->type, t->data, t->n_bytes, (int)t->dims[0], (int)t->dims[1], (int)t->group_size);
    }
    return afm__check_overlaps(L, a, c->tensors, c->n_tensors);
}

static afm_result afm__parse_model(afm__loader *L, afm_model *m) {
    afm__container c;
    uint32_t flags = 0;
    afm_result r = afm__parse_container(L, "AFMMODEL", &m->alloc, &c);
    m->tensors = c.tensors;
    m->n_tensors = c.n_tensors;
    if (r != AFM_OK) return r;
    if ((r = afm__parse_config(L, c.config, &m->config, &flags)) != AFM_OK) return r;
    m->n_seg0 = m->config.n_layers - m->config.n_reuse_layers;
    if (c.extra) {
        if (c.extra_kind != 1 && c.extra_kind != 2)
            return AFM__BAD(L, "%s: offset %llu: tokenizer kind %u, expected 1 (SentencePiece) or 2 (tokenizer.json)", L->name,
                            (unsigned long long)c.extra_off, c.extra_kind);
        m->tok_kind = (int)c.extra_kind;
        m->tok_bytes = c.extra;
        m->tok_size = (size_t)c.extra_len;
    }
    m->layers = (afm__layer *)afm__calloc(&m->alloc, (size_t)m->config.n_layers, sizeof *m->layers);
    if (!m->layers) return afm__fail(L->err, L->errn, AFM_ERR_NOMEM, "%s: out of memory", L->name);
    return afm__bind_tensors(L, m);
}

static afm_result afm__model_finish_load(afm_model *m, const char *name, const afm_load_params *params, afm_model **out, char *err, size_t errn) {
    afm__loader L;
    afm_result r;
    (void)params;
    L.name = name;
    L.p = m->blob.data;
    L.size = m->blob.size;
    L.err = err;
    L.errn = errn;
    r = afm__parse_model(&L, m);
    if (r != AFM_OK) { afm_model_free(m); return r; }
    *out = m;
    return AFM_OK;
}

static afm_model *afm__model_new(const afm_load_params *params) {
    const afm_allocator *a = params && params->allocator ? params->allocator : &afm__malloc_allocator;
    afm_model *m = (afm_model *)afm__alloc(a, sizeof *m);
    if (m) {
        memset(m, 0, sizeof *m);
        m->alloc = *a;
        afm__select_kernels(&m->kern, AFM__LEVEL_MAX);
    }
    return m;
}

AFMDEF afm_result afm_model_load_file(const char *path, const afm_load_params *params, afm_model **out, char *err, size_t errn) {
    afm_model *m;
    afm_result r;
    if (err && errn) err[0] = 0;
    if (!out) return afm__fail(err, errn, AFM_ERR_ARG, "afm_model_load_file: out is NULL");
    *out = NULL;
    if (!path) return afm__fail(err, errn, AFM_ERR_ARG, "afm_model_load_file: path is NULL");
    if (!(m = afm__model_new(params))) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: out of memory", path);
    r = afm__blob_open(&m->alloc, path, params ? params->no_mmap : 0, &m->blob, err, errn);
    if (r != AFM_OK) { afm_model_free(m); return r; }
    return afm__model_finish_load(m, path, params, out, err, errn);
}

AFMDEF afm_result afm_model_load_memory(const void *data, size_t size, const afm_load_params *params, afm_model **out, char *err, size_t errn) {
    afm_model *m;
    if (err && errn) err[0] = 0;
    if (!out) return afm__fail(err, errn, AFM_ERR_ARG, "afm_model_load_memory: out is NULL");
    *out = NULL;
    if (!data && size) return afm__fail(err, errn, AFM_ERR_ARG, "afm_model_load_memory: data is NULL");
    if (!(m = afm__model_new(params))) return afm__fail(err, errn, AFM_ERR_NOMEM, "<memory>: out of memory");
    if ((uintptr_t)data % 64) {
        /* Tensors are 64-byte aligned relative to the file start; a misaligned buffer is copied once. */
        m->blob.owned = afm__alloc(&m->alloc, size ? size : 1);
        if (!m->blob.owned) { afm_model_free(m); return afm__fail(err, errn, AFM_ERR_NOMEM, "<memory>: out of memory copying %llu bytes", (unsigned long long)size); }
        if (size) memcpy(m->blob.owned, data, size);
        data = m->blob.owned;
    }
    m->blob.data = (const unsigned char *)data;
    m->blob.size = size;
    return afm__model_finish_load(m, "<memory>", params, out, err, errn);
}

AFMDEF void afm_model_free(afm_model *m) {
    afm_allocator a;
    if (!m) return;
    a = m->alloc;
    afm__free(&a, m->tensors);
    afm__free(&a, m->layers);
    afm__blob_close(&a, &m->blob);
    afm__free(&a, m);
}

AFMDEF const afm_config *afm_model_config(const afm_model *m) { return m ? &m->config : NULL; }
AFMDEF int afm_model_n_tensors(const afm_model *m) { return m ? m->n_tensors : 0; }

AFMDEF afm_result afm_model_tensor(const afm_model *m, int i, afm_tensor_info *info) {
    const afm__tensor *t;
    if (!m || !info || i < 0 || i >= m->n_tensors) return AFM_ERR_ARG;
    t = &m->tensors[i];
    info->name = t->name;
    info->type = t->type;
    info->n_dims = t->n_dims;
    memcpy(info->dims, t->dims, sizeof info->dims);
    info->n_elements = t->n_elements;
    info->n_bytes = t->n_bytes;
    return AFM_OK;
}

AFMDEF uint64_t afm_model_n_params(const afm_model *m, uint64_t *lora) {
    if (lora) *lora = m ? m->n_lora_params : 0;
    return m ? m->n_params : 0;
}

AFMDEF const void *afm_model_tokenizer_bytes(const afm_model *m, int *kind, size_t *size) {
    if (kind) *kind = m ? m->tok_kind : 0;
    if (size) *size = m ? m->tok_size : 0;
    return m ? m->tok_bytes : NULL;
}


/* ======================================================================================== */
/* ==== JSON: a bounds-checked, non-recursive reader (adapter metadata, tokenizer.json) ==== */
/* ======================================================================================== */

/* The document becomes a flat array of tokens in document order; a container's `end` is the
   index just past its last descendant, so siblings are found by jumping, never by recursion. */
enum { AFM__J_OBJ = 1, AFM__J_ARR, AFM__J_STR, AFM__J_PRIM };
typedef struct afm__jtok { int type; size_t start, len; int end; } afm__jtok;
typedef struct afm__json { const char *src; afm__jtok *tok; int n; } afm__json;

#define AFM__JSON_MAX_DEPTH 128

static int afm__json_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int afm__json_push(const afm_allocator *a, afm__json *j, int *cap, int type, size_t start, size_t len) {
    if (j->n == *cap) {
        afm__jtok *nt;
        if (*cap > (1 << 26)) return 0;
        nt = (afm__jtok *)afm__alloc(a, (size_t)*cap * 2 * sizeof *nt);
        if (!nt) return 0;
        memcpy(nt, j->tok, (size_t)*cap * sizeof *nt);
        afm__free(a, j->tok);
        j->tok = nt;
        *cap *= 2;
    }
    j->tok[j->n].type = type;
    j->tok[j->n].start = start;
    j->tok[j->n].len = len;
    j->tok[j->n].end = j->n + 1;
    return ++j->n;
}

/* Parses src into tokens; j->tok must be freed by the caller (also on failure). Returns 0 and
   writes a message with the byte offset on bad input. Keys are string tokens, each followed by
   its value. */
static int afm__json_parse(const afm_allocator *a, const char *src, size_t n, afm__json *j, char *err, size_t errn) {
    int stack[AFM__JSON_MAX_DEPTH], depth = 0, cap = 64, after_value = 0;
    unsigned char want_key[AFM__JSON_MAX_DEPTH];
    size_t i = 0;
    j->src = src; j->n = 0;
    j->tok = (afm__jtok *)afm__alloc(a, (size_t)cap * sizeof *j->tok);
#define AFM__JERR(msg) do { afm__fail(err, errn, AFM_ERR_FORMAT, "offset %llu: %s", (unsigned long long)i, msg); return 0; } while (0)
#define AFM__JPUSH(type, st, ln) do { if (!afm__json_push(a, j, &cap, type, st, ln)) AFM__JERR("out of memory"); } while (0)
    if (!j->tok) AFM__JERR("out of memory");
    for (;;) {
        char c;
        int top;
        while (i < n && afm__json_ws(src[i])) i++;
        if (i == n) {
            if (depth || !after_value) AFM__JERR("unexpected end of JSON");
            return 1;
        }
        c = src[i];
        top = depth ? stack[depth - 1] : -1;
        if (after_value) {
            if (!depth) AFM__JERR("text after the JSON value");
            if (c == ',') {
                i++;
                after_value = 0;
                want_key[depth - 1] = j->tok[top].type == AFM__J_OBJ;
                continue;
            }
        }
        if (c == '}' || c == ']') {
            /* closes the open container after a value, or an empty one */
            if (!depth || (c == '}') != (j->tok[top].type == AFM__J_OBJ) || (!after_value && j->n != top + 1))
                AFM__JERR(after_value || !depth ? "unexpected closing bracket" : "trailing comma or missing value");
            j->tok[top].end = j->n;
            j->tok[top].len = i + 1 - j->tok[top].start;
            depth--;
            i++;
            after_value = 1;
            continue;
        }
        if (after_value) AFM__JERR("expected ',' or a closing bracket");
        if (c == '"') {
            size_t k = i + 1;
            while (k < n && src[k] != '"') {
                if ((unsigned char)src[k] < 0x20) { i = k; AFM__JERR("control character in a string"); }
                k += src[k] == '\\' ? 2 : 1;
            }
            if (k >= n) AFM__JERR("unterminated string");
            AFM__JPUSH(AFM__J_STR, i + 1, k - i - 1);
            i = k + 1;
            if (depth && want_key[depth - 1]) {
                while (i < n && afm__json_ws(src[i])) i++;
                if (i >= n || src[i] != ':') AFM__JERR("expected ':' after an object key");
                i++;
                want_key[depth - 1] = 0;
                continue;
            }
        } else if (depth && want_key[depth - 1]) {
            AFM__JERR("object key is not a string");
        } else if (c == '{' || c == '[') {
            if (depth == AFM__JSON_MAX_DEPTH) AFM__JERR("JSON nested too deeply");
            AFM__JPUSH(c == '{' ? AFM__J_OBJ : AFM__J_ARR, i, 0);
            stack[depth] = j->n - 1;
            want_key[depth++] = c == '{';
            i++;
            continue;
        } else {
            size_t k = i;
            while (k < n && !afm__json_ws(src[k]) && src[k] != ',' && src[k] != '}' && src[k] != ']' && src[k] != ':') k++;
            if (!((k - i == 4 && !memcmp(src + i, "true", 4)) || (k - i == 5 && !memcmp(src + i, "false", 5)) ||
                  (k - i == 4 && !memcmp(src + i, "null", 4)) || (k > i && (c == '-' || (c >= '0' && c <= '9')))))
                AFM__JERR("expected a value");
            AFM__JPUSH(AFM__J_PRIM, i, k - i);
            i = k;
        }
        after_value = 1;
    }
#undef AFM__JPUSH
#undef AFM__JERR
}

/* Index of the value of `key` in object token obj, or -1. */
static int afm__json_get(const afm__json *j, int obj, const char *key) {
    int c;
    size_t kl = strlen(key);
    if (obj < 0 || j->tok[obj].type != AFM__J_OBJ) return -1;
    for (c = obj + 1; c < j->tok[obj].end; c = j->tok[j->tok[c].end].end) {
        if (j->tok[c].len == kl && !memcmp(j->src + j->tok[c].start, key, kl)) return j->tok[c].end;
    }
    return -1;
}

/* Copies a string token's value into out (at most cap-1 bytes, NUL-terminated), decoding the
   simple escapes. Returns 0 if the token is not a string, contains \u escapes beyond ASCII, or is too long. */
static int afm__json_str(const afm__json *j, int t, char *out, size_t cap) {
    size_t i, o = 0;
    const char *s;
    if (t < 0 || j->tok[t].type != AFM__J_STR) return 0;
    s = j->src + j->tok[t].start;
    for (i = 0; i < j->tok[t].len; i++) {
        char c = s[i];
        if (c == '\\') {
            c = s[++i];
            if (c == 'n') c = '\n'; else if (c == 't') c = '\t'; else if (c == 'r') c = '\r';
            else if (c == 'b') c = '\b'; else if (c == 'f') c = '\f';
            else if (c == 'u') {
                unsigned v = 0, k;
                if (i + 4 >= j->tok[t].len) return 0;
                for (k = 1; k <= 4; k++) {
                    char h = s[i + k];
                    v = v * 16 + (unsigned)(h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : 99);
                }
                if (v > 127) return 0;
                c = (char)v;
                i += 4;
            } else if (c != '"' && c != '\\' && c != '/') return 0;
        }
        if (o + 1 >= cap) return 0;
        out[o++] = c;
    }
    out[o] = 0;
    return 1;
}

/* An integer token in [lo, hi]; 0 if the token is not such an integer. */
static int afm__json_int(const afm__json *j, int t, long lo, long hi, long *v) {
    char buf[32], *end;
    if (t < 0 || j->tok[t].type != AFM__J_PRIM || j->tok[t].len >= sizeof buf) return 0;
    memcpy(buf, j->src + j->tok[t].start, j->tok[t].len);
    buf[j->tok[t].len] = 0;
    *v = strtol(buf, &end, 10);
    return *end == 0 && end != buf && *v >= lo && *v <= hi;
}

/* ======================================================================================== */
/* ==== LORA ADAPTERS: .afma files, .fmadapter packages, the embedded base adapter ======= */
/* ======================================================================================== */

struct afm_adapter {
    const afm_model *model;
    afm_allocator alloc;
    afm__blob blob;                /* the .afma file or the package's adapter_weights.bin */
    afm__tensor *tensors;          /* owned; NULL for the embedded adapter */
    int n_tensors;
    const afm__tensor **a, **b;    /* [n_layers * AFM__N_PROJ]; NULL where not adapted */
    int rank, draft_token_count;
    float alpha, scale;
    char identifier[128], signature[41];
    char *metadata;                /* JSON text, NUL-terminated, or NULL */
};

/* Which projections layer i adapts: segment 0 the three of the fused QKV, segment 1 its query. */
static int afm__adapted(const afm_model *m, int layer, int p) {
    int reuse = layer >= m->n_seg0;
    return reuse ? (p != AFM__P_Q && p != AFM__P_K && p != AFM__P_V) : p != AFM__P_WQ;
}

static void afm__lora_dims(const afm_model *m, int p, uint64_t *in, uint64_t *out) {
    const afm_config *c = &m->config;
    uint64_t q = (uint64_t)c->n_heads * c->head_dim, kv = (uint64_t)c->n_kv_heads * c->head_dim;
    *in = p == AFM__P_WO ? q : p == AFM__P_DOWN ? (uint64_t)c->ffn_dim : (uint64_t)c->dim;
    *out = p == AFM__P_Q || p == AFM__P_WQ ? q : p == AFM__P_K || p == AFM__P_V ? kv
         : p == AFM__P_GATE || p == AFM__P_UP ? (uint64_t)c->ffn_dim : (uint64_t)c->dim;
}

static afm_adapter *afm__adapter_new(const afm_model *m) {
    afm_adapter *ad = (afm_adapter *)afm__calloc(&m->alloc, 1, sizeof *ad);
    if (!ad) return NULL;
    ad->model = m;
    ad->alloc = m->alloc;
    ad->a = (const afm__tensor **)afm__calloc(&m->alloc, (size_t)m->config.n_layers * AFM__N_PROJ, sizeof *ad->a);
    ad->b = (const afm__tensor **)afm__calloc(&m->alloc, (size_t)m->config.n_layers * AFM__N_PROJ, sizeof *ad->b);
    ad->draft_token_count = 5;
    if (!ad->a || !ad->b) { afm_adapter_free(ad); return NULL; }
    return ad;
}

/* Whether n little-endian halves (F16) or singles (F32) contain an infinity or NaN: all-ones
   exponent. Words of 64 bits at a time, so a 133 MB adapter takes milliseconds. */
static int afm__has_nonfinite(const unsigned char *p, uint64_t n, int f16) {
    const uint64_t m = f16 ? 0x7c007c007c007c00ull : 0x7f8000007f800000ull;
    const uint64_t lo = f16 ? 0x0001000100010001ull : 0x0000000100000001ull;
    const uint64_t hi = f16 ? 0x8000800080008000ull : 0x8000000080000000ull;
    uint64_t bytes = n * (f16 ? 2 : 4), i, w, v, acc = 0;
    for (i = 0; i + 8 <= bytes; i += 8) {
        memcpy(&w, p + i, 8);          /* lanes are whole values: host byte order is irrelevant */
        v = (w & m) ^ m;               /* a lane is 0 where the exponent is all ones */
        acc |= (v - lo) & ~v & hi;     /* "has a zero lane" */
    }
    for (; i < bytes; i += f16 ? 2 : 4) {
        uint32_t e = f16 ? (uint32_t)(p[i + 1] & 0x7c) : (uint32_t)((p[i + 3] & 0x7f) << 1 | p[i + 2] >> 7);
        acc |= e == (f16 ? 0x7cu : 0xffu);
    }
    return acc != 0;
}

/* Refuses LoRA weights that are NaN or infinite: they would poison every token silently. */
static afm_result afm__adapter_check_finite(const afm_adapter *ad, const char *name, char *err, size_t errn) {
    int i;
    for (i = 0; i < ad->model->config.n_layers * AFM__N_PROJ * 2; i++) {
        const afm__tensor *t = (i & 1 ? ad->b : ad->a)[i >> 1];
        if (t && afm__has_nonfinite((const unsigned char *)t->data, t->n_elements, t->type == AFM_TYPE_F16))
            return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: tensor %s (data at offset %llu) contains NaN or infinity", name, t->name, (unsigned long long)t->offset);
    }
    return AFM_OK;
}

AFMDEF void afm_adapter_free(afm_adapter *ad) {
    afm_allocator a;
    if (!ad) return;
    a = ad->alloc;
    afm__free(&a, (void *)ad->a);
    afm__free(&a, (void *)ad->b);
    afm__free(&a, ad->tensors);
    afm__free(&a, ad->metadata);
    afm__blob_close(&a, &ad->blob);
    afm__free(&a, ad);
}

AFMDEF afm_result afm_adapter_embedded(afm_model *m, afm_adapter **out, char *err, size_t errn) {
    afm_adapter *ad;
    int i, p;
    if (err && errn) err[0] = 0;
    if (!out || !m) return afm__fail(err, errn, AFM_ERR_ARG, "afm_adapter_embedded: NULL argument");
    *out = NULL;
    if (!m->config.lora_rank) return afm__fail(err, errn, AFM_ERR_ARG, "the model has no embedded base adapter (lora_rank is 0)");
    if (!(ad = afm__adapter_new(m))) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    for (i = 0; i < m->config.n_layers; i++)
        for (p = 0; p < AFM__N_PROJ; p++) {
            ad->a[i * AFM__N_PROJ + p] = m->layers[i].lora_a[p];
            ad->b[i * AFM__N_PROJ + p] = m->layers[i].lora_b[p];
        }
    ad->rank = m->config.lora_rank;
    ad->alpha = m->config.lora_alpha;
    ad->scale = ad->alpha / (float)ad->rank;
    snprintf(ad->identifier, sizeof ad->identifier, "base_adapter");
    memcpy(ad->signature, m->config.signature, sizeof ad->signature);
    *out = ad;
    return AFM_OK;
}

/* ---- .afma: the adapter file (docs/FORMAT.md, second part) ---- */
static afm_result afm__parse_adapter(afm__loader *L, afm_adapter *ad) {
    const afm_model *m = ad->model;
    const afm_config *c = &m->config;
    afm__container ct;
    const unsigned char *cf;
    int base[8], want[8], i, k;
    char nm[64];
    uint32_t v;
    afm_result r = afm__parse_container(L, "AFMADAPT", &ad->alloc, &ct);
    ad->tensors = ct.tensors;
    ad->n_tensors = ct.n_tensors;
    if (r != AFM_OK) return r;
    cf = ct.config;
    if ((v = afm__rd32(cf)) != 2) return AFM__BAD(L, "%s: config kind is %u, expected 2 (LoRA adapter)", L->name, v);
    v = afm__rd32(cf + 4);
    if (v < 1 || v > 4096) return AFM__BAD(L, "%s: config rank is %u, expected 1..4096", L->name, v);
    ad->rank = (int)v;
    ad->alpha = afm__rdf32(cf + 8);
    if (!(ad->alpha > -1e30f && ad->alpha < 1e30f)) return AFM__BAD(L, "%s: config alpha is not finite", L->name);
    ad->scale = ad->alpha / (float)ad->rank;
    v = afm__rd32(cf + 12);
    if (v > 64) return AFM__BAD(L, "%s: config draft_token_count is %u, expected 0..64", L->name, v);
    if (v) ad->draft_token_count = (int)v;
    want[0] = c->vocab_size; want[1] = c->dim; want[2] = c->n_layers; want[3] = c->n_reuse_layers;
    want[4] = c->n_heads; want[5] = c->n_kv_heads; want[6] = c->head_dim; want[7] = c->ffn_dim;
    for (i = 0; i < 8; i++) {
        static const char *const names[8] = { "vocab_size", "dim", "n_layers", "n_reuse_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim" };
        base[i] = (int)afm__rd32(cf + 16 + 4 * i);
        if (base[i] != want[i])
            return AFM__BAD(L, "%s: adapter was made for a base with %s %d, this model has %d", L->name, names[i], base[i], want[i]);
    }
    if (cf[48]) {
        for (i = 0; i < 40; i++) {
            unsigned char ch = cf[48 + i];
            if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')))
                return AFM__BAD(L, "%s: signature byte 0x%02x is not a lowercase hex digit", L->name, ch);
            ad->signature[i] = (char)ch;
        }
        if (c->signature[0] && memcmp(ad->signature, c->signature, 40))
            return AFM__BAD(L, "%s: adapter is for base model %s, this model is %s", L->name, ad->signature, c->signature);
    }
    if (ct.extra) {
        if (ct.extra_kind != 3) return AFM__BAD(L, "%s: metadata section kind %u, expected 3 (JSON)", L->name, ct.extra_kind);
        ad->metadata = (char *)afm__alloc(&ad->alloc, (size_t)ct.extra_len + 1);
        if (!ad->metadata) return afm__fail(L->err, L->errn, AFM_ERR_NOMEM, "%s: out of memory", L->name);
        memcpy(ad->metadata, ct.extra, (size_t)ct.extra_len);
        ad->metadata[ct.extra_len] = 0;
    }
    for (k = 0; k < ct.n_tensors; k++) {
        const afm__tensor *t = &ct.tensors[k];
        int s = afm__slot_of(t->name, c->n_layers), layer, field, p, is_b;
        uint64_t in, out;
        if (s < AFM__T_N_GLOBAL || (s - AFM__T_N_GLOBAL) % AFM__N_FIELDS < AFM__F_LORA_A)
            return AFM__BAD(L, "%s: tensor '%s' does not belong in an adapter (only l{i}.{proj}.lora_a/b)", L->name, t->name);
        layer = (s - AFM__T_N_GLOBAL) / AFM__N_FIELDS;
        field = (s - AFM__T_N_GLOBAL) % AFM__N_FIELDS;
        is_b = field >= AFM__F_LORA_B;
        p = field - (is_b ? AFM__F_LORA_B : AFM__F_LORA_A);
        if (!afm__adapted(m, layer, p))
            return AFM__BAD(L, "%s: tensor '%s': layer %d (segment %d) has no projection '%s'", L->name, t->name, layer, layer >= m->n_seg0, afm__proj_names[p]);
        if ((is_b ? ad->b : ad->a)[layer * AFM__N_PROJ + p])
            return AFM__BAD(L, "%s: tensor '%s' appears twice in the directory", L->name, t->name);
        afm__lora_dims(m, p, &in, &out);
        if ((r = afm__expect(L, t, t->name, is_b ? out : (uint64_t)ad->rank, is_b ? (uint64_t)ad->rank : in, 0, 1)) != AFM_OK) return r;
        (is_b ? ad->b : ad->a)[layer * AFM__N_PROJ + p] = t;
    }
    for (i = 0; i < c->n_layers; i++)
        for (k = 0; k < AFM__N_PROJ; k++)
            if (afm__adapted(m, i, k) && (!ad->a[i * AFM__N_PROJ + k] || !ad->b[i * AFM__N_PROJ + k])) {
                snprintf(nm, sizeof nm, "l%d.%s.lora_%c", i, afm__proj_names[k], ad->a[i * AFM__N_PROJ + k] ? 'b' : 'a');
                return AFM__BAD(L, "%s: required tensor '%s' is missing", L->name, nm);
            }
    return AFM_OK;
}

/* ---- .fmadapter: Apple's package (AFM_SPEC section 6) ---- */

/* `fmadapter-NAME-VERSION` with NAME and VERSION made of [A-Za-z0-9_]: a hyphen inside NAME
   makes Apple's loader misread the identifier, so it is refused here too. */
static int afm__fm_identifier_ok(const char *id) {
    const char *p = id;
    int parts = 0;
    if (strncmp(p, "fmadapter-", 10)) return 0;
    p += 10;
    for (;;) {
        const char *q = p;
        while ((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') || (*q >= '0' && *q <= '9') || *q == '_') q++;
        if (q == p) return 0;
        parts++;
        if (*q == 0) return parts == 2;
        if (*q != '-' || parts == 2) return 0;
        p = q + 1;
    }
}

static afm_result afm__fm_metadata(afm_adapter *ad, const char *json, size_t n, const char *name, char *err, size_t errn) {
    afm__json j;
    char msg[160], sig[64];
    long v;
    int t;
    const afm_config *c = &ad->model->config;
    if (!afm__json_parse(&ad->alloc, json, n, &j, msg, sizeof msg)) {
        afm__free(&ad->alloc, j.tok);
        return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/metadata.json: %s", name, msg);
    }
#define AFM__FMERR(...) do { afm__fail(err, errn, AFM_ERR_FORMAT, __VA_ARGS__); afm__free(&ad->alloc, j.tok); return AFM_ERR_FORMAT; } while (0)
    if (j.tok[0].type != AFM__J_OBJ) AFM__FMERR("%s/metadata.json: not a JSON object", name);
    t = afm__json_get(&j, 0, "adapterIdentifier");
    if (!afm__json_str(&j, t, ad->identifier, sizeof ad->identifier))
        AFM__FMERR("%s/metadata.json: adapterIdentifier is missing or not a short string", name);
    if (!afm__fm_identifier_ok(ad->identifier))
        AFM__FMERR("%s/metadata.json: adapterIdentifier '%s' does not match fmadapter-NAME-VERSION (letters, digits, '_'; no '-' inside NAME)", name, ad->identifier);
    t = afm__json_get(&j, 0, "baseModelSignature");
    if (!afm__json_str(&j, t, sig, sizeof sig) || strlen(sig) != 40 || strspn(sig, "0123456789abcdef") != 40)
        AFM__FMERR("%s/metadata.json: baseModelSignature is missing or not 40 lowercase hex digits", name);
    if (c->signature[0] && strcmp(sig, c->signature))
        AFM__FMERR("%s/metadata.json: adapter is for base model %s, this model is %s", name, sig, c->signature);
    memcpy(ad->signature, sig, 41);
    t = afm__json_get(&j, 0, "loraRank");
    if (!afm__json_int(&j, t, 1, 4096, &v)) AFM__FMERR("%s/metadata.json: loraRank is missing or not an integer in 1..4096", name);
    ad->rank = (int)v;
    t = afm__json_get(&j, 0, "speculativeDecodingDraftTokenCount");
    if (t >= 0) {
        if (!afm__json_int(&j, t, 1, 64, &v)) AFM__FMERR("%s/metadata.json: speculativeDecodingDraftTokenCount is not an integer in 1..64", name);
        ad->draft_token_count = (int)v;
    }
#undef AFM__FMERR
    afm__free(&ad->alloc, j.tok);
    ad->metadata = (char *)afm__alloc(&ad->alloc, n + 1);
    if (!ad->metadata) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    memcpy(ad->metadata, json, n);
    ad->metadata[n] = 0;
    /* Apple's toolkit trains with alpha 16 at rank 32 and does not store alpha: scale = 0.5. */
    ad->alpha = 16.0f;
    ad->scale = ad->alpha / (float)ad->rank;
    return AFM_OK;
}

/* Blob storage v2: a 64-byte header (u32 count, u32 version 2), then for each tensor a 64-byte
   record header (u32 0xDEADBEEF, u32 dtype 1 = fp16, u64 size, u64 absolute offset) and its data,
   each 64-byte aligned. The tensors carry no names: their order and sizes are those of the
   toolkit's adapter keys (AFM_SPEC section 6), which is checked record by record. */
static afm_result afm__fm_weights(afm_adapter *ad, const unsigned char *w, uint64_t size, const char *name, char *err, size_t errn) {
    const afm_model *m = ad->model;
    int n_layers = m->config.n_layers, expected = 0, i, p, k = 0;
    uint64_t pos = 64, prev_end = 64, i_tail;
    static const int order0[] = { AFM__P_Q, AFM__P_K, AFM__P_V, AFM__P_WO, AFM__P_GATE, AFM__P_UP, AFM__P_DOWN };
    static const int order1[] = { AFM__P_WQ, AFM__P_WO, AFM__P_GATE, AFM__P_UP, AFM__P_DOWN };
    uint32_t count, version;
    for (i = 0; i < n_layers; i++) expected += 2 * (i < m->n_seg0 ? 7 : 5);
    if (size < 64) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: %llu bytes, shorter than the 64-byte header", name, (unsigned long long)size);
    count = afm__rd32(w);
    version = afm__rd32(w + 4);
    if (version != 2) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset 4: blob storage version %u, expected 2", name, version);
    if ((int)count != expected || count > 1000000)
        return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset 0: %u tensors, this model's adapter has %d", name, count, expected);
    ad->tensors = (afm__tensor *)afm__calloc(&ad->alloc, count, sizeof *ad->tensors);
    if (!ad->tensors) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    ad->n_tensors = (int)count;
    for (i = 0; i < n_layers; i++) {
        const int *ord = i < m->n_seg0 ? order0 : order1;
        int n_ord = i < m->n_seg0 ? 7 : 5, o, ab;
        for (o = 0; o < n_ord; o++)
            for (ab = 0; ab < 2; ab++) {
                afm__tensor *t = &ad->tensors[k];
                uint64_t in, out, want, sz, off;
                uint32_t magic, dtype;
                p = ord[o];
                afm__lora_dims(m, p, &in, &out);
                want = (ab ? out : in) * (uint64_t)ad->rank * 2;
                if (pos > size || size - pos < 64)
                    return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: record %d header at offset %llu is past the end (%llu bytes)", name, k, (unsigned long long)pos, (unsigned long long)size);
                magic = afm__rd32(w + pos);
                dtype = afm__rd32(w + pos + 4);
                sz = afm__rd64(w + pos + 8);
                off = afm__rd64(w + pos + 16);
                if (magic != 0xDEADBEEFu)
                    return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset %llu: record %d has marker 0x%08x, expected 0xdeadbeef", name, (unsigned long long)pos, k, magic);
                if (dtype != 1)
                    return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset %llu: record %d has dtype %u, expected 1 (fp16)", name, (unsigned long long)(pos + 4), k, dtype);
                if (sz != want)
                    return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset %llu: record %d (layer %d %s lora_%c) is %llu bytes, expected %llu for rank %d",
                                      name, (unsigned long long)(pos + 8), k, i, afm__proj_names[p], ab ? 'b' : 'a', (unsigned long long)sz, (unsigned long long)want, ad->rank);
                if (off != pos + 64)
                    return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset %llu: record %d data offset %llu, expected %llu (right after its header)",
                                      name, (unsigned long long)(pos + 16), k, (unsigned long long)off, (unsigned long long)(pos + 64));
                if (off > size || size - off < sz)
                    return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: record %d data [%llu, +%llu) runs past the end of the file (%llu bytes): truncated",
                                      name, k, (unsigned long long)off, (unsigned long long)sz, (unsigned long long)size);
                snprintf(t->name, sizeof t->name, "l%d.%s.lora_%c", i, afm__proj_names[p], ab ? 'b' : 'a');
                t->type = AFM_TYPE_F16;
                t->n_dims = 2;
                t->dims[0] = ab ? out : (uint64_t)ad->rank;
                t->dims[1] = ab ? (uint64_t)ad->rank : in;
                t->n_elements = t->dims[0] * t->dims[1];
                t->n_bytes = sz;
                t->offset = off;
                t->data = w + off;
                afm__wmat_init(&t->w, AFM_TYPE_F16, t->data, sz, (int)t->dims[0], (int)t->dims[1], 0);
                (ab ? ad->b : ad->a)[i * AFM__N_PROJ + p] = t;
                prev_end = off + sz;
                pos = (prev_end + 63) & ~(uint64_t)63;
                k++;
            }
    }
    /* coremltools pads the last record to 64 bytes at most, with zeros */
    for (i_tail = prev_end; i_tail < size; i_tail++)
        if (w[i_tail] || i_tail - prev_end >= 64)
            return afm__fail(err, errn, AFM_ERR_FORMAT, "%s/adapter_weights.bin: offset %llu: %llu bytes after the last of the %d records (expected at most 63 zero bytes of padding)",
                              name, (unsigned long long)i_tail, (unsigned long long)(size - prev_end), k);
    return AFM_OK;
}

AFMDEF afm_result afm_adapter_load_fmadapter_memory(afm_model *m, const char *metadata_json, size_t json_size,
                                                    const void *weights, size_t weights_size, afm_adapter **out, char *err, size_t errn) {
    afm_adapter *ad;
    afm_result r;
    if (err && errn) err[0] = 0;
    if (!out || !m || (!metadata_json && json_size) || (!weights && weights_size)) return afm__fail(err, errn, AFM_ERR_ARG, "afm_adapter_load_fmadapter_memory: NULL argument");
    *out = NULL;
    if (!(ad = afm__adapter_new(m))) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    if ((uintptr_t)weights % 64) {
        ad->blob.owned = afm__alloc(&ad->alloc, weights_size ? weights_size : 1);
        if (!ad->blob.owned) { afm_adapter_free(ad); return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory"); }
        if (weights_size) memcpy(ad->blob.owned, weights, weights_size);
        weights = ad->blob.owned;
    }
    r = afm__fm_metadata(ad, metadata_json, json_size, "<memory>", err, errn);
    if (r == AFM_OK) r = afm__fm_weights(ad, (const unsigned char *)weights, weights_size, "<memory>", err, errn);
    if (r == AFM_OK) r = afm__adapter_check_finite(ad, "<memory>", err, errn);
    if (r != AFM_OK) { afm_adapter_free(ad); return r; }
    *out = ad;
    return AFM_OK;
}

static int afm__is_dir(const char *path) {
#if defined(_WIN32)
    DWORD a = GetFileAttributesA(path);
    return a != INVALID_FILE_ATTRIBUTES && (a & FILE_ATTRIBUTE_DIRECTORY);
#else
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
#endif
}

AFMDEF afm_result afm_adapter_load(afm_model *m, const char *path, const afm_load_params *params, afm_adapter **out, char *err, size_t errn) {
    afm_adapter *ad;
    afm_result r;
    int no_mmap = params ? params->no_mmap : 0;
    if (err && errn) err[0] = 0;
    if (!out || !m || !path) return afm__fail(err, errn, AFM_ERR_ARG, "afm_adapter_load: NULL argument");
    *out = NULL;
    if (!(ad = afm__adapter_new(m))) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    if (afm__is_dir(path)) {
        /* a .fmadapter package */
        char sub[4096];
        afm__blob meta;
        if (strlen(path) > sizeof sub - 32) { afm_adapter_free(ad); return afm__fail(err, errn, AFM_ERR_ARG, "%s: path too long", path); }
        snprintf(sub, sizeof sub, "%s/metadata.json", path);
        r = afm__blob_open(&ad->alloc, sub, 1, &meta, err, errn);
        if (r == AFM_OK) {
            if (meta.size > (1u << 20)) r = afm__fail(err, errn, AFM_ERR_FORMAT, "%s: %llu bytes, more than 1 MB of metadata", sub, (unsigned long long)meta.size);
            else r = afm__fm_metadata(ad, (const char *)meta.data, (size_t)meta.size, path, err, errn);
            afm__blob_close(&ad->alloc, &meta);
        }
        if (r == AFM_OK) {
            snprintf(sub, sizeof sub, "%s/adapter_weights.bin", path);
            r = afm__blob_open_ex(&ad->alloc, sub, no_mmap, 1, &ad->blob, err, errn);
        }
        if (r == AFM_OK) r = afm__fm_weights(ad, ad->blob.data, ad->blob.size, path, err, errn);
        if (r == AFM_OK) r = afm__adapter_check_finite(ad, path, err, errn);
    } else {
        afm__loader L;
        r = afm__blob_open_ex(&ad->alloc, path, no_mmap, 1, &ad->blob, err, errn);
        if (r == AFM_OK) {
            L.name = path; L.p = ad->blob.data; L.size = ad->blob.size; L.err = err; L.errn = errn;
            r = afm__parse_adapter(&L, ad);
        }
        if (r == AFM_OK) r = afm__adapter_check_finite(ad, path, err, errn);
        if (r == AFM_OK && !ad->identifier[0]) {
            const char *base = strrchr(path, '/');
            snprintf(ad->identifier, sizeof ad->identifier, "%s", base ? base + 1 : path);
        }
    }
    if (r != AFM_OK) { afm_adapter_free(ad); return r; }
    *out = ad;
    return AFM_OK;
}

AFMDEF afm_result afm_adapter_load_memory(afm_model *m, const void *data, size_t size, afm_adapter **out, char *err, size_t errn) {
    afm_adapter *ad;
    afm__loader L;
    afm_result r;
    if (err && errn) err[0] = 0;
    if (!out || !m || (!data && size)) return afm__fail(err, errn, AFM_ERR_ARG, "afm_adapter_load_memory: NULL argument");
    *out = NULL;
    if (!(ad = afm__adapter_new(m))) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    if ((uintptr_t)data % 64) {
        ad->blob.owned = afm__alloc(&ad->alloc, size ? size : 1);
        if (!ad->blob.owned) { afm_adapter_free(ad); return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory"); }
        if (size) memcpy(ad->blob.owned, data, size);
        data = ad->blob.owned;
    }
    L.name = "<memory>"; L.p = (const unsigned char *)data; L.size = size; L.err = err; L.errn = errn;
    r = afm__parse_adapter(&L, ad);
    if (r == AFM_OK) r = afm__adapter_check_finite(ad, "<memory>", err, errn);
    if (r != AFM_OK) { afm_adapter_free(ad); return r; }
    *out = ad;
    return AFM_OK;
}

AFMDEF void afm_adapter_get_info(const afm_adapter *ad, afm_adapter_info *info) {
    uint64_t n = 0;
    int i;
    memset(info, 0, sizeof *info);
    if (!ad) return;
    for (i = 0; i < ad->model->config.n_layers * AFM__N_PROJ; i++)
        if (ad->a[i]) n += ad->a[i]->n_elements + ad->b[i]->n_elements;
    info->rank = ad->rank;
    info->alpha = ad->alpha;
    info->scale = ad->scale;
    info->draft_token_count = ad->draft_token_count;
    info->n_params = n;
    info->identifier = ad->identifier;
    info->signature = ad->signature;
    info->metadata_json = ad->metadata;
}

/* ======================================================================================== */
/* ==== FORWARD PASS (AFM_SPEC section 2) ================================================= */
/* ======================================================================================== */

struct afm_session {
    afm_model *model;
    afm_session_params params;
    afm__pool pool;
    afm_kv_type kv_type;
    int pos, n_ctx, cap;          /* tokens in the cache, context limit, KV positions allocated */
    int kv_dim;                   /* n_kv_heads * head_dim */
    size_t kv_elt;                /* bytes per cached element */
    unsigned char *k_cache, *v_cache; /* [n_seg0][cap][kv_dim] */
    /* scratch for one batch of up to n_batch tokens */
    float *x, *xn, *qkv, *q, *att, *hb, *hb2, *rope_cos, *rope_sin;
    float *scores;                /* [n_threads][cap] attention scores */
    float *rowbuf;                /* [n_threads][max row] dequantized KV rows (float caches) */
    void *act_buf;                /* int8 activations prepared for one job's quantized products */
    void *act_f32;                /* f32 copies of an input whose rows are not laid out for the
                                     kernels (a width not a multiple of 16), else NULL */
    size_t act_cap;               /* bytes of act_buf (and of act_f32) */
    int rowbuf_n;
    float *logits;                /* [logits_cap][vocab] */
    int logits_cap, n_logits;
    int32_t *tokens;              /* [cap] the tokens in the cache, in order */
    int test_accept_rule;         /* tests only: 1 accepts every draft, to show the tests can fail */
    const afm_adapter *adapter;   /* LoRA applied on every adapted projection, or NULL */
    float *lora_t, *lora_u;       /* [3][n_batch][rank rounded up to 16] (A x of up to three
                                     projections), [n_batch][3 * widest output] (their B A x) */
    int lora_rank_cap;
    char err[256];
};

static afm_result afm__serr(afm_session *s, afm_result code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof s->err, fmt, ap);
    va_end(ap);
    return code;
}

/* ---- matrix products: activations prepared once per input, then the rows of one or more
   products (a projection and its LoRA A matrices, gate and up, ...) spread over the pool in one
   hand-off. Every thread takes its share of every product's rows, so the split stays even
   whatever the products' sizes, and each output row is computed exactly as alone. ---- */
#define AFM__MM_MAX 8
typedef struct afm__mm_item {
    const afm__tensor *W;
    const float *X;               /* n_tok rows of W->dims[1] inputs, row stride ldx */
    int ldx;
    float *Y;                     /* Y[t * ldy + r] for every row r of W */
    int ldy;
    float *add_to;                /* if set: add_to[t * add_ld + r] += add_scale * Y[t * ldy + r] after */
    int add_ld;
    float add_scale;
    afm__act act;
} afm__mm_item;

typedef struct afm__mm_job {
    afm_session *s;
    int n_tok, n;
    afm__mm_item it[AFM__MM_MAX];
    afm__act *prep;               /* the activations being prepared by afm__mm_prepare_run */
    const float *prep_x;
    int prep_ldx;
} afm__mm_job;

static void afm__mm_init(afm__mm_job *j, afm_session *s, int n_tok) { j->s = s; j->n_tok = n_tok; j->n = 0; }

static void afm__mm_add(afm__mm_job *j, const afm__tensor *W, const float *X, int ldx, float *Y, int ldy) {
    afm__mm_item *it = &j->it[j->n++];
    AFM_ASSERT(j->n <= AFM__MM_MAX);
    it->W = W; it->X = X; it->ldx = ldx; it->Y = Y; it->ldy = ldy;
    it->add_to = NULL;
}

static void afm__mm_prepare_run(void *ctx, int ith, int nth) {
    afm__mm_job *j = (afm__mm_job *)ctx;
    int lo, hi;
    afm__split(j->n_tok, ith, nth, &lo, &hi);
    if (lo < hi) afm__prepare_activations(&j->s->model->kern, j->prep, j->prep_x, (size_t)j->prep_ldx, lo, hi);
}

static float afm__dot(const float *a, const float *b, int n);

static void afm__mm_run(void *ctx, int ith, int nth) {
    afm__mm_job *j = (afm__mm_job *)ctx;
    int i, lo, hi;
    for (i = 0; i < j->n; i++) {
        const afm__mm_item *it = &j->it[i];
        afm__split((int)it->W->dims[0], ith, nth, &lo, &hi);
        if (it->act.quant || !afm__type_is_quant((int)it->W->type)) {
            afm__matmul_rows(&j->s->model->kern, &it->W->w, &it->act, it->Y, (size_t)it->ldy, lo, hi);
        } else { /* f32_activations: decode each quantized row, then exact f32 dot products */
            float *row = j->s->rowbuf + (size_t)ith * j->s->rowbuf_n;
            int r, t, n = (int)it->W->dims[1];
            for (r = lo; r < hi; r++) {
                afm__dequantize_row(&j->s->model->kern, &it->W->w, r, row);
                for (t = 0; t < it->act.n_tok; t++) it->Y[(size_t)t * it->ldy + r] = afm__dot(row, it->act.x + (size_t)t * it->act.kpad, n);
            }
        }
        if (it->add_to) {
            int r, t;
            for (t = 0; t < it->act.n_tok; t++)
                for (r = lo; r < hi; r++) it->add_to[(size_t)t * it->add_ld + r] += it->add_scale * it->Y[(size_t)t * it->ldy + r];
        }
    }
}

/* Prepares a's activations from X into buf (over the pool when there are several tokens). */
static void afm__mm_prepare(afm__mm_job *j, afm__act *a, int type, const float *X, int ldx, int n_in, void *buf) {
    afm_session *s = j->s;
    AFM_ASSERT(afm__act_size(type, j->n_tok, n_in) <= s->act_cap);
    afm__act_init(a, type, j->n_tok, n_in, buf);
    if (j->n_tok >= 4) {
        j->prep = a; j->prep_x = X; j->prep_ldx = ldx;
        afm__pool_run(&s->pool, afm__mm_prepare_run, j);
    } else afm__prepare_activations(&s->model->kern, a, X, (size_t)ldx, 0, j->n_tok);
}

/* Runs every product added since afm__mm_init. Quantized weights read int8 activations, one
   preparation per input shared by the products that read it (at most one such input per job);
   float weights (and every weight in f32_activations mode) read X in place when its rows are
   already laid out as the kernels want (stride = inputs rounded up to 16), else a copy. */
static void afm__mm_go(afm__mm_job *j) {
    afm_session *s = j->s;
    const float *qx = NULL, *fx = NULL;
    const afm__act *qa = NULL, *fa = NULL;
    int i;
    for (i = 0; i < j->n; i++) {
        afm__mm_item *it = &j->it[i];
        const int n_in = (int)it->W->dims[1];
        if (afm__type_is_quant((int)it->W->type) && !s->params.f32_activations) {
            if (qx == it->X) { it->act = *qa; continue; }
            AFM_ASSERT(qx == NULL);
            afm__mm_prepare(j, &it->act, (int)it->W->type, it->X, it->ldx, n_in, s->act_buf);
            qx = it->X; qa = &it->act;
        } else if (it->ldx == ((n_in + 15) & ~15)) {
            afm__act_init(&it->act, AFM_TYPE_F32, j->n_tok, n_in, (void *)(uintptr_t)it->X);
            it->act.x = (float *)(uintptr_t)it->X; /* in place: act_init would round the pointer up */
        } else {
            if (fx == it->X) { it->act = *fa; continue; }
            AFM_ASSERT(fx == NULL);
            afm__mm_prepare(j, &it->act, AFM_TYPE_F32, it->X, it->ldx, n_in, s->act_f32 ? s->act_f32 : s->act_buf);
            fx = it->X; fa = &it->act;
        }
    }
    afm__pool_run(&s->pool, afm__mm_run, j);
}

/* Y[t][r] = W[r] . X[t] for every row r of W and token t < n_tok: one product alone. */
static void afm__matmul(afm_session *s, const afm__tensor *W, const float *X, int ldx, int n_tok, float *Y, int ldy) {
    afm__mm_job j;
    afm__mm_init(&j, s, n_tok);
    afm__mm_add(&j, W, X, ldx, Y, ldy);
    afm__mm_go(&j);
}

/* Bytes of prepared activations the widest product of n_tok tokens with n_in inputs needs. */
static size_t afm__act_need(int n_tok, int n_in) {
    size_t q = afm__act_size(AFM_TYPE_Q2B, n_tok, n_in), f = afm__act_size(AFM_TYPE_F32, n_tok, n_in);
    return q > f ? q : f;
}

static float afm__dot(const float *a, const float *b, int n) {
    float s[8] = { 0, 0, 0, 0, 0, 0, 0, 0 };
    int i = 0, k;
    for (; i + 8 <= n; i += 8)
        for (k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (k = 0; i < n; i++, k++) s[k] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* ---- LoRA: y += scale * B (A x) on an adapted projection, in the reference's order: (x A^T)
   B^T first, then scaled, then added. The A products join the projection's own job (they read
   the same input); the B products of a job's projections run together in a second one. ---- */
typedef struct afm__lora_set {
    int n;
    int proj[3];                  /* adapted projections of one job (AFM__P_*) */
    float *Y[3];
    int ldy[3];
} afm__lora_set;

static int afm__lora_rpad(const afm_session *s) { return (s->adapter->rank + 15) & ~15; }

/* Adds the A products of projection p of layer l (input X) to job j; slot k of lora_t gets A x. */
static void afm__lora_a(afm__mm_job *j, afm__lora_set *ls, int l, int p, const float *X, int ldx, float *Y, int ldy) {
    afm_session *s = j->s;
    const afm__tensor *A;
    int k = ls->n;
    if (!s->adapter || !(A = s->adapter->a[l * AFM__N_PROJ + p])) return;
    afm__mm_add(j, A, X, ldx, s->lora_t + (size_t)k * s->params.n_batch * afm__lora_rpad(s), afm__lora_rpad(s));
    ls->proj[k] = p; ls->Y[k] = Y; ls->ldy[k] = ldy;
    ls->n++;
}

/* The B products of every projection in ls, each thread then adding scale * B (A x) to its rows of Y. */
static void afm__lora_b(afm_session *s, int l, const afm__lora_set *ls, int n_tok) {
    const afm_adapter *ad = s->adapter;
    float *u[3];
    int k, out[3], rp;
    afm__mm_job j;
    if (!ls->n) return;
    rp = afm__lora_rpad(s);
    afm__mm_init(&j, s, n_tok);
    u[0] = s->lora_u;
    for (k = 0; k < ls->n; k++) {
        const afm__tensor *B = ad->b[l * AFM__N_PROJ + ls->proj[k]];
        out[k] = (int)B->dims[0];
        if (k + 1 < ls->n) u[k + 1] = u[k] + (size_t)n_tok * out[k];
        afm__mm_add(&j, B, s->lora_t + (size_t)k * s->params.n_batch * rp, rp, u[k], out[k]);
        j.it[k].add_to = ls->Y[k]; j.it[k].add_ld = ls->ldy[k]; j.it[k].add_scale = ad->scale;
    }
    afm__mm_go(&j);
}

static void afm__rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0;
    float scale;
    int i;
    for (i = 0; i < n; i++) ss += (double)x[i] * x[i];
    scale = (float)(1.0 / sqrt(ss / n + eps));
    for (i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* Rotates one head in the half-split layout: pair i is (v[i], v[i + d/2]). */
static void afm__rope(float *v, const float *cs, const float *sn, int half) {
    int i;
    for (i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = a * sn[i] + b * cs[i];
    }
}

static void afm__rope_tables(afm_session *s, int n_tok) {
    const afm_config *c = &s->model->config;
    int half = c->head_dim / 2, t, i;
    for (t = 0; t < n_tok; t++) {
        double p = (double)(s->pos + t);
        for (i = 0; i < half; i++) {
            /* inv_freq_i = theta^(-2i/d), as f32 like the reference, then the angle in double */
            float inv = (float)pow((double)c->rope_theta, -2.0 * i / c->head_dim);
            double ang = p * inv;
            s->rope_cos[t * half + i] = (float)cos(ang);
            s->rope_sin[t * half + i] = (float)sin(ang);
        }
    }
}

/* Apple's 8-bit fake quantizer: round(x / scale) clipped to int8 (ties to even, like MLX). */
static int8_t afm__quant8(float x, float scale) {
    float q = (float)nearbyint(x / scale);
    if (q < -128.0f) q = -128.0f;
    if (q > 127.0f) q = 127.0f;
    if (q != q) q = 0; /* NaN activations: the reference would propagate them; we store 0 */
    return (int8_t)q;
}

/* Stores n values into the cache at element index `at` in the session's KV type. */
static void afm__kv_store(afm_session *s, unsigned char *base, size_t at, const float *v, int n, float scale) {
    int i;
    if (s->kv_type == AFM_KV_INT8) { int8_t *d = (int8_t *)base + at; for (i = 0; i < n; i++) d[i] = afm__quant8(v[i], scale); }
    else if (s->kv_type == AFM_KV_F16) { uint16_t *d = (uint16_t *)(void *)base + at; for (i = 0; i < n; i++) d[i] = afm__f2h(v[i]); }
    else memcpy((float *)(void *)base + at, v, (size_t)n * 4);
}

/* Reads n cached values (dequantized) starting at element index `at`. */
static void afm__kv_load(const afm_session *s, const unsigned char *base, size_t at, float *out, int n, float scale) {
    int i;
    if (s->kv_type == AFM_KV_INT8) { const int8_t *d = (const int8_t *)base + at; for (i = 0; i < n; i++) out[i] = (float)d[i] * scale; }
    else if (s->kv_type == AFM_KV_F16) { const uint16_t *d = (const uint16_t *)(const void *)base + at; for (i = 0; i < n; i++) out[i] = afm__h2f(d[i]); }
    else memcpy(out, (const float *)(const void *)base + at, (size_t)n * 4);
}

/* ---- attention for every (token, head) of the batch, spread over the pool ---- */
typedef struct afm__attn_job {
    afm_session *s;
    int layer;       /* whose cache is read */
    int n_tok, q_stride;
} afm__attn_job;

/* Softmax over n scores in place; returns nothing, the row sums to 1. */
static void afm__softmax(float *x, int n) {
    float mx = -FLT_MAX, sum = 0, inv;
    int i;
    for (i = 0; i < n; i++) if (x[i] > mx) mx = x[i];
    for (i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    inv = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

/* int8 cache: one task per (token, KV head) runs the group of query heads that share it
   through the SIMD kernels (scores over int8 keys, then values over int8 values). */
static void afm__attn_int8(afm__attn_job *j, int task, float *scores) {
    afm_session *s = j->s;
    const afm_config *c = &s->model->config;
    const afm__layer *ly = &s->model->layers[j->layer];
    const afm__kernels *k = &s->model->kern;
    int hd = c->head_dim, group = c->n_heads / c->n_kv_heads, t = task / c->n_kv_heads, kvh = task % c->n_kv_heads;
    int n_keys = s->pos + t + 1, h;
    size_t layer_off = (size_t)j->layer * s->cap * s->kv_dim + (size_t)kvh * hd;
    const float *q = s->q + (size_t)t * j->q_stride + (size_t)kvh * group * hd;
    float *out = s->att + (size_t)t * c->n_heads * hd + (size_t)kvh * group * hd;
    k->kv_scores(q, (size_t)hd, group, (const int8_t *)s->k_cache + layer_off, (size_t)s->kv_dim, n_keys, hd,
                 ly->k_scale / sqrtf((float)hd), scores, (size_t)s->cap);
    for (h = 0; h < group; h++) afm__softmax(scores + (size_t)h * s->cap, n_keys);
    k->kv_values(scores, (size_t)s->cap, group, (const int8_t *)s->v_cache + layer_off, (size_t)s->kv_dim, n_keys, hd,
                 ly->v_scale, out, (size_t)hd);
}

/* float caches (F16, F32): one task per (token, query head), scalar. */
static void afm__attn_float(afm__attn_job *j, int task, float *scores, float *kv) {
    afm_session *s = j->s;
    const afm_config *c = &s->model->config;
    int hd = c->head_dim, group = c->n_heads / c->n_kv_heads, t = task / c->n_heads, h = task % c->n_heads, kvh = h / group;
    int n_keys = s->pos + t + 1, i, d;
    size_t layer_off = (size_t)j->layer * s->cap * s->kv_dim + (size_t)kvh * hd;
    const float *q = s->q + (size_t)t * j->q_stride + (size_t)h * hd;
    float *out = s->att + (size_t)t * c->n_heads * hd + (size_t)h * hd;
    float inv_sqrt = 1.0f / sqrtf((float)hd);
    for (i = 0; i < n_keys; i++) {
        afm__kv_load(s, s->k_cache, layer_off + (size_t)i * s->kv_dim, kv, hd, 1.0f);
        scores[i] = afm__dot(q, kv, hd) * inv_sqrt;
    }
    afm__softmax(scores, n_keys);
    for (d = 0; d < hd; d++) out[d] = 0;
    for (i = 0; i < n_keys; i++) {
        afm__kv_load(s, s->v_cache, layer_off + (size_t)i * s->kv_dim, kv, hd, 1.0f);
        for (d = 0; d < hd; d++) out[d] += scores[i] * kv[d];
    }
}

static void afm__attn_run(void *ctx, int ith, int nth) {
    afm__attn_job *j = (afm__attn_job *)ctx;
    afm_session *s = j->s;
    const afm_config *c = &s->model->config;
    int int8 = s->kv_type == AFM_KV_INT8, lo, hi, task;
    float *scores = s->scores + (size_t)ith * s->cap * (c->n_heads / c->n_kv_heads);
    afm__split(j->n_tok * (int8 ? c->n_kv_heads : c->n_heads), ith, nth, &lo, &hi);
    for (task = lo; task < hi; task++) {
        if (int8) afm__attn_int8(j, task, scores);
        else afm__attn_float(j, task, scores, s->rowbuf + (size_t)ith * s->rowbuf_n);
    }
}

/* q, k: RoPE then per-head RMSNorm; k and v are stored into the layer's cache. */
static void afm__qkv_post(afm_session *s, int layer, int n_tok) {
    const afm_config *c = &s->model->config;
    const afm__layer *ly = &s->model->layers[layer];
    int hd = c->head_dim, half = hd / 2, qd = c->n_heads * hd, t, h;
    int stride = ly->reuse ? qd : qd + 2 * s->kv_dim;
    for (t = 0; t < n_tok; t++) {
        float *row = s->qkv + (size_t)t * stride;
        const float *cs = s->rope_cos + (size_t)t * half, *sn = s->rope_sin + (size_t)t * half;
        for (h = 0; h < c->n_heads; h++) {
            afm__rope(row + h * hd, cs, sn, half);
            afm__rmsnorm(row + h * hd, row + h * hd, ly->q_norm, hd, c->qk_norm_eps);
        }
        if (!ly->reuse) {
            float *k = row + qd, *v = row + qd + s->kv_dim;
            size_t at = ((size_t)layer * s->cap + (size_t)(s->pos + t)) * s->kv_dim;
            for (h = 0; h < c->n_kv_heads; h++) {
                afm__rope(k + h * hd, cs, sn, half);
                afm__rmsnorm(k + h * hd, k + h * hd, ly->k_norm, hd, c->qk_norm_eps);
            }
            afm__kv_store(s, s->k_cache, at, k, s->kv_dim, ly->k_scale);
            afm__kv_store(s, s->v_cache, at, v, s->kv_dim, ly->v_scale);
        }
    }
}

static float afm__silu(float x) { return x / (1.0f + expf(-x)); }

/* Runs n_tok tokens at positions pos.. through the model; logits for the rows asked for. */
static void afm__forward(afm_session *s, const int32_t *tok, int n_tok, float *logits, int logits_from) {
    const afm_model *m = s->model;
    const afm_config *c = &m->config;
    int d = c->dim, qd = c->n_heads * c->head_dim, f = c->ffn_dim, l, t, i;
    size_t nd = (size_t)d;
    afm__attn_job aj;
    afm__mm_job mj;
    afm__lora_set ls;

    for (t = 0; t < n_tok; t++) afm__dequantize_row(&m->kern, &m->tok_embd->w, tok[t], s->x + t * nd);
    afm__rope_tables(s, n_tok);

    for (l = 0; l < c->n_layers; l++) {
        const afm__layer *ly = &m->layers[l];
        int stride = ly->reuse ? qd : qd + 2 * s->kv_dim;
        for (t = 0; t < n_tok; t++) afm__rmsnorm(s->xn + t * nd, s->x + t * nd, ly->attn_norm, d, c->norm_eps);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->reuse ? ly->wq : ly->qkv, s->xn, d, s->qkv, stride);
        if (ly->reuse) afm__lora_a(&mj, &ls, l, AFM__P_WQ, s->xn, d, s->qkv, stride);
        else {
            afm__lora_a(&mj, &ls, l, AFM__P_Q, s->xn, d, s->qkv, stride);
            afm__lora_a(&mj, &ls, l, AFM__P_K, s->xn, d, s->qkv + qd, stride);
            afm__lora_a(&mj, &ls, l, AFM__P_V, s->xn, d, s->qkv + qd + s->kv_dim, stride);
        }
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        afm__qkv_post(s, l, n_tok);
        /* queries are the first qd values of each row; segment 1 reads the last segment-0 cache */
        s->q = s->qkv;
        aj.s = s; aj.layer = ly->reuse ? m->n_seg0 - 1 : l; aj.n_tok = n_tok; aj.q_stride = stride;
        afm__pool_run(&s->pool, afm__attn_run, &aj);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->wo, s->att, qd, s->xn, d);
        afm__lora_a(&mj, &ls, l, AFM__P_WO, s->att, qd, s->xn, d);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        for (i = 0; i < n_tok * d; i++) s->x[i] += s->xn[i];

        for (t = 0; t < n_tok; t++) afm__rmsnorm(s->xn + t * nd, s->x + t * nd, ly->ffn_norm, d, c->norm_eps);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->gate, s->xn, d, s->hb, f);
        afm__mm_add(&mj, ly->up, s->xn, d, s->hb2, f);
        afm__lora_a(&mj, &ls, l, AFM__P_GATE, s->xn, d, s->hb, f);
        afm__lora_a(&mj, &ls, l, AFM__P_UP, s->xn, d, s->hb2, f);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        for (i = 0; i < n_tok * f; i++) s->hb[i] = afm__silu(s->hb[i]) * s->hb2[i];
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->down, s->hb, f, s->xn, d);
        afm__lora_a(&mj, &ls, l, AFM__P_DOWN, s->hb, f, s->xn, d);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        for (i = 0; i < n_tok * d; i++) s->x[i] += s->xn[i];
    }
    if (logits_from < n_tok) {
        int n_out = n_tok - logits_from;
        for (t = 0; t < n_out; t++) afm__rmsnorm(s->xn + t * nd, s->x + (logits_from + t) * nd, m->out_norm, d, c->norm_eps);
        afm__matmul(s, m->tok_embd, s->xn, d, n_out, logits, c->vocab_size);
    }
}

/* ======================================================================================== */
/* ==== SESSIONS ========================================================================== */
/* ======================================================================================== */

static void afm__session_release_buffers(afm_session *s) {
    const afm_allocator *a = &s->model->alloc;
    void **bufs[] = { (void **)&s->x, (void **)&s->xn, (void **)&s->qkv, (void **)&s->att, (void **)&s->hb,
                      (void **)&s->hb2, (void **)&s->rope_cos, (void **)&s->rope_sin, (void **)&s->scores,
                      (void **)&s->rowbuf, (void **)&s->logits, (void **)&s->k_cache, (void **)&s->v_cache,
                      (void **)&s->lora_t, (void **)&s->lora_u, (void **)&s->tokens, (void **)&s->act_buf, (void **)&s->act_f32 };
    size_t i;
    for (i = 0; i < sizeof bufs / sizeof bufs[0]; i++) { afm__free(a, *bufs[i]); *bufs[i] = NULL; }
}

/* Grows the KV cache (and the per-thread score rows) to hold at least `need` positions. */
static afm_result afm__reserve(afm_session *s, int need) {
    const afm_allocator *a = &s->model->alloc;
    int cap = s->cap ? s->cap : 256, l, n_seg0 = s->model->n_seg0;
    size_t row = (size_t)s->kv_dim * s->kv_elt;
    unsigned char *k, *v;
    float *scores;
    int32_t *tokens;
    if (need <= s->cap) return AFM_OK;
    while (cap < need) cap = cap > s->n_ctx / 2 ? s->n_ctx : cap * 2;
    if (cap > s->n_ctx) cap = s->n_ctx;
    k = (unsigned char *)afm__calloc(a, (size_t)n_seg0 * cap, row);
    v = (unsigned char *)afm__calloc(a, (size_t)n_seg0 * cap, row);
    scores = (float *)afm__calloc(a, (size_t)s->pool.n_threads * cap * (s->model->config.n_heads / s->model->config.n_kv_heads), sizeof(float));
    tokens = (int32_t *)afm__calloc(a, (size_t)cap + 1, sizeof(int32_t)); /* +1: a pending token may sit past the end */
    if (!k || !v || !scores || !tokens) {
        afm__free(a, k); afm__free(a, v); afm__free(a, scores); afm__free(a, tokens);
        return afm__serr(s, AFM_ERR_NOMEM, "out of memory growing the KV cache to %d positions", cap);
    }
    for (l = 0; l < n_seg0 && s->pos; l++) {
        memcpy(k + (size_t)l * cap * row, s->k_cache + (size_t)l * s->cap * row, (size_t)s->pos * row);
        memcpy(v + (size_t)l * cap * row, s->v_cache + (size_t)l * s->cap * row, (size_t)s->pos * row);
    }
    if (s->pos) memcpy(tokens, s->tokens, (size_t)s->pos * sizeof *tokens);
    afm__free(a, s->k_cache); afm__free(a, s->v_cache); afm__free(a, s->scores); afm__free(a, s->tokens);
    s->k_cache = k; s->v_cache = v; s->scores = scores; s->tokens = tokens;
    s->cap = cap;
    return AFM_OK;
}

AFMDEF afm_result afm_session_create(afm_model *m, const afm_session_params *params, afm_session **out) {
    const afm_allocator *a;
    const afm_config *c;
    afm_session *s;
    afm_session_params p;
    int B, qd, widest;
    if (!out) return AFM_ERR_ARG;
    *out = NULL;
    if (!m) return AFM_ERR_ARG;
    a = &m->alloc;
    c = &m->config;
    memset(&p, 0, sizeof p);
    if (params) p = *params;
    if (p.n_ctx < 0 || p.n_threads < 0 || p.n_batch < 0 || p.n_threads > 1024 || (int)p.kv_type < 0 || p.kv_type > AFM_KV_INT8) return AFM_ERR_ARG;
    if (p.n_ctx == 0) p.n_ctx = c->context_length;
    if (p.n_threads == 0) p.n_threads = 1;
    if (p.n_batch == 0) p.n_batch = 256;
    if (p.n_batch > p.n_ctx) p.n_batch = p.n_ctx;
    if (p.kv_type == AFM_KV_AUTO) p.kv_type = c->has_kv_scales ? AFM_KV_INT8 : AFM_KV_F16;
    if (p.kv_type == AFM_KV_INT8 && !c->has_kv_scales) return AFM_ERR_UNSUPPORTED;

    s = (afm_session *)afm__calloc(a, 1, sizeof *s);
    if (!s) return AFM_ERR_NOMEM;
    s->model = m;
    s->params = p;
    s->kv_type = p.kv_type;
    s->n_ctx = p.n_ctx;
    s->kv_dim = c->n_kv_heads * c->head_dim;
    s->kv_elt = s->kv_type == AFM_KV_INT8 ? 1 : s->kv_type == AFM_KV_F16 ? 2 : 4;
    if (afm__pool_init(a, &s->pool, p.n_threads) != AFM_OK) { afm__free(a, s); return AFM_ERR_THREAD; }

    B = p.n_batch;
    qd = c->n_heads * c->head_dim;
    widest = c->dim > c->ffn_dim ? c->dim : c->ffn_dim;
    if (qd > widest) widest = qd;
    if (c->head_dim > widest) widest = c->head_dim;
    s->rowbuf_n = (widest + 15) & ~15;
    s->x = (float *)afm__alloc(a, (size_t)B * c->dim * 4);
    s->xn = (float *)afm__alloc(a, (size_t)B * c->dim * 4);
    s->qkv = (float *)afm__alloc(a, (size_t)B * (qd + 2 * s->kv_dim) * 4);
    s->att = (float *)afm__alloc(a, (size_t)B * qd * 4);
    s->hb = (float *)afm__alloc(a, (size_t)B * c->ffn_dim * 4);
    s->hb2 = (float *)afm__alloc(a, (size_t)B * c->ffn_dim * 4);
    s->rope_cos = (float *)afm__alloc(a, (size_t)B * (c->head_dim / 2) * 4);
    s->rope_sin = (float *)afm__alloc(a, (size_t)B * (c->head_dim / 2) * 4);
    s->rowbuf = (float *)afm__alloc(a, (size_t)s->pool.n_threads * s->rowbuf_n * 4);
    s->logits_cap = 1;
    s->logits = (float *)afm__alloc(a, (size_t)c->vocab_size * 4);
    s->act_cap = afm__act_need(B, widest);
    s->act_buf = afm__alloc(a, s->act_cap);
    if ((c->dim | qd | c->ffn_dim) & 15) s->act_f32 = afm__alloc(a, s->act_cap);
    if (!s->act_buf || (((c->dim | qd | c->ffn_dim) & 15) && !s->act_f32) ||
        !s->x || !s->xn || !s->qkv || !s->att || !s->hb || !s->hb2 || !s->rope_cos || !s->rope_sin || !s->rowbuf || !s->logits ||
        afm__reserve(s, p.preallocate ? s->n_ctx : 1) != AFM_OK) {
        afm_session_free(s);
        return AFM_ERR_NOMEM;
    }
    *out = s;
    return AFM_OK;
}

AFMDEF void afm_session_free(afm_session *s) {
    if (!s) return;
    afm__pool_destroy(&s->model->alloc, &s->pool);
    afm__session_release_buffers(s);
    afm__free(&s->model->alloc, s);
}

/* Evaluates n tokens; keeps the logits of every position when want_all, else of the last. */
static afm_result afm__eval(afm_session *s, const int32_t *tokens, int n, int want_all) {
    const afm_config *c;
    int i, done;
    afm_result r;
    if (!s) return AFM_ERR_ARG;
    c = &s->model->config;
    s->err[0] = 0;
    if (n <= 0 || !tokens) return afm__serr(s, AFM_ERR_ARG, "afm_session_eval: %d tokens given (need at least 1)", n);
    for (i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return afm__serr(s, AFM_ERR_ARG, "token %d at index %d is outside the vocabulary [0, %d)", (int)tokens[i], i, c->vocab_size);
    if (n > s->n_ctx - s->pos)
        return afm__serr(s, AFM_ERR_CONTEXT_FULL, "context full: %d tokens at position %d exceed the session's limit of %d", n, s->pos, s->n_ctx);
    if ((r = afm__reserve(s, s->pos + n)) != AFM_OK) return r;
    memcpy(s->tokens + s->pos, tokens, (size_t)n * sizeof *tokens);
    if (want_all && n > s->logits_cap) {
        float *l = (float *)afm__alloc(&s->model->alloc, (size_t)n * c->vocab_size * 4);
        if (!l) return afm__serr(s, AFM_ERR_NOMEM, "out of memory for the logits of %d positions", n);
        afm__free(&s->model->alloc, s->logits);
        s->logits = l;
        s->logits_cap = n;
    }
    s->n_logits = 0;
    for (done = 0; done < n;) {
        int b = n - done < s->params.n_batch ? n - done : s->params.n_batch;
        int last_chunk = done + b == n;
        float *lg = want_all ? s->logits + (size_t)done * c->vocab_size : s->logits;
        afm__forward(s, tokens + done, b, lg, want_all ? 0 : last_chunk ? b - 1 : b);
        s->pos += b;
        done += b;
    }
    s->n_logits = want_all ? n : 1;
    return AFM_OK;
}

AFMDEF afm_result afm_session_eval(afm_session *s, const int32_t *tokens, int n) {
    return afm__eval(s, tokens, n, s ? s->params.all_logits : 0);
}

AFMDEF const int32_t *afm_session_tokens(const afm_session *s, int *n) {
    if (n) *n = s ? s->pos : 0;
    return s ? s->tokens : NULL;
}

AFMDEF const float *afm_session_logits(const afm_session *s, int i) {
    if (!s || s->n_logits == 0) return NULL;
    if (i < 0) i += s->n_logits;
    if (i < 0 || i >= s->n_logits) return NULL;
    return s->logits + (size_t)i * s->model->config.vocab_size;
}

AFMDEF afm_result afm_session_rewind(afm_session *s, int pos) {
    if (!s) return AFM_ERR_ARG;
    if (pos < 0 || pos > s->pos) return afm__serr(s, AFM_ERR_ARG, "cannot rewind to position %d: the session holds %d tokens", pos, s->pos);
    s->pos = pos;
    s->n_logits = 0; /* the logits belonged to positions that may be gone */
    return AFM_OK;
}

AFMDEF int afm_session_pos(const afm_session *s) { return s ? s->pos : 0; }
AFMDEF const char *afm_session_error(const afm_session *s) { return s ? s->err : "session is NULL"; }

AFMDEF afm_result afm_session_set_adapter(afm_session *s, const afm_adapter *ad) {
    const afm_config *c;
    if (!s) return AFM_ERR_ARG;
    c = &s->model->config;
    if (ad == s->adapter) return AFM_OK;
    if (ad && ad->model != s->model)
        return afm__serr(s, AFM_ERR_ARG, "adapter '%s' was loaded for a different model", ad->identifier);
    if (ad && ad->rank > s->lora_rank_cap) {
        const afm_allocator *a = &s->model->alloc;
        int widest = c->dim > c->ffn_dim ? c->dim : c->ffn_dim, qd = c->n_heads * c->head_dim;
        float *t, *u;
        if (qd > widest) widest = qd;
        t = (float *)afm__alloc(a, (size_t)3 * s->params.n_batch * ((ad->rank + 15) & ~15) * 4);
        u = (float *)afm__alloc(a, (size_t)3 * s->params.n_batch * widest * 4);
        if (!t || !u) { afm__free(a, t); afm__free(a, u); return afm__serr(s, AFM_ERR_NOMEM, "out of memory for LoRA scratch"); }
        afm__free(a, s->lora_t);
        afm__free(a, s->lora_u);
        s->lora_t = t;
        s->lora_u = u;
        s->lora_rank_cap = ad->rank;
    }
    if (ad && afm__act_need(s->params.n_batch, ad->rank) > s->act_cap) { /* B's inputs are rank long */
        size_t need = afm__act_need(s->params.n_batch, ad->rank);
        void *buf = afm__alloc(&s->model->alloc, need);
        if (!buf) return afm__serr(s, AFM_ERR_NOMEM, "out of memory for LoRA scratch");
        afm__free(&s->model->alloc, s->act_buf);
        s->act_buf = buf;
        s->act_cap = need;
    }
    s->adapter = ad;
    s->pos = 0; /* the cached keys and values were computed with the previous adapter */
    s->n_logits = 0;
    return AFM_OK;
}

/* ======================================================================================== */
/* ==== SAMPLING ========================================================================== */
/* ======================================================================================== */

struct afm_sampler {
    afm_sampler_params p;
    afm_allocator alloc;
    int n_vocab;
    uint64_t rng[4];     /* xoshiro256** */
    float *prob;         /* [n_vocab] */
    int32_t *idx;        /* [n_vocab] candidate ids */
    struct afm__cand *cand; /* [n_vocab] candidates being sorted */
};

static uint64_t afm__splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t afm__rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t afm__rng_next(uint64_t *s) {
    uint64_t r = afm__rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = afm__rotl(s[3], 45);
    return r;
}

/* Uniform in [0, 1) with 53 random bits. */
static double afm__rng_uniform(uint64_t *s) { return (double)(afm__rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

AFMDEF afm_result afm_sampler_create(const afm_sampler_params *params, int n_vocab, const afm_allocator *allocator, afm_sampler **out) {
    const afm_allocator *a = allocator ? allocator : &afm__malloc_allocator;
    afm_sampler *sm;
    uint64_t seed;
    if (!out) return AFM_ERR_ARG;
    *out = NULL;
    if (n_vocab < 1 || (params && (params->top_k < 0 || !(params->top_p >= 0 && params->top_p <= 1) ||
                                   !(params->min_p >= 0 && params->min_p <= 1) || params->temperature != params->temperature)))
        return AFM_ERR_ARG;
    sm = (afm_sampler *)afm__calloc(a, 1, sizeof *sm);
    if (!sm) return AFM_ERR_NOMEM;
    if (params) sm->p = *params;
    sm->alloc = *a;
    sm->n_vocab = n_vocab;
    sm->prob = (float *)afm__alloc(a, (size_t)n_vocab * sizeof(float));
    sm->idx = (int32_t *)afm__alloc(a, (size_t)n_vocab * sizeof(int32_t));
    sm->cand = (struct afm__cand *)afm__alloc(a, (size_t)n_vocab * 8);
    if (!sm->prob || !sm->idx || !sm->cand) { afm_sampler_free(sm); return AFM_ERR_NOMEM; }
    seed = sm->p.seed;
    sm->rng[0] = afm__splitmix64(&seed); sm->rng[1] = afm__splitmix64(&seed);
    sm->rng[2] = afm__splitmix64(&seed); sm->rng[3] = afm__splitmix64(&seed);
    *out = sm;
    return AFM_OK;
}

AFMDEF void afm_sampler_free(afm_sampler *sm) {
    afm_allocator a;
    if (!sm) return;
    a = sm->alloc;
    afm__free(&a, sm->prob);
    afm__free(&a, sm->idx);
    afm__free(&a, sm->cand);
    afm__free(&a, sm);
}

/* Orders candidates by probability, highest first; ties by lower id, so results never depend
   on the sort algorithm. */
typedef struct afm__cand { float p; int32_t id; } afm__cand;
static int afm__cmp_cand(const void *a, const void *b) {
    const afm__cand *x = (const afm__cand *)a, *y = (const afm__cand *)b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Applies temperature, min-p, top-k and top-p (in that order) to logits: sm->prob holds the
   unnormalised probabilities (largest 1) and sm->idx[0 .. return value) the surviving ids, in
   increasing id order. For greedy sampling the one survivor is the argmax (lowest id on ties). */
static int afm__sampler_filter(afm_sampler *sm, const float *logits) {
    int n = sm->n_vocab, i, nc = 0, best = 0, keep;
    float inv_t;
    for (i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (!(sm->p.temperature > 0)) { sm->idx[0] = best; sm->prob[best] = 1; return 1; }
    inv_t = 1.0f / sm->p.temperature;
    for (i = 0; i < n; i++) {
        float p = expf((logits[i] - logits[best]) * inv_t);
        sm->prob[i] = p;
        if (p > 0 && p >= sm->p.min_p) sm->idx[nc++] = i;
    }
    keep = nc;
    if (sm->p.top_k > 0 && sm->p.top_k < keep) keep = sm->p.top_k;
    if (keep < nc || (sm->p.top_p > 0 && sm->p.top_p < 1)) {
        /* Only the most likely candidates need sorting: those at or above a threshold t hold all of
           the top-k and the nucleus once there are at least k of them holding >= top_p of the mass. */
        double total = 0, above, run;
        float t = 1e-2f;
        int m;
        for (i = 0; i < nc; i++) total += sm->prob[sm->idx[i]];
        for (;;) {
            above = 0;
            for (i = 0, m = 0; i < nc; i++)
                if (sm->prob[sm->idx[i]] >= t) { above += sm->prob[sm->idx[i]]; m++; }
            if ((m >= keep || t == 0) && (!(sm->p.top_p > 0 && sm->p.top_p < 1) || above >= sm->p.top_p * total || t == 0)) break;
            t = t > 1e-30f ? t * 1e-3f : 0;
        }
        for (i = 0, m = 0; i < nc; i++)
            if (sm->prob[sm->idx[i]] >= t) { sm->cand[m].p = sm->prob[sm->idx[i]]; sm->cand[m].id = sm->idx[i]; m++; }
        qsort(sm->cand, (size_t)m, sizeof *sm->cand, afm__cmp_cand);
        if (keep > m) keep = m;
        if (sm->p.top_p > 0 && sm->p.top_p < 1) {
            for (i = 0, run = 0; i < keep; i++) {
                run += sm->cand[i].p;
                if (run >= sm->p.top_p * total) { keep = i + 1; break; }
            }
        }
        /* back to id order, so the draw below does not depend on the sort */
        for (i = 0; i < keep; i++) sm->idx[i] = sm->cand[i].id;
        for (i = 1; i < keep; i++) {
            int32_t v = sm->idx[i];
            int j = i - 1;
            while (j >= 0 && sm->idx[j] > v) { sm->idx[j + 1] = sm->idx[j]; j--; }
            sm->idx[j + 1] = v;
        }
        nc = keep;
    }
    return nc;
}

/* Draws one id from weights w over ids idx[0..n) (weights need not be normalised). */
static int32_t afm__draw(uint64_t *rng, const float *w, const int32_t *idx, int n) {
    double sum = 0, r, acc = 0;
    int i;
    for (i = 0; i < n; i++) sum += w[idx[i]];
    r = afm__rng_uniform(rng) * sum;
    for (i = 0; i < n; i++) {
        acc += w[idx[i]];
        if (r < acc) return idx[i];
    }
    return idx[n - 1];
}

AFMDEF int32_t afm_sampler_sample(afm_sampler *sm, const float *logits) {
    int nc = afm__sampler_filter(sm, logits);
    if (!(sm->p.temperature > 0)) return sm->idx[0];
    return afm__draw(sm->rng, sm->prob, sm->idx, nc);
}

/* The sampler's full distribution over the vocabulary (zeros outside the filtered set);
   returns the number of candidates, whose ids are left in sm->idx. */
static int afm__sampler_dist(afm_sampler *sm, const float *logits, float *out) {
    int nc = afm__sampler_filter(sm, logits), i;
    double sum = 0;
    memset(out, 0, (size_t)sm->n_vocab * sizeof *out);
    for (i = 0; i < nc; i++) sum += sm->prob[sm->idx[i]];
    for (i = 0; i < nc; i++) out[sm->idx[i]] = (float)(sm->prob[sm->idx[i]] / sum);
    return nc;
}


/* ======================================================================================== */
/* ==== GENERATION AND SPECULATIVE DECODING =============================================== */
/* ======================================================================================== */

#define AFM__MAX_DRAFT 16

static double afm__now(void) {
#if defined(_WIN32)
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)c.QuadPart / (double)f.QuadPart;
#elif defined(CLOCK_MONOTONIC)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
#else
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec * 1e-6;
#endif
}

/* State of one afm_generate call. */
typedef struct afm__gen {
    afm_session *s;
    const afm_generate_params *p;
    afm_generate_stats *st;
    afm_sampler *sm, *dsm;       /* base sampler (its RNG also decides acceptance), draft sampler */
    int V, kmax, sampled, done, generated, zero_streak;
    int32_t draft[AFM__MAX_DRAFT];
    float *q;                    /* [kmax][V] the draft model's distributions, when sampling */
    float *dist;                 /* [V] scratch distribution */
    int q_valid;                 /* the drafter filled q (a draft model while sampling) */
    double tv[AFM__MAX_DRAFT + 2]; /* seconds to verify n tokens (EMA); 0 = not measured */
    double t_draft_tok;          /* seconds per drafted token (EMA) */
    double acc_hits, acc_trials; /* acceptance, decayed counts */
} afm__gen;

/* Hands a token to the caller; returns 1 when generation must stop after it. */
static int afm__emit(afm__gen *g, int32_t tok) {
    int i;
    g->generated++;
    g->st->n_generated++;
    if (g->p->on_token && g->p->on_token(g->p->user, tok)) return 1;
    for (i = 0; i < g->p->n_stop_tokens; i++)
        if (g->p->stop_tokens[i] == tok) return 1;
    return g->generated >= g->p->n_predict;
}

/* Proposes draft tokens with the draft model's session: syncs it to the context (everything
   but the pending token is shared with the base; it re-evaluates what differs), then runs it. */
static int afm__draft_with_model(afm__gen *g, const int32_t *ctx, int n_ctx, int k) {
    afm_session *d = g->p->draft;
    int c = 0, i;
    while (c < d->pos && c < n_ctx - 1 && d->tokens[c] == ctx[c]) c++;
    if (afm_session_rewind(d, c) != AFM_OK) return 0;
    if (n_ctx - c > d->n_ctx - d->pos || afm_session_eval(d, ctx + c, n_ctx - c) != AFM_OK) return 0;
    for (i = 0; i < k; i++) {
        const float *lg = afm_session_logits(d, -1);
        if (g->sampled) {
            int nc = afm__sampler_dist(g->dsm, lg, g->q + (size_t)i * g->V);
            g->draft[i] = afm__draw(g->dsm->rng, g->q + (size_t)i * g->V, g->dsm->idx, nc);
        } else g->draft[i] = afm_sampler_sample(g->dsm, lg);
        if (i + 1 < k && (d->pos >= d->n_ctx || afm_session_eval(d, &g->draft[i], 1) != AFM_OK)) return i + 1;
    }
    g->q_valid = g->sampled;
    return k;
}

/* Prompt lookup: the continuation of the latest earlier occurrence of the context's last
   n tokens (n = 4 down to 2). Summaries, extraction and rewriting repeat their input. */
static int afm__draft_lookup(afm__gen *g, const int32_t *ctx, int n_ctx, int k) {
    int n, i, j, found;
    for (n = 4; n >= 2; n--) {
        if (n_ctx < n + 1) continue;
        for (i = n_ctx - n - 1; i >= 0; i--) {
            for (j = 0, found = 1; j < n && found; j++) found = ctx[i + j] == ctx[n_ctx - n + j];
            if (found) {
                int m = 0;
                while (m < k && i + n + m < n_ctx) { g->draft[m] = ctx[i + n + m]; m++; }
                return m;
            }
        }
    }
    return 0;
}

/* Verification cost of n tokens (tv[1], one decode step, is measured): measured, or extrapolated
   with the cost per extra token of the largest batch measured so far (optimistic, 10% of a step,
   before any is: an untried k then gets tried once and measured). */
static double afm__verify_cost(const afm__gen *g, int n) {
    double slope = 0.1 * g->tv[1];
    int m;
    if (g->tv[n] > 0) return g->tv[n];
    for (m = AFM__MAX_DRAFT + 1; m > 1; m--)
        if (g->tv[m] > 0) { slope = (g->tv[m] - g->tv[1]) / (m - 1); break; }
    return g->tv[1] + (slope > 0 ? slope : 0) * (n - 1);
}

/* The number of tokens to draft: the k that maximises expected tokens per second, given the
   acceptance rate seen so far and the measured cost of drafting and of verifying k+1 tokens.
   0 means plain decoding; after a while at 0 one short probe checks whether drafts got better. */
static int afm__choose_k(afm__gen *g) {
    double a = g->acc_hits / g->acc_trials, best_rate, e, t, rate;
    int k, best = 0;
    if (g->p->fixed_k) return g->kmax;
    if (!(g->tv[1] > 0)) return 0; /* first measure a plain step: every choice is relative to it */
    if (a > 0.999) a = 0.999;
    best_rate = 1.0 / afm__verify_cost(g, 1);
    for (k = 1; k <= g->kmax; k++) {
        e = (1.0 - pow(a, k + 1)) / (1.0 - a);
        t = afm__verify_cost(g, k + 1) + k * g->t_draft_tok;
        rate = e / t;
        if (rate > best_rate * 1.02) { best_rate = rate; best = k; }
    }
    if (best == 0 && ++g->zero_streak >= 16) { g->zero_streak = 0; return 1; }
    if (best) g->zero_streak = 0;
    return best;
}

static void afm__ema(double *v, double x) { *v = *v > 0 ? 0.8 * *v + 0.2 * x : x; }

/* One round: verify [x, drafts] in one forward pass, keep the longest valid prefix, pick the
   next pending token. Returns the new pending token through *x; sets g->done when finished. */
static afm_result afm__round(afm__gen *g, int32_t *x) {
    afm_session *s = g->s;
    const afm_generate_params *p = g->p;
    int P = s->pos, k = 0, j, i, n_ctx;
    int32_t batch[AFM__MAX_DRAFT + 1], next = 0;
    double t0, t1;
    afm_result r;

    if (P + 1 >= s->n_ctx) { g->done = 1; return AFM_OK; }
    k = afm__choose_k(g);
    if (k > s->n_ctx - P - 1) k = s->n_ctx - P - 1;
    if (k > p->n_predict - g->generated) k = p->n_predict - g->generated;
    g->q_valid = 0;
    t0 = afm__now();
    if (k > 0) {
        /* the context the drafter continues: the session's tokens, then the pending one */
        n_ctx = P + 1;
        s->tokens[P] = *x; /* the slot after the last evaluated token is free until the eval */
        if (p->draft_fn) k = p->draft_fn(p->draft_user, s->tokens, n_ctx, k, g->draft);
        else if (p->draft) k = afm__draft_with_model(g, s->tokens, n_ctx, k);
        else if (p->lookup) k = afm__draft_lookup(g, s->tokens, n_ctx, k);
        else k = 0;
        if (k < 0) k = 0;
        for (i = 0; i < k; i++)
            if (g->draft[i] < 0 || g->draft[i] >= g->V) k = i; /* a drafter's bad token ends the draft */
    }
    t1 = afm__now();
    if (k > 0) { g->st->t_draft += t1 - t0; afm__ema(&g->t_draft_tok, (t1 - t0) / k); }

    batch[0] = *x;
    for (i = 0; i < k; i++) batch[i + 1] = g->draft[i];
    if ((r = afm__eval(s, batch, k + 1, k > 0)) != AFM_OK) return r;
    t0 = afm__now();
    g->st->t_verify += t0 - t1;
    afm__ema(&g->tv[k + 1], t0 - t1);
    g->st->n_steps++;
    g->st->n_drafted += k;

    /* accept drafts while the base agrees (greedy) or by min(1, p/q) (sampling) */
    for (j = 0; j < k; j++) {
        const float *lg = afm_session_logits(s, j);
        int32_t d = g->draft[j];
        if (!g->sampled) {
            next = afm_sampler_sample(g->sm, lg);
            if (next != d) break;
        } else {
            float pd, qd;
            afm__sampler_dist(g->sm, lg, g->dist);
            pd = g->dist[d];
            qd = g->q_valid ? g->q[(size_t)j * g->V + d] : 1.0f;
            if (!(afm__rng_uniform(g->sm->rng) * qd < pd) && !s->test_accept_rule) {
                /* rejected: draw from the residual max(0, p - q), normalised */
                int n = 0, v;
                for (v = 0; v < g->V; v++) {
                    float w = g->dist[v] - (g->q_valid ? g->q[(size_t)j * g->V + v] : (v == d ? 1.0f : 0.0f));
                    g->dist[v] = w > 0 ? w : 0;
                    if (w > 0) g->sm->idx[n++] = v;
                }
                next = n ? afm__draw(g->sm->rng, g->dist, g->sm->idx, n) : d;
                break;
            }
        }
        g->st->n_accepted++;
    }
    if (k > 0) {
        g->acc_hits = 0.9 * g->acc_hits + j;
        g->acc_trials = 0.9 * g->acc_trials + j + (j < k);
    }
    if (j == k) next = afm_sampler_sample(g->sm, afm_session_logits(s, k)); /* every draft accepted: a bonus token */
    afm_session_rewind(s, P + 1 + j);
    for (i = 0; i < j; i++)
        if (afm__emit(g, g->draft[i])) {
            afm_session_rewind(s, P + 2 + i);
            g->done = 1;
            return AFM_OK;
        }
    *x = next;
    if (afm__emit(g, next)) g->done = 2; /* stop, with the pending token still to evaluate */
    return AFM_OK;
}

AFMDEF afm_result afm_generate(afm_session *s, const int32_t *prompt, int n_prompt, const afm_generate_params *p,
                               afm_generate_stats *stats) {
    afm__gen g;
    afm_generate_stats local;
    afm_sampler_params dp;
    afm_result r;
    int32_t x;
    double t_start = afm__now();
    if (!s || !p || (n_prompt > 0 && !prompt) || n_prompt < 0 || p->n_predict < 0 || p->draft_k < 0 || p->n_stop_tokens < 0 ||
        (p->n_stop_tokens && !p->stop_tokens))
        return s ? afm__serr(s, AFM_ERR_ARG, "afm_generate: invalid parameters") : AFM_ERR_ARG;
    if (p->draft && (p->draft == s || p->draft->model->config.vocab_size != s->model->config.vocab_size))
        return afm__serr(s, AFM_ERR_ARG, "afm_generate: the draft session must be another session with the same vocabulary");
    if (!stats) stats = &local;
    memset(stats, 0, sizeof *stats);
    memset(&g, 0, sizeof g);
    g.s = s;
    g.p = p;
    g.st = stats;
    g.V = s->model->config.vocab_size;
    g.sampled = p->sampler.temperature > 0;
    g.kmax = p->draft_k ? p->draft_k : s->adapter ? s->adapter->draft_token_count : 5;
    if (g.kmax > AFM__MAX_DRAFT) g.kmax = AFM__MAX_DRAFT;
    g.acc_hits = 3;   /* prior: 60% acceptance until measured */
    g.acc_trials = 5;
    if (n_prompt == 0 && !afm_session_logits(s, -1))
        return afm__serr(s, AFM_ERR_ARG, "afm_generate: no prompt and no logits to continue from");
    if ((r = afm_sampler_create(&p->sampler, g.V, &s->model->alloc, &g.sm)) != AFM_OK) return afm__serr(s, r, "afm_generate: bad sampler parameters");
    dp = p->sampler;
    dp.seed ^= 0x9e3779b97f4a7c15ull; /* the draft's own random stream */
    r = afm_sampler_create(&dp, g.V, &s->model->alloc, &g.dsm);
    g.dist = (float *)afm__alloc(&s->model->alloc, (size_t)g.V * sizeof(float));
    g.q = p->draft && g.sampled ? (float *)afm__alloc(&s->model->alloc, (size_t)g.kmax * g.V * sizeof(float)) : NULL;
    if (r != AFM_OK || !g.dist || (p->draft && g.sampled && !g.q)) { r = afm__serr(s, AFM_ERR_NOMEM, "afm_generate: out of memory"); goto out; }

    if (n_prompt > 0) {
        if ((r = afm_session_eval(s, prompt, n_prompt)) != AFM_OK) goto out;
        stats->n_prompt = n_prompt;
    }
    stats->t_prompt = afm__now() - t_start;
    if (p->n_predict == 0) goto out;
    x = afm_sampler_sample(g.sm, afm_session_logits(s, -1));
    if (afm__emit(&g, x)) g.done = 2;
    while (!g.done && (r = afm__round(&g, &x)) == AFM_OK) {}
    if (r == AFM_OK && g.done == 2 && s->pos < s->n_ctx) r = afm__eval(s, &x, 1, 0); /* every emitted token ends up in the cache */
out:
    stats->t_total = afm__now() - t_start;
    afm__free(&s->model->alloc, g.dist);
    afm__free(&s->model->alloc, g.q);
    afm_sampler_free(g.sm);
    afm_sampler_free(g.dsm);
    return r;
}

#endif /* AFM_IMPLEMENTATION_DONE */
#endif /* AFM_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
MIT License

Copyright (c) 2026 the afm.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
