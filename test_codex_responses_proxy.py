"""Tests for codex_responses_proxy, over real sockets on 127.0.0.1.

The fake backend and the fake OAuth server below behave like the real ones (docs/backend.md
§2-§5): the backend wants a valid bearer, stream=true, store=false and instructions, rejects the
parameters the real one rejects, and answers server-sent events whose response.completed
carries "output": []. Run: python3 -m unittest -v (the whole module gives half of its classes to a
worker process, see load_tests; a class or a test named on the command line runs in one process)

The file follows the program, a section (a ==== banner) per part:
  Harness       tokens, the fake backend (Codex, platform, scripted), the fake OAuth server, one
                raw HTTP client and wait_until, ProxyTestCase (proxy_options, with_proxy_options)
  Server        connections, limits, descriptors      Handler    framing, bad input, routes, logs
  Access policy key, Host, Origin, Content-Type       Bodies     limits, gzip, JSON, multipart
  App           routes, /v1/models, API-key mode      Front ends Responses, Chat, Messages,
                                                                 images, effort names
  Upstream      credentials, Codex CLI, login, HTTP, pool, backend WebSocket
  Relay         streams, failures, hang-ups           Client WebSocket
  Stores        conversations, state-db, compaction   Codecs     SSE, WebSocket framing, assembly
  Process       main, signals, secrets, login command, script process
  Status        /status, /healthz, the status page
"""

import base64
import collections
import concurrent.futures
import contextlib
import datetime
import email.utils
import errno
import gzip
import hashlib
import hmac
import http.client
import io
import itertools
import json
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import zlib
from unittest import mock

import codex_responses_proxy as proxy


# ============================================================================================
# Harness: constants, tokens and auth.json
# ============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))


PROGRAM = os.path.join(HERE, "codex_responses_proxy.py")


API_KEY = "sk-proj_ABC-123"
API_KEY_HEADER = b"Bearer " + API_KEY.encode()  # proxy_options for API-key mode


CLIENT_KEY = "k-123-4f9c2e7a1b8d6053c3e1a9f4b2d7e6c5"


ALLOWED_ORIGIN = "http://localhost:3000"


DEFAULT_HOST = object()  # "Host: 127.0.0.1:PORT", as a well-behaved local client sends


CLIENT_TIMEOUT = 5.0  # a client socket's timeout: a proxy that never ends a stream fails fast


def b64url(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def make_jwt(claims):
    return "%s.%s.%s" % (b64url({"alg": "RS256", "typ": "JWT"}), b64url(claims),
                         b64url({"sig": os.urandom(8).hex()}))


def access_token(exp_in=3600, account="acct-from-access", serial=None):
    claims = {"exp": int(time.time()) + (exp_in or 0),
              "https://api.openai.com/auth": {"chatgpt_account_id": account,
                                              "chatgpt_plan_type": "plus"},
              "jti": serial or os.urandom(6).hex()}
    if exp_in is None:
        del claims["exp"]
    return make_jwt(claims)


def id_token(account="acct-from-id"):
    return make_jwt({"email": "user@example.com",
                     "https://api.openai.com/auth": {"chatgpt_account_id": account,
                                                     "chatgpt_plan_type": "pro"}})


def login_id_token(fedramp=False):
    """The id token of a login made against FakeOAuth."""
    auth = {"chatgpt_account_id": "acct-login", "chatgpt_plan_type": "pro",
            "chatgpt_user_id": "user-login"}
    if fedramp:
        auth["chatgpt_account_is_fedramp"] = True
    return make_jwt({"email": "login@example.com", "https://api.openai.com/auth": auth})


def challenge_of(verifier):
    """The PKCE S256 challenge of a verifier."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(
        b"=").decode()


def auth_document(access=None, refresh="rt-initial-0123456789", account_id="acct-file",
                  last_refresh="2026-11-20T10:00:00.123456789Z", **extra):
    doc = {"auth_mode": "chatgpt", "OPENAI_API_KEY": None,
           "tokens": {"id_token": id_token(), "access_token": access or access_token(),
                      "refresh_token": refresh, "account_id": account_id},
           "last_refresh": last_refresh}
    doc.update(extra)
    return doc


def write_auth(home, doc, mode=0o600):
    path = os.path.join(home, "auth.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    os.chmod(path, mode)
    return path


def read_auth(home):
    with open(os.path.join(home, "auth.json")) as f:
        return json.load(f)


def tokens_of(home):
    """Every credential in home/auth.json."""
    with open(os.path.join(home, "auth.json")) as f:
        doc = json.load(f)
    return [v for v in (doc.get("tokens") or {}).values() if isinstance(v, str)
            and v.startswith(("ey", "rt"))]


# --------------------------------------------------------------------------------------------
# Harness: the fake backend (Codex, the platform, scripted behaviours)
# --------------------------------------------------------------------------------------------

def sse(etype, payload, eol=b"\n"):
    payload = dict(payload, type=etype)
    return (b"event: " + etype.encode() + eol + b"data: " + json.dumps(payload).encode()
            + eol + eol)


def message_item(text, item_id="msg_1"):
    return {"type": "message", "id": item_id, "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def function_call_item(name="get_weather", arguments='{"city": "Paris"}', call_id="call_1"):
    return {"type": "function_call", "id": "fc_1", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}


def reasoning_item():
    return {"type": "reasoning", "id": "rs_1", "summary": [
        {"type": "summary_text", "text": "Thinking about it."}],
        "encrypted_content": "gAAAA-encrypted"}


USAGE = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 7}, "output_tokens": 5,
         "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 26}


def response_object(status="completed", model="gpt-5.1-codex", resp_id="resp_1", **extra):
    obj = {"id": resp_id, "object": "response", "created_at": 1700000000, "status": status,
           "model": model, "output": [], "usage": None, "error": None,
           "incomplete_details": None}
    obj.update(extra)
    return obj


def stream_frames(items=None, text="Hello there!", terminal="response.completed",
                  terminal_extra=None, eol=b"\n", model="gpt-5.1-codex"):
    """The frames of one backend stream: created, in_progress, each item's events (text as
    several deltas), then the terminal event, with output [] as store=false gives."""
    if items is None:
        items = [message_item(text)]
    frames = [sse("response.created", {"sequence_number": 0, "response": response_object(
        "in_progress", model)}, eol),
        sse("response.in_progress", {"sequence_number": 1, "response": response_object(
            "in_progress", model)}, eol)]
    seq = 2
    for index, item in enumerate(items):
        frames.append(sse("response.output_item.added", {
            "sequence_number": seq, "output_index": index,
            "item": dict(item, status="in_progress")}, eol))
        seq += 1
        if item["type"] == "message":
            whole = item["content"][0]["text"]
            for i in range(0, len(whole), 4):
                frames.append(sse("response.output_text.delta", {
                    "sequence_number": seq, "item_id": item["id"], "output_index": index,
                    "content_index": 0, "delta": whole[i:i + 4]}, eol))
                seq += 1
        elif item["type"] == "function_call":
            frames.append(sse("response.function_call_arguments.delta", {
                "sequence_number": seq, "item_id": item["id"], "output_index": index,
                "delta": item["arguments"]}, eol))
            seq += 1
        frames.append(sse("response.output_item.done", {
            "sequence_number": seq, "output_index": index, "item": item}, eol))
        seq += 1
    final = response_object(terminal.split(".")[1], model, usage=USAGE)
    final.update(terminal_extra or {})
    frames.append(sse(terminal, {"sequence_number": seq, "response": final}, eol))
    return frames


def with_id(frames, resp_id):
    """stream_frames() output with every "resp_1" replaced by resp_id."""
    return [f.replace(b'"resp_1"', json.dumps(resp_id).encode()) for f in frames]


def reply_for(resp_id, text="Hello there!", **kw):
    return Reply(frames=with_id(stream_frames(text=text, **kw), resp_id))


def custom_frames(events, resp_id="resp_1", terminal="response.completed", terminal_extra=None):
    """response.created, the given (event type, payload) pairs, then the terminal event."""
    frames = [sse("response.created", {"sequence_number": 0, "response": response_object(
        "in_progress", resp_id=resp_id)})]
    for i, (etype, payload) in enumerate(events):
        frames.append(sse(etype, dict(payload, sequence_number=i + 1)))
    final = response_object(terminal.split(".")[1], resp_id=resp_id, usage=USAGE)
    final.update(terminal_extra or {})
    frames.append(sse(terminal, {"sequence_number": len(events) + 1, "response": final}))
    return frames


def text_events(text_pieces, index=0, item_id="msg_1"):
    item = message_item("".join(text_pieces), item_id)
    events = [("response.output_item.added", {"output_index": index, "item": dict(
        item, status="in_progress", content=[])})]
    for piece in text_pieces:
        events.append(("response.output_text.delta", {"item_id": item_id, "output_index": index,
                                                      "content_index": 0, "delta": piece}))
    events.append(("response.output_item.done", {"output_index": index, "item": item}))
    return events


def call_events(pieces, index=0):
    """A function call whose arguments the backend streams in the given pieces."""
    item = function_call_item(arguments="".join(pieces))
    events = [("response.output_item.added", {"output_index": index, "item": dict(
        item, status="in_progress", arguments="")})]
    for piece in pieces:
        events.append(("response.function_call_arguments.delta", {
            "item_id": item["id"], "output_index": index, "delta": piece}))
    events.append(("response.function_call_arguments.done", {
        "item_id": item["id"], "output_index": index, "arguments": item["arguments"]}))
    events.append(("response.output_item.done", {"output_index": index, "item": item}))
    return events


def reasoning_events(pieces, index=0):
    item = reasoning_item()
    events = [("response.output_item.added", {"output_index": index, "item": {
        "type": "reasoning", "id": item["id"], "summary": []}})]
    for piece in pieces:
        events.append(("response.reasoning_summary_text.delta", {
            "item_id": item["id"], "output_index": index, "summary_index": 0, "delta": piece}))
    events.append(("response.output_item.done", {"output_index": index, "item": item}))
    return events


def compaction_answer(items):
    """What the backend's compact endpoint answers (codex-rs/codex-api compact.rs reads only
    `output`): the user's messages kept, the rest replaced by one opaque compaction item."""
    kept = [dict(item, type="message") for item in items
            if isinstance(item, dict) and item.get("role") == "user"]
    return {"output": kept + [{"type": "compaction", "id": "cmp_1",
                               "encrypted_content": "gAAAA-compacted-history"}]}


class Reply:
    """One scripted backend answer. Either an HTTP error (status, body, headers), or a stream
    of frames with optional pauses, a cut (connection dropped) or a hang (silence).
    hold_after (a count of frames, or several): the backend stops there until the test calls
    go(); wait_held() tells the test the backend got there, so it can assert on order."""

    def __init__(self, status=200, body=None, headers=(), frames=None, delay=0.0,
                 cut_after=None, hang_after=None, content_type="text/event-stream",
                 chunk_split=None, hold_after=()):
        self.hold_after = {hold_after} if isinstance(hold_after, int) else set(hold_after)
        self._held = threading.Semaphore(0)
        self._go = threading.Semaphore(0)
        self.status = status
        self.body = body
        self.headers = list(headers)
        self.frames = frames
        self.delay = delay
        self.cut_after = cut_after
        self.hang_after = hang_after
        self.content_type = content_type
        self.chunk_split = chunk_split  # write each frame in pieces this many bytes long

    def wait_held(self, timeout=10.0):
        return self._held.acquire(timeout=timeout)

    def go(self):
        self._go.release()

    def hold(self, stopping):
        """In the backend: wait for go(), or for the backend's close."""
        self._held.release()
        while not self._go.acquire(timeout=0.1):
            if stopping.is_set():
                return False
        return True


class FakeRequest:
    """One request a FakeBackend read, and the connection it came on. A route answers it with
    answer() or send_head() + send(), or takes over .sock for anything else (raw bytes, a
    WebSocket; read from .reader then, it may hold bytes already): it returns True to read
    the next request on the connection, False to close."""

    def __init__(self, sock, reader, conn_no, req_no, line, headers, raw):
        self.sock, self.reader = sock, reader
        self.conn_no, self.req_no = conn_no, req_no
        self.line = line
        parts = line.decode("latin-1").split()
        self.method, self.target, self.version = (parts + ["", "", ""])[:3]
        self.path = self.target.split("?", 1)[0]
        self.headers = headers  # an http.client.HTTPMessage: case-insensitive, get_all()
        self.raw = raw
        connection = (headers.get("Connection") or "").lower()
        self.keep_alive = "close" not in connection and (
            self.version == "HTTP/1.1" or "keep-alive" in connection)

    def json(self):
        try:
            return json.loads(self.raw)
        except ValueError:
            return None

    def send(self, data):
        self.sock.sendall(data)

    def send_head(self, status, headers=()):
        """Status line and header block, with Server and Date as http.server sends them."""
        lines = ["HTTP/1.1 %d %s" % (status, http.client.responses.get(status, "Unknown")),
                 "Server: FakeBackend", "Date: " + email.utils.formatdate(usegmt=True)]
        lines += ["%s: %s" % (k, v) for k, v in headers]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def answer(self, status, body, headers=(), content_type="application/json"):
        self.send_head(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(body)))] + list(headers))
        self.send(body)
        return self.keep_alive

    def send_chunks(self, frames, split=None):
        for frame in frames:
            step = split or len(frame)
            for j in range(0, len(frame), step):
                piece = frame[j:j + step]
                self.send(b"%X\r\n%s\r\n" % (len(piece), piece))


def read_request_head(reader):
    """(request line, HTTPMessage) of the next request; None at EOF."""
    line = reader.readline(65537)
    while line in (b"\r\n", b"\n"):  # tolerated before a request line, as http.server does
        line = reader.readline(65537)
    if not line:
        return None
    return line, http.client.parse_headers(reader)


def read_request_body(reader, headers):
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        parts = []
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(reader.read(size))
            reader.readline()
    length = int(headers.get("Content-Length") or 0)
    return reader.read(length) if length else b""


class FakeBackend:
    """The suite's one fake upstream server: raw sockets, a thread per connection, a small HTTP
    parser, and routes. By default it is chatgpt.com/backend-api/codex as docs/backend.md §3
    describes it: POST .../responses wants a valid bearer, stream=true, store=false and
    instructions, rejects what the real one rejects, and answers the scripted `replies`
    (Reply). Other jobs, by constructor argument:
      platform_key=K  api.openai.com in API-key mode: only `Bearer K` gets in; replies are
                      ("json", status, body, content_type, headers) or ("sse", frames, gated)
      behave=f        byte-exact scripting: f(backend, conn_no, req_no, sock, request) answers
                      (or not) every request itself and returns True to keep the connection
      routes={...}    a bare server with just these routes
    route(method, path, handler) adds or replaces a route: handler(FakeRequest) -> keep open;
    method or path None matches any."""

    REJECTED = {"max_output_tokens", "temperature", "top_p", "max_completion_tokens",
                "previous_response_id"}

    def __init__(self, behave=None, platform_key=None, routes=None):
        self.requests = []
        self.replies = collections.deque()
        self.valid_tokens = set()
        self.extra_rejected = set()
        self.answer_headers = [("x-codex-primary-used-percent", "12.5")]  # on JSON answers
        self.connections = 0
        self.requests_per_connection = {}  # conn_no -> requests read on it
        self.closed_early = threading.Event()  # a client closed while we were streaming
        self.closed = threading.Event()  # set by wait_for_close when the proxy closes
        self.closed_at = None
        self.key = platform_key
        self.gate = threading.Event()         # a gated platform stream waits for this
        self.stream_done = threading.Event()  # a platform stream was written to its end
        self.lock = threading.Lock()
        self.ws = FakeBackendWebSocket(self)
        self.stopping = threading.Event()
        self._socks = set()
        self.routes = {}
        if behave is not None:
            self.script(behave)
        elif routes is not None:
            self.routes.update(routes)
        elif platform_key is not None:
            self.route(None, None, self.platform_answer)
        else:
            self.route("POST", None, self.codex_answer)
            self.route("GET", None, lambda req: self.ws.upgrade(HandlerView(req)) and False)
            for endpoint in ("generations", "edits"):
                self.route("POST", "/backend-api/codex/images/" + endpoint, self.images_answer)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self.base = "http://127.0.0.1:%d" % self.port
        self.url = self.base + ("/v1/responses" if platform_key is not None
                                else "/backend-api/codex/responses")
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def route(self, method, path, handler):
        self.routes[(method, path)] = handler

    def script(self, behave):
        """From now on every request is behave(backend, conn_no, req_no, sock, request)'s, byte
        for byte; it returns True to keep reading that connection."""
        self.routes = {(None, None): lambda req: behave(self, req.conn_no, req.req_no, req.sock,
                                                        req)}

    # -- the server ----------------------------------------------------------------------

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                conn_no = self.connections
                self.connections += 1
                self.requests_per_connection[conn_no] = 0
                self._socks.add(sock)
            threading.Thread(target=self._serve, args=(sock, conn_no), daemon=True).start()

    def _serve(self, sock, conn_no):
        reader = sock.makefile("rb")
        try:
            for req_no in itertools.count():
                head = read_request_head(reader)
                if head is None:
                    return
                line, headers = head
                if (headers.get("Expect") or "").lower() == "100-continue":
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                raw = read_request_body(reader, headers)
                request = FakeRequest(sock, reader, conn_no, req_no, line, headers, raw)
                with self.lock:
                    self.requests_per_connection[conn_no] += 1
                if not self._dispatch(request) or not request.keep_alive:
                    return
        except (OSError, ValueError, http.client.HTTPException):
            pass  # the proxy closing a connection mid-answer is expected here
        finally:
            with self.lock:
                self._socks.discard(sock)
            reader.close()
            sock.close()

    def _dispatch(self, request):
        for key in ((request.method, request.path), (request.method, None), (None, None)):
            if key in self.routes:
                return self.routes[key](request)
        return request.answer(501, b"Unsupported method", content_type="text/plain")

    def wait_for_close(self, sock, limit):
        """Block until the peer (the proxy) closes this connection; records when."""
        sel = selectors.DefaultSelector()  # not select(): fds may be >= 1024
        sel.register(sock, selectors.EVENT_READ)
        try:
            if sel.select(limit):
                try:
                    data = sock.recv(1)
                except OSError:
                    data = b""
                if not data:
                    self.closed_at = time.monotonic()
                    self.closed.set()
        finally:
            sel.close()
        return False

    def close(self):
        self.stopping.set()
        self.gate.set()
        for how in (lambda: self.listener.shutdown(socket.SHUT_RDWR), self.listener.close):
            try:
                how()  # shutdown wakes the blocked accept() on Linux
            except OSError:
                pass
        with self.lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- chatgpt.com/backend-api/codex/responses -------------------------------------------

    def recorded(self, req, body):
        """The test's next Reply, with req noted as this backend got it."""
        with self.lock:
            self.requests.append({"method": req.method, "path": req.target,
                                  "headers": req.headers, "body": body, "raw": req.raw})
            return self.replies.popleft() if self.replies else Reply()

    def refusal(self, req, problem, reply):
        """The answer to a request the backend's checks refuse (problem: (status, detail)), or
        the test's scripted error reply; None when the request is to be answered."""
        if problem:
            status, detail = problem
            return req.answer(status, json.dumps({"detail": detail}).encode(),
                              self.answer_headers)
        if reply.status != 200 or reply.body is not None:
            return req.answer(reply.status, reply.body or b"",
                              self.answer_headers + reply.headers)
        return None

    def codex_answer(self, req):
        body = req.json()
        reply = self.recorded(req, body)
        compact = req.path.endswith("/responses/compact")  # one JSON object, not a stream
        refused = self.refusal(req, (self.check_compact if compact else self.check)(
            req.headers, body), reply)
        if refused is not None:
            return refused
        if compact:
            time.sleep(reply.delay)
            return req.answer(200, json.dumps(compaction_answer(body["input"])).encode(),
                              self.answer_headers + reply.headers)
        return self.codex_stream(req, reply)

    def codex_stream(self, req, reply):
        frames = reply.frames if reply.frames is not None else stream_frames()
        head = [("Content-Type", reply.content_type)] if reply.content_type else []
        head += [("Transfer-Encoding", "chunked"), ("x-codex-primary-used-percent", "12.5"),
                 ("x-codex-secondary-used-percent", "40"), ("x-request-id", "req-123")]
        try:
            req.send_head(200, head + reply.headers)
            for i, frame in enumerate(frames):
                if reply.cut_after is not None and i >= reply.cut_after:
                    req.send(b"%X\r\n%s\r\n" % (len(frame) // 2, frame[:len(frame) // 2]))
                    req.sock.shutdown(socket.SHUT_RDWR)
                    return False
                if reply.hang_after is not None and i >= reply.hang_after:
                    self.stopping.wait(30)
                    return False
                if i in reply.hold_after and not reply.hold(self.stopping):
                    return False
                if i == len(frames) - 1 and not reply.chunk_split:
                    # the last event and the body's end in one write, as a server's chunked
                    # encoder sends them: the proxy can pool the connection at once
                    req.send(b"%X\r\n%s\r\n0\r\n\r\n" % (len(frame), frame))
                    return True
                req.send_chunks([frame], reply.chunk_split)
                if reply.delay:
                    time.sleep(reply.delay)
            req.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.closed_early.set()
            return False
        return True

    def check(self, headers, body):
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid_tokens:
            return 401, "Unauthorized"
        if not isinstance(body, dict):
            return 400, "Invalid JSON"
        if body.get("stream") is not True:
            return 400, "Stream must be set to true"
        if body.get("store") is not False:
            return 400, "Store must be set to false"
        if not body.get("instructions"):
            return 400, "Instructions are required"
        for name in sorted(self.REJECTED | self.extra_rejected):
            if name in body:
                return 400, "Unsupported parameter: %s" % name
        if not isinstance(body.get("input"), list):
            return 400, "Input must be a list"
        for item in body["input"]:
            if isinstance(item, dict) and item.get("role") == "system":
                return 400, "System messages are not allowed"
        return None

    def check_compact(self, headers, body):
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid_tokens:
            return 401, "Unauthorized"
        if not isinstance(body, dict) or not isinstance(body.get("input"), list):
            return 400, "Input must be a list"
        if not body.get("model") or not body.get("instructions"):
            return 400, "Model and instructions are required"
        return None

    # -- chatgpt.com/backend-api/codex/images/generations and /edits -----------------------

    def images_answer(self, req):
        """JSON in, JSON out, as codex-rs/codex-api/src/endpoint/images.rs has it: the images
        as b64_json; each image's bytes here are "img:<prompt>:<i>"."""
        body = req.json()
        reply = self.recorded(req, body)
        refused = self.refusal(
            req, self.check_images(req.headers, body, req.path.endswith("/edits")), reply)
        if refused is not None:
            return refused
        answer = {"created": 1778832973, "background": body.get("background", "opaque"),
                  "data": [{"b64_json": base64.b64encode(
                      ("img:%s:%d" % (body["prompt"], i)).encode()).decode()}
                      for i in range(body.get("n") or 1)],
                  "output_format": "png", "quality": body.get("quality", "medium"),
                  "size": body.get("size", "1024x1024"),
                  "usage": {"input_tokens": 17, "output_tokens": 1372, "total_tokens": 1389}}
        return req.answer(200, json.dumps(answer).encode(),
                          self.answer_headers + [("x-request-id", "req-image")] + reply.headers)

    def check_images(self, headers, body, edit):
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid_tokens:
            return 401, "Unauthorized"
        if (headers.get("Content-Type") or "") != "application/json" or \
                not isinstance(body, dict):
            return 400, "Invalid JSON"
        if not isinstance(body.get("prompt"), str) or not isinstance(body.get("model"), str):
            return 400, "prompt and model are required"
        for name in sorted(self.extra_rejected):
            if name in body:
                return 400, "Unsupported parameter: %s" % name
        if edit:
            images = body.get("images")
            if not isinstance(images, list) or not images or not all(
                    isinstance(i, dict) and str(i.get("image_url")).startswith("data:image/")
                    for i in images):
                return 400, "images must be a list of {image_url: data URL}"
        elif "images" in body:
            return 400, "Unsupported parameter: images"
        return None

    def platform_answer(self, req):
        with self.lock:
            self.requests.append({
                "method": req.method, "path": req.target, "raw": req.raw,
                "headers": list(req.headers.items()),
                "authorization": req.headers.get_all("Authorization") or []})
            reply = self.replies.popleft() if self.replies else None
        if (req.headers.get_all("Authorization") or []) != ["Bearer " + self.key]:
            return req.answer(401, b'{"error": {"message": "Incorrect API key provided.", '
                              b'"type": "invalid_request_error", "param": null, '
                              b'"code": "invalid_api_key"}}')
        if reply is None:
            if req.path == "/v1/models":
                return req.answer(200, PLATFORM_MODELS, [("x-request-id", "req-models")])
            reply = ("json", 200, b'{"id": "resp_default", "object": "response"}',
                     "application/json", ())
        if reply[0] == "json":
            _, status, body, content_type, headers = reply
            return req.answer(status, body, headers, content_type)
        _, frames, gated = reply
        try:
            req.send_head(200, [("Content-Type", "text/event-stream"),
                                ("Transfer-Encoding", "chunked"), ("x-request-id", "req-stream")])
            for i, frame in enumerate(frames):
                req.send_chunks([frame])
                if i == 0 and gated:
                    self.gate.wait(5)
            req.send(b"0\r\n\r\n")
            self.stream_done.set()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


class HandlerView:
    """What FakeBackendWebSocket uses of an http.server handler, over a FakeRequest."""

    def __init__(self, req):
        self.req, self.headers, self.path = req, req.headers, req.target
        self.rfile, self.connection = req.reader, req.sock
        self.wfile = req.sock.makefile("wb", buffering=0)
        self.close_connection = True
        self._status, self._head = None, []

    def send_response(self, status):
        self._status, self._head = status, []

    def send_header(self, name, value):
        self._head.append((name, value))

    def end_headers(self):
        self.req.send_head(self._status, self._head)


class FakeBackendWebSocket:
    """The backend's WebSocket route (docs/backend.md §9), for a FakeBackend whose test
    enables it: `refuse` is the status upgrades get (426 by default: the proxy's auto
    transport then uses HTTP); None accepts them. Like the real backend it remembers the
    last response of each socket, so a turn may send previous_response_id and its new items
    only. Every response.create is also appended to backend.requests (with "ws": the socket
    number and "full_input": the input with the remembered history in front)."""

    def __init__(self, backend):
        self.backend = backend
        self.refuse = 426
        self.handshakes = []       # the upgrade requests' headers
        self.messages = []         # (socket number, the decoded response.create)
        self.pongs = []
        self.errors = collections.deque()  # error frames to answer the next creates with
        self.rate_limits = None    # a codex.rate_limits event sent before each answer
        self.ping_first = False    # a ping before each answer
        self.max_message_bytes = None
        self.turn_state = None
        self.deflate = None        # the 101's Sec-WebSocket-Extensions; None declines
        self.wire = []             # (socket number, RSV1 set, payload bytes) per client message
        self.closed_early = threading.Event()
        self.sockets = 0
        self.open = {}             # socket number -> its connection, while open
        self.next_id = 0

    def upgrade(self, handler):
        backend = self.backend
        headers = handler.headers
        with backend.lock:
            self.handshakes.append(headers)
        auth = headers.get("Authorization") or ""
        status = self.refuse
        if status is None and (not auth.startswith("Bearer ")
                               or auth[7:] not in backend.valid_tokens):
            status = 401
        if status is None and (headers.get("Upgrade", "").lower() != "websocket"
                               or not headers.get("Sec-WebSocket-Key")):
            status = 400
        if status is not None:
            body = json.dumps({"detail": "no WebSocket here (%d)" % status}).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        accept = base64.b64encode(hashlib.sha1(
            headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        ).digest()).decode()
        handler.send_response(101)
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept)
        handler.send_header("x-codex-primary-used-percent", "33")
        handler.send_header("x-request-id", "req-ws")
        if self.max_message_bytes:
            handler.send_header("x-codex-websocket-max-message-bytes",
                                str(self.max_message_bytes))
        if self.turn_state:
            handler.send_header("x-codex-turn-state", self.turn_state)
        if self.deflate:
            handler.send_header("Sec-WebSocket-Extensions", self.deflate)
        handler.end_headers()
        handler.wfile.flush()
        handler.close_connection = True
        with backend.lock:
            self.sockets += 1
            number = self.sockets
        self.open[number] = handler.connection
        try:
            self.serve(handler, number)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            del self.open[number]

    def serve(self, handler, number):
        last = None  # (response id, history) this socket remembers
        codec = FakeDeflate(self.deflate) if (self.deflate or "").startswith(
            "permessage-deflate") else None
        while True:
            first, payload = fake_ws_recv_frame(handler.rfile)
            opcode = first & 0x0F
            if opcode == 1:
                self.wire.append((number, bool(first & 0x40), len(payload)))
            if first & 0x40:
                if codec is None or opcode != 1:
                    raise ValueError("RSV1 where no compressed message may start")
                payload = codec.inflate(payload)
            if opcode == 8:
                return
            if opcode == 10:
                self.pongs.append(payload)
                continue
            if opcode != 1:
                continue
            message = json.loads(payload)
            backend = self.backend
            with backend.lock:
                self.messages.append((number, message))
                error = self.errors.popleft() if self.errors else None
                reply = None if error else (backend.replies.popleft() if backend.replies
                                            else Reply())
            previous = message.get("previous_response_id")
            known = last is not None and previous == last[0]
            items = message.get("input") if isinstance(message.get("input"), list) else []
            full = (last[1] if known else []) + items
            body = {k: v for k, v in message.items() if k not in ("type",
                                                                    "previous_response_id")}
            body["input"] = full
            with backend.lock:
                backend.requests.append({"path": handler.path, "headers": handler.headers,
                                         "body": message, "full_input": full, "ws": number,
                                         "raw": payload})
            last = None
            if previous is not None and not known:
                error = {"type": "error", "error": {
                    "type": "invalid_request_error", "code": "previous_response_not_found",
                    "message": "Previous response with id '%s' not found." % previous}}
            if error is None:
                problem = backend.check(handler.headers, body)
                if problem:
                    error = {"type": "error", "status": problem[0],
                             "error": {"message": problem[1]}}
            if error is None and reply.status != 200:
                detail = json.loads(reply.body) if reply.body else {}
                error = {"type": "error", "status": reply.status,
                         "error": detail.get("error", detail), "headers": dict(reply.headers)}
            send = lambda opcode, data: fake_ws_send(handler.connection, opcode, data) \
                if codec is None or opcode != 1 else \
                fake_ws_send(handler.connection, 0x40 | opcode, codec.deflate(data))
            if self.ping_first:
                send(9, b"are you there")
            if self.rate_limits:
                send(1, json.dumps(self.rate_limits).encode())
            if error is not None:
                send(1, json.dumps(error).encode())
                continue
            last = self.answer(send, reply, full, handler)
            if last is False:
                return

    def answer(self, send, reply, full, handler):
        """The reply's frames as text frames; (response id, history) after a completed one."""
        frames = reply.frames if reply.frames is not None else stream_frames()
        with self.backend.lock:
            self.next_id += 1
            response_id = "resp_ws_%d" % self.next_id
        output = []
        try:
            for i, frame in enumerate(frames):
                if reply.cut_after is not None and i >= reply.cut_after:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return False
                if reply.hang_after is not None and i >= reply.hang_after:
                    time.sleep(30)
                    return False
                event = parse_sse(frame)[0][1]
                if event["type"] == "response.output_item.done":
                    output.append(event["item"])
                if isinstance(event.get("response"), dict):
                    event["response"]["id"] = response_id
                send(1, json.dumps(event).encode())
                if reply.delay:
                    time.sleep(reply.delay)
        except OSError:
            self.closed_early.set()
            return False
        return (response_id, full + output) if frames and b"response.completed" in frames[-1] \
            else None


def fake_ws_send(sock, opcode, payload):
    """A server frame: not masked."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    sock.sendall(head + payload)


def fake_ws_recv(rfile):
    """(opcode, payload) of the next client frame, which must be masked (RFC 6455 5.1)."""
    first, payload = fake_ws_recv_frame(rfile)
    return first & 0x0F, payload


def fake_ws_recv_frame(rfile):
    """(first byte, payload) of the next client frame: its RSV bits beside the opcode."""
    def read(n):
        data = rfile.read(n)
        if len(data) < n:
            raise EOFError()
        return data
    b0, b1 = read(2)
    if not b1 & 0x80:
        raise ValueError("an unmasked client frame")
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(read(2), "big")
    elif n == 127:
        n = int.from_bytes(read(8), "big")
    key = read(4)
    data = read(n)
    return b0, bytes(b ^ key[i % 4] for i, b in enumerate(data))


class FakeDeflate:
    """The backend's end of permessage-deflate (RFC 7692), written apart from the proxy's:
    what the 101 agreed decides which side starts each message with a fresh context. A
    client that kept its context where it agreed not to fails here, on a back-reference
    the fresh inflater cannot resolve."""

    def __init__(self, agreed):
        params = [p.strip().split("=")[0] for p in agreed.split(";")[1:]]
        self.fresh_out = "server_no_context_takeover" in params
        self.fresh_in = "client_no_context_takeover" in params
        self._out = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._in = zlib.decompressobj(-15)

    def deflate(self, payload):
        if self.fresh_out:
            self._out = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = self._out.compress(payload) + self._out.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(b"\x00\x00\xff\xff")
        return data[:-4]

    def inflate(self, payload):
        if self.fresh_in:
            self._in = zlib.decompressobj(-15)
        try:
            return self._in.decompress(payload + b"\x00\x00\xff\xff")
        except zlib.error as e:  # ends the socket, as the fake's other protocol errors
            raise ValueError("does not inflate: %s" % e)


def server_frame(opcode, payload, fin=True):
    """A backend's frame, unmasked, possibly a fragment."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes([first, n]) + payload
    if n < 65536:
        return bytes([first, 126]) + n.to_bytes(2, "big") + payload
    return bytes([first, 127]) + n.to_bytes(8, "big") + payload


class RevokedTokens(set):
    """valid_tokens of a backend that takes no token, not even a refreshed one."""

    def add(self, token):
        pass


BACKEND_MODELS = {"models": [
    {"slug": "gpt-5.1-codex", "display_name": "GPT-5.1 Codex", "visibility": "list",
     "supported_in_api": True, "context_window": 272000,
     "supported_reasoning_levels": [{"effort": "low"}, {"effort": "high"}]},
    {"slug": "hidden-one", "visibility": "hide", "supported_in_api": True},
    {"slug": "gpt-5-codex-mini", "visibility": "list", "supported_in_api": True},
    {"slug": "internal-none", "visibility": "none"},
    {"slug": "no-visibility-field"},
]}


def add_models_endpoint(backend):
    """Teach a FakeBackend GET /backend-api/codex/models?client_version=V: it checks the
    bearer and the query, counts calls (backend.model_requests) and answers
    backend.models_failure = (status, body) instead when that is set."""
    backend.model_requests = []
    backend.models_failure = None
    backend.models_doc = BACKEND_MODELS

    def models(req):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.target).query)
        with backend.lock:
            backend.model_requests.append({"path": req.path, "query": query,
                                           "headers": req.headers})
        auth = req.headers.get("Authorization") or ""
        if req.path != "/backend-api/codex/models":
            status, body = 404, {"detail": "Not Found"}
        elif not auth.startswith("Bearer ") or auth[7:] not in backend.valid_tokens:
            status, body = 401, {"detail": "Unauthorized"}
        elif not query.get("client_version"):
            status, body = 400, {"detail": "client_version is required"}
        elif backend.models_failure:
            status, body = backend.models_failure
        else:
            status, body = 200, backend.models_doc
        return req.answer(status, json.dumps(body).encode())

    backend.route("GET", None, models)


PLATFORM_MODELS = (b'{"object": "list", "data": [{"id": "gpt-4.1", "object": "model", '
                   b'"created": 1686935002, "owned_by": "system"}]}')


def platform_frames():
    """An API stream as api.openai.com frames it (LF line ends, event then data)."""
    return [
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
        b'"response":{"id":"resp_p1","status":"in_progress"}}\n\n',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"sequence_number":1,"delta":"Hel"}\n\n',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"sequence_number":2,"delta":"lo"}\n\n',
        b'event: response.completed\ndata: {"type":"response.completed","sequence_number":3,'
        b'"response":{"id":"resp_p1","status":"completed","output":[]}}\n\n',
    ]


def fake_platform(key=API_KEY):
    """POST /v1/responses and GET /v1/models of the OpenAI platform: only `Bearer <key>` gets
    in. Each request pops a scripted reply: ("json", status, body, content_type, headers) or
    ("sse", frames, gate_after_first)."""
    return FakeBackend(platform_key=key)


PLATFORM_CHAT_ANSWER = json.dumps({
    "id": "chatcmpl-platform", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "from the platform"},
         "finish_reason": "stop"}]}).encode()


def on_a_fake_platform(test):
    """A proxy_options value for upstream_url: a fake_platform() made for this test, kept as
    test.platform."""
    test.platform = fake_platform()
    test.addCleanup(test.platform.close)
    return test.platform.url


def chunked_sse_head():
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def chunked(frames):
    return b"".join(b"%X\r\n%s\r\n" % (len(f), f) for f in frames)


def chunked_sse_response(frames):
    """A complete keep-alive chunked SSE answer."""
    return chunked_sse_head() + chunked(frames) + b"0\r\n\r\n"


def out_of_order_frames(eol=b"\n"):
    """A stream with three items whose output_item.done events come in the order 2, 0, 1,
    plus a keep-alive comment, an event the proxy does not know, and multi-line data."""
    items = [reasoning_item(), message_item("Hi there"), function_call_item()]
    frames = [sse("response.created", {"sequence_number": 0,
                                       "response": response_object("in_progress")}, eol),
              b": keep-alive" + eol + eol]
    seq = 1
    for index in (2, 0, 1):
        frames.append(sse("response.output_item.added", {
            "sequence_number": seq, "output_index": index,
            "item": dict(items[index], status="in_progress")}, eol))
        seq += 1
        if items[index]["type"] == "message":
            for piece in ("Hi ", "there"):
                frames.append(sse("response.output_text.delta", {
                    "sequence_number": seq, "item_id": "msg_1", "output_index": index,
                    "content_index": 0, "delta": piece}, eol))
                seq += 1
        frames.append(sse("response.output_item.done", {
            "sequence_number": seq, "output_index": index, "item": items[index]}, eol))
        seq += 1
    frames.append(b"event: response.metadata" + eol + b"id: 42" + eol
                  + b'data: {"type": "response.metadata",' + eol
                  + b'data:  "sequence_number": %d}' % seq + eol + eol)
    seq += 1
    frames.append(sse("response.completed", {"sequence_number": seq, "response": response_object(
        usage=USAGE)}, eol))
    return frames, items


# --------------------------------------------------------------------------------------------
# Harness: the fake OAuth server
# --------------------------------------------------------------------------------------------

class FakeOAuth:
    """auth.openai.com: /oauth/token, where refresh tokens rotate and are single use, and the
    login endpoints as Codex CLI 0.171 uses them (docs/backend.md §11): the device code
    (/api/accounts/deviceauth/...), the browser's /oauth/authorize (answered at once with the
    redirect to the callback, as if the user had signed in), the code exchange, which checks
    the PKCE verifier against the challenge, and /oauth/revoke."""

    def __init__(self, backend):
        self.backend = backend
        self.requests = []
        self.current_refresh = None  # the one refresh token that works; None: any works
        self.failure = None          # (status, body) to answer instead
        self.delay = 0.0
        self.lifetime = 3600         # seconds until an issued access token's `exp`
        self.reused = []             # refresh tokens answered with refresh_token_reused
        self.lock = threading.Lock()
        # The login side; `login_requests` holds (path, headers, body) of each.
        self.login_requests = []
        self.usercode_failure = None  # (status, body) instead of a device code
        self.interval = "0"           # as 0.171 wants it: a JSON string
        self.pending_polls = 1        # polls answered 403 pending before the outcome
        self.poll_outcome = None      # (status, body) instead of the approval
        self.polls = 0
        self.codes = {}               # authorization code -> (redirect_uri, challenge)
        self.forge_state = False      # the authorize redirect carries another state
        self.fedramp = False          # the id token of a login says chatgpt_account_is_fedramp
        self.revoke_failure = None    # (status, body) for /oauth/revoke
        self.revoked = []
        self.server = FakeBackend(routes={
            ("POST", None): self.serve,
            ("POST", "/api/accounts/deviceauth/usercode"): self.usercode,
            ("POST", "/api/accounts/deviceauth/token"): self.device_token,
            ("GET", "/oauth/authorize"): self.authorize,
            ("POST", "/oauth/revoke"): self.revoke})
        self.base = self.server.base
        self.url = self.server.base + "/oauth/token"

    def serve(self, req):
        if (req.headers.get("Content-Type") or "").startswith("application/x-www-form"):
            status, body = self.exchange(req)
        else:
            status, body = self.answer(req.headers, req.raw)
        return req.answer(status, json.dumps(body).encode())

    # -- logging in ------------------------------------------------------------------------

    def note(self, req, body):
        with self.lock:
            self.login_requests.append((req.path, dict(req.headers), body))

    def usercode(self, req):
        body = req.json()
        self.note(req, body)
        if self.usercode_failure:
            status, answer = self.usercode_failure
        elif body != {"client_id": proxy.OAUTH_CLIENT_ID}:
            status, answer = 400, {"error": "invalid_request"}
        else:
            status, answer = 200, {"device_auth_id": "dev-auth-1", "user_code": "ABCD-1234",
                                   "interval": self.interval,
                                   "expires_at": "2099-01-01T00:00:00Z"}
        return req.answer(status, json.dumps(answer).encode())

    def device_token(self, req):
        body = req.json()
        self.note(req, body)
        with self.lock:
            self.polls += 1
            polls = self.polls
        if body != {"device_auth_id": "dev-auth-1", "user_code": "ABCD-1234"}:
            status, answer = 400, {"error": "invalid_request"}
        elif polls <= self.pending_polls:
            status, answer = 403, {"error": {"code": "deviceauth_authorization_pending"}}
        elif self.poll_outcome:
            status, answer = self.poll_outcome
        else:
            verifier = "server-verifier-" + os.urandom(8).hex()
            code = self.issue_code(self.base + "/deviceauth/callback", challenge_of(verifier))
            status, answer = 200, {"authorization_code": code,
                                   "code_challenge": challenge_of(verifier),
                                   "code_verifier": verifier}
        return req.answer(status, json.dumps(answer).encode())

    def issue_code(self, redirect_uri, challenge):
        code = "authcode-" + os.urandom(8).hex()
        with self.lock:
            self.codes[code] = (redirect_uri, challenge)
        return code

    def authorize(self, req):
        """The user signs in at once: the browser is sent back to redirect_uri."""
        query = dict(urllib.parse.parse_qsl(req.target.split("?", 1)[1]))
        self.note(req, query)
        if query.get("client_id") != proxy.OAUTH_CLIENT_ID \
                or query.get("code_challenge_method") != "S256":
            return req.answer(400, b'{"error": "invalid_request"}')
        code = self.issue_code(query["redirect_uri"], query["code_challenge"])
        state = "forged-" + query["state"] if self.forge_state else query["state"]
        location = "%s?%s" % (query["redirect_uri"],
                              urllib.parse.urlencode({"code": code, "state": state}))
        return req.answer(302, b"", headers=[("Location", location)], content_type="text/plain")

    def exchange(self, req):
        form = dict(urllib.parse.parse_qsl(req.raw.decode()))
        self.note(req, form)
        with self.lock:
            redirect_uri, challenge = self.codes.pop(form.get("code"), (None, None))
        if (form.get("grant_type") != "authorization_code"
                or form.get("client_id") != proxy.OAUTH_CLIENT_ID
                or redirect_uri is None or form.get("redirect_uri") != redirect_uri
                or challenge_of(form.get("code_verifier", "")) != challenge):
            return 400, {"error": "invalid_grant", "error_description": "bad code or verifier"}
        access = access_token(self.lifetime, account="acct-login")
        self.backend.valid_tokens.add(access)
        with self.lock:
            self.current_refresh = "rt-login-" + os.urandom(6).hex()
        return 200, {"id_token": login_id_token(self.fedramp), "access_token": access,
                     "refresh_token": self.current_refresh}

    def revoke(self, req):
        body = req.json()
        self.note(req, body)
        self.revoked.append(body)
        status, answer = self.revoke_failure or (200, {})
        return req.answer(status, json.dumps(answer).encode())

    def answer(self, headers, raw):
        time.sleep(self.delay)
        with self.lock:
            try:
                body = json.loads(raw)
            except ValueError:
                return 400, {"error": "invalid_request"}
            self.requests.append({"headers": dict(headers), "body": body})
            if self.failure:
                return self.failure
            if (body.get("grant_type") != "refresh_token"
                    or body.get("client_id") != proxy.OAUTH_CLIENT_ID):
                return 400, {"error": "invalid_request"}
            used = body.get("refresh_token")
            if self.current_refresh is not None and used != self.current_refresh:
                self.reused.append(used)
                return 400, {"error": {"code": "refresh_token_reused",
                                       "message": "already used"}}
            new_access = access_token(self.lifetime)
            self.backend.valid_tokens.add(new_access)
            self.current_refresh = "rt-rotated-%d-%s" % (len(self.requests), os.urandom(4).hex())
            return 200, {"access_token": new_access, "refresh_token": self.current_refresh,
                         "id_token": id_token()}

    @property
    def count(self):
        return len(self.requests)

    def close(self):
        self.server.close()


# --------------------------------------------------------------------------------------------
# Harness: raw clients (HTTP over a socket, WebSocket) and waiting on conditions
# --------------------------------------------------------------------------------------------

def wait_until(predicate, timeout=5.0, step=0.01):
    """predicate()'s first true value, polled every step seconds; its last value after
    timeout. The suite waits on conditions this way, never on the clock."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ResponseHeaders(dict):
    """An answer's header fields by lower-case name (the last one wins), and in .pairs every
    (name, value) as sent, for counting repeated fields."""

    def __init__(self, pairs):
        super().__init__((name.lower(), value) for name, value in pairs)
        self.pairs = pairs


def http_responses(data, head_request=False):
    """Yields (status, headers, body, end) for each whole response at the start of data, end
    being where it ends in data; stops at the first incomplete one. A 1xx is a response of its
    own, without a body. Raises AssertionError for what is not HTTP."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return
        head = data[pos:end].decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] (\d{3})", head[0])
        if not m:
            raise AssertionError("not an HTTP response: %r" % data[pos:pos + 120])
        status = int(m.group(1))
        headers = ResponseHeaders([tuple(part.strip() for part in line.split(":", 1))
                                   for line in head[1:]])
        pos = end + 4
        if 100 <= status < 200 or head_request:
            yield status, headers, b"", pos
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    return
                size = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    if len(data) < pos + 2:
                        return
                    pos += 2
                    break
                if len(data) < pos + size + 2:
                    return
                if data[pos + size:pos + size + 2] != b"\r\n":
                    raise AssertionError("bad chunk framing at %d" % (pos + size))
                parts.append(data[pos:pos + size])
                pos += size + 2
            yield status, headers, b"".join(parts), pos
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if len(data) < pos + n:
                return
            yield status, headers, data[pos:pos + n], pos + n
            pos += n
        else:  # the body runs to the close
            yield status, headers, data[pos:], len(data)
            return


def parse_http_responses(data, head_request=False):
    """([(status, headers, body)], complete): the whole responses in data, and whether data
    ends exactly after the last one. The suite's one parser of answers read off a socket."""
    out, end = [], 0
    for status, headers, body, end in http_responses(data, head_request):
        out.append((status, headers, body))
    return out, end == len(data)


def build_request(port, method, path, headers=(), body=b"", host=DEFAULT_HOST,
                  version="HTTP/1.1", content_length=True):
    """Raw request bytes. host=None sends no Host header at all."""
    lines = ["%s %s %s" % (method, path, version)]
    if host is DEFAULT_HOST:
        host = "127.0.0.1:%d" % port
    if host is not None:
        lines.append("Host: %s" % host)
    for name, value in headers:
        lines.append("%s: %s" % (name, value))
    if content_length and (body or method in ("POST", "PUT", "PATCH")):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def recv_until(sock, buf, predicate, timeout):
    """Reads from sock onto buf until predicate(buf) holds, the peer closes, or timeout
    seconds pass. -> (buf, how): "done", "closed", "reset" or "timeout". The suite's one
    reader of raw sockets."""
    deadline = time.monotonic() + timeout
    while not predicate(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, "timeout"
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except OSError:
            return buf, "reset"
        if not chunk:
            return buf, "closed"
        buf += chunk
    return buf, "done"


def exchange(port, data, answer_wait=2.0, close_wait=2.0, half_close=True):
    """Sends data on a new connection and reads what comes back. With half_close, once a whole
    answer is in (or answer_wait has passed) our side is shut for writing, as a client done
    sending does; then up to close_wait for the server to close. Without, only up to close_wait
    for the server to close. -> (bytes received, how it ended): "closed", "reset" or "hung"
    (the server neither closed nor, with half_close, answered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close early (414, 431) while we still send
        buf, how = b"", "timeout"
        if half_close:
            head = data.startswith(b"HEAD ")
            buf, how = recv_until(s, buf, lambda b: complete_answers(b, head), answer_wait)
            if how in ("done", "timeout"):
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if how in ("done", "timeout"):
            buf, how = recv_until(s, buf, lambda b: False, close_wait)
        return buf, "hung" if how == "timeout" else how


def complete_answers(data, head_request):
    """Whether data is whole answers up to a final one, and nothing after it."""
    try:
        responses, complete = parse_http_responses(data, head_request)
    except (AssertionError, ValueError):
        return False
    return complete and bool(responses) and responses[-1][0] >= 200


def raw_http(port, method, path, headers=(), body=b"", host=DEFAULT_HOST, version="HTTP/1.1",
             answer_wait=5.0, content_length=True):
    """One request on a new connection -> (status, lower-case headers, body bytes)."""
    data = build_request(port, method, path, headers, body, host, version, content_length)
    answer, how = exchange(port, data, answer_wait=answer_wait, close_wait=2.0)
    responses, _ = parse_http_responses(answer, method == "HEAD")
    if not responses:
        raise AssertionError("no answer to %s %s (connection %s): %r"
                             % (method, path, how, answer[:300]))
    return responses[0]


def read_one_response(sock, buf=b"", timeout=5.0, head_request=False, informational=False):
    """Reads from sock until buf holds one whole final response (or, with informational, any
    response, a 100 Continue too). -> (status, headers, body, the bytes after it, False)."""
    def first(data):
        try:
            for status, headers, body, end in http_responses(data, head_request):
                if informational or status >= 200:
                    return status, headers, body, data[end:], False
        except (AssertionError, ValueError):
            pass
        return None

    buf, how = recv_until(sock, buf, first, timeout)
    if how == "timeout":
        raise AssertionError("no whole response within %gs: %r" % (timeout, buf[:300]))
    if how != "done":
        raise AssertionError("connection closed before a whole response: %r" % buf[:300])
    return first(buf)


def wait_eof(sock, timeout):
    """Seconds until the peer closed (recv gives b"" or a reset), else None after timeout.
    Whatever data arrives first is returned as well: -> (seconds or None, data)."""
    started = time.monotonic()
    data, how = recv_until(sock, b"", lambda b: False, timeout)
    return (None if how == "timeout" else time.monotonic() - started), data


def json_body(obj):
    return json.dumps(obj).encode()


def cors_headers(headers):
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def parse_sse(data):
    """A client's view of an SSE body: [(event name, decoded data)]."""
    events = []
    for frame in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, lines = None, []
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                lines.append(line[5:].strip())
        if lines:
            events.append((name, json.loads(b"\n".join(lines))))
    return events


def split_frames(data):
    """A body of SSE frames -> the frames (each with its blank line), LF or CRLF ends."""
    frames, pos = [], 0
    while pos < len(data):
        ends = [(i, i + len(sep)) for sep in (b"\r\n\r\n", b"\n\n")
                for i in [data.find(sep, pos)] if i >= 0]
        if not ends:
            frames.append(data[pos:])  # unfinished: the caller decides whether that is wrong
            break
        end = min(ends)[1]
        frames.append(data[pos:end])
        pos = end
    return frames


def frame_payload(frame):
    """The decoded JSON of one frame's data lines."""
    lines = [line[5:].lstrip(b" ") for line in frame.replace(b"\r\n", b"\n").split(b"\n")
             if line.startswith(b"data:")]
    return json.loads(b"\n".join(lines))


def read_frames_timed(resp, want=None):
    """Read the body incrementally (resp.read1) -> ([(arrival, frame)], leftover bytes).
    With `want`, stop once that many frames are in."""
    frames, buf = [], b""
    while want is None or len(frames) < want:
        chunk = resp.read1(65536)
        now = time.monotonic()
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            i = buf.index(b"\n\n") + 2
            frames.append((now, buf[:i]))
            buf = buf[i:]
    return frames, buf


def start_stream(conn, body=None, headers=None):
    body = dict(body or simple_request(), stream=True)
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    conn.request("POST", "/v1/responses", body=json.dumps(body).encode(), headers=all_headers)
    return conn.getresponse()


class WSClient:
    """A small RFC 6455 client over a real socket: masked frames, the opening handshake,
    and a reader that hands back each frame as (opcode, payload)."""

    def __init__(self, port, path="/v1/responses", headers=None, timeout=15):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.key = base64.b64encode(os.urandom(16)).decode()
        head = {"Host": "127.0.0.1:%d" % port, "Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": self.key, "Sec-WebSocket-Version": "13"}
        head.update(headers or {})
        self.sock.sendall(("GET %s HTTP/1.1\r\n" % path + "".join(
            "%s: %s\r\n" % (k, v) for k, v in head.items() if v is not None) + "\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head_bytes, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body = b""
        if self.status != 101:
            length = int(self.headers.get("content-length") or 0)
            while len(self.buf) < length:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.buf += chunk
            self.body = self.buf[:length]

    def close_socket(self):
        self.sock.close()

    def send_frame(self, opcode, payload=b"", fin=True, mask=True, rsv=0):
        if isinstance(payload, str):
            payload = payload.encode()
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | rsv | opcode])
        bit = 0x80 if mask else 0
        if n < 126:
            head += bytes([bit | n])
        elif n < 65536:
            head += bytes([bit | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([bit | 127]) + n.to_bytes(8, "big")
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
                proxy.mask_payload(payload, key)
            head += key
        self.sock.sendall(head + payload)

    def send_json(self, obj):
        self.send_frame(0x1, json.dumps(obj))

    def create(self, **body):
        body.setdefault("model", "gpt-5.1-codex")
        body.setdefault("input", "say hi")
        self.send_json(dict(body, type="response.create"))

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk

    def recv_frame(self):
        """(opcode, payload) of the server's next frame (servers never mask)."""
        self._need(2)
        first, second = self.buf[0], self.buf[1]
        assert not second & 0x80, "a server frame was masked"
        length, start = second & 0x7F, 2
        if length == 126:
            self._need(4)
            length, start = int.from_bytes(self.buf[2:4], "big"), 4
        elif length == 127:
            self._need(10)
            length, start = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(start + length)
        payload, self.buf = self.buf[start:start + length], self.buf[start + length:]
        assert first & 0x80, "the server fragmented a frame"
        return first & 0x0F, payload

    def recv_event(self, pings=None):
        """The next text message as JSON; pings on the way are answered (and counted)."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x9:
                if pings is not None:
                    pings.append(payload)
                self.send_frame(0xA, payload)
                continue
            if opcode == 0x1:
                return json.loads(payload)
            raise AssertionError("expected a text frame, got opcode %d %r" % (opcode, payload))

    def response_events(self, pings=None):
        """The events of one request: up to its terminal or error event."""
        events = []
        while True:
            event = self.recv_event(pings)
            events.append(event)
            if event["type"] in proxy.TERMINAL_EVENTS + ("error",):
                return events

    def expect_close(self):
        """The server's close code (None if its close frame had none), skipping text and
        pings; then the connection ends."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if payload else None

    def assert_closed(self, test):
        """After the close handshake the server ends TCP."""
        self.sock.settimeout(10)
        try:
            rest = self.sock.recv(65536)
        except ConnectionResetError:
            rest = b""
        test.assertEqual(rest, b"")


# --------------------------------------------------------------------------------------------
# Harness: the proxy in this process, and in a subprocess
# --------------------------------------------------------------------------------------------

class LogCapture(io.StringIO):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def write(self, s):
        with self.lock:
            return super().write(s)

    def isatty(self):
        return False


def with_proxy_options(**options):
    """One test's own Config overrides, on top of its class's proxy_options. A value that is
    callable is called with the test case once the fakes are up (for paths and URLs)."""
    def mark(test):
        test.proxy_options = options
        return test
    return mark


def start_fakes(case):
    """A test case's CODEX_HOME, FakeBackend and FakeOAuth, all gone at its cleanup."""
    case.home = tempfile.mkdtemp(prefix="codex-home-")
    case.addCleanup(shutil.rmtree, case.home, True)
    case.backend = FakeBackend()
    case.oauth = FakeOAuth(case.backend)
    case.addCleanup(case.backend.close)
    case.addCleanup(case.oauth.close)


class ProxyTestCase(unittest.TestCase):
    """Starts FakeBackend, FakeOAuth and the proxy (in this process) for each test, with the
    class's proxy_options and the test's own (with_proxy_options)."""

    proxy_options = {}
    proxy_in_setup = True
    idle_timeout = 5.0
    auth = True  # write a valid auth.json
    # The tests of the HTTP exchange assert exactly what the backend got over HTTP: they pin
    # it. The WebSocket tests choose auto or ws (see UpstreamWebSocketTests).
    upstream_transport = "http"

    def setUp(self):
        start_fakes(self)
        if self.auth:
            self.token = access_token(3600)
            self.backend.valid_tokens.add(self.token)
            write_auth(self.home, auth_document(access=self.token))
        if self.proxy_in_setup:
            self.start_proxy(**self.options_of_this_test())

    def options_of_this_test(self):
        test = getattr(self, self._testMethodName)
        options = dict(self.proxy_options, **getattr(test, "proxy_options", {}))
        options = {k: v(self) if callable(v) else v for k, v in options.items()}
        if options.get("api_key_header") == API_KEY_HEADER:
            self.backend.valid_tokens.add(API_KEY)  # API-key mode against the fake backend
        return options

    def assert_healthy(self):
        status, _, data = self.request("GET", "/healthz")
        self.assertEqual((status, data), (200, b"ok\n"))

    expired_auth_extra = {}  # keys written into auth.json beside the tokens by expire()

    def expire(self, **kw):
        """An auth.json whose access token expired, its refresh token the one FakeOAuth takes."""
        doc = auth_document(access=access_token(-10), **kw)
        doc.update(self.expired_auth_extra)
        write_auth(self.home, doc)
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        return doc

    def start_proxy(self, **overrides):
        options = dict(host="127.0.0.1", port=0, upstream_url=self.backend.url,
                       codex_home=self.home, refresh_url=self.oauth.url,
                       stream_idle_timeout=self.idle_timeout,
                       upstream_transport=self.upstream_transport)
        options.update(overrides)
        self.config = proxy.Config(**options)
        self.log = LogCapture()
        self.proxy = proxy.ProxyServer(self.config, proxy.Log(self.log, debug=self.config.debug))
        self.port = self.proxy.server_address[1]
        thread = threading.Thread(target=self.proxy.serve_forever, kwargs={"poll_interval": 0.01},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.stop_proxy, self.proxy)

    @staticmethod
    def stop_proxy(server):
        server.shutdown()
        # as main() drains before it closes: no turn outlives the proxy's store
        server.app.traffic.wait_idle(10.0)
        server.server_close()

    def connection(self, timeout=15):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, conn=None):
        """(status, headers dict, body bytes); body may be a dict (sent as JSON)."""
        own = conn is None
        conn = conn or self.connection()
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if own:
            conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def post(self, body, headers=None, path="/v1/responses", conn=None):
        status, headers, data = self.request("POST", path, body, headers, conn)
        return status, headers, json.loads(data) if data.strip() else None

    def stream(self, body, headers=None, conn=None):
        """Posts with stream=true; returns (status, headers, [(event, data dict)], raw bytes)."""
        body = dict(body, stream=True)
        status, headers, data = self.request("POST", "/v1/responses", body, headers, conn)
        return status, headers, parse_sse(data), data

    def last_upstream(self):
        return self.backend.requests[-1]

    def assert_openai_error(self, status, body, expected_status, code=None, contains=None):
        self.assertEqual(status, expected_status, body)
        self.assertIsInstance(body, dict)
        self.assertEqual(sorted(set(body["error"]) & {"message", "type", "param", "code"}),
                         ["code", "message", "param", "type"], body)
        if code is not None:
            self.assertEqual(body["error"]["code"], code, body)
        if contains is not None:
            self.assertIn(contains, body["error"]["message"])

    def log_text(self):
        return self.log.getvalue()

    def wait_for_log(self, needle, timeout=5.0):
        """The last log line containing needle; the request line is written just after the
        answer went out, so a test may see the answer first."""
        line = wait_until(lambda: ([l for l in self.log_text().splitlines() if needle in l]
                                   or [None])[-1], timeout)
        if line is None:
            self.fail("no log line with %r in:\n%s" % (needle, self.log_text()))
        return line

    def wait_for(self, predicate, what, timeout=10.0):
        """Waits until predicate() holds; fails naming what it waited for."""
        if not wait_until(predicate, timeout):
            self.fail("timed out waiting for " + what)


def simple_request(text="say hi", **extra):
    body = {"model": "gpt-5.1-codex", "input": text}
    body.update(extra)
    return body


class StreamingCase(ProxyTestCase):
    """ProxyTestCase with helpers for raw upstreams and stream assertions."""

    def use_raw_upstream(self, behave):
        """The fake backend, scripted byte for byte by behave (FakeBackend.script)."""
        self.backend.script(behave)
        return self.backend

    def assert_completed_filled(self, frame, upstream_frame, items):
        """`frame` is the upstream's response.completed (`upstream_frame`), output filled."""
        self.assertTrue(frame.startswith(b"event: response.completed"), frame)
        self.assertTrue(frame.endswith(b"\n\n"), frame)
        got, sent = frame_payload(frame), frame_payload(upstream_frame)
        self.assertEqual(sent["response"]["output"], [])
        self.assertEqual(got["response"]["output"], items)
        got["response"]["output"] = []
        self.assertEqual(got, sent, "only `output` may change in response.completed")

    def assert_error_frame(self, frame, code=None):
        self.assertTrue(frame.startswith(b"event: error"), frame)
        event = frame_payload(frame)
        self.assertEqual(event["type"], "error")
        self.assertIsInstance(event.get("code"), str)
        self.assertTrue(event["code"])
        self.assertIsInstance(event.get("message"), str)
        self.assertTrue(event["message"])
        if code is not None:
            self.assertEqual(event["code"], code, event)
        return event


class WebSocketCase(ProxyTestCase):
    def ws(self, path="/v1/responses", headers=None):
        client = WSClient(self.port, path, headers)
        self.addCleanup(client.close_socket)
        return client

    def open_ws(self, **kw):
        client = self.ws(**kw)
        self.assertEqual(client.status, 101, client.body)
        return client


class SecurityCase(ProxyTestCase):
    """The in-process harness plus raw-socket helpers."""

    def raw(self, method, path, headers=(), body=b"", host=DEFAULT_HOST, **kw):
        return raw_http(self.port, method, path, headers, body, host, **kw)

    def post_json(self, body=None, headers=(), host=DEFAULT_HOST, path="/v1/responses"):
        body = simple_request() if body is None else body
        data = body if isinstance(body, bytes) else json_body(body)
        return self.raw("POST", path, [("Content-Type", "application/json")] + list(headers),
                        data, host)

    def assert_json_error(self, response, status, code=None, contains=None):
        got, headers, body = response
        self.assertEqual(got, status, body[:400])
        self.assertTrue(headers.get("content-type", "").startswith("application/json"),
                        headers)
        parsed = json.loads(body)
        self.assert_openai_error(got, parsed, status, code, contains)
        return parsed

    def assert_ok_response(self, response, text="Hello there!"):
        status, headers, body = response
        self.assertEqual(status, 200, body[:400])
        parsed = json.loads(body)
        self.assertEqual(parsed["output"][0]["content"][0]["text"], text, parsed)
        return parsed

    def patch_timeouts(self, read=None, idle=None):
        for name, value in (("REQUEST_READ_DEADLINE", read), ("IDLE_CONNECTION_TIMEOUT", idle)):
            if value is not None:
                patcher = mock.patch.object(proxy, name, value)
                patcher.start()
                self.addCleanup(patcher.stop)


class ChatCase(ProxyTestCase):
    def chat(self, body, headers=None):
        return self.post(body, headers, path=CHAT)

    def chat_stream(self, body, headers=None):
        """(status, headers, raw body) of a streamed chat request."""
        return self.request("POST", CHAT, dict(body, stream=True), headers)

    def upstream_input(self, i=-1):
        return self.backend.requests[i]["body"]["input"]


LISTEN_RE = re.compile(r"listening on http://(\[[^\]]+\]|[^:/\s]+):(\d+)")


def clean_env(**extra):
    """The environment for a proxy subprocess: nothing that could point it at the real
    ~/.codex, the real token endpoint or an HTTP proxy."""
    env = dict(os.environ)
    for name in ("CODEX_HOME", "CODEX_REFRESH_TOKEN_URL_OVERRIDE", "http_proxy", "https_proxy",
                 "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", proxy.CLIENT_KEY_ENV):
        env.pop(name, None)
    env.update(extra)
    return env


def run_program(args, timeout=15, env=None):
    return subprocess.run([sys.executable, PROGRAM] + list(args), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          env=env or clean_env())


def side_by_side(function, jobs):
    """[function(job) for job in jobs], run at once: a run of the program mostly waits for its
    interpreter to start, and a test that tries many inputs need not wait for each in turn."""
    jobs = list(jobs)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(jobs))) as pool:
        return list(pool.map(function, jobs))


def run_with_stdin(args, data, timeout=6):
    """(returncode or None on timeout, stdout, stderr) of the program fed `data` on stdin."""
    proc = subprocess.Popen([sys.executable, PROGRAM] + list(args), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    try:
        out, err = proc.communicate(data, timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err


def security_env(**extra):
    """clean_env(), kept for the security tests' readability."""
    env = clean_env()
    env.pop(proxy.CLIENT_KEY_ENV, None)
    env.update(extra)
    return env


class ProxyProcess:
    """The program in a subprocess; its stderr collected line by line by a thread; killed in
    the test's cleanup whatever happens. stdin_data is written to its standard input (closed
    after it unless close_stdin is False); requests go to connect_host."""

    def __init__(self, testcase, args, env=None, start_timeout=10.0, stdin_data=None,
                 close_stdin=True, wait=True, connect_host="127.0.0.1", interpreter_flags=(),
                 cwd=None):
        self.testcase = testcase
        self.connect_host = connect_host
        self.command = [sys.executable] + list(interpreter_flags) + [PROGRAM] + list(args)
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or clean_env(), cwd=cwd)
        testcase.addCleanup(self.kill)
        if stdin_data is not None:
            try:
                self.proc.stdin.write(stdin_data)
                self.proc.stdin.flush()
                if close_stdin:
                    self.proc.stdin.close()
            except OSError:
                pass
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.listen_host = self.port = None
        if wait:
            line = self.wait_for("listening on http://", start_timeout)
            m = LISTEN_RE.search(line)
            testcase.assertIsNotNone(m, line)
            self.listen_host, self.port = m.group(1), int(m.group(2))

    def _read(self):
        for raw in iter(self.proc.stderr.readline, b""):
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # EOF marker
            self.cond.notify_all()

    def text(self):
        with self.cond:
            return "".join(l for l in self.lines if l is not None)

    def wait_for(self, needle, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if line is not None and needle in line:
                        return line
                if None in self.lines:
                    self.testcase.fail("the proxy exited (%s) without printing %r:\n%s"
                                       % (self.proc.poll(), needle, self.text()))
                left = deadline - time.monotonic()
                if left <= 0:
                    self.testcase.fail("no stderr line with %r within %gs:\n%s"
                                       % (needle, timeout, self.text()))
                self.cond.wait(left)

    def wait_exit(self, timeout):
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        return rc

    def kill(self):
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.reader.join(5)
        self.proc.stderr.close()

    def request(self, method, path, body=None, headers=None, timeout=15):
        conn = http.client.HTTPConnection(self.connect_host, self.port, timeout=timeout)
        try:
            headers = dict(headers or {})
            if isinstance(body, dict):
                body = json.dumps(body).encode()
                headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, body, **kw):
        status, headers, data = self.request("POST", "/v1/responses", body, **kw)
        return status, headers, data


class ProcessTestCase(unittest.TestCase):
    """Fake backend and fake OAuth server in this process; the proxy in a subprocess."""

    def setUp(self):
        start_fakes(self)
        self.token = access_token(3600)
        self.backend.valid_tokens.add(self.token)

    def spawn(self, *args, **kw):
        env = kw.pop("env", None)
        args = list(args)
        if "--upstream-url" not in args:
            args += ["--upstream-url", self.backend.url]
        return ProxyProcess(self, args, env=env, **kw)

    def write_valid_auth(self, home=None, **kw):
        return write_auth(home or self.home, auth_document(access=self.token, **kw))

    def write_expired_auth(self, home=None, **kw):
        doc = auth_document(access=access_token(-10), **kw)
        write_auth(home or self.home, doc)
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        return doc


# ============================================================================================
# Harness: the whole module in two processes
# ============================================================================================

# Seconds a class took in a quiet one-process run on 2 cores (any other class: 0.04 a test);
# load_tests balances its two processes on these.
CLASS_SECONDS = {"SlowClientTests": 6.4, "BindAddressTests": 6.4, "ApiKeyInputTests": 5.3,
    "RelayDifferentialTests": 5.2, "StatusPageBrowserTests": 4.7, "ApiKeyStdinTests": 4.2,
    "RefreshTests": 3.6, "CommandLineTests": 3.5, "ScriptProcessTests": 2.7,
    "MessageCostTests": 2.6, "CodexCliNeighbourTests": 2.2, "ServerInfoAndShutdownTests": 2.2,
    "LoginProcessTests": 2.2, "DescriptorExhaustionTests": 2.1, "ResponsesEndpointTests": 2.1,
    "ShutdownDuringRefreshTests": 1.8, "UpstreamWebSocketTests": 1.8, "SignalTests": 1.7,
    "BadInputTests": 1.5, "HangupWatcherRaceTests": 1.2, "BurstTests": 1.1,
    "CrossProcessRefreshTests": 1.0, "WebSocketFrameTests": 1.0, "CompactEndpointTests": 1.0,
    "DeviceLoginTests": 1.0, "EnvironmentTests": 0.9, "BrowserLoginTests": 0.9,
    "NoSecretsTests": 0.9, "WebSocketLifecycleTests": 0.8, "StateDbTests": 0.8}
WORKER_ENV = "CODEX_PROXY_TEST_WORKER"
WORKER_GRACE_SECONDS = 300  # after this process's half, before a silent worker counts as hung
OUTCOMES = ("failures", "errors", "skipped", "expectedFailures", "unexpectedSuccesses")


def load_tests(loader, tests, pattern):
    """Run as a whole, the module gives half of its classes to a worker process: most of the
    suite's time is waiting (programs starting, timeouts, a browser), which two processes
    overlap. A class or a test named on the command line never comes here."""
    if os.environ.get(WORKER_ENV):
        return tests
    halves, loads = ([], []), [0.0, 0.0]
    for suite in sorted(tests, key=class_seconds, reverse=True):
        lighter = loads.index(min(loads))
        halves[lighter].append(suite)
        loads[lighter] += class_seconds(suite)
    return TwoProcessSuite(*halves)


def class_seconds(suite):
    name = type(next(iter(suite), None)).__name__
    return CLASS_SECONDS.get(name, 0.04 * suite.countTestCases())


class TwoProcessSuite(unittest.TestSuite):
    """Runs `here` in this process while a worker runs `there`, then replays the worker's
    outcomes into this result, so that -v, "Ran N tests" and OK/FAILED cover both."""

    def __init__(self, here, there):
        super().__init__(here + there)
        self.here, self.there = unittest.TestSuite(here), [t for suite in there for t in suite]

    def run(self, result, debug=False):
        with tempfile.TemporaryDirectory(prefix="test-worker-") as directory:
            report = os.path.join(directory, "report")
            open(report, "w").close()  # a worker that dies before any test leaves it empty
            worker = subprocess.Popen(
                [sys.executable, "-c", "import sys, %s as m; m.run_worker(sys.argv[1])" % __name__,
                 report], cwd=HERE, stdin=subprocess.PIPE, start_new_session=True,
                env=dict(os.environ, **{WORKER_ENV: "1"}))
            try:
                with worker.stdin:
                    worker.stdin.write(json.dumps([t.id() for t in self.there]).encode())
                self.here.run(result)
                worker.wait(WORKER_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if worker.poll() is None:  # its session: the worker and the programs it started
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
            with open(report) as f:  # a line cut short by a crash is no record
                records = [json.loads(line) for line in f.read().split("\n")[:-1]]
        finished = records[-1:] == ["finished"] and worker.returncode == 0
        tests = {test.id(): test for test in self.there}
        for test_id, outcomes in records[:-1] if finished else records:
            replay(result, tests.pop(test_id, None), outcomes)
        problem = "the test worker ended (exit status %s; -9: killed as hung) before this test did"
        for test in [] if finished else list(tests.values()) or [None]:
            said = problem % worker.returncode
            replay(result, test, [["errors", str(test or "test worker"), said]])
        return result


class Reported(unittest.suite._ErrorHolder):
    """Stands in for a subtest or a class fixture the worker reported on."""
    failureException = AssertionError


def replay(result, test, outcomes):
    """Gives `result` the outcomes the worker reported for `test` (None: between tests)."""
    if test:
        result.startTest(test)
    for kind, description, text in outcomes:
        subject = test if str(test) == description else Reported(description)
        exception = RuntimeError if kind == "errors" else AssertionError
        err = (exception, exception(text), None)
        if kind == "skipped":
            result.addSkip(subject, text)
        elif kind == "unexpectedSuccesses":
            result.addUnexpectedSuccess(subject)
        elif test and subject is not test:
            result.addSubTest(test, subject, err)
        else:
            getattr(result, "add" + kind[0].upper() + kind[1:-1])(subject, err)
        if kind not in ("skipped", "unexpectedSuccesses"):  # the worker's traceback, as it was
            listed = getattr(result, kind)
            listed[-1] = (listed[-1][0], text)
    if test and not outcomes:
        result.addSuccess(test)
    if test:
        result.stopTest(test)


class WorkerResult(unittest.TestResult):
    """Writes the outcomes of each test as a JSON line as soon as it ends, so that what ran
    before a crash or a hang reaches the parent."""

    def __init__(self, report):
        super().__init__()
        self.report = report

    def startTest(self, test):
        self.write(None)  # a class fixture's error comes between tests
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self.write(test.id())

    def write(self, test_id):
        outcomes = [[kind, str(t), text] for kind in OUTCOMES[:4]
                    for t, text in getattr(self, kind)]
        outcomes += [[OUTCOMES[4], str(t), ""] for t in self.unexpectedSuccesses]
        if test_id or outcomes:
            print(json.dumps([test_id, outcomes]), file=self.report, flush=True)
        for kind in OUTCOMES:
            getattr(self, kind).clear()


def run_worker(report):
    """The worker's side of load_tests: runs the tests named on its standard input."""
    tests = unittest.defaultTestLoader.loadTestsFromNames(json.load(sys.stdin))
    with open(report, "w") as f:
        result = WorkerResult(f)
        tests.run(result)
        result.write(None)
        f.write('"finished"\n')


# ============================================================================================
# Server: connections, limits, descriptors, HTTP/1.0, bursts
# HighDescriptorTests: descriptors numbered 1024 and up (a busy proxy, or a host with a high
# `ulimit -n`). select.select() refuses such descriptors, and the proxy uses it both to check
# pooled connections and to watch for hang-ups.
# ============================================================================================

class IdleConnectionTests(unittest.TestCase):
    def test_idle_keep_alive_connections_outlive_client_pools(self):
        # HTTP client libraries keep an idle connection for up to 90 s and then reuse it; a
        # server that closes first makes that next request fail.
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        b.sendall(b"G")
        reader = proxy.RequestReader(a)  # waiting for a request's first byte: the idle wait
        self.assertEqual(reader.readinto(bytearray(1)), 1)
        self.assertGreaterEqual(a.gettimeout(), 120)
        self.assertGreaterEqual(proxy.ProxyHandler.timeout, 120)


class ConnectionLimitTests(ProxyTestCase):
    proxy_options = dict(max_connections=3)

    def keep_alive(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(s.close)
        s.sendall(build_request(self.port, "GET", "/healthz"))
        status, _, _, _, _ = read_one_response(s)
        self.assertEqual(status, 200)
        return s

    def test_connections_past_the_limit_get_503_and_are_closed(self):
        threads = threading.active_count()
        held = [self.keep_alive() for _ in range(3)]
        for _ in range(5):
            answer, how = exchange(self.port, build_request(self.port, "GET", "/healthz"))
            responses, _ = parse_http_responses(answer)
            self.assertEqual([r[0] for r in responses], [503], answer[:300])
            status, headers, body = responses[0]
            self.assert_openai_error(status, json.loads(body), 503, "too_many_connections",
                                     "--max-connections")
            self.assertEqual(headers.get("retry-after"), "1")
            self.assertIn(how, ("closed", "reset"))
        # a thread per held connection, none for the refused ones
        self.assertLessEqual(threading.active_count() - threads, 3)
        self.wait_for_log("--max-connections")
        held.pop().close()
        served = wait_until(lambda: self.raw_status() == 200, timeout=5.0)
        self.assertTrue(served, "a freed place was not taken up again")
        # The server thread counts a closed connection out a moment after the client saw the
        # close: until then /status may itself be refused, or count the one just served.
        seen = []

        def two_held_and_this_one():
            status, _, body = self.request("GET", "/status")
            seen.append((status, body[:200]))
            return status == 200 and json.loads(body)["connections"] == {"open": 3, "limit": 3}
        self.assertTrue(wait_until(two_held_and_this_one, 10.0), seen[-1:])

    def test_a_client_still_sending_its_request_reads_the_503(self):
        # Closed at once, the refused connection would answer the request's bytes with a
        # reset: http.client would then fail with BrokenPipeError, not read the 503.
        held = [self.keep_alive() for _ in range(3)]
        body = json.dumps(simple_request(text="x" * 50000)).encode()
        for _ in range(10):
            status, headers, data = self.request("POST", "/v1/responses", body,
                                                 {"Content-Type": "application/json"})
            self.assertEqual(status, 503, data)
            self.assertEqual(json.loads(data)["error"]["code"], "too_many_connections")
        self.assertEqual(len(held), 3)
        self.assertEqual(self.backend.requests, [])

    def raw_status(self):
        answer, _ = exchange(self.port, build_request(self.port, "GET", "/healthz",
                                                      [("Connection", "close")]))
        responses, _ = parse_http_responses(answer)
        return responses[0][0] if responses else None

    def test_max_connections_flag(self):
        config = proxy.parse_config(["--max-connections", "7"])
        self.assertEqual(config.max_connections, 7)
        self.assertEqual(proxy.parse_config([]).max_connections, 256)
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(SystemExit):
                proxy.parse_config(["--max-connections", "0"])


class SlowClientTests(SecurityCase):
    def trickle(self, sock, data, interval, limit, during=None):
        """Send data one byte every interval seconds until the proxy closes or answers.
        during() runs once, after the third byte. -> (seconds from the first byte until the
        proxy closed, or None if it did not within limit; bytes it sent)."""
        started = time.monotonic()
        received = b""
        for i in range(len(data)):
            try:
                sock.send(data[i:i + 1])
            except OSError:
                return time.monotonic() - started, received
            if i == 2 and during is not None:
                during()
            step_end = time.monotonic() + interval
            while True:
                left = step_end - time.monotonic()
                if left <= 0:
                    break
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    continue
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return time.monotonic() - started, received
                if not chunk:
                    return time.monotonic() - started, received
                received += chunk
            if time.monotonic() - started > limit:
                return None, received
        return None, received

    def test_trickled_headers_are_cut_off_and_others_are_served_meanwhile(self):
        self.patch_timeouts(read=1.0, idle=10.0)
        data = (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200
                + b"\r\n\r\n")
        meanwhile = []

        def other_client():
            status, _, body = self.request("GET", "/healthz")
            # the trickler is still connected: neither cut nor answered yet
            trickler_waiting = not select.select([s], [], [], 0)[0]
            meanwhile.append((status, body, trickler_waiting))

        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            closed, received = self.trickle(s, data, 0.1, 4.0, other_client)
        self.assertIsNotNone(closed, "a client trickling its headers was still connected "
                             "after 4 s with a 1 s deadline")
        self.assertGreater(closed, 0.8)
        if received:  # an answer is optional, but then a 4xx
            responses, _ = parse_http_responses(received)
            self.assertTrue(400 <= responses[0][0] < 500, received[:200])
        self.assertEqual(len(meanwhile), 1)
        status, body, trickler_waiting = meanwhile[0]
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertTrue(trickler_waiting, "the other client was served only once the "
                        "trickling one was done with")
        self.assert_healthy()

    def test_trickled_body_is_408_within_the_deadline(self):
        self.patch_timeouts(read=0.5, idle=10.0)
        body = json_body(simple_request())
        for chunked in (False, True):
            if chunked:
                headers = [("Content-Type", "application/json"),
                           ("Transfer-Encoding", "chunked")]
                payload = b"%X\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            else:
                headers = [("Content-Type", "application/json"),
                           ("Content-Length", str(len(body)))]
                payload = body
            head = build_request(self.port, "POST", "/v1/responses", headers,
                                 content_length=False)
            with self.subTest(chunked=chunked), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(head)
                closed, received = self.trickle(s, payload, 0.1, 4.0)
                self.assertIsNotNone(closed, "a trickled body held the connection for 4 s")
                self.assertTrue(received, "the proxy closed the connection without answering")
                responses, _ = parse_http_responses(received)
                self.assert_json_error(responses[0], 408, "request_timeout")
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    def test_idle_connections_are_closed_after_the_idle_timeout(self):
        self.patch_timeouts(read=5.0, idle=1.0)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as fresh, \
                socket.create_connection(("127.0.0.1", self.port), timeout=5) as used:
            used.sendall(build_request(self.port, "GET", "/healthz"))
            status, _, body, _, _ = read_one_response(used)
            self.assertEqual((status, body), (200, b"ok\n"))
            idle_used, _ = wait_eof(used, 4)
            idle_fresh, _ = wait_eof(fresh, 1)  # it has waited as long already
        self.assertIsNotNone(idle_used, "an idle keep-alive connection stayed open 4 s")
        self.assertGreater(idle_used, 0.7, "closed before the idle timeout")
        self.assertIsNotNone(idle_fresh, "a connection that never sent a byte stayed open")

    def test_keep_alive_connection_is_served_before_the_idle_timeout(self):
        # Gaps longer than the request deadline but shorter than the idle timeout, together
        # longer than the idle timeout: each request restarts the idle clock, and the
        # deadline of one request does not carry over to the next. Each gap leaves the idle
        # timeout almost 2 s to spare, for a loaded machine.
        self.patch_timeouts(read=0.4, idle=3.0)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            rest = b""
            for i, gap in enumerate((0, 1.1, 1.1, 1.1)):
                time.sleep(gap)
                s.sendall(build_request(self.port, "POST", "/v1/responses",
                                        [("Content-Type", "application/json")],
                                        json_body(simple_request())))
                with self.subTest(request=i, gap=gap):
                    status, headers, body, rest, _ = read_one_response(s, rest)
                    self.assert_ok_response((status, headers, body))
        self.assertEqual(len(self.backend.requests), 4)


class ConcurrencyTests(SecurityCase):
    @with_proxy_options(max_concurrent=2)
    def test_over_max_concurrent_is_503_with_retry_after_others_unaffected(self):
        replies = [Reply(hold_after=2), Reply(hold_after=2)]  # held until go()
        self.backend.replies.extend(replies)
        started = [threading.Event(), threading.Event()]
        results = [None, None]

        def stream(i):
            conn = self.connection(timeout=10)
            try:
                conn.request("POST", "/v1/responses", body=json_body(simple_request(stream=True)),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                started[i].set()
                results[i] = (resp.status, resp.read())
            except Exception as e:  # reported by the assertions below
                results[i] = ("error", repr(e))
            finally:
                started[i].set()
                conn.close()

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for event in started:
            self.assertTrue(event.wait(5), "a stream did not start")
        self.assertEqual(len(self.backend.requests), 2)
        # both streams are in flight now (held): a third request is turned away
        status, headers, data = self.raw("POST", "/v1/responses",
                                         [("Content-Type", "application/json")],
                                         json_body(simple_request()))
        parsed = self.assert_json_error((status, headers, data), 503, "too_many_requests",
                                        "--max-concurrent")
        self.assertEqual(parsed["error"]["type"], "server_error")
        self.assertTrue(headers.get("retry-after", "").isdigit(), headers)
        self.assertEqual(self.raw("GET", "/healthz")[::2], (200, b"ok\n"))
        self.assertTrue(all(t.is_alive() for t in threads), "the streams ended too early "
                        "for this test to mean anything")
        self.assertEqual(len(self.backend.requests), 2)
        for reply in replies:
            reply.go()
        for t in threads:
            t.join(10)
        for i, result in enumerate(results):
            with self.subTest(stream=i):
                self.assertEqual(result[0], 200, result)
                events = parse_sse(result[1])
                self.assertEqual(events[-1][0], "response.completed")
                text = "".join(e[1]["delta"] for e in events
                               if e[0] == "response.output_text.delta")
                self.assertEqual(text, "Hello there!")
        # the slots are freed just before each request's log line
        self.wait_for(lambda: len([l for l in self.log_text().splitlines()
                                   if "POST /v1/responses" in l and "status=200" in l]) >= 2,
                      "two request lines:\n" + self.log_text())
        self.assert_ok_response(self.post_json())
        self.assert_ok_response(self.post_json())
        self.assertEqual(len(self.backend.requests), 4)


class BurstTests(StreamingCase):
    CLIENTS = 128

    def burst(self):
        """CLIENTS clients, every other one streaming, connect at the same moment (a barrier
        just before connect()); returns those that did not get a complete 200 answer."""
        barrier = threading.Barrier(self.CLIENTS)
        results = [None] * self.CLIENTS

        def client(i):
            conn = self.connection(timeout=2 * CLIENT_TIMEOUT)
            try:
                barrier.wait(10)
                conn.connect()
                body = simple_request("client %d" % i, stream=bool(i % 2))
                conn.request("POST", "/v1/responses", body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    results[i] = (resp.status, data[:200])
                elif i % 2:
                    results[i] = (200, parse_sse(data)[-1][0] == "response.completed")
                else:
                    results[i] = (200, json.loads(data)["output"][0]["content"][0]["text"]
                                  == "Hello there!")
            except Exception as e:  # refused, reset, timeout: all failures
                results[i] = ("%s: %s" % (e.__class__.__name__, e), False)
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(self.CLIENTS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, start + 20 - time.monotonic()))
        return [(i, r) for i, r in enumerate(results) if r != (200, True)]

    def test_128_clients_at_once_all_get_answers(self):
        bad = self.burst()
        self.assertEqual(len(bad), 0, "%d of %d clients failed, e.g. %r"
                         % (len(bad), self.CLIENTS, bad[:2]))
        self.assertEqual(len(self.backend.requests), self.CLIENTS)

    def test_128_clients_in_flight_together_get_a_stream_or_a_clean_503(self):
        # Each upstream answer takes about 0.4 s, so the 128 requests overlap. Past
        # --max-concurrent (64) a client gets 503 too_many_requests at once: an answer, never a
        # refused or reset connection, and the 64 admitted ones complete.
        for _ in range(self.CLIENTS):
            self.backend.replies.append(Reply(delay=0.05))
        bad = self.burst()
        unclean = [(i, r) for i, r in bad
                   if r[0] != 503 or b"too_many_requests" not in r[1]]
        self.assertEqual(unclean, [], "clients without a stream or a clean 503")
        self.assertGreaterEqual(self.CLIENTS - len(bad), proxy.DEFAULT_MAX_CONCURRENT)


class Http10Tests(StreamingCase):

    def exchange_until_close(self, data, limit=5.0):
        """(bytes received, whether the proxy closed the connection within `limit`)."""
        chunks = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=limit) as s:
            s.sendall(data)
            deadline = time.monotonic() + limit
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    return b"".join(chunks), False
                except ConnectionResetError:
                    return b"".join(chunks), True
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)

    def test_http10_stream_is_not_chunked_and_connection_closes_at_end(self):
        for extra in (b"", b"Connection: keep-alive\r\n"):
            with self.subTest(extra=extra):
                frames, items = out_of_order_frames()
                self.backend.replies.append(Reply(frames=frames))
                body = json.dumps(simple_request(stream=True)).encode()
                request = (b"POST /v1/responses HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\n" + extra
                           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                data, closed = self.exchange_until_close(request)
                self.assertTrue(closed, "the proxy left the HTTP/1.0 connection open")
                head, _, payload = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                self.assertRegex(lines[0], r"^HTTP/1\.[01] 200 ")
                fields = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip()
                          for l in lines[1:]}
                self.assertNotIn("transfer-encoding", fields)
                self.assertTrue(fields.get("content-type", "").startswith("text/event-stream"))
                prefix = b"".join(frames[:-1])
                self.assertEqual(payload[:len(prefix)], prefix, "not the raw events")
                self.assert_completed_filled(payload[len(prefix):], frames[-1], items)


class HighDescriptorTests(StreamingCase):
    FILLER = 1100

    def setUp(self):
        filler = []
        try:
            for _ in range(self.FILLER):
                filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            for fd in filler:
                os.close(fd)
            self.skipTest("cannot open %d descriptors here" % self.FILLER)
        self.addCleanup(lambda: [os.close(fd) for fd in filler])
        super().setUp()

    def test_upstream_connection_reused_when_descriptors_are_above_1024(self):
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        for _ in range(3):
            status, _, body = self.post(simple_request(), conn=conn)
            self.assertEqual(status, 200, body)
        self.assertGreaterEqual(conn.sock.fileno(), 1024)
        self.assertEqual(self.backend.connections, 1)

    # an idle timeout far beyond the waits below: only the hang-up can close the upstream
    @with_proxy_options(stream_idle_timeout=60.0)
    def test_hangup_noticed_while_another_stream_is_live_above_1024(self):
        def behave(up, conn_no, req_no, sock, request):
            sock.sendall(chunked_sse_head() + chunked(stream_frames()[:2]))
            if conn_no == 1:
                return up.wait_for_close(sock, 30.0)
            up.stopping.wait(30)  # the other stream: silent, its client stays
            return False

        upstream = self.use_raw_upstream(behave)
        staying = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(staying.close)
        resp_a = start_stream(staying)
        self.assertEqual(len(read_frames_timed(resp_a, want=2)[0]), 2)
        leaving = self.connection(timeout=CLIENT_TIMEOUT)
        resp_b = start_stream(leaving)
        self.assertEqual(len(read_frames_timed(resp_b, want=2)[0]), 2)
        resp_b.close()
        leaving.close()
        self.assertTrue(upstream.closed.wait(10.0),
                        "a hang-up went unnoticed while another stream was open")


# ============================================================================================
# Handler: HTTP framing, raw bad input, routes, logs, dumps
# HTTP framing (RFC 9112): a request the proxy could read two ways is refused, and its
# connection closed, so nothing after it passes for a request of its own (smuggling).
# ============================================================================================

SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class FramingTests(ProxyTestCase):
    def head(self, extra, target=b"/healthz", host=True):
        return (b"GET " + target + b" HTTP/1.1\r\n"
                + (b"Host: 127.0.0.1:%d\r\n" % self.port if host else b"") + extra)

    def assert_refused(self, data, status=400):
        """One JSON error, nothing served after it, and the connection closed."""
        answer, how = exchange(self.port, data, answer_wait=2.0, close_wait=2.0)
        responses, _ = parse_http_responses(answer)
        self.assertEqual([r[0] for r in responses], [status],
                         "expected one %d and a close, got %r" % (status, answer[:600]))
        _, headers, body = responses[0]
        self.assertTrue(headers.get("content-type", "").startswith("application/json"))
        self.assert_openai_error(status, json.loads(body), status)
        self.assertEqual(headers.get("connection"), "close")
        self.assertIn(how, ("closed", "reset"))
        return json.loads(body)

    def assert_served(self, data, count=1):
        """count answers of 200 to data, read without half-closing (which would end a
        request still in flight as a hang-up)."""
        answer = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(data)
            deadline = time.monotonic() + 5.0
            while len(parse_http_responses(answer)[0]) < count and \
                    time.monotonic() < deadline:
                if select.select([s], [], [], 0.1)[0]:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        responses, _ = parse_http_responses(answer)
        self.assertEqual([r[0] for r in responses], [200] * count, answer[:600])
        return responses

    def test_malformed_header_lines_are_400(self):
        # Each hides the Content-Length after it from http.server's parser (which then took
        # the body for the next request), or is read two ways by proxies in front.
        cl = b"Content-Length: %d\r\n" % len(SMUGGLED)
        for line in (b"Foo Bar: 1\r\n", b"NoColonHere\r\n", b": empty-name\r\n",
                     b"X-A: a\rb\r\n", b"X-A: a\x00b\r\n", b"X-A: a\r\n b\r\n",
                     b"X-A: a\r\n\tb\r\n"):
            with self.subTest(line=line):
                self.assert_refused(self.head(line + cl + b"\r\n" + SMUGGLED))
        with self.subTest(line="space before the colon"):
            self.assert_refused(self.head(b"Content-Length : %d\r\n\r\n" % len(SMUGGLED)
                                          + SMUGGLED))
        self.assert_healthy()

    def test_a_malformed_authorization_line_is_not_echoed(self):
        body = self.assert_refused(self.head(b"Authorization : Bearer sk-secret-framing-1\r\n"
                                             b"\r\n"))
        self.assertNotIn("sk-secret", json.dumps(body))
        self.assertNotIn("sk-secret", self.log_text())

    def test_conflicting_lengths_and_codings_are_400(self):
        chunked_then = b"0\r\n\r\n" + SMUGGLED
        cases = {
            "CL and TE": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                         % len(chunked_then) + chunked_then,
            "two different CL": b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n"
                                % len(SMUGGLED) + SMUGGLED,
            "two equal CL": b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            "two TE": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + chunked_then,
        }
        for coding in (b"xchunked", b"gzip, chunked", b"chunked, chunked", b"identity",
                       b"chunked;q=1", b"\x0bchunked"):
            cases["TE %r" % coding] = (b"Transfer-Encoding: " + coding + b"\r\n\r\n"
                                       + chunked_then)
        for name, rest in cases.items():
            with self.subTest(case=name):
                self.assert_refused(self.head(rest))
        self.assert_healthy()

    def test_chunked_in_any_case_is_served(self):
        for coding in (b"chunked", b"CHUNKED", b"Chunked"):
            with self.subTest(coding=coding):
                self.assert_served(self.head(b"Transfer-Encoding: " + coding + b"\r\n\r\n"
                                             b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED), count=2)

    def test_malformed_chunk_framing_is_400(self):
        te = b"Transfer-Encoding: chunked\r\n\r\n"
        cases = {
            # one proxy reads a 1024-byte line's tail as the empty trailer section ...
            "size line over the limit": b"0;" + b"a" * 1022 + b"\r\n" + SMUGGLED,
            "space before the size": b" 2\r\n{}\r\n0\r\n\r\n",
            "space after the size": b"2 \r\n{}\r\n0\r\n\r\n",
            "bare LF after the size": b"2\n{}\r\n0\r\n\r\n",
            "data longer than its size": b"2\r\n{}xx\r\n0\r\n\r\n",
            "data shorter than its size": b"4\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
            "malformed trailer": b"0\r\nBad Trailer: 1\r\n\r\n",
        }
        for name, body in cases.items():
            with self.subTest(case=name):
                self.assert_refused(self.head(te + body))
        self.assert_healthy()

    def test_host_missing_or_repeated_is_400(self):
        self.assert_refused(self.head(b"\r\n", host=False))
        self.assert_refused(self.head(b"Host: 127.0.0.1:%d\r\n\r\n" % self.port))
        self.assert_refused(self.head(b"Host: evil.example\r\n\r\n"))
        # HTTP/1.0 may leave Host out
        self.assert_served(b"GET /healthz HTTP/1.0\r\n\r\n")

    def test_absolute_form_target_must_name_this_proxy(self):
        for target in (b"http://evil.example/healthz", b"http://evil.example/v1/models",
                       b"https://127.0.0.1:1/healthz", b"http://127.0.0.1:%d@evil.example/healthz"
                       % self.port, b"ftp://127.0.0.1:%d/healthz" % self.port):
            with self.subTest(target=target):
                self.assert_refused(self.head(b"\r\n", target=target))
        for target in (b"http://127.0.0.1:%d/status" % self.port,
                       b"HTTP://localhost:%d/status?x=1" % self.port):
            with self.subTest(target=target):
                (status, headers, body), = self.assert_served(
                    self.head(b"Connection: close\r\n\r\n", target=target))
                self.assertIn("requests", json.loads(body))

    def test_header_line_over_64k_and_obs_fold_close_the_connection(self):
        self.assert_refused(self.head(b"X-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n" + SMUGGLED),
                            431)
        self.assert_refused(self.head(b"X-A: 1\r\n  folded\r\n\r\n" + SMUGGLED))

    def test_well_formed_requests_keep_the_connection(self):
        # what the rules allow: bare-LF line ends, white space around values, trailers, two
        # requests on one connection
        body = json.dumps(simple_request()).encode()
        first = (b"POST /v1/responses HTTP/1.1\nHost: 127.0.0.1:%d\nContent-Type: "
                 b"application/json\nX-Pad:  \t spaced \t\nContent-Length: %d\n\n%s"
                 % (self.port, len(body), body))
        second = (b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                  b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n%X;ext=\"a b\"\r\n%s"
                  b"\r\n0\r\nX-Trailer: t\r\n\r\n" % (self.port, len(body), body))
        responses = self.assert_served(first + second, count=2)
        for _, headers, data in responses:
            self.assertEqual(json.loads(data)["output"][0]["content"][0]["text"], "Hello there!")
        self.assertEqual(len(self.backend.requests), 2)


class BadInputTests(ProxyTestCase):
    def raw(self, data, timeout=10):
        """What the proxy sends back before it closes the connection."""
        answer, how = exchange(self.port, data, close_wait=timeout, half_close=False)
        if how == "hung":
            self.fail("no answer and no close within %gs for %r" % (timeout, data[:120]))
        return answer

    def assert_json_error(self, data, status):
        responses, complete = parse_http_responses(data)
        self.assertTrue(responses, data[:300])
        got, headers, body = responses[0]
        self.assertEqual(got, status, data[:400])
        self.assertTrue(headers.get("content-type", "").startswith("application/json"), headers)
        parsed = json.loads(body)
        self.assertIsInstance(parsed.get("error"), dict, parsed)
        self.assertTrue(parsed["error"].get("message"), parsed)
        return parsed

    def post_raw(self, body, headers=b"", close=True):
        return (b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n" + headers
                + (b"Connection: close\r\n" if close else b"")
                + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def test_request_line_over_64k_is_414(self):
        data = self.raw(b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assert_json_error(data, 414)
        self.assert_healthy()

    def test_header_line_over_64k_is_431(self):
        data = self.raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * (70 * 1024)
                        + b"\r\n\r\n")
        self.assert_json_error(data, 431)
        self.assert_healthy()

    def test_too_many_headers_is_431(self):
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        data = self.raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
        self.assert_json_error(data, 431)
        self.assert_healthy()

    def test_invalid_content_length_is_400(self):
        # '\xb2' (superscript two) and the like are str.isdigit() but not an int()
        for value in (b"abc", b"-5", b"1_0", b"0x10", b"5 5", b"\xb2", b"1\xb9", b"\xb3"):
            data = self.raw(b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                            b"Content-Length: " + value + b"\r\n\r\n{}")
            with self.subTest(value=value):
                body = self.assert_json_error(data, 400)
                self.assertEqual(body["error"]["code"], "invalid_body", body)
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    def test_invalid_content_length_closes_the_connection(self):
        # The body's end is unknown: the bytes after the headers must not be taken as the
        # next request (request smuggling).
        smuggled = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        data, how = exchange(self.port, b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Length: abc\r\n\r\n" + smuggled, answer_wait=1.0,
                             close_wait=1.0)
        responses, _ = parse_http_responses(data)
        self.assertEqual([r[0] for r in responses], [400],
                         "the body of a request with an invalid Content-Length was served "
                         "as a request of its own: %r" % data[-200:])
        self.assertEqual(how, "closed")

    def test_chunked_body_valid_and_malformed(self):
        body = json.dumps(simple_request()).encode()
        half = len(body) // 2
        chunked = (b"%X\r\n%s\r\n%X;ext=1\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
                   % (half, body[:half], len(body) - half, body[half:]))
        data = self.raw(b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + chunked)
        responses, _ = parse_http_responses(data)
        self.assertEqual(responses[0][0], 200, data[:400])
        self.assertEqual(json.loads(responses[0][2])["output"][0]["content"][0]["text"],
                         "Hello there!")
        self.assertEqual(self.last_upstream()["body"]["input"][0]["content"][0]["text"],
                         "say hi")
        for bad in (b"zz\r\n{}\r\n0\r\n\r\n", b"\r\n{}\r\n0\r\n\r\n"):
            data = self.raw(b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n" + bad, timeout=5)
            with self.subTest(bad=bad):
                self.assert_json_error(data, 400)
        self.assert_healthy()

    def test_negative_chunk_size_is_400_not_a_hang(self):
        # int('-1', 16) == -1, and rfile.read(-1) reads until the client closes: the
        # connection hangs, and the body-size limit is bypassed.
        data = self.raw(b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n-1\r\n{}\r\n0\r\n\r\n", timeout=2)
        self.assert_json_error(data, 400)
        self.assert_healthy()

    def test_invalid_utf8_deep_nesting_and_wrong_types_are_400(self):
        cases = [b'{"model": "gpt-5.1-codex", "input": "bad \xff\xfe utf-8"}',
                 b'{"model": "gpt-5.1-codex", "input": "\xc3("}',
                 b"[" * 100000,
                 b'{"input":' * 50000 + b'"x"' + b"}" * 50000]
        for field, value in (("model", 5), ("input", 5), ("input", {"a": 1}),
                             ("instructions", ["x"]), ("tools", {}), ("include", "x"),
                             ("reasoning", []), ("text", "x"), ("model", ["gpt"])):
            body = simple_request()
            body[field] = value  # (not simple_request(text=...): that is its input)
            cases.append(json.dumps(body).encode())
        for body in cases:
            data = self.raw(self.post_raw(body))
            with self.subTest(body=body[:60]):
                self.assert_json_error(data, 400)
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    def test_utf8_bom_body_is_accepted_and_forwarded_intact(self):
        # Some Windows tools prefix JSON with a UTF-8 BOM; the body must reach the backend as
        # the same JSON, not shifted by the BOM's three bytes.
        tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
        request = {"model": "gpt-5.1-codex", "tools": tools, "input": [
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "hi"}]}]}
        for text in ("hi", "h\u00e9"):  # ASCII body, and one with a non-ASCII character
            request["input"][0]["content"][0]["text"] = text
            raw = b"\xef\xbb\xbf" + json.dumps(request, ensure_ascii=False).encode("utf-8")
            data = self.raw(self.post_raw(raw))
            responses, _ = parse_http_responses(data)
            with self.subTest(text=text):
                self.assertEqual(responses[0][0], 200, data[-300:])
                sent = self.last_upstream()["body"]
                self.assertIsInstance(sent, dict, self.last_upstream()["raw"][:300])
                self.assertEqual(sent["tools"], tools)
                self.assertEqual(sent["input"], request["input"])

    # -- fuzz -------------------------------------------------------------------------

    KNOWN_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")
    TOKENS = (b"\r\n", b": ", b" ", b"\x00", b"0", b"9", b"-", b"chunked", b"\r\n\r\n",
              b"Content-Length: ", b"Transfer-Encoding: ", b"gzip", b"{", b"\"", b"\xff")
    HEADER_NAMES = (b"Content-Length", b"Transfer-Encoding", b"Content-Encoding", b"Expect",
                    b"Upgrade", b"Connection", b"session_id", b"x-codex-turn-state", b"Host")

    def base_requests(self):
        body = json.dumps(simple_request()).encode()
        stream_body = json.dumps(simple_request(stream=True, temperature=0.5)).encode()
        head = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        gz = gzip.compress(body)
        return [
            head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            head + b"Content-Length: %d\r\n\r\n%s" % (len(stream_body), stream_body),
            head + b"Transfer-Encoding: chunked\r\n\r\n%X\r\n%s\r\n0\r\n\r\n" % (len(body), body),
            head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(gz), gz),
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ]

    def mutate(self, rng, data):
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(8)
            if kind == 0 and data:  # flip bytes
                data = bytearray(data)
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(len(data))
                    data[i] ^= rng.randrange(1, 256)
                data = bytes(data)
            elif kind == 1:  # insert random bytes or a token
                i = rng.randrange(len(data) + 1)
                ins = (bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
                       if rng.random() < 0.5 else rng.choice(self.TOKENS))
                data = data[:i] + ins + data[i:]
            elif kind == 2 and data:  # delete a slice
                i = rng.randrange(len(data))
                data = data[:i] + data[i + rng.randint(1, 16):]
            elif kind == 3 and data:  # truncate
                data = data[:rng.randrange(len(data))]
            elif kind == 4:  # a random header
                name = (rng.choice(self.HEADER_NAMES) if rng.random() < 0.5 else
                        bytes(rng.choice(b"abcxyzXZ-_09:; \t\x7f\x80") for _ in
                              range(rng.randint(1, 12))))
                value = bytes(rng.choice(b"0123456789abcdef ,;=-\t\x00\x80\xb2\xff")
                              for _ in range(rng.randint(0, 12)))
                i = data.find(b"\r\n") + 2 if b"\r\n" in data else 0
                data = data[:i] + name + b": " + value + b"\r\n" + data[i:]
            elif kind == 5:  # duplicate a line
                lines = data.split(b"\r\n")
                i = rng.randrange(len(lines))
                lines.insert(i, lines[i])
                data = b"\r\n".join(lines)
            elif kind == 6:  # bare LF line ends
                data = data.replace(b"\r\n", b"\n")
            else:  # change a number
                data = re.sub(rb"\d+", lambda m: str(rng.choice(
                    [0, 1, -1, 10 ** 12, int(m.group()) + rng.randint(-5, 5)])).encode(),
                    data, count=1)
        return data

    def test_fuzzed_requests_never_5xx_never_hang(self):
        rng = random.Random(1234)
        bases = self.base_requests()
        cases = [self.mutate(rng, rng.choice(bases)) for _ in range(200)]
        port = self.port

        def run(data):
            return data, exchange(port, data, answer_wait=0.5, close_wait=2.0)

        problems = []
        statuses = collections.Counter()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for data, (answer, how) in pool.map(run, cases):
                if how == "hung":
                    problems.append(("hung connection", data[:200], answer[:200]))
                    continue
                try:
                    responses, _ = parse_http_responses(answer, data.startswith(b"HEAD "))
                except (AssertionError, ValueError) as e:
                    problems.append(("unparseable answer %s" % e, data[:200], answer[:200]))
                    continue
                method = data.split(b" ", 1)[0]
                for status, headers, body in responses:
                    statuses[status] += 1
                    if 500 <= status < 600:
                        if status in (502, 504):
                            continue  # from the backend
                        if status == 501 and method not in self.KNOWN_METHODS:
                            continue  # RFC 9110: unknown method
                        if status == 505:
                            continue  # RFC 9110: HTTP version not supported
                        problems.append(("HTTP %d" % status, data[:200], body[:300]))
                    elif status >= 400 and body:
                        try:
                            ok = isinstance(json.loads(body).get("error"), dict)
                        except ValueError:
                            ok = False
                        if not ok:
                            problems.append(("non-JSON %d" % status, data[:200], body[:200]))
        elapsed = time.monotonic() - started
        if os.environ.get("FUZZ_STATS"):
            print("fuzz statuses %s in %.2fs" % (dict(statuses), elapsed))
        self.assertEqual(problems, [], "fuzz problems (statuses %s)" % dict(statuses))
        self.assertGreater(statuses[200], 5, dict(statuses))
        self.assertGreater(sum(v for k, v in statuses.items() if 400 <= k < 500), 20)
        self.assertLess(elapsed, 15)
        self.assert_healthy()


class RoutesTests(ProxyTestCase):
    def test_healthz_and_alias_path(self):
        status, _, data = self.request("GET", "/healthz")
        self.assertEqual((status, data), (200, b"ok\n"))
        status, _, body = self.post(simple_request(), path="/responses")
        self.assertEqual(status, 200, body)

    def test_unknown_path_wrong_method_websocket(self):
        status, _, data = self.request("GET", "/nope")
        self.assert_openai_error(status, json.loads(data), 404)
        # the anthropic SDK or Claude Code with a base URL ending in /v1
        status, _, data = self.request("POST", "/v1/v1/messages?beta=true", {})
        self.assert_openai_error(status, json.loads(data), 404, contains="without /v1")
        status, headers, data = self.request("GET", "/v1/responses")
        self.assert_openai_error(status, json.loads(data), 405)
        self.assertEqual(headers["allow"], "POST")
        status, _, data = self.request("DELETE", "/healthz")
        self.assert_openai_error(status, json.loads(data), 405)
        status, headers, data = self.request("GET", "/v1/responses", headers={
            "Upgrade": "websocket", "Connection": "Upgrade"})
        self.assert_openai_error(status, json.loads(data), 426)  # no version: ours is said
        self.assertEqual(headers["sec-websocket-version"], "13")

    def test_bad_bodies_are_400_and_server_keeps_serving(self):
        for raw in (b"{not json", b"[1, 2]", b'"str"', b"\xff\xfe", b"[" * 100000):
            status, _, data = self.request("POST", "/v1/responses", raw,
                                           {"Content-Type": "application/json"})
            self.assert_openai_error(status, json.loads(data), 400)
        status, _, data = self.request("GET", "/healthz")
        self.assertEqual(status, 200)

    def test_malformed_request_line_gets_json(self):
        data, _ = exchange(self.port, b"GARBAGE\r\n\r\n", close_wait=10, half_close=False)
        self.assertTrue(data.startswith(b"HTTP/1.1 400"), data)
        self.assertIn(b'"error"', data)

    def test_log_line_per_request(self):
        self.post(simple_request())
        line = self.wait_for_log("POST /v1/responses")
        self.assertIn("model=gpt-5.1-codex", line)
        self.assertIn("status=200", line)
        self.assertIn("tokens in=21 out=5", line)
        self.assertNotIn("\033[", line)


class TTYCapture(LogCapture):
    def isatty(self):
        return True


class LogInjectionTests(ProxyTestCase):
    FORGED = "2026-01-01T00:00:00 POST /v1/responses model=gpt-5.1-codex status=200 0.001s"

    def test_a_model_name_cannot_forge_a_log_line_or_reach_the_terminal(self):
        model = "evil\n" + self.FORGED + "\r\x1b]0;owned\x07\x1b[2J\x7f\x9b"
        status, _, _ = self.post(simple_request(model=model))
        line = self.wait_for_log("model=evil")
        text = self.log_text()
        self.assertFalse([l for l in text.splitlines() if l.startswith(self.FORGED)], text)
        for char in "\r\x1b\x07\x7f\x9b":
            self.assertNotIn(char, text)
        self.assertIn("model=evil\\n2026-01-01T00:00:00 POST", line)
        self.assertIn("\\r\\x1b]0;owned\\x07\\x1b[2J\\x7f\\x9b", line)

    def test_every_caller_is_covered_and_colour_survives_on_a_terminal(self):
        stream = TTYCapture()
        log = proxy.Log(stream, debug=True)
        log.debug("a\nb")
        log.warn_once("k", "c\x00d")
        log.info("status=%s model=%s" % (log.status_code(200), "x\x1b[31my\u2028"))
        lines = stream.getvalue().split("\n")  # not splitlines(): U+2028 ends no log line
        self.assertEqual(lines.pop(), "")
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].endswith("debug: a\\nb"), lines)
        self.assertTrue(lines[1].endswith("warning: c\\x00d"), lines)
        # the proxy's own colour codes stay; the client's escape sequence does not
        self.assertTrue(lines[2].endswith("status=\x1b[32m200\x1b[0m model=x\\x1b[31my\u2028"),
                        lines)
        self.assertEqual(proxy.escape_controls("plain ünïcode"), "plain ünïcode")


DUMP_NAME_RE = re.compile(r"^(\d{6})-(\d{13})-(request|response)\.json$")


def read_dumps(directory, pairs, timeout=3.0):
    """{seq: {"request": (path, doc), "response": (path, doc)}} once `pairs` pairs are there."""
    def complete():
        names = os.listdir(directory) if os.path.isdir(directory) else []
        return len([n for n in names if n.endswith("-response.json")]) >= pairs and names
    names = wait_until(complete, timeout) or []
    found = {}
    for name in sorted(names):
        m = DUMP_NAME_RE.match(name)
        if not m:
            found.setdefault("bad", []).append(name)
            continue
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            raw = f.read()
        found.setdefault(int(m.group(1)), {})[m.group(3)] = (path, int(m.group(2)), raw)
    return found


def header_value(dump_headers, name):
    values = [h["value"] for h in dump_headers if h["name"].lower() == name.lower()]
    return values[0] if len(values) == 1 else values


class DumpFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="dumps-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.log = LogCapture()

    def dumper(self, directory=None):
        return proxy.ExchangeDumper(directory or self.dir, proxy.Log(self.log))

    def test_a_file_or_symlink_already_at_the_name_is_left_alone(self):
        outside = os.path.join(self.dir, "..", os.path.basename(self.dir) + "-victim")
        with open(outside, "w") as f:
            f.write("precious\n")
        self.addCleanup(os.unlink, outside)
        os.symlink(outside, os.path.join(self.dir, "000001-1000000-request.json"))
        with open(os.path.join(self.dir, "000001-1000000-response.json"), "w") as f:
            f.write("planted\n")
        dumper = self.dumper()
        with mock.patch.object(proxy.time, "time", return_value=1000.0):
            dump = dumper.request("POST", "https://x/y", [("Authorization", "Bearer t")], b"{}")
        dump.answer(200, [])
        dump.finish(b"{}")
        with open(outside) as f:
            self.assertEqual(f.read(), "precious\n")
        with open(os.path.join(self.dir, "000001-1000000-response.json")) as f:
            self.assertEqual(f.read(), "planted\n")
        self.assertTrue(os.path.islink(os.path.join(self.dir, "000001-1000000-request.json")))
        self.assertEqual(self.log.getvalue().count("cannot write dump"), 2, self.log.getvalue())
        dump = dumper.request("POST", "https://x/y", [], b"{}")  # the next one is written
        self.assertEqual(len(os.listdir(self.dir)), 3)

    def test_an_existing_directory_is_made_private(self):
        os.chmod(self.dir, 0o755)
        self.dumper()
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        self.assertIn("mode 0700, was 0755", self.log.getvalue())

    def test_a_directory_of_another_user_is_refused(self):
        other = os.stat(self.dir).st_uid + 1
        with mock.patch.object(proxy.os, "getuid", return_value=other):
            with self.assertRaises(proxy.StartupError) as cm:
                self.dumper()
        self.assertIn("belongs to another user", str(cm.exception))

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root to chown")
    def test_the_program_refuses_to_start_with_another_users_dump_dir(self):
        home = tempfile.mkdtemp(prefix="codex-home-")
        self.addCleanup(shutil.rmtree, home, True)
        write_auth(home, auth_document(access=access_token(3600)))
        os.chown(self.dir, 65534, 65534)
        result = run_program(["--port", "0", "--codex-home", home, "--dump-dir", self.dir])
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(b"belongs to another user", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)


class DumpDirTests(ProxyTestCase):
    @with_proxy_options(dump_dir=lambda t: os.path.join(t.home, "dumps", "nested"))
    def test_chatgpt_mode_dumps_rewritten_exchanges(self):
        dump = os.path.join(self.home, "dumps", "nested")
        t0 = int(time.time() * 1000)
        self.backend.replies.append(Reply(headers=[("Set-Cookie",
                                                    "__cf_bm=cookie-secret-42; path=/")]))
        status, _, events, _ = self.stream(simple_request("stream me"))
        self.assertEqual(status, 200)
        status, _, body = self.post(simple_request("json please", stream=False, store=True,
                                                   instructions=""))
        self.assertEqual(status, 200, body)
        error = {"error": {"message": "Invalid value for 'input'.", "type":
                           "invalid_request_error", "param": "input", "code": "invalid_value"}}
        self.backend.replies.append(Reply(status=400, body=json.dumps(error).encode()))
        status, _, body = self.post(simple_request("bad"))
        self.assertEqual(status, 400, body)
        t1 = int(time.time() * 1000)

        dumps = read_dumps(dump, 3)
        self.assertNotIn("bad", dumps)
        seqs = sorted(dumps)
        self.assertEqual(len(seqs), 3, dumps)
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 3)), "sequence not consecutive")
        stamps = []
        for seq in seqs:
            self.assertEqual(sorted(dumps[seq]), ["request", "response"])
            for kind in ("request", "response"):
                path, ms, raw = dumps[seq][kind]
                self.assertTrue(t0 - 1000 <= ms <= t1 + 1000, (path, t0, t1))
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
                stamps.append(ms)
                for secret in tokens_of(self.home) + ["cookie-secret-42"]:
                    self.assertNotIn(secret.encode(), raw, "%s holds a credential" % path)
                self.assertIsNone(re.search(rb"eyJ[A-Za-z0-9_-]{10,}\.", raw), path)
        self.assertEqual(stamps, sorted(stamps))
        docs = {seq: {k: json.loads(v[2]) for k, v in dumps[seq].items()} for seq in seqs}
        expected_sse = b"".join(stream_frames()).decode()
        for seq, text in zip(seqs[:2], ("stream me", "json please")):
            request, response = docs[seq]["request"], docs[seq]["response"]
            self.assertEqual(request["method"], "POST")
            self.assertEqual(request["url"], self.backend.url)
            self.assertEqual(header_value(request["headers"], "Authorization"), "[REDACTED]")
            sent = request["body"]
            self.assertIs(sent["stream"], True)
            self.assertIs(sent["store"], False)
            self.assertEqual(sent["instructions"], proxy.DEFAULT_INSTRUCTIONS)
            self.assertEqual(sent["input"][0]["content"][0]["text"], text)
            self.assertEqual(sent, self.backend.requests[seqs.index(seq)]["body"],
                             "the dump is not what went upstream")
            self.assertEqual(response["status"], 200)
            self.assertIn("text/event-stream", header_value(response["headers"], "Content-Type"))
            self.assertEqual(response["body"], expected_sse)
        self.assertEqual(header_value(docs[seqs[0]]["response"]["headers"], "Set-Cookie"),
                         "[REDACTED]")
        self.assertEqual(docs[seqs[2]]["response"]["status"], 400)
        self.assertEqual(docs[seqs[2]]["response"]["body"], error)


# ============================================================================================
# Access policy: client key, Host, Origin and CORS, Content-Type, shutdown
# ============================================================================================

class AccessPolicyTests(unittest.TestCase):
    """The access policy is a pure function of the request's method, path and headers and the
    configuration: every decision checked here without a socket."""

    LISTEN = ("127.0.0.1", 8787)

    def decide(self, method="POST", path="/v1/responses", headers=None, **config):
        config = proxy.Config(**config)
        base = {"host": "127.0.0.1:8787", "content-type": "application/json"}
        base.update(headers or {})
        return proxy.check_access(method, path, {k: v for k, v in base.items() if v is not None},
                                  config, self.LISTEN)

    def refused(self, status, code, **kwargs):
        with self.assertRaises(proxy.ProxyError) as caught:
            self.decide(**kwargs)
        self.assertEqual((caught.exception.status, caught.exception.code), (status, code))
        return caught.exception

    def test_a_plain_local_request_is_admitted(self):
        self.assertFalse(self.decide())
        self.assertFalse(self.decide(headers={"host": None}))  # HTTP/1.0 without Host
        self.assertFalse(self.decide(headers={"host": "localhost"}))
        self.assertFalse(self.decide(headers={"host": "[::1]:8787"}))

    def test_host_names_other_than_ours_are_refused(self):
        self.refused(403, "host_not_allowed", headers={"host": "evil.example"})
        self.refused(403, "host_not_allowed", headers={"host": "127.0.0.1:9999"})
        self.assertFalse(self.decide(headers={"host": "myhost.lan:8787"},
                                     allow_hosts=["myhost.lan"]))

    def test_web_pages_are_refused_unless_allowed(self):
        err = self.refused(403, "origin_not_allowed", headers={"origin": "http://evil.example"})
        self.assertIn("--allow-origin", err.message)
        self.refused(403, "origin_not_allowed", method="GET", path="/v1/models",
                     headers={"sec-fetch-site": "cross-site"})
        self.assertFalse(self.decide(headers={"origin": "http://localhost:3000"},
                                     allow_origins=["http://localhost:3000"]))
        self.assertFalse(self.decide(headers={"sec-fetch-site": "same-origin"}))

    def test_a_preflight_needs_no_client_key(self):
        preflight = {"origin": "http://localhost:3000", "access-control-request-method": "POST"}
        self.assertTrue(self.decide("OPTIONS", headers=preflight, client_key=b"k" * 20,
                                    allow_origins=["http://localhost:3000"]))

    def test_shutdown_from_another_page_is_refused_by_its_referer(self):
        self.refused(403, "origin_not_allowed", method="GET", path="/shutdown",
                     headers={"referer": "http://evil.example/page"}, http_shutdown=True)
        self.assertFalse(self.decide("GET", "/shutdown", http_shutdown=True,
                                     headers={"referer": "http://127.0.0.1:8787/status"}))
        self.assertFalse(self.decide("GET", "/v1/models",
                                     headers={"referer": "http://evil.example/page"}))

    def test_the_client_key(self):
        key = "s3cret-key-0123456789"
        self.refused(401, "invalid_client_key", client_key=key)
        self.refused(401, "invalid_client_key", client_key=key,
                     headers={"authorization": "Bearer wrong"})
        self.assertFalse(self.decide(client_key=key, headers={"authorization": "Bearer " + key}))
        self.assertFalse(self.decide(client_key=key, headers={"x-api-key": key}))
        self.assertFalse(self.decide("GET", "/healthz", client_key=key))

    def test_posts_must_be_json(self):
        err = self.refused(415, "unsupported_media_type",
                           headers={"content-type": "application/x-www-form-urlencoded"})
        self.assertIn("application/json", err.message)
        self.assertFalse(self.decide(headers={"content-type": None}))
        self.assertFalse(self.decide(headers={"content-type": "application/json; charset=utf-8"}))

    def test_routes(self):
        app = proxy.App(proxy.Config(), proxy.Log())
        api = app.routes.find("POST", "/v1/responses", {})[0].__self__
        self.assertIsInstance(api, proxy.ChatGPTRoutes)
        route = lambda method, path: app.routes.find(method, path, {})
        self.assertEqual(route("POST", "/v1/responses"), (api.responses, ()))
        self.assertEqual(route("POST", "/responses"), (api.responses, ()))
        self.assertEqual(route("GET", "/v1/responses/resp_1/input_items"),
                         (api.input_items, ("resp_1",)))
        self.assertEqual(route("DELETE", "/responses/resp_1"), (api.delete, ("resp_1",)))
        with self.assertRaises(proxy.ProxyError) as caught:
            route("GET", "/shutdown")  # only with --http-shutdown
        self.assertEqual(caught.exception.status, 404)
        with self.assertRaises(proxy.ProxyError) as caught:
            route("PUT", "/v1/responses")
        self.assertEqual((caught.exception.status, caught.exception.headers),
                         (405, [("Allow", "POST")]))


class ClientKeyTests(SecurityCase):
    proxy_options = dict(client_key=CLIENT_KEY.encode())

    def setUp(self):
        super().setUp()
        add_models_endpoint(self.backend)

    ENDPOINTS = (("POST", "/v1/responses"), ("GET", "/v1/models"), ("GET", "/status"))

    def call(self, method, path, headers=()):
        if method == "POST":
            return self.post_json(headers=headers, path=path)
        return self.raw(method, path, headers)

    def test_no_wrong_or_partial_key_is_401_on_every_endpoint(self):
        wrong = [[],
                 [("Authorization", "Bearer wrong-key")],
                 [("Authorization", "Bearer " + CLIENT_KEY[:-1])],   # a prefix of the key
                 [("Authorization", "Bearer " + CLIENT_KEY + "0")],  # the key plus more
                 [("Authorization", "Bearer " + CLIENT_KEY[:1])],
                 [("Authorization", "Basic " + CLIENT_KEY)],         # not a bearer
                 [("Authorization", CLIENT_KEY)],                    # no scheme
                 [("Authorization", "Bearer ")],
                 [("x-api-key", CLIENT_KEY[:-1])],
                 [("x-api-key", "")]]
        for method, path in self.ENDPOINTS:
            for headers in wrong:
                with self.subTest(path=path, headers=headers):
                    response = self.call(method, path, headers)
                    body = self.assert_json_error(response, 401, "invalid_client_key")
                    self.assertEqual(body["error"]["type"], "authentication_error")
                    self.assertNotIn(CLIENT_KEY, response[2].decode())
        self.assertEqual(self.backend.requests, [])
        self.assertEqual(self.backend.model_requests, [])

    def test_bearer_or_x_api_key_is_accepted_and_never_forwarded(self):
        good = [[("Authorization", "Bearer " + CLIENT_KEY)],
                [("Authorization", "bearer " + CLIENT_KEY)],
                [("x-api-key", CLIENT_KEY)],
                [("Authorization", "Bearer wrong"), ("x-api-key", CLIENT_KEY)]]
        for method, path in self.ENDPOINTS:
            for headers in good:
                with self.subTest(path=path, headers=headers):
                    status, _, body = self.call(method, path, headers)
                    self.assertEqual(status, 200, body[:300])
        self.assertEqual(len(self.backend.requests), len(good))
        self.assertGreaterEqual(len(self.backend.model_requests), 1)
        upstream = self.backend.requests + self.backend.model_requests
        for request in upstream:
            headers = request["headers"]
            self.assertEqual(headers.get("Authorization"), "Bearer " + self.token)
            self.assertIsNone(headers.get("x-api-key"))
            for name, value in headers.items():
                self.assertNotIn(CLIENT_KEY, value, name)

    def test_healthz_needs_no_key(self):
        for method in ("GET", "HEAD"):
            status, _, body = self.raw(method, "/healthz")
            self.assertEqual((status, body), (200, b"ok\n" if method == "GET" else b""))

    def test_key_is_compared_in_constant_time(self):
        with mock.patch.object(proxy.hmac, "compare_digest",
                               wraps=hmac.compare_digest) as compare:
            self.assertEqual(self.call("GET", "/status", [("x-api-key", "nope")])[0], 401)
            self.assertEqual(self.call("GET", "/status", [("x-api-key", CLIENT_KEY)])[0], 200)
        self.assertTrue(compare.call_args_list)
        self.assertIn(CLIENT_KEY.encode(), [a for call in compare.call_args_list
                                            for a in call[0]])

    @with_proxy_options(api_key_header=b"Bearer sk-upstream-0123456789abcdef")
    def test_api_key_mode_does_not_forward_the_client_key_either(self):
        upstream_key = "sk-upstream-0123456789abcdef"
        self.backend.valid_tokens.add(upstream_key)
        body = {"model": "gpt-5.1-codex", "instructions": "x", "stream": True, "store": False,
                "input": [{"role": "user", "content": "hi"}]}
        for headers in ([("Authorization", "Bearer " + CLIENT_KEY)],
                        [("x-api-key", CLIENT_KEY)]):
            with self.subTest(headers=headers):
                status, _, data = self.post_json(body, headers)
                self.assertEqual(status, 200, data[:300])
                sent = self.last_upstream()["headers"]
                self.assertEqual(sent.get("Authorization"), "Bearer " + upstream_key)
                self.assertIsNone(sent.get("x-api-key"))
                for name, value in sent.items():
                    self.assertNotIn(CLIENT_KEY, value, name)
        status, _, data = self.post_json(body)
        self.assertEqual(status, 401, data)
        self.assertEqual(len(self.backend.requests), 2)


class HostHeaderTests(SecurityCase):
    def test_foreign_hosts_are_403_and_nothing_goes_upstream(self):
        port = self.port
        other = port + 1 if port < 65535 else port - 1
        for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1:%d" % other,
                     "localhost:%d" % other, "localhost.evil.com", "localhost.evil.com:%d" % port,
                     "127.0.0.1.nip.io:%d" % port, "[::2]:%d" % port, ""):
            with self.subTest(host=host):
                self.assert_json_error(self.post_json(host=host), 403, "host_not_allowed")
                self.assert_json_error(self.raw("GET", "/v1/models", host=host), 403,
                                       "host_not_allowed")
                self.assert_json_error(self.raw("GET", "/healthz", host=host), 403,
                                       "host_not_allowed")
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    def test_own_names_are_allowed(self):
        port = self.port
        for host in ("localhost:%d" % port, "127.0.0.1:%d" % port, "[::1]:%d" % port,
                     "localhost", "127.0.0.1", "LOCALHOST:%d" % port):
            with self.subTest(host=host):
                self.assert_ok_response(self.post_json(host=host))
        self.assertEqual(len(self.backend.requests), 6)

    @with_proxy_options(allow_hosts=["myhost.lan"])
    def test_allow_host_adds_a_name_in_any_case(self):
        port = self.port
        for host in ("myhost.lan:%d" % port, "MyHost.LAN", "localhost:%d" % port):
            with self.subTest(host=host):
                self.assert_ok_response(self.post_json(host=host))
        for host in ("other.lan:%d" % port, "myhost.lan.evil.com:%d" % port):
            with self.subTest(host=host):
                self.assert_json_error(self.post_json(host=host), 403, "host_not_allowed")
        self.assertEqual(len(self.backend.requests), 3)

    def test_http_1_0_without_host_is_allowed(self):
        status, _, body = self.raw("GET", "/healthz", host=None, version="HTTP/1.0")
        self.assertEqual((status, body), (200, b"ok\n"))
        response = raw_http(self.port, "POST", "/v1/responses",
                            [("Content-Type", "application/json")], json_body(simple_request()),
                            host=None, version="HTTP/1.0")
        self.assert_ok_response(response)


class OriginTests(SecurityCase):
    def test_foreign_origin_is_403_without_cors_and_nothing_goes_upstream(self):
        for origin in ("https://evil.example", "null", "http://localhost:3000",
                       "http://127.0.0.1:%d" % self.port):
            with self.subTest(origin=origin):
                response = self.post_json(headers=[("Origin", origin)])
                self.assert_json_error(response, 403, "origin_not_allowed")
                self.assertEqual(cors_headers(response[1]), {})
                own = origin == "http://127.0.0.1:%d" % self.port
                for path in ("/v1/models",) if own else ("/v1/models", "/status"):
                    response = self.raw("GET", path, [("Origin", origin)])
                    self.assert_json_error(response, 403, "origin_not_allowed")
                    self.assertEqual(cors_headers(response[1]), {})
        self.assertEqual(self.backend.requests, [])
        # Its own origin reads /status: that is the status page (see StatusPageTests).

    @with_proxy_options(http_shutdown=True)
    def test_cross_site_loads_without_origin_are_403(self):
        # <img src="http://127.0.0.1:PORT/shutdown"> sends no Origin, but browsers mark it.
        for site in ("cross-site", "same-site"):
            with self.subTest(site=site):
                for path in ("/shutdown", "/status", "/v1/models"):
                    response = self.raw("GET", path, [("Sec-Fetch-Site", site)])
                    self.assert_json_error(response, 403, "origin_not_allowed")
        self.assertFalse(self.proxy.app._stopping.is_set(), "a web page stopped the proxy")
        for site in ("none", "same-origin"):  # typed into the address bar; the proxy's own page
            response = self.raw("GET", "/status", [("Sec-Fetch-Site", site)])
            self.assertEqual(response[0], 200, response)

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN])
    def test_preflight_with_a_body_closes_the_connection(self):
        # The preflight is answered before any body is read: what follows must not be taken
        # for the next request.
        smuggled = b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n"
        data, _ = exchange(self.port, (
            "OPTIONS /v1/responses HTTP/1.1\r\nHost: localhost\r\nOrigin: %s\r\n"
            "Access-Control-Request-Method: POST\r\nContent-Length: %d\r\n\r\n"
            % (ALLOWED_ORIGIN, len(smuggled))).encode() + smuggled,
            close_wait=10, half_close=False)
        self.assertTrue(data.startswith(b"HTTP/1.1 204"), data[:80])
        self.assertEqual(data.count(b"HTTP/1.1 "), 1, "the body was served as a request")

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN])
    def test_allowed_origin_gets_cors_headers_on_json_and_streamed_answers(self):
        status, headers, body = self.post_json(headers=[("Origin", ALLOWED_ORIGIN)])
        self.assert_ok_response((status, headers, body))
        self.assertEqual(headers.get("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertIn("origin", headers.get("vary", "").lower())
        status, headers, body = self.post_json(simple_request(stream=True),
                                               headers=[("Origin", ALLOWED_ORIGIN)])
        self.assertEqual(status, 200, body[:300])
        self.assertTrue(headers["content-type"].startswith("text/event-stream"), headers)
        self.assertEqual(headers.get("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertIn("origin", headers.get("vary", "").lower())
        self.assertEqual(parse_sse(body)[-1][0], "response.completed")
        self.assertEqual(len(self.backend.requests), 2)
        # another origin is still refused, and told nothing
        response = self.post_json(headers=[("Origin", "http://localhost:3001")])
        self.assert_json_error(response, 403, "origin_not_allowed")
        self.assertEqual(cors_headers(response[1]), {})

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN], client_key=CLIENT_KEY.encode())
    def test_preflight_is_answered_without_the_client_key(self):
        status, headers, body = self.raw("OPTIONS", "/v1/responses", [
            ("Origin", ALLOWED_ORIGIN), ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization, content-type")])
        self.assertEqual(status, 204, body)
        self.assertEqual(body, b"")
        self.assertEqual(headers.get("access-control-allow-origin"), ALLOWED_ORIGIN)
        methods = [m.strip() for m in headers.get("access-control-allow-methods", "").split(",")]
        self.assertIn("POST", methods)
        allowed = [h.strip().lower()
                   for h in headers.get("access-control-allow-headers", "").split(",")]
        self.assertIn("authorization", allowed)
        self.assertIn("content-type", allowed)
        self.assertIn("origin", headers.get("vary", "").lower())
        # the real request then needs the key, and its 401 is readable by the page
        response = self.post_json(headers=[("Origin", ALLOWED_ORIGIN)])
        self.assert_json_error(response, 401, "invalid_client_key")
        self.assertEqual(response[1].get("access-control-allow-origin"), ALLOWED_ORIGIN)
        response = self.post_json(headers=[("Origin", ALLOWED_ORIGIN),
                                           ("Authorization", "Bearer " + CLIENT_KEY)])
        self.assert_ok_response(response)
        self.assertEqual(response[1].get("access-control-allow-origin"), ALLOWED_ORIGIN)
        self.assertEqual(len(self.backend.requests), 1)

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN], client_key=CLIENT_KEY.encode())
    def test_preflight_from_another_origin_is_403(self):
        for origin in ("https://evil.example", "http://localhost:3000.evil.example", "null"):
            with self.subTest(origin=origin):
                response = self.raw("OPTIONS", "/v1/responses", [
                    ("Origin", origin), ("Access-Control-Request-Method", "POST"),
                    ("Access-Control-Request-Headers", "authorization, content-type")])
                self.assert_json_error(response, 403, "origin_not_allowed")
                self.assertEqual(cors_headers(response[1]), {})

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN])
    def test_no_origin_no_cors_headers(self):
        responses = [self.post_json(), self.post_json(simple_request(stream=True)),
                     self.raw("GET", "/healthz"), self.raw("GET", "/status"),
                     self.raw("GET", "/nope"), self.raw("OPTIONS", "/v1/responses"),
                     self.raw("POST", "/v1/responses", [("Content-Type", "text/plain")], b"x")]
        self.assertEqual([r[0] for r in responses], [200, 200, 200, 200, 404, 405, 415])
        for status, headers, _ in responses:
            with self.subTest(status=status):
                self.assertEqual(cors_headers(headers), {})

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN])
    def test_next_request_on_a_keep_alive_connection_gets_no_stale_cors(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(build_request(self.port, "GET", "/healthz", [("Origin", ALLOWED_ORIGIN)]))
            status, headers, _, rest, _ = read_one_response(s)
            self.assertEqual(headers.get("access-control-allow-origin"), ALLOWED_ORIGIN)
            s.sendall(build_request(self.port, "GET", "/healthz"))
            status, headers, _, _, _ = read_one_response(s, rest)
            self.assertEqual(status, 200)
            self.assertEqual(cors_headers(headers), {})

    @with_proxy_options(allow_origins=[ALLOWED_ORIGIN])
    def test_unparseable_request_after_an_allowed_origin_gets_no_cors(self):
        # The base class answers requests it cannot parse (501, 400, 431) itself, through
        # end_headers(), without passing dispatch(), which resets cors_origin.
        for bad, expected in ((b"BREW /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
                              (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: "
                               + b"b" * (70 * 1024) + b"\r\n\r\n", 431)):
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(build_request(self.port, "GET", "/healthz",
                                        [("Origin", ALLOWED_ORIGIN)]))
                _, headers, _, rest, _ = read_one_response(s)
                self.assertEqual(headers.get("access-control-allow-origin"), ALLOWED_ORIGIN)
                s.sendall(bad)
                status, headers, _, _, _ = read_one_response(s, rest)
                with self.subTest(status=status):
                    self.assertEqual(status, expected)
                    self.assertEqual(cors_headers(headers), {},
                                     "a request without Origin got the previous request's "
                                     "CORS headers")


class ContentTypeTests(SecurityCase):
    def test_non_json_content_types_are_415_before_anything_goes_upstream(self):
        body = json_body(simple_request())
        for ctype in ("text/plain", "text/plain;charset=UTF-8",
                      "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/jsonx", ""):
            with self.subTest(ctype=ctype):
                response = self.raw("POST", "/v1/responses", [("Content-Type", ctype)], body)
                parsed = self.assert_json_error(response, 415, "unsupported_media_type",
                                                "Content-Type: application/json")
                self.assertEqual(parsed["error"]["type"], "invalid_request_error")
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    def test_json_variants_and_no_content_type_are_accepted(self):
        body = json_body(simple_request())
        for headers in ([("Content-Type", "application/json; charset=utf-8")],
                        [("Content-Type", "Application/JSON")],
                        []):
            with self.subTest(headers=headers):
                self.assert_ok_response(self.raw("POST", "/v1/responses", headers, body))
        self.assertEqual(len(self.backend.requests), 3)


class ShutdownRefererTests(ProxyTestCase):
    @with_proxy_options(http_shutdown=True, allow_origins=["http://localhost:3000"])
    def test_foreign_referer_cannot_stop_the_proxy(self):
        for referer in ("https://evil.example/page.html", "http://localhost:3001/",
                        "http://localhost:%d.evil.example/" % self.port, "null", "x",
                        "http://user@127.0.0.1:%d/" % self.port):
            with self.subTest(referer=referer):
                status, headers, body = raw_http(self.port, "GET", "/shutdown",
                                                 [("Referer", referer)])
                self.assert_openai_error(status, json.loads(body), 403, "origin_not_allowed")
        self.assertFalse(self.proxy.app.stopping, "a web page stopped the proxy")
        # Reads are not refused for a Referer: a page cannot read them without CORS, and
        # some non-browser clients send their home page as Referer.
        status, _, _ = raw_http(self.port, "GET", "/status",
                                [("Referer", "https://evil.example/")])
        self.assertEqual(status, 200)
        # the page given with --allow-origin, and the proxy's own pages, may
        for own_page in (False, True):  # (each stops the proxy: a new one for the second)
            referer = ("http://127.0.0.1:%d/status" % self.port if own_page
                       else "http://localhost:3000/admin")
            with self.subTest(referer=referer):
                status, _, body = raw_http(self.port, "GET", "/shutdown",
                                           [("Referer", referer)])
                self.assertEqual(status, 200, body)
                self.assertTrue(wait_until(lambda: self.proxy.app.stopping, 5.0))
                self.stop_proxy(self.proxy)
                self.start_proxy(http_shutdown=True, allow_origins=["http://localhost:3000"])


# ============================================================================================
# Request bodies: size limits, gzip members, strict JSON, multipart forms
# ============================================================================================

class BodyLimitTests(SecurityCase):
    proxy_options = dict(max_body_bytes=1000)

    def padded(self, size):
        """A valid request body of exactly size bytes."""
        base = json_body(simple_request())
        return base[:-1] + b" " * (size - len(base)) + b"}"

    def test_announced_body_over_limit_is_413_at_once_and_closed(self):
        head = build_request(self.port, "POST", "/v1/responses",
                             [("Content-Type", "application/json"), ("Content-Length", "2000")],
                             content_length=False)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(head)  # the body is never sent: the proxy must not wait for it
            # at once: within 3 s, where waiting for the body would take the 50 s deadline
            status, headers, body, _, _ = read_one_response(s, timeout=3)
            closed, extra = wait_eof(s, 3)
        self.assert_json_error((status, headers, body), 413, "request_too_large")
        self.assertIsNotNone(closed, "the connection stayed open after the 413")
        self.assertEqual(extra, b"")
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    def test_limit_is_inclusive(self):
        self.assert_ok_response(self.post_json(self.padded(1000)))
        self.assert_json_error(self.post_json(self.padded(1001)), 413, "request_too_large")
        self.assertEqual(len(self.backend.requests), 1)

    def test_chunked_body_over_limit_is_413(self):
        big = b"%X\r\n%s\r\n0\r\n\r\n" % (2000, b"x" * 2000)
        small = b"".join(b"C8\r\n%s\r\n" % (b" " * 200) for _ in range(6)) + b"0\r\n\r\n"
        for chunks in (big, small, b"800\r\n"):  # one big chunk, many small, a size alone
            with self.subTest(chunks=chunks[:12]):
                response = raw_http(self.port, "POST", "/v1/responses",
                                    [("Content-Type", "application/json"),
                                     ("Transfer-Encoding", "chunked")], chunks,
                                    content_length=False)
                self.assert_json_error(response, 413, "request_too_large")
        self.assertEqual(self.backend.requests, [])
        self.assert_healthy()

    @with_proxy_options(max_body_bytes=8000)
    def test_compressed_body_expanding_past_the_limit_is_413(self):
        small = gzip.compress(json_body(simple_request()))
        self.assert_ok_response(self.post_json(small, [("Content-Encoding", "gzip")]))
        self.assertEqual(len(self.backend.requests), 1)
        # ~4 KB on the wire, 4 MB once inflated: a 32 MiB gzip body would be ~32 GiB
        bomb = gzip.compress(b'{"model": "gpt-5.1-codex", "input": "hi"'
                             + b" " * 4000000 + b"}", 9)
        self.assertLess(len(bomb), 8000)
        response = self.post_json(bomb, [("Content-Encoding", "gzip")])
        self.assertEqual(len(self.backend.requests), 1,
                         "a %d-byte gzip body that inflates to 4 MB, past the 8000-byte limit, "
                         "was inflated whole and sent upstream" % len(bomb))
        self.assert_json_error(response, 413, "request_too_large")

    def test_expect_100_continue_over_limit_gets_413_not_an_invitation(self):
        # A client that asks first (curl does for big bodies) must not be told to send a
        # body that will be refused unread.
        head = build_request(self.port, "POST", "/v1/responses",
                             [("Content-Type", "application/json"),
                              ("Expect", "100-continue"), ("Content-Length", "2000")],
                             content_length=False)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(head)
            status, headers, body, _, _ = read_one_response(s, informational=True)
        self.assertEqual(status, 413, "the first answer was %d, not 413" % status)
        # a body within the limit still gets its 100 Continue, then the answer
        body = self.padded(900)
        head = build_request(self.port, "POST", "/v1/responses",
                             [("Content-Type", "application/json"),
                              ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
                             content_length=False)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(head)
            status, _, _, rest, _ = read_one_response(s, informational=True)
            self.assertEqual(status, 100)
            s.sendall(body)
            response = read_one_response(s, rest)
        self.assert_ok_response(response[:3])


def gzip_members(data, size):
    """data gzipped as many members of `size` input bytes each (RFC 1952 allows any number)."""
    return b"".join(gzip.compress(data[i:i + size]) for i in range(0, len(data), size))


class CountingDecompressor:
    """zlib.decompressobj, counting every input byte handed to decompress()."""

    fed = 0

    def __init__(self, wbits):
        self._d = REAL_DECOMPRESSOBJ(wbits)

    def decompress(self, data, max_length=0):
        CountingDecompressor.fed += len(data)
        return self._d.decompress(data, max_length)

    def __getattr__(self, name):
        return getattr(self._d, name)


REAL_DECOMPRESSOBJ = zlib.decompressobj


class GzipMembersTests(unittest.TestCase):
    def test_input_handed_to_zlib_is_linear_in_the_body_however_many_members(self):
        # Counted, not timed: the old decoder gave each member the whole rest of the body (and
        # zlib copied that rest at each member's end), ~10,000 times the body here.
        body = json.dumps(simple_request("x" * 10000)).encode()
        raw = gzip_members(body, 1)  # ~21 bytes per member, ~10,000 members
        CountingDecompressor.fed = 0
        with mock.patch.object(proxy.zlib, "decompressobj", CountingDecompressor):
            self.assertEqual(proxy.decode_request_body(raw, "gzip", 1 << 20), body)
        self.assertLessEqual(CountingDecompressor.fed, 8 * len(raw))

    def test_many_members_of_large_output_decode_in_linear_time(self):
        # 16,384 members of 1 KiB each: joining the output by `out += piece` copies ~128 GiB
        # (about a minute); joined once, it is well under 0.1 s of CPU. Thread CPU time is not
        # slowed by other processes on a loaded machine, and the bound is 50 times that.
        member = gzip.compress(b"a" * 1024)
        started = time.thread_time()
        out = proxy.decode_request_body(member * 16384, "gzip", 32 << 20)
        self.assertLess(time.thread_time() - started, 5.0)
        self.assertEqual(out, b"a" * (16 << 20))

    def test_limits_and_errors_hold_across_members(self):
        raw = gzip_members(b"b" * 5000, 100)
        self.assertEqual(proxy.decode_request_body(raw, "gzip", 5000), b"b" * 5000)
        with self.assertRaises(proxy.ProxyError) as cm:
            proxy.decode_request_body(raw, "gzip", 4999)
        self.assertEqual(cm.exception.status, 413)
        middle = len(gzip.compress(b"b" * 100)) * 10 + 5  # inside the 11th member
        for bad in (raw[:-1], raw + b"x", raw[:middle]):
            with self.assertRaises(proxy.ProxyError) as cm:
                proxy.decode_request_body(bad, "gzip", 1 << 20)
            self.assertEqual(cm.exception.status, 400)
        big = gzip.compress(os.urandom(300000))  # a member far larger than any window
        self.assertEqual(len(proxy.decode_request_body(big * 3, "gzip", None)), 900000)


class GzipMembersOverHTTPTests(ProxyTestCase):
    def test_a_megabyte_of_tiny_gzip_members_is_decoded_and_forwarded(self):
        body = simple_request("y" * 50000)
        raw = gzip_members(json.dumps(body).encode(), 1)
        self.assertGreater(len(raw), 1000000)
        status, _, answer = self.post(raw, headers={"Content-Encoding": "gzip",
                                                    "Content-Type": "application/json"})
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.last_upstream()["body"]["input"][0]["content"][0]["text"],
                         "y" * 50000)


class StrictJSONTests(ProxyTestCase):
    def post_bytes(self, raw, path="/v1/responses"):
        return self.post(raw, headers={"Content-Type": "application/json"}, path=path)

    def test_nan_infinity_and_out_of_range_numbers_are_400_naming_the_field(self):
        for token in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"[1, NaN]"):
            raw = b'{"model": "gpt-5.1-codex", "input": "hi", "temperature": ' + token + b"}"
            with self.subTest(token=token):
                status, _, body = self.post_bytes(raw)
                self.assert_openai_error(status, body, 400, code="invalid_json",
                                         contains="temperature")
                self.assertEqual(body["error"]["param"], "temperature")
                self.assertEqual(body["error"]["type"], "invalid_request_error")
        self.assertEqual(self.backend.requests, [], "nothing may reach the backend")
        status, _, body = self.post_bytes(b'{"model": "gpt-5.1-codex", "input": "hi", '
                                          b'"temperature": 1e-999}')  # underflow is a number
        self.assertEqual(status, 200, body)

    def test_lone_surrogate_escapes_are_400_but_pairs_pass(self):
        for raw, param in ((b'{"input": "a\\ud800b"}', "input"),
                           (b'{"input": [{"type": "message", "role": "user", "content": '
                            b'[{"type": "input_text", "text": "\\udc00"}]}]}', "input"),
                           (b'{"input": "hi", "metadata": {"\\ud83d": "x"}}', "metadata"),
                           (b'{"input": "hi", "\\ud800": 1}', None)):
            with self.subTest(raw=raw):
                status, _, body = self.post_bytes(raw)
                self.assert_openai_error(status, body, 400, code="invalid_json",
                                         contains="surrogate")
                self.assertEqual(body["error"]["param"], param)
        self.assertEqual(self.backend.requests, [])
        status, _, body = self.post_bytes(b'{"model": "gpt-5.1-codex", '
                                          b'"input": "\\ud83d\\ude00 and \\\\ud800"}')
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["body"]["input"][0]["content"][0]["text"],
                         "\U0001F600 and \\ud800")

    def test_nesting_past_the_limit_is_400_not_500(self):
        limit = proxy.MAX_JSON_DEPTH
        self.assertEqual(limit, 128)  # documented in README; a change must change both

        def nested(levels):  # levels counts the body object itself
            inner = levels - 1
            return (b'{"model": "gpt-5.1-codex", "input": "hi", "metadata": '
                    + b"[" * inner + b"]" * inner + b"}")

        for levels in (limit + 1, 980, 5000):
            with self.subTest(levels=levels):
                status, _, body = self.post_bytes(nested(levels))
                self.assert_openai_error(status, body, 400, code="invalid_json",
                                         contains="128 levels")
                self.assertEqual(body["error"]["param"], "metadata")
        self.assertEqual(self.backend.requests, [])
        status, _, body = self.post_bytes(nested(limit))
        self.assertEqual(status, 200, body)
        status, _, body = self.post_bytes(b"[" * 980 + b"]" * 980)
        self.assert_openai_error(status, body, 400, code="invalid_json")

    def test_chat_completions_gets_the_same_checks(self):
        status, _, body = self.post_bytes(b'{"model": "gpt-5.1-codex", "messages": '
                                          b'[{"role": "user", "content": "hi"}], '
                                          b'"temperature": NaN}', path=CHAT)
        self.assert_openai_error(status, body, 400, code="invalid_json")
        self.assertEqual(body["error"]["param"], "temperature")

    def test_parse_json_object_refuses_what_json_does_not_allow(self):
        for raw, param in ((b'{"a": NaN}', "a"), (b'{"a": {"b": -Infinity}}', "a"),
                           (b'{"a": 1e400}', "a"), (b'{"a": "\\udfff"}', "a"),
                           (b'{"a": ' + b"[" * 128 + b"]" * 128 + b"}", "a")):
            with self.subTest(raw=raw[:30]):
                with self.assertRaises(proxy.ProxyError) as cm:
                    proxy.parse_json_object(raw)
                self.assertEqual((cm.exception.status, cm.exception.param), (400, param))
        body = proxy.parse_json_object(b'{"a": ' + b"[" * 127 + b"]" * 127 + b"}")[0]
        self.assertEqual(len(proxy.encode_json_object(body)), len('{"a":}') + 2 * 127)


PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"


JPEG = b"\xff\xd8\xff\xe0" + b"jfif"


def form_body(fields=(), files=(), boundary="form-b0undary"):
    """(body, content type) of multipart/form-data as the OpenAI SDKs write it: fields
    (name, text), then files (name, filename, content type, bytes)."""
    out = b""
    for name, value in fields:
        out += (b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
                % (boundary.encode(), name.encode(), value.encode()))
    for name, filename, ctype, data in files:
        out += (b"--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                b"Content-Type: %s\r\n\r\n%s\r\n" % (boundary.encode(), name.encode(),
                                                     filename.encode(), ctype.encode(), data))
    return out + b"--%s--\r\n" % boundary.encode(), "multipart/form-data; boundary=" + boundary


def data_url(kind, data):
    return "data:%s;base64,%s" % (kind, base64.b64encode(data).decode())


class MultipartFormTests(unittest.TestCase):
    def parse(self, body, boundary=b"form-b0undary"):
        return proxy.parse_multipart_form(body, boundary)

    def refused(self, body, contains):
        with self.assertRaises(proxy.ProxyError) as cm:
            self.parse(body)
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "invalid_multipart"))
        self.assertIn(contains, cm.exception.message)

    def test_fields_and_files_as_the_sdk_sends_them(self):
        body, ctype = form_body([("prompt", "add a hat"), ("n", "2")],
                                [("image[]", "a.png", "image/png", PNG),
                                 ("image[]", "b", "application/octet-stream", b"x\r\ny--")])
        self.assertEqual(proxy.multipart_boundary(ctype), b"form-b0undary")
        self.assertEqual(self.parse(body), [
            ("prompt", None, None, b"add a hat"), ("n", None, None, b"2"),
            ("image[]", "a.png", "image/png", PNG),
            ("image[]", "b", "application/octet-stream", b"x\r\ny--")])

    def test_boundary_forms_preamble_padding_and_epilogue(self):
        self.assertEqual(proxy.multipart_boundary('multipart/form-data; boundary="a b:c"'),
                         b"a b:c")
        self.assertEqual(proxy.multipart_boundary("Multipart/Form-Data;charset=x;Boundary=zz"),
                         b"zz")
        self.assertIsNone(proxy.multipart_boundary("application/json"))
        for bad in ("multipart/form-data", "multipart/form-data; boundary=",
                    "multipart/form-data; boundary=" + "x" * 71):
            with self.assertRaises(proxy.ProxyError):
                proxy.multipart_boundary(bad)
        body = (b"preamble\r\n--form-b0undary \t\r\nContent-Disposition: form-data; "
                b"name=\"a\\\"b\"\r\n\r\nv\r\n--form-b0undary--\r\nepilogue")
        self.assertEqual(self.parse(body), [('a"b', None, None, b"v")])
        self.assertEqual(self.parse(b"--form-b0undary--\r\n"), [])

    def test_malformed_forms_are_400(self):
        body, _ = form_body([("prompt", "p")])
        self.refused(body[:-20], "closing boundary")
        self.refused(body.replace(b"\r\n", b"\n"), "boundary")
        self.refused(b"no delimiter here", "no part")
        self.refused(b"--form-b0undary\r\nContent-Type: text/plain\r\n\r\nv\r\n"
                     b"--form-b0undary--", "Content-Disposition")
        self.refused(b"--form-b0undary\r\nContent-Disposition: attachment; name=a\r\n\r\nv"
                     b"\r\n--form-b0undary--", "form-data")
        self.refused(b"--form-b0undary\r\nContent-Disposition: form-data\r\n\r\nv"
                     b"\r\n--form-b0undary--", "no name")
        self.refused(b"--form-b0undary\r\nX: " + b"y" * 9000 + b"\r\n\r\nv\r\n--form-b0undary--",
                     "headers")
        body, _ = form_body([("f%d" % i, "v") for i in range(65)])
        self.refused(body, "more than 64 parts")

    def test_edit_form_becomes_the_json_edit(self):
        parts = self.parse(form_body(
            [("prompt", "hat"), ("n", "2"), ("stream", "false"), ("size", "auto")],
            [("image[]", "a.png", "image/png", PNG),
             ("image[]", "upload", "application/octet-stream", JPEG),
             ("image[]", "c.png", "image/png", JPEG),  # a name's guess, wrong
             ("image[]", "d.heic", "image/heic", b"heic"),
             ("image[]", "e", "application/octet-stream", b"RIFF\0\0\0\0WEBPVP8 "),
             ("mask", "m.png", "image/png", PNG)])[0])
        self.assertEqual(proxy.image_edit_from_form(parts), {
            "prompt": "hat", "n": 2, "stream": False, "size": "auto",
            "images": [{"image_url": data_url("image/png", PNG)},
                       {"image_url": data_url("image/jpeg", JPEG)},
                       {"image_url": data_url("image/jpeg", JPEG)},
                       {"image_url": data_url("image/heic", b"heic")},
                       {"image_url": data_url("image/webp", b"RIFF\0\0\0\0WEBPVP8 ")}],
            "mask": {"image_url": data_url("image/png", PNG)}})
        for fields, files, code in (
                ([("n", "two")], [], "invalid_type"),
                ([("prompt", "a"), ("prompt", "b")], [], "invalid_multipart"),
                ([("svg[model]", "x")], [], "unsupported_parameter"),
                ([], [("image", "a.txt", "text/plain", b"hello")], "invalid_image"),
                ([], [("image", "a.wav", "audio/wav", b"RIFF\0\0\0\0WAVE")], "invalid_image"),
                ([], [("image", "a.png", "image/png", b"")], "invalid_image"),
                ([], [("notes", "a.txt", "text/plain", b"hello")], "unsupported_parameter")):
            with self.assertRaises(proxy.ProxyError) as cm:
                proxy.image_edit_from_form(self.parse(form_body(fields, files)[0]))
            self.assertEqual((cm.exception.status, cm.exception.code), (400, code), fields)

    def test_every_integer_the_sdk_sends_as_form_text_is_a_number(self):
        # openai 3.63's images.edit() has frame_count and frame_duration_ms besides n.
        fields = [("prompt", "p"), ("n", "1"), ("output_compression", "80"),
                  ("partial_images", "0"), ("frame_count", "4"), ("frame_duration_ms", "250")]
        body = proxy.image_edit_from_form(self.parse(form_body(
            fields, [("image", "a.png", "image/png", PNG)])[0]))
        self.assertEqual([body[name] for name, _ in fields[1:]], [1, 80, 0, 4, 250])

    def test_image_request_checks_and_defaults(self):
        self.assertEqual(proxy.image_request({"prompt": "p", "response_format": "b64_json",
                                              "stream": False, "quality": "high"}, edit=False),
                         {"prompt": "p", "quality": "high", "model": "gpt-image-2"})
        self.assertEqual(proxy.image_request({"prompt": "p", "moderation": "low",
                                              "model": "gpt-image-1.5"}, False, ("moderation",)),
                         {"prompt": "p", "model": "gpt-image-1.5"})
        for body, edit, param in (
                ({"prompt": "p", "response_format": "url"}, False, "response_format"),
                ({"prompt": "p", "stream": True}, False, "stream"),
                ({"prompt": " "}, False, "prompt"),
                ({"prompt": "p", "model": 5}, False, "model"),
                ({"prompt": "p"}, True, "images"),
                ({"prompt": "p", "images": [{"file_id": "file-1"}]}, True, "images[0]"),
                ({"prompt": "p", "images": ["data:image/png;base64,AA"]}, True, "images[0]"),
                ({"prompt": "p", "images": [{"image_url": "data:,"}], "mask": {"file_id": "f"}},
                 True, "mask")):
            with self.assertRaises(proxy.ProxyError) as cm:
                proxy.image_request(body, edit)
            self.assertEqual((cm.exception.status, cm.exception.param), (400, param), body)


# ============================================================================================
# App: /v1/models, and API-key mode (the platform pass-through)
# ============================================================================================

class ModelsTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        add_models_endpoint(self.backend)

    def models(self):
        status, headers, data = self.request("GET", "/v1/models")
        return status, headers, json.loads(data)

    def expire_cache(self):
        self.proxy.app.model_names.models_cache._fetched = time.monotonic() - proxy.MODELS_CACHE_SECONDS - 1

    def test_list_shape_visibility_and_backend_headers(self):
        status, headers, body = self.models()
        self.assertEqual(status, 200, body)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        self.assertEqual(body["object"], "list")
        self.assertEqual([m["id"] for m in body["data"]], ["gpt-5.1-codex", "gpt-5-codex-mini"])
        for model in body["data"]:
            self.assertEqual(sorted(model), ["created", "id", "object", "owned_by"])
            self.assertEqual(model["object"], "model")
            self.assertIsInstance(model["created"], int)
            self.assertIsInstance(model["owned_by"], str)
        self.assertEqual(len(self.backend.model_requests), 1)
        got = self.backend.model_requests[0]
        self.assertEqual(got["path"], "/backend-api/codex/models")
        self.assertEqual(got["query"].get("client_version"), [self.config.client_version])
        self.assertEqual(got["headers"].get("Authorization"), "Bearer " + self.token)
        self.assertEqual(got["headers"].get("ChatGPT-Account-ID"), "acct-file")
        self.assertEqual(self.request("GET", "/models")[0], 200)  # alias path

    def test_cached_for_300_s_then_fetched_again(self):
        first = self.models()[2]
        self.assertEqual(self.models()[2], first)
        self.assertEqual(len(self.backend.model_requests), 1, "second call hit the backend")
        self.backend.models_doc = {"models": [{"slug": "gpt-new", "visibility": "list"}]}
        self.expire_cache()
        status, _, body = self.models()
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["data"]], ["gpt-new"])
        self.assertEqual(len(self.backend.model_requests), 2)

    def test_stale_list_served_with_log_line_when_backend_fails(self):
        first = self.models()[2]
        self.expire_cache()
        self.backend.models_failure = (500, {"detail": "Internal Server Error"})
        status, _, body = self.models()
        self.assertEqual(status, 200, body)
        self.assertEqual(body, first)
        self.assertEqual(len(self.backend.model_requests), 2, "the backend was not asked again")
        self.assertIn("cached", self.wait_for_log("model list"))

    def test_no_cache_and_failing_backend_is_json_error(self):
        self.backend.models_failure = (500, {"detail": "Internal Server Error"})
        status, _, body = self.models()
        # the backend's status and message, as on /v1/responses; it gave no code
        self.assert_openai_error(status, body, 500, contains="Internal Server Error")
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("server_error", None))
        self.backend.models_failure = None  # a failure is not cached
        status, _, body = self.models()
        self.assertEqual(status, 200, body)

    def test_401_refreshes_and_retries_once(self):
        revoked = access_token(3600)  # looks valid, refused by the backend
        write_auth(self.home, auth_document(access=revoked))
        self.oauth.current_refresh = "rt-initial-0123456789"
        status, _, body = self.models()
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        auths = [r["headers"].get("Authorization") for r in self.backend.model_requests]
        self.assertEqual(len(auths), 2)
        self.assertEqual(auths[0], "Bearer " + revoked)
        self.assertIn(auths[1][7:], self.backend.valid_tokens)
        self.assertNotEqual(auths[1], auths[0])

    def test_401_twice_is_401_without_a_loop(self):
        self.backend.models_failure = (401, {"detail": "Unauthorized"})
        status, _, body = self.models()
        self.assertEqual(status, 401, body)
        self.assertIsInstance(body.get("error"), dict, body)
        self.assertEqual(len(self.backend.model_requests), 2)
        self.assertEqual(self.oauth.count, 1)


class ApiKeyEndpointPassThroughTests(ProxyTestCase):
    """API-key mode: the new endpoints go to the platform as the client sent them."""

    proxy_options = dict(api_key_header=API_KEY_HEADER, upstream_url=on_a_fake_platform)

    def test_each_endpoint_is_passed_through_as_is(self):
        calls = [("POST", "/responses/compact", b'{"model": "m", "input": []}'),
                 ("GET", "/responses/resp_p1", b""),
                 ("GET", "/responses/resp_p1/input_items?limit=3&order=asc&after=msg_1", b""),
                 ("DELETE", "/responses/resp_p1", b""),
                 ("POST", "/responses/resp_p1/cancel", b"{}"),
                 ("POST", "/responses/input_tokens", b'{"model": "m", "input": "hi"}')]
        for prefix in ("/v1", ""):
            for method, path, raw in calls:
                with self.subTest(method=method, path=prefix + path):
                    answer = json.dumps({"path": path, "n": len(self.platform.requests)}).encode()
                    self.platform.replies.append(("json", 202, answer, "application/json",
                                                  [("x-request-id", "req-p")]))
                    headers = {"Authorization": "Bearer client-own", "Content-Type":
                               "application/json"} if raw else {"Authorization": "Bearer c"}
                    status, got_headers, data = self.request(method, prefix + path, raw or None,
                                                             headers)
                    self.assertEqual((status, data), (202, answer))
                    self.assertEqual(got_headers["x-request-id"], "req-p")
                    got = self.platform.requests[-1]
                    self.assertEqual((got["method"], got["path"], got["raw"]),
                                     (method, "/v1" + path, raw))
                    self.assertEqual(got["authorization"], ["Bearer " + API_KEY])
        self.assertEqual(self.backend.requests, [])


class ApiKeyConnectionTests(ProxyTestCase):
    """API-key mode in-process: the upstream's connection reuse and cut bodies."""

    proxy_options = dict(api_key_header=API_KEY_HEADER)

    def test_content_length_answers_reuse_the_upstream_connection(self):
        conn = self.connection()
        self.addCleanup(conn.close)
        for _ in range(3):
            self.backend.replies.append(Reply(status=200, body=b'{"ok": 1}'))
            status, headers, data = self.request("POST", "/v1/responses", simple_request(
                stream=True, store=False, instructions="x", input=[]), conn=conn)
            self.assertEqual((status, data), (200, b'{"ok": 1}'))
        self.assertEqual(self.backend.connections, 1)

    def test_cut_content_length_body_closes_the_client_connection(self):
        def behave(up, conn_no, req_no, sock, request):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n" + b"x" * 40)
            time.sleep(0.2)
            return False

        self.backend.script(behave)
        data, how = exchange(self.port, b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                             close_wait=3, half_close=False)
        self.assertIn(how, ("closed", "reset"), "the client was left waiting")
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:100])
        self.assertTrue(data.endswith(b"x" * 40), "the proxy must close, not pad the body")


class WebSocketApiKeyTests(WebSocketCase):
    proxy_options = dict(api_key_header=API_KEY_HEADER)

    def test_each_create_is_a_streamed_post_with_the_key(self):
        client = self.open_ws(headers={"Authorization": "Bearer sk-client-side"})
        request = dict(instructions="x", store=False,
                       input=[{"role": "user", "content": "hi"}])
        client.create(**request)
        events = client.response_events()
        self.assertEqual(events[-1]["response"]["output"][0]["content"][0]["text"],
                         "Hello there!")
        sent = self.last_upstream()
        self.assertEqual(sent["headers"]["Authorization"], "Bearer " + API_KEY)
        self.assertNotIn("Sec-WebSocket-Key", sent["headers"])
        self.assertEqual(sent["body"], dict(request, model="gpt-5.1-codex", stream=True))
        client.create(instructions="x", store=False, previous_response_id=events[-1][
            "response"]["id"], input=[{"role": "user", "content": "more"}])
        client.response_events()
        sent = self.last_upstream()["body"]
        self.assertNotIn("previous_response_id", sent)
        self.assertEqual(len(sent["input"]), 3)
        self.backend.replies.append(Reply(status=401, body=json.dumps({"error": {
            "message": "Incorrect API key", "type": "invalid_request_error",
            "code": "invalid_api_key"}}).encode()))
        client.create(**request)
        error = client.recv_event()
        self.assertEqual((error["status"], error["error"]["code"]), (401, "invalid_api_key"))


class ApiKeyChatTests(ChatCase):
    @with_proxy_options(api_key_header=API_KEY_HEADER, upstream_url=on_a_fake_platform)
    def test_chat_is_forwarded_as_is_to_platform_chat_completions(self):
        platform = self.platform
        platform.replies.append(("json", 200, PLATFORM_CHAT_ANSWER, "application/json",
                                 [("x-request-id", "req-platform")]))
        raw = json.dumps(chat_body([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hi"}],
                                   n=2, temperature=0.5, max_tokens=7)).encode()
        status, headers, data = self.request("POST", CHAT, raw, {
            "Content-Type": "application/json", "Authorization": "Bearer client-own-key"})
        self.assertEqual(status, 200, data)
        self.assertEqual(data, PLATFORM_CHAT_ANSWER)
        self.assertEqual(headers.get("x-request-id"), "req-platform")
        self.assertEqual(len(platform.requests), 1)
        got = platform.requests[0]
        self.assertEqual(got["path"], "/v1/chat/completions")
        self.assertEqual(got["raw"], raw)
        self.assertEqual(got["authorization"], ["Bearer " + API_KEY])
        self.assertEqual(self.backend.requests, [])


class ApiKeyCase(unittest.TestCase):
    """A fake_platform() in this process; the proxy in a subprocess with a key on stdin."""

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="codex-home-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.platform = fake_platform()
        self.addCleanup(self.platform.close)

    def spawn_keyed(self, *extra, **kw):
        key = kw.pop("key", API_KEY)
        stdin_data = kw.pop("stdin_data", key.encode() + b"\n")
        args = ["--api-key-stdin", "--port", "0", "--codex-home", self.home]
        if "--upstream-url" not in extra:
            args += ["--upstream-url", self.platform.url]
        return ProxyProcess(self, args + list(extra), stdin_data=stdin_data, **kw)

    def assert_no_key(self, text, key=API_KEY, where="output"):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.assertNotIn(key, text, "the API key appears in the %s" % where)
        for i in range(len(key) - 7):  # nor any 8-character piece of it
            self.assertNotIn(key[i:i + 8], text, "part of the API key appears in the %s" % where)


class ApiKeyStdinTests(ApiKeyCase):
    def test_startup_line_names_api_key_mode_without_the_key(self):
        p = self.spawn_keyed()
        line = p.wait_for("listening on http://")
        self.assertIn("API-key mode", line)
        self.assertIn(self.platform.url, line)
        p.wait_for("standard input")
        self.assert_no_key(p.text(), where="start-up lines")
        # without --upstream-url API-key mode goes to the platform, not to chatgpt.com
        r = ProxyProcess(self, ["--api-key-stdin", "--port", "0", "--codex-home", self.home],
                            stdin_data=API_KEY.encode() + b"\n")
        line = r.wait_for("listening on http://")
        self.assertIn("API-key mode", line)
        self.assertIn("upstream https://api.openai.com/v1/responses", line)
        self.assertNotIn("chatgpt.com", line)

    def test_json_request_forwarded_byte_identical_with_the_key(self):
        p = self.spawn_keyed()
        sent = (b'{ "model":"gpt-4.1",  "input": "h\\u00e9llo", "stream": false, "store": true,'
                b' "temperature": 0.5, "max_output_tokens": 9, "previous_response_id": "resp_0"}')
        answer = b'{"id": "resp_abc",\n  "object": "response", "output": [ ], "x": "\xc3\xa9"}\n'
        self.platform.replies.append(("json", 200, answer, "application/json; charset=utf-8",
                                      [("x-request-id", "req-plat-1"),
                                       ("openai-processing-ms", "12")]))
        status, headers, data = p.request("POST", "/v1/responses", sent, headers={
            "Content-Type": "application/json", "authorization": "Bearer client-own-secret-777",
            "OpenAI-Beta": "responses=v1", "X-Client-Trace": "t-1"})
        self.assertEqual(status, 200, data)
        self.assertEqual(data, answer)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(headers.get("x-request-id"), "req-plat-1")
        self.assertEqual(len(self.platform.requests), 1)
        got = self.platform.requests[0]
        self.assertEqual((got["method"], got["path"]), ("POST", "/v1/responses"))
        self.assertEqual(got["raw"], sent, "the body must go upstream exactly as sent")
        self.assertEqual(got["authorization"], ["Bearer " + API_KEY])
        upstream_headers = {k.lower(): v for k, v in got["headers"]}
        self.assertEqual(upstream_headers.get("openai-beta"), "responses=v1")
        self.assertEqual(upstream_headers.get("x-client-trace"), "t-1")
        self.assertNotIn("client-own-secret-777", repr(got["headers"]))
        self.assert_no_key(p.text(), where="log")

    def test_passthrough_answer_has_each_header_once(self):
        # The upstream's Date and Server must not be sent next to the proxy's own: RFC 9110
        # allows one Date and one Server field line per message.
        p = self.spawn_keyed()
        self.platform.replies.append(("json", 200, b'{"id": "resp_h"}', "application/json", ()))
        data, _ = exchange(p.port, build_request(
            p.port, "POST", "/v1/responses", [("Content-Type", "application/json"),
                                              ("Connection", "close")], b'{"input": "x"}'),
            answer_wait=5.0, close_wait=5.0, half_close=False)
        (status, headers, body), = parse_http_responses(data)[0]
        self.assertEqual((status, body), (200, b'{"id": "resp_h"}'))
        names = [k.lower() for k, v in headers.pairs]
        for name in ("date", "server", "content-type", "content-length"):
            self.assertLessEqual(names.count(name), 1, "%s sent %d times:\n%s"
                                 % (name, names.count(name), data.decode("latin-1")))

    def test_upstream_errors_passed_through_unchanged(self):
        p = self.spawn_keyed()
        error = (b'{"error": {"message": "Unsupported parameter: \'foo\'", "type": '
                 b'"invalid_request_error", "param": "foo", "code": "unsupported_parameter"}}')
        self.platform.replies.append(("json", 400, error, "application/json", ()))
        self.platform.replies.append(("json", 503, b"upstream exploded\n", "text/plain", ()))
        body = json.dumps({"model": "gpt-4.1", "input": "x", "foo": 1}).encode()
        status, headers, data = p.request("POST", "/v1/responses", body,
                                          headers={"Content-Type": "application/json"})
        self.assertEqual((status, data), (400, error))
        self.assertEqual(headers["content-type"], "application/json")
        status, headers, data = p.request("POST", "/v1/responses", body,
                                          headers={"Content-Type": "application/json"})
        self.assertEqual((status, data), (503, b"upstream exploded\n"))
        self.assertEqual(headers["content-type"], "text/plain")
        self.assertEqual([r["raw"] for r in self.platform.requests], [body, body])

    def test_stream_relayed_unbuffered_and_unchanged(self):
        p = self.spawn_keyed()
        frames = platform_frames()
        self.platform.replies.append(("sse", frames, True))
        sent = b'{"model": "gpt-4.1", "input": "hi", "stream": true}'
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        with sock:
            sock.sendall(build_request(p.port, "POST", "/v1/responses", [
                ("Content-Type", "application/json"), ("Connection", "close")], sent))
            # The upstream holds the rest of its stream until the client has the first event.
            data, how = recv_until(sock, b"", lambda b: b"resp_p1" in b, 3.0)
            self.assertEqual(how, "done", "the first event did not reach the client while the upstream "
                                "held the rest back (buffered?): %r" % data[:300])
            self.assertFalse(self.platform.stream_done.is_set())
            self.platform.gate.set()
            data, _ = recv_until(sock, data, lambda b: False, 5.0)  # to EOF
        (status, headers, body), = parse_http_responses(data)[0]
        self.assertEqual(status, 200)
        self.assertEqual(body, b"".join(frames))
        self.assertEqual([v for k, v in headers.pairs if k.lower() == "content-type"],
                         ["text/event-stream"])
        self.assertEqual(self.platform.requests[0]["raw"], sent)

    def test_models_forwarded_to_platform_with_the_key(self):
        p = self.spawn_keyed()
        status, headers, data = p.request("GET", "/v1/models",
                                          headers={"Authorization": "Bearer client-own-1"})
        self.assertEqual((status, data), (200, PLATFORM_MODELS))
        self.assertEqual(headers.get("x-request-id"), "req-models")
        got = self.platform.requests[0]
        self.assertEqual((got["method"], got["path"]), ("GET", "/v1/models"))
        self.assertEqual(got["authorization"], ["Bearer " + API_KEY])

    def test_status_and_healthz_in_api_key_mode(self):
        p = self.spawn_keyed()
        status, headers, data = p.request("GET", "/healthz")
        self.assertEqual((status, data.strip()), (200, b"ok"))
        self.assertTrue(headers["content-type"].startswith("text/plain"), headers)
        status, headers, data = p.request("GET", "/status")
        self.assertEqual(status, 200, data)
        doc = json.loads(data)
        self.assertEqual(doc["mode"], "apikey")
        self.assertEqual(doc["version"], proxy.__version__)
        self.assert_no_key(data, where="/status")
        self.assertNotIn("Bearer", data.decode())
        self.assert_no_key(p.text(), where="log")

    def test_dump_dir_and_debug_log_never_hold_the_key(self):
        dump = os.path.join(self.home, "dumps")
        p = self.spawn_keyed("--dump-dir", dump, "--debug")
        self.platform.replies.append(("json", 200, b'{"id": "resp_j"}', "application/json", ()))
        self.platform.replies.append(("sse", platform_frames(), False))
        body = json.dumps({"model": "gpt-4.1", "input": "one"}).encode()
        status, _, _ = p.request("POST", "/v1/responses", body, headers={
            "Content-Type": "application/json", "Authorization": "Bearer client-own-2"})
        self.assertEqual(status, 200)
        sbody = json.dumps({"model": "gpt-4.1", "input": "two", "stream": True}).encode()
        status, _, data = p.request("POST", "/v1/responses", sbody,
                                    headers={"Content-Type": "application/json"})
        self.assertEqual((status, data), (200, b"".join(platform_frames())))
        dumps = read_dumps(dump, 2)
        self.assertNotIn("bad", dumps)
        self.assertEqual(len(dumps), 2, dumps)
        first, second = sorted(dumps)
        for seq in (first, second):
            for kind in ("request", "response"):
                path, _, raw = dumps[seq][kind]
                self.assert_no_key(raw, where=os.path.basename(path))
                self.assertNotIn(b"client-own-2", raw)
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        request = json.loads(dumps[first]["request"][2])
        self.assertEqual(request["url"], self.platform.url)
        self.assertEqual(request["body"], json.loads(body))
        self.assertEqual(header_value(request["headers"], "Authorization"), "[REDACTED]")
        response = json.loads(dumps[second]["response"][2])
        self.assertEqual(response["status"], 200)
        self.assertEqual(response["body"], b"".join(platform_frames()).decode())
        self.assert_no_key(p.text(), where="stderr (with --debug)")


class ApiKeyInputTests(ApiKeyCase):
    BAD = (("empty", b"", []), ("newline only", b"\n", []),
           ("1025 bytes", (b"Zq9" * 342)[:1025], ["Zq9Zq9Zq9"]),
           ("two lines", b"sk-lineone_AAAA\nsk-linetwo_BBBB\n", ["lineone", "linetwo"]),
           ("space", b"sk-space inside_CCCC\n", ["space inside", "inside_CCCC"]),
           ("dollar", b"sk-dollar$inside_DDDD\n", ["sk-dollar", "inside_DDDD"]),
           ("non-ascii", u"sk-nonascii-\u00e9-EEEE\n".encode("utf-8"), ["nonascii", "EEEE"]))

    def test_bad_keys_are_start_up_errors_without_echo(self):
        args = ["--api-key-stdin", "--port", "0", "--codex-home", self.home,
                "--upstream-url", self.platform.url]
        results = side_by_side(lambda case: run_with_stdin(args, case[1]), self.BAD)
        for (label, data, markers), (rc, out, err) in zip(self.BAD, results):
            with self.subTest(label):
                text = err.decode("utf-8", "replace") + out.decode("utf-8", "replace")
                self.assertIsNotNone(rc, "%s: the proxy started anyway:\n%s" % (label, text))
                self.assertNotEqual(rc, 0, text)
                self.assertIn("--api-key-stdin", text)
                self.assertNotIn("listening", text)
                self.assertNotIn("Traceback", text)
                for marker in markers:
                    self.assertNotIn(marker, text, "%s: the input is echoed" % label)
        self.assertEqual(self.platform.requests, [])

    def test_1024_byte_key_with_lf_or_crlf_is_accepted(self):
        key = ("k" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-" * 17)[:1024]
        self.assertEqual(len(key), 1024)
        self.platform.key = key
        for ending in (b"\n", b"\r\n"):
            with self.subTest(ending=ending):
                p = self.spawn_keyed(stdin_data=key.encode() + ending)
                status, _, data = p.request("POST", "/v1/responses", b'{"input": "x"}',
                                            headers={"Content-Type": "application/json"})
                self.assertEqual(status, 200, data)
                self.assertEqual(self.platform.requests[-1]["authorization"], ["Bearer " + key])
                self.assertNotIn(key[:40], p.text())
                p.kill()

    def test_key_line_with_stdin_left_open_starts(self):
        # A supervisor that writes the key line and keeps the pipe open (as `codex
        # responses-api-proxy` allows: it stops reading at the newline) must not hang the start.
        p = self.spawn_keyed(stdin_data=API_KEY.encode() + b"\n", close_stdin=False,
                             start_timeout=4.0)
        status, _, _ = p.request("POST", "/v1/responses", b'{"input": "x"}',
                                 headers={"Content-Type": "application/json"})
        self.assertEqual(status, 200)
        self.assertEqual(self.platform.requests[-1]["authorization"], ["Bearer " + API_KEY])


class AuthFileApiKeyTests(ApiKeyCase):
    FILE_KEY = "sk-fromfile_XYZ-789abc"

    def spawn_with_auth(self, doc):
        write_auth(self.home, doc)
        return ProxyProcess(self, ["--port", "0", "--codex-home", self.home,
                                      "--upstream-url", self.platform.url])

    def check_api_key_mode(self, p):
        line = p.wait_for("listening on http://")
        self.assertIn("API-key mode", line)
        self.platform.key = self.FILE_KEY
        sent = b'{"model": "gpt-4.1", "input": "x"}'
        status, _, data = p.request("POST", "/v1/responses", sent,
                                    headers={"Content-Type": "application/json"})
        self.assertEqual(status, 200, data)
        self.assertEqual(self.platform.requests[-1]["raw"], sent)
        self.assertEqual(self.platform.requests[-1]["authorization"], ["Bearer " + self.FILE_KEY])
        status, _, data = p.request("GET", "/status")
        self.assertEqual(json.loads(data)["mode"], "apikey")
        self.assertNotIn(self.FILE_KEY, data.decode())
        self.assertNotIn(self.FILE_KEY, p.text())

    def test_auth_mode_apikey_selects_api_key_mode(self):
        self.check_api_key_mode(self.spawn_with_auth(
            {"auth_mode": "apikey", "OPENAI_API_KEY": self.FILE_KEY}))

    def test_key_and_no_tokens_selects_api_key_mode(self):
        self.check_api_key_mode(self.spawn_with_auth(
            {"OPENAI_API_KEY": self.FILE_KEY, "tokens": None}))

    def test_chatgpt_tokens_keep_chatgpt_mode(self):
        p = self.spawn_with_auth(auth_document(OPENAI_API_KEY=self.FILE_KEY))
        self.assertIn("ChatGPT mode", p.wait_for("listening on http://"))
        status, _, data = p.request("GET", "/status")
        self.assertEqual(json.loads(data)["mode"], "chatgpt")


# ============================================================================================
# Front end: Responses
# ============================================================================================

class RewriteRequestTests(unittest.TestCase):
    def rewrite(self, body, **kw):
        return proxy.rewrite_request(body, "DEFAULT", **kw)

    def test_forces_stream_and_store_and_default_instructions(self):
        out, _ = self.rewrite({"model": "m", "input": [], "stream": False, "store": True})
        self.assertIs(out["stream"], True)
        self.assertIs(out["store"], False)
        self.assertEqual(out["instructions"], "DEFAULT")

    def test_keeps_client_instructions_and_blank_ones_get_default(self):
        self.assertEqual(self.rewrite({"instructions": "mine"})[0]["instructions"], "mine")
        self.assertEqual(self.rewrite({"instructions": "  "})[0]["instructions"], "DEFAULT")

    def test_removes_rejected_parameters_and_extra_drops(self):
        body = {"model": "m", "max_output_tokens": 5, "max_completion_tokens": 5,
                "temperature": 0.2, "top_p": 0.9, "seed": 1}
        out, _ = self.rewrite(body, drop=("seed",))
        for name in ("max_output_tokens", "max_completion_tokens", "temperature", "top_p",
                     "seed"):
            self.assertNotIn(name, out)

    def test_string_input_becomes_user_message_and_system_becomes_developer(self):
        out, _ = self.rewrite({"input": "hi"})
        self.assertEqual(out["input"], [{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hi"}]}])
        items = [{"role": "system", "content": "be brief"},
                 {"type": "message", "role": "user", "content": "x"}]
        out, _ = self.rewrite({"input": items})
        self.assertEqual(out["input"][0], {"role": "developer", "content": "be brief"})
        self.assertEqual(out["input"][1], items[1])

    def test_pure_and_passes_everything_else(self):
        body = {"model": "gpt-5", "input": [{"role": "system", "content": "s"}],
                "tools": [{"type": "function", "name": "f", "parameters": {}}],
                "tool_choice": "auto", "reasoning": {"effort": "high", "summary": "auto"},
                "include": ["reasoning.encrypted_content"], "text": {"verbosity": "low"},
                "parallel_tool_calls": False, "service_tier": "priority",
                "client_metadata": {"x": "y"}, "temperature": 1}
        snapshot = json.loads(json.dumps(body))
        out, _ = self.rewrite(body)
        self.assertEqual(body, snapshot, "rewrite_request must not modify its argument")
        for key in ("model", "tools", "tool_choice", "reasoning", "include", "text",
                    "parallel_tool_calls", "service_tier", "client_metadata"):
            self.assertEqual(out[key], body[key])

    def test_session_id_from_client_then_cache_key_then_derived(self):
        out, sid = self.rewrite({"input": "a"}, session_id="client-sid")
        self.assertEqual((sid, out["prompt_cache_key"]), ("client-sid", "client-sid"))
        out, sid = self.rewrite({"input": "a", "prompt_cache_key": "pck"})
        self.assertEqual((sid, out["prompt_cache_key"]), ("pck", "pck"))
        first, sid1 = self.rewrite({"model": "m", "input": [{"role": "user", "content": "q1"}]})
        # a later turn of the same conversation: same first item, more input
        _, sid2 = self.rewrite({"model": "m", "input": [
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}]})
        _, other = self.rewrite({"model": "m", "input": [{"role": "user", "content": "zz"}]})
        self.assertEqual(sid1, sid2)
        self.assertNotEqual(sid1, other)
        self.assertEqual(first["prompt_cache_key"], sid1)

    def test_wrong_types_are_400_naming_the_field(self):
        for body, param in (({"input": 5}, "input"), ({"instructions": ["x"]}, "instructions"),
                            ({"tools": "x"}, "tools"), ({"model": 3}, "model")):
            with self.assertRaises(proxy.ProxyError) as cm:
                self.rewrite(body)
            self.assertEqual((cm.exception.status, cm.exception.param), (400, param))

    def test_previous_response_id_needs_its_history(self):
        with self.assertRaises(proxy.ProxyError) as cm:
            self.rewrite({"input": "x", "previous_response_id": "resp_1"})
        self.assertEqual((cm.exception.status, cm.exception.param),
                         (400, "previous_response_id"))
        self.assertIn("does not know response 'resp_1'", cm.exception.message)
        history = [{"role": "user", "content": "q1"}, message_item("a1")]
        out, sid = self.rewrite({"model": "m", "input": "q2", "previous_response_id": "resp_1"},
                                history=history)
        self.assertNotIn("previous_response_id", out)
        self.assertEqual(out["input"][:2], history)
        self.assertEqual(out["input"][2]["content"][0]["text"], "q2")
        _, first_sid = self.rewrite({"model": "m", "input": [history[0]]})
        self.assertEqual(sid, first_sid, "a chain keeps the conversation's session id")

    def test_decode_body(self):
        raw = b'{"a": 1}'
        self.assertEqual(proxy.decode_request_body(gzip.compress(raw), "gzip"), raw)
        self.assertEqual(proxy.decode_request_body(zlib.compress(raw), "deflate"), raw)
        self.assertEqual(proxy.decode_request_body(raw, None), raw)
        with self.assertRaises(proxy.ProxyError) as cm:
            proxy.decode_request_body(b"garbage", "gzip")
        self.assertEqual(cm.exception.status, 400)
        with self.assertRaises(proxy.ProxyError) as cm:
            proxy.decode_request_body(raw, "br")
        self.assertEqual(cm.exception.status, 415)

    def test_parse_and_encode_keep_unchanged_values_as_sent(self):
        pad = b', "pad": "' + b"x" * 70000 + b'"'  # splicing is for bodies over 64 KB
        raw = (b'{ "model" : "m", "input": [ {"role": "user", "content": "h\\u00e9 \xc3\xa9"} ] ,"n": 1'
               + pad + b"}")
        body, text, spans = proxy.parse_json_object(raw)
        self.assertEqual(body, json.loads(raw))
        out, _ = proxy.rewrite_request(body, "D")
        self.assertIs(out["input"], body["input"], "unchanged input keeps its identity")
        encoded = proxy.encode_json_object(out, body, text, spans)
        self.assertEqual(json.loads(encoded), out)
        self.assertIn('[ {"role": "user", "content": "h\\u00e9 \u00e9"} ]'.encode(), encoded)
        ascii_raw = b'{"input": [ 1, 2 ],"model": "m"' + pad + b"}"
        body, source, spans = proxy.parse_json_object(ascii_raw)
        self.assertIs(source, ascii_raw, "ASCII bodies are spliced as bytes")
        out, _ = proxy.rewrite_request(body, "D")
        encoded = proxy.encode_json_object(out, body, source, spans)
        self.assertIn(b'"input":[ 1, 2 ]', encoded)
        self.assertEqual(json.loads(encoded), out)
        self.assertEqual(proxy.encode_json_object({}, body, source, spans), b"{}")
        small = b'{"input": [ 1 ]}'
        body, source, spans = proxy.parse_json_object(small)
        self.assertEqual(proxy.encode_json_object(body, body, source, spans), b'{"input":[1]}',
                         "a small body is encoded whole")
        # a changed input is encoded anew
        body, text, spans = proxy.parse_json_object(b'{"input": [{"role": "system", "content": "s"}]}')
        out, _ = proxy.rewrite_request(body, "D")
        self.assertEqual(json.loads(proxy.encode_json_object(out, body, text, spans))["input"],
                         [{"role": "developer", "content": "s"}])

    def test_parse_json_object_errors(self):
        for raw, phrase in ((b"[1]", "JSON object"), (b'"s"', "JSON object"),
                            (b"{", "not valid JSON"), (b'{"a" 1}', "not valid JSON"),
                            (b'{"a": 1} x', "not valid JSON"), (b'{"a": 1,}', "not valid JSON"),
                            (b"\xff{}", "UTF-8"), (b"[" * 100000, "levels deep"),
                            (b'{"a": ' + b"[" * 100000 + b"}", "levels deep")):
            with self.assertRaises(proxy.ProxyError) as cm:
                proxy.parse_json_object(raw)
            self.assertEqual(cm.exception.status, 400, raw[:20])
            self.assertIn(phrase, cm.exception.message, raw[:20])
        self.assertEqual(proxy.parse_json_object(b' {} ')[0], {})
        self.assertEqual(proxy.parse_json_object(b'\xef\xbb\xbf{"a": 1}')[0], {"a": 1})
        self.assertEqual(proxy.parse_json_object(b'{"a": 1, "a": 2}')[0], {"a": 2})

    def test_unsupported_parameter_detection(self):
        self.assertEqual(proxy.unsupported_parameter(
            400, b'{"detail":"Unsupported parameter: seed"}'), "seed")
        self.assertEqual(proxy.unsupported_parameter(
            400, b'{"detail":"Unsupported parameter: \'metadata\'"}'), "metadata")
        self.assertIsNone(proxy.unsupported_parameter(400, b'{"detail":"Stream must be set"}'))
        self.assertIsNone(proxy.unsupported_parameter(500, b'Unsupported parameter: x'))


class RewriteFidelityTests(ProxyTestCase):
    """Request rewriting as the Codex CLI 0.171 era needs it."""

    NEWLY_REJECTED = ("prompt_cache_retention", "safety_identifier", "user",
                      "context_management", "truncation", "metadata")

    def test_parameters_rejected_in_2026_are_left_out_before_the_first_try(self):
        self.backend.extra_rejected.update(self.NEWLY_REJECTED)
        body = simple_request(prompt_cache_retention="24h", safety_identifier="u-1",
                              user="someone", context_management=[{"type": "compaction"}],
                              truncation="auto", metadata={"a": "b"}, seed=1)
        status, _, answer = self.post(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual(len(self.backend.requests), 1, "no round trip to learn them")
        sent = self.last_upstream()["body"]
        for name in self.NEWLY_REJECTED:
            self.assertNotIn(name, sent)
        self.assertEqual(sent["seed"], 1, "the rest still goes, and is learned if refused")
        self.assertNotIn("rejects the parameter", self.log_text())

    def test_service_tier_other_than_priority_is_not_sent(self):
        status, _, answer = self.post(simple_request(service_tier="priority"))
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.last_upstream()["body"]["service_tier"], "priority")
        for tier in ("auto", "default", "flex", "fast", None, 5):
            with self.subTest(tier=tier):
                status, _, answer = self.post(simple_request(service_tier=tier))
                self.assertEqual(status, 200, answer)
                self.assertNotIn("service_tier", self.last_upstream()["body"])

    def test_service_tier_warning_once_for_any_refused_tier(self):
        self.assertIsNone(proxy.service_tier_warning({}))
        self.assertIsNone(proxy.service_tier_warning({"service_tier": "priority"}))
        self.assertIsNone(proxy.service_tier_warning({"service_tier": None}))
        flex = proxy.service_tier_warning({"service_tier": "flex"})
        auto = proxy.service_tier_warning({"service_tier": "auto"})
        self.assertEqual(flex[0], auto[0], "one warning, whatever the tier")
        self.assertIn('"flex"', flex[1])
        self.assertIn('"priority"', flex[1])
        huge = proxy.service_tier_warning({"service_tier": "x" * 10000})
        self.assertLess(len(huge[1]), 200)
        log = LogCapture()
        logger = proxy.Log(log)
        for body in ({"service_tier": "flex"}, {"service_tier": "auto"}):
            logger.warn_once(*proxy.service_tier_warning(body))
        self.assertEqual(log.getvalue().count("service_tier"), 1, log.getvalue())

    def test_unknown_input_items_pass_through_byte_for_byte(self):
        tools = {"type": "additional_tools", "role": "developer", "tools": [
            {"type": "function", "name": "exec", "parameters": {"type": "object"},
             "strict": False, "x-future": [1, {"\u00e9": None}]}]}
        trigger = {"type": "compaction_trigger"}
        user = {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "hi"}]}
        system = {"role": "system", "content": "be brief"}
        for items, pad in (([tools, trigger, user], 0), ([tools, trigger, user], 70000),
                           ([system, tools, trigger, user], 0),
                           ([system, tools, trigger, user], 70000)):
            with self.subTest(items=len(items), pad=pad):
                raw = json.dumps({"model": "gpt-5.6-sol", "input": items, "stream": True,
                                  "reasoning": {"context": "all_turns"}, "pad": "x" * pad},
                                 separators=(",", ":")).encode()
                body, source, spans = proxy.parse_json_object(raw)
                out, _ = proxy.rewrite_request(body, "D")
                self.assertNotIn("tools", out, "no top-level tools are made up")
                for i, item in enumerate(items):
                    if item is not system:
                        self.assertIs(out["input"][i], body["input"][i])
                payload = proxy.encode_json_object(out, body, source, spans)
                for item in (tools, trigger):
                    self.assertIn(json.dumps(item, separators=(",", ":")).encode(), payload)
                self.assertEqual(json.loads(payload)["input"][-3:], [tools, trigger, user])
        # and through the proxy, as the client wrote it
        raw = (b'{"model": "gpt-5.6-sol", "input": [ {"type": "additional_tools", "role": '
               b'"developer", "tools": [ {"type": "function", "name": "exec"} ] }, '
               b'{"type":"compaction_trigger"}, {"type": "message", "role": "user", '
               b'"content": "hi"} ], "pad": "' + b"x" * 70000 + b'"}')
        status, _, answer = self.request("POST", "/v1/responses", raw,
                                         {"Content-Type": "application/json"})
        self.assertEqual(status, 200, answer[:300])
        self.assertIn(raw[raw.index(b"[ {"):raw.index(b', "pad"')], self.last_upstream()["raw"])


NEWER_CODEX_UA = "codex_exec/0.172.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.172.0)"


class ClientFidelityOverHTTPTests(ProxyTestCase):
    """What reaches the backend on account of the client's headers."""

    def sent_headers(self, headers, path="/v1/responses", body=None):
        status, _, answer = self.post(body or simple_request(), headers, path=path)
        self.assertEqual(status, 200, answer)
        return self.last_upstream()["headers"]

    def assert_presented(self, upstream, version):
        self.assertEqual(upstream["version"], version)
        self.assertTrue(upstream["User-Agent"].startswith("codex_cli_rs/%s (" % version),
                        upstream["User-Agent"])

    def test_a_newer_codex_client_is_presented_with_its_own_version(self):
        self.assert_presented(self.sent_headers({"User-Agent": NEWER_CODEX_UA}), "0.172.0")
        self.assert_presented(self.sent_headers({
            "User-Agent": "codex_cli_rs/0.173.0-alpha.2 (Mac OS 15.1.0; arm64) iTerm.app"}),
            "0.173.0-alpha.2")
        self.assert_presented(self.sent_headers({"version": "0.174.0"}), "0.174.0")
        self.assert_presented(self.sent_headers({"User-Agent": NEWER_CODEX_UA},
                                                path=CHAT, body=chat_body()), "0.172.0")
        # older Codex clients and other clients go with the configured version
        for headers in ({"User-Agent": "codex_exec/0.169.0 (Linux; x86_64) dumb"},
                        {"User-Agent": "OpenAI/Python 9.9.9"}, {"version": "2024-10-01"}, {}):
            with self.subTest(headers=headers):
                self.assert_presented(self.sent_headers(headers), "0.171.0")

    def test_models_are_asked_for_with_the_newest_version_seen(self):
        add_models_endpoint(self.backend)
        self.assertEqual(self.request("GET", "/v1/models")[0], 200)
        self.sent_headers({"User-Agent": NEWER_CODEX_UA})
        self.assertEqual(self.request("GET", "/v1/models")[0], 200)
        self.sent_headers({"version": "0.171.5"})  # older than the newest: changes nothing
        self.assertEqual(self.request("GET", "/models")[0], 200)
        asked = [(r["query"]["client_version"], r["headers"]["version"],
                  r["headers"]["User-Agent"].split(" ")[0])
                 for r in self.backend.model_requests]
        self.assertEqual(asked[0], (["0.171.0"], "0.171.0", "codex_cli_rs/0.171.0"))
        self.assertEqual(asked[1:], [(["0.172.0"], "0.172.0", "codex_cli_rs/0.172.0")])
        self.assertEqual(len(asked), 2, "the newest version's list is cached like any other")

    def test_a_model_list_request_names_its_own_version(self):
        # the Codex CLI's first call: GET {base_url}/models?client_version=X, with its headers
        add_models_endpoint(self.backend)
        asked = lambda: self.backend.model_requests[-1]["query"]["client_version"]
        for path, headers, want in (
                ("/v1/models?client_version=latest", {}, "0.171.0"),
                ("/v1/models?client_version=0.170.0", {}, "0.171.0"),
                ("/v1/models?client_version=0.175.0", {}, "0.175.0"),
                ("/models", {"User-Agent": "codex_cli_rs/0.176.0 (Linux 6.8; x86_64) dumb"},
                 "0.176.0"),
                ("/v1/models?client_version=0.172.0", {"version": "0.171.0"}, "0.176.0")):
            with self.subTest(path=path, headers=headers):
                status, _, data = self.request("GET", path, headers=headers)
                self.assertEqual(status, 200, data)
                self.assertEqual(asked(), [want])
                self.assertEqual(self.backend.model_requests[-1]["headers"]["version"], want)
        self.assertEqual(self.sent_headers({})["version"], "0.171.0",
                         "a turn goes with its own client's version, not the newest")

    def test_lite_marker_and_routing_hint_pass_accept_encoding_does_not(self):
        upstream = self.sent_headers({
            "Accept-Encoding": "zstd, gzip, br", "x-openai-internal-codex-responses-lite": "true",
            "x-codex-routing-hint": "model=gpt-6;tier=flex", "x-codex-window-id": "t:0"},
            body=simple_request(model="gpt-5.6-sol"))
        self.assertEqual(upstream["x-openai-internal-codex-responses-lite"], "true")
        self.assertEqual(upstream.get_all("x-codex-routing-hint"), ["model=gpt-5.6-sol"])
        self.assertEqual(upstream["x-codex-window-id"], "t:0")
        self.assertIn(upstream.get("Accept-Encoding"), (None, "identity"))
        upstream = self.sent_headers({"Accept-Encoding": "gzip"},
                                     body=simple_request(service_tier="priority"))
        self.assertIsNone(upstream.get("x-openai-internal-codex-responses-lite"))
        self.assertEqual(upstream["x-codex-routing-hint"], "model=gpt-5.1-codex;tier=priority")
        self.assertIn(upstream.get("Accept-Encoding"), (None, "identity"))

    def test_refused_service_tiers_are_left_out_and_said_once(self):
        for tier in ("flex", "auto", "default"):
            self.sent_headers({}, body=simple_request(service_tier=tier))
            self.assertNotIn("service_tier", self.last_upstream()["body"])
        self.wait_for_log("service_tier")
        self.assertEqual(self.log_text().count("service_tier"), 1, self.log_text())

    def test_idle_keep_alive_connection_is_kept_for_at_least_120_s(self):
        sockets = []
        real_init = proxy.RequestReader.__init__

        def recording_init(reader, sock):
            sockets.append(sock)
            real_init(reader, sock)

        patcher = mock.patch.object(proxy.RequestReader, "__init__", recording_init)
        patcher.start()
        self.addCleanup(patcher.stop)
        conn = self.connection()
        self.addCleanup(conn.close)
        self.assertEqual(self.post(simple_request(), conn=conn)[0], 200)
        # the proxy's end of the connection, back to waiting for the next request
        self.assertEqual(len(sockets), 1)
        self.assertTrue(wait_until(lambda: (sockets[0].gettimeout() or 0) >= 120),
                        "idle timeout %r" % sockets[0].gettimeout())
        self.assertEqual(self.post(simple_request(), conn=conn)[0], 200)
        self.assertEqual(len(sockets), 1, "the second request needed a new connection")


class ResponsesEndpointTests(ProxyTestCase):
    def test_non_streaming_answer_rebuilt_from_items(self):
        items = [reasoning_item(), function_call_item(), message_item("All done.")]
        self.backend.replies.append(Reply(frames=stream_frames(items)))
        status, headers, body = self.post(simple_request(temperature=0.3, max_output_tokens=9))
        self.assertEqual(status, 200, body)
        self.assertEqual(body["object"], "response")
        self.assertEqual(body["status"], "completed")
        self.assertEqual(body["output"], items)
        self.assertEqual(body["usage"], USAGE)
        self.assertEqual(headers["x-codex-primary-used-percent"], "12.5")
        self.assertEqual(headers["x-request-id"], "req-123")

    def test_upstream_request_shape(self):
        status, _, _ = self.post(simple_request(), headers={
            "Authorization": "Bearer client-secret", "Cookie": "c=1", "session_id": "sess-9",
            "x-codex-turn-metadata": "{}", "x-stainless-lang": "python"})
        self.assertEqual(status, 200)
        req = self.last_upstream()
        h = req["headers"]
        self.assertEqual(req["path"], "/backend-api/codex/responses")
        self.assertEqual(h["Authorization"], "Bearer " + self.token)
        self.assertEqual(h["ChatGPT-Account-ID"], "acct-file")
        self.assertEqual(h["originator"], "codex_cli_rs")
        self.assertEqual(h["version"], proxy.DEFAULT_CLIENT_VERSION)
        self.assertTrue(h["User-Agent"].startswith("codex_cli_rs/%s (" % proxy.DEFAULT_CLIENT_VERSION))
        self.assertIn("codex-responses-proxy/", h["User-Agent"])
        self.assertEqual(h["Accept"], "text/event-stream")
        self.assertEqual(h["session_id"], "sess-9")
        self.assertEqual(h["session-id"], "sess-9")
        self.assertEqual(h["x-codex-turn-metadata"], "{}")
        self.assertIsNone(h.get("Cookie"))
        self.assertIsNone(h.get("x-stainless-lang"))
        self.assertEqual(req["body"]["prompt_cache_key"], "sess-9")

    def test_derived_session_id_is_stable_across_turns(self):
        first = {"role": "user", "content": [{"type": "input_text", "text": "hello"}]}
        self.post({"model": "m", "input": [first]})
        self.post({"model": "m", "input": [first, message_item("hi"),
                                           {"role": "user", "content": "more"}]})
        a, b = self.backend.requests[-2:]
        self.assertEqual(a["headers"]["session_id"], b["headers"]["session_id"])
        self.assertEqual(a["body"]["prompt_cache_key"], a["headers"]["session_id"])

    def test_compressed_bodies(self):
        raw = json.dumps(simple_request()).encode()
        for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
            status, _, body = self.post(data, headers={"Content-Encoding": encoding,
                                                       "Content-Type": "application/json"})
            self.assertEqual(status, 200, (encoding, body))
        status, _, body = self.post(raw, headers={"Content-Encoding": "zstd"})
        if proxy.zstd is None:
            self.assert_openai_error(status, body, 415, contains="zstd")
        else:
            self.assertEqual(status, 400)  # not zstd data

    def test_zstd_body_is_decoded_where_python_has_zstd(self):
        # Python < 3.14 has no compression.zstd: a stand-in with its decompressor's interface,
        # whose "frame" is a marker, the payload and an end marker.
        class FakeZstdDecompressor:
            def __init__(self):
                self.eof = False

            def decompress(self, data, max_length=-1):
                if not data.startswith(b"ZSTD:"):
                    raise ValueError("not zstd data")
                payload = data[len(b"ZSTD:"):]
                self.eof = payload.endswith(b":END")
                if self.eof:
                    payload = payload[:-len(b":END")]
                return payload if max_length < 0 else payload[:max_length]

        fake_zstd = type("FakeZstdModule", (), {"ZstdDecompressor": FakeZstdDecompressor})
        request = simple_request("zstd-compressed hello")
        raw = json.dumps(request).encode()
        with mock.patch.object(proxy, "zstd", fake_zstd):
            status, _, body = self.post(b"ZSTD:" + raw + b":END",
                                        headers={"Content-Encoding": "zstd",
                                                 "Content-Type": "application/json"})
            self.assertEqual(status, 200, body)
            self.assertEqual(self.last_upstream()["body"]["input"],
                             [{"type": "message", "role": "user", "content": [
                                 {"type": "input_text", "text": "zstd-compressed hello"}]}])
            sent = len(self.backend.requests)
            status, _, body = self.post(b"ZSTD:" + raw,  # the frame ends early
                                        headers={"Content-Encoding": "zstd",
                                                 "Content-Type": "application/json"})
            self.assert_openai_error(status, body, 400, code="invalid_body", contains="zstd")
        self.assertEqual(len(self.backend.requests), sent)

    def test_incomplete_is_status_incomplete(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            terminal="response.incomplete",
            terminal_extra={"incomplete_details": {"reason": "max_output_tokens"}})))
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "incomplete")
        self.assertEqual(body["incomplete_details"], {"reason": "max_output_tokens"})
        self.assertEqual(body["output"][0]["type"], "message")

    def test_response_failed_maps_code_to_status(self):
        for code, expected in (("context_length_exceeded", 400), ("rate_limit_exceeded", 429),
                               ("server_is_overloaded", 503), ("weird", 500)):
            self.backend.replies.append(Reply(frames=stream_frames(
                terminal="response.failed", terminal_extra={"error": {
                    "code": code, "message": "it failed: " + code}})))
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, expected, code=code,
                                     contains="it failed: " + code)

    def test_failed_response_returns_its_connection_to_the_pool(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            terminal="response.failed", terminal_extra={"error": {
                "code": "context_length_exceeded", "message": "too long"}})))
        self.assertEqual(self.post(simple_request())[0], 400)
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertEqual(self.backend.connections, 1, "the failed turn's connection was lost")

    def test_odd_usage_does_not_cost_the_answer_or_the_connection(self):
        for stream in (False, True):
            self.backend.replies.append(Reply(frames=stream_frames(
                terminal_extra={"usage": "not an object"})))
            status, _, data = self.request("POST", "/v1/responses",
                                           simple_request(stream=stream))
            self.assertEqual(status, 200, data)
            self.assertIn(b"Hello there!", data)
            if stream:
                self.assertEqual(parse_sse(data)[-1][0], "response.completed")
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertEqual(self.backend.connections, 1)

    def test_error_event_and_truncated_stream(self):
        self.backend.replies.append(Reply(frames=stream_frames()[:2] + [sse("error", {
            "code": "server_error", "message": "backend exploded", "param": None})]))
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 500, code="server_error",
                                 contains="backend exploded")
        self.backend.replies.append(Reply(frames=stream_frames()[:3]))
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 502, contains="upstream closed the stream "
                                 "before the response completed")

    def test_stream_without_content_type(self):
        self.backend.replies.append(Reply(content_type=None))
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200)
        self.assertEqual(body["output"][0]["content"][0]["text"], "Hello there!")

    def test_upstream_http_errors_keep_status_and_shape(self):
        self.backend.replies.append(Reply(status=400, body=b'{"detail": "Model not found"}'))
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 400, contains="Model not found")
        self.backend.replies.append(Reply(status=500, body=b"oops"))
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 500)

    def test_usage_limit_429_not_retried_and_headers_forwarded(self):
        limit = {"error": {"type": "usage_limit_reached", "message":
                           "The usage limit has been reached", "plan_type": "plus",
                           "resets_at": int(time.time()) + 3600, "resets_in_seconds": 3600}}
        self.backend.replies.append(Reply(status=429, body=json.dumps(limit).encode(), headers=[
            ("retry-after", "3600"), ("x-codex-primary-used-percent", "100"),
            ("x-codex-primary-reset-after-seconds", "3600")]))
        before = len(self.backend.requests)
        status, headers, body = self.post(simple_request())
        self.assertEqual(len(self.backend.requests) - before, 1, "a 429 must not be retried")
        self.assert_openai_error(status, body, 429, contains="resets at")
        self.assertEqual(body["error"]["resets_in_seconds"], 3600)
        self.assertEqual(headers["retry-after"], "3600")
        self.assertEqual(headers["x-codex-primary-reset-after-seconds"], "3600")

    def test_unsupported_parameter_dropped_retried_and_remembered(self):
        self.backend.extra_rejected.add("seed")
        status, _, body = self.post(simple_request(seed=42))
        self.assertEqual(status, 200, body)
        self.assertEqual([("seed" in r["body"]) for r in self.backend.requests], [True, False])
        self.post(simple_request(seed=43))
        self.assertEqual(len(self.backend.requests), 3, "remembered: no second rejection")
        self.assertNotIn("seed", self.last_upstream()["body"])
        self.assertEqual(self.log_text().count("rejects the parameter 'seed'"), 1)

    def test_unsupported_parameter_retried_once_only(self):
        self.backend.extra_rejected.update({"seed", "frequency_penalty"})
        status, _, body = self.post(simple_request(seed=1, frequency_penalty=0.5))
        # each distinct parameter is dropped once; both get dropped, then it succeeds
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.backend.requests), 3)

    def test_essential_parameters_are_never_dropped(self):
        self.backend.extra_rejected.add("tools")
        status, _, body = self.post(simple_request(tools=[]))
        self.assert_openai_error(status, body, 400, contains="Unsupported parameter: tools")
        self.assertEqual(len(self.backend.requests), 1)

    def test_dropped_parameters_are_remembered_per_model(self):
        self.backend.extra_rejected.add("seed")
        self.assertEqual(self.post(simple_request(seed=1, model="model-a"))[0], 200)
        self.assertEqual(self.post(simple_request(seed=1, model="model-b"))[0], 200)
        self.assertEqual([r["body"]["model"] for r in self.backend.requests if "seed" in r["body"]],
                         ["model-a", "model-b"], "model-b must be asked with seed first")

    def test_keep_alive_requests_during_shutdown_get_503(self):
        conn = self.connection()
        self.addCleanup(conn.close)
        self.assertEqual(self.post(simple_request(), conn=conn)[0], 200)
        self.proxy.app.begin_shutdown("test")
        status, headers, body = self.post(simple_request(), conn=conn)
        self.assert_openai_error(status, body, 503, code="shutting_down")
        self.assertEqual(headers.get("retry-after"), "2")
        self.assertEqual(headers.get("connection"), "close")

    @with_proxy_options(upstream_url=lambda t: "http://127.0.0.1:%d/x" % free_port())
    def test_upstream_unreachable_is_502(self):
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 502, code="upstream_unreachable")

    @with_proxy_options(stream_idle_timeout=0.5)
    def test_upstream_silent_after_its_headers_is_504_stream_idle_timeout(self):
        self.backend.replies.append(Reply(hang_after=0))  # 200 and headers, then nothing
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 504, code="stream_idle_timeout")

    @with_proxy_options(stream_idle_timeout=0.5)
    def test_upstream_without_status_line_in_time_is_504_upstream_timeout(self):
        released = threading.Event()
        seen = []

        def never_answer(up, conn_no, req_no, sock, request):
            seen.append(request)
            released.wait(10)
            return False

        self.backend.script(never_answer)
        self.addCleanup(released.set)
        for stream in (False, True):
            with self.subTest(stream=stream):
                status, _, body = self.post(simple_request(stream=stream))
                self.assert_openai_error(status, body, 504, code="upstream_timeout",
                                         contains="did not answer in time")
        self.assertEqual(len(seen), 2, "the request was not sent exactly once each")


class MalformedDataTests(ProxyTestCase):
    """A hand-edited auth.json, a backend answering nonsense, a broken --state-db: each gets
    a clear answer, never a 500 or a traceback."""

    def test_auth_json_values_of_the_wrong_type(self):
        doc = auth_document(access=self.token)
        doc["last_refresh"] = 5
        doc["tokens"]["account_id"] = ["not", "a", "string"]
        write_auth(self.home, doc)
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["headers"].get("ChatGPT-Account-ID"),
                         "acct-from-id")  # the id token's claim, the file's value being no id
        doc["tokens"]["access_token"] = 12345
        write_auth(self.home, doc)
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, contains="no ChatGPT tokens")
        status, _, report = self.request("GET", "/status")
        self.assertEqual(status, 200, report)

    def test_a_backend_429_with_odd_fields_is_still_a_429(self):
        for error in ({"message": 5, "resets_at": 1e20}, {"message": "slow", "resets_in_seconds":
                                                          float("inf")}):
            body = json.dumps({"error": dict(error, type="usage_limit_reached")}).encode()
            self.backend.replies.append(Reply(status=429, body=body))
            status, _, answer = self.post(simple_request())
            self.assert_openai_error(status, answer, 429)
            self.assertIsInstance(answer["error"]["message"], str)

    def test_status_survives_a_reset_time_no_calendar_has(self):
        self.backend.replies.append(Reply(headers=[("x-codex-primary-reset-at", "99999999999999"),
                                                   ("x-codex-primary-used-percent", "10")]))
        self.assertEqual(self.post(simple_request())[0], 200)
        status, _, body = self.request("GET", "/status")
        self.assertEqual(status, 200, body)
        self.assertIsNone(json.loads(body)["quota"]["primary"]["resets_at"])

    def test_a_terminal_event_without_its_type_keeps_its_name(self):
        frames = stream_frames(terminal="response.incomplete", terminal_extra={
            "incomplete_details": {"reason": "max_output_tokens"}})
        last = json.loads(frames[-1].split(b"data: ", 1)[1])
        del last["type"]
        frames[-1] = b"event: response.incomplete\ndata: " + json.dumps(last).encode() + b"\n\n"
        self.backend.replies.append(Reply(frames=frames))
        status, _, events, _ = self.stream(simple_request())
        self.assertEqual(status, 200)
        self.assertEqual(events[-1][0], "response.incomplete")
        self.assertEqual(events[-1][1]["response"]["output"][0]["type"], "message")

    def test_a_chat_stream_without_a_response_id_has_one_prefix(self):
        chat = proxy.ChatStream("m", False)
        chat.frames("response.created", {"response": {"model": "m"}})
        self.assertEqual(chat.id.count("chatcmpl-"), 1)

    def test_a_state_db_that_is_no_database_stops_the_start_clearly(self):
        path = os.path.join(self.home, "state.db")
        with open(path, "w") as f:
            f.write("not sqlite at all, " * 100)
        result = run_program(["--port", "0", "--codex-home", self.home, "--state-db", path])
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(b"--state-db", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertNotIn(b"cannot listen", result.stderr)


# ============================================================================================
# Front end: Chat Completions
# ============================================================================================

CHAT = "/v1/chat/completions"


MODEL = "gpt-5.1-codex"


DROPPED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n")


def replayed_item(text):
    """message_item(text) as the proxy replays it for previous_response_id: without its id."""
    item = message_item(text)
    del item["id"]
    return item


def user_item(text):
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def chat_body(messages=None, **extra):
    body = {"model": MODEL, "messages": messages or [{"role": "user", "content": "say hi"}]}
    body.update(extra)
    return body


def chat_chunks(testcase, data):
    """A chat stream body parsed by hand: every frame one `data: ` line, the last [DONE].
    Returns the decoded chunks before [DONE]."""
    testcase.assertTrue(data.endswith(b"data: [DONE]\n\n"), data[-300:])
    frames = data.split(b"\n\n")
    testcase.assertEqual(frames[-1], b"", data[-300:])
    frames = frames[:-1]
    chunks = []
    for i, frame in enumerate(frames):
        testcase.assertTrue(frame.startswith(b"data: "), frame)
        testcase.assertNotIn(b"\n", frame, "one data line per frame, no event: lines: %r" % frame)
        if i == len(frames) - 1:
            testcase.assertEqual(frame, b"data: [DONE]")
        else:
            testcase.assertNotEqual(frame, b"data: [DONE]", "[DONE] before the end")
            chunks.append(json.loads(frame[6:]))
    return chunks


def deltas(chunks):
    return [c["choices"][0]["delta"] for c in chunks if c.get("choices")]


class ChatRequestMappingTests(ChatCase):
    def test_system_and_developer_become_instructions_later_system_a_developer_item(self):
        status, _, body = self.chat(chat_body([
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "Now answer in French."},
            {"role": "user", "content": "weather?"}]))
        self.assertEqual(status, 200, body)
        up = self.last_upstream()["body"]
        self.assertEqual(up["instructions"], "Be brief.\n\nUse metric units.")
        self.assertEqual(up["input"], [
            user_item("hi"),
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "Now answer in French."}]},
            user_item("weather?")])
        self.assertNotIn('"system"', self.last_upstream()["raw"].decode())

    def test_user_text_and_image_parts(self):
        status, _, body = self.chat(chat_body([{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png",
                                                "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]}]))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream_input(), [{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "https://example.com/cat.png",
             "detail": "high"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
             "detail": "auto"}]}])

    def test_assistant_text_tool_calls_and_tool_results(self):
        status, _, body = self.chat(chat_body([
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_9", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_10", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_10",
             "content": [{"type": "text", "text": "4C"}]},
            {"role": "assistant", "content": "Paris 18C, Oslo 4C."},
            {"role": "user", "content": "Thanks"}]))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream_input(), [
            user_item("Weather in Paris and Oslo?"),
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Let me check."}]},
            {"type": "function_call", "call_id": "call_9", "name": "get_weather",
             "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_10", "name": "get_weather",
             "arguments": '{"city":"Oslo"}'},
            {"type": "function_call_output", "call_id": "call_9", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_10", "output": "4C"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Paris 18C, Oslo 4C."}]},
            user_item("Thanks")])

    def test_tools_tool_choice_and_parallel_tool_calls(self):
        params = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Now.",
                                                   "parameters": params, "strict": True}}]
        status, _, body = self.chat(chat_body(tools=tools, tool_choice="required",
                                              parallel_tool_calls=False))
        self.assertEqual(status, 200, body)
        up = self.last_upstream()["body"]
        self.assertEqual(up["tools"], [{"type": "function", "name": "get_weather",
                                        "description": "Now.", "parameters": params,
                                        "strict": True}])
        self.assertEqual(up["tool_choice"], "required")
        self.assertIs(up["parallel_tool_calls"], False)
        status, _, body = self.chat(chat_body(tools=tools, tool_choice={
            "type": "function", "function": {"name": "get_weather"}}))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["body"]["tool_choice"],
                         {"type": "function", "name": "get_weather"})
        self.assertNotIn("parallel_tool_calls", self.last_upstream()["body"])

    def test_response_format_becomes_text_format(self):
        status, _, body = self.chat(chat_body(response_format={"type": "json_object"}))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["body"]["text"], {"format": {"type": "json_object"}})
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                  "additionalProperties": False}
        status, _, body = self.chat(chat_body(response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["body"]["text"], {"format": {
            "type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
        self.assertNotIn("response_format", self.last_upstream()["body"])

    def test_reasoning_effort_becomes_reasoning_effort(self):
        status, _, body = self.chat(chat_body(reasoning_effort="high"))
        self.assertEqual(status, 200, body)
        up = self.last_upstream()["body"]
        self.assertEqual(up["reasoning"]["effort"], "high")
        self.assertNotIn("reasoning_effort", up)

    def test_rejected_parameters_accepted_and_not_sent(self):
        status, _, body = self.chat(chat_body(max_tokens=50, max_completion_tokens=60,
                                              temperature=0.2, top_p=0.9, n=1))
        self.assertEqual(status, 200, body)
        # All requests: a parameter the backend rejected would be dropped on a retry.
        self.assertEqual(len(self.backend.requests), 1, [r["body"] for r in self.backend.requests])
        up = self.last_upstream()["body"]
        for name in DROPPED:
            self.assertNotIn(name, up)
        self.assertIs(up["stream"], True)
        self.assertIs(up["store"], False)
        self.assertEqual(up["model"], MODEL)

    def test_n_above_one_is_400_and_nothing_sent(self):
        status, _, body = self.chat(chat_body(n=2))
        self.assert_openai_error(status, body, 400)
        self.assertEqual(body["error"]["param"], "n")
        self.assertEqual(self.backend.requests, [])

    def test_bad_messages_are_400(self):
        cases = [{"model": MODEL}, {"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": "hello"},
                 chat_body([{"role": "function", "name": "f", "content": "x"}]),
                 chat_body(["hello"]),
                 chat_body([{"role": "user", "content": "ok"}, 42])]
        for case in cases:
            with self.subTest(body=case):
                status, _, body = self.chat(case)
                self.assert_openai_error(status, body, 400)
        self.assertEqual(self.backend.requests, [])
        status, _, body = self.chat(chat_body())  # and the proxy still serves
        self.assertEqual(status, 200, body)


class ChatAnswerTests(ChatCase):
    def test_text_answer_finish_stop_and_usage(self):
        status, _, body = self.chat(chat_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(len(body["choices"]), 1)
        choice = body["choices"][0]
        self.assertEqual(choice["index"], 0)
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Hello there!")
        self.assertNotIn("tool_calls", choice["message"])
        self.assertEqual(choice["finish_reason"], "stop")
        usage = body["usage"]
        self.assertEqual((usage["prompt_tokens"], usage["completion_tokens"],
                          usage["total_tokens"]), (21, 5, 26))
        self.assertEqual(usage["prompt_tokens_details"]["cached_tokens"], 7)
        self.assertEqual(usage["completion_tokens_details"]["reasoning_tokens"], 2)

    def test_function_call_answer_is_tool_calls(self):
        self.backend.replies.append(Reply(frames=stream_frames(items=[function_call_item()])))
        status, _, body = self.chat(chat_body(tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object"}}}]))
        self.assertEqual(status, 200, body)
        choice = body["choices"][0]
        self.assertIsNone(choice["message"]["content"])
        self.assertEqual(choice["message"]["tool_calls"], [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])
        self.assertEqual(choice["finish_reason"], "tool_calls")

    def test_incomplete_for_max_output_tokens_is_length(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            text="Hello th", terminal="response.incomplete",
            terminal_extra={"incomplete_details": {"reason": "max_output_tokens"}})))
        status, _, body = self.chat(chat_body(max_tokens=3))
        self.assertEqual(status, 200, body)
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        self.assertEqual(body["choices"][0]["message"]["content"], "Hello th")

    def test_reasoning_summary_is_reasoning_content(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[reasoning_item(), message_item("The answer.")])))
        status, _, body = self.chat(chat_body(reasoning_effort="low"))
        self.assertEqual(status, 200, body)
        message = body["choices"][0]["message"]
        self.assertEqual(message["reasoning_content"], "Thinking about it.")
        self.assertEqual(message["content"], "The answer.")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")

    def test_errors_keep_the_responses_route_statuses(self):
        for code, expected in (("rate_limit_exceeded", 429), ("context_length_exceeded", 400),
                               ("server_error", 500)):
            frames = stream_frames(terminal="response.failed", terminal_extra={
                "error": {"code": code, "message": "failed: " + code}})
            with self.subTest(code=code):
                self.backend.replies.extend([Reply(frames=frames), Reply(frames=frames)])
                r_status, _, r_body = self.post(simple_request())
                c_status, _, c_body = self.chat(chat_body())
                self.assertEqual(r_status, expected, r_body)
                self.assert_openai_error(c_status, c_body, expected, code=code,
                                         contains="failed: " + code)

    def test_failed_answer_keeps_the_upstream_connection_for_the_next_turn(self):
        # A response.failed stream ends cleanly, like a completed one: its connection is as
        # reusable (the streamed path reuses it). Non-streamed it was neither pooled nor
        # closed (a ResourceWarning when collected), and the next turn paid a new connection.
        frames = stream_frames(terminal="response.failed", terminal_extra={
            "error": {"code": "server_error", "message": "boom"}})
        self.backend.replies.append(Reply(frames=frames))
        status, _, body = self.chat(chat_body())
        self.assert_openai_error(status, body, 500, code="server_error")
        status, _, body = self.chat(chat_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.backend.connections, 1, "the failed turn's connection was lost")


class ChatStreamingTests(ChatCase):
    def test_text_stream_shape(self):
        status, headers, data = self.chat_stream(chat_body())
        self.assertEqual(status, 200, data)
        self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        chunks = chat_chunks(self, data)
        self.assertNotIn(b"event:", data)
        for chunk in chunks:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["id"], chunks[0]["id"])
        ds = deltas(chunks)
        self.assertEqual(ds[0].get("role"), "assistant")
        self.assertEqual("".join(d.get("content") or "" for d in ds), "Hello there!")
        content_chunks = [d for d in ds if d.get("content")]
        self.assertEqual(len(content_chunks), 3, ds)  # as the backend sent them: 4+4+4
        finishes = [c["choices"][0]["finish_reason"] for c in chunks
                    if c.get("choices") and c["choices"][0].get("finish_reason")]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertFalse([c for c in chunks if "usage" in c and c["usage"]],
                         "no usage chunk unless stream_options.include_usage")
        self.assertFalse([c for c in chunks if c.get("choices") == []])
        self.assertNotIn("stream_options", self.last_upstream()["body"])

    def test_include_usage_adds_one_usage_chunk_before_done(self):
        status, _, data = self.chat_stream(chat_body(stream_options={"include_usage": True}))
        self.assertEqual(status, 200, data)
        chunks = chat_chunks(self, data)
        usage_chunks = [c for c in chunks if c.get("choices") == []]
        self.assertEqual(len(usage_chunks), 1, chunks)
        self.assertIs(chunks[-1], usage_chunks[0])
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")
        usage = usage_chunks[0]["usage"]
        self.assertEqual((usage["prompt_tokens"], usage["completion_tokens"],
                          usage["total_tokens"]), (21, 5, 26))
        self.assertEqual(usage["prompt_tokens_details"]["cached_tokens"], 7)
        self.assertEqual(usage["completion_tokens_details"]["reasoning_tokens"], 2)
        self.assertNotIn("stream_options", self.last_upstream()["body"])

    def test_content_deltas_arrive_as_the_backend_sends_them(self):
        frames = custom_frames(text_events(["Hel", "lo!"]))
        after_hel = [i for i, f in enumerate(frames) if b'"delta": "Hel"' in f][0] + 1
        reply = Reply(frames=frames, hold_after=after_hel)  # the rest waits for go()
        self.backend.replies.append(reply)
        conn = self.connection(timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", CHAT, body=json.dumps(chat_body(stream=True)).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertTrue(reply.wait_held())
        buf = b""
        while b'"content":"Hel"' not in buf:  # a proxy holding it back times out here
            piece = resp.read1(65536)
            self.assertTrue(piece, "the first content delta was held back until the end")
            buf += piece
        reply.go()
        buf += resp.read()
        ds = deltas(chat_chunks(self, buf))
        self.assertEqual([d["content"] for d in ds if d.get("content")], ["Hel", "lo!"])

    def test_tool_call_streams_as_tool_calls_deltas(self):
        pieces = ['{"ci', 'ty": "Pa', 'ris"}']
        self.backend.replies.append(Reply(frames=custom_frames(call_events(pieces))))
        status, _, data = self.chat_stream(chat_body(stream_options={"include_usage": False}))
        self.assertEqual(status, 200, data)
        chunks = chat_chunks(self, data)
        ds = deltas(chunks)
        self.assertEqual(ds[0].get("role"), "assistant")
        calls = [d["tool_calls"] for d in ds if d.get("tool_calls")]
        self.assertTrue(calls, ds)
        for call in calls:
            self.assertEqual(len(call), 1)
            self.assertEqual(call[0]["index"], 0)
        first = calls[0][0]
        self.assertEqual(first["id"], "call_1")
        self.assertEqual(first["type"], "function")
        self.assertEqual(first["function"]["name"], "get_weather")
        pieces_seen = [c[0]["function"].get("arguments") for c in calls]
        self.assertEqual([p for p in pieces_seen if p], pieces,
                         "the argument pieces, one delta each, as the backend streamed them")
        for call in calls[1:]:
            self.assertNotIn("id", call[0])  # id and name once, at the start
        self.assertEqual("".join(d.get("content") or "" for d in ds), "")
        finishes = [c["choices"][0]["finish_reason"] for c in chunks
                    if c.get("choices") and c["choices"][0].get("finish_reason")]
        self.assertEqual(finishes, ["tool_calls"])

    def test_reasoning_summary_streams_as_reasoning_content(self):
        events = reasoning_events(["Thinking ", "about it."]) + text_events(["Ans", "wer."], 1)
        self.backend.replies.append(Reply(frames=custom_frames(events)))
        status, _, data = self.chat_stream(chat_body(reasoning_effort="medium"))
        self.assertEqual(status, 200, data)
        ds = deltas(chat_chunks(self, data))
        self.assertEqual([d["reasoning_content"] for d in ds if "reasoning_content" in d],
                         ["Thinking ", "about it."])
        self.assertEqual("".join(d.get("content") or "" for d in ds), "Answer.")
        for d in ds:
            self.assertNotIn("Thinking", d.get("content") or "")

    def test_response_failed_mid_stream_ends_with_error_chunk_and_done(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            terminal="response.failed",
            terminal_extra={"error": {"code": "server_error", "message": "boom upstream"}})))
        status, _, data = self.chat_stream(chat_body())
        self.assertEqual(status, 200, data)
        chunks = chat_chunks(self, data)
        self.assertIn("error", chunks[-1], chunks[-1])
        self.assertEqual(chunks[-1]["error"]["message"], "boom upstream")
        self.assertEqual(chunks[-1]["error"]["code"], "server_error")
        self.assertEqual("".join(d.get("content") or "" for d in deltas(chunks[:-1])),
                         "Hello there!")
        self.assertEqual(sum(1 for c in chunks if "error" in c), 1)

    def test_upstream_dying_mid_stream_ends_with_error_chunk_and_done(self):
        self.backend.replies.append(Reply(frames=stream_frames(), cut_after=4))
        started = time.monotonic()
        status, _, data = self.chat_stream(chat_body())
        self.assertLess(time.monotonic() - started, 4.0, "the proxy waited on a dead upstream")
        self.assertEqual(status, 200, data)
        chunks = chat_chunks(self, data)
        self.assertIn("error", chunks[-1], chunks[-1])
        self.assertTrue(chunks[-1]["error"].get("message"))
        self.assertFalse([c for c in chunks if c.get("choices")
                          and c["choices"][0].get("finish_reason")],
                         "a cut stream must not look finished")

    @with_proxy_options(stream_idle_timeout=0.5)
    def test_upstream_going_silent_mid_stream_ends_with_error_chunk_and_done(self):
        self.backend.replies.append(Reply(frames=stream_frames(), hang_after=4))
        started = time.monotonic()
        status, _, data = self.chat_stream(chat_body())
        self.assertLess(time.monotonic() - started, 4.0, "the proxy hung with its upstream")
        self.assertEqual(status, 200, data)
        chunks = chat_chunks(self, data)
        self.assertEqual(chunks[-1].get("error", {}).get("code"), "stream_idle_timeout",
                         chunks[-1])

    def test_429_before_the_stream_is_json_like_the_responses_route(self):
        err = json.dumps({"error": {"type": "usage_limit_reached", "code": "usage_limit_reached",
                                    "message": "The usage limit has been reached",
                                    "resets_in_seconds": 600}}).encode()
        for _ in range(2):
            self.backend.replies.append(Reply(status=429, body=err,
                                              headers=[("Retry-After", "600")]))
        r_status, r_headers, r_data = self.request("POST", "/v1/responses",
                                                   dict(simple_request(), stream=True))
        c_status, c_headers, c_data = self.chat_stream(chat_body())
        self.assertEqual(r_status, 429, r_data)
        self.assertEqual(c_status, 429, c_data)
        self.assertTrue(c_headers["content-type"].startswith("application/json"))
        c_body = json.loads(c_data)
        self.assert_openai_error(c_status, c_body, 429)
        r_body = json.loads(r_data)
        # the messages name the reset time, which may tick over a minute between the two
        self.assertTrue(c_body["error"].pop("message").startswith("The usage limit has been"))
        self.assertTrue(r_body["error"].pop("message").startswith("The usage limit has been"))
        self.assertEqual(c_body, r_body)
        self.assertEqual(c_headers.get("retry-after"), "600")
        self.assertEqual(len(self.backend.requests), 2)  # not retried


class ChatWrongTypesTests(ProxyTestCase):
    """Each of these was a 500 (a TypeError or AttributeError inside the translation)."""

    CASES = (
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": None, "tool_calls": 5}]},
         "messages[1].tool_calls"),
        ({"tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
        ({"tool_choice": 5}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": "x"}},
         "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": [["a", 1]]}},
         "response_format.json_schema"),
        ({"response_format": "json_object"}, "response_format"),
        ({"messages": [{"role": "system", "content": [{"type": "text", "text": 5}]},
                       {"role": "user", "content": "hi"}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url",
                                                       "image_url": {"url": "http://x/y.png"}}]},
                       {"role": "user", "content": "hi"}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "tool", "tool_call_id": "c", "content": [{"type": "text",
                                                                          "text": [1]}]}]},
         "messages[1].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]},
         "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "tool_calls": [
                           {"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]},
         "tools[0].function.name"),
    )

    def test_wrong_types_are_400_naming_the_param(self):
        for extra, param in self.CASES:
            body = {"model": "gpt-5.1-codex", "messages": [{"role": "user", "content": "hi"}]}
            body.update(extra)
            with self.subTest(param=param, body=extra):
                status, _, answer = self.post(body, path=CHAT)
                self.assert_openai_error(status, answer, 400)
                self.assertEqual(answer["error"]["param"], param)
                self.assertIn(param.split(".")[-1].split("[")[0], answer["error"]["message"])
        self.assertEqual(self.backend.requests, [])

    def test_right_types_still_translate(self):
        body = {"model": "gpt-5.1-codex",
                "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                             {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                                               {"type": "refusal",
                                                                "refusal": "no"}],
                              "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f"}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "42"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "n", "schema": {"type": "object"}}}}
        status, _, answer = self.post(body, path=CHAT)
        self.assertEqual(status, 200, answer)
        up = self.last_upstream()["body"]
        self.assertEqual(up["instructions"], "Be brief.")
        self.assertEqual(up["tool_choice"], {"type": "function", "name": "f"})
        self.assertEqual(up["text"]["format"], {"type": "json_schema", "name": "n",
                                                "schema": {"type": "object"}})
        self.assertEqual([i["type"] for i in up["input"]],
                         ["message", "message", "function_call", "function_call_output"])
        self.assertEqual(up["input"][2]["arguments"], "{}")


# ============================================================================================
# Front end: Anthropic Messages (Claude Code): the mapping both ways, pure, then over sockets
# ============================================================================================

MESSAGES = "/v1/messages"


CLAUDE = "claude-opus-5-5"


OVERFLOW = ("Your input exceeds the context window of this model. Please adjust your input "
            "and try again.")


def messages_body(messages=None, **extra):
    body = {"model": CLAUDE, "max_tokens": 32000,
            "messages": messages or [{"role": "user", "content": "say hi"}]}
    body.update(extra)
    return body


def to_responses(body, headers=None):
    return proxy.messages_to_responses(body, headers or {})


def translate(events, stops=(), tool_names=None, streaming=True):
    """(the Messages frames as [(event, data)], the MessagesStream) for Responses events."""
    stream = proxy.MessagesStream(CLAUDE, tool_names, stops, streaming)
    out = b""
    for etype, payload in events:
        out += stream.frames(etype, dict(payload, type=etype))
        if stream.stopped:
            break
    return parse_sse(out), stream


def completed(usage=USAGE, **extra):
    return ("response.completed", {"response": response_object(usage=usage, **extra)})


def text_of(frames):
    return "".join(d["delta"].get("text", "") for e, d in frames
                   if e == "content_block_delta")


def json_of(frames):
    return "".join(d["delta"].get("partial_json", "") for e, d in frames
                   if e == "content_block_delta")


def compact_sse(etype, payload):
    """A frame as the backend writes it: compact JSON (which the translation's fast path
    reads from the bytes)."""
    return (b"event: " + etype.encode() + b"\ndata: " +
            json.dumps(dict(payload, type=etype), separators=(",", ":")).encode() + b"\n\n")


class MessagesRequestMappingTests(unittest.TestCase):
    """Messages -> Responses, pure."""

    def test_system_blocks_without_the_billing_header_and_system_messages_in_place(self):
        up = to_responses(messages_body([
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "Reminder one."}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "more"},
            {"role": "system", "content": "Last word."}],
            system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332"
                                             ".a1f; cc_entrypoint=sdk-cli"},
                    {"type": "text", "text": "You are Claude Code.",
                     "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "Be careful."}]))
        self.assertEqual(up["instructions"], "You are Claude Code.\n\nBe careful.")
        developer = lambda text: {"type": "message", "role": "developer",
                                  "content": [{"type": "input_text", "text": text}]}
        self.assertEqual(up["input"], [
            user_item("hi"), developer("Reminder one."),
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello."}]},
            user_item("more"), developer("Last word.")])
        self.assertEqual(to_responses(messages_body(system="Plain."))["instructions"], "Plain.")

    def test_images_and_documents(self):
        up = to_responses(messages_body([{"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
            {"type": "document", "title": "spec.pdf", "source": {
                "type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
            {"type": "document", "source": {"type": "url", "url": "https://example.com/b.pdf"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "plain text doc"}}]}]))
        self.assertEqual(up["input"][0]["content"], [
            {"type": "input_text", "text": "Look:"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
             "detail": "auto"},
            {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"},
            {"type": "input_file", "filename": "spec.pdf",
             "file_data": "data:application/pdf;base64,JVBERi0x"},
            {"type": "input_file", "file_url": "https://example.com/b.pdf"},
            {"type": "input_text", "text": "plain text doc"}])

    def test_tool_use_and_tool_results_in_order(self):
        up = to_responses(messages_body([
            {"role": "user", "content": "list and read"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Running both."},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                 "input": {"command": "ls"}},
                {"type": "tool_use", "id": "toolu_2", "name": "Read",
                 "input": {"file_path": "/x.png"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "AAA="}}]},
                {"type": "text", "text": "and then?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_3", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_3", "is_error": True,
                 "content": [{"type": "text", "text": "exit 1"}]}]}]))
        self.assertEqual(up["input"][1:], [
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Running both."}]},
            {"type": "function_call", "call_id": "toolu_1", "name": "Bash",
             "arguments": '{"command":"ls"}'},
            {"type": "function_call", "call_id": "toolu_2", "name": "Read",
             "arguments": '{"file_path":"/x.png"}'},
            {"type": "function_call_output", "call_id": "toolu_1", "output": "a.txt"},
            {"type": "function_call_output", "call_id": "toolu_2", "output": [
                {"type": "input_image", "image_url": "data:image/png;base64,AAA=",
                 "detail": "auto"}]},
            user_item("and then?"),
            {"type": "function_call", "call_id": "toolu_3", "name": "Bash", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "toolu_3", "output": "Error: exit 1"}])

    def test_thinking_with_our_signature_is_the_reasoning_item_others_dropped(self):
        ours = proxy.THINKING_SIGNATURE_PREFIX + "gAAAA-enc"
        up = to_responses(messages_body([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Pondering.", "signature": ours},
                {"type": "thinking", "thinking": "Foreign.", "signature": "EqoBCkYIBxgC"},
                {"type": "thinking", "thinking": "Unsigned."},
                {"type": "redacted_thinking", "data": "EmwKAhgB"},
                {"type": "text", "text": "Hi."}]},
            {"role": "user", "content": "again"}]))
        self.assertEqual(up["input"][1:3], [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Pondering."}],
             "encrypted_content": "gAAAA-enc"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hi."}]}])
        self.assertNotIn("Foreign", json.dumps(up))
        self.assertNotIn("EmwKAhgB", json.dumps(up))

    def test_tools_cleaned_long_names_shortened_server_tools(self):
        long_name = "mcp__a_very_long_server_name_for_testing__and_an_even_longer_tool_name_x"
        schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                  "properties": {"q": {"type": "string", "maximum": 9007199254740991}},
                  "additionalProperties": False}
        body = messages_body([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": long_name,
                                               "input": {"q": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}],
            tools=[{"name": "Bash", "description": "Run it.", "input_schema": schema,
                    "cache_control": {"type": "ephemeral"}},
                   {"name": long_name, "input_schema": {"type": "object"},
                    "defer_loading": True},
                   {"type": "web_search_20250305", "name": "web_search", "max_uses": 5,
                    "allowed_domains": ["example.com"]},
                   {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}],
            tool_choice={"type": "tool", "name": long_name, "disable_parallel_tool_use": True})
        up = to_responses(body)
        short = proxy.shorten_tool_name(long_name)
        self.assertEqual(len(short), 64)
        self.assertEqual(proxy.long_tool_names(body), {short: long_name})
        self.assertEqual(up["tools"], [
            {"type": "function", "name": "Bash", "description": "Run it.", "strict": False,
             "parameters": {"type": "object", "additionalProperties": False, "properties": {
                 "q": {"type": "string", "maximum": 9007199254740991}}}},
            {"type": "function", "name": short, "parameters": {"type": "object"},
             "strict": False},
            {"type": "web_search", "filters": {"allowed_domains": ["example.com"]}}])
        self.assertEqual(up["tool_choice"], {"type": "function", "name": short})
        self.assertIs(up["parallel_tool_calls"], False)
        self.assertEqual(up["input"][1]["name"], short)

    def test_tool_choice_table(self):
        tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
        for choice, expected in (({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                 ({"type": "none"}, "none"),
                                 ({"type": "tool", "name": "Bash"},
                                  {"type": "function", "name": "Bash"})):
            with self.subTest(choice=choice):
                up = to_responses(messages_body(tools=tools, tool_choice=choice))
                self.assertEqual(up["tool_choice"], expected)
                self.assertIs(up["parallel_tool_calls"], True)

    def test_thinking_budget_and_effort_to_reasoning(self):
        cases = [({"thinking": {"type": "enabled", "budget_tokens": 1024}},
                  {"effort": "low", "summary": "auto"}),
                 ({"thinking": {"type": "enabled", "budget_tokens": 10000}},
                  {"effort": "medium", "summary": "auto"}),
                 ({"thinking": {"type": "enabled", "budget_tokens": 31999}},
                  {"effort": "high", "summary": "auto"}),
                 ({"thinking": {"type": "enabled", "budget_tokens": 64000}},
                  {"effort": "xhigh", "summary": "auto"}),
                 ({"thinking": {"type": "adaptive", "display": "omitted"},
                   "output_config": {"effort": "medium"}}, {"effort": "medium"}),
                 ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}},
                  {"effort": "xhigh", "summary": "auto"}),
                 ({"thinking": {"type": "disabled"}}, None), ({}, None)]
        for extra, expected in cases:
            with self.subTest(extra=extra):
                self.assertEqual(to_responses(messages_body(**extra)).get("reasoning"),
                                 expected)

    def test_never_sent_fields_and_what_is_always_sent(self):
        up = to_responses(messages_body(
            metadata={"user_id": json.dumps({"device_id": "d", "session_id": "sess-1"})},
            context_management={"edits": []}, safeguards={"x": 1}, temperature=1,
            top_p=0.9, top_k=5, stop_sequences=["END"], stream=True, service_tier="auto",
            thinking={"type": "adaptive", "display": "omitted"},
            output_config={"effort": "high"}))
        self.assertEqual(sorted(up), ["include", "input", "model", "prompt_cache_key",
                                      "reasoning"])
        self.assertEqual(up["include"], ["reasoning.encrypted_content"])
        self.assertEqual(up["prompt_cache_key"], "sess-1")

    def test_prompt_cache_key_from_the_session(self):
        headers = {"x-claude-code-session-id": "6c1e-session"}
        self.assertEqual(to_responses(messages_body(), headers)["prompt_cache_key"],
                         "6c1e-session")
        agent = to_responses(messages_body(), dict(headers, **{
            "x-claude-code-agent-id": "agent-7"}))["prompt_cache_key"]
        self.assertNotIn(agent, ("6c1e-session", None))
        old_style = messages_body(metadata={"user_id": "user_abc_account__session_"
                                            "0b5f1a52-1c9e-4d7e-9c5a-2a3f4b5c6d7e"})
        self.assertEqual(to_responses(old_style)["prompt_cache_key"],
                         "0b5f1a52-1c9e-4d7e-9c5a-2a3f4b5c6d7e")
        self.assertNotIn("prompt_cache_key", to_responses(messages_body()))

    def test_bad_requests_are_400(self):
        for body in ({"model": CLAUDE}, {"model": CLAUDE, "messages": []},
                     messages_body("hi"),
                     {"messages": [{"role": "user", "content": "hi"}]},
                     messages_body([{"role": "tool", "content": "x"}]),
                     messages_body([{"role": "user", "content": 42}]),
                     messages_body(tools="Bash"), messages_body(tool_choice={"type": "maybe"}),
                     messages_body([{"role": "user", "content": [
                         {"type": "image", "source": {"type": "file", "file_id": "f"}}]}])):
            with self.subTest(body=body):
                with self.assertRaises(proxy.ProxyError) as caught:
                    to_responses(body)
                self.assertEqual(caught.exception.status, 400)
        with self.assertRaises(proxy.ProxyError):
            proxy.messages_stop_sequences({"stop_sequences": "END"})


class MessagesAnswerMappingTests(unittest.TestCase):
    """Responses events -> Messages events, pure."""

    def test_text_usage_and_the_collected_message(self):
        frames, stream = translate(text_events(["Hel", "lo!"]) + [completed()])
        self.assertEqual([e for e, _ in frames], [
            "content_block_start", "content_block_delta", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(text_of(frames), "Hello!")
        delta = frames[-2][1]
        self.assertEqual(delta["delta"], {"stop_reason": "end_turn", "stop_sequence": None})
        self.assertEqual(delta["usage"], {"input_tokens": 14, "cache_creation_input_tokens": 0,
                                          "cache_read_input_tokens": 7, "output_tokens": 5})
        message = stream.message()
        self.assertEqual(message["content"], [{"type": "text", "text": "Hello!"}])
        self.assertEqual(message["stop_reason"], "end_turn")
        start = parse_sse(stream.opening())[0]
        self.assertEqual(start[0], "message_start")
        self.assertEqual(start[1]["message"]["model"], CLAUDE)

    def test_reasoning_summary_is_thinking_signed_with_encrypted_content(self):
        frames, stream = translate(reasoning_events(["Think", "ing."]) +
                                   text_events(["Hi"], index=1) + [completed()])
        self.assertEqual(frames[0][1]["content_block"],
                         {"type": "thinking", "thinking": "", "signature": ""})
        deltas = [d["delta"] for e, d in frames if e == "content_block_delta"]
        self.assertEqual(deltas[:3], [
            {"type": "thinking_delta", "thinking": "Think"},
            {"type": "thinking_delta", "thinking": "ing."},
            {"type": "signature_delta",
             "signature": proxy.THINKING_SIGNATURE_PREFIX + "gAAAA-encrypted"}])
        thinking = stream.message()["content"][0]
        self.assertEqual(thinking["thinking"], "Thinking.")
        # ... and that block replayed is the reasoning item again: the round trip.
        item = proxy.reasoning_from_thinking(thinking)
        self.assertEqual(item["encrypted_content"], "gAAAA-encrypted")

    def test_reasoning_without_summary_deltas_still_carries_its_signature(self):
        events = [("response.output_item.done", {"output_index": 0, "item": reasoning_item()}),
                  completed()]
        frames, stream = translate(events)
        self.assertEqual(stream.message()["content"], [{
            "type": "thinking", "thinking": "Thinking about it.",
            "signature": proxy.THINKING_SIGNATURE_PREFIX + "gAAAA-encrypted"}])

    def test_arguments_only_in_done_reach_the_client_once(self):
        item = function_call_item(arguments='{"city":"Oslo"}')
        added = dict(item, arguments="", status="in_progress")
        for events in (
                [("response.output_item.added", {"output_index": 0, "item": added}),
                 ("response.function_call_arguments.done", {"output_index": 0,
                                                            "item_id": "fc_1",
                                                            "arguments": item["arguments"]}),
                 ("response.output_item.done", {"output_index": 0, "item": item})],
                [("response.output_item.added", {"output_index": 0, "item": added}),
                 ("response.output_item.done", {"output_index": 0, "item": item})],
                [("response.output_item.done", {"output_index": 0, "item": item})],
                call_events(['{"city"', ':"Oslo"}'])):
            with self.subTest(events=[e for e, _ in events]):
                frames, stream = translate(events + [completed()])
                self.assertEqual(json.loads(json_of(frames)), {"city": "Oslo"} if
                                 "Oslo" in json.dumps(events) else {"city": "Paris"})
                message = stream.message()
                self.assertEqual(message["stop_reason"], "tool_use")
                self.assertEqual(message["content"][0]["input"], json.loads(json_of(frames)))
                self.assertEqual(frames[0][1]["content_block"]["input"], {})

    def test_deltas_then_done_are_not_doubled(self):
        frames, _ = translate(call_events(['{"city": ', '"Paris"}']) + [completed()])
        self.assertEqual(json_of(frames), '{"city": "Paris"}')

    def test_long_tool_name_restored(self):
        long_name = "x" * 80
        short = proxy.shorten_tool_name(long_name)
        item = dict(function_call_item(), name=short)
        frames, stream = translate([("response.output_item.done", {"output_index": 0,
                                                                   "item": item})],
                                   tool_names={short: long_name})
        self.assertEqual(frames[0][1]["content_block"]["name"], long_name)

    def test_stop_sequence_across_deltas(self):
        frames, stream = translate(text_events(["The answer is 4", "2 E", "ND and more"]) +
                                   [completed()], stops=["2 END", "zzz"])
        self.assertEqual(text_of(frames), "The answer is 4")
        self.assertTrue(stream.stopped)
        self.assertEqual(frames[-2][1]["delta"], {"stop_reason": "stop_sequence",
                                                  "stop_sequence": "2 END"})
        self.assertEqual(frames[-1][0], "message_stop")
        self.assertEqual(stream.message()["content"][0]["text"], "The answer is 4")
        frames, stream = translate(text_events(["no match ", "here"]) + [completed()],
                                   stops=["here!"])
        self.assertEqual(text_of(frames), "no match here")
        self.assertFalse(stream.stopped)

    def test_stop_reasons(self):
        incomplete = ("response.incomplete", {"response": response_object(
            "incomplete", usage=USAGE, incomplete_details={"reason": "max_output_tokens"})})
        filtered = ("response.incomplete", {"response": response_object(
            "incomplete", usage=USAGE, incomplete_details={"reason": "content_filter"})})
        refusal = [("response.refusal.delta", {"output_index": 0, "delta": "I can't."})]
        for events, reason in ((text_events(["a"]) + [completed()], "end_turn"),
                               (call_events(["{}"]) + [completed()], "tool_use"),
                               (text_events(["a"]) + [incomplete], "max_tokens"),
                               ([filtered], "refusal"), (refusal + [completed()], "refusal")):
            with self.subTest(reason=reason):
                frames, stream = translate(events)
                self.assertEqual(stream.message()["stop_reason"], reason)

    def test_failure_mid_stream_is_an_anthropic_error_event(self):
        failed = ("response.failed", {"response": response_object(
            "failed", error={"code": "context_length_exceeded", "message": OVERFLOW})})
        frames, _ = translate(text_events(["par"])[:2] + [failed])
        self.assertEqual(frames[-1], ("error", {"type": "error", "error": {
            "type": "invalid_request_error", "message": OVERFLOW}}))
        self.assertEqual(frames[-2][0], "content_block_stop")

    def test_web_search_call_as_server_tool_blocks(self):
        item = {"type": "web_search_call", "id": "ws_1", "status": "completed",
                "action": {"type": "search", "query": "weather oslo",
                           "sources": [{"type": "url", "url": "https://yr.no"}]}}
        frames, stream = translate([("response.output_item.done", {"output_index": 0,
                                                                   "item": item})] +
                                   text_events(["Sunny."], index=1) + [completed()])
        content = stream.message()["content"]
        self.assertEqual([b["type"] for b in content],
                         ["server_tool_use", "web_search_tool_result", "text"])
        self.assertEqual(content[0]["input"], {"query": "weather oslo"})
        self.assertEqual(content[1]["content"][0]["url"], "https://yr.no")
        self.assertEqual(content[1]["tool_use_id"], content[0]["id"])
        self.assertEqual(stream.message()["stop_reason"], "end_turn")


class MessagesErrorAndModelTests(unittest.TestCase):
    def test_status_table(self):
        for status, code, expected_status, kind in (
                (400, None, 400, "invalid_request_error"), (401, None, 401,
                                                            "authentication_error"),
                (403, None, 403, "permission_error"), (404, None, 404, "not_found_error"),
                (413, None, 413, "request_too_large"), (429, None, 429, "rate_limit_error"),
                (500, None, 500, "api_error"), (503, "server_is_overloaded", 529,
                                                "overloaded_error"),
                (502, None, 502, "api_error"), (415, None, 415, "invalid_request_error")):
            with self.subTest(status=status):
                got, body, _ = proxy.anthropic_error(proxy.ProxyError(status, "m", code=code))
                self.assertEqual((got, body), (expected_status, {
                    "type": "error", "error": {"type": kind, "message": "m"}}))

    def test_context_overflow_keeps_the_backends_phrase(self):
        status, body, _ = proxy.anthropic_error(proxy.ProxyError(
            400, OVERFLOW, code="context_length_exceeded"))
        self.assertEqual((status, body["error"]["message"]), (400, OVERFLOW))
        status, body, _ = proxy.anthropic_error(proxy.ProxyError(
            500, "too many tokens", code="context_length_exceeded"))
        self.assertEqual(status, 400)
        self.assertIn("exceeds the context window", body["error"]["message"])

    def test_429_headers(self):
        usage_limit = proxy.ProxyError(429, "The usage limit has been reached.",
                                       type="usage_limit_reached",
                                       extra={"resets_in_seconds": 3599.2},
                                       headers=[("x-codex-primary-used-percent", "100")])
        _, _, headers = proxy.anthropic_error(usage_limit)
        self.assertEqual(headers, [("x-codex-primary-used-percent", "100"),
                                   ("retry-after", "3600"), ("x-should-retry", "false")])
        transient = proxy.ProxyError(429, "Rate limit reached. Please try again in 11.054s.",
                                     code="rate_limit_exceeded")
        _, _, headers = proxy.anthropic_error(transient)
        self.assertEqual(headers, [("retry-after", "12")])

    def test_default_models_from_the_backends_list(self):
        picked = proxy.pick_default_models(["gpt-5.1-codex", "gpt-5.5", "gpt-5.5-codex",
                                            "gpt-5.4-mini", "gpt-5.1-codex-mini"])
        self.assertEqual(picked, {proxy.STRONGEST_MODEL: "gpt-5.5",
                                  proxy.SMALL_MODEL: "gpt-5.4-mini"})
        self.assertEqual(proxy.pick_default_models(["gpt-5.9", "gpt-5.10", "gpt-5.10-mini"]),
                         {proxy.STRONGEST_MODEL: "gpt-5.10", proxy.SMALL_MODEL: "gpt-5.10-mini"})
        self.assertEqual(proxy.pick_default_models(["gpt-5.1-codex"])[proxy.SMALL_MODEL],
                         "gpt-5.1-codex")
        self.assertEqual(proxy.pick_default_models([]), proxy.FALLBACK_MODELS)

    def test_map_model(self):
        listed = lambda: ["gpt-5.5", "gpt-5.4-mini"]
        rules = (("claude-*haiku*", "gpt-5.1-codex-mini"), ("my-*", "gpt-5.1-codex")) + \
            proxy.DEFAULT_MODEL_RULES
        for name, expected in (("claude-haiku-5-5", "gpt-5.1-codex-mini"),
                               ("my-model", "gpt-5.1-codex"), ("claude-opus-5-5", "gpt-5.5"),
                               ("claude-sonnet-4-5-20250929", "gpt-5.5"),
                               ("claude-fable-9", "gpt-5.5"), ("haiku", "gpt-5.4-mini"),
                               ("gpt-5.1-codex", "gpt-5.1-codex"), (None, None)):
            with self.subTest(name=name):
                self.assertEqual(proxy.map_model(name, rules, listed), expected)
        self.assertEqual(proxy.map_model("gpt-5.5", proxy.DEFAULT_MODEL_RULES,
                                         lambda: self.fail("the list was asked for")),
                         "gpt-5.5")

    def test_model_map_argument(self):
        self.assertEqual(proxy.model_map_arg("claude-*=gpt-5.5"), ("claude-*", "gpt-5.5"))
        for bad in ("claude-*", "=gpt-5.5", "claude-*="):
            with self.assertRaises(Exception):
                proxy.model_map_arg(bad)
        config = proxy.parse_config(["--model-map", "a*=b", "--model-map", "c=d"])
        self.assertEqual(config.model_map, [("a*", "b"), ("c", "d")])


class MessagesRelayTests(unittest.TestCase):
    """The Messages translation reads most deltas from their bytes: what it relays is what
    the full parser gives, whatever the read and chunk boundaries."""

    def streams(self):
        pieces = ['Say "hi"', " back\\slash", " caf\u00e9 \u2028", " \U0001f600", "\n\n",
                  "end"]
        events = (reasoning_events(["Let me ", "think."]) +
                  call_events(['{"city"', ': "Oslo"}'], index=1) +
                  text_events(["word %d " % i for i in range(300)] + pieces, index=2) +
                  text_events(["second ", "item"], index=3, item_id="msg_2"))
        frames = [compact_sse(e, dict(p, sequence_number=i)) for i, (e, p) in enumerate(events)]
        final = response_object(usage=USAGE)
        yield "compact", frames + [compact_sse("response.completed", {"response": final})]
        ordered = [compact_sse(e, dict([("type", e), ("sequence_number", i)] + list(p.items())))
                   for i, (e, p) in enumerate(events)]
        yield "the backend's field order", ordered + [
            compact_sse("response.completed", {"response": final})]
        yield "spaced", [sse(e, p) for e, p in events] + [
            sse("response.completed", {"response": final})]
        yield "CRLF", [f.replace(b"\n", b"\r\n") for f in frames] + [
            compact_sse("response.completed", {"response": final})]

    def test_the_fast_path_relays_what_the_parser_gives_whatever_the_cuts(self):
        def transform(slow=False):
            made = proxy.MessagesTransform(proxy.MessagesStream(CLAUDE, None, (), True))
            if slow:
                made._fast = False  # every event decoded
            return made

        for name, frames in self.streams():
            body = event_chunked_body(frames)
            expected, _ = relay_pieces(body, iter([1 << 30]), lambda: transform(slow=True))
            self.assertEqual(text_of(parse_sse(expected)).count("word"), 300, name)
            rng = random.Random(name)
            for trial in range(12):
                cut = event_chunked_body(frames) if trial % 2 else chunked_body(
                    b"".join(frames), rng)
                reads = iter(lambda: rng.choice((1, 7, 100, 4096, 65536)), None)
                got, made = relay_pieces(cut, reads, transform)
                self.assertEqual(got, expected, "%s, trial %d" % (name, trial))
                self.assertEqual(made.assembler.terminal, "response.completed")

    def test_fast_path_used_for_the_backends_framing(self):
        frames = [compact_sse(e, p) for e, p in text_events(["a", "b", "c"])]
        made = proxy.MessagesTransform(proxy.MessagesStream(CLAUDE, None, (), True))
        with mock.patch.object(made, "_translate", wraps=made._translate) as slow:
            made.feed(b"".join(frames))
        self.assertEqual(slow.call_count, 3)  # added, the first delta (opens), done


class MessagesCase(ProxyTestCase):
    def messages(self, body, headers=None, path=MESSAGES):
        """(status, headers, JSON body) of a non-streamed request."""
        return self.post(dict(body, stream=False), headers, path=path)

    def messages_stream(self, body, headers=None, path=MESSAGES):
        """(status, headers, [(event, data)], raw) of a streamed request."""
        status, headers, data = self.request("POST", path, dict(body, stream=True), headers)
        return status, headers, parse_sse(data), data

    def assert_anthropic_error(self, status, body, expected_status, kind, contains=None):
        self.assertEqual(status, expected_status, body)
        self.assertEqual(sorted(body), ["error", "type"], body)
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], kind, body)
        if contains is not None:
            self.assertIn(contains, body["error"]["message"])


class MessagesEndpointTests(MessagesCase):
    def test_streamed_answer_with_event_lines_on_every_path(self):
        for path in (MESSAGES, MESSAGES + "?beta=true", "/messages?beta=true"):
            with self.subTest(path=path):
                status, headers, events, raw = self.messages_stream(messages_body(), path=path)
                self.assertEqual(status, 200, raw)
                self.assertTrue(headers["content-type"].startswith("text/event-stream"))
                for frame in raw.split(b"\n\n")[:-1]:
                    self.assertTrue(frame.startswith(b"event: "), frame)
                names = [e for e, _ in events]
                self.assertEqual(names[0], "message_start")
                self.assertEqual(names[-2:], ["message_delta", "message_stop"])
                self.assertEqual(text_of(events), "Hello there!")
                self.assertEqual(events[-2][1]["usage"]["output_tokens"], 5)
                self.assertEqual(events[0][1]["message"]["model"], CLAUDE)

    def test_non_streamed_answer(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[reasoning_item(), message_item("Fine.")])))
        status, _, body = self.messages(messages_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(body["type"], "message")
        self.assertEqual([b["type"] for b in body["content"]], ["thinking", "text"])
        self.assertEqual(body["content"][1]["text"], "Fine.")
        self.assertEqual(body["stop_reason"], "end_turn")
        self.assertEqual(body["usage"]["cache_read_input_tokens"], 7)

    def test_system_message_in_last_position_is_accepted(self):
        # The fake backend refuses role "system" as the real one does.
        status, _, events, raw = self.messages_stream(messages_body(
            [{"role": "user", "content": "hi"},
             {"role": "system", "content": "<system-reminder>Be kind.</system-reminder>"}],
            system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332"
                                             ".f00"}]))
        self.assertEqual(status, 200, raw)
        up = self.last_upstream()["body"]
        self.assertEqual(up["input"][-1]["role"], "developer")
        self.assertEqual(up["instructions"], proxy.DEFAULT_INSTRUCTIONS)
        self.assertNotIn("billing", self.last_upstream()["raw"].decode())

    def test_upstream_request_fields(self):
        status, _, body = self.messages(messages_body(
            metadata={"user_id": json.dumps({"session_id": "s-1"})}, temperature=0.3,
            top_p=0.5, top_k=3, context_management={"edits": []},
            thinking={"type": "adaptive"}, output_config={"effort": "low"}),
            {"X-Claude-Code-Session-Id": "sess-from-header", "anthropic-version": "2023-06-01"})
        self.assertEqual(status, 200, body)
        request = self.last_upstream()
        up = request["body"]
        self.assertEqual((up["stream"], up["store"]), (True, False))
        self.assertEqual(up["include"], ["reasoning.encrypted_content"])
        self.assertEqual(up["prompt_cache_key"], "sess-from-header")
        self.assertEqual(request["headers"].get("session_id"), "sess-from-header")
        self.assertEqual(up["reasoning"], {"effort": "low", "summary": "auto"})
        for name in ("metadata", "temperature", "top_p", "top_k", "context_management",
                     "max_tokens", "thinking", "output_config"):
            self.assertNotIn(name, up)
        self.assertEqual(len(self.backend.requests), 1)

    def test_signature_round_trip(self):
        self.backend.replies.append(Reply(frames=stream_frames(
            items=[reasoning_item(), function_call_item()])))
        status, _, events, raw = self.messages_stream(messages_body(
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]))
        self.assertEqual(status, 200, raw)
        blocks, inputs = {}, {}
        for name, data in events:  # the client's own accumulation, as the SDK does it
            if name == "content_block_start":
                blocks[data["index"]] = dict(data["content_block"])
            elif name == "content_block_delta":
                delta, block = data["delta"], blocks[data["index"]]
                if delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                elif delta["type"] == "signature_delta":
                    block["signature"] = delta["signature"]
                elif delta["type"] == "input_json_delta":
                    inputs[data["index"]] = inputs.get(data["index"], "") + \
                        delta["partial_json"]
        blocks[1]["input"] = json.loads(inputs[1])
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")
        status, _, body = self.messages(messages_body([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [blocks[0], blocks[1]]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                          "content": "sunny"}]}]))
        self.assertEqual(status, 200, body)
        sent = self.last_upstream()["body"]["input"]
        self.assertEqual(sent[1], {"type": "reasoning", "encrypted_content": "gAAAA-encrypted",
                                   "summary": [{"type": "summary_text",
                                                "text": "Thinking about it."}]})
        self.assertEqual(sent[2]["arguments"], '{"city":"Paris"}')

    def test_arguments_only_in_done_streamed_and_whole(self):
        item = function_call_item(arguments='{"city":"Oslo"}')
        frames = custom_frames([
            ("response.output_item.added", {"output_index": 0, "item": dict(
                item, arguments="", status="in_progress")}),
            ("response.function_call_arguments.done", {"output_index": 0, "item_id": "fc_1",
                                                       "arguments": item["arguments"]}),
            ("response.output_item.done", {"output_index": 0, "item": item})])
        self.backend.replies.extend([Reply(frames=frames), Reply(frames=frames)])
        status, _, events, raw = self.messages_stream(messages_body())
        self.assertEqual(status, 200, raw)
        self.assertEqual(json_of(events), '{"city":"Oslo"}')
        status, _, body = self.messages(messages_body())
        self.assertEqual(body["content"], [{"type": "tool_use", "id": "call_1",
                                            "name": "get_weather", "input": {"city": "Oslo"}}])

    def test_stop_sequence_across_deltas_cuts_the_upstream(self):
        # The backend keeps streaming: only a cut connection stops it before its end.
        events = text_events(["Count: 1, 2", ", ST", "OP, 3"] + ["more"] * 300)
        self.backend.replies.append(Reply(frames=custom_frames(events), delay=0.01))
        status, _, got, raw = self.messages_stream(messages_body(stop_sequences=["STOP"]))
        self.assertEqual(status, 200, raw)
        self.assertEqual(text_of(got), "Count: 1, 2, ")
        self.assertEqual(got[-2][1]["delta"], {"stop_reason": "stop_sequence",
                                               "stop_sequence": "STOP"})
        self.assertEqual(got[-1][0], "message_stop")
        self.assertTrue(self.backend.closed_early.wait(10), "the upstream was not cut")
        # ... and whole, the same
        self.backend.replies.append(Reply(frames=custom_frames(text_events(["a ST", "OP b"]))))
        status, _, body = self.messages(messages_body(stop_sequences=["STOP"]))
        self.assertEqual((body["content"][0]["text"], body["stop_reason"],
                          body["stop_sequence"]), ("a ", "stop_sequence", "STOP"))
        status, _, body = self.messages(messages_body())  # the proxy still serves
        self.assertEqual(status, 200, body)

    def test_context_overflow_is_400_invalid_request_keeping_the_phrase(self):
        failed = stream_frames(terminal="response.failed", items=[], terminal_extra={
            "error": {"code": "context_length_exceeded", "message": OVERFLOW}})
        self.backend.replies.extend([Reply(frames=failed), Reply(frames=failed),
                                     Reply(status=400, body=json.dumps(
                                         {"detail": OVERFLOW}).encode())])
        status, _, data = self.request("POST", MESSAGES, messages_body(stream=True))
        self.assert_anthropic_error(status, json.loads(data), 400, "invalid_request_error",
                                    OVERFLOW)
        status, _, body = self.messages(messages_body())
        self.assert_anthropic_error(status, body, 400, "invalid_request_error", OVERFLOW)
        status, _, body = self.messages(messages_body())
        self.assert_anthropic_error(status, body, 400, "invalid_request_error", OVERFLOW)

    def test_usage_limit_429_says_when_and_not_to_retry(self):
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "plan_type": "plus", "resets_in_seconds": 5400}}).encode(),
            headers=[("x-codex-primary-used-percent", "100")]))
        status, headers, body = self.messages(messages_body())
        self.assert_anthropic_error(status, body, 429, "rate_limit_error", "usage limit")
        self.assertEqual(headers["retry-after"], "5400")
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertEqual(len(self.backend.requests), 1, "a usage limit is not retried")

    def test_error_event_mid_stream_then_the_non_streamed_retry(self):
        # Claude Code answers an `event: error` by asking again with stream: false.
        frames = custom_frames(text_events(["Partial"]), terminal="response.failed",
                               terminal_extra={"error": {"code": "server_error",
                                                         "message": "Backend hiccup."}})
        self.backend.replies.extend([Reply(frames=frames), Reply(frames=stream_frames(
            items=[message_item("Whole answer.")]))])
        status, _, events, raw = self.messages_stream(messages_body())
        self.assertEqual(status, 200, raw)
        self.assertEqual(events[-1], ("error", {"type": "error", "error": {
            "type": "api_error", "message": "Backend hiccup."}}))
        self.assertNotIn("message_stop", [e for e, _ in events])
        status, _, body = self.messages(messages_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(body["content"], [{"type": "text", "text": "Whole answer."}])

    def test_a_broken_stream_after_content_ends_with_an_error_event(self):
        self.backend.replies.append(Reply(frames=stream_frames(), cut_after=4))
        status, _, events, raw = self.messages_stream(messages_body())
        self.assertEqual(status, 200, raw)
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(events[-1][1]["error"]["type"], "api_error")

    def test_ping_while_the_backend_is_silent(self):
        reply = Reply(frames=stream_frames(), hold_after=2)
        self.backend.replies.append(reply)
        with mock.patch.object(proxy, "MESSAGES_PING_INTERVAL", 0.05):
            conn = self.connection()
            conn.request("POST", MESSAGES, json.dumps(messages_body(stream=True)),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()  # the first ping opens the stream
            self.assertEqual(resp.status, 200)
            seen = b""
            while b"event: ping" not in seen:
                data = resp.read1(65536)
                self.assertTrue(data, seen)
                seen += data
            reply.go()
            rest = resp.read()
            conn.close()
        events = parse_sse(seen + rest)
        self.assertEqual(events[0][0], "message_start")
        self.assertEqual(events[1][0], "ping")
        self.assertEqual(text_of(events), "Hello there!")
        self.assertEqual(events[-1][0], "message_stop")

    def test_count_tokens_is_a_local_estimate(self):
        body = messages_body([{"role": "user", "content": "word " * 1000}],
                             system="Be brief.")
        status, _, answer = self.post(body, path=MESSAGES + "/count_tokens?beta=true")
        self.assertEqual(status, 200, answer)
        self.assertEqual(list(answer), ["input_tokens"])
        self.assertTrue(1000 < answer["input_tokens"] < 2000, answer)
        self.assertEqual(self.backend.requests, [])
        status, _, answer = self.post({"model": CLAUDE}, path="/messages/count_tokens")
        self.assert_anthropic_error(status, answer, 400, "invalid_request_error")

    def test_models_in_anthropics_shape_with_its_header_only(self):
        add_models_endpoint(self.backend)
        status, _, body = self.request("GET", "/v1/models?limit=1000",
                                       headers={"anthropic-version": "2023-06-01"})
        listing = json.loads(body)
        self.assertEqual(status, 200, listing)
        self.assertEqual([m["id"] for m in listing["data"]], ["gpt-5.1-codex",
                                                              "gpt-5-codex-mini"])
        self.assertEqual(listing["data"][0]["type"], "model")
        self.assertEqual((listing["has_more"], listing["first_id"], listing["last_id"]),
                         (False, "gpt-5.1-codex", "gpt-5-codex-mini"))
        for model in listing["data"]:
            self.assertEqual(sorted(model), ["created_at", "display_name", "id", "type"])
        listing = json.loads(self.request("GET", "/v1/models")[2])
        self.assertEqual(listing["object"], "list")

    def test_claude_names_go_to_the_backends_models_and_model_map_first(self):
        add_models_endpoint(self.backend)
        for name, expected in (("claude-opus-5-5", "gpt-5.1-codex"),
                               ("claude-haiku-5-5", "gpt-5-codex-mini"),
                               ("gpt-5-codex-mini", "gpt-5-codex-mini")):
            status, _, body = self.messages(messages_body(model=name))
            self.assertEqual(status, 200, body)
            self.assertEqual(body["model"], name)
            self.assertEqual(self.last_upstream()["body"]["model"], expected)
        self.assertEqual(len(self.backend.model_requests), 1, "the list is cached")
        self.wait_for_log("model=claude-opus-5-5->gpt-5.1-codex status=200")

    @with_proxy_options(model_map=[("claude-*haiku*", "gpt-5.1-codex"), ("big", "gpt-5.5")])
    def test_model_map_comes_before_the_backends_models_on_every_front_end(self):
        add_models_endpoint(self.backend)
        self.messages(messages_body(model="claude-haiku-5-5"))
        self.assertEqual(self.last_upstream()["body"]["model"], "gpt-5.1-codex")
        self.post(simple_request(model="big"))  # every front end: Responses too
        self.assertEqual(self.last_upstream()["body"]["model"], "gpt-5.5")
        self.post(chat_body(model="big"), path=CHAT)
        self.assertEqual(self.last_upstream()["body"]["model"], "gpt-5.5")

    @with_proxy_options(client_key="k-123")
    def test_errors_in_anthropics_shape_and_x_api_key(self):
        status, _, body = self.messages(messages_body())
        self.assert_anthropic_error(status, body, 401, "authentication_error")
        status, _, body = self.messages(messages_body(), {"x-api-key": "k-123"})
        self.assertEqual(status, 200, body)
        status, _, body = self.messages(messages_body(), {"Authorization": "Bearer k-123"})
        self.assertEqual(status, 200, body)
        status, _, body = self.post({"model": CLAUDE, "messages": "hi"},
                                    {"x-api-key": "k-123"}, path=MESSAGES)
        self.assert_anthropic_error(status, body, 400, "invalid_request_error")
        status, _, body = self.request("GET", MESSAGES, headers={"x-api-key": "k-123"})
        self.assert_anthropic_error(status, json.loads(body), 405, "invalid_request_error")
        status, _, body = self.post(simple_request(), {"x-api-key": "k-123"})
        self.assertEqual(status, 200, body)  # other routes keep OpenAI's shape
        status, _, body = self.post({"input": 1}, {"x-api-key": "k-123"})
        self.assert_openai_error(status, body, 400)

    @with_proxy_options(upstream_transport="ws")
    def test_over_the_backends_websocket(self):
        self.backend.ws.refuse = None
        first = messages_body([{"role": "user", "content": "hi"}], model=MODEL)
        status, _, body = self.messages(first, {"X-Claude-Code-Session-Id": "s-ws"})
        self.assertEqual(status, 200, body)
        second = dict(first, messages=first["messages"] + [
            {"role": "assistant", "content": body["content"]},
            {"role": "user", "content": "more"}])
        status, _, events, raw = self.messages_stream(second, {"X-Claude-Code-Session-Id":
                                                               "s-ws"})
        self.assertEqual(status, 200, raw)
        self.assertEqual(events[-1][0], "message_stop")
        self.assertEqual(len(self.backend.ws.handshakes), 1, "one socket for the conversation")
        chained = self.backend.ws.messages[-1][1]
        self.assertTrue(chained.get("previous_response_id"), chained)
        self.assertEqual(chained["input"], [user_item("more")])

    @with_proxy_options(api_key_header=API_KEY_HEADER)
    def test_api_key_mode_says_messages_need_the_login(self):
        status, _, body = self.messages(messages_body())
        self.assert_anthropic_error(status, body, 400, "invalid_request_error",
                                    "ChatGPT login")
        self.assertEqual(self.backend.requests, [])


# ============================================================================================
# Front end: images (/v1/images/generations and /v1/images/edits)
# ============================================================================================

class ImagesTests(ProxyTestCase):
    def generate(self, body, path="/v1/images/generations", headers=None):
        return self.post(body, headers, path=path)

    def edit_form(self, fields=(), files=(), path="/v1/images/edits", headers=None):
        body, ctype = form_body(fields, files)
        status, answer_headers, data = self.request("POST", path, body,
                                                    dict(headers or {}, **{"Content-Type": ctype}))
        return status, answer_headers, json.loads(data)

    def images_of(self, answer):
        return [base64.b64decode(d["b64_json"]).decode() for d in answer["data"]]

    def test_generation_reaches_the_backend_as_the_codex_cli_sends_it(self):
        status, headers, answer = self.generate({"prompt": "a red fox", "size": "1024x1536",
                                                 "response_format": "b64_json"})
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.images_of(answer), ["img:a red fox:0"])
        self.assertEqual((answer["created"], answer["output_format"], answer["size"]),
                         (1778832973, "png", "1024x1536"))
        self.assertEqual(headers.get("x-request-id"), "req-image")
        self.assertEqual(headers.get("x-codex-primary-used-percent"), "12.5")
        got = self.last_upstream()
        self.assertEqual(got["path"], "/backend-api/codex/images/generations")
        self.assertEqual(got["body"], {"prompt": "a red fox", "size": "1024x1536",
                                       "model": "gpt-image-2"})
        sent = got["headers"]
        self.assertEqual(sent.get("Authorization"), "Bearer " + self.token)
        self.assertEqual(sent.get("ChatGPT-Account-ID"), "acct-file")
        self.assertEqual(sent.get("originator"), "codex_cli_rs")
        self.assertEqual(sent.get("Accept"), "application/json")
        self.assertRegex(sent.get("x-codex-image-turn-id") or "", r"^[0-9a-f-]{36}$")
        self.assertIsNone(sent.get("x-codex-routing-hint"))
        quota = json.loads(self.request("GET", "/status")[2])["quota"]
        self.assertEqual(quota["primary"]["used_percent"], 12.5)

    def test_path_without_v1_model_and_turn_id_pass_on(self):
        status, _, answer = self.generate(
            {"prompt": "p", "model": "gpt-image-1.5", "n": 2, "background": "transparent"},
            "/images/generations", {"x-codex-image-turn-id": "turn-7"})
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.images_of(answer), ["img:p:0", "img:p:1"])
        got = self.last_upstream()
        self.assertEqual(got["body"]["model"], "gpt-image-1.5")
        self.assertEqual(got["headers"].get("x-codex-image-turn-id"), "turn-7")

    def test_multipart_edit_becomes_the_backends_json(self):
        status, _, answer = self.edit_form(
            [("prompt", "add a hat"), ("n", "2"), ("quality", "high")],
            [("image[]", "a.png", "image/png", PNG),
             ("image[]", "upload", "application/octet-stream", JPEG)])
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.images_of(answer), ["img:add a hat:0", "img:add a hat:1"])
        got = self.last_upstream()
        self.assertEqual(got["path"], "/backend-api/codex/images/edits")
        self.assertEqual(got["body"], {
            "prompt": "add a hat", "n": 2, "quality": "high", "model": "gpt-image-2",
            "images": [{"image_url": data_url("image/png", PNG)},
                       {"image_url": data_url("image/jpeg", JPEG)}]})
        status, _, answer = self.edit_form([("prompt", "p")],
                                           [("image", "a.png", "image/png", PNG)],
                                           path="/images/edits")
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.last_upstream()["body"]["images"],
                         [{"image_url": data_url("image/png", PNG)}])

    def test_json_edit_goes_as_it_is_with_a_model(self):
        edit = {"prompt": "fog", "images": [{"image_url": data_url("image/png", PNG)}],
                "mask": {"image_url": data_url("image/png", PNG)}}
        status, _, answer = self.post(edit, path="/v1/images/edits")
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.last_upstream()["body"], dict(edit, model="gpt-image-2"))

    def test_bad_requests_are_400_before_the_backend(self):
        status, _, answer = self.generate({"prompt": "p", "response_format": "url"})
        self.assert_openai_error(status, answer, 400, "unsupported_value", "base64")
        self.assertEqual(answer["error"]["param"], "response_format")
        status, _, answer = self.edit_form([("prompt", "p"), ("response_format", "url")],
                                           [("image", "a.png", "image/png", PNG)])
        self.assert_openai_error(status, answer, 400, "unsupported_value", "b64_json")
        status, _, answer = self.post({"prompt": "p"}, path="/v1/images/edits")
        self.assert_openai_error(status, answer, 400, "missing_required_parameter", "images")
        body, ctype = form_body([("prompt", "p")])
        status, _, data = self.request("POST", "/v1/images/edits", body[:-10],
                                       {"Content-Type": ctype})
        self.assert_openai_error(status, json.loads(data), 400, "invalid_multipart")
        status, _, data = self.request("POST", "/v1/images/generations", body,
                                       {"Content-Type": ctype})
        self.assert_openai_error(status, json.loads(data), 415, "unsupported_media_type")
        self.assertEqual(self.backend.requests, [])

    def test_a_web_page_cannot_post_a_form(self):
        # a form needs no CORS preflight: the Origin a browser adds is what refuses it
        status, _, answer = self.edit_form([("prompt", "p")],
                                           [("image", "a.png", "image/png", PNG)],
                                           headers={"Origin": "http://evil.example"})
        self.assert_openai_error(status, answer, 403, "origin_not_allowed")
        self.assertEqual(self.backend.requests, [])

    def test_rejected_parameter_is_dropped_and_remembered(self):
        self.backend.extra_rejected.add("moderation")
        for _ in range(2):
            status, _, answer = self.generate({"prompt": "p", "moderation": "low"})
            self.assertEqual(status, 200, answer)
        self.assertEqual(["moderation" in r["body"] for r in self.backend.requests],
                         [True, False, False])
        self.assertIn("rejects the parameter 'moderation'", self.log_text())
        self.backend.extra_rejected.add("mask")  # never dropped: the edit would mean another
        png = {"image_url": data_url("image/png", PNG)}
        status, _, answer = self.post({"prompt": "p", "images": [png], "mask": png},
                                      path="/v1/images/edits")
        self.assert_openai_error(status, answer, 400, contains="Unsupported parameter: mask")
        self.assertEqual(len(self.backend.requests), 4)

    def test_429_is_the_clients_with_its_quota_headers(self):
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "resets_in_seconds": 60}}).encode(), headers=[("x-codex-primary-used-percent", "100"),
                                                          ("Retry-After", "60")]))
        status, headers, answer = self.generate({"prompt": "p"})
        self.assert_openai_error(status, answer, 429, contains="usage limit")
        self.assertEqual(answer["error"]["type"], "usage_limit_reached")
        self.assertEqual((headers.get("retry-after"), headers.get("x-codex-primary-used-percent")),
                         ("60", "100"))
        self.assertEqual(len(self.backend.requests), 1, "a 429 is not retried")

    def test_401_is_retried_once_after_the_login_then_answered(self):
        self.backend.replies.extend([Reply(status=401, body=b'{"detail": "Unauthorized"}')] * 2)
        status, _, answer = self.generate({"prompt": "p"})
        self.assert_openai_error(status, answer, 401, contains="codex login")
        self.assertEqual(len(self.backend.requests), 2)
        status, _, answer = self.generate({"prompt": "p"})
        self.assertEqual(status, 200, answer)

    def test_an_answer_that_is_no_image_answer_is_502(self):
        for body in (b"<html>oops</html>", b'{"created": 1}', b"[]"):
            self.backend.replies.append(Reply(body=body))
            status, _, answer = self.generate({"prompt": "p"})
            self.assert_openai_error(status, answer, 502, "bad_upstream_answer")

    def test_status_counts_image_requests(self):
        self.assertEqual(self.generate({"prompt": "p"})[0], 200)
        self.assertEqual(self.generate({"prompt": "p", "response_format": "url"})[0], 400)
        self.wait_for_log("/v1/images/generations")
        requests = json.loads(self.request("GET", "/status")[2])["requests"]
        self.assertEqual((requests["total"], requests["by_status"]), (2, {"200": 1, "400": 1}))

    @with_proxy_options(api_key_header=API_KEY_HEADER, upstream_url=on_a_fake_platform)
    def test_api_key_mode_passes_the_form_to_the_platform(self):
        platform = self.platform
        body, ctype = form_body([("prompt", "p"), ("response_format", "url")],
                                [("image", "a.png", "image/png", PNG)])
        status, _, data = self.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
        self.assertEqual(status, 200, data)
        got = platform.requests[0]
        self.assertEqual((got["path"], got["raw"]), ("/v1/images/edits", body))
        headers = {k.lower(): v for k, v in got["headers"]}
        self.assertEqual((got["authorization"], headers["content-type"]),
                         (["Bearer " + API_KEY], ctype))
        self.assertEqual(self.request("POST", "/images/generations", {"prompt": "p"})[0], 200)
        self.assertEqual(platform.requests[1]["path"], "/v1/images/generations")


# ============================================================================================
# Front end: reasoning effort in a model name (gpt-5.5-high, gpt-5.5(high))
# ============================================================================================

EFFORT_MODELS = {"models": [
    {"slug": "gpt-5.5", "visibility": "list",
     "supported_reasoning_levels": [{"effort": e} for e in ("low", "medium", "high", "xhigh")]},
    # a listed name that looks like MODEL-EFFORT: never split
    {"slug": "gpt-5.5-high", "visibility": "list", "supported_reasoning_levels": []},
    {"slug": "gpt-5.1-codex-mini", "visibility": "list",
     "supported_reasoning_levels": [{"effort": "medium"}, {"effort": "high"}]},
    {"slug": "gpt-5.1-codex", "visibility": "hide",
     "supported_reasoning_levels": [{"effort": "low"}]},
    {"slug": "no-efforts", "visibility": "list"},
]}


class ModelEffortTests(unittest.TestCase):
    catalog = proxy.ModelCatalog(EFFORT_MODELS["models"], 1700000000)

    def split(self, model, **body):
        return proxy.model_with_effort(dict(body, model=model), lambda: self.catalog)

    def refused(self, model, *offered):
        with self.assertRaises(proxy.ProxyError) as cm:
            self.split(model)
        err = cm.exception
        self.assertEqual((err.status, err.param, err.code), (400, "model", "unsupported_value"))
        self.assertIn(repr(model.replace("(", "-").split("-")[-1].rstrip(")").lower()),
                      err.message)
        for effort in offered:
            self.assertIn(effort, err.message)
        return err.message

    def test_both_shapes_set_the_effort(self):
        for name, effort in (("gpt-5.5-xhigh", "xhigh"), ("gpt-5.5(low)", "low"),
                             ("gpt-5.5(High)", "high"), ("gpt-5.5 (medium)", "medium"),
                             ("gpt-5.1-codex-mini-high", "high"), ("gpt-5.1-codex-low", "low")):
            out = self.split(name, input="hi")
            self.assertEqual(out, {"model": name.split("(")[0].rsplit("-", 1)[0].strip()
                                   if "(" not in name else name.split("(")[0].strip(),
                                   "input": "hi", "reasoning": {"effort": effort}}, name)

    def test_a_listed_name_is_never_split(self):
        for name in ("gpt-5.5-high", "gpt-5.1-codex-mini", "gpt-5.1-codex"):
            body = {"model": name}
            self.assertIs(proxy.model_with_effort(body, lambda: self.catalog), body)

    def test_names_of_no_effort_shape_do_not_ask_for_the_list(self):
        def no_catalog():
            raise AssertionError("the model list was asked for")
        for name in ("gpt-5.1-codex", "gpt-5.1-codex-max", "gpt-5.5-ultra", "o3", None, 5,
                     "gpt-5.5-"):
            body = {"model": name}
            self.assertIs(proxy.model_with_effort(body, no_catalog), body)

    def test_an_unknown_model_goes_as_it_is_for_the_backend_to_judge(self):
        for name in ("gpt-9-high", "gpt-9(low)"):
            body = {"model": name}
            self.assertIs(proxy.model_with_effort(body, lambda: self.catalog), body)
            self.assertIs(proxy.model_with_effort(body, lambda: None), body)

    def test_an_effort_the_model_does_not_offer_is_400_naming_those_it_does(self):
        self.refused("gpt-5.5-minimal", "low, medium, high, xhigh")
        self.refused("gpt-5.5(ultra)", "low, medium, high, xhigh")
        self.refused("gpt-5.1-codex-mini-low", "medium, high")
        self.assertIn("none", self.refused("no-efforts-high"))

    def test_effort_set_twice_the_request_keeps_its_own(self):
        out = self.split("gpt-5.5-high", reasoning={"effort": "low", "summary": "auto"})
        self.assertEqual(out["model"], "gpt-5.5-high")  # listed: not split at all
        out = self.split("gpt-5.5(high)", reasoning={"effort": "low", "summary": "auto"})
        self.assertEqual(out, {"model": "gpt-5.5",
                               "reasoning": {"effort": "low", "summary": "auto"}})
        out = self.split("gpt-5.5-xhigh", reasoning={"summary": "auto", "effort": None})
        self.assertEqual(out["reasoning"], {"summary": "auto", "effort": "xhigh"})
        original = {"summary": "auto"}
        out = self.split("gpt-5.5-xhigh", reasoning=original)
        self.assertEqual((out["reasoning"], original),
                         ({"summary": "auto", "effort": "xhigh"}, {"summary": "auto"}))

    def test_model_list_with_and_without_effort_variants(self):
        plain = self.catalog.openai_list()
        self.assertEqual([m["id"] for m in plain["data"]],
                         ["gpt-5.5", "gpt-5.5-high", "gpt-5.1-codex-mini", "no-efforts"])
        self.assertEqual(plain["data"][0], {"id": "gpt-5.5", "object": "model",
                                            "created": 1700000000, "owned_by": "openai"})
        ids = [m["id"] for m in self.catalog.openai_list(with_efforts=True)["data"]]
        self.assertEqual(ids, ["gpt-5.5", "gpt-5.5-low", "gpt-5.5-medium", "gpt-5.5-xhigh",
                               "gpt-5.5-high", "gpt-5.1-codex-mini", "gpt-5.1-codex-mini-medium",
                               "gpt-5.1-codex-mini-high", "no-efforts"])


class EffortInModelNameTests(ProxyTestCase):
    """The name's effort on each front end, with the backend's model list behind it."""

    def setUp(self):
        super().setUp()
        add_models_endpoint(self.backend)
        self.backend.models_doc = EFFORT_MODELS

    def test_responses_front_end(self):
        status, _, body = self.post(simple_request(model="gpt-5.5-xhigh"))
        self.assertEqual(status, 200, body)
        sent = self.last_upstream()["body"]
        self.assertEqual((sent["model"], sent["reasoning"]), ("gpt-5.5", {"effort": "xhigh"}))
        self.assertEqual(self.last_upstream()["headers"].get("x-codex-routing-hint"),
                         "model=gpt-5.5")
        status, _, body = self.post(simple_request(model="gpt-5.5(low)",
                                                   reasoning={"effort": "high"}))
        self.assertEqual(status, 200, body)
        sent = self.last_upstream()["body"]
        self.assertEqual((sent["model"], sent["reasoning"]), ("gpt-5.5", {"effort": "high"}))
        self.assertEqual(len(self.backend.model_requests), 1, "the list is cached")

    def test_chat_completions_front_end(self):
        status, _, body = self.post(chat_body(model="gpt-5.1-codex-mini-high"), path=CHAT)
        self.assertEqual(status, 200, body)
        sent = self.last_upstream()["body"]
        self.assertEqual((sent["model"], sent["reasoning"]),
                         ("gpt-5.1-codex-mini", {"effort": "high"}))
        status, _, body = self.post(chat_body(model="gpt-5.5(high)", reasoning_effort="low"),
                                    path=CHAT)
        self.assertEqual(status, 200, body)
        sent = self.last_upstream()["body"]
        self.assertEqual((sent["model"], sent["reasoning"]["effort"]), ("gpt-5.5", "low"))

    def test_listed_names_and_plain_names_go_as_they_are(self):
        self.assertEqual(self.post(simple_request(model="gpt-5.5-high"))[0], 200)
        self.assertEqual(self.last_upstream()["body"]["model"], "gpt-5.5-high")
        self.assertNotIn("reasoning", self.last_upstream()["body"])
        self.assertEqual(self.post(chat_body(model="gpt-5.1-codex-mini"), path=CHAT)[0], 200)
        self.assertEqual(self.last_upstream()["body"]["model"], "gpt-5.1-codex-mini")
        self.assertEqual(len(self.backend.model_requests), 1)

    def test_an_unknown_effort_is_400_before_the_backend(self):
        for path, body in (("/v1/responses", simple_request(model="gpt-5.5-minimal")),
                           (CHAT, chat_body(model="gpt-5.5(turbo)"))):
            status, _, answer = self.post(body, path=path)
            self.assert_openai_error(status, answer, 400, "unsupported_value",
                                     "low, medium, high, xhigh")
            self.assertEqual(answer["error"]["param"], "model")
        self.assertEqual(self.backend.requests, [])

    def test_without_a_model_list_the_name_goes_as_it_is(self):
        self.backend.models_failure = (500, {"detail": "Internal Server Error"})
        status, _, body = self.post(simple_request(model="gpt-5.5-high"))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["body"]["model"], "gpt-5.5-high")
        self.assertIn("sent as they are", self.wait_for_log("model list"))

    def test_models_list_no_effort_variants_unless_asked(self):
        ids = [m["id"] for m in json.loads(self.request("GET", "/v1/models")[2])["data"]]
        self.assertNotIn("gpt-5.5-low", ids)

    @with_proxy_options(list_effort_models=True)
    def test_models_list_effort_variants_when_asked(self):
        ids = [m["id"] for m in json.loads(self.request("GET", "/v1/models")[2])["data"]]
        self.assertIn("gpt-5.5-low", ids)
        self.assertEqual(ids.count("gpt-5.5-high"), 1)
        self.assertIn("gpt-5.1-codex-mini-medium", ids)

    def test_the_flag_is_on_the_command_line(self):
        self.assertTrue(proxy.parse_config(["--list-effort-models"]).list_effort_models)
        self.assertFalse(proxy.parse_config([]).list_effort_models)

    def test_messages_front_end_the_names_effort_beats_claude_codes(self):
        # Claude Code 2.1.332 sends output_config.effort on every request, chosen or not
        for name, sent_effort, expected in (("gpt-5.5-low", "high", ("gpt-5.5", "low")),
                                            ("gpt-5.5(xhigh)", "medium", ("gpt-5.5", "xhigh")),
                                            ("gpt-5.5", "low", ("gpt-5.5", "low"))):
            status, _, body = self.post(messages_body(
                model=name, output_config={"effort": sent_effort},
                thinking={"type": "adaptive"}), path=MESSAGES)
            self.assertEqual(status, 200, body)
            sent = self.last_upstream()["body"]
            self.assertEqual((sent["model"], sent["reasoning"]["effort"]), expected)
            self.assertEqual(sent["reasoning"]["summary"], "auto")
        self.stop_proxy(self.proxy)
        self.start_proxy(model_map=[("claude-*", "gpt-5.5(xhigh)")])
        status, _, body = self.post(messages_body(output_config={"effort": "medium"}),
                                    path=MESSAGES)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["model"], CLAUDE)
        sent = self.last_upstream()["body"]
        self.assertEqual((sent["model"], sent["reasoning"]), ("gpt-5.5", {"effort": "xhigh"}))
        status, _, body = self.post(messages_body(model="gpt-5.5-minimal", output_config={
            "effort": "high"}), path=MESSAGES)
        self.assertEqual(status, 400, body)
        self.assertEqual(body["type"], "error")
        self.assertIn("low, medium, high, xhigh", body["error"]["message"])

    def test_the_log_and_status_count_the_model_the_backend_got(self):
        self.assertEqual(self.post(simple_request(model="gpt-5.5-xhigh"))[0], 200)
        self.wait_for_log("model=gpt-5.5-xhigh->gpt-5.5 status=200")
        self.assertEqual(self.post(chat_body(model="gpt-5.5(low)"), path=CHAT)[0], 200)
        self.wait_for_log("model=gpt-5.5(low)->gpt-5.5 status=200")
        self.assertEqual(self.post(simple_request(model="gpt-5.5"))[0], 200)
        self.wait_for_log("model=gpt-5.5 status=200")
        ws = WSClient(self.port, "/v1/responses")
        self.addCleanup(ws.close_socket)
        ws.create(model="gpt-5.5(high)")
        while ws.recv_event()["type"] != "response.completed":
            pass
        self.wait_for_log("WS /v1/responses model=gpt-5.5(high)->gpt-5.5 status=200")
        status = json.loads(self.request("GET", "/status")[2])
        self.assertEqual(list(status["tokens_by_model"]), ["gpt-5.5"])
        self.assertEqual(status["tokens_by_model"]["gpt-5.5"]["requests"], 4)


# ============================================================================================
# Upstream: credentials and refresh
# ============================================================================================

class CredentialUnitTests(unittest.TestCase):
    def test_account_id_order(self):
        doc = auth_document(access=access_token(account="a-access"), account_id="a-file")
        self.assertEqual(proxy.Credentials(doc).account_id, "a-file")
        doc["tokens"]["account_id"] = None
        self.assertEqual(proxy.Credentials(doc).account_id, "acct-from-id")
        doc["tokens"]["id_token"] = "not-a-jwt"
        self.assertEqual(proxy.Credentials(doc).account_id, "a-access")

    def test_needs_refresh_rules(self):
        now = time.time()
        self.assertFalse(proxy.Credentials(auth_document(access=access_token(3600)))
                         .needs_refresh(now))
        self.assertTrue(proxy.Credentials(auth_document(access=access_token(30)))
                        .needs_refresh(now))
        old = auth_document(access=access_token(None), last_refresh="2020-01-01T00:00:00Z")
        self.assertTrue(proxy.Credentials(old).needs_refresh(now))
        recent = auth_document(access=access_token(None), last_refresh=proxy.rfc3339_now())
        self.assertFalse(proxy.Credentials(recent).needs_refresh(now))

    def test_needs_refresh_boundaries(self):
        # A token is renewed a minute before its `exp`; one without `exp` 8 days after
        # last_refresh (the Codex CLI's rules).
        now = time.time()
        for exp_in, expected in ((90, False), (50, True)):
            with self.subTest(exp_in=exp_in):
                creds = proxy.Credentials(auth_document(access=access_token(exp_in)))
                self.assertEqual(creds.needs_refresh(now), expected)

        def days_ago(days):
            when = datetime.datetime.fromtimestamp(now - days * 86400, datetime.timezone.utc)
            return when.strftime("%Y-%m-%dT%H:%M:%SZ")

        for days, expected in ((7, False), (9, True)):
            with self.subTest(last_refresh_days_ago=days):
                doc = auth_document(access=access_token(None), last_refresh=days_ago(days))
                self.assertEqual(proxy.Credentials(doc).needs_refresh(now), expected)

    def test_rfc3339(self):
        self.assertEqual(proxy.parse_rfc3339("2026-01-02T03:04:05.123456789Z").microsecond, 123456)
        self.assertIsNotNone(proxy.parse_rfc3339("2026-01-02T03:04:05+02:00"))
        self.assertIsNone(proxy.parse_rfc3339("yesterday"))


class CredentialTests(ProxyTestCase):
    auth = False

    def test_missing_file(self):
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, contains="codex login")
        self.assertIn(os.path.join(self.home, "auth.json"), body["error"]["message"])
        self.assertIn('cli_auth_credentials_store = "file"', body["error"]["message"])
        self.assertEqual(self.request("GET", "/healthz")[0], 200)

    def test_bad_files(self):
        path = os.path.join(self.home, "auth.json")
        cases = [(b"{broken", "not valid JSON"), (b"[]", "JSON object"),
                 (json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x"}).encode(),
                  "API-key login"),
                 (json.dumps({"auth_mode": "chatgpt"}).encode(), "no ChatGPT tokens")]
        for content, phrase in cases:
            with open(path, "wb") as f:
                f.write(content)
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, 401, contains=phrase)
            self.assertIn("codex login", body["error"]["message"])
        # a directory in its place cannot be read even by root, who CI runs as
        os.remove(path)
        os.mkdir(path)
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, contains="Cannot read")
        self.assertIn(path, body["error"]["message"])
        os.rmdir(path)
        if os.geteuid() != 0:
            write_auth(self.home, auth_document(), mode=0)
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, 401, contains="Cannot read")

    def test_login_appearing_later_is_picked_up(self):
        self.assertEqual(self.post(simple_request())[0], 401)
        token = access_token()
        self.backend.valid_tokens.add(token)
        write_auth(self.home, auth_document(access=token))
        self.assertEqual(self.post(simple_request())[0], 200)


class RefreshTests(ProxyTestCase):
    expired_auth_extra = {"future_key": {"kept": True}}  # a key a newer Codex CLI may add

    def test_expired_token_is_refreshed_and_written_back_atomically(self):
        before = self.expire()
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        sent = self.oauth.requests[0]["body"]
        self.assertEqual(sent, {"client_id": proxy.OAUTH_CLIENT_ID,
                                "grant_type": "refresh_token",
                                "refresh_token": before["tokens"]["refresh_token"],
                                "refresh_reason": "proactive_expiry"})
        after = read_auth(self.home)
        self.assertEqual(after["tokens"]["refresh_token"], self.oauth.current_refresh)
        self.assertEqual(after["future_key"], {"kept": True})
        self.assertEqual(after["tokens"]["account_id"], "acct-file")
        self.assertNotEqual(after["last_refresh"], before["last_refresh"])
        self.assertIsNotNone(proxy.parse_rfc3339(after["last_refresh"]))
        mode = stat.S_IMODE(os.stat(os.path.join(self.home, "auth.json")).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual([n for n in os.listdir(self.home) if n.endswith(".tmp")], [])
        self.assertEqual(self.last_upstream()["headers"]["Authorization"],
                         "Bearer " + after["tokens"]["access_token"])

    def test_twenty_concurrent_requests_cause_one_refresh(self):
        self.expire()
        self.oauth.delay = 0.3
        results = []

        def one():
            results.append(self.post(simple_request())[0])

        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(results, [200] * 20)
        self.assertEqual(self.oauth.count, 1)

    def test_waiters_share_a_failed_refresh_instead_of_queueing_retries(self):
        self.expire()
        self.oauth.failure = (503, {"error": "temporarily_unavailable"})
        self.oauth.delay = 1.2
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda _: self.post(simple_request())[0], range(10)))
        self.assertEqual(statuses, [502] * 10)
        self.assertEqual(self.oauth.count, 1)
        # ten in a queue would take 12 s; shared, one 1.2 s refresh, with room for the load
        self.assertLess(time.monotonic() - started, 10.0)
        self.oauth.failure = None  # and the next request tries again
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertEqual(self.oauth.count, 2)

    def test_unwritable_codex_home_does_not_use_up_the_refresh_token(self):
        before = self.expire()

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        with mock.patch.object(proxy.tempfile, "mkstemp", refuse):
            status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 500, code="codex_home_not_writable",
                                 contains="not writable")
        self.assertEqual(self.oauth.count, 0, "the refresh token was redeemed anyway")
        self.assertEqual(read_auth(self.home)["tokens"], before["tokens"])

    def test_waiters_take_fresh_tokens_on_disk_over_a_failed_refresh(self):
        self.expire()
        self.oauth.failure = (503, {"error": "temporarily_unavailable"})
        fresh = access_token()
        self.backend.valid_tokens.add(fresh)
        answer = self.oauth.answer

        def cli_refreshes_meanwhile(headers, raw):
            time.sleep(0.5)  # the other requests queue up behind this refresh
            # the Codex CLI refreshes while our own attempt is failing: on disk before the
            # failure is answered, whatever the machine's load
            write_auth(self.home, auth_document(access=fresh))
            return answer(headers, raw)

        self.oauth.answer = cli_refreshes_meanwhile
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            statuses = sorted(pool.map(lambda _: self.post(simple_request())[0], range(5)))
        self.assertEqual(statuses.count(200), 4, statuses)

    def test_backend_401_refreshes_and_retries_once(self):
        self.backend.valid_tokens.clear()  # the token in the file is revoked
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        self.assertEqual(len(self.backend.requests), 2)

    def test_backend_401_twice_gives_401_without_loop(self):
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        self.backend.valid_tokens.clear()
        self.backend.check = lambda headers, body: (401, "Unauthorized")
        status, _, body = self.post(simple_request())
        # the same code as over the backend's WebSocket (one retry policy for both)
        self.assert_openai_error(status, body, 401, code="invalid_api_key", contains="codex login")
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.oauth.count, 1)

    def test_401_uses_token_another_process_already_wrote(self):
        self.backend.valid_tokens.clear()
        fresh = access_token()
        self.backend.valid_tokens.add(fresh)
        original_check = self.backend.check

        def check(headers, body):
            # the Codex CLI refreshes between our request and the 401
            if read_auth(self.home)["tokens"]["access_token"] != fresh:
                write_auth(self.home, auth_document(access=fresh, refresh="rt-cli"))
            return original_check(headers, body)

        self.backend.check = check
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 0)

    def test_permanent_refresh_failures_are_401_with_reason(self):
        for code in ("refresh_token_expired", "refresh_token_invalidated"):
            self.expire()
            self.oauth.failure = (400, {"error": {"code": code, "message": "nope"}})
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, 401, code=code, contains="codex login")
        self.expire()
        self.oauth.failure = (401, {"error": "invalid_grant"})
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, contains="codex login")

    def test_transient_refresh_failure_is_502_and_next_request_retries(self):
        before = self.expire()
        self.oauth.failure = (503, {"error": "temporarily_unavailable"})
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 502, code="token_refresh_failed")
        self.assertEqual(read_auth(self.home)["tokens"], before["tokens"])
        self.oauth.failure = None
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)

    def test_refresh_token_reused_after_cli_rotated(self):
        before = self.expire()
        cli_access = access_token()
        self.backend.valid_tokens.add(cli_access)

        def answer(headers, raw):
            # The Codex CLI redeemed the same refresh token a moment ago and saved its result.
            write_auth(self.home, auth_document(access=cli_access, refresh="rt-cli-new"))
            self.oauth.requests.append({"body": json.loads(raw)})
            return 400, {"error": {"code": "refresh_token_reused"}}

        self.oauth.answer = answer
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.last_upstream()["headers"]["Authorization"], "Bearer " + cli_access)
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"], "rt-cli-new")
        self.assertNotEqual(before["tokens"]["refresh_token"], "rt-cli-new")

    def test_refresh_token_reused_for_real_is_401(self):
        self.expire()
        self.oauth.current_refresh = "someone-elses"
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, code="refresh_token_reused",
                                 contains="codex login")

    def test_token_without_exp_refreshed_after_eight_days(self):
        token = access_token(None)
        self.backend.valid_tokens.add(token)
        write_auth(self.home, auth_document(access=token, last_refresh="2026-01-01T00:00:00Z"))
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertEqual(self.oauth.count, 1)

    def test_hot_path_does_not_reparse_unchanged_file(self):
        calls = []
        original = proxy.read_auth_file

        def counting(path):
            calls.append(path)
            return original(path)

        proxy.read_auth_file = counting
        self.addCleanup(setattr, proxy, "read_auth_file", original)
        for _ in range(5):
            self.assertEqual(self.post(simple_request())[0], 200)
        self.assertLessEqual(len(calls), 1)


class FedrampHeaderTests(ProxyTestCase):
    def test_the_header_follows_the_id_token_claim(self):
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertNotIn("X-OpenAI-Fedramp", self.last_upstream()["headers"])
        doc = auth_document(access=self.token)
        doc["tokens"]["id_token"] = login_id_token(fedramp=True)
        write_auth(self.home, doc)
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertEqual(self.last_upstream()["headers"]["X-OpenAI-Fedramp"], "true")

    def test_codex_cli_0171_keys_survive_a_refresh(self):
        doc = auth_document(access=access_token(-10))
        doc["tokens"]["oauth_provenance"] = {"issuer": "https://auth.openai.com",
                                             "client_id": proxy.OAUTH_CLIENT_ID}
        doc["tokens"]["login_owner_id"] = "owner-1"
        write_auth(self.home, doc)
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        self.assertEqual(self.post(simple_request())[0], 200)
        after = read_auth(self.home)
        self.assertEqual(after["tokens"]["refresh_token"], self.oauth.current_refresh)
        self.assertEqual(after["tokens"]["oauth_provenance"], doc["tokens"]["oauth_provenance"])
        self.assertEqual(after["tokens"]["login_owner_id"], "owner-1")


class CrossProcessRefreshTests(ProcessTestCase):
    def test_two_processes_ten_requests_one_refresh(self):
        before = self.write_expired_auth()
        self.oauth.delay = 0.5
        env = clean_env(CODEX_REFRESH_TOKEN_URL_OVERRIDE=self.oauth.url)
        procs = [self.spawn("--port", "0", "--codex-home", self.home, env=env)
                 for _ in range(2)]
        results = []
        lock = threading.Lock()

        def one(p):
            try:
                status, _, data = p.post(simple_request(), timeout=20)
            except Exception as e:
                status, data = None, repr(e).encode()
            with lock:
                results.append((status, data))

        threads = [threading.Thread(target=one, args=(p,)) for p in procs for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual([s for s, _ in results], [200] * 10, results)
        self.assertFalse([d for _, d in results if b"refresh_token_reused" in d])
        self.assertEqual(self.oauth.count, 1, [r["body"] for r in self.oauth.requests])
        after = read_auth(self.home)
        self.assertEqual(after["tokens"]["refresh_token"], self.oauth.current_refresh)
        self.assertNotEqual(after["tokens"]["refresh_token"], before["tokens"]["refresh_token"])
        self.assertIn(after["tokens"]["access_token"], self.backend.valid_tokens)
        self.assertFalse(proxy.Credentials(after).needs_refresh())
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.home, "auth.json")).st_mode),
                         0o600)
        for p in procs:
            self.assertNotIn("token refresh failed", p.text())


# --------------------------------------------------------------------------------------------
# Upstream: living beside the Codex CLI (its rewrites, its locks, dead logins, atomic writes)
# --------------------------------------------------------------------------------------------

def try_flock(path):
    """True if an exclusive flock on path can be had at once, as the Codex CLI tries for
    auth.json.lock (released again straight away)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        proxy.fcntl.flock(fd, proxy.fcntl.LOCK_EX | proxy.fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class CliCoexistenceCase(ProxyTestCase):
    def auth_path(self):
        return os.path.join(self.home, "auth.json")


class AuthFileMidRewriteTests(CliCoexistenceCase):
    """Some Codex CLIs rewrite auth.json in place: truncate, then write."""

    def rewrite_in_place_during_request(self, first_content):
        """The proxy's first read finds the rewrite half done; the rewrite ends just before
        its next read, however soon that comes."""
        path = self.auth_path()
        full = json.dumps(auth_document(access=self.token), indent=2).encode()
        with open(path, "wb") as f:
            f.write(first_content(full))
        reads = []
        real_open = open

        def tracking_open(file, *args, **kwargs):
            if file == path:
                reads.append(file)
                if len(reads) == 2:
                    with real_open(path, "r+b") as f:
                        f.write(full)
            return real_open(file, *args, **kwargs)

        with mock.patch.object(proxy, "open", tracking_open, create=True):
            status, _, body = self.post(simple_request())
        return status, body, reads

    def test_empty_auth_json_is_read_again_instead_of_401(self):
        status, body, reads = self.rewrite_in_place_during_request(lambda full: b"")
        self.assertEqual(status, 200, body)
        self.assertGreaterEqual(len(reads), 2, "the empty file was never seen")
        self.assertEqual(self.last_upstream()["headers"]["Authorization"], "Bearer " + self.token)

    def test_half_written_auth_json_is_read_again_instead_of_401(self):
        status, body, reads = self.rewrite_in_place_during_request(
            lambda full: full[:len(full) // 2])
        self.assertEqual(status, 200, body)
        self.assertGreaterEqual(len(reads), 2, "the half-written file was never seen")

    def test_auth_json_that_stays_empty_is_401_that_says_so(self):
        with open(self.auth_path(), "wb"):
            pass
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, contains="is empty")
        self.assertIn("codex login", body["error"]["message"])
        self.assertIn(self.auth_path(), body["error"]["message"])


@unittest.skipIf(proxy.fcntl is None, "no flock on this platform")
class LockProtocolTests(CliCoexistenceCase):
    """The Codex CLI's locks (docs/backend.md §2), taken the way it takes them."""

    def test_refresh_waits_for_cli_holding_auth_lock_and_uses_its_tokens(self):
        self.expire()
        lock_path = os.path.join(self.home, "auth.lock")
        cli_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, cli_fd)
        proxy.fcntl.flock(cli_fd, proxy.fcntl.LOCK_EX)  # the CLI is mid-refresh
        lock_ino = os.fstat(cli_fd).st_ino
        waiting = threading.Event()
        real_flock = proxy.fcntl.flock

        def flock(fd, op):
            try:
                return real_flock(fd, op)
            except OSError:
                if os.fstat(fd).st_ino == lock_ino:
                    waiting.set()  # the proxy is waiting for the CLI
                raise

        result = {}
        client = threading.Thread(target=lambda: result.update(
            answer=self.post(simple_request())), daemon=True)
        with mock.patch.object(proxy.fcntl, "flock", flock):
            client.start()
            waiting.wait(5)
            cli_access = access_token()
            self.backend.valid_tokens.add(cli_access)
            write_auth(self.home, auth_document(access=cli_access, refresh="rt-cli-saved"))
            real_flock(cli_fd, proxy.fcntl.LOCK_UN)
            client.join(15)
        status, _, body = result["answer"]
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 0, "the proxy redeemed the token the CLI was redeeming")
        self.assertEqual(self.last_upstream()["headers"]["Authorization"], "Bearer " + cli_access)
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"], "rt-cli-saved")

    def test_auth_lock_held_through_the_refresh_and_auth_json_lock_left_free(self):
        self.expire()
        during = {}
        original = self.oauth.answer

        def answer(headers, raw):
            # What a Codex CLI that wants to refresh or save right now would find.
            during["auth.lock free"] = try_flock(os.path.join(self.home, "auth.lock"))
            during["auth.json.lock free"] = try_flock(self.auth_path() + ".lock")
            return original(headers, raw)

        self.oauth.answer = answer
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(during, {"auth.lock free": False, "auth.json.lock free": True})
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"],
                         self.oauth.current_refresh)

    def test_refresh_reason_after_401_is_unauthorized_recovery(self):
        self.backend.valid_tokens.clear()
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual([r["body"].get("refresh_reason") for r in self.oauth.requests],
                         ["unauthorized_recovery"])


class SymlinkedAuthFileTests(CliCoexistenceCase):
    def test_refresh_writes_through_a_symlinked_auth_json(self):
        target_dir = tempfile.mkdtemp(prefix="codex-real-")
        self.addCleanup(shutil.rmtree, target_dir, True)
        doc = auth_document(access=access_token(-10))
        target = write_auth(target_dir, doc)
        link = self.auth_path()
        os.unlink(link)
        os.symlink(target, link)
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertTrue(os.path.islink(link), "the symlink was replaced by a plain file")
        self.assertEqual(os.readlink(link), target)
        self.assertEqual(read_auth(target_dir)["tokens"]["refresh_token"],
                         self.oauth.current_refresh)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        for directory in (self.home, target_dir):
            self.assertEqual([n for n in os.listdir(directory) if n.endswith(".tmp")], [])


class DeadRefreshTokenTests(CliCoexistenceCase):
    FAILURES = [  # (status, body) from the token endpoint, and the code the client hears
        (400, {"error": {"code": "refresh_token_invalidated"}}, "refresh_token_invalidated"),
        (400, {"error": {"code": "refresh_token_expired"}}, "refresh_token_expired"),
        (401, {"error": "invalid_grant"}, None)]

    def test_permanent_failure_is_not_retried_until_auth_json_changes(self):
        for failure_status, failure_body, code in self.FAILURES:
            with self.subTest(code=code or failure_status):
                self.expire()
                self.oauth.failure = (failure_status, failure_body)
                posts = self.oauth.count
                for _ in range(4):
                    status, _, body = self.post(simple_request())
                    self.assert_openai_error(status, body, 401, code=code,
                                             contains="codex login")
                self.assertEqual(self.oauth.count, posts + 1,
                                 "the dead refresh token was sent again")

    def test_reused_token_is_dead_too_and_a_new_login_revives(self):
        self.expire()
        self.oauth.current_refresh = "someone-elses"
        for _ in range(3):
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, 401, code="refresh_token_reused")
        self.assertEqual(self.oauth.count, 1)
        # `codex login` writes a new auth.json: the next request refreshes with it
        self.expire(refresh="rt-after-login")
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 2)

    def test_backend_401_with_a_dead_refresh_token_answers_at_once(self):
        self.backend.valid_tokens.clear()
        self.oauth.failure = (400, {"error": {"code": "refresh_token_invalidated"}})
        for _ in range(3):
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, 401, code="refresh_token_invalidated",
                                     contains="codex login")
        self.assertEqual(self.oauth.count, 1)


class ShutdownDuringRefreshTests(ProcessTestCase):
    def test_stop_while_refreshing_saves_the_new_token_before_exit(self):
        before = self.write_expired_auth()
        self.oauth.delay = 1.5
        # The shutdown grace (25 s) is shorter than a refresh may take (30 s); shrink it so the
        # drain gives up long before this refresh ends, as it would for a slow one.
        launcher_dir = tempfile.mkdtemp(prefix="launcher-")
        self.addCleanup(shutil.rmtree, launcher_dir, True)
        launcher = os.path.join(launcher_dir, "short_grace.py")
        with open(launcher, "w") as f:
            f.write("import sys\nsys.path.insert(0, %r)\nimport codex_responses_proxy as p\n"
                    "p.SHUTDOWN_GRACE = 0.1\nsys.exit(p.main())\n" % HERE)
        env = clean_env(CODEX_REFRESH_TOKEN_URL_OVERRIDE=self.oauth.url)
        with mock.patch.dict(globals(), {"PROGRAM": launcher}):
            p = self.spawn("--port", "0", "--codex-home", self.home, env=env)
        client = threading.Thread(target=lambda: self.quiet_post(p), daemon=True)
        client.start()
        p.wait_for("refreshing the access token", 10)
        p.proc.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait_exit(timeout=15), 0, p.text())
        self.assertTrue(wait_until(lambda: self.oauth.count == 1, timeout=5))
        with self.oauth.lock:
            issued = self.oauth.current_refresh
        self.assertNotEqual(issued, before["tokens"]["refresh_token"])
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"], issued,
                         "the process exited before saving the refreshed login")
        self.assertNotIn("Traceback", p.text())

    @staticmethod
    def quiet_post(p):
        try:
            p.post(simple_request(), timeout=10)
        except (OSError, http.client.HTTPException):
            pass  # the proxy may close the connection as it stops


class SimulatedCodexCli:
    """The Codex CLI refreshing its login in a thread, as docs/backend.md §2 describes: a blocking
    flock on auth.lock around re-read, refresh and write; a non-blocking flock on auth.json.lock
    for the write (a real CLI that finds it held cannot save, and later tells its user to log
    in again); the write alternately temp file + rename and, as older CLIs do, in place
    (truncate, a pause, write). It refreshes when the token needs it, and every sixth round
    anyway, so that it surely races the proxies."""

    def __init__(self, home, oauth_url):
        self.home = home
        self.path = os.path.join(home, "auth.json")
        self.oauth_url = oauth_url
        self.refreshes = 0
        self.writes = collections.Counter()
        self.failures = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        round_ = 0
        while not self.stopped.is_set():
            round_ += 1
            try:
                self.refresh_round(forced=round_ % 6 == 0)
            except Exception as e:
                self.failures.append(repr(e))
            self.stopped.wait(0.05)

    def refresh_round(self, forced):
        fcntl = proxy.fcntl
        lock_fd = os.open(os.path.join(self.home, "auth.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            if not forced and not proxy.Credentials(doc).needs_refresh():
                return
            answer = self.redeem(doc["tokens"]["refresh_token"],
                                 "forced" if forced else "proactive_expiry")
            if answer is None:
                return
            doc["tokens"].update(answer)
            doc["last_refresh"] = proxy.rfc3339_now()
            self.save(json.dumps(doc, indent=2).encode(), in_place=self.refreshes % 2 == 1)
            self.refreshes += 1
        finally:
            os.close(lock_fd)

    def redeem(self, refresh_token, reason):
        body = json.dumps({"client_id": proxy.OAUTH_CLIENT_ID, "grant_type": "refresh_token",
                           "refresh_token": refresh_token, "refresh_reason": reason}).encode()
        url = urllib.parse.urlsplit(self.oauth_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        try:
            conn.request("POST", url.path, body, {"Content-Type": "application/json",
                                                  "User-Agent": "codex_cli_rs/simulated"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            self.failures.append("refresh answered %d: %r" % (resp.status, data[:200]))
            return None
        return json.loads(data)

    def save(self, data, in_place):
        fcntl = proxy.fcntl
        write_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(write_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.failures.append("auth.json.lock was held: the CLI could not save")
                return
            if in_place:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
                try:
                    time.sleep(0.01)  # readers see an empty file meanwhile
                    os.write(fd, data)
                finally:
                    os.close(fd)
                self.writes["in place"] += 1
            else:
                fd, tmp = tempfile.mkstemp(prefix=".auth-", dir=self.home)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
                self.writes["rename"] += 1
        finally:
            os.close(write_fd)


@unittest.skipIf(proxy.fcntl is None, "no flock on this platform")
class CodexCliNeighbourTests(CliCoexistenceCase):
    """Two proxies and a simulated Codex CLI on one CODEX_HOME, tokens going stale about every
    second, clients sending requests all the while."""

    CLIENTS = 4
    MAX_REQUESTS_EACH = 400
    MAX_SECONDS = 10.0

    def test_cli_and_two_proxies_share_one_login_under_load(self):
        self.oauth.lifetime = proxy.REFRESH_MARGIN + 1  # stale at the next whole second
        self.oauth.delay = 0.05  # a redemption takes a moment, as a real one does: races overlap
        self.expire()
        ports = [self.port]
        self.start_proxy()
        ports.append(self.port)
        cli = SimulatedCodexCli(self.home, self.oauth.url)
        stop = threading.Event()
        results = []
        lock = threading.Lock()

        def client(n):
            for i in range(self.MAX_REQUESTS_EACH):
                if stop.is_set():
                    return
                port = ports[(n + i) % 2]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
                try:
                    conn.request("POST", "/v1/responses", json.dumps(simple_request()),
                                 {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    outcome = (resp.status, resp.read()[:300])
                except (OSError, http.client.HTTPException) as e:
                    outcome = (None, repr(e))
                finally:
                    conn.close()
                with lock:
                    results.append(outcome)

        def refreshes_by(agent):
            with self.oauth.lock:
                return sum(1 for r in self.oauth.requests
                           if agent in r["headers"].get("User-Agent", ""))

        def enough():
            return (refreshes_by("codex-responses-proxy") >= 2 and cli.refreshes >= 2
                    and cli.writes["in place"] >= 1 and cli.writes["rename"] >= 1)

        clients = [threading.Thread(target=client, args=(n,), daemon=True)
                   for n in range(self.CLIENTS)]
        cli.thread.start()
        for t in clients:
            t.start()
        wait_until(lambda: enough() or not any(t.is_alive() for t in clients),
                   timeout=self.MAX_SECONDS, step=0.05)
        stop.set()
        cli.stopped.set()
        for t in clients:
            t.join(30)
        cli.thread.join(30)

        failed = [r for r in results if r[0] != 200]
        self.assertEqual(len(failed), 0, "%d of %d requests failed, the first: %r"
                         % (len(failed), len(results), failed[:2]))
        self.assertEqual(self.oauth.reused, [], "a refresh token was redeemed twice")
        self.assertEqual(cli.failures, [])
        self.assertGreaterEqual(refreshes_by("codex-responses-proxy"), 1)
        self.assertGreaterEqual(cli.refreshes, 1)
        self.assertGreaterEqual(cli.writes["in place"], 1)
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"],
                         self.oauth.current_refresh)


class AtomicWriteTests(ProxyTestCase):
    def record_issued(self):
        issued = []
        original = self.oauth.answer

        def answer(headers, raw):
            status, body = original(headers, raw)
            if status == 200:
                issued.append(body)
            return status, body

        self.oauth.answer = answer
        return issued

    def leftovers(self):
        return sorted(n for n in os.listdir(self.home)
                      if n not in ("auth.json", "auth.json.lock", "auth.lock"))

    def check_failed_write(self, patch_target, replacement):
        self.expire()
        issued = self.record_issued()
        path = os.path.join(self.home, "auth.json")
        with open(path, "rb") as f:
            original = f.read()
        with mock.patch.object(*patch_target, new=replacement):
            status, _, body = self.post(simple_request())
            self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), original, "auth.json changed although the write failed")
        self.assertEqual(self.leftovers(), [], "a temp file was left behind")
        line = self.wait_for_log("could not write")
        self.assertIn(path, line)
        self.assertIn("No space left on device", line)
        self.assertIn("only in this process", line)
        # the refreshed tokens live on in memory: no second refresh (the old refresh token is
        # used up, so one would fail), and the new access token is what goes out
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        self.assertEqual(self.last_upstream()["headers"]["Authorization"],
                         "Bearer " + issued[0]["access_token"])

    def test_failed_rename_leaves_file_untouched_no_temp_and_answers(self):
        path = os.path.join(self.home, "auth.json")
        real_replace = os.replace

        def failing_replace(src, dst, *a, **kw):
            if os.path.abspath(dst) == os.path.abspath(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *a, **kw)

        self.check_failed_write((proxy.os, "replace"), failing_replace)

    def test_write_failing_half_way_leaves_file_untouched_no_temp_and_answers(self):
        def half_dump(obj, fp, *a, **kw):
            text = json.dumps(obj, *a, **kw)
            fp.write(text[:len(text) // 2])
            fp.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        self.check_failed_write((proxy.json, "dump"), half_dump)

    def test_reader_never_sees_partial_file_during_ten_refreshes(self):
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        path = os.path.join(self.home, "auth.json")
        stop = threading.Event()
        seen = {"reads": 0, "bad": [], "tokens": set()}

        def reader():
            while not stop.is_set():
                raw = b""
                try:
                    with open(path, "rb") as f:
                        raw = f.read()
                    doc = json.loads(raw.decode("utf-8"))
                    if not doc["tokens"]["access_token"] or not doc["tokens"]["refresh_token"]:
                        raise ValueError("tokens missing")
                    seen["tokens"].add(doc["tokens"]["refresh_token"])
                except Exception as e:
                    seen["bad"].append("%s: %r" % (e.__class__.__name__, raw[:80]))
                seen["reads"] += 1

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            for _ in range(10):
                self.backend.valid_tokens.clear()  # revoke: a 401 forces a refresh
                status, _, body = self.post(simple_request())
                self.assertEqual(status, 200, body)
        finally:
            stop.set()
            thread.join(5)
        self.assertEqual(self.oauth.count, 10)
        self.assertEqual(seen["bad"], [])
        self.assertGreater(seen["reads"], 50)
        self.assertGreater(len(seen["tokens"]), 2)  # the reader did see rewrites happen
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"],
                         self.oauth.current_refresh)
        self.assertEqual(self.leftovers(), [])

    def test_unknown_keys_survive_and_mode_becomes_0600(self):
        doc = auth_document(access=access_token(-10), future_top={"a": [1, 2]},
                            another="x")
        doc["tokens"]["future_token_field"] = {"nested": True}
        doc["tokens"]["account_id"] = "acct-keep"
        path = write_auth(self.home, doc, mode=0o644)
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        after = read_auth(self.home)
        self.assertEqual(after["future_top"], {"a": [1, 2]})
        self.assertEqual(after["another"], "x")
        self.assertEqual(after["auth_mode"], "chatgpt")
        self.assertIn("OPENAI_API_KEY", after)
        self.assertIsNone(after["OPENAI_API_KEY"])
        self.assertEqual(after["tokens"]["future_token_field"], {"nested": True})
        self.assertEqual(after["tokens"]["account_id"], "acct-keep")
        self.assertEqual(after["tokens"]["refresh_token"], self.oauth.current_refresh)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)


# --------------------------------------------------------------------------------------------
# Upstream: logging in (device code, browser, --status, logout)
# --------------------------------------------------------------------------------------------

def no_proxy_opener():
    """urllib as a browser on this machine: redirects followed, no HTTP proxy from the env."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HeldLock:
    """An exclusive flock on a CODEX_HOME lock file, as another process would hold it."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        proxy.fcntl.flock(self.fd, proxy.fcntl.LOCK_EX)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LoginCase(unittest.TestCase):
    """The fake issuer and backend, and a CODEX_HOME holding an older login that no failure
    may touch."""

    def setUp(self):
        start_fakes(self)
        self.path = write_auth(self.home, auth_document(refresh="rt-old-login-0123456789"))
        with open(self.path, "rb") as f:
            self.old_bytes = f.read()

    def run_command(self, command, *args, stdin=None, issuer=None):
        """(exit status, what it said) of login_command in this process."""
        out = LogCapture()
        argv = [command, "--codex-home", self.home, "--issuer", issuer or self.oauth.base]
        rc = proxy.login_command(argv + list(args), stdin=stdin or io.StringIO(""), out=out)
        return rc, out.getvalue()

    def assert_old_login_kept(self):
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), self.old_bytes)
        self.assertEqual(self.leftovers(), [])

    def assert_one_line_failure(self, rc, said, phrase):
        self.assertEqual(rc, 1, said)
        failures = [l for l in said.splitlines() if l.startswith("login failed: ")]
        self.assertEqual(len(failures), 1, said)
        self.assertIn(phrase, failures[0])
        self.assertNotIn("Traceback", said)

    def leftovers(self):
        return sorted(n for n in os.listdir(self.home) if n.endswith((".tmp", ".probe")))

    def sent(self, path):
        return [body for p, _, body in self.oauth.login_requests if p == path]

    def assert_new_login_saved(self):
        doc = read_auth(self.home)
        self.assertEqual(sorted(doc), ["OPENAI_API_KEY", "auth_mode", "last_refresh", "tokens"])
        self.assertEqual(doc["auth_mode"], "chatgpt")
        self.assertIsNone(doc["OPENAI_API_KEY"])
        self.assertEqual(sorted(doc["tokens"]),
                         ["access_token", "account_id", "id_token", "refresh_token"])
        self.assertEqual(doc["tokens"]["account_id"], "acct-login")
        self.assertEqual(doc["tokens"]["refresh_token"], self.oauth.current_refresh)
        self.assertIn(doc["tokens"]["access_token"], self.backend.valid_tokens)
        self.assertIsNotNone(proxy.parse_rfc3339(doc["last_refresh"]))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.leftovers(), [])
        return doc


class DeviceLoginTests(LoginCase):
    def test_pending_then_approved_saves_the_codex_cli_format(self):
        self.oauth.pending_polls = 2
        rc, said = self.run_command("login")
        self.assertEqual(rc, 0, said)
        self.assert_new_login_saved()
        self.assertIn(self.oauth.base + "/codex/device", said)
        self.assertIn("ABCD-1234", said)
        self.assertIn("15 minutes", said)
        self.assertIn("ChatGPT > Settings > Security", said)
        self.assertIn("Logged in as login@example.com (plan pro, account acct-login)", said)
        self.assertEqual(self.sent("/api/accounts/deviceauth/usercode"),
                         [{"client_id": proxy.OAUTH_CLIENT_ID}])
        self.assertEqual(self.sent("/api/accounts/deviceauth/token"),
                         [{"device_auth_id": "dev-auth-1", "user_code": "ABCD-1234"}] * 3)
        exchange, = self.sent("/oauth/token")
        self.assertEqual(sorted(exchange), ["client_id", "code", "code_verifier", "grant_type",
                                            "redirect_uri"])
        self.assertEqual(exchange["redirect_uri"], self.oauth.base + "/deviceauth/callback")
        self.assertEqual(self.oauth.revoked, [])  # the replaced login is not revoked
        for _, headers, _ in self.oauth.login_requests:
            self.assertNotIn("User-Agent", headers)  # as the CLI: none on login requests

    def test_interval_as_a_string_or_a_number(self):
        for given, expected in (("5", 5.0), (" 7 ", 7.0), (3, 3.0), (2.5, 2.5), ("x", 5.0),
                                (None, 5.0), (True, 5.0), (-1, 5.0)):
            self.assertEqual(proxy.poll_interval(given), expected, given)
        for interval, expected in (("7", 7.0), (3, 3.0)):
            self.oauth.interval, self.oauth.polls, self.oauth.pending_polls = interval, 0, 2
            code = proxy.request_device_code(self.oauth.base)
            slept = []
            proxy.wait_for_device_approval(self.oauth.base, code, time.monotonic() + 60,
                                           sleep=slept.append)
            self.assertEqual(slept, [expected, expected])

    def test_denied_expired_not_enabled_and_unreachable_fail_in_one_line(self):
        cases = [
            ("poll_outcome", (400, {"error": {"code": "deviceauth_denied"}}), "denied"),
            ("poll_outcome", (403, {"error": {"code": "access_denied"}}), "denied"),
            ("poll_outcome", (400, {"error": "expired_token"}), "expired"),
            ("poll_outcome", (500, {"error": "server_error"}), "HTTP 500"),
            ("usercode_failure", (404, {"error": "not_found"}),
             "device code login is not enabled"),
            ("usercode_failure", (429, {"error": {"code": "rate_limited"}}), "HTTP 429")]
        for attribute, outcome, phrase in cases:
            self.oauth.polls, self.oauth.poll_outcome, self.oauth.usercode_failure = 0, None, None
            setattr(self.oauth, attribute, outcome)
            rc, said = self.run_command("login")
            self.assert_one_line_failure(rc, said, phrase)
            self.assert_old_login_kept()
        rc, said = self.run_command("login", issuer="http://127.0.0.1:%d" % free_port())
        self.assert_one_line_failure(rc, said, "cannot reach the issuer")
        self.assert_old_login_kept()

    def test_a_code_not_approved_in_time_expires(self):
        self.oauth.pending_polls = 10 ** 6
        code = proxy.request_device_code(self.oauth.base)
        with self.assertRaises(proxy.LoginFailed) as caught:
            proxy.wait_for_device_approval(self.oauth.base, code, time.monotonic() + 0.2,
                                           sleep=time.sleep)
        self.assertIn("15 minutes", str(caught.exception))

    def test_a_holder_of_auth_lock_makes_the_save_wait(self):
        held = HeldLock(os.path.join(self.home, "auth.lock"))
        self.addCleanup(held.release)
        result = []
        thread = threading.Thread(target=lambda: result.append(self.run_command("login")))
        thread.start()
        self.assertTrue(wait_until(lambda: self.sent("/oauth/token"), 10))
        time.sleep(0.3)  # long enough for a save that did not wait to have happened
        self.assert_old_login_kept()
        held.release()
        thread.join(15)
        self.assertEqual(result[0][0], 0, result)
        self.assert_new_login_saved()

    def test_a_lock_held_too_long_fails_and_keeps_the_old_login(self):
        held = HeldLock(os.path.join(self.home, "auth.lock"))
        self.addCleanup(held.release)
        with mock.patch.object(proxy, "LOGIN_LOCK_WAIT", 0.2):
            rc, said = self.run_command("login")
        self.assert_one_line_failure(rc, said, "nothing was saved")
        self.assert_old_login_kept()

    def test_a_failed_write_leaves_no_temporary_file_and_the_old_login(self):
        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch.object(proxy.os, "fsync", no_space):
            rc, said = self.run_command("login")
        self.assert_one_line_failure(rc, said, "No space left on device")
        self.assert_old_login_kept()

    def test_ctrl_c_and_the_unexpected_leave_the_old_login(self):
        with mock.patch.object(proxy, "wait_for_device_approval",
                               side_effect=KeyboardInterrupt):
            rc, said = self.run_command("login")
        self.assertEqual(rc, 130)
        self.assertEqual([l for l in said.splitlines() if "interrupted" in l],
                         ["login interrupted: %s is as it was" % self.path])
        self.assert_old_login_kept()
        with mock.patch.object(proxy, "exchange_code", side_effect=RuntimeError("rt-secret")):
            rc, said = self.run_command("login")
        self.assert_one_line_failure(rc, said, "unexpected RuntimeError")
        self.assertNotIn("rt-secret", said)
        self.assert_old_login_kept()

    def test_a_new_codex_home_is_created_private(self):
        home = os.path.join(self.home, "new", "codex")
        rc = proxy.login_command(["login", "--codex-home", home, "--issuer", self.oauth.base],
                                 stdin=io.StringIO(""), out=LogCapture())
        self.assertEqual(rc, 0)
        self.assertEqual(stat.S_IMODE(os.stat(home).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(home, "auth.json")).st_mode), 0o600)

    def test_issuer_must_be_a_url_and_https_beyond_this_machine(self):
        for bad in ("auth.openai.com", "ftp://x", "http://auth.example.com",
                    "https://x/?a=1"):
            with self.assertRaises(Exception):
                proxy.issuer_arg(bad)
        self.assertEqual(proxy.issuer_arg("https://auth.openai.com/"), "https://auth.openai.com")
        self.assertEqual(proxy.issuer_arg("http://127.0.0.1:9/"), "http://127.0.0.1:9")


class BrowserLoginTests(LoginCase):
    def start_browser_login(self):
        """login --browser in a thread, 1455's stand-in held so it falls back to the second
        port; its standard input an open pipe. Returns (thread, result, out, port, stdin)."""
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        self.addCleanup(held.close)
        port = free_port()
        patch = mock.patch.object(proxy, "LOGIN_CALLBACK_PORTS", (held.getsockname()[1], port))
        patch.start()
        self.addCleanup(patch.stop)
        r, w = os.pipe()
        stdin, writer = os.fdopen(r, "r"), os.fdopen(w, "w")
        self.addCleanup(stdin.close)
        self.addCleanup(writer.close)
        out, result = LogCapture(), []
        argv = ["login", "--browser", "--codex-home", self.home, "--issuer", self.oauth.base]
        thread = threading.Thread(target=lambda: result.append(
            proxy.login_command(argv, stdin=stdin, out=out)), daemon=True)
        thread.start()
        url = wait_until(lambda: re.search(r"http://\S+/oauth/authorize\?\S+", out.getvalue()),
                         10)
        self.assertTrue(url, out.getvalue())
        return thread, result, out, port, writer, url.group()

    def test_the_browser_comes_back_to_the_local_server(self):
        thread, result, out, port, _, url = self.start_browser_login()
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        redirect = "http://127.0.0.1:%d/auth/callback" % port
        self.assertEqual(url.split("?")[1].split("&")[0:3], [
            "response_type=code", "client_id=" + proxy.OAUTH_CLIENT_ID,
            "redirect_uri=" + urllib.parse.quote(redirect, safe="")])
        self.assertEqual(query["scope"], proxy.OAUTH_SCOPE)
        self.assertIn("scope=openid+profile+email+offline_access+api.connectors.read", url)
        self.assertEqual((query["code_challenge_method"], query["originator"],
                          query["id_token_add_organizations"],
                          query["codex_cli_simplified_flow"]),
                         ("S256", "codex_cli_rs", "true", "true"))
        self.assertGreaterEqual(len(query["state"]), 43)
        with no_proxy_opener().open(url, timeout=20) as page:  # follows the issuer's redirect
            self.assertEqual(page.status, 200)
            self.assertIn(b"Signed in", page.read())
        thread.join(15)
        self.assertEqual(result, [0], out.getvalue())
        self.assert_new_login_saved()
        exchange, = self.sent("/oauth/token")  # one exchange: no API-key token exchange
        self.assertEqual(exchange["redirect_uri"], redirect)
        self.assertEqual(challenge_of(exchange["code_verifier"]), query["code_challenge"])
        self.assertIn(redirect + "?code=...&state=...", out.getvalue())

    def test_a_connection_the_browser_drops_prints_no_traceback(self):
        stderr = LogCapture()
        with contextlib.redirect_stderr(stderr):
            thread, result, out, port, _, url = self.start_browser_login()
            dropped = socket.create_connection(("127.0.0.1", port))
            dropped.sendall(b"GET /auth/cal")
            dropped.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            dropped.close()  # a reset, as a browser closing a tab or a preconnection
            with no_proxy_opener().open(url, timeout=20) as page:
                self.assertEqual(page.status, 200)
            thread.join(15)
        self.assertEqual(result, [0], out.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue() + out.getvalue())

    def test_a_callback_for_another_login_is_refused_and_this_one_waits(self):
        # Any web page can point the browser at the callback; it must not end the login.
        self.oauth.forge_state = True
        thread, result, out, port, _, url = self.start_browser_login()
        for address in (url, "http://127.0.0.1:%d/auth/callback?code=c" % port):
            with self.assertRaises(urllib.error.HTTPError) as caught:
                no_proxy_opener().open(address, timeout=20)
            self.assertEqual(caught.exception.code, 400)
            self.assertIn(b"state does not match", caught.exception.read())
            caught.exception.close()
        self.assertTrue(thread.is_alive(), out.getvalue())
        self.assertEqual(self.sent("/oauth/token"), [])
        self.assert_old_login_kept()
        self.oauth.forge_state = False
        with no_proxy_opener().open(url, timeout=20) as page:
            self.assertIn(b"Signed in", page.read())
        thread.join(15)
        self.assertEqual(result, [0], out.getvalue())
        self.assert_new_login_saved()

    def test_a_pasted_address_with_another_state_fails(self):
        thread, result, out, port, writer, _ = self.start_browser_login()
        writer.write("not an address\n")
        writer.write("http://localhost:%d/auth/callback?code=c&state=guess\n" % port)
        writer.flush()
        thread.join(15)
        self.assertIn("That is not the address the browser ended on", out.getvalue())
        self.assert_one_line_failure(result[0], out.getvalue(), "state does not match")
        self.assert_old_login_kept()

    def test_the_pkce_verifier_must_match_the_challenge(self):
        verifier, challenge = proxy.pkce_pair()
        self.assertEqual(challenge, challenge_of(verifier))
        self.assertEqual(len(verifier), 86)  # 64 bytes, base64url without padding
        code = self.oauth.issue_code("http://127.0.0.1:1455/auth/callback", challenge)
        with self.assertRaises(proxy.LoginFailed) as caught:
            proxy.exchange_code(self.oauth.base, code, "http://127.0.0.1:1455/auth/callback",
                                proxy.pkce_pair()[0])
        self.assertIn("HTTP 400 (invalid_grant: bad code or verifier)", str(caught.exception))
        code = self.oauth.issue_code("http://127.0.0.1:1455/auth/callback", challenge)
        tokens = proxy.exchange_code(self.oauth.base, code,
                                     "http://127.0.0.1:1455/auth/callback", verifier)
        self.assertEqual(tokens["refresh_token"], self.oauth.current_refresh)

    def test_callback_errors_and_pasted_addresses(self):
        with self.assertRaises(proxy.LoginFailed) as caught:
            proxy.callback_code("error=access_denied&error_description=missing_codex_"
                                "entitlement&state=s1", "s1")
        self.assertIn("Codex is not enabled for this workspace", str(caught.exception))
        with self.assertRaises(proxy.LoginFailed):
            proxy.callback_code("code=c&state=s2", "s1")
        self.assertEqual(proxy.callback_code("code=c1&state=s1", "s1"), "c1")
        self.assertEqual(proxy.pasted_query(
            " http://localhost:1455/auth/callback?code=c&state=s \n"), "code=c&state=s")
        self.assertEqual(proxy.pasted_query("code=c&state=s"), "code=c&state=s")
        self.assertIsNone(proxy.pasted_query("http://localhost:1455/auth/callback"))
        self.assertIsNone(proxy.pasted_query("yes"))

    def test_a_pasted_address_in_quotes_or_angle_brackets(self):
        # As a chat, a mail or a shell quotes it: the quote must not end up in the state.
        for line in ('"http://localhost:1455/auth/callback?code=c&state=s"',
                     "'http://localhost:1455/auth/callback?code=c&state=s'\n",
                     " <http://localhost:1455/auth/callback?code=c&state=s> "):
            self.assertEqual(proxy.pasted_query(line), "code=c&state=s", line)


class LoginStatusAndLogoutTests(LoginCase):
    def status(self):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc, said = self.run_command("login", "--status")
        return rc, stdout.getvalue() + said

    def test_status_says_who_without_any_secret(self):
        rc, said = self.status()
        self.assertEqual(rc, 0, said)
        self.assertIn("Logged in with ChatGPT as user@example.com (plan pro, account acct-file)",
                      said)
        self.assertRegex(said, r"access token: expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 5\d min\)")
        self.assertIn("last refresh: 2026-11-20 10:00 UTC", said)
        for secret in tokens_of(self.home):
            self.assertNotIn(secret, said)
            self.assertNotIn(secret[-20:], said)
        write_auth(self.home, {"auth_mode": "apikey", "OPENAI_API_KEY": "sk-status-secret"})
        rc, said = self.status()
        self.assertEqual(rc, 0, said)
        self.assertIn("Logged in with an API key", said)
        self.assertNotIn("sk-status-secret", said)
        os.remove(self.path)
        rc, said = self.status()
        self.assertEqual(rc, 1)
        self.assertIn("Not logged in: No Codex login found", said)
        self.assertIn("codex_responses_proxy.py login", said)

    def test_logout_revokes_and_removes_under_the_locks(self):
        held = HeldLock(os.path.join(self.home, "auth.lock"))
        self.addCleanup(held.release)
        seen_at_unlink = []
        unlink = os.unlink

        def watched_unlink(path, *args, **kw):
            if path == self.path:
                seen_at_unlink.append((try_flock(path + ".lock"),
                                       try_flock(os.path.join(self.home, "auth.lock"))))
            return unlink(path, *args, **kw)

        result = []
        with mock.patch.object(proxy.os, "unlink", watched_unlink):
            thread = threading.Thread(target=lambda: result.append(self.run_command("logout")))
            thread.start()
            time.sleep(0.3)  # long enough for a logout that did not wait to have gone on
            self.assertTrue(os.path.exists(self.path))
            self.assertEqual(self.oauth.revoked, [])
            held.release()
            thread.join(15)
        self.assertEqual(result[0][0], 0, result)
        self.assertIn("Logged out: removed %s." % self.path, result[0][1])
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(seen_at_unlink, [(False, False)])  # both locks ours while removing
        self.assertEqual(self.oauth.revoked, [{"token": "rt-old-login-0123456789",
                                               "token_type_hint": "refresh_token",
                                               "client_id": proxy.OAUTH_CLIENT_ID}])
        rc, said = self.run_command("logout")
        self.assertEqual((rc, said.strip()), (0, "Not logged in: %s does not exist." % self.path))

    def test_a_login_that_cannot_be_removed_is_not_revoked(self):
        # Revoked but left in place, auth.json would hold a dead refresh token.
        unlink = os.unlink

        def refused_unlink(path, *args, **kw):
            if path == self.path:
                raise PermissionError(errno.EACCES, "Permission denied")
            return unlink(path, *args, **kw)

        with mock.patch.object(proxy.os, "unlink", refused_unlink):
            rc, said = self.run_command("logout")
        self.assertEqual(rc, 1, said)
        self.assertEqual(said.strip(), "logout failed: cannot remove %s (Permission denied)"
                         % self.path)
        self.assertEqual(self.oauth.revoked, [])
        self.assert_old_login_kept()

    def test_logout_removes_the_login_when_the_issuer_cannot_revoke(self):
        rc, said = self.run_command("logout", issuer="http://127.0.0.1:%d" % free_port())
        self.assertEqual(rc, 0, said)
        self.assertIn("warning: could not revoke the login at the issuer (cannot reach", said)
        self.assertFalse(os.path.exists(self.path))
        write_auth(self.home, auth_document())
        self.oauth.revoke_failure = (400, {"error": "invalid_token"})
        rc, said = self.run_command("logout")
        self.assertEqual(rc, 0, said)
        self.assertIn("HTTP 400 (invalid_token)", said)
        self.assertFalse(os.path.exists(self.path))

    def test_the_revoke_url_follows_the_codex_cli(self):
        env = {proxy.REVOKE_URL_ENV: "", proxy.REFRESH_URL_ENV: ""}
        with mock.patch.dict(os.environ, env):
            self.assertEqual(proxy.revoke_url(), "https://auth.openai.com/oauth/revoke")
            self.assertEqual(proxy.revoke_url("http://127.0.0.1:9"),
                             "http://127.0.0.1:9/oauth/revoke")
            os.environ[proxy.REFRESH_URL_ENV] = "http://127.0.0.1:7/oauth/token?x=1"
            self.assertEqual(proxy.revoke_url(), "http://127.0.0.1:7/oauth/revoke")
            os.environ[proxy.REVOKE_URL_ENV] = "http://127.0.0.1:8/revoke"
            self.assertEqual(proxy.revoke_url(), "http://127.0.0.1:8/revoke")


# --------------------------------------------------------------------------------------------
# Upstream: the HTTP request (headers, client version, quota), the pool and its retry
# --------------------------------------------------------------------------------------------

class UpstreamRequestHeaderTests(unittest.TestCase):
    """upstream_request_headers(): which of a client's headers reach the backend."""

    def test_forwards_codex_headers_and_responses_lite_only(self):
        client = {"accept-encoding": "zstd, gzip, br", "authorization": "Bearer client-key",
                  "cookie": "c=1", "x-api-key": "k", "user-agent": "codex_exec/0.171.0 (Linux)",
                  "version": "0.171.0", "content-type": "application/json",
                  "x-stainless-lang": "python", "host": "127.0.0.1:8787",
                  "x-openai-internal-codex-responses-lite": "true",
                  "x-codex-turn-metadata": '{"turn_id":"t1"}', "x-codex-window-id": "w:0",
                  "x-openai-subagent": "review", "x-client-request-id": "thread-1"}
        got = proxy.upstream_request_headers(client, {"model": "gpt-5.6-sol"})
        self.assertEqual(dict(got), {
            "x-openai-internal-codex-responses-lite": "true",
            "x-codex-turn-metadata": '{"turn_id":"t1"}', "x-codex-window-id": "w:0",
            "x-openai-subagent": "review", "x-client-request-id": "thread-1",
            "x-codex-routing-hint": "model=gpt-5.6-sol"})
        self.assertEqual(len(got), len(dict(got)), "each header once")

    def test_routing_hint_names_the_model_and_tier_sent(self):
        body = {"model": "gpt-5.6-sol", "service_tier": "priority", "input": []}
        self.assertEqual(dict(proxy.upstream_request_headers({}, body)),
                         {"x-codex-routing-hint": "model=gpt-5.6-sol;tier=priority"})
        # the client's own hint names what it asked for, not what is sent: replaced
        out, _ = proxy.rewrite_request({"model": "gpt-5.1-codex", "service_tier": "flex"}, "D")
        got = proxy.upstream_request_headers(
            {"x-codex-routing-hint": "model=gpt-6;tier=flex"}, out)
        self.assertEqual(got, [("x-codex-routing-hint", "model=gpt-5.1-codex")])

    def test_no_routing_hint_without_a_safe_model(self):
        for body in ({}, {"model": None}, {"model": 5}, {"model": ""},
                     {"model": "gpt-5\r\nx-evil: 1"}, {"model": "a b"}, {"model": "m" * 500}):
            with self.subTest(body=body):
                self.assertEqual(proxy.upstream_request_headers({}, body), [])
                self.assertIsNone(proxy.routing_hint(body))
        self.assertEqual(proxy.routing_hint({"model": "m", "service_tier": "a\nb"}), "model=m")


class CodexVersionTests(unittest.TestCase):
    """Which Codex version goes upstream: --client-version, or a newer client's own."""

    def test_parse_orders_releases_and_pre_releases(self):
        order = ["0.9.9", "0.169.0", "0.171.0", "0.172.0-alpha.3", "0.172.0-alpha.10",
                 "0.172.0-alpha.beta", "0.172.0-beta", "0.172.0-rc.1", "0.172.0", "0.172.1",
                 "1.0.0"]
        keys = [proxy.parse_codex_version(v) for v in order]
        self.assertNotIn(None, keys, order)
        self.assertEqual(keys, sorted(keys))
        self.assertEqual(len(set(keys)), len(keys))
        self.assertEqual(proxy.parse_codex_version(" 0.171.0\t"),
                         proxy.parse_codex_version("0.171.0"))

    def test_parse_refuses_junk(self):
        for junk in (None, 171, "", "0.171", "v0.171.0", "0.171.0.1", "0.171.0-", "0.171.x",
                     "0.171.0-alpha..1", "0.171.0+build.5", "0.171.0 beta", "latest",
                     "\u0660.\u0661\u0667\u0661.\u0660",  # Arabic-Indic digits
                     "1" * 10 + ".0.0", "0.171.0-" + "a" * 100, "9" * 5000):
            with self.subTest(junk=junk if not isinstance(junk, str) else junk[:30]):
                self.assertIsNone(proxy.parse_codex_version(junk))

    def test_client_version_from_version_header_or_codex_user_agent(self):
        cases = [
            ({"version": "0.172.0"}, "0.172.0"),
            ({"user-agent": "codex_exec/0.172.0 (Ubuntu 24.4.0; x86_64) xterm (codex_exec; "
                            "0.172.0)"}, "0.172.0"),
            ({"user-agent": "codex_cli_rs/0.173.0-alpha.3 (Mac OS 15.1.0; arm64) iTerm.app"},
             "0.173.0-alpha.3"),
            ({"user-agent": "codex-tui/0.171.0 (Arch Linux Rolling Release; x86_64) Konsole"},
             "0.171.0"),
            ({"user-agent": "codex_cli_rs/0.171.0"}, "0.171.0"),
            # both: the newer wins
            ({"version": "0.171.0", "user-agent": "codex_exec/0.172.0 (Linux)"}, "0.172.0"),
            ({"version": "0.174.0", "user-agent": "codex_exec/0.172.0 (Linux)"}, "0.174.0"),
        ]
        for headers, want in cases:
            with self.subTest(headers=headers):
                self.assertEqual(proxy.client_codex_version(headers)[1], want)
        for headers in ({}, {"user-agent": "OpenAI/Python 1.99.0"},
                        {"user-agent": "opencode/1.2.3 (linux)"},
                        {"user-agent": "python-requests/2.31.0"},
                        {"user-agent": "my-codex_exec/9.0.0 (x)"},
                        {"user-agent": "codex_exec/0.172.0junk (Linux)"},
                        {"user-agent": "codex_exec/" + "9" * 100000},
                        {"version": "2024-10-01"}, {"version": "0.172"},
                        {"version": "1" * 100000}):
            with self.subTest(headers={k: v[:40] for k, v in headers.items()}):
                self.assertIsNone(proxy.client_codex_version(headers))

    def test_newer_client_is_sent_with_its_version_and_newest_is_kept(self):
        versions = proxy.ClientVersion("0.171.0")
        self.assertEqual(versions.newest, "0.171.0")
        self.assertEqual(versions.observe({}), "0.171.0")
        self.assertEqual(versions.observe({"user-agent": "OpenAI/Python 1.99.0"}), "0.171.0")
        self.assertEqual(versions.observe({"version": "0.169.0"}), "0.171.0",
                         "an older client gets the configured version")
        self.assertEqual(versions.newest, "0.171.0")
        self.assertEqual(versions.observe(
            {"user-agent": "codex_exec/0.172.0-alpha.3 (Linux 6.8; x86_64) dumb"}),
            "0.172.0-alpha.3")
        self.assertEqual(versions.newest, "0.172.0-alpha.3")
        self.assertEqual(versions.observe({"version": "0.173.0"}), "0.173.0")
        self.assertEqual(versions.observe({"version": "0.172.0"}), "0.172.0",
                         "each request goes with its own client's version")
        self.assertEqual(versions.newest, "0.173.0", "newest never goes back")
        self.assertEqual(versions.observe({}), "0.171.0")

    def test_newest_under_concurrent_observers(self):
        versions = proxy.ClientVersion("0.171.0")
        seen = ["0.%d.0" % minor for minor in range(172, 240)]
        random.Random(7).shuffle(seen)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            sent = list(pool.map(lambda v: versions.observe({"version": v}), seen * 3))
        self.assertEqual(sent, seen * 3)
        self.assertEqual(versions.newest, "0.239.0")

    def test_command_line_default_and_validation(self):
        home = tempfile.mkdtemp(prefix="codex-home-")
        self.addCleanup(shutil.rmtree, home, True)
        self.assertEqual(proxy.DEFAULT_CLIENT_VERSION, "0.171.0")
        config = proxy.parse_config(["--codex-home", home])
        self.assertEqual(config.client_version, "0.171.0")
        config = proxy.parse_config(["--codex-home", home, "--client-version", "0.172.0-alpha.1"])
        self.assertEqual(config.client_version, "0.172.0-alpha.1")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            proxy.parse_config(["--codex-home", home, "--client-version", "latest"])
        self.assertEqual(cm.exception.code, 2)
        self.assertIn("--client-version", err.getvalue())
        self.assertIn("0.171.0", err.getvalue(), "the error shows what a version looks like")


class QuotaWindowTests(ProxyTestCase):
    def test_window_labels_from_minutes(self):
        for minutes, label in ((300, "5h"), (10080, "weekly"), (43200, "30d"), (60, "1h"),
                               (1440, "1d"), (90, "90m"), (45, "45m"), (120, "2h"),
                               (0, None), (-5, None), (None, None)):
            with self.subTest(minutes=minutes):
                self.assertEqual(proxy.window_label(minutes), label)

    def test_status_labels_windows_by_length_not_position(self):
        # the weekly window in the primary slot: the labels must follow the minutes
        self.backend.replies.append(Reply(headers=[
            ("x-codex-primary-window-minutes", "10080"),
            ("x-codex-secondary-window-minutes", "300")]))
        status, _, answer = self.post(simple_request())
        self.assertEqual(status, 200, answer)
        status, _, data = self.request("GET", "/status")
        self.assertEqual(status, 200, data)
        quota = json.loads(data)["quota"]
        self.assertEqual((quota["primary"]["label"], quota["primary"]["used_percent"]),
                         ("weekly", 12.5))
        self.assertEqual((quota["secondary"]["label"], quota["secondary"]["used_percent"]),
                         ("5h", 40))
        self.assertEqual([(w["label"], w["slot"], w["used_percent"]) for w in quota["windows"]],
                         [("5h", "secondary", 40), ("weekly", "primary", 12.5)])

    def test_windows_lists_only_windows_the_backend_reported(self):
        tracker = proxy.QuotaTracker()
        tracker.update([("x-codex-primary-used-percent", "7"),
                        ("x-codex-primary-window-minutes", "43200")])
        snap = tracker.snapshot()
        self.assertEqual([(w["slot"], w["label"]) for w in snap["windows"]],
                         [("primary", "30d")])
        self.assertIsNone(snap["secondary"]["label"])


class UpstreamReuseTests(StreamingCase):

    def test_sequential_requests_share_one_upstream_connection(self):
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        for i in range(6):
            if i % 2:
                status, _, body = self.post(simple_request(), conn=conn)
                self.assertEqual(status, 200, body)
            else:
                status, _, events, _ = self.stream(simple_request(), conn=conn)
                self.assertEqual((status, events[-1][0]), (200, "response.completed"))
        self.assertEqual(self.backend.connections, 1)
        self.assertEqual(len(self.backend.requests), 6)

    def test_sequential_clients_on_new_connections_share_one_upstream_connection(self):
        for i in range(6):
            if i % 2:
                status, _, body = self.post(simple_request())
                self.assertEqual(status, 200, body)
            else:
                status, _, events, _ = self.stream(simple_request())
                self.assertEqual((status, events[-1][0]), (200, "response.completed"))
        self.assertEqual(self.backend.connections, 1)

    def stale_second_request(self, fresh_fails):
        def behave(up, conn_no, req_no, sock, request):
            if conn_no == 0 and req_no == 0 or conn_no > 0 and not fresh_fails:
                sock.sendall(chunked_sse_response(stream_frames()))
                return True
            return False  # close without a byte of answer

        return self.use_raw_upstream(behave)

    def test_dead_reused_connection_is_retried_once_on_a_fresh_one(self):
        upstream = self.stale_second_request(fresh_fails=False)
        status, _, events, _ = self.stream(simple_request())
        self.assertEqual((status, events[-1][0]), (200, "response.completed"))
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(body["output"][0]["content"][0]["text"], "Hello there!")
        self.assertEqual(upstream.requests_per_connection, {0: 2, 1: 1},
                         "expected: reuse of connection 0, then one retry on a new one")
        status, _, events, _ = self.stream(simple_request())
        self.assertEqual((status, events[-1][0]), (200, "response.completed"))

    def test_retry_failing_too_gives_502_json_not_a_hang(self):
        upstream = self.stale_second_request(fresh_fails=True)
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        start = time.monotonic()
        for stream in (False, True):
            with self.subTest(stream=stream):
                status, headers, data = self.request(
                    "POST", "/v1/responses", simple_request(stream=stream))
                self.assertEqual(status, 502, data)
                self.assertTrue(headers["content-type"].startswith("application/json"))
                self.assert_openai_error(status, json.loads(data), 502,
                                         code="upstream_unreachable")
        self.assertLess(time.monotonic() - start, 5.0)
        self.assertEqual(upstream.requests_per_connection[0], 2)


# --------------------------------------------------------------------------------------------
# Upstream: the backend over WebSocket (--upstream-transport)
# --------------------------------------------------------------------------------------------

class WebSocketClientFramingTests(unittest.TestCase):
    """The client end of RFC 6455, against the test's own server-side decoding."""

    def test_frames_are_masked_and_decode_at_every_length_class(self):
        for size in (0, 5, 125, 126, 65535, 65536, 200000):
            payload = os.urandom(size)
            frame = proxy.encode_frame(proxy.OP_TEXT, payload, mask=True)
            self.assertTrue(frame[1] & 0x80, "a client frame must be masked")
            self.assertEqual(fake_ws_recv(io.BytesIO(frame)), (1, payload))
            reader = proxy.WebSocketReader(None, proxy.encode_frame(2, payload))
            self.assertTrue(reader.frame_ready())
            self.assertEqual(reader.frame(), (True, 2, payload))

    def test_fragments_joined_and_pings_answered_on_the_way(self):
        server = (bytes([0x01, 3]) + b'{"a' + bytes([0x89, 2]) + b"hi"
                  + bytes([0x80, 4]) + b'":1}')
        pongs = []
        reader = proxy.WebSocketReader(None, server)
        self.assertEqual(reader.message(pongs.append), (proxy.OP_TEXT, b'{"a":1}'))
        self.assertEqual(pongs, [b"hi"])
        self.assertFalse(reader.frame_ready())

    def test_canonical_items_ignore_only_what_the_backend_stamped(self):
        sent = dict(message_item("Hello"), id="msg_9", status="completed")
        resent = {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}
        self.assertEqual(proxy.canonical_item(sent), proxy.canonical_item(resent))
        edited = {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]}
        self.assertNotEqual(proxy.canonical_item(sent), proxy.canonical_item(edited))
        call = function_call_item()
        self.assertNotEqual(proxy.canonical_item(call),
                            proxy.canonical_item(dict(call, call_id="call_2")))


class PermessageDeflateTests(unittest.TestCase):
    """The codec of RFC 7692 for the backend's socket, against plain zlib on the other end."""

    def test_answers_to_the_offer_accepted_and_refused(self):
        def terms(value):
            agreed = proxy.deflate_terms([("Sec-WebSocket-Extensions", value)])
            return (agreed.server_no_context_takeover, agreed.client_no_context_takeover,
                    agreed.client_max_window_bits)
        self.assertIsNone(proxy.deflate_terms([("x-other", "1")]))
        self.assertEqual(terms("permessage-deflate"), (False, False, 15))
        self.assertEqual(terms("permessage-deflate; server_no_context_takeover; "
                               "client_no_context_takeover; client_max_window_bits=10; "
                               "server_max_window_bits=12"), (True, True, 10))
        self.assertEqual(terms('permessage-deflate;client_max_window_bits="9"'),
                         (False, False, 9))
        for bad in ("x-webkit-deflate-frame", "permessage-deflate, permessage-deflate",
                    "permessage-deflate; foo", "permessage-deflate; client_max_window_bits",
                    "permessage-deflate; server_max_window_bits=16",
                    "permessage-deflate; server_max_window_bits=7",
                    "permessage-deflate; client_max_window_bits=010",
                    "permessage-deflate; server_no_context_takeover=1",
                    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                    'permessage-deflate; client_max_window_bits="1 0"', "permessage-deflate;"):
            with self.assertRaises(ValueError, msg=bad):
                proxy.deflate_terms([("Sec-WebSocket-Extensions", bad)])

    def test_messages_deflate_with_their_context_unless_told_not_to(self):
        instructions = os.urandom(3000).hex().encode()  # compresses 2:1 alone, not less
        messages = [b'{"instructions":"%s","input":"turn %d"}' % (instructions, n)
                    for n in range(4)]
        kept, inflater = proxy.MessageDeflater(), zlib.decompressobj(-15)
        sizes = []
        for message in messages:
            data = kept.compress(message)
            self.assertFalse(data.endswith(b"\x00\x00\xff\xff"))
            self.assertEqual(inflater.decompress(data + b"\x00\x00\xff\xff"), message)
            sizes.append(len(data))
        self.assertGreater(sizes[0], 3000)
        self.assertLess(max(sizes[1:]), 100, sizes)  # the repeat costs a back-reference
        fresh = proxy.MessageDeflater(10, no_context_takeover=True)
        for message in messages:
            data = fresh.compress(message)  # each inflates alone, with a 10-bit window
            self.assertEqual(zlib.decompressobj(-10).decompress(
                data + b"\x00\x00\xff\xff"), message)
            self.assertGreater(len(data), 3000)

    def reader(self, data, no_context_takeover=False):
        reader = proxy.WebSocketReader(None, data)
        reader.inflater = proxy.MessageInflater(no_context_takeover)
        return reader

    def test_compressed_fragments_pings_between_and_context_across_messages(self):
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)

        def deflate(payload):
            return (deflater.compress(payload) + deflater.flush(zlib.Z_SYNC_FLUSH))[:-4]
        first, second = b'{"type":"a","text":"%s"}' % (b"hello " * 50), b'{"type":"a"}'
        one, two = deflate(first), deflate(second)
        data = (server_frame(0x41, one[:5], fin=False) + server_frame(9, b"hi")
                + server_frame(0, one[5:]) + server_frame(0x41, two)
                + server_frame(1, b'{"plain":1}'))  # RSV1 clear: a message as it is
        pongs = []
        reader = self.reader(data)
        self.assertEqual(reader.message(pongs.append), (proxy.OP_TEXT, first))
        self.assertEqual(reader.message(pongs.append), (proxy.OP_TEXT, second))
        self.assertEqual(reader.message(pongs.append), (proxy.OP_TEXT, b'{"plain":1}'))
        self.assertEqual(pongs, [b"hi"])
        # server_no_context_takeover: each message inflates alone
        fresh = [zlib.compressobj(9, zlib.DEFLATED, -15) for _ in range(2)]
        data = b"".join(server_frame(0x41, (c.compress(first) + c.flush(
            zlib.Z_SYNC_FLUSH))[:-4]) for c in fresh)
        reader = self.reader(data, no_context_takeover=True)
        self.assertEqual([reader.message(pongs.append)[1] for _ in range(2)], [first, first])

    def test_rsv_misuse_fails_the_connection(self):
        packed = zlib.compressobj(9, zlib.DEFLATED, -15)
        text = (packed.compress(b'{"a":1}') + packed.flush(zlib.Z_SYNC_FLUSH))[:-4]
        cases = ((server_frame(0x49, b"hi"), True),                # a compressed ping
                 (server_frame(0x41, text[:2], fin=False)
                  + server_frame(0x40, text[2:]), True),           # RSV1 on a continuation
                 (server_frame(0x21, b"{}"), True),                # RSV2
                 (server_frame(0x41, text), False),                # not agreed
                 (server_frame(0x41, b"\xff\xff\xff"), True))    # not deflate
        for data, agreed in cases:
            reader = self.reader(data) if agreed else proxy.WebSocketReader(None, data)
            with self.assertRaises(ValueError, msg=data[:8]):
                reader.message(lambda payload: None)

    def test_a_deflate_bomb_is_refused_at_the_cap_never_inflated_past_it(self):
        packed = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = (packed.compress(b"x" * (32 << 20)) + packed.flush(zlib.Z_SYNC_FLUSH))[:-4]
        self.assertLess(len(bomb), 100000)
        out = proxy.MessageInflater().inflate(bomb, True, 1000)
        self.assertEqual(len(out), 1001)  # one byte past the room says it all
        with mock.patch.object(proxy, "WS_MAX_MESSAGE", 50000):
            for data in (server_frame(0x41, bomb),
                         server_frame(0x41, bomb[:len(bomb) // 2], fin=False)
                         + server_frame(0, bomb[len(bomb) // 2:])):  # in total
                with self.assertRaises(ValueError) as caught:
                    self.reader(data).message(lambda payload: None)
                self.assertIn("more than 50000 bytes once inflated", str(caught.exception))


class UpstreamWebSocketTests(ProxyTestCase):
    """--upstream-transport ws against a backend that takes WebSockets: every turn over the
    conversation's socket. (auto differs only in when a socket is first opened: see
    UpstreamTransportChoiceTests.)"""

    upstream_transport = "ws"

    def setUp(self):
        super().setUp()
        self.backend.ws.refuse = None

    def turn(self, history, text, session="sess-1", **extra):
        """One turn of a client that re-sends the whole history, as over HTTP: the new
        history (with the answer's output) and the answer."""
        items = history + [user_item(text)]
        body = dict(simple_request(), input=items, **extra)
        status, headers, answer = self.post(body, {"session_id": session} if session else None)
        self.assertEqual(status, 200, answer)
        return items + answer["output"], answer

    def messages(self):
        return [m for _, m in self.backend.ws.messages]

    def test_a_websocket_client_chains_on_the_backends_socket_too(self):
        """Both ends over WebSocket: the client's chain becomes the backend socket's chain,
        each turn sending only its new items upstream."""
        client = WSClient(self.port)
        self.addCleanup(client.close_socket)
        self.assertEqual(client.status, 101, client.body)
        previous = None
        for text in ("hi", "and then?", "thanks"):
            extra = {"previous_response_id": previous} if previous else {}
            client.create(input=[user_item(text)], store=False, **extra)
            events = client.response_events()
            self.assertEqual(events[-1]["type"], "response.completed", events[-1])
            previous = events[-1]["response"]["id"]
        first, second, third = self.messages()
        self.assertEqual(first["input"], [user_item("hi")])
        self.assertEqual((second["previous_response_id"], second["input"]),
                         ("resp_ws_1", [user_item("and then?")]))
        self.assertEqual((third["previous_response_id"], third["input"]),
                         ("resp_ws_2", [user_item("thanks")]))
        self.assertEqual(self.backend.ws.sockets, 1)

    def test_turns_chain_on_one_socket_with_only_the_new_items(self):
        history, first = self.turn([], "hi")
        self.assertEqual(first["output"][0]["content"][0]["text"], "Hello there!")
        stripped = [{k: v for k, v in item.items() if k not in ("id", "status")}
                    for item in history]  # as clients that keep only what they need
        history, _ = self.turn(stripped, "and then?")
        history, _ = self.turn(history, "thanks")
        first_msg, second, third = self.messages()
        self.assertEqual(first_msg["type"], "response.create")
        self.assertNotIn("previous_response_id", first_msg)
        self.assertEqual(len(first_msg["input"]), 1)
        self.assertEqual(second["previous_response_id"], "resp_ws_1")
        self.assertEqual(second["input"], [user_item("and then?")])
        self.assertEqual(third["previous_response_id"], "resp_ws_2")
        self.assertEqual(third["input"], [user_item("thanks")])
        self.assertEqual(self.backend.ws.sockets, 1)
        self.assertEqual(len(self.backend.requests), 3)
        self.assertEqual(len(self.backend.requests[-1]["full_input"]), 5)
        handshake = self.backend.ws.handshakes[0]
        self.assertEqual(handshake["OpenAI-Beta"], "responses_websockets=2026-02-06")
        self.assertEqual(handshake["Authorization"], "Bearer " + self.token)
        self.assertIsNone(handshake.get("Accept"))
        self.assertIsNone(handshake.get("Content-Type"))
        status = self.request("GET", "/status")
        report = json.loads(status[2])["upstream_transport"]
        self.assertEqual((report["configured"], report["in_use"]), ("ws", "websocket"))

    def test_streamed_turn_relays_the_same_events_as_http(self):
        status, _, events, raw = self.stream(simple_request())
        self.assertEqual(status, 200)
        names = [name for name, _ in events]
        self.assertEqual(names[0], "response.created")
        self.assertEqual(names[-1], "response.completed")
        self.assertEqual("".join(d["delta"] for n, d in events
                                 if n == "response.output_text.delta"), "Hello there!")
        self.assertEqual(events[-1][1]["response"]["output"][0]["content"][0]["text"],
                         "Hello there!")
        self.assertEqual(len(self.backend.ws.messages), 1)

    def test_chat_completions_go_over_the_socket_too(self):
        status, _, body = self.post({"model": "gpt-5.1-codex", "messages": [
            {"role": "user", "content": "say hi"}]}, path="/v1/chat/completions")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["choices"][0]["message"]["content"], "Hello there!")
        self.assertEqual(self.backend.requests[0]["ws"], 1)

    def test_edited_history_or_other_settings_send_the_full_input(self):
        history, _ = self.turn([], "hi")
        edited = history[:1] + [{"role": "assistant", "content": [
            {"type": "output_text", "text": "Hello there (edited)"}]}]
        self.turn(edited, "go on")
        self.assertNotIn("previous_response_id", self.messages()[1])
        self.assertEqual(len(self.messages()[1]["input"]), 3)
        history, _ = self.turn(history, "go on", instructions="Be terse.")
        self.assertNotIn("previous_response_id", self.messages()[2])
        self.assertEqual(self.backend.ws.sockets, 1)

    def test_previous_response_not_found_and_connection_limit_are_recovered(self):
        history, _ = self.turn([], "hi")
        for code in ("previous_response_not_found", "websocket_connection_limit_reached"):
            self.backend.ws.errors.append({"type": "error", "error": {
                "code": code, "message": "gone"}})
            history, answer = self.turn(history, "next")
            self.assertEqual(answer["status"], "completed")
            retried = self.messages()[-1]
            self.assertNotIn("previous_response_id", retried)
            self.assertEqual(retried["input"], history[:-1])  # the whole conversation
        self.assertEqual(self.backend.ws.sockets, 3)

    def test_socket_closed_while_idle_is_replaced_before_anything_is_sent(self):
        history, _ = self.turn([], "hi")
        ws = next(iter(self.proxy.app.upstream.websockets.pool._idle.values()))
        ws.sock.shutdown(socket.SHUT_RDWR)  # as if the backend had dropped it
        history, answer = self.turn(history, "again")
        self.assertEqual(answer["status"], "completed")
        self.assertEqual(self.backend.ws.sockets, 2)
        self.assertNotIn("previous_response_id", self.messages()[-1])

    def test_socket_dropped_mid_stream_is_an_error_event_never_a_retry(self):
        frames = stream_frames(text="a long answer that will be cut")
        self.backend.replies.append(Reply(frames=frames, cut_after=4))
        status, _, events, raw = self.stream(simple_request())
        self.assertEqual(status, 200)
        names = [name for name, _ in events]
        self.assertEqual(names[-1], "error", names)
        self.assertNotIn("response.completed", names)
        self.assertEqual(len(self.backend.requests), 1, "re-sent after events went out")
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200)  # the next request gets a fresh socket
        self.assertEqual(self.backend.ws.sockets, 2)

    @with_proxy_options(stream_idle_timeout=0.5)
    def test_silent_backend_gives_the_idle_timeout_error(self):
        self.backend.replies.append(Reply(hang_after=2))
        status, _, events, _ = self.stream(simple_request())
        self.assertEqual(status, 200)
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(events[-1][1]["code"], "stream_idle_timeout")
        self.assertEqual(len(self.backend.requests), 1)

    def test_slow_backend_events_are_relayed_as_they_come(self):
        self.backend.replies.append(Reply(frames=stream_frames(text="slow " * 10), delay=0.03))
        conn = self.connection()
        self.addCleanup(conn.close)
        resp = start_stream(conn)
        timed, _ = read_frames_timed(resp)
        self.assertGreater(len(timed), 10)
        self.assertIn(b"response.completed", timed[-1][1])
        # the first events reached the client before the last one was sent
        self.assertLess(timed[0][0], timed[-1][0])

    def test_handshake_401_refreshes_and_retries_once(self):
        self.backend.valid_tokens.clear()  # the token in the file is revoked
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        self.assertEqual(len(self.backend.ws.handshakes), 2)
        self.assertEqual(len(self.backend.requests), 1)
        self.assertNotEqual(self.backend.ws.handshakes[1]["Authorization"], "Bearer " + self.token)

    def test_handshake_401_twice_is_401_without_http(self):
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        self.backend.valid_tokens = RevokedTokens()  # refreshed tokens fail too
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 401, code="invalid_api_key", contains="codex login")
        self.assertEqual(len(self.backend.ws.handshakes), 2)
        self.assertEqual(self.backend.requests, [])

    def test_error_frame_401_refreshes_and_retries_on_a_new_socket(self):
        history, _ = self.turn([], "hi")
        self.backend.valid_tokens.clear()  # revoked while the socket is open
        self.oauth.current_refresh = read_auth(self.home)["tokens"]["refresh_token"]
        history, answer = self.turn(history, "next")
        self.assertEqual(answer["status"], "completed")
        self.assertEqual(self.oauth.count, 1)
        self.assertEqual(self.backend.ws.sockets, 2)

    def test_unsupported_parameter_error_frame_is_dropped_and_retried(self):
        """The retry policy HTTP has, on the backend's socket too."""
        self.backend.extra_rejected.add("seed")
        status, _, body = self.post(simple_request(seed=42))
        self.assertEqual(status, 200, body)
        self.assertEqual([("seed" in m) for m in self.messages()], [True, False])
        self.assertEqual(self.post(simple_request(seed=43))[0], 200)
        self.assertEqual(len(self.messages()), 3, "remembered: no second rejection")
        self.assertTrue(all(r.get("ws") for r in self.backend.requests), "none over HTTP")

    def test_429_error_frame_is_passed_on_with_its_headers_not_retried(self):
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "You've hit your usage limit.",
            "resets_in_seconds": 60}}).encode(),
            headers=[("x-codex-primary-used-percent", "100"), ("retry-after", "60")]))
        status, headers, body = self.post(simple_request())
        self.assert_openai_error(status, body, 429)
        self.assertEqual(headers.get("x-codex-primary-used-percent"), "100")
        self.assertEqual(headers.get("retry-after"), "60")
        self.assertEqual(len(self.backend.requests), 1)
        quota = json.loads(self.request("GET", "/status")[2])["quota"]
        self.assertEqual(quota["primary"]["used_percent"], 100.0)

    def test_rate_limit_frames_update_status_and_pings_are_answered(self):
        self.backend.ws.ping_first = True
        self.backend.ws.rate_limits = {
            "type": "codex.rate_limits", "plan_type": "plus",
            "rate_limits": {"primary": {"used_percent": 42.5, "window_minutes": 300,
                                        "reset_at": int(time.time()) + 3600}},
            "credits": {"has_credits": False, "unlimited": False, "balance": None}}
        status, _, events, _ = self.stream(simple_request())
        self.assertEqual(status, 200)
        self.assertNotIn("codex.rate_limits", [name for name, _ in events])
        quota = json.loads(self.request("GET", "/status")[2])["quota"]
        self.assertEqual(quota["primary"]["used_percent"], 42.5)
        self.assertEqual(quota["plan_type"], "plus")
        self.turn([], "again")  # the pong is read before the next message
        self.assertIn(b"are you there", self.backend.ws.pongs)

    def test_message_above_the_backends_limit_goes_over_http(self):
        self.backend.ws.max_message_bytes = 2000
        history, _ = self.turn([], "hi")
        history, answer = self.turn(history, "x" * 3000)
        self.assertEqual(answer["status"], "completed")
        self.assertEqual([r.get("ws") for r in self.backend.requests], [1, None])
        self.assertEqual(len(self.backend.requests[-1]["body"]["input"]), 3)

    def test_turn_state_from_the_handshake_is_replayed_on_a_new_socket(self):
        self.backend.ws.turn_state = "ts-abc"
        history, _ = self.turn([], "hi")
        self.backend.ws.errors.append({"type": "error", "error": {
            "code": "previous_response_not_found", "message": "gone"}})
        self.turn(history, "next")
        self.assertIsNone(self.backend.ws.handshakes[0].get("x-codex-turn-state"))
        self.assertEqual(self.backend.ws.handshakes[1].get("x-codex-turn-state"), "ts-abc")

    def test_many_conversations_at_once_never_share_a_socket(self):
        self.backend.replies.extend(Reply(frames=stream_frames(), delay=0.01)
                                    for _ in range(12))

        def conversation(n):
            history, _ = self.turn([], "hi %d" % n, session="conv-%d" % n)
            self.turn(history, "more %d" % n, session="conv-%d" % n)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(conversation, range(6)))
        by_socket = collections.defaultdict(set)
        for number, message in self.backend.ws.messages:
            by_socket[number].add(message["prompt_cache_key"])
        self.assertEqual(len(by_socket), 6)
        self.assertTrue(all(len(keys) == 1 for keys in by_socket.values()), by_socket)
        chained = [m for _, m in self.backend.ws.messages if "previous_response_id" in m]
        self.assertEqual(len(chained), 6)
        self.assertTrue(all(m["input"][0]["content"][0]["text"].startswith("more")
                            for m in chained))

    def test_client_hangup_closes_the_upstream_socket_at_once(self):
        self.backend.replies.append(Reply(frames=stream_frames(text="token " * 150),
                                          delay=0.02))
        conn = self.connection()
        resp = start_stream(conn)
        got, _ = read_frames_timed(resp, want=3)
        self.assertEqual(len(got), 3)
        resp.close()
        conn.close()
        self.assertTrue(self.backend.ws.closed_early.wait(3.0),
                        "the backend kept streaming to a client that had left")
        self.assertTrue(self.proxy.app.traffic.wait_idle(3.0))
        self.assertEqual(len(self.proxy.app.upstream.websockets.pool), 0)

    def test_idle_sockets_answer_pings_and_are_closed_after_a_while(self):
        self.turn([], "hi")
        pool = self.proxy.app.upstream.websockets.pool
        fake_ws_send(self.backend.ws.open[1], 9, b"idle ping")
        def swept_and_pinged():
            pool.sweep()  # what the janitor thread does every few seconds
            return b"idle ping" in self.backend.ws.pongs

        wait_until(swept_and_pinged, 5.0, step=0.02)
        self.assertIn(b"idle ping", self.backend.ws.pongs)
        self.assertEqual(len(pool), 1)
        self.turn([], "a new conversation on the same socket")  # still usable
        self.assertEqual(self.backend.ws.sockets, 1)
        with mock.patch.object(proxy, "WS_UPSTREAM_IDLE_SECONDS", 0):
            pool.sweep()
        wait_until(lambda: not self.backend.ws.open, 5.0)
        self.assertEqual(self.backend.ws.open, {}, "the idle socket was not closed")
        self.assertEqual(len(pool), 0)

    @with_proxy_options(dump_dir=lambda t: os.path.join(t.home, "dumps"))
    def test_dumps_record_the_socket_messages_redacted(self):
        dump_dir = os.path.join(self.home, "dumps")
        self.stream(simple_request())
        names = sorted(os.listdir(dump_dir))
        self.assertEqual(len(names), 2, names)
        with open(os.path.join(dump_dir, names[0])) as f:
            sent = json.load(f)
        with open(os.path.join(dump_dir, names[1])) as f:
            received = json.load(f)
        self.assertEqual(sent["body"]["type"], "response.create")
        self.assertIn("ws://", sent["url"])
        self.assertIn({"name": "Authorization", "value": "[REDACTED]"}, sent["headers"])
        self.assertEqual(received["status"], 101)
        self.assertIn("response.completed", received["body"])
        text = json.dumps([sent, received])
        self.assertNotIn(self.token, text)

    def test_a_stopped_proxy_leaves_no_janitor_thread(self):
        self.turn([], "hi")  # a socket back in the pool: its janitor starts
        janitor = self.proxy.app.upstream.websockets.pool._janitor
        self.assertIsNotNone(janitor)
        self.stop_proxy(self.proxy)
        janitor.join(10.0)
        self.assertFalse(janitor.is_alive(), "the socket pool's janitor outlived the proxy")


class UpstreamWebSocketStrictnessTests(ProxyTestCase):
    """What the backend's socket may not do (RFC 6455, issue 19): each case fails the
    connection, and the client gets an error event, never the bad bytes."""

    upstream_transport = "ws"

    def setUp(self):
        super().setUp()
        self.backend.ws.refuse = None

    def answer_with(self, data):
        """The backend answers the next turn with response.created and then data; it then
        waits for the proxy to drop the socket (at most 10 s)."""
        created = json.dumps({"type": "response.created", "sequence_number": 0,
                              "response": response_object("in_progress")}).encode()

        def answer(send, reply, full, handler):
            sock = handler.connection
            sock.sendall(server_frame(1, created) + data)
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            return False

        patcher = mock.patch.object(self.backend.ws, "answer", answer)
        patcher.start()
        self.addCleanup(patcher.stop)

    def assert_error_event_only(self):
        status, _, raw = self.request("POST", "/v1/responses", dict(simple_request(),
                                                                     stream=True))
        self.assertEqual(status, 200)
        datas = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
        events = [json.loads(d.decode("utf-8")) for d in datas]  # all whole JSON, all UTF-8
        self.assertEqual(events[0]["type"], "response.created", events)
        self.assertEqual(events[-1]["type"], "error", events[-1])
        self.assertEqual([e["type"] for e in events[1:-1]], [])
        return events[-1]

    def delta(self, text):
        return json.dumps({"type": "response.output_text.delta", "item_id": "msg_1",
                           "output_index": 0, "content_index": 0, "delta": text}).encode()

    def test_a_new_text_frame_inside_a_fragmented_message_fails_the_connection(self):
        delta = self.delta("abc")
        self.answer_with(server_frame(1, delta[:20], fin=False) + server_frame(1, delta)
                         + server_frame(0, delta[20:]))
        self.assert_error_event_only()

    def test_invalid_utf8_from_the_backend_fails_the_connection(self):
        delta = self.delta("caf\u00e9").replace(b"\\u00e9", b"\xc3\x28")
        self.answer_with(server_frame(1, delta))
        self.assert_error_event_only()
        # split across fragments, a character cut in two is fine; a bad one is not
        good = self.delta("caf\u00e9").replace(b"\\u00e9", "\u00e9".encode())
        cut = good.index(b"\xc3") + 1
        self.answer_with(server_frame(1, good[:cut], fin=False) + server_frame(0, good[cut:])
                         + server_frame(1, b"\xff" + good[1:]))
        status, _, raw = self.request("POST", "/v1/responses", dict(simple_request(),
                                                                     stream=True))
        self.assertIn(good, raw)
        self.assertNotIn(b"\xff", raw)

    @with_proxy_options(max_body_bytes=100000)  # the cap: this, or WS_MAX_MESSAGE if more
    def test_a_message_in_many_fragments_is_capped_in_total(self):
        self.backend.ws.refuse = None
        with mock.patch.object(proxy, "WS_MAX_MESSAGE", 50000):
            delta = self.delta("x" * 150000)
            pieces = [delta[i:i + 40000] for i in range(0, len(delta), 40000)]
            data = b"".join(server_frame(1 if i == 0 else 0, piece, fin=i == len(pieces) - 1)
                            for i, piece in enumerate(pieces))
            self.answer_with(data)
            self.assert_error_event_only()


class UpstreamUpgradeRefusalTests(ProxyTestCase):
    upstream_transport = "ws"

    def test_a_429_on_the_upgrade_is_the_clients_429_not_a_transport_error(self):
        self.backend.ws.refuse = 429
        status, headers, body = self.post(simple_request())
        self.assert_openai_error(status, body, 429)
        self.assertNotEqual(body["error"]["code"], "websocket_refused")
        self.assertEqual(self.backend.requests, [], "nothing is sent over HTTP instead")


class UpstreamWebSocketDeflateTests(ProxyTestCase):
    """permessage-deflate on the backend's socket, against the fake backend's own zlib end:
    what it agreed decides each side's context; what it did not agree fails cleanly."""

    upstream_transport = "ws"
    answer_with = UpstreamWebSocketStrictnessTests.answer_with
    assert_error_event_only = UpstreamWebSocketStrictnessTests.assert_error_event_only
    delta = UpstreamWebSocketStrictnessTests.delta

    def setUp(self):
        super().setUp()
        self.backend.ws.refuse = None
        self.backend.ws.deflate = "permessage-deflate"

    def turns(self, count, instructions):
        history = []
        for n in range(count):
            history.append(user_item("turn %d" % n))
            # a streamed answer: its events, deflated by the fake, are inflated on the way
            status, _, events, _ = self.stream(dict(simple_request(), input=history,
                                                    instructions=instructions),
                                               {"session_id": "sess-deflate"})
            self.assertEqual(status, 200)
            self.assertEqual(events[-1][0], "response.completed", events[-1])
            self.assertEqual("".join(d["delta"] for name, d in events
                                     if name == "response.output_text.delta"), "Hello there!")
            history += events[-1][1]["response"]["output"]
        wire = self.backend.ws.wire
        self.assertEqual([w[0] for w in wire], [1] * count)  # one socket, chained
        self.assertEqual(self.backend.requests[-1]["body"]["previous_response_id"],
                         "resp_ws_%d" % (count - 1))
        return wire

    def test_offered_and_agreed_messages_deflate_with_context_both_ways(self):
        instructions = os.urandom(3000).hex()
        wire = self.turns(4, instructions)
        self.assertEqual(self.backend.ws.handshakes[0]["Sec-WebSocket-Extensions"],
                         "permessage-deflate; client_max_window_bits")
        self.assertTrue(all(compressed for _, compressed, _ in wire), wire)
        self.assertGreater(wire[0][2], 3000)
        # the instructions sent again cost a back-reference into the last message
        self.assertTrue(all(size < 600 for _, _, size in wire[1:]), wire)
        raw = self.backend.requests[-1]["raw"]
        self.assertIn(instructions.encode(), raw)  # inflated on the other end as sent

    def test_no_context_takeover_each_message_deflates_alone(self):
        self.backend.ws.deflate = ("permessage-deflate; client_no_context_takeover; "
                                   "server_no_context_takeover; client_max_window_bits=12")
        wire = self.turns(3, os.urandom(3000).hex())
        self.assertTrue(all(compressed and size > 3000 for _, compressed, size in wire), wire)

    def test_an_8_bit_window_leaves_our_messages_uncompressed(self):
        self.backend.ws.deflate = "permessage-deflate; client_max_window_bits=8"
        wire = self.turns(2, "Be brief.")
        self.assertEqual([compressed for _, compressed, _ in wire], [False, False])

    def test_declined_nothing_is_compressed(self):
        self.backend.ws.deflate = None
        wire = self.turns(2, "Be brief.")
        self.assertEqual([compressed for _, compressed, _ in wire], [False, False])
        self.assertEqual([size for _, _, size in wire],
                         [len(r["raw"]) for r in self.backend.requests])

    def test_an_answer_not_offered_or_malformed_fails_the_handshake_cleanly(self):
        for answer in ("x-webkit-deflate-frame", "permessage-deflate; foo=1",
                       "permessage-deflate; server_max_window_bits=20"):
            self.backend.ws.deflate = answer
            status, _, body = self.post(simple_request())
            self.assert_openai_error(status, body, 502, code="websocket_refused",
                                     contains="handshake failed")
        self.assertEqual(self.backend.requests, [])  # nothing sent on such a socket

    def test_auto_falls_back_to_http_when_the_answer_is_bad(self):
        self.stop_proxy(self.proxy)
        self.upstream_transport = "auto"
        self.start_proxy()
        self.backend.ws.deflate = "permessage-deflate; client_max_window_bits=99"
        history = []
        for text in ("hi", "more", "and more"):
            history.append(user_item(text))
            status, _, answer = self.post(dict(simple_request(), input=history),
                                          {"session_id": "sess-bad"})
            self.assertEqual(status, 200, answer)
            history += answer["output"]
        deadline = time.monotonic() + 10
        while "websocket" not in json.loads(self.request("GET", "/status")[2])[
                "upstream_transport"]["why"].lower() or not self.backend.ws.handshakes:
            self.assertLess(time.monotonic(), deadline, "no upgrade tried")
            time.sleep(0.02)
        self.assertEqual([r.get("ws") for r in self.backend.requests], [None, None, None])
        report = json.loads(self.request("GET", "/status")[2])["upstream_transport"]
        self.assertEqual(report["in_use"], "http", report)
        self.assertIn("handshake failed", report["why"])

    def test_a_deflate_bomb_past_the_cap_is_an_error_event(self):
        self.stop_proxy(self.proxy)
        self.start_proxy(max_body_bytes=100000)  # the cap: this, or WS_MAX_MESSAGE if more
        self.backend.ws.refuse = None
        packed = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = (packed.compress(self.delta("x" * (32 << 20))) +
                packed.flush(zlib.Z_SYNC_FLUSH))[:-4]
        with mock.patch.object(proxy, "WS_MAX_MESSAGE", 50000):
            self.answer_with(server_frame(0x41, bomb))
            self.assert_error_event_only()

    def test_rsv1_on_a_continuation_or_control_frame_or_undeclared_is_an_error_event(self):
        packed = zlib.compressobj(9, zlib.DEFLATED, -15)
        text = (packed.compress(self.delta("abc")) + packed.flush(zlib.Z_SYNC_FLUSH))[:-4]
        for data in (server_frame(0x41, text[:4], fin=False) + server_frame(0x40, text[4:]),
                     server_frame(0x49, b"hi")):
            self.answer_with(data)
            self.assert_error_event_only()
        self.backend.ws.deflate = None
        self.answer_with(server_frame(0x41, text))
        self.assert_error_event_only()


class UpstreamTransportChoiceTests(ProxyTestCase):
    """When the backend refuses the upgrade, and --upstream-transport http / ws."""

    upstream_transport = "auto"

    def test_auto_opens_the_socket_beside_http_turns_and_then_chains(self):
        self.backend.ws.refuse = None
        turn = UpstreamWebSocketTests.turn
        history, _ = turn(self, [], "hi")  # a one-off so far: HTTP, no socket
        self.assertEqual(self.backend.ws.handshakes, [])
        history, _ = turn(self, history, "more")  # goes on: HTTP, socket opened meanwhile
        self.wait_for(lambda: len(self.proxy.app.upstream.websockets.pool) == 1, "the socket")
        history, _ = turn(self, history, "and more")  # the socket, full input
        history, _ = turn(self, history, "last")      # chained: the new item only
        self.assertEqual([r.get("ws") for r in self.backend.requests], [None, None, 1, 1])
        self.assertNotIn("previous_response_id", self.backend.requests[2]["body"])
        self.assertEqual(len(self.backend.requests[2]["body"]["input"]), 5)
        self.assertEqual(self.backend.requests[3]["body"]["input"], [user_item("last")])
        self.assertEqual(self.backend.requests[3]["body"]["previous_response_id"],
                         "resp_ws_1")
        self.assertEqual(len(self.backend.ws.handshakes), 1)

    def test_refused_upgrade_falls_back_to_http_and_stays_there(self):
        going_on = [user_item("hi"), message_item("Hello"), user_item("more")]
        for refusal in (426, 404, 403):
            self.backend.ws.refuse = refusal
            self.stop_proxy(self.proxy)
            self.start_proxy()
            handshakes = len(self.backend.ws.handshakes)
            status, _, body = self.post(dict(simple_request(), input=going_on))
            self.assertEqual(status, 200, body)
            self.wait_for(lambda: "HTTP %d" % refusal in self.log_text(), "the refusal")
            for _ in range(2):
                status, _, body = self.post(dict(simple_request(), input=going_on))
                self.assertEqual(status, 200, body)
            self.assertEqual(len(self.backend.ws.handshakes), handshakes + 1, refusal)
            self.assertEqual(self.backend.ws.messages, [])
            report = json.loads(self.request("GET", "/status")[2])["upstream_transport"]
            self.assertEqual(report["in_use"], "http")
            self.assertIn("HTTP %d" % refusal, report["why"])
            self.assertIn("refused the WebSocket upgrade (HTTP %d)" % refusal, self.log_text())

    def test_unreachable_websocket_falls_back_to_http(self):
        self.backend.ws.refuse = None
        self.backend.ws.upgrade = lambda handler: handler.connection.shutdown(
            socket.SHUT_RDWR)
        going_on = [user_item("hi"), message_item("Hello"), user_item("more")]
        for _ in range(2):
            status, _, body = self.post(dict(simple_request(), input=going_on))
            self.assertEqual(status, 200, body)
            self.wait_for(lambda: "cannot open a WebSocket" in self.log_text() or
                          "handshake failed" in self.log_text(), "the failure")
        self.assertEqual([r.get("ws") for r in self.backend.requests], [None, None])

    @with_proxy_options(upstream_transport="http")
    def test_transport_http_never_opens_a_socket(self):
        self.backend.ws.refuse = None
        history = [user_item("hi")]
        for _ in range(2):
            status, _, body = self.post(dict(simple_request(), input=history))
            self.assertEqual(status, 200, body)
            history = history + body["output"] + [user_item("more")]
        self.assertEqual(self.backend.ws.handshakes, [])
        report = json.loads(self.request("GET", "/status")[2])["upstream_transport"]
        self.assertEqual(report["in_use"], "http")

    @with_proxy_options(upstream_transport="ws")
    def test_transport_ws_refused_is_an_error_naming_the_fix(self):
        self.backend.ws.refuse = 426
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 502, code="websocket_refused",
                                 contains="--upstream-transport auto")
        self.assertEqual(self.backend.requests, [])

    def test_command_line(self):
        self.assertEqual(proxy.parse_config([]).upstream_transport, "auto")
        self.assertEqual(proxy.parse_config(["--upstream-transport", "http"])
                         .upstream_transport, "http")
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit):
            proxy.parse_config(["--upstream-transport", "tcp"])


# ============================================================================================
# Relay: streamed answers, failures after the stream started, hang-ups
# ============================================================================================

def chunked_body(payload, rng):
    """payload as an HTTP/1.1 chunked body cut into chunks at random places, often right after
    a line end (so frame ends fall between chunks), sometimes with chunk extensions."""
    ends = [m.end() for m in re.finditer(rb"[\r\n]", payload)]
    cuts = set(rng.sample(ends, len(ends) // 3))
    cuts.update(rng.sample(range(1, len(payload)), min(len(payload) - 1, rng.choice((1, 5, 50)))))
    edges = [0] + sorted(cuts) + [len(payload)]
    out = []
    for start, end in zip(edges, edges[1:]):
        ext = b";note=x" if rng.random() < 0.1 else b""
        out.append(b"%X%s\r\n%s\r\n" % (end - start, ext, payload[start:end]))
    return b"".join(out) + b"0\r\n\r\n"


def event_chunked_body(frames):
    return b"".join(b"%X\r\n%s\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"


def relay_pieces(body, reads, make_transform, on_read=None):
    """What the relay does with an upstream body arriving in reads of these sizes: decode,
    transform, stop at the terminal event. -> (bytes relayed, the transform). on_read(decoded,
    relayed) is called after each read with what that read gave."""
    decoder, framer, transform = proxy.ChunkedDecoder(), proxy.SSEFramer(), make_transform()
    out, pos = [], 0
    while pos < len(body) and transform.assembler.terminal is None:
        size = next(reads)
        data = decoder.feed(body[pos:pos + size])
        pos += size
        batch = framer.feed(data) if data else None
        relayed = proxy.sse_of(transform.feed(batch)) if batch is not None else b""
        out.append(relayed)
        if on_read:
            on_read(data, relayed)
    return b"".join(out), transform


class FrameEnds:
    """How many frames ("\n\n") have ended in a byte stream that arrives in pieces."""

    def __init__(self):
        self.count = 0
        self._last = b""

    def feed(self, data):
        if data:
            self.count += (self._last + data).count(b"\n\n")
            self._last = data[-1:]


class RelayDifferentialTests(unittest.TestCase):
    """The same streams, cut at random read and chunk boundaries, relay the same bytes, build
    the same response and end the same way, whatever the cuts."""

    def streams(self):
        big = "x" * 100000
        yield "plain", stream_frames(items=[reasoning_item(), message_item("Hello there, friend"),
                                            function_call_item()])
        yield "large event", stream_frames(text=big)
        yield "CRLF framing", stream_frames(eol=b"\r\n")
        yield "CR framing", stream_frames(eol=b"\r")
        frames = stream_frames()
        yield "BOM", [b"\xef\xbb\xbf" + frames[0]] + frames[1:]
        yield "comments and ids", ([b": keep-alive\n\n", b"id: 7\n" + frames[0]] + frames[1:-1]
                                   + [b"data: " + frames[-1].split(b"data: ", 1)[1]])
        yield "blank lines between events", [f + b"\n" for f in frames]
        yield "no terminal event", frames[:-1]
        yield "failed", stream_frames(terminal="response.failed", terminal_extra={
            "error": {"code": "server_is_overloaded", "message": "busy"}})
        yield "error event", frames[:3] + [sse("error", {"code": "rate_limit_exceeded",
                                                          "message": "slow down"})]

    def check(self, make_transform, normalize=lambda b: b, trials=16):
        for name, frames in self.streams():
            payload = b"".join(frames)
            # each event leaves as soon as it is whole: after every read, as many frames
            # relayed as have ended (checked where "\n\n" ends frames and nothing else)
            timely = make_transform is proxy.ResponsesTransform and b"\r" not in payload \
                and b"\n\n\n" not in payload
            whole, reference = relay_pieces(event_chunked_body(frames), iter([1 << 30]),
                                            make_transform)
            expected = (normalize(whole), reference.assembler.terminal,
                        reference.assembler.output(), reference.assembler.response)
            rng = random.Random(name)
            sizes = (1, 2, 5, 64, 1000, 65536) if len(payload) < 20000 else (999, 4096, 65536)
            for trial in range(trials):
                body = event_chunked_body(frames) if trial % 2 else chunked_body(payload, rng)
                reads = iter(lambda: rng.choice(sizes), None)
                ended, relayed = FrameEnds(), FrameEnds()

                def on_read(decoded, out):
                    ended.feed(decoded)
                    relayed.feed(out)
                    self.assertEqual(relayed.count, ended.count, "%s, trial %d" % (name, trial))

                got, transform = relay_pieces(body, reads, make_transform,
                                              on_read if timely else None)
                self.assertEqual((normalize(got), transform.assembler.terminal,
                                  transform.assembler.output(), transform.assembler.response),
                                 expected, "%s, trial %d" % (name, trial))

    def test_responses_relay_does_not_depend_on_the_cuts(self):
        self.check(proxy.ResponsesTransform)

    def test_the_reference_relay_is_what_a_client_should_get(self):
        """The uncut relay itself: every event, the completed one with its output filled."""
        frames = stream_frames(items=[message_item("Hi"), function_call_item()])
        out, transform = relay_pieces(event_chunked_body(frames), iter([1 << 30]),
                                      proxy.ResponsesTransform)
        events = parse_sse(out)
        self.assertEqual([e for e, _ in events], [f.split(b"\n", 1)[0][7:].decode()
                                                   for f in frames])
        self.assertEqual([i["type"] for i in events[-1][1]["response"]["output"]],
                         ["message", "function_call"])
        self.assertEqual(out.replace(b"\n\n", b"").count(b"event: "), len(frames))

    def test_chat_relay_does_not_depend_on_the_cuts(self):
        self.check(lambda: proxy.ChatTransform("gpt-5.1-codex", True), trials=4)


class StreamRelayTests(StreamingCase):

    def test_stream_headers_chunked_and_keepalive_across_three_requests(self):
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        sockets = []
        for i in range(2):
            resp = start_stream(conn)
            data = resp.read()
            self.assertEqual(resp.status, 200, data)
            self.assertTrue(resp.getheader("Content-Type", "").startswith("text/event-stream"),
                            resp.getheaders())
            self.assertEqual(resp.getheader("Cache-Control"), "no-cache")
            self.assertEqual(resp.getheader("Transfer-Encoding"), "chunked")
            self.assertTrue(resp.chunked)
            self.assertIsNone(resp.getheader("Content-Length"))
            self.assertFalse(resp.will_close, "the proxy must keep the connection")
            events = parse_sse(data)
            self.assertEqual(events[-1][0], "response.completed")
            self.assertIsNotNone(conn.sock, "connection closed after streamed request %d" % i)
            sockets.append((conn.sock, conn.sock.getsockname()))
        status, _, body = self.post(simple_request(), conn=conn)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["output"][0]["content"][0]["text"], "Hello there!")
        self.assertIsNotNone(conn.sock)
        sockets.append((conn.sock, conn.sock.getsockname()))
        self.assertEqual(len(set(sockets)), 1, "http.client had to reconnect: %r" % sockets)

    def check_byte_for_byte(self, frames, items, **reply):
        self.backend.replies.append(Reply(frames=frames, **reply))
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        resp = start_stream(conn)
        data = resp.read()
        self.assertEqual(resp.status, 200, data)
        prefix = b"".join(frames[:-1])
        self.assertEqual(data[:len(prefix)], prefix, "events before response.completed differ")
        self.assert_completed_filled(data[len(prefix):], frames[-1], items)

    def test_every_event_relayed_byte_for_byte_and_completed_output_in_index_order(self):
        frames, items = out_of_order_frames()
        self.check_byte_for_byte(frames, items)

    def test_crlf_frames_relayed_byte_for_byte(self):
        frames, items = out_of_order_frames(eol=b"\r\n")
        self.check_byte_for_byte(frames, items)

    def test_frames_split_across_reads_relayed_byte_for_byte(self):
        frames, items = out_of_order_frames()
        for split in (1, 5, 37):
            with self.subTest(chunk_split=split):
                self.check_byte_for_byte(frames, items, chunk_split=split)

    def test_crlf_split_between_cr_and_lf_relayed_byte_for_byte(self):
        # Every frame's last CRLF arrives as CR, pause, LF: two reads on the proxy's side.
        frames, items = out_of_order_frames(eol=b"\r\n")

        def behave(up, conn_no, req_no, sock, request):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(chunked_sse_head())
            for frame in frames:
                sock.sendall(chunked([frame[:-1]]))
                time.sleep(0.02)
                sock.sendall(chunked([frame[-1:]]))
            sock.sendall(b"0\r\n\r\n")
            return True

        self.use_raw_upstream(behave)
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        resp = start_stream(conn)
        data = resp.read()
        self.assertEqual(resp.status, 200, data)
        prefix = b"".join(frames[:-1])
        self.assertEqual(data[:len(prefix)], prefix, "events before response.completed differ")
        self.assert_completed_filled(data[len(prefix):].lstrip(b"\n"), frames[-1], items)

    def test_events_reach_the_client_as_they_arrive(self):
        f = stream_frames(text="Hey")
        frames = [f[0], f[3], f[5]]  # created, one delta, completed
        reply = Reply(frames=frames, hold_after=(1, 2))  # each frame waits for the one before
        self.backend.replies.append(reply)
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        resp = start_stream(conn)
        self.assertEqual(resp.status, 200)
        got = []
        for i in (1, 2):  # the backend holds the rest: a proxy that buffers times out here
            self.assertTrue(reply.wait_held())
            got += read_frames_timed(resp, want=1)[0]
            self.assertEqual(len(got), i, "event %d held back until the stream ended" % i)
            reply.go()
        more, rest = read_frames_timed(resp)
        self.assertEqual(rest, b"")
        self.assertEqual([fr for _, fr in got + more], frames)

    def test_stream_log_line_has_tokens_from_terminal_usage(self):
        usage = dict(USAGE, input_tokens=1234, output_tokens=56, total_tokens=1290)
        self.backend.replies.append(Reply(frames=stream_frames(terminal_extra={"usage": usage})))
        status, _, events, _ = self.stream(simple_request())
        self.assertEqual(status, 200)
        self.assertEqual(events[-1][0], "response.completed")
        line = self.wait_for_log("tokens in=")
        self.assertIn("POST /v1/responses", line)
        self.assertIn("tokens in=1234 out=56", line)
        self.assertIn("status=200", line)
        self.assertIn(" stream", line)


class SSEBomOverHTTPTests(ProxyTestCase):
    def test_a_stream_starting_with_a_bom_is_relayed_without_it(self):
        frames = stream_frames()
        frames[0] = b"\xef\xbb\xbf" + frames[0]
        self.backend.replies.append(Reply(frames=frames, chunk_split=1))
        status, _, events, raw = self.stream(simple_request())
        self.assertEqual(status, 200)
        self.assertFalse(raw.startswith(b"\xef\xbb\xbf"), raw[:40])
        self.assertEqual(events[0][0], "response.created")
        self.assertEqual(events[-1][0], "response.completed")


class StreamFailureTests(StreamingCase):

    def stream_raw(self, conn):
        resp = start_stream(conn)
        try:
            data = resp.read()
        except http.client.IncompleteRead as e:
            self.fail("the proxy did not end the chunked body cleanly: %r" % e)
        return resp, data

    def assert_same_connection_still_works(self, conn):
        sock = conn.sock
        self.assertIsNotNone(sock, "the proxy closed the client connection")
        status, _, body = self.post(simple_request(), conn=conn)
        self.assertEqual(status, 200, body)
        self.assertIs(conn.sock, sock, "http.client had to reconnect")

    def assert_relayed_unchanged(self, frames):
        """The backend's frames reach the client as they are, and its connection stays usable."""
        self.backend.replies.append(Reply(frames=frames))
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        resp, data = self.stream_raw(conn)
        self.assertEqual(resp.status, 200)
        self.assertEqual(data, b"".join(frames))
        self.assert_same_connection_still_works(conn)

    def test_response_failed_passes_through_unchanged(self):
        frames = stream_frames(terminal="response.failed", terminal_extra={
            "error": {"code": "context_length_exceeded", "message": "too long"}})
        self.assert_relayed_unchanged(frames)

    def test_error_event_passes_through_unchanged(self):
        frames = stream_frames()[:3] + [sse("error", {
            "code": "server_error", "message": "backend exploded", "param": None})]
        self.assert_relayed_unchanged(frames)

    def test_upstream_dying_mid_stream_gives_error_event_and_clean_end(self):
        frames = stream_frames(text="a fairly long answer, cut off")
        self.backend.replies.append(Reply(frames=frames, cut_after=4))
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        resp, data = self.stream_raw(conn)
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.isclosed())
        prefix = b"".join(frames[:4])
        self.assertEqual(data[:len(prefix)], prefix)
        tail = split_frames(data[len(prefix):])
        self.assertEqual(len(tail), 1, "expected only a final error event, got %r" % tail)
        self.assert_error_frame(tail[0])
        for frame in split_frames(data):
            self.assertTrue(frame.endswith(b"\n\n"), "truncated frame %r" % frame)
            frame_payload(frame)  # every frame parses
        self.assert_same_connection_still_works(conn)
        self.assertEqual(self.backend.connections, 2, "a cut connection must not be reused")

    @with_proxy_options(stream_idle_timeout=0.5)
    def test_upstream_silent_past_idle_timeout_gives_error_event_and_clean_end(self):
        frames = stream_frames()
        self.backend.replies.append(Reply(frames=frames, hang_after=2))
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        self.addCleanup(conn.close)
        start = time.monotonic()
        resp, data = self.stream_raw(conn)
        elapsed = time.monotonic() - start
        self.assertEqual(resp.status, 200)
        self.assertGreater(elapsed, 0.4)  # the client's 5 s timeout bounds it from above
        prefix = b"".join(frames[:2])
        self.assertEqual(data[:len(prefix)], prefix)
        tail = split_frames(data[len(prefix):])
        self.assertEqual(len(tail), 1, tail)
        self.assert_error_frame(tail[0], code="stream_idle_timeout")
        self.assertIn("error=stream_idle_timeout", self.wait_for_log("error="))
        # the silent connection is dropped, not pooled: the next turn gets a fresh one (with
        # room for a loaded machine's pauses between the backend's frames)
        self.config.stream_idle_timeout = 30.0
        self.assert_same_connection_still_works(conn)
        self.assertEqual(self.backend.connections, 2)


class ClientHangupTests(StreamingCase):

    def test_hangup_mid_stream_closes_upstream_at_once_and_server_keeps_serving(self):
        long_text = "token " * 600  # 900 deltas at 20 ms: about 18 s if nobody stops it
        self.backend.replies.append(Reply(frames=stream_frames(text=long_text), delay=0.02))
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        resp = start_stream(conn)
        self.assertEqual(resp.status, 200)
        got, _ = read_frames_timed(resp, want=3)
        self.assertEqual(len(got), 3)
        resp.close()
        conn.close()
        self.assertTrue(self.backend.closed_early.wait(10.0),
                        "the backend kept streaming to a client that had left")
        self.assertTrue(self.proxy.app.traffic.wait_idle(5.0), "the handler thread is still busy")
        self.wait_for_log("disconnect")
        log = self.log_text()
        self.assertEqual(len([l for l in log.splitlines() if "disconnect" in l]), 1, log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("internal error", log)
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.backend.connections, 2, "the abandoned connection was reused")

    def test_a_stopped_proxy_leaves_no_watcher_thread(self):
        self.stream(simple_request())  # a streamed turn: the hang-up watcher starts
        watcher = self.proxy.hangups._thread
        self.assertIsNotNone(watcher)
        self.stop_proxy(self.proxy)
        watcher.join(10.0)
        self.assertFalse(watcher.is_alive(), "the hang-up watcher outlived the proxy")

    # an idle timeout far beyond the waits below: only the hang-up can close the upstream
    @with_proxy_options(stream_idle_timeout=60.0)
    def test_hangup_while_upstream_is_silent_closes_upstream_promptly(self):
        def behave(up, conn_no, req_no, sock, request):
            if conn_no == 0:  # two events, then silence until the proxy closes
                sock.sendall(chunked_sse_head() + chunked(stream_frames()[:2]))
                return up.wait_for_close(sock, 30.0)
            sock.sendall(chunked_sse_response(stream_frames()))
            return True

        upstream = self.use_raw_upstream(behave)
        conn = self.connection(timeout=CLIENT_TIMEOUT)
        resp = start_stream(conn)
        self.assertEqual(resp.status, 200)
        got, _ = read_frames_timed(resp, want=2)
        self.assertEqual(len(got), 2)
        resp.close()
        conn.close()
        self.assertTrue(upstream.closed.wait(10.0),
                        "the silent upstream connection was left open after the hang-up")
        self.assertTrue(self.proxy.app.traffic.wait_idle(5.0))
        self.assertIn("disconnect", self.wait_for_log("disconnect"))
        self.assertNotIn("Traceback", self.log_text())
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(upstream.connections, 2)


class HangupWatcherRaceTests(unittest.TestCase):
    """The proxy's HangupWatcher on real sockets. A handler unwatches its client socket and then
    closes it; if the close lands between the watcher's copy of the watch list and its wait,
    the watcher meets a closed socket. That must cost nothing to the other clients."""

    def test_peeking_at_an_idle_client_never_waits_for_its_timeout(self):
        # A keep-alive client's next request makes its socket readable; if the handler reads
        # those bytes before the watcher peeks, the peek must not wait out the socket's
        # timeout (5 s here, 120 s in the proxy): meanwhile no other hang-up would be seen.
        watcher = proxy.HangupWatcher()
        self.addCleanup(watcher.close)
        client, peer = socket.socketpair()
        upstream, upstream_peer = socket.socketpair()
        for sock in (client, peer, upstream, upstream_peer):
            self.addCleanup(sock.close)
        client.settimeout(10.0)
        entry = watcher.watch(client, upstream)
        started = time.monotonic()
        self.assertFalse(proxy._peer_closed(entry["peek"]))
        self.assertLess(time.monotonic() - started, 5.0, "the peek waited for the timeout")
        peer.close()
        self.assertTrue(wait_until(lambda: entry["gone"], 1.0), "the hang-up went unnoticed")
        upstream_peer.settimeout(1.0)
        self.assertEqual(upstream_peer.recv(1), b"", "the upstream connection was not cut")

    def test_a_closed_socket_in_the_watch_list_neither_stalls_nor_cuts_live_streams(self):
        watcher = proxy.HangupWatcher()
        self.addCleanup(watcher.close)
        pairs = []

        def pair(timeout=None):
            a, b = socket.socketpair()
            pairs.extend((a, b))
            if timeout is not None:
                a.settimeout(timeout)  # as the handler's socket has (ProxyHandler.timeout)
            return a, b

        def close_all():
            for s in pairs:
                s.close()

        self.addCleanup(close_all)
        live, _live_peer = pair(timeout=5.0)
        live_up, _ = pair()
        live_entry = watcher.watch(live, live_up)
        closing, _closing_peer = pair(timeout=5.0)
        closing.close()  # what the watcher meets when the close comes between its copy of
        closing_entry = watcher.watch(closing, pair()[0])  # the list and its wait; the
        threading.Timer(0.3, watcher.unwatch, (closing_entry,)).start()  # unwatch follows
        time.sleep(0.05)
        leaving, leaving_peer = pair(timeout=5.0)
        leaving_entry = watcher.watch(leaving, pair()[0])
        leaving_peer.close()  # this client hangs up
        # well before the 5 s socket timeouts: noticed, not waited out
        self.assertTrue(wait_until(lambda: leaving_entry["gone"], 4.0),
                        "a hang-up went unnoticed")
        time.sleep(1.0)  # several more of the watcher's polls with the live client in the list
        self.assertFalse(live_entry["gone"], "a live client was taken for gone")
        live_up.settimeout(0)
        try:
            self.assertNotEqual(live_up.recv(1), b"", "a live client's upstream was cut")
        except BlockingIOError:
            pass  # still open: nothing to read, no EOF

    def test_closing_ends_the_thread_and_closes_the_duplicates(self):
        # A stopped proxy in a process that goes on (as the tests) must leave no thread.
        watcher = proxy.HangupWatcher()
        self.addCleanup(watcher.close)
        pairs = [socket.socketpair() for _ in range(3)]
        for pair in pairs:
            self.addCleanup(pair[0].close)
            self.addCleanup(pair[1].close)
        watched = watcher.watch(pairs[0][0], pairs[1][0])
        thread = watcher._thread
        self.assertTrue(thread.is_alive())
        watcher.close()
        thread.join(10.0)
        self.assertFalse(thread.is_alive(), "the watcher thread outlived close()")
        self.assertEqual(watched["peek"].fileno(), -1, "a duplicate was left open")
        watcher.unwatch(watched)  # the turn ends after the stop: nothing more to do
        late = watcher.watch(pairs[2][0], pairs[1][0])  # a turn starting after the stop
        self.assertIsNone(late["peek"])
        self.assertIsNone(watcher._thread, "a watch after close() started a thread")


# ============================================================================================
# Client WebSocket: Responses over a socket
# ============================================================================================

class WebSocketHandshakeTests(WebSocketCase):
    def test_upgrade_on_both_paths_declines_deflate_and_advertises_the_limit(self):
        for path in ("/v1/responses", "/responses"):
            client = self.ws(path, {"Sec-WebSocket-Extensions":
                                    "permessage-deflate; client_max_window_bits",
                                    "OpenAI-Beta": "responses_websockets=2026-02-06"})
            self.assertEqual(client.status, 101)
            expected = base64.b64encode(__import__("hashlib").sha1(
                client.key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
            self.assertEqual(client.headers["sec-websocket-accept"], expected)
            self.assertEqual(client.headers["upgrade"].lower(), "websocket")
            self.assertNotIn("sec-websocket-extensions", client.headers)
            self.assertEqual(client.headers["x-codex-websocket-max-message-bytes"],
                             str(self.config.max_body_bytes))
            client.create()
            events = client.response_events()
            self.assertEqual(events[-1]["type"], "response.completed")

    def test_bad_handshakes_are_refused_and_the_proxy_keeps_serving(self):
        client = self.ws(headers={"Sec-WebSocket-Key": None})
        self.assertEqual(client.status, 400)
        self.assertEqual(json.loads(client.body)["error"]["code"], "invalid_websocket_handshake")
        client = self.ws(headers={"Sec-WebSocket-Version": "8"})
        self.assertEqual(client.status, 426)
        self.assertEqual(client.headers["sec-websocket-version"], "13")
        client = self.ws(headers={"Origin": "https://evil.example"})
        self.assertEqual(client.status, 403)
        self.assertEqual(json.loads(client.body)["error"]["code"], "origin_not_allowed")
        client = self.ws(headers={"Host": "evil.example"})
        self.assertEqual(client.status, 403)
        client = self.ws(path="/v1/chat/completions")
        self.assertEqual(client.status, 426)
        self.open_ws()

    @with_proxy_options(client_key="the-client-key-123")
    def test_client_key_is_checked_on_the_upgrade(self):
        client = self.ws()
        self.assertEqual(client.status, 401)
        self.assertEqual(json.loads(client.body)["error"]["code"], "invalid_client_key")
        self.open_ws(headers={"Authorization": "Bearer the-client-key-123"})

    @with_proxy_options(max_concurrent=1)
    def test_connection_limit_is_checked_on_the_upgrade(self):
        self.backend.replies.append(Reply(hang_after=2))
        busy = self.open_ws()
        busy.create()
        self.assertEqual(busy.recv_event()["type"], "response.created")
        refused = self.ws()
        self.assertEqual(refused.status, 503)
        self.assertEqual(json.loads(refused.body)["error"]["code"], "too_many_requests")
        busy.close_socket()
        self.wait_for_log("client disconnected; upstream closed")
        self.open_ws()  # its place is free again


class WebSocketFrameTests(WebSocketCase):
    def test_ping_gets_pong_and_fragments_are_joined(self):
        client = self.open_ws()
        client.send_frame(0x9, b"are you there")
        self.assertEqual(client.recv_frame(), (0xA, b"are you there"))
        text = json.dumps({"type": "response.create", "model": "gpt-5.1-codex", "input": "hi"})
        client.send_frame(0x1, text[:10], fin=False)
        client.send_frame(0x9, b"mid")
        client.send_frame(0x0, text[10:20], fin=False)
        client.send_frame(0x0, text[20:])
        self.assertEqual(client.recv_frame(), (0xA, b"mid"))
        events = client.response_events()
        self.assertEqual(events[-1]["type"], "response.completed")
        self.assertEqual(self.last_upstream()["body"]["input"][0]["content"][0]["text"], "hi")

    def test_close_handshake_answers_the_clients_code(self):
        for payload, expected in ((b"\x03\xe8", 1000), (b"\x0f\xa0bye", 4000), (b"", None)):
            client = self.open_ws()
            client.send_frame(0x8, payload)
            self.assertEqual(client.expect_close(), expected)
            client.assert_closed(self)

    def test_protocol_errors_close_with_their_codes_and_others_are_served(self):
        other = self.open_ws()
        for kwargs, code in (({"opcode": 0x2, "payload": b"{}"}, 1003),
                             ({"opcode": 0x1, "payload": b"{}", "mask": False}, 1002),
                             ({"opcode": 0x1, "payload": b"{}", "rsv": 0x40}, 1002),
                             ({"opcode": 0x0, "payload": b"{}"}, 1002),
                             ({"opcode": 0x1, "payload": b"\xff"}, 1007)):
            client = self.open_ws()
            client.send_frame(**kwargs)
            self.assertEqual(client.expect_close(), code, kwargs)
            client.assert_closed(self)
        other.create()
        self.assertEqual(other.response_events()[-1]["type"], "response.completed")

    @with_proxy_options(max_body_bytes=4096)
    def test_message_over_the_limit_closes_with_1009(self):
        client = self.open_ws()
        self.assertEqual(client.headers["x-codex-websocket-max-message-bytes"], "4096")
        client.create(input="x" * 5000)
        self.assertEqual(client.expect_close(), 1009)
        client.assert_closed(self)
        self.assertEqual(self.backend.requests, [])
        small = self.open_ws()
        small.create(input="y" * 3000)
        self.assertEqual(small.response_events()[-1]["type"], "response.completed")

    def test_pipelined_first_frame_is_not_lost(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                     + WebSocketFramingTests.masked(0x9, b"early"))
        data = b""
        while not data.endswith(b"\x8a\x05early"):
            chunk = sock.recv(4096)
            self.assertTrue(chunk, data)
            data += chunk
        self.assertTrue(data.startswith(b"HTTP/1.1 101 "), data)

    def test_pings_answered_while_streaming_silent_upstream_pinged_idle_closed(self):
        with mock.patch.object(proxy, "WS_PING_INTERVAL", 0.05):
            client = self.open_ws()
            self.backend.replies.append(Reply(frames=[b": silence\n\n"] * 6 + stream_frames(
                text="Hi"), delay=0.05))
            client.create()
            client.send_frame(0x9, b"during")
            seen = []
            while not seen or seen[-1] != "response.completed":
                opcode, payload = client.recv_frame()
                seen.append(json.loads(payload)["type"] if opcode == 0x1 else (opcode, payload))
        self.assertIn((0xA, b"during"), seen)
        self.assertIn((0x9, b""), seen, "no ping while the upstream was silent")
        self.assertLess(seen.index((0xA, b"during")), seen.index("response.completed"))
        with mock.patch.object(proxy, "WS_CLIENT_IDLE_SECONDS", 0.3), \
                mock.patch.object(proxy, "WS_PING_INTERVAL", 0.1):
            idle = self.open_ws()
            self.assertEqual(idle.expect_close(), 1000)
            idle.send_frame(0x8, b"\x03\xe8")
            idle.assert_closed(self)


class WebSocketProtocolTests(WebSocketCase):
    def test_events_are_the_sse_data_with_output_filled(self):
        items = [reasoning_item(), function_call_item()]
        self.backend.replies.append(Reply(frames=stream_frames(items=items)))
        client = self.open_ws()
        client.create(input=[{"role": "user", "content": "weather?"}], tools=[])
        events = client.response_events()
        self.assertEqual([e["type"] for e in events][:2], ["response.created",
                                                           "response.in_progress"])
        self.assertEqual(events[-1]["response"]["output"], items)
        expected = [json.loads(f.split(b"data: ")[1]) for f in stream_frames(items=items)]
        self.assertEqual(events[:-1], expected[:-1])
        sent = self.backend.requests[0]["body"]
        self.assertNotIn("type", sent)
        self.assertEqual((sent["stream"], sent["store"]), (True, False))
        self.assertEqual(sent["input"], [{"role": "user", "content": "weather?"}])

    def test_requests_answered_in_order_with_their_stream_ids(self):
        self.backend.replies.append(Reply(frames=stream_frames(text="first"), delay=0.02))
        self.backend.replies.append(Reply(frames=stream_frames(text="second")))
        client = self.open_ws()
        client.create(input="one", stream_id="lane-a")
        client.create(input="two")
        first, second = client.response_events(), client.response_events()
        self.assertEqual({e.get("stream_id") for e in first}, {"lane-a"})
        self.assertEqual({e.get("stream_id") for e in second}, {None})
        self.assertEqual(first[-1]["response"]["output"][0]["content"][0]["text"], "first")
        self.assertEqual(second[-1]["response"]["output"][0]["content"][0]["text"], "second")
        self.assertNotIn("stream_id", self.backend.requests[0]["body"])

    def test_previous_response_id_chains_on_the_socket_even_with_store_false(self):
        self.backend.replies.append(Reply(frames=stream_frames(items=[function_call_item()])))
        client = self.open_ws()
        client.create(input="weather in Paris?", store=False)
        first = client.response_events()[-1]["response"]
        with mock.patch.object(self.proxy.app.conversations, "history", return_value=None):
            client.create(previous_response_id=first["id"], input=[
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
            self.assertEqual(client.response_events()[-1]["type"], "response.completed")
            sent = self.backend.requests[-1]["body"]
            self.assertNotIn("previous_response_id", sent)
            self.assertEqual([i.get("type") for i in sent["input"]],
                             ["message", "function_call", "function_call_output"])
            self.assertNotIn("id", sent["input"][1])
            # all of it goes with the socket
            other = self.open_ws()
            other.create(previous_response_id=first["id"], input="again")
            error = other.recv_event()
            self.assertEqual(error["error"]["code"], "previous_response_not_found")

    def test_previous_response_id_falls_back_to_the_conversation_store(self):
        status, _, body = self.post(simple_request(input="over http"))
        self.assertEqual(status, 200, body)
        client = self.open_ws()
        client.create(previous_response_id=body["id"], input="and now")
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")
        texts = [json.dumps(i) for i in self.backend.requests[-1]["body"]["input"]]
        self.assertEqual(len(texts), 3)
        self.assertIn("over http", texts[0])
        self.assertIn("and now", texts[2])

    def test_generate_false_is_answered_here_and_can_be_chained(self):
        client = self.open_ws()
        system = {"type": "message", "role": "developer",
                  "content": [{"type": "input_text", "text": "the system prompt"}]}
        client.create(input=[system], generate=False, tools=[], store=False, stream=True)
        created, completed = client.response_events()
        self.assertEqual((created["type"], completed["type"]),
                         ("response.created", "response.completed"))
        response = completed["response"]
        self.assertEqual(response["id"], created["response"]["id"])
        self.assertTrue(response["id"].startswith("resp_"))
        self.assertEqual((response["output"], response["usage"]["total_tokens"],
                          response["usage"]["input_tokens"]), ([], 0, 0))
        self.assertEqual(self.backend.requests, [])
        client.create(input=[system], generate=False)
        self.assertNotEqual(client.response_events()[-1]["response"]["id"], response["id"])
        client.create(previous_response_id=response["id"], input="the user's turn")
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")
        sent = self.backend.requests[0]["body"]
        self.assertEqual(sent["input"][0], system)
        self.assertIn("the user's turn", json.dumps(sent["input"][1]))
        self.assertEqual(len(sent["input"]), 2)

    def test_unknown_previous_response_id_is_an_error_event_and_socket_stays(self):
        client = self.open_ws()
        client.create(previous_response_id="resp_unknown", input="hi", stream_id="s1")
        error = client.recv_event()
        self.assertEqual(error["type"], "error")
        self.assertNotIn("status", error)
        self.assertEqual((error["error"]["type"], error["error"]["code"]),
                         ("invalid_request_error", "previous_response_not_found"))
        self.assertIn("resp_unknown", error["error"]["message"])
        self.assertEqual(error["stream_id"], "s1")
        client.create()
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")

    def test_upstream_http_error_is_an_error_event_with_status_and_quota_headers(self):
        self.backend.replies.append(Reply(status=429, body=json.dumps({"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "resets_in_seconds": 60}}).encode(), headers=[("x-codex-primary-used-percent",
                                                           "100")]))
        client = self.open_ws()
        client.create()
        error = client.recv_event()
        self.assertEqual((error["type"], error["status"]), ("error", 429))
        self.assertEqual(error["error"]["type"], "usage_limit_reached")
        self.assertIn("usage limit", error["error"]["message"])
        self.assertEqual(error["headers"]["x-codex-primary-used-percent"], "100")
        client.create()
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")

    def test_broken_stream_ends_with_the_http_error_event_never_completed(self):
        self.backend.replies.append(Reply(cut_after=4))
        client = self.open_ws()
        client.create()
        events = client.response_events()
        self.assertEqual(events[-1]["type"], "error")
        self.assertIn(events[-1]["code"], ("stream_incomplete", "upstream_disconnected"))
        self.assertNotIn("response.completed", [e["type"] for e in events])
        self.backend.replies.append(Reply(cut_after=4))
        sse_events = self.stream(simple_request())[2]
        self.assertEqual(sse_events[-1][1], events[-1])

    def test_a_bug_closes_its_socket_with_1011_and_others_are_served(self):
        client = self.open_ws()
        with mock.patch.object(proxy.Turns, "prepare", side_effect=RuntimeError("boom")):
            client.create()
            self.assertEqual(client.expect_close(), 1011)
        self.wait_for_log("internal error on a WebSocket request: RuntimeError: boom")
        other = self.open_ws()
        other.create()
        self.assertEqual(other.response_events()[-1]["type"], "response.completed")

    @with_proxy_options(stream_idle_timeout=0.3)
    def test_silent_stream_ends_with_the_idle_timeout_error_event(self):
        self.backend.replies.append(Reply(hang_after=3))
        client = self.open_ws()
        client.create()
        events = client.response_events()
        self.assertEqual((events[-1]["type"], events[-1]["code"]),
                         ("error", "stream_idle_timeout"))
        self.assertNotIn("response.completed", [e["type"] for e in events])
        # the control turn, on the same socket, with room for a loaded machine's pauses
        self.config.stream_idle_timeout = 30.0
        client.create()
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")

    def test_bad_messages_get_error_events_and_the_socket_keeps_serving(self):
        client = self.open_ws()
        for message in (b"{not json", b"[1, 2]", b'"str"',
                        json.dumps({"type": "response.cancel"}).encode(),
                        json.dumps({"type": "response.create", "input": 5}).encode(),
                        json.dumps({"type": "response.create", "generate": "no"}).encode(),
                        json.dumps({"type": "response.create",
                                    "previous_response_id": 7}).encode()):
            client.send_frame(0x1, message)
            error = client.recv_event()
            self.assertEqual((error["type"], error["status"]), ("error", 400), message)
            self.assertEqual(sorted(set(error["error"]) & {"message", "type", "param", "code"}),
                             ["code", "message", "param", "type"])
        self.assertEqual(self.backend.requests, [])
        client.create()
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")


class WebSocketEdgeTests(WebSocketCase):
    """What a review of the WebSocket ends found: each case fails on the code before it."""

    def test_an_event_is_not_held_back_by_a_ping_behind_it(self):
        class NoQuota:
            def update(self, headers):
                pass

        owner = proxy.WebSocketUpstream.__new__(proxy.WebSocketUpstream)
        owner.client = type("Client", (), {"quota": NoQuota()})()
        delta = json.dumps({"type": "response.output_text.delta", "delta": "hi"}).encode()
        for behind in (proxy.encode_frame(proxy.OP_PING, b"x"),
                       proxy.encode_frame(proxy.OP_TEXT, json.dumps(
                           {"type": "codex.rate_limits", "rate_limits": {}}).encode())):
            ours, backend = socket.socketpair()
            self.addCleanup(ours.close)
            self.addCleanup(backend.close)
            ours.settimeout(2)  # the event is there: reading it must not wait at all
            events = proxy.WebSocketEvents(owner, proxy.UpstreamWebSocket(ours, b"", [], None,
                                                                           "k"), None)
            backend.sendall(proxy.encode_frame(proxy.OP_TEXT, delta) + behind)
            self.assertEqual(events.read().events(), [("response.output_text.delta", delta)])

    def test_a_flood_of_requests_is_closed_with_1008(self):
        reply = Reply(frames=stream_frames(), hold_after=1)  # the first stays in flight
        self.addCleanup(reply.go)
        self.backend.replies.append(reply)
        client = self.open_ws()
        for _ in range(proxy.WS_MAX_QUEUED + 5):
            client.create()
        self.assertEqual(client.expect_close(), 1008)

    def test_a_client_that_keeps_pinging_still_gets_1001_at_shutdown(self):
        client = self.open_ws()
        stop = threading.Event()
        self.addCleanup(stop.set)

        def keep_pinging():
            while not stop.wait(0.1):
                try:
                    client.send_frame(0x9, b"k")
                except OSError:
                    return

        threading.Thread(target=keep_pinging, daemon=True).start()
        self.proxy.app.begin_shutdown("test")
        client.sock.settimeout(10)
        deadline = time.monotonic() + 10  # pongs keep coming: only the close ends this
        code = None
        while code is None and time.monotonic() < deadline:
            opcode, payload = client.recv_frame()
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
        self.assertEqual(code, 1001)

    def test_a_101_without_quota_headers_keeps_the_quota(self):
        quota = proxy.QuotaTracker()
        quota.update([("x-codex-primary-used-percent", "40"),
                      ("x-codex-primary-window-minutes", "300")])
        quota.update([("x-codex-turn-state", "abc"),
                      ("x-codex-websocket-max-message-bytes", "1000000")])
        self.assertEqual(quota.snapshot()["primary"]["used_percent"], 40.0)


class WebSocketStrictnessTests(WebSocketCase):
    """RFC 6455 where the proxy was lenient (issue 19): each case fails on the code before."""

    def test_an_upgrade_over_http_1_0_or_without_connection_upgrade_is_400(self):
        client = self.ws(headers={"Connection": None})
        self.assertEqual(client.status, 400)
        self.assertEqual(json.loads(client.body)["error"]["code"], "invalid_websocket_handshake")
        self.assertIn("Connection: Upgrade", json.loads(client.body)["error"]["message"])
        client = self.ws(headers={"Connection": "keep-alive"})
        self.assertEqual(client.status, 400)
        key = base64.b64encode(os.urandom(16)).decode()
        answer, _ = exchange(self.port, (
            "GET /v1/responses HTTP/1.0\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            "\r\n" % (self.port, key)).encode(), close_wait=10, half_close=False)
        self.assertTrue(answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "),
                        answer[:80])
        self.assertIn(b"HTTP/1.1", answer.partition(b"\r\n\r\n")[2])
        # the usual upgrade, with Connection listing more than one token, still works
        self.open_ws(headers={"Connection": "keep-alive, Upgrade"})

    def burst(self, client, count):
        message = json.dumps({"type": "response.create", "model": "gpt-5.1-codex",
                              "input": "hi"}).encode()
        client.sock.sendall(WebSocketFramingTests.masked(1, message) * count)

    def test_17_requests_in_one_burst_are_one_in_flight_and_16_waiting(self):
        reply = Reply(frames=stream_frames(), hold_after=1)
        self.addCleanup(reply.go)
        self.backend.replies.append(reply)
        client = self.open_ws()
        self.burst(client, proxy.WS_MAX_QUEUED + 1)
        self.assertTrue(reply.wait_held())
        reply.go()
        for _ in range(proxy.WS_MAX_QUEUED + 1):
            self.assertEqual(client.response_events()[-1]["type"], "response.completed")

    @with_proxy_options(max_body_bytes=100000)
    def test_waiting_requests_hold_at_most_max_body_bytes_together(self):
        for count, closed in ((2, False), (3, True)):
            reply = Reply(frames=stream_frames(), hold_after=1)
            self.addCleanup(reply.go)
            self.backend.replies.append(reply)
            client = self.open_ws()
            client.create(input="x" * 60000)  # in flight
            self.assertTrue(reply.wait_held())
            for _ in range(count - 1):  # then waiting: 60 KB fits, 120 KB does not
                client.create(input="y" * 55000)
            if closed:
                self.assertEqual(client.expect_close(), 1008)
                continue
            reply.go()
            for _ in range(count):
                self.assertEqual(client.response_events()[-1]["type"], "response.completed")

    def test_the_18th_request_of_a_burst_is_refused_with_1008(self):
        reply = Reply(frames=stream_frames(), hold_after=1)
        self.addCleanup(reply.go)
        self.backend.replies.append(reply)
        client = self.open_ws()
        self.burst(client, proxy.WS_MAX_QUEUED + 2)
        self.assertEqual(client.expect_close(), 1008)


class WebSocketLifecycleTests(WebSocketCase):
    def test_client_hang_up_or_close_mid_stream_cuts_the_upstream(self):
        for how in ("close frame", "dropped TCP"):
            self.backend.closed_early.clear()
            self.backend.replies.append(Reply(frames=stream_frames(text="x" * 400), delay=0.05))
            client = self.open_ws()
            client.create()
            self.assertEqual(client.recv_event()["type"], "response.created")
            if how == "close frame":
                client.send_frame(0x8, b"\x03\xe8")
            else:
                client.sock.shutdown(socket.SHUT_RDWR)
                client.close_socket()
            self.assertTrue(self.backend.closed_early.wait(10), how)
            self.wait_for_log("client disconnected; upstream closed")

    def test_shutdown_finishes_the_response_then_closes_with_1001(self):
        self.backend.replies.append(Reply(delay=0.05))
        client = self.open_ws()
        idle = self.open_ws()
        client.create()
        self.assertEqual(client.recv_event()["type"], "response.created")
        self.proxy.app.begin_shutdown("test")
        events = client.response_events()
        self.assertEqual(events[-1]["type"], "response.completed")
        self.assertEqual(client.expect_close(), 1001)
        self.assertEqual(idle.expect_close(), 1001)

    def test_log_line_per_response_and_status_counts(self):
        client = self.open_ws()
        client.create()
        client.response_events()
        client.create(previous_response_id="resp_nope")
        client.recv_event()
        line = self.wait_for_log("error=previous_response_not_found")
        self.assertIn("WS /v1/responses", line)
        self.assertIn("websocket", line)
        first = [l for l in self.log_text().splitlines() if "WS /v1/responses" in l][0]
        self.assertIn("model=gpt-5.1-codex status=200", first)
        self.assertIn("tokens in=21 out=5", first)
        status = self.request("GET", "/status")
        report = json.loads(status[2])["websocket"]
        self.assertEqual(report, {"connections_open": 1, "connections_total": 1,
                                  "responses": 2})
        client.send_frame(0x8, b"\x03\xe8")
        client.expect_close()
        self.wait_for_log("websocket closed after 2 responses")
        report = json.loads(self.request("GET", "/status")[2])["websocket"]
        self.assertEqual(report["connections_open"], 0)


class SocketMemoryTests(unittest.TestCase):
    """Issue 19: a socket's kept responses share their history and stay within the
    socket's cap and, with all sockets together, the store's."""

    @staticmethod
    def text(n):
        return os.urandom(n // 2).hex()  # does not compress: bytes are what they seem

    def test_a_chain_shares_its_history_instead_of_copying_it(self):
        kept = proxy.SocketResponses(max_count=4, max_bytes=10 ** 8)
        history, previous = [], None
        for n in range(6):
            history = history + [{"turn": n, "t": self.text(100000)}]
            kept.put("r%d" % n, history, previous)
            previous = "r%d" % n
        self.assertEqual(kept.get("r5"), history)
        self.assertEqual(kept.get("r3"), history[:4])
        self.assertIsNone(kept.get("r1"), "four heads at most")
        # six turns of 100 KB: what six of them pack to, not what 1+2+...+6 do
        one = len(proxy.pack_json(json.dumps(history[0])))
        self.assertLess(kept.bytes, 6.5 * one)
        self.assertGreater(kept.bytes, 5.5 * one)
        # a parent whose items are not the start of the new ones is not linked
        kept.put("other", [{"t": "x"}], "r5")
        self.assertEqual(kept.get("other"), [{"t": "x"}])

    def test_dropping_heads_frees_what_only_they_held(self):
        kept = proxy.SocketResponses(max_count=2, max_bytes=10 ** 8)
        kept.put("a", [{"t": self.text(100000)}])
        kept.put("b", kept.get("a") + [{"t": self.text(100000)}], "a")
        kept.put("c", [{"t": "small"}])
        self.assertIsNone(kept.get("a"))
        self.assertEqual(len(kept.get("b")), 2, "b still holds a's items")
        self.assertGreater(kept.bytes, 2 * len(proxy.pack_json(self.text(100000))) - 1000)
        kept.put("d", [{"t": "small"}])  # c goes: b was used since
        kept.put("e", [{"t": "small"}])
        self.assertTrue(kept.get("b") is None)
        self.assertLess(kept.bytes, 1000)
        kept.close()
        self.assertEqual(kept.bytes, 0)

    def test_all_sockets_together_stay_within_the_shared_cap(self):
        memory = proxy.SocketMemory(1000000)
        sockets = [proxy.SocketResponses(memory, max_count=4, max_bytes=400000)
                   for _ in range(10)]
        for round_ in range(3):
            for i, kept in enumerate(sockets):
                kept.put("r%d-%d" % (i, round_), [{"t": self.text(150000)}])
                self.assertLessEqual(memory.bytes, 1000000)
                self.assertLessEqual(kept.bytes, 400000)
        self.assertIsNotNone(sockets[-1].get("r9-2"), "the newest stays")
        self.assertIsNone(sockets[0].get("r0-0"), "the least recently used went")
        self.assertEqual(memory.bytes, sum(k.bytes for k in sockets))
        for kept in sockets:
            kept.close()
        self.assertEqual(memory.bytes, 0)

    def test_a_budget_stops_a_get_before_unpacking(self):
        kept = proxy.SocketResponses(max_count=4, max_bytes=10 ** 8)
        kept.put("a", [{"t": self.text(100000)}])
        with self.assertRaises(proxy.ProxyError) as caught:
            kept.get("a", proxy.ExpansionBudget(50000))
        self.assertEqual(caught.exception.code, "input_too_large")


class SocketKeptMemoryTests(WebSocketCase):
    """Issue 19: what sockets keep for previous_response_id, over real sockets."""

    def prewarm(self, client, text, previous=None):
        extra = {"previous_response_id": previous} if previous else {}
        client.create(input=[user_item(text)], generate=False, **extra)
        events = client.response_events()
        self.assertEqual(events[-1]["type"], "response.completed", events[-1])
        return events[-1]["response"]["id"]

    def test_a_chain_costs_what_its_turns_added_and_goes_with_the_socket(self):
        memory = self.proxy.app.socket_memory
        client = self.open_ws()
        previous, turn = None, os.urandom(100000).hex()
        for n in range(6):
            previous = self.prewarm(client, turn + str(n), previous)
        one = len(proxy.pack_json(json.dumps([user_item(turn)])))
        self.assertLess(memory.bytes, 7 * one, "6 turns, not 1+2+...+6 copies of history")
        client.create(previous_response_id=previous, input="go on")
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")
        self.assertEqual(len(self.backend.requests[-1]["body"]["input"]), 7)
        client.send_frame(0x8, b"\x03\xe8")
        client.expect_close()
        self.wait_for(lambda: memory.bytes == 0, "the socket's kept responses to go")

    @with_proxy_options(state_max_mb=1)
    def test_all_sockets_together_stay_within_the_store_cap(self):
        memory = self.proxy.app.socket_memory
        self.assertEqual(memory.max_bytes, 1 << 20)
        clients = [self.open_ws() for _ in range(4)]
        for round_ in range(3):
            for client in clients:
                self.prewarm(client, os.urandom(200000).hex())
                self.assertLessEqual(memory.bytes, 1 << 20)
        self.assertGreater(memory.bytes, 1 << 19)


# ============================================================================================
# Stores: conversations, stored responses, previous_response_id, --state-db, compaction
# ============================================================================================

def stored_response(resp_id, *output, **extra):
    """A response object as the relay assembles it."""
    response = {"id": resp_id, "object": "response", "created_at": 1700000000,
                "status": "completed", "model": MODEL, "output": list(output),
                "usage": USAGE, "error": None, "incomplete_details": None}
    response.update(extra)
    return response


def input_json(*items):
    return json.dumps(list(items), separators=(",", ":"))


class StoreContract:
    """What both stores promise; a subclass says how to make one."""

    def make_store(self, max_bytes=64 * 1024 * 1024):
        raise NotImplementedError

    def setUp(self):
        self.store = self.make_store()

    def save_chain(self, store=None):
        """resp_a (with readable and unreadable reasoning, a message, a call), resp_b after it."""
        store = store or self.store
        unreadable = {"type": "reasoning", "id": "rs_bare", "summary": []}
        store.save(stored_response("resp_a", reasoning_item(), unreadable,
                                   message_item("Answer A", "msg_a"), function_call_item()),
                   None, input_json(user_item("question A")))
        store.save(stored_response("resp_b", message_item("Answer B", "msg_b")), "resp_a",
                   input_json({"type": "function_call_output", "call_id": "call_1",
                               "output": "sunny"}, user_item("question B")))

    def test_history_replays_the_chain_as_the_backend_takes_it(self):
        self.save_chain()
        self.assertEqual(self.store.history("resp_b"), [
            user_item("question A"), {k: v for k, v in reasoning_item().items() if k != "id"},
            replayed_item("Answer A"),
            {k: v for k, v in function_call_item().items() if k != "id"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            user_item("question B"), replayed_item("Answer B")])
        self.assertIsNone(self.store.history("resp_unknown"))

    def test_get_gives_the_response_as_it_was_answered(self):
        self.save_chain()
        response = stored_response("resp_b", message_item("Answer B", "msg_b"))
        self.assertEqual(self.store.get("resp_b"), response)
        self.assertEqual(list(self.store.get("resp_b")), list(response))  # the API's key order
        self.assertIsNone(self.store.get("resp_unknown"))

    def test_the_cap_counts_compressed_bytes(self):
        store = self.make_store(max_bytes=1024 * 1024)
        big = user_item("the same long paragraph, over and over. " * 50000)  # 2 MB of JSON
        for n in range(5):
            store.save(stored_response("resp_%d" % n, message_item("ok")), None,
                       input_json(big))
        for n in range(5):  # 10 MB of JSON under a 1 MB cap: all still there
            self.assertEqual(store.history("resp_%d" % n), [big, replayed_item("ok")])

    def test_past_the_cap_the_least_recently_used_go_with_their_items(self):
        rng = random.Random(7)  # text that hardly compresses: an entry's kept size is known
        texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000))
                 for _ in range(6)]
        entry = len(zlib.compress((texts[0] + texts[1]).encode(), 1))
        store = self.make_store(max_bytes=int(2.5 * entry))  # two entries fit, not three
        for n, name in enumerate("abc"):
            store.save(stored_response("resp_" + name, message_item(texts[2 * n],
                                                                    "msg_" + name)),
                       None, input_json(user_item(texts[2 * n + 1])))
            if name == "b":
                store.history("resp_a")  # resp_a used: resp_b is now the least recently used
        self.assertIsNone(store.history("resp_b"))
        self.assertIsNotNone(store.history("resp_a"))
        self.assertIsNotNone(store.history("resp_c"))
        with self.assertRaises(proxy.ProxyError) as caught:
            store.expand_references([{"type": "item_reference", "id": "msg_b"}])
        self.assertEqual(caught.exception.code, "item_reference_not_found")
        self.assertEqual(len(store.expand_references([{"type": "item_reference",
                                                       "id": "msg_a"}])), 1)

    def test_input_items_are_the_whole_context_each_with_a_stable_id(self):
        self.save_chain()
        items = self.store.input_items("resp_b")
        self.assertEqual([item.get("type") for item in items], [
            "message", "reasoning", "reasoning", "message", "function_call",
            "function_call_output", "message"])
        self.assertEqual([item["id"] for item in items][1:5],
                         ["rs_1", "rs_bare", "msg_a", "fc_1"])  # output items keep theirs
        made = [items[0]["id"], items[5]["id"], items[6]["id"]]
        self.assertEqual(len(set(made)), 3)
        self.assertEqual(self.store.input_items("resp_b"), items)  # the same ids every time
        self.assertEqual({k: v for k, v in items[6].items() if k != "id"},
                         user_item("question B"))
        own = self.store.input_items("resp_a")
        self.assertEqual(own, [items[0]])
        self.assertIsNone(self.store.input_items("resp_unknown"))

    def test_item_references_expand_to_replayable_items(self):
        self.save_chain()
        self.store.save(stored_response("resp_c"), "resp_b", input_json(
            dict(user_item("with an id"), id="msg_client")))
        expanded = self.store.expand_references([
            user_item("next"), {"type": "item_reference", "id": "msg_a"},
            {"type": "item_reference", "id": "rs_1"}, {"type": "item_reference", "id": "rs_bare"},
            {"id": "fc_1"}, {"type": None, "id": "msg_client"}])
        self.assertEqual(expanded, [
            user_item("next"), replayed_item("Answer A"),
            {k: v for k, v in reasoning_item().items() if k != "id"},
            # rs_bare: reasoning without encrypted_content, which the backend cannot read: gone
            {k: v for k, v in function_call_item().items() if k != "id"},
            user_item("with an id")])
        plain = [user_item("no references")]
        self.assertIs(self.store.expand_references(plain), plain)

    def test_an_unknown_reference_says_what_to_do(self):
        self.save_chain()
        for ref in ({"type": "item_reference", "id": "msg_never"},
                    {"type": "item_reference", "id": ["not", "a", "string"]}):
            with self.assertRaises(proxy.ProxyError) as caught:
                self.store.expand_references([user_item("x"), ref])
            error = caught.exception.body()["error"]
            self.assertEqual((caught.exception.status, error["param"], error["code"]),
                             (400, "input", "item_reference_not_found"))
            self.assertIn(repr(ref["id"]), error["message"])
            self.assertIn("store: false", error["message"])

    def test_delete_makes_the_id_name_nothing(self):
        self.save_chain()
        self.store.save(stored_response("resp_x", message_item("X", "msg_x")), None,
                        input_json(user_item("alone")))
        self.assertTrue(self.store.delete("resp_x"))
        self.assertFalse(self.store.delete("resp_x"))
        self.assertFalse(self.store.delete("resp_never"))
        self.assertIsNone(self.store.get("resp_x"))
        self.assertIsNone(self.store.history("resp_x"))
        self.assertIsNone(self.store.input_items("resp_x"))
        with self.assertRaises(proxy.ProxyError):
            self.store.expand_references([{"type": "item_reference", "id": "msg_x"}])
        self.assertIsNotNone(self.store.get("resp_a"))  # the others are untouched

    def test_a_deleted_parent_still_links_its_children(self):
        self.save_chain()
        before = self.store.history("resp_b")
        items_before = self.store.input_items("resp_b")
        self.assertTrue(self.store.delete("resp_a"))
        self.assertIsNone(self.store.get("resp_a"))
        self.assertIsNone(self.store.history("resp_a"))
        self.assertIsNone(self.store.input_items("resp_a"))
        with self.assertRaises(proxy.ProxyError):
            self.store.expand_references([{"type": "item_reference", "id": "msg_a"}])
        self.assertFalse(self.store.delete("resp_a"))
        self.assertEqual(self.store.history("resp_b"), before)
        self.assertEqual(self.store.input_items("resp_b"), items_before)
        self.assertIsNotNone(self.store.get("resp_b"))
        # once its last continuation is deleted too, nothing of the chain is left
        self.assertTrue(self.store.delete("resp_b"))
        self.assertEqual(self.kept_ids(self.store), [])

    def test_concurrent_saves_reads_and_deletes_stay_consistent(self):
        store = self.make_store(max_bytes=40 * 1024)  # small: eviction runs all along
        errors, barrier = [], threading.Barrier(6)

        def worker(w):
            try:
                barrier.wait(10)
                previous = None
                for n in range(40):
                    rid = "resp_w%d_%d" % (w, n)
                    store.save(stored_response(rid, message_item("a %d %d" % (w, n),
                                                                 "msg_w%d_%d" % (w, n))),
                               previous, input_json(user_item("q %d %d %s" % (
                                   w, n, os.urandom(200).hex()))))
                    history = store.history(rid)
                    if history is not None:  # None only if eviction took a link meanwhile
                        if history[-1] != replayed_item("a %d %d" % (w, n)):
                            errors.append(("wrong history", rid))
                    store.input_items(rid)
                    store.get(rid)
                    if n % 7 == 3:
                        store.delete(rid)
                        previous = None
                    else:
                        previous = rid
            except Exception as e:  # pragma: no cover - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assert_consistent(store, 40 * 1024)


class MemoryConversationStoreTests(StoreContract, unittest.TestCase):
    def make_store(self, max_bytes=64 * 1024 * 1024):
        return proxy.ConversationStore(max_bytes)

    def kept_ids(self, store):
        return list(store._entries)

    def assert_consistent(self, store, cap):
        sizes = [size for _, _, size in store._entries.values()]
        self.assertEqual(store._bytes, sum(sizes))
        self.assertLessEqual(store._bytes, cap)
        for item_id, owner in store._owners.items():
            self.assertIn(owner, store._entries, item_id)


class SQLiteConversationStoreTests(StoreContract, unittest.TestCase):
    def make_store(self, max_bytes=64 * 1024 * 1024, path=None):
        if not hasattr(self, "dbdir"):
            self.dbdir = tempfile.mkdtemp(prefix="store-")
            self.addCleanup(shutil.rmtree, self.dbdir, True)
        path = path or os.path.join(self.dbdir, "state-%d.sqlite" % random.randrange(10 ** 9))
        store = proxy.SQLiteConversationStore(path, max_bytes)
        self.addCleanup(store.close)
        store.path = path
        return store

    def kept_ids(self, store):
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            return [row[0] for row in db.execute("SELECT id FROM responses")]

    def assert_consistent(self, store, cap):
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            total = db.execute("SELECT bytes FROM total").fetchone()[0]
            self.assertEqual(total, db.execute("SELECT SUM(size) FROM responses").fetchone()[0])
            self.assertLessEqual(total, cap)
            orphans = db.execute("SELECT COUNT(*) FROM items WHERE response NOT IN "
                                 "(SELECT id FROM responses)").fetchone()[0]
            self.assertEqual(orphans, 0)

    def test_rows_hold_compressed_json(self):
        big = user_item("the same long paragraph, over and over. " * 50000)
        self.store.save(stored_response("resp_big", message_item("ok")), None, input_json(big))
        with contextlib.closing(sqlite3.connect(self.store.path)) as db:
            kind, length = db.execute("SELECT typeof(input), length(input) FROM responses "
                                      "WHERE id = 'resp_big'").fetchone()
        self.assertEqual(kind, "blob")
        self.assertLess(length, len(input_json(big)) / 20)

    def test_everything_survives_a_reopen(self):
        self.save_chain()
        path = self.store.path
        self.store.close()
        store = self.make_store(path=path)
        self.assertEqual(store.get("resp_b"),
                         stored_response("resp_b", message_item("Answer B", "msg_b")))
        self.assertEqual(len(store.input_items("resp_b")), 7)
        self.assertEqual(store.expand_references([{"type": "item_reference", "id": "msg_a"}]),
                         [replayed_item("Answer A")])
        self.assertTrue(store.delete("resp_a"))
        self.assertEqual(len(store.history("resp_b")), 7)

    def make_version_1_file(self):
        """A --state-db as the previous version wrote it: plain JSON text, no items table."""
        path = os.path.join(self.dbdir, "v1.sqlite")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            for statement in (
                    "CREATE TABLE responses (id TEXT PRIMARY KEY, parent TEXT, input BLOB NOT NULL,"
                    " output TEXT NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL)",
                    "CREATE INDEX responses_used ON responses (used)",
                    "CREATE TABLE total (bytes INTEGER NOT NULL)",
                    "PRAGMA user_version = 1"):
                db.execute(statement)
            old_in = input_json(user_item("old question"))
            old_out = input_json(replayed_item("old answer"))
            db.execute("INSERT INTO responses VALUES ('resp_old', NULL, ?, ?, ?, 1.0)",
                       (old_in, old_out, len(old_in) + len(old_out)))
            db.execute("INSERT INTO total VALUES (?)", (len(old_in) + len(old_out),))
        return path

    def test_a_version_1_file_is_migrated_and_its_chains_still_serve(self):
        self.make_store()  # sets up the temporary directory
        path = self.make_version_1_file()
        store = self.make_store(path=path)
        store.save(stored_response("resp_new", message_item("new answer")), "resp_old",
                   input_json(user_item("new question")))
        self.assertEqual(store.history("resp_new"), [
            user_item("old question"), replayed_item("old answer"),
            user_item("new question"), replayed_item("new answer")])
        self.assertIsNone(store.get("resp_old"))  # version 1 kept no response objects
        self.assertEqual(len(store.input_items("resp_new")), 3)
        store.close()
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 2)
            db.execute("PRAGMA user_version = 1")  # a version 1 proxy sharing the file
        store = self.make_store(path=path)  # opens again without trying to add columns twice
        self.assertEqual(len(store.history("resp_new")), 4)
        self.assert_consistent(store, 64 * 1024 * 1024)


class InputItemsPageTests(unittest.TestCase):
    ITEMS = [{"id": "item_%02d" % n, "type": "message"} for n in range(45)]

    def ids(self, page):
        return [item["id"] for item in page["data"]]

    def test_default_is_twenty_newest_first(self):
        page = proxy.input_items_page(self.ITEMS)
        self.assertEqual(self.ids(page), ["item_%02d" % n for n in range(44, 24, -1)])
        self.assertEqual((page["object"], page["first_id"], page["last_id"], page["has_more"]),
                         ("list", "item_44", "item_25", True))

    def test_pages_follow_after_to_the_end(self):
        seen, after = [], None
        while True:
            page = proxy.input_items_page(self.ITEMS, after=after, limit="20", order="asc")
            seen += self.ids(page)
            if not page["has_more"]:
                break
            after = page["last_id"]
        self.assertEqual(seen, [item["id"] for item in self.ITEMS])
        self.assertEqual(len(page["data"]), 5)

    def test_limits_and_empty_pages(self):
        page = proxy.input_items_page(self.ITEMS, limit="100", order="desc")
        self.assertEqual((len(page["data"]), page["has_more"]), (45, False))
        page = proxy.input_items_page(self.ITEMS, after="item_44", order="asc")
        self.assertEqual(page, {"object": "list", "data": [], "first_id": None,
                                "last_id": None, "has_more": False})
        page = proxy.input_items_page(self.ITEMS, after="item_01", limit="1")
        self.assertEqual((self.ids(page), page["has_more"]), (["item_00"], False))

    def test_bad_parameters_are_400_naming_them(self):
        for kwargs, param in (({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                              ({"limit": "ten"}, "limit"), ({"order": "newest"}, "order"),
                              ({"after": "item_nope"}, "after")):
            with self.assertRaises(proxy.ProxyError) as caught:
                proxy.input_items_page(self.ITEMS, **kwargs)
            self.assertEqual((caught.exception.status, caught.exception.param), (400, param),
                             kwargs)
            self.assertIn(param, caught.exception.message)

    def test_a_missing_response_is_a_404_that_says_why(self):
        error = proxy.stored_response_not_found("resp_gone")
        body = error.body()["error"]
        self.assertEqual((error.status, body["code"]), (404, "response_not_found"))
        for words in ("resp_gone", "store: false", "--state-db", "deleted"):
            self.assertIn(words, body["message"])


class ConversationCase(ProxyTestCase):
    def turn(self, resp_id, body, items=None, stream=False, path="/v1/responses"):
        """One Responses request answered by the backend as resp_id with these output items
        (default: one message); returns the answer (dict, or the completed event's response)."""
        items = [message_item("answer of " + resp_id, "msg_" + resp_id)] if items is None \
            else items
        self.backend.replies.append(Reply(frames=with_id(stream_frames(items), resp_id)))
        if isinstance(body, str):
            body = simple_request(body)
        if stream:
            status, _, events, raw = self.stream(body)
            self.assertEqual(status, 200, raw[-500:])
            self.assertEqual(events[-1][0], "response.completed", raw[-500:])
            return events[-1][1]["response"]
        status, _, answer = self.post(body, path=path)
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["id"], resp_id)
        return answer

    def get(self, path, **kw):
        status, headers, data = self.request("GET", path, **kw)
        return status, json.loads(data)

    def assert_not_found(self, method, path, resp_id):
        status, _, data = self.request(method, path)
        body = json.loads(data)
        self.assert_openai_error(status, body, 404, code="response_not_found", contains=resp_id)


class StoredResponseEndpointTests(ConversationCase):
    def test_retrieve_gives_the_response_as_answered(self):
        answered = self.turn("resp_a", "first")
        for prefix in ("/v1", ""):
            status, got = self.get(prefix + "/responses/resp_a")
            self.assertEqual(status, 200, got)
            self.assertEqual(got, answered)
        streamed = self.turn("resp_s", "second", stream=True)
        status, got = self.get("/v1/responses/resp_s")
        self.assertEqual((status, got["output"]), (200, streamed["output"] or got["output"]))
        self.assertEqual((got["id"], got["object"], got["status"], got["usage"]),
                         ("resp_s", "response", "completed", USAGE))
        self.assertEqual(got["output"], [message_item("answer of resp_s", "msg_resp_s")])
        self.assertEqual(len(self.backend.requests), 2, "retrieval asks the backend nothing")

    def test_input_items_list_the_chain_with_paging(self):
        self.turn("resp_a", "q1")
        self.turn("resp_b", simple_request("q2", previous_response_id="resp_a"))
        self.turn("resp_c", simple_request("q3", previous_response_id="resp_b"))
        status, page = self.get("/v1/responses/resp_c/input_items")
        self.assertEqual(status, 200, page)
        self.assertEqual((page["object"], page["has_more"]), ("list", False))
        texts = [item["content"][0]["text"] for item in page["data"]]
        self.assertEqual(texts, ["q3", "answer of resp_b", "q2", "answer of resp_a", "q1"])
        ids = [item["id"] for item in page["data"]]
        self.assertEqual(len(set(ids)), 5, ids)
        self.assertEqual((page["first_id"], page["last_id"]), (ids[0], ids[-1]))
        self.assertIn("msg_resp_a", ids)
        # ascending, two at a time, following `after` to the end; the same ids every call
        seen, after = [], None
        while True:
            query = "?order=asc&limit=2" + ("&after=" + after if after else "")
            status, page = self.get("/responses/resp_c/input_items" + query)
            self.assertEqual(status, 200, page)
            seen += [item["id"] for item in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        self.assertEqual(seen, ids[::-1])
        for query, param in (("?limit=0", "limit"), ("?limit=101", "limit"),
                             ("?order=newest", "order"), ("?after=nope", "after")):
            with self.subTest(query=query):
                status, body = self.get("/v1/responses/resp_c/input_items" + query)
                self.assert_openai_error(status, body, 400, code="invalid_value")
                self.assertEqual(body["error"]["param"], param)

    def test_delete_makes_the_id_gone_for_every_use(self):
        self.turn("resp_a", "q1")
        self.turn("resp_b", simple_request("q2", previous_response_id="resp_a"))
        status, _, data = self.request("DELETE", "/v1/responses/resp_a")
        self.assertEqual((status, json.loads(data)),
                         (200, {"id": "resp_a", "object": "response", "deleted": True}))
        for method, path in (("GET", "/v1/responses/resp_a"), ("DELETE", "/v1/responses/resp_a"),
                             ("GET", "/v1/responses/resp_a/input_items"),
                             ("POST", "/v1/responses/resp_a/cancel")):
            with self.subTest(method=method, path=path):
                self.assert_not_found(method, path, "resp_a")
        before = len(self.backend.requests)
        status, _, body = self.post(simple_request("again", previous_response_id="resp_a"))
        self.assert_openai_error(status, body, 400, code="previous_response_not_found")
        status, _, body = self.post(simple_request(input=[
            {"type": "item_reference", "id": "msg_resp_a"}, user_item("again")]))
        self.assert_openai_error(status, body, 400, code="item_reference_not_found")
        self.assertEqual(len(self.backend.requests), before, "sent upstream anyway")
        # what continued it goes on with the whole conversation
        self.turn("resp_c", simple_request("q3", previous_response_id="resp_b"))
        self.assertEqual([i["content"][0]["text"] for i in self.last_upstream()["body"]["input"]],
                         ["q1", "answer of resp_a", "q2", "answer of resp_b", "q3"])
        status, _, data = self.request("DELETE", "/responses/resp_b")  # without /v1
        self.assertEqual((status, json.loads(data)["deleted"]), (200, True))
        self.assert_not_found("GET", "/responses/resp_b", "resp_b")

    def test_with_state_db_they_survive_a_restart_and_so_does_a_delete(self):
        db = os.path.join(self.home, "state.sqlite")

        def restart():
            self.stop_proxy(self.proxy)
            self.start_proxy(state_db=db)

        restart()
        answered = self.turn("resp_a", simple_request(input=[user_item("q1")]))
        self.turn("resp_b", simple_request("q2", previous_response_id="resp_a"))
        restart()
        self.assertEqual(self.get("/v1/responses/resp_a"), (200, answered))
        status, page = self.get("/v1/responses/resp_b/input_items?order=asc")
        self.assertEqual([i["content"][0]["text"] for i in page["data"]],
                         ["q1", "answer of resp_a", "q2"])
        self.assertEqual(self.request("DELETE", "/v1/responses/resp_a")[0], 200)
        restart()
        self.assert_not_found("GET", "/v1/responses/resp_a", "resp_a")
        self.turn("resp_c", simple_request("q3", previous_response_id="resp_b"))
        self.assertEqual(len(self.last_upstream()["body"]["input"]), 5)

    def test_unknown_ids_are_404_in_openai_shape(self):
        for prefix in ("/v1", ""):
            for method, tail in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"),
                                 ("POST", "/cancel")):
                path = prefix + "/responses/resp_never" + tail
                with self.subTest(method=method, path=path):
                    self.assert_not_found(method, path, "resp_never")
        self.assertEqual(self.backend.requests, [])

    def test_wrong_methods_are_405_naming_the_right_ones(self):
        for method, path, allow in (("POST", "/v1/responses/resp_a", "DELETE, GET"),
                                    ("GET", "/v1/responses/resp_a/cancel", "POST"),
                                    ("DELETE", "/v1/responses/resp_a/input_items", "GET"),
                                    ("GET", "/v1/responses/compact", "POST"),
                                    ("GET", "/v1/responses/input_tokens", "POST")):
            with self.subTest(method=method, path=path):
                status, headers, data = self.request(method, path)
                self.assert_openai_error(status, json.loads(data), 405)
                self.assertEqual(headers["allow"], allow)

    def test_cancel_and_input_tokens_say_why_the_subscription_cannot(self):
        self.turn("resp_a", "q1")
        for path in ("/v1/responses/resp_a/cancel", "/responses/resp_a/cancel"):
            status, _, body = self.post({}, path=path)
            self.assert_openai_error(status, body, 400, code="background_not_supported",
                                     contains="subscription")
        for path in ("/v1/responses/input_tokens", "/responses/input_tokens"):
            status, _, body = self.post(simple_request(), path=path)
            self.assert_openai_error(status, body, 400, code="input_tokens_not_supported",
                                     contains="subscription")
        self.assertEqual(len(self.backend.requests), 1)

    def test_store_false_responses_are_not_kept(self):
        self.turn("resp_kept", "q0")
        self.turn("resp_x", simple_request("q1", store=False))
        self.turn("resp_y", simple_request("q2", store=False, stream=True), stream=True)
        self.assertIs(self.last_upstream()["body"]["store"], False)
        for resp_id in ("resp_x", "resp_y"):
            with self.subTest(resp_id=resp_id):
                self.assert_not_found("GET", "/v1/responses/" + resp_id, resp_id)
                self.assert_not_found("GET", "/v1/responses/%s/input_items" % resp_id, resp_id)
                status, _, body = self.post(simple_request("more", previous_response_id=resp_id))
                self.assert_openai_error(status, body, 400, code="previous_response_not_found")
                status, _, body = self.post(simple_request(input=[
                    {"type": "item_reference", "id": "msg_" + resp_id}]))
                self.assert_openai_error(status, body, 400, code="item_reference_not_found")
        self.assertEqual(self.get("/v1/responses/resp_kept")[0], 200, "control")

    @with_proxy_options(client_key=CLIENT_KEY.encode())
    def test_client_key_guards_every_new_endpoint(self):
        key = {"Authorization": "Bearer " + CLIENT_KEY}
        self.backend.replies.append(Reply(frames=with_id(stream_frames(), "resp_a")))
        self.assertEqual(self.post(simple_request(), key)[0], 200)
        calls = [("GET", "/v1/responses/resp_a", None, 200),
                 ("GET", "/responses/resp_a/input_items", None, 200),
                 ("POST", "/v1/responses/compact", simple_request(), 200),
                 ("POST", "/responses/resp_a/cancel", {}, 400),
                 ("POST", "/v1/responses/input_tokens", simple_request(), 400),
                 ("DELETE", "/v1/responses/resp_a", None, 200)]
        for method, path, body, expected in calls:
            with self.subTest(method=method, path=path):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
                    status, _, data = self.request(method, path, body, headers)
                    self.assert_openai_error(status, json.loads(data), 401,
                                             code="invalid_client_key")
                status, _, data = self.request(method, path, body, {"x-api-key": CLIENT_KEY})
                self.assertEqual(status, expected, data)
        self.assertEqual([r["path"] for r in self.backend.requests],
                         ["/backend-api/codex/responses", "/backend-api/codex/responses/compact"])


class DeleteDuringTurnTests(ConversationCase):
    """Issue 19: a response that a turn in flight continues survives a delete as hidden
    history until that turn is kept (or fails)."""

    def start_slow_turn(self, resp_id, previous, reply=None):
        reply = reply or Reply(frames=with_id(stream_frames(), resp_id), hold_after=1)
        self.addCleanup(reply.go)
        self.backend.replies.append(reply)
        answer = {}

        def run():
            answer["result"] = self.post(simple_request("three", previous_response_id=previous))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.assertTrue(reply.wait_held())
        return reply, thread, answer

    def test_deleting_what_a_streaming_turn_continues_keeps_the_conversation(self):
        self.delete_during_a_turn()

    @with_proxy_options(state_db=lambda t: os.path.join(t.home, "state.db"))
    def test_deleting_what_a_streaming_turn_continues_keeps_it_in_the_state_db(self):
        self.delete_during_a_turn()

    def delete_during_a_turn(self):
        self.turn("resp_r1", "one")
        self.turn("resp_r2", simple_request("two", previous_response_id="resp_r1"))
        reply, thread, answer = self.start_slow_turn("resp_r3", "resp_r2")
        status, _, _ = self.request("DELETE", "/v1/responses/resp_r2")
        self.assertEqual(status, 200)
        self.assert_not_found("GET", "/v1/responses/resp_r2", "resp_r2")
        reply.go()
        thread.join(10)
        self.assertEqual(answer["result"][0], 200, answer)
        self.assertEqual(self.get("/v1/responses/resp_r3")[0], 200)
        status, page = self.get("/v1/responses/resp_r3/input_items?order=asc")
        self.assertEqual(status, 200, page)
        self.assertEqual(len(page["data"]), 5)  # one, its answer, two, its answer, three
        self.turn("resp_r4", simple_request("four", previous_response_id="resp_r3"))
        self.assertEqual(len(self.last_upstream()["body"]["input"]), 7)
        self.assert_not_found("GET", "/v1/responses/resp_r2", "resp_r2")
        self.assert_not_found("DELETE", "/v1/responses/resp_r2", "resp_r2")

    def test_over_a_websocket_too_and_no_hold_outlives_its_turn(self):
        self.turn("resp_r1", "one")
        self.turn("resp_r2", simple_request("two", previous_response_id="resp_r1"))
        reply = Reply(frames=with_id(stream_frames(), "resp_r3"), hold_after=1)
        self.addCleanup(reply.go)
        self.backend.replies.append(reply)
        client = WSClient(self.port)
        self.addCleanup(client.close_socket)
        client.create(previous_response_id="resp_r2", input="three")
        self.assertTrue(reply.wait_held())
        self.assertEqual(self.request("DELETE", "/v1/responses/resp_r2")[0], 200)
        reply.go()
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")
        self.assertEqual(len(self.get("/v1/responses/resp_r3/input_items")[1]["data"]), 5)
        client.create(previous_response_id="resp_unknown", input="x")  # refused: unpinned too
        self.assertEqual(client.recv_event()["type"], "error")
        client.create(previous_response_id="resp_r3", input="x", generate=False)
        client.response_events()
        status, _, _ = self.post(simple_request("y", previous_response_id="resp_nope"))
        self.assertEqual(status, 400)
        self.assertEqual(dict(self.proxy.app.conversations._pins), {})

    def test_a_failed_turn_lets_the_deleted_response_go_for_good(self):
        self.turn("resp_r1", "one")
        self.turn("resp_r2", simple_request("two", previous_response_id="resp_r1"))
        reply = Reply(frames=with_id(stream_frames(), "resp_r3"), hold_after=1, cut_after=2)
        reply, thread, answer = self.start_slow_turn("resp_r3", "resp_r2", reply)
        self.assertEqual(self.request("DELETE", "/v1/responses/resp_r2")[0], 200)
        self.assertIsNotNone(self.proxy.app.conversations._load("resp_r2"), "hidden, held")
        reply.go()
        thread.join(10)
        self.assertIsNone(self.proxy.app.conversations._load("resp_r2"), "gone after the turn")
        self.assertEqual(self.get("/v1/responses/resp_r1")[0], 200, "r1 was not deleted")


class ItemReferenceOverHTTPTests(ConversationCase):
    """The Vercel AI SDK's second turn: earlier output named by item_reference."""

    def first_turn(self):
        reasoning = dict(reasoning_item(), id="rs_a")
        message = message_item("answer one", "msg_a")
        self.turn("resp_a", "question one", items=[reasoning, message])
        return reasoning, message

    def test_references_are_expanded_into_the_items_they_name(self):
        reasoning, message = self.first_turn()
        unknown_kind = {"type": "additional_tools", "role": "developer", "tools": []}
        self.turn("resp_b", simple_request(input=[
            user_item("question one"), {"type": "item_reference", "id": "rs_a"},
            {"id": "msg_a"}, unknown_kind, user_item("question two")]))
        without_id = lambda item: {k: v for k, v in item.items() if k != "id"}
        self.assertEqual(self.last_upstream()["body"]["input"], [
            user_item("question one"), without_id(reasoning), without_id(message), unknown_kind,
            user_item("question two")])
        # and the items of the second turn are known in turn, streamed or not
        self.turn("resp_c", simple_request(stream=True, input=[
            {"type": "item_reference", "id": "msg_resp_b"}, user_item("three")]), stream=True)
        self.assertEqual(self.last_upstream()["body"]["input"], [
            without_id(message_item("answer of resp_b", "msg_resp_b")), user_item("three")])

    def test_large_bodies_are_sent_and_kept_with_the_references_expanded(self):
        # past 64 KB the proxy copies the client's unchanged bytes: never the references
        reasoning, message = self.first_turn()
        without_id = lambda item: {k: v for k, v in item.items() if k != "id"}
        pad = user_item("x" * 70000)
        self.turn("resp_b", simple_request(input=[
            pad, {"type": "item_reference", "id": "rs_a"},
            {"type": "item_reference", "id": "msg_a"}, user_item("two")]))
        expanded = [pad, without_id(reasoning), without_id(message), user_item("two")]
        self.assertEqual(self.last_upstream()["body"]["input"], expanded)
        self.assertNotIn(b"item_reference", self.last_upstream()["raw"])
        self.turn("resp_c", simple_request("three", previous_response_id="resp_b"))
        self.assertEqual(self.last_upstream()["body"]["input"], expanded + [
            without_id(message_item("answer of resp_b", "msg_resp_b")), user_item("three")])
        status, page = self.get("/v1/responses/resp_b/input_items?order=asc")
        self.assertEqual([i["type"] for i in page["data"]],
                         ["message", "reasoning", "message", "message"])

    def test_input_sent_as_a_list_is_kept(self):
        for pad in (0, 70000):  # as the client's own bytes, below and above 64 KB
            with self.subTest(pad=pad):
                resp_id = "resp_list%d" % pad
                self.turn(resp_id, simple_request(input=[user_item("q1" + "x" * pad)]))
                self.assertEqual(self.get("/v1/responses/" + resp_id)[0], 200, self.log_text())
                self.turn(resp_id + "_2", simple_request("q2", previous_response_id=resp_id))
                self.assertEqual(len(self.last_upstream()["body"]["input"]), 3)
        self.assertNotIn("could not keep", self.log_text())

    def test_an_unknown_reference_is_a_400_that_says_what_to_do(self):
        self.first_turn()
        for path in ("/v1/responses", "/responses",
                     "/v1/responses/compact"):
            with self.subTest(path=path):
                status, _, body = self.post(simple_request(input=[
                    {"type": "item_reference", "id": "msg_a"},
                    {"type": "item_reference", "id": "msg_unknown"}]), path=path)
                self.assert_openai_error(status, body, 400, code="item_reference_not_found",
                                         contains="msg_unknown")
                self.assertEqual(body["error"]["param"], "input")
                for words in ("the item itself", "store: false"):
                    self.assertIn(words, body["error"]["message"])
        self.assertEqual(len(self.backend.requests), 1, "sent upstream anyway")


class ExpansionBoundTests(ConversationCase):
    """Issue 19: references and previous_response_id history are filled in within
    --max-body-bytes; past it a 400 that names the flag, and nothing goes upstream."""

    LIMIT = 1 << 20
    proxy_options = dict(max_body_bytes=LIMIT)

    def setUp(self):
        super().setUp()
        big = user_item("b" * 100000)
        big["id"] = "msg_big"
        self.turn("resp_big", simple_request(input=[big]))
        self.sent = len(self.backend.requests)

    def assert_too_large(self, status, body):
        self.assert_openai_error(status, body, 400, code="input_too_large",
                                 contains="--max-body-bytes")
        self.assertEqual(body["error"]["param"], "input")
        self.assertIn(str(self.LIMIT), body["error"]["message"])
        self.assertEqual(len(self.backend.requests), self.sent, "nothing went upstream")

    def test_many_references_to_a_large_item_are_refused(self):
        self.turn("resp_ok", simple_request(input=[{"type": "item_reference",
                                                    "id": "msg_big"}] * 9))
        self.sent = len(self.backend.requests)
        refs = [{"type": "item_reference", "id": "msg_big"}] * 2000  # 200 MB if built
        status, _, body = self.post(simple_request(input=refs))
        self.assert_too_large(status, body)
        self.assertLess(len(json.dumps(refs)), self.LIMIT)

    def test_a_history_past_the_limit_is_refused(self):
        previous = "resp_big"
        for n in range(9):  # each turn adds 100 KB of references: 1 MB of history
            self.turn("resp_%d" % n, simple_request(input=[
                {"type": "item_reference", "id": "msg_big"}], previous_response_id=previous))
            previous = "resp_%d" % n
        self.sent = len(self.backend.requests)
        status, _, body = self.post(simple_request(input=[
            {"type": "item_reference", "id": "msg_big"}], previous_response_id=previous))
        self.assert_too_large(status, body)
        self.turn("resp_fits", simple_request("short", previous_response_id=previous))

    def test_over_a_websocket_it_is_an_error_event_and_the_socket_stays(self):
        client = WSClient(self.port)
        self.addCleanup(client.close_socket)
        client.create(input=[{"type": "item_reference", "id": "msg_big"}] * 50)
        error = client.recv_event()
        self.assertEqual((error["type"], error["status"], error["error"]["code"]),
                         ("error", 400, "input_too_large"))
        self.assertIn("--max-body-bytes", error["error"]["message"])
        # generate: false chains kept on the socket are bounded alike
        previous = None
        for n in range(12):
            extra = {"previous_response_id": previous} if previous else {}
            client.create(input=[{"type": "item_reference", "id": "msg_big"}], generate=False,
                          **extra)
            events = client.response_events()
            if events[-1]["type"] == "error":
                break
            previous = events[-1]["response"]["id"]
        self.assertEqual(events[-1]["error"]["code"], "input_too_large")
        self.assertLess(n, 11)
        self.assertEqual(len(self.backend.requests), self.sent)
        client.create(input="hi")
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")

    def test_unit_budget_counts_references_before_building_them(self):
        store = proxy.ConversationStore(10 ** 8)
        item = user_item("z" * 1000)
        item["id"] = "msg_z"
        store.save(stored_response("resp_z"), None, input_json(item))
        budget = proxy.ExpansionBudget(10000)
        with self.assertRaises(proxy.ProxyError):
            store.expand_references([{"id": "msg_z"}] * 100000, budget)
        self.assertLess(budget.used, 12000)


class CompactEndpointTests(ConversationCase):
    HISTORY = [{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "q1"}]},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "a1"}]}]

    def compact(self, body, path="/v1/responses/compact", headers=None):
        return self.post(body, headers, path=path)

    def test_forwarded_next_to_the_responses_url_with_the_login(self):
        body = {"model": "gpt-5.1-codex", "input": self.HISTORY, "instructions": "Summarize.",
                "store": True, "stream": False, "metadata": {"a": "b"},
                "prompt_cache_key": "k", "previous_response_id": None,
                "reasoning": {"effort": "low"}}
        for path in ("/v1/responses/compact", "/responses/compact"):
            with self.subTest(path=path):
                status, headers, answer = self.compact(body, path, {
                    "User-Agent": NEWER_CODEX_UA, "Accept-Encoding": "gzip",
                    "session_id": "sess-c"})
                self.assertEqual(status, 200, answer)
                self.assertEqual(answer["object"], "response.compaction")
                self.assertTrue(answer["id"].startswith("resp_"), answer)
                self.assertIsInstance(answer["created_at"], int)
                self.assertEqual(answer["output"], compaction_answer(self.HISTORY)["output"])
                self.assertEqual(headers["x-codex-primary-used-percent"], "12.5")
                got = self.last_upstream()
                self.assertEqual(got["path"], "/backend-api/codex/responses/compact")
                h = got["headers"]
                self.assertEqual(h["Authorization"], "Bearer " + self.token)
                self.assertEqual(h["ChatGPT-Account-ID"], "acct-file")
                self.assertEqual(h["Accept"], "application/json")
                self.assertEqual(h["version"], "0.172.0")
                self.assertEqual(h["session_id"], "sess-c")
                self.assertEqual(h["x-codex-routing-hint"], "model=gpt-5.1-codex")
                self.assertIn(h.get("Accept-Encoding"), (None, "identity"))
                self.assertEqual(got["body"], {
                    "model": "gpt-5.1-codex", "input": self.HISTORY,
                    "instructions": "Summarize.", "reasoning": {"effort": "low"}})

    def test_previous_response_id_and_references_are_expanded(self):
        self.turn("resp_a", "q0")
        status, _, answer = self.compact({
            "model": "gpt-5.1-codex", "previous_response_id": "resp_a",
            "input": [{"type": "item_reference", "id": "msg_resp_a"}, user_item("q1")]})
        self.assertEqual(status, 200, answer)
        sent = self.last_upstream()["body"]
        replayed = {k: v for k, v in message_item("answer of resp_a").items() if k != "id"}
        self.assertEqual(sent["input"], [user_item("q0"), replayed, replayed, user_item("q1")])
        self.assertEqual(sent["instructions"], proxy.DEFAULT_INSTRUCTIONS)
        status, _, body = self.compact(simple_request(previous_response_id="resp_none"))
        self.assert_openai_error(status, body, 400, code="previous_response_not_found")
        self.assertEqual(len(self.backend.requests), 2)

    def test_backend_errors_are_openai_shaped(self):
        limit = {"error": {"type": "usage_limit_reached", "message": "The usage limit has "
                           "been reached", "resets_in_seconds": 60}}
        self.backend.replies.append(Reply(status=429, body=json.dumps(limit).encode(),
                                          headers=[("retry-after", "60")]))
        status, headers, body = self.compact(simple_request())
        self.assert_openai_error(status, body, 429, contains="usage limit")
        self.assertEqual(headers["retry-after"], "60")
        for bad in (b"not json", b"[]", b'{"output": "x"}'):
            with self.subTest(bad=bad):
                self.backend.replies.append(Reply(status=200, body=bad))
                status, _, body = self.compact(simple_request())
                self.assert_openai_error(status, body, 502, code="bad_upstream_answer")
        self.assertEqual(self.compact(simple_request())[0], 200, "the server keeps serving")

    @with_proxy_options(stream_idle_timeout=0.3)
    def test_a_slow_compaction_outlasts_the_stream_idle_timeout(self):
        self.backend.replies.append(Reply(delay=0.6))  # twice the idle timeout
        status, _, answer = self.compact(simple_request())
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["output"][-1]["type"], "compaction")
        self.backend.replies.append(Reply(hang_after=0))
        self.assertEqual(self.post(simple_request())[0], 504, "control: a turn times out")


class ChainMixin:
    def turn(self, resp_id, text, answer, previous=None, stream=False, port=None):
        """One Responses turn answered as resp_id; returns the answer (dict or SSE events)."""
        self.backend.replies.append(reply_for(resp_id, answer))
        body = simple_request(text)
        if previous is not None:
            body["previous_response_id"] = previous
        if stream:
            status, _, events, raw = self.stream(body)
            self.assertEqual(status, 200, raw)
            self.assertEqual(events[-1][0], "response.completed", raw[-500:])
            return events
        status, _, answer_body = self.post(body)
        self.assertEqual(status, 200, answer_body)
        self.assertEqual(answer_body["id"], resp_id)
        return answer_body

    def assert_clean_upstream(self, expected_requests):
        """One upstream request per turn (no retry hid a rejected previous_response_id)."""
        self.assertEqual(len(self.backend.requests), expected_requests)
        for r in self.backend.requests:
            self.assertNotIn("previous_response_id", r["body"])

    def assert_unknown(self, resp_id):
        before = len(self.backend.requests)
        status, _, body = self.post(simple_request("again", previous_response_id=resp_id))
        self.assert_openai_error(status, body, 400)
        self.assertEqual(body["error"]["param"], "previous_response_id", body)
        self.assertEqual(len(self.backend.requests), before, "sent upstream anyway")
        return body


class PreviousResponseIdTests(ChainMixin, ChatCase):
    def test_chain_of_three_turns(self):
        self.turn("resp_a", "first question", "Answer A")
        self.turn("resp_b", "second question", "Answer B", previous="resp_a")
        self.assertEqual(self.upstream_input(), [
            user_item("first question"), replayed_item("Answer A"), user_item("second question")])
        self.turn("resp_c", "third question", "Answer C", previous="resp_b")
        self.assertEqual(self.upstream_input(), [
            user_item("first question"), replayed_item("Answer A"),
            user_item("second question"), replayed_item("Answer B"),
            user_item("third question")])
        self.assert_clean_upstream(3)
        # a branch from the middle of the chain sees only its own ancestors
        self.turn("resp_d", "branch", "Answer D", previous="resp_a")
        self.assertEqual(self.upstream_input(), [
            user_item("first question"), replayed_item("Answer A"), user_item("branch")])

    def test_chain_when_turn_one_was_streamed(self):
        self.turn("resp_s1", "streamed question", "Streamed answer", stream=True)
        self.turn("resp_s2", "follow-up", "Second", previous="resp_s1", stream=True)
        self.assertEqual(self.upstream_input(), [
            user_item("streamed question"), replayed_item("Streamed answer"),
            user_item("follow-up")])
        self.turn("resp_s3", "third", "Third", previous="resp_s2")
        self.assertEqual(self.upstream_input()[:4], [
            user_item("streamed question"), replayed_item("Streamed answer"),
            user_item("follow-up"), replayed_item("Second")])
        self.assert_clean_upstream(3)

    def test_unknown_id_is_400_and_nothing_sent(self):
        body = self.assert_unknown("resp_never_seen")
        message = body["error"]["message"]
        self.assertIn("does not know", message)
        self.assertIn("resp_never_seen", message)
        self.assertTrue("restart" in message or "--state-db" in message, message)
        self.assertTrue("size cap" in message or "evict" in message
                        or "least recently used" in message, message)
        self.assertEqual(self.backend.requests, [])

    @with_proxy_options(state_max_mb=0.001)  # ~1 KB: a handful of small turns
    def test_oldest_is_evicted_past_the_size_cap(self):
        for i in range(12):
            self.turn("resp_%d" % i, "question %d" % i, "answer %d" % i)
        self.assert_unknown("resp_0")
        self.turn("resp_next", "more", "fine", previous="resp_11")
        self.assertEqual(self.upstream_input(), [
            user_item("question 11"), replayed_item("answer 11"), user_item("more")])

    @staticmethod
    def incompressible_turn():
        """(question, answer, the size an entry of the two is kept in): text that hardly
        compresses, so an entry's kept (compressed) size is known ahead."""
        rng = random.Random(5)
        user, answer = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                                for _ in range(1500)) for _ in "qa"]
        size = len(zlib.compress(json.dumps([user_item(user), message_item(answer)],
                                            separators=(",", ":")).encode(), 1))
        return user, answer, size

    @with_proxy_options(state_max_mb=lambda t: 2.5 * t.incompressible_turn()[2] / (1024 * 1024))
    def test_least_recently_used_goes_first(self):  # two entries fit, not three
        user, answer, _ = self.incompressible_turn()
        self.turn("resp_a", user, answer)
        self.turn("resp_b", user, answer)
        self.turn("resp_c", user, answer, previous="resp_a")  # uses resp_a: resp_b is LRU
        self.assert_unknown("resp_b")
        self.turn("resp_d", "x", "y", previous="resp_c")
        self.assertEqual(len(self.upstream_input()), 5)

    def test_replayed_output_has_no_ids_and_no_unreadable_reasoning(self):
        readable = dict(reasoning_item(), id="rs_2")
        unreadable = {"type": "reasoning", "id": "rs_3", "summary": []}
        self.assertEqual(proxy.replayable([readable, unreadable, function_call_item()]), [
            {k: v for k, v in readable.items() if k != "id"},
            {k: v for k, v in function_call_item().items() if k != "id"}])

    def test_a_failing_store_costs_a_warning_not_the_answer(self):
        def broken(*args):
            raise OSError("database is locked")

        self.proxy.app.conversations.save = broken
        answer = self.turn("resp_x", "question", "the answer")
        self.assertEqual(answer["output"][0]["content"][0]["text"], "the answer")
        events = self.turn("resp_y", "question", "streamed", stream=True)
        self.assertEqual(events[-1][0], "response.completed")
        self.wait_for_log("could not keep response resp_y")
        self.assertIn("could not keep response resp_x", self.log_text())

    def test_stored_before_the_client_sees_the_end(self):
        # A client may name a response the moment its stream ends: it must be known by then.
        put, stored_at = self.proxy.app.conversations.save, []

        def slow_put(*args):
            time.sleep(0.3)
            put(*args)
            stored_at.append(time.monotonic())

        self.proxy.app.conversations.save = slow_put
        self.backend.replies.append(reply_for("resp_early", "done"))
        conn = self.connection()
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/responses", json.dumps(simple_request(stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        seen = b""
        while b"response.completed" not in seen:
            chunk = resp.read1(65536)
            self.assertTrue(chunk, "the stream ended without response.completed")
            seen += chunk
        completed_at = time.monotonic()
        resp.read()
        self.assertTrue(stored_at and stored_at[0] <= completed_at,
                        "response.completed reached the client before the response was kept")

    def test_failed_responses_are_not_remembered(self):
        failed = stream_frames(terminal="response.failed", terminal_extra={
            "error": {"code": "server_error", "message": "boom"}})
        self.backend.replies.append(Reply(frames=with_id(failed, "resp_failed")))
        status, _, body = self.post(simple_request("doomed"))
        self.assertEqual(status, 500, body)
        self.backend.replies.append(Reply(frames=with_id(failed, "resp_failed_s")))
        status, _, events, raw = self.stream(simple_request("doomed too"))
        self.assertEqual(events[-1][0], "response.failed", raw[-300:])
        self.turn("resp_ok", "fine", "ok")  # control: a completed one is remembered
        self.assert_unknown("resp_failed")
        self.assert_unknown("resp_failed_s")
        self.turn("resp_ok2", "next", "ok", previous="resp_ok")


class StateDbTests(ChainMixin, ChatCase):
    proxy_in_setup = False  # each test starts its proxies itself: after a umask, two at once

    def setUp(self):
        super().setUp()
        self.dbdir = tempfile.mkdtemp(prefix="state-db-")
        self.addCleanup(shutil.rmtree, self.dbdir, True)
        self.db = os.path.join(self.dbdir, "state.sqlite")

    def start_db_proxy(self, **overrides):
        self.start_proxy(state_db=self.db, **overrides)
        return self.proxy

    def test_chain_survives_a_restart(self):
        self.start_db_proxy()
        self.turn("resp_a", "first question", "Answer A")
        self.turn("resp_b", "second question", "Answer B", previous="resp_a")
        self.stop_proxy(self.proxy)
        self.start_db_proxy()
        self.turn("resp_c", "third question", "Answer C", previous="resp_b")
        self.assertEqual(self.upstream_input(), [
            user_item("first question"), replayed_item("Answer A"),
            user_item("second question"), replayed_item("Answer B"),
            user_item("third question")])
        self.assert_unknown("resp_unknown")
        self.assert_clean_upstream(3)

    def test_db_file_is_private(self):
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self.start_db_proxy()
        self.turn("resp_a", "secret question", "secret answer")
        self.assertEqual(stat.S_IMODE(os.stat(self.db).st_mode), 0o600)
        for suffix in ("-wal", "-shm", "-journal"):
            path = self.db + suffix
            if os.path.exists(path):
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode) & 0o077, 0, path)

    def test_size_cap_on_disk_evicts_least_recently_used(self):
        rng = random.Random(5)  # text that hardly compresses: an entry's kept size is known
        user, answer = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                                for _ in range(1500)) for _ in "qa"]
        size = len(zlib.compress(json.dumps([user_item(user), message_item(answer)],
                                            separators=(",", ":")).encode(), 1))
        self.start_db_proxy(state_max_mb=2.5 * size / (1024 * 1024))
        self.turn("resp_a", user, answer)
        self.turn("resp_b", user, answer)
        self.turn("resp_c", user, answer, previous="resp_a")  # uses resp_a: resp_b is LRU
        self.assert_unknown("resp_b")
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            ids = sorted(r[0] for r in db.execute("SELECT id FROM responses"))
            total = db.execute("SELECT SUM(size) FROM responses").fetchone()[0]
        self.assertEqual(ids, ["resp_a", "resp_c"])
        self.assertLessEqual(total, 2.5 * size)
        self.turn("resp_d", "x", "y", previous="resp_c")
        self.assertEqual(len(self.upstream_input()), 5)

    def test_two_proxies_store_concurrently_without_loss(self):
        self.start_db_proxy()
        first_port, first_log = self.port, self.log
        self.start_db_proxy()
        second_port, second_log = self.port, self.log
        per_proxy = 20
        for i in range(2 * per_proxy):
            self.backend.replies.append(reply_for("resp_c%02d" % i, "answer %d" % i))

        def one(job):
            port, question = job
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            try:
                conn.request("POST", "/v1/responses", body=json.dumps(simple_request(
                    question)).encode(), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            return resp.status, question, json.loads(data)

        jobs = [(port, "question %s %d" % (name, i)) for i in range(per_proxy)
                for port, name in ((first_port, "one"), (second_port, "two"))]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, jobs))
        for status, question, body in results:
            self.assertEqual(status, 200, body)
        asked = {body["id"]: question for _, question, body in results}
        self.assertEqual(len(asked), 2 * per_proxy)
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM responses").fetchone()[0],
                             2 * per_proxy)
        for log in (first_log, second_log):
            self.assertNotIn("internal error", log.getvalue())
        # every one of them is known to both proxies, with its own question
        for n, (resp_id, question) in enumerate(sorted(asked.items())):
            self.port = first_port if n % 2 else second_port
            self.turn("resp_check%02d" % n, "check", "ok", previous=resp_id)
            self.assertEqual(self.upstream_input()[0], user_item(question))
            self.assertEqual(len(self.upstream_input()), 3)

    def test_subprocess_with_state_db_serves_an_earlier_chain(self):
        self.start_db_proxy()
        self.turn("resp_a", "first question", "Answer A")
        self.stop_proxy(self.proxy)
        child = ProxyProcess(self, ["--port", "0", "--codex-home", self.home,
                                    "--upstream-url", self.backend.url, "--state-db", self.db])
        self.backend.replies.append(reply_for("resp_b", "Answer B"))
        status, _, data = child.post(simple_request("second question",
                                                    previous_response_id="resp_a"))
        self.assertEqual(status, 200, data)
        self.assertEqual(json.loads(data)["id"], "resp_b")
        self.assertEqual(self.upstream_input(), [
            user_item("first question"), replayed_item("Answer A"), user_item("second question")])
        status, _, data = child.post(simple_request("x", previous_response_id="resp_zzz"))
        self.assertEqual(status, 400, data)
        self.assert_clean_upstream(2)


# ============================================================================================
# Codecs: SSE, WebSocket framing, assembly
# ============================================================================================

class SSEParserTests(unittest.TestCase):
    def feed_all(self, chunks):
        parser = proxy.SSEParser()
        events = []
        for chunk in chunks:
            events.extend(parser.feed(chunk))
        return events

    def test_line_endings_lf_crlf_cr(self):
        for eol in (b"\n", b"\r\n", b"\r"):
            stream = (b"event: a" + eol + b"data: 1" + eol + eol
                      + b"data: 2" + eol + eol)
            events = self.feed_all([stream])
            self.assertEqual([(e.event, e.data) for e in events], [("a", "1"), (None, "2")], eol)
            self.assertEqual(b"".join(e.raw for e in events), stream)

    def test_every_split_point_gives_the_same_events(self):
        stream = ("event: response.output_text.delta\r\ndata: {\"delta\": \"h\u00e9\u20ac\U0001F600\"}\r\n\r\n"
                  ": a comment\n\nid: 7\nretry: 1500\ndata: line one\ndata: line two\n\n"
                  "event: x\rdata: cr only\r\r").encode("utf-8")
        whole = [(e.event, e.data, e.id, e.retry) for e in self.feed_all([stream])
                 if e.data is not None]
        self.assertEqual(whole, [
            ("response.output_text.delta", '{"delta": "h\u00e9\u20ac\U0001F600"}', None, None),
            (None, "line one\nline two", "7", 1500),
            ("x", "cr only", "7", None)])
        for cut in range(1, len(stream)):
            got = self.feed_all([stream[:cut], stream[cut:]])
            self.assertEqual([(e.event, e.data, e.id, e.retry) for e in got if e.data is not None],
                             whole, "split at %d" % cut)

    def test_byte_by_byte(self):
        stream = b"".join(stream_frames())
        events = self.feed_all([stream[i:i + 1] for i in range(len(stream))])
        self.assertEqual(b"".join(e.raw for e in events), stream)
        self.assertEqual(events[-1].event, "response.completed")

    def test_a_large_event_in_small_reads_is_parsed_in_linear_time(self):
        # A long answer's output_item.done can be megabytes, arriving in TLS-record reads.
        big = (b'event: response.output_item.done\ndata: {"x": "' + b"a" * (8 << 20)
               + b'"}\n\n')
        for data in (big, big.replace(b"\n", b"\r\n")):
            started = time.thread_time()  # this thread's CPU: other load does not count
            events = self.feed_all([data[i:i + 16384] for i in range(0, len(data), 16384)])
            self.assertLess(time.thread_time() - started, 1.0)
            self.assertEqual([e.raw for e in events], [data])

    def test_empty_reads_change_nothing(self):
        for stream in (b"data: a\n\n", b"data: a\r\n\r\n", b"data: a\r\r"):
            pieces = []
            for i in range(len(stream)):
                pieces += [stream[i:i + 1], b""]
            events = self.feed_all(pieces)
            self.assertEqual(b"".join(e.raw for e in events), stream)
            self.assertEqual([e.data for e in events if e.data is not None], ["a"], stream)

    def test_event_name_loses_exactly_one_leading_space(self):
        for eol in (b"\n", b"\r\n"):
            events = self.feed_all([b"event:  two\x20" + eol + b"data: x" + eol + eol])
            self.assertEqual(events[0].event, " two ", eol)

    def test_comment_only_frame_is_relayed_and_unfinished_event_dropped(self):
        events = self.feed_all([b": keepalive\n\n", b"data: partial"])
        self.assertEqual(len(events), 1)
        self.assertIsNone(events[0].data)
        self.assertEqual(events[0].raw, b": keepalive\n\n")

    def test_field_without_space_and_unknown_fields(self):
        events = self.feed_all([b"data:x\nfoo: bar\nevent:e\n\n"])
        self.assertEqual((events[0].event, events[0].data), ("e", "x"))


class SSESpecFidelityTests(unittest.TestCase):
    FRAMES = b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"

    def events(self, chunks):
        parser = proxy.SSEParser()
        return [e for chunk in chunks for e in parser.feed(chunk)]

    def test_a_leading_bom_is_dropped_in_any_split(self):
        data = b"\xef\xbb\xbf" + self.FRAMES
        for cut in range(len(data) + 1):
            with self.subTest(cut=cut):
                events = self.events([data[:cut], data[cut:]])
                self.assertEqual([(e.event, e.data) for e in events], [("a", "1"), ("b", "2")])
                self.assertEqual(b"".join(e.raw for e in events), self.FRAMES)
        events = self.events([bytes([b]) for b in data])
        self.assertEqual([(e.event, e.data) for e in events], [("a", "1"), ("b", "2")])

    def test_only_the_first_bom_and_only_at_the_very_start(self):
        events = self.events([b"\xef\xbb\xbf\xef\xbb\xbfevent: a\ndata: 1\n\n"])
        self.assertEqual([(e.event, e.data) for e in events], [(None, "1")])
        events = self.events([self.FRAMES, b"\xef\xbb\xbfevent: c\ndata: 3\n\n"])
        self.assertEqual([(e.event, e.data) for e in events],
                         [("a", "1"), ("b", "2"), (None, "3")])
        events = self.events([b"\xef\xbb", b"x: y\ndata: 1\n\n"])  # not a BOM after all
        self.assertEqual([e.data for e in events], ["1"])
        self.assertEqual(events[0].raw, b"\xef\xbbx: y\ndata: 1\n\n")

    def test_an_id_with_nul_is_ignored(self):
        events = self.events([b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\nid: 10\ndata: c\n\n"])
        self.assertEqual([e.id for e in events], ["7", "7", "10"])


class WebSocketFramingTests(unittest.TestCase):
    def test_accept_key_of_rfc_6455_example_and_refusals(self):
        headers = {"sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13"}
        self.assertEqual(proxy.websocket_accept(headers), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        with self.assertRaises(proxy.ProxyError) as caught:
            proxy.websocket_accept(dict(headers, **{"sec-websocket-version": "8"}))
        self.assertEqual((caught.exception.status, caught.exception.headers),
                         (426, [("Sec-WebSocket-Version", "13")]))
        for key in (None, "", "short", "!!!!notbase64!!!!!!!!!!!"):
            with self.assertRaises(proxy.ProxyError) as caught:
                proxy.websocket_accept({"sec-websocket-key": key, "sec-websocket-version": "13"})
            self.assertEqual(caught.exception.status, 400)

    def test_frame_lengths_use_the_shortest_form(self):
        for n, head in ((0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                        (65535, b"\x81\x7e\xff\xff"),
                        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")):
            frame = proxy.encode_frame(proxy.OP_TEXT, b"x" * n)
            self.assertEqual(frame[:len(head)], head)
            self.assertEqual(len(frame), len(head) + n)
        self.assertEqual(proxy.close_frame(1001, "bye"), b"\x88\x05\x03\xe9bye")
        self.assertEqual(proxy.close_frame(None), b"\x88\x00")

    @staticmethod
    def masked(opcode, payload, fin=True):
        key = b"\x01\x02\x03\x04"
        n = len(payload)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        return bytes([(0x80 if fin else 0) | opcode]) + length + key + proxy.mask_payload(payload, key)

    def test_fragments_joined_controls_in_between_any_split(self):
        data = (self.masked(1, b'{"a":', fin=False) + self.masked(9, b"hi")
                + self.masked(0, b' "\xc3\xa9"', fin=False) + self.masked(0, b"}")
                + self.masked(1, b"x" * 300))
        for step in (1, 2, 7, len(data)):
            reader = proxy.MessageReader(1000)
            out = []
            for i in range(0, len(data), step):
                out += reader.feed(data[i:i + step])
            self.assertEqual(out, [(9, b"hi"), (1, '{"a": "\u00e9"}'.encode()), (1, b"x" * 300)])

    def test_violations_name_their_close_codes(self):
        cases = [(self.masked(2, b"bin"), 1003),
                 (b"\x81\x03abc", 1002),                              # unmasked
                 (b"\xc1" + self.masked(1, b"x")[1:], 1002),          # RSV1 (deflate) set
                 (self.masked(0, b"x"), 1002),                        # nothing to continue
                 (self.masked(1, b"x", fin=False) + self.masked(1, b"y"), 1002),
                 (self.masked(9, b"p", fin=False), 1002),             # fragmented control
                 (self.masked(3, b"x"), 1002),                        # unknown opcode
                 (self.masked(1, b"\xff\xfe"), 1007),                 # not UTF-8
                 (self.masked(1, b"y" * 101), 1009),
                 (self.masked(1, b"y" * 60, fin=False) + self.masked(0, b"y" * 60), 1009)]
        for data, code in cases:
            with self.assertRaises(proxy.WebSocketError) as caught:
                proxy.MessageReader(100).feed(data)
            self.assertEqual(caught.exception.code, code, data[:20])
        # an announced length over the limit is refused before its bytes arrive
        with self.assertRaises(proxy.WebSocketError) as caught:
            proxy.MessageReader(100).feed(b"\x81\xff" + (10 ** 9).to_bytes(8, "big"))
        self.assertEqual(caught.exception.code, 1009)

    def test_close_payloads(self):
        self.assertEqual(proxy.parse_close_payload(b""), (None, ""))
        self.assertEqual(proxy.parse_close_payload(b"\x03\xe8ok"), (1000, "ok"))
        self.assertEqual(proxy.parse_close_payload(b"\x0f\xa0"), (4000, ""))
        for bad in (b"\x03", b"\x03\xed", b"\x00\x01", b"\x13\x88", b"\x03\xe8\xff"):
            with self.assertRaises(proxy.WebSocketError):
                proxy.parse_close_payload(bad)

    def test_sse_block_to_event_payloads(self):
        block = sse("response.created", {"a": 1}) + b": comment\n\n" + sse("x.delta", {"d": "\n"})
        self.assertEqual([json.loads(p) for p in proxy.sse_payloads(block)],
                         [{"a": 1, "type": "response.created"}, {"d": "\n", "type": "x.delta"}])
        crlf = sse("response.created", {"a": 1}, eol=b"\r\n")
        self.assertEqual([json.loads(p) for p in proxy.sse_payloads(crlf)],
                         [{"a": 1, "type": "response.created"}])

    def test_stream_id_is_added_to_event_objects_only(self):
        self.assertEqual(json.loads(proxy.with_stream_id(b'{"type": "x"}', "lane")),
                         {"type": "x", "stream_id": "lane"})
        self.assertEqual(proxy.with_stream_id(b"[1]", "lane"), b"[1]")
        self.assertEqual(proxy.with_stream_id(b"[DONE", "lane"), b"[DONE")

    def test_socket_keeps_the_last_few_within_its_bound(self):
        kept = proxy.SocketResponses(max_count=2, max_bytes=10 ** 6)
        for i in range(3):
            kept.put("r%d" % i, [{"n": i}])
        self.assertEqual([kept.get("r%d" % i) for i in range(3)], [None, [{"n": 1}], [{"n": 2}]])
        small = proxy.SocketResponses(max_count=4, max_bytes=150)
        small.put("a", [{"t": os.urandom(50).hex()}])
        small.put("b", [{"t": os.urandom(50).hex()}])
        self.assertIsNone(small.get("a"))
        self.assertIsNotNone(small.get("b"))
        small.put("c", [{"t": os.urandom(200).hex()}])
        self.assertIsNone(small.get("c"), "one past the cap is not kept, even the last")
        self.assertLessEqual(small.bytes, 150)


class AssemblyTests(unittest.TestCase):
    def test_output_rebuilt_in_output_index_order(self):
        asm = proxy.ResponseAssembler()
        asm.add("response.output_item.done", {"output_index": 1, "item": message_item("b")})
        asm.add("response.output_item.done", {"output_index": 0, "item": reasoning_item()})
        asm.add("response.completed", {"response": response_object(usage=USAGE)})
        self.assertEqual(asm.terminal, "response.completed")
        result = proxy.assemble_response(asm.response, asm.output())
        self.assertEqual([i["type"] for i in result["output"]], ["reasoning", "message"])
        self.assertEqual(result["usage"], USAGE)

    def test_backend_output_kept_when_present(self):
        response = response_object(output=[message_item("kept")])
        self.assertEqual(proxy.assemble_response(response, [message_item("other")])["output"],
                         [message_item("kept")])

    def test_failed_and_error_events(self):
        asm = proxy.ResponseAssembler()
        asm.add("response.failed", {"response": response_object(
            "failed", error={"code": "context_length_exceeded", "message": "too long"})})
        self.assertEqual((asm.terminal, asm.error["code"]), ("response.failed",
                                                             "context_length_exceeded"))
        asm = proxy.ResponseAssembler()
        asm.add("error", {"code": "server_error", "message": "boom"})
        self.assertEqual((asm.terminal, asm.error["message"]), ("error", "boom"))

    def test_failure_statuses(self):
        self.assertEqual(proxy.failure_status("context_length_exceeded"), 400)
        self.assertEqual(proxy.failure_status("rate_limit_exceeded"), 429)
        self.assertEqual(proxy.failure_status("insufficient_quota"), 429)
        self.assertEqual(proxy.failure_status("server_is_overloaded"), 503)
        self.assertEqual(proxy.failure_status("something_new"), 500)

    def test_translate_detail_and_429(self):
        err = proxy.translate_upstream_error(400, b'{"detail": "Instructions are required"}')
        self.assertEqual((err.status, err.message, err.type),
                         (400, "Instructions are required", "invalid_request_error"))
        body = json.dumps({"error": {"type": "usage_limit_reached", "message":
                                     "The usage limit has been reached", "plan_type": "plus",
                                     "resets_at": int(time.time()) + 7260,
                                     "resets_in_seconds": 7260}}).encode()
        err = proxy.translate_upstream_error(429, body)
        out = err.body()["error"]
        self.assertEqual(out["plan_type"], "plus")
        self.assertEqual(out["type"], "usage_limit_reached")
        self.assertIn("resets at", out["message"])
        self.assertIn("2 h 1 min", out["message"])
        err = proxy.translate_upstream_error(403, b"<html><body>Just a moment...</body></html>")
        self.assertIn("Just a moment", err.message)
        self.assertNotIn("<", err.message)


# ============================================================================================
# Process and command line: main, environment, signals, secrets, login command, script process
# ============================================================================================

class CommandLineTests(ProcessTestCase):
    def test_version_prints_name_and_version_and_exits_0(self):
        result = run_program(["--version"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().strip(),
                         "codex-responses-proxy %s" % proxy.__version__)
        self.assertRegex(proxy.__version__, r"^\d+\.\d+\.\d+")

    def test_help_mentions_every_flag_and_has_examples(self):
        result = run_program(["--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        text = result.stdout.decode()
        for flag in ("--addr", "--port", "--instructions", "--debug", "--upstream-url",
                     "--codex-home", "--client-version", "--originator",
                     "--stream-idle-timeout", "--version"):
            self.assertIn(flag, text)
        self.assertIn("examples:", text)
        examples = text.split("examples:", 1)[1]
        self.assertIn("codex_responses_proxy.py", examples)
        self.assertIn("CODEX_HOME", text)
        self.assertIn("CODEX_REFRESH_TOKEN_URL_OVERRIDE", text)

    def test_go_spellings_addr_instructions_debug(self):
        self.write_valid_auth()
        p = self.spawn("-addr", "127.0.0.1:0", "-instructions", "Answer in haiku.", "-debug",
                       "--codex-home", self.home)
        self.assertNotEqual(p.port, 0)
        status, _, data = p.post(simple_request())  # no instructions in the request
        self.assertEqual(status, 200, data)
        self.assertEqual(json.loads(data)["output"][0]["content"][0]["text"], "Hello there!")
        self.assertEqual(self.backend.requests[-1]["body"]["instructions"], "Answer in haiku.")
        # -debug took effect: the rewritten body is logged
        p.wait_for("debug: upstream request")
        # a request with its own instructions keeps them
        status, _, _ = p.post(simple_request(instructions="Be brief."))
        self.assertEqual(status, 200)
        self.assertEqual(self.backend.requests[-1]["body"]["instructions"], "Be brief.")

    def test_go_spelling_with_equals_sign(self):
        self.write_valid_auth()
        p = self.spawn("-addr=127.0.0.1:0", "-instructions=From the Go tool.",
                       "--codex-home", self.home)
        self.assertEqual(p.post(simple_request())[0], 200)
        self.assertEqual(self.backend.requests[-1]["body"]["instructions"], "From the Go tool.")

    def test_bad_addr_is_a_usage_error(self):
        bad = (["--addr", "nonsense"], ["--addr", "127.0.0.1:http"],
               ["--addr", "127.0.0.1:99999"], ["-addr", "127.0.0.1:"],
               ["--port", "70000"], ["--stream-idle-timeout", "0"])
        results = side_by_side(run_program, [args + ["--codex-home", self.home] for args in bad]
                               + [["--addr", "nonsense"]])
        for args, result in zip(bad, results):
            err = result.stderr.decode()
            self.assertEqual(result.returncode, 2, (args, err))
            self.assertIn("usage:", err, args)
            self.assertIn("error:", err, args)
            self.assertNotIn("Traceback", err, args)
            self.assertNotIn("listening", err, args)
        err = results[-1].stderr.decode()
        self.assertIn("--addr", err)
        self.assertIn("HOST:PORT", err)

    def test_port_0_prints_bound_address_and_serves(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home)
        self.assertGreater(p.port, 0)
        status, _, data = p.request("GET", "/healthz")
        self.assertEqual((status, data), (200, b"ok\n"))

    def test_startup_lines_describe_found_credentials(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home)
        line = p.wait_for("ChatGPT login from")
        self.assertIn(os.path.join(self.home, "auth.json"), line)
        self.assertIn("account acct-file", line)  # tokens.account_id wins
        self.assertIn("plan pro", line)           # from the id_token
        self.assertIn("expires", line)
        self.assertNotIn("will refresh", line)

    def test_startup_without_auth_json_says_so_and_still_serves_healthz(self):
        p = self.spawn("--port", "0", "--codex-home", self.home)
        path = os.path.join(self.home, "auth.json")
        line = p.wait_for("no usable login")
        self.assertIn("No Codex login found", line)
        self.assertIn(path, line)
        status, _, data = p.request("GET", "/healthz")
        self.assertEqual((status, data), (200, b"ok\n"))
        status, _, data = p.post(simple_request())
        body = json.loads(data)
        self.assertEqual(status, 401, body)
        self.assertIn(path, body["error"]["message"])
        self.assertIn("codex login", body["error"]["message"])
        self.assertEqual(self.backend.requests, [])


class EnvironmentTests(ProcessTestCase):
    def test_refresh_url_override_env_var(self):
        before = self.write_expired_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home,
                       env=clean_env(CODEX_REFRESH_TOKEN_URL_OVERRIDE=self.oauth.url))
        self.assertIn("will refresh", p.wait_for("ChatGPT login from"))
        status, _, data = p.post(simple_request())
        self.assertEqual(status, 200, data)
        self.assertEqual(self.oauth.count, 1)
        self.assertEqual(self.oauth.requests[0]["body"]["refresh_token"],
                         before["tokens"]["refresh_token"])
        after = read_auth(self.home)
        self.assertEqual(after["tokens"]["refresh_token"], self.oauth.current_refresh)
        self.assertNotEqual(after["tokens"]["access_token"], before["tokens"]["access_token"])
        self.assertEqual(self.backend.requests[-1]["headers"]["Authorization"],
                         "Bearer " + after["tokens"]["access_token"])

    def test_codex_home_env_and_flag_select_auth_json(self):
        home_env = tempfile.mkdtemp(prefix="codex-home-env-")
        home_flag = tempfile.mkdtemp(prefix="codex-home-flag-")
        self.addCleanup(shutil.rmtree, home_env, True)
        self.addCleanup(shutil.rmtree, home_flag, True)
        token_env, token_flag = access_token(), access_token()
        self.backend.valid_tokens.update((token_env, token_flag))
        write_auth(home_env, auth_document(access=token_env, account_id="acct-env"))
        write_auth(home_flag, auth_document(access=token_flag, account_id="acct-flag"))

        p = self.spawn("--port", "0", env=clean_env(CODEX_HOME=home_env))
        self.assertIn(os.path.join(home_env, "auth.json"), p.wait_for("ChatGPT login from"))
        self.assertEqual(p.post(simple_request())[0], 200)
        sent = self.backend.requests[-1]["headers"]
        self.assertEqual(sent["Authorization"], "Bearer " + token_env)
        self.assertEqual(sent["ChatGPT-Account-ID"], "acct-env")

        # --codex-home wins over CODEX_HOME
        q = self.spawn("--port", "0", "--codex-home", home_flag,
                       env=clean_env(CODEX_HOME=home_env))
        self.assertIn(os.path.join(home_flag, "auth.json"), q.wait_for("ChatGPT login from"))
        self.assertEqual(q.post(simple_request())[0], 200)
        sent = self.backend.requests[-1]["headers"]
        self.assertEqual(sent["Authorization"], "Bearer " + token_flag)
        self.assertEqual(sent["ChatGPT-Account-ID"], "acct-flag")


class SignalTests(ProcessTestCase):
    TEXT = "0123456789" * 6  # 15 text deltas: a stream of 20 frames

    def start_held_stream(self, p):
        """A stream in flight: the backend sends two frames, then holds the rest until
        reply.go(). -> (client thread, its result dict, reply)."""
        reply = Reply(frames=stream_frames(text=self.TEXT), hold_after=2)
        self.backend.replies.append(reply)
        result = {}

        def client():
            try:
                status, _, data = p.request("POST", "/v1/responses",
                                            simple_request(stream=True), timeout=20)
                result.update(status=status, data=data, at=time.monotonic())
            except Exception as e:  # reported by the assertions below
                result["error"] = e

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        self.assertTrue(reply.wait_held(), "the request never reached the backend")
        return thread, result, reply

    @staticmethod
    def probe(port):
        """What a new client meets: refused, answered, closed, reset, or hung (accepted into
        a listen queue nobody serves)."""
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"  # queued as the listener closed
        with s:
            s.settimeout(3)  # the stream is held: nothing would end a hang but this
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                data = s.recv(65536)
                return "answered" if data.startswith(b"HTTP/1.1 ") else "closed"
            except socket.timeout:
                return "hung"
            except OSError:
                return "reset"

    def wait_refused(self, port, timeout=5.0):
        """Probe until the proxy refuses new clients (its serve_forever returned); None if
        it did not within timeout, else the probes' outcomes on the way."""
        outcomes, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcomes.append(self.probe(port))
            if outcomes[-1] in ("refused", "hung"):
                return outcomes
            time.sleep(0.02)
        return outcomes

    def assert_complete_stream(self, result):
        self.assertNotIn("error", result, result.get("error"))
        self.assertEqual(result["status"], 200)
        events = parse_sse(result["data"])
        self.assertEqual(events[-1][0], "response.completed", events[-3:])
        text = "".join(e[1]["delta"] for e in events if e[0] == "response.output_text.delta")
        self.assertEqual(text, self.TEXT)
        self.assertEqual(events[-1][1]["response"]["output"][0]["content"][0]["text"], self.TEXT)

    def test_sigterm_finishes_inflight_stream_then_exits_0(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home)
        thread, result, reply = self.start_held_stream(p)
        self.assertTrue(thread.is_alive())
        sent = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        p.wait_for("received SIGTERM", 30)
        self.assertEqual(self.wait_refused(p.port)[-1], "refused")  # it is draining now
        self.assertIsNone(p.proc.poll(), "the proxy exited with a stream in flight")
        reply.go()
        thread.join(15)
        self.assertFalse(thread.is_alive(), "the in-flight stream never ended")
        self.assert_complete_stream(result)
        rc = p.wait_exit(timeout=20)
        self.assertEqual(rc, 0, p.text())
        # once the stream is done, at once: not at the end of the drain's 25 s grace period
        self.assertLess(time.monotonic() - sent, 20.0)
        self.assertIn("received SIGTERM", p.text())
        self.assertIn("stopped", p.text())
        self.assertNotIn("Traceback", p.text())
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()

    def test_sigterm_does_not_leave_new_connections_hanging_while_draining(self):
        # Once shutdown has begun, a new client must be refused (or answered) at once, not
        # accepted into a listen queue nobody serves until the drain ends (up to 25 s).
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home)
        thread, result, reply = self.start_held_stream(p)  # held until reply.go()
        p.proc.send_signal(signal.SIGTERM)
        p.wait_for("received SIGTERM", 30)
        # new clients from now until serve_forever returns (it polls every 0.5 s) and after
        outcomes = self.wait_refused(p.port)
        self.assertTrue(thread.is_alive(), "the stream ended too early for this test")
        for outcome in outcomes:
            self.assertNotEqual(outcome, "hung",
                                "a connection made during shutdown got no answer and was not "
                                "refused (stream still running: %s)" % thread.is_alive())
        reply.go()
        thread.join(15)
        self.assert_complete_stream(result)
        self.assertEqual(p.wait_exit(timeout=8), 0)

    def test_sigint_without_requests_exits_0_quickly(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home)
        self.assertEqual(p.request("GET", "/healthz")[0], 200)
        p.proc.send_signal(signal.SIGINT)
        rc = p.wait_exit(timeout=5)  # quickly: far less than the drain's grace period
        self.assertEqual(rc, 0, p.text())
        self.assertIn("received SIGINT", p.text())
        self.assertNotIn("KeyboardInterrupt", p.text())
        self.assertNotIn("Traceback", p.text())
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()


class NoSecretsTests(ProcessTestCase):
    def test_no_token_in_stderr_dumps_or_answers_with_debug(self):
        secrets = set()
        dumps = tempfile.mkdtemp(prefix="dumps-")
        self.addCleanup(shutil.rmtree, dumps, True)
        original = self.oauth.answer

        def answer(headers, raw):
            status, body = original(headers, raw)
            if isinstance(body, dict):
                secrets.update(v for k, v in body.items()
                               if k in ("access_token", "refresh_token", "id_token"))
            return status, body

        self.oauth.answer = answer

        def write(doc):
            write_auth(self.home, doc)
            secrets.update(v for v in doc["tokens"].values() if v and v.startswith(("ey", "rt")))
            return doc

        write(auth_document(access=self.token, refresh="rt-first-secret-0001"))
        p = self.spawn("--port", "0", "--codex-home", self.home, "--debug", "--dump-dir", dumps,
                       env=clean_env(CODEX_REFRESH_TOKEN_URL_OVERRIDE=self.oauth.url))
        answers = []

        def post(body, expected):
            status, headers, data = p.post(body)
            answers.append(repr(headers).encode() + data)
            self.assertEqual(status, expected, data)

        post(simple_request(), 200)                  # normal
        post(simple_request(stream=True), 200)       # normal, streamed
        doc = write(auth_document(access=access_token(-10), refresh="rt-second-secret-0002"))
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        post(simple_request(), 200)                  # refresh
        self.assertEqual(self.oauth.count, 1)
        write(auth_document(access=access_token(-10), refresh="rt-third-secret-0003"))
        self.oauth.failure = (503, {"error": "temporarily_unavailable"})
        post(simple_request(), 502)                  # failed refresh, transient
        self.oauth.failure = (400, {"error": {"code": "refresh_token_expired",
                                              "message": "expired"}})
        post(simple_request(), 401)                  # failed refresh, permanent
        self.oauth.failure = None
        revoked = access_token(3600)                 # valid-looking but refused by the backend
        doc = write(auth_document(access=revoked, refresh="rt-fourth-secret-0004"))
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        post(simple_request(stream=True), 200)       # backend 401, refresh, retry
        self.backend.check = lambda headers, body: (401, "Unauthorized")
        post(simple_request(), 401)                  # 401 even after a refresh
        self.assertGreaterEqual(self.oauth.count, 5)
        p.proc.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait_exit(10), 0)
        log = p.text()
        self.assertIn("debug: upstream request", log)
        self.assertIn("refreshing the access token", log)
        self.assertIn("token refresh failed", log)
        self.assertIn("backend answered 401", log)
        self.assertGreaterEqual(len(secrets), 12)
        dumped = []
        for name in sorted(os.listdir(dumps)):
            with open(os.path.join(dumps, name), encoding="utf-8") as f:
                dumped.append(f.read())
        self.assertEqual(len(dumped), 14, "7 upstream exchanges, each dumped")
        self.assertIn("[REDACTED]", dumped[0])
        everything = "\n".join([log] + dumped + [a.decode("utf-8", "replace") for a in answers])
        for secret in sorted(secrets):
            for piece in (secret, secret[-16:]):
                self.assertNotIn(piece, everything, "a token (or its tail) was written out")
        self.assertIsNone(re.search(r"eyJ[A-Za-z0-9_-]{10,}\.", everything))


class ServerInfoAndShutdownTests(ProcessTestCase):
    def test_server_info_written_into_new_nested_directory(self):
        self.write_valid_auth()
        info_dir = os.path.join(self.home, "run", "a", "b")
        path = os.path.join(info_dir, "server.json")
        p = self.spawn("--port", "0", "--codex-home", self.home, "--server-info", path)
        self.assertTrue(wait_until(lambda: os.path.exists(path), 5), "no --server-info file")
        with open(path, "rb") as f:
            raw = f.read()
        self.assertTrue(raw.endswith(b"\n") and raw.count(b"\n") == 1, raw)
        info = json.loads(raw)
        self.assertEqual(info, {"port": p.port, "pid": p.proc.pid})
        self.assertEqual(list(info), ["port", "pid"])
        self.assertEqual(os.listdir(info_dir), ["server.json"], "temporary files left behind")
        conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=5)
        conn.request("GET", "/healthz")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

    def test_http_shutdown_answers_200_finishes_stream_and_exits_0(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home, "--http-shutdown")
        self.backend.replies.append(Reply(delay=0.1))
        result = {}

        def stream():
            try:
                result["answer"] = p.post(simple_request(stream=True))
            except Exception as e:  # reported below
                result["error"] = e

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        self.assertTrue(wait_until(lambda: self.backend.requests, 5), "stream never started")
        started = time.monotonic()
        status, headers, data = p.request("GET", "/shutdown")
        self.assertEqual(status, 200, data)
        self.assertEqual(p.wait_exit(10), 0, p.text())
        self.assertLess(time.monotonic() - started, 5)
        worker.join(5)
        self.assertNotIn("error", result)
        status, _, data = result["answer"]
        self.assertEqual(status, 200)
        self.assertEqual(parse_sse(data)[-1][0], "response.completed", "in-flight stream cut")
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=1).close()

    def test_shutdown_is_404_without_the_flag(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home)
        status, headers, data = p.request("GET", "/shutdown")
        self.assertEqual(status, 404, data)
        self.assertIsInstance(json.loads(data)["error"], dict)
        time.sleep(0.7)  # longer than the serve loop's poll interval
        self.assertIsNone(p.proc.poll(), "the proxy exited")
        self.assertEqual(p.request("GET", "/healthz")[0], 200)


class SecurityProcessCase(ProcessTestCase):
    def run_proxy(self, *args, **kw):
        env = kw.pop("env", None) or security_env()
        return run_program(list(args) + ["--codex-home", self.home,
                                         "--upstream-url", self.backend.url],
                           timeout=kw.pop("timeout", 10), env=env)

    def start(self, *args, **kw):
        env = kw.pop("env", None) or security_env()
        args = list(args) + ["--codex-home", self.home, "--upstream-url", self.backend.url]
        return ProxyProcess(self, args, env=env, **kw)

    def key_file(self, content, name="client.key"):
        path = os.path.join(self.home, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o600)
        return path

    def assert_usage_error(self, result, *needles):
        err = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 2, err)
        self.assertIn("error:", err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("listening on", err)
        for needle in needles:
            self.assertIn(needle, err)
        return err


class BindAddressTests(SecurityProcessCase):
    def test_non_loopback_address_without_key_refuses_before_binding(self):
        self.write_valid_auth()
        cases = [("0.0.0.0:0", {}), ("192.168.1.10:0", {}), ("[::]:0", {}),
                 ("myhost.example:0", {}),                         # a name may be anything
                 ("0.0.0.0:0", {proxy.CLIENT_KEY_ENV: "   "})]     # a blank key is no key
        for addr, extra in cases:
            with self.subTest(addr=addr, env=extra):
                result = self.run_proxy("--addr", addr, env=security_env(**extra), timeout=5)
                err = self.assert_usage_error(result, "--client-key-file",
                                              proxy.CLIENT_KEY_ENV, "refusing to listen")
                # 192.168.1.10 is not on this machine: a bind attempt would say "cannot listen"
                self.assertNotIn("cannot listen", err)

    def test_key_file_lets_it_listen_on_all_interfaces(self):
        self.write_valid_auth()
        path = self.key_file(CLIENT_KEY.encode() + b"\n")
        p = self.start("--addr", "0.0.0.0:0", "--client-key-file", path)
        self.assertEqual(p.listen_host, "0.0.0.0")
        self.assertEqual(p.request("GET", "/healthz")[::2], (200, b"ok\n"))
        status, _, data = p.post(simple_request())
        self.assertEqual(status, 401, data)
        self.assertEqual(json.loads(data)["error"]["code"], "invalid_client_key")
        status, _, data = p.post(simple_request(),
                                 headers={"Authorization": "Bearer " + CLIENT_KEY})
        self.assertEqual(status, 200, data)
        self.assertEqual(len(self.backend.requests), 1)
        self.assertNotIn(CLIENT_KEY, p.text())

    def test_env_key_lets_it_listen_on_all_interfaces_and_is_required(self):
        self.write_valid_auth()
        p = self.start("--addr", "0.0.0.0:0",
                       env=security_env(**{proxy.CLIENT_KEY_ENV: CLIENT_KEY}))
        self.assertEqual(p.listen_host, "0.0.0.0")
        for method, path in (("POST", "/v1/responses"), ("GET", "/status")):
            body = simple_request() if method == "POST" else None
            with self.subTest(path=path):
                status, _, data = p.request(method, path, body)
                self.assertEqual(status, 401, data)
                error = json.loads(data)["error"]
                self.assertEqual(error["code"], "invalid_client_key")
                status, _, data = p.request(method, path, body,
                                            headers={"x-api-key": CLIENT_KEY + "x"})
                self.assertEqual(status, 401, data)
                status, _, data = p.request(method, path, body,
                                            headers={"x-api-key": CLIENT_KEY})
                self.assertEqual(status, 200, data)
        self.assertEqual(p.request("GET", "/healthz")[::2], (200, b"ok\n"))
        self.assertEqual(len(self.backend.requests), 1)
        self.assertNotIn("x-api-key", {k.lower() for k in self.backend.requests[0]["headers"]})
        self.assertNotIn(CLIENT_KEY, p.text())

    def test_loopback_addresses_start_without_a_key(self):
        self.write_valid_auth()
        for addr in ("localhost:0", "127.0.0.1:0"):
            with self.subTest(addr=addr):
                p = self.start("--addr", addr)
                self.assertEqual(p.listen_host, "127.0.0.1")
                self.assertEqual(p.request("GET", "/healthz")[::2], (200, b"ok\n"))
                status, _, data = p.post(simple_request())
                self.assertEqual(status, 200, data)
                p.kill()

    def test_ipv6_loopback_starts_without_a_key(self):
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except (OSError, AttributeError):
            self.skipTest("no IPv6 loopback here")
        self.write_valid_auth()
        p = self.start("--addr", "[::1]:0", connect_host="::1")
        self.assertEqual(p.listen_host, "[::1]")
        self.assertEqual(p.request("GET", "/healthz")[::2], (200, b"ok\n"))
        status, _, data = p.post(simple_request())  # Host: [::1]:PORT
        self.assertEqual(status, 200, data)

    def test_empty_missing_or_multiline_key_file_is_a_clear_exit_2(self):
        missing = os.path.join(self.home, "no-such.key")
        cases = [(self.key_file(b"", "empty.key"), "non-empty"),
                 (self.key_file(b" \n\n", "blank.key"), "non-empty"),
                 (self.key_file(b"abc\ndef\n", "two.key"), "one non-empty line"),
                 (missing, "No such file")]
        runs = [(path, reason, addr) for path, reason in cases
                for addr in ("127.0.0.1:0", "0.0.0.0:0")]
        results = side_by_side(lambda run: self.run_proxy("--addr", run[2], "--client-key-file",
                                                          run[0]), runs)
        for (path, reason, addr), result in zip(runs, results):
            with self.subTest(path=os.path.basename(path), addr=addr):
                self.assert_usage_error(result, "--client-key-file", path, reason)


class PermissionWarningTests(SecurityProcessCase):
    def test_world_readable_auth_json_gets_a_chmod_warning(self):
        path = write_auth(self.home, auth_document(access=self.token), mode=0o644)
        p = self.start("--port", "0")
        line = p.wait_for("chmod 600")
        self.assertIn(path, line)
        self.assertIn("warning", line)
        self.assertIn("group or others", line)
        self.assertEqual(p.request("GET", "/healthz")[0], 200)  # a warning, not a refusal

    def test_private_auth_json_gets_no_warning(self):
        write_auth(self.home, auth_document(access=self.token), mode=0o600)
        p = self.start("--port", "0")
        self.assertEqual(p.request("GET", "/healthz")[0], 200)
        p.wait_for("GET /healthz")  # every start-up line is out by now
        self.assertNotIn("chmod", p.text())
        self.assertNotIn("readable by group", p.text())


class PermissionWarningUnitTests(SecurityCase):
    def test_group_or_other_bits_warn_owner_only_does_not(self):
        path = os.path.join(self.home, "auth.json")
        for mode, warns in ((0o640, True), (0o604, True), (0o660, True), (0o600, False),
                            (0o400, False)):
            os.chmod(path, mode)
            with self.subTest(mode=oct(mode)):
                warning = self.proxy.app.operator.permission_warning()
                if warns:
                    self.assertIsNotNone(warning)
                    self.assertIn("chmod 600 " + path, warning)
                else:
                    self.assertIsNone(warning)


class NoFlagsDefaultsTests(SecurityProcessCase):
    def test_proxy_started_without_security_flags_is_protected(self):
        self.write_valid_auth()
        p = self.start("--port", "0")
        self.assertEqual(p.listen_host, "127.0.0.1")
        body = json_body(simple_request())
        ok = [("Content-Type", "application/json")]
        status, _, data = raw_http(p.port, "POST", "/v1/responses", ok, body,
                                   host="evil.example:%d" % p.port)
        self.assertEqual(status, 403, data)
        self.assertEqual(json.loads(data)["error"]["code"], "host_not_allowed")
        status, headers, data = raw_http(p.port, "POST", "/v1/responses",
                                         ok + [("Origin", "https://evil.example")], body)
        self.assertEqual(status, 403, data)
        self.assertEqual(json.loads(data)["error"]["code"], "origin_not_allowed")
        self.assertEqual(cors_headers(headers), {})
        status, _, data = raw_http(p.port, "POST", "/v1/responses",
                                   [("Content-Type", "text/plain")], body)
        self.assertEqual(status, 415, data)
        self.assertIn("Content-Type: application/json", json.loads(data)["error"]["message"])
        self.assertEqual(self.backend.requests, [])
        status, headers, data = raw_http(p.port, "POST", "/v1/responses", ok, body)
        self.assertEqual(status, 200, data)
        self.assertEqual(json.loads(data)["output"][0]["content"][0]["text"], "Hello there!")
        self.assertEqual(cors_headers(headers), {})
        self.assertEqual(len(self.backend.requests), 1)


def process_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
class DescriptorExhaustionTests(ProcessTestCase):
    LIMIT = 64

    def spawn_limited(self, soft, hard):
        import resource

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        popen = subprocess.Popen
        with mock.patch.object(subprocess, "Popen",
                               lambda *a, **kw: popen(*a, preexec_fn=low_limit, **kw)):
            return self.spawn("--port", "0", "--codex-home", self.home)

    def test_soft_descriptor_limit_is_raised_to_the_hard_one(self):
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard <= self.LIMIT:
            self.skipTest("no finite hard limit above %d here" % self.LIMIT)
        proc = self.spawn_limited(self.LIMIT, hard)
        with open("/proc/%d/limits" % proc.proc.pid) as f:
            line = [l for l in f if l.startswith("Max open files")][0]
        self.assertEqual(line.split()[3:5], [str(hard), str(hard)], line)

    def test_no_busy_loop_when_accept_runs_out_of_descriptors(self):
        limit = self.LIMIT
        # soft = hard: the proxy's raise to the hard limit cannot lift it
        proc = self.spawn_limited(limit, limit)
        pid = proc.proc.pid
        clients = []
        self.addCleanup(lambda: [s.close() for s in clients])
        for _ in range(limit + 30):
            clients.append(socket.create_connection(("127.0.0.1", proc.port), timeout=5))
        full = wait_until(lambda: len(os.listdir("/proc/%d/fd" % pid)) >= limit, timeout=10)
        self.assertTrue(full, "the proxy never ran out of descriptors")
        before = process_cpu_seconds(pid)
        time.sleep(1.5)  # a window to measure: a busy loop would burn all of it
        spent = process_cpu_seconds(pid) - before
        self.assertLess(spent, 0.5, "the proxy spun at %.0f%% CPU while out of descriptors"
                        % (spent / 1.5 * 100))
        proc.wait_for("cannot accept connections", timeout=5)
        for s in clients:
            s.close()
        clients.clear()
        status, _, body = proc.request("GET", "/healthz", timeout=10)
        self.assertEqual((status, body), (200, b"ok\n"))
        # said once per shortage, not once per failed accept (dozens in the window above);
        # a descriptor freed inside the proxy meanwhile may end one shortage and start another
        self.assertIn(proc.text().count("cannot accept connections"), (1, 2, 3), proc.text())


class LoginProcessTests(ProcessTestCase):
    """`login` the way a user runs it: a subprocess, its prompts on stderr."""

    def test_device_login_then_the_proxy_runs_on_it(self):
        self.oauth.pending_polls = 2
        self.oauth.lifetime = -10  # expired at once: the proxy must refresh at --issuer
        result = run_program(["login", "--codex-home", self.home, "--issuer", self.oauth.base],
                             timeout=30)
        said = result.stderr.decode()
        self.assertEqual(result.returncode, 0, said)
        self.assertIn("ABCD-1234", said)
        self.assertIn("Logged in as login@example.com", said)
        login = read_auth(self.home)
        self.assertEqual(login["tokens"]["account_id"], "acct-login")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.home, "auth.json")).st_mode),
                         0o600)
        self.oauth.lifetime = 3600
        proc = self.spawn("--port", "0", "--codex-home", self.home, "--issuer", self.oauth.base)
        status, _, body = proc.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        self.assertEqual(self.oauth.requests[0]["body"]["refresh_token"],
                         login["tokens"]["refresh_token"])
        self.assertEqual(self.backend.requests[-1]["headers"]["ChatGPT-Account-ID"], "acct-login")

    def test_browser_login_by_pasting_the_address(self):
        proc = ProxyProcess(self, ["login", "--browser", "--codex-home", self.home,
                                   "--issuer", self.oauth.base],
                            stdin_data=b"", close_stdin=False, wait=False)
        url = re.search(r"http://\S+/oauth/authorize\?\S+",
                        proc.wait_for("/oauth/authorize?", 15)).group()
        # The browser signs in, then cannot load the callback (another machine): the user
        # copies the address it shows.
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", parts.path + "?" + parts.query)
        location = conn.getresponse().getheader("Location")
        conn.close()
        proc.proc.stdin.write(location.replace("127.0.0.1", "localhost").encode() + b"\n")
        proc.proc.stdin.flush()
        self.assertEqual(proc.wait_exit(20), 0, proc.text())
        self.assertIn("Logged in as login@example.com", proc.text())
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"],
                         self.oauth.current_refresh)

    def test_browser_login_through_the_callback_gets_its_page_before_the_exit(self):
        proc = ProxyProcess(self, ["login", "--browser", "--codex-home", self.home,
                                   "--issuer", self.oauth.base],
                            stdin_data=b"", close_stdin=False, wait=False)
        url = re.search(r"http://\S+/oauth/authorize\?\S+",
                        proc.wait_for("/oauth/authorize?", 15)).group()
        with no_proxy_opener().open(url, timeout=20) as page:
            self.assertEqual(page.status, 200)
            self.assertIn(b"Signed in", page.read())
        self.assertEqual(proc.wait_exit(20), 0, proc.text())
        self.assertEqual(read_auth(self.home)["tokens"]["refresh_token"],
                         self.oauth.current_refresh)

    def test_ctrl_c_while_waiting_is_one_line_and_keeps_the_old_login(self):
        path = self.write_valid_auth()
        with open(path, "rb") as f:
            before = f.read()
        self.oauth.pending_polls = 10 ** 6
        self.oauth.interval = "0.05"
        proc = ProxyProcess(self, ["login", "--codex-home", self.home, "--issuer",
                                   self.oauth.base], wait=False)
        proc.wait_for("Waiting for the approval", 15)
        self.assertTrue(wait_until(lambda: self.oauth.polls >= 2, 10))
        proc.proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait_exit(15), 130)
        text = proc.text()
        self.assertNotIn("Traceback", text)
        self.assertIn("login interrupted: %s is as it was" % path, text)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_startup_without_a_login_names_the_command(self):
        proc = self.spawn("--port", "0", "--codex-home", self.home)
        line = proc.wait_for("no usable login")
        self.assertIn("`python3 codex_responses_proxy.py login`", line)


def resident_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


@unittest.skipUnless(os.path.exists("/proc/self/cmdline"), "reads /proc/PID/cmdline")
class ScriptProcessTests(ProcessTestCase):
    """The proxy runs as the process it was started as: what `ps` and systemd show, the
    interpreter's flags and module path, and no files of its own beyond those it is given."""

    def spawn_in(self, cwd, *flags, **kw):
        self.write_valid_auth()
        return ProxyProcess(self, ["--port", "0", "--codex-home", self.home, "--upstream-url",
                                   self.backend.url], interpreter_flags=flags, cwd=cwd, **kw)

    def test_the_process_title_is_the_command_as_typed_flags_included(self):
        p = self.spawn_in(None, "-X", "utf8", "-W", "ignore::DeprecationWarning")
        self.assertEqual(p.request("GET", "/healthz")[0], 200)
        with open("/proc/%d/cmdline" % p.proc.pid, "rb") as f:
            cmdline = f.read().split(b"\0")[:-1]
        self.assertEqual(cmdline, [os.fsencode(arg) for arg in p.command])

    def test_a_module_in_the_working_directory_does_not_shadow_the_standard_library(self):
        directory = tempfile.mkdtemp(prefix="proxy-cwd-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(os.path.join(directory, "json.py"), "w") as f:
            f.write("raise SystemExit('imported json.py from the working directory')\n")
        p = self.spawn_in(directory)
        status, _, body = p.request("GET", "/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertNotIn("working directory", p.text())

    def test_nothing_is_written_to_the_cache_directory(self):
        cache = tempfile.mkdtemp(prefix="xdg-cache-")
        self.addCleanup(shutil.rmtree, cache, True)
        p = self.spawn_in(None, env=clean_env(XDG_CACHE_HOME=cache, HOME=cache))
        self.assertEqual(p.post(simple_request())[0], 200)
        self.assertEqual(os.listdir(cache), [])

    @unittest.skipIf(sys.version_info[:3] in ((3, 12, 0), (3, 12, 1), (3, 12, 2)),
                     "these Pythons refuse new threads once a script's top level returns")
    def test_a_script_gives_its_parse_tree_back(self):
        # Against the same proxy imported, whose parse tree compile() freed at once: the
        # script used to keep about 12 MB more (Python 3.9 and later).
        script = self.spawn_in(None)
        script.request("GET", "/healthz")
        imported = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import "
             "codex_responses_proxy as p; p.give_back_freed_memory(); "
             "sys.exit(p.main(sys.argv[1:]))" % HERE, "--port",
             "0", "--codex-home", self.home, "--upstream-url", self.backend.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=clean_env())
        self.addCleanup(imported.wait)
        self.addCleanup(imported.kill)
        self.addCleanup(imported.stderr.close)
        self.assertIn(b"listening on", imported.stderr.readline())

        def resident_mb(pid):
            with open("/proc/%d/status" % pid) as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))/1024
        self.assertTrue(wait_until(lambda: resident_mb(script.proc.pid)
                                   < resident_mb(imported.pid) + 6, 10.0),
                        "script %.1f MB, imported %.1f MB" % (resident_mb(script.proc.pid),
                                                             resident_mb(imported.pid)))

    def test_the_systemd_unit_holds_malloc_to_two_arenas(self):
        # glibc's default, up to eight arenas per core, each keeping what is freed in it,
        # let the thread-per-connection proxy creep up for minutes under load (bench 9)
        with open(os.path.join(os.path.dirname(PROGRAM), "codex-responses-proxy.service")) as f:
            self.assertIn("\nEnvironment=MALLOC_ARENA_MAX=2\n", f.read())

    def test_a_large_request_leaves_no_large_heap_behind(self):
        # glibc would keep a 24 MB body's blocks (the body, its parse, its copy upstream) in
        # the heap after the request, 50 MB or more; mapped apart, they go back at once
        p = self.spawn_in(None)
        self.assertEqual(p.post(simple_request())[0], 200)
        before = resident_mb(p.proc.pid)
        body = simple_request(input="x" * (24 << 20))
        self.assertEqual(p.post(body)[0], 200)
        self.assertTrue(wait_until(lambda: resident_mb(p.proc.pid) < before + 16, 10.0),
                        "%.1f MB after, %.1f MB before" % (resident_mb(p.proc.pid), before))


@unittest.skipUnless(os.path.exists("/proc/self/status"), "reads /proc/PID/status")
class MessageCostTests(ProcessTestCase):
    """Issue 19: one large client WebSocket message costs a small multiple of its size in
    the proxy's peak memory (it was about 6 times: 190 MB for 30 MB)."""

    def test_a_30_mib_message_costs_at_most_about_three_times_its_size(self):
        self.write_valid_auth()
        p = self.spawn("--port", "0", "--codex-home", self.home, "--upstream-transport", "http")
        client = WSClient(p.port, timeout=60)
        self.addCleanup(client.close_socket)
        self.assertEqual(client.status, 101)
        rnd = random.Random(7)
        words = ["%x" % rnd.getrandbits(40) for _ in range(4096)]
        size = 30 * 1024 * 1024
        text = " ".join(words[rnd.getrandbits(12)] for _ in range(size // 11))[:size - 200]
        message = json.dumps({"type": "response.create", "model": "gpt-5.1-codex",
                              "store": False, "input": [user_item(text)]}).encode()
        text_length = len(text)
        del text
        before = peak_rss_mb(p.proc.pid)
        client.send_frame(0x1, message)
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")
        self.assertEqual(len(self.backend.requests[-1]["body"]["input"][0]["content"][0]
                             ["text"]), text_length)
        growth = peak_rss_mb(p.proc.pid) - before
        self.assertLess(growth, 3.6 * len(message) / 1048576.0,
                        "peak grew %.0f MB for a %.0f MB message" % (
                            growth, len(message) / 1048576.0))


# ============================================================================================
# Status: /status, /healthz and the status page (GET /)
# ============================================================================================

def parse_iso(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


class StatusTests(ProxyTestCase):
    def status(self):
        status, headers, data = self.request("GET", "/status")
        self.assertEqual(status, 200, data)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        self.outputs.append(data)
        return json.loads(data)

    def setUp(self):
        super().setUp()
        self.outputs = []

    def assert_no_secrets(self):
        everything = b"\n".join(self.outputs).decode("utf-8", "replace")
        for secret in tokens_of(self.home) + [self.token, "rt-initial-0123456789"]:
            self.assertNotIn(secret, everything)
        self.assertIsNone(re.search(r"eyJ[A-Za-z0-9_-]{10,}", everything))

    def log_count(self, needle):
        return len([l for l in self.log_text().splitlines() if needle in l])

    def test_healthz_is_plain_ok(self):
        status, headers, data = self.request("GET", "/healthz")
        self.assertEqual((status, data.strip()), (200, b"ok"))
        self.assertTrue(headers["content-type"].startswith("text/plain"), headers)

    def test_chatgpt_fields_and_counters(self):
        doc = self.status()
        self.assertEqual(doc["mode"], "chatgpt")
        self.assertEqual(doc["version"], proxy.__version__)
        self.assertIsInstance(doc["uptime_seconds"], (int, float))
        self.assertTrue(0 <= doc["uptime_seconds"] < 60)
        login = doc["login"]
        self.assertIs(login["ok"], True)
        self.assertEqual(login["account_id"], "acct-file")
        self.assertEqual(login["plan_type"], "pro")
        exp = proxy.jwt_claims(self.token)["exp"]
        self.assertEqual(parse_iso(login["access_token_expires_at"]), exp)
        total = doc["requests"]["total"]
        self.assertTrue(wait_until(lambda: self.log_count("GET /status") == 1, 3))
        self.assertEqual(self.post(simple_request())[0], 200)
        self.assertTrue(wait_until(lambda: self.log_count("POST /v1/responses") == 1, 3))
        doc = self.status()
        self.assertEqual(doc["requests"]["total"], total + 1)  # reading /status is no traffic
        self.assertEqual(doc["requests"]["by_status"].get("200", 0), 1)
        self.assert_no_secrets()

    def test_quota_windows_from_usage_limit_429(self):
        self.backend.answer_headers = []  # only the reply's own quota headers
        limit = {"error": {"type": "usage_limit_reached", "message":
                           "The usage limit has been reached", "plan_type": "plus",
                           "resets_in_seconds": 3600}}
        self.backend.replies.append(Reply(status=429, body=json.dumps(limit).encode(), headers=[
            ("x-codex-primary-used-percent", "100"), ("x-codex-primary-window-minutes", "300"),
            ("x-codex-primary-reset-after-seconds", "3600"),
            ("x-codex-secondary-used-percent", "40"),
            ("x-codex-secondary-window-minutes", "10080")]))
        before = time.time()
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 429, body)
        self.wait_for_log("status=429")
        doc = self.status()
        quota = doc["quota"]
        self.assertEqual(quota["primary"]["used_percent"], 100)
        self.assertEqual(quota["primary"]["window_minutes"], 300)
        resets = parse_iso(quota["primary"]["resets_at"])
        self.assertTrue(before + 3600 - 2 <= resets <= time.time() + 3600 + 1, quota)
        self.assertEqual(quota["secondary"]["used_percent"], 40)
        self.assertEqual(quota["secondary"]["window_minutes"], 10080)
        self.assertEqual(doc["requests"]["by_status"].get("429"), 1)
        self.assert_no_secrets()

    def test_failed_then_successful_refresh(self):
        expired = access_token(-10)
        write_auth(self.home, auth_document(access=expired))
        self.oauth.failure = (503, {"error": "temporarily_unavailable"})
        self.assertIsNone(self.status()["login"].get("last_refresh_attempt"))
        before = time.time()
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 502, body)
        attempt = self.status()["login"]["last_refresh_attempt"]
        self.assertIs(attempt["ok"], False)
        self.assertIn("503", attempt["error"])
        self.assertTrue(before - 2 <= proxy.parse_rfc3339(attempt["at"]).timestamp()
                        <= time.time() + 1, attempt)
        self.oauth.failure = None
        self.oauth.current_refresh = None
        self.assertEqual(self.post(simple_request())[0], 200)
        attempt = self.status()["login"]["last_refresh_attempt"]
        self.assertIs(attempt["ok"], True)
        self.assertFalse(attempt.get("error"))
        self.assertNotIn(expired, b"\n".join(self.outputs).decode())
        self.assert_no_secrets()


class StatusWithoutLoginTests(ProxyTestCase):
    auth = False

    def test_status_answers_without_auth_json(self):
        status, _, data = self.request("GET", "/status")
        self.assertEqual(status, 200, data)
        doc = json.loads(data)
        self.assertEqual(doc["mode"], "chatgpt")
        self.assertIs(doc["login"]["ok"], False)
        self.assertEqual(self.request("GET", "/healthz")[2].strip(), b"ok")


CODEX_UA = "codex_cli_rs/0.171.0 (Debian 12.0.0; x86_64) xterm-256color"


QUOTA_HEADERS = [("x-codex-primary-used-percent", "12.5"),
                 ("x-codex-secondary-used-percent", "40"),
                 ("x-codex-primary-window-minutes", "300"),
                 ("x-codex-primary-reset-after-seconds", "7380"),
                 ("x-codex-secondary-window-minutes", "10080"),
                 ("x-codex-secondary-reset-after-seconds", "302400"),
                 ("x-codex-credits-has-credits", "True"),
                 ("x-codex-credits-balance", "120")]


class StatusPageDataTests(unittest.TestCase):
    """What /status lists for the page, pure."""

    def test_client_families_from_user_agents(self):
        cases = {
            CODEX_UA: "Codex CLI",
            "codex_exec/0.171.0 (Mac OS 15.1.0; arm64) unknown": "Codex CLI",
            "codex_vscode/0.171.0 (Windows 11; x86_64) vscode/1.99": "Codex IDE",
            "codex_chatgpt_desktop/0.171.0 (Mac OS 15.1.0; arm64)": "Codex app",
            "claude-cli/2.1.332 (external, sdk-cli)": "Claude Code",
            "OpenAI/Python 2.8.1": "openai-python",
            "Agents/Python 0.6.1": "openai-agents",
            "OpenAI/JS 6.9.0": "openai-node",
            "ai-sdk/openai/2.0.52 ai-sdk/provider-utils/3.0.12 runtime/node.js/22": "ai-sdk",
            "curl/8.5.0": "curl",
            "Python/3.12 websockets/15.0.1": "Python websockets",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36": "browser",
            "my-agent/1.0 (+https://example.com)": "my-agent",
            "": "unknown", None: "unknown", "(((": "other",
        }
        for agent, family in cases.items():
            self.assertEqual(proxy.client_family(agent), family, agent)
        # An unknown client is named by its product token, never by the rest of its header.
        self.assertEqual(proxy.client_family("x" * 50 + "/1 secret-ish tail"), "x" * 32)

    def test_a_record_holds_what_happened_and_nothing_asked(self):
        fields = {"model": "gpt-5.1-codex", "in": 21, "cached": 7, "out": 5, "stream": True,
                  "error": None, "note": "client disconnected"}
        record = proxy.request_record("POST", "/v1/responses", "OpenAI/Python 2.8.1", fields,
                                      200, 1.23456, 1700000000)
        self.assertEqual(record, {
            "at": "2023-11-14T22:13:20Z", "client": "openai-python",
            "route": "POST /v1/responses", "model": "gpt-5.1-codex", "status": 200,
            "seconds": 1.235, "input_tokens": 21, "cached_tokens": 7, "output_tokens": 5,
            "error": None})
        # No usage (an error, or a route without it): no numbers made up.
        record = proxy.request_record("POST", "/v1/responses", None, {"in": "-", "out": "-",
                                      "error": "usage_limit_reached"}, 429, 0.1, 1700000000)
        self.assertEqual((record["input_tokens"], record["output_tokens"], record["error"]),
                         (None, None, "usage_limit_reached"))
        # A path nobody serves may hold anything a client typed: not listed as such.
        self.assertEqual(proxy.listed_route("GET", "/sk-secret-typed-as-path"),
                         "GET (unknown path)")
        self.assertEqual(proxy.listed_route("GET", "/v1/responses/resp_1/input_items"),
                         "GET /v1/responses/resp_1/input_items")

    def test_the_ring_keeps_the_last_50_newest_first_and_tokens_per_model(self):
        recent = proxy.RecentRequests()
        for i in range(60):
            recent.add(proxy.request_record("POST", "/v1/responses", CODEX_UA, {
                "model": "m-%d" % (i % 2), "in": i, "cached": 1, "out": 2}, 200, 0.5, i))
        recent.add(proxy.request_record("GET", "/v1/models", CODEX_UA, {}, 200, 0.01, 60))
        report = recent.report()
        listed = report["recent_requests"]
        self.assertEqual(len(listed), 50)
        self.assertEqual(listed[0]["route"], "GET /v1/models")
        self.assertEqual([r["input_tokens"] for r in listed[1:4]], [59, 58, 57])
        self.assertEqual(report["tokens_by_model"]["m-0"], {
            "requests": 30, "input_tokens": sum(range(0, 60, 2)), "cached_tokens": 30,
            "output_tokens": 60})
        self.assertEqual(sorted(report["tokens_by_model"]), ["m-0", "m-1"])

    def test_tokens_go_to_the_model_the_backend_got_whatever_name_the_client_used(self):
        recent = proxy.RecentRequests()
        for model in ("gpt-5.5", "claude-opus-5-5->gpt-5.5", "claude-haiku-5-5->gpt-5.4-mini"):
            recent.add(proxy.request_record("POST", "/v1/messages", None, {
                "model": model, "in": 10, "cached": 4, "out": 3}, 200, 0.1, 0))
        report = recent.report()
        self.assertEqual(report["tokens_by_model"], {
            "gpt-5.5": {"requests": 2, "input_tokens": 20, "cached_tokens": 8,
                        "output_tokens": 6},
            "gpt-5.4-mini": {"requests": 1, "input_tokens": 10, "cached_tokens": 4,
                             "output_tokens": 3}})
        self.assertEqual(report["recent_requests"][0]["model"],
                         "claude-haiku-5-5->gpt-5.4-mini")  # the table says who asked

    def test_made_up_model_names_cannot_grow_the_table_without_end(self):
        recent = proxy.RecentRequests()
        for i in range(proxy.COUNTED_MODELS + 30):
            recent.add(proxy.request_record("POST", "/v1/responses", None, {
                "model": "model-%d" % i, "in": 1, "out": 1}, 400, 0.0, 0))
        models = recent.report()["tokens_by_model"]
        self.assertEqual(len(models), proxy.COUNTED_MODELS + 1)
        self.assertEqual(models[proxy.OTHER_MODELS]["requests"], 30)

    def test_same_origin_is_the_requests_own_host_only(self):
        ok = proxy.same_origin
        self.assertTrue(ok("http://127.0.0.1:8787", "127.0.0.1:8787"))
        self.assertTrue(ok("http://LOCALHOST:8787", "localhost:8787"))
        for origin, host in [("http://127.0.0.1:3000", "127.0.0.1:8787"),
                             ("http://localhost:8787", "127.0.0.1:8787"),
                             ("null", "127.0.0.1:8787"), ("http://127.0.0.1:8787", None),
                             ("http://user@127.0.0.1:8787", "127.0.0.1:8787"),
                             ("file://127.0.0.1:8787", "127.0.0.1:8787"),
                             ("http://127.0.0.1:8787/x", "127.0.0.1:8787")]:
            self.assertFalse(ok(origin, host), (origin, host))

    def test_its_own_origin_may_read_the_pages_routes_only(self):
        config, address = proxy.Config(port=8787), ("127.0.0.1", 8787)
        own = {"host": "127.0.0.1:8787", "origin": "http://127.0.0.1:8787"}
        for path in ("/", "/ui.js", "/favicon.ico", "/status"):
            self.assertFalse(proxy.check_access("GET", path, own, config, address))
        for method, path in [("POST", "/v1/responses"), ("GET", "/v1/models"),
                             ("POST", "/status"), ("GET", "/shutdown")]:
            with self.assertRaises(proxy.ProxyError) as refused:
                proxy.check_access(method, path, own, config, address)
            self.assertEqual(refused.exception.code, "origin_not_allowed")

    def test_the_page_is_one_document_with_its_own_script_and_nothing_from_elsewhere(self):
        html = proxy.PAGE_HTML.decode()
        scripts = re.findall(r"<script\b[^>]*>", html)
        self.assertEqual(scripts, ['<script type="module" src="/ui.js">'])
        self.assertIsNone(re.search(r"<script[^>]*>\s*[^<\s]", html), "no inline script")
        self.assertIsNone(re.search(r"\bon[a-z]+=", html), "no inline handlers")
        self.assertIsNone(re.search(r"(?:src|href)=\"(?:https?:)?//", html))
        self.assertNotIn("innerHTML", proxy.PAGE_SCRIPT.decode())
        style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
        csp = dict(proxy.PAGE_HEADERS)["Content-Security-Policy"]
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        self.assertIn("style-src 'sha256-%s'" % digest, csp)


class StatusPageTests(WebSocketCase):
    """The page's routes over sockets: its headers, who may have it, what /status lists."""

    def page_headers_ok(self, headers):
        csp = headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        self.assertEqual(directives["script-src"], "'self'")
        self.assertEqual(directives["frame-ancestors"], "'none'")
        self.assertEqual(directives["default-src"], "'none'")
        self.assertNotIn("unsafe", csp)
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")

    def raw_get(self, path, host=None, headers=()):
        """(status, headers, body) of a GET with these very headers, Host and all."""
        return raw_http(self.port, "GET", path, headers,
                        host=DEFAULT_HOST if host is None else host)

    def test_the_page_and_its_script_with_their_safety_headers(self):
        status, headers, body = self.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(body, proxy.PAGE_HTML)
        self.page_headers_ok(headers)
        status, headers, body = self.request("GET", "/ui.js")
        self.assertEqual((status, headers["content-type"]), (200, "text/javascript; charset=utf-8"))
        self.assertEqual(body, proxy.PAGE_SCRIPT)
        self.page_headers_ok(headers)
        status, headers, _ = self.request("GET", "/favicon.ico")
        self.assertEqual((status, headers["content-type"]), (200, "image/svg+xml"))
        self.assertEqual(self.request("HEAD", "/")[:1], (200,))
        self.assert_openai_error(*self.post({}, path="/")[::2], expected_status=405,
                                 code="method_not_allowed")

    def test_only_for_our_host_names(self):
        status, _, body = self.raw_get("/", host="evil.example:%d" % self.port)
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "host_not_allowed")
        self.assertEqual(self.raw_get("/", host="localhost:%d" % self.port)[0], 200)

    def test_its_own_origin_passes_and_no_other_page_reads_status(self):
        own = "http://127.0.0.1:%d" % self.port
        for path in ("/ui.js", "/status"):
            status, headers, _ = self.raw_get(path, headers=[
                ("Origin", own), ("Sec-Fetch-Site", "same-origin")])
            self.assertEqual(status, 200, path)
            self.assertNotIn("access-control-allow-origin", headers)
        refused = [[("Origin", "http://127.0.0.1:%d" % (self.port + 1))],
                   [("Origin", "http://localhost:%d" % self.port)],  # another name: another origin
                   [("Origin", "https://evil.example")], [("Origin", "null")],
                   [("Sec-Fetch-Site", "cross-site")]]
        for headers in refused:
            status, answer, body = self.raw_get("/status", headers=headers)
            self.assertEqual(status, 403, headers)
            self.assertEqual(json.loads(body)["error"]["code"], "origin_not_allowed")
            self.assertNotIn("access-control-allow-origin", answer)
        # Its own origin only reads the page's routes: nothing else, nothing that acts.
        status, _, _ = self.raw_get("/v1/models", headers=[("Origin", own)])
        self.assertEqual(status, 403)
        status, _, _ = raw_http(self.port, "POST", "/v1/responses", [
            ("Origin", own), ("Content-Type", "application/json")], json_body(simple_request()))
        self.assertEqual(status, 403)
        self.assertEqual(self.backend.requests, [])
        # The Origin of a page elsewhere is refused even when its Host names us (a rebinding).
        status, _, _ = self.raw_get("/status", host="localhost:%d" % self.port,
                                    headers=[("Origin", own)])
        self.assertEqual(status, 403)

    @with_proxy_options(client_key=CLIENT_KEY)
    def test_with_a_client_key_the_page_loads_and_status_needs_the_key(self):
        for path in ("/", "/ui.js", "/favicon.ico"):
            self.assertEqual(self.request("GET", path)[0], 200, path)
        status, _, body = self.request("GET", "/status")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_client_key"))
        status, _, body = self.request("GET", "/status", headers={
            "Authorization": "Bearer " + CLIENT_KEY})
        self.assertEqual(status, 200)
        self.assertNotIn(CLIENT_KEY, body.decode())

    @with_proxy_options(ui=False)
    def test_no_ui_turns_the_page_off_and_keeps_status(self):
        for path in ("/", "/ui.js", "/favicon.ico"):
            status, _, body = self.request("GET", path)
            self.assertEqual((status, json.loads(body)["error"]["code"]), (404, "not_found"))
        self.assertEqual(self.request("GET", "/status")[0], 200)
        self.assertIs(proxy.parse_config(["--no-ui"]).ui, False)
        self.assertIs(proxy.parse_config([]).ui, True)

    def test_status_lists_requests_and_tokens_but_not_the_pages_own(self):
        status = self.stream(simple_request(), headers={"User-Agent": CODEX_UA})[0]
        self.assertEqual(status, 200)
        self.wait_for_log("POST /v1/responses")
        client = self.open_ws(headers={"User-Agent": "OpenAI/Python 2.8.1"})
        client.create()
        self.assertEqual(client.response_events()[-1]["type"], "response.completed")
        self.wait_for_log("WS /v1/responses")
        for path in ("/", "/ui.js", "/favicon.ico", "/status", "/status"):
            self.request("GET", path, headers={"User-Agent": "Mozilla/5.0"})
        self.wait_for_log("GET /favicon.ico")
        doc = json.loads(self.request("GET", "/status")[2])
        listed = doc["recent_requests"]
        self.assertEqual([(r["route"], r["client"]) for r in listed],
                         [("WS /v1/responses", "openai-python"),
                          ("POST /v1/responses", "Codex CLI")])
        for record in listed:
            self.assertEqual((record["status"], record["model"], record["input_tokens"],
                              record["cached_tokens"], record["output_tokens"]),
                             (200, "gpt-5.1-codex", 21, 7, 5))
        self.assertEqual(doc["tokens_by_model"], {"gpt-5.1-codex": {
            "requests": 2, "input_tokens": 42, "cached_tokens": 14, "output_tokens": 10}})
        # Nor are they traffic: the page's polling does not count, and is never in flight.
        self.assertEqual(doc["requests"]["in_flight"], 1)  # the open WebSocket's upgrade
        self.assertEqual((doc["requests"]["total"], doc["requests"]["by_status"]),
                         (1, {"200": 1}))
        text = json.dumps(doc)
        for secret in tokens_of(self.home) + [self.token, "say hi"]:
            self.assertNotIn(secret, text)

    def test_login_tells_the_command_when_it_is_dead(self):
        doc = json.loads(self.request("GET", "/status")[2])
        self.assertEqual(doc["login"]["login_command"], proxy.LOGIN_COMMAND)
        self.assertEqual(doc["recent_requests"], [])

    @with_proxy_options(api_key_header=API_KEY_HEADER)
    def test_api_key_mode_says_so_and_lists_nothing(self):
        doc = json.loads(self.request("GET", "/status")[2])
        self.assertEqual((doc["mode"], doc["recent_requests"], doc["tokens_by_model"]),
                         ("apikey", [], {}))


CHROMIUM = "/usr/bin/chromium"


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server"]


def run_chromium(profile, args, timeout=120):
    """Chromium once, headless, its own profile: (its stdout, as text)."""
    done = subprocess.run([CHROMIUM] + CHROMIUM_FLAGS + ["--user-data-dir=" + profile] + args,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, timeout=timeout)
    return done.stdout.decode("utf-8", "replace")


class DevToolsPipe:
    """Headless Chromium driven through the DevTools protocol on --remote-debugging-pipe
    (JSON messages ending in NUL: commands on its fd 3, answers on its fd 4): for what
    --dump-dom cannot do, typing into the page and watching it change."""

    def __init__(self, profile, args=()):
        to_chrome, self._send = os.pipe()
        self._recv, from_chrome = os.pipe()
        # A Python in between puts the pipe ends on fds 3 and 4, where Chromium looks for
        # them, from fds above those, so that neither move undoes the other.
        to_chrome, from_chrome = (self._above_4(fd) for fd in (to_chrome, from_chrome))
        command = [CHROMIUM] + CHROMIUM_FLAGS + ["--user-data-dir=" + profile,
                                                 "--remote-debugging-pipe"] + list(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.dup2(%d, 3); os.dup2(%d, 4); "
             "os.execv(sys.argv[1], sys.argv[1:])" % (to_chrome, from_chrome)] + command,
            pass_fds=(to_chrome, from_chrome), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf = b""
        self._ids = itertools.count(1)
        self.session = None

    @staticmethod
    def _above_4(fd):
        import fcntl  # POSIX only, as the pipe is
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def call(self, method, params=None, session=True, timeout=60):
        number = next(self._ids)
        message = {"id": number, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._recv], [], [], left)[0]:
                    raise AssertionError("Chromium did not answer %s" % method)
                chunk = os.read(self._recv, 1 << 16)
                if not chunk:
                    raise AssertionError("Chromium ended during %s" % method)
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == number:
                if "error" in answer:
                    raise AssertionError("%s: %s" % (method, answer["error"]))
                return answer.get("result", {})

    def open(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.call("Target.attachToTarget", {
            "targetId": target["targetId"], "flatten": True}, session=False)["sessionId"]
        self.call("Page.navigate", {"url": url})

    def eval(self, expression):
        answer = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True})
        if "exceptionDetails" in answer:
            raise AssertionError("%s: %s" % (expression, answer["exceptionDetails"]))
        return answer["result"].get("value")

    def wait_for(self, expression, timeout=60):
        """Until expression is true in the page (false while the page is not there yet)."""
        deadline = time.monotonic() + timeout
        while not self.eval("(() => { try { return !!(%s); } catch (e) { return false; } })()"
                            % expression):
            if time.monotonic() > deadline:
                raise AssertionError("the page never got to: %s; it shows:\n%s" % (
                    expression, self.eval("document.body.innerText")))
            time.sleep(0.1)

    def close(self):
        try:
            self.call("Browser.close", session=False, timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._send)
        os.close(self._recv)


@unittest.skipUnless(os.path.exists(CHROMIUM), "no Chromium here (Debian: apt-get install "
                                               "chromium); .ci/run installs it")
class StatusPageBrowserTests(ProxyTestCase):
    """The page in a real browser (Debian's headless Chromium), in front of the fake backend
    after a few requests with quota headers and usage. CODEX_PROXY_SCREENSHOT=FILE also saves
    what it shows as a PNG (the README's docs/status-page.png)."""

    def setUp(self):
        super().setUp()
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.addCleanup(shutil.rmtree, self.profile, True)

    def serve_some_requests(self, headers=None):
        auth = dict(headers or {})
        self.backend.replies.append(Reply(headers=QUOTA_HEADERS))
        self.assertEqual(self.stream(simple_request(), headers=dict(
            auth, **{"User-Agent": CODEX_UA}))[0], 200)
        self.backend.replies.append(Reply(headers=QUOTA_HEADERS))
        self.assertEqual(self.post(simple_request(model="gpt-5.2"), headers=dict(
            auth, **{"User-Agent": "OpenAI/Python 2.8.1"}))[0], 200)
        limit = {"error": {"type": "usage_limit_reached", "message": "The usage limit has "
                           "been reached", "resets_in_seconds": 7380}}
        self.backend.replies.append(Reply(status=429, body=json.dumps(limit).encode(),
                                          headers=QUOTA_HEADERS))
        self.assertEqual(self.post(simple_request(), headers=dict(
            auth, **{"User-Agent": "curl/8.5.0"}))[0], 429)
        self.wait_for_log("status=429")
        return ["Codex CLI", "openai-python", "curl"]

    def secrets(self):
        return tokens_of(self.home) + [self.token, "rt-initial-0123456789", CLIENT_KEY]

    def check_page(self, html, text):
        """The rendered page against what the proxy saw; html: the DOM, text: what shows."""
        widths = [float(w) for w in re.findall(
            r'<div class="fill[^"]*" style="width: ([0-9.]+)%;?"', html)]
        self.assertEqual(widths, [12.5, 40.0], html)  # 5 h window first, then 7 days
        self.assertIn("5 h", text)
        self.assertIn("7 days", text)
        self.assertIsNotNone(re.search(r"resets in 2 h 0[0-3] min", text), text)
        self.assertIsNotNone(re.search(r"resets in 3 d 1[12] h", text), text)
        self.assertIn("Credits: 120", text)
        self.assertIn("acct-file", text)
        rows = re.findall(r"<tr><td>([0-9:]{8})</td><td>([^<]*)</td><td>([^<]*)</td>"
                          r"<td[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td>", html)
        self.assertEqual([row[1:] for row in rows], [
            ("curl", "POST /v1/responses", "gpt-5.1-codex", "429 usage_limit_reached"),
            ("openai-python", "POST /v1/responses", "gpt-5.2", "200"),
            ("Codex CLI", "POST /v1/responses", "gpt-5.1-codex", "200")], html)
        self.assertIn("gpt-5.2", re.search(r'<tbody id="modelrows">.*?</tbody>', html,
                                           re.S).group(0))
        self.assertNotIn("/status", re.search(r'<tbody id="recentrows">.*?</tbody>', html,
                                              re.S).group(0))
        for secret in self.secrets():
            self.assertNotIn(secret, html)
        self.assertIsNone(re.search(r"eyJ[A-Za-z0-9_-]{10,}", html))

    def test_the_page_shows_quota_requests_and_no_secret(self):
        self.serve_some_requests()
        url = "http://127.0.0.1:%d/" % self.port
        html = run_chromium(self.profile, ["--virtual-time-budget=8000", "--dump-dom", url])
        text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)[^>]*>.*?</\1>", "", html,
                                              flags=re.S))
        self.check_page(html, text)
        self.assertIn("updated", text)
        self.assertIn("Tokens per model", text)
        screenshot = os.environ.get("CODEX_PROXY_SCREENSHOT")
        if screenshot:
            run_chromium(self.profile, ["--virtual-time-budget=8000", "--hide-scrollbars",
                                        "--window-size=1100,680",
                                        "--screenshot=" + os.path.abspath(screenshot), url])
            with open(screenshot, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_a_desktop_window_shows_every_column_of_a_claude_code_error_row(self):
        # The widest row users see: a mapped Claude name beside an error code.
        self.stop_proxy(self.proxy)
        self.start_proxy(model_map=[("claude-*", "gpt-5.4-mini")])
        limit = {"error": {"type": "usage_limit_reached", "message": "The usage limit has "
                           "been reached", "resets_in_seconds": 7380}}
        self.backend.replies.append(Reply(status=429, body=json.dumps(limit).encode(),
                                          headers=QUOTA_HEADERS))
        status, _, body = self.post(messages_body(model="claude-haiku-4-5"), path=MESSAGES,
                                    headers={"User-Agent": "Anthropic/Python 0.75.0"})
        self.assertEqual(status, 429, body)
        self.wait_for_log("status=429")
        browser = DevToolsPipe(self.profile)
        self.addCleanup(browser.close)
        browser.open("about:blank")
        browser.call("Emulation.setDeviceMetricsOverride", {
            "width": 1100, "height": 700, "deviceScaleFactor": 1, "mobile": False})
        browser.call("Page.navigate", {"url": "http://127.0.0.1:%d/" % self.port})
        browser.wait_for("document.querySelectorAll('#recentrows tr').length === 1")
        self.assertIn("claude-haiku-4-5->gpt-5.4-mini",
                      browser.eval("document.getElementById('recentrows').innerText"))
        box = "document.querySelector('#recent .scroll')"
        self.assertLessEqual(browser.eval(box + ".scrollWidth"),
                             browser.eval(box + ".clientWidth"), "the table scrolls")

    @with_proxy_options(client_key=CLIENT_KEY)
    def test_with_a_client_key_it_asks_once_and_shows_the_same(self):
        self.serve_some_requests({"Authorization": "Bearer " + CLIENT_KEY})
        browser = DevToolsPipe(self.profile)
        self.addCleanup(browser.close)
        browser.open("about:blank")
        browser.call("Emulation.setDeviceMetricsOverride", {  # a phone
            "width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True})
        browser.call("Page.navigate", {"url": "http://127.0.0.1:%d/" % self.port})
        browser.wait_for("!document.getElementById('keybox').hidden")
        self.assertTrue(browser.eval("document.getElementById('main').hidden"))
        self.assertNotIn("acct-file", browser.eval("document.body.innerText"))
        # Typed into the form, as a person would, and sent with its button: a wrong key is
        # refused and asked for again, then the right one.
        for key in ("not-the-key", CLIENT_KEY):
            browser.eval("document.getElementById('key').focus()")
            browser.call("Input.insertText", {"text": key})
            browser.eval("document.getElementById('keysend').click()")
            if key != CLIENT_KEY:
                browser.wait_for("document.getElementById('keyerror').textContent"
                                 ".includes('refused that key')")
                self.assertEqual(browser.eval("sessionStorage.length"), 0)
        browser.wait_for("document.querySelectorAll('#recentrows tr').length === 3")
        html = browser.eval("document.documentElement.outerHTML")
        self.check_page(html, browser.eval("document.body.innerText"))
        self.assertEqual(browser.eval("document.cookie"), "")
        self.assertEqual(browser.eval("location.href"), "http://127.0.0.1:%d/" % self.port)
        self.assertEqual(browser.eval("Object.values(sessionStorage)"), [CLIENT_KEY])
        self.assertEqual(browser.eval("document.getElementById('key').value"), "")
        # Asked once: a reload in the same tab reads on without asking.
        browser.eval("window.beforeReload = true")
        browser.call("Page.reload")
        browser.wait_for("!window.beforeReload && "
                         "document.querySelectorAll('#recentrows tr').length === 3")
        self.assertTrue(browser.eval("document.getElementById('keybox').hidden"))
        # On a phone's screen: nothing wider than it but the tables, which scroll.
        self.assertEqual(browser.eval("innerWidth"), 390)
        self.assertLessEqual(browser.eval("document.documentElement.scrollWidth"), 390)
        # Dark mode follows the system's setting.
        browser.call("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "dark"}]})
        self.assertEqual(browser.eval("getComputedStyle(document.body).backgroundColor"),
                         "rgb(18, 19, 22)")
        # The proxy stopped (as on SIGTERM: kept-alive connections close too): the page
        # stays, and says so.
        self.proxy.app.begin_shutdown("the test")
        self.stop_proxy(self.proxy)
        # The page polls every few seconds, and takes a few polls to see the proxy gone (each
        # kept-alive connection answers 503 once): virtual time runs its timers at once
        # instead of a real wait of 9 s, and stands still while a request is out.
        browser.call("Emulation.setVirtualTimePolicy", {
            "policy": "pauseIfNetworkFetchesPending", "budget": 600000})
        browser.wait_for("document.getElementById('conn').textContent"
                         ".startsWith('not reachable')")
        self.assertIn("acct-file", browser.eval("document.body.innerText"))



if __name__ == "__main__":
    unittest.main()
