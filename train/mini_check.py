#!/usr/bin/env python3
"""mini_check.py - the three implementations agree on a miniature AFM checkpoint: the PyTorch training
model (train/mini_model.py), Apple's MLX port (mlx_lm.models.afm7) and the C engine (./afm).

    python3 train/mini_check.py CKPT.pt [--draft] [--afm FILE.afm] [--adapter ADAPTER.pt]
    python3 train/mini_check.py --selftest          # random tiny models, PyTorch vs MLX only
    python3 train/mini_check.py --task DATA --afm BASE.afm [--afm-adapter A.afma] [--n 300]
                                                    # the adapter's task, greedy, through ./afm

CKPT.pt is a toolkit checkpoint (train/mini_train.py export) with CKPT-config.json beside it. The check
feeds a fixed token sequence (EOS + the encoding of a fixed sentence when --tokenizer is given, else
seeded ids) and compares logits: PyTorch (whole sequence, f32, int8 KV fake quant from the ranges) vs
MLX (prefill, then single-token decode steps, the KV quant scales from the same ranges) and, with
--afm, vs `./afm --dump-logits` on the converted file (greedy continuation, compared row by row).
With --adapter the LoRA is applied in PyTorch and merged into the MLX weights (W + alpha/r (a_t b_t)^T).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import mini_model as mm  # noqa: E402


def kv_scale(r):
    r = np.asarray(r, np.float64)
    return np.float32(max(r[0] / -128.0, r[1] / 127.0))


def to_mlx(sd, c, draft=False, adapter=None, alpha=None, rank=None):
    """MLX afm7 weights from a toolkit state dict (interleaved RoPE layout, as both use)."""
    sd = {mm._strip(k): v.float().numpy() for k, v in sd.items()}
    ad = {mm._strip(k): v.float().numpy() for k, v in (adapter or {}).items()}
    s_ = (alpha / rank) if adapter else 0.0
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    w = {"model.embedding.weight": sd["embedding.weight"], "model.output_norm.weight": sd["output_norm.weight"]}

    def merged(P, mod, W, lora=None, rows=None):
        key = P + (mod + ".adapters.base_adapter." if lora is None else
                   "attention.qkv_transform.adapters.base_adapter.lora_%d." % lora)
        if key + "a_transpose" not in ad:
            return W
        delta = (s_ * (ad[key + "a_transpose"].astype(np.float64) @ ad[key + "b_transpose"].astype(np.float64))).T
        out = W.astype(np.float64).copy()
        if rows is None:
            out += delta
        else:
            out[rows[0]:rows[1]] += delta
        return out.astype(np.float32)

    for i in range(c.n_layers):
        P = mm.layer_prefix(c, i, draft)
        M = "model.layers.%d." % i if i < c.n0 else "model.kv_reuse_layers.%d." % (i - c.n0)
        w[M + "input_layernorm.weight"] = sd[P + "attention.norm.weight"]
        w[M + "post_attention_layernorm.weight"] = sd[P + "feed_forward.norm.weight"]
        w[M + "self_attn.out_proj.weight"] = merged(P, "attention.output_transform", sd[P + "attention.output_transform.weight"])
        for ml, mod in (("gate_proj", "feed_forward.hidden_transform.linear_0"),
                        ("up_proj", "feed_forward.hidden_transform.linear_1"), ("down_proj", "feed_forward.output_transform")):
            w[M + "mlp.%s.weight" % ml] = merged(P, mod, sd[P + mod + ".weight"])
        if i < c.n0:
            W = sd[P + "attention.qkv_transform.fused_linear.weight"]
            W = merged(P, None, W, 0, (0, q))
            W = merged(P, None, W, 1, (q, q + kv))
            W = merged(P, None, W, 2, (q + kv, q + 2 * kv))
            w[M + "self_attn.qkv_proj.weight"] = W
            w[M + "self_attn.q_norm.weight"] = sd[P + "attention.qk_norm.query_norm.weight"]
            w[M + "self_attn.k_norm.weight"] = sd[P + "attention.qk_norm.key_norm.weight"]
            w[M + "self_attn.quant_key_scale"] = np.array(
                kv_scale(sd[P + "attention.kv_quantizer.key_quantizer.activation_post_process.range"]), np.float32)
            w[M + "self_attn.quant_value_scale"] = np.array(
                kv_scale(sd[P + "attention.kv_quantizer.value_quantizer.activation_post_process.range"]), np.float32)
        else:
            w[M + "self_attn.q_proj.weight"] = merged(P, "attention.q_transform", sd[P + "attention.q_transform.weight"])
            w[M + "self_attn.q_norm.weight"] = sd[P + "attention.q_norm.query_norm.weight"]
    return w


def mlx_logits(c, weights, tokens, n_prompt):
    import mlx.core as mx
    from mlx_lm.models import afm7
    args = afm7.ModelArgs(model_type="afm7", vocab_size=c.vocab, hidden_dim=c.dim, num_layers=c.n_layers,
                          num_kv_reuse_layers=c.n_reuse, num_heads=c.n_heads, num_kv_heads=c.n_kv_heads,
                          hidden_dim_scale_factor=c.ffn / c.dim, rope_theta=c.rope_theta, rms_norm_eps=c.eps)
    model = afm7.Model(args)
    assert int(c.dim * args.hidden_dim_scale_factor) == c.ffn
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    cache = model.make_cache()
    out = model(mx.array(np.asarray(tokens[:n_prompt])[None]), cache=cache)
    rows = [np.array(out[0].astype(mx.float32))]
    for t in tokens[n_prompt:]:
        out = model(mx.array([[int(t)]]), cache=cache)
        rows.append(np.array(out[0].astype(mx.float32)))
    return np.concatenate(rows, 0)


@torch.no_grad()
def torch_logits(model, tokens):
    model.eval()
    return model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long))[0].float().numpy()


def rel(a, b):
    """max |a - b| over the logits, in units of the reference's standard deviation (the core engine's
    parity measure: tests/test_main.c allows 1e-4)."""
    return float(np.abs(a - b).max() / (b.std() + 1e-30))


def selftest():
    torch.manual_seed(0)
    ok = True
    for draft, cfg in ((False, dict(vocab=300, dim=64, n_layers=5, n_reuse=2, n_heads=8, n_kv_heads=1, ffn=192)),
                       (True, dict(vocab=300, dim=64, n_layers=3, n_reuse=0, n_heads=4, n_kv_heads=2, ffn=192))):
        c = mm.Config(**cfg)
        m = mm.AFM(c)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() == 1:
                    p.uniform_(0.7, 1.3)
                elif p.dim() == 2 and "embedding" not in n:
                    p.normal_(0, p.shape[1] ** -0.5)
            m.embedding.normal_(0, 0.5)
        g = np.random.default_rng(1)
        tokens = g.integers(0, c.vocab, 40)
        # calibrate KV ranges on the tokens, then compare with the fake quantizer on; and after QAT
        for qat in (False, True):
            if qat:
                m.start_qat()
                m.add_lora(4, 2.0)
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if "b_transpose" in n:
                            p.normal_(0, 0.1)
            for k in m.kv_modules():
                k.reset_range()
            m.set_kv(enabled=False, calibrate=True)
            torch_logits(m, tokens)
            m.set_kv(enabled=True, calibrate=False)
            m.emb_qat = m.emb_qat   # noqa
            lt = torch_logits(m, tokens)
            sd = mm.toolkit_state_dict(m, draft=draft)
            ad = mm.toolkit_state_dict(m, draft=draft, lora_only=True) if qat else None
            lm = mlx_logits(c, to_mlx(sd, c, draft, ad, 2.0, 4), tokens, 24)
            r = rel(lt, lm)
            # the same through the toolkit checkpoint loader
            m2 = mm.AFM(c)
            if qat:
                m2.add_lora(4, 2.0)
            left = mm.load_toolkit(m2, dict(sd, **(ad or {})), draft=draft)
            m2.set_kv(enabled=True)
            r2 = rel(torch_logits(m2, tokens), lt)
            print("%s qat=%d: torch vs mlx max|d|/std %.2e; reloaded toolkit vs trained %.2e; unused %s"
                  % ("draft" if draft else "base", qat, r, r2, left))
            ok &= r < 1e-4 and r2 < 1e-6 and not left
    print("selftest", "ok" if ok else "FAILED")
    return 0 if ok else 1


def task_c(a):
    """Held-out task accuracy with the C engine (one ./afm process per prompt, greedy, stop at <turn_end>)."""
    import sentencepiece as spm
    import mini_task
    import mini_train
    sp = spm.SentencePieceProcessor(model_file=os.path.join(a.task, "tokenizer.model"))
    with open(os.path.join(a.task, "task_val.jsonl"), encoding="utf-8") as fh:
        ex = [mini_task.example(json.loads(l)["sentence"]) for l in fh][:a.n]
    end = sp.piece_to_id("<turn_end>")
    gens = []
    for e in ex:
        ids = mini_task.encode_prompt(sp, e["prompt"])
        cmd = [os.path.join(ROOT, "afm"), "-m", a.afm, "--ids", ",".join(map(str, ids)), "-n", "40",
               "--stop", str(end), "-t", "2"]
        if a.afm_adapter:
            cmd += ["--adapter", a.afm_adapter]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        gens.append([int(t) for t in r.stdout.split()])
    res = mini_train.score_task(sp, gens, [(None, None, e) for e in ex])
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}))
    for smp in res["samples"][:3]:
        print(json.dumps(smp))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--draft", action="store_true")
    ap.add_argument("--adapter")
    ap.add_argument("--afm", help="the converted .afm file: compare ./afm --dump-logits too")
    ap.add_argument("--afm-adapter", help="passed to ./afm --adapter")
    ap.add_argument("--tokenizer")
    ap.add_argument("--text", default="In the beginning God created the heaven and the earth.\nAnd the earth was")
    ap.add_argument("--n-decode", type=int, default=12)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--task", help="folder with tokenizer.model and task_val.jsonl: score the task via ./afm")
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args(argv)
    if a.selftest:
        return selftest()
    if a.task:
        return task_c(a)
    import mini_train
    sd = torch.load(a.ckpt, map_location="cpu")
    model = mini_train.load_toolkit_model(a.ckpt, draft=a.draft, adapter=a.adapter)
    c = model.c
    if a.tokenizer:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
        if a.text.startswith("<turn_start>"):        # chat: docs/MODEL.md section 7 (first token dropped, EOS first)
            import mini_task
            prompt = mini_task.encode_prompt(sp, a.text)
        else:
            prompt = [sp.eos_id()] + sp.encode(a.text.replace("\n", "<n>"))
    else:
        prompt = list(np.random.default_rng(5).integers(0, c.vocab, 24))
    # greedy continuation by PyTorch fixes the decode tokens
    toks = list(prompt)
    for _ in range(a.n_decode):
        toks.append(int(torch_logits(model, toks)[-1].argmax()))
    lt = torch_logits(model, toks)
    ad = torch.load(a.adapter, map_location="cpu") if a.adapter else None
    lm = mlx_logits(c, to_mlx(sd, c, a.draft, ad, mini_train.LORA_ALPHA, mini_train.LORA_RANK), toks, len(prompt))
    res = {"tokens": [int(t) for t in toks], "n_prompt": len(prompt), "torch_vs_mlx": rel(lt, lm)}
    # int8 KV rounding: an element within float noise of a code boundary rounds either way, which
    # moves logits by ~1e-3 std. The same model in float64 shows whether these tokens hit such a case.
    with torch.no_grad():
        l64 = model.double()(torch.tensor(np.asarray(toks)[None], dtype=torch.long))[0].numpy()
    model.float()
    res["torch_f32_vs_f64"] = rel(lt, l64)
    if res["torch_f32_vs_f64"] >= a.tol:
        print("note: these tokens put a K/V element on an int8 rounding boundary (f32 vs f64 differ by "
              "%.2g std): a differing rounding in another implementation is not an error" % res["torch_f32_vs_f64"])
    ok = res["torch_vs_mlx"] < a.tol
    if a.afm:
        with tempfile.TemporaryDirectory() as td:
            dump = os.path.join(td, "l.f32")
            cmd = [os.path.join(ROOT, "afm"), "-m", a.afm, "--ids", ",".join(str(t) for t in prompt),
                   "-n", str(a.n_decode), "--dump-logits", dump, "-t", "2"]
            if a.afm_adapter:
                cmd += ["--adapter", a.afm_adapter]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(r.stdout + r.stderr)
                return 1
            lc = np.fromfile(dump, dtype="<f4").reshape(-1, c.vocab)
        # row 0: last prompt position; row s: after generated token s
        ref = lt[len(prompt) - 1: len(prompt) - 1 + lc.shape[0]]
        res["c_rows"] = int(lc.shape[0])
        res["c_vs_torch"] = rel(lc, ref)
        res["c_vs_mlx"] = rel(lc, lm[len(prompt) - 1: len(prompt) - 1 + lc.shape[0]])
        res["c_greedy_matches_torch"] = bool((lc.argmax(-1)[:-1] == np.array(toks[len(prompt):len(prompt) + lc.shape[0] - 1])).all())
        ok &= res["c_vs_torch"] < a.tol and res["c_vs_mlx"] < a.tol
    print(json.dumps(res))
    print("check", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
