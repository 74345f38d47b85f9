"""Download failure reasons: img2dataset's raw error strings (urllib's, the resizer's, the policy
opener's) folded into a small set of funnel buckets, and which of them are worth re-trying.

Transient: timeouts, connection errors, DNS errors, truncated bodies, HTTP 429 and 5xx — the
server or the network may do better later. Permanent: 404 and other 4xx, not an image,
too small/large, X-Robots-Tag opt-outs, hash mismatches, URL policy refusals."""

from __future__ import annotations

import re

from laionbuild.web.url_policy import PREFIX

REFUSED_HOP = "refused by URL policy: redirect or resolved address"  # a private/non-global address
REFUSED_HOP_SCHEME = "refused by URL policy: redirect to a scheme other than http(s)"
REFUSED_HOP_AMBIGUOUS = "refused by URL policy: ambiguous redirect (several Location or a URI header)"
# what shards written before the policy opener (through the old polite proxy) carry
OLD_PROXY_PREFIX = "laionbuild proxy:"
TIMEOUT = "timeout"
CONNECTION = "connection error"
DNS = "dns error"
TRUNCATED = "truncated body"
NOT_IMAGE = "not an image"
OPTED_OUT = "opted out (X-Robots-Tag)"
OTHER = "other error"
HOST_BUSY = "host busy (per-host cap)"  # no slot of download.max_per_host came free in time
HOST_PAUSED = "host paused (Retry-After)"  # the host asked for a pause beyond the request's deadline
TRANSIENT = {TIMEOUT, CONNECTION, DNS, TRUNCATED, HOST_BUSY, HOST_PAUSED}
# the resizer's and img2dataset's own messages, kept as they are
KNOWN = {"image too small", "image area too large", "aspect ratio too large", "hash mismatch"}
_HTTP = re.compile(r"HTTP Error (\d{3}): ?(.*)", re.S)


# what follows the prefix of the policy opener's (and the old proxy's) own error messages
_OPENER_REASONS = (("dns", DNS), ("host busy", HOST_BUSY), ("host paused", HOST_PAUSED))
_OLD_PROXY_REASONS = (("refused", REFUSED_HOP), ("timeout", TIMEOUT), ("dns", DNS))


def _by_start(text: str, reasons) -> str:
    return next((reason for start, reason in reasons if text.startswith(start)), CONNECTION)


def classify(message: str | None) -> str:
    """The funnel bucket of one failed row's `error_message`."""
    msg = (message or "").strip()
    low = msg.lower()
    if PREFIX in msg:
        ours = msg.split(PREFIX, 1)[1].strip().rstrip(">")
        if ours.startswith("refused"):
            if "not http(s)" in ours:
                return REFUSED_HOP_SCHEME
            if "ambiguous" in ours:
                return REFUSED_HOP_AMBIGUOUS
            return REFUSED_HOP
        return _by_start(ours, _OPENER_REASONS)
    http = _HTTP.search(msg)
    if http:
        code, reason = int(http.group(1)), http.group(2)
        if reason.startswith(OLD_PROXY_PREFIX):
            return _by_start(reason[len(OLD_PROXY_PREFIX):].strip(), _OLD_PROXY_REASONS)
        return f"http {code}"
    if msg in KNOWN:
        return msg
    if "x-robots-tag" in low:
        return OPTED_OUT
    if "decod" in low or "cannot identify image" in low:
        return NOT_IMAGE
    if "timed out" in low or "timeout" in low:
        return TIMEOUT
    if "incompleteread" in low or "incomplete read" in low:
        return TRUNCATED
    if "name or service not known" in low or "nodename nor servname" in low or "temporary failure in name" in low:
        return DNS
    if any(s in low for s in ("urlopen error", "connection", "remote end closed", "reset by peer", "broken pipe")):
        return CONNECTION
    return OTHER


def transient(reason: str) -> bool:
    """Whether a failure bucket is worth re-trying later."""
    if reason in TRANSIENT:
        return True
    if reason.startswith("http "):
        code = int(reason.split()[1])
        return code == 429 or code >= 500
    return False
