#!/usr/bin/env python3
"""Trains the SentencePiece BPE test models that mimic AFM's tokenizer (not committed except the small ones
copied to tests/vectors by tests/gen/gen_tok_vectors.py).

    python3 tests/gen/train_tok_models.py CORPUSDIR OUTDIR [NAME ...]

Every model is BPE with AFM's special pieces as user-defined symbols; they differ in vocabulary size,
normalization (identity / NFKC / NFKC+casefold), whitespace handling, byte fallback and digit splitting.
"""
import os, sys
import sentencepiece as spm

AFM_SYMBOLS = ["<n>", "<turn_start>", "<turn_end>", "<executable_start>", "<executable_end>"]

MODELS = {
    # name: trainer options
    "afm1k_id": dict(vocab_size=1000, character_coverage=0.98, small_chars=True, normalization_rule_name="identity", byte_fallback=True,
                     remove_extra_whitespaces=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3),
    "afm8k_nfkc": dict(vocab_size=8000, character_coverage=0.98, small_chars=True, normalization_rule_name="nmt_nfkc", byte_fallback=True,
                       remove_extra_whitespaces=True),
    "afm32k_id": dict(vocab_size=32000, normalization_rule_name="identity", byte_fallback=True,
                      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
                      pad_id=0, unk_id=1, bos_id=2, eos_id=3),
    "bpe4k_nofb_cf": dict(vocab_size=4000, normalization_rule_name="nmt_nfkc_cf", byte_fallback=False,
                          remove_extra_whitespaces=True, character_coverage=0.98, small_chars=True),
    "bpe3k_suffix_nodp": dict(vocab_size=3000, character_coverage=0.98, small_chars=True, normalization_rule_name="identity", byte_fallback=True,
                              treat_whitespace_as_suffix=True, add_dummy_prefix=False,
                              remove_extra_whitespaces=False),
    "afm150k_id": dict(vocab_size=153600, character_coverage=0.9999, normalization_rule_name="identity", byte_fallback=True,
                       remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
                       pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
                       max_sentencepiece_length=16),
    # AFM-sized, English-heavy (tests/gen/gen_english_corpus.py's english_train.txt next to train.txt if present)
    "afm150k_en": dict(vocab_size=153600, character_coverage=0.9999, normalization_rule_name="identity",
                       byte_fallback=True, remove_extra_whitespaces=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                       hard_vocab_limit=False, extra_input="english_train.txt"),
}

def main():
    corpus, out = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or [n for n in MODELS if n != "afm150k_id"]
    os.makedirs(out, exist_ok=True)
    for name in names:
        opts = dict(MODELS[name])
        inp = os.path.join(corpus, "train.txt")
        extra = opts.pop("extra_input", None)
        if extra and os.path.exists(os.path.join(corpus, extra)):
            inp = inp + "," + os.path.join(corpus, extra)
        if opts.pop("small_chars", False):
            # small vocabularies cannot hold the CJK/Hangul repertoire: train them on the other scripts
            # (CJK text then exercises byte fallback / unknown handling)
            inp = os.path.join(out, "train_small.txt")
            if not os.path.exists(inp):
                with open(os.path.join(corpus, "train.txt"), encoding="utf-8") as f, open(inp, "w", encoding="utf-8") as g:
                    for line in f:
                        if all(ord(c) < 0x3000 for c in line):
                            g.write(line)
        spm.SentencePieceTrainer.train(
            input=inp, model_prefix=os.path.join(out, name), model_type="bpe",
            user_defined_symbols=AFM_SYMBOLS, character_coverage=opts.pop("character_coverage", 0.9995),
            num_threads=2, minloglevel=2, input_sentence_size=0, max_sentence_length=1 << 16, **opts)
        print("trained", name, flush=True)


def variants(src, out):
    """Edits a trained model's proto into configurations the trainer does not produce: UNUSED pieces
    (sentencepiece's resegmentation), escape_whitespaces=false, extra CONTROL pieces and user-defined
    pieces that share prefixes with the AFM markers.
        python3 tests/gen/train_tok_models.py --variants MODELS/afm1k_id.model OUTDIR"""
    from sentencepiece import sentencepiece_model_pb2 as pb
    base = pb.ModelProto()
    base.ParseFromString(open(src, "rb").read())
    os.makedirs(out, exist_ok=True)
    m = pb.ModelProto(); m.CopyFrom(base)
    k = 0
    for p in m.pieces:
        if p.type == pb.ModelProto.SentencePiece.NORMAL and len(p.piece) >= 2:
            k += 1
            if k % 7 == 0:
                p.type = pb.ModelProto.SentencePiece.UNUSED
    open(os.path.join(out, "var_unused.model"), "wb").write(m.SerializeToString())
    m = pb.ModelProto(); m.CopyFrom(base)
    m.normalizer_spec.escape_whitespaces = False
    open(os.path.join(out, "var_noescape.model"), "wb").write(m.SerializeToString())
    m = pb.ModelProto(); m.CopyFrom(base)
    for s in ["<ctl>", "<<", "x"] if "x" not in [p.piece for p in m.pieces] else ["<ctl>", "<<"]:
        x = m.pieces.add(); x.piece = s; x.score = 0.0; x.type = pb.ModelProto.SentencePiece.CONTROL
    for s in ["<tu", "<turn", "ab<", "▁the▁"]:
        x = m.pieces.add(); x.piece = s; x.score = 0.0; x.type = pb.ModelProto.SentencePiece.USER_DEFINED
    open(os.path.join(out, "var_shadow.model"), "wb").write(m.SerializeToString())
    print("variants written")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--variants":
        variants(sys.argv[2], sys.argv[3])
    else:
        main()
