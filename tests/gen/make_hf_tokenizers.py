#!/usr/bin/env python3
"""Makes the byte-level BPE tokenizer.json files the tokenizer tests use.

    python3 tests/gen/make_hf_tokenizers.py small CORPUSDIR OUTDIR
        trains small byte-level BPE tokenizers with the `tokenizers` library on the test corpus, in four
        pre-tokenizer flavours: GPT-2 (ByteLevel regex) + NFKC + added tokens with lstrip/rstrip/single_word
        (and the same with add_prefix_space),
        Llama-3 (Split + ByteLevel, ignore_merges), Qwen2 (Split + ByteLevel, NFC). Small: committed.
    python3 tests/gen/make_hf_tokenizers.py real PKGDIR OUTDIR
        PKGDIR holds files from PyPI packages (tests/gen/tok_parity.sh puts them there):
        anthropic_tokenizer.json (litellm, used as is) and the cl100k_base tiktoken ranks (litellm), which
        are converted to tokenizer.json with the Llama-3 and the Qwen2 pre-tokenizer patterns.
"""
import base64, json, os, sys

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

def split_pre(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

def byte_alphabet():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}

def small(corpus, out):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, normalizers, AddedToken
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(corpus, "train.txt")]
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<|endoftext|>", "<|im_start|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train(files, tr)
    tk.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True, normalized=False),
                   AddedToken("word", single_word=True, normalized=True),
                   AddedToken("ﬁx", normalized=True), AddedToken(" spaced ", normalized=False)])
    tk.add_special_tokens([AddedToken("<|im_end|>", rstrip=True)])
    j = json.loads(tk.to_str())
    with open(os.path.join(out, "tok_hf_gpt2_nfkc.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)
    j["pre_tokenizer"]["add_prefix_space"] = True
    with open(os.path.join(out, "tok_hf_gpt2_prefix.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)
    j["pre_tokenizer"]["add_prefix_space"] = False
    j["normalizer"] = None
    j["pre_tokenizer"] = split_pre(LLAMA3)
    j["model"]["ignore_merges"] = True
    with open(os.path.join(out, "tok_hf_llama3.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)
    j["pre_tokenizer"] = split_pre(QWEN2)
    j["normalizer"] = {"type": "NFC"}
    j["model"]["ignore_merges"] = False
    with open(os.path.join(out, "tok_hf_qwen2_nfc.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)

def tiktoken_to_json(path, pattern, normalizer, ignore_merges, specials):
    ranks = {}
    for line in open(path, "rb").read().splitlines():
        if line:
            tok, r = line.split()
            ranks[base64.b64decode(tok)] = int(r)
    alpha = byte_alphabet()
    enc = lambda b: "".join(alpha[x] for x in b)
    def bpe(token, max_rank):
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < max_rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                return parts
            i = best[1]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda x: x[1]):
        if len(tok) > 1:
            p = bpe(tok, r)
            assert len(p) == 2, (tok, p)
            merges.append(enc(p[0]) + " " + enc(p[1]))
    n = max(ranks.values()) + 1
    added = [{"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": split_pre(pattern), "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": {enc(k): v for k, v in ranks.items()}, "merges": merges}}

def real(pkg, out):
    import shutil
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(pkg, "anthropic_tokenizer.json"), os.path.join(out, "anthropic.json"))
    cl = os.path.join(pkg, "9b5ad71b2ce5302211f9c61530b329a4922fc6a4")  # cl100k_base ranks
    specials = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"]
    with open(os.path.join(out, "cl100k_llama3.json"), "w") as f:
        json.dump(tiktoken_to_json(cl, LLAMA3, None, True, specials), f, ensure_ascii=False)
    with open(os.path.join(out, "cl100k_qwen2_nfc.json"), "w") as f:
        json.dump(tiktoken_to_json(cl, QWEN2, {"type": "NFC"}, False, specials), f, ensure_ascii=False)

if __name__ == "__main__":
    {"small": small, "real": real}[sys.argv[1]](sys.argv[2], sys.argv[3])
