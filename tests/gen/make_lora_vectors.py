#!/usr/bin/env python3
"""make_lora_vectors.py - LoRA adapter fixtures and MLX reference logits for the adapter tests, and the
hostile .fmadapter corpus.

    python3 tests/gen/make_lora_vectors.py            # writes the files below
    python3 tests/gen/make_lora_vectors.py --check    # regenerate in a temp dir, compare bytes

Base: the scaled-down fake toolkit base tests/vectors/toolkit/base-model.pt (= tests/vectors/toolkit.afm:
vocab 256, dim 32, 2 regular + 2 KV-reuse layers, 4 heads x 8, 2 KV heads, ffn 104). Every reference
runs the BASE WEIGHTS WITHOUT the embedded base_adapter, plus the adapter: an adapter replaces the
base_adapter (the toolkit trains the base_adapter's own tensors), it is not stacked on it.

tests/vectors/lora/
  adapter.pt          toolkit training checkpoint (real torch.save): the whole state dict of base-model.pt
                      with a leading `model.`, its base weights (ignored by the converter) and, in place of
                      the rank-4 base_adapter, a random rank-32 `base_adapter` (alpha 16, scale 0.5); two
                      adapter keys carry a `.wrapped.` component, every other a_transpose is a transposed
                      (non-contiguous) view. Values are fp16-representable, so the fp16 .fmadapter is exact.
  adapter.afma        tools/convert_adapter.py adapter.pt --base toolkit.afm --type f32 --name test
                      --signature 9799725f... (F32)
  test.fmadapter/     tests/gen/make_fmadapter.py adapter.pt --name test (the exporter's transforms)
  adapter.ref         MLX afm7 with LoRA layers (FusedLoRALinear on qkv_proj: 3 LoRAs; LoRALinear on the
                      segment-1 q_proj, out_proj, gate/up/down) carrying adapter.pt's A/B at scale 0.5, float32
  adapter2.pt         a second adapter, `adapters.style.`, rank 16, no `model.` prefix, adapter keys only,
                      segment 1 stored before segment 0 (not the exporter's order)
  adapter2.afma       convert_adapter.py adapter2.pt --alpha 12 --type f16 (scale 0.75; values fp16-exact)
  adapter2.ref        MLX with adapter2 at scale 0.75
  base_adapter.afma   convert_adapter.py --from-base tests/vectors/toolkit/base-model.pt (rank 4, alpha 2 from
                      base-model-config.json, scale 0.5)
  base_adapter.ref    MLX with the base_adapter as LoRA layers (toolkit_lora.ref is the same with the LoRA
                      merged into the weights)
Token sequences: those of tests/vectors/toolkit.ref (64-token prefill, then 16 decode steps).

tests/fuzz/corpus/fmadapter/   hostile .fmadapter packages (rank 2, for toolkit.afm), one folder each, and
                               README.md saying what a reader must report for each.
Needs torch and mlx-lm.
"""

import argparse
import filecmp
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.join(ROOT, "tools")
sys.path[:0] = [HERE, TOOLS]  # gen_ref, make_fake_toolkit; the converters and file libraries
import adapterfile as adf  # noqa: E402
import afmfile as af  # noqa: E402
import convert as cv  # noqa: E402
import convert_adapter as ca  # noqa: E402
import gen_ref  # noqa: E402
import make_fake_toolkit as mft  # noqa: E402
from ckptread import read_torch_zip  # noqa: E402

VEC = os.path.join(ROOT, "tests", "vectors")
BASE_PT = os.path.join(VEC, "toolkit", "base-model.pt")
BASE_AFM = os.path.join(VEC, "toolkit.afm")
OUT = os.path.join(VEC, "lora")
FUZZ = os.path.join(ROOT, "tests", "fuzz", "corpus", "fmadapter")
SIG = adf.APPLE_SIGNATURE
C = mft.BASE  # dims of the fake toolkit base

ADAPTERS = {
    "adapter": dict(seed=606, rank=32, alpha=16.0, name="base_adapter"),
    "adapter2": dict(seed=707, rank=16, alpha=12.0, name="style"),
}
# adapter keys of adapter.pt that get a `.wrapped.` component: (seg, layer, proj)
WRAPPED = {(0, 1, "down"), (1, 0, "gate")}
FILES = ["adapter.pt", "adapter.afma", "adapter.ref", "test.fmadapter/metadata.json", "test.fmadapter/adapter_weights.bin",
         "adapter2.pt", "adapter2.afma", "adapter2.ref", "base_adapter.afma", "base_adapter.ref"]


def run(*args):
    r = subprocess.run([sys.executable] + [str(x) for x in args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("%s failed:\n%s%s" % (" ".join(str(x) for x in args), r.stdout, r.stderr))
    return r.stdout


def base_cfg():
    return af.read_model(BASE_AFM).config


def random_adapter(cfg, seed, rank):
    """{(seg, layer, proj, 'a'/'b'): float32 tamm-layout array (a_transpose [in, r], b_transpose [r, out])},
    values rounded to fp16."""
    g = np.random.default_rng(seed)
    n0 = cfg["n_layers"] - cfg["n_reuse_layers"]
    out = {}
    for i, p, (n_in, n_out) in adf.adapted(cfg):
        seg, j = (0, i) if i < n0 else (1, i - n0)
        a = g.standard_normal((n_in, rank)) / np.sqrt(n_in)
        b = g.standard_normal((rank, n_out)) * 0.5 / np.sqrt(rank)
        out[(seg, j, p, "a")] = a.astype(np.float16).astype(np.float32)
        out[(seg, j, p, "b")] = b.astype(np.float16).astype(np.float32)
    return out


def tamm_from_pt(path, name="base_adapter"):
    """The adapter `name` of a toolkit .pt as {(seg, layer, proj, ab): float32 array}."""
    found, unknown, _, _ = ca.scan_toolkit(path)
    assert not unknown and name in found
    return {k: v.numpy().astype(np.float32) for k, (_, v) in found[name].items()}


def save_adapter_pt(path, tamm, rank, full):
    """adapter.pt (full=True: the whole base state dict, `model.` prefix, wrapped keys, strided views)
    or adapter2.pt (adapter keys only, name `style`, segment 1 first)."""
    import torch
    if full:
        base = torch.load(BASE_PT, map_location="cpu", weights_only=True)
        sd = {}
        for k, v in base.items():
            m = ca._ADAPTER_RE.match(ca.normalize_key(k))
            if not m:
                sd["model." + k] = v
                continue
            seg, j, mod, _, lora, ab = m.groups()
            seg, j = int(seg), int(j)
            proj = ca.MODULES[seg][mod]
            if proj == "qkv":
                proj = "qkv"[int(lora)]
            arr = tamm[(seg, j, proj, ab)]
            if ab == "a" and j % 2 == 0:
                t = torch.from_numpy(np.ascontiguousarray(arr.T)).t()   # non-contiguous view
            else:
                t = torch.from_numpy(np.ascontiguousarray(arr))
            key = k
            if (seg, j, proj) in WRAPPED:
                key = k.replace(".adapters.", ".wrapped.adapters.")
            sd["model." + key] = t
        torch.save(sd, path)
        return
    sd = {}
    keys = sorted(tamm, key=lambda k: (-k[0], k[1]))   # segment 1 first, then segment 0; stable within
    for seg, j, p, ab in keys:
        sd[ca.tamm_key(seg, j, p, ab, "style")] = torch.from_numpy(np.ascontiguousarray(tamm[(seg, j, p, ab)]))
    torch.save(sd, path)


# ------------------------------------------------------------------------------------------------
# MLX references

def base_mlx_weights():
    """MLX afm7 weights of base-model.pt (interleaved layout, no LoRA) and the toolkit's token sequence."""
    sd = read_torch_zip(BASE_PT)
    glob, layers, ranges = {}, {}, {}
    for k, v in sd.items():
        nk = ca.normalize_key(k)
        if nk in ("embedding.weight", "output_norm.weight"):
            glob[nk] = v.numpy()
            continue
        m = re.match(r"^layers\.segment_(\d+)\.layer_(\d+)\.(.+)$", nk)
        if not m:
            continue
        s, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        part = (cv.SEG0_PARTS if s == 0 else cv.SEG1_PARTS).get(rest)
        if part is None or "." in part:
            continue
        if part in ("kv_k", "kv_v"):
            ranges[(j, part)] = v.numpy().astype(np.float32)
        else:
            layers.setdefault((s, j), {})[part] = v.numpy()
    n0 = C["n0"]
    scales = np.array([[af.kv_scale_from_range(*ranges[(j, p)]) for p in ("kv_k", "kv_v")] for j in range(n0)],
                      np.float32)
    return mft.to_mlx(C, glob, layers, scales)


def mlx_lora_logits(weights, tamm, rank, scale, tokens):
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.models import afm7
    model = gen_ref.build_model(mft.mlx_args(C), weights)

    def lora(linear, seg, j, p):
        ll = LoRALinear.from_base(linear, r=rank, dropout=0.0, scale=scale)
        ll.lora_a = mx.array(tamm[(seg, j, p, "a")])
        ll.lora_b = mx.array(tamm[(seg, j, p, "b")])
        return ll

    n = 0
    for j, layer in enumerate(model.model.layers):
        at = layer.self_attn
        f = at.qkv_proj.to_lora(r=rank, dropout=0.0, scale=scale)
        assert isinstance(f, afm7.FusedLoRALinear)
        f.lora_a = [mx.array(tamm[(0, j, p, "a")]) for p in "qkv"]
        f.lora_b = [mx.array(tamm[(0, j, p, "b")]) for p in "qkv"]
        at.qkv_proj = f
        at.out_proj = lora(at.out_proj, 0, j, "wo")
        for nm, p in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            setattr(layer.mlp, nm, lora(getattr(layer.mlp, nm), 0, j, p))
        n += 7
    for j, layer in enumerate(model.model.kv_reuse_layers):
        at = layer.self_attn
        at.q_proj = lora(at.q_proj, 1, j, "wq")
        at.out_proj = lora(at.out_proj, 1, j, "wo")
        for nm, p in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            setattr(layer.mlp, nm, lora(getattr(layer.mlp, nm), 1, j, p))
        n += 5
    model.eval()
    mx.eval(model.parameters())
    assert n * 2 == len(tamm), (n, len(tamm))
    return gen_ref.run_mlx(model, tokens)


# ------------------------------------------------------------------------------------------------
# hostile .fmadapter corpus

FUZZ_CASES = [
    # (folder, what a reader must do / report)
    ("valid_rank2", "loads: rank 2, {n} fp16 records for toolkit.afm (signature 9799725..., the model has none)"),
    ("signature_mismatch", "loads with toolkit.afm (unsigned); refused when the model's signature is "
                           "9799725ff8e851184037110b422d891ad3b92ec1 (patch file offset 200 = config 128 + 72 of "
                           "toolkit.afm): baseModelSignature 0123...4567 does not match the model's"),
    ("signature_not_hex", "refuse: metadata.json baseModelSignature is not 40 lowercase hex digits (it is upper case)"),
    ("bad_json", "refuse: metadata.json is not valid JSON (cut short)"),
    ("metadata_not_object", "refuse: metadata.json is a JSON array, expected an object"),
    ("missing_metadata", "refuse: the package has no metadata.json"),
    ("missing_weights", "refuse: the package has no adapter_weights.bin"),
    ("identifier_hyphen", "refuse: adapterIdentifier fmadapter-my-adapter-9799725 does not match fmadapter-\\w+-\\w+ "
                          "(a '-' inside the name part)"),
    ("identifier_missing", "refuse: metadata.json has no adapterIdentifier"),
    ("rank_zero", "refuse: loraRank 0, expected 1 .. 4096"),
    ("rank_string", "refuse: loraRank \"2\" is a string, expected an integer"),
    ("rank_mismatch", "refuse: loraRank 3 but the records hold rank-2 tensors: record 0 size 128 bytes, expected 192"),
    ("bad_version", "refuse: adapter_weights.bin offset 4: blob storage version 3, expected 2"),
    ("wrong_record_count", "refuse: adapter_weights.bin offset 0: {n_1} records, expected {n} (header count)"),
    ("extra_record", "refuse: adapter_weights.bin offset 0: {n1} records, expected {n} (one record appended)"),
    ("bad_magic", "refuse: record 5: sentinel 0xdeadbeee, expected 0xdeadbeef"),
    ("bad_dtype", "refuse: record 0: dtype 2 (fp32), expected 1 (fp16)"),
    ("wrong_size", "refuse: record 7: size field 2 bytes larger than the tensor (A or B of that projection)"),
    ("overlapping_offsets", "refuse: record 2's data offset points at record 1's data (overlap; expected "
                            "record offset + 64)"),
    ("misplaced_offset", "refuse: record 3's data offset 64 bytes past where it belongs (expected record offset + 64)"),
    ("truncated_blob", "refuse: adapter_weights.bin cut inside the last record's data: truncated"),
    ("truncated_header", "refuse: adapter_weights.bin is 40 bytes, shorter than the 64-byte header"),
    ("trailing_garbage", "refuse: 100 bytes after the last record (only up to 63 zero bytes of padding allowed)"),
    ("nan_value", "refuse: record 0 holds a NaN (fp16 0x7e00) (or load and report it; it must not reach a forward "
                  "pass silently)"),
]


def write_fuzz(out, cfg):
    os.makedirs(out, exist_ok=True)
    for d in os.listdir(out):
        p = os.path.join(out, d)
        if os.path.isdir(p):
            shutil.rmtree(p)
    g = np.random.default_rng(808)
    specs = adf.fmadapter_specs(cfg, 2)
    arrays = [(g.standard_normal(sh) * 0.1).astype(np.float16) for _, sh in specs]
    md = adf.make_metadata("fuzz", 2, SIG)
    valid = os.path.join(out, "valid_rank2")
    layout = adf.write_fmadapter(valid, md, arrays)
    with open(os.path.join(valid, "adapter_weights.bin"), "rb") as f:
        blob = f.read()
    mdb = adf.metadata_bytes(md)

    def mk(name, meta=mdb, weights=blob):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        if meta is not None:
            with open(os.path.join(d, "metadata.json"), "wb") as f:
                f.write(meta)
        if weights is not None:
            with open(os.path.join(d, "adapter_weights.bin"), "wb") as f:
                f.write(bytes(weights))

    def md_with(**kw):
        m = dict(md)
        for k, v in kw.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        return adf.metadata_bytes(m)

    def patched(fn):
        b = bytearray(blob)
        fn(b)
        return b

    u32 = lambda b, o, v: struct.pack_into("<I", b, o, v)  # noqa: E731
    u64 = lambda b, o, v: struct.pack_into("<Q", b, o, v)  # noqa: E731
    rec = [r for r, _, _ in layout]
    mk("signature_mismatch", md_with(baseModelSignature="0123456789abcdef0123456789abcdef01234567"))
    mk("signature_not_hex", md_with(baseModelSignature=SIG.upper()))
    mk("bad_json", mdb[:len(mdb) // 2])
    mk("metadata_not_object", b"[" + mdb + b"]")
    mk("missing_metadata", meta=None)
    mk("missing_weights", weights=None)
    mk("identifier_hyphen", md_with(adapterIdentifier="fmadapter-my-adapter-9799725"))
    mk("identifier_missing", md_with(adapterIdentifier=None))
    mk("rank_zero", md_with(loraRank=0))
    mk("rank_string", md_with(loraRank="2"))
    mk("rank_mismatch", md_with(loraRank=3))
    mk("bad_version", weights=patched(lambda b: u32(b, 4, 3)))
    mk("wrong_record_count", weights=patched(lambda b: u32(b, 0, len(specs) - 1)))

    def extra(b):
        u32(b, 0, len(specs) + 1)
        pos = (len(b) + 63) // 64 * 64
        b += b"\0" * (pos - len(b))
        b += struct.pack("<IIQQ40x", adf.BLOB_SENTINEL, 1, 64, pos + 64) + b"\0" * 64
    mk("extra_record", weights=patched(extra))
    mk("bad_magic", weights=patched(lambda b: u32(b, rec[5], 0xDEADBEEE)))
    mk("bad_dtype", weights=patched(lambda b: u32(b, rec[0] + 4, 2)))
    mk("wrong_size", weights=patched(lambda b: u64(b, rec[7] + 8, layout[7][2] + 2)))
    mk("overlapping_offsets", weights=patched(lambda b: u64(b, rec[2] + 16, layout[1][1])))
    mk("misplaced_offset", weights=patched(lambda b: u64(b, rec[3] + 16, layout[3][1] + 64)))
    mk("truncated_blob", weights=blob[:layout[-1][1] + layout[-1][2] // 2])
    mk("truncated_header", weights=blob[:40])
    mk("trailing_garbage", weights=blob + b"\x01" * 100)
    mk("nan_value", weights=patched(lambda b: struct.pack_into("<H", b, layout[0][1] + 6, 0x7E00)))

    lines = ["# Hostile `.fmadapter` packages", "",
             "Written by `python3 tests/gen/make_lora_vectors.py` (deterministic). Every package is for the fake "
             "toolkit base `tests/vectors/toolkit.afm` (vocab 256, dim 32, 2 + 2 layers, 4 heads x 8, 2 KV heads, "
             "ffn 104) at rank 2: %d fp16 records in the order of docs/MODEL.md section 6.2. `valid_rank2/` is the "
             "untouched package; each other folder changes one thing. A reader must refuse every package marked "
             "refuse with an error that names the file (metadata.json or adapter_weights.bin), the record or key "
             "and the byte offset where it applies, and must never read outside the file." % len(specs), "",
             "| folder | what the reader must do | tools/adapterfile.py says |", "|---|---|---|"]
    for name, what in FUZZ_CASES:
        try:
            adf.read_fmadapter(os.path.join(out, name), cfg)
            said = "loads"
        except af.AfmError as e:
            said = str(e).replace(out + os.sep, "").replace("|", "\\|")
        what = what.format(n=len(specs), n_1=len(specs) - 1, n1=len(specs) + 1)
        lines.append("| `%s/` | %s | %s |" % (name, what.replace("|", "\\|"), said))
    lines.append("")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))
    return {n for n, _ in FUZZ_CASES}


# ------------------------------------------------------------------------------------------------

def generate(outdir, fuzzdir, verbose=True):
    os.makedirs(outdir, exist_ok=True)
    cfg = base_cfg()
    tokens = gen_ref.read_ref(os.path.join(VEC, "toolkit.ref"))[2].copy()
    weights = base_mlx_weights()
    say = print if verbose else (lambda *a: None)

    # (i)-(iv): adapter.pt, adapter.afma, test.fmadapter, adapter.ref
    A = ADAPTERS["adapter"]
    t1 = random_adapter(cfg, A["seed"], A["rank"])
    pt1 = os.path.join(outdir, "adapter.pt")
    save_adapter_pt(pt1, t1, A["rank"], full=True)
    back = tamm_from_pt(pt1, A["name"])
    assert all(np.array_equal(back[k], t1[k]) for k in t1)
    say(run(os.path.join(TOOLS, "convert_adapter.py"), pt1, "--base", BASE_AFM, "-o", os.path.join(outdir, "adapter.afma"),
            "--type", "f32", "--name", "test", "--signature", SIG, "--alpha", A["alpha"], "--verify").rstrip())
    say(run(os.path.join(HERE, "make_fmadapter.py"), pt1, "--base", BASE_AFM, "-o", os.path.join(outdir, "test.fmadapter"),
            "--name", "test", "--signature", SIG).rstrip())
    lg = mlx_lora_logits(weights, t1, A["rank"], A["alpha"] / A["rank"], tokens)
    gen_ref.write_ref(os.path.join(outdir, "adapter.ref"), tokens, lg)

    # (v): adapter2
    B = ADAPTERS["adapter2"]
    t2 = random_adapter(cfg, B["seed"], B["rank"])
    pt2 = os.path.join(outdir, "adapter2.pt")
    save_adapter_pt(pt2, t2, B["rank"], full=False)
    say(run(os.path.join(TOOLS, "convert_adapter.py"), pt2, "--base", BASE_AFM, "-o", os.path.join(outdir, "adapter2.afma"),
            "--type", "f16", "--alpha", B["alpha"], "--name", "style", "--verify").rstrip())
    lg2 = mlx_lora_logits(weights, t2, B["rank"], B["alpha"] / B["rank"], tokens)
    gen_ref.write_ref(os.path.join(outdir, "adapter2.ref"), tokens, lg2)

    # (vi): the base_adapter of base-model.pt
    say(run(os.path.join(TOOLS, "convert_adapter.py"), "--from-base", BASE_PT, "-o",
            os.path.join(outdir, "base_adapter.afma"), "--verify").rstrip())
    t3 = tamm_from_pt(BASE_PT)
    lg3 = mlx_lora_logits(weights, t3, C["rank"], C["alpha"] / C["rank"], tokens)
    gen_ref.write_ref(os.path.join(outdir, "base_adapter.ref"), tokens, lg3)
    merged = gen_ref.read_ref(os.path.join(VEC, "toolkit_lora.ref"))[3]
    base = gen_ref.read_ref(os.path.join(VEC, "toolkit.ref"))[3]
    say("MLX: base_adapter.ref vs toolkit_lora.ref (merged weights): max|d| %.3g; LoRA moves the logits by "
        "max %.3g (adapter), %.3g (adapter2), %.3g (base_adapter) vs toolkit.ref"
        % (np.abs(lg3 - merged).max(), np.abs(lg - base).max(), np.abs(lg2 - base).max(), np.abs(lg3 - base).max()))
    write_fuzz(fuzzdir, cfg)
    if verbose:
        tot = 0
        for f in FILES:
            s = os.path.getsize(os.path.join(outdir, f))
            tot += s
            print("%s: %d bytes" % (os.path.join(outdir, f), s))
        print("total %d bytes in %s" % (tot, outdir))
        fz = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(fuzzdir) for f in fs)
        print("fuzz corpus %s: %d cases, %d bytes" % (fuzzdir, len(FUZZ_CASES), fz))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the LoRA adapter fixtures, MLX references and fmadapter corpus.")
    ap.add_argument("-o", "--outdir", default=OUT)
    ap.add_argument("--fuzzdir", default=FUZZ)
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare with the committed files")
    a = ap.parse_args(argv)
    if a.check:
        bad = 0
        with tempfile.TemporaryDirectory() as td:
            generate(os.path.join(td, "lora"), os.path.join(td, "fuzz"), verbose=False)
            for f in FILES:
                same = filecmp.cmp(os.path.join(td, "lora", f), os.path.join(a.outdir, f), shallow=False)
                print("%s: %s" % (f, "identical" if same else "DIFFERS"))
                bad += not same
            for dp, _, fs in os.walk(os.path.join(td, "fuzz")):
                for f in fs:
                    rel = os.path.relpath(os.path.join(dp, f), os.path.join(td, "fuzz"))
                    other = os.path.join(a.fuzzdir, rel)
                    same = os.path.exists(other) and filecmp.cmp(os.path.join(dp, f), other, shallow=False)
                    bad += not same
                    if not same:
                        print("fuzz/%s: DIFFERS" % rel)
            print("fuzz corpus: %s" % ("identical" if not bad else "see above"))
        return 1 if bad else 0
    generate(a.outdir, a.fuzzdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
