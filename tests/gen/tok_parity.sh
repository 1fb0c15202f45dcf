#!/bin/sh
# The large tokenizer parity run (not part of `make test`: it needs the Python references, downloads two
# PyPI packages and takes a few minutes). Everything goes to build/tok (ignored).
#   sh tests/gen/tok_parity.sh            corpus (~8.5 MB + English docstrings) -> models -> vectors -> C comparisons -> bench
# Needs: python3 with sentencepiece, tokenizers, regex; pip (for mistral-common and litellm, which ship
# real SentencePiece BPE models and tokenizer.json files).
set -e
cd "$(dirname "$0")/../.."
W=build/tok
mkdir -p $W/models $W/vec $W/pkg
python3 tests/gen/gen_tok_corpus.py $W/corpus
[ -f $W/corpus/english_bench.txt ] || python3 tests/gen/gen_english_corpus.py $W/corpus --mb 12
python3 tests/gen/train_tok_models.py $W/corpus $W/models afm1k_id afm8k_nfkc afm32k_id bpe4k_nofb_cf bpe3k_suffix_nodp afm150k_id afm150k_en
if [ ! -f $W/pkg/anthropic_tokenizer.json ]; then
    pip download --no-deps -q -d $W/pkg mistral-common litellm
    (cd $W/pkg && for w in *.whl; do python3 -m zipfile -e "$w" x; done &&
     cp x/mistral_common/data/tokenizer.model.v1 ../models/mistral_v1.model &&
     cp x/mistral_common/data/mistral_instruct_tokenizer_240323.model.v3 ../models/mistral_v3.model &&
     cp x/litellm/litellm_core_utils/tokenizers/* . && rm -rf x)
fi
python3 tests/gen/make_hf_tokenizers.py real $W/pkg $W/models
python3 tests/gen/train_tok_models.py --variants $W/models/afm1k_id.model $W/models
cc -std=c99 -O2 tests/test_tokenizer.c -o $W/test_tokenizer -lm -lpthread
status=0
for m in afm1k_id afm8k_nfkc afm32k_id bpe4k_nofb_cf bpe3k_suffix_nodp afm150k_id afm150k_en mistral_v1 mistral_v3 var_unused var_noescape; do
    python3 tests/gen/gen_tok_vectors.py $W/models/$m.model $W/vec/$m.txt --corpus $W/corpus
    $W/test_tokenizer --vectors $W/models/$m.model 1 $W/vec/$m.txt | tail -n 2 || status=1
done
for m in anthropic cl100k_llama3 cl100k_qwen2_nfc; do
    python3 tests/gen/gen_tok_vectors.py $W/models/$m.json $W/vec/$m.txt --corpus $W/corpus
    tail -n 1 $W/vec/$m.txt
    $W/test_tokenizer --vectors $W/models/$m.json 2 $W/vec/$m.txt | tail -n 2 || status=1
done
for m in tok_hf_gpt2_nfkc tok_hf_gpt2_prefix tok_hf_llama3 tok_hf_qwen2_nfc; do
    python3 tests/gen/gen_tok_vectors.py tests/vectors/$m.json $W/vec/$m.txt --corpus $W/corpus
    $W/test_tokenizer --vectors tests/vectors/$m.json 2 $W/vec/$m.txt | tail -n 2 || status=1
done
python3 tests/gen/check_unicode_tables.py $W/test_tokenizer $W/unicode || status=1
# speed: the AFM-sized English-heavy model on held-out English prose, next to sentencepiece and tokenizers
cc -std=c99 -O2 bench/bench_tokenizer.c -o $W/bench_tokenizer -lm -lpthread
python3 bench/bench_tokenizer.py $W/bench_tokenizer $W/models/afm150k_en.model $W/corpus/english_bench.txt 3 5
exit $status
