"""Tests for codex_responses_proxy, over real sockets on 127.0.0.1.

The fake backend and the fake OAuth server below behave like the real ones (see PROTOCOL.md):
the backend wants a valid bearer, stream=true, store=false and instructions, rejects the
parameters the real one rejects, and answers server-sent events whose response.completed
carries "output": []. Run: python3 -m unittest -v
"""

import base64
import collections
import gzip
import http.client
import io
import json
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import codex_responses_proxy as proxy

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "codex_responses_proxy.py")


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# The fake backend
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


class Reply:
    """One scripted backend answer. Either an HTTP error (status, body, headers), or a stream
    of frames with optional pauses, a cut (connection dropped) or a hang (silence)."""

    def __init__(self, status=200, body=None, headers=(), frames=None, delay=0.0,
                 cut_after=None, hang_after=None, content_type="text/event-stream",
                 chunk_split=None):
        self.status = status
        self.body = body
        self.headers = list(headers)
        self.frames = frames
        self.delay = delay
        self.cut_after = cut_after
        self.hang_after = hang_after
        self.content_type = content_type
        self.chunk_split = chunk_split  # write each frame in pieces this many bytes long


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        pass  # the proxy closing a connection mid-stream is expected here


class FakeBackend:
    """chatgpt.com/backend-api/codex/responses as PROTOCOL.md describes it."""

    REJECTED = {"max_output_tokens", "temperature", "top_p", "max_completion_tokens",
                "previous_response_id"}

    def __init__(self):
        self.requests = []
        self.replies = collections.deque()
        self.valid_tokens = set()
        self.extra_rejected = set()
        self.connections = 0
        self.closed_early = threading.Event()  # a client closed while we were streaming
        self.lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with backend.lock:
                    backend.connections += 1

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with backend.lock:
                    backend.requests.append({"path": self.path, "headers": self.headers,
                                             "body": body, "raw": raw})
                    reply = backend.replies.popleft() if backend.replies else Reply()
                problem = backend.check(self.headers, body)
                if problem:
                    status, detail = problem
                    return self.answer(status, json.dumps({"detail": detail}).encode())
                if reply.status != 200 or reply.body is not None:
                    return self.answer(reply.status, reply.body or b"", reply.headers)
                self.stream(reply)

            def answer(self, status, body, headers=(), content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-codex-primary-used-percent", "12.5")
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def stream(self, reply):
                frames = reply.frames if reply.frames is not None else stream_frames()
                self.send_response(200)
                if reply.content_type:
                    self.send_header("Content-Type", reply.content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("x-codex-primary-used-percent", "12.5")
                self.send_header("x-codex-secondary-used-percent", "40")
                self.send_header("x-request-id", "req-123")
                for k, v in reply.headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    for i, frame in enumerate(frames):
                        if reply.cut_after is not None and i >= reply.cut_after:
                            self.wfile.write(b"%X\r\n%s\r\n" % (len(frame) // 2,
                                                                 frame[:len(frame) // 2]))
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if reply.hang_after is not None and i >= reply.hang_after:
                            time.sleep(30)
                            self.close_connection = True
                            return
                        step = reply.chunk_split or len(frame)
                        for j in range(0, len(frame), step):
                            piece = frame[j:j + step]
                            self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece))
                        if reply.delay:
                            time.sleep(reply.delay)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    backend.closed_early.set()
                    self.close_connection = True

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/backend-api/codex/responses" % self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

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

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# The fake OAuth server
# --------------------------------------------------------------------------------------------

class FakeOAuth:
    """auth.openai.com/oauth/token: refresh tokens rotate and are single use."""

    def __init__(self, backend):
        self.backend = backend
        self.requests = []
        self.current_refresh = None  # the one refresh token that works; None: any works
        self.failure = None          # (status, body) to answer instead
        self.delay = 0.0
        self.lock = threading.Lock()
        oauth = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = oauth.answer(self.headers, raw)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/oauth/token" % self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
                return 400, {"error": {"code": "refresh_token_reused",
                                       "message": "already used"}}
            new_access = access_token(3600)
            self.backend.valid_tokens.add(new_access)
            self.current_refresh = "rt-rotated-%d-%s" % (len(self.requests), os.urandom(4).hex())
            return 200, {"access_token": new_access, "refresh_token": self.current_refresh,
                         "id_token": id_token()}

    @property
    def count(self):
        return len(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# Harness: a proxy on an ephemeral port against both fakes
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


class ProxyTestCase(unittest.TestCase):
    """Starts FakeBackend, FakeOAuth and the proxy (in this process) for each test."""

    idle_timeout = 5.0
    auth = True  # write a valid auth.json

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="codex-home-")
        self.backend = FakeBackend()
        self.oauth = FakeOAuth(self.backend)
        self.addCleanup(self.backend.close)
        self.addCleanup(self.oauth.close)
        if self.auth:
            self.token = access_token(3600)
            self.backend.valid_tokens.add(self.token)
            write_auth(self.home, auth_document(access=self.token))
        self.start_proxy()

    def start_proxy(self, **overrides):
        options = dict(host="127.0.0.1", port=0, upstream_url=self.backend.url,
                       codex_home=self.home, refresh_url=self.oauth.url,
                       stream_idle_timeout=self.idle_timeout)
        options.update(overrides)
        self.config = proxy.Config(**options)
        self.log = LogCapture()
        self.proxy = proxy.ProxyServer(self.config, proxy.Log(self.log, debug=self.config.debug))
        self.port = self.proxy.server_address[1]
        thread = threading.Thread(target=self.proxy.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.stop_proxy, self.proxy)

    @staticmethod
    def stop_proxy(server):
        server.shutdown()
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
        deadline = time.monotonic() + timeout
        while True:
            lines = [l for l in self.log_text().splitlines() if needle in l]
            if lines:
                return lines[-1]
            if time.monotonic() > deadline:
                self.fail("no log line with %r in:\n%s" % (needle, self.log_text()))
            time.sleep(0.01)


def raw_exchange(port, data, timeout=10):
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


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


def simple_request(text="say hi", **extra):
    body = {"model": "gpt-5.1-codex", "input": text}
    body.update(extra)
    return body


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------

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

    def test_previous_response_id_is_refused_clearly(self):
        with self.assertRaises(proxy.ProxyError) as cm:
            self.rewrite({"input": "x", "previous_response_id": "resp_1"})
        self.assertEqual(cm.exception.status, 400)
        self.assertIn("no conversation state", cm.exception.message)

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
        raw = b'{ "model" : "m", "input": [ {"role": "user", "content": "h\\u00e9 \xc3\xa9"} ] ,"n": 1}'
        body, text, spans = proxy.parse_json_object(raw)
        self.assertEqual(body, json.loads(raw))
        out, _ = proxy.rewrite_request(body, "D")
        self.assertIs(out["input"], body["input"], "unchanged input keeps its identity")
        encoded = proxy.encode_json_object(out, body, text, spans)
        self.assertEqual(json.loads(encoded), out)
        self.assertIn('[ {"role": "user", "content": "h\\u00e9 \u00e9"} ]'.encode(), encoded)
        ascii_raw = b'{"input": [ 1, 2 ],"model": "m"}'
        body, source, spans = proxy.parse_json_object(ascii_raw)
        self.assertIs(source, ascii_raw, "ASCII bodies are spliced as bytes")
        out, _ = proxy.rewrite_request(body, "D")
        encoded = proxy.encode_json_object(out, body, source, spans)
        self.assertIn(b'"input":[ 1, 2 ]', encoded)
        self.assertEqual(json.loads(encoded), out)
        self.assertEqual(proxy.encode_json_object({}, body, source, spans), b"{}")
        # a changed input is encoded anew
        body, text, spans = proxy.parse_json_object(b'{"input": [{"role": "system", "content": "s"}]}')
        out, _ = proxy.rewrite_request(body, "D")
        self.assertEqual(json.loads(proxy.encode_json_object(out, body, text, spans))["input"],
                         [{"role": "developer", "content": "s"}])

    def test_parse_json_object_errors(self):
        for raw, phrase in ((b"[1]", "JSON object"), (b'"s"', "JSON object"),
                            (b"{", "not valid JSON"), (b'{"a" 1}', "not valid JSON"),
                            (b'{"a": 1} x', "not valid JSON"), (b'{"a": 1,}', "not valid JSON"),
                            (b"\xff{}", "UTF-8"), (b"[" * 100000, "not valid JSON"),
                            (b'{"a": ' + b"[" * 100000 + b"}", "not valid JSON")):
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

    def test_comment_only_frame_is_relayed_and_unfinished_event_dropped(self):
        events = self.feed_all([b": keepalive\n\n", b"data: partial"])
        self.assertEqual(len(events), 1)
        self.assertIsNone(events[0].data)
        self.assertEqual(events[0].raw, b": keepalive\n\n")

    def test_field_without_space_and_unknown_fields(self):
        events = self.feed_all([b"data:x\nfoo: bar\nevent:e\n\n"])
        self.assertEqual((events[0].event, events[0].data), ("e", "x"))


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

    def test_rfc3339(self):
        self.assertEqual(proxy.parse_rfc3339("2026-01-02T03:04:05.123456789Z").microsecond, 123456)
        self.assertIsNotNone(proxy.parse_rfc3339("2026-01-02T03:04:05+02:00"))
        self.assertIsNone(proxy.parse_rfc3339("yesterday"))


# --------------------------------------------------------------------------------------------
# Over sockets: the main paths
# --------------------------------------------------------------------------------------------

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
        self.backend.extra_rejected.update({"seed", "metadata"})
        status, _, body = self.post(simple_request(seed=1, metadata={"a": "b"}))
        # each distinct parameter is dropped once; both get dropped, then it succeeds
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.backend.requests), 3)

    def test_upstream_unreachable_is_502(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.stop_proxy(self.proxy)
        self.start_proxy(upstream_url="http://127.0.0.1:%d/x" % port)
        status, _, body = self.post(simple_request())
        self.assert_openai_error(status, body, 502, code="upstream_unreachable")

    def test_upstream_slow_headers_is_504(self):
        self.backend.replies.append(Reply(hang_after=0))
        self.stop_proxy(self.proxy)
        self.start_proxy(stream_idle_timeout=0.5)
        status, _, body = self.post(simple_request())
        self.assertIn(status, (504,), body)


class RoutesTests(ProxyTestCase):
    def test_healthz_and_alias_path(self):
        status, _, data = self.request("GET", "/healthz")
        self.assertEqual((status, data), (200, b"ok\n"))
        status, _, body = self.post(simple_request(), path="/responses")
        self.assertEqual(status, 200, body)

    def test_unknown_path_wrong_method_websocket(self):
        status, _, data = self.request("GET", "/nope")
        self.assert_openai_error(status, json.loads(data), 404)
        status, headers, data = self.request("GET", "/v1/responses")
        self.assert_openai_error(status, json.loads(data), 405)
        self.assertEqual(headers["allow"], "POST")
        status, _, data = self.request("DELETE", "/healthz")
        self.assert_openai_error(status, json.loads(data), 405)
        status, _, data = self.request("GET", "/v1/responses", headers={
            "Upgrade": "websocket", "Connection": "Upgrade"})
        self.assert_openai_error(status, json.loads(data), 426)

    def test_bad_bodies_are_400_and_server_keeps_serving(self):
        for raw in (b"{not json", b"[1, 2]", b'"str"', b"\xff\xfe", b"[" * 100000):
            status, _, data = self.request("POST", "/v1/responses", raw,
                                           {"Content-Type": "application/json"})
            self.assert_openai_error(status, json.loads(data), 400)
        status, _, data = self.request("GET", "/healthz")
        self.assertEqual(status, 200)

    def test_malformed_request_line_gets_json(self):
        data = raw_exchange(self.port, b"GARBAGE\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 400"), data)
        self.assertIn(b'"error"', data)

    def test_log_line_per_request(self):
        self.post(simple_request())
        line = self.wait_for_log("POST /v1/responses")
        self.assertIn("model=gpt-5.1-codex", line)
        self.assertIn("status=200", line)
        self.assertIn("tokens in=21 out=5", line)
        self.assertNotIn("\033[", line)


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
    def expire(self, **kw):
        doc = auth_document(access=access_token(-10), **kw)
        doc["future_key"] = {"kept": True}
        write_auth(self.home, doc)
        self.oauth.current_refresh = doc["tokens"]["refresh_token"]
        return doc

    def test_expired_token_is_refreshed_and_written_back_atomically(self):
        before = self.expire()
        status, _, body = self.post(simple_request())
        self.assertEqual(status, 200, body)
        self.assertEqual(self.oauth.count, 1)
        sent = self.oauth.requests[0]["body"]
        self.assertEqual(sent, {"client_id": proxy.OAUTH_CLIENT_ID,
                                "grant_type": "refresh_token",
                                "refresh_token": before["tokens"]["refresh_token"]})
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
        self.assert_openai_error(status, body, 401, contains="codex login")
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


if __name__ == "__main__":
    unittest.main()
