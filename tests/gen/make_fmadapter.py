#!/usr/bin/env python3
"""make_fmadapter.py - write a `.fmadapter` package from a toolkit adapter checkpoint, applying the
transforms of Apple's toolkit exporter (export/export_utils.py AdapterConverter), for tests.

    python3 tests/gen/make_fmadapter.py adapter.pt --base toolkit.afm -o out/test.fmadapter --name test

What the exporter does, and this script does the same way (with torch, independently of
convert_adapter.py, so that the two routes check each other):
  * takes every checkpoint entry whose key contains "adapter" (here: of one adapter name, --adapter);
  * transposes each: a_transpose [in, r] -> A [r, in], b_transpose [r, out] -> B [out, r];
  * permutes the rows of B GPT-J -> NeoX within each head, `w.view(heads, rows // heads // 2, 2, r)
    .transpose(1, 2).reshape(rows, r)`, for `lora_0.b_transpose` of qkv_transform (query heads),
    `lora_1.b_transpose` (KV heads) and the segment-1 `q_transform` b_transpose (query heads); V
    (lora_2) and every other B are not permuted; alpha is not folded in;
  * casts to fp16 and writes Core ML blob storage v2 (adapter_weights.bin; see adapterfile.py);
  * metadata.json: camelCase keys, sorted, indent 4 (adapterIdentifier `fmadapter-<name>-<first 7
    signature digits>`, author, baseModelSignature, creatorDefined, description, license, loraRank,
    speculativeDecodingDraftTokenCount).
The exporter writes records in the checkpoint's key order and hard-codes AFMTextV7's sizes (16 heads,
2 KV heads, 2048 / 256 rows, loraRank 32); here the sizes come from --base and loraRank is the
tensors' rank. Records are written in the order of docs/MODEL.md section 6.2 (layer by layer; q, k, v or wq,
wo, gate, up, down; a then b), which is the module order of a tamm state dict; --checkpoint-order
writes them in the checkpoint's key order instead, exactly as the exporter (and warns when that differs).
"""

import argparse
import os
import re
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import adapterfile as adf  # noqa: E402
import afmfile as af  # noqa: E402

_KEY = re.compile(r"^layers\.segment_(\d+)\.layer_(\d+)\.(.+?)\.adapters\.([^.]+)\.(?:lora_(\d)\.)?([ab])_transpose$")
_PROJ = {"attention.qkv_transform": None, "attention.q_transform": "wq", "attention.output_transform": "wo",
         "feed_forward.hidden_transform.linear_0": "gate", "feed_forward.hidden_transform.linear_1": "up",
         "feed_forward.output_transform": "down"}


def permute_qk(w, n_heads, dim1, dim2):
    """The exporter's _permute_qk: GPT-J (interleaved) rows -> GPT-NeoX (half-split) rows."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def export(ckpt_path, base_cfg, name, out_dir, adapter=None, signature=adf.APPLE_SIGNATURE, author="3P developer",
           description="", license="", draft_tokens=5, checkpoint_order=False, verbose=True):
    import torch
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    n0 = base_cfg["n_layers"] - base_cfg["n_reuse_layers"]
    nh, nkv, hd = base_cfg["n_heads"], base_cfg["n_kv_heads"], base_cfg["head_dim"]
    picked = []
    names = set()
    for k, v in sd.items():
        if "adapter" not in k:
            continue
        nk = k[len("model."):] if k.startswith("model.") else k
        nk = re.sub(r"\.(?:_?wrapped)(?=\.)", "", nk)
        m = _KEY.match(nk)
        if not m:
            raise SystemExit("error: %s: adapter key %s is not of a known form" % (ckpt_path, k))
        names.add(m.group(4))
        if adapter is not None and m.group(4) != adapter:
            continue
        seg, j, mod, lora, ab = int(m.group(1)), int(m.group(2)), m.group(3), m.group(5), m.group(6)
        proj = _PROJ.get(mod, "?")
        if proj is None:
            proj = "qkv"[int(lora)]
        if proj == "?":
            raise SystemExit("error: %s: unknown module in %s" % (ckpt_path, k))
        i = j if seg == 0 else n0 + j
        # the exporter's transforms, in its words
        t = v.t()
        if "q_transform" in nk and "segment_1" in nk and "b_transpose" in nk:
            t = permute_qk(t, nh, nh * hd, t.shape[1])
        elif "qkv_transform" in nk and "lora_0.b_transpose" in nk:
            t = permute_qk(t, nh, nh * hd, t.shape[1])
        elif "qkv_transform" in nk and "lora_1.b_transpose" in nk:
            t = permute_qk(t, nkv, nkv * hd, t.shape[1])
        picked.append(("l%d.%s.lora_%s" % (i, proj, ab), t))
    if adapter is None and len(names) > 1:
        raise SystemExit("error: %s: several adapters (%s): choose one with --adapter" % (ckpt_path, ", ".join(sorted(names))))
    if not picked:
        raise SystemExit("error: %s: no adapter tensors" % ckpt_path)
    rank = int(picked[0][1].shape[0])
    specs = adf.fmadapter_specs(base_cfg, rank)
    got = dict(picked)
    if len(got) != len(picked) or set(got) != {n for n, _ in specs}:
        raise SystemExit("error: the checkpoint's adapter tensors do not match the base: missing %s, extra %s"
                         % (sorted({n for n, _ in specs} - set(got)), sorted(set(got) - {n for n, _ in specs})))
    for n, sh in specs:
        if tuple(got[n].shape) != tuple(sh):
            raise SystemExit("error: %s: shape %s, expected %s" % (n, tuple(got[n].shape), sh))
    order = [n for n, _ in picked] if checkpoint_order else [n for n, _ in specs]
    if checkpoint_order and order != [n for n, _ in specs] and verbose:
        print("warning: the checkpoint's order differs from docs/MODEL.md section 6.2; afm.h will refuse this package")
    arrays = []
    for n in order:
        a = got[n].detach().to(torch.float32).numpy()
        h = a.astype(np.float16)
        if (np.isinf(h) & np.isfinite(a)).any():
            raise SystemExit("error: %s: values beyond the fp16 range" % n)
        arrays.append(h)
    md = adf.make_metadata(name, rank, signature, author=author, description=description, license=license,
                           draft_token_count=draft_tokens)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    layout = adf.write_fmadapter(out_dir, md, arrays)
    if verbose:
        nbytes = os.path.getsize(os.path.join(out_dir, "adapter_weights.bin"))
        print("wrote %s: %s, rank %d, %d records, adapter_weights.bin %d bytes"
              % (out_dir, md["adapterIdentifier"], rank, len(layout), nbytes))
    return md, arrays


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a .fmadapter package from a toolkit adapter checkpoint "
                                             "(the toolkit exporter's transforms).")
    ap.add_argument("checkpoint")
    ap.add_argument("--base", required=True, help="base model .afm (head counts and shapes)")
    ap.add_argument("-o", "--output", required=True, help="output NAME.fmadapter directory (replaced)")
    ap.add_argument("--name", help="adapter name (default: the output folder's stem)")
    ap.add_argument("--adapter", help="which adapters.<NAME> of the checkpoint (when several)")
    ap.add_argument("--signature", default=adf.APPLE_SIGNATURE, help="baseModelSignature (default: the exporter's)")
    ap.add_argument("--author", default="3P developer")
    ap.add_argument("--description", default="")
    ap.add_argument("--license", default="")
    ap.add_argument("--draft-tokens", type=int, default=5)
    ap.add_argument("--checkpoint-order", action="store_true", help="records in the checkpoint's key order")
    a = ap.parse_args(argv)
    try:
        base = af.read_model(a.base).config
        name = a.name or os.path.basename(a.output.rstrip("/")).split(".")[0]
        export(a.checkpoint, base, name, a.output, a.adapter, a.signature, a.author, a.description, a.license,
               a.draft_tokens, a.checkpoint_order)
    except (af.AfmError, OSError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
