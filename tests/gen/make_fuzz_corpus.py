#!/usr/bin/env python3
"""Writes the seed corpus of the model-loader fuzzer: tiny valid models and hostile variants.

    python3 tests/gen/make_fuzz_corpus.py [OUT_DIR]      (default tests/fuzz/corpus/load)
    python3 tests/gen/make_fuzz_corpus.py --fmadapter    (packs tests/fuzz/corpus/fmadapter/* into
                                                            tests/fuzz/corpus/fmadapter_packed/)
    python3 tests/gen/make_fuzz_corpus.py --gen          (tests/fuzz/corpus/gen: the generation harness's
                                                            seeds, tiny models of every weight type behind
                                                            32-byte parameter headers)

Every file is small (a few KB) so libFuzzer can mutate it quickly. The hostile variants are the
cases a loader must refuse with a clear message: bad magic and version, truncation at every
section, offsets out of range or overlapping, absurd dimensions, NaN in the config, tensor types
that do not match their sizes. Deterministic: the same bytes on every run."""
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import afmfile as af  # noqa: E402
import synth  # noqa: E402


def tiny(path, reuse, kv_scales, lora, wtype):
    cfg = af.make_config(vocab_size=11, dim=8, n_layers=3, n_reuse_layers=reuse, n_heads=2, n_kv_heads=1,
                         head_dim=4, ffn_dim=6, context_length=16, kv_scales=kv_scales,
                         lora_rank=2 if lora else 0, lora_alpha=4.0 if lora else 0.0)
    af.write_model(path, cfg, synth.synth_tensors(cfg, 1), wtype=wtype)
    with open(path, "rb") as f:
        return bytearray(f.read())


def pack_fmadapter_seeds(src, out):
    """Packs each .fmadapter package of src (one directory per case) into one fuzzer input:
    u32 length of metadata.json, metadata.json, adapter_weights.bin."""
    os.makedirs(out, exist_ok=True)
    n = 0
    for name in sorted(os.listdir(src)):
        d = os.path.join(src, name)
        if not os.path.isdir(d):
            continue
        parts = []
        for f in ("metadata.json", "adapter_weights.bin"):
            p = os.path.join(d, f)
            parts.append(open(p, "rb").read() if os.path.exists(p) else b"")
        with open(os.path.join(out, name), "wb") as f:
            f.write(struct.pack("<I", len(parts[0])) + parts[0] + parts[1])
        n += 1
    print("wrote %d packed packages to %s" % (n, out))


def gen_header(flags, n_predict, n_ctx, n_batch, k_byte, top_k, top_p, min_p, temp, seed, prompt, claim):
    """The parameter header of tests/fuzz/fuzz_gen.c (see its comments for each byte)."""
    h = bytearray(32)
    h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7] = flags, n_predict, n_ctx, n_batch, k_byte, top_k, top_p, min_p
    struct.pack_into("<f", h, 8, temp)
    struct.pack_into("<I", h, 12, seed)
    h[16:16 + len(prompt)] = bytes(prompt)
    h[24] = len(prompt)
    h[25] = claim
    h[26:32] = bytes([1, 2, 3, 4, 5, 6])
    return bytes(h)


def gen_seeds(out):
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".tmp.afm")
    models = {}
    for wtype in ("f32", "f16", "bf16", "q8", "q4", "q2b"):
        models[wtype] = bytes(tiny(tmp, 1, wtype != "f16", wtype == "bf16", wtype))
    cfg = af.make_config(vocab_size=11, dim=8, n_layers=3, n_reuse_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=4, ffn_dim=6, context_length=16, kv_scales=True)
    af.write_model(tmp, cfg, synth.synth_tensors(cfg, 1), wtype="f32")
    rm = af.read_model(tmp)
    e = rm.entries["out_norm"]  # set to NaN after writing (the writer refuses it): every logit is NaN
    start = rm.header["data_offset"] + e["offset"]
    b = bytearray(open(tmp, "rb").read())
    b[start:start + 4 * cfg["dim"]] = struct.pack("<%df" % cfg["dim"], *([float("nan")] * cfg["dim"]))
    with open(tmp, "wb") as f:
        f.write(b)
    models["nan_logits"] = open(tmp, "rb").read()
    os.remove(tmp)
    headers = {
        "greedy": gen_header(0, 12, 40, 0, 0, 0, 0, 0, 0.0, 1, [3, 4, 5], 4),
        "sampled_lookup": gen_header(1 | 4, 20, 47, 3, 4, 0, 0, 0, 0.8, 42, [1, 2, 1, 2, 1, 2], 4),
        "sampled_custom_overclaim": gen_header(1 | 2 | 8, 30, 24, 1, 18, 3, 240, 0, 1.3, 7, [5, 6, 7], 40),
        "draft_session_ctxfull": gen_header(6 | 8, 63, 9, 2, 5, 0, 0, 0, 0.0, 3, [1, 2, 3, 4], 4),
        "tiny_temperature": gen_header(1 | 32, 8, 30, 0, 0, 0, 0, 0, 1e-40, 9, [2], 4),
    }
    n = 0
    for wname, mb in sorted(models.items()):
        for hname, h in sorted(headers.items()):
            with open(os.path.join(out, "%s_%s" % (wname, hname)), "wb") as f:
                f.write(h + mb)
            n += 1
    print("wrote %d generation seeds to %s" % (n, out))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--gen":
        gen_seeds(os.path.join("tests", "fuzz", "corpus", "gen"))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--fmadapter":
        pack_fmadapter_seeds(os.path.join("tests", "fuzz", "corpus", "fmadapter"),
                             os.path.join("tests", "fuzz", "corpus", "fmadapter_packed"))
        return
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("tests", "fuzz", "corpus", "load")
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".tmp.afm")
    seeds = {
        "valid_f32_reuse1_kv": tiny(tmp, 1, True, False, "f32"),
        "valid_f16_noreuse": tiny(tmp, 0, False, False, "f16"),
        "valid_bf16_lora": tiny(tmp, 2, True, True, "bf16"),
    }
    os.remove(tmp)
    base = seeds["valid_f32_reuse1_kv"]
    u32 = lambda b, o, v: struct.pack_into("<I", b, o, v & 0xFFFFFFFF)
    u64 = lambda b, o, v: struct.pack_into("<Q", b, o, v & 0xFFFFFFFFFFFFFFFF)
    f32 = lambda b, o, v: struct.pack_into("<f", b, o, v)
    cfg = struct.unpack_from("<Q", base, 24)[0]
    d0 = struct.unpack_from("<Q", base, 56)[0]
    data = struct.unpack_from("<Q", base, 80)[0]

    def variant(name, fn):
        b = bytearray(base)
        fn(b)
        seeds[name] = b

    variant("bad_magic", lambda b: b.__setitem__(slice(0, 8), b"AFMMODEX"))
    variant("bad_version", lambda b: u32(b, 8, 2))
    variant("config_out_of_range", lambda b: u64(b, 24, len(base) * 4))
    variant("dir_overlaps_config", lambda b: u64(b, 56, cfg))
    variant("data_misaligned", lambda b: u64(b, 80, data + 4))
    variant("absurd_vocab", lambda b: u32(b, cfg + 4, 0xFFFFFFFF))
    variant("absurd_dim", lambda b: u32(b, cfg + 8, 1 << 30))
    variant("nan_theta", lambda b: f32(b, cfg + 40, float("nan")))
    variant("nan_eps", lambda b: f32(b, cfg + 44, float("nan")))
    variant("type_mismatch", lambda b: u32(b, d0 + 64, 1))
    variant("dims_overflow", lambda b: (u64(b, d0 + 72, 1 << 40), u64(b, d0 + 80, 1 << 40)))
    variant("tensor_offset_out_of_range", lambda b: u64(b, d0 + 104, 1 << 62))
    variant("tensors_overlap", lambda b: u64(b, d0 + 128 + 104, struct.unpack_from("<Q", base, d0 + 104)[0]))
    for cut in (0, 64, 127, cfg + 64, d0 + 100, data, len(base) - 1):
        seeds["truncated_at_%d" % cut] = bytearray(base[:cut])
        t = bytearray(base[:cut])
        if cut >= 24:
            u64(t, 16, cut)
        seeds["truncated_patched_at_%d" % cut] = t
    for name, b in sorted(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes(b))
    print("wrote %d files to %s" % (len(seeds), out))


if __name__ == "__main__":
    main()
