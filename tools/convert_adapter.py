#!/usr/bin/env python3
"""convert_adapter.py - convert a LoRA adapter to an afm adapter file (.afma, docs/FORMAT.md). numpy only.

Sources:
  (a) an adapter-toolkit training checkpoint (.pt): a tamm state dict with the adapter tensors of
      docs/MODEL.md section 5 (`layers.segment_S.layer_K.<module>.adapters.<name>.lora_{0,1,2}.{a,b}_transpose`
      on the fused QKV, `...adapters.<name>.{a,b}_transpose` elsewhere; a leading `model.` and `.wrapped.`
      path components are allowed; base weights in the same file are ignored):
        python3 tools/convert_adapter.py adapter.pt --base afm-base.afm -o adapter.afma
  (b) the `base_adapter` embedded in Apple's base checkpoint:
        python3 tools/convert_adapter.py --from-base assets/base-model.pt -o base_adapter.afma
      (--base is optional here: the shapes come from the checkpoint itself; alpha from the
      <stem>-config.json beside it when it names one, else 16)
  (c) an exported `.fmadapter` package (Core ML blob storage, fp16):
        python3 tools/convert_adapter.py my.fmadapter --base afm-base.afm -o my.afma

The file stores A as [r, in] and B as [out, r], B of q, k (segment 0) and wq (segment 1) in the
half-split RoPE layout. From a checkpoint the converter transposes a_transpose / b_transpose and permutes
those B rows GPT-J -> NeoX; a .fmadapter already holds exactly that layout (the exporter's transforms are
the file's layout), so its fp16 tensors are copied as they are. Alpha is not in a .fmadapter or a
training checkpoint: it is 16 (docs/MODEL.md section 3; scale = alpha / rank) unless --alpha says otherwise.

Errors are one `error:` line listing every missing or unknown key, never a traceback (--debug shows one).
"""

import argparse
import os
import re
import sys
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapterfile as adf  # noqa: E402
import afmfile as af  # noqa: E402
from afmfile import AfmError  # noqa: E402
from ckptread import CheckpointError, LazyTensor, read_torch_zip  # noqa: E402

DEFAULT_ALPHA = 16.0


class _Defaults(SimpleNamespace):
    """convert.py's options for plan_toolkit: the ones given, None (its default) for any other."""

    def __getattr__(self, k):
        return None


class ConvertError(Exception):
    pass


def _list(items, limit=40):
    items = list(items)
    s = ", ".join(items[:limit])
    if len(items) > limit:
        s += ", ... (%d more)" % (len(items) - limit)
    return s


# ================================================================================================
# toolkit checkpoints

MODULES = {
    0: {"attention.qkv_transform": "qkv", "attention.output_transform": "wo",
        "feed_forward.hidden_transform.linear_0": "gate", "feed_forward.hidden_transform.linear_1": "up",
        "feed_forward.output_transform": "down"},
    1: {"attention.q_transform": "wq", "attention.output_transform": "wo",
        "feed_forward.hidden_transform.linear_0": "gate", "feed_forward.hidden_transform.linear_1": "up",
        "feed_forward.output_transform": "down"},
}
_ADAPTER_RE = re.compile(r"^layers\.segment_(\d+)\.layer_(\d+)\.(.+?)\.adapters\.([^.]+)\.(?:lora_(\d+)\.)?([ab])_transpose$")
_INV = {s: {v: k for k, v in m.items()} for s, m in MODULES.items()}


def normalize_key(k):
    """Drop a leading `model.` and every `.wrapped` / `._wrapped` path component."""
    if k.startswith("model."):
        k = k[len("model."):]
    return re.sub(r"\.(?:_?wrapped)(?=\.)", "", k)


def tamm_key(seg, j, proj, ab, name):
    """The normalized toolkit key of one adapter tensor (proj q/k/v/wq/wo/gate/up/down, ab 'a'/'b')."""
    pre = "layers.segment_%d.layer_%d." % (seg, j)
    if proj in ("q", "k", "v"):
        return pre + "attention.qkv_transform.adapters.%s.lora_%d.%s_transpose" % (name, "qkv".index(proj), ab)
    return pre + "%s.adapters.%s.%s_transpose" % (_INV[seg][proj], name, ab)


def scan_toolkit(path):
    """Read a toolkit .pt: ({adapter name: {(seg, layer, proj, ab): (original key, LazyTensor)}},
    [unknown adapter-looking keys], number of other (ignored) entries, [adapter keys in file order])."""
    sd = read_torch_zip(path)
    found, unknown, order, seen = {}, [], [], {}
    ignored = 0
    for k, v in sd.items():
        nk = normalize_key(k)
        if nk in seen:
            raise ConvertError("%s: keys %s and %s name the same tensor after removing `model.`/`.wrapped`"
                               % (path, seen[nk], k))
        seen[nk] = k
        if "adapter" not in nk:
            ignored += 1
            continue
        m = _ADAPTER_RE.match(nk)
        if not m:
            unknown.append(k)
            continue
        seg, j, module, name, lora, ab = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5), m.group(6)
        proj = MODULES.get(seg, {}).get(module)
        if proj is None:
            unknown.append(k)
            continue
        if proj == "qkv":
            if lora not in ("0", "1", "2"):
                unknown.append(k)
                continue
            proj = "qkv"[int(lora)]
        elif lora is not None:
            unknown.append(k)
            continue
        if not isinstance(v, LazyTensor):
            unknown.append("%s (a %s, not a tensor)" % (k, type(v).__name__))
            continue
        found.setdefault(name, {})[(seg, j, proj, ab)] = (k, v)
        order.append((name, (seg, j, proj, ab)))
    return found, unknown, ignored, order


def pick_adapter(path, found, unknown, want=None):
    if unknown:
        raise ConvertError("%s: unknown adapter keys (%d): %s" % (path, len(unknown), _list(unknown)))
    if not found:
        raise ConvertError("%s: no adapter tensors (keys `...adapters.<name>.{a,b}_transpose`) in the checkpoint" % path)
    if want is not None:
        if want not in found:
            raise ConvertError("%s: no adapter named %r (it has: %s)" % (path, want, ", ".join(sorted(found))))
        return want
    if len(found) > 1:
        raise ConvertError("%s: several adapters (%s): choose one with --adapter" % (path, ", ".join(sorted(found))))
    return next(iter(found))


def check_toolkit_adapter(path, cfg, name, tensors):
    """Check the adapter's keys and shapes against the base config; returns the rank."""
    n0 = cfg["n_layers"] - cfg["n_reuse_layers"]
    expect = []
    for i, p, io in adf.adapted(cfg):
        seg, j = (0, i) if i < n0 else (1, i - n0)
        for ab in "ab":
            expect.append(((seg, j, p, ab), io))
    want = dict(expect)
    missing = [tamm_key(*key[:3], key[3], name) for key, _ in expect if key not in tensors]
    extra = [tensors[key][0] for key in tensors if key not in want]
    if missing or extra:
        msg = []
        if missing:
            msg.append("missing keys (%d): %s" % (len(missing), _list(missing)))
        if extra:
            msg.append("keys the base (%d regular + %d KV-reuse layers) has no place for (%d): %s"
                       % (n0, cfg["n_reuse_layers"], len(extra), _list(sorted(extra))))
        raise ConvertError("%s: adapter %r: %s" % (path, name, "; ".join(msg)))
    first = tensors[expect[0][0]][1]
    if len(first.shape) != 2:
        raise ConvertError("%s: %s has shape %s, expected [in, rank]" % (path, tensors[expect[0][0]][0], first.shape))
    r = first.shape[1]
    bad = []
    for key, (n_in, n_out) in expect:
        k, v = tensors[key]
        shp = (n_in, r) if key[3] == "a" else (r, n_out)
        if v.shape != shp:
            bad.append("%s: %s, expected %s" % (k, v.shape, shp))
        elif v.dtype not in ("f32", "f16", "bf16", "f64"):
            bad.append("%s: dtype %s, expected a float type" % (k, v.dtype))
    if bad:
        raise ConvertError("%s: adapter %r: wrong shapes (base dim %d, q %d, kv %d, ffn %d; rank %d from %s): %s"
                           % (path, name, cfg["dim"], cfg["n_heads"] * cfg["head_dim"],
                              cfg["n_kv_heads"] * cfg["head_dim"], cfg["ffn_dim"], r, tensors[expect[0][0]][0],
                              _list(bad, 20)))
    if not 1 <= r <= adf.MAX_RANK:
        raise ConvertError("%s: rank %d, expected 1 .. %d" % (path, r, adf.MAX_RANK))
    return r


def afma_tensors_from_toolkit(cfg, tensors):
    """{afma name: callable} from the tamm tensors: A = a_transpose^T [r, in], B = b_transpose^T [out, r],
    B of q, k, wq permuted to the half-split layout."""
    n0 = cfg["n_layers"] - cfg["n_reuse_layers"]
    hd = cfg["head_dim"]
    out = {}
    for i, p, _ in adf.adapted(cfg):
        seg, j = (0, i) if i < n0 else (1, i - n0)
        a = tensors[(seg, j, p, "a")][1]
        b = tensors[(seg, j, p, "b")][1]
        heads = adf.halfsplit_heads(cfg, p)
        out["l%d.%s.lora_a" % (i, p)] = (lambda v: lambda: np.ascontiguousarray(v.numpy().T))(a)
        if heads is None:
            out["l%d.%s.lora_b" % (i, p)] = (lambda v: lambda: np.ascontiguousarray(v.numpy().T))(b)
        else:
            out["l%d.%s.lora_b" % (i, p)] = (lambda v, h: lambda: af.permute_rows_to_halfsplit(
                np.ascontiguousarray(v.numpy().T), h, hd))(b, heads)
    return out


# ================================================================================================

def load_base(path):
    try:
        m = af.read_model(path)
    except (AfmError, OSError) as e:
        raise ConvertError("--base: %s" % e)
    return m.config


def resolve_signature(a, base_sig, notes, source_sig=None, source=None):
    sig = None
    if a.signature:
        sig = a.signature.strip().lower()
        if not adf.SIG_RE.fullmatch(sig):
            raise ConvertError("--signature %r: expected 40 hex digits" % a.signature)
    if source_sig:
        if sig and sig != source_sig:
            raise ConvertError("--signature %s differs from the %s's baseModelSignature %s" % (sig, source, source_sig))
        sig = source_sig
    if base_sig:
        if sig and sig != base_sig:
            raise ConvertError("signature %s does not match the base model's %s" % (sig, base_sig))
        sig = base_sig
    notes.append("signature: %s" % (sig or "none (40 zero bytes)"))
    return sig


def metadata_for(a, name, rank, sig, dtc, notes):
    if a.no_metadata:
        notes.append("metadata: none (--no-metadata)")
        return None
    if a.metadata:
        with open(a.metadata, "rb") as f:
            raw = f.read()
        notes.append("metadata: %s, verbatim" % a.metadata)
        return raw
    nm = a.name or re.sub(r"[^A-Za-z0-9_]", "_", name)
    try:
        md = adf.make_metadata(nm, rank, sig, author=a.author, description=a.description, license=a.license,
                               draft_token_count=dtc)
    except AfmError as e:
        raise ConvertError("--name: %s" % e)
    notes.append("metadata: adapterIdentifier %s" % md["adapterIdentifier"])
    return md


def convert(a):
    notes = []
    if a.from_base:
        if a.input:
            raise ConvertError("give either an input or --from-base, not both")
        src = a.from_base
        kind = "from-base"
    else:
        if not a.input:
            raise ConvertError("no input (an adapter .pt, a .fmadapter folder, or --from-base base-model.pt)")
        src = a.input
        if os.path.isdir(src):
            kind = "fmadapter"
        elif os.path.isfile(src):
            kind = "toolkit"
        else:
            raise ConvertError("%s: no such file or folder" % src)
    if kind != "from-base" and not a.base:
        raise ConvertError("--base BASE.afm is required: the adapter's shapes are checked against it and its "
                           "signature recorded")
    base_cfg = load_base(a.base) if a.base else None
    ltype = a.type or ("f16" if kind == "fmadapter" else "f32")

    if kind == "fmadapter":
        try:
            pkg = adf.read_fmadapter(src, base_cfg)
        except AfmError as e:
            raise ConvertError(str(e))
        rank = pkg.rank
        alpha = a.alpha if a.alpha is not None else DEFAULT_ALPHA
        notes.append("source: .fmadapter %s (%s), rank %d, %d fp16 tensors"
                     % (src, pkg.identifier, rank, len(pkg.tensors)))
        notes.append("alpha %g: %s" % (alpha, "from the command line" if a.alpha is not None else
                                        "AFM default (a .fmadapter does not record it)"))
        sig = resolve_signature(a, base_cfg.get("signature"), notes, pkg.signature, "package")
        dtc = int(a.draft_tokens) if a.draft_tokens is not None else int(pkg.draft_token_count)
        meta = pkg.metadata_raw if not (a.metadata or a.no_metadata or a.name) else \
            metadata_for(a, pkg.identifier.split("-")[1], rank, sig, dtc, notes)
        tensors = pkg.tensors
        cfg = base_cfg
    else:
        path = src
        try:
            found, unknown, ignored, _ = scan_toolkit(path)
        except CheckpointError as e:
            raise ConvertError(str(e))
        if kind == "from-base":
            want = a.adapter or "base_adapter"
            import convert as cv
            ns = _Defaults(config=a.config, no_lora=False)
            bnotes = []
            try:
                ccfg, _ = cv.plan_toolkit(path, ns, bnotes)
            except cv.ConvertError as e:
                raise ConvertError(str(e))
            if ccfg["lora_rank"] == 0:
                raise ConvertError("%s: no base_adapter LoRA tensors in the checkpoint" % path)
            cfg = dict(ccfg, signature=None)
            if base_cfg is not None:
                p = [k for k in adf.SHAPE_KEYS if base_cfg[k] != cfg[k]]
                if p:
                    raise ConvertError("%s and --base %s differ in %s" % (path, a.base, ", ".join(p)))
                cfg["signature"] = base_cfg.get("signature")
            alpha_src = [n for n in bnotes if n.startswith("LoRA base_adapter")]
            if a.alpha is not None:
                alpha = a.alpha
                notes.append("alpha %g: from the command line" % alpha)
            else:
                alpha = ccfg["lora_alpha"]
                notes.append("alpha %g: %s" % (alpha, re.sub(r"^.*?alpha [^:]*: ", "", alpha_src[0]) if alpha_src else "default"))
        else:
            want = a.adapter
            cfg = base_cfg
            alpha = a.alpha if a.alpha is not None else DEFAULT_ALPHA
            notes.append("alpha %g: %s" % (alpha, "from the command line" if a.alpha is not None else
                                            "AFM default (a training checkpoint does not record it; --alpha overrides)"))
        name = pick_adapter(path, found, unknown, want)
        rank = check_toolkit_adapter(path, cfg, name, found[name])
        notes.insert(0, "source: toolkit checkpoint %s: adapter %r, rank %d, %d tensors; %d other entries ignored%s"
                     % (path, name, rank, len(found[name]), ignored,
                        "" if len(found) == 1 else " (other adapters: %s)" % ", ".join(sorted(set(found) - {name}))))
        sig = resolve_signature(a, cfg.get("signature"), notes)
        dtc = int(a.draft_tokens) if a.draft_tokens is not None else 5
        meta = metadata_for(a, name, rank, sig, dtc, notes)
        tensors = afma_tensors_from_toolkit(cfg, found[name])
    notes.append("rank %d, alpha %g, scale %g, draft tokens %d, type %s" % (rank, alpha, alpha / rank, dtc, ltype))
    return cfg, tensors, rank, alpha, dtc, sig, meta, ltype, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a LoRA adapter (toolkit .pt, the base_adapter of base-model.pt, "
                                             "or a .fmadapter package) to an afm adapter file (.afma).")
    ap.add_argument("input", nargs="?", help="adapter checkpoint .pt or NAME.fmadapter folder")
    ap.add_argument("--from-base", metavar="BASE_PT", help="extract the base_adapter of Apple's base-model.pt")
    ap.add_argument("-o", "--output", required=True, help="output .afma file")
    ap.add_argument("--base", help="the base model .afm (required for a .pt or .fmadapter input)")
    ap.add_argument("--adapter", help="which adapters.<NAME> to take when the checkpoint has several")
    ap.add_argument("--alpha", type=float, help="LoRA alpha (scale = alpha / rank); default 16, or the toolkit "
                                                "config's value with --from-base")
    ap.add_argument("--config", help="with --from-base: toolkit config json (default <stem>-config.json if present)")
    ap.add_argument("--type", choices=("f32", "f16"), help="tensor type (default f32; f16 for a .fmadapter, lossless)")
    ap.add_argument("--signature", help="base-model signature, 40 hex digits (default: the base model's / package's)")
    ap.add_argument("--name", help="adapter name for the metadata's adapterIdentifier fmadapter-<name>-<sig7>")
    ap.add_argument("--author", default="3P developer")
    ap.add_argument("--description", default="")
    ap.add_argument("--license", default="")
    ap.add_argument("--draft-tokens", type=int, help="speculativeDecodingDraftTokenCount (default 5, or the package's)")
    ap.add_argument("--metadata", help="a JSON file to store verbatim as the metadata")
    ap.add_argument("--no-metadata", action="store_true", help="write no metadata section")
    ap.add_argument("--verify", action="store_true", help="read the written file back and compare every tensor")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    a = ap.parse_args(argv)

    def say(*x):
        if not a.quiet:
            print(*x, flush=True)

    try:
        cfg, tensors, rank, alpha, dtc, sig, meta, ltype, notes = convert(a)
        for n in notes:
            say(n)
        info = adf.write_adapter(a.output, cfg, tensors, rank, alpha, dtc, sig, meta, ltype)
        ad = adf.read_adapter(a.output)
        say("wrote %s: %d bytes, %d tensors (%d LoRA parameters)" % (a.output, info["file_size"], len(info["entries"]),
                                                                   adf.count_params(cfg, rank)))
        if a.verify:
            nbad = 0
            for e in info["entries"]:
                v = tensors[e["name"]]
                want = af._encode(np.asarray(v() if callable(v) else v), e["type"], e["name"])
                if not np.array_equal(want.reshape(-1).view(np.uint8), np.ascontiguousarray(ad.tensor(e["name"])).reshape(-1).view(np.uint8)):
                    nbad += 1
                    print("verify: %s differs" % e["name"])
            if nbad:
                raise ConvertError("verify: %d tensors differ from the source" % nbad)
            say("verify: all %d tensors read back identical" % len(info["entries"]))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ConvertError, AfmError, CheckpointError, OSError) as e:
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
