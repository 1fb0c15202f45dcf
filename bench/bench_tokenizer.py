#!/usr/bin/env python3
"""Encode speed of afm.h's tokenizer next to the sentencepiece library and HF tokenizers, one core each.

    python3 bench/bench_tokenizer.py ./bench_tokenizer MODEL.model TEXT [SECONDS] [RUNS]

The text is encoded line by line (empty lines skipped) by all three: sentencepiece
(SentencePieceProcessor.encode on a list, num_threads=1), tokenizers (the same model converted by
transformers' LlamaTokenizerFast, encode_batch with RAYON_NUM_THREADS=1), and the C bench
(bench/bench_tokenizer.c, its own timing loop: no Python overhead). Each measurement runs for SECONDS
of CPU time (default 3); RUNS rounds (default 5) alternate the three, and the medians and the ratios
of the medians are printed, then a Markdown table row."""
import os, re, statistics, subprocess, sys, time
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

def timed(fn, secs):
    n, t0 = 0, time.process_time()
    while True:
        fn()
        n += 1
        el = time.process_time() - t0
        if el >= secs:
            return el / n

def main():
    exe, model, text = sys.argv[1], sys.argv[2], sys.argv[3]
    secs = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    runs = int(sys.argv[5]) if len(sys.argv) > 5 else 5
    lines = [l for l in open(text, encoding="utf-8").read().split("\n") if l]
    nbytes = sum(len(l.encode("utf-8")) for l in lines)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    tk = None
    try:
        import warnings
        warnings.filterwarnings("ignore")
        from transformers import LlamaTokenizerFast
        import tokenizers
        tk = LlamaTokenizerFast(vocab_file=model, legacy=True, add_bos_token=False, add_eos_token=False)._tokenizer
    except Exception as e:
        print("tokenizers: skipped:", e)
    print(f"{os.path.basename(model)}: {sp.get_piece_size()} pieces; {os.path.basename(text)}: {nbytes / 1e6:.2f} MB in "
          f"{len(lines)} lines; {runs} rounds of {secs:g} s CPU each")
    mb = {"sp": [], "hf": [], "c": []}
    for r in range(runs):
        mb["sp"].append(nbytes / timed(lambda: sp.encode(lines, num_threads=1), secs) / 1e6)
        if tk is not None:
            mb["hf"].append(nbytes / timed(lambda: tk.encode_batch(lines, add_special_tokens=False), secs) / 1e6)
        out = subprocess.run([exe, model, "1", text, str(secs)], capture_output=True, text=True, check=True).stdout
        mb["c"].append(float(re.search(r"lines: ([0-9.]+) MB/s", out).group(1)))
        print(f"  round {r + 1}: sentencepiece {mb['sp'][-1]:.1f}" + (f", tokenizers {mb['hf'][-1]:.1f}" if mb["hf"] else "")
              + f", afm.h {mb['c'][-1]:.1f} MB/s", flush=True)
    med = {k: statistics.median(v) for k, v in mb.items() if v}
    print(f"sentencepiece {spm.__version__}: {med['sp']:.1f} MB/s (median)")
    if "hf" in med:
        print(f"tokenizers {tokenizers.__version__} (LlamaTokenizerFast conversion): {med['hf']:.1f} MB/s (median)")
    print(f"afm.h: {med['c']:.1f} MB/s (median; min {min(mb['c']):.1f}, max {max(mb['c']):.1f})")
    print(out.strip())
    print(f"afm.h / sentencepiece: {med['c'] / med['sp']:.1f}x" + (f"   afm.h / tokenizers: {med['c'] / med['hf']:.1f}x" if "hf" in med else ""))
    print(f"| {med['c']:.1f} | {med['sp']:.1f} | " + (f"{med['hf']:.1f} | " if "hf" in med else "- | ")
          + f"{med['c'] / med['sp']:.1f}x | " + (f"{med['c'] / med['hf']:.1f}x |" if "hf" in med else "- |"))

if __name__ == "__main__":
    main()
