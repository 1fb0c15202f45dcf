#!/usr/bin/env python3
"""Writes tokenizer test vectors from the reference libraries (sentencepiece, tokenizers).

    python3 tests/gen/gen_tok_vectors.py MODEL OUT.txt [--corpus DIR] [--sample N] [--seed S]

MODEL is a SentencePiece model (*.model, or any file that is not JSON) or a tokenizer.json.
Without --sample every line of DIR/corpus.txt (and DIR/invalid.bin for SentencePiece) is used;
with it, N random lines plus the built-in edge cases (this is what tests/vectors/ holds).
Records, one a line, fields separated by tabs, texts in hex:
  E <text> <ids> <decode(ids)>            plain encode / decode
  N <text> <ids> <decode(ids)>            AFM layer: "\\n" -> <n> before encoding, <n> -> "\\n" after decoding
  D <ids> <decode(ids)>                   decode of an arbitrary id sequence
  C <gen> <ntools> <tool>... <nmsg> <role> <content>... <ids>    AFM chat prompt ids
The expected values come only from the reference libraries (and, for N and C, from docs/MODEL.md section 7
applied in Python to their output); nothing is hand-written.
"""
import json, os, random, sys

EDGE = ["", " ", "  ", "a", " a", "a ", "  a  b  ", "\t", "Hello world", "Hello  world", "héllo", "e\u0301",
        "\ufb01", "\uff21\uff22", "\u2460", "\u00bd", "\u3000x\u3000", "日本語", "한국어", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
        "\U0001F468\u200D\U0001F469\u200D\U0001F467", "\u2581", "\u2581\u2581a", "▁x ▁", "<n>", "<turn_start>", "<turn_end>",
        "a<n>b", "<turn_start> user<n>hi<turn_end>", "<turn_start><turn_end>", "<s>", "</s>", "<unk>", "<pad>",
        "<0x41>", "x<executable_start>y", "<<n>>", "<n<n>", "\ufffd", "\u0000", "a\u0000b", "\x7f", "don't I'M",
        "1234567890", "١٢٣", "  leading", "trailing  ", "\r\n", "a\nb", "\n", "\n\n", "x\n\ny", " \n ", "tab\there",
        "\u200b", "\u00a0", "\U0010FFFF", "\U000E0001", "\ud7ff\ue000", "ǅ", "ﬀ", "Ⅻ", "㍿", "㌀", "ｶﾞ", "ㄱ", "\u1100\u1161\u11a8"]

def hx(b):
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogatepass")
    return b.hex()

def ids_s(ids):
    return " ".join(str(i) for i in ids)

AFM_DEFAULT_SYSTEM = "A conversation between a user and a helpful assistant."

def render_chat(msgs, tools, gen):
    # docs/MODEL.md section 7
    system, first = AFM_DEFAULT_SYSTEM, 0
    if msgs and msgs[0][0] == "system":
        system, first = msgs[0][1], 1
    s = "<turn_start> system<n>" + system
    if tools:
        s += "<n>system tools: " + "<n>".join(tools)
    s += "<turn_end>"
    for role, content in msgs[first:]:
        s += "<turn_start> " + role + "<n>" + content + "<turn_end>"
    if gen:
        s += "<turn_start> assistant<n>"
    return s

CHATS = [
    ([("user", "Hello!")], [], 1),
    ([("user", "Write a haiku\nabout the sea.")], [], 1),
    ([("system", "You are terse."), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")], [], 1),
    ([("user", "What's the weather in Paris?")],
     ['{"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}',
      '{"name": "get_time", "parameters": {}}'], 1),
    ([("user", "hi"), ("assistant", "<executable_start> ```function\nget_time()\n```<executable_end>")], ['{"name": "get_time"}'], 0),
    ([], [], 1),
    ([("user", "  spaced   out  \n\n text ")], [], 0),
]

def main():
    model, out = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    corpus = args[args.index("--corpus") + 1] if "--corpus" in args else None
    sample = int(args[args.index("--sample") + 1]) if "--sample" in args else None
    rng = random.Random(int(args[args.index("--seed") + 1]) if "--seed" in args else 1)
    is_json = open(model, "rb").read(1) == b"{"
    lines = []
    if corpus:
        with open(os.path.join(corpus, "corpus.txt"), "rb") as f:
            lines = f.read().split(b"\n")
        if not is_json and os.path.exists(os.path.join(corpus, "invalid.bin")):
            with open(os.path.join(corpus, "invalid.bin"), "rb") as f:
                lines += f.read().split(b"\n")
        if sample is not None:
            lines = rng.sample(lines, min(sample, len(lines)))
            # a few multi-line chunks for the AFM layer
    texts = [e.encode("utf-8", "surrogatepass") for e in EDGE] + lines
    multi = []
    if corpus:
        for _ in range(25 if sample is not None else 2000):
            k = rng.randint(0, max(0, len(lines) - 5))
            multi.append(b"\n".join(lines[k:k + rng.randint(2, 5)]))
    multi += [b"a\nb", b"\n", b"x\n\n y\n", b"line one\nline two\n", "日本\n語".encode()]
    with open(out, "w") as f:
        if not is_json:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=model)
            nl = sp.piece_to_id("<n>")
            has_nl = sp.id_to_piece(nl) == "<n>"
            for t in texts:
                ids = sp.encode(t)
                f.write(f"E\t{hx(t)}\t{ids_s(ids)}\t{hx(sp.decode(ids))}\n")
            for t in multi + texts[:80]:
                if not has_nl:
                    break
                tt = t.replace(b"\n", b"<n>")
                ids = sp.encode(tt)
                f.write(f"N\t{hx(t)}\t{ids_s(ids)}\t{hx(sp.decode(ids).replace('<n>', chr(10)))}\n")
            n = sp.get_piece_size()
            for _ in range(120 if sample is not None else 5000):
                ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
                if rng.random() < 0.5:  # runs of byte pieces, with broken UTF-8 in them
                    b = [i for i in range(n) if sp.is_byte(i)]
                    if b:
                        ids = [rng.choice(b) for _ in range(rng.randint(1, 6))] + ids[: rng.randint(0, 3)] + [rng.choice(b) for _ in range(rng.randint(0, 4))]
                f.write(f"D\t{ids_s(ids)}\t{hx(sp.decode(ids))}\n")
            eos = sp.eos_id()
            if has_nl and eos >= 0:
                for msgs, tools, gen in CHATS:
                    text = render_chat(msgs, tools, gen).replace("\n", "<n>")
                    ids = sp.encode(text)
                    ids = [eos] + ids[1:]
                    rec = ["C", str(gen), str(len(tools))] + [hx(x) for x in tools] + [str(len(msgs))]
                    for r, c in msgs:
                        rec += [hx(r), hx(c)]
                    rec.append(ids_s(ids))
                    f.write("\t".join(rec) + "\n")
        else:
            from tokenizers import Tokenizer
            import unicodedata
            tk = Tokenizer.from_file(model)
            spec = json.load(open(model, encoding="utf-8")).get("normalizer")
            def ref_norm(spec, s):
                # the normalizer with this Python's unicodedata (the Unicode version of afm_tokenizer.h)
                if not spec:
                    return s
                if spec["type"] == "Sequence":
                    for x in spec["normalizers"]:
                        s = ref_norm(x, s)
                    return s
                return unicodedata.normalize(spec["type"], s)
            skipped = 0
            for t in texts:
                try:
                    s = t.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if tk.normalizer is not None and tk.normalizer.normalize_str(s) != ref_norm(spec, s):
                    # `tokenizers` normalizes with an older Unicode version than afm_tokenizer.h's
                    skipped += 1
                    continue
                ids = tk.encode(s, add_special_tokens=False).ids
                f.write(f"E\t{hx(t)}\t{ids_s(ids)}\t{hx(tk.decode(ids, skip_special_tokens=True))}\n")
            n = tk.get_vocab_size(with_added_tokens=True)
            for _ in range(120 if sample is not None else 5000):
                ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
                f.write(f"D\t{ids_s(ids)}\t{hx(tk.decode(ids, skip_special_tokens=True))}\n")
            f.write(f"# {skipped} texts left out: tokenizers' normalizer (older Unicode) differs from unicodedata {unicodedata.unidata_version}\n")

if __name__ == "__main__":
    main()
