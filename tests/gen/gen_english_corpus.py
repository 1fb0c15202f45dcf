#!/usr/bin/env python3
"""English prose for the tokenizer benchmark and for training a realistic large test vocabulary:
docstrings (paragraphs of running text only) from the Python files installed on this machine.

    python3 tests/gen/gen_english_corpus.py OUTDIR [--mb 40]

Writes OUTDIR/english_train.txt (7/8 of the files, by a hash of their path) and
OUTDIR/english_bench.txt (the other 1/8, a few MB), so the benchmark text is not text the model
was trained on. Stops once english_train.txt has --mb megabytes."""
import ast, hashlib, os, sys, sysconfig

def paragraphs(doc):
    for p in doc.split("\n\n"):
        lines = [l.strip() for l in p.strip().split("\n")]
        text = " ".join(lines)
        # running text: mostly letters and spaces, several words, ends like a sentence
        if len(text) < 80 or text.count(" ") < 10 or not text[-1] in ".!?":
            continue
        letters = sum(c.isalpha() or c == " " for c in text)
        if letters / len(text) < 0.85 or ">>>" in text or "::" in text:
            continue
        yield text

def main():
    out = sys.argv[1]
    mb = float(sys.argv[sys.argv.index("--mb") + 1]) if "--mb" in sys.argv else 40.0
    os.makedirs(out, exist_ok=True)
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    seen = set()
    sizes = [0, 0]
    files = [open(os.path.join(out, "english_train.txt"), "w", encoding="utf-8"),
             open(os.path.join(out, "english_bench.txt"), "w", encoding="utf-8")]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                try:
                    tree = ast.parse(open(path, encoding="utf-8").read())
                except Exception:
                    continue
                which = hashlib.md5(path.encode()).digest()[0] % 8 == 0  # 1/8 of the files: bench
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if not doc:
                            continue
                        for p in paragraphs(doc):
                            h = hash(p)
                            if h in seen:
                                continue
                            seen.add(h)
                            files[which].write(p + "\n")
                            sizes[which] += len(p) + 1
                if sizes[0] > mb * 1e6:
                    break
            if sizes[0] > mb * 1e6:
                break
    for f in files:
        f.close()
    print(f"english_train.txt {sizes[0]} bytes, english_bench.txt {sizes[1]} bytes")

if __name__ == "__main__":
    main()
