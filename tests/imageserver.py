"""A real HTTP server on 127.0.0.1 serving generated images, with a per-request delay and a
request log, for img2dataset to download from."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def make_image(i: int, size=(48, 40)) -> bytes:
    image = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    for x in range(0, size[0], 4):
        image.putpixel((x, (i + x) % size[1]), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class ImageServer:
    """GET /img/N.jpg -> a JPEG; /missing/... -> 404. `delay` seconds before each answer."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.requests: Counter = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.requests[self.path] += 1
                time.sleep(server.delay)
                if self.path.startswith("/img/") and self.path.endswith(".jpg"):
                    body = make_image(int(self.path[5:-4]))
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients killed mid-request (the kill tests) are expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_source(directory, base_url: str, rows: int, missing_every: int = 0) -> None:
    """One LAION-400M-style metadata part (part-00000.parquet) whose URLs point at the server."""
    directory.mkdir(parents=True, exist_ok=True)
    urls = [f"{base_url}/missing/{i}.jpg" if missing_every and i % missing_every == 0 else f"{base_url}/img/{i}.jpg"
            for i in range(rows)]
    table = pa.table({
        "SAMPLE_ID": list(range(rows)),
        "URL": urls,
        "TEXT": [f"a generated picture number {i}" for i in range(rows)],
        "NSFW": ["UNLIKELY"] * rows,
    })
    pq.write_table(table, directory / "part-00000.parquet")


def source_overrides(directory) -> list[str]:
    return [f"source.base_url={directory}", "source.num_parts=1", "subset.parts=[0]",
            "~source.columns.sample_id", "~source.columns.width", "~source.columns.height",
            "~source.columns.license", "~source.columns.similarity",
            "download.local_server.host=null", "download.local_server.root=null"]
