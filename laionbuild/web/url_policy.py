"""URL policy for web sources: only http(s), and by default no URL whose host is, or resolves
to, an address that is not globally routable: loopback, private, carrier-grade NAT
(100.64.0.0/10), link-local, multicast, reserved, unspecified, documentation ranges, and the
IPv6 forms that carry one of those IPv4 addresses (IPv4-mapped/-compatible, 6to4, Teredo,
NAT64). A dataset build must not be a way into the builder's own network.
`download.allow_private_urls=true` lifts the address rule (the demo and the tests serve images
on 127.0.0.1).

Names are resolved with getaddrinfo, the answer kept in getaddrinfo's order (the order to
connect in) and cached per process for `CACHE_TTL` seconds (a name that does not resolve for
`NEGATIVE_TTL`); a transient failure (EAI_AGAIN) is retried. A host that does not resolve is
left to the downloader, which reports it as its own failure."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

# what the download's opener (laionbuild/web/policy_opener.py) puts before its own error messages
PREFIX = "laionbuild policy:"
REFUSED_SCHEME = "refused by URL policy: not http(s)"
REFUSED_ADDRESS = "refused by URL policy: private, loopback, link-local or multicast address"
CACHE_TTL = 300.0
NEGATIVE_TTL = 30.0
DNS_ATTEMPTS = 3
DNS_RETRY_DELAY = 0.2
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")
# public relays/translators to the IPv4 address they carry: such an address is as reachable as
# that IPv4 address; any other IPv6 address that carries one (local-use NAT64, IPv4-compatible)
# must also be global itself
_TRANSLATORS = tuple(ipaddress.ip_network(n) for n in ("2002::/16", "2001::/32", "64:ff9b::/96", "::ffff:0:0/96"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and reaches, through a relay or translator)."""
    out = []
    if ip.ipv4_mapped:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour:
        out.append(ip.sixtofour)
    if ip.teredo:
        out.extend(ip.teredo)
    if ip in _NAT64[0] or ip in _NAT64[1] or (ip in _COMPATIBLE and int(ip) > 1):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def _forbidden_ip(ip) -> bool:
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or getattr(ip, "is_site_local", False))


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded:
            if any(_forbidden_ip(v4) for v4 in embedded):
                return True
            if any(ip in net for net in _TRANSLATORS):
                return False
    return _forbidden_ip(ip)


_cache: dict[str, tuple[float, list[str]]] = {}
_cache_lock = threading.Lock()


def _lookup(host: str) -> list[str]:
    """getaddrinfo's addresses for `host`, in its order, without duplicates; [] if it does not
    resolve. Transient failures are retried."""
    for attempt in range(DNS_ATTEMPTS):
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN and attempt + 1 < DNS_ATTEMPTS:
                time.sleep(DNS_RETRY_DELAY * 2 ** attempt)
                continue
            return []
        except (UnicodeError, OSError):
            return []
        return list(dict.fromkeys(info[4][0] for info in infos))
    return []


def _resolve(host: str) -> list[str]:
    """Cached `_lookup`, thread-safe (two threads may both look a name up; the cache stays whole)."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(host)
    if hit and hit[0] > now:
        return hit[1]
    addresses = _lookup(host)
    with _cache_lock:
        _cache[host] = (now + (CACHE_TTL if addresses else NEGATIVE_TTL), addresses)
    return addresses


def host_allowed(host: str, allow_private: bool) -> tuple[bool, list[str]]:
    """(allowed, addresses) for one host: the download's opener checks every hop with this and
    connects to the addresses it checked, in this order. A host that does not resolve is allowed
    with no addresses (the caller reports the DNS failure)."""
    try:
        addresses = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        addresses = _resolve(host)
    return allow_private or not any(_forbidden(a) for a in addresses), addresses


def refusals(urls: list[str], allow_private: bool, allowlist=(), threads: int = 32) -> list[str | None]:
    """For each URL, the reason it is refused, or None. Hosts in `allowlist` are exempt from
    the address rule."""
    exempt = {h.lower() for h in allowlist}
    hosts: dict[str, bool] = {}
    parsed = []
    for url in urls:
        try:
            parts = urlsplit(url or "")
            host = parts.hostname
        except ValueError:
            parts, host = None, None
        parsed.append((parts, host))
        if host and not allow_private and host.lower() not in exempt:
            hosts.setdefault(host, False)
    if hosts:
        literal, names = [], []
        for host in hosts:
            try:
                ipaddress.ip_address(host)
                literal.append(host)
            except ValueError:
                names.append(host)
        for host in literal:
            hosts[host] = _forbidden(host)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for host, addresses in zip(names, pool.map(_resolve, names)):
                hosts[host] = any(_forbidden(a) for a in addresses)
    out: list[str | None] = []
    for parts, host in parsed:
        if parts is None or parts.scheme not in ("http", "https") or not host:
            out.append(REFUSED_SCHEME)
        elif not allow_private and hosts.get(host, False):
            out.append(REFUSED_ADDRESS)
        else:
            out.append(None)
    return out


def spread_by_host(urls: list[str]) -> list[int]:
    """A row order in which the URLs of one host are spread across the run (round robin over
    hosts, each host's rows in their original order), so no host receives a burst."""
    by_host: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        try:
            host = urlsplit(url or "").hostname or ""
        except ValueError:
            host = ""
        by_host.setdefault(host, []).append(i)
    queues = list(by_host.values())
    order: list[int] = []
    depth = 0
    while queues:
        queues = [q for q in queues if len(q) > depth]
        order.extend(q[depth] for q in queues)
        depth += 1
    return order
