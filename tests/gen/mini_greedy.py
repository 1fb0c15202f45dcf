#!/usr/bin/env python3
"""mini_greedy.py - greedy continuations of fixed prompts on the miniature AFM family.

    python3 tests/gen/mini_greedy.py make --ckpt RUN/toolkit -o tests/vectors/mini_greedy.json
    python3 tests/gen/mini_greedy.py check [--vectors tests/vectors/mini_greedy.json]   # numpy only

`make` (needs torch + sentencepiece) records, for each fixed prompt, the prompt ids (EOS + encoding,
or AFM's chat rule for chat prompts) and the greedy continuation of the PyTorch model on the exported
toolkit checkpoints (the exact values in models/mini: f32 arithmetic, int8 KV), with and without the
adapter. `check` runs ./afm --exact (f32 activations: the file's decoded weights computed as PyTorch
does; the default int8 activation blocks move the logits by a few percent of their spread, which
flips near ties such as the 0.002-std top-2 gap at the 14th token of the second JSON prompt) on
models/mini/base.afm (optionally with --adapter models/mini/json.afma) twice per case: with the recorded prompt ids (--ids), comparing the generated ids; and with the prompt
as text (-p, plus --chat for chat prompts), comparing the prompt ids the CLI's tokenizer made
(--show-prompt) and the streamed text with sentencepiece's decoding of the recorded continuation.
It prints 'N passed, N failed'.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "train"))  # mini_task, mini_train (only for `make`)

PROMPTS = [
    ("text", "In the beginning God created the heaven and the earth.\n2 And"),
    ("text", "The :mod:`json` module"),
    ("text", "ABSURDITY, n."),
    ("text", "hacker\n n."),
    ("chat", "Describe as JSON: The quick brown fox jumps over the lazy dog."),
    ("chat", "Describe as JSON: Blessed are the meek: for they shall inherit the earth."),
]
N = 24


def make(a):
    import torch
    import sentencepiece as spm
    import mini_task
    import mini_train
    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    base = mini_train.load_toolkit_model(os.path.join(a.ckpt, "base-model.pt"))
    ad = mini_train.load_toolkit_model(os.path.join(a.ckpt, "base-model.pt"),
                                       adapter=os.path.join(a.ckpt, "adapter-model.pt"))
    end = sp.piece_to_id("<turn_end>")
    out = {"n": N, "stop": end, "model": "models/mini/base.afm", "adapter": "models/mini/json.afma", "cases": []}
    for kind, text in PROMPTS:
        if kind == "chat":
            ids = mini_task.encode_prompt(sp, mini_task.render_prompt(text))
        else:
            ids = [sp.eos_id()] + sp.encode(text.replace("\n", "<n>"))
        for use_ad, m in ((False, base), (True, ad)):
            if kind == "text" and use_ad:
                continue
            toks = list(ids)
            with torch.no_grad():
                for _ in range(N):
                    t = int(m(torch.tensor([toks]))[0, -1].argmax())
                    toks.append(t)
                    if t == end:
                        break
            gen = toks[len(ids):]
            out["cases"].append({"prompt": text, "kind": kind, "adapter": use_ad, "ids": ids, "expect": gen,
                                 "text": sp.decode(gen).replace("<n>", "\n")})
            print(json.dumps(out["cases"][-1]["text"]))
    with open(a.output, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")


def check(a):
    with open(a.vectors) as fh:
        v = json.load(fh)
    passed = failed = 0
    for c in v["cases"]:
        cmd = [os.path.join(ROOT, "afm"), "-m", os.path.join(ROOT, v["model"]), "--ids", ",".join(map(str, c["ids"])),
               "-n", str(v["n"]), "--stop", str(v["stop"]), "-t", "2", "--exact"]
        if c["adapter"]:
            cmd += ["--adapter", os.path.join(ROOT, v["adapter"])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = [int(t) for t in r.stdout.split()] if r.returncode == 0 else None
        ok = got == c["expect"]
        passed += ok
        failed += not ok
        print("%s %s%s: %r" % ("ok  " if ok else "FAIL", c["prompt"][:40], " +adapter" if c["adapter"] else "",
                                c["text"][:60]))
        if not ok:
            print("     expected %s\n     got      %s %s" % (c["expect"], got, r.stderr.strip()[-200:]))
        # the same case from text: the CLI's tokenizer, chat template and streaming detokenizer
        cmd = [os.path.join(ROOT, "afm"), "-m", os.path.join(ROOT, v["model"]), "-p", c["prompt"], "-n", str(v["n"]),
               "-t", "2", "--exact", "--show-prompt", "--no-display-prompt"] + (["--chat"] if c["kind"] == "chat" else [])
        if c["adapter"]:
            cmd += ["--adapter", os.path.join(ROOT, v["adapter"])]
        r = subprocess.run(cmd, capture_output=True)
        ids_line = [l for l in r.stderr.decode("utf-8", "replace").splitlines() if l.startswith("prompt ids")]
        got_ids = [int(t) for t in ids_line[0].split(":", 1)[1].split()] if ids_line else None
        # sentencepiece drops the leading space of a decoding; the CLI continues the prompt, and it does
        # not print the stop token
        want = c["text"][:-len("<turn_end>")] if c["text"].endswith("<turn_end>") else c["text"]
        got_text = r.stdout.decode("utf-8") if r.returncode == 0 else None
        if got_text is not None and got_text.endswith("\n"):
            got_text = got_text[:-1]
        ok = got_ids == c["ids"] and (got_text == want or (c["kind"] == "text" and got_text == " " + want))
        passed += ok
        failed += not ok
        print("%s %s%s from text: %r" % ("ok  " if ok else "FAIL", c["prompt"][:40], " +adapter" if c["adapter"] else "",
                                          (got_text or "")[:60]))
        if not ok:
            print("     prompt ids expected %s\n                got      %s\n     text expected %r\n          got      %r %s"
                  % (c["ids"], got_ids, want, got_text, r.stderr.decode("utf-8", "replace").strip()[-200:]))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["make", "check"])
    ap.add_argument("--ckpt", default="/work/scratch/mini/final/toolkit")
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "models", "mini", "tokenizer.model"))
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "tests", "vectors", "mini_greedy.json"))
    ap.add_argument("--vectors", default=os.path.join(ROOT, "tests", "vectors", "mini_greedy.json"))
    a = ap.parse_args(argv)
    if a.cmd == "make":
        make(a)
        return 0
    return check(a)


if __name__ == "__main__":
    sys.exit(main())
