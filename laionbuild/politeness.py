"""A polite forward proxy between img2dataset and the web.

img2dataset fetches with urllib, which honours `http_proxy`/`https_proxy`; the download stage
points them at this proxy (a thread of the stage's process, on 127.0.0.1) for the duration of
the img2dataset call. Every request of every img2dataset worker process passes through it, so
it can do what img2dataset cannot:

- **cap concurrent requests per host** (`download.max_per_host`) across all worker processes;
- **back off on 429** (and 503 with Retry-After): the host is paused for Retry-After (or an
  exponential delay) and the request retried, within a budget shorter than the client's
  timeout; past the budget the 429 goes back to img2dataset (a transient failure that
  `laionbuild retry-failed` re-attempts);
- **apply the URL policy to every hop**: redirect targets and the address a host resolves to at
  connect time are checked, not only the URL in the metadata (no DNS rebinding, no redirect
  into the builder's network). The proxy connects to the address it checked.

Responses are streamed, so slow and truncated bodies reach img2dataset as they would directly.
Errors the proxy produces carry a reason phrase starting with `laionbuild proxy:` so the
funnel can tell them apart. HTTPS goes through CONNECT tunnels: the per-host cap and the policy
apply, 429s inside TLS are not visible (they still count as transient failures).
"""

from __future__ import annotations

import http.client
import logging
import os
import select
import socket
import threading
import time
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urljoin, urlsplit

from .url_policy import host_allowed

log = logging.getLogger(__name__)
PREFIX = "laionbuild proxy:"
REFUSED = f"{PREFIX} refused by URL policy"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
              "te", "trailer", "transfer-encoding", "upgrade"}


class HostGate:
    """Per-host concurrency slots and back-off pauses, shared by all proxy threads."""

    def __init__(self, max_per_host: int | None):
        self.max_per_host = max_per_host
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._paused_until: dict[str, float] = {}

    @contextmanager
    def slot(self, host: str):
        if not self.max_per_host:
            yield
            return
        with self._lock:
            sem = self._slots.setdefault(host, threading.BoundedSemaphore(self.max_per_host))
        sem.acquire()
        try:
            yield
        finally:
            sem.release()

    def pause(self, host: str, seconds: float) -> None:
        with self._lock:
            self._paused_until[host] = max(self._paused_until.get(host, 0.0), time.monotonic() + seconds)

    def wait_until_resumed(self, host: str) -> None:
        while True:
            with self._lock:
                delay = self._paused_until.get(host, 0.0) - time.monotonic()
            if delay <= 0:
                return
            time.sleep(min(delay, 0.5))


def retry_after(value: str | None, default: float) -> float:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), else `default`."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


class PoliteProxy:
    """`with PoliteProxy(...) as url:` runs the proxy on 127.0.0.1 and yields its URL."""

    def __init__(self, max_per_host: int | None, allow_private: bool, timeout: float,
                 private_host_allowlist=(), backoff_base: float = 1.0, backoff_budget: float | None = None):
        self.gate = HostGate(max_per_host)
        self.allow_private = allow_private
        self.allowlist = {h.lower() for h in private_host_allowlist}
        self.timeout = float(timeout)
        self.backoff_base = backoff_base
        # stay well inside the client's own timeout, which runs while we wait
        self.backoff_budget = self.timeout * 0.6 if backoff_budget is None else backoff_budget
        self.stats = {"requests": 0, "backoffs": 0, "refused": 0, "max_concurrent_per_host": 0}
        self._stats_lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._resolved: dict[str, tuple[bool, list[str]]] = {}
        self._server: ThreadingHTTPServer | None = None

    # -- policy -------------------------------------------------------------------------------
    def check(self, host: str) -> tuple[bool, list[str]]:
        """(allowed, addresses) for a host name, resolved once per run."""
        host = host.lower()
        if host not in self._resolved:
            self._resolved[host] = host_allowed(host, self.allow_private or host in self.allowlist)
        return self._resolved[host]

    def location_allowed(self, base: str, location: str) -> bool:
        target = urlsplit(urljoin(base, location))
        return target.scheme in ("http", "https") and bool(target.hostname) and self.check(target.hostname)[0]

    # -- accounting ---------------------------------------------------------------------------
    def _enter(self, host: str) -> None:
        with self._stats_lock:
            self.stats["requests"] += 1
            self._active[host] = self._active.get(host, 0) + 1
            self.stats["max_concurrent_per_host"] = max(self.stats["max_concurrent_per_host"], self._active[host])

    def _leave(self, host: str) -> None:
        with self._stats_lock:
            self._active[host] -= 1

    def count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    # -- server -------------------------------------------------------------------------------
    def __enter__(self) -> str:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 1024
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: PoliteProxy
    protocol_version = "HTTP/1.0"  # one request per connection; a body ends when we close

    def log_message(self, fmt, *args) -> None:  # keep img2dataset's console readable
        log.debug("proxy: " + fmt, *args)

    def _fail(self, code: int, reason: str) -> None:
        try:
            self.send_response_only(code, reason)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._forward("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward("HEAD")

    def _forward(self, method: str) -> None:
        proxy = self.owner
        parts = urlsplit(self.path)
        if parts.scheme != "http" or not parts.hostname:
            self._fail(400, f"{PREFIX} not an absolute http URL")
            return
        host = parts.hostname.lower()
        allowed, addresses = proxy.check(host)
        if not allowed:
            proxy.count("refused")
            self._fail(403, REFUSED)
            return
        if not addresses:
            self._fail(502, f"{PREFIX} dns error: {host} does not resolve")
            return
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = parts.netloc
        headers["Connection"] = "close"
        deadline = time.monotonic() + proxy.backoff_budget
        attempt = 0
        while True:
            proxy.gate.wait_until_resumed(host)
            with proxy.gate.slot(host):
                proxy._enter(host)
                try:
                    done = self._attempt(method, parts, host, addresses[0], path, headers, deadline, attempt)
                finally:
                    proxy._leave(host)
            if done:
                return
            attempt += 1

    def _attempt(self, method, parts, host, address, path, headers, deadline, attempt) -> bool:
        """One upstream request. False: backed off, try again."""
        proxy = self.owner
        conn = http.client.HTTPConnection(address, parts.port or 80, timeout=proxy.timeout + 1)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
        except socket.timeout:
            conn.close()
            self._fail(504, f"{PREFIX} timeout")
            return True
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._fail(502, f"{PREFIX} connection error ({type(exc).__name__})")
            return True
        try:
            if resp.status == 429 or (resp.status == 503 and resp.getheader("Retry-After")):
                delay = retry_after(resp.getheader("Retry-After"), proxy.backoff_base * 2 ** attempt)
                proxy.gate.pause(host, delay)
                if time.monotonic() + delay < deadline:
                    proxy.count("backoffs")
                    return False
            if 300 <= resp.status < 400 and resp.getheader("Location"):
                if not proxy.location_allowed(f"http://{parts.netloc}{path}", resp.getheader("Location")):
                    proxy.count("refused")
                    self._fail(403, REFUSED)
                    return True
            self.send_response_only(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            if method != "HEAD":
                while True:
                    chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
            return True
        except (OSError, http.client.HTTPException):
            # upstream broke mid-body (or the client left): closing the connection passes the
            # truncation on; img2dataset reports it as it would without us
            self.close_connection = True
            return True
        finally:
            conn.close()

    def do_CONNECT(self) -> None:  # noqa: N802
        proxy = self.owner
        host, _, port = self.path.rpartition(":")
        host = host.strip("[]").lower()
        allowed, addresses = proxy.check(host)
        if not allowed:
            proxy.count("refused")
            self._fail(403, REFUSED)
            return
        if not addresses:
            self._fail(502, f"{PREFIX} dns error: {host} does not resolve")
            return
        proxy.gate.wait_until_resumed(host)
        with proxy.gate.slot(host):
            proxy._enter(host)
            try:
                try:
                    upstream = socket.create_connection((addresses[0], int(port or 443)), timeout=proxy.timeout + 1)
                except OSError as exc:
                    self._fail(502, f"{PREFIX} connection error ({type(exc).__name__})")
                    return
                self.send_response_only(200, "Connection established")
                self.end_headers()
                self._pipe(self.connection, upstream, proxy.timeout + 1)
            finally:
                proxy._leave(host)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, idle: float) -> None:
        try:
            sockets = [a, b]
            while True:
                ready, _, _ = select.select(sockets, [], [], idle)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            b.close()


@contextmanager
def proxy_environment(url: str | None):
    """Point urllib (in this process and the processes it starts) at `url`, restoring the
    environment afterwards. `no_proxy` is cleared so that no host bypasses the proxy."""
    names = ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"]
    saved = {n: os.environ.get(n) for n in names}
    try:
        if url:
            for n in names[:4]:
                os.environ[n] = url
            for n in names[4:]:
                os.environ.pop(n, None)
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
