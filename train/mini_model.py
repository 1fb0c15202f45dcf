#!/usr/bin/env python3
"""mini_model.py - AFMTextV7 in PyTorch, for training the miniature AFM family (docs/TRAINING.md).

The forward pass is the one of docs/MODEL.md section 2 and of Apple's MLX port (mlx_lm.models.afm7):
pre-norm blocks; a fused QKV projection (rows Q | K | V); RoPE on interleaved pairs (2i, 2i+1)
*then* RMSNorm over each head (q_norm, k_norm); K and V through an int8 fake quantizer with a
per-layer scale from a calibrated [min, max] range; causal attention with query head h reading KV
head h // (n_heads / n_kv_heads); SwiGLU; segment-1 layers have only a query projection and attend
over the (quantized) keys and values of the last segment-0 layer; tied embedding output head.

Training extras (all off for a plain forward pass):
  * weight QAT: every projection onto the balanced levels {-1.5,-0.5,0.5,1.5} x scale (2 bit) or
    {-7.5..7.5} x scale (4 bit), one learnable scale (log-parametrized) per group of `group` inputs
    along each row, straight-through estimator (LSQ); the embedding likewise at 4 bits;
  * KV fake quantization with a moving min/max observer while training, the straight-through
    estimator, and calibrated ranges for export;
  * LoRA (docs/MODEL.md section 3) on every adapted projection: y = W x + (alpha/r) ((x @ a_transpose) @ b_transpose).

Checkpoints use the key names of Apple's adapter toolkit (docs/MODEL.md section 5): see toolkit_state_dict().
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab: int = 8192
    dim: int = 512
    n_layers: int = 9          # both segments
    n_reuse: int = 3           # segment-1 (KV-reuse) layers
    n_heads: int = 8
    n_kv_heads: int = 1
    ffn: int = 1536
    rope_theta: float = 500000.0
    eps: float = 1e-5
    context: int = 1024
    w_bits: int = 2            # projection weight QAT bits (2 or 4)
    w_group: int = 64
    e_bits: int = 4            # embedding QAT bits
    e_group: int = 64
    lora_rank: int = 0
    lora_alpha: float = 0.0

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def n0(self):
        return self.n_layers - self.n_reuse

    def to_dict(self):
        return asdict(self)


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope_interleaved(x, pos, theta):
    """x [B, H, T, D]; rotates pairs (2i, 2i+1) by pos * theta^(-2i/D) (MLX traditional=True)."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = pos.float()[:, None] * inv[None, :]                  # [T, D/2]
    cos, sin = ang.cos(), ang.sin()
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# quantization

def fp16_scale(log_scale):
    """exp(log_scale) rounded to fp16 (what the file stores), straight-through for the gradient."""
    s = log_scale.exp()
    return s + (s.to(torch.float16).float() - s).detach()


def fake_quant_balanced(w, log_scale, group, bits):
    """Balanced levels (c + 0.5) * s, c in [-2^(b-1), 2^(b-1) - 1], one scale per `group` consecutive
    inputs of each row (rounded to fp16, as stored); straight-through for w inside the range, LSQ
    gradient for the scale."""
    out_f, in_f = w.shape
    half = 2 ** (bits - 1)
    s = fp16_scale(log_scale)                                    # [out, in/group, 1]
    v = w.reshape(out_f, in_f // group, group) / s
    v = v.clamp(-half + 1e-4, half - 1e-4)
    c = torch.floor(v) + 0.5
    vq = v + (c - v).detach()
    return (vq * s).reshape(out_f, in_f)


@torch.no_grad()
def mse_fit_log_scale(w, group, bits, iters=12):
    """Per-group scale minimizing ||w - q(w)||^2 (alternating assignment / least squares)."""
    out_f, in_f = w.shape
    half = 2 ** (bits - 1)
    g = w.reshape(out_f, in_f // group, group).float()
    s = g.abs().mean(-1, keepdim=True) / (half / 2.0) + 1e-12     # a starting point near the optimum
    for _ in range(iters):
        c = (torch.floor(g / s).clamp(-half, half - 1) + 0.5)
        s = ((g * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True)).clamp_min(1e-12)
    return s.log()


@torch.no_grad()
def quantize_codes(w, log_scale, group, bits):
    """(codes uint8 in 0 .. 2^b - 1, fp16 scales [out, in/group]) and the dequantized f32 tensor
    (codes - (2^b - 1)/2) * float(fp16 scale): the values the exported checkpoint holds."""
    out_f, in_f = w.shape
    half = 2 ** (bits - 1)
    s16 = log_scale.exp().to(torch.float16)                      # what the file stores
    s = s16.float()
    v = (w.reshape(out_f, in_f // group, group).float() / s).clamp(-half + 1e-4, half - 1e-4)
    c = torch.floor(v)                                           # -half .. half-1
    codes = (c + half).to(torch.uint8)
    deq = ((codes.float() - (half - 0.5)) * s).reshape(out_f, in_f)
    return codes.reshape(out_f, in_f), s16.reshape(out_f, in_f // group), deq


class QWeight(nn.Module):
    """A projection weight [out, in] with optional QAT and optional LoRA pieces attached by the owner."""

    def __init__(self, out_f, in_f, bits, group):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f))
        nn.init.normal_(self.weight, std=in_f ** -0.5)
        self.bits, self.group = bits, group
        self.log_scale = nn.Parameter(torch.zeros(out_f, in_f // group, 1), requires_grad=False)
        self.qat = False

    def start_qat(self):
        self.log_scale.data.copy_(mse_fit_log_scale(self.weight.data, self.group, self.bits))
        self.log_scale.requires_grad_(True)
        self.qat = True

    def get(self):
        if self.qat:
            return fake_quant_balanced(self.weight, self.log_scale, self.group, self.bits)
        return self.weight


class LoRA(nn.Module):
    def __init__(self, in_f, out_f, r):
        super().__init__()
        b = 1.0 / math.sqrt(in_f)
        self.a_transpose = nn.Parameter(torch.empty(in_f, r).uniform_(-b, b))
        self.b_transpose = nn.Parameter(torch.zeros(r, out_f))

    def forward(self, x, scale):
        return ((x @ self.a_transpose.to(x.dtype)) * scale) @ self.b_transpose.to(x.dtype)


class KVQuant(nn.Module):
    """int8 symmetric fake quantizer, scale = max(min / -128, max / 127) from `range` = [min, max]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("range", torch.tensor([-1.0, 1.0]))
        self.seen = 0
        self.enabled = False
        self.observe = False        # moving min/max (momentum) while training
        self.calibrate = False      # running global min/max (after reset_range)
        self.momentum = 0.02

    def reset_range(self):
        self.range.fill_(0.0)
        self.seen = 0

    def forward(self, x):
        if self.observe or self.calibrate:
            with torch.no_grad():
                xd = x.detach().float()
                mn, mx = xd.min(), xd.max()
                if self.seen == 0:
                    self.range[0], self.range[1] = mn, mx
                elif self.calibrate:
                    self.range[0] = torch.minimum(self.range[0], mn)
                    self.range[1] = torch.maximum(self.range[1], mx)
                else:
                    m = self.momentum
                    self.range[0] = (1 - m) * self.range[0] + m * mn
                    self.range[1] = (1 - m) * self.range[1] + m * mx
                self.seen += 1
        if not self.enabled:
            return x
        scale = torch.maximum(self.range[0] / -128.0, self.range[1] / 127.0).clamp_min(1e-8)
        xf = x.float()
        q = torch.clamp(torch.round(xf / scale), -128, 127) * scale
        return (xf + (q - xf).detach()).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# blocks

class Layer(nn.Module):
    def __init__(self, c: Config, reuse: bool):
        super().__init__()
        self.c, self.reuse = c, reuse
        d, hd, nh, nkv = c.dim, c.head_dim, c.n_heads, c.n_kv_heads
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.q_norm = nn.Parameter(torch.ones(hd))
        if reuse:
            self.wq = QWeight(nh * hd, d, c.w_bits, c.w_group)
        else:
            self.qkv = QWeight(nh * hd + 2 * nkv * hd, d, c.w_bits, c.w_group)
            self.k_norm = nn.Parameter(torch.ones(hd))
            self.kq = KVQuant()
            self.vq = KVQuant()
        self.wo = QWeight(d, nh * hd, c.w_bits, c.w_group)
        self.gate = QWeight(c.ffn, d, c.w_bits, c.w_group)
        self.up = QWeight(c.ffn, d, c.w_bits, c.w_group)
        self.down = QWeight(d, c.ffn, c.w_bits, c.w_group)
        # residual-branch outputs start small (GPT-2 style)
        for w in (self.wo, self.down):
            nn.init.normal_(w.weight, std=(nh * hd) ** -0.5 / math.sqrt(2 * c.n_layers))
        self.lora = nn.ModuleDict()

    def add_lora(self, r):
        c = self.c
        d, q, kv, f = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn
        shapes = dict(q=(d, q), k=(d, kv), v=(d, kv), wq=(d, q), wo=(q, d), gate=(d, f), up=(d, f), down=(f, d))
        names = (("wq",) if self.reuse else ("q", "k", "v")) + ("wo", "gate", "up", "down")
        for p in names:
            self.lora[p] = LoRA(shapes[p][0], shapes[p][1], r)

    def _lin(self, x, w: QWeight, p):
        y = F.linear(x, w.get().to(x.dtype))
        return y

    def _lora(self, x, p):
        if p in self.lora:
            return self.lora[p](x, self.c.lora_alpha / self.c.lora_rank)
        return 0.0

    def forward(self, x, pos, kv=None):
        c = self.c
        B, T, _ = x.shape
        nh, nkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        h = rms_norm(x, self.attn_norm, c.eps)
        if self.reuse:
            q = self._lin(h, self.wq, "wq") + self._lora(h, "wq")
            k, v = kv
        else:
            qkv = self._lin(h, self.qkv, "qkv")
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            if len(self.lora):
                q = q + self._lora(h, "q")
                k = k + self._lora(h, "k")
                v = v + self._lora(h, "v")
            k = k.view(B, T, nkv, hd).transpose(1, 2)
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            k = rms_norm(rope_interleaved(k, pos, c.rope_theta), self.k_norm, c.eps)
            k = self.kq(k)
            v = self.vq(v)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        q = rms_norm(rope_interleaved(q, pos, c.rope_theta), self.q_norm, c.eps)
        rep = nh // nkv
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        a = F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), is_causal=True, scale=hd ** -0.5)
        a = a.transpose(1, 2).reshape(B, T, nh * hd)
        x = x + self._lin(a, self.wo, "wo") + self._lora(a, "wo")
        h = rms_norm(x, self.ffn_norm, c.eps)
        g = self._lin(h, self.gate, "gate") + self._lora(h, "gate")
        u = self._lin(h, self.up, "up") + self._lora(h, "up")
        m = F.silu(g) * u
        x = x + self._lin(m, self.down, "down") + self._lora(m, "down")
        return x, (k, v)


class AFM(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embedding = nn.Parameter(torch.randn(c.vocab, c.dim) * 0.02)   # (tied output head)
        self.emb_log_scale = nn.Parameter(torch.zeros(c.vocab, c.dim // c.e_group, 1), requires_grad=False)
        self.emb_qat = False
        self.layers = nn.ModuleList([Layer(c, i >= c.n0) for i in range(c.n_layers)])
        self.out_norm = nn.Parameter(torch.ones(c.dim))

    # --- modes
    def start_qat(self, weights=True, embedding=True):
        if weights:
            for m in self.modules():
                if isinstance(m, QWeight):
                    m.start_qat()
        if embedding:
            self.emb_log_scale.data.copy_(mse_fit_log_scale(self.embedding.data, self.c.e_group, self.c.e_bits))
            self.emb_log_scale.requires_grad_(True)
            self.emb_qat = True

    def kv_modules(self):
        return [m for m in self.modules() if isinstance(m, KVQuant)]

    def set_kv(self, enabled=None, observe=None, calibrate=None):
        for m in self.kv_modules():
            if enabled is not None:
                m.enabled = enabled
            if observe is not None:
                m.observe = observe
            if calibrate is not None:
                m.calibrate = calibrate

    def add_lora(self, r, alpha):
        self.c.lora_rank, self.c.lora_alpha = r, alpha
        for L in self.layers:
            L.add_lora(r)

    def emb_weight(self):
        if self.emb_qat:
            return fake_quant_balanced(self.embedding, self.emb_log_scale, self.c.e_group, self.c.e_bits)
        return self.embedding

    def forward(self, tokens, return_hidden=False):
        c = self.c
        B, T = tokens.shape
        E = self.emb_weight()
        x = F.embedding(tokens, E)                                 # residual stream stays f32
        pos = torch.arange(T, device=tokens.device)
        kv = None
        for i, L in enumerate(self.layers):
            if L.reuse:
                x, _ = L(x, pos, kv)
            else:
                x, kv_i = L(x, pos)
                if i == c.n0 - 1:
                    kv = kv_i
        h = rms_norm(x, self.out_norm, c.eps)
        if return_hidden:
            return h
        return F.linear(h, E.to(h.dtype))


# ------------------------------------------------------------------------------------------------
# Apple toolkit checkpoints (docs/MODEL.md section 5)

_MOD = {"wo": "attention.output_transform", "gate": "feed_forward.hidden_transform.linear_0",
        "up": "feed_forward.hidden_transform.linear_1", "down": "feed_forward.output_transform",
        "wq": "attention.q_transform", "qkv": "attention.qkv_transform"}


def layer_prefix(c, i, draft):
    if draft:
        return "layers.layer_%d." % i
    return "layers.segment_0.layer_%d." % i if i < c.n0 else "layers.segment_1.layer_%d." % (i - c.n0)


@torch.no_grad()
def deployed_weights(model):
    """{module path: f32 tensor} of what inference uses: quantized values where QAT is on."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QWeight):
            if m.qat:
                out[name] = quantize_codes(m.weight, m.log_scale, m.group, m.bits)[2]
            else:
                out[name] = m.weight.detach().float().clone()
    if model.emb_qat:
        out["embedding"] = quantize_codes(model.embedding, model.emb_log_scale, model.c.e_group, model.c.e_bits)[2]
    else:
        out["embedding"] = model.embedding.detach().float().clone()
    return out


@torch.no_grad()
def toolkit_state_dict(model, draft=False, with_lora=False, lora_only=False):
    """The state dict with Apple's toolkit key names (docs/MODEL.md section 5). Projection weights hold the
    deployed values (on the 2-/4-bit grid after QAT); `output_transform.weight` shares the embedding's
    storage (tied), as in Apple's base-model.pt; kv_quantizer ranges are [min, max]."""
    c = model.c
    W = deployed_weights(model)
    sd = {}
    cpu = lambda t: t.detach().float().cpu().contiguous()   # noqa: E731
    if not lora_only:
        emb = cpu(W["embedding"])
        sd["embedding.weight"] = emb
        sd["output_transform.weight"] = emb
    for i, L in enumerate(model.layers):
        P = layer_prefix(c, i, draft)
        if not lora_only:
            sd[P + "attention.norm.weight"] = cpu(L.attn_norm)
            if L.reuse:
                sd[P + "attention.q_transform.weight"] = cpu(W["layers.%d.wq" % i])
                sd[P + "attention.q_norm.query_norm.weight"] = cpu(L.q_norm)
            else:
                sd[P + "attention.qkv_transform.fused_linear.weight"] = cpu(W["layers.%d.qkv" % i])
                sd[P + "attention.qk_norm.query_norm.weight"] = cpu(L.q_norm)
                sd[P + "attention.qk_norm.key_norm.weight"] = cpu(L.k_norm)
            sd[P + "attention.output_transform.weight"] = cpu(W["layers.%d.wo" % i])
            if not L.reuse:
                sd[P + "attention.kv_quantizer.key_quantizer.activation_post_process.range"] = cpu(L.kq.range)
                sd[P + "attention.kv_quantizer.value_quantizer.activation_post_process.range"] = cpu(L.vq.range)
            sd[P + "feed_forward.norm.weight"] = cpu(L.ffn_norm)
            sd[P + "feed_forward.hidden_transform.linear_0.weight"] = cpu(W["layers.%d.gate" % i])
            sd[P + "feed_forward.hidden_transform.linear_1.weight"] = cpu(W["layers.%d.up" % i])
            sd[P + "feed_forward.output_transform.weight"] = cpu(W["layers.%d.down" % i])
        if (with_lora or lora_only) and len(L.lora):
            for p, lo in L.lora.items():
                if p in "qkv":
                    base = P + "attention.qkv_transform.adapters.base_adapter.lora_%d." % "qkv".index(p)
                else:
                    base = P + _MOD[p] + ".adapters.base_adapter."
                sd[base + "a_transpose"] = cpu(lo.a_transpose)
                sd[base + "b_transpose"] = cpu(lo.b_transpose)
    if not lora_only:
        sd["output_norm.weight"] = cpu(model.out_norm)
    return sd


def _strip(k):
    import re
    if k.startswith("model."):
        k = k[6:]
    return re.sub(r"\.(?:_?wrapped)(?=\.)", "", k)


@torch.no_grad()
def load_toolkit(model, sd, draft=False):
    """Loads a toolkit state dict (base weights and/or base_adapter LoRA) into model; QAT stays off,
    so the model computes with exactly the stored values. Returns the keys it did not use."""
    c = model.c
    sd = {_strip(k): v for k, v in sd.items()}
    used = set()

    def take(k, dst):
        if k in sd:
            dst.data.copy_(sd[k].reshape(dst.shape).to(dst.dtype))
            used.add(k)

    take("embedding.weight", model.embedding)
    used.add("output_transform.weight")
    take("output_norm.weight", model.out_norm)
    for i, L in enumerate(model.layers):
        P = layer_prefix(c, i, draft)
        take(P + "attention.norm.weight", L.attn_norm)
        take(P + "feed_forward.norm.weight", L.ffn_norm)
        take(P + "attention.output_transform.weight", L.wo.weight)
        take(P + "feed_forward.hidden_transform.linear_0.weight", L.gate.weight)
        take(P + "feed_forward.hidden_transform.linear_1.weight", L.up.weight)
        take(P + "feed_forward.output_transform.weight", L.down.weight)
        if L.reuse:
            take(P + "attention.q_transform.weight", L.wq.weight)
            take(P + "attention.q_norm.query_norm.weight", L.q_norm)
        else:
            take(P + "attention.qkv_transform.fused_linear.weight", L.qkv.weight)
            take(P + "attention.qk_norm.query_norm.weight", L.q_norm)
            take(P + "attention.qk_norm.key_norm.weight", L.k_norm)
            take(P + "attention.kv_quantizer.key_quantizer.activation_post_process.range", L.kq.range)
            take(P + "attention.kv_quantizer.value_quantizer.activation_post_process.range", L.vq.range)
        for p, lo in L.lora.items():
            if p in "qkv":
                base = P + "attention.qkv_transform.adapters.base_adapter.lora_%d." % "qkv".index(p)
            else:
                base = P + _MOD[p] + ".adapters.base_adapter."
            take(base + "a_transpose", lo.a_transpose)
            take(base + "b_transpose", lo.b_transpose)
    return sorted(k for k in sd if k not in used)


# ------------------------------------------------------------------------------------------------
# compact transport of QAT weights (2-bit / 4-bit codes packed, fp16 scales)

@torch.no_grad()
def pack_model(model):
    """A dict of small tensors from which unpack_model() rebuilds the exact deployed values."""
    out = {"config": model.c.to_dict()}
    for name, m in model.named_modules():
        if isinstance(m, QWeight) and m.qat:
            codes, s16, _ = quantize_codes(m.weight, m.log_scale, m.group, m.bits)
            out[name + ".codes"] = _pack_bits(codes.cpu(), m.bits)
            out[name + ".scales"] = s16.cpu()
            out[name + ".meta"] = torch.tensor([m.weight.shape[0], m.weight.shape[1], m.bits, m.group])
        elif isinstance(m, QWeight):
            out[name + ".weight"] = m.weight.detach().float().cpu()
    if model.emb_qat:
        codes, s16, _ = quantize_codes(model.embedding, model.emb_log_scale, model.c.e_group, model.c.e_bits)
        out["embedding.codes"] = _pack_bits(codes.cpu(), model.c.e_bits)
        out["embedding.scales"] = s16.cpu()
        out["embedding.meta"] = torch.tensor([model.c.vocab, model.c.dim, model.c.e_bits, model.c.e_group])
    else:
        out["embedding.weight"] = model.embedding.detach().float().cpu()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            out[name] = p.detach().float().cpu()
    for name, b in model.named_buffers():
        if name.endswith(".range"):
            out[name] = b.detach().float().cpu()
    return out


def _pack_bits(codes, bits):
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % per))
    v = flat.reshape(-1, per).to(torch.int32)
    acc = torch.zeros(v.shape[0], dtype=torch.int32)
    for j in range(per):
        acc |= v[:, j] << (bits * j)
    return acc.to(torch.uint8)


def _unpack_bits(packed, bits, n):
    per = 8 // bits
    v = packed.to(torch.int32)
    parts = [(v >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return torch.stack(parts, 1).reshape(-1)[:n].to(torch.uint8)


@torch.no_grad()
def unpack_model(pk):
    """The model (QAT off) holding exactly the deployed values that pack_model() saw."""
    c = Config(**pk["config"])
    model = AFM(c)
    mods = dict(model.named_modules())

    def deq(prefix):
        o, i, bits, group = [int(x) for x in pk[prefix + ".meta"]]
        codes = _unpack_bits(pk[prefix + ".codes"], bits, o * i).reshape(o, i // group, group).float()
        s = pk[prefix + ".scales"].float().reshape(o, i // group, 1)
        return ((codes - (2 ** bits - 1) / 2.0) * s).reshape(o, i)

    for name, m in mods.items():
        if isinstance(m, QWeight):
            m.weight.data.copy_(deq(name) if name + ".codes" in pk else pk[name + ".weight"])
    model.embedding.data.copy_(deq("embedding") if "embedding.codes" in pk else pk["embedding.weight"])
    params = dict(model.named_parameters())
    bufs = dict(model.named_buffers())
    for k, v in pk.items():
        if k in params and params[k].dim() == 1:
            params[k].data.copy_(v)
        elif k in bufs:
            bufs[k].copy_(v)
    return model
