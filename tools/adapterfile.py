"""adapterfile.py - LoRA adapter files: the afm adapter file (`.afma`, docs/FORMAT.md "The afm adapter
file", version 1) and Apple's `.fmadapter` packages (docs/MODEL.md section 6). numpy only.

.afma:
    write_adapter("a.afma", base_config, tensors, rank, alpha, draft_token_count=5,
                  signature="9799725f...", metadata_json={...}, ltype="f32")
    a = read_adapter("a.afma")          # validates everything a reader must validate
    a.rank, a.alpha, a.scale, a.draft_token_count, a.base_shape, a.signature, a.metadata
    a.f32("l0.q.lora_a"), a.names()
    adapter_problems_for_model(a, model_config)  ->  [] or the reasons it does not fit

`base_config` is any dict with the eight base-shape keys (an AfmModel.config will do): vocab_size,
dim, n_layers, n_reuse_layers, n_heads, n_kv_heads, head_dim, ffn_dim. `tensors` maps every name of
adapter_specs(base_config, rank) (`l{i}.{p}.lora_a` [r, in], `l{i}.{p}.lora_b` [out, r]; B of q, k, wq
in the half-split layout) to an array or a callable returning one.

.fmadapter (a directory NAME.fmadapter/ with metadata.json and adapter_weights.bin):
    write_fmadapter(dir, metadata_dict, arrays_fp16)        # arrays in fmadapter_specs order
    p = read_fmadapter(dir, base_config)                     # validates metadata and every record
    p.metadata, p.rank, p.signature, p.draft_token_count, p.tensors {afma name: float16 [rows, cols]}

Blob storage v2 (Core ML `adapter_weights.bin`), little-endian: a 64-byte header (u32 count, u32 version
= 2, 56 zero bytes), then per tensor, at the next multiple of 64, a 64-byte record (u32 0xDEADBEEF,
u32 dtype (1 = fp16), u64 size in bytes, u64 absolute data offset, 40 zero bytes) followed by the data at
that offset (record offset + 64, what coremltools writes). Zero padding to the next multiple of 64 lies
between records; coremltools does not pad after the last one (a reader accepts up to 63 zero bytes there).
"""

import json
import os
import re
import struct

import numpy as np

import afmfile as af
from afmfile import AfmError

MAGIC = b"AFMADAPT"
VERSION = 1
KIND_LORA = 2
META_JSON = 3            # kind of the metadata section (the model file's "tokenizer" slot)
MAX_RANK = 4096

SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_reuse_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")

# config (128 bytes): kind, rank, alpha, draft_token_count, base shape u32[8], signature[40], reserved[40]
_ACONFIG = struct.Struct("<IIfI8I40s40s")
assert _ACONFIG.size == af.CONFIG_SIZE

APPLE_SIGNATURE = "9799725ff8e851184037110b422d891ad3b92ec1"   # the toolkit exporter's BASE_SIGNATURE
IDENTIFIER_RE = re.compile(r"fmadapter-[A-Za-z0-9_]+-[A-Za-z0-9_]+")  # fullmatch; \w in ASCII
SIG_RE = re.compile(r"[0-9a-f]{40}")

BLOB_VERSION = 2
BLOB_SENTINEL = 0xDEADBEEF
BLOB_FP16 = 1
BLOB_ALIGN = 64
MAX_ALPHA = 65504.0  # the largest f16, as afm.h: no trained adapter's alpha is near it (Apple's: 16)
_BLOB_HEADER = struct.Struct("<II56x")
_BLOB_RECORD = struct.Struct("<IIQQ40x")
assert _BLOB_HEADER.size == 64 and _BLOB_RECORD.size == 64


def _align(x, a=64):
    return (x + a - 1) // a * a


# --------------------------------------------------------------------------------------------
# shapes

def base_shape(cfg):
    """The eight base-shape values of a config dict, as a dict."""
    try:
        return {k: int(cfg[k]) for k in SHAPE_KEYS}
    except (KeyError, TypeError, ValueError) as e:
        raise AfmError("base config lacks %s" % e)


def shape_problems(s):
    """The rules of FORMAT.md's model config that the eight base-shape values break."""
    p = []

    def rng(name, lo, hi):
        v = s.get(name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
            p.append("%s = %r, expected %d .. %d" % (name, v, lo, hi))
            return False
        return True

    rng("vocab_size", 1, 1 << 24)
    rng("dim", 1, 65536)
    if rng("n_layers", 1, 1024) and rng("n_reuse_layers", 0, 1024) and s["n_reuse_layers"] >= s["n_layers"]:
        p.append("n_reuse_layers = %d, expected < n_layers = %d" % (s["n_reuse_layers"], s["n_layers"]))
    if rng("n_heads", 1, 1024) and rng("n_kv_heads", 1, 1024) and s["n_heads"] % s["n_kv_heads"]:
        p.append("n_kv_heads = %d does not divide n_heads = %d" % (s["n_kv_heads"], s["n_heads"]))
    if rng("head_dim", 2, 1024) and s["head_dim"] % 2:
        p.append("head_dim = %d, expected even" % s["head_dim"])
    rng("ffn_dim", 1, 1 << 20)
    return p


def adapted(cfg):
    """[(layer, projection, (in, out))] of every adapted projection, in file order: layer by layer,
    per layer q, k, v, wo, gate, up, down (segment 0) or wq, wo, gate, up, down (segment 1)."""
    s = base_shape(cfg)
    out = []
    for i in range(s["n_layers"]):
        for p, io in af.lora_shapes(s, i):
            out.append((i, p, io))
    return out


def adapter_specs(cfg, rank):
    """[(name, shape)] of the tensors of an adapter of this rank for this base, in file order."""
    out = []
    for i, p, (n_in, n_out) in adapted(cfg):
        out.append(("l%d.%s.lora_a" % (i, p), (rank, n_in)))
        out.append(("l%d.%s.lora_b" % (i, p), (n_out, rank)))
    return out


def halfsplit_heads(cfg, proj):
    """Heads whose rows of B are in the half-split layout (q, wq: n_heads; k: n_kv_heads), else None."""
    if proj in ("q", "wq"):
        return int(cfg["n_heads"])
    if proj == "k":
        return int(cfg["n_kv_heads"])
    return None


def count_params(cfg, rank):
    return sum(int(np.prod(sh)) for _, sh in adapter_specs(cfg, rank))


# --------------------------------------------------------------------------------------------
# metadata

def metadata_problems(md, require_fmadapter_keys=True):
    """What is wrong with a .fmadapter metadata dict (docs/MODEL.md section 6)."""
    p = []
    if not isinstance(md, dict):
        return ["metadata is a JSON %s, expected an object" % type(md).__name__]
    ident = md.get("adapterIdentifier")
    if ident is None:
        if require_fmadapter_keys:
            p.append("adapterIdentifier is missing")
    elif not isinstance(ident, str) or not IDENTIFIER_RE.fullmatch(ident):
        p.append("adapterIdentifier %r does not match fmadapter-\\w+-\\w+ (the name part may not contain '-')"
                 % (ident,))
    sig = md.get("baseModelSignature")
    if sig is None:
        if require_fmadapter_keys:
            p.append("baseModelSignature is missing")
    elif not isinstance(sig, str) or not SIG_RE.fullmatch(sig):
        p.append("baseModelSignature %r, expected 40 lowercase hex digits" % (sig,))
    r = md.get("loraRank")
    if r is None:
        if require_fmadapter_keys:
            p.append("loraRank is missing")
    elif not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        p.append("loraRank %r, expected an integer 1 .. %d" % (r, MAX_RANK))
    n = md.get("speculativeDecodingDraftTokenCount")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 0xFFFFFFFF):
        p.append("speculativeDecodingDraftTokenCount %r, expected a non-negative integer" % (n,))
    for k in ("author", "description", "license"):
        if k in md and not isinstance(md[k], str):
            p.append("%s is a %s, expected a string" % (k, type(md[k]).__name__))
    if "creatorDefined" in md and not isinstance(md["creatorDefined"], dict):
        p.append("creatorDefined is a %s, expected an object" % type(md["creatorDefined"]).__name__)
    return p


def make_metadata(name, rank, signature=APPLE_SIGNATURE, author="3P developer", description="", license="",
                  draft_token_count=5, creator_defined=None):
    """The metadata dict the toolkit exporter writes (export_fmadapter / write_metadata):
    identifier fmadapter-<name>-<first 7 signature digits>."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name or ""):
        raise AfmError("adapter name %r: use letters, digits and '_' only (a '-' breaks Apple's loader)" % (name,))
    md = {"adapterIdentifier": "fmadapter-%s-%s" % (name, (signature or "0000000")[:7]),
          "author": author, "description": description, "license": license,
          "creatorDefined": dict(creator_defined or {}), "loraRank": int(rank),
          "speculativeDecodingDraftTokenCount": int(draft_token_count)}
    if signature:
        md["baseModelSignature"] = signature
    return md


def metadata_bytes(md):
    """metadata.json bytes as the exporter writes them: sorted keys, indent 4, UTF-8, no final newline."""
    return json.dumps(md, sort_keys=True, indent=4, default=str, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------
# .afma writing

def write_adapter(path, base_config, tensors, rank, alpha, draft_token_count=0, signature=None,
                  metadata_json=None, ltype="f32", types=None):
    """Write an .afma file (FORMAT.md). metadata_json: dict, str or bytes of a JSON object, or None.
    ltype: 'f32' or 'f16' for every tensor; types: {name: type} overrides. Returns the layout."""
    shape = base_shape(base_config)
    p = shape_problems(shape)
    if p:
        raise AfmError("bad base shape: " + "; ".join(p))
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise AfmError("rank %r, expected 1 .. %d" % (rank, MAX_RANK))
    alpha = float(alpha)
    if not abs(float(np.float32(alpha))) <= MAX_ALPHA:
        raise AfmError("alpha %r is outside [-%g, %g]" % (alpha, MAX_ALPHA, MAX_ALPHA))
    if not 0 <= int(draft_token_count) <= 0xFFFFFFFF:
        raise AfmError("draft_token_count %r out of range" % draft_token_count)
    if signature not in (None, "") and not (isinstance(signature, str) and SIG_RE.fullmatch(signature)):
        raise AfmError("signature %r, expected 40 lowercase hex digits or none" % (signature,))
    meta = None
    if metadata_json is not None:
        if isinstance(metadata_json, dict):
            meta = metadata_bytes(metadata_json)
        else:
            meta = metadata_json.encode("utf-8") if isinstance(metadata_json, str) else bytes(metadata_json)
            try:
                j = af.loads_json(meta.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise AfmError("metadata is not UTF-8 JSON: %s" % e)
            if not isinstance(j, dict):
                raise AfmError("metadata is a JSON %s, expected an object" % type(j).__name__)
    specs = adapter_specs(shape, int(rank))
    types = dict(types or {})
    tensors = dict(tensors)
    want = {n for n, _ in specs}
    missing = [n for n, _ in specs if n not in tensors]
    unknown = sorted(n for n in tensors if n not in want)
    if missing or unknown:
        msg = []
        if missing:
            msg.append("missing tensors: " + ", ".join(missing))
        if unknown:
            msg.append("unknown tensors: " + ", ".join(unknown))
        raise AfmError("; ".join(msg))

    config_offset = af.HEADER_SIZE
    pos = config_offset + af.CONFIG_SIZE
    if meta is not None:
        meta_offset, meta_size = pos, _align(16 + len(meta))
        pos += meta_size
    else:
        meta_offset = meta_size = 0
    dir_offset = pos
    dir_size = len(specs) * af.DIR_ENTRY_SIZE
    data_offset = _align(dir_offset + dir_size)
    entries = []
    rel = 0
    for name, sh in specs:
        t = af._type_code(types.get(name, ltype))
        if t not in (af.TYPE_F32, af.TYPE_F16):
            raise AfmError("%s: type %s not allowed for LoRA (F32 or F16)" % (name, af.TYPE_NAMES[t]))
        size = af.type_size(t, sh)
        entries.append(dict(name=name, shape=tuple(sh), type=t, offset=rel, size=size))
        rel = _align(rel + size)
    data_size = rel
    file_size = data_offset + data_size

    header = af._HEADER.pack(MAGIC, VERSION, af.HEADER_SIZE, file_size, config_offset, af.CONFIG_SIZE,
                             meta_offset, meta_size, dir_offset, dir_size, len(specs), 0,
                             data_offset, data_size, b"\0" * 32)
    sig_b = signature.encode("ascii") if signature else b"\0" * 40
    config = _ACONFIG.pack(KIND_LORA, int(rank), alpha, int(draft_token_count),
                           *[shape[k] for k in SHAPE_KEYS], sig_b, b"\0" * 40)
    directory = bytearray()
    for e in entries:
        dims = list(e["shape"]) + [0] * (4 - len(e["shape"]))
        directory += af._DIRENT.pack(e["name"].encode("ascii").ljust(64, b"\0"), e["type"], len(e["shape"]), *dims,
                                     e["offset"], e["size"], 0, 0)
    tmp = str(path) + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(config)
            if meta is not None:
                fh.write((struct.pack("<IIQ", META_JSON, 0, len(meta)) + meta).ljust(meta_size, b"\0"))
            fh.write(bytes(directory))
            fh.write(b"\0" * (data_offset - fh.tell()))
            for e in entries:
                v = tensors[e["name"]]
                arr = np.asarray(v() if callable(v) else v)
                if tuple(arr.shape) != e["shape"]:
                    raise AfmError("%s: shape %s, expected %s" % (e["name"], tuple(arr.shape), e["shape"]))
                if arr.dtype.kind != "f":
                    raise AfmError("%s: dtype %s, expected a float type" % (e["name"], arr.dtype))
                if not np.isfinite(arr).all():
                    raise AfmError("%s: contains NaN or infinity" % e["name"])
                assert fh.tell() == data_offset + e["offset"]
                fh.write(af._encode(arr, e["type"], e["name"]).tobytes())
                fh.write(b"\0" * (_align(e["size"]) - e["size"]))
            assert fh.tell() == file_size
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dict(file_size=file_size, data_offset=data_offset, dir_offset=dir_offset, metadata_offset=meta_offset,
                metadata_size=meta_size, entries=entries)


# --------------------------------------------------------------------------------------------
# .afma reading

class AfmAdapter:
    """A read and validated .afma. tensors in their stored precision (F32 -> float32, F16 -> float16)."""

    def __init__(self, path, header, config, metadata_bytes_, entries, buf):
        self.path = path
        self.header = header
        self.config = config
        self.metadata_bytes = metadata_bytes_
        self.metadata = af.loads_json(metadata_bytes_.decode("utf-8")) if metadata_bytes_ is not None else None
        self.entries = entries
        self._buf = buf

    rank = property(lambda self: self.config["rank"])
    alpha = property(lambda self: self.config["alpha"])
    scale = property(lambda self: self.config["alpha"] / self.config["rank"])
    draft_token_count = property(lambda self: self.config["draft_token_count"])
    base_shape = property(lambda self: self.config["base_shape"])
    signature = property(lambda self: self.config["signature"])

    def tensor(self, name):
        e = self.entries[name]
        dt = "<f4" if e["type"] == af.TYPE_F32 else "<f2"
        return np.frombuffer(self._buf, dtype=dt, count=int(np.prod(e["shape"])),
                             offset=self.header["data_offset"] + e["offset"]).reshape(e["shape"])

    def f32(self, name):
        return np.asarray(self.tensor(name), dtype=np.float32)

    def names(self):
        return list(self.entries)


def read_adapter(path):
    path = str(path)
    with open(path, "rb") as f:
        buf = f.read()
    return parse_adapter(buf, path)


def parse_adapter(buf, path="<buffer>"):
    """Parse and validate .afma bytes (every rule of FORMAT.md); AfmError names the offset or tensor."""
    mv = memoryview(buf)
    size = len(mv)

    def err(msg):
        raise AfmError("%s: %s" % (path, msg))

    if size < af.HEADER_SIZE:
        err("file is %d bytes, shorter than the %d-byte header" % (size, af.HEADER_SIZE))
    h = af._HEADER.unpack_from(mv, 0)
    hdr = dict(zip(("magic", "version", "header_size", "file_size", "config_offset", "config_size",
                    "metadata_offset", "metadata_size", "dir_offset", "dir_size", "n_tensors",
                    "reserved0", "data_offset", "data_size", "reserved1"), h))
    if hdr["magic"] != MAGIC:
        if hdr["magic"] == af.MAGIC:
            err("offset 0: this is a model file (AFMMODEL), expected an adapter (AFMADAPT)")
        err("offset 0: magic %r, expected %r" % (hdr["magic"], MAGIC))
    if hdr["version"] != VERSION:
        err("offset 8: version %d, expected %d" % (hdr["version"], VERSION))
    if hdr["header_size"] != af.HEADER_SIZE:
        err("offset 12: header_size %d, expected %d" % (hdr["header_size"], af.HEADER_SIZE))
    if hdr["file_size"] != size:
        err("offset 16: file_size %d, but the file is %d bytes (truncated or padded?)" % (hdr["file_size"], size))
    if hdr["config_size"] < af.CONFIG_SIZE:
        err("offset 32: config_size %d, expected >= %d" % (hdr["config_size"], af.CONFIG_SIZE))
    if not 1 <= hdr["n_tensors"] <= 65536:
        err("offset 72: n_tensors %d, expected 1 .. 65536" % hdr["n_tensors"])
    if hdr["dir_size"] != hdr["n_tensors"] * af.DIR_ENTRY_SIZE:
        err("offset 64: dir_size %d, expected n_tensors x 128 = %d" % (hdr["dir_size"], hdr["n_tensors"] * 128))
    if hdr["data_offset"] % af.ALIGN:
        err("offset 80: data_offset %d is not a multiple of 64" % hdr["data_offset"])
    if (hdr["metadata_offset"] == 0) != (hdr["metadata_size"] == 0):
        err("offset 40: metadata offset %d and size %d: both or neither must be 0"
            % (hdr["metadata_offset"], hdr["metadata_size"]))
    if hdr["metadata_size"] and hdr["metadata_size"] < 16:
        err("offset 48: metadata size %d, expected 0 or >= 16" % hdr["metadata_size"])
    sections = [("header", 0, af.HEADER_SIZE), ("config", hdr["config_offset"], hdr["config_size"]),
                ("directory", hdr["dir_offset"], hdr["dir_size"]), ("data", hdr["data_offset"], hdr["data_size"])]
    if hdr["metadata_size"]:
        sections.append(("metadata", hdr["metadata_offset"], hdr["metadata_size"]))
    for nm, off, sz in sections:
        if off > size or sz > size - off:
            err("%s section [%d, +%d) lies outside the file (%d bytes)" % (nm, off, sz, size))
    ss = sorted((off, sz, nm) for nm, off, sz in sections if sz)
    for (o1, s1, n1), (o2, s2, n2) in zip(ss, ss[1:]):
        if o1 + s1 > o2:
            err("%s section [%d, +%d) overlaps %s section at %d" % (n1, o1, s1, n2, o2))

    co = hdr["config_offset"]
    c = _ACONFIG.unpack_from(mv, co)
    kind, rank, alpha, dtc = c[:4]
    shape = dict(zip(SHAPE_KEYS, c[4:12]))
    sig = c[12]
    if kind != KIND_LORA:
        err("config offset %d: kind %d, expected %d (LoRA adapter)" % (co, kind, KIND_LORA))
    if not 1 <= rank <= MAX_RANK:
        err("config offset %d: rank %d, expected 1 .. %d" % (co + 4, rank, MAX_RANK))
    if not abs(alpha) <= MAX_ALPHA:
        err("config offset %d: alpha %r is outside [-%g, %g]" % (co + 8, alpha, MAX_ALPHA, MAX_ALPHA))
    p = shape_problems(shape)
    if p:
        err("config offset %d: base shape: %s" % (co + 16, "; ".join(p)))
    if sig == b"\0" * 40:
        signature = None
    else:
        try:
            signature = sig.decode("ascii")
        except UnicodeDecodeError:
            signature = None
        if signature is None or not SIG_RE.fullmatch(signature):
            err("config offset %d: signature %r, expected 40 lowercase hex digits or 40 zero bytes" % (co + 48, sig))
    cfg = dict(kind=kind, rank=rank, alpha=alpha, draft_token_count=dtc, base_shape=shape, signature=signature)

    meta = None
    if hdr["metadata_size"]:
        mo = hdr["metadata_offset"]
        mkind, _, mlen = struct.unpack_from("<IIQ", mv, mo)
        if mkind != META_JSON:
            err("metadata offset %d: kind %d, expected %d (UTF-8 JSON)" % (mo, mkind, META_JSON))
        if mlen > hdr["metadata_size"] - 16:
            err("metadata offset %d: length %d does not fit the %d-byte section" % (mo + 8, mlen, hdr["metadata_size"]))
        meta = bytes(mv[mo + 16: mo + 16 + mlen])
        try:
            j = af.loads_json(meta.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            err("metadata offset %d: not UTF-8 JSON: %s" % (mo + 16, e))
        if not isinstance(j, dict):
            err("metadata offset %d: a JSON %s, expected an object" % (mo + 16, type(j).__name__))

    entries = {}
    spans = []
    for k in range(hdr["n_tensors"]):
        eo = hdr["dir_offset"] + k * af.DIR_ENTRY_SIZE
        raw_name, t, nd, d0, d1, d2, d3, off, sz, gs, res = af._DIRENT.unpack_from(mv, eo)
        if b"\0" not in raw_name:
            err("directory entry %d (offset %d): name not NUL-terminated within 64 bytes" % (k, eo))
        nb = raw_name[:raw_name.index(b"\0")]
        if any(raw_name[len(nb):]):
            err("directory entry %d (offset %d): name not NUL-padded" % (k, eo))
        name = nb.decode("latin-1")
        if not nb or not af._NAME_RE.match(name):
            err("directory entry %d (offset %d): illegal name %r" % (k, eo, name))
        if name in entries:
            err("directory entry %d (offset %d): duplicate name %r" % (k, eo, name))
        if t not in af.TYPE_NAMES:
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
        if sz != n * af.TYPE_BYTES[t]:
            err("tensor %s (offset %d): size %d, expected %d for %s %s"
                % (name, eo + 112, sz, n * af.TYPE_BYTES[t], af.TYPE_NAMES[t], dims[:nd]))
        if off % af.ALIGN:
            err("tensor %s (offset %d): data offset %d not a multiple of 64" % (name, eo + 104, off))
        if off > hdr["data_size"] or sz > hdr["data_size"] - off:
            err("tensor %s: [%d, +%d) lies outside the %d-byte data section" % (name, off, sz, hdr["data_size"]))
        if gs != 0:
            err("tensor %s (offset %d): group_size %d, expected 0 for a float type" % (name, eo + 120, gs))
        entries[name] = dict(name=name, type=t, shape=tuple(dims[:nd]), offset=off, size=sz, index=k)
        spans.append((off, sz, name))
    spans.sort()
    for (o1, s1, n1), (o2, s2, n2) in zip(spans, spans[1:]):
        if o1 + s1 > o2:
            err("tensor %s [%d, +%d) overlaps tensor %s at %d" % (n1, o1, s1, n2, o2))
    specs = adapter_specs(shape, rank)
    want = dict(specs)
    missing = [n for n, _ in specs if n not in entries]
    if missing:
        err("missing tensor(s): %s" % ", ".join(missing))
    unknown = [n for n in entries if n not in want]
    if unknown:
        err("unknown tensor(s): %s" % ", ".join(unknown))
    for n, sh in specs:
        e = entries[n]
        if e["shape"] != tuple(sh):
            err("tensor %s: shape %s, expected %s" % (n, e["shape"], tuple(sh)))
        if e["type"] not in (af.TYPE_F32, af.TYPE_F16):
            err("tensor %s: type %s, expected F32 or F16" % (n, af.TYPE_NAMES[e["type"]]))
    return AfmAdapter(path, hdr, cfg, meta, entries, bytes(buf))


def adapter_problems_for_model(a, model_config):
    """[] when the adapter fits the model, else the reasons (base shape, signature)."""
    p = []
    ms = base_shape(model_config)
    for k in SHAPE_KEYS:
        if a.base_shape[k] != ms[k]:
            p.append("base %s: adapter %d, model %d" % (k, a.base_shape[k], ms[k]))
    msig = model_config.get("signature")
    if a.signature and msig and a.signature != msig:
        p.append("signature: adapter %s, model %s" % (a.signature, msig))
    return p


# --------------------------------------------------------------------------------------------
# .fmadapter packages

def fmadapter_specs(cfg, rank):
    """[(afma name, (rows, cols))] of adapter_weights.bin in record order (docs/MODEL.md section 6.2):
    layer by layer (segment 0 then segment 1), per layer q a, b, k a, b, v a, b (or wq a, b), wo a, b,
    gate a, b, up a, b, down a, b; A written [r, in], B written [out, r]. Same order as the .afma."""
    return adapter_specs(cfg, rank)


def write_blob_storage(path, arrays):
    """Core ML blob storage v2 with one fp16 record per array (in order). Returns [(record offset,
    data offset, size)]. No padding after the last record (as coremltools)."""
    out = bytearray(_BLOB_HEADER.pack(len(arrays), BLOB_VERSION))
    layout = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype != np.float16:
            raise AfmError("blob storage: fp16 arrays only, got %s" % a.dtype)
        data = a.astype("<f2").tobytes()
        rec = _align(len(out))
        out += b"\0" * (rec - len(out))
        out += _BLOB_RECORD.pack(BLOB_SENTINEL, BLOB_FP16, len(data), rec + 64)
        out += data
        layout.append((rec, rec + 64, len(data)))
    with open(path, "wb") as f:
        f.write(bytes(out))
    return layout


def read_blob_storage(buf, expected_sizes, name="adapter_weights.bin"):
    """Walk the records of blob storage v2 bytes and check them against the expected data sizes
    (bytes, in order). Returns [(data offset, size)]. AfmError names the record and byte offset."""
    n = len(buf)

    def err(msg):
        raise AfmError("%s: %s" % (name, msg))

    if n < 64:
        err("%d bytes, shorter than the 64-byte header" % n)
    count, version = struct.unpack_from("<II", buf, 0)
    if version != BLOB_VERSION:
        err("offset 4: version %d, expected %d" % (version, BLOB_VERSION))
    if count != len(expected_sizes):
        err("offset 0: %d records, expected %d for this base and rank" % (count, len(expected_sizes)))
    pos = 64
    out = []
    for k, want in enumerate(expected_sizes):
        rec = _align(pos)
        if rec + 64 > n:
            err("record %d: header at offset %d lies past the end of the file (%d bytes): truncated" % (k, rec, n))
        if any(buf[pos:rec]):
            err("offset %d: non-zero padding before record %d" % (pos, k))
        sentinel, dtype, size, off = struct.unpack_from("<IIQQ", buf, rec)
        if sentinel != BLOB_SENTINEL:
            err("record %d (offset %d): sentinel 0x%08x, expected 0xdeadbeef" % (k, rec, sentinel))
        if dtype != BLOB_FP16:
            err("record %d (offset %d): dtype %d, expected 1 (fp16)" % (k, rec + 4, dtype))
        if size != want:
            err("record %d (offset %d): size %d bytes, expected %d" % (k, rec + 8, size, want))
        if off != rec + 64:
            if off < rec + 64:
                err("record %d (offset %d): data offset %d overlaps the record header or earlier data (expected %d)"
                    % (k, rec + 16, off, rec + 64))
            err("record %d (offset %d): data offset %d, expected %d (right after the record header)"
                % (k, rec + 16, off, rec + 64))
        if off + size > n:
            err("record %d: data [%d, +%d) runs past the end of the file (%d bytes): truncated" % (k, off, size, n))
        out.append((off, size))
        pos = off + size
    tail = buf[pos:]
    if len(tail) >= 64 or any(tail):
        err("%d bytes after the last of the %d records (expected at most 63 zero bytes of padding)"
            % (len(tail), len(expected_sizes)))
    return out


class FmAdapter:
    def __init__(self, path, metadata, metadata_raw, tensors):
        self.path = path
        self.metadata = metadata
        self.metadata_raw = metadata_raw
        self.tensors = tensors

    rank = property(lambda self: self.metadata["loraRank"])
    signature = property(lambda self: self.metadata.get("baseModelSignature"))
    draft_token_count = property(lambda self: self.metadata.get("speculativeDecodingDraftTokenCount", 0))
    identifier = property(lambda self: self.metadata.get("adapterIdentifier"))


def read_fmadapter_metadata(path):
    """(dict, raw bytes) of NAME.fmadapter/metadata.json, validated."""
    mp = os.path.join(path, "metadata.json")
    if not os.path.isdir(path):
        raise AfmError("%s: not a directory (a .fmadapter package is a folder)" % path)
    if not os.path.isfile(mp):
        raise AfmError("%s: no metadata.json in the package" % path)
    with open(mp, "rb") as f:
        raw = f.read()
    try:
        md = af.loads_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AfmError("%s: not UTF-8 JSON: %s" % (mp, e))
    p = metadata_problems(md)
    if p:
        raise AfmError("%s: %s" % (mp, "; ".join(p)))
    return md, raw


def read_fmadapter(path, base_config):
    """Read and validate a .fmadapter package for this base (shapes from base_config, rank from
    loraRank). tensors: {afma name: float16 array [rows, cols]} exactly as stored (already
    transposed and, for B of q, k, wq, in the half-split layout)."""
    path = str(path).rstrip("/")
    md, raw = read_fmadapter_metadata(path)
    msig = base_config.get("signature") if isinstance(base_config, dict) else None
    if msig and md["baseModelSignature"] != msig:
        raise AfmError("%s: baseModelSignature %s does not match the model's %s"
                       % (os.path.join(path, "metadata.json"), md["baseModelSignature"], msig))
    wp = os.path.join(path, "adapter_weights.bin")
    if not os.path.isfile(wp):
        raise AfmError("%s: no adapter_weights.bin in the package" % path)
    with open(wp, "rb") as f:
        buf = f.read()
    specs = fmadapter_specs(base_config, md["loraRank"])
    recs = read_blob_storage(buf, [2 * r * c for _, (r, c) in specs], wp)
    tensors = {}
    for (name, sh), (off, size) in zip(specs, recs):
        a = np.frombuffer(buf, "<f2", size // 2, off).reshape(sh)
        if not np.isfinite(a).all():
            raise AfmError("%s: tensor %s (data at offset %d) contains NaN or infinity" % (wp, name, off))
        tensors[name] = a
    return FmAdapter(path, md, raw, tensors)


def write_fmadapter(path, metadata, arrays, metadata_raw=None):
    """Write NAME.fmadapter/: metadata.json (exporter formatting unless metadata_raw bytes are given)
    and adapter_weights.bin (fp16 records in the given order)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.json"), "wb") as f:
        f.write(metadata_raw if metadata_raw is not None else metadata_bytes(metadata))
    return write_blob_storage(os.path.join(path, "adapter_weights.bin"), arrays)
