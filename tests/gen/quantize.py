#!/usr/bin/env python3
"""Quantize weights to the afm quantized types (Q2B, Q4, Q8) and report the error; numpy only.

The encoders are the pure functions of tools/quant.py (what the converter calls); this is the
command line around them.

    python3 tests/gen/quantize.py --selftest                  # layout, exact-grid and quality checks
    python3 tests/gen/quantize.py --type q2b --group 64 a.npy b.npy ...   # per-tensor error report
    python3 tests/gen/quantize.py --grid a.npy                # is a tensor already on a 2-bit grid?
    python3 tests/gen/quantize.py --fixtures DIR              # files tests/test_kernels.c checks its decode against
Inputs are .npy arrays (2-D [rows, cols] or more, flattened to [prod(leading), last]).
--out FILE writes the encoded bytes of a single input.
"""

import argparse
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import quant as q  # noqa: E402


def _naive(t, w, group):
    """Baseline: absmax scale per group (no search), for comparison."""
    kpad = q.row_pad(t, w.shape[1], group)
    x = np.zeros((w.shape[0], kpad), np.float32)
    x[:, :w.shape[1]] = w
    g = x.reshape(-1, group)
    amax = np.max(np.abs(g), axis=1)
    top = {q.TYPE_Q2B: 1.5, q.TYPE_Q4: 7.5, q.TYPE_Q8: 127.0}[t]
    s = np.where(amax > 0, amax / top, 1).astype(np.float16).astype(np.float32)
    c = q._assign(g, np.where(s > 0, s, 1), t)
    dq = q._decode_f32(c, s.astype(np.float16), t).reshape(x.shape)[:, :w.shape[1]]
    d = (w.astype(np.float64) - dq)
    return float(10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum(d * d)))


def selftest():
    rng = np.random.default_rng(1234)
    fails = 0
    checks = 0

    def check(ok, what):
        nonlocal fails, checks
        checks += 1
        if not ok:
            fails += 1
            print("FAIL:", what)

    # 1. bit layout, by hand
    w = np.zeros((1, 256), np.float32)
    codes = np.arange(256) % 4
    s = np.float32(0.25)
    w[0] = (codes - 1.5).astype(np.float32) * s
    data = q.quantize_q2b(w, 64)
    b = np.frombuffer(data, np.uint8)
    expect = bytes([(codes[j] | codes[j + 64] << 2 | codes[j + 128] << 4 | codes[j + 192] << 6) for j in range(64)])
    check(data[:64] == expect, "Q2B bit layout")
    check(b[64:].view("<f2")[0] == np.float16(0.25) and len(data) == 64 + 8, "Q2B scales after the codes")
    w4 = np.zeros((1, 128), np.float32)
    c4 = np.arange(128) % 16
    w4[0] = (c4 - 7.5).astype(np.float32) * np.float32(0.5)
    d4 = q.quantize_q4(w4, 64)
    check(d4[:64] == bytes([(c4[j] | c4[j + 64] << 4) for j in range(64)]), "Q4 bit layout")
    w8 = (np.arange(-64, 64, dtype=np.float32) * np.float32(0.125))[None, :]
    w8[0, 0] = -127 * 0.125
    d8 = q.quantize_q8(w8, 64)
    check(np.frombuffer(d8[:128], np.int8)[1] == -63 and np.frombuffer(d8[:128], np.int8)[0] == -127, "Q8 codes")

    # 2. sizes, padding, every group size
    for t in (q.TYPE_Q2B, q.TYPE_Q4, q.TYPE_Q8):
        for g in q.GROUPS:
            for rows, cols in ((3, 1), (2, 100), (5, 300), (4, 2048), (1, 777)):
                w = rng.standard_normal((rows, cols)).astype(np.float32)
                d = q.quantize(t, w, g)
                check(len(d) == q.type_size(t, rows, cols, g), "%s size %dx%d g%d" % (q.TYPE_NAMES[t], rows, cols, g))
                dq = q.dequantize(t, d, rows, cols, g)
                check(dq.shape == (rows, cols) and np.all(np.isfinite(dq)), "%s decode shape" % q.TYPE_NAMES[t])

    # 3. exact grids: decode(encode(w)) == w bit for bit, per-group and per-row scales, partial groups
    for t in (q.TYPE_Q2B, q.TYPE_Q4):
        n = q._NLEV[t]
        for g in q.GROUPS:
            for rows, cols in ((7, 512), (3, 2048), (4, 300)):
                kp = -(-cols // g)
                s = (rng.uniform(1e-3, 0.05, (rows, kp))).astype(np.float16).astype(np.float32)
                s[0, :] = s[0, 0]  # a row with one scale for every group
                c = rng.integers(0, n, (rows, kp * g))
                w = ((c - (n - 1) / 2).astype(np.float32) * np.repeat(s, g, axis=1))[:, :cols].astype(np.float32)
                d, st = q.quantize(t, w, g, return_stats=True)
                dq = q.dequantize(t, d, rows, cols, g)
                check(np.array_equal(dq.view(np.uint32), w.view(np.uint32)), "%s exact grid g%d %dx%d" % (q.TYPE_NAMES[t], g, rows, cols))
                check(st.exact_groups == st.groups, "%s exact groups detected g%d: %d/%d" % (q.TYPE_NAMES[t], g, st.exact_groups, st.groups))
        # a grid of a finer granularity than the group is not exact: reported, not claimed
        s = rng.uniform(1e-3, 0.05, (4, 64)).astype(np.float16).astype(np.float32)
        c = rng.integers(0, n, (4, 2048))
        w = ((c - (n - 1) / 2) * np.repeat(s, 32, axis=1)).astype(np.float32)
        _, st = q.quantize(t, w, 64, return_stats=True)
        check(st.exact_groups < st.groups, "%s finer grid not exact at g64" % q.TYPE_NAMES[t])
    # f32 scales that are not fp16 numbers: on a grid, encoded approximately, counted
    s = np.float32(0.0123456)
    w = ((rng.integers(0, 4, (2, 256)) - 1.5).astype(np.float32) * s).astype(np.float32)
    _, st = q.quantize(q.TYPE_Q2B, w, 64, return_stats=True)
    check(st.grid_not_f16 == st.groups and st.exact_groups == 0, "on-grid with a non-fp16 scale reported (%d)" % st.grid_not_f16)
    # zeros and negative zeros survive
    w = np.zeros((2, 256), np.float32)
    w[1, :] = -0.0
    d = q.quantize_q2b(w, 64)
    dq = q.dequantize(q.TYPE_Q2B, d, 2, 256, 64)
    check(np.array_equal(dq.view(np.uint32), w.view(np.uint32)), "zero groups bit-exact")
    # Q8 on grid
    s = rng.uniform(1e-3, 0.05, (3, 4)).astype(np.float16).astype(np.float32)
    c = rng.integers(-127, 128, (3, 256))
    c[:, ::64] = 127
    w = (c.astype(np.float32) * np.repeat(s, 64, axis=1)).astype(np.float32)
    dq = q.dequantize(q.TYPE_Q8, q.quantize_q8(w, 64), 3, 256, 64)
    check(np.array_equal(dq, w), "Q8 exact grid")
    # grid report
    s = rng.uniform(1e-3, 0.05, (8, 1)).astype(np.float16).astype(np.float32)
    w = ((rng.integers(0, 4, (8, 1024)) - 1.5) * s).astype(np.float32)
    rep = dict((g, f) for g, f, _ in q.grid_report(w))
    check(all(abs(rep[g] - 1.0) < 1e-9 for g in q.GROUPS), "grid_report per-row grid: %s" % rep)

    # 4. quality: the MSE search beats the absmax scale, and is near the Gaussian optimum
    w = (rng.standard_normal((512, 2048)) * 0.02).astype(np.float32)
    for t, lo in ((q.TYPE_Q2B, 9.2), (q.TYPE_Q4, 20.0), (q.TYPE_Q8, 44.0)):
        _, st = q.quantize(t, w, 64, return_stats=True)
        base = _naive(t, w, 64)
        print("  %-3s gaussian g64: snr %.2f dB (absmax scale %.2f dB)" % (q.TYPE_NAMES[t], st.snr_db, base))
        check(st.snr_db >= lo and st.snr_db >= base - 1e-6, "%s quality %.2f dB" % (q.TYPE_NAMES[t], st.snr_db))
    print("%d passed, %d failed" % (checks - fails, fails))
    return 1 if fails else 0


def write_fixtures(outdir):
    """Encoded tensors plus their float32 decode, for tests/test_kernels.c (--fixtures DIR)."""
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(99)
    n = 0
    for t in (q.TYPE_Q2B, q.TYPE_Q4, q.TYPE_Q8):
        for g in q.GROUPS:
            for rows, cols in ((3, 100), (5, 2048), (2, 777)):
                w = (rng.standard_t(5, (rows, cols)) * 0.03).astype(np.float32)
                d = q.quantize(t, w, g)
                dq = q.dequantize(t, d, rows, cols, g).astype("<f4")
                path = os.path.join(outdir, "%s_g%d_%dx%d.qfix" % (q.TYPE_NAMES[t].lower(), g, rows, cols))
                with open(path, "wb") as f:
                    f.write(b"AFMQFIX1" + struct.pack("<IIIIQ", t, rows, cols, g, len(d)))
                    f.write(d)
                    f.write(dq.tobytes())
                n += 1
    print("wrote %d fixtures to %s" % (n, outdir))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help=".npy files")
    ap.add_argument("--type", default="q2b", help="q2b, q4 or q8 (default q2b)")
    ap.add_argument("--group", type=int, default=64, help="64, 128, 256 or 512 (default 64)")
    ap.add_argument("--out", help="write the encoded bytes (one input only)")
    ap.add_argument("--grid", action="store_true", help="report exact-grid fractions per group size")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--fixtures", metavar="DIR")
    a = ap.parse_args()
    if a.selftest:
        return selftest()
    if a.fixtures:
        write_fixtures(a.fixtures)
        return 0
    if not a.inputs:
        ap.error("no inputs")
    if a.out and len(a.inputs) != 1:
        ap.error("--out takes one input")
    t = q._type(a.type)
    total = q.Stats()
    for path in a.inputs:
        w = q._as_2d(np.load(path, mmap_mode="r"))
        name = os.path.basename(path)
        if a.grid:
            for g, ex, on in q.grid_report(w, t=t):
                print("%-40s group %4d: exact (fp16 scale) %.4f  on grid (f32 scale) %.4f" % (name, g, ex, on))
            continue
        data, st = q.quantize(t, w, a.group, return_stats=True)
        print(st.line(name))
        for k in ("n", "sq_err", "sq_w", "groups", "exact_groups", "grid_not_f16", "clipped_scales"):
            setattr(total, k, getattr(total, k) + getattr(st, k))
        total.max_abs = max(total.max_abs, st.max_abs)
        if a.out:
            with open(a.out, "wb") as f:
                f.write(data)
    if not a.grid and len(a.inputs) > 1:
        print(total.line("TOTAL"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
