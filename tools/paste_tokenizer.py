#!/usr/bin/env python3
"""Pastes wip/tokenizer.h into afm.h (a convenience for the merge; review the result).

    python3 tools/paste_tokenizer.py afm.h wip/tokenizer.h > afm.h.new

The TOKENIZER API block goes just before the declaration part's closing `extern "C"` brace, the
TOKENIZER block just before `#endif /* AFM_IMPLEMENTATION_DONE */` (move it after the file loader if
you prefer the ARCHITECTURE.md order: it depends only on the allocator types and
afm_model_tokenizer_bytes). Both blocks keep their banners."""
import sys

def main():
    afm = open(sys.argv[1], encoding="utf-8").read()
    w = open(sys.argv[2], encoding="utf-8").read()
    api = w[w.index("/* ==== TOKENIZER API ==== */"):w.index("/* ==== END TOKENIZER API ==== */")]
    impl = w[w.index("/* ==== TOKENIZER ==== */"):w.index("/* ==== END TOKENIZER ==== */")]
    if "/* ==== TOKENIZER API ==== */" in afm:
        sys.exit("afm.h already has the tokenizer")
    i = afm.index("#ifdef __cplusplus\n}\n#endif\n#endif /* AFM_H */")
    afm = afm[:i] + api + afm[i:]
    j = afm.index("#endif /* AFM_IMPLEMENTATION_DONE */")
    afm = afm[:j] + impl + afm[j:]
    sys.stdout.write(afm)

if __name__ == "__main__":
    main()
