#!/bin/sh
# The test runner behind `make test`. Each step adds its counts; the last line is
# "N passed, N failed" and the exit status is non-zero on any failure.
# Environment: CI=true makes missing tools (clang, aarch64 cross compiler, qemu, numpy, regex)
# failures instead of skips; FUZZ_SECONDS bounds the libFuzzer run of each engine harness (default 15),
# TOK_FUZZ_SECONDS that of each tokenizer harness (default 15).
cd "$(dirname "$0")/.." || exit 1
. tests/lib.sh

# Programs built with sanitizers spend almost all their compile in afm.h's implementation (~40 s each
# with every kernel). Those that use only its public API and define nothing before including it
# link one copy instead: impl_obj NAME FLAGS... compiles the implementation with FLAGS into
# build/NAME.o (the same code with the same flags as before, in its own translation unit), and the
# programs are built with -DAFM_IMPLEMENTATION_DONE, which leaves the implementation out of theirs.
# build/NAME.status says "ok" or "failed" once done; impl_ready NAME waits for it (at most 30 minutes:
# the object is made by one lane and used by both).
impl_obj() {
    name=$1; shift
    if gcc -std=c99 "$@" -DAFM_IMPLEMENTATION -x c afm.h -c -o build/$name.o; then echo ok; else echo failed; fi > build/$name.status.part
    mv build/$name.status.part build/$name.status
}
impl_ready() {
    n=0
    while [ ! -f build/$1.status ] && [ $n -lt 1800 ]; do sleep 1; n=$((n + 1)); done
    [ "$(cat build/$1.status 2>/dev/null)" = ok ]
}
SAN="-O1 $DBG -fsanitize=address,undefined -fno-sanitize-recover=undefined"
REPLAY="$SAN -DAFM_FUZZ_MAIN" # a fuzz harness built with its own main, which replays corpus files
# The sanitized corpus replays (constraint compilers, tool-call readers, HTTP requests, saved sessions)
# leave the SIMD kernels out: those run under the sanitizers in test_kernels and test_main, every
# level computes the scalar level's bits, and compiling every kernel with ASan costs ~45 s a program
# on a CI core. (Not test_constrain: it runs the model enough that its scalar kernels under ASan
# took 120 s against 10.)
REPLAY_NK="$REPLAY -DAFM_NO_SIMD"
rm -f build/afm_san.status build/afm_o2.status

# Steps that share nothing with the others (the warnings builds, arm64 under qemu, the fuzzers, the
# kernel levels of a -ffp-contract=fast build, the attention benchmark, the tokenizer's suite) run
# as a second lane beside them: CI has 2 cores and most steps use one. The lane keeps its own
# counts and log (build/lane_b.log, printed after the other steps) and adds them at the end.
lane_b() {
    PASS=0; FAIL=0; SKIP=0; LANE=b
    section "warnings: -Wall -Wextra -Wpedantic as C99 and C++, gcc and clang"
    for cc in "gcc -std=c99" "clang -std=c99" "g++ -x c++" "clang++ -x c++"; do
        set -- $cc
        if ! have "$1"; then skip "warnings with $cc" "$1 not installed"; continue; fi
        # afm.h's implementation optimised once per compiler (flow-based warnings need -O2); the other
        # files that include it only for their own code (each compile of the implementation with every
        # kernel takes ~15 s)
        if $cc $WARN -O2 -c examples/afm.c -o build/w.o && $cc $WARN -fsyntax-only examples/afm_bench.c &&
           $cc $WARN -fsyntax-only examples/simple.c &&
           $cc $WARN -fsyntax-only tests/test_main.c && $cc $WARN -fsyntax-only tests/test_kernels.c &&
           $cc $WARN -fsyntax-only tests/test_hostile.c && $cc $WARN -fsyntax-only tests/fuzz/fuzz_gen.c &&
           $cc $WARN -fsyntax-only tests/test_constrain.c && $cc $WARN -fsyntax-only tests/fuzz/fuzz_constrain.c &&
           $cc $WARN -fsyntax-only tests/test_session.c && $cc $WARN -fsyntax-only tests/fuzz/fuzz_session.c &&
           $cc $WARN -fsyntax-only tests/test_sampler.c && $cc $WARN -fsyntax-only examples/server.c &&
           $cc $WARN -fsyntax-only tests/fuzz/fuzz_http.c &&
           $cc $WARN -fsyntax-only tests/test_toolcall.c && $cc $WARN -fsyntax-only tests/fuzz/fuzz_transcript.c &&
           $cc $WARN -fsyntax-only tests/fuzz/fuzz_load.c && $cc $WARN -fsyntax-only tests/fuzz/fuzz_fmadapter.c; then
            ok "warning-free with $cc"
        else bad "warnings with $cc"; fi
    done

    section "arm64 build under qemu"
    if have aarch64-linux-gnu-gcc && have qemu-aarch64; then
        if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static tests/test_main.c -o build/test_main_arm64 $LIBS; then
            run_counts "test_main arm64 (qemu)" env AFM_TEST_LIGHT=1 qemu-aarch64 build/test_main_arm64
        else bad "aarch64 cross build"; fi
        # (the tokenizer uses no kernels: AFM_NO_SIMD saves compiling them, ~45 s)
        if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static -DAFM_NO_SIMD tests/test_tokenizer.c -o build/test_tokenizer_arm64 $LIBS; then
            run_counts "test_tokenizer arm64, unsigned char (qemu)" qemu-aarch64 build/test_tokenizer_arm64
        else bad "aarch64 cross build of test_tokenizer"; fi
        # every level this build has: scalar, NEON and NEON dot product (test_main_arm64 above runs the
        # NEON level as built without +dotprod)
        if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static -march=armv8.2-a+dotprod tests/test_kernels.c -o build/test_kernels_dot $LIBS; then
            run_counts "test_kernels scalar, NEON, NEON dotprod (qemu)" qemu-aarch64 -cpu max build/test_kernels_dot
        else bad "aarch64 cross build of test_kernels with dotprod"; fi
        # the CLI on arm64 (GNU mode: gcc fuses multiply-adds there by default): scalar, NEON and NEON
        # dot product give the logits recorded on x86
        if aarch64-linux-gnu-gcc -std=gnu99 -O2 -static -march=armv8.2-a+dotprod examples/afm.c examples/afm_bench.c -o build/afm_arm64 $LIBS; then
            run_counts "kernel levels arm64 (qemu)" env LEVELS_OUT=build/levels_arm64 sh tests/levels.sh build/afm_arm64 qemu-aarch64 -cpu max
        else bad "aarch64 cross build of the CLI"; fi
    else skip "arm64 tests" "apt-get install gcc-aarch64-linux-gnu qemu-user"; fi

    section "fuzz: replay the hostile corpora, then a bounded libFuzzer run of each harness"
    # the harnesses that use afm.h's public API only link the sanitized implementation the main lane
    # compiles (build/afm_san.o); session calls its internal (static) functions, and the server's
    # (examples/server.c) sets _POSIX_C_SOURCE and takes <sys/time.h> from the implementation: those
    # compile their own. The constraint and tools/transcript corpora (static internals too) are
    # replayed in the main lane, beside test_constrain and test_toolcall, to balance the lanes' CPU time
    impl_ready afm_san || bad "afm.h's implementation with ASan/UBSan (build/afm_san.o)"
    if gcc -std=c99 $REPLAY -DAFM_IMPLEMENTATION_DONE tests/fuzz/fuzz_load.c build/afm_san.o -o build/fuzz_replay $LIBS &&
       build/fuzz_replay tests/fuzz/corpus/load/* >/dev/null; then
        ok "model-file corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/load | wc -l) inputs)"
    else bad "model-file corpus replay"; fi
    if gcc -std=c99 $REPLAY -DAFM_IMPLEMENTATION_DONE tests/fuzz/fuzz_gen.c build/afm_san.o -o build/fuzz_gen_replay $LIBS &&
       build/fuzz_gen_replay tests/fuzz/corpus/gen/* >/dev/null; then
        ok "generation corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/gen | wc -l) inputs)"
    else bad "generation corpus replay"; fi
    if gcc -std=c99 $REPLAY -DAFM_IMPLEMENTATION_DONE tests/fuzz/fuzz_fmadapter.c build/afm_san.o -o build/fuzz_fm_replay $LIBS &&
       build/fuzz_fm_replay tests/fuzz/corpus/fmadapter/*/ tests/fuzz/corpus/fmadapter_packed/* >/dev/null; then
        ok ".fmadapter corpus replays clean under ASan/UBSan ($(ls -d tests/fuzz/corpus/fmadapter/*/ | wc -l) packages)"
    else bad ".fmadapter corpus replay"; fi
    # the server's request parsers: each hostile request refused with its status
    if gcc -std=c99 $REPLAY_NK tests/fuzz/fuzz_http.c -o build/fuzz_http_replay $LIBS &&
       build/fuzz_http_replay tests/fuzz/corpus/http/* > build/http_replay.log &&
       grep -A1 "bare_lf$" build/http_replay.log | grep -q "400 lines must end in CRLF" &&
       grep -A1 "long_head$" build/http_replay.log | grep -q "431" && grep -A1 "chunked$" build/http_replay.log | grep -q "501" &&
       grep -A1 "http2$" build/http_replay.log | grep -q "505" && grep -A1 "json_deep$" build/http_replay.log | grep -q "incomplete" &&
       grep -A2 "json_deep$" build/http_replay.log | grep -q "nested too deeply" &&
       grep -A2 "post_chat$" build/http_replay.log | grep -q "body: 200 ok"; then
        ok "HTTP/JSON request corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/http | wc -l) inputs, each refusal with its status)"
    else bad "HTTP request corpus replay"; cat build/http_replay.log; fi
    # the session corpus: its valid states load, each hostile one is refused for its own reason
    if gcc -std=c99 $REPLAY_NK tests/fuzz/fuzz_session.c -o build/fuzz_session_replay $LIBS &&
       build/fuzz_session_replay tests/fuzz/corpus/session/* > build/session_replay.log &&
       [ "$(grep -c ': loaded$' build/session_replay.log)" -eq 6 ] &&
       grep -q "bad_checksum: .*checksum does not match" build/session_replay.log &&
       grep -q "token_out_of_range: .*offset 132: token 1 is 8192" build/session_replay.log &&
       grep -q "f32_nan_logit: .*not finite" build/session_replay.log &&
       grep -q "other_model: .*another model" build/session_replay.log; then
        ok "session-state corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/session | wc -l) inputs, 6 valid)"
    else bad "session-state corpus replay"; cat build/session_replay.log; fi
    if have clang && clang -fsanitize=fuzzer -x c /dev/null -o /dev/null 2>/dev/null ||
       (echo 'int LLVMFuzzerTestOneInput(const char*d,long n){(void)d;(void)n;return 0;}' > build/fz.c &&
        clang -fsanitize=fuzzer build/fz.c -o build/fz 2>/dev/null); then
        if make -s fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-15}" > build/fuzz.log 2>&1; then ok "libFuzzer, ${FUZZ_SECONDS:-15} s per harness: $(grep -o 'Done [0-9]* runs' build/fuzz.log | tr '\n' ' ')"
        else bad "libFuzzer found a problem (build/fuzz.log)"; tail -n 30 build/fuzz.log; fi
    else skip "libFuzzer run" "clang with libFuzzer (apt-get install clang libclang-rt-14-dev)"; fi

    section "kernel levels of a build that lets the compiler fuse every a*b+c it can (GNU mode, -O3, this CPU's FMA): the same record"
    if gcc -std=gnu99 -O3 -march=native -ffp-contract=fast -o build/afm_fused examples/afm.c examples/afm_bench.c $LIBS; then
        run_counts "kernel levels, gcc -O3 -march=native -ffp-contract=fast" env LEVELS_OUT=build/levels_fused sh tests/levels.sh build/afm_fused
    else bad "build afm with -ffp-contract=fast"; fi

    section "attention benchmark"
    # the attention benchmark (docs/BENCHMARKS.md, long contexts) still builds and runs: the shipped model, 2 threads
    if gcc -std=c99 $WARN -O2 -D_GNU_SOURCE bench/bench_attention.c -o build/bench_attention $LIBS &&
       build/bench_attention models/mini/base.afm -t 2 -r 1 -p 100,900 > build/bench_attention.log 2>&1 &&
       grep -q '^decode at 900: [0-9.]* % of the speed at 100' build/bench_attention.log; then ok "bench_attention: $(tail -n 1 build/bench_attention.log)"
    else bad "bench_attention (build/bench_attention.log)"; cat build/bench_attention.log; fi

    section "tokenizer: tests/run_tokenizer.sh (warnings, reference vectors, sanitizers, fuzzing, Unicode tables)"
    run_counts "tokenizer" env FUZZ_SECONDS="${TOK_FUZZ_SECONDS:-15}" sh tests/run_tokenizer.sh

    echo "$PASS $FAIL $SKIP" > build/lane_b.counts
}
rm -f build/lane_b.counts
lane_b > build/lane_b.log 2>&1 &
LANE_B=$!

section "afm.h's implementation built once with ASan/UBSan, for test_toolcall, test_sampler and three fuzz corpus replays"
impl_obj afm_san $WARN $SAN # the flags of the programs that link it; test_sampler's include $WARN
if impl_ready afm_san; then ok "afm.h's implementation with ASan/UBSan (build/afm_san.o)"
else bad "afm.h's implementation with ASan/UBSan"; fi

section "engine tests, optimised"
if gcc -std=c99 -O2 $DBG tests/test_main.c -o build/test_main $LIBS; then run_counts "test_main -O2" build/test_main
else bad "build test_main"; fi

section "kernels: every SIMD kernel against the scalar reference (ragged shapes)"
if gcc -std=c99 $WARN -O2 tests/test_kernels.c -o build/test_kernels $LIBS; then run_counts "test_kernels -O2" build/test_kernels
else bad "build test_kernels"; fi
if gcc -std=c99 -O1 $DBG -fsanitize=address,undefined -fno-sanitize-recover=undefined tests/test_kernels.c -o build/test_kernels_san $LIBS; then
    run_counts "test_kernels asan+ubsan" build/test_kernels_san
else bad "build test_kernels with sanitizers"; fi

section "engine tests, built with AFM_NO_THREADS AFM_NO_MMAP (portable fallbacks)"
if gcc -std=c99 $WARN -O2 -DAFM_NO_THREADS -DAFM_NO_MMAP tests/test_main.c -o build/test_main_nothreads -lm; then
    run_counts "test_main no threads, no mmap" build/test_main_nothreads
else bad "build with AFM_NO_THREADS AFM_NO_MMAP"; fi

section "engine tests, AddressSanitizer + UndefinedBehaviorSanitizer"
if gcc -std=c99 -O1 $DBG -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
       tests/test_main.c -o build/test_main_san $LIBS; then
    run_counts "test_main asan+ubsan" env AFM_TEST_LIGHT=1 build/test_main_san
else bad "build test_main with sanitizers"; fi

section "hostile inputs: a regression test per defect (tests/test_hostile.c), optimised and sanitized"
if gcc -std=c99 -O2 $DBG tests/test_hostile.c -o build/test_hostile $LIBS; then run_counts "test_hostile -O2" build/test_hostile
else bad "build test_hostile"; fi
if gcc -std=c99 -O1 $DBG -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
       tests/test_hostile.c -o build/test_hostile_san $LIBS; then
    run_counts "test_hostile asan+ubsan" build/test_hostile_san
else bad "build test_hostile with sanitizers"; fi

section "constraints: masks against a brute-force oracle, compilers' errors, fast-forward (tests/test_constrain.c)"
if gcc -std=c99 $WARN -O2 tests/test_constrain.c -o build/test_constrain $LIBS; then run_counts "test_constrain -O2" build/test_constrain
else bad "build test_constrain"; fi
if gcc -std=c99 $SAN tests/test_constrain.c -o build/test_constrain_san $LIBS; then
    run_counts "test_constrain asan+ubsan" build/test_constrain_san
else bad "build test_constrain with sanitizers"; fi
# the subtree summaries (by characters, word/bit pairs) on every subtree of the small vocabularies too
if gcc -std=c99 $SAN -DAFM__VOCAB_BIG=2 -DAFM__VOCAB_HUGE=4 tests/test_constrain.c -o build/test_constrain_sum $LIBS; then
    run_counts "test_constrain, summaries on subtrees of 2+ tokens, pairs on 4+ (asan+ubsan)" build/test_constrain_sum
else bad "build test_constrain with small summaries"; fi
# the fuzz corpus of the constraint compilers (tests/fuzz/fuzz_constrain.c) replayed under ASan/UBSan
if gcc -std=c99 $REPLAY_NK tests/fuzz/fuzz_constrain.c -o build/fuzz_constrain_replay $LIBS &&
   build/fuzz_constrain_replay tests/fuzz/corpus/constrain/* >/dev/null; then
    ok "constraint corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/constrain | wc -l) inputs)"
else bad "constraint corpus replay"; fi

section "tool calling: two tools (data, failure) with forced calls on models/mini, the transcript and a restored session (tests/test_toolcall.c)"
# test_toolcall and test_session use afm.h's public API only: they link one -O2 copy of the implementation
impl_obj afm_o2 $WARN -O2
if impl_ready afm_o2 && gcc -std=c99 $WARN -O2 -DAFM_IMPLEMENTATION_DONE tests/test_toolcall.c build/afm_o2.o -o build/test_toolcall $LIBS; then
    run_counts "test_toolcall -O2" build/test_toolcall
else bad "build test_toolcall"; fi
if gcc -std=c99 $SAN -DAFM_IMPLEMENTATION_DONE tests/test_toolcall.c build/afm_san.o -o build/test_toolcall_san $LIBS; then
    run_counts "test_toolcall asan+ubsan" build/test_toolcall_san
else bad "build test_toolcall with sanitizers"; fi
# the fuzz corpus of the tool-calling readers (tests/fuzz/fuzz_transcript.c) replayed under ASan/UBSan:
# each hostile tools array / transcript refused for its own reason
if gcc -std=c99 $REPLAY_NK tests/fuzz/fuzz_transcript.c -o build/fuzz_transcript_replay $LIBS &&
   build/fuzz_transcript_replay tests/fuzz/corpus/transcript/* > build/transcript_replay.log &&
   [ "$(grep -c '^accepted$' build/transcript_replay.log)" -eq 3 ] &&
   grep -q "tools\[0\]: tool 'f': parameters: json schema at /properties/when: unsupported keyword 'format'" build/transcript_replay.log &&
   grep -q "transcript: messages\[0\].tool_call.arguments: expected an object" build/transcript_replay.log &&
   grep -q "transcript: byte 140: nested too deeply" build/transcript_replay.log; then
    ok "tools/transcript corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/transcript | wc -l) inputs, 3 valid)"
else bad "tools/transcript corpus replay"; cat build/transcript_replay.log; fi

section "sampler additions: logit bias, penalties, stop strings, token counts (ASan/UBSan)"
if gcc -std=c99 $WARN $SAN -DAFM_IMPLEMENTATION_DONE tests/test_sampler.c build/afm_san.o -o build/test_sampler $LIBS; then
    run_counts "test_sampler asan+ubsan" build/test_sampler
else bad "build test_sampler"; fi

section "saved sessions: a state saved after a 500-token prompt, loaded in a new process"
if gcc -std=c99 $WARN -O2 -DAFM_IMPLEMENTATION_DONE tests/test_session.c build/afm_o2.o -o build/test_session $LIBS &&
   build/test_session save build/session.state build/session.logits > build/session_save.log 2>&1; then
    run_counts "session state: same logits in a new process, refusals" build/test_session load build/session.state build/session.logits
else bad "test_session save"; cat build/session_save.log; fi

section "CLI"
if make -s afm >/dev/null; then ok "make builds afm"; else bad "make"; fi
# the default drop-in is afm.h alone: simple.c (what the Makefile's `simple` builds) built in a
# folder holding nothing else answers a question
rm -rf build/solo && mkdir -p build/solo && cp afm.h build/solo/ && sed 's|"../afm.h"|"afm.h"|' examples/simple.c > build/solo/simple.c
if (cd build/solo && cc -std=c99 $WARN -O2 simple.c -o simple $LIBS) &&
   out=$(build/solo/simple models/mini/base.afm "Who created the heaven and the earth?" 2>&1) && [ -n "$out" ]; then
    ok "afm.h alone (no afm_tokenizer.h) builds examples/simple.c, which answers from text: '$(echo "$out" | head -n 1 | head -c 50)...'"
else bad "simple.c with afm.h alone: $out"; fi
if ./afm --help | grep -q -- "--dump-logits"; then ok "afm --help"; else bad "afm --help"; fi
if ./afm -m tests/vectors/does-not-exist.afm --ids 1 2>&1 | grep -q "does-not-exist"; then ok "afm names a missing file"; else bad "afm missing file message"; fi

section "CLI with text: the trained model in models/mini (embedded SentencePiece tokenizer)"
M=models/mini/base.afm
T="In the beginning God created the heaven
and the earth. Ünïcödé, 日本語 and 🙂!"
ids=$(./afm tokenize -m $M "$T")
if [ -n "$ids" ] && [ "$(./afm detokenize -m $M $ids)" = "$T" ]; then ok "tokenize -> detokenize gives the text back ($(echo $ids | wc -w) tokens)"
else bad "tokenize -> detokenize round trip: '$ids'"; fi
if [ "$(printf '%s' "$T" | ./afm tokenize -m $M -f -)" = "$ids" ] &&
   [ "$(./afm tokenize --tokenizer models/mini/tokenizer.model -p "$T")" = "$ids" ] &&
   [ "$(echo "$ids" | ./afm detokenize --tokenizer models/mini/tokenizer.model -f -)" = "$T" ]; then
    ok "tokenize from stdin and with --tokenizer tokenizer.model give the same ids"
else bad "tokenize -f - / --tokenizer"; fi
# docs/MODEL.md section 7.4: EOS, then the rendered template without its first token (ids from sentencepiece)
chat_ids="3 5 1033 4 8134 1332 8103 385 1481 269 1486 298 269 7844 1193 451 546 8115 6 5 1486 4 8165 8104 6 5 1193 451 546 4"
rendered="<turn_start> system<n>A conversation between a user and a helpful assistant.<turn_end><turn_start> user<n>Hi<turn_end><turn_start> assistant<n>"
if [ "$(./afm tokenize -m $M --chat Hi)" = "$chat_ids" ] &&
   ./afm -m $M --chat -p Hi -n 1 --show-prompt 2>&1 >/dev/null | grep -qF "$rendered" &&
   ./afm -m $M --chat -p Hi -n 1 --show-prompt 2>&1 >/dev/null | grep -qF "prompt ids (30): $chat_ids"; then
    ok "chat prompt: rendered template and ids (tokenize --chat, --show-prompt)"
else bad "chat prompt render"; fi
out=$(./afm -m $M --adapter models/mini/json.afma --chat -p "Describe as JSON: Blessed are the meek: for they shall inherit the earth." -n 40 2>/dev/null)
if [ "$out" = '{"first": "Blessed", "last": "earth", "words": 10}' ]; then ok "chat with the JSON adapter: $out"
else bad "chat with the JSON adapter: '$out'"; fi
out=$(./afm -m $M -p "In the beginning" -n 24 2>/dev/null)
case "$out" in "In the beginning "?*) ok "text prompt: '$(echo "$out" | head -c 60)...'" ;; *) bad "text prompt: '$out'" ;; esac
# fails_with TEXT COMMAND...: the command exits with status 1 and says TEXT
fails_with() { want=$1; shift; "$@" > build/cli.out 2>&1; [ $? -eq 1 ] && grep -qF -- "$want" build/cli.out; }
head -c 1000 models/mini/tokenizer.model > build/truncated.model
if fails_with "build/truncated.model: not a usable SentencePiece model" ./afm tokenize --tokenizer build/truncated.model hi &&
   fails_with "README.md: not a usable SentencePiece model" ./afm -m $M --tokenizer README.md -p hi &&
   fails_with "tests/vectors/lora/adapter.afma: not a usable" ./afm tokenize --tokenizer tests/vectors/lora/adapter.afma hi &&
   fails_with "has no tokenizer" ./afm -m tests/vectors/afm_mini.afm -p hi &&
   fails_with "out of range" ./afm detokenize -m $M 8192; then
    ok "bad tokenizer files, a model without tokenizer, an id out of range: a clear message and exit status 1"
else bad "CLI error handling"; cat build/cli.out; fi
# every error is exit status 1: a context that fills up, -c above the training context, non-finite logits, a FIFO
rm -f build/cli.fifo && mkfifo build/cli.fifo 2>/dev/null
if fails_with "context full" ./afm -m $M -p "In the beginning God" -c 6 -n 4 &&
   fails_with "context full" ./afm -m $M --ids 3,100,200 -c 5 -n 4 --lookup &&
   fails_with "above the model's training context of 1024" ./afm -m $M --ids 3 -c 1025 &&
   fails_with "not finite" ./afm -m tests/vectors/hostile/sampler_nan_logits.afm --ids 1,2 -n 6 --temp 0.8 &&
   fails_with "not finite" ./afm -m tests/vectors/hostile/sampler_nan_logits.afm --ids 1,2 -n 6 --dump-logits build/nan.f32 &&
   fails_with "not a regular file" timeout 20 ./afm info build/cli.fifo &&
   fails_with "not a regular file" timeout 20 ./afm -m build/cli.fifo -p hi &&
   fails_with "not a regular file" timeout 20 ./afm -m $M --adapter build/cli.fifo -p hi &&
   [ "$(./afm -m $M --ids 3,100,200 -n 6 --temp 1e-40 2>/dev/null)" = "$(./afm -m $M --ids 3,100,200 -n 6 2>/dev/null)" ]; then
    ok "exit status 1 with a message: context full, -c 1025, NaN logits, FIFOs; --temp 1e-40 is greedy"
else bad "CLI exit status on errors"; cat build/cli.out; fi
rm -f build/cli.fifo
# seeded sampling gives the same text with --lookup and --draft, run after run, under load (two runs at once)
ref=$(./afm -m $M -p "In the beginning God created the heaven and the earth. And the earth" -n 48 --temp 0.8 -s 42 2>/dev/null)
same=1
for i in 1 2 3 4 5; do
    ./afm -m $M -p "In the beginning God created the heaven and the earth. And the earth" -n 48 --temp 0.8 -s 42 --lookup -t 2 > build/seed_a.txt 2>/dev/null &
    seed_a=$!
    b=$(./afm -m $M -p "In the beginning God created the heaven and the earth. And the earth" -n 48 --temp 0.8 -s 42 --draft models/mini/draft.afm 2>/dev/null)
    wait $seed_a # that run only: a bare `wait` would also wait for the second lane
    [ "$(cat build/seed_a.txt)" = "$ref" ] && [ "$b" = "$ref" ] || same=0
done
if [ $same = 1 ]; then ok "--temp 0.8 -s 42: the same text plain, with --lookup and with --draft, 5 runs each under load"
else bad "seeded sampling differs with --lookup / --draft"; fi
if ./afm --help | grep -q -- "--show-prompt" && ./afm --help | grep -q "afm detokenize"; then ok "afm --help covers text prompts"
else bad "afm --help: text options missing"; fi
rm -f build/pc.state
P="In the beginning God created the heaven and the earth"
want=$(./afm -m $M -p "$P" -n 16 2>/dev/null)
if [ "$(./afm -m $M -p "$P" -n 16 --prompt-cache build/pc.state 2>build/pc1.err)" = "$want" ] &&
   [ "$(./afm -m $M -p "$P" -n 16 --prompt-cache build/pc.state 2>build/pc2.err)" = "$want" ] &&
   grep -q "0 of 11 prompt tokens reused" build/pc1.err && grep -q "11 of 11 prompt tokens reused" build/pc2.err &&
   [ "$(./afm -m $M -p "$P, and" -n 16 --prompt-cache build/pc.state 2>build/pc3.err)" = "$(./afm -m $M -p "$P, and" -n 16 2>/dev/null)" ] &&
   grep -q "11 of 13 prompt tokens reused" build/pc3.err &&
   fails_with "the state was made without an adapter, but this session uses adapter 'json.afma'" \
       ./afm -m $M --adapter models/mini/json.afma -p "$P" --prompt-cache build/pc.state &&
   fails_with "the state was made with another model" ./afm -m models/mini/draft.afm -p "$P" --prompt-cache build/pc.state; then
    ok "--prompt-cache: same output cold, warm and extended (11 of 13 tokens reused); another adapter or model refused"
else bad "--prompt-cache"; cat build/pc*.err build/cli.out; fi
out=$(./afm -m $M -p "$P" -n 30 --stop-string "Moses" --stop-string "never appears" 2>/dev/null)
full=$(./afm -m $M -p "$P" -n 30 2>/dev/null)
case "$full" in "$out"Moses*) stopped=1 ;; *) stopped=0 ;; esac
if [ $stopped = 1 ] && [ -n "$out" ] && ! echo "$out" | grep -q Moses &&
   [ "$(./afm -m $M -p "$P" -n 30 --frequency-penalty 1 --repeat-last-n -1 2>/dev/null)" != "$full" ] &&
   fails_with "cannot create the sampler" ./afm -m $M -p "$P" -l 8192+1; then
    ok "--stop-string ends the text just before it; --frequency-penalty changes the output; a bias id out of range is refused"
else bad "CLI sampler additions: '$out'"; cat build/cli.out; fi
run_counts "greedy outputs on models/mini against PyTorch, from ids and from text (tests/gen/mini_greedy.py)" python3 tests/gen/mini_greedy.py check

section "CLI tool calling: --tools, --tool-exec, --tool-mode, --transcript on models/mini"
rm -f build/cli_transcript.json
if ./afm -m $M -p "Weather in Paris?" --tools tests/toolcall/tools.json --tool-exec tests/toolcall/tool.sh --tool-mode required \
       --transcript build/cli_transcript.json -n 60 --temp 1 --seed 3 > build/cli_tools.out 2> build/cli_tools.err &&
   grep -qE '^call: (get_weather|cancel_order) \{' build/cli_tools.err &&
   grep -qE '^(get_weather returned: \{"sky":"clear","celsius":21\}|cancel_order failed: order database offline)$' build/cli_tools.err &&
   ./afm -m $M -p "Cancel B123" --tool-exec tests/toolcall/tool.sh --tool-mode required --tool-rounds 1 \
       --transcript build/cli_transcript.json -n 60 > build/cli_tools.out 2> build/cli_tools.err &&
   grep -q "stopped at the round limit" build/cli_tools.err &&
   [ "$(grep -c '"role":"tool"' build/cli_transcript.json)" -eq 2 ] &&
   fails_with "declares its tools already" ./afm -m $M -p x --tools tests/toolcall/tools.json --transcript build/cli_transcript.json &&
   fails_with "need --tools or --transcript" ./afm -m $M -p x --tool-mode none &&
   printf '[{"name":"x","parameters":{"properties":{"d":{"type":"string","format":"date"}}}}]' > build/bad_tools.json &&
   fails_with "build/bad_tools.json: tools[0]: tool 'x': parameters: json schema at /properties/d: unsupported keyword 'format'" \
       ./afm -m $M -p x --tools build/bad_tools.json; then
    ok "afm --tools/--tool-exec: a forced call run by a shell command, its output fed back, the transcript continued; bad tools named"
else bad "afm tool calling"; cat build/cli_tools.err build/cli.out; fi

section "guided generation on the shipped model: outputs checked by the jsonschema package"
if python3 -c "import jsonschema" 2>/dev/null; then
    # 24 schemas x 3 sampled generations at temperature 1.0 (tests/check_constrain.py --runs 20 is the full check)
    if python3 tests/check_constrain.py --runs 3 > build/check_constrain.log 2>&1; then ok "guided generation: $(tail -n 1 build/check_constrain.log) (24 schemas x 3 samples, jsonschema)"
    else bad "guided generation (build/check_constrain.log)"; grep FAIL build/check_constrain.log | head -n 5; fi
    out=$(./afm -m models/mini/base.afm --chat -p "A date" -n 40 --temp 1 --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}' 2>/dev/null)
    if echo "$out" | grep -qE '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'; then ok "afm --regex: '$out'"; else bad "afm --regex: '$out'"; fi
    printf 'root ::= "yes" | "no" | "maybe"\n' > build/yn.gbnf
    out=$(./afm -m models/mini/base.afm --chat -p "Is it?" -n 10 --temp 1 --seed 2 --grammar build/yn.gbnf 2>/dev/null)
    if echo "$out" | grep -qE '^(yes|no|maybe)$'; then ok "afm --grammar: '$out'"; else bad "afm --grammar: '$out'"; fi
    if ./afm -m models/mini/base.afm --chat -p x --regex '(?=a)' 2>&1 | grep -q "lookaround"; then ok "afm --regex names a bad pattern's problem"
    else bad "afm --regex error message"; fi
    # the schema shown to the model (default), replaced (--schema-prompt) or left out (--no-schema-prompt)
    sp=$(./afm -m models/mini/base.afm --chat -p "A person" -n 1 --json-schema tests/constrain/person.json --show-prompt 2>&1 >/dev/null)
    sp2=$(./afm -m models/mini/base.afm --chat -p "A person" -n 1 --json-schema tests/constrain/person.json --schema-prompt "Answer in JSON." --show-prompt 2>&1 >/dev/null)
    sp3=$(./afm -m models/mini/base.afm --chat -p "A person" -n 1 --json-schema tests/constrain/person.json --no-schema-prompt --show-prompt 2>&1 >/dev/null)
    if echo "$sp" | grep -q 'follows this JSON schema:' && echo "$sp" | grep -q '^{"type":"object","properties":{"name":' &&
       echo "$sp2" | grep -q '^Answer in JSON.<turn_end>' && ! echo "$sp2" | grep -q 'JSON schema:' &&
       ! echo "$sp3" | grep -q 'JSON' && echo "$sp3" | grep -q 'A person<turn_end>'; then
        ok "afm --json-schema shows the schema in the prompt; --schema-prompt replaces it, --no-schema-prompt leaves it out"
    else bad "schema prompt: '$sp' '$sp2' '$sp3'"; fi
    # afm bench --grammar on the shipped model: a compile time, mask times and both decode speeds per schema
    if ./afm bench models/mini/base.afm --grammar -w 2 -n 8 -t 1 tests/constrain/person.json tests/constrain/nullable.json > build/bench_grammar.log 2>&1 &&
       grep -qE '^person.json +[0-9.]+ ms +[0-9.]+ us +[0-9.]+ us +[0-9]+ +2/2 +[0-9.]+ +[0-9.]+$' build/bench_grammar.log &&
       grep -q '^all schemas: mask median' build/bench_grammar.log; then ok "afm bench --grammar: $(tail -n 1 build/bench_grammar.log)"
    else bad "afm bench --grammar (build/bench_grammar.log)"; cat build/bench_grammar.log; fi
elif [ "$CI" = true ]; then bad "python3 -m pip install jsonschema (guided generation check)"
else skip "guided generation check" "python3 -m pip install jsonschema"; fi
# afm bench --spec on the shipped model: the cost table for 1..16 tokens, then a row per p, each run's
# tokens checked by the bench against plain greedy decoding (it exits non-zero if they differ)
if ./afm bench models/mini/base.afm --spec -t 2 -p 16 -n 16 -r 2 > build/bench_spec.log 2>&1 &&
   [ "$(grep -cE '^ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$' build/bench_spec.log)" = 16 ] &&
   [ "$(grep -cE '^ +[01][.][0-9]+ +[0-9.]+% +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x +[0-9.]+-[0-9.]+x$' build/bench_spec.log)" = 6 ]; then
    ok "afm bench --spec: 16 verification costs, 6 speculative runs identical to plain greedy"
else bad "afm bench --spec (build/bench_spec.log)"; cat build/bench_spec.log; fi

section "server: examples/server.c with the real openai client, then 200 requests from 16 clients under ASan"
if make -s afm-server >/dev/null; then
    if ./afm-server --help | grep -q -- "--adapter NAME=PATH" && ./afm --help | grep -q -- "--prompt-cache" &&
       fails_with "adapter x: README.md: offset 0: bad magic" ./afm-server -m models/mini/base.afm --adapter x=README.md --port 0 &&
       fails_with "is the base model's name" ./afm-server -m models/mini/base.afm --adapter base=models/mini/json.afma; then
        ok "afm-server --help; a bad adapter file or name: a clear message and exit status 1"
    else bad "afm-server --help / startup errors"; cat build/cli.out; fi
    if python3 -c "import openai" 2>/dev/null; then
        run_counts "afm-server with the openai client (tests/test_server.py)" python3 tests/test_server.py ./afm-server ./afm
        if gcc -std=c99 -O1 $DBG -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
               examples/server.c -o build/afm-server-san $LIBS; then
            run_counts "load test, server under ASan/UBSan (tests/load_server.py)" python3 tests/load_server.py build/afm-server-san 200 16
        else bad "build afm-server with sanitizers"; fi
    else skip "server tests" "python3 -m pip install openai"; fi
else bad "make afm-server"; fi

section "Python bindings: make lib; a fresh venv, pip install ./python, the README's example; pytest"
if make -s lib >/dev/null && [ -f libafm.so ]; then ok "make lib builds libafm.so"; else bad "make lib"; fi
rm -rf build/pyvenv
if python3 -m venv --system-site-packages build/pyvenv 2>/dev/null; then
    # the one install command (it compiles afm.h into the package); offline, without build isolation
    if build/pyvenv/bin/pip install -q ./python > build/pip.log 2>&1 ||
       build/pyvenv/bin/pip install -q --no-build-isolation ./python >> build/pip.log 2>&1; then
        sed -n '/^```python/,/^```/p' python/README.md | sed '1d;$d' > build/readme_example.py
        out=$(build/pyvenv/bin/python build/readme_example.py 2>&1)
        if [ $? -eq 0 ] && echo "$out" | grep -q "king's house" && echo "$out" | grep -qF '{"first": "Jesus", "last": "wept", "words": 4}'; then
            ok "pip install ./python in a fresh venv; the README's $(wc -l < build/readme_example.py)-line example prints text"
        else bad "python/README.md example: $out"; fi
        if build/pyvenv/bin/python -c "import pytest" 2>/dev/null; then
            # pytest's summary ("1 failed, 6 passed in 2.2s") as the "N passed, N failed" line run_counts reads
            run_counts "pytest python/tests" sh -c 'out=$(build/pyvenv/bin/python -m pytest -q -p no:cacheprovider python/tests 2>&1)
                echo "$out" | tail -n 30; last=$(echo "$out" | tail -n 1)
                echo "$(echo "$last" | grep -o "[0-9]* passed" | cut -d" " -f1 || true) passed, $(echo "$last" | grep -o "[0-9]* failed" | cut -d" " -f1 || true) failed" |
                sed -e "s/^ passed/0 passed/" -e "s/,  failed/, 0 failed/"'
        else skip "pytest of the bindings" "python3 -m pip install pytest"; fi
    else bad "pip install ./python"; tail -n 20 build/pip.log; fi
else skip "Python bindings" "python3 -m venv (apt-get install python3-venv)"; fi
rm -rf python/build python/*.egg-info

section "kernel levels: the same bits on every level, thread count, batch size and machine (tests/levels.sh)"
run_counts "kernel levels, byte-identical logits and the recorded ones" sh tests/levels.sh ./afm

section "tools: synthetic full-size models and exact parameter counts (afm info)"
if python3 -c "import numpy" 2>/dev/null; then
    if python3 tools/synth.py --preset base --lora --zeros --type bf16 -q -o build/base_zeros.afm &&
       python3 tools/synth.py --preset draft --zeros --type f16 -q -o build/draft_zeros.afm; then
        ./afm info build/base_zeros.afm > build/info_base.txt 2>&1
        ./afm info build/draft_zeros.afm > build/info_draft.txt 2>&1
        if grep -q "base total *3,111,368,064" build/info_base.txt && grep -q "LoRA *66,633,728" build/info_base.txt &&
           grep -q "base + LoRA *3,178,001,792" build/info_base.txt; then
            ok "afm info on the full-size base: 3,111,368,064 + LoRA 66,633,728 = 3,178,001,792"
        else bad "afm info on the full-size base"; cat build/info_base.txt; fi
        if grep -q "base total *48,765,952" build/info_draft.txt; then ok "afm info on the full-size draft: 48,765,952"
        else bad "afm info on the full-size draft"; cat build/info_draft.txt; fi
    else bad "tools/synth.py full-size shapes"; fi
    rm -f build/base_zeros.afm build/draft_zeros.afm
    # resource amplification: an 8 MB file with 1024 heads x 1024 on a model dimension of 1 took 1.1 GB
    # for a few tokens; the session's scratch now stays within max(64 MiB, the file's size)
    if python3 tools/synth.py --vocab 2 --dim 1 --layers 1 --reuse 0 --heads 1024 --kv-heads 1024 --head-dim 1024 --ffn 1 \
           --context 16777216 --type f16 -q -o build/wide.afm && [ -x /usr/bin/time ]; then
        /usr/bin/time -v ./afm -m build/wide.afm --ids 1,0,1,0,1,0,1,0 -n 4 > build/wide.log 2>&1
        rss=$(grep "Maximum resident" build/wide.log | grep -o '[0-9]*$')
        if [ -n "$rss" ] && [ "$rss" -lt 300000 ]; then ok "a wide 8 MB model (1024 x 1024 heads, dim 1) runs in $((rss / 1024)) MB (was 1.1 GB)"
        else bad "wide model RSS: ${rss:-?} KB"; cat build/wide.log; fi
    else skip "wide-model RSS check" "/usr/bin/time (GNU time)"; fi
    rm -f build/wide.afm
    # converter, reader and writer checks; the committed fixtures must reconvert byte for byte
    run_counts "tools (converter, writer, reader)" python3 tests/test_tools.py
    if python3 tests/gen/quantize.py --selftest > build/quant.log 2>&1; then ok "quantizer self-test: $(tail -n 1 build/quant.log)"
    else bad "tests/gen/quantize.py --selftest"; tail -n 20 build/quant.log; fi
    if python3 tests/gen/make_quant_vectors.py --check | grep -q identical; then ok "quantized fixtures regenerate byte for byte (on-grid weights decode exactly)"
    else bad "tests/gen/make_quant_vectors.py --check"; fi
else skip "tool tests" "python3 -m pip install numpy"; fi

wait $LANE_B
cat build/lane_b.log
if read -r lp lf ls < build/lane_b.counts; then PASS=$((PASS + lp)); FAIL=$((FAIL + lf)); SKIP=$((SKIP + ls))
else bad "the second lane (warnings, arm64, fuzz) did not finish: build/lane_b.log"; fi

if [ "$SKIP" -gt 0 ]; then echo "($SKIP steps skipped: tools missing on this machine)"; fi
cpu_mark; echo "(suite time $(( $(date +%s) - T0 )) s, cpu $(cpu_s) s in both lanes)"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
