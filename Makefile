# afm.h - build the CLI and examples, run the tests.
#   make            build ./afm and ./simple
#   make test       every test: warnings (gcc/clang, C99/C++), optimised and sanitized runs,
#                   tools, arm64 under qemu, fuzz replay + a bounded libFuzzer run
#   make fuzz       run the loader fuzzer for FUZZ_SECONDS (default 60)
CC      ?= cc
CFLAGS  ?= -O2 -g
WARN     = -Wall -Wextra -Wpedantic
LDLIBS   = -lm -lpthread
FUZZ_SECONDS ?= 60

all: afm simple

afm: examples/afm.c afm.h
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ examples/afm.c $(LDLIBS)

simple: examples/simple.c afm.h
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ examples/simple.c $(LDLIBS)

test:
	sh tests/run.sh

fuzz:
	mkdir -p build tests/fuzz/corpus-run
	clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	    -o build/fuzz_load tests/fuzz/fuzz_load.c $(LDLIBS)
	build/fuzz_load -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
	    tests/fuzz/corpus-run tests/fuzz/corpus/load

clean:
	rm -rf build afm simple

.PHONY: all test fuzz clean
