"""The URL policy and politeness inside each img2dataset worker's urllib.

img2dataset fetches with `urllib.request.urlopen`. Its workers (spawned processes, or Spark
executors' Python workers) run laionbuild's `PolicyDownloader`, an img2dataset `Downloader`
(`laionbuild/web/policy_downloader.py`) whose first call in a process installs this module's
opener as urllib's global opener. The opener:

- has http and https handlers only: ftp://, file://, data: and every other scheme are refused,
  at the first URL and at every redirect hop;
- checks every request and every redirect hop with `url_policy` (http and https alike: the
  check is in the client, so a redirect inside TLS is seen), refuses a redirect that carries
  several `Location` headers or a `URI` header (urllib would follow one the check did not see);
- connects to the addresses the policy resolved and checked, never re-resolving the name (no
  DNS rebinding between check and connect), in getaddrinfo's order, falling back to the next
  address when one fails to connect (an AAAA record on a machine without IPv6);
- caps concurrent requests per host (`download.max_per_host`) across all worker processes of
  the machine with file locks, and backs off on 429 (and 503 with Retry-After): the host is
  paused for every process (a shared file's mtime) and the request retried within a budget.

Refusals raise `URLError` whose reason starts with `laionbuild policy:`; img2dataset keeps it
as the row's `error_message` and `laionbuild.web.failures.classify` turns it into its funnel reason.
Environment proxies (`http_proxy`) are not used for image fetches: the opener connects itself.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import http.client
import os
import random
import socket
import tempfile
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

from laionbuild.web import url_policy
from laionbuild.web.url_policy import PREFIX

REFUSED_SCHEME = f"{PREFIX} refused by URL policy: not http(s)"
REFUSED_ADDRESS = f"{PREFIX} refused by URL policy: private or non-global address"
REFUSED_AMBIGUOUS = f"{PREFIX} refused by URL policy: ambiguous redirect (several Location or a URI header)"
MAX_REDIRECTS = 10
# a request gives up waiting for its host (a free slot, the end of a 429 pause) at the request's
# deadline (download.timeout): a transient failure, re-attempted later like a 429
HOST_BUSY = f"{PREFIX} host busy: every per-host slot held until the deadline"
HOST_PAUSED = f"{PREFIX} host paused (429/503 Retry-After) beyond the deadline"
# a server's Retry-After is honoured between these bounds: 0 or a past date does not turn the
# back-off into a busy loop, and a pause of days (or inf) does not outlive the run's sense
MIN_BACKOFF = 0.05
MAX_PAUSE = 3600.0
SLOT_POLL = 0.02
# a host's first addresses get this long to connect before the next one is tried
FALLBACK_CONNECT_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True)
class Policy:
    allow_private: bool
    allowlist: tuple[str, ...] = ()
    max_per_host: int | None = None
    timeout: float = 10.0
    backoff_base: float = 1.0
    state_dir: str | None = None  # per-host slots and pauses shared by the machine's workers

    @property
    def backoff_budget(self) -> float:
        return self.timeout * 0.6

    def check(self, host: str) -> tuple[bool, list[str]]:
        host = host.lower()
        return url_policy.host_allowed(host, self.allow_private or host in self.allowlist)


class Refused(urllib.error.URLError):
    pass


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


# -- per-host state shared across processes ----------------------------------------------------

class _Slot:
    """A held slot: its lock file's descriptor (closing it frees the slot, also when a response
    that was never closed is collected)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


class HostState:
    """Concurrency slots (one lock file per slot) and pauses (a file whose mtime is the end of
    the pause) for each host, under `state_dir`. Without a state dir: no cap, no shared pause."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.root = policy.state_dir
        if self.root and not _writable(self.root):
            # a Spark executor on another machine, or as another user, where the stage's
            # directory is missing or not writable: the slots and pauses are this machine's, in
            # its temporary directory
            digest = hashlib.sha1(self.root.encode()).hexdigest()[:16]
            self.root = os.path.join(tempfile.gettempdir(), f"laionbuild-hosts-{digest}")
            os.makedirs(self.root, exist_ok=True)

    def _path(self, host: str, suffix: str) -> str:
        return os.path.join(self.root, hashlib.sha1(host.encode()).hexdigest()[:20] + suffix)

    def acquire(self, host: str, deadline: float) -> _Slot | None:
        """One of the host's slots, held until released (or its descriptor closed), or None
        without a cap. Every slot busy: polled until `deadline` (time.monotonic()), then HOST_BUSY."""
        n = self.policy.max_per_host
        if not n or not self.root:
            return None
        first = random.randrange(n)
        fds = [os.open(self._path(host, f".{(first + k) % n}.slot"), os.O_RDWR | os.O_CREAT, 0o600) for k in range(n)]
        try:
            while True:
                for i, fd in enumerate(fds):
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    fds.pop(i)
                    return _Slot(fd)
                if time.monotonic() >= deadline:
                    raise urllib.error.URLError(HOST_BUSY)
                time.sleep(SLOT_POLL * (0.5 + random.random()))
        finally:
            for fd in fds:
                os.close(fd)

    def pause(self, host: str, seconds: float) -> None:
        if not self.root:
            return
        path = self._path(host, ".pause")
        until = time.time() + min(seconds, MAX_PAUSE)
        try:
            if os.stat(path).st_mtime >= until:
                return
        except FileNotFoundError:
            open(path, "ab").close()
        os.utime(path, (until, until))

    def wait_until_resumed(self, host: str, deadline: float) -> None:
        """Wait for the end of the host's pause; HOST_PAUSED at once if it ends after `deadline`
        (time.monotonic()): no thread sits out a long Retry-After."""
        if not self.root:
            return
        path = self._path(host, ".pause")
        while True:
            try:
                delay = os.stat(path).st_mtime - time.time()
            except FileNotFoundError:
                return
            if delay <= 0:
                return
            if time.monotonic() + delay > deadline:
                raise urllib.error.URLError(HOST_PAUSED)
            time.sleep(min(delay, 0.5))


# -- connections to the checked addresses ------------------------------------------------------

def _connector(addresses: list[str]):
    """A `create_connection` for http.client that connects to `addresses` in order, ignoring the
    host name it is given (the policy already resolved and checked it)."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        port = address[1]
        error: OSError | None = None
        for i, ip in enumerate(addresses):
            last = i == len(addresses) - 1
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                limit = timeout if isinstance(timeout, (int, float)) else None
                sock.settimeout(limit if last or limit is None else min(limit, FALLBACK_CONNECT_TIMEOUT))
                if source_address:
                    sock.bind(source_address)
                sock.connect((ip, port))
                sock.settimeout(timeout if isinstance(timeout, (int, float)) else None)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error if error else OSError(errno.EHOSTUNREACH, "no address")

    return create_connection


def _connection(base, addresses: list[str]):
    """An http.client connection class for do_open whose socket goes to `addresses`."""
    connector = _connector(addresses)

    def connection(*args, **kwargs):
        conn = base(*args, **kwargs)
        conn._create_connection = connector
        return conn

    return connection


class _SlotRelease:
    """Closes the response and frees the host slot it held (the slot is held while the body is read)."""

    def __init__(self, response, slot):
        self.close, self.slot = response.close, slot

    def __call__(self):
        try:
            self.close()
        finally:
            if self.slot is not None:
                self.slot.close()
                self.slot = None


class PolicyHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """http_open/https_open with the URL policy, per-host slots and 429 back-off; every other
    scheme refused in default_open (called first for every request and every hop)."""

    handler_order = 400

    def __init__(self, policy: Policy, state: HostState):
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self)
        self.policy, self.state = policy, state
        self._checked: dict[str, tuple[float, tuple[bool, list[str]]]] = {}

    def default_open(self, req):
        if req.type not in ("http", "https"):
            raise Refused(REFUSED_SCHEME)
        return None

    def unknown_open(self, req):
        raise Refused(REFUSED_SCHEME)

    def http_open(self, req):
        return self._open(http.client.HTTPConnection, req)

    def https_open(self, req):
        return self._open(http.client.HTTPSConnection, req, context=self._context)

    def _check(self, host: str) -> tuple[bool, list[str]]:
        # url_policy caches names; this also spares re-parsing literal addresses on every request
        now = time.monotonic()
        hit = self._checked.get(host)
        if hit is None or hit[0] < now:
            answer = self.policy.check(host)
            hit = (now + (url_policy.CACHE_TTL if answer[1] else url_policy.NEGATIVE_TTL), answer)
            self._checked[host] = hit
        return hit[1]

    def _open(self, base, req, **kw):
        host = (urlsplit(req.full_url).hostname or "").lower()
        if not host:
            raise Refused(REFUSED_SCHEME)
        allowed, addresses = self._check(host)
        if not allowed:
            raise Refused(REFUSED_ADDRESS)
        if not addresses:
            raise urllib.error.URLError(f"{PREFIX} dns error: {host} does not resolve")
        connection = _connection(base, addresses)
        start = time.monotonic()
        deadline, give_up = start + self.policy.backoff_budget, start + self.policy.timeout
        attempt = 0
        while True:
            self.state.wait_until_resumed(host, give_up)
            slot = self.state.acquire(host, give_up)
            try:
                response = self.do_open(connection, req, **kw)
            except BaseException:
                if slot is not None:
                    slot.close()
                raise
            status = response.status
            if status == 429 or (status == 503 and response.headers.get("Retry-After")):
                backoff = max(MIN_BACKOFF, self.policy.backoff_base * 2 ** attempt)
                delay = min(MAX_PAUSE, max(backoff, retry_after(response.headers.get("Retry-After"), backoff)))
                self.state.pause(host, delay)
                if time.monotonic() + delay < deadline:
                    response.close()
                    if slot is not None:
                        slot.close()
                    if not self.state.root:
                        time.sleep(delay)
                    attempt += 1
                    continue
            if status >= 300 or slot is None:
                # an error or a redirect: nobody downloads its body, the slot is free now
                if slot is not None:
                    slot.close()
                return response
            response.close = _SlotRelease(response, slot)
            return response


class PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        if len(headers.get_all("Location") or []) > 1 or "URI" in headers:
            fp.close()
            raise Refused(REFUSED_AMBIGUOUS)
        target = urlsplit(urljoin(req.full_url, headers.get("Location") or ""))
        if target.scheme not in ("http", "https"):
            fp.close()
            raise Refused(REFUSED_SCHEME)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def build_opener(policy: Policy, state: HostState | None = None) -> urllib.request.OpenerDirector:
    """An opener with the policy's handlers and nothing else (no ftp, file, data, proxy handler)."""
    opener = urllib.request.OpenerDirector()
    for handler in (PolicyHandler(policy, state or HostState(policy)), PolicyRedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_installed: Policy | None = None


def install(policy: Policy) -> None:
    """Make `policy`'s opener urllib's global opener in this process (once per policy)."""
    global _installed
    if _installed != policy:
        state = HostState(policy)
        urllib.request.install_opener(build_opener(policy, state))
        _installed = policy
        if state.root:
            # how many processes fetched through the opener (the stage logs it; a test checks
            # it); best effort: a marker that cannot be written must not fail the download
            try:
                open(os.path.join(state.root, f"installed.{socket.gethostname()}.{os.getpid()}"), "ab").close()
            except OSError:
                pass


def installed_processes(policy: Policy) -> int:
    """How many processes (on this machine) installed `policy`'s opener."""
    try:
        return sum(name.startswith("installed.") for name in os.listdir(policy.state_dir))
    except OSError:
        return 0


def _img2dataset_main():
    import importlib

    # the module, not the function `img2dataset.main` that img2dataset/__init__ puts in its place
    return importlib.import_module("img2dataset.main")


class downloading_with:
    """`with downloading_with(policy): img2dataset.download(...)`: img2dataset's workers fetch
    through the policy opener."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def __enter__(self):
        main = _img2dataset_main()
        from laionbuild.web.policy_downloader import PolicyDownloader

        self._saved = main.Downloader
        PolicyDownloader.policy = self.policy
        main.Downloader = PolicyDownloader
        return self

    def __exit__(self, *exc):
        main = _img2dataset_main()
        from laionbuild.web.policy_downloader import PolicyDownloader

        main.Downloader = self._saved
        PolicyDownloader.policy = None
