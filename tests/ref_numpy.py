#!/usr/bin/env python3
"""ref_numpy.py - an independent numpy forward pass over an afm file (half-split RoPE, the file's
own layout), checked against the MLX logits of a .ref file.

    python3 tests/ref_numpy.py                                   # every tests/vectors/*.ref with its model
    python3 tests/ref_numpy.py tests/vectors/afm_mini.afm tests/vectors/afm_mini.ref
    python3 tests/ref_numpy.py tests/vectors/toolkit.afm tests/vectors/toolkit_lora.ref --lora

This proves the converter's permutation and the file format independently of the C engine.
Computation is float64 except the KV fake-quantizer, which runs in float32 as MLX's does
(x / scale, round half to even, clip to [-128, 127], times scale). The whole token sequence is
evaluated causally in one pass; with a KV cache, prefill + single-token decode computes the same.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import afmfile as af  # noqa: E402

TOL = 1e-5  # max |dlogit| / max |logit|


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_halfsplit(x, pos, theta):
    """x [T, heads, d] in the half-split layout: pair i is (x[i], x[i + d/2])."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2.0 / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]          # [T, d/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def fake_quant(x, scale):
    x32 = x.astype(np.float32)
    q = np.clip(np.rint(x32 / np.float32(scale)), -128, 127)
    return (q * np.float32(scale)).astype(np.float32).astype(np.float64)


def attention(q, k, v, n_kv):
    """q [T, H, d], k/v [S, n_kv, d], causal with the queries at the last T of the S positions."""
    T, H, d = q.shape
    S = k.shape[0]
    rep = H // n_kv
    out = np.zeros_like(q)
    mask = np.arange(S)[None, :] <= (np.arange(T) + (S - T))[:, None]
    for h in range(H):
        sc = (q[:, h, :] @ k[:, h // rep, :].T) / np.sqrt(d)
        sc = np.where(mask, sc, -np.inf)
        sc -= sc.max(axis=1, keepdims=True)
        p = np.exp(sc)
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ v[:, h // rep, :]
    return out


def forward(m, tokens, lora=False, stats=None):
    """logits [len(tokens), vocab] (float64) for the sequence starting at position 0."""
    c = m.config
    T = len(tokens)
    nh, nkv, hd = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    q_dim, kv_dim = nh * hd, nkv * hd
    n0 = c["n_layers"] - c["n_reuse_layers"]
    eps, qk_eps, theta = np.float64(np.float32(c["norm_eps"])), np.float64(np.float32(c["qk_norm_eps"])), \
        np.float64(np.float32(c["rope_theta"]))
    use_lora = lora and c["lora_rank"] > 0
    if lora and not use_lora:
        raise ValueError("%s has no LoRA" % m.path)
    lscale = c["lora_alpha"] / c["lora_rank"] if use_lora else 0.0
    ks = m.f32("kv_scale") if c["flags"] & af.FLAG_KV_SCALES else None
    W = lambda n: m.f32(n).astype(np.float64)  # noqa: E731

    def proj(x, i, wname, lname):
        y = x @ W("l%d.%s" % (i, wname)).T
        return y

    def lo(x, i, p):
        if not use_lora:
            return 0.0
        return lscale * ((x @ W("l%d.%s.lora_a" % (i, p)).T) @ W("l%d.%s.lora_b" % (i, p)).T)

    E = W("tok_embd")
    x = E[np.asarray(tokens)]
    pos = np.arange(T)
    K = V = None
    for i in range(c["n_layers"]):
        h = rmsnorm(x, W("l%d.attn_norm" % i), eps)
        if i < n0:
            qkv = proj(h, i, "qkv", None)
            q = qkv[:, :q_dim]
            k = qkv[:, q_dim:q_dim + kv_dim]
            v = qkv[:, q_dim + kv_dim:]
            if use_lora:
                q = q + lo(h, i, "q")
                k = k + lo(h, i, "k")
                v = v + lo(h, i, "v")
            k = rmsnorm(rope_halfsplit(k.reshape(T, nkv, hd), pos, theta), W("l%d.k_norm" % i), qk_eps)
            v = v.reshape(T, nkv, hd)
            if ks is not None:
                if stats is not None:
                    stats.append((i, np.abs(k).max() / (127 * ks[i, 0]), np.abs(v).max() / (127 * ks[i, 1])))
                k = fake_quant(k, ks[i, 0])
                v = fake_quant(v, ks[i, 1])
            K, V = k, v
        else:
            q = proj(h, i, "wq", None) + lo(h, i, "wq")
        q = rmsnorm(rope_halfsplit(q.reshape(T, nh, hd), pos, theta), W("l%d.q_norm" % i), qk_eps)
        a = attention(q, K, V, nkv).reshape(T, q_dim)
        x = x + a @ W("l%d.wo" % i).T + lo(a, i, "wo")
        h = rmsnorm(x, W("l%d.ffn_norm" % i), eps)
        g = h @ W("l%d.gate" % i).T + lo(h, i, "gate")
        u = h @ W("l%d.up" % i).T + lo(h, i, "up")
        act = g / (1.0 + np.exp(-g)) * u
        x = x + act @ W("l%d.down" % i).T + lo(act, i, "down")
    return rmsnorm(x, W("out_norm"), eps) @ E.T


def read_ref(path):
    import struct
    with open(path, "rb") as f:
        b = f.read()
    if b[:8] != b"AFMREF1\0":
        raise ValueError("%s: not an AFMREF1 file" % path)
    n_prompt, n_decode, vocab, _ = struct.unpack_from("<IIII", b, 8)
    n = n_prompt + n_decode
    if len(b) != 24 + 4 * n + 4 * n * vocab:
        raise ValueError("%s: %d bytes, expected %d" % (path, len(b), 24 + 4 * n + 4 * n * vocab))
    tokens = np.frombuffer(b, "<i4", n, 24)
    logits = np.frombuffer(b, "<f4", n * vocab, 24 + 4 * n).reshape(n, vocab)
    return n_prompt, n_decode, tokens, logits


def compare(afm_path, ref_path, lora=False, verbose=True):
    """(max |d| / max |ref|, max |d| / std(ref), argmax agreement) of the numpy forward vs the .ref."""
    m = af.read_model(afm_path)
    n_prompt, n_decode, tokens, ref = read_ref(ref_path)
    if ref.shape[1] != m.config["vocab_size"]:
        raise ValueError("vocab %d in %s, %d in %s" % (ref.shape[1], ref_path, m.config["vocab_size"], afm_path))
    stats = []
    got = forward(m, tokens, lora=lora, stats=stats)
    d = np.abs(got - ref)
    rel_max = d.max() / np.abs(ref).max()
    rel_std = d.max() / ref.std()
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    if verbose:
        fill = ""
        if stats:
            fill = ", K/V fill of the int8 range up to %.2f / %.2f" % (max(s[1] for s in stats), max(s[2] for s in stats))
        print("%-40s max|d| %.3g = %.2g x max|logit| = %.2g x std; argmax agree %.3f%s%s"
              % (os.path.basename(ref_path) + (" (LoRA)" if lora else ""), d.max(), rel_max, rel_std, agree, fill,
                 "" if rel_max <= TOL else "  FAIL"))
    return rel_max, rel_std, agree


PAIRS = [("afm_mini", "afm_mini", False), ("draft_mini", "draft_mini", False), ("odd_mini", "odd_mini", False),
         ("toolkit", "toolkit", False), ("toolkit", "toolkit_lora", True)]


def main(argv):
    vec = os.path.join(ROOT, "tests", "vectors")
    if argv:
        lora = "--lora" in argv
        args = [x for x in argv if x != "--lora"]
        if len(args) != 2:
            print(__doc__)
            return 2
        r, _, _ = compare(args[0], args[1], lora)
        return 0 if r <= TOL else 1
    npass = nfail = 0
    for mname, rname, lora in PAIRS:
        mp, rp = os.path.join(vec, mname + ".afm"), os.path.join(vec, rname + ".ref")
        if not (os.path.exists(mp) and os.path.exists(rp)):
            print("missing %s or %s" % (mp, rp))
            nfail += 1
            continue
        r, _, _ = compare(mp, rp, lora)
        if r <= TOL:
            npass += 1
        else:
            nfail += 1
    print("%d passed, %d failed" % (npass, nfail))
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
