#!/usr/bin/env python3
"""mini_data.py - the training corpus and tokenizer of the miniature AFM family (docs/TRAINING.md).

    python3 train/mini_data.py --work /work/scratch/mini          # everything below, deterministic

Steps (each skipped when its output exists; --force redoes them):
  1. debs    apt-get download the Debian packages that hold the text (bookworm), dpkg -x them.
             Nothing else is fetched; training itself never touches the network.
  2. corpus  documents from those packages, split train / held-out by a seeded hash of the document id:
               * King James Bible (public domain): packages bible-kjv-text + bible-kjv (its `bible`
                 program decodes the compressed text), one document per chapter, one verse a line;
               * the Python 3.11 documentation (PSF License 2.0): python3.11-doc, the reST sources
                 (html/_sources/**/*.rst.txt), one document per file;
               * The Devil's Dictionary, Ambrose Bierce (public domain): dict-devil, one entry a document;
               * The Jargon File 4.4.7 (public domain): dict-jargon, one entry a document.
             -> WORK/corpus/{train,val}.jsonl  ({"src", "id", "text"} per line)
  3. tok     SentencePiece BPE (vocab 8192, byte fallback, identity normalization, AFM's special pieces
             <n> <turn_start> <turn_end> <executable_start> <executable_end> as user-defined symbols,
             ids pad 0 / unk 1 / bos 2 / eos 3) trained with sentencepiece on the train split.
             Newlines never reach SentencePiece (docs/MODEL.md section 7): text is split at newlines for training
             and "\\n" is replaced by "<n>" before encoding.
             -> WORK/tokenizer.model
  4. ids     every document encoded as [eos] + encode(text with "\\n" -> "<n>"), concatenated, uint16.
             -> WORK/gpu/{train,val}.bin, WORK/gpu/tokenizer.model, WORK/manifest.json
"""

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np

PACKAGES = ["bible-kjv", "bible-kjv-text", "python3.11-doc", "dict-devil", "dict-jargon"]
SPECIALS = ["<n>", "<turn_start>", "<turn_end>", "<executable_start>", "<executable_end>"]
VOCAB = 8192
VAL_PERMILLE = 25          # 2.5% of the documents of each source are held out
SEED = 7


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# 1. packages

def step_debs(work, force):
    debs = os.path.join(work, "debs")
    root = os.path.join(work, "root")
    if os.path.isdir(root) and not force:
        return root
    os.makedirs(debs, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    log("apt-get download %s" % " ".join(PACKAGES))
    subprocess.run(["apt-get", "download"] + PACKAGES, cwd=debs, check=True)
    versions = {}
    for f in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        subprocess.run(["dpkg", "-x", f, root], check=True)
        name = os.path.basename(f).split("_")
        versions[name[0]] = name[1].replace("%3a", ":")
    with open(os.path.join(work, "debs.json"), "w") as fh:
        json.dump(versions, fh, indent=1, sort_keys=True)
    return root


# ------------------------------------------------------------------------------------------------
# 2. documents

def kjv_docs(root):
    exe = os.path.join(root, "usr/bin/bible")
    data = os.path.join(root, "usr/lib")
    out = subprocess.run([exe, "-p", data, "gen1:1-rev22:21"], capture_output=True, check=True,
                         env=dict(os.environ, COLUMNS="100000")).stdout.decode("utf-8")
    docs, title, verses = [], None, []

    def flush():
        if title and verses:
            docs.append(("kjv", title, title + "\n\n" + "\n".join(verses) + "\n"))

    for line in out.split("\n"):
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            verses.append("%s %s" % (m.group(1), m.group(2).strip()))
        elif re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line.strip()):
            flush()
            title, verses = line.strip(), []
        else:                               # a wrapped verse continues
            verses[-1] += " " + line.strip()
    flush()
    return docs


def pydoc_docs(root):
    base = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
    docs = []
    for p in sorted(glob.glob(os.path.join(base, "**", "*.rst.txt"), recursive=True)):
        rel = os.path.relpath(p, base)
        if rel.startswith("whatsnew/changelog"):       # a long list of issue numbers: left out
            continue
        with open(p, encoding="utf-8") as fh:
            t = fh.read().replace("\r\n", "\n").replace("\t", "    ")
        t = re.sub(r"\n{3,}", "\n\n", t).strip() + "\n"
        docs.append(("pydoc", rel, t))
    return docs


def _b64(s):
    alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    v = 0
    for ch in s:
        v = v * 64 + alpha.index(ch)
    return v


def dictd_docs(root, name, src):
    with gzip.open(os.path.join(root, "usr/share/dictd/%s.dict.dz" % name)) as fh:
        data = fh.read()
    docs, seen = [], set()
    with open(os.path.join(root, "usr/share/dictd/%s.index" % name), encoding="utf-8") as fh:
        for line in fh:
            word, off, ln = line.rstrip("\n").split("\t")[:3]
            if word.startswith("00database") or (off, ln) in seen:
                continue
            seen.add((off, ln))
            t = data[_b64(off):_b64(off) + _b64(ln)].decode("utf-8", "replace")
            lines = [l.rstrip() for l in t.replace("\t", "    ").split("\n")]
            ind = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
            t = "\n".join(l[ind:] for l in lines)
            t = re.sub(r"\n{3,}", "\n\n", t).strip() + "\n"
            if len(t) > 20:
                docs.append((src, word, t))
    return docs


def is_val(src, did):
    h = hashlib.sha256(("%d:%s:%s" % (SEED, src, did)).encode()).digest()
    return int.from_bytes(h[:4], "little") % 1000 < VAL_PERMILLE


def step_corpus(work, root, force):
    cdir = os.path.join(work, "corpus")
    if os.path.isfile(os.path.join(cdir, "val.jsonl")) and not force:
        return
    os.makedirs(cdir, exist_ok=True)
    docs = kjv_docs(root) + pydoc_docs(root) + dictd_docs(root, "devil", "devil") + \
        dictd_docs(root, "jargon", "jargon")
    stats = {}
    with open(os.path.join(cdir, "train.jsonl"), "w", encoding="utf-8") as ft, \
            open(os.path.join(cdir, "val.jsonl"), "w", encoding="utf-8") as fv:
        for src, did, text in docs:
            v = is_val(src, did)
            (fv if v else ft).write(json.dumps({"src": src, "id": did, "text": text}, ensure_ascii=False) + "\n")
            s = stats.setdefault(src, {"docs": 0, "bytes": 0, "val_docs": 0, "val_bytes": 0})
            s["val_docs" if v else "docs"] += 1
            s["val_bytes" if v else "bytes"] += len(text.encode("utf-8"))
    with open(os.path.join(cdir, "stats.json"), "w") as fh:
        json.dump(stats, fh, indent=1, sort_keys=True)
    for k, s in sorted(stats.items()):
        log("corpus %-7s train %5d docs %9d bytes   val %4d docs %8d bytes"
            % (k, s["docs"], s["bytes"], s["val_docs"], s["val_bytes"]))


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(l) for l in fh]


# ------------------------------------------------------------------------------------------------
# 3. tokenizer

def step_tok(work, force):
    model = os.path.join(work, "tokenizer.model")
    if os.path.isfile(model) and not force:
        return model
    import sentencepiece as spm
    lines_path = os.path.join(work, "corpus", "spm_input.txt")
    with open(lines_path, "w", encoding="utf-8") as fh:
        for d in read_jsonl(os.path.join(work, "corpus", "train.jsonl")):
            for l in d["text"].split("\n"):
                if l.strip():
                    fh.write(l + "\n")
    spm.SentencePieceTrainer.train(
        input=lines_path, model_prefix=os.path.join(work, "tokenizer"), model_type="bpe", vocab_size=VOCAB,
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=SPECIALS, pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentencepiece_length=16,
        input_sentence_size=2000000, shuffle_input_sentence=True, seed_sentencepiece_size=1000000,
        num_threads=2, minloglevel=1)
    os.remove(lines_path)
    normalize_model(model)
    return model


def normalize_model(path):
    """Drops this machine's paths from the trainer spec stored in the model (input file, model prefix),
    so that the same corpus gives the same tokenizer.model bytes anywhere."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    with open(path, "rb") as fh:
        m.ParseFromString(fh.read())
    del m.trainer_spec.input[:]
    m.trainer_spec.input.append("corpus/spm_input.txt")
    m.trainer_spec.model_prefix = "tokenizer"
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString())


def encode_text(sp, text):
    return sp.encode(text.replace("\n", "<n>"))


def step_ids(work, force):
    gdir = os.path.join(work, "gpu")
    if os.path.isfile(os.path.join(gdir, "val.bin")) and not force:
        return
    import sentencepiece as spm
    os.makedirs(gdir, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(work, "tokenizer.model"))
    eos = sp.eos_id()
    man = {"vocab": sp.get_piece_size(), "eos": eos, "special_ids": {s: sp.piece_to_id(s) for s in SPECIALS}}
    for split in ("train", "val"):
        docs = read_jsonl(os.path.join(work, "corpus", split + ".jsonl"))
        enc = sp.encode([d["text"].replace("\n", "<n>") for d in docs], num_threads=os.cpu_count() or 1)
        ids, nbytes, per_src = [], 0, {}
        for d, e in zip(docs, enc):
            ids.append(eos)
            ids.extend(e)
            b = len(d["text"].encode("utf-8"))
            nbytes += b
            ps = per_src.setdefault(d["src"], [0, 0])
            ps[0] += len(e) + 1
            ps[1] += b
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(os.path.join(gdir, split + ".bin"))
        man[split] = {"tokens": int(arr.size), "bytes": nbytes, "docs": len(docs), "per_source_tokens_bytes": per_src,
                      "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        log("ids %-5s %9d tokens from %9d bytes (%.2f bytes/token)" % (split, arr.size, nbytes, nbytes / arr.size))
    with open(os.path.join(work, "tokenizer.model"), "rb") as fh:
        tb = fh.read()
    with open(os.path.join(gdir, "tokenizer.model"), "wb") as fh:
        fh.write(tb)
    man["tokenizer_sha256"] = hashlib.sha256(tb).hexdigest()
    if os.path.isfile(os.path.join(work, "debs.json")):
        with open(os.path.join(work, "debs.json")) as fh:
            man["debian_packages"] = json.load(fh)
    with open(os.path.join(work, "manifest.json"), "w") as fh:
        json.dump(man, fh, indent=1, sort_keys=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scratch/mini")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    root = step_debs(a.work, a.force)
    step_corpus(a.work, root, a.force)
    step_tok(a.work, a.force)
    step_ids(a.work, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
