#!/usr/bin/env python3
"""ref_numpy_lora.py - proves the LoRA adapter fixtures (tests/vectors/lora/) before the C side exists:
tests/ref_numpy.py's independent numpy forward pass over tests/vectors/toolkit.afm with an adapter
applied (the adapter REPLACES the model's embedded base_adapter) against the MLX logits.

    python3 tests/ref_numpy_lora.py          # last line: "N passed, N failed"

Checks
  * adapter.afma / adapter2.afma / base_adapter.afma  vs adapter.ref / adapter2.ref / base_adapter.ref
    (and base_adapter.afma vs toolkit_lora.ref, MLX with the LoRA merged into the weights);
  * test.fmadapter -> .afma through tools/convert_adapter.py (F16 and F32): logits vs adapter.ref, tensors
    identical to adapter.afma's, and the F32 file byte-identical to adapter.afma (same metadata, same
    signature, same layout: the two routes agree exactly);
  * tests/gen/make_fmadapter.py on adapter.pt reproduces test.fmadapter byte for byte (also with
    --checkpoint-order, which is the same order for adapter.pt), and adapter2.pt in checkpoint order
    gives a package whose records are in another order (so afm.h must refuse it);
  * every hostile package of tests/fuzz/corpus/fmadapter/ is refused by tools/adapterfile.py, the two
    that must load do load;
  * convert_adapter.py errors: no traceback, missing/unknown keys listed, wrong base, bad rank.
Tolerance as tests/ref_numpy.py: max |dlogit| / max |logit| <= 1e-5. numpy only (the CLI checks run the
tools in subprocesses; make_fmadapter needs torch and is skipped without it).
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
GEN = os.path.join(ROOT, "tests", "gen")
VEC = os.path.join(ROOT, "tests", "vectors")
LORA = os.path.join(VEC, "lora")
FUZZ = os.path.join(ROOT, "tests", "fuzz", "corpus", "fmadapter")
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import adapterfile as adf  # noqa: E402
import afmfile as af  # noqa: E402
import ref_numpy  # noqa: E402

TOL = ref_numpy.TOL
BASE = os.path.join(VEC, "toolkit.afm")


class WithAdapter:
    """A model view for ref_numpy.forward: the base's tensors, the adapter's LoRA tensors, rank and alpha."""

    def __init__(self, model, adapter):
        p = adf.adapter_problems_for_model(adapter, model.config)
        if p:
            raise ValueError("adapter does not fit: " + "; ".join(p))
        self.m, self.a = model, adapter
        self.path = "%s + %s" % (model.path, adapter.path)
        self.config = dict(model.config, lora_rank=adapter.rank, lora_alpha=adapter.alpha)

    def f32(self, name):
        if name.endswith(".lora_a") or name.endswith(".lora_b"):
            return self.a.f32(name)
        return self.m.f32(name)


def compare(model, adapter_path, ref_path, label=None):
    a = adf.read_adapter(adapter_path)
    _, _, tokens, ref = ref_numpy.read_ref(ref_path)
    got = ref_numpy.forward(WithAdapter(model, a), tokens, lora=True)
    d = np.abs(got - ref)
    rel = d.max() / np.abs(ref).max()
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    print("  %-52s rank %2d scale %.3g: max|d| %.3g = %.2g x max|logit|, argmax agree %.3f"
          % (label or "%s vs %s" % (os.path.basename(adapter_path), os.path.basename(ref_path)), a.rank, a.scale,
             d.max(), rel, agree))
    return rel


def tool(*args):
    return subprocess.run([sys.executable] + [str(x) for x in args], capture_output=True, text=True)


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def logits_of_the_afma_fixtures():
    m = af.read_model(BASE)
    for ad, ref in (("adapter", "adapter"), ("adapter2", "adapter2"), ("base_adapter", "base_adapter")):
        assert compare(m, os.path.join(LORA, ad + ".afma"), os.path.join(LORA, ref + ".ref")) <= TOL
    assert compare(m, os.path.join(LORA, "base_adapter.afma"), os.path.join(VEC, "toolkit_lora.ref"),
                   "base_adapter.afma vs toolkit_lora.ref (merged)") <= TOL
    # and the adapter does matter: without it (no LoRA) the logits are far from adapter.ref
    _, _, tokens, ref = ref_numpy.read_ref(os.path.join(LORA, "adapter.ref"))
    plain = ref_numpy.forward(m, tokens, lora=False)
    assert np.abs(plain - ref).max() / np.abs(ref).max() > 0.05


@test
def fixture_metadata_and_config():
    a = adf.read_adapter(os.path.join(LORA, "adapter.afma"))
    assert (a.rank, a.alpha, a.scale, a.draft_token_count, a.signature) == (32, 16.0, 0.5, 5, adf.APPLE_SIGNATURE)
    assert a.metadata["adapterIdentifier"] == "fmadapter-test-9799725" and a.metadata["loraRank"] == 32
    assert all(a.entries[n]["type"] == af.TYPE_F32 for n in a.names())
    b = adf.read_adapter(os.path.join(LORA, "adapter2.afma"))
    assert (b.rank, b.alpha, b.scale, b.signature) == (16, 12.0, 0.75, None)
    assert all(b.entries[n]["type"] == af.TYPE_F16 for n in b.names())
    c = adf.read_adapter(os.path.join(LORA, "base_adapter.afma"))
    assert (c.rank, c.alpha) == (4, 2.0)
    m = af.read_model(BASE)
    # the extracted base_adapter equals the LoRA that convert.py embedded in toolkit.afm
    assert all(np.array_equal(c.f32(n), m.f32(n)) for n in c.names())
    with open(os.path.join(LORA, "test.fmadapter", "metadata.json"), "rb") as f:
        assert f.read() == a.metadata_bytes


@test
def fmadapter_route_equals_checkpoint_route():
    m = af.read_model(BASE)
    ref = os.path.join(LORA, "adapter.ref")
    with tempfile.TemporaryDirectory() as td:
        for t in ("f16", "f32"):
            out = os.path.join(td, "fm_%s.afma" % t)
            r = tool(os.path.join(TOOLS, "convert_adapter.py"), os.path.join(LORA, "test.fmadapter"), "--base", BASE,
                     "-o", out, "--type", t, "--verify")
            assert r.returncode == 0, r.stdout + r.stderr
            assert compare(m, out, ref, "test.fmadapter -> %s .afma vs adapter.ref" % t.upper()) <= TOL
            a, b = adf.read_adapter(out), adf.read_adapter(os.path.join(LORA, "adapter.afma"))
            assert all(np.array_equal(a.f32(n), b.f32(n)) for n in b.names())
            assert a.config == b.config
        with open(os.path.join(td, "fm_f32.afma"), "rb") as f1, open(os.path.join(LORA, "adapter.afma"), "rb") as f2:
            assert f1.read() == f2.read(), "the .fmadapter route and the checkpoint route differ"


@test
def make_fmadapter_reproduces_the_package():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise Skip("torch not installed")
    with tempfile.TemporaryDirectory() as td:
        for extra in ((), ("--checkpoint-order",)):
            out = os.path.join(td, "test.fmadapter")
            r = tool(os.path.join(GEN, "make_fmadapter.py"), os.path.join(LORA, "adapter.pt"), "--base", BASE,
                     "-o", out, "--name", "test", *extra)
            assert r.returncode == 0 and "warning" not in r.stdout, r.stdout + r.stderr
            for f in ("metadata.json", "adapter_weights.bin"):
                with open(os.path.join(out, f), "rb") as f1, open(os.path.join(LORA, "test.fmadapter", f), "rb") as f2:
                    assert f1.read() == f2.read(), f
        # adapter2.pt stores segment 1 first: the exporter's (checkpoint) order is not the one of docs/MODEL.md section 6.2
        out = os.path.join(td, "style.fmadapter")
        r = tool(os.path.join(GEN, "make_fmadapter.py"), os.path.join(LORA, "adapter2.pt"), "--base", BASE, "-o", out,
                 "--checkpoint-order")
        assert r.returncode == 0 and "warning" in r.stdout, r.stdout + r.stderr
        try:
            adf.read_fmadapter(out, af.read_model(BASE).config)
            raise AssertionError("a package in another record order was accepted")
        except af.AfmError as e:
            assert "record 3" in str(e), e   # records 0-2 have the sizes of q a, b and k a by chance
        r = tool(os.path.join(GEN, "make_fmadapter.py"), os.path.join(LORA, "adapter2.pt"), "--base", BASE, "-o", out)
        assert r.returncode == 0
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), out, "--base", BASE, "-o", os.path.join(td, "s.afma"),
                 "--alpha", "12", "--type", "f16")
        assert r.returncode == 0, r.stderr
        a, b = adf.read_adapter(os.path.join(td, "s.afma")), adf.read_adapter(os.path.join(LORA, "adapter2.afma"))
        assert all(np.array_equal(a.tensor(n), b.tensor(n)) for n in b.names())


@test
def hostile_packages_are_refused():
    cfg = af.read_model(BASE).config
    loads = {"valid_rank2", "signature_mismatch"}
    names = sorted(d for d in os.listdir(FUZZ) if os.path.isdir(os.path.join(FUZZ, d)))
    assert len(names) >= 20, names
    for d in names:
        p = os.path.join(FUZZ, d)
        try:
            adf.read_fmadapter(p, cfg)
            ok = True
        except af.AfmError:
            ok = False
        assert ok == (d in loads), d
        # the converter refuses the same ones, with one error line and no traceback
        with tempfile.TemporaryDirectory() as td:
            r = tool(os.path.join(TOOLS, "convert_adapter.py"), p, "--base", BASE, "-o", os.path.join(td, "x.afma"))
        assert (r.returncode == 0) == (d in loads), (d, r.stderr)
        assert "Traceback" not in r.stderr, (d, r.stderr)
    signed = dict(cfg, signature=adf.APPLE_SIGNATURE)
    adf.read_fmadapter(os.path.join(FUZZ, "valid_rank2"), signed)
    try:
        adf.read_fmadapter(os.path.join(FUZZ, "signature_mismatch"), signed)
        raise AssertionError("signature mismatch accepted")
    except af.AfmError as e:
        assert "does not match" in str(e)


@test
def converter_errors_are_clear():
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "x.afma")
        src = os.path.join(LORA, "adapter2.pt")
        bad = os.path.join(td, "bad.pt")
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), src, "-o", out)
        assert r.returncode == 1 and "--base" in r.stderr and "Traceback" not in r.stderr
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), src, "--base", os.path.join(VEC, "afm_mini.afm"), "-o", out)
        assert r.returncode == 1 and "Traceback" not in r.stderr and ("missing keys" in r.stderr or "wrong shapes" in r.stderr), r.stderr
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), os.path.join(VEC, "toolkit.ref"), "--base", BASE, "-o", out)
        assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), os.path.join(LORA, "adapter.pt"), "--base", BASE, "-o", out,
                 "--signature", "0123456789abcdef0123456789abcdef01234567", "--name", "bad-name")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), os.path.join(LORA, "test.fmadapter"), "--base", BASE, "-o",
                 out, "--signature", "0123456789abcdef0123456789abcdef01234567")
        assert r.returncode == 1 and "differs" in r.stderr, r.stderr
        # drop one tensor and rename another: both listed
        try:
            import torch
        except ImportError:
            return
        sd = torch.load(src, weights_only=True)
        k0 = "layers.segment_0.layer_1.attention.qkv_transform.adapters.style.lora_1.b_transpose"
        k1 = "layers.segment_1.layer_0.feed_forward.output_transform.adapters.style.a_transpose"
        del sd[k0]
        sd[k1.replace("output_transform", "output_projection")] = sd.pop(k1)
        torch.save(sd, bad)
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), bad, "--base", BASE, "-o", out)
        assert r.returncode == 1 and "unknown adapter keys" in r.stderr and "output_projection" in r.stderr, r.stderr
        del sd[k1.replace("output_transform", "output_projection")]
        torch.save(sd, bad)
        r = tool(os.path.join(TOOLS, "convert_adapter.py"), bad, "--base", BASE, "-o", out)
        assert r.returncode == 1 and k0 in r.stderr and k1 in r.stderr, r.stderr


class Skip(Exception):
    pass


def main():
    npass = nfail = 0
    for fn in TESTS:
        print("%s:" % fn.__name__)
        try:
            fn()
            print("ok   %s" % fn.__name__)
            npass += 1
        except Skip as e:
            print("skip %s (%s)" % (fn.__name__, e))
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            print("FAIL %s: %s" % (fn.__name__, e))
            nfail += 1
    print("%d passed, %d failed" % (npass, nfail))
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
