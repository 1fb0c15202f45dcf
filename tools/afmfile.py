"""afmfile.py - write and read afm model files (docs/FORMAT.md, version 1).

Only numpy is required.

Writing:
    cfg = make_config(vocab_size=..., dim=..., ...)
    write_model("out.afm", cfg, tensors, tokenizer=b"...", tokenizer_kind=TOKENIZER_SENTENCEPIECE,
                wtype="bf16")
`tensors` maps every tensor name of tensor_specs(cfg) to a numpy array, or to a callable that
returns one (called once, when that tensor's data is written: this is the streaming mode, so a
full-size model never has to be in memory at once). Arrays are converted to the file's type here
(bf16 by round-to-nearest-even from f32, f16 by numpy's round-to-nearest-even cast).

Reading:
    m = read_model("out.afm")        # validates everything a reader must validate
    m.config["dim"], m.tensors["tok_embd"], m.f32("l0.qkv"), m.tokenizer_kind, m.tokenizer_bytes

Helpers: permute_rows_to_halfsplit / permute_vec_to_halfsplit (and their inverses),
kv_scale_from_range, f32_to_bf16_bits / bf16_bits_to_f32, count_params.
"""

import json
import math
import os
import re
import struct

import numpy as np

MAGIC = b"AFMMODEL"
VERSION = 1
HEADER_SIZE = 128
CONFIG_SIZE = 128
DIR_ENTRY_SIZE = 128
ALIGN = 64

TYPE_F32, TYPE_F16, TYPE_BF16 = 0, 1, 2
TYPE_Q2B, TYPE_Q4, TYPE_Q8 = 16, 17, 18   # quantized: layouts in docs/FORMAT.md, encoders in quant.py
TYPE_NAMES = {TYPE_F32: "F32", TYPE_F16: "F16", TYPE_BF16: "BF16", TYPE_Q2B: "Q2B", TYPE_Q4: "Q4", TYPE_Q8: "Q8"}
TYPE_BYTES = {TYPE_F32: 4, TYPE_F16: 2, TYPE_BF16: 2}
TYPE_BY_NAME = {"f32": TYPE_F32, "f16": TYPE_F16, "bf16": TYPE_BF16, "q2b": TYPE_Q2B, "q4": TYPE_Q4, "q8": TYPE_Q8}
QUANT_TYPES = (TYPE_Q2B, TYPE_Q4, TYPE_Q8)
DEFAULT_GROUP = 64

ARCH_AFM = 1
ROPE_HALFSPLIT = 1
FLAG_TIED = 1
FLAG_QK_NORM = 2
FLAG_KV_SCALES = 4
FLAGS_KNOWN = FLAG_TIED | FLAG_QK_NORM | FLAG_KV_SCALES

TOKENIZER_SENTENCEPIECE = 1
TOKENIZER_HF_JSON = 2

LORA_PROJ_SEG0 = ("q", "k", "v", "wo", "gate", "up", "down")
LORA_PROJ_SEG1 = ("wq", "wo", "gate", "up", "down")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")

# The header (128 bytes): magic, version, header_size, file_size, config_offset, config_size,
# tokenizer_offset, tokenizer_size, dir_offset, dir_size, n_tensors, reserved, data_offset,
# data_size, reserved[32].
_HEADER = struct.Struct("<8sIIQQQQQQQIIQQ32s")
# The config (128 bytes).
_CONFIG = struct.Struct("<IIIIIIIIIIfffIIIfI40s16s")
# A directory entry (128 bytes).
_DIRENT = struct.Struct("<64sII4QQQII")
assert _HEADER.size == HEADER_SIZE and _CONFIG.size == CONFIG_SIZE and _DIRENT.size == DIR_ENTRY_SIZE

_CONFIG_FIELDS = ("arch", "vocab_size", "dim", "n_layers", "n_reuse_layers", "n_heads", "n_kv_heads",
                  "head_dim", "ffn_dim", "context_length", "rope_theta", "norm_eps", "qk_norm_eps",
                  "rope_layout", "flags", "lora_rank", "lora_alpha", "reserved")


class AfmError(Exception):
    """Any problem with a model file or with what a caller asked to write."""


def _unique_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("the object has the key %r twice" % k)
        d[k] = v
    return d


def loads_json(text):
    """json.loads that refuses an object with a key twice (ValueError), as afm.h does: RFC 8259
    leaves the meaning open, and readers differ (first wins, last wins)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


# --------------------------------------------------------------------------------------------
# numeric helpers

def f32_to_bf16_bits(a):
    """float32 array -> uint16 bf16 bit patterns, round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return r


def bf16_bits_to_f32(b):
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_f16(a, name="tensor"):
    """float32 -> float16 (round to nearest even). A finite value that overflows is an error."""
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    bad = np.isinf(h) & np.isfinite(a)
    if bad.any():
        raise AfmError("%s: %d value(s) beyond the f16 range (max |x| = %g); use --type f32 or bf16"
                       % (name, int(bad.sum()), float(np.abs(a[bad]).max())))
    return h


def permute_rows_to_halfsplit(w, n_heads, head_dim):
    """Interleaved-pair (GPT-J / MLX traditional) rows -> half-split (NeoX) rows, within each head.
    w has n_heads*head_dim rows (any trailing shape). Output row j of a head holds input row 2j
    for j < d/2 and row 2(j-d/2)+1 otherwise."""
    w = np.asarray(w)
    if head_dim % 2 or w.shape[0] != n_heads * head_dim:
        raise AfmError("permute_rows_to_halfsplit: %d rows is not %d heads x %d (even)"
                       % (w.shape[0], n_heads, head_dim))
    rest = w.shape[1:]
    return w.reshape((n_heads, head_dim // 2, 2) + rest).swapaxes(1, 2).reshape(w.shape)


def permute_rows_to_interleaved(w, n_heads, head_dim):
    """Inverse of permute_rows_to_halfsplit."""
    w = np.asarray(w)
    rest = w.shape[1:]
    return w.reshape((n_heads, 2, head_dim // 2) + rest).swapaxes(1, 2).reshape(w.shape)


def permute_vec_to_halfsplit(v):
    """A per-head vector (q_norm / k_norm weight, length head_dim) -> half-split layout."""
    v = np.asarray(v)
    d = v.shape[0]
    if v.ndim != 1 or d % 2:
        raise AfmError("permute_vec_to_halfsplit: need a 1-D vector of even length, got %s" % (v.shape,))
    return v.reshape(d // 2, 2).T.reshape(d)


def permute_vec_to_interleaved(v):
    v = np.asarray(v)
    d = v.shape[0]
    return v.reshape(2, d // 2).T.reshape(d)


def kv_scale_from_range(range_min, range_max):
    """docs/MODEL.md section 4.1: scale = max(range_min / -128, range_max / 127), computed in float32."""
    lo = np.float32(range_min)
    hi = np.float32(range_max)
    return np.float32(max(lo / np.float32(-128.0), hi / np.float32(127.0)))


# --------------------------------------------------------------------------------------------
# configuration

def make_config(vocab_size, dim, n_layers, n_reuse_layers, n_heads, n_kv_heads, head_dim, ffn_dim,
                context_length=4096, rope_theta=500000.0, norm_eps=1e-5, qk_norm_eps=1e-5,
                kv_scales=False, lora_rank=0, lora_alpha=0.0, signature=None):
    cfg = dict(arch=ARCH_AFM, vocab_size=int(vocab_size), dim=int(dim), n_layers=int(n_layers),
               n_reuse_layers=int(n_reuse_layers), n_heads=int(n_heads), n_kv_heads=int(n_kv_heads),
               head_dim=int(head_dim), ffn_dim=int(ffn_dim), context_length=int(context_length),
               rope_theta=float(rope_theta), norm_eps=float(norm_eps), qk_norm_eps=float(qk_norm_eps),
               rope_layout=ROPE_HALFSPLIT,
               flags=FLAG_TIED | FLAG_QK_NORM | (FLAG_KV_SCALES if kv_scales else 0),
               lora_rank=int(lora_rank), lora_alpha=float(lora_alpha) if lora_rank else 0.0,
               signature=signature)
    validate_config(cfg)
    return cfg


def _f32(x):
    return float(np.float32(x))


def config_problems(cfg):
    """Every rule of FORMAT.md's config table that cfg breaks, as a list of strings."""
    p = []

    def rng(name, lo, hi):
        v = cfg.get(name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not (lo <= v <= hi):
            p.append("%s = %r, expected an integer in %d .. %d" % (name, v, lo, hi))
            return False
        return True

    if cfg.get("arch") != ARCH_AFM:
        p.append("arch = %r, expected %d" % (cfg.get("arch"), ARCH_AFM))
    rng("vocab_size", 1, 1 << 24)
    rng("dim", 1, 65536)
    ok_layers = rng("n_layers", 1, 1024)
    if ok_layers and rng("n_reuse_layers", 0, 1 << 32) and cfg["n_reuse_layers"] >= cfg["n_layers"]:
        p.append("n_reuse_layers = %d, expected < n_layers = %d" % (cfg["n_reuse_layers"], cfg["n_layers"]))
    ok_h = rng("n_heads", 1, 1024)
    if rng("n_kv_heads", 1, 1 << 32) and ok_h and cfg["n_heads"] % cfg["n_kv_heads"]:
        p.append("n_kv_heads = %d does not divide n_heads = %d" % (cfg["n_kv_heads"], cfg["n_heads"]))
    if rng("head_dim", 2, 1024) and cfg["head_dim"] % 2:
        p.append("head_dim = %d, expected an even number" % cfg["head_dim"])
    rng("ffn_dim", 1, 1 << 20)
    rng("context_length", 1, 1 << 24)
    for name, lo, hi in (("rope_theta", 1.0, None), ("norm_eps", 0.0, 1.0), ("qk_norm_eps", 0.0, 1.0)):
        v = cfg.get(name)
        try:
            f = _f32(v)
        except (TypeError, ValueError):
            p.append("%s = %r, expected a number" % (name, v))
            continue
        if not math.isfinite(f) or not (f > lo) or (hi is not None and not f < hi):
            p.append("%s = %r, expected a finite float32 > %g%s" % (name, v, lo, "" if hi is None else " and < %g" % hi))
    if cfg.get("rope_layout") != ROPE_HALFSPLIT:
        p.append("rope_layout = %r, expected %d (half-split)" % (cfg.get("rope_layout"), ROPE_HALFSPLIT))
    fl = cfg.get("flags")
    if not isinstance(fl, (int, np.integer)) or fl & ~FLAGS_KNOWN or not fl & FLAG_TIED or not fl & FLAG_QK_NORM:
        p.append("flags = %r, expected bits 0 and 1 set, bit 2 optional, no others" % (fl,))
    if rng("lora_rank", 0, 1 << 32):
        a = cfg.get("lora_alpha", 0.0)
        try:
            af = _f32(a)
        except (TypeError, ValueError):
            af = float("nan")
        if not abs(af) <= 65504.0:  # the largest f16, as afm.h (Apple's alpha: 16)
            p.append("lora_alpha = %r, expected a float32 in [-65504, 65504]" % (a,))
    sig = cfg.get("signature")
    if sig not in (None, "", b"\0" * 40) and not (isinstance(sig, str) and re.fullmatch(r"[0-9a-f]{40}", sig)):
        p.append("signature = %r, expected 40 lowercase hex digits or none" % (sig,))
    return p


def validate_config(cfg):
    p = config_problems(cfg)
    if p:
        raise AfmError("bad config: " + "; ".join(p))


def n_seg0(cfg):
    return cfg["n_layers"] - cfg["n_reuse_layers"]


# --------------------------------------------------------------------------------------------
# the tensor list

def tensor_specs(cfg):
    """[(name, shape, kind)] of every tensor the config requires, in file order.
    kind: 'embd', 'norm', 'proj', 'kvscale', 'lora'."""
    d, hd, f = cfg["dim"], cfg["head_dim"], cfg["ffn_dim"]
    q, kv, r = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd, cfg["lora_rank"]
    s0 = n_seg0(cfg)
    out = [("tok_embd", (cfg["vocab_size"], d), "embd"), ("out_norm", (d,), "norm")]
    if cfg["flags"] & FLAG_KV_SCALES:
        out.append(("kv_scale", (s0, 2), "kvscale"))
    for i in range(cfg["n_layers"]):
        p = "l%d." % i
        out.append((p + "attn_norm", (d,), "norm"))
        if i < s0:
            out.append((p + "qkv", (q + 2 * kv, d), "proj"))
            out.append((p + "q_norm", (hd,), "norm"))
            out.append((p + "k_norm", (hd,), "norm"))
        else:
            out.append((p + "wq", (q, d), "proj"))
            out.append((p + "q_norm", (hd,), "norm"))
        out += [(p + "wo", (d, q), "proj"), (p + "ffn_norm", (d,), "norm"),
                (p + "gate", (f, d), "proj"), (p + "up", (f, d), "proj"), (p + "down", (d, f), "proj")]
    if r:
        for i in range(cfg["n_layers"]):
            for proj, (n_in, n_out) in lora_shapes(cfg, i):
                out.append(("l%d.%s.lora_a" % (i, proj), (r, n_in), "lora"))
                out.append(("l%d.%s.lora_b" % (i, proj), (n_out, r), "lora"))
    return out


def lora_shapes(cfg, i):
    """[(projection, (in, out))] of the adapted projections of layer i."""
    d, hd, f = cfg["dim"], cfg["head_dim"], cfg["ffn_dim"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    io = dict(q=(d, q), k=(d, kv), v=(d, kv), wq=(d, q), wo=(q, d), gate=(d, f), up=(d, f), down=(f, d))
    projs = LORA_PROJ_SEG0 if i < n_seg0(cfg) else LORA_PROJ_SEG1
    return [(p, io[p]) for p in projs]


def allowed_types(kind):
    if kind in ("norm", "kvscale"):
        return (TYPE_F32,)
    if kind == "lora":
        return (TYPE_F32, TYPE_F16)
    return (TYPE_F32, TYPE_F16, TYPE_BF16) + QUANT_TYPES


def count_params(cfg):
    """(base parameters, LoRA parameters); kv_scale is not a parameter."""
    base = lora = 0
    for _, shape, kind in tensor_specs(cfg):
        n = int(np.prod(shape))
        if kind == "lora":
            lora += n
        elif kind != "kvscale":
            base += n
    return base, lora


def type_size(t, shape, group=0):
    if t in QUANT_TYPES:
        import quant
        return quant.type_size(t, int(np.prod(shape[:-1], dtype=np.uint64)), int(shape[-1]), group)
    return TYPE_BYTES[t] * int(np.prod(shape, dtype=np.uint64))


def _align(x, a=ALIGN):
    return (x + a - 1) // a * a


# --------------------------------------------------------------------------------------------
# writing

def _encode(arr, t, name):
    """numpy array -> contiguous array whose bytes are the file's representation."""
    a = np.asarray(arr)
    if a.dtype == np.float64 or a.dtype == np.float16 or a.dtype.kind in "iu":
        a = a.astype(np.float32)
    if a.dtype != np.float32:
        raise AfmError("%s: unsupported source dtype %s" % (name, a.dtype))
    if t == TYPE_F32:
        return np.ascontiguousarray(a, dtype="<f4")
    if t == TYPE_F16:
        return np.ascontiguousarray(f32_to_f16(a, name), dtype="<f2")
    if t == TYPE_BF16:
        return f32_to_bf16_bits(a).astype("<u2", copy=False)
    raise AfmError("%s: unknown type %r" % (name, t))


def _type_code(t):
    if isinstance(t, str):
        if t.lower() not in TYPE_BY_NAME:
            raise AfmError("unknown type %r (f32, f16 or bf16)" % t)
        return TYPE_BY_NAME[t.lower()]
    if t not in TYPE_NAMES:
        raise AfmError("unknown type code %r" % (t,))
    return t


def default_type(kind, wtype, lora_type=None):
    """The file type of a tensor of this kind for a model written with weight type wtype."""
    wtype = _type_code(wtype)
    if kind in ("norm", "kvscale"):
        return TYPE_F32
    if kind == "lora":
        if lora_type is not None:
            return _type_code(lora_type)
        return TYPE_F32 if wtype == TYPE_F32 else TYPE_F16
    return wtype


def _pack_config(cfg):
    sig = cfg.get("signature")
    sig_b = sig.encode("ascii") if isinstance(sig, str) and sig else b"\0" * 40
    return _CONFIG.pack(cfg["arch"], cfg["vocab_size"], cfg["dim"], cfg["n_layers"], cfg["n_reuse_layers"],
                        cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["ffn_dim"],
                        cfg["context_length"], cfg["rope_theta"], cfg["norm_eps"], cfg["qk_norm_eps"],
                        cfg["rope_layout"], cfg["flags"], cfg["lora_rank"], cfg["lora_alpha"], 0,
                        sig_b, b"\0" * 16)


def write_model(path, config, tensors=None, tokenizer=None, tokenizer_kind=None, wtype="f32",
                lora_type=None, types=None, zeros=False, progress=None, chunk_bytes=64 << 20, group=DEFAULT_GROUP):
    """Write a FORMAT.md v1 file.

    config: dict as from make_config (flags bit 2 must match the presence of kv_scale).
    tensors: {name: array or callable returning an array}; exactly the names of tensor_specs(config),
        each with the exact shape. Values are float arrays (f32/f16/f64); the writer converts them.
        Callables are called one at a time while writing (streaming: memory ~ one tensor).
    tokenizer: bytes of tokenizer.model (kind 1) or tokenizer.json (kind 2), or None.
    wtype: type of projections and tok_embd ('f32', 'f16', 'bf16'); lora_type: 'f32'/'f16'
        (default f32 for an f32 model, else f16); types: {name: type} overrides.
    zeros: write an all-zero data section by extending the file (sparse on most file systems), for
        fast tests on full-size shapes; tensors may then be None or give a few tensors (e.g.
        kv_scale) that are written for real over the zeros.
    Returns a dict with the layout (offsets, sizes, per-tensor entries)."""
    validate_config(config)
    specs = tensor_specs(config)
    types = dict(types or {})
    tensors = dict(tensors or {})
    if zeros:
        unknown = sorted(set(tensors) - {n for n, _, _ in specs})
        if unknown:
            raise AfmError("unknown tensors: " + ", ".join(unknown))
    else:
        want = {n for n, _, _ in specs}
        missing = [n for n, _, _ in specs if n not in tensors]
        unknown = sorted(n for n in tensors if n not in want)
        if missing or unknown:
            msg = []
            if missing:
                msg.append("missing tensors: " + ", ".join(missing))
            if unknown:
                msg.append("unknown tensors: " + ", ".join(unknown))
            raise AfmError("; ".join(msg))
        bad = []
        for n, shape, _ in specs:
            v = tensors[n]
            if not callable(v) and tuple(np.shape(v)) != tuple(shape):
                bad.append("%s: shape %s, expected %s" % (n, tuple(np.shape(v)), tuple(shape)))
        if bad:
            raise AfmError("wrong shapes: " + "; ".join(bad))

    if tokenizer is not None:
        if tokenizer_kind not in (TOKENIZER_SENTENCEPIECE, TOKENIZER_HF_JSON):
            raise AfmError("tokenizer_kind must be 1 (SentencePiece) or 2 (tokenizer.json)")
        tokenizer = bytes(tokenizer)

    # layout: header | config | tokenizer (padded to 64) | directory | data
    config_offset = HEADER_SIZE
    pos = config_offset + CONFIG_SIZE
    if tokenizer is not None:
        tok_offset, tok_size = pos, _align(16 + len(tokenizer))
        pos += tok_size
    else:
        tok_offset = tok_size = 0
    dir_offset = pos
    dir_size = len(specs) * DIR_ENTRY_SIZE
    data_offset = _align(dir_offset + dir_size)
    entries = []
    rel = 0
    for name, shape, kind in specs:
        t = _type_code(types[name]) if name in types else default_type(kind, wtype, lora_type)
        if t not in allowed_types(kind):
            raise AfmError("%s: type %s not allowed (allowed: %s)" % (
                name, TYPE_NAMES[t], ", ".join(TYPE_NAMES[x] for x in allowed_types(kind))))
        g = group if t in QUANT_TYPES else 0
        size = type_size(t, shape, g)
        entries.append(dict(name=name, shape=tuple(shape), kind=kind, type=t, offset=rel, size=size, group=g))
        rel = _align(rel + size)
    data_size = rel
    file_size = data_offset + data_size
    if not 1 <= len(specs) <= 65536:
        raise AfmError("%d tensors, expected 1 .. 65536" % len(specs))

    header = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, file_size, config_offset, CONFIG_SIZE,
                          tok_offset, tok_size, dir_offset, dir_size, len(specs), 0,
                          data_offset, data_size, b"\0" * 32)
    directory = bytearray()
    for e in entries:
        nb = e["name"].encode("ascii")
        if len(nb) > 63 or not _NAME_RE.match(e["name"]):
            raise AfmError("illegal tensor name %r" % e["name"])
        dims = list(e["shape"]) + [0] * (4 - len(e["shape"]))
        directory += _DIRENT.pack(nb.ljust(64, b"\0"), e["type"], len(e["shape"]), *dims,
                                  e["offset"], e["size"], e["group"], 0)

    tmp = str(path) + ".tmp"
    try:
        fh = open(tmp, "wb")
    except OSError as e:
        raise AfmError("cannot create %s: %s" % (path, e.strerror or e))
    try:
        with fh:
            fh.write(header)
            fh.write(_pack_config(config))
            if tokenizer is not None:
                tok = struct.pack("<IIQ", tokenizer_kind, 0, len(tokenizer)) + tokenizer
                fh.write(tok.ljust(tok_size, b"\0"))
            fh.write(bytes(directory))
            fh.write(b"\0" * (data_offset - fh.tell()))
            if zeros:
                fh.truncate(file_size)
            for k, e in enumerate(entries):
                if zeros and e["name"] not in tensors:
                    continue
                fh.seek(data_offset + e["offset"])
                v = tensors[e["name"]]
                v = v() if callable(v) else v
                if isinstance(v, (bytes, bytearray)):  # already encoded (quantized types only)
                    if e["type"] not in QUANT_TYPES or len(v) != e["size"]:
                        raise AfmError("%s: %d encoded bytes given, expected %d bytes of a quantized type"
                                       % (e["name"], len(v), e["size"]))
                    fh.write(v)
                    fh.write(b"\0" * (_align(e["size"]) - e["size"]))
                    if progress:
                        progress(k + 1, len(entries), e)
                    continue
                arr = np.asarray(v)
                if tuple(arr.shape) != e["shape"]:
                    raise AfmError("%s: shape %s, expected %s" % (e["name"], tuple(arr.shape), e["shape"]))
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise AfmError("%s: contains NaN or infinity" % e["name"])
                _write_tensor(fh, arr, e["type"], e["name"], chunk_bytes, e["group"])
                fh.write(b"\0" * (_align(e["size"]) - e["size"]))
                del arr
                if progress:
                    progress(k + 1, len(entries), e)
            if not zeros:
                assert fh.tell() == file_size, (fh.tell(), file_size)
            elif fh.seek(0, 2) != file_size:
                raise AfmError("internal: zeros file has the wrong size")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dict(file_size=file_size, data_offset=data_offset, data_size=data_size, dir_offset=dir_offset,
                tokenizer_offset=tok_offset, tokenizer_size=tok_size, entries=entries)


def _write_tensor(fh, arr, t, name, chunk_bytes, group=0):
    if t in QUANT_TYPES:
        import quant
        fh.write(quant.quantize(t, np.asarray(arr, dtype=np.float32), group))
        return
    flat = arr.reshape(-1) if arr.ndim else arr.reshape(1)
    per = max(1, chunk_bytes // max(1, flat.dtype.itemsize))
    for s in range(0, flat.shape[0], per):
        fh.write(_encode(flat[s:s + per], t, name).tobytes())


# --------------------------------------------------------------------------------------------
# reading

class AfmModel:
    """A read (and validated) model file. tensors: {name: numpy array} in the stored precision
    (F32 -> float32, F16 -> float16, BF16 -> float32 decoded); f32(name) always gives float32."""

    def __init__(self, path, header, config, tokenizer_kind, tokenizer_bytes, entries, buf):
        self.path = path
        self.header = header
        self.config = config
        self.tokenizer_kind = tokenizer_kind
        self.tokenizer_bytes = tokenizer_bytes
        self.entries = entries
        self._buf = buf
        self._cache = {}

    def raw(self, name):
        e = self.entries[name]
        start = self.header["data_offset"] + e["offset"]
        if e["type"] in QUANT_TYPES:
            return bytes(self._buf[start:start + e["size"]])
        dt = {TYPE_F32: "<f4", TYPE_F16: "<f2", TYPE_BF16: "<u2"}[e["type"]]
        return np.frombuffer(self._buf, dtype=dt, count=int(np.prod(e["shape"])), offset=start).reshape(e["shape"])

    def tensor(self, name):
        if name not in self._cache:
            e = self.entries[name]
            a = self.raw(name)
            if e["type"] == TYPE_BF16:
                a = bf16_bits_to_f32(a)
            elif e["type"] in QUANT_TYPES:
                import quant
                a = quant.dequantize(e["type"], a, e["shape"][0], e["shape"][1], e["group"])
            self._cache[name] = a
        return self._cache[name]

    def f32(self, name):
        return np.asarray(self.tensor(name), dtype=np.float32)

    @property
    def tensors(self):
        return {n: self.tensor(n) for n in self.entries}

    def names(self):
        return list(self.entries)


def read_model(path, validate=True):
    """Read an afm file and check every rule of FORMAT.md's 'Validation a reader performs'.
    Raises AfmError naming the file, offset or tensor and what was expected against what was found."""
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise AfmError("%s: empty file" % path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    return parse_model(buf, path, validate)


def parse_model(buf, path="<buffer>", validate=True):
    mv = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else memoryview(buf)
    size = len(mv)

    def err(msg):
        raise AfmError("%s: %s" % (path, msg))

    if size < HEADER_SIZE:
        err("file is %d bytes, shorter than the %d-byte header" % (size, HEADER_SIZE))
    h = _HEADER.unpack_from(mv, 0)
    hdr = dict(zip(("magic", "version", "header_size", "file_size", "config_offset", "config_size",
                    "tokenizer_offset", "tokenizer_size", "dir_offset", "dir_size", "n_tensors",
                    "reserved0", "data_offset", "data_size", "reserved1"), h))
    if hdr["magic"] != MAGIC:
        err("offset 0: magic %r, expected %r" % (hdr["magic"], MAGIC))
    if hdr["version"] != VERSION:
        err("offset 8: version %d, expected %d" % (hdr["version"], VERSION))
    if hdr["header_size"] != HEADER_SIZE:
        err("offset 12: header_size %d, expected %d" % (hdr["header_size"], HEADER_SIZE))
    if hdr["file_size"] != size:
        err("offset 16: file_size %d, but the file is %d bytes (truncated or padded?)" % (hdr["file_size"], size))
    if validate and (hdr["reserved0"] or any(hdr["reserved1"])):
        pass  # reserved bytes are ignored by readers (written as zero)
    if hdr["config_size"] < CONFIG_SIZE:
        err("offset 32: config_size %d, expected >= %d" % (hdr["config_size"], CONFIG_SIZE))
    if not 1 <= hdr["n_tensors"] <= 65536:
        err("offset 72: n_tensors %d, expected 1 .. 65536" % hdr["n_tensors"])
    if hdr["dir_size"] != hdr["n_tensors"] * DIR_ENTRY_SIZE:
        err("offset 64: dir_size %d, expected n_tensors x 128 = %d" % (hdr["dir_size"], hdr["n_tensors"] * DIR_ENTRY_SIZE))
    if hdr["data_offset"] % ALIGN:
        err("offset 80: data_offset %d is not a multiple of %d" % (hdr["data_offset"], ALIGN))
    if (hdr["tokenizer_offset"] == 0) != (hdr["tokenizer_size"] == 0):
        err("offset 40: tokenizer_offset %d and tokenizer_size %d: both or neither must be 0"
            % (hdr["tokenizer_offset"], hdr["tokenizer_size"]))
    if hdr["tokenizer_size"] and hdr["tokenizer_size"] < 16:
        err("offset 48: tokenizer_size %d, expected 0 or >= 16" % hdr["tokenizer_size"])
    sections = [("header", 0, HEADER_SIZE), ("config", hdr["config_offset"], hdr["config_size"]),
                ("directory", hdr["dir_offset"], hdr["dir_size"]), ("data", hdr["data_offset"], hdr["data_size"])]
    if hdr["tokenizer_size"]:
        sections.append(("tokenizer", hdr["tokenizer_offset"], hdr["tokenizer_size"]))
    for nm, off, sz in sections:
        if off > size or sz > size - off:
            err("%s section [%d, +%d) lies outside the file (%d bytes)" % (nm, off, sz, size))
    ss = sorted((off, sz, nm) for nm, off, sz in sections if sz)
    for (o1, s1, n1), (o2, s2, n2) in zip(ss, ss[1:]):
        if o1 + s1 > o2:
            err("%s section [%d, +%d) overlaps %s section at %d" % (n1, o1, s1, n2, o2))

    # config
    c = _CONFIG.unpack_from(mv, hdr["config_offset"])
    cfg = dict(zip(_CONFIG_FIELDS, c[:18]))
    sig = c[18]
    del cfg["reserved"]
    if sig == b"\0" * 40:
        cfg["signature"] = None
    else:
        try:
            s = sig.decode("ascii")
        except UnicodeDecodeError:
            s = None
        if s is None or not re.fullmatch(r"[0-9a-f]{40}", s):
            err("config offset 72: signature %r, expected 40 lowercase hex digits or 40 zero bytes" % sig)
        cfg["signature"] = s
    if validate:
        p = config_problems(cfg)
        if p:
            err("config (offset %d): %s" % (hdr["config_offset"], "; ".join(p)))

    # tokenizer
    tok_kind, tok_bytes = 0, None
    if hdr["tokenizer_size"]:
        to = hdr["tokenizer_offset"]
        tok_kind, _, tlen = struct.unpack_from("<IIQ", mv, to)
        if tok_kind not in (TOKENIZER_SENTENCEPIECE, TOKENIZER_HF_JSON):
            err("tokenizer offset %d: kind %d, expected 1 or 2" % (to, tok_kind))
        if tlen > hdr["tokenizer_size"] - 16:
            err("tokenizer offset %d: length %d does not fit the %d-byte section" % (to + 8, tlen, hdr["tokenizer_size"]))
        tok_bytes = bytes(mv[to + 16: to + 16 + tlen])

    # directory
    entries = {}
    spans = []
    for k in range(hdr["n_tensors"]):
        eo = hdr["dir_offset"] + k * DIR_ENTRY_SIZE
        raw_name, t, nd, d0, d1, d2, d3, off, sz, gs, res = _DIRENT.unpack_from(mv, eo)
        if b"\0" not in raw_name:
            err("directory entry %d (offset %d): name not NUL-terminated within 64 bytes" % (k, eo))
        nb = raw_name[:raw_name.index(b"\0")]
        if validate and any(raw_name[len(nb):]):
            err("directory entry %d (offset %d): name not NUL-padded" % (k, eo))
        name = nb.decode("latin-1")
        if not nb or not _NAME_RE.match(name):
            err("directory entry %d (offset %d): illegal name %r" % (k, eo, name))
        if name in entries:
            err("directory entry %d (offset %d): duplicate name %r" % (k, eo, name))
        if t not in TYPE_NAMES:
            err("tensor %s (offset %d): unknown type %d" % (name, eo + 64, t))
        if not 1 <= nd <= 4:
            err("tensor %s (offset %d): n_dims %d, expected 1 .. 4" % (name, eo + 68, nd))
        dims = (d0, d1, d2, d3)
        if any(x < 1 for x in dims[:nd]) or any(dims[nd:]):
            err("tensor %s (offset %d): dims %s, used dims must be >= 1 and unused 0" % (name, eo + 72, dims))
        n = 1
        for x in dims[:nd]:
            n *= x
            if n > (1 << 62):
                err("tensor %s: element count overflows" % name)
        if t in QUANT_TYPES:
            if nd != 2 or gs not in (64, 128, 256, 512):
                err("tensor %s (offset %d): %s needs 2 dims and group_size 64/128/256/512, has %d dims, group %d"
                    % (name, eo + 68, TYPE_NAMES[t], nd, gs))
            want_sz = type_size(t, dims[:nd], gs)
        else:
            want_sz = n * TYPE_BYTES[t]
        if sz != want_sz:
            err("tensor %s (offset %d): size %d, expected %d for %s %s" % (name, eo + 112, sz, want_sz,
                                                                         TYPE_NAMES[t], dims[:nd]))
        if off % ALIGN:
            err("tensor %s (offset %d): data offset %d not a multiple of %d" % (name, eo + 104, off, ALIGN))
        if off > hdr["data_size"] or sz > hdr["data_size"] - off:
            err("tensor %s: [%d, +%d) lies outside the %d-byte data section" % (name, off, sz, hdr["data_size"]))
        if gs != 0 and t not in QUANT_TYPES:
            err("tensor %s (offset %d): group_size %d, expected 0 for a float type" % (name, eo + 120, gs))
        entries[name] = dict(name=name, type=t, shape=tuple(dims[:nd]), offset=off, size=sz, index=k, group=gs)
        spans.append((off, sz, name))
    spans.sort()
    for (o1, s1, n1), (o2, s2, n2) in zip(spans, spans[1:]):
        if o1 + s1 > o2 and s1 and s2:
            err("tensor %s [%d, +%d) overlaps tensor %s at %d" % (n1, o1, s1, n2, o2))

    if validate:
        specs = tensor_specs(cfg)
        want = {n: (shape, kind) for n, shape, kind in specs}
        missing = [n for n, _, _ in specs if n not in entries]
        if missing:
            err("missing tensor(s): %s" % ", ".join(missing))
        unknown = [n for n in entries if n not in want]
        if unknown:
            err("unknown tensor(s): %s" % ", ".join(unknown))
        for n, (shape, kind) in want.items():
            e = entries[n]
            if e["shape"] != tuple(shape):
                err("tensor %s: shape %s, expected %s" % (n, e["shape"], tuple(shape)))
            if e["type"] not in allowed_types(kind):
                err("tensor %s: type %s, expected one of %s" % (n, TYPE_NAMES[e["type"]],
                                                              ", ".join(TYPE_NAMES[x] for x in allowed_types(kind))))
    return AfmModel(path, hdr, cfg, tok_kind, tok_bytes, entries, buf)


def read_tokenizer(path):
    """(bytes, kind) of a tokenizer file: kind 2 (TOKENIZER_HF_JSON) when it is a Hugging Face
    tokenizer.json, kind 1 (TOKENIZER_SENTENCEPIECE) when it looks like a SentencePiece ModelProto."""
    with open(path, "rb") as f:
        b = f.read()
    if not b:
        raise AfmError("%s: empty tokenizer file" % path)
    if b.lstrip()[:1] == b"{":
        try:
            j = loads_json(b.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise AfmError("%s: looks like JSON but does not parse: %s" % (path, e))
        if not isinstance(j, dict) or "model" not in j:
            raise AfmError("%s: JSON but not a Hugging Face tokenizer.json (no \"model\" key)" % path)
        return b, TOKENIZER_HF_JSON
    if b[0] != 0x0A:  # ModelProto starts with field 1 (pieces), length-delimited
        raise AfmError("%s: neither a tokenizer.json nor a SentencePiece model (first byte 0x%02x, expected 0x0a)"
                       % (path, b[0]))
    return b, TOKENIZER_SENTENCEPIECE


def describe(m):
    """A human-readable summary of an AfmModel (like `afm info`)."""
    c = m.config
    base, lora = count_params(c)
    lines = ["%s: %d bytes, %d tensors" % (m.path, m.header["file_size"], len(m.entries)),
             "  vocab %d, dim %d, layers %d (%d reuse), heads %d x %d, kv heads %d, ffn %d, context %d"
             % (c["vocab_size"], c["dim"], c["n_layers"], c["n_reuse_layers"], c["n_heads"], c["head_dim"],
                c["n_kv_heads"], c["ffn_dim"], c["context_length"]),
             "  rope_theta %g, norm_eps %g, qk_norm_eps %g, flags 0x%x, lora rank %d alpha %g"
             % (c["rope_theta"], c["norm_eps"], c["qk_norm_eps"], c["flags"], c["lora_rank"], c["lora_alpha"]),
             "  parameters %d (+ LoRA %d), signature %s, tokenizer %s"
             % (base, lora, c["signature"] or "none",
                "none" if not m.tokenizer_kind else "kind %d, %d bytes" % (m.tokenizer_kind, len(m.tokenizer_bytes)))]
    types = {}
    for e in m.entries.values():
        types[TYPE_NAMES[e["type"]]] = types.get(TYPE_NAMES[e["type"]], 0) + 1
    lines.append("  tensor types: " + ", ".join("%s %d" % kv for kv in sorted(types.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 2:
        print("usage: afmfile.py FILE.afm ...   (validate and describe)")
        sys.exit(2)
    rc = 0
    for p in sys.argv[1:]:
        try:
            print(describe(read_model(p)))
        except (AfmError, OSError) as e:
            print("error: %s" % e)
            rc = 1
    sys.exit(rc)
