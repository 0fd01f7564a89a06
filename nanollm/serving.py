"""Serving a chat model over HTTP: an OpenAI-style /v1/chat/completions endpoint, token streaming with
server-sent events (SSE), and one model thread that batches the requests of concurrent clients.

Teaches: validating requests at the edge (a 4xx with a JSON error, never a crash), why one worker thread owns the
model (handler threads only queue work), batching waiting prompts with left padding and per-row sampling settings,
and streaming text from tokens (a byte-fallback piece can hold half a character: emit the growth of the decoded text).
Wire format: OpenAI's Chat Completions API; SSE framing: the WHATWG HTML standard, "server-sent events".
"""
import collections
import ipaddress
import json
import math
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

import torch

from nanollm.model import sample_next_token
from nanollm.tokenizer import ROLES, encode_messages

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
MAX_SEED = 2 ** 63 - 1
DRAIN_LIMIT = 16 << 20  # an oversized body up to this size is read and dropped, so the client sees our 413


class ApiError(Exception):
    """An error answered to the client: an HTTP status and OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(self, status, message, param=None, type="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- request validation
@dataclass
class ChatRequest:
    messages: list  # [{"role": "system" | "user" | "assistant", "content": str}, ...], ending on a user turn
    temperature: float = 1.0  # 0 = greedy (OpenAI's default is 1)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # not in OpenAI's API (vLLM has it); 0 = off
    max_tokens: Optional[int] = None  # None: the server's default, within the context
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    seed: Optional[int] = None  # same seed, same request -> same answer


def _show(value):
    return json.dumps(value)[:40]


def _number(payload, key, default, low, high, low_open=False):
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{key}' must be a number, got {_show(value)}", key)
    if value > high or value < low or (low_open and value == low):
        raise ApiError(400, f"'{key}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", key)
    return float(value)


def _integer(payload, key, low, high):
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer, got {_show(value)}", key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be in [{low}, {high}], got {value}", key)
    return value


def _text_content(content, where):
    """A message's content: a string, or OpenAI's list of parts [{"type": "text", "text": ...}]."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string, got {_show(content)}", f"{where}.content")
    return content


def _messages(payload):
    messages = payload.get("messages")
    if messages is None:
        raise ApiError(400, "missing required field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content', got {_show(message)}", where)
        role = "system" if message.get("role") == "developer" else message.get("role")  # OpenAI's newer name
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        if role == "system" and index > 0:
            raise ApiError(400, f"{where}: a system message may only come first", f"{where}.role")
        checked.append({"role": role, "content": _text_content(message.get("content"), where)})
    if checked[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (the model answers it)", f"{where}.role")
    return checked


def parse_chat_request(body):
    """Bytes of a POST /v1/chat/completions body -> ChatRequest, or ApiError(400) naming the field at fault.
    Fields this server does not know are ignored, as OpenAI clients send many (user, presence_penalty, ...)."""
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        payload = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_show(payload)}")
    if payload.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    if payload.get("stop") not in (None, "", []):
        raise ApiError(400, "'stop' sequences are not supported (the model stops at its end-of-turn token)", "stop")
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        raise ApiError(400, f"'model' must be a string, got {_show(payload['model'])}", "model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {_show(stream)}", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    max_tokens = _integer(payload, "max_tokens", 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _integer(payload, "max_completion_tokens", 1, 1 << 20)  # OpenAI's newer name
    return ChatRequest(messages=_messages(payload),
                       temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
                       top_p=_number(payload, "top_p", 1.0, 0.0, 1.0, low_open=True),
                       top_k=_integer(payload, "top_k", 0, 1 << 20) or 0,
                       max_tokens=max_tokens, stream=bool(stream), include_usage=options.get("include_usage", False),
                       seed=_integer(payload, "seed", 0, MAX_SEED))


# ------------------------------------------------------------------------------------------ the engine
class Job:
    """One request in flight. The worker fills `events`: ("delta", text) as text decodes, then ("done", reason)
    with reason "stop" (end-of-turn token) or "length" (max_tokens reached), or ("error", ApiError)."""

    def __init__(self, request, prompt, max_tokens):
        self.request, self.prompt, self.max_tokens = request, prompt, max_tokens
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.events = queue.Queue()
        self.cancelled = threading.Event()  # set by the handler when the client went away
        self.tokens = []  # generated ids, the closing eos included
        self.sent = ""  # text already emitted as deltas

    def usage(self):
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}


class Engine:
    """Owns the model; one worker thread decodes batches of queued jobs. Handler threads call prepare() and
    submit(), then read job.events. A batch is formed from the jobs waiting when the previous one ends."""

    def __init__(self, model, tokenizer, model_name="nanollm", max_batch=8, default_max_tokens=256,
                 truncate_history=True, max_queue=256):
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.max_batch, self.default_max_tokens, self.max_queue = max_batch, default_max_tokens, max_queue
        self.truncate_history = truncate_history  # drop the oldest turns of a conversation longer than the context
        self.queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="nanollm-engine", daemon=True)
        self.worker.start()

    def close(self):
        self.queue.put(None)
        self.worker.join(timeout=30)

    # ------------------------------------------------------------------ called from handler threads
    def prepare(self, request):
        """A Job with the prompt ids of a validated request and its token budget; 400 if it cannot fit."""
        prompt = self.fit_history(request.messages, request.max_tokens)
        wanted, block = request.max_tokens, self.block_size
        room = block - len(prompt)  # tokens left for the answer
        if room < 1 or (wanted is not None and wanted > room):
            asked = f" + max_tokens {wanted}" if wanted is not None else ""
            raise ApiError(400, f"the prompt is {len(prompt)} tokens{asked}: more than the model's context of "
                           f"{block} tokens", "max_tokens" if wanted and room >= 1 else "messages",
                           code="context_length_exceeded")
        return Job(request, prompt, wanted or min(self.default_max_tokens, room))

    def fit_history(self, messages, wanted):
        """Prompt ids of the conversation, its oldest turns dropped (when truncate_history) until the prompt leaves
        room for the answer. The system message and the last user turn are always kept; a turn is a user message
        and the replies after it. Each message is tokenized once: the template is a concatenation
        (<s>, then each message's own ids, then <|assistant|>), so a kept suffix's length is a sum."""
        try:  # a message's ids in the template: encode_messages of it alone, minus the leading <s>
            pieces = [encode_messages(self.tokenizer, [message])[0][1:] for message in messages]
        except ValueError as error:
            raise ApiError(400, str(error), "messages") from None
        first = 1 if messages[0]["role"] == "system" else 0
        reserve = wanted or min(self.default_max_tokens, self.block_size // 2)  # room kept for the answer
        users = [i for i in range(first, len(messages)) if messages[i]["role"] == "user"]
        starts = [first]  # where the kept turns may begin, oldest first: the whole history, then each later user turn
        if self.truncate_history and len(users) > 1:
            starts += [i for i in users if i > first]
        fixed = 2 + sum(len(piece) for piece in pieces[:first])  # <s>, the system message, <|assistant|>
        suffix_lengths = [0] * (len(messages) + 1)  # suffix_lengths[i] = tokens of messages[i:]
        for i in range(len(messages) - 1, -1, -1):
            suffix_lengths[i] = suffix_lengths[i + 1] + len(pieces[i])
        start = next((i for i in starts if fixed + suffix_lengths[i] + reserve <= self.block_size), starts[-1])
        kept = pieces[:first] + pieces[start:]
        return [self.tokenizer.bos_id] + [i for piece in kept for i in piece] + [self.tokenizer.assistant_id]

    def submit(self, job):
        if not self.worker.is_alive():
            raise ApiError(503, "the model worker has stopped", type="server_error")
        if self.queue.qsize() >= self.max_queue:
            raise ApiError(503, f"server busy: {self.max_queue} requests are waiting; retry later",
                           type="server_error", code="overloaded")
        self.queue.put(job)

    # ---------------------------------------------------------------------------- the worker thread
    def _work(self):
        pending = collections.deque()  # jobs waiting, oldest first
        while True:
            if not pending:
                pending.append(self.queue.get())  # block until there is work
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            if None in pending:  # close() was called
                return
            batch = self.take_batch(pending)
            if not batch:
                continue
            try:
                self.generate(batch)
            except Exception as error:  # answer the batch with a 500; the worker carries on
                traceback.print_exc()
                for job in batch:
                    job.events.put(("error", ApiError(500, f"generation failed: {type(error).__name__}: {error}",
                                                      type="server_error")))

    def take_batch(self, pending):
        """The oldest waiting job, then later ones while they fit: at most max_batch rows, and the longest prompt
        plus the largest max_tokens within block_size (left padding makes every row as wide as the longest)."""
        batch, kept, width, steps = [], collections.deque(), 0, 0
        while pending:
            job = pending.popleft()
            if job.cancelled.is_set():
                continue
            new_width, new_steps = max(width, len(job.prompt)), max(steps, job.max_tokens)
            if not batch or (len(batch) < self.max_batch and new_width + new_steps <= self.block_size):
                batch.append(job)
                width, steps = new_width, new_steps
            else:
                kept.append(job)
        pending.extend(kept)
        return batch

    @torch.no_grad()
    def generate(self, jobs):
        """Decode one batch: left-padded prompts, one forward per step through the KV cache, each row sampled with
        its own temperature/top_k/top_p (and its own generator when seeded), until every row has finished."""
        pad = self.tokenizer.pad_id
        width, steps = max(len(job.prompt) for job in jobs), max(job.max_tokens for job in jobs)
        idx = torch.tensor([[pad] * (width - len(job.prompt)) + job.prompt for job in jobs],
                           device=self.device)  # (B, T)
        attention_mask = torch.tensor([[0] * (width - len(job.prompt)) + [1] * len(job.prompt) for job in jobs],
                                      device=self.device)  # (B, T): 0 on left padding
        cache = self.model.new_kv_cache(len(jobs), width + steps)
        generators = [torch.Generator(self.device).manual_seed(job.request.seed)
                      if job.request.seed is not None else None for job in jobs]
        active = [True] * len(jobs)
        step_input = idx
        for _ in range(steps):
            logits, _ = self.model(step_input, attention_mask=attention_mask, kv_cache=cache)
            last = logits[:, -1, :]  # (B, V)
            next_tokens = []
            for row, job in enumerate(jobs):
                active[row] = active[row] and not job.cancelled.is_set()  # a client that left frees its row
                token = pad
                if active[row]:
                    settings = job.request
                    token = int(sample_next_token(last[row:row + 1], settings.temperature, settings.top_k or None,
                                                  settings.top_p, generators[row]))
                    active[row] = not self.deliver(job, token)
                next_tokens.append(token)
            if not any(active):
                return
            step_input = torch.tensor(next_tokens, device=self.device)[:, None]  # (B, 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_input)], dim=1)  # (B, Tk + 1)

    def deliver(self, job, token):
        """Record one sampled token and emit the text it completes. Returns True when the job has finished."""
        job.tokens.append(token)
        if token == self.tokenizer.eos_id:
            return self.finish(job, "stop")
        text = self.tokenizer.decode(job.tokens, skip_special=True)
        # a byte-fallback piece may end in half a UTF-8 character (decoded as U+FFFD): wait for the rest
        if not text.endswith("\ufffd") and text.startswith(job.sent) and len(text) > len(job.sent):
            job.events.put(("delta", text[len(job.sent):]))
            job.sent = text
        if len(job.tokens) >= job.max_tokens:
            return self.finish(job, "length")
        return False

    def finish(self, job, reason):
        text = self.tokenizer.decode([t for t in job.tokens if t != self.tokenizer.eos_id], skip_special=True)
        if text.startswith(job.sent) and len(text) > len(job.sent):  # a held-back tail (half a character)
            job.events.put(("delta", text[len(job.sent):]))
            job.sent = text
        job.events.put(("done", reason))
        return True


# --------------------------------------------------------------------------------------- wire formats
def completion_body(job, model_name, content, finish_reason):
    """OpenAI's chat.completion object."""
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": job.usage()}


def chunk_body(job, model_name, delta, finish_reason=None):
    """OpenAI's chat.completion.chunk object: one piece of a streamed answer."""
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def sse_event(data):
    """One server-sent event: 'data: <json>' and a blank line ('[DONE]' is sent as is)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")


def parse_sse(text):
    """The data fields of a server-sent event stream, in order (for clients and tests)."""
    return [line[len("data:"):].strip() for event in text.split("\n\n") for line in event.split("\n")
            if line.startswith("data:")]


# ---------------------------------------------------------------------------------------- HTTP server
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "nanollm"
    disable_nagle_algorithm = True  # each SSE chunk leaves at once instead of waiting for the previous ACK

    def setup(self):
        self.timeout = self.server.read_timeout  # seconds a socket read or write may wait (the server's setting)
        super().setup()

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    def dispatch(self):
        routes = {"/": {"GET": self.page}, "/health": {"GET": self.health}, "/v1/models": {"GET": self.models},
                  "/v1/chat/completions": {"POST": self.chat_completions}}
        self.streaming = False  # a 200 event stream has begun: errors can only be sent as events now
        path = urlsplit(self.path).path
        try:
            self.check_host()
            if path not in routes:
                raise ApiError(404, f"unknown path {path}", type="not_found_error")
            if self.command not in routes[path]:
                raise ApiError(405, f"{self.command} is not allowed on {path}; use {', '.join(routes[path])}")
            routes[path][self.command]()
        except ApiError as error:
            self.send_error_json(error, allow=", ".join(routes.get(path, ())))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left, or stopped reading
            self.close_connection = True
        except Exception as error:  # a bug: log it, answer 500, keep serving
            traceback.print_exc(file=sys.stderr)
            self.send_error_json(ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long, unknown method) as JSON too."""
        self.send_error_json(ApiError(code, message or HTTPStatus(code).phrase,
                                      type="server_error" if code >= 500 else "invalid_request_error"))

    def send_error_json(self, error, allow=""):
        if getattr(self, "streaming", False):  # mid-stream: tell the client, then hang up
            self.close_connection = True
            try:
                self.write_chunk(sse_event(error.body()))
                self.write_chunk(b"")
            except OSError:
                pass
            return
        self.log_error("%d %s", error.status, error.message)
        headers = {"Allow": allow} if error.status == 405 and allow else {}
        try:
            self.send_json(error.status, error.body(), headers, head_only=self.command == "HEAD")
        except OSError:
            self.close_connection = True

    def send_json(self, status, payload, headers=None, head_only=False):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:  # the request body may be unread: start afresh on a new connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def check_host(self):
        """DNS rebinding: a page on evil.example whose name is re-pointed at 127.0.0.1 reaches this server as the
        same origin, but its requests still say `Host: evil.example`. Accept only IP addresses, localhost names,
        the name the server was bound to and the allowed_hosts setting (the default of Vite's dev server)."""
        host = self.headers.get("Host")
        if host is None:
            raise ApiError(400, "a Host header is required (HTTP/1.1)")
        name = urlsplit(f"//{host}").hostname or ""
        try:
            ipaddress.ip_address(name)
            return
        except ValueError:
            pass
        if name == "localhost" or name.endswith(".localhost") or name in self.server.allowed_hosts:
            return
        raise ApiError(403, f"Host {host[:60]!r} is not allowed: use an IP address or localhost, or start the server "
                            f"with allowed_hosts naming it (DNS rebinding protection)", type="permission_error")

    def check_json_body(self):
        """Only application/json is executed. A cross-origin page can POST text/plain without asking (a CORS
        "simple request"); application/json makes the browser ask first (a preflight OPTIONS), which we refuse."""
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got "
                                f"{self.headers.get('Content-Type', 'none')[:60]!r}", code="unsupported_media_type")

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not supported: send Content-Length")
        if self.headers.get("Content-Length") is None:
            raise ApiError(411, "a Content-Length header with the body's size is required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            raise ApiError(400, f"bad Content-Length {self.headers['Content-Length']!r}")
        limit = self.server.max_body_bytes
        if length > limit:
            if length <= DRAIN_LIMIT:  # read and drop it, so the client is not cut off before it reads our 413
                left = length
                while left > 0:
                    piece = self.rfile.read(min(left, 1 << 16))
                    left = left - len(piece) if piece else 0
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                           code="request_too_large")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.server.read_timeout} s",
                           code="request_timeout") from None
        if len(body) < length:
            raise ApiError(400, f"request body ended after {len(body)} of {length} bytes")
        return body

    # ------------------------------------------------------------------------------------- routes
    def page(self):
        with open(self.server.page_path, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        # the page may load nothing from elsewhere (it has no external URLs; this makes the browser enforce it)
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                                    "style-src 'self' 'unsafe-inline'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(data)

    def health(self):
        engine = self.server.engine
        self.send_json(200, {"status": "ok" if engine.worker.is_alive() else "worker stopped",
                             "model": engine.model_name, "queued": engine.queue.qsize()})

    def models(self):
        engine = self.server.engine
        self.send_json(200, {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": self.server.created, "owned_by": "nanollm",
            "context_length": engine.block_size, "default_max_tokens": engine.default_max_tokens}]})

    def chat_completions(self):
        engine = self.server.engine
        body = self.read_body()
        self.check_json_body()
        request = parse_chat_request(body)
        job = engine.prepare(request)
        engine.submit(job)
        try:
            if request.stream:
                self.stream(job)
            else:
                content, reason = "", None
                for kind, value in self.events(job):
                    content, reason = (content + value, reason) if kind == "delta" else (content, value)
                self.send_json(200, completion_body(job, engine.model_name, content, reason))
        finally:
            job.cancelled.set()  # a no-op when done; frees the row when the client went away mid-answer

    def events(self, job):
        """Yield the job's ("delta", text) and finally ("done", reason) events; raise its error."""
        while True:
            try:
                kind, value = job.events.get(timeout=1.0)
            except queue.Empty:
                if not self.server.engine.worker.is_alive():
                    raise ApiError(500, "the model worker stopped", type="server_error") from None
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    def stream(self, job):
        name = self.server.engine.model_name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.streaming = True
        self.write_chunk(sse_event(chunk_body(job, name, {"role": "assistant", "content": ""})))
        for kind, value in self.events(job):
            if kind == "delta":
                self.write_chunk(sse_event(chunk_body(job, name, {"content": value})))
            else:
                self.write_chunk(sse_event(chunk_body(job, name, {}, finish_reason=value)))
        if job.request.include_usage:
            self.write_chunk(sse_event({**chunk_body(job, name, {}), "choices": [], "usage": job.usage()}))
        self.write_chunk(sse_event("[DONE]"))
        self.write_chunk(b"")  # the zero-length chunk ends the response

    def write_chunk(self, data):
        """One piece of a chunked (HTTP/1.1) response: hex length, CRLF, data, CRLF."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    """A thread per connection (ThreadingHTTPServer); all of them share one Engine."""
    daemon_threads = True
    request_queue_size = 1024  # listen() backlog: socketserver's default of 5 resets bursts of new connections

    def __init__(self, address, engine, max_body_bytes=1 << 20, quiet=False, page_path=PAGE_PATH, read_timeout=60,
                 allowed_hosts=()):
        self.engine, self.max_body_bytes, self.quiet, self.page_path = engine, max_body_bytes, quiet, page_path
        self.read_timeout = read_timeout  # seconds a client may stall mid-request (then 408)
        self.allowed_hosts = set(allowed_hosts) | {address[0]}  # Host names accepted besides IPs and localhost
        self.created = int(time.time())
        super().__init__(address, Handler)


def make_server(engine, host="127.0.0.1", port=8000, max_body_bytes=1 << 20, quiet=False, read_timeout=60,
                allowed_hosts=()):
    """A ChatServer bound to host:port (port 0: any free port, read it from server.server_address[1]).
    Call server.serve_forever() (in a thread if you like), then server.shutdown() and server.server_close().
    No CORS headers are sent: a page from another origin cannot read the answers or send JSON."""
    return ChatServer((host, port), engine, max_body_bytes, quiet, read_timeout=read_timeout,
                      allowed_hosts=allowed_hosts)
