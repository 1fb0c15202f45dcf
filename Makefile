# afm.h - build the CLI and examples, run the tests.
#   make            build ./afm, ./simple and ./afm-server (the OpenAI-compatible server)
#   make lib        libafm.so, the shared library of the Python bindings (python/)
#   make demo       build, then generate from the small model in the repository (also guided: JSON by schema)
#   make test       every test: warnings (gcc/clang, C99/C++), optimised and sanitized runs,
#                   tools, arm64 under qemu, fuzz replay + a bounded libFuzzer run
#   make fuzz       run each fuzz harness (model loader, .fmadapter reader, generation, constraint compilers,
#                   session state files, the server's HTTP/JSON request parsers, tools and transcripts)
#                   for FUZZ_SECONDS (default 60)
#   make fuzz-tok   the same for the tokenizer's harnesses (tokenizer files; encode/decode)
#   make fuzz-long  every harness for FUZZ_LONG_SECONDS each (default 900; docs/FUZZING.md)
#   make bench      the full-size benchmarks (also bench-adapter, bench-spec, bench-kernels, bench-attention, bench-grammar; see below)
CC      ?= cc
CFLAGS  ?= -O2 -g
WARN     = -Wall -Wextra -Wpedantic
LDLIBS   = -lm -lpthread
FUZZ_SECONDS ?= 60
# extra libFuzzer flags for every harness, e.g. FUZZ_FLAGS=-fork=4 (four processes each)
FUZZ_FLAGS ?=

all: afm simple afm-server

afm: examples/afm.c examples/afm_bench.c examples/cli.h afm.h afm_tokenizer.h
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ examples/afm.c examples/afm_bench.c $(LDLIBS)

# The shared library the Python bindings load (python/, docs: python/README.md).
lib: libafm.so
libafm.so: afm.h
	$(CC) -std=c99 $(WARN) $(CFLAGS) -shared -fPIC -DAFM_IMPLEMENTATION -x c afm.h -o $@ $(LDLIBS)

afm-server: examples/server.c afm.h
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ examples/server.c $(LDLIBS)

simple: examples/simple.c afm.h
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ examples/simple.c $(LDLIBS)

# The main job: generate from the small trained model in the repository (models/mini, docs/TRAINING.md):
# a text continuation, a chat turn with its JSON adapter, and guided generation (--json-schema) from the
# base model alone; text on stdout, speed on stderr.
demo: afm
	./afm info models/mini/base.afm
	./afm -m models/mini/base.afm -p "In the beginning God created" -n 48 --temp 0.8 --top-p 0.95 --seed 1 -t 2
	./afm -m models/mini/base.afm --adapter models/mini/json.afma --chat -n 40 -t 2 \
	    -p "Describe as JSON: Blessed are the meek: for they shall inherit the earth."
	@echo "guided generation: the base model without its adapter, JSON valid under tests/constrain/person.json by construction"
	./afm -m models/mini/base.afm --chat -n 80 -t 2 --temp 1 --seed 1 --json-schema tests/constrain/person.json \
	    -p "Describe a person from Genesis."

test:
	sh tests/run.sh

# Each harness runs FUZZ_SECONDS on a scratch copy of its committed seed corpus.
# Scalar kernels only: the harnesses target the parsers, and clang instrumenting the inlined SIMD
# kernels takes minutes per file.
FUZZ_CC = clang -std=c99 -g -O1 -DAFM_NO_SIMD -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
# afm.h's implementation compiled (and coverage-instrumented) once for the harnesses that use only its
# public API (load, fmadapter, gen: built with -DAFM_IMPLEMENTATION_DONE); the others call its static
# internals or, for the server's, set _POSIX_C_SOURCE before it, and compile their own.
build/fuzz_afm.o: afm.h
	mkdir -p build
	$(FUZZ_CC) -DAFM_IMPLEMENTATION -x c afm.h -c -o $@
fuzz: build/fuzz_afm.o
	mkdir -p build build/corpus-load build/corpus-fmadapter build/corpus-gen build/corpus-constrain build/corpus-session build/corpus-http build/corpus-transcript
	$(FUZZ_CC) -DAFM_IMPLEMENTATION_DONE -o build/fuzz_load tests/fuzz/fuzz_load.c build/fuzz_afm.o $(LDLIBS)
	$(FUZZ_CC) -DAFM_IMPLEMENTATION_DONE -o build/fuzz_fmadapter tests/fuzz/fuzz_fmadapter.c build/fuzz_afm.o $(LDLIBS)
	$(FUZZ_CC) -DAFM_IMPLEMENTATION_DONE -o build/fuzz_gen tests/fuzz/fuzz_gen.c build/fuzz_afm.o $(LDLIBS)
	$(FUZZ_CC) -o build/fuzz_constrain tests/fuzz/fuzz_constrain.c $(LDLIBS)
	$(FUZZ_CC) -o build/fuzz_session tests/fuzz/fuzz_session.c $(LDLIBS)
	$(FUZZ_CC) -o build/fuzz_http tests/fuzz/fuzz_http.c $(LDLIBS)
	$(FUZZ_CC) -o build/fuzz_transcript tests/fuzz/fuzz_transcript.c $(LDLIBS)
	build/fuzz_load -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -timeout=10 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-load tests/fuzz/corpus/load
	build/fuzz_fmadapter -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-fmadapter tests/fuzz/corpus/fmadapter_packed
	build/fuzz_gen -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=32768 -timeout=20 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-gen tests/fuzz/corpus/gen
	build/fuzz_constrain -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -timeout=10 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-constrain tests/fuzz/corpus/constrain
	build/fuzz_session -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-session tests/fuzz/corpus/session
	build/fuzz_http -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-http tests/fuzz/corpus/http
	build/fuzz_transcript -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -timeout=10 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-transcript tests/fuzz/corpus/transcript

# Scalar kernels only here too (the tokenizer uses none).
fuzz-tok:
	mkdir -p build build/corpus-fuzz_tok_load build/corpus-fuzz_tok_text
	$(FUZZ_CC) -o build/fuzz_tok_load tests/fuzz/fuzz_tok_load.c $(LDLIBS)
	$(FUZZ_CC) -o build/fuzz_tok_text tests/fuzz/fuzz_tok_text.c $(LDLIBS)
	build/fuzz_tok_load -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=20 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-fuzz_tok_load tests/fuzz/corpus/tok_load
	build/fuzz_tok_text -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=20 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-fuzz_tok_text tests/fuzz/corpus/tok_text

# Every harness (model file, .fmadapter, generation, tokenizer files, text) for a longer time each:
# make fuzz-long FUZZ_LONG_SECONDS=3600. The scratch corpora in build/ grow from run to run;
# docs/FUZZING.md records the long runs made so far.
FUZZ_LONG_SECONDS ?= 900
fuzz-long:
	$(MAKE) fuzz fuzz-tok FUZZ_SECONDS=$(FUZZ_LONG_SECONDS)

# Only the generation harness (eval + sampler + afm_generate on fuzzed models, parameters, drafters
# and logits).
fuzz-gen:
	mkdir -p build build/corpus-gen
	$(FUZZ_CC) -o build/fuzz_gen tests/fuzz/fuzz_gen.c $(LDLIBS)
	build/fuzz_gen -artifact_prefix=build/ -max_total_time=$(FUZZ_SECONDS) -max_len=32768 -timeout=20 -rss_limit_mb=2048 $(FUZZ_FLAGS) \
	    build/corpus-gen tests/fuzz/corpus/gen

# Benchmarks on the full-size synthetic AFMTextV7 (3.18B, 2-bit matrices, 4-bit head, int8 KV) and
# its 48.8M draft, made once in BENCH_DIR (955 MB + 26 MB + a 133 MB rank-32 adapter, ~20 s):
#   make bench           prefill, decode, bytes/token, bandwidth, % of roofline, peak RSS (1 and 2 threads)
#   make bench-adapter   adapter load/switch time, decode with and without a rank-32 adapter
#   make bench-spec      verification cost curve and speculative speedup vs acceptance
BENCH_DIR  ?= build/bench
BENCH_ARGS ?= -t 1,2 -p 512 -n 128 -r 3
# Each model is made only while missing (its rule has no prerequisites); tools/synth.py needs numpy.
SYNTH = @python3 -c 'import numpy' 2>/dev/null || { echo "make $@: tools/synth.py needs Python 3 with numpy (python3 -m pip install numpy)" >&2; exit 1; }; \
	mkdir -p $(BENCH_DIR) && echo "python3 tools/synth.py $(1)" && python3 tools/synth.py $(1)
bench-models: afm $(BENCH_DIR)/base-q2b.afm $(BENCH_DIR)/draft-q4.afm $(BENCH_DIR)/adapter-r32.afma
$(BENCH_DIR)/base-q2b.afm:
	$(call SYNTH,--preset base --type q2b --random-codes --kv-scales -q -o $@)
$(BENCH_DIR)/draft-q4.afm:
	$(call SYNTH,--preset draft --type q4 --random-codes --kv-scales -q -o $@)
$(BENCH_DIR)/adapter-r32.afma:
	$(call SYNTH,--preset base -q --adapter-out $@)

bench: bench-models
	./afm bench $(BENCH_DIR)/base-q2b.afm $(BENCH_ARGS)
	./afm bench $(BENCH_DIR)/draft-q4.afm $(BENCH_ARGS)

bench-adapter: bench-models
	./afm bench $(BENCH_DIR)/base-q2b.afm --adapter $(BENCH_DIR)/adapter-r32.afma -t 2 -p 16 -n 64 -r 5

bench-spec: bench-models
	./afm bench $(BENCH_DIR)/base-q2b.afm --spec -t 2 -p 64 -n 64 -r 3

# Guided generation (docs/BENCHMARKS.md): compile time, token mask time (median, p99) on the
# 153,600-piece tokenizer the tokenizer tests train (trained here once, a few minutes), and decode
# tok/s with and without each schema of tests/constrain on the shipped model.
build/tok/models/afm150k_id.model:
	python3 tests/gen/gen_tok_corpus.py build/tok/corpus
	python3 tests/gen/train_tok_models.py build/tok/corpus build/tok/models afm150k_id
bench-grammar: afm build/tok/models/afm150k_id.model
	./afm bench models/mini/base.afm --grammar --tokenizer build/tok/models/afm150k_id.model -w 10 -n 40 -t 1 \
	    $$(ls tests/constrain/*.json | grep -v prompts.json)

# Kernel micro-benchmark: matvec GB/s and prefill GFLOP/s per type next to measured bandwidth.
bench-kernels:
	mkdir -p build
	$(CC) -std=c99 -O2 -D_GNU_SOURCE -o build/bench_kernels bench/bench_kernels.c $(LDLIBS)
	build/bench_kernels

# Decode at 4000 positions against 512, the KV cache filled with random codes instead of a prefill
# (docs/BENCHMARKS.md, "Long contexts"): attention alone and whole decode steps, medians, the ratio.
bench-attention: bench-models
	$(CC) -std=c99 -O2 -D_GNU_SOURCE -o build/bench_attention bench/bench_attention.c $(LDLIBS)
	build/bench_attention $(BENCH_DIR)/base-q2b.afm -t 2 -r 7

clean:
	rm -rf build afm simple afm-server libafm.so

.PHONY: all lib demo test fuzz fuzz-tok fuzz-long fuzz-gen bench bench-models bench-adapter bench-spec bench-kernels bench-attention clean
