#!/usr/bin/env python3
"""Encode speed of afm.h's tokenizer next to the sentencepiece library and HF tokenizers, one core each.

    python3 tools/bench_tokenizer.py ./bench_tokenizer MODEL.model TEXT [SECONDS]

The text is encoded line by line (empty lines skipped) by all three: sentencepiece
(SentencePieceProcessor.encode on a list, num_threads=1), tokenizers (the same model converted by
transformers' LlamaTokenizerFast, encode_batch with RAYON_NUM_THREADS=1), and the C bench.
Prints MB/s and the ratios. The C numbers come from its own timing loop (no Python overhead)."""
import os, re, subprocess, sys, time
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
    lines = [l for l in open(text, encoding="utf-8").read().split("\n") if l]
    nbytes = sum(len(l.encode("utf-8")) for l in lines)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    t_sp = timed(lambda: sp.encode(lines, num_threads=1), secs)
    mb_sp = nbytes / t_sp / 1e6
    print(f"sentencepiece {spm.__version__}: {mb_sp:.1f} MB/s")
    mb_hf = None
    try:
        import warnings
        warnings.filterwarnings("ignore")
        from transformers import LlamaTokenizerFast
        tk = LlamaTokenizerFast(vocab_file=model, legacy=True, add_bos_token=False, add_eos_token=False)._tokenizer
        t_hf = timed(lambda: tk.encode_batch(lines, add_special_tokens=False), secs)
        mb_hf = nbytes / t_hf / 1e6
        import tokenizers
        print(f"tokenizers {tokenizers.__version__} (LlamaTokenizerFast conversion): {mb_hf:.1f} MB/s")
    except Exception as e:
        print("tokenizers: skipped:", e)
    out = subprocess.run([exe, model, "1", text, str(secs)], capture_output=True, text=True, check=True).stdout
    print(out.strip())
    mb_c = float(re.search(r"lines: ([0-9.]+) MB/s", out).group(1))
    print(f"afm.h / sentencepiece: {mb_c / mb_sp:.1f}x" + (f"   afm.h / tokenizers: {mb_c / mb_hf:.1f}x" if mb_hf else ""))

if __name__ == "__main__":
    main()
