"""Load test of afm-server: 200 requests from 16 concurrent clients, the server built with
AddressSanitizer + UndefinedBehaviorSanitizer (leak check at exit).

    python3 tests/load_server.py SERVER_BINARY [N_REQUESTS] [N_CLIENTS]

The mix: chat and completions, streamed and not, the base model and the JSON adapter, some with a
stop string, and one in ten with response_format json_schema (constrained decoding). Every greedy answer must equal the one the same server gave when it was
idle; every refusal must be the expected 400. Then SIGTERM: the server must exit 0 with no
sanitizer report. Prints p50/p99 latency and tokens/s, then "N passed, N failed"."""
import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time

import jsonschema
import openai

SERVER = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
CLIENTS = int(sys.argv[3]) if len(sys.argv) > 3 else 16
passed = failed = 0
STARTED = []


def check(ok, what):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(("ok   " if ok else "FAIL ") + what)


QUESTIONS = ["Who created the heaven and the earth?", "What is love?", "Tell me about Moses.", "Where is Jerusalem?"]
JSON_QS = ["Describe as JSON: Blessed are the meek: for they shall inherit the earth.",
           "Describe as JSON: In the beginning God created the heaven and the earth."]
PROMPTS = ["In the beginning", "And the LORD said unto Moses"]
SCHEMA = {"type": "object", "properties": {"first": {"type": "string", "maxLength": 12}, "words": {"type": "integer"}},
          "required": ["first", "words"]}


def kinds():
    """(name, model, chat, content, stop, schema) for every request kind."""
    out = []
    for q in QUESTIONS:
        out.append(("chat", "base", True, q, None, False))
    for q in JSON_QS:
        out.append(("adapter", "json", True, q, None, False))
    for p in PROMPTS:
        out.append(("completion", "base", False, p, None, False))
        out.append(("completion+stop", "base", False, p, ("LORD", "house"), False))
    out.append(("schema", "json", True, JSON_QS[0], None, True))
    return out


def run(client, kind, stream):
    name, model, chat, content, stop, schema = kind
    stop = list(stop) if stop else None
    t0 = time.time()
    extra = {}
    if schema:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA}}
    try:
        if chat:
            args = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=16, temperature=0, stop=stop, **extra)
            if stream:
                chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                usage = [c.usage.completion_tokens for c in chunks if c.usage]
                return (text, finish[0] if finish else None, usage[0] if usage else None), time.time() - t0
            r = client.chat.completions.create(**args)
            return (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens), time.time() - t0
        args = dict(model=model, prompt=content, max_tokens=16, temperature=0, stop=stop)
        if stream:
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = [c.usage.completion_tokens for c in chunks if c.usage]
            return (text, finish[0] if finish else None, usage[0] if usage else None), time.time() - t0
        r = client.completions.create(**args)
        return (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens), time.time() - t0
    except openai.APIStatusError as e:
        return ("error", e.status_code, getattr(e, "code", None)), time.time() - t0


def main():
    log = open("build/load_server.log", "w")
    srv = subprocess.Popen([SERVER, "-m", "models/mini/base.afm", "--adapter", "json=models/mini/json.afma", "--port", "0",
                            "-c", "512", "--parallel", "2", "--queue", "64"], stderr=subprocess.PIPE, text=True)
    STARTED.append(srv)
    line = srv.stderr.readline()
    log.write(line)
    port = int(re.search(r":(\d+) ", line).group(1))
    client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="none", max_retries=0, timeout=300)
    ks = kinds()
    ref = {k: run(client, k, False)[0] for k in ks}  # idle answers, one at a time
    def valid(out):
        try:
            jsonschema.validate(json.loads(out), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False
    check(all(ref[k][0] != "error" for k in ks) and all(valid(ref[k][0]) for k in ks if k[5]),
          "reference answers from the idle server (%d kinds; the schema one valid per jsonschema)" % len(ks))

    jobs = [(ks[(i * 7) % len(ks)], i % 2 == 1) for i in range(N)]
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda j: run(client, j[0], j[1]), jobs))
    wall = time.time() - t0
    wrong = [(j[0][0], j[1], r[0], ref[j[0]]) for j, r in zip(jobs, results) if r[0] != ref[j[0]]]
    for w in wrong[:5]:
        print("    %s stream=%s: %r, expected %r" % w)
    lat = sorted(r[1] for r in results)
    toks = sum(r[0][2] for r in results if r[0][0] != "error" and r[0][2])
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    check(not wrong, "%d requests from %d clients (mixed streamed, adapter, stop strings, JSON schema): every response as when idle"
          % (N, CLIENTS))
    print("    latency p50 %.3f s, p99 %.3f s; %d completion tokens in %.1f s = %.1f tokens/s; %.1f requests/s"
          % (p50, p99, toks, wall, toks / wall, N / wall))

    srv.send_signal(signal.SIGTERM)
    try:
        code = srv.wait(timeout=60)
    except subprocess.TimeoutExpired:
        srv.kill()
        code = "hung"
    rest = srv.stderr.read()
    log.write(rest)
    log.close()
    served = len(re.findall(r"prompt tokens", rest))
    check(code == 0 and "Sanitizer" not in rest and "runtime error" not in rest,
          "SIGTERM after the load: exit status %s, no sanitizer report (leaks checked), %d generations logged" % (code, served))
    print("%d passed, %d failed" % (passed, failed))
    return failed != 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # never leave a server behind
        for p in STARTED:
            if p.poll() is None:
                p.kill()
