"""The HTTP server (nanollm/serving.py) started in-process on 127.0.0.1, talked to with urllib / http.client:
answers equal direct greedy decoding, streams concatenate to the plain answer, concurrent clients are batched
and all answered, and bad requests get 4xx JSON errors while the server keeps serving."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from nanollm.loader import load_model
from nanollm.model import GPT, GPTConfig
from nanollm.serving import ApiError, ChatRequest, Engine, Job, make_server, parse_chat_request, parse_sse
from nanollm.tokenizer import Tokenizer, encode_messages, prompt_ids, train_tokenizer
from script_runner import REPO

QUESTIONS = [f"where does person {i} live?" for i in (3, 150, 41)] + ["hello", "李小明住在哪里？", "who?"]


def make_checkpoint(folder):
    """A 1-layer GPT trained for a few seconds on one chat pattern ("where does person i live?" -> "Person i lives
    in town i % 7, ...</s>"), so greedy answers are words that end with eos, with clear margins between choices."""
    chats = [[{"role": "user", "content": f"where does person {i} live?"},
              {"role": "assistant", "content": f"Person {i} lives in town {i % 7}, near the 北京 river."}]
             for i in range(200)]
    texts = [message["content"] for chat in chats for message in chat] + ["李小明住在北京。"] * 10
    tokenizer = Tokenizer(train_tokenizer(texts, str(folder / "tokenizer"), vocab_size=360))
    torch.manual_seed(0)
    args = dict(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    model = GPT(GPTConfig(**args))
    rows = [encode_messages(tokenizer, chat)[0] for chat in chats]
    width = max(len(row) for row in rows)
    data = torch.tensor([row + [tokenizer.pad_id] * (width - len(row)) for row in rows])  # (N, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = data[torch.randint(0, len(data), (16,))]
        targets = batch[:, 1:].masked_fill(batch[:, 1:] == tokenizer.pad_id, -100)
        _, loss = model(batch[:, :-1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}}, folder / "ckpt.pt")
    return folder


def load(folder):
    return load_model(str(folder)).model.eval(), Tokenizer(str(folder / "tokenizer.model"))


def greedy(model, tokenizer, messages, max_tokens):
    """(content, finish_reason, generated token count) of plain greedy decoding with model.generate."""
    ids = prompt_ids(tokenizer, messages)
    out = model.generate(torch.tensor([ids]), max_tokens, temperature=0, eos_id=tokenizer.eos_id)[0, len(ids):]
    out = out.tolist()
    if tokenizer.eos_id in out:
        out = out[:out.index(tokenizer.eos_id) + 1]
        return tokenizer.decode(out[:-1], skip_special=True), "stop", len(out)
    return tokenizer.decode(out, skip_special=True), "length", len(out)


def start_server(engine, **settings):
    """Serve `engine` on 127.0.0.1 (a free port) in a thread; returns (server, base url)."""
    server = make_server(engine, "127.0.0.1", 0, quiet=True, **settings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop_server(server, engine):
    server.shutdown()
    server.server_close()
    engine.close()


def request(url, payload=None, body=None, method=None):
    """(status, headers, body bytes) of one HTTP request; 4xx/5xx are returned, not raised."""
    data = body if body is not None else (json.dumps(payload).encode() if payload is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def chat(base, content, **fields):
    return request(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **fields})


def wait_until(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(checkpoint):
    model, tokenizer = load(checkpoint)
    engine = Engine(model, tokenizer, "tiny", max_batch=8, default_max_tokens=24)
    server, base = start_server(engine, max_body_bytes=16_384)
    yield base, model, tokenizer
    stop_server(server, engine)


# --------------------------------------------------------------------------------------- answers
def test_plain_request_returns_the_greedy_answer_in_openai_shape(served):
    base, model, tokenizer = served
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    status, headers, body = chat(base, QUESTIONS[0], temperature=0, max_tokens=30, model="whatever")
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    content, reason, generated = greedy(model, tokenizer, messages, 30)
    assert content.startswith("Person ") and reason == "stop"  # the fixture model answers, then stops
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert answer["model"] == "tiny" and isinstance(answer["created"], int)
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "logprobs": None, "finish_reason": "stop"}]
    prompt_tokens = len(prompt_ids(tokenizer, messages))
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                               "total_tokens": prompt_tokens + generated}


def test_max_tokens_cuts_the_answer_with_finish_reason_length(served):
    base, model, tokenizer = served
    answer = json.loads(chat(base, QUESTIONS[1], temperature=0, max_tokens=3)[2])
    content, reason, generated = greedy(model, tokenizer, [{"role": "user", "content": QUESTIONS[1]}], 3)
    assert reason == "length" and generated == 3
    assert answer["choices"][0]["message"]["content"] == content
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3


def test_stream_chunks_concatenate_to_the_plain_answer_and_end_with_done(served):
    base, model, tokenizer = served
    plain = json.loads(chat(base, QUESTIONS[4], temperature=0, max_tokens=30)[2])
    status, headers, body = chat(base, QUESTIONS[4], temperature=0, max_tokens=30, stream=True,
                                 stream_options={"include_usage": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    data = parse_sse(body.decode("utf-8"))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"] and
              c["choices"][0]["delta"].get("content")]
    assert len(pieces) >= 3  # really streamed, piece by piece
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streamed_text_never_splits_a_multibyte_character(checkpoint):
    """Byte-fallback pieces (an emoji is 4 of them) decode to U+FFFD until the character is complete; the engine
    holds such text back, so every delta is whole characters and the deltas add up to the decoded text."""
    model, tokenizer = load(checkpoint)
    engine = Engine(model, tokenizer)
    text = "hé 🙂 北京 lives"
    ids = tokenizer.encode(text)
    assert sum(tokenizer.id_to_piece(i).startswith("<0x") for i in ids) >= 4  # the emoji is bytes
    job = Job(ChatRequest(messages=[]), prompt=[1], max_tokens=100)
    for token in ids + [tokenizer.eos_id]:
        engine.deliver(job, token)
    events = [job.events.get_nowait() for _ in range(job.events.qsize())]
    deltas = [value for kind, value in events if kind == "delta"]
    assert events[-1] == ("done", "stop") and len(deltas) > 3
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text
    engine.close()


def test_same_seed_same_sampled_answer_other_seeds_other_answers_and_temperature_0_is_greedy(served):
    base, model, tokenizer = served

    def answer(**fields):
        return json.loads(chat(base, "hello", max_tokens=12, **fields)[2])["choices"][0]["message"]["content"]

    first, second = (answer(temperature=1.5, top_p=0.95, seed=7) for _ in range(2))
    assert first == second
    sampled = {answer(temperature=1.5, top_p=0.95, seed=seed) for seed in range(4)}
    assert len(sampled) > 1  # a server that ignored the seed, or sampled greedily, gives one answer
    expected, _, _ = greedy(model, tokenizer, [{"role": "user", "content": "hello"}], 12)
    assert answer(temperature=0, seed=3) == answer(temperature=0, seed=9) == expected


# --------------------------------------------------------------------------------------- concurrency
class GatedEngine(Engine):
    """Holds its first batch until the test opens the gate, and records the size of every batch."""

    def __init__(self, *args, **kwargs):
        self.gate, self.batch_sizes = threading.Event(), []
        super().__init__(*args, **kwargs)

    def generate(self, jobs):
        self.batch_sizes.append(len(jobs))
        self.gate.wait(timeout=60)
        super().generate(jobs)


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(checkpoint):
    model, tokenizer = load(checkpoint)
    engine = GatedEngine(model, tokenizer, "tiny", max_batch=8)
    server, base = start_server(engine)
    seeded = dict(temperature=1.0, top_k=20, seed=3, max_tokens=16)  # a sampled row among greedy ones
    requests = [(question, dict(temperature=0, max_tokens=20)) for question in QUESTIONS] + [("hello", seeded)]
    answers = [None] * len(requests)

    def client(index):
        question, fields = requests[index]
        answers[index] = chat(base, question, stream=index % 2 == 1, **fields)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(requests))]
    try:
        threads[0].start()
        wait_until(lambda: engine.batch_sizes == [1])  # the first request is being decoded (held at the gate)
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: engine.queue.qsize() == len(requests) - 1)  # the others wait in the queue
        engine.gate.set()
        for thread in threads:
            thread.join(timeout=60)
        assert engine.batch_sizes == [1, len(requests) - 1]  # the waiting requests were decoded as one batch
        alone = json.loads(chat(base, "hello", **seeded)[2])["choices"][0]["message"]["content"]
    finally:
        engine.gate.set()
        stop_server(server, engine)
    for index, ((question, fields), (status, _, body)) in enumerate(zip(requests, answers)):
        assert status == 200
        if index % 2:
            content = "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                              for d in parse_sse(body.decode())[:-1])
        else:
            content = json.loads(body)["choices"][0]["message"]["content"]
        if fields["temperature"] == 0:  # left padding and batching change nothing: the row's own greedy answer
            assert content == greedy(model, tokenizer, [{"role": "user", "content": question}], 20)[0], question
        else:  # a seeded row samples from its own generator: the same answer as when it was alone
            assert content == alone


# --------------------------------------------------------------------------------------- context
def test_long_conversation_drops_oldest_turns_or_is_refused(checkpoint):
    model, tokenizer = load(checkpoint)
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"where does person {i} live?"},
                  {"role": "assistant", "content": f"Person {i} lives in town {i}."}]
    turns.append({"role": "user", "content": "and person 9?"})
    assert len(prompt_ids(tokenizer, turns)) > 64  # longer than the context
    engine = Engine(model, tokenizer, default_max_tokens=16)
    job = engine.prepare(ChatRequest(messages=turns))
    for kept in range(len(turns)):  # the system message, then the newest turns that leave 16 tokens to answer
        expected = turns[:1] + turns[1 + 2 * kept:]
        if len(prompt_ids(tokenizer, expected)) + 16 <= 64:
            break
    assert job.prompt == prompt_ids(tokenizer, expected) and job.max_tokens == 16
    assert expected[-1] == turns[-1] and len(expected) < len(turns)
    engine.truncate_history = False
    with pytest.raises(ApiError) as refused:
        engine.prepare(ChatRequest(messages=turns))
    assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
    engine.close()


def reference_history(tokenizer, messages, reserve, block_size, truncate=True):
    """The truncation rule written as plainly as possible (re-tokenizing after every drop): while the prompt and
    `reserve` do not fit and more than one user turn is left, drop the oldest turn (the first non-system message
    and everything up to the next user message). Returns the kept messages."""
    first = 1 if messages[0]["role"] == "system" else 0
    while truncate and len(prompt_ids(tokenizer, messages)) + reserve > block_size and \
            sum(m["role"] == "user" for m in messages[first:]) > 1:
        rest = messages[first + 1:]
        while rest[0]["role"] != "user":
            rest = rest[1:]
        messages = messages[:first] + rest
    return messages


def conversation(n_turns, system=True, lead_assistant=False):
    turns = [{"role": "system", "content": "Be brief."}] if system else []
    if lead_assistant:
        turns.append({"role": "assistant", "content": "Hello, ask me where someone lives."})
    for i in range(n_turns):
        turns += [{"role": "user", "content": f"where does person {i} live?"},
                  {"role": "assistant", "content": f"Person {i} lives in town {i % 7}."},
                  {"role": "assistant", "content": "Anything else?"} if i % 3 == 1 else None]
    turns = [turn for turn in turns if turn is not None]
    return turns + [{"role": "user", "content": "and person 9?"}]


@pytest.mark.parametrize("n_turns, system, lead_assistant, max_tokens, truncate", [
    (6, True, False, None, True), (6, False, False, None, True), (5, True, True, None, True),
    (5, False, True, 8, True), (1, True, False, 4, True), (0, True, False, None, True), (0, False, True, 30, True),
    (3, True, False, 40, True), (2, True, False, 4, False), (9, False, False, 20, True)])
def test_history_truncation_keeps_the_same_turns_as_the_plain_rule(checkpoint, n_turns, system, lead_assistant,
                                                                   max_tokens, truncate):
    model, tokenizer = load(checkpoint)
    engine = Engine(model, tokenizer, default_max_tokens=16, truncate_history=truncate)
    turns = conversation(n_turns, system, lead_assistant)
    reserve = max_tokens or min(16, 64 // 2)
    expected = prompt_ids(tokenizer, reference_history(tokenizer, turns, reserve, 64, truncate))
    fits = len(expected) < 64 and (max_tokens or 0) <= 64 - len(expected)
    try:
        if fits:
            assert engine.prepare(ChatRequest(messages=turns, max_tokens=max_tokens)).prompt == expected
        else:
            with pytest.raises(ApiError, match=f"the prompt is {len(expected)} tokens"):
                engine.prepare(ChatRequest(messages=turns, max_tokens=max_tokens))
    finally:
        engine.close()


class CountingTokenizer:
    """The real tokenizer, counting its encode() calls; over `budget` calls it fails at once (no slow test)."""

    def __init__(self, tokenizer, budget):
        self.tokenizer, self.budget, self.calls = tokenizer, budget, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        assert self.calls <= self.budget, f"more than {self.budget} tokenizer calls"
        return self.tokenizer.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_2000_turn_request_is_tokenized_once_per_message(checkpoint):
    model, tokenizer = load(checkpoint)
    turns = conversation(2000)
    counting = CountingTokenizer(tokenizer, budget=len(turns))  # one encode per message (no "<|" in the texts)
    engine = Engine(model, counting, default_max_tokens=16)
    try:
        job = engine.prepare(ChatRequest(messages=turns))
    finally:
        engine.close()
    assert counting.calls == len(turns)
    kept = reference_history(tokenizer, turns[:1] + turns[-12:], 16, 64)  # the answer only needs the newest turns
    assert job.prompt == prompt_ids(tokenizer, kept) and kept[0] == turns[0] and kept[-1] == turns[-1]


# --------------------------------------------------------------------------------------- bad requests
def messages_with(**message):
    return {"messages": [message]}


BAD_REQUESTS = [  # (body, status, param)
    (b"{not json", 400, None),
    (b"\xff\xfe garbage", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"temperature": NaN, "messages": []}', 400, None),
    (json.dumps({"temperature": 0}).encode(), 400, "messages"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": ["hi"]}).encode(), 400, "messages[0]"),
    (json.dumps(messages_with(role="robot", content="hi")).encode(), 400, "messages[0].role"),
    (json.dumps(messages_with(content="hi")).encode(), 400, "messages[0].role"),
    (json.dumps(messages_with(role="user", content=5)).encode(), 400, "messages[0].content"),
    (json.dumps(messages_with(role="assistant", content="hi")).encode(), 400, "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                              {"role": "user", "content": "c"}]}).encode(), 400, "messages[1].role"),
    (json.dumps({**messages_with(role="user", content="hi"), "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({**messages_with(role="user", content="hi"), "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({**messages_with(role="user", content="hi"), "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({**messages_with(role="user", content="hi"), "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({**messages_with(role="user", content="hi"), "max_tokens": 2.5}).encode(), 400, "max_tokens"),
    (json.dumps({**messages_with(role="user", content="hi"), "max_tokens": 64}).encode(), 400, "max_tokens"),
    (json.dumps({**messages_with(role="user", content="hi"), "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({**messages_with(role="user", content="hi"), "seed": -1}).encode(), 400, "seed"),
    (json.dumps({**messages_with(role="user", content="hi"), "n": 2}).encode(), 400, "n"),
    (json.dumps(messages_with(role="user", content="person " * 200)).encode(), 400, "messages"),  # > context
    (json.dumps(messages_with(role="user", content="x" * 20_000)).encode(), 413, None),  # > max_body_bytes
]


def test_a_typical_openai_client_body_is_understood():
    """Fields OpenAI clients send that this server has no use for are ignored; newer names are understood."""
    body = {"model": "gpt-4o", "messages": [{"role": "developer", "content": "Be brief."},
                                            {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                         {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stream": True,
            "stream_options": {"include_usage": True}, "presence_penalty": 0, "user": "u1", "n": 1, "stop": None}
    assert parse_chat_request(json.dumps(body).encode()) == ChatRequest(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}],
        temperature=0.5, top_p=0.9, top_k=0, max_tokens=7, stream=True, include_usage=True, seed=None)


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(served, body, status, param):
    base, _, _ = served
    got, headers, answer = request(base + "/v1/chat/completions", body=body)
    assert got == status and headers["Content-Type"] == "application/json"
    error = json.loads(answer)["error"]
    assert isinstance(error["message"], str) and error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert chat(base, "hello", max_tokens=2)[0] == 200  # still answering


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/chat/completions", 405), ("POST", "/health", 405),
                                                  ("DELETE", "/v1/models", 405), ("GET", "/v1/nothing", 404),
                                                  ("POST", "/nothing", 404), ("BREW", "/", 501)])
def test_wrong_method_or_unknown_path_gets_a_json_error(served, method, path, status):
    base, _, _ = served
    got, _, answer = request(base + path, body=b"{}" if method in ("POST", "BREW") else None, method=method)
    assert got == status and json.loads(answer)["error"]["message"]
    assert chat(base, "hello", max_tokens=2)[0] == 200


def test_body_without_content_length_gets_411(served):
    base, _, _ = served
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]
    connection.close()


def raw_request(base, method, path, headers, body=b""):
    """(status, headers, body) of a request whose headers are all given by the test (Host included)."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for key, value in headers.items():
        connection.putheader(key, value)
    connection.endheaders(body or None)
    response = connection.getresponse()
    answer = response.status, response.headers, response.read()
    connection.close()
    return answer


def test_a_cross_origin_text_plain_post_is_refused_with_415_and_not_run(served):
    """A page on any site can POST text/plain to 127.0.0.1 without a CORS preflight; only JSON is executed."""
    base, _, _ = served
    host = base.removeprefix("http://")
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Host": host, "Origin": "http://evil.example", "Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        status, answer_headers, answer = raw_request(base, "POST", "/v1/chat/completions", headers, body)
        assert status == 415 and json.loads(answer)["error"]["code"] == "unsupported_media_type", content_type
        assert not [key for key in answer_headers if key.lower().startswith("access-control-")]
    headers = {"Host": host, "Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body))}
    assert raw_request(base, "POST", "/v1/chat/completions", headers, body)[0] == 200


def test_no_cors_headers_even_for_a_preflight(served):
    base, _, _ = served
    status, headers, _ = raw_request(base, "OPTIONS", "/v1/chat/completions", {
        "Host": base.removeprefix("http://"), "Origin": "http://evil.example",
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert status == 405 and not [key for key in headers if key.lower().startswith("access-control-")]


@pytest.mark.parametrize("host, status", [("evil.example:{port}", 403), ("evil.example", 403),
                                          ("localhost.evil.example:{port}", 403), ("localhost:{port}", 200),
                                          ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("10.1.2.3", 200),
                                          ("chat.localhost:{port}", 200), ("myhost.lan:{port}", 200)])
def test_the_host_header_must_name_this_server(checkpoint, host, status):
    """DNS rebinding: evil.example re-pointed at 127.0.0.1 is the page's own origin, but its Host still says so."""
    model, tokenizer = load(checkpoint)
    engine = Engine(model, tokenizer, "tiny")
    server, base = start_server(engine, allowed_hosts=["myhost.lan"])
    try:
        host = host.format(port=server.server_address[1])
        body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).encode()
        post = raw_request(base, "POST", "/v1/chat/completions", {
            "Host": host, "Content-Type": "application/json", "Content-Length": str(len(body))}, body)
        page = raw_request(base, "GET", "/", {"Host": host})
        assert (post[0], page[0]) == (status, status)
        if status == 403:
            assert "Host" in json.loads(post[2])["error"]["message"]
            assert engine.queue.qsize() == 0
        assert raw_request(base, "GET", "/health", {})[0] == 400  # HTTP/1.1 without a Host header
    finally:
        stop_server(server, engine)


def test_a_client_that_stalls_mid_body_gets_408_without_a_traceback(checkpoint, capfd):
    model, tokenizer = load(checkpoint)
    engine = Engine(model, tokenizer, "tiny")
    server, base = start_server(engine, read_timeout=1)
    try:
        connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", "100")
        connection.endheaders(b'{"messages": [')  # 14 of the 100 bytes, then nothing
        response = connection.getresponse()  # waits for the server's read timeout (1 s)
        error = json.loads(response.read())["error"]
        assert response.status == 408 and error["code"] == "request_timeout"
        connection.close()
        assert chat(base, "hello", max_tokens=2)[0] == 200  # still serving
    finally:
        stop_server(server, engine)
    assert "Traceback" not in capfd.readouterr().err


def test_models_health_and_page(served):
    base, _, _ = served
    models = json.loads(request(base + "/v1/models")[2])
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["context_length"] == 64
    assert json.loads(request(base + "/health")[2])["status"] == "ok"
    status, headers, page = request(base + "/")
    page = page.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert all(f'id="{name}"' in page for name in ("input", "send", "stop", "messages"))
    assert "http://" not in page and "https://" not in page and 'src="//' not in page  # nothing from elsewhere


def test_a_burst_of_simultaneous_clients_is_all_answered(served):
    """64 connections opened at once: none is refused or reset (the listen backlog holds them)."""
    base, _, _ = served
    barrier, statuses = threading.Barrier(64), [None] * 64

    def client(index):
        barrier.wait(timeout=30)
        statuses[index] = chat(base, "hello", max_tokens=2, stream=index % 2 == 0)[0]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 64


class FailingEngine(Engine):
    """Fails in the middle of decoding any conversation that says "boom" (a stand-in for a bug or an OOM)."""

    def deliver(self, job, token):
        if job.sent and job.request.messages[-1]["content"] == "boom":
            raise RuntimeError("simulated failure")
        return super().deliver(job, token)


def test_a_failure_during_generation_is_a_500_and_the_worker_carries_on(checkpoint):
    model, tokenizer = load(checkpoint)
    engine = FailingEngine(model, tokenizer, "tiny")
    server, base = start_server(engine)
    try:
        status, _, body = chat(base, "boom", temperature=0, max_tokens=20)
        assert status == 500 and "simulated failure" in json.loads(body)["error"]["message"]
        status, _, body = chat(base, "boom", temperature=0, max_tokens=20, stream=True)
        data = parse_sse(body.decode())
        assert status == 200 and data[-1] != "[DONE]"  # the stream had begun: it ends with an error event
        assert json.loads(data[-1])["error"]["type"] == "server_error"
        assert json.loads(data[1])["choices"][0]["delta"]["content"]  # text sent before the failure
        assert chat(base, "hello", max_tokens=2)[0] == 200
    finally:
        stop_server(server, engine)


def test_a_full_queue_and_a_stopped_worker_get_503_json_errors(checkpoint):
    """max_queue=1: one request held in the worker, one waiting in the queue, so a third is refused at once with 503;
    the first two are still answered. Once the worker has stopped, a request gets 503 and /health says so."""
    model, tokenizer = load(checkpoint)
    engine = GatedEngine(model, tokenizer, "tiny", max_batch=1, max_queue=1)
    server, base = start_server(engine)
    try:
        answers = [None, None]

        def ask(slot):
            answers[slot] = chat(base, QUESTIONS[slot], temperature=0, max_tokens=4)

        threads = [threading.Thread(target=ask, args=(0,))]
        threads[0].start()
        wait_until(lambda: engine.batch_sizes == [1])  # the first request is held in the worker
        threads.append(threading.Thread(target=ask, args=(1,)))
        threads[1].start()
        wait_until(lambda: engine.queue.qsize() == 1)  # the second one waits in the queue
        status, _, body = chat(base, "hello", max_tokens=2)
        error = json.loads(body)["error"]
        assert status == 503 and error["code"] == "overloaded" and "1 requests are waiting" in error["message"]
        engine.gate.set()
        for thread in threads:
            thread.join(timeout=60)
        assert [answer[0] for answer in answers] == [200, 200]
        for slot in range(2):
            content = json.loads(answers[slot][2])["choices"][0]["message"]["content"]
            assert content == greedy(model, tokenizer, [{"role": "user", "content": QUESTIONS[slot]}], 4)[0]
        engine.close()  # the worker thread ends
        assert not engine.worker.is_alive()
        status, _, body = chat(base, "hello", max_tokens=2)
        assert status == 503 and "worker has stopped" in json.loads(body)["error"]["message"]
        assert json.loads(request(base + "/health")[2])["status"] == "worker stopped"
    finally:
        engine.gate.set()
        stop_server(server, engine)


@pytest.mark.slow  # a subprocess
def test_serve_script_answers_like_greedy_decoding_and_stops_on_ctrl_c(checkpoint):
    """serve.py as a user starts it (port 0: any free port, read from its first line), one request, then Ctrl-C."""
    model, tokenizer = load(checkpoint)
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--out_dir={checkpoint}",
                                "--port=0", "--quiet=True", "--device=cpu"], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                               # Ctrl-C as in a terminal, even where pytest itself runs with SIGINT ignored (a
                               # background job): Python turns SIGINT into KeyboardInterrupt only if it is not ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(120, process.kill)  # a server that never prints its banner fails, not hangs
    watchdog.start()
    try:
        banner = process.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/", banner)
        assert port, banner + process.stderr.read()
        status, _, body = chat(f"http://127.0.0.1:{port.group(1)}", QUESTIONS[0], temperature=0, max_tokens=20)
        assert status == 200
        expected = greedy(model, tokenizer, [{"role": "user", "content": QUESTIONS[0]}], 20)[0]
        assert json.loads(body)["choices"][0]["message"]["content"] == expected
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0 and "[nanollm] stopped" in stdout and "Traceback" not in stderr
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.communicate()
