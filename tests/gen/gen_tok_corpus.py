#!/usr/bin/env python3
"""Generates the tokenizer test corpus (deterministic, seeded; not committed: it is large).

    python3 tests/gen/gen_tok_corpus.py OUTDIR [--mb 6]

Writes OUTDIR/corpus.txt (UTF-8 lines, >= --mb MB): English prose (Python's own documentation,
licence texts), pseudo-prose in many scripts (CJK, Japanese kana, Hangul, Arabic, Hebrew, Devanagari,
Bengali, Tamil, Cyrillic, Greek, Thai, Georgian, Armenian, Ethiopic), emoji with ZWJ sequences, skin
tones and flags, combining-mark stacks, source code (the Python standard library), runs of every kind of
whitespace, digits and numbers, and every Unicode scalar value once (except the surrogates and NUL).
OUTDIR/invalid.bin holds lines of invalid UTF-8 (for the C tests only: the Python references take str).
OUTDIR/train.txt is corpus.txt less the every-codepoint block (model training input).
OUTDIR/english.txt holds only English prose (the speed benchmark's input).
"""
import os, random, sys, glob, sysconfig

def english_sources():
    parts = []
    try:
        import pydoc_data.topics as t
        parts.append("\n".join(t.topics.values()))
    except Exception:
        pass
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        try:
            parts.append(open(f, encoding="utf-8").read())
        except Exception:
            pass
    return "\n".join(parts)

SCRIPTS = {
    "han": [(0x4E00, 0x9FFF)], "hiragana": [(0x3041, 0x3096)], "katakana": [(0x30A1, 0x30FA)],
    "hangul": [(0xAC00, 0xD7A3)], "arabic": [(0x0621, 0x064A)], "hebrew": [(0x05D0, 0x05EA)],
    "devanagari": [(0x0905, 0x0939), (0x093E, 0x094D)], "bengali": [(0x0985, 0x09B9)],
    "tamil": [(0x0B85, 0x0BB9)], "cyrillic": [(0x0430, 0x044F), (0x0410, 0x042F)],
    "greek": [(0x03B1, 0x03C9)], "thai": [(0x0E01, 0x0E30), (0x0E31, 0x0E3A)],
    "georgian": [(0x10D0, 0x10FA)], "armenian": [(0x0561, 0x0586)], "ethiopic": [(0x1200, 0x1248)],
    "latin-ext": [(0x00C0, 0x00FF), (0x0100, 0x017F)],
}
PUNCT = {"han": "，。！？、；：「」", "hiragana": "、。", "katakana": "・ー", "arabic": "،؛؟",
         "devanagari": "।॥", "thai": " ", "hebrew": ".,", "ethiopic": "፡።"}

def pseudo_prose(rng, script, n_words):
    ranges = SCRIPTS[script]
    # a small per-script lexicon so that words repeat (as in real text) and BPE has merges to learn
    lex = []
    for _ in range(400):
        L = rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 7])
        w = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(L))
        lex.append(w)
    words = []
    for _ in range(n_words):
        if rng.random() < 0.85:
            words.append(lex[min(int(rng.expovariate(1 / 40)), len(lex) - 1)])
        else:
            words.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 8))))
        if rng.random() < 0.08:
            words[-1] += rng.choice(PUNCT.get(script, ".,;:!?"))
    sep = "" if script in ("han", "hiragana", "katakana") and rng.random() < 0.7 else " "
    return sep.join(words)

EMOJI = ["\U0001F600", "\U0001F44D", "\U0001F44D\U0001F3FD", "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466",
         "\U0001F3F3\uFE0F\u200D\U0001F308", "\U0001F1EF\U0001F1F5", "\U0001F1FA\U0001F1F8", "\u2764\uFE0F",
         "\U0001F9D1\U0001F3FF\u200D\U0001F4BB", "\U0001F469\u200D\u2764\uFE0F\u200D\U0001F48B\u200D\U0001F468",
         "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F", "#\uFE0F\u20E3", "\U0001F926\U0001F3FC\u200D\u2642\uFE0F"]
WS = [" ", "  ", "   ", "\t", "\t\t", " \t ", "\u00A0", "\u3000", "\u2003", "\u2009", "\u200B", "\r", "\u2028", "\u0085", "\x0b", "\x0c", "    "]

def main():
    out = sys.argv[1]
    mb = 6.0
    if "--mb" in sys.argv:
        mb = float(sys.argv[sys.argv.index("--mb") + 1])
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20251122)
    eng = english_sources()
    eng_lines = [l for l in eng.split("\n")]
    with open(os.path.join(out, "english.txt"), "w", encoding="utf-8") as f:
        f.write(eng)
    lines = []
    size = 0
    def add(s):
        nonlocal size
        for l in s.split("\n"):
            lines.append(l)
            size += len(l.encode("utf-8")) + 1
    add(eng)
    # source code
    libdir = sysconfig.get_paths()["stdlib"]
    code = []
    for f in sorted(glob.glob(os.path.join(libdir, "*.py")))[:60]:
        try:
            code.append(open(f, encoding="utf-8").read())
        except Exception:
            pass
    add("\n".join(code))
    scripts = sorted(SCRIPTS)
    target = int(mb * 1e6)
    # every scalar value once (no surrogates, no NUL, no newline characters that would split lines)
    cps = [c for c in range(1, 0x110000) if not (0xD800 <= c <= 0xDFFF) and c not in (10,)]
    every = "".join(chr(c) for c in cps)
    every_start = len(lines)
    for i in range(0, len(every), 48):
        add(every[i:i + 48])
    every_end = len(lines)
    while size < target + 2_500_000:
        r = rng.random()
        if r < 0.45:
            add(pseudo_prose(rng, rng.choice(scripts), rng.randint(3, 40)))
        elif r < 0.55:
            add(" ".join(rng.choice(EMOJI) + rng.choice(["", " ", "x", "!"]) for _ in range(rng.randint(1, 8))))
        elif r < 0.63:
            base = rng.choice("aeiouAEIOUnc\u0627\u0915\u0e01")
            add(" ".join(base + "".join(chr(rng.randint(0x0300, 0x036F)) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))))
        elif r < 0.73:
            add(rng.choice(WS).join(rng.choice(eng_lines[:5000] or ["x"]).split(" ")) + rng.choice(WS) * rng.randint(0, 3))
        elif r < 0.83:
            add(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) + rng.choice(["", ".", ",", "%", "px", "\u0663\u0664", "\u0968"]) for _ in range(rng.randint(1, 10))))
        else:
            # mixed: english words with non-Latin words inside, punctuation, apostrophes (GPT-2 contractions)
            w = rng.choice(eng_lines[:5000] or ["x"]).split(" ")
            w.insert(rng.randint(0, len(w)), pseudo_prose(rng, rng.choice(scripts), 2))
            w.insert(rng.randint(0, len(w)), rng.choice(["don't", "I'M", "we'll", "it's", "they've", "you'D", "O'Neil's", "'s", "'"]))
            add(" ".join(w))
    with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines))
        f.write("\n")
    with open(os.path.join(out, "train.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines[:every_start] + lines[every_end:]))
        f.write("\n")
    inv = []
    for _ in range(3000):
        b = bytearray()
        for _ in range(rng.randint(1, 20)):
            k = rng.random()
            if k < 0.3:
                b += rng.choice(eng_lines[:2000] or ["x"]).encode()[:20]
            elif k < 0.6:
                b.append(rng.randint(0x80, 0xFF))
            elif k < 0.7:
                b += bytes([0xED, 0xA0 + rng.randint(0, 0x1F), 0x80])  # surrogate
            elif k < 0.8:
                b += bytes([0xC0 | rng.randint(0, 1), 0x80 + rng.randint(0, 63)])  # overlong
            elif k < 0.9:
                b += "\u00e9\u4e2d\U0001F600".encode()[: rng.randint(1, 8)]  # truncated
            else:
                b += bytes([0xF4, 0x90, 0x80, 0x80])  # > U+10FFFF
        inv.append(bytes(b).replace(b"\n", b" "))
    with open(os.path.join(out, "invalid.bin"), "wb") as f:
        f.write(b"\n".join(inv) + b"\n")
    print(f"corpus.txt {size} bytes, {len(lines)} lines; english.txt {len(eng.encode())} bytes")

if __name__ == "__main__":
    main()
