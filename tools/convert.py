#!/usr/bin/env python3
"""convert.py - convert AFMTextV7 weights to an afm model file (docs/FORMAT.md v1). numpy only.

Sources (detected automatically):
  * Apple's adapter-toolkit checkpoints: base-model.pt / draft-model.pt (PyTorch zip, key names
    of docs/MODEL.md section 5; `.wrapped.` path components, a leading `model.`, the tied
    output_transform.weight, kv_quantizer ranges and the embedded base_adapter LoRA are handled);
  * a folder in Apple's MLX afm7 layout: config.json + *.safetensors (sharded or not, plain or
    affine-quantized, which is dequantized here);
  * an afm model file (re-encoded with other types: config, tokenizer and signature are kept).

Types: --type f32 | f16 | bf16 | q2b | q4 | q8 for the projections, --embd-type for the embedding
(default: the same as --type, but q4 for --type q2b, as Apple's 2-bit models keep a 4-bit
embedding), --group 64 (128, 256, 512) for the quantized types; norms and KV scales stay F32, LoRA
is F32 or F16 (--lora-type). The quantized types are encoded by tools/quant.py: weights that lie
exactly on a balanced grid with fp16 scales (QAT checkpoints) are encoded exactly, decode(encode(w))
== w bit for bit; the others get MSE-fitted scales, and a per-tensor error report is printed
(--exact turns any lossy tensor into an error).

    python3 tools/convert.py assets/base-model.pt -o afm-base.afm --type bf16 \\
        --tokenizer assets/tokenizer.model --signature 9799725ff8e851184037110b422d891ad3b92ec1
    python3 tools/convert.py assets/draft-model.pt -o afm-draft.afm --type bf16
    python3 tools/convert.py path/to/mlx-afm7-folder -o afm.afm --type f32
    python3 tools/convert.py RUN/toolkit/base-model.pt -o base.afm --type q2b --embd-type q4 --exact
    python3 tools/convert.py base-f32.afm -o base-q4.afm --type q4          # re-encode an afm file

The Q and K projection rows (and q_norm / k_norm, and LoRA B of q, k and wq) are permuted from the
interleaved RoPE layout of tamm/MLX to the half-split layout the file stores (FORMAT.md "RoPE layout").
Errors are reported as one `error:` line (listing every missing or unknown key), never a traceback
(use --debug to see one).
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import afmfile as af  # noqa: E402
import quant  # noqa: E402
from ckptread import CheckpointError, LazyTensor, read_safetensors, read_torch_zip  # noqa: E402

AFM_DEFAULTS = dict(rope_theta=500000.0, norm_eps=1e-5, context_length=4096, lora_alpha=16.0)
MLX_DEFAULTS = dict(rope_theta=50000.0, rms_norm_eps=1e-5, hidden_dim_scale_factor=3.25)  # afm7.ModelArgs


class ConvertError(Exception):
    pass


def _list(items, limit=60):
    items = list(items)
    s = ", ".join(items[:limit])
    if len(items) > limit:
        s += ", ... (%d more)" % (len(items) - limit)
    return s


# ================================================================================================
# Apple toolkit (.pt)

_ADAPTER = "adapters.base_adapter."
SEG0_PARTS = {
    "attention.norm.weight": "attn_norm",
    "attention.qkv_transform.fused_linear.weight": "qkv",
    "attention.qk_norm.query_norm.weight": "q_norm",
    "attention.qk_norm.key_norm.weight": "k_norm",
    "attention.output_transform.weight": "wo",
    "attention.kv_quantizer.key_quantizer.activation_post_process.range": "kv_k",
    "attention.kv_quantizer.value_quantizer.activation_post_process.range": "kv_v",
    "feed_forward.norm.weight": "ffn_norm",
    "feed_forward.hidden_transform.linear_0.weight": "gate",
    "feed_forward.hidden_transform.linear_1.weight": "up",
    "feed_forward.output_transform.weight": "down",
}
SEG1_PARTS = {
    "attention.norm.weight": "attn_norm",
    "attention.q_transform.weight": "wq",
    "attention.q_norm.query_norm.weight": "q_norm",
    "attention.output_transform.weight": "wo",
    "feed_forward.norm.weight": "ffn_norm",
    "feed_forward.hidden_transform.linear_0.weight": "gate",
    "feed_forward.hidden_transform.linear_1.weight": "up",
    "feed_forward.output_transform.weight": "down",
}
_LORA_MODULES0 = {"attention.output_transform": "wo", "feed_forward.hidden_transform.linear_0": "gate",
                  "feed_forward.hidden_transform.linear_1": "up", "feed_forward.output_transform": "down"}
for _m, _p in _LORA_MODULES0.items():
    for _ab in "ab":
        SEG0_PARTS["%s.%s%s_transpose" % (_m, _ADAPTER, _ab)] = "%s.%s" % (_p, _ab)
        SEG1_PARTS["%s.%s%s_transpose" % (_m, _ADAPTER, _ab)] = "%s.%s" % (_p, _ab)
    for _ab in "ab":
        for _i, _p in enumerate("qkv"):
            SEG0_PARTS["attention.qkv_transform.%slora_%d.%s_transpose" % (_ADAPTER, _i, _ab)] = "%s.%s" % (_p, _ab)
        SEG1_PARTS["attention.q_transform.%s%s_transpose" % (_ADAPTER, _ab)] = "wq.%s" % _ab
BASE0 = ("attn_norm", "qkv", "q_norm", "k_norm", "wo", "ffn_norm", "gate", "up", "down")
BASE1 = ("attn_norm", "wq", "q_norm", "wo", "ffn_norm", "gate", "up", "down")

_LAYER_RE = re.compile(r"^layers\.(?:segment_(\d+)\.)?layer_(\d+)\.(.+)$")


def _toolkit_key(k):
    """Normalize a toolkit key: drop a leading `model.` and every `.wrapped` / `._wrapped` component."""
    if k.startswith("model."):
        k = k[len("model."):]
    return re.sub(r"\.(?:_?wrapped)(?=\.)", "", k)


def _find_json_values(obj, names, path=""):
    """[(path, value)] for every numeric value under a key (case-insensitive) in names."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = "%s.%s" % (path, k) if path else str(k)
            if str(k).lower() in names and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((p, v))
            out += _find_json_values(v, names, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _find_json_values(v, names, "%s[%d]" % (path, i))
    return out


# quantity: [(key name, words one of which the key's path must contain, or None)]
CONFIG_KEYS = {
    "rope_theta": [("rope_theta", None), ("rope_base", None), ("rotary_base", None), ("rotary_emb_base", None),
                   ("theta", ("rope", "rotary", "position"))],
    "norm_eps": [("norm_eps", None), ("rms_norm_eps", None), ("layer_norm_eps", None), ("eps", ("norm",))],
    "context_length": [("context_length", None), ("max_sequence_length", None), ("max_seq_len", None),
                       ("max_seq_length", None), ("max_position_embeddings", None)],
    "lora_alpha": [("lora_alpha", None), ("alpha", ("adapter", "lora"))],
    "lora_rank": [("lora_rank", None), ("rank", ("adapter", "lora"))],
}


def read_toolkit_config(path):
    """{quantity: (value, 'from FILE: key.path')} for the hyperparameters recognizable in a toolkit
    config JSON; a quantity found with different values is left out (reported as ambiguous)."""
    try:
        with open(path, "rb") as f:
            j = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError("config %s: %s" % (path, e))
    found, notes = {}, []
    for q, rules in CONFIG_KEYS.items():
        vals = []
        for key, ctx in rules:
            for p, v in _find_json_values(j, (key,)):
                if ctx is None or any(w in p.lower().rsplit(".", 1)[0] for w in ctx):
                    vals.append((p, v))
        distinct = sorted(set(float(v) for _, v in vals))
        if len(distinct) == 1:
            found[q] = (distinct[0], "from %s: %s" % (os.path.basename(path), ", ".join(p for p, _ in vals)))
        elif len(distinct) > 1:
            notes.append("%s: %s in %s has different values (%s): ignored"
                         % (os.path.basename(path), q, ", ".join(p for p, _ in vals), ", ".join("%g" % v for v in distinct)))
    return found, notes


def _drop_ignored(sd, a, notes):
    if not a.ignore:
        return sd
    try:
        pats = [re.compile(p) for p in a.ignore]
    except re.error as e:
        raise ConvertError("--ignore: bad regular expression: %s" % e)
    drop = [k for k in sd if any(p.search(k) for p in pats)]
    if drop:
        notes.append("ignored %d source keys (--ignore): %s" % (len(drop), _list(drop, 10)))
    return {k: v for k, v in sd.items() if k not in set(drop)}


def plan_toolkit(path, a, notes):
    sd = read_torch_zip(path)
    sd = _drop_ignored(sd, a, notes)
    tensors, problems, unknown, dup = {}, [], [], []
    for k, v in sd.items():
        if not isinstance(v, LazyTensor):
            problems.append("%s is a %s, not a tensor" % (k, type(v).__name__))
            continue
        nk = _toolkit_key(k)
        if nk in tensors:
            dup.append("%s and %s" % (tensors[nk].name, k))
        tensors[nk] = v
    if dup:
        raise ConvertError("keys that name the same tensor after removing `model.`/`.wrapped`: " + _list(dup))
    layers = {0: {}, 1: {}}
    segmented = unsegmented = False
    glob_parts = {}
    for k, v in tensors.items():
        if k in ("embedding.weight", "output_transform.weight", "output_norm.weight"):
            glob_parts[k] = v
            continue
        m = _LAYER_RE.match(k)
        if not m:
            unknown.append(k)
            continue
        seg = m.group(1)
        if seg is None:
            unsegmented = True
            seg = 0
        else:
            segmented = True
            seg = int(seg)
        parts = SEG0_PARTS if seg == 0 else SEG1_PARTS if seg == 1 else None
        if parts is None or m.group(3) not in parts:
            unknown.append(k)
            continue
        layers[seg].setdefault(int(m.group(2)), {})[parts[m.group(3)]] = (k, v)
    if segmented and unsegmented:
        raise ConvertError("both `layers.segment_N.layer_K.` (base) and `layers.layer_K.` (draft) keys present")
    kind = "draft" if unsegmented else "base"
    n0 = max(layers[0]) + 1 if layers[0] else 0
    n1 = max(layers[1]) + 1 if layers[1] else 0
    has_kv = any(p in L for L in layers[0].values() for p in ("kv_k", "kv_v"))
    has_lora = any("." in p for s in (0, 1) for L in layers[s].values() for p in L)
    pre = "layers.layer_%d." if kind == "draft" else "layers.segment_0.layer_%d."
    missing = [g for g in ("embedding.weight", "output_norm.weight") if g not in glob_parts]
    inv0 = {v: k for k, v in SEG0_PARTS.items()}
    inv1 = {v: k for k, v in SEG1_PARTS.items()}
    for i in range(n0):
        want = list(BASE0) + (["kv_k", "kv_v"] if has_kv else [])
        if has_lora:
            want += ["%s.%s" % (p, ab) for p in ("q", "k", "v", "wo", "gate", "up", "down") for ab in "ab"]
        L = layers[0].get(i, {})
        missing += [pre % i + inv0[p] for p in want if p not in L]
    for j in range(n1):
        want = list(BASE1)
        if has_lora:
            want += ["%s.%s" % (p, ab) for p in ("wq", "wo", "gate", "up", "down") for ab in "ab"]
        L = layers[1].get(j, {})
        missing += ["layers.segment_1.layer_%d." % j + inv1[p] for p in want if p not in L]
    if n0 == 0:
        missing.append((pre % 0) + "... (no segment-0 layers at all)")
    if problems or unknown or missing:
        msg = []
        if missing:
            msg.append("missing keys (%d): %s" % (len(missing), _list(missing)))
        if unknown:
            msg.append("unknown keys (%d): %s" % (len(unknown), _list(sorted(unknown))))
        if problems:
            msg.append("not tensors: " + _list(problems))
        raise ConvertError("%s: %s" % (path, "; ".join(msg)))

    # --- hyperparameters from shapes
    emb = glob_parts["embedding.weight"]
    if len(emb.shape) != 2:
        raise ConvertError("embedding.weight has shape %s, expected [vocab, dim]" % (emb.shape,))
    vocab, d = emb.shape
    L0 = layers[0][0]
    hd = L0["q_norm"][1].shape[0] if len(L0["q_norm"][1].shape) == 1 else 0
    wo_shape = L0["wo"][1].shape
    qkv_shape = L0["qkv"][1].shape
    if hd < 2 or hd % 2 or len(wo_shape) != 2 or wo_shape[1] % hd or len(qkv_shape) != 2:
        raise ConvertError("cannot infer heads: query_norm %s, output_transform %s, fused_linear %s"
                           % (L0["q_norm"][1].shape, wo_shape, qkv_shape))
    q = wo_shape[1]
    nh = q // hd
    kvdim2 = qkv_shape[0] - q
    if kvdim2 <= 0 or kvdim2 % (2 * hd):
        raise ConvertError("cannot infer KV heads: fused_linear rows %d, query rows %d, head_dim %d"
                           % (qkv_shape[0], q, hd))
    nkv = kvdim2 // (2 * hd)
    kv = nkv * hd
    f = L0["gate"][1].shape[0]
    r = L0["q.a"][1].shape[-1] if has_lora else 0
    shapes = {"attn_norm": (d,), "qkv": (q + 2 * kv, d), "q_norm": (hd,), "k_norm": (hd,), "wo": (d, q),
              "ffn_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f), "wq": (q, d), "kv_k": (2,),
              "kv_v": (2,)}
    lin = dict(q=(d, q), k=(d, kv), v=(d, kv), wq=(d, q), wo=(q, d), gate=(d, f), up=(d, f), down=(f, d))
    for p, (i_, o_) in lin.items():
        shapes[p + ".a"] = (i_, r)   # a_transpose [in, r]
        shapes[p + ".b"] = (r, o_)   # b_transpose [r, out]
    bad = []
    for g, shp in (("embedding.weight", (vocab, d)), ("output_transform.weight", (vocab, d)),
                   ("output_norm.weight", (d,))):
        if g in glob_parts and glob_parts[g].shape != shp:
            bad.append("%s: %s, expected %s" % (g, glob_parts[g].shape, shp))
    for s in (0, 1):
        for i in sorted(layers[s]):
            for p, (k, v) in layers[s][i].items():
                if v.shape != shapes[p]:
                    bad.append("%s: %s, expected %s" % (k, v.shape, shapes[p]))
                if v.dtype not in ("f32", "f16", "bf16", "f64"):
                    bad.append("%s: dtype %s, expected a float type" % (k, v.dtype))
    if bad:
        raise ConvertError("%s: wrong shapes (inferred vocab %d, dim %d, heads %d x %d, kv heads %d, ffn %d%s): %s"
                           % (path, vocab, d, nh, hd, nkv, f, ", lora rank %d" % r if r else "", _list(bad, 30)))
    notes.append("source: Apple toolkit %s checkpoint %s (%d tensors)" % (kind, path, len(sd)))
    notes.append("from tensor shapes: vocab %d, dim %d, %d layers (%d reuse), %d heads x %d, %d KV heads, ffn %d"
                 % (vocab, d, n0 + n1, n1, nh, hd, nkv, f))

    # --- hyperparameters from the config json / defaults / flags
    cfg_path = a.config
    if cfg_path is None:
        stem = os.path.splitext(path)[0]
        if os.path.isfile(stem + "-config.json"):
            cfg_path = stem + "-config.json"
    found = {}
    if cfg_path:
        found, cn = read_toolkit_config(cfg_path)
        notes += cn
        if not found:
            notes.append("config %s: no recognizable rope_theta / eps / context / LoRA keys" % cfg_path)
    hp = {}
    for qn in ("rope_theta", "norm_eps", "context_length", "lora_alpha"):
        flag = getattr(a, qn)
        if flag is not None:
            hp[qn] = (flag, "from the command line")
        elif qn in found:
            hp[qn] = (found[qn][0], found[qn][1])
        else:
            hp[qn] = (AFM_DEFAULTS[qn], "AFM default")
    if a.qk_norm_eps is not None:
        hp["qk_norm_eps"] = (a.qk_norm_eps, "from the command line")
    else:
        hp["qk_norm_eps"] = (hp["norm_eps"][0], hp["norm_eps"][1] + " (same as norm_eps)")
    if has_lora and "lora_rank" in found and int(found["lora_rank"][0]) != r:
        notes.append("warning: config says LoRA rank %g (%s) but the tensors have rank %d; using %d"
                     % (found["lora_rank"][0], found["lora_rank"][1], r, r))

    # --- tied output head
    if "output_transform.weight" in glob_parts:
        ot = glob_parts["output_transform.weight"]
        if ot.key() == emb.key():
            notes.append("output_transform.weight: the same storage as embedding.weight (tied), dropped")
        elif np.array_equal(ot.numpy(), emb.numpy()):
            notes.append("output_transform.weight: equal to embedding.weight (tied), dropped")
        else:
            raise ConvertError("output_transform.weight differs from embedding.weight: an untied output head "
                               "cannot be stored (FORMAT.md requires tied embeddings)")
    else:
        notes.append("no output_transform.weight: the output head is the embedding (tied)")

    use_lora = has_lora and not a.no_lora
    if has_lora and a.no_lora:
        notes.append("base_adapter LoRA (rank %d) dropped (--no-lora)" % r)
    cfg = af.make_config(vocab, d, n0 + n1, n1, nh, nkv, hd, f, int(hp["context_length"][0]), hp["rope_theta"][0],
                         hp["norm_eps"][0], hp["qk_norm_eps"][0], kv_scales=has_kv,
                         lora_rank=r if use_lora else 0, lora_alpha=hp["lora_alpha"][0] if use_lora else 0.0)
    for qn in ("rope_theta", "norm_eps", "qk_norm_eps", "context_length"):
        notes.append("%s %g: %s" % (qn, hp[qn][0], hp[qn][1]))
    if use_lora:
        notes.append("LoRA base_adapter: rank %d (tensors), alpha %g: %s" % (r, hp["lora_alpha"][0], hp["lora_alpha"][1]))

    # --- tensors (callables: loaded one at a time while writing)
    out = {"tok_embd": emb.numpy, "out_norm": glob_parts["output_norm.weight"].numpy}

    def T(v):
        return v.numpy

    def perm_rows(v, heads):
        return lambda: af.permute_rows_to_halfsplit(v.numpy(), heads, hd)

    def perm_vec(v):
        return lambda: af.permute_vec_to_halfsplit(v.numpy())

    def qkv_fn(v):
        def fn():
            w = v.numpy()
            return np.concatenate([af.permute_rows_to_halfsplit(w[:q], nh, hd),
                                   af.permute_rows_to_halfsplit(w[q:q + kv], nkv, hd), w[q + kv:]], axis=0)
        return fn

    def lora_a(v):
        return lambda: np.ascontiguousarray(v.numpy().T)

    def lora_b(v, heads=None):
        if heads is None:
            return lambda: np.ascontiguousarray(v.numpy().T)
        return lambda: af.permute_rows_to_halfsplit(np.ascontiguousarray(v.numpy().T), heads, hd)

    for s, n in ((0, n0), (1, n1)):
        for j in range(n):
            i = j if s == 0 else n0 + j
            L = {p: kv_[1] for p, kv_ in layers[s][j].items()}
            P = "l%d." % i
            out[P + "attn_norm"] = T(L["attn_norm"])
            out[P + "ffn_norm"] = T(L["ffn_norm"])
            out[P + "wo"] = T(L["wo"])
            out[P + "gate"] = T(L["gate"])
            out[P + "up"] = T(L["up"])
            out[P + "down"] = T(L["down"])
            out[P + "q_norm"] = perm_vec(L["q_norm"])
            if s == 0:
                out[P + "qkv"] = qkv_fn(L["qkv"])
                out[P + "k_norm"] = perm_vec(L["k_norm"])
            else:
                out[P + "wq"] = perm_rows(L["wq"], nh)
            if use_lora:
                for p in (("q", "k", "v") if s == 0 else ("wq",)) + ("wo", "gate", "up", "down"):
                    heads = nh if p in ("q", "wq") else nkv if p == "k" else None
                    out[P + p + ".lora_a"] = lora_a(L[p + ".a"])
                    out[P + p + ".lora_b"] = lora_b(L[p + ".b"], heads)
    if has_kv:
        ks = np.zeros((n0, 2), np.float32)
        bad = []
        for i in range(n0):
            for c, p in enumerate(("kv_k", "kv_v")):
                k, v = layers[0][i][p]
                rr = v.numpy().astype(np.float32).reshape(-1)
                sc = af.kv_scale_from_range(rr[0], rr[1])
                if not np.isfinite(rr).all() or not (np.isfinite(sc) and sc > 0):
                    bad.append("%s = %s gives scale %g" % (k, rr.tolist(), sc))
                ks[i, c] = sc
        if bad:
            raise ConvertError("unusable KV quantizer ranges: " + _list(bad))
        out["kv_scale"] = ks
        notes.append("KV scales: %d layers from kv_quantizer ranges, key %.6g .. %.6g, value %.6g .. %.6g"
                     % (n0, ks[:, 0].min(), ks[:, 0].max(), ks[:, 1].min(), ks[:, 1].max()))
    else:
        notes.append("no kv_quantizer ranges: the file has no int8 KV scales (flags bit 2 clear)")
    return cfg, out


# ================================================================================================
# MLX afm7 folder

def mlx_unpack(packed, bits, n):
    """Unsigned `bits`-bit codes of MLX's packing (a little-endian bit stream in uint32 words) -> [rows, n] uint32."""
    packed = np.ascontiguousarray(packed, dtype="<u4")
    rows = packed.shape[0]
    if bits in (1, 2, 4, 8):
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits))
        q = (packed[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
        return q.reshape(rows, -1)[:, :n]
    out = np.empty((rows, n), np.uint32)
    step = max(1, (16 << 20) // max(1, packed.shape[1] * 32))
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32))
    for s in range(0, rows, step):
        b = np.unpackbits(packed[s:s + step].view(np.uint8), axis=1, bitorder="little")
        b = b[:, :n * bits].reshape(b.shape[0], n, bits).astype(np.uint32)
        out[s:s + step] = (b * weights).sum(axis=2, dtype=np.uint32)
    return out


def mlx_dequantize(w, scales, biases, group_size, bits):
    """Affine MLX dequantization: w = scale * q + bias per group of group_size along the rows (float32)."""
    rows, ngroups = scales.shape
    n = ngroups * group_size
    if w.shape != (rows, n * bits // 32) or biases.shape != scales.shape:
        raise ConvertError("quantized tensor shapes do not fit: weight %s, scales %s, biases %s, group %d, bits %d"
                           % (w.shape, scales.shape, biases.shape, group_size, bits))
    out = np.empty((rows, n), np.float32)
    step = max(1, (32 << 20) // max(1, n * 4))  # rows per chunk: ~32 MB of output at a time
    for s in range(0, rows, step):
        q = mlx_unpack(w[s:s + step], bits, n).astype(np.float32).reshape(-1, ngroups, group_size)
        sc = scales[s:s + step].astype(np.float32)[:, :, None]
        bi = biases[s:s + step].astype(np.float32)[:, :, None]
        out[s:s + step] = (q * sc + bi).reshape(-1, n)
    return out


def plan_mlx(folder, a, notes):
    cpath = os.path.join(folder, "config.json")
    if not os.path.isfile(cpath):
        raise ConvertError("%s: no config.json (an MLX afm7 folder has config.json and *.safetensors)" % folder)
    try:
        with open(cpath, "rb") as fh:
            mc = json.loads(fh.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError("%s: %s" % (cpath, e))
    if not isinstance(mc, dict) or mc.get("model_type") != "afm7":
        raise ConvertError("%s: model_type %r, expected \"afm7\"" % (cpath, mc.get("model_type") if isinstance(mc, dict) else None))
    need = ("vocab_size", "hidden_dim", "num_layers", "num_kv_reuse_layers", "num_heads", "num_kv_heads")
    miss = [k for k in need if not isinstance(mc.get(k), int) or isinstance(mc.get(k), bool)]
    if miss:
        raise ConvertError("%s: missing or non-integer keys: %s" % (cpath, ", ".join(miss)))
    vocab, d, nl, n1, nh, nkv = (mc[k] for k in need)
    src = {}
    for k in ("hidden_dim_scale_factor", "rope_theta", "rms_norm_eps"):
        if k in mc:
            src[k] = (float(mc[k]), "from config.json")
        else:
            src[k] = (MLX_DEFAULTS[k], "MLX afm7 default (absent from config.json)")
    if nh <= 0 or d % nh:
        raise ConvertError("%s: hidden_dim %d is not a multiple of num_heads %d" % (cpath, d, nh))
    hd = d // nh
    f = int(d * src["hidden_dim_scale_factor"][0])
    if not (0 <= n1 < nl):
        raise ConvertError("%s: num_kv_reuse_layers %d, expected 0 .. num_layers-1 = %d" % (cpath, n1, nl - 1))
    n0 = nl - n1
    q, kv = nh * hd, nkv * hd

    # files
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(idx):
        try:
            with open(idx, "rb") as fh:
                wm = json.loads(fh.read().decode("utf-8"))["weight_map"]
            files = sorted(set(os.path.join(folder, v) for v in wm.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError("%s: %s" % (idx, e))
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConvertError("%s: no *.safetensors files" % folder)
    W = {}
    for fp in files:
        if not os.path.isfile(fp):
            raise ConvertError("%s: listed in the index but missing" % fp)
        t, _ = read_safetensors(fp)
        for k, v in t.items():
            if k in W:
                raise ConvertError("tensor %s appears in two files (%s)" % (k, fp))
            W[k] = v

    W = _drop_ignored(W, a, notes)
    quant = mc.get("quantization") or mc.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise ConvertError("%s: quantization is %r, expected an object" % (cpath, quant))

    def qparams(module):
        """(group_size, bits) if the module is stored quantized, else None."""
        if module + ".scales" not in W:
            return None
        if not quant:
            raise ConvertError("%s.scales present but config.json has no \"quantization\"" % module)
        mode = quant.get("mode", "affine")
        ov = quant.get(module)
        if isinstance(ov, dict):
            gs, bits, mode = ov.get("group_size", quant.get("group_size")), ov.get("bits", quant.get("bits")), ov.get("mode", mode)
        else:
            gs, bits = quant.get("group_size"), quant.get("bits")
        if mode != "affine":
            raise ConvertError("%s: quantization mode %r is not supported (only affine)" % (module, mode))
        if not isinstance(gs, int) or not isinstance(bits, int) or bits not in (1, 2, 3, 4, 5, 6, 8) or gs <= 0:
            raise ConvertError("%s: bad quantization parameters group_size %r bits %r" % (module, gs, bits))
        if module + ".biases" not in W:
            raise ConvertError("%s: quantized (has .scales) but no .biases" % module)
        return gs, bits

    # expected keys: (mlx module, kind, float shape, file name, transform)
    items = [("model.embedding", "w", (vocab, d), "tok_embd", None), ("model.output_norm", "w", (d,), "out_norm", None)]
    for i in range(n0):
        P = "model.layers.%d." % i
        items += [(P + "input_layernorm", "w", (d,), "l%d.attn_norm" % i, None),
                  (P + "self_attn.qkv_proj", "w", (q + 2 * kv, d), "l%d.qkv" % i, "qkv"),
                  (P + "self_attn.q_norm", "w", (hd,), "l%d.q_norm" % i, "vec"),
                  (P + "self_attn.k_norm", "w", (hd,), "l%d.k_norm" % i, "vec"),
                  (P + "self_attn.out_proj", "w", (d, q), "l%d.wo" % i, None),
                  (P + "self_attn.quant_key_scale", "s", (), None, None),
                  (P + "self_attn.quant_value_scale", "s", (), None, None),
                  (P + "post_attention_layernorm", "w", (d,), "l%d.ffn_norm" % i, None),
                  (P + "mlp.gate_proj", "w", (f, d), "l%d.gate" % i, None),
                  (P + "mlp.up_proj", "w", (f, d), "l%d.up" % i, None),
                  (P + "mlp.down_proj", "w", (d, f), "l%d.down" % i, None)]
    for j in range(n1):
        i = n0 + j
        P = "model.kv_reuse_layers.%d." % j
        items += [(P + "input_layernorm", "w", (d,), "l%d.attn_norm" % i, None),
                  (P + "self_attn.q_proj", "w", (q, d), "l%d.wq" % i, "q"),
                  (P + "self_attn.q_norm", "w", (hd,), "l%d.q_norm" % i, "vec"),
                  (P + "self_attn.out_proj", "w", (d, q), "l%d.wo" % i, None),
                  (P + "post_attention_layernorm", "w", (d,), "l%d.ffn_norm" % i, None),
                  (P + "mlp.gate_proj", "w", (f, d), "l%d.gate" % i, None),
                  (P + "mlp.up_proj", "w", (f, d), "l%d.up" % i, None),
                  (P + "mlp.down_proj", "w", (d, f), "l%d.down" % i, None)]
    used, missing, bad = set(), [], []
    getters = {}
    for mod, kind, shape, name, tr in items:
        key = mod if kind == "s" else mod + ".weight"
        if key not in W:
            missing.append(key)
            continue
        used.add(key)
        qp = qparams(mod) if kind == "w" else None
        if qp:
            used.add(mod + ".scales")
            used.add(mod + ".biases")
            gs, bits = qp
            sc, bi, w = W[mod + ".scales"], W[mod + ".biases"], W[key]
            if len(shape) != 2 or sc.shape != (shape[0], shape[1] // gs) or shape[1] % gs or \
                    w.shape != (shape[0], shape[1] * bits // 32) or w.dtype != "u32":
                bad.append("%s: quantized %s/%s/%s (%s), expected %s with group %d, %d bits"
                           % (mod, w.shape, sc.shape, bi.shape, w.dtype, shape, gs, bits))
                continue

            def get(w=w, sc=sc, bi=bi, gs=gs, bits=bits):
                return mlx_dequantize(w.raw(), sc.numpy(), bi.numpy(), gs, bits)
        else:
            t = W[key]
            if tuple(t.shape) != tuple(shape) and not (kind == "s" and t.size == 1):
                bad.append("%s: shape %s, expected %s" % (key, t.shape, shape))
                continue
            if t.dtype not in ("f32", "f16", "bf16", "f64"):
                bad.append("%s: dtype %s, expected a float type" % (key, t.dtype))
                continue
            get = t.numpy
        getters[mod] = (get, name, tr)
    unknown = sorted(k for k in W if k not in used)
    if missing or unknown:
        msg = []
        if missing:
            msg.append("missing keys (%d): %s" % (len(missing), _list(missing)))
        if unknown:
            msg.append("unknown keys (%d): %s" % (len(unknown), _list(unknown)))
        raise ConvertError("%s: %s" % (folder, "; ".join(msg)))
    if bad:
        raise ConvertError("%s: wrong shapes (config: vocab %d, dim %d, heads %d x %d, kv heads %d, ffn %d): %s"
                           % (folder, vocab, d, nh, hd, nkv, f, _list(bad, 30)))

    context = a.context_length
    csrc = "from the command line"
    if context is None:
        for k in ("context_length", "max_position_embeddings", "max_sequence_length"):
            if isinstance(mc.get(k), int):
                context, csrc = mc[k], "from config.json: %s" % k
                break
        else:
            context, csrc = AFM_DEFAULTS["context_length"], "AFM default (config.json has none)"
    theta = (a.rope_theta, "from the command line") if a.rope_theta is not None else src["rope_theta"]
    eps = (a.norm_eps, "from the command line") if a.norm_eps is not None else src["rms_norm_eps"]
    qk_eps = (a.qk_norm_eps, "from the command line") if a.qk_norm_eps is not None else \
        (1e-5, "MLX afm7 q_norm/k_norm use nn.RMSNorm's default eps")
    cfg = af.make_config(vocab, d, nl, n1, nh, nkv, hd, f, int(context), theta[0], eps[0], qk_eps[0], kv_scales=True)
    qmods = sorted(m for m in getters if m + ".scales" in W)
    notes.append("source: MLX afm7 folder %s (%d file%s, %d tensors%s)" % (
        folder, len(files), "" if len(files) == 1 else "s", len(W),
        ", %d quantized modules dequantized (affine)" % len(qmods) if qmods else ""))
    notes.append("from config.json: vocab %d, dim %d, %d layers (%d reuse), %d heads x %d, %d KV heads, ffn %d "
                 "(hidden_dim_scale_factor %g: %s)" % (vocab, d, nl, n1, nh, hd, nkv, f, src["hidden_dim_scale_factor"][0],
                                                       src["hidden_dim_scale_factor"][1]))
    notes.append("rope_theta %g: %s" % theta)
    notes.append("norm_eps %g: %s" % eps)
    notes.append("qk_norm_eps %g: %s" % qk_eps)
    notes.append("context_length %d: %s" % (context, csrc))
    for fn_ in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(folder, fn_)) and not a.tokenizer:
            notes.append("note: the folder has %s; pass --tokenizer to embed it" % fn_)

    out = {}
    for mod, (get, name, tr) in getters.items():
        if name is None:
            continue
        if tr is None:
            out[name] = get
        elif tr == "vec":
            out[name] = (lambda g: lambda: af.permute_vec_to_halfsplit(g()))(get)
        elif tr == "q":
            out[name] = (lambda g: lambda: af.permute_rows_to_halfsplit(g(), nh, hd))(get)
        elif tr == "qkv":
            def fn(g=get):
                w = g()
                return np.concatenate([af.permute_rows_to_halfsplit(w[:q], nh, hd),
                                       af.permute_rows_to_halfsplit(w[q:q + kv], nkv, hd), w[q + kv:]], axis=0)
            out[name] = fn
    ks = np.zeros((n0, 2), np.float32)
    badk = []
    for i in range(n0):
        for c, nm in enumerate(("quant_key_scale", "quant_value_scale")):
            mod = "model.layers.%d.self_attn.%s" % (i, nm)
            v = float(np.asarray(getters[mod][0]()).reshape(-1)[0])
            if not (np.isfinite(v) and v > 0):
                badk.append("%s = %g" % (mod, v))
            ks[i, c] = v
    if badk:
        raise ConvertError("KV scales must be finite and > 0: " + _list(badk))
    out["kv_scale"] = ks
    notes.append("KV scales: %d layers, key %.6g .. %.6g, value %.6g .. %.6g"
                 % (n0, ks[:, 0].min(), ks[:, 0].max(), ks[:, 1].min(), ks[:, 1].max()))
    return cfg, out


# ================================================================================================
# an afm model file (re-encoding)

_NOT_FOR_AFM = (("config", "--config"), ("rope_theta", "--rope-theta"), ("norm_eps", "--norm-eps"),
                ("qk_norm_eps", "--qk-norm-eps"), ("context_length", "--context"), ("lora_alpha", "--lora-alpha"))


def plan_afm(path, a, notes):
    """Config and tensors (decoded to float32, one at a time) of an afm file, to be written again with
    other types. The tokenizer and the signature are kept unless --tokenizer / --signature are given."""
    given = [flag for attr, flag in _NOT_FOR_AFM if getattr(a, attr) is not None] + (["--ignore"] if a.ignore else [])
    if given:
        raise ConvertError("%s is an afm file: its hyperparameters are kept, %s does not apply" % (path, ", ".join(given)))
    m = af.read_model(path)
    cfg = dict(m.config)
    counts = {}
    for e in m.entries.values():
        counts[af.TYPE_NAMES[e["type"]]] = counts.get(af.TYPE_NAMES[e["type"]], 0) + 1
    notes.append("source: afm file %s (%d tensors: %s), re-encoded" % (
        path, len(m.entries), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
    if cfg["lora_rank"] and a.no_lora:
        notes.append("embedded LoRA (rank %d) dropped (--no-lora)" % cfg["lora_rank"])
        cfg["lora_rank"], cfg["lora_alpha"] = 0, 0.0
    tensors = {name: (lambda n=name: m.f32(n)) for name, _, _ in af.tensor_specs(cfg)}
    return cfg, tensors, m


# ================================================================================================

def convert(a):
    notes = []
    src = a.input
    src_tok = None
    if os.path.isdir(src):
        cfg, tensors = plan_mlx(src, a, notes)
    elif os.path.isfile(src):
        with open(src, "rb") as fh:
            magic = fh.read(8)
        if magic[:4] == b"PK\x03\x04":
            cfg, tensors = plan_toolkit(src, a, notes)
        elif magic == af.MAGIC:
            cfg, tensors, m = plan_afm(src, a, notes)
            if m.tokenizer_kind:
                src_tok = (m.tokenizer_bytes, m.tokenizer_kind)
        elif src.endswith(".safetensors"):
            raise ConvertError("%s: give the MLX folder (with config.json), not one .safetensors file" % src)
        else:
            read_torch_zip(src)  # raises with the reason (legacy pickle, not a zip, ...)
            raise ConvertError("%s: unrecognized input" % src)
    else:
        raise ConvertError("%s: no such file or folder" % src)
    tok = kind = None
    if a.tokenizer:
        tok, kind = af.read_tokenizer(a.tokenizer)
        notes.append("tokenizer: %s embedded as kind %d (%s), %d bytes" % (
            a.tokenizer, kind, "SentencePiece" if kind == 1 else "tokenizer.json", len(tok)))
    elif src_tok:
        tok, kind = src_tok
        notes.append("tokenizer: kept from the source file (kind %d, %d bytes)" % (kind, len(tok)))
    if a.signature:
        s = a.signature.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{40}", s):
            raise ConvertError("--signature %r: expected 40 hex digits" % a.signature)
        cfg["signature"] = s
    return cfg, tensors, tok, kind, notes


class QuantPlan:
    """The file types of the embedding and the projections, and for the quantized ones an encoder
    (tools/quant.py) that records, per tensor, the error statistics and whether it is exact."""

    def __init__(self, cfg, wtype, embd_type, group, exact_only):
        self.group, self.exact_only = group, exact_only
        self.types = {}
        self.info = {}      # name -> (type code, quant.Stats, exact, sha256 of the bytes)
        for name, shape, kind in af.tensor_specs(cfg):
            if kind in ("embd", "proj"):
                self.types[name] = embd_type if kind == "embd" else wtype
        self.shapes = {name: shape for name, shape, _ in af.tensor_specs(cfg)}

    def wrap(self, tensors):
        out = dict(tensors)
        for name, t in self.types.items():
            code = af.TYPE_BY_NAME[t]
            if code in af.QUANT_TYPES:
                out[name] = self._encoder(name, tensors[name], code)
        return out

    def _encoder(self, name, src, code):
        def encode():
            w = np.asarray(src() if callable(src) else src)
            if w.dtype.kind != "f":
                raise ConvertError("%s: dtype %s, expected a float type" % (name, w.dtype))
            w = np.ascontiguousarray(w, dtype=np.float32)   # f16 / bf16 / f32 sources are exact in f32
            if tuple(w.shape) != tuple(self.shapes[name]):
                raise ConvertError("%s: shape %s, expected %s" % (name, tuple(w.shape), tuple(self.shapes[name])))
            if not np.isfinite(w).all():
                raise ConvertError("%s: contains NaN or infinity" % name)
            data, st = quant.quantize(code, w, self.group, return_stats=True)
            back = quant.dequantize(code, data, w.shape[0], w.shape[1], self.group)
            exact = bool(np.array_equal(back.view(np.uint32), w.view(np.uint32)))
            self.info[name] = (code, st, exact, hashlib.sha256(data).digest())
            if self.exact_only and not exact:
                raise ConvertError("--exact: %s is not exactly representable as %s with group %d (rel. RMS error %.3g, "
                                   "%d of %d groups on an fp16-scaled grid); nothing written"
                                   % (name, af.TYPE_NAMES[code], self.group, st.rel_rmse, st.exact_groups, st.groups))
            return data
        return encode

    def report(self):
        """Lines: one summary, then one line per lossy tensor and a total."""
        if not self.info:
            return []
        counts = {}
        for code, _, _, _ in self.info.values():
            counts[af.TYPE_NAMES[code]] = counts.get(af.TYPE_NAMES[code], 0) + 1
        kinds = ", ".join("%s %d" % kv for kv in sorted(counts.items()))
        lossy = [n for n, v in self.info.items() if not v[2]]
        if not lossy:
            return ["quantized %d tensors (%s, group %d): all exact, decode(encode(w)) == w bit for bit"
                    % (len(self.info), kinds, self.group)]
        out = ["quantized %d tensors (%s, group %d): %d exact, %d lossy (error of each lossy tensor):"
               % (len(self.info), kinds, self.group, len(self.info) - len(lossy), len(lossy))]
        total = quant.Stats()
        for n in lossy:
            st = self.info[n][1]
            out.append("  %-4s %s" % (af.TYPE_NAMES[self.info[n][0]], st.line(n)))
            for k in ("n", "sq_err", "sq_w", "groups", "exact_groups", "grid_not_f16", "clipped_scales"):
                setattr(total, k, getattr(total, k) + getattr(st, k))
            total.max_abs = max(total.max_abs, st.max_abs)
        out.append("       " + total.line("all lossy tensors"))
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert AFMTextV7 weights (Apple toolkit .pt, MLX afm7 folder, or an "
                                             "afm file to re-encode) to an afm model file.")
    ap.add_argument("input", help="base-model.pt / draft-model.pt, an MLX afm7 folder, or an .afm file")
    ap.add_argument("-o", "--output", required=True, help="output .afm file")
    types = ("f32", "f16", "bf16", "q2b", "q4", "q8")
    ap.add_argument("--type", choices=types, default="f32",
                    help="type of the projections (and of the embedding, see --embd-type); default f32, lossless")
    ap.add_argument("--embd-type", dest="embd_type", choices=types,
                    help="type of the embedding (= the tied output head); default: --type, but q4 for --type q2b")
    ap.add_argument("--group", type=int, choices=quant.GROUPS, default=64,
                    help="weights per fp16 scale of the quantized types (default 64)")
    ap.add_argument("--exact", action="store_true",
                    help="fail (writing nothing) unless every quantized tensor decodes back bit for bit")
    ap.add_argument("--lora-type", choices=("f32", "f16"), help="LoRA type (default f32 for --type f32, else f16)")
    ap.add_argument("--tokenizer", help="tokenizer.model (embedded as kind 1) or tokenizer.json (kind 2)")
    ap.add_argument("--signature", help="base-model signature, 40 hex digits")
    ap.add_argument("--config", help="toolkit config json (default: <input stem>-config.json beside a .pt, if present)")
    ap.add_argument("--rope-theta", dest="rope_theta", type=float, help="override rope_theta")
    ap.add_argument("--norm-eps", dest="norm_eps", type=float, help="override the RMSNorm eps")
    ap.add_argument("--qk-norm-eps", dest="qk_norm_eps", type=float, help="override the q_norm/k_norm eps")
    ap.add_argument("--context", dest="context_length", type=int, help="override the context length")
    ap.add_argument("--lora-alpha", dest="lora_alpha", type=float, help="override the LoRA alpha (toolkit)")
    ap.add_argument("--no-lora", action="store_true", help="drop the embedded base_adapter LoRA")
    ap.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                    help="drop source keys matching REGEX (re.search) instead of failing on them; repeatable")
    ap.add_argument("--verify", action="store_true", help="read the written file back and compare every tensor")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    a = ap.parse_args(argv)
    embd_type = a.embd_type or ("q4" if a.type == "q2b" else a.type)

    def say(*x):
        if not a.quiet:
            print(*x, flush=True)

    try:
        cfg, tensors, tok, kind, notes = convert(a)
        for n in notes:
            say(n)
        plan = QuantPlan(cfg, a.type, embd_type, a.group, a.exact)
        quantized = any(af.TYPE_BY_NAME[t] in af.QUANT_TYPES for t in (a.type, embd_type))
        say("types: projections %s, embedding %s%s, norms%s F32%s" % (
            a.type.upper(), embd_type.upper(), ", group %d" % a.group if quantized else "",
            " and KV scales" if cfg["flags"] & af.FLAG_KV_SCALES else "",
            ", LoRA %s" % af.TYPE_NAMES[af.default_type("lora", a.type, a.lora_type)] if cfg["lora_rank"] else ""))

        def progress(k, n, e):
            if not a.quiet and (k == n or k % 100 == 0):
                print("  %d/%d tensors" % (k, n), flush=True)

        info = af.write_model(a.output, cfg, plan.wrap(tensors), tokenizer=tok, tokenizer_kind=kind, wtype=a.type,
                              lora_type=a.lora_type, types=plan.types, group=a.group, progress=progress)
        base, lora = af.count_params(cfg)
        m = af.read_model(a.output)  # full structural validation of what was written
        for line in plan.report():
            say(line)
        say("wrote %s: %d bytes, %d tensors, type %s%s, %d parameters%s" % (
            a.output, info["file_size"], len(info["entries"]), a.type,
            " (embedding %s)" % embd_type if embd_type != a.type else "", base, " + %d LoRA" % lora if lora else ""))
        if a.verify:
            nbad = 0
            for e in info["entries"]:
                if e["name"] in plan.info:
                    same = hashlib.sha256(m.raw(e["name"])).digest() == plan.info[e["name"]][3]
                else:
                    v = tensors[e["name"]]
                    want = af._encode(np.asarray(v() if callable(v) else v), e["type"], e["name"])
                    got = np.ascontiguousarray(m.raw(e["name"])).reshape(-1).view(np.uint8)
                    same = np.array_equal(want.reshape(-1).view(np.uint8), got)
                if not same:
                    nbad += 1
                    print("verify: %s differs" % e["name"])
            if nbad:
                raise ConvertError("verify: %d tensors differ from the source" % nbad)
            say("verify: all %d tensors read back identical" % len(info["entries"]))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ConvertError, af.AfmError, CheckpointError, quant.QuantError, OSError) as e:
        if a.debug:
            raise
        print("error: %s" % e, file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - never a traceback for bad input
        if a.debug:
            raise
        print("error: unexpected %s: %s (run with --debug for a traceback)" % (type(e).__name__, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
