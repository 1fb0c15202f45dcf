#!/usr/bin/env python3
"""Checks afm_tokenizer.h (and the C code built on it) code point by code point against the references:
the `regex` module for the character classes and the three pre-tokenizer patterns (GPT-2, Llama-3,
Qwen2), Python's unicodedata (the tables' pinned version) for NFC/NFD/NFKC/NFKD.

    python3 tests/gen/check_unicode_tables.py ./test_tokenizer [WORKDIR]

The `regex` module may implement a newer Unicode version than the tables: a code point whose
classes differ between the two versions is reported as a version difference, not as an error, and
strings containing one are not compared. Exit status 1 on any real mismatch.
"""
import os, random, subprocess, sys, tempfile, unicodedata
import regex

PATS = {
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CLASSES = [(1, r"\p{L}"), (2, r"\p{N}"), (4, r"\s"), (8, r"\p{M}"), (16, r"\p{P}"), (32, r"\p{S}")]

def main():
    exe = sys.argv[1]
    work = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    rng = random.Random(5)
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    # inputs: every code point in several contexts, random mixtures, whitespace/newline/apostrophe runs
    lines = []
    ctx = ["{c}", "a{c}b", " {c}{c}", "'{c}x", "1{c}2", "{c} \t{c}", "\r{c}\r\n ", "  {c}", "'{c}{c}e"]
    for i in range(0, len(cps), 16):
        chunk = [chr(c) for c in cps[i:i + 16] if c not in (10,)]
        lines.append("".join(rng.choice(ctx).format(c=ch) for ch in chunk))
    pool = " \t\r\u00a0\u3000\u2028'sStTlLdDmMrReEvV\u017f\u212aa1٣Ⅻ_-.,!?😀\u0301\u0915\u093f中"
    for _ in range(20000):
        lines.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))))
    inp = os.path.join(work, "uni_in.txt")
    with open(inp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(l.replace("\n", " ") for l in lines) + "\n")
    out = os.path.join(work, "uni_out")
    subprocess.check_call([exe, "--unicode-dump", inp, out])
    bad = 0
    # 1. classes
    cls = open(out + ".classes", "rb").read()
    newer = set()
    for bit, pat in CLASSES:
        r = regex.compile(pat)
        mism = [c for c in cps if bool(cls[c] & bit) != bool(r.match(chr(c)))]
        real = [c for c in mism if unicodedata.category(chr(c)) != "Cn"]
        newer.update(c for c in mism if unicodedata.category(chr(c)) == "Cn")
        print(f"class {pat:7s}: {len(mism)} differ from regex; {len(mism) - len(real)} are unassigned in "
              f"Unicode {unicodedata.unidata_version} (newer in regex), {len(real)} real")
        bad += len(real)
        if real:
            print("   e.g.", [hex(c) for c in real[:10]])
    # 2. pre-tokenizers
    for name, pat in PATS.items():
        r = regex.compile(pat)
        got = open(f"{out}.{name}", encoding="utf-8").read().split("\n")
        n_cmp = n_skip = n_bad = 0
        for line, g in zip(lines, got):
            line = line.replace("\n", " ")
            if any(ord(ch) in newer for ch in line):
                n_skip += 1
                continue
            want = [len(m.encode("utf-8")) for m in r.findall(line)]
            have = [int(x) for x in g.split()] if g else []
            n_cmp += 1
            if want != have:
                n_bad += 1
                if n_bad <= 5:
                    print(f"  {name}: {line!r}: regex {want} C {have}")
        print(f"pre-tokenizer {name}: {n_cmp} strings compared, {n_bad} differ, {n_skip} skipped (code points newer than the tables)")
        bad += n_bad
    # 3. normalization forms, against unicodedata (same version as the tables)
    for form in ["NFD", "NFC", "NFKD", "NFKC"]:
        got = open(f"{out}.{form.lower()}", "rb").read().split(b"\n")
        n_bad = 0
        for line, g in zip(lines, got):
            want = unicodedata.normalize(form, line.replace("\n", " ")).encode("utf-8")
            if want != g:
                n_bad += 1
                if n_bad <= 5:
                    print(f"  {form}: {line!r}: want {want!r} got {g!r}")
        # every code point alone
        print(f"{form}: {len(lines)} strings ({len(cps)} code points in context), {n_bad} differ")
        bad += n_bad
    print("OK" if bad == 0 else f"{bad} MISMATCHES")
    sys.exit(1 if bad else 0)

if __name__ == "__main__":
    main()
