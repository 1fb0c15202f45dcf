#!/usr/bin/env python3
"""Guided generation validity: every schema in tests/constrain/ x N sampled generations at
temperature 1.0 on the shipped model (./afm --json-schema), each output checked by an independent
validator (the jsonschema package). A generation either ends complete and valid, or the CLI says
why it is incomplete (the length limit); anything else is a failure.

    python3 tests/check_constrain.py [--runs N] [--n-predict N] [--model FILE]
Last line: "N passed, N failed"."""
import argparse, glob, json, os, subprocess, sys

import jsonschema

ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=20)
ap.add_argument("--n-predict", type=int, default=256)
ap.add_argument("--model", default="models/mini/base.afm")
ap.add_argument("--afm", default="./afm")
args = ap.parse_args()

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constrain")
prompts = json.load(open(os.path.join(here, "prompts.json")))
passed = failed = incomplete = 0
for path in sorted(glob.glob(os.path.join(here, "*.json"))):
    name = os.path.basename(path)[:-5]
    if name == "prompts":
        continue
    schema = json.load(open(path))
    ok_here = 0
    for seed in range(args.runs):
        cmd = [args.afm, "-m", args.model, "--chat", "-p", prompts[name], "-n", str(args.n_predict), "--temp", "1.0",
               "--seed", str(seed + 1), "--json-schema", path]
        p = subprocess.run(cmd, capture_output=True, text=True)
        out = p.stdout.strip()
        why = ""
        if p.returncode != 0:
            why = "exit status %d: %s" % (p.returncode, p.stderr.strip()[-300:])
        elif "the output is incomplete" in p.stderr:
            incomplete += 1
            passed += 1  # ended at its length limit and said so
            continue
        else:
            try:
                jsonschema.validate(json.loads(out), schema)
            except Exception as e:  # not JSON, or not valid under the schema
                why = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200])
        if why:
            failed += 1
            print("FAIL %s seed %d: %s\n  output: %r" % (name, seed + 1, why, out[:300]))
        else:
            passed += 1
            ok_here += 1
    print("%-16s %d/%d valid, e.g. %s" % (name, ok_here, args.runs, out[:100]))
print("%d generations ended at the length limit (reported by afm)" % incomplete)
print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
