#!/usr/bin/env python3
"""make_fake_toolkit.py - small fake Apple adapter-toolkit checkpoints, saved with real torch.save,
with the exact key names of docs/MODEL.md section 5, plus their converted files and MLX references.

    python3 tests/gen/make_fake_toolkit.py            # writes the files below
    python3 tests/gen/make_fake_toolkit.py --check    # regenerate in a temp dir, compare bytes

Writes
  tests/vectors/toolkit/base-model.pt           base-shaped: 2 regular + 2 KV-reuse layers, kv_quantizer
                                                ranges, base_adapter LoRA (rank 4), the tied
                                                output_transform.weight (same storage as embedding.weight),
                                                some adapted linears under `.wrapped.`, LoRA a_transpose
                                                saved as non-contiguous (transposed) views
  tests/vectors/toolkit/base-model-config.json  a FAKE config (rope_theta 100000, LoRA rank 4 / alpha 2);
                                                its layout is invented, only its key names are recognized
  tests/vectors/toolkit/draft-model.pt          draft-shaped: keys `model.layers.layer_k.`, an untied-storage
                                                but equal output_transform.weight, kv ranges, no LoRA
  tests/vectors/toolkit.afm                     tools/convert.py of base-model.pt (--type f32)
  tests/vectors/toolkit.ref                     MLX afm7 logits on the same tensors, without the LoRA
  tests/vectors/toolkit_lora.ref                MLX afm7 logits with the LoRA merged into the weights
                                                (W + alpha/r * B A): what the embedded adapter computes
  tests/vectors/toolkit_draft.ref               MLX afm7 logits of draft-model.pt (convert it to compare)

Needs torch (to write genuine PyTorch files) and mlx-lm (for the references).
"""

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools")
sys.path[:0] = [HERE, TOOLS]  # gen_ref; afmfile
import afmfile as af  # noqa: E402
import gen_ref  # noqa: E402

BASE = dict(seed=404, vocab=256, dim=32, heads=4, kv_heads=2, n0=2, n1=2, ffn=104, rank=4, alpha=2.0,
            rope_theta=100000.0, eps=1e-5)
DRAFT = dict(seed=505, vocab=128, dim=48, heads=3, kv_heads=1, n0=2, n1=0, ffn=96, rank=0, alpha=0.0,
             rope_theta=500000.0, eps=1e-5)
# adapted linears whose keys get a `.wrapped.` component: (segment, layer, module)
WRAPPED = {(0, 0, "attention.qkv_transform"), (0, 0, "attention.output_transform"),
           (0, 0, "feed_forward.hidden_transform.linear_0"), (1, 0, "attention.q_transform"),
           (1, 0, "feed_forward.output_transform"), (0, 1, "feed_forward.output_transform")}


def make_layers(c):
    """Tamm-layout numpy tensors: {(seg, layer): {part: array}} plus globals; interleaved RoPE layout."""
    g = np.random.default_rng(c["seed"])
    d, nh, nkv, f, r = c["dim"], c["heads"], c["kv_heads"], c["ffn"], c["rank"]
    hd = d // nh
    q, kv = nh * hd, nkv * hd

    def lin(o, i):
        return (g.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return g.uniform(0.75, 1.25, n).astype(np.float32)

    glob = {"embedding.weight": (g.standard_normal((c["vocab"], d)) * (2.0 / np.sqrt(d))).astype(np.float32),
            "output_norm.weight": norm(d)}
    layers = {}
    for s, n in ((0, c["n0"]), (1, c["n1"])):
        for j in range(n):
            L = {"attn_norm": norm(d), "q_norm": norm(hd), "wo": lin(d, q), "ffn_norm": norm(d),
                 "gate": lin(f, d), "up": lin(f, d), "down": lin(d, f)}
            if s == 0:
                L["qkv"] = lin(q + 2 * kv, d)
                L["k_norm"] = norm(hd)
            else:
                L["wq"] = lin(q, d)
            if r:
                io = dict(q=(d, q), k=(d, kv), v=(d, kv), wq=(d, q), wo=(q, d), gate=(d, f), up=(d, f), down=(f, d))
                for p in (("q", "k", "v") if s == 0 else ("wq",)) + ("wo", "gate", "up", "down"):
                    i_, o_ = io[p]
                    L[p + ".a"] = (g.standard_normal((i_, r)) / np.sqrt(i_)).astype(np.float32)  # a_transpose [in, r]
                    L[p + ".b"] = (g.standard_normal((r, o_)) * 0.5 / np.sqrt(r)).astype(np.float32)  # b_transpose
            layers[(s, j)] = L
    return glob, layers


def mlx_args(c):
    return dict(vocab_size=c["vocab"], hidden_dim=c["dim"], num_layers=c["n0"] + c["n1"], num_kv_reuse_layers=c["n1"],
                num_heads=c["heads"], num_kv_heads=c["kv_heads"], hidden_dim_scale_factor=c["ffn"] / c["dim"],
                rope_theta=c["rope_theta"], rms_norm_eps=c["eps"])


def to_mlx(c, glob, layers, kv_scales, merge_lora=False):
    """MLX afm7 weights (same interleaved layout); optionally with W += alpha/r * (a_t @ b_t)^T."""
    d, nh, nkv = c["dim"], c["heads"], c["kv_heads"]
    hd = d // nh
    q, kv = nh * hd, nkv * hd
    s_ = c["alpha"] / c["rank"] if c["rank"] else 0.0

    def merged(L, p, w, rows=None):
        if not merge_lora:
            return w
        delta = (s_ * (L[p + ".a"].astype(np.float64) @ L[p + ".b"].astype(np.float64))).T
        out = w.astype(np.float64).copy()
        if rows is None:
            out += delta
        else:
            out[rows[0]:rows[1]] += delta
        return out.astype(np.float32)

    w = {"model.embedding.weight": glob["embedding.weight"], "model.output_norm.weight": glob["output_norm.weight"]}
    for (s, j), L in layers.items():
        P = "model.layers.%d." % j if s == 0 else "model.kv_reuse_layers.%d." % j
        w[P + "input_layernorm.weight"] = L["attn_norm"]
        w[P + "post_attention_layernorm.weight"] = L["ffn_norm"]
        w[P + "self_attn.q_norm.weight"] = L["q_norm"]
        w[P + "self_attn.out_proj.weight"] = merged(L, "wo", L["wo"])
        w[P + "mlp.gate_proj.weight"] = merged(L, "gate", L["gate"])
        w[P + "mlp.up_proj.weight"] = merged(L, "up", L["up"])
        w[P + "mlp.down_proj.weight"] = merged(L, "down", L["down"])
        if s == 0:
            qkv = L["qkv"]
            qkv = merged(L, "q", qkv, (0, q))
            qkv = merged(L, "k", qkv, (q, q + kv))
            qkv = merged(L, "v", qkv, (q + kv, q + 2 * kv))
            w[P + "self_attn.qkv_proj.weight"] = qkv
            w[P + "self_attn.k_norm.weight"] = L["k_norm"]
            w[P + "self_attn.quant_key_scale"] = np.array(kv_scales[j, 0], np.float32)
            w[P + "self_attn.quant_value_scale"] = np.array(kv_scales[j, 1], np.float32)
        else:
            w[P + "self_attn.q_proj.weight"] = merged(L, "wq", L["wq"])
    return w


def save_toolkit(path, c, glob, layers, ranges, draft):
    import torch
    sd = {}
    pre = "model." if draft else ""
    emb = torch.from_numpy(glob["embedding.weight"].copy())
    sd[pre + "embedding.weight"] = emb
    # the base ties output_transform to the embedding storage; the draft stores an equal copy
    sd[pre + "output_transform.weight"] = emb.clone() if draft else emb

    def key(s, j, module, leaf, adapter=False):
        if draft:
            lp = "layers.layer_%d." % j
        else:
            lp = "layers.segment_%d.layer_%d." % (s, j)
        wrapped = (s, j, module) in WRAPPED and not adapter
        mid = module + (".wrapped" if wrapped else "")
        return pre + lp + mid + "." + leaf

    for (s, j), L in sorted(layers.items()):
        T = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        sd[key(s, j, "attention.norm", "weight")] = T(L["attn_norm"])
        if s == 0:
            sd[key(s, j, "attention.qkv_transform", "fused_linear.weight")] = T(L["qkv"])
            sd[key(s, j, "attention.qk_norm", "query_norm.weight")] = T(L["q_norm"])
            sd[key(s, j, "attention.qk_norm", "key_norm.weight")] = T(L["k_norm"])
        else:
            sd[key(s, j, "attention.q_transform", "weight")] = T(L["wq"])
            sd[key(s, j, "attention.q_norm", "query_norm.weight")] = T(L["q_norm"])
        sd[key(s, j, "attention.output_transform", "weight")] = T(L["wo"])
        if s == 0:
            for which, col in (("key", 0), ("value", 1)):
                sd[key(s, j, "attention.kv_quantizer", "%s_quantizer.activation_post_process.range" % which)] = \
                    T(ranges[j, col].astype(np.float32))
        sd[key(s, j, "feed_forward.norm", "weight")] = T(L["ffn_norm"])
        sd[key(s, j, "feed_forward.hidden_transform.linear_0", "weight")] = T(L["gate"])
        sd[key(s, j, "feed_forward.hidden_transform.linear_1", "weight")] = T(L["up"])
        sd[key(s, j, "feed_forward.output_transform", "weight")] = T(L["down"])
        if c["rank"]:
            mods = {"wo": "attention.output_transform", "gate": "feed_forward.hidden_transform.linear_0",
                    "up": "feed_forward.hidden_transform.linear_1", "down": "feed_forward.output_transform",
                    "wq": "attention.q_transform"}
            for p in (("q", "k", "v") if s == 0 else ("wq",)) + ("wo", "gate", "up", "down"):
                for ab in "ab":
                    a = L["%s.%s" % (p, ab)]
                    # every other layer: a_transpose saved as a transposed view (non-contiguous strides)
                    t = torch.from_numpy(np.ascontiguousarray(a.T)).t() if (ab == "a" and j % 2 == 0) else T(a)
                    if p in "qkv":
                        k = key(s, j, "attention.qkv_transform",
                                "adapters.base_adapter.lora_%d.%s_transpose" % ("qkv".index(p), ab), adapter=True)
                    else:
                        k = key(s, j, mods[p], "adapters.base_adapter.%s_transpose" % ab, adapter=True)
                    sd[k] = t
    sd[pre + "output_norm.weight"] = torch.from_numpy(glob["output_norm.weight"].copy())
    torch.save(sd, path)
    return sd


def build(c, name, outdir, draft=False):
    glob, layers = make_layers(c)
    a = mlx_args(c)
    tokens = gen_ref.tokens_for(c["vocab"], c["seed"])
    # calibrate ranges with the quantizer disabled, then widen them by 5% (asymmetric min / max)
    obs = gen_ref.calibrate(a, to_mlx(c, glob, layers, np.ones((c["n0"], 2), np.float32)), tokens)
    ranges = (obs * 1.05).astype(np.float32)                  # [layer, key/value, min/max]
    scales = np.array([[af.kv_scale_from_range(*ranges[i, j]) for j in range(2)] for i in range(c["n0"])],
                      np.float32)
    tk = os.path.join(outdir, "toolkit")
    os.makedirs(tk, exist_ok=True)
    pt = os.path.join(tk, name + ".pt")
    save_toolkit(pt, c, glob, layers, ranges, draft)
    refs = {}
    refs[("toolkit_draft" if draft else "toolkit")] = gen_ref.run_mlx(gen_ref.build_model(a, to_mlx(c, glob, layers, scales)), tokens)
    if c["rank"]:
        refs["toolkit_lora"] = gen_ref.run_mlx(gen_ref.build_model(a, to_mlx(c, glob, layers, scales, True)), tokens)
    for rn, lg in refs.items():
        gen_ref.write_ref(os.path.join(outdir, rn + ".ref"), tokens, lg)
    return pt, scales


def write_fake_config(path, c):
    cfg = {"__comment": "FAKE toolkit config for tests: the real base-model-config.json is a tamm "
                        "models:AFMTextV7Config whose layout is not public; only the key names "
                        "rope_theta / norm_eps / rank / alpha are what tools/convert.py recognizes",
           "__tamm_type__": "models:AFMTextV7Config",
           "rope_theta": c["rope_theta"], "norm_eps": c["eps"],
           "adapters": {"base_adapter": {"rank": c["rank"], "alpha": c["alpha"]}}}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def generate(outdir, verbose=True):
    os.makedirs(os.path.join(outdir, "toolkit"), exist_ok=True)
    write_fake_config(os.path.join(outdir, "toolkit", "base-model-config.json"), BASE)
    pt, sc = build(BASE, "base-model", outdir)
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert.py"), pt, "-o", os.path.join(outdir, "toolkit.afm"),
                        "--type", "f32", "--verify"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("convert.py failed:\n" + r.stdout + r.stderr)
    if verbose:
        print(r.stdout.rstrip())
    pt2, sc2 = build(DRAFT, "draft-model", outdir, draft=True)
    with tempfile.TemporaryDirectory() as td:
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert.py"), pt2, "-o", os.path.join(td, "d.afm"),
                            "--type", "f32", "--verify"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("convert.py failed on the draft:\n" + r.stdout + r.stderr)
    if verbose:
        print(r.stdout.rstrip())
        for p in sorted(os.listdir(os.path.join(outdir, "toolkit"))):
            print("%s: %d bytes" % (os.path.join(outdir, "toolkit", p), os.path.getsize(os.path.join(outdir, "toolkit", p))))
        for p in ("toolkit.afm", "toolkit.ref", "toolkit_lora.ref", "toolkit_draft.ref"):
            print("%s: %d bytes" % (os.path.join(outdir, p), os.path.getsize(os.path.join(outdir, p))))


FILES = ["toolkit/base-model.pt", "toolkit/base-model-config.json", "toolkit/draft-model.pt", "toolkit.afm",
         "toolkit.ref", "toolkit_lora.ref", "toolkit_draft.ref"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write fake Apple toolkit checkpoints and their references.")
    ap.add_argument("-o", "--outdir", default=gen_ref.VECTORS)
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare with --outdir")
    a = ap.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: torch is needed to write genuine PyTorch files (pip install torch)", file=sys.stderr)
        return 1
    if a.check:
        bad = 0
        with tempfile.TemporaryDirectory() as td:
            generate(td, verbose=False)
            for f in FILES:
                same = filecmp.cmp(os.path.join(td, f), os.path.join(a.outdir, f), shallow=False)
                print("%s: %s" % (f, "identical" if same else "DIFFERS"))
                bad += not same
        return 1 if bad else 0
    generate(a.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
