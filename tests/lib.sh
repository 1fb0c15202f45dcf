# Shared by tests/run.sh and tests/run_tokenizer.sh (sourced after `cd` to the repository root):
# the counters, the ok/bad/skip/have helpers and run_counts. CI=true turns skips into failures.
mkdir -p build
PASS=0; FAIL=0; SKIP=0
LIBS="-lm -lpthread"
WARN="-Wall -Wextra -Wpedantic -Werror"
# debug info of the test builds: line tables only (-g1), which is what sanitizer reports and backtraces
# print (function, file:line); full -g made each sanitized compile of afm.h ~50% slower (48 s against
# 31 s) and does not change the code generated
DBG="-g1"

ok()   { PASS=$((PASS + 1)); echo "ok   $1"; }
bad()  { FAIL=$((FAIL + 1)); echo "FAIL $1"; }
skip() { if [ "$CI" = "true" ]; then bad "$1 (required in CI: $2)"; else SKIP=$((SKIP + 1)); echo "skip $1 ($2)"; fi; }
have() { command -v "$1" >/dev/null 2>&1; }

# Runs a test program (optionally through a wrapper such as qemu) and adds the counts of its last
# "N passed, N failed" line; a non-zero exit with no failures counted is a failure too.
run_counts() {
    label=$1; shift
    out=$("$@" 2>&1); status=$?
    echo "$out" | grep -a -v -e '^ok ' -e 'records, ok$' | sed 's/^/    /' | tail -n 40
    line=$(echo "$out" | grep -a -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then bad "$label: no result line (exit $status)"; return; fi
    p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed*}
    PASS=$((PASS + p)); FAIL=$((FAIL + f))
    if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then bad "$label: exit status $status"; fi
    echo "---- $label: $p passed, $f failed"
}

# section TITLE: a step's banner with the seconds since the run began and the CPU seconds (user + system)
# of the commands this shell has run so far, so slow steps show up in CI logs (the suite should stay
# under 20 minutes on a 2-core machine; the two lanes of tests/run.sh are balanced by CPU time).
# LANE names the shell's file for `times` (a subshell's $$ is its parent's).
T0=${T0:-$(date +%s)}
# cpu_mark writes them (`times` in this shell: inside $(...) it would count the subshell's own
# commands only), cpu_s prints them
cpu_mark() { times > build/times.${LANE:-main}; }
cpu_s() { awk 'NR == 2 { split($1, u, "m"); split($2, s, "m"); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' build/times.${LANE:-main}; }
section() { cpu_mark; echo "== $* ($(( $(date +%s) - T0 )) s, cpu $(cpu_s) s)"; }
