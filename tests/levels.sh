#!/bin/sh
# tests/levels.sh [--record] AFM [WRAPPER ...]: the same logits, bit for bit, on every kernel level,
# thread count and batch size, and on every machine.
#
# For each model (the shipped base, base + JSON adapter and draft; the base with f16 and f32 KV caches;
# small synthetic models of every weight type, made by tools/synth.py when numpy is there) it runs
# `AFM --dump-logits` (prompt of 11 ids, then 8 greedy steps: prefill and decode) with every level
# `AFM info` lists, -t 1 and 2, -b 1 and 256, and compares the files byte for byte. The scalar run's
# MD5 must also equal the one recorded in tests/vectors/levels.md5: the record was made once by the
# scalar level and holds on any CPU (x86 with or without AVX-512, arm64), so a difference there means
# results now depend on the machine. --record rewrites that file (after a deliberate numeric change).
# WRAPPER runs AFM (e.g. qemu-aarch64 -cpu max). Prints "N passed, N failed".
cd "$(dirname "$0")/.." || exit 1
RECORD=0
if [ "$1" = "--record" ]; then RECORD=1; shift; fi
AFM=$1; shift
RUN="$* $AFM"
OUT=${LEVELS_OUT:-build/levels} # LEVELS_OUT: another folder, for a run beside this one
REC=tests/vectors/levels.md5
mkdir -p $OUT
PASS=0; FAIL=0
ok()  { PASS=$((PASS + 1)); echo "ok   $1"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL $1"; }
IDS=3,100,200,300,400,500,600,700,800,900,1000
# 150 ids: attention then spans two chunks of KV positions, merged (FORWARD PASS, attention); -t 3
# -b 1 gives decode steps more threads than KV-head groups (each chunk its own unit), -b 7 odd
# batches. Thread counts stay small: under qemu on 2 cores, more threads than cores crawl
LONG=$(seq -s, 10 52 7800)

levels=$($RUN info models/mini/base.afm | sed -n 's/^kernels: \([a-z0-9-]*\) (also: \(.*\)); .*/\1, \2/p' | tr -d ' ' | tr ',' ' ' | sed 's/none//')
[ -n "$levels" ] || { bad "cannot read the kernel levels from '$AFM info'"; echo "$PASS passed, $FAIL failed"; exit 1; }
echo "levels on this machine: $levels"

# name | model | options
cases="base|models/mini/base.afm|
json|models/mini/base.afm|--adapter models/mini/json.afma
draft|models/mini/draft.afm|
kvf16|models/mini/base.afm|--kv f16
kvf32|models/mini/base.afm|--kv f32
long|models/mini/base.afm|--tb 1-256,3-1,2-7 --ids $LONG
longf16|models/mini/base.afm|--kv f16 --tb 1-256,3-1 --ids $LONG"
if python3 -c "import numpy" 2>/dev/null; then
    # every weight type; odd widths (not multiples of 64) and group sizes exercise the ragged tails
    for ty in f32 f16 bf16 q2b q4 q8; do
        f=$OUT/synth_$ty.afm
        [ -f $f ] || python3 tools/synth.py --vocab 300 --dim 200 --layers 3 --reuse 1 --heads 4 --kv-heads 2 --head-dim 40 \
            --ffn 520 --type $ty --embd-type $ty --group 128 --random-codes --kv-scales --lora --lora-rank 8 --seed 7 -q -o $f
        cases="$cases
synth_$ty|$f|--adapter base --ids 3,100,200,250,7,9,11,13,17,19,23"
    done
else echo "note: numpy missing, synthetic models skipped"; fi

[ $RECORD = 1 ] && : > $REC.new
echo "$cases" | while IFS='|' read -r name model opts; do
    ref=""
    ids=$IDS
    tbs="1-256 2-1 2-256 1-1"
    case "$opts" in *--ids*) ids=${opts##*--ids }; opts=${opts%%--ids*};; esac
    case "$opts" in *--tb*) tbs=$(echo ${opts##*--tb } | tr ',' ' '); opts=${opts%%--tb*};; esac
    best=${levels%% *}
    for lv in scalar $(echo $levels | tr " " "\n" | grep -vx scalar); do
        # every level at the first two threads-batch pairs (-t 1 -b 256, -t 2 -b 1 by default); the best level at all
        n=0
        for tb in $tbs; do
            t=${tb%-*}; b=${tb#*-}; n=$((n + 1))
            [ $n -le 2 ] || [ "$lv" = "$best" ] || continue
            {
                f=$OUT/$name-$lv-$t-$b.bin
                rm -f $f
                if ! $RUN -m $model $opts --ids $ids -n 8 -t $t -b $b --kernels $lv --dump-logits $f > $OUT/run.log 2>&1; then
                    echo "FAIL $name --kernels $lv -t $t -b $b: $(tail -n 1 $OUT/run.log)"; continue 2
                fi
                if [ -z "$ref" ]; then ref=$f; continue; fi
                if cmp -s $ref $f; then echo "ok   $name --kernels $lv -t $t -b $b == scalar -t 1 -b 256, byte for byte"
                else echo "FAIL $name --kernels $lv -t $t -b $b differs from scalar -t 1 -b 256"; fi
            }
        done
    done
    [ -n "$ref" ] || continue
    sum=$(md5sum < $ref | cut -c1-32)
    msum=$(md5sum < $model | cut -c1-32) # a synthetic model made by another numpy may differ: then no record applies
    if [ $RECORD = 1 ]; then echo "$name $sum $msum" >> $REC.new; continue; fi
    want=$(sed -n "s/^$name \([0-9a-f]*\) $msum$/\1/p" $REC)
    if [ -z "$want" ] && grep -q "^$name " $REC && [ "${name#synth}" != "$name" ]; then
        echo "note $name: this numpy made another model than the recorded one; its logits are checked across levels only"; continue
    fi
    if [ "$sum" = "$want" ]; then echo "ok   $name: logits match the record (tests/vectors/levels.md5) made on another machine"
    else echo "FAIL $name: logits MD5 $sum, recorded ${want:-nothing} (results depend on the machine, or need --record)"; fi
done > $OUT/results.txt
# a sampled continuation (temperature, top-p, seed): the same ids on every level and thread count,
# and the ids recorded (the sampler's own arithmetic is part of what must not depend on the machine)
{
    ref=""
    for lv in scalar $(echo $levels | tr " " "\n" | grep -vx scalar); do
        for t in 1 2; do
            got=$($RUN -m models/mini/base.afm --ids 3,100,200 -n 24 --temp 0.8 --top-p 0.95 -s 7 -t $t --kernels $lv 2>/dev/null | tr -s ' \n' ' ')
            [ -n "$ref" ] || { ref=$got; continue; }
            if [ "$got" = "$ref" ]; then echo "ok   sampled --kernels $lv -t $t == scalar -t 1"; else echo "FAIL sampled --kernels $lv -t $t: $got, scalar: $ref"; fi
        done
    done
    if [ $RECORD = 1 ]; then echo "sampled $(echo "$ref" | md5sum | cut -c1-32) -" >> $REC.new
    elif [ "$(echo "$ref" | md5sum | cut -c1-32) -" = "$(sed -n 's/^sampled //p' $REC)" ]; then echo "ok   sampled ids match the record: $ref"
    else echo "FAIL sampled ids $ref differ from the record (tests/vectors/levels.md5)"; fi
} >> $OUT/results.txt
cat $OUT/results.txt
PASS=$(grep -c '^ok' $OUT/results.txt); FAIL=$(grep -c '^FAIL' $OUT/results.txt)
if [ $RECORD = 1 ]; then mv $REC.new $REC; echo "recorded $REC"; fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
