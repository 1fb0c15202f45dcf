#!/usr/bin/env python3
"""synth.py - write a synthetic afm model file with seeded random weights (numpy only).

    python3 tools/synth.py --preset draft -o draft-synth.afm
    python3 tools/synth.py --preset base --type bf16 --lora --kv-scales -o base-synth.afm
    python3 tools/synth.py --preset base --lora --kv-scales --zeros -o base-zeros.afm   # seconds, sparse
    python3 tools/synth.py --dim 64 --layers 4 --reuse 1 --heads 4 --kv-heads 1 --ffn 96 --vocab 300 -o t.afm
    python3 tools/synth.py --preset base --lora --count                                  # parameter counts

Weights: projections N(0, 1/in), embedding N(0, (2/sqrt(dim))^2) (logits come out with std ~2),
norm weights uniform in [0.75, 1.25], LoRA A N(0, 1/in) and B N(0, 0.25/r). Each tensor has its
own generator seeded from (--seed, crc32(name)), so a tensor's values do not depend on the others
and the file is written one tensor at a time (a full-size model never sits in memory).
KV scales (--kv-scales): key scale = 1.02 * sqrt(head_dim) * max|k_norm| / 127 (the largest value
an RMS-normed head can reach), value scale = 6/127.
"""

import argparse
import math
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import afmfile as af  # noqa: E402

PRESETS = {
    # exact AFMTextV7 base (docs/MODEL.md section 1)
    "base": dict(vocab=153600, dim=2048, layers=56, reuse=21, heads=16, kv_heads=2, head_dim=128, ffn=6656,
                 context=4096, rope_theta=500000.0, norm_eps=1e-5, qk_norm_eps=1e-5),
    # the draft model
    "draft": dict(vocab=153600, dim=256, layers=12, reuse=0, heads=8, kv_heads=4, head_dim=32, ffn=768,
                  context=4096, rope_theta=500000.0, norm_eps=1e-5, qk_norm_eps=1e-5),
}
EXPECTED = {"base": (3111368064, 66633728), "draft": (48765952, None)}


def rng_for(seed, name):
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def make_tensor_fn(cfg, name, shape, kind, seed):
    """A callable producing tensor `name` (float32)."""

    def normal(std):
        g = rng_for(seed, name)
        a = g.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        return a

    if kind == "embd":
        return lambda: normal(2.0 / math.sqrt(cfg["dim"]))
    if kind == "norm":
        return lambda: rng_for(seed, name).uniform(0.75, 1.25, shape).astype(np.float32)
    if kind == "proj":
        return lambda: normal(1.0 / math.sqrt(shape[1]))
    if kind == "lora":
        if name.endswith(".lora_a"):
            return lambda: normal(1.0 / math.sqrt(shape[1]))
        return lambda: normal(0.5 / math.sqrt(shape[1]))
    if kind == "kvscale":
        def kv():
            out = np.zeros(shape, np.float32)
            for i in range(shape[0]):
                kn = make_tensor_fn(cfg, "l%d.k_norm" % i, (cfg["head_dim"],), "norm", seed)()
                out[i, 0] = 1.02 * math.sqrt(cfg["head_dim"]) * float(np.abs(kn).max()) / 127.0
                out[i, 1] = 6.0 / 127.0
            return out
        return kv
    raise ValueError(kind)


def random_codes(cfg, wtype, embd_type, group, seed):
    """Encoded bytes with random codes and scales for every quantized projection / embedding:
    the right sizes and a plausible value range, at the speed of a random number generator."""
    import quant
    out = {}
    for name, shape, kind in af.tensor_specs(cfg):
        t = embd_type if kind == "embd" else wtype if kind == "proj" else None
        if t not in ("q2b", "q4", "q8"):
            continue
        code = af.TYPE_BY_NAME[t]
        rows, cols = shape
        kpad = quant.row_pad(code, cols, group)
        top = {"q2b": 1.5, "q4": 7.5, "q8": 127.0}[t]
        std = 2.0 / math.sqrt(cfg["dim"]) if kind == "embd" else 1.0 / math.sqrt(cols)

        def make(rows=rows, kpad=kpad, t=t, top=top, std=std, name=name):
            g = rng_for(seed, name)
            codes = g.integers(0, 256, rows * kpad * {"q2b": 2, "q4": 4, "q8": 8}[t] // 8, dtype=np.uint8)
            if t == "q8":
                codes[codes == 0x80] = 0x81  # -128 is not a valid Q8 code
            scales = np.full(rows * (kpad // group), std * 1.7 / top, dtype=np.float16)
            return codes.tobytes() + scales.astype("<f2").tobytes()
        out[name] = make
    return out


def synth_tensors(cfg, seed):
    return {n: make_tensor_fn(cfg, n, shape, kind, seed) for n, shape, kind in af.tensor_specs(cfg)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a synthetic afm model (random seeded weights).")
    ap.add_argument("-o", "--output", help="output .afm file")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset (flags below override it)")
    for k, t, h in (("vocab", int, "vocabulary size"), ("dim", int, "model width"),
                    ("layers", int, "all layers, both segments"), ("reuse", int, "KV-reuse (segment-1) layers"),
                    ("heads", int, "query heads"), ("kv-heads", int, "KV heads"),
                    ("head-dim", int, "default dim / heads"), ("ffn", int, "SwiGLU hidden size"),
                    ("context", int, "training context (default 4096)"), ("rope-theta", float, "default 500000"),
                    ("norm-eps", float, "default 1e-5"), ("qk-norm-eps", float, "default 1e-5")):
        ap.add_argument("--" + k, type=t, help=h)
    ap.add_argument("--type", choices=("f32", "f16", "bf16", "q2b", "q4", "q8"), default="f32",
                    help="weight type of the projections (default f32); q2b is AFMTextV7's 2-bit grid")
    ap.add_argument("--embd-type", choices=("f32", "f16", "bf16", "q2b", "q4", "q8"),
                    help="type of tok_embd, the tied embedding and output head (default: q4 with a "
                         "quantized --type, else the same as --type)")
    ap.add_argument("--group", type=int, default=64, help="elements per scale for quantized types (64, 128, 256, 512)")
    ap.add_argument("--random-codes", action="store_true",
                    help="quantized types: write random codes and scales directly instead of quantizing random "
                         "weights (seconds instead of most of an hour at full size; for benchmarks)")
    ap.add_argument("--lora-type", choices=("f32", "f16"), help="LoRA type (default f32 for f32, else f16)")
    ap.add_argument("--lora", action="store_true", help="include an embedded base adapter")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--kv-scales", action="store_true", help="include the int8 KV scales (flags bit 2)")
    ap.add_argument("--adapter-out", metavar="FILE.afma",
                    help="also write a random LoRA adapter (.afma, --lora-type, default f16) for this model's "
                         "shapes, rank --lora-rank, alpha --lora-alpha (benchmarks)")
    ap.add_argument("--zeros", action="store_true", help="all-zero data, written sparse (fast; for shape tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="embed this tokenizer.model (kind 1) or tokenizer.json (kind 2)")
    ap.add_argument("--signature", help="40 hex digits")
    ap.add_argument("--count", action="store_true", help="print parameter counts and exit")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)

    p = dict(PRESETS[a.preset]) if a.preset else dict(context=4096, rope_theta=500000.0, norm_eps=1e-5,
                                                       qk_norm_eps=1e-5)
    for k in ("vocab", "dim", "layers", "reuse", "heads", "kv_heads", "head_dim", "ffn", "context",
              "rope_theta", "norm_eps", "qk_norm_eps"):
        v = getattr(a, k)
        if v is not None:
            p[k] = v
    p.setdefault("reuse", 0)
    if "head_dim" not in p or (a.head_dim is None and (a.dim is not None or a.heads is not None)):
        if "dim" in p and "heads" in p and p["heads"] and p["dim"] % p["heads"] == 0:
            p["head_dim"] = p["dim"] // p["heads"]
    need = [k for k in ("vocab", "dim", "layers", "heads", "kv_heads", "head_dim", "ffn") if k not in p]
    if need:
        ap.error("no preset: give --" + ", --".join(n.replace("_", "-") for n in need))
    sig = a.signature.lower() if a.signature else None
    try:
        cfg = af.make_config(p["vocab"], p["dim"], p["layers"], p["reuse"], p["heads"], p["kv_heads"], p["head_dim"],
                             p["ffn"], p["context"], p["rope_theta"], p["norm_eps"], p["qk_norm_eps"],
                             kv_scales=a.kv_scales, lora_rank=a.lora_rank if a.lora else 0,
                             lora_alpha=a.lora_alpha if a.lora else 0.0, signature=sig)
    except af.AfmError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    base, lora = af.count_params(cfg)
    if a.preset and not a.quiet:
        exp_base, exp_lora = EXPECTED[a.preset]
        same = all(getattr(a, k) is None for k in ("vocab", "dim", "layers", "reuse", "heads", "kv_heads",
                                                    "head_dim", "ffn"))
        if same:
            ok = base == exp_base and (not a.lora or exp_lora is None or a.lora_rank != 32 or lora == exp_lora)
            print("preset %s: parameter count %s" % (a.preset, "matches docs/MODEL.md section 1" if ok else "MISMATCH"))
            if not ok:
                return 1
    if a.count:
        print("parameters: %d base, %d LoRA, %d total" % (base, lora, base + lora))
        return 0
    if a.adapter_out:
        import adapterfile
        import numpy as np
        rng = np.random.default_rng(a.seed + 1)
        specs = adapterfile.adapter_specs(cfg, a.lora_rank)
        tensors = {n: (lambda shape=shape: (rng.standard_normal(shape) * 0.02).astype(np.float32))
                   for n, shape in (specs.items() if isinstance(specs, dict) else specs)}
        try:
            adapterfile.write_adapter(a.adapter_out, cfg, tensors, a.lora_rank, a.lora_alpha, draft_token_count=5,
                                      signature=sig, ltype=a.lora_type or "f16")
        except (af.AfmError, OSError) as e:
            print("error: %s" % e, file=sys.stderr)
            return 1
        if not a.quiet:
            print("wrote %s: rank %d adapter" % (a.adapter_out, a.lora_rank))
        if not a.output:
            return 0
    if not a.output:
        ap.error("-o/--output is required")
    tok = kind = None
    if a.tokenizer:
        try:
            tok, kind = af.read_tokenizer(a.tokenizer)
        except (af.AfmError, OSError) as e:
            print("error: %s" % e, file=sys.stderr)
            return 1
    tensors = synth_tensors(cfg, a.seed)
    embd = a.embd_type or ("q4" if a.type in ("q2b", "q4", "q8") else a.type)
    if a.random_codes:
        tensors.update(random_codes(cfg, a.type, embd, a.group, a.seed))
    if a.zeros:  # everything zero except the KV scales (a zero scale would be meaningless)
        tensors = {n: f for n, f in tensors.items() if n == "kv_scale"}

    def progress(k, n, e):
        if not a.quiet and (k == n or k % 50 == 0):
            print("  %d/%d tensors" % (k, n), flush=True)

    try:
        info = af.write_model(a.output, cfg, tensors, tokenizer=tok, tokenizer_kind=kind, wtype=a.type,
                              lora_type=a.lora_type, zeros=a.zeros, progress=None if a.zeros else progress,
                              types={"tok_embd": embd}, group=a.group)
    except (af.AfmError, OSError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    if not a.quiet:
        print("wrote %s: %d bytes, %d tensors, %d parameters (+ %d LoRA)%s"
              % (a.output, info["file_size"], len(info["entries"]), base, lora, " [all zeros, sparse]" if a.zeros else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
