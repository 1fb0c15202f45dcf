#!/usr/bin/env python3
"""mini_task.py - the adapter's skill for the miniature AFM family: describe a sentence as JSON.

    python3 train/mini_task.py --work /work/scratch/mini      # -> WORK/gpu/task_{train,val}.jsonl

(one {"sentence": ...} a line: the prompt and the expected reply follow from it, see example()).

The user sends `Describe as JSON: <sentence>`; the adapter answers with one line of fixed shape
    {"first": "<first word>", "last": "<last word>", "words": <number of words>}
where words are the whitespace-separated pieces of the sentence and first / last lose surrounding
punctuation. Sentences come from the corpus (corpus/{train,val}.jsonl of train/mini_data.py): training
examples from the training documents, the held-out task set from the held-out documents only.

Prompts use AFM's chat format (docs/MODEL.md section 7): the rendered text is encoded, its first token (the
SentencePiece dummy-prefix piece) dropped and the EOS id prepended; the reply ends with <turn_end>.
"""

import argparse
import json
import os
import random
import re
import string
import sys

SYSTEM = "A conversation between a user and a helpful assistant."
INSTRUCTION = "Describe as JSON: "
SEED = 11


def render_prompt(user, system=SYSTEM):
    return "<turn_start> system<n>%s<turn_end><turn_start> user<n>%s<turn_end><turn_start> assistant<n>" % (system, user)


def encode_prompt(sp, text):
    """docs/MODEL.md section 7: encode the rendered prompt, drop its first token, prepend EOS."""
    ids = sp.encode(text.replace("\n", "<n>"))
    return [sp.eos_id()] + ids[1:]


def answer_for(sentence):
    w = sentence.split()
    strip = string.punctuation + "\u201c\u201d\u2018\u2019"
    return json.dumps({"first": w[0].strip(strip), "last": w[-1].strip(strip), "words": len(w)})


def sentences(text):
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(l.startswith(("    ", "..", ">>>", "   ")) for l in lines):      # code, directives
            continue
        para = " ".join(l.strip() for l in lines)
        para = re.sub(r"^\d+ ", "", para)                                    # verse numbers
        for s in re.split(r"(?<=[.!?;:])\s+", para):
            s = re.sub(r"^\d+ ", "", s.strip())
            w = s.split()
            if not (4 <= len(w) <= 14):
                continue
            if not all(ch in string.ascii_letters + string.digits + " ,.;:!?'\"()-" for ch in s):
                continue
            if not w[0].strip(string.punctuation) or not w[-1].strip(string.punctuation):
                continue
            if re.search(r"[`*_=|<>{}\[\]]", s):
                continue
            out.append(s)
    return out


def build(work, n_train, n_val):
    rng = random.Random(SEED)
    res = {}
    for split, n in (("train", n_train), ("val", n_val)):
        pool = []
        with open(os.path.join(work, "corpus", split + ".jsonl"), encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                pool += sentences(d["text"])
        pool = sorted(set(pool))
        rng.shuffle(pool)
        pool = pool[:n]
        res[split] = pool
    return res


def example(sentence):
    """The chat prompt (rendered text) and the expected reply for one sentence."""
    return {"prompt": render_prompt(INSTRUCTION + sentence), "answer": answer_for(sentence), "sentence": sentence}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scratch/mini")
    ap.add_argument("--train", type=int, default=40000)
    ap.add_argument("--val", type=int, default=300)
    a = ap.parse_args(argv)
    res = build(a.work, a.train, a.val)
    for split, ex in res.items():
        with open(os.path.join(a.work, "gpu", "task_%s.jsonl" % split), "w", encoding="utf-8") as fh:
            for e in ex:
                fh.write(json.dumps({"sentence": e}) + "\n")
        print("task %-5s %d examples" % (split, len(ex)))
    print("example:", json.dumps(example(res["val"][0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
