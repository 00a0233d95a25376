#!/usr/bin/env python3
"""codex-responses-proxy: OpenAI's and Anthropic's APIs on a ChatGPT/Codex subscription.

    client -> http://127.0.0.1:8787/v1/responses -> https://chatgpt.com/backend-api/codex/responses

Coding agents and the SDKs use a ChatGPT plan through it: the Responses API (one JSON answer, the
event stream, or WebSocket messages; previous_response_id, stored responses, compaction), Chat
Completions, Anthropic's Messages API (Claude Code), image generation and edits, and /v1/models, a
reasoning effort in a model name. It logs in as the Codex CLI does (`login`), or uses the Codex CLI's
auth.json, refreshes the token beside it, rewrites each request into what the backend accepts and
reaches it over its WebSocket or HTTP; /status and a status page show what it does. Given an API
key, it forwards to the OpenAI platform instead.

Run it:    python3 codex_responses_proxy.py login; python3 codex_responses_proxy.py
Help:      python3 codex_responses_proxy.py --help      One file, standard library, Python 3.8+.

Sections, after configuration, logging and errors, in the order a request travels:
  server      sockets accepted (ProxyServer)
  handler     a request parsed and answered (ProxyHandler, the Exchange routes answer through);
              client hang-ups (HangupWatcher); client WebSockets (WebSocketSession)
  access      which requests are served (check_access), which route answers (RouteTable)
  body        request bodies, bounded (read_request_body)
  app         the services (App), the routes of each mode (ChatGPTRoutes, PlatformRoutes:
              the mode chooses once, APP_MODES), the turns (Turns), the model names
              (ModelNames), what the operator sees (OperatorView); the status page
  front ends  Responses, Chat Completions, Anthropic Messages, images mapped onto the backend
  upstream    events from either transport (HTTPEvents, WebSocketEvents), RetryPolicy,
              UpstreamClient, the backend's WebSocket, credentials, dumps
  relay       events through a front end's transform into a sink (relay)
  stores      conversation state (ConversationStore, SocketResponses)
  codecs      SSE, JSON and content codings, chunked bodies, WebSocket frames
Then the commands: login, logout, main.
"""

import argparse
import base64
import codecs
import collections
import contextlib
import datetime
import errno
import fnmatch
import hashlib
import hmac
import http.client
import http.server
import importlib
import io
import ipaddress
import itertools
import json
import os
import platform
import re
import select
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the in-process lock still serializes refreshes
    fcntl = None

try:
    import resource
except ImportError:  # Windows: no file-descriptor limit to raise
    resource = None

try:  # the standard library's zstd, from Python 3.14 on (the Codex CLI may send zstd bodies)
    zstd = importlib.import_module("compression.zstd")
except ImportError:
    zstd = None
_ZSTD_ERRORS = (zstd.ZstdError,) if hasattr(zstd, "ZstdError") else ()  # an Exception of its own

__version__ = "0.1.0"


# --------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------

DEFAULT_ADDR = "127.0.0.1:8787"
DEFAULT_UPSTREAM_URL = "https://chatgpt.com/backend-api/codex/responses"
API_UPSTREAM_URL = "https://api.openai.com/v1/responses"  # API-key mode
DEFAULT_CLIENT_VERSION = "0.171.0"  # the backend gates models on the `version` header
DEFAULT_ORIGINATOR = "codex_cli_rs"
DEFAULT_INSTRUCTIONS = ("You are a helpful assistant. Follow the user's and developer's "
                        "instructions.")
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0  # the Codex CLI's own default
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

REFRESH_URL = "https://auth.openai.com/oauth/token"
REFRESH_URL_ENV = "CODEX_REFRESH_TOKEN_URL_OVERRIDE"  # honoured by the Codex CLI too
OAUTH_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"

CONNECT_TIMEOUT = 30.0
REFRESH_TIMEOUT = 30.0
SHUTDOWN_GRACE = 25.0  # in-flight turns get this long at a stop (the unit waits 70 s in all)
MODELS_CACHE_SECONDS = 300  # as the Codex CLI caches its model list
API_KEY_LIMIT = 1024
DEFAULT_MAX_CONCURRENT = 64
DEFAULT_MAX_CONNECTIONS = 256  # a thread each, idle keep-alive ones too
DEFAULT_STATE_MB = 64          # previous_response_id store in memory ...
DEFAULT_STATE_DB_MB = 1024     # ... and with --state-db
CLIENT_KEY_ENV = "CODEX_PROXY_CLIENT_KEY"
# An idle keep-alive connection is closed after this long. HTTP client libraries keep idle
# connections for up to 90 s; closing before they do makes their next request fail.
IDLE_CONNECTION_TIMEOUT = 125.0
REQUEST_READ_DEADLINE = 50.0    # a request must arrive whole this soon after its first byte
WRITE_TIMEOUT = 120.0           # a client that stops reading its stream is dropped

HELP_EPILOG = """\
log in (on this host; copying auth.json from another machine shares one refresh token, and the
first of the two to refresh logs the other out):
  python3 codex_responses_proxy.py login              a device code: open the address shown on
                                                       any device and enter the code
  python3 codex_responses_proxy.py login --browser    sign in in a browser (or paste the address
                                                       it ended on)
  python3 codex_responses_proxy.py login --status     who is logged in; `logout` revokes, removes

examples:
  python3 codex_responses_proxy.py
      serve on http://127.0.0.1:8787 with the login in ~/.codex/auth.json
  python3 codex_responses_proxy.py --port 0 --debug
      any free port (printed at start), log rewritten bodies and stream events
  python3 codex_responses_proxy.py --codex-home /srv/codex --instructions "Answer tersely."
  printenv OPENAI_API_KEY | python3 codex_responses_proxy.py --api-key-stdin --port 0 \\
      --server-info /run/user/1000/proxy.json --http-shutdown
      API-key mode (like `codex responses-api-proxy`): forward to api.openai.com as is

  curl -s http://127.0.0.1:8787/v1/responses -H 'Content-Type: application/json' \\
       -d '{"model": "gpt-5.1-codex", "input": "say hi"}'
  http://127.0.0.1:8787/ in a browser: quota, login, traffic and recent requests (--no-ui: off)

  Python:  OpenAI(base_url="http://127.0.0.1:8787/v1", api_key="unused").responses.create(...)
           ... .responses.connect() (WebSocket), .responses.compact(...), .retrieve(id) too
           ... .images.generate(prompt=...), .images.edit(image=..., prompt=...): base64 only
  Effort in a model name: model "gpt-5.5-high" or "gpt-5.5(high)" is gpt-5.5 with
           reasoning.effort "high" (an effort the backend's model list offers for it)
  Codex CLI: a provider with base_url = "http://127.0.0.1:8787/v1", wire_api = "responses"
           (and supports_websockets = true for one socket per session; its image tool
           wants http_headers = { "x-openai-actor-authorization" = "local-proxy" })
  Claude Code: ANTHROPIC_BASE_URL=http://127.0.0.1:8787 ANTHROPIC_AUTH_TOKEN=unused claude
           (Claude's model names go to the backend's models; see --model-map)

environment:
  CODEX_HOME                          where auth.json lives (default ~/.codex)
  CODEX_REFRESH_TOKEN_URL_OVERRIDE    token refresh URL (as in the Codex CLI)
  CODEX_REVOKE_TOKEN_URL_OVERRIDE     token revocation URL for logout (as in the Codex CLI)
  CODEX_PROXY_CLIENT_KEY              the client key (instead of --client-key-file)

security: only this machine can connect by default (127.0.0.1). To serve a LAN, set a client key
and allow the name clients use:
  python3 codex_responses_proxy.py --addr 0.0.0.0:8787 --client-key-file ~/.config/proxy-key \\
      --allow-host myhost.lan

The earlier Go tool's spellings -addr, -instructions and -debug are accepted too.
"""


class Config:
    """Everything the server needs, resolved once from the command line and the environment."""

    def __init__(self, host="127.0.0.1", port=8787, instructions=DEFAULT_INSTRUCTIONS,
                 debug=False, upstream_url=None, codex_home=None,
                 client_version=DEFAULT_CLIENT_VERSION, originator=DEFAULT_ORIGINATOR,
                 stream_idle_timeout=DEFAULT_STREAM_IDLE_TIMEOUT, refresh_url=None,
                 max_body_bytes=DEFAULT_MAX_BODY_BYTES, api_key_header=None,
                 api_key_source=None, server_info=None, http_shutdown=False, dump_dir=None,
                 client_key=None, allow_hosts=(), allow_origins=(),
                 max_concurrent=DEFAULT_MAX_CONCURRENT, state_db=None, state_max_mb=None,
                 max_connections=DEFAULT_MAX_CONNECTIONS, upstream_transport="auto",
                 list_effort_models=False, ui=True, model_map=()):
        self.host = host
        self.port = port
        self.instructions = instructions
        self.debug = debug
        # API-key mode when a key is given: b"Bearer <key>", built once (see read_api_key).
        self.api_key_header = api_key_header
        self.api_key_source = api_key_source
        self.mode = "apikey" if api_key_header else "chatgpt"
        self.upstream_url = upstream_url or (API_UPSTREAM_URL if api_key_header
                                             else DEFAULT_UPSTREAM_URL)
        self.codex_home = codex_home or default_codex_home()
        self.client_version = client_version
        self.originator = originator
        self.stream_idle_timeout = stream_idle_timeout
        self.refresh_url = refresh_url or os.environ.get(REFRESH_URL_ENV) or REFRESH_URL
        self.max_body_bytes = max_body_bytes
        self.server_info = server_info
        self.http_shutdown = http_shutdown
        self.dump_dir = dump_dir
        self.client_key = client_key.encode() if isinstance(client_key, str) else client_key
        self.allow_hosts = [h.lower() for h in allow_hosts]
        self.allow_origins = list(allow_origins)
        self.max_concurrent = max_concurrent
        self.max_connections = max_connections
        self.state_db = state_db
        self.upstream_transport = upstream_transport
        self.list_effort_models = list_effort_models
        self.ui = ui  # the status page at GET /
        self.model_map = list(model_map)  # [(shell-style pattern, model)], first match wins
        self.state_max_bytes = int((state_max_mb or (DEFAULT_STATE_DB_MB if state_db
                                                     else DEFAULT_STATE_MB)) * 1024 * 1024)

    @property
    def auth_path(self):
        return os.path.join(self.codex_home, "auth.json")


def codex_user_agent(config, version=None):
    """The User-Agent the Codex CLI sends, with ours at the end."""
    return "%s/%s (%s %s; %s) codex-responses-proxy/%s" % (
        config.originator, version or config.client_version, platform.system() or "unknown",
        platform.release() or "unknown", platform.machine() or "unknown", __version__)


def default_codex_home():
    return os.environ.get("CODEX_HOME") or os.path.join(os.path.expanduser("~"), ".codex")


def split_host_port(addr):
    """'127.0.0.1:8787', ':8787', '[::1]:8787' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT, got %r" % addr)
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def codex_version_arg(text):
    if parse_codex_version(text) is None:
        raise argparse.ArgumentTypeError("expected a Codex CLI version such as %s, got %r"
                                         % (DEFAULT_CLIENT_VERSION, text))
    return text.strip()


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="codex_responses_proxy.py",
        description="Serve OpenAI's Responses and Chat Completions APIs and Anthropic's Messages "
                    "API locally\non a ChatGPT/Codex subscription, with the login in "
                    "$CODEX_HOME/auth.json (the Codex CLI's).\nLog in first, on this host: "
                    "`%(prog)s login` (or `codex login`).",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", "-addr", default=DEFAULT_ADDR, metavar="HOST:PORT",
                   help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, metavar="N",
                   help="port to listen on, overriding the one in --addr; 0 picks a free port")
    p.add_argument("--instructions", "-instructions", default=DEFAULT_INSTRUCTIONS, metavar="TEXT",
                   help="instructions sent when a request has none (the backend requires some)")
    p.add_argument("--debug", "-debug", action="store_true",
                   help="log rewritten request bodies and stream events (secrets redacted)")
    p.add_argument("--upstream-url", metavar="URL",
                   help="where to forward (default %s; in API-key mode %s)"
                        % (DEFAULT_UPSTREAM_URL, API_UPSTREAM_URL))
    p.add_argument("--codex-home", metavar="DIR",
                   help="directory holding auth.json (default $CODEX_HOME, else ~/.codex)")
    p.add_argument("--client-version", type=codex_version_arg, default=DEFAULT_CLIENT_VERSION,
                   metavar="V",
                   help="Codex CLI version to present; the backend gates models on it "
                        "(default %(default)s). A request from a newer Codex CLI (its "
                        "`version` header or User-Agent) goes with that newer version, and "
                        "/v1/models lists the models of the newest one seen")
    p.add_argument("--issuer", type=issuer_arg, metavar="URL",
                   help="the OAuth issuer: refresh the token at URL/oauth/token (default %s; "
                        "for tests, like `login --issuer`)" % DEFAULT_ISSUER)
    p.add_argument("--originator", default=DEFAULT_ORIGINATOR, metavar="NAME",
                   help="originator header to present (default %(default)s)")
    p.add_argument("--stream-idle-timeout", type=positive_float,
                   default=DEFAULT_STREAM_IDLE_TIMEOUT, metavar="SECONDS",
                   help="give up on an upstream stream silent this long (default %(default)g)")
    p.add_argument("--api-key-stdin", action="store_true",
                   help="API-key mode: read an OpenAI API key from standard input at start and "
                        "forward requests unchanged with it (an auth.json holding only an API "
                        "key selects this mode too)")
    p.add_argument("--server-info", metavar="FILE",
                   help='after binding, write {"port": N, "pid": P} to FILE')
    p.add_argument("--http-shutdown", action="store_true",
                   help="let GET /shutdown stop the proxy")
    p.add_argument("--dump-dir", metavar="DIR",
                   help="write each upstream exchange as JSON files to DIR (credentials "
                        "redacted)")
    p.add_argument("--client-key-file", metavar="FILE",
                   help="require clients to send this file's key as 'Authorization: Bearer KEY' "
                        "or 'x-api-key: KEY' (or set %s); needed to listen beyond "
                        "loopback" % CLIENT_KEY_ENV)
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="also answer requests whose Host header is HOST (repeatable; "
                        "localhost and the listening address always are)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the "
                        "proxy, with CORS (repeatable; other origins get 403)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="largest request body or WebSocket message accepted, and the most an "
                        "input may grow to with its item_reference and previous_response_id "
                        "history filled in (default %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                   help="requests in flight at once; more get 503 (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="client connections open at once, idle keep-alive ones included (each "
                        "takes a thread); a connection past them gets 503 and is closed "
                        "(default %(default)s)")
    p.add_argument("--state-db", metavar="PATH",
                   help="keep conversations for previous_response_id in this SQLite file, so "
                        "they survive restarts (default: in memory)")
    p.add_argument("--state-max-mb", type=positive_float, metavar="MB",
                   help="size cap of that store; the least recently used go first (default %d "
                        "in memory, %d with --state-db); also caps what all WebSockets keep "
                        "for previous_response_id (at most %d with --state-db)"
                        % (DEFAULT_STATE_MB, DEFAULT_STATE_DB_MB, DEFAULT_STATE_MB))
    p.add_argument("--upstream-transport", choices=("auto", "ws", "http"), default="auto",
                   help="how requests reach the ChatGPT backend: ws keeps one WebSocket per "
                        "conversation and sends each turn's new items only; auto does so from a "
                        "conversation's third turn (the first go over HTTP while its socket "
                        "opens) and uses HTTP for a while when the backend refuses the "
                        "upgrade; http never opens a socket (default %(default)s)")
    p.add_argument("--list-effort-models", action="store_true",
                   help="also list MODEL-EFFORT in /v1/models for each reasoning effort a "
                        "model offers (such names work either way; by default pickers stay "
                        "short)")
    p.add_argument("--no-ui", action="store_true",
                   help="do not serve the status page at GET / (/status stays)")
    p.add_argument("--model-map", action="append", default=[], type=model_map_arg,
                   metavar="PATTERN=MODEL",
                   help="send requests for models matching the shell-style PATTERN to MODEL "
                        "(repeatable, first match wins), e.g. 'claude-*haiku*=gpt-5.4-mini'. "
                        "Without a match Claude's names still work: opus, sonnet and other "
                        "claude-* names go to the strongest model the backend lists, haiku "
                        "names to its small one")
    p.add_argument("--version", action="version", version="codex-responses-proxy " + __version__)
    return p


def parse_config(argv=None, stdin=None):
    """Config from the command line; with --api-key-stdin the key is read from stdin here."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        host, port = split_host_port(args.addr)
    except ValueError as e:
        parser.error("--addr: %s" % e)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            parser.error("--port must be between 0 and 65535")
        port = args.port
    if args.max_body_bytes < 1 or args.max_concurrent < 1 or args.max_connections < 1:
        parser.error("--max-body-bytes, --max-concurrent and --max-connections must be at "
                     "least 1")
    try:
        client_key = read_client_key(args.client_key_file)
    except ValueError as e:
        parser.error(str(e))
    if not is_loopback(host) and not client_key:
        parser.error("refusing to listen on %s without a client key: anyone who can reach it "
                     "could spend your subscription. Put a long random key in a file and pass "
                     "--client-key-file FILE (or set %s); clients then send "
                     "'Authorization: Bearer KEY'." % (host, CLIENT_KEY_ENV))
    key_header = key_source = None
    codex_home = args.codex_home or default_codex_home()
    if args.api_key_stdin:
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
        try:
            key_header = read_api_key(getattr(stream, "raw", stream))
        except ValueError as e:
            parser.error("--api-key-stdin: %s" % e)
        key_source = "standard input"
    else:
        key_header = api_key_from_auth_file(os.path.join(codex_home, "auth.json"))
        key_source = key_header and os.path.join(codex_home, "auth.json")
    return Config(host=host, port=port, instructions=args.instructions, debug=args.debug,
                  upstream_url=args.upstream_url, codex_home=codex_home,
                  client_version=args.client_version, originator=args.originator,
                  refresh_url=args.issuer and args.issuer + "/oauth/token",
                  stream_idle_timeout=args.stream_idle_timeout, api_key_header=key_header,
                  api_key_source=key_source, server_info=args.server_info,
                  http_shutdown=args.http_shutdown, dump_dir=args.dump_dir,
                  client_key=client_key, allow_hosts=args.allow_host,
                  allow_origins=args.allow_origin, max_body_bytes=args.max_body_bytes,
                  max_concurrent=args.max_concurrent, state_db=args.state_db,
                  state_max_mb=args.state_max_mb, max_connections=args.max_connections,
                  upstream_transport=args.upstream_transport,
                  list_effort_models=args.list_effort_models, ui=not args.no_ui,
                  model_map=args.model_map)


def is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def read_client_key(path):
    """The client key from --client-key-file, else $CODEX_PROXY_CLIENT_KEY; None if neither."""
    if path is None:
        key = os.environ.get(CLIENT_KEY_ENV, "").strip()
        return key.encode() if key else None
    try:
        with open(path, "rb") as f:
            key = f.read(4096).strip()
    except OSError as e:
        raise ValueError("--client-key-file %s: %s" % (path, e.strerror or e))
    if not key or b"\n" in key:
        raise ValueError("--client-key-file %s must hold one non-empty line" % path)
    return key


_API_KEY_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def read_api_key(stream):
    """One line from stream -> b"Bearer <key>". The key is read into a bytearray that is zeroed
    afterwards, and the header is built once; Python cannot promise more
    (docs/how-it-works.md, API-key mode)."""
    if stream is None:
        raise ValueError("there is no standard input to read the key from")
    buf = bytearray(API_KEY_LIMIT + 3)  # room to notice a key that is too long
    view = memoryview(buf)
    try:
        n = 0
        while n < len(buf):
            got = stream.readinto(view[n:])
            if not got:
                break
            n += got
            if buf.find(b"\n", n - got, n) >= 0:
                break  # the line is in: a writer may keep the pipe open after it
        end = n
        if end and buf[end - 1] == 10:
            end -= 1
            if end and buf[end - 1] == 13:
                end -= 1
        if n == len(buf) or end > API_KEY_LIMIT:
            raise ValueError("the key is longer than %d bytes" % API_KEY_LIMIT)
        if end == 0:
            raise ValueError("standard input was empty; pipe the key in, e.g. "
                             "`printenv OPENAI_API_KEY | ...`")
        if any(buf[i] not in _API_KEY_BYTES for i in range(end)):
            # Never echo the input: it may be a key with a stray character.
            raise ValueError("the key must be one line of the characters A-Z a-z 0-9 _ -")
        return b"Bearer " + view[:end]
    finally:
        view.release()
        buf[:] = bytes(len(buf))


def api_key_from_auth_file(path):
    """b"Bearer <key>" when auth.json holds an API-key login (and no ChatGPT tokens)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    tokens = data.get("tokens")
    key = data.get("OPENAI_API_KEY")
    has_tokens = isinstance(tokens, dict) and bool(tokens.get("access_token"))
    if isinstance(key, str) and key and (data.get("auth_mode") == "apikey" or not has_tokens):
        return ("Bearer " + key).encode("latin-1", "replace")
    return None


# --------------------------------------------------------------------------------------------
# Logging, with secrets kept out
# --------------------------------------------------------------------------------------------

class Log:
    """One line per event on stderr. Every line passes through redact(), so a token that slips
    into an exception message or a debug dump is still never written, and through
    escape_controls(), so that a client's text (a model name, a path) can neither start a
    forged log line nor send escape sequences to a terminal."""

    def __init__(self, stream=None, debug=False):
        self.stream = stream or sys.stderr
        self.debug_enabled = debug
        self.colour = hasattr(self.stream, "isatty") and self.stream.isatty()
        # status_code() marks its colour codes with this instead of ESC, which info() escapes: a
        # client cannot forge it without knowing it.
        self._colour_mark = "<%s>" % base64.b32encode(os.urandom(10)).decode()
        self._secrets = ()  # replaced whole, never changed in place: redact() reads it unlocked
        self._lock = threading.Lock()
        self._warned = set()

    def add_secret(self, value):
        if value and len(value) >= 8 and value not in self._secrets:
            with self._lock:
                self._secrets = (self._secrets + (value,))[-32:]  # the current and recent ones

    def redact(self, text):
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        return _BEARER_RE.sub("Bearer [REDACTED]", _JWT_RE.sub("[REDACTED-JWT]", text))

    def info(self, msg):
        text = self.redact(msg)
        if self.colour and self._colour_mark in text:
            text = "\033".join(escape_controls(part) for part in text.split(self._colour_mark))
        else:
            text = escape_controls(text)
        line = "%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), text)
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not take a request down with it

    def debug(self, msg):
        if self.debug_enabled:
            self.info("debug: " + msg)

    def debug_body(self, what, body):
        """With --debug, a body sent upstream: its first 16 KB, secrets redacted as always."""
        if self.debug_enabled:
            self.debug("%s (%d bytes): %s%s" % (what, len(body),
                                               body[:16384].decode("utf-8", "replace"),
                                               "... [truncated]" if len(body) > 16384 else ""))

    def internal_error(self, where, e):
        """A bug, logged where it happened; its traceback too with --debug."""
        self.info("internal error on %s: %s: %s" % (where, e.__class__.__name__, e))
        if self.debug_enabled:
            import traceback  # only ever needed here
            for line in traceback.format_exc().splitlines():
                self.info(line)

    def warn_once(self, key, msg):
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.info("warning: " + msg)

    def status_code(self, code):
        if not self.colour:
            return str(code)
        return "%s[%sm%d%s[0m" % (self._colour_mark, "32" if code < 400 else "33" if code < 500
                                  else "31", code, self._colour_mark)


def escape_controls(text):
    """C0 and C1 control characters and DEL as visible escapes (a newline as \\n)."""
    if _CONTROL_RE.search(text) is None:
        return text  # nearly every line: one scan, no copy
    return _CONTROL_RE.sub(_escape_control, text)


def _escape_control(match):
    char = match.group()
    return _CONTROL_ESCAPES.get(char) or "\\x%02x" % ord(char)


_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER_RE = re.compile(r"Bearer\s+(?!\[REDACTED)[^\s\"',]+", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# --------------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
                413: "invalid_request_error",
                415: "invalid_request_error", 426: "invalid_request_error",
                429: "rate_limit_error"}


class ProxyError(Exception):
    """A failure the client gets as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, code=None, type=None, param=None, headers=None,
                 extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                             "invalid_request_error")
        self.param = param
        self.headers = headers or []
        self.extra = extra or {}

    def body(self):
        error = dict(self.extra)
        error.update({"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code})
        return {"error": error}


class StartupError(Exception):
    """A setting the proxy cannot start with; the message names it and what to do."""


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


# --------------------------------------------------------------------------------------------
# Server: sockets accepted, a thread per connection, within the connection cap
# --------------------------------------------------------------------------------------------

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_RETRY_PAUSE = 0.1
REFUSED_LINGER = 1.0  # a refused connection's request arrives meanwhile, and is read
MAX_REFUSED_LINGERING = 64  # descriptors they may hold at once

def close_refused(sock):
    """Read what the client sent (unread, it would make close() send a reset), and close."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def connection_limit_answer(limit):
    """The whole 503 a connection past --max-connections gets, bytes ready to send."""
    body = json.dumps(ProxyError(
        503, "The proxy has its limit of %d connections open (--max-connections); retry in a "
        "moment, or close idle connections." % limit, code="too_many_connections").body())
    return ("HTTP/1.1 503 Service Unavailable\r\nServer: %s\r\nContent-Type: application/json"
            "\r\nContent-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
            % (ProxyHandler.server_version, len(body), body)).encode()


class ProxyServer(http.server.ThreadingHTTPServer):
    """Serves sockets, a thread per connection; everything else is the App's."""

    daemon_threads = True
    request_queue_size = 1024  # a burst of clients connecting at once must not be refused
    allow_reuse_address = True

    def __init__(self, config, log=None):
        self.app = App(config, log or Log(debug=config.debug))
        self.app.on_shutdown = self.shutdown
        self.hangups = HangupWatcher()  # the Exchanges' watch on their clients
        self.descriptors_short = False
        self.at_connection_limit = False
        self.refused = collections.deque()  # (when to close, socket) of refused connections
        self.connection_limit_answer = connection_limit_answer(config.max_connections)
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            super().__init__((config.host, config.port), ProxyHandler)
        except BaseException:
            self.app.close()
            raise

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def get_request(self):
        try:
            pair = super().get_request()
        except OSError as e:
            if e.errno in OUT_OF_DESCRIPTORS:
                self.out_of_descriptors(e)
            raise  # the base class then returns, and serve_forever polls again
        self.descriptors_short = False
        return pair

    def out_of_descriptors(self, error):
        """accept() failing for want of a descriptor leaves the connection queued, so the
        listening socket stays readable: without a pause serve_forever would spin at full
        CPU. Pause, until a connection closes and frees one."""
        if not self.descriptors_short:
            self.descriptors_short = True
            self.app.log.info("cannot accept connections: %s; new ones wait until others close "
                              "(raise the limit with `ulimit -n`, or lower --max-connections)"
                              % (os.strerror(error.errno)))
        time.sleep(ACCEPT_RETRY_PAUSE)

    def process_request(self, request, client_address):
        if not self.app.traffic.connection_opened():
            self.refuse_connection(request)
            return
        self.at_connection_limit = False
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self.app.traffic.connection_closed()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.traffic.connection_closed()

    def refuse_connection(self, sock):
        """A connection past --max-connections: a 503 written here, in the accepting thread,
        so it costs no thread (the socket's empty send buffer takes it without waiting). The
        socket is closed only a moment later (service_actions): closed at once, the request
        the client is still sending would meet a reset, and most clients would then report
        that, not the 503 waiting for them."""
        if not self.at_connection_limit:
            self.at_connection_limit = True
            self.app.log.info("%d connections open (--max-connections): new ones get 503 "
                              "until some close" % self.app.config.max_connections)
        try:
            sock.setblocking(False)
            sock.send(self.connection_limit_answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.refused.append((time.monotonic() + REFUSED_LINGER, sock))
        if len(self.refused) > MAX_REFUSED_LINGERING:
            close_refused(self.refused.popleft()[1])

    def service_actions(self):
        """Run by serve_forever between polls: close the refused connections due."""
        super().service_actions()
        now = time.monotonic()
        while self.refused and self.refused[0][0] <= now:
            close_refused(self.refused.popleft()[1])

    def handle_error(self, request, client_address):
        # Connection-level failures (a client resetting mid-request) are routine, not bugs.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            return
        self.app.log.info("connection error from %s: %s" % (client_address[0], exc))

    def server_close(self):
        super().server_close()
        while self.refused:
            close_refused(self.refused.popleft()[1])
        self.hangups.close()
        self.app.close()


# --------------------------------------------------------------------------------------------
# Handler: each HTTP request parsed, admitted, routed and answered; the Exchange a
# route answers through
# --------------------------------------------------------------------------------------------

class Exchange:
    """What a route and the relay answer through: one client request, over HTTP (the
    ProxyHandler) or as one message on a client's WebSocket (WebSocketRequest). Nothing of
    the wire shows through: no socket, no rfile or wfile, no handler attribute.

    Attributes: method, path (the target, with its query), lower_headers (names lower-cased,
    the first of duplicates), body (the bytes read, or None) and log_fields (what the log
    line and /status say of it)."""

    def send_whole(self, status, content_type, body, headers=()):
        raise NotImplementedError

    def send_json(self, status, obj, headers=()):
        self.send_whole(status, "application/json", json.dumps(obj).encode(), headers)

    def send_text(self, status, body):
        self.send_whole(status, "text/plain; charset=utf-8", body)

    def start_event_stream(self, headers):
        """The head of an event stream; write_body() and end_body() send the rest."""
        raise NotImplementedError

    def write_body(self, data):
        raise NotImplementedError

    def end_body(self, tail):
        """The last piece of a streamed body and its end, in one write."""
        raise NotImplementedError

    def start_as_is(self, status, headers, length):
        """The head of an answer passed through as the platform sent it (length None: of
        unknown length)."""
        raise NotImplementedError

    def abort_body(self):
        """End a streamed body cut short, so the client cannot take it for a whole one."""
        raise NotImplementedError

    def close_after_answer(self):
        """No request after this one on the connection."""

    def send_events(self, payloads):
        """Events as the client's WebSocket carries them: one JSON text message each."""
        raise NotImplementedError

    def forwardable_headers(self):
        """The client's headers that may go to the platform as they are."""
        raise NotImplementedError

    def watch_hangup(self, upstream_sock):
        """While an answer is relayed: a client that hangs up shuts upstream_sock at once.
        The watch's "gone" turns true then; unwatch_hangup(watch) ends it."""
        raise NotImplementedError

    def unwatch_hangup(self, watch):
        raise NotImplementedError

    def writable_now(self):
        """Whether the client takes a small write at once (a ping must never wait)."""
        return True


class RequestReader(io.RawIOBase):
    """The client socket as the handler reads it, with two timeouts a plain socket cannot
    have: an idle keep-alive connection may wait IDLE_CONNECTION_TIMEOUT for its next request,
    but once a request's first byte is in, the rest must follow within REQUEST_READ_DEADLINE,
    however slowly it trickles. So a client sending a byte every few seconds cannot hold a
    thread for ever."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = None  # set by the first byte of a request, cleared when it is read

    def readable(self):
        return True

    def readinto(self, buf):
        if self.deadline is None:
            self.sock.settimeout(IDLE_CONNECTION_TIMEOUT)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the request took longer than %g s to arrive"
                                     % REQUEST_READ_DEADLINE)
            self.sock.settimeout(left)
        n = self.sock.recv_into(buf)
        if n and self.deadline is None:
            self.deadline = time.monotonic() + REQUEST_READ_DEADLINE
        return n

    def request_read(self):
        """The request is in: writes get their own timeout, the next request a new deadline."""
        self.deadline = None
        self.sock.settimeout(WRITE_TIMEOUT)


CORS_EXPOSED_HEADERS = ("x-request-id, retry-after, x-codex-primary-used-percent, "
                        "x-codex-secondary-used-percent, x-codex-primary-reset-after-seconds, "
                        "x-codex-secondary-reset-after-seconds")
CLIENT_GONE_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError,
                      socket.timeout)
ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a request target with a scheme
BAD_REQUEST_MESSAGES = {400: "Malformed HTTP request.", 414: "Request line too long.",
                        431: "Request header fields too large.", 501: "Method not supported.",
                        505: "HTTP version not supported."}


class ProxyHandler(Exchange, http.server.BaseHTTPRequestHandler):
    """One client connection over HTTP: each request parsed, admitted (check_access), routed
    (find_route) and answered, the handler being the route's Exchange; a WebSocket upgrade
    hands the connection to a WebSocketSession."""

    protocol_version = "HTTP/1.1"
    server_version = "codex-responses-proxy/" + __version__
    timeout = IDLE_CONNECTION_TIMEOUT

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.reader = RequestReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, 65536)
        self.cors_origin = None
        self.expect_continue = False

    def handle_one_request(self):
        # Each request starts clean, also one the base class answers itself (400, 414, 431,
        # 501) without passing dispatch(): no CORS headers left from the previous request.
        self.cors_origin = None
        self.expect_continue = False
        self.anthropic_errors = False
        super().handle_one_request()

    def parse_request(self):
        """The base class's, on a header block read and checked here first (see
        read_field_lines), then the framing rules it does not know (check_framing), and an
        absolute-form target reduced to its path. False once a refusal was sent."""
        try:
            lines = read_field_lines(self.rfile)
        except ClientGone:
            self.close_connection = True
            return False
        except ProxyError as e:
            problem, lines = e, []
        else:
            problem = None
        rfile, self.rfile = self.rfile, io.BytesIO(b"".join(lines) + b"\r\n")
        try:
            if not super().parse_request():  # the request line; it answered any fault in it
                return False
        finally:
            self.rfile = rfile
        try:
            if problem is not None:
                raise problem
            check_framing(self.request_version, self.headers)
            if ABSOLUTE_FORM.match(self.path):
                self.path = origin_form(self.path, self.server.app.config,
                                        self.server.server_address)
        except ProxyError as e:
            self.refuse_request(e)
            return False
        return True

    def handle_expect_100(self):
        """The base class would send 100 Continue before any check; send it only once the
        request passed them (see send_continue), never for a body that will be refused."""
        self.expect_continue = True
        return True

    def send_continue(self):
        if self.expect_continue:
            self.expect_continue = False
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    def dispatch(self, method):
        app = self.server.app
        self.method = method
        self.started = time.monotonic()
        self.headers_sent = False
        self.status_sent = None
        self.chunked = False
        self.log_fields = {}
        self.body = None
        # The request's headers, lower-cased, the first of duplicates (as Message.get gives):
        # one pass instead of a slow Message.get per lookup.
        self.lower_headers = {}
        for name, value in self.headers.items():
            self.lower_headers.setdefault(name.lower(), value)
        path = urllib.parse.urlsplit(self.path).path
        self.anthropic_errors = path in MESSAGES_PATHS
        counted = path not in OBSERVER_PATHS
        if counted:
            app.traffic.request_started()
        try:
            if app.stopping:
                self.close_connection = True
                raise ProxyError(503, "The proxy is shutting down; retry in a moment.",
                                 code="shutting_down", headers=[("Retry-After", "2")])
            origin = self.lower_headers.get("origin")
            if origin in app.config.allow_origins:
                self.cors_origin = origin  # refusals too are readable by a page allowed in
            if check_access(method, path, self.lower_headers, app.config,
                            self.server.server_address):
                return self.send_preflight()
            route, args = app.routes.find(method, path, self.lower_headers)
            if route is WEBSOCKET_UPGRADE:  # the socket is the session's from here on
                return self.serve_websocket(app)
            with (app.traffic.slot() if path != "/healthz" else contextlib.nullcontext()):
                self.body = read_request_body(self.rfile, self.lower_headers,
                                              app.config.max_body_bytes, self.send_continue)
                self.reader.request_read()
                route(self, *args)
        except ProxyError as e:
            if self.body is None and has_body(self.lower_headers):
                self.close_connection = True  # its unread body must not pass for a request
            self.send_error_json(e)
        except ClientGone:
            self.close_connection = True
            self.log_fields["note"] = "client disconnected"
        except Exception as e:  # a bug must cost one request, not the server
            app.log.internal_error("%s %s" % (method, path), e)
            self.close_connection = True
            self.send_error_json(ProxyError(500, "Internal proxy error (%s); see the proxy's log."
                                            % e.__class__.__name__, code="internal_error"))
        finally:
            self.reader.request_read()
            if counted:
                app.traffic.request_finished(self.status_sent)
            self.log_request_line(method, path)

    def serve_websocket(self, app):
        """GET /v1/responses with Upgrade: websocket. The handshake passed the checks every
        request does; a socket then takes a place (--max-concurrent) per response it
        streams, not for its whole life, but is refused at once when none is free."""
        check_upgrade(self.request_version, self.lower_headers)
        accept = websocket_accept(self.lower_headers)
        with app.traffic.slot():
            pass
        self.switch_protocols(accept, [("x-codex-websocket-max-message-bytes",
                                        str(app.config.max_body_bytes))])
        app.traffic.count_websocket("connections_total", 1)
        session = WebSocketSession(app, self, urllib.parse.urlsplit(self.path).path)
        try:
            session.run()
        finally:
            self.log_fields["note"] = "websocket closed after %d responses" % session.answered

    # -- the Exchange: what a route reads ---------------------------------------------------

    def forwardable_headers(self):
        return platform_request_headers(self.headers.items())

    def watch_hangup(self, upstream_sock):
        return self.server.hangups.watch(self.connection, upstream_sock)

    def unwatch_hangup(self, watch):
        self.server.hangups.unwatch(watch)

    def writable_now(self):
        return writable_now(self.connection)

    def close_after_answer(self):
        self.close_connection = True

    def abort_body(self):
        self.close_connection = True

    # -- answers ----------------------------------------------------------------------------

    def end_headers(self):
        if self.cors_origin:  # only ever for an origin given with --allow-origin
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Vary", "Origin")
            self.send_header("Access-Control-Expose-Headers", CORS_EXPOSED_HEADERS)
        if self.close_connection:
            self.send_header("Connection", "close")  # tell the client, not just hang up
        try:
            super().end_headers()
        except CLIENT_GONE_ERRORS:
            raise ClientGone()
        self.headers_sent = True

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self.status_sent = code

    def send_whole(self, status, content_type, body, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.write(body)

    def send_error_json(self, err):
        if self.headers_sent:
            self.close_connection = True  # too late for a status: cut the answer short instead
            return
        self.log_fields.setdefault("error", err.code or err.type)
        try:
            if self.anthropic_errors:
                self.send_json(*anthropic_error(err))
            else:
                self.send_json(err.status, err.body(), err.headers)
        except ClientGone:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The base class calls this for requests it cannot parse; answer them in JSON too."""
        self.refuse_request(ProxyError(code, BAD_REQUEST_MESSAGES.get(
            code, message or "Bad request."), code="bad_http_request"))

    def refuse_request(self, err):
        """Answer a request that cannot be parsed, or read only one way, and close: where it
        ends is unknown."""
        self.close_connection = True
        self.headers_sent = False
        self.log_fields = {}
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # nobody speaks 0.9: give a status line and headers
        try:
            self.send_error_json(err)
        except OSError:
            pass
        self.server.app.log.info("%s %s" % (err.status, err.message))

    def switch_protocols(self, accept, headers):
        """The 101 that makes this connection a WebSocket. No Sec-WebSocket-Extensions:
        permessage-deflate is declined (every client then sends plain frames)."""
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True  # no HTTP request follows on this connection

    def send_preflight(self):
        if has_body(self.lower_headers):
            self.close_connection = True  # its body is not read: it must not pass for a request
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.lower_headers.get("access-control-request-headers")
                         or "authorization, content-type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def start_event_stream(self, headers):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.start_body(headers)

    def start_as_is(self, status, headers, length):
        self.send_response(status)
        # send_response() has sent our own Date and Server: one of each per message
        headers = [(name, value) for name, value in headers
                   if name.lower() not in HOP_BY_HOP + ("content-length", "date", "server")]
        if length is not None:
            headers.append(("Content-Length", str(length)))
            self.chunked = False
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
        else:
            self.start_body(headers)

    def start_body(self, headers):
        """The rest of the head of a body of unknown length: chunked, or ended by closing."""
        self.chunked = self.request_version != "HTTP/1.0"
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def write(self, data):
        try:
            self.wfile.write(data)
        except CLIENT_GONE_ERRORS:
            raise ClientGone()

    def write_body(self, data):
        if self.chunked:
            self.write(b"%X\r\n%s\r\n" % (len(data), data))
        else:
            self.write(data)

    def end_body(self, tail):
        """The last piece of a body and its end, in one write."""
        if not self.chunked:
            self.write(tail)
        elif tail:
            self.write(b"%X\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        else:
            self.write(b"0\r\n\r\n")

    # -- the log ----------------------------------------------------------------------------

    def log_message(self, format, *args):
        pass  # the base class's access log; ours is log_request_line

    def log_request(self, code="-", size="-"):
        pass

    def log_request_line(self, method, path):
        log_answered(self.server.app, method, path, self.lower_headers.get("user-agent"),
                     self.log_fields, self.status_sent, time.monotonic() - self.started)


def log_answered(app, method, path, user_agent, fields, status, seconds, over=None):
    """An answered request (over HTTP, or a message on a WebSocket) into the log and /status's
    recent requests. over: the word its line carries for what it came over."""
    app.operator.record_request(method, path, user_agent, fields, status, seconds)
    log = app.log
    parts = [method, path]
    if fields.get("model"):
        parts.append("model=%s" % fields["model"])
    parts.append("status=%s" % log.status_code(status or 0))
    parts.append("%.3fs" % seconds)
    if "in" in fields or "out" in fields:
        parts.append("tokens in=%s out=%s" % (fields.get("in", "-"), fields.get("out", "-")))
    if over:
        parts.append(over)
    for key in ("stream", "error", "note"):
        if fields.get(key):
            parts.append(key if fields[key] is True else "%s=%s" % (key, fields[key]))
    log.info(" ".join(parts))


# --------------------------------------------------------------------------------------------
# Client hang-ups, noticed while a handler waits on the backend: the upstream is cut
# --------------------------------------------------------------------------------------------

class HangupWatcher:
    """Notices clients that hang up while their handler thread is blocked reading upstream,
    and cuts the upstream connection at once: every further token is quota the user pays for.
    One thread polls all watched client sockets; it sleeps when there are none.

    It peeks through a non-blocking duplicate of each client socket: through the handler's
    own socket, Python would first wait out its timeout whenever the handler had read the
    waiting bytes in between. Only the watcher thread closes the duplicates, between polls."""

    POLL = 0.2

    def __init__(self):
        self._watched = {}
        self._retired = []  # duplicates of unwatched sockets, for the watcher thread to close
        self._cond = threading.Condition()
        self._thread = None
        self._closed = False

    def watch(self, client_sock, upstream_sock):
        entry = {"peek": None, "upstream": upstream_sock, "gone": False}
        try:
            entry["peek"] = client_sock.dup()
            entry["peek"].setblocking(False)
        except OSError:
            if entry["peek"] is not None:
                entry["peek"].close()
            entry["peek"] = None
            return entry  # unwatched: a hang-up is then noticed at the next write
        with self._cond:
            if self._closed:  # a turn outliving the proxy's stop: no thread for it any more
                entry["peek"].close()
                entry["peek"] = None
                return entry
            self._watched[id(entry)] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hangup-watcher",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def unwatch(self, entry):
        """After this returns the watcher no longer touches the entry's upstream socket, which
        may then go back to the pool."""
        with self._cond:
            if self._watched.pop(id(entry), None) is not None:
                if self._thread is None:
                    entry["peek"].close()
                else:
                    self._retired.append(entry["peek"])

    def close(self):
        """The proxy stops: the thread ends within a poll, closing the duplicates it holds (a
        stopped proxy in a process that goes on, as in tests, must leave no thread behind)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self):
        while True:
            try:
                if not self._poll_once():
                    return
            except Exception:  # a surprise must not end hang-up detection for good
                time.sleep(self.POLL)

    def _poll_once(self):
        """One round: close retired duplicates, wait for a watched socket, act on hang-ups.
        False once closed, its duplicates closed: the thread then ends."""
        with self._cond:
            while True:
                retired, self._retired = self._retired, []
                for sock in retired:
                    sock.close()
                if self._closed:
                    for entry in self._watched.values():
                        entry["peek"].close()
                    self._watched.clear()
                    self._thread = None  # gone: unwatch closes duplicates itself from now on
                    return False
                if self._watched:
                    break
                self._cond.wait()
            entries = list(self._watched.values())
        try:
            readable = readable_sockets([e["peek"] for e in entries], self.POLL)
        except (OSError, ValueError):
            readable = []
            time.sleep(self.POLL)
        for entry in entries:
            if entry["peek"] in readable and _peer_closed(entry["peek"]):
                with self._cond:
                    if self._watched.pop(id(entry), None) is None:
                        continue  # unwatched meanwhile: its upstream may be pooled now
                    self._retired.append(entry["peek"])
                    entry["gone"] = True
                    try:
                        entry["upstream"].shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        time.sleep(self.POLL if readable else 0)  # readable, not closed: pipelined bytes
        return True


def _peer_closed(sock):
    """For a non-blocking socket that polled readable: has the peer closed it?"""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False  # the bytes that made it readable were read by the handler meanwhile
    except OSError:
        return True


def writable_now(sock):
    """Whether sock takes a small write at once (poll, as descriptors may pass 1024)."""
    if not hasattr(select, "poll"):
        return bool(select.select([], [sock], [], 0)[1])
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


# --------------------------------------------------------------------------------------------
# Client WebSockets: the socket after the 101, each message an Exchange for the app
# --------------------------------------------------------------------------------------------

# While nothing goes out (the backend reasoning silently), the client is pinged this often:
# middleboxes and clients (the Python SDKs) drop sockets that stay silent for long.
WS_PING_INTERVAL = 25.0
# A socket with no request for this long is closed (the backend's own live 60 minutes).
WS_CLIENT_IDLE_SECONDS = 3600.0
WS_MAX_QUEUED = 16             # requests a socket may have waiting
WS_CLOSE_WAIT = 2.0            # after our close frame, how long the client has to answer it


def with_stream_id(payload, stream_id):
    """An event's JSON with the stream_id of the request it answers."""
    try:
        event = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(event, dict):
        return payload
    event["stream_id"] = stream_id
    return json.dumps(event, separators=(",", ":")).encode()


def websocket_error_event(err):
    """A refused or failed request as the backend's socket says it: an HTTP error carried
    in an `error` event (status, error, headers). previous_response_not_found goes without a
    status: with one, the Codex CLI would fail the turn instead of resending it whole."""
    event = {"type": "error"}
    if err.code != "previous_response_not_found":
        event["status"] = err.status
    event["error"] = err.body()["error"]
    if err.headers:
        event["headers"] = {name.lower(): value for name, value in err.headers}
    return event


class WebSocketRequest(Exchange):
    """One message on a client's socket, as a route sees a request: its answer goes out as
    event messages, with the message's stream_id when it carried one."""

    method = "WS"

    def __init__(self, session, raw):
        self.session = session
        self.path = session.path
        self.lower_headers = session.handler.lower_headers  # the handshake's
        self.body = raw
        self.log_fields = {}
        self.status = 200
        self.stream_id = None  # set by the route once the message is parsed

    def forwardable_headers(self):
        return platform_request_headers(self.session.handler.headers.items(),
                                        from_websocket=True)

    def send_events(self, payloads):
        self.session.send_events(payloads, self.stream_id)

    def send_error(self, err):
        """A refused or failed request: its error event."""
        self.status = err.status
        self.log_fields.setdefault("error", err.code or err.type)
        try:
            self.send_events([json.dumps(websocket_error_event(err)).encode()])
        except ClientGone:
            pass

    def watch_hangup(self, upstream_sock):
        return self.session.handler.server.hangups.watch(self.session.sock, upstream_sock)

    def unwatch_hangup(self, watch):
        self.session.handler.server.hangups.unwatch(watch)


class WebSocketSession:
    """One client socket after the 101. A reader thread takes the client's frames: it
    answers pings, queues requests, answers the close handshake, pings a silent client,
    closes an idle socket, and on the client's close or hang-up shuts the socket, which
    cuts a response in flight (see HangupWatcher). This thread answers the queued requests
    one after another, each through the relay into a WebSocketSink."""

    def __init__(self, app, handler, path):
        self.app = app
        self.handler = handler
        self.path = path
        self.sock = handler.connection
        self.reader = MessageReader(app.config.max_body_bytes)
        self.conversation = app.socket_conversation(app)
        self.answered = 0  # requests answered on this socket
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._queued_bytes = 0
        self._busy = False
        self._ended = False      # the socket is shut: nothing more in or out
        self._closing = None     # when our close frame went out
        self._last_sent = self._last_request = time.monotonic()

    # -- the socket ---------------------------------------------------------------------------

    def send(self, data):
        """Whole frames, in order; ClientGone once the socket cannot take them."""
        with self._send_lock:
            if self._closing is not None or self._ended:
                raise ClientGone()
            try:
                self.sock.sendall(data)
            except OSError:
                raise ClientGone()
            self._last_sent = time.monotonic()

    def send_events(self, payloads, stream_id=None):
        if stream_id is not None:
            payloads = [with_stream_id(p, stream_id) for p in payloads]
        if payloads:
            self.send(b"".join(encode_frame(OP_TEXT, p) for p in payloads))

    def close(self, code, reason=""):
        """Start the close handshake (once); the reader ends it."""
        with self._send_lock:
            if self._closing is not None or self._ended:
                return
            self._closing = time.monotonic()
            try:
                self.sock.sendall(close_frame(code, reason))
            except OSError:
                pass

    def end(self):
        """Shut the socket: the reader sees its end, a relay in flight its client gone."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _pending_bytes(self):
        """What the client sent after its handshake and the handler had already buffered:
        with the read deadline passed, the buffered reader gives what it holds and reads
        nothing from the socket (see RequestReader)."""
        self.handler.reader.deadline = time.monotonic() - 1
        try:
            data = self.handler.rfile.peek(65536)
            return self.handler.rfile.read(len(data))
        except OSError:
            return b""
        finally:
            self.handler.reader.deadline = None
            self.sock.settimeout(WRITE_TIMEOUT)

    # -- the reader thread --------------------------------------------------------------------

    def _read(self):
        tick = min(0.5, WS_PING_INTERVAL / 2.0, WS_CLIENT_IDLE_SECONDS / 2.0)
        try:
            data = self._pending_bytes()
            next_tick = time.monotonic() + tick
            while not self._ended:
                if data and self._take(self.reader.feed(data)):
                    return
                data = b""
                if time.monotonic() >= next_tick:  # also while the client keeps sending
                    next_tick = time.monotonic() + tick
                    if self._tick():
                        return
                if not readable_sockets([self.sock], tick):
                    continue
                data = self.sock.recv(65536)
                if not data:
                    return
        except WebSocketError as e:
            self.close(e.code, e.reason)  # a protocol error fails the connection at once
        except (OSError, ValueError):
            pass
        finally:
            self.end()

    def _take(self, messages):
        """Act on the client's messages; True once it closed."""
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                with self._cond:
                    # while nothing is in flight, the first queued is about to be: not waiting
                    if len(self._queue) >= WS_MAX_QUEUED + (0 if self._busy else 1):
                        raise WebSocketError(CLOSE_POLICY_VIOLATION, "more than %d requests "
                                             "waiting; wait for answers" % WS_MAX_QUEUED)
                    self._check_waiting_bytes(len(payload))
                    self._queue.append(payload)
                    self._queued_bytes += len(payload)
                    self._cond.notify_all()
            elif opcode == OP_PING:
                try:
                    self.send(encode_frame(OP_PONG, payload))
                except ClientGone:
                    pass
            elif opcode == OP_CLOSE:
                code = parse_close_payload(payload)[0]
                self.close(code)  # the answer: the client's own code (none if it sent none)
                return True
        return False

    def _check_waiting_bytes(self, size):
        """The requests waiting on a socket hold at most --max-body-bytes together (the one
        about to be answered aside): what one socket makes the proxy hold is bounded by the
        flag, not by 16 times it."""
        waiting = self._queued_bytes - (len(self._queue[0]) if self._queue and not self._busy
                                        else 0)
        limit = self.app.config.max_body_bytes
        if waiting + size > limit and (waiting or self._queue):
            raise WebSocketError(CLOSE_POLICY_VIOLATION, "more than %d bytes of requests "
                                 "waiting (--max-body-bytes); wait for answers" % limit)

    def _tick(self):
        """Between the client's frames: keep-alive, idle and shutdown; True to end."""
        now = time.monotonic()
        if self._closing is not None:
            return now - self._closing >= WS_CLOSE_WAIT
        with self._cond:
            idle = not self._queue and not self._busy
        if idle and self.app.stopping:
            self.close(CLOSE_GOING_AWAY, "the proxy is shutting down")
        elif idle and now - self._last_request >= WS_CLIENT_IDLE_SECONDS:
            self.close(CLOSE_NORMAL, "idle for %d s" % WS_CLIENT_IDLE_SECONDS)
        elif now - self._last_sent >= WS_PING_INTERVAL:
            try:
                self.send(encode_frame(OP_PING))
            except ClientGone:
                return True
        return False

    # -- this thread: the requests ------------------------------------------------------------

    def run(self):
        reader = threading.Thread(target=self._read, name="websocket-reader", daemon=True)
        self.app.traffic.count_websocket("connections_open", 1)
        try:
            reader.start()
            while True:
                with self._cond:
                    while not self._queue and not self._ended and self._closing is None:
                        self._cond.wait()
                    if self._ended or self._closing is not None:
                        break
                    raw = self._queue.popleft()
                    self._queued_bytes -= len(raw)
                    self._busy = True
                try:
                    self.answer(raw)
                finally:
                    with self._cond:
                        self._busy = False
                        self._last_request = time.monotonic()
                if self.app.stopping:
                    self.close(CLOSE_GOING_AWAY, "the proxy is shutting down")
        finally:
            if reader.ident is not None:  # started
                reader.join(WS_CLOSE_WAIT + 5)
            self.end()
            self.conversation.close()
            self.app.traffic.count_websocket("connections_open", -1)

    def answer(self, raw):
        """One client message answered by the app, or an error event."""
        exchange = WebSocketRequest(self, raw)
        started = time.monotonic()
        try:
            self.conversation.answer(exchange)
        except ProxyError as e:
            exchange.send_error(e)
        except ClientGone:
            exchange.log_fields["note"] = "client disconnected; upstream closed"
            self.end()
        except Exception as e:  # a bug costs this socket, not the server
            self.app.log.internal_error("a WebSocket request", e)
            exchange.status = 500
            exchange.log_fields["error"] = "internal_error"
            self.close(CLOSE_INTERNAL_ERROR, "internal proxy error; see the proxy's log")
        self.answered += 1
        self.app.traffic.count_websocket("responses", 1)
        self.log_line(exchange, started)

    def log_line(self, exchange, started):
        log_answered(self.app, "WS", self.path, self.handler.lower_headers.get("user-agent"),
                     exchange.log_fields, exchange.status, time.monotonic() - started,
                     "websocket")


# --------------------------------------------------------------------------------------------
# Access (pure): which requests this proxy serves at all, and which route answers
# --------------------------------------------------------------------------------------------

def host_allowed(value, config, listen_address):
    """Is this Host header a name of ours: localhost, a loopback address or the listening
    one (on our port), or a name given with --allow-host?"""
    if value is None:
        return True  # HTTP/1.0 clients; browsers always send Host
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, sep, port = value.rpartition(":")
        if not sep:
            name, port = value, ""
    if name in config.allow_hosts or value in config.allow_hosts:
        return True
    own = ("localhost", "127.0.0.1", "::1", listen_address[0].lower())
    return name in own and port in ("", str(listen_address[1]))


def own_origin(url, config, listen_address):
    """Is this URL (a Referer) on this proxy itself, or on an origin given with
    --allow-origin?"""
    parts = urllib.parse.urlsplit(url)
    scheme, netloc = parts.scheme.lower(), parts.netloc
    if scheme not in ("http", "https") or not netloc or "@" in netloc:
        return False
    return "%s://%s" % (scheme, netloc) in config.allow_origins or \
        host_allowed(netloc, config, listen_address)


def origin_form(target, config, listen_address):
    """The path and query of an absolute-form request target (http://host:port/path), which
    must name this proxy: it is no forward proxy, and a front end that routes by the Host
    header would not see where the request really goes. Raises ProxyError."""
    parts = urllib.parse.urlsplit(target)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or \
            "@" in parts.netloc or not host_allowed(parts.netloc, config, listen_address):
        raise ProxyError(400, "The request target names another host (%s://%s): this proxy "
                         "is not a forward proxy. Send the path alone, as in 'GET /v1/models "
                         "HTTP/1.1'." % (parts.scheme, parts.netloc.rpartition("@")[2][:100]),
                         code="bad_http_request")
    return urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))


# GET routes that act: a web page can make a browser send a GET with no Origin (<img src>).
STATE_CHANGING_PATHS = ("/shutdown",)
# The status page's own routes. They hold no data (the page reads /status, with the client
# key), so a browser opens them without the key, which it could not send on a navigation.
PAGE_PATHS = ("/", "/ui.js", "/favicon.ico")
KEYLESS_PATHS = ("/healthz",) + PAGE_PATHS
# What the person watching the proxy asks for: not traffic, not counted, not listed.
OBSERVER_PATHS = PAGE_PATHS + ("/status",)


def same_origin(origin, host):
    """Is Origin the origin of this very request (its Host, which passed host_allowed)? That
    is the status page this proxy served: Chromium sends Origin with its module script and
    fetches. A page on another port or name is another origin, even on this machine."""
    parts = urllib.parse.urlsplit(origin)
    return bool(host) and parts.scheme.lower() in ("http", "https") and \
        "@" not in parts.netloc and not parts.path and \
        parts.netloc.lower() == host.strip().lower()


def client_key_ok(headers, key):
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    candidates = [value.strip()] if scheme.lower() == "bearer" else []
    candidates.append((headers.get("x-api-key") or "").strip())
    return any(c and hmac.compare_digest(c.encode("utf-8", "replace"), key) for c in candidates)


def check_access(method, path, headers, config, listen_address):
    """What every request passes before its route: a Host naming this proxy (DNS rebinding),
    no foreign web page (Origin, Sec-Fetch-Site, and for a route that acts, Referer), the
    client key, a JSON content type.
    headers: lower-cased names. Returns whether this is a CORS preflight, to be answered as
    such; raises ProxyError for a refused request."""
    host = headers.get("host")
    if not host_allowed(host, config, listen_address):
        raise ProxyError(403, "Host %r is not this proxy's name (DNS rebinding protection). "
                         "If clients reach it by that name, start it with --allow-host."
                         % host, code="host_not_allowed")
    origin = headers.get("origin")
    if origin is not None:
        if origin not in config.allow_origins and not (
                method in ("GET", "HEAD") and path in OBSERVER_PATHS and
                same_origin(origin, host)):
            raise ProxyError(403, "Requests from web pages are refused (Origin %s). To let a "
                             "page you trust call the proxy, start it with --allow-origin "
                             "%s." % (origin, origin), code="origin_not_allowed")
        if method == "OPTIONS" and headers.get("access-control-request-method"):
            return True  # a preflight carries no credentials, so needs no client key
    elif (headers.get("sec-fetch-site") or "none").lower() not in ("none", "same-origin"):
        # A page's <img> or link sends a GET with no Origin; browsers still mark it
        # cross-site. Nothing a page loads that way may act (GET /shutdown) or be read.
        raise ProxyError(403, "Requests from other web sites are refused.",
                         code="origin_not_allowed")
    if path in STATE_CHANGING_PATHS and headers.get("referer") is not None and \
            not own_origin(headers["referer"], config, listen_address):
        # A browser without Sec-Fetch-Site (Safari before 16.4, older ones) still names the
        # page in Referer, unless the page turned that off. Only here: a read is no use to a
        # page without CORS, a POST from a page carries Origin, and a non-browser client
        # sending its home page as Referer keeps working.
        raise ProxyError(403, "Requests from other web sites are refused (Referer). To let "
                         "a page you trust call the proxy, start it with --allow-origin "
                         "ORIGIN.", code="origin_not_allowed")
    if config.client_key and path not in KEYLESS_PATHS and \
            not client_key_ok(headers, config.client_key):
        raise ProxyError(401, "This proxy needs its client key: send 'Authorization: Bearer "
                         "KEY' or 'x-api-key: KEY' with the key from --client-key-file or "
                         "$%s." % CLIENT_KEY_ENV, code="invalid_client_key")
    ctype = headers.get("content-type")
    if method == "POST" and ctype is not None and \
            ctype.split(";")[0].strip().lower() != "application/json" and not (
                path in FORM_PATHS and multipart_boundary(ctype) is not None):
        # A form needs no preflight either, but a page's form post carries Origin (refused
        # above), and only the edit endpoint reads one.
        # A browser's form or text/plain post needs no preflight: refuse it before anything
        # is sent upstream.
        raise ProxyError(415, "Content-Type must be application/json, not %r: send the "
                         "header 'Content-Type: application/json' (curl -d alone sends a "
                         "form type)." % ctype, code="unsupported_media_type")
    return False


# The paths served (in both modes), each also without /v1 for clients configured without it.
API_PATHS = ("/v1/responses", "/v1/responses/compact", "/v1/responses/input_tokens",
             "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits",
             "/v1/messages", "/v1/messages/count_tokens", "/v1/models")
SERVICE_PATHS = ("/status", "/shutdown", "/healthz") + PAGE_PATHS
SERVED_PATHS = frozenset(API_PATHS + tuple(p[3:] for p in API_PATHS) + SERVICE_PATHS)
WEBSOCKET_PATHS = ("/v1/responses", "/responses")
# Anthropic's API: its errors are answered in Anthropic's shape.
MESSAGES_PATHS = frozenset(("/v1/messages", "/v1/messages/count_tokens", "/messages",
                            "/messages/count_tokens"))
# /v1/responses/{id} and what hangs off it: routes taking the id too
_RESPONSE_PATH_RE = re.compile(r"(?:/v1)?/responses/([A-Za-z0-9_.:-]{1,256})"
                               r"(|/input_items|/cancel)\Z")
WEBSOCKET_UPGRADE = "websocket upgrade"  # find_route's answer for a GET /v1/responses upgrade


def unknown_path_message(path):
    """What a 404 says: an Anthropic client whose base URL ends in /v1 (the OpenAI habit)
    asks for /v1/v1/messages, and needs to hear that, not about /v1/responses."""
    if path.endswith(("/messages", "/messages/count_tokens")):
        return ("Unknown path %s. Anthropic clients take the proxy's address without /v1 "
                "(ANTHROPIC_BASE_URL=http://HOST:PORT); it serves POST /v1/messages."
                % path)
    return "Unknown path %s. This proxy serves POST /v1/responses." % path


class RouteTable:
    """Which route answers a method and path: built once at start, from the mode (see
    App.chatgpt_routes and App.platform_routes). A route is a callable taking the Exchange
    (and, for /v1/responses/{id} and what hangs off it, the id)."""

    def __init__(self, api, by_response_id, service):
        self.routes = dict(service)
        for path, methods in api.items():
            self.routes[path] = self.routes[path[3:]] = methods
        self.by_response_id = by_response_id  # "", "/input_items", "/cancel" -> methods

    def find(self, method, path, headers):
        """(the route for this request, its arguments from the path), WEBSOCKET_UPGRADE for a
        WebSocket handshake, else the fitting JSON error."""
        methods, args = self.routes.get(path), ()
        if methods is None:
            m = _RESPONSE_PATH_RE.match(path)
            if m:
                methods, args = self.by_response_id[m.group(2)], (m.group(1),)
        if methods is None:
            raise ProxyError(404, unknown_path_message(path), code="not_found")
        if "websocket" in (headers.get("upgrade") or "").lower():
            if path in WEBSOCKET_PATHS and method == "GET":
                return WEBSOCKET_UPGRADE, ()
            raise ProxyError(426, "WebSocket is served on GET /v1/responses only; use HTTP "
                             "here.", code="websocket_not_supported")
        route = methods.get(method)
        if route is None:
            raise ProxyError(405, "%s does not take %s; use %s." % (
                path, method, " or ".join(sorted(methods))), code="method_not_allowed",
                headers=[("Allow", ", ".join(sorted(methods)))])
        return route, args


# --------------------------------------------------------------------------------------------
# Body: Content-Length or chunked, within a size limit and a deadline
# --------------------------------------------------------------------------------------------

# RFC 9112's framing, strictly: a proxy or TLS terminator in front may read a request's
# headers or its end differently from a lenient parser here, and then the bytes one of them
# takes for a body the other takes for a second request (request smuggling). So what either
# could read two ways is refused with 400, and the connection closed.
MAX_FIELD_LINE = 65536  # as http.client's
MAX_FIELD_LINES = 100
MAX_CHUNK_LINE = 1024
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A field line: a token, the colon right after it, a value with no CR or NUL. Not obs-fold (a
# line starting with white space), which one parser joins to the line before and another not.
_FIELD_LINE = re.compile(_TOKEN + rb":[^\r\x00]*")
# A chunk-size line: hex digits, extensions (token[=token|quoted-string]), CRLF.
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|\"(?:[^\"\\\x00-\x08\x0a-\x1f"
    rb"\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*\"))?)*\r\n" % (_TOKEN, _TOKEN))


def framing_error(message, status=400):
    return ProxyError(status, message, code="bad_http_request")


def read_field_lines(rfile, section="header"):
    """The raw lines of a header (or trailer) section, up to its empty line, each checked to
    be a field line. Lines may end in a bare LF (RFC 9112 allows it). Raises ProxyError, after
    which the connection must close, or ClientGone."""
    lines = []
    while True:
        line = rfile.readline(MAX_FIELD_LINE + 1)
        if len(line) > MAX_FIELD_LINE:
            raise framing_error("A %s line is longer than %d bytes." % (section, MAX_FIELD_LINE),
                                431)
        if not line.endswith(b"\n"):
            raise ClientGone()  # the client hung up within the head
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if not text:
            return lines
        if len(lines) == MAX_FIELD_LINES:
            raise framing_error("More than %d %s lines." % (MAX_FIELD_LINES, section), 431)
        if not _FIELD_LINE.fullmatch(text):
            # Not quoted back: a malformed line may be someone's Authorization header.
            raise framing_error(
                "%s line %d is malformed: each must read 'Name: value' on one line, with no "
                "white space before the colon and no CR or NUL byte (RFC 9112)."
                % (section.capitalize(), len(lines) + 1))
        lines.append(line)


def http_version(text):
    """'HTTP/1.1' -> (1, 1), as the base class checked it."""
    major, _, minor = text[5:].partition(".")
    return int(major), int(minor)


def check_framing(version, headers):
    """One reading of where the request ends, and of its Host (RFC 9112 sections 3.2, 6.1,
    6.3). headers: the parsed http.client.HTTPMessage. Raises ProxyError."""
    lengths = headers.get_all("content-length") or []
    codings = headers.get_all("transfer-encoding") or []
    hosts = headers.get_all("host") or []
    if lengths and codings:
        raise framing_error("Send Content-Length or Transfer-Encoding, not both.")
    if len(lengths) > 1 or len(codings) > 1:
        raise framing_error("Send one %s header, not several."
                            % ("Content-Length" if len(lengths) > 1 else "Transfer-Encoding"))
    if codings and codings[0].strip(" \t").lower() != "chunked":
        raise framing_error("Transfer-Encoding %r is not supported: send 'Transfer-Encoding: "
                            "chunked' or a Content-Length." % codings[0].strip(" \t")[:40])
    if len(hosts) > 1:
        raise framing_error("Send one Host header, not several.")
    if not hosts and http_version(version) >= (1, 1):
        raise framing_error("An HTTP/1.1 request needs a Host header.")


def is_chunked(headers):
    return (headers.get("transfer-encoding") or "").strip(" \t").lower() == "chunked"


def has_body(headers):
    return (headers.get("content-length") or "0").strip(" \t") != "0" or is_chunked(headers)


def read_request_body(rfile, headers, limit, before_reading):
    """The request's body bytes. before_reading() runs once a body is due (100 Continue).
    Raises ProxyError; after one, the connection's framing is lost: close it."""
    try:
        if is_chunked(headers):
            before_reading()
            return _read_chunks(rfile, limit)
        length = headers.get("content-length")
        if length is None:
            return b""
        if not re.match(r"^[0-9]+$", length.strip(" \t")):  # not isdigit(): '\xb2' is a digit to it
            raise ProxyError(400, "Invalid Content-Length.", code="invalid_body")
        length = int(length)
        if length > limit:
            raise ProxyError(413, "The request body is %d bytes; the limit is %d."
                             % (length, limit), code="request_too_large")
        if length:
            before_reading()
        data = rfile.read(length)
    except socket.timeout:
        raise ProxyError(408, "The request body did not arrive within %g s."
                         % REQUEST_READ_DEADLINE, code="request_timeout")
    if len(data) < length:
        raise ClientGone()
    return data


def _read_chunks(rfile, limit):
    parts, total = [], 0
    while True:
        line = rfile.readline(MAX_CHUNK_LINE + 1)
        if len(line) <= MAX_CHUNK_LINE and not line.endswith(b"\n"):
            raise ClientGone()
        m = _CHUNK_SIZE_LINE.fullmatch(line)  # int() alone takes '-1', '0x1', '1_0', ' 1'
        if not m:
            raise ProxyError(400, "Malformed chunked request body: a chunk-size line must be "
                             "hex digits (and extensions), at most %d bytes, ending in CRLF."
                             % MAX_CHUNK_LINE, code="invalid_body")
        size = int(m.group(1), 16)
        if size == 0:
            read_field_lines(rfile, "trailer")
            return b"".join(parts)
        total += size
        if total > limit:
            raise ProxyError(413, "The request body is over the limit of %d bytes." % limit,
                             code="request_too_large")
        data = rfile.read(size)
        end = rfile.read(2)
        if len(data) < size or len(end) < 2:
            raise ClientGone()
        if end != b"\r\n":
            raise ProxyError(400, "Malformed chunked request body: chunk data must be followed "
                             "by CRLF, as long as its size line says.", code="invalid_body")
        parts.append(data)


def json_request_body(raw, headers, limit):
    """(body, source, spans) of the request's JSON object (see parse_json_object)."""
    return parse_json_object(decode_request_body(raw, headers.get("content-encoding"), limit))


# --------------------------------------------------------------------------------------------
# App: the proxy's services, its route tables (chosen by the mode), and each route
# --------------------------------------------------------------------------------------------

ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
              "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
              "total_tokens": 0}


def prewarm_events(body):
    """The answer to a `"generate": false` request (the Codex CLI's prewarm): a response
    with nothing generated, made here; nothing goes upstream."""
    response = {"id": "resp_" + uuid.uuid4().hex, "object": "response",
                "created_at": int(time.time()), "status": "in_progress",
                "model": body.get("model"), "output": [], "usage": None, "error": None,
                "incomplete_details": None, "tools": body.get("tools") or [],
                "tool_choice": body.get("tool_choice", "auto"),
                "parallel_tool_calls": body.get("parallel_tool_calls", True)}
    done = dict(response, status="completed", usage=ZERO_USAGE)
    return [{"type": "response.created", "sequence_number": 0, "response": response},
            {"type": "response.completed", "sequence_number": 1, "response": done}]


class SocketConversation:
    """The app's side of one client WebSocket: each response.create message answered through
    the relay, and the socket's own responses kept for previous_response_id on it."""

    def __init__(self, app):
        self.app = app
        self.kept = SocketResponses(app.socket_memory)

    def close(self):
        self.kept.close()

    def answer(self, exchange):
        """One client message: a response.create answered; a ProxyError for the error event."""
        body, source, spans = parse_json_object(exchange.body)
        exchange.stream_id = body.get("stream_id")
        if body.get("type") != "response.create":
            raise ProxyError(400, "Unknown message type %s: this socket takes "
                             "{\"type\": \"response.create\", ...a Responses request...}."
                             % json.dumps(body.get("type"))[:80], param="type",
                             code="unknown_message_type")
        self.create(exchange, body, source, spans)

    @staticmethod
    def request_of(exchange, body):
        """(the Responses request a response.create message carries, its `generate`)."""
        model = body.get("model")
        exchange.log_fields["model"] = model if isinstance(model, str) else None
        generate = body.get("generate", True)
        if not isinstance(generate, bool):
            raise ProxyError(400, "`generate` must be true or false.", param="generate",
                             code="invalid_type")
        body = dict(body)  # the message's own fields go; the rest is a request as on HTTP
        for name in ("type", "stream_id", "generate"):
            body.pop(name, None)
        return body, generate

    def create(self, exchange, body, source, spans):
        app = self.app
        body, generate = self.request_of(exchange, body)
        request = app.turns.prepare(exchange.lower_headers, body, source, spans,
                                    history=self.history)
        note_model_sent(exchange, body, request)
        if not generate:
            app.turns.done(request)
            return self.prewarm(exchange, body, request.body["input"], request.previous)
        with app.traffic.slot():
            try:
                answer = app.upstream.responses(request)  # the backend's socket too, if in use

                def on_end(assembler):
                    app.turns.keep(assembler, request)
                    self.keep(assembler, request.body["input"], request.previous)

                relay(app.upstream, answer, ResponsesTransform(app.log), WebSocketSink(exchange),
                      exchange, on_end)
            finally:
                app.turns.done(request)
        app.upstream.turn_over(request)

    def history(self, previous, budget=None):
        """The items previous_response_id names: a response of this socket's, else one in
        the conversation store."""
        items = self.kept.get(previous, budget)
        return items if items is not None else self.app.conversations.history(previous, budget)

    def keep(self, assembler, sent_input, parent=None):
        """A finished response's whole input and output, for previous_response_id on this
        socket, whatever its `store` said. parent: the previous_response_id it continued,
        whose history it shares."""
        response_id = (assembler.response or {}).get("id")
        if assembler.terminal in ("response.completed", "response.incomplete") and \
                isinstance(response_id, str):
            self.kept.put(response_id, list(sent_input) + replayable(assembler.output()),
                          parent)

    def prewarm(self, exchange, body, items, parent=None):
        """`"generate": false`: answered here; its input kept for the next request."""
        events = prewarm_events(body)
        self.kept.put(events[0]["response"]["id"], items, parent)
        exchange.send_events([json.dumps(e, separators=(",", ":")).encode() for e in events])
        exchange.log_fields["note"] = "generate: false, answered here"


class PlatformSocketConversation(SocketConversation):
    """API-key mode's side of a client WebSocket: each request a streamed POST to the
    platform (see respond); a previous_response_id of this socket's expanded here, another
    left to the platform."""

    def create(self, exchange, body, source, spans):
        app = self.app
        body, generate = self.request_of(exchange, body)
        previous = body.get("previous_response_id")
        budget = ExpansionBudget(app.config.max_body_bytes, len(source))
        history = self.kept.get(previous, budget) if isinstance(previous, str) else None
        parent = previous if history is not None else None
        if not generate:
            if previous is not None and history is None:
                raise unknown_response_error(previous)
            return self.prewarm(exchange, body, (history or []) + input_list(
                body.get("input")), parent)
        with app.traffic.slot():
            self.respond(exchange, body, history, WebSocketSink(exchange),
                         lambda assembler, sent_input: self.keep(assembler, sent_input, parent))

    def respond(self, client, body, history, sink, on_kept):
        """API-key mode, for a socket: the request as a streamed POST to the platform with
        our key, its events relayed into sink. A previous_response_id the socket knows is
        expanded here; another is the platform's to resolve."""
        app = self.app
        body = dict(body, stream=True)
        if history is not None:
            body.pop("previous_response_id", None)
            body["input"] = list(history) + input_list(body.get("input"))
        headers = client.forwardable_headers()
        headers.update({"Authorization": app.config.api_key_header,
                        "Content-Type": "application/json", "Accept": "text/event-stream"})
        answer = app.upstream.exchange("POST", app.config.upstream_url,
                                       json.dumps(body).encode(), headers)
        if answer.status != 200:
            err = translate_upstream_error(answer.status, answer.read_whole(app.upstream.pool))
            err.headers = answer.forwarded_headers()
            raise err
        sent_input = input_list(body.get("input"))
        relay(app.upstream, HTTPEvents(answer, app.upstream.pool), ResponsesTransform(app.log),
              sink, client, lambda assembler: on_kept(assembler, sent_input))


# What the compact endpoint takes, as the Codex CLI sends it; the rest of a Responses body
# (stream, store, include...) is not for it.
COMPACT_FIELDS = ("model", "input", "instructions", "tools", "parallel_tool_calls", "reasoning",
                  "text")
COMPACT_TIMEOUT = 600.0  # one JSON answer for a whole history: no events to show progress


class PreparedRequest:
    """A Responses request as it goes upstream, and what keeping its answer takes."""

    def __init__(self, body, session_id, previous, store, encode, headers, version, own_input):
        self.body = body              # the rewritten request, history in front
        self.session_id = session_id
        self.previous = previous      # the previous_response_id it named, or None
        self.store = store            # False: the client said store: false
        self.encode = encode          # body -> bytes, reusing the client's own where unchanged
        self.headers = headers        # the extra upstream headers its client's headers give
        self.version = version        # the Codex version to present
        self._own_input = own_input   # -> its own input as JSON text, when it is kept
        self.after_turn = None        # what waits for the client to have its answer
        self.pinned = None            # the stored response it continues, held meanwhile

    def own_input(self):
        return self._own_input()


class Traffic:
    """What is in flight, for the limits and /status: requests, client connections, and
    WebSocket sockets and responses; with the places of --max-concurrent."""

    def __init__(self, max_concurrent, max_connections):
        self.max_concurrent = max_concurrent
        self.max_connections = max_connections
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self._inflight = 0
        self._connections = 0
        self._cond = threading.Condition()
        self._counts = {"total": 0, "by_status": {}}
        self._websocket = {"connections_open": 0, "connections_total": 0, "responses": 0}

    def request_started(self):
        with self._cond:
            self._inflight += 1

    def request_finished(self, status):
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()
            self._counts["total"] += 1
            key = str(status or "none")
            self._counts["by_status"][key] = self._counts["by_status"].get(key, 0) + 1

    def count_websocket(self, key, n):
        with self._cond:
            self._websocket[key] += n

    def connection_opened(self):
        """Count a new client connection; False when --max-connections are open already."""
        with self._cond:
            if self._connections >= self.max_connections:
                return False
            self._connections += 1
            return True

    def connection_closed(self):
        with self._cond:
            self._connections -= 1

    @contextlib.contextmanager
    def slot(self):
        """One of --max-concurrent places for a request in flight, or a 503 at once."""
        if not self.slots.acquire(blocking=False):
            raise ProxyError(503, "The proxy is at its limit of %d requests in flight "
                             "(--max-concurrent); retry in a moment."
                             % self.max_concurrent, code="too_many_requests",
                             headers=[("Retry-After", "1")])
        try:
            yield
        finally:
            self.slots.release()

    def wait_idle(self, timeout):
        """Wait for requests in flight to finish; False if some were still running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def report(self):
        """(requests, connections, websocket) as /status shows them."""
        with self._cond:
            return ({"total": self._counts["total"], "in_flight": self._inflight,
                     "by_status": dict(self._counts["by_status"])},
                    {"open": self._connections, "limit": self.max_connections},
                    dict(self._websocket))


class OperatorView:
    """What the person running the proxy sees: /status, the start-up line about the login, a
    warning about auth.json's permissions, and the recent requests. The app has one of its
    two kinds, by the mode: ChatGPTOperatorView or APIKeyOperatorView."""

    mode_name = None  # as the start-up line names the mode

    def __init__(self, config, auth, upstream, traffic):
        self.config = config
        self.auth = auth
        self.upstream = upstream
        self.traffic = traffic
        self.started = time.time()
        self.recent = RecentRequests()

    def status_report(self):
        """What /status says: no secrets, only what a person or a monitor needs."""
        config = self.config
        requests, connections, websocket = self.traffic.report()
        status = {"mode": config.mode, "version": __version__,
                  "uptime_seconds": int(time.time() - self.started),
                  "upstream": config.upstream_url, "requests": requests,
                  "connections": connections, "websocket": websocket}
        status.update(self.recent.report())
        status.update(self.login_status())
        return status

    def login_status(self):
        """/status's fields about the login, by the mode."""
        raise NotImplementedError

    def describe_credentials(self):
        """What the start-up line says about the login."""
        raise NotImplementedError

    def record_request(self, method, path, user_agent, fields, status, seconds):
        """Every answered request, over HTTP or as a WebSocket message, comes here with its
        log line: into the recent requests and tokens per model. The page's own requests
        (and /status) are the watcher's, not traffic."""
        if path not in OBSERVER_PATHS:
            self.recent.add(request_record(method, path, user_agent, fields, status,
                                           seconds, time.time()))

    def permission_warning(self):
        """A warning when auth.json can be read by others than its owner, else None."""
        try:
            mode = os.stat(self.config.auth_path).st_mode
        except OSError:
            return None
        if mode & 0o077:
            return ("warning: %s is readable by group or others (mode %03o); it holds your "
                    "login: chmod 600 %s" % (self.config.auth_path, mode & 0o777,
                                             self.config.auth_path))
        return None


class ChatGPTOperatorView(OperatorView):
    """ChatGPT mode: the login behind auth.json, the quota, the backend transport."""

    mode_name = "ChatGPT"

    def login_status(self):
        config = self.config
        login = {"auth_file": config.auth_path}
        try:
            creds = self.auth.load()
        except ProxyError as e:
            login.update(ok=False, error=e.message)
        else:
            login.update(ok=True, account_id=creds.account_id, plan_type=creds.plan_type,
                         access_token_expires_at=iso_time(creds.expires_at),
                         access_token_expires_in_seconds=None if creds.expires_at is None
                         else int(creds.expires_at - time.time()),
                         last_refresh=creds.data.get("last_refresh"))
        login["last_refresh_attempt"] = self.auth.last_refresh
        login["login_command"] = LOGIN_COMMAND
        return {"login": login, "quota": self.upstream.quota.snapshot(),
                "upstream_transport": dict(self.upstream.websockets.choice.report(),
                                           idle_sockets=len(self.upstream.websockets.pool))}

    def describe_credentials(self):
        try:
            creds = self.auth.load()
        except ProxyError as e:
            return "no usable login: %s Requests will get 401 until this is fixed." % e.message
        expiry = ("expires %s UTC" % datetime.datetime.fromtimestamp(
            creds.expires_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
            if creds.expires_at else "no expiry in token")
        return "ChatGPT login from %s (account %s, plan %s, access token %s%s)" % (
            self.config.auth_path, creds.account_id or "unknown", creds.plan_type or "unknown",
            expiry, ", will refresh" if creds.needs_refresh() else "")


class APIKeyOperatorView(OperatorView):
    """API-key mode: where the key came from (never the key)."""

    mode_name = "API-key"

    def login_status(self):
        return {"api_key_from": self.config.api_key_source}

    def describe_credentials(self):
        return "API key from %s" % self.config.api_key_source


class ModelNames:
    """The model a request names, made one the backend knows: --model-map, Claude's default
    names, an effort in a name; and the backend's model list behind them (cached)."""

    def __init__(self, config, upstream, client_version, log):
        self.rules = tuple(config.model_map) + DEFAULT_MODEL_RULES
        self.upstream = upstream
        self.client_version = client_version
        self.log = log
        self.models_cache = ModelsCache()
        self._list_failed = None  # when the model list last could not be had

    def listing(self):
        """The backend's model list (cached) for the newest Codex version seen; a ProxyError
        when it cannot be had."""
        return self.models_cache.get(self.upstream.models, self.client_version.newest, self.log)

    def catalog(self):
        """The backend's model list (cached), or None when it cannot be had. Then names go as
        they are (an effort in a name unsplit, Claude's names to FALLBACK_MODELS), and the list
        is not asked for again for MODELS_CACHE_SECONDS: every request would wait for it."""
        failed = self._list_failed
        if failed is not None and time.monotonic() - failed < MODELS_CACHE_SECONDS:
            return None
        try:
            return self.listing()
        except ProxyError as e:
            self._list_failed = time.monotonic()
            self.log.info("the backend's model list is unavailable (%s); model names with an "
                          "effort in them are sent as they are, and Claude's names go to %s "
                          "and %s"
                          % (e.message, FALLBACK_MODELS[STRONGEST_MODEL],
                             FALLBACK_MODELS[SMALL_MODEL]))
            return None

    def listed_slugs(self):
        """The backend's listed models; [] when the list cannot be had."""
        catalog = self.catalog()
        return catalog.listed() if catalog is not None else []

    def resolved(self, body):
        """body with its model mapped, then an effort in its name split off."""
        # The map first: its target may name an effort.
        return model_with_effort(self.mapped(body), self.catalog)

    def mapped(self, body):
        """body with its model as map_model() has it (--model-map, then Claude's names)."""
        model = body.get("model")
        mapped = map_model(model, self.rules, self.listed_slugs)
        if mapped == model:
            return body
        self.log.debug("model %s -> %s" % (model, mapped))
        return dict(body, model=mapped)

    def with_name_effort_first(self, body):
        """A translated Messages request whose model (or its --model-map target) names an
        effort, with that effort instead of the request's: Claude Code sends
        output_config.effort on every request (2.1.332: medium for Claude's names, high for
        others), so the name's effort, the only one its user chose, would never apply."""
        reasoning = body.get("reasoning")
        if not isinstance(reasoning, dict) or reasoning.get("effort") is None:
            return body
        unset = dict(self.mapped(body), reasoning={
            k: v for k, v in reasoning.items() if k != "effort"})
        named = model_with_effort(unset, self.catalog)
        return body if named is unset else named


class Turns:
    """Responses turns for the backend: a client's request made ready (its references and
    previous_response_id expanded, the response it continues pinned, rewritten), and its
    answer kept for previous_response_id and retrieval."""

    def __init__(self, config, log, upstream, conversations, model_names, client_version):
        self.config = config
        self.log = log
        self.upstream = upstream
        self.conversations = conversations
        self.model_names = model_names
        self.client_version = client_version

    def prepare(self, client_headers, body, source=None, spans=None, history=None):
        """prepare_request, with the response its previous_response_id names pinned in the
        conversation store (see ConversationStore.pin) until done(request)."""
        previous = body.get("previous_response_id")
        pinned = previous if isinstance(previous, str) else None
        if pinned is not None:
            self.conversations.pin(pinned)
        try:
            request = self.prepare_request(client_headers, body, source, spans, history)
        except BaseException:
            self.conversations.unpin(pinned)
            raise
        request.pinned = pinned
        return request

    def done(self, request):
        """The turn is over, its response kept or not: what it continued is no longer held."""
        pinned, request.pinned = request.pinned, None
        self.conversations.unpin(pinned)

    def prepare_request(self, client_headers, body, source=None, spans=None, history=None):
        """A client's Responses request made ready for the backend: its item references and
        previous_response_id expanded (history: the lookup for the latter, by default the
        conversation store), rewritten, with the headers and the Codex version it goes
        with."""
        body = self.model_names.resolved(body)
        original = body  # what `source` and `spans` describe: references not yet expanded
        budget = ExpansionBudget(self.config.max_body_bytes,
                                 len(source) if source is not None else 0)
        items = body.get("input")
        if isinstance(items, list):
            expanded = self.conversations.expand_references(items, budget)
            if expanded is not items:
                body = dict(body, input=expanded)
        previous = body.get("previous_response_id")
        earlier = None
        if previous is not None:
            if not isinstance(previous, str):
                raise ProxyError(400, "`previous_response_id` must be a string.",
                                 param="previous_response_id", code="invalid_type")
            earlier = (history or self.conversations.history)(previous, budget)
            if earlier is None:
                raise unknown_response_error(previous)
        note = service_tier_warning(body)
        if note:
            self.log.warn_once(*note)
        upstream_body, session_id = rewrite_request(
            body, self.config.instructions, client_headers.get("session_id")
            or client_headers.get("session-id"),
            self.upstream.dropped_params(body.get("model")), earlier)
        span = unchanged_span("input", upstream_body["input"], original, spans)

        def own_input():  # made only for a response that is kept (a 2 MB input costs ~10 ms)
            if span:  # the client's own text: bytes when it is ASCII (see parse_json_object)
                text = source[span[0]:span[1]]
                return text.decode("ascii") if isinstance(text, bytes) else text
            return json.dumps(upstream_body["input"][len(earlier or ()):], separators=(",", ":"))

        return PreparedRequest(
            upstream_body, session_id, previous, body.get("store") is not False,
            lambda b: encode_json_object(b, original, source, spans),
            upstream_request_headers(client_headers, upstream_body),
            self.client_version.observe(client_headers), own_input)

    def keep(self, assembler, request):
        """Keep a finished response for previous_response_id and retrieval, unless its client
        said `store: false`. A store that fails costs a warning, never the answer the user
        has paid for."""
        response_id = (assembler.response or {}).get("id")
        if not request.store or not isinstance(response_id, str) or \
                assembler.terminal not in ("response.completed", "response.incomplete"):
            return
        try:
            self.conversations.save(assemble_response(assembler.response, assembler.output()),
                                    request.previous, request.own_input())
        except Exception as e:
            self.log.info("warning: could not keep response %s for "
                          "previous_response_id: %s" % (response_id, e))


class ChatGPTRoutes:
    """ChatGPT mode's routes: every API path answered here, over the ChatGPT backend, with the
    app's services."""

    def __init__(self, app):
        self.app = app
        self.config = app.config
        self.log = app.log
        self.upstream = app.upstream
        self.conversations = app.conversations
        self.turns = app.turns
        self.model_names = app.model_names
        self.client_version = app.client_version

    def table(self, service_routes):
        """The route table: these routes and the proxy's own (service_routes)."""
        return RouteTable({
            "/v1/responses": {"POST": self.responses},
            "/v1/responses/compact": {"POST": self.compact},
            "/v1/responses/input_tokens": {"POST": self.input_tokens},
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/images/generations": {"POST": self.image_generations},
            "/v1/images/edits": {"POST": self.image_edits},
            "/v1/messages": {"POST": self.messages},
            "/v1/messages/count_tokens": {"POST": self.count_tokens},
            "/v1/models": {"GET": self.models},
        }, {"": {"GET": self.retrieve, "DELETE": self.delete},
            "/input_items": {"GET": self.input_items}, "/cancel": {"POST": self.cancel}},
            service_routes)

    def models(self, client):
        # A Codex CLI asks for its list first, as GET /models?client_version=X with its own
        # headers: its version counts before any of its turns came in.
        self.client_version.observe(client.lower_headers)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(client.path).query)
        for asked in query.get("client_version", [])[:1]:
            self.client_version.observe({"version": asked})
        listing = self.model_names.listing().openai_list(self.config.list_effort_models)
        if "anthropic-version" in client.lower_headers:  # Claude Code's model discovery
            listing = anthropic_model_list(listing)
        client.send_json(200, listing)

    def responses(self, client):
        """POST /v1/responses: the Responses front end."""
        self.through_front_end(client, ResponsesFrontEnd)

    def chat_completions(self, client):
        """POST /v1/chat/completions: the Chat Completions front end."""
        self.through_front_end(client, ChatFrontEnd)

    def messages(self, client):
        """POST /v1/messages: Anthropic's Messages API (Claude Code), as one Responses request
        whose answer is translated back, streamed or whole."""
        self.through_front_end(client, MessagesFrontEnd)

    def through_front_end(self, client, front_end):
        """A client request as the front end maps it onto a Responses request, its answer's
        events mapped back into the sink the client asked for (a stream or one answer)."""
        body, source, spans = self.json_body(client)
        front = front_end(body, client.lower_headers)
        upstream_body = front.responses_body(self.app)
        if upstream_body is body:  # the client's own bytes may go as they are
            request = self.turns.prepare(client.lower_headers, body, source, spans)
        else:
            request = self.turns.prepare(client.lower_headers, upstream_body)
        front.note_model(client, request)
        try:
            answer = self.upstream.responses(request)
            transform = front.transform(answer, self.log)
            sink = front.sink(client, transform)
            on_end = ((lambda assembler: self.turns.keep(assembler, request)) if front.keeps
                      else None)
            try:
                relay(self.upstream, answer, transform, sink, client, on_end)
            finally:
                sink.stop()
        finally:
            self.turns.done(request)
        self.upstream.turn_over(request)

    def count_tokens(self, client):
        """POST /v1/messages/count_tokens: an estimate from the translated request (the
        backend counts nothing before it answers)."""
        body = self.json_body(client)[0]
        estimate = estimate_tokens(messages_to_responses(body, client.lower_headers))
        client.send_json(200, {"input_tokens": estimate})

    def compact(self, client):
        """POST /v1/responses/compact: one JSON answer from the backend's compact endpoint."""
        url = upstream_url_for(self.config.upstream_url, "responses/compact")
        body, source, spans = self.json_body(client)
        request = self.turns.prepare(client.lower_headers, body, source, spans)
        self.turns.done(request)  # nothing of a compaction is kept
        compact_body = {k: v for k, v in request.body.items() if k in COMPACT_FIELDS}
        answer = self.upstream.call("POST", url, compact_body, encode_json_object,
                                    request.session_id, request.headers, "application/json",
                                    request.version, COMPACT_TIMEOUT)
        data = answer.read_whole(self.upstream.pool, self.config.max_body_bytes)
        try:
            result = json.loads(data)
            if not isinstance(result, dict) or not isinstance(result.get("output"), list):
                raise ValueError("no output list")
        except ValueError:
            raise ProxyError(502, "The backend's compaction answer was not the JSON expected.",
                             code="bad_upstream_answer")
        result.setdefault("id", "resp_" + uuid.uuid4().hex)
        result.setdefault("object", "response.compaction")
        result.setdefault("created_at", int(time.time()))
        client.send_json(200, result, answer.forwarded_headers())

    def retrieve(self, client, response_id):
        response = self.conversations.get(response_id)
        if response is None:
            raise stored_response_not_found(response_id)
        client.send_json(200, response)

    def delete(self, client, response_id):
        if not self.conversations.delete(response_id):
            raise stored_response_not_found(response_id)
        client.send_json(200, {"id": response_id, "object": "response", "deleted": True})

    def input_items(self, client, response_id):
        items = self.conversations.input_items(response_id)
        if items is None:
            raise stored_response_not_found(response_id)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(client.path).query)
        first = {name: values[0] for name, values in query.items()}
        client.send_json(200, input_items_page(items, first.get("after"), first.get("limit"),
                                               first.get("order")))

    def cancel(self, client, response_id):
        if self.conversations.get(response_id) is None:
            raise stored_response_not_found(response_id)
        raise ProxyError(400, "Response %r cannot be cancelled: only background responses can "
                         "be, and the ChatGPT subscription backend runs none (`background` is "
                         "not supported), so it has already finished." % (response_id,),
                         code="background_not_supported")

    def input_tokens(self, client):
        raise ProxyError(400, "Counting input tokens is not available on a ChatGPT "
                         "subscription: its backend has no token-counting endpoint. The "
                         "`usage.input_tokens` of a response says what a request cost.",
                         code="input_tokens_not_supported")

    def image_generations(self, client):
        self.images(client, "images/generations", edit=False)

    def image_edits(self, client):
        self.images(client, "images/edits", edit=True)

    def images(self, client, endpoint, edit):
        """POST /v1/images/generations or /edits: the backend's endpoint beside /responses,
        one JSON answer (data[].b64_json) once the images are made."""
        url = upstream_url_for(self.config.upstream_url, endpoint)
        body = self.image_body(client, edit)
        model = body.get("model") or DEFAULT_IMAGE_MODEL
        client.log_fields["model"] = model if isinstance(model, str) else None
        request = image_request(body, edit, self.upstream.dropped_params(model))
        answer = self.upstream.call("POST", url, request, encode_json_object, None,
                                    image_request_headers(client.lower_headers),
                                    "application/json",
                                    self.client_version.observe(client.lower_headers),
                                    IMAGES_TIMEOUT)
        data = answer.read_whole(self.upstream.pool, IMAGE_ANSWER_LIMIT)
        check_image_answer(data)
        client.send_whole(200, "application/json", data, answer.forwarded_headers())

    def image_body(self, client, edit):
        """An image request's JSON object: its JSON body, or for an edit its form's fields."""
        boundary = multipart_boundary(client.lower_headers.get("content-type")) if edit else None
        if boundary is None:
            return self.json_body(client)[0]
        raw = decode_request_body(client.body, client.lower_headers.get("content-encoding"),
                                  self.config.max_body_bytes)
        return image_edit_from_form(parse_multipart_form(raw, boundary))

    def json_body(self, client):
        """(body, source, spans) of the request's JSON object; notes the model for the log."""
        parsed = json_request_body(client.body, client.lower_headers, self.config.max_body_bytes)
        body = parsed[0]
        client.log_fields["model"] = body.get("model") if isinstance(body.get("model"),
                                                                     str) else None
        client.log_fields["stream"] = body.get("stream") is True
        return parsed


class PlatformRoutes:
    """API-key mode's routes: the OpenAI paths go to the platform as the client sent them, with
    our key; Anthropic's are refused (the platform does not speak them)."""

    def __init__(self, config, upstream):
        self.config = config
        self.upstream = upstream

    def table(self, service_routes):
        """The route table: these routes and the proxy's own (service_routes)."""
        forward, with_query = self.forward, self.forward_with_query
        return RouteTable({
            "/v1/responses": {"POST": forward},
            "/v1/responses/compact": {"POST": forward},
            "/v1/responses/input_tokens": {"POST": with_query},
            "/v1/chat/completions": {"POST": forward},
            "/v1/images/generations": {"POST": forward},
            "/v1/images/edits": {"POST": forward},
            "/v1/messages": {"POST": self.messages_need_login},
            "/v1/messages/count_tokens": {"POST": self.messages_need_login},
            "/v1/models": {"GET": forward},
        }, {"": {"GET": with_query, "DELETE": with_query},
            "/input_items": {"GET": with_query}, "/cancel": {"POST": with_query}},
            service_routes)

    def forward(self, client):
        """The request to the platform's endpoint for its path (its query left out)."""
        self.pass_through(client, self.platform_url(client, with_query=False))

    def forward_with_query(self, client, response_id=None):
        """The request to the platform's URL for its path and query (a response's id in
        the path goes as it is)."""
        self.pass_through(client, self.platform_url(client))

    def messages_need_login(self, client):
        raise messages_apikey_error()

    def platform_url(self, client, with_query=True):
        """API-key mode: the platform's URL for the client's path (and query)."""
        parts = urllib.parse.urlsplit(client.path)
        path = parts.path[len("/v1/"):] if parts.path.startswith("/v1/") else parts.path[1:]
        url = upstream_url_for(self.config.upstream_url, path)
        return url + ("?" + parts.query if parts.query and with_query else "")

    def pass_through(self, client, url):
        """API-key mode: the request goes as the client sent it, with our key."""
        headers = client.forwardable_headers()
        headers["Authorization"] = self.config.api_key_header
        answer = self.upstream.exchange(client.method, url, client.body or None, headers)
        relay_as_is(self.upstream, answer, client)


class App:
    """The proxy's services (the login, the upstream client, the conversations, the model
    names, the counters, the operator's view), its own routes (/status, /healthz, the page),
    and the API routes of its mode (ChatGPTRoutes or PlatformRoutes). A route gets the
    client's request (an Exchange) and answers through it."""

    def __init__(self, config, log):
        self.config = config
        self.log = log
        if config.api_key_header:
            log.add_secret(config.api_key_header[len(b"Bearer "):].decode("latin-1"))
        self.auth = AuthStore(config.auth_path, config.refresh_url, codex_user_agent(config),
                              log)
        self.upstream = UpstreamClient(config, log, self.auth)
        self.client_version = ClientVersion(config.client_version)
        self.model_names = ModelNames(config, self.upstream, self.client_version, log)
        self.conversations = (SQLiteConversationStore(config.state_db, config.state_max_bytes)
                              if config.state_db else ConversationStore(config.state_max_bytes))
        self.socket_memory = SocketMemory(socket_memory_cap(config))
        self.turns = Turns(config, log, self.upstream, self.conversations, self.model_names,
                           self.client_version)
        self.traffic = Traffic(config.max_concurrent, config.max_connections)
        self.on_shutdown = None  # set by the server: stops accepting connections
        self._stopping = threading.Event()
        mode = APP_MODES[config.mode]
        self.operator = mode.operator_view(config, self.auth, self.upstream, self.traffic)
        self.routes = mode.routes(self)
        self.socket_conversation = mode.socket_conversation

    # -- stopping ---------------------------------------------------------------------------

    @property
    def stopping(self):
        return self._stopping.is_set()

    def begin_shutdown(self, why):
        """Stop accepting (from any thread but serve_forever's); main() then drains."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.log.info("%s: finishing requests in flight" % why)
            if self.on_shutdown is not None:
                threading.Thread(target=self.on_shutdown, daemon=True).start()

    def close(self):
        self.upstream.close()
        self.conversations.close()

    # -- the route tables: one of them is the app's, chosen at start by the mode -------------

    def chatgpt_routes(self):
        """ChatGPT mode: see ChatGPTRoutes."""
        return ChatGPTRoutes(self).table(self.service_routes())

    def platform_routes(self):
        """API-key mode: see PlatformRoutes."""
        return PlatformRoutes(self.config, self.upstream).table(self.service_routes())

    def service_routes(self):
        """The proxy's own paths, the same in both modes."""
        routes = {"/status": {"GET": self.status},
                  "/healthz": {"GET": self.healthz, "HEAD": self.healthz}}
        if self.config.http_shutdown:
            routes["/shutdown"] = {"GET": self.shutdown}
        if self.config.ui:
            routes.update({"/": {"GET": self.page, "HEAD": self.page},
                           "/ui.js": {"GET": self.page_script},
                           "/favicon.ico": {"GET": self.favicon}})
        return routes

    # -- the proxy's own routes --------------------------------------------------------------

    def healthz(self, client):
        client.send_text(200, b"ok\n")

    def status(self, client):
        client.send_json(200, self.operator.status_report())

    def page(self, client):
        client.send_whole(200, "text/html; charset=utf-8", PAGE_HTML, PAGE_HEADERS)

    def page_script(self, client):
        client.send_whole(200, "text/javascript; charset=utf-8", PAGE_SCRIPT, PAGE_HEADERS)

    def favicon(self, client):
        client.send_whole(200, "image/svg+xml", PAGE_ICON, PAGE_HEADERS)

    def shutdown(self, client):
        client.close_after_answer()
        client.send_json(200, {"status": "shutting down"})
        self.begin_shutdown("GET /shutdown")


# The mode decides, once, which routes there are, what answers a client's socket, and what
# the operator is shown.
AppMode = collections.namedtuple("AppMode", "routes socket_conversation operator_view")
APP_MODES = {
    "chatgpt": AppMode(App.chatgpt_routes, SocketConversation, ChatGPTOperatorView),
    "apikey": AppMode(App.platform_routes, PlatformSocketConversation, APIKeyOperatorView),
}


class ModelsCache:
    """The model list for MODELS_CACHE_SECONDS; when the backend fails, the last good list."""

    def __init__(self):
        self._value = None
        self._version = None
        self._fetched = 0.0
        self._lock = threading.Lock()  # held while fetching: concurrent misses fetch once

    def get(self, fetch, version, log):
        """The list for this Codex version: a newer client may see newer models."""
        with self._lock:
            if self._value is not None and self._version == version and \
                    time.monotonic() - self._fetched < MODELS_CACHE_SECONDS:
                return self._value
            try:
                self._value, self._fetched = fetch(version), time.monotonic()
                self._version = version
            except ProxyError as e:
                if self._value is None:
                    raise
                log.info("model list unavailable (%s); serving the cached one" % e.message)
            return self._value


# --------------------------------------------------------------------------------------------
# App: the status page (GET /): what it lists, and the page itself
# --------------------------------------------------------------------------------------------

RECENT_REQUESTS = 50
# Tokens are counted per model name the clients sent; past this many names (a client sending
# made-up ones), the rest are counted together, so the table cannot grow without end.
COUNTED_MODELS = 100
OTHER_MODELS = "(other models)"
# The run-again command when the login is dead (the Codex CLI's `codex login` does it too).
LOGIN_COMMAND = "python3 codex_responses_proxy.py login"

# User-Agent -> the client's family, first match wins: (start of the UA, or a word in it).
_CLIENT_FAMILIES = (
    ("claude-cli/", "Claude Code"),
    ("codex_cli_rs/", "Codex CLI"), ("codex_exec/", "Codex CLI"), ("codex-tui/", "Codex CLI"),
    ("codex_vscode/", "Codex IDE"), ("codex_", "Codex app"), ("Codex ", "Codex app"),
    ("Agents/Python", "openai-agents"),
    ("OpenAI/Python", "openai-python"), ("OpenAI/JS", "openai-node"),
    ("Anthropic/Python", "anthropic-python"), ("Anthropic/JS", "anthropic-node"),
    ("curl/", "curl"), ("python-requests/", "python-requests"), ("python-httpx/", "httpx"),
    ("Python-urllib/", "Python urllib"), ("Go-http-client/", "Go"), ("Mozilla/", "browser"),
)
_CLIENT_WORDS = (("ai-sdk/", "ai-sdk"), (" websockets/", "Python websockets"))
_PRODUCT_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")


def client_family(user_agent):
    """Which kind of client sent a request, from its User-Agent: a short name, never the
    whole header (which may carry anything)."""
    agent = (user_agent or "").strip()[:300]
    if not agent:
        return "unknown"
    for word, family in _CLIENT_WORDS:  # the AI SDK adds its word after the runtime's
        if word in agent:
            return family
    for start, family in _CLIENT_FAMILIES:
        if agent.startswith(start):
            return family
    product = _PRODUCT_RE.match(agent)
    return product.group(0) if product else "other"


def listed_route(method, path):
    """The route as the page lists it: a path this proxy serves, as asked; any other path
    only as "(unknown path)", as a client's mistyped path may hold anything."""
    known = path in SERVED_PATHS or _RESPONSE_PATH_RE.match(path)
    return "%s %s" % (method, path if known else "(unknown path)")


def _token_count(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def request_record(method, path, user_agent, fields, status, seconds, when):
    """One answered request as /status lists it: never a body, a prompt or a key."""
    model = fields.get("model")
    error = fields.get("error")
    return {"at": iso_time(when), "client": client_family(user_agent),
            "route": listed_route(method, path),
            "model": model[:100] if isinstance(model, str) else None,
            "status": status or None, "seconds": round(seconds, 3),
            "input_tokens": _token_count(fields.get("in")),
            "cached_tokens": _token_count(fields.get("cached")),
            "output_tokens": _token_count(fields.get("out")),
            "error": str(error)[:80] if error else None}


class RecentRequests:
    """The last requests answered, and the tokens spent per model since start."""

    def __init__(self, size=RECENT_REQUESTS):
        self._ring = collections.deque(maxlen=size)
        self._models = {}
        self._lock = threading.Lock()

    def add(self, record):
        with self._lock:
            self._ring.append(record)
            model = record["model"]
            if model is None:
                return
            # "claude-opus-5-5->gpt-5.5": the spend is the backend model's, whoever named it
            model = model.rpartition("->")[2]
            if model not in self._models and len(self._models) >= COUNTED_MODELS:
                model = OTHER_MODELS
            counts = self._models.setdefault(model, {
                "requests": 0, "input_tokens": 0, "cached_tokens": 0, "output_tokens": 0})
            counts["requests"] += 1
            for name in ("input_tokens", "cached_tokens", "output_tokens"):
                counts[name] += record[name] or 0

    def report(self):
        """What /status adds: the recent requests newest first, and tokens per model."""
        with self._lock:
            return {"recent_requests": list(reversed(self._ring)),
                    "tokens_by_model": {model: dict(counts)
                                        for model, counts in self._models.items()}}


PAGE_STYLE = """
:root { --bg: #f6f7f9; --card: #fff; --text: #1c1e21; --muted: #65676b; --line: #dde0e4;
  --bar: #e4e6ea; --ok: #1f8a4c; --mid: #c98a00; --high: #d0342c; --accent: #2f6fdf; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #121316; --card: #1c1d21; --text: #e6e7ea; --muted: #9a9ca3; --line: #2e3036;
    --bar: #2e3036; --ok: #3fb871; --mid: #e0a626; --high: #f0625a; --accent: #6ea0ff; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 12px; background: var(--bg);
  color: var(--text); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 12px;
  margin-bottom: 10px; }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 15px; margin: 0 0 8px; }
#conn { color: var(--muted); }
#conn.down { color: var(--high); font-weight: 600; }
body.down main { opacity: .5; }
.cards { display: grid; gap: 12px; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr));
  margin-bottom: 12px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px; margin-bottom: 12px; min-width: 0; }
.cards section { margin-bottom: 0; }
.window { margin-bottom: 12px; }
.whead { display: flex; justify-content: space-between; gap: 8px; }
.wname { font-weight: 600; }
.bar { height: 12px; background: var(--bar); border-radius: 6px; overflow: hidden;
  margin: 4px 0; }
.fill { height: 100%; background: var(--ok); }
.fill.mid { background: var(--mid); }
.fill.high { background: var(--high); }
.muted, .reset { color: var(--muted); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 12px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.bad { color: var(--high); }
code { background: var(--bar); padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; }
td.wrap { white-space: normal; }
form { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
form label { flex-basis: 100%; }
input { flex: 1 1 200px; padding: 6px; font: inherit; color: var(--text);
  background: var(--bg); border: 1px solid var(--line); border-radius: 4px; }
button { padding: 6px 12px; font: inherit; color: #fff; background: var(--accent);
  border: 0; border-radius: 4px; }
footer { color: var(--muted); font-size: 12px; }
@media (max-width: 600px) { body { padding: 6px; font-size: 13px; }
  th, td { padding: 3px 5px; } }
"""

PAGE_HTML = ("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>codex-responses-proxy</title>
<style>%s</style>
<script type="module" src="/ui.js"></script>
</head>
<body>
<header><h1>codex-responses-proxy</h1><span id="about"></span>
<span id="conn">connecting\u2026</span></header>
<section id="keybox" hidden>
<form id="keyform">
<label for="key">This proxy asks for its client key (the one in --client-key-file or
$CODEX_PROXY_CLIENT_KEY). The page keeps it in this tab only, until the tab closes.</label>
<input id="key" type="password" autocomplete="off" required>
<button id="keysend" type="submit">Show the status</button>
</form>
<p id="keyerror" class="bad" hidden></p>
</section>
<main id="main">
<div class="cards">
<section id="quota"><h2>Quota</h2>
<div id="windows"><p class="muted">Loading\u2026</p></div><p id="credits" hidden></p></section>
<section id="login"><h2>Login</h2>
<dl id="logindl"></dl><p id="relogin" class="bad" hidden></p></section>
<section id="traffic"><h2>Traffic</h2><dl id="trafficdl"></dl></section>
</div>
<section id="recent"><h2>Recent requests</h2><div class="scroll"><table>
<thead><tr><th>Time</th><th>Client</th><th>Route</th><th>Model</th><th>Status</th>
<th class="num">Duration</th><th class="num">Input</th><th class="num">Cached</th>
<th class="num">Output</th></tr></thead>
<tbody id="recentrows"></tbody></table></div></section>
<section id="models"><h2>Tokens per model since start</h2><div class="scroll"><table>
<thead><tr><th>Model</th><th class="num">Requests</th><th class="num">Input</th>
<th class="num">Cached</th><th class="num">Output</th></tr></thead>
<tbody id="modelrows"></tbody></table></div></section>
</main>
<footer>Read-only: this page shows what <code>/status</code> answers (JSON, for monitors),
every few seconds. Its own requests are not listed.</footer>
</body>
</html>
""" % PAGE_STYLE).encode()

PAGE_SCRIPT = r"""
const POLL_MS = 3000;
const KEY_ITEM = "codex-responses-proxy client key";
let doc = null;          // the last /status answer
let docAt = 0;           // when it came, by this browser's clock
let downSince = null;    // when /status stopped answering
let downWhy = "";
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) tr.append(el("td", text, cls));
  return tr;
}

function dl(box, pairs) {
  box.replaceChildren();
  for (const [name, value, cls] of pairs) {
    if (value === undefined) continue;
    box.append(el("dt", name), el("dd", value === null ? "\u2014" : value, cls));
  }
}

const pad = (n) => String(n).padStart(2, "0");
function clock(date) {
  return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
}
function when(iso) {
  if (!iso) return null;
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  const today = new Date().toDateString() === d.toDateString();
  return (today ? "" : d.toLocaleDateString() + " ") + clock(d);
}
function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + pad(m) + " min";
  if (m) return m + " min " + pad(s) + " s";
  return s + " s";
}
const elapsed = () => (Date.now() - docAt) / 1000;
const num = (n) => (n === null || n === undefined) ? "\u2014" : Number(n).toLocaleString("en-US");

function windowName(w) {
  const m = w.window_minutes;
  if (!m) return w.slot + " window";
  if (m % 1440 === 0) return (m / 1440) + (m === 1440 ? " day" : " days");
  if (m % 60 === 0) return (m / 60) + " h";
  return m + " min";
}

function renderQuota(q) {
  const box = $("windows");
  box.replaceChildren();
  const windows = (q && q.windows) || [];
  if (!windows.length) {
    box.append(el("p", "No quota reported yet: the backend tells it with its answers, so it " +
                       "shows after the first request.", "muted"));
  }
  for (const w of windows) {
    const used = typeof w.used_percent === "number" ? w.used_percent : null;
    const div = el("div", null, "window");
    const head = el("div", null, "whead");
    head.append(el("span", windowName(w), "wname"),
                el("span", used === null ? "use not reported" : used + "% used", "wpct"));
    const bar = el("div", null, "bar");
    const fill = el("div", null, "fill" + (used >= 90 ? " high" : used >= 70 ? " mid" : ""));
    fill.style.width = Math.min(100, Math.max(0, used || 0)) + "%";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuenow", String(used || 0));
    bar.append(fill);
    const reset = w.resets_in_seconds === null || w.resets_in_seconds === undefined
      ? "reset time not reported"
      : "resets in " + duration(w.resets_in_seconds - elapsed()) + " (" + when(w.resets_at) + ")";
    div.append(head, bar, el("div", reset, "reset"));
    box.append(div);
  }
  const c = (q && q.credits) || {};
  const yes = (v) => String(v).toLowerCase() === "true";
  let credits = null;
  if (yes(c.unlimited)) credits = "Credits: unlimited";
  else if (c.balance !== null && c.balance !== undefined) credits = "Credits: " + c.balance;
  else if (c.has_credits !== null && c.has_credits !== undefined)
    credits = yes(c.has_credits) ? "Credits: yes" : "Credits: none";
  $("credits").hidden = credits === null;
  $("credits").textContent = credits || "";
}

function renderLogin(s) {
  const box = $("logindl"), relogin = $("relogin");
  relogin.hidden = true;
  if (s.mode === "apikey") {
    dl(box, [["Mode", "API key, forwarded to the platform"], ["Key from", s.api_key_from],
             ["Forwards to", s.upstream]]);
    return;
  }
  const l = s.login || {};
  const attempt = l.last_refresh_attempt;
  const expires = l.access_token_expires_in_seconds;
  let expiry = null;
  if (typeof expires === "number") {
    const left = expires - elapsed();
    expiry = left > 0 ? "in " + duration(left) + " (" + when(l.access_token_expires_at) + ")"
                      : "expired " + duration(-left) + " ago; refreshed at the next request";
  }
  dl(box, [
    ["Login", l.ok ? "ok" : l.error || "not usable", l.ok ? null : "bad"],
    ["Account", l.ok ? l.account_id : undefined],
    ["Plan", l.ok ? l.plan_type : undefined],
    ["Access token", l.ok ? expiry : undefined],
    ["Last refresh", l.ok ? when(l.last_refresh) : undefined],
    ["Refresh here",
     attempt ? when(attempt.at) + (attempt.ok ? ": ok" : ": failed: " + attempt.error)
             : "none since start", attempt && !attempt.ok ? "bad" : null],
    ["Login file", l.auth_file],
  ]);
  if (!l.ok || (attempt && !attempt.ok)) {
    relogin.replaceChildren("To log in again, run ", el("code", l.login_command),
                            " (or codex login) on the proxy's machine; the proxy picks the new " +
                            "login up by itself.");
    relogin.hidden = false;
  }
}

function renderTraffic(s) {
  const r = s.requests || {}, ws = s.websocket || {}, c = s.connections || {};
  const codes = Object.entries(r.by_status || {}).sort();
  const errors = codes.filter(([code]) => Number(code) >= 400 || code === "none")
                      .reduce((sum, [, n]) => sum + n, 0);
  const t = s.upstream_transport;
  dl($("trafficdl"), [
    ["In flight", num(r.in_flight)],
    ["Connections", num(c.open) + " open of " + num(c.limit)],
    ["WebSockets", num(ws.connections_open) + " open, " + num(ws.responses) + " responses"],
    ["Requests", num(r.total) + " since start"],
    ["By status", codes.length ? codes.map(([code, n]) => code + " \u00d7 " + n).join(", ")
                               : "none yet"],
    ["Errors", num(errors), errors ? "bad" : null],
    ["To backend", t ? (t.in_use === "websocket" ? "WebSocket" : "HTTP") + " (" + t.why + ")"
                     : "HTTP, forwarded as is"],
  ]);
}

function renderRecent(list) {
  const body = $("recentrows");
  body.replaceChildren();
  if (!list || !list.length) {
    const tr = row([["No requests yet.", "muted"]]);
    tr.firstChild.colSpan = 9;
    body.append(tr);
    return;
  }
  for (const r of list) {
    const status = (r.status === null ? "\u2014" : r.status) + (r.error ? " " + r.error : "");
    body.append(row([[when(r.at)], [r.client], [r.route], [r.model || "\u2014", "wrap"],
                     [status, r.status >= 400 || !r.status ? "bad wrap" : "wrap"],
                     [r.seconds.toFixed(2) + " s", "num"], [num(r.input_tokens), "num"],
                     [num(r.cached_tokens), "num"], [num(r.output_tokens), "num"]]));
  }
}

function renderModels(models) {
  const body = $("modelrows");
  body.replaceChildren();
  const entries = Object.entries(models || {}).sort(
    (a, b) => (b[1].input_tokens + b[1].output_tokens) - (a[1].input_tokens + a[1].output_tokens));
  if (!entries.length) {
    const tr = row([["No tokens counted yet.", "muted"]]);
    tr.firstChild.colSpan = 5;
    body.append(tr);
  }
  for (const [model, n] of entries) {
    body.append(row([[model], [num(n.requests), "num"], [num(n.input_tokens), "num"],
                     [num(n.cached_tokens), "num"], [num(n.output_tokens), "num"]]));
  }
}

function render() {
  if (downSince) {
    $("conn").textContent = downWhy + " since " + clock(downSince) + "; trying again";
  } else if (doc) {
    $("conn").textContent = "updated " + clock(new Date(docAt));
  }
  $("conn").className = downSince ? "down" : "";
  document.body.classList.toggle("down", !!downSince);
  if (!doc) return;
  $("about").textContent = "v" + doc.version + ", up " + duration(doc.uptime_seconds + elapsed());
  renderQuota(doc.quota);
  renderLogin(doc);
  renderTraffic(doc);
  renderRecent(doc.recent_requests);
  renderModels(doc.tokens_by_model);
}

function askForKey(message) {
  $("keybox").hidden = false;
  $("main").hidden = true;
  $("keyerror").hidden = !message;
  $("keyerror").textContent = message || "";
  $("conn").textContent = "waiting for the client key";
  $("key").focus();
}

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = key ? {"Authorization": "Bearer " + key} : {};
  try {
    const resp = await fetch("/status", {headers: headers, cache: "no-store"});
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY_ITEM);
      askForKey(key ? "The proxy refused that key." : null);
      return;  // asked again once a key is given
    }
    if (!resp.ok) {
      downWhy = "the proxy answers HTTP " + resp.status;
      downSince = downSince || new Date();
      render();
      timer = setTimeout(poll, POLL_MS);
      return;
    }
    doc = await resp.json();
    docAt = Date.now();
    downSince = null;
    $("keybox").hidden = true;
    $("main").hidden = false;
  } catch (e) {
    downWhy = "not reachable";
    downSince = downSince || new Date();
  }
  render();
  timer = setTimeout(poll, POLL_MS);
}

$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
  $("key").value = "";
  poll();
});
setInterval(() => { if (doc) render(); }, 1000);
poll();
""".encode()

# The favicon browsers ask for on their own: a dot, so no 404 shows up for it.
PAGE_ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
             b'<circle cx="8" cy="8" r="7" fill="#2f6fdf"/></svg>')

# No script but /ui.js, no inline style but the page's own block (by its hash), no framing
# (clickjacking), nothing loaded from elsewhere, nothing sent anywhere but /status.
PAGE_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'sha256-%s'; connect-src 'self'; "
     "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
     % base64.b64encode(hashlib.sha256(PAGE_STYLE.encode()).digest()).decode()),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-cache"),
]


# --------------------------------------------------------------------------------------------
# Front ends: how a client's request maps onto a Responses request, and how the
# Responses events map back (a transform), into the sink the client asked for
# --------------------------------------------------------------------------------------------

class ResponsesFrontEnd:
    """Responses as is: the request goes as the client sent it (rewritten for the backend),
    its events come back as they came; a finished response is kept for
    previous_response_id."""

    keeps = True

    def __init__(self, body, headers):
        self.body = body
        self.stream = body.get("stream") is True

    def responses_body(self, app):
        return self.body

    def note_model(self, client, request):
        note_model_sent(client, self.body, request)

    def transform(self, answer, log):
        return ResponsesTransform(log)

    def sink(self, client, transform):
        return SSESink(client) if self.stream else CollectedSink(client)


class ChatFrontEnd(ResponsesFrontEnd):
    """Chat Completions: the chat request as a Responses one (chat_to_responses), the events
    as chat chunks or one chat completion (ChatTransform)."""

    keeps = False

    def responses_body(self, app):
        return chat_to_responses(self.body)

    def transform(self, answer, log):
        options = self.body.get("stream_options")
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) \
            else False
        return ChatTransform(self.body.get("model"), include_usage, log)


class MessagesFrontEnd(ResponsesFrontEnd):
    """Anthropic Messages: the request as a Responses one (messages_to_responses), the events
    as Messages events or one message (MessagesTransform); a stop sequence cuts the
    upstream."""

    keeps = False

    def __init__(self, body, headers):
        super().__init__(body, headers)
        self.headers = headers
        self.stops = ()

    def responses_body(self, app):
        upstream_body = app.model_names.with_name_effort_first(
            messages_to_responses(self.body, self.headers))
        self.stops = messages_stop_sequences(self.body)
        return upstream_body

    def note_model(self, client, request):
        model = request.body.get("model")
        if model != self.body["model"]:  # the log says where a name went
            client.log_fields["model"] = "%s->%s" % (self.body["model"], model)

    def transform(self, answer, log):
        return MessagesTransform(MessagesStream(self.body["model"], long_tool_names(self.body),
                                                self.stops, streaming=self.stream),
                                 log, cut=answer.close)

    def sink(self, client, transform):
        return MessagesSSESink(client, transform) if self.stream else CollectedSink(client)


# --------------------------------------------------------------------------------------------
# Front ends: Responses requests rewritten for the backend (pure)
# --------------------------------------------------------------------------------------------

# Left out before the first try: the backend answers 400 "Unsupported parameter" to each (the
# first four seen live, the others reported during 2026). Others it rejects are learned from
# that answer (see unsupported_parameter), at the cost of one round trip per model.
REJECTED_PARAMS = ("max_output_tokens", "max_completion_tokens", "temperature", "top_p",
                   "prompt_cache_retention", "safety_identifier", "user", "context_management",
                   "truncation", "metadata")
# The backend refuses every service_tier but this one ("Unsupported service_tier: flex").
ACCEPTED_SERVICE_TIER = "priority"
# Never dropped on an "Unsupported parameter" answer: without them the request means something
# else, and the client should hear of the refusal instead.
ESSENTIAL_PARAMS = ("model", "input", "instructions", "stream", "store", "tools", "tool_choice",
                    "reasoning", "text", "include", "prompt", "images", "mask")


_SEED_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def derive_session_id(model, instructions, first_item):
    """A stable id for one conversation: its turns share the model, the instructions and the
    first input item, so they land on the same backend prompt cache."""
    # The JSON text of the three, hashed as it is made (the text json.dumps would give): a
    # 30 MB first item costs no joined copy of it, nor one in UTF-8.
    digest = hashlib.sha256()
    for chunk in _SEED_ENCODER.iterencode([model, instructions, first_item]):
        for start in range(0, len(chunk), 1 << 20):
            digest.update(chunk[start:start + (1 << 20)].encode())
    return str(uuid.UUID(bytes=digest.digest()[:16], version=4))


def input_list(value):
    """A request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    return list(value) if isinstance(value, list) else []


def rewrite_request(body, default_instructions, session_id=None, drop=(), history=None):
    """A client's Responses request -> (what the Codex backend accepts, the session id).

    Pure: `body` is left untouched. `session_id` is the client's own (from its headers);
    `drop` holds further parameters the backend was seen to reject; `history` the items of
    the conversation named by previous_response_id, which the backend does not keep."""
    out = dict(body)
    for name in REJECTED_PARAMS:
        out.pop(name, None)
    for name in drop:
        out.pop(name, None)
    if out.get("service_tier") != ACCEPTED_SERVICE_TIER:
        out.pop("service_tier", None)  # see service_tier_warning()
    previous = out.pop("previous_response_id", None)
    if previous is not None and history is None:
        raise unknown_response_error(previous)
    out["stream"] = True
    out["store"] = False

    instructions = out.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ProxyError(400, "`instructions` must be a string.", param="instructions",
                         code="invalid_type")
    if not instructions or not instructions.strip():
        out["instructions"] = default_instructions

    items = out.get("input")
    if isinstance(items, str):
        items = input_list(items)
    elif items is None:
        items = []
    elif not isinstance(items, list):
        raise ProxyError(400, "`input` must be a string or a list of items.", param="input",
                         code="invalid_type")
    elif any(isinstance(item, dict) and item.get("role") == "system" for item in items):
        items = [dict(item, role="developer")  # the backend refuses role "system"
                 if isinstance(item, dict) and item.get("role") == "system" else item
                 for item in items]
    if history:
        items = list(history) + items
    out["input"] = items

    for name, kind, label in (("model", str, "a string"), ("tools", list, "a list"),
                              ("include", list, "a list"), ("reasoning", dict, "an object"),
                              ("text", dict, "an object")):
        if name in out and out[name] is not None and not isinstance(out[name], kind):
            raise ProxyError(400, "`%s` must be %s." % (name, label), param=name,
                             code="invalid_type")

    cache_key = out.get("prompt_cache_key")
    if not session_id:
        session_id = cache_key if isinstance(cache_key, str) and cache_key else None
    if not session_id:
        session_id = derive_session_id(out.get("model"), out["instructions"],
                                       items[0] if items else None)
    if not cache_key:
        out["prompt_cache_key"] = session_id
    return out, session_id


def service_tier_warning(body):
    """(key, message) for Log.warn_once when the client asked for a service_tier the backend
    refuses, which rewrite_request() leaves out; else None. One key for every such tier: the
    rule is said once, not once per value a client makes up."""
    tier = body.get("service_tier")
    if tier is None or tier == ACCEPTED_SERVICE_TIER:
        return None
    shown = json.dumps(tier)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return ("service_tier", "the backend accepts only service_tier %s; requests asking for "
            "another (here %s) are sent without one" % (json.dumps(ACCEPTED_SERVICE_TIER), shown))


def unknown_response_error(response_id):
    return ProxyError(400,
                      "The proxy does not know response %r: it keeps conversations in memory, "
                      "so a restart forgets them (unless it runs with --state-db), and past its "
                      "size cap it drops the least recently used. Send the whole conversation "
                      "in `input` instead." % (response_id,), param="previous_response_id",
                      code="previous_response_not_found")


UNSUPPORTED_PARAM_RE = re.compile(r"Unsupported parameter:\s*'?([A-Za-z0-9_.\[\]-]+)'?")


def unsupported_parameter(status, body):
    """The X of a backend 400 "Unsupported parameter: X", else None."""
    if status != 400:
        return None
    m = UNSUPPORTED_PARAM_RE.search(body.decode("utf-8", "replace"))
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------
# Front ends: reasoning effort in a model name (pure): "gpt-5.5-high" or "gpt-5.5(high)"
# is gpt-5.5 with reasoning.effort "high", for clients that can only name a model
# --------------------------------------------------------------------------------------------

# The efforts the Codex CLI knows. Only these make a "-suffix" an effort: a name like
# "gpt-5.1-codex-mini" must not cost a model-list lookup, nor be read as an effort "mini".
KNOWN_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_PAREN_EFFORT_RE = re.compile(r"(.+)\(([A-Za-z]{1,20})\)\Z", re.S)


def effort_in_name(name):
    """(model, effort) when name has the shape of MODEL(EFFORT), any word in the parentheses,
    or MODEL-EFFORT with a known effort; else None. Whether MODEL is a model is not asked
    here."""
    if not isinstance(name, str):
        return None
    m = _PAREN_EFFORT_RE.match(name)
    if m:
        return m.group(1).rstrip(), m.group(2).lower()
    model, dash, effort = name.rpartition("-")
    if dash and model and effort.lower() in KNOWN_EFFORTS:
        return model, effort.lower()
    return None


class ModelCatalog:
    """The backend's model list as fetched: every model it names, whatever its visibility
    (a hidden one is still a name that must never be split), with its reasoning efforts."""

    def __init__(self, models, fetched_at):
        self.models = [m for m in models if isinstance(m, dict) and isinstance(m.get("slug"),
                                                                               str)]
        self.created = int(fetched_at)
        self.efforts = {m["slug"]: tuple(
            level["effort"] for level in m.get("supported_reasoning_levels") or ()
            if isinstance(level, dict) and isinstance(level.get("effort"), str))
            for m in self.models}

    def listed(self):
        """The slugs of the models a model picker should show, in the backend's order."""
        return [m["slug"] for m in self.models if m.get("visibility") == "list"]

    def openai_list(self, with_efforts=False):
        """GET /v1/models in OpenAI's shape; with_efforts adds MODEL-EFFORT for each effort a
        listed model offers (--list-effort-models)."""
        ids = []
        for slug in self.listed():
            ids.append(slug)
            if with_efforts:
                ids.extend(v for v in ("%s-%s" % (slug, e) for e in self.efforts[slug])
                           if v not in self.efforts)
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": self.created, "owned_by": "openai"}
            for i in ids]}


def model_with_effort(body, catalog):
    """A Responses request whose model names an effort (see effort_in_name) -> the request
    for the model alone, with that reasoning.effort unless the request sets its own. A name
    the backend lists is never split; nor is one whose MODEL it does not list (the backend
    then says the model is unknown). An effort MODEL does not offer is a 400 naming those it
    does. catalog() -> the ModelCatalog, or None when there is none to be had (the name then
    goes as it is); asked only for a name of that shape. Pure: body is left untouched."""
    name = body.get("model")
    parts = effort_in_name(name)
    if parts is None:
        return body
    known = catalog()
    if known is None or name in known.efforts or parts[0] not in known.efforts:
        return body
    model, effort = parts
    offered = known.efforts[model]
    if effort not in offered:
        raise ProxyError(
            400, "Model %r has no reasoning effort %r%s. Name it as MODEL-EFFORT or "
            "MODEL(EFFORT) with one of its efforts, or set reasoning.effort."
            % (model, effort, "; it offers: " + ", ".join(offered) if offered
               else "; it offers none to choose from"), param="model", code="unsupported_value")
    out = dict(body, model=model)
    reasoning = body.get("reasoning")
    if reasoning is None:
        out["reasoning"] = {"effort": effort}
    elif isinstance(reasoning, dict) and reasoning.get("effort") is None:
        out["reasoning"] = dict(reasoning, effort=effort)
    return out


def note_model_sent(client, body, request):
    """The log and /status say "asked->sent" when --model-map or an effort in the name
    changed the model, so tokens per model count what the backend served."""
    asked, sent = body.get("model"), request.body.get("model")
    if isinstance(asked, str) and isinstance(sent, str) and sent != asked:
        client.log_fields["model"] = "%s->%s" % (asked, sent)


# --------------------------------------------------------------------------------------------
# Front ends: Chat Completions (pure): a chat request in Responses terms, and the answer
# back in chat shape
# --------------------------------------------------------------------------------------------

def _chat_error(message, param="messages"):
    return ProxyError(400, message, param=param, code="invalid_value")


def _chat_text(content, where):
    """A message's content as plain text: a string, or the text of its parts. Only text parts
    can become text (an assistant's refusal parts are left out)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _chat_error("%s: content must be a string or a list of parts." % where,
                          where + ".content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text"):
            texts.append(_chat_part_text(part, "%s.content[%d]" % (where, j)))
        elif kind != "refusal":
            raise _chat_error("%s.content[%d]: parts of type %r cannot stand in this message; "
                              "it takes text parts only." % (where, j, kind),
                              "%s.content[%d]" % (where, j))
    return "".join(texts)


def _chat_part_text(part, where):
    text = part.get("text")
    if text is not None and not isinstance(text, str):
        raise _chat_error("%s.text must be a string." % where, where + ".text")
    return text or ""


def _chat_user_parts(content, where):
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _chat_error("%s: content must be a string or a list of parts." % where,
                          where + ".content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "input_text",
                          "text": _chat_part_text(part, "%s.content[%d]" % (where, j))})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise _chat_error("%s: image_url needs a url." % where)
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append({"type": "input_image", "image_url": url, "detail": detail or "auto"})
        else:
            raise _chat_error("%s: content parts of type %r are not supported; use text or "
                              "image_url." % (where, kind))
    return parts


def _chat_tool(tool, where):
    if not isinstance(tool, dict) or tool.get("type") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise _chat_error("Only tools of type function are supported.", "tools")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str):
        raise _chat_error("%s.function.name must be a string." % where, where + ".function.name")
    out = {"type": "function", "name": fn["name"],
           "parameters": fn.get("parameters") or {"type": "object", "properties": {}}}
    for key in ("description", "strict"):
        if key in fn:
            out[key] = fn[key]
    return out


def _chat_tool_calls(calls, where):
    """An assistant message's tool_calls as function_call items."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise _chat_error("%s.tool_calls must be a list." % where, where + ".tool_calls")
    items = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise _chat_error("%s: each tool call needs an id and a function." % where)
        name, arguments = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, (str, type(None))):
            param = "%s.tool_calls[%d].function.%s" % (
                where, j, "name" if not isinstance(name, str) else "arguments")
            raise _chat_error("%s must be a string." % param, param)
        items.append({"type": "function_call", "call_id": call["id"], "name": name,
                      "arguments": arguments or "{}"})
    return items


def _chat_tool_choice(choice):
    """tool_choice in Responses terms: a string as it is, a named function flattened."""
    if choice is None or isinstance(choice, str):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or \
            not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _chat_error("`tool_choice` must be \"none\", \"auto\", \"required\" or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                          "tool_choice")
    return {"type": "function", "name": fn["name"]}


def _chat_text_format(fmt):
    """response_format as the Responses text.format."""
    if not isinstance(fmt, dict):
        raise _chat_error("`response_format` must be an object.", "response_format")
    if fmt.get("type") != "json_schema":
        return {"type": fmt.get("type")}
    schema = fmt.get("json_schema")
    if not isinstance(schema, dict):
        raise _chat_error("`response_format.json_schema` must be an object (name, schema, "
                          "strict).", "response_format.json_schema")
    return dict(schema, type="json_schema")


def chat_to_responses(body):
    """A Chat Completions request -> the same request as a Responses one. Leading system and
    developer messages become the instructions, later ones developer items (the backend
    refuses role "system"); tool calls and results become function_call items."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _chat_error("`messages` must be a non-empty list.")
    if body.get("n") not in (None, 1):
        raise _chat_error("n > 1 is not supported: the backend gives one answer per request.",
                          "n")
    instructions, items = [], []
    for i, message in enumerate(messages):
        where = "messages[%d]" % i
        if not isinstance(message, dict):
            raise _chat_error("%s must be an object." % where)
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            text = _chat_text(content, where)
            if not items:
                instructions.append(text)
            else:
                items.append({"type": "message", "role": "developer",
                              "content": [{"type": "input_text", "text": text}]})
        elif role == "user":
            items.append({"type": "message", "role": "user",
                          "content": _chat_user_parts(content, where)})
        elif role == "assistant":
            text = _chat_text(content, where)
            if text:
                items.append({"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": text}]})
            items += _chat_tool_calls(message.get("tool_calls"), where)
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise _chat_error("%s: a tool message needs tool_call_id." % where)
            items.append({"type": "function_call_output", "call_id": message["tool_call_id"],
                          "output": _chat_text(content, where)})
        else:
            raise _chat_error("%s: role %r is not supported." % (where, role))
    out = {"model": body.get("model"), "input": items}
    if any(instructions):
        out["instructions"] = "\n\n".join(t for t in instructions if t)
    if body.get("tools") is not None:
        if not isinstance(body["tools"], list):
            raise _chat_error("`tools` must be a list.", "tools")
        out["tools"] = [_chat_tool(t, "tools[%d]" % i) for i, t in enumerate(body["tools"])]
    choice = _chat_tool_choice(body.get("tool_choice"))
    if choice is not None:
        out["tool_choice"] = choice
    for key in ("parallel_tool_calls", "prompt_cache_key", "service_tier"):
        if key in body:
            out[key] = body[key]
    if body.get("response_format") is not None:
        out["text"] = {"format": _chat_text_format(body["response_format"])}
    if body.get("verbosity") is not None:
        out.setdefault("text", {})["verbosity"] = body["verbosity"]
    if body.get("reasoning_effort") is not None:
        # Asking for reasoning: its summary comes back as reasoning_content.
        out["reasoning"] = {"effort": body["reasoning_effort"], "summary": "auto"}
    return out


def chat_usage(usage):
    usage = usage if isinstance(usage, dict) else {}
    return {"prompt_tokens": usage.get("input_tokens", 0),
            "completion_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": (usage.get("input_tokens_details")
                                                        or {}).get("cached_tokens", 0)},
            "completion_tokens_details": {"reasoning_tokens": (usage.get(
                "output_tokens_details") or {}).get("reasoning_tokens", 0)}}


def chat_finish_reason(response, has_calls):
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if has_calls else "stop"


def chat_completion(response, output):
    """A finished Responses answer as a chat.completion object."""
    text, calls, reasoning = [], [], []
    for item in output:
        kind = item.get("type")
        if kind == "message":
            text.extend(part.get("text") or "" for part in item.get("content") or []
                        if part.get("type") == "output_text")
        elif kind == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function",
                          "function": {"name": item.get("name"),
                                       "arguments": item.get("arguments") or ""}})
        elif kind == "reasoning":
            reasoning.extend(part.get("text") or "" for part in item.get("summary") or [])
    message = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "\n\n".join(reasoning)
    return {"id": "chatcmpl-" + str(response.get("id") or uuid.uuid4().hex),
            "object": "chat.completion", "created": response.get("created_at")
            or int(time.time()), "model": response.get("model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": chat_finish_reason(response, calls)}],
            "usage": chat_usage(response.get("usage"))}


class ChatStream:
    """Responses stream events -> chat.completion.chunk frames, each as soon as its event."""

    def __init__(self, model, include_usage):
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.started = False
        self.calls = {}  # function call item id -> tool_calls index

    def chunk(self, delta, finish_reason=None):
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish_reason}]}

    def frames(self, etype, payload):
        chunks = []
        if etype == "response.created":
            response = payload.get("response") or {}
            if response.get("id"):
                self.id = "chatcmpl-" + str(response["id"])
            self.model = response.get("model") or self.model
            if isinstance(response.get("created_at"), int):
                self.created = response["created_at"]  # as the non-streamed answer has it
        if not self.started and etype not in ("error", "response.failed"):
            self.started = True
            chunks.append(self.chunk({"role": "assistant", "content": ""}))
        item = payload.get("item") if isinstance(payload.get("item"), dict) else {}
        if etype == "response.output_text.delta":
            chunks.append(self.chunk({"content": payload.get("delta") or ""}))
        elif etype == "response.reasoning_summary_text.delta":
            chunks.append(self.chunk({"reasoning_content": payload.get("delta") or ""}))
        elif etype in ("response.output_item.added", "response.output_item.done") and \
                item.get("type") == "function_call" and item.get("id") not in self.calls:
            index = self.calls[item.get("id")] = len(self.calls)
            # The arguments come as deltas after "added"; a call first seen "done" has them all.
            arguments = item.get("arguments") or "" if etype.endswith(".done") else ""
            chunks.append(self.chunk({"tool_calls": [{
                "index": index, "id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": arguments}}]}))
        elif etype == "response.function_call_arguments.delta" and \
                payload.get("item_id") in self.calls:
            chunks.append(self.chunk({"tool_calls": [{
                "index": self.calls[payload["item_id"]],
                "function": {"arguments": payload.get("delta") or ""}}]}))
        elif etype in ("response.completed", "response.incomplete"):
            response = payload.get("response") or {}
            chunks.append(self.chunk({}, chat_finish_reason(response, bool(self.calls))))
            if self.include_usage:
                usage = self.chunk({})
                usage["choices"] = []
                usage["usage"] = chat_usage(response.get("usage"))
                chunks.append(usage)
            return [sse_data(c) for c in chunks] + [b"data: [DONE]\n\n"]
        elif etype in ("response.failed", "error"):
            error = (payload.get("response") or {}).get("error") if etype != "error" else payload
            return [sse_data(c) for c in chunks] + self.error(
                (error or {}).get("code") or "response_failed",
                (error or {}).get("message") or "The backend reported a failure.")
        return [sse_data(c) for c in chunks]

    def error(self, code, message):
        """The end of a stream that failed after it started: an error chunk, then [DONE]."""
        return [sse_data({"error": {"message": message, "type": "server_error" if
                                    failure_status(code) >= 500 else "invalid_request_error",
                                    "param": None, "code": code}}), b"data: [DONE]\n\n"]


def sse_data(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# --------------------------------------------------------------------------------------------
# Front ends: Anthropic Messages (pure): a Messages request in Responses terms, the
# answer back in Anthropic's shape, its errors, and the model names Claude clients ask for
# --------------------------------------------------------------------------------------------

# Claude Code's first system block; its suffix changes every request, so sent on it would
# make every request's prompt new to the backend's cache.
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
# A thinking block's signature that carries a reasoning item's encrypted_content. Anything
# else in a replayed signature (a real Anthropic one, a peer's) cannot be read back here.
THINKING_SIGNATURE_PREFIX = "codex-reasoning:"
MAX_TOOL_NAME = 64  # the backend's limit on function names
# Anthropic's effort levels (output_config.effort) in Responses terms.
MESSAGES_EFFORT = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh",
                   "xhigh": "xhigh", "minimal": "minimal", "none": "none"}
# Anthropic's error type for each status (its API reference); 503 is reported as its 529.
MESSAGES_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                        403: "permission_error", 404: "not_found_error",
                        413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                        529: "overloaded_error"}
# The backend's phrase for a context overflow; Claude Code compacts on it (or "prompt is
# too long") instead of retrying.
CONTEXT_OVERFLOW_PHRASE = "Your input exceeds the context window of this model."
_CONTEXT_OVERFLOW_RE = re.compile(r"context window|context_length|prompt is too long", re.I)
_RETRY_IN_RE = re.compile(r"try again in ([0-9.]+)\s*(ms|s)", re.I)
_SESSION_IN_USER_ID_RE = re.compile(r"session_([0-9a-fA-F-]{36})")

# Model names: the defaults behind --model-map, so that Claude Code's own names work. The
# targets are resolved against the backend's model list (see pick_default_models).
STRONGEST_MODEL = ":strongest"
SMALL_MODEL = ":small"
DEFAULT_MODEL_RULES = (("*haiku*", SMALL_MODEL), ("*sonnet*", STRONGEST_MODEL),
                       ("*opus*", STRONGEST_MODEL), ("claude-*", STRONGEST_MODEL))
# Used when the backend's model list cannot be had.
FALLBACK_MODELS = {STRONGEST_MODEL: "gpt-5.5", SMALL_MODEL: "gpt-5.4-mini"}
_SMALL_MODEL_RE = re.compile(r"mini|nano|spark|small")
_MODEL_VERSION_RE = re.compile(r"(\d+(?:\.\d+)?)")


def model_map_arg(text):
    """--model-map PATTERN=MODEL -> (pattern, model)."""
    pattern, sep, model = text.rpartition("=")
    if not sep or not pattern.strip() or not model.strip():
        raise argparse.ArgumentTypeError("expected PATTERN=MODEL (e.g. 'claude-*haiku*="
                                         "gpt-5.4-mini'), got %r" % text)
    return pattern.strip(), model.strip()


def pick_default_models(slugs):
    """{STRONGEST_MODEL: slug, SMALL_MODEL: slug} from the backend's listed models: the
    highest version that is not a small variant, and the highest small one (else the
    strongest). Among equals the first listed wins: the backend lists by priority."""
    def version(slug):  # (5, 10) after (5, 9)
        m = _MODEL_VERSION_RE.search(slug)
        return tuple(int(part) for part in m.group(1).split(".")) if m else ()

    small = [s for s in slugs if _SMALL_MODEL_RE.search(s)]
    large = [s for s in slugs if s not in small]
    picked = dict(FALLBACK_MODELS)
    if large:
        picked[STRONGEST_MODEL] = max(large, key=version)  # max keeps the first of equals
    if small:
        picked[SMALL_MODEL] = max(small, key=version)
    elif large:
        picked[SMALL_MODEL] = picked[STRONGEST_MODEL]
    return picked


def map_model(name, rules, listed):
    """The model a request asks for -> the model sent upstream: the first of rules (the
    --model-map ones, then DEFAULT_MODEL_RULES) whose shell-style pattern matches, else the
    name as it is. listed() gives the backend's model slugs; it is called only when a default
    rule needs them."""
    if not isinstance(name, str):
        return name
    for pattern, target in rules:
        if fnmatch.fnmatchcase(name, pattern):
            if target in (STRONGEST_MODEL, SMALL_MODEL):
                return pick_default_models(listed())[target]
            return target
    return name


def _messages_error(message):
    return ProxyError(400, message, code="invalid_request_error")


def shorten_tool_name(name):
    """A function name the backend takes (at most 64 characters); the same long name always
    gives the same short one, so history and answers can be mapped back."""
    if len(name) <= MAX_TOOL_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return name[:MAX_TOOL_NAME - 9] + "_" + digest


def long_tool_names(body):
    """{short name: original} for the request's tools whose names had to be shortened."""
    names = {}
    for tool in body.get("tools") or ():
        name = tool.get("name") if isinstance(tool, dict) else None
        if isinstance(name, str) and len(name) > MAX_TOOL_NAME:
            names[shorten_tool_name(name)] = name
    return names


def _messages_text(content, where):
    """A system prompt or system message as plain text: a string, or its text blocks (the
    billing-header block left out)."""
    if isinstance(content, str):
        return "" if content.startswith(BILLING_HEADER_PREFIX) else content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise _messages_error("%s must be a string or a list of text blocks." % where)
    texts = []
    for block in content:
        if not isinstance(block, dict):
            raise _messages_error("%s: each block must be an object." % where)
        text = block.get("text")
        if block.get("type") == "text" and isinstance(text, str) and \
                not text.startswith(BILLING_HEADER_PREFIX):
            texts.append(text)
    return "\n\n".join(t for t in texts if t)


def _source_url(source, where):
    """An image or document source as a URL the backend takes: data: for base64."""
    if not isinstance(source, dict):
        raise _messages_error("%s needs a source." % where)
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str):
        return "data:%s;base64,%s" % (source.get("media_type") or "application/octet-stream",
                                     source["data"])
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise _messages_error("%s: only base64 and url sources are supported (got %r)."
                          % (where, kind))


def _messages_document(block, where):
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "text":
        return {"type": "input_text", "text": source.get("data") or ""}
    if isinstance(source, dict) and source.get("type") == "content":
        parts = source.get("content")
        text = parts if isinstance(parts, str) else _messages_text(parts, where)
        return {"type": "input_text", "text": text}
    url = _source_url(source, where)
    if url.startswith("data:"):
        return {"type": "input_file", "filename": block.get("title") or "document.pdf",
                "file_data": url}
    return {"type": "input_file", "file_url": url}


def _messages_input_part(block, where):
    """A user block (text, image, document) as a Responses content part; None for blocks
    that carry nothing for the model (Anthropic-only kinds)."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise _messages_error("%s.text must be a string." % where)
        return {"type": "input_text", "text": text}
    if kind == "image":
        return {"type": "input_image", "image_url": _source_url(block.get("source"), where),
                "detail": "auto"}
    if kind == "document":
        return _messages_document(block, where)
    return None


def _tool_result_output(block, where):
    """A tool_result's content as a function_call_output's output: text as a string, or
    parts when it holds images. is_error is said in words: Responses has no such flag."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        output = content or ""
        return "Error: " + output if block.get("is_error") else output
    if not isinstance(content, list):
        raise _messages_error("%s.content must be a string or a list of blocks." % where)
    parts = []
    for j, inner in enumerate(content):
        if not isinstance(inner, dict):
            raise _messages_error("%s.content[%d] must be an object." % (where, j))
        part = _messages_input_part(inner, "%s.content[%d]" % (where, j))
        if part is not None:
            parts.append(part)
    if all(p["type"] == "input_text" for p in parts):
        text = "\n".join(p["text"] for p in parts)
        return "Error: " + text if block.get("is_error") else text
    if block.get("is_error"):
        parts.insert(0, {"type": "input_text", "text": "Error:"})
    return parts


def reasoning_from_thinking(block):
    """A replayed thinking block as the reasoning item it came from; None when its signature
    is not one of ours (it cannot be read back, and the backend would refuse it)."""
    signature = block.get("signature")
    if not isinstance(signature, str) or not signature.startswith(THINKING_SIGNATURE_PREFIX) \
            or len(signature) == len(THINKING_SIGNATURE_PREFIX):
        return None
    text = block.get("thinking")
    summary = [{"type": "summary_text", "text": text}] if isinstance(text, str) and text else []
    return {"type": "reasoning", "summary": summary,
            "encrypted_content": signature[len(THINKING_SIGNATURE_PREFIX):]}


def _messages_user_items(content, where):
    """A user message's blocks -> items in order: its content as user messages, each
    tool_result a function_call_output where it stands."""
    if isinstance(content, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": content}]}]
    if not isinstance(content, list):
        raise _messages_error("%s.content must be a string or a list of blocks." % where)
    items, parts = [], []
    for j, block in enumerate(content):
        at = "%s.content[%d]" % (where, j)
        if not isinstance(block, dict):
            raise _messages_error("%s must be an object." % at)
        if block.get("type") == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise _messages_error("%s needs a tool_use_id." % at)
            if parts:
                items.append({"type": "message", "role": "user", "content": parts})
                parts = []
            items.append({"type": "function_call_output", "call_id": block["tool_use_id"],
                          "output": _tool_result_output(block, at)})
            continue
        part = _messages_input_part(block, at)
        if part is not None:
            parts.append(part)
    if parts:
        items.append({"type": "message", "role": "user", "content": parts})
    return items


def _messages_assistant_items(content, where):
    """An assistant turn replayed -> its text, reasoning and function_call items in order.
    Thinking without our signature, redacted_thinking and server tool blocks are dropped:
    the backend cannot take them back."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _messages_error("%s.content must be a string or a list of blocks." % where)
    items, texts = [], []

    def flush():
        if texts:
            items.append({"type": "message", "role": "assistant",
                          "content": [{"type": "output_text", "text": t} for t in texts]})
            del texts[:]

    for j, block in enumerate(content):
        at = "%s.content[%d]" % (where, j)
        if not isinstance(block, dict):
            raise _messages_error("%s must be an object." % at)
        kind = block.get("type")
        if kind == "text":
            if isinstance(block.get("text"), str) and block["text"]:
                texts.append(block["text"])
        elif kind == "thinking":
            item = reasoning_from_thinking(block)
            if item is not None:
                flush()
                items.append(item)
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _messages_error("%s: a tool_use block needs an id and a name." % at)
            flush()
            items.append({"type": "function_call", "call_id": block["id"],
                          "name": shorten_tool_name(block["name"]),
                          "arguments": json.dumps(block.get("input") or {},
                                                  separators=(",", ":"))})
    flush()
    return items


def _clean_schema(schema):
    """A tool's input_schema as the backend takes it: without $schema, an object always."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}}
    return {k: v for k, v in schema.items() if k not in ("$schema", "cache_control")}


def _messages_tool(tool, where):
    """A Messages tool -> a Responses tool; None for Anthropic-only server tools."""
    if not isinstance(tool, dict):
        raise _messages_error("%s must be an object." % where)
    kind = tool.get("type")
    if isinstance(kind, str) and kind.startswith("web_search"):
        out = {"type": "web_search"}
        if isinstance(tool.get("allowed_domains"), list):
            out["filters"] = {"allowed_domains": tool["allowed_domains"]}
        location = tool.get("user_location")
        if isinstance(location, dict):
            out["user_location"] = dict({k: v for k, v in location.items() if k != "type"},
                                        type="approximate")
        return out
    if kind not in (None, "custom"):
        return None  # bash_*, text_editor_*, computer_*, code_execution_*: Anthropic's own
    if not isinstance(tool.get("name"), str):
        raise _messages_error("%s.name must be a string." % where)
    out = {"type": "function", "name": shorten_tool_name(tool["name"]),
           "parameters": _clean_schema(tool.get("input_schema")), "strict": False}
    if isinstance(tool.get("description"), str):
        out["description"] = tool["description"]
    return out


def _messages_tool_choice(choice):
    if not isinstance(choice, dict):
        raise _messages_error("`tool_choice` must be an object such as {\"type\": \"auto\"}.")
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _messages_error("`tool_choice` of type tool needs a name.")
        return {"type": "function", "name": shorten_tool_name(choice["name"])}
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if mapped is None:
        raise _messages_error("`tool_choice.type` must be auto, any, tool or none.")
    return mapped


def messages_effort(body):
    """reasoning.effort for the request's thinking budget or output_config.effort; None
    leaves the model's default."""
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if isinstance(effort, str) and effort in MESSAGES_EFFORT:
        return MESSAGES_EFFORT[effort]
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool):
            return ("low" if budget < 4096 else "medium" if budget < 16384 else
                    "high" if budget < 32000 else "xhigh")
    return None


def messages_session_id(body, headers):
    """The conversation's id for the backend's prompt cache: Claude Code's session header
    (one per run; a subagent's id added, as its prompt differs), else the session named in
    metadata.user_id."""
    session = headers.get("x-claude-code-session-id")
    if not session:
        metadata = body.get("metadata")
        user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
        if isinstance(user_id, str):
            try:
                parsed = json.loads(user_id)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str):
                session = parsed["session_id"]
            else:
                m = _SESSION_IN_USER_ID_RE.search(user_id)
                session = m.group(1) if m else None
    if not session:
        return None
    agent = headers.get("x-claude-code-agent-id")
    if agent:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "claude-code:%s:%s" % (session, agent)))
    return session[:64]


def messages_to_responses(body, headers):
    """An Anthropic Messages request -> one Responses request. System blocks become the
    instructions (the billing header dropped); role "system" messages anywhere become
    developer messages where they stand; text, images and PDFs become content parts;
    tool_use and tool_result become function_call and function_call_output; a thinking block
    with our signature becomes its reasoning item again. Sampling parameters, metadata,
    max_tokens and stop_sequences are not sent (the backend refuses them; the proxy itself
    honours stop_sequences)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _messages_error("`messages` must be a non-empty list.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _messages_error("`model` must be a string, such as claude-sonnet-4-5 or a Codex "
                              "model name.")
    items = []
    for i, message in enumerate(messages):
        where = "messages[%d]" % i
        if not isinstance(message, dict):
            raise _messages_error("%s must be an object." % where)
        role, content = message.get("role"), message.get("content")
        if role == "user":
            items += _messages_user_items(content, where)
        elif role == "assistant":
            items += _messages_assistant_items(content, where)
        elif role == "system":
            text = _messages_text(content, where)
            if text:
                items.append({"type": "message", "role": "developer",
                              "content": [{"type": "input_text", "text": text}]})
        else:
            raise _messages_error("%s.role must be user, assistant or system (got %r)."
                                  % (where, role))
    out = {"model": body["model"], "input": items,
           "include": ["reasoning.encrypted_content"]}
    instructions = _messages_text(body.get("system"), "system")
    if instructions:
        out["instructions"] = instructions
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _messages_error("`tools` must be a list.")
        mapped = [_messages_tool(t, "tools[%d]" % i) for i, t in enumerate(tools)]
        out["tools"] = [t for t in mapped if t is not None]
    choice = body.get("tool_choice")
    if choice is not None:
        out["tool_choice"] = _messages_tool_choice(choice)
    if out.get("tools"):
        out["parallel_tool_calls"] = not (isinstance(choice, dict) and
                                          choice.get("disable_parallel_tool_use") is True)
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    reasoning = {}
    effort = messages_effort(body)
    if effort:
        reasoning["effort"] = effort
    if thinking.get("type") in ("enabled", "adaptive") and thinking.get("display") != "omitted":
        reasoning["summary"] = "auto"
    if reasoning:
        out["reasoning"] = reasoning
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["text"] = {"format": {"type": "json_schema", "name": "output",
                                  "schema": fmt.get("schema") or {}, "strict": False}}
    session = messages_session_id(body, headers)
    if session:
        out["prompt_cache_key"] = session
    return out


def messages_stop_sequences(body):
    """The request's stop_sequences: non-empty strings only."""
    stops = body.get("stop_sequences")
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _messages_error("`stop_sequences` must be a list of strings.")
    return [s for s in stops if s]


def messages_usage(usage, estimated_output=0):
    """Responses usage in Anthropic's terms: input_tokens without the cached part, which is
    cache_read_input_tokens."""
    usage = usage if isinstance(usage, dict) else {}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
    total_in = usage.get("input_tokens") or 0
    return {"input_tokens": max(0, total_in - cached), "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": usage.get("output_tokens") or estimated_output}


def messages_stop_reason(response, has_tool_use, refused):
    if refused:
        return "refusal"
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "refusal" if reason == "content_filter" else "max_tokens"
    return "tool_use" if has_tool_use else "end_turn"


def estimate_tokens(responses_body):
    """A local estimate of a request's input tokens: about four characters a token, and a
    flat cost per image or file (their base64 says little about what they cost)."""
    flat = [0]

    def strip(value):
        if isinstance(value, dict):
            if value.get("type") in ("input_image", "input_file"):
                flat[0] += 1600
                return None
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    text = json.dumps([responses_body.get("instructions"), strip(responses_body.get("input")),
                       responses_body.get("tools")], ensure_ascii=False)
    return len(text) // 4 + flat[0]


def anthropic_model_list(listing):
    """An OpenAI-shaped model list as Anthropic's /v1/models answers it."""
    now = rfc3339_now()
    data = [{"type": "model", "id": m["id"], "display_name": m["id"], "created_at": now}
            for m in listing.get("data") or () if isinstance(m, dict) and "id" in m]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _retry_after_seconds(err):
    """Seconds until a 429 may be tried again: a usage limit's reset, or the backend's "try
    again in 11.054s"; None when it says neither."""
    seconds = err.extra.get("resets_in_seconds")
    if not isinstance(seconds, (int, float)) and isinstance(err.extra.get("resets_at"),
                                                             (int, float)):
        seconds = err.extra["resets_at"] - time.time()
    if not isinstance(seconds, (int, float)):
        m = _RETRY_IN_RE.search(err.message or "")
        if m:
            seconds = float(m.group(1)) / (1000.0 if m.group(2).lower() == "ms" else 1.0)
    if not isinstance(seconds, (int, float)) or seconds != seconds or abs(seconds) > 10 ** 9:
        return None
    return max(1, int(-(-seconds // 1)))


def is_usage_limit(err):
    return err.status == 429 and (err.type in ("usage_limit_reached", "usage_not_included") or
                                  err.code in ("usage_limit_reached", "usage_not_included",
                                               "insufficient_quota"))


def anthropic_error(err):
    """A ProxyError in Anthropic's terms: (status, {"type": "error", "error": {"type",
    "message"}}, headers). A context overflow is a 400 keeping the backend's phrase (Claude
    Code then compacts); a usage limit is a 429 with retry-after and x-should-retry: false
    (Claude Code then stops instead of retrying for hours)."""
    status, message, headers = err.status, err.message, list(err.headers)
    if err.code == "context_length_exceeded" or (status == 400 and message and
                                                  _CONTEXT_OVERFLOW_RE.search(message)):
        status = 400
        if not _CONTEXT_OVERFLOW_RE.search(message or ""):
            message = CONTEXT_OVERFLOW_PHRASE + " " + (message or "")
    elif status == 503:
        status = 529
    if status == 429:
        names = {name.lower() for name, _ in headers}
        seconds = _retry_after_seconds(err)
        if seconds is not None and "retry-after" not in names:
            headers.append(("retry-after", str(seconds)))
        if is_usage_limit(err):
            headers.append(("x-should-retry", "false"))
    kind = MESSAGES_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else
                                                "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}, headers


def messages_apikey_error():
    return ProxyError(400, "The Anthropic Messages API is served on a ChatGPT login only: this "
                      "proxy runs in API-key mode, and the OpenAI platform has no Messages "
                      "API. Start the proxy without an API key (after `codex login`) to use "
                      "Claude Code.", code="messages_not_supported")


def anthropic_sse(name, obj):
    return b"event: " + name + b"\ndata: " + json.dumps(obj, separators=(",", ":")).encode() \
        + b"\n\n"


# Per block type: the backend's delta event for it, and the Messages delta it becomes.
_RAW_DELTAS = {"text": (b"response.output_text.delta", b"text_delta", b"text"),
               "thinking": (b"response.reasoning_summary_text.delta", b"thinking_delta",
                            b"thinking"),
               "tool_use": (b"response.function_call_arguments.delta", b"input_json_delta",
                            b"partial_json")}


class MessagesStream:
    """Responses stream events -> Anthropic Messages events, each as soon as its event, and
    the same blocks collected for a non-streamed answer. Text passes the stop-sequence check:
    a match ends the message there and sets .stopped, for the caller to cut the upstream.
    message_start is not among the frames: the sink sends it (opening()) when the stream
    opens, which may be before any event (a ping) or never (an early failure is a status)."""

    def __init__(self, model, tool_names=None, stop_sequences=(), streaming=True):
        self.id = "msg_" + uuid.uuid4().hex
        self.model = model
        self.tool_names = tool_names or {}
        self.stops = list(stop_sequences)
        self.keep = max([len(s) for s in self.stops] or [1]) - 1  # text held back for a match
        self.streaming = streaming
        self.content = []      # the blocks, as the non-streamed answer has them
        self.states = {}       # output_index -> what is known of its block
        self.open = None       # the state of the block being streamed
        self.has_tool_use = False
        self.refused = False
        self.stop_reason = None
        self.stop_sequence = None
        self.stopped = False   # a stop sequence ended the message before the backend did
        self.usage = messages_usage(None)
        self.text_chars = 0
        self._out = []

    # -- frames ------------------------------------------------------------------------------

    def _emit(self, name, obj):
        if self.streaming:
            self._out.append(anthropic_sse(name, obj))

    def opening(self):
        return anthropic_sse(b"message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 0}}})

    @staticmethod
    def ping():
        return anthropic_sse(b"ping", {"type": "ping"})

    def error_frame(self, err):
        _, body, _ = anthropic_error(err)
        return anthropic_sse(b"error", body)

    # -- blocks ------------------------------------------------------------------------------

    def _start(self, key, block):
        self._close()
        state = {"index": len(self.content), "type": block["type"], "closed": False,
                 "held": "", "args": "", "seen": 0, "kinds": (), "needle": b"\0"}
        if block["type"] in _RAW_DELTAS and isinstance(key, int):
            kind, delta_type, field = _RAW_DELTAS[block["type"]]
            state["kinds"] = (kind,)
            state["needle"] = b'"output_index":%d,' % key  # the backend's compact JSON
            state["prefix"] = (b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                               b'"index":%d,"delta":{"type":"%s","%s":'
                               % (state["index"], delta_type, field))
        self.content.append(dict(block))
        self.states[key] = self.open = state
        self._emit(b"content_block_start", {"type": "content_block_start",
                                            "index": state["index"], "content_block": block})
        return state

    def _delta(self, state, delta):
        self._emit(b"content_block_delta", {"type": "content_block_delta",
                                            "index": state["index"], "delta": delta})

    def _close(self):
        state, self.open = self.open, None
        if state is None:
            return
        if state["held"]:
            held, state["held"] = state["held"], ""
            self._put_text(state, held)
        block = self.content[state["index"]]
        if state["type"] == "tool_use":
            try:
                block["input"] = json.loads(state["args"]) if state["args"].strip() else {}
            except ValueError:
                block["input"] = {}
            if not isinstance(block["input"], dict):
                block["input"] = {}
        state["closed"] = True
        self._emit(b"content_block_stop", {"type": "content_block_stop",
                                           "index": state["index"]})

    def _state(self, key, block):
        """The open block for key, started if it is new; None once it was closed."""
        state = self.states.get(key)
        if state is None:
            return self._start(key, block)
        return None if state["closed"] else state

    def _put_text(self, state, text):
        if text:
            self.content[state["index"]]["text"] += text
            self.text_chars += len(text)
            self._delta(state, {"type": "text_delta", "text": text})

    def _text(self, key, text):
        state = self._state(key, {"type": "text", "text": ""})
        if state is None or not text:
            return
        state["seen"] += len(text)
        if not self.stops:
            return self._put_text(state, text)
        text = state["held"] + text
        found = [(text.find(s), -len(s), s) for s in self.stops if s in text]
        if found:
            at, _, stop = min(found)
            state["held"] = ""
            self._put_text(state, text[:at])
            self.stop_sequence = stop
            self.stopped = True
            self._finish("stop_sequence")
            return
        cut = max(0, len(text) - self.keep)
        state["held"] = text[cut:]
        self._put_text(state, text[:cut])

    def _thinking(self, key, text):
        state = self._state(key, {"type": "thinking", "thinking": "", "signature": ""})
        if state is not None and text:
            state["seen"] += len(text)
            self.content[state["index"]]["thinking"] += text
            self._delta(state, {"type": "thinking_delta", "thinking": text})

    def _tool_start(self, key, item):
        self.has_tool_use = True
        name = item.get("name") if isinstance(item.get("name"), str) else ""
        return self._state(key, {"type": "tool_use", "id": item.get("call_id") or item.get("id"),
                                 "name": self.tool_names.get(name, name), "input": {}})

    def _tool_args(self, state, arguments, whole):
        """Arguments to deliver: a delta, or (whole) all of them, of which only what the
        client has not had yet goes out; so arguments that come only in the .done events
        reach the client, and once."""
        if state is None or not isinstance(arguments, str):
            return
        if whole:
            if not arguments.startswith(state["args"]):
                return
            arguments = arguments[len(state["args"]):]
        if arguments:
            state["args"] += arguments
            self._delta(state, {"type": "input_json_delta", "partial_json": arguments})

    def _item_done(self, key, item):
        kind = item.get("type")
        if kind == "reasoning":
            state = self._state(key, {"type": "thinking", "thinking": "", "signature": ""})
            if state is None:
                return
            if not state["seen"]:
                self._thinking(key, "\n\n".join(p.get("text") or "" for p in
                                                item.get("summary") or ()
                                                if isinstance(p, dict)))
            encrypted = item.get("encrypted_content")
            if isinstance(encrypted, str) and encrypted:
                signature = THINKING_SIGNATURE_PREFIX + encrypted
                self.content[state["index"]]["signature"] = signature
                self._delta(state, {"type": "signature_delta", "signature": signature})
            self._close()
        elif kind == "message":
            parts = [p for p in item.get("content") or () if isinstance(p, dict)]
            state = self.states.get(key)
            if state is None or not state["seen"]:
                for part in parts:
                    if part.get("type") == "refusal":
                        self.refused = True
                    self._text(key, part.get("text") or part.get("refusal") or "")
                    if self.stopped:
                        return
            if key in self.states and not self.states[key]["closed"]:
                self._close()
        elif kind == "function_call":
            state = self._tool_start(key, item)
            self._tool_args(state, item.get("arguments"), whole=True)
            if state is not None:
                self._close()
        elif kind == "web_search_call":
            self._web_search(key, item)

    def _web_search(self, key, item):
        """A search the backend ran, as Anthropic's server tool blocks: the query, then the
        sources it names (when the backend lists them)."""
        action = item.get("action") if isinstance(item.get("action"), dict) else {}
        tool_id = "srvtoolu_" + str(item.get("id") or uuid.uuid4().hex)
        state = self._start(("search", key), {"type": "server_tool_use", "id": tool_id,
                                              "name": "web_search", "input": {}})
        query = json.dumps({"query": action.get("query") or ""})
        state["args"] = query
        self._delta(state, {"type": "input_json_delta", "partial_json": query})
        self.content[state["index"]]["input"] = json.loads(query)
        self._close()
        results = [{"type": "web_search_result", "url": s.get("url"),
                    "title": s.get("title") or s.get("url"), "encrypted_content": "",
                    "page_age": None}
                   for s in action.get("sources") or () if isinstance(s, dict) and s.get("url")]
        self._start(("results", key), {"type": "web_search_tool_result",
                                       "tool_use_id": tool_id, "content": results})
        self._close()

    def _finish(self, stop_reason, usage=None):
        self._close()
        self.stop_reason = stop_reason
        self.usage = messages_usage(usage, estimated_output=(self.text_chars + 3) // 4)
        self._emit(b"message_delta", {"type": "message_delta", "delta": {
            "stop_reason": stop_reason, "stop_sequence": self.stop_sequence},
            "usage": self.usage})
        self._emit(b"message_stop", {"type": "message_stop"})

    # -- events ------------------------------------------------------------------------------

    def raw_delta(self, kind, frame, at):
        """The Messages frame for a delta event of the block being streamed, made from the
        event's bytes: its delta, a JSON string, is copied as it is. None when the event
        needs frames(): a block to open, a stop sequence to look for, a whole answer to
        collect, or bytes not shaped as expected."""
        state = self.open
        if state is None or self.stops or not self.streaming or \
                state["needle"] not in frame or kind not in state["kinds"]:
            return None
        delta = _DELTA_STRING_RE.search(frame, at)
        if delta is None:
            return None
        raw = delta.group(1)
        if state["type"] == "tool_use":
            try:
                state["args"] += json.loads(raw)
            except ValueError:
                return None
        elif state["type"] == "text":
            self.text_chars += len(raw) - 2
        state["seen"] += 1
        return state["prefix"] + raw + b"}}\n\n"

    def frames(self, etype, payload):
        """The Messages frames for one Responses event (bytes, joined)."""
        if self.stopped:
            return b""
        key = payload.get("output_index")
        if not isinstance(key, int):
            key = payload.get("item_id") or (payload.get("item") or {}).get("id")
        item = payload.get("item") if isinstance(payload.get("item"), dict) else {}
        if etype in ("response.output_text.delta", "response.refusal.delta"):
            if etype == "response.refusal.delta":
                self.refused = True
            self._text(key, payload.get("delta") or "")
        elif etype == "response.reasoning_summary_text.delta":
            self._thinking(key, payload.get("delta") or "")
        elif etype == "response.reasoning_summary_part.added":
            state = self.states.get(key)
            if state is not None and state["seen"]:
                self._thinking(key, "\n\n")
        elif etype == "response.function_call_arguments.delta":
            state = self.states.get(key)
            self._tool_args(state if state and not state["closed"] else None,
                            payload.get("delta"), whole=False)
        elif etype == "response.function_call_arguments.done":
            state = self.states.get(key)
            self._tool_args(state if state and not state["closed"] else None,
                            payload.get("arguments"), whole=True)
        elif etype == "response.output_item.added":
            if item.get("type") == "reasoning":
                self._state(key, {"type": "thinking", "thinking": "", "signature": ""})
            elif item.get("type") == "function_call":
                self._tool_start(key, item)
        elif etype == "response.output_item.done":
            self._item_done(key, item)
        elif etype in ("response.completed", "response.incomplete"):
            response = payload.get("response") if isinstance(payload.get("response"),
                                                             dict) else {}
            self._finish(messages_stop_reason(response, self.has_tool_use, self.refused),
                         response.get("usage"))
        elif etype in ("response.failed", "error"):
            error = ((payload.get("response") or {}).get("error") if etype != "error"
                     else payload) or {}
            code = error.get("code") or "response_failed"
            self._close()
            self._out.append(self.error_frame(ProxyError(
                failure_status(code), error.get("message") or
                "The backend reported a failure (%s)." % code, code=code)))
        out, self._out = self._out, []
        return b"".join(out)

    def message(self):
        """The whole answer as a non-streamed Message."""
        self._close()
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": self.content, "stop_reason": self.stop_reason or "end_turn",
                "stop_sequence": self.stop_sequence, "usage": self.usage}


# --------------------------------------------------------------------------------------------
# Front ends: images (pure): the OpenAI Images API (JSON, or multipart/form-data for
# edits) as the backend's JSON requests to .../codex/images/generations and /images/edits
# --------------------------------------------------------------------------------------------

DEFAULT_IMAGE_MODEL = "gpt-image-2"  # what the Codex CLI's image tool asks for
IMAGES_TIMEOUT = 600.0  # one JSON answer after the whole image is made: minutes, no events
IMAGE_ANSWER_LIMIT = 256 * 1024 * 1024  # n images of a few MB each, in base64
# The edit endpoint takes a form too, as the SDKs send it; every other POST is JSON.
FORM_PATHS = ("/v1/images/edits", "/images/edits")
MULTIPART_MAX_PARTS = 64
MULTIPART_MAX_HEADER_BYTES = 8192
# Form fields that are numbers or booleans in the JSON request (a form sends only text).
FORM_INTEGERS = ("n", "output_compression", "partial_images", "frame_count",
                 "frame_duration_ms")
FORM_BOOLEANS = ("stream",)
# An image's first bytes: (type, offset, magic); WebP is a RIFF file (as WAV is) saying WEBP.
IMAGE_TYPES = (("image/png", 0, b"\x89PNG\r\n\x1a\n"), ("image/jpeg", 0, b"\xff\xd8\xff"),
               ("image/gif", 0, b"GIF8"), ("image/webp", 8, b"WEBP"))
IMAGE_TURN_ID_HEADER = "x-codex-image-turn-id"


def _form_error(message, param=None):
    return ProxyError(400, message, param=param, code="invalid_multipart")


def multipart_boundary(content_type):
    """The boundary of a multipart/form-data Content-Type, else None (not a form)."""
    kind, _, params = (content_type or "").partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    m = re.search(r'(?:^|;)\s*boundary=(?:"([^"]{1,70})"|([^";\s]{1,70}))\s*(?:;|\Z)',
                  params, re.I)
    if not m:
        raise _form_error("The multipart/form-data Content-Type has no valid boundary "
                          "parameter (1 to 70 characters).")
    return (m.group(1) or m.group(2)).encode("latin-1")


def _disposition(value):
    """(name, filename or None) of a part's Content-Disposition: form-data header."""
    kind, _, rest = value.partition(";")
    if kind.strip().lower() != "form-data":
        raise _form_error("A form part's Content-Disposition must be form-data, not %r."
                          % kind.strip()[:40])
    params = {}
    for m in re.finditer(r';?\s*([A-Za-z*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s"]*))', rest):
        params.setdefault(m.group(1).lower(), re.sub(r"\\(.)", r"\1", m.group(2))
                          if m.group(2) is not None else m.group(3))
    if not params.get("name"):
        raise _form_error("A form part has no name in its Content-Disposition.")
    return params["name"], params.get("filename")


def _part_head(block):
    """(name, filename, content type) from a part's header lines."""
    disposition = ctype = None
    for line in block.split(b"\r\n"):
        field, colon, value = line.partition(b":")
        if not colon or not field or field != field.strip():
            raise _form_error("A form part has a malformed header line.")
        value = value.strip().decode("utf-8", "replace")
        if field.lower() == b"content-disposition":
            disposition = value
        elif field.lower() == b"content-type":
            ctype = value.split(";")[0].strip().lower()
    if disposition is None:
        raise _form_error("A form part has no Content-Disposition header.")
    name, filename = _disposition(disposition)
    return name, filename, ctype


def parse_multipart_form(body, boundary):
    """multipart/form-data (RFC 7578) -> [(name, filename or None, content type or None,
    bytes)], strictly: CRLF line ends, a closing delimiter, at most MULTIPART_MAX_PARTS parts
    with headers of at most MULTIPART_MAX_HEADER_BYTES. The body was already bounded by
    --max-body-bytes. Raises ProxyError (400)."""
    delimiter = b"\r\n--" + boundary
    if body.startswith(delimiter[2:]):
        pos = len(delimiter) - 2
    else:  # a preamble, ignored
        pos = body.find(delimiter)
        if pos < 0:
            raise _form_error("The form has no part delimited by its boundary.")
        pos += len(delimiter)
    parts = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the close delimiter; what follows is an epilogue
        while body[pos:pos + 1] in (b" ", b"\t"):  # transport padding (RFC 2046)
            pos += 1
        if not body.startswith(b"\r\n", pos):
            raise _form_error("The form is malformed: a boundary delimiter must end its line.")
        if len(parts) == MULTIPART_MAX_PARTS:
            raise _form_error("The form has more than %d parts." % MULTIPART_MAX_PARTS)
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + MULTIPART_MAX_HEADER_BYTES + 4)
        if head_end < 0:
            raise _form_error("A form part's headers are missing their end or are over %d "
                              "bytes." % MULTIPART_MAX_HEADER_BYTES)
        name, filename, ctype = _part_head(body[pos + 2:head_end])
        end = body.find(delimiter, head_end + 4)
        if end < 0:
            raise _form_error("The form ends before its closing boundary delimiter (was the "
                              "body cut short?).")
        parts.append((name, filename, ctype, body[head_end + 4:end]))
        pos = end + len(delimiter)


def image_data_url(data, declared, param):
    """An uploaded image as a data URL. Its type is read from its first bytes where they
    tell: the SDKs send application/octet-stream for raw bytes, and a type guessed from the
    file name, which may be wrong; else the client's, if it names an image."""
    if not data:
        raise ProxyError(400, "The image in `%s` is empty." % param, param=param,
                         code="invalid_image")
    kind = next((kind for kind, at, magic in IMAGE_TYPES
                 if data.startswith(magic, at) and (at == 0 or data.startswith(b"RIFF"))),
                None)
    if kind is None and not (declared or "").startswith("image/"):
        raise ProxyError(400, "The file in `%s` is not a PNG, JPEG, WebP or GIF image."
                         % param, param=param, code="invalid_image")
    return "data:%s;base64,%s" % (kind or declared, base64.b64encode(data).decode("ascii"))


def image_edit_from_form(parts):
    """An edit request's form parts -> its JSON body (images and mask as image_url objects
    holding data URLs, numbers and booleans typed)."""
    body, images, seen = {}, [], set()
    for name, filename, ctype, data in parts:
        if name in ("image", "image[]"):
            images.append({"image_url": image_data_url(data, ctype, "image")})
            continue
        if name in seen:
            raise _form_error("The form field %r is given twice." % name, name)
        seen.add(name)
        if name == "mask":
            body["mask"] = {"image_url": image_data_url(data, ctype, "mask")}
        elif filename is not None or "[" in name:
            raise ProxyError(400, "The form field %r is not supported here: send the images as "
                             "`image` (or `image[]`), the mask as `mask`, the rest as plain "
                             "fields." % name, param=name, code="unsupported_parameter")
        else:
            body[name] = _form_value(name, data)
    if images:
        body["images"] = images
    return body


def _form_value(name, data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _form_error("The form field %r is not UTF-8 text." % name, name)
    if name in FORM_INTEGERS:
        if not re.match(r"-?[0-9]{1,9}\Z", text.strip()):
            raise ProxyError(400, "`%s` must be an integer." % name, param=name,
                             code="invalid_type")
        return int(text)
    if name in FORM_BOOLEANS:
        if text.strip().lower() not in ("true", "false"):
            raise ProxyError(400, "`%s` must be true or false." % name, param=name,
                             code="invalid_type")
        return text.strip().lower() == "true"
    return text


def _json_edit_images(body):
    """The JSON edit's images (and mask) as the backend takes them: image_url objects; a
    file_id, which only the platform can resolve, is refused."""
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise ProxyError(400, "An image edit needs the images to edit: `images` as a list of "
                         "{\"image_url\": \"data:image/png;base64,...\"}, or a multipart form "
                         "with `image` files.", param="images", code="missing_required_parameter")
    for i, ref in enumerate(images + ([body["mask"]] if body.get("mask") is not None else [])):
        param = "images[%d]" % i if i < len(images) else "mask"
        if isinstance(ref, dict) and ref.get("file_id") is not None:
            raise ProxyError(400, "`%s` names a file_id: on a ChatGPT subscription there are no "
                             "uploaded files; send the image itself as a data URL in "
                             "image_url." % param, param=param, code="unsupported_value")
        if not isinstance(ref, dict) or not isinstance(ref.get("image_url"), str):
            raise ProxyError(400, "`%s` must be {\"image_url\": \"data:image/...;base64,...\"}."
                             % param, param=param, code="invalid_type")


def image_request(body, edit, drop=()):
    """An Images API request (a JSON object; a form already made one) -> the backend's JSON:
    the default model when it names none, b64_json the only answer there is, parameters the
    backend was seen to reject for the model left out (drop). Raises ProxyError (400)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProxyError(400, "`prompt` is required: a text describing the image.",
                         param="prompt", code="missing_required_parameter")
    if body.get("response_format") not in (None, "b64_json"):
        raise ProxyError(400, "response_format %s is not available on a ChatGPT subscription: "
                         "its backend returns images only as base64. Leave response_format "
                         "out or set it to \"b64_json\", and read data[].b64_json."
                         % json.dumps(body["response_format"])[:40], param="response_format",
                         code="unsupported_value")
    if body.get("stream") not in (None, False):
        raise ProxyError(400, "Streaming images (stream: true) is not available on a ChatGPT "
                         "subscription: its backend answers with the finished images. Leave "
                         "stream out.", param="stream", code="unsupported_value")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ProxyError(400, "`model` must be a string.", param="model", code="invalid_type")
    if edit:
        _json_edit_images(body)
    out = {k: v for k, v in body.items() if k not in ("response_format", "stream")
           and k not in drop}
    out["model"] = body.get("model") or DEFAULT_IMAGE_MODEL
    return out


def check_image_answer(data):
    """The backend's image answer is passed on as it is, once it is seen to be one."""
    try:
        result = json.loads(data)
        if not isinstance(result, dict) or not isinstance(result.get("data"), list):
            raise ValueError("no data list")
    except ValueError:
        raise ProxyError(502, "The backend's image answer was not the JSON expected%s."
                         % (" (over %d MB)" % (IMAGE_ANSWER_LIMIT >> 20)
                            if len(data) > IMAGE_ANSWER_LIMIT else ""),
                         code="bad_upstream_answer")


def image_request_headers(client_headers):
    """The upstream headers an image request carries on account of its client: its x-codex-*
    ones, and an x-codex-image-turn-id as the Codex CLI sends with each image call, made up
    when the client sent none."""
    headers = [(name, value) for name, value in client_headers.items()
               if name.startswith("x-codex-") and name != ROUTING_HINT_HEADER]
    if IMAGE_TURN_ID_HEADER not in client_headers:
        headers.append((IMAGE_TURN_ID_HEADER, str(uuid.uuid4())))
    return headers


# --------------------------------------------------------------------------------------------
# Upstream: the Codex version presented and the client headers passed on (pure)
# --------------------------------------------------------------------------------------------

# A version as the Codex CLI writes it: 0.171.0, or 0.172.0-alpha.3 for a pre-release. [0-9],
# not \d, which would take other scripts' digits too.
_VERSION_RE = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})\.([0-9]{1,9})"
                         r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\Z")
# The User-Agent of a Codex CLI or app: "<originator>/<version> (<os>; <arch>) <terminal>".
# Only Codex's own originators: another client's "name/1.2.3" is no Codex version.
_CODEX_USER_AGENT_RE = re.compile(r"(?:codex_cli_rs|codex_exec|codex-tui|codex_vscode|"
                                  r"codex_atlas|codex_chatgpt_desktop|Codex [A-Za-z]{1,30})"
                                  r"/([0-9A-Za-z.-]{1,80})(?=[ (;]|\Z)")


def parse_codex_version(text):
    """'0.172.0-alpha.3' -> a key that orders versions as semantic versioning does (a
    pre-release before its release); None for anything that is not such a version."""
    if not isinstance(text, str) or len(text) > 80:
        return None
    m = _VERSION_RE.match(text.strip())
    if not m:
        return None
    release = tuple(int(n) for n in m.group(1, 2, 3))
    if m.group(4) is None:
        return release + ((1,),)
    return release + ((0,) + tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                                   for part in m.group(4).split(".")),)


def client_codex_version(headers):
    """The Codex version a request names, from its `version` header (sent by the CLI's
    built-in provider) or its User-Agent (sent by every Codex client): (key, text), the newer
    of the two, or None. headers: names lower-cased."""
    agent = _CODEX_USER_AGENT_RE.match((headers.get("user-agent") or "")[:200])
    texts = ((headers.get("version") or "").strip(), agent.group(1) if agent else "")
    found = [(key, text) for key, text in ((parse_codex_version(t), t) for t in texts) if key]
    return max(found) if found else None


class ClientVersion:
    """The Codex version to present upstream. The backend gates new models on it, so a request
    from a Codex CLI newer than --client-version goes with the CLI's own version, and the
    model list is asked for with the newest version seen."""

    def __init__(self, configured):
        self.configured = configured
        self._configured_key = parse_codex_version(configured) or ()
        self._newest = (self._configured_key, configured)
        self._lock = threading.Lock()

    def observe(self, headers):
        """The version to send for this request (headers: names lower-cased)."""
        seen = client_codex_version(headers)
        if seen is None or seen[0] <= self._configured_key:
            return self.configured
        with self._lock:
            if seen[0] > self._newest[0]:
                self._newest = seen
        return seen[1]

    @property
    def newest(self):
        return self._newest[1]


RESPONSES_LITE_HEADER = "x-openai-internal-codex-responses-lite"
ROUTING_HINT_HEADER = "x-codex-routing-hint"
# A client's (the Codex CLI's) request headers passed on as they are, besides every x-codex-*
# one. The responses-lite marker must arrive whenever the client sent it: it tells the backend
# the request has the lite shape (no top-level tools; they come as an input item).
# Nothing else is: Accept-Encoding above all, as the backend may then compress its stream.
FORWARDED_CLIENT_HEADERS = ("x-openai-subagent", "x-client-request-id", RESPONSES_LITE_HEADER)
_ROUTING_SLUG_RE = re.compile(r"[A-Za-z0-9._:/+-]{1,200}\Z")


def routing_hint(body):
    """x-codex-routing-hint as the Codex CLI sends it to chatgpt.com: "model=<slug>", plus
    ";tier=<tier>" when the request names a service tier. None when the model is missing or
    no safe header value (a client's model could hold a line break)."""
    model, tier = body.get("model"), body.get("service_tier")
    if not isinstance(model, str) or not _ROUTING_SLUG_RE.match(model):
        return None
    if isinstance(tier, str) and _ROUTING_SLUG_RE.match(tier):
        return "model=%s;tier=%s" % (model, tier)
    return "model=" + model


def upstream_request_headers(client_headers, body):
    """The headers a Codex request carries upstream on account of its client, as (name,
    value) pairs: the one place that decides them. client_headers: the client's, names
    lower-cased; body: the request as sent upstream. The client's own routing hint is
    replaced by one for the body actually sent (its model, the tier left in it)."""
    headers = [(name, value) for name, value in client_headers.items()
               if (name.startswith("x-codex-") or name in FORWARDED_CLIENT_HEADERS)
               and name != ROUTING_HINT_HEADER]
    hint = routing_hint(body)
    if hint:
        headers.append((ROUTING_HINT_HEADER, hint))
    return headers


HOP_BY_HOP = ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade")
# API-key mode copies the client's headers, as codex responses-api-proxy does, except these:
# ours replace them (Authorization, Host, Content-Length) or they are the client's own secrets.
NOT_FORWARDED_AS_IS = HOP_BY_HOP + ("host", "authorization", "content-length", "cookie",
                                    "x-api-key", "expect")
# ... and, for a WebSocket's requests (each a streamed POST), those of the upgrade itself.
NOT_FORWARDED_FROM_WEBSOCKET = ("accept", "accept-encoding", "content-type", "openai-beta",
                                "origin")


def platform_request_headers(client_headers, from_websocket=False):
    """API-key mode: the client's headers (name, value pairs as it wrote them) that go to the
    platform; of duplicates the first, the one the access checks saw."""
    headers, seen = {}, set()
    for name, value in client_headers:
        lower = name.lower()
        if lower not in seen and lower not in NOT_FORWARDED_AS_IS and not (
                from_websocket and (lower in NOT_FORWARDED_FROM_WEBSOCKET
                                    or lower.startswith("sec-websocket-"))):
            headers[name] = value
        seen.add(lower)
    return headers


# --------------------------------------------------------------------------------------------
# Upstream: the backend's event stream, whole events in batches from either transport
# --------------------------------------------------------------------------------------------

TERMINAL_EVENTS = ("response.completed", "response.failed", "response.incomplete")
# Only these are JSON-decoded; deltas pass through untouched, which keeps the hot path cheap.
INSPECTED_EVENTS = frozenset(TERMINAL_EVENTS + ("response.output_item.done", "error",
                                                "response.created"))


_LINE_END_RE = re.compile(rb"\r\n|\r|\n")


def sse_frame(name, data):
    """One event as an SSE frame; data with line breaks (JSON's whitespace) on data lines."""
    head = b"event: " + name.encode() + b"\n" if name is not None else b""
    if b"\n" not in data and b"\r" not in data:
        return head + b"data: " + data + b"\n\n"
    return head + b"".join(b"data: " + line + b"\n" for line in _LINE_END_RE.split(data)) \
        + b"\n"


def frame_event(frame):
    """(type, data) of one LF-framed SSE frame; data None when it has no data line."""
    lines = frame.split(b"\n")
    name = None
    for line in lines:
        if line[:6] == b"event:":
            name = (line[7:] if line[6:7] == b" " else line[6:]).decode("utf-8", "replace")
    data = _join_data(lines)
    return name, data.encode("utf-8") if data is not None else None


class EventBatch:
    """Whole events handed from the backend through a transform to a sink, in a form other
    than the backend's own SSE bytes (those go as plain bytes, see sse_of):
    - events: (type, data bytes) pairs (a WebSocket's frames);
    - parsed: SSEEvents of an SSE stream framed otherwise (CRs), each with its bytes;
    - sse: SSE bytes of any framing (a transform's output).
    Each form is made from another only when asked for: a WebSocket's frames go to a
    WebSocket client as their data, never through SSE."""

    __slots__ = ("parsed", "_events", "_sse")

    def __init__(self, events=None, parsed=None, sse=None):
        self.parsed = parsed
        self._events = events
        self._sse = sse

    def __bool__(self):
        if self.parsed is not None:
            return bool(self.parsed)
        return bool(self._sse) if self._sse is not None else bool(self._events)

    def sse(self):
        if self._sse is None:
            self._sse = (b"".join(event.raw for event in self.parsed) if self.parsed is not None
                         else b"".join(sse_frame(name, data) for name, data in self._events))
        return self._sse

    def events(self):
        if self._events is None:
            parsed = self.parsed
            if parsed is None and b"\r" not in self._sse:
                self._events = events_of(self._sse)
            else:
                self._events = [(event.event, event.data.encode("utf-8"))
                                for event in (parsed if parsed is not None
                                              else SSEParser().feed(self._sse))
                                if event.data is not None]
        return self._events


# A batch is the backend's own SSE frames as bytes (LF-framed, whole frames: the hot path,
# never split into events unless a consumer needs them), or an EventBatch.

def sse_of(batch):
    return batch if type(batch) is bytes else batch.sse()


def events_of(batch):
    """(type, data) of each event of a batch."""
    if type(batch) is bytes:
        return [e for e in map(frame_event, batch.split(b"\n\n")[:-1]) if e[1] is not None]
    return batch.events()


def payloads_of(batch):
    """Each event's data: what a WebSocket carries, one message each."""
    return [data for _, data in events_of(batch)]


class SSEFramer:
    """An SSE body cut into whole frames, once, for every transform: after each piece, the
    frames it completes, as their bytes; a frame arriving in many reads is joined once, at
    its end. A body framed with CRs goes through the full parser and is handed on as an
    EventBatch of parsed events."""

    def __init__(self):
        self._pending = []   # the start of an unfinished frame, in pieces
        self._parser = None  # the full SSE parser, once the input needs it
        self._started = False

    def feed(self, data):
        """The batch of the frames this piece completes; None when it completes none."""
        if not self._started:
            self._started = True
            if data[:3] == _UTF8_BOM:
                data = data[3:]  # a BOM opens the stream; it is not part of the first event
        if self._parser is None and b"\r" in data:
            self._parser = SSEParser()
            data, self._pending = b"".join(self._pending) + data, []
        if self._parser is not None:
            parsed = self._parser.feed(data)
            return EventBatch(parsed=parsed) if parsed else None
        pending = self._pending
        if pending and b"\n\n" not in data and not (data[:1] == b"\n" and
                                                     pending[-1][-1:] == b"\n"):
            pending.append(data)  # a large event arrives in many reads: joined once, at its end
            return None
        buf = b"".join(pending) + data if pending else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._pending = [buf]
            return None
        self._pending = [buf[end + 2:]] if end + 2 < len(buf) else []
        return buf[:end + 2]


# --------------------------------------------------------------------------------------------
# Upstream: HTTP connections, pooled, and an answer's body as an event stream
# --------------------------------------------------------------------------------------------

# Forwarded from the backend's answer to the client: quota, rate limit and request ids.
FORWARDED_RESPONSE_HEADERS = ("retry-after", "x-request-id", "x-oai-request-id", "openai-model",
                              "x-models-etag")


def upstream_url_for(url, endpoint):
    """The backend's URL for another endpoint: .../codex/responses -> .../codex/models."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rsplit("/", 1)[0] + "/" + endpoint
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def forwarded_response_headers(headers):
    return [(k, v) for k, v in headers
            if k.lower().startswith("x-codex-") or k.lower() in FORWARDED_RESPONSE_HEADERS]


class ConnectionPool:
    """Idle keep-alive connections per upstream host, so an agent's turns skip the TCP and TLS
    handshakes. A connection is returned only after its response was read to the end."""

    def __init__(self, connect_timeout=CONNECT_TIMEOUT, max_idle=8):
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle = {}
        self._lock = threading.Lock()
        self._ssl = None  # loading the CA store costs ~2 MB: only once an https upstream is used

    def acquire(self, scheme, host, port):
        """(connection, reused): an idle one if a healthy one is there, else a new one."""
        key = (scheme, host, port)
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if _still_open(conn):
                return conn, True
            conn.close()
        if scheme == "https":
            self.ssl_context()
            conn = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        conn._pool_key = key
        return conn, False

    def ssl_context(self):
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def release(self, conn):
        with self._lock:
            idle = self._idle.setdefault(conn._pool_key, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def close_all(self):
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def readable_sockets(socks, timeout):
    """The sockets of socks with something to read (or EOF). poll() where there is one:
    select() fails on descriptors past 1024, which a busy proxy reaches."""
    if not hasattr(select, "poll"):
        return select.select(socks, [], [], timeout)[0]
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        by_fd[sock.fileno()] = sock
        poller.register(sock, select.POLLIN | select.POLLPRI)
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000) if fd in by_fd]


def _still_open(conn):
    """An idle connection the server has closed reads as EOF: readable with nothing in it."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        return not readable_sockets([sock], 0)
    except (OSError, ValueError):
        return False


STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError,
                           ConnectionAbortedError, BrokenPipeError, http.client.BadStatusLine)


def send_upstream(pool, url, body, headers, read_timeout, method="POST"):
    """Send the request; returns (connection, response) once the status line and headers
    are in. A reused connection that turns out dead before any byte of an answer is retried
    once on a fresh one: the request never reached a live server."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    for attempt in (1, 2):
        conn, reused = pool.acquire(parts.scheme, parts.hostname, port)
        try:
            if conn.sock is None:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock.settimeout(read_timeout)
            conn.request(method, target, body=body, headers=headers)
            return conn, conn.getresponse()
        except STALE_CONNECTION_ERRORS as e:
            conn.close()
            if reused and attempt == 1:
                continue
            raise ProxyError(502, "The backend closed the connection without answering (%s)."
                             % e.__class__.__name__, code="upstream_unreachable")
        except socket.timeout:
            conn.close()
            raise ProxyError(504, "The backend did not answer in time.", code="upstream_timeout")
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ProxyError(502, "Cannot reach the backend at %s://%s: %s."
                             % (parts.scheme, parts.netloc, getattr(e, "strerror", None) or e),
                             code="upstream_unreachable")
        except ValueError:
            # http.client refuses a header value with a line break: a credential with a stray
            # newline. Its message would quote the value, so it is not passed on.
            conn.close()
            raise ProxyError(500, "A header for the backend has an invalid value; check the "
                             "token or key in auth.json (a stray line break?).",
                             code="invalid_credential")


class UpstreamBody:
    """The body of an upstream response, read in pieces as large as what has arrived; then
    its connection settled: back to the pool if the body was read whole, else closed."""

    def __init__(self, conn, resp):
        self.conn = conn
        self.resp = resp
        self._chunked = ChunkedDecoder() if resp.chunked else None
        self._eof = False

    @property
    def complete(self):
        """Read to its very end (not cut short)."""
        if self._chunked is not None:
            return self._chunked.done
        if self.resp.length is not None:
            return self.resp.length == 0  # http.client counts a Content-Length body down
        return self._eof  # ended by the server closing: whole, but the connection is spent

    def read(self):
        """The next piece of the body; b"" at its end (complete or not: see .complete)."""
        if self._chunked is None:
            data = self.resp.read1(65536)
            self._eof = not data
            return data
        while not self._chunked.done:
            data = self.resp.fp.read1(262144)
            if not data:
                return b""
            try:
                payload = self._chunked.feed(data)
            except ValueError as e:
                raise http.client.HTTPException("bad chunked encoding: %s" % e)
            if payload:
                return payload
        return b""

    def read_all(self, limit):
        """The rest of the body, at most about limit bytes."""
        parts, size = [], 0
        while size <= limit:
            data = self.read()
            if not data:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def settle(self, pool):
        """Return the connection to the pool if the body was read whole and the server keeps
        it open, else close it. True if the body was whole."""
        complete = self.complete
        if complete and not self.resp.will_close:
            self.resp.close()
            pool.release(self.conn)
        else:
            self.conn.close()
        return complete


class UpstreamAnswer:
    """An upstream response whose status line and headers are in; its body is read here."""

    def __init__(self, conn, resp, dump):
        self.conn = conn
        self.resp = resp
        self.dump = dump
        self.status = resp.status
        self.headers = resp.getheaders()
        self.body = UpstreamBody(conn, resp)

    def forwarded_headers(self):
        return forwarded_response_headers(self.headers)

    @property
    def sock(self):
        """The socket a client's hang-up shuts (see HangupWatcher)."""
        return self.conn.sock

    def close(self):
        self.conn.close()

    def dump_done(self):
        if self.dump:
            self.dump.finish()

    def read_whole(self, pool, limit=1 << 22):
        """The whole (non-streamed) body, the connection settled."""
        try:
            data = self.body.read_all(limit)
        except (OSError, http.client.HTTPException):
            data = b""
        self.body.settle(pool)
        if self.dump:
            self.dump.finish(data)
        return data


class HTTPEvents:
    """The backend's answer over HTTP as an event stream: its body de-chunked and cut into
    whole SSE frames once (SSEFramer), an EventBatch per read; the connection back to the
    pool once the body was read to its end."""

    def __init__(self, answer, pool):
        self.answer = answer
        self.headers = answer.forwarded_headers()
        self.sock = answer.conn.sock
        self._pool = pool
        self._framer = SSEFramer()

    def read(self):
        """The next batch of whole events; None at the body's end (complete or not)."""
        body, dump = self.answer.body, self.answer.dump
        while True:
            data = body.read()
            if not data:
                return None
            if dump:
                dump.body += data
            batch = self._framer.feed(data)
            if batch is not None:
                return batch

    @property
    def complete(self):
        """Read to the body's very end."""
        return self.answer.body.complete

    def close(self):
        """Cut at once (from any thread): the connection cannot carry another request."""
        self.answer.conn.close()

    def settle(self):
        self.answer.body.settle(self._pool)

    def drain(self):
        """After the terminal event the backend ends its body, usually in the same read; take
        that end so the connection can serve the next turn. A body that lingers costs the
        connection, not the client's time."""
        answer = self.answer
        try:
            if not answer.body.complete:
                answer.conn.sock.settimeout(0.25)
                while answer.body.read():
                    pass
        except (OSError, http.client.HTTPException, AttributeError):
            answer.conn.close()
            return
        answer.body.settle(self._pool)

    def dump_done(self):
        self.answer.dump_done()


# --------------------------------------------------------------------------------------------
# Upstream: the client, and one retry policy for both transports
# --------------------------------------------------------------------------------------------

class RetryPolicy:
    """One request's retries, the same over HTTP and over the backend's WebSocket: a 401
    re-reads the login (refreshing if need be) and retries once, then is the final 401; a
    parameter the backend calls unsupported is dropped (for the model from then on) and the
    request retried, once per parameter. A dead pooled connection or idle socket is reopened
    once where it is found (send_upstream, WebSocketUpstream.send)."""

    def __init__(self, client, body):
        self.client = client
        self.body = body            # the request as it goes now, rejected parameters dropped
        self.rejected_token = None  # the access token the backend refused once
        self._dropped = set()

    def credentials(self):
        return self.client.auth.get(self.rejected_token)

    def after_401(self, creds, what, headers=()):
        """Back from a 401 to try again once, with the login re-read; the final 401 after."""
        if self.rejected_token is None:
            self.client.log.info("%s; re-reading the login and retrying once" % what)
            self.rejected_token = creds.access_token
            return
        raise ProxyError(401, "The backend refused the access token even after a refresh. "
                         + LOGIN_HINT, code="invalid_api_key", headers=list(headers))

    def after_rejected_param(self, status, error_body):
        """True when the backend rejected a parameter it does not support, now dropped."""
        param = unsupported_parameter(status, error_body)
        body = self.body
        if body is None or not param or param in self._dropped or param not in body or \
                param in ESSENTIAL_PARAMS:
            return False
        self.client.drop_param(body.get("model"), param)
        self._dropped.add(param)
        self.body = dict(body)
        self.body.pop(param, None)
        return True


class UpstreamClient:
    """Everything that talks to the backend: the connection pool, the credentials, the dumps,
    the quota headers, the choice of transport (the backend's WebSocket, see
    WebSocketUpstream, or HTTP), and over HTTP one retry policy: a 401 once after re-reading
    the login (refreshing if need be), an "Unsupported parameter" once without it, and a
    dead pooled connection once (in send_upstream)."""

    def __init__(self, config, log, auth):
        self.config = config
        self.log = log
        self.auth = auth
        self.pool = ConnectionPool()
        self.quota = QuotaTracker()
        self.dumper = ExchangeDumper(config.dump_dir, log) if config.dump_dir else None
        self.user_agent = codex_user_agent(config)
        self._dropped = {}  # model -> parameters the backend rejected for it
        self._lock = threading.Lock()
        self.websockets = WebSocketUpstream(self)

    def exchange(self, method, url, body, headers, timeout=None):
        """One request, sent (and dumped), its quota headers noted."""
        dump = self.dumper.request(method, url, list(headers.items()), body) \
            if self.dumper else None
        conn, resp = send_upstream(self.pool, url, body, headers,
                                   timeout or self.config.stream_idle_timeout, method)
        answer = UpstreamAnswer(conn, resp, dump)
        self.quota.update(answer.headers)
        if dump:
            dump.answer(answer.status, answer.headers)
        return answer

    def codex_headers(self, creds, session_id, extra, accept="text/event-stream", version=None):
        headers = {
            "Authorization": "Bearer " + creds.access_token,
            "originator": self.config.originator,
            "User-Agent": self.user_agent if version in (None, self.config.client_version)
            else codex_user_agent(self.config, version),
            "version": version or self.config.client_version,
            "Accept": accept,
            "Content-Type": "application/json",
        }
        if session_id:
            headers["session_id"] = headers["session-id"] = session_id
        if creds.account_id:
            headers["ChatGPT-Account-ID"] = creds.account_id
        if creds.fedramp:
            headers["X-OpenAI-Fedramp"] = "true"
        for name, value in extra:
            headers.setdefault(name, value)
        return headers

    def responses(self, request):
        """A prepared Responses request sent: over the conversation's socket when
        --upstream-transport allows and the backend takes it, else over HTTP."""
        policy = RetryPolicy(self, request.body)
        if self.websockets.choice.websocket_now():
            events = self.websockets.send(request, policy)
            if events is not None:
                return events
            request.after_turn = self.websockets.prewarm_for(request)
        return HTTPEvents(self.call("POST", self.config.upstream_url, request.body,
                                    request.encode, request.session_id, request.headers,
                                    version=request.version, policy=policy), self.pool)

    def turn_over(self, request):
        """The client has its whole answer: what waited for that may run now."""
        then = request.after_turn
        if then is not None:
            request.after_turn = None
            then()

    def dropped_params(self, model):
        return tuple(self._dropped.get(model, ())) if isinstance(model, str) else ()

    def call(self, method, url, body=None, encode=None, session_id=None, extra=(),
             accept="text/event-stream", version=None, timeout=None, policy=None):
        """A ChatGPT-mode request under the retry policy; the answer once it is a 200, else
        the backend's error as a ProxyError. body: the JSON object to send, encoded by
        encode() on each try (a retry may have dropped a parameter); version: the Codex
        version to present; policy: the request's retries so far (its socket's, when it
        tried the backend's WebSocket first)."""
        policy = policy or RetryPolicy(self, body)
        while True:
            creds = policy.credentials()
            payload = encode(policy.body) if policy.body is not None else None
            if payload is not None:
                self.log.debug_body("upstream request", payload)
            answer = self.exchange(method, url, payload,
                                   self.codex_headers(creds, session_id, extra, accept, version),
                                   timeout)
            if answer.status == 200:
                return answer
            error_body = answer.read_whole(self.pool)
            if answer.status == 401:
                policy.after_401(creds, "backend answered 401", answer.forwarded_headers())
                continue
            if policy.after_rejected_param(answer.status, error_body):
                continue
            err = translate_upstream_error(answer.status, error_body)
            err.headers = answer.forwarded_headers()
            raise err

    def drop_param(self, model, param):
        """The backend rejects param for model: it goes from this and later requests."""
        self.log.warn_once("param:%s:%s" % (model, param),
                           "the backend rejects the parameter %r for model %s; dropping "
                           "it from this and later requests" % (param, model))
        if isinstance(model, str):
            with self._lock:
                self._dropped[model] = self._dropped.get(model, frozenset()) | {param}

    def models(self, version):
        """The backend's model list, as a ModelCatalog."""
        url = "%s?client_version=%s" % (upstream_url_for(self.config.upstream_url, "models"),
                                        urllib.parse.quote(version))
        body = self.call("GET", url, accept="application/json",
                         version=version).read_whole(self.pool)
        try:
            models = json.loads(body)["models"]
            if not isinstance(models, list):
                raise TypeError("models is no list")
            return ModelCatalog(models, time.time())
        except (ValueError, KeyError, TypeError):
            raise ProxyError(502, "The backend's model list was not in the expected shape.",
                             code="bad_upstream_answer")

    def close(self):
        self.pool.close_all()
        self.websockets.close()


# --------------------------------------------------------------------------------------------
# Upstream: the quota the backend reports, for /status
# --------------------------------------------------------------------------------------------

def window_label(minutes):
    """A quota window's name from its length: 300 -> "5h", 10080 -> "weekly", 43200 -> "30d"."""
    if not isinstance(minutes, int) or minutes <= 0:
        return None
    if minutes == 7 * 24 * 60:
        return "weekly"
    if minutes % (24 * 60) == 0:
        return "%dd" % (minutes // (24 * 60))
    if minutes % 60 == 0:
        return "%dh" % (minutes // 60)
    return "%dm" % minutes


# x-codex-* headers that say nothing of the quota: a WebSocket's 101 carries only these, and
# must not blank what /status shows.
NOT_QUOTA_HEADERS = ("x-codex-turn-state", "x-codex-websocket-max-message-bytes")


class QuotaTracker:
    """The latest x-codex-* quota headers the backend sent, for /status. "primary" and
    "secondary" are positions, not durations: which window is which is told by each one's
    window_minutes, hence its label and the `windows` list, shortest first."""

    def __init__(self):
        self._seen = ({}, None)  # (headers, when): replaced whole, so read without a lock

    def update(self, headers):
        quota = {k.lower(): v for k, v in headers if k.lower().startswith("x-codex-")
                 and k.lower() not in NOT_QUOTA_HEADERS}
        if quota:
            self._seen = (quota, time.time())

    def snapshot(self):
        h, seen_at = self._seen
        if not h:
            return None

        def number(name, kind=float):
            try:
                return kind(h["x-codex-" + name])
            except (KeyError, ValueError):
                return None

        def window(name):
            reset_at = number(name + "-reset-at", int)
            after = number(name + "-reset-after-seconds", int)
            if reset_at is None and after is not None:
                reset_at = int(seen_at + after)
            minutes = number(name + "-window-minutes", int)
            return {"label": window_label(minutes),
                    "used_percent": number(name + "-used-percent"),
                    "window_minutes": minutes,
                    "resets_at": iso_time(reset_at),
                    "resets_in_seconds": None if reset_at is None
                    else max(0, int(reset_at - time.time()))}

        slots = {"primary": window("primary"), "secondary": window("secondary")}
        windows = sorted(
            (dict(w, slot=slot) for slot, w in slots.items()
             if w["used_percent"] is not None or w["window_minutes"] is not None),
            key=lambda w: (w["window_minutes"] is None, w["window_minutes"] or 0))
        return {"primary": slots["primary"], "secondary": slots["secondary"],
                "windows": windows,
                "plan_type": h.get("x-codex-plan-type"),
                "active_limit": h.get("x-codex-active-limit"),
                "credits": {"has_credits": h.get("x-codex-credits-has-credits"),
                            "balance": h.get("x-codex-credits-balance"),
                            "unlimited": h.get("x-codex-credits-unlimited")},
                "seen_at": iso_time(seen_at)}


def iso_time(timestamp):
    when = utc_datetime(timestamp)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else None


# --------------------------------------------------------------------------------------------
# Upstream WebSocket: one backend socket per conversation, turns chained on it
# --------------------------------------------------------------------------------------------

# The backend keeps the last response of each socket, even with store: false, so a turn on
# the socket of its conversation sends previous_response_id and only its new items. Its
# frames reach the relay as events (WebSocketEvents), as the HTTP body's do (HTTPEvents).

WS_BETA_HEADER = ("OpenAI-Beta", "responses_websockets=2026-02-06")  # the Codex CLI's
WS_FALLBACK_SECONDS = 600.0  # after a refused upgrade (auto), HTTP for this long
WS_UPSTREAM_IDLE_SECONDS = 300.0      # an idle socket is closed after this long
WS_MAX_AGE = 55 * 60.0       # the backend ends a socket at 60 minutes: retired before
WS_MAX_IDLE = 32             # idle sockets kept at most; the least recently used go first
WS_RECOVERIES = 3            # fresh sockets one request may take after a recoverable error
# Fields a turn may change and still continue the last response; every other field must be
# the same, as the Codex CLI requires before it sends previous_response_id.
WS_TURN_FIELDS = ("input", "previous_response_id", "client_metadata", "stream", "generate")
# An error frame with one of these codes costs nothing but a fresh socket and the full input.
WS_RECOVERABLE_CODES = ("previous_response_not_found", "websocket_connection_limit_reached")


def websocket_url(url):
    parts = urllib.parse.urlsplit(url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme,) + tuple(parts[1:]))


def canonical_item(item):
    """An input item in the form that decides whether two are the same turn of history.
    What a client re-sends of an output item differs from what the backend sent in ways that
    do not change its meaning: the `id` and `status` the backend stamped, empty
    `annotations`/`logprobs`, null fields, a message's implied `"type": "message"`. Those are
    left out; every text, argument, call id and encrypted reasoning is compared as is, so an
    item the client edited is a different item and the full input is sent."""
    if not isinstance(item, dict):
        return json.dumps(item, sort_keys=True, separators=(",", ":"))
    out = {k: v for k, v in item.items() if k not in ("id", "status") and v is not None}
    if "type" not in out and "role" in out:
        out["type"] = "message"
    return json.dumps(_without_noise(out), sort_keys=True, separators=(",", ":"))


def _without_noise(value):
    if isinstance(value, dict):
        return {k: _without_noise(v) for k, v in value.items()
                if v is not None and not (k in ("annotations", "logprobs") and not v)}
    if isinstance(value, list):
        return [_without_noise(v) for v in value]
    return value


def continues_conversation(request):
    """Whether a request goes on from earlier turns: it names one, or its input holds
    output (an assistant message, a tool call or its result, reasoning)."""
    if request.previous is not None:
        return True
    items = request.body.get("input")
    return isinstance(items, list) and any(
        isinstance(item, dict) and (item.get("role") == "assistant" or
                                    item.get("type") not in (None, "message"))
        for item in items)


def request_shape(body):
    """Everything of a request but what a turn may change, as one comparable string."""
    return json.dumps({k: v for k, v in body.items() if k not in WS_TURN_FIELDS},
                      sort_keys=True, separators=(",", ":"))


class Chain:
    """What the backend remembers of a socket: its last response, and the history (input and
    output, as the backend saw them) that response ended."""

    def __init__(self, response_id, shape, history):
        self.response_id = response_id
        self.shape = shape
        self.history = history
        self._canonical = {}

    def new_items(self, body):
        """The items of body's input past this history, or None when the input does not
        extend it (or adds nothing): then the full input goes."""
        items = body.get("input")
        if not isinstance(items, list) or len(items) <= len(self.history) or \
                request_shape(body) != self.shape:
            return None
        for i, (item, seen) in enumerate(zip(items, self.history)):
            if item == seen:  # the usual case, in C: the client re-sent what it sent
                continue
            if i not in self._canonical:
                self._canonical[i] = canonical_item(seen)
            if canonical_item(item) != self._canonical[i]:
                return None
        return items[len(self.history):]


def rate_limit_headers(event):
    """A codex.rate_limits event as the x-codex-* headers the HTTP answer carries, for the
    QuotaTracker."""
    headers = []
    limits = event.get("rate_limits") if isinstance(event.get("rate_limits"), dict) else {}
    for slot in ("primary", "secondary"):
        window = limits.get(slot)
        if isinstance(window, dict):
            for field, name in (("used_percent", "used-percent"),
                                ("window_minutes", "window-minutes"), ("reset_at", "reset-at")):
                if window.get(field) is not None:
                    headers.append(("x-codex-%s-%s" % (slot, name), str(window[field])))
    credits = event.get("credits")
    if isinstance(credits, dict):
        for field in ("has_credits", "unlimited", "balance"):
            value = credits.get(field)
            if value is not None:
                headers.append(("x-codex-credits-" + field.replace("_", "-"),
                                str(value).lower() if isinstance(value, bool) else str(value)))
    if isinstance(event.get("plan_type"), str):
        headers.append(("x-codex-plan-type", event["plan_type"]))
    return headers


class UpstreamWebSocket:
    """One open socket to the backend, used by one request at a time."""

    def __init__(self, sock, rest, headers, identity, key, max_message=None):
        self.sock = sock
        self.reader = WebSocketReader(sock, rest, max_message)
        self.deflater = self.deflater_for(headers)
        self.headers = headers  # the 101's
        self.identity = identity  # (token, account, version): a socket is tied to these
        self.key = key
        self.opened = self.used = time.monotonic()
        self.chain = None
        names = {k.lower(): v for k, v in headers}
        try:
            self.max_message_bytes = int(names.get("x-codex-websocket-max-message-bytes"))
        except (TypeError, ValueError):
            self.max_message_bytes = None
        self.turn_state = names.get("x-codex-turn-state")
        self.request_headers = []  # the handshake's, for the dumps
        self.closed = False

    def deflater_for(self, headers):
        """permessage-deflate as the 101 agreed (client_handshake checked it): the reader
        inflates; the MessageDeflater or None for what we send. zlib cannot compress with an
        8-bit window: then ours go uncompressed, which RFC 7692 allows any message."""
        terms = deflate_terms(headers)
        if terms is None:
            return None
        self.reader.inflater = MessageInflater(terms.server_no_context_takeover)
        if terms.client_max_window_bits < 9:
            return None
        return MessageDeflater(terms.client_max_window_bits, terms.client_no_context_takeover)

    def send_text(self, payload):
        if self.deflater is None:
            self.sock.sendall(encode_frame(OP_TEXT, payload, mask=True))
        else:  # encode_frame puts the opcode in the first byte, beside RSV1
            self.sock.sendall(encode_frame(RSV1 | OP_TEXT, self.deflater.compress(payload),
                                           mask=True))

    def pong(self, payload):
        self.sock.sendall(encode_frame(OP_PONG, payload, mask=True))

    def close(self):
        """At once, no closing handshake: a socket closed mid-answer is how generation stops."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def idle_for(self, now):
        return now - self.used

    def settle_idle(self, on_text):
        """Before reuse: answer the pings that came while idle; False when the backend closed
        the socket meanwhile (or it is too old to start a turn on)."""
        if self.closed or time.monotonic() - self.opened > WS_MAX_AGE:
            return False
        try:
            while self.reader.frame_ready() or readable_sockets([self.sock], 0):
                self.sock.settimeout(1.0)
                fin, opcode, payload = self.reader.frame()
                if opcode == OP_PING:
                    self.pong(payload)
                elif opcode == OP_CLOSE:
                    return False
                elif opcode == OP_TEXT and fin:
                    on_text(payload)
        except (OSError, EOFError, ValueError):
            return False
        return True


class WebSocketPool:
    """Idle sockets by conversation (session id), and by the id of their last response for
    clients that chain with previous_response_id. A socket is taken out for a turn, so two
    requests never share one; it comes back when the turn ended well."""

    SWEEP_EVERY = 5.0  # how soon an idle socket's ping is answered

    def __init__(self, on_text):
        self.on_text = on_text  # what to do with a text frame that comes while idle
        self._idle = collections.OrderedDict()  # key -> socket, least recently used first
        self._by_response = {}                  # last response id -> key
        self._opening = set()                   # keys whose socket is being opened
        self._lock = threading.Lock()
        self._janitor = None
        self._closed = threading.Event()

    def take(self, key, previous=None):
        with self._lock:
            ws = self._idle.pop(key, None)
            if ws is None and previous is not None:
                other = self._by_response.get(previous)
                ws = self._idle.pop(other, None) if other is not None else None
            if ws is not None and ws.chain is not None:
                self._by_response.pop(ws.chain.response_id, None)
        return ws

    def put(self, ws, replace=True):
        """Back into the pool, as its conversation's socket; replace=False: only if that
        conversation has none meanwhile, else ws is closed."""
        ws.used = time.monotonic()
        with self._lock:
            if not replace and ws.key in self._idle:
                ws.close()
                return
            old = self._idle.pop(ws.key, None)
            self._idle[ws.key] = ws
            if ws.chain is not None:
                self._by_response[ws.chain.response_id] = ws.key
            spare = [old] if old is not None else []
            while len(self._idle) > WS_MAX_IDLE:
                spare.append(self._idle.popitem(last=False)[1])
            for gone in spare:
                self._forget(gone)
            if self._janitor is None:
                self._janitor = threading.Thread(target=self._sweep_forever,
                                                 name="websocket-janitor", daemon=True)
                self._janitor.start()
        for gone in spare:
            gone.close()

    def begin_opening(self, key):
        """Mark key's socket as being opened; False when it already is (or is open)."""
        with self._lock:
            if key in self._opening or key in self._idle:
                return False
            self._opening.add(key)
            return True

    def done_opening(self, key, ws):
        with self._lock:
            self._opening.discard(key)
        if ws is not None:
            self.put(ws, replace=False)  # a turn may have opened one itself meanwhile

    def _forget(self, ws):
        if ws.chain is not None and self._by_response.get(ws.chain.response_id) == ws.key:
            del self._by_response[ws.chain.response_id]

    def sweep(self):
        """Close the sockets idle too long or near the backend's age limit; answer the pings
        of the others (taken out meanwhile, so no turn uses them at the same time)."""
        now = time.monotonic()
        with self._lock:
            stale = [k for k, ws in self._idle.items()
                     if ws.idle_for(now) > WS_UPSTREAM_IDLE_SECONDS or now - ws.opened > WS_MAX_AGE]
            gone = [self._idle.pop(k) for k in stale]
            for ws in gone:
                self._forget(ws)
            socks = {ws.sock: k for k, ws in self._idle.items()}
        for ws in gone:
            ws.close()
        try:
            readable = readable_sockets(list(socks), 0) if socks else []
        except (OSError, ValueError):
            readable = []
        for sock in readable:
            with self._lock:
                ws = self._idle.get(socks[sock])
                if ws is None or ws.sock is not sock:
                    continue  # taken for a turn meanwhile: that turn answers the ping
                del self._idle[socks[sock]]
                self._forget(ws)
            used = ws.used
            if ws.settle_idle(self.on_text):
                self.put(ws, replace=False)
                ws.used = used  # a ping is not a use: the idle clock keeps running
            else:
                ws.close()

    def _sweep_forever(self):
        while not self._closed.wait(self.SWEEP_EVERY):
            try:
                self.sweep()
            except Exception:  # a surprise must not end the sweeping for good
                pass

    def __len__(self):
        return len(self._idle)

    def close_all(self):
        """The proxy stops: its sockets close, and the janitor ends."""
        self._closed.set()
        with self._lock:
            gone = list(self._idle.values())
            self._idle.clear()
            self._by_response.clear()
        for ws in gone:
            ws.close()


class TransportChoice:
    """--upstream-transport and what became of it: in auto, a refused upgrade means HTTP for
    a while. What /status shows."""

    def __init__(self, mode):
        self.mode = mode
        self.http_until = 0.0
        self.why = {"auto": "a conversation's turns go over its WebSocket from its third; "
                            "HTTP while the backend refuses the upgrade",
                    "ws": "--upstream-transport ws",
                    "http": "--upstream-transport http"}[mode]

    def websocket_now(self):
        return self.mode == "ws" or (self.mode == "auto" and time.monotonic() >= self.http_until)

    def refused(self, why):
        self.http_until = time.monotonic() + WS_FALLBACK_SECONDS
        self.why = "%s; HTTP until %s" % (why, iso_time(time.time() + WS_FALLBACK_SECONDS))

    def worked(self):
        if self.http_until:
            self.http_until = 0.0
            self.why = "the backend accepted the WebSocket upgrade again"

    def report(self):
        return {"configured": self.mode,
                "in_use": "websocket" if self.websocket_now() else "http", "why": self.why}


# A frame's type, read without decoding it: deltas pass through as bytes, as over HTTP.
_EVENT_TYPE_RE = re.compile(rb'\{\s*"type"\s*:\s*"([A-Za-z0-9_.]{1,100})"')
_DECODED_FRAME_TYPES = frozenset(name.encode() for name in INSPECTED_EVENTS) | {
    b"codex.rate_limits"}


class WebSocketEvents:
    """One turn's events over the backend's socket, as an event stream: each read, the text
    frames already buffered (at least one) as (type, data) events, the data as received.
    codex.rate_limits frames go to the quota, pings are answered, an error frame takes the
    HTTP stream's shape. The terminal event ends the stream; the socket then serves the
    next turn (settle)."""

    def __init__(self, owner, ws, request, headers=(), dump=None):
        self.owner = owner
        self.ws = ws
        self.request = request
        self.headers = forwarded_response_headers(headers)
        self.sock = ws.sock
        self.dump = dump
        self.complete = False
        self.terminal = None
        self.seen = ResponseAssembler()  # what the pool keeps of the turn: its output
        self._pending = []
        self._broken = None  # what ends the stream (a protocol error), once its events are read

    def read(self):
        """The next batch of events; None once the socket closed."""
        out, self._pending = self._pending, []
        if not self.complete:
            if self._broken is not None:
                raise http.client.HTTPException(self._broken)
            try:
                if not out:
                    event = self.next_event()
                    if event is None:
                        return None
                    out.append(event)
                while not self.complete:
                    event = self.next_event(buffered_only=True)
                    if event is None:
                        break
                    out.append(event)
            except ValueError as e:
                # kept as text: an exception kept here would hold, through its traceback,
                # this stream and the frames that read the bad message
                self._broken = "WebSocket protocol error: %s" % e
                if not out:
                    raise http.client.HTTPException(self._broken)
                # the events before the bad frame were good: they go first, the failure next
        if not out:
            return None
        batch = EventBatch(events=out)
        if self.dump:
            self.dump.body += batch.sse()
        return batch

    def next_event(self, buffered_only=False):
        """The next event; None when the socket closed (buffered_only: or when no whole
        message is buffered)."""
        while True:
            try:
                message = self.ws.reader.message(self.ws.pong, buffered_only)
            except EOFError:
                return None
            if message is None:
                return None
            opcode, payload = message
            if opcode == OP_CLOSE:
                self.ws.close()
                return None
            if opcode != OP_TEXT:
                raise ValueError("a binary frame")
            event = self.owner.event_of(payload, self)
            if event is not None:
                return event

    def note(self, event):
        etype = event["type"]
        self.seen.add(etype, event)
        if etype in TERMINAL_EVENTS or etype == "error":
            self.complete, self.terminal = True, etype

    def output(self):
        return assemble_response(self.seen.response or {}, self.seen.output()).get("output", [])

    def close(self):
        """Cut at once: a socket closed mid-answer is how generation stops."""
        self.ws.close()

    def settle(self):
        """The turn is over: the socket goes back to its conversation's pool."""
        self.owner.finish_turn(self)

    def drain(self):
        if not self.complete:
            self.ws.close()
        self.settle()

    def dump_done(self):
        if self.dump:
            self.dump.finish()


class WebSocketUpstream:
    """Responses requests over the backend's sockets: which socket, which items, and the
    recoveries that cost the client nothing. Credentials, dumps and quota are the upstream
    client's, as over HTTP."""

    def __init__(self, client):
        self.client = client
        self.config = client.config
        self.log = client.log
        self.url = websocket_url(client.config.upstream_url)
        self.pool = WebSocketPool(self.on_idle_text)
        self.choice = TransportChoice(client.config.upstream_transport
                                      if client.config.mode == "chatgpt" else "http")

    def send(self, request, policy):
        """The events answering request over a socket; None when it must go over HTTP
        instead (in auto mode: a conversation without a socket yet, a refused upgrade; a
        request above the backend's message size). policy: its retries (see RetryPolicy)."""
        fresh = False  # the next try must open a new socket and send the full input
        turn_state = None
        for attempt in range(WS_RECOVERIES + 2):
            request.body = policy.body
            creds = policy.credentials()
            identity = (creds.access_token, creds.account_id, request.version)
            ws = None if fresh else self.take(request, identity)
            reused = ws is not None
            if ws is None and attempt == 0 and self.choice.mode == "auto":
                return None  # this turn over HTTP; see prewarm_for
            if ws is None:
                try:
                    ws = self.open(creds, request, identity, turn_state)
                except HandshakeRefused as e:  # a 401
                    policy.after_401(creds, "backend refused the WebSocket upgrade with 401",
                                     forwarded_response_headers(e.headers))
                    continue
                if ws is None:
                    return None
            turn_state = ws.turn_state or turn_state
            payload, chained = self.message(ws, request)
            if ws.max_message_bytes and len(payload) > ws.max_message_bytes:
                self.log.info("request of %d bytes is above the backend's WebSocket message "
                              "limit (%d): sent over HTTP" % (len(payload), ws.max_message_bytes))
                self.pool.put(ws)
                return None
            dump = self.dump(request, ws, payload)
            try:
                ws.sock.settimeout(self.config.stream_idle_timeout)
                ws.send_text(payload)
                events = WebSocketEvents(self, ws, request, ws.headers if not reused else [],
                                         dump)
                first = self.first_event(ws, events)
            except ErrorFrame as e:  # before any event reached the client: decided here
                if dump:
                    dump.finish(json.dumps(e.event).encode())
                ws.close()
                error = e.event.get("error") if isinstance(e.event.get("error"), dict) \
                    else e.event
                code = error.get("code")
                if code in WS_RECOVERABLE_CODES:
                    self.log.info("backend answered %s on the WebSocket; new socket, full "
                                  "input" % code)
                    fresh = True
                    continue
                status = e.event.get("status") or e.event.get("status_code")
                if status == 401:
                    policy.after_401(creds, "backend answered 401 on the WebSocket")
                    continue
                if policy.after_rejected_param(status, json.dumps(e.event).encode()):
                    continue
                raise self.error_from_frame(e.event, status)
            except socket.timeout:
                ws.close()
                if dump:
                    dump.finish()
                raise ProxyError(504, "The backend did not answer in time.",
                                 code="upstream_timeout")
            except (OSError, EOFError, ValueError) as e:
                ws.close()
                if dump:
                    dump.finish()
                if reused:  # closed while idle: nothing of this turn reached anyone
                    fresh = True
                    continue
                raise ProxyError(502, "The backend closed the WebSocket without answering "
                                 "(%s)." % e.__class__.__name__, code="upstream_unreachable")
            if chained:
                self.log.debug("turn chained on its socket: previous_response_id + %d new "
                               "items" % chained)
            self.choice.worked()
            events._pending.append(first)
            return events
        raise ProxyError(502, "The backend kept refusing the conversation's WebSocket turns.",
                         code="upstream_unreachable")

    def prewarm_for(self, request):
        """auto: what opens the socket of request's conversation in the background once the
        client has its HTTP turn's answer (see turn_over), so no turn waits for a handshake (a
        round trip more than HTTP on a kept-alive connection) nor shares the proxy's time with
        one; None when there is nothing to open. Only for a conversation that goes on (its
        input holds earlier output): a one-off request gets no socket."""
        if not continues_conversation(request):
            return None
        key = request.session_id

        def run():
            if not self.pool.begin_opening(key):
                return  # being opened, or opened, for another turn
            ws = None
            try:
                creds = self.client.auth.get()
                ws = self.open(creds, request,
                               (creds.access_token, creds.account_id, request.version), None)
            except Exception as e:  # the HTTP turn is unaffected; the next may try again
                self.log.debug("WebSocket prewarm failed: %s" % e)
            self.pool.done_opening(key, ws)

        return lambda: threading.Thread(target=run, name="websocket-open", daemon=True).start()

    def take(self, request, identity):
        ws = self.pool.take(request.session_id, request.previous)
        if ws is None:
            return None
        if ws.identity == identity and ws.settle_idle(self.on_idle_text):
            ws.key = request.session_id
            return ws
        ws.close()  # a refreshed token, another version, or closed by the backend
        return None

    def open(self, creds, request, identity, turn_state):
        """A new socket for request's conversation; None when this request must go over HTTP
        (auto mode, upgrade refused or unreachable). A 401 is raised as HandshakeRefused."""
        headers = [(k, v) for k, v in self.client.codex_headers(
            creds, request.session_id, request.headers, version=request.version).items()
            if k not in ("Accept", "Content-Type")]
        headers.append(WS_BETA_HEADER)
        if turn_state:
            headers.append(("x-codex-turn-state", turn_state))
        parts = urllib.parse.urlsplit(self.url)
        secure = parts.scheme == "wss"
        sock = None
        try:
            sock = socket.create_connection((parts.hostname, parts.port or (443 if secure
                                                                            else 80)),
                                            timeout=self.client.pool.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure:
                pool = self.client.pool
                sock = pool.ssl_context().wrap_socket(sock, server_hostname=parts.hostname)
            answer, rest = client_handshake(sock, self.url, headers)
        except HandshakeRefused as e:
            if sock is not None:
                sock.close()
            self.client.quota.update(e.headers)
            if e.status == 401:
                raise
            if e.status in (400, 429):  # the request's or the account's fault: over HTTP too
                err = translate_upstream_error(e.status, b"")
                err.headers = forwarded_response_headers(e.headers)
                raise err
            return self.refused("the backend refused the WebSocket upgrade (HTTP %d)"
                                % e.status)
        except ValueError as e:
            if sock is not None:
                sock.close()
            if "line break" in str(e):
                raise ProxyError(500, "A header for the backend has an invalid value; check "
                                 "the token or key in auth.json (a stray line break?).",
                                 code="invalid_credential")
            return self.refused("the backend's WebSocket handshake failed (%s)" % e)
        except (OSError, EOFError) as e:
            if sock is not None:
                sock.close()
            return self.refused("cannot open a WebSocket to the backend (%s)"
                                % (getattr(e, "strerror", None) or e.__class__.__name__))
        self.client.quota.update(answer)
        ws = UpstreamWebSocket(sock, rest, answer, identity, request.session_id,
                               self.config.max_body_bytes)
        ws.request_headers = headers
        return ws

    def refused(self, why):
        """auto: note it and let HTTP carry the request; ws: the client's error."""
        if self.choice.mode == "auto":
            if self.choice.websocket_now():
                self.log.info("%s; using HTTP for %d min" % (why, WS_FALLBACK_SECONDS // 60))
            self.choice.refused(why)
            return None
        raise ProxyError(502, "%s%s, and --upstream-transport ws allows no HTTP fallback; "
                         "use --upstream-transport auto or http." % (why[:1].upper(), why[1:]),
                         code="websocket_refused")

    def message(self, ws, request):
        """(the response.create message for request on ws, how many items it chains with
        previous_response_id, 0 when it sends the full input)."""
        body = request.body
        items = ws.chain.new_items(body) if ws.chain is not None else None
        if items is not None:
            body = dict(body, previous_response_id=ws.chain.response_id, input=items)
        encoded = request.encode(body)
        self.log.debug_body("upstream WebSocket message", encoded)
        return b'{"type":"response.create",' + encoded[1:], len(items) if items else 0

    def dump(self, request, ws, payload):
        dumper = self.client.dumper
        if not dumper:
            return None
        dump = dumper.request("WEBSOCKET", self.url, ws.request_headers, payload)
        dump.answer(101, ws.headers)
        return dump

    def first_event(self, ws, events):
        """The turn's first event; ErrorFrame for an error frame, which decides the request
        before the client hears anything."""
        while True:
            opcode, payload = ws.reader.message(ws.pong)
            if opcode == OP_CLOSE:
                raise EOFError("the backend closed the WebSocket")
            if opcode != OP_TEXT:
                raise ValueError("a binary frame")
            event = self.decode(payload)
            if event is not None and event.get("type") == "error":
                raise ErrorFrame(event)
            found = self.event_of(payload, events, event)
            if found is not None:
                return found

    @staticmethod
    def decode(payload):
        try:
            event = json.loads(payload)
        except ValueError:
            return None
        return event if isinstance(event, dict) else None

    def event_of(self, payload, events, event=None):
        """A received text frame as an event (type, data); None for frames the client never
        sees. A delta is not decoded: its type is read from its first bytes."""
        if event is None:
            m = _EVENT_TYPE_RE.match(payload)
            if m and m.group(1) not in _DECODED_FRAME_TYPES:
                return m.group(1).decode(), payload
            event = self.decode(payload)
        if event is None:
            return None  # unparseable: skipped, as the Codex CLI does
        etype = event.get("type")
        if etype == "codex.rate_limits":
            self.client.quota.update(rate_limit_headers(event))
            return None
        if not isinstance(etype, str) or "\n" in etype:
            return None
        events.note(event)
        if etype == "error" and isinstance(event.get("error"), dict):
            error = event["error"]  # the HTTP stream's shape: code and message at the top
            return "error", json.dumps({"type": "error", "code": error.get("code"),
                                        "message": error.get("message"),
                                        "param": None}).encode()
        return etype, payload

    def on_idle_text(self, payload):
        event = self.decode(payload)
        if event is not None and event.get("type") == "codex.rate_limits":
            self.client.quota.update(rate_limit_headers(event))

    def error_from_frame(self, frame, status):
        """An error frame with a status, as the HTTP error it stands for."""
        headers = frame.get("headers") if isinstance(frame.get("headers"), dict) else {}
        pairs = [(str(k), str(v).lower() if isinstance(v, bool) else str(v))
                 for k, v in headers.items() if isinstance(v, (str, int, float, bool))]
        self.client.quota.update(pairs)
        if not isinstance(status, int) or not 400 <= status < 600:
            error = frame.get("error") if isinstance(frame.get("error"), dict) else {}
            code = error.get("code") or "upstream_error"
            err = ProxyError(failure_status(code), error.get("message") or
                             "The backend reported an error (%s)." % code, code=code)
        else:
            err = translate_upstream_error(status, json.dumps(frame).encode())
        err.headers = forwarded_response_headers(pairs)
        return err

    def finish_turn(self, events):
        """After the terminal event: a completed turn's socket goes back to the pool with what
        the backend now remembers; a failed one's without; an error's is closed."""
        ws = events.ws
        if events.terminal == "error" or ws.closed:
            ws.close()
            return
        response_id = (events.seen.response or {}).get("id")
        request = events.request
        if events.terminal == "response.completed" and isinstance(response_id, str) and \
                isinstance(request.body.get("input"), list):
            ws.chain = Chain(response_id, request_shape(request.body),
                             list(request.body["input"]) + events.output())
        else:
            ws.chain = None
        self.pool.put(ws)

    def close(self):
        self.pool.close_all()


# --------------------------------------------------------------------------------------------
# Upstream: credentials: load auth.json, find the account id, refresh, save atomically
# --------------------------------------------------------------------------------------------

REFRESH_MARGIN = 60  # seconds before `exp` at which a token counts as expired
REFRESH_AGE_WITHOUT_EXP = 8 * 24 * 3600  # the Codex CLI's rule for tokens without `exp`
PERMANENT_REFRESH_CODES = ("refresh_token_expired", "refresh_token_reused",
                           "refresh_token_invalidated")
LOGIN_HINT = "Log in with `python3 codex_responses_proxy.py login` (or `codex login`)."
AUTH_SETTLE_SECONDS = 0.5   # an empty or garbled auth.json may be a rewrite in progress
AUTH_WRITE_LOCK_WAIT = 2.0  # the Codex CLI holds auth.json.lock only while it writes


def jwt_claims(token):
    """The payload of a JWT as a dict, {} when it is not one (no signature check: we only read
    our own token's expiry and account)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
        return claims if isinstance(claims, dict) else {}
    except (AttributeError, IndexError, ValueError, TypeError, UnicodeError):
        return {}


def parse_rfc3339(text):
    """'2026-01-02T03:04:05.123456789Z' -> aware datetime, None when unparseable. Written by
    hand because fromisoformat() on 3.8 takes neither 'Z' nor nanoseconds."""
    m = re.match(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                 r"(?:([Zz])|([+-])(\d\d):?(\d\d))?$", text or "")
    if not m:
        return None
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    offset = datetime.timedelta(0)
    if sign:
        offset = datetime.timedelta(hours=int(oh), minutes=int(om)) * (1 if sign == "+" else -1)
    try:
        return datetime.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), micro,
                                 tzinfo=datetime.timezone(offset))
    except ValueError:
        return None


def rfc3339_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Credentials:
    """The ChatGPT tokens of one auth.json, with what the proxy derives from them."""

    def __init__(self, data):
        tokens = data.get("tokens") if isinstance(data.get("tokens"), dict) else {}
        self.data = data  # the whole file, so a rewrite keeps keys we do not know
        # A value of another type than a string is as good as absent (a hand-edited file)
        self.access_token = _text(tokens.get("access_token"))
        self.refresh_token = _text(tokens.get("refresh_token"))
        self.id_token = _text(tokens.get("id_token"))
        access = jwt_claims(self.access_token)
        ident = jwt_claims(self.id_token)
        self.expires_at = access.get("exp") if isinstance(access.get("exp"), (int, float)) else None
        self.account_id = (_text(tokens.get("account_id"))
                           or _auth_claim(ident, "chatgpt_account_id")
                           or _auth_claim(access, "chatgpt_account_id"))
        self.plan_type = _auth_claim(ident, "chatgpt_plan_type") or _auth_claim(
            access, "chatgpt_plan_type")
        self.last_refresh = parse_rfc3339(_text(data.get("last_refresh")))
        # The Codex CLI then sends X-OpenAI-Fedramp: true, and so do we.
        auth = ident.get("https://api.openai.com/auth")
        self.fedramp = isinstance(auth, dict) and auth.get("chatgpt_account_is_fedramp") is True

    def needs_refresh(self, now=None):
        now = time.time() if now is None else now
        if self.expires_at is not None:
            return self.expires_at - now < REFRESH_MARGIN
        if self.last_refresh is not None:
            return now - self.last_refresh.timestamp() > REFRESH_AGE_WITHOUT_EXP
        return False

    def secrets(self):
        return [t for t in (self.access_token, self.refresh_token, self.id_token) if t]


def _text(value):
    return value if isinstance(value, str) and value else None


def _auth_claim(claims, name):
    auth = claims.get("https://api.openai.com/auth")
    return _text(auth.get(name)) if isinstance(auth, dict) else None


def auth_error(path, reason, status=401, code="codex_login_required"):
    return ProxyError(status, "%s %s" % (reason, LOGIN_HINT) if status == 401 else reason,
                      code=code)


def read_auth_file(path):
    """auth.json -> Credentials; every way it can be unusable is a 401 that names the path and
    says what to do. An empty or unparseable file is read again for a moment before it counts
    as broken: some Codex CLIs rewrite auth.json in place (truncate, then write), and a reader
    can catch it between the two."""
    deadline = time.monotonic() + AUTH_SETTLE_SECONDS
    while True:
        raw = _read_auth_bytes(path)
        try:
            data = json.loads(raw.decode("utf-8"))
            break
        except ValueError:
            if time.monotonic() >= deadline:
                raise auth_error(path, "%s is %s." % (path, "not valid JSON" if raw.strip()
                                                      else "empty"))
            time.sleep(0.02)
    if not isinstance(data, dict):
        raise auth_error(path, "%s does not hold a JSON object." % path)
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or not _text(tokens.get("access_token")):
        if data.get("OPENAI_API_KEY") or data.get("auth_mode") == "apikey":
            raise auth_error(path, "%s holds an API-key login, not a ChatGPT one; this proxy needs "
                             "a ChatGPT sign-in. Run `codex login` and choose ChatGPT." % path)
        raise auth_error(path, "%s has no ChatGPT tokens." % path)
    return Credentials(data)


def _read_auth_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise auth_error(path, "No Codex login found: %s does not exist. If your Codex CLI keeps "
                         "credentials in the OS keyring, set cli_auth_credentials_store = \"file\" "
                         "in config.toml first." % path)
    except OSError as e:
        raise auth_error(path, "Cannot read %s (%s): check its owner and permissions."
                         % (path, e.strerror or e))


def write_auth_file(path, data):
    write_file_atomic(path, lambda f: (json.dump(data, f, indent=2), f.write("\n")), 0o600)


def write_file_atomic(path, write, mode):
    """Atomic replace: a crash at any point leaves the old file or the new one, never half.
    write(f) fills the temporary file. A symlink is written through: the temporary file goes
    next to the link's target and replaces that, so the link stays a link and its target does
    not keep a used-up refresh token."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def probe_writable(directory):
    """Raises OSError unless a new auth.json can be made in directory (it is written beside,
    then renamed)."""
    fd, probe = tempfile.mkstemp(prefix=".auth.json.", suffix=".probe", dir=directory)
    os.close(fd)
    os.unlink(probe)


class RefreshFailed(Exception):
    def __init__(self, message, code=None, permanent=False):
        super().__init__(message)
        self.code = code
        self.permanent = permanent


def refresh_error_code(body):
    """The code of an OAuth error body, in any of the shapes the server uses."""
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, dict):
        return err.get("code") or err.get("type")
    if isinstance(err, str):
        return err
    return data.get("code")


def request_token_refresh(url, refresh_token, user_agent, reason):
    """reason: the CLI's refresh_reason, "proactive_expiry" or "unauthorized_recovery"."""
    # Imported here: urllib.request costs ~1.5 MB and a refresh happens about once an hour.
    import urllib.error
    import urllib.request

    body = json.dumps({"client_id": OAUTH_CLIENT_ID, "grant_type": "refresh_token",
                       "refresh_token": refresh_token, "refresh_reason": reason}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json",
        "User-Agent": user_agent})
    try:
        with urllib.request.urlopen(req, timeout=REFRESH_TIMEOUT) as resp:
            answer = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        try:
            code = refresh_error_code(e.read(65536))
        except (OSError, http.client.HTTPException):
            code = None
        permanent = e.code == 401 or code in PERMANENT_REFRESH_CODES
        raise RefreshFailed("token refresh answered HTTP %d%s" % (e.code, " (%s)" % code if code
                                                                 else ""), code, permanent)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise RefreshFailed("token refresh failed: %s" % reason)
    except ValueError:
        raise RefreshFailed("token refresh answered something that is not JSON")
    if not isinstance(answer, dict) or not any(
            isinstance(answer.get(k), str) for k in ("access_token", "id_token", "refresh_token")):
        raise RefreshFailed("token refresh answered without tokens")
    return answer


class _FileLock:
    """flock on a side file of CODEX_HOME, as the Codex CLI takes it. Waits up to `wait`
    seconds, polling (a blocking flock cannot time out, and a stuck holder must not stop us
    forever); `acquired` is False only when another process held it all that time."""

    def __init__(self, path, wait):
        self.path = path
        self.wait = wait
        self.fd = None
        self.acquired = True

    def __enter__(self):
        if fcntl is None:
            return self  # Windows: no advisory locks; the in-process lock still serializes
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return self  # a read-only CODEX_HOME still works, just without the cross-process lock
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.acquired = False
                    return self
                time.sleep(0.02)

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


class AuthStore:
    """The current credentials, cheap to ask for: auth.json is parsed again only when its
    stat changes. Refreshes are single-flight in the process and follow the Codex CLI's lock
    protocol across processes (docs/backend.md §2), so that the CLI, this proxy and other proxies
    never redeem one refresh token twice: $CODEX_HOME/auth.lock, waited for, around re-read,
    refresh and write; auth.json.lock only around the write itself, because the CLI takes that
    one without waiting and cannot save its own refresh while someone else holds it."""

    def __init__(self, path, refresh_url, user_agent, log):
        self.path = path
        self.refresh_lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), "auth.lock")
        self.write_lock_path = path + ".lock"
        self.refresh_url = refresh_url
        self.user_agent = user_agent
        self.log = log
        self._lock = threading.Lock()
        self._cache = (None, None)  # (stat key, Credentials), replaced whole: threads read it
        self._attempts = 0          # refresh attempts made, and the error of the last if it
        self._failure = None        # failed: threads that waited for it share that outcome
        # A refresh token that failed for good, in the auth.json version it came from:
        self._dead = None  # ((stat key, refresh token), (status, message, code))
        self._saving = threading.Lock()  # held from redeeming a refresh token to saving the next
        self._stopped = False
        self.last_refresh = None  # {"at", "ok", "error"} of the last attempt, for /status

    def _stat_key(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self, reread=False):
        """Credentials as on disk now, cached while the file's stat is unchanged. reread: parse
        the file anyway; under auth.lock a rewrite within one timestamp tick must not be missed."""
        key = self._stat_key()
        cached_key, cached = self._cache
        if not reread and key is not None and key == cached_key:
            return cached
        creds = read_auth_file(self.path)
        for secret in creds.secrets():
            self.log.add_secret(secret)
        self._cache = (key, creds)
        return creds

    def get(self, rejected_token=None):
        """Usable credentials. rejected_token: the access token the backend just refused with
        401; then a refresh happens unless someone else has already replaced that token."""
        creds = self.load()
        if not self._stale(creds, rejected_token):
            return creds
        self._check_dead(creds)
        attempts = self._attempts
        with self._lock:
            creds = self.load()  # another thread (or the Codex CLI) may have refreshed by now
            if not self._stale(creds, rejected_token):
                return creds
            if self._attempts != attempts and self._failure is not None:
                # The refresh we waited for failed: share its outcome, no queue of retries.
                status, message, code = self._failure
                raise ProxyError(status, message, code=code)
            self._check_dead(creds)
            try:
                creds = self._refresh_locked(rejected_token)
            except ProxyError as e:
                self._failure = (e.status, e.message, e.code)
                raise
            except Exception as e:
                self._failure = (502, "Could not refresh the ChatGPT access token (%s)."
                                 % e.__class__.__name__, "token_refresh_failed")
                raise ProxyError(*self._failure[:2], code=self._failure[2])
            finally:
                self._attempts += 1
            self._failure = None
            return creds

    def stop_refreshing(self, timeout):
        """At shutdown: wait for a refresh in progress to save its result, and let no new one
        begin. False if one was still running after timeout seconds."""
        self._stopped = True
        if not self._saving.acquire(timeout=timeout):
            return False
        self._saving.release()
        return True

    def _note_refresh(self, error):
        self.last_refresh = {"at": rfc3339_now(), "ok": error is None, "error": error}

    @staticmethod
    def _stale(creds, rejected_token):
        if rejected_token is not None:
            return creds.access_token == rejected_token
        return creds.needs_refresh()

    def _check_dead(self, creds):
        """A refresh token that failed for good is not sent again while auth.json stays as it
        was: every request hears at once that a new login is needed."""
        dead = self._dead
        if dead is not None and dead[0] == (self._stat_key(), creds.refresh_token):
            raise ProxyError(*dead[1][:2], code=dead[1][2])

    def _refresh_locked(self, rejected_token):
        with _FileLock(self.refresh_lock_path, REFRESH_TIMEOUT + 5) as lock:
            if not lock.acquired:
                # Refreshing anyway could redeem the refresh token the holder is redeeming.
                raise ProxyError(503, "Another process (the Codex CLI?) has held %s for %d s "
                                 "while refreshing the login; not refreshing beside it. Try again "
                                 "shortly." % (self.refresh_lock_path, lock.wait),
                                 code="token_refresh_failed")
            creds = self.load(reread=True)  # ... or another process, the CLI included
            if not self._stale(creds, rejected_token):
                return creds
            return self._refresh(creds, "unauthorized_recovery" if rejected_token is not None
                                 else "proactive_expiry")

    def _refresh(self, creds, reason):
        if not creds.refresh_token:
            raise auth_error(self.path, "The access token in %s has expired and there is no "
                             "refresh token." % self.path)
        self._check_writable()
        with self._saving:
            if self._stopped:
                raise ProxyError(503, "The proxy is shutting down.", code="shutting_down")
            self.log.info("refreshing the access token (%s)" % reason)
            try:
                answer = request_token_refresh(self.refresh_url, creds.refresh_token,
                                               self.user_agent, reason)
            except RefreshFailed as e:
                return self._refresh_failed(creds, e)
            fresh = self._save(creds, answer)
        self.log.info("access token refreshed")
        return fresh

    def _refresh_failed(self, creds, e):
        if e.code == "refresh_token_reused":
            # A process outside the lock protocol (an older Codex CLI) may have rotated the
            # token a moment ago: its result is on disk.
            fresh = self.load(reread=True)
            if fresh.refresh_token != creds.refresh_token:
                self.log.info("refresh token was already rotated by another process; "
                              "using its tokens")
                self._note_refresh(None)
                return fresh
        self._note_refresh(str(e))
        self.log.info("token refresh failed: %s" % e)
        if e.permanent:
            error = ProxyError(401, "Your ChatGPT login can no longer be refreshed (%s). %s"
                               % (e.code or "unauthorized", LOGIN_HINT),
                               code=e.code or "refresh_failed")
            self._dead = ((self._stat_key(), creds.refresh_token),
                          (error.status, error.message, error.code))
            raise error
        raise ProxyError(502, "Could not refresh the ChatGPT access token: %s. The next "
                         "request will try again." % e, code="token_refresh_failed")

    def _save(self, creds, answer):
        data = dict(creds.data)
        tokens = dict(data.get("tokens") or {})
        for name in ("id_token", "access_token", "refresh_token"):
            if isinstance(answer.get(name), str) and answer[name]:
                tokens[name] = answer[name]
                self.log.add_secret(answer[name])
        data["tokens"] = tokens
        data["last_refresh"] = rfc3339_now()
        # Written even when the lock stays held: the old refresh token is spent, and its
        # successor exists nowhere else.
        with _FileLock(self.write_lock_path, AUTH_WRITE_LOCK_WAIT):
            try:
                write_auth_file(self.path, data)
            except OSError as e:
                # Say loudly that the new refresh token is only in memory.
                self.log.info("warning: could not write %s (%s); the refreshed tokens live only "
                              "in this process" % (self.path, e.strerror or e))
        self._note_refresh(None)
        fresh = Credentials(data)
        self._cache = (self._stat_key(), fresh)
        return fresh

    def _check_writable(self):
        """Redeeming the refresh token uses it up: refuse unless its successor can be saved,
        or the Codex CLI's own login would be left holding a dead token."""
        directory = os.path.dirname(os.path.realpath(self.path))
        try:
            probe_writable(directory)
        except OSError as e:
            raise ProxyError(500, "The access token has expired, but %s is not writable (%s), so "
                             "a refreshed login could not be saved; not refreshing. Fix the "
                             "directory's permissions." % (directory, e.strerror or e),
                             code="codex_home_not_writable")


# --------------------------------------------------------------------------------------------
# Upstream: exchange dumps (--dump-dir), in the Codex CLI's responses-api-proxy format
# --------------------------------------------------------------------------------------------

REDACTED_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")


def dump_headers(headers):
    return [{"name": k, "value": "[REDACTED]" if k.lower() in REDACTED_HEADERS else
             (v.decode("latin-1") if isinstance(v, bytes) else str(v))} for k, v in headers]


def dump_body(body):
    """JSON when it parses, else the text (a stream: its raw SSE)."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


class ExchangeDumper:
    """NNNNNN-<unix ms>-request.json and -response.json per upstream exchange, mode 0600, in a
    directory of mode 0700. Dumps hold whole conversations: an existing directory is made
    0700 too, and one that belongs to another user is refused (its owner could read them)."""

    def __init__(self, directory, log):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.stat(directory)
        except OSError as e:
            raise StartupError("--dump-dir %s: %s." % (directory, e.strerror or e))
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise StartupError("--dump-dir %s belongs to another user (uid %d); dumps hold "
                               "whole conversations, so the proxy writes them only into a "
                               "directory of its own user. Choose another --dump-dir."
                               % (directory, st.st_uid))
        if st.st_mode & 0o077:
            os.chmod(directory, 0o700)
            log.info("made --dump-dir %s private (mode 0700, was %04o)"
                     % (directory, st.st_mode & 0o7777))
        self.directory = directory
        self.log = log
        self._next = 1
        self._lock = threading.Lock()

    def request(self, method, url, headers, body):
        with self._lock:
            seq, self._next = self._next, self._next + 1
        prefix = os.path.join(self.directory, "%06d-%d" % (seq, int(time.time() * 1000)))
        self._write(prefix + "-request.json", {"method": method, "url": url,
                                               "headers": dump_headers(headers),
                                               "body": dump_body(body or b"")})
        return ExchangeDump(self, prefix + "-response.json")

    def _write(self, path, obj):
        data = (self.log.redact(json.dumps(obj, indent=2)) + "\n").encode()
        try:
            # A new file only: a file or symlink already at this name was put there by someone
            # else, and following or overwriting it could clobber or leak some other file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except FileExistsError:
            self.log.info("cannot write dump %s: something is already there (left as it is)"
                          % path)
        except OSError as e:
            self.log.info("cannot write dump %s: %s" % (path, e.strerror or e))


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows


class ExchangeDump:
    """The response half: the body is gathered as it is relayed and written at the end."""

    def __init__(self, dumper, path):
        self.dumper = dumper
        self.path = path
        self.status = None
        self.headers = []
        self.body = bytearray()
        self.written = False

    def answer(self, status, headers):
        self.status, self.headers = status, headers

    def finish(self, body=b""):
        if self.written:
            return
        self.written = True
        self.body += body
        self.dumper._write(self.path, {"status": self.status,
                                       "headers": dump_headers(self.headers),
                                       "body": dump_body(bytes(self.body))})


# --------------------------------------------------------------------------------------------
# Relay: a response assembled from its events (pure)
# --------------------------------------------------------------------------------------------

FAILURE_STATUS = {
    "context_length_exceeded": 400, "invalid_prompt": 400, "cyber_policy": 400,
    "invalid_request_error": 400,
    "rate_limit_exceeded": 429, "insufficient_quota": 429, "usage_not_included": 429,
    "usage_limit_reached": 429,
    "server_is_overloaded": 503, "slow_down": 503,
}


def failure_status(code):
    return FAILURE_STATUS.get(code, 500)


class ResponseAssembler:
    """Collects what a stream says about its response: the output items (with store=false they
    arrive only in response.output_item.done events) and the terminal event."""

    def __init__(self):
        self.items = {}
        self.response = None    # the latest `response` object seen
        self.terminal = None    # "response.completed" | "response.failed" | ... | "error"
        self.error = None       # {"code", "message"} for failed and error

    def add(self, etype, payload):
        if etype == "response.output_item.done":
            item = payload.get("item")
            if isinstance(item, dict):
                index = payload.get("output_index")
                self.items[index if isinstance(index, int) else len(self.items)] = item
        elif etype == "error":
            self.terminal = etype
            self.error = {"code": payload.get("code"), "message": payload.get("message"),
                          "param": payload.get("param")}
        elif isinstance(payload.get("response"), dict):
            self.response = payload["response"]
            if etype in TERMINAL_EVENTS:
                self.terminal = etype
                if etype == "response.failed":
                    self.error = dict(self.response.get("error") or {})

    def output(self):
        return [self.items[i] for i in sorted(self.items)]

    def usage(self):
        usage = (self.response or {}).get("usage")
        return usage if isinstance(usage, dict) else {}


def assemble_response(response, items):
    """The final response object: the backend's, with `output` rebuilt from the streamed
    items when it came back empty (it always does with store=false)."""
    result = dict(response)
    if not result.get("output") and items:
        result["output"] = list(items)
    result.setdefault("object", "response")
    return result


def sse_event(name, data):
    """One SSE frame as the backend writes them: an `event:` line, one `data:` line."""
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


def completed_event_data(payload, items):
    """The response.completed (or .incomplete) event again, its output filled in."""
    filled = dict(payload)
    filled["response"] = assemble_response(payload["response"], items)
    return json.dumps(filled, separators=(",", ":")).encode()


def error_event_bytes(code, message):
    event = {"type": "error", "code": code, "message": message, "param": None}
    return sse_event(b"error", json.dumps(event).encode())


def utc_datetime(timestamp):
    """A Unix time as an aware datetime; None for None or a number no calendar has (the
    backend's headers and error bodies are not ours to trust)."""
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _describe_reset(error):
    """'... It resets at 14:05 UTC (in 2 h 13 min).' for a usage-limit 429."""
    seconds = error.get("resets_in_seconds")
    at = error.get("resets_at")
    if not isinstance(seconds, (int, float)) and isinstance(at, (int, float)):
        seconds = at - time.time()
    if not isinstance(seconds, (int, float)):
        return ""
    if not isinstance(at, (int, float)):
        at = time.time() + seconds
    when = utc_datetime(at)
    if when is None or seconds != seconds or abs(seconds) > 10 ** 9:
        return ""  # nonsense from the backend: say nothing rather than fail the answer
    minutes = max(1, int(round(seconds / 60.0)))
    span = "%d h %d min" % divmod(minutes, 60) if minutes >= 60 else "%d min" % minutes
    return " It resets at %s UTC (in %s)." % (when.strftime("%Y-%m-%d %H:%M"), span)


def translate_upstream_error(status, body):
    """An upstream HTTP error -> the ProxyError the client sees, status kept."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    extra = {}
    code = None
    param = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        extra = {k: v for k, v in err.items() if k not in ("message", "type", "param", "code")}
        message = err.get("message") or "The backend answered HTTP %d." % status
        if not isinstance(message, str):
            message = json.dumps(message)
        code = err.get("code") or err.get("type")
        param = err.get("param")
        kind = err.get("type")  # e.g. usage_limit_reached, kept for clients that read it
        if status == 429:
            message = message.rstrip(".") + "." + _describe_reset(err)
    elif isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
        kind = None
    else:
        snippet = re.sub(r"<[^>]*>|\s+", " ", text).strip()[:200]
        message = "The backend answered HTTP %d%s." % (status, ": " + snippet if snippet else "")
        if status == 403:
            message += (" This is often Cloudflare refusing the request; check --client-version "
                        "and --originator, or try again later.")
        kind = None
    if status == 401:
        message += " " + LOGIN_HINT
    return ProxyError(status, message, code=code, param=param, type=kind, extra=extra)


# --------------------------------------------------------------------------------------------
# Relay: transforms, the Responses events as each front end's client reads them
# --------------------------------------------------------------------------------------------

# One pass over a block of whole frames finds the frames the relay must read (output items,
# the terminal events, errors) and any frame that does not open with an `event:` line (which
# the full parser then reads). Every other frame passes through as bytes, never decoded.
_INSPECTED_NAMES = b"|".join(re.escape(name.encode()) for name in sorted(INSPECTED_EVENTS))
_FRAME_SCAN_RE = re.compile(rb"\n\n(?:event: ?(%s)\n|(?!event:|\Z))" % _INSPECTED_NAMES)
_FIRST_FRAME_RE = re.compile(rb"event: ?(%s)\n|(?!event:)" % _INSPECTED_NAMES)


class ResponsesTransform:
    """Responses events relayed as they came. Only the events that matter (output items, the
    terminal event, errors) are found, by a bytes search over the frames of a read, and
    decoded; the completed event gets its `output` filled."""

    def __init__(self, log=None):
        self.assembler = ResponseAssembler()
        self._log = log if log is not None and log.debug_enabled else None

    def feed(self, batch):
        """The batch to relay for these whole events."""
        if type(batch) is bytes:
            return self._inspect_block(batch)
        if batch.parsed is not None:  # each event's own bytes, unless it must change
            return EventBatch(sse=b"".join(self._inspect_event(e) for e in batch.parsed))
        return EventBatch(events=[self._inspect_pair(name, data)
                                  for name, data in batch.events()])

    def _inspect_block(self, block):
        """Whole frames: the bytes to relay for them."""
        if self._log:
            for frame in block.split(b"\n\n")[:-1]:
                self._log.debug("stream event %s (%d bytes)" % (
                    frame[6:frame.find(b"\n")].strip().decode("utf-8", "replace"), len(frame) + 2))
        pieces, done = [], 0
        first = _FIRST_FRAME_RE.match(block)
        for m in itertools.chain((first,) if first else (), _FRAME_SCAN_RE.finditer(block)):
            if m.group(1) is None:  # a frame of another shape: all of them through the parser
                return b"".join(self._inspect_event(e) for e in SSEParser().feed(block))
            start = m.start() + 2 if m is not first else 0
            end = block.find(b"\n\n", m.end() - 1) + 2
            changed = self._inspect_data(m.group(1).decode(),
                                         _join_data(block[m.end():end - 2].split(b"\n")))
            if changed is not None:
                pieces.append(block[done:start])
                pieces.append(sse_event(changed[0].encode(), changed[1]))
                done = end
        if not pieces:
            return block
        pieces.append(block[done:])
        return b"".join(pieces)

    def _inspect_event(self, event):
        """The full parser's events: the same inspection, one event at a time."""
        if self._log:
            self._log.debug("stream event %s (%d bytes)" % (event.event, len(event.raw)))
        if (event.event is None or event.event in INSPECTED_EVENTS) and event.data is not None:
            changed = self._inspect_data(event.event, event.data)
            if changed is not None:
                return sse_event(changed[0].encode(), changed[1])
        return event.raw

    def _inspect_pair(self, name, data):
        """An event given as (type, data): the same inspection."""
        if self._log:
            self._log.debug("stream event %s (%d bytes)" % (name, len(data)))
        if name is None or name in INSPECTED_EVENTS:
            changed = self._inspect_data(name, data)
            if changed is not None:
                return changed
        return name, data

    def _inspect_data(self, name, data):
        """Note what an event says; (type, new data) when it must change, else None."""
        try:
            payload = json.loads(data) if data is not None else None
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        etype = payload.get("type") or name
        assembler = self.assembler
        assembler.add(etype, payload)
        if etype in ("response.completed", "response.incomplete") and \
                isinstance(payload.get("response"), dict) and \
                not payload["response"].get("output") and assembler.items:
            return etype, completed_event_data(payload, assembler.output())
        return None

    @staticmethod
    def failure_frames(err):
        return error_event_bytes(err.code, err.message)

    @staticmethod
    def collected(response):
        return response


def decoded_events(events, assembler, log=None):
    """(type, payload) of each (type, data) event whose data is a JSON object, noted by the
    assembler first; the others are skipped, as the Codex CLI skips them."""
    for name, data in events:
        if log:
            log.debug("stream event %s (%d bytes)" % (name, len(data or b"")))
        try:
            payload = json.loads(data) if data is not None else None
        except ValueError:
            continue
        if isinstance(payload, dict):
            etype = payload.get("type") or name
            assembler.add(etype, payload)
            yield etype, payload


class ChatTransform:
    """Responses events -> Chat Completions chunks; every event is decoded, as the
    translation needs nearly all of them."""

    def __init__(self, model, include_usage, log=None):
        self.assembler = ResponseAssembler()
        self.chat = ChatStream(model, include_usage)
        self._log = log if log is not None and log.debug_enabled else None

    def feed(self, batch):
        out = []
        for etype, payload in decoded_events(events_of(batch), self.assembler, self._log):
            out.extend(self.chat.frames(etype, payload))
        return b"".join(out)

    def failure_frames(self, err):
        return b"".join(self.chat.error(err.code, err.message))

    def collected(self, response):
        return chat_completion(response, response.get("output") or [])


# The frames that make most of a stream, and what raw_delta needs of them.
_DELTA_FRAME_RE = re.compile(rb"event: (response\.output_text\.delta|"
                             rb"response\.reasoning_summary_text\.delta|"
                             rb"response\.function_call_arguments\.delta)\ndata: ")
# A whole text delta frame, its fields as the backend orders them (other orders take
# raw_delta's way): the output_index, and the delta as a JSON string. The fields before them
# are spelled out for the layouts seen, as a lazy scan costs twice as much.
_TEXT_DELTA_FRAME_RE = re.compile(
    rb'event: response\.output_text\.delta\ndata: \{(?:"type":"response\.output_text\.delta",'
    rb'(?:"sequence_number":\d+,)?"item_id":"[^"\\\n]*",|[^\n]*?)"output_index":(\d+),'
    rb'"content_index":\d+,"delta":("[^"\\\n]*(?:\\.[^"\\\n]*)*")[^\n]*\n\n')
_DELTA_STRING_RE = re.compile(rb'"delta":\s*("[^"\\]*(?:\\.[^"\\]*)*")')


class MessagesTransform:
    """Responses events -> Anthropic Messages events (see MessagesStream). When a stop
    sequence ends the message, the upstream is cut (cut()) and the stream counts as
    completed, so the relay ends it there."""

    def __init__(self, messages, log=None, cut=None):
        self.assembler = ResponseAssembler()
        self.messages = messages
        self._cut = cut
        self._log = log if log is not None and log.debug_enabled else None
        self._fast = self._log is None  # --debug logs every event: the events' way

    def feed(self, batch):
        """The Messages bytes for these whole events. The backend's own framing (`event:` +
        `data:`, LF) is read frame by frame here, and its deltas, most of a stream, are
        translated from their bytes (MessagesStream.raw_delta); the other frames, and events
        given otherwise, are decoded first."""
        if type(batch) is not bytes or not self._fast:
            return self._translate(events_of(batch))
        buf = batch
        out = []
        stream = self.messages
        pos, end = 0, len(buf)
        while pos < end and not stream.stopped:
            pos = self._copy_text_deltas(buf, pos, out)
            if pos >= end:
                break
            stop = buf.find(b"\n\n", pos)
            frame = buf[pos:stop]
            m = _DELTA_FRAME_RE.match(frame)
            piece = stream.raw_delta(m.group(1), frame, m.end()) if m is not None else None
            if piece is None:
                piece = self._translate([frame_event(frame)]) if frame.strip(b"\n") else b""
            out.append(piece)
            pos = stop + 2
        return b"".join(out)

    def _copy_text_deltas(self, buf, pos, out):
        """raw_delta's work, inlined for the run of text deltas of the open text block from
        buf[pos] on (the bulk of a long answer); where the first frame it left starts."""
        stream = self.messages
        state = stream.open
        if state is None or state["type"] != "text" or stream.stops or not stream.streaming:
            return pos
        index, prefix, match = state["needle"][15:-1], state["prefix"], _TEXT_DELTA_FRAME_RE.match
        chars = seen = 0
        while True:
            delta = match(buf, pos)
            if delta is None or delta.group(1) != index:
                break
            raw = delta.group(2)
            chars += len(raw)
            seen += 1
            out += (prefix, raw, b"}}\n\n")
            pos = delta.end()
        state["seen"] += seen
        stream.text_chars += chars - 2 * seen
        return pos

    def _translate(self, events):
        out = []
        for etype, payload in decoded_events(events, self.assembler, self._log):
            out.append(self.messages.frames(etype, payload))
            if self.messages.stopped:
                self._stop_upstream()
                break
        return b"".join(out)

    def _stop_upstream(self):
        """What the backend would still generate is not wanted: stop paying for it."""
        if self._cut is not None:
            self._cut()
        response = dict(self.assembler.response or {}, status="completed")
        self.assembler.add("response.completed", {"response": response})

    def opening(self):
        return self.messages.opening()

    def failure_frames(self, err):
        return self.messages.error_frame(err)

    def collected(self, response):
        return self.messages.message()


# --------------------------------------------------------------------------------------------
# Relay: sinks, where a transform's output goes (an SSE stream, one collected JSON
# answer, WebSocket messages)
# --------------------------------------------------------------------------------------------

class Sink:
    """Where a transform's output goes: start(headers) before the first event, send(batch)
    for each read's, finish() with the last, stop() once the relay is done in any case."""

    def start(self, headers):
        pass

    def send(self, batch):
        pass

    def stop(self):
        pass


class SSESink(Sink):
    """The client's live event stream: every complete frame as soon as its read is in."""

    def __init__(self, client):
        self.client = client

    def start(self, headers):
        self.client.start_event_stream(headers)

    def send(self, batch):
        self.client.write_body(sse_of(batch))

    def finish(self, transform, tail, failure, headers):
        """The stream's last frames (or an error event) and its end, in one write."""
        tail = sse_of(tail)
        if failure is not None:
            self.client.log_fields["error"] = failure.code
            tail += transform.failure_frames(failure)
        self.client.end_body(tail)


class CollectedSink(Sink):
    """One JSON answer once the stream is over, for a client that did not ask for a stream."""

    def __init__(self, client):
        self.client = client

    def finish(self, transform, tail, failure, headers):
        if failure is not None:
            failure.headers = headers
            raise failure
        assembler = transform.assembler
        if assembler.terminal in ("response.completed", "response.incomplete"):
            response = assemble_response(assembler.response, assembler.output())
            self.client.send_json(200, transform.collected(response), headers)
            return
        error = assembler.error or {}
        code = error.get("code") or ("response_failed" if assembler.terminal == "response.failed"
                                     else "upstream_error")
        message = error.get("message") or "The backend reported a failure (%s)." % code
        raise ProxyError(failure_status(code), message, code=code, param=error.get("param"),
                         type="server_error" if failure_status(code) >= 500 else None,
                         headers=headers)


# A Messages stream the backend keeps silent this long gets a ping, as Anthropic's API sends:
# clients and middleboxes drop streams that stay quiet, and the backend may reason silently
# for minutes.
MESSAGES_PING_INTERVAL = 10.0


def stream_failure(assembler, headers):
    """The ProxyError a stream that ended in response.failed or error stands for."""
    error = assembler.error or {}
    code = error.get("code") or ("response_failed" if assembler.terminal == "response.failed"
                                 else "upstream_error")
    return ProxyError(failure_status(code), error.get("message") or
                      "The backend reported a failure (%s)." % code, code=code,
                      param=error.get("param"), headers=headers)


class MessagesSSESink(Sink):
    """A Messages event stream to the client. Its head waits for the first thing to say, so
    a failure before any content (a context overflow, most often) is an HTTP status Claude
    Code acts on, however the backend's bytes were cut into reads; while the backend is
    silent, PINGER sends a ping every MESSAGES_PING_INTERVAL (the first one opening the
    stream). The sink's lock orders the pings with the relay's writes."""

    def __init__(self, client, transform, interval=None):
        self.client = client
        self.transform = transform
        self.interval = interval or MESSAGES_PING_INTERVAL
        self._lock = threading.Lock()
        self._stopped = False
        self._opened = False
        self._headers = []
        self.last = time.monotonic()

    def start(self, headers):
        self._headers = headers
        PINGER.add(self)

    def _opening(self):
        """Under the lock: the head, once; the bytes that open the stream."""
        if self._opened:
            return b""
        self._opened = True
        self.client.start_event_stream(self._headers)
        return self.transform.opening()

    def send(self, batch):
        with self._lock:
            self.client.write_body(self._opening() + sse_of(batch))
            self.last = time.monotonic()

    def ping_if_silent(self, now):
        """From the pinger: a ping when nothing went out for the interval, unless a write is
        under way or the client's socket is full (a ping must never wait for a client)."""
        if now - self.last < self.interval or not self._lock.acquire(blocking=False):
            return
        try:
            if not self._stopped and self.client.writable_now():
                self.client.write_body(self._opening() + MessagesStream.ping())
                self.last = time.monotonic()
        except (ClientGone, OSError):
            self._stopped = True
        finally:
            self._lock.release()

    def stop(self):
        """No ping after this returns: the connection may serve another request."""
        with self._lock:
            self._stopped = True
        PINGER.remove(self)

    def finish(self, transform, tail, failure, headers):
        self.stop()
        with self._lock:
            if not self._opened and not transform.messages.content:
                if failure is not None:
                    failure.headers = failure.headers or headers
                    raise failure
                if transform.assembler.terminal in ("response.failed", "error"):
                    raise stream_failure(transform.assembler, headers)
            tail = self._opening() + sse_of(tail)
            if failure is not None:
                self.client.log_fields["error"] = failure.code
                tail += transform.failure_frames(failure)
            self.client.end_body(tail)


class Pinger:
    """One thread for the pings of every silent Messages stream, rather than a thread per
    stream (starting one costs a request more than the rest of its translation)."""

    def __init__(self):
        self._sinks = set()
        self._cond = threading.Condition()
        self._thread = None

    def add(self, sink):
        with self._cond:
            # woken only when it waits for longer than this sink may stay silent
            wake = not self._sinks or sink.interval < min(s.interval for s in self._sinks)
            self._sinks.add(sink)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="messages-pinger",
                                                daemon=True)
                self._thread.start()
            elif wake:
                self._cond.notify()

    def remove(self, sink):
        with self._cond:
            self._sinks.discard(sink)

    def _run(self):
        while True:
            try:
                self._ping_round()
            except Exception:  # a surprise must not end the pings for good
                time.sleep(0.5)

    def _ping_round(self):
        with self._cond:
            while not self._sinks:
                self._cond.wait()
            sinks = list(self._sinks)
        now = time.monotonic()
        for sink in sinks:
            sink.ping_if_silent(now)
        wait = min(sink.last + sink.interval for sink in sinks) - time.monotonic()
        with self._cond:
            self._cond.wait(max(wait, min(sink.interval for sink in sinks) / 10.0))


PINGER = Pinger()


def sse_payloads(block):
    """The data of each whole SSE frame in block, as bytes: one WebSocket message each."""
    if b"\r" in block:
        return [event.data.encode("utf-8") for event in SSEParser().feed(block)
                if event.data is not None]
    payloads = []
    for frame in block.split(b"\n\n")[:-1]:
        data = _join_data(frame.split(b"\n"))
        if data is not None:
            payloads.append(data.encode("utf-8"))
    return payloads


class WebSocketSink(Sink):
    """The relay's frames into a client's socket, one text message per event (the JSON of
    its `data:` line)."""

    def __init__(self, exchange):
        self.exchange = exchange

    def send(self, batch):
        self.exchange.send_events(payloads_of(batch))

    def finish(self, transform, tail, failure, headers):
        payloads = payloads_of(tail)
        if failure is not None:
            self.exchange.log_fields["error"] = failure.code
            self.exchange.status = failure.status
            payloads += sse_payloads(transform.failure_frames(failure))
        self.exchange.send_events(payloads)


# --------------------------------------------------------------------------------------------
# Relay: an upstream event stream, through a front end's transform, into a sink
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def watching_for_hangup(client, upstream):
    """Around relaying an upstream answer (an event stream, or an answer passed through): a
    client hang-up cuts the upstream at once, any failure closes it (its state is unknown),
    and the dump is written in the end."""
    watch = client.watch_hangup(upstream.sock)
    try:
        yield watch
    except BaseException as e:
        upstream.close()
        if isinstance(e, ClientGone):
            watch["gone"] = True
            client.log_fields["note"] = "client disconnected; upstream closed"
        raise
    finally:
        client.unwatch_hangup(watch)
        upstream.dump_done()


def relay(upstream, events, transform, sink, client, on_end=None):
    """Read the backend's event stream (HTTPEvents or WebSocketEvents) through transform into
    sink. on_end(assembler) runs once the terminal event is in, before the client sees it (a
    conversation is kept then, so the client's next turn can name it at once). A stream that
    breaks, stalls past the idle timeout or ends without a terminal event ends with an error,
    never a fake success."""
    assembler = transform.assembler
    headers = events.headers
    failure = None
    tail = b""
    with watching_for_hangup(client, events) as watch:
        sink.start(headers)
        while assembler.terminal is None:
            try:
                batch = events.read()
            except socket.timeout:
                failure = ProxyError(504, "The backend sent nothing for %g s."
                                     % upstream.config.stream_idle_timeout,
                                     code="stream_idle_timeout")
                break
            except (OSError, http.client.HTTPException) as e:
                if watch["gone"]:
                    raise ClientGone()
                failure = ProxyError(502, "The backend connection broke mid-stream (%s)."
                                     % e.__class__.__name__, code="upstream_disconnected")
                break
            if batch is None:
                if watch["gone"]:
                    raise ClientGone()
                failure = ProxyError(502, "upstream closed the stream before the response "
                                     "completed", code="stream_incomplete")
                break
            out = transform.feed(batch)
            if assembler.terminal is not None:
                tail = out  # goes out with the stream's end, in one write
                if on_end is not None:
                    on_end(assembler)
            elif out:
                sink.send(out)
    if failure is not None or assembler.terminal is None:
        events.close()  # an unfinished stream: this connection cannot carry another request
    usage = assembler.usage()
    client.log_fields["in"] = usage.get("input_tokens", "-")
    client.log_fields["out"] = usage.get("output_tokens", "-")
    details = usage.get("input_tokens_details")
    client.log_fields["cached"] = details.get("cached_tokens") if isinstance(details, dict) \
        else None
    settled = failure is None and events.complete
    if settled:  # the stream's end came with the last event: the connection is free before
        events.settle()  # the client hears the end, so its next turn finds it
    try:
        sink.finish(transform, tail, failure, headers)
    finally:  # answered (or failing to): the connection goes back to the pool or is closed
        if failure is None and not settled:
            events.drain()


def relay_as_is(upstream, answer, client):
    """API-key mode: the upstream's answer goes to the client as it came, piece by piece."""
    body = answer.body
    with watching_for_hangup(client, answer) as watch:
        resp = answer.resp
        client.start_as_is(resp.status, resp.getheaders(),
                           resp.length if not resp.chunked else None)
        while True:
            try:
                data = body.read()
            except (OSError, http.client.HTTPException):
                if watch["gone"]:
                    raise ClientGone()
                data = b""
            if not data:
                break
            if answer.dump:
                answer.dump.body += data
            client.write_body(data)
    if not body.settle(upstream.pool):
        client.log_fields["error"] = "upstream_disconnected"
        client.abort_body()  # the client must not take a cut body as whole
        return
    client.end_body(b"")


# --------------------------------------------------------------------------------------------
# Stores: conversation state, for previous_response_id (the backend keeps none)
# --------------------------------------------------------------------------------------------

WS_KEPT_RESPONSES = 4          # responses kept per socket for previous_response_id ...
WS_KEPT_BYTES = 16 * 1024 * 1024  # ... within this many compressed bytes (the last always)


def replayable(items):
    """Output items as they can be sent back with store=false: without their ids (the
    backend keeps no items, so an id makes it answer "not found", which is why the Codex CLI
    never sends them), and without reasoning it cannot read back (no encrypted_content)."""
    kept = []
    for item in items:
        if item.get("type") == "reasoning" and not item.get("encrypted_content"):
            continue
        kept.append({k: v for k, v in item.items() if k != "id"})
    return kept


PACK_PIECE = 1 << 20


def pack_json(text):
    """JSON text as it is kept: zlib at level 1, which gets most of what conversations
    (repetitive text) compress to for a fraction of the CPU of higher levels. Encoded a piece
    at a time: a 30 MB text never costs a 30 MB copy as UTF-8 besides."""
    if len(text) <= PACK_PIECE:
        return zlib.compress(text.encode("utf-8"), 1)
    packer = zlib.compressobj(1)
    out = [packer.compress(text[i:i + PACK_PIECE].encode("utf-8"))
           for i in range(0, len(text), PACK_PIECE)]
    out.append(packer.flush())
    return b"".join(out)


def unpack_json(blob, budget=None):
    """A kept JSON value; rows of a version 1 --state-db hold plain JSON text. budget: an
    ExpansionBudget its text counts against."""
    text = blob if isinstance(blob, str) else zlib.decompress(blob)
    if budget is not None:
        budget.spend(len(text))
    return json.loads(text if isinstance(text, str) else text.decode("utf-8"))


def _compact(value):
    return json.dumps(value, separators=(",", ":"))


def carried_ids(items):
    """The ids the items carry, by which a later item_reference can name them."""
    if not isinstance(items, list):
        return []
    return [item["id"] for item in items if isinstance(item, dict)
            and isinstance(item.get("id"), str) and not is_item_reference(item)]


def is_item_reference(item):
    # the API's item reference has an optional type: a bare {"id": ...} is one too
    return isinstance(item, dict) and (item.get("type") == "item_reference" or (
        item.get("type") is None and "id" in item and set(item) <= {"id", "type"}))


def item_reference_error(item_id):
    return ProxyError(400,
                      "Input item_reference %r names an item the proxy does not have: it keeps "
                      "only the items of responses it answered (in memory, so a restart forgets "
                      "them unless it runs with --state-db), drops the least recently used past "
                      "its size cap, and forgets deleted responses. Send the item itself instead "
                      "of a reference, or set `store: false` in the client (with the Vercel AI "
                      "SDK: providerOptions.openai.store = false) so it sends whole items."
                      % (item_id,), param="input", code="item_reference_not_found")


def stored_response_not_found(response_id):
    """For GET and DELETE /v1/responses/{id}, and its input_items, when the store lacks it."""
    return ProxyError(404,
                      "Response with id %r not found. The proxy keeps only the responses it "
                      "answered whose requests did not say `store: false`; in memory, so a "
                      "restart forgets them unless it runs with --state-db; past its size cap it "
                      "drops the least recently used; and a deleted one is gone." % (response_id,),
                      code="response_not_found")


def expanded_input_too_large(limit):
    return ProxyError(400,
                      "The request's input, with its item references and previous_response_id "
                      "history filled in, would be larger than %d bytes, the limit set by "
                      "--max-body-bytes: the proxy neither builds nor sends more. Start a new "
                      "conversation or compact this one (send fewer or smaller items), or "
                      "restart the proxy with a larger --max-body-bytes." % limit,
                      param="input", code="input_too_large")


class ExpansionBudget:
    """The bytes a request may grow to while its item references and previous_response_id
    history are filled in: --max-body-bytes, as for the body itself. Each piece is counted
    before it is built, so a small request naming a large item many times is refused before
    the proxy holds more than the limit."""

    def __init__(self, limit, used=0):
        self.limit = limit
        self.used = used

    def spend(self, size):
        self.used += size
        if self.used > self.limit:
            raise expanded_input_too_large(self.limit)


def listed_items(owner, side, items):
    """Items as input_items lists them, each with an id: the API gives every item one, so
    those sent without get one made from their response and place, the same on every call
    (an `after` cursor must keep naming the same item)."""
    listed = []
    for index, item in enumerate(items if isinstance(items, list) else ()):
        if isinstance(item, dict) and not isinstance(item.get("id"), str):
            digest = hashlib.sha1(("%s/%s/%d" % (owner, side, index)).encode()).hexdigest()
            item = dict(item, id="item_" + digest[:32])
        listed.append(item)
    return listed


def input_items_page(items, after=None, limit=None, order=None):
    """The answer to GET /v1/responses/{id}/input_items: one page of `items` (oldest first,
    each with an id, as ConversationStore.input_items gives them). after, limit, order: the
    query's strings, or None when absent."""
    order = "desc" if order is None else order
    if order not in ("asc", "desc"):
        raise ProxyError(400, "`order` must be \"asc\" or \"desc\".", param="order",
                         code="invalid_value")
    try:
        count = 20 if limit is None else int(limit)
    except ValueError:
        count = 0
    if not 1 <= count <= 100:
        raise ProxyError(400, "`limit` must be a whole number from 1 to 100.", param="limit",
                         code="invalid_value")
    ordered = list(items) if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        ids = [item.get("id") if isinstance(item, dict) else None for item in ordered]
        if after not in ids:
            raise ProxyError(400, "`after` must be the id of one of this response's input items "
                             "(%r is not)." % (after,), param="after", code="invalid_value")
        start = ids.index(after) + 1
    page = ordered[start:start + count]
    return {"object": "list", "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": start + count < len(ordered)}


# One kept response, compressed: its parent's id, its own input, its output (with ids), the
# response object without its output (None in rows from before it was kept), and whether it
# was deleted but stays as a link for the responses that continued it.
StoredResponse = collections.namedtuple("StoredResponse",
                                        "parent input output response deleted")


def stored_size(record, item_ids=()):
    """What a kept response counts against the cap: its compressed bytes and indexed ids."""
    return (len(record.input) + len(record.output) + len(record.response or b"")
            + sum(len(item_id) for item_id in item_ids))


class ConversationStore:
    """Completed responses, for previous_response_id, item_reference, and retrieval (GET and
    DELETE /v1/responses/{id}). Each is kept as compressed JSON with a link to the response it
    continued; a chain is rebuilt by following the links. max_bytes counts compressed bytes;
    past it the least recently used responses go, so a conversation in use keeps its early
    turns. A response that must not be kept (store: false) is simply never saved. In memory;
    see SQLiteConversationStore for one that survives restarts. Thread-safe: every method
    holds the lock around the storage it touches, and (de)compresses outside it."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()  # id -> (StoredResponse, item ids, size)
        self._owners = {}                          # item id -> id of the response holding it
        self._children = collections.Counter()     # id -> how many kept responses continue it
        self._bytes = 0
        self._pins = collections.Counter()  # id -> how many turns in flight continue it

    def save(self, response, parent, input_json):
        """Keep a finished response. response: the assembled response object (with its id and
        output); parent: the previous_response_id it continued, or None; input_json: the JSON
        text of its own input list, item references already expanded."""
        rest = dict(response, output=None)  # the output is kept apart: history reads only it
        output = response.get("output") or []
        item_ids = carried_ids(output)
        if '"id"' in input_json:  # most inputs carry no ids: spare parsing a large one
            item_ids += carried_ids(json.loads(input_json))
        record = StoredResponse(parent, pack_json(input_json), pack_json(_compact(output)),
                                pack_json(_compact(rest)), False)
        with self._lock:
            self._save(response["id"], record, tuple(item_ids))

    def history(self, response_id, budget=None):
        """All items of the chain ending in response_id, oldest first, as the backend takes
        them; None if response_id is unknown or deleted, or a link is unknown (never stored,
        evicted, or lost in a restart). budget (an ExpansionBudget): each response's text is
        counted as it is unpacked, newest first, so a chain past the limit stops early."""
        chain = self._chain(response_id)
        if chain is None:
            return None
        parts = []
        for _, record in reversed(chain):
            parts.append(replayable(unpack_json(record.output, budget)))
            parts.append(unpack_json(record.input, budget))
        items = []
        for part in reversed(parts):
            items.extend(part)
        return items

    def input_items(self, response_id):
        """Every item the response was generated from, oldest first, each with an id: the
        inputs and outputs of the responses it continued, then its own input (as the API's
        input_items lists a chained response). None if unknown or deleted."""
        chain = self._chain(response_id)
        if chain is None:
            return None
        items = []
        for owner, record in chain[:-1]:
            items.extend(listed_items(owner, "input", unpack_json(record.input)))
            items.extend(listed_items(owner, "output", unpack_json(record.output)))
        items.extend(listed_items(response_id, "input", unpack_json(chain[-1][1].input)))
        return items

    def get(self, response_id):
        """The response object as it was answered, or None (unknown, deleted, or kept by a
        version that did not keep response objects)."""
        with self._lock:
            record = self._load(response_id)
            if record is None or record.deleted or record.response is None:
                return None
            self._touch([response_id])
        response = unpack_json(record.response)
        response["output"] = unpack_json(record.output)
        return response

    def delete(self, response_id):
        """Forget a response: True if it was kept. From then on its id names nothing (get,
        history, input_items, item_reference), but the responses that continued it still
        carry on: its items stay as their link (as the API keeps each response's whole
        context) until eviction takes them or the last response continuing it is deleted."""
        with self._lock:
            return self._forget(response_id)

    def expand_references(self, items, budget=None):
        """`items` (a request's input list) with each item_reference replaced by the item it
        names, as the backend takes it: without its id, and reasoning it cannot read back
        dropped (it keeps nothing, so a reference or id means nothing to it). budget (an
        ExpansionBudget): each reference counts the size of its item, as it is expanded."""
        if not isinstance(items, list) or not any(is_item_reference(i) for i in items):
            return items
        wanted = set(item["id"] for item in items
                     if is_item_reference(item) and isinstance(item.get("id"), str))
        records = {}
        with self._lock:
            for item_id in wanted:
                owner = self._owner(item_id)
                if owner is not None and owner not in records:
                    record = self._load(owner)
                    if record is not None and not record.deleted:
                        records[owner] = record
            self._touch(list(records))
        found = {}
        for record in records.values():
            for side in (record.input, record.output):
                for item in unpack_json(side):
                    if isinstance(item, dict) and isinstance(item.get("id"), str) \
                            and item["id"] in wanted:
                        found.setdefault(item["id"], item)
        expanded, sizes = [], {}
        for item in items:
            if not is_item_reference(item):
                expanded.append(item)
            elif isinstance(item.get("id"), str) and item["id"] in found:
                if budget is not None:
                    if item["id"] not in sizes:
                        sizes[item["id"]] = len(_compact(found[item["id"]]))
                    budget.spend(sizes[item["id"]])
                expanded.extend(replayable([found[item["id"]]]))
            else:
                raise item_reference_error(item.get("id"))
        return expanded

    def pin(self, response_id):
        """A turn continuing response_id has begun: a delete meanwhile hides it but keeps
        its items, as for a response that others continue, so that turn's response is kept
        with its whole history (unpin once it is kept, or failed)."""
        with self._lock:
            self._pins[response_id] += 1

    def unpin(self, response_id):
        if response_id is None:
            return
        with self._lock:
            self._pins[response_id] -= 1
            if self._pins[response_id] <= 0:
                del self._pins[response_id]
                self._prune_unpinned(response_id)

    def close(self):
        pass

    def _chain(self, response_id):
        """[(id, StoredResponse)] of response_id and the responses it continued, oldest
        first, marked as used; None if response_id is unknown or deleted, or a link is."""
        chain, visited, current = [], set(), response_id
        with self._lock:
            while current is not None and current not in visited:
                visited.add(current)
                record = self._load(current)
                if record is None or (record.deleted and current == response_id):
                    return None
                chain.append((current, record))
                current = record.parent
            self._touch([rid for rid, _ in chain])
        chain.reverse()
        return chain

    # The storage, always called with the lock held.

    def _save(self, response_id, record, item_ids):
        self._remove(response_id)
        size = stored_size(record, item_ids)
        self._entries[response_id] = (record, item_ids, size)
        self._bytes += size
        if record.parent is not None:
            self._children[record.parent] += 1
        for item_id in item_ids:
            self._owners[item_id] = response_id
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            self._remove(next(iter(self._entries)))

    def _remove(self, response_id):
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return
        record, item_ids, size = entry
        self._bytes -= size
        if record.parent is not None:
            self._children[record.parent] -= 1
            if not self._children[record.parent]:
                del self._children[record.parent]
        self._disown(response_id, item_ids)

    def _disown(self, response_id, item_ids):
        for item_id in item_ids:
            if self._owners.get(item_id) == response_id:
                del self._owners[item_id]

    def _forget(self, response_id):
        entry = self._entries.get(response_id)
        if entry is None or entry[0].deleted:
            return False
        record, item_ids, size = entry
        if not self._children.get(response_id) and not self._pins.get(response_id):
            self._remove(response_id)
            self._prune(record.parent)
            return True
        self._disown(response_id, item_ids)
        link = record._replace(response=None, deleted=True)
        self._entries[response_id] = (link, (), stored_size(link))
        self._bytes += stored_size(link) - size
        return True

    def _prune(self, response_id):
        """Drop deleted responses kept only as links, from response_id up, once nothing
        continues them any more: deleting a whole chain leaves none of it behind."""
        while response_id is not None:
            entry = self._entries.get(response_id)
            if entry is None or not entry[0].deleted or self._children.get(response_id) \
                    or self._pins.get(response_id):
                return
            self._remove(response_id)
            response_id = entry[0].parent

    def _prune_unpinned(self, response_id):
        self._prune(response_id)

    def _load(self, response_id):
        entry = self._entries.get(response_id)
        return entry[0] if entry is not None else None

    def _owner(self, item_id):
        return self._owners.get(item_id)

    def _touch(self, response_ids):
        for response_id in response_ids:
            self._entries.move_to_end(response_id)


class SQLiteConversationStore(ConversationStore):
    """The same store in an SQLite file (--state-db), so chains survive restarts; several
    proxy processes may share it (SQLite locks, WAL journal, busy timeout)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, parent TEXT, "
              "input BLOB NOT NULL, output BLOB NOT NULL, size INTEGER NOT NULL, "
              "used REAL NOT NULL, response BLOB, deleted INTEGER NOT NULL DEFAULT 0)",
              "CREATE INDEX IF NOT EXISTS responses_used ON responses (used)",
              "CREATE INDEX IF NOT EXISTS responses_parent ON responses (parent)",
              # the running total of `size`, so a store need not add up the table
              "CREATE TABLE IF NOT EXISTS total (bytes INTEGER NOT NULL)",
              "INSERT INTO total SELECT COALESCE(SUM(size), 0) FROM responses "
              "WHERE NOT EXISTS (SELECT 1 FROM total)",
              # item id -> the response holding the item, for item_reference
              "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, response TEXT NOT NULL)",
              "CREATE INDEX IF NOT EXISTS items_response ON items (response)",
              "PRAGMA user_version = 2")  # the schema's version, for a later change to migrate
    # What version 1 (plain JSON text, no response objects) lacks. Its rows stay readable:
    # unpack_json tells text from compressed bytes. Checked column by column rather than by
    # user_version, which a version 1 proxy sharing the file sets back to 1.
    ADDED_COLUMNS = (("response", "BLOB"), ("deleted", "INTEGER NOT NULL DEFAULT 0"))

    def __init__(self, path, max_bytes):
        import sqlite3  # only with --state-db: most runs never need it
        super().__init__(max_bytes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # conversations are private
            os.close(fd)
            # A short busy timeout: a store waiting on another process delays a stream's end,
            # and a put that gives up costs only a warning.
            self._db = sqlite3.connect(path, timeout=5, isolation_level=None,
                                       check_same_thread=False)
            self._open()
        except (OSError, sqlite3.Error) as e:
            raise StartupError("--state-db %s: %s. Give a path to an SQLite file of this "
                               "proxy's (it is made if missing)." % (path, getattr(e, "strerror",
                                                                                    None) or e))

    def _open(self):
        import sqlite3
        for attempt in range(50):  # proxies starting together race to set up a new file
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: no fsync per put
                self._set_up()
                return
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def _set_up(self):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(self.SCHEMA[0])
            columns = set(row[1] for row in db.execute("PRAGMA table_info(responses)"))
            for name, kind in self.ADDED_COLUMNS:
                if name not in columns:
                    db.execute("ALTER TABLE responses ADD COLUMN %s %s" % (name, kind))
            for statement in self.SCHEMA[1:]:
                db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self):
        # Under the lock: a turn the shutdown did not wait for may still unpin or keep its
        # response, and sqlite3 crashes the process when a connection closes under a thread
        # using it. After this, such a late use gets sqlite3's ProgrammingError instead.
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _save(self, response_id, record, item_ids):
        size = stored_size(record, item_ids)
        with self._transaction() as db:
            self._delete_row(response_id)
            db.execute("INSERT INTO responses (id, parent, input, output, size, used, response, "
                       "deleted) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                       (response_id, record.parent, record.input, record.output, size,
                        time.time(), record.response))
            db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?)",
                           [(item_id, response_id) for item_id in item_ids])
            db.execute("UPDATE total SET bytes = bytes + ?", (size,))
            total = db.execute("SELECT bytes FROM total").fetchone()[0]
            while total > self.max_bytes:
                row = db.execute("SELECT id FROM responses WHERE id != ? ORDER BY used "
                                 "LIMIT 1", (response_id,)).fetchone()
                if row is None:
                    break
                total -= self._delete_row(row[0])

    def _delete_row(self, response_id):
        """Remove a response and its item index entries; the bytes it freed."""
        db = self._db
        row = db.execute("SELECT size FROM responses WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            return 0
        db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        db.execute("DELETE FROM items WHERE response = ?", (response_id,))
        db.execute("UPDATE total SET bytes = bytes - ?", (row[0],))
        return row[0]

    def _forget(self, response_id):
        with self._transaction() as db:
            record = self._load(response_id)
            if record is None or record.deleted:
                return False
            if not self._continued(response_id) and not self._pins.get(response_id):
                self._delete_row(response_id)
                self._prune(record.parent)
                return True
            old = db.execute("SELECT size FROM responses WHERE id = ?",
                             (response_id,)).fetchone()[0]
            size = stored_size(record._replace(response=None))
            db.execute("DELETE FROM items WHERE response = ?", (response_id,))
            db.execute("UPDATE responses SET response = NULL, deleted = 1, size = ? "
                       "WHERE id = ?", (size, response_id))
            db.execute("UPDATE total SET bytes = bytes + ?", (size - old,))
            return True

    def _continued(self, response_id):
        return self._db.execute("SELECT 1 FROM responses WHERE parent = ? LIMIT 1",
                                (response_id,)).fetchone() is not None

    def _prune(self, response_id):
        while response_id is not None:
            record = self._load(response_id)
            if record is None or not record.deleted or self._continued(response_id) \
                    or self._pins.get(response_id):
                return
            self._delete_row(response_id)
            response_id = record.parent

    def _prune_unpinned(self, response_id):
        with self._transaction():
            self._prune(response_id)

    def _load(self, response_id):
        row = self._db.execute("SELECT parent, input, output, response, deleted FROM responses "
                               "WHERE id = ?", (response_id,)).fetchone()
        return StoredResponse(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    def _owner(self, item_id):
        row = self._db.execute("SELECT response FROM items WHERE id = ?", (item_id,)).fetchone()
        return row[0] if row else None

    def _touch(self, response_ids):
        now = time.time()
        for i in range(0, len(response_ids), 500):  # old SQLite takes 999 variables at most
            batch = response_ids[i:i + 500]
            self._db.execute("UPDATE responses SET used = ? WHERE id IN (%s)"
                             % ",".join("?" * len(batch)), [now] + batch)


def _holds_long_text(value):
    if isinstance(value, str):
        return len(value) > PACK_PIECE
    if isinstance(value, dict):
        return any(_holds_long_text(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_long_text(v) for v in value)
    return False


def _json_pieces(value):
    """value's compact JSON, in pieces: made whole (in C) where that is small, but a long
    string's escaped text a megabyte at a time, so it is never held whole twice."""
    if not _holds_long_text(value):
        yield _compact(value)
    elif isinstance(value, str):
        yield '"'
        for start in range(0, len(value), PACK_PIECE):
            yield _compact(value[start:start + PACK_PIECE])[1:-1]
        yield '"'
    elif isinstance(value, dict):
        for i, (key, item) in enumerate(value.items()):
            yield ("{" if i == 0 else ",") + _compact(key) + ":"
            yield from _json_pieces(item)
        yield "}"
    else:
        for i, item in enumerate(value):
            yield "[" if i == 0 else ","
            yield from _json_pieces(item)
        yield "]"


def pack_pieces(pieces):
    """(the compressed pieces of a JSON text given in ASCII pieces, the text's length): as
    pack_json, without ever holding the whole text, nor the compressed text twice."""
    packer = zlib.compressobj(1)
    out, size, batch, batched = [], 0, [], 0
    for piece in pieces:
        batch.append(piece)
        batched += len(piece)
        if batched >= PACK_PIECE:
            out.append(packer.compress("".join(batch).encode("ascii")))
            size, batch, batched = size + batched, [], 0
    out.append(packer.compress("".join(batch).encode("ascii")))
    out.append(packer.flush())
    return tuple(chunk for chunk in out if chunk), size + batched


def unpack_pieces(chunks):
    unpacker = zlib.decompressobj()
    text = bytearray()
    for chunk in chunks:  # into one buffer: no list of pieces besides their join
        text += unpacker.decompress(chunk)
    text += unpacker.flush()
    return json.loads(text.decode("ascii"))


class KeptNode:
    """A piece of a socket's kept history: the items one response added to the one it
    continued (packed), and a link to that one, so a chain's entries share their history."""

    __slots__ = ("parent", "blob", "size", "count", "text_bytes", "refs")

    def __init__(self, parent, blob, count, text_bytes):
        self.parent = parent          # the KeptNode it continued, or None
        self.blob = blob              # its own items, compressed JSON (see pack_pieces)
        self.size = sum(len(chunk) for chunk in blob)
        self.count = count            # items from the chain's start through its own
        self.text_bytes = text_bytes  # their JSON text's bytes, for an ExpansionBudget
        self.refs = 0                 # the heads and child nodes that hold it

    def chain(self):
        """The nodes from the chain's start to this one."""
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return nodes


class SocketMemory:
    """What all sockets together keep for previous_response_id, within one cap of compressed
    bytes (the conversation store's): past it the least recently used kept response of any
    socket goes first."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.bytes = 0
        self._heads = collections.OrderedDict()  # (SocketResponses, response id), LRU first

    def add(self, owner, response_id):
        self._heads[(owner, response_id)] = None

    def touch(self, owner, response_id):
        self._heads.move_to_end((owner, response_id))

    def discard(self, owner, response_id):
        self._heads.pop((owner, response_id), None)

    def shrink(self, keep):
        """Drop the least recently used heads until within the cap; never `keep` (an
        (owner, id) pair), which its own socket decides on."""
        while self.bytes > self.max_bytes:
            victim = next((k for k in self._heads if k != keep), None)
            if victim is None:
                return
            victim[0].drop(victim[1])


def socket_memory_cap(config):
    """What all sockets together may keep in memory: the store's cap, and with --state-db
    (whose cap is for a file) at most the in-memory store's default."""
    if config.state_db:
        return min(config.state_max_bytes, DEFAULT_STATE_MB * 1024 * 1024)
    return config.state_max_bytes


class SocketResponses:
    """The responses made on one socket, by id: each one's whole input and its output, as
    the backend's own socket keeps them, even with store: false. The last few, within a cap
    of compressed bytes for the socket and one for all sockets together (memory); a chain's
    entries share the history they have in common, so a turn costs what it added. All of it
    goes with the socket (close)."""

    def __init__(self, memory=None, max_count=WS_KEPT_RESPONSES, max_bytes=WS_KEPT_BYTES):
        self.memory = memory if memory is not None else SocketMemory(max_bytes)
        self.max_count = max_count
        self.max_bytes = min(max_bytes, self.memory.max_bytes)
        self.bytes = 0
        self._heads = collections.OrderedDict()  # response id -> KeptNode, oldest first

    def put(self, response_id, items, parent=None):
        """Keep items (a response's whole input and output) under response_id. When parent
        (the previous_response_id it continued) is kept here and items begin with its items,
        only the rest is packed. A response that does not fit the caps is not kept: a turn
        continuing it gets previous_response_not_found, and clients then send it whole."""
        with self.memory.lock:
            base = self._heads.get(parent) if parent is not None else None
            if base is not None:
                base.refs += 1  # held while packing: eviction cannot free it meanwhile
        if base is not None and base.count > len(items):
            self._release_held(base)
            base = None
        blob, text_bytes = pack_pieces(_json_pieces(items[base.count:] if base is not None
                                                    else items))
        node = KeptNode(base, blob, len(items),
                        text_bytes + (base.text_bytes if base is not None else 0))
        with self.memory.lock:  # the hold on base is now the new node's link
            self.drop(response_id)
            node.refs = 1
            self._heads[response_id] = node
            self.memory.add(self, response_id)
            self._account(node.size)
            while self._heads and (len(self._heads) > self.max_count
                                   or self.bytes > self.max_bytes):
                self.drop(next(iter(self._heads)))  # the new one too, if alone too big
            self.memory.shrink(keep=(self, response_id))
            if self.memory.bytes > self.memory.max_bytes:
                self.drop(response_id)

    def get(self, response_id, budget=None):
        """The items kept under response_id, or None. budget: an ExpansionBudget that
        their size counts against before anything is unpacked."""
        with self.memory.lock:
            node = self._heads.get(response_id)
            if node is None:
                return None
            self._heads.move_to_end(response_id)
            self.memory.touch(self, response_id)
            blobs = [n.blob for n in node.chain()]
        if budget is not None:
            budget.spend(node.text_bytes)
        items = []
        for blob in blobs:
            items.extend(unpack_pieces(blob))
        return items

    def close(self):
        """The socket ended: what it kept is freed."""
        with self.memory.lock:
            for response_id in list(self._heads):
                self.drop(response_id)

    # with the memory's lock held

    def drop(self, response_id):
        node = self._heads.pop(response_id, None)
        if node is not None:
            self.memory.discard(self, response_id)
            self._release(node)

    def _release(self, node):
        """One holder less; a node nothing holds frees its bytes, and its hold on its parent."""
        while node is not None:
            node.refs -= 1
            if node.refs:
                return
            self._account(-node.size)
            node = node.parent

    def _release_held(self, node):
        with self.memory.lock:
            self._release(node)

    def _account(self, size):
        self.bytes += size
        self.memory.bytes += size


# --------------------------------------------------------------------------------------------
# Codecs: SSE parsing (pure, incremental, line based)
# --------------------------------------------------------------------------------------------

class SSEEvent:
    __slots__ = ("event", "id", "retry", "raw", "_data")

    def __init__(self, event, data, id, retry, raw):
        self.event = event  # the `event:` field, None when absent
        self._data = data   # str, None, or the frame's lines not yet joined (bytes)
        self.id = id
        self.retry = retry
        self.raw = raw      # the frame's bytes exactly as received, blank line included

    @property
    def data(self):
        """The `data:` lines joined by "\n", None when there were none. Decoded on first use:
        the relay never reads the data of a delta."""
        if isinstance(self._data, bytes):
            self._data = _join_data(self._data.split(b"\n"))
        return self._data

    def __repr__(self):
        return "SSEEvent(%r, %r)" % (self.event, self.data)


def _join_data(lines):
    data = []
    for line in lines:
        if line[:5] == b"data:":
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line == b"data":
            data.append(b"")
    return b"\n".join(data).decode("utf-8", "replace") if data else None


class SSEParser:
    """Feed bytes as they arrive; get back each complete event. Handles LF, CRLF and CR line
    ends (also split across reads), multi-line data, comments, and UTF-8 characters split
    across reads (lines are decoded only once complete). An unfinished event at EOF is dropped,
    as the SSE specification says.

    The backend frames events with LF only: for such input a fast path splits whole frames in
    one C call; anything else goes line by line."""

    def __init__(self):
        self._pending = []    # unparsed input, in pieces: an unfinished line (LF-only: event)
        self._frame = []      # raw bytes of the current event from earlier reads
        self._fields = False  # the current event has had a non-blank line
        self._event = self._id = self._retry = None
        self._data = []
        self._skip_lf = False  # the last read ended in CR: a leading LF completes that CRLF
        self._names = {}  # b"event: x" -> "x", so names repeated 10,000 times decode once
        self._start = b""  # the stream's first bytes while they may still be a BOM; then None

    def feed(self, chunk):
        if not chunk:
            return []
        if self._start is not None:
            chunk = self._skip_bom(chunk)
            if not chunk:
                return []
        lead = []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                # The LF of a CRLF split across reads, its line already parsed. Its bytes still
                # go out: with the event it belongs to, or on their own after a finished one.
                if self._fields:
                    self._frame.append(b"\n")
                else:
                    lead.append(SSEEvent(None, None, self._id, None, b"\n"))
                chunk = chunk[1:]
        fast = not self._fields and b"\r" not in chunk  # unparsed input never holds a CR
        if self._pending:
            # A large event arrives in many reads: join and parse only when this read ends
            # a frame (or a line), not on every read.
            if fast:
                ends = b"\n\n" in chunk or (chunk[:1] == b"\n" and self._pending[-1][-1:] == b"\n")
            else:
                ends = b"\n" in chunk or b"\r" in chunk
            if not ends:
                self._pending.append(chunk)
                return lead
            buf = b"".join(self._pending) + chunk
        else:
            buf = chunk
        return lead + (self._feed_frames(buf) if fast else self._feed_lines(buf))

    def _skip_bom(self, chunk):
        """chunk without the byte order mark the specification lets a stream start with (and
        nothing while the first reads are too short to tell)."""
        chunk = self._start + chunk
        if len(chunk) < len(_UTF8_BOM) and _UTF8_BOM.startswith(chunk):
            self._start = chunk
            return b""
        self._start = None
        return chunk[len(_UTF8_BOM):] if chunk[:len(_UTF8_BOM)] == _UTF8_BOM else chunk

    def _feed_frames(self, buf):
        frames = buf.split(b"\n\n")
        rest = frames.pop()  # an unfinished event, or b""
        self._pending = [rest] if rest else []
        events = []
        names = self._names
        for frame in frames:
            lines = frame.split(b"\n")
            if len(lines) == 2 and lines[0][:6] == b"event:" and lines[1][:5] == b"data:":
                # The backend's every frame: `event: X` then one `data:` line.
                name = names.get(lines[0])
                if name is None:
                    value = lines[0][6:]
                    name = (value[1:] if value[:1] == b" " else value).decode("utf-8", "replace")
                    if len(names) < 256:
                        names[lines[0]] = name
                events.append(SSEEvent(name, lines[1], self._id, None, frame + b"\n\n"))
                continue
            for line in lines:
                if line:
                    self._line(line)
            if self._fields:  # blank lines between events are not relayed
                events.append(self._dispatch(frame.lstrip(b"\n") + b"\n\n"))
        return events

    def _feed_lines(self, buf):
        events = []
        n = len(buf)
        pos = 0
        frame_start = 0
        has_cr = b"\r" in buf
        while pos < n:
            lf = buf.find(b"\n", pos)
            if has_cr:
                cr = buf.find(b"\r", pos)
                if cr >= 0 and (lf < 0 or cr < lf):
                    if cr + 1 < n:
                        lf, end = cr, (cr + 2 if buf[cr + 1] == 10 else cr + 1)
                    else:
                        lf, end = cr, cr + 1
                        self._skip_lf = True
                else:
                    end = lf + 1
            else:
                end = lf + 1
            if lf < 0:
                break
            line = buf[pos:lf]
            pos = end
            if not line:
                if self._fields:
                    raw = buf[frame_start:end]
                    if self._frame:
                        raw = b"".join(self._frame) + raw
                        self._frame = []
                    events.append(self._dispatch(raw))
                frame_start = end  # blank lines between events are not relayed
                continue
            self._line(line)
        if self._fields and frame_start < pos:
            self._frame.append(buf[frame_start:pos])
        self._pending = [buf[pos:]] if pos < n else []
        return events

    def _line(self, line):
        self._fields = True
        if line[:1] == b":":
            return
        name, colon, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:  # ignored, as the specification says
            self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, raw):
        data = b"\n".join(self._data).decode("utf-8", "replace") if self._data else None
        event = SSEEvent(self._event, data, self._id, self._retry, raw)
        self._fields = False
        self._event = self._retry = None
        self._data = []
        return event  # `id` persists across events, as in the specification


_UTF8_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------
# Codecs: request bodies' content codings and JSON, strict, bytes kept where unchanged
# --------------------------------------------------------------------------------------------

def _inflate(raw, wbits, limit):
    """zlib, raw deflate or gzip (wbits 15, -15, 31) data, inflated to at most limit bytes
    (None: no limit), so that a small compressed body cannot expand to gigabytes.

    Linear in len(raw) however many gzip members it holds: each member's decompressor gets
    the input in windows that start small and double, because at a member's end zlib copies
    whatever input it was given beyond that end (unused_data). Fed the whole remaining body,
    a body of 20-byte members costs quadratic time (1 MB: over a second; 32 MB: minutes)."""
    view = memoryview(raw)
    pieces, size, pos = [], 0, 0
    while True:
        d = zlib.decompressobj(wbits)
        window = _INFLATE_FIRST_WINDOW
        while not d.eof and pos < len(view):
            chunk = view[pos:pos + window]
            piece = d.decompress(chunk, 0 if limit is None else limit + 1 - size)
            pieces.append(piece)
            size += len(piece)
            if limit is not None and size > limit:
                raise ProxyError(413, "The request body is over the limit of %d bytes once "
                                 "decompressed." % limit, code="request_too_large")
            pos += len(chunk) - len(d.unused_data)  # all of it, unless the member ended
            window = min(window * 2, _INFLATE_MAX_WINDOW)
        if not d.eof:
            raise ValueError("the compressed data ends early")
        if wbits != 31 or pos >= len(view):  # a gzip body may hold several members
            return b"".join(pieces)


_INFLATE_FIRST_WINDOW = 64  # about three of the smallest gzip members
_INFLATE_MAX_WINDOW = 1 << 20


def decode_request_body(raw, content_encoding, limit=None):
    """Undo Content-Encoding; the backend takes plain JSON from us. The decoded body is held
    to limit bytes too."""
    encoding = (content_encoding or "identity").strip().lower()
    try:
        if encoding in ("", "identity"):
            return raw
        if encoding in ("gzip", "x-gzip"):
            return _inflate(raw, 16 + zlib.MAX_WBITS, limit)
        if encoding == "deflate":
            try:
                return _inflate(raw, zlib.MAX_WBITS, limit)
            except zlib.error:
                return _inflate(raw, -zlib.MAX_WBITS, limit)  # raw deflate, as some clients send
        if encoding == "zstd":
            if zstd is None:
                raise ProxyError(415, "This Python (%d.%d) cannot decode zstd request bodies "
                                 "(that needs 3.14+). Send the body uncompressed, or with gzip."
                                 % sys.version_info[:2], code="unsupported_content_encoding")
            decompressor = zstd.ZstdDecompressor()
            out = decompressor.decompress(raw, -1 if limit is None else limit + 1)
            if limit is not None and len(out) > limit:
                raise ProxyError(413, "The request body is over the limit of %d bytes once "
                                 "decompressed." % limit, code="request_too_large")
            if not decompressor.eof:
                raise ValueError("the compressed data ends early")
            return out
    except (OSError, EOFError, zlib.error, ValueError) + _ZSTD_ERRORS as e:
        raise ProxyError(400, "The request body is not valid %s data: %s" % (encoding, e),
                         code="invalid_body")
    raise ProxyError(415, "Unsupported Content-Encoding %r; use gzip, deflate or none."
                     % encoding, code="unsupported_content_encoding")


class _NotJSON(ValueError):
    """A value Python's json module takes but JSON has no place for."""


def _no_constant(name):
    raise _NotJSON("%s, which is not a JSON number" % name)


def _finite_float(text):
    value = float(text)
    if value in (_INF, -_INF):
        raise _NotJSON("%s, beyond the range of a JSON number (a double)" % text)
    return value


_INF = float("inf")
# Python's json takes NaN, Infinity, -Infinity and 1e999 (inf); none is JSON, and sent on
# they would reach the backend as bare NaN/Infinity tokens.
_JSON_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# Deeper nesting is refused with a 400: Python's json parses up to ~1000 levels but cannot
# encode them again. 128 is far beyond what requests hold (tool schemas nest a dozen or so).
MAX_JSON_DEPTH = 128
_CONTAINERS = (dict, list)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_deep(value):
    """Whether value, standing in a top-level field, nests past MAX_JSON_DEPTH (the body
    itself is level 1). Level by level, not recursively: a deep value costs no stack."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(MAX_JSON_DEPTH - 1):
        if not level:
            return False
        level = [child for container in level
                 for child in (container.values() if type(container) is dict else container)
                 if type(child) in _CONTAINERS]
    return bool(level)


def _has_lone_surrogate(value):
    """Whether a str in value (keys too) holds half of a surrogate pair: the parser makes one
    of a "\\ud800" escape that no low half follows. It cannot be encoded as UTF-8: not text.
    Level by level, one regex search per level, as this runs on every body with an emoji."""
    level = [value]
    while level:
        if _SURROGATE.search("".join([v for v in level if type(v) is str])):
            return True
        nested = []
        for v in level:
            kind = type(v)
            if kind is dict:
                nested += v
                nested += v.values()
            elif kind is list:
                nested += v
        level = nested
    return False


def _check_json_values(body, text):
    """400 for what parses but must not go on: nesting past MAX_JSON_DEPTH, lone surrogates.
    The surrogate check is skipped when the text has no such escape, as most bodies do. The
    depth is walked always: a walk costs a third of counting the brackets in the text, which
    passed any history of a few dozen items."""
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    for key, value in body.items():
        param = None if surrogates and _SURROGATE.search(key) else key
        if _too_deep(value):
            raise _too_deep_error(param)
        if surrogates and (param is None or _has_lone_surrogate(value)):
            raise ProxyError(400, "The request body is not valid JSON: %s holds a lone UTF-16 "
                             "surrogate escape (like \\ud800 without its pair), which is not "
                             "text. Send the character itself, or its full surrogate pair."
                             % ("`%s`" % key if param else "a field name"), param=param,
                             code="invalid_json")


def _too_deep_error(param):
    return ProxyError(400, "The request body nests arrays and objects more than %d levels deep%s, "
                      "the most this proxy accepts. Flatten the structure, or send deep data "
                      "as a string." % (MAX_JSON_DEPTH, " (in `%s`)" % param if param else ""),
                      param=param, code="invalid_json")


def parse_json_object(raw):
    """The request body -> (dict, source, spans): spans[key] is where that top-level value
    stands in source, so encode_json_object() can send an unchanged value (a long `input`) on
    as the client's own bytes instead of encoding it again, which costs ~10 ms per 2 MB."""
    try:
        if raw[:3] == _UTF8_BOM:
            raw = raw[3:]  # offsets in text must be offsets in raw (see the return below)
        text = raw.decode("utf-8")
        pos = _JSON_SPACE.match(text).end()
        if text[pos:pos + 1] != "{":
            value = json.loads(text)  # valid but not an object, or invalid: say which below
            raise TypeError(type(value).__name__)
        body, spans = {}, {}
        pos = _JSON_SPACE.match(text, pos + 1).end()
        if text[pos:pos + 1] == "}":
            pos += 1
        else:
            while True:
                if text[pos:pos + 1] != '"':
                    raise json.JSONDecodeError("Expecting property name", text, pos)
                key, pos = _JSON_DECODER.raw_decode(text, pos)
                pos = _JSON_SPACE.match(text, pos).end()
                if text[pos:pos + 1] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
                start = _JSON_SPACE.match(text, pos + 1).end()
                try:
                    body[key], pos = _JSON_DECODER.raw_decode(text, start)
                except _NotJSON as e:
                    raise ProxyError(400, "The request body is not valid JSON: `%s` holds %s. "
                                     "Send a finite number (or null)." % (key, e), param=key,
                                     code="invalid_json")
                except RecursionError:
                    raise _too_deep_error(key)
                spans[key] = (start, pos)
                pos = _JSON_SPACE.match(text, pos).end()
                if text[pos:pos + 1] == ",":
                    pos = _JSON_SPACE.match(text, pos + 1).end()
                elif text[pos:pos + 1] == "}":
                    pos += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        if _JSON_SPACE.match(text, pos).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, pos)
    except RecursionError:
        raise _too_deep_error(None)
    except TypeError:
        raise ProxyError(400, "The request body must be a JSON object.", code="invalid_json")
    except UnicodeDecodeError:
        raise ProxyError(400, "The request body is not valid UTF-8.", code="invalid_json")
    except ValueError as e:
        raise ProxyError(400, "The request body is not valid JSON (%s)." % e, code="invalid_json")
    _check_json_values(body, text)
    # ASCII (what most SDKs send): offsets in text are offsets in raw, whose bytes can then be
    # copied as they are, without encoding 2 MB of str again.
    return body, (raw if text.isascii() else text), spans


def unchanged_span(key, value, original, spans):
    """Where value stands in the client's source, if it is still the very object
    parse_json_object() found at original[key]; else None."""
    span = spans.get(key) if spans else None
    if span is not None and isinstance(value, (list, dict)) and original.get(key) is value:
        return span
    return None


def encode_json_object(body, original=None, source=None, spans=None):
    """body as compact JSON bytes; values that are still the very objects parse_json_object()
    found in `original` are copied from the client's `source`, in a single copy."""
    if not spans or len(source) < 65536:  # splicing pays for large bodies only
        return json.dumps(body, separators=(",", ":")).encode()
    as_bytes = isinstance(source, bytes)
    view = memoryview(source) if as_bytes else source
    pieces = [b"{" if as_bytes else "{"]
    for key, value in body.items():
        head = ("," if len(pieces) > 1 else "") + json.dumps(key) + ":"
        span = unchanged_span(key, value, original, spans)
        if span is not None:
            piece = view[span[0]:span[1]]
        else:
            piece = json.dumps(value, separators=(",", ":"))
            head += piece
            piece = None
        pieces.append(head.encode() if as_bytes else head)
        if piece is not None:
            pieces.append(piece)
    pieces.append(b"}" if as_bytes else "}")
    if as_bytes:
        return b"".join(pieces)
    return "".join(pieces).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------------------------
# Codecs: HTTP/1.1 chunked bodies, decoded over whole reads (pure)
# --------------------------------------------------------------------------------------------

class ChunkedDecoder:
    """Incremental HTTP/1.1 chunked-body decoding over whole socket reads. http.client's own
    read1() yields one chunk per call, and the backend sends one chunk per event: decoding
    here lets one read carry every event that has arrived, and one client write relay them."""

    def __init__(self):
        self._buf = b""
        self._left = 0            # data bytes still to come in the current chunk
        self._after_data = False  # the CRLF that ends a chunk's data is due
        self._trailer = False     # the last chunk was seen; trailer lines until a blank one
        self.done = False

    def feed(self, data):
        if self._left or self._after_data or self._trailer:
            return self._feed_slow(data)
        buf = self._buf + data if self._buf else data
        decoded = self._feed_whole_chunks(buf)
        return self._feed_slow(buf, fresh=True) if decoded is None else decoded

    def _feed_whole_chunks(self, buf):
        """The usual case in C loops: chunks whose data holds no CRLF (the backend's events
        are LF-framed JSON), so splitting at CRLF gives size, data, size, data... Each size is
        checked against its data; None when anything else is there (a CRLF inside data, chunk
        extensions, the last chunk): the careful path then decodes the same bytes."""
        parts = buf.split(b"\r\n")
        rest = parts.pop()
        if len(parts) % 2:  # a size line whose data has not arrived yet
            rest = parts.pop() + b"\r\n" + rest
        if len(rest) > 65536:
            return None  # a large chunk still arriving: the careful path holds it without copies
        sizes, datas = parts[0::2], parts[1::2]
        try:
            if list(map(int, sizes, _SIXTEENS)) != list(map(len, datas)) or not all(datas):
                return None
        except ValueError:
            return None
        self._buf = rest
        return b"".join(datas)

    def _feed_slow(self, data, fresh=False):
        buf = data if fresh or not self._buf else self._buf + data
        out = []
        pos, n = 0, len(buf)
        while pos < n and not self.done:
            if self._left:
                take = min(self._left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                self._after_data = not self._left
                continue
            eol = buf.find(b"\n", pos)
            if eol < 0:
                if n - pos > 4096:
                    raise ValueError("chunk header too long")
                break
            line = buf[pos:eol]
            pos = eol + 1
            if self._after_data:
                if line.strip():
                    raise ValueError("chunk data longer than announced")
                self._after_data = False
            elif self._trailer:
                self.done = not line.strip()
            else:
                if b";" in line:
                    line = line.split(b";", 1)[0]  # chunk extensions mean nothing to us
                size = int(line, 16)  # tolerates the CR; ValueError on garbage
                if size < 0:
                    raise ValueError("negative chunk size")
                end = pos + size
                if size and buf[end:end + 2] == b"\r\n":  # the whole chunk is here: usual
                    out.append(buf[pos:end])
                    pos = end + 2
                    continue
                self._left = size
                self._trailer = size == 0
        self._buf = buf[pos:]
        return b"".join(out)


# Chunk sizes are read by int(size, 16) in map(), keeping the per-chunk work in C. int() is
# lenient ("0x1f", " 1f"), but each size must also equal its data's length, so a lenient
# spelling cannot shift the framing.
_SIXTEENS = itertools.repeat(16)


# --------------------------------------------------------------------------------------------
# Codecs: WebSocket framing (RFC 6455, pure): the handshake's accept key, frames,
# messages; and for the backend's socket, its frames read and the upgrade asked for
# --------------------------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR = 1000, 1001, 1002
CLOSE_UNSUPPORTED_DATA, CLOSE_INVALID_DATA, CLOSE_TOO_BIG = 1003, 1007, 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_POLICY_VIOLATION = 1008
# Codes an endpoint may never put in a close frame (RFC 6455 section 7.4.1).
_CLOSE_CODES_RESERVED = (1004, 1005, 1006, 1015)


class WebSocketError(Exception):
    """The client broke the protocol: the connection closes with this code."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def websocket_accept(headers):
    """The Sec-WebSocket-Accept value for an upgrade request (headers lower-cased), or the
    refusal RFC 6455 names: 426 with the version we speak, 400 without a valid key."""
    version = (headers.get("sec-websocket-version") or "").strip()
    if version != "13":
        raise ProxyError(426, "This proxy speaks WebSocket version 13 (RFC 6455); the request "
                         "asked for %r." % version, code="websocket_version_not_supported",
                         headers=[("Sec-WebSocket-Version", "13")])
    key = (headers.get("sec-websocket-key") or "").strip()
    try:
        valid = len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        valid = False
    if not valid:
        raise ProxyError(400, "A WebSocket handshake needs a Sec-WebSocket-Key header: 16 "
                         "random bytes in base64.", code="invalid_websocket_handshake")
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()


def check_upgrade(version, headers):
    """400 for an upgrade RFC 6455 4.2.1 does not allow: over HTTP/1.0, or without
    `Connection: Upgrade` (headers lower-cased). A proxy in between that drops the
    Connection header would otherwise get a 101 it cannot pass on."""
    if version != "HTTP/1.1":
        raise ProxyError(400, "A WebSocket upgrade needs HTTP/1.1 (this request is %s)."
                         % version, code="invalid_websocket_handshake")
    tokens = [t.strip().lower() for t in (headers.get("connection") or "").split(",")]
    if "upgrade" not in tokens:
        raise ProxyError(400, "A WebSocket upgrade needs the header `Connection: Upgrade`; "
                         "if a proxy in between drops it, let it pass WebSocket upgrades.",
                         code="invalid_websocket_handshake")


def encode_frame(opcode, payload=b"", mask=False):
    """One whole frame. A server's go unmasked; a client must mask what it sends."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + mask_payload(payload, key)


def close_frame(code=None, reason=""):
    """A close frame; code None sends none (the answer to a close that had none)."""
    if code is None:
        return encode_frame(OP_CLOSE)
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8")[:123])


def mask_payload(payload, mask):
    """XOR with the 4-byte mask (masking and unmasking alike), as one big-integer operation:
    C speed for megabytes."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


MASK_PIECE = 1 << 20  # a multiple of 4: each piece starts at the same phase of the key


def unmask_frame(buf, start, end):
    """The payload buf[start:end] of a client's frame, unmasked with the 4 key bytes before
    it. A large one is unmasked in place, a piece at a time, then copied out once: one copy
    of a 30 MB payload where unmasking it whole would make five."""
    key = bytes(buf[start - 4:start])
    if end - start <= MASK_PIECE:
        return mask_payload(bytes(buf[start:end]), key)
    with memoryview(buf) as view:
        for pos in range(start, end, MASK_PIECE):
            stop = min(pos + MASK_PIECE, end)
            view[pos:stop] = mask_payload(bytes(view[pos:stop]), key)
        return bytes(view[start:end])


def parse_close_payload(payload):
    """A close frame's (code or None, reason); WebSocketError for a malformed one."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "a close frame's code takes two bytes")
    code = int.from_bytes(payload[:2], "big")
    if code < 1000 or code >= 5000 or code in _CLOSE_CODES_RESERVED or 1016 <= code < 3000:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close code %d is not allowed" % code)
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_INVALID_DATA, "the close reason is not UTF-8")


def frame_header(buf, pos=0):
    """(first byte, masked, payload length, header length with the mask key) of the frame at
    buf[pos:]; None while its header is not whole."""
    have = len(buf) - pos
    if have < 2:
        return None
    first, second = buf[pos], buf[pos + 1]
    length, size = second & 0x7F, 2
    if length >= 126:
        size = 4 if length == 126 else 10
        if have < size:
            return None
        length = int.from_bytes(buf[pos + 2:pos + size], "big")
    masked = bool(second & 0x80)
    return first, masked, length, size + (4 if masked else 0)


UTF8_CHECK_PIECE = 1 << 20


def check_utf8(data, error):
    """Raise error unless data is UTF-8, decoding a piece at a time: checking a 30 MB message
    must not cost a 30 MB (or, for non-ASCII text, up to 120 MB) str."""
    if data.isascii():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for start in range(0, len(view), UTF8_CHECK_PIECE):
            decoder.decode(view[start:start + UTF8_CHECK_PIECE])
        decoder.decode(b"", True)
    except UnicodeDecodeError:
        raise error


class MessageReader:
    """A client's bytes -> its messages: feed() what arrives, get back (opcode, payload) for
    each whole text message (fragments joined) and each control frame (ping, pong, close) as
    it comes. The checks RFC 6455 asks of a server are made here; a violation raises
    WebSocketError with the close code. max_message_bytes bounds a message before its bytes
    are buffered, so an announced length alone is refused."""

    def __init__(self, max_message_bytes):
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._fragments = None  # the pieces of a text message in progress
        self._size = 0

    def feed(self, data):
        self._buf += data
        out = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return out
            message = self._message(*frame)
            if message is not None:
                out.append(message)

    def _next_frame(self):
        """(fin, opcode, payload) of the first whole frame in the buffer, else None."""
        buf = self._buf
        head = frame_header(buf)
        if head is None:
            return None
        first, masked, length, start = head
        fin, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was "
                                 "agreed)")
        if not masked:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode == OP_BINARY:
            raise WebSocketError(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted; send "
                                 "each request as a text frame of JSON")
        if opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unknown opcode %d" % opcode)
            if not fin or length > 125:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frames must be whole and "
                                     "at most 125 bytes")
        elif opcode not in (OP_CONTINUATION, OP_TEXT):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unknown opcode %d" % opcode)
        elif (opcode == OP_CONTINUATION) == (self._fragments is None):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "a continuation frame without a message "
                                 "to continue" if opcode == OP_CONTINUATION else
                                 "a new message before the last one's final fragment")
        if length >> 63:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
        if opcode < 0x8 and self._size + length > self.max_message_bytes:
            raise WebSocketError(CLOSE_TOO_BIG, "a message is limited to %d bytes (see the "
                                 "handshake's x-codex-websocket-max-message-bytes)"
                                 % self.max_message_bytes)
        end = start + length
        if len(buf) < end:
            return None
        payload = unmask_frame(buf, start, end)
        del buf[:end]
        return fin, opcode, payload

    def _message(self, fin, opcode, payload):
        if opcode >= 0x8:
            return opcode, payload
        if self._fragments is None:
            self._fragments = []
        self._fragments.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        data = b"".join(self._fragments)
        self._fragments, self._size = None, 0
        check_utf8(data, WebSocketError(CLOSE_INVALID_DATA, "a text message must be UTF-8"))
        return OP_TEXT, data


# The client side, for the backend's socket: the server's frames read, the upgrade asked for.
# The backend's events are small (the largest, response.completed, holds the output); a message
# from it is capped at --max-body-bytes, and never below this.
WS_MAX_MESSAGE = 16 * 1024 * 1024
WS_MAX_HANDSHAKE = 65536


class WebSocketReader:
    """Frames from a socket, through one buffer: a read takes all that has arrived, so the
    frames it holds are handed on together."""

    def __init__(self, sock, data=b"", max_message=None):
        self.sock = sock
        self._buf = bytearray(data)
        self._pos = 0
        self.max_message = max(max_message or 0, WS_MAX_MESSAGE)  # in total, across fragments
        self.inflater = None  # a MessageInflater once permessage-deflate is agreed
        self._inflated = None  # bytes so far of the compressed message being read

    def _receive(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError("the WebSocket connection was closed")
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk

    def frame(self):
        """(fin, opcode, payload) of the next frame, read from the socket as needed, its
        payload inflated when its message is compressed. A set RSV bit is a protocol error
        (ValueError) but RSV1 on a message's first frame once permessage-deflate is agreed."""
        head = frame_header(self._buf, self._pos)
        while head is None:
            self._receive()
            head = frame_header(self._buf, self._pos)
        first, masked, n, size = head
        if first & 0x70 and (first & 0x70 != RSV1 or self.inflater is None or
                             first & 0x0F not in (OP_TEXT, OP_BINARY)):
            raise ValueError("a WebSocket frame with RSV bits set" if self.inflater is None
                             else "RSV1 on a WebSocket frame that cannot start a compressed "
                             "message" if first & 0x70 == RSV1 else
                             "a WebSocket frame with RSV2 or RSV3 set")
        if n > self.max_message or (first & 0x08 and n > 125):
            raise ValueError("a WebSocket frame of %d bytes" % n)
        while len(self._buf) - self._pos < size + n:
            self._receive()
        start = self._pos + size
        with memoryview(self._buf) as view:  # one copy of the payload, not two
            payload = bytes(view[start:start + n])
        if masked:
            payload = mask_payload(payload, bytes(self._buf[start - 4:start]))
        self._pos = start + n
        if first & RSV1 or (self._inflated is not None and first & 0x0F == OP_CONTINUATION):
            payload = self._inflate(payload, first & RSV1, first & 0x80)
        return bool(first & 0x80), first & 0x0F, payload

    def _inflate(self, payload, starts, last):
        """A compressed message's frame inflated, the message's whole never past the cap."""
        if starts:
            self._inflated = 0
        room = self.max_message - self._inflated
        payload = self.inflater.inflate(payload, last, room)
        if len(payload) > room:
            raise ValueError("a WebSocket message of more than %d bytes once inflated"
                             % self.max_message)
        self._inflated = None if last else self._inflated + len(payload)
        return payload

    def frame_ready(self):
        """A whole frame is buffered: reading it will not block."""
        head = frame_header(self._buf, self._pos)
        return head is not None and len(self._buf) - self._pos >= head[3] + head[2]

    def message(self, pong, buffered_only=False):
        """(opcode, payload) of the next data message, fragments joined, or (OP_CLOSE,
        payload). Pings are answered through pong(payload) on the way. buffered_only: None
        instead of waiting when no whole message is buffered (a lone ping, a first fragment)."""
        parts, first, size = [], None, 0
        while True:
            if buffered_only and not parts and not self.frame_ready():
                return None
            fin, opcode, payload = self.frame()
            if opcode == OP_PING:
                pong(payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                return OP_CLOSE, payload
            if first is None:
                if opcode == OP_CONTINUATION:
                    raise ValueError("a WebSocket continuation frame with nothing to continue")
                first = opcode
            elif opcode != OP_CONTINUATION:  # RFC 6455 5.4: never joined to the one before
                del parts[:]  # not held by the traceback
                raise ValueError("a new WebSocket message inside a fragmented one")
            size += len(payload)
            if size > self.max_message:  # each fragment within the cap is not enough
                del parts[:]
                raise ValueError("a WebSocket message of more than %d bytes" % self.max_message)
            parts.append(payload)
            if fin:
                data = payload if len(parts) == 1 else b"".join(parts)
                if first == OP_TEXT:
                    check_utf8(data, ValueError("a WebSocket text message that is not UTF-8"))
                return first, data


# permessage-deflate (RFC 7692) on the backend's socket: the Codex CLI offers it too (the plain
# RFC offer here: the CLI's exact parameters are unknown), used only when the 101 accepts it. A turn's message repeats the tools and instructions
# every time (the CLI does too), which deflate shrinks several times over.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # what Z_SYNC_FLUSH ends with; never on the wire
# The fastest level: on a real Claude Code turn (~50 KB) it costs ~0.6 ms and leaves ~20 KB;
# level 6 saves 3 KB more for ~1.6 ms more.
DEFLATE_LEVEL = 1
RSV1 = 0x40  # in a frame's first byte: "this message is compressed"
_EXTENSION_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_WINDOW_BITS_RE = re.compile(r"[1-9][0-9]?\Z")


class DeflateTerms:
    """What the server's answer to our offer agreed: whether each side restarts its
    compression context with each message, and the window our compressor may use."""

    def __init__(self, server_no_context_takeover=False, client_no_context_takeover=False,
                 client_max_window_bits=15):
        self.server_no_context_takeover = server_no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.client_max_window_bits = client_max_window_bits


def _extension_params(element):
    """(name, [(param, value or None)]) of one element of Sec-WebSocket-Extensions
    (RFC 6455 9.1); ValueError when it breaks the grammar."""
    pieces = [p.strip() for p in element.split(";")]
    name, params = pieces[0], []
    if not _EXTENSION_TOKEN_RE.match(name):
        raise ValueError("a malformed extension %r" % element[:80])
    for piece in pieces[1:]:
        key, sep, value = (s.strip() for s in piece.partition("="))
        if sep and len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if not _EXTENSION_TOKEN_RE.match(key) or (sep and not _EXTENSION_TOKEN_RE.match(value)):
            raise ValueError("a malformed extension parameter %r" % piece[:80])
        params.append((key, value if sep else None))
    return name, params


def deflate_terms(headers):
    """The DeflateTerms a 101's headers agreed to, None when it declined (no
    Sec-WebSocket-Extensions); ValueError for an answer RFC 7692 section 7 does not allow
    to our offer: another extension, two answers, a parameter unknown, repeated, with a
    value it must not have or without one it must have, window bits outside 8..15."""
    values = [v for k, v in headers if k.lower() == "sec-websocket-extensions"]
    elements = [e for e in ",".join(values).split(",") if e.strip()]
    if not elements:
        return None
    if len(elements) > 1:
        raise ValueError("the backend answered more than one WebSocket extension")
    name, params = _extension_params(elements[0])
    if name != "permessage-deflate":
        raise ValueError("the backend agreed to the WebSocket extension %r, which was not "
                         "offered" % name)
    agreed = {}
    for key, value in params:
        if key in agreed:
            raise ValueError("permessage-deflate's %s twice" % key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                raise ValueError("permessage-deflate's %s with a value" % key)
            agreed[key] = True
        elif key in ("server_max_window_bits", "client_max_window_bits"):
            if value is None or not _WINDOW_BITS_RE.match(value) or not 8 <= int(value) <= 15:
                raise ValueError("permessage-deflate's %s must be 8 to 15" % key)
            agreed[key] = int(value)
        else:
            raise ValueError("permessage-deflate with an unknown parameter %r" % key)
    agreed.pop("server_max_window_bits", None)  # inflating with a 15-bit window reads any
    return DeflateTerms(**agreed)


class MessageDeflater:
    """Our messages compressed (RFC 7692 7.2.1): raw deflate, flushed at the message's end
    with the flush's 4-byte tail left off; the context carried from message to message
    unless the server asked for a fresh one each time."""

    def __init__(self, window_bits=15, no_context_takeover=False):
        self.window_bits = window_bits
        self.no_context_takeover = no_context_takeover
        self._compressor = None

    def compress(self, payload):
        compressor = self._compressor or zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED,
                                                          -self.window_bits)
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        self._compressor = None if self.no_context_takeover else compressor
        return data[:-4] if data.endswith(DEFLATE_TAIL) else data


class MessageInflater:
    """The server's compressed messages inflated, a frame at a time, never past a budget:
    a few kilobytes that inflate to gigabytes are refused at the budget, not allocated."""

    def __init__(self, no_context_takeover=False):
        self.no_context_takeover = no_context_takeover
        self._inflater = zlib.decompressobj(-15)

    def inflate(self, data, last, room):
        """data (one frame's payload) inflated, at most room + 1 bytes of it: more than room
        says the message goes past its cap. last: the message ends with this frame.
        ValueError for data that is not deflate."""
        inflater = self._inflater
        try:
            out = inflater.decompress(data, room + 1)
            if last and len(out) <= room and not inflater.eof:
                out += inflater.decompress(DEFLATE_TAIL, room + 1 - len(out))
        except zlib.error as e:
            raise ValueError("a compressed WebSocket message that does not inflate (%s)" % e)
        if last and (self.no_context_takeover or inflater.eof):
            self._inflater = zlib.decompressobj(-15)  # a final block ends the context too
        return out


class ErrorFrame(Exception):
    """The backend answered a turn with an error frame before any event."""

    def __init__(self, event):
        super().__init__("an error frame")
        self.event = event


class HandshakeRefused(Exception):
    """The server answered the upgrade with something else than 101."""

    def __init__(self, status, headers):
        super().__init__("HTTP %d" % status)
        self.status = status
        self.headers = headers


def client_handshake(sock, url, headers):
    """Upgrade a connected socket to a WebSocket at url, offering permessage-deflate:
    (response headers, bytes already read past them). HandshakeRefused for an answer other
    than 101, ValueError for a 101 that is not a WebSocket's or answers the offer wrongly,
    OSError / EOFError when the connection fails."""
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    lines = [b"GET %s HTTP/1.1" % target.encode("ascii"), b"Host: " + parts.netloc.encode("idna"),
             b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key,
             b"Sec-WebSocket-Version: 13",
             b"Sec-WebSocket-Extensions: " + DEFLATE_OFFER.encode("ascii")]
    for name, value in headers:
        value = value.encode("latin-1") if isinstance(value, str) else value
        if b"\r" in value or b"\n" in value:
            raise ValueError("a header value with a line break")  # never quote it: a secret
        lines.append(name.encode("latin-1") + b": " + value)
    sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > WS_MAX_HANDSHAKE:
            raise ValueError("an endless handshake answer")
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the connection closed during the WebSocket handshake")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, _, header_block = head.partition(b"\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise ValueError("not an HTTP answer: %r" % status_line[:80])
    answer = []
    for line in header_block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            answer.append((name.strip().decode("latin-1"), value.strip().decode("latin-1")))
    names = {k.lower(): v for k, v in answer}
    if status != 101:
        raise HandshakeRefused(status, answer)  # its body says nothing a fallback needs
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
    if names.get("upgrade", "").lower() != "websocket" or \
            names.get("sec-websocket-accept") != accept:
        raise ValueError("a 101 answer that is not a WebSocket upgrade")
    deflate_terms(answer)  # RFC 6455 4.1: an answer we cannot honour fails the connection
    return answer, rest


# --------------------------------------------------------------------------------------------
# Commands: logging in and out, the Codex CLI's device-code and browser flows
# (docs/backend.md §11)
# --------------------------------------------------------------------------------------------

DEFAULT_ISSUER = "https://auth.openai.com"
REVOKE_URL_ENV = "CODEX_REVOKE_TOKEN_URL_OVERRIDE"  # honoured by the Codex CLI too
LOGIN_CALLBACK_PORTS = (1455, 1457)  # the only two the issuer accepts in a redirect_uri
LOGIN_WAIT = 15 * 60           # a device code's lifetime; the browser flow waits as long
LOGIN_TIMEOUT = 30.0           # one request to the issuer
REVOKE_TIMEOUT = 5.0           # logout does not hang on an unreachable issuer
DEFAULT_POLL_INTERVAL = 5.0
LOGIN_LOCK_WAIT = REFRESH_TIMEOUT + 5  # a refresh in progress may hold auth.lock this long
OAUTH_SCOPE = "openid profile email offline_access api.connectors.read api.connectors.invoke"


class LoginFailed(Exception):
    """Why logging in or out failed, as the one line the user sees."""


def issuer_arg(text):
    url = text.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment:
        raise argparse.ArgumentTypeError("expected an issuer URL such as %s, got %r"
                                         % (DEFAULT_ISSUER, text))
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise argparse.ArgumentTypeError("tokens would travel unencrypted to %s: use https:// "
                                         "(plain http only to this machine)" % parts.hostname)
    return url


def revoke_url(issuer=None):
    """Where logout revokes: next to --issuer's token endpoint, else as the Codex CLI chooses
    (its override, else next to an overridden refresh URL, else auth.openai.com)."""
    if issuer:
        return issuer + "/oauth/revoke"
    override = os.environ.get(REVOKE_URL_ENV)
    if override:
        return override
    parts = urllib.parse.urlsplit(os.environ.get(REFRESH_URL_ENV) or "")
    if parts.scheme and parts.netloc:
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/oauth/revoke", "", ""))
    return DEFAULT_ISSUER + "/oauth/revoke"


def issuer_post(url, fields, form=False, timeout=LOGIN_TIMEOUT):
    """One POST to the issuer as the Codex CLI makes it (JSON, or a form for the code exchange;
    no User-Agent) -> (status, the answer's JSON or None)."""
    import urllib.error
    import urllib.request

    if form:
        data, ctype = urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"
    else:
        data, ctype = json.dumps(fields).encode(), "application/json"
    opener = urllib.request.build_opener()
    opener.addheaders = []  # not "Python-urllib/3.x": the CLI's login requests carry none
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype})
    try:
        with opener.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        status = e.code
        try:
            raw = e.read(65536)
        except (OSError, http.client.HTTPException):
            raw = b""
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        parts = urllib.parse.urlsplit(url)
        raise LoginFailed("cannot reach the issuer at %s://%s (%s)" % (
            parts.scheme, parts.netloc, getattr(e, "reason", None) or e))
    try:
        return status, json.loads(raw.decode("utf-8"))
    except ValueError:
        return status, None


def issuer_error(status, answer):
    """'HTTP 400 (invalid_grant: the code has expired)' from an OAuth error answer."""
    err = answer.get("error") if isinstance(answer, dict) else None
    message = (answer.get("error_description") if isinstance(answer, dict) else None) or (
        err.get("message") if isinstance(err, dict) else None)
    detail = [escape_controls(x)[:200] for x in (_error_code(answer), message)
              if isinstance(x, str) and x]
    return "HTTP %d%s" % (status, " (%s)" % ": ".join(detail) if detail else "")


def _error_code(answer):
    """The code of an OAuth error answer: {"error": "code"} or {"error": {"code": ...}}."""
    err = answer.get("error") if isinstance(answer, dict) else None
    code = err.get("code") if isinstance(err, dict) else err
    return code if isinstance(code, str) else ""


def poll_interval(value):
    """Seconds between polls. 0.171 insists on a JSON string ("5"); a number is taken too."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return DEFAULT_POLL_INTERVAL
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= 600:
        return DEFAULT_POLL_INTERVAL
    return float(value)


def request_device_code(issuer):
    status, answer = issuer_post(issuer + "/api/accounts/deviceauth/usercode",
                                 {"client_id": OAUTH_CLIENT_ID})
    if status == 404:
        raise LoginFailed("device code login is not enabled for this account: turn on "
                          "\"device code authorization for Codex\" in ChatGPT > Settings > "
                          "Security (in a workspace, an admin must allow it), or use "
                          "`login --browser`")
    if status != 200:
        raise LoginFailed("the issuer gave no device code: %s" % issuer_error(status, answer))
    answer = answer if isinstance(answer, dict) else {}
    device_auth_id = _text(answer.get("device_auth_id"))
    user_code = _text(answer.get("user_code")) or _text(answer.get("usercode"))
    if not device_auth_id or not user_code:
        raise LoginFailed("the issuer's device code answer lacks device_auth_id or user_code")
    return {"device_auth_id": device_auth_id, "user_code": user_code,
            "interval": poll_interval(answer.get("interval")),
            "verification_url": issuer + "/codex/device"}


def device_code_prompt(code):
    return ("\nTo log in with your ChatGPT account:\n"
            "  1. Open %s in a browser (on any device) and sign in.\n"
            "  2. Enter this one-time code (it expires in 15 minutes):  %s\n\n"
            "Device code login must first be enabled in ChatGPT > Settings > Security (\"device "
            "code authorization for Codex\"); in a workspace, an admin must allow it. Never share "
            "this code.\nWaiting for the approval (Ctrl-C to give up)...\n"
            % (code["verification_url"], code["user_code"]))


def wait_for_device_approval(issuer, code, deadline, sleep=time.sleep):
    """Polls until the user approves the code -> (authorization code, PKCE verifier): the
    issuer supplies both. 403 and 404 mean "not yet", as the Codex CLI reads them."""
    url = issuer + "/api/accounts/deviceauth/token"
    fields = {"device_auth_id": code["device_auth_id"], "user_code": code["user_code"]}
    while True:
        status, answer = issuer_post(url, fields)
        if status == 200:
            answer = answer if isinstance(answer, dict) else {}
            auth_code = _text(answer.get("authorization_code"))
            verifier = _text(answer.get("code_verifier"))
            if not auth_code or not verifier:
                raise LoginFailed("the issuer's approval lacks authorization_code or "
                                  "code_verifier")
            return auth_code, verifier
        reason = _error_code(answer).lower()
        # The pending answer is 403 deviceauth_authorization_pending; a 403 that says denied
        # or expired is not worth waiting 15 minutes on.
        if status not in (403, 404) or "denied" in reason or "expired" in reason:
            raise LoginFailed(device_failure(status, answer, reason))
        left = deadline - time.monotonic()
        if left <= 0:
            raise LoginFailed("the code was not approved within 15 minutes and has expired; "
                              "run login again for a new one")
        sleep(min(code["interval"], left))


def device_failure(status, answer, reason):
    detail = issuer_error(status, answer)
    if "denied" in reason or "declined" in reason:
        return "the login was denied at the issuer (%s)" % detail
    if "expired" in reason:
        return "the code has expired (%s); run login again for a new one" % detail
    return "the device login failed: %s" % detail


def exchange_code(issuer, code, redirect_uri, verifier):
    """The authorization code for the tokens (no API-key exchange follows, as after the CLI's
    device login: OPENAI_API_KEY stays null)."""
    status, answer = issuer_post(issuer + "/oauth/token", [
        ("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri),
        ("client_id", OAUTH_CLIENT_ID), ("code_verifier", verifier)], form=True)
    if status != 200:
        raise LoginFailed("the issuer did not exchange the sign-in code for tokens: %s"
                          % issuer_error(status, answer))
    answer = answer if isinstance(answer, dict) else {}
    tokens = {name: _text(answer.get(name))
              for name in ("id_token", "access_token", "refresh_token")}
    if not all(tokens.values()):
        raise LoginFailed("the issuer's token answer lacks the id, access or refresh token")
    if not jwt_claims(tokens["id_token"]):
        raise LoginFailed("the issuer's id token is not a JWT; the Codex CLI could not read it")
    return tokens


def pkce_pair():
    """(verifier, S256 challenge), as the CLI makes them: 64 random bytes, base64url."""
    verifier = base64.urlsafe_b64encode(os.urandom(64)).rstrip(b"=").decode()
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_url(issuer, redirect_uri, challenge, state):
    """The Codex CLI 0.171's authorize URL, its parameters in its order."""
    return "%s/oauth/authorize?%s" % (issuer, urllib.parse.urlencode([
        ("response_type", "code"), ("client_id", OAUTH_CLIENT_ID),
        ("redirect_uri", redirect_uri), ("code_challenge", challenge),
        ("code_challenge_method", "S256"), ("state", state), ("scope", OAUTH_SCOPE),
        ("id_token_add_organizations", "true"), ("codex_cli_simplified_flow", "true"),
        ("originator", DEFAULT_ORIGINATOR)]))


def state_matches(params, state):
    """Whether a callback's parameters are this login's (in constant time: state is a secret)."""
    return hmac.compare_digest(params.get("state", "").encode(), state.encode())


def callback_code(query, state):
    """The authorization code of a callback's query, once its state is this login's."""
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if not state_matches(params, state):
        raise LoginFailed("the sign-in answer is not for this login (its state does not match); "
                          "run login again")
    error = params.get("error")
    if error:
        description = params.get("error_description") or ""
        if error == "access_denied" and "missing_codex_entitlement" in description.lower():
            raise LoginFailed("Codex is not enabled for this workspace: ask its administrator "
                              "for access")
        raise LoginFailed("the sign-in failed: %s" % escape_controls(description or error)[:300])
    if not params.get("code"):
        raise LoginFailed("the sign-in answer has no code")
    return params["code"]


def pasted_query(line):
    """The query of the address the user pasted (http://localhost:1455/auth/callback?code=...
    &state=...), None when the line is not one."""
    line = line.strip().strip("\"'<>")  # quoted as a chat, a mail or a shell shows it
    query = urllib.parse.urlsplit(line).query if "?" in line else line
    params = dict(urllib.parse.parse_qsl(query))
    return query if "state" in params and ("code" in params or "error" in params) else None


class SignInAnswer:
    """A callback's query, from the browser or pasted, waiting for the login's verdict."""

    def __init__(self, query, from_browser=False):
        self.query = query
        self.from_browser = from_browser
        self.error = None
        self.done = threading.Event()
        self.page_sent = threading.Event()  # the browser has its page: the process may end

    def finish(self, error=None):
        self.error = error
        self.done.set()


class LoginCallbackHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path != "/auth/callback":
            return self._page(404, "Not found.")
        answer = SignInAnswer(query, from_browser=True)
        self.server.inbox.put(answer)
        try:
            if not answer.done.wait(LOGIN_TIMEOUT * 2 + 10):
                self._page(504, "The login is still being saved: see the terminal.")
            elif answer.error:
                self._page(400, "Sign-in failed: %s" % answer.error)
            else:
                self._page(200, "Signed in. You can close this tab and go back to the terminal.")
        finally:
            answer.page_sent.set()

    def _page(self, status, text):
        import html
        body = ("<!doctype html><meta charset=\"utf-8\"><title>codex-responses-proxy login</title>"
                "<p>%s</p>\n" % html.escape(text)).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass  # the callback's address holds the sign-in code


class LoginCallbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a browser's idle preconnection must not hold the real callback up

    def __init__(self, port, inbox):
        self.inbox = inbox
        super().__init__(("127.0.0.1", port), LoginCallbackHandler)

    def handle_error(self, request, client_address):
        pass  # a browser that drops its connection is no failure of the login: no traceback


def bind_callback_server(inbox):
    for port in LOGIN_CALLBACK_PORTS:
        try:
            return LoginCallbackServer(port, inbox)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise LoginFailed("cannot listen on 127.0.0.1:%d for the sign-in answer (%s)"
                                  % (port, e.strerror or e))
    raise LoginFailed("ports %s on 127.0.0.1 are all in use (another login waiting?): stop it, "
                      "or log in with a device code (`login` without --browser)"
                      % " and ".join(str(p) for p in LOGIN_CALLBACK_PORTS))


def _read_pasted(stdin, inbox, out):
    try:
        for line in iter(stdin.readline, ""):
            query = pasted_query(line)
            if query is not None:
                inbox.put(SignInAnswer(query))
            elif line.strip():
                say(out, "That is not the address the browser ended on (it has code= and "
                         "state= in it); paste the whole address.")
    except (OSError, ValueError):
        pass  # no usable standard input: the browser's callback can still come


def next_sign_in_answer(inbox, deadline):
    import queue
    left = deadline - time.monotonic()
    try:
        if left > 0:
            return inbox.get(timeout=left)
    except queue.Empty:
        pass
    raise LoginFailed("no sign-in within 15 minutes; run login again")


def browser_login(issuer, path, stdin, out, deadline):
    """The PKCE flow: the browser comes back to 127.0.0.1:1455 (1457 when taken), or the user
    pastes the address it ended on. Returns what complete_login says."""
    import queue
    inbox = queue.Queue()
    server = bind_callback_server(inbox)
    redirect_uri = "http://127.0.0.1:%d/auth/callback" % server.server_address[1]
    verifier, challenge = pkce_pair()
    state = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    answer = None
    try:
        say(out, "\nOpen this address in a browser and sign in with your ChatGPT account:\n\n"
                 "  %s\n\nThe browser then comes back to %s. If it runs on another machine, "
                 "that page cannot load: copy the address it shows (%s?code=...&state=...) and "
                 "paste it here, then press Enter.\nWaiting (Ctrl-C to give up)..."
            % (authorize_url(issuer, redirect_uri, challenge, state), redirect_uri,
               redirect_uri))
        if stdin is not None:
            threading.Thread(target=_read_pasted, args=(stdin, inbox, out), daemon=True).start()
        answer = next_sign_in_answer(inbox, deadline)
        while answer.from_browser and not state_matches(
                dict(urllib.parse.parse_qsl(answer.query)), state):
            # Any web page can send the browser here: as the Codex CLI does, an answer for
            # another login is refused and this one keeps waiting for its own.
            answer.finish("this address is not for the login waiting here (its state does not "
                          "match)")
            answer = next_sign_in_answer(inbox, deadline)
        try:
            code = callback_code(answer.query, state)
            summary = complete_login(path, exchange_code(issuer, code, redirect_uri, verifier))
        except LoginFailed as e:
            answer.finish(str(e))
            raise
        answer.finish()
        return summary
    finally:
        if answer is not None and answer.from_browser:
            answer.page_sent.wait(5)
        server.shutdown()
        server.server_close()


def login_document(tokens):
    """A new login in the Codex CLI's auth.json format."""
    return {"auth_mode": "chatgpt", "OPENAI_API_KEY": None,
            "tokens": {"id_token": tokens["id_token"], "access_token": tokens["access_token"],
                       "refresh_token": tokens["refresh_token"],
                       "account_id": _auth_claim(jwt_claims(tokens["id_token"]),
                                                 "chatgpt_account_id")},
            "last_refresh": rfc3339_now()}


def auth_lock_paths(path):
    """The Codex CLI's two locks for this auth.json: (around a change, around the write)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), "auth.lock"), path + ".lock"


def prepare_codex_home(path):
    """Before the user is asked for anything: the directory exists and takes a new file."""
    directory = os.path.dirname(os.path.realpath(path))
    try:
        os.makedirs(directory, 0o700, exist_ok=True)
        probe_writable(directory)
    except OSError as e:
        raise LoginFailed("cannot write in %s (%s): fix its permissions, or choose another "
                          "directory with --codex-home" % (directory, e.strerror or e))


@contextlib.contextmanager
def change_lock_held(path, undone):
    """The Codex CLI's auth.lock, held around a change of auth.json (auth.json.lock is then
    taken around the write itself). undone: what did not happen when another process held it
    too long."""
    change_lock = auth_lock_paths(path)[0]
    with _FileLock(change_lock, LOGIN_LOCK_WAIT) as lock:
        if not lock.acquired:
            raise LoginFailed("another process (a Codex CLI or proxy refreshing the login?) has "
                              "held %s for %d s; %s. Try again once it is done"
                              % (change_lock, LOGIN_LOCK_WAIT, undone))
        yield


def save_login(path, doc):
    """The new login replaces the old one atomically (0600), under the CLI's locks in its
    order; on any failure the old file stays as it was."""
    with change_lock_held(path, "nothing was saved"):
        with _FileLock(auth_lock_paths(path)[1], AUTH_WRITE_LOCK_WAIT):
            try:
                write_auth_file(path, doc)
            except OSError as e:
                raise LoginFailed("cannot write %s (%s); nothing was saved"
                                  % (path, e.strerror or e))


def login_identity(creds):
    """'user@example.com (plan pro, account acct-1)' from the tokens' claims."""
    ident = jwt_claims(creds.id_token)
    profile = ident.get("https://api.openai.com/profile")
    email = _text(ident.get("email")) or (_text(profile.get("email"))
                                          if isinstance(profile, dict) else None)
    return "%s (plan %s, account %s)" % (email or "an unknown e-mail address",
                                         creds.plan_type or "unknown",
                                         creds.account_id or "unknown")


def complete_login(path, tokens):
    doc = login_document(tokens)
    save_login(path, doc)
    return ("Logged in as %s. Saved to %s; a running proxy uses it from its next request."
            % (login_identity(Credentials(doc)), path))


def log_in(path, issuer, browser, stdin, out):
    prepare_codex_home(path)
    deadline = time.monotonic() + LOGIN_WAIT
    if browser:
        summary = browser_login(issuer, path, stdin, out, deadline)
    else:
        code = request_device_code(issuer)
        say(out, device_code_prompt(code))
        auth_code, verifier = wait_for_device_approval(issuer, code, deadline)
        summary = complete_login(path, exchange_code(issuer, auth_code,
                                                     issuer + "/deviceauth/callback", verifier))
    say(out, summary)
    return 0


def _utc_minute(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


def login_status_lines(path, creds, now=None):
    """Who is logged in and how fresh the tokens are: no token text."""
    now = time.time() if now is None else now
    if creds.expires_at is None:
        expiry = "no expiry in the token"
    elif creds.expires_at > now:
        expiry = "expires %s (in %d min)" % (_utc_minute(creds.expires_at),
                                             (creds.expires_at - now) // 60)
    else:
        expiry = "expired %s; refreshed on the next request" % _utc_minute(creds.expires_at)
    refreshed = _utc_minute(creds.last_refresh.timestamp()) if creds.last_refresh else "never"
    return ["Logged in with ChatGPT as %s" % login_identity(creds),
            "  access token: %s" % expiry, "  last refresh: %s" % refreshed,
            "  file: %s" % path]


def show_login_status(path, out):
    if api_key_from_auth_file(path):
        say(out, "Logged in with an API key (API-key mode: requests go to the OpenAI platform), "
                 "from %s" % path)
        return 0
    try:
        creds = read_auth_file(path)
    except ProxyError as e:
        say(out, "Not logged in: %s" % e.message)
        return 1
    for line in login_status_lines(path, creds):
        say(out, line)
    return 0


def revocable_token(raw):
    """(token, token_type_hint) that logout revokes: the refresh token, else the access token."""
    try:
        tokens = json.loads(raw.decode("utf-8")).get("tokens")
    except (ValueError, AttributeError):
        return None
    if not isinstance(tokens, dict):
        return None
    for kind in ("refresh_token", "access_token"):
        if _text(tokens.get(kind)):
            return tokens[kind], kind
    return None


def revoke_token(url, token, kind):
    """Best effort: None when revoked, else why not."""
    fields = {"token": token, "token_type_hint": kind}
    if kind == "refresh_token":
        fields["client_id"] = OAUTH_CLIENT_ID
    try:
        status, answer = issuer_post(url, fields, timeout=REVOKE_TIMEOUT)
    except LoginFailed as e:
        return str(e)
    return None if 200 <= status < 300 else "the issuer answered %s" % issuer_error(status,
                                                                                   answer)


def log_out(path, issuer, out):
    """Revokes the login at the issuer (best effort) and removes auth.json, under the CLI's
    locks so that no refresh writes it back."""
    with change_lock_held(path, "%s was not removed" % path):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            say(out, "Not logged in: %s does not exist." % path)
            return 0
        except OSError as e:
            raise LoginFailed("cannot read %s (%s)" % (path, e.strerror or e))
        with _FileLock(auth_lock_paths(path)[1], AUTH_WRITE_LOCK_WAIT):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise LoginFailed("cannot remove %s (%s)" % (path, e.strerror or e))
        # Only once the file is gone: a revoked login left in place is a dead one.
        revocable = revocable_token(raw)
        problem = revocable and revoke_token(revoke_url(issuer), *revocable)
    if problem:
        say(out, "warning: could not revoke the login at the issuer (%s); it stays valid there "
                 "until it expires" % problem)
    say(out, "Logged out: removed %s." % path)
    return 0


def say(out, text):
    out.write(text + "\n")
    out.flush()


def build_login_parser(command):
    if command == "login":
        p = argparse.ArgumentParser(
            prog="codex_responses_proxy.py login",
            description="Log in with your ChatGPT account and save the login where the proxy "
                        "and the Codex CLI read it ($CODEX_HOME/auth.json, in the CLI's format). "
                        "By default with a device code: open the address shown on any device, "
                        "enter the code. A new login replaces the old one only once it has "
                        "succeeded.")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--browser", action="store_true",
                         help="sign in in a browser instead; it comes back to 127.0.0.1:1455 "
                              "(1457 when taken), or you paste the address it ended on")
        how.add_argument("--status", action="store_true",
                         help="show who is logged in and when the token expires (no secrets); "
                              "exit status 0 when logged in, 1 when not")
    else:
        p = argparse.ArgumentParser(
            prog="codex_responses_proxy.py logout",
            description="Revoke the login at the issuer (best effort) and remove auth.json.")
    p.add_argument("--codex-home", metavar="DIR",
                   help="directory holding auth.json (default $CODEX_HOME, else ~/.codex)")
    p.add_argument("--issuer", type=issuer_arg, metavar="URL",
                   help="the OAuth issuer (default %s), like the Codex CLI's "
                        "--experimental_issuer; for tests" % DEFAULT_ISSUER)
    return p


def login_command(argv, stdin=None, out=None):
    """`login [--browser | --status]` and `logout`: 0 when done; else one line on stderr and
    1 (130 after Ctrl-C). The previous login is replaced only by one that succeeded."""
    command = argv[0]
    args = build_login_parser(command).parse_args(argv[1:])
    out = out or sys.stderr
    path = os.path.join(args.codex_home or default_codex_home(), "auth.json")
    try:
        if command == "logout":
            return log_out(path, args.issuer, out)
        if args.status:
            return show_login_status(path, sys.stdout)
        return log_in(path, args.issuer or DEFAULT_ISSUER, args.browser,
                      sys.stdin if stdin is None else stdin, out)
    except LoginFailed as e:
        say(out, "%s failed: %s" % (command, e))
    except KeyboardInterrupt:
        say(out, "\n%s interrupted: %s is as it was" % (command, path))
        return 130
    except Exception as e:  # never a traceback; the class name only, no text that may hold a token
        say(out, "%s failed: unexpected %s" % (command, e.__class__.__name__))
    return 1


# --------------------------------------------------------------------------------------------
# Commands: main, the server started and stopped
# --------------------------------------------------------------------------------------------

def write_server_info(path, port):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    info = json.dumps({"port": port, "pid": os.getpid()})
    write_file_atomic(path, lambda f: f.write(info + "\n"), 0o644)


def raise_descriptor_limit():
    """Lift the soft limit on open files to the hard one: each connection takes a descriptor
    or two, and a soft limit of 1024 is common."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 10240):  # macOS: an unlimited hard limit, but no more than OPEN_MAX
        if soft < target <= hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return
            except (ValueError, OSError):
                pass


# CPython keeps a script's parse tree (about 12 MB for this file on 3.9 and later, a third
# of the proxy's idle memory) until the script's top level returns, which a server's never
# does. So, when the interpreter runs this file itself, the proxy serves from a thread of its
# own and lets the top level return: the interpreter frees the tree, then waits for that
# thread before it exits. Not under -m, cProfile or pdb (a Python frame below this one):
# their compile() freed the tree already, and they watch the main thread. Not on Python
# 3.12.0 to 3.12.2, which refuse new threads once the top level has returned.
SERVE_PAST_THE_TOP_LEVEL = (__name__ == "__main__" and sys._getframe().f_back is None
                            and sys.version_info[:3] not in ((3, 12, 0), (3, 12, 1), (3, 12, 2)))


# Blocks from this size up are mapped on their own and go back to the system when freed.
# glibc's default raises its threshold up to 32 MB after each large block is freed, and then
# keeps later large blocks (a 30 MB message, its parse, its copy upstream) in the heap,
# where what is freed stays in the process: a 30 MB request left the proxy 60 MB larger.
# Not lower: each mapped block is new pages, faulted in on first touch, and at 1 MiB a 2 MB
# body's three copies (bytes, text, what goes upstream) cost ~1,500 page faults, 5-10 ms.
MMAP_THRESHOLD = 4 << 20
# The free top of the heap kept for reuse, as glibc sets it when it moves the threshold
# itself (a fixed threshold leaves it at 128 KiB, and blocks under 4 MiB faulted in again).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from malloc.h


def glibc():
    """The C library when it is glibc (for mallopt and malloc_trim), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        import ctypes  # here: its 0.7 MB are not worth it on other C libraries
        return ctypes.CDLL(None)
    except (ImportError, ValueError, OSError, AttributeError):
        return None


def map_large_blocks_apart():
    """Set MMAP_THRESHOLD and TRIM_THRESHOLD in this process, at start, each unless the user
    chose it with glibc's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (which glibc
    read as the process started)."""
    libc = glibc()
    if libc is None:
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def give_back_freed_memory():
    """Return the pages glibc's malloc holds free to the system (it keeps freed memory in
    the process for reuse). A no-op where the C library is not glibc."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def serve_past_the_top_level(serve):
    """Run serve() in a thread that outlives the script's top level (see
    SERVE_PAST_THE_TOP_LEVEL) and return at once. Once the main thread has finished the
    top level, the parse tree is free and its pages go back to the system. An exception
    in serve() still ends the process with status 1, as it would in the main thread."""
    def run():
        # SIGTERM and SIGINT blocked here, and so in every thread this one starts: the kernel
        # then delivers them to the main thread. It waits for this thread in a lock that only
        # a signal delivered to it interrupts, and only it runs Python's signal handlers.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        threading.main_thread().join()
        give_back_freed_memory()
        try:
            status = serve()
        except BaseException:
            sys.excepthook(*sys.exc_info())
            status = 1
        if status:
            sys.stderr.flush()
            os._exit(status)
    threading.Thread(target=run, name="serve").start()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("login", "logout"):
        return login_command(argv)
    config = parse_config(argv)
    log = Log(debug=config.debug)
    map_large_blocks_apart()
    raise_descriptor_limit()
    try:
        server = ProxyServer(config, log)
    except StartupError as e:
        log.info("cannot start: %s" % e)
        return 1
    except OSError as e:
        log.info("cannot listen on %s:%d: %s" % (config.host, config.port, e.strerror or e))
        return 1
    log.info("codex-responses-proxy %s listening on %s (%s mode, upstream %s)"
             % (__version__, server.url, server.app.operator.mode_name, config.upstream_url))
    app = server.app
    log.info(app.operator.describe_credentials())
    warning = app.operator.permission_warning()
    if warning:
        log.info(warning)
    if config.server_info:
        try:
            write_server_info(config.server_info, server.server_address[1])
        except OSError as e:
            log.info("cannot write --server-info %s: %s" % (config.server_info, e.strerror or e))
            server.server_close()
            return 1

    def stop(signum, frame):
        app.begin_shutdown("received %s" % signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def serve():
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            server.socket.close()  # refuse new connections now, not after the drain
            if not app.traffic.wait_idle(SHUTDOWN_GRACE):
                log.info("stopping with requests still in flight")
            # Waited for apart from the drain, which can give up first (25 s against a 30 s
            # refresh timeout): a redeemed refresh token's successor exists only in this
            # process until it is saved, and losing it would log the Codex CLI out too.
            if not app.auth.stop_refreshing(REFRESH_TIMEOUT + 5):
                log.info("warning: stopping before a token refresh finished; if it went "
                         "through, the new login is lost. Run `codex login` if requests "
                         "fail with 401.")
            server.server_close()
        log.info("stopped")
        return 0
    return serve_past_the_top_level(serve) if SERVE_PAST_THE_TOP_LEVEL else serve()


if __name__ == "__main__":
    sys.exit(main())
