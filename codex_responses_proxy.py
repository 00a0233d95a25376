#!/usr/bin/env python3
"""codex-responses-proxy: the OpenAI Responses API on a ChatGPT/Codex subscription.

    client -> http://127.0.0.1:8787/v1/responses -> https://chatgpt.com/backend-api/codex/responses

It borrows the Codex CLI's login ($CODEX_HOME/auth.json, default ~/.codex/auth.json), refreshes the
access token when it expires and writes it back atomically, rewrites each request into what the
backend accepts (stream on, store off, instructions present, rejected parameters removed), and
answers in the Responses API's own shape: one JSON object for a non-streaming client, the live
event stream for a streaming one.

Run it:    python3 codex_responses_proxy.py            (then point a client at http://127.0.0.1:8787/v1)
Help:      python3 codex_responses_proxy.py --help

One file, standard library only, Python 3.8 or newer.
"""

import argparse
import base64
import collections
import contextlib
import datetime
import hashlib
import hmac
import http.client
import http.server
import importlib
import io
import ipaddress
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

try:  # the standard library's zstd, from Python 3.14 on (the Codex CLI may send zstd bodies)
    zstd = importlib.import_module("compression.zstd")
except ImportError:
    zstd = None

__version__ = "0.1.0"

# --------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------

DEFAULT_ADDR = "127.0.0.1:8787"
DEFAULT_UPSTREAM_URL = "https://chatgpt.com/backend-api/codex/responses"
API_UPSTREAM_URL = "https://api.openai.com/v1/responses"  # API-key mode
DEFAULT_CLIENT_VERSION = "0.169.0"  # the backend gates models on the `version` header
DEFAULT_ORIGINATOR = "codex_cli_rs"
DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Follow the user's and developer's instructions."
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0  # the Codex CLI's own default
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

REFRESH_URL = "https://auth.openai.com/oauth/token"
REFRESH_URL_ENV = "CODEX_REFRESH_TOKEN_URL_OVERRIDE"  # honoured by the Codex CLI too
OAUTH_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"

CONNECT_TIMEOUT = 30.0
REFRESH_TIMEOUT = 30.0
SHUTDOWN_GRACE = 25.0  # systemd's default stop timeout is 90 s; in-flight turns get most of it
MODELS_CACHE_SECONDS = 300  # as the Codex CLI caches its model list
API_KEY_LIMIT = 1024
DEFAULT_MAX_CONCURRENT = 64
DEFAULT_STATE_MB = 64          # previous_response_id store in memory ...
DEFAULT_STATE_DB_MB = 1024     # ... and with --state-db
CLIENT_KEY_ENV = "CODEX_PROXY_CLIENT_KEY"
IDLE_CONNECTION_TIMEOUT = 75.0  # a keep-alive connection with no request is closed, as nginx does
REQUEST_READ_DEADLINE = 50.0    # a request must arrive whole this soon after its first byte
WRITE_TIMEOUT = 120.0           # a client that stops reading its stream is dropped

HELP_EPILOG = """\
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

  Python:  OpenAI(base_url="http://127.0.0.1:8787/v1", api_key="unused").responses.create(...)

environment:
  CODEX_HOME                          where auth.json lives (default ~/.codex)
  CODEX_REFRESH_TOKEN_URL_OVERRIDE    token refresh URL (as in the Codex CLI)
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
                 max_concurrent=DEFAULT_MAX_CONCURRENT, state_db=None, state_max_mb=None):
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
        self.state_db = state_db
        self.state_max_bytes = int((state_max_mb or (DEFAULT_STATE_DB_MB if state_db
                                                     else DEFAULT_STATE_MB)) * 1024 * 1024)

    @property
    def auth_path(self):
        return os.path.join(self.codex_home, "auth.json")


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


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="codex_responses_proxy.py",
        description="Serve the OpenAI Responses API locally on a ChatGPT/Codex subscription, "
                    "using the Codex CLI's login (run `codex login` first).",
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
    p.add_argument("--client-version", default=DEFAULT_CLIENT_VERSION, metavar="V",
                   help="Codex CLI version to present; the backend gates models on it "
                        "(default %(default)s)")
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
                   help="largest request body accepted (default %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                   help="requests in flight at once; more get 503 (default %(default)s)")
    p.add_argument("--state-db", metavar="PATH",
                   help="keep conversations for previous_response_id in this SQLite file, so "
                        "they survive restarts (default: in memory)")
    p.add_argument("--state-max-mb", type=positive_float, metavar="MB",
                   help="size cap of that store; the least recently used go first (default %d "
                        "in memory, %d with --state-db)" % (DEFAULT_STATE_MB,
                                                           DEFAULT_STATE_DB_MB))
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
    if args.max_body_bytes < 1 or args.max_concurrent < 1:
        parser.error("--max-body-bytes and --max-concurrent must be at least 1")
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
                  stream_idle_timeout=args.stream_idle_timeout, api_key_header=key_header,
                  api_key_source=key_source, server_info=args.server_info,
                  http_shutdown=args.http_shutdown, dump_dir=args.dump_dir,
                  client_key=client_key, allow_hosts=args.allow_host,
                  allow_origins=args.allow_origin, max_body_bytes=args.max_body_bytes,
                  max_concurrent=args.max_concurrent, state_db=args.state_db,
                  state_max_mb=args.state_max_mb)


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
    afterwards, and the header is built once; Python cannot promise more (see README)."""
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
    into an exception message or a debug dump is still never written."""

    def __init__(self, stream=None, debug=False):
        self.stream = stream or sys.stderr
        self.debug_enabled = debug
        self.colour = hasattr(self.stream, "isatty") and self.stream.isatty()
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
        line = "%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), self.redact(msg))
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not take a request down with it

    def debug(self, msg):
        if self.debug_enabled:
            self.info("debug: " + msg)

    def warn_once(self, key, msg):
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.info("warning: " + msg)

    def status(self, code):
        if not self.colour:
            return str(code)
        return "\033[%sm%d\033[0m" % ("32" if code < 400 else "33" if code < 500 else "31", code)


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


# --------------------------------------------------------------------------------------------
# Credentials: load auth.json, find the account id, refresh, save atomically
# --------------------------------------------------------------------------------------------

REFRESH_MARGIN = 60  # seconds before `exp` at which a token counts as expired
REFRESH_AGE_WITHOUT_EXP = 8 * 24 * 3600  # the Codex CLI's rule for tokens without `exp`
PERMANENT_REFRESH_CODES = ("refresh_token_expired", "refresh_token_reused",
                           "refresh_token_invalidated")
LOGIN_HINT = "Run `codex login` to sign in again."
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
        tokens = data.get("tokens") or {}
        self.data = data  # the whole file, so a rewrite keeps keys we do not know
        self.access_token = tokens.get("access_token")
        self.refresh_token = tokens.get("refresh_token")
        self.id_token = tokens.get("id_token")
        access = jwt_claims(self.access_token)
        ident = jwt_claims(self.id_token)
        self.expires_at = access.get("exp") if isinstance(access.get("exp"), (int, float)) else None
        self.account_id = (tokens.get("account_id")
                           or _auth_claim(ident, "chatgpt_account_id")
                           or _auth_claim(access, "chatgpt_account_id"))
        self.plan_type = _auth_claim(ident, "chatgpt_plan_type") or _auth_claim(
            access, "chatgpt_plan_type")
        self.last_refresh = parse_rfc3339(data.get("last_refresh"))

    def needs_refresh(self, now=None):
        now = time.time() if now is None else now
        if self.expires_at is not None:
            return self.expires_at - now < REFRESH_MARGIN
        if self.last_refresh is not None:
            return now - self.last_refresh.timestamp() > REFRESH_AGE_WITHOUT_EXP
        return False

    def secrets(self):
        return [t for t in (self.access_token, self.refresh_token, self.id_token) if t]


def _auth_claim(claims, name):
    value = (claims.get("https://api.openai.com/auth") or {}).get(name)
    return value if isinstance(value, str) and value else None


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
    if not isinstance(tokens, dict) or not tokens.get("access_token"):
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
    protocol across processes (PROTOCOL.md §2), so that the CLI, this proxy and other proxies
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
            fd, probe = tempfile.mkstemp(prefix=".auth.json.", suffix=".probe", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ProxyError(500, "The access token has expired, but %s is not writable (%s), so "
                             "a refreshed login could not be saved; not refreshing. Fix the "
                             "directory's permissions." % (directory, e.strerror or e),
                             code="codex_home_not_writable")


# --------------------------------------------------------------------------------------------
# Request rewriting (pure)
# --------------------------------------------------------------------------------------------

REJECTED_PARAMS = ("max_output_tokens", "max_completion_tokens", "temperature", "top_p")
# Never dropped on an "Unsupported parameter" answer: without them the request means something
# else, and the client should hear of the refusal instead.
ESSENTIAL_PARAMS = ("model", "input", "instructions", "stream", "store", "tools", "tool_choice",
                    "reasoning", "text", "include")


def _inflate(raw, wbits, limit):
    """zlib, raw deflate or gzip (wbits 15, -15, 31) data, inflated to at most limit bytes
    (None: no limit), so that a small compressed body cannot expand to gigabytes."""
    out = b""
    while True:
        d = zlib.decompressobj(wbits)
        out += d.decompress(raw, 0 if limit is None else limit + 1 - len(out))
        if limit is not None and len(out) > limit:
            raise ProxyError(413, "The request body is over the limit of %d bytes once "
                             "decompressed." % limit, code="request_too_large")
        if not d.eof:
            raise ValueError("the compressed data ends early")
        raw = d.unused_data
        if wbits != 31 or not raw:  # a gzip body may hold several members
            return out


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
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise ProxyError(400, "The request body is not valid %s data: %s" % (encoding, e),
                         code="invalid_body")
    raise ProxyError(415, "Unsupported Content-Encoding %r; use gzip, deflate or none."
                     % encoding, code="unsupported_content_encoding")


_JSON_DECODER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def parse_json_object(raw):
    """The request body -> (dict, source, spans): spans[key] is where that top-level value
    stands in source, so encode_json_object() can send an unchanged value (a long `input`) on
    as the client's own bytes instead of encoding it again, which costs ~10 ms per 2 MB."""
    try:
        if raw[:3] == b"\xef\xbb\xbf":
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
                body[key], pos = _JSON_DECODER.raw_decode(text, start)
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
    except TypeError:
        raise ProxyError(400, "The request body must be a JSON object.", code="invalid_json")
    except UnicodeDecodeError:
        raise ProxyError(400, "The request body is not valid UTF-8.", code="invalid_json")
    except (ValueError, RecursionError) as e:
        raise ProxyError(400, "The request body is not valid JSON (%s)." % e, code="invalid_json")
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


def derive_session_id(model, instructions, first_item):
    """A stable id for one conversation: its turns share the model, the instructions and the
    first input item, so they land on the same backend prompt cache."""
    seed = json.dumps([model, instructions, first_item], sort_keys=True, separators=(",", ":"))
    return str(uuid.UUID(bytes=hashlib.sha256(seed.encode()).digest()[:16], version=4))


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
        items = [{"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": items}]}]
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
# SSE parsing (pure, incremental, line based)
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

    def feed(self, chunk):
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
        elif name == b"id":
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


# --------------------------------------------------------------------------------------------
# Response assembly (pure)
# --------------------------------------------------------------------------------------------

TERMINAL_EVENTS = ("response.completed", "response.failed", "response.incomplete")
# Only these are JSON-decoded; deltas pass through untouched, which keeps the hot path cheap.
INSPECTED_EVENTS = frozenset(TERMINAL_EVENTS + ("response.output_item.done", "error",
                                                "response.created"))

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


def completed_event_bytes(payload, items):
    """The response.completed (or .incomplete) frame again, its output filled in."""
    filled = dict(payload)
    filled["response"] = assemble_response(payload["response"], items)
    return b"event: %s\ndata: %s\n\n" % (payload.get("type", "response.completed").encode(),
                                         json.dumps(filled, separators=(",", ":")).encode())


def error_event_bytes(code, message):
    event = {"type": "error", "code": code, "message": message, "param": None}
    return b"event: error\ndata: %s\n\n" % json.dumps(event).encode()


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
    when = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
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
# Chat Completions (pure): a chat request in Responses terms, and the answer back in chat shape
# --------------------------------------------------------------------------------------------

def _chat_error(message, param="messages"):
    return ProxyError(400, message, param=param, code="invalid_value")


def _chat_text(content, where):
    """A message's content as plain text: a string, or the text of its parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type") in ("text", "input_text",
                                                                          "output_text"))
    raise _chat_error("%s: content must be a string or a list of parts." % where)


def _chat_user_parts(content, where):
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _chat_error("%s: content must be a string or a list of parts." % where)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "input_text", "text": part.get("text") or ""})
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


def _chat_tool(tool):
    if not isinstance(tool, dict) or tool.get("type") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise _chat_error("Only tools of type function are supported.", "tools")
    fn = tool["function"]
    out = {"type": "function", "name": fn.get("name"),
           "parameters": fn.get("parameters") or {"type": "object", "properties": {}}}
    for key in ("description", "strict"):
        if key in fn:
            out[key] = fn[key]
    return out


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
            for call in message.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
                    raise _chat_error("%s: each tool call needs an id and a function." % where)
                items.append({"type": "function_call", "call_id": call["id"],
                              "name": fn.get("name"), "arguments": fn.get("arguments") or "{}"})
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
        out["tools"] = [_chat_tool(t) for t in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = {"type": "function", "name": (choice.get("function") or {}).get("name")}
    if choice is not None:
        out["tool_choice"] = choice
    for key in ("parallel_tool_calls", "prompt_cache_key", "service_tier"):
        if key in body:
            out[key] = body[key]
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            schema = dict(fmt.get("json_schema") or {})
            schema["type"] = "json_schema"
            out["text"] = {"format": schema}
        else:
            out["text"] = {"format": {"type": fmt.get("type")}}
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
            self.id = "chatcmpl-" + str(response.get("id") or self.id)
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
# Conversation state, for previous_response_id (the backend keeps none)
# --------------------------------------------------------------------------------------------

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


class ConversationStore:
    """Each completed response's own input and output items, with a link to the response it
    continued; a chain is rebuilt by following the links. Past max_bytes the least recently
    used responses go, so a conversation in use keeps its early turns. In memory; see
    SQLiteConversationStore for one that survives restarts."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()  # id -> (parent, input JSON, output JSON)
        self._bytes = 0

    def put(self, response_id, parent, input_json, output):
        """input_json: the JSON text of the request's own input list (as the client sent it,
        when it could be reused); output: the response's items."""
        output_json = json.dumps(replayable(output), separators=(",", ":"))
        with self._lock:
            self._save(response_id, parent, input_json, output_json)

    def history(self, response_id):
        """All items of the chain ending in response_id, oldest first; None if any link is
        unknown (never stored, evicted, or lost in a restart)."""
        chain, seen, visited = [], [], set()
        with self._lock:
            while response_id is not None and response_id not in visited:
                visited.add(response_id)
                seen.append(response_id)
                entry = self._load(response_id)
                if entry is None:
                    return None
                response_id = entry[0]
                chain.append(entry[1:])
            self._touch(seen)
        items = []
        for input_json, output_json in reversed(chain):
            items.extend(json.loads(input_json))
            items.extend(json.loads(output_json))
        return items

    def close(self):
        pass

    def _save(self, response_id, parent, input_json, output_json):
        old = self._entries.pop(response_id, None)
        if old is not None:
            self._bytes -= len(old[1]) + len(old[2])
        self._entries[response_id] = (parent, input_json, output_json)
        self._bytes += len(input_json) + len(output_json)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, dropped_in, dropped_out) = self._entries.popitem(last=False)
            self._bytes -= len(dropped_in) + len(dropped_out)

    def _load(self, response_id):
        return self._entries.get(response_id)

    def _touch(self, response_ids):
        for response_id in response_ids:
            self._entries.move_to_end(response_id)


class SQLiteConversationStore(ConversationStore):
    """The same store in an SQLite file (--state-db), so chains survive restarts; several
    proxy processes may share it (SQLite locks, WAL journal, busy timeout)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, parent TEXT, "
              "input BLOB NOT NULL, output TEXT NOT NULL, size INTEGER NOT NULL, "
              "used REAL NOT NULL)",
              "CREATE INDEX IF NOT EXISTS responses_used ON responses (used)",
              # the running total of `size`, so a store need not add up the table
              "CREATE TABLE IF NOT EXISTS total (bytes INTEGER NOT NULL)",
              "INSERT INTO total SELECT COALESCE(SUM(size), 0) FROM responses "
              "WHERE NOT EXISTS (SELECT 1 FROM total)",
              "PRAGMA user_version = 1")  # the schema's version, for a later change to migrate

    def __init__(self, path, max_bytes):
        import sqlite3  # only with --state-db: most runs never need it
        super().__init__(max_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # conversations are private
        os.close(fd)
        # A short busy timeout: a store waiting on another process delays a stream's end, and a
        # put that gives up costs only a warning.
        self._db = sqlite3.connect(path, timeout=5, isolation_level=None,
                                   check_same_thread=False)
        for attempt in range(50):  # proxies starting together race to set up a new file
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: no fsync per put
                for statement in self.SCHEMA:
                    self._db.execute(statement)
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def close(self):
        self._db.close()

    def _save(self, response_id, parent, input_json, output_json):
        db = self._db
        size = len(input_json) + len(output_json)
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute("SELECT size FROM responses WHERE id = ?", (response_id,)).fetchone()
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (response_id, parent, input_json, output_json, size, time.time()))
            db.execute("UPDATE total SET bytes = bytes + ?", (size - (old[0] if old else 0),))
            total = db.execute("SELECT bytes FROM total").fetchone()[0]
            while total > self.max_bytes:
                row = db.execute("SELECT id, size FROM responses WHERE id != ? ORDER BY used "
                                 "LIMIT 1", (response_id,)).fetchone()
                if row is None:
                    break
                db.execute("DELETE FROM responses WHERE id = ?", (row[0],))
                total -= row[1]
                db.execute("UPDATE total SET bytes = bytes - ?", (row[1],))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _load(self, response_id):
        return self._db.execute("SELECT parent, input, output FROM responses WHERE id = ?",
                                (response_id,)).fetchone()

    def _touch(self, response_ids):
        now = time.time()
        for i in range(0, len(response_ids), 500):  # old SQLite takes 999 variables at most
            batch = response_ids[i:i + 500]
            self._db.execute("UPDATE responses SET used = ? WHERE id IN (%s)"
                             % ",".join("?" * len(batch)), [now] + batch)


# --------------------------------------------------------------------------------------------
# Upstream connections
# --------------------------------------------------------------------------------------------

# Forwarded from the backend's answer to the client: quota, rate limit and request ids.
FORWARDED_RESPONSE_HEADERS = ("retry-after", "x-request-id", "x-oai-request-id", "openai-model",
                              "x-models-etag")
# Codex-specific request headers a client (the Codex CLI) may send, passed on as they are.
FORWARDED_REQUEST_HEADERS = ("x-openai-subagent", "x-client-request-id")


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
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        conn._pool_key = key
        return conn, False

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
        buf = self._buf + data if self._buf else data
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
            data = self.resp.fp.read1(65536)
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

    def watch(self, client_sock, upstream_sock):
        entry = {"peek": None, "upstream": upstream_sock, "gone": False}
        try:
            entry["peek"] = client_sock.dup()
            entry["peek"].setblocking(False)
        except OSError:
            return entry  # unwatched: a hang-up is then noticed at the next write
        with self._cond:
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
                self._retired.append(entry["peek"])

    def _run(self):
        while True:
            try:
                self._poll_once()
            except Exception:  # a surprise must not end hang-up detection for good
                time.sleep(self.POLL)

    def _poll_once(self):
        """One round: close retired duplicates, wait for a watched socket, act on hang-ups."""
        with self._cond:
            while True:
                retired, self._retired = self._retired, []
                for sock in retired:
                    sock.close()
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


def _peer_closed(sock):
    """For a non-blocking socket that polled readable: has the peer closed it?"""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False  # the bytes that made it readable were read by the handler meanwhile
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# Exchange dumps (--dump-dir), in the Codex CLI's responses-api-proxy format
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
    """NNNNNN-<unix ms>-request.json and -response.json per upstream exchange, mode 0600."""

    def __init__(self, directory, log):
        os.makedirs(directory, mode=0o700, exist_ok=True)
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
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            self.log.info("cannot write dump %s: %s" % (path, e.strerror or e))


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
# The HTTP handler and its routes
# --------------------------------------------------------------------------------------------

class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


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
HOP_BY_HOP = ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade")
# API-key mode copies the client's headers, as codex responses-api-proxy does, except these:
# ours replace them (Authorization, Host, Content-Length) or they are the client's own secrets.
NOT_FORWARDED_AS_IS = HOP_BY_HOP + ("host", "authorization", "content-length", "cookie",
                                    "x-api-key", "expect")


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "codex-responses-proxy/" + __version__
    timeout = IDLE_CONNECTION_TIMEOUT

    ROUTES = {
        "/v1/responses": {"POST": "handle_responses"},
        "/responses": {"POST": "handle_responses"},
        "/v1/chat/completions": {"POST": "handle_chat_completions"},
        "/chat/completions": {"POST": "handle_chat_completions"},
        "/v1/models": {"GET": "handle_models"},
        "/models": {"GET": "handle_models"},
        "/status": {"GET": "handle_status"},
        "/shutdown": {"GET": "handle_shutdown"},
        "/healthz": {"GET": "handle_healthz", "HEAD": "handle_healthz"},
    }

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
        super().handle_one_request()

    def handle_expect_100(self):
        """The base class would send 100 Continue before any check; send it only once the
        request passed them (see send_continue), never for a body that will be refused."""
        self.expect_continue = True
        return True

    def send_continue(self):
        if self.expect_continue:
            self.expect_continue = False
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- routing --------------------------------------------------------------------------

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
        server = self.server
        self.started = time.monotonic()
        self.headers_sent = False
        self.status_sent = None
        self.log_fields = {}
        self.body = None
        # The request's headers, lower-cased, the first of duplicates (as Message.get gives):
        # one pass instead of a slow Message.get per lookup.
        self.header = {}
        for name, value in self.headers.items():
            self.header.setdefault(name.lower(), value)
        path = urllib.parse.urlsplit(self.path).path
        server.request_started()
        try:
            if server.stopping:
                self.close_connection = True
                raise ProxyError(503, "The proxy is shutting down; retry in a moment.",
                                 code="shutting_down", headers=[("Retry-After", "2")])
            if self.admit(method, path):
                return
            name = self.route(method, path)
            if path != "/healthz" and not server.slots.acquire(blocking=False):
                raise ProxyError(503, "The proxy is at its limit of %d requests in flight "
                                 "(--max-concurrent); retry in a moment."
                                 % server.config.max_concurrent, code="too_many_requests",
                                 headers=[("Retry-After", "1")])
            try:
                self.body = self.read_body()
                self.reader.request_read()
                getattr(self, name)()
            finally:
                if path != "/healthz":
                    server.slots.release()
        except ProxyError as e:
            if self.body is None and self.has_body():
                self.close_connection = True  # its unread body must not pass for a request
            self.send_error_json(e)
        except ClientGone:
            self.close_connection = True
            self.log_fields["note"] = "client disconnected"
        except Exception as e:  # a bug must cost one request, not the server
            server.log.info("internal error on %s %s: %s: %s" % (method, path,
                                                                 e.__class__.__name__, e))
            if server.config.debug:
                import traceback
                server.log.info(traceback.format_exc())
            self.close_connection = True
            self.send_error_json(ProxyError(500, "Internal proxy error (%s); see the proxy's log."
                                            % e.__class__.__name__, code="internal_error"))
        finally:
            self.reader.request_read()
            server.request_finished(self.status_sent)
            self.log_request_line(method, path)

    def admit(self, method, path):
        """What every request passes before its route: a Host naming this proxy (DNS
        rebinding), no foreign web page (Origin), the client key, a JSON content type.
        True when the request was answered here (a CORS preflight)."""
        config = self.server.config
        host = self.header.get("host")
        if not self.server.host_allowed(host):
            raise ProxyError(403, "Host %r is not this proxy's name (DNS rebinding protection). "
                             "If clients reach it by that name, start it with --allow-host."
                             % host, code="host_not_allowed")
        origin = self.header.get("origin")
        if origin is not None:
            if origin not in config.allow_origins:
                raise ProxyError(403, "Requests from web pages are refused (Origin %s). To let a "
                                 "page you trust call the proxy, start it with --allow-origin "
                                 "%s." % (origin, origin), code="origin_not_allowed")
            self.cors_origin = origin
            if method == "OPTIONS" and self.header.get("access-control-request-method"):
                self.send_preflight()  # carries no credentials, so needs no client key
                return True
        elif (self.header.get("sec-fetch-site") or "none").lower() not in ("none",
                                                                            "same-origin"):
            # A page's <img> or link sends a GET with no Origin; browsers still mark it
            # cross-site. Nothing a page loads that way may act (GET /shutdown) or be read.
            raise ProxyError(403, "Requests from other web sites are refused.",
                             code="origin_not_allowed")
        if config.client_key and path != "/healthz" and not self.client_key_ok():
            raise ProxyError(401, "This proxy needs its client key: send 'Authorization: Bearer "
                             "KEY' or 'x-api-key: KEY' with the key from --client-key-file or "
                             "$%s." % CLIENT_KEY_ENV, code="invalid_client_key")
        ctype = self.header.get("content-type")
        if method == "POST" and ctype is not None and \
                ctype.split(";")[0].strip().lower() != "application/json":
            # A browser's form or text/plain post needs no preflight: refuse it before
            # anything is sent upstream.
            raise ProxyError(415, "Content-Type must be application/json, not %r: send the "
                             "header 'Content-Type: application/json' (curl -d alone sends a "
                             "form type)." % ctype, code="unsupported_media_type")
        return False

    def client_key_ok(self):
        key = self.server.config.client_key
        scheme, _, value = (self.header.get("authorization") or "").partition(" ")
        candidates = [value.strip()] if scheme.lower() == "bearer" else []
        candidates.append((self.header.get("x-api-key") or "").strip())
        return any(c and hmac.compare_digest(c.encode("utf-8", "replace"), key)
                   for c in candidates)

    def route(self, method, path):
        """The handler's name for method and path, else the fitting JSON error."""
        methods = self.ROUTES.get(path)
        if path == "/shutdown" and not self.server.config.http_shutdown:
            methods = None
        if methods is None:
            raise ProxyError(404, "Unknown path %s. This proxy serves POST /v1/responses."
                             % path, code="not_found")
        if "websocket" in (self.header.get("upgrade") or "").lower():
            raise ProxyError(426, "WebSocket is not supported here; use HTTP "
                             "(the Codex CLI falls back to it by itself).",
                             code="websocket_not_supported")
        name = methods.get(method)
        if name is None:
            raise ProxyError(405, "%s does not take %s; use %s." % (
                path, method, " or ".join(sorted(methods))), code="method_not_allowed",
                headers=[("Allow", ", ".join(sorted(methods)))])
        return name

    def has_body(self):
        return (self.header.get("content-length") or "0").strip() != "0" or \
            "chunked" in (self.header.get("transfer-encoding") or "").lower()

    def send_preflight(self):
        if self.has_body():
            self.close_connection = True  # its body is not read: it must not pass for a request
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.header.get("access-control-request-headers")
                         or "authorization, content-type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 204

    def end_headers(self):
        if self.cors_origin:  # only ever for an origin given with --allow-origin
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Vary", "Origin")
            self.send_header("Access-Control-Expose-Headers", CORS_EXPOSED_HEADERS)
        try:
            super().end_headers()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            raise ClientGone()

    # -- responses ------------------------------------------------------------------------

    def send_json(self, status, obj, headers=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")  # tell the client, not just hang up
        self.end_headers()
        self.headers_sent = True
        self.status_sent = status
        if self.command != "HEAD":
            self.write(body)

    def send_error_json(self, err):
        if self.headers_sent:
            self.close_connection = True  # too late for a status: cut the answer short instead
            return
        self.log_fields.setdefault("error", err.code or err.type)
        try:
            self.send_json(err.status, err.body(), err.headers)
        except ClientGone:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The base class calls this for requests it cannot parse; answer them in JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # nobody speaks 0.9: give a status line and headers
        messages = {400: "Malformed HTTP request.", 414: "Request line too long.",
                    431: "Request header fields too large.",
                    501: "Method not supported.", 505: "HTTP version not supported."}
        err = ProxyError(code, messages.get(code, message or "Bad request."),
                         code="bad_http_request")
        self.headers_sent = False
        try:
            body = json.dumps(err.body()).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (OSError, ClientGone):
            pass
        self.server.log.info("%s %s" % (code, messages.get(code, message)))

    def write(self, data):
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            raise ClientGone()

    def write_chunk(self, data):
        if self.chunked:
            self.write(b"%X\r\n%s\r\n" % (len(data), data))
        else:
            self.write(data)

    def log_message(self, format, *args):
        pass  # the base class's access log; ours is log_request_line

    def log_request(self, code="-", size="-"):
        pass

    def log_request_line(self, method, path):
        f = self.log_fields
        parts = [method, path]
        if f.get("model"):
            parts.append("model=%s" % f["model"])
        parts.append("status=%s" % self.server.log.status(self.status_sent or 0))
        parts.append("%.3fs" % (time.monotonic() - self.started))
        if "in" in f or "out" in f:
            parts.append("tokens in=%s out=%s" % (f.get("in", "-"), f.get("out", "-")))
        for key in ("stream", "error", "note"):
            if f.get(key):
                parts.append(key if f[key] is True else "%s=%s" % (key, f[key]))
        self.server.log.info(" ".join(parts))

    # -- routes ---------------------------------------------------------------------------

    def handle_healthz(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200
        if self.command != "HEAD":
            self.write(body)

    def read_body(self):
        limit = self.server.config.max_body_bytes
        if "chunked" in (self.header.get("transfer-encoding") or "").lower():
            return self._read_chunked_body(limit)
        length = self.header.get("content-length")
        if length is None:
            return b""
        if not re.match(r"^[0-9]+$", length.strip()):  # not isdigit(): '\xb2' is a digit to it
            self.close_connection = True  # the body's end is unknown: nothing after it is safe
            raise ProxyError(400, "Invalid Content-Length.", code="invalid_body")
        length = int(length)
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for a request
            raise ProxyError(413, "The request body is %d bytes; the limit is %d."
                             % (length, limit), code="request_too_large")
        if length:
            self.send_continue()
        try:
            data = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise ProxyError(408, "The request body did not arrive within %g s."
                             % REQUEST_READ_DEADLINE, code="request_timeout")
        if len(data) < length:
            raise ClientGone()
        return data

    def _read_chunked_body(self, limit):
        self.send_continue()
        try:
            return self._read_chunks(limit)
        except socket.timeout:
            self.close_connection = True
            raise ProxyError(408, "The request body did not arrive within %g s."
                             % REQUEST_READ_DEADLINE, code="request_timeout")

    def _read_chunks(self, limit):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size_text = line.split(b";")[0].strip()
                if not re.match(rb"^[0-9A-Fa-f]+$", size_text):  # int() takes '-1', '0x1', '1_0'
                    raise ValueError(size_text)
                size = int(size_text, 16)
            except ValueError:
                self.close_connection = True
                raise ProxyError(400, "Malformed chunked request body.", code="invalid_body")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                raise ProxyError(413, "The request body is over the limit of %d bytes." % limit,
                                 code="request_too_large")
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def handle_status(self):
        self.send_json(200, self.server.status())

    def handle_shutdown(self):
        self.send_json(200, {"status": "shutting down"})
        self.close_connection = True
        self.server.begin_shutdown("GET /shutdown")

    def handle_models(self):
        server = self.server
        if server.config.mode == "apikey":
            url = upstream_url_for(server.config.upstream_url, "models")
            return self.forward_as_is("GET", url, None)
        self.send_json(200, server.models.get(self.fetch_models, server.log))

    def fetch_models(self):
        """The backend's model list as OpenAI's: {"object": "list", "data": [...]}."""
        server = self.server
        url = "%s?client_version=%s" % (upstream_url_for(server.config.upstream_url, "models"),
                                        urllib.parse.quote(server.config.client_version))
        rejected_token = None
        while True:
            creds = server.auth.get(rejected_token)
            headers = server.upstream_headers(creds, None, ())
            headers["Accept"] = "application/json"
            conn, resp, dump = self.exchange("GET", url, None, headers)
            body = self.read_answer(conn, resp, dump)
            if resp.status == 401 and rejected_token is None:
                rejected_token = creds.access_token
                continue
            if resp.status != 200:
                raise translate_upstream_error(resp.status, body)
            try:
                models = json.loads(body)["models"]
                now = int(time.time())
                return {"object": "list", "data": [
                    {"id": m["slug"], "object": "model", "created": now, "owned_by": "openai"}
                    for m in models if isinstance(m, dict) and m.get("visibility") == "list"
                    and isinstance(m.get("slug"), str)]}
            except (ValueError, KeyError, TypeError):
                raise ProxyError(502, "The backend's model list was not in the expected shape.",
                                 code="bad_upstream_answer")

    def exchange(self, method, url, body, headers):
        """One upstream request: sent (and dumped), quota headers noted.
        Returns (conn, response, dump or None)."""
        server = self.server
        dump = server.dumper.request(method, url, list(headers.items()), body) \
            if server.dumper else None
        conn, resp = send_upstream(server.pool, url, body, headers,
                                   server.config.stream_idle_timeout, method)
        server.quota.update(resp.getheaders())
        if dump:
            dump.answer(resp.status, resp.getheaders())
        return conn, resp, dump

    def read_answer(self, conn, resp, dump):
        """A whole (non-streamed) upstream answer, its connection settled."""
        upstream = UpstreamBody(conn, resp)
        try:
            body = upstream.read_all(1 << 22)
        except (OSError, http.client.HTTPException):
            body = b""
        upstream.settle(self.server.pool)
        if dump:
            dump.finish(body)
        return body

    def forward_as_is(self, method, url, body):
        """API-key mode: the request goes as the client sent it, with our key; the answer
        comes back as the upstream sent it, piece by piece as it arrives."""
        server = self.server
        headers, seen = {}, set()
        for name, value in self.headers.items():  # names as the client wrote them; the first
            if name.lower() not in NOT_FORWARDED_AS_IS and name.lower() not in seen:  # of
                headers[name] = value  # duplicates, the one the checks saw
            seen.add(name.lower())
        headers["Authorization"] = server.config.api_key_header
        conn, resp, dump = self.exchange(method, url, body, headers)
        upstream = UpstreamBody(conn, resp)
        with self.relaying(conn, dump) as watch:
            self.send_response(resp.status)
            for name, value in resp.getheaders():
                # send_response() has sent our own Date and Server: one of each per message
                if name.lower() not in HOP_BY_HOP + ("content-length", "date", "server"):
                    self.send_header(name, value)
            self.chunked = False
            if resp.length is not None and not resp.chunked:
                self.send_header("Content-Length", str(resp.length))
            elif self.request_version != "HTTP/1.0":
                self.chunked = True
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
            self.end_headers()
            self.headers_sent = True
            self.status_sent = resp.status
            while True:
                try:
                    data = upstream.read()
                except (OSError, http.client.HTTPException):
                    if watch["gone"]:
                        raise ClientGone()
                    data = b""
                if not data:
                    break
                if dump:
                    dump.body += data
                self.write_chunk(data)
        if not upstream.settle(server.pool):
            self.log_fields["error"] = "upstream_disconnected"
            self.close_connection = True  # the client must not take a cut body as whole
            return
        if self.chunked:
            self.write(b"0\r\n\r\n")

    @contextlib.contextmanager
    def relaying(self, conn, dump):
        """Around relaying an upstream answer: a client hang-up cuts the upstream at once, any
        failure closes it (its state is unknown), and the dump is written in the end."""
        server = self.server
        watch = server.hangups.watch(self.connection, conn.sock)
        try:
            yield watch
        except BaseException as e:
            conn.close()
            if isinstance(e, ClientGone):
                watch["gone"] = True
                self.log_fields["note"] = "client disconnected; upstream closed"
            raise
        finally:
            server.hangups.unwatch(watch)
            if dump:
                dump.finish()

    def handle_responses(self):
        server = self.server
        config = server.config
        if config.mode == "apikey":
            return self.forward_as_is("POST", config.upstream_url, self.body)
        body, source, spans = self.json_body()
        previous = body.get("previous_response_id")
        history = None
        if previous is not None:
            if not isinstance(previous, str):
                raise ProxyError(400, "`previous_response_id` must be a string.",
                                 param="previous_response_id", code="invalid_type")
            history = server.conversations.history(previous)
            if history is None:
                raise unknown_response_error(previous)
        upstream_body, session_id = rewrite_request(body, config.instructions,
                                                    self.client_session(),
                                                    server.dropped_params(body.get("model")),
                                                    history)
        span = unchanged_span("input", upstream_body["input"], body, spans)
        own_input = source[span[0]:span[1]] if span else json.dumps(
            upstream_body["input"][len(history or ()):], separators=(",", ":"))
        encode = lambda b: encode_json_object(b, body, source, spans)
        conn, resp, dump = self.open_upstream(upstream_body, encode, session_id,
                                              self.codex_headers())
        self.relay(conn, resp, body.get("stream") is True, dump,
                   remember=(previous, own_input))

    def handle_chat_completions(self):
        server = self.server
        config = server.config
        if config.mode == "apikey":
            url = upstream_url_for(config.upstream_url, "chat/completions")
            return self.forward_as_is("POST", url, self.body)
        body = self.json_body()[0]
        request = chat_to_responses(body)
        upstream_body, session_id = rewrite_request(request, config.instructions,
                                                    self.client_session(),
                                                    server.dropped_params(body.get("model")))
        stream = body.get("stream") is True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) \
            if isinstance(body.get("stream_options"), dict) else False
        conn, resp, dump = self.open_upstream(upstream_body, encode_json_object, session_id,
                                              self.codex_headers())
        self.relay(conn, resp, stream, dump, chat=ChatStream(body.get("model"), include_usage))

    def json_body(self):
        """(body, source, spans) of the request's JSON object; notes the model for the log."""
        raw = decode_request_body(self.body, self.header.get("content-encoding"),
                                  self.server.config.max_body_bytes)
        parsed = parse_json_object(raw)
        body = parsed[0]
        self.log_fields["model"] = body.get("model") if isinstance(body.get("model"), str) else None
        self.log_fields["stream"] = body.get("stream") is True
        return parsed

    def client_session(self):
        return self.header.get("session_id") or self.header.get("session-id")

    def codex_headers(self):
        return [(k, v) for k, v in self.header.items()
                if k.lower().startswith("x-codex-") or k.lower() in FORWARDED_REQUEST_HEADERS]

    def open_upstream(self, body, encode, session_id, extra_headers):
        """Send the request; on a 401 refresh and retry once; on 400 "Unsupported parameter: X"
        drop X, remember it, and retry once. Returns (conn, response, dump) for a 200."""
        server = self.server
        rejected_token = None
        dropped_now = set()
        while True:
            creds = server.auth.get(rejected_token)
            payload = encode(body)
            if server.log.debug_enabled:
                server.log.debug("upstream request (%d bytes): %s%s" % (
                    len(payload), payload[:16384].decode("utf-8", "replace"),
                    "... [truncated]" if len(payload) > 16384 else ""))
            headers = server.upstream_headers(creds, session_id, extra_headers)
            conn, resp, dump = self.exchange("POST", server.config.upstream_url, payload, headers)
            if resp.status == 200:
                return conn, resp, dump
            error_body = self.read_answer(conn, resp, dump)
            if resp.status == 401 and rejected_token is None:
                server.log.info("backend answered 401; re-reading the login and retrying once")
                rejected_token = creds.access_token
                continue
            param = unsupported_parameter(resp.status, error_body)
            if param and param not in dropped_now and param in body and \
                    param not in ESSENTIAL_PARAMS:
                server.log.warn_once("param:%s:%s" % (body.get("model"), param),
                                     "the backend rejects the parameter %r for model %s; dropping "
                                     "it from this and later requests" % (param, body.get("model")))
                server.remember_dropped(body.get("model"), param)
                dropped_now.add(param)
                body = dict(body)
                body.pop(param, None)
                continue
            err = translate_upstream_error(resp.status, error_body)
            err.headers = forwarded_response_headers(resp.getheaders())
            if resp.status == 401:
                err.message = ("The backend refused the access token even after a refresh. "
                               + LOGIN_HINT)
            raise err

    def relay(self, conn, resp, client_stream, dump=None, chat=None, remember=None):
        """Read the backend's event stream; pass it on live, or gather it into one answer.
        chat: a ChatStream when the client speaks Chat Completions. remember: (previous id,
        own input JSON) to keep for previous_response_id once the response completes: before
        the client sees the end, so its next turn can name this one at once."""
        server = self.server
        assembler = ResponseAssembler()
        parser = SSEParser()
        headers = forwarded_response_headers(resp.getheaders())
        self.chunked = self.request_version != "HTTP/1.0"
        upstream = UpstreamBody(conn, resp)
        failure = None
        tail = b""
        debug = server.log.debug_enabled
        with self.relaying(conn, dump) as watch:
            if client_stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                if self.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.close_connection = True
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.headers_sent = True
                self.status_sent = 200
            while assembler.terminal is None:
                try:
                    chunk = upstream.read()
                except socket.timeout:
                    failure = ("stream_idle_timeout", "The backend sent nothing for %g s."
                               % server.config.stream_idle_timeout, 504)
                    break
                except (OSError, http.client.HTTPException) as e:
                    if watch["gone"]:
                        raise ClientGone()
                    failure = ("upstream_disconnected", "The backend connection broke mid-stream "
                               "(%s)." % e.__class__.__name__, 502)
                    break
                if not chunk:
                    if watch["gone"]:
                        raise ClientGone()
                    failure = ("stream_incomplete", "upstream closed the stream before the "
                               "response completed", 502)
                    break
                if dump:
                    dump.body += chunk
                out = []
                for event in parser.feed(chunk):
                    frame = event.raw
                    etype = event.event
                    if debug:
                        server.log.debug("stream event %s (%d bytes)" % (etype, len(frame)))
                    if chat is not None:
                        out.extend(self.chat_frames(chat, assembler, event))
                        continue
                    if (etype is None or etype in INSPECTED_EVENTS) and event.data is not None:
                        try:
                            payload = json.loads(event.data)
                        except ValueError:
                            payload = None
                        if isinstance(payload, dict):
                            etype = payload.get("type") or etype
                            assembler.add(etype, payload)
                            if (etype in ("response.completed", "response.incomplete")
                                    and isinstance(payload.get("response"), dict)
                                    and not payload["response"].get("output")
                                    and assembler.items):
                                frame = completed_event_bytes(payload, assembler.output())
                    out.append(frame)
                if remember is not None and assembler.terminal is not None:
                    self.remember(assembler, *remember)
                    remember = None
                if client_stream and out:
                    if assembler.terminal is None:
                        self.write_chunk(b"".join(out))
                    else:
                        tail = b"".join(out)  # goes out with the stream's end, in one write
        if failure is not None or assembler.terminal is None:
            conn.close()  # an unfinished stream: this connection cannot carry another request
        usage = assembler.usage()
        self.log_fields["in"] = usage.get("input_tokens", "-")
        self.log_fields["out"] = usage.get("output_tokens", "-")
        settled = failure is None and upstream.complete
        if settled:  # the body's end came with the last event: pooled before the client hears
            upstream.settle(server.pool)  # the end, so its next turn finds the connection
        try:
            if client_stream:
                self.finish_stream(failure, chat, tail)
            else:
                self.answer_collected(assembler, failure, headers, chat)
        finally:  # answered (or failing to): the connection goes back to the pool or is closed
            if failure is None and not settled:
                self.drain_for_reuse(conn, upstream)

    def remember(self, assembler, previous, own_input):
        """Keep a finished response for previous_response_id. A store that fails costs a
        warning, never the answer the user has paid for."""
        response_id = (assembler.response or {}).get("id")
        if assembler.terminal not in ("response.completed", "response.incomplete") or \
                not isinstance(response_id, str):
            return
        try:
            self.server.conversations.put(response_id, previous, own_input, assembler.output())
        except Exception as e:
            self.server.log.info("warning: could not keep response %s for "
                                 "previous_response_id: %s" % (response_id, e))

    @staticmethod
    def chat_frames(chat, assembler, event):
        """A Chat Completions client's frames for one backend event (all events decoded)."""
        try:
            payload = json.loads(event.data) if event.data is not None else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return []
        etype = payload.get("type") or event.event
        assembler.add(etype, payload)
        return chat.frames(etype, payload)

    def finish_stream(self, failure, chat=None, tail=b""):
        """The stream's last frames (tail, or an error) and its end, in one write."""
        if failure is not None:
            code, message, status = failure
            self.log_fields["error"] = code
            frames = chat.error(code, message) if chat else [error_event_bytes(code, message)]
            tail += b"".join(frames)
        if not self.chunked:
            self.write(tail)
        elif tail:
            self.write(b"%X\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        else:
            self.write(b"0\r\n\r\n")

    def answer_collected(self, assembler, failure, headers, chat=None):
        if failure is not None:
            code, message, status = failure
            raise ProxyError(status, message, code=code, headers=headers)
        if assembler.terminal in ("response.completed", "response.incomplete"):
            response = assemble_response(assembler.response, assembler.output())
            self.send_json(200, chat_completion(response, response.get("output") or [])
                           if chat else response, headers)
            return
        error = assembler.error or {}
        code = error.get("code") or ("response_failed" if assembler.terminal == "response.failed"
                                     else "upstream_error")
        message = error.get("message") or "The backend reported a failure (%s)." % code
        raise ProxyError(failure_status(code), message, code=code, param=error.get("param"),
                         type="server_error" if failure_status(code) >= 500 else None,
                         headers=headers)

    def drain_for_reuse(self, conn, upstream):
        """After the terminal event the backend ends its body, usually in the same read; take
        that end so the connection can serve the next turn. A body that lingers costs the
        connection, not the client's time."""
        try:
            if not upstream.complete:
                conn.sock.settimeout(0.25)
                while upstream.read():
                    pass
        except (OSError, http.client.HTTPException, AttributeError):
            conn.close()
            return
        upstream.settle(self.server.pool)


class QuotaTracker:
    """The latest x-codex-* quota headers the backend sent, for /status."""

    def __init__(self):
        self.headers = {}
        self.seen_at = None

    def update(self, headers):
        quota = {k.lower(): v for k, v in headers if k.lower().startswith("x-codex-")}
        if quota:
            self.headers = quota
            self.seen_at = time.time()

    def snapshot(self):
        h = self.headers
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
                reset_at = int(self.seen_at + after)
            return {"used_percent": number(name + "-used-percent"),
                    "window_minutes": number(name + "-window-minutes", int),
                    "resets_at": iso_time(reset_at),
                    "resets_in_seconds": None if reset_at is None
                    else max(0, int(reset_at - time.time()))}

        return {"primary": window("primary"), "secondary": window("secondary"),
                "plan_type": h.get("x-codex-plan-type"),
                "active_limit": h.get("x-codex-active-limit"),
                "credits": {"has_credits": h.get("x-codex-credits-has-credits"),
                            "balance": h.get("x-codex-credits-balance"),
                            "unlimited": h.get("x-codex-credits-unlimited")},
                "seen_at": iso_time(self.seen_at)}


def iso_time(timestamp):
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


class ModelsCache:
    """The model list for MODELS_CACHE_SECONDS; when the backend fails, the last good list."""

    def __init__(self):
        self._value = None
        self._fetched = 0.0
        self._lock = threading.Lock()  # held while fetching: concurrent misses fetch once

    def get(self, fetch, log):
        with self._lock:
            if self._value is not None and time.monotonic() - self._fetched < MODELS_CACHE_SECONDS:
                return self._value
            try:
                self._value, self._fetched = fetch(), time.monotonic()
            except ProxyError as e:
                if self._value is None:
                    raise
                log.info("model list unavailable (%s); serving the cached one" % e.message)
            return self._value


class ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a burst of clients connecting at once must not be refused
    allow_reuse_address = True

    def __init__(self, config, log=None):
        self.config = config
        self.log = log or Log(debug=config.debug)
        self.user_agent = "%s/%s (%s %s; %s) codex-responses-proxy/%s" % (
            config.originator, config.client_version, platform.system() or "unknown",
            platform.release() or "unknown", platform.machine() or "unknown", __version__)
        self.auth = AuthStore(config.auth_path, config.refresh_url, self.user_agent, self.log)
        if config.api_key_header:
            self.log.add_secret(config.api_key_header[len(b"Bearer "):].decode("latin-1"))
        self.pool = ConnectionPool()
        self.hangups = HangupWatcher()
        self.quota = QuotaTracker()
        self.models = ModelsCache()
        self.conversations = (SQLiteConversationStore(config.state_db, config.state_max_bytes)
                              if config.state_db else ConversationStore(config.state_max_bytes))
        self.dumper = ExchangeDumper(config.dump_dir, self.log) if config.dump_dir else None
        self.started = time.time()
        self._dropped = {}  # model -> parameters the backend rejected for it
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self._counts = {"total": 0, "by_status": {}}
        self._stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(config.max_concurrent)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        super().__init__((config.host, config.port), ProxyHandler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def host_allowed(self, value):
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
        allowed = self.config.allow_hosts
        if name in allowed or value in allowed:
            return True
        own = ("localhost", "127.0.0.1", "::1", self.server_address[0].lower())
        return name in own and port in ("", str(self.server_address[1]))

    def dropped_params(self, model):
        return tuple(self._dropped.get(model, ())) if isinstance(model, str) else ()

    def remember_dropped(self, model, name):
        if isinstance(model, str):
            with self._inflight_cond:
                self._dropped[model] = self._dropped.get(model, frozenset()) | {name}

    def upstream_headers(self, creds, session_id, extra):
        headers = {
            "Authorization": "Bearer " + creds.access_token,
            "originator": self.config.originator,
            "User-Agent": self.user_agent,
            "version": self.config.client_version,
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
        }
        if session_id:
            headers["session_id"] = headers["session-id"] = session_id
        if creds.account_id:
            headers["ChatGPT-Account-ID"] = creds.account_id
        for name, value in extra:
            headers.setdefault(name, value)
        return headers

    def request_started(self):
        with self._inflight_cond:
            self._inflight += 1

    def request_finished(self, status):
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()
            self._counts["total"] += 1
            key = str(status or "none")
            self._counts["by_status"][key] = self._counts["by_status"].get(key, 0) + 1

    @property
    def stopping(self):
        return self._stopping.is_set()

    def begin_shutdown(self, why):
        """Stop accepting (from any thread but serve_forever's); main() then drains."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.log.info("%s: finishing requests in flight" % why)
            threading.Thread(target=self.shutdown, daemon=True).start()

    def status(self):
        """What /status says: no secrets, only what a person or a monitor needs."""
        config = self.config
        with self._inflight_cond:
            requests = {"total": self._counts["total"], "in_flight": self._inflight,
                        "by_status": dict(self._counts["by_status"])}
        status = {"mode": config.mode, "version": __version__,
                  "uptime_seconds": int(time.time() - self.started),
                  "upstream": config.upstream_url, "requests": requests}
        if config.mode == "apikey":
            status["api_key_from"] = config.api_key_source
            return status
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
        status["login"] = login
        status["quota"] = self.quota.snapshot()
        return status

    def wait_idle(self, timeout):
        """Wait for requests in flight to finish; False if some were still running."""
        deadline = time.monotonic() + timeout
        with self._inflight_cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._inflight_cond.wait(left)
        return True

    def handle_error(self, request, client_address):
        # Connection-level failures (a client resetting mid-request) are routine, not bugs.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            return
        self.log.info("connection error from %s: %s" % (client_address[0], exc))

    def server_close(self):
        super().server_close()
        self.pool.close_all()
        self.conversations.close()

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

    def describe_credentials(self):
        """What the start-up line says about the login."""
        if self.config.mode == "apikey":
            return "API key from %s" % self.config.api_key_source
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


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def write_server_info(path, port):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    info = json.dumps({"port": port, "pid": os.getpid()})
    write_file_atomic(path, lambda f: f.write(info + "\n"), 0o644)


def main(argv=None):
    config = parse_config(argv)
    log = Log(debug=config.debug)
    try:
        server = ProxyServer(config, log)
    except OSError as e:
        log.info("cannot listen on %s:%d: %s" % (config.host, config.port, e.strerror or e))
        return 1
    log.info("codex-responses-proxy %s listening on %s (%s mode, upstream %s)"
             % (__version__, server.url, "API-key" if config.mode == "apikey" else "ChatGPT",
                config.upstream_url))
    log.info(server.describe_credentials())
    warning = server.permission_warning()
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
        server.begin_shutdown("received %s" % signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.socket.close()  # refuse new connections now, not after the drain
        if not server.wait_idle(SHUTDOWN_GRACE):
            log.info("stopping with requests still in flight")
        # Waited for apart from the drain, which can give up first (25 s against a 30 s
        # refresh timeout): a redeemed refresh token's successor exists only in this process
        # until it is saved, and losing it would log the Codex CLI out too.
        if not server.auth.stop_refreshing(REFRESH_TIMEOUT + 5):
            log.info("warning: stopping before a token refresh finished; if it went through, "
                     "the new login is lost. Run `codex login` if requests fail with 401.")
        server.server_close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
