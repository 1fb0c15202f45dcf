#!/usr/bin/env python3
"""gen_ref.py - reference vectors from Apple's MLX port (mlx_lm.models.afm7), float32.

    python3 tools/gen_ref.py                 # all configs -> tests/vectors/NAME.afm + NAME.ref
    python3 tools/gen_ref.py afm_mini        # one of them
    python3 tools/gen_ref.py --check         # regenerate into a temp dir and compare bytes with tests/vectors

For each config: seeded random weights in MLX afm7 layout (interleaved RoPE), KV-quantizer scales
calibrated on the same token sequence (see calibrate()), an MLX folder (config.json +
model.safetensors) in a temp dir, converted with tools/convert.py --type f32 (the MLX route), and
logits from mlx_lm's own loader and model: a 64-token prompt prefilled in one call with
model.make_cache(), then 16 single-token decode steps feeding fixed random ids.

NAME.ref (little-endian): b"AFMREF1\\0", u32 n_prompt, u32 n_decode, u32 vocab, u32 0,
i32 tokens[n_prompt + n_decode], f32 logits[n_prompt + n_decode][vocab]
(row p < n_prompt: the prefill call's logits at prompt position p; row n_prompt + s: decode step s,
whose input token is tokens[n_prompt + s]).

Needs mlx and mlx-lm (pip install "mlx[cpu]" mlx-lm); the files it writes need only numpy to read.
"""

import argparse
import filecmp
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VECTORS = os.path.join(ROOT, "tests", "vectors")
sys.path.insert(0, HERE)

REF_MAGIC = b"AFMREF1\0"
N_PROMPT, N_DECODE = 64, 16

# MLX ModelArgs fields + seed + calibration margins.
CONFIGS = {
    # (i) scaled-down AFM: 3 regular + 3 KV-reuse layers, 8 query heads on 1 KV head (the 8:1 ratio)
    "afm_mini": dict(seed=101, vocab_size=256, hidden_dim=64, num_layers=6, num_kv_reuse_layers=3, num_heads=8,
                     num_kv_heads=1, hidden_dim_scale_factor=1.0, rope_theta=500000.0, rms_norm_eps=1e-5),
    # (ii) draft-shaped: no reuse layers, 4 heads on 2 KV heads, ffn 3x
    "draft_mini": dict(seed=206, vocab_size=256, hidden_dim=32, num_layers=3, num_kv_reuse_layers=0, num_heads=4,
                       num_kv_heads=2, hidden_dim_scale_factor=3.0, rope_theta=500000.0, rms_norm_eps=1e-5),
    # (iii) odd counts: one regular layer + 3 reuse layers, 3 heads x 16 on 1 KV head, ffn 99 (odd), vocab 251,
    # theta 10000, layer-norm eps 1e-6 (q/k norms keep MLX's 1e-5), and layer 0's value scale set
    # below the observed range so that some values clip at -128 / 127.
    "odd_mini": dict(seed=303, vocab_size=251, hidden_dim=48, num_layers=4, num_kv_reuse_layers=3, num_heads=3,
                     num_kv_heads=1, hidden_dim_scale_factor=2.0625, rope_theta=10000.0, rms_norm_eps=1e-6,
                     value_margin={0: 0.6}),
}
ARG_KEYS = ("vocab_size", "hidden_dim", "num_layers", "num_kv_reuse_layers", "num_heads", "num_kv_heads",
            "hidden_dim_scale_factor", "rope_theta", "rms_norm_eps")


def mlx_config(c):
    out = {"model_type": "afm7"}
    out.update({k: c[k] for k in ARG_KEYS})
    return out


def dims(c):
    d, nh = c["hidden_dim"], c["num_heads"]
    hd = d // nh
    return d, nh, c["num_kv_heads"], hd, int(d * c["hidden_dim_scale_factor"])


def make_mlx_weights(c, seed):
    """{MLX key: float32 numpy array} with seeded random values (interleaved RoPE layout)."""
    g = np.random.default_rng(seed)
    d, nh, nkv, hd, f = dims(c)
    V = c["vocab_size"]
    n0 = c["num_layers"] - c["num_kv_reuse_layers"]

    def lin(o, i):
        return (g.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return g.uniform(0.75, 1.25, n).astype(np.float32)

    w = {"model.embedding.weight": (g.standard_normal((V, d)) * (2.0 / np.sqrt(d))).astype(np.float32),
         "model.output_norm.weight": norm(d)}
    for i in range(c["num_layers"]):
        if i < n0:
            P = "model.layers.%d." % i
            w[P + "self_attn.qkv_proj.weight"] = lin(nh * hd + 2 * nkv * hd, d)
            w[P + "self_attn.k_norm.weight"] = norm(hd)
            w[P + "self_attn.quant_key_scale"] = np.array(1.0, np.float32)
            w[P + "self_attn.quant_value_scale"] = np.array(1.0, np.float32)
        else:
            P = "model.kv_reuse_layers.%d." % (i - n0)
            w[P + "self_attn.q_proj.weight"] = lin(nh * hd, d)
        w[P + "input_layernorm.weight"] = norm(d)
        w[P + "self_attn.q_norm.weight"] = norm(hd)
        w[P + "self_attn.out_proj.weight"] = lin(d, nh * hd)
        w[P + "post_attention_layernorm.weight"] = norm(d)
        w[P + "mlp.gate_proj.weight"] = lin(f, d)
        w[P + "mlp.up_proj.weight"] = lin(f, d)
        w[P + "mlp.down_proj.weight"] = lin(d, f)
    return w


def tokens_for(vocab, seed):
    g = np.random.default_rng(seed + 7)
    return g.integers(0, vocab, N_PROMPT + N_DECODE).astype(np.int32)


def build_model(c, weights):
    import mlx.core as mx
    from mlx_lm.models import afm7
    model = afm7.Model(afm7.ModelArgs.from_dict(mlx_config(c)))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


def run_mlx(model, tokens):
    """float32 logits [n_prompt + n_decode, vocab]: prefill in one call, then single-token steps."""
    import mlx.core as mx
    cache = model.make_cache()
    out = model(mx.array(tokens[None, :N_PROMPT]), cache=cache)
    mx.eval(out)
    rows = [np.array(out[0].astype(mx.float32))]
    for t in tokens[N_PROMPT:]:
        out = model(mx.array([[int(t)]]), cache=cache)
        mx.eval(out)
        rows.append(np.array(out[0].astype(mx.float32)))
    return np.concatenate(rows, axis=0)


def calibrate(c, weights, tokens):
    """Observed [min, max] of K (after RoPE and k_norm) and V per regular layer on this token sequence,
    with the fake quantizer replaced by the identity."""
    from mlx_lm.models import afm7
    n0 = c["num_layers"] - c["num_kv_reuse_layers"]
    seen = []
    orig = afm7.fake_8bit_quant

    def record(x, scale):
        a = np.array(x)
        seen.append((float(a.min()), float(a.max())))
        return x

    afm7.fake_8bit_quant = record
    try:
        run_mlx(build_model(c, weights), tokens)
    finally:
        afm7.fake_8bit_quant = orig
    calls = 1 + N_DECODE
    if len(seen) != calls * 2 * n0:
        raise RuntimeError("calibration: %d quantizer calls, expected %d" % (len(seen), calls * 2 * n0))
    rng = np.zeros((n0, 2, 2))
    rng[:, :, 0] = np.inf
    rng[:, :, 1] = -np.inf
    for k, (lo, hi) in enumerate(seen):
        layer, which = (k // 2) % n0, k % 2
        rng[layer, which, 0] = min(rng[layer, which, 0], lo)
        rng[layer, which, 1] = max(rng[layer, which, 1], hi)
    return rng  # [layer, key/value, min/max]


def scales_from_observed(rng, key_margin=1.08, value_margin=None):
    """Scale with 127 * scale a bit (8%) above the observed max |x| (value_margin {layer: m} overrides)."""
    n0 = rng.shape[0]
    out = np.zeros((n0, 2), np.float32)
    for i in range(n0):
        for j in range(2):
            m = key_margin
            if j == 1 and value_margin and i in value_margin:
                m = value_margin[i]
            out[i, j] = np.float32(max(abs(rng[i, j, 0]), abs(rng[i, j, 1])) * m / 127.0)
    return out


def write_ref(path, tokens, logits):
    tokens = np.asarray(tokens, "<i4")
    logits = np.ascontiguousarray(logits, "<f4")
    n = N_PROMPT + N_DECODE
    assert tokens.shape == (n,) and logits.shape[0] == n
    with open(path, "wb") as f:
        f.write(REF_MAGIC + struct.pack("<IIII", N_PROMPT, N_DECODE, logits.shape[1], 0))
        f.write(tokens.tobytes())
        f.write(logits.tobytes())


def read_ref(path):
    with open(path, "rb") as f:
        b = f.read()
    if b[:8] != REF_MAGIC:
        raise ValueError("%s: not an AFMREF1 file" % path)
    n_prompt, n_decode, vocab, _ = struct.unpack_from("<IIII", b, 8)
    n = n_prompt + n_decode
    tokens = np.frombuffer(b, "<i4", n, 24)
    logits = np.frombuffer(b, "<f4", n * vocab, 24 + 4 * n).reshape(n, vocab)
    if len(b) != 24 + 4 * n + 4 * n * vocab:
        raise ValueError("%s: %d bytes, expected %d" % (path, len(b), 24 + 4 * n + 4 * n * vocab))
    return n_prompt, n_decode, tokens, logits


def save_mlx_folder(folder, c, weights):
    import mlx.core as mx
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(mlx_config(c), f, indent=2, sort_keys=True)
    mx.save_safetensors(os.path.join(folder, "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})


def convert(src, dst, extra=()):
    cmd = [sys.executable, os.path.join(HERE, "convert.py"), src, "-o", dst, "--type", "f32", "-q"] + list(extra)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("convert.py failed: %s\n%s%s" % (" ".join(cmd), r.stdout, r.stderr))


def generate(name, outdir, verbose=True):
    from mlx_lm.utils import load_model
    from pathlib import Path
    c = dict(CONFIGS[name])
    seed = c.pop("seed")
    value_margin = c.pop("value_margin", None)
    weights = make_mlx_weights(c, seed)
    tokens = tokens_for(c["vocab_size"], seed)
    obs = calibrate(c, weights, tokens)
    sc = scales_from_observed(obs, value_margin=value_margin)
    n0 = c["num_layers"] - c["num_kv_reuse_layers"]
    for i in range(n0):
        weights["model.layers.%d.self_attn.quant_key_scale" % i] = np.array(sc[i, 0], np.float32)
        weights["model.layers.%d.self_attn.quant_value_scale" % i] = np.array(sc[i, 1], np.float32)
    with tempfile.TemporaryDirectory() as td:
        folder = os.path.join(td, name)
        save_mlx_folder(folder, c, weights)
        afm_path = os.path.join(outdir, name + ".afm")
        convert(folder, afm_path)
        model, _ = load_model(Path(folder))  # mlx_lm's own loader, strict
        logits = run_mlx(model, tokens)
    write_ref(os.path.join(outdir, name + ".ref"), tokens, logits)
    if verbose:
        d, nh, nkv, hd, f = dims(c)
        print("%s: vocab %d, dim %d, %d layers (%d reuse), %d heads x %d, %d KV heads, ffn %d; "
              "max|K| %.3f, max|V| %.3f; logits std %.3f -> %s.afm (%d bytes), %s.ref (%d bytes)"
              % (name, c["vocab_size"], d, c["num_layers"], c["num_kv_reuse_layers"], nh, hd, nkv, f,
                 np.abs(obs[:, 0]).max(), np.abs(obs[:, 1]).max(), logits.std(), name,
                 os.path.getsize(afm_path), name, os.path.getsize(os.path.join(outdir, name + ".ref"))))
    return weights, tokens, logits


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate MLX reference vectors.")
    ap.add_argument("names", nargs="*", help="configs (default all: %s)" % ", ".join(CONFIGS))
    ap.add_argument("-o", "--outdir", default=VECTORS)
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare with --outdir")
    a = ap.parse_args(argv)
    names = a.names or list(CONFIGS)
    for n in names:
        if n not in CONFIGS:
            ap.error("unknown config %s" % n)
    if a.check:
        bad = 0
        with tempfile.TemporaryDirectory() as td:
            for n in names:
                generate(n, td, verbose=False)
                for ext in (".afm", ".ref"):
                    same = filecmp.cmp(os.path.join(td, n + ext), os.path.join(a.outdir, n + ext), shallow=False)
                    print("%s%s: %s" % (n, ext, "identical" if same else "DIFFERS"))
                    bad += not same
        return 1 if bad else 0
    os.makedirs(a.outdir, exist_ok=True)
    for n in names:
        generate(n, a.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
