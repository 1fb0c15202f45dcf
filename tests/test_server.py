"""afm-server against the real `openai` Python client, on the trained model in models/mini.

    python3 tests/test_server.py ./afm-server ./afm

Starts the server on a free port (context 512, 2 sessions, the JSON adapter as model "json"),
checks chat (streamed and not), completions, the adapter, response_format json_schema (validated
with jsonschema), tools (tool_choice required / a named function / none / auto, calls validated with
jsonschema, a tool result sent back), stop strings, max_tokens, usage against
`afm tokenize`, seeds, logit_bias, KV-prefix reuse, every error case with its status code, a client
that disconnects mid-stream, and a clean SIGTERM. Prints "N passed, N failed"."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jsonschema
import openai

SERVER, AFM = sys.argv[1], sys.argv[2]
M = "models/mini/base.afm"
QUESTION = "Who created the heaven and the earth?"
JSON_Q = "Describe as JSON: Blessed are the meek: for they shall inherit the earth."
passed = failed = 0
STARTED = []


def check(ok, what):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(("ok   " if ok else "FAIL ") + what)


def start(*extra):
    log = open("build/server_test%s.log" % ("" if not extra else "_cold"), "w")
    p = subprocess.Popen([SERVER, "-m", M, "--adapter", "json=models/mini/json.afma", "--port", "0", "-c", "512",
                          "--parallel", "2", "--max-body", "65536", "--timeout", "5", *extra],
                         stderr=subprocess.PIPE, text=True)
    STARTED.append(p)
    line = p.stderr.readline()
    log.write(line)
    port = int(re.search(r":(\d+) ", line).group(1))
    return p, port, log


def raw(port, data, timeout=10):
    """Sends raw bytes, returns (status, parsed JSON body or text)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def post(port, path, obj):
    body = json.dumps(obj).encode()
    return raw(port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (path.encode(), len(body), body))


def cli(*args):
    return subprocess.run([AFM, "-m", M, *args], capture_output=True, text=True).stdout


def main():
    srv, port, log = start()
    client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": QUESTION}]

    st, body = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    check(st == 200 and body == {"status": "ok"}, "GET /health: 200 {\"status\": \"ok\"}")
    ids = [m.id for m in client.models.list().data]
    check(ids == ["base", "json"], "GET /v1/models lists the base and the adapter by name: %s" % ids)

    # chat, not streamed: the CLI's --chat answer, usage equal to `afm tokenize --chat`
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=40, temperature=0)
    want = cli("--chat", "-p", QUESTION, "-n", "40")[:-1]  # the CLI ends its output with a newline
    chat_ids = subprocess.run([AFM, "tokenize", "-m", M, "--chat", QUESTION], capture_output=True, text=True).stdout.split()
    n_prompt = len(chat_ids)
    text = r.choices[0].message.content
    check(text == want and r.choices[0].finish_reason == "stop", "chat: the CLI's greedy answer, finish_reason stop: %r" % text)
    check(r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens and r.usage.completion_tokens > 0,
          "usage: prompt_tokens %d = afm tokenize --chat (%d), total = prompt + completion" % (r.usage.prompt_tokens, n_prompt))

    # streamed: the same text, piece by piece, then finish_reason and usage
    chunks = list(client.chat.completions.create(model="base", messages=msgs, max_tokens=40, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage]
    check(streamed == text and finishes == ["stop"] and len(chunks) > 5, "streamed chat: %d chunks, same text, one finish_reason 'stop'" % len(chunks))
    check(len(usage) == 1 and usage[0].prompt_tokens == n_prompt and usage[0].completion_tokens == r.usage.completion_tokens,
          "streamed usage (stream_options.include_usage) equals the non-streamed one")

    # the adapter, selected by model
    r = client.chat.completions.create(model="json", messages=[{"role": "user", "content": JSON_Q}], max_tokens=40, temperature=0)
    out = r.choices[0].message.content
    check(json.loads(out) == {"first": "Blessed", "last": "earth", "words": 10}, "model 'json' (the adapter): %s" % out)

    # completions: the CLI's continuation (the text after the prompt, spaced as in the whole text)
    r = client.completions.create(model="base", prompt="In the beginning", max_tokens=24, temperature=0)
    want = cli("-p", "In the beginning", "-n", "24", "--no-display-prompt").rstrip("\n")
    check(r.choices[0].text == want and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24,
          "completion: the CLI's continuation, finish_reason length at max_tokens 24: %r" % r.choices[0].text)
    full = r.choices[0].text
    chunks = list(client.completions.create(model="base", prompt="In the beginning", max_tokens=24, temperature=0, stream=True))
    check("".join(c.choices[0].text for c in chunks) == full, "streamed completion: the same text")

    # max_tokens
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=3, temperature=0)
    check(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3, "max_tokens 3: finish_reason length, 3 completion tokens")

    # stop strings: one inside a token run, one that spans tokens
    for stop in ["king", "s house, and"]:
        i = full.find(stop)
        r = client.completions.create(model="base", prompt="In the beginning", max_tokens=24, temperature=0, stop=[stop, "never"])
        check(i > 0 and r.choices[0].text == full[:i] and r.choices[0].finish_reason == "stop",
              "stop %r: the text before it (%r), finish_reason stop" % (stop, r.choices[0].text))
    chunks = list(client.completions.create(model="base", prompt="In the beginning", max_tokens=24, temperature=0, stream=True,
                                            stop="s house, and"))
    check("".join(c.choices[0].text for c in chunks) == full[:full.find("s house, and")], "stop string across tokens, streamed")

    # seeds and sampling parameters
    a = [client.chat.completions.create(model="base", messages=msgs, max_tokens=20, temperature=1.0, top_p=0.9, seed=42).choices[0].message.content
         for _ in range(2)]
    b = client.chat.completions.create(model="base", messages=msgs, max_tokens=20, temperature=1.0, top_p=0.9, seed=43).choices[0].message.content
    check(a[0] == a[1] and a[0] != b, "seed 42 twice: the same sampled text; seed 43: another")
    first = client.chat.completions.create(model="base", messages=msgs, max_tokens=1, temperature=0)
    tok = subprocess.run([AFM, "-m", M, "--ids", ",".join(chat_ids), "-n", "1"], capture_output=True, text=True).stdout.split()
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=1, temperature=0, logit_bias={tok[0]: -100})
    check(r.choices[0].message.content != first.choices[0].message.content and r.choices[0].message.content,
          "logit_bias -100 bans the greedy first token %s: %r instead of %r" % (tok[0], r.choices[0].message.content, first.choices[0].message.content))
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=40, temperature=0, frequency_penalty=2.0, presence_penalty=1.0)
    check(r.choices[0].message.content != text, "presence/frequency penalties change the greedy answer")

    # KV-prefix reuse: a follow-up turn evaluates only the new tokens, with the same result as a cold one
    turn2 = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    r1 = client.chat.completions.create(model="base", messages=turn2, max_tokens=20, temperature=0)
    cached = r1.model_extra["usage"]["prompt_tokens_details"]["cached_tokens"] if r1.model_extra.get("usage") else \
        r1.usage.prompt_tokens_details.cached_tokens
    srv2, port2, log2 = start("--parallel", "1")  # a cold session on a fresh server
    cold = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port2, api_key="none", max_retries=0)
    r2 = cold.chat.completions.create(model="base", messages=turn2, max_tokens=20, temperature=0)
    srv2.send_signal(signal.SIGTERM)
    srv2.wait(timeout=20)
    log2.close()
    check(cached >= n_prompt - 1 and r2.usage.prompt_tokens_details.cached_tokens == 0 and
          r1.choices[0].message.content == r2.choices[0].message.content,
          "follow-up turn reuses %d cached tokens and answers as a cold session does: %r" % (cached, r1.choices[0].message.content))

    # response_format json_schema: the constraint engine makes the output valid (checked by jsonschema)
    schema = {"type": "object", "properties": {"first": {"type": "string", "maxLength": 16}, "last": {"type": "string", "maxLength": 16},
                                               "words": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["first", "last", "words", "ok"]}
    for model, temp in (("json", 0), ("json", 0.8), ("base", 0)):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": JSON_Q}], max_tokens=120,
                                           temperature=temp, seed=3,
                                           response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
        out = r.choices[0].message.content
        try:
            jsonschema.validate(json.loads(out), schema)
            valid = r.choices[0].finish_reason == "stop"
        except (ValueError, jsonschema.ValidationError):
            valid = False
        check(valid, "response_format json_schema, model %s, temperature %g: valid per jsonschema: %s" % (model, temp, out[:80]))
    # the schema is also shown to the model (Apple's way): the user's turn gains the schema prompt's tokens
    plain = client.chat.completions.create(model="base", messages=[{"role": "user", "content": JSON_Q}], max_tokens=1)
    shown = "%s\n\nRespond with JSON that follows this JSON schema:\n%s" % (JSON_Q, json.dumps(schema, separators=(",", ":")))
    want = len(subprocess.run([AFM, "tokenize", "-m", M, "--chat", shown], capture_output=True, text=True).stdout.split())
    check(r.usage.prompt_tokens == want and want > plain.usage.prompt_tokens,
          "response_format: the schema is shown in the user's turn (%d prompt tokens = afm tokenize of the rendered turn; %d without)"
          % (r.usage.prompt_tokens, plain.usage.prompt_tokens))

    # tools: OpenAI function tools mapped to afm.h's tool loop; the call comes back as tool_calls
    weather = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}
    cancel = {"type": "object", "properties": {"order": {"type": "string", "pattern": "^[A-Z][0-9]{3}$"}},
              "required": ["order"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": weather}},
             {"type": "function", "function": {"name": "cancel_order", "description": "Cancels an order", "parameters": cancel}}]
    schemas = {"get_weather": weather, "cancel_order": cancel}
    conv = [{"role": "user", "content": "What is the weather in Paris?"}]

    def valid_call(choice, want=None):
        calls = choice.message.tool_calls or []
        try:
            c = calls[0].function
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])
            return choice.finish_reason == "tool_calls" and len(calls) == 1 and (want is None or c.name == want)
        except (IndexError, KeyError, ValueError, jsonschema.ValidationError):
            return False
    r = client.chat.completions.create(model="base", messages=conv, tools=tools, tool_choice="required", max_tokens=60,
                                       temperature=1.0, seed=5)
    call = r.choices[0].message.tool_calls[0] if r.choices[0].message.tool_calls else None
    check(valid_call(r.choices[0]), "tool_choice required: finish_reason tool_calls, arguments valid per jsonschema: %s" %
          (call.function.name + " " + call.function.arguments if call else r.choices[0]))
    r2 = client.chat.completions.create(model="base", messages=conv, tools=tools, max_tokens=60, temperature=1.0, seed=5,
                                        tool_choice={"type": "function", "function": {"name": "cancel_order"}})
    check(valid_call(r2.choices[0], "cancel_order"), "tool_choice naming cancel_order: %s" %
          (r2.choices[0].message.tool_calls[0].function.arguments if r2.choices[0].message.tool_calls else r2.choices[0]))
    if call:  # the client runs the tool and sends its result back: the model continues from it
        conv2 = conv + [{"role": "assistant", "content": r.choices[0].message.content or "",
                         "tool_calls": [{"id": call.id, "type": "function",
                                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'}]
        r3 = client.chat.completions.create(model="base", messages=conv2, tools=tools, tool_choice="none", max_tokens=30, seed=5)
        check(r3.choices[0].finish_reason in ("stop", "length") and not r3.choices[0].message.tool_calls and
              r3.usage.prompt_tokens > 0, "round trip: the tool's result sent back, tool_choice none answers: %r (%s)" %
              (r3.choices[0].message.content[:60], r3.choices[0].finish_reason))
        r4 = client.chat.completions.create(model="base", messages=conv2, tools=tools, tool_choice="auto", max_tokens=60, seed=9)
        check(r4.choices[0].finish_reason in ("stop", "length") or valid_call(r4.choices[0]),
              "round trip, tool_choice auto: an answer or a valid call (%s)" % r4.choices[0].finish_reason)

    # errors, each with its status code
    def err(fn, cls, code_part, what):
        try:
            fn()
            check(False, what + ": no error")
        except cls as e:
            check(code_part in str(e) + str(getattr(e, "code", "")), "%s: %d %s" % (what, e.status_code, str(e)[:100]))
    err(lambda: client.chat.completions.create(model="nope", messages=msgs), openai.NotFoundError, "model_not_found", "unknown model")
    err(lambda: client.chat.completions.create(model="base", messages=[{"role": "user", "content": "word " * 600}]),
        openai.BadRequestError, "context_length_exceeded", "prompt longer than the context")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, temperature="hot"), openai.BadRequestError,
        "must be a number", "temperature of the wrong type")
    err(lambda: client.chat.completions.create(model="base", messages="hi"), openai.BadRequestError, "non-empty array", "messages not an array")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, max_tokens=0), openai.BadRequestError, "max_tokens", "max_tokens 0")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, n=2), openai.BadRequestError, "n = 1", "n = 2")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, logit_bias={"99999": 1}), openai.BadRequestError,
        "outside the vocabulary", "logit_bias id out of range")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}), openai.BadRequestError,
        "invalid_schema", "response_format with a schema the engine refuses")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"d": {"format": "date"}}}}}]),
        openai.BadRequestError, "unsupported keyword 'format'", "tools with a schema keyword the engine refuses")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, tools=tools, stream=True), openai.BadRequestError,
        "without stream", "tools with stream")
    err(lambda: client.chat.completions.create(model="base", messages=msgs, tools=tools,
                                               tool_choice={"type": "function", "function": {"name": "nope"}}),
        openai.BadRequestError, "no tool named 'nope'", "tool_choice naming an undeclared tool")
    err(lambda: client.chat.completions.create(model="base", messages=msgs + [{"role": "tool", "tool_call_id": "x", "content": "1"}]),
        openai.BadRequestError, "names no earlier tool call", "a tool message answering no call")
    st, body = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"model\":")
    check(st == 400 and body["error"]["code"] == "invalid_json" and "byte 9" in body["error"]["message"], "malformed JSON: 400 naming the byte")
    st, body = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 70000\r\n\r\n")
    check(st == 413 and "error" in body, "body over --max-body: 413")
    st, body = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    check(st == 411, "POST without Content-Length: 411")
    st, body = raw(port, b"GET /v1/chat/completions HTTP/1.1\r\n\r\n")
    check(st == 405, "GET on a POST endpoint: 405")
    st, body = raw(port, b"GET /nothing HTTP/1.1\r\n\r\n")
    check(st == 404 and body["error"]["type"] == "invalid_request_error", "unknown path: 404 with an OpenAI-style error")
    st, body = raw(port, b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 17000 + b"\r\n\r\n")
    check(st == 431, "head over 16 KiB: 431")
    st, body = raw(port, b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    check(st == 501, "chunked request body: 501")
    t0 = time.time()
    st, body = raw(port, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"model\"", timeout=20)
    check(st == 408 and time.time() - t0 < 15, "a body that never completes: 408 after --timeout")

    # a client that disconnects mid-stream frees its session at once
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "base", "prompt": "In the beginning", "max_tokens": 400, "temperature": 0, "stream": True,
                       "logit_bias": {"3": -100, "6": -100}}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    s.recv(2000)
    s.close()
    r = client.completions.create(model="base", prompt="In the beginning", max_tokens=2, temperature=0)
    time.sleep(0.3)
    srv.send_signal(signal.SIGTERM)
    try:
        code = srv.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.kill()
        code = "hung"
    rest = srv.stderr.read()
    log.write(rest)
    log.close()
    gone = re.search(r"(\d+) generated, client gone", rest)
    check(gone is not None and int(gone.group(1)) < 400, "client closed mid-stream: generation ended after %s of 400 tokens" % (gone.group(1) if gone else "?"))
    check(code == 0 and "shutting down" in rest, "SIGTERM: clean exit (status %s)" % code)
    print("%d passed, %d failed" % (passed, failed))
    return failed != 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # never leave a server behind
        for p in STARTED:
            if p.poll() is None:
                p.kill()
