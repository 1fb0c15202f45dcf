#!/usr/bin/env python3
"""Writes the quantized-model fixtures of tests/test_main.c (numpy only, deterministic):

    tests/vectors/quant_q2b.afm   Q2B projections, Q4 embedding/head (group 64), int8 KV scales
    tests/vectors/quant_deq.afm   the same model with F32 weights equal to quant_q2b's decoded
                                  weights (decoded by tools/quant.py, not by the C engine)
    tests/vectors/quant_grid.afm  Q2B/Q4 of weights that already lie on the balanced grids
                                  (as 2-bit QAT weights do); must decode to them exactly

    python3 tests/gen/make_quant_vectors.py [--check]
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import afmfile as af  # noqa: E402
import quant  # noqa: E402
import synth  # noqa: E402

OUT = os.path.join("tests", "vectors")


def config():
    return af.make_config(vocab_size=256, dim=64, n_layers=4, n_reuse_layers=1, n_heads=8, n_kv_heads=1,
                          head_dim=8, ffn_dim=192, kv_scales=True)


def on_grid(name, shape, kind, rng):
    """Weights on the Q2B grid {-1.5,-0.5,0.5,1.5} x s (Q4 grid for the embedding), s an f16 per group."""
    rows, cols = shape
    levels, t = (np.arange(4) - 1.5, quant.TYPE_Q2B) if kind != "embd" else (np.arange(16) - 7.5, quant.TYPE_Q4)
    s = rng.uniform(0.01, 0.05, (rows, (cols + 63) // 64)).astype(np.float16).astype(np.float32)
    c = rng.integers(0, len(levels), shape)
    return (levels[c].astype(np.float32) * np.repeat(s, 64, axis=1)[:, :cols]).astype(np.float32), t


def write(out):
    cfg = config()
    tensors = {n: f() for n, f in synth.synth_tensors(cfg, 11).items()}
    q_path = os.path.join(out, "quant_q2b.afm")
    af.write_model(q_path, cfg, tensors, wtype="q2b", types={"tok_embd": "q4"}, group=64)
    m = af.read_model(q_path)  # decodes Q2B/Q4 with tools/quant.py
    deq = {n: m.f32(n) for n in m.names()}
    af.write_model(os.path.join(out, "quant_deq.afm"), cfg, deq, wtype="f32")
    rng = np.random.default_rng(5)
    grid = dict(tensors)
    types = {}
    for name, shape, kind in af.tensor_specs(cfg):
        if kind in ("proj", "embd"):
            grid[name], t = on_grid(name, shape, kind, rng)
            types[name] = "q2b" if t == quant.TYPE_Q2B else "q4"
    g_path = os.path.join(out, "quant_grid.afm")
    af.write_model(g_path, cfg, grid, types=types, group=64)
    g = af.read_model(g_path)
    bad = [n for n in types if not np.array_equal(g.f32(n), grid[n])]
    if bad:
        raise SystemExit("on-grid weights did not decode exactly: %s" % ", ".join(bad))
    print("wrote quant_q2b.afm, quant_deq.afm, quant_grid.afm (%d on-grid tensors decode exactly)" % len(types))


def main():
    if "--check" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as d:
            write(d)
            same = all(open(os.path.join(d, f), "rb").read() == open(os.path.join(OUT, f), "rb").read()
                       for f in ("quant_q2b.afm", "quant_deq.afm", "quant_grid.afm"))
            print("identical" if same else "DIFFERENT")
            return 0 if same else 1
    write(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
