#!/usr/bin/env python3
"""test_tools.py - tests of the Python tools (tools/*.py, the generators in tests/gen/) and the committed vectors.

    python3 tests/test_tools.py          # last line: "N passed, N failed"

Needs numpy. Tests that need mlx / mlx-lm (MLX-folder quantization, regenerating vectors) or torch
are skipped when those are not installed (a line says so); everything else, including the
converter on the committed PyTorch fixtures and the numpy forward pass against the MLX logits,
needs numpy only.
"""

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
GEN = os.path.join(ROOT, "tests", "gen")
VEC = os.path.join(ROOT, "tests", "vectors")
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, GEN)  # gen_ref (imported by the tests that use it)
import afmfile as af  # noqa: E402
import ref_numpy  # noqa: E402
import synth  # noqa: E402
from ckptread import CheckpointError, read_torch_zip  # noqa: E402


class Skip(Exception):
    pass


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def run_tool(*args, ok=True):
    r = subprocess.run([sys.executable] + list(args), capture_output=True, text=True)
    if ok and r.returncode:
        raise AssertionError("%s failed (%d):\n%s%s" % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r


def small_cfg(**kw):
    c = dict(vocab_size=50, dim=32, n_layers=3, n_reuse_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=40,
             kv_scales=True, lora_rank=4, lora_alpha=2.0, signature="0123456789abcdef0123456789abcdef01234567")
    c.update(kw)
    return af.make_config(**c)


# ---------------------------------------------------------------------------------------------- afmfile

@test
def bf16_round_to_nearest_even():
    f = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -1.0 - 2 ** -8, 3.4028235e38,
                  np.inf, -np.inf, 0.0, -0.0, 1e-40], np.float32)
    want = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xBF80, 0x7F80, 0x7F80, 0xFF80, 0x0000, 0x8000, None]
    got = af.f32_to_bf16_bits(f)
    for x, w, g in zip(f, want, got):
        if w is not None:
            assert g == w, "bf16(%r) = %#x, expected %#x" % (x, g, w)
    nan = af.f32_to_bf16_bits(np.array([np.nan], np.float32))[0]
    assert (nan & 0x7F80) == 0x7F80 and (nan & 0x7F), "NaN must stay NaN"
    # against float64 reference rounding on random values
    x = np.random.default_rng(1).standard_normal(100000).astype(np.float32) * 100
    b = af.bf16_bits_to_f32(af.f32_to_bf16_bits(x)).astype(np.float64)
    up = af.bf16_bits_to_f32((af.f32_to_bf16_bits(x).astype(np.uint32) + 1).astype(np.uint16)).astype(np.float64)
    dn = af.bf16_bits_to_f32((af.f32_to_bf16_bits(x).astype(np.uint32) - 1).astype(np.uint16)).astype(np.float64)
    e = np.abs(b - x)
    assert np.all(e <= np.abs(up - x)) and np.all(e <= np.abs(dn - x)), "bf16 not nearest"


@test
def permutation_matches_rope():
    """Interleaved RoPE on W x equals half-split RoPE on (P W) x, and the inverse permutation round-trips."""
    g = np.random.default_rng(2)
    nh, hd, d = 3, 8, 20
    W = g.standard_normal((nh * hd, d))
    x = g.standard_normal(d)
    pos, theta = 7, 10000.0
    inv = theta ** (-np.arange(hd // 2) * 2.0 / hd)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    y = (W @ x).reshape(nh, hd)
    inter = np.empty_like(y)
    inter[:, 0::2] = y[:, 0::2] * c - y[:, 1::2] * s
    inter[:, 1::2] = y[:, 0::2] * s + y[:, 1::2] * c
    yp = (af.permute_rows_to_halfsplit(W, nh, hd) @ x).reshape(nh, hd)
    half = np.concatenate([yp[:, :hd // 2] * c - yp[:, hd // 2:] * s, yp[:, :hd // 2] * s + yp[:, hd // 2:] * c], 1)
    assert np.allclose(af.permute_rows_to_halfsplit(inter.reshape(-1), nh, hd).reshape(nh, hd), half)
    assert np.array_equal(af.permute_rows_to_interleaved(af.permute_rows_to_halfsplit(W, nh, hd), nh, hd), W)
    v = np.arange(hd)
    assert list(af.permute_vec_to_halfsplit(v)) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert np.array_equal(af.permute_vec_to_interleaved(af.permute_vec_to_halfsplit(v)), v)


@test
def kv_scale_formula():
    assert af.kv_scale_from_range(-2.56, 1.0) == np.float32(np.float32(-2.56) / np.float32(-128))
    assert af.kv_scale_from_range(-1.0, 2.54) == np.float32(np.float32(2.54) / np.float32(127))


@test
def write_read_roundtrip_all_types():
    cfg = small_cfg()
    tensors = {n: (np.random.default_rng(len(n)).standard_normal(s) * 0.1).astype(np.float32)
               for n, s, _ in af.tensor_specs(cfg)}
    tensors["kv_scale"] = np.abs(tensors["kv_scale"]) + 0.01
    tok = b"\x0a\x05hello" * 3
    with tempfile.TemporaryDirectory() as td:
        for wt in ("f32", "f16", "bf16"):
            p = os.path.join(td, wt + ".afm")
            af.write_model(p, cfg, tensors, tokenizer=tok, tokenizer_kind=1, wtype=wt)
            m = af.read_model(p)
            want_cfg = dict(cfg, **{k: float(np.float32(cfg[k])) for k in ("rope_theta", "norm_eps", "qk_norm_eps", "lora_alpha")})
            assert m.config == want_cfg, (m.config, want_cfg)
            assert m.tokenizer_kind == 1 and m.tokenizer_bytes == tok
            assert os.path.getsize(p) % 64 == 0 and m.header["data_offset"] % 64 == 0
            for n, shape, kind in af.tensor_specs(cfg):
                e = m.entries[n]
                t = af.default_type(kind, wt)
                assert e["type"] == t, (n, e["type"], t)
                assert e["offset"] % 64 == 0
                want = tensors[n]
                if t == af.TYPE_F16:
                    want = want.astype(np.float16).astype(np.float32)
                elif t == af.TYPE_BF16:
                    want = af.bf16_bits_to_f32(af.f32_to_bf16_bits(want))
                assert np.array_equal(m.f32(n), want), n
        # the same input gives the same bytes
        af.write_model(os.path.join(td, "again.afm"), cfg, tensors, tokenizer=tok, tokenizer_kind=1, wtype="bf16")
        assert open(os.path.join(td, "again.afm"), "rb").read() == open(os.path.join(td, "bf16.afm"), "rb").read()


@test
def writer_refuses_bad_input():
    cfg = small_cfg(lora_rank=0, lora_alpha=0.0)
    t = {n: np.zeros(s, np.float32) for n, s, _ in af.tensor_specs(cfg)}
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "x.afm")
        for bad, what in ((dict(t, extra=np.zeros(3)), "unknown"), ({k: v for k, v in t.items() if k != "l0.up"}, "missing"),
                          (dict(t, **{"l0.up": np.zeros((3, 3))}), "shape"),
                          (dict(t, **{"l0.up": np.full((40, 32), 1e6, np.float32)}), "f16")):
            try:
                af.write_model(p, cfg, bad, wtype="f16")
            except af.AfmError as e:
                assert what in str(e), (what, str(e))
            else:
                raise AssertionError("accepted bad input (%s)" % what)
        assert not os.path.exists(p) and not os.path.exists(p + ".tmp")
        try:
            af.make_config(50, 32, 3, 3, 4, 2, 8, 40)
        except af.AfmError as e:
            assert "n_reuse_layers" in str(e)
        else:
            raise AssertionError("n_reuse_layers == n_layers accepted")


@test
def reader_rejects_corruption():
    cfg = small_cfg()
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "ok.afm")
        af.write_model(p, cfg, synth.synth_tensors(cfg, 0), tokenizer=b"{\"model\": {}}", tokenizer_kind=2)
        good = bytearray(open(p, "rb").read())
        m = af.read_model(p)
        de = m.header["dir_offset"]
        h = m.header

        def put(buf, off, fmt, v):
            struct.pack_into(fmt, buf, off, v)
            return buf

        cases = {
            "magic": put(bytearray(good), 0, "<B", ord("X")),
            "version": put(bytearray(good), 8, "<I", 2),
            "file_size": put(bytearray(good), 16, "<Q", len(good) + 1),
            "truncated": bytearray(good[:-64]),
            "data_offset unaligned": put(bytearray(good), 80, "<Q", h["data_offset"] + 8),
            "n_tensors": put(bytearray(good), 72, "<I", 0),
            "config head_dim odd": put(bytearray(good), 128 + 28, "<I", 7),
            "flags unknown bit": put(bytearray(good), 128 + 56, "<I", 0xF),
            "rope_layout": put(bytearray(good), 128 + 52, "<I", 0),
            "tensor type": put(bytearray(good), de + 64, "<I", 9),
            "tensor dims": put(bytearray(good), de + 72, "<Q", 12345),
            "tensor offset unaligned": put(bytearray(good), de + 128 + 104, "<Q", 8),
            "tensor overlap": put(bytearray(good), de + 128 + 104, "<Q", 0),
            "tensor outside": put(bytearray(good), de + 128 + 104, "<Q", h["data_size"]),
            "name unterminated": put(bytearray(good), de, "64s", b"A" * 64),
            "name illegal": put(bytearray(good), de, "<B", ord("-")),
            "duplicate name": put(bytearray(good), de + 128, "64s", b"tok_embd"),
            "tokenizer kind": put(bytearray(good), h["tokenizer_offset"], "<I", 3),
            "tokenizer length": put(bytearray(good), h["tokenizer_offset"] + 8, "<Q", 1 << 20),
            "signature": put(bytearray(good), 128 + 72, "<B", ord("G")),
            "eps not finite": put(bytearray(good), 128 + 44, "<f", float("inf")),
        }
        for what, buf in cases.items():
            try:
                af.parse_model(np.frombuffer(bytes(buf), np.uint8), what)
            except af.AfmError:
                pass
            else:
                raise AssertionError("corruption accepted: %s" % what)


@test
def synth_presets_have_the_spec_parameter_counts():
    c = synth.PRESETS["base"]
    base = af.make_config(c["vocab"], c["dim"], c["layers"], c["reuse"], c["heads"], c["kv_heads"], c["head_dim"],
                          c["ffn"], lora_rank=32, lora_alpha=16)
    assert af.count_params(base) == (3111368064, 66633728)
    d = synth.PRESETS["draft"]
    draft = af.make_config(d["vocab"], d["dim"], d["layers"], d["reuse"], d["heads"], d["kv_heads"], d["head_dim"], d["ffn"])
    assert af.count_params(draft) == (48765952, 0)


@test
def synth_zeros_full_size_is_fast_and_valid():
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "b.afm")
        run_tool(os.path.join(TOOLS, "synth.py"), "--preset", "base", "--lora", "--kv-scales", "--zeros", "--type", "bf16",
                 "-q", "-o", p)
        m = af.read_model(p)
        assert m.config["n_layers"] == 56 and m.config["lora_rank"] == 32 and len(m.entries) == 1186
        assert af.count_params(m.config) == (3111368064, 66633728)


@test
def synth_small_is_deterministic():
    with tempfile.TemporaryDirectory() as td:
        a, b = os.path.join(td, "a.afm"), os.path.join(td, "b.afm")
        args = ["--dim", "64", "--layers", "3", "--reuse", "1", "--heads", "4", "--kv-heads", "1", "--ffn", "96",
                "--vocab", "300", "--lora", "--lora-rank", "8", "--kv-scales", "--seed", "5", "-q"]
        run_tool(os.path.join(TOOLS, "synth.py"), *(args + ["-o", a]))
        run_tool(os.path.join(TOOLS, "synth.py"), *(args + ["-o", b]))
        assert open(a, "rb").read() == open(b, "rb").read()
        m = af.read_model(a)
        assert m.config["head_dim"] == 16 and m.config["flags"] == 7


# ---------------------------------------------------------------------------------------------- converter

@test
def convert_toolkit_fixture_reproduces_committed_file():
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "t.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), os.path.join(VEC, "toolkit", "base-model.pt"), "-o", p,
                     "--type", "f32", "--verify")
        assert "tied" in r.stdout and "base-model-config.json" in r.stdout
        assert open(p, "rb").read() == open(os.path.join(VEC, "toolkit.afm"), "rb").read()


@test
def convert_toolkit_types_and_lora_flags():
    src = os.path.join(VEC, "toolkit", "base-model.pt")
    with tempfile.TemporaryDirectory() as td:
        tj = os.path.join(td, "tokenizer.json")
        with open(tj, "w") as f:
            json.dump({"version": "1.0", "model": {"type": "BPE"}}, f)
        tm = os.path.join(td, "tokenizer.model")
        with open(tm, "wb") as f:
            f.write(b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00")
        for tpath, kind in ((tj, 2), (tm, 1)):
            p = os.path.join(td, "tok.afm")
            run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p, "-q", "--tokenizer", tpath)
            m = af.read_model(p)
            assert m.tokenizer_kind == kind and m.tokenizer_bytes == open(tpath, "rb").read()
        bad = os.path.join(td, "bad.tok")
        with open(bad, "wb") as f:
            f.write(b"\x00garbage")
        r = run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p, "-q", "--tokenizer", bad, ok=False)
        assert r.returncode == 1 and "SentencePiece" in r.stderr, r.stderr
        r = run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p, "-q", "--signature", "xyz", ok=False)
        assert r.returncode == 1 and "40 hex" in r.stderr, r.stderr
        p = os.path.join(td, "nolora.afm")
        run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p, "--no-lora", "--type", "bf16", "-q",
                 "--signature", "9799725FF8E851184037110B422D891AD3B92EC1")
        m = af.read_model(p)
        assert m.config["lora_rank"] == 0 and m.config["signature"] == "9799725ff8e851184037110b422d891ad3b92ec1"
        assert m.entries["l0.qkv"]["type"] == af.TYPE_BF16
        p = os.path.join(td, "f16.afm")
        run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p, "--type", "f16", "-q")
        m = af.read_model(p)
        assert m.entries["l0.q.lora_a"]["type"] == af.TYPE_F16 and m.entries["l0.attn_norm"]["type"] == af.TYPE_F32


@test
def convert_draft_fixture_matches_mlx():
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "d.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), os.path.join(VEC, "toolkit", "draft-model.pt"), "-o", p,
                     "--verify")
        assert "draft" in r.stdout and "equal to embedding.weight" in r.stdout
        m = af.read_model(p)
        assert m.config["n_reuse_layers"] == 0 and m.config["lora_rank"] == 0
        rel, _, _ = ref_numpy.compare(p, os.path.join(VEC, "toolkit_draft.ref"), verbose=False)
        assert rel <= ref_numpy.TOL, rel


def _rewrite_pt(src, dst, edit):
    """Copy a torch zip with data.pkl passed through edit(bytes) (storages copied as they are)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = zi.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = edit(data)
            zo.writestr(info.filename, data)


@test
def convert_lists_every_missing_and_unknown_key():
    src = os.path.join(VEC, "toolkit", "base-model.pt")
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "bad.pt")
        _rewrite_pt(src, p, lambda b: b.replace(b"output_norm.weight", b"output_norX.weight")
                    .replace(b"segment_1.layer_1.feed_forward.norm.weight", b"segment_1.layer_1.feed_forward.norm.weighX"))
        r = run_tool(os.path.join(TOOLS, "convert.py"), p, "-o", os.path.join(td, "o.afm"), ok=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        for s in ("missing keys (2)", "output_norm.weight", "layers.segment_1.layer_1.feed_forward.norm.weight",
                  "unknown keys (2)", "output_norX.weight", "feed_forward.norm.weighX"):
            assert s in r.stderr, (s, r.stderr)
        assert not os.path.exists(os.path.join(td, "o.afm"))


@test
def convert_refuses_hostile_and_broken_files():
    src = os.path.join(VEC, "toolkit", "base-model.pt")
    with tempfile.TemporaryDirectory() as td:
        marker = os.path.join(td, "pwned")
        evil = b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."
        cases = {}
        p = os.path.join(td, "evil.pt")
        _rewrite_pt(src, p, lambda b: evil)
        cases[p] = "refused"
        p = os.path.join(td, "evil_builtins.pt")
        _rewrite_pt(src, p, lambda b: b"cbuiltins\neval\n(S'1'\ntR.")
        cases[p] = "refused"
        p = os.path.join(td, "legacy.pt")
        with open(p, "wb") as f:
            f.write(pickle.dumps({"a": 1}, protocol=2))
        cases[p] = "legacy"
        p = os.path.join(td, "trunc.pt")
        with open(p, "wb") as f:
            f.write(open(src, "rb").read()[:5000])
        cases[p] = "zip"
        p = os.path.join(td, "garbage.pt")
        _rewrite_pt(src, p, lambda b: b[:len(b) // 2])
        cases[p] = "unpickle"
        p = os.path.join(td, "notes.txt")
        with open(p, "w") as f:
            f.write("hello")
        cases[p] = "not a PyTorch"
        cases[os.path.join(td, "nothing-here")] = "no such file"
        for path, want in cases.items():
            r = run_tool(os.path.join(TOOLS, "convert.py"), path, "-o", os.path.join(td, "o.afm"), ok=False)
            assert r.returncode == 1 and "Traceback" not in r.stderr and want in r.stderr, (path, r.stderr)
        assert not os.path.exists(marker), "the pickle ran a command"
    # the unpickler itself
    try:
        import ckptread
        ckptread._RestrictedUnpickler(io.BytesIO(b"cposix\nsystem\n(S'true'\ntR."), None).load()
    except CheckpointError:
        pass
    else:
        raise AssertionError("posix.system resolved")


def _afm_to_f32(src, dst):
    """dst: the afm file src with every tensor decoded to float32 (type F32), same config and tokenizer."""
    m = af.read_model(src)
    cfg = dict(m.config)
    af.write_model(dst, cfg, {n: m.f32(n) for n, _, _ in af.tensor_specs(cfg)}, tokenizer=m.tokenizer_bytes,
                   tokenizer_kind=m.tokenizer_kind or None, wtype="f32")


@test
def convert_quantized_types_reproduce_the_shipped_mini_family():
    """models/mini was trained with QAT: its weights lie on the Q2B / Q4 grids, so decoding them to F32 and
    converting back with --type q2b --embd-type q4 (base) / --type q4 (draft) must give the same bytes."""
    with tempfile.TemporaryDirectory() as td:
        for name, args in (("base", ["--type", "q2b", "--embd-type", "q4"]), ("draft", ["--type", "q4"])):
            ship = os.path.join(ROOT, "models", "mini", name + ".afm")
            f32, out = os.path.join(td, name + "-f32.afm"), os.path.join(td, name + ".afm")
            _afm_to_f32(ship, f32)
            r = run_tool(os.path.join(TOOLS, "convert.py"), f32, "-o", out, "--exact", "--verify", *args)
            assert "all exact, decode(encode(w)) == w bit for bit" in r.stdout, r.stdout
            assert open(out, "rb").read() == open(ship, "rb").read(), "%s differs from %s" % (out, ship)


@test
def convert_quantized_types_exact_grid_and_error_report():
    import quant
    with tempfile.TemporaryDirectory() as td:
        # MLX route, weights snapped onto the Q4 grid (group 64): exact through the RoPE row permutation
        import gen_ref
        c = dict(gen_ref.CONFIGS["afm_mini"])
        w = gen_ref.make_mlx_weights(c, c.pop("seed"))
        for k in w:
            if k.endswith("_scale"):
                w[k] = np.array(0.03, np.float32)
            elif w[k].ndim == 2:
                w[k] = quant.dequantize(quant.TYPE_Q4, quant.quantize_q4(w[k], 64), w[k].shape[0], w[k].shape[1], 64)
        folder = os.path.join(td, "mlx")
        os.makedirs(folder)
        _write_safetensors(os.path.join(folder, "model.safetensors"), w)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(gen_ref.mlx_config(c), f)
        p = os.path.join(td, "q4.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), folder, "-o", p, "--type", "q4", "--exact", "--verify")
        assert "quantized 31 tensors (Q4 31, group 64): all exact" in r.stdout, r.stdout
        m = af.read_model(p)
        hd = c["hidden_dim"] // c["num_heads"]
        assert m.entries["l4.wq"]["type"] == af.TYPE_Q4 and m.entries["l4.q_norm"]["type"] == af.TYPE_F32
        assert m.entries["kv_scale"]["type"] == af.TYPE_F32 and m.entries["tok_embd"]["group"] == 64
        want = af.permute_rows_to_halfsplit(w["model.kv_reuse_layers.1.self_attn.q_proj.weight"], c["num_heads"], hd)
        assert np.array_equal(m.f32("l4.wq").view(np.uint32), want.view(np.uint32))
        # toolkit route, float weights: lossy, with a per-tensor report; --exact refuses and writes nothing
        src = os.path.join(VEC, "toolkit", "base-model.pt")
        p = os.path.join(td, "tk.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p, "--type", "q2b", "--group", "128", "--verify")
        assert "Q2B 20, Q4 1, group 128): 0 exact, 21 lossy" in r.stdout and "rel.rmse" in r.stdout, r.stdout
        assert "Q2B  l3.down" in r.stdout and "Q4   tok_embd" in r.stdout, r.stdout
        m = af.read_model(p)
        assert m.entries["l0.qkv"]["type"] == af.TYPE_Q2B and m.entries["l0.qkv"]["group"] == 128
        assert m.entries["tok_embd"]["type"] == af.TYPE_Q4 and m.entries["l0.q.lora_a"]["type"] == af.TYPE_F16
        p2 = os.path.join(td, "exact.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), src, "-o", p2, "--type", "q8", "--exact", ok=False)
        assert r.returncode == 1 and "--exact" in r.stderr and "not exactly representable as Q8" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not os.path.exists(p2) and not os.path.exists(p2 + ".tmp")
        # re-encoding an afm file: Q8 everywhere, embedded LoRA kept (F32 on request)
        p3 = os.path.join(td, "q8.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), p, "-o", p3, "--type", "q8", "--embd-type", "f16",
                     "--lora-type", "f32", "-q")
        m3 = af.read_model(p3)
        assert m3.entries["l0.qkv"]["type"] == af.TYPE_Q8 and m3.entries["tok_embd"]["type"] == af.TYPE_F16
        assert m3.config["lora_rank"] == 4 and m3.entries["l0.q.lora_a"]["type"] == af.TYPE_F32
        # bad requests: clear messages, no traceback
        for args, want in ((["--group", "100"], "invalid choice"), (["--type", "q3"], "invalid choice"),
                           (["--rope-theta", "10000"], "--rope-theta does not apply")):
            r = run_tool(os.path.join(TOOLS, "convert.py"), p, "-o", p2, *args, ok=False)
            assert r.returncode in (1, 2) and want in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def _patch_afm7_quantize():
    """mlx 0.32's nn.quantize passes mode= to to_quantized(), which mlx_lm's afm7.FusedLinear does not
    accept (TypeError): let it take and ignore the keyword (affine is the only mode it implements)."""
    from mlx_lm.models import afm7
    f = afm7.FusedLinear.to_quantized
    if getattr(f, "_patched", False):
        return

    def to_quantized(self, group_size=64, bits=4, mode="affine", **kw):
        assert mode == "affine"
        return f(self, group_size, bits)
    to_quantized._patched = True
    afm7.FusedLinear.to_quantized = to_quantized


def _write_safetensors(path, tensors, bf16=False):
    """A minimal safetensors writer (numpy only): float32 arrays, stored as F32 or BF16."""
    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        a = np.asarray(tensors[k], np.float32)
        b = af.f32_to_bf16_bits(a).astype("<u2").tobytes() if bf16 else a.astype("<f4").tobytes()
        header[k] = {"dtype": "BF16" if bf16 else "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _mlx_folder(td, quant=None, bf16=False):
    """An MLX afm7 folder from gen_ref's afm_mini weights (optionally quantized with mlx)."""
    import gen_ref
    c = dict(gen_ref.CONFIGS["afm_mini"])
    seed = c.pop("seed")
    w = gen_ref.make_mlx_weights(c, seed)
    for k in w:
        if k.endswith("_scale"):
            w[k] = np.array(0.03, np.float32)
    folder = os.path.join(td, "mlx")
    os.makedirs(folder)
    cfg = gen_ref.mlx_config(c)
    if quant:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_flatten
        _patch_afm7_quantize()
        model = gen_ref.build_model(c, w)
        nn.quantize(model, group_size=quant[0], bits=quant[1])
        w = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
        cfg["quantization"] = {"group_size": quant[0], "bits": quant[1]}
        mx.save_safetensors(os.path.join(folder, "model.safetensors"), {k: mx.array(v) for k, v in w.items()})
    else:
        keys = sorted(w)
        half = len(keys) // 2
        _write_safetensors(os.path.join(folder, "model-00001-of-00002.safetensors"), {k: w[k] for k in keys[:half]}, bf16)
        _write_safetensors(os.path.join(folder, "model-00002-of-00002.safetensors"), {k: w[k] for k in keys[half:]}, bf16)
        idx = {"weight_map": {k: "model-0000%d-of-00002.safetensors" % (1 if i < half else 2) for i, k in enumerate(keys)}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(idx, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder, c, w


@test
def convert_mlx_sharded_folder_and_errors():
    with tempfile.TemporaryDirectory() as td:
        folder, c, w = _mlx_folder(td)
        p = os.path.join(td, "o.afm")
        r = run_tool(os.path.join(TOOLS, "convert.py"), folder, "-o", p, "--verify")
        assert "2 files" in r.stdout, r.stdout
        m = af.read_model(p)
        q = c["hidden_dim"]
        hd = q // c["num_heads"]
        assert np.array_equal(m.f32("l0.k_norm"), af.permute_vec_to_halfsplit(w["model.layers.0.self_attn.k_norm.weight"]))
        assert np.array_equal(m.f32("l4.wq"), af.permute_rows_to_halfsplit(w["model.kv_reuse_layers.1.self_attn.q_proj.weight"],
                                                                           c["num_heads"], hd))
        qkv = w["model.layers.2.self_attn.qkv_proj.weight"]
        assert np.array_equal(m.f32("l2.qkv")[q + hd:], qkv[q + hd:])  # V rows untouched (1 KV head)
        # errors: wrong model_type, missing + unknown keys
        cfg = json.load(open(os.path.join(folder, "config.json")))
        json.dump(dict(cfg, model_type="llama"), open(os.path.join(folder, "config.json"), "w"))
        r = run_tool(os.path.join(TOOLS, "convert.py"), folder, "-o", p, ok=False)
        assert r.returncode == 1 and "afm7" in r.stderr and "Traceback" not in r.stderr
        json.dump(dict(cfg, num_kv_reuse_layers=2), open(os.path.join(folder, "config.json"), "w"))
        r = run_tool(os.path.join(TOOLS, "convert.py"), folder, "-o", p, ok=False)
        assert r.returncode == 1 and "missing keys" in r.stderr and "model.layers.3." in r.stderr, r.stderr
        assert "unknown keys" in r.stderr and "model.kv_reuse_layers.2." in r.stderr, r.stderr


@test
def convert_mlx_bf16_folder():
    with tempfile.TemporaryDirectory() as td:
        folder, c, w = _mlx_folder(td, bf16=True)
        p = os.path.join(td, "o.afm")
        run_tool(os.path.join(TOOLS, "convert.py"), folder, "-o", p, "-q", "--type", "bf16", "--verify")
        m = af.read_model(p)
        want = af.bf16_bits_to_f32(af.f32_to_bf16_bits(w["model.layers.1.mlp.down_proj.weight"]))
        assert np.array_equal(m.f32("l1.down"), want)
        want = af.bf16_bits_to_f32(af.f32_to_bf16_bits(w["model.layers.1.self_attn.quant_key_scale"]))
        assert m.f32("kv_scale")[1, 0] == want


@test
def convert_mlx_quantized_folder_matches_mlx_logits():
    if not have("mlx_lm"):
        raise Skip("needs mlx-lm")
    import gen_ref
    from pathlib import Path
    from mlx_lm.utils import load_model
    with tempfile.TemporaryDirectory() as td:
        for gs, bits in ((32, 4), (64, 3), (32, 8)):
            shutil.rmtree(os.path.join(td, "mlx"), ignore_errors=True)
            folder, c, w = _mlx_folder(td, (gs, bits))
            p = os.path.join(td, "q.afm")
            r = run_tool(os.path.join(TOOLS, "convert.py"), folder, "-o", p, "-q")
            model, _ = load_model(Path(folder))
            tokens = gen_ref.tokens_for(c["vocab_size"], 1)
            ref = gen_ref.run_mlx(model, tokens)
            got = ref_numpy.forward(af.read_model(p), tokens)
            rel = np.abs(got - ref).max() / np.abs(ref).max()
            assert rel < 1e-5, "group %d bits %d: rel %g" % (gs, bits, rel)


# ---------------------------------------------------------------------------------------------- vectors

@test
def vectors_numpy_forward_matches_mlx():
    for mname, rname, lora in ref_numpy.PAIRS:
        rel, _, agree = ref_numpy.compare(os.path.join(VEC, mname + ".afm"), os.path.join(VEC, rname + ".ref"), lora,
                                          verbose=False)
        assert rel <= ref_numpy.TOL and agree == 1.0, (rname, rel, agree)
    # the LoRA matters and the vectors see it
    rel, _, _ = ref_numpy.compare(os.path.join(VEC, "toolkit.afm"), os.path.join(VEC, "toolkit_lora.ref"), False,
                                  verbose=False)
    assert rel > 1e-2, rel


@test
def mini_parity_vectors_match_float64():
    """tests/vectors/mini_*.topk (MLX on the shipped files, tests/gen/gen_ref.py --mini) against gen_ref's numpy
    float64 forward pass: the logits agree, no int8 K/V value of the sequence lies within 1e-3 of a rounding
    boundary, and every row's top-2 gap is at least 0.25 std (what the C parity test relies on)."""
    import gen_ref
    for name, (mfile, afile, _, _) in gen_ref.MINI.items():
        r = gen_ref.read_topk(os.path.join(VEC, name + ".topk"))
        eng = gen_ref.Mini64(os.path.join(ROOT, "models", "mini", mfile),
                             os.path.join(ROOT, "models", "mini", afile) if afile else None)
        n_prompt, tokens = r["n_prompt"], r["tokens"]
        l64, _, ys = eng.run(eng.new_cache(), tokens[None], 0)   # one causal pass = prefill + decode steps
        l64, yall = l64[0], [ys]
        d = max(np.abs(l64[np.arange(len(tokens))[:, None], r["ids"]] - r["vals"]).max(),
                np.abs(l64[r["full_rows"]] - r["full"]).max())
        margin = min(float(gen_ref.boundary_distance(y).min()) for ys in yall for yy in ys for y in yy)
        gap = min(gen_ref._gap(row) for row in l64)
        assert d <= 1e-4 * r["std"], (name, d / r["std"])
        assert margin > gen_ref.KV_MARGIN and gap > gen_ref.GAP, (name, margin, gap)
        assert np.array_equal(l64.argmax(1), r["ids"][:, 0]) and abs(margin - r["margin"]) < 1e-6, name
        assert r["full"].shape == (2, 8192) and np.array_equal(r["full_rows"], [n_prompt - 1, len(tokens) - 1])


MODEL_VECTORS = ["afm_mini.afm", "afm_mini.ref", "draft_mini.afm", "draft_mini.ref", "odd_mini.afm", "odd_mini.ref",
                 "toolkit.afm", "toolkit.ref", "toolkit_lora.ref", "toolkit_draft.ref", "toolkit/base-model.pt",
                 "toolkit/base-model-config.json", "toolkit/draft-model.pt", "mini_base.topk", "mini_json.topk",
                 "mini_draft.topk"]


@test
def vectors_are_small_and_valid():
    total = 0
    for f in MODEL_VECTORS:
        p = os.path.join(VEC, f)
        if f.endswith(".afm"):
            af.read_model(p)
        if f.endswith(".ref"):
            n_prompt, n_decode, tokens, logits = ref_numpy.read_ref(p)
            assert (n_prompt, n_decode) == (64, 16) and np.isfinite(logits).all()
        if f.endswith(".topk"):
            import gen_ref
            r = gen_ref.read_topk(p)
            assert r["n_decode"] == 8 and np.isfinite(r["vals"]).all() and np.isfinite(r["full"]).all()
        total += os.path.getsize(p)
    assert total < 3 << 20, "vectors take %d bytes" % total


@test
def gen_ref_is_deterministic():
    if not have("mlx_lm"):
        raise Skip("needs mlx-lm")
    r = run_tool(os.path.join(GEN, "gen_ref.py"), "--check", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr


@test
def fake_toolkit_is_deterministic():
    if not have("mlx_lm") or not have("torch"):
        raise Skip("needs mlx-lm and torch")
    r = run_tool(os.path.join(GEN, "make_fake_toolkit.py"), "--check", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr


@test
def json_duplicate_keys_refused():
    """A key twice in metadata.json or a tokenizer.json is an error in the tools as in afm.h (the
    C reader took the first, Python's json the last)."""
    import adapterfile
    with tempfile.TemporaryDirectory() as td:
        pkg = os.path.join(td, "d.fmadapter")
        shutil.copytree(os.path.join(ROOT, "tests", "vectors", "lora", "test.fmadapter"), pkg)
        mp = os.path.join(pkg, "metadata.json")
        text = open(mp, encoding="utf-8").read().rstrip()
        for extra in (', "loraRank": 16}', ', "lora\\u0052ank": 32}'):
            with open(mp, "w", encoding="utf-8") as f:
                f.write(text[:-1] + extra)
            try:
                adapterfile.read_fmadapter_metadata(pkg)
            except af.AfmError as e:
                assert "twice" in str(e), e
            else:
                raise AssertionError("a duplicate key was accepted: %s" % extra)
        tj = os.path.join(td, "tokenizer.json")
        with open(tj, "w") as f:
            f.write('{"model": {"type": "BPE", "vocab": {"a": 0, "a": 1}, "merges": []}}')
        try:
            af.read_tokenizer(tj)
        except af.AfmError as e:
            assert "twice" in str(e), e
        else:
            raise AssertionError("a tokenizer.json with a key twice was accepted")


def main():
    npass = nfail = nskip = 0
    only = sys.argv[1:]
    for t in TESTS:
        if only and t.__name__ not in only:
            continue
        try:
            t()
        except Skip as e:
            nskip += 1
            print("skip %s (%s)" % (t.__name__, e))
            continue
        except Exception:  # noqa: BLE001
            nfail += 1
            print("FAIL %s\n%s" % (t.__name__, "".join("    " + l for l in traceback.format_exc().splitlines(True))))
            continue
        npass += 1
        print("ok   %s" % t.__name__)
    if nskip:
        print("(%d skipped: optional packages missing)" % nskip)
    print("%d passed, %d failed" % (npass, nfail))
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
