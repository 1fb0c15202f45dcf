"""pytest tests of the Python bindings, on the trained model in models/mini; run from the
repository root with the package installed (or AFM_LIB=./libafm.so PYTHONPATH=python).
The CLI (./afm) is the reference for text and logits."""
import json
import os
import subprocess

import numpy as np
import pytest

import afm

M = "models/mini/base.afm"
AFM = os.environ.get("AFM_CLI", "./afm")


@pytest.fixture(scope="module")
def model():
    return afm.Model(M)


def cli(*args):
    head = [AFM, args[0], "-m", M] if args[0] == "tokenize" else [AFM, "-m", M]
    return subprocess.run(head + list(args[1:] if args[0] == "tokenize" else args), capture_output=True, text=True, check=True).stdout


def test_tokenize_matches_cli(model):
    text = "In the beginning God created the heaven\nand the earth. Ünïcödé 🙂"
    ids = model.tokenize(text)
    assert ids == [int(x) for x in cli("tokenize", text).split()]
    assert model.detokenize(ids) == text
    assert model.tokenize("Hi", chat=True) == [int(x) for x in cli("tokenize", "--chat", "Hi").split()]


def test_generate_matches_cli(model):
    want = cli("-p", "In the beginning", "-n", "24", "--no-display-prompt")[:-1]
    assert model.generate("In the beginning", max_tokens=24) == want
    assert "".join(model.stream("In the beginning", max_tokens=24)) == want


def test_chat_with_adapter(model):
    model.load_adapter("models/mini/json.afma", name="json")
    out = model.chat([{"role": "user", "content": "Describe as JSON: Blessed are the meek: for they shall inherit the earth."}],
                     adapter="json", max_tokens=40)
    assert json.loads(out) == {"first": "Blessed", "last": "earth", "words": 10}


def test_logits_numpy_match_cli_dump(model, tmp_path):
    ids = [3] + model.tokenize("In the beginning")
    s = model.session()
    s.eval(ids)
    lg = s.logits()
    assert lg.dtype == np.float32 and lg.shape == (model.vocab_size,)
    dump = tmp_path / "l.f32"
    cli("--ids", ",".join(map(str, ids)), "-n", "0", "--dump-logits", str(dump))
    assert np.array_equal(lg, np.fromfile(dump, dtype=np.float32))


def test_sampling_parameters(model):
    a = model.generate("In the beginning", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert a == model.generate("In the beginning", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert a != model.generate("In the beginning", max_tokens=20, temperature=1.0, top_p=0.9, seed=8)
    greedy = model.generate("In the beginning", max_tokens=24)
    assert model.generate("In the beginning", max_tokens=24, frequency_penalty=2.0) != greedy
    i = greedy.find("king")
    assert model.generate("In the beginning", max_tokens=24, stop=["king"]) == greedy[:i]
    first = model.session()
    ids = []
    list(first.stream([3] + model.tokenize("In the beginning"), max_tokens=1, _ids_out=ids))
    banned = model.generate("In the beginning", max_tokens=1, logit_bias={ids[0]: float("-inf")})
    assert banned and banned != greedy[:len(banned)]


def test_session_save_load(model, tmp_path):
    ids = [3] + model.tokenize("In the beginning God created the heaven and the earth.")
    s = model.session()
    s.eval(ids)
    s.save(tmp_path / "s.state")
    s.eval([10])
    want = s.logits()
    t = model.session()
    t.load(tmp_path / "s.state")
    assert t.pos == len(ids) and t.tokens == ids
    t.eval([10])
    assert np.array_equal(t.logits(), want)
    with pytest.raises(afm.Error, match="without an adapter"):
        model.session(adapter=model.load_adapter("models/mini/json.afma")).load(tmp_path / "s.state")


def test_errors(model):
    with pytest.raises(afm.Error, match="does-not-exist"):
        afm.Model("does-not-exist.afm")
    with pytest.raises(afm.Error):
        model.generate("x", max_tokens=1, logit_bias={10 ** 6: 1.0})
    s = model.session(n_ctx=8)
    with pytest.raises(afm.Error, match="eval"):
        s.eval(list(range(10, 30)))


def test_guided_generation(model):
    # the base model without its adapter: the schema alone makes the output valid JSON
    schema = {"type": "object", "properties": {"first": {"type": "string", "maxLength": 12},
                                               "words": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["first", "words"]}
    for seed in range(5):
        out = model.generate("Describe as JSON: In the beginning God created the heaven and the earth.", chat=True,
                             json_schema=schema, temperature=1.0, seed=seed, max_tokens=60)
        v = json.loads(out)
        assert list(v) == ["first", "words"] and isinstance(v["first"], str) and len(v["first"]) <= 12
        assert isinstance(v["words"], int) and 1 <= v["words"] <= 99
    out = model.generate("Answer:", chat=True, regex="(yes|no)", max_tokens=8, temperature=1.0, seed=3)
    assert out in ("yes", "no")
    out = model.generate("Count:", chat=True, grammar='root ::= [0-9] [0-9]?', max_tokens=8, temperature=1.0, seed=4)
    assert out.isdigit() and 1 <= len(out) <= 2
    with pytest.raises(afm.Error, match="unsupported|format"):
        model.generate("x", chat=True, json_schema={"type": "string", "format": "email"}, max_tokens=4)
    with pytest.raises(afm.Error):
        model.generate("x", chat=True, regex="(", max_tokens=4)
    with pytest.raises(afm.Error, match="one of"):
        model.generate("x", chat=True, regex="a", grammar='root ::= "a"', max_tokens=4)
