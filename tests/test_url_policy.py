"""URL policy: only http(s); loopback/private/link-local/multicast hosts refused unless
download.allow_private_urls; refusals are their own funnel bucket and never reach the network."""

from __future__ import annotations

import json
import socket

import pytest

from laionbuild.web.url_policy import REFUSED_ADDRESS, REFUSED_SCHEME, refusals

from .imageserver import ImageServer, source_overrides, write_source


@pytest.mark.parametrize("url,reason", [
    ("ftp://example.com/a.jpg", REFUSED_SCHEME),
    ("file:///etc/passwd", REFUSED_SCHEME),
    ("not a url", REFUSED_SCHEME),
    ("http://127.0.0.1:8000/a.jpg", REFUSED_ADDRESS),
    ("http://10.1.2.3/a.jpg", REFUSED_ADDRESS),
    ("http://192.168.0.10/a.jpg", REFUSED_ADDRESS),
    ("http://169.254.169.254/latest/meta-data", REFUSED_ADDRESS),  # cloud metadata endpoint
    ("http://224.0.0.1/a.jpg", REFUSED_ADDRESS),
    ("http://[::1]/a.jpg", REFUSED_ADDRESS),
    ("http://[::ffff:127.0.0.1]/a.jpg", REFUSED_ADDRESS),
    ("http://localhost/a.jpg", REFUSED_ADDRESS),  # a name that resolves to loopback
    ("http://100.64.0.1/a.jpg", REFUSED_ADDRESS),  # carrier-grade NAT: not private, not global
    ("http://192.0.2.1/a.jpg", REFUSED_ADDRESS),  # documentation
    ("http://198.18.0.1/a.jpg", REFUSED_ADDRESS),  # benchmarking
    ("http://0.0.0.0/a.jpg", REFUSED_ADDRESS),
    ("http://2130706433/a.jpg", REFUSED_ADDRESS),  # 127.0.0.1 spelled in decimal
    ("http://0x7f000001/a.jpg", REFUSED_ADDRESS),
    ("http://0177.0.0.1/a.jpg", REFUSED_ADDRESS),
    ("http://[2002:7f00:1::]/a.jpg", REFUSED_ADDRESS),  # 6to4 of 127.0.0.1
    ("http://[2002:a00:1::]/a.jpg", REFUSED_ADDRESS),  # 6to4 of 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/a.jpg", REFUSED_ADDRESS),  # NAT64 of 169.254.169.254
    ("http://[::127.0.0.1]/a.jpg", REFUSED_ADDRESS),  # IPv4-compatible
    ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/a.jpg", REFUSED_ADDRESS),  # Teredo, client 10.0.0.1
    ("http://[fd00::1]/a.jpg", REFUSED_ADDRESS),  # unique local
    ("http://[fec0::1]/a.jpg", REFUSED_ADDRESS),  # site-local (deprecated)
    ("http://[64:ff9b:1::808:808]/a.jpg", REFUSED_ADDRESS),  # local-use NAT64: not global, whatever it carries
    ("https://[64:ff9b::808:808]/a.jpg", None),  # well-known NAT64 of 8.8.8.8
    ("http://[fe80::1]/a.jpg", REFUSED_ADDRESS),
    ("https://93.184.216.34/a.jpg", None),
    ("https://[2606:4700::1111]/a.jpg", None),
    ("https://[2002:5db8:d822::]/a.jpg", None),  # 6to4 of 93.184.216.34
    ("http://no-such-host.invalid/a.jpg", None),  # unresolvable: left to the downloader
])
def test_refusals(url, reason, dns):
    assert refusals([url], allow_private=False) == [reason]


@pytest.fixture
def dns(monkeypatch):
    """The names these tests use answer the same on every machine (no DNS server, no /etc/hosts
    entry needed): `localhost` is 127.0.0.1, `.invalid` names do not resolve, address literals
    resolve to themselves."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "localhost":
            host = "127.0.0.1"
        elif str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        kwargs["flags"] = kwargs.get("flags", 0) | socket.AI_NUMERICHOST
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_allow_private_lifts_only_the_address_rule(dns):
    urls = ["http://127.0.0.1/a.jpg", "http://localhost/b.jpg", "ftp://127.0.0.1/c.jpg"]
    assert refusals(urls, allow_private=True) == [None, None, REFUSED_SCHEME]


def test_refused_rows_are_counted_and_never_requested(project, tmp_path):
    with ImageServer() as server:
        write_source(tmp_path / "source", server.url, rows=12)
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=false",
                      "--stage", "download")
        assert sum(server.requests.values()) == 0
    stats = json.loads((project / "data/images/part_0/stats.json").read_text())
    assert stats["counts"] == {"download_attempted": 12, "refused_by_url_policy": 12, "downloaded_ok": 0,
                               "download_failed": 12}
    assert stats["failures"] == {REFUSED_ADDRESS: 12}


def test_urls_of_one_host_are_spread_over_the_run():
    from laionbuild.web.url_policy import spread_by_host

    urls = [f"http://a.example/{i}" for i in range(6)] + [f"http://b.example/{i}" for i in range(3)] + ["http://c.example/0"]
    order = spread_by_host(urls)
    assert sorted(order) == list(range(10))
    assert [urls[i] for i in order] == [
        "http://a.example/0", "http://b.example/0", "http://c.example/0",
        "http://a.example/1", "http://b.example/1", "http://a.example/2", "http://b.example/2",
        "http://a.example/3", "http://a.example/4", "http://a.example/5"]
