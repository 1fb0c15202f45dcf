#!/usr/bin/env python3
"""mini_requant.py - rewrite an afm model file with quantized weight types, checking exactness.

    python3 tools/mini_requant.py base-f32.afm  -o models/mini/base.afm  --type q2b --embd-type q4
    python3 tools/mini_requant.py draft-f32.afm -o models/mini/draft.afm --type q4  --embd-type q4

A stopgap until tools/convert.py takes the quantized types itself: the projections (and the
embedding) of the input are encoded with tools/quant.py at --group (64) and written with
tools/afmfile.py; norms and kv_scale stay F32, the tokenizer and config are copied. The miniature
family's QAT checkpoints lie exactly on the grids (docs/TRAINING.md), so every tensor must decode back
bit for bit; --allow-lossy accepts a file that does not (and reports the error per tensor).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import afmfile as af  # noqa: E402
import quant  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("input")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--type", default="q2b", choices=("q2b", "q4", "q8", "f16", "f32"))
    ap.add_argument("--embd-type", default="q4", choices=("q2b", "q4", "q8", "f16", "f32"))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--allow-lossy", action="store_true")
    a = ap.parse_args(argv)
    m = af.read_model(a.input)
    cfg = dict(m.config)
    specs = af.tensor_specs(cfg)
    types, tensors, bad = {}, {}, []
    for name, shape, kind in specs:
        w = m.f32(name)
        t = a.embd_type if name == "tok_embd" else a.type if kind not in ("norm", "kvscale", "lora") else None
        if t is None:
            tensors[name] = w
            continue
        types[name] = t
        code = af.TYPE_BY_NAME[t]
        if code in af.QUANT_TYPES:
            data = quant.quantize(code, w, a.group)
            back = quant.dequantize(code, data, w.shape[0], w.shape[1], a.group)
            tensors[name] = (lambda d=bytes(data): d)       # encoded bytes (a callable skips the shape check)
        else:
            tensors[name] = w
            back = w.astype(np.float16).astype(np.float32) if t == "f16" else w
        if not np.array_equal(back, w):
            err = float(np.abs(back - w).max() / (np.abs(w).max() + 1e-30))
            bad.append("%s (max rel error %.3g)" % (name, err))
    if bad and not a.allow_lossy:
        print("error: not exactly representable: " + ", ".join(bad[:20]), file=sys.stderr)
        return 1
    tk = m.tokenizer_bytes if m.tokenizer_kind else None
    af.write_model(a.output, cfg, tensors, tokenizer=tk, tokenizer_kind=m.tokenizer_kind or None,
                   types=types, group=a.group)
    af.read_model(a.output)
    print("wrote %s: %d bytes (%s projections, %s embedding, group %d), %s" % (
        a.output, os.path.getsize(a.output), a.type.upper(), a.embd_type.upper(), a.group,
        "every tensor exact" if not bad else "lossy: " + ", ".join(bad)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
