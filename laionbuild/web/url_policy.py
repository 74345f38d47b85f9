"""URL policy for web sources: only http(s), and by default no URL whose host is, or resolves
to, a loopback, private, link-local, multicast, reserved or unspecified address (a dataset
build must not be a way into the builder's own network). `download.allow_private_urls=true`
lifts the address rule (the demo and the tests serve images on 127.0.0.1).

Hosts are resolved once each, in parallel; a host that does not resolve is left to the
downloader, which reports it as its own failure."""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

REFUSED_SCHEME = "refused by URL policy: not http(s)"
REFUSED_ADDRESS = "refused by URL policy: private, loopback, link-local or multicast address"


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified)


def _resolve(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (socket.gaierror, UnicodeError, OSError):
        return []


def host_allowed(host: str, allow_private: bool) -> tuple[bool, list[str]]:
    """(allowed, addresses) for one host: the polite proxy checks every hop with this and
    connects to the address it checked. A host that does not resolve is allowed with no
    addresses (the caller reports the DNS failure)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        addresses = [host.strip("[]")]
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
