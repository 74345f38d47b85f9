"""A misbehaving web on loopback: one handler served on several 127.0.0.x addresses (distinct
hosts to the downloader), with the faults LAION-scale downloads meet.

    /img/N.jpg        a JPEG
    /slow/N.jpg       a JPEG whose body trickles in (each chunk well inside the timeout)
    /missing/N.jpg    404
    /error/N.jpg      500
    /hang/N.jpg       no answer for longer than the client's timeout
    /stall/N.jpg      half the body, then silence
    /truncated/N.jpg  Content-Length says more than is sent, then the connection closes
    /notimage/N.jpg   200 with HTML
    /huge/N.jpg       a 4000x4000 JPEG (fails download.max_image_area)
    /redirect/N.jpg   302 to the same path on `redirect_host` (e.g. a host the policy refuses)
    /optout/N.jpg     a JPEG with `X-Robots-Tag: noai` (an opt-out img2dataset honours)
    /flaky/N.jpg      503 the first time, the JPEG afterwards
    /backoff/N.jpg    429 with Retry-After the first time, the JPEG afterwards

Every host answers 429 when it already has `limit` requests in flight (a busy host), and the
server records the peak concurrency per host and how many 429s it sent.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from .imageserver import make_image


@lru_cache(maxsize=1)
def huge_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000), (200, 30, 30)).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


class FaultyWeb:
    def __init__(self, hosts=("127.0.0.1",), limit: int | None = None, delay: float = 0.0,
                 hang: float = 6.0, redirect_host: str | None = None, retry_after: str = "1"):
        self.hosts = list(hosts)
        self.limit, self.delay, self.hang = limit, delay, hang
        self.redirect_host = redirect_host
        self.retry_after = retry_after
        self.requests: Counter = Counter()
        self.in_flight: Counter = Counter()
        self.peak: Counter = Counter()
        self.too_many = 0
        self._lock = threading.Lock()
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                host = self.headers.get("Host", "").split(":")[0]
                with web._lock:
                    web.requests[(host, self.path)] += 1
                    first = web.requests[(host, self.path)] == 1
                    web.in_flight[host] += 1
                    web.peak[host] = max(web.peak[host], web.in_flight[host])
                    busy = web.limit is not None and web.in_flight[host] > web.limit
                    if busy:
                        web.too_many += 1
                # in flight while the host works on it (the delay); the slot frees before the
                # answer goes out, so a client that waits for the answer never overlaps
                if not busy:
                    time.sleep(web.delay)
                with web._lock:
                    web.in_flight[host] -= 1
                try:
                    if busy:
                        return self._status(429, {"Retry-After": "1"})
                    self._route(first)
                except OSError:
                    pass

            def _status(self, code, headers=None, body=b""):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _image(self, body, chunks=1, pause=0.0):
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = -(-len(body) // chunks)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    time.sleep(pause)

            def _route(self, first):
                kind, _, name = self.path.strip("/").partition("/")
                n = int(name.split(".")[0]) if name.split(".")[0].isdigit() else 0
                body = make_image(n)
                if kind == "img":
                    self._image(body)
                elif kind == "slow":
                    self._image(body, chunks=4, pause=0.3)
                elif kind == "missing":
                    self._status(404)
                elif kind == "error":
                    self._status(500)
                elif kind == "hang":
                    time.sleep(web.hang)
                    self._status(500)
                elif kind == "stall":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(web.hang)
                elif kind == "truncated":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif kind == "notimage":
                    self._status(200, {"Content-Type": "text/html"}, b"<html><body>not an image</body></html>")
                elif kind == "optout":
                    self._status(200, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}, body)
                elif kind == "huge":
                    self._image(huge_image())
                elif kind == "redirect":
                    port = self.server.server_address[1]
                    self._status(302, {"Location": f"http://{web.redirect_host}:{port}/img/{name}"})
                elif kind == "flaky":
                    self._status(503) if first else self._image(body)
                elif kind == "backoff":
                    self._status(429, {"Retry-After": web.retry_after}) if first else self._image(body)
                else:
                    self._status(404)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                pass

        first = Server((self.hosts[0], 0), Handler)
        self.port = first.server_address[1]
        self.servers = [first] + [Server((h, self.port), Handler) for h in self.hosts[1:]]

    def url(self, host_index: int, path: str) -> str:
        return f"http://{self.hosts[host_index]}:{self.port}{path}"

    def __enter__(self) -> "FaultyWeb":
        for s in self.servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
