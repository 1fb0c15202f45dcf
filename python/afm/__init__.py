"""Python bindings for afm.h (ctypes over libafm, the library built from the header).

    import afm
    model = afm.Model("models/mini/base.afm")
    print(model.generate("In the beginning", max_tokens=40))

Model: load, tokenize / detokenize, chat prompts, generate / stream (text), adapters, sessions.
Session: eval token ids, logits as a NumPy array, rewind, save / load its state.
Sampling parameters everywhere: temperature, top_k, top_p, min_p, seed, repeat_penalty,
presence_penalty, frequency_penalty, penalty_last_n, logit_bias ({id: bias}), stop (strings).
Errors raise afm.Error with the library's message."""
import ctypes as C
import json
import os

import numpy as np

__all__ = ["Model", "Session", "Adapter", "Error", "library_path"]


def library_path():
    """The shared library: $AFM_LIB, else the one built into this package (pip install), else the
    repository's libafm.so (make lib)."""
    if os.environ.get("AFM_LIB"):
        return os.environ["AFM_LIB"]
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "libafm.so"), os.path.join(here, "libafm.dylib"),
                 os.path.join(here, "..", "..", "libafm.so")):
        if os.path.exists(cand):
            return cand
    raise OSError("afm: libafm not found: pip install ./python, or `make lib` and set AFM_LIB")


class Error(RuntimeError):
    """A failed afm.h call; the message is the library's."""


# ---- the C structs and functions used here (afm.h's public API) ----

class _Config(C.Structure):
    _fields_ = [(n, C.c_int) for n in ("vocab_size", "dim", "n_layers", "n_reuse_layers", "n_heads", "n_kv_heads",
                                       "head_dim", "ffn_dim", "context_length")] + \
               [("rope_theta", C.c_float), ("norm_eps", C.c_float), ("qk_norm_eps", C.c_float),
                ("has_kv_scales", C.c_int), ("lora_rank", C.c_int), ("lora_alpha", C.c_float), ("signature", C.c_char * 41)]


class _LogitBias(C.Structure):
    _fields_ = [("token", C.c_int32), ("bias", C.c_float)]


class _SamplerParams(C.Structure):
    _fields_ = [("temperature", C.c_float), ("top_k", C.c_int), ("top_p", C.c_float), ("min_p", C.c_float),
                ("seed", C.c_uint64), ("repeat_penalty", C.c_float), ("presence_penalty", C.c_float),
                ("frequency_penalty", C.c_float), ("penalty_last_n", C.c_int),
                ("logit_bias", C.POINTER(_LogitBias)), ("n_logit_bias", C.c_int)]


class _SessionParams(C.Structure):
    _fields_ = [(n, C.c_int) for n in ("n_ctx", "n_threads", "n_batch", "all_logits", "preallocate", "kv_type",
                                       "f32_activations", "kernels")]


class _ChatMessage(C.Structure):
    _fields_ = [("role", C.c_char_p), ("content", C.c_char_p)]


class _Detokenizer(C.Structure):
    _fields_ = [("tok", C.c_void_p), ("flags", C.c_uint), ("at_start", C.c_int), ("bos_ws_seen", C.c_int),
                ("text_empty", C.c_int), ("n_pending", C.c_int), ("pending", C.c_ubyte * 4)]


_lib = C.CDLL(library_path())
_P, _I, _SZ, _ERR = C.c_void_p, C.c_int, C.c_size_t, C.c_char_p
_REGEX, _GBNF, _JSON_SCHEMA = 1, 2, 3  # afm_constraint_kind


class _StateHandle(C.c_void_p):
    """A constraint state pointer that also keeps its compiled constraint."""
    _constraint = None
for name, res, args in [
    ("afm_result_string", C.c_char_p, [_I]),
    ("afm_model_load_file", _I, [C.c_char_p, _P, C.POINTER(_P), _ERR, _SZ]),
    ("afm_model_free", None, [_P]),
    ("afm_model_config", C.POINTER(_Config), [_P]),
    ("afm_model_tokenizer", _I, [_P, _P, C.POINTER(_P), _ERR, _SZ]),
    ("afm_tokenizer_free", None, [_P]),
    ("afm_tokenizer_special", C.c_int32, [_P, _I]),
    ("afm_tokenizer_max_token_bytes", _SZ, [_P]),
    ("afm_tokenize", _I, [_P, C.c_char_p, _SZ, C.c_uint, C.POINTER(C.c_int32), _SZ, C.POINTER(_SZ)]),
    ("afm_detokenize", _I, [_P, C.POINTER(C.c_int32), _SZ, C.c_uint, C.c_char_p, _SZ, C.POINTER(_SZ)]),
    ("afm_chat_tokenize", _I, [_P, C.POINTER(_ChatMessage), _I, _P, _I, _I, C.POINTER(C.c_int32), _SZ, C.POINTER(_SZ)]),
    ("afm_detokenizer_init", None, [C.POINTER(_Detokenizer), _P, C.c_uint]),
    ("afm_detokenizer_push", _I, [C.POINTER(_Detokenizer), C.c_int32, C.c_char_p, _SZ, C.POINTER(_SZ)]),
    ("afm_detokenizer_flush", _I, [C.POINTER(_Detokenizer), C.c_char_p, _SZ, C.POINTER(_SZ)]),
    ("afm_session_create", _I, [_P, C.POINTER(_SessionParams), C.POINTER(_P)]),
    ("afm_session_free", None, [_P]),
    ("afm_session_eval", _I, [_P, C.POINTER(C.c_int32), _I]),
    ("afm_session_logits", C.POINTER(C.c_float), [_P, _I]),
    ("afm_session_rewind", _I, [_P, _I]),
    ("afm_session_pos", _I, [_P]),
    ("afm_session_tokens", C.POINTER(C.c_int32), [_P, C.POINTER(_I)]),
    ("afm_session_error", C.c_char_p, [_P]),
    ("afm_session_set_adapter", _I, [_P, _P]),
    ("afm_session_save_file", _I, [_P, C.c_char_p, _ERR, _SZ]),
    ("afm_session_load_file", _I, [_P, C.c_char_p, _ERR, _SZ]),
    ("afm_adapter_load", _I, [_P, C.c_char_p, _P, C.POINTER(_P), _ERR, _SZ]),
    ("afm_adapter_embedded", _I, [_P, C.POINTER(_P), _ERR, _SZ]),
    ("afm_adapter_free", None, [_P]),
    ("afm_sampler_create", _I, [C.POINTER(_SamplerParams), _I, _P, C.POINTER(_P)]),
    ("afm_sampler_free", None, [_P]),
    ("afm_sampler_sample", C.c_int32, [_P, C.POINTER(C.c_float)]),
    ("afm_sampler_accept", _I, [_P, C.c_int32]),
    ("afm_stop_create", _I, [C.POINTER(C.c_char_p), _I, _P, C.POINTER(_P)]),
    ("afm_stop_free", None, [_P]),
    ("afm_stop_push", _I, [_P, C.c_char_p, _SZ, C.POINTER(C.c_void_p), C.POINTER(_SZ)]),
    ("afm_stop_flush", None, [_P, C.POINTER(C.c_void_p), C.POINTER(_SZ)]),
    ("afm_constraint_compile", _I, [_I, C.c_char_p, _SZ, _P, C.POINTER(_P), _ERR, _SZ]),
    ("afm_constraint_free", None, [_P]),
    ("afm_constraint_vocab_create", _I, [_P, _P, C.POINTER(_P)]),
    ("afm_constraint_vocab_free", None, [_P]),
    ("afm_constraint_state_create", _I, [_P, _P, C.POINTER(_P)]),
    ("afm_constraint_state_free", None, [_P]),
    ("afm_constraint_state_mask", C.POINTER(C.c_uint32), [_P]),
    ("afm_constraint_state_advance", _I, [_P, C.c_int32]),
    ("afm_constraint_state_error", C.c_char_p, [_P]),
    ("afm_sampler_sample_masked", C.c_int32, [_P, C.POINTER(C.c_float), C.POINTER(C.c_uint32)]),
]:
    f = getattr(_lib, name)
    f.restype, f.argtypes = res, args

_TOK_AFM = 1
_EOS, _TURN_END = 1, 6


def _check(r, what):
    if r != 0:
        raise Error("%s: %s" % (what, _lib.afm_result_string(r).decode()))


def _ids(tokens):
    arr = (C.c_int32 * len(tokens))(*tokens)
    return arr


class Adapter:
    """A LoRA adapter loaded against a model (an .afma file, an .fmadapter directory, or 'base')."""

    def __init__(self, model, path):
        self._model = model  # the model must outlive the adapter
        self._ptr = _P()
        err = C.create_string_buffer(512)
        r = (_lib.afm_adapter_embedded(model._ptr, C.byref(self._ptr), err, 512) if path == "base"
             else _lib.afm_adapter_load(model._ptr, path.encode(), None, C.byref(self._ptr), err, 512))
        if r != 0:
            raise Error(err.value.decode(errors="replace"))
        self.path = path

    def __del__(self):
        if getattr(self, "_ptr", None):
            _lib.afm_adapter_free(self._ptr)
            self._ptr = None


class Session:
    """One conversation: a KV cache over the model. eval() token ids, logits() as NumPy."""

    def __init__(self, model, adapter=None, n_ctx=0, n_threads=1, all_logits=False):
        self._model = model
        self._adapter = adapter
        self.n_ctx = n_ctx or model.context_length
        p = _SessionParams(n_ctx=n_ctx, n_threads=n_threads, all_logits=int(all_logits))
        self._ptr = _P()
        _check(_lib.afm_session_create(model._ptr, C.byref(p), C.byref(self._ptr)), "afm_session_create")
        if adapter is not None:
            self._call(_lib.afm_session_set_adapter(self._ptr, adapter._ptr), "set_adapter")

    def __del__(self):
        if getattr(self, "_ptr", None):
            _lib.afm_session_free(self._ptr)
            self._ptr = None

    def _call(self, r, what):
        if r != 0:
            raise Error("%s: %s" % (what, _lib.afm_session_error(self._ptr).decode(errors="replace")))

    def eval(self, tokens):
        """Appends token ids at the current position and runs the model over them."""
        tokens = list(tokens)
        if tokens:
            self._call(_lib.afm_session_eval(self._ptr, _ids(tokens), len(tokens)), "eval")

    def logits(self, i=-1):
        """The logits of position i of the last eval (a copy, float32, shape (vocab_size,))."""
        p = _lib.afm_session_logits(self._ptr, i)
        if not p:
            raise Error("no logits for position %d (eval first; all_logits=True keeps every position)" % i)
        return np.ctypeslib.as_array(p, shape=(self._model.vocab_size,)).copy()

    @property
    def pos(self):
        return _lib.afm_session_pos(self._ptr)

    @property
    def tokens(self):
        n = C.c_int()
        p = _lib.afm_session_tokens(self._ptr, C.byref(n))
        return [p[i] for i in range(n.value)]

    def rewind(self, pos):
        self._call(_lib.afm_session_rewind(self._ptr, pos), "rewind")

    def save(self, path):
        """Saves the session's state (tokens, KV cache, last logits) to a file."""
        err = C.create_string_buffer(512)
        if _lib.afm_session_save_file(self._ptr, os.fsencode(path), err, 512) != 0:
            raise Error(err.value.decode(errors="replace"))

    def load(self, path):
        """Restores a state saved by save(), with the same model and adapter."""
        err = C.create_string_buffer(512)
        if _lib.afm_session_load_file(self._ptr, os.fsencode(path), err, 512) != 0:
            raise Error(err.value.decode(errors="replace"))

    def stream(self, prompt_tokens, max_tokens=64, stop=None, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
               repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=0, logit_bias=None,
               stop_tokens=None, continuation=False, json_schema=None, grammar=None, regex=None, _ids_out=None):
        """Evaluates prompt_tokens (may be empty to continue) and yields the generated text piece by
        piece (whole UTF-8 characters), until max_tokens, EOS / <turn_end>, or a stop string.
        continuation: the prompt is text being continued (its pieces set the spacing of the first one).
        json_schema (a dict or JSON text), grammar (GBNF) or regex: guided generation - every token
        is sampled among those that keep the output a possible match (docs/CONSTRAINTS.md)."""
        m = self._model
        cs = None
        given = [(k, v) for k, v in ((_JSON_SCHEMA, json_schema), (_GBNF, grammar), (_REGEX, regex)) if v is not None]
        if len(given) > 1:
            raise Error("give one of json_schema, grammar, regex")
        if given:
            cs = m._constraint_state(*given[0])
        bias = list((logit_bias or {}).items())
        barr = (_LogitBias * max(1, len(bias)))(*[_LogitBias(int(k), float(v)) for k, v in bias])
        sp = _SamplerParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                            repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n,
                            logit_bias=barr if bias else None, n_logit_bias=len(bias))
        sm, st = _P(), _P()
        _check(_lib.afm_sampler_create(C.byref(sp), m.vocab_size, None, C.byref(sm)), "sampler (bad parameters?)")
        stops = [s.encode() for s in ([stop] if isinstance(stop, str) else (stop or []))]
        sarr = (C.c_char_p * max(1, len(stops)))(*stops)
        try:
            _check(_lib.afm_stop_create(sarr, len(stops), None, C.byref(st)), "stop strings (each must be non-empty)")
            end = set(m._eog if stop_tokens is None else stop_tokens)
            d = _Detokenizer()
            _lib.afm_detokenizer_init(C.byref(d), m._tok, _TOK_AFM)
            cap = _lib.afm_tokenizer_max_token_bytes(m._tok) + 16
            buf = C.create_string_buffer(cap)
            n, out, n_out = _SZ(), C.c_void_p(), _SZ()
            prompt_tokens = list(prompt_tokens)
            self.eval(prompt_tokens)
            for t in prompt_tokens[1:] if continuation else []:
                _lib.afm_detokenizer_push(C.byref(d), t, buf, cap, C.byref(n))  # spacing of a continuation
            if repeat_penalty not in (0, 1) or presence_penalty or frequency_penalty:
                for t in self.tokens:  # the context enters the penalty window, as in afm_generate
                    _lib.afm_sampler_accept(sm, t)
            stopped = False
            for _ in range(max_tokens):
                lg = _lib.afm_session_logits(self._ptr, -1)
                if not lg:
                    raise Error("nothing to continue from: give prompt tokens")
                if cs:
                    mask = _lib.afm_constraint_state_mask(cs)
                    if not mask:
                        raise Error("constraint: %s" % _lib.afm_constraint_state_error(cs).decode(errors="replace"))
                    tok = _lib.afm_sampler_sample_masked(sm, lg, mask)
                else:
                    tok = _lib.afm_sampler_sample(sm, lg)
                if tok < 0:
                    raise Error("the logits are not finite (NaN or +inf, or every token banned)")
                if cs:
                    _check(_lib.afm_constraint_state_advance(cs, tok), "constraint advance")
                _lib.afm_sampler_accept(sm, tok)
                if _ids_out is not None:
                    _ids_out.append(tok)
                if self.pos < self.n_ctx:
                    self.eval([tok])
                if tok in end:
                    stopped = True
                    break
                _lib.afm_detokenizer_push(C.byref(d), tok, buf, cap, C.byref(n))
                r = _lib.afm_stop_push(st, buf.raw[:n.value], n.value, C.byref(out), C.byref(n_out))
                if n_out.value:
                    yield C.string_at(out, n_out.value).decode("utf-8", errors="replace")
                if r != 0:
                    stopped = True
                    break
                if self.pos >= self.n_ctx:
                    break
            if not stopped:
                _lib.afm_detokenizer_flush(C.byref(d), buf, cap, C.byref(n))
                if _lib.afm_stop_push(st, buf.raw[:n.value], n.value, C.byref(out), C.byref(n_out)) == 0:
                    text = C.string_at(out, n_out.value) if n_out.value else b""
                    _lib.afm_stop_flush(st, C.byref(out), C.byref(n_out))
                    text += C.string_at(out, n_out.value) if n_out.value else b""
                else:
                    text = C.string_at(out, n_out.value) if n_out.value else b""
                if text:
                    yield text.decode("utf-8", errors="replace")
        finally:
            _lib.afm_sampler_free(sm)
            _lib.afm_stop_free(st)
            if cs:
                _lib.afm_constraint_state_free(cs)
                _lib.afm_constraint_free(cs._constraint)


class Model:
    """A model file (.afm) and its embedded tokenizer."""

    def __init__(self, path):
        self._ptr, self._tok = _P(), _P()
        err = C.create_string_buffer(512)
        if _lib.afm_model_load_file(os.fsencode(path), None, C.byref(self._ptr), err, 512) != 0:
            self._ptr = None
            raise Error(err.value.decode(errors="replace"))
        if _lib.afm_model_tokenizer(self._ptr, None, C.byref(self._tok), err, 512) != 0:
            raise Error(err.value.decode(errors="replace"))
        cfg = _lib.afm_model_config(self._ptr).contents
        self.vocab_size, self.context_length = cfg.vocab_size, cfg.context_length
        self._eos = _lib.afm_tokenizer_special(self._tok, _EOS)
        self._eog = [t for t in (self._eos, _lib.afm_tokenizer_special(self._tok, _TURN_END)) if t >= 0]
        self._adapters = {}

    def _constraint_state(self, kind, text):
        """A constraint compiled from text (a dict is written as JSON) and a state at its start."""
        if isinstance(text, dict):
            text = json.dumps(text)
        b = text.encode() if isinstance(text, str) else bytes(text)
        if not getattr(self, "_cvocab", None):
            self._cvocab = _P()
            _check(_lib.afm_constraint_vocab_create(self._tok, None, C.byref(self._cvocab)), "constraint vocabulary")
        c, st = _P(), _StateHandle()
        err = C.create_string_buffer(512)
        if _lib.afm_constraint_compile(kind, b, len(b), None, C.byref(c), err, 512) != 0:
            raise Error(err.value.decode(errors="replace"))
        r = _lib.afm_constraint_state_create(c, self._cvocab, C.byref(st))
        if r != 0:
            _lib.afm_constraint_free(c)
            _check(r, "constraint state")
        st._constraint = c
        return st

    def __del__(self):
        if getattr(self, "_cvocab", None):
            _lib.afm_constraint_vocab_free(self._cvocab)
            self._cvocab = None
        if getattr(self, "_tok", None):
            _lib.afm_tokenizer_free(self._tok)
        if getattr(self, "_ptr", None):
            self._adapters.clear()
            _lib.afm_model_free(self._ptr)
            self._ptr = None

    def tokenize(self, text, chat=False, system=None):
        """Token ids: of the text (AFM newline layer), or of a chat prompt when chat=True (text is
        then the user's turn, or a list of {"role", "content"} messages)."""
        n = _SZ()
        if chat:
            msgs = text if isinstance(text, list) else ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": text}]
            arr = (_ChatMessage * len(msgs))(*[_ChatMessage(x["role"].encode(), x["content"].encode()) for x in msgs])
            r = _lib.afm_chat_tokenize(self._tok, arr, len(msgs), None, 0, 1, None, 0, C.byref(n))
            out = (C.c_int32 * max(1, n.value))()
            _check(_lib.afm_chat_tokenize(self._tok, arr, len(msgs), None, 0, 1, out, n.value, C.byref(n)), "chat_tokenize")
            return list(out[:n.value])
        b = text.encode()
        _lib.afm_tokenize(self._tok, b, len(b), _TOK_AFM, None, 0, C.byref(n))
        out = (C.c_int32 * max(1, n.value))()
        _check(_lib.afm_tokenize(self._tok, b, len(b), _TOK_AFM, out, n.value, C.byref(n)), "tokenize")
        return list(out[:n.value])

    def detokenize(self, tokens):
        tokens = list(tokens)
        n = _SZ()
        _lib.afm_detokenize(self._tok, _ids(tokens), len(tokens), _TOK_AFM, None, 0, C.byref(n))
        buf = C.create_string_buffer(n.value + 1)
        _check(_lib.afm_detokenize(self._tok, _ids(tokens), len(tokens), _TOK_AFM, buf, n.value + 1, C.byref(n)), "detokenize")
        return buf.raw[:n.value].decode("utf-8", errors="replace")

    def load_adapter(self, path, name=None):
        """Loads a LoRA adapter; it can then be named in generate(adapter=...)."""
        ad = Adapter(self, path)
        self._adapters[name or path] = ad
        return ad

    def session(self, adapter=None, **kw):
        if isinstance(adapter, str):
            adapter = self._adapters.get(adapter) or self.load_adapter(adapter)
        return Session(self, adapter, **kw)

    def stream(self, prompt, chat=False, system=None, adapter=None, n_threads=1, **sampling):
        """Yields the continuation of a text (EOS, then the text, as `afm -p`), or the reply to a
        chat prompt (chat=True), piece by piece."""
        s = self.session(adapter, n_threads=n_threads)
        ids = self.tokenize(prompt, chat=True, system=system) if chat else [self._eos] + self.tokenize(prompt)
        yield from s.stream(ids, continuation=not chat, **sampling)

    def generate(self, prompt, **kw):
        """The whole text of stream()."""
        return "".join(self.stream(prompt, **kw))

    def chat(self, messages, **kw):
        """The assistant's reply to a list of {"role", "content"} messages."""
        return self.generate(messages, chat=True, **kw)
