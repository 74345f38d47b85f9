"""The polite forward proxy the download stage used before issue #19, kept for
`bench/bench_download.py` to measure side by side with `laionbuild/web/policy_opener.py`. Not used
by the stage (it could be bypassed: ftp:// redirects, URI headers, redirects inside TLS).

A polite forward proxy between img2dataset and the web.

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

import logging
import select
import socket
import socketserver
import threading
import time
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

from laionbuild.environment import patched
from laionbuild.web.policy_opener import retry_after
from laionbuild.web.url_policy import host_allowed

log = logging.getLogger(__name__)
PREFIX = "laionbuild proxy:"
REFUSED = f"{PREFIX} refused by URL policy"
MAX_HEAD = 65536
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
        self._server: socketserver.ThreadingTCPServer | None = None

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

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        log.debug("proxy: connection from %s failed", client_address, exc_info=True)


class _Upstream(Exception):
    """The upstream failed before answering: (status, reason) for the client."""


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Bytes up to the blank line ending an HTTP head, and what came after it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the end of the HTTP head")
        buffer += chunk
        if len(buffer) > MAX_HEAD:
            raise ConnectionError("HTTP head too large")
    end = buffer.index(b"\r\n\r\n") + 4
    return buffer[:end], buffer[end:]


def _headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return lines[0], fields


class _Handler(socketserver.BaseRequestHandler):
    """One client connection: one request (urllib sends `Connection: close`). Plain sockets and a
    minimal head parser: the proxy sits on every image's path, so it must be cheap."""

    owner: PoliteProxy

    def _fail(self, code: int, reason: str) -> None:
        try:
            self.request.sendall(f"HTTP/1.0 {code} {reason}\r\nContent-Length: 0\r\n\r\n".encode("latin-1"))
        except OSError:
            pass

    def handle(self) -> None:
        proxy = self.owner
        client = self.request
        client.settimeout(proxy.timeout + 1)
        try:
            head, rest = _read_head(client)
        except OSError:
            return
        request_line, fields = _headers(head)
        try:
            method, target, _ = request_line.split(" ", 2)
        except ValueError:
            return self._fail(400, f"{PREFIX} bad request line")
        if method == "CONNECT":
            return self._connect(target)
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            return self._fail(400, f"{PREFIX} not an absolute http URL")
        host = parts.hostname.lower()
        addresses = self._admitted(host)
        if addresses is None:
            return None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{k}: {v}" for k, v in fields if k.lower() not in HOP_BY_HOP and k.lower() != "host"]
        lines.append("Connection: close")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + rest
        deadline = time.monotonic() + proxy.backoff_budget
        attempt = 0
        while True:
            proxy.gate.wait_until_resumed(host)
            with proxy.gate.slot(host):
                proxy._enter(host)
                try:
                    done = self._attempt(request, parts, host, addresses[0], path, deadline, attempt)
                finally:
                    proxy._leave(host)
            if done:
                return
            attempt += 1

    def _attempt(self, request: bytes, parts, host: str, address: str, path: str, deadline: float,
                 attempt: int) -> bool:
        """One upstream request, relayed. False: backed off, try again."""
        proxy = self.owner
        upstream = None
        try:
            try:
                upstream = socket.create_connection((address, parts.port or 80), timeout=proxy.timeout + 1)
                upstream.sendall(request)
                head, rest = _read_head(upstream)
            except socket.timeout:
                self._fail(504, f"{PREFIX} timeout")
                return True
            except OSError as exc:
                self._fail(502, f"{PREFIX} connection error ({type(exc).__name__})")
                return True
            status_line, fields = _headers(head)
            try:
                status = int(status_line.split(" ", 2)[1])
            except (IndexError, ValueError):
                self._fail(502, f"{PREFIX} connection error (bad status line)")
                return True
            named = {k.lower(): v for k, v in fields}
            if status == 429 or (status == 503 and "retry-after" in named):
                delay = retry_after(named.get("retry-after"), proxy.backoff_base * 2 ** attempt)
                proxy.gate.pause(host, delay)
                if time.monotonic() + delay < deadline:
                    proxy.count("backoffs")
                    return False
            if 300 <= status < 400 and named.get("location"):
                if not proxy.location_allowed(f"http://{parts.netloc}{path}", named["location"]):
                    proxy.count("refused")
                    self._fail(403, REFUSED)
                    return True
            # the head as the server sent it (we asked it to close: the body ends at EOF, or at its
            # Content-Length or last chunk, which the client reads itself), then the body as it comes
            self.request.sendall(head + rest)
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                self.request.sendall(chunk)
            return True
        except OSError:
            # upstream broke or stalled mid-body (or the client left): closing the connection passes
            # the truncation on; img2dataset reports it as it would without us
            return True
        finally:
            if upstream is not None:
                upstream.close()

    def _admitted(self, host: str) -> list | None:
        """The addresses the URL policy allows for `host`; None when it is refused or does not
        resolve (answered here)."""
        allowed, addresses = self.owner.check(host)
        if not allowed:
            self.owner.count("refused")
            self._fail(403, REFUSED)
            return None
        if not addresses:
            self._fail(502, f"{PREFIX} dns error: {host} does not resolve")
            return None
        return addresses

    def _connect(self, target: str) -> None:
        proxy = self.owner
        host, _, port = target.rpartition(":")
        host = host.strip("[]").lower()
        addresses = self._admitted(host)
        if addresses is None:
            return None
        proxy.gate.wait_until_resumed(host)
        with proxy.gate.slot(host):
            proxy._enter(host)
            try:
                try:
                    upstream = socket.create_connection((addresses[0], int(port or 443)), timeout=proxy.timeout + 1)
                except OSError as exc:
                    return self._fail(502, f"{PREFIX} connection error ({type(exc).__name__})")
                self.request.sendall(b"HTTP/1.0 200 Connection established\r\n\r\n")
                _pipe(self.request, upstream, proxy.timeout + 1)
            finally:
                proxy._leave(host)


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
def proxy_environment(url: str | None, bypass: tuple[str, ...] = ()):
    """Point urllib (in this process and the processes it starts) at `url`, restoring the
    environment afterwards. `no_proxy` is set to `bypass` (hosts or domain suffixes: the object
    store the shards are written to), so no image host bypasses the proxy."""
    if not url:
        yield
        return
    values = dict.fromkeys(("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"), url)
    values.update(dict.fromkeys(("no_proxy", "NO_PROXY"), ",".join(bypass) or None))
    with patched(values):
        yield
