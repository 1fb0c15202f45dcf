#!/usr/bin/env python3
"""mini_spec_bench.py - draft acceptance and speculative speedup of the shipped miniature pair.

    python3 bench/mini_spec_bench.py [-t 2] [-n 128] [-r 5]

For the four text prompts of tests/vectors/mini_greedy.json: ./afm on models/mini/base.afm, greedy,
with and without --draft models/mini/draft.afm, r alternating runs each (median tok/s); checks that
the speculative output equals plain greedy; prints acceptance and speedup per prompt and overall.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(ids, draft, a):
    cmd = [os.path.join(ROOT, "afm"), "-m", os.path.join(ROOT, "models/mini/base.afm"), "--ids", ",".join(map(str, ids)),
           "-n", str(a.n), "-t", str(a.t)]
    if draft:
        cmd += ["--draft", os.path.join(ROOT, "models/mini/draft.afm")]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    tps = float(re.search(r"generated: \d+ tokens in [\d.]+ s \(([\d.]+) tok/s\)", r.stderr).group(1))
    m = re.search(r"(\d+) drafted, (\d+) accepted", r.stderr)
    return tps, ((int(m.group(1)), int(m.group(2))) if m else None), r.stdout.split()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    a = ap.parse_args(argv)
    with open(os.path.join(ROOT, "tests/vectors/mini_greedy.json")) as fh:
        cases = [c for c in json.load(fh)["cases"] if c["kind"] == "text"]
    tot_d = tot_a = 0
    sp = []
    for c in cases:
        b, s = [], []
        for _ in range(a.r):
            t0, _, o0 = run(c["ids"], False, a)
            t1, da, o1 = run(c["ids"], True, a)
            b.append(t0)
            s.append(t1)
            if o0 != o1:
                print("error: speculative output differs from plain greedy", file=sys.stderr)
                return 1
        tot_d += da[0]
        tot_a += da[1]
        sp.append(statistics.median(s) / statistics.median(b))
        print("%-40r plain %.1f tok/s, with draft %.1f tok/s (x%.2f), acceptance %d/%d = %.1f%%" % (
            c["prompt"][:40], statistics.median(b), statistics.median(s), sp[-1], da[1], da[0], 100.0 * da[1] / da[0]))
    print("overall acceptance %.1f%%, mean speedup x%.2f (%d threads)" % (100.0 * tot_a / tot_d, statistics.mean(sp), a.t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
