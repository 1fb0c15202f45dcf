#!/bin/sh
# The test runner behind `make test`. Each step adds its counts; the last line is
# "N passed, N failed" and the exit status is non-zero on any failure.
# Environment: CI=true makes missing tools (clang, aarch64 cross compiler, qemu, numpy, regex)
# failures instead of skips; FUZZ_SECONDS bounds the libFuzzer run of each engine harness (default 30),
# TOK_FUZZ_SECONDS that of each tokenizer harness (default 15).
cd "$(dirname "$0")/.." || exit 1
. tests/lib.sh

echo "== warnings: -Wall -Wextra -Wpedantic as C99 and C++, gcc and clang"
for cc in "gcc -std=c99" "clang -std=c99" "g++ -x c++" "clang++ -x c++"; do
    set -- $cc
    if ! have "$1"; then skip "warnings with $cc" "$1 not installed"; continue; fi
    # afm.h's implementation optimised once per compiler (flow-based warnings need -O2); the other
    # files that include it only for their own code (each compile of the implementation with every
    # kernel takes ~15 s)
    if $cc $WARN -O2 -c examples/afm.c -o build/w.o && $cc $WARN -fsyntax-only examples/afm_bench.c &&
       $cc $WARN -fsyntax-only examples/simple.c &&
       $cc $WARN -fsyntax-only tests/test_main.c && $cc $WARN -fsyntax-only tests/test_kernels.c &&
       $cc $WARN -fsyntax-only tests/fuzz/fuzz_load.c && $cc $WARN -fsyntax-only tests/fuzz/fuzz_fmadapter.c; then
        ok "warning-free with $cc"
    else bad "warnings with $cc"; fi
done

echo "== tokenizer: tests/run_tokenizer.sh (warnings, reference vectors, sanitizers, fuzzing, Unicode tables)"
run_counts "tokenizer" env FUZZ_SECONDS="${TOK_FUZZ_SECONDS:-15}" sh tests/run_tokenizer.sh

echo "== engine tests, optimised"
if gcc -std=c99 -O2 -g tests/test_main.c -o build/test_main $LIBS; then run_counts "test_main -O2" build/test_main
else bad "build test_main"; fi

echo "== kernels: every SIMD kernel against the scalar reference (ragged shapes)"
if gcc -std=c99 $WARN -O2 tests/test_kernels.c -o build/test_kernels $LIBS; then run_counts "test_kernels -O2" build/test_kernels
else bad "build test_kernels"; fi
if gcc -std=c99 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined tests/test_kernels.c -o build/test_kernels_san $LIBS; then
    run_counts "test_kernels asan+ubsan" build/test_kernels_san
else bad "build test_kernels with sanitizers"; fi

echo "== engine tests, built with AFM_NO_THREADS AFM_NO_MMAP (portable fallbacks)"
if gcc -std=c99 $WARN -O2 -DAFM_NO_THREADS -DAFM_NO_MMAP tests/test_main.c -o build/test_main_nothreads -lm; then
    run_counts "test_main no threads, no mmap" build/test_main_nothreads
else bad "build with AFM_NO_THREADS AFM_NO_MMAP"; fi

echo "== engine tests, AddressSanitizer + UndefinedBehaviorSanitizer"
if gcc -std=c99 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
       tests/test_main.c -o build/test_main_san $LIBS; then
    run_counts "test_main asan+ubsan" env AFM_TEST_LIGHT=1 build/test_main_san
else bad "build test_main with sanitizers"; fi

echo "== CLI"
if make -s afm simple >/dev/null; then ok "make builds afm and simple"; else bad "make"; fi
# the default drop-in is afm.h alone: simple.c built in a folder holding nothing else answers a question
rm -rf build/solo && mkdir -p build/solo && cp afm.h build/solo/ && sed 's|"../afm.h"|"afm.h"|' examples/simple.c > build/solo/simple.c
if (cd build/solo && cc -std=c99 $WARN -O2 simple.c -o simple $LIBS) &&
   out=$(build/solo/simple models/mini/base.afm "Who created the heaven and the earth?" 2>&1) && [ -n "$out" ]; then
    ok "afm.h alone (no afm_tokenizer.h) builds examples/simple.c, which answers from text: '$(echo "$out" | head -n 1 | head -c 50)...'"
else bad "simple.c with afm.h alone: $out"; fi
if ./afm --help | grep -q -- "--dump-logits"; then ok "afm --help"; else bad "afm --help"; fi
if ./afm -m tests/vectors/does-not-exist.afm --ids 1 2>&1 | grep -q "does-not-exist"; then ok "afm names a missing file"; else bad "afm missing file message"; fi

echo "== CLI with text: the trained model in models/mini (embedded SentencePiece tokenizer)"
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
# AFM_SPEC 7: EOS, then the rendered template without its first token (ids from sentencepiece)
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
if ./afm --help | grep -q -- "--show-prompt" && ./afm --help | grep -q "afm detokenize"; then ok "afm --help covers text prompts"
else bad "afm --help: text options missing"; fi
run_counts "greedy outputs on models/mini against PyTorch, from ids and from text (tools/mini_greedy.py)" python3 tools/mini_greedy.py check

echo "== kernel levels: the same bits on every level, thread count, batch size and machine (tests/levels.sh)"
run_counts "kernel levels, byte-identical logits and the recorded ones" sh tests/levels.sh ./afm
# a build that lets the compiler fuse every a*b+c it can (GNU mode, -O3, this CPU's FMA): same record
if gcc -std=gnu99 -O3 -march=native -ffp-contract=fast -o build/afm_fused examples/afm.c examples/afm_bench.c $LIBS; then
    run_counts "kernel levels, gcc -O3 -march=native -ffp-contract=fast" sh tests/levels.sh build/afm_fused
else bad "build afm with -ffp-contract=fast"; fi

echo "== tools: synthetic full-size models and exact parameter counts (afm info)"
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
    # converter, reader and writer checks; the committed fixtures must reconvert byte for byte
    run_counts "tools (converter, writer, reader)" python3 tests/test_tools.py
    if python3 tools/quantize.py --selftest > build/quant.log 2>&1; then ok "quantizer self-test: $(tail -n 1 build/quant.log)"
    else bad "tools/quantize.py --selftest"; tail -n 20 build/quant.log; fi
    if python3 tools/make_quant_vectors.py --check | grep -q identical; then ok "quantized fixtures regenerate byte for byte (on-grid weights decode exactly)"
    else bad "tools/make_quant_vectors.py --check"; fi
else skip "tool tests" "python3 -m pip install numpy"; fi

echo "== arm64 build under qemu"
if have aarch64-linux-gnu-gcc && have qemu-aarch64; then
    if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static tests/test_main.c -o build/test_main_arm64 $LIBS; then
        run_counts "test_main arm64 (qemu)" env AFM_TEST_LIGHT=1 qemu-aarch64 build/test_main_arm64
    else bad "aarch64 cross build"; fi
    if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static tests/test_tokenizer.c -o build/test_tokenizer_arm64 $LIBS; then
        run_counts "test_tokenizer arm64, unsigned char (qemu)" qemu-aarch64 build/test_tokenizer_arm64
    else bad "aarch64 cross build of test_tokenizer"; fi
    if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static tests/test_kernels.c -o build/test_kernels_neon $LIBS; then
        run_counts "test_kernels NEON (qemu)" qemu-aarch64 build/test_kernels_neon
    else bad "aarch64 cross build of test_kernels"; fi
    if aarch64-linux-gnu-gcc -std=c99 $WARN -O2 -static -march=armv8.2-a+dotprod tests/test_kernels.c -o build/test_kernels_dot $LIBS; then
        run_counts "test_kernels NEON dotprod (qemu)" qemu-aarch64 -cpu max build/test_kernels_dot
    else bad "aarch64 cross build of test_kernels with dotprod"; fi
    # the CLI on arm64 (GNU mode: gcc fuses multiply-adds there by default): scalar, NEON and NEON
    # dot product give the logits recorded on x86
    if aarch64-linux-gnu-gcc -std=gnu99 -O2 -static -march=armv8.2-a+dotprod examples/afm.c examples/afm_bench.c -o build/afm_arm64 $LIBS; then
        run_counts "kernel levels arm64 (qemu)" sh tests/levels.sh build/afm_arm64 qemu-aarch64 -cpu max
    else bad "aarch64 cross build of the CLI"; fi
else skip "arm64 tests" "apt-get install gcc-aarch64-linux-gnu qemu-user"; fi

echo "== fuzz: replay the hostile corpora, then a bounded libFuzzer run of each harness"
SAN="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -DAFM_FUZZ_MAIN"
if gcc -std=c99 $SAN tests/fuzz/fuzz_load.c -o build/fuzz_replay $LIBS && build/fuzz_replay tests/fuzz/corpus/load/* >/dev/null; then
    ok "model-file corpus replays clean under ASan/UBSan ($(ls tests/fuzz/corpus/load | wc -l) inputs)"
else bad "model-file corpus replay"; fi
if gcc -std=c99 $SAN tests/fuzz/fuzz_fmadapter.c -o build/fuzz_fm_replay $LIBS &&
   build/fuzz_fm_replay tests/fuzz/corpus/fmadapter/*/ tests/fuzz/corpus/fmadapter_packed/* >/dev/null; then
    ok ".fmadapter corpus replays clean under ASan/UBSan ($(ls -d tests/fuzz/corpus/fmadapter/*/ | wc -l) packages)"
else bad ".fmadapter corpus replay"; fi
if have clang && clang -fsanitize=fuzzer -x c /dev/null -o /dev/null 2>/dev/null ||
   (echo 'int LLVMFuzzerTestOneInput(const char*d,long n){(void)d;(void)n;return 0;}' > build/f.c &&
    clang -fsanitize=fuzzer build/f.c -o build/f 2>/dev/null); then
    if make -s fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-30}" > build/fuzz.log 2>&1; then ok "libFuzzer, ${FUZZ_SECONDS:-30} s per harness: $(grep -o 'Done [0-9]* runs' build/fuzz.log | tr '\n' ' ')"
    else bad "libFuzzer found a problem (build/fuzz.log)"; tail -n 30 build/fuzz.log; fi
else skip "libFuzzer run" "clang with libFuzzer (apt-get install clang libclang-rt-14-dev)"; fi

if [ "$SKIP" -gt 0 ]; then echo "($SKIP steps skipped: tools missing on this machine)"; fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
