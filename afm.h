/* afm.h - v0.1 - Apple on-device foundation model (AFMTextV7) inference in one C header.

   Runs the AFMTextV7 family - the 3.18B two-segment base, its 48.8M draft model and rank-32
   LoRA adapters - on any CPU, exact to Apple's MLX reference. No dependencies.

   DO THIS in exactly one C or C++ file:
       #define AFM_IMPLEMENTATION
       #include "afm.h"
   Everywhere else just #include "afm.h". afm.h alone is the whole library for AFM models; only
   tokenizer.json support (AFM_HF_TOKENIZER below) needs afm_tokenizer.h next to it.

   USAGE (examples/simple.c is this program, complete):
       afm_model *m; afm_tokenizer *tok; afm_session *s; char err[256];
       if (afm_model_load_file("model.afm", NULL, &m, err, sizeof err) != AFM_OK) { puts(err); return 1; }
       afm_model_tokenizer(m, NULL, &tok, err, sizeof err);             // stored in the model file
       afm_chat_message msg = { "user", "Hello!" };                     // AFM chat format -> token ids
       afm_chat_tokenize(tok, &msg, 1, NULL, 0, 1, prompt, cap, &n_prompt);
       afm_session_create(m, NULL, &s);                                 // one conversation
       afm_generate_params gp = {0};  gp.n_predict = 200;               // greedy; sampler params for more
       gp.stop_tokens = &turn_end; gp.n_stop_tokens = 1;                // afm_tokenizer_special(...)
       gp.on_token = print_piece;  gp.user = &detok;                    // afm_detokenizer_push -> text
       afm_generate(s, prompt, n_prompt, &gp, NULL);
       afm_session_free(s); afm_tokenizer_free(tok); afm_model_free(m);
   Lower level: afm_session_eval (prefill / one step), afm_session_logits, afm_sampler_sample.

   Where things are: the implementation's sections follow a token from text to logits - errors,
   allocation, platform (files, threads), file loader, JSON, tokenizer, kernels, LoRA adapters,
   sessions, forward pass, sampling, generation - each under a "==== NAME ====" banner.
   docs/ARCHITECTURE.md is the map; docs/MODEL.md the model's semantics; docs/FORMAT.md the files.

   CONFIGURATION MACROS (define before including the implementation)
       AFM_STATIC           make every API function static (private copy in one translation unit)
       AFM_NO_THREADS       no thread pool; everything runs on the caller's thread
       AFM_NO_MMAP          never map files; read them into memory instead
       AFM_NO_HUGE_PAGES    Linux: do not ask for transparent huge pages for a model's weights (see
                            afm_model_load_file)
       AFM_NO_SIMD          scalar kernels only (the reference every SIMD kernel is tested against)
       AFM_HF_TOKENIZER     also load Hugging Face tokenizer.json files (byte-level BPE); needs
                            afm_tokenizer.h (generated Unicode tables) next to afm.h
       AFM_ASSERT(x)        your assert (default: assert from <assert.h>); checks internal invariants and
                            the lifetime rules below (cheap counts, checked when a model or adapter is freed)
       AFM__PF_DIST         tuning: bytes the kernels prefetch ahead in a weight stream on the first
                            pass over it (decode, verification: each weight is read once, from memory);
                            default 2048, 0 turns software prefetch off
       AFM__PF_NEXT         tuning: bytes of its first rows of the next matrix product that each worker
                            thread pulls into its cache between two products; default 65536, 0: off
       AFM_TESTING          test hooks for tests/test_main.c; never in a real build

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
    AFM_ERR_THREAD,       /* a worker thread could not be started */
    AFM_ERR_NUMERIC       /* the model computed logits that are NaN or +inf (or all -inf): no token
                             can be chosen; the message names the position */
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

/* Loads a model file. On failure *out is NULL and err (if given) holds a message. The file is
   never written. The loader rearranges each 2-bit (Q2B) matrix in place into the layout the kernels
   read, once, which reads the whole file at load (about a second for the 955 MB base) and makes
   those pages the process's own memory. On Linux (x86-64, arm64), with the default allocator, the
   file is read into memory advised for transparent huge pages: a decode step streams every weight,
   and with 4 KiB pages the TLB misses cost 12-17 % of its speed. Elsewhere, or with your allocator,
   the file is mapped privately (copy-on-write) and tensors other than Q2B are used where they are
   mapped. no_mmap: always read (into your allocator's memory if you gave one). */
AFMDEF afm_result afm_model_load_file(const char *path, const afm_load_params *params,
                                      afm_model **out, char *err, size_t err_size);
/* Loads from memory the caller keeps alive and unchanged until afm_model_free. The bytes are
   never written: 2-bit (Q2B) matrices are rearranged into buffers of the model's own (their size
   again); the rest is used in place (a buffer not 64-byte aligned is copied once, and then
   rearranged in place). */
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

/* ---- Tokenizer: SentencePiece BPE (the AFM model's own) and byte-level BPE from tokenizer.json. ----
   A tokenizer is immutable after loading and may be shared by threads; every call allocates its own
   scratch memory. Token ids are int32_t. Text is UTF-8; invalid UTF-8 is accepted everywhere (the
   SentencePiece normalizer turns each invalid byte into U+FFFD, as the sentencepiece library does; the
   byte-level tokenizers keep the bytes). */
typedef struct afm_tokenizer afm_tokenizer;

#define AFM_TOKENIZER_SENTENCEPIECE 1 /* the bytes of a SentencePiece ModelProto (tokenizer.model) */
#define AFM_TOKENIZER_HF_JSON 2       /* the bytes of a Hugging Face tokenizer.json (byte-level BPE) */

/* Loads a tokenizer from the bytes of a tokenizer file; kind is one of the two above (the kind field
   of the model file's tokenizer section). The bytes are copied: they may be freed after the call.
   On failure *out is NULL and err (if given) says what is wrong and where. */
AFMDEF afm_result afm_tokenizer_load(const void *data, size_t size, int kind, const afm_allocator *allocator,
                                     afm_tokenizer **out, char *err, size_t err_size);
/* The tokenizer stored in a model file (afm_model_tokenizer_bytes). */
AFMDEF afm_result afm_model_tokenizer(const afm_model *model, const afm_allocator *allocator,
                                      afm_tokenizer **out, char *err, size_t err_size);
AFMDEF void afm_tokenizer_free(afm_tokenizer *tok);
AFMDEF int afm_tokenizer_kind(const afm_tokenizer *tok);
AFMDEF int afm_tokenizer_n_vocab(const afm_tokenizer *tok);
/* The vocabulary string of a token (SentencePiece pieces use U+2581 for spaces; byte-level vocabularies
   use the GPT-2 byte alphabet), not NUL-terminated. NULL for an id out of range. */
AFMDEF const char *afm_tokenizer_piece(const afm_tokenizer *tok, int32_t id, size_t *len);
/* The id of a vocabulary string, -1 if none. */
AFMDEF int32_t afm_tokenizer_piece_id(const afm_tokenizer *tok, const char *piece, size_t len);

typedef enum afm_token_type {
    AFM_TOKEN_NORMAL = 1,       /* SentencePiece types, in its numbering */
    AFM_TOKEN_UNKNOWN = 2,
    AFM_TOKEN_CONTROL = 3,      /* also: tokenizer.json special added tokens */
    AFM_TOKEN_USER_DEFINED = 4, /* also: tokenizer.json non-special added tokens */
    AFM_TOKEN_UNUSED = 5,
    AFM_TOKEN_BYTE = 6
} afm_token_type;
AFMDEF afm_token_type afm_tokenizer_token_type(const afm_tokenizer *tok, int32_t id); /* 0 if out of range */

/* Token ids with a meaning; -1 when the vocabulary has none. */
typedef enum afm_special_token {
    AFM_SPECIAL_BOS = 0,  /* SentencePiece bos_piece if CONTROL (tokenizer.json: none) */
    AFM_SPECIAL_EOS,      /* SentencePiece eos_piece if CONTROL (tokenizer.json: none) */
    AFM_SPECIAL_UNK,
    AFM_SPECIAL_PAD,
    AFM_SPECIAL_NEWLINE,  /* AFM: "<n>" */
    AFM_SPECIAL_TURN_START, /* AFM: "<turn_start>" */
    AFM_SPECIAL_TURN_END,   /* AFM: "<turn_end>" - generation stops here */
    AFM_SPECIAL_EXEC_START, /* AFM: "<executable_start>" - a tool call begins */
    AFM_SPECIAL_EXEC_END,   /* AFM: "<executable_end>" */
    AFM_SPECIAL_COUNT
} afm_special_token;
AFMDEF int32_t afm_tokenizer_special(const afm_tokenizer *tok, afm_special_token which);
/* 1 if generation should stop at this token: AFM's <turn_end>, or EOS. */
AFMDEF int afm_tokenizer_is_stop(const afm_tokenizer *tok, int32_t id);

/* Flags of afm_tokenize / afm_detokenize / afm_detokenizer_init. */
#define AFM_TOK_NEWLINE 1u /* the AFM layer: "\n" is encoded as the <n> token and <n> decodes to "\n" */
#define AFM_TOK_SPECIAL 2u /* encode: CONTROL pieces written in the text are tokens too (user-defined ones
                              always are; tokenizer.json added tokens always are, as in `tokenizers`).
                              decode: CONTROL pieces / special added tokens are written out as their text
                              (default: they decode to nothing, as both reference libraries do) */
#define AFM_TOK_AFM AFM_TOK_NEWLINE

/* Encodes text exactly as the reference library does (sentencepiece's Encode, or tokenizers'
   encode(text, add_special_tokens=False)). Writes at most cap ids; *n_tokens gets the number of ids of
   the whole text. Returns AFM_ERR_ARG (writing the first cap ids) when cap is too small: call again
   with *n_tokens room. tokens may be NULL when cap is 0. */
AFMDEF afm_result afm_tokenize(const afm_tokenizer *tok, const char *text, size_t len, unsigned flags,
                               int32_t *tokens, size_t cap, size_t *n_tokens);

/* Decodes ids to UTF-8 text as the reference does (sentencepiece's Decode; tokenizers'
   decode(ids, skip_special_tokens=True)): byte tokens are reassembled into characters, an invalid
   byte sequence becomes U+FFFD. Writes at most cap-1 bytes and a NUL; *len gets the full length.
   Returns AFM_ERR_ARG when cap is too small (call again with *len + 1), or for an id out of range. */
AFMDEF afm_result afm_detokenize(const afm_tokenizer *tok, const int32_t *tokens, size_t n_tokens, unsigned flags,
                                 char *text, size_t cap, size_t *len);

/* Streaming detokenizer: push ids one at a time as they are generated; the concatenated output equals
   afm_detokenize of all of them, and no call ever emits part of a UTF-8 character (bytes of an
   incomplete character are held back until it completes or turns out invalid). */
typedef struct afm_detokenizer {
    const afm_tokenizer *tok;
    unsigned flags;
    int at_start, bos_ws_seen, text_empty; /* SentencePiece's leading-space state */
    int n_pending;
    unsigned char pending[4];
} afm_detokenizer;
AFMDEF void afm_detokenizer_init(afm_detokenizer *d, const afm_tokenizer *tok, unsigned flags);
/* Writes the text this id completes (not NUL-terminated) to out, *n_out bytes. If cap is too small the
   call changes nothing, sets *n_out to the room needed and returns AFM_ERR_ARG. A cap of
   afm_tokenizer_max_token_bytes() + 16 is always enough. */
AFMDEF afm_result afm_detokenizer_push(afm_detokenizer *d, int32_t id, char *out, size_t cap, size_t *n_out);
/* End of the stream: writes whatever is held back (as U+FFFD). */
AFMDEF afm_result afm_detokenizer_flush(afm_detokenizer *d, char *out, size_t cap, size_t *n_out);
AFMDEF size_t afm_tokenizer_max_token_bytes(const afm_tokenizer *tok);

/* ---- AFM chat format (docs/MODEL.md section 7). ---- */
typedef struct afm_chat_message {
    const char *role;    /* "system", "user", "assistant", ... */
    const char *content; /* UTF-8, may contain "\n" */
} afm_chat_message;

/* Renders a conversation as AFM's prompt text:
       <turn_start> system<n>{system}[<n>system tools: {tool}<n>{tool}...]<turn_end>
       <turn_start> {role}<n>{content}<turn_end>   (each message)
       <turn_start> assistant<n>                   (if add_generation_prompt)
   The system message is the first message when its role is "system", else the default
   "A conversation between a user and a helpful assistant.". tools are JSON strings, one per tool (may be
   NULL when n_tools is 0). Newlines inside contents stay "\n" (the encoder maps them to <n>). Writes at
   most cap-1 bytes and a NUL; *len gets the full length; AFM_ERR_ARG when cap is too small. */
AFMDEF afm_result afm_chat_render(const afm_chat_message *messages, int n_messages, const char *const *tools,
                                  int n_tools, int add_generation_prompt, char *text, size_t cap, size_t *len);
/* Renders and encodes a conversation the way AFM's prompts start: the rendered text is encoded with
   AFM_TOK_NEWLINE (plus AFM_TOK_SPECIAL when the vocabulary has <turn_start> as a CONTROL piece rather
   than a user-defined one), its first token dropped and the EOS id prepended. Same buffer rules as
   afm_tokenize. AFM_ERR_UNSUPPORTED when the vocabulary has no EOS. Note that marker text inside message
   contents (a literal "<turn_end>") becomes the marker token, as with the reference tokenizer. */
AFMDEF afm_result afm_chat_tokenize(const afm_tokenizer *tok, const afm_chat_message *messages, int n_messages,
                                    const char *const *tools, int n_tools, int add_generation_prompt,
                                    int32_t *tokens, size_t cap, size_t *n_tokens);
/* Finds the next tool call in generated text (decoded with AFM_TOK_NEWLINE | AFM_TOK_SPECIAL), starting
   at *pos: the text between "<executable_start>" and "<executable_end>" (or the end of the text if the
   end tag has not come yet), without a surrounding ```function ... ``` fence. Returns 1 and advances *pos
   past the call, or 0 when there is none. *complete is 1 when the end tag was seen (may be NULL). */
AFMDEF int afm_tool_call_next(const char *text, size_t len, size_t *pos, const char **call, size_t *call_len,
                              int *complete);

/* ---- Sessions: one conversation timeline over a model. Many may share one model.
   Lifetimes: a model must outlive its sessions and adapters, and an adapter the sessions that use
   it (free in the reverse order of creation; afm_session_set_adapter(s, NULL) releases one).
   Freeing out of order is a use-after-free; builds with assertions (AFM_ASSERT) stop there. ---- */
typedef enum afm_kv_type {
    AFM_KV_AUTO = 0, /* int8 when the model has KV scales (exact to Apple), else F16 */
    AFM_KV_F32,
    AFM_KV_F16,
    AFM_KV_INT8      /* requires the model's KV scales */
} afm_kv_type;

/* Kernel levels: the SIMD code the matrix products use. Every level computes the same bits (the
   summation contract in the KERNELS section), so the level changes speed, never results. */
typedef enum afm_kernels {
    AFM_KERNELS_AUTO = 0,       /* the best level this CPU and build have */
    AFM_KERNELS_SCALAR,         /* portable C, the reference */
    AFM_KERNELS_AVX2,           /* x86-64: AVX2 + FMA + F16C */
    AFM_KERNELS_AVX512,         /* x86-64: AVX-512 F/BW/DQ/VL */
    AFM_KERNELS_AVX512VNNI,     /* x86-64: AVX-512 + VNNI */
    AFM_KERNELS_NEON,           /* arm64: NEON */
    AFM_KERNELS_NEON_DOTPROD,   /* arm64: NEON + the dot-product extension (a build with -march=...+dotprod) */
    AFM_KERNELS_AMX             /* x86-64: AVX-512 VNNI + AMX-INT8 tiles for batches (Linux; gcc >= 11, clang >= 12) */
} afm_kernels;
/* "scalar", "avx2", "avx512", "avx512vnni", "neon", "neon-dotprod", "amx" ("auto" for AFM_KERNELS_AUTO), NULL if unknown. */
AFMDEF const char *afm_kernels_name(afm_kernels level);
/* The level named (as afm_kernels_name writes it); -1 if the name is unknown. */
AFMDEF int afm_kernels_from_name(const char *name);
/* 1 if this CPU and build can run the level (AFM_KERNELS_AUTO: always). */
AFMDEF int afm_kernels_supported(afm_kernels level);
/* The level AFM_KERNELS_AUTO picks here. */
AFMDEF afm_kernels afm_kernels_best(void);

typedef struct afm_session_params {
    int n_ctx;          /* context limit in tokens; 0: the model's context_length */
    int n_threads;      /* worker threads including the caller; 0: 1 */
    int n_batch;        /* tokens per forward pass during prefill; 0: 256. Lowered when one batch's
                           scratch would outweigh max(64 MiB, the model file's size): memory before
                           any token is cached stays bounded by the file's size */
    int all_logits;     /* keep logits for every position of an eval, not just the last */
    int preallocate;    /* reserve the whole KV cache now instead of growing it on demand */
    afm_kv_type kv_type;
    int f32_activations; /* quantized weights meet f32 activations (decoded row by row: slow, exact to
                            the decoded weights) instead of int8 activation blocks (fast, the default);
                            attention over an int8 cache then runs in float too, not on int16 codes */
    afm_kernels kernels; /* AFM_KERNELS_AUTO (0): the best this CPU has; else that level, and
                            afm_session_create fails with AFM_ERR_UNSUPPORTED if the CPU lacks it */
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
/* The kernel level the session runs (AFM_KERNELS_AUTO resolved). */
AFMDEF afm_kernels afm_session_kernels(const afm_session *session);
/* The KV cache's element type (AFM_KV_AUTO resolved: what the session actually stores). */
AFMDEF afm_kv_type afm_session_kv_type(const afm_session *session);
AFMDEF const char *afm_session_error(const afm_session *session);

/* ---- Saved sessions (prompt caching): a session's tokens, KV cache and last logits as bytes, in a
   buffer or a file (docs/FORMAT.md, "The session state file"). A state is tied to the model and the
   adapter it was made with: loading it into a session on another model, or with another adapter
   chosen (afm_session_set_adapter first), or with another KV type, is refused with a message saying
   which. Loading checks every field before it changes the session; on failure the session is as it
   was. A loaded session continues exactly as the saved one would have: same cache, same logits. ---- */
/* Bytes afm_session_save writes for the session as it is now. */
AFMDEF size_t afm_session_state_size(const afm_session *session);
/* Writes the state to buf; *size gets its length. AFM_ERR_ARG (nothing written) when cap is smaller
   than afm_session_state_size(). */
AFMDEF afm_result afm_session_save(const afm_session *session, void *buf, size_t cap, size_t *size);
AFMDEF afm_result afm_session_load(afm_session *session, const void *data, size_t size, char *err, size_t err_size);
AFMDEF afm_result afm_session_save_file(const afm_session *session, const char *path, char *err, size_t err_size);
AFMDEF afm_result afm_session_load_file(afm_session *session, const char *path, char *err, size_t err_size);

/* ---- Sampling: greedy when temperature <= 0. Seeded and deterministic: one uniform number of the
   seed's stream per sampled token, picked by inverse cumulative probability in id order. ---- */
typedef struct afm_sampler_params {
    float temperature;  /* 0: greedy; +inf and NaN are refused; below ~3e-39 it is greedy */
    int top_k;          /* 0: off */
    float top_p;        /* 0 or 1: off */
    float min_p;        /* 0: off */
    uint64_t seed;
    /* penalties on the tokens among the last penalty_last_n ones the sampler accepted (afm_sampler_accept;
       afm_generate accepts the context before the first new token - prompt included, as llama.cpp does -
       and every token it generates). All 0: off. */
    float repeat_penalty;     /* 0 or 1: off; > 1 divides a seen token's positive logit, multiplies a negative one */
    float presence_penalty;   /* subtracted once from the logit of every seen token (OpenAI; -2 .. 2 there) */
    float frequency_penalty;  /* subtracted once per occurrence (OpenAI) */
    int penalty_last_n;       /* the window; 0: 64, -1: every accepted token */
    const struct afm_logit_bias *logit_bias; /* added to the logits first; -INFINITY bans a token. Copied */
    int n_logit_bias;
} afm_sampler_params;

typedef struct afm_sampler afm_sampler;
AFMDEF afm_result afm_sampler_create(const afm_sampler_params *params, int vocab_size,
                                     const afm_allocator *allocator, afm_sampler **out);
AFMDEF void afm_sampler_free(afm_sampler *sampler);
/* A token id, or -1 when none can be chosen: logits is NULL, holds a NaN or +inf, or every logit
   is -inf. (afm_generate turns that into AFM_ERR_NUMERIC.) */
AFMDEF int32_t afm_sampler_sample(afm_sampler *sampler, const float *logits);

/* ---- Sampler additions: logit bias, penalties, stop strings, token counts. ---- */
typedef struct afm_logit_bias {
    int32_t token;
    float bias;               /* finite, or -INFINITY */
} afm_logit_bias;
/* Records a token in the sampler's penalty window (the sampled ones are not recorded by themselves:
   the caller decides what the model actually continued with). AFM_ERR_ARG for an id out of range. */
AFMDEF afm_result afm_sampler_accept(afm_sampler *sampler, int32_t token);
/* Empties the penalty window. */
AFMDEF void afm_sampler_reset(afm_sampler *sampler);
/* The sampler's state - its random-number generator and penalty window - as bytes (*size gets the
   length; buf may be NULL to ask), and back into a sampler made with the same vocabulary size and
   penalty window, so a generation saved with afm_session_save and this continues as if never
   interrupted. Loading checks everything (AFM_ERR_FORMAT and err saying what, sampler unchanged). */
AFMDEF afm_result afm_sampler_save(const afm_sampler *sampler, void *buf, size_t cap, size_t *size);
AFMDEF afm_result afm_sampler_load(afm_sampler *sampler, const void *data, size_t size, char *err, size_t err_size);

/* Stop strings: generation ends when the generated text contains one of them, also when it is split
   across tokens. Text is pushed as it is decoded; what comes back is the text that is certain not to
   belong to a stop string (a tail that could still become one is held back until it cannot). */
typedef struct afm_stop afm_stop;
/* n_stops strings (each non-empty; copied). */
AFMDEF afm_result afm_stop_create(const char *const *stops, int n_stops, const afm_allocator *allocator, afm_stop **out);
AFMDEF void afm_stop_free(afm_stop *stop);
/* Pushes the next piece of text. *out (valid until the next call) and *n_out get the text to show
   now. Returns 1 when a stop string has completed - *out then ends just before it and everything from
   it on is dropped, as are later pushes - 0 otherwise, -1 when out of memory. */
AFMDEF int afm_stop_push(afm_stop *stop, const char *text, size_t len, const char **out, size_t *n_out);
/* At the end of generation without a stop: the held-back tail. */
AFMDEF void afm_stop_flush(afm_stop *stop, const char **out, size_t *n_out);

/* Exact token counts: the number of ids afm_tokenize / afm_chat_tokenize produce; -1 on an error. */
AFMDEF long afm_token_count(const afm_tokenizer *tok, const char *text, size_t len, unsigned flags);
AFMDEF long afm_chat_token_count(const afm_tokenizer *tok, const afm_chat_message *messages, int n_messages,
                                 const char *const *tools, int n_tools, int add_generation_prompt);

/* ---- Constraints (guided generation): the output is guaranteed to match a regular expression, a
   GBNF grammar (llama.cpp's format) or a JSON Schema. A constraint compiles once and is immutable
   (share it across sessions and threads); a vocabulary object holds the tokenizer's token bytes
   and their prefix tree (build it once per tokenizer); a constraint state follows one output
   and gives the exact set of allowed tokens at each step: a token is allowed iff the output so far
   plus its bytes can still be extended to a complete match, and the stop tokens (<turn_end>, EOS)
   iff the output is complete. Token bytes are those of afm_detokenize with AFM_TOK_NEWLINE (U+2581
   is a space, <n> a newline, byte tokens their byte), except that a leading space is never dropped;
   chat markers and other control tokens are never allowed. The match is over the whole output. A
   state is used by one thread at a time. docs/CONSTRAINTS.md has the details and the JSON Schema
   subset (compact JSON, properties in schema order, no extra properties). ---- */
typedef enum afm_constraint_kind {
    AFM_CONSTRAINT_REGEX = 1,      /* a regular expression; the whole output must match */
    AFM_CONSTRAINT_GBNF = 2,       /* a GBNF grammar; its rule `root` is the whole output */
    AFM_CONSTRAINT_JSON_SCHEMA = 3 /* a JSON Schema (the subset in docs/CONSTRAINTS.md) */
} afm_constraint_kind;
typedef struct afm_constraint afm_constraint;
typedef struct afm_constraint_vocab afm_constraint_vocab;
typedef struct afm_constraint_state afm_constraint_state;

/* Compiles text[0, len). On failure *out is NULL, AFM_ERR_FORMAT, and err says what and where
   (offset, grammar line and column, or schema path). */
AFMDEF afm_result afm_constraint_compile(afm_constraint_kind kind, const char *text, size_t len,
                                         const afm_allocator *allocator, afm_constraint **out, char *err,
                                         size_t err_size);
AFMDEF void afm_constraint_free(afm_constraint *c);
/* The tokens' bytes and their prefix tree; the tokenizer may be freed afterwards. */
AFMDEF afm_result afm_constraint_vocab_create(const afm_tokenizer *tok, const afm_allocator *allocator,
                                              afm_constraint_vocab **out);
AFMDEF void afm_constraint_vocab_free(afm_constraint_vocab *v);
/* A state at the start of the output. c and v must outlive it. */
AFMDEF afm_result afm_constraint_state_create(const afm_constraint *c, const afm_constraint_vocab *v,
                                              afm_constraint_state **out);
AFMDEF void afm_constraint_state_free(afm_constraint_state *s);
/* The allowed tokens now: a bit set of n_vocab bits (token t: bit t % 32 of word t / 32), valid until
   the next call on the state. NULL when the state failed (afm_constraint_state_error says why). */
AFMDEF const uint32_t *afm_constraint_state_mask(afm_constraint_state *s);
AFMDEF int afm_constraint_state_allows(afm_constraint_state *s, int32_t token);
/* Appends a token to the output; AFM_ERR_ARG (state unchanged) when it is not allowed. */
AFMDEF afm_result afm_constraint_state_advance(afm_constraint_state *s, int32_t token);
/* The number of tokens appended so far, and a return to the output's first n_tokens tokens. */
AFMDEF int afm_constraint_state_n_tokens(const afm_constraint_state *s);
AFMDEF afm_result afm_constraint_state_rewind(afm_constraint_state *s, int n_tokens);
/* 1 when the output so far is a complete match (or ended with a stop token). */
AFMDEF int afm_constraint_state_complete(const afm_constraint_state *s);
/* Fast-forward: when the next bytes are the only possible continuation (the `{"name":"` of a
   schema), tokens spelling them (greedily the longest), at most cap; 0 when there is a choice. */
AFMDEF int afm_constraint_state_forced(afm_constraint_state *s, int32_t *tokens, int cap);
AFMDEF const char *afm_constraint_state_error(const afm_constraint_state *s);
/* Apple's way of prompting for guided generation: the schema shown to the model as well. Renders
   the instruction text for a JSON Schema: the line AFM_SCHEMA_PROMPT_INTRO, a line break, then the
   schema as compact JSON (whitespace outside strings dropped; descriptions kept, since they tell
   the model what each field means). The CLI appends it to the user's message after a blank line.
   Writes at most cap bytes with a NUL (text may be NULL with cap 0 to ask for the length); *len is
   the length without the NUL. AFM_ERR_ARG when the text does not fit, AFM_ERR_FORMAT when the
   schema's strings or brackets do not match up (or nest deeper than 256). docs/CONSTRAINTS.md. */
#define AFM_SCHEMA_PROMPT_INTRO "Respond with JSON that follows this JSON schema:"
AFMDEF afm_result afm_schema_prompt(const char *schema, size_t schema_len, char *text, size_t cap, size_t *len);
/* Samples only among the tokens whose bit is set in allowed (NULL: all); -1 when none is. */
AFMDEF int32_t afm_sampler_sample_masked(afm_sampler *sampler, const float *logits, const uint32_t *allowed);


/* ---- LoRA adapters (docs/MODEL.md section 3): y = W x + (alpha / rank) * B (A x) on every adapted
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
   drafts that equal its own picks, so the output is what the base alone produces, token for token,
   greedy or sampled: the base draws every token with the same random number as without a drafter
   (one per token, in order), whatever the drafter proposes and whatever K is. Same seed, same text:
   across runs, thread counts, load, drafters and K. K adapts to the measured acceptance and costs
   (timings change only the speed); 0 means plain decoding. A draft model draws its proposals with
   the base's numbers, so it agrees whenever its distribution puts a number on the same token. ---- */

/* A custom drafter: propose up to k tokens continuing context[0 .. n_context) into draft;
   return how many (0 for none; more than k is taken as k, but the drafter must write at most k).
   Called with the base's context; must not keep the pointer. */
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
    int fixed_k;                    /* always draft draft_k tokens instead of adapting (K is chosen from
                                       the acceptance seen and the verification costs the session has
                                       measured, in this call and earlier ones) */
    /* guided generation: every token (sampled, drafted, fast-forwarded) is one the constraint allows,
       and the state advances with each; it must start where this generation starts (a fresh state
       for a fresh reply). Generation ends after a stop token the constraint allowed (the output is
       then complete) or at n_predict (afm_constraint_state_complete says whether it got there). */
    afm_constraint_state *constraint;
    int no_fast_forward;            /* sample even the tokens the constraint forces (default: appended as one batch) */
} afm_generate_params;

/* Why afm_generate stopped. */
typedef enum afm_stop_reason {
    AFM_STOP_NONE = 0,       /* n_predict was 0, or an error other than a full context */
    AFM_STOP_N_PREDICT,      /* n_predict tokens were generated */
    AFM_STOP_TOKEN,          /* one of the stop tokens was generated */
    AFM_STOP_CALLBACK,       /* on_token returned non-zero */
    AFM_STOP_CONTEXT_FULL    /* the session's context is full (afm_generate returned AFM_ERR_CONTEXT_FULL) */
} afm_stop_reason;

typedef struct afm_generate_stats {
    int n_prompt, n_generated;
    int n_steps;                    /* base forward passes after the prompt */
    int n_drafted, n_accepted;      /* acceptance rate = n_accepted / n_drafted */
    double t_prompt, t_draft, t_verify, t_total; /* seconds */
    afm_stop_reason stop;
} afm_generate_stats;

/* Evaluates the prompt (may be empty to continue from the session's last logits), then
   generates. Every emitted token is in the session's cache when it returns, also after an error:
   a token is handed to on_token only once its slot in the cache is sure. Returns
   AFM_ERR_CONTEXT_FULL when the context fills up before n_predict tokens or a stop (the tokens
   before stay generated; stats->stop says AFM_STOP_CONTEXT_FULL), AFM_ERR_NUMERIC when the model's
   logits are NaN or +inf (the message names the position). */
AFMDEF afm_result afm_generate(afm_session *session, const int32_t *prompt, int n_prompt,
                               const afm_generate_params *params, afm_generate_stats *stats);
/* The tokens in the session's cache (n of them). Valid until the next call on the session. */
AFMDEF const int32_t *afm_session_tokens(const afm_session *session, int *n);

/* ---- Tool calling (docs/TOOL_CALLING.md): the app declares tools (name, description, a JSON Schema
   of the arguments); they are rendered into the system turn in AFM's tool format; when the model
   opens a call (<executable_start>) the call is constrained to {"name":N,"arguments":A} where N is a
   declared tool and A matches its schema, so every call is valid by construction. afm_tool_run runs
   the loop: the app's callback executes each call, its result becomes a "tool" turn, and the model
   continues until it answers. A transcript holds the conversation (messages, calls, outputs); it is
   saved as JSON and restored from it, and afm_tool_run renders it anew each round, so a session
   restored from a saved transcript continues exactly as the original would (same seed, same tokens). ---- */
typedef struct afm_transcript afm_transcript;
typedef struct afm_tool {
    const char *name;        /* letters, digits, '_', '-', '.'; unique in a transcript */
    const char *description; /* "" when none */
    const char *parameters;  /* the arguments' JSON Schema, compact JSON (docs/CONSTRAINTS.md's subset) */
} afm_tool;
typedef enum afm_entry_kind {
    AFM_ENTRY_MESSAGE = 0,   /* role and content */
    AFM_ENTRY_TOOL_CALL,     /* role "assistant": content (the reply's text before the call), name, arguments */
    AFM_ENTRY_TOOL_OUTPUT    /* role "tool": name, content (the result, or the error when failed) */
} afm_entry_kind;
typedef struct afm_transcript_entry {
    afm_entry_kind kind;
    const char *role, *content;
    const char *name;        /* tool calls and outputs; "" for messages */
    const char *arguments;   /* tool calls: compact JSON object; "" otherwise */
    int failed;              /* tool outputs: 1 when the tool failed */
} afm_transcript_entry;

AFMDEF afm_result afm_transcript_create(const afm_allocator *allocator, afm_transcript **out);
AFMDEF void afm_transcript_free(afm_transcript *t);
/* Declares a tool. parameters: a JSON Schema text (NULL: no arguments, {}); refused with a message
   naming the problem (e.g. "tool 'f': parameters: json schema at /properties/x: unsupported keyword
   'format'"). */
AFMDEF afm_result afm_transcript_add_tool(afm_transcript *t, const char *name, const char *description,
                                          const char *parameters, char *err, size_t err_size);
/* Declares the tools of a JSON array: each {"name", "description"?, "parameters"?} or OpenAI's
   {"type":"function","function":{...}}. Errors name the element (tools[2].parameters: ...). */
AFMDEF afm_result afm_transcript_add_tools_json(afm_transcript *t, const char *json, size_t len, char *err,
                                                size_t err_size);
AFMDEF afm_result afm_transcript_add_message(afm_transcript *t, const char *role, const char *content);
/* arguments: a JSON object (stored compact); AFM_ERR_FORMAT when it is not one. */
AFMDEF afm_result afm_transcript_add_tool_call(afm_transcript *t, const char *content, const char *name,
                                               const char *arguments);
AFMDEF afm_result afm_transcript_add_tool_output(afm_transcript *t, const char *name, const char *content,
                                                 int failed);
/* The entries and tools in order; valid until the next change to the transcript. */
AFMDEF const afm_transcript_entry *afm_transcript_entries(const afm_transcript *t, int *n);
AFMDEF const afm_tool *afm_transcript_tools(const afm_transcript *t, int *n);
/* {"tools":[...],"messages":[...]} (docs/TOOL_CALLING.md). Buffer rules as afm_chat_render. */
AFMDEF afm_result afm_transcript_to_json(const afm_transcript *t, char *buf, size_t cap, size_t *len);
/* Reads a saved transcript into t, which must be empty; on failure t stays empty and err names the
   place (byte offset, or a path such as messages[3].tool_call.arguments). */
AFMDEF afm_result afm_transcript_from_json(afm_transcript *t, const char *json, size_t len, char *err,
                                           size_t err_size);

typedef enum afm_tool_mode {
    AFM_TOOL_ALLOWED = 0,    /* the model may call a tool or answer */
    AFM_TOOL_REQUIRED,       /* the first reply is a call (opened by the loop itself); later ones as ALLOWED */
    AFM_TOOL_NONE            /* no calls: <executable_start> is masked out (tools are still shown) */
} afm_tool_mode;
/* What the app's callback returns. */
typedef enum afm_tool_status {
    AFM_TOOL_OK = 0,         /* *result is the tool's output */
    AFM_TOOL_FAILED,         /* *result is the error; it is fed back to the model as the tool's output */
    AFM_TOOL_HANDOFF         /* stop: the call stays the transcript's last entry for the app to answer */
} afm_tool_status;
/* Runs a call. *result (may stay NULL: "") is copied before the loop goes on. */
typedef afm_tool_status (*afm_tool_fn)(void *user, const char *name, const char *arguments, const char **result);
typedef enum afm_tool_stop {
    AFM_TOOL_STOP_NONE = 0,  /* an error */
    AFM_TOOL_STOP_ANSWER,    /* the model answered: the last entry is its message */
    AFM_TOOL_STOP_HANDOFF,   /* a call waits for its output (no callback, or it returned AFM_TOOL_HANDOFF) */
    AFM_TOOL_STOP_ROUNDS,    /* max_rounds replies were calls: the last entry is the last call's output */
    AFM_TOOL_STOP_N_PREDICT, /* a reply reached n_predict (a text reply is kept; an unfinished call is not) */
    AFM_TOOL_STOP_CALLBACK,  /* gen.on_token asked to stop (as with N_PREDICT) */
    AFM_TOOL_STOP_CONTEXT_FULL
} afm_tool_stop;
typedef struct afm_tool_params {
    afm_generate_params gen; /* each reply: n_predict, sampler (same seed each reply), drafters, on_token
                                (sees every token); its constraint and stop tokens are the loop's own */
    afm_tool_mode mode;
    const char *tool_name;   /* REQUIRED: this tool (NULL: any declared one) */
    int max_rounds;          /* replies per afm_tool_run at most (0: 8); the loop stops after the last one's call */
    afm_tool_fn call;        /* NULL: every call is handed back (a step-wise loop) */
    void *call_user;
    const afm_constraint_vocab *vocab; /* the tokenizer's (NULL: built for this call, which takes time) */
} afm_tool_params;
typedef struct afm_tool_stats {
    afm_tool_stop stop;
    int n_calls;             /* calls run */
    int n_generated;         /* tokens generated */
} afm_tool_stats;
/* Continues the conversation in t: renders it (tools in the system turn), brings the session's
   cache to those tokens (keeping the common prefix), generates the assistant's reply, and loops over
   tool calls as described above, appending every reply, call and output to t. The last entry must not
   be a call without its output. Errors: the session's message (afm_session_error). */
AFMDEF afm_result afm_tool_run(afm_session *session, const afm_tokenizer *tok, afm_transcript *t,
                               const afm_tool_params *params, afm_tool_stats *stats);

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
    case AFM_ERR_NUMERIC: return "non-finite logits";
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
    int writable;         /* data may be written (an owned copy or a private copy-on-write mapping) */
    uint64_t map_size;
#if defined(_WIN32)
    HANDLE file, mapping;
#endif
} afm__blob;

/* Linux system calls made directly (x86-64, arm64; gcc and clang): the calls afm.h needs beyond
   C99 (madvise, arch_prctl) are hidden under strict C99 or have no libc wrapper, and a library
   header cannot choose its includer's feature-test macros. Returns the kernel's result (-errno on
   failure). */
#if defined(__linux__) && defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
#define AFM__LINUX_SYSCALL 1
#if defined(__x86_64__)
#define AFM__SYS_MADVISE 28
#else
#define AFM__SYS_MADVISE 233
#endif
static inline long afm__syscall3(long nr, uintptr_t a0, uintptr_t a1, uintptr_t a2) {
#if defined(__x86_64__)
    long ret;
    __asm__ __volatile__("syscall" : "=a"(ret) : "0"(nr), "D"(a0), "S"(a1), "d"(a2) : "rcx", "r11", "memory");
    return ret;
#else
    register uintptr_t x0 __asm__("x0") = a0;
    register uintptr_t x1 __asm__("x1") = a1;
    register uintptr_t x2 __asm__("x2") = a2;
    register long x8 __asm__("x8") = nr;
    __asm__ __volatile__("svc 0" : "+r"(x0) : "r"(x1), "r"(x2), "r"(x8) : "memory");
    return (long)x0;
#endif
}
#endif

/* Transparent huge pages (2 MiB) for the whole such pages inside [p, p + n), asked before the
   memory is first touched. A decode step streams every weight once; with 4 KiB pages that is a TLB
   miss every 4 KiB of weights, and the page walks cost decode 12-17 % (docs/BENCHMARKS.md). Only
   advice: a kernel without huge pages, or with them off, ignores it. */
#if defined(AFM__LINUX_SYSCALL) && !defined(AFM_NO_HUGE_PAGES)
#define AFM__HUGE_PAGES 1
static void afm__advise_huge_pages(void *p, size_t n) {
    const uintptr_t huge = (uintptr_t)1 << 21, lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + n) & ~(huge - 1);
    if (hi > lo) afm__syscall3(AFM__SYS_MADVISE, lo, hi - lo, 14 /* MADV_HUGEPAGE */);
}
#endif

static afm_result afm__read_whole(const afm_allocator *a, FILE *f, uint64_t size, afm__blob *b,
                                  const char *path, char *err, size_t errn) {
    size_t got;
    if (size > (uint64_t)((size_t)-1 - 128)) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: file of %llu bytes does not fit in memory", path, (unsigned long long)size);
    b->owned = afm__alloc(a, (size_t)size ? (size_t)size : 1);
    if (!b->owned) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: cannot allocate %llu bytes to read it", path, (unsigned long long)size);
#ifdef AFM__HUGE_PAGES
    if (a->alloc == afm__default_alloc) afm__advise_huge_pages(b->owned, (size_t)size); /* not a caller's memory */
#endif
    got = fread(b->owned, 1, (size_t)size, f);
    if (got != (size_t)size) return afm__fail(err, errn, AFM_ERR_IO, "%s: read %llu of %llu bytes", path, (unsigned long long)got, (unsigned long long)size);
    b->data = (const unsigned char *)b->owned;
    b->size = size;
    b->writable = 1;
    return AFM_OK;
}

/* AFM__BLOB_POPULATE: map every page now (adapters are read whole at load anyway; models map lazily).
   AFM__BLOB_WRITABLE: a private copy-on-write mapping, so that the loader can rearrange weights in
   place (the file is never written; pages written become the process's own). */
#define AFM__BLOB_POPULATE 1
#define AFM__BLOB_WRITABLE 2
static afm_result afm__blob_open_ex(const afm_allocator *a, const char *path, int no_mmap, int flags, afm__blob *b,
                                    char *err, size_t errn) {
    afm_result r;
    FILE *f;
    uint64_t size;
    (void)flags; /* MAP_POPULATE is Linux-only and hidden under strict C99 */
    memset(b, 0, sizeof *b);
#if defined(_WIN32) && !defined(AFM_NO_MMAP)
    if (!no_mmap) {
        LARGE_INTEGER li;
        b->file = CreateFileA(path, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
        if (b->file == INVALID_HANDLE_VALUE) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
        if (GetFileType(b->file) != FILE_TYPE_DISK) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: not a regular file", path); }
        if (!GetFileSizeEx(b->file, &li)) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot get file size", path); }
        size = (uint64_t)li.QuadPart;
        if (size == 0) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: file is empty", path); }
        b->mapping = CreateFileMappingA(b->file, NULL, (flags & AFM__BLOB_WRITABLE) ? PAGE_WRITECOPY : PAGE_READONLY, 0, 0, NULL);
        if (!b->mapping) { CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot map file", path); }
        b->map = MapViewOfFile(b->mapping, (flags & AFM__BLOB_WRITABLE) ? FILE_MAP_COPY : FILE_MAP_READ, 0, 0, 0);
        if (!b->map) { CloseHandle(b->mapping); CloseHandle(b->file); return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot map file", path); }
        b->data = (const unsigned char *)b->map;
        b->size = b->map_size = size;
        b->writable = (flags & AFM__BLOB_WRITABLE) != 0;
        return AFM_OK;
    }
#elif !defined(_WIN32) && !defined(AFM_NO_MMAP)
#ifdef AFM__HUGE_PAGES
    /* A model (written at load) is read into memory advised for huge pages rather than mapped: its
       2-bit matrices become the process's own pages at load either way, and mapped pages are 4 KiB. */
    if ((flags & AFM__BLOB_WRITABLE) && a->alloc == afm__default_alloc) no_mmap = 1;
#endif
    if (!no_mmap) {
        /* Refuse FIFOs, devices and directories before opening: opening a FIFO blocks until a
           writer comes. O_NONBLOCK covers a path swapped after the stat (no effect on a file). */
        struct stat st;
        int fd;
        if (stat(path, &st) != 0) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
        if (!S_ISREG(st.st_mode)) return afm__fail(err, errn, AFM_ERR_IO, "%s: not a regular file", path);
        fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd < 0) return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot open file", path);
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); return afm__fail(err, errn, AFM_ERR_IO, "%s: not a regular file", path); }
        size = (uint64_t)st.st_size;
        if (size == 0) { close(fd); return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: file is empty", path); }
        if (size > (uint64_t)(size_t)-1) { close(fd); return afm__fail(err, errn, AFM_ERR_IO, "%s: file too large to map", path); }
        {
            const int prot = PROT_READ | ((flags & AFM__BLOB_WRITABLE) ? PROT_WRITE : 0);
#ifdef MAP_POPULATE
            b->map = mmap(NULL, (size_t)size, prot, MAP_PRIVATE | ((flags & AFM__BLOB_POPULATE) ? MAP_POPULATE : 0), fd, 0);
#else
            b->map = mmap(NULL, (size_t)size, prot, MAP_PRIVATE, fd, 0);
#endif
        }
        close(fd);
        if (b->map == MAP_FAILED) { b->map = NULL; return afm__fail(err, errn, AFM_ERR_IO, "%s: cannot map file", path); }
        b->data = (const unsigned char *)b->map;
        b->size = b->map_size = size;
        b->writable = (flags & AFM__BLOB_WRITABLE) != 0;
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
   variable, and the caller spins on the count of unfinished workers before sleeping likewise.
   Between two jobs the caller works alone (norms, activations) while memory idles: a job may leave
   each worker ranges to pull into its L2 cache then, the weights it will read first in the next
   job (afm__pool_prefetch_after). */
typedef void (*afm__job_fn)(void *ctx, int ith, int nth);

#define AFM__AFTER_MAX 4
typedef struct afm__after {
    const char *p[AFM__AFTER_MAX];
    size_t n[AFM__AFTER_MAX];
    int k;
} afm__after;

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
/* Software prefetch for reading, into L1 (AFM__PREFETCH) or L2 (AFM__PREFETCH_L2); a no-op where
   the compiler has none. */
#if defined(__GNUC__) || defined(__clang__)
#define AFM__PREFETCH(p) __builtin_prefetch(p)
#define AFM__PREFETCH_L2(p) __builtin_prefetch((p), 0, 2)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <intrin.h>
#define AFM__PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define AFM__PREFETCH_L2(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#else
#define AFM__PREFETCH(p) ((void)(p))
#define AFM__PREFETCH_L2(p) ((void)(p))
#endif

struct afm__worker_arg;
typedef struct afm__pool {
    int n_threads;
#ifndef AFM_NO_THREADS
    struct afm__worker_arg *args; /* [n_threads]: what each worker is started with (allocator hooks) */
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
    afm__after *after;          /* [n_threads]: what worker ith prefetches once the current job is over */
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

/* Worker ith's prefetches, once every worker is done with job `seen`: earlier, they would take
   memory from the threads still running the job's last rows, which every thread then waits for
   (measured: slower). Now only the caller works, on a few KB, and memory would idle. */
static void afm__pool_run_after(afm__pool *p, int ith, long seen) {
    afm__after *a = &p->after[ith];
    int spin, i;
    size_t o;
    if (!a->k) return;
    for (spin = 0; spin < AFM__SPIN && afm__atomic_get(&p->pending) > 0 && afm__atomic_get(&p->generation) == seen; spin++) afm__cpu_relax();
    for (i = 0; i < a->k; i++)
        for (o = 0; o < a->n[i]; o += 64) AFM__PREFETCH_L2(a->p[i] + o);
    a->k = 0;
}

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
        afm__pool_run_after(p, ith, seen);
    }
}

#if defined(_WIN32)
static DWORD WINAPI afm__worker_main(LPVOID arg) {
#else
static void *afm__worker_main(void *arg) {
#endif
    afm__worker_arg *a = (afm__worker_arg *)arg;
    afm__worker_loop(a->pool, a->ith);
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
    afm__free(a, p->args);
    afm__free(a, p->after);
    p->threads = NULL;
    p->args = NULL;
    p->after = NULL;
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
    p->args = (afm__worker_arg *)afm__calloc(a, (size_t)n_threads, sizeof *p->args);
    p->after = (afm__after *)afm__calloc(a, (size_t)n_threads, sizeof *p->after);
    if (!p->threads || !p->args || !p->after) {
        afm__free(a, p->threads);
        afm__free(a, p->args);
        afm__free(a, p->after);
        return AFM_ERR_NOMEM;
    }
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
            afm__worker_arg *arg = &p->args[i];
            int ok;
            arg->pool = p;
            arg->ith = i;
#if defined(_WIN32)
            p->threads[i] = CreateThread(NULL, 0, afm__worker_main, arg, 0, NULL);
            ok = p->threads[i] != NULL;
#else
            ok = pthread_create(&p->threads[i], NULL, afm__worker_main, arg) == 0;
#endif
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

/* Asks worker ith (not the caller, who works alone next) to pull n bytes at ptr into its L2 cache
   once every worker is done with the current job (afm__pool_run_after). */
static void afm__pool_prefetch_after(afm__pool *p, int ith, const void *ptr, size_t n) {
#ifndef AFM_NO_THREADS
    afm__after *a;
    if (ith == 0 || p->n_threads < 2 || n == 0) return;
    a = &p->after[ith];
    if (a->k == AFM__AFTER_MAX) return;
    a->p[a->k] = (const char *)ptr;
    a->n[a->k++] = n;
#else
    (void)p; (void)ith; (void)ptr; (void)n;
#endif
}

/* Counts of live users (sessions of a model, ...): atomic, since threads may create and free
   sessions of one model at once. */
#ifdef AFM_NO_THREADS
typedef long afm__count;
static long afm__count_add(afm__count *p, long v) { return *p += v; }
#else
typedef afm__atomic afm__count;
static long afm__count_add(afm__count *p, long v) { return afm__atomic_add(p, v); }
#endif

/* The share [*lo, *hi) of n items that thread ith of nth handles. */
static void afm__split(int n, int ith, int nth, int *lo, int *hi) {
    *lo = (int)((int64_t)n * ith / nth);
    *hi = (int)((int64_t)n * (ith + 1) / nth);
}


/* ======================================================================================== */
/* ==== FILE LOADER (docs/FORMAT.md) ====================================================== */
/* ======================================================================================== */

/* ---- weight types: codes, sizes, fp16/bf16 (docs/FORMAT.md, "Types") ---- */

#define AFM__NTYPES 6 /* slots in the kernel table: F32 F16 BF16 Q2B Q4 Q8 */

/* Slot of a type in the kernel table, -1 if unknown. */
static inline int afm__type_slot(int type) {
    switch (type) {
    case AFM_TYPE_F32: return 0;
    case AFM_TYPE_F16: return 1;
    case AFM_TYPE_BF16: return 2;
    case AFM_TYPE_Q2B: return 3;
    case AFM_TYPE_Q4: return 4;
    case AFM_TYPE_Q8: return 5;
    default: return -1;
    }
}
static inline int afm__type_is_quant(int type) { return type == AFM_TYPE_Q2B || type == AFM_TYPE_Q4 || type == AFM_TYPE_Q8; }
static inline const char *afm__type_name(int type) {
    switch (type) {
    case AFM_TYPE_F32: return "F32";
    case AFM_TYPE_F16: return "F16";
    case AFM_TYPE_BF16: return "BF16";
    case AFM_TYPE_Q2B: return "Q2B";
    case AFM_TYPE_Q4: return "Q4";
    case AFM_TYPE_Q8: return "Q8";
    default: return "?";
    }
}

/* Rows of a quantized type are padded to a multiple of this many elements (the code block),
   and of the group size when that is larger. */
static inline int afm__type_unit(int type) {
    return type == AFM_TYPE_Q2B ? 256 : type == AFM_TYPE_Q4 ? 128 : type == AFM_TYPE_Q8 ? 64 : 1;
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
    case AFM_TYPE_F32: if (group) return 0; n = rows * cols; return n > (UINT64_MAX >> 3) ? 0 : n * 4;
    case AFM_TYPE_F16:
    case AFM_TYPE_BF16: if (group) return 0; n = rows * cols; return n > (UINT64_MAX >> 3) ? 0 : n * 2;
    case AFM_TYPE_Q2B:
    case AFM_TYPE_Q4:
    case AFM_TYPE_Q8:
        if (afm__group_shift(group) < 0) return 0;
        kpad = afm__row_pad(type, cols, group);
        per_row = kpad / (type == AFM_TYPE_Q2B ? 4 : type == AFM_TYPE_Q4 ? 2 : 1) + kpad / group * 2;
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
static uint32_t afm__rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static void afm__wr32(unsigned char *p, uint32_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24); }

/* ---- the weight-matrix view: how kernels see a 2-D tensor ---- */

typedef struct afm__wmat {
    const uint8_t *data;   /* row r's codes (or elements) start at data + r * row_bytes */
    const uint8_t *scales; /* quantized: fp16 scales, row r's at scales + r * n_groups * 2 */
    int type, rows, cols;
    int group, gshift;     /* quantized: group size and log2(group / 64) */
    int kpad;              /* padded row length in elements (== cols for float types) */
    int n_groups;          /* scales per row (quantized) */
    size_t row_bytes;
    int panels;            /* Q2B: in panels of 16 rows (afm__q2b_panelize), as every kernel reads it */
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
        w->row_bytes = (size_t)w->kpad / (type == AFM_TYPE_Q2B ? 4 : type == AFM_TYPE_Q4 ? 2 : 1);
        w->scales = w->data + (size_t)rows * w->row_bytes;
    } else {
        w->kpad = cols;
        w->row_bytes = (size_t)cols * (type == AFM_TYPE_F32 ? 4 : 2);
    }
    return 0;
}

/* ---- Q2B in memory: panels of 16 rows ----

   The file stores a Q2B matrix row by row (docs/FORMAT.md). In memory the loader rearranges it
   once into panels of 16 rows, the layout every kernel reads: one SIMD vector then holds the same
   4 columns of 16 rows, so a kernel sums each row in its own lane for one token or many, with no
   horizontal sums and no repacking per call. Panel p (rows 16p .. 16p+15) holds, per sub-block sb
   (64 columns), 256 bytes: 4 words of 64 bytes, and byte 4u + j of word v holds in bit pair m the
   code of row 16p + u, column 64 sb + 16 v + 4 m + j. So (word >> 2m) & 3 is [16 rows][4 columns]
   for columns 16v + 4m .. 16v + 4m + 3, against 4 consecutive activations. After every panel's
   codes come the scales, [panel][group][16 rows] as fp16. With rows a multiple of 16 this is
   exactly the file's size, and panel p takes the bytes of the rows it is made from (the loader
   works in place); otherwise the last panel's missing rows are zero, in a buffer of its own. */

/* Bytes of w in panels (rows rounded up to 16). */
static inline size_t afm__q2b_panels_size(const afm__wmat *w) {
    return ((size_t)w->rows + 15) / 16 * 16 * (w->row_bytes + (size_t)w->n_groups * 2);
}
/* Scratch afm__q2b_panelize needs: one panel's rows in the file layout. */
static inline size_t afm__q2b_panel_tmp_size(const afm__wmat *w) { return 16 * (w->row_bytes + (size_t)w->n_groups * 2); }
/* Panel pn's codes (256 bytes per sub-block), and the 16 fp16 scales of sub-block sb's group. */
static inline const uint8_t *afm__panel_codes(const afm__wmat *w, int pn) { return w->data + (size_t)pn * 16 * w->row_bytes; }
static inline const uint8_t *afm__panel_scales(const afm__wmat *w, int pn, int sb) {
    return w->scales + ((size_t)pn * (size_t)w->n_groups + (size_t)(sb >> w->gshift)) * 32;
}

/* w (row layout) into panels at dst, which may be w->data itself when rows % 16 == 0; tmp holds
   afm__q2b_panel_tmp_size(w) bytes. w then describes the panels. A file block of 64 bytes holds
   sub-blocks 4b .. 4b+3 in its bit pairs (byte i: column i of each); read as 16 little-endian
   words V, byte j of panel word v of sub-block 4b + p for this row holds in bit pair m what byte j
   of V[4v + m] holds in bit pair p: a 4 x 4 transpose of bit pairs, done for 8 bytes (two words v)
   at once by two rounds of swaps (2 x 2 blocks of pairs, then single pairs). */
static void afm__q2b_panelize(afm__wmat *w, uint8_t *dst, uint8_t *tmp) {
    const int P = (w->rows + 15) / 16, nb = w->kpad / 256;
    const size_t code16 = 16 * w->row_bytes, sc16 = (size_t)w->n_groups * 32;
    uint8_t *dsc = dst + (size_t)P * code16;
    int pn, u, b, v, p, m, g;
    for (pn = 0; pn < P; pn++) {
        const int n = w->rows - 16 * pn < 16 ? w->rows - 16 * pn : 16;
        uint8_t *tsc = tmp + code16, *pc = dst + (size_t)pn * code16, *ps = dsc + (size_t)pn * sc16;
        memset(tmp, 0, afm__q2b_panel_tmp_size(w));
        memcpy(tmp, w->data + (size_t)pn * code16, (size_t)n * w->row_bytes);
        memcpy(tsc, w->scales + (size_t)pn * sc16, (size_t)n * (size_t)w->n_groups * 2);
        for (u = 0; u < 16; u++)
            for (b = 0; b < nb; b++) {
                const uint8_t *blk = tmp + (size_t)u * w->row_bytes + (size_t)b * 64;
                for (v = 0; v < 4; v += 2) {
                    uint64_t R[4], x;
                    for (m = 0; m < 4; m++) R[m] = afm__rd32(blk + 16 * v + 4 * m) | (uint64_t)afm__rd32(blk + 16 * v + 16 + 4 * m) << 32;
                    for (m = 0; m < 2; m++) { /* pairs 2,3 of R[m] <-> pairs 0,1 of R[m + 2] */
                        x = ((R[m] >> 4) ^ R[m + 2]) & 0x0f0f0f0f0f0f0f0full;
                        R[m + 2] ^= x; R[m] ^= x << 4;
                    }
                    for (m = 0; m < 4; m += 2) { /* pairs 1,3 of R[m] <-> pairs 0,2 of R[m + 1] */
                        x = ((R[m] >> 2) ^ R[m + 1]) & 0x3333333333333333ull;
                        R[m + 1] ^= x; R[m] ^= x << 2;
                    }
                    for (p = 0; p < 4; p++) {
                        uint8_t *o = pc + (size_t)(4 * b + p) * 256 + 64 * (size_t)v + 4 * (size_t)u;
                        afm__wr32(o, (uint32_t)R[p]);
                        afm__wr32(o + 64, (uint32_t)(R[p] >> 32));
                    }
                }
            }
        for (g = 0; g < w->n_groups; g++)
            for (u = 0; u < 16; u++) {
                ps[(size_t)(g * 16 + u) * 2] = tsc[((size_t)u * (size_t)w->n_groups + (size_t)g) * 2];
                ps[(size_t)(g * 16 + u) * 2 + 1] = tsc[((size_t)u * (size_t)w->n_groups + (size_t)g) * 2 + 1];
            }
    }
    w->data = dst;
    w->scales = dsc;
    w->panels = 1;
}

/* Code of weight i (0..63) of sub-block sb of row r: Q2B 0..3 (panels), Q4 0..15, Q8 -128..127. */
static inline int afm__code(const afm__wmat *w, int r, int sb, int i) {
    if (w->type == AFM_TYPE_Q2B)
        return (afm__panel_codes(w, r >> 4)[(size_t)sb * 256 + (size_t)(i >> 4) * 64 + (size_t)(r & 15) * 4 + (size_t)(i & 3)] >> (2 * ((i >> 2) & 3))) & 3;
    {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        if (w->type == AFM_TYPE_Q4) return (row[(size_t)(sb >> 1) * 64 + (size_t)i] >> ((sb & 1) * 4)) & 15; /* j, j+64 */
        return ((const int8_t *)row)[(size_t)sb * 64 + (size_t)i];
    }
}
/* The scale of sub-block sb of row r (quantized types). */
static inline float afm__qscale(const afm__wmat *w, int r, int sb) {
    if (w->type == AFM_TYPE_Q2B) return afm__h2f(afm__rd16(afm__panel_scales(w, r >> 4, sb) + (size_t)(r & 15) * 2));
    return afm__h2f(afm__rd16(w->scales + ((size_t)r * (size_t)w->n_groups + (size_t)(sb >> w->gshift)) * 2));
}


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
    void *panels;         /* a Q2B matrix's panels when they could not replace the rows in place */
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
    uint64_t fingerprint;                    /* of the file's contents (session state files carry it) */
    afm__count n_users;                      /* live sessions and adapters (afm_model_free checks) */
};

/* Sessions and adapters count themselves on their model; changing the count is not a change
   of the model a caller sees, so it is allowed through a const pointer. */
static void afm__model_use(const afm_model *m, long d) { afm__count_add(&((afm_model *)(void *)m)->n_users, d); }

/* LoRA alpha beyond the largest f16 is no trained adapter's (Apple's: 16, so scale 0.5); 9e29 made
   every logit infinite. */
#define AFM__MAX_ALPHA 65504.0f

/* A base-model signature field (models and adapters alike): 40 lowercase hex digits, or 40 zero
   bytes for none. Writes the NUL-terminated text ("" for none) to out[41]; returns -1, or the
   index of the first byte that breaks the rule. */
static int afm__read_signature(const unsigned char *p, char *out) {
    int i;
    out[0] = 0;
    for (i = 0; i < 40; i++) {
        unsigned char ch = p[i];
        if (p[0] ? !((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')) : ch != 0) return i;
        out[i] = (char)ch;
    }
    out[40] = 0;
    return -1;
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
    if (cfg->lora_rank && !(cfg->lora_alpha >= -AFM__MAX_ALPHA && cfg->lora_alpha <= AFM__MAX_ALPHA))
        return AFM__BAD(L, "%s: offset %llu: config lora_alpha %g is outside [-%g, %g]", L->name, (unsigned long long)(cfg_off + 64),
                        (double)cfg->lora_alpha, (double)AFM__MAX_ALPHA, (double)AFM__MAX_ALPHA);
    {
        int bad = afm__read_signature(c + 72, cfg->signature);
        if (bad >= 0)
            return AFM__BAD(L, "%s: offset %llu: signature byte 0x%02x: the signature is neither 40 lowercase hex digits nor all zero",
                            L->name, (unsigned long long)(cfg_off + 72 + bad), c[72 + bad]);
    }
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

/* Every Q2B matrix into panels (the layout the kernels read, "Q2B in memory" above): in place where
   the file's bytes may be written (a private mapping or an owned copy) and the rows fill whole
   panels, else into a buffer of its own. */
static afm_result afm__model_panelize(afm_model *m, const char *name, char *err, size_t errn) {
    size_t tmpn = 0;
    uint8_t *tmp;
    int i;
    for (i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].w.type == AFM_TYPE_Q2B && m->tensors[i].w.data && afm__q2b_panel_tmp_size(&m->tensors[i].w) > tmpn)
            tmpn = afm__q2b_panel_tmp_size(&m->tensors[i].w);
    if (!tmpn) return AFM_OK;
    if (!(tmp = (uint8_t *)afm__alloc(&m->alloc, tmpn))) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: out of memory", name);
    for (i = 0; i < m->n_tensors; i++) {
        afm__tensor *t = &m->tensors[i];
        uint8_t *dst;
        if (t->w.type != AFM_TYPE_Q2B || !t->w.data) continue;
        if (m->blob.writable && t->w.rows % 16 == 0) dst = (uint8_t *)(uintptr_t)t->w.data;
        else if (!(dst = (uint8_t *)(t->panels = afm__alloc(&m->alloc, afm__q2b_panels_size(&t->w))))) {
            afm__free(&m->alloc, tmp);
            return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: tensor '%s': out of memory for %llu bytes of panels", name, t->name,
                             (unsigned long long)afm__q2b_panels_size(&t->w));
        }
        afm__q2b_panelize(&t->w, dst, tmp);
    }
    afm__free(&m->alloc, tmp);
    return AFM_OK;
}

static uint64_t afm__model_fingerprint_of_file(const afm_model *m);

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
    if (r == AFM_OK) {
        m->fingerprint = afm__model_fingerprint_of_file(m); /* before the panels rearrange the bytes */
        r = afm__model_panelize(m, name, err, errn);
    }
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
    r = afm__blob_open_ex(&m->alloc, path, params ? params->no_mmap : 0, AFM__BLOB_WRITABLE, &m->blob, err, errn);
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
    m->blob.writable = m->blob.owned != NULL; /* the caller's bytes are never written */
    return afm__model_finish_load(m, "<memory>", params, out, err, errn);
}

AFMDEF void afm_model_free(afm_model *m) {
    afm_allocator a;
    int i;
    if (!m) return;
    AFM_ASSERT(afm__count_add(&m->n_users, 0) == 0 && "afm_model_free: free its sessions and adapters first");
    a = m->alloc;
    for (i = 0; m->tensors && i < m->n_tensors; i++) afm__free(&a, m->tensors[i].panels);
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
/* ==== JSON: a bounds-checked, non-recursive reader (adapter metadata, tokenizer.json) === */
/* ======================================================================================== */

/* RFC 8259, strictly (escapes, surrogate pairs and numbers are checked while parsing), into a flat
   array of nodes in document order, without recursion: a container links to its first child and
   every node to its next sibling; an object's children alternate key, value. Strings point into the
   source (escapes not undone: afm__json_unescape does that). Documents up to 4 GB. */
enum { AFM__JNULL, AFM__JFALSE, AFM__JTRUE, AFM__JNUM, AFM__JSTR, AFM__JARR, AFM__JOBJ };
typedef struct afm__jnode {
    uint32_t start, len; /* strings: the bytes between the quotes; numbers: the text */
    int32_t child, next; /* containers: first child (-1 none); every node: next sibling (-1 none) */
    uint8_t type, escaped;
} afm__jnode;
typedef struct afm__json {
    afm__jnode *n;
    size_t count, cap;
    const char *src;
} afm__json;

#define AFM__JSON_MAX_DEPTH 128

static uint32_t afm__json_hex4(const char *s) {
    uint32_t v = 0;
    int q;
    for (q = 0; q < 4; q++) {
        char c = s[q];
        v = v * 16 + (uint32_t)(c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c - 'A' + 10);
    }
    return v;
}
static int afm__json_is_hex4(const char *s, size_t i, size_t n) {
    int q;
    for (q = 0; q < 4; q++) {
        char c = i + (size_t)q < n ? s[i + q] : 0;
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return 0;
    }
    return 1;
}
static int afm__json_ws(const char *s, size_t n, size_t *i) {
    while (*i < n && (s[*i] == ' ' || s[*i] == '\t' || s[*i] == '\n' || s[*i] == '\r')) (*i)++;
    return *i < n;
}
/* UTF-8 of code point c (at most 4 bytes) */
static size_t afm__utf8_put(char *o, uint32_t c) {
    if (c < 0x80) { o[0] = (char)c; return 1; }
    if (c < 0x800) { o[0] = (char)(0xC0 | (c >> 6)); o[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | (c >> 12)); o[1] = (char)(0x80 | ((c >> 6) & 0x3F)); o[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (c >> 18)); o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F)); o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

static void afm__json_free(const afm_allocator *a, afm__json *j) {
    afm__free(a, j->n);
    j->n = NULL;
    j->count = j->cap = 0;
}

static size_t afm__json_unescape(const afm__json *j, int32_t idx, char *out);

/* Key node k's text with escapes undone: the source bytes themselves when it has none, else a copy
   in buf (which has room for the node's len bytes). */
static const char *afm__json_key_text(const afm__json *j, int32_t k, char *buf, size_t *len) {
    const afm__jnode *nd = &j->n[k];
    if (!nd->escaped) { *len = nd->len; return j->src + nd->start; }
    *len = afm__json_unescape(j, k, buf);
    return buf;
}

/* Refuses an object with a key twice: RFC 8259 leaves the meaning open and readers differ (first
   wins, last wins, refusal); the project's Python tools refuse too. Keys are compared with their
   escapes undone. Linear in the document: one hash table over each object's keys. */
static int afm__json_unique_keys(const afm_allocator *a, const afm__json *j, size_t *where, const char **why) {
    size_t i, max_keys = 0, max_len = 0, cap = 16;
    int32_t *slot, k;
    char *b1, *b2;
    int ok = 1;
    for (i = 0; i < j->count; i++) {
        size_t n = 0;
        if (j->n[i].type != AFM__JOBJ) continue;
        for (k = j->n[i].child; k >= 0 && j->n[k].next >= 0; k = j->n[j->n[k].next].next) {
            n++;
            if (j->n[k].len > max_len) max_len = j->n[k].len;
        }
        if (n > max_keys) max_keys = n;
    }
    if (max_keys < 2) return 1;
    while (cap < max_keys * 2) cap *= 2;
    slot = (int32_t *)afm__alloc(a, cap * sizeof *slot);
    b1 = (char *)afm__alloc(a, max_len + 1);
    b2 = (char *)afm__alloc(a, max_len + 1);
    if (!slot || !b1 || !b2) { *where = 0; *why = "out of memory"; ok = 0; }
    for (i = 0; ok && i < j->count; i++) {
        size_t n = 0, mask = 1;
        if (j->n[i].type != AFM__JOBJ) continue;
        for (k = j->n[i].child; k >= 0 && j->n[k].next >= 0; k = j->n[j->n[k].next].next) n++;
        if (n < 2) continue;
        while (mask < n * 2) mask *= 2;
        mask--;
        memset(slot, 0xff, (mask + 1) * sizeof *slot);
        for (k = j->n[i].child; ok && k >= 0 && j->n[k].next >= 0; k = j->n[j->n[k].next].next) {
            size_t l1, l2, q;
            const char *t1 = afm__json_key_text(j, k, b1, &l1);
            uint32_t h = 2166136261u;
            for (q = 0; q < l1; q++) h = (h ^ (unsigned char)t1[q]) * 16777619u;
            for (q = h & mask; slot[q] >= 0; q = (q + 1) & mask) {
                const char *t2 = afm__json_key_text(j, slot[q], b2, &l2);
                if (l1 == l2 && memcmp(t1, t2, l1) == 0) {
                    *where = j->n[k].start - 1; /* the opening quote of the second one */
                    *why = "the object has this key twice";
                    ok = 0;
                    break;
                }
            }
            if (ok) slot[q] = k;
        }
    }
    afm__free(a, slot);
    afm__free(a, b1);
    afm__free(a, b2);
    return ok;
}

/* Parses s[0, n) into j (start from a zeroed afm__json; free it with afm__json_free, also after a
   failure). Returns 1, or 0 with *where = the byte offset and *why = what is wrong there. */
static int afm__json_parse(const afm_allocator *a, const char *s, size_t n, afm__json *j, size_t *where,
                           const char **why) {
    int32_t stack[AFM__JSON_MAX_DEPTH], last[AFM__JSON_MAX_DEPTH];
    int depth = 0, expect_key = 0;
    size_t i = 0;
    j->src = s;
    j->count = 0;
    if (n >= 0xFFFFFFFFu) { *where = 0; *why = "file too large"; return 0; }
    for (;;) {
        afm__jnode node;
        int32_t idx;
        if (!afm__json_ws(s, n, &i)) { *why = "unexpected end"; break; }
        if (depth > 0 && (s[i] == ']' || s[i] == '}')) { /* an empty container (after a comma: refused below) */
            afm__jnode *c = &j->n[stack[depth - 1]];
            if ((s[i] == ']') != (c->type == AFM__JARR) || last[depth - 1] >= 0) {
                *why = last[depth - 1] >= 0 ? "trailing comma" : "mismatched bracket";
                break;
            }
            i++;
            goto close;
        }
        memset(&node, 0, sizeof node);
        node.child = node.next = -1;
        node.start = (uint32_t)i;
        if (expect_key && s[i] != '"') { *why = "object key is not a string"; break; }
        switch (s[i]) {
        case '{': node.type = AFM__JOBJ; i++; break;
        case '[': node.type = AFM__JARR; i++; break;
        case '"': {
            size_t k = i + 1;
            node.type = AFM__JSTR;
            while (k < n && s[k] != '"') {
                unsigned char c = (unsigned char)s[k];
                if (c < 0x20) break;
                if (c == '\\') {
                    node.escaped = 1;
                    if (k + 1 >= n) break;
                    if (s[k + 1] == 'u') {
                        uint32_t u;
                        if (!afm__json_is_hex4(s, k + 2, n)) break;
                        u = afm__json_hex4(s + k + 2);
                        if (u >= 0xDC00 && u <= 0xDFFF) break; /* a lone low surrogate */
                        if (u >= 0xD800 && u <= 0xDBFF) {      /* must be followed by a low one */
                            if (k + 7 >= n || s[k + 6] != '\\' || s[k + 7] != 'u' || !afm__json_is_hex4(s, k + 8, n)) break;
                            u = afm__json_hex4(s + k + 8);
                            if (u < 0xDC00 || u > 0xDFFF) break;
                            k += 6;
                        }
                        k += 6;
                        continue;
                    }
                    if (!s[k + 1] || !strchr("\"\\/bfnrt", s[k + 1])) break;
                    k += 2;
                    continue;
                }
                k++;
            }
            if (k >= n || s[k] != '"') { *why = k >= n ? "unterminated string" : "bad character or escape in a string"; i = k; goto fail; }
            node.start = (uint32_t)(i + 1);
            node.len = (uint32_t)(k - i - 1);
            i = k + 1;
            break;
        }
        case 't': case 'f': case 'n': {
            const char *w = s[i] == 't' ? "true" : s[i] == 'f' ? "false" : "null";
            size_t wl = strlen(w);
            if (n - i < wl || memcmp(s + i, w, wl) != 0) { *why = "expected a value"; goto fail; }
            node.type = (uint8_t)(s[i] == 't' ? AFM__JTRUE : s[i] == 'f' ? AFM__JFALSE : AFM__JNULL);
            i += wl;
            break;
        }
        default: {
            size_t k = i;
            if (k < n && s[k] == '-') k++;
            if (k >= n || s[k] < '0' || s[k] > '9') { *why = "expected a value"; goto fail; }
            if (s[k] == '0') k++;
            else while (k < n && s[k] >= '0' && s[k] <= '9') k++;
            if (k < n && s[k] == '.') {
                k++;
                if (k >= n || s[k] < '0' || s[k] > '9') { *why = "bad number"; goto fail; }
                while (k < n && s[k] >= '0' && s[k] <= '9') k++;
            }
            if (k < n && (s[k] == 'e' || s[k] == 'E')) {
                k++;
                if (k < n && (s[k] == '+' || s[k] == '-')) k++;
                if (k >= n || s[k] < '0' || s[k] > '9') { *why = "bad number"; goto fail; }
                while (k < n && s[k] >= '0' && s[k] <= '9') k++;
            }
            node.type = AFM__JNUM;
            node.len = (uint32_t)(k - i);
            i = k;
        }
        }
        if (j->count >= j->cap) { /* grow the node array */
            size_t nc = j->cap ? j->cap * 2 : 64;
            afm__jnode *nn;
            if (j->count >= 0x7FFFFFFF) { *why = "too many values"; goto fail; }
            nn = (afm__jnode *)afm__alloc(a, nc * sizeof *nn);
            if (!nn) { *why = "out of memory"; goto fail; }
            if (j->count) memcpy(nn, j->n, j->count * sizeof *nn);
            afm__free(a, j->n);
            j->n = nn;
            j->cap = nc;
        }
        idx = (int32_t)j->count++;
        j->n[idx] = node;
        if (depth > 0) {
            if (last[depth - 1] < 0) j->n[stack[depth - 1]].child = idx;
            else j->n[last[depth - 1]].next = idx;
            last[depth - 1] = idx;
        }
        if (node.type == AFM__JOBJ || node.type == AFM__JARR) {
            if (depth >= AFM__JSON_MAX_DEPTH) { *why = "nested too deeply"; goto fail; }
            stack[depth] = idx;
            last[depth] = -1;
            depth++;
            expect_key = node.type == AFM__JOBJ;
            continue;
        }
        if (depth == 0) goto done;
        if (expect_key) {
            if (!afm__json_ws(s, n, &i) || s[i] != ':') { *why = "expected ':' after an object key"; goto fail; }
            i++;
            expect_key = 0;
            continue;
        }
    after_value:
        if (!afm__json_ws(s, n, &i)) { *why = "unexpected end"; goto fail; }
        if (s[i] == ',') {
            i++;
            expect_key = j->n[stack[depth - 1]].type == AFM__JOBJ;
            if (!afm__json_ws(s, n, &i)) { *why = "unexpected end"; goto fail; }
            if (s[i] == ']' || s[i] == '}') { *why = "trailing comma"; goto fail; }
            continue;
        }
        if (s[i] == ']' || s[i] == '}') {
            if ((s[i] == ']') != (j->n[stack[depth - 1]].type == AFM__JARR)) { *why = "mismatched bracket"; goto fail; }
            i++;
            goto close;
        }
        *why = "expected ',' or a closing bracket";
        goto fail;
    close:
        depth--;
        if (depth == 0) goto done;
        expect_key = 0;
        goto after_value;
    }
fail:
    *where = i;
    return 0;
done:
    afm__json_ws(s, n, &i);
    if (i != n) { *where = i; *why = "text after the JSON value"; return 0; }
    return afm__json_unique_keys(a, j, where, why);
}

/* Undoes the escapes of string node idx into out, which has room for the node's len bytes (the text
   never grows); returns the length. The parser has checked every escape. */
static size_t afm__json_unescape(const afm__json *j, int32_t idx, char *out) {
    const afm__jnode *nd = &j->n[idx];
    const char *s = j->src + nd->start;
    size_t i = 0, o = 0, n = nd->len;
    while (i < n) {
        uint32_t c;
        if (s[i] != '\\') { out[o++] = s[i++]; continue; }
        switch (s[i + 1]) {
        case 'b': c = 8; break;
        case 'f': c = 12; break;
        case 'n': c = 10; break;
        case 'r': c = 13; break;
        case 't': c = 9; break;
        case 'u': c = afm__json_hex4(s + i + 2); break;
        default: c = (unsigned char)s[i + 1]; break;
        }
        if (s[i + 1] != 'u') {
            out[o++] = (char)c;
            i += 2;
            continue;
        }
        i += 6;
        if (c >= 0xD800 && c <= 0xDBFF) { /* the parser saw the low surrogate */
            c = 0x10000 + ((c - 0xD800) << 10) + (afm__json_hex4(s + i + 2) - 0xDC00);
            i += 6;
        }
        o += afm__utf8_put(out + o, c);
    }
    return o;
}
/* String node idx as a NUL-terminated C string in out[cap]; 0 if it is not a string, does not fit or
   contains a NUL. */
static int afm__json_cstr(const afm__json *j, int32_t idx, char *out, size_t cap) {
    char tmp[256];
    size_t len;
    if (idx < 0 || j->n[idx].type != AFM__JSTR || j->n[idx].len >= sizeof tmp) return 0;
    len = afm__json_unescape(j, idx, tmp);
    if (len >= cap || memchr(tmp, 0, len)) return 0;
    memcpy(out, tmp, len);
    out[len] = 0;
    return 1;
}
/* string node idx equals the C string z (an escaped string never does: keys and names in the files
   read here are plain ASCII) */
static int afm__json_eq(const afm__json *j, int32_t idx, const char *z) {
    const afm__jnode *nd;
    size_t zl = strlen(z);
    if (idx < 0) return 0;
    nd = &j->n[idx];
    return nd->type == AFM__JSTR && !nd->escaped && nd->len == zl && memcmp(j->src + nd->start, z, zl) == 0;
}
/* the value of key in object node obj, or -1 */
static int32_t afm__json_get(const afm__json *j, int32_t obj, const char *key) {
    int32_t k;
    if (obj < 0 || j->n[obj].type != AFM__JOBJ) return -1;
    for (k = j->n[obj].child; k >= 0 && j->n[k].next >= 0; k = j->n[j->n[k].next].next)
        if (afm__json_eq(j, k, key)) return j->n[k].next;
    return -1;
}
/* a non-negative integer < 2^31 written without fraction or exponent, or -1 */
static int32_t afm__json_int(const afm__json *j, int32_t idx) {
    const afm__jnode *nd;
    uint32_t k;
    int64_t v = 0;
    if (idx < 0) return -1;
    nd = &j->n[idx];
    if (nd->type != AFM__JNUM || nd->len == 0 || nd->len > 10) return -1;
    for (k = 0; k < nd->len; k++) {
        char c = j->src[nd->start + k];
        if (c < '0' || c > '9') return -1;
        v = v * 10 + (c - '0');
    }
    return v > INT32_MAX ? -1 : (int32_t)v;
}
#ifdef AFM_HF_TOKENIZER /* only tokenizer.json reads these */
/* true / false; dflt when absent (-1) or null */
static int afm__json_bool(const afm__json *j, int32_t idx, int dflt) {
    if (idx < 0 || j->n[idx].type == AFM__JNULL) return dflt;
    return j->n[idx].type == AFM__JTRUE;
}
static int afm__json_isnull(const afm__json *j, int32_t idx) { return idx < 0 || j->n[idx].type == AFM__JNULL; }
#endif

/* ======================================================================================== */
/* ==== TOKENIZER: API - load, free, tokenize, detokenize, chat format ==================== */
/* ======================================================================================== */
/* Text <-> token ids in three parts: this one holds the tokenizer object and everything the public
   calls do whatever the vocabulary's kind (the AFM newline layer, streaming detokenization, the chat
   template, tool-call extraction); the next section is SentencePiece BPE, the AFM model's own; the
   one after it byte-level BPE from a Hugging Face tokenizer.json (opt-in: AFM_HF_TOKENIZER). Both
   implementations fill the same encoder state, so afm_tokenize is one function. Private names of the
   three parts start with afm__tok_. */

/* ---- small helpers ---- */
/* grows *buf (elem bytes each) to hold at least need elements; keeps the contents; the old block is
   freed unless it is `local` (caller-owned storage, e.g. on the stack) */
static int afm__tok_grow_l(const afm_allocator *m, void **buf, size_t *cap, size_t need, size_t elem, const void *local) {
    size_t nc;
    void *nb;
    if (need <= *cap) return 1;
    nc = *cap ? *cap : 16;
    while (nc < need) {
        if (nc > ((size_t)-1) / 2 / elem) return 0;
        nc *= 2;
    }
    nb = afm__alloc(m, nc * elem);
    if (!nb) return 0;
    if (*buf && *cap) memcpy(nb, *buf, *cap * elem);
    if (*buf != local) afm__free(m, *buf);
    *buf = nb;
    *cap = nc;
    return 1;
}
static int afm__tok_grow(const afm_allocator *m, void **buf, size_t *cap, size_t need, size_t elem) {
    return afm__tok_grow_l(m, buf, cap, need, elem, NULL);
}

static uint64_t afm__tok_load64(const char *s) {
    uint64_t v;
    memcpy(&v, s, 8);
    return v;
}
/* the last n < 8 bytes of a key as an integer (byte order does not matter: only this process hashes) */
static uint64_t afm__tok_tail64(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    uint64_t v = 0;
    if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, u, 4);
        memcpy(&b, u + n - 4, 4);
        return ((uint64_t)a << 32) | b;
    }
    if (n > 0) v = ((uint64_t)u[0] << 16) | ((uint64_t)u[n >> 1] << 8) | u[n - 1];
    return v;
}
static uint32_t afm__tok_hash(const char *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xD6E8FEB86659FD93ull);
    while (n >= 8) {
        h = (h ^ afm__tok_load64(s)) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        s += 8;
        n -= 8;
    }
    h = (h ^ afm__tok_tail64(s, n)) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 29;
    return (uint32_t)h;
}
/* s[0, n) == t[0, n) */
static int afm__tok_eq(const char *s, const char *t, size_t n) {
    while (n >= 8) {
        if (afm__tok_load64(s) != afm__tok_load64(t)) return 0;
        s += 8;
        t += 8;
        n -= 8;
    }
    while (n--)
        if (*s++ != *t++) return 0;
    return 1;
}

/* sentencepiece's string_util::DecodeUTF8: returns the code point or -1, *n bytes (1 when invalid) */
static int32_t afm__tok_utf8(const unsigned char *s, size_t len, size_t *n) {
    uint32_t c;
    *n = 1;
    if (s[0] < 0x80) return s[0];
    if (len >= 2 && (s[0] & 0xE0) == 0xC0) {
        c = ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
        if ((s[1] & 0xC0) == 0x80 && c >= 0x80) { *n = 2; return (int32_t)c; }
    } else if (len >= 3 && (s[0] & 0xF0) == 0xE0) {
        c = ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && c >= 0x800 && (c < 0xD800 || c > 0xDFFF)) {
            *n = 3;
            return (int32_t)c;
        }
    } else if (len >= 4 && (s[0] & 0xF8) == 0xF0) {
        c = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
            (s[3] & 0x3F);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80 && c >= 0x10000 && c <= 0x10FFFF) {
            *n = 4;
            return (int32_t)c;
        }
    }
    return -1;
}
/* sentencepiece's string_util::OneCharLen */
static size_t afm__tok_onecharlen(unsigned char b) { return (size_t)"\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[b >> 4]; }
/* bytes a lead byte asks for in afm__tok_utf8 (1 for a byte that can never start a character) */
static int afm__tok_utf8_need(unsigned char b) {
    if (b < 0x80) return 1;
    if ((b & 0xE0) == 0xC0) return 2;
    if ((b & 0xF0) == 0xE0) return 3;
    if ((b & 0xF8) == 0xF0) return 4;
    return 1;
}

/* growable byte / int buffers used during one call */
typedef struct afm__tok_buf {
    char *p;
    size_t n, cap;
    char *local; /* p's first storage when the caller owns it (NULL: p is allocated) */
} afm__tok_buf;
static int afm__tok_buf_put(const afm_allocator *m, afm__tok_buf *b, const char *s, size_t n) {
    void *p = b->p;
    if (b->n + n < b->n) return 0;
    if (!afm__tok_grow_l(m, &p, &b->cap, b->n + n + 1, 1, b->local)) return 0;
    b->p = (char *)p;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    return 1;
}

static int afm__tok_ws_at(const char *s, size_t i, size_t n) {
    return i + 3 <= n && (unsigned char)s[i] == 0xE2 && (unsigned char)s[i + 1] == 0x96 && (unsigned char)s[i + 2] == 0x81;
}
/* ---- the encoder's working state (both implementations fill it) ---- */
typedef struct afm__tok_sym {
    int32_t start, len, prev, next;
    int32_t freeze; /* a user-defined symbol: never merged; its id */
    int32_t id;     /* the piece (sentencepiece's pieces_) this symbol is, -1 if none */
} afm__tok_sym;
typedef struct afm__tok_pair {
    float score;
    int32_t left, right, size, id;
} afm__tok_pair;
typedef struct afm__tok_rev {
    int32_t start, len, left_len;
} afm__tok_rev;

typedef struct afm__tok_ids {
    int32_t *p;
    size_t n, cap;
    int32_t *local; /* p's first storage when the caller owns it */
} afm__tok_ids;

/* the encoder's working state for one call */
typedef struct afm__tok_enc {
    const afm_tokenizer *t;
    afm__tok_sym *sym;
    size_t sym_cap;
    afm__tok_pair *heap;
    size_t heap_cap, heap_n;
    afm__tok_rev *rev;
    size_t rev_cap, rev_n;
    afm__tok_ids out; /* raw ids of the current word (before the unk merge) */
    /* word cache: key = bytes of the word in the normalized text */
    uint32_t *c_hash, *c_off, *c_len, *c_ids, *c_nids;
    uint32_t c_mask, c_used;
    afm__tok_ids c_pool;
    const char *norm;
    /* output */
    int32_t *tokens;
    size_t cap, n;
    int prev_unk;
    int failed;
    int special;
    /* first storage of sym / heap / out, so that short texts allocate nothing */
    afm__tok_sym sym_local[48];
    afm__tok_pair heap_local[148];
    int32_t out_local[48];
} afm__tok_enc;

/* ---- the entry points of the two implementations (the next two sections) ---- */
/* SentencePiece BPE: load a ModelProto; normalize text; encode normalized text */
static afm_result afm__tok_load_spm(afm_tokenizer *t, const uint8_t *data, size_t size, char *err, size_t err_size);
static int afm__tok_normalize(const afm_tokenizer *t, const char *text, size_t len, int special, afm__tok_buf *b);
static void afm__tok_spm_encode_norm(afm__tok_enc *e, const char *norm, size_t n, int special);
#ifdef AFM_HF_TOKENIZER
/* byte-level BPE: load a tokenizer.json; encode; the bytes of a piece; free its tables */
static afm_result afm__tok_load_hf(afm_tokenizer *t, const uint8_t *data, size_t size, char *err, size_t err_size);
static afm_result afm__tok_hf_encode(const afm_tokenizer *t, const char *text, size_t len, unsigned flags,
                                     afm__tok_enc *e);
static void afm__tok_hf_piece_bytes(const afm_tokenizer *t, int32_t id, afm__tok_buf *scratch, const char **p, size_t *n);
static void afm__tok_hf_free(afm_tokenizer *t);
#endif

/* ---- the tokenizer object ---- */
#define AFM__TOK_MAX_VOCAB (1 << 24)
#define AFM__TOK_NCLS 6
#define AFM__TOK_PF_SELF 1   /* BPE of the piece's own characters gives exactly this piece */
#define AFM__TOK_PF_SHADOW 2 /* a reserved (control/unknown/byte) piece has the same text */

typedef struct afm__tok_trie_node {
    int32_t child, sibling; /* first child, next sibling; -1 none */
    uint8_t byte, flags;    /* flags: 1 user-defined piece ends here, 2 control piece ends here */
    int32_t id;             /* id of the piece ending here */
} afm__tok_trie_node;

typedef struct afm__tok_hent {
    uint32_t hash, off, len; /* the key: bytes [off, off + len) of the table's string pool */
    int32_t id;              /* -1: empty slot */
} afm__tok_hent;
typedef struct afm__tok_ht {
    afm__tok_hent *e;
    uint32_t mask;
} afm__tok_ht;
typedef struct afm__tok_pent {
    uint64_t key; /* left id << 32 | right id */
    int32_t id;   /* -1: empty slot */
    float score;
} afm__tok_pent;
static uint32_t afm__tok_pairhash(uint64_t k) {
    k ^= k >> 31;
    k *= 0x9E3779B97F4A7C15ull;
    k ^= k >> 29;
    return (uint32_t)k;
}

struct afm_tokenizer {
    afm_allocator alloc;
    int kind;
    int n_vocab;
    uint32_t *off;   /* n_vocab + 1 offsets into str */
    char *str;       /* every piece, one after another */
    float *score;
    uint8_t *type;   /* afm_token_type */
    afm__tok_ht ht_normal;   /* NORMAL, USER_DEFINED, UNUSED pieces (sentencepiece's pieces_) */
    afm__tok_ht ht_reserved; /* the others (reserved_id_map_) */
    size_t max_piece_len, max_token_bytes;
    int32_t special[AFM_SPECIAL_COUNT];
    /* SentencePiece */
    int add_dummy_prefix, remove_extra_ws, escape_ws, ws_suffix, byte_fallback;
    int has_unused;
    uint8_t cut[AFM__TOK_NCLS][AFM__TOK_NCLS]; /* BPE may treat a class-x, class-y boundary as a word end */
    int32_t byte_id[256];
    char *unk_surface;
    size_t unk_surface_len;
    uint32_t *trie;      /* precompiled_charsmap: darts-clone double array units */
    size_t n_trie;
    char *norm;          /* precompiled_charsmap: the replacement strings, NUL separated */
    size_t n_norm;
    uint8_t trie_first[256]; /* 1 if a charsmap rule can start with this byte */
    uint8_t nf[2][256];      /* normalizer fast path [special]: 1 plain ASCII, 2 space, 0 full path */
    uint8_t sc[2][256];      /* encoder scan [special]: cut class of a plain ASCII byte, 0xFF full path */
    afm__tok_trie_node *ud;  /* user-defined (and control) symbol trie; node 0 is the root */
    int32_t n_ud;
    int32_t ud_root[256];    /* first-level nodes by byte */
    uint8_t ud_first[256];   /* 1: a user-defined piece starts with this byte; 2: only a control piece */
    uint8_t *pflags;         /* per piece: AFM__TOK_PF_* */
    struct afm__tok_pent *pt; /* (left piece, right piece) -> the piece they join into */
    uint32_t pt_mask;
    int32_t *cid;            /* normal-map id of each BMP code point as a one-character piece, -1 none */
    /* tokenizer.json (byte-level BPE) */
    void *hf;
};

static void afm__tok_ht_free(const afm_allocator *m, afm__tok_ht *h) {
    afm__free(m, h->e);
    h->e = NULL;
}
static int afm__tok_ht_init(const afm_allocator *m, afm__tok_ht *h, size_t n) {
    size_t cap = 16, i;
    while (cap < n * 2) cap *= 2;
    h->e = (afm__tok_hent *)afm__alloc(m, cap * sizeof(afm__tok_hent));
    if (!h->e) return 0;
    for (i = 0; i < cap; i++) h->e[i].id = -1;
    h->mask = (uint32_t)(cap - 1);
    return 1;
}
/* the id of key s[0, n) (hash hv) in a table whose keys live in pool, -1 if none */
static int32_t afm__tok_ht_get_h(const afm__tok_ht *h, const char *pool, const char *s, size_t n, uint32_t hv) {
    uint32_t i = hv & h->mask;
    const afm__tok_hent *e;
    while ((e = &h->e[i])->id >= 0) {
        if (e->hash == hv && e->len == n && afm__tok_eq(pool + e->off, s, n)) return e->id;
        i = (i + 1) & h->mask;
    }
    return -1;
}
/* the id of key s[0, n) in a table whose keys live in pool, -1 if none */
static int32_t afm__tok_ht_get(const afm__tok_ht *h, const char *pool, const char *s, size_t n) {
    return afm__tok_ht_get_h(h, pool, s, n, afm__tok_hash(s, n));
}
static int32_t afm__tok_ht_find(const afm_tokenizer *t, const afm__tok_ht *h, const char *s, size_t n) {
    return afm__tok_ht_get(h, t->str, s, n);
}
/* inserts key pool[off, off + len) -> id; returns 0 when an equal key is already there */
static int afm__tok_ht_put(afm__tok_ht *h, const char *pool, uint32_t off, uint32_t len, int32_t id) {
    uint32_t hv = afm__tok_hash(pool + off, len), i = hv & h->mask;
    afm__tok_hent *e;
    while ((e = &h->e[i])->id >= 0) {
        if (e->hash == hv && e->len == len && memcmp(pool + e->off, pool + off, len) == 0) return 0;
        i = (i + 1) & h->mask;
    }
    e->hash = hv;
    e->off = off;
    e->len = len;
    e->id = id;
    return 1;
}
/* inserts piece id; returns 0 when an equal piece is already there */
static int afm__tok_ht_add(const afm_tokenizer *t, afm__tok_ht *h, int32_t id) {
    return afm__tok_ht_put(h, t->str, t->off[id], t->off[id + 1] - t->off[id], id);
}


AFMDEF void afm_tokenizer_free(afm_tokenizer *t) {
    afm_allocator m;
    if (!t) return;
    m = t->alloc;
#ifdef AFM_HF_TOKENIZER
    afm__tok_hf_free(t);
#endif
    afm__free(&m, t->off);
    afm__free(&m, t->str);
    afm__free(&m, t->score);
    afm__free(&m, t->type);
    afm__tok_ht_free(&m, &t->ht_normal);
    afm__tok_ht_free(&m, &t->ht_reserved);
    afm__free(&m, t->unk_surface);
    afm__free(&m, t->trie);
    afm__free(&m, t->norm);
    afm__free(&m, t->ud);
    afm__free(&m, t->pflags);
    afm__free(&m, t->pt);
    afm__free(&m, t->cid);
    afm__free(&m, t);
}

AFMDEF int afm_tokenizer_kind(const afm_tokenizer *t) { return t ? t->kind : 0; }
AFMDEF int afm_tokenizer_n_vocab(const afm_tokenizer *t) { return t ? t->n_vocab : 0; }
AFMDEF const char *afm_tokenizer_piece(const afm_tokenizer *t, int32_t id, size_t *len) {
    if (!t || id < 0 || id >= t->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = t->off[id + 1] - t->off[id];
    return t->str + t->off[id];
}
AFMDEF int32_t afm_tokenizer_piece_id(const afm_tokenizer *t, const char *piece, size_t len) {
    int32_t id;
    if (!t || (!piece && len)) return -1;
    id = afm__tok_ht_find(t, &t->ht_reserved, piece, len);
    if (id < 0) id = afm__tok_ht_find(t, &t->ht_normal, piece, len);
    return id;
}
AFMDEF afm_token_type afm_tokenizer_token_type(const afm_tokenizer *t, int32_t id) {
    if (!t || id < 0 || id >= t->n_vocab) return (afm_token_type)0;
    return (afm_token_type)t->type[id];
}
AFMDEF int32_t afm_tokenizer_special(const afm_tokenizer *t, afm_special_token which) {
    if (!t || (int)which < 0 || which >= AFM_SPECIAL_COUNT) return -1;
    return t->special[which];
}
AFMDEF int afm_tokenizer_is_stop(const afm_tokenizer *t, int32_t id) {
    if (!t || id < 0) return 0;
    return id == t->special[AFM_SPECIAL_TURN_END] || id == t->special[AFM_SPECIAL_EOS];
}
AFMDEF size_t afm_tokenizer_max_token_bytes(const afm_tokenizer *t) { return t ? t->max_token_bytes : 0; }

static void afm__tok_enc_free(afm__tok_enc *e) {
    const afm_allocator *m = &e->t->alloc;
    if (e->sym != e->sym_local) afm__free(m, e->sym);
    if (e->heap != e->heap_local) afm__free(m, e->heap);
    afm__free(m, e->rev);
    if (e->out.p != e->out_local) afm__free(m, e->out.p);
    afm__free(m, e->c_hash);
    afm__free(m, e->c_off);
    afm__free(m, e->c_len);
    afm__free(m, e->c_ids);
    afm__free(m, e->c_nids);
    afm__free(m, e->c_pool.p);
}

/* ---- encoding ---- */
AFMDEF afm_result afm_tokenize(const afm_tokenizer *t, const char *text, size_t len, unsigned flags, int32_t *tokens,
                               size_t cap, size_t *n_tokens) {
    afm__tok_enc e;
    afm__tok_buf nb, tb;
    afm_result res = AFM_OK;
    char nb_local[2048];
    if (n_tokens) *n_tokens = 0;
    if (!t || !n_tokens || (!text && len) || (!tokens && cap)) return AFM_ERR_ARG;
    if (len > (size_t)INT32_MAX / 4) return AFM_ERR_ARG;
    memset(&e, 0, sizeof e);
    memset(&nb, 0, sizeof nb);
    memset(&tb, 0, sizeof tb);
    nb.p = nb.local = nb_local;
    nb.cap = sizeof nb_local;
    e.sym = e.sym_local;
    e.sym_cap = sizeof e.sym_local / sizeof e.sym_local[0];
    e.heap = e.heap_local;
    e.heap_cap = sizeof e.heap_local / sizeof e.heap_local[0];
    e.out.p = e.out.local = e.out_local;
    e.out.cap = sizeof e.out_local / sizeof e.out_local[0];
    e.t = t;
    e.tokens = tokens;
    e.cap = cap;
    if ((flags & AFM_TOK_NEWLINE) && t->special[AFM_SPECIAL_NEWLINE] >= 0 && len && memchr(text, '\n', len)) {
        /* the AFM layer: newlines never reach the tokenizer, the literal <n> does */
        size_t i, a = 0;
        for (i = 0; i < len; i++) {
            if (text[i] != '\n') continue;
            if (!afm__tok_buf_put(&t->alloc, &tb, text + a, i - a) || !afm__tok_buf_put(&t->alloc, &tb, "<n>", 3)) {
                res = AFM_ERR_NOMEM;
                goto done;
            }
            a = i + 1;
        }
        if (!afm__tok_buf_put(&t->alloc, &tb, text + a, len - a)) { res = AFM_ERR_NOMEM; goto done; }
        text = tb.p;
        len = tb.n;
        if (len > (size_t)INT32_MAX / 4) { res = AFM_ERR_ARG; goto done; }
    }
    if (t->kind == AFM_TOKENIZER_SENTENCEPIECE) {
        if (!afm__tok_normalize(t, text, len, (flags & AFM_TOK_SPECIAL) != 0, &nb)) { res = AFM_ERR_NOMEM; goto done; }
        if (nb.n > (size_t)INT32_MAX / 4) { res = AFM_ERR_ARG; goto done; }
        if (nb.n) afm__tok_spm_encode_norm(&e, nb.p, nb.n, (flags & AFM_TOK_SPECIAL) != 0);
        if (e.failed) res = AFM_ERR_NOMEM;
    } else {
#ifdef AFM_HF_TOKENIZER
        res = afm__tok_hf_encode(t, text, len, flags, &e);
        if (res == AFM_OK && e.failed) res = AFM_ERR_NOMEM;
#endif
    }
    if (res == AFM_OK) {
        *n_tokens = e.n;
        if (e.n > cap) res = AFM_ERR_ARG;
    }
done:
    afm__tok_enc_free(&e);
    if (nb.p != nb.local) afm__free(&t->alloc, nb.p);
    afm__free(&t->alloc, tb.p);
    return res;
}

/* ---- decoding ---- */

/* appends to out (bounded by cap; counts what would be written) */
typedef struct afm__tok_sink {
    char *p;
    size_t cap, n;
} afm__tok_sink;
static void afm__tok_sink_put(afm__tok_sink *s, const char *b, size_t n) {
    size_t k;
    for (k = 0; k < n; k++) {
        if (s->n + k < s->cap) s->p[s->n + k] = b[k];
    }
    s->n += n;
}

/* one valid character or one U+FFFD from the front of pending bytes; end: no more bytes will come */
static int afm__tok_pending_step(afm_detokenizer *d, afm__tok_sink *s, int end) {
    int hf = d->tok->kind == AFM_TOKENIZER_HF_JSON;
    unsigned char *p = d->pending;
    int n = d->n_pending, used;
    if (!n) return 0;
    if (!hf) {
        size_t m;
        int need = afm__tok_utf8_need(p[0]);
        if (n < need && !end) return 0;
        if (afm__tok_utf8(p, (size_t)n, &m) >= 0) {
            afm__tok_sink_put(s, (const char *)p, m);
            used = (int)m;
        } else {
            afm__tok_sink_put(s, "\xEF\xBF\xBD", 3);
            used = 1;
        }
        d->text_empty = 0;
    } else {
        /* Rust's String::from_utf8_lossy: one U+FFFD per maximal invalid subpart */
        int need, k;
        unsigned char lo = 0x80, hi = 0xBF;
        unsigned char c = p[0];
        if (c < 0x80) need = 1;
        else if (c >= 0xC2 && c <= 0xDF) need = 2;
        else if (c >= 0xE0 && c <= 0xEF) { need = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else need = 0;
        if (need == 0) {
            afm__tok_sink_put(s, "\xEF\xBF\xBD", 3);
            used = 1;
        } else {
            for (k = 1; k < need && k < n; k++) {
                unsigned char b = p[k];
                unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
                if (b < l || b > h) break;
            }
            if (k == need) {
                afm__tok_sink_put(s, (const char *)p, (size_t)need);
                used = need;
            } else if (k < n || end) {
                afm__tok_sink_put(s, "\xEF\xBF\xBD", 3);
                used = k;
            } else return 0; /* a valid prefix so far: wait */
        }
        d->text_empty = 0;
    }
    memmove(p, p + used, (size_t)(n - used));
    d->n_pending = n - used;
    return 1;
}

AFMDEF void afm_detokenizer_init(afm_detokenizer *d, const afm_tokenizer *tok, unsigned flags) {
    if (!d) return;
    memset(d, 0, sizeof *d);
    d->tok = tok;
    d->flags = flags;
    d->at_start = 1;
    d->text_empty = 1;
}

static void afm__tok_detok_one(afm_detokenizer *d, int32_t id, afm__tok_sink *s) {
    const afm_tokenizer *t = d->tok;
    int ty = t->type[id];
    const char *p = t->str + t->off[id];
    size_t n = t->off[id + 1] - t->off[id];
#ifdef AFM_HF_TOKENIZER
    if (t->kind == AFM_TOKENIZER_HF_JSON) {
        afm__tok_buf scratch;
        const char *bp;
        size_t bn, k;
        if (ty == AFM_TOKEN_CONTROL && !(d->flags & AFM_TOK_SPECIAL)) return;
        memset(&scratch, 0, sizeof scratch);
        afm__tok_hf_piece_bytes(t, id, &scratch, &bp, &bn);
        for (k = 0; k < bn; k++) {
            if (d->n_pending == 4) afm__tok_pending_step(d, s, 1);
            d->pending[d->n_pending++] = (unsigned char)bp[k];
            while (afm__tok_pending_step(d, s, 0)) {
            }
        }
        afm__free(&t->alloc, scratch.p);
        return;
    }
#endif
    if (ty == AFM_TOKEN_BYTE) {
        unsigned char b = 0;
        int k;
        for (k = 0; k < 256; k++)
            if (t->byte_id[k] == id) { b = (unsigned char)k; break; }
        d->pending[d->n_pending++] = b;
        while (afm__tok_pending_step(d, s, 0)) {
        }
        return;
    }
    while (afm__tok_pending_step(d, s, 1)) {
    }
    if (d->bos_ws_seen || !d->text_empty) d->at_start = 0;
    if (ty == AFM_TOKEN_CONTROL) {
        d->bos_ws_seen = 0;
        if (d->flags & AFM_TOK_SPECIAL) {
            afm__tok_sink_put(s, p, n);
            if (n) d->text_empty = 0;
        }
        return;
    }
    if (ty == AFM_TOKEN_UNKNOWN) {
        d->bos_ws_seen = 0;
        afm__tok_sink_put(s, t->unk_surface, t->unk_surface_len);
        if (t->unk_surface_len) d->text_empty = 0;
        return;
    }
    if ((d->flags & AFM_TOK_NEWLINE) && id == t->special[AFM_SPECIAL_NEWLINE]) {
        d->bos_ws_seen = 0;
        afm__tok_sink_put(s, "\n", 1);
        d->text_empty = 0;
        return;
    }
    {
        int has_bos_ws = 0;
        size_t k, a;
        if (d->at_start && (t->add_dummy_prefix || t->remove_extra_ws)) {
            if (afm__tok_ws_at(p, 0, n)) {
                p += 3;
                n -= 3;
                has_bos_ws = 1;
            }
            if (t->remove_extra_ws) has_bos_ws = 0;
        }
        d->bos_ws_seen = has_bos_ws;
        for (k = 0, a = 0; k < n;) {
            if (afm__tok_ws_at(p, k, n)) {
                afm__tok_sink_put(s, p + a, k - a);
                afm__tok_sink_put(s, " ", 1);
                k += 3;
                a = k;
            } else k++;
        }
        afm__tok_sink_put(s, p + a, n - a);
        if (n) d->text_empty = 0;
    }
}

AFMDEF afm_result afm_detokenizer_push(afm_detokenizer *d, int32_t id, char *out, size_t cap, size_t *n_out) {
    afm__tok_sink s;
    afm_detokenizer save;
    if (n_out) *n_out = 0;
    if (!d || !d->tok || !n_out || (!out && cap) || id < 0 || id >= d->tok->n_vocab) return AFM_ERR_ARG;
    save = *d;
    s.p = out;
    s.cap = cap;
    s.n = 0;
    afm__tok_detok_one(d, id, &s);
    *n_out = s.n;
    if (s.n > cap) {
        *d = save;
        return AFM_ERR_ARG;
    }
    return AFM_OK;
}

AFMDEF afm_result afm_detokenizer_flush(afm_detokenizer *d, char *out, size_t cap, size_t *n_out) {
    afm__tok_sink s;
    afm_detokenizer save;
    if (n_out) *n_out = 0;
    if (!d || !d->tok || !n_out || (!out && cap)) return AFM_ERR_ARG;
    save = *d;
    s.p = out;
    s.cap = cap;
    s.n = 0;
    while (afm__tok_pending_step(d, &s, 1)) {
    }
    *n_out = s.n;
    if (s.n > cap) {
        *d = save;
        return AFM_ERR_ARG;
    }
    return AFM_OK;
}

AFMDEF afm_result afm_detokenize(const afm_tokenizer *t, const int32_t *tokens, size_t n_tokens, unsigned flags,
                                 char *text, size_t cap, size_t *len) {
    afm_detokenizer d;
    afm__tok_sink s;
    size_t i;
    if (len) *len = 0;
    if (!t || !len || (!tokens && n_tokens) || (!text && cap)) return AFM_ERR_ARG;
    for (i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= t->n_vocab) return AFM_ERR_ARG;
    afm_detokenizer_init(&d, t, flags);
    s.p = text;
    s.cap = cap ? cap - 1 : 0;
    s.n = 0;
    for (i = 0; i < n_tokens; i++) afm__tok_detok_one(&d, tokens[i], &s);
    while (afm__tok_pending_step(&d, &s, 1)) {
    }
    *len = s.n;
    if (cap) text[s.n < cap ? s.n : cap - 1] = 0;
    return s.n < cap ? AFM_OK : AFM_ERR_ARG;
}

/* ---- AFM chat format ---- */
static void afm__tok_sink_str(afm__tok_sink *s, const char *z) { afm__tok_sink_put(s, z, strlen(z)); }

AFMDEF afm_result afm_chat_render(const afm_chat_message *messages, int n_messages, const char *const *tools,
                                  int n_tools, int add_generation_prompt, char *text, size_t cap, size_t *len) {
    afm__tok_sink s;
    int i, first = 0;
    const char *system = "A conversation between a user and a helpful assistant.";
    if (len) *len = 0;
    if (!len || n_messages < 0 || n_tools < 0 || (n_messages && !messages) || (n_tools && !tools) || (!text && cap))
        return AFM_ERR_ARG;
    for (i = 0; i < n_messages; i++)
        if (!messages[i].role || !messages[i].content) return AFM_ERR_ARG;
    for (i = 0; i < n_tools; i++)
        if (!tools[i]) return AFM_ERR_ARG;
    s.p = text;
    s.cap = cap ? cap - 1 : 0;
    s.n = 0;
    if (n_messages > 0 && strcmp(messages[0].role, "system") == 0) {
        system = messages[0].content;
        first = 1;
    }
    afm__tok_sink_str(&s, "<turn_start> system<n>");
    afm__tok_sink_str(&s, system);
    if (n_tools > 0) {
        afm__tok_sink_str(&s, "<n>system tools: ");
        for (i = 0; i < n_tools; i++) {
            if (i) afm__tok_sink_str(&s, "<n>");
            afm__tok_sink_str(&s, tools[i]);
        }
    }
    afm__tok_sink_str(&s, "<turn_end>");
    for (i = first; i < n_messages; i++) {
        afm__tok_sink_str(&s, "<turn_start> ");
        afm__tok_sink_str(&s, messages[i].role);
        afm__tok_sink_str(&s, "<n>");
        afm__tok_sink_str(&s, messages[i].content);
        afm__tok_sink_str(&s, "<turn_end>");
    }
    if (add_generation_prompt) afm__tok_sink_str(&s, "<turn_start> assistant<n>");
    *len = s.n;
    if (cap) text[s.n < cap ? s.n : cap - 1] = 0;
    return s.n < cap ? AFM_OK : AFM_ERR_ARG;
}

/* Encodes rendered chat text the way AFM's prompts start (afm_chat_tokenize; the tool loop renders
   its own text, a reply cut short included). */
static afm_result afm__chat_encode(const afm_tokenizer *t, const char *text, size_t len, int32_t *tokens, size_t cap,
                                   size_t *n_tokens) {
    size_t n = 0;
    int32_t *ids;
    afm_result r;
    unsigned flags = AFM_TOK_NEWLINE;
    /* the template's markers must become tokens: if the vocabulary has them as CONTROL pieces rather than
       user-defined ones, control pieces are matched in the text too */
    if (t->special[AFM_SPECIAL_TURN_START] >= 0 && t->type[t->special[AFM_SPECIAL_TURN_START]] == AFM_TOKEN_CONTROL)
        flags |= AFM_TOK_SPECIAL;
    if (t->special[AFM_SPECIAL_EOS] < 0) return AFM_ERR_UNSUPPORTED;
    r = afm_tokenize(t, text, len, flags, NULL, 0, &n);
    if (r != AFM_OK && r != AFM_ERR_ARG) return r;
    ids = (int32_t *)afm__alloc(&t->alloc, (n + 1) * sizeof(int32_t));
    if (!ids) return AFM_ERR_NOMEM;
    r = afm_tokenize(t, text, len, flags, ids, n, &n);
    if (r == AFM_OK) {
        /* the sequence start rule: drop the first token, put EOS in front */
        size_t i, total = n ? n : 1;
        ids[0] = t->special[AFM_SPECIAL_EOS];
        for (i = 0; i < total && i < cap; i++) tokens[i] = ids[i];
        *n_tokens = total;
        if (total > cap) r = AFM_ERR_ARG;
    }
    afm__free(&t->alloc, ids);
    return r;
}

AFMDEF afm_result afm_chat_tokenize(const afm_tokenizer *t, const afm_chat_message *messages, int n_messages,
                                    const char *const *tools, int n_tools, int add_generation_prompt,
                                    int32_t *tokens, size_t cap, size_t *n_tokens) {
    char *text;
    size_t len = 0;
    afm_result r;
    if (n_tokens) *n_tokens = 0;
    if (!t || !n_tokens || (!tokens && cap)) return AFM_ERR_ARG;
    if (t->special[AFM_SPECIAL_EOS] < 0) return AFM_ERR_UNSUPPORTED;
    r = afm_chat_render(messages, n_messages, tools, n_tools, add_generation_prompt, NULL, 0, &len);
    if (r != AFM_OK && r != AFM_ERR_ARG) return r;
    if (len == 0 && r == AFM_ERR_ARG) return AFM_ERR_ARG;
    text = (char *)afm__alloc(&t->alloc, len + 1);
    if (!text) return AFM_ERR_NOMEM;
    r = afm_chat_render(messages, n_messages, tools, n_tools, add_generation_prompt, text, len + 1, &len);
    if (r == AFM_OK) r = afm__chat_encode(t, text, len, tokens, cap, n_tokens);
    afm__free(&t->alloc, text);
    return r;
}

AFMDEF int afm_tool_call_next(const char *text, size_t len, size_t *pos, const char **call, size_t *call_len,
                              int *complete) {
    static const char open_tag[] = "<executable_start>", close_tag[] = "<executable_end>";
    size_t i, a, b, end, ol = sizeof open_tag - 1, cl = sizeof close_tag - 1;
    int done = 0;
    if (!text || !pos || !call || !call_len || *pos > len) return 0;
    for (i = *pos; i + ol <= len; i++)
        if (memcmp(text + i, open_tag, ol) == 0) break;
    if (i + ol > len) return 0;
    a = i + ol;
    for (b = a; b + cl <= len; b++)
        if (memcmp(text + b, close_tag, cl) == 0) break;
    if (b + cl <= len) {
        done = 1;
        end = b + cl;
    } else {
        b = len;
        end = len;
    }
    /* strip whitespace and a ```function ... ``` fence */
    while (a < b && (text[a] == ' ' || text[a] == '\n' || text[a] == '\t' || text[a] == '\r')) a++;
    while (b > a && (text[b - 1] == ' ' || text[b - 1] == '\n' || text[b - 1] == '\t' || text[b - 1] == '\r')) b--;
    if (b - a >= 3 && memcmp(text + a, "```", 3) == 0) {
        size_t j = a + 3;
        while (j < b && text[j] != '\n') j++; /* the fence's info string, e.g. "function" */
        a = j < b ? j + 1 : b;
        if (b - a >= 3 && memcmp(text + b - 3, "```", 3) == 0) b -= 3;
        while (b > a && (text[b - 1] == '\n' || text[b - 1] == '\r')) b--;
    }
    *call = text + a;
    *call_len = b - a;
    *pos = end;
    if (complete) *complete = done;
    return 1;
}

/* ---- loading ---- */

AFMDEF afm_result afm_tokenizer_load(const void *data, size_t size, int kind, const afm_allocator *allocator,
                                     afm_tokenizer **out, char *err, size_t err_size) {
    afm_allocator m;
    afm_tokenizer *t;
    afm_result r;
    if (err && err_size) err[0] = 0;
    if (out) *out = NULL;
    if (!out || (!data && size)) return afm__fail(err, err_size, AFM_ERR_ARG, "afm_tokenizer_load: bad argument");
    if (allocator && (!allocator->alloc || !allocator->free))
        return afm__fail(err, err_size, AFM_ERR_ARG, "afm_tokenizer_load: allocator without alloc/free");
    m = allocator ? *allocator : afm__malloc_allocator;
    t = (afm_tokenizer *)afm__alloc(&m, sizeof *t);
    if (!t) return AFM_ERR_NOMEM;
    memset(t, 0, sizeof *t);
    t->alloc = m;
    t->kind = kind;
    if (kind == AFM_TOKENIZER_SENTENCEPIECE) r = afm__tok_load_spm(t, (const uint8_t *)data, size, err, err_size);
    else if (kind == AFM_TOKENIZER_HF_JSON)
#ifdef AFM_HF_TOKENIZER
        r = afm__tok_load_hf(t, (const uint8_t *)data, size, err, err_size);
#else
        r = afm__fail(err, err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json (byte-level BPE) is not compiled in: define "
                      "AFM_HF_TOKENIZER before the implementation, with afm_tokenizer.h next to afm.h");
#endif
    else r = afm__fail(err, err_size, AFM_ERR_UNSUPPORTED, "afm_tokenizer_load: unknown tokenizer kind %d", kind);
    if (r != AFM_OK) {
        if (r == AFM_ERR_NOMEM && err && err_size && !err[0]) afm__fail(err, err_size, r, "tokenizer: out of memory");
        afm_tokenizer_free(t);
        return r;
    }
    *out = t;
    return AFM_OK;
}

AFMDEF afm_result afm_model_tokenizer(const afm_model *model, const afm_allocator *allocator, afm_tokenizer **out,
                                      char *err, size_t err_size) {
    int kind = 0;
    size_t size = 0;
    const void *p;
    if (out) *out = NULL;
    if (!model || !out) return AFM_ERR_ARG;
    p = afm_model_tokenizer_bytes(model, &kind, &size);
    if (!p) return afm__fail(err, err_size, AFM_ERR_UNSUPPORTED, "the model file has no tokenizer");
    return afm_tokenizer_load(p, size, kind, allocator, out, err, err_size);
}

/* ======================================================================================== */
/* ==== TOKENIZER: SentencePiece BPE (the AFM model's own) - ModelProto, normalizer, BPE == */
/* ======================================================================================== */

/* ---- protobuf reader (bounds-checked; proto2 wire format) ---- */
typedef struct afm__tok_pb {
    const uint8_t *p, *end, *base;
} afm__tok_pb;

static int afm__tok_pb_varint(afm__tok_pb *r, uint64_t *v) {
    uint64_t x = 0;
    int shift = 0;
    while (r->p < r->end && shift < 64) {
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 1;
        }
        shift += 7;
    }
    return 0;
}
/* reads a field key; 0 at a malformed key */
static int afm__tok_pb_key(afm__tok_pb *r, uint32_t *field, uint32_t *wire) {
    uint64_t k;
    if (!afm__tok_pb_varint(r, &k)) return 0;
    *field = (uint32_t)(k >> 3);
    *wire = (uint32_t)(k & 7);
    return (k >> 3) != 0 && (k >> 3) <= 0x1FFFFFFF;
}
static int afm__tok_pb_len(afm__tok_pb *r, const uint8_t **p, size_t *n) {
    uint64_t l;
    if (!afm__tok_pb_varint(r, &l)) return 0;
    if (l > (uint64_t)(r->end - r->p)) return 0;
    *p = r->p;
    *n = (size_t)l;
    r->p += l;
    return 1;
}
static int afm__tok_pb_skip(afm__tok_pb *r, uint32_t wire) {
    uint64_t v;
    const uint8_t *p;
    size_t n;
    switch (wire) {
    case 0: return afm__tok_pb_varint(r, &v);
    case 1: if (r->end - r->p < 8) return 0; r->p += 8; return 1;
    case 2: return afm__tok_pb_len(r, &p, &n);
    case 5: if (r->end - r->p < 4) return 0; r->p += 4; return 1;
    default: return 0; /* groups (3, 4) are not used by sentencepiece */
    }
}
static int afm__tok_pb_f32(afm__tok_pb *r, float *f) {
    uint32_t u;
    if (r->end - r->p < 4) return 0;
    u = (uint32_t)r->p[0] | ((uint32_t)r->p[1] << 8) | ((uint32_t)r->p[2] << 16) | ((uint32_t)r->p[3] << 24);
    memcpy(f, &u, 4);
    r->p += 4;
    return 1;
}

typedef struct afm__tok_spm_spec {
    int model_type, byte_fallback, ws_suffix;
    int add_dummy_prefix, remove_extra_ws, escape_ws;
    const uint8_t *charsmap;
    size_t n_charsmap;
    const uint8_t *unk_piece, *bos_piece, *eos_piece, *pad_piece, *unk_surface;
    size_t n_unk_piece, n_bos_piece, n_eos_piece, n_pad_piece, n_unk_surface;
    int has_denorm;
} afm__tok_spm_spec;

#define AFM__TOK_PB_FAIL(what)                                                                                \
    do {                                                                                                    \
        afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: malformed %s at byte %lu", what,         \
                  (unsigned long)(r.p - r.base));                                                           \
        return 0;                                                                                           \
    } while (0)

static int afm__tok_pb_trainer(const uint8_t *p, size_t n, const uint8_t *base, afm__tok_spm_spec *s, char *err,
                               size_t err_size) {
    afm__tok_pb r;
    uint32_t f, w;
    uint64_t v;
    r.p = p; r.end = p + n; r.base = base;
    while (r.p < r.end) {
        if (!afm__tok_pb_key(&r, &f, &w)) AFM__TOK_PB_FAIL("trainer_spec field key");
        if ((f == 3 || f == 24 || f == 35) && w == 0) {
            if (!afm__tok_pb_varint(&r, &v)) AFM__TOK_PB_FAIL("trainer_spec varint");
            if (f == 3) s->model_type = (int)(v > 100 ? 100 : v);
            else if (f == 24) s->ws_suffix = v != 0;
            else s->byte_fallback = v != 0;
        } else if ((f == 44 || f == 45 || f == 46 || f == 47 || f == 48) && w == 2) {
            const uint8_t *q;
            size_t l;
            if (!afm__tok_pb_len(&r, &q, &l)) AFM__TOK_PB_FAIL("trainer_spec string");
            if (f == 44) { s->unk_surface = q; s->n_unk_surface = l; }
            else if (f == 45) { s->unk_piece = q; s->n_unk_piece = l; }
            else if (f == 46) { s->bos_piece = q; s->n_bos_piece = l; }
            else if (f == 47) { s->eos_piece = q; s->n_eos_piece = l; }
            else { s->pad_piece = q; s->n_pad_piece = l; }
        } else if (!afm__tok_pb_skip(&r, w)) AFM__TOK_PB_FAIL("trainer_spec field");
    }
    return 1;
}
static int afm__tok_pb_normalizer(const uint8_t *p, size_t n, const uint8_t *base, afm__tok_spm_spec *s, int denorm,
                                  char *err, size_t err_size) {
    afm__tok_pb r;
    uint32_t f, w;
    uint64_t v;
    r.p = p; r.end = p + n; r.base = base;
    while (r.p < r.end) {
        if (!afm__tok_pb_key(&r, &f, &w)) AFM__TOK_PB_FAIL("normalizer_spec field key");
        if (f == 2 && w == 2) {
            const uint8_t *q;
            size_t l;
            if (!afm__tok_pb_len(&r, &q, &l)) AFM__TOK_PB_FAIL("precompiled_charsmap");
            if (denorm) s->has_denorm = l > 0;
            else { s->charsmap = q; s->n_charsmap = l; }
        } else if (!denorm && (f == 3 || f == 4 || f == 5) && w == 0) {
            if (!afm__tok_pb_varint(&r, &v)) AFM__TOK_PB_FAIL("normalizer_spec varint");
            if (f == 3) s->add_dummy_prefix = v != 0;
            else if (f == 4) s->remove_extra_ws = v != 0;
            else s->escape_ws = v != 0;
        } else if (!afm__tok_pb_skip(&r, w)) AFM__TOK_PB_FAIL("normalizer_spec field");
    }
    return 1;
}

/* darts-clone double array (sentencepiece's precompiled_charsmap and nothing else) */
static uint32_t afm__tok_darts_offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }
static uint32_t afm__tok_darts_label(uint32_t u) { return u & ((1u << 31) | 0xFFu); }
static int afm__tok_darts_has_leaf(uint32_t u) { return (u >> 8) & 1; }
static uint32_t afm__tok_darts_value(uint32_t u) { return u & ((1u << 31) - 1); }

/* longest charsmap rule matching a prefix of s: returns its length (0: none), *value its string offset */
static size_t afm__tok_charsmap_longest(const afm_tokenizer *t, const unsigned char *s, size_t len, uint32_t *value) {
    size_t pos, i, best = 0;
    uint32_t u;
    if (!t->n_trie) return 0;
    pos = afm__tok_darts_offset(t->trie[0]);
    for (i = 0; i < len; i++) {
        pos ^= s[i];
        if (pos >= t->n_trie) return best;
        u = t->trie[pos];
        if (afm__tok_darts_label(u) != s[i]) return best;
        pos ^= afm__tok_darts_offset(u);
        if (afm__tok_darts_has_leaf(u)) {
            if (pos >= t->n_trie) return best;
            best = i + 1;
            *value = afm__tok_darts_value(t->trie[pos]);
        }
    }
    return best;
}

/* longest user-defined (flags & 1) or, with special, control (flags & 2) symbol at s; 0 if none */
static size_t afm__tok_ud_match(const afm_tokenizer *t, const unsigned char *s, size_t len, int special,
                                int32_t *id) {
    int32_t node;
    size_t i, best = 0;
    uint8_t want = (uint8_t)(special ? 3 : 1);
    if (!len || !(t->ud_first[s[0]] & want)) return 0;
    node = t->ud_root[s[0]];
    for (i = 0;;) {
        if (t->ud[node].flags & want) {
            best = i + 1;
            *id = t->ud[node].id;
        }
        if (++i >= len) break;
        node = t->ud[node].child;
        while (node >= 0 && t->ud[node].byte != s[i]) node = t->ud[node].sibling;
        if (node < 0) break;
    }
    return best;
}

static int afm__tok_ud_insert(afm_tokenizer *t, const unsigned char *s, size_t n, uint8_t flag, int32_t id,
                              size_t *cap) {
    int32_t node = -1, *link;
    size_t i;
    for (i = 0; i < n; i++) {
        link = i == 0 ? &t->ud_root[s[0]] : &t->ud[node].child;
        while (*link >= 0 && t->ud[*link].byte != s[i]) link = &t->ud[*link].sibling;
        if (*link < 0) {
            void *p = t->ud;
            if (!afm__tok_grow(&t->alloc, &p, cap, (size_t)t->n_ud + 1, sizeof(afm__tok_trie_node))) return 0;
            t->ud = (afm__tok_trie_node *)p;
            /* link may point into the old array: find it again */
            link = i == 0 ? &t->ud_root[s[0]] : &t->ud[node].child;
            while (*link >= 0) link = &t->ud[*link].sibling;
            t->ud[t->n_ud].child = -1;
            t->ud[t->n_ud].sibling = -1;
            t->ud[t->n_ud].byte = s[i];
            t->ud[t->n_ud].flags = 0;
            t->ud[t->n_ud].id = -1;
            *link = t->n_ud++;
        }
        node = *link;
    }
    /* sentencepiece's PieceToId prefers the reserved (control) map */
    if (flag == 2 || !(t->ud[node].flags & 2)) t->ud[node].id = id;
    t->ud[node].flags |= flag;
    t->ud_first[s[0]] |= flag;
    return 1;
}

/* the word-cut class of the character at s[i] (see the load code) and its length */
static int afm__tok_cls_at(const char *s, size_t i, size_t n, size_t *len) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x80) {
        *len = 1;
        if ((c | 32) >= 'a' && (c | 32) <= 'z') return 1;
        if (c >= '0' && c <= '9') return 2;
        if (c <= 0x20 || c == 0x7F) return 4;
        return 3;
    }
    if (afm__tok_ws_at(s, i, n)) {
        *len = 3;
        return 0;
    }
    *len = afm__tok_onecharlen(c);
    if (*len > n - i) *len = n - i;
    return 5;
}

static afm_result afm__tok_spm_pflags(afm_tokenizer *t);
static afm_result afm__tok_load_spm(afm_tokenizer *t, const uint8_t *data, size_t size, char *err, size_t err_size) {
    afm__tok_pb r;
    uint32_t f, w;
    afm__tok_spm_spec s;
    size_t n_pieces = 0, n_str = 0, k, ud_cap = 0;
    int32_t i;
    int pass, bytes_found = 0;
    memset(&s, 0, sizeof s);
    s.model_type = 1; /* proto default: UNIGRAM */
    s.add_dummy_prefix = s.remove_extra_ws = s.escape_ws = 1;
    /* pass 0 counts the pieces and reads the specs; pass 1 stores the pieces */
    for (pass = 0; pass < 2; pass++) {
        int32_t idx = 0;
        r.p = data; r.end = data + size; r.base = data;
        while (r.p < r.end) {
            const uint8_t *q;
            size_t l;
            if (!afm__tok_pb_key(&r, &f, &w))
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: malformed field key at byte %lu", (unsigned long)(r.p - data));
            if (w != 2 || f < 1 || f > 5) {
                if (!afm__tok_pb_skip(&r, w))
                    return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: malformed field %u at byte %lu", f, (unsigned long)(r.p - data));
                continue;
            }
            if (!afm__tok_pb_len(&r, &q, &l))
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: field %u at byte %lu runs past the end", f, (unsigned long)(r.p - data));
            if (f == 1) { /* SentencePiece piece */
                afm__tok_pb pr;
                uint32_t pf, pw;
                uint64_t v;
                const uint8_t *ps = NULL;
                size_t pl = 0;
                float sc = 0.0f;
                int ty = 1;
                pr.p = q; pr.end = q + l; pr.base = data;
                while (pr.p < pr.end) {
                    if (!afm__tok_pb_key(&pr, &pf, &pw)) goto bad_piece;
                    if (pf == 1 && pw == 2) { if (!afm__tok_pb_len(&pr, &ps, &pl)) goto bad_piece; }
                    else if (pf == 2 && pw == 5) { if (!afm__tok_pb_f32(&pr, &sc)) goto bad_piece; }
                    else if (pf == 3 && pw == 0) {
                        if (!afm__tok_pb_varint(&pr, &v)) goto bad_piece;
                        if (v < 1 || v > 6)
                            return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: piece %ld has unknown type %lu", (long)idx, (unsigned long)v);
                        ty = (int)v;
                    } else if (!afm__tok_pb_skip(&pr, pw)) goto bad_piece;
                }
                if (pass == 0) {
                    if (pl == 0)
                        return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: piece %ld is empty", (long)n_pieces);
                    if (++n_pieces > AFM__TOK_MAX_VOCAB)
                        return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: more than %d pieces", AFM__TOK_MAX_VOCAB);
                    n_str += pl;
                    if (pl > t->max_piece_len) t->max_piece_len = pl;
                } else {
                    memcpy(t->str + t->off[idx], ps, pl);
                    t->off[idx + 1] = t->off[idx] + (uint32_t)pl;
                    t->score[idx] = sc;
                    t->type[idx] = (uint8_t)ty;
                }
                idx++;
                continue;
            bad_piece:
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: malformed piece %ld near byte %lu", (long)idx, (unsigned long)(pr.p - data));
            }
            if (pass == 1) continue;
            if (f == 2) { if (!afm__tok_pb_trainer(q, l, data, &s, err, err_size)) return AFM_ERR_FORMAT; }
            else if (f == 3) { if (!afm__tok_pb_normalizer(q, l, data, &s, 0, err, err_size)) return AFM_ERR_FORMAT; }
            else if (f == 5) { if (!afm__tok_pb_normalizer(q, l, data, &s, 1, err, err_size)) return AFM_ERR_FORMAT; }
        }
        if (pass == 0) {
            if (n_pieces == 0)
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: no pieces (not a SentencePiece model?)");
            if (s.model_type != 2) {
                static const char *names[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
                return afm__fail(err, err_size, AFM_ERR_UNSUPPORTED, "tokenizer.model: model_type %s is not supported (only BPE models)",
                                 s.model_type >= 1 && s.model_type <= 4 ? names[s.model_type] : "unknown");
            }
            if (s.has_denorm)
                return afm__fail(err, err_size, AFM_ERR_UNSUPPORTED, "tokenizer.model: a denormalizer_spec is not supported");
            if (n_str >= 0xFFFFFFFFu)
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: pieces too long");
            t->n_vocab = (int)n_pieces;
            t->off = (uint32_t *)afm__alloc(&t->alloc, (n_pieces + 1) * sizeof(uint32_t));
            t->str = (char *)afm__alloc(&t->alloc, n_str + 1);
            t->score = (float *)afm__alloc(&t->alloc, n_pieces * sizeof(float));
            t->type = (uint8_t *)afm__alloc(&t->alloc, n_pieces);
            if (!t->off || !t->str || !t->score || !t->type) return AFM_ERR_NOMEM;
            t->off[0] = 0;
        }
    }
    t->byte_fallback = s.byte_fallback;
    t->ws_suffix = s.ws_suffix;
    t->add_dummy_prefix = s.add_dummy_prefix;
    t->remove_extra_ws = s.remove_extra_ws;
    t->escape_ws = s.escape_ws;

    /* piece tables, checks of sentencepiece's ModelInterface::InitializePieces */
    if (!afm__tok_ht_init(&t->alloc, &t->ht_normal, n_pieces) || !afm__tok_ht_init(&t->alloc, &t->ht_reserved, n_pieces))
        return AFM_ERR_NOMEM;
    for (k = 0; k < 256; k++) t->byte_id[k] = -1;
    for (k = 0; k < 256; k++) t->ud_root[k] = -1;
    for (k = 0; k < AFM_SPECIAL_COUNT; k++) t->special[k] = -1;
    for (i = 0; i < t->n_vocab; i++) {
        int ty = t->type[i];
        int normal = ty == AFM_TOKEN_NORMAL || ty == AFM_TOKEN_USER_DEFINED || ty == AFM_TOKEN_UNUSED;
        const char *ps = t->str + t->off[i];
        size_t pl = t->off[i + 1] - t->off[i];
        /* the sentencepiece library refuses a text defined twice, whatever the types */
        if (afm__tok_ht_find(t, normal ? &t->ht_reserved : &t->ht_normal, ps, pl) >= 0 ||
            !afm__tok_ht_add(t, normal ? &t->ht_normal : &t->ht_reserved, i)) {
            return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: piece %ld \"%.*s\" is already defined", (long)i, (int)(pl > 64 ? 64 : pl), ps);
        }
        if (ty == AFM_TOKEN_UNUSED) t->has_unused = 1;
        if (ty == AFM_TOKEN_UNKNOWN) {
            if (t->special[AFM_SPECIAL_UNK] >= 0)
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: unk is already defined (pieces %ld and %ld)", (long)t->special[AFM_SPECIAL_UNK], (long)i);
            t->special[AFM_SPECIAL_UNK] = i;
        }
        if (ty == AFM_TOKEN_BYTE) {
            static const char hex[] = "0123456789ABCDEF";
            const char *h1, *h2;
            if (!s.byte_fallback)
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: byte piece %ld although byte_fallback is false", (long)i);
            if (pl != 6 || memcmp(ps, "<0x", 3) != 0 || ps[5] != '>' || !(h1 = (const char *)memchr(hex, ps[3], 16)) ||
                !(h2 = (const char *)memchr(hex, ps[4], 16)) || !ps[3] || !ps[4]) {
                return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: byte piece %ld \"%.*s\" is invalid", (long)i, (int)(pl > 64 ? 64 : pl), ps);
            }
            k = (size_t)((h1 - hex) * 16 + (h2 - hex));
            if (t->byte_id[k] < 0) bytes_found++;
            t->byte_id[k] = i;
        }
        if (ty == AFM_TOKEN_USER_DEFINED || ty == AFM_TOKEN_CONTROL) {
            if (!afm__tok_ud_insert(t, (const unsigned char *)ps, pl, (uint8_t)(ty == AFM_TOKEN_USER_DEFINED ? 1 : 2), i, &ud_cap))
                return AFM_ERR_NOMEM;
        }
    }
    if (t->special[AFM_SPECIAL_UNK] < 0)
        return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: unk is not defined");
    if (s.byte_fallback && bytes_found != 256)
        return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: %d byte pieces although byte_fallback is true (need 256)", bytes_found);
    /* special ids the way SentencePieceProcessor::bos_id() etc. find them */
    {
        static const char *defaults[4] = {"<s>", "</s>", "<unk>", "<pad>"};
        const uint8_t *pieces[4];
        size_t lens[4];
        int which;
        pieces[0] = s.bos_piece; lens[0] = s.n_bos_piece;
        pieces[1] = s.eos_piece; lens[1] = s.n_eos_piece;
        pieces[2] = s.unk_piece; lens[2] = s.n_unk_piece;
        pieces[3] = s.pad_piece; lens[3] = s.n_pad_piece;
        for (which = 0; which < 4; which++) {
            const char *pp = lens[which] ? (const char *)pieces[which] : defaults[which];
            size_t pl = lens[which] ? lens[which] : strlen(defaults[which]);
            int32_t id = afm_tokenizer_piece_id(t, pp, pl);
            if (which == 2) continue; /* unk: the UNKNOWN piece */
            if (id < 0) id = t->special[AFM_SPECIAL_UNK];
            t->special[which == 3 ? AFM_SPECIAL_PAD : which] = t->type[id] == AFM_TOKEN_CONTROL ? id : -1;
        }
        {
            static const char *afm_names[5] = {"<n>", "<turn_start>", "<turn_end>", "<executable_start>", "<executable_end>"};
            for (which = 0; which < 5; which++)
                t->special[AFM_SPECIAL_NEWLINE + which] = afm_tokenizer_piece_id(t, afm_names[which], strlen(afm_names[which]));
        }
    }
    /* unk_surface (default " \xE2\x81\x87 ") */
    {
        const char *us = s.unk_surface ? (const char *)s.unk_surface : " \xE2\x81\x87 ";
        size_t ul = s.unk_surface ? s.n_unk_surface : 5;
        t->unk_surface = (char *)afm__alloc(&t->alloc, ul + 1);
        if (!t->unk_surface) return AFM_ERR_NOMEM;
        memcpy(t->unk_surface, us, ul);
        t->unk_surface[ul] = 0;
        t->unk_surface_len = ul;
    }
    /* precompiled_charsmap: <u32 trie size><trie units><NUL-separated replacement strings> */
    if (s.n_charsmap) {
        uint32_t tsize;
        if (s.n_charsmap <= 4)
            return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: precompiled_charsmap of %lu bytes is broken", (unsigned long)s.n_charsmap);
        tsize = (uint32_t)s.charsmap[0] | ((uint32_t)s.charsmap[1] << 8) | ((uint32_t)s.charsmap[2] << 16) | ((uint32_t)s.charsmap[3] << 24);
        if (tsize >= s.n_charsmap || tsize > s.n_charsmap - 4 || tsize / 4 == 0)
            return afm__fail(err, err_size, AFM_ERR_FORMAT, "tokenizer.model: precompiled_charsmap trie size %lu exceeds the blob (%lu bytes)", (unsigned long)tsize, (unsigned long)s.n_charsmap);
        t->n_trie = tsize / 4;
        t->trie = (uint32_t *)afm__alloc(&t->alloc, t->n_trie * 4);
        t->n_norm = s.n_charsmap - 4 - tsize;
        t->norm = (char *)afm__alloc(&t->alloc, t->n_norm + 1);
        if (!t->trie || !t->norm) return AFM_ERR_NOMEM;
        for (k = 0; k < t->n_trie; k++) {
            const uint8_t *u = s.charsmap + 4 + 4 * k;
            t->trie[k] = (uint32_t)u[0] | ((uint32_t)u[1] << 8) | ((uint32_t)u[2] << 16) | ((uint32_t)u[3] << 24);
        }
        memcpy(t->norm, s.charsmap + 4 + tsize, t->n_norm);
        t->norm[t->n_norm] = 0;
        for (k = 0; k < 256; k++) {
            size_t pos = afm__tok_darts_offset(t->trie[0]) ^ k;
            t->trie_first[k] = (uint8_t)(pos < t->n_trie && afm__tok_darts_label(t->trie[pos]) == k);
        }
    }
    /* Can BPE run word by word? Only where no merge can cross the cut. Characters fall into classes
       (U+2581, ASCII letter, ASCII digit, ASCII punctuation, ASCII space/control, other); the text may
       be cut between a class-X and a class-Y character when no NORMAL or UNUSED piece has such a pair
       of adjacent characters (user-defined pieces are never made by merges: the prefix matcher takes
       them first). UNUSED pieces make sentencepiece's resegmentation depend on the whole string: no
       cut at all then. */
    {
        int x, y;
        uint8_t seen[AFM__TOK_NCLS][AFM__TOK_NCLS];
        memset(seen, 0, sizeof seen);
        for (i = 0; i < t->n_vocab; i++) {
            const char *ps = t->str + t->off[i];
            size_t pl = t->off[i + 1] - t->off[i], j = 0, cl;
            int prev = -1;
            if (!(t->type[i] == AFM_TOKEN_NORMAL || t->type[i] == AFM_TOKEN_UNUSED)) continue;
            while (j < pl) {
                int c = afm__tok_cls_at(ps, j, pl, &cl);
                if (prev >= 0) seen[prev][c] = 1;
                prev = c;
                j += cl;
            }
        }
        for (x = 0; x < AFM__TOK_NCLS; x++)
            for (y = 0; y < AFM__TOK_NCLS; y++) t->cut[x][y] = (uint8_t)(!seen[x][y] && !t->has_unused);
    }
    /* the most bytes one token can decode to */
    {
        size_t mx = t->unk_surface_len;
        if (t->max_piece_len > mx) mx = t->max_piece_len;
        t->max_token_bytes = mx + 16;
    }
    for (k = 0; k < 256; k++) {
        int sp;
        for (sp = 0; sp < 2; sp++) {
            int plain = k < 0x80 && !t->trie_first[k] && !(t->ud_first[k] & (sp ? 3 : 1));
            size_t cl;
            char ch = (char)k;
            t->nf[sp][k] = (uint8_t)(!plain ? 0 : k == ' ' ? 2 : 1);
            t->sc[sp][k] = (uint8_t)(k < 0x80 && !(t->ud_first[k] & (sp ? 3 : 1)) ? afm__tok_cls_at(&ch, 0, 1, &cl) : 0xFF);
        }
    }
    return afm__tok_spm_pflags(t);
}

/* ---- SentencePiece normalizer (sentencepiece's Normalizer::Normalize) ---- */
/* One normalization step at s: the normalized string of the longest prefix, *consumed input bytes. */
static const char *afm__tok_norm_prefix(const afm_tokenizer *t, const unsigned char *s, size_t len, int special,
                                        size_t *out_len, size_t *consumed) {
    size_t n;
    int32_t id;
    uint32_t value = 0;
    if (t->ud && (n = afm__tok_ud_match(t, s, len, special, &id)) > 0) {
        *out_len = *consumed = n;
        return (const char *)s;
    }
    if (t->n_trie && t->trie_first[s[0]] && (n = afm__tok_charsmap_longest(t, s, len, &value)) > 0) {
        const char *r;
        *consumed = n;
        if (value >= t->n_norm) {
            *out_len = 0;
            return "";
        }
        r = t->norm + value;
        *out_len = strlen(r); /* t->norm is NUL-terminated at its end */
        return r;
    }
    if (afm__tok_utf8(s, len, &n) < 0) {
        *consumed = 1;
        *out_len = 3;
        return "\xEF\xBF\xBD";
    }
    *consumed = n;
    *out_len = n;
    return (const char *)s;
}

/* Normalizes text into b. Returns 0 on allocation failure. */
static int afm__tok_normalize(const afm_tokenizer *t, const char *text, size_t len, int special, afm__tok_buf *b) {
    const unsigned char *s = (const unsigned char *)text;
    size_t pos = 0, ol, cn;
    const char *o;
    int is_prev_space;
    b->n = 0;
    if (!len) return 1;
    if (t->remove_extra_ws) {
        while (pos < len) {
            o = afm__tok_norm_prefix(t, s + pos, len - pos, special, &ol, &cn);
            if (!(ol == 1 && o[0] == ' ')) break;
            pos += cn;
        }
    }
    if (pos >= len) return 1;
    if (!afm__tok_grow_l(&t->alloc, (void **)&b->p, &b->cap, (len - pos) * 3 + 8, 1, b->local)) return 0;
    if (!t->ws_suffix && t->add_dummy_prefix) {
        if (!afm__tok_buf_put(&t->alloc, b, t->escape_ws ? "\xE2\x96\x81" : " ", t->escape_ws ? 3 : 1)) return 0;
    }
    is_prev_space = t->remove_extra_ws;
    /* invariant: b has room for 3 bytes per remaining input byte (+8) */
    {
        const uint8_t *nf = t->nf[special ? 1 : 0];
        while (pos < len) {
            unsigned char c = s[pos];
            if (nf[c] == 1) {
                /* ASCII that stands for itself */
                size_t st = pos;
                do pos++;
                while (pos < len && nf[s[pos]] == 1);
                memcpy(b->p + b->n, s + st, pos - st);
                b->n += pos - st;
                is_prev_space = 0;
                continue;
            }
            if (nf[c] == 2) {
                pos++;
                if (is_prev_space) continue;
                if (t->escape_ws) {
                    b->p[b->n++] = (char)0xE2; b->p[b->n++] = (char)0x96; b->p[b->n++] = (char)0x81;
                } else b->p[b->n++] = ' ';
                is_prev_space = t->remove_extra_ws;
                continue;
            }
        o = afm__tok_norm_prefix(t, s + pos, len - pos, special, &ol, &cn);
        pos += cn;
        if (is_prev_space)
            while (ol && o[0] == ' ') { o++; ol--; }
        if (ol) {
            size_t j;
            if (!afm__tok_grow_l(&t->alloc, (void **)&b->p, &b->cap, b->n + ol * 3 + (len - pos) * 3 + 8, 1, b->local)) return 0;
            for (j = 0; j < ol; j++) {
                if (t->escape_ws && o[j] == ' ') {
                    b->p[b->n++] = (char)0xE2; b->p[b->n++] = (char)0x96; b->p[b->n++] = (char)0x81;
                } else b->p[b->n++] = o[j];
            }
            is_prev_space = o[ol - 1] == ' ';
        }
        if (!t->remove_extra_ws) is_prev_space = 0;
        }
    }
    if (t->remove_extra_ws) {
        if (t->escape_ws) while (b->n >= 3 && afm__tok_ws_at(b->p, b->n - 3, b->n)) b->n -= 3;
        else while (b->n >= 1 && b->p[b->n - 1] == ' ') b->n--;
    }
    if (t->ws_suffix && t->add_dummy_prefix) {
        if (!afm__tok_buf_put(&t->alloc, b, t->escape_ws ? "\xE2\x96\x81" : " ", t->escape_ws ? 3 : 1)) return 0;
    }
    return 1;
}

/* ---- SentencePiece BPE (sentencepiece's bpe::Model::SampleEncode with alpha = 0) ---- */
static int afm__tok_pair_better(const afm__tok_pair *a, const afm__tok_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}
static void afm__tok_heap_push(afm__tok_enc *e, afm__tok_pair p) {
    size_t i = e->heap_n++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!afm__tok_pair_better(&p, &e->heap[up])) break;
        e->heap[i] = e->heap[up];
        i = up;
    }
    e->heap[i] = p;
}
static afm__tok_pair afm__tok_heap_pop(afm__tok_enc *e) {
    afm__tok_pair top = e->heap[0], last = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && afm__tok_pair_better(&e->heap[c + 1], &e->heap[c])) c++;
        if (!afm__tok_pair_better(&e->heap[c], &last)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n) e->heap[i] = last;
    return top;
}

static void afm__tok_maybe_pair(afm__tok_enc *e, int32_t left, int32_t right) {
    const afm_tokenizer *t = e->t;
    afm__tok_pair p;
    int32_t id;
    size_t n;
    if (left < 0 || right < 0 || e->sym[left].freeze >= 0 || e->sym[right].freeze >= 0) return;
    n = (size_t)e->sym[left].len + (size_t)e->sym[right].len;
    if (n > t->max_piece_len) return;
    if (t->pt && e->sym[left].id >= 0 && e->sym[right].id >= 0) {
        /* both are pieces: the pair table knows whether they join */
        uint64_t key = ((uint64_t)(uint32_t)e->sym[left].id << 32) | (uint32_t)e->sym[right].id;
        uint32_t i = afm__tok_pairhash(key) & t->pt_mask;
        const afm__tok_pent *pe;
        while ((pe = &t->pt[i])->id >= 0 && pe->key != key) i = (i + 1) & t->pt_mask;
        if (pe->id < 0) return;
        id = pe->id;
        p.score = pe->score;
    } else {
        id = afm__tok_ht_find(t, &t->ht_normal, e->norm + e->sym[left].start, n);
        if (id < 0) return;
        p.score = t->score[id];
    }
    p.left = left;
    p.right = right;
    p.size = (int32_t)n;
    p.id = id;
    afm__tok_heap_push(e, p);
    if (t->type[id] == AFM_TOKEN_UNUSED) {
        afm__tok_rev r;
        void *q = e->rev;
        if (!afm__tok_grow(&t->alloc, &q, &e->rev_cap, e->rev_n + 1, sizeof(afm__tok_rev))) {
            e->failed = 1;
            return;
        }
        e->rev = (afm__tok_rev *)q;
        r.start = e->sym[left].start;
        r.len = (int32_t)n;
        r.left_len = e->sym[left].len;
        e->rev[e->rev_n++] = r;
    }
}

static int afm__tok_ids_push(const afm_allocator *m, afm__tok_ids *v, int32_t id) {
    if (v->n >= v->cap) {
        void *p = v->p;
        if (!afm__tok_grow_l(m, &p, &v->cap, v->n + 1, sizeof(int32_t), v->local)) return 0;
        v->p = (int32_t *)p;
    }
    v->p[v->n++] = id;
    return 1;
}

/* PieceToId of a piece of the normalized text, then unk -> byte fallback */
static void afm__tok_emit_piece(afm__tok_enc *e, int32_t start, int32_t len) {
    const afm_tokenizer *t = e->t;
    const char *s = e->norm + start;
    int32_t id = afm__tok_ht_find(t, &t->ht_reserved, s, (size_t)len);
    if (id < 0) id = afm__tok_ht_find(t, &t->ht_normal, s, (size_t)len);
    if (id < 0) id = t->special[AFM_SPECIAL_UNK];
    if (t->type[id] == AFM_TOKEN_UNUSED) {
        /* resegment: the most recent reverse merge of this string (sentencepiece's rev_merge map) */
        size_t k = e->rev_n;
        while (k > 0) {
            const afm__tok_rev *r = &e->rev[k - 1];
            if (r->len == len && memcmp(e->norm + r->start, s, (size_t)len) == 0) {
                int32_t ll = r->left_len;
                afm__tok_emit_piece(e, start, ll);
                afm__tok_emit_piece(e, start + ll, len - ll);
                return;
            }
            k--;
        }
    }
    if (t->type[id] == AFM_TOKEN_UNKNOWN && t->byte_fallback) {
        int32_t j;
        for (j = 0; j < len; j++)
            if (!afm__tok_ids_push(&t->alloc, &e->out, t->byte_id[(unsigned char)s[j]])) e->failed = 1;
        return;
    }
    if (!afm__tok_ids_push(&t->alloc, &e->out, id)) e->failed = 1;
}

/* the normal-map id of a one-character symbol s[0, ml), -1 if none */
static int32_t afm__tok_char_id(const afm_tokenizer *t, const char *s, size_t ml) {
    unsigned char c = (unsigned char)s[0];
    if (ml == 1 && c < 0x80) return t->cid[c];
    if (ml == 2 || ml == 3) {
        size_t l;
        int32_t cp = afm__tok_utf8((const unsigned char *)s, ml, &l);
        if (cp >= 0 && l == ml && cp < 0x10000) return t->cid[cp];
    }
    return afm__tok_ht_find(t, &t->ht_normal, s, ml);
}

/* builds the symbols of norm[a, b) into e->sym (user-defined symbols inside are frozen only when the
   whole text is one word, i.e. with UNUSED pieces); returns their count, -1 on allocation failure */
static int32_t afm__tok_symbols(afm__tok_enc *e, size_t a, size_t b) {
    const afm_tokenizer *t = e->t;
    int32_t ns = 0;
    size_t pos = a, need = b - a;
    if (need + 1 > e->sym_cap) {
        void *p = e->sym;
        if (!afm__tok_grow_l(&t->alloc, &p, &e->sym_cap, need + 1, sizeof(afm__tok_sym), e->sym_local)) return -1;
        e->sym = (afm__tok_sym *)p;
    }
    if (3 * need + 4 > e->heap_cap) {
        void *p = e->heap;
        if (!afm__tok_grow_l(&t->alloc, &p, &e->heap_cap, 3 * need + 4, sizeof(afm__tok_pair), e->heap_local)) return -1;
        e->heap = (afm__tok_pair *)p;
    }
    while (pos < b) {
        afm__tok_sym *y = &e->sym[ns];
        unsigned char c = (unsigned char)e->norm[pos];
        size_t ml = 0;
        int32_t fz = -1;
        if (t->has_unused && t->ud && (t->ud_first[c] & (e->special ? 3 : 1)))
            ml = afm__tok_ud_match(t, (const unsigned char *)e->norm + pos, b - pos, e->special, &fz);
        if (!ml) {
            ml = afm__tok_onecharlen(c);
            if (ml > b - pos) ml = b - pos;
        }
        y->start = (int32_t)pos;
        y->len = (int32_t)ml;
        y->prev = ns - 1;
        y->next = ns + 1;
        y->freeze = fz;
        y->id = fz >= 0 ? -1 : afm__tok_char_id(t, e->norm + pos, ml);
        ns++;
        pos += ml;
    }
    if (ns) e->sym[ns - 1].next = -1;
    return ns;
}

/* BPE over symbols [0, n) of e->sym (already linked); appends the word's ids to e->out */
static void afm__tok_bpe_merge(afm__tok_enc *e, int32_t n) {
    int32_t i;
    e->heap_n = 0;
    if (n < 2) return;
    if (e->t->pt)
        for (i = 1; i < n; i++) {
            uint64_t key = ((uint64_t)(uint32_t)e->sym[i - 1].id << 32) | (uint32_t)e->sym[i].id;
            AFM__PREFETCH(&e->t->pt[afm__tok_pairhash(key) & e->t->pt_mask]);
        }
    for (i = 1; i < n; i++) afm__tok_maybe_pair(e, i - 1, i);
    while (e->heap_n) {
        afm__tok_pair top = afm__tok_heap_pop(e);
        afm__tok_sym *l = &e->sym[top.left], *r = &e->sym[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue;
        l->len += r->len;
        l->id = top.id;
        l->next = r->next;
        if (r->next >= 0) e->sym[r->next].prev = top.left;
        r->len = 0;
        afm__tok_maybe_pair(e, l->prev, top.left);
        afm__tok_maybe_pair(e, top.left, l->next);
    }
}
static void afm__tok_bpe_word(afm__tok_enc *e, int32_t n) {
    const afm_tokenizer *t = e->t;
    int32_t i;
    afm__tok_bpe_merge(e, n);
    for (i = n > 0 ? 0 : -1; i >= 0; i = e->sym[i].next) {
        const afm__tok_sym *y = &e->sym[i];
        if (y->freeze >= 0) {
            if (!afm__tok_ids_push(&t->alloc, &e->out, y->freeze)) e->failed = 1;
        } else if (y->id >= 0 && !(t->pflags[y->id] & AFM__TOK_PF_SHADOW) && t->type[y->id] != AFM_TOKEN_UNUSED) {
            if (!afm__tok_ids_push(&t->alloc, &e->out, y->id)) e->failed = 1;
        } else afm__tok_emit_piece(e, y->start, y->len);
    }
}

static void afm__tok_out(afm__tok_enc *e, int32_t id) {
    const afm_tokenizer *t = e->t;
    int unk = t->type[id] == AFM_TOKEN_UNKNOWN;
    if (unk && e->prev_unk && !t->byte_fallback) return; /* runs of unknown pieces are one token */
    e->prev_unk = unk;
    if (e->n < e->cap) e->tokens[e->n] = id;
    e->n++;
}

#define AFM__TOK_CACHE_MAX_WORD 64
/* encodes the word norm[a, b) whose hash is h */
static void afm__tok_word(afm__tok_enc *e, size_t a, size_t b, uint32_t h) {
    const afm_tokenizer *t = e->t;
    size_t k, n = b - a;
    uint32_t slot = 0;
    int32_t ns;
    int cacheable;
    if (n <= t->max_piece_len && !t->has_unused) {
        /* the whole word is a piece that BPE rebuilds from its characters (decided at load) */
        int32_t id = afm__tok_ht_get_h(&t->ht_normal, t->str, e->norm + a, n, h);
        if (id >= 0 && (t->pflags[id] & AFM__TOK_PF_SELF)) {
            afm__tok_out(e, id);
            return;
        }
    }
    cacheable = e->c_mask && n <= AFM__TOK_CACHE_MAX_WORD;
    if (cacheable) {
        slot = h & e->c_mask;
        while (e->c_len[slot]) {
            if (e->c_hash[slot] == h && e->c_len[slot] == n && memcmp(e->norm + e->c_off[slot], e->norm + a, n) == 0) {
                const int32_t *ids = e->c_pool.p + e->c_ids[slot];
                uint32_t j, m = e->c_nids[slot];
                for (j = 0; j < m; j++) afm__tok_out(e, ids[j]);
                return;
            }
            slot = (slot + 1) & e->c_mask;
        }
    }
    ns = afm__tok_symbols(e, a, b);
    if (ns < 0) {
        e->failed = 1;
        return;
    }
    e->out.n = 0;
    afm__tok_bpe_word(e, ns);
    for (k = 0; k < e->out.n; k++) afm__tok_out(e, e->out.p[k]);
    if (cacheable && !e->failed && e->c_used * 2 < e->c_mask) {
        size_t base = e->c_pool.n;
        for (k = 0; k < e->out.n; k++)
            if (!afm__tok_ids_push(&t->alloc, &e->c_pool, e->out.p[k])) return;
        e->c_hash[slot] = h;
        e->c_off[slot] = (uint32_t)a;
        e->c_len[slot] = (uint32_t)n;
        e->c_ids[slot] = (uint32_t)base;
        e->c_nids[slot] = (uint32_t)e->out.n;
        e->c_used++;
    }
}

static int afm__tok_enc_cache(afm__tok_enc *e, size_t n) {
    const afm_tokenizer *t = e->t;
    size_t cap = 1024, i;
    while (cap < n / 16 && cap < (1u << 16)) cap *= 2;
    e->c_hash = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
    e->c_off = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
    e->c_len = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
    e->c_ids = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
    e->c_nids = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
    if (!e->c_hash || !e->c_off || !e->c_len || !e->c_ids || !e->c_nids) return 0;
    for (i = 0; i < cap; i++) e->c_len[i] = 0;
    e->c_mask = (uint32_t)(cap - 1);
    return 1;
}

/* SentencePiece encode of normalized text norm[0, n): cut into words where no merge can cross
   (see the cut classes at load), user-defined symbols are words of their own. Words go in batches so
   that their hash-table slots can be prefetched while earlier words are encoded. */
#define AFM__TOK_BATCH 32
static void afm__tok_spm_encode_norm(afm__tok_enc *e, const char *norm, size_t n, int special) {
    const afm_tokenizer *t = e->t;
    const unsigned char *s = (const unsigned char *)norm;
    size_t pos = 0, word_start = 0;
    int prev = -1, nb = 0, k;
    uint8_t want = (uint8_t)(special ? 3 : 1);
    int ud = t->ud != NULL && !t->has_unused;
    size_t wa[AFM__TOK_BATCH], wb[AFM__TOK_BATCH];
    int32_t wid[AFM__TOK_BATCH];
    uint32_t wh[AFM__TOK_BATCH];
    e->norm = norm;
    e->special = special;
    if (!t->has_unused && n > 4096 && !afm__tok_enc_cache(e, n)) {
        e->failed = 1;
        return;
    }
#define AFM__TOK_FLUSH()                                                                                    \
    do {                                                                                                  \
        for (k = 0; k < nb; k++) {                                                                        \
            if (wid[k] >= 0) continue;                                                                    \
            wh[k] = afm__tok_hash(norm + wa[k], wb[k] - wa[k]);                                           \
            AFM__PREFETCH(&t->ht_normal.e[wh[k] & t->ht_normal.mask]);                                \
        }                                                                                                 \
        for (k = 0; k < nb && !e->failed; k++) {                                                          \
            if (wid[k] >= 0) afm__tok_out(e, wid[k]);                                                     \
            else afm__tok_word(e, wa[k], wb[k], wh[k]);                                                   \
        }                                                                                                 \
        nb = 0;                                                                                           \
    } while (0)
    const uint8_t *sc = t->sc[special ? 1 : 0];
    while (pos < n) {
        unsigned char c = s[pos];
        int cls = sc[c];
        size_t ml;
        if (cls != 0xFF) {
            /* ASCII: runs of one class are cut only where the class allows */
            if (prev >= 0 && t->cut[prev][cls]) {
                wa[nb] = word_start; wb[nb] = pos; wid[nb] = -1; nb++;
                if (nb == AFM__TOK_BATCH) AFM__TOK_FLUSH();
                word_start = pos;
                if (e->failed) return;
            }
            prev = cls;
            pos++;
            if (!t->cut[cls][cls])
                while (pos < n && sc[s[pos]] == cls) pos++;
            continue;
        }
        if (ud && (t->ud_first[c] & want)) {
            int32_t id = -1;
            ml = afm__tok_ud_match(t, s + pos, n - pos, special, &id);
            if (ml) {
                if (pos > word_start) {
                    wa[nb] = word_start; wb[nb] = pos; wid[nb] = -1; nb++;
                    if (nb == AFM__TOK_BATCH) AFM__TOK_FLUSH();
                }
                wa[nb] = pos; wb[nb] = pos + ml; wid[nb] = id; nb++;
                if (nb == AFM__TOK_BATCH) AFM__TOK_FLUSH();
                pos += ml;
                word_start = pos;
                prev = -1;
                continue;
            }
        }
        cls = afm__tok_cls_at(norm, pos, n, &ml);
        if (prev >= 0 && t->cut[prev][cls]) {
            wa[nb] = word_start; wb[nb] = pos; wid[nb] = -1; nb++;
            if (nb == AFM__TOK_BATCH) AFM__TOK_FLUSH();
            word_start = pos;
            if (e->failed) return;
        }
        prev = cls;
        pos += ml;
    }
    if (pos > word_start) {
        wa[nb] = word_start; wb[nb] = pos; wid[nb] = -1; nb++;
    }
    AFM__TOK_FLUSH();
#undef AFM__TOK_FLUSH
}

/* at load: which pieces BPE rebuilds from their own characters (the whole-word fast path) */
static afm_result afm__tok_spm_pflags(afm_tokenizer *t) {
    afm__tok_enc e;
    int32_t i;
    uint32_t cp;
    afm_result r = AFM_OK;
    t->pflags = (uint8_t *)afm__alloc(&t->alloc, (size_t)t->n_vocab);
    t->cid = (int32_t *)afm__alloc(&t->alloc, 65536 * sizeof(int32_t));
    if (!t->pflags || !t->cid) return AFM_ERR_NOMEM;
    for (cp = 0; cp < 65536; cp++) {
        char u8[4];
        size_t l;
        if (cp >= 0xD800 && cp <= 0xDFFF) {
            t->cid[cp] = -1;
            continue;
        }
        l = afm__utf8_put(u8, cp);
        t->cid[cp] = afm__tok_ht_find(t, &t->ht_normal, u8, l);
    }
    /* the pair table: every split of every piece into two pieces. Only splits into two lengths that
       some piece has are looked up: hashing every prefix and suffix of a long piece would take time
       quadratic in its length (a 400 KB piece: 30 s). */
    {
        size_t count = 0, cap = 16;
        int pass;
        uint8_t *has_len = (uint8_t *)afm__calloc(&t->alloc, t->max_piece_len + 1, 1);
        if (!has_len) return AFM_ERR_NOMEM;
        for (i = 0; i < t->n_vocab; i++) {
            int ty = t->type[i];
            if (ty == AFM_TOKEN_NORMAL || ty == AFM_TOKEN_USER_DEFINED || ty == AFM_TOKEN_UNUSED) has_len[t->off[i + 1] - t->off[i]] = 1;
        }
        for (pass = 0; pass < 2; pass++) {
            for (i = 0; i < t->n_vocab; i++) {
                const char *ps = t->str + t->off[i];
                size_t pl = t->off[i + 1] - t->off[i], k = afm__tok_onecharlen((unsigned char)ps[0]);
                int ty = t->type[i];
                if (!(ty == AFM_TOKEN_NORMAL || ty == AFM_TOKEN_USER_DEFINED || ty == AFM_TOKEN_UNUSED)) continue;
                for (; k < pl; k += afm__tok_onecharlen((unsigned char)ps[k])) {
                    int32_t a, b;
                    if (!has_len[k] || !has_len[pl - k]) continue;
                    a = afm__tok_ht_find(t, &t->ht_normal, ps, k);
                    if (a < 0) continue;
                    b = afm__tok_ht_find(t, &t->ht_normal, ps + k, pl - k);
                    if (b < 0) continue;
                    if (pass == 0) count++;
                    else {
                        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
                        uint32_t h = afm__tok_pairhash(key) & t->pt_mask;
                        while (t->pt[h].id >= 0 && t->pt[h].key != key) h = (h + 1) & t->pt_mask;
                        t->pt[h].key = key;
                        t->pt[h].id = i;
                        t->pt[h].score = t->score[i];
                    }
                }
            }
            if (pass == 0) {
                size_t q;
                while (cap < count * 2) cap *= 2;
                t->pt = (afm__tok_pent *)afm__alloc(&t->alloc, cap * sizeof(afm__tok_pent));
                if (!t->pt) { afm__free(&t->alloc, has_len); return AFM_ERR_NOMEM; }
                for (q = 0; q < cap; q++) t->pt[q].id = -1;
                t->pt_mask = (uint32_t)(cap - 1);
            }
        }
        afm__free(&t->alloc, has_len);
    }
    memset(&e, 0, sizeof e);
    e.t = t;
    e.norm = t->str;
    for (i = 0; i < t->n_vocab; i++) {
        size_t a = t->off[i], b = t->off[i + 1];
        t->pflags[i] = 0;
        if (afm__tok_ht_find(t, &t->ht_reserved, t->str + a, b - a) >= 0) t->pflags[i] |= AFM__TOK_PF_SHADOW;
    }
    for (i = 0; i < t->n_vocab && !t->has_unused; i++) {
        size_t a = t->off[i], b = t->off[i + 1];
        int32_t ns;
        if (t->type[i] != AFM_TOKEN_NORMAL || (t->pflags[i] & AFM__TOK_PF_SHADOW)) continue;
        ns = afm__tok_symbols(&e, a, b);
        if (ns < 0) {
            r = AFM_ERR_NOMEM;
            break;
        }
        afm__tok_bpe_merge(&e, ns);
        if (e.failed) {
            r = AFM_ERR_NOMEM;
            break;
        }
        if (ns > 0 && e.sym[0].next < 0 && e.sym[0].id == i) t->pflags[i] |= AFM__TOK_PF_SELF;
    }
    afm__tok_enc_free(&e);
    return r;
}

/* ======================================================================================== */
/* ==== TOKENIZER: byte-level BPE from tokenizer.json (Hugging Face tokenizers) =========== */
/* ======================================================================================== */
/* Opt-in (AFM_HF_TOKENIZER): AFM models use SentencePiece, so the default build is afm.h alone. With
   the macro, afm_tokenizer.h (Unicode 14 character classes, combining classes, decompositions and
   compositions, generated by tests/gen/gen_unicode_tables.py) must sit next to afm.h. */
#ifdef AFM_HF_TOKENIZER
#include "afm_tokenizer.h"

/* undoes the JSON escapes of string node idx, appending to b; 0 when out of memory */
static int afm__tok_json_str(const afm_allocator *m, const afm__json *j, int32_t idx, afm__tok_buf *b) {
    void *p = b->p;
    if (!afm__tok_grow_l(m, &p, &b->cap, b->n + j->n[idx].len + 1, 1, b->local)) return 0;
    b->p = (char *)p;
    b->n += afm__json_unescape(j, idx, b->p + b->n);
    return 1;
}

/* ---- Unicode: classes and normalization (tables in afm_tokenizer.h) ---- */
static unsigned afm__tok_class(int32_t c) {
    if (c < 0 || c > 0x10FFFF) return 0;
    return afm__tok_class_blocks[afm__tok_class_index[c >> 8]][c & 255];
}
static unsigned afm__tok_ccc(uint32_t c) {
    if (c > 0x10FFFF) return 0;
    return afm__tok_ccc_blocks[afm__tok_ccc_index[c >> 8]][c & 255];
}
static uint32_t afm__tok_compose(uint32_t a, uint32_t b) {
    uint64_t key;
    size_t lo = 0, hi = sizeof afm__tok_comp_keys / sizeof afm__tok_comp_keys[0];
    if (a >= 0x1100 && a < 0x1113 && b >= 0x1161 && b < 0x1176) return 0xAC00 + ((a - 0x1100) * 21 + (b - 0x1161)) * 28;
    if (a >= 0xAC00 && a < 0xAC00 + 11172 && (a - 0xAC00) % 28 == 0 && b > 0x11A7 && b < 0x11C3) return a + (b - 0x11A7);
    key = ((uint64_t)a << 21) | b;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (afm__tok_comp_keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo < sizeof afm__tok_comp_keys / sizeof afm__tok_comp_keys[0] && afm__tok_comp_keys[lo] == key ? afm__tok_comp_vals[lo] : 0;
}

#define AFM__TOK_NF_C 1 /* compose */
#define AFM__TOK_NF_K 2 /* compatibility */
/* normalizes s[0, n) into b (appending). Invalid UTF-8 bytes pass through unchanged and block composition.
   Code points are collected as uint32; bytes of invalid sequences are stored as 0x80000000 | byte. */
static int afm__tok_nf(const afm_allocator *m, const char *s, size_t n, int form, afm__tok_buf *b) {
    uint32_t *cp = NULL;
    size_t cap = 0, k = 0, i = 0, j, st;
    int ok = 0;
    for (j = 0; j < n && (unsigned char)s[j] < 0x80; j++) {
    }
    if (j == n) return afm__tok_buf_put(m, b, s, n); /* ASCII is invariant */
    while (i < n) {
        size_t l;
        int32_t c = afm__tok_utf8((const unsigned char *)s + i, n - i, &l);
        uint32_t tmp[3];
        const uint32_t *d;
        size_t dn, q;
        if (c < 0) {
            tmp[0] = 0x80000000u | (unsigned char)s[i];
            d = tmp;
            dn = 1;
        } else if (c >= 0xAC00 && c < 0xAC00 + 11172) {
            uint32_t sidx = (uint32_t)c - 0xAC00;
            tmp[0] = 0x1100 + sidx / (21 * 28);
            tmp[1] = 0x1161 + (sidx % (21 * 28)) / 28;
            tmp[2] = 0x11A7 + sidx % 28;
            d = tmp;
            dn = tmp[2] == 0x11A7 ? 2 : 3;
        } else {
            unsigned e = afm__tok_dec_blocks[afm__tok_dec_index[c >> 8]][c & 255];
            if (e && (form & AFM__TOK_NF_K ? afm__tok_dec_entries[e - 1][3] : afm__tok_dec_entries[e - 1][1])) {
                const uint16_t *en = afm__tok_dec_entries[e - 1];
                d = afm__tok_dec_pool + (form & AFM__TOK_NF_K ? en[2] : en[0]);
                dn = form & AFM__TOK_NF_K ? en[3] : en[1];
            } else {
                tmp[0] = (uint32_t)c;
                d = tmp;
                dn = 1;
            }
        }
        if (k + dn > cap) {
            void *p = cp;
            if (!afm__tok_grow(m, &p, &cap, k + dn, sizeof(uint32_t))) goto out;
            cp = (uint32_t *)p;
        }
        for (q = 0; q < dn; q++) {
            /* canonical ordering: insert after every non-starter of higher class */
            uint32_t x = d[q];
            unsigned cc = x & 0x80000000u ? 0 : afm__tok_ccc(x);
            size_t pos = k;
            if (cc)
                while (pos > 0 && !(cp[pos - 1] & 0x80000000u) && afm__tok_ccc(cp[pos - 1]) > cc) pos--;
            memmove(cp + pos + 1, cp + pos, (k - pos) * sizeof(uint32_t));
            cp[pos] = x;
            k++;
        }
        i += l;
    }
    if ((form & AFM__TOK_NF_C) && k > 0) {
        /* canonical composition (UAX #15) */
        size_t starter = 0, out = 1;
        unsigned last = cp[0] & 0x80000000u ? 256 : afm__tok_ccc(cp[0]);
        if (last != 0) last = 256;
        for (st = 1; st < k; st++) {
            uint32_t c = cp[st];
            unsigned cc = c & 0x80000000u ? 256 : afm__tok_ccc(c);
            uint32_t comp = 0;
            if (!(cp[starter] & 0x80000000u) && !(c & 0x80000000u) && (last < cc || last == 0)) comp = afm__tok_compose(cp[starter], c);
            if (comp && (last < cc || last == 0)) {
                cp[starter] = comp;
                continue;
            }
            if (cc == 0) starter = out;
            last = cc;
            cp[out++] = c;
        }
        k = out;
    }
    for (st = 0; st < k; st++) {
        char u8[4];
        size_t ul;
        if (cp[st] & 0x80000000u) {
            u8[0] = (char)(cp[st] & 0xFF);
            ul = 1;
        } else ul = afm__utf8_put(u8, cp[st]);
        if (!afm__tok_buf_put(m, b, u8, ul)) goto out;
    }
    ok = 1;
out:
    afm__free(m, cp);
    return ok;
}

/* ---- pre-tokenizer patterns, matched by hand ---- */
enum { AFM__TOK_PAT_NONE = 0, AFM__TOK_PAT_GPT2, AFM__TOK_PAT_LLAMA3, AFM__TOK_PAT_QWEN2 };
static const char afm__tok_pat_gpt2[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char afm__tok_pat_llama3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char afm__tok_pat_qwen2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* the code point at s[i] (-1 for an invalid byte) and its length */
static int32_t afm__tok_cp_at(const char *s, size_t n, size_t i, size_t *l) {
    if (i >= n) {
        *l = 0;
        return -2;
    }
    if ((unsigned char)s[i] < 0x80) {
        *l = 1;
        return (unsigned char)s[i];
    }
    return afm__tok_utf8((const unsigned char *)s + i, n - i, l);
}
/* end of the run of characters whose class has any of the bits (or, with neg, none of them) */
static size_t afm__tok_run(const char *s, size_t n, size_t i, unsigned bits, int neg, int max) {
    int count = 0;
    while (i < n && (max <= 0 || count < max)) {
        size_t l;
        int32_t c = afm__tok_cp_at(s, n, i, &l);
        unsigned cl = afm__tok_class(c);
        if (neg ? (cl & bits) != 0 : (cl & bits) == 0) break;
        i += l;
        count++;
    }
    return i;
}
static int afm__tok_fold_eq(int32_t c, char lower) {
    if (c == lower || c == lower - 32) return 1;
    return lower == 's' && c == 0x17F; /* LATIN SMALL LETTER LONG S folds to s */
}
/* the end of the pattern's match that starts at i (there always is one for these patterns) */
static size_t afm__tok_pretok_match(int pat, const char *s, size_t n, size_t i) {
    size_t l0, l1, j;
    int32_t c0 = afm__tok_cp_at(s, n, i, &l0), c1 = afm__tok_cp_at(s, n, i + l0, &l1);
    unsigned k0 = afm__tok_class(c0), k1 = c1 >= -1 ? afm__tok_class(c1) : 0;
    const unsigned LN = AFM_TOK_CL_L | AFM_TOK_CL_N, WLN = AFM_TOK_CL_WS | AFM_TOK_CL_L | AFM_TOK_CL_N;
    int ci = pat != AFM__TOK_PAT_GPT2;
    /* contractions */
    if (c0 == '\'' && c1 >= 0) {
        size_t l2;
        int32_t c2 = afm__tok_cp_at(s, n, i + l0 + l1, &l2);
        if (!ci) {
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
            if ((c1 == 'r' || c1 == 'v') && c2 == 'e') return i + 3;
            if (c1 == 'l' && c2 == 'l') return i + 3;
        } else {
            if (afm__tok_fold_eq(c1, 's') || afm__tok_fold_eq(c1, 't') || afm__tok_fold_eq(c1, 'm') || afm__tok_fold_eq(c1, 'd'))
                return i + l0 + l1;
            if ((afm__tok_fold_eq(c1, 'r') || afm__tok_fold_eq(c1, 'v')) && afm__tok_fold_eq(c2, 'e')) return i + l0 + l1 + l2;
            if (afm__tok_fold_eq(c1, 'l') && afm__tok_fold_eq(c2, 'l')) return i + l0 + l1 + l2;
        }
    }
    if (pat == AFM__TOK_PAT_GPT2) {
        if (k0 & AFM_TOK_CL_L) return afm__tok_run(s, n, i, AFM_TOK_CL_L, 0, 0);
        if (c0 == ' ' && (k1 & AFM_TOK_CL_L) && c1 >= 0) return afm__tok_run(s, n, i + 1, AFM_TOK_CL_L, 0, 0);
        if (k0 & AFM_TOK_CL_N) return afm__tok_run(s, n, i, AFM_TOK_CL_N, 0, 0);
        if (c0 == ' ' && (k1 & AFM_TOK_CL_N) && c1 >= 0) return afm__tok_run(s, n, i + 1, AFM_TOK_CL_N, 0, 0);
        if (!(k0 & WLN)) return afm__tok_run(s, n, i, WLN, 1, 0);
        if (c0 == ' ' && c1 >= -1 && !(k1 & WLN)) return afm__tok_run(s, n, i + 1, WLN, 1, 0);
    } else {
        if (k0 & AFM_TOK_CL_L) return afm__tok_run(s, n, i, AFM_TOK_CL_L, 0, 0);
        if (c0 != '\r' && c0 != '\n' && !(k0 & LN) && c1 >= 0 && (k1 & AFM_TOK_CL_L))
            return afm__tok_run(s, n, i + l0, AFM_TOK_CL_L, 0, 0);
        if (k0 & AFM_TOK_CL_N) return afm__tok_run(s, n, i, AFM_TOK_CL_N, 0, pat == AFM__TOK_PAT_LLAMA3 ? 3 : 1);
        j = 0;
        if (!(k0 & WLN)) j = afm__tok_run(s, n, i, WLN, 1, 0);
        else if (c0 == ' ' && c1 >= -1 && !(k1 & WLN)) j = afm__tok_run(s, n, i + 1, WLN, 1, 0);
        if (j) {
            while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
            return j;
        }
        if (k0 & AFM_TOK_CL_WS) {
            /* \s*[\r\n]+ : up to the last \r or \n of the whitespace run */
            size_t e = afm__tok_run(s, n, i, AFM_TOK_CL_WS, 0, 0), q, last = 0;
            for (q = i; q < e; q++)
                if (s[q] == '\r' || s[q] == '\n') last = q + 1;
            if (last) return last;
        }
    }
    if (k0 & AFM_TOK_CL_WS) {
        /* \s+(?!\S) then \s+ */
        size_t e = afm__tok_run(s, n, i, AFM_TOK_CL_WS, 0, 0), q, lastc = i;
        if (e >= n) return e;
        for (q = i; q < e;) {
            size_t l;
            afm__tok_cp_at(s, n, q, &l);
            lastc = q;
            q += l;
        }
        return lastc > i ? lastc : e;
    }
    /* not reached for valid patterns: one character */
    return i + (l0 ? l0 : 1);
}

/* ---- the tokenizer.json model ---- */
typedef struct afm__tok_added {
    int32_t id;
    uint32_t off, len;   /* content, in h->astr */
    uint32_t noff, nlen; /* content after the normalizer (normalized tokens; else = content) */
    uint8_t special, lstrip, rstrip, single_word, normalized;
} afm__tok_added;

typedef struct afm__tok_hf {
    int pattern;          /* split regex (a Split pre-tokenizer or ByteLevel's own with use_regex) */
    int add_prefix_space; /* ByteLevel */
    int nf_forms[8], n_nf; /* normalizers in order: AFM__TOK_NF_* bits, 4 = decompose only marker */
    int ignore_merges, fuse_unk;
    int32_t unk_id;
    int32_t byte_tok[256]; /* vocab id of each byte's character, -1 none */
    /* merges: (left id, right id) -> (rank, new id) */
    uint64_t *mkey;
    uint32_t *mrank;
    int32_t *mnew;
    uint32_t mmask;
    /* token id -> bytes it decodes to */
    uint32_t *doff;
    char *dstr;
    afm__tok_ht ht_raw; /* model vocab by decoded bytes (keys in dstr) */
    afm__tok_added *added;
    int32_t n_added;
    char *astr;
    afm__tok_trie_node *trie[2]; /* added-token tries: [0] raw text, [1] normalized text */
    int32_t n_trie_nodes[2];
    size_t trie_cap[2];
    int32_t trie_root[2][256];
} afm__tok_hf;

static void afm__tok_hf_free(afm_tokenizer *t) {
    afm__tok_hf *h = (afm__tok_hf *)t->hf;
    if (!h) return;
    afm__free(&t->alloc, h->mkey);
    afm__free(&t->alloc, h->mrank);
    afm__free(&t->alloc, h->mnew);
    afm__free(&t->alloc, h->doff);
    afm__free(&t->alloc, h->dstr);
    afm__tok_ht_free(&t->alloc, &h->ht_raw);
    afm__free(&t->alloc, h->added);
    afm__free(&t->alloc, h->astr);
    afm__free(&t->alloc, h->trie[0]);
    afm__free(&t->alloc, h->trie[1]);
    afm__free(&t->alloc, h);
    t->hf = NULL;
}

static uint32_t afm__tok_mhash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xFF51AFD7ED558CCDull;
    k ^= k >> 33;
    return (uint32_t)k;
}
static int afm__tok_merge_find(const afm__tok_hf *h, int32_t a, int32_t b, uint32_t *rank, int32_t *nw) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint32_t i = afm__tok_mhash(key) & h->mmask;
    while (h->mnew[i] >= 0) {
        if (h->mkey[i] == key) {
            *rank = h->mrank[i];
            *nw = h->mnew[i];
            return 1;
        }
        i = (i + 1) & h->mmask;
    }
    return 0;
}
/* a repeated merge takes the later rank, as HF's map does */
static void afm__tok_merge_put(afm__tok_hf *h, int32_t a, int32_t b, uint32_t rank, int32_t nw) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint32_t i = afm__tok_mhash(key) & h->mmask;
    while (h->mnew[i] >= 0 && h->mkey[i] != key) i = (i + 1) & h->mmask;
    h->mkey[i] = key;
    h->mrank[i] = rank;
    h->mnew[i] = nw;
}

/* the byte-level alphabet: byte -> code point */
static uint32_t afm__tok_byte_cp(unsigned b) {
    unsigned k, n = 0;
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
    for (k = 0; k < b; k++)
        if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) n++;
    return 256 + n;
}
/* the inverse: the byte a code point of the byte alphabet stands for, -1 if none */
static int afm__tok_cp_byte(int32_t cp) {
    if ((cp >= '!' && cp <= '~') || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF)) return (int)cp;
    cp -= 256; /* the other bytes in order: 0x00-0x20, 0x7F-0xA0, 0xAD */
    if (cp >= 0 && cp < 33) return (int)cp;
    if (cp >= 33 && cp < 67) return (int)(0x7F + cp - 33);
    return cp == 67 ? 0xAD : -1;
}

static int afm__tok_trie_add(const afm_allocator *m, afm__tok_trie_node **nodes, int32_t *count, size_t *cap,
                             int32_t *root, const unsigned char *s, size_t n, int32_t id) {
    int32_t node = -1, *link;
    size_t i;
    for (i = 0; i < n; i++) {
        link = i == 0 ? &root[s[0]] : &(*nodes)[node].child;
        while (*link >= 0 && (*nodes)[*link].byte != s[i]) link = &(*nodes)[*link].sibling;
        if (*link < 0) {
            afm__tok_trie_node *nn;
            void *p = *nodes;
            if (!afm__tok_grow(m, &p, cap, (size_t)*count + 1, sizeof *nn)) return 0;
            *nodes = nn = (afm__tok_trie_node *)p;
            link = i == 0 ? &root[s[0]] : &(*nodes)[node].child;
            while (*link >= 0) link = &(*nodes)[*link].sibling;
            nn[*count].child = nn[*count].sibling = -1;
            nn[*count].byte = s[i];
            nn[*count].flags = 0;
            nn[*count].id = -1;
            *link = (*count)++;
        }
        node = *link;
    }
    /* HF: a later token with the same text wins */
    (*nodes)[node].flags = 1;
    (*nodes)[node].id = id;
    return 1;
}
/* longest added token at s (index into h->added), or -1 */
static int32_t afm__tok_trie_longest(const afm__tok_trie_node *nodes, const int32_t *root, const char *s, size_t n,
                                     size_t *len) {
    int32_t node, best = -1;
    size_t i;
    if (!n || !nodes) return -1;
    node = root[(unsigned char)s[0]];
    for (i = 0; node >= 0;) {
        if (nodes[node].flags) {
            best = nodes[node].id;
            *len = i + 1;
        }
        if (++i >= n) break;
        node = nodes[node].child;
        while (node >= 0 && nodes[node].byte != (unsigned char)s[i]) node = nodes[node].sibling;
    }
    return best;
}

/* ---- loading a tokenizer.json, one step after another ---- */
/* The load's state. The tables being filled belong to t and t->hf (afm_tokenizer_free releases them after
   a failure); the parsed JSON and the temporary buffers belong here and are freed in one place. */
typedef struct afm__tok_hf_load {
    afm_tokenizer *t;
    afm__tok_hf *h;
    char *err;
    size_t err_size;
    afm__json j;
    size_t size;                 /* bytes of the file */
    int32_t model, vocab, added; /* nodes: model, model.vocab, added_tokens (-1: absent) */
    afm__tok_buf tmp;            /* one JSON string at a time */
    int32_t *node_of;            /* id -> its key in model.vocab, -1 */
    int32_t *added_of;           /* id -> its index in h->added, -1 */
    uint32_t *noff;              /* the final strings (offsets into fb) until they become t->off, t->str */
    afm__tok_buf fb;
} afm__tok_hf_load;

static void afm__tok_hf_load_free(afm__tok_hf_load *L) {
    const afm_allocator *m = &L->t->alloc;
    afm__json_free(m, &L->j);
    afm__free(m, L->tmp.p);
    afm__free(m, L->node_of);
    afm__free(m, L->added_of);
    afm__free(m, L->noff);
    afm__free(m, L->fb.p);
}
static afm_result afm__tok_hf_oom(afm__tok_hf_load *L) {
    return afm__fail(L->err, L->err_size, AFM_ERR_NOMEM, "tokenizer.json: out of memory");
}

static afm_result afm__tok_hf_parse(afm__tok_hf_load *L, const uint8_t *data, size_t size) {
    size_t where = 0;
    const char *why = "";
    if (afm__json_parse(&L->t->alloc, (const char *)data, size, &L->j, &where, &why)) return AFM_OK;
    if (strcmp(why, "out of memory") == 0) return afm__tok_hf_oom(L);
    return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: invalid JSON at byte %lu: %s", (unsigned long)where, why);
}

/* the model: BPE without the options that byte-level BPE does not use */
static afm_result afm__tok_hf_model_options(afm__tok_hf_load *L) {
    static const char *affixes[2] = {"continuing_subword_prefix", "end_of_word_suffix"};
    const afm__json *j = &L->j;
    int32_t model = afm__json_get(j, 0, "model"), c;
    int k;
    if (model < 0) return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: no \"model\"");
    if (!afm__json_eq(j, afm__json_get(j, model, "type"), "BPE"))
        return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: model type is not BPE (only byte-level BPE is supported)");
    c = afm__json_get(j, model, "dropout");
    if (!afm__json_isnull(j, c) && !(j->n[c].type == AFM__JNUM && strtod(j->src + j->n[c].start, NULL) == 0.0))
        return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: BPE dropout is not supported");
    for (k = 0; k < 2; k++) {
        c = afm__json_get(j, model, affixes[k]);
        if (!afm__json_isnull(j, c) && !(j->n[c].type == AFM__JSTR && j->n[c].len == 0))
            return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: BPE %s is not supported", affixes[k]);
    }
    if (afm__json_bool(j, afm__json_get(j, model, "byte_fallback"), 0))
        return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: BPE byte_fallback is not supported (byte-level BPE only)");
    L->model = model;
    L->h->ignore_merges = afm__json_bool(j, afm__json_get(j, model, "ignore_merges"), 0);
    L->h->fuse_unk = afm__json_bool(j, afm__json_get(j, model, "fuse_unk"), 0);
    return AFM_OK;
}

/* the normalizer (node nd, null for none): a list of Unicode normal forms, applied in order */
static afm_result afm__tok_hf_normalizer(afm__tok_hf_load *L, int32_t nd) {
    const afm__json *j = &L->j;
    afm__tok_hf *h = L->h;
    int32_t ty;
    if (afm__json_isnull(j, nd)) return AFM_OK;
    ty = afm__json_get(j, nd, "type");
    if (afm__json_eq(j, ty, "Sequence")) {
        int32_t list = afm__json_get(j, nd, "normalizers"), c;
        afm_result r = AFM_OK;
        if (list < 0 || j->n[list].type != AFM__JARR)
            return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: normalizer Sequence without a normalizers list");
        for (c = j->n[list].child; c >= 0 && r == AFM_OK; c = j->n[c].next) r = afm__tok_hf_normalizer(L, c);
        return r;
    }
    if (h->n_nf >= 8) return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: too many normalizers");
    if (afm__json_eq(j, ty, "NFC")) h->nf_forms[h->n_nf++] = AFM__TOK_NF_C;
    else if (afm__json_eq(j, ty, "NFKC")) h->nf_forms[h->n_nf++] = AFM__TOK_NF_C | AFM__TOK_NF_K;
    else if (afm__json_eq(j, ty, "NFD")) h->nf_forms[h->n_nf++] = 4;
    else if (afm__json_eq(j, ty, "NFKD")) h->nf_forms[h->n_nf++] = 4 | AFM__TOK_NF_K;
    else
        return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: normalizer type %.*s is not supported (NFC, NFKC, NFD, NFKD, Sequence)",
                         ty >= 0 ? (int)(j->n[ty].len > 40 ? 40 : j->n[ty].len) : 4, ty >= 0 ? j->src + j->n[ty].start : "none");
    return AFM_OK;
}

static int afm__tok_hf_bytelevel(const afm__json *j, int32_t nd, afm__tok_hf *h, int in_sequence) {
    int use_regex = afm__json_bool(j, afm__json_get(j, nd, "use_regex"), 1);
    h->add_prefix_space = afm__json_bool(j, afm__json_get(j, nd, "add_prefix_space"), 1);
    if (use_regex) {
        if (in_sequence && h->pattern) return 0; /* two regex splits: not supported */
        h->pattern = AFM__TOK_PAT_GPT2;
    }
    return 1;
}
/* which of the split regexes we match by hand s[0, n) is; AFM__TOK_PAT_NONE if none */
static int afm__tok_hf_pattern(const char *s, size_t n) {
    if (n == strlen(afm__tok_pat_llama3) && memcmp(s, afm__tok_pat_llama3, n) == 0) return AFM__TOK_PAT_LLAMA3;
    if (n == strlen(afm__tok_pat_qwen2) && memcmp(s, afm__tok_pat_qwen2, n) == 0) return AFM__TOK_PAT_QWEN2;
    if (n == strlen(afm__tok_pat_gpt2) && memcmp(s, afm__tok_pat_gpt2, n) == 0) return AFM__TOK_PAT_GPT2;
    return AFM__TOK_PAT_NONE;
}
/* a Split pre-tokenizer (node e): *ok when it isolates the matches of a regex; an error if that regex is
   not one we know */
static afm_result afm__tok_hf_split(afm__tok_hf_load *L, int32_t e, int *ok) {
    const afm__json *j = &L->j;
    afm__tok_buf *s = &L->tmp;
    int32_t pat = afm__json_get(j, afm__json_get(j, e, "pattern"), "Regex");
    int is_str = pat >= 0 && j->n[pat].type == AFM__JSTR;
    s->n = 0;
    if (is_str && !afm__tok_json_str(&L->t->alloc, j, pat, s)) return afm__tok_hf_oom(L);
    *ok = is_str && afm__json_eq(j, afm__json_get(j, e, "behavior"), "Isolated") && !afm__json_bool(j, afm__json_get(j, e, "invert"), 0);
    if (!*ok) return AFM_OK;
    L->h->pattern = afm__tok_hf_pattern(s->p, s->n);
    if (L->h->pattern == AFM__TOK_PAT_NONE)
        return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: Split pattern %.*s%s is not one of the supported ones (GPT-2, Llama-3, Qwen2)",
                         (int)(s->n > 60 ? 60 : s->n), s->p, s->n > 60 ? "..." : "");
    return AFM_OK;
}
/* the pre-tokenizer: ByteLevel, or a Sequence of at most one Split then one ByteLevel */
static afm_result afm__tok_hf_pre_tokenizer(afm__tok_hf_load *L) {
    const afm__json *j = &L->j;
    afm__tok_hf *h = L->h;
    int32_t pre = afm__json_get(j, 0, "pre_tokenizer"), ty = afm__json_get(j, pre, "type");
    int ok = 0;
    if (afm__json_eq(j, ty, "ByteLevel")) ok = afm__tok_hf_bytelevel(j, pre, h, 0);
    else if (afm__json_eq(j, ty, "Sequence")) {
        int32_t list = afm__json_get(j, pre, "pretokenizers"), e;
        int n_bl = 0, n_other = 0;
        ok = list >= 0 && j->n[list].type == AFM__JARR;
        for (e = ok ? j->n[list].child : -1; e >= 0 && ok; e = j->n[e].next) {
            int32_t et = afm__json_get(j, e, "type");
            if (afm__json_eq(j, et, "ByteLevel")) ok = n_bl++ == 0 && afm__tok_hf_bytelevel(j, e, h, 1);
            else if (afm__json_eq(j, et, "Split") && n_bl == 0 && n_other++ == 0) {
                afm_result r = afm__tok_hf_split(L, e, &ok);
                if (r != AFM_OK) return r;
            } else ok = 0;
        }
        ok = ok && n_bl == 1 && !(n_other && h->add_prefix_space);
    }
    if (!ok)
        return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: pre_tokenizer is not supported (ByteLevel, or a Split with a GPT-2/Llama-3/Qwen2 pattern then ByteLevel)");
    return AFM_OK;
}
static afm_result afm__tok_hf_decoder(afm__tok_hf_load *L) {
    const afm__json *j = &L->j;
    if (afm__json_eq(j, afm__json_get(j, afm__json_get(j, 0, "decoder"), "type"), "ByteLevel")) return AFM_OK;
    return afm__fail(L->err, L->err_size, AFM_ERR_UNSUPPORTED, "tokenizer.json: decoder is not ByteLevel");
}

/* the ids of model.vocab and added_tokens, checked; the vocabulary's size and the tables of that size */
static afm_result afm__tok_hf_ids(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    afm__tok_hf *h = L->h;
    const afm__json *j = &L->j;
    int32_t c, max_id = -1;
    L->vocab = afm__json_get(j, L->model, "vocab");
    if (L->vocab < 0 || j->n[L->vocab].type != AFM__JOBJ)
        return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: model.vocab is not an object");
    for (c = j->n[L->vocab].child; c >= 0; c = j->n[j->n[c].next].next) {
        int32_t id = afm__json_int(j, j->n[c].next);
        if (id < 0 || id >= AFM__TOK_MAX_VOCAB)
            return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: vocab entry at byte %lu has a bad id", (unsigned long)j->n[c].start);
        if (id > max_id) max_id = id;
    }
    L->added = afm__json_get(j, 0, "added_tokens");
    if (L->added >= 0 && j->n[L->added].type != AFM__JARR)
        return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: added_tokens is not a list");
    for (c = L->added >= 0 ? j->n[L->added].child : -1; c >= 0; c = j->n[c].next) {
        int32_t id = afm__json_int(j, afm__json_get(j, c, "id")), ct = afm__json_get(j, c, "content");
        if (id < 0 || id >= AFM__TOK_MAX_VOCAB || ct < 0 || j->n[ct].type != AFM__JSTR)
            return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: added token at byte %lu needs an id and a content", (unsigned long)j->n[c].start);
        if (id > max_id) max_id = id;
        h->n_added++;
    }
    if (max_id < 0) return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: empty vocabulary");
    /* Tables are sized by the largest id: an id must be below the file's size in bytes (every id
       takes several bytes of it), so memory stays a bounded multiple of the file (~60 bytes an id). */
    if ((size_t)max_id >= L->size)
        return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: id %ld is not below the file's size of %lu bytes (ids must be nearly dense)",
                         (long)max_id, (unsigned long)L->size);
    t->n_vocab = max_id + 1;
    t->off = (uint32_t *)afm__alloc(&t->alloc, ((size_t)t->n_vocab + 1) * sizeof(uint32_t));
    t->score = (float *)afm__alloc(&t->alloc, (size_t)t->n_vocab * sizeof(float));
    t->type = (uint8_t *)afm__alloc(&t->alloc, (size_t)t->n_vocab);
    h->added = (afm__tok_added *)afm__alloc(&t->alloc, ((size_t)h->n_added + 1) * sizeof(afm__tok_added));
    if (!t->off || !t->score || !t->type || !h->added) return afm__tok_hf_oom(L);
    return AFM_OK;
}

/* the model vocab's strings in id order (t->off, t->str); ids that are not in it get empty strings */
static afm_result afm__tok_hf_vocab_strings(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    const afm__json *j = &L->j;
    afm__tok_buf sb;
    afm_result res = AFM_OK;
    int32_t c, *node_of;
    size_t k;
    node_of = L->node_of = (int32_t *)afm__alloc(&t->alloc, (size_t)t->n_vocab * sizeof(int32_t));
    if (!node_of) return afm__tok_hf_oom(L);
    for (k = 0; k < (size_t)t->n_vocab; k++) node_of[k] = -1;
    for (c = j->n[L->vocab].child; c >= 0; c = j->n[j->n[c].next].next) {
        int32_t id = afm__json_int(j, j->n[c].next);
        if (node_of[id] >= 0) return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: id %ld appears twice in the vocab", (long)id);
        node_of[id] = c;
    }
    memset(&sb, 0, sizeof sb);
    for (k = 0; res == AFM_OK && k < (size_t)t->n_vocab; k++) {
        t->off[k] = (uint32_t)sb.n;
        t->score[k] = 0.0f;
        t->type[k] = (uint8_t)(node_of[k] >= 0 ? AFM_TOKEN_NORMAL : 0);
        if (node_of[k] >= 0 && !afm__tok_json_str(&t->alloc, j, node_of[k], &sb)) res = afm__tok_hf_oom(L);
        else if (sb.n >= 0xFFFFFFFFu) res = afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: vocabulary too large");
    }
    if (res == AFM_OK) {
        t->off[t->n_vocab] = (uint32_t)sb.n;
        /* every string may be empty: allocate anyway, pointer arithmetic on NULL is undefined */
        if (!sb.p && !afm__tok_buf_put(&t->alloc, &sb, "", 0)) res = afm__tok_hf_oom(L);
    }
    t->str = sb.p;
    return res;
}

/* appends added token at's content put through every normalizer to db (its normalized form); 0 when out of
   memory */
static int afm__tok_hf_normalize_added(afm__tok_hf_load *L, afm__tok_buf *db, afm__tok_added *at) {
    const afm_allocator *m = &L->t->alloc;
    afm__tok_buf *s = &L->tmp, nb;
    int q, ok;
    memset(&nb, 0, sizeof nb);
    s->n = 0;
    ok = afm__tok_buf_put(m, s, db->p + at->off, at->len);
    for (q = 0; ok && q < L->h->n_nf; q++) {
        nb.n = 0;
        ok = afm__tok_nf(m, s->p, s->n, L->h->nf_forms[q] & 3, &nb);
        s->n = 0;
        ok = ok && afm__tok_buf_put(m, s, nb.p, nb.n);
    }
    afm__free(m, nb.p);
    at->noff = (uint32_t)db->n;
    ok = ok && afm__tok_buf_put(m, db, s->p, s->n);
    at->nlen = (uint32_t)(db->n - at->noff);
    return ok;
}
/* the added tokens (h->added, their strings in h->astr): their content replaces an id's string (HF decodes an
   id through its added token first); HF matches and decodes a normalized one through its normalized form */
static afm_result afm__tok_hf_added_tokens(afm__tok_hf_load *L) {
    const afm__json *j = &L->j;
    afm__tok_hf *h = L->h;
    afm__tok_buf db;
    int32_t c, a = 0;
    int ok = 1;
    memset(&db, 0, sizeof db);
    for (c = L->added >= 0 ? j->n[L->added].child : -1; ok && c >= 0; c = j->n[c].next, a++) {
        afm__tok_added *at = &h->added[a];
        at->id = afm__json_int(j, afm__json_get(j, c, "id"));
        at->special = (uint8_t)afm__json_bool(j, afm__json_get(j, c, "special"), 0);
        at->lstrip = (uint8_t)afm__json_bool(j, afm__json_get(j, c, "lstrip"), 0);
        at->rstrip = (uint8_t)afm__json_bool(j, afm__json_get(j, c, "rstrip"), 0);
        at->single_word = (uint8_t)afm__json_bool(j, afm__json_get(j, c, "single_word"), 0);
        at->normalized = (uint8_t)afm__json_bool(j, afm__json_get(j, c, "normalized"), !at->special);
        at->off = (uint32_t)db.n;
        ok = afm__tok_json_str(&L->t->alloc, j, afm__json_get(j, c, "content"), &db);
        at->noff = at->off;
        at->nlen = at->len = (uint32_t)(db.n - at->off);
        if (ok && at->normalized && h->n_nf > 0 && at->len) ok = afm__tok_hf_normalize_added(L, &db, at);
    }
    h->astr = db.p;
    return ok ? AFM_OK : afm__tok_hf_oom(L);
}

/* each id's final string: its added token's content, else its model vocab string */
static afm_result afm__tok_hf_final_strings(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    const afm__tok_hf *h = L->h;
    size_t k;
    int32_t a;
    L->added_of = (int32_t *)afm__alloc(&t->alloc, (size_t)t->n_vocab * sizeof(int32_t));
    L->noff = (uint32_t *)afm__alloc(&t->alloc, ((size_t)t->n_vocab + 1) * sizeof(uint32_t));
    if (!L->added_of || !L->noff || !afm__tok_buf_put(&t->alloc, &L->fb, "", 0)) return afm__tok_hf_oom(L);
    for (k = 0; k < (size_t)t->n_vocab; k++) L->added_of[k] = -1;
    for (a = 0; a < h->n_added; a++) L->added_of[h->added[a].id] = a;
    for (k = 0; k < (size_t)t->n_vocab; k++) {
        int ok;
        L->noff[k] = (uint32_t)L->fb.n;
        if (L->added_of[k] >= 0) {
            const afm__tok_added *at = &h->added[L->added_of[k]];
            ok = !at->len || afm__tok_buf_put(&t->alloc, &L->fb, h->astr + at->off, at->len);
            t->type[k] = (uint8_t)(at->special ? AFM_TOKEN_CONTROL : AFM_TOKEN_USER_DEFINED);
        } else ok = afm__tok_buf_put(&t->alloc, &L->fb, t->str + t->off[k], t->off[k + 1] - t->off[k]);
        if (!ok) return afm__tok_hf_oom(L);
    }
    L->noff[t->n_vocab] = (uint32_t)L->fb.n;
    return AFM_OK;
}

/* the model vocab by its own strings, where BPE looks up byte tokens and merges (t->ht_normal; the reserved
   index is filled with the final strings) */
static afm_result afm__tok_hf_model_index(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    size_t k;
    if (!afm__tok_ht_init(&t->alloc, &t->ht_normal, (size_t)t->n_vocab) || !afm__tok_ht_init(&t->alloc, &t->ht_reserved, (size_t)L->h->n_added + 1))
        return afm__tok_hf_oom(L);
    for (k = 0; k < (size_t)t->n_vocab; k++)
        if (t->off[k + 1] > t->off[k] || t->type[k] == AFM_TOKEN_NORMAL) afm__tok_ht_add(t, &t->ht_normal, (int32_t)k);
    for (k = 0; k < 256; k++) {
        char u8[4];
        size_t ul = afm__utf8_put(u8, afm__tok_byte_cp((unsigned)k));
        L->h->byte_tok[k] = afm__tok_ht_find(t, &t->ht_normal, u8, ul);
    }
    return AFM_OK;
}
static afm_result afm__tok_hf_unk(afm__tok_hf_load *L) {
    const afm__json *j = &L->j;
    int32_t c = afm__json_get(j, L->model, "unk_token");
    if (!afm__json_isnull(j, c)) {
        if (j->n[c].type != AFM__JSTR) return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: unk_token is not a string");
        L->tmp.n = 0;
        if (!afm__tok_json_str(&L->t->alloc, j, c, &L->tmp)) return afm__tok_hf_oom(L);
        L->h->unk_id = afm__tok_ht_find(L->t, &L->t->ht_normal, L->tmp.p, L->tmp.n);
    }
    L->t->special[AFM_SPECIAL_UNK] = L->h->unk_id;
    return AFM_OK;
}

/* merge node c ("left right", or ["left", "right"]) into L->tmp as "left right", *sp at the space;
   AFM_ERR_FORMAT when it is neither */
static afm_result afm__tok_hf_merge_text(afm__tok_hf_load *L, int32_t c, size_t *sp) {
    const afm_allocator *m = &L->t->alloc;
    const afm__json *j = &L->j;
    afm__tok_buf *s = &L->tmp;
    int32_t left = j->n[c].type == AFM__JARR ? j->n[c].child : -1, right = left >= 0 ? j->n[left].next : -1;
    s->n = 0;
    if (j->n[c].type == AFM__JSTR) {
        size_t q, nsp = 0;
        if (!afm__tok_json_str(m, j, c, s)) return AFM_ERR_NOMEM;
        for (q = 0; q < s->n; q++)
            if (s->p[q] == ' ') { *sp = q; nsp++; }
        return nsp == 1 ? AFM_OK : AFM_ERR_FORMAT;
    }
    if (right < 0 || j->n[right].next >= 0 || j->n[left].type != AFM__JSTR || j->n[right].type != AFM__JSTR) return AFM_ERR_FORMAT;
    if (!afm__tok_json_str(m, j, left, s)) return AFM_ERR_NOMEM;
    *sp = s->n;
    return afm__tok_buf_put(m, s, " ", 1) && afm__tok_json_str(m, j, right, s) ? AFM_OK : AFM_ERR_NOMEM;
}
/* model.merges: (left id, right id) -> (rank, merged id), over the model vocab strings */
static afm_result afm__tok_hf_merges(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    afm__tok_hf *h = L->h;
    const afm__json *j = &L->j;
    afm__tok_buf *s = &L->tmp;
    int32_t merges = afm__json_get(j, L->model, "merges"), c;
    size_t nm = 0, cap = 16, k;
    uint32_t rank = 0;
    if (merges >= 0 && j->n[merges].type != AFM__JARR) return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: model.merges is not a list");
    for (c = merges >= 0 ? j->n[merges].child : -1; c >= 0; c = j->n[c].next) nm++;
    while (cap < nm * 2) cap *= 2;
    h->mkey = (uint64_t *)afm__alloc(&t->alloc, cap * sizeof(uint64_t));
    h->mrank = (uint32_t *)afm__alloc(&t->alloc, cap * sizeof(uint32_t));
    h->mnew = (int32_t *)afm__alloc(&t->alloc, cap * sizeof(int32_t));
    h->mmask = (uint32_t)(cap - 1);
    if (!h->mkey || !h->mrank || !h->mnew) return afm__tok_hf_oom(L);
    for (k = 0; k < cap; k++) h->mnew[k] = -1;
    for (c = merges >= 0 ? j->n[merges].child : -1; c >= 0; c = j->n[c].next, rank++) {
        size_t sp = 0, lb;
        int32_t ia, ib, inew;
        afm_result r = afm__tok_hf_merge_text(L, c, &sp);
        if (r == AFM_ERR_NOMEM) return afm__tok_hf_oom(L);
        if (r != AFM_OK)
            return afm__fail(L->err, L->err_size, r, "tokenizer.json: merge %lu at byte %lu is malformed", (unsigned long)rank, (unsigned long)j->n[c].start);
        lb = s->n - sp - 1;
        ia = afm__tok_ht_find(t, &t->ht_normal, s->p, sp);
        ib = afm__tok_ht_find(t, &t->ht_normal, s->p + sp + 1, lb);
        /* the merged token: the two strings joined */
        memmove(s->p + sp, s->p + sp + 1, lb);
        inew = afm__tok_ht_find(t, &t->ht_normal, s->p, sp + lb);
        if (ia < 0 || ib < 0 || inew < 0)
            return afm__fail(L->err, L->err_size, AFM_ERR_FORMAT, "tokenizer.json: merge %lu uses a token that is not in the vocab", (unsigned long)rank);
        afm__tok_merge_put(h, ia, ib, rank, inew);
    }
    return AFM_OK;
}

/* appends the bytes byte-level string s[0, n) decodes to (HF's ByteLevel decoder: when every character is
   in the byte alphabet, their bytes; else the string's own UTF-8); 0 when out of memory */
static int afm__tok_hf_put_decoded(const afm_allocator *m, afm__tok_buf *b, const char *s, size_t n) {
    size_t mark = b->n, q, l;
    char byte;
    for (q = 0; q < n; q += l) {
        int v = afm__tok_cp_byte(afm__tok_utf8((const unsigned char *)s + q, n - q, &l));
        if (v < 0) {
            b->n = mark;
            return afm__tok_buf_put(m, b, s, n);
        }
        byte = (char)v;
        if (!afm__tok_buf_put(m, b, &byte, 1)) return 0;
    }
    return 1;
}
/* the bytes each id decodes to (h->doff, h->dstr), from its final string (an added token's normalized form) */
static afm_result afm__tok_hf_decoded_bytes(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    afm__tok_hf *h = L->h;
    afm__tok_buf ob;
    size_t k;
    int ok;
    memset(&ob, 0, sizeof ob);
    h->doff = (uint32_t *)afm__alloc(&t->alloc, ((size_t)t->n_vocab + 1) * sizeof(uint32_t));
    ok = h->doff != NULL;
    for (k = 0; ok && k < (size_t)t->n_vocab; k++) {
        const afm__tok_added *at = L->added_of[k] >= 0 ? &h->added[L->added_of[k]] : NULL;
        h->doff[k] = (uint32_t)ob.n;
        if (at) ok = afm__tok_hf_put_decoded(&t->alloc, &ob, h->astr + at->noff, at->nlen);
        else ok = afm__tok_hf_put_decoded(&t->alloc, &ob, L->fb.p + L->noff[k], L->noff[k + 1] - L->noff[k]);
    }
    if (ok) h->doff[t->n_vocab] = (uint32_t)ob.n;
    if (ok && !ob.p) ok = (ob.p = (char *)afm__alloc(&t->alloc, 1)) != NULL; /* every id decodes to nothing: an empty
                                                                              pool, not NULL (NULL + 0 is undefined) */
    h->dstr = ob.p;
    return ok ? AFM_OK : afm__tok_hf_oom(L);
}

static int afm__tok_hf_in_byte_alphabet(const char *s, size_t n) {
    size_t q, l;
    for (q = 0; q < n; q += l)
        if (afm__tok_cp_byte(afm__tok_utf8((const unsigned char *)s + q, n - q, &l)) < 0) return 0;
    return 1;
}
/* ignore_merges: the model vocab by decoded bytes (h->ht_raw), so that a word which is a vocab entry is one
   token; only strings made of the byte alphabet can match a word */
static afm_result afm__tok_hf_raw_index(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    afm__tok_hf *h = L->h;
    size_t k;
    if (!afm__tok_ht_init(&t->alloc, &h->ht_raw, (size_t)t->n_vocab)) return afm__tok_hf_oom(L);
    for (k = 0; k < (size_t)t->n_vocab; k++) {
        size_t n = t->off[k + 1] - t->off[k]; /* 0: not in the model vocab */
        if (n && afm__tok_hf_in_byte_alphabet(t->str + t->off[k], n))
            afm__tok_ht_put(&h->ht_raw, h->dstr, h->doff[k], h->doff[k + 1] - h->doff[k], (int32_t)k);
    }
    return AFM_OK;
}

/* the final strings become the pieces; ht_normal is rebuilt on them (leaving out ids that are added tokens but
   not model vocab entries), the added tokens go to ht_reserved; an id whose string is a special token's
   content is skipped when decoding */
static afm_result afm__tok_hf_use_final_strings(afm__tok_hf_load *L) {
    afm_tokenizer *t = L->t;
    const afm__tok_hf *h = L->h;
    size_t k;
    int32_t a;
    afm__tok_ht_free(&t->alloc, &t->ht_normal);
    afm__free(&t->alloc, t->off);
    afm__free(&t->alloc, t->str);
    t->off = L->noff;
    t->str = L->fb.p;
    L->noff = NULL;
    L->fb.p = NULL;
    if (!afm__tok_ht_init(&t->alloc, &t->ht_normal, (size_t)t->n_vocab)) return afm__tok_hf_oom(L);
    for (k = 0; k < (size_t)t->n_vocab; k++) {
        if (t->type[k] == AFM_TOKEN_NORMAL) afm__tok_ht_add(t, &t->ht_normal, (int32_t)k);
        else if (t->type[k] != 0) afm__tok_ht_add(t, &t->ht_reserved, (int32_t)k);
        if (t->off[k + 1] - t->off[k] > t->max_piece_len) t->max_piece_len = t->off[k + 1] - t->off[k];
    }
    t->max_token_bytes = t->max_piece_len * 3 + 16;
    for (a = 0; a < h->n_added; a++) {
        const afm__tok_added *at = &h->added[a];
        int32_t id = at->special ? afm__tok_ht_find(t, &t->ht_normal, h->astr + at->off, at->len) : -1;
        if (id >= 0) t->type[id] = AFM_TOKEN_CONTROL;
    }
    return AFM_OK;
}
/* the added-token matchers: [0] on the raw text (normalized = false), [1] on the normalized text */
static afm_result afm__tok_hf_added_matchers(afm__tok_hf_load *L) {
    afm__tok_hf *h = L->h;
    int32_t a;
    for (a = 0; a < h->n_added; a++) {
        const afm__tok_added *at = &h->added[a];
        int w = at->normalized && h->n_nf > 0 ? 1 : 0;
        if (!at->len) continue; /* HF ignores empty added tokens */
        if (!afm__tok_trie_add(&L->t->alloc, &h->trie[w], &h->n_trie_nodes[w], &h->trie_cap[w], h->trie_root[w],
                               (const unsigned char *)h->astr + at->noff, at->nlen, a))
            return afm__tok_hf_oom(L);
    }
    return AFM_OK;
}

static afm_result afm__tok_load_hf(afm_tokenizer *t, const uint8_t *data, size_t size, char *err, size_t err_size) {
    afm__tok_hf_load L;
    afm__tok_hf *h = (afm__tok_hf *)afm__alloc(&t->alloc, sizeof *h);
    afm_result res;
    size_t k;
    if (!h) return AFM_ERR_NOMEM;
    memset(h, 0, sizeof *h);
    t->hf = h;
    h->unk_id = -1;
    for (k = 0; k < AFM_SPECIAL_COUNT; k++) t->special[k] = -1;
    for (k = 0; k < 256; k++) h->trie_root[0][k] = h->trie_root[1][k] = -1;
    memset(&L, 0, sizeof L);
    L.size = size;
    L.t = t;
    L.h = h;
    L.err = err;
    L.err_size = err_size;
    res = afm__tok_hf_parse(&L, data, size);
    /* what the file asks for: byte-level BPE and a text pipeline we implement */
    if (res == AFM_OK) res = afm__tok_hf_model_options(&L);
    if (res == AFM_OK) res = afm__tok_hf_normalizer(&L, afm__json_get(&L.j, 0, "normalizer"));
    if (res == AFM_OK) res = afm__tok_hf_pre_tokenizer(&L);
    if (res == AFM_OK) res = afm__tok_hf_decoder(&L);
    /* the pieces: the model vocab's strings, the added tokens, each id's final string */
    if (res == AFM_OK) res = afm__tok_hf_ids(&L);
    if (res == AFM_OK) res = afm__tok_hf_vocab_strings(&L);
    if (res == AFM_OK) res = afm__tok_hf_added_tokens(&L);
    if (res == AFM_OK) res = afm__tok_hf_final_strings(&L);
    /* BPE's tables, over the model vocab's strings */
    if (res == AFM_OK) res = afm__tok_hf_model_index(&L);
    if (res == AFM_OK) res = afm__tok_hf_unk(&L);
    if (res == AFM_OK) res = afm__tok_hf_merges(&L);
    /* decoding and matching, over the final strings */
    if (res == AFM_OK) res = afm__tok_hf_decoded_bytes(&L);
    if (res == AFM_OK && h->ignore_merges) res = afm__tok_hf_raw_index(&L);
    if (res == AFM_OK) res = afm__tok_hf_use_final_strings(&L);
    if (res == AFM_OK) res = afm__tok_hf_added_matchers(&L);
    afm__tok_hf_load_free(&L);
    return res;
}

static void afm__tok_hf_piece_bytes(const afm_tokenizer *t, int32_t id, afm__tok_buf *scratch, const char **p, size_t *n) {
    const afm__tok_hf *h = (const afm__tok_hf *)t->hf;
    (void)scratch;
    *p = h->dstr + h->doff[id];
    *n = h->doff[id + 1] - h->doff[id];
}

/* HF BPE on one word (bytes w[0, n)); appends ids with afm__tok_out */
typedef struct afm__tok_hsym {
    int32_t id, prev, next, len;
} afm__tok_hsym;
typedef struct afm__tok_hmerge {
    uint32_t rank;
    int32_t pos, new_id;
} afm__tok_hmerge;

static int afm__tok_hmerge_better(const afm__tok_hmerge *a, const afm__tok_hmerge *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void afm__tok_hf_word(afm__tok_enc *e, const char *w, size_t n) {
    const afm_tokenizer *t = e->t;
    const afm__tok_hf *h = (const afm__tok_hf *)t->hf;
    afm__tok_hsym *sym;
    afm__tok_hmerge *heap;
    size_t i, hn = 0, ns = 0;
    uint32_t hv = 0, slot = 0;
    int cacheable;
    if (!n) return;
    if (h->ignore_merges) {
        int32_t id = afm__tok_ht_get(&h->ht_raw, h->dstr, w, n);
        if (id >= 0) {
            afm__tok_out(e, id);
            return;
        }
    }
    cacheable = e->c_mask && n <= AFM__TOK_CACHE_MAX_WORD;
    if (cacheable) {
        hv = afm__tok_hash(w, n);
        slot = hv & e->c_mask;
        while (e->c_len[slot]) {
            if (e->c_hash[slot] == hv && e->c_len[slot] == n && memcmp(e->norm + e->c_off[slot], w, n) == 0) {
                const int32_t *ids = e->c_pool.p + e->c_ids[slot];
                uint32_t q, m = e->c_nids[slot];
                for (q = 0; q < m; q++) afm__tok_out(e, ids[q]);
                return;
            }
            slot = (slot + 1) & e->c_mask;
        }
    }
    /* symbols: one per byte (each byte is one character of the byte-level alphabet) */
    {
        void *p = e->sym;
        if (!afm__tok_grow_l(&t->alloc, &p, &e->sym_cap, (n * sizeof(afm__tok_hsym)) / sizeof(afm__tok_sym) + 1, sizeof(afm__tok_sym), e->sym_local)) { e->failed = 1; return; }
        e->sym = (afm__tok_sym *)p;
        p = e->heap;
        if (!afm__tok_grow_l(&t->alloc, &p, &e->heap_cap, (3 * n * sizeof(afm__tok_hmerge)) / sizeof(afm__tok_pair) + 1, sizeof(afm__tok_pair), e->heap_local)) { e->failed = 1; return; }
        e->heap = (afm__tok_pair *)p;
    }
    sym = (afm__tok_hsym *)(void *)e->sym;
    heap = (afm__tok_hmerge *)(void *)e->heap;
    {
        int32_t unk_len = 0, have_unk = 0;
        for (i = 0; i < n; i++) {
            int32_t id = h->byte_tok[(unsigned char)w[i]];
            if (id >= 0) {
                if (have_unk) {
                    sym[ns].id = h->unk_id; sym[ns].len = unk_len; ns++;
                    have_unk = 0;
                }
                sym[ns].id = id; sym[ns].len = 1; ns++;
            } else if (h->unk_id >= 0) {
                if (have_unk && h->fuse_unk) unk_len++;
                else {
                    if (have_unk) { sym[ns].id = h->unk_id; sym[ns].len = unk_len; ns++; }
                    have_unk = 1;
                    unk_len = 1;
                }
            }
        }
        if (have_unk) { sym[ns].id = h->unk_id; sym[ns].len = unk_len; ns++; }
    }
    for (i = 0; i < ns; i++) {
        sym[i].prev = (int32_t)i - 1;
        sym[i].next = i + 1 < ns ? (int32_t)i + 1 : -1;
    }
#define AFM__TOK_HPUSH(P, R, NW)                                                                              \
    do {                                                                                                    \
        afm__tok_hmerge m_;                                                                                 \
        size_t u_ = hn++;                                                                                   \
        m_.rank = (R); m_.pos = (P); m_.new_id = (NW);                                                      \
        while (u_ > 0 && afm__tok_hmerge_better(&m_, &heap[(u_ - 1) / 2])) { heap[u_] = heap[(u_ - 1) / 2]; u_ = (u_ - 1) / 2; } \
        heap[u_] = m_;                                                                                      \
    } while (0)
    for (i = 0; i + 1 < ns; i++) {
        uint32_t r;
        int32_t nw;
        if (afm__tok_merge_find(h, sym[i].id, sym[i + 1].id, &r, &nw)) AFM__TOK_HPUSH((int32_t)i, r, nw);
    }
    while (hn) {
        afm__tok_hmerge top = heap[0], last = heap[--hn];
        size_t q = 0;
        uint32_t r;
        int32_t nw, nx;
        for (;;) {
            size_t ch = 2 * q + 1;
            if (ch >= hn) break;
            if (ch + 1 < hn && afm__tok_hmerge_better(&heap[ch + 1], &heap[ch])) ch++;
            if (!afm__tok_hmerge_better(&heap[ch], &last)) break;
            heap[q] = heap[ch];
            q = ch;
        }
        if (hn) heap[q] = last;
        if (sym[top.pos].len == 0 || sym[top.pos].next < 0) continue;
        nx = sym[top.pos].next;
        if (!afm__tok_merge_find(h, sym[top.pos].id, sym[nx].id, &r, &nw) || nw != top.new_id) continue;
        sym[top.pos].id = top.new_id;
        sym[top.pos].len += sym[nx].len;
        sym[top.pos].next = sym[nx].next;
        sym[nx].len = 0;
        if (sym[nx].next >= 0) sym[sym[nx].next].prev = top.pos;
        if (sym[top.pos].prev >= 0 && afm__tok_merge_find(h, sym[sym[top.pos].prev].id, sym[top.pos].id, &r, &nw))
            AFM__TOK_HPUSH(sym[top.pos].prev, r, nw);
        if (sym[top.pos].next >= 0 && afm__tok_merge_find(h, sym[top.pos].id, sym[sym[top.pos].next].id, &r, &nw))
            AFM__TOK_HPUSH(top.pos, r, nw);
    }
#undef AFM__TOK_HPUSH
    {
        size_t base = e->c_pool.n, cnt = 0;
        int store = cacheable && e->c_used * 2 < e->c_mask;
        int32_t q;
        for (q = ns ? 0 : -1; q >= 0; q = sym[q].next) {
            afm__tok_out(e, sym[q].id);
            if (store && !afm__tok_ids_push(&t->alloc, &e->c_pool, sym[q].id)) store = 0;
            cnt++;
        }
        if (store) {
            e->c_hash[slot] = hv;
            e->c_off[slot] = (uint32_t)(w - e->norm);
            e->c_len[slot] = (uint32_t)n;
            e->c_ids[slot] = (uint32_t)base;
            e->c_nids[slot] = (uint32_t)cnt;
            e->c_used++;
        }
    }
}

/* pre-tokenizes and encodes buf[a, b) (normalized text without added tokens) */
static void afm__tok_hf_segment(afm__tok_enc *e, afm__tok_buf *buf, size_t a, size_t b) {
    const afm__tok_hf *h = (const afm__tok_hf *)e->t->hf;
    size_t i;
    if (a >= b) return;
    if (h->add_prefix_space && buf->p[a] != ' ') {
        /* ByteLevel's add_prefix_space: the segment gets a leading space (copied to the buffer's end) */
        size_t at = buf->n;
        void *p = buf->p;
        /* room first: the copy reads from the same buffer */
        if (!afm__tok_grow_l(&e->t->alloc, &p, &buf->cap, buf->n + 1 + (b - a) + 1, 1, buf->local)) {
            e->failed = 1;
            return;
        }
        buf->p = (char *)p;
        buf->p[buf->n] = ' ';
        memcpy(buf->p + buf->n + 1, buf->p + a, b - a);
        buf->n += 1 + (b - a);
        a = at;
        b = buf->n;
    }
    e->norm = buf->p;
    if (!h->pattern) {
        afm__tok_hf_word(e, buf->p + a, b - a);
        return;
    }
    for (i = a; i < b && !e->failed;) {
        size_t end = afm__tok_pretok_match(h->pattern, buf->p + a, b - a, i - a) + a;
        if (end <= i || end > b) end = b;
        afm__tok_hf_word(e, buf->p + i, end - i);
        i = end;
    }
}

/* HF's AddedVocabulary::find_matches over s[a, b) with trie `which`; calls back for gaps and tokens */
typedef struct afm__tok_split {
    size_t a, b;
    int32_t id; /* -1: text */
} afm__tok_split;

static int afm__tok_is_word(int32_t c) {
    unsigned k = afm__tok_class(c);
    return (k & (AFM_TOK_CL_L | AFM_TOK_CL_N | AFM_TOK_CL_M)) || c == '_' || c == 0x200C || c == 0x200D;
}
static size_t afm__tok_hf_find(const afm__tok_hf *h, int which, const char *s, size_t n, afm__tok_split *out, size_t max_out) {
    size_t i = 0, start_offset = 0, k = 0;
    if (!h->trie[which]) {
        out[0].a = 0; out[0].b = n; out[0].id = -1;
        return n ? 1 : 0;
    }
    while (i < n && k + 2 < max_out) {
        size_t len = 0, start, stop;
        int32_t ai = afm__tok_trie_longest(h->trie[which], h->trie_root[which], s + i, n - i, &len);
        const afm__tok_added *at;
        if (ai < 0) {
            i++;
            continue;
        }
        at = &h->added[ai];
        start = i;
        stop = i + len;
        i = stop; /* non-overlapping, leftmost-longest */
        if (at->single_word) {
            size_t l;
            int start_space = 1, stop_space = 1;
            if (start > 0) {
                size_t q = start - 1;
                while (q > 0 && ((unsigned char)s[q] & 0xC0) == 0x80) q--;
                start_space = !afm__tok_is_word(afm__tok_cp_at(s, n, q, &l));
            }
            if (stop < n) stop_space = !afm__tok_is_word(afm__tok_cp_at(s, n, stop, &l));
            if (!start_space || !stop_space) continue;
        }
        if (at->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t q = ns - 1, l;
                while (q > 0 && ((unsigned char)s[q] & 0xC0) == 0x80) q--;
                if (!(afm__tok_class(afm__tok_cp_at(s, n, q, &l)) & AFM_TOK_CL_WS)) break;
                ns = q;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (at->rstrip) {
            size_t l;
            while (stop < n && (afm__tok_class(afm__tok_cp_at(s, n, stop, &l)) & AFM_TOK_CL_WS)) stop += l;
        }
        if (start_offset < start) {
            out[k].a = start_offset; out[k].b = start; out[k].id = -1; k++;
        }
        out[k].a = start; out[k].b = stop; out[k].id = at->id; k++;
        start_offset = stop;
    }
    if (i < n && k + 2 >= max_out) return (size_t)-1;
    if (start_offset < n) {
        out[k].a = start_offset; out[k].b = n; out[k].id = -1; k++;
    }
    return k;
}

static int afm__tok_hf_splits(const afm_tokenizer *t, int which, const char *s, size_t n, afm__tok_split **out, size_t *count) {
    /* at most 2 entries per added-token match + 1; count matches first */
    const afm__tok_hf *h = (const afm__tok_hf *)t->hf;
    size_t cap = 8, r;
    for (;;) {
        *out = (afm__tok_split *)afm__alloc(&t->alloc, cap * sizeof(afm__tok_split));
        if (!*out) return 0;
        r = afm__tok_hf_find(h, which, s, n, *out, cap);
        if (r != (size_t)-1) break;
        afm__free(&t->alloc, *out);
        cap *= 4;
    }
    *count = r;
    return 1;
}

static afm_result afm__tok_hf_encode(const afm_tokenizer *t, const char *text, size_t len, unsigned flags,
                                     afm__tok_enc *e) {
    const afm__tok_hf *h = (const afm__tok_hf *)t->hf;
    afm__tok_split *raw = NULL, *nsp = NULL;
    size_t n_raw = 0, n_n = 0, r, q;
    afm__tok_buf buf, tb;
    afm_result res = AFM_OK;
    (void)flags;
    memset(&buf, 0, sizeof buf);
    memset(&tb, 0, sizeof tb);
    if (!len) return AFM_OK;
    if (len > 4096) {
        size_t cap = 1024, i;
        while (cap < len / 16 && cap < (1u << 16)) cap *= 2;
        e->c_hash = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
        e->c_off = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
        e->c_len = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
        e->c_ids = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
        e->c_nids = (uint32_t *)afm__alloc(&t->alloc, cap * 4);
        if (!e->c_hash || !e->c_off || !e->c_len || !e->c_ids || !e->c_nids) return AFM_ERR_NOMEM;
        for (i = 0; i < cap; i++) e->c_len[i] = 0;
        e->c_mask = (uint32_t)(cap - 1);
    }
    /* the whole normalized text goes into one buffer so that cached words can point into it */
    if (!afm__tok_grow(&t->alloc, (void **)&buf.p, &buf.cap, len + len / 2 + 64, 1)) return AFM_ERR_NOMEM;
    if (!afm__tok_hf_splits(t, 0, text, len, &raw, &n_raw)) {
        afm__free(&t->alloc, buf.p);
        return AFM_ERR_NOMEM;
    }
    for (r = 0; r < n_raw && !e->failed; r++) {
        size_t a, b;
        int f;
        if (raw[r].id >= 0) {
            afm__tok_out(e, raw[r].id);
            continue;
        }
        /* normalize the segment */
        a = buf.n;
        if (!afm__tok_buf_put(&t->alloc, &buf, text + raw[r].a, raw[r].b - raw[r].a)) { res = AFM_ERR_NOMEM; break; }
        for (f = 0; f < h->n_nf; f++) {
            tb.n = 0;
            if (!afm__tok_nf(&t->alloc, buf.p + a, buf.n - a, h->nf_forms[f] & 3, &tb)) { res = AFM_ERR_NOMEM; break; }
            buf.n = a;
            if (!afm__tok_buf_put(&t->alloc, &buf, tb.p, tb.n)) { res = AFM_ERR_NOMEM; break; }
        }
        if (res != AFM_OK) break;
        b = buf.n;
        if (!afm__tok_hf_splits(t, 1, buf.p + a, b - a, &nsp, &n_n)) { res = AFM_ERR_NOMEM; break; }
        for (q = 0; q < n_n && !e->failed; q++) {
            if (nsp[q].id >= 0) afm__tok_out(e, nsp[q].id);
            else afm__tok_hf_segment(e, &buf, a + nsp[q].a, a + nsp[q].b);
        }
        afm__free(&t->alloc, nsp);
        nsp = NULL;
    }
    afm__free(&t->alloc, raw);
    afm__free(&t->alloc, nsp);
    afm__free(&t->alloc, buf.p);
    afm__free(&t->alloc, tb.p);
    return res;
}
#endif /* AFM_HF_TOKENIZER */

/* ======================================================================================== */
/* ==== KERNELS: scalar reference, AVX2, AVX-512, NEON, selection ========================= */
/* ======================================================================================== */
/* The weight types (docs/FORMAT.md, "Types") and every compute kernel. Decode is a
   matrix-vector product bound by memory bandwidth, prefill and verification are matrix-matrix
   products bound by arithmetic; both go through the same calls: activations are prepared once
   per product (int8 blocks for quantized weights, an f32 copy for float ones), then each thread
   computes its own rows. A scalar kernel is always compiled and every SIMD kernel returns its bits
   exactly (the summation contract below; tests/test_kernels.c, tests/levels.sh); x86 SIMD is chosen
   at run time from cpuid, arm64 NEON at compile time (the dot-product kernels when built with it),
   or a session names its level (afm_session_params.kernels). */

/* ---- platform ---- */

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
/* AMX: on Linux, where a process asks the kernel for the tile state (arch_prctl), with the tile
   intrinsics of gcc 11 / clang 12 and later. AFM_NO_AMX leaves it out. */
#if defined(AFM__X86) && defined(AFM__LINUX_SYSCALL) && !defined(AFM_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define AFM__AMX 1
#define AFM__T_AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c,amx-tile,amx-int8")))
#endif

#if !defined(AFM_NO_SIMD) && (defined(__aarch64__) || defined(_M_ARM64)) && \
    (defined(__ARM_NEON) || defined(_M_ARM64))
#define AFM__NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define AFM__NEON_DOT 1
#endif
#endif

/* Decode (one token) streams every weight once: prefetch this many bytes ahead in the code stream
   (0: off). Software prefetch keeps more cache misses in flight than one hardware stream per thread. */
#ifndef AFM__PF_DIST
#define AFM__PF_DIST 2048
#endif

/* Between two matrix products the caller works alone (norms, activations) while memory idles: each
   worker then pulls this many bytes of its first rows of the next product into its L2 cache (0:
   off). 64 KB made a decode step 4-5 % faster at 8 and 16 threads on a 16-core Xeon; prefetched
   while other threads still ran the job's last chunks, the same bytes made it slower
   (docs/BENCHMARKS.md, tenth session). */
#ifndef AFM__PF_NEXT
#define AFM__PF_NEXT 65536
#endif

/* Attention streams each layer's int8 keys and values once per token (72 MB at 4000 positions of
   the 3B model, more than the caches hold): the AVX2 kernels prefetch rows this many positions
   ahead (0: off). Rows are 256 bytes apart (both KV heads); with the hardware prefetchers alone the
   scores waited on memory (attention at 4000 positions 45 ms, with this 33 ms; Zen 3, 1 thread). */
#ifndef AFM__KV_PF
#define AFM__KV_PF 16
#endif

/* ---- prepared activations ---- */

/* Activations prepared for one matrix product.
   Quantized weights: each token's row, zero-padded to kpad (a multiple of 512), is cut in blocks
   of 64; block b has d = max|x| / 127, codes q = round_even(x * (127 / max|x|)) in -127..127
   (0 when the block is all zero), and qs = sum(q) (for the -1.5 / -7.5 offset of Q2B / Q4).
   Float weights: an f32 copy of X with row stride kpad (n_in rounded up to 16, zero-padded). */
typedef struct afm__act {
    int n_tok, n_in, kpad, nsb; /* nsb = kpad / 64 */
    int quant;                  /* 1: int8 blocks (q, d, m); 0: f32 (x) */
    int8_t *q;                  /* [n_tok][kpad] */
    float *d;                   /* [n_tok][nsb] */
    int32_t *qs;                /* [n_tok][nsb] */
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
        a->qs = (int32_t *)p;
    } else {
        a->kpad = (n_in + 15) & ~15;
        a->x = (float *)p;
    }
}

/* ---- the kernel table ---- */

/* prepare: fills tokens [t0, t1) of a from X (row t at X + t * ldx).
   matmul: Y[t*ldy + r] for r in [r0, r1), every token of a (a prepared for w's type).
   gemm_q2b, gemm_q4: the same for a Q2B (Q4) matrix and a batch of gemm_min (gemm_min_q4) tokens or
   more, with a per-thread scratch of afm__gemm_scratch_size(w->kpad) bytes (NULL where the level has
   none).
   dequant: out[0 .. cols-1] = row `row` of w as f32.
   kv_scores: s[h*lds + p] = (float)(sum_i q[h*ldq + i] * k[p*k_stride + i]) * qs[h], h < nq, p < n_pos,
   the sum in int32 (exact: callers keep |q| * 128 * dim below 2^31);
   pf (or NULL): rows of the same shape that the caller reads next (the values), a prefetch hint.
   kv_values: o[h*ldo + i] = (float)(sum_p pr[h*ldp + p] * v[p*v_stride + i]) * vs[h], h < nq, i < dim,
   the sum in int32 (exact: callers keep |pr| * 128 * n_pos below 2^31).
   kv_scores_f, kv_values_f: the same with float queries and probabilities and one scale, for float
   models and f32 activations (exact to the reference): s[h*lds + p] = scale * sum_i q[h*ldq + i] *
   k[p*k_stride + i] (the float-row contract), o[h*ldo + i] = scale * sum_p pr[h*ldp + p] *
   v[p*v_stride + i] (fma over the positions in order).
   round16: out[i] = round_even(x[i] * mul), NaN -> 0, i < n (callers keep |x[i] * mul| < 32767.5).
   softmax16: *max = the maximum of x[0 .. n) (NaN skipped), out[i] = afm__exp16_code(x[i] - *max) (e^(x - max)
   in units of 1/32767), returns the sum of the out[i] (n <= 65536).
   axpy: y[i] = fma(a, x[i], y[i]), i < n (merging chunked attention's partial outputs). */
typedef void (*afm__prepare_fn)(afm__act *a, const float *X, size_t ldx, int t0, int t1);
typedef void (*afm__matmul_fn)(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1);
typedef void (*afm__gemm_fn)(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1, void *scratch);
typedef void (*afm__dequant_fn)(const afm__wmat *w, int row, float *out);
typedef void (*afm__kv_scores_fn)(const int16_t *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                  int n_pos, int dim, const float *qs, float *s, size_t lds, const int8_t *pf);
typedef void (*afm__silu_mul_fn)(float *h, const float *g, int n);
typedef float (*afm__expsum_fn)(float *x, int n, float *max);
typedef void (*afm__kv_values_fn)(const int16_t *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                  int n_pos, int dim, const float *vs, float *o, size_t ldo);
typedef void (*afm__kv_scores_f_fn)(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                    int n_pos, int dim, float scale, float *s, size_t lds, const int8_t *pf);
typedef void (*afm__kv_values_f_fn)(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                    int n_pos, int dim, float scale, float *o, size_t ldo);
typedef void (*afm__round16_fn)(int16_t *out, const float *x, int n, float mul);
typedef int32_t (*afm__softmax16_fn)(const float *x, int n, float *max, int16_t *out);
typedef void (*afm__axpy_fn)(float *y, float a, const float *x, int n);

typedef struct afm__kernels {
    const char *name;             /* afm_kernels_name(level) */
    int level;                    /* an afm_kernels value */
    afm__prepare_fn prepare_q8;   /* for quantized weights */
    afm__prepare_fn prepare_f32;  /* for float weights */
    afm__matmul_fn matmul[AFM__NTYPES];
    afm__gemm_fn gemm_q2b;        /* rows side by side, for batches (NULL: matmul) */
    afm__gemm_fn gemm_q4;         /* the same for Q4 */
    int gemm_min, gemm_min_q4;    /* ... of this many tokens or more (where packing 16 rows pays off) */
    afm__dequant_fn dequant[AFM__NTYPES];
    afm__kv_scores_fn kv_scores;
    afm__kv_values_fn kv_values;
    afm__kv_scores_f_fn kv_scores_f;
    afm__kv_values_f_fn kv_values_f;
    afm__round16_fn round16;
    afm__softmax16_fn softmax16;
    afm__axpy_fn axpy;
    afm__silu_mul_fn silu_mul;    /* h[i] = silu(h[i]) * g[i] */
    afm__expsum_fn expsum;        /* x[i] = exp(x[i] - max) in place; returns the sum (softmax without the 1/sum) */
} afm__kernels;

/* Levels for afm__select_kernels's max_level: the public afm_kernels values, ordered within each
   architecture (tests use it to force a lower level). */
#define AFM__LEVEL_SCALAR AFM_KERNELS_SCALAR
#define AFM__LEVEL_AVX2 AFM_KERNELS_AVX2             /* x86: AVX2 + FMA + F16C */
#define AFM__LEVEL_AVX512 AFM_KERNELS_AVX512         /* x86: AVX-512 F/BW/DQ/VL */
#define AFM__LEVEL_AVX512VNNI AFM_KERNELS_AVX512VNNI /* x86: + AVX512_VNNI */
#define AFM__LEVEL_NEON AFM_KERNELS_NEON             /* arm64: NEON */
#define AFM__LEVEL_NEON_DOT AFM_KERNELS_NEON_DOTPROD /* arm64: + the dot-product extension (compile time) */
#define AFM__LEVEL_AMX AFM_KERNELS_AMX               /* x86: + AMX-TILE and AMX-INT8, granted by the OS */
#define AFM__LEVEL_LAST AFM_KERNELS_AMX
#define AFM__LEVEL_MAX 99

/* ---- the summation contract: every level computes the same bits ----

   Every level (scalar, AVX2, AVX-512, AVX-512 VNNI, NEON, NEON dot product) returns the same
   float bits for the same inputs, so that logits, greedy text and seeded samples do not depend on
   the CPU, the thread count or how tokens are batched. Integer sums are exact in any order; float
   sums are not, so each kernel's float work is defined here once and the scalar reference below
   spells it out:
   - Quantized rows (int8 activations): each sub-block sb of 64 weights gives one exact integer
     P_sb = 2 * sum_i c_i q_i - o * Q_sb, with c_i the weight codes (Q2B 0..3, Q4 0..15, Q8 -128..127),
     q_i the activation codes, Q_sb = sum_i q_i and o = twice the type's offset (Q2B 3, Q4 15, Q8 0):
     the dot of the codes *centred* on the grid (c - 1.5, c - 7.5) times 2, so it stays an integer.
     |P_sb| < 2^22, so (float)P_sb is exact. Lane sb%8 accumulates fma((float)P_sb, S * d_sb, lane)
     over sb in order (S the group's fp16 scale, d_sb the activation block's scale, S * d_sb one
     float product), the lanes are added in one fixed tree (afm__sum8) and y = 0.5f * that sum.
     How a kernel forms P_sb (which products go to which SIMD lane, in place or shifted codes, per
     row or with rows side by side) is free, since integer sums are exact: one rule suits a matrix-
     vector kernel (8 sub-blocks' sums in the 8 lanes) and a matrix-matrix one (16 rows per vector).
   - Float rows: lane i%8 accumulates fma(w_i, x_i, .) for i < cols rounded down to 8, the tree,
     then the remaining i in order with fma.
   - Attention over the int8 cache of a quantized model (att_int): queries as int16 codes per head
     (the activation blocks' rules, 32767 steps up to head_dim 512; afm__quant_query), exps as
     multiples of 1/32767 (afm__exp16_code); scores, weighted values and the exps' sum are integer
     sums, exact in any order, each converted to float once and multiplied by its scale.
   - Activation blocks: amax = max |x| (a block holding NaN or infinity gets codes 0, Q = 0 and
     d = NaN, so the result is NaN, never a wrapped integer; amax below 2^-100 gives a zero block),
     codes round_even(x * (127 / amax)), d = amax / 127.
   - Attention elsewhere (float models, f32 activations, float caches): KV scores as float rows
     (then times the scale), KV values as fma over the positions in order (then times the scale);
     softmax: the maximum (NaN skipped), afm__expf, the sum as for float rows, times 1/sum.
     Either way a token attending to more than AFM__KV_CHUNK keys takes them in chunks of that
     many positions, each chunk's exp-sum and weighted values merged in chunk order (FORWARD PASS,
     attention), whatever the threads and the batch.
   - Elementwise math (exp, SiLU, softmax, RMSNorm, RoPE tables) is written once in C in this file,
     no libm transcendental functions (C libraries differ in the last bit), every multiply-add that
     rounds once is an explicit fmaf/fma, and products that must not be fused are taken in double
     where they are exact. So results do not depend on -ffp-contract (gcc fuses a*b+c by default in
     GNU and C++ modes, clang within an expression) or on the C library.
   Threads split rows (and attention chunks), never a sum, so the thread count changes nothing, and
   a token's sums do not depend on the other tokens of its batch.
   The contract covers every non-NaN result. A NaN stays NaN on every level, but its sign and payload
   may differ (compilers take a + b as b + a, x86 and arm64 make different default NaNs). It assumes
   the default floating-point environment (round to nearest, no flush-to-zero). */

/* The fixed tree every level uses to add 8 lanes. */
static inline float afm__sum8(const float l[8]) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* ---- elementwise math: written once, no libm transcendentals ----

   C libraries round exp/sin/cos/pow differently in the last bit, and compilers may fuse a*b+c;
   either would make results depend on the machine. So: exp in float with explicit fmaf (the AVX2
   level runs the same operations 8 at a time), the RoPE tables from double-precision sin, cos, exp
   and log written here with explicit fma, and float products that feed a sum outside the kernels
   (RoPE, LoRA's scaled add, the f32 paths' dot products) taken in double, where they are exact, so
   fusing them changes nothing. (Rounding a double product back to float does not help: compilers
   narrow (float)((double)a * b) to a float multiply and then fuse it.) */

#define AFM__EXP_HI 88.72283935546875f  /* e^x overflows float from here */
#define AFM__EXP_LO -87.33654022216797f /* below: e^x under FLT_MIN, taken as 0 */

/* 2^e as a float, e in [-126, 127] */
static inline float afm__pow2i(int e) { uint32_t b = (uint32_t)(e + 127) << 23; float f; memcpy(&f, &b, 4); return f; }

/* e^x for x in [AFM__EXP_LO, AFM__EXP_HI): x = k ln2 + r, |r| <= ln2/2, e^r by its Taylor series
   to r^7 (truncation < 0.05 ulp) and times 2^k (k in [-126, 128]) as fma(q t, r, t) 2^s with
   e^r = 1 + q r, t = 2^(k-s), s = k > 127: the result is an fma or an exact doubling, never a product
   a compiler could fuse into the caller's next add. Within 1 ulp of e^x. */
static inline float afm__exp_core(float x) {
    const float k = fmaf(x, 1.44269502f, 12582912.0f) - 12582912.0f; /* round(x / ln2): + 1.5 * 2^23 */
    const int ki = (int)k, s = ki > 127;
    const float t = afm__pow2i(ki - s);
    float r = fmaf(k, -0.693145751953125f, x), q;                     /* ln2 in two parts */
    r = fmaf(k, -1.42860682e-06f, r);
    q = fmaf(1.98412701e-04f, r, 1.38888892e-03f);                    /* 1/7!, 1/6!, ..., 1/1! */
    q = fmaf(q, r, 8.33333377e-03f);
    q = fmaf(q, r, 4.16666679e-02f);
    q = fmaf(q, r, 1.66666672e-01f);
    q = fmaf(q, r, 0.5f);
    q = fmaf(q, r, 1.0f);
    return fmaf(q * t, r, t) * afm__pow2i(s);
}

/* e^x for any float: +inf above the range, 0 below, NaN for NaN. */
static inline float afm__expf(float x) {
    if (x != x) return x;
    if (x >= AFM__EXP_HI) return INFINITY;
    if (x < AFM__EXP_LO) return 0.0f;
    return afm__exp_core(x);
}

static inline float afm__silu(float x) { return x / (1.0f + afm__expf(-x)); }

/* h[i] = silu(h[i]) * g[i] */
static void afm__silu_mul_scalar(float *h, const float *g, int n) {
    int i;
    for (i = 0; i < n; i++) h[i] = afm__silu(h[i]) * g[i];
}

/* Softmax's first half over n scores in place: *max = the maximum (NaN skipped, as on every level),
   x[i] = afm__expf(x[i] - max), and the sum returned: the contract's 8 lanes (i mod 8), the tree,
   then the last n % 8 in order. afm__softmax divides; chunked attention merges the sums instead. */
static float afm__expsum_scalar(float *x, int n, float *max) {
    float mx = -FLT_MAX, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sum;
    int i;
    for (i = 0; i < n; i++) if (x[i] > mx) mx = x[i];
    for (i = 0; i < (n & ~7); i++) { x[i] = afm__expf(x[i] - mx); acc[i & 7] += x[i]; }
    sum = afm__sum8(acc);
    for (; i < n; i++) { x[i] = afm__expf(x[i] - mx); sum += x[i]; }
    *max = mx;
    return sum;
}

/* Double precision for the RoPE tables, from +, -, *, /, fma, nearbyint, frexp and ldexp only (all
   exact or correctly rounded, so the same on every machine). Taylor coefficients as literals. */
static double afm__poly_d(const double *c, int n, double x) { /* c[0] + c[1] x + ... (Horner, fma) */
    double p = c[n - 1];
    int i;
    for (i = n - 2; i >= 0; i--) p = fma(p, x, c[i]);
    return p;
}

/* e^y, |y| < 700: y = n ln2 + r, e^r to r^14. */
static double afm__exp_d(double y) {
    static const double c[15] = {1, 1, 0.5, 0.16666666666666666, 0.041666666666666664, 0.0083333333333333332,
        0.0013888888888888889, 0.00019841269841269841, 2.4801587301587302e-05, 2.7557319223985893e-06,
        2.7557319223985888e-07, 2.505210838544172e-08, 2.08767569878681e-09, 1.6059043836821613e-10, 1.1470745597729725e-11};
    const double n = nearbyint(y * 1.4426950408889634);
    double r = fma(n, -6.93147180369123816490e-01, y); /* ln2 in two parts */
    r = fma(n, -1.90821492927058770002e-10, r);
    return ldexp(afm__poly_d(c, 15, r), (int)n);
}

/* ln x, x > 0 finite: x = 2^e m, m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1). */
static double afm__log_d(double x) {
    static const double c[13] = {1, 0.33333333333333331, 0.20000000000000001, 0.14285714285714285, 0.1111111111111111,
        0.090909090909090912, 0.076923076923076927, 0.066666666666666666, 0.058823529411764705, 0.052631578947368418,
        0.047619047619047616, 0.043478260869565216, 0.040000000000000001}; /* 1/(2i+1) */
    double m, s;
    int e;
    m = frexp(x, &e);
    if (m < 0.70710678118654752) { m *= 2; e--; }
    s = (m - 1) / (m + 1);
    return fma((double)e, 6.93147180369123816490e-01,
               fma((double)e, 1.90821492927058770002e-10, 2 * s * afm__poly_d(c, 13, s * s)));
}

/* sin and cos of x (|x| < 2^40): x = n pi/2 + r, |r| <= pi/4, Taylor series to r^21 and r^20. */
static void afm__sincos_d(double x, double *sn, double *cs) {
    static const double cc[11] = {1, -0.5, 0.041666666666666664, -0.0013888888888888889, 2.4801587301587302e-05,
        -2.7557319223985888e-07, 2.08767569878681e-09, -1.1470745597729725e-11, 4.7794773323873853e-14,
        -1.5619206968586225e-16, 4.1103176233121648e-19};
    static const double sc[11] = {1, -0.16666666666666666, 0.0083333333333333332, -0.00019841269841269841,
        2.7557319223985893e-06, -2.505210838544172e-08, 1.6059043836821613e-10, -7.6471637318198164e-13,
        2.8114572543455206e-15, -8.2206352466243295e-18, 1.9572941063391263e-20};
    const double n = nearbyint(x * 0.63661977236758134);
    double r = fma(n, -1.57079632673412561417e+00, x), r2, s, c; /* pi/2 in three parts */
    int q;
    r = fma(n, -6.07710050650619224932e-11, r);
    r = fma(n, -3.5215598651832e-27, r);
    r2 = r * r;
    s = r * afm__poly_d(sc, 11, r2);
    c = afm__poly_d(cc, 11, r2);
    q = (int)(n - 4 * floor(n / 4)); /* n mod 4, exact */
    *sn = q == 0 ? s : q == 1 ? c : q == 2 ? -s : -c;
    *cs = q == 0 ? c : q == 1 ? -s : q == 2 ? -c : s;
}

/* ---- scalar reference kernels ---- */

/* Round to nearest, ties to even (the default FP environment); identical to cvtps_epi32/vcvtnq. */
static inline int afm__round_even(float x) { return (int)lrintf(x); }

/* Bits of |x|: as unsigned integers these order every finite |x| and put infinity, then NaN, above. */
static inline uint32_t afm__abs_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u & 0x7fffffffu; }
#define AFM__AMAX_INF 0x7f800000u /* abs bits at or above: the block holds infinity or NaN */
#define AFM__AMAX_TINY 0x0d800000u /* abs bits below (2^-100): the block is quantized as zero */

/* The largest afm__abs_bits of x[0 .. n). */
static uint32_t afm__amax_bits(const float *x, int n) {
    uint32_t amax_bits = 0;
    int i;
    for (i = 0; i < n; i++) { uint32_t u = afm__abs_bits(x[i]); amax_bits = u > amax_bits ? u : amax_bits; }
    return amax_bits;
}

/* Quantizes one block of 64 given its amax bits (shared by every level for the rare cases). */
static void afm__q8_block_scalar(const float *x, int n, int8_t *q, float *d, int32_t *qs) {
    const uint32_t amax_bits = afm__amax_bits(x, n);
    int i, sum = 0;
    float amax, id;
    memset(q, 0, 64);
    *qs = 0;
    if (amax_bits >= AFM__AMAX_INF || amax_bits < AFM__AMAX_TINY) {
        *d = amax_bits >= AFM__AMAX_INF ? (float)NAN : 0.0f;
        return;
    }
    memcpy(&amax, &amax_bits, 4);
    id = 127.0f / amax;
    for (i = 0; i < n; i++) { int c = afm__round_even(x[i] * id); q[i] = (int8_t)c; sum += c; }
    *d = amax / 127.0f;
    *qs = sum;
}

static void afm__prepare_q8_scalar(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    int t, b;
    for (t = t0; t < t1; t++) {
        const float *x = X + (size_t)t * ldx;
        int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
        float *d = a->d + (size_t)t * (size_t)a->nsb;
        int32_t *qs = a->qs + (size_t)t * (size_t)a->nsb;
        for (b = 0; b < a->nsb; b++) {
            int n = a->n_in - b * 64;
            if (n > 64) n = 64;
            if (n < 0) n = 0;
            afm__q8_block_scalar(x + b * 64, n, q + b * 64, d + b, qs + b);
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

/* Twice the type's grid offset (weights are (c - offset) * S): the contract's o. */
static inline int afm__type_off2(int type) { return type == AFM_TYPE_Q2B ? 3 : type == AFM_TYPE_Q4 ? 15 : 0; }

/* The contract above, written out: one exact integer per sub-block, 8 float lanes, fma in order. */
static void afm__matmul_q_scalar(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    const int nsb = w->kpad / 64, o = afm__type_off2(w->type);
    int r, t, sb, i;
    for (r = r0; r < r1; r++) {
        for (t = 0; t < a->n_tok; t++) {
            const int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
            const float *d = a->d + (size_t)t * (size_t)a->nsb;
            const int32_t *qs = a->qs + (size_t)t * (size_t)a->nsb;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (sb = 0; sb < nsb; sb++) {
                const float s = afm__qscale(w, r, sb);
                int32_t p = 0;
                for (i = 0; i < 64; i++) p += afm__code(w, r, sb, i) * q[sb * 64 + i];
                acc[sb & 7] = fmaf((float)(2 * p - o * qs[sb]), s * d[sb], acc[sb & 7]);
            }
            Y[(size_t)t * ldy + (size_t)r] = 0.5f * afm__sum8(acc);
        }
    }
}

static inline float afm__wf_scalar(int type, const uint8_t *row, int i) {
    if (type == AFM_TYPE_F32) { float f; memcpy(&f, row + 4 * (size_t)i, 4); return f; }
    if (type == AFM_TYPE_F16) return afm__h2f(afm__rd16(row + 2 * (size_t)i));
    return afm__bf2f(afm__rd16(row + 2 * (size_t)i));
}

static void afm__matmul_f_scalar(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    const int K8 = w->cols & ~7;
    int r, t, i;
    for (r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        for (t = 0; t < a->n_tok; t++) {
            const float *x = a->x + (size_t)t * (size_t)a->kpad;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s;
            for (i = 0; i < K8; i++) acc[i & 7] = fmaf(afm__wf_scalar(w->type, row, i), x[i], acc[i & 7]);
            s = afm__sum8(acc);
            for (; i < w->cols; i++) s = fmaf(afm__wf_scalar(w->type, row, i), x[i], s);
            Y[(size_t)t * ldy + (size_t)r] = s;
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
    { /* (c - offset) * S: the offset is 1.5 (Q2B), 7.5 (Q4) or 0 (Q8), exact in float */
        const float off = 0.5f * (float)afm__type_off2(w->type);
        int sb;
        for (sb = 0; 64 * sb < w->cols; sb++) {
            const float S = afm__qscale(w, row, sb);
            for (i = 64 * sb; i < w->cols && i < 64 * sb + 64; i++) out[i] = ((float)afm__code(w, row, sb, i & 63) - off) * S;
        }
    }
}

static void afm__kv_scores_scalar(const int16_t *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                  int n_pos, int dim, const float *qs, float *s, size_t lds, const int8_t *pf) {
    int h, p, i;
    (void)pf;
    for (h = 0; h < nq; h++)
        for (p = 0; p < n_pos; p++) {
            const int8_t *kp = k + (size_t)p * k_stride;
            const int16_t *qh = q + (size_t)h * ldq;
            int32_t sum = 0;
            for (i = 0; i < dim; i++) sum += (int32_t)qh[i] * kp[i];
            s[(size_t)h * lds + (size_t)p] = (float)sum * qs[h];
        }
}

static void afm__kv_values_scalar(const int16_t *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                  int n_pos, int dim, const float *vs, float *o, size_t ldo) {
    int h, p, i;
    for (h = 0; h < nq; h++)
        for (i = 0; i < dim; i++) {
            int32_t sum = 0;
            for (p = 0; p < n_pos; p++) sum += (int32_t)pr[(size_t)h * ldp + (size_t)p] * v[(size_t)p * v_stride + (size_t)i];
            o[(size_t)h * ldo + (size_t)i] = (float)sum * vs[h];
        }
}

static void afm__round16_scalar(int16_t *out, const float *x, int n, float mul) {
    int i;
    for (i = 0; i < n; i++) out[i] = (int16_t)(x[i] == x[i] ? afm__round_even(x[i] * mul) : 0);
}

/* e^d for d <= 0 as a multiple of 1/32767, rounded: the attention probabilities of att_int. Only
   2^-16 of precision is kept, so a shorter series than afm__expf's does: d = (k + f) ln 2 with k =
   round(d log2 e), |f| <= 1/2, 2^f by its Taylor series to the 5th power (error below 3e-6), d
   below -16 (or NaN) taken as -16, whose code is 0. */
static inline int afm__exp16_code(float d) {
    float kf, f, p;
    d = d > -16.0f ? d : -16.0f;
    kf = fmaf(d, 1.44269502f, 12582912.0f) - 12582912.0f;
    f = fmaf(d, 1.44269502f, -kf);
    p = fmaf(1.33335581e-3f, f, 9.61812911e-3f);
    p = fmaf(p, f, 5.55041087e-2f);
    p = fmaf(p, f, 2.40226507e-1f);
    p = fmaf(p, f, 6.93147182e-1f);
    p = fmaf(p, f, 1.0f);
    return afm__round_even(p * afm__pow2i((int)kf) * 32767.0f);
}

static int32_t afm__softmax16_scalar(const float *x, int n, float *max, int16_t *out) {
    float mx = -FLT_MAX;
    int32_t sum = 0;
    int i;
    for (i = 0; i < n; i++) if (x[i] > mx) mx = x[i];
    for (i = 0; i < n; i++) { out[i] = (int16_t)afm__exp16_code(x[i] - mx); sum += out[i]; }
    *max = mx + 0.0f; /* -0 as +0: which zero a maximum keeps differs between the levels */
    return sum;
}

static void afm__kv_scores_f_scalar(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                    int n_pos, int dim, float scale, float *s, size_t lds, const int8_t *pf) {
    const int d8 = dim & ~7;
    int h, p, i;
    (void)pf;
    for (h = 0; h < nq; h++)
        for (p = 0; p < n_pos; p++) {
            const int8_t *kp = k + (size_t)p * k_stride;
            const float *qh = q + (size_t)h * ldq;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sum;
            for (i = 0; i < d8; i++) acc[i & 7] = fmaf(qh[i], (float)kp[i], acc[i & 7]);
            sum = afm__sum8(acc);
            for (; i < dim; i++) sum = fmaf(qh[i], (float)kp[i], sum);
            s[(size_t)h * lds + (size_t)p] = sum * scale;
        }
}

static void afm__kv_values_f_scalar(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                    int n_pos, int dim, float scale, float *o, size_t ldo) {
    int h, p, i;
    for (h = 0; h < nq; h++) {
        float *oh = o + (size_t)h * ldo;
        for (i = 0; i < dim; i++) oh[i] = 0.0f;
        for (p = 0; p < n_pos; p++) {
            const int8_t *vp = v + (size_t)p * v_stride;
            float w = pr[(size_t)h * ldp + (size_t)p];
            for (i = 0; i < dim; i++) oh[i] = fmaf(w, (float)vp[i], oh[i]);
        }
        for (i = 0; i < dim; i++) oh[i] *= scale;
    }
}


/* y[i] = fma(a, x[i], y[i]). A kernel because compilers call the C library's fmaf for every
   element unless built for a CPU with FMA (x86-64 baseline is not): the attention merge was 10 %
   of the attention's time at 4000 positions. */
static void afm__axpy_scalar(float *y, float a, const float *x, int n) {
    int i;
    for (i = 0; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* Scales of sub-blocks c .. c+n-1 (n <= 8) of a row as floats. */
static inline void afm__scales_chunk(const uint8_t *sc, int gshift, int c, int n, float *out) {
    int j;
    for (j = 0; j < n; j++) out[j] = afm__h2f(afm__rd16(sc + 2 * (size_t)((c + j) >> gshift)));
}

/* Drivers: rows [r0, r1) x all tokens of a kernel for one row (quantized) or R rows (float) x T tokens. */
/* Rows [r0, r1) x all tokens: blocks of rows whose weights stay in L2 (~192 KB), inside each
   token tiles of 8 (then one tile of the 1..7 left), rows inside those: a weight row is reused from registers across
   the tile's tokens, a token tile's activations from L1/L2 across the block's rows. */
static inline int afm__row_block(const afm__wmat *w) {
    size_t rb = ((size_t)192 << 10) / (w->row_bytes + (size_t)w->n_groups * 2 + 1);
    return rb < 8 ? 8 : rb > 4096 ? 4096 : (int)rb;
}
/* Rows b0 .. b1-1 for tokens t .. t+T-1, the two halves of the range in alternation: two streams of
   codes in flight (one core reads more of memory with two sequential streams than with one). */
#define AFM__QMM_ROWS(TILE, TYPE, T)                                                                        \
        do {                                                                                                \
            const int h_ = (b1 - b0) / 2;                                                                   \
            for (r = b0; r < b0 + h_; r++) { TILE(w, a, Y, ldy, r, t, T, TYPE); TILE(w, a, Y, ldy, r + h_, t, T, TYPE); } \
            for (r = b0 + 2 * h_; r < b1; r++) TILE(w, a, Y, ldy, r, t, T, TYPE);                             \
        } while (0)
/* The body of a quantized driver: TILE is the ISA's token tile, TYPE the weight type (a constant,
   so each afm__matmul_<type>_<isa> below gets its own specialised copy of the tile). */
#define AFM__QMM_BODY(TILE, TYPE)                                                                           \
        const int rb = a->n_tok > 8 ? afm__row_block(w) : r1 - r0;                                          \
        int b0, t, r;                                                                                       \
        for (b0 = r0; b0 < r1; b0 += rb) {                                                                  \
            const int b1 = r1 - b0 > rb ? b0 + rb : r1;                                                     \
            for (t = 0; t + 8 <= a->n_tok; t += 8) AFM__QMM_ROWS(TILE, TYPE, 8);                            \
            switch (a->n_tok - t) { /* the rest in one tile: a row's codes are read once more, not 3 times */ \
            case 7: AFM__QMM_ROWS(TILE, TYPE, 7); break;                                                    \
            case 6: AFM__QMM_ROWS(TILE, TYPE, 6); break;                                                    \
            case 5: AFM__QMM_ROWS(TILE, TYPE, 5); break;                                                    \
            case 4: AFM__QMM_ROWS(TILE, TYPE, 4); break;                                                    \
            case 3: AFM__QMM_ROWS(TILE, TYPE, 3); break;                                                    \
            case 2: AFM__QMM_ROWS(TILE, TYPE, 2); break;                                                    \
            case 1: AFM__QMM_ROWS(TILE, TYPE, 1); break;                                                    \
            default: break;                                                                                 \
            }                                                                                               \
        }
/* The body of a float driver: TILE computes RB rows x TB tokens (then 4 x 1 and 1 x 1 for the rest). */
#define AFM__FMM_BODY(TILE, TYPE, RB, TB)                                                                   \
        int t = 0, r;                                                                                       \
        for (; t + TB <= a->n_tok; t += TB) {                                                               \
            for (r = r0; r + RB <= r1; r += RB) TILE(w, a, Y, ldy, r, t, RB, TB, TYPE);                     \
            for (; r < r1; r++) TILE(w, a, Y, ldy, r, t, 1, TB, TYPE);                                      \
        }                                                                                                   \
        for (; t < a->n_tok; t++) {                                                                         \
            for (r = r0; r + 4 <= r1; r += 4) TILE(w, a, Y, ldy, r, t, 4, 1, TYPE);                         \
            for (; r < r1; r++) TILE(w, a, Y, ldy, r, t, 1, 1, TYPE);                                       \
        }
/* ---- Q2B: panel kernels and matrix-matrix kernels ----

   Q2B matrices are in panels of 16 rows (FILE LOADER, "Q2B in memory"). The panel kernels
   (afm__ptile_*: decode, verification, any row range) read a panel word, shift and mask out its 4
   bit planes, and take each against a broadcast of 4 activations of a token: 16 rows per
   instruction, each row's integer sum in its own SIMD lane (no horizontal sums), the float step
   once per sub-block for 16 rows. A batch of the level's gemm_min tokens or more (prefill) first
   unpacks each panel to one code a byte in a per-thread scratch buffer ([sub-block][k/4][row][4
   bytes]), so the many tokens that run over it spend nothing on shifts and masks. Either way the
   same P_sb and the same float steps as the scalar reference: the same bits. */
static inline size_t afm__gemm_scratch_size(int kpad) { /* (afm__gemm_q4_amx needs the most) */
    return 64 + (size_t)kpad * 19 + 12288;
}

/* The driver of a panel kernel: PTILE(w, a, pn, t0, T, out, ldo) for the 16 rows of panel pn x T
   tokens (TB at a time, then the rest in one tile), rows r0 .. r1-1 of Y kept (a panel cut by r0 or
   r1, or holding padding rows, goes through a small buffer). */
#define AFM__PANEL_BODY(PTILE, TB)                                                                           \
    AFM__ALIGN(64) float tmp[(TB) * 16];                                                                     \
    int pn, t, n, u;                                                                                         \
    for (pn = r0 >> 4; 16 * pn < r1; pn++) {                                                                 \
        const int lo = 16 * pn < r0 ? r0 : 16 * pn, hi = 16 * pn + 16 < r1 ? 16 * pn + 16 : r1;               \
        const int whole = hi - lo == 16;                                                                     \
        for (t = 0; t < a->n_tok; t += n) {                                                                  \
            float *out = whole ? Y + (size_t)t * ldy + (size_t)lo : tmp;                                      \
            const size_t ldo = whole ? ldy : 16;                                                             \
            n = a->n_tok - t < (TB) ? a->n_tok - t : (TB);                                                   \
            if (n == (TB)) PTILE(w, a, pn, t, (TB), out, ldo);                                               \
            else switch (n) { /* the rest in one tile (cases past TB never run) */                           \
            case 7: PTILE(w, a, pn, t, 7 % (TB), out, ldo); break;                                           \
            case 6: PTILE(w, a, pn, t, 6 % (TB), out, ldo); break;                                           \
            case 5: PTILE(w, a, pn, t, 5 % (TB), out, ldo); break;                                           \
            case 4: PTILE(w, a, pn, t, 4 % (TB), out, ldo); break;                                           \
            case 3: PTILE(w, a, pn, t, 3 % (TB), out, ldo); break;                                           \
            case 2: PTILE(w, a, pn, t, 2 % (TB), out, ldo); break;                                           \
            default: PTILE(w, a, pn, t, 1, out, ldo); break;                                                 \
            }                                                                                                \
            if (!whole)                                                                                      \
                for (u = 0; u < n; u++)                                                                      \
                    memcpy(Y + (size_t)(t + u) * ldy + (size_t)lo, tmp + u * 16 + (lo - 16 * pn), (size_t)(hi - lo) * sizeof(float)); \
        }                                                                                                    \
    }

/* The driver of a matrix-matrix kernel: each whole panel of rows r0 .. r1-1 unpacked by PACK, then
   GTILE(codes, S, nsb, a, Y, ldy, r, t0, T) for its 16 rows x T tokens (TB at a time, then the rest);
   a panel cut by r0 or r1 goes to the panel kernel ROWS. */
#define AFM__GEMM_BODY(GTILE, TB, ROWS, PACK)                                                                \
    uint8_t *codes = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);                                \
    float *S = (float *)(void *)(codes + (size_t)w->kpad * 16);                                              \
    const int nsb = w->kpad >> 6;                                                                            \
    int r = r0, t;                                                                                           \
    if (r & 15) { /* a panel cut by r0: the panel kernel */                                                  \
        r = (r | 15) + 1 < r1 ? (r | 15) + 1 : r1;                                                           \
        ROWS(w, a, Y, ldy, r0, r);                                                                           \
    }                                                                                                        \
    for (; r + 16 <= r1; r += 16) {                                                                          \
        PACK(w, r, codes, S);                                                                                \
        for (t = 0; t + TB <= a->n_tok; t += TB) GTILE(codes, S, nsb, a, Y, ldy, r, t, TB);                  \
        switch (a->n_tok - t) { /* the rest in one tile (cases past TB never run) */                                             \
        case 7: GTILE(codes, S, nsb, a, Y, ldy, r, t, 7 % TB); break;                                        \
        case 6: GTILE(codes, S, nsb, a, Y, ldy, r, t, 6 % TB); break;                                        \
        case 5: GTILE(codes, S, nsb, a, Y, ldy, r, t, 5 % TB); break;                                        \
        case 4: GTILE(codes, S, nsb, a, Y, ldy, r, t, 4 % TB); break;                                        \
        case 3: GTILE(codes, S, nsb, a, Y, ldy, r, t, 3 % TB); break;                                        \
        case 2: GTILE(codes, S, nsb, a, Y, ldy, r, t, 2 % TB); break;                                        \
        case 1: GTILE(codes, S, nsb, a, Y, ldy, r, t, 1); break;                                             \
        default: break;                                                                                      \
        }                                                                                                    \
    }                                                                                                        \
    if (r < r1) ROWS(w, a, Y, ldy, r, r1);

/* ---- x86-64: AVX2 + FMA + F16C ---- */
#ifdef AFM__X86

AFM__T_AVX2 static inline float afm__hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AFM__T_AVX2 static void afm__prepare_q8_avx2(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
    int t, b, i;
    for (t = t0; t < t1; t++) {
        const float *x = X + (size_t)t * ldx;
        int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
        float *d = a->d + (size_t)t * (size_t)a->nsb;
        int32_t *qs = a->qs + (size_t)t * (size_t)a->nsb;
        for (b = 0; b < a->nsb; b++) {
            int n = a->n_in - b * 64;
            __m256 v[8];
            __m256i mx, q32[8], s16, s8, sum32;
            __m128i h;
            uint32_t amax_bits;
            float amax, id;
            if (n < 64) { /* partial or empty last block */
                afm__q8_block_scalar(x + b * 64, n < 0 ? 0 : n, q + b * 64, d + b, qs + b);
                continue;
            }
            for (i = 0; i < 8; i++) v[i] = _mm256_loadu_ps(x + b * 64 + i * 8);
            /* max of |x| as integers: NaN and infinity sort above every finite value (afm__abs_bits) */
#define AFM__ABS(k) _mm256_and_si256(_mm256_castps_si256(v[k]), absmask)
            mx = _mm256_max_epu32(_mm256_max_epu32(_mm256_max_epu32(AFM__ABS(0), AFM__ABS(1)), _mm256_max_epu32(AFM__ABS(2), AFM__ABS(3))),
                                  _mm256_max_epu32(_mm256_max_epu32(AFM__ABS(4), AFM__ABS(5)), _mm256_max_epu32(AFM__ABS(6), AFM__ABS(7))));
#undef AFM__ABS
            h = _mm_max_epu32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
            h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4e));
            h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xb1));
            amax_bits = (uint32_t)_mm_cvtsi128_si32(h);
            if (amax_bits >= AFM__AMAX_INF || amax_bits < AFM__AMAX_TINY) {
                afm__q8_block_scalar(x + b * 64, 64, q + b * 64, d + b, qs + b);
                continue;
            }
            memcpy(&amax, &amax_bits, 4);
            id = 127.0f / amax;
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
            h = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
            d[b] = amax / 127.0f;
            qs[b] = _mm_cvtsi128_si32(h);
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

/* The 8 lanes' sums of v[0..7], in lanes 0..7 (integer: any order is exact). */
AFM__FORCEINLINE AFM__T_AVX2 __m256i afm__hsum8x8_avx2(const __m256i *v) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* Codes of sub-block k (of SBB) of a 64-byte block v0|v1 of a Q4 or Q8 row (Q2B is read from
   panels), as u8: Q4's nibble, Q8's as stored (signed). */
AFM__FORCEINLINE AFM__T_AVX2 void afm__codes_avx2(__m256i v0, __m256i v1, int k, const int type, __m256i *c0, __m256i *c1) {
    if (type == AFM_TYPE_Q4) {
        *c0 = _mm256_and_si256(k ? _mm256_srli_epi16(v0, 4) : v0, _mm256_set1_epi8(0x0f));
        *c1 = _mm256_and_si256(k ? _mm256_srli_epi16(v1, 4) : v1, _mm256_set1_epi8(0x0f));
    } else {
        *c0 = v0; *c1 = v1;
    }
}

/* 64 codes . 64 activations as 8 int32 lanes that sum to the exact dot. maddubs takes unsigned x
   signed: Q8's signed codes give it |c| and x with c's sign. Q4 codes up to 15 keep the two int16
   products below 2^15; Q8's are added as int32. */
AFM__FORCEINLINE AFM__T_AVX2 __m256i afm__dot64_avx2(__m256i c0, __m256i c1, const int8_t *x, const int type) {
    const __m256i x0 = _mm256_load_si256((const __m256i *)(const void *)x), x1 = _mm256_load_si256((const __m256i *)(const void *)(x + 32));
    const __m256i ones = _mm256_set1_epi16(1);
    if (type == AFM_TYPE_Q8)
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c0), _mm256_sign_epi8(x0, c0)), ones),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c1), _mm256_sign_epi8(x1, c1)), ones));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1)), ones);
}

/* The contract's float step for 8 sub-blocks c..c+7 of one token: P (their code dots, lane j =
   sub-block c+j) becomes 2P - o*Q, and lane j accumulates it times S_j * d_j. S: the 8 scales, 0
   past a short last chunk, whose lanes then add fma(0, 0, lane) = lane (a lane starting at +0 never
   holds -0). */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__qstep_avx2(__m256i P, __m256 S, const float *d, const int32_t *qs, const int type, __m256 acc) {
    __m256i p2 = _mm256_slli_epi32(P, 1);
    if (type != AFM_TYPE_Q8) {
        const __m256i Q = _mm256_loadu_si256((const __m256i *)(const void *)qs);
        p2 = _mm256_sub_epi32(p2, _mm256_sub_epi32(_mm256_slli_epi32(Q, 4), Q)); /* Q4: o = 15 */
    }
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p2), _mm256_mul_ps(S, _mm256_loadu_ps(d)), acc);
}

/* The scales of sub-blocks c..c+n-1 (n <= 8), zeros past n. */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__scales_n_avx2(const uint8_t *sc, int gshift, int c, int n) {
    AFM__ALIGN(32) float s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n == 8) return afm__scales8_avx2(sc, gshift, c);
    afm__scales_chunk(sc, gshift, c, n, s8);
    return _mm256_load_ps(s8);
}

/* One row r of a Q4 or Q8 matrix against tokens t0 .. t0+T-1 (T <= 8, a constant after inlining),
   8 sub-blocks at a time: their 8 integer dots per token are reduced to one vector (lane j: sub-
   block c+j), then one float step (afm__qstep_avx2). DOT64 is the level's 64-code dot. The last
   chunk may be short: rows are padded to 128 (Q4) or 64 (Q8) elements, not 512. */
#define AFM__QROW_CHUNK(N, DOT64, CC, S)                                                                         \
    {                                                                                                            \
        const uint8_t *blk0 = row + (size_t)((unsigned)(CC) / SBB) * 64;                                         \
        __m256i cc[8][2]; /* the chunk's codes, unpacked once for all tokens */                                  \
        AFM__UNROLL for (j = 0; j < 8; j++)                                                                      \
            if (j < (N))                                                                                         \
                afm__codes_avx2(_mm256_loadu_si256((const __m256i *)(const void *)(blk0 + (j / SBB) * 64)),      \
                                _mm256_loadu_si256((const __m256i *)(const void *)(blk0 + (j / SBB) * 64 + 32)), \
                                j % SBB, type, &cc[j][0], &cc[j][1]);                                            \
            else cc[j][0] = cc[j][1] = _mm256_setzero_si256();                                                   \
        AFM__UNROLL for (t = 0; t < T; t++) {                                                                    \
            const int8_t *x = a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)(CC) * 64;                     \
            __m256i v[8], P;                                                                                     \
            AFM__UNROLL for (j = 0; j < 8; j++)                                                                  \
                v[j] = j < (N) ? DOT64(cc[j][0], cc[j][1], x + j * 64, type) : _mm256_setzero_si256();           \
            P = afm__hsum8x8_avx2(v);                                                                            \
            acc[t] = afm__qstep_avx2(P, S, a->d + (size_t)(t0 + t) * (size_t)a->nsb + (CC),                      \
                                     a->qs + (size_t)(t0 + t) * (size_t)a->nsb + (CC), type, acc[t]);            \
        }                                                                                                        \
    }
#define AFM__QROW_PF(CC)                                                                                         \
    if (t0 == 0 && AFM__PF_DIST > 0) {                                                                     \
        _mm_prefetch((const char *)sc + 2 * (size_t)((CC) >> gshift) + AFM__PF_DIST / 8, _MM_HINT_T0);           \
        for (j = 0; j < 8 / SBB; j++)                                                                            \
            _mm_prefetch((const char *)(row + (size_t)((unsigned)(CC) / SBB + j) * 64) + AFM__PF_DIST, _MM_HINT_T0); \
    }
/* (Decode takes 16 sub-blocks per step: two independent chains for the out-of-order core.) */
#define AFM__QROW_BODY(DOT64)                                                                                   \
    const int SBB = type == AFM_TYPE_Q4 ? 2 : 1; /* sub-blocks per 64-byte block */                            \
    const int nsb = w->kpad >> 6, gshift = w->gshift;                                                            \
    const uint8_t *row = w->data + (size_t)r * w->row_bytes;                                                     \
    const uint8_t *sc = w->scales + (size_t)r * (size_t)w->n_groups * 2;                                         \
    __m256 acc[8];                                                                                               \
    int t, j, c = 0;                                                                                             \
    AFM__UNROLL for (t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();                                            \
    if (T == 1)                                                                                                  \
        for (; c + 16 <= nsb; c += 16) {                                                                         \
            const __m256 S0 = afm__scales8_avx2(sc, gshift, c), S1 = afm__scales8_avx2(sc, gshift, c + 8);      \
            AFM__QROW_PF(c)                                                                                      \
            AFM__QROW_PF(c + 8)                                                                                  \
            AFM__QROW_CHUNK(8, DOT64, c, S0)                                                                     \
            AFM__QROW_CHUNK(8, DOT64, c + 8, S1)                                                                 \
        }                                                                                                        \
    for (; c < nsb; c += 8) {                                                                                    \
        AFM__QROW_PF(c)                                                                                          \
        if (nsb - c >= 8) {                                                                                      \
            const __m256 S = afm__scales8_avx2(sc, gshift, c);                                                   \
            AFM__QROW_CHUNK(8, DOT64, c, S)                                                                      \
        } else {                                                                                                 \
            const __m256 S = afm__scales_n_avx2(sc, gshift, c, nsb - c);                                         \
            const int n = nsb - c; /* a short last chunk: Q4 and Q8 rows are padded to 128 / 64 only */          \
            AFM__QROW_CHUNK(n, DOT64, c, S)                                                                      \
        }                                                                                                        \
    }                                                                                                            \
    AFM__UNROLL for (t = 0; t < T; t++) Y[(size_t)(t0 + t) * ldy + (size_t)r] = 0.5f * afm__hsum_avx2(acc[t]);

AFM__FORCEINLINE AFM__T_AVX2 void afm__qtile_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                                  int r, int t0, const int T, const int type) {
    AFM__QROW_BODY(afm__dot64_avx2)
}

/* The contract's float step for 16 rows (P0: rows 0-7, P1: rows 8-15, their exact sums) of token t
   and sub-block sb: lane[0..1] += (2P - o Q) * (S * d). */
AFM__FORCEINLINE AFM__T_AVX2 void afm__gstep_avx2(__m256 *lane, __m256i P0, __m256i P1, __m256 s0, __m256 s1, const afm__act *a, int t, int sb) {
    const size_t i = (size_t)t * (size_t)a->nsb + (size_t)sb;
    const __m256 d = _mm256_set1_ps(a->d[i]);
    const __m256i oQ = _mm256_set1_epi32(afm__type_off2(AFM_TYPE_Q2B) * a->qs[i]);
    lane[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_slli_epi32(P0, 1), oQ)), _mm256_mul_ps(s0, d), lane[0]);
    lane[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_slli_epi32(P1, 1), oQ)), _mm256_mul_ps(s1, d), lane[1]);
}
/* y[0..15] = 0.5 * afm__sum8's tree over a token's lanes, 8 rows at once: l[j * stride + h] holds
   sub-blocks j mod 8, rows 8h .. 8h+7. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__gfinish_avx2(const __m256 *l, int stride, float *y) {
    int h;
    for (h = 0; h < 2; h++) {
        const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(l[h], l[4 * stride + h]), _mm256_add_ps(l[2 * stride + h], l[6 * stride + h])),
                                       _mm256_add_ps(_mm256_add_ps(l[stride + h], l[5 * stride + h]), _mm256_add_ps(l[3 * stride + h], l[7 * stride + h])));
        _mm256_storeu_ps(y + 8 * h, _mm256_mul_ps(s, _mm256_set1_ps(0.5f)));
    }
}

/* 16 rows of panel pn x T tokens (T <= 2) straight from the panel (decode, verification): each
   32-byte half of a panel word (8 rows x 4 columns in 4 bit pairs) is shifted and masked into its 4
   planes, each against a broadcast of a token's 4 activations (maddubs, summed in int16: at most
   16 x 2 x 3 x 127 per sub-block), then madd to int32: each lane is one row's exact P. Then the
   contract's float step per sub-block for 8 rows at once; the 8 float lanes per row live in memory.
   Y: token t0's 16 outputs, the next token's ldy further. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__ptile_avx2(const afm__wmat *w, const afm__act *a, int pn, int t0, const int T, float *Y, size_t ldy) {
    const int nsb = w->kpad >> 6;
    const uint8_t *pc = afm__panel_codes(w, pn);
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256 lanes[8][2][2]; /* [sub-block % 8][token][rows 0-7, 8-15] */
    int t, sb, v, h, m;
    AFM__UNROLL for (sb = 0; sb < 8; sb++) AFM__UNROLL for (t = 0; t < T; t++) lanes[sb][t][0] = lanes[sb][t][1] = _mm256_setzero_ps();
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *cb = pc + (size_t)sb * 256, *sg = afm__panel_scales(w, pn, sb);
        const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)sg));
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sg + 16)));
        __m256i acc[2][2];
        if (t0 == 0 && AFM__PF_DIST > 0) { /* the first token tile streams the panel: keep misses in flight (later tiles find it in the cache) */
            AFM__UNROLL for (v = 0; v < 4; v++) _mm_prefetch((const char *)cb + AFM__PF_DIST + 64 * v, _MM_HINT_T0);
            _mm_prefetch((const char *)sg + AFM__PF_DIST / 8, _MM_HINT_T0);
        }
        AFM__UNROLL for (t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
        AFM__UNROLL for (v = 0; v < 4; v++) AFM__UNROLL for (h = 0; h < 2; h++) {
            const __m256i W = _mm256_loadu_si256((const __m256i *)(const void *)(cb + 64 * v + 32 * h));
            AFM__UNROLL for (m = 0; m < 4; m++) {
                const __m256i c = _mm256_and_si256(_mm256_srli_epi16(W, 2 * m), m3);
                AFM__UNROLL for (t = 0; t < T; t++) {
                    int32_t x4;
                    memcpy(&x4, a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + 16 * (size_t)v + 4 * (size_t)m, 4);
                    acc[t][h] = _mm256_add_epi16(acc[t][h], _mm256_maddubs_epi16(c, _mm256_set1_epi32(x4)));
                }
            }
        }
        AFM__UNROLL for (t = 0; t < T; t++)
            afm__gstep_avx2(lanes[sb & 7][t], _mm256_madd_epi16(acc[t][0], ones), _mm256_madd_epi16(acc[t][1], ones), s0, s1, a, t0 + t, sb);
    }
    AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_avx2(&lanes[0][t][0], 2 * 2, Y + (size_t)t * ldy);
}
AFM__T_AVX2 static void afm__matmul_q2b_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__PANEL_BODY(afm__ptile_avx2, 2) /* 4 tokens at a time spill registers: 15 % slower per token (Zen 3) */
}
AFM__T_AVX2 static void afm__matmul_q4_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(afm__qtile_avx2, AFM_TYPE_Q4)
}
AFM__T_AVX2 static void afm__matmul_q8_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(afm__qtile_avx2, AFM_TYPE_Q8)
}

/* Panel pn (rows 16 pn ..) of a Q2B matrix into codes[sb][k/4][u][4] (one code a byte) and S[sb][u]
   (the scales as float), for the matrix-matrix tiles: each bit pair of a panel word masked out. */
AFM__T_AVX2 static void afm__unpack16_q2b_avx2(const afm__wmat *w, int r, uint8_t *codes, float *S) {
    const int nsb = w->kpad >> 6, pn = r >> 4;
    const uint8_t *pc = afm__panel_codes(w, pn);
    const __m256i m3 = _mm256_set1_epi8(3);
    int sb, v, h, m;
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *sg = afm__panel_scales(w, pn, sb);
        AFM__UNROLL for (v = 0; v < 4; v++) AFM__UNROLL for (h = 0; h < 2; h++) {
            const __m256i W = _mm256_loadu_si256((const __m256i *)(const void *)(pc + (size_t)sb * 256 + 64 * v + 32 * h));
            AFM__UNROLL for (m = 0; m < 4; m++)
                _mm256_store_si256((__m256i *)(void *)(codes + (size_t)sb * 1024 + (size_t)(4 * v + m) * 64 + 32 * h),
                                   _mm256_and_si256(_mm256_srli_epi16(W, 2 * m), m3));
        }
        _mm256_store_ps(S + (size_t)sb * 16, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)sg)));
        _mm256_store_ps(S + (size_t)sb * 16 + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(sg + 16))));
    }
}

/* 16 packed rows x T tokens (T <= 4): per sub-block, 16 steps of maddubs (4 codes of 8 rows x one
   token's 4 activations) summed in int16 (at most 16 * 2 * 3 * 127 * 2 < 2^15), then madd to int32:
   each lane is one row's exact dot. The contract's 8 float lanes per row live in memory. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__gtile_avx2(const uint8_t *codes, const float *S, int nsb, const afm__act *a,
                                                  float *Y, size_t ldy, int r, int t0, const int T) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 lanes[8][4][2]; /* [sub-block % 8][token][rows 0-7, 8-15] */
    int t, sb, k;
    memset(lanes, 0, sizeof lanes); /* +0.0f */
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *cb = codes + (size_t)sb * 1024;
        __m256 s0, s1;
        __m256i acc[4][2];
        AFM__UNROLL for (t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
        for (k = 0; k < 16; k++) {
            const __m256i c0 = _mm256_load_si256((const __m256i *)(const void *)(cb + k * 64));
            const __m256i c1 = _mm256_load_si256((const __m256i *)(const void *)(cb + k * 64 + 32));
            AFM__UNROLL for (t = 0; t < T; t++) {
                int32_t x4;
                __m256i xb;
                memcpy(&x4, a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + (size_t)k * 4, 4);
                xb = _mm256_set1_epi32(x4);
                acc[t][0] = _mm256_add_epi16(acc[t][0], _mm256_maddubs_epi16(c0, xb));
                acc[t][1] = _mm256_add_epi16(acc[t][1], _mm256_maddubs_epi16(c1, xb));
            }
        }
        s0 = _mm256_load_ps(S + (size_t)sb * 16); /* loaded here, not before the loop: two registers fewer in it */
        s1 = _mm256_load_ps(S + (size_t)sb * 16 + 8);
        AFM__UNROLL for (t = 0; t < T; t++)
            afm__gstep_avx2(lanes[sb & 7][t], _mm256_madd_epi16(acc[t][0], ones), _mm256_madd_epi16(acc[t][1], ones), s0, s1, a, t0 + t, sb);
    }
    AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_avx2(&lanes[0][t][0], 4 * 2, Y + (size_t)(t0 + t) * ldy + (size_t)r);
}
#define AFM__ROWS_Q2B_AVX2(w, a, Y, ldy, r0, r1) afm__matmul_q2b_avx2(w, a, Y, ldy, r0, r1)
AFM__T_AVX2 static void afm__gemm_q2b_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1, void *scratch) {
    AFM__GEMM_BODY(afm__gtile_avx2, 4, AFM__ROWS_Q2B_AVX2, afm__unpack16_q2b_avx2)
}

/* 8 weights of a float type as f32 */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__ld8_avx2(const uint8_t *row, int i, const int type) {
    if (type == AFM_TYPE_F32) return _mm256_loadu_ps((const float *)(const void *)(row + 4 * (size_t)i));
    if (type == AFM_TYPE_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)i)));
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
        for (i = K8; i < K; i++) s = fmaf(afm__wf_scalar(type, rows[u], i), xs[t][i], s);
        Y[(size_t)(t0 + t) * ldy + (size_t)(r + u)] = s;
    }
}

AFM__T_AVX2 static void afm__matmul_f32_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__FMM_BODY(afm__ftile_avx2, AFM_TYPE_F32, 4, 2)
}
AFM__T_AVX2 static void afm__matmul_f16_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__FMM_BODY(afm__ftile_avx2, AFM_TYPE_F16, 4, 2)
}
AFM__T_AVX2 static void afm__matmul_bf16_avx2(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__FMM_BODY(afm__ftile_avx2, AFM_TYPE_BF16, 4, 2)
}

AFM__T_AVX2 static void afm__prepare_f32_avx2(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    afm__prepare_f32_scalar(a, X, ldx, t0, t1);
}

/* Q4 row dequantization (the embedding lookup): 64-byte block -> 128 floats. (Q2B rows are spread
   over a panel: the scalar code, one row per token.) */
AFM__T_AVX2 static void afm__dequant_avx2(const afm__wmat *w, int row, float *out) {
    if (w->type == AFM_TYPE_Q4) {
        const int Q4 = 1, per = 128, SBB = 2;
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
    if (w->type == AFM_TYPE_F16) {
        const uint8_t *p = w->data + (size_t)row * w->row_bytes;
        int i = 0;
        for (; i + 8 <= w->cols; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * (size_t)i))));
        for (; i < w->cols; i++) out[i] = afm__h2f(afm__rd16(p + 2 * (size_t)i));
        return;
    }
    afm__dequant_scalar(w, row, out);
}

/* Prefetches the `dim` bytes of KV row p if it is one of the n_pos (its last byte too, for a row
   that straddles 3 lines; on the base's 64-byte aligned rows that repeats the second line, and a
   loop over exactly the rows' lines measured 4 % slower at 4000 positions); into L1, or into L2 with
   l2 (the values while the scores run: a chunk of both would not fit in L1). */
AFM__FORCEINLINE AFM__T_AVX2 void afm__kv_prefetch_avx2(const int8_t *kv, size_t stride, int p, int n_pos, int dim, const int l2) {
    if (AFM__KV_PF > 0 && p < n_pos) {
        const char *row = (const char *)(kv + (size_t)p * stride);
        int b;
        if (l2) {
            for (b = 0; b < dim; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
            _mm_prefetch(row + dim - 1, _MM_HINT_T1);
        } else {
            for (b = 0; b < dim; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
            _mm_prefetch(row + dim - 1, _MM_HINT_T0);
        }
    }
}

/* The 8 int32 sums of 8 accumulators, A[h]'s in lane h (integer sums: any order is exact). */
AFM__FORCEINLINE AFM__T_AVX2 __m256i afm__sum8x8_epi32_avx2(const __m256i *A) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(A[0], A[1]), _mm256_hadd_epi32(A[2], A[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(A[4], A[5]), _mm256_hadd_epi32(A[6], A[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* CALL(H) with H the constant equal to n (1..8): tiles whose head count must be a constant. */
#define AFM__HEADS_1_TO_8(n, CALL)                                                                     \
    switch (n) {                                                                                       \
    case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break; case 5: CALL(5); break;    \
    case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); break;   \
    }

/* Rows 0 .. H-1 of the transpose of the 8 x 8 floats r into s (row h at s + h * lds). */
AFM__FORCEINLINE AFM__T_AVX2 void afm__store8x8_avx2(float (*r)[8], float *s, size_t lds, const int H) {
    __m256 a[8], b[8];
    int h;
    AFM__UNROLL for (h = 0; h < 8; h += 2) {
        const __m256 x = _mm256_loadu_ps(r[h]), y = _mm256_loadu_ps(r[h + 1]);
        a[h] = _mm256_unpacklo_ps(x, y); /* x0 y0 x1 y1 | x4 y4 x5 y5 */
        a[h + 1] = _mm256_unpackhi_ps(x, y); /* x2 y2 x3 y3 | x6 y6 x7 y7 */
    }
    AFM__UNROLL for (h = 0; h < 8; h += 4) {
        b[h] = _mm256_shuffle_ps(a[h], a[h + 2], 0x44);     /* column 0 (and 4) of rows h .. h+3 */
        b[h + 1] = _mm256_shuffle_ps(a[h], a[h + 2], 0xEE); /* column 1 (5) */
        b[h + 2] = _mm256_shuffle_ps(a[h + 1], a[h + 3], 0x44); /* column 2 (6) */
        b[h + 3] = _mm256_shuffle_ps(a[h + 1], a[h + 3], 0xEE); /* column 3 (7) */
    }
    AFM__UNROLL for (h = 0; h < 4; h++) {
        if (h < H) _mm256_storeu_ps(s + (size_t)h * lds, _mm256_permute2f128_ps(b[h], b[h + 4], 0x20));
        if (h + 4 < H) _mm256_storeu_ps(s + (size_t)(h + 4) * lds, _mm256_permute2f128_ps(b[h], b[h + 4], 0x31));
    }
}

/* Scores of H heads, one key row at a time: the row widened to int16 once for the H heads, a
   vpmaddwd against each head's query (16 products an instruction, twice the float FMA's 8), the
   8 sums reduced together. H is a constant after inlining, so the accumulators stay in registers.
   AFM__KVS_TILE_BODY is the loop over positions that the VNNI tile shares: its statements (the
   variadic argument) set tot to position p's 8 sums over columns [0, dv) of key row kp; the columns
   after dv in scalar; every 8 positions, the scaled scores transposed out. */
#define AFM__KVS_TILE_BODY(dv, ...)                                                                        \
    float qv[8] = {0, 0, 0, 0, 0, 0, 0, 0}, r[8][8];                                                       \
    int32_t sum[8];                                                                                        \
    __m256 qsv;                                                                                            \
    int p, i, h;                                                                                           \
    for (h = 0; h < H; h++) qv[h] = qs[h];                                                                 \
    qsv = _mm256_loadu_ps(qv);                                                                             \
    for (p = 0; p < n_pos; p++) { /* r[p % 8] holds position p's 8 heads */                                \
        const int8_t *kp = k + (size_t)p * k_stride;                                                       \
        __m256i tot;                                                                                       \
        afm__kv_prefetch_avx2(k, k_stride, p + AFM__KV_PF, n_pos, dim, 0);                                 \
        if (pf) afm__kv_prefetch_avx2(pf, k_stride, p, n_pos, dim, 1);                                     \
        __VA_ARGS__                                                                                        \
        if ((dv) < dim) {                                                                                  \
            _mm256_storeu_si256((__m256i *)(void *)sum, tot);                                              \
            for (h = 0; h < H; h++)                                                                        \
                for (i = (dv); i < dim; i++) sum[h] += (int32_t)q[(size_t)h * ldq + (size_t)i] * kp[i];    \
            tot = _mm256_loadu_si256((const __m256i *)(const void *)sum);                                  \
        }                                                                                                  \
        _mm256_storeu_ps(r[p & 7], _mm256_mul_ps(_mm256_cvtepi32_ps(tot), qsv));                           \
        if ((p & 7) == 7) afm__store8x8_avx2(r, s + (size_t)(p - 7), lds, H);                              \
    }                                                                                                      \
    for (i = n_pos & ~7; i < n_pos; i++) AFM__UNROLL for (h = 0; h < H; h++) s[(size_t)h * lds + (size_t)i] = r[i & 7][h];

AFM__FORCEINLINE AFM__T_AVX2 void afm__kvs_tile_avx2(const int16_t *q, size_t ldq, const int8_t *k, size_t k_stride, int n_pos,
                                                     int dim, const float *qs, float *s, size_t lds, const int8_t *pf, const int H) {
    const int d16 = dim & ~15;
    AFM__KVS_TILE_BODY(d16,
        __m256i A[8];
        AFM__UNROLL for (h = 0; h < 8; h++) A[h] = _mm256_setzero_si256();
        for (i = 0; i < d16; i += 16) {
            const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(kp + i)));
            AFM__UNROLL for (h = 0; h < H; h++)
                A[h] = _mm256_add_epi32(A[h], _mm256_madd_epi16(x, _mm256_loadu_si256((const __m256i *)(const void *)(q + (size_t)h * ldq + (size_t)i))));
        }
        tot = afm__sum8x8_epi32_avx2(A);)
}

/* Up to 8 heads at a time (a KV head's group of query heads, in attention), each group by the
   tile AFM__KVS_TILE names (H a constant); the VNNI level's kv_scores shares this body. */
#define AFM__KVS_CALL(H) AFM__KVS_TILE(qh, ldq, k, k_stride, n_pos, dim, qs + h0, sh, lds, h0 ? NULL : pf, H)
#define AFM__KV_SCORES_BODY                                                                                \
    int h0;                                                                                                \
    for (h0 = 0; h0 < nq; h0 += 8) {                                                                       \
        const int16_t *qh = q + (size_t)h0 * ldq;                                                          \
        float *sh = s + (size_t)h0 * lds;                                                                  \
        AFM__HEADS_1_TO_8(nq - h0 < 8 ? nq - h0 : 8, AFM__KVS_CALL)                                        \
    }
AFM__T_AVX2 static void afm__kv_scores_avx2(const int16_t *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                            int n_pos, int dim, const float *qs, float *s, size_t lds, const int8_t *pf) {
#define AFM__KVS_TILE afm__kvs_tile_avx2
    AFM__KV_SCORES_BODY
#undef AFM__KVS_TILE
}

/* Rows p and p + 1 (or zeros, `two` false) interleaved column by column and widened to int16:
   x[c] holds columns 8c .. 8c+7 of both, pairs (p, p + 1). */
AFM__FORCEINLINE AFM__T_AVX2 void afm__kv_pair_avx2(const int8_t *v0, size_t v_stride, int two, __m256i *x, const int C) {
    if (C == 2) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(const void *)v0);
        const __m128i b = two ? _mm_loadu_si128((const __m128i *)(const void *)(v0 + v_stride)) : _mm_setzero_si128();
        x[0] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
        x[1] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
    } else {
        const __m128i a = _mm_loadl_epi64((const __m128i *)(const void *)v0);
        const __m128i b = two ? _mm_loadl_epi64((const __m128i *)(const void *)(v0 + v_stride)) : _mm_setzero_si128();
        x[0] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
    }
}

/* Values of H heads x C vectors of 8 columns, two positions at a time: their rows interleaved and
   widened once for the H heads, so one vpmaddwd against the broadcast pair of probabilities adds
   both positions' products (4 heads x 16 columns: 51 billion products/s against the float
   kernel's 41, Zen 3, 1 core, in cache). An odd last position pairs with zeros. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__kvv_tile_avx2(const int16_t *pr, size_t ldp, const int8_t *v, size_t v_stride, int n_pos,
                                                     const float *vs, float *o, size_t ldo, const int H, const int C) {
    __m256i A[8], x[2];
    int32_t pair;
    int p, h, c;
    AFM__UNROLL for (h = 0; h < 8; h++) A[h] = _mm256_setzero_si256();
    for (p = 0; p + 1 < n_pos; p += 2) {
        afm__kv_pair_avx2(v + (size_t)p * v_stride, v_stride, 1, x, C);
        AFM__UNROLL for (h = 0; h < H; h++) {
            __m256i w;
            memcpy(&pair, pr + (size_t)h * ldp + (size_t)p, 4); /* pr[p] in the low half, as x's pairs */
            w = _mm256_set1_epi32(pair);
            AFM__UNROLL for (c = 0; c < C; c++) A[h * C + c] = _mm256_add_epi32(A[h * C + c], _mm256_madd_epi16(x[c], w));
        }
    }
    if (p < n_pos) {
        afm__kv_pair_avx2(v + (size_t)p * v_stride, v_stride, 0, x, C);
        AFM__UNROLL for (h = 0; h < H; h++) {
            const __m256i w = _mm256_set1_epi32((int32_t)(uint16_t)pr[(size_t)h * ldp + (size_t)p]);
            AFM__UNROLL for (c = 0; c < C; c++) A[h * C + c] = _mm256_add_epi32(A[h * C + c], _mm256_madd_epi16(x[c], w));
        }
    }
    AFM__UNROLL for (h = 0; h < H; h++) {
        const __m256 sv = _mm256_set1_ps(vs[h]);
        AFM__UNROLL for (c = 0; c < C; c++) _mm256_storeu_ps(o + (size_t)h * ldo + (size_t)(8 * c), _mm256_mul_ps(_mm256_cvtepi32_ps(A[h * C + c]), sv));
    }
}

/* 4 heads at a time, 16 columns, then 8, then the columns past the last multiple of 8 in scalar. */
AFM__T_AVX2 static void afm__kv_values_avx2(const int16_t *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                            int n_pos, int dim, const float *vs, float *o, size_t ldo) {
    const int d8 = dim & ~7, d16 = dim & ~15;
    int h0, i;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int16_t *ph = pr + (size_t)h0 * ldp;
        float *oh = o + (size_t)h0 * ldo;
        for (i = 0; i < d8; i += i < d16 ? 16 : 8) {
#define AFM__KVV_CALL(H, C) afm__kvv_tile_avx2(ph, ldp, v + i, v_stride, n_pos, vs + h0, oh + i, ldo, H, C)
#define AFM__KVV_COLS(H) if (i < d16) AFM__KVV_CALL(H, 2); else AFM__KVV_CALL(H, 1)
            switch (nq - h0 < 4 ? nq - h0 : 4) {
            case 4: AFM__KVV_COLS(4); break; case 3: AFM__KVV_COLS(3); break; case 2: AFM__KVV_COLS(2); break; default: AFM__KVV_COLS(1); break;
            }
#undef AFM__KVV_COLS
#undef AFM__KVV_CALL
        }
    }
    if (d8 < dim) afm__kv_values_scalar(pr, ldp, nq, v + d8, v_stride, n_pos, dim - d8, vs, o + d8, ldo); /* the last columns */
}

/* The maximum of x[0 .. n), NaN skipped (from -FLT_MAX, as the scalar kernels start). */
AFM__FORCEINLINE AFM__T_AVX2 float afm__max_avx2(const float *x, int n) {
    __m256 mv = _mm256_set1_ps(-FLT_MAX);
    __m128 h;
    float mx;
    int i;
    for (i = 0; i + 8 <= n; i += 8) mv = _mm256_max_ps(_mm256_loadu_ps(x + i), mv); /* a NaN lane keeps mv */
    h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    mx = _mm_cvtss_f32(h);
    for (; i < n; i++) if (x[i] > mx) mx = x[i];
    return mx;
}

/* afm__softmax16_scalar, 16 at a time: the same operations per lane (max_ps(d, -16) takes a NaN
   d to -16 as the scalar comparison does). */
AFM__T_AVX2 static int32_t afm__softmax16_avx2(const float *x, int n, float *max, int16_t *out) {
    const int n16 = n & ~15;
    const __m256 magic = _mm256_set1_ps(12582912.0f), l2e = _mm256_set1_ps(1.44269502f), lo = _mm256_set1_ps(-16.0f);
    const float mx = afm__max_avx2(x, n);
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256i acc = _mm256_setzero_si256(), c[2];
    int32_t sum, part[8];
    int i, j;
    for (i = 0; i < n16; i += 16) {
        AFM__UNROLL for (j = 0; j < 2; j++) {
            const __m256 d = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8 * j), mxv), lo);
            const __m256 kf = _mm256_sub_ps(_mm256_fmadd_ps(d, l2e, magic), magic), f = _mm256_fmsub_ps(d, l2e, kf);
            __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.33335581e-3f), f, _mm256_set1_ps(9.61812911e-3f));
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.55041087e-2f));
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.40226507e-1f));
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.93147182e-1f));
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
            p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(kf), _mm256_set1_epi32(127)), 23)));
            c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(p, _mm256_set1_ps(32767.0f)));
            acc = _mm256_add_epi32(acc, c[j]);
        }
        _mm256_storeu_si256((__m256i *)(void *)(out + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
    }
    _mm256_storeu_si256((__m256i *)(void *)part, acc);
    sum = part[0] + part[1] + part[2] + part[3] + part[4] + part[5] + part[6] + part[7];
    for (; i < n; i++) { out[i] = (int16_t)afm__exp16_code(x[i] - mx); sum += out[i]; }
    *max = mx + 0.0f; /* -0 as +0: which zero a maximum keeps differs between the levels */
    return sum;
}

/* afm__round16_scalar, 16 at a time: NaN lanes zeroed first (vcvtps2dq would give INT_MIN). */
AFM__T_AVX2 static void afm__round16_avx2(int16_t *out, const float *x, int n, float mul) {
    const __m256 m = _mm256_set1_ps(mul);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        a = _mm256_mul_ps(_mm256_and_ps(a, _mm256_cmp_ps(a, a, _CMP_ORD_Q)), m);
        b = _mm256_mul_ps(_mm256_and_ps(b, _mm256_cmp_ps(b, b, _CMP_ORD_Q)), m);
        _mm256_storeu_si256((__m256i *)(void *)(out + i),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)), 0xD8));
    }
    afm__round16_scalar(out + i, x + i, n - i, mul);
}

/* int8 -> f32 of 8 keys/values */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__i8x8_avx2(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)));
}

/* The afm__sum8 trees of 8 accumulators at once: lanes [A0, A2, A4, A6, A1, A3, A5, A7]. Level 1
   adds each pair's 128-bit halves (l0+l4 .. l3+l7), level 2 lanes 0+2 and 1+3 of each, level 3 the
   two: the same additions as afm__hsum_avx2 does for one, in 7 adds and 14 shuffles instead of 8 x 6. */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__sum8x8_avx2(const __m256 *A) {
    const __m256 v0 = _mm256_add_ps(_mm256_permute2f128_ps(A[0], A[1], 0x20), _mm256_permute2f128_ps(A[0], A[1], 0x31));
    const __m256 v1 = _mm256_add_ps(_mm256_permute2f128_ps(A[2], A[3], 0x20), _mm256_permute2f128_ps(A[2], A[3], 0x31));
    const __m256 v2 = _mm256_add_ps(_mm256_permute2f128_ps(A[4], A[5], 0x20), _mm256_permute2f128_ps(A[4], A[5], 0x31));
    const __m256 v3 = _mm256_add_ps(_mm256_permute2f128_ps(A[6], A[7], 0x20), _mm256_permute2f128_ps(A[6], A[7], 0x31));
    const __m256 y0 = _mm256_add_ps(_mm256_shuffle_ps(v0, v1, 0x44), _mm256_shuffle_ps(v0, v1, 0xEE));
    const __m256 y1 = _mm256_add_ps(_mm256_shuffle_ps(v2, v3, 0x44), _mm256_shuffle_ps(v2, v3, 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(y0, y1, 0x88), _mm256_shuffle_ps(y0, y1, 0xDD));
}

/* Scores of H heads x positions [0, n_pos), P at a time (H * P <= 8; n_pos a multiple of P),
   accumulator h * P + p: each key row is converted once for the H heads and each query vector
   loaded once for the P positions, and the 8 sums share one afm__sum8x8_avx2 (the unused
   accumulators stay 0). H and P are constants after inlining, so the accumulators stay in registers. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__kvsf_tiles_avx2(const float *q, size_t ldq, const int8_t *k, size_t k_stride, int n_pos,
                                                       int dim, float scale, float *s, size_t lds, const int8_t *pf,
                                                       const int H, const int P) {
    const int d8 = dim & ~7;
    const __m256 sv = _mm256_set1_ps(scale);
    int p0, i, h, p;
    for (p0 = 0; p0 < n_pos; p0 += P) {
        const int8_t *kp = k + (size_t)p0 * k_stride;
        __m256 A[8], x[8], sum8;
        float r[8];
        AFM__UNROLL for (h = 0; h < 8; h++) A[h] = _mm256_setzero_ps();
        AFM__UNROLL for (p = 0; p < P; p++) afm__kv_prefetch_avx2(k, k_stride, p0 + p + AFM__KV_PF, n_pos, dim, 0);
        if (pf) AFM__UNROLL for (p = 0; p < P; p++) afm__kv_prefetch_avx2(pf, k_stride, p0 + p, n_pos, dim, 1);
        for (i = 0; i < d8; i += 8) {
            AFM__UNROLL for (p = 0; p < P; p++) x[p] = afm__i8x8_avx2(kp + (size_t)p * k_stride + (size_t)i);
            AFM__UNROLL for (h = 0; h < H; h++) {
                const __m256 qv = _mm256_loadu_ps(q + (size_t)h * ldq + (size_t)i);
                AFM__UNROLL for (p = 0; p < P; p++) A[h * P + p] = _mm256_fmadd_ps(qv, x[p], A[h * P + p]);
            }
        }
        sum8 = afm__sum8x8_avx2(A);
        if (d8 == dim) { /* no tail: the 8 products by the scale at once */
            _mm256_storeu_ps(r, _mm256_mul_ps(sum8, sv));
            AFM__UNROLL for (h = 0; h < H; h++)
                AFM__UNROLL for (p = 0; p < P; p++) s[(size_t)h * lds + (size_t)(p0 + p)] = r[((h * P + p) >> 1) + (((h * P + p) & 1) << 2)];
        } else {
            _mm256_storeu_ps(r, sum8);
            for (h = 0; h < H; h++)
                for (p = 0; p < P; p++) {
                    float sum = r[((h * P + p) >> 1) + (((h * P + p) & 1) << 2)];
                    for (i = d8; i < dim; i++) sum = fmaf(q[(size_t)h * ldq + (size_t)i], (float)kp[(size_t)p * k_stride + (size_t)i], sum);
                    s[(size_t)h * lds + (size_t)(p0 + p)] = sum * scale;
                }
        }
    }
}

/* Positions per score tile for H heads: as many as fill the 8 accumulators. */
#define AFM__KVS_POS(H) ((H) > 4 ? 1 : (H) > 2 ? 2 : (H) == 2 ? 4 : 8)

/* Up to 8 heads at a time (a KV head's group of query heads, in attention): 8 heads x 1 position;
   fewer heads take 2, 4 or 8 positions per tile, and the positions left over one at a time. */
AFM__T_AVX2 static void afm__kv_scores_f_avx2(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                              int n_pos, int dim, float scale, float *s, size_t lds, const int8_t *pf) {
    int h0;
    for (h0 = 0; h0 < nq; h0 += 8) {
        const int nh = nq - h0 < 8 ? nq - h0 : 8, np = n_pos - n_pos % AFM__KVS_POS(nh);
        const float *qh = q + (size_t)h0 * ldq;
        float *sh = s + (size_t)h0 * lds;
        const int8_t *kr = k + (size_t)np * k_stride;
#define AFM__KVSF_CALL(H)                                                                                         \
        afm__kvsf_tiles_avx2(qh, ldq, k, k_stride, np, dim, scale, sh, lds, h0 ? NULL : pf, H, AFM__KVS_POS(H));  \
        if (AFM__KVS_POS(H) > 1) afm__kvsf_tiles_avx2(qh, ldq, kr, k_stride, n_pos - np, dim, scale, sh + np, lds, NULL, H, 1)
        AFM__HEADS_1_TO_8(nh, AFM__KVSF_CALL)
#undef AFM__KVSF_CALL
    }
}

/* Values of H heads x C vectors of 8 columns (H * C <= 12) over every position: each output vector
   is one chain of fma over the positions in order (the contract), so a chain waits for the FMA's
   latency at every position; 12 chains keep both FMA units busy where 8 do not (4 heads x 3 vectors:
   44 against 33 billion FMA/s on Zen 3, 1 core, in cache). Constants H and C keep them in registers. */
AFM__FORCEINLINE AFM__T_AVX2 void afm__kvvf_tile_avx2(const float *pr, size_t ldp, const int8_t *v, size_t v_stride, int n_pos,
                                                      __m256 sv, float *o, size_t ldo, const int H, const int C) {
    __m256 A[12], x[3];
    int p, h, c;
    AFM__UNROLL for (h = 0; h < 12; h++) A[h] = _mm256_setzero_ps();
    for (p = 0; p < n_pos; p++) {
        const int8_t *vp = v + (size_t)p * v_stride;
        afm__kv_prefetch_avx2(v, v_stride, p + AFM__KV_PF, n_pos, 8 * C, 0);
        AFM__UNROLL for (c = 0; c < C; c++) x[c] = afm__i8x8_avx2(vp + 8 * c);
        AFM__UNROLL for (h = 0; h < H; h++) {
            const __m256 w = _mm256_broadcast_ss(pr + (size_t)h * ldp + (size_t)p);
            AFM__UNROLL for (c = 0; c < C; c++) A[h * C + c] = _mm256_fmadd_ps(w, x[c], A[h * C + c]);
        }
    }
    AFM__UNROLL for (h = 0; h < H; h++)
        AFM__UNROLL for (c = 0; c < C; c++) _mm256_storeu_ps(o + (size_t)h * ldo + (size_t)(8 * c), _mm256_mul_ps(A[h * C + c], sv));
}

/* 4 heads x 24 columns where both fit, then each remaining 8 columns for up to 8 heads at a time
   (a KV head's group in attention), then columns past the last multiple of 8 in scalar. */
AFM__T_AVX2 static void afm__kv_values_f_avx2(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                              int n_pos, int dim, float scale, float *o, size_t ldo) {
    const int d8 = dim & ~7, d24 = d8 - d8 % 24, nq4 = nq & ~3;
    const __m256 sv = _mm256_set1_ps(scale);
    int h0, i, h, p;
    for (h0 = 0; h0 < nq4; h0 += 4)
        for (i = 0; i < d24; i += 24)
            afm__kvvf_tile_avx2(pr + (size_t)h0 * ldp, ldp, v + i, v_stride, n_pos, sv, o + (size_t)h0 * ldo + (size_t)i, ldo, 4, 3);
    for (i = 0; i < d8; i += 8)
        for (h0 = i < d24 ? nq4 : 0; h0 < nq; h0 += 8) {
            const float *ph = pr + (size_t)h0 * ldp;
            float *oh = o + (size_t)h0 * ldo + (size_t)i;
#define AFM__KVVF_CALL(H) afm__kvvf_tile_avx2(ph, ldp, v + i, v_stride, n_pos, sv, oh, ldo, H, 1)
            AFM__HEADS_1_TO_8(nq - h0 < 8 ? nq - h0 : 8, AFM__KVVF_CALL)
#undef AFM__KVVF_CALL
        }
    for (h = 0; h < nq; h++)
        for (i = d8; i < dim; i++) {
            float sum = 0.0f;
            for (p = 0; p < n_pos; p++) sum = fmaf(pr[(size_t)h * ldp + (size_t)p], (float)v[(size_t)p * v_stride + (size_t)i], sum);
            o[(size_t)h * ldo + (size_t)i] = sum * scale;
        }
}

AFM__T_AVX2 static void afm__axpy_avx2(float *y, float a, const float *x, int n) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* afm__expf on 8 lanes: the same operations in the same order (out-of-range lanes are computed
   and then replaced, as the scalar branches do). */
AFM__FORCEINLINE AFM__T_AVX2 __m256 afm__expf_avx2(__m256 x) {
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    const __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269502f), magic), magic);
    const __m256i ki = _mm256_cvtps_epi32(k);
    const __m256i s = _mm256_and_si256(_mm256_cmpgt_epi32(ki, _mm256_set1_epi32(127)), _mm256_set1_epi32(1));
    const __m256i b127 = _mm256_set1_epi32(127);
    const __m256 t = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ki, s), b127), 23));
    __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-0.693145751953125f), x), q, y;
    r = _mm256_fmadd_ps(k, _mm256_set1_ps(-1.42860682e-06f), r);
    q = _mm256_fmadd_ps(_mm256_set1_ps(1.98412701e-04f), r, _mm256_set1_ps(1.38888892e-03f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.33333377e-03f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.16666679e-02f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.66666672e-01f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
    y = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_mul_ps(q, t), r, t), _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(s, b127), 23)));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(AFM__EXP_LO), _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(AFM__EXP_HI), _CMP_GE_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

AFM__T_AVX2 static void afm__silu_mul_avx2(float *h, const float *g, int n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(h + i);
        const __m256 e = afm__expf_avx2(_mm256_xor_ps(x, sign));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(g + i)));
    }
    afm__silu_mul_scalar(h + i, g + i, n - i);
}

AFM__T_AVX2 static float afm__expsum_avx2(float *x, int n, float *max) {
    const int n8 = n & ~7;
    const float mx = afm__max_avx2(x, n);
    __m256 acc = _mm256_setzero_ps();
    float sum;
    int i;
    for (i = 0; i < n8; i += 8) {
        const __m256 e = afm__expf_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = afm__hsum_avx2(acc);
    for (; i < n; i++) { x[i] = afm__expf(x[i] - mx); sum += x[i]; }
    *max = mx;
    return sum;
}

/* ---------------------------------------------------------------------------------------- */
/* x86-64: AVX-512 (F, BW, DQ, VL) and AVX-512 VNNI                                        */
/* ---------------------------------------------------------------------------------------- */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push /* g++ 12 flags _mm512_undefined_*() inside its own headers */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

/* Quantized weights at the AVX-512 level use the AVX2 kernels (the contract fixes the float steps
   per 8 lanes; wider vectors only pay off with VNNI's integer dot). With VNNI: the Q4/Q8 row
   kernel's 64-code dot is two 256-bit vpdpbusd (u8 x s8 -> s32, 4 products per lane), and the Q2B
   panel and matrix-matrix kernels do 16 rows x 4 codes per 512-bit vpdpbusd against a broadcast of
   4 activations; attention's integer scores and values take vpdpwssd (int16 pairs, afm__kv_*_vnni). */
AFM__FORCEINLINE AFM__T_VNNI __m256i afm__dot64_vnni(__m256i c0, __m256i c1, const int8_t *x, const int type) {
    __m256i x0 = _mm256_load_si256((const __m256i *)(const void *)x), x1 = _mm256_load_si256((const __m256i *)(const void *)(x + 32));
    if (type == AFM_TYPE_Q8) { /* the weight's sign moved onto x */
        x0 = _mm256_sign_epi8(x0, c0); x1 = _mm256_sign_epi8(x1, c1);
        c0 = _mm256_abs_epi8(c0); c1 = _mm256_abs_epi8(c1);
    }
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), c0, x0), c1, x1);
}
AFM__FORCEINLINE AFM__T_VNNI void afm__qtile_vnni(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                                  int r, int t0, const int T, const int type) {
    AFM__QROW_BODY(afm__dot64_vnni)
}
/* y[0..15] = 0.5 * afm__sum8's tree over one token's 8 lanes of 16 rows (l[j * stride]: sub-blocks
   j mod 8). */
AFM__FORCEINLINE AFM__T_VNNI void afm__gfinish_vnni(const __m512 *l, int stride, float *y) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(l[0], l[4 * stride]), _mm512_add_ps(l[2 * stride], l[6 * stride])),
                                   _mm512_add_ps(_mm512_add_ps(l[stride], l[5 * stride]), _mm512_add_ps(l[3 * stride], l[7 * stride])));
    _mm512_storeu_ps(y, _mm512_mul_ps(s, _mm512_set1_ps(0.5f)));
}
/* The contract's float step for 16 rows, one token and sub-block i (afm__act's index): the exact
   2P less the weights' offset times the activations' sum, times the rows' scales times the
   activations' step, added to the lanes of sub-blocks i mod 8. */
AFM__FORCEINLINE AFM__T_VNNI __m512 afm__pstep_vnni(__m512i p2, __m512 s16, const afm__act *a, size_t i, __m512 lane) {
    const __m512i p = _mm512_sub_epi32(p2, _mm512_set1_epi32(afm__type_off2(AFM_TYPE_Q2B) * a->qs[i]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(s16, _mm512_set1_ps(a->d[i])), lane);
}
/* 16 rows of panel pn x T tokens (3 <= T <= 8), as afm__ptile_avx2 with a whole panel word per
   zmm. Planes 0 and 1 of a word are masked in place (c and 4c), planes 2 and 3 after one shift by
   4 (c and 4c again), so each token needs two vpdpbusd chains, the c's and the 4c's (at most
   8 x 12 x 127 x 4 per lane a sub-block), and 2P = 2 lo + hi / 2 exactly: one shift and four masks
   a word where shifting each plane down took four shifts; and only the lanes in use are zeroed
   (Xeon, 2 threads, a 425984 x 2048 matrix, median of 3: 3 / 4 / 8 tokens 10.92 / 12.44 / 19.67
   -> 10.30 / 12.03 / 18.93 ms). With 3 tokens or more the chains are enough for vpdpbusd's
   latency. This kernel serves every batch size: unpacking panels to bytes first (afm__gtile_*) was
   slower here at every size (Xeon, 1 thread, 2048 x 6656: 8 tokens 102 us a token from panels,
   192 unpacked). */
AFM__FORCEINLINE AFM__T_VNNI void afm__ptile_vnni(const afm__wmat *w, const afm__act *a, int pn, int t0, const int T, float *Y, size_t ldy) {
    const int nsb = w->kpad >> 6;
    const uint8_t *pc = afm__panel_codes(w, pn);
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
    __m512 lanes[8][8]; /* [sub-block % 8][token] */
    int t, sb, v, m;
    AFM__UNROLL for (sb = 0; sb < 8; sb++) AFM__UNROLL for (t = 0; t < T; t++) lanes[sb][t] = _mm512_setzero_ps();
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *cb = pc + (size_t)sb * 256, *sg = afm__panel_scales(w, pn, sb);
        const __m512 s16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)sg));
        __m512i acc[8][2]; /* [token][c, 4c] */
        if (t0 == 0 && AFM__PF_DIST > 0) {
            AFM__UNROLL for (v = 0; v < 4; v++) _mm_prefetch((const char *)cb + AFM__PF_DIST + 64 * v, _MM_HINT_T0);
            _mm_prefetch((const char *)sg + AFM__PF_DIST / 8, _MM_HINT_T0);
        }
        AFM__UNROLL for (t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
        AFM__UNROLL for (v = 0; v < 4; v++) {
            const __m512i W = _mm512_loadu_si512((const void *)(cb + 64 * v)), W4 = _mm512_srli_epi16(W, 4);
            const __m512i c[4] = { _mm512_and_si512(W, m0), _mm512_and_si512(W, m1), _mm512_and_si512(W4, m0), _mm512_and_si512(W4, m1) };
            AFM__UNROLL for (m = 0; m < 4; m++) AFM__UNROLL for (t = 0; t < T; t++) {
                int32_t x4;
                memcpy(&x4, a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + 16 * (size_t)v + 4 * (size_t)m, 4);
                acc[t][m & 1] = _mm512_dpbusd_epi32(acc[t][m & 1], c[m], _mm512_set1_epi32(x4));
            }
        }
        AFM__UNROLL for (t = 0; t < T; t++) {
            const size_t i = (size_t)(t0 + t) * (size_t)a->nsb + (size_t)sb;
            const __m512i p2 = _mm512_add_epi32(_mm512_slli_epi32(acc[t][0], 1), _mm512_srai_epi32(acc[t][1], 1));
            lanes[sb & 7][t] = afm__pstep_vnni(p2, s16, a, i, lanes[sb & 7][t]);
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_vnni(&lanes[0][t], 8, Y + (size_t)t * ldy);
}
/* One or two tokens (decode, short verification) of panels pn[0..NP-1] at once, read in step: a
   core keeps more of memory's bandwidth busy with two sequential streams than with one (Xeon, 1
   thread: 12.4 -> 15.0 GB/s). Each 512-bit panel word is masked into its 4 bit planes in place,
   (W & 3 << 2m) = 4^m c, with no shift: vpdpbusd sums 4^m c x exactly (at most 192 x 127 x 4 per
   lane a word), and one exact shift per plane recovers 2P at the sub-block's end. One vpdpbusd chain
   per plane and token; sub-blocks are independent, so the out-of-order core overlaps their chains.
   Then the contract's float step for 16 rows (afm__pstep_vnni). */
AFM__FORCEINLINE AFM__T_VNNI void afm__ptile2_vnni(const afm__wmat *w, const afm__act *a, const int *pn, const int NP, int t0, const int T,
                                                  float *const *Y, size_t ldy) {
    const int nsb = w->kpad >> 6;
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xc0);
    __m512 lanes[8][2][2]; /* [sub-block % 8][panel][token] */
    int t, sb, v, m, k;
    AFM__UNROLL for (sb = 0; sb < 8; sb++) AFM__UNROLL for (k = 0; k < NP; k++) AFM__UNROLL for (t = 0; t < T; t++) lanes[sb][k][t] = _mm512_setzero_ps();
    for (sb = 0; sb < nsb; sb++) AFM__UNROLL for (k = 0; k < NP; k++) {
        const uint8_t *cb = afm__panel_codes(w, pn[k]) + (size_t)sb * 256, *sg = afm__panel_scales(w, pn[k], sb);
        const __m512 s16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)sg));
        __m512i acc[2][4]; /* [token][plane] */
        if (t0 == 0 && AFM__PF_DIST > 0) {
            AFM__UNROLL for (v = 0; v < 4; v++) _mm_prefetch((const char *)cb + AFM__PF_DIST + 64 * v, _MM_HINT_T0);
            _mm_prefetch((const char *)sg + AFM__PF_DIST / 8, _MM_HINT_T0);
        }
        AFM__UNROLL for (t = 0; t < T; t++) AFM__UNROLL for (m = 0; m < 4; m++) acc[t][m] = _mm512_setzero_si512();
        AFM__UNROLL for (v = 0; v < 4; v++) {
            const __m512i W = _mm512_loadu_si512((const void *)(cb + 64 * v));
            const __m512i c[4] = { _mm512_and_si512(W, m0), _mm512_and_si512(W, m1), _mm512_and_si512(W, m2), _mm512_and_si512(W, m3) };
            AFM__UNROLL for (m = 0; m < 4; m++) AFM__UNROLL for (t = 0; t < T; t++) {
                int32_t x4;
                memcpy(&x4, a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + 16 * (size_t)v + 4 * (size_t)m, 4);
                acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], c[m], _mm512_set1_epi32(x4));
            }
        }
        AFM__UNROLL for (t = 0; t < T; t++) {
            const size_t i = (size_t)(t0 + t) * (size_t)a->nsb + (size_t)sb;
            const __m512i p2 = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(acc[t][0], 1), _mm512_srai_epi32(acc[t][1], 1)),
                                                _mm512_add_epi32(_mm512_srai_epi32(acc[t][2], 3), _mm512_srai_epi32(acc[t][3], 5)));
            lanes[sb & 7][k][t] = afm__pstep_vnni(p2, s16, a, i, lanes[sb & 7][k][t]);
        }
    }
    AFM__UNROLL for (k = 0; k < NP; k++) AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_vnni(&lanes[0][k][t], 4, Y[k] + (size_t)t * ldy);
}
/* (T is a constant after inlining: one or two tokens take the two-token kernel, one panel.) */
#define AFM__PTILE_VNNI(w, a, pn, t, T, Y, ldy)                                                              \
    do {                                                                                                     \
        if ((T) <= 2) { int pn_ = pn; float *y_ = Y; afm__ptile2_vnni(w, a, &pn_, 1, t, (T) <= 2 ? (T) : 1, &y_, ldy); } \
        else afm__ptile_vnni(w, a, pn, t, T, Y, ldy);                                                        \
    } while (0)
AFM__T_VNNI static void afm__panels_q2b_vnni(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__PANEL_BODY(AFM__PTILE_VNNI, 8)
}
/* Decode and two-token verification take the whole panels of r0 .. r1 two at a time, one from each
   half of the range (two streams); other batches, and panels cut by r0 or r1, the panel driver. */
AFM__T_VNNI static void afm__matmul_q2b_vnni(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    const int p0 = (r0 + 15) >> 4, half = ((r1 >> 4) - p0) / 2;
    int i;
    if (a->n_tok > 2 || half < 1) { afm__panels_q2b_vnni(w, a, Y, ldy, r0, r1); return; }
    if (r0 < 16 * p0) afm__panels_q2b_vnni(w, a, Y, ldy, r0, 16 * p0);
    for (i = 0; i < half; i++) {
        const int pn[2] = { p0 + i, p0 + half + i };
        float *const y[2] = { Y + 16 * (size_t)pn[0], Y + 16 * (size_t)pn[1] };
        if (a->n_tok == 1) afm__ptile2_vnni(w, a, pn, 2, 0, 1, y, ldy);
        else afm__ptile2_vnni(w, a, pn, 2, 0, 2, y, ldy);
    }
    afm__panels_q2b_vnni(w, a, Y, ldy, 16 * (p0 + 2 * half), r1);
}
AFM__T_VNNI static void afm__matmul_q4_vnni(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(afm__qtile_vnni, AFM_TYPE_Q4)
}
AFM__T_VNNI static void afm__matmul_q8_vnni(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(afm__qtile_vnni, AFM_TYPE_Q8)
}

/* Attention's integer kernels on AVX-512 VNNI: the AVX2 tiles' arithmetic (int32 sums, exact, so
   the same bits), 32 products a vpdpwssd (multiply and add in one) instead of 16 a vpmaddwd plus
   an add. Scores: one key row widened to int16 in 32-column vectors, each head's sum folded to 8
   lanes, then the AVX2 tile's reduction and transpose. */
AFM__FORCEINLINE AFM__T_VNNI void afm__kvs_tile_vnni(const int16_t *q, size_t ldq, const int8_t *k, size_t k_stride, int n_pos,
                                                     int dim, const float *qs, float *s, size_t lds, const int8_t *pf, const int H) {
    const int d32 = dim & ~31;
    AFM__KVS_TILE_BODY(d32,
        __m512i A[8];
        __m256i F[8];
        AFM__UNROLL for (h = 0; h < 8; h++) A[h] = _mm512_setzero_si512();
        for (i = 0; i < d32; i += 32) {
            const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)(kp + i)));
            AFM__UNROLL for (h = 0; h < H; h++)
                A[h] = _mm512_dpwssd_epi32(A[h], x, _mm512_loadu_si512((const void *)(q + (size_t)h * ldq + (size_t)i)));
        }
        AFM__UNROLL for (h = 0; h < 8; h++) F[h] = _mm256_add_epi32(_mm512_castsi512_si256(A[h]), _mm512_extracti64x4_epi64(A[h], 1));
        tot = afm__sum8x8_epi32_avx2(F);)
}

AFM__T_VNNI static void afm__kv_scores_vnni(const int16_t *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                            int n_pos, int dim, const float *qs, float *s, size_t lds, const int8_t *pf) {
#define AFM__KVS_TILE afm__kvs_tile_vnni
    AFM__KV_SCORES_BODY
#undef AFM__KVS_TILE
}

/* Values: afm__kvv_tile_avx2's interleaved pairs of positions, 16 columns a vector; H heads x C
   vectors (up to 4 x 4) of sums stay in registers. */
AFM__FORCEINLINE AFM__T_VNNI void afm__kvv_tile_vnni(const int16_t *pr, size_t ldp, const int8_t *v, size_t v_stride, int n_pos,
                                                     const float *vs, float *o, size_t ldo, const int H, const int C) {
    __m512i A[4][4], x[4];
    int32_t pair;
    int p, h, c;
    AFM__UNROLL for (h = 0; h < 4; h++) AFM__UNROLL for (c = 0; c < 4; c++) A[h][c] = _mm512_setzero_si512();
    for (p = 0; p < n_pos; p += 2) {
        const int two = p + 1 < n_pos; /* an odd last position pairs with zeros */
        AFM__UNROLL for (c = 0; c < C; c++) {
            const __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(v + (size_t)p * v_stride + (size_t)(16 * c)));
            const __m128i b = two ? _mm_loadu_si128((const __m128i *)(const void *)(v + (size_t)(p + 1) * v_stride + (size_t)(16 * c))) : _mm_setzero_si128();
            x[c] = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(a, b)), _mm_unpackhi_epi8(a, b), 1));
        }
        AFM__UNROLL for (h = 0; h < H; h++) {
            __m512i w;
            if (two) memcpy(&pair, pr + (size_t)h * ldp + (size_t)p, 4); /* pr[p] in the low half, as x's pairs */
            else pair = (int32_t)(uint16_t)pr[(size_t)h * ldp + (size_t)p];
            w = _mm512_set1_epi32(pair);
            AFM__UNROLL for (c = 0; c < C; c++) A[h][c] = _mm512_dpwssd_epi32(A[h][c], x[c], w);
        }
    }
    AFM__UNROLL for (h = 0; h < H; h++) {
        const __m512 sv = _mm512_set1_ps(vs[h]);
        AFM__UNROLL for (c = 0; c < C; c++) _mm512_storeu_ps(o + (size_t)h * ldo + (size_t)(16 * c), _mm512_mul_ps(_mm512_cvtepi32_ps(A[h][c]), sv));
    }
}

/* 4 heads x 64 columns at a time; columns past the last multiple of 16 by the AVX2 kernel. */
AFM__T_VNNI static void afm__kv_values_vnni(const int16_t *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                            int n_pos, int dim, const float *vs, float *o, size_t ldo) {
    const int d16 = dim & ~15;
    int h0, i;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int16_t *ph = pr + (size_t)h0 * ldp;
        float *oh = o + (size_t)h0 * ldo;
        for (i = 0; i < d16; i += 64) {
            const int nc = (d16 - i) / 16 < 4 ? (d16 - i) / 16 : 4;
#define AFM__KVV_CALL(H, C) afm__kvv_tile_vnni(ph, ldp, v + i, v_stride, n_pos, vs + h0, oh + i, ldo, H, C)
#define AFM__KVV_COLS(H) switch (nc) { case 4: AFM__KVV_CALL(H, 4); break; case 3: AFM__KVV_CALL(H, 3); break; case 2: AFM__KVV_CALL(H, 2); break; default: AFM__KVV_CALL(H, 1); break; }
            switch (nq - h0 < 4 ? nq - h0 : 4) {
            case 4: AFM__KVV_COLS(4); break; case 3: AFM__KVV_COLS(3); break; case 2: AFM__KVV_COLS(2); break; default: AFM__KVV_COLS(1); break;
            }
#undef AFM__KVV_COLS
#undef AFM__KVV_CALL
        }
    }
    if (d16 < dim) afm__kv_values_avx2(pr, ldp, nq, v + d16, v_stride, n_pos, dim - d16, vs, o + d16, ldo); /* the last columns */
}

#ifdef AFM__AMX
/* AMX-INT8 (Sapphire Rapids and later): batches of Q2B. One TDPBSSD multiplies T tokens' 64
   activations of a sub-block (straight from afm__act) by the sub-block's codes of 16 rows as signed
   bytes 2c - 3 in the tile layout ([k/4][row][4]) into T x 16 int32: each is the contract's
   P = 2 c.q - 3 sum(q) of one row and token, exact. The float step per token and 16 rows is
   afm__ptile_vnni's, so the bits are the same. Sub-blocks are taken lane by lane (0, 8, 16, ..,
   then 1, 9, ..): each lane's sum still grows in sub-block order, and a lane's T accumulators stay
   in registers. Two tile products are in flight (tiles 0, 2, 4 and 1, 3, 5: sums, activations,
   codes); the tiles run in order, so the next product starts before this one's sums are stored. */
#define AFM__AMX_Q4_MIN 4 /* tokens from which a Q4 batch (the output head) takes the tiles */
/* A Q2B batch takes the tiles from 5 tokens: at 4 the VNNI panel kernel is as fast or faster.
   A 4-token step against a 1-token step just before it (median of 21 pairs), 16-core Xeon (AVX-512
   VNNI, AMX): on the tiles 1.90 steps at 8 threads, 1.78 at 16, 2.02 at 2; on the panel kernel
   1.52, 1.34, 1.83. Emerald Rapids 2-core, 2 threads: the same within the noise. From 5 tokens the
   tiles win on the 2-core (5 / 6 tokens 1.84 / 1.77 steps against 2.17 / 2.16) but not on that
   16-core at 8 threads (5 tokens 2.01 against 1.65). */
#define AFM__AMX_Q2B_MIN 5
/* gcc's tile loads (an asm statement without a memory operand, up to at least gcc 12) do not
   tell the compiler that they read memory, which would let it move the vector stores that fill a
   tile's bytes after the load; this barrier (no instruction) keeps them before. (clang's tile
   builtins read memory as far as the compiler knows.) */
#define AFM__TILE_FENCE() __asm__ volatile("" ::: "memory")

/* The whole blocks of 16 rows in r0 .. r1-1: [lo, hi) (the rows around them go to a row kernel). */
static inline void afm__whole16(int r0, int r1, int *lo, int *hi) {
    *lo = !(r0 & 15) ? r0 : (r0 | 15) + 1 < r1 ? (r0 | 15) + 1 : r1;
    *hi = *lo + (r1 - *lo) / 16 * 16;
}
typedef struct afm__tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} afm__tilecfg;

AFM__T_AMX static void afm__amx_config(int T) {
    afm__tilecfg c;
    int i;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (i = 0; i < 6; i++) { c.rows[i] = (uint8_t)(i < 4 ? T : 16); c.colsb[i] = 64; }
    _tile_loadconfig(&c);
}

/* Sub-block sb of panel codes pc as 1 KB of signed codes 2c - 3 in the tile layout: a panel word's
   bit pairs 0-2 each by one byte permute (vpermb looks up the low 6 bits: tab[m][x] = 2 ((x >> 2m)
   & 3) - 3), pair 3 after a shift (bits 6-7 to 0-1; tab[0] ignores the bits above). */
AFM__FORCEINLINE AFM__T_AMX void afm__amx_unpack_sb(const uint8_t *pc, int sb, const __m512i *tab, int8_t *dst) {
    int v;
    AFM__UNROLL for (v = 0; v < 4; v++) {
        const __m512i W = _mm512_loadu_si512((const void *)(pc + (size_t)sb * 256 + 64 * v));
        _mm512_store_si512((void *)(dst + (size_t)(4 * v) * 64), _mm512_permutexvar_epi8(W, tab[0]));
        _mm512_store_si512((void *)(dst + (size_t)(4 * v + 1) * 64), _mm512_permutexvar_epi8(W, tab[1]));
        _mm512_store_si512((void *)(dst + (size_t)(4 * v + 2) * 64), _mm512_permutexvar_epi8(W, tab[2]));
        _mm512_store_si512((void *)(dst + (size_t)(4 * v + 3) * 64), _mm512_permutexvar_epi8(_mm512_srli_epi16(W, 6), tab[0]));
    }
}

/* afm__amx_unpack_sb's tables: tab[m][x] = 2 ((x >> 2m) & 3) - 3 for the 64 byte values x. */
AFM__FORCEINLINE AFM__T_AMX void afm__amx_tables(__m512i tab[3]) {
    const __m512i lut = _mm512_set4_epi32(0, 0, 0, 0x0301fffd), iota = _mm512_set_epi32( /* -3, -1, 1, 3; bytes 0..63 */
        0x3f3e3d3c, 0x3b3a3938, 0x37363534, 0x33323130, 0x2f2e2d2c, 0x2b2a2928, 0x27262524, 0x23222120,
        0x1f1e1d1c, 0x1b1a1918, 0x17161514, 0x13121110, 0x0f0e0d0c, 0x0b0a0908, 0x07060504, 0x03020100);
    int m;
    for (m = 0; m < 3; m++) tab[m] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(iota, (unsigned)(2 * m)), _mm512_set1_epi8(3)));
}

/* A panel's 16 fp16 scales of sub-block sb as f32. */
AFM__FORCEINLINE AFM__T_AMX __m512 afm__amx_scales(const afm__wmat *w, int pn, int sb) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)afm__panel_scales(w, pn, sb)));
}

/* The next sub-block in lane order, -1 after the last. */
static inline int afm__amx_next(int sb, int nsb) {
    return sb + 8 < nsb ? sb + 8 : (sb & 7) + 1 < 8 && (sb & 7) + 1 < nsb ? (sb & 7) + 1 : -1;
}

/* The float step of sub-block sb (of nsb) for T tokens from its sums P, with the rows' scales s16;
   d: the tokens' activation scales, ldd apart. A lane's last sub-block parks the accumulators in
   lanes[sb % 8]. */
AFM__FORCEINLINE AFM__T_AMX void afm__amx_step(__m512 *acc, __m512 (*lanes)[16], const int32_t *P, __m512 s16,
                                               const float *d, size_t ldd, int nsb, int sb, const int T) {
    int t; /* (loops of 16 with a test, not of T: unrolled whole even where T is not a constant) */
    AFM__UNROLL for (t = 0; t < 16; t++)
        if (t < T)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(P + 16 * t))),
                                     _mm512_mul_ps(s16, _mm512_set1_ps(d[(size_t)t * ldd + (size_t)sb])), acc[t]);
    if (sb + 8 >= nsb)
        AFM__UNROLL for (t = 0; t < 16; t++)
            if (t < T) { lanes[sb & 7][t] = acc[t]; acc[t] = _mm512_setzero_ps(); }
}

/* Sub-block sb's tile product into tile C (activations in A, codes in B from the ring slot). */
#define AFM__AMX_PRODUCT(C, A, B, sb, slot)                      \
    do {                                                         \
        AFM__TILE_FENCE();                                       \
        _tile_zero(C);                                           \
        _tile_loadd(A, q + (size_t)(sb) * 64, ldq);              \
        _tile_loadd(B, ring[(slot) & 3], 64);                    \
        _tile_dpbssd(C, A, B);                                   \
    } while (0)
/* Sub-block sb two products ahead: its codes unpacked into its ring slot (a tile load right after
   the vector stores of its bytes waits for them to reach the cache), its activations prefetched
   (their rows are a row of activations apart, which the hardware prefetchers do not follow), and
   into L2 the same sub-block of the next two panels: the codes, read in lane order, are no stream
   the hardware follows either, and a short batch (verification) reads them from memory. 4 tokens
   from a 920 MB matrix at 2 threads: the panel after next added, 44.6 -> 43.2 ms (2048 columns);
   the next panel into L2 instead of L1, 45.4 -> 43.7 (6656 columns: in L1, 26 KB ahead, it
   evicted the activations). */
#define AFM__AMX_AHEAD(sb, slot)                                                                            \
    do {                                                                                                    \
        if ((sb) >= 0) {                                                                                    \
            afm__amx_unpack_sb(pc, sb, tab, ring[(slot) & 3]);                                              \
            for (t = 0; t < T; t++) _mm_prefetch((const char *)(q + (size_t)t * ldq + (size_t)(sb) * 64), _MM_HINT_T0); \
            for (t = 0; t < 4; t++) _mm_prefetch((const char *)(pc_next + (size_t)(sb) * 256 + 64 * t), _MM_HINT_T1); \
            for (t = 0; t < 4; t++) _mm_prefetch((const char *)(pc_next2 + (size_t)(sb) * 256 + 64 * t), _MM_HINT_T1); \
            if (!((sb) & ((1 << w->gshift) - 1))) _mm_prefetch((const char *)afm__panel_scales(w, pn + 1, sb), _MM_HINT_T0); \
        }                                                                                                   \
    } while (0)

/* Panel pn x T tokens from t0 (1 <= T <= 16, the tiles configured for T rows) into Y's rows r..;
   tab: afm__amx_tables. */
AFM__FORCEINLINE AFM__T_AMX void afm__gtile_amx(const afm__wmat *w, int pn, const afm__act *a, float *Y, size_t ldy, int r, int t0, const int T,
                                               const __m512i *tab) {
    AFM__ALIGN(64) int32_t P[4][16 * 16];
    AFM__ALIGN(64) int8_t ring[4][1024];
    __m512 lanes[8][16], acc[16]; /* lanes: [sub-block % 8][token], parked by afm__amx_step */
    const int nsb = w->kpad >> 6;
    const uint8_t *pc = afm__panel_codes(w, pn), *pc_next = afm__panel_codes(w, pn + 1), *pc_next2 = afm__panel_codes(w, pn + 2); /* (past the last: prefetches do not fault) */
    const int8_t *q = a->q + (size_t)t0 * (size_t)a->kpad;
    const float *d = a->d + (size_t)t0 * (size_t)a->nsb;
    const size_t ldq = (size_t)a->kpad;
    int t, j, i = 0, prev = 0, cur = 0, nx = afm__amx_next(0, nsb), n2 = nx >= 0 ? afm__amx_next(nx, nsb) : -1;
    AFM__UNROLL for (t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    for (j = nsb; j < 8; j++) for (t = 0; t < T; t++) lanes[j][t] = _mm512_setzero_ps();
    AFM__AMX_AHEAD(cur, 0);
    AFM__AMX_AHEAD(nx, 1);
    AFM__AMX_PRODUCT(0, 2, 4, cur, 0);
    /* One step: the next sub-block's product into tiles (CN, AN, BN), this one's sums out of tile
       CC, and the float step of the one before (a load right after a tile store waits for it to
       reach the cache). Tile numbers are immediates, so a loop pass is two steps that swap the tile
       sets. */
#define AFM__AMX_STEP(CN, AN, BN, CC)                                                                        \
        AFM__AMX_AHEAD(n2, i + 2);                                                                           \
        if (nx >= 0) AFM__AMX_PRODUCT(CN, AN, BN, nx, i + 1);                                                \
        _tile_stored(CC, P[i & 3], 64);                                                                      \
        if (i) afm__amx_step(acc, lanes, P[(i - 1) & 3], afm__amx_scales(w, pn, prev), d, (size_t)a->nsb, nsb, prev, T); \
        if (nx < 0) break;                                                                                   \
        i++; prev = cur; cur = nx; nx = n2; n2 = nx >= 0 ? afm__amx_next(nx, nsb) : -1
    for (;;) {
        AFM__AMX_STEP(1, 3, 5, 0);
        AFM__AMX_STEP(0, 2, 4, 1);
    }
#undef AFM__AMX_STEP
    afm__amx_step(acc, lanes, P[i & 3], afm__amx_scales(w, pn, cur), d, (size_t)a->nsb, nsb, cur, T);
    for (t = 0; t < T; t++) afm__gfinish_vnni(&lanes[0][t], 16, Y + (size_t)(t0 + t) * ldy + (size_t)r);
}
#undef AFM__AMX_PRODUCT
#undef AFM__AMX_AHEAD

/* Whole panels of rows r0 .. r1-1, 16 tokens at a time (the rest in one tile): the 16 tokens'
   activations stay in the cache while the panels pass. A panel cut by r0 or r1 goes to the VNNI
   panel kernel. (No scratch: unpacking each panel once for all tokens measured slower than
   unpacking it per 16 tokens on the way, 2048 x 6656, 64 tokens: 31.5 against 25.6 us a token.) */
AFM__T_AMX static void afm__gemm_q2b_amx(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1, void *scratch) {
    __m512i tab[3];
    int lo, hi, t, T, r;
    (void)scratch;
    afm__amx_tables(tab);
    afm__whole16(r0, r1, &lo, &hi);
    if (r0 < lo) afm__matmul_q2b_vnni(w, a, Y, ldy, r0, lo);
    for (t = 0; t < a->n_tok && lo < hi; t += T) {
        T = a->n_tok - t < 16 ? a->n_tok - t : 16;
        if (t == 0 || T < 16) afm__amx_config(T);
        for (r = lo; r < hi; r += 16) afm__gtile_amx(w, r >> 4, a, Y, ldy, r, t, T, tab);
    }
    if (lo < hi) _tile_release();
    if (hi < r1) afm__matmul_q2b_vnni(w, a, Y, ldy, hi, r1);
}
/* AMX-INT8: batches of Q4 (the output head, when a verification wants every position's logits).
   A Q4 matrix stays row by row as the file has it, so here the rows are the tile product's left
   operand (16 rows x the 64 codes of a sub-block, a byte each) and the tokens its right one (their
   activations rearranged once per call into the tile layout [k/4][token][4]). A row's 64-byte
   block holds sub-block 2b in its low nibbles and 2b+1 in its high ones: masked, with no shift,
   they are c and 16c, and the second's product is 16 P, exact. The sums come out per row and
   token; the float step takes them in that order, each lane one row and one token, with the row
   kernels' operations ((2P - 15 Q) * (S * d) into the lane of sub-block mod 8, then the same tree):
   the same bits. */
AFM__T_AMX static void afm__amx_config_q4(int T) {
    afm__tilecfg c;
    int i;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (i = 0; i < 6; i++) { c.rows[i] = 16; c.colsb[i] = (uint16_t)(i == 2 || i == 3 ? 64 : 4 * T); } /* sums, codes, activations */
    _tile_loadconfig(&c);
}

/* Tokens t0 .. t0+T-1 of a, rearranged for afm__q4tile_amx: bt[sb] the activation tile of
   sub-block sb (row k/4 holds the tokens' activations k .. k+3 side by side, rows 64 bytes apart),
   dT[sb][t] = d and qT[sb][t] = 15 Q (0 past T). */
static void afm__amx_q4_acts(const afm__act *a, int t0, int T, int nsb, int8_t *bt, float *dT, int32_t *qT) {
    int sb, k, t;
    for (sb = 0; sb < nsb; sb++) {
        for (k = 0; k < 16; k++)
            for (t = 0; t < T; t++)
                memcpy(bt + (size_t)(sb * 16 + k) * (size_t)(4 * T) + 4 * (size_t)t, a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + 4 * k, 4);
        for (t = 0; t < 16; t++) {
            dT[sb * 16 + t] = t < T ? a->d[(size_t)(t0 + t) * (size_t)a->nsb + (size_t)sb] : 0.0f;
            qT[sb * 16 + t] = t < T ? 15 * a->qs[(size_t)(t0 + t) * (size_t)a->nsb + (size_t)sb] : 0;
        }
    }
}

/* The 64-byte blocks b of 16 rows (row_bytes apart) masked into c (low nibbles) and 16c. */
AFM__FORCEINLINE AFM__T_AMX void afm__amx_q4_unpack(const uint8_t *rows, size_t row_bytes, int b, uint8_t (*dst)[1024]) {
    const __m512i lo = _mm512_set1_epi8(0x0f), hi = _mm512_set1_epi8((char)0xf0);
    int m;
    AFM__UNROLL for (m = 0; m < 16; m++) {
        const __m512i W = _mm512_loadu_si512((const void *)(rows + (size_t)m * row_bytes + 64 * (size_t)b));
        _mm512_store_si512((void *)(dst[0] + 64 * m), _mm512_and_si512(W, lo));
        _mm512_store_si512((void *)(dst[1] + 64 * m), _mm512_and_si512(W, hi));
    }
}

/* The float step of sub-block sb from its sums P ([row][token], 16 x T; the high nibbles' are 16
   P): lane[i] += (2P - 15 Q) * (S * d) for the 16 (row, token) pairs of vector i, the rows' and
   tokens' factors put in place by the permutes im[i] (row of each element) and it[i] (token). */
AFM__FORCEINLINE AFM__T_AMX void afm__amx_q4_step(__m512 *lane, const int32_t *P, const int high, __m512 s16, const float *dT,
                                                  const int32_t *qT, const __m512i *im, const __m512i *it, const int T) {
    const __m512 dv = _mm512_load_ps(dT);
    const __m512i qv = _mm512_load_si512((const void *)qT);
    int i;
    AFM__UNROLL for (i = 0; i < 16; i++)
        if (i < T) {
            const __m512i z = _mm512_load_si512((const void *)(P + 16 * i));
            const __m512i p2 = _mm512_sub_epi32(high ? _mm512_srai_epi32(z, 3) : _mm512_slli_epi32(z, 1), _mm512_permutexvar_epi32(it[i], qv));
            lane[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), _mm512_mul_ps(_mm512_permutexvar_ps(im[i], s16), _mm512_permutexvar_ps(it[i], dv)), lane[i]);
        }
}

/* A sub-block's tile product: sums in tile C, codes in A, activations in B (tile numbers are
   immediates). */
#define AFM__AMX_Q4_PRODUCT(C, A, B, codes, acts)         \
    do {                                                  \
        AFM__TILE_FENCE();                                \
        _tile_zero(C);                                    \
        _tile_loadd(A, codes, 64);                        \
        _tile_loadd(B, acts, 4 * T);                      \
        _tile_dpbusd(C, A, B);                            \
    } while (0)

/* Rows r .. r+15 x T tokens from t0 (the tiles configured for T) into Y. Blocks of the 16 rows are
   masked two ahead of their products (a tile load right after the vector stores of its bytes
   waits for them to reach the cache), and two tile products are in flight (tiles 0, 2, 4 and 1, 3,
   5: the tiles run in order, so the next product starts before this one's sums are stored). The
   next 16 rows are prefetched on the way: their blocks, 16 rows apart, are no stream a hardware
   prefetcher follows. sF: room for the rows' scales; ring, P: 64-byte aligned buffers. */
AFM__FORCEINLINE AFM__T_AMX void afm__q4tile_amx(const afm__wmat *w, int r, int t0, const int T, const int8_t *bt, const float *dT, const int32_t *qT,
                                                float *sF, uint8_t (*ring)[2][1024], int32_t (*P)[256], const __m512i *im, const __m512i *it,
                                                float *Y, size_t ldy) {
    AFM__ALIGN(64) float y[256];
    __m512 lanes[8][16];
    const int nsb = w->kpad >> 6, nb = nsb >> 1, ng = w->n_groups, gs = w->gshift;
    const size_t rb = w->row_bytes;
    const uint8_t *rows = w->data + (size_t)r * rb, *next = rows + 16 * rb; /* (past the last: prefetches do not fault) */
    const uint8_t *sc = w->scales + (size_t)r * (size_t)ng * 2;
    const __m512i vm = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(ng));
    int m, b, i, j;
    /* sub-block sb's float step, two sub-blocks behind its tile store (a load right after a tile
       store waits for it to reach the cache) */
#define AFM__AMX_Q4_STEP(sb, high)                                                                                              \
    afm__amx_q4_step(lanes[(sb) & 7], P[(sb) & 3], high, _mm512_i32gather_ps(vm, sF + ((sb) >> gs), 4), dT + 16 * (sb), qT + 16 * (sb), \
                     im, it, T)
    for (i = 0; i < ng; i++) { /* the 16 rows' scales (consecutive) as f32, row by row; a gather takes a group's */
        _mm512_store_ps(sF + 16 * i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(sc + 32 * (size_t)i))));
        _mm_prefetch((const char *)(sc + 32 * (size_t)ng) + 32 * i, _MM_HINT_T0); /* the next rows' */
    }
    for (j = 0; j < 8; j++) AFM__UNROLL for (i = 0; i < 16; i++) if (i < T) lanes[j][i] = _mm512_setzero_ps();
    afm__amx_q4_unpack(rows, rb, 0, ring[0]);
    if (nb > 1) afm__amx_q4_unpack(rows, rb, 1, ring[1]);
    AFM__AMX_Q4_PRODUCT(0, 2, 4, ring[0][0], bt);
    for (b = 0; b < nb; b++) {
        const int sb = 2 * b;
        if (b + 2 < nb) afm__amx_q4_unpack(rows, rb, b + 2, ring[(b + 2) & 3]);
        for (m = 0; m < 16; m++) _mm_prefetch((const char *)(next + (size_t)m * rb + 64 * (size_t)b), _MM_HINT_T1);
        AFM__AMX_Q4_PRODUCT(1, 3, 5, ring[b & 3][1], bt + (size_t)(sb + 1) * (size_t)(64 * T));
        _tile_stored(0, P[sb & 3], 4 * T);
        if (b) AFM__AMX_Q4_STEP(sb - 2, 0);
        if (b + 1 < nb) AFM__AMX_Q4_PRODUCT(0, 2, 4, ring[(b + 1) & 3][0], bt + (size_t)(sb + 2) * (size_t)(64 * T));
        _tile_stored(1, P[(sb + 1) & 3], 4 * T);
        if (b) AFM__AMX_Q4_STEP(sb - 1, 1);
    }
    AFM__AMX_Q4_STEP(nsb - 2, 0);
    AFM__AMX_Q4_STEP(nsb - 1, 1);
#undef AFM__AMX_Q4_STEP
    for (i = 0; i < T; i++) afm__gfinish_vnni(&lanes[0][i], 16, y + 16 * i);
    for (m = 0; m < 16; m++)
        for (i = 0; i < T; i++) Y[(size_t)(t0 + i) * ldy + (size_t)(r + m)] = y[m * T + i];
}
#undef AFM__AMX_Q4_PRODUCT

/* Whole blocks of 16 rows of r0 .. r1-1, 16 tokens at a time (the rest in one tile); rows cut by
   r0 or r1 go to the VNNI row kernel. Scratch (afm__gemm_scratch_size): the activation tiles,
   the tokens' d and 15 Q, the scales of 16 rows, the masked codes and the sums. */
AFM__T_AMX static void afm__gemm_q4_amx(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1, void *scratch) {
    const int nsb = w->kpad >> 6;
    unsigned char *s = (unsigned char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    int8_t *bt = (int8_t *)s;
    float *dT = (float *)(void *)(s + (size_t)nsb * 1024);
    int32_t *qT = (int32_t *)(void *)(s + (size_t)nsb * 1088);
    float *sF = (float *)(void *)(s + (size_t)nsb * 1152);
    uint8_t (*ring)[2][1024] = (uint8_t (*)[2][1024])(void *)(s + (size_t)nsb * 1152 + (size_t)w->n_groups * 64); /* [4] */
    int32_t (*P)[256] = (int32_t (*)[256])(void *)(ring + 4);                                                    /* [4] */
    __m512i im[16], it[16];
    int lo, hi, t, T, r, i;
    afm__whole16(r0, r1, &lo, &hi);
    if (r0 < lo) afm__matmul_q4_vnni(w, a, Y, ldy, r0, lo);
    for (t = 0; t < a->n_tok && lo < hi; t += T) {
        T = a->n_tok - t < 16 ? a->n_tok - t : 16;
        afm__amx_q4_acts(a, t, T, nsb, bt, dT, qT);
        for (i = 0; i < T; i++) {
            AFM__ALIGN(64) int32_t e[16];
            int l;
            for (l = 0; l < 16; l++) e[l] = (16 * i + l) / T;
            im[i] = _mm512_load_si512((const void *)e);
            for (l = 0; l < 16; l++) e[l] = (16 * i + l) % T;
            it[i] = _mm512_load_si512((const void *)e);
        }
        afm__amx_config_q4(T);
        for (r = lo; r < hi; r += 16) afm__q4tile_amx(w, r, t, T, bt, dT, qT, sF, ring, P, im, it, Y, ldy);
    }
    if (lo < hi) _tile_release();
    if (hi < r1) afm__matmul_q4_vnni(w, a, Y, ldy, hi, r1);
}

#endif /* AFM__AMX */

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

#ifdef AFM__AMX
/* Linux hands the AMX tile state (8 KB per thread) only to a process that asks for it:
   arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), a raw system call here so that afm.h needs
   no feature-test macros. Granted once for the whole process; asking again is harmless. A kernel
   that refuses (older than 5.16, some sandboxes) leaves the process at the VNNI level. */
static long afm__arch_prctl(long code, unsigned long arg) { return afm__syscall3(158 /* SYS_arch_prctl */, (uintptr_t)code, arg, 0); }
static int afm__amx_granted(void) {
    unsigned long features = 0;
    if (afm__arch_prctl(0x1022 /* ARCH_GET_XCOMP_PERM */, (unsigned long)(uintptr_t)&features) == 0 && (features & (1ul << 18)))
        return 1;
    return afm__arch_prctl(0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
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
#ifdef AFM__AMX
    /* AMX-TILE (edx 24), AMX-INT8 (edx 25; r[3] still holds cpuid(7, 0)'s edx), AVX512_VBMI (ecx 1:
       the codes' byte permutes); tile config and data state (xcr0 bits 17-18) */
    if ((r[3] & (3u << 24)) == (3u << 24) && (ecx7 & (1u << 1)) && (xcr0 & (3ull << 17)) == (3ull << 17) && afm__amx_granted())
        return AFM__LEVEL_AMX;
#endif
    return AFM__LEVEL_AVX512VNNI;
}

/* Where the x86 levels stand among themselves (AMX is numbered after the arm64 ones); the arm64
   levels rank above every x86 one, so asking for them here never lowers the x86 level. */
static int afm__x86_rank(int level) {
    return level == AFM__LEVEL_AMX ? AFM__LEVEL_AVX512VNNI + 1 : level <= AFM__LEVEL_AVX512VNNI ? level : AFM__LEVEL_MAX;
}
#endif /* AFM__X86 */

/* ---- arm64: NEON (baseline) and the dot-product extension (compile time) ---- */
#ifdef AFM__NEON

/* afm__sum8's tree on lanes 0-3 (lo) and 4-7 (hi). */
static inline float afm__hsum8_neon(float32x4_t lo, float32x4_t hi) {
    const float32x4_t m = vaddq_f32(lo, hi);                      /* l0+l4, l1+l5, l2+l6, l3+l7 */
    const float32x2_t h = vadd_f32(vget_low_f32(m), vget_high_f32(m)); /* (l0+l4)+(l2+l6), (l1+l5)+(l3+l7) */
    return vget_lane_f32(h, 0) + vget_lane_f32(h, 1);
}

static void afm__prepare_q8_neon(afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    int t, b, i;
    for (t = t0; t < t1; t++) {
        const float *x = X + (size_t)t * ldx;
        int8_t *q = a->q + (size_t)t * (size_t)a->kpad;
        float *d = a->d + (size_t)t * (size_t)a->nsb;
        int32_t *qs = a->qs + (size_t)t * (size_t)a->nsb;
        for (b = 0; b < a->nsb; b++) {
            const int n = a->n_in - b * 64;
            float32x4_t v[16], vid;
            uint32x4_t mx = vdupq_n_u32(0);
            int32x4_t s = vdupq_n_s32(0);
            uint32_t amax_bits;
            float amax, id;
            if (n < 64) {
                afm__q8_block_scalar(x + b * 64, n < 0 ? 0 : n, q + b * 64, d + b, qs + b);
                continue;
            }
            for (i = 0; i < 16; i++) { /* max of |x| as integers (afm__abs_bits) */
                v[i] = vld1q_f32(x + b * 64 + 4 * i);
                mx = vmaxq_u32(mx, vandq_u32(vreinterpretq_u32_f32(v[i]), vdupq_n_u32(0x7fffffffu)));
            }
            amax_bits = vmaxvq_u32(mx);
            if (amax_bits >= AFM__AMAX_INF || amax_bits < AFM__AMAX_TINY) {
                afm__q8_block_scalar(x + b * 64, 64, q + b * 64, d + b, qs + b);
                continue;
            }
            memcpy(&amax, &amax_bits, 4);
            id = 127.0f / amax;
            vid = vdupq_n_f32(id);
            for (i = 0; i < 16; i += 4) {
                int32x4_t a0 = vcvtnq_s32_f32(vmulq_f32(v[i + 0], vid)), a1 = vcvtnq_s32_f32(vmulq_f32(v[i + 1], vid));
                int32x4_t a2 = vcvtnq_s32_f32(vmulq_f32(v[i + 2], vid)), a3 = vcvtnq_s32_f32(vmulq_f32(v[i + 3], vid));
                int16x8_t h0 = vcombine_s16(vmovn_s32(a0), vmovn_s32(a1)), h1 = vcombine_s16(vmovn_s32(a2), vmovn_s32(a3));
                s = vaddq_s32(s, vaddq_s32(vaddq_s32(a0, a1), vaddq_s32(a2, a3)));
                vst1q_s8(q + b * 64 + 4 * i, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
            }
            d[b] = amax / 127.0f;
            qs[b] = vaddvq_s32(s);
        }
    }
}

/* 64 codes . 64 activations as 4 int32 lanes that sum to the exact dot. Codes are at most 15 (Q4)
   or int8 (Q8): two products per int16 lane stay below 2^15 in the plain NEON path. */
AFM__FORCEINLINE int32x4_t afm__dot64_neon(const int8x16_t *cq, const int8_t *x, const int dot) {
    const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16), x2 = vld1q_s8(x + 32), x3 = vld1q_s8(x + 48);
#ifdef AFM__NEON_DOT
    if (dot) return vdotq_s32(vdotq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), cq[0], x0), cq[1], x1), cq[2], x2), cq[3], x3);
#endif
    (void)dot;
    {
        const int16x8_t a = vmlal_s8(vmull_s8(vget_low_s8(cq[0]), vget_low_s8(x0)), vget_low_s8(cq[2]), vget_low_s8(x2));
        const int16x8_t b = vmlal_high_s8(vmull_high_s8(cq[0], x0), cq[2], x2);
        const int16x8_t e = vmlal_s8(vmull_s8(vget_low_s8(cq[1]), vget_low_s8(x1)), vget_low_s8(cq[3]), vget_low_s8(x3));
        const int16x8_t f = vmlal_high_s8(vmull_high_s8(cq[1], x1), cq[3], x3);
        return vaddq_s32(vaddq_s32(vpaddlq_s16(a), vpaddlq_s16(b)), vaddq_s32(vpaddlq_s16(e), vpaddlq_s16(f)));
    }
}

/* Codes of sub-block k (of SBB) of a 64-byte block, read as afm__codes_avx2 does. */
AFM__FORCEINLINE void afm__codes_neon(const uint8x16_t *v, int k, const int type, int8x16_t *cq) {
    int i;
    for (i = 0; i < 4; i++) {
        if (type == AFM_TYPE_Q4)
            cq[i] = vreinterpretq_s8_u8(k ? vshrq_n_u8(v[i], 4) : vandq_u8(v[i], vdupq_n_u8(15)));
        else
            cq[i] = vreinterpretq_s8_u8(v[i]);
    }
}

/* The contract's float step for 4 sub-blocks (P: their dots) of one token. */
AFM__FORCEINLINE float32x4_t afm__qstep_neon(int32x4_t P, float32x4_t S, const float *d, const int32_t *qs, const int type, float32x4_t acc) {
    int32x4_t p2 = vshlq_n_s32(P, 1);
    if (type != AFM_TYPE_Q8) p2 = vsubq_s32(p2, vmulq_n_s32(vld1q_s32(qs), afm__type_off2(type)));
    return vfmaq_f32(acc, vcvtq_f32_s32(p2), vmulq_f32(S, vld1q_f32(d)));
}

/* As afm__qtile_avx2 (Q4, Q8): 8 sub-blocks at a time, their dots reduced pairwise to two vectors
   (sub-blocks c..c+3 and c+4..c+7), one float step each. */
AFM__FORCEINLINE void afm__qtile_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                      int r, int t0, const int T, const int type, const int dot) {
    const int SBB = type == AFM_TYPE_Q4 ? 2 : 1;
    const int nsb = w->kpad >> 6;
    const uint8_t *row = w->data + (size_t)r * w->row_bytes;
    const uint8_t *sc = w->scales + (size_t)r * (size_t)w->n_groups * 2;
    float32x4_t acc[8][2];
    int t, j, c;
    AFM__UNROLL for (t = 0; t < T; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (c = 0; c < nsb; c += 8) {
        const int n = nsb - c < 8 ? nsb - c : 8;
        float s8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        float32x4_t S0, S1;
        afm__scales_chunk(sc, w->gshift, c, n, s8); /* zeros past a short last chunk (see afm__qstep_avx2) */
        S0 = vld1q_f32(s8); S1 = vld1q_f32(s8 + 4);
#if defined(__GNUC__) || defined(__clang__)
        if (t0 == 0 && AFM__PF_DIST > 0)
            for (j = 0; j < 8 / SBB; j++) __builtin_prefetch(row + (size_t)(c / SBB + j) * 64 + AFM__PF_DIST, 0, 3);
#endif
        AFM__UNROLL for (t = 0; t < T; t++) {
            const int8_t *x = a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)c * 64;
            const float *d = a->d + (size_t)(t0 + t) * (size_t)a->nsb + c;
            const int32_t *qs = a->qs + (size_t)(t0 + t) * (size_t)a->nsb + c;
            int32x4_t v[8], P0, P1;
            AFM__UNROLL for (j = 0; j < 8; j++) {
                if (j < n) {
                    const uint8_t *blk = row + (size_t)((c + j) / SBB) * 64;
                    uint8x16_t b[4];
                    int8x16_t cq[4];
                    b[0] = vld1q_u8(blk); b[1] = vld1q_u8(blk + 16); b[2] = vld1q_u8(blk + 32); b[3] = vld1q_u8(blk + 48);
                    afm__codes_neon(b, j % SBB, type, cq);
                    v[j] = afm__dot64_neon(cq, x + j * 64, dot);
                } else v[j] = vdupq_n_s32(0);
            }
            P0 = vpaddq_s32(vpaddq_s32(v[0], v[1]), vpaddq_s32(v[2], v[3]));
            P1 = vpaddq_s32(vpaddq_s32(v[4], v[5]), vpaddq_s32(v[6], v[7]));
            acc[t][0] = afm__qstep_neon(P0, S0, d, qs, type, acc[t][0]);
            acc[t][1] = afm__qstep_neon(P1, S1, d + 4, qs + 4, type, acc[t][1]);
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) Y[(size_t)(t0 + t) * ldy + (size_t)r] = 0.5f * afm__hsum8_neon(acc[t][0], acc[t][1]);
}
#define AFM__QTILE_NEON(w, a, Y, ldy, r, t, T, type) afm__qtile_neon(w, a, Y, ldy, r, t, T, type, 0)
static void afm__matmul_q4_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(AFM__QTILE_NEON, AFM_TYPE_Q4)
}
static void afm__matmul_q8_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(AFM__QTILE_NEON, AFM_TYPE_Q8)
}
/* The 16 scales of a panel's group as float (rows 4i .. 4i+3 in S[i]). */
AFM__FORCEINLINE void afm__pscales_neon(const uint8_t *sg, float32x4_t *S) {
    int i;
    for (i = 0; i < 4; i++) S[i] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)(sg + 8 * i))));
}

/* Panel pn of a Q2B matrix into codes[sb][k/4][u][4] and S[sb][u], as afm__unpack16_q2b_avx2. */
static void afm__unpack16_q2b_neon(const afm__wmat *w, int r, uint8_t *codes, float *S) {
    const int nsb = w->kpad >> 6, pn = r >> 4;
    const uint8_t *pc = afm__panel_codes(w, pn);
    const uint8x16_t m3 = vdupq_n_u8(3);
    int sb, v, q, i;
    for (sb = 0; sb < nsb; sb++) {
        float32x4_t S4[4];
        for (v = 0; v < 4; v++)
            for (q = 0; q < 4; q++) {
                const uint8x16_t W = vld1q_u8(pc + (size_t)sb * 256 + 64 * v + 16 * q);
                uint8_t *dst = codes + (size_t)sb * 1024 + (size_t)(4 * v) * 64 + 16 * q;
                vst1q_u8(dst, vandq_u8(W, m3));
                vst1q_u8(dst + 64, vandq_u8(vshrq_n_u8(W, 2), m3));
                vst1q_u8(dst + 128, vandq_u8(vshrq_n_u8(W, 4), m3));
                vst1q_u8(dst + 192, vshrq_n_u8(W, 6));
            }
        afm__pscales_neon(afm__panel_scales(w, pn, sb), S4);
        for (i = 0; i < 4; i++) vst1q_f32(S + (size_t)sb * 16 + 4 * i, S4[i]);
    }
}

/* The float step of token t's 16 rows (dots: rows 4i..4i+3) for sub-block sb, into their lanes. */
AFM__FORCEINLINE void afm__gstep_neon(float32x4_t *lane, const int32x4_t *dots, const float32x4_t *S, const afm__act *a, int t, int sb) {
    const size_t ix = (size_t)t * (size_t)a->nsb + (size_t)sb;
    const int32x4_t oQ = vdupq_n_s32(afm__type_off2(AFM_TYPE_Q2B) * a->qs[ix]);
    int i;
    for (i = 0; i < 4; i++)
        lane[i] = vfmaq_f32(lane[i], vcvtq_f32_s32(vsubq_s32(vshlq_n_s32(dots[i], 1), oQ)), vmulq_n_f32(S[i], a->d[ix]));
}

/* y[0..15] = 0.5 * afm__sum8 of token t's lanes, 4 rows at once. */
AFM__FORCEINLINE void afm__gfinish_neon(float32x4_t (*lanes)[4][4], int t, float *y) {
    int i;
    for (i = 0; i < 4; i++) {
        const float32x4_t s = vaddq_f32(vaddq_f32(vaddq_f32(lanes[0][t][i], lanes[4][t][i]), vaddq_f32(lanes[2][t][i], lanes[6][t][i])),
                                        vaddq_f32(vaddq_f32(lanes[1][t][i], lanes[5][t][i]), vaddq_f32(lanes[3][t][i], lanes[7][t][i])));
        vst1q_f32(y + 4 * i, vmulq_n_f32(s, 0.5f));
    }
}

/* 16 rows of panel pn x T tokens straight from the panel (decode, verification; T <= 2, or 4 with
   the dot-product extension): each 16-byte quarter of a panel word (4 rows x 4 columns in 4 bit
   pairs) gives its 4 planes by shift and mask. With the extension vdotq_laneq takes plane m against
   lane m of the token's 16 activations; without it vmlal_s8 against 4 activations repeated, summed
   in int16 (at most 16 x 3 x 127 per lane) and widened pairwise as afm__gtile_neon does. */
AFM__FORCEINLINE void afm__ptile_neon(const afm__wmat *w, const afm__act *a, int pn, int t0, const int T, float *Y, size_t ldy, const int dot) {
    const int nsb = w->kpad >> 6;
    const uint8_t *pc = afm__panel_codes(w, pn);
    const uint8x16_t m3 = vdupq_n_u8(3);
    float32x4_t lanes[8][4][4]; /* [sub-block % 8][token][rows 4i..4i+3] */
    int t, sb, v, q, m;
    memset(lanes, 0, sizeof lanes); /* +0.0f */
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *cb = pc + (size_t)sb * 256;
        float32x4_t S4[4];
        int32x4_t acc[4][4];
        int16x8_t acc16[4][4][2];
        afm__pscales_neon(afm__panel_scales(w, pn, sb), S4);
#if defined(__GNUC__) || defined(__clang__)
        if (t0 == 0 && AFM__PF_DIST > 0)
            for (v = 0; v < 4; v++) __builtin_prefetch(cb + AFM__PF_DIST + 64 * v, 0, 3);
#endif
        AFM__UNROLL for (t = 0; t < T; t++) for (q = 0; q < 4; q++) {
            acc[t][q] = vdupq_n_s32(0);
            acc16[t][q][0] = acc16[t][q][1] = vdupq_n_s16(0);
        }
        for (v = 0; v < 4; v++) {
            const int8_t *x[4];
            AFM__UNROLL for (t = 0; t < T; t++) x[t] = a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + 16 * (size_t)v;
            for (q = 0; q < 4; q++) {
                const uint8x16_t W = vld1q_u8(cb + 64 * v + 16 * q);
                int8x16_t c[4];
                c[0] = vreinterpretq_s8_u8(vandq_u8(W, m3));
                c[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(W, 2), m3));
                c[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(W, 4), m3));
                c[3] = vreinterpretq_s8_u8(vshrq_n_u8(W, 6));
#ifdef AFM__NEON_DOT
                if (dot) {
                    AFM__UNROLL for (t = 0; t < T; t++) {
                        const int8x16_t xv = vld1q_s8(x[t]);
                        acc[t][q] = vdotq_laneq_s32(vdotq_laneq_s32(vdotq_laneq_s32(vdotq_laneq_s32(acc[t][q], c[0], xv, 0), c[1], xv, 1), c[2], xv, 2), c[3], xv, 3);
                    }
                    continue;
                }
#endif
                for (m = 0; m < 4; m++)
                    AFM__UNROLL for (t = 0; t < T; t++) {
                        int32_t x4;
                        int8x16_t xr;
                        memcpy(&x4, x[t] + 4 * m, 4);
                        xr = vreinterpretq_s8_s32(vdupq_n_s32(x4));
                        acc16[t][q][0] = vmlal_s8(acc16[t][q][0], vget_low_s8(c[m]), vget_low_s8(xr));
                        acc16[t][q][1] = vmlal_high_s8(acc16[t][q][1], c[m], xr);
                    }
            }
        }
        AFM__UNROLL for (t = 0; t < T; t++) {
            int32x4_t dots[4];
            for (q = 0; q < 4; q++) dots[q] = dot ? acc[t][q] : vpaddq_s32(vpaddlq_s16(acc16[t][q][0]), vpaddlq_s16(acc16[t][q][1]));
            afm__gstep_neon(lanes[sb & 7][t], dots, S4, a, t0 + t, sb);
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_neon(lanes, t, Y + (size_t)t * ldy);
}
#define AFM__PTILE_NEON(w, a, pn, t, T, Y, ldy) afm__ptile_neon(w, a, pn, t, T, Y, ldy, 0)
static void afm__matmul_q2b_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__PANEL_BODY(AFM__PTILE_NEON, 2)
}
#ifdef AFM__NEON_DOT
#define AFM__PTILE_NEONDOT(w, a, pn, t, T, Y, ldy) afm__ptile_neon(w, a, pn, t, T, Y, ldy, 1)
static void afm__matmul_q2b_neondot(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__PANEL_BODY(AFM__PTILE_NEONDOT, 4)
}
#endif

/* 16 packed rows x T tokens (T <= 2) without the dot-product extension: vmlal_s8 of 4 codes of 4
   rows against 4 activations repeated, summed in int16 (at most 16 * 3 * 127 per lane), then
   widened and added pairwise to one int32 per row. */
AFM__FORCEINLINE void afm__gtile_neon(const uint8_t *codes, const float *S, int nsb, const afm__act *a,
                                      float *Y, size_t ldy, int r, int t0, const int T) {
    float32x4_t lanes[8][4][4]; /* [sub-block % 8][token][rows 4i..4i+3] */
    int t, sb, k, i;
    memset(lanes, 0, sizeof lanes); /* +0.0f */
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *cb = codes + (size_t)sb * 1024;
        int16x8_t acc[2][4][2];
        AFM__UNROLL for (t = 0; t < T; t++) for (i = 0; i < 4; i++) acc[t][i][0] = acc[t][i][1] = vdupq_n_s16(0);
        for (k = 0; k < 16; k++) {
            int8x16_t c[4];
            for (i = 0; i < 4; i++) c[i] = vld1q_s8((const int8_t *)(cb + k * 64 + i * 16));
            AFM__UNROLL for (t = 0; t < T; t++) {
                int32_t x4;
                int8x16_t xr;
                memcpy(&x4, a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + (size_t)k * 4, 4);
                xr = vreinterpretq_s8_s32(vdupq_n_s32(x4));
                for (i = 0; i < 4; i++) {
                    acc[t][i][0] = vmlal_s8(acc[t][i][0], vget_low_s8(c[i]), vget_low_s8(xr));
                    acc[t][i][1] = vmlal_high_s8(acc[t][i][1], c[i], xr);
                }
            }
        }
        AFM__UNROLL for (t = 0; t < T; t++) {
            int32x4_t dots[4];
            float32x4_t S4[4];
            for (i = 0; i < 4; i++) {
                dots[i] = vpaddq_s32(vpaddlq_s16(acc[t][i][0]), vpaddlq_s16(acc[t][i][1]));
                S4[i] = vld1q_f32(S + (size_t)sb * 16 + 4 * i);
            }
            afm__gstep_neon(lanes[sb & 7][t], dots, S4, a, t0 + t, sb);
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_neon(lanes, t, Y + (size_t)(t0 + t) * ldy + (size_t)r);
}
#define AFM__ROWS_Q2B_NEON(w, a, Y, ldy, r0, r1) afm__matmul_q2b_neon(w, a, Y, ldy, r0, r1)
static void afm__gemm_q2b_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1, void *scratch) {
    AFM__GEMM_BODY(afm__gtile_neon, 2, AFM__ROWS_Q2B_NEON, afm__unpack16_q2b_neon)
}

#ifdef AFM__NEON_DOT
#define AFM__QTILE_NEONDOT(w, a, Y, ldy, r, t, T, type) afm__qtile_neon(w, a, Y, ldy, r, t, T, type, 1)
static void afm__matmul_q4_neondot(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(AFM__QTILE_NEONDOT, AFM_TYPE_Q4)
}
static void afm__matmul_q8_neondot(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__QMM_BODY(AFM__QTILE_NEONDOT, AFM_TYPE_Q8)
}

/* 16 packed rows x T tokens (T <= 4): vdotq_laneq takes 4 codes of 4 rows against lane k%4 of 16
   activations; four accumulators per token hold the 16 rows' exact dots. */
AFM__FORCEINLINE void afm__gtile_neondot(const uint8_t *codes, const float *S, int nsb, const afm__act *a,
                                         float *Y, size_t ldy, int r, int t0, const int T) {
    float32x4_t lanes[8][4][4]; /* [sub-block % 8][token][rows 4i..4i+3] */
    int t, sb, k, i;
    memset(lanes, 0, sizeof lanes); /* +0.0f */
    for (sb = 0; sb < nsb; sb++) {
        const uint8_t *cb = codes + (size_t)sb * 1024;
        int32x4_t acc[4][4];
        AFM__UNROLL for (t = 0; t < T; t++) for (i = 0; i < 4; i++) acc[t][i] = vdupq_n_s32(0);
        for (k = 0; k < 16; k += 4) {
            int8x16_t x[4];
            AFM__UNROLL for (t = 0; t < T; t++) x[t] = vld1q_s8(a->q + (size_t)(t0 + t) * (size_t)a->kpad + (size_t)sb * 64 + (size_t)k * 4);
#define AFM__GDOT(L)                                                                                    \
            {                                                                                           \
                const int8x16_t c0 = vld1q_s8((const int8_t *)(cb + (k + L) * 64)), c1 = vld1q_s8((const int8_t *)(cb + (k + L) * 64 + 16)); \
                const int8x16_t c2 = vld1q_s8((const int8_t *)(cb + (k + L) * 64 + 32)), c3 = vld1q_s8((const int8_t *)(cb + (k + L) * 64 + 48)); \
                AFM__UNROLL for (t = 0; t < T; t++) {                                                   \
                    acc[t][0] = vdotq_laneq_s32(acc[t][0], c0, x[t], L);                                \
                    acc[t][1] = vdotq_laneq_s32(acc[t][1], c1, x[t], L);                                \
                    acc[t][2] = vdotq_laneq_s32(acc[t][2], c2, x[t], L);                                \
                    acc[t][3] = vdotq_laneq_s32(acc[t][3], c3, x[t], L);                                \
                }                                                                                       \
            }
            AFM__GDOT(0) AFM__GDOT(1) AFM__GDOT(2) AFM__GDOT(3)
#undef AFM__GDOT
        }
        {
            float32x4_t S4[4];
            for (i = 0; i < 4; i++) S4[i] = vld1q_f32(S + (size_t)sb * 16 + 4 * i);
            AFM__UNROLL for (t = 0; t < T; t++) afm__gstep_neon(lanes[sb & 7][t], acc[t], S4, a, t0 + t, sb);
        }
    }
    AFM__UNROLL for (t = 0; t < T; t++) afm__gfinish_neon(lanes, t, Y + (size_t)(t0 + t) * ldy + (size_t)r);
}
#define AFM__ROWS_Q2B_NEONDOT(w, a, Y, ldy, r0, r1) afm__matmul_q2b_neondot(w, a, Y, ldy, r0, r1)
static void afm__gemm_q2b_neondot(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1, void *scratch) {
    AFM__GEMM_BODY(afm__gtile_neondot, 4, AFM__ROWS_Q2B_NEONDOT, afm__unpack16_q2b_neon)
}
#endif

AFM__FORCEINLINE float32x4_t afm__ld4_neon(const uint8_t *row, int i, const int type) {
    if (type == AFM_TYPE_F32) return vld1q_f32((const float *)(const void *)(row + 4 * (size_t)i));
    if (type == AFM_TYPE_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)(row + 2 * (size_t)i))));
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)(const void *)(row + 2 * (size_t)i)), 16));
}

/* R rows x T tokens of a float matrix: the contract's 8 lanes as two float32x4. */
AFM__FORCEINLINE void afm__ftile_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                      int r, int t0, const int R, const int T, const int type) {
    const int K = w->cols, K8 = K & ~7;
    const uint8_t *rows[4];
    const float *xs[4];
    float32x4_t acc[4][2][2];
    int i, u, t;
    AFM__UNROLL for (u = 0; u < R; u++) rows[u] = w->data + (size_t)(r + u) * w->row_bytes;
    AFM__UNROLL for (t = 0; t < T; t++) xs[t] = a->x + (size_t)(t0 + t) * (size_t)a->kpad;
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) acc[u][t][0] = acc[u][t][1] = vdupq_n_f32(0.0f);
    for (i = 0; i < K8; i += 8) {
        float32x4_t wv[4][2];
        AFM__UNROLL for (u = 0; u < R; u++) { wv[u][0] = afm__ld4_neon(rows[u], i, type); wv[u][1] = afm__ld4_neon(rows[u], i + 4, type); }
        AFM__UNROLL for (t = 0; t < T; t++) {
            const float32x4_t x0 = vld1q_f32(xs[t] + i), x1 = vld1q_f32(xs[t] + i + 4);
            AFM__UNROLL for (u = 0; u < R; u++) {
                acc[u][t][0] = vfmaq_f32(acc[u][t][0], wv[u][0], x0);
                acc[u][t][1] = vfmaq_f32(acc[u][t][1], wv[u][1], x1);
            }
        }
    }
    AFM__UNROLL for (u = 0; u < R; u++) AFM__UNROLL for (t = 0; t < T; t++) {
        float s = afm__hsum8_neon(acc[u][t][0], acc[u][t][1]);
        for (i = K8; i < K; i++) s = fmaf(afm__wf_scalar(type, rows[u], i), xs[t][i], s);
        Y[(size_t)(t0 + t) * ldy + (size_t)(r + u)] = s;
    }
}
static void afm__matmul_f32_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__FMM_BODY(afm__ftile_neon, AFM_TYPE_F32, 4, 2)
}
static void afm__matmul_f16_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__FMM_BODY(afm__ftile_neon, AFM_TYPE_F16, 4, 2)
}
static void afm__matmul_bf16_neon(const afm__wmat *w, const afm__act *a, float *Y, size_t ldy, int r0, int r1) {
    AFM__FMM_BODY(afm__ftile_neon, AFM_TYPE_BF16, 4, 2)
}

static void afm__kv_scores_neon(const int16_t *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                int n_pos, int dim, const float *qs, float *s, size_t lds, const int8_t *pf) {
    const int d8 = dim & ~7;
    int h0, p, i, h;
    (void)pf; /* no software prefetch: not measured on arm64 hardware */
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int nh = nq - h0 < 4 ? nq - h0 : 4;
        for (p = 0; p < n_pos; p++) {
            const int8_t *kp = k + (size_t)p * k_stride;
            int32x4_t acc[4];
            for (h = 0; h < 4; h++) acc[h] = vdupq_n_s32(0);
            for (i = 0; i < d8; i += 8) {
                const int16x8_t k16 = vmovl_s8(vld1_s8(kp + i));
                for (h = 0; h < nh; h++) {
                    const int16x8_t qv = vld1q_s16(q + (size_t)(h0 + h) * ldq + i);
                    acc[h] = vmlal_s16(acc[h], vget_low_s16(qv), vget_low_s16(k16));
                    acc[h] = vmlal_high_s16(acc[h], qv, k16);
                }
            }
            for (h = 0; h < nh; h++) {
                int32_t sum = vaddvq_s32(acc[h]);
                for (i = d8; i < dim; i++) sum += (int32_t)q[(size_t)(h0 + h) * ldq + (size_t)i] * kp[i];
                s[(size_t)(h0 + h) * lds + (size_t)p] = (float)sum * qs[h0 + h];
            }
        }
    }
}

static void afm__kv_values_neon(const int16_t *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
                                int n_pos, int dim, const float *vs, float *o, size_t ldo) {
    const int d8 = dim & ~7;
    int h0, p, i, h;
    for (h0 = 0; h0 < nq; h0 += 4) {
        const int nh = nq - h0 < 4 ? nq - h0 : 4;
        for (i = 0; i < d8; i += 8) {
            int32x4_t acc[4][2];
            for (h = 0; h < 4; h++) acc[h][0] = acc[h][1] = vdupq_n_s32(0);
            for (p = 0; p < n_pos; p++) {
                const int16x8_t v16 = vmovl_s8(vld1_s8(v + (size_t)p * v_stride + i));
                for (h = 0; h < nh; h++) {
                    const int16_t w = pr[(size_t)(h0 + h) * ldp + (size_t)p];
                    acc[h][0] = vmlal_n_s16(acc[h][0], vget_low_s16(v16), w);
                    acc[h][1] = vmlal_n_s16(acc[h][1], vget_high_s16(v16), w);
                }
            }
            for (h = 0; h < nh; h++) {
                const float32x4_t sv = vdupq_n_f32(vs[h0 + h]);
                vst1q_f32(o + (size_t)(h0 + h) * ldo + i, vmulq_f32(vcvtq_f32_s32(acc[h][0]), sv));
                vst1q_f32(o + (size_t)(h0 + h) * ldo + i + 4, vmulq_f32(vcvtq_f32_s32(acc[h][1]), sv));
            }
        }
    }
    if (d8 < dim) afm__kv_values_scalar(pr, ldp, nq, v + d8, v_stride, n_pos, dim - d8, vs, o + d8, ldo); /* the last columns */
}

/* afm__softmax16_scalar, 4 at a time: the same operations per lane (vmaxnm skips a NaN as the
   scalar comparisons do, in the maximum and in the clamp to -16). */
static int32_t afm__softmax16_neon(const float *x, int n, float *max, int16_t *out) {
    const float32x4_t magic = vdupq_n_f32(12582912.0f), lo = vdupq_n_f32(-16.0f);
    float32x4_t mv = vdupq_n_f32(-FLT_MAX), mxv;
    int32x4_t acc = vdupq_n_s32(0);
    int32_t sum;
    float mx;
    int i;
    for (i = 0; i + 4 <= n; i += 4) mv = vmaxnmq_f32(vld1q_f32(x + i), mv);
    mx = vmaxnmvq_f32(mv);
    for (; i < n; i++) if (x[i] > mx) mx = x[i];
    mxv = vdupq_n_f32(mx);
    for (i = 0; i + 4 <= n; i += 4) {
        const float32x4_t d = vmaxnmq_f32(vsubq_f32(vld1q_f32(x + i), mxv), lo);
        const float32x4_t kf = vsubq_f32(vfmaq_n_f32(magic, d, 1.44269502f), magic);
        const float32x4_t f = vfmaq_n_f32(vnegq_f32(kf), d, 1.44269502f);
        float32x4_t p = vfmaq_f32(vdupq_n_f32(9.61812911e-3f), vdupq_n_f32(1.33335581e-3f), f);
        int32x4_t c;
        p = vfmaq_f32(vdupq_n_f32(5.55041087e-2f), p, f);
        p = vfmaq_f32(vdupq_n_f32(2.40226507e-1f), p, f);
        p = vfmaq_f32(vdupq_n_f32(6.93147182e-1f), p, f);
        p = vfmaq_f32(vdupq_n_f32(1.0f), p, f);
        p = vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(kf), vdupq_n_s32(127)), 23)));
        c = vcvtnq_s32_f32(vmulq_n_f32(p, 32767.0f));
        acc = vaddq_s32(acc, c);
        vst1_s16(out + i, vmovn_s32(c));
    }
    sum = vaddvq_s32(acc);
    for (; i < n; i++) { out[i] = (int16_t)afm__exp16_code(x[i] - mx); sum += out[i]; }
    *max = mx + 0.0f; /* -0 as +0: which zero a maximum keeps differs between the levels */
    return sum;
}

/* afm__round16_scalar, 8 at a time (vcvtnq rounds to nearest even and takes NaN to 0). */
static void afm__round16_neon(int16_t *out, const float *x, int n, float mul) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + i), mul)), b = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + i + 4), mul));
        vst1q_s16(out + i, vcombine_s16(vqmovn_s32(a), vqmovn_s32(b)));
    }
    afm__round16_scalar(out + i, x + i, n - i, mul);
}

static void afm__kv_scores_f_neon(const float *q, size_t ldq, int nq, const int8_t *k, size_t k_stride,
                                  int n_pos, int dim, float scale, float *s, size_t lds, const int8_t *pf) {
    const int d8 = dim & ~7;
    int h0, p, i, h;
    (void)pf; /* no software prefetch: not measured on arm64 hardware */
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
                float sum = afm__hsum8_neon(acc[h][0], acc[h][1]);
                for (i = d8; i < dim; i++) sum = fmaf(q[(size_t)(h0 + h) * ldq + (size_t)i], (float)kp[i], sum);
                s[(size_t)(h0 + h) * lds + (size_t)p] = sum * scale;
            }
        }
    }
}

static void afm__kv_values_f_neon(const float *pr, size_t ldp, int nq, const int8_t *v, size_t v_stride,
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
                for (p = 0; p < n_pos; p++) sum = fmaf(pr[(size_t)(h0 + h) * ldp + (size_t)p], (float)v[(size_t)p * v_stride + (size_t)i], sum);
                o[(size_t)(h0 + h) * ldo + (size_t)i] = sum * scale;
            }
    }
}

static void afm__axpy_neon(float *y, float a, const float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}
#endif /* AFM__NEON */

/* ---- selection and dispatch ---- */

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
    k->gemm_q2b = k->gemm_q4 = NULL;
    k->gemm_min = k->gemm_min_q4 = 1 << 30;
    k->kv_scores = afm__kv_scores_scalar;
    k->kv_values = afm__kv_values_scalar;
    k->kv_scores_f = afm__kv_scores_f_scalar;
    k->kv_values_f = afm__kv_values_f_scalar;
    k->round16 = afm__round16_scalar;
    k->softmax16 = afm__softmax16_scalar;
    k->axpy = afm__axpy_scalar;
    k->silu_mul = afm__silu_mul_scalar;
    k->expsum = afm__expsum_scalar;
#if defined(AFM__X86)
    level = afm__x86_level();
    if (afm__x86_rank(level) > afm__x86_rank(max_level)) level = max_level < AFM__LEVEL_SCALAR ? AFM__LEVEL_SCALAR : max_level;
    if (level >= AFM__LEVEL_AVX2) {
        k->name = "avx2";
        k->prepare_q8 = afm__prepare_q8_avx2;
        k->prepare_f32 = afm__prepare_f32_avx2;
        k->matmul[0] = afm__matmul_f32_avx2; k->matmul[1] = afm__matmul_f16_avx2; k->matmul[2] = afm__matmul_bf16_avx2;
        k->matmul[3] = afm__matmul_q2b_avx2; k->matmul[4] = afm__matmul_q4_avx2; k->matmul[5] = afm__matmul_q8_avx2;
        k->gemm_q2b = afm__gemm_q2b_avx2;
        k->gemm_min = 4; /* Zen 3, 1 thread, 2048 x 6656 (bench_kernels -b): per token 185 / 205 us from panels / unpacked at 3 tokens, 177 / 175 at 4 */
        for (i = 0; i < AFM__NTYPES; i++) k->dequant[i] = afm__dequant_avx2;
        k->kv_scores = afm__kv_scores_avx2;
        k->kv_values = afm__kv_values_avx2;
        k->kv_scores_f = afm__kv_scores_f_avx2;
        k->kv_values_f = afm__kv_values_f_avx2;
        k->round16 = afm__round16_avx2;
        k->softmax16 = afm__softmax16_avx2;
        k->axpy = afm__axpy_avx2;
        k->silu_mul = afm__silu_mul_avx2;
        k->expsum = afm__expsum_avx2;
    }
    if (level >= AFM__LEVEL_AVX512) k->name = "avx512"; /* the AVX2 kernels (see the AVX-512 section) */
    if (level >= AFM__LEVEL_AVX512VNNI) {
        k->name = "avx512vnni";
        k->matmul[3] = afm__matmul_q2b_vnni; k->matmul[4] = afm__matmul_q4_vnni; k->matmul[5] = afm__matmul_q8_vnni;
        k->gemm_q2b = NULL; /* the panel kernel at every batch size (afm__ptile_vnni) */
        k->kv_scores = afm__kv_scores_vnni;
        k->kv_values = afm__kv_values_vnni;
    }
#ifdef AFM__AMX
    if (level == AFM__LEVEL_AMX) {
        k->name = "amx";
        k->gemm_q2b = afm__gemm_q2b_amx;
        k->gemm_q4 = afm__gemm_q4_amx;
        k->gemm_min = AFM__AMX_Q2B_MIN;
        k->gemm_min_q4 = AFM__AMX_Q4_MIN;
    }
#endif
#elif defined(AFM__NEON)
    if (max_level >= AFM__LEVEL_NEON) {
        level = AFM__LEVEL_NEON;
        k->name = "neon";
        k->prepare_q8 = afm__prepare_q8_neon;
        k->matmul[0] = afm__matmul_f32_neon; k->matmul[1] = afm__matmul_f16_neon; k->matmul[2] = afm__matmul_bf16_neon;
        k->matmul[3] = afm__matmul_q2b_neon; k->matmul[4] = afm__matmul_q4_neon; k->matmul[5] = afm__matmul_q8_neon;
        k->gemm_q2b = afm__gemm_q2b_neon;
        k->gemm_min = 4; /* not measured on hardware (qemu only) */
        k->kv_scores = afm__kv_scores_neon;
        k->kv_values = afm__kv_values_neon;
        k->kv_scores_f = afm__kv_scores_f_neon;
        k->kv_values_f = afm__kv_values_f_neon;
        k->round16 = afm__round16_neon;
        k->softmax16 = afm__softmax16_neon;
        k->axpy = afm__axpy_neon;
    }
#ifdef AFM__NEON_DOT
    if (max_level >= AFM__LEVEL_NEON_DOT) {
        level = AFM__LEVEL_NEON_DOT;
        k->name = "neon-dotprod";
        k->matmul[3] = afm__matmul_q2b_neondot; k->matmul[4] = afm__matmul_q4_neondot; k->matmul[5] = afm__matmul_q8_neondot;
        k->gemm_q2b = afm__gemm_q2b_neondot;
    }
#endif
#else
    (void)max_level;
#endif
    k->level = level;
    return level;
}

/* Prepares tokens [t0, t1) of a (for a matrix of type `type`). */
static inline void afm__prepare_activations(const afm__kernels *k, afm__act *a, const float *X, size_t ldx, int t0, int t1) {
    if (a->quant) k->prepare_q8(a, X, ldx, t0, t1);
    else k->prepare_f32(a, X, ldx, t0, t1);
}

/* Y[t*ldy + r] = W[r] . X[t] for r in [r0, r1), every token of a. scratch: afm__gemm_scratch_size
   (w->kpad) bytes for this thread alone, or NULL (then the row kernels only: the same bits). */
static inline void afm__matmul_rows(const afm__kernels *k, const afm__wmat *w, const afm__act *a, float *Y, size_t ldy,
                                    int r0, int r1, void *scratch) {
    const afm__gemm_fn gemm = w->type == AFM_TYPE_Q2B ? k->gemm_q2b : w->type == AFM_TYPE_Q4 ? k->gemm_q4 : NULL;
    if (r0 >= r1 || a->n_tok <= 0) return;
    AFM_ASSERT((w->type != AFM_TYPE_Q2B || w->panels) && "Q2B matrices are used in panels (afm__q2b_panelize)");
    if (scratch && gemm && a->quant && a->n_tok >= (w->type == AFM_TYPE_Q2B ? k->gemm_min : k->gemm_min_q4))
        gemm(w, a, Y, ldy, r0, r1, scratch);
    else
        k->matmul[afm__type_slot(w->type)](w, a, Y, ldy, r0, r1);
}

static inline void afm__dequantize_row(const afm__kernels *k, const afm__wmat *w, int row, float *out) {
    k->dequant[afm__type_slot(w->type)](w, row, out);
}

static const char *const afm__kernel_names[] = {"auto", "scalar", "avx2", "avx512", "avx512vnni", "neon", "neon-dotprod", "amx"};

AFMDEF const char *afm_kernels_name(afm_kernels level) {
    return (int)level >= 0 && (int)level <= AFM__LEVEL_LAST ? afm__kernel_names[level] : NULL;
}

AFMDEF int afm_kernels_from_name(const char *name) {
    int i;
    for (i = 0; name && i <= AFM__LEVEL_LAST; i++)
        if (strcmp(name, afm__kernel_names[i]) == 0) return i;
    return -1;
}

AFMDEF afm_kernels afm_kernels_best(void) {
    afm__kernels k;
    return (afm_kernels)afm__select_kernels(&k, AFM__LEVEL_MAX);
}

AFMDEF int afm_kernels_supported(afm_kernels level) {
    afm__kernels k;
    if (level == AFM_KERNELS_AUTO) return 1;
    if ((int)level < 0 || (int)level > AFM__LEVEL_LAST) return 0;
    return afm__select_kernels(&k, (int)level) == (int)level;
}


/* ======================================================================================== */
/* ==== LORA ADAPTERS: .afma files, .fmadapter packages, the embedded base adapter ======== */
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
    afm__count n_users;            /* sessions using it (afm_adapter_free checks) */
};

static void afm__adapter_use(const afm_adapter *ad, long d) {
    if (ad) afm__count_add(&((afm_adapter *)(void *)ad)->n_users, d);
}

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
    afm__model_use(m, 1);
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
    AFM_ASSERT(afm__count_add(&ad->n_users, 0) == 0 && "afm_adapter_free: free or switch the sessions that use it first");
    afm__model_use(ad->model, -1);
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
    if (!(ad->alpha >= -AFM__MAX_ALPHA && ad->alpha <= AFM__MAX_ALPHA))
        return AFM__BAD(L, "%s: config alpha %g is outside [-%g, %g]", L->name, (double)ad->alpha, (double)AFM__MAX_ALPHA, (double)AFM__MAX_ALPHA);
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
    if ((i = afm__read_signature(cf + 48, ad->signature)) >= 0)
        return AFM__BAD(L, "%s: config byte %d: signature byte 0x%02x: the signature is neither 40 lowercase hex digits nor all zero",
                        L->name, 48 + i, cf[48 + i]);
    if (ad->signature[0] && c->signature[0] && memcmp(ad->signature, c->signature, 40))
        return AFM__BAD(L, "%s: adapter is for base model %s, this model is %s", L->name, ad->signature, c->signature);
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

/* ---- .fmadapter: Apple's package (docs/MODEL.md section 6) ---- */

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
    char sig[64];
    size_t where = 0;
    const char *why = "";
    int32_t t, v;
    const afm_config *c = &ad->model->config;
    memset(&j, 0, sizeof j);
    if (!afm__json_parse(&ad->alloc, json, n, &j, &where, &why)) {
        afm__json_free(&ad->alloc, &j);
        return afm__fail(err, errn, strcmp(why, "out of memory") ? AFM_ERR_FORMAT : AFM_ERR_NOMEM, "%s/metadata.json: offset %llu: %s",
                         name, (unsigned long long)where, why);
    }
#define AFM__FMERR(...) do { afm__fail(err, errn, AFM_ERR_FORMAT, __VA_ARGS__); afm__json_free(&ad->alloc, &j); return AFM_ERR_FORMAT; } while (0)
    if (j.n[0].type != AFM__JOBJ) AFM__FMERR("%s/metadata.json: not a JSON object", name);
    t = afm__json_get(&j, 0, "adapterIdentifier");
    if (!afm__json_cstr(&j, t, ad->identifier, sizeof ad->identifier))
        AFM__FMERR("%s/metadata.json: adapterIdentifier is missing or not a short string", name);
    if (!afm__fm_identifier_ok(ad->identifier))
        AFM__FMERR("%s/metadata.json: adapterIdentifier '%s' does not match fmadapter-NAME-VERSION (letters, digits, '_'; no '-' inside NAME)", name, ad->identifier);
    t = afm__json_get(&j, 0, "baseModelSignature");
    if (!afm__json_cstr(&j, t, sig, sizeof sig) || strlen(sig) != 40 || strspn(sig, "0123456789abcdef") != 40)
        AFM__FMERR("%s/metadata.json: baseModelSignature is missing or not 40 lowercase hex digits", name);
    if (c->signature[0] && strcmp(sig, c->signature))
        AFM__FMERR("%s/metadata.json: adapter is for base model %s, this model is %s", name, sig, c->signature);
    memcpy(ad->signature, sig, 41);
    v = afm__json_int(&j, afm__json_get(&j, 0, "loraRank"));
    if (v < 1 || v > 4096) AFM__FMERR("%s/metadata.json: loraRank is missing or not an integer in 1..4096", name);
    ad->rank = (int)v;
    t = afm__json_get(&j, 0, "speculativeDecodingDraftTokenCount");
    if (t >= 0) {
        v = afm__json_int(&j, t);
        if (v < 1 || v > 64) AFM__FMERR("%s/metadata.json: speculativeDecodingDraftTokenCount is not an integer in 1..64", name);
        ad->draft_token_count = (int)v;
    }
#undef AFM__FMERR
    afm__json_free(&ad->alloc, &j);
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
   toolkit's adapter keys (docs/MODEL.md section 6.2), which is checked record by record. */
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
        if (w[i_tail] || i_tail - prev_end >= 63)
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
            r = afm__blob_open_ex(&ad->alloc, sub, no_mmap, AFM__BLOB_POPULATE, &ad->blob, err, errn);
        }
        if (r == AFM_OK) r = afm__fm_weights(ad, ad->blob.data, ad->blob.size, path, err, errn);
        if (r == AFM_OK) r = afm__adapter_check_finite(ad, path, err, errn);
    } else {
        afm__loader L;
        r = afm__blob_open_ex(&ad->alloc, path, no_mmap, AFM__BLOB_POPULATE, &ad->blob, err, errn);
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
/* ==== SESSIONS ========================================================================== */
/* ======================================================================================== */

#define AFM__MAX_DRAFT 16           /* draft tokens a round may verify (afm_generate) */

struct afm_session {
    afm_model *model;
    afm_session_params params;
    afm__pool pool;
    afm__kernels kern;            /* chosen for this CPU when the session is created */
    afm_kv_type kv_type;
    int pos, n_ctx, cap;          /* tokens in the cache, context limit, KV positions allocated */
    int kv_dim;                   /* n_kv_heads * head_dim */
    size_t kv_elt;                /* bytes per cached element */
    unsigned char *k_cache, *v_cache; /* [n_seg0][cap][kv_dim] */
    /* scratch for one batch of up to n_batch tokens */
    float *x, *xn, *qkv, *q, *att, *hb, *hb2, *rope_cos, *rope_sin;
    float *scores;                /* [n_threads][afm__att_scratch] attention scores and chunk partials */
    int att_int;                  /* attention in integers: an int8 cache, int8 activations, a quantized model */
    int16_t *q16;                 /* [n_batch][n_heads][head_dim] the queries' codes when att_int */
    float *q16d;                  /* [n_batch][n_heads] and their steps */
    float *rowbuf;                /* [n_threads][max row] dequantized KV rows (float caches), or a
                                     work unit's int16 probabilities (att_int) */
    unsigned char *gemmbuf;       /* [n_threads][gemmbuf_n] packed rows of the matrix-matrix kernels, or NULL */
    size_t gemmbuf_n;
    int gemm_kpad;                /* the longest padded row gemmbuf holds */
    afm__count *att_done;         /* [n_threads] chunks finished per attention group (decode) */
    afm__count *qkv_done;         /* [query + key + value heads] rows finished per head in the QKV job */
    afm__count *mm_claimed;       /* [n_threads] whether a product job's chunk u (u < its n_static) is taken */
    void *act_buf;                /* int8 activations prepared for one job's quantized products */
    void *act_f32;                /* f32 copies of an input whose rows are not laid out for the
                                     kernels (a width not a multiple of 16), else NULL */
    size_t act_cap;               /* bytes of act_buf (and of act_f32) */
    int rowbuf_n;
    float *logits;                /* [logits_cap][vocab] */
    int logits_cap, n_logits;
    int32_t *tokens;              /* [cap] the tokens in the cache, in order */
#ifdef AFM_TESTING
    int test_accept_rule;         /* 1 accepts every draft: shows the distribution tests can fail */
    int test_late_threads;        /* 1: odd threads leave their first chunk to others (afm__mm_run) */
#endif
    const afm_adapter *adapter;   /* LoRA applied on every adapted projection, or NULL */
    float *lora_t, *lora_u;       /* [3][n_batch][rank rounded up to 16] (A x of up to three
                                     projections), [n_batch][3 * widest output] (their B A x) */
    int lora_rank_cap;
    double verify_s[AFM__MAX_DRAFT + 2]; /* seconds to verify n tokens, as afm_generate measured them
                                     (its speculative rounds start from them; 0 = not measured) */
    char err[256];
};

static afm_result afm__serr(afm_session *s, afm_result code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof s->err, fmt, ap);
    va_end(ap);
    return code;
}


static void afm__session_release_buffers(afm_session *s) {
    const afm_allocator *a = &s->model->alloc;
    void **bufs[] = { (void **)&s->x, (void **)&s->xn, (void **)&s->qkv, (void **)&s->att, (void **)&s->hb,
                      (void **)&s->hb2, (void **)&s->rope_cos, (void **)&s->rope_sin, (void **)&s->scores,
                      (void **)&s->rowbuf, (void **)&s->logits, (void **)&s->k_cache, (void **)&s->v_cache,
                      (void **)&s->lora_t, (void **)&s->lora_u, (void **)&s->tokens, (void **)&s->act_buf, (void **)&s->act_f32,
                      (void **)&s->att_done, (void **)&s->qkv_done, (void **)&s->mm_claimed, (void **)&s->gemmbuf, (void **)&s->q16, (void **)&s->q16d };
    size_t i;
    for (i = 0; i < sizeof bufs / sizeof bufs[0]; i++) { afm__free(a, *bufs[i]); *bufs[i] = NULL; }
}

/* Memory a session takes before it holds any tokens (one batch's activations, the first KV
   positions) stays below max(64 MiB, the model file's size): a small hostile file with huge widths
   (1024 heads x 1024 of a model dimension 1) would otherwise take gigabytes for a few tokens. */
static uint64_t afm__scratch_budget(const afm_model *m) {
    uint64_t floor_ = (uint64_t)64 << 20;
    return m->blob.size > floor_ ? m->blob.size : floor_;
}

/* Attention cuts a token's keys into chunks of AFM__KV_CHUNK positions and hands out groups of up
   to AFM__ATT_HEADS query heads (FORWARD PASS, "attention"); each thread's scratch holds one
   chunk's scores for a KV head's query heads and the partial results of every chunk of one group.
   8 heads: all of a KV head's in the 3B model (and in models/mini), so each key and value row is
   read and converted once per token for all of them. */
#define AFM__KV_CHUNK 128
#define AFM__ATT_HEADS 8

typedef struct afm__attn_job {
    afm_session *s;
    int layer;                    /* whose cache is read */
    int n_tok, q_stride;
    int hs, nhg;                  /* query heads per unit, units per KV head */
    int n_groups;                 /* n_tok * n_kv_heads * nhg */
    int deep;                     /* chunks of a group are separate units (few groups) */
    int max_chunks;               /* chunks of the batch's last token, the most of any */
    int n_units;
    afm__count next;              /* units are taken in order by whichever thread is free */
} afm__attn_job;

static int afm__att_chunks(int n_keys) { return n_keys <= AFM__KV_CHUNK ? 1 : (n_keys + AFM__KV_CHUNK - 1) / AFM__KV_CHUNK; }

/* Floats of one partial (o_c of hd values, then m_c and l_c) and of a thread's attention scratch. */
static size_t afm__att_part(int hd) { return (size_t)hd + 2; }
static size_t afm__att_scratch(const afm_config *c, int cap) {
    int group = c->n_heads / c->n_kv_heads;
    return (size_t)AFM__KV_CHUNK * group + (size_t)afm__att_chunks(cap) * AFM__ATT_HEADS * afm__att_part(c->head_dim);
}

/* Grows the KV cache (and the per-thread attention scratch) to hold at least `need` positions. */
static afm_result afm__reserve(afm_session *s, int need) {
    const afm_allocator *a = &s->model->alloc;
    int cap = s->cap ? s->cap : 256, l, n_seg0 = s->model->n_seg0;
    size_t row = (size_t)s->kv_dim * s->kv_elt;
    unsigned char *k, *v;
    float *scores;
    int32_t *tokens;
    if (need <= s->cap) return AFM_OK;
    if (!s->cap) { /* the first 256 positions, or fewer if they would outweigh the budget */
        uint64_t per_pos = 2 * (uint64_t)n_seg0 * row, most = afm__scratch_budget(s->model) / (per_pos ? per_pos : 1);
        if ((uint64_t)cap > most) cap = most > 0 ? (int)most : 1;
    }
    while (cap < need) cap = cap > s->n_ctx / 2 ? s->n_ctx : cap * 2;
    if (cap > s->n_ctx) cap = s->n_ctx;
    k = (unsigned char *)afm__calloc(a, (size_t)n_seg0 * cap, row);
    v = (unsigned char *)afm__calloc(a, (size_t)n_seg0 * cap, row);
    scores = (float *)afm__calloc(a, (size_t)s->pool.n_threads * afm__att_scratch(&s->model->config, cap), sizeof(float));
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

/* Bytes of prepared activations for n_tok inputs of n_in features, whatever the weight type. */
static size_t afm__act_need(int n_tok, int n_in) {
    size_t q = afm__act_size(AFM_TYPE_Q2B, n_tok, n_in), f = afm__act_size(AFM_TYPE_F32, n_tok, n_in);
    return q > f ? q : f;
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
    if ((int)p.kernels < 0 || (int)p.kernels > AFM__LEVEL_LAST) return AFM_ERR_ARG;
    if (!afm_kernels_supported(p.kernels)) return AFM_ERR_UNSUPPORTED;

    s = (afm_session *)afm__calloc(a, 1, sizeof *s);
    if (!s) return AFM_ERR_NOMEM;
    s->model = m;
    afm__model_use(m, 1);
    s->params = p;
    s->kv_type = p.kv_type;
    s->n_ctx = p.n_ctx;
    s->kv_dim = c->n_kv_heads * c->head_dim;
    s->kv_elt = s->kv_type == AFM_KV_INT8 ? 1 : s->kv_type == AFM_KV_F16 ? 2 : 4;
    afm__select_kernels(&s->kern, p.kernels == AFM_KERNELS_AUTO ? AFM__LEVEL_MAX : (int)p.kernels);
    if (afm__pool_init(a, &s->pool, p.n_threads) != AFM_OK) { afm__free(a, s); return AFM_ERR_THREAD; }

    qd = c->n_heads * c->head_dim;
    widest = c->dim > c->ffn_dim ? c->dim : c->ffn_dim;
    if (qd > widest) widest = qd;
    if (c->head_dim > widest) widest = c->head_dim;
    {   /* fewer tokens per batch when one batch's activations would outweigh the budget */
        uint64_t per_tok = 4 * (2 * (uint64_t)c->dim + 2 * (uint64_t)qd + 2 * (uint64_t)s->kv_dim + 2 * (uint64_t)c->ffn_dim + (uint64_t)c->head_dim) +
                           2 * (uint64_t)qd + 4 * (uint64_t)c->n_heads +
                           2 * (uint64_t)afm__act_need(1, widest);
        uint64_t most = afm__scratch_budget(m) / per_tok;
        if ((uint64_t)p.n_batch > most) s->params.n_batch = p.n_batch = most > 0 ? (int)most : 1;
    }
    B = p.n_batch;
    s->rowbuf_n = (widest + 15) & ~15;
    if (s->rowbuf_n < AFM__ATT_HEADS * AFM__KV_CHUNK / 2) s->rowbuf_n = AFM__ATT_HEADS * AFM__KV_CHUNK / 2; /* int16 probabilities */
    /* integer attention where the queries already come from int8 activation blocks (a quantized
       QKV product): its rounding is far below theirs. Float models stay exact to the reference. */
    s->att_int = s->kv_type == AFM_KV_INT8 && !p.f32_activations && afm__type_is_quant((int)m->layers[0].qkv->type);
    s->x = (float *)afm__alloc(a, (size_t)B * c->dim * 4);
    s->xn = (float *)afm__alloc(a, (size_t)B * c->dim * 4);
    s->qkv = (float *)afm__alloc(a, (size_t)B * (qd + 2 * s->kv_dim) * 4);
    s->att = (float *)afm__alloc(a, (size_t)B * qd * 4);
    if (s->att_int) {
        s->q16 = (int16_t *)afm__alloc(a, (size_t)B * qd * 2);
        s->q16d = (float *)afm__alloc(a, (size_t)B * c->n_heads * 4);
    }
    s->hb = (float *)afm__alloc(a, (size_t)B * c->ffn_dim * 4);
    s->hb2 = (float *)afm__alloc(a, (size_t)B * c->ffn_dim * 4);
    s->rope_cos = (float *)afm__alloc(a, (size_t)B * (c->head_dim / 2) * 4);
    s->rope_sin = (float *)afm__alloc(a, (size_t)B * (c->head_dim / 2) * 4);
    s->rowbuf = (float *)afm__alloc(a, (size_t)s->pool.n_threads * s->rowbuf_n * 4);
    if ((B >= s->kern.gemm_min || B >= s->kern.gemm_min_q4) && s->kern.gemm_q2b) { /* prefill batches: room for 16 packed rows per thread */
        s->gemm_kpad = (widest + 511) & ~511; /* rows are padded to at most 512 (group <= 512) */
        s->gemmbuf_n = afm__align64(afm__gemm_scratch_size(s->gemm_kpad));
        s->gemmbuf = (unsigned char *)afm__alloc(a, (size_t)s->pool.n_threads * s->gemmbuf_n);
        if (!s->gemmbuf) s->gemmbuf_n = 0; /* the row kernels alone: slower, the same bits */
    }
    s->att_done = (afm__count *)afm__calloc(a, (size_t)s->pool.n_threads, sizeof *s->att_done);
    s->qkv_done = (afm__count *)afm__calloc(a, (size_t)c->n_heads + 2 * (size_t)c->n_kv_heads, sizeof *s->qkv_done);
    s->mm_claimed = (afm__count *)afm__calloc(a, (size_t)s->pool.n_threads, sizeof *s->mm_claimed);
    s->logits_cap = 1;
    s->logits = (float *)afm__alloc(a, (size_t)c->vocab_size * 4);
    s->act_cap = afm__act_need(B, widest);
    s->act_buf = afm__alloc(a, s->act_cap);
    if ((c->dim | qd | c->ffn_dim) & 15) s->act_f32 = afm__alloc(a, s->act_cap);
    if (!s->act_buf || (((c->dim | qd | c->ffn_dim) & 15) && !s->act_f32) ||
        !s->x || !s->xn || !s->qkv || !s->att || (s->att_int && (!s->q16 || !s->q16d)) || !s->hb || !s->hb2 || !s->rope_cos || !s->rope_sin || !s->rowbuf || !s->att_done || !s->qkv_done || !s->mm_claimed || !s->logits ||
        afm__reserve(s, p.preallocate ? s->n_ctx : 1) != AFM_OK) {
        afm_session_free(s);
        return AFM_ERR_NOMEM;
    }
    *out = s;
    return AFM_OK;
}

AFMDEF void afm_session_free(afm_session *s) {
    afm_model *m;
    if (!s) return;
    m = s->model;
    afm__adapter_use(s->adapter, -1);
    afm__pool_destroy(&m->alloc, &s->pool);
    afm__session_release_buffers(s);
    afm__free(&m->alloc, s);
    afm__model_use(m, -1);
}

/* Evaluates n tokens; keeps the logits of every position when want_all, else of the last. */
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
AFMDEF afm_kernels afm_session_kernels(const afm_session *s) { return s ? (afm_kernels)s->kern.level : AFM_KERNELS_AUTO; }

AFMDEF afm_kv_type afm_session_kv_type(const afm_session *s) { return s ? s->kv_type : AFM_KV_AUTO; }
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
    memset(s->verify_s, 0, sizeof s->verify_s); /* an adapter changes what a verification costs */
    afm__adapter_use(s->adapter, -1);
    afm__adapter_use(ad, 1);
    s->adapter = ad;
    s->pos = 0; /* the cached keys and values were computed with the previous adapter */
    s->n_logits = 0;
    return AFM_OK;
}

/* ---- Saved sessions: the state file (docs/FORMAT.md). A 128-byte header, then the tokens, the
   keys and values of every segment-0 layer for those positions, and the last logits if kept. The
   model and adapter are identified by fingerprints: 64-bit hashes of their shapes and of samples of
   their bytes (cheap for a 3B model, and any two trainings differ in every sample). A checksum of
   the payload catches a damaged file, since wrong keys and values would only make silent garbage. ---- */

#define AFM__STATE_VERSION 1u
#define AFM__STATE_HEADER 128

static uint64_t afm__hash(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        uint64_t x = h ^ afm__rd64(p + i);
        h = (((x << 27) | (x >> 37)) + 0x9e3779b97f4a7c15ull) * 0xff51afd7ed558ccdull;
    }
    for (; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t afm__hash_u64(uint64_t h, uint64_t v) {
    unsigned char b[8];
    int i;
    for (i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
    return afm__hash(h, b, 8);
}

/* A tensor's shape and 16 evenly spaced 64-byte samples of its data. */
static uint64_t afm__hash_tensor(uint64_t h, const afm__tensor *t) {
    const unsigned char *d = (const unsigned char *)t->data;
    uint64_t i, step = t->n_bytes / 16;
    int k;
    h = afm__hash(h, t->name, strlen(t->name));
    h = afm__hash_u64(h, (uint64_t)t->type);
    for (k = 0; k < t->n_dims; k++) h = afm__hash_u64(h, t->dims[k]);
    for (i = 0; d && i < 16; i++) {
        uint64_t off = i * step, len = t->n_bytes - off < 64 ? t->n_bytes - off : 64;
        h = afm__hash(h, d + off, (size_t)len);
    }
    return h;
}

static uint64_t afm__model_fingerprint(const afm_model *m) { return m->fingerprint; }

static uint64_t afm__model_fingerprint_of_file(const afm_model *m) {
    const afm_config *c = &m->config;
    uint64_t h = 0x41464d4d4f44454cull;
    int i, v[10];
    float f[4];
    v[0] = c->vocab_size; v[1] = c->dim; v[2] = c->n_layers; v[3] = c->n_reuse_layers; v[4] = c->n_heads;
    v[5] = c->n_kv_heads; v[6] = c->head_dim; v[7] = c->ffn_dim; v[8] = c->has_kv_scales; v[9] = c->lora_rank;
    f[0] = c->rope_theta; f[1] = c->norm_eps; f[2] = c->qk_norm_eps; f[3] = c->lora_alpha;
    for (i = 0; i < 10; i++) h = afm__hash_u64(h, (uint64_t)(uint32_t)v[i]);
    for (i = 0; i < 4; i++) { uint32_t u; memcpy(&u, &f[i], 4); h = afm__hash_u64(h, u); }
    h = afm__hash(h, c->signature, strlen(c->signature));
    for (i = 0; i < m->n_tensors; i++) h = afm__hash_tensor(h, &m->tensors[i]);
    return h ? h : 1;
}

/* 0 for no adapter. */
static uint64_t afm__adapter_fingerprint(const afm_adapter *ad) {
    uint64_t h = 0x41464d4144415054ull;
    uint32_t u;
    int i, n = ad ? ad->model->config.n_layers * AFM__N_PROJ : 0;
    if (!ad) return 0;
    memcpy(&u, &ad->scale, 4);
    h = afm__hash_u64(afm__hash_u64(h, (uint64_t)ad->rank), u);
    for (i = 0; i < n; i++) {
        if (ad->a[i]) h = afm__hash_tensor(afm__hash_u64(h, (uint64_t)i), ad->a[i]);
        if (ad->b[i]) h = afm__hash_tensor(afm__hash_u64(h, (uint64_t)i), ad->b[i]);
    }
    return h ? h : 1;
}

static void afm__wr64(unsigned char *p, uint64_t v) { afm__wr32(p, (uint32_t)v); afm__wr32(p + 4, (uint32_t)(v >> 32)); }

/* Payload bytes for n tokens: ids, keys, values, then the logits. */
static uint64_t afm__state_payload(const afm_session *s, uint64_t n, int has_logits) {
    uint64_t kv = (uint64_t)s->model->n_seg0 * n * (uint64_t)s->kv_dim * s->kv_elt;
    return 4 * n + 2 * kv + (has_logits ? 4 * (uint64_t)s->model->config.vocab_size : 0);
}

AFMDEF size_t afm_session_state_size(const afm_session *s) {
    return s ? (size_t)(AFM__STATE_HEADER + afm__state_payload(s, (uint64_t)s->pos, s->n_logits > 0)) : 0;
}

AFMDEF afm_result afm_session_save(const afm_session *s, void *buf, size_t cap, size_t *size) {
    unsigned char *p = (unsigned char *)buf, *q;
    size_t need = afm_session_state_size(s), row;
    int l, has_logits;
    if (size) *size = need;
    if (!s || !buf || cap < need) return AFM_ERR_ARG;
    has_logits = s->n_logits > 0;
    row = (size_t)s->kv_dim * s->kv_elt;
    memset(p, 0, AFM__STATE_HEADER);
    memcpy(p, "AFMSTATE", 8);
    afm__wr32(p + 8, AFM__STATE_VERSION);
    afm__wr32(p + 12, AFM__STATE_HEADER);
    afm__wr64(p + 16, afm__model_fingerprint(s->model));
    afm__wr64(p + 24, afm__adapter_fingerprint(s->adapter));
    afm__wr32(p + 32, (uint32_t)s->kv_type);
    afm__wr32(p + 36, (uint32_t)s->model->config.vocab_size);
    afm__wr32(p + 40, (uint32_t)s->model->n_seg0);
    afm__wr32(p + 44, (uint32_t)s->kv_dim);
    afm__wr32(p + 48, (uint32_t)s->pos);
    afm__wr32(p + 52, (uint32_t)has_logits);
    if (s->adapter) { /* for messages only; at most 55 bytes and a NUL */
        size_t len = strlen(s->adapter->identifier);
        memcpy(p + 64, s->adapter->identifier, len < 55 ? len : 55);
    }
    q = p + AFM__STATE_HEADER;
    for (l = 0; l < s->pos; l++, q += 4) afm__wr32(q, (uint32_t)s->tokens[l]);
    for (l = 0; l < s->model->n_seg0; l++, q += (size_t)s->pos * row) memcpy(q, s->k_cache + (size_t)l * s->cap * row, (size_t)s->pos * row);
    for (l = 0; l < s->model->n_seg0; l++, q += (size_t)s->pos * row) memcpy(q, s->v_cache + (size_t)l * s->cap * row, (size_t)s->pos * row);
    if (has_logits) memcpy(q, s->logits + (size_t)(s->n_logits - 1) * s->model->config.vocab_size, 4 * (size_t)s->model->config.vocab_size);
    afm__wr64(p + 56, afm__hash(0, p + AFM__STATE_HEADER, need - AFM__STATE_HEADER));
    return AFM_OK;
}

static const char *afm__kv_name(uint32_t t) {
    return t == AFM_KV_F32 ? "f32" : t == AFM_KV_F16 ? "f16" : t == AFM_KV_INT8 ? "int8" : "unknown";
}

/* Every check of a state against the session, before anything changes. */
static afm_result afm__state_check(const afm_session *s, const unsigned char *p, uint64_t size, const char *name, char *err, size_t errn) {
    uint32_t kv, vocab, n_seg0, kv_dim, n, has_logits, i;
    uint64_t need, fp;
    char ident[56];
    if (size < AFM__STATE_HEADER) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: %llu bytes is too short for a session state (the header is %d)", name, (unsigned long long)size, AFM__STATE_HEADER);
    if (memcmp(p, "AFMSTATE", 8)) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset 0: not a session state file (magic is not AFMSTATE)", name);
    if (afm__rd32(p + 8) != AFM__STATE_VERSION) return afm__fail(err, errn, AFM_ERR_UNSUPPORTED, "%s: offset 8: version %u, this build reads version %u", name, afm__rd32(p + 8), AFM__STATE_VERSION);
    if (afm__rd32(p + 12) != AFM__STATE_HEADER) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset 12: header_size %u, expected %d", name, afm__rd32(p + 12), AFM__STATE_HEADER);
    for (i = 0; i < 8; i++)
        if (p[120 + i]) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset %u: reserved byte is not zero", name, 120 + i);
    memcpy(ident, p + 64, 56);
    if (memchr(ident, 0, 56) == NULL) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset 64: adapter identifier is not NUL-terminated", name);
    fp = afm__rd64(p + 16);
    if (fp != afm__model_fingerprint(s->model))
        return afm__fail(err, errn, AFM_ERR_ARG, "%s: offset 16: the state was made with another model (model fingerprint %016llx, this model's is %016llx)",
                         name, (unsigned long long)fp, (unsigned long long)afm__model_fingerprint(s->model));
    fp = afm__rd64(p + 24);
    if (fp != afm__adapter_fingerprint(s->adapter)) {
        if (!fp) return afm__fail(err, errn, AFM_ERR_ARG, "%s: offset 24: the state was made without an adapter, but this session uses adapter '%s'", name, s->adapter->identifier);
        return afm__fail(err, errn, AFM_ERR_ARG, "%s: offset 24: the state was made with adapter '%s' (fingerprint %016llx), but this session uses %s%s%s", name, ident[0] ? ident : "?",
                         (unsigned long long)fp, s->adapter ? "adapter '" : "no adapter", s->adapter ? s->adapter->identifier : "", s->adapter ? "'" : "");
    }
    kv = afm__rd32(p + 32); vocab = afm__rd32(p + 36); n_seg0 = afm__rd32(p + 40); kv_dim = afm__rd32(p + 44);
    n = afm__rd32(p + 48); has_logits = afm__rd32(p + 52);
    if (kv != (uint32_t)s->kv_type)
        return afm__fail(err, errn, AFM_ERR_ARG, "%s: offset 32: the state's KV cache is %s, this session's is %s (create the session with that kv_type)", name, afm__kv_name(kv), afm__kv_name((uint32_t)s->kv_type));
    if (vocab != (uint32_t)s->model->config.vocab_size || n_seg0 != (uint32_t)s->model->n_seg0 || kv_dim != (uint32_t)s->kv_dim)
        return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset 36: vocab_size %u, layers %u, kv_dim %u do not match the model's %d, %d, %d", name, vocab, n_seg0, kv_dim,
                         s->model->config.vocab_size, s->model->n_seg0, s->kv_dim);
    if (n > (uint32_t)s->n_ctx) return afm__fail(err, errn, AFM_ERR_CONTEXT_FULL, "%s: offset 48: %u tokens do not fit the session's context of %d", name, n, s->n_ctx);
    if (has_logits > 1) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset 52: has_logits is %u, expected 0 or 1", name, has_logits);
    need = AFM__STATE_HEADER + afm__state_payload(s, n, (int)has_logits);
    if (size != need) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: the file has %llu bytes, its header says %llu", name, (unsigned long long)size, (unsigned long long)need);
    if (afm__rd64(p + 56) != afm__hash(0, p + AFM__STATE_HEADER, (size_t)(need - AFM__STATE_HEADER)))
        return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset 56: the payload's checksum does not match (the file is damaged)", name);
    for (i = 0; i < n; i++) {
        uint32_t t = afm__rd32(p + AFM__STATE_HEADER + 4 * (size_t)i);
        if (t >= vocab) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset %llu: token %u is %u, outside the vocabulary of %u", name,
                                         (unsigned long long)(AFM__STATE_HEADER + 4 * (uint64_t)i), i, t, vocab);
    }
    {   /* float caches and logits must be finite: NaN keys would poison every later position */
        const unsigned char *kvp = p + AFM__STATE_HEADER + 4 * (size_t)n;
        uint64_t n_kv = 2 * (uint64_t)n_seg0 * n * kv_dim, j, n_lg = has_logits ? vocab : 0;
        for (j = 0; kv == AFM_KV_F16 && j < n_kv; j++)
            if ((kvp[2 * j + 1] & 0x7c) == 0x7c) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset %llu: cached value is not finite", name, (unsigned long long)(kvp - p + 2 * j));
        for (j = 0; kv == AFM_KV_F32 && j < n_kv; j++)
            if ((afm__rd32(kvp + 4 * j) & 0x7f800000u) == 0x7f800000u) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset %llu: cached value is not finite", name, (unsigned long long)(kvp - p + 4 * j));
        kvp += n_kv * s->kv_elt;
        for (j = 0; j < n_lg; j++)
            if ((afm__rd32(kvp + 4 * j) & 0x7f800000u) == 0x7f800000u) return afm__fail(err, errn, AFM_ERR_FORMAT, "%s: offset %llu: logit %llu is not finite", name, (unsigned long long)(kvp - p + 4 * j), (unsigned long long)j);
    }
    return AFM_OK;
}

static afm_result afm__state_load(afm_session *s, const unsigned char *p, uint64_t size, const char *name, char *err, size_t errn) {
    afm_result r;
    uint32_t n, i;
    size_t row;
    int l;
    const unsigned char *q;
    if (err && errn) err[0] = 0;
    if (!s || (!p && size)) return afm__fail(err, errn, AFM_ERR_ARG, "afm_session_load: no session or no data");
    if ((r = afm__state_check(s, p, size, name, err, errn)) != AFM_OK) return r;
    n = afm__rd32(p + 48);
    if (afm__reserve(s, (int)n) != AFM_OK) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: out of memory for a KV cache of %u positions", name, n);
    row = (size_t)s->kv_dim * s->kv_elt;
    q = p + AFM__STATE_HEADER;
    for (i = 0; i < n; i++, q += 4) s->tokens[i] = (int32_t)afm__rd32(q);
    for (l = 0; l < s->model->n_seg0; l++, q += (size_t)n * row) memcpy(s->k_cache + (size_t)l * s->cap * row, q, (size_t)n * row);
    for (l = 0; l < s->model->n_seg0; l++, q += (size_t)n * row) memcpy(s->v_cache + (size_t)l * s->cap * row, q, (size_t)n * row);
    s->pos = (int)n;
    s->n_logits = afm__rd32(p + 52) ? 1 : 0;
    if (s->n_logits) memcpy(s->logits, q, 4 * (size_t)s->model->config.vocab_size);
    return AFM_OK;
}

AFMDEF afm_result afm_session_load(afm_session *s, const void *data, size_t size, char *err, size_t errn) {
    return afm__state_load(s, (const unsigned char *)data, size, "session state", err, errn);
}

AFMDEF afm_result afm_session_load_file(afm_session *s, const char *path, char *err, size_t errn) {
    afm__blob b;
    afm_result r;
    if (!s || !path) return afm__fail(err, errn, AFM_ERR_ARG, "afm_session_load_file: no session or no path");
    memset(&b, 0, sizeof b);
    if ((r = afm__blob_open(&s->model->alloc, path, 0, &b, err, errn)) != AFM_OK) return r;
    r = afm__state_load(s, b.data, b.size, path, err, errn);
    afm__blob_close(&s->model->alloc, &b);
    return r;
}

AFMDEF afm_result afm_session_save_file(const afm_session *s, const char *path, char *err, size_t errn) {
    size_t need = afm_session_state_size(s), n = 0;
    void *buf;
    FILE *f;
    afm_result r;
    if (!s || !path) return afm__fail(err, errn, AFM_ERR_ARG, "afm_session_save_file: no session or no path");
    if (!(buf = afm__alloc(&s->model->alloc, need))) return afm__fail(err, errn, AFM_ERR_NOMEM, "%s: out of memory for a state of %llu bytes", path, (unsigned long long)need);
    afm_session_save(s, buf, need, &n);
    f = fopen(path, "wb");
    r = f && fwrite(buf, 1, n, f) == n ? AFM_OK : AFM_ERR_IO;
    if (f && fclose(f) != 0) r = AFM_ERR_IO;
    afm__free(&s->model->alloc, buf);
    if (r != AFM_OK) return afm__fail(err, errn, r, "%s: cannot write the session state", path);
    return AFM_OK;
}

/* ======================================================================================== */
/* ==== FORWARD PASS (docs/MODEL.md section 2) ============================================ */
/* ======================================================================================== */

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
    int silu;                     /* items 0 and 1 are gate and up: a chunk takes the same rows of
                                     both, then gate = silu(gate) * up on them (afm__mm_run) */
    int qkv_layer;                /* >= 0: item 0 is this layer's QKV projection, and whoever finishes
                                     a head's rows runs its QKV pass (afm__mm_qkv_rows) */
    afm__mm_item it[AFM__MM_MAX];
    int chunk_rows[AFM__MM_MAX];  /* rows are handed out in chunks, about 4 per thread per product, */
    int big_chunks[AFM__MM_MAX];  /* this many of them; the job's last rows in smaller ones */
    int small_rows[AFM__MM_MAX];  /* (afm__mm_chunks) */
    int first_chunk[AFM__MM_MAX + 1];
    int n_static;                 /* chunk u < n_static is thread u's first (afm__mm_run) */
    afm__count next;              /* the next chunk after those: whichever thread is free takes it */
    const afm__tensor *then[2];   /* the next job's matrices: each worker prefetches its first chunk */
    int n_then;                   /* of them once this job is over (afm__mm_prefetch_next) */
    afm__act *prep;               /* the activations being prepared by afm__mm_prepare_run */
    const float *prep_x;
    int prep_ldx;
} afm__mm_job;

static void afm__mm_init(afm__mm_job *j, afm_session *s, int n_tok) { j->s = s; j->n_tok = n_tok; j->n = 0; j->silu = 0; j->qkv_layer = -1; j->n_then = 0; }

/* The matrices the job after j starts with (b may be NULL): see afm__mm_prefetch_next. */
static void afm__mm_then(afm__mm_job *j, const afm__tensor *a, const afm__tensor *b) {
    j->then[0] = a; j->then[1] = b;
    j->n_then = b ? 2 : 1;
}

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
    if (lo < hi) afm__prepare_activations(&j->s->kern, j->prep, j->prep_x, (size_t)j->prep_ldx, lo, hi);
}

/* The dot product of the exact paths (f32_activations, float KV caches) and RMSNorm's sum of
   squares: products in double are exact, so a compiler that fuses them into the adds changes
   nothing; 8 lanes and a fixed tree (8 chains: one would wait on each add). */
static double afm__dot_d(const float *a, const float *b, int n) {
    double s[8] = { 0, 0, 0, 0, 0, 0, 0, 0 };
    int i = 0, k;
    for (; i + 8 <= n; i += 8)
        for (k = 0; k < 8; k++) s[k] += (double)a[i + k] * b[i + k];
    for (k = 0; i < n; i++, k++) s[k] += (double)a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}
static float afm__dot(const float *a, const float *b, int n) { return (float)afm__dot_d(a, b, n); }

/* Rows [lo, hi) of item i: the product, then the scaled add of a LoRA B product. */
static void afm__mm_rows(afm__mm_job *j, int i, int lo, int hi, int ith) {
    const afm__mm_item *it = &j->it[i];
    if (it->act.quant || !afm__type_is_quant((int)it->W->type)) {
        afm__matmul_rows(&j->s->kern, &it->W->w, &it->act, it->Y, (size_t)it->ldy, lo, hi,
                         j->s->gemmbuf && it->W->w.kpad <= j->s->gemm_kpad ? j->s->gemmbuf + (size_t)ith * j->s->gemmbuf_n : NULL);
    } else { /* f32_activations: decode each quantized row, then exact f32 dot products */
        float *row = j->s->rowbuf + (size_t)ith * j->s->rowbuf_n;
        int r, t, n = (int)it->W->dims[1];
        for (r = lo; r < hi; r++) {
            afm__dequantize_row(&j->s->kern, &it->W->w, r, row);
            for (t = 0; t < it->act.n_tok; t++) it->Y[(size_t)t * it->ldy + r] = afm__dot(row, it->act.x + (size_t)t * it->act.kpad, n);
        }
    }
    if (it->add_to) {
        int r, t;
        for (t = 0; t < it->act.n_tok; t++)
            for (r = lo; r < hi; r++) { /* the product exact in double: fused or not, the same bits */
                float *y = &it->add_to[(size_t)t * it->add_ld + r];
                *y = (float)((double)*y + (double)it->add_scale * it->Y[(size_t)t * it->ldy + r]);
            }
    }
}

static void afm__qkv_post(afm_session *s, int layer, int t, int u);
static int afm__qkv_units(const afm_session *s, int layer);

/* Rows [lo, hi) of the QKV projection are done: counted per head (head_dim rows each); the thread
   that completes a head runs its QKV pass for every token (the count is a full barrier, so the
   other threads' rows are visible). No hand-off of its own, and no thread waits for it. */
static void afm__mm_qkv_rows(afm__mm_job *j, int lo, int hi) {
    afm_session *s = j->s;
    const int hd = s->model->config.head_dim;
    int h, t;
    for (h = lo / hd; h * hd < hi; h++) {
        const int a = lo > h * hd ? lo : h * hd, b = hi < (h + 1) * hd ? hi : (h + 1) * hd;
        if (afm__count_add(&s->qkv_done[h], b - a) == hd)
            for (t = 0; t < j->n_tok; t++) afm__qkv_post(s, j->qkv_layer, t, h);
    }
}

/* How the rows are handed out: each product in chunks of about a quarter of a thread's share
   (fewer cost more kernel calls and tile setups; more leave threads idle at the end), but the
   job's last rows (half a chunk per thread) in chunks a quarter that size, so the threads finish
   within a small chunk of each other. Rows are computed alone, so none of this changes a bit. */
static int afm__mm_chunk_rows(int rows, int nth) {
    const int per = 4 * nth;
    return rows > per ? ((rows + per - 1) / per + 15) & ~15 : 16; /* 16: the matrix-matrix kernels' rows */
}
static int afm__mm_tail_rows(int chunk_rows, int nth) { return nth > 1 ? nth * chunk_rows / 2 : 0; }

static void afm__mm_chunks(afm__mm_job *j, int nth) {
    int i, last = -1;
    for (i = 0; i < j->n; i++) if (!(i == 1 && j->silu)) last = i;
    j->first_chunk[0] = 0;
    for (i = 0; i < j->n; i++) {
        const int rows = (int)j->it[i].W->dims[0];
        const int c = afm__mm_chunk_rows(rows, nth);
        const int small = c / 4 > 16 ? (c / 4 + 15) & ~15 : 16, tail = i == last ? afm__mm_tail_rows(c, nth) : 0;
        j->chunk_rows[i] = c;
        j->big_chunks[i] = rows - tail > 0 ? (rows - tail) / c : 0;
        j->small_rows[i] = small;
        j->first_chunk[i + 1] = j->first_chunk[i] + (i == 1 && j->silu ? 0 : j->big_chunks[i] + (rows - j->big_chunks[i] * c + small - 1) / small);
    }
}

/* Chunk u: its rows of one product; in the gate/up job the same rows of up too, then SiLU on them
   (elementwise, so taken by the thread that made the rows instead of on the whole vector). */
static void afm__mm_chunk(afm__mm_job *j, int u, int ith) {
    int i = 0, rows, lo, hi, size, t;
    while (u >= j->first_chunk[i + 1]) i++;
    rows = (int)j->it[i].W->dims[0];
    u -= j->first_chunk[i];
    size = u < j->big_chunks[i] ? j->chunk_rows[i] : j->small_rows[i];
    lo = u < j->big_chunks[i] ? u * size : j->big_chunks[i] * j->chunk_rows[i] + (u - j->big_chunks[i]) * size;
    hi = rows - lo > size ? lo + size : rows;
    afm__mm_rows(j, i, lo, hi, ith);
    if (i == 0 && j->qkv_layer >= 0) afm__mm_qkv_rows(j, lo, hi);
    if (i == 0 && j->silu) {
        const afm__mm_item *g = &j->it[0], *up = &j->it[1];
        afm__mm_rows(j, 1, lo, hi, ith);
        for (t = 0; t < j->n_tok; t++) j->s->kern.silu_mul(g->Y + (size_t)t * g->ldy + lo, up->Y + (size_t)t * up->ldy + lo, hi - lo);
    }
}

/* Once the job is over, worker ith pulls into its L2 cache the start of its first chunk of each of
   the next job's matrices (AFM__PF_NEXT bytes, and their scales) while the caller prepares that
   job alone: memory would idle then. Only a chunk sure to be one of the next job's first ones is
   fetched. */
static void afm__mm_prefetch_next(const afm__mm_job *j, int ith, int nth) {
    int k;
    for (k = 0; k < j->n_then && AFM__PF_NEXT > 0; k++) {
        const afm__wmat *w = &j->then[k]->w;
        const int c = afm__mm_chunk_rows(w->rows, nth), lo = ith * c;
        size_t n = (size_t)c * w->row_bytes;
        if (!afm__type_is_quant(w->type) || (ith + 1) * c > w->rows - afm__mm_tail_rows(c, nth)) continue;
        if (n > AFM__PF_NEXT) n = AFM__PF_NEXT;
        afm__pool_prefetch_after(&j->s->pool, ith, w->data + (size_t)lo * w->row_bytes, n);
        afm__pool_prefetch_after(&j->s->pool, ith, w->scales + (size_t)lo * (size_t)w->n_groups * 2, n / w->row_bytes * (size_t)w->n_groups * 2 + 64);
    }
}

/* Thread ith starts with chunk ith (ith < n_static), whose rows the job before had it prefetch.
   Then threads take chunks until none is left: a thread slowed by the machine (other work, a busy
   sibling core) takes fewer, instead of every other thread waiting for its fixed share; a first
   chunk still unclaimed then goes to whoever is free, so a thread that has not started delays
   nobody. Each row is computed alone, so who computes it changes no bit. */
static void afm__mm_run(void *ctx, int ith, int nth) {
    afm__mm_job *j = (afm__mm_job *)ctx;
    afm__count *claimed = j->s->mm_claimed;
    int u, first = ith < j->n_static;
#ifdef AFM_TESTING
    if (j->s->test_late_threads && ith % 2) first = 0; /* as if it came late: others take its chunk */
#endif
    if (first && afm__count_add(&claimed[ith], 1) == 1) afm__mm_chunk(j, ith, ith);
    while ((u = (int)afm__count_add(&j->next, 1) - 1 + j->n_static) < j->first_chunk[j->n]) afm__mm_chunk(j, u, ith);
    for (u = 0; u < j->n_static; u++)
        if (!claimed[u] && afm__count_add(&claimed[u], 1) == 1) afm__mm_chunk(j, u, ith);
    afm__mm_prefetch_next(j, ith, nth);
}

/* Prepares a's activations from X into buf (over the pool when there are several tokens). */
static void afm__mm_prepare(afm__mm_job *j, afm__act *a, int type, const float *X, int ldx, int n_in, void *buf) {
    afm_session *s = j->s;
    AFM_ASSERT(afm__act_size(type, j->n_tok, n_in) <= s->act_cap);
    afm__act_init(a, type, j->n_tok, n_in, buf);
    if (j->n_tok >= 4) {
        j->prep = a; j->prep_x = X; j->prep_ldx = ldx;
        afm__pool_run(&s->pool, afm__mm_prepare_run, j);
    } else afm__prepare_activations(&s->kern, a, X, (size_t)ldx, 0, j->n_tok);
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
    afm__mm_chunks(j, s->pool.n_threads);
    if (j->qkv_layer >= 0) for (i = 0; i < afm__qkv_units(s, j->qkv_layer); i++) s->qkv_done[i] = 0;
    j->n_static = s->pool.n_threads < 2 ? 0 : s->pool.n_threads < j->big_chunks[0] ? s->pool.n_threads : j->big_chunks[0];
    for (i = 0; i < j->n_static; i++) s->mm_claimed[i] = 0;
    j->next = 0;
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
    const float scale = (float)(1.0 / sqrt(afm__dot_d(x, x, n) / n + eps));
    int i;
    for (i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* Rotates one head in the half-split layout: pair i is (v[i], v[i + d/2]). */
static void afm__rope(float *v, const float *cs, const float *sn, int half) {
    int i;
    for (i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        /* products exact in double: fused or not, the same bits */
        v[i] = (float)((double)a * cs[i] - (double)b * sn[i]);
        v[i + half] = (float)((double)a * sn[i] + (double)b * cs[i]);
    }
}

static void afm__rope_tables(afm_session *s, int n_tok) {
    const afm_config *c = &s->model->config;
    const double log_theta = afm__log_d((double)c->rope_theta);
    int half = c->head_dim / 2, t, i;
    for (t = 0; t < n_tok; t++) {
        double p = (double)(s->pos + t);
        for (i = 0; i < half; i++) {
            /* inv_freq_i = theta^(-2i/d), as f32 like the reference, then the angle in double (exact:
               a 24-bit position times a 24-bit float) */
            float inv = (float)afm__exp_d(-2.0 * i / c->head_dim * log_theta);
            double sn, cs;
            afm__sincos_d(p * inv, &sn, &cs);
            s->rope_cos[t * half + i] = (float)cs;
            s->rope_sin[t * half + i] = (float)sn;
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

/* ---- attention, split into fixed-size chunks of KV positions ----
   A token's keys are cut at multiples of AFM__KV_CHUNK positions. With one chunk (up to
   AFM__KV_CHUNK keys) it is plain softmax and a weighted sum of values. With more, each chunk
   gives its maximum m_c, its sum of exp(s - m_c) l_c and its unnormalized output o_c, and the
   chunks are merged in order: w_c = exp(m_c - max m), out = (sum w_c o_c) / (sum w_c l_c). The
   chunking depends only on the number of keys, so a token's bits depend neither on the thread
   count nor on the batch it came in; the split only decides who computes each chunk. Work units:
   (token, KV head, group of up to AFM__ATT_HEADS query heads) and, when those are fewer than the
   threads (decode, verification), each chunk of them too, merged by whichever thread finishes a
   group's last chunk. */
static void afm__softmax(const afm__kernels *k, float *x, int n) {
    float mx, inv = 1.0f / k->expsum(x, n, &mx);
    int i;
    for (i = 0; i < n; i++) x[i] *= inv;
}

/* Where head h of KV head kvh's group writes token t's attention output. */
static float *afm__attn_out(const afm_session *s, int t, int kvh, int h) {
    const afm_config *c = &s->model->config;
    return s->att + ((size_t)t * c->n_heads + (size_t)kvh * (c->n_heads / c->n_kv_heads) + (size_t)h) * c->head_dim;
}

/* One group's (token t, KV head kvh, heads h0 .. h0+nh-1) keys [p0, p1): with `part` NULL (the only
   chunk) the normalized output, else each head's o_c, m_c, l_c into part[h * afm__att_part].
   att_int: scores from the int16 queries (afm__quant_query), exps from each head's maximum (so the
   largest is 1) as multiples of 1/32767 (afm__exp16_code), both products and the exps' sum taken
   exactly in int32 by the kernels. The int8 cache of a float model or an f32_activations session:
   the float kernels (kv_scores_f, kv_values_f). F16 and F32 caches: scalar, products exact in double. */
static void afm__attn_span(const afm__attn_job *j, int t, int kvh, int h0, int nh, int p0, int p1, float *scores, float *kv, float *part) {
    afm_session *s = j->s;
    const afm_config *c = &s->model->config;
    const afm__layer *ly = &s->model->layers[j->layer];
    const afm__kernels *k = &s->kern;
    const int hd = c->head_dim, group = c->n_heads / c->n_kv_heads, n = p1 - p0, kv_int8 = s->kv_type == AFM_KV_INT8;
    const size_t pstride = afm__att_part(hd), layer_off = (size_t)j->layer * s->cap * s->kv_dim + (size_t)kvh * hd;
    const float *q = s->q + (size_t)t * j->q_stride + (size_t)(kvh * group + h0) * hd;
    const float kmul = (kv_int8 ? ly->k_scale : 1.0f) / sqrtf((float)hd), vmul = kv_int8 ? ly->v_scale : 1.0f;
    float *out = afm__attn_out(s, t, kvh, h0);
    int h, i, d, d0;
    if (s->att_int) {
        const size_t at = layer_off + (size_t)p0 * s->kv_dim, head = (size_t)t * c->n_heads + (size_t)(kvh * group + h0);
        int16_t *pr = (int16_t *)(void *)kv; /* nh rows of AFM__KV_CHUNK */
        float qs[AFM__ATT_HEADS] = {0}, vs[AFM__ATT_HEADS] = {0};
        for (h = 0; h < nh; h++) qs[h] = s->q16d[head + (size_t)h] * kmul;
        k->kv_scores(s->q16 + head * (size_t)hd, (size_t)hd, nh, (const int8_t *)s->k_cache + at, (size_t)s->kv_dim, n, hd, qs,
                     scores, (size_t)AFM__KV_CHUNK, (const int8_t *)s->v_cache + at);
        for (h = 0; h < nh; h++) { /* the sum and the outputs both in units of 1/32767 */
            float mx;
            const float sum = (float)k->softmax16(scores + (size_t)h * AFM__KV_CHUNK, n, &mx, pr + (size_t)h * AFM__KV_CHUNK);
            vs[h] = qs[h] == qs[h] ? vmul : (float)NAN; /* a NaN query gives NaN out (its codes are all 0: 0 / 0 would too, less plainly) */
            if (part) { part[h * pstride + hd] = mx; part[h * pstride + hd + 1] = sum; }
            else vs[h] /= sum;
        }
        k->kv_values(pr, (size_t)AFM__KV_CHUNK, nh, (const int8_t *)s->v_cache + at, (size_t)s->kv_dim, n, hd, vs,
                     part ? part : out, part ? pstride : (size_t)hd);
        return;
    }
    if (kv_int8) {
        const size_t at = layer_off + (size_t)p0 * s->kv_dim;
        k->kv_scores_f(q, (size_t)hd, nh, (const int8_t *)s->k_cache + at, (size_t)s->kv_dim, n, hd, kmul, scores,
                       (size_t)AFM__KV_CHUNK, (const int8_t *)s->v_cache + at);
        for (h = 0; h < nh; h++) {
            float *sc = scores + (size_t)h * AFM__KV_CHUNK;
            if (part) part[h * pstride + hd + 1] = k->expsum(sc, n, &part[h * pstride + hd]);
            else afm__softmax(k, sc, n);
        }
        k->kv_values_f(scores, (size_t)AFM__KV_CHUNK, nh, (const int8_t *)s->v_cache + at, (size_t)s->kv_dim, n, hd, vmul,
                       part ? part : out, part ? pstride : (size_t)hd);
        return;
    }
    for (h = 0; h < nh; h++) {
        float *o = part ? part + h * pstride : out + (size_t)h * hd;
        const float *qh = q + (size_t)h * hd;
        for (i = 0; i < n; i++) {
            afm__kv_load(s, s->k_cache, layer_off + (size_t)(p0 + i) * s->kv_dim, kv, hd, 1.0f);
            scores[i] = afm__dot(qh, kv, hd) * kmul;
        }
        if (part) part[h * pstride + hd + 1] = k->expsum(scores, n, &part[h * pstride + hd]);
        else afm__softmax(k, scores, n);
        for (d0 = 0; d0 < hd; d0 += 64) { /* 64 columns at a time in double: exact products, any fusing is harmless */
            double acc[64];
            const int nd = hd - d0 < 64 ? hd - d0 : 64;
            for (d = 0; d < nd; d++) acc[d] = 0;
            for (i = 0; i < n; i++) {
                afm__kv_load(s, s->v_cache, layer_off + (size_t)(p0 + i) * s->kv_dim + (size_t)d0, kv, nd, 1.0f);
                for (d = 0; d < nd; d++) acc[d] += (double)scores[i] * kv[d];
            }
            for (d = 0; d < nd; d++) o[d0 + d] = (float)acc[d] * vmul;
        }
    }
}

/* Merges nc chunks' partials (chunk c of head h at part[(c * AFM__ATT_HEADS + h) * afm__att_part])
   into the normalized outputs of nh heads, chunks in order. */
static void afm__attn_merge(const afm__kernels *k, int hd, int nh, int nc, const float *part, float *out) {
    const size_t ps = afm__att_part(hd);
    int h, c, i;
    for (h = 0; h < nh; h++) {
        float mx = -FLT_MAX, sum = 0.0f, inv, *o = out + (size_t)h * hd;
        for (c = 0; c < nc; c++) { float m = part[(c * AFM__ATT_HEADS + h) * ps + hd]; if (m > mx) mx = m; }
        for (i = 0; i < hd; i++) o[i] = 0.0f;
        for (c = 0; c < nc; c++) {
            const float *p = part + (c * AFM__ATT_HEADS + h) * ps, w = afm__expf(p[hd] - mx);
            sum = fmaf(w, p[hd + 1], sum);
            k->axpy(o, w, p, hd);
        }
        inv = 1.0f / sum;
        for (i = 0; i < hd; i++) o[i] *= inv;
    }
}

/* Group g (longest contexts first): its token, KV head, first head and head count. */
static void afm__attn_group(const afm__attn_job *j, int g, int *t, int *kvh, int *h0, int *nh) {
    const int n_kv = j->s->model->config.n_kv_heads, group = j->s->model->config.n_heads / n_kv;
    int hg = g % j->nhg;
    *kvh = g / j->nhg % n_kv;
    *t = j->n_tok - 1 - g / (j->nhg * n_kv);
    *h0 = hg * j->hs;
    *nh = group - *h0 < j->hs ? group - *h0 : j->hs;
}

/* Thread ith's partials: a group's chunks in the wide split, group ith's in the deep one. */
static float *afm__attn_parts(const afm__attn_job *j, int slot) {
    const afm_config *c = &j->s->model->config;
    return j->s->scores + (size_t)slot * afm__att_scratch(c, j->s->cap) + (size_t)AFM__KV_CHUNK * (c->n_heads / c->n_kv_heads);
}

/* Chunk ch of a group's n_keys keys into its partials part[ch]. */
static void afm__attn_chunk(const afm__attn_job *j, int t, int kvh, int h0, int nh, int ch, int n_keys, float *scores, float *kv, float *part) {
    const int p0 = ch * AFM__KV_CHUNK, p1 = p0 + AFM__KV_CHUNK < n_keys ? p0 + AFM__KV_CHUNK : n_keys;
    afm__attn_span(j, t, kvh, h0, nh, p0, p1, scores, kv, part + (size_t)ch * AFM__ATT_HEADS * afm__att_part(j->s->model->config.head_dim));
}

static void afm__attn_run(void *ctx, int ith, int nth) {
    afm__attn_job *j = (afm__attn_job *)ctx;
    afm_session *s = j->s;
    const int hd = s->model->config.head_dim;
    float *scores = s->scores + (size_t)ith * afm__att_scratch(&s->model->config, s->cap), *kv = s->rowbuf + (size_t)ith * s->rowbuf_n;
    int u, t, kvh, h0, nh;
    (void)nth;
    while ((u = (int)afm__count_add(&j->next, 1) - 1) < j->n_units) {
        const int g = j->deep ? u / j->max_chunks : u;
        int ch = j->deep ? u % j->max_chunks : 0, nc, n_keys;
        afm__attn_group(j, g, &t, &kvh, &h0, &nh);
        n_keys = s->pos + t + 1;
        nc = afm__att_chunks(n_keys);
        if (nc == 1) {
            if (ch == 0) afm__attn_span(j, t, kvh, h0, nh, 0, n_keys, scores, kv, NULL);
        } else if (j->deep) {
            if (ch < nc) {
                afm__attn_chunk(j, t, kvh, h0, nh, ch, n_keys, scores, kv, afm__attn_parts(j, g));
                /* whoever finishes a group's last chunk merges it (the count is a full barrier, so
                   the other chunks' partials are visible): no second hand-off */
                if (afm__count_add(&s->att_done[g], 1) == nc) afm__attn_merge(&s->kern, hd, nh, nc, afm__attn_parts(j, g), afm__attn_out(s, t, kvh, h0));
            }
        } else {
            float *part = afm__attn_parts(j, ith);
            for (ch = 0; ch < nc; ch++) afm__attn_chunk(j, t, kvh, h0, nh, ch, n_keys, scores, kv, part);
            afm__attn_merge(&s->kern, hd, nh, nc, part, afm__attn_out(s, t, kvh, h0));
        }
    }
}

/* The layer whose cache layer l attends to: its own in segment 0, segment 0's last in segment 1. */
static int afm__cache_layer(const afm_model *m, int l) { return l >= m->n_seg0 ? m->n_seg0 - 1 : l; }

/* Attention of the batch's n_tok tokens over layer `layer`'s cache (queries in s->q). */
static void afm__attention(afm_session *s, int layer, int n_tok, int q_stride) {
    const afm_config *c = &s->model->config;
    const int group = c->n_heads / c->n_kv_heads, nth = s->pool.n_threads;
    int g;
    afm__attn_job j;
    j.s = s; j.layer = layer; j.n_tok = n_tok; j.q_stride = q_stride;
    j.max_chunks = afm__att_chunks(s->pos + n_tok);
    /* fewer query heads a unit while the units cannot keep the threads busy (a decode step on many
       threads): each head's bits are the same whichever heads share its unit */
    j.hs = group < AFM__ATT_HEADS ? group : AFM__ATT_HEADS;
    while (j.hs > 1 && n_tok * c->n_kv_heads * ((group + j.hs - 1) / j.hs) * j.max_chunks < nth) j.hs = (j.hs + 1) / 2;
    j.nhg = (group + j.hs - 1) / j.hs;
    j.n_groups = n_tok * c->n_kv_heads * j.nhg;
    /* deep: one unit per chunk when the groups cannot keep the threads busy; the partials of group
       g go to thread slot g's scratch, so there may be no more groups than threads */
    j.deep = nth > 1 && j.n_groups < nth && j.max_chunks > 1;
    j.n_units = j.deep ? j.n_groups * j.max_chunks : j.n_groups;
    j.next = 0;
    if (j.deep) for (g = 0; g < j.n_groups; g++) s->att_done[g] = 0;
    afm__pool_run(&s->pool, afm__attn_run, &j);
}

/* ---- per-token passes between the products: norms, RoPE, residuals, SiLU. Each token's
   arithmetic is the same whoever runs it; a prefill batch spreads its tokens over the pool (left
   on one thread, they cap what 16 threads can gain), a decode step runs the norms and residuals
   in place. The QKV pass and SiLU are passes only after an adapter's q, k, v or gate, up; else
   the products' jobs run them on the way (afm__mm_qkv_rows, afm__mm_run). ---- */
enum { AFM__PASS_ATTN_IN, AFM__PASS_QKV, AFM__PASS_FFN_IN, AFM__PASS_SILU, AFM__PASS_OUT };

typedef struct afm__tok_job {
    afm_session *s;
    int layer, n_tok, pass;
} afm__tok_job;

/* Token t's query head h (at x) as the int16 codes of att_int attention: codes
   round_even(x * (qmax / amax)) and step amax / qmax, the activation blocks' rules (infinity or NaN:
   codes 0 and step NaN; amax below 2^-100: codes 0, step 0). qmax keeps a score's integer sum,
   |code| * 128 * head_dim, below 2^31: 32767 up to head_dim 512. */
static void afm__quant_query(afm_session *s, int t, int h, const float *x) {
    const afm_config *c = &s->model->config;
    const int hd = c->head_dim, qmax = (int)(2147483647L / (128L * hd) < 32767 ? 2147483647L / (128L * hd) : 32767);
    int16_t *codes = s->q16 + ((size_t)t * c->n_heads + (size_t)h) * hd;
    float *step = s->q16d + (size_t)t * c->n_heads + (size_t)h, amax;
    const uint32_t amax_bits = afm__amax_bits(x, hd);
    if (amax_bits >= AFM__AMAX_INF || amax_bits < AFM__AMAX_TINY) {
        memset(codes, 0, (size_t)hd * sizeof *codes);
        *step = amax_bits >= AFM__AMAX_INF ? (float)NAN : 0.0f;
        return;
    }
    memcpy(&amax, &amax_bits, 4);
    s->kern.round16(codes, x, hd, (float)qmax / amax);
    *step = amax / (float)qmax;
}

/* Heads a token's QKV pass has: its query heads, then (layers with their own cache) its key heads
   and its value heads. */
static int afm__qkv_units(const afm_session *s, int layer) {
    const afm_config *c = &s->model->config;
    return c->n_heads + (s->model->layers[layer].reuse ? 0 : 2 * c->n_kv_heads);
}

/* Head u of token t (afm__qkv_units' order): a query or key head gets RoPE, then its RMSNorm; a
   query head its int16 codes, a key or value head its place in the layer's cache. Heads are
   independent: the QKV job runs each as soon as its rows are done (afm__mm_qkv_rows), and the pass
   after an adapter's q, k or v spreads them over the pool. */
static void afm__qkv_post(afm_session *s, int layer, int t, int u) {
    const afm_config *c = &s->model->config;
    const afm__layer *ly = &s->model->layers[layer];
    const int hd = c->head_dim, half = hd / 2, qd = c->n_heads * hd, kvh = u - c->n_heads;
    const int stride = ly->reuse ? qd : qd + 2 * s->kv_dim;
    float *x = s->qkv + (size_t)t * stride + (size_t)u * hd; /* q heads, then k's, then v's */
    const float *cs = s->rope_cos + (size_t)t * half, *sn = s->rope_sin + (size_t)t * half;
    const size_t at = ((size_t)layer * s->cap + (size_t)(s->pos + t)) * s->kv_dim;
    if (kvh < c->n_kv_heads) {
        afm__rope(x, cs, sn, half);
        afm__rmsnorm(x, x, kvh < 0 ? ly->q_norm : ly->k_norm, hd, c->qk_norm_eps);
    }
    if (kvh < 0) { if (s->att_int) afm__quant_query(s, t, u, x); }
    else if (kvh < c->n_kv_heads) afm__kv_store(s, s->k_cache, at + (size_t)kvh * hd, x, hd, ly->k_scale);
    else afm__kv_store(s, s->v_cache, at + (size_t)(kvh - c->n_kv_heads) * hd, x, hd, ly->v_scale);
}

static void afm__tok_pass_one(const afm__tok_job *j, int t) {
    afm_session *s = j->s;
    const afm_config *c = &s->model->config;
    const afm__layer *ly = s->model->layers + j->layer; /* one past the last for AFM__PASS_OUT: not read */
    float *x = s->x + t * (size_t)c->dim, *xn = s->xn + t * (size_t)c->dim;
    int i;
    if (j->pass == AFM__PASS_SILU) { s->kern.silu_mul(s->hb + (size_t)t * c->ffn_dim, s->hb2 + (size_t)t * c->ffn_dim, c->ffn_dim); return; }
    /* the sublayer output in xn joins the residual (layer 0's input has none), then the next norm */
    if (j->pass != AFM__PASS_ATTN_IN || j->layer > 0) for (i = 0; i < c->dim; i++) x[i] += xn[i];
    if (j->pass != AFM__PASS_OUT) afm__rmsnorm(xn, x, j->pass == AFM__PASS_ATTN_IN ? ly->attn_norm : ly->ffn_norm, c->dim, c->norm_eps);
}

static void afm__tok_pass_run(void *ctx, int ith, int nth) {
    const afm__tok_job *j = (const afm__tok_job *)ctx;
    int lo, hi, t;
    if (j->pass == AFM__PASS_QKV) { /* by heads */
        const int n = afm__qkv_units(j->s, j->layer);
        afm__split(j->n_tok * n, ith, nth, &lo, &hi);
        for (t = lo; t < hi; t++) afm__qkv_post(j->s, j->layer, t / n, t % n);
        return;
    }
    afm__split(j->n_tok, ith, nth, &lo, &hi);
    for (t = lo; t < hi; t++) afm__tok_pass_one(j, t);
}

static void afm__tok_pass(afm_session *s, int layer, int n_tok, int pass) {
    afm__tok_job j;
    j.s = s; j.layer = layer; j.n_tok = n_tok; j.pass = pass;
    if (n_tok >= 4 || pass == AFM__PASS_QKV) afm__pool_run(&s->pool, afm__tok_pass_run, &j);
    else afm__tok_pass_run(&j, 0, 1);
}

/* Runs n_tok tokens at positions pos.. through the model; logits for the rows asked for. */
static void afm__forward(afm_session *s, const int32_t *tok, int n_tok, float *logits, int logits_from) {
    const afm_model *m = s->model;
    const afm_config *c = &m->config;
    int d = c->dim, qd = c->n_heads * c->head_dim, f = c->ffn_dim, l, t;
    size_t nd = (size_t)d;
    afm__mm_job mj;
    afm__lora_set ls;

    for (t = 0; t < n_tok; t++) afm__dequantize_row(&s->kern, &m->tok_embd->w, tok[t], s->x + t * nd);
    afm__rope_tables(s, n_tok);

    for (l = 0; l < c->n_layers; l++) {
        const afm__layer *ly = &m->layers[l];
        int stride = ly->reuse ? qd : qd + 2 * s->kv_dim;
        afm__tok_pass(s, l, n_tok, AFM__PASS_ATTN_IN);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->reuse ? ly->wq : ly->qkv, s->xn, d, s->qkv, stride);
        if (ly->reuse) afm__lora_a(&mj, &ls, l, AFM__P_WQ, s->xn, d, s->qkv, stride);
        else {
            afm__lora_a(&mj, &ls, l, AFM__P_Q, s->xn, d, s->qkv, stride);
            afm__lora_a(&mj, &ls, l, AFM__P_K, s->xn, d, s->qkv + qd, stride);
            afm__lora_a(&mj, &ls, l, AFM__P_V, s->xn, d, s->qkv + qd + s->kv_dim, stride);
        }
        if (ls.n == 0) mj.qkv_layer = l; /* adapted q, k or v: the LoRA B terms first, then the pass */
        afm__mm_then(&mj, ly->wo, NULL);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        if (mj.qkv_layer < 0) afm__tok_pass(s, l, n_tok, AFM__PASS_QKV);
        /* queries are the first qd values of each row; segment 1 reads the last segment-0 cache */
        s->q = s->qkv;
        afm__attention(s, afm__cache_layer(m, l), n_tok, stride);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->wo, s->att, qd, s->xn, d);
        afm__lora_a(&mj, &ls, l, AFM__P_WO, s->att, qd, s->xn, d);
        afm__mm_then(&mj, ly->gate, ly->up);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        afm__tok_pass(s, l, n_tok, AFM__PASS_FFN_IN);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->gate, s->xn, d, s->hb, f);
        afm__mm_add(&mj, ly->up, s->xn, d, s->hb2, f);
        afm__lora_a(&mj, &ls, l, AFM__P_GATE, s->xn, d, s->hb, f);
        afm__lora_a(&mj, &ls, l, AFM__P_UP, s->xn, d, s->hb2, f);
        mj.silu = ls.n == 0; /* an adapted gate or up gets its LoRA B term first, then SiLU alone */
        afm__mm_then(&mj, ly->down, NULL);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
        if (!mj.silu) afm__tok_pass(s, l, n_tok, AFM__PASS_SILU);
        afm__mm_init(&mj, s, n_tok);
        ls.n = 0;
        afm__mm_add(&mj, ly->down, s->hb, f, s->xn, d);
        afm__lora_a(&mj, &ls, l, AFM__P_DOWN, s->hb, f, s->xn, d);
        afm__mm_then(&mj, l + 1 == c->n_layers ? m->tok_embd : m->layers[l + 1].reuse ? m->layers[l + 1].wq : m->layers[l + 1].qkv, NULL);
        afm__mm_go(&mj);
        afm__lora_b(s, l, &ls, n_tok);
    }
    afm__tok_pass(s, c->n_layers, n_tok, AFM__PASS_OUT);
    if (logits_from < n_tok) {
        int n_out = n_tok - logits_from;
        for (t = 0; t < n_out; t++) afm__rmsnorm(s->xn + t * nd, s->x + (logits_from + t) * nd, m->out_norm, d, c->norm_eps);
        afm__matmul(s, m->tok_embd, s->xn, d, n_out, logits, c->vocab_size);
    }
}

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
    float *adjusted;     /* [n_vocab] logits after bias and penalties, when there are any (else NULL) */
    afm_logit_bias *bias;
    uint32_t *seen;      /* [n_vocab] occurrences in the penalty window */
    int32_t *window;     /* [window_cap] the window's tokens, a ring (NULL: unbounded, counts only) */
    int window_cap, window_n, window_head;
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

static afm_result afm__sampler_extras(afm_sampler *sm); /* the sampler additions, at the end of this section */
static const float *afm__sampler_adjust(afm_sampler *sm, const float *logits);

AFMDEF afm_result afm_sampler_create(const afm_sampler_params *params, int n_vocab, const afm_allocator *allocator, afm_sampler **out) {
    const afm_allocator *a = allocator ? allocator : &afm__malloc_allocator;
    afm_sampler *sm;
    uint64_t seed;
    if (!out) return AFM_ERR_ARG;
    *out = NULL;
    if (n_vocab < 1 || (params && (params->top_k < 0 || !(params->top_p >= 0 && params->top_p <= 1) ||
                                   !(params->min_p >= 0 && params->min_p <= 1) || !(params->temperature <= FLT_MAX))))
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
    { afm_result r = afm__sampler_extras(sm); if (r != AFM_OK) { afm_sampler_free(sm); return r; } }
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
    afm__free(&a, sm->adjusted); afm__free(&a, sm->bias); afm__free(&a, sm->seen); afm__free(&a, sm->window);
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
   increasing id order. For greedy sampling the one survivor is the argmax (lowest id on ties).
   allowed (a constraint's mask, one bit per id; NULL: every id) limits the candidates. Returns -1
   when no token can be chosen because a logit is NaN or +inf, or every one is -inf (a broken model
   or adapter; reading the lowest id instead would hide it), and 0 when the mask allows nothing. */
static int afm__sampler_filter(afm_sampler *sm, const float *logits, const uint32_t *allowed) {
    int n = sm->n_vocab, i, nc = 0, best = -1, keep;
    float inv_t;
    logits = afm__sampler_adjust(sm, logits); /* logit bias and penalties, when set */
    if (allowed) { /* a constraint: only the allowed ids take part (a word at a time: masks are sparse) */
        int w, nw = (n + 31) / 32;
        for (w = 0; w < nw; w++)
            for (i = w * 32; allowed[w] && i < w * 32 + 32 && i < n; i++) {
                if (!((allowed[w] >> (i & 31)) & 1)) continue;
                if (!(logits[i] <= FLT_MAX)) return -1; /* NaN or +inf */
                if (best < 0 || logits[i] > logits[best]) best = i;
            }
        if (best < 0) return 0;
        if (!(logits[best] >= -FLT_MAX)) return -1; /* all -inf */
        if (!(sm->p.temperature > 0)) { sm->idx[0] = best; sm->prob[best] = 1; return 1; }
        inv_t = 1.0f / sm->p.temperature;
        for (w = 0; w < nw; w++)
            for (i = w * 32; allowed[w] && i < w * 32 + 32 && i < n; i++) {
                float d, p;
                if (!((allowed[w] >> (i & 31)) & 1)) continue;
                d = logits[i] - logits[best];
                p = d == 0 ? 1.0f : afm__expf(d * inv_t);
                sm->prob[i] = p;
                if (p > 0 && p >= sm->p.min_p) sm->idx[nc++] = i;
            }
    } else {
    best = 0;
    for (i = 0; i < n; i++) {
        if (!(logits[i] <= FLT_MAX)) return -1; /* NaN or +inf */
        if (logits[i] > logits[best]) best = i;
    }
    if (!(logits[best] >= -FLT_MAX)) return -1; /* all -inf */
    if (!(sm->p.temperature > 0)) { sm->idx[0] = best; sm->prob[best] = 1; return 1; }
    inv_t = 1.0f / sm->p.temperature; /* +inf for a temperature below ~3e-39: greedy, ties kept */
    for (i = 0; i < n; i++) {
        float d = logits[i] - logits[best], p = d == 0 ? 1.0f : afm__expf(d * inv_t);
        sm->prob[i] = p;
        if (p > 0 && p >= sm->p.min_p) sm->idx[nc++] = i;
    }
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

/* The id that the uniform number u in [0, 1) picks from weights w over ids idx[0..n) (weights need
   not be normalised): the inverse of their cumulative sum, in increasing id order. */
static int32_t afm__draw_u(double u, const float *w, const int32_t *idx, int n) {
    double sum = 0, r, acc = 0;
    int i;
    for (i = 0; i < n; i++) sum += w[idx[i]];
    r = u * sum;
    for (i = 0; i < n; i++) {
        acc += w[idx[i]];
        if (r < acc) return idx[i];
    }
    return idx[n - 1];
}

/* One token from the filtered logits with the uniform number u (unused when greedy); -1 when the
   logits are not usable, -2 when the mask allows no token (afm__sampler_filter). */
static int32_t afm__sampler_pick(afm_sampler *sm, const float *logits, const uint32_t *allowed, double u) {
    int nc = afm__sampler_filter(sm, logits, allowed);
    if (nc < 0) return -1;
    if (nc == 0) return -2;
    if (!(sm->p.temperature > 0)) return sm->idx[0];
    return afm__draw_u(u, sm->prob, sm->idx, nc);
}

AFMDEF int32_t afm_sampler_sample_masked(afm_sampler *sm, const float *logits, const uint32_t *allowed) {
    int32_t t;
    if (!sm || !logits) return -1;
    t = afm__sampler_pick(sm, logits, allowed, sm->p.temperature > 0 ? afm__rng_uniform(sm->rng) : 0);
    return t < 0 ? -1 : t;
}
AFMDEF int32_t afm_sampler_sample(afm_sampler *sm, const float *logits) { return afm_sampler_sample_masked(sm, logits, NULL); }

#ifdef AFM_TESTING
/* The sampler's full distribution over the vocabulary (zeros outside the filtered set);
   returns the number of candidates, whose ids are left in sm->idx (tests compare against it). */
static int afm__sampler_dist(afm_sampler *sm, const float *logits, float *out) {
    int nc = afm__sampler_filter(sm, logits, NULL), i;
    double sum = 0;
    memset(out, 0, (size_t)sm->n_vocab * sizeof *out);
    for (i = 0; i < nc; i++) sum += sm->prob[sm->idx[i]];
    for (i = 0; i < nc; i++) out[sm->idx[i]] = (float)(sm->prob[sm->idx[i]] / sum);
    return nc;
}
#endif


/* Tests build with AFM_TESTING to plant a wrong acceptance rule and check that the statistics
   catch it; everywhere else the rule is the real one. */
#ifdef AFM_TESTING
static int afm__test_accept_all(const afm_session *s) { return s->test_accept_rule; }
#else
static int afm__test_accept_all(const afm_session *s) { (void)s; return 0; }
#endif

/* ---- Sampler additions: logit bias and penalties (applied to a copy of the logits before
   temperature and the filters), stop strings, exact token counts. ---- */

static afm_result afm__sampler_extras(afm_sampler *sm) {
    const afm_sampler_params *p = &sm->p;
    const afm_allocator *a = &sm->alloc;
    int i, n_banned = 0;
    if (!(p->repeat_penalty >= 0 && p->repeat_penalty <= 1e6f) || !(p->presence_penalty >= -1e6f && p->presence_penalty <= 1e6f) ||
        !(p->frequency_penalty >= -1e6f && p->frequency_penalty <= 1e6f) || p->penalty_last_n < -1 || p->penalty_last_n > (1 << 24) ||
        p->n_logit_bias < 0 || (p->n_logit_bias && !p->logit_bias))
        return AFM_ERR_ARG;
    if (p->n_logit_bias) { /* a copy: the caller's array need not outlive the call */
        if (!(sm->bias = (afm_logit_bias *)afm__alloc(a, (size_t)p->n_logit_bias * sizeof *sm->bias))) return AFM_ERR_NOMEM;
        memcpy(sm->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *sm->bias);
    }
    sm->p.logit_bias = NULL;
    if (p->n_logit_bias || (p->repeat_penalty != 0 && p->repeat_penalty != 1) || p->presence_penalty != 0 || p->frequency_penalty != 0) {
        sm->adjusted = (float *)afm__alloc(a, (size_t)sm->n_vocab * sizeof(float));
        sm->seen = (uint32_t *)afm__calloc(a, (size_t)sm->n_vocab, sizeof(uint32_t));
        sm->window_cap = p->penalty_last_n == 0 ? 64 : p->penalty_last_n;
        if (sm->window_cap > 0) sm->window = (int32_t *)afm__alloc(a, (size_t)sm->window_cap * sizeof(int32_t));
        if (!sm->adjusted || !sm->seen || (sm->window_cap > 0 && !sm->window)) return AFM_ERR_NOMEM;
    }
    for (i = 0; i < p->n_logit_bias; i++) { /* in range, not NaN, never +inf; not every token banned */
        const afm_logit_bias *b = &sm->bias[i];
        if (b->token < 0 || b->token >= sm->n_vocab || !(b->bias == -INFINITY || (b->bias >= -1e6f && b->bias <= 1e6f))) return AFM_ERR_ARG;
        if (b->bias == -INFINITY && !sm->seen[b->token]) { sm->seen[b->token] = 1; n_banned++; }
    }
    if (n_banned == sm->n_vocab) return AFM_ERR_ARG;
    if (sm->seen) memset(sm->seen, 0, (size_t)sm->n_vocab * sizeof(uint32_t));
    return AFM_OK;
}

AFMDEF afm_result afm_sampler_accept(afm_sampler *sm, int32_t token) {
    if (!sm || token < 0 || token >= sm->n_vocab) return AFM_ERR_ARG;
    if (!sm->seen) return AFM_OK; /* no penalties: nothing to remember */
    if (sm->window) {
        if (sm->window_n == sm->window_cap) sm->seen[sm->window[sm->window_head]]--; /* the oldest leaves */
        else sm->window_n++;
        sm->window[sm->window_head] = token;
        sm->window_head = (sm->window_head + 1) % sm->window_cap;
    }
    if (sm->seen[token] < 0xffffffffu) sm->seen[token]++;
    return AFM_OK;
}

/* afm_generate's start: the context's last window of tokens enter the penalty window. */
static void afm__sampler_accept_context(afm_sampler *sm, const int32_t *tokens, int n) {
    int i = sm->window && n > sm->window_cap ? n - sm->window_cap : 0;
    if (!sm->seen) return;
    for (; i < n; i++) afm_sampler_accept(sm, tokens[i]);
}

AFMDEF void afm_sampler_reset(afm_sampler *sm) {
    if (!sm || !sm->seen) return;
    memset(sm->seen, 0, (size_t)sm->n_vocab * sizeof(uint32_t));
    sm->window_n = sm->window_head = 0;
}

/* Saved sampler state: "AFMSMPL1", u32 n_vocab, i32 window (window_cap, 0: counts only, -1: no
   penalties), u32 n, u64 rng[4], then n window tokens oldest first (i32), or n (id, count) pairs of
   u32 with ids increasing. Little-endian. */
#define AFM__SMPL_HEAD 52
static int32_t afm__sampler_window_kind(const afm_sampler *sm) { return !sm->seen ? -1 : sm->window ? sm->window_cap : 0; }

AFMDEF afm_result afm_sampler_save(const afm_sampler *sm, void *buf, size_t cap, size_t *size) {
    unsigned char *o = (unsigned char *)buf;
    uint32_t n = 0, i;
    int k;
    if (!sm || !size) return AFM_ERR_ARG;
    if (sm->window) n = (uint32_t)sm->window_n;
    else if (sm->seen) for (k = 0; k < sm->n_vocab; k++) n += sm->seen[k] != 0;
    *size = AFM__SMPL_HEAD + (size_t)n * (sm->window ? 4 : 8);
    if (!buf) return AFM_OK;
    if (cap < *size) return AFM_ERR_ARG;
    memcpy(o, "AFMSMPL1", 8);
    afm__wr32(o + 8, (uint32_t)sm->n_vocab);
    afm__wr32(o + 12, (uint32_t)afm__sampler_window_kind(sm));
    afm__wr32(o + 16, n);
    for (k = 0; k < 4; k++) afm__wr64(o + 20 + 8 * k, sm->rng[k]);
    o += AFM__SMPL_HEAD;
    if (sm->window) /* oldest first: the ring starts at head once full, at 0 before */
        for (i = 0; i < n; i++)
            afm__wr32(o + 4 * i, (uint32_t)sm->window[(sm->window_n == sm->window_cap ? (uint32_t)sm->window_head + i : i) % (uint32_t)sm->window_cap]);
    else if (sm->seen)
        for (k = 0; k < sm->n_vocab; k++)
            if (sm->seen[k]) { afm__wr32(o, (uint32_t)k); afm__wr32(o + 4, sm->seen[k]); o += 8; }
    return AFM_OK;
}

AFMDEF afm_result afm_sampler_load(afm_sampler *sm, const void *data, size_t size, char *err, size_t errn) {
    const unsigned char *p = (const unsigned char *)data;
    uint32_t n, i, prev = 0;
    int32_t kind;
    int k;
    if (!sm || (!data && size)) return afm__fail(err, errn, AFM_ERR_ARG, "afm_sampler_load: no sampler or no data");
    if (size < AFM__SMPL_HEAD || memcmp(p, "AFMSMPL1", 8))
        return afm__fail(err, errn, AFM_ERR_FORMAT, "sampler state: not a saved sampler state (%zu bytes, no \"AFMSMPL1\" at offset 0)", size);
    if (afm__rd32(p + 8) != (uint32_t)sm->n_vocab)
        return afm__fail(err, errn, AFM_ERR_FORMAT, "sampler state: vocabulary of %u tokens at offset 8, this sampler has %d", afm__rd32(p + 8), sm->n_vocab);
    kind = (int32_t)afm__rd32(p + 12);
    if (kind != afm__sampler_window_kind(sm))
        return afm__fail(err, errn, AFM_ERR_FORMAT, "sampler state: penalty window %d at offset 12, this sampler's is %d (-1: no penalties, 0: unbounded)",
                         (int)kind, (int)afm__sampler_window_kind(sm));
    n = afm__rd32(p + 16);
    if ((kind > 0 && n > (uint32_t)kind) || (kind == 0 && n > (uint32_t)sm->n_vocab) || (kind < 0 && n) ||
        size != AFM__SMPL_HEAD + (size_t)n * (kind > 0 ? 4 : 8))
        return afm__fail(err, errn, AFM_ERR_FORMAT, "sampler state: %u entries at offset 16 do not fit the window or the %zu bytes", n, size);
    for (i = 0; i < n; i++) { /* check everything before changing anything */
        const unsigned char *e = p + AFM__SMPL_HEAD + (size_t)i * (kind > 0 ? 4 : 8);
        uint32_t id = afm__rd32(e);
        if (id >= (uint32_t)sm->n_vocab || (kind == 0 && ((i && id <= prev) || !afm__rd32(e + 4))))
            return afm__fail(err, errn, AFM_ERR_FORMAT, "sampler state: entry %u at offset %zu: token %u out of range, out of order or counted 0",
                             i, (size_t)(e - p), id);
        prev = id;
    }
    afm_sampler_reset(sm);
    for (k = 0; k < 4; k++) sm->rng[k] = afm__rd64(p + 20 + 8 * k);
    for (i = 0; i < n; i++) {
        const unsigned char *e = p + AFM__SMPL_HEAD + (size_t)i * (kind > 0 ? 4 : 8);
        if (kind > 0) afm_sampler_accept(sm, (int32_t)afm__rd32(e));
        else sm->seen[afm__rd32(e)] = afm__rd32(e + 4);
    }
    return AFM_OK;
}

/* The logits the filters see: the caller's, or a copy with the bias added and the penalties applied. */
static const float *afm__sampler_adjust(afm_sampler *sm, const float *logits) {
    const afm_sampler_params *p = &sm->p;
    float *o = sm->adjusted;
    int i;
    if (!o) return logits;
    memcpy(o, logits, (size_t)sm->n_vocab * sizeof(float));
    for (i = 0; i < p->n_logit_bias; i++) o[sm->bias[i].token] += sm->bias[i].bias;
    for (i = 0; i < sm->n_vocab; i++) {
        if (!sm->seen[i]) continue;
        if (p->repeat_penalty > 0 && p->repeat_penalty != 1) o[i] = o[i] > 0 ? o[i] / p->repeat_penalty : o[i] * p->repeat_penalty;
        o[i] -= p->presence_penalty + p->frequency_penalty * (float)sm->seen[i];
    }
    return o;
}

struct afm_stop {
    afm_allocator alloc;
    char **stops;
    size_t *lens, max_len;
    int n, stopped;
    char *held, *out;             /* text not yet shown; what the last call returned */
    size_t n_held, cap;
};

AFMDEF void afm_stop_free(afm_stop *st) {
    int i;
    if (!st) return;
    for (i = 0; i < st->n && st->stops; i++) afm__free(&st->alloc, st->stops[i]);
    afm__free(&st->alloc, st->stops); afm__free(&st->alloc, st->lens);
    afm__free(&st->alloc, st->held); afm__free(&st->alloc, st->out);
    afm__free(&st->alloc, st);
}

AFMDEF afm_result afm_stop_create(const char *const *stops, int n, const afm_allocator *allocator, afm_stop **out) {
    const afm_allocator *a = allocator ? allocator : &afm__malloc_allocator;
    afm_stop *st;
    int i;
    if (!out) return AFM_ERR_ARG;
    *out = NULL;
    if (n < 0 || (n && !stops)) return AFM_ERR_ARG;
    for (i = 0; i < n; i++)
        if (!stops[i] || !stops[i][0]) return AFM_ERR_ARG;
    if (!(st = (afm_stop *)afm__calloc(a, 1, sizeof *st))) return AFM_ERR_NOMEM;
    st->alloc = *a;
    st->n = n;
    st->stops = (char **)afm__calloc(a, (size_t)n + 1, sizeof *st->stops);
    st->lens = (size_t *)afm__calloc(a, (size_t)n + 1, sizeof *st->lens);
    if (!st->stops || !st->lens) { afm_stop_free(st); return AFM_ERR_NOMEM; }
    for (i = 0; i < n; i++) {
        st->lens[i] = strlen(stops[i]);
        if (!(st->stops[i] = (char *)afm__alloc(a, st->lens[i] + 1))) { afm_stop_free(st); return AFM_ERR_NOMEM; }
        memcpy(st->stops[i], stops[i], st->lens[i] + 1);
        if (st->lens[i] > st->max_len) st->max_len = st->lens[i];
    }
    *out = st;
    return AFM_OK;
}

/* Makes room for `need` bytes in held and out. */
static int afm__stop_room(afm_stop *st, size_t need) {
    char *h, *o;
    size_t cap = st->cap ? st->cap : 64;
    if (need <= st->cap) return 1;
    while (cap < need) cap *= 2;
    h = (char *)afm__alloc(&st->alloc, cap);
    o = (char *)afm__alloc(&st->alloc, cap);
    if (!h || !o) { afm__free(&st->alloc, h); afm__free(&st->alloc, o); return 0; }
    if (st->n_held) memcpy(h, st->held, st->n_held);
    afm__free(&st->alloc, st->held); afm__free(&st->alloc, st->out);
    st->held = h; st->out = o; st->cap = cap;
    return 1;
}

AFMDEF int afm_stop_push(afm_stop *st, const char *text, size_t len, const char **out, size_t *n_out) {
    size_t first = (size_t)-1, keep = 0, k, pos;
    int i;
    *out = "";
    *n_out = 0;
    if (st->stopped) return 1;
    if (len > (size_t)-1 / 2 - st->n_held || !afm__stop_room(st, st->n_held + len + 1)) return -1;
    if (len) memcpy(st->held + st->n_held, text, len);
    st->n_held += len;
    /* the earliest stop string in the held text (it can only begin in the held text's last
       max_len - 1 + len bytes, and the held part before the new text matched none) */
    for (i = 0; i < st->n; i++) {
        size_t L = st->lens[i];
        for (pos = 0; pos + L <= st->n_held && pos < first; pos++)
            if (!memcmp(st->held + pos, st->stops[i], L)) { first = pos; break; }
    }
    if (first != (size_t)-1) {
        memcpy(st->out, st->held, first);
        *out = st->out;
        *n_out = first;
        st->stopped = 1;
        st->n_held = 0;
        return 1;
    }
    /* hold back the longest tail that is the beginning of a stop string */
    for (i = 0; i < st->n; i++)
        for (k = st->lens[i] - 1; k > keep; k--)
            if (k <= st->n_held && !memcmp(st->held + st->n_held - k, st->stops[i], k)) { keep = k; break; }
    memcpy(st->out, st->held, st->n_held - keep);
    *out = st->out;
    *n_out = st->n_held - keep;
    memmove(st->held, st->held + st->n_held - keep, keep);
    st->n_held = keep;
    return 0;
}

AFMDEF void afm_stop_flush(afm_stop *st, const char **out, size_t *n_out) {
    *out = "";
    *n_out = 0;
    if (st->stopped || !st->n_held) return;
    memcpy(st->out, st->held, st->n_held);
    *out = st->out;
    *n_out = st->n_held;
    st->n_held = 0;
}

AFMDEF long afm_token_count(const afm_tokenizer *tok, const char *text, size_t len, unsigned flags) {
    size_t n = 0;
    afm_result r = afm_tokenize(tok, text, len, flags, NULL, 0, &n);
    return (r == AFM_OK || (r == AFM_ERR_ARG && n > 0)) && n <= (size_t)0x7fffffff ? (long)n : -1;
}

AFMDEF long afm_chat_token_count(const afm_tokenizer *tok, const afm_chat_message *messages, int n_messages,
                                 const char *const *tools, int n_tools, int add_generation_prompt) {
    size_t n = 0;
    afm_result r = afm_chat_tokenize(tok, messages, n_messages, tools, n_tools, add_generation_prompt, NULL, 0, &n);
    return (r == AFM_OK || (r == AFM_ERR_ARG && n > 0)) && n <= (size_t)0x7fffffff ? (long)n : -1;
}

/* ======================================================================================== */
/* ==== CONSTRAINTS: regular expressions, GBNF grammars, JSON Schema -> exact token masks == */
/* ======================================================================================== */

/* Every front end (regular expression, GBNF grammar, JSON Schema) compiles to one grammar over
   bytes: rules, each a list of alternatives, each a sequence of elements that are a byte range or a
   reference to a rule. Code points become UTF-8 byte sequences, so matching goes byte by byte and a
   token boundary may fall anywhere inside a character.
   The matcher is a pushdown automaton that follows every parse at once. A stack is a chain of
   frames (a position in an alternative, and the frame below), interned so that equal stacks are
   one id; a matcher state is the set of stacks whose top is a byte range, plus whether the input
   may end here. States are interned as well and their transitions (state, byte) -> state memoised,
   so after a short warm-up the matcher runs as a lazily built DFA. A reference in tail position
   replaces its frame instead of pushing one, so a loop (a string's characters, a number's digits)
   comes back to the very same state after each character.
   The token mask walks a prefix tree of the vocabulary's byte strings with those transitions and
   prunes at the first dead byte: a token is allowed iff the walk reaches its node alive. Masks are
   cached per state. A live state can always be completed because the compiler refuses rules that
   never finish, so "alive" is exactly "extendable to a complete match". */

#define AFM__G_END 0xFFFFFFFFu       /* ends every alternative */
#define AFM__G_BYTES 0x80000000u     /* | hi << 8 | lo: one byte in [lo, hi]; else a rule id */
#define AFM__G_MAX_ELEMS (1u << 23)  /* grammar size limit (32 MB of elements) */
#define AFM__G_MAX_REPEAT 100000     /* x{n,m}: n, m at most this */
#define AFM__G_MAX_NEST 200          /* parentheses, schema levels and $ref chains */

typedef struct afm__grammar {
    afm_allocator alloc;
    uint32_t *el;                 /* every alternative's elements, each ended by AFM__G_END */
    size_t n_el, cap_el;
    uint32_t *alt_start;          /* alternative i starts at el[alt_start[i]] */
    int32_t *alt_rule;            /* and belongs to this rule */
    size_t n_alt, cap_alt;
    uint32_t *name_off;           /* rule r is called names + name_off[r] (for messages) */
    uint8_t *defined;             /* GBNF: the rule has a definition (not only a use) */
    int32_t n_rule;
    size_t cap_rule;
    char *names;
    size_t n_names, cap_names;
    uint32_t *rule_alt0;          /* after packing: rule r's alternatives are ralt[rule_alt0[r] .. rule_alt0[r + 1]) */
    uint32_t *ralt;
    uint8_t brep[256];            /* after packing: the first byte of b's class (bytes no range tells apart) */
    int32_t root;
    char *err;
    size_t err_size;
    int failed;
} afm__grammar;

typedef struct afm__gseq { uint32_t *e; size_t n, cap; } afm__gseq;

/* Grows *p (of *cap elements of size sz) to hold need elements; 0 when out of memory. */
static int afm__grow(const afm_allocator *a, void **p, size_t *cap, size_t need, size_t sz) {
    size_t nc = *cap ? *cap : 16;
    void *np;
    if (need <= *cap) return 1;
    while (nc < need) {
        if (nc > ((size_t)-1 >> 2) / sz) return 0;
        nc *= 2;
    }
    np = afm__alloc(a, nc * sz);
    if (!np) return 0;
    if (*cap) memcpy(np, *p, *cap * sz);
    afm__free(a, *p);
    *p = np;
    *cap = nc;
    return 1;
}

/* Records the first error (later ones are consequences) and returns 0. */
static int afm__g_fail(afm__grammar *g, const char *fmt, ...) {
    if (!g->failed && g->err && g->err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g->err, g->err_size, fmt, ap);
        va_end(ap);
    }
    g->failed = 1;
    return 0;
}
static int afm__g_nomem(afm__grammar *g) { return afm__g_fail(g, "out of memory"); }

static void afm__g_free(afm__grammar *g) {
    afm__free(&g->alloc, g->el);
    afm__free(&g->alloc, g->alt_start);
    afm__free(&g->alloc, g->alt_rule);
    afm__free(&g->alloc, g->name_off);
    afm__free(&g->alloc, g->defined);
    afm__free(&g->alloc, g->names);
    afm__free(&g->alloc, g->rule_alt0);
    afm__free(&g->alloc, g->ralt);
    memset(g, 0, sizeof *g);
}

static const char *afm__g_name(const afm__grammar *g, int32_t r) { return g->names + g->name_off[r]; }

/* A new rule without alternatives; -1 on failure. */
static int32_t afm__g_rule(afm__grammar *g, const char *name, size_t len) {
    int32_t r = g->n_rule;
    size_t cr = g->cap_rule;
    if (g->failed) return -1;
    if (r >= 0x7FFFFFF) return (int32_t)afm__g_fail(g, "grammar too large") - 1;
    if (len > 120) len = 120;
    if (!afm__grow(&g->alloc, (void **)&g->name_off, &cr, (size_t)r + 1, sizeof *g->name_off) ||
        !afm__grow(&g->alloc, (void **)&g->defined, &g->cap_rule, (size_t)r + 1, 1) ||
        !afm__grow(&g->alloc, (void **)&g->names, &g->cap_names, g->n_names + len + 1, 1))
        return (int32_t)afm__g_nomem(g) - 1;
    g->name_off[r] = (uint32_t)g->n_names;
    memcpy(g->names + g->n_names, name, len);
    g->names[g->n_names + len] = 0;
    g->n_names += len + 1;
    g->defined[r] = 1;
    g->n_rule++;
    return r;
}

static int afm__g_push(afm__grammar *g, afm__gseq *s, uint32_t e) {
    if (g->failed) return 0;
    if (!afm__grow(&g->alloc, (void **)&s->e, &s->cap, s->n + 1, sizeof *s->e)) return afm__g_nomem(g);
    s->e[s->n++] = e;
    return 1;
}
static uint32_t afm__g_bytes(unsigned lo, unsigned hi) { return AFM__G_BYTES | hi << 8 | lo; }
static int afm__g_lit(afm__grammar *g, afm__gseq *s, const char *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!afm__g_push(g, s, afm__g_bytes((unsigned char)p[i], (unsigned char)p[i]))) return 0;
    return 1;
}
static void afm__g_seq_free(afm__grammar *g, afm__gseq *s) {
    afm__free(&g->alloc, s->e);
    memset(s, 0, sizeof *s);
}

/* Adds the alternative s (may be empty) to rule r. */
static int afm__g_alt(afm__grammar *g, int32_t r, const afm__gseq *s) {
    size_t ca = g->cap_alt;
    if (g->failed || r < 0) return 0;
    if (g->n_el + s->n + 1 > AFM__G_MAX_ELEMS) return afm__g_fail(g, "grammar too large (more than %u elements)", AFM__G_MAX_ELEMS);
    if (!afm__grow(&g->alloc, (void **)&g->el, &g->cap_el, g->n_el + s->n + 1, sizeof *g->el) ||
        !afm__grow(&g->alloc, (void **)&g->alt_start, &ca, g->n_alt + 1, sizeof *g->alt_start) ||
        !afm__grow(&g->alloc, (void **)&g->alt_rule, &g->cap_alt, g->n_alt + 1, sizeof *g->alt_rule))
        return afm__g_nomem(g);
    g->alt_start[g->n_alt] = (uint32_t)g->n_el;
    g->alt_rule[g->n_alt++] = r;
    if (s->n) memcpy(g->el + g->n_el, s->e, s->n * sizeof *s->e);
    g->n_el += s->n;
    g->el[g->n_el++] = AFM__G_END;
    return 1;
}

/* A rule with the one alternative s; s is freed. */
static int32_t afm__g_rule_of(afm__grammar *g, const char *name, afm__gseq *s) {
    int32_t r = afm__g_rule(g, name, strlen(name));
    if (r >= 0 && !afm__g_alt(g, r, s)) r = -1;
    afm__g_seq_free(g, s);
    return r;
}

/* Appends e repeated min..max times (max -1: unbounded) to s. Optional copies nest to the right
   (x (x (x)?)?)?, so every reference sits in tail position and the state does not grow. */
static int afm__g_repeat(afm__grammar *g, afm__gseq *s, uint32_t e, long min, long max, const char *name) {
    afm__gseq t;
    int32_t r = -1, prev = -1;
    long i;
    if (min < 0 || min > AFM__G_MAX_REPEAT || max > AFM__G_MAX_REPEAT || (max >= 0 && max < min))
        return afm__g_fail(g, "%s: bad repetition count {%ld,%ld} (0 <= min <= max <= %d)", name, min, max, AFM__G_MAX_REPEAT);
    for (i = 0; i < min; i++)
        if (!afm__g_push(g, s, e)) return 0;
    memset(&t, 0, sizeof t);
    if (max < 0) { /* r ::= e r | () */
        if ((r = afm__g_rule(g, name, strlen(name))) < 0) return 0;
        if (!afm__g_push(g, &t, e) || !afm__g_push(g, &t, (uint32_t)r) || !afm__g_alt(g, r, &t)) goto fail;
        t.n = 0;
        if (!afm__g_alt(g, r, &t)) goto fail;
    } else {
        for (i = min; i < max; i++) { /* r ::= e prev | () */
            if ((r = afm__g_rule(g, name, strlen(name))) < 0) goto fail;
            t.n = 0;
            if (!afm__g_push(g, &t, e) || (prev >= 0 && !afm__g_push(g, &t, (uint32_t)prev)) || !afm__g_alt(g, r, &t)) goto fail;
            t.n = 0;
            if (!afm__g_alt(g, r, &t)) goto fail;
            prev = r;
        }
    }
    afm__g_seq_free(g, &t);
    return r < 0 || afm__g_push(g, s, (uint32_t)r);
fail:
    afm__g_seq_free(g, &t);
    return 0;
}

/* ---- character classes: code point ranges -> UTF-8 byte sequences ---- */
typedef struct afm__cprange { uint32_t lo, hi; } afm__cprange;
typedef struct afm__cpset { afm__cprange *r; size_t n, cap; } afm__cpset;

static int afm__cp_add(afm__grammar *g, afm__cpset *c, uint32_t lo, uint32_t hi) {
    if (!afm__grow(&g->alloc, (void **)&c->r, &c->cap, c->n + 1, sizeof *c->r)) return afm__g_nomem(g);
    c->r[c->n].lo = lo;
    c->r[c->n].hi = hi;
    c->n++;
    return 1;
}
static int afm__cp_cmp(const void *a, const void *b) {
    const afm__cprange *x = (const afm__cprange *)a, *y = (const afm__cprange *)b;
    return (x->lo > y->lo) - (x->lo < y->lo);
}
/* Sorts and merges; with negate, the complement in [0, 0x10FFFF]. Surrogates are never characters. */
static int afm__cp_normalize(afm__grammar *g, afm__cpset *c, int negate) {
    size_t i, m = 0;
    uint32_t next = 0;
    afm__cpset o;
    memset(&o, 0, sizeof o);
    if (c->n > 1) qsort(c->r, c->n, sizeof *c->r, afm__cp_cmp);
    for (i = 0; i < c->n; i++) {
        if (m && c->r[i].lo <= c->r[m - 1].hi + 1) {
            if (c->r[i].hi > c->r[m - 1].hi) c->r[m - 1].hi = c->r[i].hi;
        } else c->r[m++] = c->r[i];
    }
    c->n = m;
    if (negate) {
        for (i = 0; i < c->n; i++) {
            if (c->r[i].lo > next && !afm__cp_add(g, &o, next, c->r[i].lo - 1)) goto fail;
            next = c->r[i].hi + 1;
        }
        if (next <= 0x10FFFF && !afm__cp_add(g, &o, next, 0x10FFFF)) goto fail;
        afm__free(&g->alloc, c->r);
        *c = o;
        memset(&o, 0, sizeof o);
    }
    for (i = 0; i < c->n; i++) { /* cut out the surrogates */
        afm__cprange r = c->r[i];
        if (r.hi > 0x10FFFF) c->r[i].hi = r.hi = 0x10FFFF;
        if (r.hi < 0xD800 || r.lo > 0xDFFF) continue;
        if (r.lo < 0xD800) {
            c->r[i].hi = 0xD7FF;
            if (r.hi > 0xDFFF && !afm__cp_add(g, c, 0xE000, r.hi)) goto fail;
        } else if (r.hi > 0xDFFF) c->r[i].lo = 0xE000;
        else c->r[i].lo = 1, c->r[i].hi = 0; /* empty */
    }
    return 1;
fail:
    afm__free(&g->alloc, o.r);
    return 0;
}

/* Adds to rule r one alternative per run of UTF-8 byte sequences of the code points [a, b]
   (split until every byte position is one range: the classic construction). */
static int afm__g_utf8(afm__grammar *g, int32_t r, uint32_t a, uint32_t b) {
    static const uint32_t lim[3] = { 0x7F, 0x7FF, 0xFFFF };
    char ea[4], eb[4];
    afm__gseq s;
    int i, n, ok = 1;
    if (a > b) return 1;
    for (i = 0; i < 3; i++)
        if (a <= lim[i] && b > lim[i]) return afm__g_utf8(g, r, a, lim[i]) && afm__g_utf8(g, r, lim[i] + 1, b);
    n = b < 0x80 ? 1 : b < 0x800 ? 2 : b < 0x10000 ? 3 : 4;
    for (i = 1; i < n; i++) {
        uint32_t m = (1u << (6 * i)) - 1;
        if ((a & ~m) != (b & ~m)) {
            if ((a & m) != 0) return afm__g_utf8(g, r, a, a | m) && afm__g_utf8(g, r, (a | m) + 1, b);
            if ((b & m) != m) return afm__g_utf8(g, r, a, (b & ~m) - 1) && afm__g_utf8(g, r, b & ~m, b);
        }
    }
    afm__utf8_put(ea, a);
    afm__utf8_put(eb, b);
    memset(&s, 0, sizeof s);
    for (i = 0; i < n && ok; i++) ok = afm__g_push(g, &s, afm__g_bytes((unsigned char)ea[i], (unsigned char)eb[i]));
    ok = ok && afm__g_alt(g, r, &s);
    afm__g_seq_free(g, &s);
    return ok;
}

/* The JSON string form of a character that must be escaped ('"', '\\', control characters). */
static size_t afm__json_escape_char(uint32_t c, char *o) {
    static const char *hex = "0123456789abcdef";
    o[0] = '\\';
    switch (c) {
    case '"': o[1] = '"'; return 2;
    case '\\': o[1] = '\\'; return 2;
    case '\n': o[1] = 'n'; return 2;
    case '\r': o[1] = 'r'; return 2;
    case '\t': o[1] = 't'; return 2;
    case '\b': o[1] = 'b'; return 2;
    case '\f': o[1] = 'f'; return 2;
    default: o[1] = 'u'; o[2] = '0'; o[3] = '0'; o[4] = hex[(c >> 4) & 15]; o[5] = hex[c & 15]; return 6;
    }
}
static int afm__json_needs_escape(uint32_t c) { return c < 0x20 || c == '"' || c == '\\'; }

/* Appends to s one element matching a character of the class c (consumed). json: the class is
   written inside a JSON string, characters that need it escaped (one fixed spelling each). */
static int afm__g_class(afm__grammar *g, afm__gseq *s, afm__cpset *c, int negate, int json, const char *name) {
    int32_t r;
    size_t i;
    int ok = 1;
    uint32_t k;
    if (!afm__cp_normalize(g, c, negate)) goto done;
    if (c->n == 1 && c->r[0].lo <= c->r[0].hi && c->r[0].hi < 0x80 &&
        !(json && (c->r[0].lo < 0x20 || (c->r[0].lo <= '"' && c->r[0].hi >= '"') || (c->r[0].lo <= '\\' && c->r[0].hi >= '\\')))) {
        ok = afm__g_push(g, s, afm__g_bytes(c->r[0].lo, c->r[0].hi));
        goto done;
    }
    if ((r = afm__g_rule(g, name, strlen(name))) < 0) { ok = 0; goto done; }
    for (i = 0; i < c->n && ok; i++) {
        afm__cprange x = c->r[i];
        if (x.lo > x.hi) continue;
        if (json && x.lo < 0x60) { /* the characters below '`' that need escaping go one by one */
            uint32_t top = x.hi < 0x5F ? x.hi : 0x5F, run = x.lo;
            for (k = x.lo; k <= top + 1 && ok; k++) {
                if (k <= top && !afm__json_needs_escape(k)) continue;
                if (run < k) ok = afm__g_utf8(g, r, run, k - 1);
                if (k <= top && ok) {
                    char e[6];
                    afm__gseq t;
                    memset(&t, 0, sizeof t);
                    ok = afm__g_lit(g, &t, e, afm__json_escape_char(k, e)) && afm__g_alt(g, r, &t);
                    afm__g_seq_free(g, &t);
                }
                run = k + 1;
            }
            if (x.hi > 0x5F && ok) ok = afm__g_utf8(g, r, 0x60, x.hi);
        } else ok = afm__g_utf8(g, r, x.lo, x.hi);
    }
    ok = ok && afm__g_push(g, s, (uint32_t)r);
done:
    afm__free(&g->alloc, c->r);
    memset(c, 0, sizeof *c);
    return ok && !g->failed;
}

/* Appends one code point (a one-character class). */
static int afm__g_char(afm__grammar *g, afm__gseq *s, uint32_t cp, int json, const char *name) {
    afm__cpset c;
    memset(&c, 0, sizeof c);
    if (!json && cp < 0x80) return afm__g_push(g, s, afm__g_bytes(cp, cp));
    return afm__cp_add(g, &c, cp, cp) && afm__g_class(g, s, &c, 0, json, name);
}

/* Decodes one UTF-8 character at p[*i] (an invalid byte stands for itself as U+FFFD would be
   wrong: grammars are UTF-8, so it is an error); returns the code point or -1. */
static long afm__utf8_get(const char *p, size_t n, size_t *i) {
    const unsigned char *u = (const unsigned char *)p + *i;
    size_t left = n - *i;
    uint32_t c;
    int k, len;
    if (u[0] < 0x80) { (*i)++; return u[0]; }
    if (u[0] >= 0xC2 && u[0] < 0xE0) { len = 2; c = u[0] & 0x1F; }
    else if (u[0] >= 0xE0 && u[0] < 0xF0) { len = 3; c = u[0] & 0x0F; }
    else if (u[0] >= 0xF0 && u[0] < 0xF5) { len = 4; c = u[0] & 0x07; }
    else return -1;
    if (left < (size_t)len) return -1;
    for (k = 1; k < len; k++) {
        if ((u[k] & 0xC0) != 0x80) return -1;
        c = c << 6 | (u[k] & 0x3F);
    }
    if ((len == 3 && c < 0x800) || (len == 4 && (c < 0x10000 || c > 0x10FFFF)) || (c >= 0xD800 && c <= 0xDFFF)) return -1;
    *i += (size_t)len;
    return (long)c;
}

static int afm__hexval(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}
/* The escape after a backslash at s[*i] shared by regular expressions and GBNF: \n \r \t \f \v \0
   \xHH \uHHHH \UHHHHHHHH, or any other character standing for itself. -1 for a bad escape. */
static long afm__escape(const char *s, size_t n, size_t *i) {
    char c;
    int digits = 0, k;
    long v = 0;
    if (*i >= n) return -1;
    c = s[*i];
    switch (c) {
    case 'n': (*i)++; return '\n';
    case 'r': (*i)++; return '\r';
    case 't': (*i)++; return '\t';
    case 'f': (*i)++; return '\f';
    case 'v': (*i)++; return '\v';
    case '0': (*i)++; return 0;
    case 'x': digits = 2; break;
    case 'u': digits = 4; break;
    case 'U': digits = 8; break;
    default: return afm__utf8_get(s, n, i);
    }
    if (n - *i <= (size_t)digits) return -1;
    for (k = 1; k <= digits; k++) {
        int h = afm__hexval(s[*i + (size_t)k]);
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    *i += (size_t)digits + 1;
    return v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) ? -1 : v;
}

/* ---- checks after building: every rule finishes, no left recursion; then the packed form ---- */

/* Rules can finish (derive some byte string): worklist over alternatives, each waiting for the
   rule references it still has. */
static int afm__g_check_finish(afm__grammar *g, uint8_t *ok_rule, int nullable) {
    const afm_allocator *a = &g->alloc;
    size_t i, n_occ = 0;
    uint32_t *need = (uint32_t *)afm__calloc(a, g->n_alt + 1, sizeof *need);
    uint32_t *occ0 = (uint32_t *)afm__calloc(a, (size_t)g->n_rule + 2, sizeof *occ0);
    uint32_t *occ = NULL, *fill = NULL, *queue = NULL;
    size_t qh = 0, qt = 0;
    int res = 0;
    if (!need || !occ0) goto out;
    for (i = 0; i < g->n_alt; i++) {
        const uint32_t *e = g->el + g->alt_start[i];
        for (; *e != AFM__G_END; e++) {
            if (*e & AFM__G_BYTES) { if (nullable) need[i] = 0x80000000u; continue; }
            need[i]++;
            occ0[*e + 1]++;
            n_occ++;
        }
    }
    for (i = 0; i < (size_t)g->n_rule; i++) occ0[i + 1] += occ0[i];
    occ = (uint32_t *)afm__alloc(a, (n_occ + 1) * sizeof *occ);
    fill = (uint32_t *)afm__calloc(a, (size_t)g->n_rule + 1, sizeof *fill);
    queue = (uint32_t *)afm__alloc(a, ((size_t)g->n_rule + 1) * sizeof *queue);
    if (!occ || !fill || !queue) goto out;
    for (i = 0; i < g->n_alt; i++) {
        const uint32_t *e = g->el + g->alt_start[i];
        for (; *e != AFM__G_END; e++)
            if (!(*e & AFM__G_BYTES)) occ[occ0[*e] + fill[*e]++] = (uint32_t)i;
    }
    memset(ok_rule, 0, (size_t)g->n_rule);
    for (i = 0; i < g->n_alt; i++)
        if (need[i] == 0 && !ok_rule[g->alt_rule[i]]) { ok_rule[g->alt_rule[i]] = 1; queue[qt++] = (uint32_t)g->alt_rule[i]; }
    while (qh < qt) {
        uint32_t r = queue[qh++], k;
        for (k = occ0[r]; k < occ0[r + 1]; k++) {
            uint32_t al = occ[k];
            if (need[al] & 0x80000000u) continue;
            if (--need[al] == 0 && !ok_rule[g->alt_rule[al]]) { ok_rule[g->alt_rule[al]] = 1; queue[qt++] = (uint32_t)g->alt_rule[al]; }
        }
    }
    res = 1;
out:
    afm__free(a, need);
    afm__free(a, occ0);
    afm__free(a, occ);
    afm__free(a, fill);
    afm__free(a, queue);
    return res || afm__g_nomem(g);
}

/* Left recursion that grows the stack: a rule reaching itself without reading a byte through a
   reference that is not the last element of its alternative (tail references replace their frame
   and the matcher's duplicate check ends such loops). Strongly connected components of the
   "leftmost reference" graph, iterative Tarjan. */
static int afm__g_check_left(afm__grammar *g, const uint8_t *nullable) {
    const afm_allocator *a = &g->alloc;
    int32_t R = g->n_rule, r, idx = 0, sp = 0, cs = 0;
    int32_t *ix = (int32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *ix), *low = (int32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *low);
    int32_t *comp = (int32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *comp), *stk = (int32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *stk);
    int32_t *cr = (int32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *cr);
    uint32_t *ca = (uint32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *ca), *ce = (uint32_t *)afm__alloc(a, ((size_t)R + 1) * sizeof *ce);
    uint8_t *on = (uint8_t *)afm__calloc(a, (size_t)R + 1, 1);
    int res = 0, n_comp = 0;
    if (!ix || !low || !comp || !stk || !cr || !ca || !ce || !on) { afm__g_nomem(g); goto out; }
    for (r = 0; r < R; r++) ix[r] = -1;
    for (r = 0; r < R; r++) {
        if (ix[r] >= 0) continue;
        cr[0] = r; ca[0] = g->rule_alt0[r]; ce[0] = 0; cs = 1;
        ix[r] = low[r] = idx++; stk[sp++] = r; on[r] = 1;
        while (cs > 0) {
            int32_t u = cr[cs - 1], v = -1;
            /* the next leftmost reference of u: alternative ca, element offset ce */
            while (ca[cs - 1] < g->rule_alt0[u + 1]) {
                const uint32_t *e = g->el + g->ralt[ca[cs - 1]];
                uint32_t k = ce[cs - 1], j;
                int blocked = 0;
                for (j = 0; j < k && !blocked; j++) blocked = (e[j] & AFM__G_BYTES) || !nullable[e[j]];
                if (blocked || e[k] == AFM__G_END || (e[k] & AFM__G_BYTES)) { ca[cs - 1]++; ce[cs - 1] = 0; continue; }
                ce[cs - 1]++;
                v = (int32_t)e[k];
                break;
            }
            if (v < 0) { /* u is done */
                cs--;
                if (low[u] == ix[u]) {
                    int32_t w;
                    do { w = stk[--sp]; on[w] = 0; comp[w] = n_comp; } while (w != u);
                    n_comp++;
                }
                if (cs > 0 && low[u] < low[cr[cs - 1]]) low[cr[cs - 1]] = low[u];
                continue;
            }
            if (ix[v] < 0) {
                ix[v] = low[v] = idx++; stk[sp++] = v; on[v] = 1;
                cr[cs] = v; ca[cs] = g->rule_alt0[v]; ce[cs] = 0; cs++;
            } else if (on[v] && ix[v] < low[u]) low[u] = ix[v];
        }
    }
    for (r = 0; r < R; r++) { /* a growing edge inside a component is an endless loop */
        uint32_t al;
        for (al = g->rule_alt0[r]; al < g->rule_alt0[r + 1]; al++) {
            const uint32_t *e = g->el + g->ralt[al];
            for (; *e != AFM__G_END && !(*e & AFM__G_BYTES); e++) {
                if (e[1] != AFM__G_END && comp[*e] == comp[r]) {
                    afm__g_fail(g, "left recursion: rule '%s' can reach itself through '%s' without reading a character",
                                afm__g_name(g, r), afm__g_name(g, (int32_t)*e));
                    goto out;
                }
                if (!nullable[*e]) break;
            }
        }
    }
    res = 1;
out:
    afm__free(a, ix); afm__free(a, low); afm__free(a, comp); afm__free(a, stk);
    afm__free(a, cr); afm__free(a, ca); afm__free(a, ce); afm__free(a, on);
    return res;
}

/* Packs alternatives by rule and runs the checks. */
static int afm__g_finish(afm__grammar *g, int32_t root) {
    const afm_allocator *a = &g->alloc;
    uint8_t *fin = NULL, *nul = NULL;
    uint32_t *fill = NULL;
    size_t i;
    int32_t r;
    if (g->failed) return 0;
    g->root = root;
    for (r = 0; r < g->n_rule; r++)
        if (!g->defined[r]) return afm__g_fail(g, "rule '%s' is used but never defined", afm__g_name(g, r));
    g->rule_alt0 = (uint32_t *)afm__calloc(a, (size_t)g->n_rule + 2, sizeof *g->rule_alt0);
    g->ralt = (uint32_t *)afm__alloc(a, (g->n_alt + 1) * sizeof *g->ralt);
    fill = (uint32_t *)afm__calloc(a, (size_t)g->n_rule + 1, sizeof *fill);
    fin = (uint8_t *)afm__alloc(a, (size_t)g->n_rule + 1);
    nul = (uint8_t *)afm__alloc(a, (size_t)g->n_rule + 1);
    if (!g->rule_alt0 || !g->ralt || !fill || !fin || !nul) { afm__g_nomem(g); goto out; }
    for (i = 0; i < g->n_alt; i++) g->rule_alt0[g->alt_rule[i] + 1]++;
    for (r = 0; r < g->n_rule; r++) g->rule_alt0[r + 1] += g->rule_alt0[r];
    for (i = 0; i < g->n_alt; i++) g->ralt[g->rule_alt0[g->alt_rule[i]] + fill[g->alt_rule[i]]++] = g->alt_start[i];
    if (!afm__g_check_finish(g, fin, 0) || !afm__g_check_finish(g, nul, 1)) goto out;
    for (r = 0; r < g->n_rule; r++) /* the cause first (a rule without alternatives), then what it blocks */
        if (g->rule_alt0[r] == g->rule_alt0[r + 1]) { afm__g_fail(g, "rule '%s' matches nothing (an empty character class?)", afm__g_name(g, r)); goto out; }
    for (r = 0; r < g->n_rule; r++)
        if (!fin[r]) { afm__g_fail(g, "rule '%s' can never finish: every alternative needs the rule itself again", afm__g_name(g, r)); goto out; }
    afm__g_check_left(g, nul);
    { /* byte classes: a range starts a class at lo and at hi + 1, so bytes between two such
         boundaries pass every range test alike and step every state to the same state */
        uint8_t cut[257];
        unsigned b;
        memset(cut, 0, sizeof cut);
        for (i = 0; i < g->n_el; i++)
            if (g->el[i] != AFM__G_END && (g->el[i] & AFM__G_BYTES)) { cut[g->el[i] & 0xFF] = 1; cut[((g->el[i] >> 8) & 0xFF) + 1] = 1; }
        for (b = 0; b < 256; b++) g->brep[b] = (uint8_t)(b == 0 || cut[b] ? b : g->brep[b - 1]);
    }
out:
    afm__free(a, fill);
    afm__free(a, fin);
    afm__free(a, nul);
    return !g->failed;
}

/* ---- regular expressions: | * + ? {n} {n,} {n,m} (lazy forms too), ( ) (?: ) (?<name> ), [ ] [^ ],
   . (any character but \n), \d \w \s \D \W \S, escapes; ^ and $ only at the ends. A match is the
   whole output. No backreferences or lookaround (they are not regular): a clear error. ---- */
typedef struct afm__re {
    afm__grammar *g;
    const char *s;
    size_t n, i;
    int json, depth;
    const char *what; /* "regex" or "pattern at /path" */
} afm__re;

static int afm__re_fail(afm__re *r, const char *why) {
    return afm__g_fail(r->g, "%s: %s at offset %lu", r->what, why, (unsigned long)r->i);
}

/* \d \w \s and their negations as ranges into c; 0 if e is not one of them. */
static int afm__re_shorthand(afm__grammar *g, afm__cpset *c, char e, int *negate) {
    char l = (char)(e | 0x20);
    int ok;
    if (l != 'd' && l != 'w' && l != 's') return 0;
    *negate = e != l;
    if (l == 'd') ok = afm__cp_add(g, c, '0', '9');
    else if (l == 'w') ok = afm__cp_add(g, c, '0', '9') && afm__cp_add(g, c, 'A', 'Z') && afm__cp_add(g, c, '_', '_') && afm__cp_add(g, c, 'a', 'z');
    else ok = afm__cp_add(g, c, '\t', '\r') && afm__cp_add(g, c, ' ', ' ');
    return ok ? 1 : -1;
}

/* A bracket class [...] (s[i] is just past '['), into c. */
static int afm__re_class(afm__re *r, afm__cpset *c, int *negate) {
    const char *s = r->s;
    int first = 1;
    *negate = 0;
    if (r->i < r->n && s[r->i] == '^') { *negate = 1; r->i++; }
    for (;;) {
        long lo, hi;
        if (r->i >= r->n) return afm__re_fail(r, "unterminated character class");
        if (s[r->i] == ']' && !first) { r->i++; return 1; }
        first = 0;
        if (s[r->i] == '\\') {
            int neg2 = 0, k;
            afm__cpset sub;
            r->i++;
            memset(&sub, 0, sizeof sub);
            if (r->i < r->n && (k = afm__re_shorthand(r->g, &sub, s[r->i], &neg2)) != 0) {
                size_t q;
                r->i++;
                if (k < 0) return 0;
                if (neg2) { /* [\D] etc.: the complement's ranges */
                    if (!afm__cp_normalize(r->g, &sub, 1)) return 0;
                }
                for (q = 0; q < sub.n; q++)
                    if (!afm__cp_add(r->g, c, sub.r[q].lo, sub.r[q].hi)) { afm__free(&r->g->alloc, sub.r); return 0; }
                afm__free(&r->g->alloc, sub.r);
                continue;
            }
            if (r->i < r->n && s[r->i] == 'b') { lo = 8; r->i++; }
            else if ((lo = afm__escape(s, r->n, &r->i)) < 0) return afm__re_fail(r, "bad escape in a character class");
        } else if ((lo = afm__utf8_get(s, r->n, &r->i)) < 0) return afm__re_fail(r, "invalid UTF-8");
        hi = lo;
        if (r->i + 1 < r->n && s[r->i] == '-' && s[r->i + 1] != ']') {
            r->i++;
            if (s[r->i] == '\\') {
                r->i++;
                if ((hi = afm__escape(s, r->n, &r->i)) < 0) return afm__re_fail(r, "bad escape in a character class");
            } else if ((hi = afm__utf8_get(s, r->n, &r->i)) < 0) return afm__re_fail(r, "invalid UTF-8");
            if (hi < lo) return afm__re_fail(r, "character range out of order");
        }
        if (!afm__cp_add(r->g, c, (uint32_t)lo, (uint32_t)hi)) return 0;
    }
}

static int32_t afm__re_alternation(afm__re *r);

/* One atom, appended to s as one element; 0 on error. */
static int afm__re_atom(afm__re *r, afm__gseq *s) {
    const char *p = r->s;
    afm__cpset c;
    int negate = 0, k;
    long cp;
    memset(&c, 0, sizeof c);
    switch (p[r->i]) {
    case '(': {
        int32_t sub;
        r->i++;
        if (r->i < r->n && p[r->i] == '?') {
            if (r->i + 1 < r->n && p[r->i + 1] == ':') r->i += 2;
            else if (r->i + 2 < r->n && (p[r->i + 1] == '<' || (p[r->i + 1] == 'P' && p[r->i + 2] == '<')) &&
                     p[r->i + 2] != '=' && p[r->i + 2] != '!') { /* a named group */
                while (r->i < r->n && p[r->i] != '>') r->i++;
                if (r->i >= r->n) return afm__re_fail(r, "unterminated group name");
                r->i++;
            } else return afm__re_fail(r, "unsupported group (lookaround, flags and conditionals are not regular)");
        }
        if (++r->depth > AFM__G_MAX_NEST) return afm__re_fail(r, "groups nested too deeply");
        if ((sub = afm__re_alternation(r)) < 0) return 0;
        r->depth--;
        if (r->i >= r->n || p[r->i] != ')') return afm__re_fail(r, "missing ')'");
        r->i++;
        return afm__g_push(r->g, s, (uint32_t)sub);
    }
    case '[':
        r->i++;
        if (!afm__re_class(r, &c, &negate)) { afm__free(&r->g->alloc, c.r); return 0; }
        return afm__g_class(r->g, s, &c, negate, r->json, r->what);
    case '.':
        r->i++;
        return afm__cp_add(r->g, &c, '\n', '\n') && afm__g_class(r->g, s, &c, 1, r->json, r->what);
    case '\\':
        r->i++;
        if (r->i >= r->n) return afm__re_fail(r, "trailing backslash");
        if ((k = afm__re_shorthand(r->g, &c, p[r->i], &negate)) != 0) {
            r->i++;
            if (k < 0) return 0;
            return afm__g_class(r->g, s, &c, negate, r->json, r->what);
        }
        if (p[r->i] >= '1' && p[r->i] <= '9') return afm__re_fail(r, "backreferences are not supported (not regular)");
        if (strchr("bBAzZGkpP", p[r->i])) return afm__re_fail(r, "unsupported escape (word boundaries, anchors and Unicode properties)");
        if ((cp = afm__escape(p, r->n, &r->i)) < 0) return afm__re_fail(r, "bad escape");
        return afm__g_char(r->g, s, (uint32_t)cp, r->json, r->what);
    case '*': case '+': case '?': case '{':
        return afm__re_fail(r, "nothing to repeat");
    case '^': case '$':
        return afm__re_fail(r, "anchors are only supported at the start and end");
    default:
        if ((cp = afm__utf8_get(p, r->n, &r->i)) < 0) return afm__re_fail(r, "invalid UTF-8");
        return afm__g_char(r->g, s, (uint32_t)cp, r->json, r->what);
    }
}

/* A decimal repetition count at s[i]; -1 if none, -2 if too large. */
static long afm__cs_number(const char *s, size_t n, size_t *i) {
    long v = 0;
    size_t i0 = *i;
    while (*i < n && s[*i] >= '0' && s[*i] <= '9') {
        v = v * 10 + (s[*i] - '0');
        if (v > AFM__G_MAX_REPEAT) v = AFM__G_MAX_REPEAT + 1;
        (*i)++;
    }
    return *i == i0 ? -1 : v;
}

/* A quantifier at s[*i] (* + ? {n} {n,} {n,m}); 1 with *min, *max (-1: unbounded), 0 if none,
   -1 for a malformed brace. */
static int afm__quantifier(const char *s, size_t n, size_t *i, long *min, long *max) {
    size_t j;
    if (*i >= n) return 0;
    switch (s[*i]) {
    case '*': *min = 0; *max = -1; (*i)++; return 1;
    case '+': *min = 1; *max = -1; (*i)++; return 1;
    case '?': *min = 0; *max = 1; (*i)++; return 1;
    case '{':
        j = *i + 1;
        if ((*min = afm__cs_number(s, n, &j)) < 0) return -1;
        *max = *min;
        if (j < n && s[j] == ',') {
            j++;
            *max = afm__cs_number(s, n, &j);
        }
        if (j >= n || s[j] != '}') return -1;
        *i = j + 1;
        return 1;
    }
    return 0;
}

/* A sequence up to '|', ')' or the end, as one alternative of rule into. */
static int afm__re_concat(afm__re *r, int32_t into) {
    afm__gseq s;
    int ok = 1;
    memset(&s, 0, sizeof s);
    while (ok && r->i < r->n && r->s[r->i] != '|' && r->s[r->i] != ')') {
        size_t before = s.n;
        long min, max;
        int q;
        if (r->s[r->i] == '$' && r->i + 1 == r->n && (r->i == 0 || r->s[r->i - 1] != '\\')) { r->i++; break; }
        if (!(ok = afm__re_atom(r, &s))) break;
        while ((q = afm__quantifier(r->s, r->n, &r->i, &min, &max)) != 0) {
            uint32_t e;
            if (q < 0) { ok = afm__re_fail(r, "malformed repetition {n,m}"); break; }
            if (r->i < r->n && (r->s[r->i] == '?' || r->s[r->i] == '+')) r->i++; /* lazy / possessive: same language */
            if (s.n != before + 1) { /* the atom is several elements: wrap them */
                afm__gseq w;
                int32_t wr;
                memset(&w, 0, sizeof w);
                if (!afm__g_lit(r->g, &w, "", 0)) { ok = 0; break; }
                for (; before < s.n; before++) if (!afm__g_push(r->g, &w, s.e[before])) break;
                s.n -= w.n;
                if ((wr = afm__g_rule_of(r->g, r->what, &w)) < 0 || !afm__g_push(r->g, &s, (uint32_t)wr)) { ok = 0; break; }
                before = s.n - 1;
            }
            e = s.e[--s.n];
            if (!(ok = afm__g_repeat(r->g, &s, e, min, max, r->what))) break;
            if (s.n > before + 1) { /* x{2,} became several elements: wrap for a following quantifier */
                afm__gseq w;
                int32_t wr;
                memset(&w, 0, sizeof w);
                for (; before < s.n; before++) if (!afm__g_push(r->g, &w, s.e[before])) break;
                s.n -= w.n;
                if ((wr = afm__g_rule_of(r->g, r->what, &w)) < 0 || !afm__g_push(r->g, &s, (uint32_t)wr)) { ok = 0; break; }
                before = s.n - 1;
            } else if (s.n == before) { /* x{0} */
                afm__gseq w;
                int32_t wr;
                memset(&w, 0, sizeof w);
                if ((wr = afm__g_rule_of(r->g, r->what, &w)) < 0 || !afm__g_push(r->g, &s, (uint32_t)wr)) { ok = 0; break; }
            }
        }
    }
    ok = ok && afm__g_alt(r->g, into, &s);
    afm__g_seq_free(r->g, &s);
    return ok && !r->g->failed;
}

static int32_t afm__re_alternation(afm__re *r) {
    int32_t rule = afm__g_rule(r->g, r->what, strlen(r->what));
    if (rule < 0) return -1;
    for (;;) {
        if (!afm__re_concat(r, rule)) return -1;
        if (r->i < r->n && r->s[r->i] == '|') { r->i++; continue; }
        return rule;
    }
}

/* Compiles a whole regular expression into a rule; -1 on error. */
static int32_t afm__re_compile(afm__grammar *g, const char *s, size_t n, int json, const char *what) {
    afm__re r;
    int32_t rule;
    memset(&r, 0, sizeof r);
    r.g = g;
    r.s = s;
    r.n = n;
    r.json = json;
    r.what = what;
    if (n && s[0] == '^') r.i = 1;
    rule = afm__re_alternation(&r);
    if (rule >= 0 && r.i < n) return (int32_t)afm__re_fail(&r, "unmatched ')'") - 1;
    return rule;
}

/* ---- GBNF (llama.cpp's grammar format): rules `name ::= alternatives`, "literals", [classes],
   (groups), . (any character), * + ? {n} {n,} {n,m}, # comments; the start rule is `root`.
   A rule ends at a line break, except inside parentheses or after '|'. ---- */
typedef struct afm__gbnf {
    afm__grammar *g;
    const char *s;
    size_t n, i;
    int32_t *ht;       /* rule names -> rule ids (open addressing; -1 empty) */
    size_t ht_cap;
    int depth;
} afm__gbnf;

static int afm__gbnf_fail(afm__gbnf *p, const char *why) {
    size_t line = 1, col = 1, k;
    for (k = 0; k < p->i && k < p->n; k++) { if (p->s[k] == '\n') { line++; col = 1; } else col++; }
    return afm__g_fail(p->g, "grammar line %lu column %lu: %s", (unsigned long)line, (unsigned long)col, why);
}

static void afm__gbnf_space(afm__gbnf *p, int newlines) {
    while (p->i < p->n) {
        char c = p->s[p->i];
        if (c == '#') { while (p->i < p->n && p->s[p->i] != '\n') p->i++; continue; }
        if (c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n')) { p->i++; continue; }
        break;
    }
}
static int afm__gbnf_namechar(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'; }
static uint32_t afm__hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

/* The rule called s[0, n): found, or created as "used, not yet defined". -1 on failure. */
static int32_t afm__gbnf_rule(afm__gbnf *p, const char *s, size_t n) {
    afm__grammar *g = p->g;
    uint32_t h;
    size_t k;
    int32_t r;
    if ((size_t)g->n_rule * 2 + 2 > p->ht_cap) { /* rehash every named rule */
        size_t nc = p->ht_cap ? p->ht_cap * 2 : 256;
        int32_t *nt = (int32_t *)afm__alloc(&g->alloc, nc * sizeof *nt);
        if (!nt) return (int32_t)afm__g_nomem(g) - 1;
        memset(nt, 0xFF, nc * sizeof *nt);
        for (k = 0; k < p->ht_cap; k++) {
            size_t q;
            if (p->ht[k] < 0) continue;
            q = afm__hash_bytes(afm__g_name(g, p->ht[k]), strlen(afm__g_name(g, p->ht[k]))) & (nc - 1);
            while (nt[q] >= 0) q = (q + 1) & (nc - 1);
            nt[q] = p->ht[k];
        }
        afm__free(&g->alloc, p->ht);
        p->ht = nt;
        p->ht_cap = nc;
    }
    h = afm__hash_bytes(s, n);
    for (k = h & (p->ht_cap - 1); p->ht[k] >= 0; k = (k + 1) & (p->ht_cap - 1)) {
        const char *nm = afm__g_name(g, p->ht[k]);
        if (strlen(nm) == n && memcmp(nm, s, n) == 0) return p->ht[k];
    }
    if (n > 120) return (int32_t)afm__gbnf_fail(p, "rule name longer than 120 characters") - 1;
    if ((r = afm__g_rule(g, s, n)) < 0) return -1;
    g->defined[r] = 0;
    p->ht[k] = r;
    return r;
}

static int afm__gbnf_alternates(afm__gbnf *p, int32_t rule, int nested);

/* One item (literal, class, name, group, '.') with its quantifiers, appended to s. */
static int afm__gbnf_item(afm__gbnf *p, afm__gseq *s) {
    afm__grammar *g = p->g;
    const char *t = p->s;
    size_t before = s->n;
    long min, max, cp;
    int q;
    afm__cpset c;
    memset(&c, 0, sizeof c);
    if (t[p->i] == '"') {
        p->i++;
        for (;;) {
            if (p->i >= p->n || t[p->i] == '\n') return afm__gbnf_fail(p, "unterminated string literal");
            if (t[p->i] == '"') { p->i++; break; }
            if (t[p->i] == '\\') {
                p->i++;
                if ((cp = afm__escape(t, p->n, &p->i)) < 0) return afm__gbnf_fail(p, "bad escape");
            } else if ((cp = afm__utf8_get(t, p->n, &p->i)) < 0) return afm__gbnf_fail(p, "invalid UTF-8");
            if (!afm__g_char(g, s, (uint32_t)cp, 0, "literal")) return 0;
        }
    } else if (t[p->i] == '[') {
        int negate = 0, first = 1;
        p->i++;
        if (p->i < p->n && t[p->i] == '^') { negate = 1; p->i++; }
        for (;;) {
            long lo, hi;
            if (p->i >= p->n) { afm__free(&g->alloc, c.r); return afm__gbnf_fail(p, "unterminated character class"); }
            if (t[p->i] == ']' && !first) { p->i++; break; }
            first = 0;
            if (t[p->i] == '\\') { p->i++; lo = afm__escape(t, p->n, &p->i); }
            else lo = afm__utf8_get(t, p->n, &p->i);
            hi = lo;
            if (lo >= 0 && p->i + 1 < p->n && t[p->i] == '-' && t[p->i + 1] != ']') {
                p->i++;
                if (t[p->i] == '\\') { p->i++; hi = afm__escape(t, p->n, &p->i); }
                else hi = afm__utf8_get(t, p->n, &p->i);
            }
            if (lo < 0 || hi < 0) { afm__free(&g->alloc, c.r); return afm__gbnf_fail(p, "bad character in a class"); }
            if (hi < lo) { afm__free(&g->alloc, c.r); return afm__gbnf_fail(p, "character range out of order"); }
            if (!afm__cp_add(g, &c, (uint32_t)lo, (uint32_t)hi)) { afm__free(&g->alloc, c.r); return 0; }
        }
        if (!afm__g_class(g, s, &c, negate, 0, "class")) return 0;
    } else if (t[p->i] == '.') {
        p->i++;
        if (!afm__cp_add(g, &c, 0, 0x10FFFF) || !afm__g_class(g, s, &c, 0, 0, "any character")) return 0;
    } else if (t[p->i] == '(') {
        int32_t sub;
        p->i++;
        if (++p->depth > AFM__G_MAX_NEST) return afm__gbnf_fail(p, "parentheses nested too deeply");
        if ((sub = afm__g_rule(g, "group", 5)) < 0 || !afm__gbnf_alternates(p, sub, 1)) return 0;
        p->depth--;
        if (p->i >= p->n || t[p->i] != ')') return afm__gbnf_fail(p, "missing ')'");
        p->i++;
        if (!afm__g_push(g, s, (uint32_t)sub)) return 0;
    } else if (afm__gbnf_namechar(t[p->i])) {
        size_t a = p->i;
        int32_t r;
        while (p->i < p->n && afm__gbnf_namechar(t[p->i])) p->i++;
        if ((r = afm__gbnf_rule(p, t + a, p->i - a)) < 0 || !afm__g_push(g, s, (uint32_t)r)) return 0;
    } else return afm__gbnf_fail(p, "expected a string, a class, a rule name or '('");
    while ((q = afm__quantifier(t, p->n, &p->i, &min, &max)) != 0) {
        if (q < 0) return afm__gbnf_fail(p, "malformed repetition {n,m}");
        if (s->n != before + 1) { /* a literal of several bytes (or x{2,} before): one rule */
            afm__gseq w;
            int32_t wr;
            memset(&w, 0, sizeof w);
            for (; before < s->n; before++) if (!afm__g_push(g, &w, s->e[before])) return 0;
            s->n -= w.n;
            if ((wr = afm__g_rule_of(g, "repeated", &w)) < 0 || !afm__g_push(g, s, (uint32_t)wr)) return 0;
            before = s->n - 1;
        }
        if (!afm__g_repeat(g, s, s->e[--s->n], min, max, "repetition")) return 0;
        if (s->n == before) { /* x{0}: nothing, but keep one element for a following quantifier */
            afm__gseq w;
            int32_t wr;
            memset(&w, 0, sizeof w);
            if ((wr = afm__g_rule_of(g, "empty", &w)) < 0 || !afm__g_push(g, s, (uint32_t)wr)) return 0;
        }
    }
    return 1;
}

static int afm__gbnf_alternates(afm__gbnf *p, int32_t rule, int nested) {
    for (;;) {
        afm__gseq s;
        int ok = 1;
        memset(&s, 0, sizeof s);
        for (;;) {
            afm__gbnf_space(p, nested);
            if (p->i >= p->n || p->s[p->i] == '|' || p->s[p->i] == ')' || p->s[p->i] == '\n') break;
            /* the next rule's "name ::=" ends this one (a rule may run on over lines in a group only) */
            if (!(ok = afm__gbnf_item(p, &s))) break;
        }
        ok = ok && afm__g_alt(p->g, rule, &s);
        afm__g_seq_free(p->g, &s);
        if (!ok) return 0;
        if (!nested && p->i < p->n && p->s[p->i] == '\n') { /* a line starting with '|' continues the rule */
            size_t save = p->i;
            afm__gbnf_space(p, 1);
            if (p->i >= p->n || p->s[p->i] != '|') p->i = save;
        }
        if (p->i < p->n && p->s[p->i] == '|') { p->i++; afm__gbnf_space(p, 1); continue; }
        if (p->i < p->n && p->s[p->i] == ')' && !nested) return afm__gbnf_fail(p, "unmatched ')'");
        return 1;
    }
}

/* Parses a GBNF text into g; returns the root rule or -1. */
static int32_t afm__gbnf_parse(afm__grammar *g, const char *s, size_t n) {
    afm__gbnf p;
    int32_t root = -1;
    memset(&p, 0, sizeof p);
    p.g = g;
    p.s = s;
    p.n = n;
    for (;;) {
        size_t a;
        int32_t r;
        afm__gbnf_space(&p, 1);
        if (p.i >= n) break;
        a = p.i;
        while (p.i < n && afm__gbnf_namechar(s[p.i])) p.i++;
        if (p.i == a) { afm__gbnf_fail(&p, "expected a rule name"); break; }
        if ((r = afm__gbnf_rule(&p, s + a, p.i - a)) < 0) break;
        if (g->defined[r]) { afm__gbnf_fail(&p, "rule defined twice"); break; }
        g->defined[r] = 1;
        afm__gbnf_space(&p, 0);
        if (n - p.i < 3 || memcmp(s + p.i, "::=", 3) != 0) { afm__gbnf_fail(&p, "expected '::='"); break; }
        p.i += 3;
        afm__gbnf_space(&p, 1);
        if (!afm__gbnf_alternates(&p, r, 0)) break;
    }
    if (!g->failed) {
        size_t k;
        for (k = 0; k < p.ht_cap; k++)
            if (p.ht[k] >= 0 && strcmp(afm__g_name(g, p.ht[k]), "root") == 0) root = p.ht[k];
        if (root < 0) afm__g_fail(g, "grammar: no rule named 'root' (the start rule)");
    }
    afm__free(&g->alloc, p.ht);
    return g->failed ? -1 : root;
}

/* ---- JSON Schema -> grammar. Output is compact JSON (no whitespace), properties in the schema's
   order, no properties beyond the declared ones; strings use one spelling per character (the short
   escapes \" \\ \n \r \t \b \f, \u00XX for other control characters, everything else raw UTF-8).
   Numbers have at most 16 digits before the point, 16 after it and 3 in the exponent (a double
   holds no more), so that a model cannot run on with digits forever.
   Supported: type (or a list of types), enum, const, object (properties, required,
   additionalProperties false), array (items, minItems, maxItems), string (minLength, maxLength,
   pattern), integer (minimum, maximum, exclusiveMinimum, exclusiveMaximum), number, boolean,
   null, anyOf, oneOf (taken as anyOf: keep the alternatives disjoint), allOf of one schema,
   $ref to "#" or a JSON pointer into the document ($defs, definitions), recursion; annotations
   (description, title, examples, default, $schema, $id, $comment) are ignored. Anything else is
   an error naming the schema path. ---- */
typedef struct afm__js {
    afm__grammar *g;
    afm__json j;
    int32_t *ref_rule;   /* per node: the rule of a $ref target, -1 none yet */
    int32_t any, obj, str, chr, num; /* the prelude's rules */
    char path[512];
    size_t plen;
    int depth;
} afm__js;

static const char afm__js_prelude[] =
    "json-value ::= json-object | json-array | json-string | json-number | \"true\" | \"false\" | \"null\"\n"
    "json-object ::= \"{\" ( json-string \":\" json-value ( \",\" json-string \":\" json-value )* )? \"}\"\n"
    "json-array ::= \"[\" ( json-value ( \",\" json-value )* )? \"]\"\n"
    "json-string ::= \"\\\"\" json-char* \"\\\"\"\n"
    "json-char ::= [^\"\\\\\\x00-\\x1f] | \"\\\\\" [\"\\\\/bfnrt]\n"
    "json-number ::= \"-\"? ( \"0\" | [1-9] [0-9]{0,15} ) ( \".\" [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?\n"
    "root ::= json-value\n";

static int afm__js_fail(afm__js *s, const char *fmt, const char *arg) {
    char m[200];
    snprintf(m, sizeof m, fmt, arg);
    return afm__g_fail(s->g, "json schema at %s: %s", s->plen ? s->path : "(root)", m);
}
/* Appends "/seg" to the path; returns the old length to restore. */
static size_t afm__js_push(afm__js *s, const char *seg, size_t n) {
    size_t old = s->plen;
    if (n > sizeof s->path - 2 - s->plen) n = sizeof s->path - 2 - s->plen;
    s->path[s->plen++] = '/';
    memcpy(s->path + s->plen, seg, n);
    s->plen += n;
    s->path[s->plen] = 0;
    return old;
}
static void afm__js_pop(afm__js *s, size_t old) { s->plen = old; s->path[old] = 0; }
static size_t afm__js_push_idx(afm__js *s, const char *kw, int i) {
    char b[64];
    snprintf(b, sizeof b, "%s/%d", kw, i);
    return afm__js_push(s, b, strlen(b));
}
static size_t afm__js_push_key(afm__js *s, const char *kw, int32_t key) {
    size_t old = afm__js_push(s, kw, strlen(kw));
    const afm__jnode *k = &s->j.n[key];
    afm__js_push(s, s->j.src + k->start, k->len);
    return old;
}

/* Appends value node v as compact JSON text (the literal of enum / const). */
static int afm__js_literal(afm__js *s, afm__gseq *q, int32_t v) {
    const afm__jnode *nd = &s->j.n[v];
    afm__grammar *g = s->g;
    int32_t c;
    int first = 1;
    switch (nd->type) {
    case AFM__JNULL: return afm__g_lit(g, q, "null", 4);
    case AFM__JTRUE: return afm__g_lit(g, q, "true", 4);
    case AFM__JFALSE: return afm__g_lit(g, q, "false", 5);
    case AFM__JNUM: return afm__g_lit(g, q, s->j.src + nd->start, nd->len);
    case AFM__JSTR: {
        char *u = (char *)afm__alloc(&g->alloc, (size_t)nd->len + 1), e[6];
        size_t n, i;
        int ok;
        if (!u) return afm__g_nomem(g);
        n = afm__json_unescape(&s->j, v, u);
        ok = afm__g_lit(g, q, "\"", 1);
        for (i = 0; i < n && ok; i++) {
            unsigned char b = (unsigned char)u[i];
            ok = afm__json_needs_escape(b) ? afm__g_lit(g, q, e, afm__json_escape_char(b, e)) : afm__g_lit(g, q, u + i, 1);
        }
        afm__free(&g->alloc, u);
        return ok && afm__g_lit(g, q, "\"", 1);
    }
    case AFM__JARR:
        if (!afm__g_lit(g, q, "[", 1)) return 0;
        for (c = nd->child; c >= 0; c = s->j.n[c].next, first = 0)
            if ((!first && !afm__g_lit(g, q, ",", 1)) || !afm__js_literal(s, q, c)) return 0;
        return afm__g_lit(g, q, "]", 1);
    default:
        if (!afm__g_lit(g, q, "{", 1)) return 0;
        for (c = nd->child; c >= 0 && s->j.n[c].next >= 0; c = s->j.n[s->j.n[c].next].next, first = 0)
            if ((!first && !afm__g_lit(g, q, ",", 1)) || !afm__js_literal(s, q, c) || !afm__g_lit(g, q, ":", 1) ||
                !afm__js_literal(s, q, s->j.n[c].next))
                return 0;
        return afm__g_lit(g, q, "}", 1);
    }
}

/* A number keyword's value as a double; 0 when absent, -1 when not a number. */
static int afm__js_num(afm__js *s, int32_t obj, const char *kw, double *v) {
    int32_t n = afm__json_get(&s->j, obj, kw);
    char b[64];
    if (n < 0) return 0;
    if (s->j.n[n].type != AFM__JNUM || s->j.n[n].len >= sizeof b) return -1;
    memcpy(b, s->j.src + s->j.n[n].start, s->j.n[n].len);
    b[s->j.n[n].len] = 0;
    *v = strtod(b, NULL);
    return 1;
}
/* A count keyword (minLength, maxItems, ...): *v, or dflt when absent; 0 on a bad value. */
static int afm__js_count(afm__js *s, int32_t obj, const char *kw, long dflt, long *v) {
    int32_t n = afm__json_get(&s->j, obj, kw);
    *v = dflt;
    if (n < 0) return 1;
    *v = afm__json_int(&s->j, n);
    if (*v < 0) return afm__js_fail(s, "'%s' must be a non-negative integer", kw);
    if (*v > AFM__G_MAX_REPEAT) return afm__js_fail(s, "'%s' is too large (at most 100000)", kw);
    return 1;
}

/* Regular expression text for the decimal numbers [lo, hi] (hi < 0: unbounded), lo >= 0, all
   written with their digits only. Returns the text length, 0 if it does not fit. */
static size_t afm__js_digits_re(char *o, size_t cap, const char *lo, const char *hi, size_t n);
static size_t afm__js_range_re(char *o, size_t cap, long long lo, long long hi) {
    size_t w = 0, len, dl, dh;
    char a[24], b[24];
    int first = 1;
    snprintf(a, sizeof a, "%lld", lo);
    dl = strlen(a);
    if (hi >= 0) { snprintf(b, sizeof b, "%lld", hi); dh = strlen(b); }
    else dh = dl;
    for (len = dl; len <= dh; len++) {
        char l[24], h[24];
        size_t k;
        if (len == dl) memcpy(l, a, len + 1);
        else { l[0] = '1'; for (k = 1; k < len; k++) l[k] = '0'; l[len] = 0; }
        if (hi >= 0 && len == dh) memcpy(h, b, len + 1);
        else { for (k = 0; k < len; k++) h[k] = '9'; h[len] = 0; }
        if (!first) { if (w + 1 >= cap) return 0; o[w++] = '|'; }
        first = 0;
        if (!(k = afm__js_digits_re(o + w, cap - w, l, h, len))) return 0;
        w += k;
    }
    if (hi < 0) { /* and every longer number */
        int m = dl < 16 ? snprintf(o + w, cap - w, "|[1-9][0-9]{%lu,15}", (unsigned long)dl) : 0;
        if (m < 0 || (size_t)m >= cap - w) return 0;
        w += (size_t)m;
    }
    o[w] = 0;
    return w;
}
/* Same-length digit strings lo <= hi: one digit position at a time. */
static size_t afm__js_digits_re(char *o, size_t cap, const char *lo, const char *hi, size_t n) {
    size_t w = 0, k, all0 = 1, all9 = 1;
    int m;
    if (cap < 8 || n == 0 || n > 20) return 0;
    if (n == 1) { m = snprintf(o, cap, "[%c-%c]", lo[0], hi[0]); return m > 0 && (size_t)m < cap ? (size_t)m : 0; }
    if (lo[0] == hi[0]) {
        o[0] = lo[0];
        k = afm__js_digits_re(o + 1, cap - 1, lo + 1, hi + 1, n - 1);
        if (!k || k + 3 >= cap) return 0;
        memmove(o + 2, o + 1, k); o[1] = '('; o[k + 2] = ')'; o[k + 3] = 0;
        return k + 3;
    }
    for (k = 1; k < n; k++) { if (lo[k] != '0') all0 = 0; if (hi[k] != '9') all9 = 0; }
    {
        char d0 = all0 ? lo[0] : (char)(lo[0] + 1), d1 = all9 ? hi[0] : (char)(hi[0] - 1);
        char nines[24], zeros[24];
        for (k = 0; k < n - 1; k++) { nines[k] = '9'; zeros[k] = '0'; }
        nines[n - 1] = zeros[n - 1] = 0;
        if (!all0) {
            o[w++] = lo[0]; o[w++] = '(';
            if (!(k = afm__js_digits_re(o + w, cap - w, lo + 1, nines, n - 1))) return 0;
            w += k;
            if (w + 2 >= cap) return 0;
            o[w++] = ')'; o[w++] = '|';
        }
        if (d0 <= d1) {
            m = snprintf(o + w, cap - w, "[%c-%c][0-9]{%lu}|", d0, d1, (unsigned long)(n - 1));
            if (m < 0 || (size_t)m >= cap - w) return 0;
            w += (size_t)m;
        }
        if (!all9) {
            if (w + 2 >= cap) return 0;
            o[w++] = hi[0]; o[w++] = '(';
            if (!(k = afm__js_digits_re(o + w, cap - w, zeros, hi + 1, n - 1))) return 0;
            w += k;
            if (w + 2 >= cap) return 0;
            o[w++] = ')'; o[w++] = '|';
        }
        o[--w] = 0; /* the last '|' */
    }
    return w;
}

/* An integer in [lo, hi] (has_lo / has_hi: bounded on that side) as a rule. */
static int32_t afm__js_integer(afm__js *s, int has_lo, long long lo, int has_hi, long long hi) {
    char re[4096];
    size_t w = 0, k;
    if (has_lo && has_hi && lo > hi) return (int32_t)afm__js_fail(s, "%s", "no integer lies between the minimum and the maximum") - 1;
    if (!has_hi || hi >= 0) { /* the non-negative part */
        long long a = has_lo && lo > 0 ? lo : 0;
        re[w++] = '(';
        if (!(k = afm__js_range_re(re + w, sizeof re - w - 4, a, has_hi ? hi : -1))) goto big;
        w += k;
        re[w++] = ')';
    }
    if (!has_lo || lo < 0) { /* the negative part: "-" and its magnitude */
        long long a = has_hi && hi < 0 ? -hi : 1;
        if (w) re[w++] = '|';
        re[w++] = '-'; re[w++] = '(';
        if (!(k = afm__js_range_re(re + w, sizeof re - w - 4, a, has_lo ? -lo : -1))) goto big;
        w += k;
        re[w++] = ')';
    }
    return afm__re_compile(s->g, re, w, 0, "integer range");
big:
    return (int32_t)afm__js_fail(s, "%s", "integer range too complex") - 1;
}

static int32_t afm__js_schema(afm__js *s, int32_t node);

/* Keywords a schema object may carry; anything else is an error. */
static int afm__js_check_keys(afm__js *s, int32_t node) {
    static const char *const known[] = {
        "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
        "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf",
        "oneOf", "allOf", "$ref", "$defs", "definitions", "description", "title", "examples", "default", "$schema",
        "$id", "$comment", NULL };
    int32_t k;
    for (k = s->j.n[node].child; k >= 0 && s->j.n[k].next >= 0; k = s->j.n[s->j.n[k].next].next) {
        int i, found = 0;
        char name[64];
        for (i = 0; known[i] && !found; i++) found = afm__json_eq(&s->j, k, known[i]);
        if (!found) {
            size_t n = s->j.n[k].len < sizeof name - 1 ? s->j.n[k].len : sizeof name - 1;
            memcpy(name, s->j.src + s->j.n[k].start, n);
            name[n] = 0;
            return afm__js_fail(s, "unsupported keyword '%s'", name);
        }
    }
    return 1;
}

/* The rule of the schema at JSON pointer ref ("#", "#/$defs/name", ...). */
static int32_t afm__js_ref(afm__js *s, int32_t refnode) {
    char ref[512], seg[256], saved[512];
    const char *p;
    int32_t t = 0, r, body;
    afm__gseq q;
    size_t old;
    if (!afm__json_cstr(&s->j, refnode, ref, sizeof ref) || ref[0] != '#')
        return (int32_t)afm__js_fail(s, "%s", "$ref must be a local reference starting with '#'") - 1;
    for (p = ref + 1; *p;) {
        size_t n = 0;
        if (*p != '/') return (int32_t)afm__js_fail(s, "bad $ref '%s'", ref) - 1;
        for (p++; *p && *p != '/' && n < sizeof seg - 1; p++) {
            if (*p == '~' && (p[1] == '0' || p[1] == '1')) { seg[n++] = p[1] == '0' ? '~' : '/'; p++; }
            else seg[n++] = *p;
        }
        seg[n] = 0;
        if (s->j.n[t].type == AFM__JOBJ) t = afm__json_get(&s->j, t, seg);
        else if (s->j.n[t].type == AFM__JARR) {
            long i = atol(seg);
            for (t = s->j.n[t].child; t >= 0 && i > 0; i--) t = s->j.n[t].next;
        } else t = -1;
        if (t < 0) return (int32_t)afm__js_fail(s, "$ref '%s' points to nothing", ref) - 1;
    }
    if (s->ref_rule[t] >= 0) return s->ref_rule[t];
    if ((r = afm__g_rule(s->g, ref, strlen(ref))) < 0) return -1;
    s->ref_rule[t] = r;
    memcpy(saved, s->path, s->plen + 1); /* errors inside name the target's own path */
    old = s->plen;
    s->plen = strlen(ref + 1);
    memcpy(s->path, ref + 1, s->plen + 1);
    body = afm__js_schema(s, t);
    memcpy(s->path, saved, old + 1);
    s->plen = old;
    if (body < 0) return -1;
    memset(&q, 0, sizeof q);
    if (!afm__g_push(s->g, &q, (uint32_t)body) || !afm__g_alt(s->g, r, &q)) r = -1;
    afm__g_seq_free(s->g, &q);
    return r;
}

static int32_t afm__js_object(afm__js *s, int32_t node) {
    afm__grammar *g = s->g;
    int32_t props = afm__json_get(&s->j, node, "properties"), req = afm__json_get(&s->j, node, "required");
    int32_t add = afm__json_get(&s->j, node, "additionalProperties"), k, *rr = NULL, *vr = NULL, out = -1;
    uint8_t *isreq = NULL;
    int n = 0, i, f;
    afm__gseq q;
    memset(&q, 0, sizeof q);
    if (add >= 0 && s->j.n[add].type != AFM__JFALSE && !(s->j.n[add].type == AFM__JTRUE && props < 0))
        return (int32_t)afm__js_fail(s, "%s", "additionalProperties other than false is not supported with properties") - 1;
    if (props < 0) { /* no declared properties: any object, or {} without additional ones */
        if (add < 0 || s->j.n[add].type != AFM__JFALSE) return s->obj;
        return afm__g_lit(g, &q, "{}", 2) ? afm__g_rule_of(g, "empty object", &q) : -1;
    }
    if (s->j.n[props].type != AFM__JOBJ) return (int32_t)afm__js_fail(s, "%s", "'properties' must be an object") - 1;
    for (k = s->j.n[props].child; k >= 0 && s->j.n[k].next >= 0; k = s->j.n[s->j.n[k].next].next) n++;
    rr = (int32_t *)afm__alloc(&g->alloc, ((size_t)n + 1) * 2 * sizeof *rr);
    vr = (int32_t *)afm__alloc(&g->alloc, ((size_t)n + 1) * sizeof *vr);
    isreq = (uint8_t *)afm__calloc(&g->alloc, (size_t)n + 1, 1);
    if (!rr || !vr || !isreq) { afm__g_nomem(g); goto out; }
    if (req >= 0) { /* every required name must be a declared property */
        int32_t r;
        if (s->j.n[req].type != AFM__JARR) { afm__js_fail(s, "%s", "'required' must be an array"); goto out; }
        for (r = s->j.n[req].child; r >= 0; r = s->j.n[r].next) {
            int found = -1;
            if (s->j.n[r].type != AFM__JSTR) { afm__js_fail(s, "%s", "'required' must list strings"); goto out; }
            for (k = s->j.n[props].child, i = 0; k >= 0 && s->j.n[k].next >= 0; k = s->j.n[s->j.n[k].next].next, i++)
                if (s->j.n[k].len == s->j.n[r].len && memcmp(s->j.src + s->j.n[k].start, s->j.src + s->j.n[r].start, s->j.n[k].len) == 0) found = i;
            if (found < 0) {
                char name[101];
                size_t nl = s->j.n[r].len < 100 ? s->j.n[r].len : 100;
                memcpy(name, s->j.src + s->j.n[r].start, nl);
                name[nl] = 0;
                afm__js_fail(s, "required property '%s' is not in properties", name);
                goto out;
            }
            isreq[found] = 1;
        }
    }
    for (k = s->j.n[props].child, i = 0; k >= 0 && s->j.n[k].next >= 0; k = s->j.n[s->j.n[k].next].next, i++) {
        size_t old = afm__js_push_key(s, "properties", k);
        vr[i] = afm__js_schema(s, s->j.n[k].next);
        afm__js_pop(s, old);
        if (vr[i] < 0) goto out;
    }
    /* rr[2i + f]: the properties from i on, f = 1 when one was written before (a comma first) */
    for (i = 0; i <= n; i++)
        for (f = 0; f < 2; f++)
            if ((rr[2 * i + f] = afm__g_rule(g, "properties", 10)) < 0) goto out;
    for (i = n; i >= 0; i--)
        for (f = 0; f < 2; f++) {
            q.n = 0;
            if (i == n) { if (!afm__g_alt(g, rr[2 * i + f], &q)) goto out; continue; }
            k = s->j.n[props].child;
            { int m; for (m = 0; m < i; m++) k = s->j.n[s->j.n[k].next].next; }
            if ((f && !afm__g_lit(g, &q, ",", 1)) || !afm__js_literal(s, &q, k) || !afm__g_lit(g, &q, ":", 1) ||
                !afm__g_push(g, &q, (uint32_t)vr[i]) || !afm__g_push(g, &q, (uint32_t)rr[2 * (i + 1) + 1]) ||
                !afm__g_alt(g, rr[2 * i + f], &q))
                goto out;
            q.n = 0;
            if (!isreq[i] && (!afm__g_push(g, &q, (uint32_t)rr[2 * (i + 1) + f]) || !afm__g_alt(g, rr[2 * i + f], &q))) goto out;
        }
    q.n = 0;
    if (afm__g_lit(g, &q, "{", 1) && afm__g_push(g, &q, (uint32_t)rr[0]) && afm__g_lit(g, &q, "}", 1)) out = afm__g_rule_of(g, "object", &q);
out:
    afm__g_seq_free(g, &q);
    afm__free(&g->alloc, rr);
    afm__free(&g->alloc, vr);
    afm__free(&g->alloc, isreq);
    return out;
}

static int32_t afm__js_array(afm__js *s, int32_t node) {
    afm__grammar *g = s->g;
    int32_t items = afm__json_get(&s->j, node, "items"), item, sep, body;
    long mn, mx;
    afm__gseq q, c;
    size_t old;
    if (!afm__js_count(s, node, "minItems", 0, &mn) || !afm__js_count(s, node, "maxItems", -1, &mx)) return -1;
    if (mx >= 0 && mx < mn) return (int32_t)afm__js_fail(s, "%s", "maxItems is less than minItems") - 1;
    if (items >= 0 && s->j.n[items].type == AFM__JARR) return (int32_t)afm__js_fail(s, "%s", "'items' as an array (tuples) is not supported") - 1;
    old = afm__js_push(s, "items", 5);
    item = items >= 0 ? afm__js_schema(s, items) : s->any;
    afm__js_pop(s, old);
    if (item < 0) return -1;
    memset(&q, 0, sizeof q);
    memset(&c, 0, sizeof c);
    if (mx == 0) return afm__g_lit(g, &q, "[]", 2) ? afm__g_rule_of(g, "empty array", &q) : -1;
    /* item ("," item){max(mn-1,0), mx-1} */
    if (!afm__g_lit(g, &c, ",", 1) || !afm__g_push(g, &c, (uint32_t)item) || (sep = afm__g_rule_of(g, "array item", &c)) < 0) return -1;
    if (!afm__g_push(g, &q, (uint32_t)item) || !afm__g_repeat(g, &q, (uint32_t)sep, mn > 0 ? mn - 1 : 0, mx < 0 ? -1 : mx - 1, "array items") ||
        (body = afm__g_rule_of(g, "array items", &q)) < 0)
        return -1;
    if (!afm__g_lit(g, &q, "[", 1) || (mn == 0 ? !afm__g_repeat(g, &q, (uint32_t)body, 0, 1, "array") : !afm__g_push(g, &q, (uint32_t)body)) ||
        !afm__g_lit(g, &q, "]", 1)) {
        afm__g_seq_free(g, &q);
        return -1;
    }
    return afm__g_rule_of(g, "array", &q);
}

static int32_t afm__js_string(afm__js *s, int32_t node) {
    afm__grammar *g = s->g;
    int32_t pat = afm__json_get(&s->j, node, "pattern"), r;
    long mn, mx;
    afm__gseq q;
    if (!afm__js_count(s, node, "minLength", 0, &mn) || !afm__js_count(s, node, "maxLength", -1, &mx)) return -1;
    if (mx >= 0 && mx < mn) return (int32_t)afm__js_fail(s, "%s", "maxLength is less than minLength") - 1;
    memset(&q, 0, sizeof q);
    if (!afm__g_lit(g, &q, "\"", 1)) return -1;
    if (pat >= 0) {
        char *re, what[600];
        size_t n;
        int32_t body, any = -1;
        int lead, trail, ok;
        afm__cpset c;
        afm__gseq t;
        if (mn > 0 || mx >= 0) { afm__g_seq_free(g, &q); return (int32_t)afm__js_fail(s, "%s", "pattern together with minLength/maxLength is not supported") - 1; }
        if (s->j.n[pat].type != AFM__JSTR) { afm__g_seq_free(g, &q); return (int32_t)afm__js_fail(s, "%s", "'pattern' must be a string") - 1; }
        re = (char *)afm__alloc(&g->alloc, (size_t)s->j.n[pat].len + 1);
        if (!re) { afm__g_seq_free(g, &q); return (int32_t)afm__g_nomem(g) - 1; }
        n = afm__json_unescape(&s->j, pat, re);
        snprintf(what, sizeof what, "json schema at %s/pattern", s->plen ? s->path : "");
        /* JSON Schema patterns search: an unanchored end matches anything around the pattern (and a
           full match of the pattern alone satisfies an anchor, so an anchored end just drops it) */
        lead = n && re[0] == '^';
        trail = n > (size_t)lead && re[n - 1] == '$' && (n < 2 || re[n - 2] != '\\');
        memset(&c, 0, sizeof c);
        memset(&t, 0, sizeof t);
        if (!lead || !trail) {
            if (!afm__cp_add(g, &c, 0, 0x10FFFF) || !afm__g_class(g, &t, &c, 0, 1, "any character")) any = -1;
            else any = (int32_t)t.e[0];
            afm__g_seq_free(g, &t);
        }
        ok = !(!lead || !trail) || any >= 0;
        ok = ok && (lead || afm__g_repeat(g, &q, (uint32_t)any, 0, -1, "pattern prefix"));
        body = ok ? afm__re_compile(g, re + lead, n - (size_t)lead - (size_t)trail, 1, what) : -1;
        afm__free(&g->alloc, re);
        if (body < 0 || !afm__g_push(g, &q, (uint32_t)body) || (!trail && !afm__g_repeat(g, &q, (uint32_t)any, 0, -1, "pattern suffix"))) {
            afm__g_seq_free(g, &q);
            return -1;
        }
    } else if (!afm__g_repeat(g, &q, (uint32_t)s->chr, mn, mx, "string characters")) {
        afm__g_seq_free(g, &q);
        return -1;
    }
    if (!afm__g_lit(g, &q, "\"", 1)) { afm__g_seq_free(g, &q); return -1; }
    r = afm__g_rule_of(g, "string", &q);
    return r;
}

/* The rule for a schema node restricted to one type name. */
static int32_t afm__js_typed(afm__js *s, int32_t node, int32_t tnode) {
    afm__gseq q;
    memset(&q, 0, sizeof q);
    if (afm__json_eq(&s->j, tnode, "object")) return afm__js_object(s, node);
    if (afm__json_eq(&s->j, tnode, "array")) return afm__js_array(s, node);
    if (afm__json_eq(&s->j, tnode, "string")) return afm__js_string(s, node);
    if (afm__json_eq(&s->j, tnode, "boolean")) {
        int32_t r = afm__g_rule(s->g, "boolean", 7);
        int ok = r >= 0 && afm__g_lit(s->g, &q, "true", 4) && afm__g_alt(s->g, r, &q);
        q.n = 0;
        ok = ok && afm__g_lit(s->g, &q, "false", 5) && afm__g_alt(s->g, r, &q);
        afm__g_seq_free(s->g, &q);
        return ok ? r : -1;
    }
    if (afm__json_eq(&s->j, tnode, "null")) return afm__g_lit(s->g, &q, "null", 4) ? afm__g_rule_of(s->g, "null", &q) : -1;
    if (afm__json_eq(&s->j, tnode, "integer")) {
        double lo = 0, hi = 0, x;
        int has_lo, has_hi, k;
        if ((has_lo = afm__js_num(s, node, "minimum", &lo)) < 0 || (has_hi = afm__js_num(s, node, "maximum", &hi)) < 0 ||
            (k = afm__js_num(s, node, "exclusiveMinimum", &x)) < 0)
            return (int32_t)afm__js_fail(s, "%s", "bounds must be numbers") - 1;
        lo = has_lo ? ceil(lo) : lo;
        if (k) { x = floor(x) + 1; if (!has_lo || x > lo) lo = x; has_lo = 1; }
        if ((k = afm__js_num(s, node, "exclusiveMaximum", &x)) < 0) return (int32_t)afm__js_fail(s, "%s", "bounds must be numbers") - 1;
        hi = has_hi ? floor(hi) : hi;
        if (k) { x = ceil(x) - 1; if (!has_hi || x < hi) hi = x; has_hi = 1; }
        if ((has_lo && !(fabs(lo) < 1e15)) || (has_hi && !(fabs(hi) < 1e15)))
            return (int32_t)afm__js_fail(s, "%s", "integer bounds beyond +-1e15 are not supported") - 1;
        return afm__js_integer(s, has_lo, (long long)lo, has_hi, (long long)hi);
    }
    if (afm__json_eq(&s->j, tnode, "number")) {
        int32_t k;
        const char *const kw[4] = { "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum" };
        for (k = 0; k < 4; k++)
            if (afm__json_get(&s->j, node, kw[k]) >= 0)
                return (int32_t)afm__js_fail(s, "'%s' on type number is not supported (it is on integer)", kw[k]) - 1;
        return s->num;
    }
    return (int32_t)afm__js_fail(s, "%s", "unknown type (expected object, array, string, integer, number, boolean or null)") - 1;
}

/* The rule of one schema node (an object, true or false). */
static int32_t afm__js_schema(afm__js *s, int32_t node) {
    afm__grammar *g = s->g;
    const afm__jnode *nd = &s->j.n[node];
    int32_t kw, t, r = -1;
    afm__gseq q;
    size_t old;
    int i;
    if (g->failed) return -1;
    if (nd->type == AFM__JTRUE) return s->any;
    if (nd->type == AFM__JFALSE) return (int32_t)afm__js_fail(s, "%s", "the schema false matches nothing") - 1;
    if (nd->type != AFM__JOBJ) return (int32_t)afm__js_fail(s, "%s", "a schema must be an object or a boolean") - 1;
    if (++s->depth > AFM__G_MAX_NEST) return (int32_t)afm__js_fail(s, "%s", "schema nested too deeply (counting $ref)") - 1;
    if (!afm__js_check_keys(s, node)) goto out;
    memset(&q, 0, sizeof q);
    if ((kw = afm__json_get(&s->j, node, "$ref")) >= 0) { r = afm__js_ref(s, kw); goto out; }
    if ((kw = afm__json_get(&s->j, node, "const")) >= 0) {
        r = afm__js_literal(s, &q, kw) ? afm__g_rule_of(g, "const", &q) : -1;
        goto out;
    }
    if ((kw = afm__json_get(&s->j, node, "enum")) >= 0) {
        if (s->j.n[kw].type != AFM__JARR || s->j.n[kw].child < 0) { afm__js_fail(s, "%s", "'enum' must be a non-empty array"); goto out; }
        if ((r = afm__g_rule(g, "enum", 4)) < 0) goto out;
        for (t = s->j.n[kw].child; t >= 0; t = s->j.n[t].next) {
            q.n = 0;
            if (!afm__js_literal(s, &q, t) || !afm__g_alt(g, r, &q)) { r = -1; break; }
        }
        afm__g_seq_free(g, &q);
        goto out;
    }
    if ((kw = afm__json_get(&s->j, node, "anyOf")) >= 0 || (kw = afm__json_get(&s->j, node, "oneOf")) >= 0 ||
        (kw = afm__json_get(&s->j, node, "allOf")) >= 0) {
        const char *name = afm__json_get(&s->j, node, "anyOf") >= 0 ? "anyOf" : afm__json_get(&s->j, node, "oneOf") >= 0 ? "oneOf" : "allOf";
        if (s->j.n[kw].type != AFM__JARR || s->j.n[kw].child < 0) { afm__js_fail(s, "'%s' must be a non-empty array", name); goto out; }
        if (name[1] == 'l' && s->j.n[s->j.n[kw].child].next >= 0) { afm__js_fail(s, "%s", "allOf with more than one schema is not supported"); goto out; }
        if ((r = afm__g_rule(g, name, strlen(name))) < 0) goto out;
        for (t = s->j.n[kw].child, i = 0; t >= 0; t = s->j.n[t].next, i++) {
            int32_t sub;
            old = afm__js_push_idx(s, name, i);
            sub = afm__js_schema(s, t);
            afm__js_pop(s, old);
            q.n = 0;
            if (sub < 0 || !afm__g_push(g, &q, (uint32_t)sub) || !afm__g_alt(g, r, &q)) { r = -1; break; }
        }
        afm__g_seq_free(g, &q);
        goto out;
    }
    if ((kw = afm__json_get(&s->j, node, "type")) >= 0) {
        if (s->j.n[kw].type == AFM__JSTR) { r = afm__js_typed(s, node, kw); goto out; }
        if (s->j.n[kw].type != AFM__JARR || s->j.n[kw].child < 0) { afm__js_fail(s, "%s", "'type' must be a string or a non-empty array"); goto out; }
        if ((r = afm__g_rule(g, "types", 5)) < 0) goto out;
        for (t = s->j.n[kw].child; t >= 0; t = s->j.n[t].next) {
            int32_t sub = afm__js_typed(s, node, t);
            q.n = 0;
            if (sub < 0 || !afm__g_push(g, &q, (uint32_t)sub) || !afm__g_alt(g, r, &q)) { r = -1; break; }
        }
        afm__g_seq_free(g, &q);
        goto out;
    }
    /* no type: implied by the keywords present, else any value */
    if (afm__json_get(&s->j, node, "properties") >= 0) r = afm__js_object(s, node);
    else if (afm__json_get(&s->j, node, "items") >= 0) r = afm__js_array(s, node);
    else r = s->any;
out:
    s->depth--;
    return g->failed ? -1 : r;
}

static int32_t afm__g_find(const afm__grammar *g, const char *name) {
    int32_t r;
    for (r = 0; r < g->n_rule; r++)
        if (strcmp(afm__g_name(g, r), name) == 0) return r;
    return -1;
}

/* Compiles a JSON Schema text into g; returns the root rule or -1. */
static int32_t afm__js_compile(afm__grammar *g, const char *text, size_t len) {
    afm__js s;
    size_t where = 0, k;
    const char *why = "";
    int32_t root = -1;
    memset(&s, 0, sizeof s);
    s.g = g;
    if (!afm__json_parse(&g->alloc, text, len, &s.j, &where, &why)) {
        afm__g_fail(g, "json schema: invalid JSON at byte %lu: %s", (unsigned long)where, why);
        goto out;
    }
    if (afm__gbnf_parse(g, afm__js_prelude, sizeof afm__js_prelude - 1) < 0) goto out;
    s.any = afm__g_find(g, "json-value");
    s.obj = afm__g_find(g, "json-object");
    s.str = afm__g_find(g, "json-string");
    s.chr = afm__g_find(g, "json-char");
    s.num = afm__g_find(g, "json-number");
    s.ref_rule = (int32_t *)afm__alloc(&g->alloc, s.j.count * sizeof *s.ref_rule);
    if (!s.ref_rule) { afm__g_nomem(g); goto out; }
    for (k = 0; k < s.j.count; k++) s.ref_rule[k] = -1;
    root = afm__js_schema(&s, 0);
out:
    afm__free(&g->alloc, s.ref_rule);
    afm__json_free(&g->alloc, &s.j);
    return g->failed ? -1 : root;
}

/* ---- the compiled constraint ---- */
struct afm_constraint {
    afm__grammar g;
    int kind;
};

AFMDEF afm_result afm_constraint_compile(afm_constraint_kind kind, const char *text, size_t len, const afm_allocator *allocator,
                                         afm_constraint **out, char *err, size_t err_size) {
    const afm_allocator *a = allocator ? allocator : &afm__malloc_allocator;
    afm_constraint *c;
    int32_t root = -1;
    if (err && err_size) err[0] = 0;
    if (!out) return afm__fail(err, err_size, AFM_ERR_ARG, "afm_constraint_compile: out is NULL");
    *out = NULL;
    if (!text && len) return afm__fail(err, err_size, AFM_ERR_ARG, "afm_constraint_compile: text is NULL");
    if (kind != AFM_CONSTRAINT_REGEX && kind != AFM_CONSTRAINT_GBNF && kind != AFM_CONSTRAINT_JSON_SCHEMA)
        return afm__fail(err, err_size, AFM_ERR_ARG, "afm_constraint_compile: unknown kind %d", (int)kind);
    if (!(c = (afm_constraint *)afm__calloc(a, 1, sizeof *c))) return afm__fail(err, err_size, AFM_ERR_NOMEM, "out of memory");
    c->g.alloc = *a;
    c->g.err = err;
    c->g.err_size = err_size;
    c->kind = (int)kind;
    if (kind == AFM_CONSTRAINT_REGEX) root = afm__re_compile(&c->g, text ? text : "", len, 0, "regex");
    else if (kind == AFM_CONSTRAINT_GBNF) root = afm__gbnf_parse(&c->g, text ? text : "", len);
    else root = afm__js_compile(&c->g, text ? text : "", len);
    if (root < 0 || !afm__g_finish(&c->g, root)) {
        afm_result r = strstr(c->g.err ? c->g.err : "", "out of memory") ? AFM_ERR_NOMEM : AFM_ERR_FORMAT;
        if (!c->g.failed) afm__fail(err, err_size, AFM_ERR_FORMAT, "constraint compile failed");
        afm_constraint_free(c);
        return r;
    }
    c->g.err = NULL;
    c->g.err_size = 0;
    *out = c;
    return AFM_OK;
}

AFMDEF void afm_constraint_free(afm_constraint *c) {
    afm_allocator a;
    if (!c) return;
    a = c->g.alloc;
    afm__g_free(&c->g);
    afm__free(&a, c);
}

/* ---- the vocabulary as bytes, and its prefix tree ---- */
struct afm_constraint_vocab {
    afm_allocator alloc;
    int n_vocab;
    uint8_t *kind;          /* per token: 0 never allowed, 1 text (its bytes), 2 stop (allowed when complete) */
    uint32_t *boff;         /* token bytes: bytes[boff[t] .. boff[t + 1]) */
    unsigned char *bytes;
    int32_t *stops;
    int n_stops;
    /* prefix tree: node 0 is the root; a node's children are the consecutive nodes child0 ..
       child0 + nchild - 1 (breadth-first numbering), each entered by byte nbyte[] */
    int32_t n_nodes, *child0, *tok0, *toks;
    uint16_t *nchild, *ntok;
    uint8_t *nbyte;
    int max_len;
    /* nodes with many tokens below them: the bytes on the edges below (a 256-bit set) and the
       range of toks[] below; a walk that reaches such a node in a state where every one of those
       bytes leads to one same live state, and so on as deep as the subtree goes (inside a string,
       also one with a length limit), allows them all without descending */
    int32_t *big;           /* per node: index into bigset / biglo / bighi, -1 for small subtrees */
    uint64_t *bigset;       /* [n_big][4] */
    int32_t *biglo, *bighi, n_big;
    uint8_t *bigdepth;      /* the most bytes below the node on one path */
    /* the same by characters, for nodes whose subtree is whole UTF-8 characters (after the rest of
       one begun above, see bigowed): the first bytes of the characters below, the most characters
       below the node on one path, the node's depth in characters (counting one begun); and per
       entry of toks[] the token's length in characters. A length-bounded string is a different state
       at each character, so the byte test above fails on multi-byte characters and on subtrees
       deeper than the characters left; by characters, the tokens short enough are allowed at once. */
    uint64_t *bigfirst;     /* [n_big][4] */
    uint8_t *bigcrel, *bigcdep, *tokc;
    /* subtrees of AFM__VOCAB_HUGE or more tokens: their tokens as (word, bits) pairs of the mask,
       ordered by length in characters below the node, so that allowing them (or those within d
       characters) costs one OR per word instead of one per token */
    int32_t *bighuge;       /* per big node: index of its pairs, -1 if not huge */
    uint32_t *hoff;         /* [n_huge][257]: pairs of length < L start at hoff[h * 257] and end at hoff[h * 257 + L] */
    uint32_t *hword, *hbits;
    uint8_t *bigowed, *bigclo, *bigchi; /* inside a character: continuation bytes still owed (255: the
                               subtree is not whole characters), the range of the next one */
};

typedef struct afm__vtok { const unsigned char *p; uint32_t n; int32_t id; } afm__vtok;
static int afm__vtok_cmp(const void *a, const void *b) {
    const afm__vtok *x = (const afm__vtok *)a, *y = (const afm__vtok *)b;
    uint32_t n = x->n < y->n ? x->n : y->n;
    int c = n ? memcmp(x->p, y->p, n) : 0;
    if (c) return c;
    if (x->n != y->n) return x->n < y->n ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The bytes a token adds to the output (AFM_TOK_NEWLINE decoding, U+2581 as a space), into o
   (room for the piece); -1 when the token is never text (control, unknown, unused, chat markers). */
static int afm__vocab_token_bytes(const afm_tokenizer *tok, int32_t id, unsigned char *o) {
    afm_token_type ty = afm_tokenizer_token_type(tok, id);
    size_t n, k, w = 0;
    const char *p = afm_tokenizer_piece(tok, id, &n);
    int s;
    for (s = 0; s < AFM_SPECIAL_COUNT; s++)
        if (s != AFM_SPECIAL_NEWLINE && afm_tokenizer_special(tok, (afm_special_token)s) == id) return -1;
    if (id == afm_tokenizer_special(tok, AFM_SPECIAL_NEWLINE)) { o[0] = '\n'; return 1; }
#ifdef AFM_HF_TOKENIZER
    if (tok->kind == AFM_TOKENIZER_HF_JSON) {
        afm__tok_buf scratch;
        const char *bp;
        if (ty == AFM_TOKEN_CONTROL) return -1;
        memset(&scratch, 0, sizeof scratch);
        afm__tok_hf_piece_bytes(tok, id, &scratch, &bp, &n);
        if (n > tok->max_token_bytes) n = 0;
        memcpy(o, bp, n);
        afm__free(&tok->alloc, scratch.p);
        return n ? (int)n : -1;
    }
#endif
    if (ty == AFM_TOKEN_BYTE) {
        for (k = 0; k < 256; k++)
            if (tok->byte_id[k] == id) { o[0] = (unsigned char)k; return 1; }
        return -1;
    }
    if (!p || (ty != AFM_TOKEN_NORMAL && ty != AFM_TOKEN_USER_DEFINED)) return -1;
    for (k = 0; k < n;) {
        if (afm__tok_ws_at(p, k, n)) { o[w++] = ' '; k += 3; }
        else o[w++] = (unsigned char)p[k++];
    }
    return w ? (int)w : -1;
}

AFMDEF void afm_constraint_vocab_free(afm_constraint_vocab *v) {
    afm_allocator a;
    if (!v) return;
    a = v->alloc;
    afm__free(&a, v->kind); afm__free(&a, v->boff); afm__free(&a, v->bytes); afm__free(&a, v->stops);
    afm__free(&a, v->child0); afm__free(&a, v->tok0); afm__free(&a, v->toks); afm__free(&a, v->nchild);
    afm__free(&a, v->ntok); afm__free(&a, v->nbyte); afm__free(&a, v->big); afm__free(&a, v->bigset);
    afm__free(&a, v->biglo); afm__free(&a, v->bighi); afm__free(&a, v->bigdepth);
    afm__free(&a, v->bigfirst); afm__free(&a, v->bigcrel); afm__free(&a, v->bigcdep); afm__free(&a, v->tokc);
    afm__free(&a, v->bigowed); afm__free(&a, v->bigclo); afm__free(&a, v->bigchi);
    afm__free(&a, v->bighuge); afm__free(&a, v->hoff); afm__free(&a, v->hword); afm__free(&a, v->hbits);
    afm__free(&a, v);
}

static afm_result afm__vocab_tree(afm_constraint_vocab *v);
/* The subtree summaries (bytes below, token range below) of nodes with at least 16 tokens below:
   children are numbered after their parents, so one pass from the last node up suffices. */
#ifndef AFM__VOCAB_BIG
#define AFM__VOCAB_BIG 4
#endif
#ifndef AFM__VOCAB_HUGE
#define AFM__VOCAB_HUGE 1024
#endif
static int afm__u64_cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}
/* The (word, bits) pairs of the huge subtrees (v's big summaries filled in). */
static afm_result afm__vocab_huge(afm_constraint_vocab *v) {
    const afm_allocator *a = &v->alloc;
    int32_t b, nh = 0;
    size_t np = 0, cap = 0;
    uint64_t *key = NULL;
    if (!(v->bighuge = (int32_t *)afm__alloc(a, ((size_t)v->n_big + 1) * sizeof *v->bighuge))) return AFM_ERR_NOMEM;
    for (b = 0; b < v->n_big; b++) {
        v->bighuge[b] = v->bighi[b] - v->biglo[b] >= AFM__VOCAB_HUGE ? nh++ : -1;
        if (v->bighuge[b] >= 0) cap += (size_t)(v->bighi[b] - v->biglo[b]);
    }
    v->hoff = (uint32_t *)afm__calloc(a, (size_t)nh * 257 + 1, sizeof *v->hoff);
    v->hword = (uint32_t *)afm__alloc(a, (cap + 1) * sizeof *v->hword);
    v->hbits = (uint32_t *)afm__alloc(a, (cap + 1) * sizeof *v->hbits);
    key = (uint64_t *)afm__alloc(a, (size_t)(v->n_vocab + 1) * sizeof *key);
    if (!v->hoff || !v->hword || !v->hbits || !key) { afm__free(a, key); return AFM_ERR_NOMEM; }
    for (b = 0; b < v->n_big; b++) {
        int32_t h = v->bighuge[b], i, n = 0, L;
        if (h < 0) continue;
        for (i = v->biglo[b]; i < v->bighi[b]; i++) { /* length below the node, word, bit */
            int len = v->tokc[i] - v->bigcdep[b];
            len = len < 0 ? 0 : len > 255 ? 255 : len;
            key[n++] = (uint64_t)len << 40 | (uint64_t)(uint32_t)(v->toks[i] >> 5) << 8 | (uint64_t)(v->toks[i] & 31);
        }
        qsort(key, (size_t)n, sizeof *key, afm__u64_cmp);
        L = 0;
        for (i = 0; i < n; i++) {
            int len = (int)(key[i] >> 40);
            uint32_t w = (uint32_t)(key[i] >> 8) & 0xFFFFFFFFu;
            while (L <= len) v->hoff[(size_t)h * 257 + L++] = (uint32_t)np;
            if (i == 0 || (key[i] >> 8) != (key[i - 1] >> 8)) { v->hword[np] = w; v->hbits[np++] = 0; }
            v->hbits[np - 1] |= 1u << (key[i] & 31);
        }
        while (L <= 256) v->hoff[(size_t)h * 257 + L++] = (uint32_t)np;
    }
    afm__free(a, key);
    return AFM_OK;
}
/* UTF-8 as the tree spells it: per node, the continuation bytes still owed (0 at a character
   boundary, 255 after a byte that cannot be there) and the range the next one must be in. */
static void afm__vocab_utf8_step(uint8_t owed, uint8_t lo, uint8_t hi, unsigned x, uint8_t *o_owed, uint8_t *o_lo, uint8_t *o_hi) {
    *o_lo = 0x80; *o_hi = 0xBF; *o_owed = 255;
    if (owed == 255) return;
    if (owed) { if (x >= lo && x <= hi) *o_owed = (uint8_t)(owed - 1); return; }
    if (x < 0x80) *o_owed = 0;
    else if (x >= 0xC2 && x <= 0xDF) *o_owed = 1;
    else if (x >= 0xE0 && x <= 0xEF) { *o_owed = 2; if (x == 0xE0) *o_lo = 0xA0; if (x == 0xED) *o_hi = 0x9F; }
    else if (x >= 0xF0 && x <= 0xF4) { *o_owed = 3; if (x == 0xF0) *o_lo = 0x90; if (x == 0xF4) *o_hi = 0x8F; }
}
static afm_result afm__vocab_big(afm_constraint_vocab *v) {
    const afm_allocator *a = &v->alloc;
    int32_t n = v->n_nodes, u, nb = 0;
    int32_t *r0 = (int32_t *)afm__alloc(a, (size_t)n * sizeof *r0), *r1 = (int32_t *)afm__alloc(a, (size_t)n * sizeof *r1);
    uint8_t *dep = (uint8_t *)afm__calloc(a, (size_t)n, 1);
    uint64_t *set = (uint64_t *)afm__calloc(a, (size_t)n * 4, sizeof *set);
    uint64_t *fset = (uint64_t *)afm__calloc(a, (size_t)n * 4, sizeof *fset);
    uint8_t *owed = (uint8_t *)afm__alloc(a, (size_t)n), *nlo = (uint8_t *)afm__alloc(a, (size_t)n), *nhi = (uint8_t *)afm__alloc(a, (size_t)n);
    uint8_t *cdep = (uint8_t *)afm__alloc(a, (size_t)n), *amax = (uint8_t *)afm__alloc(a, (size_t)n), *ok8 = (uint8_t *)afm__alloc(a, (size_t)n);
    afm_result r = AFM_ERR_NOMEM;
    v->big = (int32_t *)afm__alloc(a, (size_t)n * sizeof *v->big);
    v->tokc = (uint8_t *)afm__alloc(a, (size_t)v->n_vocab + 1);
    if (!r0 || !r1 || !set || !fset || !dep || !owed || !nlo || !nhi || !cdep || !amax || !ok8 || !v->big || !v->tokc) goto out;
    owed[0] = 0; cdep[0] = 0; nlo[0] = 0x80; nhi[0] = 0xBF;
    for (u = 0; u < n; u++) { /* top down (parents are numbered first): UTF-8 position, depth in characters */
        int32_t c, e = v->child0[u] + v->nchild[u];
        for (c = v->child0[u]; c < e; c++) {
            afm__vocab_utf8_step(owed[u], nlo[u], nhi[u], v->nbyte[c], &owed[c], &nlo[c], &nhi[c]);
            cdep[c] = (uint8_t)(cdep[u] + (owed[c] == 0 && cdep[u] < 254));
        }
        for (c = 0; c < v->ntok[u]; c++) v->tokc[v->tok0[u] + c] = cdep[u];
    }
    for (u = n - 1; u >= 0; u--) {
        int32_t c, e = v->child0[u] + v->nchild[u];
        r0[u] = v->ntok[u] ? v->tok0[u] : v->nchild[u] ? r0[v->child0[u]] : 0;
        r1[u] = v->nchild[u] ? r1[e - 1] : v->tok0[u] + v->ntok[u];
        ok8[u] = 1;
        amax[u] = v->ntok[u] ? cdep[u] : 0;
        for (c = v->child0[u]; c < e; c++) {
            int q;
            for (q = 0; q < 4; q++) set[(size_t)u * 4 + q] |= set[(size_t)c * 4 + q];
            for (q = 0; q < 4; q++) fset[(size_t)u * 4 + q] |= fset[(size_t)c * 4 + q];
            set[(size_t)u * 4 + (v->nbyte[c] >> 6)] |= 1ull << (v->nbyte[c] & 63);
            if (owed[u] == 0) fset[(size_t)u * 4 + (v->nbyte[c] >> 6)] |= 1ull << (v->nbyte[c] & 63);
            if (dep[c] + 1 > dep[u]) dep[u] = (uint8_t)(dep[c] + 1 < 255 ? dep[c] + 1 : 255);
            if (owed[c] == 255 || (owed[c] && (v->ntok[c] || !v->nchild[c])) || !ok8[c]) ok8[u] = 0;
            if (amax[c] > amax[u]) amax[u] = amax[c];
        }
        v->big[u] = r1[u] - r0[u] - v->ntok[u] >= AFM__VOCAB_BIG ? nb++ : -1;
    }
    v->n_big = nb;
    v->bigset = (uint64_t *)afm__alloc(a, ((size_t)nb + 1) * 4 * sizeof *v->bigset);
    v->biglo = (int32_t *)afm__alloc(a, ((size_t)nb + 1) * sizeof *v->biglo);
    v->bighi = (int32_t *)afm__alloc(a, ((size_t)nb + 1) * sizeof *v->bighi);
    v->bigdepth = (uint8_t *)afm__alloc(a, (size_t)nb + 1);
    v->bigfirst = (uint64_t *)afm__alloc(a, ((size_t)nb + 1) * 4 * sizeof *v->bigfirst);
    v->bigcrel = (uint8_t *)afm__alloc(a, (size_t)nb + 1);
    v->bigcdep = (uint8_t *)afm__alloc(a, (size_t)nb + 1);
    v->bigowed = (uint8_t *)afm__alloc(a, (size_t)nb + 1);
    v->bigclo = (uint8_t *)afm__alloc(a, (size_t)nb + 1);
    v->bigchi = (uint8_t *)afm__alloc(a, (size_t)nb + 1);
    if (!v->bigset || !v->biglo || !v->bighi || !v->bigdepth || !v->bigfirst || !v->bigcrel || !v->bigcdep ||
        !v->bigowed || !v->bigclo || !v->bigchi) goto out;
    for (u = 0; u < n; u++)
        if (v->big[u] >= 0) {
            int32_t b = v->big[u];
            memcpy(v->bigset + (size_t)b * 4, set + (size_t)u * 4, 4 * sizeof *set);
            memcpy(v->bigfirst + (size_t)b * 4, fset + (size_t)u * 4, 4 * sizeof *fset);
            v->biglo[b] = r0[u] + v->ntok[u];
            v->bighi[b] = r1[u];
            v->bigdepth[b] = dep[u];
            v->bigcdep[b] = (uint8_t)(cdep[u] + (owed[u] != 0)); /* counting the character begun */
            v->bigclo[b] = nlo[u];
            v->bigchi[b] = nhi[u];
            v->bigowed[b] = owed[u] != 255 && ok8[u] && amax[u] < 254 && amax[u] >= v->bigcdep[b] ? owed[u] : 255;
            v->bigcrel[b] = (uint8_t)(v->bigowed[b] != 255 ? amax[u] - v->bigcdep[b] : 0);
        }
    r = afm__vocab_huge(v);
out:
    afm__free(a, r0);
    afm__free(a, r1);
    afm__free(a, set);
    afm__free(a, fset);
    afm__free(a, dep);
    afm__free(a, owed); afm__free(a, nlo); afm__free(a, nhi);
    afm__free(a, cdep); afm__free(a, amax); afm__free(a, ok8);
    return r;
}
AFMDEF afm_result afm_constraint_vocab_create(const afm_tokenizer *tok, const afm_allocator *allocator, afm_constraint_vocab **out) {
    const afm_allocator *a = allocator ? allocator : &afm__malloc_allocator;
    afm_constraint_vocab *v;
    size_t total = 0;
    int32_t i, n, V;
    afm_result r = AFM_ERR_NOMEM;
    if (!out) return AFM_ERR_ARG;
    *out = NULL;
    if (!tok) return AFM_ERR_ARG;
    V = afm_tokenizer_n_vocab(tok);
    if (!(v = (afm_constraint_vocab *)afm__calloc(a, 1, sizeof *v))) return AFM_ERR_NOMEM;
    v->alloc = *a;
    v->n_vocab = V;
    v->kind = (uint8_t *)afm__calloc(a, (size_t)V, 1);
    v->boff = (uint32_t *)afm__alloc(a, ((size_t)V + 1) * sizeof *v->boff);
    v->stops = (int32_t *)afm__alloc(a, 8 * sizeof *v->stops);
    for (i = 0; i < V; i++) { size_t pn; afm_tokenizer_piece(tok, i, &pn); total += pn + 1; }
    v->bytes = (unsigned char *)afm__alloc(a, total + 1);
    if (!v->kind || !v->boff || !v->stops || !v->bytes) goto fail;
    for (i = 0, total = 0; i < V; i++) { /* each token's bytes */
        v->boff[i] = (uint32_t)total;
        if (afm_tokenizer_is_stop(tok, i) && v->n_stops < 8) { v->kind[i] = 2; v->stops[v->n_stops++] = i; continue; }
        n = afm__vocab_token_bytes(tok, i, v->bytes + total);
        if (n > 0) { v->kind[i] = 1; total += (size_t)n; }
    }
    v->boff[V] = (uint32_t)total;
    if (afm__vocab_tree(v) != AFM_OK) goto fail;
    r = AFM_OK;
fail:
    if (r != AFM_OK) { afm_constraint_vocab_free(v); return r; }
    *out = v;
    return AFM_OK;
}

/* The prefix tree of v's text tokens (kind, boff and bytes filled in): tokens sorted by bytes,
   inserted along a path, then numbered breadth-first. */
static afm_result afm__vocab_tree(afm_constraint_vocab *v) {
    const afm_allocator *a = &v->alloc;
    afm__vtok *vt = NULL;
    int32_t *par = NULL, *first = NULL, *sib = NULL, *last = NULL, *order = NULL, *newid = NULL, *path = NULL;
    uint8_t *byte = NULL;
    size_t max_nodes, nn = 1, total = v->boff[v->n_vocab];
    int32_t i, n, nt = 0, V = v->n_vocab;
    afm_result r = AFM_ERR_NOMEM;
    for (i = 0; i < V; i++)
        if (v->kind[i] == 1) {
            nt++;
            if ((int)(v->boff[i + 1] - v->boff[i]) > v->max_len) v->max_len = (int)(v->boff[i + 1] - v->boff[i]);
        }
    if (!(vt = (afm__vtok *)afm__alloc(a, ((size_t)nt + 1) * sizeof *vt))) goto fail;
    for (i = 0, n = 0; i < V; i++)
        if (v->kind[i] == 1) { vt[n].p = v->bytes + v->boff[i]; vt[n].n = v->boff[i + 1] - v->boff[i]; vt[n].id = i; n++; }
    qsort(vt, (size_t)nt, sizeof *vt, afm__vtok_cmp);
    max_nodes = total + 1;
    par = (int32_t *)afm__alloc(a, max_nodes * sizeof *par);
    first = (int32_t *)afm__alloc(a, max_nodes * sizeof *first);
    sib = (int32_t *)afm__alloc(a, max_nodes * sizeof *sib);
    last = (int32_t *)afm__alloc(a, max_nodes * sizeof *last);
    byte = (uint8_t *)afm__alloc(a, max_nodes);
    order = (int32_t *)afm__alloc(a, max_nodes * sizeof *order);
    newid = (int32_t *)afm__alloc(a, max_nodes * sizeof *newid);
    path = (int32_t *)afm__alloc(a, ((size_t)v->max_len + 2) * sizeof *path);
    v->tok0 = (int32_t *)afm__alloc(a, max_nodes * sizeof *v->tok0);
    v->ntok = (uint16_t *)afm__calloc(a, max_nodes, sizeof *v->ntok);
    v->toks = (int32_t *)afm__alloc(a, ((size_t)nt + 1) * sizeof *v->toks);
    if (!par || !first || !sib || !last || !byte || !order || !newid || !path || !v->tok0 || !v->ntok || !v->toks) goto fail;
    first[0] = last[0] = -1;
    path[0] = 0;
    {
        uint32_t depth = 0; /* path[0 .. depth] is the previous token's node chain */
        for (i = 0; i < nt; i++) {
            uint32_t k = 0;
            if (i > 0) while (k < depth && k < vt[i].n && vt[i - 1].p[k] == vt[i].p[k]) k++;
            for (; k < vt[i].n; k++) { /* new nodes below path[k] */
                int32_t u = (int32_t)nn++, p = path[k];
                par[u] = p; byte[u] = vt[i].p[k]; first[u] = last[u] = sib[u] = -1;
                if (last[p] < 0) first[p] = u; else sib[last[p]] = u;
                last[p] = u;
                path[k + 1] = u;
            }
            depth = vt[i].n;
            v->toks[i] = vt[i].id;
        }
    }
    {   /* breadth-first: the children of each node get consecutive numbers */
        size_t qh = 0, qt = 1;
        int32_t u, c;
        order[0] = 0;
        newid[0] = 0;
        v->n_nodes = (int32_t)nn;
        v->child0 = (int32_t *)afm__alloc(a, nn * sizeof *v->child0);
        v->nchild = (uint16_t *)afm__calloc(a, nn, sizeof *v->nchild);
        v->nbyte = (uint8_t *)afm__alloc(a, nn);
        if (!v->child0 || !v->nchild || !v->nbyte) goto fail;
        v->nbyte[0] = 0;
        while (qh < qt) {
            u = order[qh++];
            v->child0[newid[u]] = (int32_t)qt;
            for (c = first[u]; c >= 0; c = sib[c]) {
                newid[c] = (int32_t)qt;
                v->nbyte[qt] = byte[c];
                order[qt++] = c;
                v->nchild[newid[u]]++;
            }
        }
    }
    for (i = 0; i < (int32_t)nn; i++) v->tok0[i] = 0;
    { /* tokens end at the node of their last byte: equal byte strings are adjacent in vt */
        int32_t u = 0;
        uint32_t k;
        for (i = 0; i < nt; i++) {
            if (i == 0 || vt[i].n != vt[i - 1].n || memcmp(vt[i].p, vt[i - 1].p, vt[i].n) != 0) {
                int32_t node = 0;
                for (k = 0; k < vt[i].n; k++) { /* follow the children (old numbering) */
                    int32_t c = first[node];
                    while (byte[c] != vt[i].p[k]) c = sib[c];
                    node = c;
                }
                u = newid[node];
                v->tok0[u] = i;
            }
            v->ntok[u]++;
        }
    }
    if (afm__vocab_big(v) != AFM_OK) goto fail;
    r = AFM_OK;
fail:
    afm__free(a, vt); afm__free(a, par); afm__free(a, first); afm__free(a, sib); afm__free(a, last);
    afm__free(a, byte); afm__free(a, order); afm__free(a, newid); afm__free(a, path);
    return r;
}

/* ---- the matcher: interned stacks and states, memoised transitions ---- */
#define AFM__CM_MAX_DEPTH 2000     /* frames per stack: deeper nesting is not generated */
#define AFM__CM_MAX_STACKS 20000   /* parses followed at once */
#define AFM__CM_MAX_STATES 2000000
#define AFM__CM_SLOTS 64           /* cached masks */
#define AFM__CM_DEAD (-1)
#define AFM__CM_UNKNOWN (-2)
#define AFM__CM_FAIL (-3)
#define AFM__CM_MIXED (-5)         /* afm__cm_uniform: the bytes lead to different states */

typedef struct afm__cm_walk_entry { int32_t node, state; int k; } afm__cm_walk_entry;
/* Rows of 256 transitions in blocks of AFM__CM_ROWS rows: growing never copies them (a copy of
   megabytes would land on one unlucky token's mask). */
#define AFM__CM_ROWS 256
typedef struct afm__cm_rows { int32_t **blk; size_t n, cap; } afm__cm_rows;
#define AFM__CM_ROW(t, r) ((t).blk[(size_t)(r) / AFM__CM_ROWS] + (size_t)(r) % AFM__CM_ROWS * 256)
/* bytes known to lead from a state to state `to` (yes) and known not to (no) */
typedef struct afm__cm_cls { int32_t to; uint64_t yes[4], no[4]; } afm__cm_cls;
#define AFM__CM_NCLS 3
typedef struct afm__cm_clsrows { afm__cm_cls **blk; size_t n, cap; } afm__cm_clsrows; /* the same in blocks */
#define AFM__CM_CLS(t, s) ((t).blk[(size_t)(s) / AFM__CM_ROWS] + (size_t)(s) % AFM__CM_ROWS * AFM__CM_NCLS)

struct afm_constraint_state {
    const afm_constraint *c;
    const afm_constraint_vocab *v;
    afm_allocator alloc;
    const uint32_t *el, *rule_alt0, *ralt;
    /* stack frames: (pos, parent), interned */
    uint32_t *fpos, *fseen;
    int32_t *fpar;
    uint16_t *fdepth;
    size_t n_f, cap_f, c1, c2, c3;
    int32_t *fht;
    size_t fht_cap;
    /* states: sorted frame ids spool[soff[s] .. soff[s + 1]), accepting flag, transitions */
    uint32_t *soff;
    int32_t *spool, *str, *sslot;
    uint8_t *sacc;
    uint32_t *shash;        /* per state its hash (rehashing the table then reads no stacks) */
    size_t n_s, cap_s, n_spool, cap_spool, s1, s2, s3, s4;
    int32_t *sht;
    size_t sht_cap;
    afm__cm_rows trans;     /* a row of 256 per state that has any, AFM__CM_UNKNOWN until computed */
    afm__cm_clsrows cls;    /* per state AFM__CM_NCLS byte classes with one target each (learnt on demand) */
    int32_t *ctr;           /* per state: index into ctrans, -1 until needed */
    afm__cm_rows ctrans;    /* 256 per state: the state after the whole character starting with the byte */
    size_t cap_ctr;
    afm__cm_clsrows ccls;   /* as cls, for those character steps */
    /* scratch */
    uint32_t *work;         /* (pos, parent) pairs */
    size_t n_work, cap_work;
    int32_t *out;
    size_t n_out, cap_out;
    uint32_t gen;
    /* masks */
    int words;
    uint32_t *masks;        /* [AFM__CM_SLOTS][words] */
    int32_t slot_state[AFM__CM_SLOTS];
    int next_slot;
    afm__cm_walk_entry *walk;
    /* the output so far: hist[i] is the state after i tokens */
    int32_t *hist;
    size_t n_hist, cap_hist;
    int failed;
    char err[200];
};

static int afm__cm_fail(afm_constraint_state *m, const char *why) {
    if (!m->failed) snprintf(m->err, sizeof m->err, "%s", why);
    m->failed = 1;
    return 0;
}

/* A new row of t, every entry AFM__CM_UNKNOWN; its index, or -1 when out of memory. */
static int32_t afm__cm_row(afm_constraint_state *m, afm__cm_rows *t) {
    size_t r = t->n, q;
    int32_t *row;
    if (r % AFM__CM_ROWS == 0) {
        size_t nb = r / AFM__CM_ROWS;
        if (r >= 0x7FFFFFFF || !afm__grow(&m->alloc, (void **)&t->blk, &t->cap, nb + 1, sizeof *t->blk) ||
            !(t->blk[nb] = (int32_t *)afm__alloc(&m->alloc, (size_t)AFM__CM_ROWS * 256 * sizeof **t->blk)))
            return afm__cm_fail(m, "out of memory") - 1;
    }
    row = AFM__CM_ROW(*t, r);
    for (q = 0; q < 256; q++) row[q] = AFM__CM_UNKNOWN;
    t->n++;
    return (int32_t)r;
}
static void afm__cm_rows_free(afm_allocator *a, afm__cm_rows *t) {
    size_t i;
    for (i = 0; i * AFM__CM_ROWS < t->n; i++) afm__free(a, t->blk[i]);
    afm__free(a, t->blk);
}
/* The next state's classes, all unknown; 0 when out of memory. */
static int afm__cm_cls_row(afm_constraint_state *m, afm__cm_clsrows *t) {
    size_t r = t->n, q;
    afm__cm_cls *c;
    if (r % AFM__CM_ROWS == 0) {
        size_t nb = r / AFM__CM_ROWS;
        if (!afm__grow(&m->alloc, (void **)&t->blk, &t->cap, nb + 1, sizeof *t->blk) ||
            !(t->blk[nb] = (afm__cm_cls *)afm__alloc(&m->alloc, (size_t)AFM__CM_ROWS * AFM__CM_NCLS * sizeof **t->blk)))
            return afm__cm_fail(m, "out of memory");
    }
    c = AFM__CM_CLS(*t, r);
    memset(c, 0, AFM__CM_NCLS * sizeof *c);
    for (q = 0; q < AFM__CM_NCLS; q++) c[q].to = AFM__CM_UNKNOWN;
    t->n++;
    return 1;
}
static void afm__cm_cls_free(afm_allocator *a, afm__cm_clsrows *t) {
    size_t i;
    for (i = 0; i * AFM__CM_ROWS < t->n; i++) afm__free(a, t->blk[i]);
    afm__free(a, t->blk);
}

static uint32_t afm__mix(uint32_t h, uint32_t x) { h ^= x; h *= 0x9E3779B1u; return h ^ (h >> 15); }

/* The frame (pos, parent), interned; -1 when too deep, -3 on failure. */
static int32_t afm__cm_frame(afm_constraint_state *m, uint32_t pos, int32_t parent) {
    uint32_t h = afm__mix(afm__mix(0x12345u, pos), (uint32_t)parent);
    size_t k;
    int32_t f;
    unsigned d = parent >= 0 ? m->fdepth[parent] + 1u : 1u;
    if (d > AFM__CM_MAX_DEPTH) return -1;
    if ((m->n_f + 1) * 2 > m->fht_cap) { /* grow and rehash */
        size_t nc = m->fht_cap ? m->fht_cap * 2 : 1024, q;
        int32_t *nt = (int32_t *)afm__alloc(&m->alloc, nc * sizeof *nt);
        if (!nt) return (int32_t)afm__cm_fail(m, "out of memory") - 3;
        memset(nt, 0xFF, nc * sizeof *nt);
        for (q = 0; q < m->n_f; q++) {
            size_t j = afm__mix(afm__mix(0x12345u, m->fpos[q]), (uint32_t)m->fpar[q]) & (nc - 1);
            while (nt[j] >= 0) j = (j + 1) & (nc - 1);
            nt[j] = (int32_t)q;
        }
        afm__free(&m->alloc, m->fht);
        m->fht = nt;
        m->fht_cap = nc;
    }
    for (k = h & (m->fht_cap - 1); (f = m->fht[k]) >= 0; k = (k + 1) & (m->fht_cap - 1))
        if (m->fpos[f] == pos && m->fpar[f] == parent) return f;
    if (!afm__grow(&m->alloc, (void **)&m->fpos, &m->cap_f, m->n_f + 1, sizeof *m->fpos) ||
        !afm__grow(&m->alloc, (void **)&m->fseen, &m->c1, m->n_f + 1, sizeof *m->fseen) ||
        !afm__grow(&m->alloc, (void **)&m->fpar, &m->c2, m->n_f + 1, sizeof *m->fpar) ||
        !afm__grow(&m->alloc, (void **)&m->fdepth, &m->c3, m->n_f + 1, sizeof *m->fdepth))
        return (int32_t)afm__cm_fail(m, "out of memory") - 3;
    f = (int32_t)m->n_f++;
    m->fpos[f] = pos;
    m->fpar[f] = parent;
    m->fdepth[f] = (uint16_t)d;
    m->fseen[f] = 0;
    m->fht[k] = f;
    return f;
}

static int afm__cm_work(afm_constraint_state *m, uint32_t pos, int32_t parent) {
    if (!afm__grow(&m->alloc, (void **)&m->work, &m->cap_work, m->n_work + 2, sizeof *m->work)) return afm__cm_fail(m, "out of memory");
    m->work[m->n_work++] = pos;
    m->work[m->n_work++] = (uint32_t)parent;
    return 1;
}

/* Every stack reachable from the pending work items without reading a byte: those whose top is a
   byte range go to out; *acc is set when one finishes the root. */
static int afm__cm_close(afm_constraint_state *m, int *acc) {
    while (m->n_work) {
        int32_t parent = (int32_t)m->work[--m->n_work];
        uint32_t pos = m->work[--m->n_work], e, al;
        int32_t f = afm__cm_frame(m, pos, parent), np;
        if (f == -1) continue; /* too deep: this parse is dropped */
        if (f < -1) return 0;
        if (m->fseen[f] == m->gen) continue;
        m->fseen[f] = m->gen;
        e = m->el[pos];
        if (e == AFM__G_END) {
            if (parent < 0) *acc = 1;
            else if (!afm__cm_work(m, m->fpos[parent], m->fpar[parent])) return 0;
            continue;
        }
        if (e & AFM__G_BYTES) {
            if (m->n_out >= AFM__CM_MAX_STACKS) return afm__cm_fail(m, "the grammar is too ambiguous: more than 20000 parses at once");
            if (!afm__grow(&m->alloc, (void **)&m->out, &m->cap_out, m->n_out + 1, sizeof *m->out)) return afm__cm_fail(m, "out of memory");
            m->out[m->n_out++] = f;
            continue;
        }
        /* a reference: its alternatives, returning to pos + 1 (or to the parent from a tail call) */
        if (m->el[pos + 1] == AFM__G_END) np = parent;
        else if ((np = afm__cm_frame(m, pos + 1, parent)) == -1) continue;
        else if (np < -1) return 0;
        for (al = m->rule_alt0[e]; al < m->rule_alt0[e + 1]; al++)
            if (!afm__cm_work(m, m->ralt[al], np)) return 0;
    }
    return 1;
}

static int afm__cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The state of m->out plus acc, interned; AFM__CM_DEAD when empty, AFM__CM_FAIL on failure. */
static int32_t afm__cm_state(afm_constraint_state *m, int acc) {
    uint32_t h = 0x51ED27u ^ (uint32_t)acc;
    size_t k, i;
    int32_t s;
    if (!m->n_out && !acc) return AFM__CM_DEAD;
    if (m->n_out > 64) qsort(m->out, m->n_out, sizeof *m->out, afm__cmp_i32);
    else for (i = 1; i < m->n_out; i++) { /* usually a handful: insertion sort */
        int32_t x = m->out[i];
        size_t j = i;
        while (j > 0 && m->out[j - 1] > x) { m->out[j] = m->out[j - 1]; j--; }
        m->out[j] = x;
    }
    for (i = 0; i < m->n_out; i++) h = afm__mix(h, (uint32_t)m->out[i]);
    if ((m->n_s + 1) * 2 > m->sht_cap) {
        size_t nc = m->sht_cap ? m->sht_cap * 2 : 1024, q;
        int32_t *nt = (int32_t *)afm__alloc(&m->alloc, nc * sizeof *nt);
        if (!nt) return (int32_t)afm__cm_fail(m, "out of memory") + AFM__CM_FAIL;
        memset(nt, 0xFF, nc * sizeof *nt);
        for (q = 0; q < m->n_s; q++) {
            size_t j;
            for (j = m->shash[q] & (nc - 1); nt[j] >= 0; j = (j + 1) & (nc - 1)) {}
            nt[j] = (int32_t)q;
        }
        afm__free(&m->alloc, m->sht);
        m->sht = nt;
        m->sht_cap = nc;
    }
    for (k = h & (m->sht_cap - 1); (s = m->sht[k]) >= 0; k = (k + 1) & (m->sht_cap - 1))
        if (m->sacc[s] == acc && m->soff[s + 1] - m->soff[s] == m->n_out &&
            (m->n_out == 0 || memcmp(m->spool + m->soff[s], m->out, m->n_out * sizeof *m->out) == 0))
            return s;
    if (m->n_s >= AFM__CM_MAX_STATES) return (int32_t)afm__cm_fail(m, "too many matcher states") + AFM__CM_FAIL;
    if (!afm__grow(&m->alloc, (void **)&m->soff, &m->cap_s, m->n_s + 2, sizeof *m->soff) ||
        !afm__grow(&m->alloc, (void **)&m->str, &m->s1, m->n_s + 1, sizeof *m->str) ||
        !afm__grow(&m->alloc, (void **)&m->sslot, &m->s2, m->n_s + 1, sizeof *m->sslot) ||
        !afm__grow(&m->alloc, (void **)&m->sacc, &m->s3, m->n_s + 1, 1) ||
        !afm__grow(&m->alloc, (void **)&m->shash, &m->s4, m->n_s + 1, sizeof *m->shash) ||
        !afm__grow(&m->alloc, (void **)&m->spool, &m->cap_spool, m->n_spool + m->n_out, sizeof *m->spool))
        return (int32_t)afm__cm_fail(m, "out of memory") + AFM__CM_FAIL;
    s = (int32_t)m->n_s++;
    if (m->n_out) memcpy(m->spool + m->n_spool, m->out, m->n_out * sizeof *m->out);
    m->n_spool += m->n_out;
    m->soff[s] = (uint32_t)(m->n_spool - m->n_out);
    m->soff[s + 1] = (uint32_t)m->n_spool;
    m->sacc[s] = (uint8_t)acc;
    m->shash[s] = h;
    m->str[s] = -1;
    m->sslot[s] = -1;
    m->sht[k] = s;
    if (!afm__cm_cls_row(m, &m->cls) || !afm__cm_cls_row(m, &m->ccls) ||
        !afm__grow(&m->alloc, (void **)&m->ctr, &m->cap_ctr, m->n_s + 1, sizeof *m->ctr))
        return (int32_t)afm__cm_fail(m, "out of memory") + AFM__CM_FAIL;
    m->ctr[s] = -1;
    return s;
}

/* (state, byte) -> state, computed. */
static int32_t afm__cm_step_slow(afm_constraint_state *m, int32_t s, unsigned b) {
    uint32_t i;
    int acc = 0;
    m->gen++;
    m->n_out = 0;
    m->n_work = 0;
    for (i = m->soff[s]; i < m->soff[s + 1]; i++) {
        int32_t f = m->spool[i];
        uint32_t e = m->el[m->fpos[f]];
        if (b >= (e & 0xFF) && b <= ((e >> 8) & 0xFF) && !afm__cm_work(m, m->fpos[f] + 1, m->fpar[f])) return AFM__CM_FAIL;
        if (!afm__cm_close(m, &acc)) return AFM__CM_FAIL;
    }
    return afm__cm_state(m, acc);
}

/* The index of the lowest set bit of x (not 0). */
static int afm__ctz64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(x);
#else
    int n = 0;
    while (!(x & 1)) { x >>= 1; n++; }
    return n;
#endif
}

/* (state, byte) -> state, memoised. */
static int32_t afm__cm_step(afm_constraint_state *m, int32_t s, unsigned b) {
    int32_t t;
    if (s < 0) return AFM__CM_DEAD;
    if (m->str[s] < 0) {
        if (m->soff[s + 1] == m->soff[s]) return AFM__CM_DEAD; /* accepting, nothing can follow */
        if ((m->str[s] = afm__cm_row(m, &m->trans)) < 0) return AFM__CM_FAIL;
    }
    t = AFM__CM_ROW(m->trans, m->str[s])[b];
    if (t == AFM__CM_UNKNOWN) {
        /* computed once, then filled in for every byte that passes the same range tests of this
           state's stacks (inside a JSON string: every plain character's byte at once) */
        uint64_t same[4] = { ~0ull, ~0ull, ~0ull, ~0ull };
        uint32_t i;
        int32_t *row;
        int q;
        t = afm__cm_step_slow(m, s, b);
        if (t == AFM__CM_FAIL) return t;
        row = AFM__CM_ROW(m->trans, m->str[s]);
        for (i = m->soff[s]; i < m->soff[s + 1]; i++) { /* the bytes inside (outside) every range b is inside (outside) of */
            uint32_t e = m->el[m->fpos[m->spool[i]]], lo = e & 0xFF, hi = (e >> 8) & 0xFF;
            int in = b >= lo && b <= hi;
            for (q = 0; q < 4; q++) {
                uint32_t a0 = (uint32_t)q * 64, a1 = a0 + 63;
                uint64_t w = lo > a1 || hi < a0 ? 0 : (~0ull << ((lo > a0 ? lo : a0) - a0)) & (~0ull >> (a1 - (hi < a1 ? hi : a1)));
                same[q] &= in ? w : ~w;
            }
        }
        for (q = 0; q < 4; q++)
            while (same[q]) {
                row[q * 64 + afm__ctz64(same[q])] = t;
                same[q] &= same[q] - 1;
            }
    }
    return t;
}

static int32_t afm__cm_char_step(afm_constraint_state *m, int32_t s, unsigned b);
/* What a byte is in UTF-8, as far as the continuations a character starting with it needs. */
static int afm__utf8_kind(unsigned b) {
    return b < 0x80 ? 0 : b < 0xC2 ? 1 : b < 0xE0 ? 2 : b == 0xE0 ? 3 : b == 0xED ? 4 : b < 0xF0 ? 5 : b == 0xF0 ? 6 : b < 0xF4 ? 7 : b == 0xF4 ? 8 : 1;
}

/* The state every byte of the 256-bit set b leads to from state s (chars: every character whose
   first byte is in b), if it is one and the same: a live state, or AFM__CM_DEAD when all are dead;
   AFM__CM_MIXED if not; AFM__CM_FAIL on failure. What each byte does is learnt once per state, in
   up to AFM__CM_NCLS classes (inside a JSON string: the plain characters, the dead ones). */
static int32_t afm__cm_uniform(afm_constraint_state *m, int32_t s, const uint64_t *b, int chars) {
    afm__cm_cls *c;
    int32_t to;
    int q, lo = 0, k;
    if (s < 0) return s;
    while (!b[lo >> 6]) lo += 64; /* b is never empty */
    lo += afm__ctz64(b[lo >> 6]);
    to = chars ? afm__cm_char_step(m, s, (unsigned)lo) : afm__cm_step(m, s, (unsigned)lo);
    if (to < AFM__CM_DEAD) return to == AFM__CM_FAIL ? to : AFM__CM_MIXED;
    c = chars ? AFM__CM_CLS(m->ccls, s) : AFM__CM_CLS(m->cls, s);
    for (k = 0; k < AFM__CM_NCLS && c[k].to != to && c[k].to != AFM__CM_UNKNOWN; k++) {}
    if (k == AFM__CM_NCLS) { k = AFM__CM_NCLS - 1; memset(&c[k], 0, sizeof c[k]); }
    c[k].to = to;
    for (q = 0; q < 4; q++)
        if (b[q] & c[k].no[q]) return AFM__CM_MIXED;
    for (q = 0; q < 4; q++) {
        uint64_t todo = b[q] & ~c[k].yes[q];
        while (todo) {
            int bit = afm__ctz64(todo);
            int32_t t;
            todo &= todo - 1;
            t = chars ? afm__cm_char_step(m, s, (unsigned)(q * 64 + bit)) : afm__cm_step(m, s, (unsigned)(q * 64 + bit));
            if (t == AFM__CM_FAIL) return t;
            c = chars ? AFM__CM_CLS(m->ccls, s) : AFM__CM_CLS(m->cls, s); /* blocks never move; still, reread */
            { /* the byte's class alike (by characters: of the same UTF-8 length and continuation range) */
                const uint8_t *brep = m->c->g.brep;
                unsigned x0 = (unsigned)(q * 64 + bit), r = brep[x0], x;
                for (x = r; x < 256 && brep[x] == r; x++)
                    if (!chars || afm__utf8_kind(x) == afm__utf8_kind(x0)) {
                        if (t != to) c[k].no[x >> 6] |= 1ull << (x & 63);
                        else c[k].yes[x >> 6] |= 1ull << (x & 63);
                    }
                if (t != to) return AFM__CM_MIXED;
                todo &= ~c[k].yes[q];
            }
        }
    }
    return to;
}

/* The state after a whole UTF-8 character starting with byte b from state s, when every
   continuation leads to one same state (memoised); AFM__CM_DEAD when none lives, AFM__CM_MIXED
   when they differ (or b starts no character). */
static int32_t afm__cm_char_step(afm_constraint_state *m, int32_t s, unsigned b) {
    static const uint64_t cont[4][4] = { /* continuation ranges 80-BF, A0-BF, 80-9F, 90-BF, 80-8F */
        { 0, 0, ~0ull, 0 }, { 0, 0, 0xFFFFFFFF00000000ull, 0 }, { 0, 0, 0x00000000FFFFFFFFull, 0 }, { 0, 0, 0xFFFFFFFFFFFF0000ull, 0 } };
    static const uint64_t cont_f4[4] = { 0, 0, 0xFFFFull, 0 };
    const uint64_t *first;
    int32_t t, w;
    int n, k;
    if (s < 0) return AFM__CM_DEAD;
    if (b < 0x80) return afm__cm_step(m, s, b);
    if (b >= 0xC2 && b <= 0xDF) { n = 1; first = cont[0]; }
    else if (b >= 0xE0 && b <= 0xEF) { n = 2; first = b == 0xE0 ? cont[1] : b == 0xED ? cont[2] : cont[0]; }
    else if (b >= 0xF0 && b <= 0xF4) { n = 3; first = b == 0xF0 ? cont[3] : b == 0xF4 ? cont_f4 : cont[0]; }
    else return AFM__CM_MIXED;
    if (m->ctr[s] < 0 && (m->ctr[s] = afm__cm_row(m, &m->ctrans)) < 0) return AFM__CM_FAIL;
    t = AFM__CM_ROW(m->ctrans, m->ctr[s])[b];
    if (t != AFM__CM_UNKNOWN) return t;
    w = afm__cm_step(m, s, b);
    for (k = 0; k < n && w >= 0; k++) w = afm__cm_uniform(m, w, k ? cont[0] : first, 0);
    if (w == AFM__CM_FAIL) return w;
    AFM__CM_ROW(m->ctrans, m->ctr[s])[b] = w;
    return w;
}

/* The allowed-token bit set of state s (cached). NULL on failure. */
static const uint32_t *afm__cm_mask(afm_constraint_state *m, int32_t s) {
    const afm_constraint_vocab *v = m->v;
    uint32_t *mask;
    int slot, sp = 0, i;
    if (m->failed) return NULL;
    if (s < 0) { /* dead or finished: nothing */
        slot = m->next_slot;
        m->next_slot = (m->next_slot + 1) % AFM__CM_SLOTS;
        if (m->slot_state[slot] >= 0) m->sslot[m->slot_state[slot]] = -1;
        m->slot_state[slot] = -1;
        mask = m->masks + (size_t)slot * (size_t)m->words;
        memset(mask, 0, (size_t)m->words * sizeof *mask);
        return mask;
    }
    if (m->sslot[s] >= 0) return m->masks + (size_t)m->sslot[s] * (size_t)m->words;
    slot = m->next_slot;
    m->next_slot = (m->next_slot + 1) % AFM__CM_SLOTS;
    if (m->slot_state[slot] >= 0) m->sslot[m->slot_state[slot]] = -1;
    m->slot_state[slot] = -1;
    mask = m->masks + (size_t)slot * (size_t)m->words;
    memset(mask, 0, (size_t)m->words * sizeof *mask);
    m->walk[0].node = 0;
    m->walk[0].state = s;
    m->walk[0].k = 0;
    sp = 1;
    while (sp > 0) { /* depth-first over the prefix tree, alive nodes only */
        int32_t u = m->walk[sp - 1].node, c, t;
        if (m->walk[sp - 1].k == v->nchild[u]) { sp--; continue; }
        c = v->child0[u] + m->walk[sp - 1].k++;
        t = afm__cm_step(m, m->walk[sp - 1].state, v->nbyte[c]);
        if (t < 0) {
            if (t == AFM__CM_FAIL) return NULL;
            continue;
        }
        for (i = 0; i < v->ntok[c]; i++) {
            int32_t id = v->toks[v->tok0[c] + i];
            mask[id >> 5] |= 1u << (id & 31);
        }
        if (v->big[c] >= 0) { /* many tokens below: all allowed when every path of their bytes stays alive */
            int32_t b = v->big[c], u = t, x = t, d, k;
            if (v->bigowed[b] != 255) { /* by characters: those within d characters when every one after d dies */
                uint64_t cont[4] = { 0, 0, 0, 0 };
                for (d = v->bigclo[b]; d <= v->bigchi[b]; d++) cont[d >> 6] |= 1ull << (d & 63);
                for (d = 0; d < v->bigowed[b] && u >= 0; d++) { /* first the rest of the character begun */
                    u = afm__cm_uniform(m, u, cont, 0);
                    cont[2] = ~0ull;
                }
                if (u == AFM__CM_FAIL) return NULL;
                if (u < 0) {
                    if (u == AFM__CM_DEAD) continue; /* none of them */
                    goto descend;
                }
                for (d = 0; d < v->bigcrel[b] && (x = afm__cm_uniform(m, u, v->bigfirst + (size_t)b * 4, 1)) >= 0; d++) u = x;
                if (x == AFM__CM_FAIL) return NULL;
                if (x >= 0 || x == AFM__CM_DEAD) {
                    int lim = v->bigcdep[b] + d;
                    if (v->bighuge[b] >= 0) {
                        size_t h = (size_t)v->bighuge[b] * 257, e = v->hoff[h + (d < 256 ? d + 1 : 256)];
                        for (k = (int32_t)v->hoff[h]; k < (int32_t)e; k++) mask[v->hword[k]] |= v->hbits[k];
                    } else
                        for (k = v->biglo[b]; k < v->bighi[b]; k++)
                            if (v->tokc[k] <= lim) mask[v->toks[k] >> 5] |= 1u << (v->toks[k] & 31);
                    continue;
                }
            } else {
                for (d = 0; d < v->bigdepth[b] && u >= 0; d++) u = afm__cm_uniform(m, u, v->bigset + (size_t)b * 4, 0);
                if (u == AFM__CM_FAIL) return NULL;
                if (u >= 0) {
                    if (v->bighuge[b] >= 0) {
                        size_t h = (size_t)v->bighuge[b] * 257;
                        for (k = (int32_t)v->hoff[h]; k < (int32_t)v->hoff[h + 256]; k++) mask[v->hword[k]] |= v->hbits[k];
                    } else
                        for (k = v->biglo[b]; k < v->bighi[b]; k++) mask[v->toks[k] >> 5] |= 1u << (v->toks[k] & 31);
                    continue;
                }
            }
        }
    descend:
        if (v->nchild[c]) {
            m->walk[sp].node = c;
            m->walk[sp].state = t;
            m->walk[sp].k = 0;
            sp++;
        }
    }
    if (m->sacc[s])
        for (i = 0; i < v->n_stops; i++) mask[v->stops[i] >> 5] |= 1u << (v->stops[i] & 31);
    m->slot_state[slot] = s;
    m->sslot[s] = slot;
    return mask;
}

/* The state after the bytes of token id from state s (stop tokens: the finished state when s
   is accepting). */
static int32_t afm__cm_token(afm_constraint_state *m, int32_t s, int32_t id) {
    const afm_constraint_vocab *v = m->v;
    uint32_t k;
    if (s < 0 || id < 0 || id >= v->n_vocab || !v->kind[id]) return AFM__CM_DEAD;
    if (v->kind[id] == 2) return m->sacc[s] ? -4 : AFM__CM_DEAD; /* -4: finished */
    for (k = v->boff[id]; k < v->boff[id + 1] && s >= 0; k++) s = afm__cm_step(m, s, v->bytes[k]);
    return s;
}

/* ---- constraint states: the public face ---- */
AFMDEF void afm_constraint_state_free(afm_constraint_state *m) {
    afm_allocator a;
    if (!m) return;
    a = m->alloc;
    afm__free(&a, m->fpos); afm__free(&a, m->fseen); afm__free(&a, m->fpar); afm__free(&a, m->fdepth); afm__free(&a, m->fht);
    afm__free(&a, m->soff); afm__free(&a, m->spool); afm__free(&a, m->str); afm__free(&a, m->sslot); afm__free(&a, m->sacc); afm__free(&a, m->shash);
    afm__free(&a, m->sht); afm__cm_rows_free(&a, &m->trans); afm__free(&a, m->work); afm__free(&a, m->out); afm__free(&a, m->masks);
    afm__free(&a, m->walk); afm__free(&a, m->hist); afm__cm_cls_free(&a, &m->cls);
    afm__free(&a, m->ctr); afm__cm_rows_free(&a, &m->ctrans); afm__cm_cls_free(&a, &m->ccls);
    afm__free(&a, m);
}

AFMDEF afm_result afm_constraint_state_create(const afm_constraint *c, const afm_constraint_vocab *v, afm_constraint_state **out) {
    afm_constraint_state *m;
    int32_t s0;
    uint32_t al;
    int acc = 0, i;
    if (!out) return AFM_ERR_ARG;
    *out = NULL;
    if (!c || !v) return AFM_ERR_ARG;
    if (!(m = (afm_constraint_state *)afm__calloc(&v->alloc, 1, sizeof *m))) return AFM_ERR_NOMEM;
    m->c = c;
    m->v = v;
    m->alloc = v->alloc;
    m->el = c->g.el;
    m->rule_alt0 = c->g.rule_alt0;
    m->ralt = c->g.ralt;
    m->words = (v->n_vocab + 31) / 32;
    for (i = 0; i < AFM__CM_SLOTS; i++) m->slot_state[i] = -1;
    m->masks = (uint32_t *)afm__alloc(&m->alloc, (size_t)AFM__CM_SLOTS * (size_t)m->words * sizeof *m->masks);
    m->walk = (afm__cm_walk_entry *)afm__alloc(&m->alloc, ((size_t)v->max_len + 2) * sizeof *m->walk);
    if (!m->masks || !m->walk) { afm_constraint_state_free(m); return AFM_ERR_NOMEM; }
    m->gen = 1;
    for (al = m->rule_alt0[c->g.root]; al < m->rule_alt0[c->g.root + 1]; al++)
        if (!afm__cm_work(m, m->ralt[al], -1)) break;
    if (m->failed || !afm__cm_close(m, &acc) || (s0 = afm__cm_state(m, acc)) < 0 ||
        !afm__grow(&m->alloc, (void **)&m->hist, &m->cap_hist, 64, sizeof *m->hist)) {
        afm_constraint_state_free(m);
        return AFM_ERR_NOMEM;
    }
    m->hist[0] = s0;
    m->n_hist = 1;
    *out = m;
    return AFM_OK;
}

AFMDEF const uint32_t *afm_constraint_state_mask(afm_constraint_state *m) {
    return m ? afm__cm_mask(m, m->hist[m->n_hist - 1]) : NULL;
}

AFMDEF int afm_constraint_state_allows(afm_constraint_state *m, int32_t token) {
    int32_t t;
    if (!m) return 0;
    t = afm__cm_token(m, m->hist[m->n_hist - 1], token);
    return t >= 0 || t == -4;
}

AFMDEF afm_result afm_constraint_state_advance(afm_constraint_state *m, int32_t token) {
    int32_t t;
    if (!m) return AFM_ERR_ARG;
    if (m->failed) return AFM_ERR_NOMEM;
    t = afm__cm_token(m, m->hist[m->n_hist - 1], token);
    if (t == AFM__CM_FAIL) return AFM_ERR_NOMEM;
    if (t == AFM__CM_DEAD) return AFM_ERR_ARG;
    if (!afm__grow(&m->alloc, (void **)&m->hist, &m->cap_hist, m->n_hist + 1, sizeof *m->hist)) return AFM_ERR_NOMEM;
    m->hist[m->n_hist++] = t;
    return AFM_OK;
}

AFMDEF int afm_constraint_state_n_tokens(const afm_constraint_state *m) { return m ? (int)m->n_hist - 1 : 0; }

AFMDEF afm_result afm_constraint_state_rewind(afm_constraint_state *m, int n_tokens) {
    if (!m || n_tokens < 0 || (size_t)n_tokens >= m->n_hist) return AFM_ERR_ARG;
    m->n_hist = (size_t)n_tokens + 1;
    return AFM_OK;
}

AFMDEF int afm_constraint_state_complete(const afm_constraint_state *m) {
    int32_t s;
    if (!m) return 0;
    s = m->hist[m->n_hist - 1];
    return s == -4 || (s >= 0 && m->sacc[s]);
}

AFMDEF int afm_constraint_state_forced(afm_constraint_state *m, int32_t *tokens, int cap) {
    const afm_constraint_vocab *v;
    unsigned char forced[256];
    int nf = 0, nt = 0, pos = 0;
    int32_t s;
    if (!m || !tokens || cap <= 0) return 0;
    v = m->v;
    s = m->hist[m->n_hist - 1];
    while (s >= 0 && !m->sacc[s] && nf < (int)sizeof forced) { /* the bytes every continuation starts with */
        int32_t only = AFM__CM_DEAD, t;
        unsigned b, ob = 0, n_live = 0;
        for (b = 0; b < 256 && n_live < 2; b++) {
            t = afm__cm_step(m, s, b);
            if (t == AFM__CM_FAIL) return 0;
            if (t >= 0) { n_live++; only = t; ob = b; }
        }
        if (n_live != 1) break;
        forced[nf++] = (unsigned char)ob;
        s = only;
    }
    while (pos < nf && nt < cap) { /* greedy: the longest token spelling the next forced bytes */
        int32_t u = 0, best = -1;
        int k, blen = 0;
        for (k = pos; k < nf; k++) {
            int32_t c = v->child0[u], e = c + v->nchild[u], lo = c, hi = e;
            while (lo < hi) { int32_t mid = (lo + hi) / 2; if (v->nbyte[mid] < forced[k]) lo = mid + 1; else hi = mid; }
            if (lo >= e || v->nbyte[lo] != forced[k]) break;
            u = lo;
            if (v->ntok[u]) { best = v->toks[v->tok0[u]]; blen = k + 1 - pos; }
        }
        if (best < 0) break;
        tokens[nt++] = best;
        pos += blen;
    }
    return nt;
}

AFMDEF const char *afm_constraint_state_error(const afm_constraint_state *m) {
    return !m ? "no constraint state" : m->failed ? m->err : "";
}

AFMDEF afm_result afm_schema_prompt(const char *schema, size_t schema_len, char *text, size_t cap, size_t *len) {
    static const char intro[] = AFM_SCHEMA_PROMPT_INTRO "\n";
    size_t i, n = 0;
    int in_str = 0, esc = 0, depth = 0;
    char open[256]; /* the brackets open (deeper nesting than a schema compiles with is refused) */
    if (len) *len = 0;
    if (!schema && schema_len) return AFM_ERR_ARG;
    for (i = 0; i < sizeof intro - 1; i++, n++)
        if (n + 1 < cap && text) text[n] = intro[i];
    for (i = 0; i < schema_len; i++) { /* compact: whitespace outside strings dropped */
        char ch = schema[i];
        if (in_str) {
            if (esc) esc = 0;
            else if (ch == '\\') esc = 1;
            else if (ch == '"') in_str = 0;
        } else if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r') continue;
        else if (ch == '"') in_str = 1;
        else if (ch == '{' || ch == '[') {
            if (depth == (int)sizeof open) return AFM_ERR_FORMAT;
            open[depth++] = ch;
        } else if (ch == '}' || ch == ']') {
            if (!depth || open[--depth] != (ch == '}' ? '{' : '[')) return AFM_ERR_FORMAT;
        }
        if (n + 1 < cap && text) text[n] = ch;
        n++;
    }
    if (in_str || depth) return AFM_ERR_FORMAT;
    if (len) *len = n;
    if (text && cap) text[n < cap ? n : cap - 1] = 0;
    return text && n < cap ? AFM_OK : text || cap ? AFM_ERR_ARG : AFM_OK;
}

/* ======================================================================================== */
/* ==== GENERATION AND SPECULATIVE DECODING =============================================== */
/* ======================================================================================== */

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
    afm_sampler *sm, *dsm;       /* base sampler (its RNG draws every token), draft sampler */
    int V, kmax, sampled, done, generated, zero_streak, probe_every;
    int32_t draft[AFM__MAX_DRAFT];
    double u[AFM__MAX_DRAFT + 1]; /* the uniform numbers of this round's positions (sampling) */
    double tv[AFM__MAX_DRAFT + 2]; /* seconds to verify n tokens (EMA); 0 = not measured */
    int round, tv_round[AFM__MAX_DRAFT + 2]; /* rounds so far; the round that last measured tv[n] */
    double t_draft_tok;          /* seconds per drafted token (EMA) */
    double acc_hits, acc_trials; /* acceptance, decayed counts */
    afm_constraint_state *cs;    /* the constraint, or NULL */
} afm__gen;

/* The constraint's allowed tokens now (NULL: no constraint, or it failed: *r says which). */
static const uint32_t *afm__gen_mask(afm__gen *g, afm_result *r) {
    const uint32_t *m;
    *r = AFM_OK;
    if (!g->cs) return NULL;
    if (!(m = afm_constraint_state_mask(g->cs))) *r = afm__serr(g->s, AFM_ERR_NOMEM, "constraint: %s", afm_constraint_state_error(g->cs));
    return m;
}
/* Where the constraint forces the next bytes, the next token is the first fast-forward token
   (wherever it comes up: after a draft, at the start), so that drafting never changes the output;
   -1 when there is a choice (or fast-forward is off). */
static int32_t afm__gen_forced(afm__gen *g) {
    int32_t f;
    if (!g->cs || g->p->no_fast_forward || afm_constraint_state_forced(g->cs, &f, 1) != 1) return -1;
    return f;
}
/* The base's pick at a position, with the uniform number u: the forced token where the constraint
   leaves no choice, else the sampler's pick among the allowed tokens. -1 with *r set on failure
   (AFM_ERR_NUMERIC for non-finite logits: the caller names the position). The constraint is not
   advanced here. */
static int32_t afm__gen_pick(afm__gen *g, afm_sampler *sm, const float *logits, double u, afm_result *r) {
    const uint32_t *m = afm__gen_mask(g, r);
    int32_t t;
    if (*r != AFM_OK) return -1;
    if ((t = afm__gen_forced(g)) >= 0) return t;
    t = afm__sampler_pick(sm, logits, m, u);
    if (t == -1) *r = AFM_ERR_NUMERIC;
    if (t == -2) *r = afm__serr(g->s, AFM_ERR_ARG, "constraint: no token is allowed here");
    return t < 0 ? -1 : t;
}
/* Advances the constraint over a token the output now holds. */
static afm_result afm__gen_advance(afm__gen *g, int32_t t) {
    if (!g->cs || afm_constraint_state_advance(g->cs, t) == AFM_OK) return AFM_OK;
    return afm__serr(g->s, AFM_ERR_NOMEM, "constraint: %s", afm_constraint_state_error(g->cs));
}

/* Hands a token to the caller; returns the reason to stop after it, or 0. */
static int afm__emit(afm__gen *g, int32_t tok) {
    int i;
    g->generated++;
    g->st->n_generated++;
    if (g->p->on_token && g->p->on_token(g->p->user, tok)) return g->st->stop = AFM_STOP_CALLBACK;
    if (g->cs && afm_constraint_state_complete(g->cs) && tok >= 0 && tok < g->cs->v->n_vocab && g->cs->v->kind[tok] == 2)
        return g->st->stop = AFM_STOP_TOKEN; /* the constraint's end-of-output token */
    for (i = 0; i < g->p->n_stop_tokens; i++)
        if (g->p->stop_tokens[i] == tok) return g->st->stop = AFM_STOP_TOKEN;
    if (g->generated >= g->p->n_predict) return g->st->stop = AFM_STOP_N_PREDICT;
    return 0;
}

/* The next token may be handed out only if it will fit in the cache (slot `slot`). */
static afm_result afm__room_for(afm__gen *g, int slot) {
    if (slot < g->s->n_ctx) return AFM_OK;
    g->st->stop = AFM_STOP_CONTEXT_FULL;
    g->done = 1;
    return afm__serr(g->s, AFM_ERR_CONTEXT_FULL, "afm_generate: context full after %d generated tokens (the session's limit is %d)",
                     g->generated, g->s->n_ctx);
}

static afm_result afm__not_finite(afm__gen *g, int pos) {
    g->done = 1;
    return afm__serr(g->s, AFM_ERR_NUMERIC, "afm_generate: the logits after position %d are not finite (NaN or +inf, or all -inf)", pos);
}

/* Proposes draft tokens with the draft model's session: syncs it to the context (everything
   but the pending token is shared with the base; it re-evaluates what differs), then runs it.
   When sampling, draft token i is drawn with the uniform number the base will use at that
   position, so the two agree whenever their distributions put that number on the same token. */
static int afm__draft_with_model(afm__gen *g, const int32_t *ctx, int n_ctx, int k) {
    afm_session *d = g->p->draft;
    int c = 0, i;
    while (c < d->pos && c < n_ctx - 1 && d->tokens[c] == ctx[c]) c++;
    if (afm_session_rewind(d, c) != AFM_OK) return 0;
    if (n_ctx - c > d->n_ctx - d->pos || afm_session_eval(d, ctx + c, n_ctx - c) != AFM_OK) return 0;
    for (i = 0; i < k; i++) {
        const float *lg = afm_session_logits(d, -1);
        afm_result r;
        /* the constraint, advanced along the draft (the caller rewinds it) */
        if ((g->draft[i] = afm__gen_pick(g, g->dsm, lg, g->u[i], &r)) < 0) return i;
        if (afm__gen_advance(g, g->draft[i]) != AFM_OK) return i;
        if (i + 1 < k && (d->pos >= d->n_ctx || afm_session_eval(d, &g->draft[i], 1) != AFM_OK)) return i + 1;
    }
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

/* A batch size's cost counts as measured for AFM__TV_FRESH rounds. A draft length is only
   measured while it is chosen, so one measurement in a slow moment (a busy machine) would keep it
   from ever being chosen again; once old, its cost is extrapolated again, and it is tried again
   when that looks better. (tv[1], the plain step every cost is weighed against, stays.) */
#define AFM__TV_FRESH 32
static int afm__tv_known(const afm__gen *g, int n) {
    return g->tv[n] > 0 && (n == 1 || g->round - g->tv_round[n] <= AFM__TV_FRESH);
}
/* Verification cost of n tokens (tv[1], one decode step, is measured): measured, or extrapolated
   with the cost per extra token of the largest batch measured so far (optimistic, 10% of a step,
   before any is: an untried k then gets tried once and measured). */
static double afm__verify_cost(const afm__gen *g, int n) {
    double slope = 0.1 * g->tv[1];
    int m;
    if (afm__tv_known(g, n)) return g->tv[n];
    for (m = AFM__MAX_DRAFT + 1; m > 1; m--)
        if (afm__tv_known(g, m)) { slope = (g->tv[m] - g->tv[1]) / (m - 1); break; }
    return g->tv[1] + (slope > 0 ? slope : 0) * (n - 1);
}

/* The number of tokens to draft: the k that maximises expected tokens per second, given the
   acceptance rate seen so far and the measured cost of drafting and of verifying k+1 tokens.
   0 means plain decoding; after a while at 0 one short probe checks whether drafts got better
   (after 16 plain steps, then 32, 64, ... up to 256 while probes keep failing). */
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
    if (best == 0 && ++g->zero_streak >= g->probe_every) { /* probe, less often each time it fails */
        g->zero_streak = 0;
        if (g->probe_every < 256) g->probe_every *= 2;
        return 1;
    }
    if (best) { g->zero_streak = 0; g->probe_every = 16; }
    return best;
}

static void afm__ema(double *v, double x) { *v = *v > 0 ? 0.8 * *v + 0.2 * x : x; }

/* Fast-forward: the tokens the constraint forces after the pending token x are emitted without
   sampling and evaluated with x in one batch; the last becomes the pending token. */
static afm_result afm__fast_forward(afm__gen *g, int32_t *x) {
    afm_session *s = g->s;
    int32_t f[AFM__MAX_DRAFT], batch[AFM__MAX_DRAFT];
    int P = s->pos, m, cap = AFM__MAX_DRAFT, i;
    afm_result r;
    if (!g->cs || g->p->no_fast_forward) return AFM_OK;
    if (cap > g->p->n_predict - g->generated) cap = g->p->n_predict - g->generated;
    if (cap > s->n_ctx - P - 2) cap = s->n_ctx - P - 2;
    if (cap <= 0 || (m = afm_constraint_state_forced(g->cs, f, cap)) == 0) return AFM_OK;
    batch[0] = *x;
    for (i = 0; i + 1 < m; i++) batch[i + 1] = f[i];
    if ((r = afm__eval(s, batch, m, 0)) != AFM_OK) return r;
    g->st->n_steps++;
    for (i = 0; i < m; i++) {
        if (g->sampled) afm__rng_uniform(g->sm->rng); /* every emitted token uses one number, forced or not */
        afm_sampler_accept(g->sm, f[i]);
        if (afm_constraint_state_advance(g->cs, f[i]) != AFM_OK) return afm__serr(s, AFM_ERR_NOMEM, "constraint: %s", afm_constraint_state_error(g->cs));
        if (afm__emit(g, f[i])) {
            if (i + 1 < m) { afm_session_rewind(s, P + 2 + i); g->done = 1; }
            else g->done = 2;
            *x = f[i];
            return AFM_OK;
        }
    }
    *x = f[m - 1];
    return AFM_OK;
}

/* One round: verify [x, drafts] in one forward pass, keep the longest prefix of drafts that
   equals what the base picks at each position, then the base's own pick after it. The base picks
   every token exactly as plain decoding does - the forced token of a constraint, greedy, or one
   uniform number of the sampler's stream per token - so the output does not depend on the drafter
   or on K (which only change how many forward passes it takes). Returns the new pending token
   through *x (its slot, s->pos, is free); sets g->done when finished. */
static afm_result afm__round(afm__gen *g, int32_t *x) {
    afm_session *s = g->s;
    const afm_generate_params *p = g->p;
    int P = s->pos, k, asked, j, i, why = 0, c0 = g->cs ? afm_constraint_state_n_tokens(g->cs) : 0, finished = 0;
    int32_t batch[AFM__MAX_DRAFT + 1], next = -1;
    uint64_t rng[4];
    double t0, t1;
    afm_result r;

    k = afm__choose_k(g);
    if (k > s->n_ctx - P - 1) k = s->n_ctx - P - 1; /* x goes at P, drafts at P+1 .. P+k */
    if (k > p->n_predict - g->generated) k = p->n_predict - g->generated;
    memcpy(rng, g->sm->rng, sizeof rng);        /* the numbers of positions P .. P+k, drawn below */
    for (i = 0; i <= k; i++) g->u[i] = g->sampled ? afm__rng_uniform(rng) : 0;
    t0 = afm__now();
    if (k > 0) {
        /* the context the drafter continues: the session's tokens, then the pending one */
        s->tokens[P] = *x; /* the slot after the last evaluated token is free until the eval */
        asked = k;
        if (p->draft_fn) k = p->draft_fn(p->draft_user, s->tokens, P + 1, k, g->draft);
        else if (p->draft) k = afm__draft_with_model(g, s->tokens, P + 1, k);
        else if (p->lookup) k = afm__draft_lookup(g, s->tokens, P + 1, k);
        else k = 0;
        if (k < 0) k = 0;
        if (k > asked) k = asked; /* a custom drafter may claim more than it was asked for */
        for (i = 0; i < k; i++)
            if (g->draft[i] < 0 || g->draft[i] >= g->V) k = i; /* a drafter's bad token ends the draft */
        if (g->cs) { /* so does a token the constraint does not allow */
            afm_constraint_state_rewind(g->cs, c0);
            for (i = 0; i < k; i++)
                if (afm_constraint_state_advance(g->cs, g->draft[i]) != AFM_OK) k = i;
            afm_constraint_state_rewind(g->cs, c0);
        }
    }
    t1 = afm__now();
    if (k > 0) { g->st->t_draft += t1 - t0; afm__ema(&g->t_draft_tok, (t1 - t0) / k); }

    batch[0] = *x;
    for (i = 0; i < k; i++) batch[i + 1] = g->draft[i];
    if ((r = afm__eval(s, batch, k + 1, k > 0)) != AFM_OK) return r;
    t0 = afm__now();
    g->st->t_verify += t0 - t1;
    if (afm__tv_known(g, k + 1)) afm__ema(&g->tv[k + 1], t0 - t1);
    else g->tv[k + 1] = t0 - t1; /* first or fresh again: an old outlier must not linger */
    g->tv_round[k + 1] = g->round++;
    g->st->n_steps++;
    g->st->n_drafted += k;

    /* keep drafts while they equal the base's picks; the first pick that differs (or the pick
       after the last draft) is the next pending token */
    for (j = 0; j <= k; j++) {
        next = afm__gen_pick(g, g->sm, afm_session_logits(s, j), g->u[j], &r);
        if (g->sampled) afm__rng_uniform(g->sm->rng); /* consume position P+j's number */
        if (next < 0) {
            if (r != AFM_ERR_NUMERIC) return r;
            break;
        }
        if (j == k) break;
        if (next != g->draft[j] && !afm__test_accept_all(s)) break;
        g->st->n_accepted++;
        afm_sampler_accept(g->sm, g->draft[j]); /* the next position's penalties count it */
        if ((r = afm__gen_advance(g, g->draft[j])) != AFM_OK) return r;
        if (g->cs && g->cs->hist[g->cs->n_hist - 1] == -4) { j++; finished = 1; break; } /* an accepted stop token ends the output */
    }
    if (k > 0) {
        g->acc_hits = 0.9 * g->acc_hits + j;
        g->acc_trials = 0.9 * g->acc_trials + j + (j < k);
    }
    if (!finished && next >= 0) {
        afm_sampler_accept(g->sm, next);
        if ((r = afm__gen_advance(g, next)) != AFM_OK) return r;
    }
    afm_session_rewind(s, P + 1 + j); /* x and the j kept drafts */
    for (i = 0; i < j; i++)
        if (afm__emit(g, g->draft[i])) {
            afm_session_rewind(s, P + 2 + i);
            if (g->cs) afm_constraint_state_rewind(g->cs, c0 + i + 1);
            g->done = 1;
            return AFM_OK;
        }
    if (finished) { g->done = 1; return AFM_OK; } /* the drafts ended with the constraint's stop token */
    if (next < 0) return afm__not_finite(g, P + j);
    if ((r = afm__room_for(g, P + 1 + j)) != AFM_OK) return r;
    *x = next;
    why = afm__emit(g, next);
    if (why) g->done = 2; /* stop, with the pending token still to evaluate */
    return AFM_OK;
}

AFMDEF afm_result afm_generate(afm_session *s, const int32_t *prompt, int n_prompt, const afm_generate_params *p,
                               afm_generate_stats *stats) {
    afm__gen g;
    afm_generate_stats local;
    afm_result r;
    int32_t x;
    double t_start = afm__now();
    if (!s || !p || (n_prompt > 0 && !prompt) || n_prompt < 0 || p->n_predict < 0 || p->draft_k < 0 || p->n_stop_tokens < 0 ||
        (p->n_stop_tokens && !p->stop_tokens))
        return s ? afm__serr(s, AFM_ERR_ARG, "afm_generate: invalid parameters") : AFM_ERR_ARG;
    if (p->draft && (p->draft == s || p->draft->model->config.vocab_size != s->model->config.vocab_size))
        return afm__serr(s, AFM_ERR_ARG, "afm_generate: the draft session must be another session with the same vocabulary");
    if (p->constraint && p->constraint->v->n_vocab != s->model->config.vocab_size)
        return afm__serr(s, AFM_ERR_ARG, "afm_generate: the constraint's vocabulary has %d tokens, the model %d",
                         p->constraint->v->n_vocab, s->model->config.vocab_size);
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
    g.probe_every = 16;
    memcpy(g.tv, s->verify_s, sizeof g.tv); /* what this session's earlier calls measured (K is chosen from them) */
    g.cs = p->constraint;
    g.acc_hits = 3;   /* prior: 60% acceptance until measured */
    g.acc_trials = 5;
    if (n_prompt == 0 && !afm_session_logits(s, -1))
        return afm__serr(s, AFM_ERR_ARG, "afm_generate: no prompt and no logits to continue from");
    if ((r = afm_sampler_create(&p->sampler, g.V, &s->model->alloc, &g.sm)) != AFM_OK) return afm__serr(s, r, "afm_generate: bad sampler parameters");
    if ((r = afm_sampler_create(&p->sampler, g.V, &s->model->alloc, &g.dsm)) != AFM_OK) { r = afm__serr(s, r, "afm_generate: out of memory"); goto out; }

    if (n_prompt > 0) {
        if ((r = afm_session_eval(s, prompt, n_prompt)) != AFM_OK) {
            if (r == AFM_ERR_CONTEXT_FULL) stats->stop = AFM_STOP_CONTEXT_FULL; /* the prompt alone does not fit */
            goto out;
        }
        stats->n_prompt = n_prompt;
    }
    stats->t_prompt = afm__now() - t_start;
    if (p->n_predict == 0) goto out;
    afm__sampler_accept_context(g.sm, s->tokens, s->pos); /* penalties count the context */
    x = afm__gen_pick(&g, g.sm, afm_session_logits(s, -1), g.sampled ? afm__rng_uniform(g.sm->rng) : 0, &r);
    if (x < 0) {
        if (r == AFM_ERR_NUMERIC) r = afm__not_finite(&g, s->pos - 1);
        goto out;
    }
    afm_sampler_accept(g.sm, x);
    if ((r = afm__gen_advance(&g, x)) != AFM_OK) goto out;
    if ((r = afm__room_for(&g, s->pos)) != AFM_OK) goto out;
    if (afm__emit(&g, x)) g.done = 2;
    while (!g.done && (r = afm__fast_forward(&g, &x)) == AFM_OK && !g.done && (r = afm__round(&g, &x)) == AFM_OK) {}
    if (r == AFM_OK && g.done == 2) r = afm__eval(s, &x, 1, 0); /* every emitted token ends up in the cache (afm__room_for) */
out:
    memcpy(s->verify_s, g.tv, sizeof g.tv);
    stats->t_total = afm__now() - t_start;
    afm_sampler_free(g.sm);
    afm_sampler_free(g.dsm);
    return r;
}


/* ======================================================================================== */
/* ==== TOOL CALLING: declared tools, constrained calls, the loop, the transcript ========= */
/* ======================================================================================== */

struct afm_transcript {
    afm_allocator alloc;
    afm_tool *tools;
    afm_transcript_entry *e;
    int n_tools, cap_tools, n, cap;
};

/* ---- text building: a growing buffer that remembers running out of memory ---- */
typedef struct afm__tb {
    const afm_allocator *a;
    afm__tok_buf b;
    int failed;
} afm__tb;
static void afm__tb_put(afm__tb *t, const char *s, size_t n) {
    if (!t->failed && !afm__tok_buf_put(t->a, &t->b, s, n)) t->failed = 1;
}
static void afm__tb_str(afm__tb *t, const char *z) { afm__tb_put(t, z, strlen(z)); }
/* z as a JSON string: quotes, backslashes and control characters escaped, everything else raw UTF-8 */
static void afm__tb_jstr(afm__tb *t, const char *z) {
    char esc[8];
    afm__tb_put(t, "\"", 1);
    for (; *z; z++) {
        unsigned char c = (unsigned char)*z;
        const char *e = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
        if (!e && c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); e = esc; }
        if (e) afm__tb_str(t, e);
        else afm__tb_put(t, z, 1);
    }
    afm__tb_put(t, "\"", 1);
}
/* The buffer's text as a NUL-terminated string the caller owns (NULL when out of memory). */
static char *afm__tb_take(afm__tb *t) {
    afm__tb_put(t, "", 0);
    if (t->failed) { afm__free(t->a, t->b.p); return NULL; }
    t->b.p[t->b.n] = 0;
    return t->b.p;
}
static void afm__tb_init(afm__tb *t, const afm_allocator *a) { memset(t, 0, sizeof *t); t->a = a; }

/* Node idx of a parsed document written back as compact JSON (strings keep their escapes). The
   parser bounds the depth, so the recursion is bounded too. */
static void afm__tb_json(afm__tb *t, const afm__json *j, int32_t idx) {
    const afm__jnode *nd = &j->n[idx];
    int32_t k;
    int i = 0, obj = nd->type == AFM__JOBJ;
    switch (nd->type) {
    case AFM__JNULL: afm__tb_str(t, "null"); return;
    case AFM__JTRUE: afm__tb_str(t, "true"); return;
    case AFM__JFALSE: afm__tb_str(t, "false"); return;
    case AFM__JNUM: afm__tb_put(t, j->src + nd->start, nd->len); return;
    case AFM__JSTR: afm__tb_put(t, "\"", 1); afm__tb_put(t, j->src + nd->start, nd->len); afm__tb_put(t, "\"", 1); return;
    default: break;
    }
    afm__tb_put(t, obj ? "{" : "[", 1);
    for (k = nd->child; k >= 0; k = j->n[k].next, i++) {
        if (i) afm__tb_put(t, obj && i % 2 ? ":" : ",", 1);
        afm__tb_json(t, j, k);
    }
    afm__tb_put(t, obj ? "}" : "]", 1);
}

static char *afm__strdup(const afm_allocator *a, const char *z) {
    size_t n = strlen(z);
    char *p = (char *)afm__alloc(a, n + 1);
    if (p) memcpy(p, z, n + 1);
    return p;
}
/* String node idx, escapes undone, as an owned C string; NULL when it is not a string, holds a NUL or
   memory runs out (*why says which). */
static char *afm__json_dup(const afm_allocator *a, const afm__json *j, int32_t idx, const char **why) {
    char *p;
    size_t n;
    *why = "expected a string";
    if (idx < 0 || j->n[idx].type != AFM__JSTR) return NULL;
    *why = "out of memory";
    if (!(p = (char *)afm__alloc(a, (size_t)j->n[idx].len + 1))) return NULL;
    n = afm__json_unescape(j, idx, p);
    p[n] = 0;
    if (memchr(p, 0, n)) { afm__free(a, p); *why = "a string holds a NUL character"; return NULL; }
    return p;
}
/* JSON text -> compact JSON of an object (NULL: not one; *why says why). */
static char *afm__json_compact_object(const afm_allocator *a, const char *text, size_t len, const char **why) {
    afm__json j;
    afm__tb t;
    size_t where;
    memset(&j, 0, sizeof j);
    if (!afm__json_parse(a, text, len, &j, &where, why)) { afm__json_free(a, &j); return NULL; }
    *why = "expected a JSON object";
    if (j.n[0].type != AFM__JOBJ) { afm__json_free(a, &j); return NULL; }
    afm__tb_init(&t, a);
    afm__tb_json(&t, &j, 0);
    afm__json_free(a, &j);
    *why = "out of memory";
    return afm__tb_take(&t);
}

/* ---- the transcript ---- */
AFMDEF afm_result afm_transcript_create(const afm_allocator *allocator, afm_transcript **out) {
    afm_allocator a = allocator ? *allocator : afm__malloc_allocator;
    if (!out || (allocator && (!allocator->alloc || !allocator->free))) return AFM_ERR_ARG;
    if (!(*out = (afm_transcript *)afm__calloc(&a, 1, sizeof **out))) return AFM_ERR_NOMEM;
    (*out)->alloc = a;
    return AFM_OK;
}
static void afm__transcript_clear(afm_transcript *t) {
    int i;
    for (i = 0; i < t->n_tools; i++) {
        afm__free(&t->alloc, (void *)t->tools[i].name);
        afm__free(&t->alloc, (void *)t->tools[i].description);
        afm__free(&t->alloc, (void *)t->tools[i].parameters);
    }
    for (i = 0; i < t->n; i++) {
        afm__free(&t->alloc, (void *)t->e[i].role);
        afm__free(&t->alloc, (void *)t->e[i].content);
        afm__free(&t->alloc, (void *)t->e[i].name);
        afm__free(&t->alloc, (void *)t->e[i].arguments);
    }
    afm__free(&t->alloc, t->tools);
    afm__free(&t->alloc, t->e);
    t->tools = NULL;
    t->e = NULL;
    t->n_tools = t->cap_tools = t->n = t->cap = 0;
}
AFMDEF void afm_transcript_free(afm_transcript *t) {
    if (!t) return;
    afm__transcript_clear(t);
    afm__free(&t->alloc, t);
}
AFMDEF const afm_transcript_entry *afm_transcript_entries(const afm_transcript *t, int *n) {
    if (n) *n = t ? t->n : 0;
    return t ? t->e : NULL;
}
AFMDEF const afm_tool *afm_transcript_tools(const afm_transcript *t, int *n) {
    if (n) *n = t ? t->n_tools : 0;
    return t ? t->tools : NULL;
}

/* Appends an entry; the strings are copied (arguments already compact). */
static afm_result afm__transcript_push(afm_transcript *t, afm_entry_kind kind, const char *role, const char *content,
                                       const char *name, const char *arguments, int failed) {
    afm_transcript_entry *e;
    if (t->n == t->cap) {
        int nc = t->cap ? t->cap * 2 : 16;
        afm_transcript_entry *ne = (afm_transcript_entry *)afm__alloc(&t->alloc, (size_t)nc * sizeof *ne);
        if (!ne) return AFM_ERR_NOMEM;
        if (t->n) memcpy(ne, t->e, (size_t)t->n * sizeof *ne);
        afm__free(&t->alloc, t->e);
        t->e = ne;
        t->cap = nc;
    }
    e = &t->e[t->n];
    e->kind = kind;
    e->failed = failed != 0;
    e->role = afm__strdup(&t->alloc, role);
    e->content = afm__strdup(&t->alloc, content);
    e->name = afm__strdup(&t->alloc, name);
    e->arguments = afm__strdup(&t->alloc, arguments);
    if (!e->role || !e->content || !e->name || !e->arguments) {
        afm__free(&t->alloc, (void *)e->role);
        afm__free(&t->alloc, (void *)e->content);
        afm__free(&t->alloc, (void *)e->name);
        afm__free(&t->alloc, (void *)e->arguments);
        return AFM_ERR_NOMEM;
    }
    t->n++;
    return AFM_OK;
}
AFMDEF afm_result afm_transcript_add_message(afm_transcript *t, const char *role, const char *content) {
    if (!t || !role || !content || !role[0]) return AFM_ERR_ARG;
    return afm__transcript_push(t, AFM_ENTRY_MESSAGE, role, content, "", "", 0);
}
AFMDEF afm_result afm_transcript_add_tool_call(afm_transcript *t, const char *content, const char *name,
                                               const char *arguments) {
    const char *why;
    char *args;
    afm_result r;
    if (!t || !name || !arguments) return AFM_ERR_ARG;
    if (!(args = afm__json_compact_object(&t->alloc, arguments, strlen(arguments), &why))) return AFM_ERR_FORMAT;
    r = afm__transcript_push(t, AFM_ENTRY_TOOL_CALL, "assistant", content ? content : "", name, args, 0);
    afm__free(&t->alloc, args);
    return r;
}
AFMDEF afm_result afm_transcript_add_tool_output(afm_transcript *t, const char *name, const char *content, int failed) {
    if (!t || !name || !content) return AFM_ERR_ARG;
    return afm__transcript_push(t, AFM_ENTRY_TOOL_OUTPUT, "tool", content, name, "", failed);
}

static char *afm__call_schema(const afm_allocator *a, const afm_tool *tools, int n_tools, const char *only);
/* The parameters compile on their own (errors name paths inside them) and inside a call's schema
   ({"name":N,"arguments":PARAMETERS}, where a "$ref" to "#..." would point outside them). */
static afm_result afm__tool_params_check(afm_transcript *t, const char *name, const char *params, char *err, size_t errn) {
    afm_constraint *c = NULL;
    afm_tool tool;
    char *call, msg[256];
    afm_result r = afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, params, strlen(params), &t->alloc, &c, err, errn);
    afm_constraint_free(c);
    c = NULL;
    if (r == AFM_OK) {
        tool.name = name;
        tool.description = "";
        tool.parameters = params;
        if (!(call = afm__call_schema(&t->alloc, &tool, 1, NULL))) return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
        r = afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, call, strlen(call), &t->alloc, &c, err, errn);
        afm_constraint_free(c);
        afm__free(&t->alloc, call);
        if (r != AFM_OK) {
            snprintf(msg, sizeof msg, "%s", err && errn ? err : "");
            return afm__fail(err, errn, r, "tool '%s': parameters: inside the call's schema "
                             "(\"$ref\" must not point into the parameters): %s", name, msg);
        }
        return AFM_OK;
    }
    snprintf(msg, sizeof msg, "%s", err && errn ? err : "");
    return afm__fail(err, errn, r, "tool '%s': parameters: %s", name, msg);
}

/* A tool name: what a model can spell inside a JSON string without escapes. */
static int afm__tool_name_ok(const char *z) {
    if (!z[0] || strlen(z) > 128) return 0;
    for (; *z; z++)
        if (!((*z >= 'a' && *z <= 'z') || (*z >= 'A' && *z <= 'Z') || (*z >= '0' && *z <= '9') || *z == '_' || *z == '-' || *z == '.'))
            return 0;
    return 1;
}
AFMDEF afm_result afm_transcript_add_tool(afm_transcript *t, const char *name, const char *description,
                                          const char *parameters, char *err, size_t errn) {
    const char *why;
    char *params;
    afm_tool *tool;
    afm_result r;
    int i;
    if (err && errn) err[0] = 0;
    if (!t || !name) return afm__fail(err, errn, AFM_ERR_ARG, "afm_transcript_add_tool: no transcript or no name");
    if (!afm__tool_name_ok(name))
        return afm__fail(err, errn, AFM_ERR_FORMAT, "tool name '%.64s': use 1 to 128 letters, digits, '_', '-' or '.'", name);
    for (i = 0; i < t->n_tools; i++)
        if (!strcmp(t->tools[i].name, name)) return afm__fail(err, errn, AFM_ERR_FORMAT, "tool '%s' is declared twice", name);
    if (!parameters) parameters = "{\"type\":\"object\",\"properties\":{}}";
    if (!(params = afm__json_compact_object(&t->alloc, parameters, strlen(parameters), &why)))
        return afm__fail(err, errn, AFM_ERR_FORMAT, "tool '%s': parameters: %s", name, why);
    if ((r = afm__tool_params_check(t, name, params, err, errn)) != AFM_OK) {
        afm__free(&t->alloc, params);
        return r;
    }
    if (t->n_tools == t->cap_tools) {
        int nc = t->cap_tools ? t->cap_tools * 2 : 8;
        afm_tool *nt = (afm_tool *)afm__alloc(&t->alloc, (size_t)nc * sizeof *nt);
        if (!nt) { afm__free(&t->alloc, params); return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory"); }
        if (t->n_tools) memcpy(nt, t->tools, (size_t)t->n_tools * sizeof *nt);
        afm__free(&t->alloc, t->tools);
        t->tools = nt;
        t->cap_tools = nc;
    }
    tool = &t->tools[t->n_tools];
    tool->name = afm__strdup(&t->alloc, name);
    tool->description = afm__strdup(&t->alloc, description ? description : "");
    tool->parameters = params;
    if (!tool->name || !tool->description) {
        afm__free(&t->alloc, (void *)tool->name);
        afm__free(&t->alloc, (void *)tool->description);
        afm__free(&t->alloc, params);
        return afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory");
    }
    t->n_tools++;
    return AFM_OK;
}

/* Refuses keys other than the allowed ones (a misspelt "parameters" must not silently vanish). */
static int32_t afm__json_unknown_key(const afm__json *j, int32_t obj, const char *const *allowed) {
    int32_t k;
    for (k = j->n[obj].child; k >= 0 && j->n[k].next >= 0; k = j->n[j->n[k].next].next) {
        int a, found = 0;
        for (a = 0; allowed[a]; a++) found |= afm__json_eq(j, k, allowed[a]);
        if (!found) return k;
    }
    return -1;
}

/* One tool object of a tools array (node idx) into t; err names "PATH.field". */
static afm_result afm__tool_from_json(afm_transcript *t, const afm__json *j, int32_t idx, const char *path, char *err,
                                      size_t errn) {
    static const char *const keys[] = { "name", "description", "parameters", NULL };
    static const char *const outer[] = { "type", "function", NULL };
    char *name = NULL, *desc = NULL, *params = NULL, bad[64];
    const char *why = "expected an object";
    int32_t f, k;
    afm__tb tb;
    afm_result r = AFM_ERR_FORMAT;
    if (idx < 0 || j->n[idx].type != AFM__JOBJ) return afm__fail(err, errn, r, "%s: %s", path, why);
    if ((f = afm__json_get(j, idx, "function")) >= 0) { /* OpenAI's {"type":"function","function":{...}} */
        if ((k = afm__json_unknown_key(j, idx, outer)) >= 0 || !afm__json_eq(j, afm__json_get(j, idx, "type"), "function"))
            return afm__fail(err, errn, r, "%s: an OpenAI tool must be {\"type\":\"function\",\"function\":{...}}", path);
        if (j->n[f].type != AFM__JOBJ) return afm__fail(err, errn, r, "%s.function: expected an object", path);
        idx = f;
    }
    if ((k = afm__json_unknown_key(j, idx, keys)) >= 0) {
        if (!afm__json_cstr(j, k, bad, sizeof bad)) snprintf(bad, sizeof bad, "?");
        return afm__fail(err, errn, r, "%s: unknown key '%s' (a tool has name, description, parameters)", path, bad);
    }
    if (!(name = afm__json_dup(&t->alloc, j, afm__json_get(j, idx, "name"), &why)))
        return afm__fail(err, errn, r, "%s.name: %s", path, why);
    if (afm__json_get(j, idx, "description") >= 0 && !(desc = afm__json_dup(&t->alloc, j, afm__json_get(j, idx, "description"), &why))) {
        afm__fail(err, errn, r, "%s.description: %s", path, why);
        goto out;
    }
    if ((k = afm__json_get(j, idx, "parameters")) >= 0) {
        if (j->n[k].type != AFM__JOBJ) { afm__fail(err, errn, r, "%s.parameters: expected a JSON Schema object", path); goto out; }
        afm__tb_init(&tb, &t->alloc);
        afm__tb_json(&tb, j, k);
        if (!(params = afm__tb_take(&tb))) { r = afm__fail(err, errn, AFM_ERR_NOMEM, "out of memory"); goto out; }
    }
    if ((r = afm_transcript_add_tool(t, name, desc, params, err, errn)) != AFM_OK) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", err && errn ? err : "");
        afm__fail(err, errn, r, "%s: %s", path, msg);
    }
out:
    afm__free(&t->alloc, name);
    afm__free(&t->alloc, desc);
    afm__free(&t->alloc, params);
    return r;
}
/* The tools array at node arr into t (all or none). */
static afm_result afm__tools_from_json(afm_transcript *t, const afm__json *j, int32_t arr, const char *prefix, char *err,
                                       size_t errn) {
    int32_t k;
    int i = 0, before = t->n_tools;
    afm_result r = AFM_OK;
    char path[64];
    if (j->n[arr].type != AFM__JARR) return afm__fail(err, errn, AFM_ERR_FORMAT, "%stools: expected an array of tools", prefix);
    for (k = j->n[arr].child; k >= 0 && r == AFM_OK; k = j->n[k].next, i++) {
        snprintf(path, sizeof path, "%stools[%d]", prefix, i);
        r = afm__tool_from_json(t, j, k, path, err, errn);
    }
    while (r != AFM_OK && t->n_tools > before) { /* undo the ones declared before the error */
        afm_tool *tl = &t->tools[--t->n_tools];
        afm__free(&t->alloc, (void *)tl->name);
        afm__free(&t->alloc, (void *)tl->description);
        afm__free(&t->alloc, (void *)tl->parameters);
    }
    return r;
}
AFMDEF afm_result afm_transcript_add_tools_json(afm_transcript *t, const char *json, size_t len, char *err, size_t errn) {
    afm__json j;
    size_t where = 0;
    const char *why = "";
    afm_result r;
    if (err && errn) err[0] = 0;
    if (!t || (!json && len)) return afm__fail(err, errn, AFM_ERR_ARG, "afm_transcript_add_tools_json: bad argument");
    memset(&j, 0, sizeof j);
    if (!afm__json_parse(&t->alloc, json ? json : "", len, &j, &where, &why)) {
        afm__json_free(&t->alloc, &j);
        return afm__fail(err, errn, AFM_ERR_FORMAT, "tools: byte %lu: %s", (unsigned long)where, why);
    }
    r = afm__tools_from_json(t, &j, 0, "", err, errn);
    afm__json_free(&t->alloc, &j);
    return r;
}

/* ---- the transcript as JSON ---- */
static void afm__tb_entry(afm__tb *b, const afm_transcript_entry *e) {
    afm__tb_str(b, "{\"role\":");
    afm__tb_jstr(b, e->role);
    if (e->kind == AFM_ENTRY_TOOL_OUTPUT) {
        afm__tb_str(b, ",\"name\":");
        afm__tb_jstr(b, e->name);
    }
    afm__tb_str(b, ",\"content\":");
    afm__tb_jstr(b, e->content);
    if (e->kind == AFM_ENTRY_TOOL_CALL) {
        afm__tb_str(b, ",\"tool_call\":{\"name\":");
        afm__tb_jstr(b, e->name);
        afm__tb_str(b, ",\"arguments\":");
        afm__tb_str(b, e->arguments);
        afm__tb_str(b, "}");
    }
    if (e->kind == AFM_ENTRY_TOOL_OUTPUT) afm__tb_str(b, e->failed ? ",\"failed\":true" : ",\"failed\":false");
    afm__tb_str(b, "}");
}
/* One tool as it is saved and as the model sees it in the system turn. */
static void afm__tb_tool(afm__tb *b, const afm_tool *tool) {
    afm__tb_str(b, "{\"name\":");
    afm__tb_jstr(b, tool->name);
    afm__tb_str(b, ",\"description\":");
    afm__tb_jstr(b, tool->description);
    afm__tb_str(b, ",\"parameters\":");
    afm__tb_str(b, tool->parameters);
    afm__tb_str(b, "}");
}
AFMDEF afm_result afm_transcript_to_json(const afm_transcript *t, char *buf, size_t cap, size_t *len) {
    afm__tb b;
    char *s;
    int i;
    size_t n;
    if (len) *len = 0;
    if (!t || !len || (!buf && cap)) return AFM_ERR_ARG;
    afm__tb_init(&b, &t->alloc);
    afm__tb_str(&b, "{\"tools\":[");
    for (i = 0; i < t->n_tools; i++) {
        if (i) afm__tb_str(&b, ",");
        afm__tb_tool(&b, &t->tools[i]);
    }
    afm__tb_str(&b, "],\"messages\":[");
    for (i = 0; i < t->n; i++) {
        afm__tb_str(&b, i ? ",\n" : "\n");
        afm__tb_entry(&b, &t->e[i]);
    }
    afm__tb_str(&b, "\n]}\n");
    if (!(s = afm__tb_take(&b))) return AFM_ERR_NOMEM;
    n = b.b.n;
    *len = n;
    if (cap) {
        memcpy(buf, s, n < cap ? n : cap - 1);
        buf[n < cap ? n : cap - 1] = 0;
    }
    afm__free(&t->alloc, s);
    return n < cap ? AFM_OK : AFM_ERR_ARG;
}

/* One saved message (node m, path "messages[i]") into t. */
static afm_result afm__entry_from_json(afm_transcript *t, const afm__json *j, int32_t m, int i, char *err, size_t errn) {
    static const char *const keys[] = { "role", "content", "name", "tool_call", "failed", NULL };
    static const char *const call_keys[] = { "name", "arguments", NULL };
    char *role = NULL, *content = NULL, *name = NULL, *args = NULL;
    const char *why = "", *field = "";
    int32_t call, f, k;
    int failed = 0;
    afm_result r = AFM_ERR_FORMAT;
    afm__tb tb;
    if (j->n[m].type != AFM__JOBJ) return afm__fail(err, errn, r, "transcript: messages[%d]: expected an object", i);
    if ((k = afm__json_unknown_key(j, m, keys)) >= 0)
        return afm__fail(err, errn, r, "transcript: messages[%d]: unknown key (a message has role, content, name, tool_call, failed)", i);
    call = afm__json_get(j, m, "tool_call");
    if (!(role = afm__json_dup(&t->alloc, j, afm__json_get(j, m, "role"), &why))) { field = ".role"; goto bad; }
    if (!role[0]) { why = "the role is empty"; field = ".role"; goto bad; }
    if (!(content = afm__json_dup(&t->alloc, j, afm__json_get(j, m, "content"), &why))) { field = ".content"; goto bad; }
    if (!strcmp(role, "tool")) {
        if (!(name = afm__json_dup(&t->alloc, j, afm__json_get(j, m, "name"), &why))) { field = ".name"; goto bad; }
        f = afm__json_get(j, m, "failed");
        why = "expected true or false";
        if (f >= 0 && j->n[f].type != AFM__JTRUE && j->n[f].type != AFM__JFALSE) { field = ".failed"; goto bad; }
        failed = f >= 0 && j->n[f].type == AFM__JTRUE;
        if (call >= 0) { why = "a tool output has no tool_call"; field = ".tool_call"; goto bad; }
        r = afm_transcript_add_tool_output(t, name, content, failed);
    } else if (call >= 0) {
        why = "only an assistant message carries a tool call";
        if (strcmp(role, "assistant") != 0) { field = ".tool_call"; goto bad; }
        why = "expected {\"name\":...,\"arguments\":{...}}";
        if (j->n[call].type != AFM__JOBJ || afm__json_unknown_key(j, call, call_keys) >= 0) { field = ".tool_call"; goto bad; }
        if (!(name = afm__json_dup(&t->alloc, j, afm__json_get(j, call, "name"), &why))) { field = ".tool_call.name"; goto bad; }
        k = afm__json_get(j, call, "arguments");
        why = "expected an object";
        if (k < 0 || j->n[k].type != AFM__JOBJ) { field = ".tool_call.arguments"; goto bad; }
        afm__tb_init(&tb, &t->alloc);
        afm__tb_json(&tb, j, k);
        if (!(args = afm__tb_take(&tb))) { why = "out of memory"; goto bad; }
        r = afm__transcript_push(t, AFM_ENTRY_TOOL_CALL, "assistant", content, name, args, 0);
    } else {
        why = "only tool outputs and calls carry these";
        if (afm__json_get(j, m, "name") >= 0 || afm__json_get(j, m, "failed") >= 0) { field = ""; goto bad; }
        r = afm_transcript_add_message(t, role, content);
    }
    if (r != AFM_OK) { why = "out of memory"; goto bad; }
    goto out;
bad:
    r = afm__fail(err, errn, r == AFM_OK ? AFM_ERR_FORMAT : r, "transcript: messages[%d]%s: %s", i, field, why);
out:
    afm__free(&t->alloc, role);
    afm__free(&t->alloc, content);
    afm__free(&t->alloc, name);
    afm__free(&t->alloc, args);
    return r;
}
AFMDEF afm_result afm_transcript_from_json(afm_transcript *t, const char *json, size_t len, char *err, size_t errn) {
    static const char *const keys[] = { "tools", "messages", NULL };
    afm__json j;
    size_t where = 0;
    const char *why = "";
    int32_t tools, msgs, m;
    int i = 0;
    afm_result r = AFM_OK;
    if (err && errn) err[0] = 0;
    if (!t || (!json && len)) return afm__fail(err, errn, AFM_ERR_ARG, "afm_transcript_from_json: bad argument");
    if (t->n || t->n_tools) return afm__fail(err, errn, AFM_ERR_ARG, "afm_transcript_from_json: the transcript is not empty");
    memset(&j, 0, sizeof j);
    if (!afm__json_parse(&t->alloc, json ? json : "", len, &j, &where, &why)) {
        afm__json_free(&t->alloc, &j);
        return afm__fail(err, errn, AFM_ERR_FORMAT, "transcript: byte %lu: %s", (unsigned long)where, why);
    }
    if (j.n[0].type != AFM__JOBJ || afm__json_unknown_key(&j, 0, keys) >= 0 || (msgs = afm__json_get(&j, 0, "messages")) < 0 ||
        j.n[msgs].type != AFM__JARR) {
        r = afm__fail(err, errn, AFM_ERR_FORMAT, "transcript: expected {\"tools\":[...],\"messages\":[...]}");
        goto out;
    }
    if ((tools = afm__json_get(&j, 0, "tools")) >= 0 && (r = afm__tools_from_json(t, &j, tools, "transcript: ", err, errn)) != AFM_OK)
        goto out;
    for (m = j.n[msgs].child; m >= 0 && r == AFM_OK; m = j.n[m].next, i++) r = afm__entry_from_json(t, &j, m, i, err, errn);
out:
    afm__json_free(&t->alloc, &j);
    if (r != AFM_OK) afm__transcript_clear(t);
    return r;
}

/* ---- rendering: the transcript as AFM chat text ---- */
static const char afm__call_open[] = "<executable_start> ```function\n";
static const char afm__call_close[] = "\n```<executable_end>";

/* An entry's content as the model sees it in its turn. */
static char *afm__entry_text(const afm_allocator *a, const afm_transcript_entry *e) {
    afm__tb b;
    afm__tb_init(&b, a);
    if (e->kind == AFM_ENTRY_TOOL_OUTPUT && e->failed) afm__tb_str(&b, "error: ");
    afm__tb_str(&b, e->content);
    if (e->kind == AFM_ENTRY_TOOL_CALL) {
        afm__tb_str(&b, afm__call_open);
        afm__tb_str(&b, "{\"name\":");
        afm__tb_jstr(&b, e->name);
        afm__tb_str(&b, ",\"arguments\":");
        afm__tb_str(&b, e->arguments);
        afm__tb_str(&b, "}");
        afm__tb_str(&b, afm__call_close);
    }
    return afm__tb_take(&b);
}
/* The whole conversation, the assistant's turn opened, then `reply` (a reply's start; may be ""). */
static char *afm__transcript_render(const afm_transcript *t, const char *reply) {
    const afm_allocator *a = &t->alloc;
    afm_chat_message *msg = (afm_chat_message *)afm__calloc(a, (size_t)t->n + 1, sizeof *msg);
    char **tools = (char **)afm__calloc(a, (size_t)t->n_tools + 1, sizeof *tools);
    char *text = NULL;
    size_t len = 0;
    int i, ok = msg && tools;
    for (i = 0; ok && i < t->n; i++) {
        msg[i].role = t->e[i].role;
        ok = (msg[i].content = afm__entry_text(a, &t->e[i])) != NULL;
    }
    for (i = 0; ok && i < t->n_tools; i++) {
        afm__tb b;
        afm__tb_init(&b, a);
        afm__tb_tool(&b, &t->tools[i]);
        ok = (tools[i] = afm__tb_take(&b)) != NULL;
    }
    if (ok) afm_chat_render(msg, t->n, (const char *const *)tools, t->n_tools, 1, NULL, 0, &len);
    if (ok && (text = (char *)afm__alloc(a, len + strlen(reply) + 1)) != NULL) {
        afm_chat_render(msg, t->n, (const char *const *)tools, t->n_tools, 1, text, len + 1, &len);
        memcpy(text + len, reply, strlen(reply) + 1);
    }
    for (i = 0; msg && i < t->n; i++) afm__free(a, (void *)msg[i].content);
    for (i = 0; tools && i < t->n_tools; i++) afm__free(a, tools[i]);
    afm__free(a, msg);
    afm__free(a, tools);
    return text;
}

/* The schema of a call: {"name":N,"arguments":A} for each declared tool (or only `only`). */
static char *afm__call_schema(const afm_allocator *a, const afm_tool *tools, int n_tools, const char *only) {
    afm__tb b;
    int i, first = 1;
    afm__tb_init(&b, a);
    afm__tb_str(&b, "{\"anyOf\":[");
    for (i = 0; i < n_tools; i++) {
        if (only && strcmp(only, tools[i].name) != 0) continue;
        afm__tb_str(&b, first ? "" : ",");
        afm__tb_str(&b, "{\"type\":\"object\",\"properties\":{\"name\":{\"const\":");
        afm__tb_jstr(&b, tools[i].name);
        afm__tb_str(&b, "},\"arguments\":");
        afm__tb_str(&b, tools[i].parameters);
        afm__tb_str(&b, "},\"required\":[\"name\",\"arguments\"],\"additionalProperties\":false}");
        first = 0;
    }
    afm__tb_str(&b, "]}");
    return afm__tb_take(&b);
}

/* ---- the loop ---- */
typedef struct afm__toolrun {
    afm_session *s;
    const afm_tokenizer *tok;
    afm_transcript *t;
    const afm_tool_params *p;
    afm_tool_stats *st;
    const afm_constraint_vocab *vocab;
    afm_constraint *call;        /* the call schema */
    int32_t *out;                /* the reply's tokens */
    int n_out, cap_out, user_stop;
} afm__toolrun;

static int afm__toolrun_token(void *user, int32_t token) {
    afm__toolrun *R = (afm__toolrun *)user;
    if (R->n_out == R->cap_out) {
        int nc = R->cap_out ? R->cap_out * 2 : 256;
        int32_t *no = (int32_t *)afm__alloc(&R->t->alloc, (size_t)nc * sizeof *no);
        if (!no) return 1; /* out of memory: stop; the caller sees a reply cut short */
        if (R->n_out) memcpy(no, R->out, (size_t)R->n_out * sizeof *no);
        afm__free(&R->t->alloc, R->out);
        R->out = no;
        R->cap_out = nc;
    }
    R->out[R->n_out++] = token;
    R->st->n_generated++;
    if (R->p->gen.on_token && R->p->gen.on_token(R->p->gen.user, token)) R->user_stop = 1;
    return R->user_stop;
}

/* Generates after the transcript rendered with `reply` appended: the session keeps the longest
   common prefix of its cache and those tokens and evaluates the rest. The reply's tokens end up
   in R->out; *why is afm_generate's stop reason. */
static afm_result afm__tool_generate(afm__toolrun *R, const char *reply, afm_generate_params *gp, afm_stop_reason *why) {
    char *text = afm__transcript_render(R->t, reply);
    int32_t *ids = NULL;
    size_t n = 0;
    int nc = 0, keep = 0;
    const int32_t *cached;
    afm_generate_stats gs;
    afm_result r;
    if (!text) return afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
    r = afm__chat_encode(R->tok, text, strlen(text), NULL, 0, &n);
    if ((r == AFM_OK || r == AFM_ERR_ARG) && (ids = (int32_t *)afm__alloc(&R->t->alloc, (n + 1) * sizeof *ids)) != NULL)
        r = afm__chat_encode(R->tok, text, strlen(text), ids, n, &n);
    afm__free(&R->t->alloc, text);
    if (!ids || r != AFM_OK) {
        afm__free(&R->t->alloc, ids);
        return afm__serr(R->s, r == AFM_OK ? AFM_ERR_NOMEM : r, "tool loop: cannot encode the conversation");
    }
    cached = afm_session_tokens(R->s, &nc);
    while (keep < nc && (size_t)keep + 1 < n && cached[keep] == ids[keep]) keep++; /* the last token is always evaluated */
    if ((r = afm_session_rewind(R->s, keep)) == AFM_OK) {
        R->n_out = 0;
        gp->on_token = afm__toolrun_token;
        gp->user = R;
        r = afm_generate(R->s, ids + keep, (int)n - keep, gp, &gs);
        *why = gs.stop;
    }
    afm__free(&R->t->alloc, ids);
    return r;
}

/* The reply's text: tokens R->out[0, n) detokenized (the newline layer undone). */
static char *afm__tool_text(afm__toolrun *R, int n) {
    size_t len = 0;
    char *s;
    afm_detokenize(R->tok, R->out, (size_t)n, AFM_TOK_NEWLINE, NULL, 0, &len);
    if (!(s = (char *)afm__alloc(&R->t->alloc, len + 1))) return NULL;
    afm_detokenize(R->tok, R->out, (size_t)n, AFM_TOK_NEWLINE, s, len + 1, &len);
    return s;
}

static afm_tool_stop afm__tool_stop_of(afm__toolrun *R, afm_stop_reason why) {
    return R->user_stop ? AFM_TOOL_STOP_CALLBACK : why == AFM_STOP_CONTEXT_FULL ? AFM_TOOL_STOP_CONTEXT_FULL : AFM_TOOL_STOP_N_PREDICT;
}

/* A reply that is text (the model may open a call: then *call_open is 1 and *before its text so far). */
static afm_result afm__tool_text_reply(afm__toolrun *R, int allow_calls, int *call_open, char **before) {
    afm_generate_params gp = R->p->gen;
    int32_t stops[3];
    afm_logit_bias *bias = NULL;
    afm_stop_reason why = AFM_STOP_NONE;
    afm_result r;
    int n, ends;
    stops[0] = afm_tokenizer_special(R->tok, AFM_SPECIAL_TURN_END);
    stops[1] = afm_tokenizer_special(R->tok, AFM_SPECIAL_EOS);
    stops[2] = afm_tokenizer_special(R->tok, AFM_SPECIAL_EXEC_START);
    gp.stop_tokens = stops;
    gp.n_stop_tokens = allow_calls ? 3 : 2;
    gp.constraint = NULL;
    if (!allow_calls && stops[2] >= 0) { /* AFM_TOOL_NONE: <executable_start> can never be picked */
        if (!(bias = (afm_logit_bias *)afm__alloc(&R->t->alloc, ((size_t)gp.sampler.n_logit_bias + 1) * sizeof *bias)))
            return afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
        if (gp.sampler.n_logit_bias) memcpy(bias, gp.sampler.logit_bias, (size_t)gp.sampler.n_logit_bias * sizeof *bias);
        bias[gp.sampler.n_logit_bias].token = stops[2];
        bias[gp.sampler.n_logit_bias].bias = -INFINITY;
        gp.sampler.logit_bias = bias;
        gp.sampler.n_logit_bias++;
    }
    r = afm__tool_generate(R, "", &gp, &why);
    afm__free(&R->t->alloc, bias);
    if (r != AFM_OK && r != AFM_ERR_CONTEXT_FULL) return r;
    ends = why == AFM_STOP_TOKEN && R->n_out > 0;
    *call_open = ends && allow_calls && R->out[R->n_out - 1] == stops[2];
    n = R->n_out - ends; /* without the stop token */
    if (!(*before = afm__tool_text(R, n))) return afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
    if (*call_open) return AFM_OK;
    if (afm_transcript_add_message(R->t, "assistant", *before) != AFM_OK) return afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
    R->st->stop = ends ? AFM_TOOL_STOP_ANSWER : afm__tool_stop_of(R, why);
    return AFM_OK;
}

/* The call after `before<executable_start> ```function\n`, constrained to the call schema; appended
   to the transcript. *done is 0 when it was not finished (R->st->stop says why). */
static afm_result afm__tool_call_reply(afm__toolrun *R, const afm_constraint *schema, const char *before, int *done) {
    afm_generate_params gp = R->p->gen;
    afm_constraint_state *cs = NULL;
    afm_stop_reason why = AFM_STOP_NONE;
    afm_result r;
    afm__tb b;
    char *reply, *call = NULL;
    afm__json j;
    size_t where;
    const char *err = "";
    *done = 0;
    afm__tb_init(&b, &R->t->alloc);
    afm__tb_str(&b, before);
    afm__tb_str(&b, afm__call_open);
    if (!(reply = afm__tb_take(&b)) || afm_constraint_state_create(schema, R->vocab, &cs) != AFM_OK) {
        afm__free(&R->t->alloc, reply);
        return afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
    }
    gp.stop_tokens = NULL;
    gp.n_stop_tokens = 0;
    gp.constraint = cs;
    r = afm__tool_generate(R, reply, &gp, &why);
    afm__free(&R->t->alloc, reply);
    if (r == AFM_OK || r == AFM_ERR_CONTEXT_FULL) {
        if (!afm_constraint_state_complete(cs)) R->st->stop = afm__tool_stop_of(R, why);
        else if (!(call = afm__tool_text(R, R->n_out - (why == AFM_STOP_TOKEN)))) r = afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
    }
    afm_constraint_state_free(cs);
    if (!call) return r;
    memset(&j, 0, sizeof j);
    if (afm__json_parse(&R->t->alloc, call, strlen(call), &j, &where, &err)) { /* valid by construction; checked anyway */
        char *name = afm__json_dup(&R->t->alloc, &j, afm__json_get(&j, 0, "name"), &err);
        int32_t args = afm__json_get(&j, 0, "arguments");
        afm__tb_init(&b, &R->t->alloc);
        if (args >= 0) afm__tb_json(&b, &j, args);
        {
            char *a = afm__tb_take(&b);
            if (!name || !a || afm_transcript_add_tool_call(R->t, before, name, a) != AFM_OK)
                r = afm__serr(R->s, AFM_ERR_FORMAT, "tool loop: the call '%.200s' does not parse", call);
            else *done = 1;
            afm__free(&R->t->alloc, a);
        }
        afm__free(&R->t->alloc, name);
    } else r = afm__serr(R->s, AFM_ERR_FORMAT, "tool loop: the call '%.200s' does not parse: %s", call, err);
    afm__json_free(&R->t->alloc, &j);
    afm__free(&R->t->alloc, call);
    return r;
}

/* Runs the transcript's last entry (a call) through the app's callback; 0 when the app takes over. */
static int afm__tool_execute(afm__toolrun *R, afm_result *r) {
    const afm_transcript_entry *e = &R->t->e[R->t->n - 1];
    const char *result = NULL;
    afm_tool_status status;
    if (!R->p->call) return 0;
    status = R->p->call(R->p->call_user, e->name, e->arguments, &result);
    if (status == AFM_TOOL_HANDOFF) return 0;
    if (afm_transcript_add_tool_output(R->t, e->name, result ? result : "", status != AFM_TOOL_OK) != AFM_OK)
        *r = afm__serr(R->s, AFM_ERR_NOMEM, "tool loop: out of memory");
    R->st->n_calls++;
    return 1;
}

static afm_result afm__tool_loop(afm__toolrun *R, const afm_constraint *any, const afm_constraint *forced) {
    int max_rounds = R->p->max_rounds > 0 ? R->p->max_rounds : 8, first = 1, rounds = 0;
    afm_result r = AFM_OK;
    for (;;) {
        int call_open = 0, done = 0;
        char *before = NULL;
        if (first && R->p->mode == AFM_TOOL_REQUIRED) call_open = 1; /* open the call ourselves */
        else if ((r = afm__tool_text_reply(R, R->p->mode != AFM_TOOL_NONE && R->t->n_tools > 0, &call_open, &before)) != AFM_OK)
            return r;
        if (call_open) r = afm__tool_call_reply(R, first && forced ? forced : any, before ? before : "", &done);
        afm__free(&R->t->alloc, before);
        first = 0;
        if (r != AFM_OK || !done) return r;
        if (!afm__tool_execute(R, &r)) { R->st->stop = AFM_TOOL_STOP_HANDOFF; return r; }
        if (r != AFM_OK) return r;
        if (++rounds >= max_rounds) { R->st->stop = AFM_TOOL_STOP_ROUNDS; return AFM_OK; } /* ends with the output */
    }
}

AFMDEF afm_result afm_tool_run(afm_session *s, const afm_tokenizer *tok, afm_transcript *t, const afm_tool_params *p,
                               afm_tool_stats *stats) {
    afm__toolrun R;
    afm_tool_stats local;
    afm_constraint_vocab *own = NULL;
    afm_constraint *any = NULL, *forced = NULL;
    char *schema = NULL, cerr[256];
    afm_result r = AFM_OK;
    int i, found = 0;
    if (!stats) stats = &local;
    memset(stats, 0, sizeof *stats);
    if (!s || !tok || !t || !p) return s ? afm__serr(s, AFM_ERR_ARG, "afm_tool_run: bad argument") : AFM_ERR_ARG;
    if (p->mode == AFM_TOOL_REQUIRED && !t->n_tools) return afm__serr(s, AFM_ERR_ARG, "afm_tool_run: tool mode 'required' with no tools declared");
    for (i = 0; p->tool_name && i < t->n_tools; i++) found |= !strcmp(t->tools[i].name, p->tool_name);
    if (p->tool_name && !found) return afm__serr(s, AFM_ERR_ARG, "afm_tool_run: no tool named '%.64s' is declared", p->tool_name);
    if (t->n && t->e[t->n - 1].kind == AFM_ENTRY_TOOL_CALL)
        return afm__serr(s, AFM_ERR_ARG, "afm_tool_run: the last tool call has no output yet (afm_transcript_add_tool_output)");
    memset(&R, 0, sizeof R);
    R.s = s;
    R.tok = tok;
    R.t = t;
    R.p = p;
    R.st = stats;
    R.vocab = p->vocab;
    if (t->n_tools && !R.vocab && (r = afm_constraint_vocab_create(tok, &t->alloc, &own)) != AFM_OK) return afm__serr(s, r, "tool loop: out of memory");
    if (!R.vocab) R.vocab = own;
    for (i = 0; i < 2 && r == AFM_OK && t->n_tools; i++) { /* the call schema: any tool, and the one required */
        afm_constraint **c = i ? &forced : &any;
        if (i && !p->tool_name) break;
        if (!(schema = afm__call_schema(&t->alloc, t->tools, t->n_tools, i ? p->tool_name : NULL))) r = afm__serr(s, AFM_ERR_NOMEM, "tool loop: out of memory");
        else if ((r = afm_constraint_compile(AFM_CONSTRAINT_JSON_SCHEMA, schema, strlen(schema), &t->alloc, c, cerr, sizeof cerr)) != AFM_OK)
            r = afm__serr(s, r, "tool loop: the call schema: %s", cerr);
        afm__free(&t->alloc, schema);
    }
    if (r == AFM_OK) r = afm__tool_loop(&R, any, forced);
    afm_constraint_free(any);
    afm_constraint_free(forced);
    afm_constraint_vocab_free(own);
    afm__free(&t->alloc, R.out);
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
