"""Quantized weight types of the afm file format (codes 16-18), numpy only.

Pure functions for the model converter (tools/afmfile.py calls these; nothing here touches files):

    data = quantize_q2b(w, group=64)          # bytes, exactly type_size(TYPE_Q2B, rows, cols, group) long
    data = quantize_q4(w, group=64)
    data = quantize_q8(w, group=64)
    data, st = quantize(TYPE_Q2B, w, group, return_stats=True)   # st: error statistics (Stats)
    w2 = dequantize(TYPE_Q2B, data, rows, cols, group)           # float32, bit-exact to afm.h's decode
    report = grid_report(w)                   # is w already on a balanced 2-bit grid, and at which group?

`w` is a 2-D array [rows, cols] (an nn.Linear weight [out, in], or the embedding [vocab, d]) of
float32/float16/float64; higher-dimensional arrays are flattened to [prod(leading dims), last dim].

Layouts (docs/FORMAT.md, section "Quantized types"):
  * every row is padded with zero codes to kpad = a multiple of max(unit, group) elements,
    unit = 256 (Q2B), 128 (Q4), 64 (Q8); group is 64, 128, 256 or 512;
  * the tensor is the codes of all rows (row after row), then the fp16 scales of all rows
    (row r's kpad/group scales after row r-1's);
  * Q2B: 64-byte blocks of 256 weights, byte j holds weights j, j+64, j+128, j+192 in bits 0-1, 2-3,
    4-5, 6-7; weight = (c - 1.5) * scale.
  * Q4: 64-byte blocks of 128 weights, byte j holds weight j in bits 0-3 and j+64 in bits 4-7;
    weight = (c - 7.5) * scale.
  * Q8: one signed byte per weight, c in -127..127; weight = c * scale.
The decode is float32 arithmetic: float(c - off) * float(scale_fp16), one rounding.

Encoders: per group, the MSE-optimal scale for the type's uniform grid (Lloyd iteration: nearest
level assignment <-> least-squares scale, from several starting points, keep the best), rounded to
fp16 by trying the nearest fp16 values and re-assigning codes; groups that already lie exactly on a
grid whose scale is an fp16 number are detected and encoded exactly (decode(encode(w)) == w bit for bit).
"""

import numpy as np

TYPE_Q2B, TYPE_Q4, TYPE_Q8 = 16, 17, 18
TYPE_NAMES = {TYPE_Q2B: "Q2B", TYPE_Q4: "Q4", TYPE_Q8: "Q8"}
TYPE_BY_NAME = {"q2b": TYPE_Q2B, "q4": TYPE_Q4, "q8": TYPE_Q8}
GROUPS = (64, 128, 256, 512)
_UNIT = {TYPE_Q2B: 256, TYPE_Q4: 128, TYPE_Q8: 64}
_BITS = {TYPE_Q2B: 2, TYPE_Q4: 4, TYPE_Q8: 8}
_NLEV = {TYPE_Q2B: 4, TYPE_Q4: 16}                    # balanced grids: levels c - (n-1)/2, c = 0..n-1
_OFF = {TYPE_Q2B: np.float32(1.5), TYPE_Q4: np.float32(7.5), TYPE_Q8: np.float32(0.0)}
_CHUNK = 1 << 20                                      # elements per encoding batch (memory bound)


class QuantError(ValueError):
    pass


def _type(t):
    if isinstance(t, str):
        if t.lower() not in TYPE_BY_NAME:
            raise QuantError("unknown quantized type %r (q2b, q4 or q8)" % t)
        return TYPE_BY_NAME[t.lower()]
    if t not in TYPE_NAMES:
        raise QuantError("unknown quantized type code %r" % (t,))
    return t


def _check_group(group):
    if group not in GROUPS:
        raise QuantError("group size %r not supported (one of %s)" % (group, ", ".join(map(str, GROUPS))))


def row_pad(t, cols, group):
    """Padded row length in elements."""
    t = _type(t)
    _check_group(group)
    u = max(_UNIT[t], group)
    return (int(cols) + u - 1) // u * u


def type_size(t, rows, cols, group):
    """Exact byte size of a [rows, cols] tensor of quantized type t (the directory's size check)."""
    t = _type(t)
    kpad = row_pad(t, cols, group)
    return int(rows) * (kpad * _BITS[t] // 8 + kpad // group * 2)


class Stats:
    """Error of one quantized tensor."""

    def __init__(self):
        self.n = 0
        self.sq_err = 0.0       # sum (w - dq)^2
        self.sq_w = 0.0         # sum w^2
        self.max_abs = 0.0
        self.groups = 0
        self.exact_groups = 0   # encoded bit-exactly (on an fp16-scaled grid)
        self.grid_not_f16 = 0   # on a grid whose f32 scale is not an fp16 number (encoded approximately)
        self.clipped_scales = 0 # scales beyond the fp16 range (clamped)

    def add(self, w, dq):
        d = (w.astype(np.float64) - dq.astype(np.float64))
        self.n += w.size
        self.sq_err += float(np.sum(d * d))
        self.sq_w += float(np.sum(w.astype(np.float64) ** 2))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    @property
    def rel_rmse(self):
        return float(np.sqrt(self.sq_err / self.sq_w)) if self.sq_w > 0 else 0.0

    @property
    def snr_db(self):
        if self.sq_err == 0:
            return float("inf")
        return float(10 * np.log10(self.sq_w / self.sq_err)) if self.sq_w > 0 else float("-inf")

    def line(self, name=""):
        return ("%-40s rel.rmse %.5f  snr %6.2f dB  max|err| %.3g  exact groups %d/%d%s%s" %
                (name, self.rel_rmse, self.snr_db, self.max_abs, self.exact_groups, self.groups,
                 ("  on-grid-but-scale-not-fp16 %d" % self.grid_not_f16) if self.grid_not_f16 else "",
                 ("  scales-clamped %d" % self.clipped_scales) if self.clipped_scales else ""))


# ---------------------------------------------------------------------------------------------
# per-group encoding on [G, g] float32 arrays

def _assign(x, s, t):
    """Nearest codes for values x [G, g] under scales s [G] (s > 0)."""
    y = x / s[:, None]
    if t == TYPE_Q8:
        return np.clip(np.rint(y), -127, 127)
    n = _NLEV[t]
    return np.clip(np.floor(y + n / 2), 0, n - 1)


def _levels(c, t):
    return c - _OFF[t] if t != TYPE_Q8 else c


def _decode_f32(c, s16, t):
    """afm.h's decode: float32(c - off) * float32(scale) with one rounding."""
    lv = _levels(c.astype(np.float32), t).astype(np.float32)
    return lv * s16.astype(np.float32)[:, None]


def _lloyd(x, s, t, iters=25):
    """Alternate nearest-level assignment and least-squares scale, per group, until the codes stop
    changing (groups that have converged drop out). Returns (s, sse) as float64 arrays [G]."""
    s = np.asarray(s, np.float64).copy()
    idx = np.arange(x.shape[0])
    c_prev = None
    for _ in range(iters):
        xa = x[idx]
        c = _assign(xa, np.maximum(s[idx], 1e-30).astype(np.float32), t)
        if c_prev is not None:
            moved = np.any(c != c_prev, axis=1)
            idx, xa, c = idx[moved], xa[moved], c[moved]
            if not idx.size:
                break
        lv = _levels(c, t).astype(np.float32)
        num = np.einsum("ij,ij->i", xa, lv, dtype=np.float64)
        den = np.einsum("ij,ij->i", lv, lv, dtype=np.float64)
        sn = np.where(den > 0, num / np.maximum(den, 1e-300), s[idx])
        s[idx] = np.where(sn > 0, sn, s[idx])
        c_prev = c
    c = _assign(x, np.maximum(s, 1e-30).astype(np.float32), t)
    err = x.astype(np.float64) - _levels(c, t).astype(np.float64) * s[:, None]
    return s, np.einsum("ij,ij->i", err, err)


_F16_MAX = 65504.0
_F16_MIN_SUB = 2.0 ** -24


def _f16_neighbors(s):
    """The fp16 value nearest to s and the next fp16 values below and above (as float32 arrays)."""
    h = np.clip(s, 0, _F16_MAX).astype(np.float16)
    b = h.view(np.uint16).astype(np.int32)
    lo = np.clip(b - 1, 0, 0x7bff).astype(np.uint16).view(np.float16)
    hi = np.clip(b + 1, 0, 0x7bff).astype(np.uint16).view(np.float16)
    return [h, lo, hi]


def _encode_groups(x, t, st):
    """x: [G, g] float32 -> (codes [G, g] int, scales fp16 [G])."""
    G = x.shape[0]
    ax = np.abs(x)
    amax = np.max(ax, axis=1).astype(np.float64)
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1))
    s16 = np.zeros(G, np.float16)
    codes = np.zeros(x.shape, np.int32)
    done = amax == 0
    # all-zero groups: scale 0, a code that decodes to +0.0 / -0.0 as the input
    if np.any(done):
        z = np.nonzero(done)[0]
        if t == TYPE_Q8:
            codes[z] = 0
        else:
            codes[z] = np.where(np.signbit(x[z]), _NLEV[t] // 2 - 1, _NLEV[t] // 2)
    exact = np.zeros(G, bool)
    on_f32 = np.zeros(G, bool)
    # 1. exact grids: candidate scales from the smallest magnitude (or the largest for Q8)
    todo = np.nonzero(~done)[0]
    if todo.size:
        xs = x[todo]
        if t == TYPE_Q8:
            cands = [amax[todo] / 127.0]
        else:
            amin = np.min(np.abs(xs), axis=1).astype(np.float64)
            n = _NLEV[t]
            cands = [2.0 * amin / (2 * k + 1) for k in range(n // 2)] + [2.0 * amax[todo] / (n - 1)]
        for cs in cands:
            rem = ~exact[todo]
            if not np.any(rem):
                break
            idx = todo[rem]
            sc = cs[rem]
            h = np.clip(sc, 0, _F16_MAX).astype(np.float16)
            hf = h.astype(np.float32)
            good = (sc > 0) & (sc <= _F16_MAX) & (hf > 0)
            c = _assign(x[idx], np.where(good, hf, 1).astype(np.float32), t)
            dq = _decode_f32(c, h, t)
            eq = np.all(dq == x[idx], axis=1) & np.all(np.signbit(dq) == np.signbit(x[idx]), axis=1) & good
            if np.any(eq):
                e = idx[eq]
                exact[e] = True
                s16[e] = h[eq]
                codes[e] = c[eq].astype(np.int32)
            # on a grid in f32 arithmetic, whatever the scale's precision
            s32 = sc.astype(np.float32)
            c32 = _assign(x[idx], np.where(s32 > 0, s32, 1).astype(np.float32), t)
            on = np.all(_levels(c32.astype(np.float32), t).astype(np.float32) * s32[:, None] == x[idx], axis=1) & (s32 > 0)
            on_f32[idx[on]] = True
    st.grid_not_f16 += int(np.sum(on_f32 & ~exact))
    st.exact_groups += int(np.sum(exact))
    # 2. MSE-optimal scales for the rest (Lloyd from several starting points)
    rest = np.nonzero(~done & ~exact)[0]
    if rest.size:
        xr = x[rest]
        a = amax[rest]
        r = rms[rest]
        if t == TYPE_Q2B:
            inits = [a / 1.5, a / 2.0, a / 2.5, r * 0.996]
        elif t == TYPE_Q4:
            inits = [a / 7.5, a / 6.5, a / 5.5, r * 0.335]
        else:
            inits = [a / 127.0, a / 120.0]
        best_s, best_e = None, None
        for s0 in inits:
            s, e = _lloyd(xr, np.maximum(s0, 1e-30), t)
            if best_s is None:
                best_s, best_e = s, e
            else:
                better = e < best_e
                best_s = np.where(better, s, best_s)
                best_e = np.where(better, e, best_e)
        st.clipped_scales += int(np.sum(best_s > _F16_MAX))
        # 3. the stored scale is fp16: try the nearest fp16 values, re-assign, keep the best
        x64 = xr.astype(np.float64)
        best_h, best_c, best_err = None, None, None
        for h in _f16_neighbors(best_s):
            hf = h.astype(np.float32)
            c = _assign(xr, np.where(hf > 0, hf, np.float32(_F16_MIN_SUB)), t)
            dq = _decode_f32(c, h, t).astype(np.float64)
            err = np.sum((x64 - dq) ** 2, axis=1)
            if best_h is None:
                best_h, best_c, best_err = h.copy(), c, err
            else:
                b = err < best_err
                best_h = np.where(b, h, best_h)
                best_c = np.where(b[:, None], c, best_c)
                best_err = np.where(b, err, best_err)
        s16[rest] = best_h
        codes[rest] = best_c.astype(np.int32)
    return codes, s16


def _as_2d(w):
    w = np.asarray(w)
    if w.ndim == 1:
        w = w[None, :]
    elif w.ndim > 2:
        w = w.reshape(-1, w.shape[-1])
    if w.dtype not in (np.float32, np.float16, np.float64):
        raise QuantError("unsupported dtype %s" % w.dtype)
    if w.size and not np.all(np.isfinite(w)):
        raise QuantError("weights contain NaN or infinity")
    return w


def _pack(codes, t, kpad):
    """codes [R, kpad] (ints in the type's range) -> bytes array [R, kpad * bits / 8]."""
    R = codes.shape[0]
    if t == TYPE_Q2B:
        c = codes.astype(np.uint8).reshape(R, kpad // 256, 4, 64)
        b = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
        return b.reshape(R, kpad // 4)
    if t == TYPE_Q4:
        c = codes.astype(np.uint8).reshape(R, kpad // 128, 2, 64)
        b = c[:, :, 0] | (c[:, :, 1] << 4)
        return b.reshape(R, kpad // 2)
    return codes.astype(np.int8).view(np.uint8).reshape(R, kpad)


def _unpack(b, t, kpad):
    """bytes array [R, row_bytes] -> codes [R, kpad] (int32)."""
    R = b.shape[0]
    if t == TYPE_Q2B:
        v = b.reshape(R, kpad // 256, 1, 64)
        c = (v >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3
        return c.reshape(R, kpad).astype(np.int32)
    if t == TYPE_Q4:
        v = b.reshape(R, kpad // 128, 1, 64)
        c = (v >> np.array([0, 4], np.uint8)[None, None, :, None]) & 15
        return c.reshape(R, kpad).astype(np.int32)
    return b.view(np.int8).reshape(R, kpad).astype(np.int32)


def quantize_parts(t, w, group=64, stats=None):
    """(codes [rows, row_bytes] uint8, scales [rows, kpad/group] float16) of w; for writers that
    stream: the file holds all codes rows, then all scales rows (see quantize())."""
    t = _type(t)
    _check_group(group)
    w = _as_2d(w)
    rows, cols = w.shape
    kpad = row_pad(t, cols, group)
    ng = kpad // group
    st = stats if stats is not None else Stats()
    out_codes = np.zeros((rows, kpad * _BITS[t] // 8), np.uint8)
    out_scales = np.zeros((rows, ng), np.float16)
    step = max(1, _CHUNK // max(kpad, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = np.zeros((r1 - r0, kpad), np.float32)
        x[:, :cols] = w[r0:r1].astype(np.float32)
        # groups that lie entirely in the padding are all-zero: scale 0
        xg = x.reshape(-1, group)
        # the real (unpadded) part of the last group is what counts for exactness; padding is 0
        # and 0 cannot be on a balanced grid, so encode the real elements only
        real = np.zeros((r1 - r0, kpad), bool)
        real[:, :cols] = True
        realg = real.reshape(-1, group)
        full = np.all(realg, axis=1)
        codes = np.zeros(xg.shape, np.int32)
        s16 = np.zeros(xg.shape[0], np.float16)
        if np.any(full):
            c, s = _encode_groups(xg[full], t, st)
            codes[full] = c
            s16[full] = s
        part = np.nonzero(~full & np.any(realg, axis=1))[0]
        for gi in part:  # at most one per row: the last real group
            n = int(np.sum(realg[gi]))
            c, s = _encode_groups(xg[gi:gi + 1, :n], t, st)
            codes[gi, :n] = c[0]
            s16[gi] = s[0]
        st.groups += int(np.sum(full)) + len(part)
        codes = codes.reshape(r1 - r0, kpad)
        codes[~real] = 0
        out_codes[r0:r1] = _pack(codes, t, kpad)
        out_scales[r0:r1] = s16.reshape(r1 - r0, ng)
        dq = _decode_f32(codes.reshape(-1, group), s16, t).reshape(r1 - r0, kpad)[:, :cols]
        st.add(w[r0:r1].astype(np.float32), dq)
    return out_codes, out_scales


def quantize(t, w, group=64, return_stats=False):
    """The tensor's bytes in the file (codes of all rows, then fp16 scales of all rows)."""
    st = Stats()
    codes, scales = quantize_parts(t, w, group, st)
    data = codes.tobytes() + scales.astype("<f2").tobytes()
    return (data, st) if return_stats else data


def quantize_q2b(w, group=64):
    """2-bit balanced: (c - 1.5) * scale. Returns bytes."""
    return quantize(TYPE_Q2B, w, group)


def quantize_q4(w, group=64):
    """4-bit balanced: (c - 7.5) * scale. Returns bytes."""
    return quantize(TYPE_Q4, w, group)


def quantize_q8(w, group=64):
    """8-bit symmetric: c * scale, c in -127..127. Returns bytes."""
    return quantize(TYPE_Q8, w, group)


def dequantize(t, data, rows, cols, group=64):
    """float32 [rows, cols], bit-exact to afm.h's dequantization."""
    t = _type(t)
    kpad = row_pad(t, cols, group)
    rb = kpad * _BITS[t] // 8
    ng = kpad // group
    buf = np.frombuffer(data, np.uint8)
    if buf.size != type_size(t, rows, cols, group):
        raise QuantError("%s [%d, %d] group %d: %d bytes, expected %d" %
                         (TYPE_NAMES[t], rows, cols, group, buf.size, type_size(t, rows, cols, group)))
    codes = _unpack(buf[:rows * rb].reshape(rows, rb), t, kpad)
    scales = buf[rows * rb:].view("<f2").reshape(rows, ng)
    dq = _decode_f32(codes.reshape(-1, group), scales.reshape(-1), t)
    return dq.reshape(rows, kpad)[:, :cols]


def grid_report(w, groups=GROUPS, t=TYPE_Q2B):
    """For each group size (and 'row' = one scale per row, when the row length allows it): the
    fraction of groups whose values lie exactly on a balanced grid of the type with an fp16 scale.
    Returns a list of (group, exact_fraction, on_grid_f32_fraction)."""
    w = _as_2d(w).astype(np.float32)
    out = []
    for g in groups:
        if w.shape[1] % g:
            continue
        st = Stats()
        x = w.reshape(-1, g)
        step = max(1, _CHUNK // g)
        for i in range(0, x.shape[0], step):
            _exact_only(x[i:i + step], t, st)
        out.append((g, st.exact_groups / max(1, st.groups), (st.exact_groups + st.grid_not_f16) / max(1, st.groups)))
    return out


def _exact_only(x, t, st):
    """Counts the groups of x [G, g] that lie exactly on a grid (fp16 scale / any f32 scale)."""
    st.groups += x.shape[0]
    zero = np.max(np.abs(x), axis=1) == 0
    st.exact_groups += int(np.sum(zero))
    x = x[~zero]
    if not x.size:
        return
    amin = np.min(np.abs(x), axis=1).astype(np.float64)
    amax = np.max(np.abs(x), axis=1).astype(np.float64)
    n = _NLEV.get(t, 255)
    cands = [amax / 127.0] if t == TYPE_Q8 else [2.0 * amin / (2 * k + 1) for k in range(n // 2)] + [2.0 * amax / (n - 1)]
    ex = np.zeros(x.shape[0], bool)
    on = np.zeros(x.shape[0], bool)
    for cs in cands:
        h = np.clip(cs, 0, _F16_MAX).astype(np.float16)
        good = (cs > 0) & (cs <= _F16_MAX) & (h.astype(np.float32) > 0)
        c = _assign(x, np.where(good, h.astype(np.float32), 1).astype(np.float32), t)
        ex |= good & np.all(_decode_f32(c, h, t) == x, axis=1)
        s32 = cs.astype(np.float32)
        c32 = _assign(x, np.where(s32 > 0, s32, 1).astype(np.float32), t)
        on |= (s32 > 0) & np.all(_levels(c32.astype(np.float32), t).astype(np.float32) * s32[:, None] == x, axis=1)
    st.exact_groups += int(np.sum(ex))
    st.grid_not_f16 += int(np.sum(on & ~ex))
