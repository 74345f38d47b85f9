"""The URL policy inside img2dataset's workers (laionbuild/web/policy_opener.py), end to end through
the download stage: hostile redirects over HTTP and HTTPS never reach the trap and are their own
funnel reasons per row; hosts whose first address does not answer, or whose DNS fails once, are
downloaded."""

from __future__ import annotations

import json
import socket
import tarfile
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from laionbuild.web import url_policy
from laionbuild.web.failures import REFUSED_HOP, REFUSED_HOP_AMBIGUOUS, REFUSED_HOP_SCHEME, classify

from .hostileweb import HostileServer, Trap, redirects, self_signed
from .imageserver import ImageServer, source_overrides
from .test_download_web import write_urls

EXPECTED = {"ftp": REFUSED_HOP_SCHEME, "file": REFUSED_HOP_SCHEME, "data": REFUSED_HOP_SCHEME,
            "uri-only": REFUSED_HOP_AMBIGUOUS, "two-locations": REFUSED_HOP_AMBIGUOUS,
            "other-name": REFUSED_HOP, "decimal": REFUSED_HOP, "hex": REFUSED_HOP, "octal": REFUSED_HOP,
            "ipv6-mapped": REFUSED_HOP}


def rows(project) -> dict[str, tuple[str, str | None]]:
    out = {}
    for path in (project / "data/images/part_0").glob("*.parquet"):
        for row in pq.read_table(path, columns=["url", "status", "error_message"]).to_pylist():
            out[row["url"]] = (row["status"], row["error_message"])
    return out


def test_hostile_redirects_never_leave_the_policy(project, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the workers trust the test's certificate
    with Trap() as trap, HostileServer(trap.port) as plain, HostileServer(trap.port, tls=(cert, key)) as tls:
        assert set(redirects(trap.port)) == set(EXPECTED)
        urls = []
        for server in (plain, tls):
            urls += [f"{server.url}/img/{i}.jpg" for i in range(2)]
            urls += [f"{server.url}/redirect/{kind}.jpg" for kind in EXPECTED]
        write_urls(tmp_path / "source", urls)
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=false",
                      "download.private_host_allowlist=[127.0.0.1]", "download.timeout=5",
                      "download.number_sample_per_shard=64", "--stage", "download")
        assert trap.connections == 0
    got = rows(project)
    for server in (plain, tls):
        for i in range(2):
            assert got[f"{server.url}/img/{i}.jpg"][0] == "success"
        for kind, reason in EXPECTED.items():
            status, message = got[f"{server.url}/redirect/{kind}.jpg"]
            assert status != "success" and classify(message) == reason, (server.url, kind, message)
    stats = json.loads((project / "data/images/part_0/stats.json").read_text())
    assert stats["counts"]["downloaded_ok"] == 4
    assert stats["failures"] == {REFUSED_HOP_SCHEME: 6, REFUSED_HOP_AMBIGUOUS: 4, REFUSED_HOP: 10}
    images = 0
    for path in (project / "data/images/part_0").glob("*.tar"):
        with tarfile.open(path) as tar:
            images += sum(m.name.endswith(".jpg") for m in tar.getmembers())
    assert images == 4  # nothing the trap or a data: URL served landed in a shard


STUB = textwrap.dedent('''
    # a resolver stub for the names of tests/test_policy_opener.py, in every process of the build
    import socket
    _real = socket.getaddrinfo
    _failed = set()

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".laionbuild-test"):
            if host.startswith("flaky") and host not in _failed:
                _failed.add(host)
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port or 0, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return _real(host, port, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
''')


def test_addresses_keep_getaddrinfo_order(monkeypatch):
    # on a machine without IPv6, getaddrinfo puts the A record first; as strings, the AAAA sorts first
    answer = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0)),
              (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2606:4700::1111", 0, 0, 0)),
              (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answer)
    monkeypatch.setattr(url_policy, "_cache", {})
    assert url_policy.host_allowed("v6first.example", False) == (True, ["93.184.216.34", "2606:4700::1111"])


def test_ipv6_first_and_flaky_dns_hosts_are_downloaded(project, tmp_path, monkeypatch):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(STUB)
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")])))
    with ImageServer() as server:  # on 127.0.0.1 only: ::1 refuses the connection
        port = server.url.rsplit(":", 1)[1]
        urls = [f"http://{name}.laionbuild-test:{port}/img/{i}.jpg" for name in ("v6first", "flaky") for i in range(3)]
        write_urls(tmp_path / "source", urls)
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                      "download.retries=0", "--stage", "download")
    stats = json.loads((project / "data/images/part_0/stats.json").read_text())
    assert stats["counts"]["downloaded_ok"] == 6, stats


def _fetch_all(args) -> int:
    """A worker process: `urls` fetched with 8 threads through the policy opener; how many failed."""
    policy, urls = args
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from laionbuild.web.policy_opener import install

    install(policy)

    def fetch(url):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                r.read()
            return 0
        except Exception:  # noqa: BLE001 - counted
            return 1

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(fetch, urls))


def test_per_host_cap_holds_across_processes(tmp_path):
    import multiprocessing

    from laionbuild.web.policy_opener import Policy

    from .webfaults import FaultyWeb

    ctx = multiprocessing.get_context("spawn")
    with FaultyWeb(limit=2, delay=0.2) as web, ctx.Pool(2) as pool:
        urls = [web.url(0, f"/img/{i}.jpg") for i in range(16)]
        capped = Policy(allow_private=True, max_per_host=2, timeout=10, backoff_base=0, state_dir=str(tmp_path / "a"))
        assert pool.map(_fetch_all, [(capped, urls[:8]), (capped, urls[8:])]) == [0, 0]
        assert web.too_many == 0 and max(web.peak.values()) <= 2
        # the same cap with a state dir per process (not shared): the processes overlap and the
        # host answers 429 (so the check above can fail)
        web.peak.clear()
        own = [Policy(allow_private=True, max_per_host=2, timeout=10, backoff_base=0, state_dir=str(tmp_path / d))
               for d in ("b", "c")]
        pool.map(_fetch_all, [(own[0], urls[:8]), (own[1], urls[8:])])
        assert web.too_many > 0 and max(web.peak.values()) > 2


class _Answers:
    """A server on 127.0.0.1 that answers every GET with `status` and `headers` (a body of
    `body` bytes, sent at `rate` bytes/s when given), counting the requests."""

    def __init__(self, status: int, headers: dict, body: int = 16, rate: float | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests += 1
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(body))
                self.end_headers()
                for _ in range(body):
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    if rate:
                        time.sleep(1 / rate)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/a.jpg"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _opener(tmp_path, **kw):
    from laionbuild.web.policy_opener import Policy, build_opener

    return build_opener(Policy(allow_private=True, state_dir=str(tmp_path / "hosts"), **kw))


@pytest.mark.parametrize("retry_after", ["0", "-5", "Thu, 01 Jan 1970 00:00:00 GMT"])
def test_a_zero_or_past_retry_after_backs_off_all_the_same(tmp_path, retry_after):
    """A 429 whose Retry-After says "now" (or the past) gets the exponential back-off, not a busy loop."""
    import urllib.error

    server = _Answers(429, {"Retry-After": retry_after})
    try:
        opener = _opener(tmp_path, max_per_host=2, timeout=2, backoff_base=0.2)
        with pytest.raises(urllib.error.HTTPError) as raised:
            opener.open(server.url, timeout=2)
        assert raised.value.code == 429
        # 0.2 + 0.4 s of back-off fit the 1.2 s budget, 0.8 more does not: 3 requests (with the
        # old arithmetic, hundreds)
        assert 2 <= server.requests <= 4, server.requests
    finally:
        server.close()


def test_a_long_retry_after_fails_later_requests_at_once_not_after_it(tmp_path):
    """A host that asks for a day's pause is paused (politely) but costs later requests nothing:
    they fail at once as transient `host paused`, which retry-failed re-attempts later."""
    import urllib.error

    from laionbuild.web.failures import HOST_PAUSED, classify, transient

    server = _Answers(429, {"Retry-After": "100000"})
    try:
        opener = _opener(tmp_path, max_per_host=2, timeout=2, backoff_base=0.2)
        with pytest.raises(urllib.error.HTTPError):
            opener.open(server.url, timeout=2)
        assert server.requests == 1
        start = time.monotonic()
        with pytest.raises(urllib.error.URLError) as raised:
            opener.open(server.url, timeout=2)
        assert time.monotonic() - start < 1 and server.requests == 1
        assert classify(str(raised.value)) == HOST_PAUSED and transient(HOST_PAUSED)
        with pytest.raises(urllib.error.HTTPError):  # inf / huge values do not overflow the pause
            _opener(tmp_path / "other", max_per_host=2, timeout=2).open(
                _Answers(429, {"Retry-After": "1e300"}).url, timeout=2)
    finally:
        server.close()


def test_waiting_for_a_host_slot_ends_at_the_deadline(tmp_path):
    """With every slot of a host held by a slow response, another request gives up at its
    deadline (download.timeout) as transient `host busy`, instead of waiting for the slot."""
    import urllib.error

    from laionbuild.web.failures import HOST_BUSY, classify, transient

    server = _Answers(200, {"Content-Type": "image/jpeg"}, body=30, rate=2)  # 15 s of body
    try:
        opener = _opener(tmp_path, max_per_host=1, timeout=1.5)
        held = opener.open(server.url, timeout=5)  # holds the host's one slot until closed
        start = time.monotonic()
        with pytest.raises(urllib.error.URLError) as raised:
            opener.open(server.url, timeout=1.5)
        waited = time.monotonic() - start
        assert 1.4 <= waited < 4, waited
        assert classify(str(raised.value)) == HOST_BUSY and transient(HOST_BUSY)
        held.close()
        with opener.open(server.url, timeout=5) as again:  # the slot is free again
            assert again.status == 200
    finally:
        server.close()
