#!/bin/sh
# The tokenizer's tests, in the style of tests/run.sh (which runs this script and adds its counts):
# warnings with gcc/clang as C99 and C++, the committed vectors and unit tests optimised, as C++ and
# under ASan/UBSan, the fuzz corpora replayed, a bounded libFuzzer run of each harness, and (when
# Python has `regex`) the code point by code point check of afm_tokenizer.h. Last line:
# "N passed, N failed".
# FUZZ_SECONDS bounds each libFuzzer run (default 20). CI=true turns missing tools into failures.
# The tokenizer needs no SIMD kernels, so the warning, C++, sanitizer and fuzz builds use AFM_NO_SIMD
# (clang instrumenting the kernels takes minutes per file) and the warning builds -O1 or syntax only:
# afm.h itself, tokenizer included, is checked at -O2 with its kernels by tests/run.sh, and
# test_tokenizer is also built as it ships (-O2, with warnings as errors).
cd "$(dirname "$0")/.." || exit 1
. tests/lib.sh

echo "== tokenizer: warnings as C99 and C++ (test, fuzz harnesses, bench)"
for cc in "gcc -std=c99" "clang -std=c99" "g++ -x c++" "clang++ -x c++"; do
    set -- $cc
    if ! have "$1"; then skip "tokenizer warnings with $cc" "$1 not installed"; continue; fi
    # test_tokenizer.c compiled (flow-based warnings need the optimiser) holds the same implementation,
    # tokenizer.json reader included, as the other three: their own code is checked without code generation
    if $cc $WARN -O1 -DAFM_NO_SIMD -c tests/test_tokenizer.c -o build/wt.o && $cc $WARN -DAFM_NO_SIMD -fsyntax-only tests/fuzz/fuzz_tok_load.c &&
       $cc $WARN -DAFM_NO_SIMD -fsyntax-only tests/fuzz/fuzz_tok_text.c && $cc $WARN -DAFM_NO_SIMD -fsyntax-only bench/bench_tokenizer.c; then
        ok "tokenizer sources warning-free with $cc"
    else bad "tokenizer warnings with $cc"; fi
done

echo "== tokenizer tests, optimised"
if gcc -std=c99 $WARN -O2 $DBG tests/test_tokenizer.c -o build/test_tokenizer $LIBS; then run_counts "test_tokenizer -O2" build/test_tokenizer
else bad "build test_tokenizer"; fi
if have g++ && g++ -x c++ -O1 -DAFM_NO_SIMD tests/test_tokenizer.c -o build/test_tokenizer_cpp $LIBS; then run_counts "test_tokenizer as C++" build/test_tokenizer_cpp
else skip "test_tokenizer as C++" "g++"; fi

echo "== tokenizer tests, AddressSanitizer + UndefinedBehaviorSanitizer"
if gcc -std=c99 -O1 $DBG -DAFM_NO_SIMD -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
       tests/test_tokenizer.c -o build/test_tokenizer_san $LIBS; then run_counts "test_tokenizer asan+ubsan" build/test_tokenizer_san
else bad "build test_tokenizer with sanitizers"; fi

echo "== tokenizer fuzz harnesses: the corpora replayed, then bounded libFuzzer runs (ASan/UBSan)"
if have clang && (echo 'int LLVMFuzzerTestOneInput(const char*d,long n){(void)d;(void)n;return 0;}' > build/f.c &&
                  clang -fsanitize=fuzzer build/f.c -o build/f 2>/dev/null); then
    for h in fuzz_tok_load fuzz_tok_text; do
        c=tests/fuzz/corpus/${h#fuzz_}
        mkdir -p build/corpus-$h
        if ! clang -std=c99 $DBG -O1 -DAFM_NO_SIMD -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined tests/fuzz/$h.c -o build/$h $LIBS; then
            bad "build $h"; continue
        fi
        if build/$h $c/* > build/$h.log 2>&1; then ok "$h corpus replays clean ($(ls $c | wc -l) inputs)"
        else bad "$h corpus replay (build/$h.log)"; tail -n 30 build/$h.log; fi
        if build/$h -artifact_prefix=build/ -max_total_time="${FUZZ_SECONDS:-20}" -max_len=65536 -timeout=20 -rss_limit_mb=2048 \
               build/corpus-$h $c > build/$h.log 2>&1; then
            ok "libFuzzer $h for ${FUZZ_SECONDS:-20} s: $(grep -o 'Done [0-9]* runs' build/$h.log)"
        else bad "libFuzzer $h found a problem (build/$h.log)"; tail -n 30 build/$h.log; fi
    done
else
    skip "tokenizer libFuzzer runs" "clang with libFuzzer (apt-get install clang libclang-rt-14-dev)"
    for h in fuzz_tok_load fuzz_tok_text; do # replay with gcc instead
        if gcc -std=c99 -O1 $DBG -DAFM_NO_SIMD -fsanitize=address,undefined -fno-sanitize-recover=undefined -DAFM_FUZZ_MAIN \
               tests/fuzz/$h.c -o build/${h}_replay $LIBS && build/${h}_replay tests/fuzz/corpus/${h#fuzz_}/* >/dev/null; then
            ok "$h corpus replays clean ($(ls tests/fuzz/corpus/${h#fuzz_} | wc -l) inputs)"
        else bad "$h corpus replay"; fi
    done
fi

echo "== Unicode tables against the regex module and unicodedata"
if python3 -c "import regex" 2>/dev/null; then
    if [ -x build/test_tokenizer ] && python3 tests/gen/check_unicode_tables.py build/test_tokenizer build/unicode > build/unicode.log 2>&1; then
        ok "afm_tokenizer.h matches regex/unicodedata code point by code point"; tail -n 8 build/unicode.log | sed 's/^/    /'
    else bad "Unicode tables (build/unicode.log)"; tail -n 20 build/unicode.log; fi
else skip "Unicode table check" "python3 -m pip install regex"; fi

if [ "$SKIP" -gt 0 ]; then echo "($SKIP tokenizer steps skipped: tools missing on this machine)"; fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
