#!/usr/bin/env python3
"""mini_train.py - train the miniature AFM family (base, draft, LoRA adapter); docs/TRAINING.md.

Data: the output of train/mini_data.py and train/mini_task.py (a folder with train.bin, val.bin,
tokenizer.model, task_train.jsonl, task_val.jsonl).

    python3 train/mini_train.py all --data DIR --out OUT            # base, then draft, then adapter
    python3 train/mini_train.py base --data DIR --out OUT
    python3 train/mini_train.py draft --data DIR --out OUT          # needs OUT/base.pack.pt
    python3 train/mini_train.py adapter --data DIR --out OUT        # needs OUT/base.pack.pt
    python3 train/mini_train.py export --out OUT --dest DIR         # toolkit .pt files from the packs
    python3 train/mini_train.py eval --ckpt DIR --data DIR          # numbers from toolkit .pt files
    ... --tiny                                                      # a tiny config for a CPU smoke run

Training writes OUT/{base,draft}.pack.pt (2-/4-bit codes + fp16 scales: the exact deployed values,
small enough to move around), OUT/adapter.pt (the LoRA in toolkit key names), OUT/metrics.json and
OUT/log.txt. `export` turns the packs into Apple-toolkit checkpoints (base-model.pt, draft-model.pt,
adapter-model.pt and their -config.json) that tools/convert.py reads like the real assets.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mini_model as mm  # noqa: E402
import mini_task  # noqa: E402

BASE = dict(vocab=8192, dim=512, n_layers=9, n_reuse=3, n_heads=8, n_kv_heads=1, ffn=1536, context=1024,
            w_bits=2, w_group=64, e_bits=4, e_group=64)
DRAFT = dict(vocab=8192, dim=256, n_layers=4, n_reuse=0, n_heads=8, n_kv_heads=4, ffn=768, context=1024,
             w_bits=4, w_group=64, e_bits=4, e_group=64)
TINY_BASE = dict(BASE, dim=64, n_layers=3, n_reuse=1, n_heads=8, n_kv_heads=1, ffn=192, context=128)
TINY_DRAFT = dict(DRAFT, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=192, context=128)
LORA_RANK, LORA_ALPHA = 32, 16.0

LOG = None


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    if LOG:
        with open(LOG, "a") as fh:
            fh.write(s + "\n")


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class Data:
    def __init__(self, folder, dev, seed):
        self.folder = folder
        self.train = torch.from_numpy(np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16).astype(np.int64)).to(dev)
        self.val = torch.from_numpy(np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16).astype(np.int64)).to(dev)
        self.g = torch.Generator(device="cpu")
        self.g.manual_seed(seed)
        self.dev = dev

    def batch(self, B, T):
        ix = torch.randint(0, self.train.numel() - T - 1, (B,), generator=self.g).to(self.dev)
        off = torch.arange(T + 1, device=self.dev)
        w = self.train[ix[:, None] + off[None, :]]
        return w[:, :-1], w[:, 1:]

    def val_windows(self, T, limit=None):
        n = (self.val.numel() - 1) // T
        if limit:
            n = min(n, limit)
        x = self.val[: n * T].view(n, T)
        y = self.val[1: n * T + 1].view(n, T)
        return x, y


def lr_at(step, total, peak, warmup, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def make_opt(model, lr, wd):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() == 2 and "log_scale" not in n else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, data, T, bs=16, limit=None):
    """Mean NLL (nats/token) over the held-out windows."""
    model.eval()
    x, y = data.val_windows(T, limit)
    tot, n = 0.0, 0
    with autocast(data.dev):
        for i in range(0, x.shape[0], bs):
            lg = model(x[i:i + bs]).float()
            tot += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y[i:i + bs].reshape(-1), reduction="sum").item()
            n += y[i:i + bs].numel()
    model.train()
    return tot / n


@torch.no_grad()
def calibrate_kv(model, data, T, batches=16, bs=8):
    """Ranges = the global [min, max] of K (post RoPE + k_norm) and V over training windows."""
    model.eval()
    for m in model.kv_modules():
        m.reset_range()
    model.set_kv(enabled=False, observe=False, calibrate=True)
    g = data.g.get_state()
    with autocast(data.dev):
        for _ in range(batches):
            x, _ = data.batch(bs, T)
            model(x)
    data.g.set_state(g)
    model.set_kv(enabled=True, observe=False, calibrate=False)
    model.train()


def step_fn(model, opt, x, y, lr, dev, teacher=None, clip=1.0):
    for gp in opt.param_groups:
        gp["lr"] = lr
    with autocast(dev):
        lg = model(x)
        if teacher is None:
            loss = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), y.reshape(-1))
        else:
            tlp = F.log_softmax(teacher.float(), -1)
            slp = F.log_softmax(lg.float(), -1)
            loss = (tlp.exp() * (tlp - slp)).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    return loss.item()


def fit_steps(what, s1, s2, cost2, elapsed, done, budget):
    """Scales the step counts down (never up) so that the stage ends inside `budget` seconds, from the
    time the first `done` steps took; phase-2 steps cost `cost2` phase-1 steps."""
    per = elapsed / done
    est = per * (s1 + cost2 * s2)
    if est <= budget:
        log("%s: %.3f s/step, %d + %d steps fit the %.0f s budget (est. %.0f s)" % (what, per, s1, s2, budget, est))
        return s1, s2
    f = budget / est
    n1, n2 = max(done + 1, int(s1 * f)), max(1, int(s2 * f))
    log("%s: %.3f s/step: %d + %d steps would take %.0f s; cut to %d + %d for the %.0f s budget"
        % (what, per, s1, s2, est, n1, n2, budget))
    return n1, n2


def nll_str(n):
    return "nll %.4f ppl %.3f" % (n, math.exp(n))


# ------------------------------------------------------------------------------------------------
# base

def train_base(a, data, metrics):
    dev = data.dev
    torch.manual_seed(a.seed)
    c = mm.Config(**(TINY_BASE if a.tiny else BASE))
    model = mm.AFM(c).to(dev)
    n_par = sum(p.numel() for n, p in model.named_parameters() if "log_scale" not in n)
    log("base config", c.to_dict(), "params %d" % n_par)
    B, T = a.batch, c.context
    s1, s2 = a.base_steps1, a.base_steps2
    opt = make_opt(model, a.lr, 0.1)
    t0 = time.time()
    total = s1 + s2
    step = 0
    while step < s1:
        x, y = data.batch(B, T)
        loss = step_fn(model, opt, x, y, lr_at(step, total, a.lr, a.warmup), dev)
        if step == 4:
            tm = time.time()
        if step == 24 and a.base_budget:
            s1, s2 = fit_steps("base", s1, s2, 2.0, time.time() - tm, 20, a.base_budget - (tm - t0))
            total = s1 + s2
        if step % 50 == 0 or step == s1 - 1:
            log("base float step %d/%d loss %.4f  %.1fs" % (step, s1, loss, time.time() - t0))
        if a.eval_every and step and step % a.eval_every == 0:
            log("  val", nll_str(evaluate(model, data, T, limit=a.eval_limit)))
        step += 1
    metrics["base_phase1_steps"] = s1
    metrics["base_phase1_val_nll"] = evaluate(model, data, T)
    log("base after phase 1 (float):", nll_str(metrics["base_phase1_val_nll"]))

    # phase 2: two branches from the same point, the same batches: float (reference) and QAT
    fl = model
    qa = copy.deepcopy(model)
    calibrate_kv(qa, data, T, batches=4)
    qa.start_qat()
    qa.set_kv(enabled=True, observe=True)
    opt_f = opt
    opt_q = make_opt(qa, a.lr, 0.1)
    # carry the float optimizer's moments to the QAT branch's weights (its scales start fresh)
    qmap = dict(qa.named_parameters())
    for (n, p) in fl.named_parameters():
        if p in opt.state and n in qmap:
            opt_q.state[qmap[n]] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
    t1 = time.time()
    for step in range(s1, total):
        x, y = data.batch(B, T)
        lr = lr_at(step, total, a.lr, a.warmup)
        lf = step_fn(fl, opt_f, x, y, lr, dev)
        lq = step_fn(qa, opt_q, x, y, lr, dev)
        if step % 50 == 0 or step == total - 1:
            log("base phase2 step %d/%d loss float %.4f qat %.4f  %.1fs" % (step, total, lf, lq, time.time() - t1))
    metrics["base_phase2_steps"] = s2
    metrics["base_train_seconds"] = time.time() - t0
    metrics["base_tokens_seen"] = total * B * T
    metrics["base_epochs"] = total * B * T / data.train.numel()

    # evaluations
    calibrate_kv(qa, data, T)
    metrics["val_nll_float"] = evaluate(fl, data, T)
    log("base float (no quantization):            ", nll_str(metrics["val_nll_float"]))
    ptq = copy.deepcopy(fl)
    ptq.start_qat()
    calibrate_kv(ptq, data, T)
    metrics["val_nll_ptq"] = evaluate(ptq, data, T)
    log("base float rounded to 2-bit (no QAT):    ", nll_str(metrics["val_nll_ptq"]))
    del ptq
    qa.set_kv(enabled=False)
    metrics["val_nll_qat_nokv"] = evaluate(qa, data, T)
    log("base QAT 2-bit weights, 4-bit emb, f KV: ", nll_str(metrics["val_nll_qat_nokv"]))
    qa.set_kv(enabled=True)
    metrics["val_nll_qat"] = evaluate(qa, data, T)
    log("base QAT 2-bit weights, 4-bit emb, int8 KV:", nll_str(metrics["val_nll_qat"]))
    pk = mm.pack_model(qa)
    torch.save(pk, os.path.join(a.out, "base.pack.pt"))
    # the deployed model (exact stored values) must reproduce the QAT number
    dep = mm.unpack_model(pk).to(dev)
    dep.set_kv(enabled=True)
    metrics["val_nll_deployed"] = evaluate(dep, data, T)
    log("base deployed (unpacked codes):          ", nll_str(metrics["val_nll_deployed"]))
    del fl, opt_f, opt_q
    return dep


def load_base(a, dev):
    pk = torch.load(a.base_pack or os.path.join(a.out, "base.pack.pt"), map_location="cpu")
    m = mm.unpack_model(pk).to(dev)
    m.set_kv(enabled=True)
    return m


# ------------------------------------------------------------------------------------------------
# draft

@torch.no_grad()
def agreement(draft, base, data, T, bs=16):
    draft.eval()
    base.eval()
    x, _ = data.val_windows(T)
    same, n = 0, 0
    with autocast(data.dev):
        for i in range(0, x.shape[0], bs):
            same += (draft(x[i:i + bs]).argmax(-1) == base(x[i:i + bs]).argmax(-1)).sum().item()
            n += x[i:i + bs].numel()
    draft.train()
    return same / n


def train_draft(a, data, base, metrics):
    dev = data.dev
    torch.manual_seed(a.seed + 1)
    c = mm.Config(**(TINY_DRAFT if a.tiny else DRAFT))
    draft = mm.AFM(c).to(dev)
    n_par = sum(p.numel() for n, p in draft.named_parameters() if "log_scale" not in n)
    log("draft config", c.to_dict(), "params %d" % n_par)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    B, T = a.batch, c.context
    s1, s2 = a.draft_steps1, a.draft_steps2
    total = s1 + s2
    opt = make_opt(draft, a.draft_lr, 0.05)
    t0 = time.time()
    step = 0
    while step < total:
        if step == 5:
            tm = time.time()
        if step == 25 and a.draft_budget:
            s1, s2 = fit_steps("draft", s1, s2, 1.0, time.time() - tm, 20, a.draft_budget - (tm - t0))
            total = s1 + s2
        if step == s1:
            calibrate_kv(draft, data, T, batches=4)
            draft.start_qat()
            draft.set_kv(enabled=True, observe=True)
            opt = make_opt(draft, a.draft_lr, 0.05)
        x, _ = data.batch(B, T)
        with torch.no_grad(), autocast(dev):
            tl = base(x)
        loss = step_fn(draft, opt, x, None, lr_at(step, total, a.draft_lr, a.warmup), dev, teacher=tl)
        if step % 50 == 0 or step == total - 1:
            log("draft step %d/%d kl %.4f  %.1fs" % (step, total, loss, time.time() - t0))
        step += 1
    calibrate_kv(draft, data, T)
    metrics["draft_steps"] = total
    metrics["draft_train_seconds"] = time.time() - t0
    pk = mm.pack_model(draft)
    torch.save(pk, os.path.join(a.out, "draft.pack.pt"))
    dep = mm.unpack_model(pk).to(dev)
    dep.set_kv(enabled=True)
    metrics["draft_val_nll"] = evaluate(dep, data, T)
    metrics["draft_agreement"] = agreement(dep, base, data, T)
    log("draft deployed:", nll_str(metrics["draft_val_nll"]), "greedy top-1 agreement with base %.4f"
        % metrics["draft_agreement"])


# ------------------------------------------------------------------------------------------------
# adapter

def task_examples(folder, split, sp):
    out = []
    with open(os.path.join(folder, "task_%s.jsonl" % split), encoding="utf-8") as fh:
        for line in fh:
            e = mini_task.example(json.loads(line)["sentence"])
            p = mini_task.encode_prompt(sp, e["prompt"])
            full = mini_task.encode_prompt(sp, e["prompt"] + e["answer"] + "<turn_end>")
            assert full[:len(p)] == p, "prompt tokens are not a prefix"
            out.append((p, full, e))
    return out


@torch.no_grad()
def generate(model, prompts, dev, max_new, stop_id, bs=64):
    """Greedy continuation of each prompt (list of id lists) until stop_id or max_new tokens."""
    model.eval()
    outs = []
    for i in range(0, len(prompts), bs):
        P = prompts[i:i + bs]
        L = torch.tensor([len(p) for p in P], device=dev)
        W = max(len(p) for p in P) + max_new
        buf = torch.zeros(len(P), W, dtype=torch.long, device=dev)
        for j, p in enumerate(P):
            buf[j, :len(p)] = torch.tensor(p, device=dev)
        done = torch.zeros(len(P), dtype=torch.bool, device=dev)
        gen = [[] for _ in P]
        for _ in range(max_new):
            cur = int(L.max().item())
            with autocast(dev):
                lg = model(buf[:, :cur])
            nxt = lg[torch.arange(len(P), device=dev), L - 1].float().argmax(-1)
            for j in range(len(P)):
                if not done[j]:
                    gen[j].append(int(nxt[j]))
            buf[torch.arange(len(P), device=dev), L] = nxt
            done |= nxt == stop_id
            L = L + 1
            if bool(done.all()):
                break
        outs += gen
    model.train()
    return outs


def score_task(sp, gens, examples):
    res = {"exact": 0, "valid_json": 0, "first": 0, "last": 0, "words": 0, "n": len(examples)}
    samples = []
    end = sp.piece_to_id("<turn_end>")
    for g, (_, _, e) in zip(gens, examples):
        ids = g[:g.index(end)] if end in g else g
        text = sp.decode(ids).replace("<n>", "\n").strip()
        want = json.loads(e["answer"])
        if text == e["answer"]:
            res["exact"] += 1
        try:
            got = json.loads(text)
            if isinstance(got, dict):
                res["valid_json"] += 1
                for k in ("first", "last", "words"):
                    res[k] += int(got.get(k) == want[k])
        except ValueError:
            pass
        if len(samples) < 5:
            samples.append({"sentence": e["sentence"], "reply": text, "want": e["answer"]})
    for k in ("exact", "valid_json", "first", "last", "words"):
        res[k + "_rate"] = res[k] / max(1, res["n"])
    res["samples"] = samples
    return res


def train_adapter(a, data, base, metrics):
    import sentencepiece as spm
    dev = data.dev
    sp = spm.SentencePieceProcessor(model_file=os.path.join(a.data, "tokenizer.model"))
    tr = task_examples(a.data, "train", sp)
    va = task_examples(a.data, "val", sp)
    if a.task_limit:
        va = va[:a.task_limit]
    end = sp.piece_to_id("<turn_end>")
    prompts = [p for p, _, _ in va]
    gens = generate(base, prompts, dev, a.max_new, end)
    metrics["task_without_adapter"] = score_task(sp, gens, va)
    log("task without adapter:", {k: v for k, v in metrics["task_without_adapter"].items() if k != "samples"})
    log("  e.g.", metrics["task_without_adapter"]["samples"][:2])

    torch.manual_seed(a.seed + 2)
    for p in base.parameters():
        p.requires_grad_(False)
    base.add_lora(LORA_RANK, LORA_ALPHA)
    base.to(dev)
    lp = [p for n, p in base.named_parameters() if ".lora." in n]
    for p in lp:
        p.requires_grad_(True)
    log("adapter: rank %d alpha %g, %d tensors, %d params" % (LORA_RANK, LORA_ALPHA, len(lp), sum(p.numel() for p in lp)))
    opt = torch.optim.AdamW(lp, lr=a.adapter_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed + 3)
    B = a.adapter_batch
    t0 = time.time()
    base.train()
    for step in range(a.adapter_steps):
        idx = torch.randint(0, len(tr), (B,), generator=g).tolist()
        seqs = [tr[i] for i in idx]
        W = max(len(f) for _, f, _ in seqs)
        x = torch.zeros(B, W - 1, dtype=torch.long)
        y = torch.full((B, W - 1), -100, dtype=torch.long)
        for j, (p, f, _) in enumerate(seqs):
            t = torch.tensor(f)
            x[j, :len(f) - 1] = t[:-1]
            y[j, len(p) - 1:len(f) - 1] = t[len(p):]
        x, y = x.to(dev), y.to(dev)
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step, a.adapter_steps, a.adapter_lr, 30, floor=0.05)
        with autocast(dev):
            lg = base(x)
            loss = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lp, 1.0)
        opt.step()
        if step % 50 == 0 or step == a.adapter_steps - 1:
            log("adapter step %d/%d loss %.4f  %.1fs" % (step, a.adapter_steps, loss.item(), time.time() - t0))
        if a.adapter_eval_every and step and step % a.adapter_eval_every == 0:
            r = score_task(sp, generate(base, prompts, dev, a.max_new, end), va)
            base.train()
            log("  task accuracy at step %d:" % step, {k: v for k, v in r.items() if k.endswith("_rate")})
    metrics["adapter_steps"] = a.adapter_steps
    metrics["adapter_train_seconds"] = time.time() - t0
    sd = mm.toolkit_state_dict(base, lora_only=True)
    torch.save(sd, os.path.join(a.out, "adapter.pt"))
    gens = generate(base, prompts, dev, a.max_new, end)
    metrics["task_with_adapter"] = score_task(sp, gens, va)
    log("task with adapter:", {k: v for k, v in metrics["task_with_adapter"].items() if k != "samples"})
    log("  e.g.", metrics["task_with_adapter"]["samples"][:3])


# ------------------------------------------------------------------------------------------------
# export: packs -> Apple toolkit checkpoints

def toolkit_config(c, kind):
    return {"__comment": "miniature AFMTextV7 (%s) trained by train/mini_train.py; docs/TRAINING.md" % kind,
            "model_type": "afm7-mini-%s" % kind, "vocab_size": c.vocab, "hidden_dim": c.dim,
            "num_layers": c.n_layers, "num_kv_reuse_layers": c.n_reuse, "num_heads": c.n_heads,
            "num_kv_heads": c.n_kv_heads, "hidden_dim_scale_factor": c.ffn / c.dim, "ffn_dim": c.ffn,
            "rope_theta": c.rope_theta, "norm_eps": c.eps, "max_sequence_length": c.context,
            "weight_quantization": {"bits": c.w_bits, "group_size": c.w_group, "levels": "balanced",
                                    "embedding_bits": c.e_bits, "embedding_group_size": c.e_group}}


def export(a):
    os.makedirs(a.dest, exist_ok=True)
    bp = torch.load(os.path.join(a.out, "base.pack.pt"), map_location="cpu")
    base = mm.unpack_model(bp)
    torch.save(mm.toolkit_state_dict(base), os.path.join(a.dest, "base-model.pt"))
    with open(os.path.join(a.dest, "base-model-config.json"), "w") as fh:
        json.dump(toolkit_config(base.c, "base"), fh, indent=1, sort_keys=True)
    dpath = os.path.join(a.out, "draft.pack.pt")
    if os.path.isfile(dpath):
        draft = mm.unpack_model(torch.load(dpath, map_location="cpu"))
        torch.save(mm.toolkit_state_dict(draft, draft=True), os.path.join(a.dest, "draft-model.pt"))
        with open(os.path.join(a.dest, "draft-model-config.json"), "w") as fh:
            json.dump(toolkit_config(draft.c, "draft"), fh, indent=1, sort_keys=True)
    apath = os.path.join(a.out, "adapter.pt")
    if os.path.isfile(apath):
        ad = torch.load(apath, map_location="cpu")
        torch.save(ad, os.path.join(a.dest, "adapter-model.pt"))
        with open(os.path.join(a.dest, "adapter-model-config.json"), "w") as fh:
            json.dump({"rank": LORA_RANK, "alpha": LORA_ALPHA, "adapter": "base_adapter",
                       "task": "describe a sentence as JSON (train/mini_task.py)"}, fh, indent=1, sort_keys=True)
        # the same LoRA embedded as base_adapter, as in Apple's base-model.pt (tools/convert.py keeps it)
        sd = mm.toolkit_state_dict(base)
        sd.update(ad)
        torch.save(sd, os.path.join(a.dest, "base-model-with-adapter.pt"))
        with open(os.path.join(a.dest, "base-model-with-adapter-config.json"), "w") as fh:
            cfg = toolkit_config(base.c, "base")
            cfg["adapters"] = {"base_adapter": {"rank": LORA_RANK, "alpha": LORA_ALPHA}}
            json.dump(cfg, fh, indent=1, sort_keys=True)
    for f in sorted(os.listdir(a.dest)):
        log("%s: %d bytes" % (os.path.join(a.dest, f), os.path.getsize(os.path.join(a.dest, f))))


# ------------------------------------------------------------------------------------------------
# eval from toolkit checkpoints (any machine)

def config_from_toolkit(sd, cfg_json, draft):
    sd = {mm._strip(k): v for k, v in sd.items()}
    with open(cfg_json) as fh:
        j = json.load(fh)
    return mm.Config(vocab=j["vocab_size"], dim=j["hidden_dim"], n_layers=j["num_layers"],
                     n_reuse=j["num_kv_reuse_layers"], n_heads=j["num_heads"], n_kv_heads=j["num_kv_heads"],
                     ffn=j["ffn_dim"], rope_theta=j["rope_theta"], eps=j["norm_eps"], context=j["max_sequence_length"])


def load_toolkit_model(path, draft=False, adapter=None):
    sd = torch.load(path, map_location="cpu")
    c = config_from_toolkit(sd, os.path.splitext(path)[0] + "-config.json", draft)
    m = mm.AFM(c)
    if adapter:
        m.add_lora(LORA_RANK, LORA_ALPHA)
        sd = dict(sd)
        sd.update(torch.load(adapter, map_location="cpu"))
    left = mm.load_toolkit(m, sd, draft=draft)
    if left:
        raise SystemExit("unused keys: %s" % left[:10])
    m.set_kv(enabled=True)
    return m


def eval_cmd(a):
    import sentencepiece as spm
    dev = device()
    data = Data(a.data, dev, a.seed)
    metrics = {}
    base = load_toolkit_model(os.path.join(a.ckpt, "base-model.pt")).to(dev)
    T = base.c.context
    if "ppl" in a.what:
        metrics["val_nll"] = evaluate(base, data, T, bs=4, limit=a.eval_limit)
        log("base deployed:", nll_str(metrics["val_nll"]))
    if "draft" in a.what:
        draft = load_toolkit_model(os.path.join(a.ckpt, "draft-model.pt"), draft=True).to(dev)
        metrics["draft_val_nll"] = evaluate(draft, data, T, bs=4, limit=a.eval_limit)
        x, _ = data.val_windows(T, a.eval_limit)
        same = 0
        with torch.no_grad():
            for i in range(0, x.shape[0], 4):
                same += (draft(x[i:i + 4]).argmax(-1) == base(x[i:i + 4]).argmax(-1)).sum().item()
        metrics["draft_agreement"] = same / x.numel()
        log("draft:", nll_str(metrics["draft_val_nll"]), "agreement %.4f" % metrics["draft_agreement"])
    if "task" in a.what:
        sp = spm.SentencePieceProcessor(model_file=os.path.join(a.data, "tokenizer.model"))
        va = task_examples(a.data, "val", sp)[:a.task_limit or None]
        end = sp.piece_to_id("<turn_end>")
        prompts = [p for p, _, _ in va]
        r0 = score_task(sp, generate(base, prompts, dev, a.max_new, end), va)
        ad = load_toolkit_model(os.path.join(a.ckpt, "base-model.pt"),
                                adapter=os.path.join(a.ckpt, "adapter-model.pt")).to(dev)
        r1 = score_task(sp, generate(ad, prompts, dev, a.max_new, end), va)
        metrics["task_without_adapter"], metrics["task_with_adapter"] = r0, r1
        for nm, r in (("without", r0), ("with", r1)):
            log("task %s adapter:" % nm, {k: v for k, v in r.items() if k != "samples"})
    print(json.dumps(metrics, indent=1))


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["all", "base", "draft", "adapter", "export", "eval"])
    ap.add_argument("--data", default="build/mini_gpu")
    ap.add_argument("--out", default="/work/scratch/mini/out")
    ap.add_argument("--dest", default="/work/scratch/mini/toolkit")
    ap.add_argument("--ckpt", default="/work/scratch/mini/toolkit")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tiny", action="store_true", help="tiny models and few steps (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--base-steps1", type=int, default=400)
    ap.add_argument("--base-steps2", type=int, default=400)
    ap.add_argument("--draft-steps1", type=int, default=500)
    ap.add_argument("--draft-steps2", type=int, default=200)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--base-budget", type=float, default=0, help="seconds: fewer steps if they would not fit")
    ap.add_argument("--draft-budget", type=float, default=0)
    ap.add_argument("--adapter-steps", type=int, default=2000)
    ap.add_argument("--adapter-batch", type=int, default=64)
    ap.add_argument("--adapter-lr", type=float, default=1e-3)
    ap.add_argument("--adapter-eval-every", type=int, default=0)
    ap.add_argument("--base-pack", help="the base to distill / adapt (default OUT/base.pack.pt)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--task-limit", type=int, default=0)
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--what", default="ppl,draft,task")
    a = ap.parse_args(argv)
    if a.tiny:
        for k, v in dict(batch=4, warmup=5, base_steps1=20, base_steps2=10, draft_steps1=10, draft_steps2=5,
                         adapter_steps=10, adapter_batch=8, eval_every=10, eval_limit=4, task_limit=8,
                         max_new=12).items():
            setattr(a, k, v)
    if a.cmd == "export":
        export(a)
        return 0
    if a.cmd == "eval":
        eval_cmd(a)
        return 0
    os.makedirs(a.out, exist_ok=True)
    LOG = os.path.join(a.out, "log.txt")
    dev = device()
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log("device", torch.cuda.get_device_name(0), "torch", torch.__version__)
    data = Data(a.data, dev, a.seed)
    log("data: %d train tokens, %d val tokens" % (data.train.numel(), data.val.numel()))
    mpath = os.path.join(a.out, "metrics.json")
    metrics = {}
    if os.path.isfile(mpath):
        with open(mpath) as fh:
            metrics = json.load(fh)
    metrics["args_" + a.cmd] = vars(a)

    def save():
        with open(mpath, "w") as fh:
            json.dump(metrics, fh, indent=1, sort_keys=True)

    t0 = time.time()
    base = None
    if a.cmd in ("all", "base"):
        base = train_base(a, data, metrics)
        save()
    if a.cmd in ("all", "draft"):
        base = base or load_base(a, dev)
        train_draft(a, data, base, metrics)
        save()
    if a.cmd in ("all", "adapter"):
        base = load_base(a, dev)           # fresh (no LoRA yet)
        train_adapter(a, data, base, metrics)
        save()
    metrics["total_seconds_" + a.cmd] = time.time() - t0
    save()
    log("done in %.1fs" % (time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
