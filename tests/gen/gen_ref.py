#!/usr/bin/env python3
"""gen_ref.py - reference vectors from Apple's MLX port (mlx_lm.models.afm7), float32.

    python3 tests/gen/gen_ref.py                 # all configs -> tests/vectors/NAME.afm + NAME.ref
    python3 tests/gen/gen_ref.py afm_mini        # one of them
    python3 tests/gen/gen_ref.py --check         # regenerate into a temp dir and compare bytes with tests/vectors
    python3 tests/gen/gen_ref.py --mini [--check] # the shipped miniature family's exact-parity vectors (below)

For each config: seeded random weights in MLX afm7 layout (interleaved RoPE), KV-quantizer scales
calibrated on the same token sequence (see calibrate()), an MLX folder (config.json +
model.safetensors) in a temp dir, converted with tools/convert.py --type f32 (the MLX route), and
logits from mlx_lm's own loader and model: a 64-token prompt prefilled in one call with
model.make_cache(), then 16 single-token decode steps feeding fixed random ids.

NAME.ref (little-endian): b"AFMREF1\\0", u32 n_prompt, u32 n_decode, u32 vocab, u32 0,
i32 tokens[n_prompt + n_decode], f32 logits[n_prompt + n_decode][vocab]
(row p < n_prompt: the prefill call's logits at prompt position p; row n_prompt + s: decode step s,
whose input token is tokens[n_prompt + s]).

--mini: tests/vectors/mini_{base,json,draft}.topk, MLX's logits for models/mini/base.afm, base.afm +
json.afma and draft.afm on their decoded weights (see the section "Exact-parity vectors" below; the
format is write_topk's, docs/TOOLS.md); needs sentencepiece too.

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
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.join(ROOT, "tools")
VECTORS = os.path.join(ROOT, "tests", "vectors")
sys.path[:0] = [TOOLS, os.path.join(ROOT, "train")]  # afmfile, adapterfile; mini_task
import afmfile as af  # noqa: E402

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
    cmd = [sys.executable, os.path.join(TOOLS, "convert.py"), src, "-o", dst, "--type", "f32", "-q"] + list(extra)
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


# ================================================================================================
# Exact-parity vectors of the shipped miniature family (models/mini, docs/TRAINING.md)
#
# The reference is MLX afm7 (float32) on the files' decoded weights (Q2B / Q4 decoded bit-exactly,
# back in MLX's interleaved RoPE layout), with the int8 KV fake quantizer; with the adapter, MLX's
# LoRA layers carry the .afma's tensors. An int8 KV value whose x / scale lies within float noise of
# a rounding boundary (k + 0.5) may round either way in another float32 implementation, which moves
# the logits by ~1e-3 of their std and would make a 1e-4 test flaky. So the token sequence is chosen
# here, one position at a time, with a float64 forward pass (Mini64): at every position, the first
# candidate token (the text's own token, then the model's own ranking) whose new K and V values all
# lie at least KV_MARGIN from every boundary, and whose logits have a top-1 / top-2 gap of at least
# GAP standard deviations (so that the engine's int8-activation path, ~6e-2 std off, keeps the argmax).
# MLX's own K/V codes are then checked to equal the float64 ones, and the script refuses otherwise.

MINI_DIR = os.path.join(ROOT, "models", "mini")
MINI_TEXT = ("In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void; "
             "and darkness was upon the face of the deep.")
MINI_CHAT = "Describe as JSON: Blessed are the meek: for they shall inherit the earth."
MINI = {
    # name: (model, adapter, prompt kind, prompt tokens kept (None: all))
    "mini_base": ("base.afm", None, "text", 32),
    "mini_draft": ("draft.afm", None, "text", 32),
    "mini_json": ("base.afm", "json.afma", "chat", None),
}
MINI_DECODE = 8
MINI_TOPK = 64
KV_MARGIN = 1e-3      # min distance of x / scale from an int8 rounding boundary, in quantization steps
GAP = 0.25            # min top-1 minus top-2 logit, in units of that row's logit std
TOPK_MAGIC = b"AFMTOPK1"


def boundary_distance(y):
    """Distance of y = x / scale from the nearest int8 rounding boundary: k + 0.5 for k = -128 .. 126
    (beyond those the clip to [-128, 127] decides)."""
    b = np.clip(np.floor(y) + 0.5, -127.5, 126.5)
    return np.abs(y - b)


class Mini64:
    """float64 forward pass of an afm file (weights decoded, the file's half-split layout), int8 KV fake
    quantizer with rounding decided on the float64 x / scale; evaluates B continuations of L tokens
    after one shared prefix (the cache)."""

    def __init__(self, model_path, adapter_path=None):
        m = af.read_model(model_path)
        c = self.c = m.config
        if not c["flags"] & af.FLAG_KV_SCALES:
            raise ValueError("%s has no int8 KV scales" % model_path)
        self.nh, self.nkv, self.hd = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        self.n0 = c["n_layers"] - c["n_reuse_layers"]
        self.W = {n: m.f32(n).astype(np.float64) for n, _, kind in af.tensor_specs(c) if kind not in ("lora", "kvscale")}
        self.ks = m.f32("kv_scale")
        self.eps, self.qk_eps = float(np.float32(c["norm_eps"])), float(np.float32(c["qk_norm_eps"]))
        half = self.hd // 2
        self.inv = float(np.float32(c["rope_theta"])) ** (-np.arange(half, dtype=np.float64) * 2.0 / self.hd)
        self.lora, self.lscale = {}, 0.0
        if adapter_path:
            import adapterfile
            ad = adapterfile.read_adapter(adapter_path)
            probs = adapterfile.adapter_problems_for_model(ad, c)
            if probs:
                raise ValueError("%s does not fit %s: %s" % (adapter_path, model_path, "; ".join(probs)))
            self.lscale = ad.alpha / ad.rank
            self.lora = {n: ad.f32(n).astype(np.float64) for n in ad.names()}

    @staticmethod
    def _mm(x, w):
        """x [..., in] @ w.T as one 2-D product (a stack of rows would be one matrix-vector product each)."""
        return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))

    def _lin(self, x, i, w, lora):
        y = self._mm(x, self.W["l%d.%s" % (i, w)]) if w else 0.0
        if self.lora:
            a, b = self.lora["l%d.%s.lora_a" % (i, lora)], self.lora["l%d.%s.lora_b" % (i, lora)]
            y = y + self.lscale * self._mm(self._mm(x, a), b)
        return y

    @staticmethod
    def _rms(x, w, eps):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def _rope(self, x, pos):
        ang = pos[:, None].astype(np.float64) * self.inv[None, :]             # [L, hd/2]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        h = self.hd // 2
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)

    def new_cache(self):
        z = np.zeros((0, self.nkv, self.hd))
        return [(z, z) for _ in range(self.n0)]

    def run(self, cache, toks, pos0):
        """toks [B, L] after the cache's pos0 positions -> (logits [B, L, vocab], new K/V per regular
        layer [(Kq [B, L, nkv, hd], Vq)], x/scale values [(yk, yv)] of the new tokens)."""
        toks = np.asarray(toks)
        B, L = toks.shape
        nh, nkv, hd, rep = self.nh, self.nkv, self.hd, self.nh // self.nkv
        q_dim, kv_dim = nh * hd, nkv * hd
        pos = pos0 + np.arange(L)
        S = pos0 + L
        mask = np.arange(S)[None, :] <= pos[:, None]                                   # [L, S]
        x = self.W["tok_embd"][toks]
        new, ys = [], []
        K = V = None
        for i in range(self.c["n_layers"]):
            h = self._rms(x, self.W["l%d.attn_norm" % i], self.eps)
            if i < self.n0:
                qkv = self._mm(h, self.W["l%d.qkv" % i])
                q, k, v = qkv[..., :q_dim], qkv[..., q_dim:q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
                if self.lora:
                    q, k, v = q + self._lin(h, i, None, "q"), k + self._lin(h, i, None, "k"), v + self._lin(h, i, None, "v")
                k = self._rms(self._rope(k.reshape(B, L, nkv, hd), pos), self.W["l%d.k_norm" % i], self.qk_eps)
                v = v.reshape(B, L, nkv, hd)
                sk, sv = self.ks[i]
                yk, yv = k / float(sk), v / float(sv)
                kq = (np.clip(np.rint(yk), -128, 127).astype(np.float32) * sk).astype(np.float64)
                vq = (np.clip(np.rint(yv), -128, 127).astype(np.float32) * sv).astype(np.float64)
                new.append((kq, vq))
                ys.append((yk, yv))
                pk, pv = cache[i]
                K = np.concatenate([np.broadcast_to(pk, (B,) + pk.shape), kq], axis=1)
                V = np.concatenate([np.broadcast_to(pv, (B,) + pv.shape), vq], axis=1)
            else:
                q = self._lin(h, i, "wq", "wq")
            q = self._rms(self._rope(q.reshape(B, L, nh, hd), pos), self.W["l%d.q_norm" % i], self.qk_eps)
            sc = np.einsum("blgrd,bsgd->bgrls", q.reshape(B, L, nkv, rep, hd), K) / np.sqrt(hd)
            sc = np.where(mask, sc, -np.inf)
            sc -= sc.max(axis=-1, keepdims=True)
            p = np.exp(sc)
            p /= p.sum(axis=-1, keepdims=True)
            att = np.einsum("bgrls,bsgd->blgrd", p, V).reshape(B, L, q_dim)
            x = x + self._lin(att, i, "wo", "wo")
            h = self._rms(x, self.W["l%d.ffn_norm" % i], self.eps)
            g, u = self._lin(h, i, "gate", "gate"), self._lin(h, i, "up", "up")
            x = x + self._lin(g / (1.0 + np.exp(-g)) * u, i, "down", "down")
        return self._mm(self._rms(x, self.W["out_norm"], self.eps), self.W["tok_embd"]), new, ys


def _gap(row):
    top = np.partition(row, -2)[-2:]
    return (top[1] - top[0]) / row.std()


def choose_tokens(eng, natural, n_prompt, n_decode, log=print, chunk=16):
    """The sequence (see the section comment): position by position, the first candidate that meets
    KV_MARGIN and GAP. Candidates: the natural token (prompt positions), then the model's ranking."""
    cache = eng.new_cache()
    toks, prev, subst = [], None, []
    V = eng.c["vocab_size"]
    for t in range(n_prompt + n_decode):
        cands = [int(natural[t])] if t < n_prompt else []
        order = np.argsort(-prev, kind="stable") if prev is not None else np.arange(V)
        cands += [int(c) for c in order[:256] if int(c) not in cands]
        pick = None
        for s in range(0, len(cands), chunk):
            cc = cands[s:s + chunk]
            logits, new, ys = eng.run(cache, np.array(cc)[:, None], t)
            marg = np.min([np.min(boundary_distance(y).reshape(len(cc), -1), axis=1) for yy in ys for y in yy], axis=0)
            for b, tok in enumerate(cc):
                if marg[b] > KV_MARGIN and _gap(logits[b, 0]) > GAP:
                    pick = (b, tok)
                    break
            if pick:
                break
        if pick is None:
            raise RuntimeError("position %d: none of %d candidates has every K/V value %g from a rounding boundary "
                               "and a top-2 gap of %g std" % (t, len(cands), KV_MARGIN, GAP))
        b, tok = pick
        cache = [(np.concatenate([pk, kq[b, 0][None]]), np.concatenate([pv, vq[b, 0][None]]))
                 for (pk, pv), (kq, vq) in zip(cache, new)]
        if t < n_prompt and tok != natural[t]:
            subst.append(t)
        toks.append(tok)
        prev = logits[b, 0]
    log("  tokens chosen: %d prompt positions kept their text token, %d took another (%s)"
        % (n_prompt - len(subst), len(subst), ", ".join(map(str, subst)) or "none"))
    return np.array(toks, np.int32)


def mini_mlx_weights(eng_model_path):
    """MLX afm7 weights (interleaved RoPE layout) from an afm file, quantized tensors decoded."""
    m = af.read_model(eng_model_path)
    c = m.config
    nh, nkv, hd = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    q, kv = nh * hd, nkv * hd
    n0 = c["n_layers"] - c["n_reuse_layers"]
    f = m.f32
    w = {"model.embedding.weight": f("tok_embd"), "model.output_norm.weight": f("out_norm")}
    ks = f("kv_scale")
    for i in range(c["n_layers"]):
        P = "model.layers.%d." % i if i < n0 else "model.kv_reuse_layers.%d." % (i - n0)
        L = "l%d." % i
        w[P + "input_layernorm.weight"] = f(L + "attn_norm")
        w[P + "post_attention_layernorm.weight"] = f(L + "ffn_norm")
        w[P + "self_attn.q_norm.weight"] = af.permute_vec_to_interleaved(f(L + "q_norm"))
        w[P + "self_attn.out_proj.weight"] = f(L + "wo")
        w[P + "mlp.gate_proj.weight"] = f(L + "gate")
        w[P + "mlp.up_proj.weight"] = f(L + "up")
        w[P + "mlp.down_proj.weight"] = f(L + "down")
        if i < n0:
            W = f(L + "qkv")
            w[P + "self_attn.qkv_proj.weight"] = np.concatenate([
                af.permute_rows_to_interleaved(W[:q], nh, hd), af.permute_rows_to_interleaved(W[q:q + kv], nkv, hd),
                W[q + kv:]], axis=0)
            w[P + "self_attn.k_norm.weight"] = af.permute_vec_to_interleaved(f(L + "k_norm"))
            w[P + "self_attn.quant_key_scale"] = np.array(ks[i, 0], np.float32)
            w[P + "self_attn.quant_value_scale"] = np.array(ks[i, 1], np.float32)
        else:
            w[P + "self_attn.q_proj.weight"] = af.permute_rows_to_interleaved(f(L + "wq"), nh, hd)
    args = dict(model_type="afm7", vocab_size=c["vocab_size"], hidden_dim=c["dim"], num_layers=c["n_layers"],
                num_kv_reuse_layers=c["n_reuse_layers"], num_heads=nh, num_kv_heads=nkv,
                hidden_dim_scale_factor=c["ffn_dim"] / c["dim"], rope_theta=float(np.float32(c["rope_theta"])),
                rms_norm_eps=float(np.float32(c["norm_eps"])))
    if c["dim"] != q or int(c["dim"] * args["hidden_dim_scale_factor"]) != c["ffn_dim"] or c["qk_norm_eps"] != np.float32(1e-5):
        raise ValueError("%s: shape not expressible in MLX afm7" % eng_model_path)
    return args, w


def mini_mlx_logits(model_path, adapter_path, tokens, n_prompt):
    """MLX logits [n, vocab] (prefill of n_prompt tokens in one call, then single tokens) and the int8
    codes its fake quantizer produced for every K / V, in call order."""
    import mlx.core as mx
    from mlx_lm.models import afm7
    from mlx_lm.tuner.lora import LoRALinear
    args, w = mini_mlx_weights(model_path)
    model = afm7.Model(afm7.ModelArgs.from_dict(args))
    model.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)
    if adapter_path:
        import adapterfile
        ad = adapterfile.read_adapter(adapter_path)
        nh, nkv, hd = args["num_heads"], args["num_kv_heads"], args["hidden_dim"] // args["num_heads"]

        def ab(i, p):
            a = ad.f32("l%d.%s.lora_a" % (i, p))
            b = ad.f32("l%d.%s.lora_b" % (i, p))
            if p in ("q", "wq", "k"):
                b = af.permute_rows_to_interleaved(b, nkv if p == "k" else nh, hd)
            return mx.array(np.ascontiguousarray(a.T)), mx.array(np.ascontiguousarray(b.T))

        def lora(linear, i, p):
            ll = LoRALinear.from_base(linear, r=ad.rank, dropout=0.0, scale=ad.scale)
            ll.lora_a, ll.lora_b = ab(i, p)
            return ll

        n0 = args["num_layers"] - args["num_kv_reuse_layers"]
        for i, layer in enumerate(list(model.model.layers) + list(model.model.kv_reuse_layers)):
            at = layer.self_attn
            if i < n0:
                fl = at.qkv_proj.to_lora(r=ad.rank, dropout=0.0, scale=ad.scale)
                pairs = [ab(i, p) for p in "qkv"]
                fl.lora_a, fl.lora_b = [a for a, _ in pairs], [b for _, b in pairs]
                at.qkv_proj = fl
            else:
                at.q_proj = lora(at.q_proj, i, "wq")
            at.out_proj = lora(at.out_proj, i, "wo")
            for nm, p in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                setattr(layer.mlp, nm, lora(getattr(layer.mlp, nm), i, p))
    model.eval()
    mx.eval(model.parameters())
    codes = []
    orig = afm7.fake_8bit_quant

    def record(x, scale):
        # x / scale as MLX computes it (float32), [1, heads, L, hd] -> the file's [1, L, heads, hd], and
        # keys (even calls: K then V per layer) from the interleaved to the half-split RoPE layout
        y = np.array((x.astype(mx.float32) / scale).astype(mx.float32)).transpose(0, 2, 1, 3)
        if len(codes) % 2 == 0:
            y = np.concatenate([y[..., 0::2], y[..., 1::2]], axis=-1)
        codes.append((np.clip(np.rint(y), -128, 127), boundary_distance(y.astype(np.float64)).min()))
        return orig(x, scale)

    afm7.fake_8bit_quant = record
    try:
        cache = model.make_cache()
        out = model(mx.array(np.asarray(tokens[:n_prompt])[None]), cache=cache)
        mx.eval(out)
        rows = [np.array(out[0].astype(mx.float32))]
        for t in tokens[n_prompt:]:
            out = model(mx.array([[int(t)]]), cache=cache)
            mx.eval(out)
            rows.append(np.array(out[0].astype(mx.float32)))
    finally:
        afm7.fake_8bit_quant = orig
    return np.concatenate(rows, axis=0), codes


def write_topk(path, n_prompt, tokens, logits, full_rows, kv_margin, min_gap):
    """NAME.topk (little-endian): b"AFMTOPK1", u32 n_prompt, n_decode, vocab, k, n_full, 0,
    f32 std (of all reference logits), f32 min K/V boundary distance, f32 min top-2 gap / row std, f32 0,
    i32 tokens[n], i32 full_rows[n_full], per row: i32 ids[k] (descending logit) then f32 logits[k];
    then f32 logits[n_full][vocab] of the full rows."""
    n, V = logits.shape
    k = MINI_TOPK
    with open(path, "wb") as f:
        f.write(TOPK_MAGIC + struct.pack("<IIIIII", n_prompt, n - n_prompt, V, k, len(full_rows), 0))
        f.write(struct.pack("<ffff", logits.std(dtype=np.float64), kv_margin, min_gap, 0.0))
        f.write(np.asarray(tokens, "<i4").tobytes() + np.asarray(full_rows, "<i4").tobytes())
        for r in range(n):
            ids = np.argsort(-logits[r], kind="stable")[:k]
            f.write(ids.astype("<i4").tobytes() + logits[r, ids].astype("<f4").tobytes())
        f.write(np.ascontiguousarray(logits[full_rows], "<f4").tobytes())


def read_topk(path):
    with open(path, "rb") as f:
        b = f.read()
    if b[:8] != TOPK_MAGIC:
        raise ValueError("%s: not an AFMTOPK1 file" % path)
    n_prompt, n_decode, V, k, n_full, _ = struct.unpack_from("<IIIIII", b, 8)
    std, margin, gap, _ = struct.unpack_from("<ffff", b, 32)
    n = n_prompt + n_decode
    if len(b) != 48 + 4 * (n + n_full) + n * k * 8 + n_full * V * 4:
        raise ValueError("%s: %d bytes, does not match its header" % (path, len(b)))
    o = 48
    tokens = np.frombuffer(b, "<i4", n, o)
    full_rows = np.frombuffer(b, "<i4", n_full, o + 4 * n)
    o += 4 * (n + n_full)
    rows = np.frombuffer(b, np.uint8, n * k * 8, o).reshape(n, 2, k * 4)
    ids = rows[:, 0].copy().view("<i4")
    vals = rows[:, 1].copy().view("<f4")
    full = np.frombuffer(b, "<f4", n_full * V, o + n * k * 8).reshape(n_full, V)
    return dict(n_prompt=n_prompt, n_decode=n_decode, vocab=V, tokens=tokens, ids=ids, vals=vals,
                full_rows=full_rows, full=full, std=std, margin=margin, gap=gap)


def mini_prompt(kind, n_keep):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(MINI_DIR, "tokenizer.model"))
    if kind == "chat":
        import mini_task
        ids = mini_task.encode_prompt(sp, mini_task.render_prompt(MINI_CHAT))
    else:
        ids = [sp.eos_id()] + sp.encode(MINI_TEXT.replace("\n", "<n>"))
    if n_keep is not None:
        if len(ids) < n_keep:
            raise RuntimeError("the text gives %d tokens, fewer than %d" % (len(ids), n_keep))
        ids = ids[:n_keep]
    return ids


def generate_mini(name, outdir, verbose=True):
    log = print if verbose else (lambda *a: None)
    mfile, afile, kind, n_keep = MINI[name]
    mpath = os.path.join(MINI_DIR, mfile)
    apath = os.path.join(MINI_DIR, afile) if afile else None
    natural = mini_prompt(kind, n_keep)
    n_prompt = len(natural)
    log("%s: %s%s, %d prompt tokens + %d decode steps" % (name, mfile, " + " + afile if afile else "", n_prompt, MINI_DECODE))
    eng = Mini64(mpath, apath)
    tokens = choose_tokens(eng, natural, n_prompt, MINI_DECODE, log)
    # float64 over the chosen sequence, as the engine runs it: prefill in one pass, then single tokens
    cache = eng.new_cache()
    l64, new, ys = eng.run(cache, tokens[None, :n_prompt], 0)
    rows64, yall = [l64[0]], [ys]
    cache = [(kq[0], vq[0]) for kq, vq in new]
    for t in range(n_prompt, len(tokens)):
        l, new, ys = eng.run(cache, tokens[None, t:t + 1], t)
        rows64.append(l[0])
        yall.append(ys)
        cache = [(np.concatenate([pk, kq[0]]), np.concatenate([pv, vq[0]])) for (pk, pv), (kq, vq) in zip(cache, new)]
    l64 = np.concatenate(rows64, axis=0)
    margin64 = min(float(boundary_distance(y).min()) for ys in yall for yy in ys for y in yy)
    gap64 = min(_gap(r) for r in l64)
    logits, codes = mini_mlx_logits(mpath, apath, tokens, n_prompt)
    # MLX's codes, call by call (each call: K then V of every regular layer), against float64's
    want = [np.clip(np.rint(y), -128, 127) for ys in yall for yy in ys for y in yy]
    if len(codes) != len(want):
        raise RuntimeError("MLX made %d quantizer calls, expected %d" % (len(codes), len(want)))
    ndiff = sum(int(np.sum(c.reshape(-1) != w_.reshape(-1))) for (c, _), w_ in zip(codes, want))
    margin_mlx = min(m_ for _, m_ in codes)
    d64 = float(np.abs(logits - l64).max() / logits.std())
    agree = float(np.mean(logits.argmax(1) == l64.argmax(1)))
    log("  float64 pass: min |x/scale - boundary| %.3g (limit %g), min top-2 gap %.3g std (limit %g)"
        % (margin64, KV_MARGIN, gap64, GAP))
    log("  MLX: %d K/V codes differ from float64's, its own min distance %.3g; max |MLX - float64| = %.2g std, "
        "argmax agree %.3f" % (ndiff, margin_mlx, d64, agree))
    if ndiff or margin64 <= KV_MARGIN or gap64 <= GAP or d64 > 1e-5 or agree < 1:
        raise RuntimeError("%s: refusing to write a reference that another float32 implementation could round "
                           "differently (see the numbers above)" % name)
    full_rows = [n_prompt - 1, len(tokens) - 1]
    path = os.path.join(outdir, name + ".topk")
    write_topk(path, n_prompt, tokens, logits, full_rows, margin64, gap64)
    log("  -> %s (%d bytes), logits std %.3f, tokens %s" % (path, os.path.getsize(path), logits.std(),
                                                             ",".join(map(str, tokens))))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate MLX reference vectors.")
    ap.add_argument("names", nargs="*", help="configs (default all: %s)" % ", ".join(CONFIGS))
    ap.add_argument("-o", "--outdir", default=VECTORS)
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare with --outdir")
    ap.add_argument("--mini", action="store_true",
                    help="the exact-parity vectors of models/mini (%s.topk; needs sentencepiece)" % ".topk, ".join(MINI))
    a = ap.parse_args(argv)
    if a.mini:
        names = a.names or list(MINI)
        for n in names:
            if n not in MINI:
                ap.error("unknown miniature case %s (%s)" % (n, ", ".join(MINI)))
        for mod in ("mlx_lm", "sentencepiece"):
            try:
                __import__(mod)
            except ImportError:
                print("error: --mini needs %s (pip install %s)" % (mod, "mlx[cpu] mlx-lm" if mod == "mlx_lm" else mod),
                      file=sys.stderr)
                return 1
        try:
            if not a.check:
                os.makedirs(a.outdir, exist_ok=True)
                for n in names:
                    generate_mini(n, a.outdir)
                return 0
            bad = 0
            with tempfile.TemporaryDirectory() as td:
                for n in names:
                    generate_mini(n, td, verbose=False)
                    same = filecmp.cmp(os.path.join(td, n + ".topk"), os.path.join(a.outdir, n + ".topk"), shallow=False)
                    print("%s.topk: %s" % (n, "identical" if same else "DIFFERS"))
                    bad += not same
            return 1 if bad else 0
        except (RuntimeError, ValueError, OSError, af.AfmError) as e:
            print("error: %s" % e, file=sys.stderr)
            return 1
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
