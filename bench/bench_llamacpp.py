#!/usr/bin/env python3
"""bench_llamacpp.py - afm and llama.cpp side by side: same matrix shapes, same machine, same run.

Builds llama.cpp from source in a work directory outside the repository (nothing of llama.cpp is
ever committed), writes a Llama-architecture GGUF with random weights and the matrix shapes of the
afm model being measured (read from `afm info`), quantizes it with llama-quantize to llama.cpp's
2-bit types (TQ2_0 and Q2_K by default), then runs `afm bench` and `llama-bench` interleaved, per
thread count and round, and prints both with the ratios afm / llama.cpp.

    python3 bench/bench_llamacpp.py --afm base-q2b.afm            # an existing afm model
    python3 bench/bench_llamacpp.py --synth f16                   # make one with tools/synth.py
    python3 bench/bench_llamacpp.py --synth f16 --llama-types tq2_0,q2_k,f16 --rounds 2

How the two sides are measured (each median of --reps runs, then median over --rounds):
  afm        afm bench MODEL -t T -p P -n N -r R: prefill P tokens, then decode N tokens after them.
  llama.cpp  llama-bench -t T -p P -n 0 -r R               (prefill, "pp")
             llama-bench -t T -p 0 -n N -d P -r R          (decode N tokens at depth P, "tg"), so the
             decode attends over the same P..P+N positions as afm's; median of llama-bench's own
             per-run samples (-o json). llama-bench does one untimed warm-up per invocation.

llama.cpp source (--llama-src): a llama.cpp tree, a git directory (bare or not; --llama-ref picks the
commit), or a llama-cpp-python sdist .tar.gz (its vendor/llama.cpp). Without it the script reuses
the tree already in --work, else downloads the llama-cpp-python sdist with pip (the newest, or
--llama-cpp-python-version) and builds its vendored llama.cpp; the commit is read from the sdist's
CHANGELOG (or git) and printed. Build: cmake Release, GGML_NATIVE=ON, LLAMA_CURL=OFF, targets
llama-bench and llama-quantize only (about 20-40 minutes on 2 busy cores; reused afterwards).

Quantization recipes (--recipe):
  matched  llama-quantize --pure --token-embedding-type q4_K: every matrix in the 2-bit type and the
           tied embedding/output head in 4 bits, the same layout as afm's 2-bit model (4-bit head).
  default  llama-quantize's own mixture (what its users get): for Q2_K it raises attn_v and
           ffn_down to Q3_K/Q4_K and the head to Q6_K; for TQ2_0 the tied head becomes Q6_K.
  both     both of the above.

Everything big (source, build, GGUFs, synthetic afm models) lives in --work (default
/tmp/afm-llamacpp-bench); files are reused when present. --json FILE saves the raw results.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ggml type ids and their block geometry: (block elements, block bytes)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
              14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66)}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("+ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def out_of(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.PIPE, text=True, **kw).stdout


# ---------------------------------------------------------------- afm side

def afm_binary(args):
    if args.afm_bin:
        return os.path.abspath(args.afm_bin)
    run(["make", "-C", REPO, "-s", "afm"])
    return os.path.join(REPO, "afm")


def afm_model(args, work):
    if args.afm:
        return os.path.abspath(args.afm)
    path = os.path.join(work, "afm-base-%s.afm" % args.synth)
    if not os.path.exists(path):
        tmp = path + ".part"
        try:
            run([sys.executable, os.path.join(REPO, "tools", "synth.py"), "--preset", "base", "--type", args.synth,
                 "-q", "-o", tmp])
        except subprocess.CalledProcessError:
            sys.exit("tools/synth.py could not make a base model of type %r (see python3 tools/synth.py --help)"
                     % args.synth)
        os.replace(tmp, path)
    return path


def afm_config(afm, model):
    """Shapes and weight types of an afm model, from `afm info` (so any type afm reads works)."""
    text = out_of([afm, "info", model])
    cfg = {}
    pats = {"vocab": r"vocab_size (\d+)", "dim": r"dim (\d+)", "layers": r"layers (\d+)",
            "reuse": r"KV reuse: (\d+)", "heads": r"heads (\d+) x", "head_dim": r"heads \d+ x (\d+)",
            "kv_heads": r"KV heads (\d+)", "ffn": r"FFN (\d+)", "context": r"context (\d+)",
            "rope_theta": r"RoPE theta ([0-9.e+-]+)", "norm_eps": r"norm eps ([0-9.e+-]+)"}
    for k, p in pats.items():
        m = re.search(p, text)
        if not m:
            sys.exit("cannot read %s from `afm info %s`:\n%s" % (k, model, text))
        cfg[k] = float(m.group(1)) if k in ("rope_theta", "norm_eps") else int(m.group(1))
    types = []
    m = re.search(r"bytes by type:\n((?:  .*\n?)*)", text)
    if m:
        for line in m.group(1).splitlines():
            f = line.split()
            if len(f) >= 2:
                types.append(f[0])
    cfg["types"] = types
    return cfg


def parse_afm_bench(text):
    rows = {}
    for line in text.splitlines():
        f = line.split()
        # threads, prefill, decode, MB/tok, achieved GB/s, probe GB/s (same threads), % probe,
        # saturated (all-core) GB/s, % saturated, peak RSS MB
        if len(f) >= 10 and f[0].isdigit() and f[1].replace(".", "", 1).isdigit():  # not "16 threads (all...)"
            rows[int(f[0])] = {"pp": float(f[1]), "tg": float(f[2]), "mb_per_tok": float(f[3]),
                               "achieved_gbs": float(f[4]), "read_gbs": float(f[5]),
                               "pct_probe": float(f[6].rstrip("%")), "saturated_gbs": float(f[7]),
                               "pct_saturated": float(f[8].rstrip("%")), "rss_mb": float(f[9])}
    return rows


# ---------------------------------------------------------------- llama.cpp source and build

def git_dir_of(path):
    if os.path.isdir(os.path.join(path, "objects")) and os.path.exists(os.path.join(path, "HEAD")):
        return path
    if os.path.isdir(os.path.join(path, ".git")):
        return os.path.join(path, ".git")
    return None


def extract_sdist(tgz, src):
    """vendor/llama.cpp of a llama-cpp-python sdist into src; returns the commit its CHANGELOG names."""
    commit = "unknown"
    tmp = src + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with tarfile.open(tgz) as tf:
        members, top = [], None
        for m in tf.getmembers():
            parts = m.name.split("/", 1)
            top = parts[0]
            if len(parts) == 2 and (parts[1].startswith("vendor/llama.cpp/") or parts[1] == "CHANGELOG.md"):
                members.append(m)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp, members=members, **kw)
    vendor = os.path.join(tmp, top, "vendor", "llama.cpp")
    if not os.path.exists(os.path.join(vendor, "CMakeLists.txt")):
        sys.exit("%s has no vendor/llama.cpp" % tgz)
    cl = os.path.join(tmp, top, "CHANGELOG.md")
    if os.path.exists(cl):
        m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", open(cl, encoding="utf-8").read())
        if m:
            commit = "ggml-org/llama.cpp@%s (vendored by %s)" % (m.group(1), os.path.basename(tgz))
    if os.path.exists(os.path.join(vendor, ".git")):
        os.remove(os.path.join(vendor, ".git"))  # a submodule pointer to nowhere
    shutil.rmtree(src, ignore_errors=True)
    os.replace(vendor, src)
    shutil.rmtree(tmp, ignore_errors=True)
    return commit


def llama_source(args, work):
    """A llama.cpp tree in work/llama.cpp; returns (path, commit description)."""
    src = os.path.join(work, "llama.cpp")
    stamp = os.path.join(work, "llama.cpp.commit")
    if args.llama_src:
        given = os.path.abspath(args.llama_src)
        gd = git_dir_of(given) if os.path.isdir(given) else None
        if gd:
            commit = out_of(["git", "--git-dir", gd, "rev-parse", args.llama_ref + "^{commit}"]).strip()
            if not (os.path.exists(stamp) and open(stamp).read().strip().startswith(commit)):
                shutil.rmtree(src, ignore_errors=True)
                os.makedirs(src)
                # a mirror may lack its largest blobs (vocab GGUFs under models/): leave out what is absent
                tree = out_of(["git", "--git-dir", gd, "ls-tree", "-r", "-z", commit]).split("\0")
                blobs = [(e.split()[2], e.split("\t", 1)[1]) for e in tree if e and e.split()[1] == "blob"]
                check = subprocess.run(["git", "--git-dir", gd, "cat-file", "--batch-check"], check=True, text=True,
                                       input="".join(sha + "\n" for sha, _ in blobs), stdout=subprocess.PIPE).stdout
                absent = [path for (sha, path), line in zip(blobs, check.splitlines()) if line.endswith("missing")]
                if absent:
                    log("%d file(s) absent from %s, left out: %s" % (len(absent), gd, " ".join(absent[:5])))
                arch = subprocess.Popen(["git", "--git-dir", gd, "archive", commit, "--", "."] +
                                        [":(exclude,literal)" + a for a in absent], stdout=subprocess.PIPE)
                subprocess.run(["tar", "-x", "-C", src], stdin=arch.stdout, check=True)
                if arch.wait() != 0:
                    sys.exit("git archive failed")
                open(stamp, "w").write(commit + "\n")
            return src, commit
        if os.path.isdir(given):
            return given, "a source tree at %s (commit not known)" % given
        if given.endswith((".tar.gz", ".tgz")):
            commit = extract_sdist(given, src)
            open(stamp, "w").write(commit + "\n")
            return src, commit
        sys.exit("--llama-src: %s is not a llama.cpp tree, a git directory or an sdist" % given)
    if os.path.exists(os.path.join(src, "CMakeLists.txt")) and os.path.exists(stamp):
        return src, open(stamp).read().strip()
    dl = os.path.join(work, "sdist")
    os.makedirs(dl, exist_ok=True)
    spec = "llama-cpp-python" + ("==" + args.llama_cpp_python_version if args.llama_cpp_python_version else "")
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", dl, spec])
    tgzs = sorted((os.path.join(dl, f) for f in os.listdir(dl) if f.endswith(".tar.gz")), key=os.path.getmtime)
    if not tgzs:
        sys.exit("pip download gave no sdist")
    commit = extract_sdist(tgzs[-1], src)
    open(stamp, "w").write(commit + "\n")
    return src, commit


def llama_build(args, src, work):
    build = os.path.join(work, "build")
    bench = os.path.join(build, "bin", "llama-bench")
    quant = os.path.join(build, "bin", "llama-quantize")
    if os.path.exists(bench) and os.path.exists(quant) and not args.rebuild:
        return bench, quant
    run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        stdout=subprocess.DEVNULL)
    run(["cmake", "--build", build, "--config", "Release", "-j", str(args.jobs), "--target", "llama-bench",
         "llama-quantize"])
    return bench, quant


# ---------------------------------------------------------------- GGUF writing and reading

def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, vtype, value):
    out = gguf_str(key) + struct.pack("<I", vtype)
    if vtype == 4:
        return out + struct.pack("<I", value)
    if vtype == 5:
        return out + struct.pack("<i", value)
    if vtype == 6:
        return out + struct.pack("<f", value)
    if vtype == 7:
        return out + struct.pack("<B", 1 if value else 0)
    if vtype == 8:
        return out + gguf_str(value)
    raise ValueError(vtype)


def gguf_array(key, etype, values):
    out = gguf_str(key) + struct.pack("<IIQ", 9, etype, len(values))
    if etype == 8:
        return out + b"".join(gguf_str(v) for v in values)
    if etype == 6:
        return out + np.asarray(values, dtype="<f4").tobytes()
    if etype == 5:
        return out + np.asarray(values, dtype="<i4").tobytes()
    raise ValueError(etype)


def llama_tensor_specs(cfg):
    """(name, numpy shape [rows, cols], ggml type) of a Llama model with afm's shapes; tied output."""
    d, hd = cfg["dim"], cfg["head_dim"]
    q, kv, f = cfg["heads"] * hd, cfg["kv_heads"] * hd, cfg["ffn"]
    specs = [("token_embd.weight", (cfg["vocab"], d), 1)]
    for i in range(cfg["layers"]):
        p = "blk.%d." % i
        specs += [(p + "attn_norm.weight", (d,), 0), (p + "attn_q.weight", (q, d), 1), (p + "attn_k.weight", (kv, d), 1),
                  (p + "attn_v.weight", (kv, d), 1), (p + "attn_output.weight", (d, q), 1),
                  (p + "ffn_norm.weight", (d,), 0), (p + "ffn_gate.weight", (f, d), 1),
                  (p + "ffn_up.weight", (f, d), 1), (p + "ffn_down.weight", (d, f), 1)]
    specs.append(("output_norm.weight", (d,), 0))
    return specs


def write_gguf_f16(path, cfg, seed=1):
    """Stream a random-weight F16 Llama GGUF (norms F32 ones, matrices random F16 of magnitude 2^-7..2^-5);
    memory stays small."""
    vocab = cfg["vocab"]
    toks = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    toks += ["t%d" % i for i in range(len(toks), vocab)]
    ttype = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    kvs = [gguf_kv("general.architecture", 8, "llama"), gguf_kv("general.name", 8, "afm-shaped random llama"),
           gguf_kv("general.file_type", 4, 1), gguf_kv("general.alignment", 4, 32),
           gguf_kv("llama.context_length", 4, cfg["context"]), gguf_kv("llama.embedding_length", 4, cfg["dim"]),
           gguf_kv("llama.block_count", 4, cfg["layers"]), gguf_kv("llama.feed_forward_length", 4, cfg["ffn"]),
           gguf_kv("llama.rope.dimension_count", 4, cfg["head_dim"]),
           gguf_kv("llama.attention.head_count", 4, cfg["heads"]),
           gguf_kv("llama.attention.head_count_kv", 4, cfg["kv_heads"]),
           gguf_kv("llama.attention.key_length", 4, cfg["head_dim"]),
           gguf_kv("llama.attention.value_length", 4, cfg["head_dim"]),
           gguf_kv("llama.attention.layer_norm_rms_epsilon", 6, cfg["norm_eps"]),
           gguf_kv("llama.rope.freq_base", 6, cfg["rope_theta"]), gguf_kv("llama.vocab_size", 4, vocab),
           gguf_kv("tokenizer.ggml.model", 8, "llama"), gguf_array("tokenizer.ggml.tokens", 8, toks),
           gguf_array("tokenizer.ggml.scores", 6, [-float(i) for i in range(vocab)]),
           gguf_array("tokenizer.ggml.token_type", 5, ttype),
           gguf_kv("tokenizer.ggml.unknown_token_id", 4, 0), gguf_kv("tokenizer.ggml.bos_token_id", 4, 1),
           gguf_kv("tokenizer.ggml.eos_token_id", 4, 2), gguf_kv("tokenizer.ggml.add_bos_token", 7, True)]
    specs = llama_tensor_specs(cfg)
    infos, offset = [], 0
    for name, shape, t in specs:
        n = int(np.prod(shape))
        infos.append(gguf_str(name) + struct.pack("<I", len(shape)) +
                     b"".join(struct.pack("<Q", s) for s in reversed(shape)) + struct.pack("<IQ", t, offset))
        offset += (n * (4 if t == 0 else 2) + 31) // 32 * 32
    rng = np.random.default_rng(seed)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(kvs)))
        for kv in kvs:
            f.write(kv)
        for ti in infos:
            f.write(ti)
        f.write(b"\0" * (-f.tell() % 32))
        for name, shape, t in specs:
            n = int(np.prod(shape))
            if t == 0:
                f.write(np.ones(n, dtype="<f4").tobytes())
            else:
                chunk = 1 << 24  # elements; every matrix size here is a multiple of 4
                for lo in range(0, n, chunk):
                    m = min(chunk, n - lo)
                    u = rng.integers(0, 2**64 - 1, size=(m + 3) // 4, dtype=np.uint64, endpoint=True).view("<u2")[:m]
                    u &= 0x87FF  # random sign, mantissa and lowest exponent bit:
                    u |= 0x2000  # +-[2^-7, 2^-5), std about 0.019 (fast; speed does not depend on the values)
                    f.write(memoryview(u))
            f.write(b"\0" * (-f.tell() % 32))
    os.replace(tmp, path)


def read_gguf_tensors(path):
    """{ggml type name: (tensor count, data bytes)} and total data bytes, from a GGUF header."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError("%s is not GGUF" % path)
        _, n_t, n_kv = struct.unpack("<IQQ", head[4:24])

        def rd(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))

        def rstr():
            (n,) = rd("<Q")
            return f.read(n)

        def skip(t):
            if t == 8:
                rstr()
            elif t == 9:
                et, cnt = rd("<IQ")
                if et == 8:
                    for _ in range(cnt):
                        rstr()
                elif et == 9:
                    raise ValueError("nested arrays")
                else:
                    f.seek(sizes[et] * cnt, 1)
            else:
                f.seek(sizes[t], 1)
        for _ in range(n_kv):
            rstr()
            (t,) = rd("<I")
            skip(t)
        by_type, total = {}, 0
        for _ in range(n_t):
            rstr()
            (nd,) = rd("<I")
            ne = rd("<%dQ" % nd)
            t, _ = rd("<IQ")
            name, be, bb = GGML_TYPES.get(t, ("type%d" % t, 1, 0))
            n = int(np.prod(ne))
            b = n // be * bb
            c, s = by_type.get(name, (0, 0))
            by_type[name] = (c + 1, s + b)
            total += b
    return by_type, total


# ---------------------------------------------------------------- llama.cpp models and bench

def llama_models(args, cfg, quant, work):
    tag = "llama-v%d-d%d-l%d-h%dx%d-kv%d-f%d" % (cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"],
                                                   cfg["head_dim"], cfg["kv_heads"], cfg["ffn"])
    f16 = os.path.join(work, tag + "-f16.gguf")
    if not os.path.exists(f16):
        log("writing %s (random F16 weights)" % f16)
        t0 = time.time()
        write_gguf_f16(f16, cfg)
        log("  %.0f s" % (time.time() - t0))
    recipes = ["matched", "default"] if args.recipe == "both" else [args.recipe]
    models = []
    for ty in args.llama_types.split(","):
        ty = ty.strip().lower()
        if ty in ("f16", "f32", "bf16"):
            models.append({"label": ty.upper(), "type": ty, "recipe": "-", "path": f16})
            continue
        for rec in recipes:
            path = os.path.join(work, "%s-%s-%s.gguf" % (tag, ty, rec))
            if not os.path.exists(path):
                extra = ["--pure", "--token-embedding-type", "q4_K"] if rec == "matched" else []
                qlog = path + ".log"
                with open(qlog, "w") as lf:
                    log("+ " + " ".join([quant] + extra + [f16, path, ty.upper(), str(args.jobs)]) + "  > " + qlog)
                    if subprocess.run([quant] + extra + [f16, path + ".part", ty.upper(), str(args.jobs)],
                                      stdout=lf, stderr=subprocess.STDOUT).returncode != 0:
                        sys.exit("llama-quantize failed; see " + qlog)
                os.replace(path + ".part", path)
            models.append({"label": "%s %s" % (ty.upper(), rec), "type": ty, "recipe": rec, "path": path})
    for m in models:
        m["file_bytes"] = os.path.getsize(m["path"])
        m["by_type"], m["weight_bytes"] = read_gguf_tensors(m["path"])
    return models


def llama_bench_json(bench, model, t, args, pp):
    cmd = [bench, "-m", model, "-t", str(t), "-r", str(args.reps), "-o", "json"]
    cmd += ["-p", str(args.prompt), "-n", "0"] if pp else ["-p", "0", "-n", str(args.gen), "-d", str(args.prompt)]
    cmd += args.llama_bench_args
    log("+ " + " ".join(cmd))
    with CpuShare() as cs:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit("llama-bench failed:\n" + p.stderr[-3000:])
    res = json.loads(p.stdout)
    if not res:
        sys.exit("llama-bench printed no result:\n" + p.stderr[-3000:])
    res[0]["cpu_share"] = cs.share(t)
    return res[0]


class CpuShare:
    """CPU time of child processes / (wall time x threads): how much of the asked-for cores a run got."""

    def __enter__(self):
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu, self.wall = ru.ru_utime + ru.ru_stime, time.time()
        return self

    def __exit__(self, *exc):
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu, self.wall = ru.ru_utime + ru.ru_stime - self.cpu, time.time() - self.wall

    def share(self, threads):
        return self.cpu / max(self.wall * threads, 1e-9)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine():
    info = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        text = out_of(["lscpu"])
        m = re.search(r"Model name:\s*(.*)", text)
        info["cpu"] = m.group(1).strip() if m else "?"
        fl = re.search(r"Flags:\s*(.*)", text)
        flags = set(fl.group(1).split()) if fl else set()
        info["simd"] = " ".join(x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni")
                                if x in flags) or "none of avx2/avx512"
    except (OSError, subprocess.CalledProcessError):
        info["cpu"], info["simd"] = platform.processor(), "?"
    try:
        info["load"] = "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--afm", metavar="MODEL.afm", help="the afm model to measure")
    src.add_argument("--synth", metavar="TYPE", help="make the full-size base with tools/synth.py --type TYPE "
                     "(f16, or q2b once synth.py writes it) in --work")
    ap.add_argument("--work", default=os.environ.get("AFM_BENCH_WORK", "/tmp/afm-llamacpp-bench"),
                    help="work directory for llama.cpp, its build and the models (default %(default)s)")
    ap.add_argument("--afm-bin", help="the afm CLI (default: make -C REPO afm, then REPO/afm)")
    ap.add_argument("--llama-src", help="llama.cpp source: a tree, a git directory, or a llama-cpp-python sdist")
    ap.add_argument("--llama-ref", default="HEAD", help="commit to take from a git --llama-src (default HEAD)")
    ap.add_argument("--llama-cpp-python-version", help="sdist version to download when no --llama-src")
    ap.add_argument("--rebuild", action="store_true", help="rebuild llama.cpp even if the binaries exist")
    ap.add_argument("--llama-types", default="tq2_0,q2_k",
                    help="llama-quantize types to compare with, comma separated; f16 is the unquantized GGUF "
                    "(default %(default)s)")
    ap.add_argument("--recipe", choices=("matched", "default", "both"), default="matched",
                    help="llama-quantize recipe (default %(default)s; see above)")
    ap.add_argument("-t", "--threads", default="1,2", help="thread counts (default %(default)s)")
    ap.add_argument("-p", "--prompt", type=int, default=512, help="prefill tokens (default %(default)s)")
    ap.add_argument("-n", "--gen", type=int, default=128, help="decode tokens (default %(default)s)")
    ap.add_argument("-r", "--reps", type=int, default=3, help="runs per invocation, median (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of interleaved invocations; medians over all (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build and quantize threads")
    ap.add_argument("--llama-bench-args", default="", help="extra llama-bench arguments, one string")
    ap.add_argument("--prepare-only", action="store_true", help="build and make the models, measure nothing")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    args.llama_bench_args = args.llama_bench_args.split()
    threads = [int(x) for x in args.threads.split(",")]
    work = os.path.abspath(args.work)
    if os.path.commonpath([work, REPO]) == REPO:
        sys.exit("--work must be outside the repository (%s)" % REPO)
    os.makedirs(work, exist_ok=True)

    afm = afm_binary(args)
    model = afm_model(args, work)
    cfg = afm_config(afm, model)
    src_dir, commit = llama_source(args, work)
    bench, quant = llama_build(args, src_dir, work)
    models = llama_models(args, cfg, quant, work)
    if args.prepare_only:
        return

    mach = machine()
    afm_runs = {t: [] for t in threads}
    ll = {(m["label"], t, k): [] for m in models for t in threads for k in ("pp", "tg")}
    ll_cpu = {(m["label"], t): [] for m in models for t in threads}
    ll_meta = {}
    t_start = time.time()
    for rnd in range(args.rounds):
        for t in threads:
            log("round %d/%d, %d thread(s): afm" % (rnd + 1, args.rounds, t))
            cmd = [afm, "bench", model, "-t", str(t), "-p", str(args.prompt), "-n", str(args.gen), "-r", str(args.reps)]
            log("+ " + " ".join(cmd))
            with CpuShare() as cs:
                rows = parse_afm_bench(out_of(cmd))
            if t not in rows:
                sys.exit("could not read afm bench's table")
            rows[t]["cpu_share"] = cs.share(t)
            afm_runs[t].append(rows[t])
            log("  afm: prefill %.2f tok/s, decode %.2f tok/s, cpu %.0f%%" % (rows[t]["pp"], rows[t]["tg"],
                                                                          100 * rows[t]["cpu_share"]))
            for m in models:
                for k in ("pp", "tg"):
                    log("round %d/%d, %d thread(s): llama.cpp %s %s" % (rnd + 1, args.rounds, t, m["label"], k))
                    r = llama_bench_json(bench, m["path"], t, args, k == "pp")
                    ll[(m["label"], t, k)] += r.get("samples_ts") or [r["avg_ts"]]
                    ll_cpu[(m["label"], t)].append(r["cpu_share"])
                    log("  llama.cpp %s %s: %s tok/s, cpu %.0f%%" % (m["label"], k, " ".join(
                        "%.2f" % x for x in r.get("samples_ts") or [r["avg_ts"]]), 100 * r["cpu_share"]))
                    ll_meta[m["label"]] = {x: r.get(x) for x in ("build_commit", "build_number", "cpu_info", "backends",
                                                                  "model_type", "model_size", "model_n_params",
                                                                  "type_k", "type_v", "flash_attn", "n_batch",
                                                                  "n_ubatch", "load_mode", "repack")}
    elapsed = time.time() - t_start

    # ---- report
    kv_pos = args.prompt + args.gen / 2.0
    kv_llama = cfg["layers"] * kv_pos * cfg["kv_heads"] * cfg["head_dim"] * 2 * 2  # f16 K and V, all layers
    afm_size = os.path.getsize(model)
    res = {"machine": mach, "llama_cpp": commit, "afm_model": model, "afm_types": cfg["types"], "config": cfg,
           "threads": threads, "prompt": args.prompt, "gen": args.gen, "reps": args.reps, "rounds": args.rounds,
           "elapsed_s": elapsed, "rows": []}
    print()
    print("machine: %s, %s logical CPUs, %s; load average at the end %s" % (mach["cpu"], mach["cpus"], mach["simd"],
                                                                           mach.get("load", "?")))
    print("llama.cpp: %s" % commit)
    meta = next(iter(ll_meta.values()), {})
    fa = {-1: "auto", 0: "off", 1: "on"}.get(meta.get("flash_attn"), meta.get("flash_attn"))
    print("llama-bench: %s backend, K/V cache %s/%s, flash attention %s, batch %s/%s, load %s, repack %s" % (
        meta.get("backends"), meta.get("type_k"), meta.get("type_v"), fa, meta.get("n_batch"), meta.get("n_ubatch"),
        meta.get("load_mode"), meta.get("repack")))
    print("shapes: vocab %d, dim %d, %d layers (%d KV-reuse in afm), %d heads x %d, %d KV heads, FFN %d" % (
        cfg["vocab"], cfg["dim"], cfg["layers"], cfg["reuse"], cfg["heads"], cfg["head_dim"], cfg["kv_heads"],
        cfg["ffn"]))
    extra = cfg["reuse"] * 2 * cfg["kv_heads"] * cfg["head_dim"] * cfg["dim"]
    print("llama.cpp has K/V projections in all %d layers; afm's %d KV-reuse layers have none: %.1fM more "
          "weights on llama.cpp's side" % (cfg["layers"], cfg["reuse"], extra / 1e6))
    print("prefill %d tokens; decode %d tokens after %d (llama-bench -d %d); median of %d run(s) x %d round(s); "
          "%.0f s" % (args.prompt, args.gen, args.prompt, args.prompt, args.reps, args.rounds, elapsed))
    print()
    print("model files:")
    print("  %-26s %9.1f MB  %s  (%s)" % ("afm", afm_size / 1e6, "/".join(cfg["types"]) or "?", model))
    for m in models:
        mix = ", ".join("%s x%d" % (k, v[0]) for k, v in sorted(m["by_type"].items(), key=lambda kv: -kv[1][1]))
        print("  %-26s %9.1f MB  %s  (%s)" % ("llama.cpp " + m["label"], m["file_bytes"] / 1e6, mix, m["path"]))
    print()
    hdr = "%7s  %-24s %9s %10s %10s %9s %7s %6s %8s %8s" % (
        "threads", "engine", "size MB", "pp%d t/s" % args.prompt, "tg%d t/s" % args.gen, "eff GB/s", "%roof", "cpu%",
        "afm/pp", "afm/tg")
    print(hdr)
    print("-" * len(hdr))
    verdict = []
    afm_label = "/".join(x for x in cfg["types"] if x != "F32") or "F32"
    for t in threads:
        a_pp = median([r["pp"] for r in afm_runs[t]])
        a_tg = median([r["tg"] for r in afm_runs[t]])
        a_mb = afm_runs[t][-1]["mb_per_tok"]
        bw = median([r["read_gbs"] for r in afm_runs[t]])
        a_cpu = median([r["cpu_share"] for r in afm_runs[t]])
        print("%7d  %-24s %9.1f %10.2f %10.2f %9.2f %6.1f%% %5.0f%% %8s %8s" % (
            t, "afm " + afm_label, afm_size / 1e6, a_pp, a_tg, a_mb * a_tg / 1e3, 100 * a_tg * a_mb / 1e3 / bw,
            100 * a_cpu, "", ""))
        res["rows"].append({"threads": t, "engine": "afm", "pp": a_pp, "tg": a_tg, "bytes_per_tok": a_mb * 1e6,
                            "read_gbs": bw, "cpu_share": a_cpu, "runs": afm_runs[t]})
        best = None
        for m in models:
            pp = median(ll[(m["label"], t, "pp")])
            tg = median(ll[(m["label"], t, "tg")])
            bpt = m["weight_bytes"] + kv_llama
            cpu = median(ll_cpu[(m["label"], t)])
            print("%7d  %-24s %9.1f %10.2f %10.2f %9.2f %6.1f%% %5.0f%% %7.2fx %7.2fx" % (
                t, "llama.cpp " + m["label"], m["file_bytes"] / 1e6, pp, tg, bpt * tg / 1e9, 100 * bpt * tg / 1e9 / bw,
                100 * cpu, a_pp / pp, a_tg / tg))
            res["rows"].append({"threads": t, "engine": "llama.cpp", "model": m["label"], "type": m["type"],
                                "recipe": m["recipe"], "file_bytes": m["file_bytes"], "pp": pp, "tg": tg,
                                "cpu_share": cpu,
                                "bytes_per_tok": bpt, "pp_samples": ll[(m["label"], t, "pp")],
                                "tg_samples": ll[(m["label"], t, "tg")]})
            if m["type"] in ("tq2_0", "q2_k") and (best is None or tg > best[2]):
                best = (m["label"], pp, tg)
        if best:
            verdict.append("%d thread(s): fastest llama.cpp 2-bit decode is %s; afm decode %.2fx (need >= 1.3), "
                           "prefill %.2fx (need >= 1.5)" % (t, best[0], a_tg / best[2], a_pp / best[1]))
    print()
    print("eff GB/s: bytes read per decode token (weights + KV cache at the mean position) x decode tok/s;")
    print("cpu%: CPU time the invocations got / (wall time x threads), load and warm-up included: below ~90% the")
    print("      machine was busy with other work and every number above is low by about that much")
    print("%%roof: the same as a share of the read bandwidth afm bench measured in this run (%s GB/s at %s threads)"
          % ("/".join("%.1f" % median([r["read_gbs"] for r in afm_runs[t]]) for t in threads),
             "/".join(str(t) for t in threads)))
    for v in verdict:
        print(v)
    res["llama_bench_meta"] = ll_meta
    res["models"] = [{k: m[k] for k in ("label", "type", "recipe", "path", "file_bytes", "weight_bytes", "by_type")}
                     for m in models]
    res["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
